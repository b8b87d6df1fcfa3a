"""llmsrec: LLM-SRec (distilling a frozen CF-SRec into a frozen LLM), cache-first.

Stages, left to right: data -> cfsrec -> precompute -> cache -> heads -> evaluate.
"""

__version__ = "0.1.0"
