"""Shared plumbing of the LLM4Rec baselines: prompts, soft-token inputs, LoRA, trainer, I/O.

The four baselines of the paper's Sec. 2 (TALLRec, LLaRA, CoLLM, A-LLMRec) in the Next Item
Retrieval approach (Sec. 2.1.2, approach 2; Table 2; Appendix B.2): a user prompt ends in
``[UserOut]``, an item prompt in ``[ItemOut]``, the LLM's last-layer states there go through
f_user / f_item (the LLM-SRec heads, :class:`~llmsrec.heads.model.LLMSRecHeads`) and the
score is their dot product (Eq. 9). Every baseline trains with L_Retrieval only (Eq. 1; the
same loss, sampled negatives, optimizer, schedule and selection as ``llmsrec train --mode
e2e``); what differs is what reaches the LLM and what trains:

========  ===========================  ================================  ==============
model     user prompt (Table 2)        soft tokens                       LLM
========  ===========================  ================================  ==============
TALLRec   (a) titles only              none                              LoRA
LLaRA     (b) titles + item slots      f_I(E_i)                          LoRA
CoLLM     (c) user slot + (b)          f_U(O_u), f_I(E_i)                LoRA
A-LLMRec  (c) user slot + (b)          f_U(O_u), f_I(enc(E_i)) (stage 1) frozen
========  ===========================  ================================  ==============

They run in the e2e loop (:mod:`llmsrec.e2e.loop`): the LLM runs on every step's prompts.
**They cannot use the HDF5 cache**: LoRA changes the LLM's states at every step, and
CoLLM/A-LLMRec's soft tokens change with f_U/f_I; so there is no ``--cache`` for them.

Mechanics reused from e2e mode (:mod:`llmsrec.e2e.loop`): ``E2EData`` (tokenized prompts,
stored candidates), ``fit_e2e`` (schedule, validation every tenth of an epoch, early
stopping, best-on-validation state, test once), ``E2ETrainer`` (one step through the LLM,
gradient caching), ``compute_states`` (no-grad states for evaluation), the heads and
:class:`~llmsrec.heads.train.TrainConfig`. What is added here:

* **prompts**: the templates of Table 2 (a) and (c), registered in
  :data:`llmsrec.precompute.prompts.TEMPLATES` and built with
  :func:`~llmsrec.precompute.prompts.build_view` (same numbers, dates, window, shuffled
  views). The user-representation slot of (c) reuses the ``[HistoryEmb]`` special token
  (its input row is replaced anyway) with a *sentinel* id above N: id
  ``N + 1 + k (U + 1) + uid`` stands for f_U(O_uid) of the k-th loaded view
  (:func:`user_rep_id`), so a view's SASRec input (shuffled for a shuffled view) gives its
  own O_u;
* :class:`BaselineInputs`: the LLM-input parameters (f_I, f_U, the two out tokens) and,
  for LoRA models, the adapter parameters injected into the decoder (the same tensors; the
  trainer leaves them trainable, the optimizer and the best-state copy include them);
* :func:`apply_lora`: peft's LoRA injected in place into ``LoadedLLM.decoder``;
* :class:`BaselineTrainer`: the e2e trainer with LoRA dropout on during steps only, its
  masks seeded per step (same seed -> same run);
* checkpoints holding only the trained parameters: ``heads.safetensors`` +
  ``heads_config.json`` (``"mode": "baseline"``), ``inputs.safetensors`` (f_I, f_U, tokens),
  ``adapter.safetensors`` (LoRA) and, for A-LLMRec, ``stage1.safetensors``. No
  ``params.safetensors``: ``precompute --params`` must not build a cache for a LoRA model.
  LLaRA/CoLLM/A-LLMRec (and e2e) checkpoints hold a copy of their CF-SRec teacher
  (``teacher/model.safetensors`` + ``teacher/config.json``, a few MB), so the checkpoint
  keeps working when the teacher's folder moves; checkpoints written before the copy
  existed still load the teacher from the absolute path they recorded.

Every model's heads include an unused f_CF-user (no distillation; it keeps the heads format).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from llmsrec import __version__
from llmsrec.atomic import atomic_dir, atomic_file, write_json
from llmsrec.cfsrec.teacher import load_teacher, teacher_user_reps
from llmsrec.data import load_prepared
from llmsrec.data.views import check_view
from llmsrec.defaults import BASELINES, E2E, HISTORY_WINDOW, LLM, LORA
from llmsrec.errors import InputError
from llmsrec.e2e.loop import (
    E2E_DEFAULT_NEGATIVES,
    TEACHER_DIR,
    E2EData,
    E2EOptions,
    E2ETrainer,
    ItemProjection,
    LLMInputs,
    checkpoint_teacher,
    copy_teacher,
    fit_e2e,
    load_run_inputs,
    metrics_of,
)
from llmsrec.heads.model import load_heads, save_heads
from llmsrec.heads.train import TrainConfig, plot_history
from llmsrec.precompute.engine import tokenize_prompts
from llmsrec.precompute.fit import fit_moment_matched
from llmsrec.precompute.llm import HISTORY_EMB, ITEM_OUT, USER_OUT, LoadedLLM, load_llm
from llmsrec.precompute.prompts import (
    TEMPLATES, USER_REP_ITEM, Prompt, build_view, default_verb, item_prompt, template_text,
)
from llmsrec.safetensors_io import save_numpy
from llmsrec.training import write_history

#: views a baseline loads for training/evaluation (the shuffled test view gives the
#: shuffled-inference change ratio, Sec. 2.3.2)
DEFAULT_VIEWS = ("train", "valid", "test", "test-shuffled")
EVAL_VIEWS = ("valid", "test", "test-shuffled")
#: seed of the shuffled views' permutations (precompute's default: the same permutations
#: as a default cache's ``test-shuffled``)
SHUFFLE_SEED = 0
INPUTS_FILE = "inputs.safetensors"
ADAPTER_FILE = "adapter.safetensors"
STAGE1_FILE = "stage1.safetensors"
FORMAT = "llmsrec-baseline-v1"
#: the user-representation slot of Table 2 (c): a ``[HistoryEmb]`` token with a sentinel id
USER_REP = HISTORY_EMB


# --- registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineSpec:
    """What one baseline feeds the LLM and trains (one per model module).

    Attributes:
        name: ``--model`` name; display: results' ``"model"`` (paper spelling).
        template: key of :data:`llmsrec.precompute.prompts.TEMPLATES` (user and item prompts).
        lora: the LLM is fine-tuned with LoRA (else frozen).
        item_soft: prompts carry one soft token per item (f_I of the item features).
        user_rep: user prompts carry the projected CF user representation f_U(O_u).
        needs_sasrec: a CF-SRec checkpoint is required (TALLRec uses none).
        item_features: optional stage run before the e2e loop,
            ``(ds, llm, data, options, seed, log) -> (features float32 (N+1, d), arrays to
            save, record dict)``; default: the SASRec item embeddings E.
        load_item_features: ``(arrays, options dict, data) -> features`` from a checkpoint.
        options_cls: dataclass of that stage's options (A-LLMRec's stage 1), or None.
    """

    name: str
    display: str
    template: str
    lora: bool
    item_soft: bool
    user_rep: bool
    needs_sasrec: bool
    item_features: Callable | None = None
    load_item_features: Callable | None = None
    options_cls: type | None = None


_SPECS: dict[str, BaselineSpec] = {}


def register(spec: BaselineSpec) -> BaselineSpec:
    """Add a model to the registry (each model module calls it once at import)."""
    _SPECS[spec.name] = spec
    return spec


def get_spec(name: str) -> BaselineSpec:
    """The spec of ``--model name``.

    The model modules register their specs when ``llmsrec.baselines`` is imported, which
    Python does before it runs this module, so the registry is full by the time of any call.

    Raises:
        InputError: not one of :data:`BASELINES`.
    """
    if name not in _SPECS:
        raise InputError(f"--model {name!r}: expected one of {', '.join(BASELINES)}")
    return _SPECS[name]


def register_template(version: str, pieces: dict[str, str]) -> str:
    """Add a prompt template to :data:`llmsrec.precompute.prompts.TEMPLATES` (same keys as
    ``llmsrec-prompt-v1``: ``user_open``, ``user_item``, ``user_sep``, ``user_close``,
    ``item``). Idempotent; a different template under a taken name is a ValueError."""
    have = TEMPLATES.get(version)
    if have is not None and have != pieces:
        raise ValueError(f"prompt template {version!r} already registered with other text")
    TEMPLATES[version] = dict(pieces)
    return version


# --- options --------------------------------------------------------------------------------


@dataclass
class LoraOptions:
    """LoRA of the decoder (TALLRec, LLaRA, CoLLM). The paper gives no LoRA settings
    (Appendix B.2, E), so these are peft's common ones.

    Attributes:
        r: rank (8). alpha: scaling numerator, the update is ``alpha / r * B A`` (16).
        dropout: dropout on the adapter input during training steps (0.05).
        targets: names of the linear modules to adapt (``q_proj``, ``v_proj``: LLaMA-style
            attention; a name that matches nothing is an error).
    """

    r: int = LORA["r"]
    alpha: float = LORA["alpha"]
    dropout: float = LORA["dropout"]
    targets: tuple[str, ...] = LORA["targets"]

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if not self.targets:
            raise InputError("--lora-targets: give at least one module name")
        if int(self.r) < 1:
            raise InputError(f"--lora-r {self.r}: must be >= 1")
        if self.alpha <= 0:
            raise InputError(f"--lora-alpha {self.alpha}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise InputError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        self.r = int(self.r)


def _options(cls, value, flag: str):
    if value is None or isinstance(value, cls):
        return value if value is not None else cls()
    if isinstance(value, dict):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise InputError(f"{flag}: unknown option(s) {', '.join(unknown)}")
        return cls(**{k: v for k, v in value.items() if v is not None})
    raise InputError(f"{flag}: expected a {cls.__name__} or a dict")


def model_options(spec, model: str, lora, stage1):
    """The LoRA and stage-1 options of baseline ``model`` as their dataclasses.

    Args:
        spec: the model's registry entry (``get_spec(model)``).
        model: its ``--model`` name (for the messages).
        lora, stage1: ``None``, a dict of option values, or the options dataclass.
    Returns:
        ``(lora, stage1)``: ``LoraOptions`` (defaults when None) for a LoRA model, else None;
        the model's stage-1 options (defaults when None) if it has a stage 1, else None.
    Raises:
        InputError: options given to a model without LoRA or without a stage 1, or an
            unknown option name.
    """
    if spec.lora:
        lora = _options(LoraOptions, lora, "--lora")
    elif lora is not None:
        raise InputError(f"--model {model}: the LLM stays frozen (no LoRA); drop the LoRA options")
    if spec.options_cls is not None:
        stage1 = _options(spec.options_cls, stage1, "--stage1")
    elif stage1 is not None:
        raise InputError(f"--model {model}: has no stage 1; drop the stage-1 options")
    return lora, stage1


# --- LoRA -----------------------------------------------------------------------------------


def has_adapters(llm: LoadedLLM) -> bool:
    """True when LoRA layers were already injected into ``llm.decoder``."""
    return any("lora_" in n for n, _ in llm.decoder.named_parameters())


def apply_lora(llm: LoadedLLM, options: LoraOptions, seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    """Inject LoRA adapters into ``llm.decoder`` **in place** (``peft.inject_adapter_in_model``).

    The base weights stay frozen and unchanged; each adapted linear layer W x becomes
    ``W x + alpha/r * B A dropout(x)`` with A ``(r, d_in)`` (Kaiming-uniform, drawn under
    ``seed``), B ``(d_out, r)`` zeros, so the model is unchanged until B trains. The decoder
    is left in eval mode (no dropout; :class:`BaselineTrainer` turns the adapters' dropout on
    for its steps only).

    Returns:
        ``[(name, parameter)]`` of the adapter weights, in the decoder's order.
    Raises:
        InputError: the decoder already has adapters (load a fresh LLM), or no module
            matches ``options.targets``.
    """
    from peft import LoraConfig, inject_adapter_in_model  # deferred: peft imports transformers (seconds)

    if has_adapters(llm):
        raise InputError(f"{llm.name}: already has LoRA adapters (give a freshly loaded LLM)")
    cfg = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                     target_modules=list(options.targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) + 2)
        try:
            inject_adapter_in_model(cfg, llm.decoder)
        except ValueError as e:
            raise InputError(f"--lora-targets {','.join(options.targets)}: {str(e).splitlines()[0]}") from None
    llm.decoder.eval()
    return [(n, p) for n, p in llm.decoder.named_parameters() if "lora_" in n]


def lora_state(llm: LoadedLLM) -> dict[str, torch.Tensor]:
    """The adapter weights (peft's names, adapter name removed), float32 CPU copies."""
    from peft import get_peft_model_state_dict  # deferred: peft imports transformers (seconds)

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(llm.decoder).items()}


