"""Heads and losses (paper Eq. 1, 2, 3, 4, 10): exact values on hand-computed inputs."""

import math

import numpy as np
import pytest
import torch

from llmsrec.errors import InputError
from llmsrec.heads.losses import (
    LossConfig,
    distill_contrastive_loss,
    distill_mse_loss,
    exclusion_mask,
    full_retrieval_loss,
    retrieval_loss,
    sample_negatives,
    total_loss,
    uniformity_loss,
)
from llmsrec.heads.model import HeadsConfig, LLMSRecHeads, fixed_item_projection, load_heads, save_heads

# float() of a loss that still carries its graph is intended here
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# --- Eq. 1 ----------------------------------------------------------------------------------


def test_retrieval_loss_exact():
    user = t([[1.0, 0.0]])
    pos = t([[2.0, 0.0]])  # s = 2
    neg = t([[[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]])  # s = 0, 1, -1
    want = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(1) + math.exp(-1)))
    assert float(retrieval_loss(user, pos, neg)) == pytest.approx(want, abs=1e-6)


def test_retrieval_loss_is_batch_mean():
    user = t([[1.0, 0.0], [0.0, 1.0]])
    pos = t([[0.0, 0.0], [0.0, 3.0]])  # s = 0 and 3
    neg = t([[[0.0, 0.0]], [[0.0, 0.0]]])  # s = 0 for both
    want = (math.log(2.0) + math.log(1 + math.exp(-3))) / 2
    assert float(retrieval_loss(user, pos, neg)) == pytest.approx(want, abs=1e-6)


def test_full_retrieval_loss_masks_history_and_padding():
    items = t([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.5, 0.0]])  # ids 0..4
    user = t([[1.0, 0.0]])
    targets = torch.tensor([1])
    mask = exclusion_mask([np.array([3, 1])], np.array([1]), n_items=4)  # history {3, 1}, target 1
    assert mask.tolist() == [[True, False, False, True, False]]  # target stays, 0 and 3 go
    # remaining logits: item1 = 1 (target), item2 = 0, item4 = 0.5
    want = -math.log(math.exp(1) / (math.exp(1) + math.exp(0) + math.exp(0.5)))
    assert float(full_retrieval_loss(user, items, targets, mask)) == pytest.approx(want, abs=1e-6)


def test_negatives_never_history_or_target_and_seeded():
    excl = [np.array([1, 2, 3, 3]), np.array([7, 8])]
    targets = np.array([4, 9])
    a = sample_negatives(excl, targets, n_items=10, k=3, rng=np.random.default_rng(5))
    b = sample_negatives(excl, targets, n_items=10, k=3, rng=np.random.default_rng(5))
    assert a.shape == (2, 3) and a.dtype == np.int64
    assert np.array_equal(a, b)
    for _ in range(200):
        rng = np.random.default_rng(_)
        n = sample_negatives(excl, targets, n_items=10, k=3, rng=rng)
        assert not set(n[0]) & {0, 1, 2, 3, 4}
        assert not set(n[1]) & {0, 7, 8, 9}
        assert len(set(n[0])) == 3 and len(set(n[1])) == 3
        assert n.min() >= 1 and n.max() <= 10
    # k = all eligible: exactly the complement, in some order
    full = sample_negatives([np.array([1, 2, 3])], np.array([4]), 10, 6, np.random.default_rng(0))
    assert sorted(full[0].tolist()) == [5, 6, 7, 8, 9, 10]
    # sparse path (rejection sampling) also respects the exclusions
    big = sample_negatives([np.arange(1, 500)], np.array([700]), 1000, 5, np.random.default_rng(1))
    assert big.min() >= 500 and 700 not in big[0] and len(set(big[0])) == 5


def test_negatives_too_few_items_is_an_error():
    with pytest.raises(InputError, match="eligible"):
        sample_negatives([np.array([1, 2])], np.array([3]), 4, 2, np.random.default_rng(0))


# --- Eq. 2 / 10 -----------------------------------------------------------------------------


def test_distill_mse_exact_and_scale_free():
    a, b = t([[3.0, 4.0]]), t([[1.0, 0.0]])
    # normalised: (0.6, 0.8) vs (1, 0): ((0.4)^2 + 0.8^2) / 2 = 0.4 = (1 - cos) * 2 / d'
    assert float(distill_mse_loss(a, b)) == pytest.approx(0.4, abs=1e-6)
    assert float(distill_mse_loss(10 * a, 0.1 * b)) == pytest.approx(0.4, abs=1e-6)
    assert float(distill_mse_loss(a, 2 * a)) == pytest.approx(0.0, abs=1e-7)


def test_distill_contrastive_exact():
    u = t([[1.0, 0.0], [0.0, 2.0]])
    c = t([[3.0, 0.0], [0.0, 1.0]])
    # normalised logits = identity: each row -log(e / (e + 1))
    assert float(distill_contrastive_loss(u, c)) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert float(distill_contrastive_loss(u, c, temperature=0.5)) == pytest.approx(
        math.log(1 + math.exp(-2)), abs=1e-6
    )


# --- Eq. 3 ----------------------------------------------------------------------------------


