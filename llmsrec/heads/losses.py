"""The losses of LLM-SRec (paper Eq. 1, 2, 3, 4 and Appendix F.3 Eq. 10) and negative sampling.

All functions take head outputs (float32 tensors, d' = head output width) and return a
scalar tensor; they are pure functions of their inputs, so tests can check exact values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llmsrec.errors import InputError

DISTILL_MODES = ("mse", "contrastive", "none")


# --- negatives ------------------------------------------------------------------------------


def sample_negatives(
    exclude: list[np.ndarray],
    targets: np.ndarray,
    n_items: int,
    k: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw ``k`` training negatives per user for Eq. 1, uniformly without replacement.

    A negative is never padding (0), never the user's target and never an item in the
    user's ``exclude`` array (the trainer passes the training sequence, i.e. the history
    and the target of the ``train`` view). Rows are drawn in order from ``rng``, so the
    same generator state gives the same negatives.

    Args:
        exclude: B int arrays of item ids (any order, duplicates allowed).
        targets: int (B,) target item ids.
        n_items: N; item ids are 1..N.
        k: negatives per user (>= 1).
        rng: numpy Generator (the trainer's seeded one).
    Returns:
        int64 (B, k) item ids.
    Raises:
        InputError: a user has fewer than ``k`` eligible items.
    """
    out = np.empty((len(targets), k), dtype=np.int64)
    for b, (excl, tgt) in enumerate(zip(exclude, targets)):
        banned = np.unique(np.append(np.asarray(excl, dtype=np.int64), [0, int(tgt)]))
        n_ok = n_items - int(np.count_nonzero((banned >= 1) & (banned <= n_items)))
        if n_ok < k:
            raise InputError(
                f"training negatives: only {n_ok} items are eligible for row {b} but "
                f"--train-negatives is {k}"
            )
        if k * 4 > n_ok:  # dense case: choose among the eligible items directly
            mask = np.ones(n_items + 1, dtype=bool)
            mask[banned[banned <= n_items]] = False
            out[b] = rng.choice(np.flatnonzero(mask), size=k, replace=False)
            continue
        got: list[int] = []
        seen = set(banned.tolist())
        while len(got) < k:
            for x in rng.integers(1, n_items + 1, size=2 * k + 8).tolist():
                if x not in seen:
                    seen.add(x)
                    got.append(x)
                    if len(got) == k:
                        break
        out[b] = got
    return out


def exclusion_mask(exclude: list[np.ndarray], targets: np.ndarray, n_items: int) -> torch.Tensor:
    """Boolean (B, N+1) mask of logits removed from the full-catalogue softmax.

    True at padding (column 0) and at every item of ``exclude[b]`` except the target.
    """
    mask = torch.zeros((len(targets), n_items + 1), dtype=torch.bool)
    mask[:, 0] = True
    for b, excl in enumerate(exclude):
        if len(excl):
            mask[b, torch.from_numpy(np.array(excl, dtype=np.int64))] = True
    mask[torch.arange(len(targets)), torch.as_tensor(np.asarray(targets, dtype=np.int64))] = False
    return mask


# --- Eq. 1 ----------------------------------------------------------------------------------


