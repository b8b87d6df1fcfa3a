"""``llmsrec compare``: the CF-SRec baselines, the LLM4Rec baselines and LLM-SRec on one dataset,
as in the paper's Table 6.

Every model is scored on the same stored candidates of the prepared dataset (target + the
stored negatives, leave-last-out), selected on validation NDCG@10, and tested once. For
each seed k the folder ``OUT`` gets::

    OUT/<model>-seed<k>/        a CF-SRec training run (llmsrec.cfsrec.train_cfsrec) + request.json;
                                CTRL (ctrl) is one of them
    OUT/recformer-seed<k>/      RECFORMER (llmsrec.baselines.recformer.train_recformer) + request.json
    OUT/<llm4rec>-seed<k>/      an LLM4Rec baseline (tallrec, llara, collm, allmrec:
                                llmsrec.baselines.train_baseline) + request.json
    OUT/cache-<teacher>-seed<k>/cache.h5 + request.json
                                LLM-SRec's frozen-LLM cache, only when no --cache is given
    OUT/llmsrec-seed<k>/        LLM-SRec heads (llmsrec.heads.train.train_heads) + request.json
    OUT/compare.json            every run's metrics, mean and sample std over seeds
    OUT/compare.md              Table 6-style markdown (models as columns, best in bold)

A run folder whose ``request.json`` equals the current request (model, seed, options,
dataset digest; for heads also the cache digest; for the LLM4Rec baselines also the LLM
name and the teacher's weights digest) is reused, not retrained. For LLM-SRec the teacher
and the cache are fixed (one teacher, the first seed's, or the given cache); only the
heads' seed varies across seeds. LLaRA, CoLLM and A-LLMRec use that same teacher (with
``--cache``: the checkpoint whose weights built the cache when it is found next to the
cache or in OUT, else the ``sasrec`` run of the first seed); TALLRec uses none.

Shuffled inference (Sec. 2.3.2): for every model with a ``test-shuffled`` score the table
adds the test metrics with the last W inputs of each test sequence permuted (the
``test-shuffled`` view, permutation seed 0, W = the history window) and their change
ratio against the original test sequences. The CF-SRec models are scored on the permuted
input directly (a forward pass, cheap); the LLM4Rec baselines score ``test-shuffled`` at the
end of training anyway; LLM-SRec has it when its cache holds the ``test-shuffled`` view
(``llmsrec run``'s default cache does; the cache compare builds holds train/valid/test only).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from dataclasses import asdict, fields

import numpy as np
import torch

from llmsrec.atomic import atomic_file, jsonable, read_json, sha256_file, write_json
from llmsrec.baselines import get_spec, train_baseline
from llmsrec.baselines.common import SHUFFLE_SEED
from llmsrec.cache import open_cache
from llmsrec.cfsrec import MODELS, evaluate_cfsrec, load_cfsrec, pad_left, train_cfsrec
from llmsrec.data import load_prepared
from llmsrec.defaults import BASELINES, HISTORY_WINDOW, LLM, LLM4REC_TRAINING
from llmsrec.e2e.loop import E2EOptions
from llmsrec.errors import InputError
from llmsrec.evaluate.analyses import change_ratio
from llmsrec.heads.train import TrainConfig, evaluate_heads, train_heads
from llmsrec.metrics import ranking_metrics
from llmsrec.precompute import precompute
from llmsrec.precompute.prompts import build_view
from llmsrec.seeds import parse_seeds

__all__ = ["compare", "format_compare_md", "parse_models", "parse_seeds", "CF_MODELS", "LM_MODELS", "LLM4REC_MODELS",
           "ALL_MODELS", "LLM4REC_DEFAULTS", "TEACHER_USERS"]

#: CF-SRec models in the column order of the paper's Table 6.
CF_MODELS = ("gru4rec", "bert4rec", "nextitnet", "sasrec")
#: the LM-based baselines (Table 6 order): CTRL trains as a CF-SRec (``llmsrec.cfsrec``, model
#: ``ctrl``), RECFORMER with its own trainer (``llmsrec.baselines.recformer``)
LM_MODELS = ("ctrl", "recformer")
#: the models trained by :func:`llmsrec.cfsrec.train_cfsrec` (CF-SRec options apply to them)
CF_TRAINED = CF_MODELS + ("ctrl",)
#: the LLM4Rec baselines, Table 6 order.
LLM4REC_MODELS = BASELINES
#: LLM-SRec and its w/o-L_Distill ablation (Table 7), both heads on the same cache
LLMSREC_MODELS = ("llmsrec", "llmsrec-nodistill")
ALL_MODELS = CF_MODELS + LM_MODELS + LLM4REC_MODELS + LLMSREC_MODELS
#: the models that read a CF-SRec teacher (``cache`` / ``teacher`` apply only to them)
TEACHER_USERS = ("llmsrec", *(m for m in LLM4REC_MODELS if get_spec(m).needs_sasrec), "llmsrec-nodistill")
DISPLAY = {"gru4rec": "GRU4Rec", "bert4rec": "BERT4Rec", "nextitnet": "NextItNet", "sasrec": "SASRec",
           "ctrl": "CTRL", "recformer": "RECFORMER",
           **{m: get_spec(m).display for m in LLM4REC_MODELS}, "llmsrec": "LLM-SRec",
           "llmsrec-nodistill": "LLM-SRec w/o L_Distill"}
METRIC_KEYS = ("NDCG@10", "NDCG@20", "HR@10", "HR@20")
#: LLM4Rec training defaults of compare (``llmsrec.defaults.LLM4REC_TRAINING``, Appendix E: at
#: most 10 epochs, early stopping with patience 10; the rest are ``llmsrec train --model NAME``'s:
#: batch 20, lr 1e-4, 3 sampled negatives, validation every tenth of an epoch on every user).
LLM4REC_DEFAULTS = LLM4REC_TRAINING
#: trainer options of :func:`llmsrec.cfsrec.train_cfsrec` that ``cf_options`` may set.
CF_TRAIN_OPTIONS = ("epochs", "patience", "eval_every", "batch_size", "lr", "loss", "device")
REQUEST = "request.json"


def parse_models(text: str, allowed: tuple[str, ...] = ALL_MODELS) -> list[str]:
    """``"sasrec,gru4rec"`` -> ``["gru4rec", "sasrec"]``: the names of ``allowed`` that the
    comma-separated ``text`` gives, in ``allowed``'s order (default Table 6's), duplicates
    dropped.

    Raises:
        InputError: an empty list or a name outside ``allowed``.
    """
    names = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    if not names:
        raise InputError("--models: give at least one model")
    for m in names:
        if m not in allowed:
            raise InputError(f"--models: unknown model {m!r} (expected any of {', '.join(allowed)})")
    return [m for m in allowed if m in names]


def _reusable(run_dir: Path, request: dict, required: Iterable[str]) -> bool:
    """True when ``run_dir`` holds every ``required`` file and its request.json equals ``request``."""
    return all((run_dir / f).is_file() for f in required) and read_json(run_dir / REQUEST) == request


def _summary(runs: dict[str, dict]) -> tuple[dict, dict]:
    """Mean and sample std (ddof=1; 0 for a single run) per split and metric over seeds
    (``test-shuffled`` too when every run has it)."""
    mean: dict = {}
    std: dict = {}
    splits = ["valid", "test"] + (["test-shuffled"] if all("test-shuffled" in r for r in runs.values()) else [])
    for split in splits:
        mean[split], std[split] = {}, {}
        for k in METRIC_KEYS:
            vals = np.asarray([r[split][k] for r in runs.values()], dtype=np.float64)
            mean[split][k] = float(vals.mean())
            std[split][k] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
    return mean, std


def _shuffle_change(runs: dict[str, dict]) -> dict | None:
    """Per metric, the change ratio (shuffled - original) / original of every seed's test
    metrics (Sec. 2.3.2) and their mean / sample std; None when a run lacks ``test-shuffled``.
    An undefined ratio (original 0) is None."""
    if not runs or not all("test-shuffled" in r for r in runs.values()):
        return None
    out = {}
    for k in METRIC_KEYS:
        rs = [change_ratio(r["test"][k], r["test-shuffled"][k]) for r in runs.values()]
        ok = all(math.isfinite(x) for x in rs)
        out[k] = {"mean": float(np.mean(rs)) if ok else None,
                  "std": (float(np.std(rs, ddof=1)) if len(rs) > 1 else 0.0) if ok else None,
                  "per_seed": [x if math.isfinite(x) else None for x in rs]}
    return out


def _entry(name: str, runs: dict[str, dict]) -> dict:
    mean, std = _summary(runs)
    entry = {"display": DISPLAY[name], "runs": runs, "mean": mean, "std": std}
    change = _shuffle_change(runs)
    if change is not None:
        entry["shuffle_change"] = change
    return entry


def _metrics(scores: np.ndarray) -> dict[str, float]:
    """``ranking_metrics`` as floats, keeping torch's thread count (numba may reset it)."""
    threads = torch.get_num_threads()
    try:
        return {k: float(v) for k, v in ranking_metrics(scores).items()}
    finally:
        torch.set_num_threads(threads)


