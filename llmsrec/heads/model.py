"""The trainable heads of LLM-SRec: f_user, f_item, f_CF-user (and the fixed f_I of cache mode).

Shapes follow the paper (Sec. 2.1.2, 3.1, Appendix E) and the authors' code:

- f_user, f_item: Linear(d_llm -> 2048), LayerNorm, LeakyReLU, Linear(2048 -> d'), d' = 128.
- f_CF-user:      Linear(d_cf -> 128), LayerNorm, GELU, Linear(128 -> d').

Richer readouts (``user_readout`` / ``item_readout`` other than ``out``, see
``llmsrec.precompute.readouts``): f_user / f_item first turn the cached states into one
vector per part, then apply the same MLP to their concatenation:

- ``layers``: a learned softmax mix over the readout layers' states at the out token;
- ``slots`` (users): per history slot the same kind of layer mix, then an attention pooling
  over the slots (content-based, no position parameters: the order a user representation
  carries must come from the LLM's states);
- ``soft`` (items): the layer mix of the state at the item's own soft token.

Each state is layer-normalised without parameters first (middle layers' residual streams
are ~10^4 times larger than the last layer's normed output). That normalisation and the slot
mask depend on the frozen states only: a trainer does them once (``prepare_user`` /
``prepare_item``, a :class:`Prepared`) instead of at every step.

Checkpoints are ``heads.safetensors`` + ``heads_config.json`` (no pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.torch import load_file, save
import torch
from torch import nn

from llmsrec.atomic import atomic_file, write_json
from llmsrec.errors import InputError
from llmsrec.safetensors_io import check_checkpoint

WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads_config.json"


@dataclass
class HeadsConfig:
    """Sizes of the three heads.

    Attributes:
        d_llm: width of the LLM hidden state h (576 for SmolLM2-135M, 3072 for Llama-3.2-3B).
        d_cf: width of the CF-SRec user representation O_u (64 for the paper's SASRec).
        d_out: d', the shared output width of all heads (paper: 128).
        hidden: inner width of f_user / f_item (paper: 2048).
        cf_hidden: inner width of f_CF-user (paper: 128).
        leaky_slope: negative slope of the LeakyReLU in f_user / f_item (torch default 0.01).
        user_readout: ``out`` (the paper: last-layer state at ``[UserOut]``), ``layers``,
            ``slots`` or ``layers+slots``.
        item_readout: ``out`` (the paper), ``layers``, ``soft`` or ``layers+soft``.
        n_layers: readout layers in the cache (0 with ``out`` readouts).
        n_slots: history slots per user sample (the history window W; 0 without slots).
    """

    d_llm: int
    d_cf: int
    d_out: int = 128
    hidden: int = 2048
    cf_hidden: int = 128
    leaky_slope: float = 0.01
    user_readout: str = "out"
    item_readout: str = "out"
    n_layers: int = 0
    n_slots: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("leaky_slope", "user_readout", "item_readout"):
                continue
            low = 0 if f.name in ("n_layers", "n_slots") else 1
            if not isinstance(v, (int, np.integer)) or v < low:
                raise InputError(f"heads config: field '{f.name}' must be an integer >= {low}, got {v!r}")
        check_readouts(self.user_readout, self.item_readout)
        rich = self.user_readout != "out" or self.item_readout != "out"
        if rich and self.n_layers < 1:
            raise InputError("heads config: a layers/slots/soft readout needs n_layers >= 1 "
                             "(a cache built with --readout-layers)")
        if "slots" in self.user_readout and self.n_slots < 1:
            raise InputError("heads config: the slots readout needs n_slots >= 1")

    def user_tokens(self) -> int:
        """T_u: cached vectors per user sample (1 for ``out``)."""
        return readout_tokens(self.user_readout, self.n_layers, self.n_slots)

    def item_tokens(self) -> int:
        """T_i: cached vectors per item (1 for ``out``)."""
        return readout_tokens(self.item_readout, self.n_layers, 1)


USER_READOUTS = ("out", "layers", "slots", "layers+slots")
ITEM_READOUTS = ("out", "layers", "soft", "layers+soft")


def check_readouts(user_readout: str, item_readout: str) -> None:
    """Raises InputError (naming the option) for a readout not in USER_READOUTS / ITEM_READOUTS."""
    if user_readout not in USER_READOUTS:
        raise InputError(f"--user-readout {user_readout!r}: expected one of {', '.join(USER_READOUTS)}")
    if item_readout not in ITEM_READOUTS:
        raise InputError(f"--item-readout {item_readout!r}: expected one of {', '.join(ITEM_READOUTS)}")


def readout_tokens(kind: str, n_layers: int, n_slots: int) -> int:
    """How many d_llm vectors a readout ``kind`` feeds a head per row."""
    if kind == "out":
        return 1
    return (n_layers if "layers" in kind else 0) + (n_slots * n_layers if ("slots" in kind or "soft" in kind) else 0)


class Prepared(NamedTuple):
    """Readout states with the parameter-free work of :class:`ReadoutEncoder` done once.

    ``ReadoutEncoder.forward`` layer-normalises every cached vector (no affine parameters)
    and finds the history slots that hold an item; both depend on the frozen states only, so
    a trainer that reads the same rows at every step does them once
    (``LLMSRecHeads.prepare_user`` / ``prepare_item``)
    and passes this instead of the raw ``(..., T, d_llm)`` tensor. The forward pass on it
    runs the same operations on the same values as on the raw tensor (identical outputs).

    The states are stored layer axis last, the layout the layer mix (a batched matrix-vector
    product) reads without a copy.

    Attributes:
        out: float32 ``(R, d_llm, n_layers)``, the layer-normalised out-token states
            (``layers`` readouts), or None.
        slots: float32 ``(R, S, d_llm, n_layers)``, the layer-normalised slot / soft-token
            states (``slots``/``soft`` readouts), or None.
        real: bool ``(R, S)``, slot holds an item (some raw state is non-zero), or None.
    """

    out: torch.Tensor | None
    slots: torch.Tensor | None
    real: torch.Tensor | None

    def rows(self, idx) -> "Prepared":
        """The rows ``idx`` (an index tensor, a slice or an int array) of every part."""
        return Prepared(*(None if t is None else t[idx] for t in self))

    def to(self, device) -> "Prepared":
        """Every part moved to ``device``."""
        return Prepared(*(None if t is None else t.to(device) for t in self))


class ReadoutEncoder(nn.Module):
    """f_user / f_item on richer readouts: ``(..., T, d_llm)`` -> ``(..., d')``.

    The T vectors are laid out as the cache readers build them: first the ``n_layers``
    out-token states (``layers``), then ``n_slots x n_layers`` slot states, slot-major
    (``slots``/``soft``). An all-zero slot (a history shorter than W) is masked out.
    """

    def __init__(self, cfg: HeadsConfig, kind: str, n_slots: int):
        super().__init__()
        self.n_layers, self.n_slots = cfg.n_layers, n_slots
        self.use_out = "layers" in kind
        self.use_slots = "slots" in kind or "soft" in kind
        parts = int(self.use_out) + int(self.use_slots)
        if self.use_out:
            self.out_mix = nn.Parameter(torch.zeros(cfg.n_layers))
        if self.use_slots:
            self.slot_mix = nn.Parameter(torch.zeros(cfg.n_layers))
            if n_slots > 1:
                self.pool_key = nn.Linear(cfg.d_llm, 64)
                self.pool_query = nn.Linear(64, 1, bias=False)
        self.mlp = _llm_head(cfg, d_in=parts * cfg.d_llm)

    @staticmethod
    def _mix(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The softmax(logits)-weighted sum over the layer axis of layer-normalised ``(..., d, L)``,
        in x's dtype also under autocast (a bfloat16 cast of all L states would cost more than the mix)."""
        with torch.autocast(x.device.type, enabled=False):
            return torch.einsum("...dl,l->...d", x, torch.softmax(logits, 0))

    @staticmethod
    def _normed(x: torch.Tensor) -> torch.Tensor:
        """``(..., L, d)`` -> each d-vector layer-normalised (no affine), as ``(..., d, L)`` contiguous."""
        return nn.functional.layer_norm(x, x.shape[-1:]).transpose(-1, -2).contiguous()

    def prepare(self, x: torch.Tensor) -> Prepared:
        """The parameter-free part of :meth:`forward` on raw states ``(R, T, d_llm)``: a :class:`Prepared`
        (differentiable: e2e mode's states carry gradients to f_I and the tokens)."""
        nl = self.n_layers
        out = slots = real = None
        off = 0
        if self.use_out:
            out = self._normed(x[..., :nl, :])
            off = nl
        if self.use_slots:
            s = x[..., off:, :].reshape(*x.shape[:-2], self.n_slots, nl, x.shape[-1])
            real = s.abs().sum((-1, -2)) > 0  # (..., S)
            slots = self._normed(s)
        return Prepared(out, slots, real)

    def forward(self, x: torch.Tensor | Prepared) -> torch.Tensor:
        """``(..., T, d_llm)`` raw states, or their :class:`Prepared` rows -> ``(..., d')``."""
        if not isinstance(x, Prepared):
            x = self.prepare(x)
        parts = []
        if self.use_out:
            parts.append(self._mix(x.out, self.out_mix))
        if self.use_slots:
            real = x.real
            s = self._mix(x.slots, self.slot_mix)  # (..., S, d)
            if self.n_slots > 1:
                logit = self.pool_query(torch.tanh(self.pool_key(s))).squeeze(-1)
                logit = logit.masked_fill(~real, torch.finfo(logit.dtype).min)
                a = torch.softmax(logit, -1) * real  # a row with no slot pools to 0
                parts.append(torch.einsum("...s,...sd->...d", a, s))
            else:
                parts.append(s[..., 0, :])
        return self.mlp(torch.cat(parts, -1))


def _llm_head(cfg: HeadsConfig, d_in: int | None = None) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in or cfg.d_llm, cfg.hidden),
        nn.LayerNorm(cfg.hidden),
        nn.LeakyReLU(cfg.leaky_slope),
        nn.Linear(cfg.hidden, cfg.d_out),
    )


