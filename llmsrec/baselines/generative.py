"""The Next Item Title Generation approach (paper Sec. 2.1.2, approach 1; Table 1; Appendix
B.1; Eq. 5) for the four LLM4Rec baselines, and its candidate-likelihood evaluation.

Prompt (Table 1): the history of the last W items (number, date, quoted title; LLaRA,
CoLLM and A-LLMRec add the item's soft token f_I(E_i), CoLLM and A-LLMRec open with the
user-representation token f_U(O_u)), then the candidate set C_u = target + m negatives as
quoted titles (with their soft tokens where the model has them), in a seeded random order
(the target is never in a fixed place), then ``Answer:``. The answer is `` <target title>``
followed by an end token (:func:`end_token_id`), so a generated title has an end.

========  ===========================  ==============================  ====================
model     history / candidates         soft tokens                     trains
========  ===========================  ==============================  ====================
TALLRec   titles (Table 1 (a))         none                            LoRA
LLaRA     titles + item slots (b)      f_I(E_i)                        LoRA, f_I
CoLLM     user slot + (b)  (c)         f_U(O_u), f_I(E_i)              LoRA, f_I, f_U
A-LLMRec  as CoLLM (c)                 f_U(O_u), f_I(enc(E_i))         f_I, f_U (LLM frozen)
========  ===========================  ==============================  ====================

**Training (Eq. 5)**: next-token cross-entropy on the answer's tokens only (the prompt's
tokens are masked), mean over the answer tokens of a step's users. Each training user gets
its ``train`` view's history and target plus ``negatives`` negatives drawn from the
trainer's seeded generator (never the target nor an item of ``seq[:-2]``). Each user's
prompt runs forward and backward on its own (gradients accumulated), so memory is one
prompt's activations. The schedule, validation, early stopping and selection are
:func:`llmsrec.training.train_loop`'s; the LoRA injection, the projections' start (f_I,
f_U) and A-LLMRec's stage 1 are the retrieval baselines' (:mod:`llmsrec.baselines.common`).

**Evaluation**: no free text is matched. Each candidate is ranked by the LLM's
log-likelihood of its answer tokens given the prompt, ``log p(Text(i) | P^u, D^u)``
(Eq. 5): the sum over its tokens (default: the probability of generating exactly that
title), or the mean per token (``length_norm``; both are always computed and stored). The
prompt runs once with its key/value cache kept; the m+1 answers then run as one batch
continuing from that cache (:func:`candidate_loglik`), instead of m+1 forwards of the
whole prompt (:func:`candidate_loglik_repeat`, the same numbers, kept for the
comparison). Candidates are the split's target and its first m stored negatives (the same
for every model and for SASRec). Metrics: HR@1 (Table 4, Fig. 1a), NDCG@10 over the m+1
candidates (with m = 19, as the paper), plus how often greedy decoding from the same prompt
reproduces a candidate's answer exactly (``exact``) and the target's (``greedy_HR@1``).

Differences from the original models, as in the retrieval baselines: one training stage,
every model on the same prompts and loss; TALLRec and CoLLM originally answer Yes/No about
one candidate, here (as in the paper) they generate a title among m+1.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from llmsrec import __version__
from llmsrec.atomic import atomic_dir, write_json
from llmsrec.baselines.common import (
    LoraOptions, apply_lora, get_spec, initial_inputs, lora_state, model_options, register_template, save_arrays,
)
from llmsrec.cfsrec.teacher import load_teacher, teacher_user_reps
from llmsrec.data import load_prepared
from llmsrec.defaults import E2E, HISTORY_WINDOW, LLM
from llmsrec.errors import InputError
from llmsrec.e2e.loop import eval_user_sample
from llmsrec.heads.losses import sample_negatives
from llmsrec.metrics import metrics_from_ranks, positive_ranks
from llmsrec.precompute.engine import TokenizedPrompt
from llmsrec.precompute.llm import HISTORY_EMB, LoadedLLM, load_llm
from llmsrec.precompute.prompts import (
    TEMPLATE_VERSION, TEMPLATES, USER_REP_ITEM, Prompt, build_view, clean_title, default_verb,
)
from llmsrec.training import Tick, eval_points, plot_curve, train_loop, write_history

#: the paper's candidate set for title generation (Sec. 2.2, Table 1): the target + 19 negatives
GEN_NEGATIVES = 19
#: the closing sentence of the history (Table 1), then the candidate list
GEN_CLOSE = ("). Based on this sequence of {verb}, choose one \"Title\" to recommend for this user next from "
             "the following item \"Title\" set: ")
CANDIDATE_SEP = ", "
ANSWER_CUE = ". Answer:"
#: views the generative baselines score (shuffled inference: Fig. 1a)
GEN_EVAL_VIEWS = ("test", "test-shuffled")
#: salt of the seeded candidate display order (a user's order is the same for every model)
_ORDER_SALT = 29


def _gen_template(name: str, base: str) -> str:
    return register_template(name, {**TEMPLATES[base], "user_close": GEN_CLOSE})


#: Table 1 (a) TALLRec, (b) LLaRA, (c) CoLLM / A-LLMRec: the retrieval templates' history
#: (Table 2) with the candidate-set sentence in place of ``[UserOut]``
GEN_TEMPLATES = {
    "tallrec": _gen_template("gen-tallrec-prompt-v1", "tallrec-prompt-v1"),
    "llara": _gen_template("gen-llara-prompt-v1", TEMPLATE_VERSION),
    "collm": _gen_template("gen-collm-prompt-v1", "collm-prompt-v1"),
    "allmrec": _gen_template("gen-collm-prompt-v1", "collm-prompt-v1"),
}


@dataclass
class GenOptions:
    """Options of one generative baseline run (``llmsrec compare --approach generative``).

    Attributes:
        negatives: m, negatives per candidate set (19: the paper's 20 candidates).
        length_norm: rank candidates by the mean log-probability per answer token instead of
            the sum (both are computed; this picks the one the metrics report).
        batch_size: users per training step (gradients accumulated one prompt at a time).
        lr: Adam learning rate of LoRA, f_I and f_U.
        epochs, patience, evals_per_epoch, max_steps: the training loop's budget and
            validation schedule (:func:`llmsrec.training.train_loop`); ``max_steps`` is the CPU
            budget (validated at the last step).
        eval_users: validation on a seeded sample of N users (None: all).
        test_users: test views scored on a seeded sample of N users (None: all).
        select_metric: validation metric that selects the checkpoint.
        history_window: W; verb: None = the dataset's default.
        llm, device, dtype, threads: the LLM and where it runs.
        fi, fi_arch: f_I's start and shape (as the retrieval baselines').
        seed: LoRA init, negatives, user order, dropout masks, validation sample.
    """

    negatives: int = GEN_NEGATIVES
    length_norm: bool = False
    batch_size: int = 20
    lr: float = 1e-4
    epochs: int = 10
    patience: int = 10
    evals_per_epoch: int = 10
    max_steps: int | None = None
    eval_users: int | None = None
    test_users: int | None = None
    select_metric: str = "NDCG@10"
    history_window: int = HISTORY_WINDOW
    verb: str | None = None
    llm: str = LLM["llm"]
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    fi: str = LLM["fi"]
    fi_arch: str = E2E["fi_arch"]
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("negatives", "batch_size", "epochs", "patience", "evals_per_epoch", "history_window"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"generative: {name.replace('_', '-')} must be >= 1")
            setattr(self, name, int(getattr(self, name)))
        for name in ("max_steps", "eval_users", "test_users"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise InputError(f"generative: {name.replace('_', '-')} must be >= 1")
        if self.lr <= 0:
            raise InputError("generative: lr must be > 0")
        if self.select_metric not in ("NDCG@10", "HR@1"):
            raise InputError(f"generative: select metric {self.select_metric!r}: expected NDCG@10 or HR@1")


# --- prompts --------------------------------------------------------------------------------


def candidate_order(seed: int, split: str, uid: int, n: int) -> np.ndarray:
    """The display order of a user's n candidates (index 0 = target): int64 ``(n,)``, seeded
    by (seed, base split, uid) only, so every model and the shuffled view show the same order."""
    salt = {"train": 1, "valid": 2, "test": 3}[split.removesuffix("-shuffled")]
    return np.random.default_rng([int(seed), _ORDER_SALT, salt, int(uid)]).permutation(n)


def generation_prompt(model: str, history: Prompt, titles, candidates, order) -> Prompt:
    """Table 1's prompt: the history part (built with the model's generative template) + the
    candidate titles in ``order`` (with soft tokens for LLaRA/CoLLM/A-LLMRec) + ``Answer:``.

    Args:
        history: :func:`~llmsrec.precompute.prompts.build_view`'s prompt with template
            ``GEN_TEMPLATES[model]`` (soft ids: the user-rep placeholder, then the window).
        candidates: int ``(C,)`` iids (target first); order: display permutation ``(C,)``.
    Returns:
        A :class:`~llmsrec.precompute.prompts.Prompt`; ``soft_items`` holds
        :data:`~llmsrec.precompute.prompts.USER_REP_ITEM` for the user-rep slot, then item ids.
    """
    spec = get_spec(model)
    shown = [int(candidates[k]) for k in order]
    if spec.item_soft:
        parts = [f"\"{clean_title(titles[i])}\", {HISTORY_EMB}" for i in shown]
    else:
        parts = [f"\"{clean_title(titles[i])}\"" for i in shown]
    soft = np.asarray(history.soft_items, dtype=np.int64)
    lead = soft[soft == USER_REP_ITEM] if spec.user_rep else soft[:0]
    items = soft[soft != USER_REP_ITEM] if spec.item_soft else soft[:0]
    cand_soft = np.asarray(shown if spec.item_soft else [], dtype=np.int64)
    text = history.text + CANDIDATE_SEP.join(parts) + ANSWER_CUE
    return Prompt(text=text, soft_items=np.concatenate([lead, items, cand_soft]).astype(np.int64),
                  who=history.who, remedy=history.remedy)


#: the end-of-turn token of chat-tuned models (SmolLM2-Instruct), preferred as the answer's end
CHAT_END = "<|im_end|>"


def end_token_id(llm: LoadedLLM) -> int | None:
    """The token that ends an answer: :data:`CHAT_END` when the vocabulary has it as one
    token (the bundled SmolLM2's GGUF tokenizer names ``<|im_start|>`` its EOS, while the
    instruct model ends its turns with ``<|im_end|>``), else the tokenizer's EOS, else None."""
    tok = llm.tokenizer
    tid = tok.convert_tokens_to_ids(CHAT_END) if CHAT_END in tok.get_vocab() else None
    if tid is not None and tid != tok.unk_token_id:
        return int(tid)
    return None if tok.eos_token_id is None else int(tok.eos_token_id)


