"""The fixed f_I of cache mode: a closed-form fit before precompute, never trained.

f_I maps a SASRec item embedding E_i (d_cf) to the LLM input space (d_llm). In the paper
f_I is a trained MLP (Sec. 2.1.2); here it is fixed before precompute so that every
``[HistoryEmb]`` soft token can be computed once, and it puts the soft tokens where the
LLM's own token embeddings live: by default the moment-matched map
(:func:`fit_moment_matched`), or the ridge-regression fit from E_i to the mean input
embedding of item i's title tokens (:func:`fit_ridge`, ``--fi ridge``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.linalg

from llmsrec.precompute.prompts import clean_title


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised bias, in closed form.

    Minimises ``||x W^T + b - y||^2 + lam ||W||^2`` with ``lam = alpha * tr(Xc^T Xc) / d_in``
    (``Xc`` = centred ``x``), i.e. ``alpha`` is relative to the data scale.

    Args:
        x: float ``(n, d_in)`` inputs (SASRec E rows 1..N).
        y: float ``(n, d_out)`` targets (mean title-token input embeddings).
        alpha: relative ridge strength (>= 0; 0 = least squares, needs ``n > d_in``).

    Returns:
        ``weight`` float32 ``(d_out, d_in)`` and ``bias`` float32 ``(d_out,)`` so that
        ``f(x) = x @ weight.T + bias`` (the ``torch.nn.Linear`` convention).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    g = xc.T @ xc
    lam = alpha * np.trace(g) / max(g.shape[0], 1)
    g[np.diag_indices_from(g)] += lam
    w = scipy.linalg.solve(g, xc.T @ yc, assume_a="pos")  # (d_in, d_out)
    b = ym - xm @ w
    return w.T.astype(np.float32), b.astype(np.float32)


def title_embedding_means(tokenizer, embed: np.ndarray, titles) -> np.ndarray:
    """Mean input embedding of each title's tokens.

    Args:
        tokenizer: the LLM tokenizer.
        embed: float ``(V, d_llm)`` input-embedding matrix.
        titles: list of N+1 titles (index 0 = padding).

    Returns:
        float32 ``(N+1, d_llm)``; row 0 and titles with no tokens get the mean of ``embed``.
    """
    embed = np.asarray(embed, dtype=np.float32)
    out = np.empty((len(titles), embed.shape[1]), dtype=np.float32)
    out[:] = embed.mean(0)
    ids = tokenizer([clean_title(t) for t in titles[1:]], add_special_tokens=False)["input_ids"]
    for i, t in enumerate(ids, start=1):
        if t:
            out[i] = embed[np.asarray(t)].mean(0)
    return out


def fit_moment_matched(x: np.ndarray, embed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, injective linear f_I whose outputs have the token embeddings' moments.

    Why not ridge by default: SASRec item embeddings predict little of an item's title
    embedding (on ml-100k with SmolLM2 the ridge fit has R^2 = 0.05), so the ridge map
    shrinks every soft token to nearly the same vector (item-to-item std 0.012 against
    0.10 for real tokens) and the collaborative signal never reaches the LLM. This map
    keeps all of E instead: E is whitened by PCA and its k = min(d_cf, d_llm) components
    are laid, largest first, along the top-k principal directions of the input-embedding
    matrix with their standard deviations, around its mean. The soft tokens then have the
    mean and (within that subspace) the covariance of real token embeddings, and E_i can
    be recovered exactly from f_I(E_i).

    Args:
        x: float ``(n, d_cf)`` SASRec E rows 1..N.
        embed: float ``(V, d_llm)`` input-embedding matrix of the LLM.

    Returns:
        ``weight`` float32 ``(d_llm, d_cf)`` and ``bias`` float32 ``(d_llm,)``
        (``torch.nn.Linear`` convention).
    """
    x = np.asarray(x, dtype=np.float64)
    xm = x.mean(0)
    _, sx, vxt = np.linalg.svd(x - xm, full_matrices=False)  # rows of vxt: E's principal axes
    tm, st, vtt, n_t = _embedding_axes(np.asarray(embed))
    k = min(x.shape[1], vtt.shape[1], int((sx > 1e-8 * sx[0]).sum()))
    x_std = sx[:k] / np.sqrt(max(len(x) - 1, 1))
    t_std = st[:k] / np.sqrt(max(n_t - 1, 1))
    w = vtt[:k].T @ np.diag(t_std / x_std) @ vxt[:k]  # (d_llm, d_cf)
    b = tm - w @ xm
    return w.astype(np.float32), b.astype(np.float32)


_AXES: dict[str, tuple] = {}


def _embedding_axes(embed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Mean, singular values and principal axes of the centred input-embedding matrix
    ``(V, d_llm)``, in float64; memoised on the matrix's bytes because the SVD of a 49k x 576
    matrix costs seconds to a minute and every baseline / e2e model asks for the same one."""
    key = hashlib.blake2b(np.ascontiguousarray(embed).view(np.uint8), digest_size=16).hexdigest()
    key += f"{embed.dtype}{embed.shape}"
    if key not in _AXES:
        t = np.asarray(embed, dtype=np.float64)
        tm = t.mean(0)
        _, st, vtt = np.linalg.svd(t - tm, full_matrices=False)
        _AXES.clear()  # one LLM at a time is the common case; keep memory bounded
        _AXES[key] = (tm, st, vtt, len(t))
    return _AXES[key]