def cf_shuffled_metrics(ds, run_dir, *, history_window: int = HISTORY_WINDOW, seed: int = SHUFFLE_SEED,
                        device: str = "cpu", batch_size: int = 512) -> dict[str, float]:
    """Test metrics of a saved CF-SRec on the ``test-shuffled`` view: each user's test input
    ``seq[:-1]`` with its last ``history_window`` items permuted exactly as in the LLM prompts
    of that view (:func:`llmsrec.precompute.prompts.build_view`, permutation ``seed``), scored
    on the stored test candidates (Sec. 2.3.2).

    Returns:
        ``{"NDCG@10", "NDCG@20", "HR@10", "HR@20"}`` floats.
    Raises:
        InputError: an unreadable checkpoint.
    """
    model = load_cfsrec(run_dir, device=device).eval()
    inputs = build_view(ds, "test-shuffled", history_window=history_window, seed=seed).cf_inputs[1:]
    cand = np.asarray(ds.candidates("test"), dtype=np.int64)
    dev = next(model.parameters()).device
    scores = np.empty(cand.shape, dtype=np.float32)
    with torch.no_grad():
        for s in range(0, len(inputs), batch_size):
            seqs = pad_left(inputs[s : s + batch_size], model.config.maxlen).to(dev)
            c = torch.from_numpy(np.ascontiguousarray(cand[s : s + batch_size])).to(dev)
            scores[s : s + batch_size] = model.score(seqs, c).float().cpu().numpy()
    return _metrics(scores)


