"""The LLM in the loop: training that runs the frozen LLM on every step's prompts.

- :mod:`llmsrec.e2e.loop`: LLM-SRec's paper-faithful end-to-end mode (``llmsrec train
  --mode e2e``) and the machinery the LLM4Rec baselines (:mod:`llmsrec.baselines`) share
  with it: differentiable LLM inputs, gradient caching, ``fit_e2e``.
- :mod:`llmsrec.e2e.refine`: ``llmsrec refine-tokens``, the out-token refinement of cache
  mode through single-position forwards over cached prefixes.
"""

from llmsrec.e2e.loop import E2EData, E2EOptions, evaluate_e2e_checkpoint, fit_e2e, train_e2e
from llmsrec.e2e.refine import refine_tokens

__all__ = ["E2EData", "E2EOptions", "evaluate_e2e_checkpoint", "fit_e2e", "refine_tokens", "train_e2e"]
