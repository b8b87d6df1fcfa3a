"""``precompute``: every item prompt and every user prompt of the asked views through the
frozen LLM once, into the HDF5 cache (DESIGN.md, "The cache-first idea, exactly")."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from llmsrec.errors import InputError
from llmsrec.precompute.llm import ITEM_OUT, USER_OUT, LoadedLLM, load_llm, sha256_file
from llmsrec.precompute.prompts import (
    TEMPLATE_VERSION, ViewPrompts, build_view, check_view, default_verb, item_prompt,
    template_text,
)

DEFAULT_VIEWS = ("train", "valid", "test", "test-shuffled")


def _digest_arrays(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _load_sasrec(sasrec):
    """(model in eval mode, digest) from a checkpoint folder or a module.

    Any CF-SRec of ``llmsrec.cfsrec.MODELS`` can be the teacher (SASRec in the paper):
    precompute only needs O_u (``user_representation``) and E (``item_embeddings``).
    """
    if isinstance(sasrec, (str, os.PathLike)):
        from llmsrec.cfsrec import load_cfsrec

        model = load_cfsrec(sasrec)
        return model, sha256_file(Path(sasrec) / "model.safetensors")
    model = sasrec.eval()
    state = model.state_dict()
    return model, _digest_arrays(*(state[k].detach().cpu().numpy() for k in sorted(state)))


def _sasrec_users(model, inputs: list, rows: list[int], batch: int = 512) -> np.ndarray:
    """Teacher O_u (float32 ``(len(rows), d)``) for ``inputs[r]``; empty inputs -> zeros."""
    import torch

    from llmsrec.cfsrec import pad_left

    d = model.item_embeddings().shape[1]
    out = np.zeros((len(rows), d), dtype=np.float32)
    keep = [k for k, r in enumerate(rows) if len(inputs[r])]
    dev = model.item_embeddings().device
    with torch.inference_mode():
        for s in range(0, len(keep), batch):
            ks = keep[s : s + batch]
            seqs = pad_left([inputs[rows[k]] for k in ks], model.config.maxlen).to(dev)
            out[ks] = model.user_representation(seqs).float().cpu().numpy()
    return out


def precompute(
    ds,
    sasrec,
    out_h5,
    *,
    llm: str | LoadedLLM = "smollm2-135m",
    views=DEFAULT_VIEWS,
    history_window: int = 10,
    verb: str | None = None,
    batch_tokens: int = 4096,
    chunk_prompts: int = 64,
    device: str = "cpu",
    dtype: str | None = None,
    seed: int = 0,
    force: bool = False,
    max_users: int | None = None,
    ridge_alpha: float = 1e-3,
    fi: str = "moment",
    params: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    num_threads: int | None = None,
    attention_mask: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_chunk: Callable[[str, int], None] | None = None,
) -> Path:
    """Fill (or extend, or resume) the HDF5 cache of frozen-LLM states.

    Args:
        ds: a ``PreparedDataset`` or its folder.
        sasrec: the teacher: a CF-SRec checkpoint folder (SASRec in the paper; any model of
            ``llmsrec.cfsrec.MODELS``), or such a module (for tests).
        out_h5: the cache file (built as ``<out_h5>.tmp``, renamed when complete).
        llm: ``smollm2-135m``, a local HF folder, or a ``LoadedLLM``.
        views: user views to compute (``train valid test`` and their ``-shuffled``);
            items are always computed.
        history_window: W, the last W input items shown in a user prompt.
        verb: "purchases" / "watched movies"; None = by dataset (``default_verb``).
        batch_tokens: token budget of a padded batch (``B * max_len``).
        chunk_prompts: prompts per resumable chunk (the unit of ``/progress``).
        device, dtype: ``cpu|cuda|hpu``; ``fp32|bf16|fp16`` (None = fp32 on CPU, bf16 else).
        seed: seed of the shuffled views' permutations.
        force: rebuild even if an existing cache has another provenance.
        max_users: only users 1..max_users get user prompts (other rows stay zero);
            recorded in the provenance. None = all users.
        fi: the fixed f_I of cache mode: ``moment`` (default; ``fit_moment_matched``:
            keeps all of E, soft tokens with the token embeddings' mean/covariance) or
            ``ridge`` (DESIGN.md's first choice, ``fit_ridge`` to mean title embeddings).
        ridge_alpha: relative ridge strength of the ``ridge`` f_I fit.
        params: a params file (``llmsrec.precompute.params``: linear f_I + the two token
            vectors, e.g. written by ``llmsrec refine-tokens`` or an e2e run) used instead
            of the fit and the mean-embedding tokens; ``fi``/``ridge_alpha`` are then
            unused. The provenance gets ``params_sha256`` (the file's digest) and an
            ``f_I`` text naming it; without ``params`` the provenance keys are unchanged.
        num_threads: ``torch.set_num_threads`` for the forward (None = leave as is).
        attention_mask: pass the padding mask to the model (right padding is exact
            without it under a causal mask).
        progress: show the tqdm bar (prompts, real tokens/s, ETA).
        log: one-line messages (default: print to stderr).
        on_chunk: called as ``on_chunk(group, chunk_index)`` after each chunk is marked
            done (tests use it to simulate a kill).

    Returns:
        ``Path(out_h5)``.

    Raises:
        InputError: bad view names, missing inputs, provenance mismatch (without
            ``force``), prompts too long for the model, device out of memory.
    """
    import torch
    from tqdm.auto import tqdm

    from llmsrec import __version__
    from llmsrec.cache.store import CacheWriter
    from llmsrec.precompute.engine import forward_batch, make_batches, tokenize_prompts
    from llmsrec.precompute.fit import fit_moment_matched, fit_ridge, title_embedding_means

    log = log or (lambda m: print(m, file=sys.stderr))
    if num_threads:
        torch.set_num_threads(num_threads)
    if isinstance(ds, (str, os.PathLike)):
        from llmsrec.data import load_prepared

        ds = load_prepared(ds)
    views = list(dict.fromkeys(check_view(v) for v in views))
    if params is None and fi not in ("moment", "ridge"):
        raise InputError(f"--fi {fi!r}: expected 'moment' or 'ridge'")
    if batch_tokens < 1 or chunk_prompts < 1:
        raise InputError("--batch-tokens and chunk size must be >= 1")
    verb = verb or default_verb(ds.stats)
    t0 = time.perf_counter()
    sas, sas_digest = _load_sasrec(sasrec)
    E = sas.item_embeddings().detach().float().cpu().numpy()
    if E.shape[0] != ds.n_items + 1:
        raise InputError(f"the CF-SRec teacher has {E.shape[0] - 1} items, the dataset {ds.n_items}: "
                         f"the checkpoint was trained on another dataset")
    if not isinstance(llm, LoadedLLM):
        llm = load_llm(llm, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    n_users = ds.n_users if max_users is None else min(int(max_users), ds.n_users)
    given = None
    if params is not None:
        from llmsrec.precompute.params import read_linear_params

        given = read_linear_params(params, llm.d_llm, E.shape[1])
    prov = {
        "llmsrec_version": __version__,
        "model": llm.name,
        "model_weights_sha256": llm.weights_digest,
        "tokenizer_sha256": llm.tokenizer_digest,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "template_version": TEMPLATE_VERSION,
        "template": template_text(TEMPLATE_VERSION),
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
    if given is not None:
        prov["f_I"] = "given: linear f_I and token embeddings from a params file"
        prov["params_sha256"] = sha256_file(params)
    groups = ["items"] + [f"users/{v}" for v in views]
    w = CacheWriter(out_h5, prov, force=force, log=log)
    if not w.needs(groups):
        log(f"{out_h5}: already complete for items and views {', '.join(views)}")
        return Path(out_h5)
    try:
        # f_I and the two token vectors: reuse the file's when extending/resuming
        if w.has("params/f_I/weight"):
            W, b = w.read("params/f_I/weight"), w.read("params/f_I/bias")
            user_out, item_out = w.read("params/tokens/user_out"), w.read("params/tokens/item_out")
        elif given is not None:
            W, b = given["f_I/weight"], given["f_I/bias"]
            user_out, item_out = given["tokens/user_out"], given["tokens/item_out"]
        else:
            emb = llm.embed.numpy()
            if fi == "ridge":
                y = title_embedding_means(llm.tokenizer, emb, ds.titles)
                W, b = fit_ridge(E[1:], y[1:], alpha=ridge_alpha)
            else:
                W, b = fit_moment_matched(E[1:], emb)
            user_out = item_out = emb.mean(0).astype(np.float32)
        if not w.has("params/f_I/weight"):
            w.require("params/f_I/weight", W)
            w.require("params/f_I/bias", b)
            w.require("params/tokens/user_out", user_out)
            w.require("params/tokens/item_out", item_out)
            w.update_provenance({"f_I_sha256": _digest_arrays(W, b),
                                 "token_embeddings_sha256": _digest_arrays(user_out, item_out)})
        w.require("items/cf", E.astype(np.float32))
        w.require("items/hidden", shape=(ds.n_items + 1, llm.d_llm), dtype=np.float32)

        # prompts of every group; rows 1.. of the group's /hidden
        work = {}  # group -> (rows, tokenized, hidden dataset name)
        item_prompts = [item_prompt(ds.titles, i) for i in range(1, ds.n_items + 1)]
        work["items"] = (np.arange(1, ds.n_items + 1),
                         tokenize_prompts(llm, item_prompts, ITEM_OUT), "items/hidden")
        users = range(1, n_users + 1)
        for v in views:
            vp: ViewPrompts = build_view(ds, v, history_window=history_window, verb=verb,
                                         seed=seed, users=users)
            g = f"users/{v}"
            cf = np.zeros((ds.n_users + 1, E.shape[1]), dtype=np.float32)
            cf[1 : n_users + 1] = _sasrec_users(sas, vp.cf_inputs, list(users))
            w.require(f"{g}/cf", cf)
            tgt = vp.targets.copy()
            tgt[n_users + 1 :] = 0
            w.require(f"{g}/target", tgt)
            if vp.permutation is not None:
                w.require(f"{g}/permutation", vp.permutation)
            w.require(f"{g}/hidden", shape=(ds.n_users + 1, llm.d_llm), dtype=np.float32)
            rows = np.asarray([u for u in users if vp.prompts[u] is not None], dtype=np.int64)
            work[g] = (rows, tokenize_prompts(llm, [vp.prompts[u] for u in rows], USER_OUT),
                       f"{g}/hidden")

        plan = []  # (group, chunk index, prompt indices)
        for g, (rows, toks, _) in work.items():
            lengths = np.asarray([len(t) for t in toks])
            order = np.lexsort((rows, lengths)) if len(rows) else np.zeros(0, dtype=np.int64)
            chunks = [order[s : s + chunk_prompts] for s in range(0, len(order), chunk_prompts)]
            done = w.require_progress(g, len(chunks), chunk_prompts)
            plan += [(g, c, idx) for c, idx in enumerate(chunks) if not done[c]]
        w.flush()  # setup complete: from here on only raw data and progress flags change

        dev = llm.device
        soft = torch.from_numpy(E @ W.T + b).to(device=dev, dtype=llm.dtype)
        outs = {ITEM_OUT: torch.from_numpy(item_out).to(dev, llm.dtype),
                USER_OUT: torch.from_numpy(user_out).to(dev, llm.dtype)}
        total_real = sum(len(work[g][1][i]) for g, _, idx in plan for i in idx)
        n_prompts = sum(len(idx) for _, _, idx in plan)
        real = padded = done_prompts = 0
        t1 = time.perf_counter()
        bar = tqdm(total=total_real, unit="tok", unit_scale=True, disable=not progress,
                   desc="precompute", dynamic_ncols=True)
        for g, c, idx in plan:
            rows, toks, name = work[g]
            out_vec = outs[ITEM_OUT if g == "items" else USER_OUT]
            lengths = np.asarray([len(toks[i]) for i in idx])
            res = np.empty((len(idx), llm.d_llm), dtype=np.float32)
            for bb in make_batches(lengths, np.arange(len(idx)), batch_tokens):
                batch = [toks[idx[k]] for k in bb]
                res[bb] = forward_batch(llm, batch, soft, out_vec,
                                        attention_mask=attention_mask).numpy()
                n_real = int(lengths[bb].sum())
                real += n_real
                padded += int(lengths[bb].max()) * len(bb)
                done_prompts += len(bb)
                bar.update(n_real)
                bar.set_postfix_str(f"prompts {done_prompts}/{n_prompts}", refresh=False)
            w.write_rows(name, rows[idx], res)
            w.mark_done(g, c)
            if on_chunk is not None:
                on_chunk(g, c)
        bar.close()
        wall = time.perf_counter() - t1
        w.finish()
    finally:
        w.close()
    pad_frac = 1 - real / padded if padded else 0.0
    log(f"precompute: {n_prompts} prompts, {real} real tokens, padding {pad_frac:.1%}, "
        f"wall {wall:.1f} s ({real / max(wall, 1e-9):.0f} real tokens/s; "
        f"total with loading {time.perf_counter() - t0:.1f} s) -> {out_h5}")
    return Path(out_h5)