def _llm_name(llm: Any) -> str:
    return llm if isinstance(llm, str) else str(getattr(llm, "name", type(llm).__name__))


def fresh_llm(llm: Any) -> Any:
    """What to hand a baseline trainer that injects LoRA **in place**: a name or folder is
    passed on (loaded fresh there); a ``LoadedLLM`` is deep-copied (its weights stay clean)."""
    if isinstance(llm, (str, Path)):
        return str(llm)
    return copy.deepcopy(llm)


def llm4rec_train_options(options: dict | None, precompute_options: dict | None = None) -> tuple[dict, dict, dict]:
    """Split ``llm4rec_options`` into (trainer keywords, LoRA dict, stage-1 dict).

    Trainer keywords are :class:`~llmsrec.heads.train.TrainConfig` and
    :class:`~llmsrec.e2e.loop.E2EOptions` fields over :data:`LLM4REC_DEFAULTS`; the LLM
    options LLM-SRec's precompute uses (``history_window``, ``batch_tokens``, ``device``,
    ``dtype``, ``num_threads`` -> ``threads``, ``fi``) are the defaults of the same-named
    fields. None values are dropped.

    Raises:
        InputError: an unknown field, or ``seed`` / ``llm`` (set by compare).
    """
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    lora, stage1 = dict(opts.pop("lora", None) or {}), dict(opts.pop("stage1", None) or {})
    known = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(E2EOptions)}
    bad = sorted(k for k in opts if k not in known or k in ("seed", "llm"))
    if bad:
        raise InputError(f"compare: unknown LLM4Rec option(s) {', '.join(bad)}")
    pre = {k: v for k, v in (precompute_options or {}).items() if v is not None}
    inherited = {k: pre[k] for k in ("history_window", "batch_tokens", "device", "dtype", "fi") if k in pre}
    if pre.get("num_threads") is not None:
        inherited["threads"] = pre["num_threads"]
    return {**LLM4REC_DEFAULTS, **inherited, **opts}, lora, stage1


