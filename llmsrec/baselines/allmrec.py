"""A-LLMRec (Kim et al., 2024) as the paper's Next Item Retrieval baseline (Table 2 (c)).

Two stages, the LLM frozen throughout (no LoRA):

* **stage 1, alignment** (:func:`fit_stage1`): an item encoder/decoder pair on the SASRec
  item embeddings E_i and a text encoder/decoder pair on a text embedding T_i of the item,
  trained so that the two latent codes match while each decoder reconstructs its input:
  ``L1 = MSE(z_i, t_i) + w_rec (MSE(dec_I(z_i), e_i) + MSE(dec_T(t_i), x_i))`` with
  ``z_i = enc_I(e_i)``, ``t_i = enc_T(x_i)``, e and x the per-dimension standardised E and
  T (statistics over items 1..N, stored with the weights). Each encoder/decoder is
  Linear-LeakyReLU-Linear with ``latent`` (128) hidden and code width. One epoch visits
  every item once, in batches of 64 (Appendix E's stage-1 batch size); Adam.
* **stage 2** (the e2e loop): the encoder is frozen; the aligned item embedding
  ``z_i = enc_I(E_i)`` goes through f_I (``--fi-arch``) into each item slot, the SASRec
  user representation O_u through f_U into the user slot of Table 2 (c) (CoLLM's prompts);
  f_I, f_U, the ``[UserOut]``/``[ItemOut]`` vectors and f_user/f_item train on L_Retrieval
  (Eq. 1) only.

Simplifications against the original A-LLMRec, stated:

1. **text embeddings**: the mean input-token embedding of the item title in the frozen LLM
   (:func:`llmsrec.precompute.fit.title_embedding_means`, d_llm wide) instead of a
   Sentence-BERT encoder fine-tuned in stage 1; no model is fetched from a hub, and the
   text side is fixed, so only the two autoencoders train;
2. **stage-1 loss**: matching + the two reconstructions only; the original's
   recommendation term (SASRec user representation against the decoded item embeddings)
   is left out, and the losses are on standardised inputs (scale-free) with one weight
   ``recon_weight`` (1) for both reconstructions;
3. **stage-1 schedule**: over items (batch 64, ``epochs`` 20, lr 1e-3, our choice: an
   item epoch is only N/64 steps), where the original iterates over users' sequences;
4. **stage 2**: retrieval (Eq. 1, Eq. 9, sampled negatives) instead of generating the
   next item's title; the projections are e2e mode's f_I shape (not A-LLMRec's own MLP),
   the item slot carries only the projected aligned embedding (no extra text-side token).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from llmsrec.baselines.collm import TEMPLATE as COLLM_TEMPLATE
from llmsrec.baselines.common import BaselineSpec, register
from llmsrec.defaults import ALLMREC_STAGE1
from llmsrec.errors import InputError
from llmsrec.precompute.fit import title_embedding_means

TEMPLATE = COLLM_TEMPLATE  # Table 2 (c) is shared by CoLLM and A-LLMRec
STAGE1_PREFIX = "stage1/"


@dataclass
class Stage1Options:
    """A-LLMRec stage 1 (``--stage1-*`` options).

    Attributes:
        epochs: passes over the items (20). batch_size: items per step (64, Appendix E).
        lr: Adam learning rate (1e-3). latent: width of the codes and hidden layers (128).
        recon_weight: weight of the two reconstruction terms (1.0).
    """

    epochs: int = ALLMREC_STAGE1["epochs"]
    batch_size: int = ALLMREC_STAGE1["batch_size"]
    lr: float = ALLMREC_STAGE1["lr"]
    latent: int = ALLMREC_STAGE1["latent"]
    recon_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "latent"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--stage1-{name.replace('_', '-')}: must be >= 1")
            setattr(self, name, int(getattr(self, name)))
        if self.lr <= 0:
            raise InputError("--stage1-lr: must be > 0")
        if self.recon_weight < 0:
            raise InputError("stage 1: field 'recon_weight' must be >= 0")


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, d_out))


class Alignment(nn.Module):
    """Stage 1's two autoencoders (item: d_cf -> latent -> d_cf; text: d_text -> latent -> d_text).

    Buffers ``cf_mean``, ``cf_std`` ``(d_cf,)`` and ``text_mean``, ``text_std`` ``(d_text,)``
    standardise the inputs (set by :meth:`set_scale`).
    """

    def __init__(self, d_cf: int, d_text: int, latent: int = 128):
        super().__init__()
        self.enc_item, self.dec_item = _mlp(d_cf, latent, latent), _mlp(latent, latent, d_cf)
        self.enc_text, self.dec_text = _mlp(d_text, latent, latent), _mlp(latent, latent, d_text)
        for name, d in (("cf", d_cf), ("text", d_text)):
            self.register_buffer(f"{name}_mean", torch.zeros(d))
            self.register_buffer(f"{name}_std", torch.ones(d))

    def set_scale(self, e: np.ndarray, x: np.ndarray) -> None:
        """Standardisation statistics from item rows (float ``(n, d_cf)``, ``(n, d_text)``)."""
        with torch.no_grad():
            for name, a in (("cf", e), ("text", x)):
                a = torch.as_tensor(np.asarray(a, dtype=np.float32))
                getattr(self, f"{name}_mean").copy_(a.mean(0))
                getattr(self, f"{name}_std").copy_(a.std(0).clamp_min(1e-6))

    def encode_items(self, e: torch.Tensor) -> torch.Tensor:
        """z = enc_I(standardised E rows): ``(n, d_cf) -> (n, latent)``."""
        return self.enc_item((e - self.cf_mean) / self.cf_std)

    def losses(self, e: torch.Tensor, x: torch.Tensor, recon_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Stage-1 loss terms of a batch: ``match``, ``recon_item``, ``recon_text``, ``loss``."""
        es, xs = (e - self.cf_mean) / self.cf_std, (x - self.text_mean) / self.text_std
        z, t = self.enc_item(es), self.enc_text(xs)
        mse = nn.functional.mse_loss
        terms = {"match": mse(z, t), "recon_item": mse(self.dec_item(z), es), "recon_text": mse(self.dec_text(t), xs)}
        terms["loss"] = terms["match"] + recon_weight * (terms["recon_item"] + terms["recon_text"])
        return terms


