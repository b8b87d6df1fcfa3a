"""``refine-tokens``: one round of the "small recompute for token gradients" of cache mode.

The LLM is causal and frozen, and ``[UserOut]``/``[ItemOut]`` sit at the end of their
prompts, so every earlier position's keys and values are independent of the out-token
embedding t (what makes cache mode exact). A refinement round therefore

1. takes a seeded sample of users (``train`` view prompts) and an item pool (the sampled
   users' targets plus seeded random items), and computes each prompt's *prefix* (every
   token before the out token) once, without grad, keeping its per-layer keys/values;
2. trains t_user and t_item (the heads stay frozen) against the current heads' losses
   (Eq. 1 over the item pool with the user's history masked, Eq. 2 and Eq. 3 as the heads
   were trained) through a *single-position* forward/backward: the out token alone runs
   through the layers, attending to its cached prefix, so the gradient reaches t exactly as
   in a full forward (``test_refine.py`` checks the equality);
3. writes the new token embeddings (a params file, :mod:`llmsrec.precompute.params`) and
   refreshes the cache: precompute reruns every prompt with them (new provenance:
   ``params_sha256``). Retrain the heads on the new cache with ``llmsrec train``.

``train_fi``: f_I sits in the prefix (its soft tokens replace ``[HistoryEmb]``), so its
gradient needs the prefix recomputed with a graph at every step; with ``train_fi`` each
step runs the full prompts forward and backward (the e2e path,
:func:`llmsrec.e2e.loop.backward_through_llm`), and the prefix cache is not used.

Cost model (T_u, T_i: mean user / item prompt length in tokens; n_u, n_i: sampled users /
pool items; S steps of B users; L layers, K key/value heads of width d_h; SmolLM2-135M:
L=30, K=3, d_h=64; ml-100k: T_u ~ 330, T_i ~ 32):

* prefix pass: one no-grad forward over ``n_u T_u + n_i T_i`` tokens, the cost of
  precomputing those prompts (defaults 128 users, 256 items: ~50k tokens, about 1 min at
  ~900 tokens/s on 2 CPU cores);
* its memory: ``2 L K d_h`` values per token (46 KB in fp32 for SmolLM2), ~2.3 GB for the
  defaults;
* a step: forward+backward of ``B + n_i`` single positions, each attending over its
  prefix: about ``B + n_i`` tokens of the full path's work plus reading the prefix
  keys/values, against ``B T_u + n_i T_i`` tokens for a full forward/backward, i.e. ~T
  times cheaper (~330x for a user prompt, ~32x for an item prompt); with ``train_fi`` a
  step costs the full ``B T_u + n_i T_i`` tokens forward and backward;
* refresh: a full precompute of every prompt in the cache's views (~0.9M tokens on
  ml-100k with 4 views, ~15-17 min on 2 cores) -- it dominates a round, and it is needed
  because every out-token state changes when t changes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from llmsrec.atomic import atomic_dir, write_json
from llmsrec.cache import open_cache
from llmsrec.cfsrec.teacher import load_teacher
from llmsrec.data import load_prepared
from llmsrec.defaults import E2E, LLM, REFINE_TOKENS
from llmsrec.errors import InputError
from llmsrec.e2e.loop import LLMInputs, as_float, backward_through_llm, compute_states
from llmsrec.heads.losses import full_retrieval_loss, total_loss
from llmsrec.heads.model import load_heads
from llmsrec.heads.train import LOSS_TERMS, TrainConfig
from llmsrec.precompute import precompute
from llmsrec.precompute.engine import TokenizedPrompt, make_batches, tokenize_prompts
from llmsrec.precompute.llm import ITEM_OUT, USER_OUT, LoadedLLM, load_llm
from llmsrec.precompute.params import write_params
from llmsrec.precompute.prompts import build_view, item_prompt

PARAMS_FILE = "params.safetensors"


class PrefixCache:
    """Per-prompt keys/values of everything before the out token, computed once without grad.

    Args:
        llm: the frozen model; toks: tokenized prompts; soft_table: ``(N+1, d_llm)``
            f_I(E) on the model's device/dtype (fixed: the prefix holds the soft tokens);
        batch_tokens: token budget of one prefix forward.

    Attributes:
        kv: list of ``(layers, 2, kv_heads, P_i, head_dim)`` tensors (llm dtype, device),
            P_i = the out token's position in prompt i (= its prefix length).
        lengths: int64 ``(n,)`` the P_i.
    Raises:
        InputError: a prompt whose out token is its first token (empty prefix).
    """

    @torch.no_grad()
    def __init__(self, llm: LoadedLLM, toks: list[TokenizedPrompt], soft_table: torch.Tensor,
                 batch_tokens: int = LLM["batch_tokens"]):
        self.llm = llm
        self.lengths = np.asarray([t.out_pos for t in toks], dtype=np.int64)
        if len(toks) and self.lengths.min() < 1:
            raise InputError("refine-tokens: a prompt starts with its out token (no prefix)")
        prefixes = [TokenizedPrompt(t.ids[: t.out_pos], t.soft_pos[t.soft_pos < t.out_pos],
                                    t.soft_items[t.soft_pos < t.out_pos], t.out_pos) for t in toks]
        self.kv: list = [None] * len(toks)
        dev = llm.device
        order = np.argsort(self.lengths, kind="stable")
        for bb in make_batches(self.lengths, order, batch_tokens):
            batch = [prefixes[i] for i in bb]
            b, lmax = len(batch), int(self.lengths[bb].max())
            ids = torch.zeros((b, lmax), dtype=torch.long)
            mask = torch.zeros((b, lmax), dtype=torch.long)
            for k, p in enumerate(batch):
                ids[k, : len(p.ids)] = torch.from_numpy(p.ids)
                mask[k, : len(p.ids)] = 1
            x = llm.decoder.get_input_embeddings()(ids.to(dev))
            for k, p in enumerate(batch):
                if len(p.soft_pos):
                    x[k, torch.from_numpy(p.soft_pos).to(dev)] = soft_table[torch.from_numpy(p.soft_items).to(dev)]
            out = llm.decoder(inputs_embeds=x, attention_mask=mask.to(dev), use_cache=True)
            layers = out.past_key_values.to_legacy_cache()
            stacked = torch.stack([torch.stack([k_, v_]) for k_, v_ in layers])  # (L, 2, b, K, lmax, dh)
            for k, i in enumerate(bb):
                self.kv[i] = stacked[:, :, k, :, : self.lengths[i]].clone()

    def __len__(self) -> int:
        return len(self.kv)

    @property
    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.kv))

    def batch(self, idx) -> tuple:
        """Right-padded keys/values of prompts ``idx``: (per-layer (k, v) tuples, mask
        ``(b, P_max + 1)`` with the out token's column, positions ``(b, 1)``)."""
        idx = np.asarray(idx)
        lens = self.lengths[idx]
        pmax = int(lens.max())
        first = self.kv[idx[0]]
        n_layers, _, kvh, _, dh = first.shape
        buf = first.new_zeros((n_layers, 2, len(idx), kvh, pmax, dh))
        mask = torch.zeros((len(idx), pmax + 1), dtype=torch.long)
        for k, i in enumerate(idx):
            buf[:, :, k, :, : lens[k]] = self.kv[i]
            mask[k, : lens[k]] = 1
        mask[:, pmax] = 1
        dev = first.device
        layers = tuple((buf[l, 0], buf[l, 1]) for l in range(n_layers))
        return layers, mask.to(dev), torch.from_numpy(lens).view(-1, 1).to(dev)


def single_position_states(llm: LoadedLLM, prefix_batch: tuple, vec: torch.Tensor) -> torch.Tensor:
    """Last-layer state at the out token from cached prefix keys/values (differentiable in ``vec``).

    Args:
        prefix_batch: :meth:`PrefixCache.batch` of b prompts.
        vec: ``(d_llm,)`` out-token input embedding (float32; cast to the model dtype).
    Returns:
        float32 ``(b, d_llm)``: equal (up to rounding) to the full forward's state at the out
        token, and so is its gradient with respect to ``vec``.
    """
    from transformers import DynamicCache  # deferred: transformers takes seconds to import

    layers, mask, pos = prefix_batch
    b = pos.shape[0]
    cache = DynamicCache.from_legacy_cache(layers)  # the update concatenates: ``layers`` stay intact
    x = vec.to(llm.dtype).view(1, 1, -1).expand(b, 1, -1)
    h = llm.decoder(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True).last_hidden_state
    return as_float(h[:, -1])


def _pool_mask(users, targets, exclude, pool) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool (B, P) logits removed: pool items in the user's history except the target;
    int64 (B,) the target's column in the pool)."""
    col = {int(i): k for k, i in enumerate(pool)}
    mask = torch.zeros((len(users), len(pool)), dtype=torch.bool)
    tcol = torch.empty(len(users), dtype=torch.long)
    for b, u in enumerate(users):
        for i in exclude[u]:
            k = col.get(int(i))
            if k is not None:
                mask[b, k] = True
        tcol[b] = col[int(targets[u])]
        mask[b, tcol[b]] = False
    return mask, tcol


def refine_tokens(ds, cache, heads_dir, sasrec, out, *, llm: str | LoadedLLM | None = None,
                  users: int = REFINE_TOKENS["users"], items: int = REFINE_TOKENS["items"],
                  steps: int = REFINE_TOKENS["steps"], batch_size: int = REFINE_TOKENS["batch_size"],
                  lr: float = REFINE_TOKENS["lr"], train_fi: bool = False, seed: int = 0,
                  batch_tokens: int = LLM["batch_tokens"], grad_batch_tokens: int = E2E["grad_batch_tokens"], device: str = "cpu", dtype: str | None = None,
                  threads: int | None = None, refresh: bool = True, views=None, force: bool = False,
                  progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """One token-refinement round on a cache (module docstring: method and cost model).

    Args:
        ds: ``PreparedDataset`` or its folder; cache: the HDF5 cache the heads were trained
            on; heads_dir: cache-mode heads (frozen here; their training options give the
            loss terms); sasrec: the SASRec checkpoint of the cache (for the refresh).
        out: folder to create: ``params.safetensors`` (f_I and the refined tokens),
            ``refine.json`` (options, sample, loss before/after, timings), ``history.jsonl``
            (loss terms per step), and, with ``refresh``, ``cache.h5`` (precompute with
            the new params; the cache's views, window, verb and seed).
        llm: a ``LoadedLLM`` or a name; None = the cache's ``model``. Its weights and
            tokenizer must match the cache's digests.
        users, items: sample sizes (users with a ``train`` sample; the pool holds their
            targets plus random items up to ``items``).
        steps, batch_size, lr: Adam steps over batches of sampled users (betas and weight
            decay as the heads were trained).
        train_fi: also train the linear f_I (full forward/backward per step, see above).
        seed: seeds the sample and the batch order.
        batch_tokens: budget of the prefix and refresh forwards; grad_batch_tokens: of a
            graph-keeping forward (``train_fi``).
        device, dtype, threads: where the LLM runs.
        refresh: run precompute with the new params into ``out/cache.h5``.
        views: user views of the refreshed cache (default: all of the source cache's; each
            view costs a forward over every user prompt).
    Returns:
        the ``refine.json`` dict.
    Raises:
        InputError: mismatched cache / heads / LLM / SASRec / dataset, ``out`` exists
            without ``force``, bad sizes.
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    for name, v in (("users", users), ("items", items), ("steps", steps), ("batch_size", batch_size)):
        if v < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be >= 1")
    if not lr > 0:
        raise InputError("--lr: must be > 0")
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    if isinstance(ds, (str, os.PathLike)):
        ds = load_prepared(ds)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with open_cache(cache) as c:
        prov, have, params = c.provenance, list(c.views), c.params()
        E, train_cf, targets = c.item_cf(), c.user_cf("train"), c.targets("train")
    views = have if views is None else list(views)
    missing = [v for v in views if v not in have]
    if missing or "train" not in have:
        raise InputError(f"{cache}: view(s) {', '.join(missing or ['train'])} not in the cache (has {', '.join(have)})")
    if prov.get("dataset_sha256") != ds.digest:
        raise InputError(f"{cache}: provenance field 'dataset_sha256' differs from {ds.root}")
    sas_digest = None
    if refresh:
        _, sas_digest = load_teacher(sasrec)
        if sas_digest != prov.get("sasrec_sha256"):
            raise InputError(f"{cache}: provenance field 'sasrec_sha256' differs from {sasrec}")
    if not isinstance(llm, LoadedLLM):
        llm = load_llm(llm or prov["model"], device=device, dtype=dtype)
    for k, v in (("model_weights_sha256", llm.weights_digest), ("tokenizer_sha256", llm.tokenizer_digest)):
        if prov.get(k) != v:
            raise InputError(f"{cache}: provenance field '{k}' differs from the LLM {llm.name}")
    heads = load_heads(heads_dir)
    if heads.config.d_llm != llm.d_llm or heads.config.d_cf != E.shape[1]:
        raise InputError(f"{heads_dir}: heads expect d_llm={heads.config.d_llm}, d_cf={heads.config.d_cf}; "
                         f"the cache has {llm.d_llm}, {E.shape[1]}")
    try:
        hdoc = json.loads((Path(heads_dir) / "heads_config.json").read_text())
        tcfg = TrainConfig.from_options(**hdoc.get("train", {}))
    except (OSError, ValueError, TypeError):
        tcfg = TrainConfig()
    lcfg = tcfg.loss_config()
    dev = llm.device
    heads = heads.to(dev).eval().requires_grad_(False)
    inputs = LLMInputs.from_arrays(params, E).to(dev)
    inputs.f_I.requires_grad_(train_fi)
    trainable = [inputs.user_out, inputs.item_out] + (list(inputs.f_I.parameters()) if train_fi else [])
    opt = torch.optim.Adam(trainable, lr=lr, betas=(tcfg.beta1, tcfg.beta2), weight_decay=tcfg.weight_decay)

    # the sample -------------------------------------------------------------------------
    n_users = ds.n_users if prov.get("max_users") is None else int(prov["max_users"])
    hw, verb, vseed = int(prov["history_window"]), prov["verb"], int(prov.get("seed", 0))
    vp = build_view(ds, "train", history_window=hw, verb=verb, seed=vseed, users=range(1, n_users + 1))
    eligible = np.array([u for u in range(1, n_users + 1) if vp.prompts[u] is not None and targets[u] > 0],
                        dtype=np.int64)
    if len(eligible) == 0:
        raise InputError(f"{cache}: no user has a training sample")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(eligible, size=min(users, len(eligible)), replace=False))
    tg = np.unique(targets[sample])
    rest = np.setdiff1d(np.arange(1, ds.n_items + 1), tg)
    extra = rng.permutation(rest)[: max(0, items - len(tg))]
    pool = np.sort(np.concatenate([tg, extra])).astype(np.int64)
    exclude = {int(u): np.asarray(ds.seqs[u][:-2], dtype=np.int64) for u in sample}
    utoks = tokenize_prompts(llm, [vp.prompts[u] for u in sample], USER_OUT)
    itoks = tokenize_prompts(llm, [item_prompt(ds.titles, int(i)) for i in pool], ITEM_OUT)
    row = {int(u): k for k, u in enumerate(sample)}
    cf = torch.from_numpy(np.asarray(train_cf, dtype=np.float32)).to(dev)

    t1 = time.perf_counter()
    if not train_fi:
        with torch.no_grad():
            soft = inputs.f_I(inputs.E).to(llm.dtype)
        upre = PrefixCache(llm, utoks, soft, batch_tokens)
        ipre = PrefixCache(llm, itoks, soft, batch_tokens)
        pool_batch = ipre.batch(np.arange(len(pool)))
        log(f"refine-tokens: prefix keys/values of {len(sample)} user and {len(pool)} item prompts "
            f"({int(upre.lengths.sum() + ipre.lengths.sum()):,} tokens, "
            f"{(upre.nbytes + ipre.nbytes) / 2**30:.2f} GiB) in {time.perf_counter() - t1:.1f} s")
    t_prefix = time.perf_counter() - t1

    def loss_of(hs, batch_users):
        h_u, h_p = hs
        mask, tcol = _pool_mask(batch_users, targets, exclude, pool)
        u = heads.user(h_u)
        r = full_retrieval_loss(u, heads.item(h_p), tcol.to(dev), mask.to(dev))
        cfu = heads.cf_user(cf[torch.from_numpy(batch_users).to(dev)]) if lcfg.distill != "none" else None
        return total_loss(r, u, cfu, lcfg)

    def states(batch_users):
        """Single-position states of the batch's users and of the whole pool (token path)."""
        k = np.array([row[int(u)] for u in batch_users])
        return [single_position_states(llm, upre.batch(k), inputs.user_out),
                single_position_states(llm, pool_batch, inputs.item_out)]

    def sample_loss() -> dict:
        """Mean loss terms over the whole sample with the current tokens (and f_I), no grad."""
        acc = {t: 0.0 for t in LOSS_TERMS}
        with torch.no_grad():
            pool_h = None
            if train_fi:
                pool_h = torch.from_numpy(compute_states(llm, inputs, itoks, ITEM_OUT, batch_tokens)).to(dev)
            for s in range(0, len(sample), batch_size):
                bu = sample[s : s + batch_size]
                if train_fi:
                    hu = compute_states(llm, inputs, [utoks[row[int(u)]] for u in bu], USER_OUT, batch_tokens)
                    hs = [torch.from_numpy(hu).to(dev), pool_h]
                else:
                    hs = states(bu)
                _, terms = loss_of(hs, bu)
                for t in LOSS_TERMS:
                    acc[t] += terms[t] * len(bu)
        return {t: acc[t] / len(sample) for t in LOSS_TERMS}

    before = sample_loss()

    history = []
    t2 = time.perf_counter()
    order = np.zeros(0, dtype=np.int64)
    for step in tqdm(range(1, steps + 1), desc="refine-tokens", disable=not progress, unit="step"):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(sample)])
        bu, order = order[:batch_size], order[batch_size:]
        opt.zero_grad(set_to_none=True)
        if train_fi:
            groups = [([utoks[row[int(u)]] for u in bu], USER_OUT), (itoks, ITEM_OUT)]
            _, terms = backward_through_llm(llm, inputs, groups, lambda hs: loss_of(hs, bu), grad_batch_tokens)
        else:
            loss, terms = loss_of(states(bu), bu)
            loss.backward()
        opt.step()
        history.append({"step": step, **terms})
    t_steps = time.perf_counter() - t2
    after = sample_loss()
    log(f"refine-tokens: sample loss {before['loss']:.4f} -> {after['loss']:.4f} in {steps} steps "
        f"({t_steps:.1f} s)")

    arrays = {k: v.detach().float().cpu().numpy() for k, v in inputs.arrays().items()}
    moved = {k: float(np.linalg.norm(arrays[k] - params[k])) for k in ("tokens/user_out", "tokens/item_out")}
    result = {
        "cache": str(Path(cache).resolve()), "heads": str(Path(heads_dir).resolve()),
        "options": {"users": users, "items": items, "steps": steps, "batch_size": batch_size, "lr": lr,
                    "train_fi": train_fi, "seed": seed, "batch_tokens": batch_tokens, "device": device,
                    "views": views,
                    "dtype": str(llm.dtype).removeprefix("torch.")},
        "sample": {"users": int(len(sample)), "pool_items": int(len(pool)),
                   "user_tokens": int(sum(len(t) for t in utoks)), "item_tokens": int(sum(len(t) for t in itoks))},
        "loss_before": before, "loss_after": after, "token_change_l2": moved,
        "timings": {"load": round(t1 - t0, 3), "prefix": round(t_prefix, 3), "steps": round(t_steps, 3)},
        "refreshed_cache": None,
    }
    with atomic_dir(out, force=force) as tmp:
        write_params(tmp / PARAMS_FILE, arrays, extra={"source": "llmsrec refine-tokens",
                                                       "cache": str(Path(cache).resolve())})
        with open(tmp / "history.jsonl", "w") as f:
            for h in history:
                f.write(json.dumps(h) + "\n")
        write_json(tmp / "refine.json", result)
    if refresh:
        t3 = time.perf_counter()
        log(f"refine-tokens: refreshing the cache (views {', '.join(views)}) -> {out / 'cache.h5'}; if this "
            f"is interrupted, rerun `llmsrec precompute --params {out / PARAMS_FILE}` with the same --out to resume")
        precompute(ds, sasrec, out / "cache.h5", llm=llm, views=views, history_window=hw, verb=verb,
                   batch_tokens=batch_tokens, seed=vseed, max_users=prov.get("max_users"),
                   params=out / PARAMS_FILE, progress=progress, log=log)
        result["refreshed_cache"] = str((out / "cache.h5").resolve())
        result["timings"]["refresh"] = round(time.perf_counter() - t3, 3)
        write_json(out / "refine.json", result)
    result["timings"]["total"] = round(time.perf_counter() - t0, 3)
    write_json(out / "refine.json", result)
    return result