def compare(
    ds,
    out: str | Path,
    *,
    models: Sequence[str] = ALL_MODELS,
    seeds: Sequence[int] = (0,),
    cf_options: dict | None = None,
    model_options: dict[str, dict] | None = None,
    cache: str | Path | None = None,
    teacher: str | None = None,
    llm: Any = LLM["llm"],
    precompute_options: dict | None = None,
    head_options: dict | None = None,
    llm4rec_options: dict | None = None,
    recformer_options: dict | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train (or reuse) every model for every seed, evaluate all on the same stored candidates,
    and write ``OUT/compare.json`` and ``OUT/compare.md``.

    Args:
        ds: ``PreparedDataset`` or its folder.
        out: output folder (created).
        models: any of :data:`ALL_MODELS` (``llmsrec`` = LLM-SRec; ``ctrl``, ``recformer`` = the
            LM-based baselines; ``tallrec``, ``llara``, ``collm``, ``allmrec`` = the LLM4Rec
            baselines of :mod:`llmsrec.baselines`).
        seeds: one run per model and seed; the table shows mean ± sample std.
        cf_options: :func:`llmsrec.cfsrec.train_cfsrec` trainer options for every CF-SRec
            (``epochs``, ``patience``, ``eval_every``, ``batch_size``, ``lr``, ``loss``,
            ``device``); None values are dropped, absent ones take the trainer defaults.
        model_options: per model name, config fields (e.g. ``{"sasrec": {"maxlen": 50}}``);
            the key ``"*"`` applies to every CF-SRec (only ``hidden`` and ``maxlen`` exist
            in all of them).
        cache: LLM-SRec: an existing HDF5 cache of this dataset (from ``llmsrec precompute``
            or ``llmsrec run``); its teacher is whatever built it, and LLaRA / CoLLM /
            A-LLMRec read that teacher too (when found next to the cache or in ``out``).
        teacher: LLM-SRec without ``cache``, and LLaRA / CoLLM / A-LLMRec: the CF-SRec whose
            first-seed checkpoint is the teacher (default ``sasrec``); for LLM-SRec the frozen
            LLM ``llm`` is then run over every prompt once (``llmsrec.precompute.precompute``,
            views train/valid/test).
        llm: the LLM of LLM-SRec's precompute and of the LLM4Rec baselines (a name, a local
            folder or a ``LoadedLLM``; the baselines get a deep copy, LoRA goes in place).
        precompute_options: further ``precompute`` keywords (``history_window``,
            ``batch_tokens``, ``device``, ``dtype``, ``fi``, ``num_threads``, ...); the
            same-named LLM options of the baselines default to them.
        head_options: :class:`llmsrec.heads.train.TrainConfig` fields for LLM-SRec (the
            seed is set per run).
        llm4rec_options: for every LLM4Rec baseline, :class:`~llmsrec.heads.train.TrainConfig`
            and :class:`~llmsrec.e2e.loop.E2EOptions` fields over :data:`LLM4REC_DEFAULTS`
            (budget: ``max_steps``, ``eval_users``, ``epochs``, ...), plus ``lora`` (dict of
            :class:`~llmsrec.baselines.LoraOptions` fields, TALLRec/LLaRA/CoLLM) and ``stage1``
            (A-LLMRec's :class:`~llmsrec.baselines.Stage1Options` fields).
        recformer_options: RECFORMER's :class:`~llmsrec.baselines.recformer.RecformerOptions`
            fields (``text_encoder``, ``max_steps``, ...; the seed is set per run). CTRL reads
            its text encoder from ``model_options["ctrl"]["text_encoder"]``.
        force: retrain everything.

    Returns:
        the ``compare.json`` dict: ``{"dataset", "data": {"root", "digest"}, "protocol",
        "columns": [display names], "models": {name: {"display", "runs": {seed: {"valid",
        "test", ["test-shuffled"], "dir", "seconds", ...}}, "mean": {"valid", "test",
        ["test-shuffled"]}, "std": {...}, ["shuffle_change": {metric: {"mean", "std",
        "per_seed"}}]}}, "llmsrec": {...} (when asked), "llm4rec": {...} (when asked)}``.

    Raises:
        InputError: unknown model/option, both ``cache`` and ``teacher``, either of them
            without a model of :data:`TEACHER_USERS`, a missing cache, a cache of another
            dataset, or any stage's bad input.
    """
    if not hasattr(ds, "digest"):
        ds = load_prepared(ds)
    out = Path(out)
    models = parse_models(",".join(models))
    seeds = parse_seeds(",".join(str(s) for s in seeds))
    cf_options = {k: v for k, v in (cf_options or {}).items() if v is not None}
    bad = sorted(set(cf_options) - set(CF_TRAIN_OPTIONS))
    if bad:
        raise InputError(f"compare: unknown CF-SRec trainer option(s) {', '.join(bad)}")
    model_options = {k: dict(v) for k, v in (model_options or {}).items()}
    for k in model_options:
        if k != "*" and k not in CF_TRAINED:
            raise InputError(f"compare: model options for unknown model {k!r}")
    baselines = [m for m in models if m in LLM4REC_MODELS]
    b_opts, b_lora, b_stage1 = llm4rec_train_options(llm4rec_options, precompute_options)
    users = [m for m in models if m in TEACHER_USERS]
    for flag, value in (("--cache", cache), ("--teacher", teacher)):
        if value is not None and not users:
            raise InputError(f"{flag} applies when --models includes {', '.join(TEACHER_USERS[:-1])} or "
                             f"{TEACHER_USERS[-1]}")
    if cache is not None and teacher is not None:
        raise InputError("compare: give --cache (an existing cache; LLM-SRec's heads train on it, the baselines "
                         "read its teacher) or --teacher (build one), not both")
    if cache is not None and not Path(cache).is_file():
        raise InputError(f"--cache {cache}: no such file")
    if teacher is not None and teacher not in CF_MODELS:
        raise InputError(f"--teacher: unknown CF-SRec {teacher!r} (expected one of {', '.join(CF_MODELS)})")
    if any(m in LLMSREC_MODELS for m in models) and cache is None:
        teacher = teacher or "sasrec"
    out.mkdir(parents=True, exist_ok=True)
    precompute_options = precompute_options or {}
    window = int(b_opts.get("history_window") or precompute_options.get("history_window") or HISTORY_WINDOW)

    def cf_request(name: str, seed: int) -> dict:
        opts = {**model_options.get("*", {}), **model_options.get(name, {})}
        opts = {k: v for k, v in opts.items() if k in MODELS[name].options()}
        return jsonable({"model": name, "seed": seed, "train": cf_options, "model_options": opts,
                          "data": ds.digest})

    def run_cf(name: str, seed: int) -> Path:
        run_dir = out / f"{name}-seed{seed}"
        req = cf_request(name, seed)
        if not force and _reusable(run_dir, req, ("model.safetensors", "config.json", "results.json")):
            log(f"[{name} seed {seed}] reused {run_dir}")
            return run_dir
        log(f"[{name} seed {seed}] training -> {run_dir}")
        try:
            train_cfsrec(ds, run_dir, model=name, seed=seed, force=True, progress=progress,
                         **cf_options, **req["model_options"])
        except ValueError as e:  # invalid config value or trainer option
            raise InputError(f"{name}: {e}") from None
        write_json(run_dir / REQUEST, req)
        return run_dir

    results: dict = {
        "dataset": ds.stats.get("dataset") or ds.root.name,
        "data": {"root": str(ds.root), "digest": ds.digest, "n_users": int(ds.n_users)},
        "protocol": {
            "split": "leave-last-out",
            "negatives": int(ds.test_negatives.shape[1]),
            "select_on": "valid NDCG@10 (test evaluated once, on the selected checkpoint)",
            "seeds": list(seeds),
            "std": "sample standard deviation over seeds (ddof=1)",
            "shuffled": {"view": "test-shuffled", "window": window, "seed": SHUFFLE_SEED,
                         "change_ratio": "(shuffled - original) / original, per seed, then mean ± std"},
        },
        "columns": [DISPLAY[m] for m in models],
        "models": {},
    }
    device = cf_options.get("device", "cpu")
    for name in models:
        if name not in CF_TRAINED:
            continue
        runs = {}
        for seed in seeds:
            run_dir = run_cf(name, seed)
            ev = evaluate_cfsrec(ds, run_dir, device=device, expect=name)
            trained = read_json(run_dir / "results.json") or {}
            runs[str(seed)] = {"valid": ev["valid"], "test": ev["test"],
                               "test-shuffled": cf_shuffled_metrics(ds, run_dir, history_window=window, device=device),
                               "dir": str(run_dir), "seconds": trained.get("seconds"),
                               "best_epoch": trained.get("best_epoch")}
        results["models"][name] = _entry(name, runs)
        if name == "ctrl":
            results["ctrl"] = jsonable({"text_encoder": cf_request(name, seeds[0])["model_options"].get(
                "text_encoder", MODELS["ctrl"].options()["text_encoder"]),
                "align_epochs": cf_request(name, seeds[0])["model_options"].get("align_epochs", 0)})

    if "recformer" in models:
        r_opts = {k: v for k, v in (recformer_options or {}).items() if v is not None}
        runs = {str(seed): _run_recformer(ds, out, seed, r_opts, force=force, progress=progress, log=log)
                for seed in seeds}
        results["models"]["recformer"] = _entry("recformer", runs)
        results["recformer"] = jsonable(next(iter(runs.values())).get("options", {}))

    teacher_dir = None
    ll_cache = cache
    for name in [m for m in LLMSREC_MODELS if m in models]:
        if teacher_dir is None and cache is None:
            teacher_dir = run_cf(teacher, seeds[0])
        h_opts = {**(head_options or {}), **({"distill": "none"} if name == "llmsrec-nodistill" else {})}
        info, runs = _run_llmsrec(
            ds, out, seeds=seeds, cache=ll_cache, teacher=teacher, teacher_dir=teacher_dir,
            llm=llm, precompute_options=precompute_options, head_options=h_opts,
            force=force, progress=progress, log=log, name=name)
        results.setdefault("llmsrec", info)
        ll_cache = ll_cache or info["cache"]  # the ablation trains on the cache LLM-SRec's run built
        results["models"][name] = _entry(name, runs)

    if baselines:
        info: dict = {"llm": _llm_name(llm), "options": jsonable(b_opts), "lora": jsonable(b_lora),
                      "stage1": jsonable(b_stage1)}
        b_teacher = None
        if any(get_spec(m).needs_sasrec for m in baselines):
            b_teacher, info["teacher"] = _baseline_teacher(cache, teacher, teacher_dir, seeds[0], out, run_cf)
        results["llm4rec"] = info
        for name in baselines:
            runs = {}
            for seed in seeds:
                runs[str(seed)] = run_baseline(ds, out, name, seed, teacher_dir=b_teacher, llm=llm, options=b_opts,
                                                lora=b_lora, stage1=b_stage1, force=force, progress=progress,
                                                log=log)
            results["models"][name] = _entry(name, runs)

    results["models"] = {m: results["models"][m] for m in models}
    write_json(out / "compare.json", results)
    with atomic_file(out / "compare.md") as f:
        f.write(format_compare_md(results) + "\n")
    return results


def _baseline_teacher(cache, teacher, teacher_dir, seed0, out: Path, run_cf) -> tuple[Path, str]:
    """The CF-SRec of LLaRA / CoLLM / A-LLMRec: LLM-SRec's teacher (its run, or the checkpoint
    that built the given cache when it can be found), else the ``teacher`` (default sasrec)
    run of the first seed. Returns (checkpoint folder, description)."""
    if teacher_dir is not None:
        return Path(teacher_dir), f"{DISPLAY[teacher]} seed {seed0} ({teacher_dir}), LLM-SRec's teacher"
    if cache is not None:
        with open_cache(cache) as reader:
            digest = reader.provenance.get("sasrec_sha256")
        found = find_teacher(digest, Path(cache), out)
        if found is not None:
            name = (read_json(found / "config.json") or {}).get("model", "sasrec")
            return found, f"{DISPLAY.get(name, name)} ({found}), the checkpoint that built LLM-SRec's cache"
    name = teacher or "sasrec"
    d = run_cf(name, seed0)
    note = " (the checkpoint that built --cache was not found)" if cache is not None else ""
    return d, f"{DISPLAY[name]} seed {seed0} ({d}){note}"


def _run_recformer(ds, out: Path, seed: int, options: dict, *, force: bool, progress: bool, log) -> dict:
    """Train (or reuse) one RECFORMER run (``OUT/recformer-seed<k>``) and return its compare entry."""
    from llmsrec.baselines.recformer import RecformerOptions, train_recformer

    run_dir = out / f"recformer-seed{seed}"
    try:
        opts = asdict(RecformerOptions(**{**options, "seed": seed}))
    except (TypeError, ValueError) as e:
        raise InputError(f"recformer: {e}") from None
    req = jsonable({"model": "recformer", "seed": seed, "options": opts, "data": ds.digest})
    if not force and _reusable(run_dir, req, ("model.safetensors", "config.json", "results.json")):
        log(f"[recformer seed {seed}] reused {run_dir}")
    else:
        log(f"[recformer seed {seed}] training -> {run_dir}")
        train_recformer(ds, run_dir, force=True, progress=progress, log=log, **opts)
        write_json(run_dir / REQUEST, req)
    res, entry = _three_view_results(run_dir)
    return {**entry, "dir": str(run_dir), "seconds": res.get("seconds"), "steps": res.get("steps"),
            "best_step": (res.get("best") or {}).get("step"), "options": opts}


def _three_view_results(run_dir: Path) -> tuple[dict, dict]:
    """A run folder's ``results.json`` and its valid/test/test-shuffled metrics (InputError if missing)."""
    res = read_json(run_dir / "results.json") or {}
    try:
        entry = {split: {k: float(res[split][k]) for k in METRIC_KEYS} for split in ("valid", "test", "test-shuffled")}
    except (KeyError, TypeError):
        raise InputError(f"{run_dir / 'results.json'}: missing valid/test/test-shuffled metrics") from None
    return res, entry


