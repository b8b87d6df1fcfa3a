"""``llmsrec sweep``: train many head variants on one cache, pick the best on validation.

The LLM never runs: every variant is a :func:`~llmsrec.heads.train.fit_heads` call on the
same in-memory cached tensors. A grid is a TOML file::

    # sweep.toml
    [grid]                    # every combination of these values is one variant
    lr = [1e-4, 3e-4]
    distill = ["mse", "contrastive"]
    uniform = [true, false]
    seed = [0, 1, 2]

    [fixed]                   # applied to every variant
    train_negatives = 3
    epochs = 10

Keys are :class:`~llmsrec.heads.train.TrainConfig` fields (``-`` or ``_``). Options not in
the file keep the run's own head options (``--run``) or the trainer defaults.

Outputs in ``OUT``: ``sweep.jsonl`` (one line per variant, appended as each finishes, so a
rerun skips variants already there), ``sweep.md`` (variants sorted by the validation
metric), ``sweep.png`` (validation NDCG@10 against the most influential option) and
``best/`` (the best variant saved like ``llmsrec train``'s output with its one test
evaluation: its heads as this process trained them alone, or retrained when they were trained
stacked, in a worker or by an earlier run; training is deterministic, so both give the same heads).

``stream`` (``--stream``; automatic by default, as ``llmsrec train``) reads the user views from
the cache file as training needs them (:func:`~llmsrec.heads.train.load_cached_tensors`), for a
cache larger than memory; streamed variants train one at a time.

``stack`` (``--stack N``) trains up to N variants that differ only in how they are optimised
together in one process (:mod:`llmsrec.heads.stacked`), sharing one read of the cache.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from llmsrec.atomic import atomic_file, write_json
from llmsrec.data import load_prepared
from llmsrec.errors import InputError
from llmsrec.heads.stacked import fit_stacked, stack_groups
from llmsrec.heads.train import TrainConfig, check_step_dtype, fit_heads, load_cached_tensors, train_on_tensors

__all__ = ["load_grid", "expand_grid", "sweep"]

_FIELDS = {f.name for f in fields(TrainConfig)}


def load_grid(path) -> tuple[dict, dict]:
    """Read a sweep TOML file.

    Returns:
        (grid, fixed): ``grid`` maps option -> non-empty list of values (file order),
        ``fixed`` option -> value.
    Raises:
        InputError: unreadable TOML, an unknown section or option (named with the file),
            an empty or non-list grid entry, or no ``[grid]``.
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"{path}: not a readable TOML file ({e})") from None
    extra = set(doc) - {"grid", "fixed"}
    if extra:
        raise InputError(f"{path}: unknown section [{sorted(extra)[0]}] (expected [grid] and [fixed])")
    if not isinstance(doc.get("grid"), dict) or not doc["grid"]:
        raise InputError(f"{path}: a non-empty [grid] section is required")
    out = []
    for section in ("grid", "fixed"):
        d = {}
        for k, v in doc.get(section, {}).items():
            name = k.replace("-", "_")
            if name not in _FIELDS:
                raise InputError(f"{path}: [{section}] {k}: unknown head option "
                                 f"(expected one of {', '.join(sorted(_FIELDS))})")
            if section == "grid" and (not isinstance(v, list) or not v):
                raise InputError(f"{path}: [grid] {k}: expected a non-empty list of values")
            d[name] = v
        out.append(d)
    both = set(out[0]) & set(out[1])
    if both:
        raise InputError(f"{path}: option {sorted(both)[0]} is in both [grid] and [fixed]")
    return out[0], out[1]


def expand_grid(grid: dict, fixed: dict, base: dict | None = None) -> list[tuple[dict, TrainConfig]]:
    """Every combination of ``grid`` values, in file order (the last key varies fastest).

    Returns:
        list of (varied options, full :class:`TrainConfig`); ``base`` < ``fixed`` < grid.
    Raises:
        InputError: a combination that is not a valid configuration (names the options).
    """
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        varied = dict(zip(keys, values))
        try:
            cfg = TrainConfig.from_options(**{**(base or {}), **fixed, **varied})
        except InputError as e:
            raise InputError(f"sweep variant {varied}: {e}") from None
        out.append((varied, cfg))
    return out


