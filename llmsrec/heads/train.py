"""Train the LLM-SRec heads on cached LLM states (cache mode) and evaluate them.

The frozen LLM and the frozen SASRec were already run by precompute, so one training
sample is a row lookup: h_u (train view, at [UserOut]), O_u (SASRec, same input), the
target's and the negatives' h_i (at [ItemOut]). Only f_user, f_item and f_CF-user train.

Protocol (paper Sec. 3 and Appendix E; authors' code where the paper is silent):
Adam lr 1e-4 with betas (0.9, 0.98) (the authors' code; the paper gives no betas),
batch 20 users, one sample per user and epoch (train view: ``seq[:-3] -> seq[-3]``),
up to 10 epochs, validation NDCG@10 on the stored validation candidates every tenth of
an epoch, early stop after 10 validations without improvement, the best-on-validation
heads kept, test evaluated once on them.

Distributed (``torchrun --nproc-per-node N -m llmsrec train ...``): data-parallel with
``DistributedDataParallel``; every rank draws the same user order and negatives from the
same seeded generator and takes a contiguous slice of each global batch, and the loss is
arranged so that the summed gradients equal those of one process on the whole batch (see
:func:`sharded_loss`). Validation is sharded over users; rank 0 evaluates the selected
heads once and writes the output folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmsrec import distributed as dd
from llmsrec.atomic import atomic_dir, write_json
from llmsrec.cache import open_cache
from llmsrec.cache.stream import SCORE_BLOCK_ROWS, BatchFeeder, RowStore, StreamedRows, available_memory, epoch_order
from llmsrec.data import load_prepared
from llmsrec.data.views import PREFIX_VIEW
from llmsrec.defaults import HEADS_TRAINING
from llmsrec.devices import mark_step, resolve_device, to_device
from llmsrec.errors import InputError
from llmsrec.heads.losses import (
    LossConfig,
    distill_contrastive_loss,
    exclusion_mask,
    full_retrieval_loss,
    retrieval_loss,
    sample_negatives,
    total_loss,
    uniformity_loss,
)
from llmsrec.heads.model import HeadsConfig, LLMSRecHeads, Prepared, check_readouts, load_heads, save_heads
from llmsrec.metrics import metrics_from_ranks, positive_ranks, ranking_metrics
from llmsrec.training import Tick, eval_points, plot_curve, train_loop, write_history

LOSS_TERMS = ("loss", "retrieval", "distill", "uniform")
EVAL_VIEWS = ("valid", "test", "valid-shuffled", "test-shuffled")
#: ``train --shuffle-buffer``'s default: rows shuffled together in memory by a streamed
#: epoch (~170 MB of float32 states and O_u at d_llm 576; a streamed epoch holds ~3 windows)
DEFAULT_SHUFFLE_BUFFER = 65_536


# --- inputs ---------------------------------------------------------------------------------


@dataclass
class CachedTensors:
    """Everything the trainer reads, in memory (filled from the HDF5 cache + dataset, or by tests).

    Attributes:
        n_items: N (item ids 1..N).
        item_hidden: float32 (N+1, d_llm), h_i at [ItemOut]; row 0 padding.
        train_hidden: float32 (U+1, d_llm), h_u of the ``train`` view.
        train_cf: float32 (U+1, d_cf), SASRec O_u of the ``train`` view input.
        train_targets: int64 (U+1,), target of the ``train`` view (0 = no sample).
        train_exclude: U+1 int arrays: items never used as training negatives for the
            user (the trainer's loader passes the training sequence ``seq[:-2]``).
        eval_hidden: view name -> float32 (U+1, d_llm) for ``valid``/``test`` (and
            optionally ``valid-shuffled``/``test-shuffled``).
        candidates: ``valid``/``test`` -> int64 (U, 1+m), rows for uid 1..U, column 0 the
            target (a shuffled view uses the candidates of its base split).
        train_users: int64 rows with a training sample; default: those with target > 0.
            With prefix samples (``prefixes`` > 1) the train arrays are indexed by sample
            row, not uid (row 0 still pads).
        provenance: free-form dict recorded in the outputs (cache provenance, digests).
        user_readout, item_readout, n_layers, n_slots: what the hidden arrays hold (see
            ``llmsrec.heads.model.HeadsConfig``); with a readout other than ``out`` the
            arrays are float32 ``(rows, T, d_llm)``.
        shuffle_buffer: streamed data only (``train_hidden``, ``train_cf`` and the
            ``eval_hidden`` views are ``llmsrec.cache.stream.StreamedRows``, read from the
            file as needed; ``out`` readouts only): rows shuffled together in memory per
            epoch (``llmsrec.cache.stream.epoch_order``; 0 = the whole view, the in-memory
            order). Ignored for in-memory arrays.
    """

    n_items: int
    item_hidden: np.ndarray
    train_hidden: np.ndarray
    train_cf: np.ndarray
    train_targets: np.ndarray
    train_exclude: list
    eval_hidden: dict
    candidates: dict
    train_users: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)
    user_readout: str = "out"
    item_readout: str = "out"
    n_layers: int = 0
    n_slots: int = 0
    shuffle_buffer: int = 0

    def __post_init__(self) -> None:
        if self.train_users is None:
            self.train_users = np.flatnonzero(np.asarray(self.train_targets) > 0).astype(np.int64)
        n_rows = len(self.train_targets)
        checks = [
            ("item_hidden", self.item_hidden.shape[0], self.n_items + 1),
            ("train_hidden", self.train_hidden.shape[0], n_rows),
            ("train_cf", self.train_cf.shape[0], n_rows),
            ("train_exclude", len(self.train_exclude), n_rows),
        ]
        n_eval = {c.shape[0] for c in self.candidates.values()}
        n_eval = n_eval.pop() + 1 if len(n_eval) == 1 else n_rows
        checks += [(f"eval_hidden[{v}]", h.shape[0], n_eval) for v, h in self.eval_hidden.items()]
        checks += [(f"candidates[{s}]", c.shape[0], n_eval - 1) for s, c in self.candidates.items()]
        for name, got, want in checks:
            if got != want:
                raise InputError(f"cached tensors: field '{name}' has {got} rows, expected {want}")
        if self.train_hidden.shape[-1] != self.item_hidden.shape[-1]:
            raise InputError("cached tensors: user and item hidden widths differ")

    @property
    def d_llm(self) -> int:
        return int(self.item_hidden.shape[-1])

    @property
    def d_cf(self) -> int:
        return int(self.train_cf.shape[1])

    @property
    def streamed(self) -> bool:
        """True when the user rows are read from the cache file as needed (:class:`StreamedRows`)."""
        return isinstance(self.train_hidden, StreamedRows) or any(
            isinstance(h, StreamedRows) for h in self.eval_hidden.values())

    @property
    def store(self) -> RowStore | None:
        """The open cache file of streamed data (its ``bytes_read``), else None."""
        for h in (self.train_hidden, *self.eval_hidden.values()):
            if isinstance(h, StreamedRows):
                return h.store
        return None


def readout_keys(kind: str) -> list[str]:
    """The cache datasets a readout ``kind`` other than ``out`` reads, in the order of its
    layout: ``out_layers`` (``layers``), then ``slots`` (``slots`` / ``soft``)."""
    return (["out_layers"] if "layers" in kind else []) + (["slots"] if "slots" in kind or "soft" in kind else [])


def readout_features(kind: str, hidden, out_layers=None, slots=None) -> np.ndarray:
    """The inputs of f_user / f_item for readout ``kind`` from the states of R rows.

    Args:
        kind: ``out``, ``layers``, ``slots``/``soft`` or ``layers+slots``/``layers+soft``.
        hidden: float ``(R, H)`` last-layer out-token states (``out``).
        out_layers: float ``(R, nL, H)``; slots: float ``(R, S, nL, H)`` (the cache's
            ``out_layers`` / ``slots``, or ``forward_readouts``'s).
    Returns:
        float32 ``(R, H)`` for ``out``, else ``(R, T, H)`` laid out as
        ``llmsrec.heads.model.ReadoutEncoder`` reads it: the nL out-token states, then the
        S x nL slot states, slot-major.
    """
    if kind == "out":
        return np.asarray(hidden, dtype=np.float32)
    given = {"out_layers": out_layers, "slots": slots}
    parts = [np.asarray(given[k]) for k in readout_keys(kind)]
    parts = [p.reshape(p.shape[0], int(np.prod(p.shape[1:-1])), p.shape[-1]) for p in parts]  # slots: (R, S x nL, H)
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def cached_features(reader, group: str, kind: str) -> np.ndarray:
    """:func:`readout_features` of every row of ``items`` or a user view of an open cache (``CacheReader``).

    Raises:
        InputError: the cache lacks the readout (``CacheReader.readouts``).
    """
    if kind == "out":
        return readout_features(kind, reader.item_hidden() if group == "items" else reader.user_hidden(group))
    # readout_features' layout, each readout read straight into its place (they are most of a
    # cache's bytes: no intermediate copies)
    keys = readout_keys(kind)
    shapes = [reader.readout_shape(group, k) for k in keys]
    widths = [int(np.prod(s[1:-1])) for s in shapes]
    out = np.empty((shapes[0][0], sum(widths), shapes[0][-1]), dtype=np.float32)
    at = 0
    for key, shape, width in zip(keys, shapes, widths):
        dest = out[:, at : at + width].reshape(shape)  # splitting the row's vector axis: a view
        assert np.shares_memory(dest, out)
        reader.readout_into(group, key, dest)
        at += width
    return out


def load_cached_tensors(ds, cache, eval_views=("valid", "test"), *, user_readout: str = "out",
                        item_readout: str = "out", prefixes: int = 1, train_view: str | None = None,
                        stream: bool | None = False, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> CachedTensors:
    """Read the cache once into memory (or open it for streamed reads), checked against the prepared dataset.

    Args:
        ds: ``PreparedDataset`` (or its folder).
        cache: HDF5 cache written by precompute (docs/cache-schema.md).
        eval_views: views to load for evaluation; ``valid``/``test`` must exist, shuffled
            ones are loaded only if present in the cache.
        user_readout, item_readout: which cached states feed f_user / f_item
            (``llmsrec.heads.model.USER_READOUTS`` / ``ITEM_READOUTS``; ``out`` is the paper's).
        prefixes: K; > 1 trains on the prefix samples ``j < K`` of the cache's
            ``train-prefix`` view instead of the ``train`` view (paper Appendix F.5).
        train_view: with ``prefixes`` 1, the view the training samples come from:
            ``train`` (default) or ``train-shuffled`` (shuffled training, paper Table 3);
            ``none`` reads no training samples (evaluation only: the train arrays hold
            just the padding row, and the cache needs no training view).
        stream: False (default): every array in memory. True: the user views' states and
            the training view's O_u stay in the file and are read as needed
            (:class:`~llmsrec.cache.stream.StreamedRows`; the item table, targets,
            candidates and histories stay in memory); ``out`` readouts and ``prefixes`` 1
            only. None: stream when :func:`should_stream` says the views do not fit.
        shuffle_buffer: streamed training's in-memory shuffle, in rows
            (:attr:`CachedTensors.shuffle_buffer`).
    Raises:
        InputError: views or rows missing, a readout or prefix count the cache does not
            have (one line naming it), the cache was built for another dataset, or
            ``stream`` True with a readout or prefix count it does not support.
    """
    ds = _as_dataset(ds)
    prefixes = int(prefixes)
    with _opened(open_cache(cache)) as reader:
        views = set(reader.views)
        eval_only = train_view == "none"
        if eval_only:
            prefixes = 1
        elif train_view not in (None, "train", "train-shuffled") or (train_view and prefixes > 1):
            raise InputError(f"train view {train_view!r}: expected train or train-shuffled, with prefixes 1")
        train_view = PREFIX_VIEW if prefixes > 1 else (train_view or "train")
        need = {"valid", "test"} & set(eval_views) if eval_only else \
            {train_view, "valid", "test"} & ({train_view} | set(eval_views))
        missing = sorted(need - views)
        if prefixes > 1 and reader.prefixes < prefixes:
            raise InputError(f"{cache}: --prefixes {prefixes} but the cache holds {reader.prefixes} prefix "
                             f"sample(s) per user (precompute with --prefixes {prefixes})")
        if missing:
            raise InputError(f"{cache}: view(s) {', '.join(missing)} missing (run precompute with them)")
        _check_dataset_digest(cache, reader.provenance, ds)
        layers = reader.readout_layers
        loaded = [v for v in eval_views if v in views] + ([] if eval_only else [train_view])
        stream = should_stream(stream, reader, loaded, user_readout=user_readout, item_readout=item_readout,
                               prefixes=prefixes)
        check_item_table_fits(reader, item_readout, cache)
        item_hidden = cached_features(reader, "items", item_readout)
        store = RowStore(cache) if stream else None
        eval_hidden = {
            v: store.rows(f"users/{v}/hidden") if stream else cached_features(reader, v, user_readout)
            for v in eval_views if v in views
        }
        if eval_only:  # the padding row only, shaped like the evaluation states
            first = next(iter(eval_hidden.values()))
            train_hidden = np.zeros((1, *first.shape[1:]), dtype=np.float32)
            train_cf = np.zeros((1, reader.item_cf().shape[1]), dtype=np.float32)
            train_targets = np.zeros(1, dtype=np.int64)
        elif stream:
            train_hidden = store.rows(f"users/{train_view}/hidden")
            train_cf = store.rows(f"users/{train_view}/cf")
            train_targets = np.asarray(reader.targets(train_view), dtype=np.int64)
        else:
            train_hidden = cached_features(reader, train_view, user_readout)
            train_cf = np.asarray(reader.user_cf(train_view), dtype=np.float32)
            train_targets = np.asarray(reader.targets(train_view), dtype=np.int64)
        train_uid = reader.prefix_uids() if prefixes > 1 else None
        k_cache = reader.prefixes
        provenance = reader.provenance if isinstance(reader.provenance, dict) else {}
    readout = dict(user_readout=user_readout, item_readout=item_readout, n_layers=len(layers),
                   n_slots=int(provenance.get("history_window", 0)) if "slots" in user_readout else 0)
    n_users_cached = next(iter(eval_hidden.values())).shape[0] if eval_hidden else train_hidden.shape[0]
    if item_hidden.shape[0] != ds.n_items + 1 or n_users_cached != ds.n_users + 1:
        raise InputError(
            f"{cache}: has {item_hidden.shape[0] - 1} items / {n_users_cached - 1} users, "
            f"dataset {ds.root} has {ds.n_items} / {ds.n_users}"
        )
    inputs, targets = ds.view("train")
    # a cache built with precompute --max-users M holds prompts for users 1..M only: train
    # and evaluate on those (recorded in the results' provenance)
    n = ds.n_users
    if isinstance(provenance.get("max_users"), int):
        n = min(n, int(provenance["max_users"]))
    exclude = [np.zeros(0, dtype=np.int64)] + [np.array(s[:-2], dtype=np.int64) for s in ds.seqs[1 : n + 1]]
    if eval_only:
        exclude, train_users = exclude[:1], np.zeros(0, dtype=np.int64)
    elif train_uid is None:
        if not np.array_equal(np.asarray(targets[: n + 1], dtype=np.int64), train_targets[: n + 1]):
            raise InputError(f"{cache}: /users/{train_view}/target differs from the dataset's train view")
        train_users = np.array([u for u in range(1, n + 1) if len(inputs[u]) > 0 and targets[u] > 0],
                               dtype=np.int64)
        train_hidden, train_cf, train_targets = train_hidden[: n + 1], train_cf[: n + 1], train_targets[: n + 1]
    else:
        # prefix samples j < K of users 1..n; row 0 stays the padding row
        r = np.arange(len(train_targets))
        keep = np.concatenate([[0], r[(r > 0) & ((r - 1) % k_cache < prefixes) & (train_uid <= n)
                                      & (train_targets > 0)]])
        if len(keep) < len(r):  # (every row kept: no copy of the view, most of a cache's bytes)
            train_hidden, train_cf, train_targets = train_hidden[keep], train_cf[keep], train_targets[keep]
        sample_uid = train_uid[keep]
        for row in range(1, len(keep)):  # sample j's target is the user's item seq[-3-j]
            u, j = int(sample_uid[row]), int((keep[row] - 1) % k_cache)
            if train_targets[row] != ds.seqs[u][-3 - j]:
                raise InputError(f"{cache}: /users/{PREFIX_VIEW}/target row {keep[row]} is not user {u}'s "
                                 f"item seq[-{3 + j}] (a cache of another dataset?)")
        exclude = [exclude[int(u)] if u else exclude[0] for u in sample_uid]
        train_users = np.arange(1, len(keep), dtype=np.int64)
    candidates = {s: np.asarray(ds.candidates(s), dtype=np.int64)[:n] for s in ("valid", "test")}
    eval_hidden = {v: h[: n + 1] for v, h in eval_hidden.items()}
    return CachedTensors(
        n_items=ds.n_items,
        item_hidden=item_hidden,
        train_hidden=train_hidden,
        train_cf=train_cf,
        train_targets=train_targets,
        train_exclude=exclude,
        eval_hidden=eval_hidden,
        candidates=candidates,
        train_users=train_users,
        provenance={"cache": str(Path(cache).resolve()), "cache_provenance": provenance, "dataset_digest": ds.digest,
                    "users": n, "prefixes": prefixes, "train_samples": int(len(train_users))},
        shuffle_buffer=int(shuffle_buffer) if stream else 0,
        **readout,
    )


def check_item_table_fits(reader, item_readout: str, cache) -> None:
    """Refuse, before reading it, an item table larger than the memory available now.

    The item table (f_item's input: float32 ``(N+1, d_llm)``, or ``(N+1, T_i, d_llm)`` for the
    richer readouts) is always held in memory, streamed or not (docs/scaling.md): a catalogue
    whose table does not fit is one line here instead of an out-of-memory kill later.

    Raises:
        InputError: the table's bytes exceed ``llmsrec.cache.stream.available_memory()`` (when
            known), naming both sizes.
    """
    if item_readout == "out":
        shapes = [reader.f["items"]["hidden"].shape]
    else:
        shapes = [reader.readout_shape("items", k) for k in readout_keys(item_readout)]
    need = sum(4 * int(np.prod(sh)) for sh in shapes)
    avail = available_memory()
    if avail and need > avail:
        raise InputError(f"{cache}: the item table ({shapes[0][0] - 1:,} items, readout {item_readout}) needs "
                         f"{need / 1e9:.1f} GB of memory and {avail / 1e9:.1f} GB are available; it is held in "
                         f"memory, not streamed (docs/scaling.md): use a machine with more memory")


def should_stream(stream: bool | None, reader, views, *, user_readout: str = "out", item_readout: str = "out",
                  prefixes: int = 1, ranks: int | None = None) -> bool:
    """Whether :func:`load_cached_tensors` streams the user views ``views`` of an open cache.

    Args:
        stream: True / False: as asked. None (automatic): True when the float32 states and
            O_u of ``views``, times the processes on this machine (``ranks``, default the
            torchrun world size or 1), exceed half the memory available now
            (``llmsrec.cache.stream.available_memory``) and streaming supports the options;
            in a process group, rank 0's answer, broadcast (all ranks must call it).
        user_readout, item_readout, prefixes: streaming supports ``out`` readouts and
            ``prefixes`` 1 (the richer readouts are ``(rows, T, d_llm)`` per user and stay
            in memory).
    Raises:
        InputError: ``stream`` True with options streaming does not support (one line).
    """
    if stream is False:
        return False
    why_not = None
    if user_readout != "out" or item_readout != "out":
        why_not = f"readouts {user_readout}/{item_readout} (streamed reads support the out readout only)"
    elif prefixes != 1:
        why_not = f"--prefixes {prefixes} (streamed reads support one training sample per user)"
    if stream is True:
        if why_not:
            raise InputError(f"--stream: {why_not}; train in memory (--in-memory)")
        return True
    if why_not:
        return False
    need = 0
    for v in views:
        g = reader.f["users"][v]
        need += 4 * int(np.prod(g["hidden"].shape)) + (4 * int(np.prod(g["cf"].shape)) if "cf" in g else 0)
    if ranks is None:
        env = dd.dist_env()
        ranks = env[1] if env else 1
    avail = available_memory()
    decision = avail > 0 and need * ranks > avail // 2
    if dd.active() is not None:  # rank 0's decision: every rank must take the same path (collectives)
        decision = bool(dd.broadcast_json(decision))
    return decision


def _as_dataset(ds):
    if isinstance(ds, (str, Path)):
        return load_prepared(ds)
    return ds


class _opened:
    """Context manager that closes a reader if it has ``close`` (works for any reader)."""

    def __init__(self, obj):
        self.obj = obj

    def __enter__(self):
        return self.obj.__enter__() if hasattr(self.obj, "__enter__") else self.obj

    def __exit__(self, *exc):
        if hasattr(self.obj, "__exit__"):
            return self.obj.__exit__(*exc)
        if hasattr(self.obj, "close"):
            self.obj.close()
        return False


def _check_dataset_digest(cache, provenance, ds) -> None:
    if not isinstance(provenance, dict):
        return
    for key in ("dataset_sha256", "dataset_digest", "dataset"):
        v = provenance.get(key)
        if isinstance(v, dict):
            v = v.get("digest")
        if isinstance(v, str) and v and getattr(ds, "digest", None) and v != ds.digest:
            raise InputError(
                f"{cache}: provenance field '{key}' is {v[:12]}..., but dataset {ds.root} has "
                f"digest {ds.digest[:12]}... (rebuild the cache for this dataset)"
            )


# --- options --------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every knob of the heads trainer (CLI ``llmsrec train`` options map 1:1 onto these;
    the defaults are ``llmsrec.defaults.HEADS_TRAINING``, which the CLI shows).

    Attributes:
        seed: seeds weight init (torch) and user order + negatives (numpy).
        epochs: maximum epochs (paper: 10; default 30 because ml-100k has 943 users, i.e.
            48 steps per epoch against ~600 on the paper's data).
        batch_size: users per step (paper: 20).
        lr: Adam learning rate (paper: 1e-4); beta1, beta2: Adam betas (authors' code:
            0.9, 0.98); weight_decay: Adam L2 (0).
        lr_decay: lr multiplied by this after every validation (authors' code: 0.95;
            1.0 = constant, the paper's description).
        train_negatives: sampled negatives per user for Eq. 1 (authors' code: 3), or
            "all" (default) for a softmax over the whole catalogue minus the user's
            history: with item states cached it costs little, and on ml-100k it gave
            validation NDCG@10 0.2905 vs 0.2761 for 3 negatives (mean of seeds 0-2).
        evals_per_epoch: validations per epoch (paper: 10, every tenth of an epoch).
        patience: early stop after this many validations without improvement (paper: 10;
            default 20, with the longer epoch budget).
        select_metric: validation metric for selection and early stopping.
        hidden, d_out, cf_hidden: head widths (paper: 2048, 128, 128).
        distill, uniform, retrieval_weight, distill_weight, uniform_weight,
        contrastive_temperature: see :class:`~llmsrec.heads.losses.LossConfig`.
        prefixes: K prefix training samples per user (paper Appendix F.5; 1 = the paper's
            one sample, the ``train`` view); needs a cache precomputed with >= K.
        user_readout, item_readout: the cached states the heads read
            (``llmsrec.heads.model.HeadsConfig``; ``out`` = the paper's).
    """

    seed: int = 0
    epochs: int = HEADS_TRAINING["epochs"]
    batch_size: int = HEADS_TRAINING["batch_size"]
    lr: float = HEADS_TRAINING["lr"]
    beta1: float = HEADS_TRAINING["beta1"]
    beta2: float = HEADS_TRAINING["beta2"]
    weight_decay: float = HEADS_TRAINING["weight_decay"]
    lr_decay: float = HEADS_TRAINING["lr_decay"]
    train_negatives: int | str = HEADS_TRAINING["train_negatives"]
    evals_per_epoch: int = HEADS_TRAINING["evals_per_epoch"]
    patience: int = HEADS_TRAINING["patience"]
    select_metric: str = HEADS_TRAINING["select_metric"]
    hidden: int = HEADS_TRAINING["hidden"]
    d_out: int = HEADS_TRAINING["d_out"]
    cf_hidden: int = HEADS_TRAINING["cf_hidden"]
    distill: str = HEADS_TRAINING["distill"]
    uniform: bool = True
    retrieval_weight: float = HEADS_TRAINING["retrieval_weight"]
    distill_weight: float = HEADS_TRAINING["distill_weight"]
    uniform_weight: float = HEADS_TRAINING["uniform_weight"]
    contrastive_temperature: float = HEADS_TRAINING["contrastive_temperature"]
    prefixes: int = 1
    user_readout: str = "out"
    item_readout: str = "out"

    def __post_init__(self) -> None:
        self._check_types()
        if self.prefixes < 1:
            raise InputError(f"--prefixes {self.prefixes}: must be >= 1")
        check_readouts(self.user_readout, self.item_readout)
        tn = self.train_negatives
        if isinstance(tn, str) and tn != "all":
            try:
                tn = int(tn)
            except ValueError:
                raise InputError(f"--train-negatives: expected a positive integer or 'all', got {tn!r}") from None
        if not isinstance(tn, str) and tn < 1:
            raise InputError(f"--train-negatives: expected a positive integer or 'all', got "
                             f"{self.train_negatives!r}")
        self.train_negatives = tn
        for name in ("epochs", "batch_size", "evals_per_epoch", "patience"):
            if getattr(self, name) < 1:
                raise InputError(f"train config: field '{name}' must be >= 1")
        if self.select_metric not in ("NDCG@10", "HR@10", "NDCG@20", "HR@20"):
            raise InputError(f"train config: unknown select_metric {self.select_metric!r}")
        if not (self.lr > 0 and 0 < self.lr_decay <= 1):
            raise InputError("train config: lr must be > 0 and lr_decay in (0, 1]")
        self.loss_config()  # validates the loss fields

    def _check_types(self) -> None:
        """Reject values of the wrong type or range (options also arrive from sweep TOML files)."""
        for f in fields(self):
            v, kind = getattr(self, f.name), str(f.type)
            if kind == "bool":
                ok = isinstance(v, bool)
            elif kind == "int":
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif kind == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            elif kind == "str":
                ok = isinstance(v, str)
            else:  # train_negatives: int | str, checked below
                ok = isinstance(v, (int, str)) and not isinstance(v, bool)
            if not ok:
                raise InputError(f"train config: field '{f.name}' expects {kind}, got {v!r}")
        if self.seed < 0:
            raise InputError("train config: field 'seed' must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"train config: field '{name}' must be in [0, 1)")
        for name in ("weight_decay", "retrieval_weight", "distill_weight", "uniform_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"train config: field '{name}' must be >= 0")
        for name in ("hidden", "d_out", "cf_hidden"):
            if getattr(self, name) < 1:
                raise InputError(f"train config: field '{name}' must be >= 1")

    def loss_config(self) -> LossConfig:
        return LossConfig(
            distill=self.distill,
            uniform=self.uniform,
            retrieval_weight=self.retrieval_weight,
            distill_weight=self.distill_weight,
            uniform_weight=self.uniform_weight,
            contrastive_temperature=self.contrastive_temperature,
        )

    @classmethod
    def from_options(cls, **opts: Any) -> "TrainConfig":
        """Build from keyword options, ignoring ``None`` values; unknown names are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise InputError(f"train options: unknown option(s) {', '.join(unknown)}")
        return cls(**{k: v for k, v in opts.items() if v is not None})


# --- evaluation -----------------------------------------------------------------------------


def _states(x, dev=None):
    """Cached states as the heads read them: a :class:`~llmsrec.heads.model.Prepared` as it is,
    anything else as a tensor; on ``dev`` when given."""
    x = x if isinstance(x, Prepared) else torch.as_tensor(x)
    return x if dev is None else x.to(dev)


def _rows(x, idx):
    """Rows ``idx`` of a state tensor or of a :class:`~llmsrec.heads.model.Prepared`."""
    return x.rows(idx) if isinstance(x, Prepared) else x[idx]


#: in-memory scoring handles at most this many users at once (the (users, C, d') candidate
#: embeddings of a block: ~3.4 GB at 101 candidates x d' 128); views up to it are scored in one
#: piece, as before
IN_MEMORY_SCORE_BLOCK = 65_536


@torch.no_grad()
def _score_rows(heads: LLMSRecHeads, user_rows, item_hidden, candidates) -> torch.Tensor:
    """(n, C) scores on the heads' device for n users' states (n, d_llm) and candidates (n, C),
    in blocks of :data:`IN_MEMORY_SCORE_BLOCK` users when n is larger."""
    dev = next(heads.parameters()).device
    was_training = heads.training
    heads.eval()
    items = heads.item(_states(item_hidden, dev))
    n = len(candidates)
    parts = []
    for a in range(0, n, IN_MEMORY_SCORE_BLOCK) if n > IN_MEMORY_SCORE_BLOCK else [None]:
        rows = user_rows if a is None else _rows(user_rows, slice(a, a + IN_MEMORY_SCORE_BLOCK))
        users = heads.user(_states(rows, dev))
        cand = torch.as_tensor(candidates if a is None else candidates[a : a + IN_MEMORY_SCORE_BLOCK]).to(dev)
        parts.append(torch.einsum("ucd,ud->uc", items[cand], users))
    heads.train(was_training)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def score_candidates(heads: LLMSRecHeads, user_hidden, item_hidden, candidates) -> np.ndarray:
    """Scores s(u, i) = f_item(h_i) . f_user(h_u) of every user's candidates.

    Computed on the heads' device (inputs are moved there).

    Args:
        user_hidden: float32 (U+1, d_llm) (row 0 unused) or torch tensor, richer readouts
            (U+1, T_u, d_llm); or its ``heads.prepare_user`` (the same scores).
        item_hidden: float32 (N+1, d_llm) or (N+1, T_i, d_llm), or its ``heads.prepare_item``.
        candidates: int64 (U, C), row r for uid r+1.
        A :class:`~llmsrec.cache.stream.StreamedRows` ``user_hidden`` is scored block by
        block as it is read (the (U, C) result is still whole: for large U use
        :func:`streamed_metrics`).
    Returns:
        float32 (U, C) numpy scores, column 0 the target.
    """
    if isinstance(user_hidden, StreamedRows):
        n = int(candidates.shape[0])
        parts = [_score_rows(heads, torch.from_numpy(h), item_hidden, np.asarray(candidates[s - 1 : s - 1 + len(h)]))
                 .cpu().numpy() for s, h in user_hidden.blocks(1, 1 + n)]
        return np.concatenate(parts) if parts else np.zeros((0, candidates.shape[1]), dtype=np.float32)
    return _score_rows(heads, _rows(_states(user_hidden), slice(1, None)), item_hidden, candidates).cpu().numpy()


@torch.no_grad()
def streamed_metrics(heads: LLMSRecHeads, user_rows: StreamedRows, item_hidden, candidates, rank: int = 0,
                     world: int = 1, block_rows: int = SCORE_BLOCK_ROWS) -> dict[str, float]:
    """``ranking_metrics`` of the candidates' scores with the user states read block by block.

    The same numbers as ``ranking_metrics(score_candidates(...))`` on the whole view (each
    user's rank depends on its own row only), in memory bounded by one block: only the
    positives' ranks (int64, U) are kept. Distributed (``world`` > 1): rank ``rank`` reads
    and scores only its users ``llmsrec.distributed.shard(U, rank, world)`` and the ranks
    are all-gathered, so every rank returns the same metrics.

    Args:
        user_rows: the view's ``(U+1, d_llm)`` states (row 0 unused), streamed.
        item_hidden: float32 ``(N+1, d_llm)`` (or prepared) item states, in memory.
        candidates: int64 ``(U, C)`` (anything sliceable by rows), row r for uid r+1.
        block_rows: users read and scored at once.
    Returns:
        ``{"NDCG@10", "NDCG@20", "HR@10", "HR@20"}`` floats.
    Raises:
        ValueError: NaN/inf scores (``positive_ranks``).
    """
    n = int(candidates.shape[0])
    lo, hi = dd.shard(n, rank, world)
    dev = next(heads.parameters()).device
    was_training = heads.training
    heads.eval()
    items = heads.item(_states(item_hidden, dev))
    ranks = np.zeros(hi - lo, dtype=np.int64)
    try:
        for s, h in user_rows.blocks(1 + lo, 1 + hi, block_rows):
            users = heads.user(torch.from_numpy(h).to(dev))
            cand = torch.as_tensor(np.asarray(candidates[s - 1 : s - 1 + len(h)], dtype=np.int64)).to(dev)
            scores = torch.einsum("ucd,ud->uc", items[cand], users)
            ranks[s - 1 - lo : s - 1 - lo + len(h)] = positive_ranks(scores.cpu().numpy())
    finally:
        heads.train(was_training)
    if world > 1:
        ranks = dd.all_gather_rows(torch.from_numpy(ranks).to(dd.comm_device()), n).cpu().numpy()
    return {k: float(v) for k, v in metrics_from_ranks(ranks).items()}


def streamed_epoch(data: CachedTensors, users: np.ndarray, rng: np.random.Generator, batch_size: int,
                   rank: int = 0, world: int = 1, with_cf: bool = True):
    """One streamed epoch's user order and its reader (what :func:`fit_heads` uses for
    streamed ``data``).

    Args:
        users: int64 training rows; rng: the trainer's generator (draws the order:
            ``llmsrec.cache.stream.epoch_order`` with ``data.shuffle_buffer``).
        batch_size: the global batch; rank, world: this process's slice
            (``llmsrec.distributed.shard``) of every batch is all it reads.
        with_cf: also read O_u (``train_cf``; not needed without L_Distill).
    Returns:
        ``(order, batches)``: int64 ``(len(users),)`` and a generator yielding, per batch,
        ``(h_u,)`` or ``(h_u, O_u)`` float32 arrays of this rank's rows, read on a
        background thread about ``shuffle_buffer / world`` rows ahead (the whole epoch's
        rows at once when the buffer covers the view).
    """
    h = data.train_hidden
    order = epoch_order(users, h.chunk_rows, data.shuffle_buffer, rng)
    local = []
    for b in range(math.ceil(len(order) / batch_size)):
        batch = order[b * batch_size : (b + 1) * batch_size]
        lo, hi = dd.shard(len(batch), rank, world)
        local.append(batch[lo:hi])
    buf = data.shuffle_buffer if 0 < data.shuffle_buffer < len(order) else len(order)
    sources = [h, data.train_cf] if with_cf else [h]
    return order, iter(BatchFeeder(sources, local, group_rows=max(1, buf // world)))


def _score_sharded(heads: LLMSRecHeads, user_hidden, item_hidden, candidates, rank: int, world: int) -> np.ndarray:
    """:func:`score_candidates` with the users split over the ranks and the rows gathered on all."""
    n = int(candidates.shape[0])
    lo, hi = dd.shard(n, rank, world)
    s = _score_rows(heads, _rows(_states(user_hidden), slice(1 + lo, 1 + hi)), item_hidden, candidates[lo:hi])
    return dd.all_gather_rows(s.to(dd.comm_device()), n).cpu().numpy()


def evaluate_on_tensors(heads: LLMSRecHeads, data: CachedTensors, views=("valid", "test")) -> dict:
    """NDCG@10/20 and HR@10/20 (``ranking_metrics``) for each requested view present in ``data``."""
    out = {}
    for v in views:
        if v not in data.eval_hidden:
            continue
        split = v.split("-")[0]
        if isinstance(data.eval_hidden[v], StreamedRows):  # block by block, ranks only
            out[v] = streamed_metrics(heads, data.eval_hidden[v], data.item_hidden, data.candidates[split])
            continue
        s = score_candidates(heads, data.eval_hidden[v], data.item_hidden, data.candidates[split])
        out[v] = {k: float(x) for k, x in ranking_metrics(s).items()}
    return out


def evaluate_heads(ds, cache, heads_dir, views=("valid", "test"), stream: bool | None = None) -> dict:
    """Evaluate saved heads on the cache: ``{"valid": {...}, "test": {...}}`` (metric -> value).

    Args:
        ds: ``PreparedDataset`` or its folder; cache: HDF5 cache path; heads_dir: folder
            written by :func:`train_heads`.
        views: any of ``valid test valid-shuffled test-shuffled`` (shuffled ones only if
            the cache has them).
        stream: score the views block by block as they are read (True), in memory
            (False), or as :func:`should_stream` decides (None).
    Raises:
        InputError: missing/mismatched checkpoint or cache.
    """
    heads = load_heads(heads_dir)
    # no training samples: the cache may lack the training views (e.g. another dataset's cache
    # built for evaluation only, `llmsrec transfer`)
    data = load_cached_tensors(ds, cache, eval_views=tuple(views), user_readout=heads.config.user_readout,
                               item_readout=heads.config.item_readout, train_view="none", stream=stream)
    if heads.config.d_llm != data.d_llm or heads.config.d_cf != data.d_cf:
        raise InputError(
            f"{heads_dir}: heads expect d_llm={heads.config.d_llm}, d_cf={heads.config.d_cf}; "
            f"cache {cache} has {data.d_llm}, {data.d_cf}"
        )
    return evaluate_on_tensors(heads, data, views)


def evaluate_heads_checkpoint(ds, checkpoint, device: str = "cpu", cache=None) -> dict:
    """``llmsrec evaluate --model llmsrec``: :func:`evaluate_heads` with the cache defaulting to
    the one recorded in the checkpoint's ``heads_config.json`` (scoring runs on CPU tensors;
    ``device`` is accepted for the common evaluator signature).

    Raises:
        InputError: no ``cache`` given and none recorded, or see :func:`evaluate_heads`.
    """
    if cache is None:
        try:
            doc = json.loads((Path(checkpoint) / "heads_config.json").read_text())
            cache = doc["provenance"]["cache"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{checkpoint}: no cache recorded in heads_config.json; pass --cache") from None
    return evaluate_heads(ds, cache, checkpoint)


# --- training -------------------------------------------------------------------------------


@dataclass
class FitResult:
    """What :func:`fit_heads` returns: the best heads (eval mode) and the training record."""

    heads: LLMSRecHeads
    history: list
    best: dict
    steps: int
    epochs_run: float
    stopped_early: bool
    seconds: float  # training wall time (steps and validations), s; the final test is not in it
    step_seconds: float = 0.0  # of which the training steps, s
    validation_seconds: float = 0.0  # of which the validations, s

    def record(self) -> dict:
        """The training record every ``results.json`` of the heads, e2e mode and the LLM4Rec
        baselines holds: ``best``, ``steps``, ``epochs_run``, ``stopped_early``, ``train_seconds``."""
        return {"best": self.best, "steps": self.steps, "epochs_run": self.epochs_run,
                "stopped_early": self.stopped_early, "train_seconds": round(self.seconds, 3)}


class _HeadsForward(torch.nn.Module):
    """The three heads in one ``forward`` (what ``DistributedDataParallel`` wraps): f_user of
    the users' h_u, f_item of the item states, f_CF-user of O_u (None when not given)."""

    def __init__(self, heads: LLMSRecHeads):
        super().__init__()
        self.heads = heads

    def forward(self, h_users, h_items, o_users=None):
        u = self.heads.user(h_users)
        items = self.heads.item(h_items)
        cfu = self.heads.cf_user(o_users) if o_users is not None else None
        return u, items, cfu


def sharded_loss(
    user: torch.Tensor, items: torch.Tensor, cf_user: torch.Tensor | None, targets: torch.Tensor,
    mask: torch.Tensor | None, n: int, lo: int, hi: int, cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """This rank's share of Eq. 4 for rows ``[lo, hi)`` of a global batch of ``n`` users.

    The share is built so that the gradients of all ranks' shares, summed, are exactly
    the gradients of :func:`~llmsrec.heads.losses.total_loss` on the whole batch in one
    process (up to float rounding); the trainer backpropagates ``world_size x share``
    because ``DistributedDataParallel`` averages gradients over ranks.

    - Per-user terms (L_Retrieval, Eq. 1, either form; the MSE L_Distill, Eq. 2) are summed
      over the local rows and divided by the *global* batch size ``n`` (Eq. 2: by
      ``n x d'``), so the shares add up to the global mean.
    - Batch-coupled terms (L_Uniform, Eq. 3, over all pairs of the batch; the in-batch
      contrastive L_Distill, Eq. 10) are computed on the whole batch: the outputs of the
      other ranks are all-gathered *without* gradient, this rank's rows are put back as the
      live tensors, and the global loss is evaluated on that mix. Its gradient reaches only
      the local rows and equals the global loss's partial derivative there; summed over
      ranks this is the full gradient. (An all_gather with gradient would give the same
      sum, but needs equal row counts on every rank.)

    Args:
        user: (b, d') f_user(h_u) of the local rows, b = hi - lo (may be 0).
        items: full catalogue (``mask`` given): (N+1, d') f_item of every item; sampled
            negatives: (b, 1+K, d') f_item of the target and the negatives.
        cf_user: (b, d') f_CF-user(O_u), or None when ``cfg.distill == "none"``.
        targets: int64 (b,) target iids (full catalogue only; unused otherwise).
        mask: bool (b, N+1) :func:`~llmsrec.heads.losses.exclusion_mask`, or None for the
            sampled form.
        n, lo, hi: global batch size and this rank's rows (``llmsrec.distributed.shard``).
        cfg: which terms and weights.
    Returns:
        (this rank's share, scalar tensor; the global terms ``{"loss", "retrieval",
        "distill", "uniform"}`` as floats, identical on every rank).
    """
    import torch.distributed as dist

    if mask is not None:
        logits = (user @ items.T).masked_fill(mask, float("-inf"))
        r_sum = F.cross_entropy(logits, targets, reduction="sum")
    else:
        logits = torch.cat([(user * items[:, 0]).sum(-1, keepdim=True),
                            torch.einsum("bkd,bd->bk", items[:, 1:], user)], 1)
        r_sum = F.cross_entropy(logits, torch.zeros(len(user), dtype=torch.long, device=user.device),
                                reduction="sum")
    share = cfg.retrieval_weight * r_sum / n
    sums = [r_sum.detach().float()]
    d_out = user.shape[1]
    if cfg.uniform or cfg.distill == "contrastive":
        z = user if cf_user is None else torch.cat([user, cf_user], 1)
        z_all = dd.all_gather_rows(z.to(dd.comm_device()), n).to(z.device)
        z_mix = torch.cat([z_all[:lo], z, z_all[hi:]])
        u_mix, c_mix = z_mix[:, :d_out], z_mix[:, d_out:]
    distill = uniform = None
    if cfg.distill == "mse":
        d_sum = (F.normalize(user, dim=-1) - F.normalize(cf_user, dim=-1)).pow(2).sum()
        share = share + cfg.distill_weight * d_sum / (n * d_out)
        sums.append(d_sum.detach().float())
    elif cfg.distill == "contrastive":
        distill = distill_contrastive_loss(u_mix, c_mix, cfg.contrastive_temperature)
        share = share + cfg.distill_weight * distill
    if cfg.uniform:
        uniform = uniformity_loss(u_mix)
        if cfg.distill != "none":
            uniform = uniform + uniformity_loss(c_mix)
        share = share + cfg.uniform_weight * uniform
    total = torch.stack(sums).to(dd.comm_device())
    dist.all_reduce(total)
    total = total.cpu()
    terms = {"retrieval": float(total[0]) / n}
    if cfg.distill == "mse":
        terms["distill"] = float(total[1]) / (n * d_out)
    else:
        terms["distill"] = float(distill.detach()) if distill is not None else 0.0
    terms["uniform"] = float(uniform.detach()) if uniform is not None else 0.0
    terms["loss"] = (cfg.retrieval_weight * terms["retrieval"]
                     + (cfg.distill_weight * terms["distill"] if cfg.distill != "none" else 0.0)
                     + (cfg.uniform_weight * terms["uniform"] if cfg.uniform else 0.0))
    return share, terms


def train_user_array(data: CachedTensors) -> np.ndarray:
    """``data.train_users`` as an int64 array ``(n_train,)``.

    Raises:
        InputError: no user has a training sample.
    """
    users = np.asarray(data.train_users, dtype=np.int64)
    if len(users) == 0:
        raise InputError("train: no user has a training sample (train view empty)")
    return users


def heads_config(data: CachedTensors, cfg: "TrainConfig") -> HeadsConfig:
    """The :class:`HeadsConfig` of heads trained with ``cfg`` on ``data``: widths from
    ``cfg``, input widths and readouts from the cache's tensors."""
    return HeadsConfig(d_llm=data.d_llm, d_cf=data.d_cf, d_out=cfg.d_out, hidden=cfg.hidden, cf_hidden=cfg.cf_hidden,
                       user_readout=data.user_readout, item_readout=data.item_readout, n_layers=data.n_layers,
                       n_slots=data.n_slots)


def fit_heads(data: CachedTensors, config: TrainConfig | None = None, progress: bool = True, *,
              device="cpu", step_dtype: str = "fp32") -> FitResult:
    """Train the heads on in-memory cached tensors (the core of ``llmsrec train``).

    Deterministic: the same ``data`` and ``config`` give identical weights on the same
    machine (torch init under ``config.seed``; user order and negatives from a numpy
    Generator seeded with it).

    Distributed when a ``torch.distributed`` process group is initialised (``train_heads``
    does it under torchrun): the heads are wrapped in ``DistributedDataParallel``; every
    rank holds the same ``data``, draws the same user order and the same negatives for the
    whole batch from the same generator, and trains on rows ``shard(B, rank, world)`` of
    each global batch of B users with :func:`sharded_loss`, so the updates equal one
    process's with the same ``batch_size`` (to float rounding). Validation scores a slice
    of the users per rank and gathers them; every rank then takes the same decisions
    (best step, early stop).

    The schedule, selection and early stopping are :func:`llmsrec.training.train_loop`'s:
    validation after the batches :func:`~llmsrec.training.eval_points` gives (every
    ``1 / evals_per_epoch`` of an epoch), the lr multiplied by ``lr_decay`` after each, a stop
    after ``patience`` validations without a better ``select_metric``; ``history`` holds one
    :func:`validation_record` per validation.

    Args:
        device: where the heads and the cached tensors live (``cpu``, ``cuda[:N]``,
            ``hpu``, or a ``torch.device``); per-step index tensors are copied from pinned
            memory on CUDA. The returned heads are on the CPU.
        step_dtype: ``fp32`` (default, exact) or ``bf16``: the training steps' forward runs
            under bfloat16 autocast (the matrix products in bfloat16 with float32
            accumulation; weights, Adam, the losses and the validations stay float32). On a
            CPU with avx512_bf16 a default-heads step is ~3.5x faster; the results differ from fp32's by
            about the seed spread (docs/results/speed.md).
    Returns:
        :class:`FitResult` with the best-on-validation heads (by ``config.select_metric``).
    Raises:
        InputError: no training users, or too few items for the negatives asked for.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    group = dd.active()
    rank, world = group or (0, 1)
    cfg = config or TrainConfig()
    lcfg = cfg.loss_config()
    users_all = train_user_array(data)
    hcfg = heads_config(data, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = LLMSRecHeads(hcfg)
    heads.to(dev)
    forward = _HeadsForward(heads)
    if group is not None:
        from torch.nn.parallel import DistributedDataParallel

        # without L_Distill f_CF-user gets no gradient: DDP must be told to expect that
        forward = DistributedDataParallel(forward, device_ids=[dev.index] if dev.type == "cuda" else None,
                                          find_unused_parameters=lcfg.distill == "none")
    rng = np.random.default_rng(cfg.seed)
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    try:  # the fused CPU kernel is ~5x faster than the per-tensor loop on these 3M parameters
        if dev.type not in ("cpu", "cuda"):
            raise TypeError("fused Adam: CPU and CUDA only")
        opt = torch.optim.Adam(heads.parameters(), fused=True, **adam)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(heads.parameters(), **adam)

    def on_dev(a, dtype):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(dev)

    # the states' parameter-free work (layer norms, slot masks) once, not at every step
    item_h = heads.prepare_item(on_dev(data.item_hidden, np.float32))
    streamed = data.streamed  # user rows read from the file per batch / per block
    user_h = None if streamed else heads.prepare_user(on_dev(data.train_hidden, np.float32))
    user_cf = None if streamed else on_dev(data.train_cf, np.float32)
    targets = np.asarray(data.train_targets, dtype=np.int64)
    valid_h = data.eval_hidden["valid"] if streamed else heads.prepare_user(on_dev(data.eval_hidden["valid"], np.float32))
    valid_c = data.candidates["valid"] if streamed else on_dev(data.candidates["valid"], np.int64)
    full = cfg.train_negatives == "all"
    use_cf = lcfg.distill != "none"
    feed = None  # streamed: this epoch's batches of (h_u, O_u) rows, read ahead
    low = check_step_dtype(step_dtype) == "bf16"

    n_batches = math.ceil(len(users_all) / cfg.batch_size)
    order = users_all

    def begin_epoch(epoch: int) -> None:
        nonlocal order, feed
        if streamed:
            order, feed = streamed_epoch(data, users_all, rng, cfg.batch_size, rank, world, use_cf)
        else:
            order = rng.permutation(users_all)

    def step(epoch: int, bi: int) -> dict[str, float]:
        users = order[bi * cfg.batch_size : (bi + 1) * cfg.batch_size]
        tg = targets[users]
        excl = [data.train_exclude[x] for x in users]
        # every rank draws the whole batch's negatives: the generator stays in step
        neg = None if full else sample_negatives(excl, tg, data.n_items, int(cfg.train_negatives), rng)
        lo, hi = dd.shard(len(users), rank, world)
        u_idx = to_device(torch.from_numpy(users[lo:hi]), dev)
        if full:
            h_items = item_h
        else:
            ids = np.concatenate([tg[lo:hi, None], neg[lo:hi]], axis=1)
            h_items = _rows(item_h, to_device(torch.from_numpy(ids), dev))
        if feed is not None:
            h_b, *cf_b = next(feed)
            h_u, o_u = on_dev(h_b, np.float32), (on_dev(cf_b[0], np.float32) if use_cf else None)
        else:
            h_u, o_u = _rows(user_h, u_idx), (user_cf[u_idx] if use_cf else None)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=low):
            u, e, cfu = forward(h_u, h_items, o_u)
        if low:  # the losses in float32
            u, e, cfu = u.float(), e.float(), (cfu.float() if cfu is not None else None)
        tg_t = to_device(torch.from_numpy(tg[lo:hi]), dev) if full else None
        mask = to_device(exclusion_mask(excl[lo:hi], tg[lo:hi], data.n_items), dev) if full else None
        if group is None:
            r = full_retrieval_loss(u, e, tg_t, mask) if full else retrieval_loss(u, e[:, 0], e[:, 1:])
            loss, terms = total_loss(r, u, cfu, lcfg)
        else:
            share, terms = sharded_loss(u, e, cfu, tg_t, mask, len(users), lo, hi, lcfg)
            loss = share * world  # DDP averages the ranks' gradients; the shares must add up
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark_step(dev)
        opt.step()
        mark_step(dev)
        return terms

    def validate(steps: int) -> dict[str, float]:
        try:
            if streamed:
                return streamed_metrics(heads, valid_h, item_h, valid_c, rank, world)
            s = score_candidates(heads, valid_h, item_h, valid_c) if group is None else \
                _score_sharded(heads, valid_h, item_h, valid_c, rank, world)
            return {k: float(v) for k, v in ranking_metrics(s).items()}
        except ValueError as e:  # NaN/inf scores: the heads diverged
            raise InputError(f"training diverged at step {steps}: {e}; lower --lr") from None

    def record(t: Tick) -> dict:
        return validation_record(t, opt.param_groups[0]["lr"])

    def decay_lr(_: Tick) -> None:
        for g in opt.param_groups:
            g["lr"] *= cfg.lr_decay

    heads.train()
    fit = train_loop(step, validate, heads.state_dict, record, epochs=cfg.epochs, batches=n_batches, points=eval_points(n_batches, cfg.evals_per_epoch),
                     select=cfg.select_metric, patience=cfg.patience, terms=LOSS_TERMS, begin_epoch=begin_epoch,
                     after_validation=decay_lr, progress=progress and rank == 0)
    if feed is not None:
        feed.close()  # an epoch cut short by early stopping: stop its reader
    heads.load_state_dict(fit.state)
    heads.cpu().eval()
    return FitResult(heads, fit.history, fit.best, fit.steps, round(float(fit.epochs_run), 4), fit.stopped_early,
                     fit.seconds, fit.step_seconds, fit.validation_seconds)


STEP_DTYPES = ("fp32", "bf16")


def check_step_dtype(step_dtype: str) -> str:
    """``step_dtype`` if it is one of :data:`STEP_DTYPES`, else InputError naming ``--step-dtype``."""
    if step_dtype not in STEP_DTYPES:
        raise InputError(f"--step-dtype {step_dtype!r}: expected one of {', '.join(STEP_DTYPES)}")
    return step_dtype


def validation_record(t: Tick, lr: float) -> dict:
    """The ``history.jsonl`` line of a validation, as cache mode, e2e mode and the LLM4Rec
    baselines write it: ``validation`` (1-based count), ``step``, ``epoch`` (fractional),
    ``lr`` (before this validation's decay), the mean of each loss term (:data:`LOSS_TERMS`)
    since the previous validation, the validation metrics, ``seconds`` since training
    started, and ``best`` (this validation is the best so far)."""
    return {"validation": t.validation, "step": t.step, "epoch": t.progress, "lr": lr, **t.terms, **t.metrics,
            "seconds": round(t.seconds, 3), "best": t.improved}


def plot_history(history: list[dict], path, title: str = "LLM-SRec heads") -> None:
    """Training curve like the paper's Figure 7: the loss terms (:data:`LOSS_TERMS`) and the
    validation NDCG@10/HR@10 of ``history`` (:func:`validation_record` lines) against the
    step, written as a PNG to ``path`` (:func:`llmsrec.training.plot_curve`)."""
    plot_curve(history, path, title, LOSS_TERMS)


def train_on_tensors(data: CachedTensors, out, config: TrainConfig | None = None, *, force: bool = False,
                     progress: bool = True, device="cpu", step_dtype: str = "fp32",
                     fit: FitResult | None = None) -> dict:
    """Fit on ``data``, then write the heads folder ``out`` atomically and return results.

    ``out`` gets ``heads.safetensors``, ``heads_config.json`` (head widths + training options
    + provenance), ``history.jsonl`` (one line per validation), ``training_curve.png`` and
    ``results.json`` (``valid``/``test`` metrics of the selected heads, test computed once,
    plus shuffled views if the cache had them; best step; timings).

    Distributed (a process group is initialised): :func:`fit_heads` trains data-parallel;
    rank 0 alone evaluates the selected heads and writes ``out`` (atomically), then sends
    the results to every rank, so all ranks return the same dict once ``out`` exists. It
    then also has ``"distributed": {"world_size", "backend"}``.

    Args:
        device: where the heads train (see :func:`fit_heads`); evaluation runs on the CPU.
        step_dtype: see :func:`fit_heads`; a value other than ``fp32`` is recorded in
            ``results.json`` and ``heads_config.json`` (``step_dtype``).
        fit: the :func:`fit_heads` result of this ``data`` and ``config`` when the caller
            already has it (``llmsrec sweep``'s best variant): written as it is, not trained
            again (fit_heads is deterministic, so the files are the same but for timings).
    Raises:
        InputError: ``out`` exists and not ``force``; bad options or data.
    """
    cfg = config or TrainConfig()
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    group = dd.active()
    if fit is None:
        fit = fit_heads(data, cfg, progress=progress, device=device, step_dtype=step_dtype)
    fit_bytes = bytes_read_per_rank(data)  # a collective under torchrun: every rank, before rank 0 goes on
    if group is not None and group[0] != 0:
        return dd.broadcast_json(None)
    evals = evaluate_on_tensors(fit.heads, data, EVAL_VIEWS)
    results = {
        "model": "LLM-SRec",
        **evals,
        **fit.record(),
        "train_users": int(len(data.train_users)),
        "config": asdict(cfg),
    }
    low = {"step_dtype": step_dtype} if step_dtype != "fp32" else {}  # recorded when not the exact default
    results.update(low)
    if data.streamed:  # recorded when not the in-memory default
        results["stream"] = {"shuffle_buffer": data.shuffle_buffer, "fit_bytes_read_per_rank": fit_bytes}
    if group is not None:
        import torch.distributed as dist

        results["distributed"] = {"world_size": group[1], "backend": str(dist.get_backend())}
    with atomic_dir(out, force=force) as tmp:
        save_heads(fit.heads, tmp, extra={"train": asdict(cfg), **low, "provenance": data.provenance})
        write_history(tmp / "history.jsonl", fit.history)
        plot_history(fit.history, tmp / "training_curve.png")
        write_json(tmp / "results.json", results)
    if group is not None:
        dd.broadcast_json(results)
    return results


def bytes_read_per_rank(data: CachedTensors) -> list[int] | None:
    """Bytes of user rows each rank has read from the cache so far (streamed ``data``; rows x
    stored row bytes, ``llmsrec.cache.stream.RowStore.bytes_read``), gathered from every rank
    under torchrun (a collective: all ranks call it); None for in-memory data."""
    if not data.streamed:
        return None
    mine = torch.tensor([[data.store.bytes_read]], dtype=torch.int64)
    if dd.active() is None:
        return [int(mine[0, 0])]
    world = dd.active()[1]
    return [int(x) for x in dd.all_gather_rows(mine.to(dd.comm_device()), world).cpu()[:, 0]]


def train_heads(ds, cache, out, *, force: bool = False, progress: bool = True, device: str = "cpu",
                step_dtype: str = "fp32", stream: bool | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                **opts: Any) -> dict:
    """``llmsrec train``: read the cache into memory once, train the heads, write ``out``.

    Under torchrun (``RANK``/``WORLD_SIZE`` set, ``llmsrec.distributed.dist_env``) every
    process reads the cache, joins the process group with the device's backend (gloo on
    CPU, nccl on CUDA with ``cuda`` meaning ``cuda:LOCAL_RANK``, hccl on Gaudi) and trains
    its slice of every batch (:func:`fit_heads`); the result equals one process with the
    same ``batch_size`` (global batch) to float rounding, and rank 0 writes ``out``.

    Args:
        ds: ``PreparedDataset`` or its folder.
        cache: HDF5 cache from precompute (same dataset).
        out: output folder (see :func:`train_on_tensors` for its files).
        device: where the heads train: ``cpu`` (default), ``cuda[:N]``, ``hpu``.
        step_dtype: ``fp32`` or ``bf16`` training steps (:func:`fit_heads`).
        stream: read the user views from the cache as needed instead of loading them
            (True, ``--stream``), load them (False, ``--in-memory``), or decide from their
            size and the free memory (None, default; :func:`should_stream`). Under torchrun
            a streaming rank reads only its rows of each batch and its validation users.
        shuffle_buffer: rows a streamed epoch shuffles together in memory
            (:func:`~llmsrec.cache.stream.epoch_order`; >= the training users: the
            in-memory order, and the same results as in memory).
        **opts: :class:`TrainConfig` fields (``None`` = default).
    Returns:
        The ``results.json`` dict (``valid``, ``test`` metric dicts, ...), on every rank.
    Raises:
        InputError: bad options, cache/dataset mismatch, ``out`` exists without ``force``,
            an unavailable device or distributed backend.
    """
    cfg = TrainConfig.from_options(**opts)
    check_step_dtype(step_dtype)
    if int(shuffle_buffer) < 0:
        raise InputError(f"--shuffle-buffer {shuffle_buffer}: must be >= 0 (0: the whole view)")
    if Path(out).exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    started = dd.dist_env() is not None and dd.active() is None
    if started:
        dd.init_distributed(device)
    ok = False
    try:
        data = load_cached_tensors(ds, cache, eval_views=EVAL_VIEWS, user_readout=cfg.user_readout,
                                   item_readout=cfg.item_readout, prefixes=cfg.prefixes, stream=stream,
                                   shuffle_buffer=shuffle_buffer)
        res = train_on_tensors(data, out, cfg, force=force, progress=progress, device=dd.local_device(device),
                               step_dtype=step_dtype)
        ok = True
        return res
    finally:
        if started:
            dd.shutdown_distributed(barrier=ok)