def run_baseline(ds, out: Path, name: str, seed: int, *, teacher_dir, llm, options: dict, lora: dict,
                 stage1: dict, force: bool, progress: bool, log) -> dict:
    """Train (or reuse) one LLM4Rec baseline run, ``OUT/<name>-seed<k>``, and return its compare entry.

    Args:
        ds: ``PreparedDataset``; name: one of :data:`LLM4REC_MODELS`; teacher_dir: the CF-SRec
            folder (ignored by TALLRec); llm: a name, folder or ``LoadedLLM`` (deep-copied);
            options, lora, stage1: :func:`llm4rec_train_options`'s three parts.
    Returns:
        ``{"valid", "test", "test-shuffled"}`` metrics on ``ds`` and ``"dir"``, ``"seconds"``,
        ``"steps"``, ``"epochs_run"``, ``"valid_users"``. A folder whose ``request.json``
        equals this request (model, seed, options, LLM name, teacher weights, dataset) is
        reused, not retrained.
    """
    spec = get_spec(name)
    run_dir = out / f"{name}-seed{seed}"
    sas = Path(teacher_dir) if spec.needs_sasrec else None
    req = jsonable({"model": name, "seed": seed, "options": options, "lora": lora if spec.lora else None,
                     "stage1": stage1 if spec.options_cls is not None else None, "llm": _llm_name(llm),
                     "teacher_sha256": sha256_file(sas / "model.safetensors") if sas is not None else None,
                     "data": ds.digest})
    needed = ("heads.safetensors", "heads_config.json", "inputs.safetensors", "results.json")
    if not force and _reusable(run_dir, req, needed):
        log(f"[{name} seed {seed}] reused {run_dir}")
    else:
        log(f"[{name} seed {seed}] training -> {run_dir}")
        train_baseline(name, ds, sas, run_dir, force=True, progress=progress, llm=fresh_llm(llm), log=log,
                       lora=lora if spec.lora else None,
                       stage1=stage1 if spec.options_cls is not None else None, seed=seed, **options)
        write_json(run_dir / REQUEST, req)
    res, entry = _three_view_results(run_dir)
    return {**entry, "dir": str(run_dir), "seconds": res.get("train_seconds"), "steps": res.get("steps"),
            "epochs_run": res.get("epochs_run"), "valid_users": res.get("valid_users")}


