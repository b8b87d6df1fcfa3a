"""Stacked training of head variants (llmsrec.heads.stacked) against each variant trained alone."""

import numpy as np
import pytest
import torch

from llmsrec.errors import InputError
from llmsrec.heads.stacked import PER_VARIANT, fit_stacked, stack_groups, stack_key
from llmsrec.heads.train import CachedTensors, TrainConfig, fit_heads
from test_heads_train import SMALL, synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rich(data: CachedTensors, n_layers=2, n_slots=3, seed=0) -> CachedTensors:
    """``data`` with layers+slots user states and layers+soft item states built around its
    ``out`` states (the signal stays in every vector; short histories get all-zero slots)."""
    rng = np.random.default_rng(seed)

    def expand(h, t, zero_slots=False):
        x = h[:, None, :] + 0.3 * rng.normal(size=(h.shape[0], t, h.shape[1]))
        x *= rng.uniform(0.5, 3.0, size=(1, t, 1))  # layers of different scales
        if zero_slots:  # the last slot of every other row holds no item
            x[::2, -n_layers:] = 0
        x[0] = 0
        return x.astype(np.float32)

    tu, ti = n_layers + n_slots * n_layers, 2 * n_layers
    return CachedTensors(
        n_items=data.n_items, item_hidden=expand(data.item_hidden, ti), train_hidden=expand(data.train_hidden, tu, True),
        train_cf=data.train_cf, train_targets=data.train_targets, train_exclude=data.train_exclude,
        eval_hidden={v: expand(h, tu, True) for v, h in data.eval_hidden.items()}, candidates=data.candidates,
        user_readout="layers+slots", item_readout="layers+soft", n_layers=n_layers, n_slots=n_slots)


def assert_same(stacked, alone, atol=2e-5):
    assert stacked.best["step"] == alone.best["step"]
    assert stacked.steps == alone.steps and stacked.epochs_run == alone.epochs_run
    assert stacked.stopped_early == alone.stopped_early
    assert stacked.best["metrics"] == pytest.approx(alone.best["metrics"], abs=1e-6)
    assert len(stacked.history) == len(alone.history)
    for a, b in zip(stacked.history, alone.history):
        assert a["step"] == b["step"] and a["lr"] == pytest.approx(b["lr"]) and a["best"] == b["best"]
        for k in ("loss", "retrieval", "distill", "uniform", "NDCG@10"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    sa, sb = stacked.heads.state_dict(), alone.heads.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k in ("f_item.3.bias", "f_item.mlp.3.bias"):
            # it adds the same <f_user, b> to every item of a user: the softmax of Eq. 1 does not
            # see it, its gradient is float noise, and Adam turns noise into full-size steps
            continue
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=1e-3, msg=k)


def test_stacked_equals_each_variant_alone_sampled_negatives():
    data = synthetic(n_users=60, n_items=50)
    common = dict(SMALL, epochs=3, batch_size=8, train_negatives=3, evals_per_epoch=2, patience=3, lr_decay=0.9)
    cfgs = [TrainConfig(**common, lr=1e-2, seed=0),
            TrainConfig(**common, lr=3e-3, seed=1, distill="contrastive", uniform_weight=0.5),
            TrainConfig(**common, lr=1e-2, seed=2, distill="none", uniform=False),
            TrainConfig(**common, lr=1e-3, seed=0, beta2=0.999, weight_decay=1e-3, distill_weight=2.0)]
    got = fit_stacked(data, cfgs)
    for g, c in zip(got, cfgs):
        assert_same(g, fit_heads(data, c, progress=False))
    # without L_Distill f_CF-user is never updated, as alone
    init = fit_heads(data, TrainConfig(**{**common, "epochs": 1, "distill": "none", "seed": 2}), progress=False)
    torch.testing.assert_close(got[2].heads.f_cf_user[0].weight, init.heads.f_cf_user[0].weight, atol=0, rtol=0)


def test_stacked_equals_alone_on_readouts_with_the_full_softmax_and_early_stop():
    data = rich(synthetic(n_users=50, n_items=40))
    common = dict(SMALL, epochs=6, batch_size=10, train_negatives="all", evals_per_epoch=2, patience=2)
    cfgs = [TrainConfig(**common, lr=3e-2, seed=0), TrainConfig(**common, lr=1e-3, seed=1, distill="contrastive")]
    got = fit_stacked(data, cfgs)
    alone = [fit_heads(data, c, progress=False) for c in cfgs]
    assert alone[0].steps != alone[1].steps  # one stops before the other: it leaves the stack
    for g, a in zip(got, alone):
        assert_same(g, a)


def test_variants_that_stop_at_the_same_validation_all_leave_the_stack():
    """The last variants of a stack stopping early together (here two identical ones): each
    record equals its training alone."""
    data = synthetic(n_users=50, n_items=40)
    c = TrainConfig(**SMALL, epochs=20, batch_size=10, train_negatives=3, evals_per_epoch=2, patience=1, lr=3e-2)
    alone = fit_heads(data, c, progress=False)
    assert alone.stopped_early and alone.epochs_run < 20
    for g in fit_stacked(data, [c, c]):
        assert_same(g, alone)


def test_stack_keys_and_groups():
    a = TrainConfig(lr=1e-3, seed=0)
    assert stack_key(a) == stack_key(TrainConfig(lr=3e-4, seed=2, distill="none", uniform=False))
    assert stack_key(a) != stack_key(TrainConfig(train_negatives=3))
    cfgs = [TrainConfig(seed=s, train_negatives=n) for n in (3, "all") for s in range(3)]
    assert stack_groups(cfgs, 2) == [[0, 1], [2], [3, 4], [5]]
    assert stack_groups(cfgs, 8) == [[0, 1, 2], [3, 4, 5]]
    assert PER_VARIANT <= set(TrainConfig.__dataclass_fields__)
    with pytest.raises(InputError, match="--stack 0"):
        stack_groups(cfgs, 0)
    with pytest.raises(InputError, match="differ in fields"):
        fit_stacked(synthetic(n_users=10, n_items=50), [cfgs[0], cfgs[3]])
