"""llmsrec: LLM-SRec (distilling a frozen CF-SRec into a frozen LLM), cache-first.

Stages, each importing only the ones before it (tests/test_architecture.py): data ->
cfsrec -> cache -> precompute -> heads -> e2e -> baselines -> evaluate -> pipeline ->
experiments -> cli, over leaf modules (errors, metrics, training, ...).
"""

__version__ = "0.1.0"