def _run_llmsrec(ds, out: Path, *, seeds, cache, teacher, teacher_dir, llm, precompute_options, head_options,
                 force, progress, log, name: str = "llmsrec") -> tuple[dict, dict]:
    """LLM-SRec heads (``name``: ``llmsrec`` or its ablation) for every seed on one fixed cache
    (given, or built from ``teacher_dir``), in ``OUT/<name>-seed<k>``."""
    info: dict = {}
    if cache is None:
        cache_dir = out / f"cache-{teacher}-seed{seeds[0]}"
        cache = cache_dir / "cache.h5"
        # what the heads read: the readout layers, the prefix samples, and test-shuffled for the
        # shuffled-inference row
        popts = {"views": ["train", "valid", "test", "test-shuffled"], "readout_layers": "auto",
                 "prefixes": TrainConfig.from_options(**head_options).prefixes, **precompute_options}
        req = jsonable({"teacher": teacher, "teacher_dir": str(teacher_dir),
                         "teacher_sha256": sha256_file(Path(teacher_dir) / "model.safetensors"),
                         "llm": _llm_name(llm), "precompute": popts, "data": ds.digest})
        # same request: resume an unfinished build or find it complete; else rebuild
        same = not force and read_json(cache_dir / REQUEST) == req
        log(f"[llmsrec] {'checking' if same else 'building'} cache {cache} (teacher {teacher} seed {seeds[0]})")
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json(cache_dir / REQUEST, req)
        precompute(ds, teacher_dir, cache, llm=llm, force=not same, progress=progress, log=log, **popts)
    cache = Path(cache)
    cache_digest = sha256_file(cache)
    with open_cache(cache) as reader:
        prov = reader.provenance
        views = ("valid", "test") + (("test-shuffled",) if "test-shuffled" in reader.views else ())
    if teacher_dir is not None:
        info["teacher"] = f"{DISPLAY[teacher]} seed {seeds[0]} ({teacher_dir})"
    else:
        info["teacher"] = _name_teacher(prov.get("sasrec_sha256"), cache, out)
    info.update({"cache": str(cache), "cache_sha256": cache_digest, "llm": prov.get("model"),
                 "teacher_sha256": prov.get("sasrec_sha256"),
                 "note": "the teacher and the frozen-LLM cache are fixed; seeds vary the heads only"})
    if "test-shuffled" in views:
        info["shuffled"] = {"window": prov.get("history_window"), "seed": prov.get("seed")}
    runs = {}
    for seed in seeds:
        cfg = TrainConfig.from_options(**{**head_options, "seed": seed})
        run_dir = out / f"{name}-seed{seed}"
        req = jsonable({"model": name, "seed": seed, "heads": asdict(cfg), "cache_sha256": cache_digest,
                         "data": ds.digest})
        if not force and _reusable(run_dir, req, ("heads.safetensors", "results.json")):
            log(f"[{name} seed {seed}] reused {run_dir}")
        else:
            log(f"[{name} seed {seed}] training heads -> {run_dir}")
            train_heads(ds, cache, run_dir, force=True, progress=progress, **asdict(cfg))
            write_json(run_dir / REQUEST, req)
        ev = evaluate_heads(ds, cache, run_dir, views=views)
        trained = read_json(run_dir / "results.json") or {}
        runs[str(seed)] = {**{v: {k: float(ev[v][k]) for k in METRIC_KEYS} for v in views},
                           "dir": str(run_dir), "seconds": trained.get("train_seconds")}
    return info, runs


