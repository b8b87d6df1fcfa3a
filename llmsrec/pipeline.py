"""``llmsrec run``: prepare -> SASRec -> precompute -> train -> evaluate in one run folder.

Layout of a run folder ``OUT``::

    OUT/data/            prepared dataset           (stage "prepare")
    OUT/sasrec/          SASRec checkpoint + results (stage "sasrec")
    OUT/cache/cache.h5   frozen-LLM states           (stage "precompute")
    OUT/heads/           LLM-SRec heads + results    (stage "train")
    OUT/results.json     SASRec vs LLM-SRec          (stage "evaluate")
    OUT/results.md       the same as a Table 6-style markdown table

Every stage folder holds a ``stage.json``: ``{"stage", "status": "running"|"done",
"options", "inputs": {name: digest}, "output_digest", "seconds", "finished"}``. A stage is
reused when its recorded status is ``done``, its options and input digests equal the
current ones and its output still has the recorded digest; so a rerun after changing only a
head option reuses data, SASRec and cache and retrains the heads (seconds). A stage whose
record says ``running`` with the same options was killed: precompute then resumes its
chunks; changed options rebuild it.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from llmsrec import data
from llmsrec.atomic import atomic_file, jsonable, write_json
from llmsrec.data import bundled_ml1m_dir, bundled_ml100k_dir, dataset_digest, load_prepared
from llmsrec.defaults import HISTORY_WINDOW, LLM, PRECOMPUTE, SASREC_TRAINING
from llmsrec.errors import InputError
from llmsrec.run_layout import STAGE_DIRS, file_digest

METRIC_KEYS = ("NDCG@10", "NDCG@20", "HR@10", "HR@20")

#: SASRec options of :func:`run_pipeline` (the ``sasrec train`` defaults, ``defaults.SASREC_TRAINING``).
SASREC_DEFAULTS = SASREC_TRAINING
#: precompute options of :func:`run_pipeline`: the paper's heads' views and cache (one sample per
#: user on ``train``, last-layer states only); ``llmsrec run`` passes its own views, readout
#: layers and prefixes.
PRECOMPUTE_DEFAULTS = dict(views=("train", "valid", "test"), history_window=HISTORY_WINDOW, verb=None,
                           batch_tokens=LLM["batch_tokens"], chunk_prompts=PRECOMPUTE["chunk_prompts"], device="cpu",
                           dtype=None, fi=LLM["fi"], ridge_alpha=1e-3, trust_remote_code=False, threads=None,
                           readout_layers=(), prefixes=1, template=LLM["template"])


def input_fingerprint(path: str | Path) -> str:
    """Cheap identity of a raw input file: sha256 when under 64 MiB, else name+size+mtime.

    Large raw files (Amazon reviews) are not hashed on every run; a changed size or
    modification time still invalidates the prepare stage.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    st = p.stat()
    if st.st_size < 64 << 20:
        return "sha256:" + file_digest(p)
    return f"stat:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


class Stage:
    """Bookkeeping of one stage folder (``stage.json``)."""

    def __init__(self, run_dir: Path, name: str, options: dict, inputs: dict):
        self.name = name
        self.dir = run_dir / STAGE_DIRS[name]
        self.record_path = self.dir / "stage.json"
        self.options = jsonable(options)
        self.inputs = jsonable(inputs)

    def record(self) -> dict | None:
        try:
            return json.loads(self.record_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def same_request(self, rec: dict | None) -> bool:
        return bool(rec) and rec.get("options") == self.options and rec.get("inputs") == self.inputs

    def reusable(self, output_digest: Callable[[], str | None]) -> bool:
        rec = self.record()
        if not (self.same_request(rec) and rec.get("status") == "done"):
            return False
        try:
            return output_digest() == rec.get("output_digest")
        except (OSError, InputError):
            return False

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.record_path, {"stage": self.name, "status": "running", "options": self.options,
                                      "inputs": self.inputs})

    def done(self, output_digest: str, seconds: float) -> None:
        write_json(self.record_path, {
            "stage": self.name, "status": "done", "options": self.options, "inputs": self.inputs,
            "output_digest": output_digest, "seconds": round(seconds, 3),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })


def _first_difference(recorded: dict, asked: dict) -> tuple[str, str] | None:
    """``(where, key)`` of the first option or input of the prepare request that differs."""
    for where in ("options", "inputs"):
        a, b = recorded.get(where) or {}, asked[where]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return where, k
    return None


