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
* **LLM4Rec baselines** (TALLRec, LLaRA, CoLLM, A-LLMRec; on request). Each is trained on A
  with ``llmsrec compare``'s LLM4Rec budget and layout (``<name>-seed<k>/``, reused when its
  ``request.json`` matches), with A's SASRec as the teacher. On B it reads B's prompts (B's
  titles) with its own LoRA, f_I, f_U, out tokens and heads. Its CF-SRec is its teacher with
  the re-indexed item table: LLaRA and CoLLM's item soft tokens are f_I of that table (an
  unseen item: f_I of the mean row), A-LLMRec's are f_I(enc_I(row)) through its stage-1
  encoder, and CoLLM and A-LLMRec's user-representation token is f_U of the re-indexed
  teacher's O_u of B's history. TALLRec reads titles only.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from llmsrec.atomic import atomic_file, jsonable, write_json
from llmsrec.defaults import BASELINES, HISTORY_WINDOW, LLM
from llmsrec.errors import InputError
from llmsrec.pipeline import METRIC_KEYS

MATCH_RULES = ("title", "id", "none")
TRANSFER_VIEWS = ("valid", "test", "test-shuffled")
#: the rows of the transfer table, in the paper's Table 8 order
TRANSFER_MODELS = ("sasrec", *BASELINES, "llmsrec")
#: what ``llmsrec transfer`` scores without ``--models``
DEFAULT_TRANSFER_MODELS = ("sasrec", "llmsrec")
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parse_transfer_models(text: str) -> list[str]:
    """``"llmsrec,tallrec,sasrec"`` -> ``["sasrec", "tallrec", "llmsrec"]`` (Table 8 order,
    duplicates dropped).

    Raises:
        InputError: an empty list or a name outside :data:`TRANSFER_MODELS`.
    """
    from llmsrec.experiments.compare import parse_models  # deferred: compare imports torch and the baselines

    return parse_models(text, allowed=TRANSFER_MODELS)


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


def load_transferred_baseline(ds, checkpoint, mapping, *, llm=None, device: str = "cpu",
                              batch_tokens: int = LLM["batch_tokens"], views=TRANSFER_VIEWS):
    """An LLM4Rec baseline trained on A, made ready to score dataset B (nothing trained on B).

    Args:
        ds: B's ``PreparedDataset``.
        checkpoint: the baseline's folder (:func:`llmsrec.baselines.train_baseline`, on A).
        mapping: int64 ``(N_B + 1,)`` from :func:`match_items`.
        llm: a loaded base LLM without adapters (LoRA goes in place), or None to load the
            recorded one on ``device``.
        batch_tokens, views: those of :func:`llmsrec.baselines.load_baseline_checkpoint`.

    Returns:
        its :class:`~llmsrec.baselines.BaselineTrainer` on B's prompts (B's titles): LoRA,
        f_I, f_U, out tokens and heads from the checkpoint; the CF-SRec is the checkpoint's
        teacher through :func:`reindex_item_table` (LLaRA, CoLLM, A-LLMRec), so an item A
        has never seen gets f_I of the mean of A's item rows (A-LLMRec: through its stage-1
        encoder first), and O_u is that teacher's on B's history.

    Raises:
        InputError: not a baseline checkpoint, a mapping of another length than B's items,
            or another LLM than the recorded one.
    """
    from llmsrec.baselines import get_spec, load_baseline_checkpoint
    from llmsrec.baselines.common import read_baseline_config
    from llmsrec.cfsrec import load_cfsrec
    from llmsrec.e2e.loop import checkpoint_teacher

    ckpt = Path(checkpoint)
    doc = read_baseline_config(ckpt)
    spec = get_spec(doc["baseline"]["model"])
    mapping = np.asarray(mapping, dtype=np.int64)
    if mapping.shape != (ds.n_items + 1,):
        raise InputError(f"item mapping: {len(mapping) - 1} items, {ds.root} has {ds.n_items}")
    teacher = None
    if spec.needs_sasrec:
        teacher = reindex_item_table(load_cfsrec(checkpoint_teacher(ckpt, doc["provenance"])), mapping)
    return load_baseline_checkpoint(ds, ckpt, device=device, llm=llm, batch_tokens=batch_tokens, views=views,
                                    teacher=teacher, other_dataset=True)