def find_teacher(digest: str | None, cache: Path, out: Path) -> Path | None:
    """A CF-SRec checkpoint whose weights have ``digest``, looked for in ``llmsrec run``'s
    layout (``cache/../sasrec``) and in OUT's run folders."""
    candidates = [cache.resolve().parent.parent / "sasrec", *sorted(out.glob("*-seed*"))]
    for d in candidates:
        w = d / "model.safetensors"
        if digest and w.is_file() and sha256_file(w) == digest:
            return d
    return None


def _name_teacher(digest: str | None, cache: Path, out: Path) -> str:
    """Describe the teacher of a given cache (:func:`find_teacher`, else its digest)."""
    d = find_teacher(digest, cache, out)
    if d is not None:
        name = (read_json(d / "config.json") or {}).get("model", "sasrec")
        return f"{DISPLAY.get(name, name)} ({d})"
    return f"the CF-SRec that built the cache (weights sha256 {str(digest)[:12]}...)"


def _cell(mean: float, std: float, n: int, bold: bool, digits: int) -> str:
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    return f"**{text}**" if bold else text


def _change_cell(cell: dict | None, n: int) -> str:
    if cell is None or cell.get("mean") is None:
        return "n/a"
    text = f"{100 * cell['mean']:+.2f}%"
    return text + (f" ± {100 * cell['std']:.2f}" if n > 1 and cell.get("std") is not None else "")


