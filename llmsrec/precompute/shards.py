"""Precompute in several processes under ``torchrun``: shard the prompts, assemble one cache.

``torchrun --standalone --nproc-per-node N -m llmsrec precompute ...`` (or ``llmsrec
precompute --nproc N``, which starts exactly that through ``torch.distributed.run``) runs
:func:`llmsrec.precompute.precompute` in N processes. Each joins the process group of its
device (``llmsrec.distributed.init_distributed``: gloo on CPU, nccl on CUDA with process k
on ``cuda:k``, hccl on Gaudi) and a gloo group for coordination (CPU tensors only, a long
timeout, since a rank may wait hours for a slower one). Then:

1. Rank 0 opens the final cache (``CacheWriter``, same provenance checks as one process),
   writes everything that is not an LLM state (f_I and the two token vectors, SASRec E and
   O_u, targets, permutations), and broadcasts f_I, the token vectors and which groups
   (``items``, ``users/<view>``) still need states. Nothing to do -> every rank returns.
2. Every rank tokenizes each needed group's prompts and takes its share
   (:func:`split_rows`): the rows (iids / uids, ascending) are cut into N contiguous
   blocks of about equal token count, so no row is computed twice or missed, the
   assignment depends only on the prompts and N, and each shard is one slab of rows.
   Rank r writes them to ``<out>.shards/rank<r>-of-<N>.h5`` through its own
   ``CacheWriter`` (built as ``.tmp``, renamed when complete) with the cache's provenance
   (f_I and token digests included): ``/<group>/rows`` int64 ``(n_r,)`` the rows it owns,
   ``/<group>/hidden`` float32 ``(rows[-1] - rows[0] + 1, d_llm)`` (row k is row
   ``rows[0] + k`` of the cache; rows without a prompt stay zero) and
   ``/progress/<group>`` over its own length-sorted chunks. A killed run is resumed by
   rerunning the same command with the same N: complete shards are skipped and each
   unfinished one redoes only the chunks not marked done.
3. After a barrier rank 0 checks the shards (same provenance, complete, rows of all ranks
   = the group's prompt rows, each once) and assembles ``<out>``
   (:func:`assemble_shards`), marking every group done with one-process chunking, so the file
   is indistinguishable in layout from a one-process cache and a later one-process run
   can extend it. A second barrier keeps the other ranks until the cache exists.

``--assemble copy`` (the default) copies the shards' rows into ordinary datasets and then
deletes the shards: the cache stays one self-contained file that can be moved, copied to
another machine or extended like any other, at the price of writing the states twice
(seconds per GB). ``--assemble virtual`` makes each ``hidden`` dataset an HDF5 virtual
dataset over the shard files (``h5py.VirtualLayout``, one slab per shard, file names
relative to the cache's folder): no copy, but ``<out>.shards/`` must stay beside the
cache (``open_cache`` refuses the file when a shard is missing or belongs to another cache).
Whenever a cache is complete (any process count, one process included), the shard files
in ``<out>.shards/`` it does not read are deleted (:func:`remove_unused_shards`), e.g. the
unfinished shards of a killed run with another process count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist

from llmsrec.atomic import digest_arrays
from llmsrec.cache.store import CacheWriter, group_complete, provenance_diff, read_provenance, virtual_source_files
from llmsrec.defaults import PRECOMPUTE
from llmsrec.distributed import check_nproc, dist_env, init_distributed, local_device, shutdown_distributed
from llmsrec.errors import InputError
from llmsrec.precompute.job import group_prompts, plan_chunks, run_plan, setup_cache, summary

#: timeout of the coordination group: ranks wait at barriers for the slowest shard
COORD_TIMEOUT = timedelta(days=7)
_COPY_BLOCK = 4096  # rows per copied block when assembling with --assemble copy


def shard_dir(out) -> Path:
    """The folder of a cache's shards: ``<out>.shards`` beside ``<out>``."""
    out = Path(out)
    return out.with_name(out.name + ".shards")


def shard_path(out, rank: int, world: int) -> Path:
    """Shard file of ``rank`` in a ``world``-process run: ``<out>.shards/rank<r>-of-<n>.h5``."""
    return shard_dir(out) / f"rank{rank}-of-{world}.h5"


_SHARD_NAME = re.compile(r"rank\d+-of-\d+\.h5(\.tmp)?")