def _key(cfg: TrainConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


# worker state (one process, or each of a --jobs pool): where the cache is, how its views are
# read (load_cached_tensors' stream and shuffle_buffer), and its tensors, loaded once per
# (readouts, prefix samples) a variant asks for
_SOURCE: tuple | None = None
_READ: dict = {}
_DATA: dict = {}


def _init_worker(ds_root, cache: str, threads: int, eval_views=("valid",), read: dict | None = None) -> None:
    global _SOURCE, _DATA, _READ

    torch.set_num_threads(threads)
    _SOURCE, _DATA, _READ = (ds_root, cache, tuple(eval_views)), {}, dict(read or {})


def _data_for(cfg: TrainConfig):
    """The cached tensors ``cfg`` trains on (its readouts and prefix samples), loaded once."""
    key = (cfg.user_readout, cfg.item_readout, cfg.prefixes)
    if key not in _DATA:
        ds, cache, views = _SOURCE
        _DATA[key] = load_cached_tensors(ds, cache, eval_views=views, user_readout=cfg.user_readout,
                                         item_readout=cfg.item_readout, prefixes=cfg.prefixes, **_READ)
    return _DATA[key]


def _fit_record(fit, seconds: float) -> dict:
    return {"best_validation": fit.best["validation"], "best_step": fit.best["step"],
            "best_epoch": fit.best["epoch"], "steps": fit.steps, "epochs_run": fit.epochs_run,
            "stopped_early": fit.stopped_early, "valid": fit.best["metrics"],
            "seconds": round(seconds, 3)}


def _fit_group(cfg_dicts: list[dict], keep: bool = False, step_dtype: str = "fp32"):
    """Variants of one stack (:func:`llmsrec.heads.stacked.stack_groups`) trained together, or
    alone in a group of one, with training steps in ``step_dtype``. Each record's ``seconds``
    is its share of the group's.

    Returns:
        the records; with ``keep``, (records, the FitResults) (in process only: the heads
        do not cross a process boundary).
    """
    cfgs = [TrainConfig(**d) for d in cfg_dicts]
    data = _data_for(cfgs[0])
    if len(cfgs) == 1 or data.streamed:  # the stacked trainer holds the views in memory
        fits = [fit_heads(data, cfg, progress=False, step_dtype=step_dtype) for cfg in cfgs]
        recs = [_fit_record(f, f.seconds) for f in fits]
    else:
        fits = fit_stacked(data, cfgs, step_dtype=step_dtype)
        recs = [_fit_record(f, f.seconds / len(fits)) for f in fits]
    return (recs, fits) if keep else recs


def sweep(ds, cache, grid_path, out, *, base: dict | None = None, jobs: int = 1, stack: int = 1,
          stream: bool | None = False, shuffle_buffer: int | None = None, step_dtype: str = "fp32",
          progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train every variant of a grid on the cache; write the sweep files; test the best once.

    Args:
        ds: ``PreparedDataset`` or its folder; cache: HDF5 cache of the same dataset.
        grid_path: TOML grid (see the module docstring).
        out: output folder (created; ``sweep.jsonl`` in it is resumed).
        base: head options the grid starts from (``llmsrec sweep --run`` passes the run's).
        jobs: worker processes (each with ``cpus // jobs`` torch threads); 1 = in process.
        stack: up to this many variants that differ only in how they are optimised
            (:data:`llmsrec.heads.stacked.PER_VARIANT`: seed, lr, loss switches and weights, ...)
            train together in one process (:func:`llmsrec.heads.stacked.fit_stacked`); their
            records equal those of training each alone up to float rounding. 1 (default) =
            one variant at a time.
        stream, shuffle_buffer: how the user views are read, as
            :func:`~llmsrec.heads.train.load_cached_tensors`'s (``False``, the default, loads
            them; ``None`` streams when they do not fit; ``shuffle_buffer`` None = its
            default). Streamed variants train one at a time, whatever ``stack``.
        step_dtype: the training steps' dtype, as :func:`~llmsrec.heads.train.fit_heads`'s
            (``bf16``: faster steps, results within about the seed spread, not identical);
            recorded in every line and in ``sweep.json`` when not ``fp32``.
    Returns:
        ``{"variants": n, "trained": n trained now, "best": the best line + "test",
        "seconds": wall s, "variants_per_minute": of the variants trained now}``, and
        ``"stack"`` when ``stack`` > 1, ``"streamed": True`` when views were streamed.
    Raises:
        InputError: bad grid, options or cache; ``out`` holds records of another
            ``step_dtype``.
    """
    check_step_dtype(step_dtype)
    ds = load_prepared(ds) if isinstance(ds, (str, os.PathLike)) else ds
    grid, fixed = load_grid(grid_path)
    variants = expand_grid(grid, fixed, base)
    if jobs < 1:
        raise InputError("--jobs must be >= 1")
    stack_groups([], stack)  # InputError for a stack < 1, before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines_path = out / "sweep.jsonl"
    done: dict[str, dict] = {}
    if lines_path.is_file():
        for n, line in enumerate(lines_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                done[json.dumps(rec["config"], sort_keys=True)] = rec
            except (ValueError, KeyError):
                raise InputError(f"{lines_path} line {n}: not a sweep record (delete the line or the file)") from None
            if rec.get("step_dtype", "fp32") != step_dtype:
                raise InputError(f"{lines_path} line {n}: trained with --step-dtype {rec.get('step_dtype', 'fp32')}, "
                                 f"not {step_dtype} (use another --out)")
    todo = [(v, c) for v, c in variants if _key(c) not in done]
    select = variants[0][1].select_metric
    groups = [[todo[i] for i in g] for g in stack_groups([c for _, c in todo], stack)]
    log(f"sweep: {len(variants)} variants, {len(variants) - len(todo)} already in {lines_path.name}, "
        f"{len(todo)} to train ({jobs} process{'es' if jobs > 1 else ''}"
        + (f", {len(groups)} stack{'s' if len(groups) > 1 else ''} of up to {stack}" if stack > 1 else "") + ")")
    global _SOURCE, _DATA, _READ
    _READ = {"stream": stream, **({} if shuffle_buffer is None else {"shuffle_buffer": int(shuffle_buffer)})}
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="sweep", unit="variant", disable=not progress)

    low = {"step_dtype": step_dtype} if step_dtype != "fp32" else {}  # recorded when not the exact default

    def record(varied, cfg, res):
        rec = {"options": varied, **res, **low, "config": asdict(cfg)}
        with open(lines_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        done[_key(cfg)] = rec
        bar.update(1)
        bar.set_postfix({select: f"{res['valid'][select]:.4f}"})

    _SOURCE, _DATA = (ds, cache, ("valid", "test")), {}
    kept = None  # (config key, FitResult) of the best variant trained in this process so far
    if todo and jobs == 1:
        for group in groups:
            recs, fits = _fit_group([asdict(c) for _, c in group], keep=True, step_dtype=step_dtype)
            for (varied, cfg), res, fit in zip(group, recs, fits):
                record(varied, cfg, res)
                if kept is None or res["valid"][select] > kept[1].best["metrics"][select]:
                    kept = (_key(cfg), fit)
    elif todo:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(str(ds.root), str(cache), threads, ("valid",), _READ)) as pool:
            futs = {pool.submit(_fit_group, [asdict(c) for _, c in g], False, step_dtype): g for g in groups}
            for f in as_completed(futs):
                for (v, c), res in zip(futs[f], f.result()):
                    record(v, c, res)
    bar.close()
    train_seconds = time.perf_counter() - t0

    recs = [done[_key(c)] for _, c in variants]
    best = max(recs, key=lambda r: r["valid"][select])
    best_cfg = TrainConfig(**best["config"])
    best_dir = out / "best"
    try:
        prev = json.loads((best_dir / "results.json").read_text())
        test = prev["test"] if prev.get("config") == asdict(best_cfg) else None
    except (OSError, ValueError, KeyError):
        test = None
    if test is None:
        # the best variant's heads when this process trained it alone (fit_heads is
        # deterministic: training it again gives the same heads), else trained again
        reuse = kept is not None and kept[0] == _key(best_cfg) and stack == 1
        log(f"sweep: {'writing' if reuse else 'retraining'} the best variant {best['options']} and testing it once")
        _SOURCE = (ds, cache, ("valid", "test"))  # the best is tested once: load test too
        _DATA = {k: v for k, v in _DATA.items() if "test" in v.eval_hidden}
        res = train_on_tensors(_data_for(best_cfg), best_dir, best_cfg, force=True, progress=False,
                               step_dtype=step_dtype, fit=kept[1] if reuse else None)
        test = res["test"]
    summary = {"variants": len(variants), "trained": len(todo), "select_metric": select,
               "best": {**best, "test": test}, "seconds": round(train_seconds, 2),
               "variants_per_minute": round(60 * len(todo) / train_seconds, 2) if todo else None}
    if stack > 1:
        summary["stack"] = stack
    summary.update(low)
    if any(d.streamed for d in _DATA.values()):
        summary["streamed"] = True
    write_json(out / "sweep.json", summary)
    with atomic_file(out / "sweep.md") as f:
        f.write(_sweep_md(recs, grid, select, best, test, summary, fixed))
    _sweep_png(recs, grid, out / "sweep.png")
    return summary


def influence(recs: list[dict], grid: dict, metric: str = "NDCG@10") -> dict[str, float]:
    """Per varied option: the spread (max - min) of the mean validation ``metric`` over its values."""
    out = {}
    for k, vals in grid.items():
        if len(vals) < 2:
            continue
        means = []
        for v in vals:
            xs = [r["valid"][metric] for r in recs if r["options"].get(k) == v]
            if xs:
                means.append(float(np.mean(xs)))
        out[k] = max(means) - min(means) if means else 0.0
    return out


def _sweep_md(recs, grid, select, best, test, summary, fixed=None) -> str:
    keys = list(grid)
    ranked = sorted(recs, key=lambda r: -r["valid"][select])
    inf = influence(recs, grid, "NDCG@10")
    best_opts = ", ".join(f"{k}={best['options'][k]}" for k in keys)
    lines = [f"# Head sweep: {len(recs)} variants", "",
             f"Validation split (1 target + stored negatives); selected by valid {select}; the best variant "
             f"({best_opts}) evaluated once on test: "
             + ", ".join(f"{k} {v:.4f}" for k, v in test.items()) + ".", ""]
    if fixed or summary.get("step_dtype"):
        steps = [f"{summary['step_dtype']} training steps"] if summary.get("step_dtype") else []
        lines += ["Every variant: " + ", ".join([f"{k}={v}" for k, v in (fixed or {}).items()] + steps)
                  + "; other options as the run's heads.", ""]
    if inf:
        lines += ["Spread of mean valid NDCG@10 across each option's values: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in sorted(inf.items(), key=lambda x: -x[1])) + ".", ""]
    if summary["trained"]:
        stacked = f", up to {summary['stack']} at once" if summary.get("stack") else ""
        lines += [f"Trained {summary['trained']} variants in {summary['seconds']:.1f} s "
                  f"({summary['variants_per_minute']:.1f} per minute{stacked}).", ""]
    lines += ["| rank | " + " | ".join(keys) + " | best step | valid NDCG@10 | valid HR@10 | s |",
              "|---:|" + "---|" * len(keys) + "---:|---:|---:|---:|"]
    for i, r in enumerate(ranked, 1):
        lines.append(f"| {i} | " + " | ".join(str(r["options"][k]) for k in keys)
                     + f" | {r['best_step']} | {r['valid']['NDCG@10']:.4f} | {r['valid']['HR@10']:.4f} | "
                       f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _sweep_png(recs, grid, path) -> None:
    import matplotlib  # deferred: matplotlib takes a second to import; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after choosing the Agg backend

    inf = influence(recs, grid, "NDCG@10")
    key = max(inf, key=inf.get) if inf else list(grid)[0]
    vals = grid[key]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    rng = np.random.default_rng(0)
    for j, v in enumerate(vals):
        ys = [r["valid"]["NDCG@10"] for r in recs if r["options"].get(key) == v]
        ax.scatter(j + rng.uniform(-0.12, 0.12, len(ys)), ys, s=14, alpha=0.7)
        if ys:
            ax.hlines(np.mean(ys), j - 0.25, j + 0.25, color="black", lw=1.5)
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels([str(v) for v in vals])
    ax.set_xlabel(f"{key} (most influential option)")
    ax.set_ylabel("valid NDCG@10 (best step)")
    ax.set_title(f"{len(recs)} head variants; bars = mean", fontsize=9)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
