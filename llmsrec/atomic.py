"""Write-then-rename helpers, so a killed run never leaves a half-written output.

A folder is written as a hidden ``.OUT.tmp-*`` beside ``OUT`` under the output's lock
(``llmsrec.locks``); the leftovers of a killed writer (``.OUT.tmp-*``, ``.OUT.old-*``) are
removed by the next writer of ``OUT``. An ``OSError`` while writing (a full disk,
permissions, a read-only file system) names the output it was writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from llmsrec.errors import InputError
from llmsrec.locks import output_lock


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def naming(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` itself if it names a file, else the same error (errno, message) naming ``path``."""
    if e.filename is not None:
        return e
    try:
        return type(e)(e.errno, e.strerror or str(e), str(path))
    except TypeError:  # a subclass with another constructor
        return OSError(e.errno, e.strerror or str(e), str(path))


def remove_leftovers(out: str | os.PathLike, log=None) -> list[str]:
    """Remove the hidden ``.OUT.tmp-*`` / ``.OUT.old-*`` entries a killed writer of ``out``
    left beside it. Call it only while holding ``out``'s lock (nobody else writes them then).

    Returns:
        the names removed.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    gone = []
    for p in sorted(out.parent.iterdir()):
        if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            gone.append(p.name)
    if gone and log is not None:
        log(f"removed {', '.join(gone)} left by an interrupted writer of {out}")
    return gone


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` on success.

    Raises:
        InputError: ``out`` exists and ``force`` is False; another process writes ``out``
            (its lock, ``llmsrec.locks``, names the pid).
        OSError: while writing, naming ``out`` if the error named no file.
    On an exception the temporary folder is removed and ``out`` is untouched. The lock of
    ``out`` is held throughout; leftovers of a killed writer of ``out`` are removed first.
    """
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    with output_lock(out):
        remove_leftovers(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs follow the umask
        except OSError as e:
            raise naming(e, out) from None
        try:
            yield tmp
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.filename is None:
                raise naming(e, out) from None
            raise
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask
    except OSError as e:
        raise naming(e, path) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # e.g. ENOSPC from a write
            raise naming(e, path) from None
        raise


def follow_umask(folder: str | os.PathLike) -> None:
    """Give every file directly in ``folder`` the mode the umask gives a new file (0644 under
    umask 022): for files written by other libraries' savers (e.g. ``save_pretrained``, whose
    safetensors files are made 0600 through a temporary file)."""
    mode = 0o666 & ~_umask()
    for p in Path(folder).iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def weights_digest(folder: str | os.PathLike, suffixes: tuple[str, ...], what: str) -> str:
    """sha256 over a model folder's weight files: each file's name and sha256, in name order.

    Args:
        folder: the model folder (only its own files count, not subfolders).
        suffixes: the weight-file suffixes, e.g. ``(".safetensors", ".bin")``.
        what: the file kinds named by the error, e.g. ``"*.safetensors, *.bin"``.
    Raises:
        InputError: the folder holds no file with one of ``suffixes``.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in suffixes and p.is_file())
    if not files:
        raise InputError(f"{folder}: no weight files ({what}) found")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in ``path``, or None when the file is missing, unreadable or not JSON
    (a record that is absent or damaged counts as no record: the caller recomputes)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def jsonable(x: Any) -> Any:
    """``x`` as it reads back from JSON (tuples become lists, other objects their ``str``), so
    a request built in memory compares equal to the same request read from a file."""
    return json.loads(json.dumps(x, default=str))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def digest_arrays(*arrays) -> str:
    """Hex sha256 of float32 arrays, shapes included (the cache's parameter digests)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()
