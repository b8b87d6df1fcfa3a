"""Training, checkpoint I/O and evaluation of the CF-SRec models (SASRec, GRU4Rec, BERT4Rec, NextItNet).

One trainer serves all four (the registry :data:`MODELS`). SASRec is trained as the
LLM-SRec paper uses it (Appendix E, Kang & McAuley 2018): each user's training sequence
``seq[:-2]`` is read autoregressively (inputs ``seq[:-3]``, the target at position t is the
next item), binary cross-entropy on the target and on **one sampled negative per
position** (loss ``bce``), Adam (lr 1e-3, betas (0.9, 0.98)), batch 128 users. GRU4Rec and
NextItNet read the same autoregressive pairs with a softmax cross-entropy over all items
(loss ``ce``, as Hidasi & Karatzoglou 2018 and Yuan et al. 2019 train them); BERT4Rec
trains on the cloze task (Sun et al. 2019): masked positions of the last ``maxlen + 1``
items of the training sequence, also with ``ce``.

Unlike the authors' code, we validate every ``eval_every`` epochs on the
dataset's stored validation candidates (target + 99 negatives), select on NDCG@10, stop
after ``patience`` validations without improvement, keep the best-on-validation weights,
and evaluate test **once**, on those weights.

A checkpoint folder holds ``model.safetensors`` + ``config.json`` (``{"model": name,
**config}``; no pickle, loadable with ``safetensors`` alone); a training run folder adds
``history.jsonl`` and ``results.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from llmsrec.atomic import atomic_dir, atomic_file, write_json
from llmsrec.cfsrec.bert4rec import BERT4Rec, BERT4RecConfig, cloze_batch
from llmsrec.cfsrec.ctrl import CTRL, CTRLConfig, prepare_ctrl
from llmsrec.cfsrec.gru4rec import GRU4Rec, GRU4RecConfig
from llmsrec.cfsrec.nextitnet import NextItNet, NextItNetConfig
from llmsrec.cfsrec.sasrec import SASRec, SASRecConfig, pad_left
from llmsrec.defaults import SASREC_TRAINING
from llmsrec.errors import InputError
from llmsrec.metrics import ranking_metrics
from llmsrec.safetensors_io import check_checkpoint, save_torch
from llmsrec.training import Tick, train_loop, write_history

if TYPE_CHECKING:  # pragma: no cover
    from llmsrec.data import PreparedDataset

__all__ = [
    "MODELS",
    "ModelSpec",
    "LOSSES",
    "train_cfsrec",
    "save_cfsrec",
    "load_cfsrec",
    "evaluate_cfsrec",
    "train_sasrec",
    "save_sasrec",
    "load_sasrec",
    "evaluate_sasrec",
    "evaluate_split",
    "training_batches",
    "TrainingData",
    "train_epoch",
]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HISTORY = "history.jsonl"
RESULTS = "results.json"
SELECT_ON = "NDCG@10"
#: ``bce``: BCE on the target and one sampled negative per position (Kang & McAuley 2018);
#: ``ce``: softmax cross-entropy over all N items.
LOSSES = ("bce", "ce")


@dataclass(frozen=True)
class ModelSpec:
    """One CF-SRec of the registry.

    Attributes:
        name: registry key, ``config.json``'s ``model`` field and the CLI's ``--model``.
        display: name in tables (as in the paper's Table 6).
        model_cls, config_cls: the ``nn.Module`` and its config dataclass (first field
            ``n_items``, always a ``maxlen`` field).
        objective: ``next`` (autoregressive next item at every position) or ``cloze``.
        loss: default training loss, one of :data:`LOSSES`.
        source: the paper the model follows.
        prepare: None, or ``prepare(net, ds, data, rng, batch_size=, lr=, device=) -> dict``
            run on the fresh model before the optimizer is built (CTRL: the item text
            vectors and its optional alignment stage); its dict goes to ``results.json``
            under ``"prepare"``.
    """

    name: str
    display: str
    model_cls: type
    config_cls: type
    objective: str
    loss: str
    source: str
    prepare: Any = None

    def options(self) -> dict[str, Any]:
        """Config fields other than ``n_items`` with their defaults."""
        return {f.name: f.default for f in fields(self.config_cls) if f.name != "n_items"}


#: The CF-SRec models, in the column order of the paper's Table 6.
MODELS: dict[str, ModelSpec] = {
    "gru4rec": ModelSpec("gru4rec", "GRU4Rec", GRU4Rec, GRU4RecConfig, "next", "ce", "Hidasi et al. 2016"),
    "bert4rec": ModelSpec("bert4rec", "BERT4Rec", BERT4Rec, BERT4RecConfig, "cloze", "ce", "Sun et al. 2019"),
    "nextitnet": ModelSpec("nextitnet", "NextItNet", NextItNet, NextItNetConfig, "next", "ce", "Yuan et al. 2019"),
    "sasrec": ModelSpec("sasrec", "SASRec", SASRec, SASRecConfig, "next", "bce", "Kang & McAuley 2018"),
    # LM-based (Table 6): SASRec with its item table started from text-encoder vectors
    "ctrl": ModelSpec("ctrl", "CTRL", CTRL, CTRLConfig, "next", "bce", "Li et al. 2023", prepare_ctrl),
}


def spec_of(model: nn.Module) -> ModelSpec:
    """The :class:`ModelSpec` of a model instance.

    Raises:
        TypeError: ``model`` is not one of the registry's classes.
    """
    for spec in MODELS.values():
        if type(model) is spec.model_cls:
            return spec
    raise TypeError(f"{type(model).__name__} is not a registered CF-SRec model")


def model_spec(name: str) -> ModelSpec:
    """Look up ``name`` in :data:`MODELS`.

    Raises:
        InputError: unknown name (the message lists the known ones).
    """
    if name not in MODELS:
        raise InputError(f"unknown CF-SRec model {name!r} (expected one of {', '.join(MODELS)})")
    return MODELS[name]


# --- checkpoint I/O -----------------------------------------------------------------------


def save_cfsrec(model: nn.Module, directory: str | Path) -> None:
    """Write ``model.safetensors`` (all parameters, float32) and ``config.json`` into ``directory``.

    Works for every model of :data:`MODELS`. Each file is written atomically;
    ``directory`` is created if missing. ``config.json`` = ``{"model": name, **config
    fields}``; the safetensors metadata also names the model. Equal weights give equal
    bytes (a canonical header), so the teacher's file digest identifies the weights.

    Raises:
        TypeError: ``model`` is not a registered CF-SRec.
    """
    name = spec_of(model).name
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_file(directory / WEIGHTS, "wb") as f:
        f.write(save_torch(tensors, metadata={"format": "pt", "model": name}))  # same model, same bytes
    write_json(directory / CONFIG, {"model": name, **model.config.to_dict()})


def save_sasrec(model: SASRec, directory: str | Path) -> None:
    """Write ``model.safetensors`` (all parameters, float32) and ``config.json`` into ``directory``.

    Each file is written atomically; ``directory`` is created if missing.
    ``config.json`` = ``{"model": "sasrec", **SASRecConfig fields}`` (same as :func:`save_cfsrec`).
    """
    save_cfsrec(model, directory)


def load_cfsrec(directory: str | Path, device: str | torch.device = "cpu", expect: str | None = None) -> nn.Module:
    """Load any CF-SRec checkpoint written by :func:`save_cfsrec` (or a training run folder).

    ``config.json``'s ``model`` field picks the class (absent = ``sasrec``, for
    checkpoints written before the field existed).

    Args:
        directory: checkpoint folder.
        device: torch device of the returned model.
        expect: if given, the model name the checkpoint must have.

    Returns:
        the model (SASRec, GRU4Rec, BERT4Rec or NextItNet) in **eval mode** on ``device``.

    Raises:
        InputError: a missing or malformed ``config.json`` / ``model.safetensors``, an
            unknown or unexpected ``model`` field, or weights that do not match the config
            (the message names the file); sizes are checked against the safetensors header
            before the model is built, so a crafted config cannot allocate more than the
            file holds.
    """
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise InputError(f"{p}: not found (not a CF-SRec checkpoint folder)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{cfg_path}: not a JSON object")
    name = raw.get("model", "sasrec")
    if expect is not None and name != expect:
        raise InputError(f"{cfg_path}: field 'model' is not '{expect}'")
    if name not in MODELS:
        raise InputError(f"{cfg_path}: field 'model' is {name!r}, expected one of {', '.join(MODELS)}")
    spec = MODELS[name]
    if "n_items" not in raw:
        raise InputError(f"{cfg_path}: field 'n_items' missing")
    names = {f.name for f in fields(spec.config_cls)}
    try:
        config = spec.config_cls(**{k: v for k, v in raw.items() if k in names})
    except (TypeError, ValueError) as e:
        raise InputError(f"{cfg_path}: {e}") from None
    # sizes checked against the stored tensors before anything is allocated (a crafted config)
    check_checkpoint(w_path, cfg_path, raw, lambda: spec.model_cls(config))
    model = spec.model_cls(config)
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{w_path}: cannot read safetensors ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{w_path}: weights do not match {cfg_path.name} ({first})") from None
    return model.to(device).eval()


def load_sasrec(directory: str | Path, device: str | torch.device = "cpu") -> SASRec:
    """Load a SASRec checkpoint written by :func:`save_sasrec` (or a training run folder).

    Returns:
        the :class:`SASRec` in **eval mode** on ``device``.

    Raises:
        InputError: a missing or malformed ``config.json`` / ``model.safetensors``, a
            checkpoint of another model, or weights that do not match the config (the
            message names the file).
    """
    return load_cfsrec(directory, device, expect="sasrec")


# --- evaluation -----------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _score_candidates(
    model: nn.Module, inputs: list[np.ndarray], candidates: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    device = _device_of(model)
    maxlen = model.config.maxlen
    out = np.empty(candidates.shape, dtype=np.float32)
    for s in range(0, len(inputs), batch_size):
        seqs = pad_left(inputs[s : s + batch_size], maxlen).to(device)
        cand = torch.from_numpy(np.ascontiguousarray(candidates[s : s + batch_size])).to(device)
        out[s : s + batch_size] = model.score(seqs, cand).float().cpu().numpy()
    return out


def evaluate_split(
    model: nn.Module, ds: "PreparedDataset", split: str, ks=(10, 20), batch_size: int = 512
) -> dict[str, float]:
    """NDCG@K / HR@K of a CF-SRec ``model`` on the stored candidates of ``split`` ("valid" or "test").

    Every user 1..U is scored on ``ds.candidates(split)`` (target in column 0 + stored
    negatives) from the input of ``ds.view(split)`` (its last ``maxlen`` items); the model
    is put in eval mode (and left there).

    Returns:
        ``{"NDCG@10", "NDCG@20", "HR@10", "HR@20"}`` as floats (for the default ``ks``).

    Raises:
        ValueError: an unknown split, or non-finite scores.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    model.eval()
    inputs, _ = ds.view(split)
    candidates = ds.candidates(split)
    scores = _score_candidates(model, list(inputs[1:]), candidates, batch_size)
    threads = torch.get_num_threads()
    metrics = ranking_metrics(scores, ks)
    if torch.get_num_threads() != threads:
        # numba's first parallel call resizes the OpenMP pool torch shares (libgomp),
        # undoing torch.set_num_threads; on a busy machine that slows training many times
        torch.set_num_threads(threads)
    return metrics