def answer_ids(llm: LoadedLLM, title: str) -> np.ndarray:
    """Token ids of an answer: `` <clean title>`` + :func:`end_token_id` (if any). int64 ``(T,)``."""
    ids = llm.tokenizer(" " + clean_title(title), add_special_tokens=False)["input_ids"]
    end = end_token_id(llm)
    return np.asarray(list(ids) + ([end] if end is not None else []), dtype=np.int64)


def tokenize_generation(llm: LoadedLLM, prompt: Prompt) -> TokenizedPrompt:
    """Tokenize a generation prompt (no out token: ``out_pos`` is its last position).

    Raises:
        InputError: soft-token count mismatch, or longer than the model's positions.
    """
    ids = np.asarray(llm.tokenizer(prompt.text, add_special_tokens=True)["input_ids"], dtype=np.int64)
    pos = np.flatnonzero(ids == llm.token_ids[HISTORY_EMB])
    if len(pos) != len(prompt.soft_items):
        raise InputError(f"prompt has {len(pos)} {HISTORY_EMB} tokens for {len(prompt.soft_items)} soft items: "
                         f"{prompt.text[:80]!r}...")
    if len(ids) > llm.max_positions:
        raise InputError(f"{prompt.who or 'a prompt'}: its generation prompt has {len(ids):,} tokens, more than the "
                         f"model's {llm.max_positions:,} positions; lower --history-window or --gen-negatives")
    return TokenizedPrompt(ids, pos, np.asarray(prompt.soft_items, dtype=np.int64), len(ids) - 1)


