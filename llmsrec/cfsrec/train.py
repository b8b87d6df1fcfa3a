"""Training, checkpoint I/O and evaluation of the SASRec teacher.

Training follows Kang & McAuley (2018) as the LLM-SRec paper uses it (Appendix E): each
user's training sequence ``seq[:-2]`` is read autoregressively (inputs ``seq[:-3]``, the
target at position t is the next item), binary cross-entropy on the target and on **one
sampled negative per position**, Adam (lr 1e-3, betas (0.9, 0.98)), batch 128 users.

Unlike the authors' code (see DESIGN.md), we validate every ``eval_every`` epochs on the
dataset's stored validation candidates (target + 99 negatives), select on NDCG@10, stop
after ``patience`` validations without improvement, keep the best-on-validation weights,
and evaluate test **once**, on those weights.

A checkpoint folder holds ``model.safetensors`` + ``config.json`` (no pickle; loadable with
``safetensors`` alone); a training run folder adds ``history.jsonl`` and ``results.json``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmsrec.atomic import atomic_dir, atomic_file, write_json
from llmsrec.cfsrec.sasrec import SASRec, SASRecConfig, pad_left
from llmsrec.errors import InputError
from llmsrec.evaluate.metrics import ranking_metrics

if TYPE_CHECKING:  # pragma: no cover
    from llmsrec.data import PreparedDataset

__all__ = [
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


# --- checkpoint I/O -----------------------------------------------------------------------


def save_sasrec(model: SASRec, directory: str | Path) -> None:
    """Write ``model.safetensors`` (all parameters, float32) and ``config.json`` into ``directory``.

    Each file is written atomically; ``directory`` is created if missing.
    ``config.json`` = ``{"model": "sasrec", **SASRecConfig fields}``.
    """
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_file(directory / WEIGHTS, "wb") as f:
        f.write(save(tensors, metadata={"format": "pt", "model": "sasrec"}))
    write_json(directory / CONFIG, {"model": "sasrec", **model.config.to_dict()})


def load_sasrec(directory: str | Path, device: str | torch.device = "cpu") -> SASRec:
    """Load a checkpoint written by :func:`save_sasrec` (or a training run folder).

    Returns:
        the :class:`SASRec` in **eval mode** on ``device``.

    Raises:
        InputError: a missing or malformed ``config.json`` / ``model.safetensors``, or
            weights that do not match the config (the message names the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise InputError(f"{p}: not found (not a SASRec checkpoint folder)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("model", "sasrec") != "sasrec":
        raise InputError(f"{cfg_path}: field 'model' is not 'sasrec'")
    fields = SASRecConfig.__dataclass_fields__
    if "n_items" not in raw:
        raise InputError(f"{cfg_path}: field 'n_items' missing")
    try:
        config = SASRecConfig(**{k: v for k, v in raw.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise InputError(f"{cfg_path}: {e}") from None
    model = SASRec(config)
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


# --- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def _score_candidates(
    model: SASRec, inputs: list[np.ndarray], candidates: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    device = model.item_emb.weight.device
    maxlen = model.config.maxlen
    out = np.empty(candidates.shape, dtype=np.float32)
    for s in range(0, len(inputs), batch_size):
        seqs = pad_left(inputs[s : s + batch_size], maxlen).to(device)
        cand = torch.from_numpy(np.ascontiguousarray(candidates[s : s + batch_size])).to(device)
        out[s : s + batch_size] = model.score(seqs, cand).float().cpu().numpy()
    return out


def evaluate_split(
    model: SASRec, ds: "PreparedDataset", split: str, ks=(10, 20), batch_size: int = 512
) -> dict[str, float]:
    """NDCG@K / HR@K of ``model`` on the stored candidates of ``split`` ("valid" or "test").

    Every user 1..U is scored on ``ds.candidates(split)`` (target in column 0 + stored
    negatives) from the input of ``ds.view(split)``; the model is put in eval mode (and
    left there).

    Returns:
        ``{"NDCG@10", "NDCG@20", "HR@10", "HR@20"}`` as floats (for the default ``ks``).
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    model.eval()
    inputs, _ = ds.view(split)
    candidates = ds.candidates(split)
    scores = _score_candidates(model, list(inputs[1:]), candidates, batch_size)
    return ranking_metrics(scores, ks)


def evaluate_sasrec(ds: "PreparedDataset", ckpt_dir: str | Path, device: str = "cpu") -> dict:
    """Evaluate a saved SASRec on the validation and test candidates of ``ds``.

    Returns:
        ``{"valid": metrics, "test": metrics}`` (metrics as in :func:`evaluate_split`).

    Raises:
        InputError: an unreadable checkpoint, or one trained for another item count.
    """
    model = load_sasrec(ckpt_dir, device=device)
    if model.config.n_items != ds.n_items:
        raise InputError(
            f"{Path(ckpt_dir) / CONFIG}: n_items {model.config.n_items} does not match the "
            f"dataset {ds.root} ({ds.n_items} items)"
        )
    return {"valid": evaluate_split(model, ds, "valid"), "test": evaluate_split(model, ds, "test")}


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
    """Padded autoregressive training pairs and the items each user's negatives must avoid.

    Attributes:
        uids: int64 ``(T,)`` users with at least 2 training items.
        inputs, targets: int64 ``(T, maxlen)`` (see :func:`training_batches`).
        train_items: T int64 arrays, the distinct items of each user's training sequence
            (a sampled negative avoids them; validation/test targets are not excluded, so
            nothing about them leaks into training).
        n_items: N.
    """

    def __init__(self, uids, inputs, targets, train_items, n_items):
        self.uids, self.inputs, self.targets = uids, inputs, targets
        self.train_items, self.n_items = train_items, n_items

    @classmethod
    def from_dataset(cls, ds: "PreparedDataset", maxlen: int) -> "TrainingData":
        """Build from a prepared dataset.

        Raises:
            InputError: no user has 2 training items; a user's training items cover every
                item (no negative can be drawn).
        """
        uids, inputs, targets = training_batches(ds, maxlen)
        if uids.size == 0:
            raise InputError(f"{ds.root}: no user has at least 2 training items (seq[:-2]); cannot train SASRec")
        train_items = [np.unique(np.asarray(ds.seqs[u][:-2], dtype=np.int64)) for u in uids]
        for u, items in zip(uids, train_items):
            if items.size >= ds.n_items:
                raise InputError(f"{ds.root}: user {int(u)} has interacted with every item; no negatives to sample")
        return cls(uids, inputs, targets, train_items, ds.n_items)

    def seen_mask(self, idx: np.ndarray) -> np.ndarray:
        """bool ``(len(idx), N+1)``: True for id 0 and for the training items of rows ``idx``."""
        seen = np.zeros((idx.size, self.n_items + 1), dtype=bool)
        seen[:, 0] = True
        for r, i in enumerate(idx):
            seen[r, self.train_items[i]] = True
        return seen


def train_epoch(
    model: SASRec, opt: torch.optim.Optimizer, data: TrainingData, rng: np.random.Generator, batch_size: int
) -> float:
    """One pass over every training user in a random order (from ``rng``).

    Loss per batch (Kang & McAuley 2018, "Network Training"): over the non-padding positions t,
    ``mean BCE(<F_t, E[target_t]>, 1) + mean BCE(<F_t, E[neg_t]>, 0)`` with one negative per
    position drawn uniformly from the items outside the user's training sequence.

    Returns:
        the position-weighted mean loss of the epoch (float).
    """
    model.train()
    dev = model.item_emb.weight.device
    order = rng.permutation(data.uids.size)
    total, count = 0.0, 0
    for s in range(0, order.size, batch_size):
        idx = order[s : s + batch_size]
        pos_np = data.targets[idx]
        neg_np = _sample_negatives(rng, data.seen_mask(idx), data.n_items, pos_np.shape)
        inp = torch.from_numpy(data.inputs[idx]).to(dev)
        pos = torch.from_numpy(pos_np).to(dev)
        neg = torch.from_numpy(neg_np).to(dev)
        feats = model(inp)  # (B, L, d)
        mask = pos != 0
        pos_logits = (feats * model.item_emb(pos)).sum(-1)[mask]
        neg_logits = (feats * model.item_emb(neg)).sum(-1)[mask]
        loss = F.binary_cross_entropy_with_logits(
            pos_logits, torch.ones_like(pos_logits)
        ) + F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n = int(mask.sum())
        total += float(loss.detach()) * n
        count += n
    return total / max(count, 1)


# --- training -------------------------------------------------------------------------------


def train_sasrec(
    ds: "PreparedDataset",
    out: str | Path,
    *,
    epochs: int = 200,
    patience: int = 5,
    eval_every: int = 5,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    device: str = "cpu",
    hidden: int = 64,
    blocks: int = 2,
    heads: int = 1,
    dropout: float = 0.1,
    maxlen: int = 128,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Train SASRec on ``ds`` and write the best-on-validation checkpoint to ``out``.

    Args:
        ds: a prepared dataset (``llmsrec.data.load_prepared``).
        out: run folder to create (written to a temporary folder, renamed when complete).
        epochs: maximum number of epochs (one epoch = every training user once).
        patience: stop after this many validations without a better validation NDCG@10.
        eval_every: validate every this many epochs (and after the last epoch).
        seed: seeds the user order, the negatives (numpy) and dropout/init (torch).
        batch_size: users per step (paper: 128).
        lr: Adam learning rate (paper: 1e-3; betas (0.9, 0.98)).
        device: torch device string ("cpu", "cuda", ...).
        hidden, blocks, heads, dropout, maxlen: :class:`SASRecConfig` fields.
        force: replace an existing ``out``.
        progress: show a tqdm bar over epochs.

    Returns:
        the content of ``results.json``: ``{"model": "sasrec", "valid": metrics of the
        selected epoch, "test": metrics (evaluated once, on the selected weights),
        "best_epoch", "epochs_run", "stopped_early", "seconds" (wall time of the whole
        call), "train": the training options, "config": the model config, "data": {"root",
        "digest"}}``.

    Raises:
        InputError: ``out`` exists without ``force``; no user has 2 training items; a user
            whose training items cover every item (no negative can be drawn).
        ValueError: a non-positive ``epochs``/``patience``/``eval_every``/``batch_size``
            or an invalid model config.
    """
    t0 = time.perf_counter()
    out = Path(out)
    for name, v in (("epochs", epochs), ("patience", patience), ("eval_every", eval_every), ("batch_size", batch_size)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    config = SASRecConfig(
        n_items=ds.n_items, hidden=hidden, blocks=blocks, heads=heads, dropout=dropout, maxlen=maxlen
    )
    data = TrainingData.from_dataset(ds, config.maxlen)

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRec(config).to(torch.device(device))
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))

    history: list[dict] = []
    best = {"score": -1.0, "epoch": 0, "valid": None, "state": None}
    since_best = 0
    stopped_early = False
    epoch = 0
    bar = tqdm(range(1, epochs + 1), desc="SASRec", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        t_ep = time.perf_counter()
        loss = train_epoch(model, opt, data, rng, batch_size)
        record = {"epoch": epoch, "loss": loss, "seconds": round(time.perf_counter() - t_ep, 3)}
        if epoch % eval_every == 0 or epoch == epochs:
            try:
                valid = evaluate_split(model, ds, "valid")
            except ValueError as e:  # NaN/inf scores: the weights diverged
                raise InputError(f"SASRec training diverged at epoch {epoch}: {e}; lower --lr") from None
            record["valid"] = valid
            if valid[SELECT_ON] > best["score"]:
                best = {
                    "score": valid[SELECT_ON],
                    "epoch": epoch,
                    "valid": valid,
                    "state": copy.deepcopy(model.state_dict()),
                }
                since_best = 0
            else:
                since_best += 1
            bar.set_postfix(loss=f"{record['loss']:.4f}", ndcg10=f"{valid[SELECT_ON]:.4f}", best=best["epoch"])
        history.append(record)
        if since_best >= patience:
            stopped_early = True
            break
    bar.close()

    model.load_state_dict(best["state"])
    model.eval()
    test = evaluate_split(model, ds, "test")  # the one and only test evaluation
    results = {
        "model": "sasrec",
        "valid": best["valid"],
        "test": test,
        "best_epoch": best["epoch"],
        "epochs_run": epoch,
        "stopped_early": stopped_early,
        "seconds": round(time.perf_counter() - t0, 2),
        "train": {
            "epochs": epochs, "patience": patience, "eval_every": eval_every, "seed": seed,
            "batch_size": batch_size, "lr": lr, "betas": [0.9, 0.98], "device": device,
            "select_on": f"valid {SELECT_ON}", "negatives_per_position": 1,
        },
        "config": config.to_dict(),
        "data": {"root": str(ds.root), "digest": getattr(ds, "digest", None)},
    }
    with atomic_dir(out, force=force) as tmp:
        save_sasrec(model, tmp)
        with atomic_file(tmp / HISTORY) as f:
            for rec in history:
                f.write(json.dumps(rec) + "\n")
        write_json(tmp / RESULTS, results)
    return results
