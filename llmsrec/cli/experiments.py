"""``llmsrec compare`` (Table 6 over seeds), ``llmsrec analyze`` (the paper's sequence
analyses on a run) and ``llmsrec sweep`` (head variants of a TOML grid on one cache)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from llmsrec.cli.config import config_option, write_config
from llmsrec.cli.generative import compare_generative_cli
from llmsrec.cli.guard import GuardedCommand
from llmsrec.cli.baseline_options import gen_options, llm4rec_kwargs, llm4rec_options
from llmsrec.cli.options import CF_MODEL_NAMES, llm_options, refuse_unused, step_dtype_option, stream_options
from llmsrec.defaults import LLMSREC_HEADS, SASREC_TRAINING
from llmsrec.devices import resolve_device


@click.command(cls=GuardedCommand)
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder: one run folder per model and seed, compare.json, compare.md.")
@click.option("--models", default="gru4rec,bert4rec,nextitnet,sasrec,llmsrec", show_default=True,
              help="Comma-separated models (columns in the paper's Table 6 order): gru4rec, bert4rec, "
                   "nextitnet, sasrec, ctrl, recformer, tallrec, llara, collm, allmrec, llmsrec.")
@click.option("--seeds", default="0", show_default=True,
              help="Comma-separated seeds, e.g. 0,1,2; the table shows mean ± std over them.")
@click.option("--cache", default=None, type=click.Path(dir_okay=False),
              help="llmsrec: an existing HDF5 cache of DATA (e.g. runs/demo/cache/cache.h5); the "
                   "heads are trained on it for every seed. llara/collm/allmrec: their CF-SRec is the "
                   "checkpoint that built it (found next to the cache or in OUT).")
@click.option("--teacher", default=None, type=click.Choice(CF_MODEL_NAMES),
              help="llmsrec without --cache, and llara/collm/allmrec: the CF-SRec (its first-seed run) "
                   "whose O_u and E the frozen LLM's cache is built from and the baselines read "
                   "[default: sasrec; with --cache the baselines use the cache's own teacher].")
@click.option("--epochs", default=SASREC_TRAINING["epochs"], show_default=True, type=click.IntRange(min=1),
              help="CF-SRec maximum epochs.")
@click.option("--patience", default=SASREC_TRAINING["patience"], show_default=True, type=click.IntRange(min=1),
              help="CF-SRec early-stopping patience (validations).")
@click.option("--eval-every", default=SASREC_TRAINING["eval_every"], show_default=True, type=click.IntRange(min=1),
              help="CF-SRec validation interval (epochs).")
@click.option("--batch-size", default=SASREC_TRAINING["batch_size"], show_default=True, type=click.IntRange(min=1),
              help="CF-SRec users per step.")
@click.option("--lr", default=SASREC_TRAINING["lr"], show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="CF-SRec Adam learning rate.")
@click.option("--maxlen", default=None, type=click.IntRange(min=1),
              help="Input window of every CF-SRec [default: 128].")
@click.option("--paper-heads", is_flag=True,
              help="llmsrec / llmsrec-nodistill: the paper's heads (one training sample per user, "
                   "last-layer [UserOut]/[ItemOut] readouts) instead of llmsrec's (--prefixes 5, "
                   "layers+slots / layers+soft readouts; the cache must hold them).")
@click.option("--text-encoder", default=None,
              help="ctrl, recformer: 'all-minilm-l6-v2' (bundled) or a local Hugging Face encoder folder "
                   "[default: all-minilm-l6-v2].")
@click.option("--ctrl-align-epochs", default=None, type=click.IntRange(min=0),
              help="ctrl: epochs of contrastive text/ID alignment before fine-tuning [default: 0, none].")
@click.option("--recformer-max-steps", default=None, type=click.IntRange(min=1),
              help="recformer: training-step budget (batches of 16 users) [default: 150].")
@llm_options
@llm4rec_options
@gen_options
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--force", is_flag=True, help="Retrain every run even if a matching one exists.")
@config_option
def compare(data_dir, out, models, seeds, cache, teacher, epochs, patience, eval_every, batch_size, lr, maxlen, paper_heads,
            text_encoder, ctrl_align_epochs, recformer_max_steps,
            llm, history_window, batch_tokens, device, dtype, threads, fi, approach, gen_negatives, gen_length_norm,
            gen_test_users, gen_lr, gen_shuffled_training, no_progress, force, **kw) -> None:
    """Table 6 on DATA: CF-SRec and LLM4Rec baselines and LLM-SRec on the same stored candidates.

    \b
    Trains (or reuses: same options and data -> OUT/<model>-seed<k>/ is kept) every
    model for every seed, evaluates all on the stored validation/test candidates, and
    writes OUT/compare.json and OUT/compare.md (metrics as rows, models as columns,
    mean ± sample std over seeds, best in bold). LLM-SRec trains its heads (`llmsrec
    train` defaults) for every seed on one fixed cache: --cache, or one built here from
    the --teacher run of the first seed with the LLM options (a full precompute).
    --device also places the CF-SRec training.
    tallrec, llara, collm, allmrec: the LLM4Rec baselines (`llmsrec train --model NAME`,
    Eq. 1 in the e2e loop, the LLM of --llm; llara/collm/allmrec read LLM-SRec's
    teacher), budgeted by the --llm4rec-* options: on 2 CPU cores one step costs ~30 s and
    one fully scored view ~6 min, so e.g. --llm4rec-max-steps 20 --llm4rec-eval-users 100
    --llm4rec-evals-per-epoch 2 (one validation, at step 20) is about 25 min per model
    and seed (steps, validation, test and test-shuffled); ~35-50 min with 1 thread each
    when two models share the 2 cores (ml-100k, SmolLM2-135M).
    ctrl, recformer: the LM-based baselines on --text-encoder (CTRL trains with the CF-SRec
    options above; RECFORMER with --recformer-max-steps, ~15 min per seed on one core at
    the default 150 steps on ml-100k).
    A third table gives the shuffled-inference change ratio (test vs test-shuffled) for
    every model that has it (CF-SRec, LLM4Rec, LLM-SRec when its cache has test-shuffled).
    OUT/config.toml gets every option's value (rerun with --config OUT/config.toml).
    --approach generative: the same four LLM4Rec baselines writing the next item's title
    among the target + --gen-negatives candidates (Eq. 5), ranked by each title's
    likelihood, with SASRec on the same candidates: Table 4 (shuffled training) and
    Fig. 1a (shuffled inference) in OUT/compare.md.
    """
    # deferred: torch
    from llmsrec.experiments.compare import compare as run_compare
    from llmsrec.experiments.compare import format_compare_md, parse_models, parse_seeds

    resolve_device(device)  # fail on a bad --device before any work
    gen_flags = ("gen_negatives", "gen_length_norm", "gen_test_users", "gen_lr", "gen_shuffled_training")
    if approach == "generative":
        if text_encoder is not None or ctrl_align_epochs is not None or recformer_max_steps is not None:
            raise click.UsageError("--text-encoder, --ctrl-align-epochs, --recformer-max-steps: not with "
                                   "--approach generative (ctrl and recformer are retrieval models)")
        compare_generative_cli(data_dir, out, models, seeds, cache, teacher, llm, history_window, device, dtype,
                            threads, fi, gen_negatives, gen_length_norm, gen_test_users, gen_lr,
                            gen_shuffled_training, no_progress, force, kw)
        return
    ctx = click.get_current_context()
    given = [f"--{n.replace('_', '-')}" for n in gen_flags
             if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        raise click.UsageError(f"{', '.join(given)}: {'applies' if len(given) == 1 else 'apply'} with "
                               f"--approach generative only")
    model_list, seed_list = parse_models(models), parse_seeds(seeds)
    if text_encoder is not None and not {"ctrl", "recformer"} & set(model_list):
        raise click.UsageError("--text-encoder applies when --models includes ctrl or recformer")
    if ctrl_align_epochs is not None and "ctrl" not in model_list:
        raise click.UsageError("--ctrl-align-epochs applies when --models includes ctrl")
    if recformer_max_steps is not None and "recformer" not in model_list:
        raise click.UsageError("--recformer-max-steps applies when --models includes recformer")
    model_options = {"*": {"maxlen": maxlen}} if maxlen else {}
    ctrl_opts = {k: v for k, v in (("text_encoder", text_encoder), ("align_epochs", ctrl_align_epochs))
                 if v not in (None, 0)}
    if ctrl_opts:
        model_options["ctrl"] = ctrl_opts
    if not {"tallrec", "llara", "collm", "allmrec"} & set(model_list):
        refuse_unused("when --models includes tallrec, llara, collm or allmrec")
        if not (any(m.startswith("llmsrec") for m in model_list) and cache is None):  # the second call sees only `also`
            refuse_unused("when a model runs the LLM: llmsrec without --cache, tallrec, llara, collm or allmrec",
                           also=("llm", "batch_tokens", "dtype", "fi"))
    res = run_compare(  # refuses --cache / --teacher when no asked model uses them
        data_dir, out, models=model_list, seeds=seed_list,
        cf_options=dict(epochs=epochs, patience=patience, eval_every=eval_every, batch_size=batch_size, lr=lr,
                        device=device),
        model_options=model_options or None,
        cache=cache, teacher=teacher, llm=llm,
        precompute_options=dict(history_window=history_window, batch_tokens=batch_tokens, device=device,
                                dtype=dtype, num_threads=threads, fi=fi),
        llm4rec_options=llm4rec_kwargs(kw),
        head_options={} if paper_heads else dict(LLMSREC_HEADS),
        recformer_options={"text_encoder": text_encoder, "max_steps": recformer_max_steps, "device": device},
        force=force, progress=not no_progress, log=lambda m: click.echo(m, err=True),
    )
    write_config(click.get_current_context(), out)
    click.echo(format_compare_md(res))
    click.echo(f"wrote {out}/compare.json and {out}/compare.md")


@click.command(cls=GuardedCommand)
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A run folder written by `llmsrec run` (data/, sasrec/, cache/, heads/).")
@click.option("--only", default=None,
              help="Comma-separated subset of: shuffled-inference, shuffled-training, similarity, "
                   "ablations, transition, warm-cold, over-smoothing, distillation, case-studies "
                   "[default: all nine].")
@click.option("--seeds", default=None,
              help="Model seeds, e.g. 0,1,2: numbers become mean ± std over them [default: the run's seed].")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Report folder [default: RUN/report].")
@click.option("--llm4rec", default=None,
              help="Comma-separated LLM4Rec baselines (tallrec, llara, collm, allmrec, or all) to add to "
                   "shuffled-inference, shuffled-training and similarity; each is trained (LLM forward "
                   "and backward passes) once per seed and twice for shuffled-training [default: none].")
@llm4rec_options
@click.option("--device", default="cpu", show_default=True,
              help="--llm4rec: device of the LLM4Rec models' LLM (cpu, cuda[:N] or hpu).")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="--llm4rec: torch CPU threads [default: torch's choice].")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the run's LLM folder its own Python code when a view is added to the cache (a run "
                   "folder cannot allow it).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def analyze(run_dir, only, seeds, out, llm4rec, device, threads, trust_remote_code, no_progress, **kw) -> None:
    """Sequence-understanding analyses of the paper on a run, gathered in report.md.

    \b
    Writes OUT/report.md, one <analysis>.json + .md each, and fig_*.png:
      shuffled-inference  test metrics on original vs shuffled test sequences (Fig. 1b)
      shuffled-training   models trained on shuffled sequences, tested on original (Table 3)
      similarity          cosine(original, shuffled) user representations (Table 5)
      ablations           w/o L_Distill+L_Uniform, w/o L_Uniform, full (Table 7)
      transition          transition vs non-transition users by t-score (Fig. 3)
      warm-cold           users with a warm vs cold test target (Fig. 4)
      over-smoothing      mean pairwise distance of user representations (Table 13)
      distillation        MSE vs contrastive distillation (Table 12)
      case-studies        users where SASRec and LLM-SRec disagree (Fig. 6)

    The frozen LLM runs only to add a missing cached view (train-shuffled) to the run's
    cache; head variants train on cached states in seconds; extra SASRec models (other
    seeds, shuffled training) train once and are kept under OUT/models for reruns.
    On ml-100k with 2 CPU cores all nine with --seeds 0,1,2 take about an hour the first
    time (the SASRec trainings and the train-shuffled view); reruns take seconds.

    --llm4rec adds the paper's LLM4Rec baselines (Eq. 1, e2e loop, the run's LLM, window
    and SASRec) to the first three sections, trained under OUT/models with the
    --llm4rec-* budget (paper defaults: 10 epochs; on 2 CPU cores a step is ~30 s and one
    full test ~5 min, so budget them, e.g. --llm4rec-max-steps 20 --llm4rec-eval-users
    100 --llm4rec-evals-per-epoch 2: ~45 min per model and seed for the original and the
    shuffled-training model); their test scores are kept, so reruns take seconds.
    """
    from llmsrec.experiments.analyze import analyze_run  # deferred: torch

    if not (llm4rec or "").strip():
        refuse_unused("with --llm4rec only", also=("device", "threads"))
    out = out or f"{run_dir}/report"
    opts = {**llm4rec_kwargs(kw), "device": device, "threads": threads}
    if llm4rec:
        resolve_device(device)  # fail on a bad --device before any work
    docs = analyze_run(run_dir, out, only=only, seeds=seeds, llm4rec=llm4rec, llm4rec_options=opts,
                       progress=not no_progress, log=lambda m: click.echo(m, err=True),
                       trust_remote_code=trust_remote_code)
    for d in docs.values():
        click.echo(f"- {d['title']}: {d['interpretation']}")
    click.echo(f"wrote {out}/report.md")


def _run_parts(run_dir, data_dir, cache):
    """(data folder, cache file, base head options) from --run or --data/--cache."""
    if run_dir and (data_dir or cache):
        raise click.UsageError("give --run, or --data and --cache, not both")
    if run_dir:
        run_dir = Path(run_dir)
        try:
            base = json.loads((run_dir / "heads" / "heads_config.json").read_text())["train"]
        except (OSError, ValueError, KeyError):
            base = {}
        return run_dir / "data", run_dir / "cache" / "cache.h5", base
    if not (data_dir and cache):
        raise click.UsageError("give --run, or both --data and --cache")
    return Path(data_dir), Path(cache), {}


@click.command(cls=GuardedCommand)
@click.option("--run", "run_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A run folder (`llmsrec run`): its data, cache and head options are the base.")
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="Prepared dataset folder (instead of --run).")
@click.option("--cache", default=None, type=click.Path(dir_okay=False), help="HDF5 cache (instead of --run).")
@click.option("--grid", "grid_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="TOML file with a [grid] of head options (lists) and optional [fixed] options.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder [default: RUN/sweep]; its sweep.jsonl is resumed.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes, each with CPUs/jobs torch threads.")
@click.option("--stack", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train up to N variants that differ only in seed, lr, loss switches or weights together "
                   "(stacked parameters, one pass over the batches); same records up to float rounding.")
@stream_options
@step_dtype_option
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@config_option
def sweep(run_dir, data_dir, cache, grid_path, out, jobs, stack, stream, shuffle_buffer, step_dtype,
          no_progress) -> None:
    """Train every head variant of a TOML grid on one cache (no LLM run) and test the best once.

    \b
    Example grid (keys are `llmsrec train` options, - or _):
      [grid]
      lr = [1e-4, 3e-4]
      distill = ["mse", "contrastive"]
      uniform = [true, false]
      seed = [0, 1, 2]
      [fixed]
      train_negatives = 3

    Writes OUT/sweep.jsonl (one line per variant: options, best validation step, valid
    metrics, seconds), OUT/sweep.md (sorted), OUT/sweep.png (valid NDCG@10 against the most
    influential option), OUT/best/ (the best heads, tested once) and OUT/config.toml
    (every option's value; rerun with --config OUT/config.toml).
    """
    from llmsrec.experiments.sweep import sweep as run_sweep  # deferred: torch

    data, cache_path, base = _run_parts(run_dir, data_dir, cache)
    if out is None:
        if not run_dir:
            raise click.UsageError("--out is required with --data/--cache")
        out = f"{run_dir}/sweep"
    res = run_sweep(data, cache_path, grid_path, out, base=base, jobs=jobs, stack=stack, stream=stream,
                    shuffle_buffer=shuffle_buffer, step_dtype=step_dtype, progress=not no_progress,
                    log=lambda m: click.echo(m, err=True))
    b = res["best"]
    click.echo(f"best of {res['variants']}: {b['options']} valid {res['select_metric']} "
               f"{b['valid'][res['select_metric']]:.4f}; test " + ", ".join(f"{k} {v:.4f}" for k, v in b["test"].items()))
    write_config(click.get_current_context(), out)
    click.echo(f"wrote {out}/sweep.md")
