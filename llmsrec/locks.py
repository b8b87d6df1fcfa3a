"""One writer per output: an exclusive OS lock in a hidden file beside each output.

Every stage that writes a file or a folder ``X`` holds ``fcntl.flock(LOCK_EX)`` on
``.X.lock`` in the same folder while it writes (``X`` itself may not exist yet, and a
folder is replaced by a rename, so the lock cannot live inside it). The lock file holds the
writer's pid, so a second writer is refused with one line naming it::

    runs/demo/cache/cache.h5: another llmsrec process (pid 4711) is writing it; wait for it or stop it

The kernel drops a ``flock`` when its process dies, however it dies, so the lock file
of a killed run is *stale*: the next writer takes it over (and overwrites the pid).
The file is removed on release; a writer that locked a file someone removed in between
checks the inode and locks the new file instead, so two writers can never both hold it.

Locks are re-entrant within a process (a command locks its ``--out``, the function it
calls locks the same path again); they are not inherited by programs the process starts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from llmsrec.errors import InputError

_HELD: dict[str, list] = {}  # lock file -> [fd, count, pid that locked it]


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of output ``out``: ``.<name>.lock`` in the folder of ``out``."""
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.lock")


def _holder(path: Path) -> str:
    """The pid recorded in a lock file (a few tries: its holder writes it just after locking)."""
    for _ in range(20):
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


class OutputLock:
    """A held lock on one output (see the module docstring); :meth:`release` gives it back.

    Attributes:
        out: the output it protects; path: the lock file.
        stale_pid: the pid of a dead writer whose lock file was taken over, else None.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = lock_path(out)
        self.stale_pid: str | None = None
        self._released = False
        key = str(self.path)
        held = _HELD.get(key)
        if held is not None and held[2] == os.getpid():
            held[1] += 1
            return
        _HELD.pop(key, None)  # a forked child's copy of its parent's entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise InputError(f"{self.out}: another llmsrec process (pid {_holder(self.path)}) is writing "
                                 f"it; wait for it or stop it") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed the file while we waited on it: lock the new one
        old = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if old.isdigit() and int(old) != os.getpid():
            self.stale_pid = old  # a dead writer's file: the kernel released its lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = [fd, 1, os.getpid()]

    def release(self) -> None:
        """Give the lock back (the last release in this process removes the file and unlocks)."""
        if self._released:
            return
        self._released = True
        key = str(self.path)
        held = _HELD.get(key)
        if held is None or held[2] != os.getpid():
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        try:
            os.unlink(self.path)  # before unlocking: a waiter then sees another inode and retries
        except FileNotFoundError:
            pass
        os.close(held[0])  # closing the descriptor drops the flock

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


def output_lock(out: str | os.PathLike) -> OutputLock:
    """Take the exclusive lock of output ``out`` (a file or folder, existing or not).

    Use as ``with output_lock(out): ...`` or keep the returned lock and ``release()`` it.

    Raises:
        InputError: another process holds it: ``"<out>: another llmsrec process (pid N) is
            writing it; wait for it or stop it"``.
    """
    return OutputLock(out)