def check_same_data(run_dir: Path, prepare: "Stage", force: bool, log: Callable[[str], None]) -> None:
    """Refuse a run folder that holds a run of other data (another dataset, files, sample or
    filter: another prepare request); with ``force`` remove its results and report first,
    which would describe the other data until the new run ends.

    Raises:
        InputError: the recorded prepare request differs and not ``force``.
    """
    rec = prepare.record()
    diff = _first_difference(rec, {"options": prepare.options, "inputs": prepare.inputs}) if rec else None
    if diff is None:
        return
    where, key = diff
    was, now = (rec.get(where) or {}).get(key), {"options": prepare.options, "inputs": prepare.inputs}[where].get(key)
    what = f"{'option' if where == 'options' else 'input'} '{key}': {json.dumps(was)} there, {json.dumps(now)} asked"
    if not force:
        raise InputError(f"{run_dir}: holds a run of other data ({what}); pass --force to replace it, or choose "
                         f"another --out")

    log(f"[prepare] {run_dir} held a run of other data ({what}); --force: replacing it")
    for name in ("results.json", "results.md"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "report", ignore_errors=True)


def _data_inputs(dataset: str, files: dict) -> dict:
    if dataset == "ml-100k":
        d = bundled_ml100k_dir()
        files = {"inter": d / "ml-100k.inter", "item": d / "ml-100k.item"}
    elif dataset == "ml-1m":
        d = bundled_ml1m_dir()
        files = {"inter": d / "ml-1m.inter", "item": d / "ml-1m.item"}
    return {k: input_fingerprint(v) for k, v in files.items() if v is not None}


def _prepare(dataset: str, out: Path, files: dict, opts: dict):
    kw = dict(opts, force=True)
    if dataset == "ml-100k":
        return data.prepare_ml100k(out, **kw)
    if dataset == "ml-1m":
        return data.prepare_ml1m(out, **kw)
    if dataset == "atomic":
        if not files.get("inter") or not files.get("item"):
            raise InputError("--dataset atomic needs --inter and --item")
        return data.prepare_atomic(files["inter"], files["item"], out, title_field=files.get("title_field"), **kw)
    if dataset == "amazon2023":
        if not files.get("reviews") or not files.get("meta"):
            raise InputError("--dataset amazon2023 needs --reviews and --meta")
        return data.prepare_amazon2023(files["reviews"], files["meta"], out, **kw)
    raise InputError(f"--dataset: unknown dataset {dataset!r}")