def format_compare_md(results: dict, digits: int = 4) -> str:
    """Table 6-style markdown of a ``compare.json`` dict.

    One table per split (test first), one row per metric (NDCG@10, NDCG@20, HR@10, HR@20),
    one column per model in Table 6 order; a cell is ``mean ± std`` over the seeds (just
    the value for a single seed); the best mean of each row (at the printed precision,
    ties included) is bold. When a model has ``test-shuffled`` metrics, a third table gives
    NDCG@10 and HR@10 on the shuffled test sequences and their change ratio (Sec. 2.3.2;
    ``n/a`` for models without them).
    """
    names = list(results["models"])
    seeds = results["protocol"]["seeds"]
    n = len(seeds)
    p = results["protocol"]
    llm4rec = [m for m in names if m in LLM4REC_MODELS]
    what = "CF-SRec and LLM4Rec baselines and LLM-SRec" if llm4rec else "CF-SRec baselines and LLM-SRec"
    lines = [f"# {results['dataset']}: {what} (Table 6 protocol)", "",
             f"Leave-last-out; every model ranks each user's target against the same {p['negatives']} stored "
             f"negatives; checkpoint selected on validation NDCG@10, test evaluated once.",
             (f"Mean ± sample std over seeds {', '.join(map(str, seeds))}" if n > 1 else f"Seed {seeds[0]}")
             + "; best mean per row in bold.", ""]
    if "llmsrec" in results:
        ll = results["llmsrec"]
        lines += [f"LLM-SRec: frozen LLM {ll.get('llm')}, teacher {ll.get('teacher')}; the teacher and the "
                  f"LLM cache are fixed, the seeds vary the heads only.", ""]
    if "ctrl" in names or "recformer" in names:
        parts = []
        if "ctrl" in names:
            c = results.get("ctrl", {})
            align = (f"after {c['align_epochs']} epochs of contrastive text/ID alignment" if c.get("align_epochs")
                     else "no alignment stage")
            parts.append(f"CTRL: SASRec with its item table started from {c.get('text_encoder')} vectors of each "
                         f"item's text through a learned linear map ({align}), SASRec's training and early stopping")
        if "recformer" in names:
            r = results.get("recformer", {})
            parts.append(f"RECFORMER: one encoder started from {r.get('text_encoder')}, users as item sentences "
                         f"(most recent first, {r.get('max_tokens')} tokens), budget {r.get('max_steps')} steps of "
                         f"{r.get('batch_size')} users (stage 1: {r.get('stage1_epochs')} epoch), validation every "
                         f"{r.get('eval_every')} steps")
        lines += ["LM-based baselines. " + "; ".join(parts) + ".", ""]
    if llm4rec and "llm4rec" in results:
        b = results["llm4rec"]
        o = b.get("options", {})
        budget = [f"at most {o.get('epochs')} epochs", f"patience {o.get('patience')}"]
        if o.get("max_steps"):
            budget.append(f"at most {o['max_steps']} steps")
        teacher = f"; teacher {b['teacher']}" if b.get("teacher") else ""
        lines += [f"LLM4Rec baselines ({', '.join(DISPLAY[m] for m in llm4rec)}): LLM {b.get('llm')}, Next Item "
                  f"Retrieval with Eq. 1 only in the e2e loop (LoRA for TALLRec, LLaRA, CoLLM; A-LLMRec frozen)"
                  f"{teacher}; budget: {', '.join(budget)}.", ""]
        n_users = results.get("data", {}).get("n_users")
        vu = [r.get("valid_users") for m in llm4rec for r in results["models"][m]["runs"].values()]
        vu = [v for v in vu if isinstance(v, int)]
        if n_users and vu and min(vu) < n_users:
            lines += [f"LLM4Rec validation rows are on the seeded selection sample of {min(vu)} users "
                      f"(model selection, --llm4rec-eval-users); their test rows on every user.", ""]
    for split in ("test", "valid"):
        lines += [f"**{split}**", "",
                  "| Dataset | Metric | " + " | ".join(results["models"][m]["display"] for m in names) + " |",
                  "|---|---|" + "---:|" * len(names)]
        for k in METRIC_KEYS:
            means = [results["models"][m]["mean"][split][k] for m in names]
            best = max(round(v, digits) for v in means)
            cells = [_cell(results["models"][m]["mean"][split][k], results["models"][m]["std"][split][k], n,
                           math.isclose(round(results["models"][m]["mean"][split][k], digits), best), digits)
                     for m in names]
            lines.append(f"| {results['dataset']} | {k} | " + " | ".join(cells) + " |")
        lines.append("")
    if any("shuffle_change" in results["models"][m] for m in names):
        sh = p.get("shuffled", {})
        own = (results.get("llmsrec") or {}).get("shuffled")
        other = ""
        if own and (own.get("window"), own.get("seed")) != (sh.get("window"), sh.get("seed")):
            other = f" (LLM-SRec: its cache's view, last {own.get('window')} inputs, seed {own.get('seed')})"
        lines += [f"**test, shuffled inference** (Sec. 2.3.2): the last {sh.get('window', 'W')} inputs of each test "
                  f"sequence permuted (seed {sh.get('seed', 0)}){other}; change = (shuffled - original) / original", "",
                  "| Dataset | Metric | " + " | ".join(results["models"][m]["display"] for m in names) + " |",
                  "|---|---|" + "---:|" * len(names)]
        for k in ("NDCG@10", "HR@10"):
            cells = []
            for m in names:
                e = results["models"][m]
                cells.append(_cell(e["mean"]["test-shuffled"][k], e["std"]["test-shuffled"][k], n, False, digits)
                             if "test-shuffled" in e["mean"] else "n/a")
            lines.append(f"| {results['dataset']} | {k} shuffled | " + " | ".join(cells) + " |")
            cells = [_change_cell(results["models"][m].get("shuffle_change", {}).get(k), n) for m in names]
            lines.append(f"| {results['dataset']} | {k} change | " + " | ".join(cells) + " |")
        lines.append("")
    secs = []
    for m in names:
        vals = [r.get("seconds") for r in results["models"][m]["runs"].values()]
        vals = [v for v in vals if isinstance(v, (int, float))]
        if vals:
            secs.append(f"{results['models'][m]['display']} {np.mean(vals):.1f}")
    if secs:
        what = "LLM-SRec: heads only" + ("; LLM4Rec: e2e training incl. validations" if llm4rec else "")
        lines += [f"Training wall time per run (s, mean over seeds; {what}): " + ", ".join(secs), ""]
    return "\n".join(lines).rstrip("\n")
