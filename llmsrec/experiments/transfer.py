"""Cross-domain transfer (paper Sec. 4.1.4, Table 8): models trained on dataset A, scored on B.

Nothing is trained on B. A's CF-SRec and A's LLM-SRec heads score B's stored validation
and test candidates (and the shuffled test view) as they are.

Items of B get A's collaborative embedding when A knows them, and the mean of A's item
embeddings when it does not: one rule for every model.

* **Matching.** ``match="title"`` pairs a B item with an A item when their titles agree
  after case folding and whitespace folding, and each title names exactly one item in each
  dataset (remakes that share a title stay unmatched). ``match="id"`` pairs equal raw item
  ids (two slices of one dataset). ``match="none"`` treats every item of B as unseen. That
  is the paper's setting (Electronics -> CDs share no items).
* **CF-SRec** (SASRec and the rest). A copy of A's model whose item table is re-indexed to
  B's item ids: row ``j`` is A's row of the matched item, or the mean of A's rows 1..N_A.
  All other weights are A's. With every item unseen, every candidate gets the same score.
  The pessimistic tie rule of :mod:`llmsrec.metrics` then gives HR@10 = 0, where a random
  order would give 10 / (1 + negatives).
* **LLM-SRec.** B's prompts are built as usual, with B's titles. Their soft tokens come from
  the re-indexed item table, mapped by A's own f_I and out-token inputs: the ``/params`` of
  A's cache, passed to precompute as a params file. The frozen LLM reads them into a cache
  of B's ``valid``, ``test`` and ``test-shuffled`` views, with A's readout layers, dtype,
  history window and template. A's heads then score it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from llmsrec.atomic import atomic_file, write_json
from llmsrec.errors import InputError
from llmsrec.pipeline import METRIC_KEYS

MATCH_RULES = ("title", "id", "none")
TRANSFER_VIEWS = ("valid", "test", "test-shuffled")
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def title_key(title: str) -> str:
    """The matching key of a title: case-folded, inner whitespace runs as one space, stripped."""
    return re.sub(r"\s+", " ", str(title)).strip().casefold()


def match_items(src_titles, dst_titles, rule: str = "title") -> np.ndarray:
    """Map B's items to A's items.

    Args:
        src_titles: A's titles (raw item ids for ``rule="id"``), index = iid (index 0 is
            padding and ignored).
        dst_titles: B's, the same layout.
        rule: ``title`` (unique case/whitespace-folded title in both), ``id`` (equal
            strings) or ``none``.

    Returns:
        int64 ``(N_B + 1,)``: entry ``j`` is A's iid for B's item ``j``, or 0 if unseen
        (entry 0 is 0).

    Raises:
        InputError: an unknown rule.
    """
    if rule not in MATCH_RULES:
        raise InputError(f"--match {rule!r}: expected one of {', '.join(MATCH_RULES)}")
    out = np.zeros(len(dst_titles), dtype=np.int64)
    if rule == "none":
        return out

    key = title_key if rule == "title" else str

    def unique_keys(titles) -> dict[str, int]:
        seen: dict[str, int] = {}
        for iid in range(1, len(titles)):
            k = key(titles[iid])
            seen[k] = -1 if k in seen else iid
        return {k: v for k, v in seen.items() if v > 0}

    src, dst = unique_keys(src_titles), unique_keys(dst_titles)
    for k, j in dst.items():
        out[j] = src.get(k, 0)
    return out


def reindex_item_table(model, mapping: np.ndarray):
    """A copy of CF-SRec ``model`` (trained on A) whose item table is re-indexed to B.

    Args:
        model: an ``llmsrec.cfsrec`` model with ``item_emb`` (``(N_A + 1 + extra, d)``; the
            ``extra`` rows after the items, e.g. BERT4Rec's mask token, are kept).
        mapping: int64 ``(N_B + 1,)`` from :func:`match_items`.

    Returns:
        a new model of the same class with ``config.n_items = N_B``: item row ``j`` is A's
        row ``mapping[j]``, or the mean of A's rows 1..N_A where ``mapping[j] == 0``; row 0
        (padding) and all other weights are A's. Eval mode.

    Raises:
        InputError: a mapping entry outside 1..N_A, or a model with no ``item_emb``.
    """
    import dataclasses

    import torch

    if not hasattr(model, "item_emb"):
        raise InputError(f"{type(model).__name__}: no item table to re-index")
    n_src = int(model.config.n_items)
    mapping = np.asarray(mapping, dtype=np.int64)
    if mapping.min() < 0 or mapping.max() > n_src:
        raise InputError(f"item mapping: ids outside 0..{n_src}")
    old = model.item_emb.weight.detach()
    extra = old[n_src + 1:]
    mean = old[1: n_src + 1].mean(0)
    rows = old[torch.from_numpy(mapping)].clone()
    rows[torch.from_numpy(mapping == 0)] = mean
    rows[0] = old[0]
    table = torch.cat([rows, extra])
    cfg = dataclasses.replace(model.config, n_items=len(mapping) - 1)
    new = type(model)(cfg)
    state = {k: v for k, v in model.state_dict().items() if k != "item_emb.weight"}
    state["item_emb.weight"] = table
    new.load_state_dict(state)
    return new.eval()


def _metrics(m: dict) -> dict:
    return {k: float(m[k]) for k in METRIC_KEYS}


def run_transfer(source_run, data, out, *, match: str = "title", batch_tokens: int | None = None,
                 device: str = "cpu", num_threads: int | None = None, progress: bool = True,
                 trust_remote_code: bool = False, log=print) -> dict:
    """Score A's SASRec and LLM-SRec on B without training on B (Table 8).

    Args:
        source_run: A's ``llmsrec run`` folder (``data/``, ``sasrec/``, ``cache/cache.h5``,
            ``train/``).
        data: B's prepared dataset folder.
        out: output folder: ``sasrec/`` (A's teacher re-indexed to B), ``params.safetensors``
            (A's f_I and out tokens), ``cache/cache.h5`` (B's views), ``transfer.json`` and
            ``transfer.md``.
        match: ``title``, ``id`` or ``none`` (:func:`match_items`).
        batch_tokens, device, num_threads, trust_remote_code: the precompute's; the LLM, its
            dtype, history window, template and readout layers are those of A's cache.

    Returns:
        the ``transfer.json`` document: ``{"source", "target", "match": {...},
        "models": {"SASRec": {"valid", "test", "test-shuffled"}, "LLM-SRec": {...}},
        "timings"}`` with NDCG@10/20 and HR@10/20.

    Raises:
        InputError: a source run without a finished stage, or a cache or heads that do not
            fit B (see :func:`llmsrec.heads.train.evaluate_heads`).
    """
    from llmsrec.cache import open_cache
    from llmsrec.cfsrec import evaluate_cfsrec, load_cfsrec, save_cfsrec
    from llmsrec.data import load_prepared
    from llmsrec.heads.train import evaluate_heads
    from llmsrec.pipeline import teacher_shuffled_metrics
    from llmsrec.precompute import precompute
    from llmsrec.precompute.params import write_params
    from llmsrec.run_layout import STAGE_DIRS

    src_dir, out = Path(source_run), Path(out)
    dirs = {k: src_dir / v for k, v in STAGE_DIRS.items()}
    dirs["data"], src_cache = dirs["prepare"], dirs["precompute"] / "cache.h5"
    for p in (dirs["data"], dirs["sasrec"], src_cache, dirs["train"] / "heads.safetensors"):
        if not p.exists():
            raise InputError(f"{p}: not found; --source must be a finished `llmsrec run` folder")
    t0 = time.perf_counter()
    timings = {}
    src, dst = load_prepared(dirs["data"]), load_prepared(data)
    mapping = (match_items(src.raw_items, dst.raw_items, "id") if match == "id"
               else match_items(src.titles, dst.titles, match))
    _, test_targets = dst.view("test")
    matched_targets = float(np.mean(mapping[np.asarray(test_targets[1:], dtype=np.int64)] > 0))
    match_doc = {"rule": match, "items": dst.n_items, "matched": int((mapping[1:] > 0).sum()),
                 "test_targets_matched": round(matched_targets, 4)}
    log(f"[transfer] {match_doc['matched']:,} of {dst.n_items:,} items of {data} matched to "
        f"{dirs['data']} by {match}; {matched_targets:.1%} of the test targets")

    out.mkdir(parents=True, exist_ok=True)
    teacher = reindex_item_table(load_cfsrec(dirs["sasrec"]), mapping)
    save_cfsrec(teacher, out / "sasrec")
    with atomic_file(out / "item_map.json") as f:
        json.dump({"source": str(dirs["data"]), "target": str(data), "rule": match,
                   "target_to_source": mapping.tolist()}, f)

    with open_cache(src_cache) as c:
        prov, params = c.provenance, c.params()
    write_params(out / "params.safetensors", params, extra={"source": str(src_cache)})
    t = time.perf_counter()
    cache = precompute(
        dst, out / "sasrec", out / "cache" / "cache.h5", llm=prov["model"], views=TRANSFER_VIEWS,
        history_window=int(prov["history_window"]), verb=prov.get("verb"), device=device,
        dtype=_DTYPES.get(prov.get("dtype"), None), params=out / "params.safetensors",
        readout_layers=tuple(prov.get("readout_layers", ())), template=prov["template_version"],
        num_threads=num_threads, progress=progress, trust_remote_code=trust_remote_code,
        **({} if batch_tokens is None else {"batch_tokens": batch_tokens}))
    timings["precompute"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    sas = evaluate_cfsrec(dst, out / "sasrec")
    sas["test-shuffled"] = teacher_shuffled_metrics(dst, cache)
    heads = evaluate_heads(dst, cache, dirs["train"], views=TRANSFER_VIEWS)
    timings["evaluate"] = round(time.perf_counter() - t, 1)
    timings["total"] = round(time.perf_counter() - t0, 1)
    doc = {"source": str(src_dir), "target": str(data), "match": match_doc,
           "models": {"SASRec": {k: _metrics(v) for k, v in sas.items()},
                      "LLM-SRec": {k: _metrics(v) for k, v in heads.items()}},
           "timings": timings}
    write_json(out / "transfer.json", doc)
    with atomic_file(out / "transfer.md") as f:
        f.write(format_transfer_md(doc))
    return doc


def format_transfer_md(doc: dict) -> str:
    """Table 8-style markdown: one row per model, test HR@10 / NDCG@10 and the shuffled change."""
    m = doc["match"]
    lines = [f"# Transfer {doc['source']} -> {doc['target']}", "",
             f"Item match: {m['rule']}; {m['matched']:,} of {m['items']:,} target items known to the "
             f"source, {m['test_targets_matched']:.1%} of the test targets. Nothing trained on the target.",
             "", "| model | test HR@10 | test NDCG@10 | test HR@20 | test NDCG@20 | shuffled NDCG@10 | change |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in doc["models"].items():
        t, sh = r["test"], r.get("test-shuffled")
        shuffled = "- | -" if not sh else f"{sh['NDCG@10']:.4f} | " + (
            f"{(sh['NDCG@10'] - t['NDCG@10']) / t['NDCG@10']:+.2%}" if t["NDCG@10"] else "-")
        lines.append(f"| {name} | {t['HR@10']:.4f} | {t['NDCG@10']:.4f} | {t['HR@20']:.4f} | "
                     f"{t['NDCG@20']:.4f} | {shuffled} |")
    return "\n".join(lines) + "\n"
