"""The trainable heads of LLM-SRec: f_user, f_item, f_CF-user (and the fixed f_I of cache mode).

Shapes follow the paper (Sec. 2.1.2, 3.1, Appendix E) and the authors' code:

- f_user, f_item: Linear(d_llm -> 2048), LayerNorm, LeakyReLU, Linear(2048 -> d'), d' = 128.
- f_CF-user:      Linear(d_cf -> 128), LayerNorm, GELU, Linear(128 -> d').

Checkpoints are ``heads.safetensors`` + ``heads_config.json`` (no pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmsrec.errors import InputError

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
    """

    d_llm: int
    d_cf: int
    d_out: int = 128
    hidden: int = 2048
    cf_hidden: int = 128
    leaky_slope: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "leaky_slope" and (not isinstance(v, (int, np.integer)) or v <= 0):
                raise InputError(f"heads config: field '{f.name}' must be a positive integer, got {v!r}")


def _llm_head(cfg: HeadsConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cfg.d_llm, cfg.hidden),
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
        self.f_user = _llm_head(config)
        self.f_item = _llm_head(config)
        self.f_cf_user = nn.Sequential(
            nn.Linear(config.d_cf, config.cf_hidden),
            nn.LayerNorm(config.cf_hidden),
            nn.GELU(),
            nn.Linear(config.cf_hidden, config.d_out),
        )

    def user(self, h_u: torch.Tensor) -> torch.Tensor:
        """f_user: (B, d_llm) float32 -> (B, d')."""
        return self.f_user(h_u)

    def item(self, h_i: torch.Tensor) -> torch.Tensor:
        """f_item: (..., d_llm) float32 -> (..., d')."""
        return self.f_item(h_i)

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


def fixed_item_projection(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    """f_I of cache mode: the frozen ridge fit that precompute stored under ``/params/f_I``.

    Args:
        weight: float (d_llm, d_cf); bias: float (d_llm,).
    Returns:
        A frozen ``nn.Linear(d_cf -> d_llm)``; f_I(E_i) is the soft token that replaces
        ``[HistoryEmb]`` in the prompts. Nothing here trains it (DESIGN.md, cache mode).
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
    from safetensors.torch import save

    from llmsrec.atomic import atomic_file, write_json

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
    from safetensors.torch import load_file

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
    from llmsrec.safetensors_io import check_checkpoint

    check_checkpoint(w_path, cfg_path, doc["heads"], lambda: LLMSRecHeads(cfg))  # before allocating
    heads = LLMSRecHeads(cfg)
    try:
        heads.load_state_dict(load_file(str(w_path)))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{w_path}: weights do not match {cfg_path} ({first})") from None
    return heads.eval()
