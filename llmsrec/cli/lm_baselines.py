"""``llmsrec train --model ctrl|recformer``: the LM-based baselines of the paper's Table 6 on a
text encoder (the CTRL and RECFORMER branches of :mod:`llmsrec.cli.train`)."""

from __future__ import annotations

import click

from llmsrec.data import load_prepared
from llmsrec.devices import resolve_device

__all__ = ["LM_BASELINES", "train_lm"]

#: the LM-based baselines `train` and `evaluate` know (Table 6's CTRL and RECFORMER)
LM_BASELINES = ("ctrl", "recformer")
#: the options `train --model recformer` passes on when given (train's name -> RecformerOptions')
_RECFORMER_FLAGS = {"max_steps": "max_steps", "batch_size": "batch_size", "lr": "lr", "epochs": "epochs"}


def train_lm(model_name, data_dir, out, seed, text_encoder, no_progress, force, e2e_kw) -> dict:  # noqa: C901
    """``train --model ctrl|recformer``: CTRL through :func:`llmsrec.cfsrec.train_cfsrec` (SASRec's
    training defaults), RECFORMER through :func:`llmsrec.baselines.recformer.train_recformer`
    (``--max-steps``, ``--batch-size``, ``--lr``, ``--epochs`` passed on when given); prints
    the metrics and returns the results dict.

    Raises:
        click.UsageError: another option of ``train`` given on the command line (it would do
            nothing here).
    """
    # deferred: torch
    from llmsrec.evaluate.report import format_table

    ctx = click.get_current_context()
    default = click.core.ParameterSource.DEFAULT
    allowed = {"data_dir", "out", "seed", "model_name", "text_encoder", "no_progress", "force", "device", "config"}
    if model_name == "recformer":
        allowed |= set(_RECFORMER_FLAGS)
    unset = (default, click.core.ParameterSource.DEFAULT_MAP, None)  # DEFAULT_MAP: a --config file's values
    given = sorted(p.name for p in ctx.command.params
                   if p.name not in allowed and ctx.get_parameter_source(p.name) not in unset)
    if given:
        other = "llmsrec cfsrec train --model ctrl" if model_name == "ctrl" else "the RECFORMER options listed in --help"
        raise click.UsageError(f"--model {model_name}: {', '.join('--' + g.replace('_', '-') for g in given)} "
                               f"do(es) not apply (see {other})")
    device = e2e_kw["device"]
    resolve_device(device)
    ds = load_prepared(data_dir)
    te = {"text_encoder": text_encoder} if text_encoder is not None else {}
    if model_name == "ctrl":
        from llmsrec.cfsrec import train_cfsrec

        res = train_cfsrec(ds, out, model="ctrl", seed=seed, device=device, force=force,
                           progress=not no_progress, **te)
        click.echo(f"best epoch {res['best_epoch']} of {res['epochs_run']}"
                   f"{' (early stop)' if res['stopped_early'] else ''}, {res['seconds']:.1f} s")
        click.echo(format_table({"ctrl": {"valid": res["valid"], "test": res["test"]}}))
        return res
    from llmsrec.baselines.recformer import train_recformer

    opts = {dst: ctx.params[src] for src, dst in _RECFORMER_FLAGS.items()
            if ctx.get_parameter_source(src) != default and ctx.params[src] is not None}
    res = train_recformer(ds, out, force=force, progress=not no_progress, seed=seed, device=device,
                          log=lambda m: click.echo(m, err=True), **te, **opts)
    click.echo(f"selected step {res['best']['step']} of {res['steps']}, {res['seconds']:.1f} s")
    click.echo(format_table({"recformer": {k: res[k] for k in ("valid", "test", "test-shuffled")}}))
    return res
