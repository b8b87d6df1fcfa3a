"""A precompute run's plan: the loaded inputs (:class:`Job`), the cache's fixed arrays, the
prompts of each group and the chunked forward passes that fill it. One process
(:mod:`llmsrec.precompute.run`) and the ranks of a sharded run
(:mod:`llmsrec.precompute.shards`) both execute it."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from llmsrec import __version__
from llmsrec.atomic import digest_arrays, sha256_file
from llmsrec.cache.store import STORE_DTYPES
from llmsrec.cfsrec.teacher import load_teacher, teacher_user_reps
from llmsrec.data import load_prepared
from llmsrec.data.views import PREFIX_VIEW, check_view
from llmsrec.errors import InputError
from llmsrec.precompute.engine import forward_batch, make_batches, tokenize_prompts
from llmsrec.precompute.fit import fit_moment_matched, fit_ridge, title_embedding_means
from llmsrec.precompute.llm import ITEM_OUT, USER_OUT, LoadedLLM, load_llm
from llmsrec.precompute.params import read_linear_params
from llmsrec.precompute.prompts import (
    TEMPLATE_VERSION, TEMPLATES, USER_REP_ITEM, Prompt, PrefixPrompts, ViewPrompts, build_prefix_view,
    build_view, default_verb, has_user_rep, item_prompt, template_text,
)
from llmsrec.precompute.readouts import TreePrompt, as_tree, default_layers, forward_readouts, num_layers, tokenize_tree


@dataclass
class Job:
    """Everything a precompute run needs once the inputs are loaded (``prepare_job``).

    Attributes (besides the ``precompute`` options of the same names):
        ds: the ``PreparedDataset``; sas: the CF-SRec teacher (eval mode); E: its item
        embeddings, float32 ``(N+1, d_cf)``; llm: the ``LoadedLLM``; n_users: users that get
        prompts (``max_users`` applied); given: the params file's arrays or None; prov: the
        provenance asked for (without the f_I / token digests, added when the params are
        known); groups: ``items`` then ``users/<view>`` per view; t0: start time (s).
    """

    ds: object
    sas: object
    E: np.ndarray
    llm: LoadedLLM
    out: Path
    views: list
    n_users: int
    given: dict | None
    prov: dict
    groups: list
    history_window: int
    verb: str
    seed: int
    fi: str
    ridge_alpha: float
    batch_tokens: int
    chunk_prompts: int
    force: bool
    attention_mask: bool
    progress: bool
    log: Callable[[str], None]
    on_chunk: Callable[[str, int], None] | None
    t0: float
    readout_layers: tuple = ()
    prefixes: int = 1
    template: str = TEMPLATE_VERSION


def prepare_job(ds, sasrec, cache, *, llm, views, history_window, verb, batch_tokens, chunk_prompts,
             device, dtype, seed, force, max_users, ridge_alpha, fi, params, trust_remote_code,
             num_threads, attention_mask, progress, log, on_chunk, readout_layers=(), prefixes=1,
             template=TEMPLATE_VERSION, store_dtype: str = "float32") -> Job:
    """Check the options, load dataset, teacher and LLM, build the provenance (``Job``)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    if isinstance(ds, (str, os.PathLike)):
        ds = load_prepared(ds)
    prefixes = int(prefixes)
    if prefixes < 1:
        raise InputError(f"--prefixes {prefixes}: must be >= 1")
    if template not in TEMPLATES:
        raise InputError(f"--template {template!r}: unknown (have {', '.join(TEMPLATES)})")
    if has_user_rep(template) and prefixes > 1:
        raise InputError(f"--template {template}: each prefix sample has its own user representation at the "
                         f"start of the prompt, so prefix samples share no prompt tree; use --prefixes 1")
    views = [v for v in dict.fromkeys(views) if v != PREFIX_VIEW]
    views = [check_view(v) for v in views] + ([PREFIX_VIEW] if prefixes > 1 else [])
    auto_layers = isinstance(readout_layers, str)
    if auto_layers and readout_layers != "auto":
        raise InputError(f"--readout-layers {readout_layers!r}: expected layer numbers or 'auto'")
    readout_layers = () if auto_layers else tuple(sorted({int(x) for x in readout_layers}))
    if params is None and fi not in ("moment", "ridge"):
        raise InputError(f"--fi {fi!r}: expected 'moment' or 'ridge'")
    if store_dtype not in STORE_DTYPES:
        raise InputError(f"--store-dtype {store_dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
    if batch_tokens < 1 or chunk_prompts < 1:
        raise InputError("--batch-tokens and chunk size must be >= 1")
    verb = verb or default_verb(ds.stats)
    t0 = time.perf_counter()
    sas, sas_digest = load_teacher(sasrec)
    E = sas.item_embeddings().detach().float().cpu().numpy()
    if E.shape[0] != ds.n_items + 1:
        raise InputError(f"the CF-SRec teacher has {E.shape[0] - 1} items, the dataset {ds.n_items}: "
                         f"the checkpoint was trained on another dataset")
    if not isinstance(llm, LoadedLLM):
        llm = load_llm(llm, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    n_users = ds.n_users if max_users is None else min(int(max_users), ds.n_users)
    given = None
    if params is not None:
        given = read_linear_params(params, llm.d_llm, E.shape[1])
    prov = {
        "llmsrec_version": __version__,
        "model": llm.name,
        "model_weights_sha256": llm.weights_digest,
        "tokenizer_sha256": llm.tokenizer_digest,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "template_version": template,
        "template": template_text(template),
        "verb": verb,
        "history_window": int(history_window),
        "seed": int(seed),
        "dataset_sha256": ds.digest,
        "n_users": ds.n_users,
        "n_items": ds.n_items,
        "max_users": None if max_users is None else n_users,
        "sasrec_sha256": sas_digest,
        "f_I": (f"ridge alpha={ridge_alpha} from SASRec E to mean title-token input embedding"
                if fi == "ridge" else
                "moment-matched: PCA-whitened SASRec E onto the top principal axes of the input embeddings"),
    }
    if readout_layers or auto_layers:
        if auto_layers:
            readout_layers = default_layers(num_layers(llm))
        bad = [x for x in readout_layers if not 1 <= x <= num_layers(llm)]
        if bad:
            raise InputError(f"--readout-layers: layer {bad[0]} outside 1..{num_layers(llm)} of {llm.name}")
        prov["readout_layers"] = list(readout_layers)
    if prefixes > 1:
        prov["prefixes"] = prefixes
    if store_dtype != "float32":  # only when set: float32 caches keep their provenance
        prov["store_dtype"] = store_dtype
    if getattr(llm, "quantization", None):
        # only when set, so full-precision caches keep their provenance; an 8-bit run cannot
        # resume (or be mixed into) a full-precision cache or the reverse
        prov["quantization"] = llm.quantization
    if given is not None:
        prov["f_I"] = "given: linear f_I and token embeddings from a params file"
        prov["params_sha256"] = sha256_file(params)
    groups = ["items"] + [f"users/{v}" for v in views]
    return Job(ds=ds, sas=sas, E=E, llm=llm, out=Path(cache), views=views, n_users=n_users,
               given=given, prov=prov, groups=groups, history_window=int(history_window),
               verb=verb, seed=int(seed), fi=fi, ridge_alpha=ridge_alpha,
               batch_tokens=batch_tokens, chunk_prompts=chunk_prompts, force=force,
               attention_mask=attention_mask, progress=progress, log=log, on_chunk=on_chunk,
               t0=t0, readout_layers=readout_layers, prefixes=prefixes, template=template)


def setup_cache(w, job: Job, *, hidden: bool = True):
    """Write everything but the LLM states into the open cache writer ``w``.

    f_I and the two token vectors are the file's own when it has them (extending or
    resuming), else the params file's, else the ``fi`` fit on E and the token embeddings;
    then ``items/cf`` and, per view, ``cf``, ``target``, ``permutation``; with ``hidden``
    also the (zero) ``hidden`` datasets. Existing datasets are kept.

    Returns:
        ``((W, b, user_out, item_out), {view: ViewPrompts})`` with ``W`` float32
        ``(d_llm, d_cf)``, ``b``, ``user_out``, ``item_out`` float32 ``(d_llm,)``.
    """
    ds, llm, E, given = job.ds, job.llm, job.E, job.given
    if w.has("params/f_I/weight"):
        W, b = w.read("params/f_I/weight"), w.read("params/f_I/bias")
        user_out, item_out = w.read("params/tokens/user_out"), w.read("params/tokens/item_out")
    elif given is not None:
        W, b = given["f_I/weight"], given["f_I/bias"]
        user_out, item_out = given["tokens/user_out"], given["tokens/item_out"]
    else:
        emb = llm.embed.numpy()
        if job.fi == "ridge":
            y = title_embedding_means(llm.tokenizer, emb, ds.titles)
            W, b = fit_ridge(E[1:], y[1:], alpha=job.ridge_alpha)
        else:
            W, b = fit_moment_matched(E[1:], emb)
        user_out = item_out = emb.mean(0).astype(np.float32)
    if not w.has("params/f_I/weight"):
        w.require("params/f_I/weight", W)
        w.require("params/f_I/bias", b)
        w.require("params/tokens/user_out", user_out)
        w.require("params/tokens/item_out", item_out)
        w.update_provenance({"f_I_sha256": digest_arrays(W, b),
                             "token_embeddings_sha256": digest_arrays(user_out, item_out)})
    w.require("items/cf", E.astype(np.float32))
    if hidden:
        w.require("items/hidden", shape=(ds.n_items + 1, llm.d_llm), dtype=np.float32)
        _require_readouts(w, job, "items", ds.n_items + 1, 1)
    users = range(1, job.n_users + 1)
    vps = {}
    for v in job.views:
        vp = view_prompts(job, v)
        g = f"users/{v}"
        if isinstance(vp, PrefixPrompts):
            n_rows = ds.n_users * vp.k + 1
            rows = [r for r in range(1, n_rows) if vp.targets[r] > 0]
            cf = np.zeros((n_rows, E.shape[1]), dtype=np.float32)
            cf[rows] = teacher_user_reps(job.sas, vp.cf_inputs, rows)
            w.require(f"{g}/cf", cf)
            w.require(f"{g}/target", vp.targets)
            w.require(f"{g}/uid", vp.uids)
        else:
            n_rows = ds.n_users + 1
            cf = np.zeros((n_rows, E.shape[1]), dtype=np.float32)
            cf[1 : job.n_users + 1] = teacher_user_reps(job.sas, vp.cf_inputs, list(users))
            w.require(f"{g}/cf", cf)
            tgt = vp.targets.copy()
            tgt[job.n_users + 1 :] = 0
            w.require(f"{g}/target", tgt)
            if vp.permutation is not None:
                w.require(f"{g}/permutation", vp.permutation)
        if hidden:
            w.require(f"{g}/hidden", shape=(n_rows, llm.d_llm), dtype=np.float32)
            _require_readouts(w, job, g, n_rows, job.history_window)
        vps[v] = vp
    return (W, b, user_out, item_out), vps


def _require_readouts(w, job: Job, g: str, n_rows: int, n_slots: int) -> None:
    """The readout datasets of group ``g`` (docs/cache-schema.md)."""
    if not job.readout_layers:
        return
    nl, d = len(job.readout_layers), job.llm.d_llm
    w.require(f"{g}/out_layers", shape=(n_rows, nl, d), dtype=np.float32)
    w.require(f"{g}/slots", shape=(n_rows, n_slots, nl, d), dtype=np.float32)
    w.require(f"{g}/n_slots", shape=(n_rows,), dtype=np.int64)


def view_prompts(job: Job, view: str) -> ViewPrompts | PrefixPrompts:
    """The user prompts of ``view`` for users 1..n_users (``build_view``; the prefix
    view: ``build_prefix_view``)."""
    if view == PREFIX_VIEW:
        return build_prefix_view(job.ds, job.prefixes, history_window=job.history_window, verb=job.verb,
                                 users=range(1, job.n_users + 1), version=job.template)
    return build_view(job.ds, view, history_window=job.history_window, verb=job.verb,
                      seed=job.seed, users=range(1, job.n_users + 1), version=job.template)


def group_prompts(job: Job, group: str, vp: ViewPrompts | None = None):
    """``(rows, tokenized)`` of a group: the rows (iids or uids, int64, ascending) that get
    a prompt and their ``TokenizedPrompt`` s. ``vp``: the view's prompts if already built."""
    if group == "items":
        ds = job.ds
        item_prompts = [item_prompt(ds.titles, i, version=job.template) for i in range(1, ds.n_items + 1)]
        return (np.arange(1, ds.n_items + 1),
                tokenize_prompts(job.llm, item_prompts, ITEM_OUT))
    vp = vp if vp is not None else view_prompts(job, group.removeprefix("users/"))
    if isinstance(vp, PrefixPrompts):
        users = [u for u in range(1, job.n_users + 1) if vp.prompts[u]]
        rows = np.asarray(users, dtype=np.int64)
        return rows, [tokenize_tree(job.llm, vp.prompts[u], USER_OUT) for u in users]
    rows = np.asarray([u for u in range(1, job.n_users + 1) if vp.prompts[u] is not None],
                      dtype=np.int64)
    return rows, tokenize_prompts(job.llm, [_with_user_rep(vp.prompts[u], job.ds.n_items, u) for u in rows],
                                  USER_OUT)


def _with_user_rep(p: Prompt, n_items: int, uid: int) -> Prompt:
    """The prompt with its user-representation soft item pointing at row ``N+1+uid`` of the
    group's extended soft table (``run_plan``: f_I of the view's cached O_u)."""
    if not (p.soft_items == USER_REP_ITEM).any():
        return p
    return dataclasses.replace(p, soft_items=np.where(p.soft_items == USER_REP_ITEM, n_items + 1 + uid,
                                                      p.soft_items))


def prefix_sample_rows(vp: PrefixPrompts, users: np.ndarray) -> list[np.ndarray]:
    """The dataset rows of each user's prefix samples (sample 0 first), for ``users``."""
    out = []
    for u in users:
        r = 1 + (int(u) - 1) * vp.k + np.arange(vp.k)
        out.append(r[vp.targets[r] > 0])
    return out


def plan_chunks(w, group: str, toks: list, chunk_prompts: int) -> list:
    """Sort a group's prompts by length (then row), cut chunks of ``chunk_prompts``, create
    or check ``/progress/<group>``; return ``[(group, chunk, prompt indices)]`` not done."""
    lengths = np.asarray([len(t) for t in toks])
    order = (np.lexsort((np.arange(len(toks)), lengths)) if len(toks)
             else np.zeros(0, dtype=np.int64))
    chunks = [order[s : s + chunk_prompts] for s in range(0, len(order), chunk_prompts)]
    done = w.require_progress(group, len(chunks), chunk_prompts)
    return [(group, c, idx) for c, idx in enumerate(chunks) if not done[c]]


def run_plan(w, job: Job, plan: list, work: dict, fixed, *, progress: bool | None = None,
             sample_rows: dict | None = None) -> dict:
    """Run the planned chunks through the frozen LLM and write them to ``w``.

    Args:
        plan: ``[(group, chunk, prompt indices)]`` from :func:`plan_chunks`.
        work: group -> ``(rows, tokenized, hidden dataset name, first row)``; prompt k of
            the group is written to row ``rows[k] - first row`` of the dataset.
        fixed: ``(W, b, user_out, item_out)`` (see :func:`setup_cache`).
        sample_rows: group -> one int64 array per prompt: the dataset rows of its samples
            (prompt trees of the prefix view); groups not in it have one sample per prompt.

    Returns:
        ``{"prompts", "real", "padded", "wall"}``: prompts and real / padded tokens run,
        forward wall seconds.
    """
    llm = job.llm
    W, b, user_out, item_out = fixed
    dev = llm.device
    soft = torch.from_numpy(job.E @ W.T + b).to(device=dev, dtype=llm.dtype)
    outs = {ITEM_OUT: torch.from_numpy(item_out).to(dev, llm.dtype),
            USER_OUT: torch.from_numpy(user_out).to(dev, llm.dtype)}
    total_real = sum(len(work[g][1][i]) for g, _, idx in plan for i in idx)
    n_prompts = sum(len(idx) for _, _, idx in plan)
    real = padded = done_prompts = 0
    t1 = time.perf_counter()
    show = job.progress if progress is None else progress
    bar = tqdm(total=total_real, unit="tok", unit_scale=True, disable=not show,
               desc="precompute", dynamic_ncols=True)
    sample_rows = sample_rows or {}
    soft_of = {}
    if has_user_rep(job.template):  # f_I(O_u) rows after the items' (``_with_user_rep``)
        for g in {g for g, _, _ in plan if g != "items"}:
            cf = w.read(f"{g}/cf")
            soft_of[g] = torch.cat([soft, torch.from_numpy(cf @ W.T + b).to(device=dev, dtype=llm.dtype)])
    for g, c, idx in plan:
        rows, toks, name, first = work[g]
        out_vec = outs[ITEM_OUT if g == "items" else USER_OUT]
        soft_g = soft_of.get(g, soft)
        lengths = np.asarray([len(toks[i]) for i in idx])
        res = np.empty((len(idx), llm.d_llm), dtype=np.float32)
        readout = bool(job.readout_layers) or g in sample_rows
        parts: dict[str, list] = {}
        for bb in make_batches(lengths, np.arange(len(idx)), job.batch_tokens):
            batch = [toks[idx[k]] for k in bb]
            if readout:
                r = forward_readouts(llm, [t if isinstance(t, TreePrompt) else as_tree(t) for t in batch], soft_g,
                                     out_vec, job.readout_layers, 1 if g == "items" else job.history_window)
                for key, val in r.items():
                    parts.setdefault(key, []).append(val)
            else:
                res[bb] = forward_batch(llm, batch, soft_g, out_vec,
                                        attention_mask=job.attention_mask).numpy()
            n_real = int(lengths[bb].sum())
            real += n_real
            padded += int(lengths[bb].max()) * len(bb)
            done_prompts += len(bb)
            bar.update(n_real)
            bar.set_postfix_str(f"prompts {done_prompts}/{n_prompts}", refresh=False)
        if readout:
            # batches are consecutive runs of idx, so the samples come in idx order
            out_rows = (np.concatenate([sample_rows[g][i] for i in idx]) if g in sample_rows
                        else rows[idx]) - first
            w.write_rows(name, out_rows, np.concatenate(parts["hidden"]))
            if job.readout_layers:
                grp = name.rsplit("/", 1)[0]
                for key in ("out_layers", "slots", "n_slots"):
                    w.write_rows(f"{grp}/{key}", out_rows, np.concatenate(parts[key]))
        else:
            w.write_rows(name, rows[idx] - first, res)
        w.mark_done(g, c)
        if job.on_chunk is not None:
            job.on_chunk(g, c)
    bar.close()
    return {"prompts": n_prompts, "real": real, "padded": padded,
            "wall": time.perf_counter() - t1}


def summary(stats: dict, job: Job, what: str = "precompute") -> str:
    """The one-line throughput summary (prompts, real tokens, padding, forward wall)."""
    real, padded, wall = stats["real"], stats["padded"], stats["wall"]
    pad_frac = 1 - real / padded if padded else 0.0
    return (f"{what}: {stats['prompts']} prompts, {real} real tokens, padding {pad_frac:.1%}, "
            f"wall {wall:.1f} s ({real / max(wall, 1e-9):.0f} real tokens/s; "
            f"total with loading {time.perf_counter() - job.t0:.1f} s) -> {job.out}")