class LLMSRecHeads(nn.Module):
    """f_user, f_item and f_CF-user in one module.

    ``f_user(h_u)`` and ``f_item(h_i)`` map LLM hidden states (float32, (B, d_llm)) to
    (B, d'); ``f_cf_user(O_u)`` maps SASRec user representations (B, d_cf) to (B, d').
    The recommendation score is the raw dot product s(u, i) = f_item(h_i) . f_user(h_u)
    (paper Eq. 9; no temperature, no normalisation, as in the authors' code).

    Initialisation: torch's default for Linear/LayerNorm, drawn from the global torch
    generator, so ``torch.manual_seed(s)`` before construction fixes the weights.
    """

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        self.f_user = _llm_head(config) if config.user_readout == "out" else \
            ReadoutEncoder(config, config.user_readout, config.n_slots)
        self.f_item = _llm_head(config) if config.item_readout == "out" else \
            ReadoutEncoder(config, config.item_readout, 1)
        self.f_cf_user = nn.Sequential(
            nn.Linear(config.d_cf, config.cf_hidden),
            nn.LayerNorm(config.cf_hidden),
            nn.GELU(),
            nn.Linear(config.cf_hidden, config.d_out),
        )

    def user(self, h_u: torch.Tensor | Prepared) -> torch.Tensor:
        """f_user: (B, d_llm) float32 -> (B, d'); richer readouts: (B, T_u, d_llm) or its
        :meth:`prepare_user` rows."""
        return self.f_user(h_u)

    def item(self, h_i: torch.Tensor | Prepared) -> torch.Tensor:
        """f_item: (..., d_llm) float32 -> (..., d'); richer readouts: (..., T_i, d_llm) or its
        :meth:`prepare_item` rows."""
        return self.f_item(h_i)

    @torch.no_grad()
    def prepare_user(self, h_u: torch.Tensor) -> torch.Tensor | Prepared:
        """What :meth:`user` reads, with the parameter-free work done once (no gradient).

        Args:
            h_u: float32 (R, d_llm) (``out``) or (R, T_u, d_llm) cached states.
        Returns:
            ``h_u`` itself for the ``out`` readout (nothing to precompute), else a
            :class:`Prepared` (layer-normalised parts and the slot mask; as much memory as
            ``h_u``). ``user(prepare_user(h).rows(idx))`` equals ``user(h[idx])`` bit for bit.
        """
        return h_u if isinstance(self.f_user, nn.Sequential) else _prepare_rows(self.f_user, h_u)

    @torch.no_grad()
    def prepare_item(self, h_i: torch.Tensor) -> torch.Tensor | Prepared:
        """:meth:`prepare_user` for f_item: (R, d_llm) or (R, T_i, d_llm) cached item states."""
        return h_i if isinstance(self.f_item, nn.Sequential) else _prepare_rows(self.f_item, h_i)

    def cf_user(self, o_u: torch.Tensor) -> torch.Tensor:
        """f_CF-user: (B, d_cf) float32 -> (B, d')."""
        return self.f_cf_user(o_u)

    def score(self, h_u: torch.Tensor, h_items: torch.Tensor) -> torch.Tensor:
        """s(u, i) for every user and each of its candidates.

        Args:
            h_u: (B, d_llm) user states at [UserOut].
            h_items: (B, C, d_llm) candidate item states at [ItemOut].
        Returns:
            (B, C) float32 scores (paper Eq. 9).
        """
        return torch.einsum("bcd,bd->bc", self.item(h_items), self.user(h_u))


