"""SASRec teacher: causality, padding invariances, checkpoint I/O, training, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from llmsrec.cfsrec import (
    SASRec,
    SASRecConfig,
    evaluate_sasrec,
    evaluate_split,
    load_sasrec,
    pad_left,
    save_sasrec,
    train_sasrec,
)
from llmsrec.cli import main
from llmsrec.data import prepare_from_interactions
from llmsrec.errors import InputError

N_ITEMS = 100


def _model(seed: int = 0, **kw) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(n_items=N_ITEMS, **kw))


@pytest.fixture(scope="module")
def next_item_ds(tmp_path_factory):
    """200 users walking items i, i+1, i+2, ... (mod 100): the next item is deterministic."""
    rng = np.random.default_rng(0)
    inter = []
    for u in range(200):
        length, start = int(rng.integers(8, 16)), int(rng.integers(0, N_ITEMS))
        for t in range(length):
            inter.append((f"u{u}", f"i{(start + t) % N_ITEMS}", t))
    out = tmp_path_factory.mktemp("data") / "walk"
    return prepare_from_interactions(inter, {}, out, kcore=1, num_negatives=50)


@pytest.fixture(scope="module")
def trained(next_item_ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sasrec"
    res = train_sasrec(next_item_ds, out, epochs=20, eval_every=5, patience=3, maxlen=16,
                       seed=0, progress=False)
    return out, res


# --- the model ------------------------------------------------------------------------------


def test_pad_left_keeps_last_items():
    got = pad_left([np.array([1, 2, 3]), [], [4, 5, 6, 7, 8]], 4)
    assert got.dtype == torch.int64
    assert got.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0], [5, 6, 7, 8]]


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(n_items=5, hidden=10, heads=3)
    with pytest.raises(ValueError, match="n_items"):
        SASRecConfig(n_items=0)
    with pytest.raises(ValueError, match="dropout"):
        SASRecConfig(n_items=5, dropout=1.0)


def test_shapes_and_padding_row_zero_at_init():
    m = _model().eval()
    seqs = pad_left([[1, 2, 3], [4]], 8)
    assert m(seqs).shape == (2, 8, 64)
    assert m.user_representation(seqs).shape == (2, 64)
    e = m.item_embeddings()
    assert e.shape == (N_ITEMS + 1, 64)
    assert torch.count_nonzero(e[0]) == 0
    with pytest.raises(ValueError, match="maxlen"):
        m(torch.ones(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="item ids"):
        m(torch.tensor([[0, N_ITEMS + 1]]))


def test_causality_future_item_does_not_change_the_past():
    m = _model(heads=2).eval()
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(1, N_ITEMS + 1, (6, 20), generator=g)
    seqs[:3, :5] = 0  # some left padding
    with torch.no_grad():
        base = m(seqs)
        for t in range(5, 19):
            changed = seqs.clone()
            changed[:, t + 1] = changed[:, t + 1] % N_ITEMS + 1
            out = m(changed)
            assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4)


def test_left_padding_does_not_change_user_representation():
    m = _model().eval()
    history = [7, 3, 99, 42, 5, 18]
    with torch.no_grad():
        ref = m.user_representation(pad_left([history], len(history)))[0]
        for width in (7, 10, 50, 128):
            o = m.user_representation(pad_left([history], width))[0]
            assert torch.allclose(o, ref, atol=1e-5, rtol=0)
        # in a batch with a longer row, the same history gets more left padding
        batch = pad_left([list(range(1, 41)), history], 128)
        assert torch.allclose(m.user_representation(batch)[1], ref, atol=1e-5, rtol=0)


def test_fully_padded_rows_are_finite_in_forward_and_backward():
    m = _model().train()
    seqs = pad_left([[], [1, 2], []], 10)
    out = m(seqs)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_score_is_dot_product_with_raw_embeddings():
    m = _model().eval()
    seqs = pad_left([[1, 2, 3], [9, 8]], 16)
    cand = torch.tensor([[4, 5, 6], [0, 50, 100]])
    with torch.no_grad():
        o = m.user_representation(seqs)
        e = m.item_embeddings()
        expected = torch.stack([e[cand[b]] @ o[b] for b in range(2)])
        assert torch.allclose(m.score(seqs, cand), expected, atol=1e-6)
        assert m.score(seqs, cand)[1, 0] == 0.0  # padding item scores exactly 0


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    m = _model()
    seqs = pad_left([[1, 2, 3, 4]], 8)
    m.train()
    assert not torch.equal(m(seqs), m(seqs))
    m.eval()
    assert torch.equal(m(seqs), m(seqs))


def test_padding_row_stays_zero_after_manual_steps():
    m = _model().train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.9, 0.98))
    seqs = pad_left([[1, 2, 3], [4, 5], [6]], 6)
    cand = torch.tensor([[0, 1], [0, 2], [7, 0]])  # the padding id among candidates too
    for _ in range(5):
        loss = m.score(seqs, cand).pow(2).mean() - m(seqs).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.count_nonzero(m.item_embeddings()[0]) == 0
    assert torch.count_nonzero(m.item_embeddings()[1]) > 0


def test_save_load_round_trip(tmp_path):
    m = _model(blocks=3, heads=2, hidden=32, maxlen=20, dropout=0.2).eval()
    save_sasrec(m, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg == {"model": "sasrec", "n_items": N_ITEMS, "hidden": 32, "blocks": 3, "heads": 2,
                   "dropout": 0.2, "maxlen": 20}
    loaded = load_sasrec(tmp_path / "ckpt")
    assert not loaded.training
    seqs = pad_left([[1, 2, 3], [4, 5, 6, 7, 8], []], 20)
    with torch.no_grad():
        assert torch.equal(loaded(seqs), m(seqs))
    # plain safetensors (no pickle) holds every parameter
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(tensors) == set(m.state_dict())


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        load_sasrec(tmp_path)
    m = _model()
    save_sasrec(m, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["hidden"] = 32
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="do not match"):
        load_sasrec(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_sasrec(tmp_path / "c")


# --- training -------------------------------------------------------------------------------


def test_training_learns_the_next_item_rule(trained):
    _, res = trained
    # random scoring over 51 candidates would give HR@10 ~ 0.2
    assert res["valid"]["HR@10"] > 0.9
    assert res["test"]["HR@10"] > 0.9
    assert res["test"]["NDCG@10"] > 0.6


def test_run_folder_contents(trained, next_item_ds):
    out, res = trained
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json",
                                               "history.jsonl", "results.json"}
    assert json.loads((out / "results.json").read_text()) == res
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, res["epochs_run"] + 1))
    validated = {h["epoch"]: h["valid"] for h in history if "valid" in h}
    assert set(validated) == {e for e in range(5, res["epochs_run"] + 1, 5)}
    # the selected epoch is the first one with the best validation NDCG@10
    best = max(validated.values(), key=lambda v: v["NDCG@10"])["NDCG@10"]
    assert res["best_epoch"] == min(e for e, v in validated.items() if v["NDCG@10"] == best)
    assert res["valid"] == validated[res["best_epoch"]]
    assert all(math.isfinite(h["loss"]) for h in history)
    # the checkpoint is the selected one: re-evaluation reproduces results.json
    again = evaluate_sasrec(next_item_ds, out)
    assert again["valid"] == pytest.approx(res["valid"], abs=1e-12)
    assert again["test"] == pytest.approx(res["test"], abs=1e-12)


def test_padding_row_stays_zero_after_training(trained):
    out, _ = trained
    e = load_sasrec(out).item_embeddings()
    assert torch.count_nonzero(e[0]) == 0
    assert torch.count_nonzero(e[1:]) == e[1:].numel()


def test_same_seed_same_checkpoint(next_item_ds, tmp_path):
    kw = dict(epochs=3, eval_every=1, patience=5, maxlen=16, progress=False)
    train_sasrec(next_item_ds, tmp_path / "a", seed=3, **kw)
    train_sasrec(next_item_ds, tmp_path / "b", seed=3, **kw)
    train_sasrec(next_item_ds, tmp_path / "c", seed=4, **kw)
    a, b, c = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_early_stopping_with_patience(next_item_ds, tmp_path):
    # lr 0 never improves after the first validation: stops after 1 + patience validations
    res = train_sasrec(next_item_ds, tmp_path / "r", epochs=50, eval_every=2, patience=2, lr=1e-12,
                       maxlen=16, progress=False)
    assert res["best_epoch"] == 2 and res["epochs_run"] == 6 and res["stopped_early"]


def test_existing_out_needs_force(next_item_ds, tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(InputError, match="already exists"):
        train_sasrec(next_item_ds, tmp_path / "r", epochs=1, progress=False)


def test_evaluate_split_matches_manual_scoring(next_item_ds):
    from llmsrec.metrics import ranking_metrics

    m = _model(maxlen=16).eval()
    inputs, _ = next_item_ds.view("test")
    cand = next_item_ds.candidates("test")
    with torch.no_grad():
        scores = np.stack([
            (m.item_embeddings()[torch.from_numpy(cand[u - 1])]
             @ m.user_representation(pad_left([inputs[u]], 16))[0]).numpy()
            for u in range(1, next_item_ds.n_users + 1)
        ])
    assert evaluate_split(m, next_item_ds, "test") == pytest.approx(ranking_metrics(scores), abs=1e-9)


# --- CLI ------------------------------------------------------------------------------------


def test_cli_train_and_evaluate(next_item_ds, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(main, ["sasrec", "train", "--data", str(next_item_ds.root), "--out", str(out),
                             "--epochs", "2", "--eval-every", "1", "--maxlen", "16"])
    assert r.exit_code == 0, r.output
    assert "| sasrec | test |" in r.output
    r = runner.invoke(main, ["evaluate", "--data", str(next_item_ds.root), "--model", "sasrec",
                             "--checkpoint", str(out), "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "e.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert written["test"] == pytest.approx(results["test"], abs=1e-12)
    assert "| sasrec | valid |" in r.output
    # an existing --out is a one-line error with exit code 2
    r = runner.invoke(main, ["sasrec", "train", "--data", str(next_item_ds.root), "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
