"""BERT4Rec: sequential recommendation with bidirectional encoder representations from
transformer (Sun et al., CIKM 2019).

A CF-SRec baseline of the paper's Table 6 (Appendix D). Token ids: 0 = padding, 1..N =
items, N+1 = the ``[mask]`` token. For a left-padded token sequence ``s_1..s_T`` it computes

    x_t = Dropout(LN(E[s_t] + P[t]))                     (item + learned positional embedding)
    for each block:                                      (post-LN transformer, as BERT)
        x = LN(x + Dropout(MHA(x, x, x)))                (bidirectional; padding keys masked)
        x = LN(x + Dropout(W2 GELU(W1 x)))               (FFN width 4d)
    F_t = GELU(W_p x_t + b_p)                            (Sun et al.'s output projection)

and scores item i at position t by ``<F_t, E[i]>`` (the shared item embedding; Sun et
al.'s extra per-item output bias is left out so that a score is a plain dot product of O_u
and E, as the LLM-SRec teacher interface needs).

Training is the cloze task (:func:`cloze_batch`): random positions of a training
sequence are replaced by ``[mask]`` and predicted from both sides. At prediction time a
``[mask]`` is appended after the history and its output is the user representation
O_u. Positions are counted from the right end of the window (as if padded to
``maxlen + 1``) and padding keys are masked, so left padding does not change O_u.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmsrec.cfsrec.sasrec import check_positive_ints, check_seqs

__all__ = ["BERT4RecConfig", "BERT4Rec", "cloze_batch"]


@dataclass
class BERT4RecConfig:
    """Hyper-parameters of :class:`BERT4Rec` (defaults: Sun et al. / RecBole 1.2.1, d = 64).

    Attributes:
        n_items: number of items N; item ids are 1..N, 0 is padding, N+1 is ``[mask]``.
        hidden: model width d (also the width of E and O_u).
        blocks: transformer blocks.
        heads: attention heads (``hidden`` must be divisible by it).
        dropout: dropout on embeddings, attention weights and the FFN.
        maxlen: longest history window; the model reads ``maxlen + 1`` tokens (the
            history and the appended ``[mask]``).
        mask_prob: cloze training: probability that a position is masked (Sun et al.: 0.2
            for MovieLens).
        mask_last_prob: cloze training: probability that a training sequence instead has
            only its last item masked (Sun et al.'s extra samples that match prediction).
    """

    n_items: int
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.2
    maxlen: int = 128
    mask_prob: float = 0.2
    mask_last_prob: float = 0.1

    def __post_init__(self) -> None:
        check_positive_ints(self, ("n_items", "hidden", "blocks", "heads", "maxlen"))
        if self.hidden % self.heads:
            raise ValueError(f"BERT4RecConfig.hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"BERT4RecConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < float(self.mask_prob) <= 1.0:
            raise ValueError(f"BERT4RecConfig.mask_prob must be in (0, 1], got {self.mask_prob!r}")
        if not 0.0 <= float(self.mask_last_prob) <= 1.0:
            raise ValueError(f"BERT4RecConfig.mask_last_prob must be in [0, 1], got {self.mask_last_prob!r}")
        self.dropout, self.mask_prob = float(self.dropout), float(self.mask_prob)
        self.mask_last_prob = float(self.mask_last_prob)

    @property
    def mask_id(self) -> int:
        """Token id of ``[mask]``: N+1."""
        return self.n_items + 1

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cfg: BERT4RecConfig) -> None:
        super().__init__()
        d = cfg.hidden
        self.heads = cfg.heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.attn_norm = nn.LayerNorm(d, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ffn_norm = nn.LayerNorm(d, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d); allowed: bool (B, 1, T, T), True where query i may see key j
        b, T, d = x.shape
        h = self.heads
        q, k, v = (t.view(b, T, h, d // h).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
        att = self.attn_dropout(torch.softmax(att.masked_fill(~allowed, float("-inf")), dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, T, d)
        x = self.attn_norm(x + self.dropout(self.proj(y)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class BERT4Rec(nn.Module):
    """The BERT4Rec CF-SRec, see the module docstring for the equations.

    Args:
        config: a :class:`BERT4RecConfig`.

    Parameters: ``item_emb`` (N+2, d) with ``padding_idx=0`` (row N+1 is ``[mask]``),
    ``pos_emb`` (maxlen+1, d), ``blocks``, ``out`` (the output projection W_p). All weights
    are N(0, 0.02) as in BERT, biases zero, LayerNorms identity, padding row zero.
    """

    def __init__(self, config: BERT4RecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden
        self.item_emb = nn.Embedding(config.n_items + 2, d, padding_idx=0)
        self.pos_emb = nn.Embedding(config.maxlen + 1, d)
        self.emb_norm = nn.LayerNorm(d, eps=1e-12)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.blocks))
        self.out = nn.Linear(d, d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) weights (BERT's initialisation), zero biases, identity LayerNorms."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Outputs F for every position (bidirectional).

        Args:
            tokens: int64 ``(B, T)`` ids in 0..N+1 (N+1 = ``[mask]``), left-padded with 0,
                ``T <= maxlen + 1``.

        Returns:
            float32 ``(B, T, d)`` in the space of E (score item i at t by ``<F_t, E[i]>``).
            Rows at padding positions are meaningless (never used).

        Raises:
            ValueError: ``tokens`` is not 2-D, ``T > maxlen + 1``, or holds ids outside 0..N+1.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}")
        b, T = tokens.shape
        width = self.config.maxlen + 1
        if T > width:
            raise ValueError(f"token length {T} exceeds maxlen + 1 = {width}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > self.config.mask_id):
            raise ValueError(f"token ids must be in 0..{self.config.mask_id}")
        real = tokens != 0
        pos = torch.arange(width - T, width, device=tokens.device)  # counted from the right
        x = self.emb_dropout(self.emb_norm(self.item_emb(tokens) + self.pos_emb(pos)[None]))
        # a padding query may see itself (keeps softmax finite); no real query sees padding
        allowed = real[:, None, :] | torch.eye(T, dtype=torch.bool, device=tokens.device)[None]
        allowed = allowed[:, None]  # broadcast over heads
        for block in self.blocks:
            x = block(x, allowed)
        return F.gelu(self.out(x))

    def user_representation(self, seqs: torch.Tensor) -> torch.Tensor:
        """O_u: the output at a ``[mask]`` appended after the history.

        Args:
            seqs: int64 ``(B, L)`` left-padded histories, ids in 0..N, ``L <= maxlen``.
                Call ``model.eval()`` first.

        Returns:
            float32 ``(B, d)``.

        Raises:
            ValueError: ``L > maxlen`` or ids outside 0..N.
        """
        check_seqs(seqs, self.config.maxlen, self.config.n_items)
        mask_col = torch.full((seqs.shape[0], 1), self.config.mask_id, dtype=seqs.dtype, device=seqs.device)
        return self.forward(torch.cat([seqs, mask_col], dim=1))[:, -1, :]

    def item_embeddings(self) -> torch.Tensor:
        """E: the item rows of the embedding matrix ``(N+1, d)`` float32 (row 0, padding, zero;
        the ``[mask]`` row is not included)."""
        return self.item_emb.weight[: self.config.n_items + 1]

    def score(self, seqs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Dot-product scores ``<O_u, E[c]>``: seqs int64 ``(B, L)``, candidates int64 ``(B, C)`` -> ``(B, C)``."""
        o = self.user_representation(seqs)
        return torch.einsum("bd,bcd->bc", o, self.item_emb(candidates))


def cloze_batch(
    sequences: np.ndarray, rng: np.random.Generator, mask_prob: float, mask_last_prob: float, mask_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mask a batch of training sequences for the cloze task (Sun et al. 2019, Sec. 3.6).

    With probability ``mask_last_prob`` a row has only its last item masked; otherwise
    each real position is masked with probability ``mask_prob`` (a row where none was
    drawn gets its last item masked). Which positions are masked depends only on ``rng``
    and on where the padding is, never on the item ids.

    Args:
        sequences: int64 ``(B, T)`` left-padded item ids (every row has a real item).
        rng: numpy Generator (consumes ``B`` + ``B*T`` uniforms).
        mask_prob, mask_last_prob: see :class:`BERT4RecConfig`.
        mask_id: the ``[mask]`` token id (N+1).

    Returns:
        ``(inputs, labels)``, int64 ``(B, T)``: ``inputs`` is ``sequences`` with masked
        positions set to ``mask_id``; ``labels`` holds the original item at masked
        positions and 0 elsewhere.
    """
    real = sequences != 0
    last_only = rng.random(sequences.shape[0]) < mask_last_prob
    masked = (rng.random(sequences.shape) < mask_prob) & real
    masked[last_only] = False
    none = ~masked.any(axis=1)
    masked[none, -1] = real[none, -1]  # left padding: the last column is the most recent item
    inputs = np.where(masked, mask_id, sequences)
    labels = np.where(masked, sequences, 0)
    return inputs.astype(np.int64), labels.astype(np.int64)
