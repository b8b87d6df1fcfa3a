"""The HDF5 cache of frozen-LLM states: schema, a resumable atomic writer, a reader.

The schema (datasets, dtypes, shapes, provenance keys), how a build is made resumable and
checksummed, and the shard layout of a multi-process precompute are described once, in
docs/cache-schema.md. In short: ``/items/...`` and ``/users/<view>/...`` hold the frozen
LLM's states (row 0 pads), ``/params`` the f_I and out-token inputs that produced them,
``/progress`` the finished chunks, and the root attribute ``provenance`` what they were
computed from. A cache ``X.h5`` is built as ``X.h5.tmp`` and renamed when complete; a
provenance that differs from an existing file's is refused unless ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from llmsrec.cache.verify import (
    CHECKSUMS, damaged_build, progress_groups, read_checked, read_checked_into, record_written, seal, unverified_groups, write_row_checksums,
)
from llmsrec.errors import InputError
from llmsrec.locks import output_lock
from llmsrec.data.views import ALL_VIEWS, PREFIX_VIEW

VIEW_ORDER = ALL_VIEWS + (PREFIX_VIEW,)  # the order reader.views lists views in

#: the datasets that hold the LLM's states (the last part of their name): stored in the
#: cache's store dtype, read back as float32
STATE_DATASETS = ("hidden", "out_layers", "slots")
#: ``precompute --store-dtype``: how the states are stored (provenance key ``store_dtype``,
#: absent for float32, the default and what every cache before it holds)
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
#: a state dataset is stored in chunks of whole rows of about this many bytes (a power of two
#: of rows, 16 to 1024): 512 rows at d_llm 576 in float32, 1024 in float16 (measured with
#: benchmarks/bench_chunks.py, docs/cache-schema.md)
STATE_CHUNK_BYTES = 2 << 20


def state_chunks(shape: tuple, itemsize: int) -> tuple:
    """The HDF5 chunk shape of a state dataset of ``shape``: ``(rows, *shape[1:])`` with
    ``rows`` the largest power of two (16 .. 1024) whose chunk fits :data:`STATE_CHUNK_BYTES`
    (16 if none does), and at most ``shape[0]`` (at least 1)."""
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = 16
    while rows < 1024 and 2 * rows * row_bytes <= STATE_CHUNK_BYTES:
        rows *= 2
    return (max(1, min(rows, int(shape[0]))), *shape[1:])


def store_dtype(provenance: dict) -> np.dtype:
    """The numpy dtype a cache with this provenance stores its states in.

    Raises:
        InputError: an unknown ``store_dtype`` (names the expected ones).
    """
    name = provenance.get("store_dtype", "float32")
    if name not in STORE_DTYPES:
        raise InputError(f"store dtype {name!r}: expected one of {', '.join(STORE_DTYPES)}")
    return np.dtype(STORE_DTYPES[name])


def is_state(name: str) -> bool:
    """True for a dataset that holds LLM states (``.../hidden``, ``out_layers``, ``slots``)."""
    return name.rsplit("/", 1)[-1] in STATE_DATASETS


def tmp_path(out: str | os.PathLike) -> Path:
    """The temporary name a cache is built under (``<out>.tmp``)."""
    out = Path(out)
    return out.with_name(out.name + ".tmp")


def provenance_diff(existing: dict, asked: dict) -> str | None:
    """Name of the first field of ``asked`` whose value differs in ``existing``, else None."""
    for k, v in asked.items():
        if existing.get(k) != v:
            return k
    return None


def read_provenance(f: h5py.File, path: Path) -> dict:
    """The ``provenance`` root attribute of an open cache file ``f``, parsed from JSON.

    Raises:
        InputError: ``f`` has no ``provenance`` attribute (``path``, its name, is in the message).
    """
    raw = f.attrs.get("provenance")
    if raw is None:
        raise InputError(f"{path}: not an llmsrec cache (no 'provenance' attribute)")
    return json.loads(raw)


def group_complete(f: h5py.File, group: str) -> bool:
    """True when every chunk of ``group`` (e.g. ``"items"``, ``"users/test"``) of the open
    cache file ``f`` is marked written in ``/progress/<group>``; False when it has none."""
    key = f"progress/{group}"
    return key in f and bool(np.all(f[key][()]))


class CacheWriter:
    """Build or extend a cache file atomically and resumably.

    Args:
        out: the final path (``.h5``).
        provenance: JSON-able dict identifying the inputs (model and weights digest,
            tokenizer, template, history window, dataset digest, ...). Every key is
            compared with an existing file's provenance.
        force: rebuild even if an existing ``out`` (or an unfinished ``out.tmp``) has a
            different provenance. An unfinished build with the same provenance is resumed.
        log: called with one-line status messages.

    Attributes:
        done: True when ``out`` already holds everything asked for (nothing to write);
            set by :meth:`needs`.
        resumed: True when an unfinished build was picked up.

    Raises:
        InputError: provenance mismatch without ``force`` (the message names the field),
            an existing file that is not an llmsrec cache, or another process writing
            ``out`` (the writer holds ``out``'s lock, ``llmsrec.locks``, until :meth:`close`,
            :meth:`finish`, or :meth:`needs` returns False).
    """

    def __init__(self, out, provenance: dict, *, force: bool = False,
                 log: Callable[[str], None] = print):
        self._lock = output_lock(out)  # one writer per cache file (its .tmp included)
        self._fresh = False  # True once this writer created the .tmp it writes
        self._marked = False  # True once this writer marked a chunk done
        try:
            self._init(out, provenance, force=force, log=log)
        except BaseException:
            self._lock.release()
            raise

    def _init(self, out, provenance: dict, *, force: bool = False,
              log: Callable[[str], None] = print):
        self.out = Path(out)
        self.tmp = tmp_path(self.out)
        self.asked = dict(provenance)
        self.force = force
        self.log = log
        self.state_dtype = store_dtype(self.asked)
        self.f: h5py.File | None = None
        self.resumed = False
        self._existing_final: dict | None = None
        if self.out.exists():
            try:
                with h5py.File(self.out, "r") as f:
                    self._existing_final = read_provenance(f, self.out)
                    self._final_groups = {g for g in self._all_groups(f) if group_complete(f, g)}
            except OSError as e:
                if not force:
                    raise InputError(f"{self.out}: not a readable HDF5 cache ({e}); "
                                     f"pass --force to rebuild") from e
            if self._existing_final is not None and not force:
                field = provenance_diff(self._existing_final, self.asked)
                if field:
                    raise InputError(
                        f"{self.out}: existing cache differs in provenance field '{field}' "
                        f"(cache: {_short(self._existing_final.get(field))}, asked: "
                        f"{_short(self.asked[field])}); pass --force to rebuild")

    @staticmethod
    def _all_groups(f: h5py.File) -> list[str]:
        return progress_groups(f)

    def needs(self, groups: list[str]) -> bool:
        """Open the file to write ``groups`` (``items``, ``users/<view>``).

        Returns False (and opens nothing) when the existing final file already has all
        of them complete with the same provenance.
        """
        final_ok = self._existing_final is not None and not (
            self.force and provenance_diff(self._existing_final, self.asked))
        if final_ok and not self.force and all(g in self._final_groups for g in groups):
            self._lock.release()  # nothing to write
            return False
        if self.tmp.exists() and self.force:  # --force always starts over: it must always work
            self.log(f"--force: discarding the unfinished build {self.tmp}")
            self.tmp.unlink()
        if self.tmp.exists():
            try:
                f = h5py.File(self.tmp, "r+")
                prov = read_provenance(f, self.tmp)
            except (OSError, InputError) as e:
                if "lock" in str(e).lower() and "unable" in str(e).lower():  # HDF5's own file lock
                    raise InputError(f"{self.tmp}: open in another process ({' '.join(str(e).split())[:120]}); "
                                     f"wait for it or stop it") from None
                self.log(f"{self.tmp}: unreadable unfinished build, starting over")
                self.tmp.unlink()
            else:
                field = provenance_diff(prov, self.asked)
                damage = damaged_build(f) if field is None else None
                if field is None and damage is None:
                    for g, why in unverified_groups(f):  # finished chunks are kept only if they verify
                        self.log(f"{self.tmp}: the finished chunks of {g} do not verify ({why}); redoing {g}")
                        for name in (g, f"progress/{g}", f"{CHECKSUMS}/{g}"):
                            if name in f:
                                del f[name]
                    self.f, self.resumed = f, True
                    self.log(f"resuming the unfinished build {self.tmp}")
                    return True
                f.close()
                if damage is not None:
                    self.log(f"{self.tmp}: damaged unfinished build ({damage}), starting over")
                elif not self.force:
                    raise InputError(
                        f"{self.tmp}: unfinished build differs in provenance field '{field}' "
                        f"(it: {_short(prov.get(field))}, asked: {_short(self.asked[field])});"
                        f" pass --force to discard it")
                self.tmp.unlink()
        self.tmp.parent.mkdir(parents=True, exist_ok=True)  # --out in a folder not made yet
        self._fresh = True
        if final_ok and not self.force:
            shutil.copyfile(self.out, self.tmp)  # extend a copy; the original stays intact
            self.f = h5py.File(self.tmp, "r+")
            self.log(f"adding to {self.out}: {', '.join(g for g in groups if g not in self._final_groups)}")
        else:
            self.f = h5py.File(self.tmp, "w", track_order=True)
            self.f.attrs["provenance"] = json.dumps(self.asked, sort_keys=True)
        return True

    # -- setup (metadata changes happen here only) -----------------------------------------
    @property
    def provenance(self) -> dict:
        return json.loads(self.f.attrs["provenance"])

    def update_provenance(self, extra: dict) -> None:
        """Add derived fields (e.g. the f_I digest) to the stored provenance."""
        prov = self.provenance
        prov.update(extra)
        self.f.attrs["provenance"] = json.dumps(prov, sort_keys=True)

    def has(self, name: str) -> bool:
        return name in self.f

    def read(self, name: str) -> np.ndarray:
        return self.f[name][()]

    def require(self, name: str, data: np.ndarray | None = None, *, shape=None,
                dtype=None) -> None:
        """Create dataset ``name`` with ``data`` (or zeros of ``shape``/``dtype``) unless it
        exists; its storage is allocated now, so chunk writes never change metadata. A state
        dataset (:func:`is_state`) created from a shape is stored in the cache's store dtype
        (``provenance["store_dtype"]``, float32 by default) whatever ``dtype`` says, in HDF5
        chunks of whole rows (:func:`state_chunks`; every chunk is written, with zeros, here)."""
        if name in self.f:
            ds = self.f[name]
            want = data.shape if data is not None else tuple(shape)
            if ds.shape != tuple(want):
                raise InputError(f"{self.tmp}: dataset /{name} has shape {ds.shape}, "
                                 f"expected {tuple(want)}; pass --force to rebuild")
            return
        given = data is not None
        chunks = None
        if data is None:
            data = np.zeros(shape, dtype=self.state_dtype if is_state(name) else dtype)
            if is_state(name) and data.ndim >= 1 and data.shape[0] > 0 and data.size:
                chunks = state_chunks(data.shape, data.dtype.itemsize)
        self.f.create_dataset(name, data=data, chunks=chunks, track_times=False)
        record_written(self.f, name, given)  # its sha256, or row checksums for a hidden dataset

    def require_progress(self, group: str, n_chunks: int, chunk_size: int) -> np.ndarray:
        """Create ``/progress/<group>`` (bool, n_chunks) unless present; return its flags."""
        key = f"progress/{group}"
        if key in self.f:
            ds = self.f[key]
            if ds.shape != (n_chunks,) or ds.attrs.get("chunk_size") != chunk_size:
                raise InputError(f"{self.tmp}: /{key} was built with another chunking; "
                                 f"pass --force to rebuild")
        else:
            ds = self.f.create_dataset(key, data=np.zeros(n_chunks, dtype=bool),
                                       track_times=False)
            ds.attrs["chunk_size"] = chunk_size
        return ds[()].copy()

    def complete(self, group: str) -> bool:
        """True when every chunk of ``group`` (``items``, ``users/<view>``) is marked done."""
        return group_complete(self.f, group)

    def drop(self, name: str) -> None:
        """Delete dataset or group ``name`` if present (setup only: rebuilding a group)."""
        if name in self.f:
            del self.f[name]
        if f"{CHECKSUMS}/{name}" in self.f:
            del self.f[f"{CHECKSUMS}/{name}"]

    def require_virtual(self, name: str, shape: tuple, dtype,
                        sources: list[tuple[str, str, int, int]]) -> None:
        """Create ``/name`` as an HDF5 virtual dataset of ``shape``/``dtype`` (fill 0).

        Args:
            sources: ``(file, dataset, first_row, n_rows)``: rows ``first_row ..
                first_row + n_rows - 1`` of ``/name`` are rows ``0 .. n_rows - 1`` of
                ``dataset`` in ``file``; ``file`` is relative to this cache's folder.
                Rows no source covers read as zeros.
        """
        dtype = self.state_dtype if is_state(name) else dtype
        layout = h5py.VirtualLayout(shape=tuple(shape), dtype=dtype)
        for file, dset, first, n in sources:
            if n:
                layout[first : first + n] = h5py.VirtualSource(
                    file, dset, shape=(n, *tuple(shape)[1:]), dtype=dtype)
        self.f.create_virtual_dataset(name, layout, fillvalue=0)

    def set_progress_done(self, group: str, n_chunks: int, chunk_size: int) -> None:
        """(Re)create ``/progress/<group>`` with every one of ``n_chunks`` chunks done (a
        group filled in one step, e.g. assembled from shards; same shape and attribute as
        :meth:`require_progress` makes, so a later run extending the file accepts it)."""
        self.drop(f"progress/{group}")
        ds = self.f.create_dataset(f"progress/{group}", data=np.ones(n_chunks, dtype=bool),
                                   track_times=False)
        ds.attrs["chunk_size"] = chunk_size

    def flush(self) -> None:
        self.f.flush()

    # -- chunk writes (raw data only) ------------------------------------------------------
    def write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[k]`` to row ``rows[k]`` of ``/name`` (any row order), rounded by numpy
        to the dataset's dtype first (float16 states: to nearest), so the stored values and
        their checksums agree."""
        rows = np.asarray(rows)
        order = np.argsort(rows, kind="stable")
        src = np.asarray(values)[order]
        with np.errstate(over="ignore"):  # an overflow is reported just below
            values = src.astype(self.f[name].dtype, copy=False)
        if values is not src and values.dtype.kind == "f" and not np.isfinite(values).all() \
                and np.isfinite(src).all():
            raise InputError(f"{self.tmp}: /{name}: a state exceeds {values.dtype}'s range "
                             f"(largest |x| {float(np.abs(src).max()):.4g}); precompute with --store-dtype float32")
        self.f[name][rows[order]] = values
        write_row_checksums(self.f, name, rows[order], values)

    def mark_done(self, group: str, chunk: int) -> None:
        """Flush the chunk's rows, then mark it done and flush again."""
        self.f.flush()
        self.f[f"progress/{group}"][chunk] = True
        self._marked = True
        self.f.flush()

    def close(self) -> None:
        """Close the file (if open) and release ``out``'s lock."""
        if self.f is not None:
            self.f.close()
            self.f = None
        self._lock.release()

    def discard_unstarted(self) -> None:
        """After a failure: remove the ``.tmp`` this writer created if no chunk of it was
        marked done (nothing to resume; e.g. a prompt too long for the model), so a rerun
        with fixed inputs does not meet a stale unfinished build."""
        if self._fresh and not self._marked and self.f is not None:
            self.f.close()
            self.f = None
            self.tmp.unlink(missing_ok=True)

    def finish(self) -> Path:
        """Check every chunk is done, close, rename ``out.tmp`` -> ``out``; return ``out``."""
        for g in self._all_groups(self.f):
            if not group_complete(self.f, g):
                raise RuntimeError(f"{self.tmp}: group {g} has chunks not done")
        seal(self.f)  # the sha256 of what changed until now (progress flags, row checksums)
        self.f.close()
        self.f = None
        os.replace(self.tmp, self.out)
        self.close()  # the lock last: nobody takes over before the rename
        return self.out


