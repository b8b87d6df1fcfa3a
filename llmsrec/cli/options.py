"""Options several ``llmsrec`` commands share, and the parsing of their values.

Each ``*_OPTIONS`` list is a group of click options (the LLM4Rec baselines' are in
``llmsrec.cli.baseline_options``); ``with_options(LIST)`` adds them to a command in list order. Defaults come from ``llmsrec.defaults``, which the stages' signatures
read too, so the CLI and the Python API agree (tests/test_defaults.py).
"""

from __future__ import annotations

import click
from click.core import ParameterSource

from llmsrec.data.views import ALL_VIEWS
from llmsrec.defaults import (
    E2E,
    HEADS_FAST,
    HEADS_TRAINING,
    HISTORY_WINDOW,
    LLM,
    LLMSREC_HEADS,
)
from llmsrec.errors import InputError

#: the CF-SRec models (``llmsrec.cfsrec.MODELS``; --model of ``cfsrec train``, --teacher of ``compare``)
CF_MODEL_NAMES = ["sasrec", "gru4rec", "bert4rec", "nextitnet"]


def with_options(options: list):
    """A decorator that adds the click ``options`` to a command, in list order."""
    def add(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return add


def parse_views(views: str) -> list[str]:
    """``--views`` "a,b,c" -> ["a", "b", "c"], each a known view (InputError otherwise)."""
    view_list = [v.strip() for v in views.split(",") if v.strip()]
    for v in view_list:
        if v not in ALL_VIEWS:
            raise InputError(f"--views: unknown view {v!r} (expected {', '.join(ALL_VIEWS)})")
    return view_list


# Options of the frozen-LLM forward, shared by `precompute` and `run`.
LLM_OPTIONS = [
    click.option("--llm", default=LLM["llm"], show_default=True,
                 help="Frozen LLM: 'smollm2-135m' (bundled GGUF), a local Hugging Face folder, or "
                      "a model id already in the local HF cache (never downloaded)."),
    click.option("--history-window", default=HISTORY_WINDOW, show_default=True, type=click.IntRange(min=1),
                 help="Last W history items shown in a user prompt."),
    click.option("--batch-tokens", default=LLM["batch_tokens"], show_default=True, type=click.IntRange(min=1),
                 help="Token budget of one padded batch (batch size x longest prompt)."),
    click.option("--device", default="cpu", show_default=True,
                 help="Device of the LLM forward: cpu, cuda[:N] or hpu."),
    click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                 help="Compute dtype of the LLM [default: fp32 on CPU, bf16 on GPU/HPU]."),
    click.option("--threads", default=None, type=click.IntRange(min=1),
                 help="torch CPU threads of the LLM forward [default: torch's choice]."),
    click.option("--fi", default=LLM["fi"], show_default=True, type=click.Choice(["moment", "ridge"]),
                 help="Fixed f_I of cache mode. moment: PCA-whitened SASRec E laid on the top "
                      "principal axes of the token embeddings (keeps all of E); ridge: ridge fit "
                      "to each title's mean token embedding (loses most of E, see README)."),
]

llm_options = with_options(LLM_OPTIONS)


def train_llm_options(f):
    """``llm_options`` with train's --device help (cache mode places only the heads there)."""
    f = llm_options(f)
    for p in f.__click_params__:  # click.option made a fresh Option for this command
        if p.name == "device":
            p.help = ("Device of the heads (--mode cache) or of the LLM forward and the heads (--mode e2e, "
                      "the LLM4Rec baselines): cpu, cuda[:N] or hpu.")
    return f


def parse_layers(text: str) -> tuple[int, ...] | str:
    """``--readout-layers`` "8,16,24,30" -> (8, 16, 24, 30); "none" or "" -> (); "auto" -> "auto"."""
    text = (text or "").strip().lower()
    if text in ("", "none"):
        return ()
    if text == "auto":
        return "auto"
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--readout-layers {text!r}: expected comma-separated layer numbers or 'none'") from None
    if any(x < 1 for x in out):
        raise InputError(f"--readout-layers {text!r}: layers are numbered from 1")
    return out


