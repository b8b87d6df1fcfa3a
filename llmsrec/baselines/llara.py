"""LLaRA (Liao et al., 2024) as the paper's Next Item Retrieval baseline (Table 2 (b)).

Hybrid prompts: every history item is shown by its number, date, quoted title and one soft
token f_I(E_i) (the projected SASRec item embedding), and the item prompt by its title and
f_I(E_i): exactly LLM-SRec's prompts (``llmsrec-prompt-v1``, Table 2 (b) is shared). The LLM
is fine-tuned with LoRA; f_I, the ``[UserOut]``/``[ItemOut]`` vectors and f_user/f_item train
with it on L_Retrieval (Eq. 1) only. So LLaRA here is LLM-SRec's e2e mode with LoRA and
without L_Distill / L_Uniform.

Differences from the original LLaRA: the original generates the next item's title from a
candidate list with the language modelling loss, and moves from text-only to hybrid prompts
by curriculum learning; here the hybrid prompt is used from the first step and the model
is trained and scored by retrieval (Eq. 1, Eq. 9). f_I is e2e mode's (``--fi-arch``:
linear from the moment fit, or the authors' MLP), not LLaRA's own projector.
"""

from __future__ import annotations

from llmsrec.baselines.common import BaselineSpec, register
from llmsrec.precompute.prompts import TEMPLATE_VERSION

TEMPLATE = TEMPLATE_VERSION

SPEC = register(BaselineSpec(name="llara", display="LLaRA", template=TEMPLATE, lora=True, item_soft=True,
                             user_rep=False, needs_sasrec=True))
