"""Markdown tables of ranking metrics, shared by every command that prints results."""

from __future__ import annotations

import re
from typing import Mapping

__all__ = ["format_table"]

_KEY = re.compile(r"^(?P<name>[A-Za-z]+)@(?P<k>\d+)$")
_ORDER = {"NDCG": 0, "HR": 1}


def _metric_sort_key(key: str):
    m = _KEY.match(key)
    if not m:
        return (2, 0, key)
    return (_ORDER.get(m["name"], 2), int(m["k"]), m["name"])


def format_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]], digits: int = 4) -> str:
    """Render ``{name: {split: {metric: value}}}`` as a markdown table.

    One line per (name, split) in the given order; metric columns are the union of all
    metric keys, NDCG@K before HR@K, each by increasing K (e.g. NDCG@10, NDCG@20, HR@10,
    HR@20). A metric missing from a row prints as an empty cell.

    Args:
        rows: model/run name -> split name (e.g. ``"valid"``, ``"test"``) -> metrics.
        digits: decimals printed per value.

    Returns:
        The table as a string (no trailing newline), e.g.::

            | model | split | NDCG@10 | NDCG@20 | HR@10 | HR@20 |
            |---|---|---:|---:|---:|---:|
            | sasrec | valid | 0.4012 | ... |
    """
    keys: list[str] = []
    for splits in rows.values():
        for metrics in splits.values():
            for k in metrics:
                if k not in keys:
                    keys.append(k)
    keys.sort(key=_metric_sort_key)
    lines = [
        "| " + " | ".join(["model", "split", *keys]) + " |",
        "|" + "---|---|" + "---:|" * len(keys),
    ]
    for name, splits in rows.items():
        for split, metrics in splits.items():
            cells = [name, split]
            for k in keys:
                v = metrics.get(k)
                cells.append("" if v is None else f"{float(v):.{digits}f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
