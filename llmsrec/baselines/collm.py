"""CoLLM (Zhang et al., 2023) as the paper's Next Item Retrieval baseline (Table 2 (c)).

The user prompt opens with the user representation from the recommendation model, a soft
token Z_u = f_U(O_u) (O_u: the CF-SRec user representation of the same, possibly shuffled,
input sequence), then lists the history like LLaRA (title + f_I(E_i) per item); the item
prompt is LLaRA's. The LLM is fine-tuned with LoRA; f_I, f_U, the ``[UserOut]``/``[ItemOut]``
vectors and f_user/f_item train with it on L_Retrieval (Eq. 1) only.

Differences from the original CoLLM: the original generates a Yes/No answer with the
language modelling loss and trains in two steps (LoRA on text-only prompts first, then the
collaborative-embedding mapping with LoRA frozen); here everything trains jointly from the
first step and the model is trained and scored by retrieval (Eq. 1, Eq. 9). Its CF model
is the SASRec teacher (as in the paper), and f_I/f_U follow ``--fi-arch`` (linear from the
moment fit, or the MLP Linear-LayerNorm-LeakyReLU-Linear) instead of CoLLM's own MLP.

The user-representation slot is a ``[HistoryEmb]`` token with a sentinel id
(:func:`llmsrec.baselines.common.user_rep_id`).
"""

from __future__ import annotations

from llmsrec.baselines.common import USER_REP, BaselineSpec, register, register_template
from llmsrec.precompute.llm import USER_OUT
from llmsrec.precompute.prompts import TEMPLATE_VERSION, TEMPLATES

#: Table 2 (c): the user-representation slot first, then LLaRA's history; LLaRA's item prompt
TEMPLATE = register_template("collm-prompt-v1", {
    **TEMPLATES[TEMPLATE_VERSION],
    "user_open": "This is user representation from recommendation models: " + USER_REP + ", and this user "
                 "has made a series of {verb} in the following order: (History Item List: ",
    "user_close": "). Based on this sequence of {verb} and user representation, generate user "
                  "representation token: " + USER_OUT,
})

SPEC = register(BaselineSpec(name="collm", display="CoLLM", template=TEMPLATE, lora=True, item_soft=True,
                             user_rep=True, needs_sasrec=True))