def evaluate_cfsrec(ds: "PreparedDataset", ckpt_dir: str | Path, device: str = "cpu", expect: str | None = None) -> dict:
    """Evaluate a saved CF-SRec (any model of :data:`MODELS`) on the validation and test candidates of ``ds``.

    Returns:
        ``{"valid": metrics, "test": metrics}`` (metrics as in :func:`evaluate_split`).

    Raises:
        InputError: an unreadable checkpoint, one of another model than ``expect``, or one
            trained for another item count.
    """
    model = load_cfsrec(ckpt_dir, device=device, expect=expect)
    if model.config.n_items != ds.n_items:
        raise InputError(
            f"{Path(ckpt_dir) / CONFIG}: n_items {model.config.n_items} does not match the "
            f"dataset {ds.root} ({ds.n_items} items)"
        )
    return {"valid": evaluate_split(model, ds, "valid"), "test": evaluate_split(model, ds, "test")}


def evaluate_sasrec(ds: "PreparedDataset", ckpt_dir: str | Path, device: str = "cpu") -> dict:
    """Evaluate a saved SASRec on the validation and test candidates of ``ds``.

    Returns:
        ``{"valid": metrics, "test": metrics}`` (metrics as in :func:`evaluate_split`).

    Raises:
        InputError: an unreadable checkpoint, one of another model, or one trained for
            another item count.
    """
    return evaluate_cfsrec(ds, ckpt_dir, device=device, expect="sasrec")