def retrieval_loss(user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """L_Retrieval (paper Eq. 1) over the target and sampled negatives.

    -mean_u log( exp(s(u, t_u)) / (exp(s(u, t_u)) + sum_k exp(s(u, n_uk))) ), with the raw
    dot product s(u, i) = f_item(h_i) . f_user(h_u) (no temperature, as in the authors' code).

    Args:
        user: (B, d') f_user(h_u).
        pos: (B, d') f_item(h_target).
        neg: (B, K, d') f_item(h_negative).
    Returns:
        scalar tensor (nats).
    """
    logits = torch.cat([(user * pos).sum(-1, keepdim=True), torch.einsum("bkd,bd->bk", neg, user)], 1)
    return F.cross_entropy(logits, torch.zeros(len(user), dtype=torch.long, device=user.device))


def full_retrieval_loss(
    user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Eq. 1 with the whole catalogue as the denominator (``--train-negatives all``).

    Args:
        user: (B, d') f_user(h_u).
        items: (N+1, d') f_item of every item (row 0 = padding, always masked).
        targets: int64 (B,) target item ids.
        mask: bool (B, N+1) from :func:`exclusion_mask` (history and padding removed).
    Returns:
        scalar tensor (nats).
    """
    logits = (user @ items.T).masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, targets)


# --- Eq. 2 / Eq. 10 -------------------------------------------------------------------------


def distill_mse_loss(user: torch.Tensor, cf_user: torch.Tensor) -> torch.Tensor:
    """L_Distill (paper Eq. 2): MSE between L2-normalised f_CF-user(O_u) and f_user(h_u).

    Both (B, d') inputs are L2-normalised per row before the squared error, which is
    averaged over all B x d' elements (torch's ``mse_loss`` default), as the authors'
    code does. Why normalise: both heads are trainable, so an MSE on raw outputs is
    minimised by shrinking both to zero (a collapse that carries no sequential
    information) and it would fight the scale the retrieval dot product needs; on the
    unit sphere only the directions are matched, which is also the space in which the
    uniformity loss (Eq. 3) spreads users apart.

    Returns:
        scalar tensor; equals (1 - cos(a, b)) * 2 / d' averaged over rows.
    """
    return F.mse_loss(F.normalize(user, dim=-1), F.normalize(cf_user, dim=-1))


def distill_contrastive_loss(
    user: torch.Tensor, cf_user: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """L_Distill-Contrastive (paper Appendix F.3, Eq. 10), the in-batch InfoNCE variant.

    -mean_u log( exp(s(u, u)) / sum_k exp(s(u, k)) ) with s(u, k) = <f_user(h_u),
    f_CF-user(O_k)> / temperature over the L2-normalised (B, d') rows of the batch (the same
    normalised vectors the MSE variant matches; the paper's s has no temperature, so the
    default is 1.0).

    Returns:
        scalar tensor (nats).
    """
    logits = F.normalize(user, dim=-1) @ F.normalize(cf_user, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(user), device=user.device))


# --- Eq. 3 ----------------------------------------------------------------------------------


def uniformity_loss(z: torch.Tensor) -> torch.Tensor:
    """One term of L_Uniform (paper Eq. 3): mean over pairs of exp(-2 ||z_u - z_u'||^2).

    The (B, d') rows are L2-normalised first; the mean runs over the B(B-1)/2 distinct pairs
    u < u' of the batch, as in the authors' code (mean of exp(-2 * squared pairwise
    distance), no log). Note: Wang & Isola's uniformity loss, which the paper cites, is the
    *log* of this mean; the paper writes Eq. 3 without the log and the authors' code
    follows the paper. The paper's double expectation also counts u = u' (each adds
    exp(0) = 1); that only rescales and shifts the value, ((B-1) x + 1) / B, and does not
    change the minimiser. A batch of fewer than 2 rows gives 0.

    Returns:
        scalar tensor in (0, 1].
    """
    b = len(z)
    if b < 2:
        return z.sum() * 0.0
    z = F.normalize(z, dim=-1)
    # squared distance of unit vectors = 2 - 2 cos; exact and safe to differentiate at 0
    sq = (2.0 - 2.0 * (z @ z.T)).clamp_min(0.0)
    iu = torch.triu_indices(b, b, offset=1, device=z.device)
    return torch.exp(-2.0 * sq[iu[0], iu[1]]).mean()


# --- Eq. 4 ----------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """Switches and weights of the total loss L = w_r L_Retrieval + w_d L_Distill + w_u L_Uniform (Eq. 4).

    Attributes:
        distill: "mse" (Eq. 2, the paper's), "contrastive" (Eq. 10) or "none" (``--no-distill``).
        uniform: False is ``--no-uniform`` (Table 7 row (b)).
        retrieval_weight, distill_weight, uniform_weight: the paper uses 1, 1, 1.
        contrastive_temperature: temperature of Eq. 10 (1.0 = the paper's plain s).
    """

    distill: str = "mse"
    uniform: bool = True
    retrieval_weight: float = 1.0
    distill_weight: float = 1.0
    uniform_weight: float = 1.0
    contrastive_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.distill not in DISTILL_MODES:
            raise InputError(f"loss config: field 'distill' must be one of {DISTILL_MODES}, got {self.distill!r}")
        if self.contrastive_temperature <= 0:
            raise InputError("loss config: field 'contrastive_temperature' must be > 0")


def total_loss(
    retrieval: torch.Tensor, user: torch.Tensor, cf_user: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """L (paper Eq. 4) from an already computed L_Retrieval and the batch's (B, d') user outputs.

    Args:
        retrieval: scalar L_Retrieval (Eq. 1).
        user: (B, d') f_user(h_u); cf_user: (B, d') f_CF-user(O_u) (unused, may be None,
            when ``cfg.distill == "none"``).
        cfg: which terms and weights.
    Returns:
        (total scalar tensor, {"loss", "retrieval", "distill", "uniform"} as floats; a term
        switched off reports 0.0 and contributes nothing, not even a gradient).
    """
    total = cfg.retrieval_weight * retrieval
    terms = {"retrieval": float(retrieval.detach())}
    if cfg.distill == "mse":
        d = distill_mse_loss(user, cf_user)
    elif cfg.distill == "contrastive":
        d = distill_contrastive_loss(user, cf_user, cfg.contrastive_temperature)
    else:
        d = None
    if d is not None:
        total = total + cfg.distill_weight * d
    terms["distill"] = float(d.detach()) if d is not None else 0.0
    if cfg.uniform:
        # With distillation off, f_CF-user no longer reaches any score, so its half of Eq. 3
        # is dropped (it would only spread an unused head).
        un = uniformity_loss(user)
        if cfg.distill != "none":
            un = un + uniformity_loss(cf_user)
        total = total + cfg.uniform_weight * un
        terms["uniform"] = float(un.detach())
    else:
        terms["uniform"] = 0.0
    terms["loss"] = float(total.detach())
    return total, terms
