"""The paper's LLM4Rec baselines (Sec. 2, Table 2) in the Next Item Retrieval approach.

TALLRec, LLaRA, CoLLM (LoRA-fine-tuned LLM) and A-LLMRec (frozen LLM, two stages), each
trained with L_Retrieval (Eq. 1) in the e2e loop of :mod:`llmsrec.e2e.loop`: the LLM runs
on every step's prompts, so none of them can use the HDF5 cache (LoRA changes the LLM).
One module per model (its prompt template and simplifications against the original), the
shared trainer / LoRA / checkpoint plumbing in :mod:`llmsrec.baselines.common`.

Python API (what ``llmsrec train --model NAME`` / ``llmsrec evaluate --model NAME`` call):

* ``train_baseline(model, ds, sasrec, out, **opts) -> results dict`` (``fit_baseline``: the
  same in memory, nothing written)
* ``evaluate_baseline_checkpoint(ds, checkpoint, ...) -> {"valid", "test", "test-shuffled"}``
* ``baseline_scores(ds, checkpoint, views) -> {view: ViewScores(scores (U, 1+m), user (U, d'))}``
* ``checkpoint_kind(folder) -> evaluate --model name | None``; ``check_checkpoint_kind(folder, model)``

The same four in the Next Item Title Generation approach (Table 1, Eq. 5), scored by the
likelihood of each candidate's title: :mod:`llmsrec.baselines.generative`
(``train_generative``, ``fit_generative``, ``candidate_loglik``).
"""

from llmsrec.baselines.common import (
    BASELINES,
    DEFAULT_VIEWS,
    EVAL_VIEWS,
    BaselineData,
    BaselineFit,
    BaselineInputs,
    BaselineSpec,
    BaselineTrainer,
    LoraOptions,
    ViewScores,
    apply_lora,
    baseline_scores,
    build_item_prompts,
    build_prompts,
    check_checkpoint_kind,
    checkpoint_kind,
    evaluate_baseline_checkpoint,
    fit_baseline,
    get_spec,
    load_baseline_checkpoint,
    load_baseline_data,
    train_baseline,
    user_rep_id,
    view_scores,
)
from llmsrec.baselines import tallrec, llara, collm, allmrec  # noqa: E402,I001  (register the models)
from llmsrec.baselines.allmrec import Stage1Options, fit_stage1

__all__ = [
    "BASELINES",
    "DEFAULT_VIEWS",
    "EVAL_VIEWS",
    "BaselineData",
    "BaselineFit",
    "BaselineInputs",
    "BaselineSpec",
    "BaselineTrainer",
    "LoraOptions",
    "Stage1Options",
    "ViewScores",
    "apply_lora",
    "baseline_scores",
    "build_item_prompts",
    "build_prompts",
    "check_checkpoint_kind",
    "checkpoint_kind",
    "evaluate_baseline_checkpoint",
    "fit_baseline",
    "fit_stage1",
    "get_spec",
    "load_baseline_checkpoint",
    "load_baseline_data",
    "train_baseline",
    "user_rep_id",
    "view_scores",
    "tallrec",
    "llara",
    "collm",
    "allmrec",
]
