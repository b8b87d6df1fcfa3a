"""``llmsrec transfer``: a finished run on dataset A scored on dataset B (Table 8)."""

from __future__ import annotations

import click

from llmsrec.cli.guard import GuardedCommand
from llmsrec.defaults import LLM


@click.command(cls=GuardedCommand)
@click.option("--source", required=True, type=click.Path(file_okay=False, exists=True),
              help="A's finished `llmsrec run` folder (data/, sasrec/, cache/cache.h5, heads/).")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="B's prepared dataset folder (from `llmsrec prepare`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: sasrec/ (A's SASRec re-indexed to B), params.safetensors, "
                   "cache/cache.h5 (B's views), item_map.json, transfer.json, transfer.md.")
@click.option("--match", default="title", show_default=True, type=click.Choice(["title", "id", "none"]),
              help="Which of B's items count as known to A: title = the same title (case and "
                   "whitespace folded, unique in both datasets); id = the same raw item id (two "
                   "slices of one dataset); none = every item unseen (the paper's disjoint "
                   "domains).")
@click.option("--batch-tokens", default=LLM["batch_tokens"], show_default=True, type=click.IntRange(min=1),
              help="Token budget of one padded batch of the precompute.")
@click.option("--device", default="cpu", show_default=True, help="Device of the LLM forward: cpu, cuda[:N] or hpu.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="torch CPU threads of the LLM forward [default: torch's choice].")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow a local --llm folder's own modelling code (never implied by a file).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def transfer(source, data_dir, out, match, batch_tokens, device, threads, trust_remote_code, no_progress) -> None:
    """Cross-domain transfer (Table 8): A's SASRec and LLM-SRec scored on B, nothing trained on B.

    \b
    B's items that A knows (--match) keep A's item embedding; the others get the mean of
    A's item embeddings, for SASRec's item table and for the LLM prompts' soft tokens
    alike. The frozen LLM reads B's valid, test and test-shuffled prompts (B's titles)
    with A's f_I, out tokens, readout layers, dtype, history window and template; A's
    heads score them. Prints and writes OUT/transfer.md: test HR@10/20, NDCG@10/20 and the
    shuffled-inference change of both models, and how many items matched.
    """
    from llmsrec.experiments.transfer import run_transfer  # deferred: imports torch

    doc = run_transfer(source, data_dir, out, match=match, batch_tokens=batch_tokens, device=device,
                       num_threads=threads, progress=not no_progress, trust_remote_code=trust_remote_code)
    from llmsrec.experiments.transfer import format_transfer_md

    click.echo(format_transfer_md(doc))
