"""GRU4Rec, BERT4Rec, NextItNet: causality, padding invariance, BERT4Rec's cloze mask,
checkpoint I/O, training on a deterministic next-item rule, CLI, and use as a teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from llmsrec.cfsrec import (
    MODELS,
    BERT4Rec,
    BERT4RecConfig,
    GRU4Rec,
    NextItNet,
    NextItNetConfig,
    evaluate_cfsrec,
    load_cfsrec,
    load_sasrec,
    pad_left,
    save_cfsrec,
    train_cfsrec,
)
from llmsrec.cfsrec.bert4rec import cloze_batch
from llmsrec.cfsrec.train import sequence_loss
from llmsrec.cli import main
from llmsrec.data import prepare_from_interactions
from llmsrec.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ITEMS = 60
NEW = ["gru4rec", "bert4rec", "nextitnet"]
SMALL = {  # small but complete configs (every code path, quick on one thread)
    "gru4rec": dict(hidden=16, gru_hidden=24, layers=2, maxlen=20),
    "bert4rec": dict(hidden=16, blocks=2, heads=2, maxlen=20),
    "nextitnet": dict(hidden=16, dilations=(1, 2), maxlen=20),
}


def _model(name: str, seed: int = 0, **kw):
    spec = MODELS[name]
    torch.manual_seed(seed)
    return spec.model_cls(spec.config_cls(n_items=N_ITEMS, **{**SMALL[name], **kw}))


@pytest.fixture(scope="module")
def walk_ds(tmp_path_factory):
    """120 users walking items i, i+1, i+2, ... (mod 60): the next item is deterministic."""
    rng = np.random.default_rng(0)
    inter = []
    for u in range(120):
        length, start = int(rng.integers(8, 15)), int(rng.integers(0, N_ITEMS))
        for t in range(length):
            inter.append((f"u{u}", f"i{(start + t) % N_ITEMS}", t))
    out = tmp_path_factory.mktemp("data") / "walk"
    return prepare_from_interactions(inter, {}, out, kcore=1, num_negatives=40)


def _random_batch(seed: int, b: int = 5, L: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, N_ITEMS + 1, (b, L), generator=g)
    seqs[:2, :4] = 0  # some left padding
    return seqs


# --- shapes, padding rows --------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_shapes_padding_row_and_input_checks(name):
    m = _model(name).eval()
    seqs = pad_left([[1, 2, 3], [4]], 8)
    assert m.user_representation(seqs).shape == (2, 16)
    e = m.item_embeddings()
    assert e.shape == (N_ITEMS + 1, 16)
    assert torch.count_nonzero(e[0]) == 0
    with pytest.raises(ValueError, match="maxlen"):
        m.user_representation(torch.ones(1, 21, dtype=torch.long))
    with pytest.raises(ValueError, match="ids must be in"):
        m.user_representation(torch.tensor([[0, N_ITEMS + 1]]))


@pytest.mark.parametrize("name", NEW)
def test_score_is_dot_product_with_item_embeddings(name):
    m = _model(name).eval()
    seqs = pad_left([[1, 2, 3], [9, 8]], 10)
    cand = torch.tensor([[4, 5, 6], [0, 30, 60]])
    with torch.no_grad():
        o, e = m.user_representation(seqs), m.item_embeddings()
        expected = torch.stack([e[cand[b]] @ o[b] for b in range(2)])
        assert torch.allclose(m.score(seqs, cand), expected, atol=1e-6)
        assert m.score(seqs, cand)[1, 0] == 0.0  # padding item scores exactly 0


# --- causality and padding invariance ---------------------------------------------------------


@pytest.mark.parametrize("name", ["gru4rec", "nextitnet"])
def test_causality_future_item_does_not_change_the_past(name):
    m = _model(name).eval()
    seqs = _random_batch(1)
    with torch.no_grad():
        base = m(seqs)
        for t in range(4, 15):
            changed = seqs.clone()
            changed[:, t + 1] = changed[:, t + 1] % N_ITEMS + 1
            out = m(changed)
            assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4)


def test_bert4rec_is_bidirectional():
    m = _model("bert4rec").eval()
    seqs = _random_batch(2)
    changed = seqs.clone()
    changed[:, -1] = changed[:, -1] % N_ITEMS + 1
    with torch.no_grad():
        assert (m(changed)[:, 5] - m(seqs)[:, 5]).abs().max() > 1e-5


@pytest.mark.parametrize("name", NEW)
def test_left_padding_does_not_change_user_representation(name):
    m = _model(name).eval()
    history = [7, 3, 59, 42, 5, 18]
    with torch.no_grad():
        ref = m.user_representation(pad_left([history], len(history)))[0]
        for width in (7, 12, 20):
            o = m.user_representation(pad_left([history], width))[0]
            assert torch.allclose(o, ref, atol=1e-5, rtol=0)
        batch = pad_left([list(range(1, 21)), history], 20)  # longer row: more padding for history
        assert torch.allclose(m.user_representation(batch)[1], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gru4rec", "nextitnet"])
def test_padding_positions_and_empty_rows_are_zero(name):
    m = _model(name).eval()
    seqs = pad_left([[], [1, 2], [3, 4, 5, 6]], 8)
    with torch.no_grad():
        out = m(seqs)
    assert torch.count_nonzero(out[seqs == 0]) == 0
    assert torch.count_nonzero(out[seqs != 0].abs().sum(-1) == 0) == 0


def test_gru4rec_equals_plain_recurrence_over_the_real_items():
    m = _model("gru4rec").eval()
    history = torch.tensor([[11, 4, 38, 2, 57]])
    with torch.no_grad():
        h, _ = m.gru(m.item_emb(history))  # no padding, no packing
        expected = m.out(h[:, -1])
        got = m.user_representation(pad_left([history[0].numpy()], 20))
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_nextitnet_receptive_field():
    cfg = NextItNetConfig(n_items=N_ITEMS, hidden=8, kernel=3, dilations=(1,), maxlen=20)
    assert cfg.receptive_field == 7  # 1 + (k-1)(r + 2r)
    torch.manual_seed(0)
    m = NextItNet(cfg).eval()
    seqs = _random_batch(3, L=20)
    with torch.no_grad():
        base = m.user_representation(seqs)
        for back, inside in ((7, True), (8, False)):
            changed = seqs.clone()
            changed[:, -back] = changed[:, -back] % N_ITEMS + 1
            same = torch.allclose(m.user_representation(changed), base, atol=1e-6, rtol=0)
            assert same is not inside


# --- BERT4Rec's cloze mask --------------------------------------------------------------------


def test_bert4rec_user_representation_reads_an_appended_mask():
    m = _model("bert4rec").eval()
    seqs = pad_left([[5, 6, 7], [1, 2, 3, 4, 5]], 10)
    with torch.no_grad():
        full = m(torch.cat([seqs, torch.full((2, 1), N_ITEMS + 1)], dim=1))
        assert torch.equal(m.user_representation(seqs), full[:, -1])
    with pytest.raises(ValueError, match="ids must be in"):
        m.user_representation(torch.tensor([[1, N_ITEMS + 1]]))  # [mask] is not a history item


def test_cloze_batch_masks_and_labels():
    seqs = pad_left([[3, 4, 5, 6, 7, 8, 9, 10], [20, 21], [30, 31, 32, 33, 34]], 9).numpy()
    mask_id = N_ITEMS + 1
    inputs, labels = cloze_batch(seqs, np.random.default_rng(0), 0.4, 0.0, mask_id)
    masked = inputs == mask_id
    assert masked.any(axis=1).all()  # every row predicts something
    assert not masked[seqs == 0].any()  # padding is never masked
    assert np.array_equal(labels[masked], seqs[masked])  # the label is the hidden item
    assert (labels[~masked] == 0).all()
    assert np.array_equal(inputs[~masked], seqs[~masked])
    # the masked positions depend on the rng and the padding only, never on the items
    other = np.where(seqs != 0, (seqs + 17) % N_ITEMS + 1, 0)
    inputs2, _ = cloze_batch(other, np.random.default_rng(0), 0.4, 0.0, mask_id)
    assert np.array_equal(inputs2 == mask_id, masked)
    # mask_last_prob = 1: only the most recent item of each row is masked
    inputs3, labels3 = cloze_batch(seqs, np.random.default_rng(5), 0.4, 1.0, mask_id)
    assert np.array_equal(inputs3 == mask_id, np.eye(9, dtype=bool)[[-1, -1, -1]])
    assert labels3[:, -1].tolist() == [10, 21, 34]


def test_bert4rec_masked_position_never_sees_its_label():
    """Changing the item under a mask changes neither the input nor any output."""
    m = _model("bert4rec").eval()
    seqs = pad_left([list(range(1, 15)), [40, 41, 42, 43, 44, 45]], 15).numpy()
    inputs, labels = cloze_batch(seqs, np.random.default_rng(3), 0.3, 0.0, N_ITEMS + 1)
    rows, cols = np.nonzero(labels)
    other = seqs.copy()
    other[rows, cols] = (seqs[rows, cols] + 29) % N_ITEMS + 1  # different labels
    inputs2, labels2 = cloze_batch(other, np.random.default_rng(3), 0.3, 0.0, N_ITEMS + 1)
    assert not np.array_equal(labels, labels2)
    assert np.array_equal(inputs, inputs2)
    assert not np.isin(labels[rows, cols], inputs[rows, cols]).any()
    with torch.no_grad():
        assert torch.equal(m(torch.from_numpy(inputs)), m(torch.from_numpy(inputs2)))


def test_losses_match_their_definitions():
    m = _model("gru4rec")
    feats = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 5, 6], [0, 0, 60]])
    negatives = torch.tensor([[1, 2, 3], [4, 7, 8]])
    e = m.item_embeddings().detach()
    pos = [(0, 1), (0, 2), (1, 2)]
    with torch.no_grad():
        ce = sequence_loss(m, feats, targets, None, "ce")
        expected = -torch.stack([torch.log_softmax(feats[b, t] @ e[1:].T, -1)[targets[b, t] - 1] for b, t in pos]).mean()
        assert torch.allclose(ce, expected, atol=1e-5)
        bce = sequence_loss(m, feats, targets, negatives, "bce")
        lp = torch.stack([feats[b, t] @ e[targets[b, t]] for b, t in pos])
        ln = torch.stack([feats[b, t] @ e[negatives[b, t]] for b, t in pos])
        assert torch.allclose(bce, -F.logsigmoid(lp).mean() - F.logsigmoid(-ln).mean(), atol=1e-5)


# --- checkpoint I/O -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_save_load_round_trip(name, tmp_path):
    m = _model(name, dropout=0.0).eval()
    save_cfsrec(m, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg == {"model": name, **m.config.to_dict()}
    loaded = load_cfsrec(tmp_path / "ckpt")
    assert type(loaded) is type(m) and not loaded.training
    seqs = pad_left([[1, 2, 3], [4, 5, 6, 7, 8]], 20)
    with torch.no_grad():
        assert torch.equal(loaded.user_representation(seqs), m.user_representation(seqs))
    assert set(load_file(str(tmp_path / "ckpt" / "model.safetensors"))) == set(m.state_dict())
    with pytest.raises(InputError, match="not 'sasrec'"):
        load_sasrec(tmp_path / "ckpt")


def test_unknown_model_in_config(tmp_path):
    save_cfsrec(_model("gru4rec"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model": "caser"}))
    with pytest.raises(InputError, match="'caser'"):
        load_cfsrec(tmp_path)


# --- training -------------------------------------------------------------------------------------

TRAIN = {  # settings that learn the walk within a few seconds on one thread
    "gru4rec": dict(lr=1e-2, epochs=20, hidden=32, gru_hidden=32, dropout=0.0),
    "bert4rec": dict(lr=5e-3, epochs=40, batch_size=32, hidden=32, dropout=0.0),
    "nextitnet": dict(lr=1e-2, epochs=10, hidden=32, dilations=(1, 2)),
}


@pytest.mark.parametrize("name", NEW)
def test_training_learns_the_next_item_rule(name, walk_ds, tmp_path):
    res = train_cfsrec(walk_ds, tmp_path / name, model=name, eval_every=5, patience=5, maxlen=12, seed=0,
                       progress=False, **TRAIN[name])
    # random scoring over 41 candidates gives HR@10 ~ 0.24
    assert res["valid"]["HR@10"] > 0.9 and res["test"]["HR@10"] > 0.9
    assert res["model"] == name and res["train"]["loss"] == "ce"
    assert res["train"]["objective"] == ("cloze" if name == "bert4rec" else "next")
    again = evaluate_cfsrec(walk_ds, tmp_path / name, expect=name)
    assert again["test"] == pytest.approx(res["test"], abs=1e-12)
    assert json.loads((tmp_path / name / "results.json").read_text()) == res
    assert torch.count_nonzero(load_cfsrec(tmp_path / name).item_embeddings()[0]) == 0


def test_same_seed_same_bert4rec_weights(walk_ds, tmp_path):
    kw = dict(model="bert4rec", epochs=2, eval_every=1, maxlen=12, hidden=16, progress=False)
    for d, seed in (("a", 3), ("b", 3), ("c", 4)):
        train_cfsrec(walk_ds, tmp_path / d, seed=seed, **kw)
    a, b, c = (load_file(str(tmp_path / d / "model.safetensors")) for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_trainer_option_errors(walk_ds, tmp_path):
    with pytest.raises(InputError, match="do not apply to gru4rec"):
        train_cfsrec(walk_ds, tmp_path / "x", model="gru4rec", blocks=2, progress=False)
    with pytest.raises(InputError, match="unknown CF-SRec model"):
        train_cfsrec(walk_ds, tmp_path / "x", model="caser", progress=False)
    with pytest.raises(ValueError, match="loss"):
        train_cfsrec(walk_ds, tmp_path / "x", model="nextitnet", loss="hinge", progress=False)
    with pytest.raises(ValueError, match="divisible"):
        BERT4RecConfig(n_items=5, hidden=10, heads=3)
    with pytest.raises(ValueError, match="dilations"):
        NextItNetConfig(n_items=5, dilations=())


# --- teacher and CLI ------------------------------------------------------------------------------


def test_any_cfsrec_is_a_precompute_teacher(tmp_path):
    from llmsrec.cfsrec.teacher import load_teacher, teacher_user_reps

    m = _model("bert4rec").eval()
    save_cfsrec(m, tmp_path)
    teacher, digest = load_teacher(tmp_path)
    assert isinstance(teacher, BERT4Rec) and len(digest) == 64
    inputs = [np.array([], dtype=np.int64), np.array([3, 4, 5]), np.array([9])]
    got = teacher_user_reps(teacher, inputs, [1, 0, 2])
    with torch.no_grad():
        expected = m.user_representation(pad_left([inputs[1], inputs[2]], 20)).numpy()
    assert np.allclose(got[[0, 2]], expected, atol=1e-6)
    assert not got[1].any()  # an empty input gets zeros
    assert isinstance(load_teacher(_model("gru4rec"))[0], GRU4Rec)


def test_cli_cfsrec_train_and_evaluate(walk_ds, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(main, ["cfsrec", "train", "--data", str(walk_ds.root), "--model", "nextitnet", "--out",
                             str(out), "--epochs", "1", "--eval-every", "1", "--maxlen", "12", "--hidden", "8",
                             "--dilations", "1,2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "| nextitnet | test |" in r.output
    assert json.loads((out / "config.json").read_text())["dilations"] == [1, 2]
    r = runner.invoke(main, ["evaluate", "--data", str(walk_ds.root), "--model", "nextitnet",
                             "--checkpoint", str(out), "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e.json").read_text())["test"] == pytest.approx(
        json.loads((out / "results.json").read_text())["test"], abs=1e-12)
    r = runner.invoke(main, ["cfsrec", "train", "--data", str(walk_ds.root), "--model", "gru4rec", "--out",
                             str(tmp_path / "g"), "--blocks", "2"])
    assert r.exit_code == 2 and "do not apply to gru4rec" in r.output