def format_results_md(results: dict) -> str:
    """Table 6-style markdown: one row per metric, SASRec and LLM-SRec columns, per split."""
    models = results["models"]
    names = list(models)
    lines = [f"# {results['dataset']}: SASRec vs LLM-SRec", "",
             f"Protocol: {results['protocol']['split']}, 1 target + {results['protocol']['negatives']} "
             f"stored negatives per user, seed {results['protocol']['seed']}.", ""]
    if results.get("data"):  # what was run: a 40-user slice must not read as the whole dataset
        d = results["data"]
        lines[3:3] = [f"Data: {d['users']:,} users, {d['items']:,} items, {d['interactions']:,} interactions "
                      f"(--max-users {d['max_users'] if d['max_users'] is not None else 'all'}, --kcore {d['kcore']}); "
                      f"LLM: {results.get('llm')}.", ""]
    for split in ("test", "test-shuffled", "valid"):
        if not all(split in models[n] for n in names):
            continue
        lines += [f"**{split}**", "", "| Dataset | Metric | " + " | ".join(names) + " | LLM-SRec vs SASRec |",
                  "|---|---|" + "---:|" * (len(names) + 1)]
        for k in METRIC_KEYS:
            vals = [models[n].get(split, {}).get(k) for n in names]
            base, ours = models.get("SASRec", {}).get(split, {}).get(k), models.get("LLM-SRec", {}).get(split, {}).get(k)
            rel = f"{(ours / base - 1) * 100:+.1f}%" if base and ours is not None else ""
            cells = [f"{v:.4f}" if v is not None else "" for v in vals]
            lines.append(f"| {results['dataset']} | {k} | " + " | ".join(cells) + f" | {rel} |")
        lines.append("")
    if all("full" in models[n] for n in names):
        lines += ["**test, full ranking** (the target against every item outside the user's history; "
                  "sampled and full metrics can order models differently)", "",
                  "| Dataset | Metric | " + " | ".join(names) + " | LLM-SRec vs SASRec |",
                  "|---|---|" + "---:|" * (len(names) + 1)]
        for k in (*METRIC_KEYS, "MRR"):
            vals = [models[n]["full"].get("test", {}).get(k) for n in names]
            base, ours = (models.get(m, {}).get("full", {}).get("test", {}).get(k) for m in ("SASRec", "LLM-SRec"))
            rel = f"{(ours / base - 1) * 100:+.1f}%" if base and ours is not None else ""
            cells = [f"{v:.4f}" if v is not None else "" for v in vals]
            lines.append(f"| {results['dataset']} | {k} | " + " | ".join(cells) + f" | {rel} |")
        lines.append("")
    t = results.get("timings", {})
    if t:
        lines += ["Wall time of this run per stage (s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), ""]
    return "\n".join(lines)


def teacher_shuffled_metrics(ds, cache) -> dict:
    """The CF-SRec teacher's test metrics on the shuffled test view: its cached O_u of the
    permuted inputs (``/users/test-shuffled/cf``) against E on the stored candidates."""
    from llmsrec.cache import open_cache  # deferred: imports h5py
    from llmsrec.metrics import ranking_metrics  # deferred: imports numba

    with open_cache(cache) as c:
        o_u, e = c.user_cf("test-shuffled"), c.item_cf()
    cand = np.asarray(ds.candidates("test"), dtype=np.int64)
    scores = np.einsum("ud,ucd->uc", o_u[1:], e[cand])
    return {k: float(v) for k, v in ranking_metrics(scores).items()}


def run_pipeline(
    out: str | Path,
    *,
    dataset: str = "ml-100k",
    files: dict | None = None,
    data_opts: dict | None = None,
    llm: str = LLM["llm"],
    sasrec_opts: dict | None = None,
    precompute_opts: dict | None = None,
    head_opts: dict | None = None,
    step_dtype: str = "fp32",
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or reuse) every stage and write ``OUT/results.json`` and ``OUT/results.md``.

    Args:
        out: run folder.
        dataset: ``ml-100k`` | ``ml-1m`` | ``atomic`` | ``amazon2023``.
        files: raw inputs of ``atomic`` (``inter``, ``item``, ``title_field``) or
            ``amazon2023`` (``reviews``, ``meta``).
        data_opts: ``kcore``, ``num_negatives``, ``max_users``, ``skip_bad_lines`` of prepare.
        llm: ``smollm2-135m`` or a local Hugging Face folder.
        sasrec_opts: overrides of :data:`SASREC_DEFAULTS`.
        precompute_opts: overrides of :data:`PRECOMPUTE_DEFAULTS`.
        head_opts: :class:`llmsrec.heads.train.TrainConfig` fields (``None`` = default).
        step_dtype: ``fp32`` (exact) or ``bf16``, the heads' training-step dtype
            (:func:`llmsrec.heads.train.fit_heads`); part of the train stage's options
            only when not ``fp32``, so existing fp32 runs stay reusable.
        seed: one seed for every stage (user sample, negatives, SASRec, shuffles, heads).
        force: rebuild every stage.
    Returns:
        The ``results.json`` dict: ``{"dataset", "protocol": {"split", "negatives", "seed"},
        "data": {"users", "items", "interactions", "max_users", "kcore"}, "llm", "models": {"SASRec": {"valid", "test", "full"}, "LLM-SRec": {"valid", "test", "full"}},
        "timings": {stage: seconds spent in this invocation}}``; ``full`` holds
        ``{"valid", "test"}`` full-catalogue metrics (``NDCG@K``, ``HR@K``, ``MRR``).
    Raises:
        InputError: from any stage (bad inputs, options, or a mismatched cache); the views
            lack ``valid``/``test`` (or ``train`` when the heads read one sample per user);
            ``out`` holds a run of other data (another prepare request) and not ``force``.
    """
    from llmsrec.heads.train import TrainConfig  # deferred: imports torch

    run_dir = Path(out)
    files = {k: (str(v) if v is not None and k != "title_field" else v) for k, v in (files or {}).items()}
    data_opts = {k: v for k, v in (data_opts or {}).items() if v is not None}
    s_opts = {**SASREC_DEFAULTS, **{k: v for k, v in (sasrec_opts or {}).items() if v is not None}}
    p_opts = {**PRECOMPUTE_DEFAULTS, **{k: v for k, v in (precompute_opts or {}).items() if v is not None}}
    p_opts["views"] = list(p_opts["views"])
    if not isinstance(p_opts["readout_layers"], str):
        p_opts["readout_layers"] = [int(x) for x in p_opts["readout_layers"]]
    h_opts = {k: v for k, v in (head_opts or {}).items() if v is not None}
    h_opts.setdefault("seed", seed)
    cfg = TrainConfig.from_options(**h_opts)  # bad head options fail before any stage runs
    # with prefix samples the heads train on the train-prefix view, not on train
    for v in ("train", "valid", "test") if cfg.prefixes == 1 else ("valid", "test"):
        if v not in p_opts["views"]:
            raise InputError(f"--views: {v} is required by `run`" + (" with --prefixes 1" if v == "train" else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage_header(name: str, reused: bool, detail: str = "") -> None:
        log(f"[{name}] {'reused' if reused else 'running'}{(': ' + detail) if detail else ''}")

    # 1. prepare -----------------------------------------------------------------------------
    t = time.perf_counter()
    st = Stage(run_dir, "prepare", {"dataset": dataset, "seed": seed, **data_opts,
                                    "title_field": files.get("title_field")},
               _data_inputs(dataset, {k: v for k, v in files.items() if k != "title_field"}))
    data_dir = st.dir
    check_same_data(run_dir, st, force, log)

    def data_digest():
        return dataset_digest(data_dir)

    if not force and st.reusable(data_digest):
        stage_header("prepare", True, str(data_dir))
        ds = load_prepared(data_dir)
    else:
        stage_header("prepare", False, str(data_dir))
        st.start()
        _prepare(dataset, data_dir, files, dict(data_opts, seed=seed))
        ds = load_prepared(data_dir)
        # prepare replaced the folder atomically (and the "running" record with it)
        st.done(ds.digest, time.perf_counter() - t)
    timings["prepare"] = round(time.perf_counter() - t, 3)
    log(f"  {ds.n_users:,} users, {ds.n_items:,} items, "
        f"{sum(len(s) for s in ds.seqs):,} interactions")

    # 2. SASRec ------------------------------------------------------------------------------
    from llmsrec.cfsrec import evaluate_sasrec, train_sasrec  # deferred: imports torch

    t = time.perf_counter()
    st = Stage(run_dir, "sasrec", {**s_opts, "seed": seed}, {"data": ds.digest})
    sas_dir = st.dir
    sas_weights = sas_dir / "model.safetensors"
    if not force and st.reusable(lambda: file_digest(sas_weights)):
        stage_header("sasrec", True, str(sas_dir))
    else:
        stage_header("sasrec", False, f"up to {s_opts['epochs']} epochs")
        train_sasrec(ds, sas_dir, seed=seed, force=True, progress=progress, **s_opts)
        st.done(file_digest(sas_weights), time.perf_counter() - t)
    timings["sasrec"] = round(time.perf_counter() - t, 3)

    # 3. precompute --------------------------------------------------------------------------
    from llmsrec.precompute import precompute  # deferred: imports torch

    t = time.perf_counter()
    cache_opts = {"llm": llm, "seed": seed, **{k: v for k, v in p_opts.items() if k != "threads"}}
    st = Stage(run_dir, "precompute", cache_opts, {"data": ds.digest, "sasrec": file_digest(sas_weights)})
    cache = st.dir / "cache.h5"
    prev = st.record()
    if prev and prev.get("status") == "done" and set(p_opts["views"]) <= set(prev["options"].get("views", [])):
        # a cache that already holds more views (added by `llmsrec analyze`) serves this request
        st.options["views"] = prev["options"]["views"]
    if not force and st.reusable(lambda: file_digest(cache)):
        stage_header("precompute", True, str(cache))
    else:
        prev = st.record()
        # a killed run with the same request resumes; only the views changed -> extend;
        # anything else changed -> rebuild
        same_but_views = bool(prev) and prev.get("inputs") == st.inputs and \
            {k: v for k, v in prev.get("options", {}).items() if k != "views"} == \
            {k: v for k, v in st.options.items() if k != "views"}
        rebuild = force or (prev is not None and not same_but_views)
        # done with this very request but not reusable: its output changed (or is gone) since
        rebuild = rebuild or (prev is not None and prev.get("status") == "done" and st.same_request(prev))
        stage_header("precompute", False, f"{llm}, views {','.join(p_opts['views'])}"
                     + (" (rebuild)" if rebuild else ""))
        st.start()
        precompute(ds, sas_dir, cache, llm=llm, views=p_opts["views"], history_window=p_opts["history_window"],
                   verb=p_opts["verb"], batch_tokens=p_opts["batch_tokens"], chunk_prompts=p_opts["chunk_prompts"],
                   device=p_opts["device"], dtype=p_opts["dtype"], seed=seed, force=rebuild,
                   fi=p_opts["fi"], ridge_alpha=p_opts["ridge_alpha"], trust_remote_code=p_opts["trust_remote_code"],
                   num_threads=p_opts["threads"], progress=progress, log=log,
                   readout_layers=p_opts["readout_layers"], prefixes=p_opts["prefixes"],
                   template=p_opts["template"])
        st.done(file_digest(cache), time.perf_counter() - t)
    timings["precompute"] = round(time.perf_counter() - t, 3)

    # 4. heads -------------------------------------------------------------------------------
    from llmsrec.heads.train import evaluate_heads, train_heads  # deferred: imports torch

    t = time.perf_counter()
    train_opts = asdict(cfg) | ({"step_dtype": step_dtype} if step_dtype != "fp32" else {})
    st = Stage(run_dir, "train", train_opts, {"data": ds.digest, "cache": file_digest(cache)})
    heads_dir = st.dir
    trained = None  # train_heads' results when the heads are trained now
    if not force and st.reusable(lambda: file_digest(heads_dir / "heads.safetensors")):
        stage_header("train", True, str(heads_dir))
    else:
        stage_header("train", False, f"train negatives {cfg.train_negatives}, lr {cfg.lr}, batch {cfg.batch_size}, "
                                     f"hidden {cfg.hidden}, distill {cfg.distill}, up to {cfg.epochs} epochs, "
                                     f"patience {cfg.patience}" + (f", {step_dtype} steps" if step_dtype != "fp32" else ""))
        trained = train_heads(ds, cache, heads_dir, force=True, progress=progress, step_dtype=step_dtype,
                              **asdict(cfg))
        st.done(file_digest(heads_dir / "heads.safetensors"), time.perf_counter() - t)
    timings["train"] = round(time.perf_counter() - t, 3)

    # 5. evaluate (cheap: recomputed from the saved checkpoints, but for the heads just trained) --
    t = time.perf_counter()
    stage_header("evaluate", False)
    from llmsrec.evaluate.full_ranking import full_ranking_cfsrec, full_ranking_heads  # deferred: imports torch

    sas_res = evaluate_sasrec(ds, sas_dir)
    from llmsrec.cache import open_cache  # deferred: imports h5py

    with open_cache(cache) as c:  # the cache may hold more views than asked (added by analyze)
        shuffled = "test-shuffled" in c.views
    ll_views = ("valid", "test") + (("test-shuffled",) if shuffled else ())
    if trained is not None and "stream" not in trained and all(v in trained for v in ll_views):
        # train_heads scored these very heads on this cache in memory, as evaluate_heads does
        # here (the same metrics; streamed scoring sums in blocks, so it is left to evaluate_heads)
        ll_res = {v: trained[v] for v in ll_views}
    else:
        ll_res = evaluate_heads(ds, cache, heads_dir, views=ll_views)
    if shuffled:  # shuffled inference (paper Sec. 2.3.2) for every model the run trains
        sas_res["test-shuffled"] = teacher_shuffled_metrics(ds, cache)
    sas_full = full_ranking_cfsrec(ds, sas_dir)
    ll_full = full_ranking_heads(ds, heads_dir, cache=cache)
    timings["evaluate"] = round(time.perf_counter() - t, 3)
    n_neg = int(ds.test_negatives.shape[1])
    params = ds.stats.get("params", {})
    results = {
        "dataset": ds.stats.get("dataset", dataset),
        "protocol": {"split": "leave-last-out", "negatives": n_neg, "seed": seed},
        "data": {"users": ds.n_users, "items": ds.n_items, "interactions": int(sum(len(s) for s in ds.seqs)),
                 "max_users": params.get("max_users"), "kcore": params.get("kcore")},
        "llm": llm,
        "models": {
            "SASRec": {**{k: _metrics(v) for k, v in sas_res.items()}, "full": sas_full},
            "LLM-SRec": {**{k: _metrics(v) for k, v in ll_res.items()}, "full": ll_full},
        },
        "timings": timings,
    }
    write_json(run_dir / "results.json", results)
    with atomic_file(run_dir / "results.md") as f:
        f.write(format_results_md(results))
    return results


def _metrics(m: dict) -> dict:
    return {k: float(m[k]) for k in METRIC_KEYS}


def extend_run_cache(run_dir: str | Path, views, *, progress: bool = True,
                     log: Callable[[str], None] = print, trust_remote_code: bool = False) -> Path:
    """Add user views to the cache of a run folder (``llmsrec analyze`` needs shuffled ones).

    The views missing from ``RUN/cache/cache.h5`` are computed by precompute with the
    options recorded in ``RUN/cache/stage.json``, so they match the views already there.
    Existing datasets are not touched, so the stages that read the cache stay valid: the
    ``stage.json`` records of ``cache`` (views, output digest) and ``heads`` (input digest)
    are updated, and a later ``llmsrec run`` reuses them instead of retraining.

    Args:
        run_dir: a folder written by :func:`run_pipeline`.
        views: view names (``llmsrec.data.views.ALL_VIEWS``) that must be present.
        trust_remote_code: the running command's flag; the run folder's recorded value
            never allows the model's code by itself.
    Returns:
        The cache path.
    Raises:
        InputError: the run folder lacks a finished precompute stage, records
            ``trust_remote_code: true`` without the flag, names an LLM whose weights are
            not the cache's (checked before loading), or see ``precompute``.
    """
    from llmsrec.cache import open_cache  # deferred: imports h5py
    from llmsrec.precompute import precompute  # deferred: imports torch

    run_dir = Path(run_dir)
    cache = run_dir / STAGE_DIRS["precompute"] / "cache.h5"
    rec_path = run_dir / STAGE_DIRS["precompute"] / "stage.json"
    if not cache.is_file():
        raise InputError(f"{cache}: no cache in this run folder (run `llmsrec run` first)")
    with open_cache(cache) as c:
        have = list(c.views)
    missing = [v for v in views if v not in have]
    if not missing:
        return cache
    try:
        rec = json.loads(rec_path.read_text())
        opts = rec["options"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{rec_path}: cannot read the precompute options to extend the cache ({e})") from None
    old_digest = file_digest(cache)
    log(f"[precompute] adding view(s) {', '.join(missing)} to {cache}")
    ds = load_prepared(run_dir / STAGE_DIRS["prepare"])
    t = time.perf_counter()
    from llmsrec.precompute.llm import load_llm, recorded_trust  # deferred: imports torch

    with open_cache(cache) as c:
        weights = c.provenance.get("model_weights_sha256")
    if not weights:
        raise InputError(f"{cache}: provenance field 'model_weights_sha256' missing: the LLM {opts['llm']!r} "
                         f"cannot be checked before it is loaded")
    llm = load_llm(opts["llm"], device=opts["device"], dtype=opts["dtype"],  # checked before it is loaded
                   trust_remote_code=recorded_trust(rec_path, opts, trust_remote_code), expect_weights_digest=weights)
    precompute(ds, run_dir / STAGE_DIRS["sasrec"], cache, llm=llm, views=have + missing,
               history_window=opts["history_window"], verb=opts["verb"], batch_tokens=opts["batch_tokens"],
               chunk_prompts=opts["chunk_prompts"], device=opts["device"], dtype=opts["dtype"],
               seed=opts["seed"], fi=opts["fi"], ridge_alpha=opts["ridge_alpha"],
               progress=progress, log=log,
               readout_layers=opts.get("readout_layers", ()), prefixes=opts.get("prefixes", 1),
               template=opts.get("template", "llmsrec-prompt-v1"))
    new_digest = file_digest(cache)
    rec["options"]["views"] = have + missing
    rec["output_digest"] = new_digest
    rec["seconds"] = round(float(rec.get("seconds", 0.0)) + time.perf_counter() - t, 3)
    write_json(rec_path, rec)
    heads_rec = run_dir / STAGE_DIRS["train"] / "stage.json"
    try:
        h = json.loads(heads_rec.read_text())
    except (OSError, ValueError):
        h = None
    if h and h.get("inputs", {}).get("cache") == old_digest:
        h["inputs"]["cache"] = new_digest
        write_json(heads_rec, h)
    return cache
