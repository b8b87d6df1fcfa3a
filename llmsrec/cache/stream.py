"""Streamed reads of a cache's user rows: caches larger than memory.

``llmsrec train --stream`` (and evaluation of a streamed cache) reads the rows of a user
view from the HDF5 file as the training needs them instead of loading the view:

- :class:`RowStore` opens the cache once (HDF5's chunk cache off, so what is read from
  the file is what was asked for) and counts the bytes read (rows x stored row bytes).
- :class:`StreamedRows` is one dataset of rows (``/users/<view>/hidden`` or ``cf``): it
  reads sorted row sets as contiguous runs (chunk-aligned when whole chunks are asked
  for), checks every ``hidden`` row it reads against its recorded CRC-32
  (docs/cache-schema.md), and returns float32 whatever the store dtype.
- :func:`epoch_order` is the training order: the rows' chunks in a shuffled order,
  grouped in windows of ``shuffle_buffer`` rows that are shuffled in memory; a buffer that
  covers all rows gives exactly ``rng.permutation(rows)`` (the in-memory trainer's order).
- :class:`BatchFeeder` reads the rows of a sequence of batches on a background thread,
  one window at a time, so the reads overlap the training steps.

Memory of a streamed epoch: about 3 windows of rows (the one being trained on, the next
one, the one being read) plus what the caller keeps (the item table, targets, ids).
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import h5py
import numpy as np

from llmsrec.cache.verify import crc_name, row_crcs
from llmsrec.errors import InputError

#: rows per block when a view is scored block by block (a multiple of every chunk shape
#: llmsrec writes; 4.7 MB of float32 states at d_llm 576, ~100 MB of candidate
#: embeddings at 101 candidates x d_out 128)
SCORE_BLOCK_ROWS = 2048


class RowStore:
    """An open cache file for streamed reads, and the count of bytes read from it.

    Args:
        path: the cache (``.h5``), already checked by :class:`~llmsrec.cache.store.CacheReader`.

    Attributes:
        bytes_read: bytes of rows read so far (rows x the stored bytes of one row), over
            every :class:`StreamedRows` of this store.
        rows_read: rows read so far.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:  # no chunk cache: every read goes to the file, and bytes_read is what is read
            self.f = h5py.File(self.path, "r", rdcc_nbytes=0)
        except OSError as e:
            raise InputError(f"{self.path}: not a readable HDF5 file ({e})") from e
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.rows_read = 0

    def rows(self, name: str, n_rows: int | None = None) -> "StreamedRows":
        """:class:`StreamedRows` over dataset ``name`` (its first ``n_rows`` rows; all when None).

        Raises:
            InputError: no such dataset in the cache.
        """
        if name not in self.f:
            raise InputError(f"{self.path}: no dataset /{name}")
        return StreamedRows(self, name, n_rows)

    def count(self, rows: int, nbytes: int) -> None:
        """Add ``rows`` rows of ``nbytes`` bytes to :attr:`rows_read` / :attr:`bytes_read`
        (thread-safe: the reader threads and the caller count into the same store)."""
        with self._lock:
            self.rows_read += rows
            self.bytes_read += nbytes

    def close(self) -> None:
        """Close the file (every :class:`StreamedRows` of this store stops working)."""
        self.f.close()


