"""GRU4Rec: session-based recommendation with recurrent neural networks (Hidasi et al., ICLR 2016).

A CF-SRec baseline of the paper's Table 6 (Appendix D). For a left-padded item sequence
``s_1..s_L`` it computes

    x_t = Dropout(E[s_t])                      (item embedding, no positional embedding)
    h_t = GRU(x_t, h_{t-1}),  h_0 = 0          (``layers`` stacked GRU layers, width ``gru_hidden``)
    F_t = W h_t + b                            (back to the embedding width d)

over the real items only: the padding never enters the recurrence (the rows are packed
with their lengths), so ``F_t`` depends only on the real items at positions <= t and the
amount of left padding does not change it. Padding positions of F are 0.

The user representation O_u is ``F[:, -1]`` (the state after the most recent item) and an
item i is scored by ``<O_u, E[i]>`` with the raw embedding row E[i] (row 0, the padding
item, is kept at zero), exactly as for :class:`~llmsrec.cfsrec.sasrec.SASRec`. This is the
embedding-input GRU4Rec of Hidasi & Karatzoglou (CIKM 2018) trained, like them, with a
softmax cross-entropy over the items (the trainer's ``ce`` loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from llmsrec.cfsrec.sasrec import check_positive_ints, check_seqs
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["GRU4RecConfig", "GRU4Rec"]


@dataclass
class GRU4RecConfig:
    """Hyper-parameters of :class:`GRU4Rec` (defaults: RecBole 1.2.1's GRU4Rec, d = 64 as Appendix E).

    Attributes:
        n_items: number of items N; item ids are 1..N, 0 is padding.
        hidden: width d of the item embeddings and of O_u.
        gru_hidden: width of the GRU state.
        layers: stacked GRU layers.
        dropout: dropout on the item embeddings (training only).
        maxlen: longest input window; longer sequences keep their last ``maxlen`` items.
    """

    n_items: int
    hidden: int = 64
    gru_hidden: int = 128
    layers: int = 1
    dropout: float = 0.3
    maxlen: int = 128

    def __post_init__(self) -> None:
        check_positive_ints(self, ("n_items", "hidden", "gru_hidden", "layers", "maxlen"))
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GRU4RecConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)

    def to_dict(self) -> dict:
        return asdict(self)


class GRU4Rec(nn.Module):
    """The GRU4Rec CF-SRec, see the module docstring for the equations.

    Args:
        config: a :class:`GRU4RecConfig`.

    Parameters: ``item_emb`` (N+1, d) with ``padding_idx=0``, ``gru`` (nn.GRU), ``out``
    (Linear gru_hidden -> d). Weight matrices xavier-normal, biases zero.
    """

    def __init__(self, config: GRU4RecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.hidden, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.hidden, config.gru_hidden, num_layers=config.layers, batch_first=True)
        self.out = nn.Linear(config.gru_hidden, config.hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal for every weight matrix, zero biases, then a zero padding row."""
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.xavier_normal_(p)
            else:
                nn.init.zeros_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Outputs F for every position.

        Args:
            seqs: int64 ``(B, L)`` item ids, left-padded with 0 (no 0 after the first real
                item), ``L <= maxlen``.

        Returns:
            float32 ``(B, L, d)``; position t depends only on the real items at positions
            <= t; padding positions (and fully padded rows) are 0.

        Raises:
            ValueError: ``seqs`` is not 2-D, ``L > maxlen``, or holds ids outside 0..N.
        """
        check_seqs(seqs, self.config.maxlen, self.config.n_items)
        b, L = seqs.shape
        lengths = (seqs != 0).sum(1)  # (B,)
        # rotate each row so its real items come first (right padding), run the packed GRU,
        # rotate back: column j of a row of length n holds real item j - (L - n)
        cols = torch.arange(L, device=seqs.device)[None]
        shift = (L - lengths)[:, None]
        right = seqs.gather(1, (cols + shift) % L)
        x = self.emb_dropout(self.item_emb(right))
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.gru(packed)
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=L)  # (B, L, gru_hidden)
        h = h.gather(1, ((cols - shift) % L)[..., None].expand(-1, -1, h.shape[-1]))
        keep = (seqs != 0).unsqueeze(-1).to(h.dtype)
        return self.out(h) * keep

    def user_representation(self, seqs: torch.Tensor) -> torch.Tensor:
        """O_u: the output after the most recent item.

        Args:
            seqs: int64 ``(B, L)`` left-padded histories. Call ``model.eval()`` first.

        Returns:
            float32 ``(B, d)`` (zeros for an empty history).
        """
        return self.forward(seqs)[:, -1, :]

    def item_embeddings(self) -> torch.Tensor:
        """E: the raw item-embedding matrix ``(N+1, d)`` float32, row 0 (padding) zero."""
        return self.item_emb.weight

    def score(self, seqs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Dot-product scores ``<O_u, E[c]>``: seqs int64 ``(B, L)``, candidates int64 ``(B, C)`` -> ``(B, C)``."""
        o = self.user_representation(seqs)
        return torch.einsum("bd,bcd->bc", o, self.item_emb(candidates))
