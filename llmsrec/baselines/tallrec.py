"""TALLRec (Bao et al., 2023) as the paper's Next Item Retrieval baseline (Table 2 (a)).

Prompts carry text only: the user prompt lists the last W history items with number, date
and quoted title (no ``[HistoryEmb]``), the item prompt gives the quoted title; no CF-SRec
input at all (``--sasrec`` is optional). The LLM is fine-tuned with LoRA; the
``[UserOut]``/``[ItemOut]`` input vectors and f_user/f_item train with it, on L_Retrieval
(Eq. 1) only.

Differences from the original TALLRec, all following the paper's Sec. 2.1.2 setting:
the original asks the LLM a Yes/No question about one candidate and trains the language
modelling loss on the answer; here the states at ``[UserOut]``/``[ItemOut]`` are scored by
the heads' dot product (Eq. 9) against 1 target + sampled negatives, and evaluated on the
stored 99 negatives. The original's two tuning stages (Alpaca instruction tuning, then
recommendation tuning) are one stage here (recommendation only).
"""

from __future__ import annotations

from llmsrec.baselines.common import BaselineSpec, register, register_template
from llmsrec.precompute.llm import ITEM_OUT
from llmsrec.precompute.prompts import TEMPLATE_VERSION, TEMPLATES

#: Table 2 (a): LLM-SRec's user prompt without the item slots, and a title-only item prompt
TEMPLATE = register_template("tallrec-prompt-v1", {
    **TEMPLATES[TEMPLATE_VERSION],
    "user_item": "[No.{number} Time: {date} Title: \"{title}\"]",
    "item": "The item title is as follows: \"Title\": \"{title}\", then generate item representation "
            "token: " + ITEM_OUT,
})

SPEC = register(BaselineSpec(name="tallrec", display="TALLRec", template=TEMPLATE, lora=True, item_soft=False,
                             user_rep=False, needs_sasrec=False))
