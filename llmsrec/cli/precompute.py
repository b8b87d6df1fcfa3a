"""``llmsrec precompute`` (the frozen LLM once over every prompt -> HDF5 cache) and
``llmsrec refine-tokens`` (one out-token refinement round on cached prefixes)."""

from __future__ import annotations

import sys

import click

from llmsrec.cli.guard import GuardedCommand
from llmsrec.cli.options import cache_readout_options, llm_options, parse_layers, parse_views
from llmsrec.data import load_prepared
from llmsrec.data.views import ALL_VIEWS
from llmsrec.defaults import LLM, LLMSREC_HEADS, PRECOMPUTE, REFINE_TOKENS
from llmsrec.devices import resolve_device
from llmsrec.distributed import check_nproc, dist_env, launch, local_device
from llmsrec.errors import InputError


@click.command(cls=GuardedCommand)
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--sasrec", "sasrec_dir", required=True, type=click.Path(file_okay=False),
              help="SASRec checkpoint folder (model.safetensors + config.json).")
@click.option("--out", "out_h5", required=True, type=click.Path(dir_okay=False),
              help="Cache file to create or extend (built as OUT.tmp, renamed when complete).")
@click.option("--views", default=",".join(PRECOMPUTE["views"]), show_default=True,
              help=f"Comma-separated user views to compute; any of {', '.join(ALL_VIEWS)} (the prefix "
                   f"view train-prefix comes with --prefixes; add train for --paper-settings heads).")
@click.option("--verb", default=None,
              help="Noun phrase of the prompt, e.g. 'purchases' or 'watched movies' "
                   "[default: by dataset].")
@click.option("--chunk-prompts", default=PRECOMPUTE["chunk_prompts"], show_default=True, type=click.IntRange(min=1),
              help="Prompts per resumable chunk (a killed run redoes at most one chunk).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the shuffled views' permutations.")
@click.option("--max-users", default=None, type=click.IntRange(min=1),
              help="Only users 1..N get user prompts (quick runs); recorded in the cache.")
@llm_options
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
@click.option("--assemble", default=PRECOMPUTE["assemble"], show_default=True, type=click.Choice(["copy", "virtual"]),
              help="With several processes: copy the shards (OUT.shards/) into OUT and delete them, "
                   "or make OUT's states HDF5 virtual datasets over them (no copy; keep OUT.shards/ "
                   "beside OUT).")
@cache_readout_options
@click.option("--prefixes", default=LLMSREC_HEADS["prefixes"], show_default=True, type=click.IntRange(min=1),
              help="K > 1 adds the view train-prefix: each user's K latest cutoffs before the "
                   "validation target as training samples (paper F.5), run as one prompt tree per "
                   "user (1: the paper's one sample per user; add the train view then).")
@click.option("--store-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]),
              help="How the states are stored: float16 halves the file (recorded in the provenance; "
                   "read back as float32; on ml-100k trained heads score the same on it, retrained ones "
                   "within the seed spread).")
def precompute(data_dir, sasrec_dir, llm, out_h5, views, history_window, verb, batch_tokens,
               chunk_prompts, device, dtype, seed, max_users, threads, fi, params_file, trust_remote_code,
               force, load_in_8bit, hpu_graphs, nproc, assemble, readout_layers, template, prefixes,
               store_dtype) -> None:
    """Run every item prompt and user prompt through the frozen LLM once -> HDF5 cache.

    Stores the last-layer state at [UserOut] per user and view, at [ItemOut] per item,
    SASRec O_u and E beside them, and the fixed f_I / token vectors. A killed run resumes
    where it stopped; asking for more views later adds them to the same file.
    Under torchrun (or with --nproc N) the prompts are split over the processes, each
    writes OUT.shards/rank<r>-of-<N>.h5, and rank 0 assembles OUT; rerun the same command
    with the same N to resume a killed run.
    """
    # deferred: torch
    from llmsrec.precompute import precompute as run_precompute
    from llmsrec.precompute.llm import check_llm_options, load_llm

    view_list = parse_views(views)
    check_llm_options(device, load_in_8bit=load_in_8bit, hpu_graphs=hpu_graphs)
    if nproc is not None:
        check_nproc(nproc, device)
        if dist_env() is not None:
            raise InputError("--nproc: already running under torchrun (RANK is set); drop --nproc")
        if nproc > 1:
            code = launch(nproc, ["precompute", *given_args(click.get_current_context(), drop={"nproc"})])
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
        # under torchrun local_device makes cuda cuda:LOCAL_RANK
        llm = load_llm(llm, device=local_device(device), dtype=dtype, trust_remote_code=trust_remote_code,
                       load_in_8bit=load_in_8bit, hpu_graphs=hpu_graphs)
    run_precompute(data_dir, sasrec_dir, out_h5, llm=llm, views=view_list,
                   history_window=history_window, verb=verb, batch_tokens=batch_tokens,
                   chunk_prompts=chunk_prompts, device=device, dtype=dtype, seed=seed,
                   force=force, max_users=max_users, num_threads=threads, fi=fi,
                   params=params_file, trust_remote_code=trust_remote_code, assemble=assemble,
                   readout_layers=parse_layers(readout_layers), prefixes=prefixes, template=template,
                   store_dtype=store_dtype)


def given_args(ctx: click.Context, drop=()) -> list[str]:
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


@click.command("refine-tokens", cls=GuardedCommand)
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
@click.option("--users", default=REFINE_TOKENS["users"], show_default=True, type=click.IntRange(min=1),
              help="Seeded sample of users whose train prompts are used.")
@click.option("--items", default=REFINE_TOKENS["items"], show_default=True, type=click.IntRange(min=1),
              help="Item pool: the sampled users' targets plus random items up to this many.")
@click.option("--steps", default=REFINE_TOKENS["steps"], show_default=True, type=click.IntRange(min=1),
              help="Adam steps.")
@click.option("--batch-size", default=REFINE_TOKENS["batch_size"], show_default=True, type=click.IntRange(min=1),
              help="Sampled users per step.")
@click.option("--lr", default=REFINE_TOKENS["lr"], show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate of the token embeddings.")
@click.option("--train-fi", is_flag=True,
              help="Also train the linear f_I (its soft tokens are in the prefix: each step then runs "
                   "the full prompts forward and backward).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seeds the sample and the batch order.")
@click.option("--batch-tokens", default=LLM["batch_tokens"], show_default=True, type=click.IntRange(min=1),
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
    from llmsrec.e2e.refine import refine_tokens as run_refine  # deferred: torch

    resolve_device(device)
    ds = load_prepared(data_dir)
    res = run_refine(ds, cache, heads_dir, sasrec_dir, out, llm=llm, users=users, items=items, steps=steps,
                     batch_size=batch_size, lr=lr, train_fi=train_fi, seed=seed, batch_tokens=batch_tokens,
                     device=device, dtype=dtype, threads=threads, refresh=not no_refresh, force=force,
                     views=parse_views(views) if views else None,
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
