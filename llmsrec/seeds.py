"""Seed lists as the CLI takes them (``--seeds 0,1,2``): one parsing rule for every command."""

from __future__ import annotations

from llmsrec.errors import InputError


def parse_seeds(text: str | None, default: int | None = None) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: non-negative integers, order kept, duplicates dropped
    (``"2,0, 2"`` -> ``[2, 0]``), empty entries ignored.

    Args:
        text: the comma-separated seeds; None means ``[default]`` when a default is given.
        default: the seed of an omitted option (e.g. the run's own seed).
    Raises:
        InputError: no seed (``text`` empty, or None without a default), an entry that is not
            an integer, or a negative seed; the message names ``--seeds``.
    """
    if text is None and default is not None:
        return [int(default)]
    out: list[int] = []
    for part in str(text if text is not None else "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            s = int(part)
        except ValueError:
            raise InputError(f"--seeds: {part!r} is not an integer (expected e.g. 0,1,2)") from None
        if s < 0:
            raise InputError(f"--seeds: {s} is negative")
        if s not in out:
            out.append(s)
    if not out:
        raise InputError("--seeds: give at least one seed, e.g. 0,1,2")
    return out
