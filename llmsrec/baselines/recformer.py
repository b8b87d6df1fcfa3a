"""RECFORMER (Li et al. 2023, "Text Is All You Need"), the LLM-SRec paper's second LM-based
baseline (Appendix D), on a bundled text encoder.

* **Items as sentences.** Item i is its flattened ``key value`` pairs (title, year, genres,
  ... from :func:`llmsrec.cfsrec.textenc.item_fields`), each key's and value's tokens typed
  ``key`` (1) or ``value`` (2); at most ``item_tokens`` tokens per item.
* **Users as item sentences.** A user is ``[CLS]`` + the item sentences of its history,
  **most recent first**, item k carrying item position k, truncated to ``max_tokens`` tokens
  (``[CLS]``/``[SEP]`` included; an item that does not fit whole is left out, except the most
  recent one, which is cut) + ``[SEP]``. Only the input history is read: never the target
  or anything after it (:func:`user_tokens`).
* **One encoder** initialised from the text encoder (its word/position embeddings and
  layers), plus RECFORMER's token-type (3 types: special, key, value) and item-position
  embeddings, both added to the input embeddings and starting at zero (so the untrained
  model is the text encoder). A sequence's vector is the encoder's pooling (the pooling
  its sentence-transformers config names; mean for all-MiniLM-L6-v2).
* **Scores**: cosine similarity of the user vector to the item vectors, divided by
  ``temperature``.
* **Training**: contrastive, cross-entropy over the target against in-batch negatives (the
  other rows' targets, encoded in the step, with gradient) and stored negatives (the item
  matrix I of every item, no gradient); RECFORMER's two-stage fine-tuning: in stage 1
  (the first ``stage1_epochs`` epochs) I is re-encoded with the current encoder at the
  start of every epoch and at each validation; then I is frozen and stage 2 trains the
  encoder against it (stored negatives only). A training sample is one user with a random
  cut of its training sequence ``seq[:-2]`` (history -> next item), each user once per
  epoch. ``max_steps`` bounds the steps; validation NDCG@10 on the stored candidates every
  ``eval_every`` steps selects the checkpoint (patience ``patience``); test once.

Not as in the paper: a 6-layer MiniLM instead of Longformer (no pre-training stage of
RECFORMER's own; the sentence encoder is the starting point), a short token budget and a
step budget that fit 2 CPU cores.

Checkpoint folder: ``model.safetensors`` (the encoder, the two added embeddings and the item
matrix ``item_vectors`` used for scoring), ``config.json`` (``"model": "recformer"``, the
encoder's config, budgets), the tokenizer files, ``results.json``, ``history.jsonl``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from llmsrec.atomic import atomic_dir, write_json
from llmsrec.cfsrec.textenc import DEFAULT_TEXT_ENCODER, item_fields, load_text_encoder, pool_hidden
from llmsrec.errors import InputError
from llmsrec.metrics import ranking_metrics
from llmsrec.precompute.prompts import build_view
from llmsrec.safetensors_io import save_torch
from llmsrec.training import Tick, train_loop, write_history

if TYPE_CHECKING:  # pragma: no cover
    from llmsrec.data import PreparedDataset

__all__ = ["RecformerOptions", "Recformer", "ItemTokens", "item_tokens", "user_tokens", "train_recformer",
           "load_recformer", "recformer_scores", "evaluate_recformer_checkpoint", "TYPE_SPECIAL", "TYPE_KEY",
           "TYPE_VALUE", "set_dropout"]

TYPE_SPECIAL, TYPE_KEY, TYPE_VALUE = 0, 1, 2
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: views the checkpoint is scored on
VIEWS = ("valid", "test", "test-shuffled")
SHUFFLE_WINDOW, SHUFFLE_SEED = 10, 0  # the test-shuffled view of every other model (compare's)


@dataclass
class RecformerOptions:
    """RECFORMER's options (``llmsrec train --model recformer``, ``compare --recformer-*``).

    Attributes:
        text_encoder: bundled name or folder the encoder starts from.
        max_steps: training-step budget (batches); the loop also stops after ``epochs``.
        epochs: epoch budget (one epoch = every training user once).
        stage1_epochs: epochs of stage 1 (item matrix refreshed each epoch), then stage 2.
        batch_size: users per step; lr: AdamW learning rate; weight_decay: AdamW's.
        temperature: of the cosine-similarity softmax.
        dropout: the encoder's dropout (every dropout module and the attention's). 0 (the
            default) keeps the in-batch item vectors of a step and the stored item matrix
            comparable: with the text encoder's own 0.1, a vector encoded in training mode
            differs enough from the stored (eval-mode) ones that the stored negatives barely
            count in stage 1 (measured: stage-1 loss near log(batch size)).
        max_tokens: a user's token budget (with ``[CLS]``, ``[SEP]``); item_tokens: per item.
        max_items: item positions (items beyond share the last one).
        eval_every: validate every this many steps (and at the end of the budget).
        patience: validations without a better validation NDCG@10 before stopping.
        eval_batch: sequences per forward when scoring.
        seed: user order, cuts, dropout.
        device: torch device.
    """

    text_encoder: str = DEFAULT_TEXT_ENCODER
    max_steps: int = 150
    epochs: int = 20
    stage1_epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    temperature: float = 0.05
    dropout: float = 0.0
    max_tokens: int = 128
    item_tokens: int = 32
    max_items: int = 50
    eval_every: int = 50
    patience: int = 3
    eval_batch: int = 32
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("max_steps", "epochs", "batch_size", "max_tokens", "item_tokens", "max_items", "eval_every",
                     "patience", "eval_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.stage1_epochs) < 0:
            raise ValueError(f"stage1_epochs must be >= 0, got {self.stage1_epochs}")
        if not float(self.temperature) > 0 or not float(self.lr) > 0:
            raise ValueError("temperature and lr must be > 0")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if int(self.max_tokens) < 3:
            raise ValueError(f"max_tokens must be >= 3 ([CLS], one token, [SEP]), got {self.max_tokens}")


# --- token sequences ------------------------------------------------------------------------


@dataclass
class ItemTokens:
    """Each item's flattened tokens (no special tokens): ``ids[i]``, ``types[i]`` int lists
    for iid i (entry 0 empty); ``cls``, ``sep``, ``pad``: the tokenizer's special ids."""

    ids: list
    types: list
    cls: int
    sep: int
    pad: int