class StreamedRows:
    """Rows ``0 .. n_rows - 1`` of one 2-D dataset of a cache, read on demand as float32.

    Stands in for an in-memory ``(n_rows, d)`` array where the trainer and the scorers accept
    one: ``shape``, ``len()``, ``[:k]`` (a shorter view, nothing read), :meth:`read` and
    :meth:`blocks`. It has no ``__array__``: nothing converts it to a whole array by accident.
    """

    def __init__(self, store: RowStore, name: str, n_rows: int | None = None):
        self.store, self.name = store, name
        self.ds = store.f[name]
        if self.ds.ndim != 2:
            raise InputError(f"{store.path}: /{name} has shape {self.ds.shape}; streamed reads need 2-D rows")
        total = self.ds.shape[0]
        self.n_rows = total if n_rows is None else min(int(n_rows), total)
        self.row_bytes = int(self.ds.shape[1]) * self.ds.dtype.itemsize
        crc = crc_name(name)
        self._crc = store.f[crc] if crc in store.f and store.f[crc].shape == (total,) else None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, int(self.ds.shape[1]))

    @property
    def ndim(self) -> int:
        return 2

    @property
    def chunk_rows(self) -> int:
        """Rows of one HDF5 chunk (a contiguous dataset: 1024, the unit reads are grouped in)."""
        return int(self.ds.chunks[0]) if self.ds.chunks else 1024

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, key):
        if isinstance(key, slice) and key.start in (None, 0) and key.step in (None, 1):
            stop = self.n_rows if key.stop is None else key.stop
            return StreamedRows(self.store, self.name, min(stop, self.n_rows))
        raise TypeError("StreamedRows: only [:k] views; read rows with .read(rows)")

    def read(self, rows) -> np.ndarray:
        """float32 ``(len(rows), d)``: the rows ``rows`` (int array, any order, no repeats).

        Reads each maximal run of consecutive rows with one slice (whole chunks when the
        rows cover them), or, when the rows are scattered (fewer than 4 rows a run on
        average), all of them in one point selection.

        Raises:
            InputError: a row out of range, or a row whose CRC-32 differs from the one
                recorded when it was written (the file is damaged).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.shape[1]), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        if srt[0] < 0 or srt[-1] >= self.n_rows:
            raise InputError(f"{self.store.path}: /{self.name}: row {int(srt[-1])} out of range ({self.n_rows} rows)")
        breaks = np.flatnonzero(np.diff(srt) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(srt)]])
        if len(starts) * 4 > len(srt):
            raw = self.ds[srt]
        else:
            raw = np.empty((len(srt), self.ds.shape[1]), dtype=self.ds.dtype)
            for a, b in zip(starts, ends):
                self.ds.read_direct(raw, np.s_[int(srt[a]) : int(srt[b - 1]) + 1], np.s_[a:b])
        self.store.count(len(srt), len(srt) * self.row_bytes)
        self._check(srt, raw)
        out = np.empty((len(rows), raw.shape[1]), dtype=np.float32)
        out[order] = raw
        return out

    def read_range(self, lo: int, hi: int) -> np.ndarray:
        """float32 ``(hi - lo, d)``: rows ``lo .. hi - 1``, one contiguous read."""
        return self.read(np.arange(lo, min(hi, self.n_rows), dtype=np.int64))

    def blocks(self, lo: int, hi: int, block_rows: int = SCORE_BLOCK_ROWS):
        """Yield ``(start, float32 rows start .. start + len - 1)`` covering rows ``[lo, hi)``
        in blocks of ``block_rows``, the next block read on a background thread while the
        caller works on the current one."""
        starts = list(range(lo, hi, block_rows))
        yield from prefetched(starts, lambda s: (s, self.read_range(s, min(s + block_rows, hi))))

    def _check(self, rows: np.ndarray, raw: np.ndarray) -> None:
        if self._crc is None:
            return
        stored = self._crc[rows] if len(rows) < 64 or rows[-1] - rows[0] + 1 > 2 * len(rows) else \
            self._crc[int(rows[0]) : int(rows[-1]) + 1][rows - rows[0]]
        written = stored != 0
        if written.any():
            bad = np.flatnonzero(written & (row_crcs(raw, self.ds.dtype) != stored))
            if len(bad):
                raise InputError(f"{self.store.path}: /{self.name}: row {int(rows[bad[0]])} differs from its "
                                 f"checksum: the file is damaged; rebuild it (precompute --force) or check it "
                                 f"with `llmsrec verify`")


def prefetched(items, produce, depth: int = 1):
    """Yield ``produce(x)`` for each ``x`` of ``items`` in order, computed on one background
    thread up to ``depth`` items ahead (an exception there is raised here)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for x in items:
                if stop.is_set():
                    return
                q.put((True, produce(x)))
            q.put((True, done))
        except BaseException as e:  # handed to the consumer
            q.put((False, e))

    t = threading.Thread(target=work, name="llmsrec-cache-reader", daemon=True)
    t.start()
    try:
        while True:
            ok, v = q.get()
            if not ok:
                raise v
            if v is done:
                return
            yield v
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(0.01)


def epoch_order(rows: np.ndarray, chunk_rows: int, shuffle_buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order one epoch visits ``rows`` in when they are streamed.

    Args:
        rows: int64 row ids (distinct).
        chunk_rows: rows per chunk of the dataset (rows ``c*chunk_rows ..`` form chunk c).
        shuffle_buffer: rows shuffled together in memory; >= ``len(rows)`` (or 0) gives
            ``rng.permutation(rows)``, the in-memory order (identical draws).
        rng: the trainer's generator (advanced by the draws).
    Returns:
        int64 ``(len(rows),)``: a permutation of ``rows``. With a smaller buffer: the chunks
        in a random order, cut into windows of ``max(1, shuffle_buffer // chunk_rows)``
        chunks, the rows of each window in a random order (every row's window is read once).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if shuffle_buffer <= 0 or shuffle_buffer >= len(rows):
        return rng.permutation(rows)
    chunk = rows // chunk_rows
    ids, inv = np.unique(chunk, return_inverse=True)
    position = np.empty(len(ids), dtype=np.int64)
    position[rng.permutation(len(ids))] = np.arange(len(ids))
    window = position[inv] // max(1, shuffle_buffer // chunk_rows)
    return rows[np.lexsort((rng.random(len(rows)), window))]


class BatchFeeder:
    """This rank's rows of each batch of an epoch, read from ``sources`` ahead of use.

    Args:
        sources: :class:`StreamedRows` read for the same rows (e.g. hidden and cf).
        batches: per batch, the int64 row ids this rank trains on (in batch order; may be
            empty).
        group_rows: rows read together (one read of sorted runs); the batches are grouped
            so that each group holds about this many rows.
    Iterating yields, per batch, a tuple of float32 arrays (one per source).
    """

    def __init__(self, sources, batches: list[np.ndarray], group_rows: int):
        self.sources, self.batches = list(sources), batches
        groups, cur, n = [], [], 0
        for i, b in enumerate(batches):
            cur.append(i)
            n += len(b)
            if n >= group_rows:
                groups.append(cur)
                cur, n = [], 0
        if cur:
            groups.append(cur)
        self.groups = groups

    def _read(self, group: list[int]):
        rows = np.concatenate([self.batches[i] for i in group]) if group else np.zeros(0, np.int64)
        arrays = [s.read(rows) for s in self.sources]
        out, at = [], 0
        for i in group:
            n = len(self.batches[i])
            out.append(tuple(a[at : at + n] for a in arrays))
            at += n
        return out

    def __iter__(self):
        for got in prefetched(self.groups, self._read):
            yield from got


def available_memory() -> int:
    """Bytes of memory available to a new allocation now: ``MemAvailable`` of
    ``/proc/meminfo`` (Linux), else free pages x page size, else 0 (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0