def test_uniformity_exact():
    z = t([[1.0, 0.0], [0.0, 5.0], [-2.0, 0.0]])
    # normalised squared distances: (0,1) 2, (0,2) 4, (1,2) 2
    want = (2 * math.exp(-4) + math.exp(-8)) / 3
    assert float(uniformity_loss(z)) == pytest.approx(want, rel=1e-5)
    # identical rows: distance 0 -> exp(0) = 1, and the gradient is finite
    same = t([[1.0, 2.0], [1.0, 2.0]]).requires_grad_(True)
    v = uniformity_loss(same)
    v.backward()
    assert float(v.detach()) == pytest.approx(1.0, abs=1e-6) and torch.isfinite(same.grad).all()
    assert float(uniformity_loss(t([[1.0, 0.0]]))) == 0.0


# --- Eq. 4 and ablation switches -----------------------------------------------------------


def _batch():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 3, generator=g, requires_grad=True)
    c = torch.randn(4, 3, generator=g, requires_grad=True)
    r = torch.tensor(0.7, requires_grad=True)
    return r, u, c


def test_total_loss_is_weighted_sum():
    r, u, c = _batch()
    d, un = distill_mse_loss(u, c), uniformity_loss(u) + uniformity_loss(c)
    tot, terms = total_loss(r, u, c, LossConfig())
    assert float(tot) == pytest.approx(float(r + d + un), abs=1e-6)
    assert terms["distill"] == pytest.approx(float(d)) and terms["uniform"] == pytest.approx(float(un))
    tot2, _ = total_loss(r, u, c, LossConfig(retrieval_weight=2, distill_weight=0.5, uniform_weight=3))
    assert float(tot2) == pytest.approx(float(2 * r + 0.5 * d + 3 * un), abs=1e-6)


def test_no_distill_and_no_uniform_remove_terms():
    r, u, c = _batch()
    tot, terms = total_loss(r, u, None, LossConfig(distill="none"))
    assert terms["distill"] == 0.0
    assert float(tot) == pytest.approx(float(r + uniformity_loss(u)), abs=1e-6)
    tot, terms = total_loss(r, u, c, LossConfig(uniform=False))
    assert terms["uniform"] == 0.0
    assert float(tot) == pytest.approx(float(r + distill_mse_loss(u, c)), abs=1e-6)
    tot, terms = total_loss(r, u, c, LossConfig(distill="none", uniform=False))
    assert float(tot) == pytest.approx(0.7) and terms["distill"] == terms["uniform"] == 0.0
    tot.backward()
    assert u.grad is None and c.grad is None  # neither term reaches the user outputs
    tot, terms = total_loss(r, u, c, LossConfig(distill="contrastive", uniform=False))
    assert terms["distill"] == pytest.approx(float(distill_contrastive_loss(u, c)))
    with pytest.raises(InputError):
        LossConfig(distill="kl")


# --- heads ----------------------------------------------------------------------------------


def test_heads_shapes_and_layers():
    h = LLMSRecHeads(HeadsConfig(d_llm=12, d_cf=5, d_out=7, hidden=9, cf_hidden=6))
    assert [type(m).__name__ for m in h.f_user] == ["Linear", "LayerNorm", "LeakyReLU", "Linear"]
    assert [type(m).__name__ for m in h.f_cf_user] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert h.f_user[0].weight.shape == (9, 12) and h.f_user[3].weight.shape == (7, 9)
    assert h.f_cf_user[0].weight.shape == (6, 5) and h.f_cf_user[3].weight.shape == (7, 6)
    hu, hi = torch.randn(3, 12), torch.randn(3, 4, 12)
    s = h.score(hu, hi)
    assert s.shape == (3, 4)
    want = (h.item(hi) * h.user(hu)[:, None, :]).sum(-1)
    assert torch.allclose(s, want, atol=1e-6)
    assert h.cf_user(torch.randn(3, 5)).shape == (3, 7)
    # paper defaults
    d = HeadsConfig(d_llm=576, d_cf=64)
    assert (d.d_out, d.hidden, d.cf_hidden) == (128, 2048, 128)
    with pytest.raises(InputError):
        HeadsConfig(d_llm=0, d_cf=64)


def test_heads_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    h = LLMSRecHeads(HeadsConfig(d_llm=8, d_cf=4, d_out=3, hidden=5, cf_hidden=2))
    save_heads(h, tmp_path, extra={"note": "x"})
    g = load_heads(tmp_path)
    x = torch.randn(2, 8)
    assert torch.equal(h.user(x), g.user(x)) and not g.training
    (tmp_path / "heads_config.json").write_text('{"heads": {"d_llm": 8, "d_cf": 4}}')
    with pytest.raises(InputError, match="do not match"):
        load_heads(tmp_path)
    with pytest.raises(InputError, match="missing"):
        load_heads(tmp_path / "nope")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_heads_files_follow_the_umask(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        save_heads(LLMSRecHeads(HeadsConfig(d_llm=4, d_cf=2, d_out=2, hidden=3, cf_hidden=2)), tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"heads.safetensors": 0o666 & ~umask, "heads_config.json": 0o666 & ~umask}


def test_fixed_item_projection():
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.array([1.0, 0.0, -1.0], dtype=np.float32)
    f = fixed_item_projection(w, b)
    y = f(t([[1.0, 2.0]]))
    assert y.tolist() == [[3.0, 8.0, 13.0]]  # W @ (1, 2) + b
    assert not any(p.requires_grad for p in f.parameters())
    with pytest.raises(InputError):
        fixed_item_projection(w, b[:2])