def item_tokens(ds: "PreparedDataset", tokenizer, max_len: int) -> ItemTokens:
    """Tokenize every item's ``key value`` pairs (:func:`~llmsrec.cfsrec.textenc.item_fields`),
    keys typed :data:`TYPE_KEY`, values :data:`TYPE_VALUE`, cut to ``max_len`` tokens."""
    ids, types = [[]], [[]]
    for fields_ in item_fields(ds)[1:]:
        i, t = [], []
        for k, v in fields_:
            for text, typ in ((k, TYPE_KEY), (v, TYPE_VALUE)):
                toks = tokenizer(text, add_special_tokens=False)["input_ids"]
                i += toks
                t += [typ] * len(toks)
        ids.append(i[:max_len])
        types.append(t[:max_len])
    return ItemTokens(ids, types, int(tokenizer.cls_token_id), int(tokenizer.sep_token_id),
                      int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0))


def user_tokens(history: Sequence[int], tok: ItemTokens, max_tokens: int, max_items: int
                ) -> tuple[list[int], list[int], list[int], list[int]]:
    """A user's input: ``[CLS]`` + the item sentences of ``history`` most recent first + ``[SEP]``.

    Args:
        history: the input items in chronological order (the target is NOT part of it).
        tok: :func:`item_tokens`.
        max_tokens: budget including ``[CLS]`` and ``[SEP]``; items that do not fit whole are
            left out (the most recent one is cut to fit instead).
        max_items: item positions; the k-th most recent item has position ``min(k, max_items)``.

    Returns:
        ``(ids, types, item_positions, items)``: three equal-length int lists, and the iids
        that were included, most recent first (always a suffix of ``history``, reversed).
    """
    ids, types, pos, items = [tok.cls], [TYPE_SPECIAL], [0], []
    room = max_tokens - 2
    for k, iid in enumerate(reversed([int(x) for x in history]), start=1):
        t_ids, t_types = tok.ids[iid], tok.types[iid]
        if len(t_ids) > room:
            if items:
                break
            t_ids, t_types = t_ids[:room], t_types[:room]
        ids += t_ids
        types += t_types
        pos += [min(k, max_items)] * len(t_ids)
        items.append(iid)
        room -= len(t_ids)
        if room <= 0:
            break
    ids.append(tok.sep)
    types.append(TYPE_SPECIAL)
    pos.append(0)
    return ids, types, pos, items


