"""``llmsrec compare --approach generative`` (Table 4, Fig. 1a): the option handling that
``llmsrec.cli.experiments.compare`` hands over (kept apart so each CLI module stays thin)."""

from __future__ import annotations

import click

from llmsrec.cli.baseline_options import llm4rec_kwargs
from llmsrec.cli.config import write_config


def compare_generative_cli(data_dir, out, models, seeds, cache, teacher, llm, history_window, device, dtype, threads,
                        fi, negatives, length_norm, test_users, lr, shuffled_training, no_progress, force, kw) -> None:
    """``compare --approach generative``: Table 4 / Fig. 1a (llmsrec.experiments.generative)."""
    from llmsrec.experiments.generative import GEN_MODELS, compare_generative, format_generative_md
    from llmsrec.experiments.compare import parse_seeds

    if teacher is not None:
        raise click.UsageError("--teacher: not with --approach generative (the baselines read the SASRec that built "
                               "--cache, else OUT/sasrec-seed<first>)")
    names = [m.strip().lower() for m in str(models).split(",") if m.strip()]
    if click.get_current_context().get_parameter_source("models") == click.core.ParameterSource.DEFAULT:
        names = list(GEN_MODELS)
    ctx = click.get_current_context()
    cf = {n: ctx.params[n] for n in ("epochs", "patience", "eval_every", "batch_size", "lr")
          if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)}
    if ctx.get_parameter_source("maxlen") not in (None, click.core.ParameterSource.DEFAULT):
        cf["maxlen"] = ctx.params["maxlen"]
    budget = llm4rec_kwargs(kw)
    options = dict(negatives=negatives, length_norm=length_norm, test_users=test_users, lr=lr,
                   history_window=history_window, device=device, dtype=dtype, threads=threads, fi=fi, **budget)
    res = compare_generative(data_dir, out, models=names, seeds=parse_seeds(seeds), cache=cache, llm=llm,
                             options=options, shuffled_training=shuffled_training, cf_options=cf, force=force,
                             progress=not no_progress, log=lambda m: click.echo(m, err=True))
    write_config(click.get_current_context(), out)
    click.echo(format_generative_md(res))
    click.echo(f"wrote {out}/compare.json and {out}/compare.md")
