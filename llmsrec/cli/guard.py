"""What every ``llmsrec`` command does around its work: lock its output, and turn the
failures a user can act on into one line.

- :class:`LlmsrecGroup` (the ``llmsrec`` group and its subgroups) prints bad input
  (``InputError``) and an ``OSError`` as one line ``error: ...`` and exits 2; a Ctrl-C
  exits 130 with :func:`interrupt_line`.
- :class:`GuardedCommand` takes the exclusive lock of the command's output
  (``llmsrec.locks``) before the command starts, so a second writer of the same ``--out``
  is refused at once, not after an hour of training.
- :func:`oserror_line`: an ``OSError`` (a full disk, a permission, a read-only file
  system) as one line naming the path.
- :func:`interrupt_line`: what a Ctrl-C leaves behind and how to go on.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

import click

from llmsrec.distributed import dist_env
from llmsrec.errors import InputError
from llmsrec.locks import output_lock

#: commands whose rerun continues where an interrupted run stopped
RESUMING = {"precompute": "finished chunks are kept", "run": "finished stages and chunks are kept",
            "compare": "finished model runs are kept", "analyze": "finished models are kept",
            "sweep": "finished variants are kept"}


def _world_size() -> int:
    w = os.environ.get("WORLD_SIZE", "1")
    return int(w) if w.isdigit() else 1


def command_outputs(ctx: click.Context) -> list[Path]:
    """The file or folder a command invocation writes (empty for read-only commands).

    ``run``: ``--out`` (default ``runs/DATASET``); ``analyze``: the run folder (its report,
    models and cache views go there); ``sweep``: ``--out`` (default ``RUN/sweep``);
    ``evaluate``: ``--out`` (default ``CHECKPOINT/evaluation.json``); the others: ``--out``.
    """
    p, name = ctx.params, ctx.info_name
    if name == "run":
        return [Path(p.get("out") or f"runs/{p.get('dataset')}")]
    if name == "analyze":
        return [Path(p["run_dir"])] if p.get("run_dir") else []
    if name == "sweep":
        out = p.get("out") or (f"{p['run_dir']}/sweep" if p.get("run_dir") else None)
        return [Path(out)] if out else []
    if name == "evaluate":
        out = p.get("out_json") or (f"{p['checkpoint']}/evaluation.json" if p.get("checkpoint") else None)
        return [Path(out)] if out else []
    for key in ("out", "out_h5"):
        if p.get(key):
            return [Path(p[key])]
    return []


class GuardedCommand(click.Command):
    """A click command that holds the lock of its output (:func:`command_outputs`) while it runs.

    Not under ``torchrun`` with several processes (each rank locks the files it writes
    itself) and not for ``precompute --nproc N`` (its processes lock their files).
    """

    def invoke(self, ctx: click.Context):
        ctx.find_root().meta["llmsrec.command"] = ctx  # for the message of a Ctrl-C
        outs = [] if _world_size() > 1 or (ctx.params.get("nproc") or 1) > 1 else command_outputs(ctx)
        held = []
        try:
            for out in outs:
                held.append(output_lock(out))
            return super().invoke(ctx)
        finally:
            for lock in reversed(held):
                lock.release()


_H5_FILE = re.compile(r"(?:filename|name) = '([^']+)'")
_H5_ERRNO = re.compile(r"errno = (\d+)")


def oserror_line(e: OSError) -> str:
    """One line for an ``OSError``: ``PATH: reason``; a full disk says so and what to do.

    HDF5's errors carry the file and errno inside their message; they are read from there.
    """
    text = " ".join(str(e).split())
    path, code = e.filename, e.errno
    if e.filename is not None and e.strerror:
        reason = e.strerror
    else:  # e.g. h5py: "Unable to synchronously write data (file write failed: ..., errno = 28, ...)"
        m = _H5_FILE.search(text)
        path = m.group(1) if m else None
        m = _H5_ERRNO.search(text)
        code = code or (int(m.group(1)) if m else None)
        what = text.split(" (")[0]
        reason = f"{what}: {os.strerror(code)}" if code else text
    line = f"{path}: {reason}" if path else reason
    if code == errno.ENOSPC:
        line += "; free some space and rerun the same command (unfinished outputs are resumed or redone)"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        line += "; choose an output where you can write"
    return line


def interrupt_line(root: click.Context) -> str:
    """The message of a Ctrl-C (exit 130): what was kept and how to go on.

    Args:
        root: the top ``llmsrec`` context (the running command's is in its ``meta``).
    """
    leaf = root.meta.get("llmsrec.command")
    command = leaf.info_name if leaf is not None else root.invoked_subcommand
    outs = command_outputs(leaf) if leaf is not None else []
    where = f" {outs[0]}" if outs else ""
    if command in RESUMING:
        return f"Aborted: interrupted; {RESUMING[command]} in{where or ' the output'}: rerun the same command to resume"
    return (f"Aborted: interrupted; nothing half-written was left{(' in' + where) if where else ''} "
            f"(outputs are renamed into place when complete): rerun the same command to start again")


class LlmsrecGroup(click.Group):
    """The ``llmsrec`` group (and its subgroups): commands are :class:`GuardedCommand`; bad
    input (``InputError``) and an ``OSError`` print one line ``error: ...`` and exit 2; a
    Ctrl-C exits 130 with :func:`interrupt_line` (printed once, by the top group)."""

    command_class = GuardedCommand  # holds the lock of the command's output (llmsrec.locks)
    group_class = type  # subgroups (sasrec, cfsrec) are LlmsrecGroup too

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # a full disk, a permission, a read-only file system: one line
            if isinstance(e, BrokenPipeError):
                raise
            click.echo(f"error: {oserror_line(e)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if _world_size() > 1:
                sys.exit(130)  # one of several processes: the launcher reports the interrupt once
            if ctx.parent is None:  # the top group reports it once: exit 130, what was kept
                click.echo(interrupt_line(ctx), err=True)
                sys.exit(130)
            raise


def refuse_distributed(message: str) -> None:
    """Under torchrun with several processes: rank 0 prints ``error: message``, every rank exits 2."""
    env = dist_env()
    if env is None or env[1] == 1:
        return
    if env[0] == 0:
        click.echo(f"error: {message}", err=True)
    sys.exit(2)