def remove_unused_shards(out, log) -> list[str]:
    """After ``out`` is complete: delete the shard files in ``<out>.shards/`` that ``out`` does
    not read, then the folder if it is empty.

    A shard file is a ``rank<r>-of-<n>.h5`` or an unfinished ``rank<r>-of-<n>.h5.tmp`` (other
    files are left alone). ``out`` reads a shard only through the virtual datasets of an
    ``--assemble virtual`` run, so a copied or one-process cache keeps none, and a virtual
    one keeps exactly the shards it reads; left-overs of a run with another process count
    (e.g. a killed ``--nproc 2`` run finished with ``--nproc 3`` or one process) go.

    Args:
        out: the complete cache file.
        log: called with one line naming the removed files (not called when none).

    Returns:
        the names of the removed files.
    """
    folder = shard_dir(out)
    if not folder.is_dir():
        return []
    with h5py.File(out, "r") as f:
        used = {p.resolve() for p in virtual_source_files(f, Path(out))}
    removed = []
    for p in sorted(folder.iterdir()):
        if _SHARD_NAME.fullmatch(p.name) and p.is_file() and p.resolve() not in used:
            p.unlink()
            removed.append(p.name)
    try:
        folder.rmdir()
        gone = True
    except OSError:  # shards the cache reads, or files that are not ours
        gone = False
    if removed:
        log(f"removed {len(removed)} shard file(s) {out} does not use from {folder}"
            f"{' (and the folder)' if gone else ''}: {', '.join(removed)}")
    return removed


def split_rows(lengths, world: int) -> np.ndarray:
    """Cut prompts (in row order) into ``world`` contiguous blocks of about equal tokens.

    Prompt k goes to block ``floor(world * (2 c_k - l_k) / (2 T))`` where ``l_k`` is its
    token count, ``c_k`` the cumulative count up to and including it and ``T`` the total,
    i.e. the block in which its middle token falls (integer arithmetic: the same on every
    rank and machine).

    Args:
        lengths: int ``(n,)`` token counts, in row order.
        world: number of blocks (>= 1).

    Returns:
        int64 ``(world + 1,)`` boundaries: block r is prompts ``b[r] .. b[r+1]-1`` (possibly
        empty), ``b[0] = 0``, ``b[world] = n``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return np.zeros(world + 1, dtype=np.int64)
    cum = np.cumsum(lengths)
    total = max(int(cum[-1]), 1)
    block = np.minimum(world * (2 * cum - lengths) // (2 * total), world - 1)
    return np.searchsorted(block, np.arange(world + 1), side="left").astype(np.int64)


@dataclass
class Context:
    """This process's place in a sharded run (from :func:`join`).

    Attributes:
        rank, world, local_rank: from torchrun's environment.
        device: the device this process computes on (``cuda`` -> ``cuda:<local_rank>``).
        group: a gloo process group for barriers and small broadcasts (CPU tensors).
        owns: True when :func:`join` created the default process group (so
            :meth:`leave` destroys it).
    """

    rank: int
    world: int
    local_rank: int
    device: str
    group: object
    owns: bool

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def leave(self) -> None:
        """Destroy the process group if :func:`join` created it (no collective call), its
        worker threads joined before this returns (``shutdown_distributed``)."""
        if self.owns and dist.is_initialized():
            self.group = None  # our reference would keep the coordination group (and its threads) alive
            shutdown_distributed(barrier=False)


def join(device: str) -> Context:
    """Join the torchrun process group of ``device`` (``init_distributed``) and make the
    coordination group.

    Raises:
        InputError: not under torchrun, or ``device`` cannot give every process its own
            accelerator (``check_nproc``).
    """
    env = dist_env()
    if env is None:
        raise InputError("sharded precompute: RANK and WORLD_SIZE are not set (start it with torchrun)")
    rank, world, local = env
    check_nproc(world, device)
    device = local_device(device)
    owns = not (dist.is_available() and dist.is_initialized())
    init_distributed(device)
    group = dist.new_group(backend="gloo", timeout=COORD_TIMEOUT)
    return Context(rank=rank, world=world, local_rank=local, device=device, group=group,
                   owns=owns)


def _broadcast(ctx: Context, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Rank 0's arrays to every rank (shapes and dtypes must be known to all)."""
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a)).clone()
        dist.broadcast(t, src=0, group=ctx.group)
        out.append(t.numpy())
    return out


def _gather_stats(ctx: Context, stats: dict) -> list[dict]:
    keys = ("prompts", "real", "padded", "wall")
    mine = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    parts = [torch.zeros_like(mine) for _ in range(ctx.world)]
    dist.all_gather(parts, mine, group=ctx.group)
    return [dict(zip(keys, p.tolist())) for p in parts]


