"""The layout of a run folder (``llmsrec run``): its stages, their subfolders, and the
file digests the stages' ``stage.json`` records hold. A leaf module: the cache verifier
and the pipeline both read it."""

from __future__ import annotations

from pathlib import Path

from llmsrec.atomic import sha256_file

STAGES = ("prepare", "sasrec", "precompute", "train", "evaluate")
STAGE_DIRS = {"prepare": "data", "sasrec": "sasrec", "precompute": "cache", "train": "heads"}

_DIGESTS: dict = {}


def file_digest(path: str | Path) -> str:
    """sha256 hex of a file's bytes (memoised per path, size and mtime within a process)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]
