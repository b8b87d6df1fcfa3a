"""Train many head variants at once in one process: stacked parameters, one pass over the batches.

A sweep's variants often differ only in how they are optimised (seed, learning rate, loss
switches and weights), not in what they read: the same cached tensors, readouts, head widths,
batch size and schedule. :func:`fit_stacked` trains such a group together. Every parameter of
the heads gets a leading variant axis ``V``; one forward (``torch.func.vmap`` of
``torch.func.functional_call`` over the variant axis: batched matrix products instead of V
small ones) computes all variants' head outputs, each variant's loss is
:func:`~llmsrec.heads.losses.total_loss` of its own outputs, and the sum of the V losses is
backpropagated once (the variants share no parameter, so each gets its own gradient). torch's
fused Adam then runs one parameter group per variant on views of the stacked tensors.

Each variant sees what :func:`~llmsrec.heads.train.fit_heads` would give it alone: its
weights initialised under its own seed, its own user order and negatives from its own
seeded numpy generator, the same validation schedule, selection, patience and lr decay. A
variant that stops early is taken out of the stack. The results equal training each variant
alone up to float rounding (a batched product sums in another order):
``tests/test_stacked.py`` checks weights, selected step and metrics on a small cache.

What it shares: the per-step Python and dispatch work, one read of the cached tensors and
their prepared states, V small products turned into one batched product. What it cannot
share is the arithmetic: each variant's heads have their own weights, so the products cost
V times one variant's. On the ml-100k cache, one CPU thread, it saved 1.64x with 3 sampled
negatives and 1.04x with the full softmax, whose products already run near the core's speed
one variant at a time (docs/results/speed.md); it was not measured on an accelerator.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from llmsrec.errors import InputError
from llmsrec.heads.losses import exclusion_mask, full_retrieval_loss, retrieval_loss, sample_negatives, total_loss
from llmsrec.heads.model import LLMSRecHeads, Prepared
from llmsrec.heads.train import (
    LOSS_TERMS,
    CachedTensors,
    FitResult,
    TrainConfig,
    check_step_dtype,
    heads_config,
    train_user_array,
    validation_record,
)
from llmsrec.metrics import ranking_metrics
from llmsrec.training import Tick, eval_points

__all__ = ["PER_VARIANT", "stack_key", "stack_groups", "fit_stacked"]

#: TrainConfig fields that may differ between the variants of one stack (how a variant is
#: optimised); every other field must be equal (what it reads and its schedule).
PER_VARIANT = frozenset({"seed", "lr", "beta1", "beta2", "weight_decay", "lr_decay", "distill", "uniform",
                         "retrieval_weight", "distill_weight", "uniform_weight", "contrastive_temperature"})

def stack_key(cfg: TrainConfig) -> str:
    """The fields of ``cfg`` that variants trained together must share (not :data:`PER_VARIANT`),
    as a JSON string: two configurations can be stacked iff their keys are equal."""
    return json.dumps({k: v for k, v in asdict(cfg).items() if k not in PER_VARIANT}, sort_keys=True)


def stack_groups(configs: list[TrainConfig], size: int) -> list[list[int]]:
    """Indices of ``configs`` grouped for :func:`fit_stacked`: equal :func:`stack_key`, at most
    ``size`` per group, groups in order of their first member, members in input order.

    Raises:
        InputError: ``size`` < 1.
    """
    if size < 1:
        raise InputError(f"--stack {size}: must be >= 1")
    by_key: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        by_key.setdefault(stack_key(c), []).append(i)
    return [idx[lo : lo + size] for idx in by_key.values() for lo in range(0, len(idx), size)]


class _Forward(nn.Module):
    """The three heads in one call, as ``functional_call`` runs them (parameter names ``heads.*``)."""

    def __init__(self, heads: LLMSRecHeads):
        super().__init__()
        self.heads = heads

    def forward(self, h_users, h_items, o_users):
        u = self.heads.user(h_users) if h_users is not None else None
        e = self.heads.item(h_items) if h_items is not None else None
        c = self.heads.cf_user(o_users) if o_users is not None else None
        return u, e, c


def _parts(x):
    """A state tensor or :class:`Prepared` as (template, tensors): vmap gets only tensors."""
    if isinstance(x, Prepared):
        return tuple(t is not None for t in x), tuple(t for t in x if t is not None)
    return None, (x,)


def _join(template, tensors):
    if template is None:
        return tensors[0]
    it = iter(tensors)
    return Prepared(*(next(it) if present else None for present in template))


def _rows(x, idx):
    return x.rows(idx) if isinstance(x, Prepared) else x[idx]


class _Stack:
    """The stacked parameters and the Adam state of the variants still training.

    A matrix of a linear layer, ``(out, in)`` in the heads, is stored as ``(V, in, out)`` and
    handed to the heads as its transpose (a view): the batched products then give its
    gradient in the stored layout, without a transposing copy at every step. Adam is torch's
    (fused where available, as :func:`~llmsrec.heads.train.fit_heads` runs it), one parameter
    group per variant over views of the stacked tensors, so each variant gets its own lr,
    betas, weight decay and lr decay, and a parameter without gradient (f_CF-user without
    L_Distill) is skipped as it is alone.
    """

    def __init__(self, heads: list[nn.Module], cfgs: list[TrainConfig]):
        per = [dict(h.named_parameters()) for h in heads]
        names = list(per[0])
        self.flip = {n for n in names if n.endswith(".weight") and per[0][n].dim() == 2}
        self.params = {n: torch.stack([p[n].detach().T if n in self.flip else p[n].detach() for p in per]).contiguous()
                       .requires_grad_() for n in names}
        self.cfgs = list(cfgs)
        self.opt = self._adam([{} for _ in cfgs])

    def _adam(self, states: list[dict]) -> torch.optim.Optimizer:
        """A fresh optimizer over views of ``self.params``; ``states``: per variant, name -> Adam state."""
        self.views = {n: list(p.detach().unbind(0)) for n, p in self.params.items()}
        groups = [{"params": [self.views[n][i] for n in self.params], "lr": c.lr, "betas": (c.beta1, c.beta2),
                   "weight_decay": c.weight_decay} for i, c in enumerate(self.cfgs)]
        try:  # as fit_heads: the fused CPU kernel
            opt = torch.optim.Adam(groups, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.Adam(groups)
        for i, st in enumerate(states):
            for n, v in st.items():
                opt.state[self.views[n][i]] = v
        return opt

    def module_params(self) -> dict[str, torch.Tensor]:
        """The stacked parameters as the heads' names and shapes (``(V, out, in)`` views for matrices)."""
        return {n: p.transpose(1, 2) if n in self.flip else p for n, p in self.params.items()}

    def keep(self, idx: list[int]) -> None:
        """Keep only the variants at positions ``idx`` (in that order), with their Adam state and lr."""
        states = [{n: self.opt.state[self.views[n][i]] for n in self.params if self.views[n][i] in self.opt.state}
                  for i in idx]
        lrs = [self.opt.param_groups[i]["lr"] for i in idx]
        ix = torch.tensor(idx, dtype=torch.long)
        self.params = {n: p.detach()[ix].requires_grad_() for n, p in self.params.items()}
        self.cfgs = [self.cfgs[i] for i in idx]
        self.opt = self._adam(states)
        for g, lr in zip(self.opt.param_groups, lrs):
            g["lr"] = lr

    def state(self, i: int) -> dict[str, torch.Tensor]:
        """Variant ``i``'s parameters as an ``LLMSRecHeads`` state dict (copies)."""
        return {n.removeprefix("heads."): (p[i].T if n in self.flip else p[i]).detach().clone()
                for n, p in self.params.items()}

    def adam_step(self) -> None:
        """One Adam step of every variant on the stacked gradients (then cleared)."""
        for n, p in self.params.items():
            g = p.grad
            cf = n.startswith("heads.f_cf_user.")
            for i, (view, c) in enumerate(zip(self.views[n], self.cfgs)):
                view.grad = None if g is None or (cf and c.distill == "none") else g[i]
        self.opt.step()
        for n, p in self.params.items():
            p.grad = None
            for view in self.views[n]:
                view.grad = None

    def decay_lr(self) -> None:
        for g, c in zip(self.opt.param_groups, self.cfgs):
            g["lr"] *= c.lr_decay


