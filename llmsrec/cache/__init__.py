"""The HDF5 cache of frozen-LLM states: schema, resumable atomic writer, read-only reader."""

from llmsrec.cache.store import (
    VIEW_ORDER, CacheReader, CacheWriter, open_cache, provenance_diff, tmp_path,
)

__all__ = ["open_cache", "CacheReader", "CacheWriter", "provenance_diff", "tmp_path",
           "VIEW_ORDER"]
