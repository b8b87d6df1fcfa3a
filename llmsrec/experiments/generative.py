"""``llmsrec compare --approach generative``: the paper's Table 4 and Fig. 1a (Next Item Title
Generation approach) on one prepared dataset.

For each LLM4Rec baseline (:mod:`llmsrec.baselines.generative`) and seed, two runs:

* original training: trained on the data as is, scored on ``test`` and ``test-shuffled``
  (the last W history items of each test prompt permuted, Fig. 1a's shuffled inference);
* shuffled training (Table 4): trained on a copy whose ``seq[:-2]`` are shuffled once per
  user (:func:`llmsrec.evaluate.analyses.shuffle_training_sequences`, seed 0), scored on the
  original ``test`` sequences.

SASRec is scored on the same candidates (the target + the first m stored negatives) for the
same test users: the teacher the baselines read (original training; ``test`` and
``test-shuffled``), and a SASRec trained with the teacher's options on the shuffled copy.
Folders under OUT::

    OUT/gen-<model>[-shuffled-training]-seed<k>/   a run (results.json, scores, ...) + request.json
    OUT/sasrec-shuffled-training-seed<k>/          SASRec on the shuffled copy + request.json
    OUT/sasrec-seed<k>/                            the teacher, when no --cache gives one
    OUT/compare.json, OUT/compare.md               Table 4 / Fig. 1a-style results

A run whose ``request.json`` equals the current request is reused, not retrained.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from llmsrec.atomic import atomic_file, jsonable, read_json, sha256_file, write_json
from llmsrec.baselines import get_spec
from llmsrec.baselines.generative import GenOptions, gen_metrics, train_generative
from llmsrec.cache import open_cache
from llmsrec.cfsrec import load_cfsrec, pad_left, train_cfsrec
from llmsrec.data import load_prepared
from llmsrec.defaults import BASELINES
from llmsrec.e2e.loop import eval_user_sample
from llmsrec.errors import InputError
from llmsrec.evaluate.analyses import change_ratio, shuffle_training_sequences
from llmsrec.experiments.compare import find_teacher, fresh_llm
from llmsrec.precompute.prompts import build_view

__all__ = ["GEN_MODELS", "compare_generative", "format_generative_md", "shuffled_copy"]

#: the models of ``compare --approach generative``: SASRec (on the same candidates) + the four
GEN_MODELS = ("sasrec", *BASELINES)
REQUEST = "request.json"
#: seed of the shuffled-training copy (the retrieval analyses' default)
SHUFFLE_TRAIN_SEED = 0
SHOWN = ("HR@1", "NDCG@10")


def shuffled_copy(ds, seed: int = SHUFFLE_TRAIN_SEED):
    """A shallow copy of ``ds`` whose training sequences ``seq[:-2]`` are shuffled once per user
    (Table 4's shuffled training); its digest is the original's + ``+shuffled-training-seed<k>``."""
    out = copy.copy(ds)
    out.seqs = shuffle_training_sequences(ds.seqs, seed)
    out.digest = f"{ds.digest}+shuffled-training-seed{seed}"
    return out


def _teacher(ds, out: Path, cache, seed: int, progress: bool, log, cf_options: dict | None = None) -> Path:
    """The SASRec the baselines read: the checkpoint that built ``cache`` (``llmsrec run``'s
    layout, or in OUT), else ``OUT/sasrec-seed<k>`` (trained with the defaults if missing)."""
    if cache is not None:
        if not Path(cache).is_file():
            raise InputError(f"--cache {cache}: no such file")
        with open_cache(cache) as c:
            digest = c.provenance.get("sasrec_sha256")
        found = find_teacher(digest, Path(cache), out)
        if found is None:
            raise InputError(f"--cache {cache}: the SASRec that built it was found neither next to it nor in {out}")
        return found
    d = out / f"sasrec-seed{seed}"
    opts = {k: v for k, v in (cf_options or {}).items() if v is not None}
    req = jsonable({"model": "sasrec", "seed": seed, "options": opts, "data": ds.digest})
    if not ((d / "model.safetensors").is_file() and read_json(d / REQUEST) == req):
        log(f"[sasrec seed {seed}] training -> {d}")
        train_cfsrec(ds, d, model="sasrec", seed=seed, force=True, progress=progress, **opts)
        write_json(d / REQUEST, req)
    return d


def _sasrec_shuffled(ds, out: Path, teacher: Path, seed: int, cf_options: dict, progress: bool, log) -> Path:
    """SASRec trained on :func:`shuffled_copy` with the teacher's recorded options."""
    done = read_json(teacher / "results.json") or {}
    tr, cfg = done.get("train", {}), done.get("config", {})
    opts = {k: tr[k] for k in ("epochs", "patience", "eval_every", "batch_size", "lr") if k in tr}
    opts.update({k: cfg[k] for k in ("hidden", "blocks", "heads", "dropout", "maxlen") if k in cfg})
    opts.update({k: v for k, v in cf_options.items() if v is not None})
    d = out / f"sasrec-shuffled-training-seed{seed}"
    req = jsonable({"model": "sasrec", "seed": seed, "options": opts, "data": ds.digest,
                     "shuffled_training_seed": SHUFFLE_TRAIN_SEED})
    if (d / "model.safetensors").is_file() and read_json(d / REQUEST) == req:
        log(f"[sasrec shuffled training seed {seed}] reused {d}")
        return d
    log(f"[sasrec shuffled training seed {seed}] training -> {d}")
    t = time.perf_counter()
    train_cfsrec(shuffled_copy(ds), d, model="sasrec", seed=seed, force=True, progress=progress, **opts)
    write_json(d / REQUEST, req)
    log(f"[sasrec shuffled training seed {seed}] {time.perf_counter() - t:.0f} s")
    return d


def sasrec_candidate_metrics(ds, run_dir, users: np.ndarray, m: int, views=("test", "test-shuffled"), *,
                             history_window: int, device: str = "cpu") -> dict[str, dict[str, float]]:
    """A saved CF-SRec's :func:`~llmsrec.baselines.generative.gen_metrics` on the target + first
    ``m`` stored test negatives of ``users``, per view (the shuffled view permutes the last W
    inputs exactly as the LLM prompts do)."""
    model = load_cfsrec(run_dir, device=device).eval()
    cand = np.asarray(ds.candidates("test"), dtype=np.int64)[users - 1, : m + 1]
    dev = next(model.parameters()).device
    out = {}
    with torch.no_grad():
        for view in views:
            inputs = build_view(ds, view, history_window=history_window, seed=0).cf_inputs
            seqs = pad_left([inputs[u] for u in users], model.config.maxlen).to(dev)
            s = model.score(seqs, torch.from_numpy(cand).to(dev)).float().cpu().numpy()
            out[view] = gen_metrics(s)
    return out


def compare_generative(ds, out, *, models: Sequence[str] = GEN_MODELS, seeds: Sequence[int] = (0,), cache=None,
                       llm: Any = None, options: dict | None = None, lora: dict | None = None,
                       stage1: dict | None = None, shuffled_training: bool = True, cf_options: dict | None = None,
                       force: bool = False, progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train (or reuse) the generative baselines and write ``OUT/compare.json`` / ``compare.md``.

    Args:
        ds: ``PreparedDataset`` or folder; out: output folder.
        models: of :data:`GEN_MODELS` (``sasrec`` adds its rows on the same candidates).
        seeds: one run per baseline and seed (SASRec: the teacher, and a shuffled-training
            SASRec per seed).
        cache: an HDF5 cache whose teacher the baselines read (else ``OUT/sasrec-seed<first>``).
        llm: name / folder / ``LoadedLLM`` (each run gets a fresh copy: LoRA goes in place).
        options: :class:`~llmsrec.baselines.generative.GenOptions` fields (not ``seed``).
        lora, stage1: LoRA (TALLRec/LLaRA/CoLLM) and A-LLMRec stage-1 option dicts.
        shuffled_training: also train every model on the shuffled copy (Table 4).
        cf_options: SASRec trainer options (``epochs``, ``patience``, ...): the teacher's when
            OUT trains it; overrides of the teacher's recorded ones for the shuffled SASRec.
    Returns:
        the ``compare.json`` dict: ``{"approach": "generative", "dataset", "data", "protocol",
        "options", "models": {name: {"display", "runs": {seed: {"original": {"test",
        "test-shuffled"}, "shuffled-training": {"test"}, "dir", ...}}, "mean": {...}}}}``.
    Raises:
        InputError: unknown model or option, a missing teacher, or a stage's bad input.
    """
    if not hasattr(ds, "digest"):
        ds = load_prepared(ds)
    out = Path(out)
    bad = [m for m in models if m not in GEN_MODELS]
    if bad:
        raise InputError(f"--approach generative: model {bad[0]!r} not supported (expected some of "
                         f"{', '.join(GEN_MODELS)})")
    models = [m for m in GEN_MODELS if m in models]
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if "seed" in options:
        raise InputError("compare: the seed is set per run (--seeds)")
    base = GenOptions(**options)  # validates
    llm = llm if llm is not None else base.llm
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in seeds]
    teacher = _teacher(ds, out, cache, seeds[0], progress, log, cf_options)
    teacher_sha = sha256_file(teacher / "model.safetensors")
    shuffled_ds = shuffled_copy(ds)
    results: dict = {
        "approach": "generative",
        "dataset": ds.stats.get("dataset") or ds.root.name,
        "data": {"root": str(ds.root), "digest": ds.digest, "n_users": int(ds.n_users)},
        "protocol": {
            "candidates": f"target + the first {base.negatives} stored negatives of the test split",
            "scoring": "mean log-probability per answer token" if base.length_norm else "summed answer log-probability",
            "test_users": base.test_users or int(ds.n_users),
            "shuffled_inference": {"view": "test-shuffled", "window": base.history_window, "seed": 0},
            "shuffled_training": {"seed": SHUFFLE_TRAIN_SEED, "what": "seq[:-2] shuffled once per user"}
            if shuffled_training else None,
            "change_ratio": "(shuffled - original) / original",
        },
        "options": jsonable(asdict(base)), "lora": jsonable(lora or {}), "stage1": jsonable(stage1 or {}),
        "teacher": str(teacher), "seeds": seeds, "models": {},
    }
    for name in models:
        runs = {}
        for seed in seeds:
            users = eval_user_sample(ds.n_users, base.test_users, seed + 1)
            if name == "sasrec":
                orig = sasrec_candidate_metrics(ds, teacher, users, base.negatives, history_window=base.history_window)
                entry = {"original": orig, "dir": str(teacher)}
                if shuffled_training:
                    d = _sasrec_shuffled(ds, out, teacher, seed, cf_options or {}, progress, log)
                    entry["shuffled-training"] = sasrec_candidate_metrics(
                        ds, d, users, base.negatives, ("test",), history_window=base.history_window)
                    entry["shuffled_dir"] = str(d)
                runs[str(seed)] = entry
                continue
            entry = {}
            for kind in ("original", "shuffled-training") if shuffled_training else ("original",):
                entry[kind] = _run(ds, shuffled_ds if kind != "original" else ds, out, name, seed, kind, base,
                                   llm=llm, lora=lora, stage1=stage1, teacher=teacher, teacher_sha=teacher_sha,
                                   force=force, progress=progress, log=log)
            runs[str(seed)] = entry
        display = "SASRec" if name == "sasrec" else get_spec(name).display
        results["models"][name] = {"display": display, "runs": runs, "mean": _mean(runs)}
    write_json(out / "compare.json", results)
    with atomic_file(out / "compare.md") as f:
        f.write(format_generative_md(results) + "\n")
    return results


def _run(ds, train_ds, out: Path, name: str, seed: int, kind: str, base: GenOptions, *, llm, lora, stage1, teacher,
         teacher_sha, force, progress, log) -> dict:
    spec = get_spec(name)
    tag = "" if kind == "original" else "-shuffled-training"
    d = out / f"gen-{name}{tag}-seed{seed}"
    views = ("test", "test-shuffled") if kind == "original" else ("test",)
    opts = {**asdict(base), "seed": seed, "llm": llm if isinstance(llm, str) else getattr(llm, "name", str(llm))}
    req = jsonable({"model": name, "seed": seed, "kind": kind, "options": opts,
                     "lora": (lora or {}) if spec.lora else None,
                     "stage1": (stage1 or {}) if spec.options_cls is not None else None,
                     "teacher_sha256": teacher_sha if spec.needs_sasrec else None, "data": train_ds.digest,
                     "views": list(views)})
    if not force and (d / "results.json").is_file() and read_json(d / REQUEST) == req:
        log(f"[{name} generative {kind} seed {seed}] reused {d}")
    else:
        log(f"[{name} generative {kind} seed {seed}] training -> {d}")
        train_generative(name, train_ds, teacher if spec.needs_sasrec else None, d, GenOptions(**opts), eval_ds=ds,
                         views=views, greedy=("test",) if kind == "original" else (), llm=fresh_llm(llm), lora=lora if spec.lora else None,
                         stage1=stage1 if spec.options_cls is not None else None, force=True, progress=progress,
                         log=log)
        write_json(d / REQUEST, req)
    res = read_json(d / "results.json") or {}
    try:
        got = {v: res[v] for v in views}
    except KeyError:
        raise InputError(f"{d / 'results.json'}: missing {', '.join(views)} metrics") from None
    both = {kind: {v: (res.get("metrics", {}).get(kind) or {}).get(v) for v in views} for kind in ("sum", "mean")}
    return {**got, "scorings": both, "dir": str(d), "steps": res.get("steps"), "train_seconds": res.get("train_seconds"),
            "per_step": res.get("timings", {}).get("per_step"),
            "eval_per_user": res.get("timings", {}).get("eval_per_user"), "eval_users": res.get("eval_users")}


def _mean(runs: dict) -> dict:
    """Mean over seeds of every (kind, view, metric) present in all runs."""
    first = next(iter(runs.values()))
    out: dict = {}
    for kind in ("original", "shuffled-training"):
        if kind not in first:
            continue
        for view, metrics in first[kind].items():
            if not isinstance(metrics, dict) or view not in ("test", "test-shuffled"):
                continue
            out.setdefault(kind, {})[view] = {
                k: float(np.mean([r[kind][view][k] for r in runs.values()])) for k in metrics}
    return out


def _f(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def _pct(a, b) -> str:
    if a is None or b is None:
        return "–"
    r = change_ratio(a, b)
    return "–" if r != r else f"{100 * r:+.2f}%"


def format_generative_md(results: dict) -> str:
    """Table 4 (original vs shuffled training) and Fig. 1a (original vs shuffled inference) as
    markdown: one row per model, HR@1 and NDCG@10 over the candidates, change ratios, and the
    greedy-decoding exact-match rates; means over the seeds."""
    p, o = results["protocol"], results["options"]
    lines = [f"Next Item Title Generation on {results['dataset']}: {p['candidates']}; {p['test_users']} test users; "
             f"ranked by {p['scoring']}; seeds {', '.join(str(s) for s in results['seeds'])}; "
             f"budget: {o.get('max_steps') or 'no'} max steps of {o['batch_size']} users, lr {o['lr']}.", ""]
    head = ["model"]
    for k in SHOWN:
        head += [f"{k} original", f"{k} shuffled training", "change"]
    for k in SHOWN:
        head += [f"{k} shuffled inference", "change"]
    head += ["greedy exact", "greedy HR@1"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 1 + "---:|" * (len(head) - 1)]
    for name, m in results["models"].items():
        mean = m["mean"]
        orig = mean.get("original", {}).get("test", {})
        shuf_tr = mean.get("shuffled-training", {}).get("test", {})
        shuf_inf = mean.get("original", {}).get("test-shuffled", {})
        row = [m["display"]]
        for k in SHOWN:
            row += [_f(orig.get(k)), _f(shuf_tr.get(k)), _pct(orig.get(k), shuf_tr.get(k))]
        for k in SHOWN:
            row += [_f(shuf_inf.get(k)), _pct(orig.get(k), shuf_inf.get(k))]
        row += [_f(orig.get("exact")), _f(orig.get("greedy_HR@1"))]
        lines.append("| " + " | ".join(row) + " |")
    other = []
    for name, m in results["models"].items():
        runs = list(m["runs"].values())
        if name == "sasrec" or not runs or "scorings" not in runs[0].get("original", {}):
            continue
        cells = []
        for kind, view in (("original", "test"), ("shuffled-training", "test"), ("original", "test-shuffled")):
            for scoring in ("sum", "mean"):
                vals = [((r.get(kind) or {}).get("scorings") or {}).get(scoring, {}).get(view) for r in runs]
                cells.append(_f(float(np.mean([v["HR@1"] for v in vals])) if vals and all(vals) else None))
        other.append(f"| {m['display']} | " + " | ".join(cells) + " |")
    if other:
        lines += ["", "HR@1 by scoring (sum: summed title log-probability; mean: per title token):", "",
                  "| model | original, sum | original, mean | shuffled training, sum | shuffled training, mean "
                  "| shuffled inference, sum | shuffled inference, mean |",
                  "|---|---:|---:|---:|---:|---:|---:|", *other]
    cost = []
    for name, m in results["models"].items():
        for seed, r in m["runs"].items():
            for kind in ("original", "shuffled-training"):
                e = r.get(kind, {})
                if isinstance(e, dict) and e.get("per_step") is not None:
                    ev = e.get("eval_per_user") or {}
                    cost.append(f"| {m['display']} | {kind} | {seed} | {e['steps']} | {_f(e['per_step'])[:-2]} | "
                                + " | ".join(_f(ev.get(v))[:-2] if ev.get(v) is not None else "–"
                                             for v in ("test", "test-shuffled")) + " |")
    if cost:
        lines += ["", "| model | training | seed | steps | s/step | s/user test | s/user test-shuffled |",
                  "|---|---|---:|---:|---:|---:|---:|", *cost]
    return "\n".join(lines)