class _Track:
    """One variant's bookkeeping, as :func:`llmsrec.training.train_loop` keeps it."""

    def __init__(self, pos: int, cfg: TrainConfig):
        self.pos, self.cfg, self.lcfg = pos, cfg, cfg.loss_config()
        self.rng = np.random.default_rng(cfg.seed)
        self.order = None
        self.history: list[dict] = []
        self.best_value, self.best, self.kept = -math.inf, {}, None
        self.bad = self.n_valid = self.steps = 0
        self.run, self.run_n = dict.fromkeys(LOSS_TERMS, 0.0), 0
        self.stopped = False
        self.epochs_run = 0.0
        self.lr = cfg.lr


def fit_stacked(data: CachedTensors, configs: list[TrainConfig], *, step_dtype: str = "fp32") -> list[FitResult]:
    """Train the variants ``configs`` together on in-memory cached tensors (single process, CPU).

    Args:
        data: the cached tensors (:class:`~llmsrec.heads.train.CachedTensors`).
        configs: V >= 1 configurations with equal :func:`stack_key` (they differ only in
            :data:`PER_VARIANT` fields).
        step_dtype: ``fp32`` or ``bf16``, as :func:`~llmsrec.heads.train.fit_heads`'s.
    Returns:
        One :class:`~llmsrec.heads.train.FitResult` per configuration, in order: the
        best-on-validation heads (CPU, eval mode), the history, best, steps, epochs run and
        early stop as ``fit_heads`` gives them alone (equal up to float rounding).
        ``seconds`` / ``step_seconds`` / ``validation_seconds`` are the group's wall times,
        shared by its variants.
    Raises:
        InputError: no configuration, configurations that cannot be stacked, no training
            users, too few items for the negatives, or a variant whose validation scores
            are not finite (it diverged: lower its lr).
    """
    cfgs = list(configs)
    if not cfgs:
        raise InputError("stacked training: no configuration")
    if len({stack_key(c) for c in cfgs}) > 1:
        raise InputError("stacked training: the configurations differ in fields other than "
                         + ", ".join(sorted(PER_VARIANT)))
    low = check_step_dtype(step_dtype) == "bf16"
    c0 = cfgs[0]
    users_all = train_user_array(data)
    hcfg = heads_config(data, c0)
    inits = []
    for c in cfgs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            inits.append(LLMSRecHeads(hcfg))
    base = inits[0]
    stack = _Stack([_Forward(h) for h in inits], cfgs)
    fwd = _Forward(base)
    del inits

    def t32(a, dtype=np.float32):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))

    item_h = base.prepare_item(t32(data.item_hidden))
    user_h = base.prepare_user(t32(data.train_hidden))
    user_cf = t32(data.train_cf)
    targets = np.asarray(data.train_targets, dtype=np.int64)
    valid_h = base.prepare_user(t32(data.eval_hidden["valid"]))
    valid_u = _rows(valid_h, slice(1, None))
    valid_c = torch.as_tensor(np.asarray(data.candidates["valid"], dtype=np.int64))
    full = c0.train_negatives == "all"
    u_tmpl, _ = _parts(user_h)
    i_tmpl, _ = _parts(item_h)

    def heads_fn(params, hu, hi, ocf):
        return torch.func.functional_call(fwd, params, (None if hu is None else _join(u_tmpl, hu),
                                                        None if hi is None else _join(i_tmpl, hi), ocf))

    def run_heads(hu, hi, ocf, hu_dim, hi_dim):
        """vmap over the variant axis of the parameters (and of the inputs with dim 0)."""
        dims = (0, None if hu is None else hu_dim, None if hi is None else hi_dim, None if ocf is None else 0)
        outs = tuple(None if x is None else 0 for x in (hu, hi, ocf))
        return torch.func.vmap(heads_fn, in_dims=dims, out_dims=outs)(stack.module_params(), hu, hi, ocf)

    tracks = [_Track(i, c) for i, c in enumerate(cfgs)]
    active = list(tracks)
    n_batches = math.ceil(len(users_all) / c0.batch_size)
    points = set(eval_points(n_batches, c0.evals_per_epoch))
    t_steps = t_valid = 0.0
    t0 = time.perf_counter()

    def step(bi: int) -> list[dict]:
        bs = c0.batch_size
        users = np.stack([tr.order[bi * bs : (bi + 1) * bs] for tr in active])  # (V, B)
        tg = targets[users]
        excl = [[data.train_exclude[x] for x in row] for row in users]
        u_idx = torch.from_numpy(users)
        hu = _parts(_rows(user_h, u_idx))[1]
        use_cf = any(tr.lcfg.distill != "none" for tr in active)
        ocf = user_cf[u_idx] if use_cf else None
        if full:
            hi, hi_dim = _parts(item_h)[1], None
        else:
            ids = np.stack([np.concatenate([tg[j, :, None], sample_negatives(excl[j], tg[j], data.n_items,
                                                                             int(c0.train_negatives), tr.rng)], 1)
                            for j, tr in enumerate(active)])  # (V, B, 1+k), each variant's own generator
            hi, hi_dim = _parts(_rows(item_h, torch.from_numpy(ids)))[1], 0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            u, e, cfu = run_heads(hu, hi, ocf, 0, hi_dim)
        if low:
            u, e, cfu = u.float(), e.float(), (cfu.float() if cfu is not None else None)
        total, out = 0.0, []
        for j, tr in enumerate(active):
            c = cfu[j] if tr.lcfg.distill != "none" else None
            if full:
                mask = exclusion_mask(excl[j], tg[j], data.n_items)
                r = full_retrieval_loss(u[j], e[j], torch.from_numpy(tg[j]), mask)
            else:
                r = retrieval_loss(u[j], e[j][:, 0], e[j][:, 1:])
            loss, terms = total_loss(r, u[j], c, tr.lcfg)
            total = total + loss
            out.append(terms)
        total.backward()
        stack.adam_step()
        return out

    @torch.no_grad()
    def validate() -> list[dict]:
        u, e, _ = run_heads(_parts(valid_u)[1], _parts(item_h)[1], None, None, None)  # (V, U, d'), (V, N+1, d')
        res = []
        for j, tr in enumerate(active):
            s = torch.einsum("ucd,ud->uc", e[j][valid_c], u[j]).numpy()
            try:
                res.append({k: float(v) for k, v in ranking_metrics(s).items()})
            except ValueError as err:
                raise InputError(f"training diverged at step {tr.steps} (variant seed {tr.cfg.seed}, lr {tr.cfg.lr}): "
                                 f"{err}; lower --lr") from None
        return res

    for epoch in range(c0.epochs):
        for tr in active:
            tr.order = tr.rng.permutation(users_all)
        for b in range(1, n_batches + 1):
            t = time.perf_counter()
            got = step(b - 1)
            dt = time.perf_counter() - t
            t_steps += dt
            for tr, terms in zip(active, got):
                tr.steps += 1
                for k in LOSS_TERMS:
                    tr.run[k] += terms[k]
                tr.run_n += 1
            if b not in points:
                continue
            t = time.perf_counter()
            metrics = validate()
            t_valid += time.perf_counter() - t
            now = time.perf_counter() - t0
            keep = []
            for j, (tr, m) in enumerate(zip(active, metrics)):
                tr.n_valid += 1
                improved = m[c0.select_metric] > tr.best_value
                tick = Tick(epoch, b, n_batches, tr.steps, {k: tr.run[k] / max(tr.run_n, 1) for k in LOSS_TERMS},
                            dt, now, tr.n_valid, m, improved)
                tr.history.append(validation_record(tick, tr.lr))
                tr.run, tr.run_n = dict.fromkeys(LOSS_TERMS, 0.0), 0
                if improved:
                    tr.best_value = m[c0.select_metric]
                    tr.kept = stack.state(j)
                    tr.best = {"validation": tr.n_valid, "step": tr.steps, "epoch": tick.progress, "metrics": m}
                    tr.bad = 0
                else:
                    tr.bad += 1
                tr.lr *= tr.cfg.lr_decay
                if tr.bad >= c0.patience:
                    tr.stopped = True
                    tr.epochs_run = epoch + b / n_batches
                else:
                    keep.append(j)
            stack.decay_lr()
            if len(keep) < len(active):
                if keep:  # (the last variants stopping together leave nothing to optimise)
                    stack.keep(keep)
                active = [active[j] for j in keep]
            if not active:
                break
        if not active:
            break
        for tr in active:
            tr.epochs_run = epoch + 1
    seconds = time.perf_counter() - t0
    results = []
    for tr in tracks:
        heads = LLMSRecHeads(hcfg)
        heads.load_state_dict(tr.kept)
        heads.eval()
        results.append(FitResult(heads, tr.history, tr.best, tr.steps, round(float(tr.epochs_run), 4), tr.stopped,
                                 seconds, t_steps, t_valid))
    return results