def run_sharded(ctx: Context, job, *, assemble: str = PRECOMPUTE["assemble"]) -> Path:
    """The sharded precompute of one process (module docstring, steps 1-3).

    Args:
        ctx: from :func:`join`.
        job: ``llmsrec.precompute.run.Job`` (the same options on every rank).
        assemble: ``copy`` or ``virtual`` (:func:`assemble_shards`).

    Returns:
        the cache path, complete on every rank when this returns.

    Raises:
        InputError: as one-process precompute (rank 0 reports it; the other ranks stop
            with a line pointing at it), or shards left by another run (pass --force).
    """
    rank, world = ctx.rank, ctx.world
    log = lambda m: job.log(f"[rank {rank}/{world}] {m}")  # noqa: E731
    d_llm, d_cf = job.llm.d_llm, job.E.shape[1]
    fixed = [np.zeros((d_llm, d_cf), np.float32)] + [np.zeros(d_llm, np.float32)] * 3
    status = np.zeros(1 + len(job.groups), dtype=np.int64)  # [ok, need per group]
    w, vps, error = None, {}, None
    try:
        if rank == 0:
            try:
                w = CacheWriter(job.out, job.prov, force=job.force, log=log)
                if w.needs(job.groups):
                    fixed, vps = setup_cache(w, job, hidden=False)
                    w.flush()
                    status[1:] = [not w.complete(g) for g in job.groups]
                status[0] = 1
            except BaseException as e:  # tell the others before stopping
                error = e
        status = _broadcast(ctx, [status])[0]
        if error is not None:
            raise error
        if not status[0]:
            raise InputError("rank 0 stopped the sharded precompute (its error is printed above)")
        fixed = [a.astype(np.float32) for a in _broadcast(
            ctx, [np.asarray(a, dtype=np.float32) for a in fixed])]
        need = [g for g, flag in zip(job.groups, status[1:]) if flag]
        if not need:
            if w is not None and w.f is not None:
                w.finish()  # an unfinished file that only lacked its rename
            if rank == 0:
                log(f"{job.out}: already complete for items and views {', '.join(job.views)}")
                remove_unused_shards(job.out, log)
            return job.out
        W, b, user_out, item_out = fixed
        prov = {**job.prov, "f_I_sha256": digest_arrays(W, b),
                "token_embeddings_sha256": digest_arrays(user_out, item_out)}
        stats = compute_shard(ctx, job, need, tuple(fixed), prov, vps, log)
        ctx.barrier()
        every = _gather_stats(ctx, stats)
        if rank == 0:
            if w.provenance.get("f_I_sha256") != prov["f_I_sha256"]:
                raise RuntimeError(f"{w.tmp}: f_I changed during the run")
            assemble_shards(w, job, need, world, prov, vps, mode=assemble, log=log)
            total = {k: int(sum(s[k] for s in every)) for k in ("prompts", "real", "padded")}
            total["wall"] = max(s["wall"] for s in every)
            job.log(summary(total, job, f"precompute on {world} processes (slowest rank's wall)"))
        ctx.barrier()
    finally:
        if w is not None:
            w.close()
    return job.out