# --- data -----------------------------------------------------------------------------------


@dataclass
class ViewData:
    """One view's history prompts and CF user representations (users 1..U).

    Attributes:
        prompts: list (U+1) of history :class:`Prompt` or None; targets: int64 ``(U+1,)``.
        user_cf: float32 ``(U+1, d_cf)`` O_u of the view's (possibly shuffled) input.
    """

    prompts: list
    targets: np.ndarray
    user_cf: np.ndarray


@dataclass
class GenData:
    """What a generative run reads: the dataset, the teacher's E and O_u, answer ids.

    Attributes:
        ds: the ``PreparedDataset`` trained on (a shuffled-training copy is allowed).
        model: ``--model`` name; n_items: N; E: float32 ``(N+1, d)`` SASRec item embeddings
            (``(N+1, 1)`` zeros without a CF-SRec); answers: list (N+1) of int64 answer ids.
        train_cf: float32 ``(U+1, d_cf)`` O_u of the train view (f_U's moment fit);
            train_users: uids with a training sample; user_cf: None (the retrieval
            baselines' sentinel table is not used here).
        provenance: dataset, LLM, teacher and template records.
    """

    ds: Any
    model: str
    n_items: int
    E: np.ndarray
    answers: list
    train_cf: np.ndarray
    train_users: np.ndarray
    provenance: dict
    sasrec: Any = None
    verb: str = ""
    history_window: int = HISTORY_WINDOW
    user_cf: Any = None
    _views: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return int(self.ds.n_users)

    def view(self, name: str, ds=None) -> ViewData:
        """The history prompts and O_u of view ``name`` of ``ds`` (default the training data),
        built once per (dataset, view)."""
        ds = ds if ds is not None else self.ds
        key = (id(ds), name)
        if key not in self._views:
            vp = build_view(ds, name, history_window=self.history_window, verb=self.verb, seed=0,
                            version=GEN_TEMPLATES[self.model])
            cf = np.zeros((ds.n_users + 1, self.train_cf.shape[1]), dtype=np.float32)
            if self.sasrec is not None:
                cf[1:] = teacher_user_reps(self.sasrec, vp.cf_inputs, list(range(1, ds.n_users + 1)))
            self._views[key] = ViewData(vp.prompts, np.asarray(vp.targets, dtype=np.int64), cf)
        return self._views[key]


def load_gen_data(ds, sasrec, llm: LoadedLLM, model: str, *, history_window: int = HISTORY_WINDOW,
                  verb: str | None = None) -> GenData:
    """Answers, the teacher's E and the train view's O_u for a generative baseline.

    Raises:
        InputError: no CF-SRec for a model that needs one, or one of another dataset.
    """
    spec = get_spec(model)
    n = ds.n_items
    if sasrec is None or not spec.needs_sasrec:
        if spec.needs_sasrec:
            raise InputError(f"--model {model}: needs a CF-SRec checkpoint (--sasrec)")
        sas, digest, E = None, None, np.zeros((n + 1, 1), dtype=np.float32)
    else:
        sas, digest = load_teacher(sasrec)
        E = sas.item_embeddings().detach().float().cpu().numpy()
        if E.shape[0] != n + 1:
            raise InputError(f"SASRec has {E.shape[0] - 1} items, the dataset {n}: trained on another dataset")
    verb = verb or default_verb(ds.stats)
    answers = [np.zeros(0, dtype=np.int64)] + [answer_ids(llm, ds.titles[i]) for i in range(1, n + 1)]
    data = GenData(ds=ds, model=model, n_items=n, E=E, answers=answers,
                   train_cf=np.zeros((ds.n_users + 1, E.shape[1]), dtype=np.float32),
                   train_users=np.zeros(0, dtype=np.int64), provenance={}, sasrec=sas, verb=verb,
                   history_window=int(history_window))
    tv = data.view("train")
    data.train_cf = tv.user_cf
    data.train_users = np.array([u for u in range(1, ds.n_users + 1) if tv.prompts[u] is not None and tv.targets[u] > 0],
                                dtype=np.int64)
    data.provenance = {
        "llmsrec_version": __version__, "baseline": model, "approach": "generative", "model": llm.name,
        "model_weights_sha256": llm.weights_digest, "tokenizer_sha256": llm.tokenizer_digest,
        "template_version": GEN_TEMPLATES[model], "verb": verb, "history_window": int(history_window),
        "dataset_sha256": ds.digest, "sasrec_sha256": digest,
        "sasrec": str(Path(sasrec).resolve()) if isinstance(sasrec, (str, os.PathLike)) and spec.needs_sasrec else None,
    }
    return data


