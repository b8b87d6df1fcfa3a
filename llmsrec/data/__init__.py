"""Datasets: loaders, k-core, leave-last-out split, seeded negatives, prepared-folder format.

Public surface (see docs/internals.md): :func:`load_prepared`, :class:`PreparedDataset`,
:func:`prepare_from_interactions`, the loaders :func:`prepare_ml100k`,
:func:`prepare_ml1m`, :func:`prepare_atomic`, :func:`prepare_amazon2023`, and :data:`TITLE_PLACEHOLDER`.
"""

from llmsrec.data.dataset import (
    TITLE_PLACEHOLDER,
    PreparedDataset,
    dataset_digest,
    load_prepared,
    prepare_from_interactions,
)
from llmsrec.data.loaders import (
    bundled_ml1m_dir,
    bundled_ml100k_dir,
    prepare_amazon2023,
    prepare_atomic,
    prepare_ml1m,
    prepare_ml100k,
)

__all__ = [
    "TITLE_PLACEHOLDER",
    "PreparedDataset",
    "dataset_digest",
    "load_prepared",
    "prepare_from_interactions",
    "bundled_ml1m_dir",
    "bundled_ml100k_dir",
    "prepare_amazon2023",
    "prepare_atomic",
    "prepare_ml1m",
    "prepare_ml100k",
]
