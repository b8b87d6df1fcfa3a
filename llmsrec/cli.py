"""The ``llmsrec`` command: a thin click group; each command calls one stage function.

Bad input (``InputError``) is printed as one line ``error: ...`` and exits with code 2.
Heavy imports (torch, transformers) happen inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import sys

import click

from llmsrec import __version__
from llmsrec.errors import InputError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmsrec")
def main() -> None:
    """LLM-SRec: distil a frozen SASRec into a frozen LLM, train small heads on cached states.

    \b
    Pipeline (each stage reuses the previous one's output folder/file):
      llmsrec prepare     raw interactions -> leave-last-out split + 99 stored negatives
      llmsrec sasrec      train the CF-SRec teacher (SASRec)
      llmsrec precompute  run the frozen LLM once over every prompt -> HDF5 cache
      llmsrec train       train the LLM-SRec heads on the cache (Eq. 1-4)
      llmsrec evaluate    NDCG@10/20, HR@10/20 on validation and test
      llmsrec run         all of the above, reusing unchanged stages
    """


# --- data (issue 3) ---------------------------------------------------------------------
# (prepare command goes here)

# --- cfsrec + evaluate (issue 3) --------------------------------------------------------
# (sasrec group and evaluate command go here)

# --- precompute (issue 4) ---------------------------------------------------------------
# (precompute and prompts commands go here)

# --- heads + run (issue 5) --------------------------------------------------------------
# (train and run commands go here)


if __name__ == "__main__":
    main()
