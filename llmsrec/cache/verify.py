"""Checksums of a cache file, and checking an unfinished build or a finished file with them.

What llmsrec records while it writes a cache (HDF5's own ``fletcher32`` is not enough: a
zeroed block has a valid fletcher32 of 0):

- every dataset written whole at setup (SASRec E and O_u, targets, permutations, f_I and
  the token vectors, a shard's rows) gets a ``sha256`` attribute of its bytes;
- every ``hidden`` dataset, written a chunk of rows at a time, gets one CRC-32 per row in
  ``/checksums/<dataset>`` (``uint32``; 0 = row not written), written with the row;
- when the file is finished, every other dataset (the progress flags, the row checksums)
  gets its ``sha256`` too (:func:`seal`).

Then:

- readers check what they read (:func:`read_checked`): a changed value is one line naming
  the file and dataset, so ``train --cache`` never trains on damaged rows;
- a resumed build keeps a group's finished chunks only if they verify
  (:func:`unverified_groups`) and starts over when its structure is damaged
  (:func:`damaged_build`);
- ``llmsrec verify PATH`` checks everything (:func:`verify_cache`, :func:`verify_path`).

Caches written before checksums still open; ``verify`` names what it could not check.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from safetensors import safe_open

from llmsrec.data import dataset_digest
from llmsrec.errors import InputError
from llmsrec.run_layout import STAGE_DIRS, file_digest
from llmsrec.safetensors_io import read_header

#: rows read at once when a dataset is checked (bounded memory for a big cache)
BLOCK_ROWS = 4096
PARAMS = ("params/f_I/weight", "params/f_I/bias", "params/tokens/user_out", "params/tokens/item_out")
CHECKSUMS = "checksums"


def crc_name(name: str) -> str:
    """The row-checksum dataset of a ``hidden`` dataset: ``checksums/<name>``."""
    return f"{CHECKSUMS}/{name.lstrip('/')}"


def sha256_of(values: np.ndarray) -> str:
    """sha256 hex of an array's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(values).reshape(-1).view(np.uint8)).hexdigest()


def row_crcs(values: np.ndarray, dtype=np.float32) -> np.ndarray:
    """CRC-32 of each row of ``values`` as stored in ``dtype``: uint32 ``(len(values),)``."""
    v = np.ascontiguousarray(values, dtype=dtype).reshape(len(values), -1).view(np.uint8)
    return np.fromiter((zlib.crc32(r) for r in v), dtype=np.uint32, count=len(v))


def record_written(f: h5py.File, name: str, given: bool) -> None:
    """After ``require`` created ``name``: its ``sha256`` when written whole (``given``), else
    (a ``hidden`` dataset filled later) its zeroed row-checksum dataset."""
    ds = f[name]
    if given:
        ds.attrs["sha256"] = sha256_of(ds[()])
    elif name.endswith("hidden") and ds.ndim == 2:
        crc = crc_name(name)
        if crc in f:
            del f[crc]
        f.create_dataset(crc, data=np.zeros(ds.shape[0], dtype=np.uint32), track_times=False)


def write_row_checksums(f: h5py.File, name: str, rows: np.ndarray, values: np.ndarray) -> None:
    """Record the CRC-32 of ``values`` written to ``rows`` (sorted) of ``name``, if it has checksums."""
    crc = crc_name(name)
    if crc in f:
        f[crc][rows] = row_crcs(values, f[name].dtype)


def seal(f: h5py.File) -> None:
    """When a build is complete: a ``sha256`` for every stored dataset that has none yet or
    changed since (progress flags, row checksums); ``hidden`` datasets rely on their rows'."""
    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and not obj.is_virtual and crc_name(name) not in f:
            obj.attrs["sha256"] = sha256_of(obj[()])

    f.visititems(visit)


def _problem(ds: h5py.Dataset, values: np.ndarray) -> str | None:
    """Why the full content ``values`` of ``ds`` does not match its checksums, or None."""
    want = ds.attrs.get("sha256")
    if want is not None and sha256_of(values) != want:
        return "its sha256 differs from the one recorded when it was written"
    f, crc = ds.file, crc_name(ds.name)
    if crc in f and values.ndim == 2:
        stored = f[crc][()]
        rows = np.flatnonzero(stored)
        if len(rows) and stored.shape[0] == values.shape[0]:
            bad = rows[row_crcs(values[rows], ds.dtype) != stored[rows]]
            if len(bad):
                return (f"{len(bad)} of its {len(rows)} written rows differ from their checksums "
                        f"(first: row {int(bad[0])})")
    return None


def checked(ds: h5py.Dataset) -> bool:
    """True when ``ds`` has something to be verified against (a sha256 or row checksums)."""
    return "sha256" in ds.attrs or crc_name(ds.name) in ds.file