def transfer_baseline(ds, checkpoint, mapping, *, views=TRANSFER_VIEWS, **kw) -> dict:
    """Score an LLM4Rec baseline trained on A on B's stored candidates.

    Args: those of :func:`load_transferred_baseline` (``kw``: ``llm``, ``device``,
    ``batch_tokens``).

    Returns:
        ``{view: {"NDCG@10", "NDCG@20", "HR@10", "HR@20"}}`` for ``views``; the item states
        are computed once. With ``mapping`` the identity on A's own data these equal
        ``llmsrec evaluate --model NAME`` on A.
    """
    from llmsrec.baselines import view_scores
    from llmsrec.e2e.loop import metrics_of

    tr = load_transferred_baseline(ds, checkpoint, mapping, views=views, **kw)
    item_h = tr.item_states()
    return {v: _metrics(metrics_of(view_scores(tr, v, item_h).scores)) for v in views}


def run_transfer(source_run, data, out, *, match: str = "title", models=DEFAULT_TRANSFER_MODELS, llm=None,
                 llm4rec_options: dict | None = None, llm4rec_runs=None, seed: int = 0,
                 batch_tokens: int | None = None, device: str = "cpu", num_threads: int | None = None,
                 progress: bool = True, trust_remote_code: bool = False, log=print) -> dict:
    """Score A's models on B without training on B (Table 8).

    Args:
        source_run: A's ``llmsrec run`` folder: ``data/`` and ``sasrec/``; ``cache/cache.h5``
            and ``heads/`` too for LLM-SRec.
        data: B's prepared dataset folder.
        out: output folder: ``sasrec/`` (A's teacher re-indexed to B), ``item_map.json``,
            ``transfer.json`` and ``transfer.md``; for LLM-SRec ``params.safetensors`` (A's
            f_I and out tokens) and ``cache/cache.h5`` (B's views); for the LLM4Rec
            baselines their runs on A, ``<name>-seed<seed>/``, unless ``llm4rec_runs``.
        match: ``title``, ``id`` or ``none`` (:func:`match_items`).
        models: any of :data:`TRANSFER_MODELS` (default SASRec and LLM-SRec).
        llm: the LLM4Rec baselines' LLM (a name, folder or ``LoadedLLM``, deep-copied per
            model); default: the one of A's cache, else ``llmsrec.defaults.LLM``.
        llm4rec_options: the baselines' budget and options, as ``compare``'s
            (:func:`llmsrec.experiments.compare.llm4rec_train_options`: ``max_steps``,
            ``eval_users``, ``epochs``, ...); the history window is A's cache's and
            ``batch_tokens``, ``device``, ``num_threads`` are inherited as in ``compare``.
        llm4rec_runs: the folder of the baselines' runs on A (``compare``'s layout; e.g. a
            ``llmsrec compare`` output on A's data, whose runs are reused when their
            request matches); default ``out``.
        seed: the baselines' training seed.
        batch_tokens, device, num_threads, trust_remote_code: the precompute's; the LLM, its
            dtype, history window, template and readout layers are those of A's cache.

    Returns:
        the ``transfer.json`` document: ``{"source", "target", "match": {...},
        "models": {"SASRec": {"valid", "test", "test-shuffled"}, ..., "LLM-SRec": {...}},
        "timings"}`` with NDCG@10/20 and HR@10/20, rows in Table 8 order; with baselines
        also ``"llm4rec"``: LLM, seed, options, teacher and each run's folder, steps and
        metrics on A (``valid`` on the selection sample when ``eval_users`` is set).

    Raises:
        InputError: an unknown model, a source run without a stage the models need, or a
            cache or heads that do not fit B (see :func:`llmsrec.heads.train.evaluate_heads`).
    """
    from llmsrec.cache import open_cache
    from llmsrec.cfsrec import evaluate_cfsrec, load_cfsrec, save_cfsrec
    from llmsrec.data import load_prepared
    from llmsrec.run_layout import STAGE_DIRS

    models = parse_transfer_models(",".join(models))
    src_dir, out = Path(source_run), Path(out)
    dirs = {k: src_dir / v for k, v in STAGE_DIRS.items()}
    dirs["data"], src_cache = dirs["prepare"], dirs["precompute"] / "cache.h5"
    needed = [dirs["data"], dirs["sasrec"]]
    if "llmsrec" in models:
        needed += [src_cache, dirs["train"] / "heads.safetensors"]
    for p in needed:
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

    prov, rows, cache = {}, {}, None
    if src_cache.is_file():
        with open_cache(src_cache) as c:
            prov = c.provenance
    if "llmsrec" in models:
        t = time.perf_counter()
        cache = _llmsrec_cache(src_cache, dst, out, prov, batch_tokens=batch_tokens, device=device,
                               num_threads=num_threads, progress=progress, trust_remote_code=trust_remote_code)
        timings["precompute"] = round(time.perf_counter() - t, 1)
    window = int(prov.get("history_window", HISTORY_WINDOW))

    t = time.perf_counter()
    if "sasrec" in models:
        from llmsrec.experiments.compare import cf_shuffled_metrics
        from llmsrec.pipeline import teacher_shuffled_metrics

        sas = evaluate_cfsrec(dst, out / "sasrec")
        sas["test-shuffled"] = (teacher_shuffled_metrics(dst, cache) if cache is not None
                                else cf_shuffled_metrics(dst, out / "sasrec", history_window=window))
        rows["sasrec"] = {k: _metrics(v) for k, v in sas.items()}
    if "llmsrec" in models:
        from llmsrec.heads.train import evaluate_heads

        heads = evaluate_heads(dst, cache, dirs["train"], views=TRANSFER_VIEWS)
        rows["llmsrec"] = {k: _metrics(v) for k, v in heads.items()}
    if "sasrec" in models or "llmsrec" in models:
        timings["evaluate"] = round(time.perf_counter() - t, 1)

    baselines = [m for m in models if m in BASELINES]
    llm4rec = None
    if baselines:
        llm4rec = _transfer_baselines(baselines, src, dst, mapping, dirs["sasrec"], rows, timings,
                                      runs_dir=Path(llm4rec_runs) if llm4rec_runs else out, seed=seed,
                                      llm=llm if llm is not None else prov.get("model", LLM["llm"]),
                                      options=llm4rec_options, window=window, batch_tokens=batch_tokens,
                                      device=device, num_threads=num_threads, progress=progress, log=log)
    timings["total"] = round(time.perf_counter() - t0, 1)
    doc = {"source": str(src_dir), "target": str(data), "match": match_doc,
           "models": {_display(m): rows[m] for m in models}, "timings": timings}
    if llm4rec is not None:
        doc["llm4rec"] = llm4rec
    write_json(out / "transfer.json", doc)
    with atomic_file(out / "transfer.md") as f:
        f.write(format_transfer_md(doc))
    return doc


