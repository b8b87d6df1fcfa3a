"""``llmsrec compare``: the CF-SRec baselines and LLM-SRec on one dataset, as in the paper's Table 6.

Every model is scored on the same stored candidates of the prepared dataset (target + the
stored negatives, leave-last-out), selected on validation NDCG@10, and tested once. For
each seed k the folder ``OUT`` gets::

    OUT/<model>-seed<k>/        a CF-SRec training run (llmsrec.cfsrec.train_cfsrec) + request.json
    OUT/cache-<teacher>-seed<k>/cache.h5 + request.json
                                LLM-SRec's frozen-LLM cache, only when no --cache is given
    OUT/llmsrec-seed<k>/        LLM-SRec heads (llmsrec.heads.train.train_heads) + request.json
    OUT/compare.json            every run's metrics, mean and sample std over seeds
    OUT/compare.md              Table 6-style markdown (models as columns, best in bold)

A run folder whose ``request.json`` equals the current request (model, seed, options,
dataset digest; for heads also the cache digest) is reused, not retrained. For LLM-SRec the
teacher and the cache are fixed (one teacher, the first seed's, or the given cache); only
the heads' seed varies across seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from llmsrec.atomic import atomic_file, write_json
from llmsrec.errors import InputError

__all__ = ["compare", "format_compare_md", "parse_models", "parse_seeds", "CF_MODELS", "ALL_MODELS"]

#: CF-SRec models in the column order of the paper's Table 6.
CF_MODELS = ("gru4rec", "bert4rec", "nextitnet", "sasrec")
ALL_MODELS = CF_MODELS + ("llmsrec",)
DISPLAY = {"gru4rec": "GRU4Rec", "bert4rec": "BERT4Rec", "nextitnet": "NextItNet", "sasrec": "SASRec",
           "llmsrec": "LLM-SRec"}
METRIC_KEYS = ("NDCG@10", "NDCG@20", "HR@10", "HR@20")
#: trainer options of :func:`llmsrec.cfsrec.train_cfsrec` that ``cf_options`` may set.
CF_TRAIN_OPTIONS = ("epochs", "patience", "eval_every", "batch_size", "lr", "loss", "device")
REQUEST = "request.json"


def parse_models(text: str) -> list[str]:
    """``"sasrec,gru4rec"`` -> ``["gru4rec", "sasrec"]`` (Table 6 order, duplicates dropped).

    Raises:
        InputError: an empty list or an unknown name.
    """
    names = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    if not names:
        raise InputError("--models: give at least one model")
    for m in names:
        if m not in ALL_MODELS:
            raise InputError(f"--models: unknown model {m!r} (expected any of {', '.join(ALL_MODELS)})")
    return [m for m in ALL_MODELS if m in names]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (order kept, duplicates dropped).

    Raises:
        InputError: empty, not integers, or negative.
    """
    out: list[int] = []
    for part in str(text).split(","):
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


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _reusable(run_dir: Path, request: dict, required: Iterable[str]) -> bool:
    """True when ``run_dir`` holds every ``required`` file and its request.json equals ``request``."""
    return all((run_dir / f).is_file() for f in required) and _read_json(run_dir / REQUEST) == request


