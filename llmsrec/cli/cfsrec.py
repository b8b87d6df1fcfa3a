"""``llmsrec sasrec train`` and ``llmsrec cfsrec train``: the CF-SRec teacher and baselines."""

from __future__ import annotations

import click

from llmsrec.cli.guard import LlmsrecGroup
from llmsrec.cli.options import CF_MODEL_NAMES
from llmsrec.data import load_prepared
from llmsrec.defaults import SASREC_TRAINING
from llmsrec.devices import resolve_device
from llmsrec.errors import InputError


@click.group(cls=LlmsrecGroup)
def sasrec() -> None:
    """The CF-SRec teacher: SASRec (Kang & McAuley 2018) as LLM-SRec uses it."""


@sasrec.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder to create: model.safetensors, config.json, history.jsonl, "
                   "results.json.")
@click.option("--epochs", default=SASREC_TRAINING["epochs"], show_default=True, type=click.IntRange(min=1),
              help="Maximum epochs (paper: 200).")
@click.option("--patience", default=SASREC_TRAINING["patience"], show_default=True, type=click.IntRange(min=1),
              help="Stop after this many validations without a better validation NDCG@10.")
@click.option("--eval-every", default=SASREC_TRAINING["eval_every"], show_default=True, type=click.IntRange(min=1),
              help="Validate every this many epochs.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seeds initialisation, dropout, user order and sampled negatives.")
@click.option("--batch-size", default=SASREC_TRAINING["batch_size"], show_default=True, type=click.IntRange(min=1),
              help="Users per step.")
@click.option("--lr", default=SASREC_TRAINING["lr"], show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate (betas 0.9, 0.98).")
@click.option("--hidden", default=SASREC_TRAINING["hidden"], show_default=True, type=click.IntRange(min=1),
              help="Embedding / model width d.")
@click.option("--blocks", default=SASREC_TRAINING["blocks"], show_default=True, type=click.IntRange(min=1),
              help="Self-attention blocks.")
@click.option("--heads", default=SASREC_TRAINING["heads"], show_default=True, type=click.IntRange(min=1),
              help="Attention heads.")
@click.option("--dropout", default=SASREC_TRAINING["dropout"], show_default=True,
              type=click.FloatRange(min=0, max=1, max_open=True), help="Dropout rate.")
@click.option("--maxlen", default=SASREC_TRAINING["maxlen"], show_default=True, type=click.IntRange(min=1),
              help="Longest input window (the last MAXLEN items are kept).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def sasrec_train(data_dir, out, epochs, patience, eval_every, seed, batch_size, lr, hidden,
                 blocks, heads, dropout, maxlen, device, force) -> None:
    """Train SASRec on DATA; keep the best-on-validation checkpoint; test it once.

    \b
    BCE with one sampled negative per position on each user's training sequence
    (all but the last two items); validation NDCG@10 on the stored candidates every
    EVAL_EVERY epochs selects the checkpoint and drives early stopping.
    """
    # deferred: torch
    from llmsrec.cfsrec import train_sasrec
    from llmsrec.evaluate.report import format_table

    ds = load_prepared(data_dir)
    resolve_device(device)  # fail on a bad --device before any work
    try:
        res = train_sasrec(ds, out, epochs=epochs, patience=patience, eval_every=eval_every,
                           seed=seed, batch_size=batch_size, lr=lr, device=device, hidden=hidden,
                           blocks=blocks, heads=heads, dropout=dropout, maxlen=maxlen, force=force)
    except ValueError as e:  # invalid model config (e.g. hidden not divisible by heads)
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {out}")
    click.echo(f"best epoch {res['best_epoch']} of {res['epochs_run']}"
               f"{' (early stop)' if res['stopped_early'] else ''}, {res['seconds']:.1f} s")
    click.echo(format_table({"sasrec": {"valid": res["valid"], "test": res["test"]}}))


@click.group(cls=LlmsrecGroup)
def cfsrec() -> None:
    """CF-SRec models: SASRec, GRU4Rec, BERT4Rec, NextItNet (the paper's Table 6 baselines)."""


@cfsrec.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--model", "model_name", required=True, type=click.Choice([*CF_MODEL_NAMES, "ctrl"]),
              help="Which CF-SRec to train (ctrl: SASRec whose item table starts from text-encoder "
                   "vectors of the item texts, the LM-based CTRL baseline).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder to create: model.safetensors, config.json, history.jsonl, results.json.")
@click.option("--epochs", default=SASREC_TRAINING["epochs"], show_default=True,
              type=click.IntRange(min=1), help="Maximum epochs.")