def _display(name: str) -> str:
    if name in BASELINES:
        from llmsrec.baselines import get_spec

        return get_spec(name).display
    return {"sasrec": "SASRec", "llmsrec": "LLM-SRec"}[name]


def _llmsrec_cache(src_cache: Path, dst, out: Path, prov: dict, *, batch_tokens, device, num_threads, progress,
                   trust_remote_code) -> Path:
    """B's cache for A's heads: A's f_I and out tokens (``OUT/params.safetensors``), the LLM,
    dtype, history window, template and readout layers of A's cache (``OUT/cache/cache.h5``)."""
    from llmsrec.cache import open_cache
    from llmsrec.precompute import precompute
    from llmsrec.precompute.params import write_params

    with open_cache(src_cache) as c:
        params = c.params()
    write_params(out / "params.safetensors", params, extra={"source": str(src_cache)})
    return precompute(
        dst, out / "sasrec", out / "cache" / "cache.h5", llm=prov["model"], views=TRANSFER_VIEWS,
        history_window=int(prov["history_window"]), verb=prov.get("verb"), device=device,
        dtype=_DTYPES.get(prov.get("dtype"), None), params=out / "params.safetensors",
        readout_layers=tuple(prov.get("readout_layers", ())), template=prov["template_version"],
        num_threads=num_threads, progress=progress, trust_remote_code=trust_remote_code,
        **({} if batch_tokens is None else {"batch_tokens": batch_tokens}))


