"""The heads trainer on in-memory cached tensors: planted signal, determinism, early stopping."""

import json

import numpy as np
import pytest
import torch

from llmsrec.errors import InputError
from llmsrec.heads.model import load_heads
from llmsrec.heads.train import (
    CachedTensors,
    TrainConfig,
    evaluate_on_tensors,
    fit_heads,
    train_on_tensors,
)
from llmsrec.training import eval_points

SMALL = dict(hidden=32, d_out=16, cf_hidden=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(n_users=100, n_items=80, d=16, d_cf=6, m=30, noise=0.3, signal=True, seed=0):
    """Cached tensors where h_u points at the user's target item (when ``signal``)."""
    rng = np.random.default_rng(seed)
    item_h = rng.normal(size=(n_items + 1, d)).astype(np.float32)
    item_h[0] = 0
    seqs = [np.zeros(0, dtype=np.int64)]
    for _ in range(n_users):
        seqs.append(rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(5, 9)), replace=False))
    proj = rng.normal(size=(d, d_cf)).astype(np.float32)

    def user_states(pos):
        h = np.zeros((n_users + 1, d), dtype=np.float32)
        for u in range(1, n_users + 1):
            base = item_h[seqs[u][pos]] if signal else rng.normal(size=d)
            h[u] = base + noise * rng.normal(size=d)
        return h

    train_h, valid_h, test_h = user_states(-3), user_states(-2), user_states(-1)
    cands = {}
    for split, pos in (("valid", -2), ("test", -1)):
        rows = []
        for u in range(1, n_users + 1):
            pool = np.setdiff1d(np.arange(1, n_items + 1), seqs[u])
            rows.append(np.concatenate([[seqs[u][pos]], rng.choice(pool, size=m, replace=False)]))
        cands[split] = np.array(rows, dtype=np.int64)
    targets = np.array([0] + [s[-3] for s in seqs[1:]], dtype=np.int64)
    return CachedTensors(
        n_items=n_items,
        item_hidden=item_h,
        train_hidden=train_h,
        train_cf=(train_h @ proj).astype(np.float32),
        train_targets=targets,
        train_exclude=[s[:-2] for s in seqs],
        eval_hidden={"valid": valid_h, "test": test_h},
        candidates=cands,
    )


def test_eval_points_every_tenth():
    assert eval_points(48, 10) == [5, 10, 15, 20, 24, 29, 34, 39, 44, 48]
    assert eval_points(3, 10) == [1, 2, 3]


def test_planted_signal_is_learned_and_best_is_selected():
    data = synthetic()
    cfg = TrainConfig(epochs=6, lr=1e-2, seed=1, **SMALL)
    fit = fit_heads(data, cfg, progress=False)
    # the candidates of random heads are ranked by chance; planted h_u -> target is learned
    ev = evaluate_on_tensors(fit.heads, data)
    assert ev["valid"]["NDCG@10"] > 0.8 and ev["test"]["HR@10"] > 0.95
    assert fit.history[0]["NDCG@10"] < 0.3
    # the returned heads are the best validation point, and reproduce its metrics exactly
    best = max(h["NDCG@10"] for h in fit.history)
    assert fit.best["metrics"]["NDCG@10"] == best
    assert ev["valid"]["NDCG@10"] == pytest.approx(best, abs=1e-6)
    first_best = next(h for h in fit.history if h["NDCG@10"] == best)
    assert fit.best["step"] == first_best["step"]
    # 5 batches per epoch, validation after each (every tenth rounds up to every batch)
    assert [h["step"] for h in fit.history][:6] == [1, 2, 3, 4, 5, 6]
    for h in fit.history:
        assert {"loss", "retrieval", "distill", "uniform", "NDCG@10", "HR@10"} <= set(h)
        assert h["loss"] == pytest.approx(h["retrieval"] + h["distill"] + h["uniform"], rel=1e-5)


def test_no_signal_stays_near_chance():
    data = synthetic(signal=False)
    fit = fit_heads(data, TrainConfig(epochs=2, lr=3e-3, **SMALL), progress=False)
    # 31 candidates: chance HR@10 = 10/31; test was never selected on
    assert evaluate_on_tensors(fit.heads, data)["test"]["HR@10"] < 0.6


def test_same_seed_same_heads_other_seed_differs():
    data = synthetic(n_users=60)
    cfg = TrainConfig(epochs=2, lr=1e-3, seed=7, train_negatives=4, **SMALL)
    a = fit_heads(data, cfg, progress=False)
    b = fit_heads(data, cfg, progress=False)
    sa, sb = a.heads.state_dict(), b.heads.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # every recorded field of every validation equal between the two runs, wall time aside
    no_time = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]  # noqa: E731
    assert len(a.history) == len(b.history) > 0
    assert no_time(a.history) == no_time(b.history)
    assert all(h["seconds"] >= 0 for h in a.history + b.history)
    c = fit_heads(data, TrainConfig(epochs=2, lr=1e-3, seed=8, train_negatives=4, **SMALL), progress=False)
    assert not torch.equal(c.heads.state_dict()["f_user.0.weight"], sa["f_user.0.weight"])


