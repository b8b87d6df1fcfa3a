"""``llmsrec transfer``: a finished run on dataset A scored on dataset B (Table 8)."""

from __future__ import annotations

import click

from llmsrec.cli.baseline_options import llm4rec_kwargs, llm4rec_options
from llmsrec.cli.guard import GuardedCommand
from llmsrec.cli.options import refuse_unused
from llmsrec.defaults import LLM


@click.command(cls=GuardedCommand)
@click.option("--source", required=True, type=click.Path(file_okay=False, exists=True),
              help="A's finished `llmsrec run` folder (data/, sasrec/, cache/cache.h5, heads/).")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="B's prepared dataset folder (from `llmsrec prepare`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: sasrec/ (A's SASRec re-indexed to B), params.safetensors, "
                   "cache/cache.h5 (B's views), item_map.json, transfer.json, transfer.md; the "
                   "LLM4Rec baselines' runs on A (<model>-seed<k>/).")
@click.option("--match", default="title", show_default=True, type=click.Choice(["title", "id", "none"]),
              help="Which of B's items count as known to A: title = the same title (case and "
                   "whitespace folded, unique in both datasets); id = the same raw item id (two "
                   "slices of one dataset); none = every item unseen (the paper's disjoint "
                   "domains).")
@click.option("--models", default="sasrec,llmsrec", show_default=True,
              help="Comma-separated rows of the table: sasrec, tallrec, llara, collm, allmrec, llmsrec. "
                   "The LLM4Rec baselines (tallrec, llara, collm, allmrec) are trained on A first, budgeted "
                   "by the --llm4rec-* options as in `llmsrec compare`.")
@llm4rec_options
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="LLM4Rec baselines: training seed of their runs on A.")
@click.option("--llm", default=None,
              help="LLM4Rec baselines: their LLM (a name or a local folder) [default: the LLM of A's cache].")
@click.option("--llm4rec-runs", default=None, type=click.Path(file_okay=False),
              help="LLM4Rec baselines: folder of their runs on A, <model>-seed<k>/ (e.g. a `llmsrec compare` "
                   "output on A's data: runs of the same request are reused) [default: OUT].")
@click.option("--batch-tokens", default=LLM["batch_tokens"], show_default=True, type=click.IntRange(min=1),
              help="Token budget of one padded batch of the LLM forward.")
@click.option("--device", default="cpu", show_default=True, help="Device of the LLM forward: cpu, cuda[:N] or hpu.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="torch CPU threads of the LLM forward [default: torch's choice].")
@click.option("--trust-remote-code", is_flag=True,
              help="LLM-SRec: allow the source cache's local LLM folder its own modelling code (never "
                   "implied by a file).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def transfer(source, data_dir, out, match, models, seed, llm, llm4rec_runs, batch_tokens, device, threads,
             trust_remote_code, no_progress, **kw) -> None:
    """Cross-domain transfer (Table 8): A's models scored on B, nothing trained on B.

    \b
    B's items that A knows (--match) keep A's item embedding; the others get the mean of
    A's item embeddings, for SASRec's item table and for the LLM prompts' soft tokens
    alike. The frozen LLM reads B's valid, test and test-shuffled prompts (B's titles)
    with A's f_I, out tokens, readout layers, dtype, history window and template; A's
    heads score them. Prints and writes OUT/transfer.md: test HR@10/20, NDCG@10/20 and the
    shuffled-inference change of every model, and how many items matched.

    \b
    --models adds the LLM4Rec baselines: each is trained on A (L_Retrieval, A's SASRec as
    teacher, the history window of A's cache; on 2 CPU cores ~30 s a step, so budget it,
    e.g. --llm4rec-max-steps 20 --llm4rec-eval-users 100 --llm4rec-evals-per-epoch 2), then
    reads B's prompts with its own LoRA, projections and heads; its CF-SRec inputs (item
    soft tokens, the user-representation token) come from the re-indexed SASRec.
    """
    from llmsrec.experiments.transfer import BASELINES, parse_transfer_models  # deferred: imports torch

    names = parse_transfer_models(models)
    if not set(BASELINES) & set(names):
        refuse_unused("when --models includes tallrec, llara, collm or allmrec", also=("seed", "llm", "llm4rec_runs"))
    from llmsrec.experiments.transfer import format_transfer_md, run_transfer

    doc = run_transfer(source, data_dir, out, match=match, models=names, llm=llm, llm4rec_options=llm4rec_kwargs(kw),
                       llm4rec_runs=llm4rec_runs, seed=seed, batch_tokens=batch_tokens, device=device,
                       num_threads=threads, progress=not no_progress, trust_remote_code=trust_remote_code)
    click.echo(format_transfer_md(doc))
