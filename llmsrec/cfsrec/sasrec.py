"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

The CF-SRec teacher of LLM-SRec, configured as the paper uses it (Appendix E: hidden 64,
2 blocks, 1 head, maxlen 128, dropout 0.1). For a left-padded item sequence
``s_1..s_L`` it computes, position by position,

    x_t   = E[s_t] * sqrt(d) + P[t]                 (item + learned positional embedding)
    x     = Dropout(x) * m                          (m_t = 1 for a real item, 0 for padding)
    for each block b:                               (Kang & McAuley's block, as in their code)
        q = LN_b1(x)
        x = q + MHA(queries=q, keys=x, values=x)    (causal, padding keys masked)
        y = LN_b2(x)
        x = (y + FFN(y)) * m                        (FFN: Linear-ReLU-Dropout-Linear-Dropout)
    F     = LN_final(x)                              (B, L, d)

The user representation O_u is ``F[:, -1]`` (the last position, model in eval mode) and an
item i is scored by the dot product ``<O_u, E[i]>`` with the *raw* embedding row E[i]
(not scaled by sqrt(d)); E's row 0 is the padding item and is kept at zero.

Left padding does not change O_u: position ids are counted from the right end of the
window (as if every sequence were padded to ``maxlen``), and padding keys are masked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from llmsrec.defaults import SASREC_TRAINING

__all__ = ["SASRecConfig", "SASRec", "pad_left"]


def check_positive_ints(config, names) -> None:
    """Make the named fields of a model config plain positive ``int`` (numpy ints accepted).

    Raises:
        ValueError: a field that is not a positive integer (named as ``ClassName.field``).
    """
    for name in names:
        v = getattr(config, name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {v!r}")
        setattr(config, name, int(v))


def check_seqs(seqs: torch.Tensor, maxlen: int, n_items: int) -> None:
    """The input check every CF-SRec model's forward shares.

    Raises:
        ValueError: ``seqs`` is not 2-D ``(B, L)``, ``L > maxlen``, or holds ids outside 0..N.
    """
    if seqs.dim() != 2:
        raise ValueError(f"seqs must be (batch, length), got shape {tuple(seqs.shape)}")
    if seqs.shape[1] > maxlen:
        raise ValueError(f"sequence length {seqs.shape[1]} exceeds maxlen {maxlen}; use pad_left")
    if seqs.numel() and (int(seqs.min()) < 0 or int(seqs.max()) > n_items):
        raise ValueError(f"item ids must be in 0..{n_items}")


@dataclass
class SASRecConfig:
    """Hyper-parameters of :class:`SASRec` (defaults: the paper's Appendix E).

    Attributes:
        n_items: number of items N; item ids are 1..N, 0 is padding.
        hidden: embedding and model width d.
        blocks: number of self-attention blocks.
        heads: attention heads (``hidden`` must be divisible by it).
        dropout: dropout rate on embeddings, attention weights and the FFN.
        maxlen: longest input window; longer sequences keep their last ``maxlen`` items.
    """

    n_items: int
    hidden: int = SASREC_TRAINING["hidden"]
    blocks: int = SASREC_TRAINING["blocks"]
    heads: int = SASREC_TRAINING["heads"]
    dropout: float = SASREC_TRAINING["dropout"]
    maxlen: int = SASREC_TRAINING["maxlen"]

    def __post_init__(self) -> None:
        check_positive_ints(self, ("n_items", "hidden", "blocks", "heads", "maxlen"))
        if self.hidden % self.heads:
            raise ValueError(f"SASRecConfig.hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)

    def to_dict(self) -> dict:
        return asdict(self)


class _CausalSelfAttention(nn.Module):
    """Multi-head attention whose queries come from LN(x) and keys/values from x."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # queries, keys: (B, L, d); allowed: bool (B, 1, L, L), True where query i may see key j
        b, L, d = queries.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, L, h, d // h).transpose(1, 2)  # (B, h, L, d/h)

        q, k, v = split(self.q(queries)), split(self.k(keys)), split(self.v(keys))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)  # (B, h, L, L)
        att = att.masked_fill(~allowed, float("-inf"))
        att = self.dropout(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, L, d)
        return self.out(y)


class _Block(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        d = cfg.hidden
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.attn = _CausalSelfAttention(d, cfg.heads, cfg.dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(d, d), nn.Dropout(cfg.dropout)
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        x = q + self.attn(q, x, allowed)
        y = self.ffn_norm(x)
        return (y + self.ffn(y)) * keep


class SASRec(nn.Module):
    """The SASRec CF-SRec (Kang & McAuley 2018), see the module docstring for the equations.

    Args:
        config: a :class:`SASRecConfig`.

    Parameters of note: ``item_emb`` (N+1, d) with ``padding_idx=0`` (row 0 zero and
    never updated), ``pos_emb`` (maxlen, d). All matrices are xavier-normal initialised,
    biases zero, LayerNorms identity.
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(config.maxlen, d)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.blocks))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal for every weight matrix, zero biases, then a zero padding row."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.xavier_normal_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)  # LayerNorm weights
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    # -- the three things later stages use -------------------------------------------------

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Contextual outputs F for every position.

        Args:
            seqs: int64 ``(B, L)`` item ids, left-padded with 0, ``L <= maxlen``.

        Returns:
            float32 ``(B, L, d)``; position t depends only on items at positions <= t.
            Rows at padding positions are LN_final(0) (meaningless, never used).

        Raises:
            ValueError: ``seqs`` is not 2-D, ``L > maxlen``, or holds ids outside 0..N.
        """
        check_seqs(seqs, self.config.maxlen, self.config.n_items)
        b, L = seqs.shape
        keep = (seqs != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)  # (B, L, 1)
        # positions counted from the right: the last column is always maxlen-1
        pos = torch.arange(self.config.maxlen - L, self.config.maxlen, device=seqs.device)
        x = self.item_emb(seqs) * math.sqrt(self.config.hidden) + self.pos_emb(pos)[None]
        x = self.emb_dropout(x) * keep
        causal = torch.ones(L, L, dtype=torch.bool, device=seqs.device).tril()
        allowed = causal[None] & (seqs != 0)[:, None, :]  # (B, L query, L key)
        # a query with no visible key (a padding position) may see itself: keeps softmax
        # finite; its output is zeroed by `keep` and no real position attends to it.
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=seqs.device)[None]
        allowed = allowed[:, None]  # broadcast over heads
        for block in self.blocks:
            x = block(x, allowed, keep)
        return self.final_norm(x)

    def user_representation(self, seqs: torch.Tensor) -> torch.Tensor:
        """O_u: the output at the last position (after the final LayerNorm).

        Args:
            seqs: int64 ``(B, L)`` left-padded histories (the last column is the most
                recent item). Call ``model.eval()`` first: the teacher never runs with
                dropout.

        Returns:
            float32 ``(B, d)``.
        """
        return self.forward(seqs)[:, -1, :]

    def item_embeddings(self) -> torch.Tensor:
        """E: the raw item-embedding matrix ``(N+1, d)`` float32, row 0 (padding) zero."""
        return self.item_emb.weight

    def score(self, seqs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Dot-product scores ``<O_u, E[c]>`` of candidate items.

        Args:
            seqs: int64 ``(B, L)`` left-padded histories.
            candidates: int64 ``(B, C)`` item ids.

        Returns:
            float32 ``(B, C)``.
        """
        o = self.user_representation(seqs)  # (B, d)
        return torch.einsum("bd,bcd->bc", o, self.item_emb(candidates))


def pad_left(seqs: Sequence[np.ndarray | Sequence[int]], maxlen: int) -> torch.Tensor:
    """Left-pad item sequences with 0 into one batch, keeping the last ``maxlen`` items.

    Args:
        seqs: B sequences of item ids (any int arrays/lists, possibly empty).
        maxlen: output width.

    Returns:
        int64 ``(B, maxlen)``; row b ends with the last ``min(len, maxlen)`` items of seqs[b].

    Raises:
        ValueError: ``maxlen < 1``.
    """
    if maxlen < 1:
        raise ValueError(f"maxlen must be >= 1, got {maxlen}")
    out = np.zeros((len(seqs), maxlen), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)[-maxlen:]
        if s.size:
            out[i, maxlen - s.size :] = s
    return torch.from_numpy(out)
