"""``precompute``: every item prompt and every user prompt of the asked views through the
frozen LLM once, into the HDF5 cache (cache mode; the schema: docs/cache-schema.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from llmsrec.cache.store import CacheWriter
from llmsrec.data.views import PREFIX_VIEW
from llmsrec.defaults import HISTORY_WINDOW, LLM, PRECOMPUTE
from llmsrec.distributed import dist_env
from llmsrec.errors import InputError
from llmsrec.precompute import shards
from llmsrec.precompute.job import (
    Job, group_prompts, plan_chunks, prefix_sample_rows, prepare_job, run_plan, setup_cache, summary,
)
from llmsrec.precompute.llm import LoadedLLM
from llmsrec.precompute.prompts import TEMPLATE_VERSION, has_user_rep
from llmsrec.precompute.shards import remove_unused_shards

DEFAULT_VIEWS = ("train", "valid", "test", "test-shuffled")
ASSEMBLE_MODES = ("copy", "virtual")


def precompute(
    ds,
    sasrec,
    cache,
    *,
    llm: str | LoadedLLM = LLM["llm"],
    views=DEFAULT_VIEWS,
    history_window: int = HISTORY_WINDOW,
    verb: str | None = None,
    batch_tokens: int = LLM["batch_tokens"],
    chunk_prompts: int = PRECOMPUTE["chunk_prompts"],
    device: str = "cpu",
    dtype: str | None = None,
    seed: int = 0,
    force: bool = False,
    max_users: int | None = None,
    ridge_alpha: float = 1e-3,
    fi: str = LLM["fi"],
    params: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    num_threads: int | None = None,
    attention_mask: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_chunk: Callable[[str, int], None] | None = None,
    assemble: str = PRECOMPUTE["assemble"],
    readout_layers=(),
    prefixes: int = 1,
    template: str = TEMPLATE_VERSION,
    store_dtype: str = "float32",
) -> Path:
    """Fill (or extend, or resume) the HDF5 cache of frozen-LLM states.

    Under ``torchrun`` with ``WORLD_SIZE > 1`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set)
    every process calls this with the same arguments: the prompts are sharded across the
    processes, each writes ``<cache>.shards/rank<r>-of-<n>.h5``, and rank 0 assembles
    ``cache`` (see ``llmsrec.precompute.shards``; same layout and provenance as one
    process, values equal up to float rounding of other batch shapes). ``llmsrec
    precompute --nproc N`` starts such a run.

    Args:
        ds: a ``PreparedDataset`` or its folder.
        sasrec: the teacher: a CF-SRec checkpoint folder (SASRec in the paper; any model of
            ``llmsrec.cfsrec.MODELS``), or such a module (for tests).
        cache: the cache file to write (built as ``<cache>.tmp``, renamed when complete).
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
            ``ridge`` (``fit_ridge``: a ridge regression to the mean title embeddings).
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
            done (tests use it to simulate a kill); in a sharded run the index is the
            chunk's within this process's shard.
        assemble: sharded runs only: ``copy`` (default) or ``virtual``, how rank 0 turns
            the shards into ``cache`` (``llmsrec.precompute.shards.assemble_shards``).
        readout_layers: layers (``1..n_layers``) whose states are also cached: at the
            out token (``out_layers``) and at every ``[HistoryEmb]`` slot (``slots``; the
            item's own soft token in an item prompt), see ``llmsrec.precompute.readouts``;
            ``"auto"``: ``readouts.default_layers`` of the model's depth. Empty (default):
            the paper's last-layer out-token state only. Recorded in the
            provenance as ``readout_layers`` when set.
        prefixes: K; K > 1 adds the view ``train-prefix`` of K prefix training samples
            per user (paper Appendix F.5), run as prompt trees (one forward per user).
            Recorded in the provenance as ``prefixes`` when > 1.
        template: the prompt template version (``llmsrec.precompute.prompts.TEMPLATES``):
            ``llmsrec-prompt-v1`` (Table 2 (b), default) or ``llmsrec-prompt-v1-userrep``
            (paper Table 11: the teacher's O_u of the same input, through f_I, as a soft
            token before the history; not with ``prefixes`` > 1).
        store_dtype: how the states are stored: ``float32`` (default) or ``float16`` (half the
            size; recorded as ``store_dtype`` in the provenance; readers get float32 back).

    Returns:
        ``Path(cache)``.

    Raises:
        InputError: bad view names, missing inputs, provenance mismatch (without
            ``force``), prompts too long for the model, device out of memory; sharded:
            a ``cuda:N`` device or fewer devices than processes, a bad ``assemble``
            (``virtual`` in one process);
            ``readout_layers`` or ``prefixes`` in a sharded run (single process only).
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    if assemble not in ASSEMBLE_MODES:
        raise InputError(f"--assemble {assemble!r}: expected 'copy' or 'virtual'")
    ctx = None
    env = dist_env()
    if assemble == "virtual" and (env is None or env[1] == 1):
        raise InputError("--assemble virtual: only for several processes (--nproc N or torchrun); "
                         "one process writes --out directly")
    if env is not None and env[1] > 1:
        if readout_layers or prefixes > 1 or PREFIX_VIEW in views or has_user_rep(template):
            raise InputError("--readout-layers / --prefixes / a user-representation --template: a "
                             "single-process precompute only for now; with several processes pass "
                             "--readout-layers none --prefixes 1 (the paper's heads then: train --paper-settings)")

        ctx = shards.join(device)  # process group first: it picks this process's device
        device = ctx.device
    try:
        job = prepare_job(ds, sasrec, cache, llm=llm, views=views, history_window=history_window,
                       verb=verb, batch_tokens=batch_tokens, chunk_prompts=chunk_prompts,
                       device=device, dtype=dtype, seed=seed, force=force, max_users=max_users,
                       ridge_alpha=ridge_alpha, fi=fi, params=params,
                       trust_remote_code=trust_remote_code, num_threads=num_threads,
                       attention_mask=attention_mask, progress=progress, log=log,
                       on_chunk=on_chunk, readout_layers=readout_layers, prefixes=prefixes, template=template,
                       store_dtype=store_dtype)
        if ctx is not None:
            return shards.run_sharded(ctx, job, assemble=assemble)
        return _run_single(job)
    finally:
        if ctx is not None:
            ctx.leave()


def _run_single(job: Job) -> Path:
    """One process: the whole cache through ``CacheWriter`` (the original path)."""
    cache, log = job.out, job.log

    w = CacheWriter(cache, job.prov, force=job.force, log=log)
    if not w.needs(job.groups):
        log(f"{cache}: already complete for items and views {', '.join(job.views)}")
        remove_unused_shards(cache, log)
        return Path(cache)
    try:
        fixed, vps = setup_cache(w, job)
        work = {}  # group -> (rows, tokenized, hidden dataset name, first row)
        samples = {}
        for g in job.groups:
            v = g.removeprefix("users/")
            rows, toks = group_prompts(job, g, vps.get(v))
            work[g] = (rows, toks, f"{g}/hidden", 0)
            if v == PREFIX_VIEW:
                samples[g] = prefix_sample_rows(vps[v], rows)
                log(f"{g}: {len(toks)} prompt trees, {sum(len(t) for t in toks)} tokens "
                    f"(one forward per sample: {sum(t.sample_tokens for t in toks)})")
        plan = []  # (group, chunk index, prompt indices)
        for g, (rows, toks, _, _) in work.items():
            plan += plan_chunks(w, g, toks, job.chunk_prompts)
        w.flush()  # setup complete: from here on only raw data and progress flags change
        stats = run_plan(w, job, plan, work, fixed, sample_rows=samples)
        w.finish()
    except BaseException:
        w.discard_unstarted()  # no chunk done: leave no .tmp behind (e.g. a prompt too long)
        raise
    finally:
        w.close()
    log(summary(stats, job))
    remove_unused_shards(cache, log)  # e.g. a killed --nproc run's shards, finished by one process
    return Path(cache)
