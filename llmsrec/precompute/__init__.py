"""Frozen-LLM precompute: prompts (Table 2 (b)), special tokens, the fixed f_I fit and the
batched forward that fills the HDF5 cache (cache mode; the schema: docs/cache-schema.md)."""

from llmsrec.precompute.run import DEFAULT_VIEWS, precompute

__all__ = ["precompute", "DEFAULT_VIEWS"]