def _summary(runs: dict[str, dict]) -> tuple[dict, dict]:
    """Mean and sample std (ddof=1; 0 for a single run) per split and metric over seeds."""
    mean: dict = {}
    std: dict = {}
    for split in ("valid", "test"):
        mean[split], std[split] = {}, {}
        for k in METRIC_KEYS:
            vals = np.asarray([r[split][k] for r in runs.values()], dtype=np.float64)
            mean[split][k] = float(vals.mean())
            std[split][k] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
    return mean, std


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
    llm: Any = "smollm2-135m",
    precompute_options: dict | None = None,
    head_options: dict | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train (or reuse) every model for every seed, evaluate all on the same stored candidates,
    and write ``OUT/compare.json`` and ``OUT/compare.md``.

    Args:
        ds: ``PreparedDataset`` or its folder.
        out: output folder (created).
        models: any of :data:`ALL_MODELS` (``llmsrec`` = LLM-SRec).
        seeds: one run per model and seed; the table shows mean ± sample std.
        cf_options: :func:`llmsrec.cfsrec.train_cfsrec` trainer options for every CF-SRec
            (``epochs``, ``patience``, ``eval_every``, ``batch_size``, ``lr``, ``loss``,
            ``device``); None values are dropped, absent ones take the trainer defaults.
        model_options: per model name, config fields (e.g. ``{"sasrec": {"maxlen": 50}}``);
            the key ``"*"`` applies to every CF-SRec (only ``hidden`` and ``maxlen`` exist
            in all of them).
        cache: LLM-SRec: an existing HDF5 cache of this dataset (from ``llmsrec precompute``
            or ``llmsrec run``); its teacher is whatever built it.
        teacher: LLM-SRec without ``cache``: the CF-SRec whose first-seed checkpoint is the
            teacher (default ``sasrec``); the frozen LLM ``llm`` is then run over every
            prompt once (``llmsrec.precompute.precompute``, views train/valid/test).
        llm: the frozen LLM for that precompute (a name, a local folder or a ``LoadedLLM``).
        precompute_options: further ``precompute`` keywords (``history_window``,
            ``batch_tokens``, ``device``, ``dtype``, ``fi``, ``num_threads``, ...).
        head_options: :class:`llmsrec.heads.train.TrainConfig` fields for LLM-SRec (the
            seed is set per run).
        force: retrain everything.

    Returns:
        the ``compare.json`` dict: ``{"dataset", "data": {"root", "digest"}, "protocol",
        "columns": [display names], "models": {name: {"display", "runs": {seed: {"valid",
        "test", "dir", "seconds"}}, "mean": {"valid", "test"}, "std": {"valid", "test"}}},
        "llmsrec": {...} (when asked)}``.

    Raises:
        InputError: unknown model/option, ``llmsrec`` with both ``cache`` and ``teacher``,
            a cache of another dataset, or any stage's bad input.
    """
    from llmsrec.cfsrec import MODELS, evaluate_cfsrec, train_cfsrec
    from llmsrec.data import load_prepared

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
        if k != "*" and k not in CF_MODELS:
            raise InputError(f"compare: model options for unknown model {k!r}")
    if "llmsrec" in models:
        if cache is not None and teacher is not None:
            raise InputError("compare: give --cache (an existing cache) or --teacher (build one), not both")
        if cache is None:
            teacher = teacher or "sasrec"
            if teacher not in CF_MODELS:
                raise InputError(f"--teacher: unknown CF-SRec {teacher!r} (expected one of {', '.join(CF_MODELS)})")
        elif not Path(cache).is_file():
            raise InputError(f"--cache {cache}: no such file")
    out.mkdir(parents=True, exist_ok=True)

    def cf_request(name: str, seed: int) -> dict:
        opts = {**model_options.get("*", {}), **model_options.get(name, {})}
        opts = {k: v for k, v in opts.items() if k in MODELS[name].options()}
        return _jsonable({"model": name, "seed": seed, "train": cf_options, "model_options": opts,
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
        "data": {"root": str(ds.root), "digest": ds.digest},
        "protocol": {
            "split": "leave-last-out",
            "negatives": int(ds.test_negatives.shape[1]),
            "select_on": "valid NDCG@10 (test evaluated once, on the selected checkpoint)",
            "seeds": list(seeds),
            "std": "sample standard deviation over seeds (ddof=1)",
        },
        "columns": [DISPLAY[m] for m in models],
        "models": {},
    }
    device = cf_options.get("device", "cpu")
    for name in models:
        if name == "llmsrec":
            continue
        runs = {}
        for seed in seeds:
            run_dir = run_cf(name, seed)
            ev = evaluate_cfsrec(ds, run_dir, device=device, expect=name)
            trained = _read_json(run_dir / "results.json") or {}
            runs[str(seed)] = {"valid": ev["valid"], "test": ev["test"], "dir": str(run_dir),
                               "seconds": trained.get("seconds"), "best_epoch": trained.get("best_epoch")}
        mean, std = _summary(runs)
        results["models"][name] = {"display": DISPLAY[name], "runs": runs, "mean": mean, "std": std}

    if "llmsrec" in models:
        results["llmsrec"], runs = _run_llmsrec(
            ds, out, seeds=seeds, cache=cache, teacher=teacher, teacher_dir=None if cache else run_cf(teacher, seeds[0]),
            llm=llm, precompute_options=precompute_options or {}, head_options=head_options or {},
            force=force, progress=progress, log=log)
        mean, std = _summary(runs)
        results["models"]["llmsrec"] = {"display": DISPLAY["llmsrec"], "runs": runs, "mean": mean, "std": std}

    results["models"] = {m: results["models"][m] for m in models}
    write_json(out / "compare.json", results)
    with atomic_file(out / "compare.md") as f:
        f.write(format_compare_md(results) + "\n")
    return results


def _run_llmsrec(ds, out: Path, *, seeds, cache, teacher, teacher_dir, llm, precompute_options, head_options,
                 force, progress, log) -> tuple[dict, dict]:
    """LLM-SRec heads for every seed on one fixed cache (given, or built from ``teacher_dir``)."""
    from dataclasses import asdict

    from llmsrec.cache import open_cache
    from llmsrec.heads.train import TrainConfig, evaluate_heads, train_heads
    from llmsrec.precompute.llm import sha256_file

    info: dict = {}
    if cache is None:
        from llmsrec.precompute import precompute

        cache_dir = out / f"cache-{teacher}-seed{seeds[0]}"
        cache = cache_dir / "cache.h5"
        popts = {"views": ["train", "valid", "test"], **precompute_options}
        llm_name = llm if isinstance(llm, str) else getattr(llm, "name", type(llm).__name__)
        req = _jsonable({"teacher": teacher, "teacher_dir": str(teacher_dir),
                         "teacher_sha256": sha256_file(Path(teacher_dir) / "model.safetensors"),
                         "llm": llm_name, "precompute": popts, "data": ds.digest})
        # same request: resume an unfinished build or find it complete; else rebuild
        same = not force and _read_json(cache_dir / REQUEST) == req
        log(f"[llmsrec] {'checking' if same else 'building'} cache {cache} (teacher {teacher} seed {seeds[0]})")
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json(cache_dir / REQUEST, req)
        precompute(ds, teacher_dir, cache, llm=llm, force=not same, progress=progress, log=log, **popts)
    cache = Path(cache)
    cache_digest = sha256_file(cache)
    with open_cache(cache) as reader:
        prov = reader.provenance
    if teacher_dir is not None:
        info["teacher"] = f"{DISPLAY[teacher]} seed {seeds[0]} ({teacher_dir})"
    else:
        info["teacher"] = _name_teacher(prov.get("sasrec_sha256"), cache, out)
    info.update({"cache": str(cache), "cache_sha256": cache_digest, "llm": prov.get("model"),
                 "teacher_sha256": prov.get("sasrec_sha256"),
                 "note": "the teacher and the frozen-LLM cache are fixed; seeds vary the heads only"})
    runs = {}
    for seed in seeds:
        cfg = TrainConfig.from_options(**{**head_options, "seed": seed})
        run_dir = out / f"llmsrec-seed{seed}"
        req = _jsonable({"model": "llmsrec", "seed": seed, "heads": asdict(cfg), "cache_sha256": cache_digest,
                         "data": ds.digest})
        if not force and _reusable(run_dir, req, ("heads.safetensors", "results.json")):
            log(f"[llmsrec seed {seed}] reused {run_dir}")
        else:
            log(f"[llmsrec seed {seed}] training heads -> {run_dir}")
            train_heads(ds, cache, run_dir, force=True, progress=progress, **asdict(cfg))
            write_json(run_dir / REQUEST, req)
        ev = evaluate_heads(ds, cache, run_dir)
        trained = _read_json(run_dir / "results.json") or {}
        runs[str(seed)] = {"valid": {k: float(ev["valid"][k]) for k in METRIC_KEYS},
                           "test": {k: float(ev["test"][k]) for k in METRIC_KEYS},
                           "dir": str(run_dir), "seconds": trained.get("train_seconds")}
    return info, runs


def _name_teacher(digest: str | None, cache: Path, out: Path) -> str:
    """Describe the teacher of a given cache: a checkpoint whose weights have its digest, looked
    for in ``llmsrec run``'s layout (``cache/../sasrec``) and in OUT's run folders."""
    from llmsrec.precompute.llm import sha256_file

    candidates = [cache.resolve().parent.parent / "sasrec", *sorted(out.glob("*-seed*"))]
    for d in candidates:
        w = d / "model.safetensors"
        if digest and w.is_file() and sha256_file(w) == digest:
            name = (_read_json(d / "config.json") or {}).get("model", "sasrec")
            return f"{DISPLAY.get(name, name)} ({d})"
    return f"the CF-SRec that built the cache (weights sha256 {str(digest)[:12]}...)"


def _cell(mean: float, std: float, n: int, bold: bool, digits: int) -> str:
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    return f"**{text}**" if bold else text


def format_compare_md(results: dict, digits: int = 4) -> str:
    """Table 6-style markdown of a ``compare.json`` dict.

    One table per split (test first), one row per metric (NDCG@10, NDCG@20, HR@10, HR@20),
    one column per model in Table 6 order; a cell is ``mean ± std`` over the seeds (just
    the value for a single seed); the best mean of each row (at the printed precision,
    ties included) is bold.
    """
    names = list(results["models"])
    seeds = results["protocol"]["seeds"]
    n = len(seeds)
    p = results["protocol"]
    lines = [f"# {results['dataset']}: CF-SRec baselines and LLM-SRec (Table 6 protocol)", "",
             f"Leave-last-out; every model ranks each user's target against the same {p['negatives']} stored "
             f"negatives; checkpoint selected on validation NDCG@10, test evaluated once.",
             (f"Mean ± sample std over seeds {', '.join(map(str, seeds))}" if n > 1 else f"Seed {seeds[0]}")
             + "; best mean per row in bold.", ""]
    if "llmsrec" in results:
        ll = results["llmsrec"]
        lines += [f"LLM-SRec: frozen LLM {ll.get('llm')}, teacher {ll.get('teacher')}; the teacher and the "
                  f"LLM cache are fixed, the seeds vary the heads only.", ""]
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
    secs = []
    for m in names:
        vals = [r.get("seconds") for r in results["models"][m]["runs"].values()]
        vals = [v for v in vals if isinstance(v, (int, float))]
        if vals:
            secs.append(f"{results['models'][m]['display']} {np.mean(vals):.1f}")
    if secs:
        lines += ["Training wall time per run (s, mean over seeds; LLM-SRec: heads only): " + ", ".join(secs), ""]
    return "\n".join(lines).rstrip("\n")
