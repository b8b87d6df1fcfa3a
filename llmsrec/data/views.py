"""View names: which input sequence of each user a cached row holds.

A *view* is one leave-last-out input per user: ``train`` (``seq[:-3] -> seq[-3]``),
``valid`` (``seq[:-2] -> seq[-2]``), ``test`` (``seq[:-1] -> seq[-1]``), each also
``-shuffled`` (the last W inputs permuted with a seeded permutation, paper Sec. 2.3), and
``train-prefix`` (K prefix training samples per user, paper Appendix F.5). Every stage that
names a view (precompute, cache, heads, experiments) takes the names from here.
"""

from __future__ import annotations

import numpy as np

from llmsrec.errors import InputError

BASE_VIEWS = ("train", "valid", "test")
ALL_VIEWS = ("train", "valid", "test", "train-shuffled", "valid-shuffled", "test-shuffled")
#: the view of prefix training samples (paper Appendix F.5); its K is in the cache provenance
PREFIX_VIEW = "train-prefix"
_VIEW_SALT = {"train": 11, "valid": 12, "test": 13}  # decorrelates the views' permutations


def check_view(view: str) -> str:
    """Returns ``view`` unchanged. Raises InputError naming it when not in ALL_VIEWS."""
    if view not in ALL_VIEWS:
        raise InputError(f"view {view!r}: expected one of {', '.join(ALL_VIEWS)}")
    return view


def view_permutation(seed: int, view: str, uid: int, k: int) -> np.ndarray:
    """The seeded permutation of a shuffled view's window: int64 ``(k,)``.

    It depends only on (seed, base view, uid, k), so any subset of users, in any order,
    gets the same permutations.
    """
    base = view.removesuffix("-shuffled")
    rng = np.random.default_rng([int(seed), _VIEW_SALT[base], int(uid)])
    return rng.permutation(k)
