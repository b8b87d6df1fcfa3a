"""e2e mode: train f_I, the ``[UserOut]``/``[ItemOut]`` embeddings and the heads through the
frozen LLM at every step, as the paper (Sec. 2.2, Eq. 4) and the authors' code do.

This is the paper-faithful reference the cache mode is measured against. Every training
step runs the frozen LLM on the batch's user prompts (``train`` view, ``seq[:-3] ->
seq[-3]``) and on the item prompts of their candidates (target + sampled negatives);
gradients flow into f_I (through the soft tokens f_I(E_i) at every ``[HistoryEmb]``), the
two out-token vectors and the heads. The LLM's parameters have ``requires_grad`` False and
get no optimizer state; SASRec is frozen (E and O_u are computed once, in eval mode).

Same losses (Eq. 1-4), optimizer (Adam, one param group: heads, f_I and tokens), user
order, negatives, validation schedule (every tenth of an epoch), early stopping (both
:func:`llmsrec.training.train_loop`'s) and output files as cache mode
(:mod:`llmsrec.heads.train`). Differences, all recorded in the outputs:

* training negatives are sampled (``train_negatives``, default 3 as in the paper and the
  authors' code): each negative costs one item-prompt forward and backward, so the
  full-catalogue softmax of cache mode would run every item prompt at every step;
* validation recomputes the item states of every item and the ``valid`` user states with
  the current f_I and tokens (batched, no grad), exactly as the final model scores; it
  costs a forward over every item prompt and every validation user prompt, so
  ``eval_users`` can restrict model selection to a seeded, recorded user sample (test
  always scores every user, once, on the selected checkpoint);
* the checkpoint also holds ``params.safetensors`` (f_I and the two token vectors,
  :mod:`llmsrec.precompute.params`), so evaluation can recompute the states.

Memory: a forward that keeps its graph stores the activations of every token it runs.
A step whose prompts hold more than ``grad_batch_tokens`` (padded) tokens is run in two
passes with exact gradients ("gradient caching"): first every prompt without a graph,
giving the states h; the loss and its gradient dL/dh (and the heads' gradients) from
those; then each chunk of at most ``grad_batch_tokens`` tokens again with a graph, back-
propagating dL/dh of its rows into f_I and the tokens. That costs one extra forward and
bounds memory by the chunk; ``grad_checkpointing`` bounds it further (layer activations
recomputed in the backward). Set ``grad_batch_tokens`` large on a big GPU to run each step
in one pass.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from llmsrec import __version__
from llmsrec.atomic import atomic_dir, sha256_file, write_json
from llmsrec.cache import open_cache
from llmsrec.cfsrec.teacher import load_teacher, teacher_user_reps
from llmsrec.data import load_prepared
from llmsrec.defaults import E2E, HISTORY_WINDOW, LLM
from llmsrec.devices import mark_step
from llmsrec.errors import InputError
from llmsrec.heads.losses import retrieval_loss, sample_negatives, total_loss
from llmsrec.heads.model import HeadsConfig, LLMSRecHeads, load_heads, save_heads
from llmsrec.heads.train import LOSS_TERMS, FitResult, TrainConfig, plot_history, validation_record
from llmsrec.metrics import ranking_metrics
from llmsrec.precompute.engine import TokenizedPrompt, forward_batch, make_batches, pack_batch, tokenize_prompts
from llmsrec.precompute.fit import fit_moment_matched, fit_ridge, title_embedding_means
from llmsrec.precompute.llm import ITEM_OUT, USER_OUT, LoadedLLM, load_llm
from llmsrec.precompute.params import read_params, write_params
from llmsrec.precompute.prompts import TEMPLATE_VERSION, build_view, default_verb, item_prompt
from llmsrec.training import Tick, eval_points, train_loop, write_history

PARAMS_FILE = "params.safetensors"
E2E_DEFAULT_NEGATIVES = 3


# --- the trainable inputs of the LLM --------------------------------------------------------


class ItemProjection(nn.Module):
    """f_I: SASRec item embedding E_i (d_cf) -> soft token in the LLM input space (d_llm).

    ``arch="linear"``: one ``nn.Linear(d_cf, d_llm)`` (cache mode's fixed f_I, here trainable;
    initialised from the same fit). ``arch="mlp"``: the authors' shape, Linear(d_cf -> d_llm),
    LayerNorm, LeakyReLU, Linear(d_llm -> d_llm), torch's default initialisation.
    ``forward``: float32 ``(..., d_cf) -> (..., d_llm)``.
    """

    def __init__(self, d_cf: int, d_llm: int, arch: str = "linear"):
        super().__init__()
        if arch not in ("linear", "mlp"):
            raise InputError(f"--fi-arch {arch!r}: expected 'linear' or 'mlp'")
        self.arch = arch
        if arch == "linear":
            self.net = nn.Linear(d_cf, d_llm)
        else:
            self.net = nn.Sequential(nn.Linear(d_cf, d_llm), nn.LayerNorm(d_llm), nn.LeakyReLU(),
                                     nn.Linear(d_llm, d_llm))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.net(e)

    def arrays(self) -> dict[str, torch.Tensor]:
        """Tensors under the params-file names (``f_I/weight``... for linear, ``f_I/0.weight``... for mlp)."""
        return {f"f_I/{k}": v for k, v in self.net.state_dict().items()}

    def load_arrays(self, arrays: dict) -> None:
        state = {k.removeprefix("f_I/"): torch.as_tensor(np.asarray(v)) for k, v in arrays.items()
                 if k.startswith("f_I/")}
        try:
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(f"params: f_I tensors do not fit a {self.arch} f_I "
                             f"({str(e).strip().splitlines()[0]})") from None


class LLMInputs(nn.Module):
    """Everything trainable that reaches the frozen LLM's input: f_I and the two out tokens.

    Attributes:
        f_I: :class:`ItemProjection`.
        user_out, item_out: ``nn.Parameter`` float32 ``(d_llm,)``, the input embeddings of
            ``[UserOut]`` / ``[ItemOut]``.
        E: buffer float32 ``(N+1, d_cf)``, the frozen SASRec item embeddings (row 0 = padding).
    """

    def __init__(self, f_I: ItemProjection, user_out, item_out, E):
        super().__init__()
        self.f_I = f_I
        self.user_out = nn.Parameter(torch.as_tensor(np.asarray(user_out, dtype=np.float32)).clone())
        self.item_out = nn.Parameter(torch.as_tensor(np.asarray(item_out, dtype=np.float32)).clone())
        self.register_buffer("E", torch.as_tensor(np.asarray(E, dtype=np.float32)).clone())

    def soft(self, items: torch.Tensor) -> torch.Tensor:
        """f_I(E[items]): ``(n,) int64 -> (n, d_llm)`` float32 (differentiable)."""
        return self.f_I(self.E[items])

    def soft_table(self) -> torch.Tensor:
        """Row i replaces each ``[HistoryEmb]`` standing for id i: f_I(E), float32 ``(N+1, d_llm)``.

        ``soft(ids)`` must equal ``soft_table()[ids]``; subclasses with more soft-token slots
        (the baselines' user representation, :mod:`llmsrec.baselines`) extend both.
        """
        return self.f_I(self.E)

    def out_vec(self, out_token: str) -> torch.Tensor:
        return self.user_out if out_token == USER_OUT else self.item_out

    def arrays(self) -> dict[str, torch.Tensor]:
        """The params-file tensors (:mod:`llmsrec.precompute.params`)."""
        return {**self.f_I.arrays(), "tokens/user_out": self.user_out, "tokens/item_out": self.item_out}

    @classmethod
    def from_arrays(cls, arrays: dict, E, arch: str = "linear") -> "LLMInputs":
        """Build from params-file arrays (``read_params`` or a cache's ``params()``)."""
        E = np.asarray(E, dtype=np.float32)
        uo = np.asarray(arrays["tokens/user_out"], dtype=np.float32)
        f = ItemProjection(E.shape[1], uo.shape[0], arch)
        f.load_arrays(arrays)
        return cls(f, uo, arrays["tokens/item_out"], E)

    @classmethod
    def initial(cls, llm: LoadedLLM, E, *, fi: str = LLM["fi"], arch: str = E2E["fi_arch"], seed: int = 0,
                titles=None, ridge_alpha: float = 1e-3) -> "LLMInputs":
        """The starting point of e2e training.

        Both tokens start at the mean input embedding (as in cache mode). A linear f_I starts
        from precompute's closed-form fit (``fi``: ``moment``, or ``ridge``, which needs the
        dataset's ``titles``), so e2e starts exactly where cache mode is; an MLP f_I from
        torch's default initialisation under ``seed``.

        Raises:
            InputError: unknown ``fi``/``arch``, or ``ridge`` without titles.
        """
        E = np.asarray(E, dtype=np.float32)
        emb = llm.embed.numpy()
        mean = emb.mean(0).astype(np.float32)
        if arch == "mlp":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                f = ItemProjection(E.shape[1], emb.shape[1], arch)
            return cls(f, mean, mean, E)
        if fi == "moment":
            W, b = fit_moment_matched(E[1:], emb)
        elif fi == "ridge" and titles is not None:
            y = title_embedding_means(llm.tokenizer, emb, titles)
            W, b = fit_ridge(E[1:], y[1:], alpha=ridge_alpha)
        else:
            raise InputError(f"--fi {fi!r}: expected 'moment' or 'ridge' (ridge needs the titles)")
        return cls.from_arrays({"f_I/weight": W, "f_I/bias": b, "tokens/user_out": mean,
                                "tokens/item_out": mean}, E, arch)


# --- forwards -------------------------------------------------------------------------------


def as_float(h: torch.Tensor) -> torch.Tensor:
    """States in float32 (float64 stays float64: the gradient tests run the model in it)."""
    return h if h.dtype == torch.float64 else h.float()


def forward_with_grad(llm: LoadedLLM, batch: list[TokenizedPrompt], inputs: LLMInputs,
                      out_token: str) -> torch.Tensor:
    """The frozen LLM on a right-padded batch, differentiable in f_I and the out token.

    The same computation as :func:`llmsrec.precompute.engine.forward_batch`, with the soft
    tokens f_I(E_i) and the out-token vector spliced in out of place so that autograd
    reaches ``inputs``; the LLM's own weights are frozen (``requires_grad`` False; adapters
    injected into the decoder and owned by ``inputs``, as the baselines' LoRA, get gradients).
    Runs under the caller's grad mode.

    Args:
        llm: the loaded model; batch: B tokenized prompts; inputs: f_I + tokens (on
            ``llm.device``); out_token: ``[UserOut]`` or ``[ItemOut]``.
    Returns:
        float32 ``(B, d_llm)`` on ``llm.device`` (float64 for a float64 model): last-layer
        state at each out token.
    Raises:
        InputError: the device ran out of memory (lower --grad-batch-tokens / --batch-tokens).
    """
    dev = llm.device
    ids, mask, rows, cols, items, out_pos = pack_batch(batch)
    b = len(batch)
    ar = torch.arange(b, device=dev)
    out_pos = out_pos.to(dev)
    try:
        x = llm.decoder.get_input_embeddings()(ids.to(dev))
        if len(items):
            x = x.index_put((rows.to(dev), cols.to(dev)), inputs.soft(items.to(dev)).to(x.dtype))
        vec = inputs.out_vec(out_token).to(x.dtype)
        x = x.index_put((ar, out_pos), vec.expand(b, -1))
        h = llm.decoder(inputs_embeds=x, attention_mask=mask.to(dev), use_cache=False).last_hidden_state
        return as_float(h[ar, out_pos])
    except torch.OutOfMemoryError as e:
        raise InputError(f"a batch of {b} x {ids.shape[1]} tokens does not fit on {dev}; lower "
                         f"--grad-batch-tokens (or use --grad-checkpointing)") from e


@contextlib.contextmanager
def _checkpointing(llm: LoadedLLM, on: bool):
    """Run the decoder layers with activation checkpointing inside the block.

    transformers checkpoints a layer only when the layer is in training mode; only the
    layers' own flag is flipped (their submodules stay in eval mode, so no dropout turns on).
    """
    layers = [m for m in llm.decoder.modules() if getattr(m, "gradient_checkpointing", False)] if on else []
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m in layers:
            m.training = False


def enable_grad_checkpointing(llm: LoadedLLM) -> None:
    """Turn on transformers' activation checkpointing for the decoder (non-reentrant).

    Raises:
        InputError: the model does not support it.
    """
    dec = llm.decoder
    if not getattr(dec, "supports_gradient_checkpointing", False):
        raise InputError(f"--grad-checkpointing: {llm.name} does not support gradient checkpointing")
    dec.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dec.eval()


def length_batches(toks: list[TokenizedPrompt], budget: int) -> list[np.ndarray]:
    """Prompt indices in batches of similar length, at most ``budget`` padded tokens each
    (int64 arrays; prompts sorted by length, ties in input order)."""
    lengths = np.asarray([len(t) for t in toks])
    order = np.argsort(lengths, kind="stable")
    return make_batches(lengths, order, budget)


def _padded(toks: list[TokenizedPrompt]) -> int:
    return len(toks) * max(len(t) for t in toks) if toks else 0


@torch.no_grad()
def compute_states(llm: LoadedLLM, inputs: LLMInputs, toks: list[TokenizedPrompt], out_token: str,
                   batch_tokens: int = LLM["batch_tokens"]) -> np.ndarray:
    """States at the out token with the current f_I and token (no grad, batched by length).

    The same forward as precompute (:func:`~llmsrec.precompute.engine.forward_batch` with the
    soft table f_I(E)), so with cache mode's f_I and tokens it reproduces the cache.

    Returns:
        float32 numpy ``(len(toks), d_llm)`` in the order of ``toks``.
    """
    out = np.zeros((len(toks), llm.d_llm), dtype=np.float32)
    if not toks:
        return out
    soft = inputs.soft_table().to(llm.dtype)
    vec = inputs.out_vec(out_token).detach().to(llm.dtype)
    for bb in length_batches(toks, batch_tokens):
        out[bb] = forward_batch(llm, [toks[i] for i in bb], soft, vec).numpy()
    return out


def backward_through_llm(llm: LoadedLLM, inputs: LLMInputs, groups: list, loss_fn: Callable,
                         budget: int, checkpointing: bool = False):
    """Forward ``groups`` of prompts through the frozen LLM, compute the loss, backpropagate.

    Gradients accumulate in ``inputs`` (f_I, tokens) and in whatever ``loss_fn`` uses (the
    heads); the LLM's weights get none. When all prompts fit in ``budget`` padded tokens,
    one pass with a graph; otherwise gradient caching (module docstring): the same
    gradients, one extra forward, memory bounded by ``budget``.

    Args:
        groups: list of ``(prompts, out_token)``; ``loss_fn(states)`` gets one float32
            ``(len(prompts), d_llm)`` tensor per group, in order, and returns
            ``(loss tensor, terms dict)``.
        budget: padded tokens one graph-keeping forward may hold.
        checkpointing: run the graph-keeping forwards with activation checkpointing (call
            :func:`enable_grad_checkpointing` first).
    Returns:
        ``(loss, terms)`` of ``loss_fn``, after ``backward``.
    """
    dev = llm.device
    if sum(_padded(t) for t, _ in groups) <= budget:
        with _checkpointing(llm, checkpointing):
            hs = [forward_with_grad(llm, t, inputs, o) for t, o in groups]
        loss, terms = loss_fn(hs)
        loss.backward()
        return loss, terms
    chunks, hs = [], []
    # the graph pass below must replay this pass exactly: with dropout on (LoRA dropout of the
    # baselines) both draw the same masks from the same generator state (CPU and CUDA)
    rng_devices = [dev] if dev.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
        for toks, o in groups:
            bs = length_batches(toks, budget)
            h = torch.empty((len(toks), llm.d_llm), device=dev)
            for bb in bs:
                h[torch.from_numpy(bb).to(dev)] = forward_with_grad(llm, [toks[i] for i in bb], inputs, o)
            chunks.append(bs)
            hs.append(h.requires_grad_())
    loss, terms = loss_fn(hs)
    loss.backward()  # the heads' gradients and dL/dh
    for (toks, o), bs, h in zip(groups, chunks, hs):
        for bb in bs:
            with _checkpointing(llm, checkpointing):
                hc = forward_with_grad(llm, [toks[i] for i in bb], inputs, o)
            hc.backward(h.grad[torch.from_numpy(bb).to(dev)])
    return loss, terms


# --- data -----------------------------------------------------------------------------------


@dataclass
class E2EOptions:
    """The e2e-only knobs (``llmsrec train --mode e2e`` options map 1:1 onto these).

    Attributes:
        llm: ``smollm2-135m`` or a local HF folder (see ``load_llm``).
        history_window, verb: prompt options, as in precompute.
        batch_tokens: token budget of one no-grad forward (validation, test).
        grad_batch_tokens: token budget (padded) of one forward that keeps its graph; a step
            with more tokens runs in two passes (module docstring).
        device, dtype, threads: where the LLM runs (``cpu|cuda[:N]|hpu``; ``fp32|bf16|fp16``,
            None = fp32 on CPU, bf16 elsewhere; CPU threads).
        fi: initial linear f_I, ``moment`` or ``ridge`` (the fits of precompute).
        fi_arch: ``linear`` (trainable, initialised from ``fi``) or ``mlp`` (the authors').
        grad_checkpointing: recompute layer activations in the backward (less memory).
        max_steps: stop after this many training steps (smoke runs; a validation is run at
            the last step if it is not a scheduled one). None = no limit.
        eval_users: validate on a seeded sample of this many users (None = all); test
            always uses every user.
    """

    llm: str = LLM["llm"]
    history_window: int = HISTORY_WINDOW
    verb: str | None = None
    batch_tokens: int = LLM["batch_tokens"]
    grad_batch_tokens: int = E2E["grad_batch_tokens"]
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    fi: str = LLM["fi"]
    fi_arch: str = E2E["fi_arch"]
    grad_checkpointing: bool = False
    max_steps: int | None = None
    eval_users: int | None = None

    def __post_init__(self) -> None:
        if self.fi not in ("moment", "ridge"):
            raise InputError(f"--fi {self.fi!r}: expected 'moment' or 'ridge'")
        if self.fi_arch not in ("linear", "mlp"):
            raise InputError(f"--fi-arch {self.fi_arch!r}: expected 'linear' or 'mlp'")
        for name in ("history_window", "batch_tokens", "grad_batch_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}: must be >= 1")
        for name in ("max_steps", "eval_users"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InputError(f"--{name.replace('_', '-')}: must be >= 1")


@dataclass
class E2EData:
    """Tokenized prompts and the frozen SASRec outputs the e2e trainer reads.

    Attributes:
        n_items: N. item_toks: N tokenized item prompts (index iid-1).
        user_toks: view (``train``/``valid``/``test``) -> list (len U+1) of TokenizedPrompt
            or None (no prompt).
        train_cf: float32 ``(U+1, d_cf)`` SASRec O_u of the ``train`` input.
        E: float32 ``(N+1, d_cf)`` SASRec item embeddings.
        train_targets: int64 ``(U+1,)``; train_exclude: U+1 arrays (``seq[:-2]``);
        train_users: int64 uids with a training sample.
        candidates: ``valid``/``test`` -> int64 ``(U, 1+m)`` (row r = uid r+1).
        provenance: what the prompts and SASRec outputs came from.
    """

    n_items: int
    item_toks: list
    user_toks: dict
    train_cf: np.ndarray
    E: np.ndarray
    train_targets: np.ndarray
    train_exclude: list
    train_users: np.ndarray
    candidates: dict
    provenance: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.train_targets) - 1


def load_e2e_data(ds, sasrec, llm: LoadedLLM, *, history_window: int = HISTORY_WINDOW, verb: str | None = None,
                  views=("train", "valid", "test")) -> E2EData:
    """Build the prompts of ``views`` and the items, tokenize them, run SASRec once.

    Args:
        ds: ``PreparedDataset``; sasrec: checkpoint folder (or an ``SASRec`` module, tests).
        llm: the loaded model (its tokenizer). history_window, verb: as in precompute.
    Raises:
        InputError: SASRec trained on another dataset, prompts too long for the model.
    """
    sas, sas_digest = load_teacher(sasrec)
    E = sas.item_embeddings().detach().float().cpu().numpy()
    if E.shape[0] != ds.n_items + 1:
        raise InputError(f"SASRec has {E.shape[0] - 1} items, the dataset {ds.n_items}: "
                         f"the checkpoint was trained on another dataset")
    verb = verb or default_verb(ds.stats)
    item_toks = tokenize_prompts(llm, [item_prompt(ds.titles, i) for i in range(1, ds.n_items + 1)], ITEM_OUT)
    user_toks, train_cf, targets = {}, None, None
    for v in views:
        vp = build_view(ds, v, history_window=history_window, verb=verb)
        rows = [u for u in range(1, ds.n_users + 1) if vp.prompts[u] is not None]
        toks = tokenize_prompts(llm, [vp.prompts[u] for u in rows], USER_OUT)
        per_user: list = [None] * (ds.n_users + 1)
        for u, t in zip(rows, toks):
            per_user[u] = t
        user_toks[v] = per_user
        if v == "train":
            train_cf = np.zeros((ds.n_users + 1, E.shape[1]), dtype=np.float32)
            train_cf[1:] = teacher_user_reps(sas, vp.cf_inputs, list(range(1, ds.n_users + 1)))
            targets = np.asarray(vp.targets, dtype=np.int64)
    if train_cf is None:
        raise InputError("e2e data: the train view is required")
    train_users = np.array([u for u in range(1, ds.n_users + 1)
                            if user_toks["train"][u] is not None and targets[u] > 0], dtype=np.int64)
    exclude = [np.zeros(0, dtype=np.int64)] + [np.asarray(s[:-2], dtype=np.int64) for s in ds.seqs[1:]]
    cands = {s: np.asarray(ds.candidates(s), dtype=np.int64) for s in ("valid", "test") if s in views}
    prov = {
        "llmsrec_version": __version__, "model": llm.name, "model_weights_sha256": llm.weights_digest,
        "tokenizer_sha256": llm.tokenizer_digest, "dtype": str(llm.dtype).removeprefix("torch."),
        "template_version": TEMPLATE_VERSION, "verb": verb, "history_window": int(history_window),
        "dataset_sha256": ds.digest, "sasrec_sha256": sas_digest,
        "sasrec": str(Path(sasrec).resolve()) if isinstance(sasrec, (str, os.PathLike)) else None,
    }
    return E2EData(n_items=ds.n_items, item_toks=item_toks, user_toks=user_toks, train_cf=train_cf, E=E,
                   train_targets=targets, train_exclude=exclude, train_users=train_users,
                   candidates=cands, provenance=prov)


# --- the trainer ----------------------------------------------------------------------------


@torch.no_grad()
def score_states(heads: LLMSRecHeads, user_h: np.ndarray, item_h: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """s(u, i) = f_item(h_i) . f_user(h_u) (Eq. 9) for each row's candidates.

    Args:
        user_h: float32 ``(n, d_llm)`` (one row per candidate row); item_h: ``(N+1, d_llm)``;
        candidates: int64 ``(n, C)``.
    Returns:
        float32 numpy ``(n, C)``, computed on the heads' device.
    """
    dev = next(heads.parameters()).device
    was = heads.training
    heads.eval()
    items = heads.item(torch.from_numpy(np.ascontiguousarray(item_h)).to(dev))
    users = heads.user(torch.from_numpy(np.ascontiguousarray(user_h)).to(dev))
    s = torch.einsum("ucd,ud->uc", items[torch.from_numpy(candidates).to(dev)], users)
    heads.train(was)
    return s.float().cpu().numpy()


class E2ETrainer:
    """One e2e training run's state: heads, f_I + tokens, optimizer, seeded generator.

    ``step(users)`` does one optimizer step on a batch of uids; ``evaluate(split, users)``
    scores a split with states recomputed from the current f_I and tokens. :func:`fit_e2e`
    drives it with cache mode's schedule; the benchmark times ``step`` directly.

    Args:
        data: :class:`E2EData`; llm: the frozen model; inputs: the starting f_I + tokens
            (moved to ``llm.device``); cfg: :class:`~llmsrec.heads.train.TrainConfig` (its
            ``train_negatives`` must be a count); opts: :class:`E2EOptions`.

    Every decoder parameter gets ``requires_grad`` False except those ``inputs`` also owns
    (the LoRA adapters of the baselines, :mod:`llmsrec.baselines`); the optimizer holds the
    heads' and ``inputs``' parameters.
    Raises:
        InputError: ``train_negatives == "all"``.
    """

    def __init__(self, data: E2EData, llm: LoadedLLM, inputs: LLMInputs, cfg: TrainConfig, opts: E2EOptions):
        if cfg.train_negatives == "all":
            raise InputError("--mode e2e: --train-negatives all would run every item prompt through the "
                             f"LLM at every step; give a count (default {E2E_DEFAULT_NEGATIVES})")
        self.data, self.llm, self.cfg, self.opts = data, llm, cfg, opts
        self.lcfg = cfg.loss_config()
        self.dev = llm.device
        own = {id(p) for p in inputs.parameters()}  # adapters inside the decoder that inputs owns train
        for p in llm.decoder.parameters():
            if id(p) not in own:
                p.requires_grad_(False)
        if opts.grad_checkpointing:
            enable_grad_checkpointing(llm)
        hcfg = HeadsConfig(d_llm=llm.d_llm, d_cf=int(data.train_cf.shape[1]), d_out=cfg.d_out,
                           hidden=cfg.hidden, cf_hidden=cfg.cf_hidden)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the same initial heads as cache mode under this seed
            heads = LLMSRecHeads(hcfg)
        self.heads = heads.to(self.dev)
        self.inputs = inputs.to(self.dev)
        self.rng = np.random.default_rng(cfg.seed)
        params = [*self.heads.parameters(), *self.inputs.parameters()]
        adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        try:
            self.opt = torch.optim.Adam(params, fused=True, **adam)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.Adam(params, **adam)
        self.train_cf = torch.from_numpy(data.train_cf).to(self.dev)

    # -- one step ------------------------------------------------------------------------
    def _loss(self, h_u: torch.Tensor, h_i: torch.Tensor, inv: torch.Tensor, users: np.ndarray):
        u = self.heads.user(h_u)
        e = self.heads.item(h_i)[inv]
        r = retrieval_loss(u, e[:, 0], e[:, 1:])
        cfu = self.heads.cf_user(self.train_cf[torch.from_numpy(users).to(self.dev)]) \
            if self.lcfg.distill != "none" else None
        return total_loss(r, u, cfu, self.lcfg)

    def step(self, users: np.ndarray) -> dict:
        """One optimizer step on the uids ``users``: their ``train`` prompts, their targets and
        ``train_negatives`` sampled negatives each (drawn from the trainer's generator exactly
        as cache mode draws them). Returns the loss terms (floats)."""
        d = self.data
        users = np.asarray(users, dtype=np.int64)
        tg = d.train_targets[users]
        neg = sample_negatives([d.train_exclude[x] for x in users], tg, d.n_items,
                               int(self.cfg.train_negatives), self.rng)
        ids = np.concatenate([tg[:, None], neg], axis=1)
        uniq, inv = np.unique(ids, return_inverse=True)
        inv_t = torch.from_numpy(inv.reshape(ids.shape)).to(self.dev)
        groups = [([d.user_toks["train"][x] for x in users], USER_OUT),
                  ([d.item_toks[i - 1] for i in uniq], ITEM_OUT)]
        self.opt.zero_grad(set_to_none=True)
        _, terms = backward_through_llm(
            self.llm, self.inputs, groups, lambda hs: self._loss(hs[0], hs[1], inv_t, users),
            self.opts.grad_batch_tokens, self.opts.grad_checkpointing)
        self.opt.step()
        mark_step(self.dev)
        return terms

    # -- evaluation ----------------------------------------------------------------------
    def item_states(self) -> np.ndarray:
        """float32 ``(N+1, d_llm)``: every item's state with the current f_I and ``[ItemOut]``."""
        h = np.zeros((self.data.n_items + 1, self.llm.d_llm), dtype=np.float32)
        h[1:] = compute_states(self.llm, self.inputs, self.data.item_toks, ITEM_OUT, self.opts.batch_tokens)
        return h

    def user_states(self, view: str, users: np.ndarray) -> np.ndarray:
        """float32 ``(len(users), d_llm)``: the ``view`` states of ``users`` (no prompt -> zeros)."""
        toks = self.data.user_toks[view]
        have = [k for k, u in enumerate(users) if toks[u] is not None]
        h = np.zeros((len(users), self.llm.d_llm), dtype=np.float32)
        h[have] = compute_states(self.llm, self.inputs, [toks[users[k]] for k in have], USER_OUT,
                                 self.opts.batch_tokens)
        return h

    def evaluate(self, split: str, users: np.ndarray | None = None, item_h: np.ndarray | None = None):
        """(metrics, item states) of ``split`` (``valid``/``test``) on ``users`` (default all)
        with states recomputed from the current f_I and tokens (``item_h`` reused if given)."""
        users = np.arange(1, self.data.n_users + 1) if users is None else np.asarray(users)
        if item_h is None:
            item_h = self.item_states()
        s = score_states(self.heads, self.user_states(split, users), item_h,
                         self.data.candidates[split][users - 1])
        return metrics_of(s), item_h

    def view_outputs(self, view: str, item_h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every user's outputs on ``view`` (a split or a shuffled view) from one LLM pass:
        (scores float32 ``(U, 1+m)``, target first; f_user(h_u) float32 ``(U, d')``)."""
        h = self.user_states(view, np.arange(1, self.data.n_users + 1))
        s = score_states(self.heads, h, item_h, self.data.candidates[view])
        dev = next(self.heads.parameters()).device
        was = self.heads.training
        self.heads.eval()
        with torch.no_grad():
            z = self.heads.user(torch.from_numpy(h).to(dev)).float().cpu().numpy()
        self.heads.train(was)
        return s, z

    def state(self) -> dict:
        """The live state dicts ``{"heads", "inputs"}`` (what :meth:`load_state` takes; the
        tensors are the modules' own: copy them to keep them)."""
        return {"heads": self.heads.state_dict(), "inputs": self.inputs.state_dict()}

    def load_state(self, state: dict) -> None:
        self.heads.load_state_dict(state["heads"])
        self.inputs.load_state_dict(state["inputs"])


def metrics_of(scores: np.ndarray) -> dict[str, float]:
    """``ranking_metrics`` of float32 scores ``(U, 1+m)`` (target in column 0) as plain floats
    (NDCG@10/20, HR@10/20), keeping torch's thread count.

    Raises:
        InputError: a score is NaN/inf (training diverged).
    """
    threads = torch.get_num_threads()
    try:
        return {k: float(v) for k, v in ranking_metrics(scores).items()}
    except ValueError as e:
        raise InputError(f"training diverged: {e}; lower --lr") from None
    finally:
        # numba's OpenMP layer resets the shared OpenMP thread count that torch reads;
        # without this, every later LLM forward would run with numba's thread count
        torch.set_num_threads(threads)


def eval_user_sample(n_users: int, k: int | None, seed: int) -> np.ndarray:
    """uids validated on: all 1..U, or a seeded sorted sample of ``k`` (recorded in the outputs)."""
    users = np.arange(1, n_users + 1, dtype=np.int64)
    if k is None or k >= n_users:
        return users
    return np.sort(np.random.default_rng([int(seed), 7]).choice(users, size=k, replace=False))


@dataclass
class E2EFit(FitResult):
    """:class:`~llmsrec.heads.train.FitResult` plus the trained f_I/tokens and e2e timings."""

    inputs: LLMInputs = None
    test: dict = None
    timings: dict = None
    valid_users: int = 0
    trainer: "E2ETrainer" = None
    item_states: np.ndarray = None
    test_view: tuple = None  # E2ETrainer.view_outputs("test", item_states) of the selected checkpoint


def fit_e2e(data: E2EData, llm: LoadedLLM, inputs: LLMInputs, config: TrainConfig | None = None,
            options: E2EOptions | None = None, progress: bool = True,
            log: Callable[[str], None] | None = None, trainer_cls: type | None = None) -> E2EFit:
    """Train heads, f_I and tokens through the frozen LLM; select on validation; test once.

    Deterministic on CPU: same data, config and options give the same weights. The user
    order and the negatives come from a numpy Generator seeded like cache mode's.

    ``trainer_cls``: an :class:`E2ETrainer` subclass with the same constructor (the LLM4Rec
    baselines' trainer, :mod:`llmsrec.baselines`); default :class:`E2ETrainer`.

    Returns:
        :class:`E2EFit`: the best-on-validation heads and inputs (eval mode), history, the
        test metrics of the selected checkpoint, timings (seconds: ``train_steps``,
        ``validation``, ``test``, ``per_epoch`` = (steps + validations) / epochs run), the
        trainer (holding the selected state) and that checkpoint's item states
        (``item_states``, float32 ``(N+1, d_llm)``, for scoring more views without recomputing).
    Raises:
        InputError: no training users, ``train_negatives == "all"``, divergence, device OOM.
    """
    cfg = config or TrainConfig(train_negatives=E2E_DEFAULT_NEGATIVES)
    opts = options or E2EOptions()
    users_all = np.asarray(data.train_users, dtype=np.int64)
    if len(users_all) == 0:
        raise InputError("train: no user has a training sample (train view empty)")
    tr = (trainer_cls or E2ETrainer)(data, llm, inputs, cfg, opts)
    valid_users = eval_user_sample(data.n_users, opts.eval_users, cfg.seed)
    n_batches = math.ceil(len(users_all) / cfg.batch_size)
    order = users_all
    item_h = None  # the item states of the latest validation (kept with the best state)

    def begin_epoch(epoch: int) -> None:
        nonlocal order
        order = tr.rng.permutation(users_all)

    def step(epoch: int, bi: int) -> dict[str, float]:
        return tr.step(order[bi * cfg.batch_size : (bi + 1) * cfg.batch_size])

    def validate(steps: int) -> dict[str, float]:
        nonlocal item_h
        m, item_h = tr.evaluate("valid", valid_users)
        return m

    def state() -> dict:  # live tensors: the loop keeps a deep copy
        return {**tr.state(), "item_h": item_h}

    def record(t: Tick) -> dict:
        return validation_record(t, tr.opt.param_groups[0]["lr"])

    def after_validation(t: Tick) -> None:
        if log:
            log(f"validation {t.validation} (step {t.step}): {cfg.select_metric} "
                f"{t.metrics[cfg.select_metric]:.4f}{' (best)' if t.improved else ''}")
        for g in tr.opt.param_groups:
            g["lr"] *= cfg.lr_decay

    fit = train_loop(step, validate, state, record, epochs=cfg.epochs, batches=n_batches,
                     points=eval_points(n_batches, cfg.evals_per_epoch), max_steps=opts.max_steps,
                     select=cfg.select_metric, patience=cfg.patience, terms=LOSS_TERMS, begin_epoch=begin_epoch,
                     after_validation=after_validation, progress=progress, desc="e2e epoch")
    seconds = fit.seconds  # training (steps + validations), as cache mode's; the test is apart
    best_item_h = fit.state.pop("item_h")
    tr.load_state(fit.state)
    tr.heads.eval()
    tr.inputs.eval()
    t = time.perf_counter()
    # the selected checkpoint's item states; the scores and user representations are kept
    # (small: U x (1+m) and U x d') so analyses need not run the LLM over the test view again
    test_view = tr.view_outputs("test", best_item_h)
    test = metrics_of(test_view[0])
    t_test = time.perf_counter() - t
    epochs_run = float(fit.epochs_run)
    t_steps, t_valid = fit.step_seconds, fit.validation_seconds
    timings = {"train_steps": round(t_steps, 3), "validation": round(t_valid, 3), "test": round(t_test, 3),
               "per_epoch": round((t_steps + t_valid) / max(epochs_run, 1e-9), 3),
               "train_steps_per_epoch": round(t_steps / max(epochs_run, 1e-9), 3),
               "per_step": round(t_steps / max(fit.steps, 1), 3)}
    return E2EFit(heads=tr.heads, history=fit.history, best=fit.best, steps=fit.steps,
                  epochs_run=round(epochs_run, 4), stopped_early=fit.stopped_early, seconds=seconds,
                  inputs=tr.inputs, test=test, timings=timings, valid_users=int(len(valid_users)), trainer=tr,
                  item_states=best_item_h, test_view=test_view)


# --- the command ----------------------------------------------------------------------------


def _initial_inputs(ds, llm: LoadedLLM, data: E2EData, opts: E2EOptions, seed: int, cache=None):
    """Starting f_I + tokens: the cache's ``/params`` (checked against the run) or the fit."""
    if cache is None:
        inputs = LLMInputs.initial(llm, data.E, fi=opts.fi, arch=opts.fi_arch, seed=seed, titles=ds.titles)
        return inputs, (f"fit: {opts.fi} (as precompute --fi {opts.fi})" if opts.fi_arch == "linear"
                        else "mlp: torch default init")
    if opts.fi_arch != "linear":
        raise InputError("--cache with --mode e2e starts from the cache's linear f_I; drop --fi-arch mlp")
    with open_cache(cache) as c:
        prov, arrays = c.provenance, c.params()
    checks = {"dataset_sha256": ds.digest, "history_window": opts.history_window,
              "model_weights_sha256": llm.weights_digest, "sasrec_sha256": data.provenance["sasrec_sha256"],
              "verb": data.provenance["verb"]}
    for k, v in checks.items():
        if prov.get(k) != v:
            raise InputError(f"{cache}: provenance field '{k}' differs from this e2e run "
                             f"(cache: {str(prov.get(k))[:20]}, run: {str(v)[:20]})")
    init = f"cache: {Path(cache).resolve()} (f_I_sha256 {prov.get('f_I_sha256')})"
    return LLMInputs.from_arrays(arrays, data.E), init


def load_run_inputs(ds, llm, eopts: E2EOptions):
    """Shared start of an LLM-in-the-loop run (e2e mode, the LLM4Rec baselines): load the
    dataset if given as a folder, set ``eopts.threads``, load the LLM if given by name, and
    record its name in ``eopts.llm``.

    Returns:
        ``(PreparedDataset, LoadedLLM)``.
    """
    if isinstance(ds, (str, os.PathLike)):
        ds = load_prepared(ds)
    if eopts.threads:
        torch.set_num_threads(eopts.threads)
    if not isinstance(llm, LoadedLLM):
        llm = load_llm(eopts.llm, device=eopts.device, dtype=eopts.dtype)
    eopts.llm = llm.name
    return ds, llm


def train_e2e(ds, sasrec, out, *, cache=None, force: bool = False, progress: bool = True,
              llm: str | LoadedLLM | None = None, log: Callable[[str], None] | None = None,
              **opts: Any) -> dict:
    """``llmsrec train --mode e2e``: train through the frozen LLM and write ``out``.

    Args:
        ds: ``PreparedDataset`` or its folder; sasrec: SASRec checkpoint folder (or module).
        out: folder to create with cache mode's files (``heads.safetensors``,
            ``heads_config.json`` with ``"mode": "e2e"``, ``history.jsonl``,
            ``training_curve.png``, ``results.json``) plus ``params.safetensors`` (f_I and
            the two token vectors).
        cache: optional cache whose ``/params`` (linear f_I, tokens) are the starting point
            (e.g. the output of ``refine-tokens``); default: precompute's fit.
        llm: a ``LoadedLLM`` (tests), or the name/folder to load (``E2EOptions.llm``).
        **opts: :class:`~llmsrec.heads.train.TrainConfig` and :class:`E2EOptions` fields.
    Returns:
        The ``results.json`` dict (``valid``: the selected validation's metrics; ``test``;
        ``timings`` in seconds; ``mode``: ``e2e``).
    Raises:
        InputError: bad options, ``out`` exists without ``force``, mismatched inputs.
    """
    e2e_names = set(E2EOptions.__dataclass_fields__)
    opts = {k: v for k, v in opts.items() if v is not None}
    if isinstance(llm, (str, os.PathLike)):
        opts["llm"] = str(llm)
    eopts = E2EOptions(**{k: v for k, v in opts.items() if k in e2e_names})
    opts = {k: v for k, v in opts.items() if k not in e2e_names}
    opts.setdefault("train_negatives", E2E_DEFAULT_NEGATIVES)
    cfg = TrainConfig.from_options(**opts)
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    t = time.perf_counter()
    ds, llm = load_run_inputs(ds, llm, eopts)
    data = load_e2e_data(ds, sasrec, llm, history_window=eopts.history_window, verb=eopts.verb)
    inputs, init = _initial_inputs(ds, llm, data, eopts, cfg.seed, cache)
    t_load = time.perf_counter() - t
    fit = fit_e2e(data, llm, inputs, cfg, eopts, progress=progress, log=log)
    prov = {**data.provenance, "init": init, "valid_users": fit.valid_users}
    results = {
        "model": "LLM-SRec",
        "mode": "e2e",
        "valid": fit.best["metrics"],
        "test": fit.test,
        **fit.record(),
        "train_users": int(len(data.train_users)),
        "valid_users": fit.valid_users,
        "timings": {"load": round(t_load, 3), **fit.timings},
        "config": asdict(cfg),
        "e2e": asdict(eopts),
    }
    with atomic_dir(out, force=force) as tmp:
        if prov.get("sasrec"):
            copy_teacher(prov, tmp / TEACHER_DIR)
        save_heads(fit.heads, tmp, extra={"mode": "e2e", "train": asdict(cfg), "e2e": asdict(eopts),
                                          "provenance": prov})
        write_params(tmp / PARAMS_FILE, fit.inputs.arrays(), arch=eopts.fi_arch,
                     extra={"source": "llmsrec train --mode e2e"})
        write_history(tmp / "history.jsonl", fit.history)
        plot_history(fit.history, tmp / "training_curve.png", title="LLM-SRec e2e (f_I, tokens, heads)")
        write_json(tmp / "results.json", results)
    return results


#: subfolder of an e2e or baseline checkpoint holding a copy of its CF-SRec teacher
TEACHER_DIR = "teacher"
TEACHER_FILES = ("model.safetensors", "config.json")


def copy_teacher(prov: dict, dest: Path) -> None:
    """Copy the CF-SRec teacher's checkpoint files (:data:`TEACHER_FILES`, a few MB) from
    ``prov["sasrec"]`` into the new folder ``dest``, so a checkpoint keeps working when the
    teacher's folder moves.

    Raises:
        InputError: a file is gone, or the weights differ from ``prov["sasrec_sha256"]``
        (the teacher changed during training).
    """
    src = Path(prov["sasrec"])
    dest.mkdir()
    for name in TEACHER_FILES:
        if not (src / name).is_file():
            raise InputError(f"{src / name}: not found (the CF-SRec teacher moved during training)")
        shutil.copyfile(src / name, dest / name)
    if sha256_file(dest / "model.safetensors") != prov.get("sasrec_sha256"):
        raise InputError(f"{src / 'model.safetensors'}: changed during training (its sha256 differs from the "
                         f"one trained with)")


def checkpoint_teacher(ckpt: Path, prov: dict) -> Path:
    """The teacher folder to load for checkpoint ``ckpt``: its own ``teacher/`` copy, else (a
    checkpoint written before copies existed) the folder recorded in ``prov["sasrec"]``.

    Raises:
        InputError: neither exists.
    """
    own = ckpt / TEACHER_DIR
    if (own / "model.safetensors").is_file():
        return own
    recorded = prov.get("sasrec")
    if not recorded:
        raise InputError(f"{ckpt}: no CF-SRec checkpoint recorded")
    if not (Path(recorded) / "model.safetensors").is_file():
        raise InputError(f"{ckpt}: no {TEACHER_DIR}/ copy of the CF-SRec teacher and the recorded "
                         f"{recorded} is gone (put the teacher back there, or retrain)")
    return Path(recorded)


def evaluate_e2e_checkpoint(ds, checkpoint, device: str = "cpu", llm: LoadedLLM | None = None,
                            batch_tokens: int = LLM["batch_tokens"]) -> dict:
    """``llmsrec evaluate --model llmsrec-e2e``: recompute valid/test states with the checkpoint's
    f_I and tokens (LLM, prompt options and SASRec as recorded in ``heads_config.json``) and score
    every user.

    Returns:
        ``{"valid": metrics, "test": metrics}``.
    Raises:
        InputError: not an e2e checkpoint, or its LLM / SASRec / dataset no longer match.
    """
    ckpt = Path(checkpoint)
    try:
        doc = json.loads((ckpt / "heads_config.json").read_text())
    except (OSError, ValueError):
        raise InputError(f"{ckpt / 'heads_config.json'}: missing or unreadable") from None
    if doc.get("mode") != "e2e":
        raise InputError(f"{ckpt}: not an e2e checkpoint (use --model llmsrec)")
    e, prov = doc["e2e"], doc["provenance"]
    if prov.get("dataset_sha256") != ds.digest:
        raise InputError(f"{ckpt}: trained on dataset {str(prov.get('dataset_sha256'))[:12]}..., "
                         f"{ds.root} has {ds.digest[:12]}...")
    if llm is None:
        llm = load_llm(e["llm"], device=device, dtype=e.get("dtype"))
    if llm.weights_digest != prov.get("model_weights_sha256"):
        raise InputError(f"{ckpt}: provenance field 'model_weights_sha256' differs from {llm.name}")
    teacher = checkpoint_teacher(ckpt, prov)
    data = load_e2e_data(ds, teacher, llm, history_window=e["history_window"], verb=prov["verb"],
                         views=("train", "valid", "test"))
    if data.provenance["sasrec_sha256"] != prov.get("sasrec_sha256"):
        raise InputError(f"{ckpt}: provenance field 'sasrec_sha256' differs from {teacher}")
    arrays, meta = read_params(ckpt / PARAMS_FILE)
    inputs = LLMInputs.from_arrays(arrays, data.E, meta["f_I_arch"])
    cfg = TrainConfig.from_options(**doc["train"])
    opts = E2EOptions(**{**e, "device": device, "batch_tokens": batch_tokens, "grad_checkpointing": False})
    tr = E2ETrainer(data, llm, inputs, cfg, opts)
    tr.heads.load_state_dict(load_heads(ckpt).state_dict())
    valid, item_h = tr.evaluate("valid")
    test, _ = tr.evaluate("test", item_h=item_h)
    return {"valid": valid, "test": test}
