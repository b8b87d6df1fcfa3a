"""Checking a cache file: the structure of an unfinished build, and the stored data.

Every dataset a cache writer creates carries HDF5's ``fletcher32`` checksum, one per
stored chunk, written with the data and checked by HDF5 on every read. So a damaged
byte range (a zeroed block, a torn write) makes the read of its chunk fail instead of
returning wrong numbers:

- readers turn that failure into one line naming the file and the dataset
  (:func:`read_checked`), so ``train --cache`` never trains on damaged rows;
- a resumed build keeps a group's finished chunks only if its data reads back
  (:func:`unreadable_groups`), and starts over when its structure is damaged
  (:func:`damaged_build`);
- ``llmsrec verify PATH`` reads everything (:func:`verify_cache`).

Caches written before checksums existed still open; ``verify`` reports which of their
datasets it could not check.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from llmsrec.errors import InputError

#: rows read at once when a dataset is checked (bounded memory for a big cache)
BLOCK_ROWS = 4096
PARAMS = ("params/f_I/weight", "params/f_I/bias", "params/tokens/user_out", "params/tokens/item_out")


def checksum_options(shape) -> dict:
    """``create_dataset`` keywords of a checksummed dataset of ``shape``: fletcher32 on
    chunks of at most 16 rows (a chunk write rewrites few neighbouring rows)."""
    shape = tuple(int(s) for s in shape)
    if not shape or 0 in shape:
        return {}  # HDF5 cannot chunk scalars or empty datasets; nothing to check there
    return {"fletcher32": True, "chunks": (min(shape[0], 16), *shape[1:])}


def read_checked(ds: h5py.Dataset, path, sel=()) -> np.ndarray:
    """``ds[sel]``; a failed read (a chunk that fails its checksum, damaged metadata) is an
    InputError naming the file and dataset instead of HDF5's traceback.

    Raises:
        InputError: ``"<path>: /users/test/hidden cannot be read back (...): the file is
            damaged; rebuild it (precompute --force) or check it with `llmsrec verify`"``.
    """
    try:
        return ds[sel]
    except OSError as e:
        raise InputError(f"{path}: {ds.name} cannot be read back ({' '.join(str(e).split())[:100]}): the file "
                         f"is damaged; rebuild it (precompute --force) or check it with `llmsrec verify`") from None


def _datasets(f: h5py.File) -> list[h5py.Dataset]:
    found = []
    f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _read_all(ds: h5py.Dataset) -> None:
    """Read every row of ``ds`` (in blocks); raises OSError on a checksum or read failure."""
    if ds.shape == ():
        ds[()]
        return
    for s in range(0, ds.shape[0], BLOCK_ROWS):
        ds[s : s + BLOCK_ROWS]


def damaged_build(f: h5py.File) -> str | None:
    """Why an unfinished build cannot be resumed, or None.

    Damage a killed or disk-full run can leave: the f_I / token parameters only partly
    written (setup reads all four once one exists), a dataset whose header cannot be read,
    a group marked (partly) done without its states, a progress dataset without its
    chunk size.
    """
    try:
        have = [p for p in PARAMS if p in f]
        if have and len(have) < len(PARAMS):
            return f"/{next(p for p in PARAMS if p not in f)} missing"
        for ds in _datasets(f):
            _ = ds.shape, ds.dtype  # the header must read
            if ds.name in {"/" + p for p in PARAMS}:
                _read_all(ds)
        for g in _progress_groups(f):
            flags = f[f"progress/{g}"]
            if "chunk_size" not in flags.attrs:
                return f"/progress/{g} has no chunk size"
            if np.any(flags[()]) and f"{g}/hidden" not in f:
                return f"/progress/{g} marks chunks done but /{g}/hidden is missing"
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        return " ".join(str(e).split())[:120]
    return None


def _progress_groups(f: h5py.File) -> list[str]:
    groups = []
    if "progress/items" in f:
        groups.append("items")
    if "progress/users" in f:
        groups += [f"users/{v}" for v in f["progress/users"]]
    return groups


def unreadable_groups(f: h5py.File) -> list[tuple[str, str]]:
    """Groups with chunks marked done whose datasets do not read back (a checksum failure):
    ``[(group, reason)]``. Their finished chunks cannot be trusted (or rewritten in place)."""
    bad = []
    for g in _progress_groups(f):
        if not np.any(f[f"progress/{g}"][()]) or g not in f:
            continue
        for ds in _datasets(f[g]) if isinstance(f[g], h5py.Group) else []:
            if ds.is_virtual:
                continue
            try:
                _read_all(ds)
            except OSError as e:
                bad.append((g, f"{ds.name}: {' '.join(str(e).split())[:100]}"))
                break
    return bad


def verify_cache(path) -> dict:
    """Read every stored value of a cache file; report what was checked.

    Returns:
        ``{"path", "datasets": n, "checked": [names with checksums], "unchecked": [names
        without (written before checksums, or virtual / empty)], "bad": [(name, reason)],
        "ok": bool}``; ``ok`` is False when a dataset does not read back or the file does
        not open.
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
                _read_all(ds)
            except OSError as e:
                rep["bad"].append((ds.name, " ".join(str(e).split())[:100]))
                continue
            (rep["checked"] if ds.fletcher32 and not ds.is_virtual else rep["unchecked"]).append(ds.name)
    rep["ok"] = not rep["bad"]
    return rep