# --- the LLM pieces -------------------------------------------------------------------------


def output_weight(llm: LoadedLLM) -> torch.Tensor:
    """The LM head's weight ``(V', d_llm)``: the decoder's input embedding, which the head is
    tied to in the supported models (SmolLM2, the tests' tiny LLaMA).

    Raises:
        InputError: the model's config does not tie its output head to the input embeddings.
    """
    cfg = getattr(llm.decoder, "config", None)
    if cfg is not None and not getattr(cfg, "tie_word_embeddings", False):
        raise InputError(f"{llm.name}: the generative approach needs an LLM whose output head is tied to its "
                         f"input embeddings (tie_word_embeddings)")
    return llm.decoder.get_input_embeddings().weight


def _soft_vectors(inputs, items: torch.Tensor, user_rep: torch.Tensor | None) -> torch.Tensor:
    """Soft tokens of ``items`` (``USER_REP_ITEM`` -> f_U(O_u), else f_I(E_i)): ``(n, d_llm)``."""
    is_user = items == USER_REP_ITEM
    out = None
    if bool((~is_user).any()):
        vec = inputs.f_I(inputs.E[items.clamp_min(0)])
        out = vec
    if bool(is_user.any()):
        if user_rep is None or inputs.f_U is None:
            raise InputError("a prompt has a user-representation slot but the model has no f_U")
        zu = inputs.f_U(user_rep.reshape(1, -1)).expand(len(items), -1)
        out = zu if out is None else torch.where(is_user[:, None], zu, out)
    return out


def prompt_embeddings(llm: LoadedLLM, inputs, tok: TokenizedPrompt, user_rep=None) -> torch.Tensor:
    """The input embeddings ``(1, L, d_llm)`` of one prompt with its soft tokens spliced in
    (differentiable in f_I / f_U under the caller's grad mode)."""
    dev = llm.device
    ids = torch.from_numpy(tok.ids).to(dev)
    x = llm.decoder.get_input_embeddings()(ids)
    if len(tok.soft_pos):
        items = torch.from_numpy(tok.soft_items).to(dev)
        rep = None if user_rep is None else torch.as_tensor(user_rep, dtype=torch.float32, device=dev)
        x = x.index_put((torch.from_numpy(tok.soft_pos).to(dev),), _soft_vectors(inputs, items, rep).to(x.dtype))
    return x.unsqueeze(0)


