"""safetensors files written byte-for-byte reproducibly, and headers read before any tensor.

Two concerns of every checkpoint llmsrec writes or reads:

- **Reproducible bytes.** ``safetensors.save(..., metadata=...)`` serializes the metadata
  from a Rust hash map, so its key order (and the file's sha256) changes from call to call.
  llmsrec identifies a teacher by its file digest, so two identical trainings must write
  identical files: :func:`canonical` rewrites the header as sorted JSON (the tensor bytes
  are untouched), and :func:`save_torch` / :func:`save_numpy` return such bytes.
- **Sizes from a file, checked first.** :func:`read_header` reads only the JSON header
  (bounded, offsets checked against the file size) so a loader can compare every size a
  ``config.json`` claims with the tensors actually stored before it builds a module
  (:func:`check_module_shapes`): a crafted config cannot make it allocate more than the
  file holds.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Mapping

import safetensors.numpy

from llmsrec.errors import InputError

#: largest JSON header accepted (safetensors itself allows 100 MB)
MAX_HEADER_BYTES = 100 * 1000 * 1000
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def canonical(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in one canonical form.

    Keys (tensor names, ``__metadata__`` and its keys) sorted, no spaces, padded with
    spaces to a multiple of 8 bytes as safetensors does; the tensor bytes follow unchanged
    (their offsets are relative to the end of the header, so they stay valid).

    Raises:
        ValueError: ``data`` is not a safetensors byte string.
    """
    if len(data) < 8:
        raise ValueError("not a safetensors byte string (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def save_torch(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with a canonical header (:func:`canonical`): equal tensors
    and metadata always give equal bytes."""
    from safetensors.torch import save  # deferred: imports torch (this leaf serves torch-free readers too)

    return canonical(save(dict(tensors), metadata=dict(metadata) if metadata else None))


def save_numpy(arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """``safetensors.numpy.save`` with a canonical header (:func:`canonical`)."""
    return canonical(safetensors.numpy.save(dict(arrays), metadata=dict(metadata) if metadata else None))


def read_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor names -> ``(dtype, shape)`` from a safetensors file's header, reading nothing else.

    The header must be a JSON object of at most :data:`MAX_HEADER_BYTES`; every tensor's
    byte range must lie inside the file and match its dtype and shape.

    Raises:
        InputError: a missing or unreadable file, or a malformed header (the message names
            the file and what is wrong).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{p}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise InputError(f"{p}: not a safetensors file (header length {n} bytes, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{p}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError(f"{p}: not a safetensors file (header is not a JSON object)")
    data_bytes = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = dtype in _ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in (*shape, lo, hi))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"{p}: tensor {name!r}: malformed header entry")
        count = 1
        for d in shape:
            count *= d
        if not lo <= hi <= data_bytes or hi - lo != count * _ITEMSIZE[dtype]:
            raise InputError(f"{p}: tensor {name!r}: bytes {lo}..{hi} do not fit its shape {list(shape)} "
                             f"or the file ({data_bytes} data bytes)")
        out[name] = (dtype, shape)
    return out


def int_fields_bound(header: Mapping[str, tuple[str, tuple[int, ...]]], minimum: int = 4096) -> int:
    """A cap for the integer sizes of a config that describes the tensors in ``header``:
    no width, count or length of a module can exceed its largest stored dimension or its
    number of tensors (``minimum`` leaves room for sizes no weight shows, e.g. ``maxlen``)."""
    dims = [d for _, shape in header.values() for d in shape]
    return max([minimum, len(header), *dims])


def check_config_ints(config: Mapping[str, Any], bound: int, cfg_path: str | os.PathLike) -> None:
    """Refuse any integer (or integer in a list) of ``config`` above ``bound``.

    Raises:
        InputError: ``"<cfg_path>: field 'hidden' is 64000, more than the checkpoint's
            weights allow (at most N)"``.
    """
    for k, v in config.items():
        vals = v if isinstance(v, (list, tuple)) else [v]
        for x in vals:
            if isinstance(x, int) and not isinstance(x, bool) and x > bound:
                raise InputError(f"{cfg_path}: field {k!r} is {x}, more than the checkpoint's weights "
                                 f"allow (at most {bound})")


def check_module_shapes(build: Callable[[], Any], weights: str | os.PathLike, cfg_path: str | os.PathLike,
                        header: Mapping[str, tuple[str, tuple[int, ...]]] | None = None) -> None:
    """Build the module ``build()`` on torch's ``meta`` device (no memory) and compare every
    entry of its ``state_dict`` with the tensors stored in ``weights``.

    Call it before building the real module, after :func:`check_config_ints` (so building
    even the meta module is bounded).

    Raises:
        InputError: a tensor the config implies is missing from the file, has another
            shape, or the file holds one the config does not imply; the message names the
            tensor, both shapes and the config file.
    """
    import torch  # deferred: this leaf serves torch-free readers too

    header = read_header(weights) if header is None else header
    with torch.device("meta"):
        try:
            module = build()
        except (TypeError, ValueError) as e:
            raise InputError(f"{cfg_path}: {e}") from None
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for k, shape in want.items():
        if k not in header:
            raise InputError(f"{weights}: weights do not match {cfg_path}: tensor {k!r} missing")
        if header[k][1] != shape:
            raise InputError(f"{weights}: weights do not match {cfg_path}: tensor {k!r} has shape "
                             f"{list(header[k][1])}, the config implies {list(shape)}")
    extra = sorted(set(header) - set(want))
    if extra:
        raise InputError(f"{weights}: weights do not match {cfg_path}: tensor {extra[0]!r} is not part "
                         f"of the model it describes")


def check_checkpoint(weights: str | os.PathLike, cfg_path: str | os.PathLike, config: Mapping[str, Any],
                     build: Callable[[], Any]) -> None:
    """Everything a loader checks before it builds a module from a config file: the weights
    file's header (:func:`read_header`), every integer of ``config`` against the sizes it
    holds (:func:`check_config_ints`), then every tensor shape ``build()`` implies
    (:func:`check_module_shapes`).

    Raises:
        InputError: one line naming the file and the field or tensor that does not fit.
    """
    header = read_header(weights)
    check_config_ints(config, int_fields_bound(header), cfg_path)
    check_module_shapes(build, weights, cfg_path, header)