# --- training data --------------------------------------------------------------------------


def training_batches(ds: "PreparedDataset", maxlen: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Autoregressive training pairs of every user with at least 2 training items.

    The training sequence is ``seq[:-2]``; its inputs are ``seq[:-3]`` and the target at
    each input position is the next item. Both are left-padded to ``maxlen`` (the last
    ``maxlen`` pairs are kept).

    Returns:
        ``(uids (T,), inputs (T, maxlen), targets (T, maxlen))``, all int64; 0 = padding.
    """
    uids, inputs, targets = [], [], []
    for uid in range(1, ds.n_users + 1):
        train_seq = np.asarray(ds.seqs[uid][:-2], dtype=np.int64)
        if train_seq.size < 2:
            continue
        uids.append(uid)
        inputs.append(train_seq[:-1])
        targets.append(train_seq[1:])
    return (
        np.asarray(uids, dtype=np.int64),
        pad_left(inputs, maxlen).numpy(),
        pad_left(targets, maxlen).numpy(),
    )


def _sample_negatives(
    rng: np.random.Generator, seen: np.ndarray, n_items: int, shape: tuple[int, int]
) -> np.ndarray:
    """Uniform item ids in 1..N, one per position, none in the row's ``seen`` mask.

    ``seen``: bool (B, N+1), True for the user's training items (and for the padding id 0).
    Rejection sampling, redrawing only the rejected entries; every row has an allowed item
    (checked by the caller).
    """
    neg = rng.integers(1, n_items + 1, size=shape)
    rows = np.arange(shape[0])[:, None]
    bad = seen[rows, neg]
    while bad.any():
        neg[bad] = rng.integers(1, n_items + 1, size=int(bad.sum()))
        bad = seen[rows, neg]
    return neg


class TrainingData:
    """Padded training sequences and the items each user's negatives must avoid.

    Attributes:
        uids: int64 ``(T,)`` users with at least 2 training items.
        inputs, targets: int64 ``(T, maxlen)`` autoregressive pairs (see :func:`training_batches`).
        train_items: T int64 arrays, the distinct items of each user's training sequence
            (a sampled negative avoids them; validation/test targets are not excluded, so
            nothing about them leaks into training).
        n_items: N.
        sequences: int64 ``(T, maxlen + 1)``, the last ``maxlen + 1`` items of each training
            sequence ``seq[:-2]``, left-padded (BERT4Rec's cloze rows); None if not built.
    """

    def __init__(self, uids, inputs, targets, train_items, n_items, sequences=None):
        self.uids, self.inputs, self.targets = uids, inputs, targets
        self.train_items, self.n_items = train_items, n_items
        self.sequences = sequences

    @classmethod
    def from_dataset(cls, ds: "PreparedDataset", maxlen: int) -> "TrainingData":
        """Build from a prepared dataset.

        Raises:
            InputError: no user has 2 training items; a user's training items cover every
                item (no negative can be drawn).
        """
        uids, inputs, targets = training_batches(ds, maxlen)
        if uids.size == 0:
            raise InputError(f"{ds.root}: no user has at least 2 training items (seq[:-2]); cannot train a CF-SRec")
        train_items = [np.unique(np.asarray(ds.seqs[u][:-2], dtype=np.int64)) for u in uids]
        for u, items in zip(uids, train_items):
            if items.size >= ds.n_items:
                raise InputError(f"{ds.root}: user {int(u)} has interacted with every item; no negatives to sample")
        sequences = pad_left([ds.seqs[u][:-2] for u in uids], maxlen + 1).numpy()
        return cls(uids, inputs, targets, train_items, ds.n_items, sequences)

    def seen_mask(self, idx: np.ndarray) -> np.ndarray:
        """bool ``(len(idx), N+1)``: True for id 0 and for the training items of rows ``idx``."""
        seen = np.zeros((idx.size, self.n_items + 1), dtype=bool)
        seen[:, 0] = True
        for r, i in enumerate(idx):
            seen[r, self.train_items[i]] = True
        return seen


def sequence_loss(model: nn.Module, feats: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor | None,
          loss: str) -> torch.Tensor:
    """Mean training loss over the positions with ``targets != 0``.

    feats: float ``(B, T, d)`` model outputs; targets, negatives: int64 ``(B, T)``.
    ``bce``: ``mean BCE(<F_t, E[target_t]>, 1) + mean BCE(<F_t, E[neg_t]>, 0)``;
    ``ce``: ``mean -log softmax_i(<F_t, E[i]>, i = 1..N)[target_t]``.
    """
    emb = model.item_embeddings()  # (N+1, d)
    mask = targets != 0
    if loss == "bce":
        pos_logits = (feats * F.embedding(targets, emb, padding_idx=0)).sum(-1)[mask]
        neg_logits = (feats * F.embedding(negatives, emb, padding_idx=0)).sum(-1)[mask]
        return F.binary_cross_entropy_with_logits(
            pos_logits, torch.ones_like(pos_logits)
        ) + F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))
    logits = feats[mask] @ emb[1:].T  # (positions, N): item i is column i-1
    return F.cross_entropy(logits, targets[mask] - 1)


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: TrainingData,
    rng: np.random.Generator,
    batch_size: int,
    loss: str | None = None,
) -> float:
    """One pass over every training user in a random order (from ``rng``).

    ``next`` models (SASRec, GRU4Rec, NextItNet) predict the next item at every input
    position; BERT4Rec (``cloze``) predicts the items masked by :func:`cloze_batch`. The
    loss (:func:`sequence_loss`) is averaged over those positions; with ``bce`` (SASRec's, Kang &
    McAuley 2018, "Network Training") each position gets one negative drawn uniformly
    from the items outside the user's training sequence.

    Args:
        loss: ``bce`` or ``ce``; None = the model's default (:data:`MODELS`).

    Returns:
        the position-weighted mean loss of the epoch (float).
    """
    spec = spec_of(model)
    loss = loss or spec.loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    model.train()
    dev = _device_of(model)
    order = rng.permutation(data.uids.size)
    total, count = 0.0, 0
    for s in range(0, order.size, batch_size):
        idx = order[s : s + batch_size]
        if spec.objective == "cloze":
            cfg = model.config
            inp_np, pos_np = cloze_batch(data.sequences[idx], rng, cfg.mask_prob, cfg.mask_last_prob, cfg.mask_id)
        else:
            inp_np, pos_np = data.inputs[idx], data.targets[idx]
        neg = None
        if loss == "bce":
            neg_np = _sample_negatives(rng, data.seen_mask(idx), data.n_items, pos_np.shape)
            neg = torch.from_numpy(neg_np).to(dev)
        inp = torch.from_numpy(inp_np).to(dev)
        pos = torch.from_numpy(pos_np).to(dev)
        feats = model(inp)  # (B, L, d)
        batch_loss = sequence_loss(model, feats, pos, neg, loss)
        opt.zero_grad(set_to_none=True)
        batch_loss.backward()
        opt.step()
        n = int((pos != 0).sum())
        total += float(batch_loss.detach()) * n
        count += n
    return total / max(count, 1)


# --- training -------------------------------------------------------------------------------


def train_cfsrec(
    ds: "PreparedDataset",
    out: str | Path,
    *,
    model: str = "sasrec",
    epochs: int = SASREC_TRAINING["epochs"],
    patience: int = SASREC_TRAINING["patience"],
    eval_every: int = SASREC_TRAINING["eval_every"],
    seed: int = 0,
    batch_size: int = SASREC_TRAINING["batch_size"],
    lr: float = SASREC_TRAINING["lr"],
    loss: str | None = None,
    device: str = "cpu",
    force: bool = False,
    progress: bool = True,
    **model_options: Any,
) -> dict:
    """Train a CF-SRec of :data:`MODELS` on ``ds``; write the best-on-validation checkpoint to ``out``.

    Args:
        ds: a prepared dataset (``llmsrec.data.load_prepared``).
        out: run folder to create (written to a temporary folder, renamed when complete).
        model: ``sasrec`` | ``gru4rec`` | ``bert4rec`` | ``nextitnet`` | ``ctrl`` (SASRec started from
            text-encoder item vectors, :mod:`llmsrec.cfsrec.ctrl`).
        epochs: maximum number of epochs (one epoch = every training user once).
        patience: stop after this many validations without a better validation NDCG@10.
        eval_every: validate every this many epochs (and after the last epoch).
        seed: seeds the user order, the negatives and masks (numpy) and dropout/init (torch).
        batch_size: users per step (paper: 128).
        lr: Adam learning rate (paper: 1e-3; betas (0.9, 0.98)).
        loss: ``bce`` | ``ce``; None = the model's default (SASRec ``bce``, others ``ce``).
        device: torch device string ("cpu", "cuda", ...).
        force: replace an existing ``out``.
        progress: show a tqdm bar over epochs.
        **model_options: fields of the model's config dataclass other than ``n_items``
            (e.g. ``hidden``, ``maxlen``, ``blocks``; see ``MODELS[model].options()``).

    Returns:
        the content of ``results.json``: ``{"model": name, "valid": metrics of the
        selected epoch, "test": metrics (evaluated once, on the selected weights),
        "best_epoch", "epochs_run", "stopped_early", "seconds" (wall time of the whole
        call), "train": the training options, "config": the model config, "data": {"root",
        "digest"}}``.

    Raises:
        InputError: unknown ``model`` or model option; ``out`` exists without ``force``;
            no user has 2 training items; a user whose training items cover every item;
            training diverged (non-finite validation scores).
        ValueError: a non-positive ``epochs``/``patience``/``eval_every``/``batch_size``,
            an unknown ``loss`` or an invalid model config.
    """
    t0 = time.perf_counter()
    spec = model_spec(model)
    out = Path(out)
    for name, v in (("epochs", epochs), ("patience", patience), ("eval_every", eval_every), ("batch_size", batch_size)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    loss = loss or spec.loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    unknown = sorted(set(model_options) - set(spec.options()))
    if unknown:
        raise InputError(f"option(s) {', '.join(unknown)} do not apply to {model} "
                         f"(its options: {', '.join(spec.options())})")
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    config = spec.config_cls(n_items=ds.n_items, **model_options)
    data = TrainingData.from_dataset(ds, config.maxlen)

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = spec.model_cls(config).to(torch.device(device))
    prepared = None
    if spec.prepare is not None:
        prepared = spec.prepare(net, ds, data, rng, batch_size=batch_size, lr=lr, device=device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.98))

    def step(epoch: int, batch: int) -> dict[str, float]:  # one loop step = one epoch over every user
        return {"loss": train_epoch(net, opt, data, rng, batch_size, loss)}

    def validate(epoch: int) -> dict[str, float]:
        try:
            return evaluate_split(net, ds, "valid")
        except ValueError as e:  # NaN/inf scores: the weights diverged
            raise InputError(f"{spec.display} training diverged at epoch {epoch}: {e}; lower --lr") from None

    def record(t: Tick) -> dict:  # one line per epoch, its validation metrics when it had one
        rec = {"epoch": t.step, "loss": t.terms["loss"], "seconds": round(t.step_seconds, 3)}
        return rec if t.metrics is None else {**rec, "valid": t.metrics}

    fit = train_loop(step, validate, net.state_dict, record, epochs=epochs, batches=1, every=eval_every,
                     select=SELECT_ON, patience=patience, record_steps=True, progress=progress, desc=spec.display)
    net.load_state_dict(fit.state)
    net.eval()
    test = evaluate_split(net, ds, "test")  # the one and only test evaluation
    results = {
        "model": spec.name,
        "valid": fit.best["metrics"],
        "test": test,
        "best_epoch": fit.best["step"],
        "epochs_run": fit.steps,
        "stopped_early": fit.stopped_early,
        "seconds": round(time.perf_counter() - t0, 2),
        "train": {
            "epochs": epochs, "patience": patience, "eval_every": eval_every, "seed": seed,
            "batch_size": batch_size, "lr": lr, "betas": [0.9, 0.98], "device": device,
            "select_on": f"valid {SELECT_ON}", "objective": spec.objective, "loss": loss,
            "negatives_per_position": 1 if loss == "bce" else "all",
        },
        "config": config.to_dict(),
        "data": {"root": str(ds.root), "digest": getattr(ds, "digest", None)},
    }
    if prepared is not None:
        results["prepare"] = prepared
    with atomic_dir(out, force=force) as tmp:
        save_cfsrec(net, tmp)
        write_history(tmp / HISTORY, fit.history)
        write_json(tmp / RESULTS, results)
    return results


def train_sasrec(
    ds: "PreparedDataset",
    out: str | Path,
    *,
    epochs: int = SASREC_TRAINING["epochs"],
    patience: int = SASREC_TRAINING["patience"],
    eval_every: int = SASREC_TRAINING["eval_every"],
    seed: int = 0,
    batch_size: int = SASREC_TRAINING["batch_size"],
    lr: float = SASREC_TRAINING["lr"],
    device: str = "cpu",
    hidden: int = SASREC_TRAINING["hidden"],
    blocks: int = SASREC_TRAINING["blocks"],
    heads: int = SASREC_TRAINING["heads"],
    dropout: float = SASREC_TRAINING["dropout"],
    maxlen: int = SASREC_TRAINING["maxlen"],
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Train SASRec on ``ds`` and write the best-on-validation checkpoint to ``out``.

    :func:`train_cfsrec` with ``model="sasrec"`` and its ``bce`` loss (one sampled negative
    per position, Kang & McAuley 2018).

    Args:
        hidden, blocks, heads, dropout, maxlen: :class:`SASRecConfig` fields; the other
            arguments as :func:`train_cfsrec`.

    Returns:
        the content of ``results.json`` (see :func:`train_cfsrec`), ``"model": "sasrec"``.

    Raises:
        InputError: ``out`` exists without ``force``; no user has 2 training items; a user
            whose training items cover every item (no negative can be drawn).
        ValueError: a non-positive ``epochs``/``patience``/``eval_every``/``batch_size``
            or an invalid model config.
    """
    return train_cfsrec(
        ds, out, model="sasrec", epochs=epochs, patience=patience, eval_every=eval_every, seed=seed,
        batch_size=batch_size, lr=lr, loss="bce", device=device, force=force, progress=progress,
        hidden=hidden, blocks=blocks, heads=heads, dropout=dropout, maxlen=maxlen,
    )
