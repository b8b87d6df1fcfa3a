"""NextItNet: a simple convolutional generative network for next item recommendation
(Yuan et al., WSDM 2019).

A CF-SRec baseline of the paper's Table 6 (Appendix D). For a left-padded item sequence
``s_1..s_L`` (m_t = 1 for a real item, 0 for padding) it computes

    x_t = E[s_t] * m_t                                   (B, L, d)
    for each residual block b with dilation r_b:         (the paper's block, Fig. 3b)
        y = ReLU(LN(CausalConv_{k, r_b}(x))) * m
        y = ReLU(LN(CausalConv_{k, 2 r_b}(y))) * m
        x = x + y
    F_t = (W x_t + b) * m_t

where ``CausalConv_{k, r}`` is a 1-D convolution over time with kernel k and dilation r,
left-padded with ``(k-1) r`` zeros, so position t sees only positions <= t. Multiplying by
m keeps padding positions at exactly 0 in every layer, so left padding acts like the
convolution's own zero padding and does not change F at real positions.

O_u is ``F[:, -1]`` and an item i is scored by ``<O_u, E[i]>`` with the raw embedding row
E[i] (row 0 zero), as for :class:`~llmsrec.cfsrec.sasrec.SASRec`; Yuan et al. train with
a softmax cross-entropy over the items (the trainer's ``ce`` loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmsrec.cfsrec.sasrec import check_positive_ints, check_seqs

__all__ = ["NextItNetConfig", "NextItNet"]


@dataclass
class NextItNetConfig:
    """Hyper-parameters of :class:`NextItNet`.

    Attributes:
        n_items: number of items N; item ids are 1..N, 0 is padding.
        hidden: width d of the embeddings, the convolution channels and O_u.
        kernel: convolution kernel size k (Yuan et al.: 3).
        dilations: one residual block per entry r; its two convolutions use dilations r
            and 2r (default ``(1, 4, 1, 4)``: receptive field of 61 items).
        dropout: dropout on the item embeddings (Yuan et al. use none: 0).
        maxlen: longest input window; longer sequences keep their last ``maxlen`` items.
    """

    n_items: int
    hidden: int = 64
    kernel: int = 3
    dilations: tuple[int, ...] = field(default=(1, 4, 1, 4))
    dropout: float = 0.0
    maxlen: int = 128

    def __post_init__(self) -> None:
        check_positive_ints(self, ("n_items", "hidden", "kernel", "maxlen"))
        try:
            dil = tuple(int(r) for r in self.dilations)
        except (TypeError, ValueError):
            raise ValueError(f"NextItNetConfig.dilations must be a list of positive integers, "
                             f"got {self.dilations!r}") from None
        if not dil or min(dil) < 1:
            raise ValueError(f"NextItNetConfig.dilations must be a non-empty list of positive integers, "
                             f"got {self.dilations!r}")
        self.dilations = dil
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"NextItNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dilations"] = list(self.dilations)
        return d

    @property
    def receptive_field(self) -> int:
        """Number of most recent items that can influence O_u."""
        return 1 + sum(3 * r * (self.kernel - 1) for r in self.dilations)


class _ResidualBlock(nn.Module):
    def __init__(self, d: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.pads = ((kernel - 1) * dilation, (kernel - 1) * 2 * dilation)
        self.conv1 = nn.Conv1d(d, d, kernel, dilation=dilation)
        self.norm1 = nn.LayerNorm(d, eps=1e-8)
        self.conv2 = nn.Conv1d(d, d, kernel, dilation=2 * dilation)
        self.norm2 = nn.LayerNorm(d, eps=1e-8)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x: (B, L, d); keep: (B, L, 1)
        y = x
        for conv, norm, pad in ((self.conv1, self.norm1, self.pads[0]), (self.conv2, self.norm2, self.pads[1])):
            y = conv(F.pad(y.transpose(1, 2), (pad, 0))).transpose(1, 2)  # causal: zeros on the left only
            y = torch.relu(norm(y)) * keep
        return x + y


class NextItNet(nn.Module):
    """The NextItNet CF-SRec, see the module docstring for the equations.

    Args:
        config: a :class:`NextItNetConfig`.

    Parameters: ``item_emb`` (N+1, d) with ``padding_idx=0``, ``blocks`` (residual
    blocks), ``out`` (Linear d -> d). Weight matrices xavier-normal, biases zero,
    LayerNorms identity.
    """

    def __init__(self, config: NextItNetConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_ResidualBlock(d, config.kernel, r) for r in config.dilations)
        self.out = nn.Linear(d, d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal for every weight matrix and kernel, zero biases, identity LayerNorms."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.xavier_normal_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Outputs F for every position.

        Args:
            seqs: int64 ``(B, L)`` item ids, left-padded with 0, ``L <= maxlen``.

        Returns:
            float32 ``(B, L, d)``; position t depends only on items at positions <= t;
            padding positions are 0.

        Raises:
            ValueError: ``seqs`` is not 2-D, ``L > maxlen``, or holds ids outside 0..N.
        """
        check_seqs(seqs, self.config.maxlen, self.config.n_items)
        keep = (seqs != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        x = self.emb_dropout(self.item_emb(seqs)) * keep
        for block in self.blocks:
            x = block(x, keep)
        return self.out(x) * keep

    def user_representation(self, seqs: torch.Tensor) -> torch.Tensor:
        """O_u: the output at the last position; seqs int64 ``(B, L)`` -> float32 ``(B, d)``.

        Call ``model.eval()`` first (dropout).
        """
        return self.forward(seqs)[:, -1, :]

    def item_embeddings(self) -> torch.Tensor:
        """E: the raw item-embedding matrix ``(N+1, d)`` float32, row 0 (padding) zero."""
        return self.item_emb.weight

    def score(self, seqs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Dot-product scores ``<O_u, E[c]>``: seqs int64 ``(B, L)``, candidates int64 ``(B, C)`` -> ``(B, C)``."""
        o = self.user_representation(seqs)
        return torch.einsum("bd,bcd->bc", o, self.item_emb(candidates))
