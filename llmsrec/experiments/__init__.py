"""Experiments over trained stages: the paper's sequence analyses (``analyze``), the
Table 6 comparison over seeds (``compare``) and head-variant grids (``sweep``)."""

from llmsrec.experiments.analyze import analyze_run
from llmsrec.experiments.compare import compare
from llmsrec.experiments.sweep import sweep

__all__ = ["analyze_run", "compare", "sweep"]