# What the cache keeps beyond the paper's last-layer out-token state (`precompute`, `run`).
CACHE_READOUT_OPTIONS = [
    click.option("--readout-layers", default="auto", show_default=True,
                 help="Layers whose states are also cached at the out token and at every history "
                      "soft token, e.g. 8,16,24,30; 'auto' = 4/15, 8/15, 12/15 and all of the depth "
                      "(8,16,24,30 of SmolLM2-135M); 'none' = the paper's last-layer "
                      "[UserOut]/[ItemOut] state only. "
                      "Needed by --user-readout/--item-readout other than 'out'."),
    click.option("--template", default=LLM["template"], show_default=True,
                 type=click.Choice(["llmsrec-prompt-v1", "llmsrec-prompt-v1-userrep"]),
                 help="Prompt template: llmsrec-prompt-v1 = the paper's Table 2 (b); "
                      "llmsrec-prompt-v1-userrep = Table 11's prompt with the CF-SRec user "
                      "representation as a soft token up front (--prefixes 1 only)."),
]


cache_readout_options = with_options(CACHE_READOUT_OPTIONS)


FAST = "llmsrec.fast"  # ctx.meta key: --fast was given (on the command line or in a --config file)


def _fast(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--fast``: noted here, applied by :func:`head_kwargs` once every option has its value."""
    if value:
        ctx.meta[FAST] = True


def fast_requested() -> bool:
    """True when the running command was given ``--fast`` (flag or config file)."""
    return bool(click.get_current_context().meta.get(FAST))


def _apply_fast(out: dict) -> None:
    """HEADS_FAST into ``out`` (TrainConfig fields) for each of its options left at the built-in
    default: a value on the command line, or one in a --config file that differs from the
    default, wins (a file value equal to the default counts as the default, as everywhere,
    so ``--config RUN/config.toml --fast`` is the fast recipe). ``ctx.params`` is updated too,
    so the written config.toml holds the values used; the values applied are printed."""
    ctx = click.get_current_context()
    applied = {}
    for name, value in HEADS_FAST.items():
        if ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT):
            out[name] = applied[name] = value
            ctx.params[name] = value
    kept = [n for n in HEADS_FAST if n not in applied]
    click.echo("--fast: " + (", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in applied.items()) or "nothing")
               + (f" (given: {', '.join(kept)})" if kept else ""), err=True)


def _fast_help() -> str:
    preset = ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in HEADS_FAST.items())
    return ("The cache-mode heads' recipe for iterating: " + preset + ", each unless given (on the "
            "command line, or in a --config file with a value other than the default). About 30x less "
            "training than the defaults; on ml-100k validation NDCG@10 within their seed spread, test "
            "0.006 lower (docs/results/speed.md). Add --step-dtype bf16 for faster steps still. Not with "
            "--paper-settings.")


HEAD_OPTIONS = [
    click.option("--fast", is_flag=True, is_eager=True, expose_value=False, callback=_fast, help=_fast_help()),
    click.option("--paper-settings", is_flag=True,
                 help="The paper's heads: 3 sampled negatives, 10 epochs, patience 10, one training "
                      "sample per user, last-layer [UserOut]/[ItemOut] readouts (overrides "
                      "--train-negatives, --epochs, --patience, --prefixes, --user-readout, "
                      "--item-readout)."),
    click.option("--prefixes", default=LLMSREC_HEADS["prefixes"], show_default=True, type=click.IntRange(min=1),
                 help="Training samples per user: its K latest cutoffs before the validation target "
                      "(paper F.5; needs a cache precomputed with >= K; 1 = the paper's setting)."),
    click.option("--user-readout", default=LLMSREC_HEADS["user_readout"], show_default=True,
                 type=click.Choice(["out", "layers", "slots", "layers+slots"]),
                 help="What f_user reads: out = last-layer [UserOut] state (paper); layers = a learned "
                      "mix of the cached layers at [UserOut]; slots = the history soft tokens' states, "
                      "attention-pooled; layers+slots = both."),
    click.option("--item-readout", default=LLMSREC_HEADS["item_readout"], show_default=True,
                 type=click.Choice(["out", "layers", "soft", "layers+soft"]),
                 help="What f_item reads: out = last-layer [ItemOut] state (paper); layers = a mix of "
                      "the cached layers at [ItemOut]; soft = the layers at the item's own soft token; "
                      "layers+soft = both."),
    click.option("--epochs", default=HEADS_TRAINING["epochs"], show_default=True, type=click.IntRange(min=1),
                 help="Maximum epochs of the heads (one sample per user per epoch; paper: 10)."),
    click.option("--batch-size", default=HEADS_TRAINING["batch_size"], show_default=True, type=click.IntRange(min=1),
                 help="Users per step (paper: 20)."),
    click.option("--lr", default=HEADS_TRAINING["lr"], show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="Adam learning rate (paper: 1e-4)."),
    click.option("--beta1", default=HEADS_TRAINING["beta1"], show_default=True,
                 type=click.FloatRange(0, 1, max_open=True),
                 help="Adam beta1."),
    click.option("--beta2", default=HEADS_TRAINING["beta2"], show_default=True,
                 type=click.FloatRange(0, 1, max_open=True),
                 help="Adam beta2 (authors' code: 0.98)."),
    click.option("--weight-decay", default=HEADS_TRAINING["weight_decay"], show_default=True,
                 type=click.FloatRange(min=0),
                 help="Adam L2 weight decay."),
    click.option("--lr-decay", default=HEADS_TRAINING["lr_decay"], show_default=True,
                 type=click.FloatRange(0, 1, min_open=True),
                 help="Multiply the lr by this after every validation (authors' code: 0.95)."),
    click.option("--train-negatives", default=HEADS_TRAINING["train_negatives"], show_default=True,
                 help="Negatives per user in Eq. 1: 'all' = softmax over the whole catalogue "
                      "minus the history (chosen on ml-100k validation), or a count of sampled "
                      "ones (authors' code and paper setting: 3; never history or target)."),
    click.option("--evals-per-epoch", default=HEADS_TRAINING["evals_per_epoch"], show_default=True,
                 type=click.IntRange(min=1),
                 help="Validations per epoch (paper: every tenth of an epoch)."),
    click.option("--patience", default=HEADS_TRAINING["patience"], show_default=True, type=click.IntRange(min=1),
                 help="Early stop after this many validations without improvement (paper: 10)."),
    click.option("--select-metric", default=HEADS_TRAINING["select_metric"], show_default=True,
                 type=click.Choice(["NDCG@10", "HR@10", "NDCG@20", "HR@20"]),
                 help="Validation metric that selects the heads."),
    click.option("--hidden", default=HEADS_TRAINING["hidden"], show_default=True, type=click.IntRange(min=1),
                 help="Inner width of f_user / f_item."),
    click.option("--d-out", default=HEADS_TRAINING["d_out"], show_default=True, type=click.IntRange(min=1),
                 help="Output width d' of all heads."),
    click.option("--cf-hidden", default=HEADS_TRAINING["cf_hidden"], show_default=True, type=click.IntRange(min=1),
                 help="Inner width of f_CF-user."),
    click.option("--distill", default=HEADS_TRAINING["distill"], show_default=True,
                 type=click.Choice(["mse", "contrastive"]),
                 help="Distillation loss: mse (Eq. 2) or contrastive (Eq. 10, Appendix F.3)."),
    click.option("--no-distill", is_flag=True, help="Drop L_Distill (Table 7 ablations)."),
    click.option("--no-uniform", is_flag=True, help="Drop L_Uniform (Table 7 ablations)."),
    click.option("--retrieval-weight", default=HEADS_TRAINING["retrieval_weight"], show_default=True,
                 type=float, help="Weight of Eq. 1."),
    click.option("--distill-weight", default=HEADS_TRAINING["distill_weight"], show_default=True,
                 type=float, help="Weight of Eq. 2 / 10."),
    click.option("--uniform-weight", default=HEADS_TRAINING["uniform_weight"], show_default=True,
                 type=float, help="Weight of Eq. 3."),
    click.option("--contrastive-temperature", default=HEADS_TRAINING["contrastive_temperature"], show_default=True,
                 type=click.FloatRange(min=0, min_open=True), help="Temperature of Eq. 10."),
]
head_options = with_options(HEAD_OPTIONS)

#: ``train --step-dtype`` and ``run --step-dtype`` (not a TrainConfig field: it changes how a
#: step is computed, not what is trained)
step_dtype_option = click.option(
    "--step-dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]),
    help="Cache-mode heads: dtype of the training steps. bf16 = bfloat16 autocast of the forward "
         "(~3x faster steps on a CPU with avx512_bf16; weights, Adam, losses and validation stay "
         "fp32; results within about the seed spread, not identical).")


def stream_options(f):
    """``--stream/--in-memory`` and ``--shuffle-buffer``: how cache-mode heads read the user
    views (``train`` and ``sweep``; ``llmsrec.heads.train.load_cached_tensors``)."""
    f = click.option("--shuffle-buffer", default=None, type=click.IntRange(min=0),
                     help="--stream: rows shuffled together in memory per epoch (0: the whole view, the "
                          "in-memory order and results) [default: 65536].")(f)
    return click.option("--stream/--in-memory", "stream", default=None,
                        help="cache mode: read the user views from the cache as training needs them (--stream; "
                             "for a cache larger than memory; out readouts, --prefixes 1) or load them "
                             "(--in-memory) [default: stream when they exceed half the free memory]. Under "
                             "torchrun each process then reads only its rows. docs/scaling.md.")(f)


def head_kwargs(kw: dict) -> dict:
    """Pop the head options out of a command's kwargs into TrainConfig fields."""
    names = ["epochs", "batch_size", "lr", "beta1", "beta2", "weight_decay", "lr_decay", "evals_per_epoch",
             "patience", "select_metric", "hidden", "d_out", "cf_hidden", "retrieval_weight",
             "distill_weight", "uniform_weight", "contrastive_temperature", "prefixes", "user_readout",
             "item_readout"]
    out = {n: kw.pop(n) for n in names}
    out["train_negatives"] = kw.pop("train_negatives")  # checked by TrainConfig
    distill, no_distill, no_uniform = kw.pop("distill"), kw.pop("no_distill"), kw.pop("no_uniform")
    out["distill"] = "none" if no_distill else distill
    out["uniform"] = not no_uniform
    if fast_requested():
        if kw.get("paper_settings"):
            raise InputError("--fast and --paper-settings: choose one (each sets the heads' schedule)")
        _apply_fast(out)
    if kw.pop("paper_settings"):
        out.update(train_negatives=3, epochs=10, patience=10, prefixes=1, user_readout="out",
                   item_readout="out")
    return out


E2E_OPTIONS = [
    click.option("--fi-arch", default=E2E["fi_arch"], show_default=True, type=click.Choice(["linear", "mlp"]),
                 help="e2e: trainable f_I. linear: initialised from the --fi fit (e2e starts where "
                      "cache mode is); mlp: the authors' Linear-LayerNorm-LeakyReLU-Linear."),
    click.option("--grad-batch-tokens", default=E2E["grad_batch_tokens"], show_default=True, type=click.IntRange(min=1),
                 help="e2e: padded tokens of one forward that keeps its graph; a step with more runs "
                      "in two passes with exact gradients (raise it on a large GPU)."),
    click.option("--grad-checkpointing", is_flag=True,
                 help="e2e: recompute layer activations in the backward (less memory, more time)."),
    click.option("--max-steps", default=None, type=click.IntRange(min=1),
                 help="e2e: stop after N training steps (validated at the last one) [default: none]."),
    click.option("--eval-users", default=None, type=click.IntRange(min=1),
                 help="e2e: select on a seeded sample of N validation users (recorded; test uses "
                      "every user) [default: all]."),
]


e2e_options = with_options(E2E_OPTIONS)


def refuse_unused(reason: str, also=()) -> None:
    """Refuse options of the running command given on the command line (not defaults) that
    do nothing here: every --llm4rec-* option and those named in ``also``. InputError: one
    line, exit 2."""
    ctx = click.get_current_context()
    given = [max(p.opts, key=len) for p in ctx.command.params
             if isinstance(p, click.Option) and (p.name.startswith("llm4rec_") or p.name in also)
             and ctx.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        raise InputError(f"{', '.join(given)}: {'applies' if len(given) == 1 else 'apply'} {reason}")
