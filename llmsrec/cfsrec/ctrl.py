"""CTRL (Li et al. 2023) as the LLM-SRec paper uses it (Appendix D): the backbone CF-SRec
(SASRec) starts with item embeddings taken from a text encoder, then is fine-tuned for
next-item prediction.

Item table (``CTRL.item_embeddings()``, ``(N+1, d)``)::

    E_i = W t_i + b + D_i        (row 0, padding, is zero)

``t_i`` is the frozen text-encoder vector of item i's text (:func:`llmsrec.cfsrec.textenc.item_text`:
title and attributes), ``W, b`` a learned linear map from the encoder width to the backbone
width d, and ``D`` a free ID table that starts at zero. So before training ``E`` equals the
mapped text embeddings; fine-tuning then moves ``W, b, D`` and the backbone together, with
SASRec's loss and the same validation / early stopping as every CF-SRec
(:func:`llmsrec.cfsrec.train.train_cfsrec`, model ``ctrl``).

The CTRL paper first aligns the text and ID sides contrastively. ``align_epochs > 0``
runs such a stage before fine-tuning: ``D`` stays zero and only ``W, b`` and the backbone train
with an InfoNCE loss between each position's sequence state and the mapped text embedding
of its next item (in-batch negatives, temperature ``align_temperature``). With the default
``align_epochs = 0`` there is no alignment stage and ``W`` starts xavier-normal.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmsrec.cfsrec.sasrec import SASRec, SASRecConfig
from llmsrec.cfsrec.textenc import DEFAULT_TEXT_ENCODER, item_fields, item_text, load_text_encoder

if TYPE_CHECKING:  # pragma: no cover
    from llmsrec.data import PreparedDataset

__all__ = ["CTRLConfig", "CTRL", "TextItemTable", "prepare_ctrl", "item_text_embeddings"]


@dataclass
class CTRLConfig(SASRecConfig):
    """SASRec's fields plus the text side.

    Attributes:
        text_dim: width of the text-encoder vectors (384 for all-MiniLM-L6-v2).
        text_encoder: the encoder that built the item vectors (a bundled name or a folder;
            recorded, read only when the model is trained).
        align_epochs: epochs of the contrastive alignment stage before fine-tuning (0 = none).
        align_temperature: its InfoNCE temperature.
    """

    text_dim: int = 384
    text_encoder: str = DEFAULT_TEXT_ENCODER
    align_epochs: int = 0
    align_temperature: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.text_dim) < 1:
            raise ValueError(f"text_dim must be >= 1, got {self.text_dim}")
        if int(self.align_epochs) < 0:
            raise ValueError(f"align_epochs must be >= 0, got {self.align_epochs}")
        if not float(self.align_temperature) > 0:
            raise ValueError(f"align_temperature must be > 0, got {self.align_temperature}")
        self.text_dim, self.align_epochs = int(self.text_dim), int(self.align_epochs)
        self.align_temperature = float(self.align_temperature)
        self.text_encoder = str(self.text_encoder)

    def to_dict(self) -> dict:
        return asdict(self)


class TextItemTable(nn.Module):
    """``E = mask * (W t + b) + D``: an item table that behaves like ``nn.Embedding``
    (``table(ids)`` looks rows up, ``table.weight`` is the whole ``(N+1, d)`` table).

    Buffers: ``text`` float32 ``(N+1, text_dim)`` (row 0 zero; saved with the model).
    Parameters: ``map`` (Linear text_dim -> d), ``delta`` ``(N+1, d)`` (D, starts at zero).
    """

    def __init__(self, n_items: int, text_dim: int, d: int) -> None:
        super().__init__()
        self.register_buffer("text", torch.zeros(n_items + 1, text_dim))
        self.map = nn.Linear(text_dim, d)
        self.delta = nn.Parameter(torch.zeros(n_items + 1, d))
        mask = torch.ones(n_items + 1, 1)
        mask[0] = 0
        self.register_buffer("row_mask", mask, persistent=False)

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.map.weight)
        nn.init.zeros_(self.map.bias)
        with torch.no_grad():
            self.delta.zero_()

    def mapped_text(self) -> torch.Tensor:
        """``mask * (W t + b)``: float ``(N+1, d)``, row 0 zero."""
        return self.map(self.text) * self.row_mask

    @property
    def weight(self) -> torch.Tensor:
        """The item table E, float ``(N+1, d)``, row 0 zero."""
        return self.mapped_text() + self.delta * self.row_mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class CTRL(SASRec):
    """SASRec whose item table is a :class:`TextItemTable` (see the module docstring).

    ``forward``, ``user_representation``, ``item_embeddings`` and ``score`` are SASRec's;
    call :meth:`set_text` with the item vectors before training (:func:`prepare_ctrl` does).
    """

    def __init__(self, config: CTRLConfig) -> None:
        super().__init__(config)
        self.item_emb = TextItemTable(config.n_items, config.text_dim, config.hidden)
        self.item_emb.reset_parameters()

    def reset_parameters(self) -> None:
        """SASRec's initialisation, then the item table's (xavier-normal W, zero b and D)."""
        super().reset_parameters()
        if isinstance(self.item_emb, TextItemTable):  # SASRec's __init__ calls this before the table exists
            self.item_emb.reset_parameters()

    def set_text(self, text: torch.Tensor) -> None:
        """Store the item text vectors ``(N+1, text_dim)`` (row 0 is zeroed).

        Raises:
            ValueError: a wrong shape.
        """
        want = tuple(self.item_emb.text.shape)
        if tuple(text.shape) != want:
            raise ValueError(f"text vectors of shape {tuple(text.shape)}, expected {want}")
        with torch.no_grad():
            self.item_emb.text.copy_(text.to(self.item_emb.text))
            self.item_emb.text[0].zero_()


def item_text_embeddings(ds: "PreparedDataset", text_encoder: str = DEFAULT_TEXT_ENCODER,
                         device: str = "cpu") -> tuple[torch.Tensor, dict]:
    """The text-encoder vector of every item's text (:func:`~llmsrec.cfsrec.textenc.item_text`).

    Returns:
        ``(vectors float32 (N+1, H) with row 0 zero, info {"text_encoder", "digest",
        "pooling", "normalize", "example", "seconds"})``.

    Raises:
        InputError: the encoder cannot be found or loaded.
    """
    t0 = time.perf_counter()
    enc = load_text_encoder(text_encoder, device=device)
    texts = [item_text(f) for f in item_fields(ds)[1:]]
    vec = torch.zeros(ds.n_items + 1, enc.dim)
    vec[1:] = enc.encode(texts)
    info = {"text_encoder": str(text_encoder), "digest": enc.digest, "pooling": enc.pooling,
            "normalize": enc.normalize, "example": texts[0] if texts else "",
            "seconds": round(time.perf_counter() - t0, 2)}
    return vec, info


def _align(net: CTRL, data, rng: np.random.Generator, batch_size: int, lr: float) -> list[float]:
    """The alignment stage: ``align_epochs`` epochs of InfoNCE between sequence states and the
    mapped text vectors of the next items (D frozen at zero). Returns each epoch's mean loss."""
    cfg = net.config
    net.item_emb.delta.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.98))
    dev = next(net.parameters()).device
    losses = []
    net.train()
    for _ in range(cfg.align_epochs):
        order = rng.permutation(data.uids.size)
        total, count = 0.0, 0
        for s in range(0, order.size, batch_size):
            idx = order[s : s + batch_size]
            inp = torch.from_numpy(data.inputs[idx]).to(dev)
            pos = torch.from_numpy(data.targets[idx]).to(dev)
            mask = pos != 0
            feats = F.normalize(net(inp)[mask], dim=-1)  # (P, d)
            targets = pos[mask]
            items, col = torch.unique(targets, return_inverse=True)  # in-batch candidate items
            text = F.normalize(net.item_emb.mapped_text()[items], dim=-1)  # (I, d)
            loss = F.cross_entropy(feats @ text.T / cfg.align_temperature, col)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * int(mask.sum())
            count += int(mask.sum())
        losses.append(total / max(count, 1))
    net.item_emb.delta.requires_grad_(True)
    return losses