def _transfer_baselines(names, src, dst, mapping, teacher_dir: Path, rows: dict, timings: dict, *, runs_dir: Path,
                        seed: int, llm, options, window: int, batch_tokens, device, num_threads, progress,
                        log) -> dict:
    """Train (or reuse) each baseline on A (``compare``'s runs), score it on B into ``rows``;
    returns the ``"llm4rec"`` record of ``transfer.json``."""
    import torch

    from llmsrec.baselines import get_spec
    from llmsrec.experiments.compare import fresh_llm, llm4rec_train_options, run_baseline

    pre = {"history_window": window, "batch_tokens": batch_tokens, "device": device, "fi": LLM["fi"],
           "num_threads": num_threads}
    b_opts, b_lora, b_stage1 = llm4rec_train_options(options, pre)
    name_of = llm if isinstance(llm, (str, Path)) else getattr(llm, "name", type(llm).__name__)
    info = {"llm": str(name_of), "seed": int(seed), "teacher": str(teacher_dir), "options": jsonable(b_opts),
            "lora": jsonable(b_lora), "stage1": jsonable(b_stage1), "runs": {}}
    for name in names:
        spec = get_spec(name)
        t = time.perf_counter()
        entry = run_baseline(src, runs_dir, name, int(seed), teacher_dir=teacher_dir, llm=llm, options=b_opts,
                             lora=b_lora, stage1=b_stage1, force=False, progress=progress, log=log)
        t_train = time.perf_counter() - t
        log(f"[transfer] {spec.display} (trained on {src.root}) scoring {dst.root}")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        t = time.perf_counter()
        rows[name] = transfer_baseline(dst, entry["dir"], mapping, llm=None if isinstance(llm, (str, Path))
                                       else fresh_llm(llm), device=device,
                                       batch_tokens=int(b_opts.get("batch_tokens") or LLM["batch_tokens"]))
        timings[name] = {"train_or_reuse": round(t_train, 1), "score": round(time.perf_counter() - t, 1)}
        info["runs"][name] = {"dir": entry["dir"], "steps": entry.get("steps"), "valid_users": entry.get("valid_users"),
                              "source": {v: entry[v] for v in TRANSFER_VIEWS}}
    return info


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
    b = doc.get("llm4rec")
    if b:
        o = b.get("options", {})
        budget = [f"at most {o.get('epochs')} epochs"] + [f"{o[k]} {w}" for k, w in (
            ("max_steps", "steps at most"), ("eval_users", "validation users")) if o.get(k)]
        source = "; ".join(f"{_display(m)} {r['source']['test']['HR@10']:.4f} / {r['source']['test']['NDCG@10']:.4f}"
                           for m, r in b["runs"].items())
        lines += ["", f"LLM4Rec baselines trained on the source with L_Retrieval (LLM {b['llm']}, seed {b['seed']}, "
                      f"{', '.join(budget)}; teacher {b['teacher']}). Their test HR@10 / NDCG@10 on the source "
                      f"itself: {source}."]
    return "\n".join(lines) + "\n"