def read_checked(ds: h5py.Dataset, path) -> np.ndarray:
    """``ds[()]`` checked against its recorded checksums (when it has them).

    Raises:
        InputError: ``"<path>: /users/test/hidden: 3 of its 943 written rows differ from
            their checksums (first: row 17): the file is damaged; rebuild it (precompute
            --force) or check it with `llmsrec verify`"`` (also for a failed HDF5 read).
    """
    try:
        values = ds[()]
    except OSError as e:
        why = _unreadable(e)
    else:
        why = _problem(ds, values)
        if why is None:
            return values
    raise _damaged(ds, path, why)


def _unreadable(e: OSError) -> str:
    return f"cannot be read back ({' '.join(str(e).split())[:100]})"


def _damaged(ds: h5py.Dataset, path, why: str) -> InputError:
    return InputError(f"{path}: {ds.name}: {why}: the file is damaged; rebuild it (precompute --force) or "
                      f"check it with `llmsrec verify`")


def read_checked_into(ds: h5py.Dataset, path, dest: np.ndarray, block_bytes: int = 8 << 20) -> np.ndarray:
    """:func:`read_checked` of ``ds`` written into ``dest`` (cast to its dtype), with no whole-array copy.

    A dataset checked by its ``sha256`` is read about ``block_bytes`` at a time (whole rows)
    into one of two small buffers, hashed by a second thread while the next block is read,
    and copied to ``dest``: one pass over the data instead of a read, a hashed copy and the
    caller's copy into place (the readouts of a cache are most of its bytes). Row-checksummed
    ``hidden`` datasets take :func:`read_checked`'s path.

    Args:
        dest: an array (or a view, e.g. ``out[:, :4, :]``) of ``ds``'s shape.
    Returns:
        ``dest``.
    Raises:
        InputError: as :func:`read_checked`.
        ValueError: ``dest`` of another shape (a caller's bug).
    """
    if dest.shape != ds.shape:
        raise ValueError(f"{ds.name}: shape {ds.shape}, destination {dest.shape}")
    want = ds.attrs.get("sha256")
    if crc_name(ds.name) in ds.file or not ds.shape or not ds.shape[0]:
        dest[...] = read_checked(ds, path)
        return dest
    n = ds.shape[0]
    rows = max(1, min(n, block_bytes // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:])))))
    digest = hashlib.sha256()
    # two buffers: a thread hashes block k (hashlib releases the GIL) while block k+1 is read
    bufs = [np.empty((rows, *ds.shape[1:]), dtype=ds.dtype) for _ in range(2 if want is not None else 1)]
    hashed: list = [None, None]  # the pending hash of each buffer's last block
    try:
        with ThreadPoolExecutor(1) as hasher:
            for k, lo in enumerate(range(0, n, rows)):
                b = k % len(bufs)
                if hashed[b] is not None:
                    hashed[b].result()  # that buffer's previous block is hashed: reuse it
                part = bufs[b][: min(rows, n - lo)]
                ds.read_direct(part, np.s_[lo : lo + len(part)])
                if want is not None:  # one worker: the blocks are hashed in order
                    hashed[b] = hasher.submit(digest.update, part.reshape(-1).view(np.uint8))
                dest[lo : lo + len(part)] = part
            for h in hashed:
                if h is not None:
                    h.result()
    except OSError as e:
        raise _damaged(ds, path, _unreadable(e)) from None
    if want is not None and digest.hexdigest() != want:
        raise _damaged(ds, path, "its sha256 differs from the one recorded when it was written")
    return dest


def _datasets(f: h5py.File) -> list[h5py.Dataset]:
    found = []
    f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def damaged_build(f: h5py.File) -> str | None:
    """Why an unfinished build cannot be resumed, or None.

    Damage a killed or disk-full run can leave: the f_I / token parameters only partly
    written (setup reads all four once one exists) or not matching their sha256, a
    dataset whose header cannot be read, a group marked (partly) done without its states,
    a progress dataset without its chunk size.
    """
    try:
        have = [p for p in PARAMS if p in f]
        if have and len(have) < len(PARAMS):
            return f"/{next(p for p in PARAMS if p not in f)} missing"
        for ds in _datasets(f):
            _ = ds.shape, ds.dtype  # the header must read
        for p in have:
            why = _problem(f[p], f[p][()])
            if why:
                return f"/{p}: {why}"
        for g in progress_groups(f):
            flags = f[f"progress/{g}"]
            if "chunk_size" not in flags.attrs:
                return f"/progress/{g} has no chunk size"
            if np.any(flags[()]) and f"{g}/hidden" not in f:
                return f"/progress/{g} marks chunks done but /{g}/hidden is missing"
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        return " ".join(str(e).split())[:120]
    return None


def progress_groups(f: h5py.File) -> list[str]:
    """The groups a cache tracks in ``/progress``: ``items`` and ``users/<view>``."""
    groups = []
    if "progress/items" in f:
        groups.append("items")
    if "progress/users" in f:
        groups += [f"users/{v}" for v in f["progress/users"]]
    return groups


def unverified_groups(f: h5py.File) -> list[tuple[str, str]]:
    """Groups with chunks marked done whose data does not match its checksums (or does not
    read back): ``[(group, reason)]``. Their finished chunks cannot be trusted."""
    bad = []
    for g in progress_groups(f):
        if not np.any(f[f"progress/{g}"][()]) or g not in f or not isinstance(f[g], h5py.Group):
            continue
        for ds in _datasets(f[g]):
            if ds.is_virtual:
                continue
            try:
                why = _problem(ds, ds[()])
            except OSError as e:
                why = " ".join(str(e).split())[:100]
            if why:
                bad.append((g, f"{ds.name}: {why}"))
                break
    return bad


def verify_cache(path) -> dict:
    """Read every stored value of a cache file and check it against its checksums.

    Returns:
        ``{"path", "datasets": n, "checked": [names verified], "unchecked": [names without
        checksums (written before llmsrec recorded them, or virtual)], "bad": [(name,
        reason)], "ok": bool}``; ``ok`` is False when a dataset does not match or read back,
        or the file does not open.
    """
    path = Path(path)
    rep = {"path": str(path), "datasets": 0, "checked": [], "unchecked": [], "bad": [], "ok": False}
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        rep["bad"].append(("/", f"not a readable HDF5 file ({' '.join(str(e).split())[:100]})"))
        return rep
    with f:
        for ds in _datasets(f):
            rep["datasets"] += 1
            try:
                why = _problem(ds, ds[()])
            except OSError as e:
                why = f"cannot be read back ({' '.join(str(e).split())[:100]})"
            if why:
                rep["bad"].append((ds.name, why))
            else:
                (rep["checked"] if checked(ds) and not ds.is_virtual else rep["unchecked"]).append(ds.name)
    rep["ok"] = not rep["bad"]
    return rep


def _verify_safetensors(path: Path) -> list[str]:
    """Problems of a safetensors file: a bad header, or a tensor that does not load."""
    try:
        read_header(path)
        with safe_open(str(path), framework="numpy") as f:
            for k in f.keys():
                f.get_tensor(k)
    except InputError as e:
        return [str(e)]
    except Exception as e:  # safetensors' own error types
        return [f"{path}: {' '.join(str(e).split())[:100]}"]
    return []


def verify_path(path, log=print) -> list[str]:
    """``llmsrec verify PATH``: check everything stored under ``PATH``, say what was checked.

    - an HDF5 cache (``*.h5``): every value is read; datasets with checksums are verified
      (:func:`verify_cache`), the others named as unchecked;
    - a ``*.safetensors`` file: its header against the file, then every tensor;
    - a folder: every cache and safetensors file in it (recursively), and every
      ``stage.json`` of a run folder: its stage's output must still have the digest
      recorded when the stage finished (what ``llmsrec run`` relies on to reuse it).

    Returns:
        the problems found, one line each (empty: everything verified).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    problems: list[str] = []
    for p in files:
        if p.name.startswith("."):
            continue
        if p.suffix == ".h5":
            rep = verify_cache(p)
            problems += [f"{p}: {name}: {why}" for name, why in rep["bad"]]
            log(f"{p}: {len(rep['checked'])} of {rep['datasets']} datasets verified by checksum"
                + (f", {len(rep['unchecked'])} read without one (written before checksums)" if rep["unchecked"] else "")
                + (f", {len(rep['bad'])} damaged" if rep["bad"] else ""))
        elif p.suffix == ".safetensors":
            bad = _verify_safetensors(p)
            problems += bad
            log(f"{p}: {'damaged' if bad else 'header and tensors read'}")
        elif p.name == "stage.json" and p.parent.name in STAGE_DIRS.values():
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                problems.append(f"{p}: unreadable ({e})")
                continue
            if rec.get("status") != "done":
                log(f"{p}: stage {rec.get('stage')} not finished ({rec.get('status')})")
                continue
            output = {"data": None, "sasrec": "model.safetensors", "cache": "cache.h5",
                      "heads": "heads.safetensors"}[p.parent.name]
            try:
                if output is None:
                    now = dataset_digest(p.parent)
                else:
                    now = file_digest(p.parent / output)
            except OSError as e:
                problems.append(f"{p.parent}: output missing ({e.strerror or e})")
                continue
            if now != rec.get("output_digest"):
                problems.append(f"{p.parent}: output changed since the stage finished (digest {now[:12]}..., "
                                f"recorded {str(rec.get('output_digest'))[:12]}...)")
            else:
                log(f"{p.parent}: output as recorded by stage {rec.get('stage')}")
    return problems