def _log_softmax_rows(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax((h @ w.T).float(), dim=-1)


def answer_loss(llm: LoadedLLM, inputs, tok: TokenizedPrompt, answer: np.ndarray, user_rep=None) -> torch.Tensor:
    """Eq. 5's loss terms of one (prompt, answer): the summed next-token cross-entropy of the
    answer's tokens given the prompt (prompt tokens masked). Scalar, differentiable."""
    dev = llm.device
    x = prompt_embeddings(llm, inputs, tok, user_rep)
    a = torch.from_numpy(answer).to(dev)
    y = llm.decoder.get_input_embeddings()(a[:-1]).unsqueeze(0).to(x.dtype)
    h = llm.decoder(inputs_embeds=torch.cat([x, y], dim=1), use_cache=False).last_hidden_state[0]
    lp = _log_softmax_rows(h[x.shape[1] - 1:], output_weight(llm))
    return -lp.gather(1, a[:, None]).sum()


def _pad_answers(answers: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(a) for a in answers)
    ids = torch.zeros((len(answers), t), dtype=torch.long)
    mask = torch.zeros((len(answers), t), dtype=torch.long)
    for k, a in enumerate(answers):
        ids[k, : len(a)] = torch.from_numpy(a)
        mask[k, : len(a)] = 1
    return ids, mask


@torch.no_grad()
def candidate_loglik(llm: LoadedLLM, inputs, tok: TokenizedPrompt, answers: list[np.ndarray], user_rep=None,
                     *, generate: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Log-likelihood of each candidate answer given one prompt (Eq. 5), from one prompt pass.

    The prompt runs once with its key/value cache; the C answers run as one right-padded
    batch continuing from a copy of that cache repeated C times (causal attention: padding
    after an answer cannot change it). With ``generate`` > 0, greedy decoding then continues
    the original cache for up to ``generate`` tokens (stopping at :func:`end_token_id`).

    Args:
        tok: the tokenized prompt; answers: C int64 answer-id arrays (each >= 1 token);
            user_rep: float32 ``(d_cf,)`` O_u for the user-rep slot (CoLLM, A-LLMRec).
    Returns:
        (sum float64 ``(C,)`` summed token log-probabilities, n int64 ``(C,)`` answer lengths,
        greedy token ids (list, empty without ``generate``)).
    """
    dev = llm.device
    w = output_weight(llm)
    emb = llm.decoder.get_input_embeddings()
    x = prompt_embeddings(llm, inputs, tok, user_rep)
    out = llm.decoder(inputs_embeds=x, use_cache=True)
    cache = out.past_key_values
    lp0 = _log_softmax_rows(out.last_hidden_state[0, -1:], w)[0]
    ids, mask = _pad_answers(answers)
    ids, mask = ids.to(dev), mask.to(dev)
    c, t = ids.shape
    tok_lp = torch.zeros((c, t), dtype=torch.float64, device=dev)
    tok_lp[:, 0] = lp0[ids[:, 0]].double()
    if t > 1:
        rep = copy.deepcopy(cache)
        rep.batch_repeat_interleave(c)
        att = torch.cat([torch.ones((c, x.shape[1]), dtype=torch.long, device=dev), mask[:, :-1]], dim=1)
        h = llm.decoder(inputs_embeds=emb(ids[:, :-1]).to(x.dtype), past_key_values=rep, attention_mask=att,
                        use_cache=True).last_hidden_state
        lp = _log_softmax_rows(h.reshape(c * (t - 1), -1), w).reshape(c, t - 1, -1)
        tok_lp[:, 1:] = lp.gather(2, ids[:, 1:, None])[..., 0].double()
    total = (tok_lp * mask).sum(1).cpu().numpy()
    gen: list[int] = []
    if generate > 0:
        eos = end_token_id(llm)
        nxt = int(lp0.argmax())
        for _ in range(int(generate)):
            gen.append(nxt)
            if eos is not None and nxt == eos:
                break
            o = llm.decoder(inputs_embeds=emb(torch.tensor([[nxt]], device=dev)).to(x.dtype), past_key_values=cache,
                            use_cache=True)
            cache = o.past_key_values
            nxt = int(_log_softmax_rows(o.last_hidden_state[0, -1:], w)[0].argmax())
    return total, mask.sum(1).cpu().numpy().astype(np.int64), gen


@torch.no_grad()
def candidate_loglik_repeat(llm: LoadedLLM, inputs, tok: TokenizedPrompt, answers: list[np.ndarray],
                            user_rep=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`candidate_loglik` without the cache: the prompt repeated C times, each row
    followed by one answer, teacher-forced in one batch (the same sums; C prompt forwards).

    Returns:
        (sum float64 ``(C,)``, lengths int64 ``(C,)``).
    """
    dev = llm.device
    w = output_weight(llm)
    x = prompt_embeddings(llm, inputs, tok, user_rep)
    ids, mask = _pad_answers(answers)
    ids, mask = ids.to(dev), mask.to(dev)
    c, t = ids.shape
    y = llm.decoder.get_input_embeddings()(ids[:, :-1]).to(x.dtype)
    z = torch.cat([x.expand(c, -1, -1), y], dim=1)
    att = torch.cat([torch.ones((c, x.shape[1]), dtype=torch.long, device=dev), mask[:, :-1]], dim=1)
    h = llm.decoder(inputs_embeds=z, attention_mask=att, use_cache=False).last_hidden_state[:, x.shape[1] - 1:]
    lp = _log_softmax_rows(h.reshape(c * t, -1), w).reshape(c, t, -1)
    tok_lp = lp.gather(2, ids[:, :, None])[..., 0].double()
    return (tok_lp * mask).sum(1).cpu().numpy(), mask.sum(1).cpu().numpy().astype(np.int64)


# --- the trainer ----------------------------------------------------------------------------


@dataclass
class GenScores:
    """One view's candidate scores for a set of users.

    Attributes:
        users: int64 ``(n,)`` uids; candidates: int64 ``(n, 1+m)`` (target first).
        sum: float64 ``(n, 1+m)`` summed answer log-probabilities; mean: per token.
        exact: int64 ``(n,)`` candidate column greedy decoding reproduced exactly (-1: none),
            or None when the view was scored without greedy decoding.
        seconds: wall time of the view.
    """

    users: np.ndarray
    candidates: np.ndarray
    sum: np.ndarray
    mean: np.ndarray
    exact: np.ndarray | None
    seconds: float = 0.0

    def metrics(self, length_norm: bool = False) -> dict[str, float]:
        """HR@1/5/10, NDCG@1/5/10 over the m+1 candidates (pessimistic ties), ``exact`` (greedy
        decoding reproduced some candidate's answer) and ``greedy_HR@1`` (it reproduced the
        target's) when greedy decoding ran."""
        return gen_metrics(self.mean if length_norm else self.sum, self.exact)


def gen_metrics(scores: np.ndarray, exact: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of candidate scores ``(n, C)`` (target in column 0): NDCG@1/5/10, HR@1/5/10, and
    with ``exact`` (greedy-match columns, -1 none) ``exact`` and ``greedy_HR@1``.

    Raises:
        InputError: a NaN/inf score (training diverged).
    """
    threads = torch.get_num_threads()
    try:
        m = metrics_from_ranks(positive_ranks(np.asarray(scores, dtype=np.float64)), ks=(1, 5, 10))
    except ValueError as e:
        raise InputError(f"training diverged: {e}; lower the learning rate") from None
    finally:
        torch.set_num_threads(threads)  # numba resets torch's OpenMP thread count
    if exact is not None:
        exact = np.asarray(exact)
        m["exact"] = float((exact >= 0).mean())
        m["greedy_HR@1"] = float((exact == 0).mean())
    return m


class GenTrainer:
    """A generative baseline's trainable state and its step / scoring.

    Args:
        data: :class:`GenData`; llm: the LLM (LoRA already injected for LoRA models);
        inputs: :class:`~llmsrec.baselines.common.BaselineInputs` (f_I, f_U; owns LoRA);
        options: :class:`GenOptions`.
    Every decoder parameter not owned by ``inputs`` is frozen; Adam holds ``inputs``'
    parameters (the two out-token vectors get no gradient here and stay unchanged).
    """

    def __init__(self, data: GenData, llm: LoadedLLM, inputs, options: GenOptions):
        self.data, self.llm, self.opts = data, llm, options
        own = {id(p) for p in inputs.parameters()}
        for p in llm.decoder.parameters():
            if id(p) not in own:
                p.requires_grad_(False)
        self.inputs = inputs.to(llm.device)
        self.rng = np.random.default_rng(options.seed)
        self.opt = torch.optim.Adam([p for p in self.inputs.parameters() if p.requires_grad], lr=options.lr,
                                    betas=(0.9, 0.98))
        self.n_steps = 0
        self.exclude = [np.zeros(0, dtype=np.int64)] + [np.asarray(s[:-2], dtype=np.int64) for s in data.ds.seqs[1:]]

    def sample(self, users: np.ndarray) -> list[tuple[TokenizedPrompt, np.ndarray, np.ndarray | None]]:
        """The training samples of ``users`` (train view): (tokenized prompt, answer ids, O_u),
        negatives and display order drawn from the trainer's generator."""
        d, v = self.data, self.data.view("train")
        tg = v.targets[users]
        neg = sample_negatives([self.exclude[u] for u in users], tg, d.n_items, self.opts.negatives, self.rng)
        out = []
        for k, u in enumerate(users):
            cands = np.concatenate([[tg[k]], neg[k]])
            order = self.rng.permutation(len(cands))
            p = generation_prompt(d.model, v.prompts[u], d.ds.titles, cands, order)
            out.append((tokenize_generation(self.llm, p), d.answers[int(tg[k])], v.user_cf[u]))
        return out

    def step(self, users: np.ndarray) -> dict:
        """One Adam step on Eq. 5 over ``users``' training samples: the summed answer-token
        cross-entropy divided by the step's answer tokens. Returns ``{"loss": float}``."""
        users = np.asarray(users, dtype=np.int64)
        samples = self.sample(users)
        n_tok = sum(len(a) for _, a, _ in samples)
        drops = getattr(self.inputs, "_dropouts", [])
        self.n_steps += 1
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.opts.seed) * 1_000_003 + self.n_steps)
            for m in drops:
                m.train()
            try:
                for tok, ans, rep in samples:
                    loss = answer_loss(self.llm, self.inputs, tok, ans, rep if self.data.sasrec is not None else None)
                    (loss / n_tok).backward()
                    total += float(loss.detach())
            finally:
                for m in drops:
                    m.eval()
        self.opt.step()
        return {"loss": total / n_tok}

    @torch.no_grad()
    def score(self, view: str, users: np.ndarray, ds=None, *, generate: bool = True) -> GenScores:
        """Score ``view`` (``valid``, ``test`` or a shuffled view) of ``ds`` (default the
        training data) for ``users`` on the split's target + first m stored negatives."""
        t0 = time.perf_counter()
        ds = ds if ds is not None else self.data.ds
        d, m = self.data, self.opts.negatives
        base = view.removesuffix("-shuffled")
        v = d.view(view, ds)
        cand_all = np.asarray(ds.candidates(base), dtype=np.int64)
        if cand_all.shape[1] < m + 1:
            raise InputError(f"{ds.root}: {cand_all.shape[1] - 1} stored negatives per user, fewer than "
                             f"--gen-negatives {m}")
        users = np.asarray(users, dtype=np.int64)
        users = users[[v.prompts[u] is not None for u in users]]
        cands = cand_all[users - 1, : m + 1]
        sums = np.zeros(cands.shape, dtype=np.float64)
        lens = np.zeros(cands.shape, dtype=np.int64)
        exact = np.full(len(users), -1, dtype=np.int64)
        was = self.inputs.training
        self.inputs.eval()
        for r, u in enumerate(users):
            order = candidate_order(0, base, int(u), m + 1)
            p = generation_prompt(d.model, v.prompts[u], ds.titles, cands[r], order)
            tok = tokenize_generation(self.llm, p)
            answers = [d.answers[int(i)] for i in cands[r]]
            rep = v.user_cf[u] if d.sasrec is not None else None
            longest = max(len(a) for a in answers)
            sums[r], lens[r], gen = candidate_loglik(self.llm, self.inputs, tok, answers, rep,
                                                     generate=longest if generate else 0)
            for c, a in enumerate(answers):
                if len(gen) >= len(a) and np.array_equal(np.asarray(gen[: len(a)]), a):
                    exact[r] = c
                    break
        self.inputs.train(was)
        return GenScores(users, cands, sums, sums / np.maximum(lens, 1), exact if generate else None,
                         round(time.perf_counter() - t0, 3))

    def state(self) -> dict:
        """The live ``inputs`` state dict (f_I, f_U, LoRA; the loop deep-copies it)."""
        return self.inputs.state_dict()

    def load_state(self, state: dict) -> None:
        """Load a :meth:`state` (the selected validation's)."""
        self.inputs.load_state_dict(state)


# --- fit ------------------------------------------------------------------------------------


@dataclass
class GenFit:
    """What :func:`fit_generative` returns.

    Attributes:
        trainer: :class:`GenTrainer` holding the selected state; data: :class:`GenData`.
        history, best, steps, epochs_run, stopped_early: the training loop's record.
        timings: seconds (``load``, ``train_steps``, ``validation``, ``per_step``).
        valid_users: users validated on; lora / stage1: the options used; stage_record.
    """

    trainer: GenTrainer
    data: GenData
    history: list
    best: dict
    steps: int
    epochs_run: float
    stopped_early: bool
    timings: dict
    valid_users: int
    lora: Any = None
    stage1: Any = None
    stage_record: Any = None


def fit_generative(model: str, ds, sasrec, options: GenOptions | dict | None = None, *, llm=None,
                   lora: LoraOptions | dict | None = None, stage1: Any = None, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> GenFit:
    """Train one LLM4Rec baseline in the Next Item Title Generation approach (Eq. 5).

    Args:
        model: ``tallrec``, ``llara``, ``collm`` or ``allmrec``; ds: ``PreparedDataset`` or
            folder (a shuffled-training copy is allowed); sasrec: CF-SRec folder/module
            (not read by TALLRec).
        options: :class:`GenOptions` (or a dict of its fields).
        llm: a ``LoadedLLM`` (LoRA goes in **in place**: give a fresh one) or None (load
            ``options.llm``).
        lora: LoRA options (TALLRec, LLaRA, CoLLM; refused for A-LLMRec); stage1: A-LLMRec's.
    Returns:
        :class:`GenFit` (the selected state loaded in its trainer, eval mode).
    Raises:
        InputError: bad options, no training users, missing teacher, divergence.
    """
    spec = get_spec(model)
    opts = options if isinstance(options, GenOptions) else GenOptions(**(options or {}))
    lora, stage1 = model_options(spec, model, lora, stage1)
    t = time.perf_counter()
    if isinstance(ds, (str, os.PathLike)):
        ds = load_prepared(ds)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if not isinstance(llm, LoadedLLM):
        llm = load_llm(llm or opts.llm, device=opts.device, dtype=opts.dtype)
    opts.llm = llm.name
    if spec.lora:
        apply_lora(llm, lora, seed=opts.seed)
    data = load_gen_data(ds, sasrec if spec.needs_sasrec else None, llm, model,
                         history_window=opts.history_window, verb=opts.verb)
    if len(data.train_users) == 0:
        raise InputError("train: no user has a training sample (train view empty)")
    features, stage_record = data.E, None
    if spec.item_features is not None:
        features, _, stage_record = spec.item_features(ds, llm, data, stage1, opts.seed, log)
    inputs = initial_inputs(spec, llm, data, features, fi=opts.fi, arch=opts.fi_arch, seed=opts.seed, titles=ds.titles)
    if spec.lora:
        inputs.attach_lora(llm)
    t_load = time.perf_counter() - t
    tr = GenTrainer(data, llm, inputs, opts)
    users_all = data.train_users
    valid_users = eval_user_sample(data.n_users, opts.eval_users, opts.seed)
    n_batches = math.ceil(len(users_all) / opts.batch_size)
    order = users_all

    def begin_epoch(epoch: int) -> None:
        nonlocal order
        order = tr.rng.permutation(users_all)

    def step(epoch: int, bi: int) -> dict[str, float]:
        return tr.step(order[bi * opts.batch_size : (bi + 1) * opts.batch_size])

    def validate(steps: int) -> dict[str, float]:
        return tr.score("valid", valid_users, generate=False).metrics(opts.length_norm)

    def record(k: Tick) -> dict:
        return {"step": k.step, "epoch": k.progress, "loss": k.terms["loss"], "step_seconds": round(k.step_seconds, 3),
                "seconds": round(k.seconds, 3), **(k.metrics or {}), "best": k.improved}

    def after_validation(k: Tick) -> None:
        if log:
            log(f"[{model} generative] validation {k.validation} (step {k.step}): {opts.select_metric} "
                f"{k.metrics[opts.select_metric]:.4f}{' (best)' if k.improved else ''}")

    res = train_loop(step, validate, tr.state, record, epochs=opts.epochs, batches=n_batches, select=opts.select_metric,
                     patience=opts.patience, terms=("loss",), points=eval_points(n_batches, opts.evals_per_epoch),
                     max_steps=opts.max_steps, begin_epoch=begin_epoch, after_validation=after_validation,
                     progress=progress, desc=f"{model} generative epoch")
    tr.load_state(res.state)
    tr.inputs.eval()
    timings = {"load": round(t_load, 3), "train_steps": round(res.step_seconds, 3),
               "validation": round(res.validation_seconds, 3),
               "per_step": round(res.step_seconds / max(res.steps, 1), 3)}
    return GenFit(trainer=tr, data=data, history=res.history, best=res.best, steps=res.steps,
                  epochs_run=round(float(res.epochs_run), 4), stopped_early=res.stopped_early, timings=timings,
                  valid_users=int(len(valid_users)), lora=lora if spec.lora else None, stage1=stage1,
                  stage_record=stage_record)


def evaluate_generative(fit: GenFit, ds=None, views=GEN_EVAL_VIEWS, users=None, greedy=("test",)) -> dict[str, GenScores]:
    """Score ``views`` of ``ds`` (default the training data; a shuffled-training run passes
    the original data) with the fit's selected state, for ``users`` (default: a seeded sample
    of ``test_users``, or all); greedy decoding (the exact-match rates) runs on the views in
    ``greedy`` only (it costs up to one single-token forward per answer token)."""
    ds = ds if ds is not None else fit.data.ds
    if users is None:
        users = eval_user_sample(ds.n_users, fit.trainer.opts.test_users, fit.trainer.opts.seed + 1)
    return {v: fit.trainer.score(v, users, ds, generate=v in greedy) for v in views}


def train_generative(model: str, ds, sasrec, out, options: GenOptions | dict | None = None, *, eval_ds=None,
                     views=GEN_EVAL_VIEWS, greedy=("test",), llm=None, lora=None, stage1=None, force: bool = False,
                     progress: bool = False,
                     log: Callable[[str], None] | None = None) -> dict:
    """Train (:func:`fit_generative`), score ``test`` and ``test-shuffled``
    (:func:`evaluate_generative`) and write ``out``.

    Args:
        eval_ds: the data the test views come from (default ``ds``; shuffled training trains
            on a shuffled copy and tests on the original sequences); views: the views scored;
            greedy: those of them where greedy decoding runs too (``exact``, ``greedy_HR@1``).
        out: folder to create: ``results.json`` (metrics with both scorings, timings, options,
            provenance), ``history.jsonl``, ``training_curve.png``, ``inputs.safetensors``
            (f_I, f_U), ``adapter.safetensors`` (LoRA models), ``scores.safetensors``
            (per view: ``<view>/users``, ``<view>/candidates``, ``<view>/sum``,
            ``<view>/mean``, ``<view>/exact`` where greedy decoding ran).
    Returns:
        the ``results.json`` dict: ``{"model", "approach": "generative", "valid", "test",
        "test-shuffled"`` (the reported scoring's metrics), ``"metrics"`` (``{"sum":
        {view: ...}, "mean": {view: ...}}``), ``"best", "steps", "epochs_run",
        "stopped_early", "train_seconds", "timings", "options", "lora", "stage1",
        "provenance"}``.
    Raises:
        InputError: ``out`` exists without ``force``; see :func:`fit_generative`.
    """
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    spec = get_spec(model)
    fit = fit_generative(model, ds, sasrec, options, llm=llm, lora=lora, stage1=stage1, progress=progress, log=log)
    opts = fit.trainer.opts
    scores = evaluate_generative(fit, eval_ds, views, greedy=greedy)
    t_eval = {v: s.seconds for v, s in scores.items()}
    metrics = {kind: {v: s.metrics(kind == "mean") for v, s in scores.items()} for kind in ("sum", "mean")}
    report = "mean" if opts.length_norm else "sum"
    n_eval = {v: int(len(s.users)) for v, s in scores.items()}
    results = {
        "model": spec.display, "approach": "generative",
        "scoring": "mean log-probability per answer token" if opts.length_norm else "summed answer log-probability",
        "valid": fit.best["metrics"], **{v: metrics[report][v] for v in scores},
        "metrics": metrics, "best": fit.best, "steps": fit.steps, "epochs_run": fit.epochs_run,
        "stopped_early": fit.stopped_early,
        "train_seconds": round(fit.timings["train_steps"] + fit.timings["validation"], 3),
        "timings": {**fit.timings, "eval": t_eval,
                    "eval_per_user": {v: round(t_eval[v] / max(n_eval[v], 1), 3) for v in scores}},
        "eval_users": n_eval, "valid_users": fit.valid_users, "train_users": int(len(fit.data.train_users)),
        "options": asdict(opts), "lora": asdict(fit.lora) if fit.lora else None,
        "stage1": asdict(fit.stage1) if fit.stage1 is not None else None, "stage1_record": fit.stage_record,
        "provenance": fit.data.provenance,
    }
    arrays = {}
    for v, s in scores.items():
        arrays.update({f"{v}/users": s.users.astype(np.float32), f"{v}/candidates": s.candidates.astype(np.float32),
                       f"{v}/sum": s.sum, f"{v}/mean": s.mean})
        if s.exact is not None:
            arrays[f"{v}/exact"] = s.exact.astype(np.float32)
    inputs = fit.trainer.inputs
    saved = {k: v for k, v in inputs.arrays().items() if not k.startswith("tokens/")}
    with atomic_dir(out, force=force) as tmp:
        save_arrays(tmp / "inputs.safetensors", saved or {"empty": np.zeros(1, dtype=np.float32)},
                     {"model": model, "approach": "generative"})
        if spec.lora:
            save_arrays(tmp / "adapter.safetensors", lora_state(fit.trainer.llm),
                         {"model": model, "lora": json.dumps(results["lora"])})
        save_arrays(tmp / "scores.safetensors", arrays, {"model": model, "approach": "generative"})
        write_history(tmp / "history.jsonl", fit.history)
        if fit.history:
            plot_curve(fit.history, tmp / "training_curve.png", title=f"{spec.display} (generative, Eq. 5)",
                       terms=("loss",))
        write_json(tmp / "results.json", results)
    return results


__all__ = ["GEN_NEGATIVES", "GEN_TEMPLATES", "GEN_EVAL_VIEWS", "GenOptions", "GenData", "GenScores", "GenTrainer",
           "GenFit", "candidate_order", "generation_prompt", "answer_ids", "tokenize_generation", "load_gen_data",
           "output_weight", "prompt_embeddings", "answer_loss", "candidate_loglik", "candidate_loglik_repeat",
           "gen_metrics", "fit_generative", "evaluate_generative", "train_generative"]