@click.option("--patience", default=SASREC_TRAINING["patience"], show_default=True, type=click.IntRange(min=1),
              help="Stop after this many validations without a better validation NDCG@10.")
@click.option("--eval-every", default=SASREC_TRAINING["eval_every"], show_default=True, type=click.IntRange(min=1),
              help="Validate every this many epochs.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seeds initialisation, dropout, user order, negatives and cloze masks.")
@click.option("--batch-size", default=SASREC_TRAINING["batch_size"], show_default=True,
              type=click.IntRange(min=1), help="Users per step.")
@click.option("--lr", default=SASREC_TRAINING["lr"], show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate (betas 0.9, 0.98).")
@click.option("--loss", default=None, type=click.Choice(["bce", "ce"]),
              help="bce: one sampled negative per position; ce: softmax over all items "
                   "[default: sasrec bce, the others ce].")
@click.option("--hidden", default=None, type=click.IntRange(min=1), help="Width d of E and O_u [default: 64].")
@click.option("--maxlen", default=None, type=click.IntRange(min=1),
              help="Longest input window [default: 128].")
@click.option("--dropout", default=None, type=click.FloatRange(min=0, max=1, max_open=True),
              help="Dropout rate [default: sasrec 0.1, gru4rec 0.3, bert4rec 0.2, nextitnet 0].")
@click.option("--blocks", default=None, type=click.IntRange(min=1),
              help="sasrec, bert4rec: transformer blocks [default: 2].")
@click.option("--heads", default=None, type=click.IntRange(min=1),
              help="sasrec, bert4rec: attention heads [default: sasrec 1, bert4rec 2].")
@click.option("--gru-hidden", default=None, type=click.IntRange(min=1),
              help="gru4rec: GRU state width [default: 128].")
@click.option("--layers", default=None, type=click.IntRange(min=1), help="gru4rec: GRU layers [default: 1].")
@click.option("--kernel", default=None, type=click.IntRange(min=1),
              help="nextitnet: convolution kernel size [default: 3].")
@click.option("--dilations", default=None,
              help="nextitnet: comma-separated dilation of each residual block [default: 1,4,1,4].")
@click.option("--mask-prob", default=None, type=click.FloatRange(min=0, max=1, min_open=True),
              help="bert4rec: cloze mask probability [default: 0.2].")
@click.option("--mask-last-prob", default=None, type=click.FloatRange(min=0, max=1),
              help="bert4rec: share of training rows with only the last item masked [default: 0.1].")
@click.option("--text-encoder", default=None,
              help="ctrl: the text encoder of the item texts, 'all-minilm-l6-v2' (bundled) or a local "
                   "Hugging Face folder [default: all-minilm-l6-v2].")
@click.option("--align-epochs", default=None, type=click.IntRange(min=0),
              help="ctrl: epochs of contrastive text/ID alignment before fine-tuning [default: 0, none].")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--no-progress", is_flag=True, help="Hide the per-epoch progress bar.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def cfsrec_train(data_dir, model_name, out, epochs, patience, eval_every, seed, batch_size, lr, loss, device,
                 no_progress, force, **model_opts) -> None:
    """Train one CF-SRec on DATA; keep the best-on-validation checkpoint; test it once.

    \b
    Same protocol for every model: validation NDCG@10 on the stored candidates every
    EVAL_EVERY epochs selects the checkpoint and drives early stopping. Model options
    left unset take the model's defaults; one that does not apply to --model is an error.
    Any checkpoint written here can be the LLM-SRec teacher (`llmsrec precompute --sasrec DIR`).
    """
    # deferred: torch
    from llmsrec.cfsrec import train_cfsrec
    from llmsrec.evaluate.report import format_table

    opts = {k: v for k, v in model_opts.items() if v is not None}
    if "dilations" in opts:
        try:
            opts["dilations"] = [int(r) for r in opts["dilations"].split(",") if r.strip()]
        except ValueError:
            raise InputError(f"--dilations: expected comma-separated integers, got {opts['dilations']!r}") from None
    ds = load_prepared(data_dir)
    resolve_device(device)  # fail on a bad --device before any work
    try:
        res = train_cfsrec(ds, out, model=model_name, epochs=epochs, patience=patience, eval_every=eval_every,
                           seed=seed, batch_size=batch_size, lr=lr, loss=loss, device=device, force=force,
                           progress=not no_progress, **opts)
    except ValueError as e:  # invalid model config (e.g. hidden not divisible by heads)
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {out}")
    click.echo(f"best epoch {res['best_epoch']} of {res['epochs_run']}"
               f"{' (early stop)' if res['stopped_early'] else ''}, {res['seconds']:.1f} s")
    click.echo(format_table({model_name: {"valid": res["valid"], "test": res["test"]}}))
