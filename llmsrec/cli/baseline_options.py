"""Options of the LLM4Rec baselines (``train --model tallrec|llara|collm|allmrec``), of
their training budget in ``compare`` / ``analyze --llm4rec``, and of ``compare --approach
generative``."""

from __future__ import annotations

import click

from llmsrec.cli.options import with_options
from llmsrec.defaults import ALLMREC_STAGE1, HEADS_TRAINING, LLM4REC_TRAINING, LORA


# defaults = llmsrec.baselines.LoraOptions() / Stage1Options(): defaults.LORA / ALLMREC_STAGE1
# (alpha shown as a float, the type of the option; checked by tests/test_baselines.py)
BASELINE_OPTIONS = [
    click.option("--lora-r", default=LORA["r"], show_default=True, type=click.IntRange(min=1),
                 help="tallrec/llara/collm: LoRA rank (the paper gives no LoRA settings; peft's common ones)."),
    click.option("--lora-alpha", default=float(LORA["alpha"]), show_default=True,
                 type=click.FloatRange(min=0, min_open=True),
                 help="tallrec/llara/collm: LoRA scaling, the update is alpha/r * B A."),
    click.option("--lora-dropout", default=LORA["dropout"], show_default=True,
                 type=click.FloatRange(0, 1, max_open=True),
                 help="tallrec/llara/collm: dropout on the adapters' input during training steps."),
    click.option("--lora-targets", default=",".join(LORA["targets"]), show_default=True,
                 help="tallrec/llara/collm: comma-separated names of the linear layers to adapt."),
    click.option("--stage1-epochs", default=ALLMREC_STAGE1["epochs"], show_default=True, type=click.IntRange(min=1),
                 help="allmrec: stage-1 (alignment) passes over the items, batches of "
                      f"{ALLMREC_STAGE1['batch_size']}."),
    click.option("--stage1-lr", default=ALLMREC_STAGE1["lr"], show_default=True,
                 type=click.FloatRange(min=0, min_open=True),
                 help="allmrec: stage-1 Adam learning rate."),
    click.option("--stage1-latent", default=ALLMREC_STAGE1["latent"], show_default=True, type=click.IntRange(min=1),
                 help="allmrec: width of the stage-1 codes (the aligned item embeddings)."),
]


baseline_options = with_options(BASELINE_OPTIONS)


def baseline_kwargs(model_name: str, kw: dict) -> tuple[dict, dict]:
    """Pop the LoRA / stage-1 options; refuse those set on the command line for another model."""
    ctx = click.get_current_context()
    lora_names, stage1_names = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"), \
        ("stage1_epochs", "stage1_lr", "stage1_latent")
    lora = {n.removeprefix("lora_"): kw.pop(n) for n in lora_names}
    stage1 = {n.removeprefix("stage1_"): kw.pop(n) for n in stage1_names}
    for names, models in ((lora_names, ("tallrec", "llara", "collm")), (stage1_names, ("allmrec",))):
        given = [f"--{n.replace('_', '-')}" for n in names
                 if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
        if given and model_name not in models:
            verb = "applies" if len(given) == 1 else "apply"
            raise click.UsageError(f"{', '.join(given)}: {verb} to --model {'|'.join(models)} only")
    return lora, stage1


# budget of the LLM4Rec baselines in `compare` and `analyze --llm4rec`: compare's defaults + TrainConfig's
LLM4REC_OPTIONS = [
    click.option("--llm4rec-epochs", default=LLM4REC_TRAINING["epochs"], show_default=True, type=click.IntRange(min=1),
                 help="LLM4Rec baselines: maximum epochs (paper, Appendix E: 10; one ml-100k epoch is 48 "
                      "steps of ~30 s on 2 CPU cores + 10 validations)."),
    click.option("--llm4rec-patience", default=LLM4REC_TRAINING["patience"], show_default=True,
                 type=click.IntRange(min=1),
                 help="LLM4Rec baselines: early-stopping patience in validations (paper: 10)."),
    click.option("--llm4rec-max-steps", default=None, type=click.IntRange(min=1),
                 help="LLM4Rec baselines: stop after N training steps, validated at the last one (a CPU "
                      "budget) [default: none]."),
    click.option("--llm4rec-eval-users", default=None, type=click.IntRange(min=1),
                 help="LLM4Rec baselines: select on a seeded sample of N validation users (test uses "
                      "every user) [default: all]."),
    click.option("--llm4rec-evals-per-epoch", default=HEADS_TRAINING["evals_per_epoch"], show_default=True,
                 type=click.IntRange(min=1),
                 help="LLM4Rec baselines: validations per epoch (paper: every tenth of an epoch)."),
    click.option("--llm4rec-batch-size", default=HEADS_TRAINING["batch_size"], show_default=True,
                 type=click.IntRange(min=1),
                 help="LLM4Rec baselines: users per step (paper: 20)."),
]


llm4rec_options = with_options(LLM4REC_OPTIONS)


def llm4rec_kwargs(kw: dict) -> dict:
    """Pop the --llm4rec-* options into TrainConfig / E2EOptions fields."""
    return {n: kw.pop(f"llm4rec_{n}") for n in ("epochs", "patience", "max_steps", "eval_users",
                                                "evals_per_epoch", "batch_size")}


#: m of ``compare --approach generative`` (``llmsrec.baselines.generative.GEN_NEGATIVES``; kept
#: here so the CLI loads without torch; checked by tests/test_generative.py)
GEN_NEGATIVES = 19

# the Next Item Title Generation approach of ``compare`` (llmsrec.experiments.generative)
GEN_OPTIONS = [
    click.option("--approach", type=click.Choice(["retrieval", "generative"]), default="retrieval", show_default=True,
                 help="retrieval: Next Item Retrieval (Eq. 1, Table 6). generative: Next Item Title Generation "
                      "(Eq. 5; Table 4 and Fig. 1a) for sasrec, tallrec, llara, collm, allmrec, budgeted by the "
                      "--llm4rec-* and --gen-* options (docs/results/generative.md)."),
    click.option("--gen-negatives", default=GEN_NEGATIVES, show_default=True, type=click.IntRange(min=1),
                 help="generative: m, stored negatives beside the target in each candidate set (the paper's 20 "
                      "candidates)."),
    click.option("--gen-length-norm", is_flag=True,
                 help="generative: rank candidates by mean log-probability per title token instead of the summed "
                      "log-probability of the title (both are stored)."),
    click.option("--gen-test-users", default=None, type=click.IntRange(min=1),
                 help="generative: score the test views on a seeded sample of N users (3-16 s per user and view "
                      "measured on a busy 2-core CPU with SmolLM2-135M) [default: all]."),
    click.option("--gen-lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="generative: Adam learning rate of LoRA, f_I and f_U."),
    click.option("--gen-shuffled-training/--no-gen-shuffled-training", default=True, show_default=True,
                 help="generative: also train every model on shuffled sequences (Table 4)."),
]


gen_options = with_options(GEN_OPTIONS)
