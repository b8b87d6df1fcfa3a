"""The ``llmsrec`` command: a thin click group; each command parses its options, calls one
stage function and prints what it did.

One module per command group: :mod:`~llmsrec.cli.data` (prepare, prompts),
:mod:`~llmsrec.cli.cfsrec` (sasrec, cfsrec), :mod:`~llmsrec.cli.precompute` (precompute,
refine-tokens), :mod:`~llmsrec.cli.train` (train, evaluate), :mod:`~llmsrec.cli.run` (run,
recommend), :mod:`~llmsrec.cli.experiments` (compare, analyze, sweep), :mod:`~llmsrec.cli.tools`
(doctor, verify); shared options in :mod:`~llmsrec.cli.options`, ``--config FILE.toml`` in
:mod:`~llmsrec.cli.config`, output locks and one-line errors in :mod:`~llmsrec.cli.guard`.

Bad input (``InputError``) is printed as one line ``error: ...`` and exits with code 2; a
Ctrl-C exits 130. Heavy imports (torch, transformers) happen inside the commands so
``--help`` is fast.
"""

from __future__ import annotations

import sys

import click

from llmsrec import __version__
from llmsrec.cli import cfsrec, data, experiments, precompute, run, tools, train, transfer
from llmsrec.cli.guard import LlmsrecGroup
from llmsrec.distributed import dist_env

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


@click.group(cls=LlmsrecGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
      llmsrec transfer      Table 8: a run on dataset A scored on dataset B, nothing trained on B
      llmsrec recommend     top-k unseen items for a known user or a typed history
      llmsrec doctor        versions, devices, distributed backends, bundled model and data
      llmsrec verify        check caches, checkpoints and run folders for corruption
    """
    _refuse_under_torchrun(ctx)


for _command in (data.prepare, data.prompts, cfsrec.sasrec, cfsrec.cfsrec, precompute.precompute,
                 precompute.refine_tokens, train.train, train.evaluate, run.run, run.recommend,
                 experiments.compare, experiments.analyze, experiments.sweep, transfer.transfer, tools.doctor,
                 tools.verify):
    main.add_command(_command)
