"""Multi-process runs under ``torchrun``: environment, backend per device, process group.

``torchrun --nproc-per-node N -m llmsrec COMMAND ...`` (``torch.distributed.run``) starts N
processes and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. Commands that support it call :func:`init_distributed` when
:func:`dist_env` finds those variables; everything else runs as one process.

Backends: ``gloo`` for ``cpu``, ``nccl`` for ``cuda``, ``hccl`` for ``hpu`` (Gaudi; the
backend is registered by ``habana_frameworks.torch.distributed.hccl``, imported only
here and only for ``hpu``). Collectives in this module move tensors on the device the
backend needs (CUDA for nccl, HPU for hccl, CPU for gloo).

The CLI imports this module at startup, so torch is imported inside the functions that use
it (``# deferred: torch``) and ``llmsrec --help`` stays fast.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys

from llmsrec.errors import InputError

_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "hpu": "hccl"}


def dist_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the torchrun environment, or None if unset.

    None when ``RANK`` or ``WORLD_SIZE`` is missing (a plain one-process run). ``LOCAL_RANK``
    defaults to ``RANK`` (one node).

    Raises:
        InputError: a variable that is not an integer, or ``RANK`` outside ``0..WORLD_SIZE-1``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    vals = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ.get(name, os.environ["RANK"])
        try:
            vals[name] = int(raw)
        except ValueError:
            raise InputError(f"environment variable {name}={raw!r}: expected an integer") from None
    rank, world, local = vals["RANK"], vals["WORLD_SIZE"], vals["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InputError(f"environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} "
                         f"are inconsistent (need 0 <= RANK < WORLD_SIZE)")
    return rank, world, local


def backend_for(device: str) -> str:
    """The torch.distributed backend of a ``--device``: cpu -> gloo, cuda[:N] -> nccl, hpu -> hccl.

    Raises:
        InputError: an unknown device name.
    """
    kind = str(device).split(":")[0]
    if kind not in _BACKENDS:
        raise InputError(f"--device {device}: expected cpu, cuda, cuda:N or hpu")
    return _BACKENDS[kind]


def local_device(device: str) -> str:
    """The device string this process should use: under torchrun, ``cuda`` becomes
    ``cuda:LOCAL_RANK`` (one GPU per process); anything else is returned unchanged
    (``hpu`` processes are bound to their card by the Habana runtime)."""
    env = dist_env()
    if env is not None and str(device) == "cuda":
        return f"cuda:{env[2]}"
    return str(device)


def init_distributed(device: str) -> str:
    """Join the torchrun process group (``env://``) with the device's backend; return the backend.

    Idempotent: if the default group already exists its backend is returned. For CUDA the
    process's current device is set to ``cuda:LOCAL_RANK`` first.

    Raises:
        InputError: not started by torchrun (no ``RANK``/``WORLD_SIZE``), torch built
            without distributed support, or the backend/device is unavailable (no nccl in
            this torch build, fewer GPUs than local ranks, habana_frameworks missing).
    """
    import torch  # deferred: torch
    import torch.distributed as dist  # deferred: torch

    env = dist_env()
    if env is None:
        raise InputError("distributed run: RANK and WORLD_SIZE are not set (start it with torchrun)")
    if not dist.is_available():
        raise InputError("distributed run: this torch build has no torch.distributed")
    if dist.is_initialized():
        return str(dist.get_backend())
    rank, world, local = env
    backend = backend_for(device)
    if backend == "nccl":
        if not dist.is_nccl_available() or not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA/nccl is not available in this torch build")
        if local >= torch.cuda.device_count():
            raise InputError(f"--device {device}: LOCAL_RANK {local} but only "
                             f"{torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local)
    elif backend == "hccl":
        try:
            import habana_frameworks.torch.distributed.hccl  # noqa: F401  (deferred, Gaudi only: registers hccl)
        except ImportError as e:
            raise InputError("--device hpu: habana_frameworks is not installed "
                             "(pip install 'llmsrec[gaudi]' on a Gaudi machine)") from e
    elif not dist.is_gloo_available():
        raise InputError("--device cpu: this torch build has no gloo backend")
    _import_dynamo_first()
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return backend


def _import_dynamo_first() -> None:
    """Import ``torch._dynamo`` before any process group exists.

    ``DistributedDataParallel.__init__`` imports it on first use; imported while the
    default group exists, it keeps ten references to that group object for the life of
    the interpreter (measured: the group's refcount goes 10 -> 20), so
    ``destroy_process_group`` cannot free the group and its gloo worker threads live on
    into interpreter finalization, where one of them aborted the process (see
    :func:`shutdown_distributed`). Imported first, it holds none and the threads are
    joined when the group is destroyed. DDP imports it anyway; this only moves the import.
    """
    if "torch._dynamo" not in sys.modules:
        try:
            import torch._dynamo.utils  # noqa: F401  (deferred: torch)
        except Exception:  # a torch build without dynamo: nothing holds the group then
            pass


def shutdown_distributed(barrier: bool = True) -> None:
    """Leave the process group (no-op if none): a barrier (unless ``barrier=False``, e.g.
    after an error, when other ranks may never arrive), then ``destroy_process_group``, so
    that the groups are really gone, their worker threads joined, before this returns.

    Why the last part matters: a gloo worker thread drops a finished collective (and the
    Python tensors it holds, e.g. ``broadcast_json``'s, kept alive as "prior work" of the
    final barrier) a moment *after* the collective's ``wait()`` returns. If the group is
    still alive when the interpreter finalizes, that thread then needs the GIL to free the
    tensors, Python ends it (``pthread_exit``) inside a C++ destructor, and the process
    aborts: "terminate called without an active exception". The group
    outlived ``destroy_process_group`` because ``torch._dynamo``, first imported by
    ``DistributedDataParallel`` after the group existed, kept references to it
    (:func:`_import_dynamo_first` prevents that); a ``DistributedDataParallel`` left in a
    reference cycle would hold it too until the cyclic collector runs, so the garbage is
    collected before the groups are destroyed. torch destroys a group with the GIL
    released, which lets its threads finish."""
    import torch.distributed as dist  # deferred: torch

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # a DistributedDataParallel in a reference cycle holds the group
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # anything else that held a group: freed now, not during finalization


def active() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the initialised default process group, or None."""
    import torch.distributed as dist  # deferred: torch

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` rows that ``rank`` of ``world`` owns: contiguous slices in
    rank order, sizes differing by at most one (a rank may own none when ``n < world``)."""
    return n * rank // world, n * (rank + 1) // world


def comm_device():
    """The device a tensor must be on for the default group's collectives."""
    import torch  # deferred: torch
    import torch.distributed as dist  # deferred: torch

    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "hccl":
        return torch.device("hpu")
    return torch.device("cpu")


def all_gather_rows(x, n: int):
    """Concatenate every rank's rows of a tensor split with :func:`shard` (no gradient).

    Args:
        x: this rank's ``(hi - lo, ...)`` rows of an ``(n, ...)`` tensor, on the
            collective's device (:func:`comm_device`).
        n: the total row count.
    Returns:
        the ``(n, ...)`` tensor (detached), identical on every rank.
    """
    import torch  # deferred: torch
    import torch.distributed as dist  # deferred: torch

    world = dist.get_world_size()
    sizes = [shard(n, r, world)[1] - shard(n, r, world)[0] for r in range(world)]
    m = max(sizes)
    pad = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def broadcast_json(obj, src: int = 0):
    """Send a JSON-serialisable object from rank ``src`` to every rank (returned on all).

    Serialised as UTF-8 JSON in a uint8 tensor (no pickle); also a barrier: no rank
    returns before ``src`` has sent.
    """
    import torch  # deferred: torch
    import torch.distributed as dist  # deferred: torch

    dev = comm_device()
    if dist.get_rank() == src:
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(dev)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=dev)
    dist.broadcast(size, src)
    if dist.get_rank() != src:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(data, src)
    return json.loads(bytes(data.cpu().numpy()).decode())


def check_nproc(nproc: int, device: str) -> None:
    """Check that ``nproc`` processes can run on ``device`` (one accelerator each).

    ``cpu`` takes any count (the processes share the cores); ``cuda`` needs ``nproc``
    visible GPUs (process k uses ``cuda:k``) and ``hpu`` ``nproc`` Gaudi cards
    (``habana_frameworks`` imported only here, only for ``hpu``); ``cuda:N`` names one
    GPU, so it is refused for more than one process.

    Raises:
        InputError: ``nproc < 1``, an unknown device, or fewer devices than processes.
    """
    if nproc < 1:
        raise InputError(f"--nproc {nproc}: expected a process count >= 1")
    backend_for(device)  # an unknown name -> InputError
    kind = str(device).split(":")[0]
    if nproc == 1 or kind == "cpu":
        return
    if str(device) != kind:
        raise InputError(f"--device {device} pins one device; with {nproc} processes use "
                         f"--device {kind} (process k uses {kind}:k)")
    if kind == "cuda":
        import torch  # deferred: torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    else:
        try:
            import habana_frameworks.torch.hpu as hthpu  # deferred: optional, Gaudi only
        except ImportError as e:
            raise InputError("--device hpu: habana_frameworks is not installed") from e
        count = hthpu.device_count()
    if nproc > count:
        raise InputError(f"--nproc {nproc}: --device {kind} has only {count} device(s) here")


def launch(nproc: int, args: list[str], *, module: str = "llmsrec") -> int:
    """Run ``python -m <module> ARGS`` in ``nproc`` local processes with torchrun's launcher.

    The same as ``torchrun --standalone --nproc-per-node NPROC -m llmsrec ARGS``: the
    arguments go through ``torch.distributed.run.get_args_parser`` and
    ``torch.distributed.run.run`` (the functions behind the ``torchrun`` command), so
    rendezvous, environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...), output and the
    stopping of every process when one fails are PyTorch's. When ``OMP_NUM_THREADS`` is
    unset it is set to ``cpu_count // nproc`` (at least 1) for the processes instead of
    torchrun's 1, so CPU processes share the cores.

    Interrupting the launcher (SIGINT, e.g. Ctrl-C, or SIGTERM) stops every process (torchrun
    sends them the same signal) and returns ``128 + signal number`` (130, 143) instead of
    raising torchrun's ``SignalException``; torchrun's warnings about the shutdown are not
    shown (its errors are).

    Returns:
        0 when every process succeeded, ``128 + signal`` when the launcher was interrupted,
        else the exit code of the first failed rank (its messages are already printed).
    """
    from torch.distributed import run as torchrun  # deferred: torch
    from torch.distributed.elastic.multiprocessing.api import SignalException  # deferred: torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # deferred: torch

    targs = torchrun.get_args_parser().parse_args(
        ["--standalone", "--nnodes=1", f"--nproc-per-node={nproc}", "-m", module, *args])
    set_threads = "OMP_NUM_THREADS" not in os.environ
    if set_threads:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # quiet torchrun's warnings ("Received 2 death signal, shutting down workers", ...); each
    # of its modules' loggers has its own level, so every one is raised (and restored below)
    quiet = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
             if name.startswith("torch.distributed.elastic") and isinstance(lg, logging.Logger)}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        torchrun.run(targs)
    except ChildFailedError as e:
        code = int(e.failures[min(e.failures)].exitcode)
        return code if code > 0 else 1  # negative: killed by a signal
    except SignalException as e:
        return 128 + int(e.sigval)
    except KeyboardInterrupt:  # SIGINT before torchrun's agent installed its handler
        return 128 + int(signal.SIGINT)
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        if set_threads:
            del os.environ["OMP_NUM_THREADS"]
    return 0