def prepare_ctrl(net: CTRL, ds: "PreparedDataset", data, rng: np.random.Generator, *, batch_size: int,
                 lr: float, device: str = "cpu") -> dict:
    """Before fine-tuning: encode the item texts into ``net`` (:meth:`CTRL.set_text`) and run
    the alignment stage when ``net.config.align_epochs > 0``.

    Args:
        net: a fresh :class:`CTRL`.
        ds: the prepared dataset; data: its :class:`~llmsrec.cfsrec.train.TrainingData`.
        rng: the trainer's generator (the alignment's user order).
        batch_size, lr: the trainer's (the alignment uses them too).

    Returns:
        ``{"text": item_text_embeddings' info, "align_losses": [...], "align_seconds"}``,
        recorded in ``results.json``.

    Raises:
        InputError: the text encoder cannot be found or loaded.
    """
    vec, info = item_text_embeddings(ds, net.config.text_encoder, device=device)
    if vec.shape[1] != net.config.text_dim:
        from llmsrec.errors import InputError

        raise InputError(f"--text-encoder {net.config.text_encoder}: vectors of width {vec.shape[1]}, "
                         f"the CTRL config says text_dim {net.config.text_dim}")
    net.set_text(vec)
    t0 = time.perf_counter()
    losses = _align(net, data, rng, batch_size, lr) if net.config.align_epochs else []
    return {"text": info, "align_losses": [round(x, 6) for x in losses],
            "align_seconds": round(time.perf_counter() - t0, 2)}