def compute_shard(ctx: Context, job, need: list[str], fixed: tuple, prov: dict, vps: dict,
                  log) -> dict:
    """Compute this rank's share of the ``need`` groups into its shard file.

    Returns:
        ``run_plan``'s stats (zeros when the shard was already complete).

    Raises:
        InputError: the shard file has another provenance or other rows (without
            ``--force``).
    """
    none = {"prompts": 0, "real": 0, "padded": 0, "wall": 0.0}
    path = shard_path(job.out, ctx.rank, ctx.world)
    path.parent.mkdir(parents=True, exist_ok=True)
    sw = CacheWriter(path, prov, force=job.force, log=log)
    if not sw.needs(need):
        log(f"{path.name}: complete, nothing to compute")
        return none
    try:
        work, plan, n_chunks = {}, [], 0
        for g in need:
            if sw.complete(g):  # e.g. a shard being extended with another view
                n_chunks += len(sw.read(f"progress/{g}"))
                continue
            rows, toks = group_prompts(job, g, vps.get(g.removeprefix("users/")))
            bounds = split_rows([len(t) for t in toks], ctx.world)
            lo, hi = int(bounds[ctx.rank]), int(bounds[ctx.rank + 1])
            mine, my_toks = rows[lo:hi], toks[lo:hi]
            first = int(mine[0]) if len(mine) else 0
            span = int(mine[-1]) - first + 1 if len(mine) else 0
            if sw.has(f"{g}/rows") and not np.array_equal(sw.read(f"{g}/rows"), mine):
                raise InputError(f"{sw.tmp}: /{g}/rows differs from this run's share of the "
                                 f"prompts; pass --force to rebuild")
            sw.require(f"{g}/rows", mine.astype(np.int64))
            sw.require(f"{g}/hidden", shape=(span, job.llm.d_llm), dtype=np.float32)
            work[g] = (mine, my_toks, f"{g}/hidden", first)
            todo = plan_chunks(sw, g, my_toks, job.chunk_prompts)
            n_chunks += -(-len(my_toks) // job.chunk_prompts)
            plan += todo
        sw.flush()
        log(f"{path.name}: {len(plan)} of {n_chunks} chunks to do "
            f"({sum(len(i) for _, _, i in plan)} prompts)")
        stats = run_plan(sw, job, plan, work, fixed, progress=job.progress and ctx.rank == 0)
        sw.finish()
    finally:
        sw.close()
    log(f"{path.name}: {stats['prompts']} prompts, {stats['real']} real tokens, "
        f"forward {stats['wall']:.1f} s")
    return stats


def assemble_shards(w, job, need: list[str], world: int, prov: dict, vps: dict, *,
                    mode: str, log) -> Path:
    """Rank 0: fill the ``need`` groups' ``hidden`` of the open final writer ``w`` from the
    shards, mark them done, rename the file into place; with ``copy``, delete the shards.

    Args:
        w: the final cache's ``CacheWriter`` after ``setup_cache(w, job, hidden=False)``.
        need: groups to fill (``items``, ``users/<view>``).
        prov: the provenance every shard must carry.
        vps: view -> ``ViewPrompts`` (which users have a prompt).
        mode: ``copy`` (ordinary datasets) or ``virtual``. Then
            :func:`remove_unused_shards` deletes every shard file the cache does not read
            (with ``copy``: all, unless the file still has virtual datasets from an earlier
            ``virtual`` assembly; always the left-overs of other process counts).

    Raises:
        InputError: a shard missing, incomplete, of another provenance, or whose rows
            do not cover the group's prompts exactly once (pass --force to rebuild).
    """
    paths = [shard_path(job.out, r, world) for r in range(world)]
    files = []
    try:
        for p in paths:
            if not p.exists():
                raise InputError(f"{p}: shard missing after all ranks finished")
            f = h5py.File(p, "r")
            files.append(f)
            field = provenance_diff(read_provenance(f, p), prov)
            if field:
                raise InputError(f"{p}: shard differs in provenance field '{field}'; "
                                 f"pass --force to rebuild")
        ds, d_llm = job.ds, job.llm.d_llm
        for g in need:
            if g == "items":
                expected, n_rows = np.arange(1, ds.n_items + 1), ds.n_items + 1
            else:
                vp = vps[g.removeprefix("users/")]
                expected = np.asarray([u for u in range(1, job.n_users + 1)
                                       if vp.prompts[u] is not None], dtype=np.int64)
                n_rows = ds.n_users + 1
            parts = []
            for p, f in zip(paths, files):
                if not group_complete(f, g):
                    raise InputError(f"{p}: group {g} is not complete")
                rows = f[f"{g}/rows"][()]
                parts.append((p, f, int(rows[0]) if len(rows) else 0, len(rows),
                              int(rows[-1]) - int(rows[0]) + 1 if len(rows) else 0, rows))
            got = np.concatenate([x[5] for x in parts])
            if not np.array_equal(got, expected):
                raise InputError(f"{job.out}: the shards' rows of {g} do not cover its "
                                 f"{len(expected)} prompts exactly once; pass --force")
            name = f"{g}/hidden"
            w.drop(name)
            if mode == "virtual":
                w.require_virtual(name, (n_rows, d_llm), np.float32,
                                  [(f"{p.parent.name}/{p.name}", name, first, span)
                                   for p, _, first, _, span, _ in parts])
            else:
                w.require(name, shape=(n_rows, d_llm), dtype=np.float32)
                for _, f, first, _, span, _ in parts:
                    for s in range(0, span, _COPY_BLOCK):
                        e = min(s + _COPY_BLOCK, span)
                        w.write_rows(name, np.arange(first + s, first + e), f[name][s:e])
            w.set_progress_done(g, -(-len(expected) // job.chunk_prompts), job.chunk_prompts)
    finally:
        for f in files:
            f.close()
    out = w.finish()
    log(f"assembled {out} from {world} shards ({mode})")
    # copy: every shard goes, unless an earlier --assemble virtual left datasets reading some
    remove_unused_shards(out, log)
    return out