_ABSENT = object()


def _provenance_field_diff(a: dict, b: dict) -> str | None:
    """First key (sorted) whose value differs between ``a`` and ``b`` (absent counts), else None."""
    for k in sorted(set(a) | set(b)):
        if a.get(k, _ABSENT) != b.get(k, _ABSENT):
            return k
    return None


def virtual_source_files(f: h5py.File, path: Path) -> dict[Path, list[tuple[str, str, tuple]]]:
    """The other files ``f``'s virtual datasets read (``.`` = ``f`` itself is skipped).

    Returns:
        ``{source file (resolved against the cache's folder): [(virtual dataset, source
        dataset, shape of the block it fills), ...]}`` in the order found (llmsrec maps
        each whole source dataset onto one block of rows).
    """
    found: dict[Path, list] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            for m in obj.virtual_sources():
                if m.file_name == ".":
                    continue
                src = Path(m.file_name)
                src = src if src.is_absolute() else path.parent / src
                lo, hi = m.vspace.get_select_bounds()  # the block of /name this source fills
                found.setdefault(src, []).append((name, m.dset_name.lstrip("/"),
                                                  tuple(b - a + 1 for a, b in zip(lo, hi))))

    f.visititems(visit)
    return found


def _check_virtual_sources(f: h5py.File, path: Path, provenance: dict) -> None:
    """Check every file a virtual dataset reads (the shards of ``--assemble virtual``): it
    exists, has the cache's provenance, and holds the source dataset with the mapped shape.
    HDF5 itself would read a missing file or dataset as zeros or fail deep inside a read.

    Raises:
        InputError: one line naming the shard and what is wrong (missing file, unreadable,
            first differing provenance field, missing dataset, other shape).
    """
    for src, maps in virtual_source_files(f, path).items():
        name = maps[0][0]
        if not src.exists():
            raise InputError(f"{path}: /{name} is a virtual dataset over {src}, which is missing "
                             f"(a cache assembled with --assemble virtual needs its shard files beside it)")
        try:
            g = h5py.File(src, "r")
        except OSError as e:
            raise InputError(f"{path}: shard {src} is not a readable HDF5 file ({e})") from None
        with g:
            raw = g.attrs.get("provenance")
            if raw is None:
                raise InputError(f"{path}: shard {src} has no 'provenance' attribute (not a shard of this cache)")
            field = _provenance_field_diff(json.loads(raw), provenance)
            if field is not None:
                raise InputError(
                    f"{path}: shard {src} belongs to another cache: provenance field '{field}' differs "
                    f"(shard: {_short(json.loads(raw).get(field))}, cache: {_short(provenance.get(field))})")
            for vname, dset, shape in maps:
                if dset not in g or not isinstance(g[dset], h5py.Dataset):
                    raise InputError(f"{path}: shard {src} lacks /{dset}, which /{vname} reads "
                                     f"(an incomplete or foreign shard)")
                if g[dset].shape != tuple(shape):
                    raise InputError(f"{path}: shard {src} has /{dset} of shape {g[dset].shape}, "
                                     f"/{vname} maps {tuple(shape)}")


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


