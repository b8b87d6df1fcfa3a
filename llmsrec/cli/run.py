"""``llmsrec run`` (every stage in one run folder, reusing unchanged stages) and
``llmsrec recommend`` (top-k items from a run)."""

from __future__ import annotations

import json

import click

from llmsrec.cli.config import config_option, write_config
from llmsrec.cli.guard import GuardedCommand
from llmsrec.cli.options import (
    cache_readout_options,
    head_kwargs,
    head_options,
    llm_options,
    parse_layers,
    parse_views,
    step_dtype_option,
)
from llmsrec.defaults import PRECOMPUTE, PREPARE, SASREC_TRAINING
from llmsrec.devices import resolve_device
from llmsrec.pipeline import format_results_md, run_pipeline


@click.command(cls=GuardedCommand)
@click.option("--dataset", default="ml-100k", show_default=True,
              type=click.Choice(["ml-100k", "ml-1m", "atomic", "amazon2023"]),
              help="As `llmsrec prepare --dataset`.")
@click.option("--inter", type=click.Path(dir_okay=False), help="atomic: the .inter file.")
@click.option("--item", type=click.Path(dir_okay=False), help="atomic: the .item file (titles).")
@click.option("--title-field", default=None, help="atomic: title field of the .item file.")
@click.option("--reviews", type=click.Path(dir_okay=False), help="amazon2023: reviews .jsonl[.gz].")
@click.option("--meta", type=click.Path(dir_okay=False), help="amazon2023: metadata .jsonl[.gz].")
@click.option("--kcore", default=PREPARE["kcore"], show_default=True, type=int, help="Iterative k-core.")
@click.option("--num-negatives", default=PREPARE["num_negatives"], show_default=True, type=int,
              help="Stored negatives per user for validation and for test.")
@click.option("--max-users", default=None, type=click.IntRange(min=1),
              help="Seeded sample of N users before the k-core filter (quick runs) [default: all].")
@click.option("--skip-bad-lines", is_flag=True, help="Count malformed lines instead of failing.")
@click.option("--timestamp-unit", default=None, type=click.Choice(["s", "ms"]),
              help="As `llmsrec prepare --timestamp-unit` [default: ms for amazon2023, s otherwise].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="One seed for every stage.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run folder [default: runs/DATASET].")
@click.option("--sasrec-epochs", default=SASREC_TRAINING["epochs"], show_default=True, type=click.IntRange(min=1),
              help="SASRec maximum epochs.")
@click.option("--sasrec-patience", default=SASREC_TRAINING["patience"], show_default=True, type=click.IntRange(min=1),
              help="SASRec early-stopping patience (validations).")
@click.option("--sasrec-eval-every", default=SASREC_TRAINING["eval_every"], show_default=True,
              type=click.IntRange(min=1),
              help="SASRec validation interval (epochs).")
@click.option("--views", default=",".join(PRECOMPUTE["views"]), show_default=True,
              help="User views to precompute besides train-prefix (--prefixes); test-shuffled gives "
                   "the shuffled-inference metrics of every model in results.json; add train for "
                   "--prefixes 1 / --paper-settings.")
@llm_options
@cache_readout_options
@head_options
@step_dtype_option
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--force", is_flag=True, help="Rebuild every stage.")
@config_option
def run(dataset, inter, item, title_field, reviews, meta, kcore, num_negatives, max_users, skip_bad_lines,
        timestamp_unit, seed, llm, out, sasrec_epochs, sasrec_patience, sasrec_eval_every, views, history_window,
        batch_tokens, device, dtype, threads, fi, readout_layers, template, step_dtype, no_progress, force,
        **kw) -> None:
    """prepare -> SASRec -> precompute -> train -> evaluate, reusing unchanged stages.

    \b
    Each stage lives in its own subfolder of OUT with a stage.json (options + input
    digests); a rerun reuses every stage whose inputs and options are unchanged, so
    changing only a head option retrains the heads in seconds. Writes OUT/results.json
    and OUT/results.md and prints SASRec next to LLM-SRec, and OUT/config.toml: every
    option's value (rerun with --config OUT/config.toml).
    """
    resolve_device(device)  # fail on a bad --device before any work
    head = head_kwargs(kw)
    view_list = parse_views(views)
    if dataset == "atomic" and not (inter and item):
        raise click.UsageError("--dataset atomic needs --inter and --item")
    if dataset == "amazon2023" and not (reviews and meta):
        raise click.UsageError("--dataset amazon2023 needs --reviews and --meta")
    files = {"inter": inter, "item": item, "title_field": title_field} if dataset == "atomic" else \
        {"reviews": reviews, "meta": meta} if dataset == "amazon2023" else {}
    out = out or f"runs/{dataset}"
    res = run_pipeline(
        out, dataset=dataset, files=files,
        data_opts=dict(kcore=kcore, num_negatives=num_negatives, max_users=max_users,
                       skip_bad_lines=skip_bad_lines, timestamp_unit=timestamp_unit),
        llm=llm,
        sasrec_opts=dict(epochs=sasrec_epochs, patience=sasrec_patience, eval_every=sasrec_eval_every),
        precompute_opts=dict(views=view_list, history_window=history_window, batch_tokens=batch_tokens,
                             device=device, dtype=dtype, threads=threads, fi=fi,
                             readout_layers=parse_layers(readout_layers), prefixes=head["prefixes"],
                             template=template),
        head_opts=head, step_dtype=step_dtype, seed=seed, force=force, progress=not no_progress,
        log=lambda m: click.echo(m, err=True),
    )
    write_config(click.get_current_context(), out)
    click.echo(format_results_md(res))
    click.echo(f"wrote {out}/results.json and results.md")


@click.command(cls=GuardedCommand)
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A run folder written by `llmsrec run`.")
@click.option("--user", default=None, help="A raw user id of the dataset (scored from the cached test view).")
@click.option("--history", default=None,
              help="A new user's history: raw item ids, oldest first, comma-separated (an id that holds "
                   "commas is matched whole), each optionally "
                   "@YYYY-MM-DD (default: the dataset's last day). Runs the LLM once.")
@click.option("--k", default=10, show_default=True, type=click.IntRange(min=1), help="Items to recommend.")
@click.option("--format", "fmt", default="text", show_default=True, type=click.Choice(["text", "json"]),
              help="text for reading, json for scripts.")
@click.option("--device", default="cpu", show_default=True, help="torch device of the LLM forward (--history).")
@click.option("--trust-remote-code", is_flag=True,
              help="--history: allow the run's LLM folder its own Python code (a run folder cannot allow it).")
def recommend(run_dir, user, history, k, fmt, device, trust_remote_code) -> None:
    """Top-k unseen items from a run's LLM-SRec, for a known user or a typed history.

    Give exactly one of --user (a raw user id, as in sequences.jsonl; `llmsrec prompts
    --user` takes the internal id instead) or --history.

    \b
      llmsrec recommend --run runs/demo --user 196
      llmsrec recommend --run runs/demo --history "50,172,181@1998-03-01" --format json
    """
    # deferred: torch
    from llmsrec.heads.recommend import format_recommendations
    from llmsrec.heads.recommend import recommend as do_recommend

    resolve_device(device)
    rec = do_recommend(run_dir, user=user, history=history, k=k, device=device, trust_remote_code=trust_remote_code)
    click.echo(json.dumps(rec, indent=2, ensure_ascii=False) if fmt == "json" else format_recommendations(rec))