def _prepare_rows(enc: ReadoutEncoder, h: torch.Tensor, chunk: int = 128) -> Prepared:
    """``enc.prepare(h)`` in blocks of ``chunk`` rows (each block stays in the CPU cache; the
    values are the same, row by row, as one call's)."""
    if len(h) <= chunk:
        return enc.prepare(h)
    first = enc.prepare(h[:chunk])
    out = Prepared(*(None if t is None else t.new_empty((len(h), *t.shape[1:])) for t in first))
    for lo in range(0, len(h), chunk):
        part = first if lo == 0 else enc.prepare(h[lo : lo + chunk])
        for dst, src in zip(out, part):
            if dst is not None:
                dst[lo : lo + chunk] = src
    return out


def fixed_item_projection(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    """f_I of cache mode: the frozen ridge fit that precompute stored under ``/params/f_I``.

    Args:
        weight: float (d_llm, d_cf); bias: float (d_llm,).
    Returns:
        A frozen ``nn.Linear(d_cf -> d_llm)``; f_I(E_i) is the soft token that replaces
        ``[HistoryEmb]`` in the prompts. Nothing here trains it (cache mode fixes f_I before
        precompute, :mod:`llmsrec.precompute.fit`).
    Raises:
        InputError: shapes do not match.
    """
    weight = np.asarray(weight, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise InputError(f"/params/f_I: weight {weight.shape} and bias {bias.shape} do not match")
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(weight))
        lin.bias.copy_(torch.from_numpy(bias))
    lin.requires_grad_(False)
    return lin


def save_heads(heads: LLMSRecHeads, out_dir: str | Path, extra: dict | None = None) -> None:
    """Write ``heads.safetensors`` and ``heads_config.json`` (config + ``extra``) into ``out_dir``.

    Each file is written atomically (``llmsrec.atomic``) with the mode the umask gives
    (safetensors' own ``save_file`` would leave the weights at 0600).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    with atomic_file(out_dir / WEIGHTS_FILE, "wb") as f:
        f.write(save(state))
    doc = {"heads": asdict(heads.config)}
    if extra:
        doc.update(extra)
    write_json(out_dir / CONFIG_FILE, doc)


def load_heads(heads_dir: str | Path) -> LLMSRecHeads:
    """Load heads saved by :func:`save_heads`, in eval mode.

    Raises:
        InputError: the folder lacks the files, or the config/weights do not match (sizes
            are checked against the safetensors header before any module is built).
    """
    heads_dir = Path(heads_dir)
    cfg_path, w_path = heads_dir / CONFIG_FILE, heads_dir / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise InputError(f"{p}: missing (not an llmsrec heads checkpoint folder)")
    try:
        doc = json.loads(cfg_path.read_text())
        cfg = HeadsConfig(**doc["heads"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{cfg_path}: field 'heads' unreadable ({e})") from None

    check_checkpoint(w_path, cfg_path, doc["heads"], lambda: LLMSRecHeads(cfg))  # before allocating
    heads = LLMSRecHeads(cfg)
    try:
        heads.load_state_dict(load_file(str(w_path)))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{w_path}: weights do not match {cfg_path} ({first})") from None
    return heads.eval()