def load_lora_state(llm: LoadedLLM, arrays: dict[str, np.ndarray], path) -> None:
    """Copy saved adapter weights into an LLM prepared with :func:`apply_lora`.

    Raises:
        InputError: names or shapes do not match the injected adapters.
    """
    from peft import set_peft_model_state_dict  # deferred: peft imports transformers (seconds)

    want = set(lora_state(llm))
    if set(arrays) != want:
        missing, extra = sorted(want - set(arrays)), sorted(set(arrays) - want)
        raise InputError(f"{path}: adapter weights do not match the LoRA config "
                         f"(missing {missing[:2]}, unexpected {extra[:2]})")
    try:
        set_peft_model_state_dict(llm.decoder, {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    except RuntimeError as e:
        raise InputError(f"{path}: adapter weights do not fit ({str(e).strip().splitlines()[0]})") from None


# --- prompts and data -----------------------------------------------------------------------


def user_rep_id(n_items: int, n_users: int, k: int, uid: int) -> int:
    """Sentinel id of the user-representation slot of user ``uid`` in the ``k``-th loaded view."""
    return n_items + 1 + k * (n_users + 1) + int(uid)


def adapt_prompt(spec: BaselineSpec, p: Prompt, rep_id: int | None = None) -> Prompt:
    """The model's soft-token ids for a prompt built with its template.

    No item slots (TALLRec): no soft ids. A user-representation slot (CoLLM, A-LLMRec):
    ``rep_id`` first (the slot precedes the history in Table 2 (c)), then the items.
    """
    items = np.asarray(p.soft_items, dtype=np.int64)
    items = items[items != USER_REP_ITEM]  # the template's own placeholder: the slot is placed here
    items = items if spec.item_soft else np.zeros(0, dtype=np.int64)
    if rep_id is not None and spec.user_rep:
        items = np.concatenate([[rep_id], items]).astype(np.int64)
    return Prompt(text=p.text, soft_items=items)


def build_prompts(ds, model: str, view: str, *, history_window: int = HISTORY_WINDOW, verb: str | None = None,
                  k: int = 0, shuffle_seed: int = SHUFFLE_SEED):
    """User prompts of one view for a baseline (``ViewPrompts`` with adapted soft ids).

    Args:
        ds: ``PreparedDataset``; model: ``--model`` name; view: one of ``ALL_VIEWS``.
        k: index of the view among the loaded ones (fixes the user-representation ids).
    Returns:
        :class:`~llmsrec.precompute.prompts.ViewPrompts`; ``prompts[u]`` has the model's
        text (Table 2) and soft ids.
    """
    spec = get_spec(model)
    vp = build_view(ds, view, history_window=history_window, verb=verb, seed=shuffle_seed, version=spec.template)
    for u, p in enumerate(vp.prompts):
        if p is not None:
            vp.prompts[u] = adapt_prompt(spec, p, user_rep_id(ds.n_items, ds.n_users, k, u))
    return vp


def build_item_prompts(ds, model: str) -> list[Prompt]:
    """The N item prompts (index iid-1) of a baseline (Table 2, ``P_I``)."""
    spec = get_spec(model)
    return [adapt_prompt(spec, item_prompt(ds.titles, i, version=spec.template)) for i in range(1, ds.n_items + 1)]


@dataclass
class BaselineData(E2EData):
    """:class:`~llmsrec.e2e.loop.E2EData` plus the per-view CF user representations.

    Attributes:
        model: ``--model`` name. views: the loaded views, in order (``k`` of
            :func:`user_rep_id`).
        user_cf: float32 ``(len(views) * (U+1), d_cf)``: row ``k (U+1) + uid`` is the CF-SRec
            O_u of view k's input for that user (None for models without the slot).
        ``candidates`` also holds shuffled views (those of their base split); ``train_cf``
        is ``(U+1, 1)`` zeros and ``E`` ``(N+1, 1)`` zeros without a CF-SRec (TALLRec).
    """

    model: str = ""
    views: tuple = ()
    user_cf: np.ndarray | None = None


def load_baseline_data(ds, sasrec, llm: LoadedLLM, model: str, *, history_window: int = HISTORY_WINDOW,
                       verb: str | None = None, views=DEFAULT_VIEWS, shuffle_seed: int = SHUFFLE_SEED) -> BaselineData:
    """Build and tokenize a baseline's prompts for ``views``; run the CF-SRec once per view.

    Args:
        ds: ``PreparedDataset``; sasrec: CF-SRec checkpoint folder, module, or None (TALLRec
            only); llm: the loaded model (its tokenizer); model: ``--model`` name.
        views: must include ``train``; any of ``ALL_VIEWS``.
    Raises:
        InputError: no CF-SRec for a model that needs one, CF-SRec of another dataset, an
            unknown view, prompts too long for the model.
    """
    spec = get_spec(model)
    views = tuple(views)
    for v in views:
        check_view(v)
    if "train" not in views:
        raise InputError("baseline data: the train view is required")
    n, u_n = ds.n_items, ds.n_users
    if sasrec is None:
        if spec.needs_sasrec:
            raise InputError(f"--model {model}: needs a CF-SRec checkpoint (--sasrec)")
        sas, sas_digest, E = None, None, np.zeros((n + 1, 1), dtype=np.float32)
    else:
        sas, sas_digest = load_teacher(sasrec)
        E = sas.item_embeddings().detach().float().cpu().numpy()
        if E.shape[0] != n + 1:
            raise InputError(f"SASRec has {E.shape[0] - 1} items, the dataset {n}: "
                             f"the checkpoint was trained on another dataset")
    verb = verb or default_verb(ds.stats)
    item_toks = tokenize_prompts(llm, build_item_prompts(ds, model), ITEM_OUT)
    d_cf = E.shape[1]
    user_cf = np.zeros((len(views) * (u_n + 1), d_cf), dtype=np.float32) if spec.user_rep else None
    user_toks, train_cf, targets = {}, None, None
    for k, v in enumerate(views):
        vp = build_prompts(ds, model, v, history_window=history_window, verb=verb, k=k, shuffle_seed=shuffle_seed)
        rows = [u for u in range(1, u_n + 1) if vp.prompts[u] is not None]
        per_user: list = [None] * (u_n + 1)
        for u, t in zip(rows, tokenize_prompts(llm, [vp.prompts[u] for u in rows], USER_OUT)):
            per_user[u] = t
        user_toks[v] = per_user
        cf = np.zeros((u_n + 1, d_cf), dtype=np.float32)
        if sas is not None:
            cf[1:] = teacher_user_reps(sas, vp.cf_inputs, list(range(1, u_n + 1)))
        if user_cf is not None:
            user_cf[k * (u_n + 1) : (k + 1) * (u_n + 1)] = cf
        if v == "train":
            train_cf, targets = cf, np.asarray(vp.targets, dtype=np.int64)
    train_users = np.array([u for u in range(1, u_n + 1) if user_toks["train"][u] is not None and targets[u] > 0],
                           dtype=np.int64)
    exclude = [np.zeros(0, dtype=np.int64)] + [np.asarray(s[:-2], dtype=np.int64) for s in ds.seqs[1:]]
    cands = {v: np.asarray(ds.candidates(v.removesuffix("-shuffled")), dtype=np.int64)
             for v in views if not v.startswith("train")}
    prov = {
        "llmsrec_version": __version__, "baseline": model, "model": llm.name,
        "model_weights_sha256": llm.weights_digest, "tokenizer_sha256": llm.tokenizer_digest,
        "dtype": str(llm.dtype).removeprefix("torch."), "template_version": spec.template,
        "template": template_text(spec.template), "verb": verb, "history_window": int(history_window),
        "shuffle_seed": int(shuffle_seed), "dataset_sha256": ds.digest, "sasrec_sha256": sas_digest,
        "sasrec": str(Path(sasrec).resolve()) if isinstance(sasrec, (str, os.PathLike)) else None,
    }
    return BaselineData(n_items=n, item_toks=item_toks, user_toks=user_toks, train_cf=train_cf, E=E,
                        train_targets=targets, train_exclude=exclude, train_users=train_users,
                        candidates=cands, provenance=prov, model=model, views=views, user_cf=user_cf)


# --- the trainable LLM inputs ---------------------------------------------------------------


def _projection_arrays(proj: ItemProjection | None, prefix: str) -> dict[str, torch.Tensor]:
    if proj is None:
        return {}
    return {f"{prefix}/{k}": v for k, v in proj.net.state_dict().items()}


def _projection_from_arrays(arrays: dict, prefix: str, d_in: int, d_llm: int, arch: str) -> ItemProjection:
    proj = ItemProjection(d_in, d_llm, arch)
    proj.load_arrays({"f_I/" + k.removeprefix(prefix + "/"): v for k, v in arrays.items() if k.startswith(prefix + "/")})
    return proj


class BaselineInputs(LLMInputs):
    """What trains at the LLM's input (and inside it, for LoRA models).

    Attributes:
        f_I: :class:`~llmsrec.e2e.loop.ItemProjection` of the item features ``E`` (SASRec E;
            A-LLMRec: the stage-1 aligned embeddings), or None (TALLRec: no item slots).
        f_U: projection of the CF user representation (CoLLM, A-LLMRec), or None.
        user_out, item_out: ``nn.Parameter`` float32 ``(d_llm,)``.
        E: buffer float32 ``(N+1, d)`` item features (row 0 = padding).
        user_cf: buffer float32 ``(n_views (U+1), d_cf)`` (:attr:`BaselineData.user_cf`) or None.
        lora: ``nn.ParameterList`` of the decoder's LoRA weights (the same tensors; empty
            without LoRA), so the optimizer and the trainer's best-state copy include them.

    Soft ids: ``1..N`` are items (f_I(E_i)); ids above N are user-representation slots
    (f_U(user_cf[id - N - 1]), :func:`user_rep_id`).
    """

    def __init__(self, f_I: ItemProjection | None, user_out, item_out, E, *, f_U: ItemProjection | None = None,
                 user_cf=None):
        super().__init__(f_I, user_out, item_out, E)
        self.f_U = f_U
        self.register_buffer("user_cf", None if user_cf is None else
                             torch.as_tensor(np.asarray(user_cf, dtype=np.float32)).clone())
        self.lora = nn.ParameterList()
        self._dropouts: list[nn.Module] = []

    @property
    def d_llm(self) -> int:
        return int(self.user_out.shape[0])

    def attach_lora(self, llm: LoadedLLM) -> None:
        """Own the decoder's LoRA weights (after :func:`apply_lora`) and its LoRA dropouts."""
        self.lora = nn.ParameterList([p for n, p in llm.decoder.named_parameters() if "lora_" in n])
        self._dropouts = [m for n, m in llm.decoder.named_modules()
                          if ".lora_dropout." in n and isinstance(m, nn.Dropout) and m.p > 0]

    def _items(self, items: torch.Tensor) -> torch.Tensor:
        if self.f_I is None:
            raise InputError("this model has no item soft tokens (a prompt asked for one)")
        return self.f_I(self.E[items])

    def soft(self, items: torch.Tensor) -> torch.Tensor:
        """Soft tokens of ``items`` (int64 ``(n,)``) -> float32 ``(n, d_llm)``, differentiable."""
        n1 = self.E.shape[0]
        is_user = items >= n1
        if self.user_cf is None or not bool(is_user.any()):
            return self._items(items)
        iu = torch.nonzero(is_user).squeeze(1)
        ii = torch.nonzero(~is_user).squeeze(1)
        zu = self.f_U(self.user_cf[items[iu] - n1])
        out = zu.new_zeros((len(items), zu.shape[1])).index_put((iu,), zu)
        if len(ii):
            out = out.index_put((ii,), self._items(items[ii]))
        return out

    def soft_table(self) -> torch.Tensor:
        """Every soft id's token: ``(N+1 [+ n_views (U+1)], d_llm)`` float32."""
        n1 = self.E.shape[0]
        parts = [self.f_I(self.E) if self.f_I is not None else self.user_out.new_zeros((n1, self.d_llm))]
        if self.user_cf is not None:
            parts.append(self.f_U(self.user_cf))
        return torch.cat(parts)

    def arrays(self) -> dict[str, torch.Tensor]:
        """Saved tensors: ``f_I/...``, ``f_U/...`` (``ItemProjection`` state names) and
        ``tokens/user_out``, ``tokens/item_out``. Buffers and LoRA are not included."""
        return {**_projection_arrays(self.f_I, "f_I"), **_projection_arrays(self.f_U, "f_U"),
                "tokens/user_out": self.user_out, "tokens/item_out": self.item_out}


def _user_projection(llm: LoadedLLM, o_rows: np.ndarray, arch: str, seed: int) -> ItemProjection:
    """f_U: linear, moment-matched to the token embeddings on the training users' O_u (as
    f_I's default start); mlp: torch default init under ``seed``."""
    d_cf = int(o_rows.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) + 3)
        proj = ItemProjection(d_cf, llm.d_llm, arch)
    if arch == "linear":
        w, b = fit_moment_matched(o_rows, llm.embed.numpy())
        proj.load_arrays({"f_I/weight": w, "f_I/bias": b})
    return proj


def initial_inputs(spec: BaselineSpec, llm: LoadedLLM, data: BaselineData, features: np.ndarray, *,
                   fi: str = LLM["fi"], arch: str = E2E["fi_arch"], seed: int = 0, titles=None) -> BaselineInputs:
    """The starting point: both out tokens at the mean input embedding (as e2e mode); f_I as
    e2e mode's (``fi`` fit for a linear f_I on ``features``, default init for ``mlp``); f_U
    likewise on the training users' O_u."""
    mean = llm.embed.numpy().mean(0).astype(np.float32)
    f_I = f_U = None
    if spec.item_soft:
        f_I = LLMInputs.initial(llm, features, fi=fi, arch=arch, seed=seed, titles=titles).f_I
    else:
        features = np.zeros((data.n_items + 1, 1), dtype=np.float32)
    if spec.user_rep:
        f_U = _user_projection(llm, data.train_cf[data.train_users], arch, seed)
    return BaselineInputs(f_I, mean, mean, features, f_U=f_U, user_cf=data.user_cf if spec.user_rep else None)


# --- the trainer ----------------------------------------------------------------------------


class BaselineTrainer(E2ETrainer):
    """:class:`~llmsrec.e2e.loop.E2ETrainer` with LoRA dropout on during training steps.

    Each step runs with the adapters' dropout in training mode and the torch generator
    seeded from (seed, step number) inside a fork, so masks are reproducible and the global
    generator is untouched; evaluation runs without dropout. The base weights are frozen,
    the LoRA weights (owned by ``inputs``) train with the heads, f_I, f_U and tokens.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_steps = 0

    def step(self, users: np.ndarray) -> dict:
        drops = getattr(self.inputs, "_dropouts", [])
        self.n_steps += 1
        if not drops:
            return super().step(users)
        devices = [self.dev] if self.dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(self.cfg.seed) * 1_000_003 + self.n_steps)
            for m in drops:
                m.train()
            try:
                return super().step(users)
            finally:
                for m in drops:
                    m.eval()


# --- per-user scores ------------------------------------------------------------------------


@dataclass
class ViewScores:
    """One view's outputs for every user 1..U (row r = uid r+1).

    Attributes:
        scores: float32 ``(U, 1+m)``: s(u, i) of the target (column 0) and the stored
            negatives of the view's split (Eq. 9), as ``ranking_metrics`` takes them.
        user: float32 ``(U, d')``: f_user(h_u), the user representation in the score space.
    """

    scores: np.ndarray
    user: np.ndarray


@torch.no_grad()
def view_scores(tr: E2ETrainer, view: str, item_h: np.ndarray) -> ViewScores:
    """Recompute ``view``'s user states with the trainer's current state and score them."""
    return ViewScores(*tr.view_outputs(view, item_h))


# --- train ----------------------------------------------------------------------------------


def _split_options(opts: dict) -> tuple[E2EOptions, TrainConfig]:
    e2e_names = set(E2EOptions.__dataclass_fields__)
    opts = {k: v for k, v in opts.items() if v is not None}
    eopts = E2EOptions(**{k: v for k, v in opts.items() if k in e2e_names})
    rest = {k: v for k, v in opts.items() if k not in e2e_names}
    rest.setdefault("train_negatives", E2E_DEFAULT_NEGATIVES)
    if rest.get("distill", "none") != "none" or rest.get("uniform", False):
        raise InputError("the LLM4Rec baselines train with L_Retrieval (Eq. 1) only: no distillation, "
                         "no uniformity loss")
    rest.update(distill="none", uniform=False)
    return eopts, TrainConfig.from_options(**rest)


@dataclass
class BaselineFit:
    """What :func:`fit_baseline` returns.

    Attributes:
        fit: :class:`~llmsrec.e2e.loop.E2EFit` (selected heads/inputs, history, test
            metrics, ``trainer`` holding the selected state, ``item_states``).
        data: the :class:`BaselineData` trained on; spec: the model's :class:`BaselineSpec`.
        llm: the LLM (with the trained LoRA weights for LoRA models).
        config, options: the :class:`~llmsrec.heads.train.TrainConfig` and
            :class:`~llmsrec.e2e.loop.E2EOptions` used; lora / stage1: their options (or None).
        stage_arrays, stage_record: stage-1 weights to save and its record (A-LLMRec).
        load_seconds: LLM load, prompts, CF-SRec and stage 1.
    """

    fit: Any
    data: BaselineData
    spec: BaselineSpec
    llm: LoadedLLM
    config: TrainConfig
    options: E2EOptions
    lora: LoraOptions | None
    stage1: Any
    stage_arrays: dict
    stage_record: dict | None
    load_seconds: float


def fit_baseline(model: str, ds, sasrec, *, llm: str | LoadedLLM | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, lora: LoraOptions | dict | None = None,
                 stage1: Any = None, **opts: Any) -> BaselineFit:
    """Train a baseline in memory (the work of :func:`train_baseline`, nothing written).

    Args and errors: see :func:`train_baseline`. Deterministic on CPU under ``seed``.
    """
    spec = get_spec(model)
    if isinstance(llm, (str, os.PathLike)):
        opts["llm"] = str(llm)
    eopts, cfg = _split_options(opts)
    if cfg.train_negatives == "all":
        raise InputError(f"--model {model}: --train-negatives all would run every item prompt through the LLM "
                         f"at every step; give a count (default {E2E_DEFAULT_NEGATIVES})")
    lora, stage1 = model_options(spec, model, lora, stage1)
    if not spec.needs_sasrec:
        sasrec = None  # text only: a CF-SRec given anyway (a loop over models) is not used
    elif sasrec is None:
        raise InputError(f"--model {model}: needs a CF-SRec checkpoint (--sasrec)")
    t = time.perf_counter()
    ds, llm = load_run_inputs(ds, llm, eopts)
    if spec.lora:
        apply_lora(llm, lora, seed=cfg.seed)
    data = load_baseline_data(ds, sasrec, llm, model, history_window=eopts.history_window, verb=eopts.verb)
    stage_arrays, stage_record, features = {}, None, data.E
    if spec.item_features is not None:
        features, stage_arrays, stage_record = spec.item_features(ds, llm, data, stage1, cfg.seed, log)
    inputs = initial_inputs(spec, llm, data, features, fi=eopts.fi, arch=eopts.fi_arch, seed=cfg.seed,
                            titles=ds.titles)
    if spec.lora:
        inputs.attach_lora(llm)
    t_load = time.perf_counter() - t
    fit = fit_e2e(data, llm, inputs, cfg, eopts, progress=progress, log=log, trainer_cls=BaselineTrainer)
    return BaselineFit(fit=fit, data=data, spec=spec, llm=llm, config=cfg, options=eopts,
                       lora=lora if spec.lora else None, stage1=stage1, stage_arrays=stage_arrays,
                       stage_record=stage_record, load_seconds=t_load)


def baseline_record(bf: BaselineFit) -> dict:
    """The ``"baseline"`` record of ``results.json`` / ``heads_config.json``: model, LoRA and
    stage-1 options, stage-1 record, projection arch, loaded views."""
    return {"model": bf.spec.name, "lora": asdict(bf.lora) if bf.lora else None,
            "stage1": asdict(bf.stage1) if bf.stage1 is not None else None, "stage1_record": bf.stage_record,
            "f_arch": bf.options.fi_arch, "views": list(bf.data.views)}


def train_baseline(model: str, ds, sasrec, out, *, force: bool = False, progress: bool = True,
                   llm: str | LoadedLLM | None = None, log: Callable[[str], None] | None = None,
                   lora: LoraOptions | dict | None = None, stage1: Any = None, **opts: Any) -> dict:
    """``llmsrec train --model tallrec|llara|collm|allmrec``: train a baseline in the e2e loop.

    The LLM runs on every step (no cache: LoRA and the soft-token projections change its
    states). Loss: L_Retrieval (Eq. 1) over the target and ``train_negatives`` (default 3)
    sampled negatives; Adam over the heads, tokens, f_I/f_U and LoRA weights; validation,
    early stopping and selection as e2e mode; test and ``test-shuffled`` scored once on the
    selected state.

    Args:
        model: one of :data:`BASELINES`.
        ds: ``PreparedDataset`` or its folder; sasrec: CF-SRec checkpoint folder (or module);
            TALLRec uses none (None, or ignored when given).
        out: folder to create: ``heads.safetensors``, ``heads_config.json``,
            ``inputs.safetensors``, ``adapter.safetensors`` (LoRA models),
            ``stage1.safetensors`` (A-LLMRec), ``teacher/`` (a copy of the CF-SRec's
            ``model.safetensors`` + ``config.json``; not TALLRec), ``history.jsonl``,
            ``training_curve.png``, ``results.json``.
        llm: a ``LoadedLLM`` (tests; LoRA is injected into it **in place**, so give a fresh
            one), or the name/folder to load (``E2EOptions.llm``).
        lora: :class:`LoraOptions` (or dict) for LoRA models; an error for A-LLMRec.
        stage1: A-LLMRec's :class:`~llmsrec.baselines.allmrec.Stage1Options` (or dict).
        **opts: :class:`~llmsrec.heads.train.TrainConfig` and
            :class:`~llmsrec.e2e.loop.E2EOptions` fields (``distill``/``uniform`` must stay off).
    Returns:
        The ``results.json`` dict: e2e mode's keys (``model`` = the paper's name, ``mode`` =
        ``e2e``, ``valid``, ``test``, ``best``, ``steps``, ``timings``, ``config``, ``e2e``) plus
        ``test-shuffled`` and ``baseline`` (model, LoRA and stage-1 options, stage-1 record).
    Raises:
        InputError: bad options, ``out`` exists without ``force``, mismatched inputs.
    """
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    bf = fit_baseline(model, ds, sasrec, llm=llm, progress=progress, log=log, lora=lora, stage1=stage1, **opts)
    fit, spec = bf.fit, bf.spec
    t = time.perf_counter()
    shuffled = metrics_of(view_scores(fit.trainer, "test-shuffled", fit.item_states).scores)
    t_shuffled = time.perf_counter() - t
    baseline = baseline_record(bf)
    results = {
        "model": spec.display,
        "mode": "e2e",
        "valid": fit.best["metrics"],
        "test": fit.test,
        "test-shuffled": shuffled,
        **fit.record(),
        "train_users": int(len(bf.data.train_users)),
        "valid_users": fit.valid_users,
        "timings": {"load": round(bf.load_seconds, 3), **fit.timings, "test_shuffled": round(t_shuffled, 3)},
        "config": asdict(bf.config),
        "e2e": asdict(bf.options),
        "baseline": baseline,
    }
    save_baseline(out, bf, baseline, results, force=force)
    return results


def save_arrays(path: Path, arrays: dict, meta: dict) -> None:
    out = {}
    for k, v in arrays.items():
        if hasattr(v, "detach"):
            v = v.detach().float().cpu().numpy()
        out[k] = np.ascontiguousarray(v, dtype=np.float32)
    with atomic_file(path, "wb") as f:
        f.write(save_numpy(out, metadata={"format": FORMAT, **{k: str(v) for k, v in meta.items()}}))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(f"{path}: missing (not a complete baseline checkpoint)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise InputError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None


def save_baseline(out, bf: BaselineFit, baseline: dict, results: dict, *, force: bool = False) -> None:
    """Write a baseline checkpoint folder atomically (trained parameters only, see module doc).

    Args:
        out: folder to create; bf: :func:`fit_baseline`'s result; baseline: the
            ``heads_config.json`` ``"baseline"`` record; results: the ``results.json`` dict.
    The CF-SRec teacher given as a folder is copied into ``OUT/teacher/`` (LLaRA, CoLLM,
    A-LLMRec); one given as a module is not (such a checkpoint cannot be reloaded).

    Raises:
        InputError: the teacher's files vanished or changed since training started.
    """
    fit, spec = bf.fit, bf.spec
    prov = {**bf.data.provenance, "valid_users": fit.valid_users}
    with atomic_dir(Path(out), force=force) as tmp:
        if spec.needs_sasrec and prov.get("sasrec"):
            copy_teacher(prov, tmp / TEACHER_DIR)
        save_heads(fit.heads, tmp, extra={"mode": "baseline", "baseline": baseline, "train": asdict(bf.config),
                                          "e2e": asdict(bf.options), "provenance": prov})
        save_arrays(tmp / INPUTS_FILE, fit.inputs.arrays(), {"model": spec.name, "f_arch": bf.options.fi_arch})
        if spec.lora:
            save_arrays(tmp / ADAPTER_FILE, lora_state(bf.llm), {"model": spec.name, "lora": json.dumps(baseline["lora"])})
        if bf.stage_arrays:
            save_arrays(tmp / STAGE1_FILE, bf.stage_arrays, {"model": spec.name})
        write_history(tmp / "history.jsonl", fit.history)
        plot_history(fit.history, tmp / "training_curve.png", title=f"{spec.display} (e2e, Eq. 1)")
        write_json(tmp / "results.json", results)


# --- load and evaluate ----------------------------------------------------------------------


def checkpoint_kind(checkpoint) -> str | None:
    """The ``llmsrec evaluate --model`` name a checkpoint folder is for, from its files alone.

    ``heads_config.json`` with ``"mode": "baseline"``: its ``baseline.model`` (``tallrec``,
    ``llara``, ``collm``, ``allmrec``); ``"mode": "e2e"``: ``llmsrec-e2e``; any other heads
    (cache mode): ``llmsrec``. Without heads, a CF-SRec ``config.json``: its ``model`` field
    (``sasrec`` when absent, as :func:`llmsrec.cfsrec.load_cfsrec`).

    Returns:
        the name, or None when neither file is a readable JSON object (the evaluator then
        reports what is missing).
    """
    ckpt = Path(checkpoint)
    for name in ("heads_config.json", "config.json"):
        try:
            doc = json.loads((ckpt / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        if name == "config.json":
            return str(doc.get("model") or "sasrec")
        mode = doc.get("mode")
        if mode == "baseline":
            b = doc.get("baseline")
            return str(b.get("model")) if isinstance(b, dict) and b.get("model") else None
        return "llmsrec-e2e" if mode == "e2e" else "llmsrec"
    return None


def _kind_label(kind: str) -> str:
    return {"llmsrec": "an LLM-SRec (cache-mode)", "llmsrec-e2e": "an LLM-SRec e2e"}.get(kind, f"a {kind}")


def check_checkpoint_kind(checkpoint, model: str) -> None:
    """Refuse a checkpoint of another kind than ``llmsrec evaluate --model model`` expects
    (:func:`checkpoint_kind`); an unrecognised folder passes (its evaluator reports it).

    Raises:
        InputError: e.g. ``CKPT: a llara checkpoint (use --model llara)``.
    """
    kind = checkpoint_kind(checkpoint)
    if kind is not None and kind != model:
        raise InputError(f"{checkpoint}: {_kind_label(kind)} checkpoint (use --model {kind})")


def read_baseline_config(checkpoint) -> dict:
    """``heads_config.json`` of a baseline checkpoint.

    Raises:
        InputError: missing/unreadable, or a checkpoint of another kind (the message names
            the ``--model`` it is for, :func:`checkpoint_kind`).
    """
    path = Path(checkpoint) / "heads_config.json"
    kind = checkpoint_kind(checkpoint)
    if kind is not None and kind not in BASELINES:
        raise InputError(f"{checkpoint}: {_kind_label(kind)} checkpoint, not an LLM4Rec baseline "
                         f"(use --model {kind})")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{path}: missing or unreadable") from None
    if doc.get("mode") != "baseline" or not isinstance(doc.get("baseline"), dict):
        raise InputError(f"{path}: no 'baseline' record (not a complete LLM4Rec baseline checkpoint)")
    return doc


def load_baseline_checkpoint(ds, checkpoint, *, device: str = "cpu", llm: LoadedLLM | None = None,
                             batch_tokens: int = LLM["batch_tokens"], views=EVAL_VIEWS, expect: str | None = None,
                             teacher=None, other_dataset: bool = False) -> BaselineTrainer:
    """Rebuild a trained baseline for scoring: the base LLM (as recorded) with the saved LoRA
    weights injected, the CF-SRec outputs, f_I/f_U/tokens and the heads. The CF-SRec is the
    checkpoint's own ``teacher/`` copy, else (older checkpoints) the folder it recorded.

    Args:
        ds: ``PreparedDataset``; checkpoint: folder written by :func:`train_baseline`.
        llm: an already loaded base LLM **without adapters** (LoRA is injected in place);
            default: load the recorded one on ``device``.
        views: views to score, of ``valid test valid-shuffled test-shuffled`` (``train`` is
            prepared as well).
        expect: the ``--model`` name the caller asked for (a different model is an error).
        teacher: a CF-SRec (folder or module) used instead of the checkpoint's own
            (LLaRA, CoLLM, A-LLMRec; ignored for TALLRec).
        other_dataset: score the model on a dataset it was not trained on (cross-domain
            transfer, :mod:`llmsrec.experiments.transfer`): the dataset and CF-SRec digest
            checks are skipped, and a model that reads a CF-SRec needs ``teacher``, one
            whose item table is indexed by ``ds``'s items.
    Returns:
        A :class:`BaselineTrainer` in eval mode (``evaluate``, ``item_states``,
        ``user_states``; :func:`view_scores`).
    Raises:
        InputError: not a baseline checkpoint, another model than ``expect``, its dataset,
            LLM or CF-SRec no longer match, or an old checkpoint's teacher folder is gone;
            ``other_dataset`` without ``teacher`` for a model that reads a CF-SRec.
    """
    ckpt = Path(checkpoint)
    bad = [v for v in views if v not in ("valid", "test", "valid-shuffled", "test-shuffled")]
    if bad:
        raise InputError(f"view {bad[0]!r}: only valid, test and their shuffled views have candidates")
    doc = read_baseline_config(ckpt)
    b, e, prov = doc["baseline"], doc["e2e"], doc["provenance"]
    spec = get_spec(b["model"])
    if expect is not None and expect != spec.name:
        raise InputError(f"{ckpt}: a {spec.name} checkpoint, not {expect} (use --model {spec.name})")
    if not other_dataset and prov.get("dataset_sha256") != ds.digest:
        raise InputError(f"{ckpt}: trained on dataset {str(prov.get('dataset_sha256'))[:12]}..., "
                         f"{ds.root} has {ds.digest[:12]}...")
    sasrec = None
    if spec.needs_sasrec:
        if other_dataset and teacher is None:
            raise InputError(f"{ckpt}: scoring a {spec.name} checkpoint on other data needs its CF-SRec "
                             f"re-indexed to that data's items")
        sasrec = teacher if teacher is not None else checkpoint_teacher(ckpt, prov)
    if llm is None:
        llm = load_llm(e["llm"], device=device, dtype=e.get("dtype"))
    if llm.weights_digest != prov.get("model_weights_sha256"):
        raise InputError(f"{ckpt}: provenance field 'model_weights_sha256' differs from {llm.name}")
    if spec.lora:
        apply_lora(llm, LoraOptions(**b["lora"]), seed=doc["train"].get("seed", 0))
        load_lora_state(llm, _read_arrays(ckpt / ADAPTER_FILE), ckpt / ADAPTER_FILE)
    views = tuple(dict.fromkeys(("train", *views)))
    data = load_baseline_data(ds, sasrec, llm, spec.name, history_window=e["history_window"], verb=prov["verb"],
                              views=views, shuffle_seed=prov.get("shuffle_seed", SHUFFLE_SEED))
    if not other_dataset and data.provenance["sasrec_sha256"] != prov.get("sasrec_sha256"):
        raise InputError(f"{ckpt}: provenance field 'sasrec_sha256' differs from {sasrec}")
    features = data.E
    if spec.load_item_features is not None:
        features = spec.load_item_features(_read_arrays(ckpt / STAGE1_FILE), b.get("stage1") or {}, data)
    arrays = _read_arrays(ckpt / INPUTS_FILE)
    arch = b.get("f_arch", "linear")
    d_llm = int(arrays["tokens/user_out"].shape[0])
    f_I = _projection_from_arrays(arrays, "f_I", features.shape[1], d_llm, arch) if spec.item_soft else None
    f_U = _projection_from_arrays(arrays, "f_U", data.train_cf.shape[1], d_llm, arch) if spec.user_rep else None
    if not spec.item_soft:
        features = np.zeros((data.n_items + 1, 1), dtype=np.float32)
    inputs = BaselineInputs(f_I, arrays["tokens/user_out"], arrays["tokens/item_out"], features, f_U=f_U,
                            user_cf=data.user_cf if spec.user_rep else None)
    if spec.lora:
        inputs.attach_lora(llm)
    cfg = TrainConfig.from_options(**doc["train"])
    opts = E2EOptions(**{**{k: v for k, v in e.items() if k in E2EOptions.__dataclass_fields__},
                         "device": device, "batch_tokens": batch_tokens, "grad_checkpointing": False})
    tr = BaselineTrainer(data, llm, inputs, cfg, opts)
    try:
        tr.heads.load_state_dict(load_heads(ckpt).state_dict())
    except RuntimeError as e:
        raise InputError(f"{ckpt}: heads do not fit this LLM / CF-SRec ({str(e).splitlines()[0]})") from None
    tr.heads.eval()
    tr.inputs.eval()
    return tr


def baseline_scores(ds, checkpoint, views=EVAL_VIEWS, *, device: str = "cpu", llm: LoadedLLM | None = None,
                    batch_tokens: int = LLM["batch_tokens"], expect: str | None = None) -> dict[str, ViewScores]:
    """Per-user scores (and f_user outputs) of a trained baseline on each of ``views``.

    All states are recomputed with the checkpoint (item states once). ``scores[view]`` rows
    are uids 1..U; column 0 is the target, columns 1.. the split's stored negatives (a
    shuffled view uses its base split's). With ``test`` and ``test-shuffled``, the paper's
    shuffled-inference change ratio is ``analyses.change_ratio(m_test, m_shuffled)``.

    Returns:
        ``{view: ViewScores}``. See :func:`load_baseline_checkpoint` for args and errors.
    """
    if isinstance(ds, (str, os.PathLike)):
        ds = load_prepared(ds)
    views = tuple(views)
    tr = load_baseline_checkpoint(ds, checkpoint, device=device, llm=llm, batch_tokens=batch_tokens, views=views,
                                  expect=expect)
    item_h = tr.item_states()
    return {v: view_scores(tr, v, item_h) for v in views}


def evaluate_baseline_checkpoint(ds, checkpoint, device: str = "cpu", llm: LoadedLLM | None = None,
                                 batch_tokens: int = LLM["batch_tokens"], views=EVAL_VIEWS, expect: str | None = None) -> dict:
    """``llmsrec evaluate --model tallrec|llara|collm|allmrec``: recompute the states with the
    checkpoint and score every user on the stored candidates.

    Returns:
        ``{"valid": metrics, "test": metrics, "test-shuffled": metrics}`` (``ranking_metrics``
        keys); equal to the training run's ``results.json`` for the same views.
    Raises:
        InputError: see :func:`load_baseline_checkpoint`.
    """
    scores = baseline_scores(ds, checkpoint, views, device=device, llm=llm, batch_tokens=batch_tokens, expect=expect)
    return {v: metrics_of(s.scores) for v, s in scores.items()}