def fit_stage1(E: np.ndarray, T: np.ndarray, options: Stage1Options | None = None, seed: int = 0,
               log=None) -> tuple[Alignment, dict]:
    """Train stage 1 on items 1..N (deterministic under ``seed``).

    Args:
        E: float32 ``(N+1, d_cf)`` SASRec item embeddings; T: float32 ``(N+1, d_text)`` item
            text embeddings (row 0 = padding, unused).
    Returns:
        (the trained :class:`Alignment` in eval mode, record: epochs, steps, mean loss terms of
        the first and last epoch, seconds).
    """
    opts = options or Stage1Options()
    E, T = np.asarray(E, dtype=np.float32), np.asarray(T, dtype=np.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) + 5)
        model = Alignment(E.shape[1], T.shape[1], opts.latent)
    model.set_scale(E[1:], T[1:])
    opt = torch.optim.Adam(model.parameters(), lr=opts.lr)
    rng = np.random.default_rng([int(seed), 5])
    e_t, x_t = torch.from_numpy(E), torch.from_numpy(T)
    items = np.arange(1, E.shape[0])
    first = last = None
    steps, t0 = 0, time.perf_counter()
    model.train()
    for epoch in range(opts.epochs):
        order = rng.permutation(items)
        sums: dict[str, float] = {}
        n_b = 0
        for s in range(0, len(order), opts.batch_size):
            b = torch.from_numpy(order[s : s + opts.batch_size])
            terms = model.losses(e_t[b], x_t[b], opts.recon_weight)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            steps += 1
            n_b += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        means = {k: round(v / max(n_b, 1), 6) for k, v in sums.items()}
        first = first or means
        last = means
        if log and (epoch == 0 or epoch + 1 == opts.epochs):
            log(f"A-LLMRec stage 1 epoch {epoch + 1}/{opts.epochs}: loss {means['loss']:.4f} "
                f"(match {means['match']:.4f})")
    model.eval()
    record = {"text_embeddings": "mean input-token embedding of the title (frozen LLM)", "epochs": opts.epochs,
              "steps": steps, "first_epoch": first, "last_epoch": last,
              "seconds": round(time.perf_counter() - t0, 3)}
    return model, record


@torch.no_grad()
def aligned_features(model: Alignment, E: np.ndarray) -> np.ndarray:
    """float32 ``(N+1, latent)``: enc_I(E_i) for every item, row 0 zeros (padding)."""
    z = model.encode_items(torch.from_numpy(np.asarray(E, dtype=np.float32))).numpy().astype(np.float32)
    z[0] = 0.0
    return z


def _item_features(ds, llm, data, options, seed, log):
    T = title_embedding_means(llm.tokenizer, llm.embed.numpy(), ds.titles)
    model, record = fit_stage1(data.E, T, options, seed, log)
    arrays = {STAGE1_PREFIX + k: v.detach().clone() for k, v in model.state_dict().items()}
    return aligned_features(model, data.E), arrays, record


def _load_item_features(arrays: dict, options: dict, data) -> np.ndarray:
    state = {k.removeprefix(STAGE1_PREFIX): torch.from_numpy(np.asarray(v)) for k, v in arrays.items()
             if k.startswith(STAGE1_PREFIX)}
    try:
        latent, d_text = state["enc_text.0.weight"].shape
        model = Alignment(data.E.shape[1], int(d_text), int(latent))
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise InputError(f"stage1.safetensors: does not fit A-LLMRec's stage 1 ({str(e).splitlines()[0]})") from None
    return aligned_features(model.eval(), data.E)


SPEC = register(BaselineSpec(name="allmrec", display="A-LLMRec", template=TEMPLATE, lora=False, item_soft=True,
                             user_rep=True, needs_sasrec=True, item_features=_item_features,
                             load_item_features=_load_item_features, options_cls=Stage1Options))