def test_early_stopping_after_patience_without_improvement():
    data = synthetic(n_users=60)
    # a vanishing lr: validation never improves after the first point
    cfg = TrainConfig(epochs=50, lr=1e-30, patience=3, **SMALL)
    fit = fit_heads(data, cfg, progress=False)
    assert fit.stopped_early
    assert len(fit.history) == 4  # 1 best + 3 without improvement
    assert fit.best["validation"] == 1 and fit.steps == 4
    assert [h["best"] for h in fit.history] == [True, False, False, False]


def test_ablation_switches_and_full_softmax_train():
    data = synthetic(n_users=40)
    for opts in ({"distill": "none"}, {"uniform": False}, {"distill": "contrastive"}, {"train_negatives": "all"}):
        fit = fit_heads(data, TrainConfig(epochs=1, lr=1e-3, **SMALL, **opts), progress=False)
        h = fit.history[-1]
        if opts.get("distill") == "none":
            assert h["distill"] == 0.0
        if opts.get("uniform") is False:
            assert h["uniform"] == 0.0
        assert np.isfinite(h["loss"])
    # with distill off, f_CF-user never changes
    fit = fit_heads(data, TrainConfig(epochs=1, lr=1e-2, distill="none", **SMALL), progress=False)
    torch.manual_seed(0)
    from llmsrec.heads.model import HeadsConfig, LLMSRecHeads

    init = LLMSRecHeads(HeadsConfig(d_llm=16, d_cf=6, **SMALL))
    assert torch.equal(init.state_dict()["f_cf_user.0.weight"], fit.heads.state_dict()["f_cf_user.0.weight"])


def test_bad_options():
    for bad in ({"train_negatives": "many"}, {"train_negatives": 0}, {"epochs": 0}, {"select_metric": "MRR"},
                {"distill": "kl"}):
        with pytest.raises(InputError):
            TrainConfig(**bad)
    with pytest.raises(InputError, match="unknown option"):
        TrainConfig.from_options(learning_rate=1.0)
    assert TrainConfig.from_options(lr=None, epochs=3).lr == 1e-4
    assert TrainConfig(train_negatives="100").train_negatives == 100
    data = synthetic(n_users=20, n_items=12, m=3)
    with pytest.raises(InputError, match="eligible"):
        fit_heads(data, TrainConfig(train_negatives=11, **SMALL), progress=False)


def test_train_on_tensors_writes_outputs(tmp_path):
    data = synthetic(n_users=40)
    out = tmp_path / "heads"
    res = train_on_tensors(data, out, TrainConfig(epochs=1, lr=1e-3, **SMALL), progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"heads.safetensors", "heads_config.json", "history.jsonl", "training_curve.png", "results.json"} <= names
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 2 and hist[0]["validation"] == 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["test"] == res["test"] and set(saved["valid"]) == {"NDCG@10", "NDCG@20", "HR@10", "HR@20"}
    # reloaded heads reproduce the stored metrics
    assert evaluate_on_tensors(load_heads(out), data) == {"valid": res["valid"], "test": res["test"]}
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(InputError, match="already exists"):
        train_on_tensors(data, out, TrainConfig(epochs=1, **SMALL), progress=False)


def test_bf16_steps_are_an_explicit_option(tmp_path):
    """--step-dtype bf16: autocast training steps, recorded in the outputs; fp32 stays the exact
    default (nothing recorded) and another value is refused."""
    data = synthetic(n_users=40)
    cfg = TrainConfig(epochs=2, lr=1e-3, **SMALL)
    a = fit_heads(data, cfg, progress=False)
    b = fit_heads(data, cfg, progress=False, step_dtype="bf16")
    assert b.steps == a.steps and np.isfinite(b.history[-1]["loss"])
    assert abs(b.history[-1]["loss"] - a.history[-1]["loss"]) < 0.05 * abs(a.history[-1]["loss"])
    assert [h["loss"] for h in a.history] != [h["loss"] for h in b.history]
    assert all(p.dtype == torch.float32 for p in b.heads.parameters())
    assert a.step_seconds > 0 and a.validation_seconds > 0
    with pytest.raises(InputError, match="--step-dtype"):
        fit_heads(data, cfg, progress=False, step_dtype="fp16")
    res = train_on_tensors(data, tmp_path / "bf16", cfg, progress=False, step_dtype="bf16")
    assert res["step_dtype"] == "bf16"
    assert json.loads((tmp_path / "bf16" / "heads_config.json").read_text())["step_dtype"] == "bf16"
    res = train_on_tensors(data, tmp_path / "fp32", cfg, progress=False)
    assert "step_dtype" not in res
    assert "step_dtype" not in json.loads((tmp_path / "fp32" / "heads_config.json").read_text())


def test_step_dtype_is_for_cache_mode_only(tmp_path):
    from click.testing import CliRunner

    from llmsrec.cli import main

    r = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "d"), "--mode", "e2e", "--out",
                                  str(tmp_path / "o"), "--step-dtype", "bf16"])
    assert r.exit_code == 2 and "--step-dtype" in r.output