def _item_input(iid: int, tok: ItemTokens) -> tuple[list[int], list[int], list[int]]:
    """An item alone: ``[CLS]`` + its tokens (item position 1) + ``[SEP]``."""
    n = len(tok.ids[iid])
    return ([tok.cls, *tok.ids[iid], tok.sep], [TYPE_SPECIAL, *tok.types[iid], TYPE_SPECIAL], [0] + [1] * n + [0])


def _batch(rows: list[tuple[list[int], list[int], list[int]]], pad: int, device) -> dict[str, torch.Tensor]:
    """Right-padded tensors ``ids, types, positions, mask`` (B, L_max)."""
    L = max(len(r[0]) for r in rows)
    out = {k: torch.zeros(len(rows), L, dtype=torch.long) for k in ("ids", "types", "positions", "mask")}
    out["ids"].fill_(pad)
    for r, (i, t, p) in enumerate(rows):
        n = len(i)
        out["ids"][r, :n] = torch.tensor(i)
        out["types"][r, :n] = torch.tensor(t)
        out["positions"][r, :n] = torch.tensor(p)
        out["mask"][r, :n] = 1
    return {k: v.to(device) for k, v in out.items()}


# --- the model --------------------------------------------------------------------------------


class Recformer(nn.Module):
    """The encoder: a ``transformers`` encoder plus RECFORMER's token-type and item-position
    embeddings (added to the word embeddings, zero at the start).

    Args:
        encoder: the ``transformers`` model (e.g. ``BertModel``); its own token-type input
            stays 0.
        pooling: :func:`~llmsrec.cfsrec.textenc.pool_hidden`'s pooling.
        max_items: item positions 0..max_items.
    """

    def __init__(self, encoder: nn.Module, pooling: str = "mean", max_items: int = 50) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        h = int(encoder.config.hidden_size)
        self.token_type = nn.Embedding(3, h)
        self.item_position = nn.Embedding(max_items + 1, h)
        nn.init.zeros_(self.token_type.weight)
        nn.init.zeros_(self.item_position.weight)

    def forward(self, ids: torch.Tensor, types: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Sequence vectors, float ``(B, H)`` (pooled, not normalised), from right-padded
        int64 ``(B, L)`` token ids, types, item positions and the 0/1 attention mask."""
        emb = self.encoder.get_input_embeddings()(ids) + self.token_type(types) + self.item_position(positions)
        hidden = self.encoder(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        return pool_hidden(hidden, mask, self.pooling)


def _encode_rows(model: Recformer, rows: list, pad: int, batch: int, device, grad: bool = False) -> torch.Tensor:
    """Vectors ``(len(rows), H)`` of token rows, in batches sorted by length (no gradient
    unless ``grad``)."""
    order = np.argsort([len(r[0]) for r in rows], kind="stable")
    out = [None] * len(rows)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for s in range(0, len(rows), batch):
            idx = order[s : s + batch]
            b = _batch([rows[i] for i in idx], pad, device)
            vec = model(b["ids"], b["types"], b["positions"], b["mask"])
            for j, i in enumerate(idx):
                out[i] = vec[j]
    return torch.stack(out)


def _item_matrix(model: Recformer, tok: ItemTokens, n_items: int, batch: int, device) -> torch.Tensor:
    """I: every item's vector, float32 ``(N+1, H)`` (row 0 zero), no gradient; the model is
    put in eval mode for it and its previous mode restored."""
    was = model.training
    model.eval()
    vec = _encode_rows(model, [_item_input(i, tok) for i in range(1, n_items + 1)], tok.pad, batch * 2, device)
    model.train(was)
    return torch.cat([torch.zeros(1, vec.shape[1], device=vec.device), vec]).float()


@torch.no_grad()
def _scores(model: Recformer, tok: ItemTokens, items: torch.Tensor, histories: list, candidates: np.ndarray,
            opts: RecformerOptions, device) -> np.ndarray:
    """Cosine scores / temperature of each user's candidates: float32 ``(U, C)``."""
    was = model.training
    model.eval()
    rows = [user_tokens(h, tok, opts.max_tokens, opts.max_items)[:3] for h in histories]
    users = F.normalize(_encode_rows(model, rows, tok.pad, opts.eval_batch, device), dim=-1)
    model.train(was)
    it = F.normalize(items, dim=-1)
    cand = torch.from_numpy(np.ascontiguousarray(candidates)).to(device)
    s = torch.einsum("ud,ucd->uc", users, it[cand]) / opts.temperature
    return s.float().cpu().numpy()


def _metrics(scores: np.ndarray) -> dict[str, float]:
    threads = torch.get_num_threads()
    try:
        return {k: float(v) for k, v in ranking_metrics(scores).items()}
    finally:
        torch.set_num_threads(threads)  # numba's first parallel call may resize torch's pool


def _view_inputs(ds: "PreparedDataset", view: str) -> tuple[list, np.ndarray]:
    """(histories of users 1..U, candidates (U, 1+m)) of ``valid``, ``test`` or ``test-shuffled``."""
    if view == "test-shuffled":
        inputs = build_view(ds, "test-shuffled", history_window=SHUFFLE_WINDOW, seed=SHUFFLE_SEED).cf_inputs
        return list(inputs[1:]), ds.candidates("test")
    inputs, _ = ds.view(view)
    return list(inputs[1:]), ds.candidates(view)


# --- training ---------------------------------------------------------------------------------


def set_dropout(module: nn.Module, p: float) -> None:
    """Set every dropout of ``module`` to ``p``: ``nn.Dropout`` modules, attention modules'
    ``dropout_prob`` (SDPA) and the config's ``hidden_dropout_prob`` /
    ``attention_probs_dropout_prob`` when present."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if isinstance(getattr(m, "dropout_prob", None), float):
            m.dropout_prob = p
    cfg = getattr(module, "config", None)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if cfg is not None and hasattr(cfg, name):
            setattr(cfg, name, p)


def _new_model(opts: RecformerOptions, device) -> tuple[Recformer, object, dict]:
    enc = load_text_encoder(opts.text_encoder, device="cpu")
    set_dropout(enc.model, float(opts.dropout))
    model = Recformer(enc.model, enc.pooling, opts.max_items).to(device)
    info = {"text_encoder": enc.name, "digest": enc.digest, "pooling": enc.pooling}
    return model, enc.tokenizer, info


def train_recformer(ds: "PreparedDataset", out: str | Path, *, force: bool = False, progress: bool = True,
                    log=print, **options) -> dict:
    """Train RECFORMER on ``ds`` (see the module docstring) and write the checkpoint to ``out``.

    Args:
        ds: a prepared dataset.
        out: folder to create (written atomically).
        force: replace an existing ``out``.
        **options: :class:`RecformerOptions` fields.

    Returns:
        the content of ``results.json``: ``{"model": "recformer", "valid", "test",
        "test-shuffled" (metrics), "best", "steps", "epochs_run", "stopped_early",
        "train_seconds" (training + validations), "seconds" (the whole call), "timings",
        "options", "text": encoder info, "data"}``.

    Raises:
        InputError: ``out`` exists without ``force``; unknown options; no user with 2
            training items; an encoder that cannot be loaded; diverged training.
        ValueError: invalid option values.
    """
    t0 = time.perf_counter()
    known = {f.name for f in fields(RecformerOptions)}
    bad = sorted(set(options) - known)
    if bad:
        raise InputError(f"recformer: unknown option(s) {', '.join(bad)} (its options: {', '.join(sorted(known))})")
    opts = RecformerOptions(**{k: v for k, v in options.items() if v is not None})
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    device = torch.device(opts.device)
    train_seqs = {u: np.asarray(ds.seqs[u][:-2], dtype=np.int64) for u in range(1, ds.n_users + 1)}
    users = np.asarray([u for u, s in train_seqs.items() if s.size >= 2], dtype=np.int64)
    if users.size == 0:
        raise InputError(f"{ds.root}: no user has at least 2 training items (seq[:-2]); cannot train RECFORMER")
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    model, tokenizer, text_info = _new_model(opts, device)
    tok = item_tokens(ds, tokenizer, opts.item_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    batches = int(np.ceil(users.size / opts.batch_size))
    state = {"order": None, "items": None, "stage": 1, "refreshes": 0}
    timings = {"item_refresh": 0.0}

    def refresh() -> None:
        t = time.perf_counter()
        state["items"] = _item_matrix(model, tok, ds.n_items, opts.eval_batch, device)
        state["refreshes"] += 1
        timings["item_refresh"] += time.perf_counter() - t

    def begin_epoch(epoch: int) -> None:
        state["order"] = rng.permutation(users)
        state["stage"] = 1 if epoch < opts.stage1_epochs else 2
        if state["stage"] == 1 or state["items"] is None or epoch == opts.stage1_epochs:
            refresh()  # stage 1: every epoch; stage 2: once at its start, then frozen

    def step(epoch: int, b: int) -> dict[str, float]:
        model.train()
        uids = state["order"][b * opts.batch_size : (b + 1) * opts.batch_size]
        hist, targets = [], []
        for u in uids:
            s = train_seqs[int(u)]
            cut = int(rng.integers(1, s.size))  # history s[:cut] -> target s[cut]
            hist.append(s[:cut])
            targets.append(int(s[cut]))
        rows = [user_tokens(h, tok, opts.max_tokens, opts.max_items)[:3] for h in hist]
        b_user = _batch(rows, tok.pad, device)
        u = F.normalize(model(b_user["ids"], b_user["types"], b_user["positions"], b_user["mask"]), dim=-1)
        tgt = torch.tensor(targets, device=device)
        stored = F.normalize(state["items"][1:], dim=-1)  # (N, H), no gradient
        logits_s = u @ stored.T / opts.temperature
        if state["stage"] == 1:  # the targets encoded now (with gradient): in-batch negatives
            b_item = _batch([_item_input(t, tok) for t in targets], tok.pad, device)
            fresh = F.normalize(model(b_item["ids"], b_item["types"], b_item["positions"], b_item["mask"]), dim=-1)
            logits_f = u @ fresh.T / opts.temperature
            same = tgt[:, None] == tgt[None, :]
            logits_f = logits_f.masked_fill(same & ~torch.eye(len(targets), dtype=torch.bool, device=device),
                                            float("-inf"))
            logits_s = logits_s.scatter(1, (tgt - 1)[:, None], float("-inf"))  # the positive is the fresh one
            logits = torch.cat([logits_f, logits_s], dim=1)
            labels = torch.arange(len(targets), device=device)
        else:
            logits, labels = logits_s, tgt - 1
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    valid_hist, valid_cand = _view_inputs(ds, "valid")

    def validate(steps: int) -> dict[str, float]:
        if state["stage"] == 1:
            refresh()  # stage 1 scores with the current encoder's items; stage 2 with the frozen ones
        m = _metrics(_scores(model, tok, state["items"], valid_hist, valid_cand, opts, device))
        if not all(np.isfinite(v) for v in m.values()):
            raise InputError(f"RECFORMER training diverged at step {steps}; lower --lr")
        log(f"[recformer] step {steps} (stage {state['stage']}): valid NDCG@10 {m['NDCG@10']:.4f}, "
            f"{time.perf_counter() - t0:.0f} s")
        return m

    def keep() -> dict:
        return {"model": model.state_dict(), "items": state["items"].clone(), "stage": state["stage"]}

    def record(t: Tick) -> dict:
        rec = {"step": t.step, "epoch": t.progress, "stage": state["stage"], "loss": t.terms["loss"],
               "seconds": round(t.seconds, 2)}
        return rec if t.metrics is None else {**rec, **t.metrics, "best": t.improved}

    fit = train_loop(step, validate, keep, record, epochs=opts.epochs, batches=batches, every=opts.eval_every,
                     max_steps=opts.max_steps, select="NDCG@10", patience=opts.patience, begin_epoch=begin_epoch,
                     progress=progress, desc="RECFORMER")
    model.load_state_dict(fit.state["model"])
    items = fit.state["items"]
    model.eval()
    res_views = {}
    t_test = time.perf_counter()
    for view in ("test", "test-shuffled"):
        hist, cand = _view_inputs(ds, view)
        res_views[view] = _metrics(_scores(model, tok, items, hist, cand, opts, device))
    t_test = time.perf_counter() - t_test
    results = {
        "model": "recformer",
        "valid": fit.best["metrics"], **res_views,
        "best": fit.best, "steps": fit.steps, "epochs_run": fit.epochs_run, "stopped_early": fit.stopped_early,
        "train_seconds": round(fit.seconds, 2),
        "seconds": round(time.perf_counter() - t0, 2),
        "timings": {"steps": round(fit.step_seconds, 2), "validations": round(fit.validation_seconds, 2),
                    "per_step": round(fit.step_seconds / max(fit.steps, 1), 3),
                    "item_refresh": round(timings["item_refresh"], 2), "item_refreshes": state["refreshes"],
                    "test_and_shuffled": round(t_test, 2), "threads": torch.get_num_threads()},
        "selected_stage": fit.state["stage"],
        "options": asdict(opts),
        "text": text_info,
        "data": {"root": str(ds.root), "digest": getattr(ds, "digest", None)},
    }
    config = {"model": "recformer", "n_items": ds.n_items, "encoder": model.encoder.config.to_dict(),
              "pooling": model.pooling, "max_items": opts.max_items, "max_tokens": opts.max_tokens,
              "item_tokens": opts.item_tokens, "temperature": opts.temperature, "text": text_info}
    with atomic_dir(out, force=force) as tmp:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        tensors["item_vectors"] = items.detach().cpu().contiguous()
        (tmp / WEIGHTS).write_bytes(save_torch(tensors, metadata={"format": "pt", "model": "recformer"}))
        write_json(tmp / CONFIG, json.loads(json.dumps(config, default=str)))
        tokenizer.save_pretrained(tmp)
        write_history(tmp / "history.jsonl", fit.history)
        write_json(tmp / "results.json", results)
    log(f"[recformer] {fit.steps} steps, selected step {fit.best['step']}, test NDCG@10 "
        f"{res_views['test']['NDCG@10']:.4f}, {results['seconds']:.0f} s")
    return results


# --- checkpoint -----------------------------------------------------------------------------------


def load_recformer(checkpoint: str | Path, device: str = "cpu") -> tuple[Recformer, object, torch.Tensor, dict]:
    """Load a checkpoint written by :func:`train_recformer`.

    Returns:
        ``(model in eval mode, tokenizer, item matrix (N+1, H), config dict)``.

    Raises:
        InputError: missing or malformed files, another model's checkpoint, mismatched weights.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # deferred: slow import

    ckpt = Path(checkpoint)
    for p in (ckpt / CONFIG, ckpt / WEIGHTS):
        if not p.is_file():
            raise InputError(f"{p}: not found (not a RECFORMER checkpoint folder)")
    try:
        cfg = json.loads((ckpt / CONFIG).read_text())
    except ValueError as e:
        raise InputError(f"{ckpt / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model") != "recformer":
        raise InputError(f"{ckpt / CONFIG}: field 'model' is not 'recformer'")
    try:
        enc_cfg = dict(cfg["encoder"])
        kind = enc_cfg.pop("model_type")
        encoder = AutoModel.from_config(AutoConfig.for_model(kind, **enc_cfg))
        model = Recformer(encoder, cfg["pooling"], int(cfg["max_items"]))
        tokenizer = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise InputError(f"{ckpt}: cannot build the RECFORMER encoder ({str(e).splitlines()[0] if str(e) else e})") from None
    try:
        state = load_file(str(ckpt / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{ckpt / WEIGHTS}: cannot read safetensors ({e})") from None
    items = state.pop("item_vectors", None)
    if items is None:
        raise InputError(f"{ckpt / WEIGHTS}: no item_vectors tensor")
    try:
        model.load_state_dict(state, strict=False)  # the encoder's non-persistent buffers are rebuilt
        missing = [k for k in model.state_dict() if k not in state and not k.endswith("position_ids")]
        if missing:
            raise RuntimeError(f"missing {missing[0]}")
    except RuntimeError as e:
        raise InputError(f"{ckpt / WEIGHTS}: weights do not match {CONFIG} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer, items.to(device), cfg


def recformer_scores(ds: "PreparedDataset", checkpoint: str | Path, views: Sequence[str] = VIEWS,
                     device: str = "cpu", batch: int = 32) -> dict[str, np.ndarray]:
    """Scores of a saved RECFORMER on the stored candidates: ``{view: float32 (U, 1+m)}`` for
    ``valid``, ``test``, ``test-shuffled`` (test candidates, last 10 inputs permuted, seed 0).

    Raises:
        InputError: an unreadable checkpoint or one trained for another item count.
    """
    model, tokenizer, items, cfg = load_recformer(checkpoint, device)
    if int(cfg.get("n_items", -1)) != ds.n_items:
        raise InputError(f"{Path(checkpoint) / CONFIG}: n_items {cfg.get('n_items')} does not match the dataset "
                         f"{ds.root} ({ds.n_items} items)")
    tok = item_tokens(ds, tokenizer, int(cfg["item_tokens"]))
    opts = RecformerOptions(max_tokens=int(cfg["max_tokens"]), item_tokens=int(cfg["item_tokens"]),
                            max_items=int(cfg["max_items"]), temperature=float(cfg["temperature"]), eval_batch=batch)
    out = {}
    for view in views:
        hist, cand = _view_inputs(ds, view)
        out[view] = _scores(model, tok, items, hist, cand, opts, torch.device(device))
    return out


def evaluate_recformer_checkpoint(ds: "PreparedDataset", checkpoint: str | Path, device: str = "cpu") -> dict:
    """``llmsrec evaluate --model recformer``: ``{"valid", "test", "test-shuffled"}`` metrics
    (NDCG@10/20, HR@10/20) of a saved RECFORMER.

    Raises:
        InputError: see :func:`recformer_scores`.
    """
    return {v: _metrics(s) for v, s in recformer_scores(ds, checkpoint, device=device).items()}