class CacheReader:
    """Read-only view of a finished cache (h5py opened with mode ``"r"``).

    Attributes:
        path: the file.
        provenance: dict parsed from the root attribute.
        views: the complete user views, in ``VIEW_ORDER``.
    All array methods return numpy arrays (row 0 = padding).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such cache file")
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as e:
            raise InputError(f"{self.path}: not a readable HDF5 file ({e})") from e
        self.provenance = read_provenance(self.f, self.path)
        try:
            _check_virtual_sources(self.f, self.path, self.provenance)
        except BaseException:
            self.f.close()
            raise
        present = [v for v in self.f.get("users", {}) if group_complete(self.f, f"users/{v}")]
        self.views = [v for v in VIEW_ORDER if v in present]

    def _view(self, view: str) -> h5py.Group:
        if view not in self.views:
            raise InputError(f"{self.path}: view {view!r} not in the cache "
                             f"(has {', '.join(self.views) or 'none'})")
        return self.f["users"][view]

    def _states(self, ds: h5py.Dataset) -> np.ndarray:
        """A state dataset, checked against its checksums as stored, then as float32."""
        return read_checked(ds, self.path).astype(np.float32, copy=False)

    @property
    def store_dtype(self) -> str:
        """How the states are stored: ``float32`` or ``float16`` (always read back as float32)."""
        return str(store_dtype(self.provenance))

    def item_hidden(self) -> np.ndarray:
        """float32 ``(N+1, d_llm)``: state at ``[ItemOut]`` of every item prompt."""
        return self._states(self.f["items/hidden"])

    def item_cf(self) -> np.ndarray:
        """float32 ``(N+1, d_cf)``: SASRec item embeddings E."""
        return read_checked(self.f["items/cf"], self.path)

    def user_hidden(self, view: str) -> np.ndarray:
        """float32 ``(U+1, d_llm)``: state at ``[UserOut]``; zero rows = no prompt."""
        return self._states(self._view(view)["hidden"])

    def user_cf(self, view: str) -> np.ndarray:
        """float32 ``(U+1, d_cf)``: SASRec O_u of the same input sequence."""
        return read_checked(self._view(view)["cf"], self.path)

    def targets(self, view: str) -> np.ndarray:
        """int64 ``(U+1,)``: target item of each user in ``view``."""
        return read_checked(self._view(view)["target"], self.path)

    def permutation(self, view: str) -> np.ndarray | None:
        """int16 ``(U+1, W)`` for shuffled views (-1 pads), None for original views."""
        g = self._view(view)
        return read_checked(g["permutation"], self.path) if "permutation" in g else None

    @property
    def readout_layers(self) -> tuple[int, ...]:
        """The cached readout layers (empty: the paper's last-layer out-token state only)."""
        return tuple(int(x) for x in self.provenance.get("readout_layers", ()))

    @property
    def prefixes(self) -> int:
        """K of the prefix view (1: the cache has none)."""
        return int(self.provenance.get("prefixes", 1))

    def readouts(self, group: str) -> dict[str, np.ndarray]:
        """``{"out_layers", "slots", "n_slots"}`` of ``items`` or a user view.

        Raises:
            InputError: the cache was built without ``--readout-layers`` (the message names
                the missing readout).
        """
        g = self._readout_group(group)
        return {k: self._states(g[k]) if is_state(k) else read_checked(g[k], self.path)
                for k in ("out_layers", "slots", "n_slots")}

    def _readout_group(self, group: str) -> h5py.Group:
        g = self.f["items"] if group == "items" else self._view(group)
        missing = [k for k in ("out_layers", "slots", "n_slots") if k not in g]
        if missing:
            raise InputError(f"{self.path}: readout '{missing[0]}' missing for {group} (the cache was built "
                             f"without --readout-layers; rebuild it with them, or train with --paper-settings)")
        return g

    def readout_shape(self, group: str, key: str) -> tuple[int, ...]:
        """Shape of readout ``key`` (``out_layers``: ``(R, nL, H)``; ``slots``: ``(R, S, nL, H)``) of a
        group, read from the file's metadata. Raises InputError as :meth:`readouts`."""
        return tuple(self._readout_group(group)[key].shape)

    def readout_into(self, group: str, key: str, dest: np.ndarray) -> np.ndarray:
        """Readout ``key`` of a group (checked) written into ``dest``, float32 of its shape (a view
        into a larger array is fine): :meth:`readouts`' values without its whole-array copies.
        Raises InputError as :meth:`readouts`, or when the data fail their checksum."""
        return read_checked_into(self._readout_group(group)[key], self.path, dest)

    def prefix_uids(self) -> np.ndarray:
        """int64 ``(U*K+1,)``: the user of each prefix-sample row (0: no sample)."""
        return read_checked(self._view(PREFIX_VIEW)["uid"], self.path)

    def params(self) -> dict[str, np.ndarray]:
        """``{"f_I/weight": (H, d), "f_I/bias": (H,), "tokens/user_out": (H,),
        "tokens/item_out": (H,)}`` float32."""
        p = self.f["params"]
        return {k: read_checked(p[k], self.path) for k in ("f_I/weight", "f_I/bias", "tokens/user_out",
                                       "tokens/item_out")}

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path) -> CacheReader:
    """Open a finished cache read-only. Raises InputError if missing or not a cache."""
    return CacheReader(path)
