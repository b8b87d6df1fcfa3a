"""``llmsrec analyze``: the paper's sequence-understanding analyses on a run folder, as one report.

Input: a folder written by ``llmsrec run`` (``data/``, ``sasrec/``, ``cache/cache.h5``,
``heads/``). Output folder (default ``RUN/report``)::

    report.md                      every section, one computed interpretation line each
    <analysis>.json, <analysis>.md one pair per analysis (numbers per seed + mean/std)
    fig_*.png                      the figures the paper draws for them
    models/                        the extra models the analyses trained (reused on rerun)

The LLM never runs again except to add a missing cached view (``train-shuffled`` for
shuffled training; ``test-shuffled`` if the run lacked it), which is computed once into the
run's cache with the run's own precompute options. Every other variant is a heads training
on the cached states (seconds) or a SASRec training (minutes on a CPU).

Models (per seed s; the teacher SASRec of the cache and the cached states stay those of
the run, so seeds vary SASRec's and the heads' initialisation and sampling only):

==============================  ==========================================================
``SASRec``                      the run's SASRec for the run's seed, else retrained
``SASRec (shuffled training)``  SASRec trained on ``seq[:-2]`` shuffled once per user
``LLM-SRec``                    heads with the run's options (the run's heads for its seed)
``w/o L_Uniform``               ``uniform=False`` (Table 7 (b))
``w/o L_Distill, L_Uniform``    ``distill="none", uniform=False`` (Table 7 (a))
``LLM-SRec (contrastive)``      ``distill="contrastive"`` (Eq. 10, Table 12)
``... (shuffled training)``     heads trained on the cached ``train-shuffled`` view
==============================  ==========================================================

``--llm4rec tallrec,llara,collm,allmrec`` (opt-in: each costs LLM forward and backward
passes) adds the LLM4Rec baselines (:mod:`llmsrec.baselines`, Eq. 1 in the e2e loop, the
run's LLM, history window and SASRec) to shuffled inference, shuffled training and
representation similarity (Fig. 1b, Table 3, Table 5):

==============================  ==========================================================
``TALLRec`` ... ``A-LLMRec``    trained once per seed on the run's data into
                                ``models/<name>-seed<s>/`` (checkpoint + ``outputs.safetensors``:
                                test / test-shuffled scores and f_user(h_u), so reruns need
                                no LLM) with an ``analysis.json`` stamp of the request
``... (shuffled training)``     trained on the data with ``seq[:-2]`` shuffled once per user
                                (as SASRec's shuffled training), scored on the original test
                                sequences; ``models/<name>-shuffled-training-seed<s>/``
==============================  ==========================================================

The shuffled view of a user permutes the last W inputs shown in the prompt (W = the run's
``history_window``), seeded by the run's seed; SASRec reads the same permuted input. The
LLM4Rec baselines build their shuffled view with permutation seed 0 (the same permutations
when the run's seed is 0, the default).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.numpy
import torch

from llmsrec.atomic import atomic_file, read_json, sha256_file, write_json
from llmsrec.baselines import BASELINES, ViewScores, baseline_scores, fit_baseline, get_spec, view_scores
from llmsrec.baselines.common import baseline_record, metrics_of, save_baseline
from llmsrec.cache import open_cache
from llmsrec.cfsrec import load_sasrec, pad_left, train_sasrec
from llmsrec.data import load_prepared
from llmsrec.defaults import HISTORY_WINDOW, LLM
from llmsrec.errors import InputError
from llmsrec.evaluate import analyses as A
from llmsrec.experiments.compare import fresh_llm, llm4rec_train_options
from llmsrec.heads.model import load_heads
from llmsrec.heads.train import TrainConfig, load_cached_tensors, score_candidates, train_on_tensors
from llmsrec.metrics import ranking_metrics
from llmsrec.pipeline import extend_run_cache
from llmsrec.precompute.prompts import build_view
from llmsrec.seeds import parse_seeds

ANALYSES = (
    "shuffled-inference",
    "shuffled-training",
    "similarity",
    "ablations",
    "transition",
    "warm-cold",
    "over-smoothing",
    "distillation",
    "case-studies",
)
TITLES = {
    "shuffled-inference": "Shuffled inference (Sec. 2.3.2, Fig. 1b)",
    "shuffled-training": "Shuffled training (Sec. 2.3.1, Table 3)",
    "similarity": "Representation similarity (Sec. 2.3.3, Table 5)",
    "ablations": "Ablations (Sec. 4.2, Table 7)",
    "transition": "Transition vs non-transition users (Sec. 4.1.2, Fig. 3)",
    "warm-cold": "Warm vs cold items (Sec. 4.1.3, Fig. 4)",
    "over-smoothing": "Over-smoothing (Appendix F.4, Table 13)",
    "distillation": "Distillation loss: MSE vs contrastive (Appendix F.3, Table 12)",
    "case-studies": "Case studies (Sec. 4.3.3, Fig. 6)",
}
METRICS = ("NDCG@10", "NDCG@20", "HR@10", "HR@20")
#: LLM4Rec baselines ``--llm4rec`` can add -> display name
LLM4REC = {m: get_spec(m).display for m in BASELINES}
#: sections that use the LLM4Rec models
LLM4REC_SECTIONS = ("shuffled-inference", "shuffled-training", "similarity")
OUTPUTS_FILE = "outputs.safetensors"

#: LLM-SRec head variants: display name -> TrainConfig overrides.
VARIANTS = {
    "LLM-SRec": {},
    "w/o L_Uniform": {"uniform": False},
    "w/o L_Distill": {"distill": "none"},
    "w/o L_Distill, L_Uniform": {"distill": "none", "uniform": False},
    "LLM-SRec (contrastive)": {"distill": "contrastive"},
}
_SLUG = {"LLM-SRec": "llmsrec", "w/o L_Uniform": "no-uniform", "w/o L_Distill": "no-distill",
         "w/o L_Distill, L_Uniform": "no-distill-no-uniform", "LLM-SRec (contrastive)": "contrastive"}


def parse_only(only: str | None) -> tuple[str, ...]:
    """``--only a,b`` -> analysis names in report order; None/"" = all. Raises InputError."""
    if only is None:
        return ANALYSES
    asked = [x.strip() for x in only.split(",") if x.strip()]
    if not asked:
        raise InputError("--only: empty; name at least one analysis (or leave the option out for all)")
    bad = [x for x in asked if x not in ANALYSES]
    if bad:
        raise InputError(f"--only: unknown analysis {bad[0]!r}; expected some of {', '.join(ANALYSES)}")
    return tuple(a for a in ANALYSES if a in asked)


def parse_llm4rec(text: str | None) -> tuple[str, ...]:
    """``--llm4rec llara,tallrec`` -> ("tallrec", "llara") (paper order); ``all`` -> all four;
    None/"" -> (). Raises InputError on an unknown name."""
    if text is None or not str(text).strip():
        return ()
    asked = [x.strip().lower() for x in str(text).split(",") if x.strip()]
    if asked == ["all"]:
        return tuple(LLM4REC)
    bad = [x for x in asked if x not in LLM4REC]
    if bad:
        raise InputError(f"--llm4rec: unknown model {bad[0]!r}; expected some of {', '.join(LLM4REC)} (or all)")
    return tuple(m for m in LLM4REC if m in asked)


# --- model outputs ----------------------------------------------------------------------------


@dataclass
class Outputs:
    """One trained model's test-split outputs for users 1..n.

    Attributes:
        scores: view (``test``/``test-shuffled``) -> float32 ``(n, 1+m)`` candidate scores.
        reps: view -> float32 ``(n, d)`` user representations (SASRec O_u; LLM-SRec f_user(h_u)).
    """

    scores: dict = field(default_factory=dict)
    reps: dict = field(default_factory=dict)

    def metrics(self, view: str) -> dict:
        return {k: float(v) for k, v in ranking_metrics(self.scores[view]).items()}


class RunAnalysis:
    """Loads a run folder once and produces every model's :class:`Outputs` on demand.

    Args:
        run: the run folder; out: report folder (``models/`` under it holds trained variants).
        seeds: model seeds; progress: tqdm bars; log: one-line messages.
        llm4rec: LLM4Rec baselines to include (:data:`LLM4REC` names).
        llm4rec_options: their TrainConfig / E2EOptions fields (budget: ``max_steps``,
            ``eval_users``, ``epochs``, ...; ``device``, ``threads``, ``batch_tokens``) plus
            ``lora`` / ``stage1`` dicts, over ``llmsrec.experiments.compare.LLM4REC_DEFAULTS``;
            the history window is always the run's.
        llm: their LLM: a name or folder (default: the run's, from the cache provenance) or
            a ``LoadedLLM`` (deep-copied for every model: LoRA is injected in place).
        trust_remote_code: the running command's flag, for the run's LLM when a cached view
            is added (the run folder's recorded value never allows it by itself).
    Raises:
        InputError: the run folder is incomplete, or bad LLM4Rec options.
    """

    def __init__(self, run, out, seeds, *, progress: bool = True, log: Callable[[str], None] = print,
                 llm4rec=(), llm4rec_options: dict | None = None, llm=None, trust_remote_code: bool = False):
        self.run = Path(run)
        self.out = Path(out)
        self.seeds = list(seeds)
        self.progress = progress
        self.log = log
        for sub in ("data", "sasrec", "cache/cache.h5", "heads/heads_config.json"):
            if not (self.run / sub).exists():
                raise InputError(f"{self.run / sub}: missing; --run must be a folder written by `llmsrec run`")
        self.ds = load_prepared(self.run / "data")
        self.cache = self.run / "cache" / "cache.h5"
        with open_cache(self.cache) as c:
            self.provenance = dict(c.provenance)
        self.cache_seed = int(self.provenance.get("seed", 0))
        self.window = int(self.provenance.get("history_window", HISTORY_WINDOW))
        try:
            self.sasrec_results = json.loads((self.run / "sasrec" / "results.json").read_text())
            self.heads_train = json.loads((self.run / "heads" / "heads_config.json").read_text())["train"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{self.run}: cannot read sasrec/results.json or heads/heads_config.json ({e})") from None
        self.run_seed = int(self.sasrec_results.get("train", {}).get("seed", 0))
        self.prefixes = int(self.heads_train.get("prefixes", 1))

        self.llm4rec = tuple(llm4rec)
        self.b_opts, self.b_lora, self.b_stage1 = llm4rec_train_options(llm4rec_options)
        if self.b_opts.get("history_window", self.window) != self.window:
            raise InputError(f"--llm4rec: the history window is the run's ({self.window}), not "
                             f"{self.b_opts['history_window']}")
        self.b_opts["history_window"] = self.window
        self.llm = llm if llm is not None else self.provenance.get("model")
        self.trust_remote_code = trust_remote_code
        self._tensors = None
        self._memo: dict = {}
        self.seconds: dict[str, float] = {}

    # -- shared inputs --
    def ensure_views(self, views) -> None:
        with open_cache(self.cache) as c:
            missing = [v for v in views if v not in c.views]
        if missing:
            extend_run_cache(self.run, missing, progress=self.progress, log=self.log,
                             trust_remote_code=self.trust_remote_code)
            self._tensors = None

    def tensors(self):
        if self._tensors is None:
            readout = {k: self.heads_train.get(k, "out") for k in ("user_readout", "item_readout")}
            t = load_cached_tensors(self.ds, self.cache, eval_views=("valid", "test", "test-shuffled"),
                                    prefixes=int(self.heads_train.get("prefixes", 1)), **readout)
            if "test-shuffled" not in t.eval_hidden:
                raise InputError(f"{self.cache}: view test-shuffled missing")
            with open_cache(self.cache) as c:
                perm = c.permutation("test-shuffled")
                extra = {}
                if "train-shuffled" in c.views:
                    # shuffled training (Table 3): one sample per user, from the shuffled view
                    extra = {"tensors": load_cached_tensors(self.ds, self.cache, eval_views=(),
                                                            train_view="train-shuffled", **readout)}
                    if self.prefixes > 1 and "train" in c.views:  # its reference: one original sample per user
                        extra["one_sample"] = load_cached_tensors(self.ds, self.cache, eval_views=(), **readout)
            self._tensors = (t, perm, extra)
        return self._tensors

    @property
    def n(self) -> int:
        """Number of users analysed (all users, or the cache's ``--max-users``)."""
        return int(self.tensors()[0].eval_hidden["test"].shape[0] - 1)

    def test_inputs(self, view: str) -> list:
        """SASRec inputs of users 1..n for ``test`` or ``test-shuffled`` (permuted like the prompt)."""
        n = self.n
        users = range(1, n + 1)
        vp = build_view(self.ds, view, history_window=self.window, seed=self.cache_seed, users=users)
        if view.endswith("-shuffled"):
            perm = self.tensors()[1]
            if perm is not None and not np.array_equal(vp.permutation[: n + 1, : perm.shape[1]], perm[: n + 1]):
                raise InputError(f"{self.cache}: stored test-shuffled permutations differ from the "
                                 f"rebuilt ones (cache from another llmsrec version?)")
        return [vp.cf_inputs[u] for u in users]

    # -- SASRec --
    def _sasrec_options(self) -> dict:
        tr, cfg = self.sasrec_results.get("train", {}), self.sasrec_results.get("config", {})
        keys = ("epochs", "patience", "eval_every", "batch_size", "lr")
        opts = {k: tr[k] for k in keys if k in tr}
        opts.update({k: cfg[k] for k in ("hidden", "blocks", "heads", "dropout", "maxlen") if k in cfg})
        return opts

    def sasrec_dir(self, seed: int, shuffled_training: bool) -> Path:
        if seed == self.run_seed and not shuffled_training:
            return self.run / "sasrec"
        name = f"sasrec{'-shuffled-training' if shuffled_training else ''}-seed{seed}"
        d = self.out / "models" / name
        opts = self._sasrec_options()
        if (d / "results.json").is_file():
            done = json.loads((d / "results.json").read_text())
            if done.get("data", {}).get("digest") == self._sasrec_digest(shuffled_training):
                return d
        ds = self.training_dataset(shuffled_training)
        self.log(f"[analyze] training {name} ({opts.get('epochs')} epochs at most)")
        t = time.perf_counter()
        train_sasrec(ds, d, seed=seed, force=True, progress=self.progress, **opts)
        self.seconds[name] = round(time.perf_counter() - t, 1)
        return d

    def training_dataset(self, shuffled_training: bool):
        """The run's dataset, or a copy whose training sequences are shuffled once per user
        (Table 3's shuffled training; seeded by the cache's seed) with its own digest."""
        if not shuffled_training:
            return self.ds
        ds = copy.copy(self.ds)
        ds.seqs = A.shuffle_training_sequences(self.ds.seqs, self.cache_seed)
        ds.digest = self._sasrec_digest(True)
        return ds

    def _sasrec_digest(self, shuffled_training: bool) -> str:
        return self.ds.digest + (f"+shuffled-training-seed{self.cache_seed}" if shuffled_training else "")

    def sasrec(self, seed: int, shuffled_training: bool = False) -> Outputs:
        key = ("sasrec", seed, shuffled_training)
        if key not in self._memo:
            model = load_sasrec(self.sasrec_dir(seed, shuffled_training))
            cand = torch.from_numpy(np.asarray(self.ds.candidates("test"), dtype=np.int64)[: self.n])
            o = Outputs()
            with torch.no_grad():
                e = model.item_embeddings()
                for view in ("test", "test-shuffled"):
                    inputs = self.test_inputs(view)
                    reps = torch.cat([model.user_representation(pad_left(inputs[s : s + 512], model.config.maxlen))
                                      for s in range(0, len(inputs), 512)])
                    o.reps[view] = reps.numpy()
                    o.scores[view] = torch.einsum("ud,ucd->uc", reps, e[cand]).numpy()
            self._memo[key] = o
        return self._memo[key]

    # -- LLM-SRec heads --
    def heads_config(self, variant: str, seed: int):
        base = {k: v for k, v in self.heads_train.items()}
        base.update(VARIANTS[variant])
        base["seed"] = seed
        return TrainConfig.from_options(**base)

    def heads(self, variant: str, seed: int, shuffled_training: bool = False, one_sample: bool = False):
        """Trained heads (eval mode) of a variant; trains and saves them under ``models/`` once.

        ``one_sample``: trained on one original sample per user (the ``train`` view) instead
        of the run's prefix samples: the reference of shuffled training, whose cached view
        has one sample per user."""
        cfg = self.heads_config(variant, seed)
        one_sample = one_sample and not shuffled_training and self.prefixes > 1
        if one_sample:
            cfg = replace(cfg, prefixes=1)
        if (variant == "LLM-SRec" and not shuffled_training and not one_sample
                and seed == int(self.heads_train.get("seed", -1))):
            return load_heads(self.run / "heads")
        tag = "-shuffled-training" if shuffled_training else "-one-sample" if one_sample else ""
        name = f"{_SLUG[variant]}{tag}-seed{seed}"
        d = self.out / "models" / name
        stamp = {"config": asdict(cfg), "cache_view": "train-shuffled" if shuffled_training else "train",
                 "cache_f_I_sha256": self.provenance.get("f_I_sha256"), "dataset": self.ds.digest}
        try:
            if json.loads((d / "analysis.json").read_text()) == json.loads(json.dumps(stamp)):
                return load_heads(d)
        except (OSError, ValueError):
            pass
        data, _, extra = self.tensors()
        if shuffled_training:
            if not extra:
                raise InputError(f"{self.cache}: view train-shuffled missing")
            data = replace(extra["tensors"], eval_hidden=data.eval_hidden)
            cfg = replace(cfg, prefixes=1)
        elif one_sample:
            if "one_sample" not in extra:
                raise InputError(f"{self.cache}: view train missing (the reference of shuffled training)")
            data = replace(extra["one_sample"], eval_hidden=data.eval_hidden)
        self.log(f"[analyze] training heads {name}")
        t = time.perf_counter()
        train_on_tensors(data, d, cfg, force=True, progress=self.progress)
        write_json(d / "analysis.json", stamp)
        self.seconds[name] = round(time.perf_counter() - t, 1)
        return load_heads(d)

    def llmsrec(self, variant: str, seed: int, shuffled_training: bool = False, one_sample: bool = False) -> Outputs:
        key = ("llmsrec", variant, seed, shuffled_training, one_sample)
        if key not in self._memo:
            heads = self.heads(variant, seed, shuffled_training, one_sample)
            data = self.tensors()[0]
            o = Outputs()
            with torch.no_grad():
                for view in ("test", "test-shuffled"):
                    h = data.eval_hidden[view]
                    o.scores[view] = score_candidates(heads, h, data.item_hidden, data.candidates["test"])
                    o.reps[view] = heads.user(torch.from_numpy(np.ascontiguousarray(h[1:]))).numpy()
            self._memo[key] = o
        return self._memo[key]

    # -- LLM4Rec baselines --
    @property
    def llm4rec_names(self) -> list[str]:
        """Display names of the asked LLM4Rec baselines (paper order)."""
        return [LLM4REC[m] for m in self.llm4rec]

    def _llm_name(self) -> str:
        return self.llm if isinstance(self.llm, str) else str(getattr(self.llm, "name", "llm"))

    def baseline_stamp(self, name: str, seed: int, shuffled_training: bool) -> dict:
        spec = get_spec(name)
        return json.loads(json.dumps({
            "model": name, "seed": seed, "options": self.b_opts, "lora": self.b_lora if spec.lora else None,
            "stage1": self.b_stage1 if spec.options_cls is not None else None, "llm": self._llm_name(),
            "teacher_sha256": sha256_file(self.run / "sasrec" / "model.safetensors") if spec.needs_sasrec else None,
            "dataset": self._sasrec_digest(shuffled_training), "window": self.window,
            "views": ["test"] if shuffled_training else ["test", "test-shuffled"]}, default=str))

    def baseline(self, name: str, seed: int, shuffled_training: bool = False) -> Outputs:
        """Test outputs of an LLM4Rec baseline for users 1..n: trained (and its scores saved)
        once under ``models/``, loaded from ``outputs.safetensors`` afterwards.

        Shuffled training: trained on an in-memory copy of the data whose ``seq[:-2]`` are
        shuffled once per user (``analyses.shuffle_training_sequences``, the run's seed; its
        digest is the run's + ``+shuffled-training-seed<k>``), then scored on the original
        test sequences from the saved checkpoint (the evaluation copy carries that digest,
        so the checkpoint's dataset check passes; the candidates are the same stored ones).
        """
        key = ("llm4rec", name, seed, shuffled_training)
        if key in self._memo:
            return self._memo[key]

        spec = get_spec(name)
        d = self.out / "models" / f"{name}{'-shuffled-training' if shuffled_training else ''}-seed{seed}"
        stamp = self.baseline_stamp(name, seed, shuffled_training)
        views = stamp["views"]
        o = _read_outputs(d, views) if read_json(d / "analysis.json") == stamp else None
        if o is None:
            ds = self.training_dataset(shuffled_training)
            self.log(f"[analyze] training {d.name} ({self._budget()})")
            t = time.perf_counter()
            bf = fit_baseline(name, ds, self.run / "sasrec" if spec.needs_sasrec else None, llm=fresh_llm(self.llm),
                              progress=self.progress, log=self.log, lora=self.b_lora if spec.lora else None,
                              stage1=self.b_stage1 if spec.options_cls is not None else None, seed=seed,
                              **self.b_opts)
            fit = bf.fit
            record = baseline_record(bf)
            results = {"model": spec.display, "mode": "e2e", "valid": fit.best["metrics"], "test": fit.test,
                       "best": fit.best, "steps": fit.steps, "epochs_run": fit.epochs_run,
                       "train_seconds": round(fit.seconds, 3), "valid_users": fit.valid_users,
                       "timings": fit.timings, "baseline": record,
                       "analysis": "shuffled training: valid/test here are on the shuffled data; "
                                   "outputs.safetensors holds the original test sequences' scores"
                       if shuffled_training else "as llmsrec train --model"}
            scores = {}
            if not shuffled_training:
                scores = {v: ViewScores(*fit.test_view) if v == "test" else view_scores(fit.trainer, v, fit.item_states)
                          for v in views}  # fit_e2e already scored the test view
                results["test-shuffled"] = metrics_of(scores["test-shuffled"].scores)
            save_baseline(d, bf, record, results, force=True)
            del bf, fit
            if shuffled_training:
                ev = copy.copy(self.ds)
                ev.digest = self._sasrec_digest(True)
                llm = fresh_llm(self.llm)
                scores = baseline_scores(ev, d, views, device=self.b_opts.get("device", "cpu"),
                                         llm=None if isinstance(llm, str) else llm,
                                         batch_tokens=self.b_opts.get("batch_tokens", LLM["batch_tokens"]), expect=name)
            o = Outputs(scores={v: scores[v].scores for v in views}, reps={v: scores[v].user for v in views})
            _write_outputs(d, o)
            write_json(d / "analysis.json", stamp)
            self.seconds[d.name] = round(time.perf_counter() - t, 1)
        n = self.n
        o = Outputs(scores={v: x[:n] for v, x in o.scores.items()}, reps={v: x[:n] for v, x in o.reps.items()})
        self._memo[key] = o
        return o

    def _budget(self) -> str:
        o = self.b_opts
        parts = [f"{o.get('epochs')} epochs at most"]
        if o.get("max_steps"):
            parts.append(f"{o['max_steps']} steps at most")
        if o.get("eval_users"):
            parts.append(f"validation on {o['eval_users']} users")
        return ", ".join(parts)

    def model(self, name: str, seed: int, shuffled_training: bool = False, one_sample: bool = False) -> Outputs:
        """A model's test outputs; ``one_sample`` applies to LLM-SRec variants (see :meth:`heads`)."""
        if name == "SASRec":
            return self.sasrec(seed, shuffled_training)
        for key, display in LLM4REC.items():
            if name == display:
                return self.baseline(key, seed, shuffled_training)
        return self.llmsrec(name, seed, shuffled_training, one_sample)

    def raw_user_hidden(self, view: str) -> np.ndarray:
        """The frozen LLM's own last-layer [UserOut] states of users 1..n (whatever the heads read)."""
        with open_cache(self.cache) as c:
            return np.asarray(c.user_hidden(view), dtype=np.float32)[1 : self.n + 1]


def _read_outputs(d: Path, views) -> Outputs | None:
    """``outputs.safetensors`` of a model folder (``scores/<view>``, ``reps/<view>``), or None."""
    try:
        arrays = safetensors.numpy.load_file(str(d / OUTPUTS_FILE))
        return Outputs(scores={v: arrays[f"scores/{v}"] for v in views}, reps={v: arrays[f"reps/{v}"] for v in views})
    except Exception:  # missing, truncated or another layout: recompute
        return None


def _write_outputs(d: Path, o: Outputs) -> None:
    arrays = {**{f"scores/{v}": np.ascontiguousarray(x, dtype=np.float32) for v, x in o.scores.items()},
              **{f"reps/{v}": np.ascontiguousarray(x, dtype=np.float32) for v, x in o.reps.items()}}
    with atomic_file(d / OUTPUTS_FILE, "wb") as f:
        f.write(safetensors.numpy.save(arrays))


# --- formatting -----------------------------------------------------------------------------


def _agg(per_seed: list[dict]) -> dict:
    """{metric: {"mean", "std", "per_seed"}} from a list of per-seed metric dicts."""
    ms = A.mean_std(per_seed)
    return {k: {"mean": ms[k][0], "std": ms[k][1], "per_seed": [d[k] for d in per_seed]} for k in per_seed[0]}


def _fmt(cell: dict, digits: int = 4) -> str:
    if len(cell["per_seed"]) > 1:
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"
    return f"{cell['mean']:.{digits}f}"


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}%"


def _moves(name: str, ratio: float, what: str) -> str:
    if not math.isfinite(ratio):
        return f"{name}: change undefined ({what})"
    if abs(ratio) < 5e-4:
        return f"{name} is unchanged {what}"
    verb = "drops" if ratio < 0 else "gains"
    return f"{name} {verb} {abs(100 * ratio):.1f}% {what}"


def _ratio_cell(orig: dict, shuf: dict, metric: str) -> dict:
    rs = [A.change_ratio(o, s) for o, s in zip(orig[metric]["per_seed"], shuf[metric]["per_seed"])]
    return {"mean": float(np.mean(rs)), "std": float(np.std(rs, ddof=1)) if len(rs) > 1 else 0.0, "per_seed": rs}


def _fmt_ratio(cell: dict) -> str:
    s = f"({_pct(cell['mean'])})"
    if len(cell["per_seed"]) > 1:
        s = f"({_pct(cell['mean'])} ± {100 * cell['std']:.2f})"
    return s


def _plt():
    import matplotlib  # deferred: matplotlib takes a second to import; only the figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after choosing the Agg backend

    return plt


def _save_fig(fig, path: Path) -> None:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    _plt().close(fig)


# --- the analyses -----------------------------------------------------------------------------


class Report:
    """Computes the asked analyses and writes their JSON/markdown/PNG files and ``report.md``."""

    def __init__(self, ra: RunAnalysis):
        self.ra = ra
        self.sections: dict[str, dict] = {}

    def scope(self, views: str) -> str:
        s = self.ra.seeds
        seeds = f"seed {s[0]}" if len(s) == 1 else f"seeds {','.join(map(str, s))} (mean ± std)"
        return (f"Split: test (leave-last-out, target + {self.ra.ds.test_negatives.shape[1]} stored negatives); "
                f"{views}; {seeds}; {self.ra.n} users.")

    def _per_seed(self, name: str, view: str, shuffled_training: bool = False, rows=None,
                  one_sample: bool = False) -> dict:
        out = []
        for s in self.ra.seeds:
            sc = self.ra.model(name, s, shuffled_training, one_sample).scores[view]
            out.append(A.subset_metrics(sc, rows) if rows is not None else
                       {k: float(v) for k, v in ranking_metrics(sc).items()})
        return _agg(out)

    def _views_note(self) -> str:
        note = (f"views: original = `test`, shuffled = `test-shuffled` (the last {self.ra.window} inputs "
                f"permuted, permutation seed {self.ra.cache_seed})")
        if self.ra.llm4rec and self.ra.cache_seed != 0:
            note += "; the LLM4Rec models' shuffled view uses permutation seed 0"
        return note

    def _llm4rec_note(self) -> str:
        """Scope text of the LLM4Rec columns (empty without --llm4rec)."""
        if not self.ra.llm4rec:
            return ""
        return (f"; LLM4Rec baselines {', '.join(self.ra.llm4rec_names)}: LLM `{self.ra._llm_name()}`, "
                f"Eq. 1 in the e2e loop, budget {self.ra._budget()}")

    # 1
    def shuffled_inference(self) -> dict:
        models = ["SASRec", *VARIANTS, *self.ra.llm4rec_names]
        rows = {}
        for m in models:
            o, s = self._per_seed(m, "test"), self._per_seed(m, "test-shuffled")
            rows[m] = {"original": o, "shuffled": s, "change": {k: _ratio_cell(o, s, k) for k in METRICS}}
        md = ["| model | NDCG@10 original | NDCG@10 shuffled | change ratio | HR@10 original | HR@10 shuffled "
              "| change ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
        for m, r in rows.items():
            md.append(f"| {m} | " + " | ".join(f"{_fmt(r['original'][k])} | {_fmt(r['shuffled'][k])} | "
                                               f"{_fmt_ratio(r['change'][k])}" for k in ("NDCG@10", "HR@10")) + " |")
        md += ["", "NDCG@20 and HR@20 are in `shuffled-inference.json`."]
        plt = _plt()
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        xs = [rows[m]["original"]["NDCG@10"]["mean"] for m in models]
        ys = [rows[m]["shuffled"]["NDCG@10"]["mean"] for m in models]
        lo, hi = min(xs + ys) * 0.9, max(xs + ys) * 1.05
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="y = x")
        for m, x, y, mk in zip(models, xs, ys, "osD^vPX*hp"):
            ax.scatter([x], [y], s=45, marker=mk, label=m)
        ax.set_xlabel("NDCG@10, original test sequences")
        ax.set_ylabel("NDCG@10, shuffled test sequences")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title("Shuffled inference (cf. Fig. 1b); below y = x: order matters", fontsize=9)
        fig.tight_layout()
        _save_fig(fig, self.ra.out / "fig_shuffled_inference.png")
        ch = {m: rows[m]["change"]["NDCG@10"]["mean"] for m in models}
        line = (f"{_moves('LLM-SRec', ch['LLM-SRec'], 'in NDCG@10 under shuffled inference')}; "
                f"{_moves('SASRec', ch['SASRec'], '')}; "
                f"{_moves('w/o L_Distill, L_Uniform', ch['w/o L_Distill, L_Uniform'], '')}"
                + "".join(f"; {_moves(m, ch[m], '')}" for m in self.ra.llm4rec_names)
                + ".").replace(" ;", ";").replace(" .", ".")
        return {"json": {"rows": rows}, "md": md, "figs": ["fig_shuffled_inference.png"], "line": line,
                "scope": self.scope(self._views_note() + self._llm4rec_note())}

    # 2
    def shuffled_training(self) -> dict:
        models = ["SASRec", "LLM-SRec", "w/o L_Uniform", "w/o L_Distill, L_Uniform", *self.ra.llm4rec_names]
        rows = {}
        k_run = self.ra.prefixes
        for m in models:
            o, s = self._per_seed(m, "test"), self._per_seed(m, "test", shuffled_training=True)
            rows[m] = {"original": o, "shuffled": s}
            if k_run > 1 and m in VARIANTS:  # the change against one original sample per user
                rows[m] = {"original, K prefix samples": o, "original": self._per_seed(m, "test", one_sample=True),
                           "shuffled": s}
            rows[m]["change"] = {k: _ratio_cell(rows[m]["original"], s, k) for k in METRICS}
        md = ["| model | trained on | NDCG@10 | NDCG@20 | HR@10 | HR@20 |", "|---|---|---:|---:|---:|---:|"]
        for m, r in rows.items():
            if "original, K prefix samples" in r:
                md.append(f"| {m} | original, {k_run} prefix samples per user (the run's) | "
                          + " | ".join(_fmt(r["original, K prefix samples"][k]) for k in METRICS) + " |")
            one = ", 1 sample per user" if "original, K prefix samples" in r else ""
            md.append(f"| {m} | original{one} | " + " | ".join(_fmt(r["original"][k]) for k in METRICS) + " |")
            md.append(f"| {m} | shuffled{one} | " + " | ".join(_fmt(r["shuffled"][k]) for k in METRICS) + " |")
            md.append(f"| {m} | change ratio | " + " | ".join(_fmt_ratio(r["change"][k]) for k in METRICS) + " |")
        ch = {m: rows[m]["change"]["NDCG@10"]["mean"] for m in models}
        line = (f"{_moves('LLM-SRec trained on shuffled sequences', ch['LLM-SRec'], 'in test NDCG@10')}; "
                f"{_moves('SASRec', ch['SASRec'], '')}"
                + "".join(f"; {_moves(m, ch[m], '')}" for m in self.ra.llm4rec_names)
                + ".").replace(" ;", ";").replace(" .", ".")
        llm4rec = ""
        if self.ra.llm4rec:
            llm4rec = (f"; {', '.join(self.ra.llm4rec_names)} on the data with `seq[:-2]` shuffled once per user "
                       f"as SASRec (the run's SASRec stays their CF-SRec)"
                       + self._llm4rec_note())
        scope = self.scope(
            "evaluated on original test sequences; shuffled training: SASRec on `seq[:-2]` shuffled once "
            f"per user (seed {self.ra.cache_seed}), LLM-SRec heads on the cached `train-shuffled` view (last "
            f"{self.ra.window} inputs permuted; the distillation target is the run's SASRec on that input)"
            + (f"; the cached shuffled view holds one sample per user, so the LLM-SRec heads' change is "
               f"against heads trained on one original sample per user (the run's heads train on "
               f"{k_run} prefix samples per user, shown too)" if k_run > 1 else "")
            + llm4rec)
        return {"json": {"rows": rows}, "md": md, "line": line, "scope": scope}

    # 3
    def similarity(self) -> dict:
        rows = {}
        per = []
        for s in self.ra.seeds:
            sas = self.ra.sasrec(s)
            per.append(A.mean_cosine_similarity(sas.reps["test"], sas.reps["test-shuffled"]))
        rows["SASRec (O_u)"] = per
        per = []
        for s in self.ra.seeds:
            ll = self.ra.llmsrec("LLM-SRec", s)
            per.append(A.mean_cosine_similarity(ll.reps["test"], ll.reps["test-shuffled"]))
        rows["LLM-SRec (f_user(h_u))"] = per
        raw = A.mean_cosine_similarity(self.ra.raw_user_hidden("test"), self.ra.raw_user_hidden("test-shuffled"))
        rows["LLM-SRec (raw h_u, frozen LLM)"] = [raw] * len(self.ra.seeds)
        per = []
        for s in self.ra.seeds:
            ll = self.ra.llmsrec("w/o L_Distill, L_Uniform", s)
            per.append(A.mean_cosine_similarity(ll.reps["test"], ll.reps["test-shuffled"]))
        rows["w/o L_Distill, L_Uniform (f_user(h_u))"] = per
        for m in self.ra.llm4rec_names:
            per = []
            for s in self.ra.seeds:
                o = self.ra.model(m, s)
                per.append(A.mean_cosine_similarity(o.reps["test"], o.reps["test-shuffled"]))
            rows[f"{m} (f_user(h_u))"] = per
        cells = {m: _agg([{"cos": v} for v in vals])["cos"] for m, vals in rows.items()}
        md = ["| representation | mean cosine(original, shuffled) |", "|---|---:|"]
        md += [f"| {m} | {_fmt(c)} |" for m, c in cells.items()]
        line = (f"Shuffling the last {self.ra.window} inputs moves SASRec's O_u to cosine "
                f"{cells['SASRec (O_u)']['mean']:.3f} and LLM-SRec's f_user(h_u) to "
                f"{cells['LLM-SRec (f_user(h_u))']['mean']:.3f} of the original (the frozen LLM's raw h_u: "
                f"{raw:.3f})"
                + "".join(f"; {m}'s f_user(h_u) {cells[f'{m} (f_user(h_u))']['mean']:.3f}"
                          for m in self.ra.llm4rec_names)
                + "; lower means the representation reacts more to order.")
        return {"json": {"rows": cells}, "md": md, "line": line,
                "scope": self.scope(self._views_note() + self._llm4rec_note())}

    # 4
    def ablations(self) -> dict:
        models = ["w/o L_Distill, L_Uniform", "w/o L_Uniform", "LLM-SRec"]
        labels = {"w/o L_Distill, L_Uniform": "(a) w/o L_Distill, L_Uniform", "w/o L_Uniform": "(b) w/o L_Uniform",
                  "LLM-SRec": "(c) LLM-SRec"}
        rows = {}
        for m in models:
            o = self._per_seed(m, "test")
            si = self._per_seed(m, "test-shuffled")
            st = self._per_seed(m, "test", shuffled_training=True)
            # shuffled training has one sample per user: its reference too (see shuffled_training)
            ot = self._per_seed(m, "test", one_sample=True) if self.ra.prefixes > 1 else o
            rows[labels[m]] = {"original": o, "shuffled inference": si, "shuffled training": st,
                               "change (inference)": {k: _ratio_cell(o, si, k) for k in METRICS},
                               "change (training)": {k: _ratio_cell(ot, st, k) for k in METRICS}}
        md = ["| variant | setting | NDCG@10 | NDCG@20 | HR@10 | HR@20 |", "|---|---|---:|---:|---:|---:|"]
        for m, r in rows.items():
            for setting in ("original", "shuffled inference", "change (inference)", "shuffled training",
                            "change (training)"):
                f = _fmt_ratio if setting.startswith("change") else _fmt
                md.append(f"| {m} | {setting} | " + " | ".join(f(r[setting][k]) for k in METRICS) + " |")
        best = max(rows, key=lambda m: rows[m]["original"]["NDCG@10"]["mean"])
        line = (f"Best on original sequences: {best} (NDCG@10 {rows[best]['original']['NDCG@10']['mean']:.4f}); "
                f"shuffled-inference change: " + ", ".join(
                    f"{m.split(' ')[0]} {_pct(r['change (inference)']['NDCG@10']['mean'])}" for m, r in rows.items())
                + ".")
        return {"json": {"rows": rows}, "md": md, "line": line,
                "scope": self.scope(self._views_note() + "; shuffled training as in section 2")}

    def _grouped(self, sets: dict, models: list, title: str, fig_name: str) -> tuple[dict, list, str]:
        rows = {m: {name: self._per_seed(m, "test", rows=rws - 1) for name, rws in sets.items()} for m in models}
        md = ["| model | set | users | NDCG@10 | NDCG@20 | HR@10 | HR@20 |", "|---|---|---:|---:|---:|---:|---:|"]
        for m in models:
            for name, rws in sets.items():
                md.append(f"| {m} | {name} | {len(rws)} | " + " | ".join(_fmt(rows[m][name][k]) for k in METRICS) + " |")
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
        width = 0.8 / len(models)
        for ax, metric in zip(axes, ("NDCG@10", "HR@10")):
            for j, m in enumerate(models):
                means = [rows[m][name][metric]["mean"] for name in sets]
                stds = [rows[m][name][metric]["std"] for name in sets]
                ax.bar(np.arange(len(sets)) + j * width, means, width, yerr=stds if len(self.ra.seeds) > 1 else None,
                       label=m)
            ax.set_xticks(np.arange(len(sets)) + width * (len(models) - 1) / 2)
            ax.set_xticklabels([f"{n} ({len(r)})" for n, r in sets.items()], fontsize=8)
            ax.set_ylabel(metric)
        axes[0].legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        _save_fig(fig, self.ra.out / fig_name)
        return rows, md, fig_name

    # 5
    def transition(self) -> dict:
        n = self.ra.n
        inputs, _ = self.ra.ds.view("test")
        t = A.transition_scores([inputs[0]] + list(inputs[1 : n + 1]))
        top, rest = A.split_top_fraction(t, np.arange(1, n + 1), 0.5)
        sets = {"Transition": top, "Non-transition": rest}
        models = ["SASRec", "LLM-SRec", "w/o L_Distill, L_Uniform"]
        rows, md, fig = self._grouped(sets, models, "Transition vs non-transition users (cf. Fig. 3)",
                                      "fig_transition.png")
        g = {s: rows["LLM-SRec"][s]["NDCG@10"]["mean"] - rows["SASRec"][s]["NDCG@10"]["mean"] for s in sets}
        line = (f"LLM-SRec minus SASRec NDCG@10: {g['Transition']:+.4f} on transition users, "
                f"{g['Non-transition']:+.4f} on non-transition users (transition set: t-score >= "
                f"{t[top].min():.2f}).")
        return {"json": {"rows": rows, "t_score": {"users_top": len(top), "users_rest": len(rest),
                                                  "threshold": float(t[top].min()),
                                                  "mean_top": float(t[top].mean()), "mean_rest": float(t[rest].mean())}},
                "md": md, "figs": [fig], "line": line,
                "scope": self.scope("view: original `test`; t-score (footnote 3) with transition counts over "
                                    "all users' test input sequences `seq[:-1]`, top 50% = transition set")}

    # 6
    def warm_cold(self) -> dict:
        n = self.ra.n
        counts = np.bincount(np.concatenate([s for s in self.ra.ds.seqs[1:]]), minlength=self.ra.ds.n_items + 1)
        warm, cold = A.warm_cold_items(counts, 0.35)
        _, targets = self.ra.ds.view("test")
        tg = targets[1 : n + 1]
        users = np.arange(1, n + 1)
        sets = {"Warm": users[warm[tg]], "Cold": users[cold[tg]]}
        for k, v in sets.items():
            if len(v) == 0:
                raise InputError(f"warm-cold: no user's test target is a {k.lower()} item")
        models = ["SASRec", "LLM-SRec", "w/o L_Distill, L_Uniform"]
        rows, md, fig = self._grouped(sets, models, "Warm vs cold target items (cf. Fig. 4)", "fig_warm_cold.png")
        g = {s: rows["LLM-SRec"][s]["NDCG@10"]["mean"] - rows["SASRec"][s]["NDCG@10"]["mean"] for s in sets}
        line = (f"LLM-SRec minus SASRec NDCG@10: {g['Warm']:+.4f} for warm targets, {g['Cold']:+.4f} for cold "
                f"targets ({len(sets['Warm'])} and {len(sets['Cold'])} users).")
        return {"json": {"rows": rows, "items": {"warm": int(warm.sum()), "cold": int(cold.sum()),
                                                "warm_min_count": int(counts[warm].min()),
                                                "cold_max_count": int(counts[cold].max())}},
                "md": md, "figs": [fig], "line": line,
                "scope": self.scope("view: original `test`; items ranked by interactions in the whole prepared "
                                    "dataset, top 35% warm, bottom 35% cold; users grouped by their test target")}

    # 7
    def over_smoothing(self) -> dict:
        rows = {}
        for m in ("w/o L_Uniform", "LLM-SRec"):
            rows[m] = _agg([{"distance": A.mean_pairwise_distance(self.ra.llmsrec(m, s).reps["test"]),
                             "distance (L2-normalised)": A.mean_pairwise_distance(
                                 _normalise(self.ra.llmsrec(m, s).reps["test"]))} for s in self.ra.seeds])
        md = ["| variant | mean pairwise Euclidean distance | same, after L2 normalisation |", "|---|---:|---:|"]
        md += [f"| {m} | {_fmt(r['distance'])} | {_fmt(r['distance (L2-normalised)'])} |" for m, r in rows.items()]
        a, b = rows["LLM-SRec"]["distance"]["mean"], rows["w/o L_Uniform"]["distance"]["mean"]
        line = (f"L_Uniform {'spreads' if a > b else 'does not spread'} the user representations: mean pairwise "
                f"distance {a:.4f} with it vs {b:.4f} without.")
        return {"json": {"rows": rows}, "md": md, "line": line,
                "scope": self.scope("view: original `test`; user representations f_user(h_u)")}

    # 8
    def distillation(self) -> dict:
        rows = {}
        for m, label in (("LLM-SRec (contrastive)", "Contrastive (Eq. 10)"), ("LLM-SRec", "MSE (Eq. 2)")):
            o, s = self._per_seed(m, "test"), self._per_seed(m, "test-shuffled")
            rows[label] = {"original": o, "shuffled": s, "change": {k: _ratio_cell(o, s, k) for k in METRICS}}
        md = ["| distillation loss | setting | NDCG@10 | NDCG@20 | HR@10 | HR@20 |", "|---|---|---:|---:|---:|---:|"]
        for m, r in rows.items():
            for setting in ("original", "shuffled", "change"):
                f = _fmt_ratio if setting == "change" else _fmt
                md.append(f"| {m} | {setting} | " + " | ".join(f(r[setting][k]) for k in METRICS) + " |")
        mse, con = rows["MSE (Eq. 2)"], rows["Contrastive (Eq. 10)"]
        line = (f"MSE distillation NDCG@10 {mse['original']['NDCG@10']['mean']:.4f} vs contrastive "
                f"{con['original']['NDCG@10']['mean']:.4f}; under shuffled inference MSE changes "
                f"{_pct(mse['change']['NDCG@10']['mean'])}, contrastive {_pct(con['change']['NDCG@10']['mean'])}.")
        return {"json": {"rows": rows}, "md": md, "line": line, "scope": self.scope(self._views_note())}

    # 9
    def case_studies(self, per_category: int = 3, last: int = 5) -> dict:
        seed = self.ra.seeds[0]
        ds, n = self.ra.ds, self.ra.n
        cand = np.asarray(ds.candidates("test"), dtype=np.int64)[:n]
        top = {}
        for m in ("SASRec", "LLM-SRec"):
            top[m] = cand[np.arange(n), np.argmax(self.ra.model(m, seed).scores["test"], axis=1)]
        target = cand[:, 0]
        ok = {m: top[m] == target for m in top}
        cats = {"only LLM-SRec correct": ok["LLM-SRec"] & ~ok["SASRec"],
                "only SASRec correct": ok["SASRec"] & ~ok["LLM-SRec"]}
        counts = {"both correct": int((ok["LLM-SRec"] & ok["SASRec"]).sum()),
                  **{k: int(v.sum()) for k, v in cats.items()},
                  "both wrong": int((~ok["LLM-SRec"] & ~ok["SASRec"]).sum())}
        rng = np.random.default_rng(seed)
        inputs, _ = ds.view("test")
        cases = []
        for cat, mask in cats.items():
            rows = np.flatnonzero(mask)
            for r in np.sort(rng.choice(rows, size=min(per_category, len(rows)), replace=False)) if len(rows) else []:
                u = int(r) + 1
                cases.append({"category": cat, "user": ds.raw_users[u],
                              "history": [ds.titles[i] for i in inputs[u][-last:]],
                              "target": ds.titles[int(target[r])],
                              "SASRec top-1": ds.titles[int(top["SASRec"][r])],
                              "LLM-SRec top-1": ds.titles[int(top["LLM-SRec"][r])]})
        md = ["Top-1 agreement on the test candidates: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".", "",
              f"| case | user | last {last} history titles (oldest → newest) | target | SASRec top-1 | LLM-SRec top-1 |",
              "|---|---|---|---|---|---|"]
        esc = lambda s: str(s).replace("|", "\\|")
        for c in cases:
            md.append(f"| {c['category']} | {esc(c['user'])} | {esc(' → '.join(c['history']))} | {esc(c['target'])} | "
                      f"{esc(c['SASRec top-1'])} | {esc(c['LLM-SRec top-1'])} |")
        line = (f"Top-1 on the test candidates: LLM-SRec alone is right for {counts['only LLM-SRec correct']} users, "
                f"SASRec alone for {counts['only SASRec correct']}, both for {counts['both correct']}.")
        return {"json": {"counts": counts, "cases": cases}, "md": md, "line": line,
                "scope": f"Split: test, view original `test`; seed {seed}; {n} users; "
                         f"{per_category} users drawn per case (seed {seed})."}


def _normalise(x: np.ndarray) -> np.ndarray:
    nrm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(nrm > 0, nrm, 1)


def analyze_run(run, out=None, *, only=None, seeds=None, llm4rec=None, llm4rec_options: dict | None = None,
                llm=None, progress: bool = True, log: Callable[[str], None] = print,
                trust_remote_code: bool = False) -> dict:
    """Run the asked analyses on a run folder and write the report (``llmsrec analyze``).

    Args:
        run: folder written by ``llmsrec run``.
        out: report folder (default ``RUN/report``); created if needed, files replaced atomically.
        only: comma-separated analysis names (:data:`ANALYSES`) or None for all.
        seeds: comma-separated model seeds (default: the run's seed); with several, every
            number is a mean ± sample standard deviation over seeds.
        llm4rec: comma-separated LLM4Rec baselines (``tallrec,llara,collm,allmrec`` or
            ``all``) added to shuffled inference, shuffled training and similarity
            (:data:`LLM4REC_SECTIONS`); default none.
        llm4rec_options, llm: their budget/device options and LLM (see :class:`RunAnalysis`).
        trust_remote_code: the command's ``--trust-remote-code`` (see :class:`RunAnalysis`).
    Returns:
        ``{analysis: its JSON document}``; also written to ``OUT/<analysis>.json``.
    Raises:
        InputError: bad options (``llm4rec`` with an ``only`` that has none of
            :data:`LLM4REC_SECTIONS`) or an incomplete run folder.
    """
    run = Path(run)
    names = parse_only(only)
    baselines = parse_llm4rec(llm4rec)
    if baselines and not set(names) & set(LLM4REC_SECTIONS):
        raise InputError(f"--llm4rec: the baselines feed {', '.join(LLM4REC_SECTIONS)} only, and --only asks "
                         f"for none of them")
    out = Path(out) if out else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    ra = RunAnalysis(run, out, [], progress=progress, log=log, llm4rec=baselines,
                     llm4rec_options=llm4rec_options, llm=llm, trust_remote_code=trust_remote_code)
    ra.seeds = parse_seeds(seeds, ra.run_seed)
    views = ["test-shuffled"]
    if {"shuffled-training", "ablations"} & set(names):
        # shuffled training has one sample per user; with prefix-trained heads its reference
        # is heads trained on the train view (one original sample per user, the same window)
        views += ["train-shuffled"] + (["train"] if ra.prefixes > 1 else [])
    ra.ensure_views(views)
    rep = Report(ra)
    docs = {}
    for name in names:
        t = time.perf_counter()
        log(f"[analyze] {name}")
        sec = getattr(rep, name.replace("-", "_"))()
        doc = {"analysis": name, "title": TITLES[name], "scope": sec["scope"], "interpretation": sec["line"],
               "seeds": ra.seeds, "users": ra.n, "run": str(run), **sec["json"]}
        write_json(out / f"{name}.json", doc)
        with atomic_file(out / f"{name}.md") as f:
            f.write(_section_md(name, sec) + "\n")
        rep.sections[name] = sec
        docs[name] = doc
        log(f"  {sec['line']}  ({time.perf_counter() - t:.1f} s)")
    with atomic_file(out / "report.md") as f:
        f.write(_report_md(ra, out))
    return docs


def _section_md(name: str, sec: dict, level: int = 2) -> str:
    parts = [f"{'#' * level} {TITLES[name]}", "", sec["scope"], "", f"**{sec['line']}**", "", *sec["md"]]
    for fig in sec.get("figs", []):
        parts += ["", f"![{TITLES[name]}]({fig})"]
    return "\n".join(parts)


def _report_md(ra: RunAnalysis, out: Path) -> str:
    """``report.md`` from every ``<analysis>.json``/``.md`` in ``out`` (so ``--only`` reruns keep
    the other sections), in the paper's order."""
    prov = ra.provenance
    names = [n for n in ANALYSES if (out / f"{n}.json").is_file() and (out / f"{n}.md").is_file()]
    docs = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
    head = [
        f"# Sequence-understanding report: {ra.ds.stats.get('dataset') or ra.ds.root.name}",
        "",
        f"Run `{ra.run}`: {ra.ds.n_users:,} users, {ra.ds.n_items:,} items; LLM `{prov.get('model')}` "
        f"(frozen), SASRec teacher (frozen), f_I `{str(prov.get('f_I', '')).split(':')[0]}`, prompt "
        f"`{prov.get('template_version')}`, history window {ra.window}. Produced by `llmsrec analyze`; each "
        f"section states its split, views, seeds and number of users.",
        "",
        "## Summary",
        "",
    ]
    head += [f"- **{docs[n]['title']}**: {docs[n]['interpretation']}" for n in names]
    body = [(out / f"{n}.md").read_text().strip() for n in names]
    return "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n"
