"""`llmsrec analyze`: the analysis functions on hand-made inputs, and the report on a tiny run
whose "LLM" ignores order (its shuffled states equal the original ones)."""

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from llmsrec.cfsrec import load_sasrec, pad_left, train_sasrec
from llmsrec.cli import main
from llmsrec.data import prepare_from_interactions
from llmsrec.evaluate import analyses as A
from llmsrec.experiments.analyze import ANALYSES, analyze_run, parse_only, parse_seeds
from llmsrec.experiments.compare import parse_seeds as compare_parse_seeds
from llmsrec.errors import InputError
from llmsrec.heads.train import train_heads
from llmsrec.precompute.prompts import build_view

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- pure functions -----------------------------------------------------------------------


def test_transition_scores_by_hand():
    seqs = [np.array([], dtype=np.int64), np.array([1, 2, 3]), np.array([1, 2, 4]), np.array([2, 3]), np.array([5])]
    # Count(1->2) = 2, Count(2->3) = 2, Count(2->4) = 1
    assert A.transition_scores(seqs).tolist() == [0.0, 2.0, 1.5, 2.0, 0.0]


def test_split_top_fraction_breaks_ties_by_user_id():
    scores = np.array([0, 3.0, 1.0, 3.0, 2.0, 1.0])
    top, rest = A.split_top_fraction(scores, np.arange(1, 6), 0.5)
    assert top.tolist() == [1, 3, 4] and rest.tolist() == [2, 5]


def test_warm_cold_items_by_hand():
    counts = np.array([0, 5, 1, 3, 3, 0, 10])
    warm, cold = A.warm_cold_items(counts, 0.35)  # ceil(0.35 * 6) = 3 items each
    assert np.flatnonzero(warm).tolist() == [1, 3, 6]
    assert np.flatnonzero(cold).tolist() == [2, 4, 5]


def test_similarity_distance_ratio_and_mean_std():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert A.mean_cosine_similarity(a, a) == pytest.approx(1.0)
    assert A.mean_cosine_similarity(a, np.array([[0.0, 1.0], [0.0, 5.0], [1.0, 1.0]])) == pytest.approx(0.5)
    assert A.mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])) == pytest.approx(4.0)
    assert A.change_ratio(0.5, 0.45) == pytest.approx(-0.1)
    assert A.change_ratio(0.4, 0.4) == 0.0
    ms = A.mean_std([{"x": 1.0}, {"x": 3.0}])
    assert ms["x"] == (2.0, pytest.approx(2 ** 0.5))
    assert A.mean_std([{"x": 1.0}])["x"] == (1.0, 0.0)


def test_subset_metrics_match_the_rows():
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    assert A.subset_metrics(scores, [0, 2])["HR@10"] == 1.0
    assert A.subset_metrics(scores, [1])["NDCG@10"] == pytest.approx(1 / np.log2(3))
    with pytest.raises(ValueError):
        A.subset_metrics(scores, [])


def test_shuffle_training_sequences_keeps_last_two_and_items():
    seqs = [np.zeros(0, np.int64)] + [np.arange(1, 12) + u for u in range(1, 4)]
    out = A.shuffle_training_sequences(seqs, seed=0)
    assert len(out) == 4 and out[0].size == 0  # the padding entry stays empty
    for u in range(1, 4):
        assert out[u][-2:].tolist() == seqs[u][-2:].tolist()
        assert sorted(out[u][:-2].tolist()) == seqs[u][:-2].tolist()
        assert out[u][:-2].tolist() != seqs[u][:-2].tolist()
    again = A.shuffle_training_sequences(seqs[:3], seed=0)  # independent of the other users
    assert again[2].tolist() == out[2].tolist()


def test_option_parsing():
    assert parse_only(None) == ANALYSES
    assert parse_only("similarity,shuffled-inference") == ("shuffled-inference", "similarity")
    with pytest.raises(InputError, match="unknown analysis 'nope'"):
        parse_only("nope")
    with pytest.raises(InputError, match="--only: empty"):
        parse_only(" , ")
    assert parse_seeds(None, 3) == [3]
    assert parse_seeds("0,1,2", 0) == [0, 1, 2]
    assert parse_seeds("1,1", 0) == [1]  # one rule with compare's --seeds: duplicates dropped
    assert parse_seeds is compare_parse_seeds
    for bad in ("a", "-1", ""):
        with pytest.raises(InputError):
            parse_seeds(bad, 0)


# --- a tiny run folder ---------------------------------------------------------------------

D_LLM = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """data + SASRec + a cache from an order-blind "LLM" (h_u = sum of window item vectors) + heads."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    rows = []
    for u in range(30):
        start = rng.integers(0, 20)
        items = [(start + 2 * t) % 24 for t in range(12)]  # an order pattern SASRec can learn
        rows += [(f"u{u}", f"i{i}", 100 * u + t) for t, i in enumerate(items)]
    titles = {f"i{i}": f"Movie {i}" for i in range(24)}
    ds = prepare_from_interactions(rows, titles, root / "data", kcore=1, num_negatives=9, seed=0)
    train_sasrec(ds, root / "sasrec", epochs=4, eval_every=2, hidden=8, maxlen=16, progress=False)
    model = load_sasrec(root / "sasrec")
    U, N = ds.n_users, ds.n_items
    item_vec = rng.normal(size=(N + 1, D_LLM)).astype(np.float32)
    item_vec[0] = 0
    (root / "cache").mkdir()
    with h5py.File(root / "cache" / "cache.h5", "w") as f:
        f["items/hidden"] = item_vec + 0.1 * rng.normal(size=item_vec.shape).astype(np.float32)
        with torch.no_grad():
            f["items/cf"] = model.item_embeddings().numpy()
        f["progress/items"] = np.ones(1, dtype=bool)
        for v in ("train", "valid", "test", "train-shuffled", "test-shuffled"):
            vp = build_view(ds, v, history_window=10, seed=0)
            h = np.zeros((U + 1, D_LLM), np.float32)
            for u in range(1, U + 1):
                h[u] = item_vec[vp.cf_inputs[u][-10:]].sum(0)  # order-blind
            with torch.no_grad():
                cf = model.user_representation(pad_left(vp.cf_inputs, 16)).numpy()
            cf[0] = 0
            f[f"users/{v}/hidden"] = h
            f[f"users/{v}/cf"] = cf
            f[f"users/{v}/target"] = vp.targets
            if vp.permutation is not None:
                f[f"users/{v}/permutation"] = vp.permutation
            f[f"progress/users/{v}"] = np.ones(1, dtype=bool)
        for k, shape in (("params/f_I/weight", (D_LLM, 8)), ("params/f_I/bias", (D_LLM,)),
                         ("params/tokens/user_out", (D_LLM,)), ("params/tokens/item_out", (D_LLM,))):
            f[k] = np.zeros(shape, np.float32)
        f.attrs["provenance"] = json.dumps({"dataset_sha256": ds.digest, "max_users": None, "seed": 0,
                                            "history_window": 10, "model": "order-blind", "f_I": "none",
                                            "template_version": "test"})
    train_heads(ds, root / "cache" / "cache.h5", root / "heads", hidden=32, d_out=8, cf_hidden=8, lr=1e-2,
                epochs=3, train_negatives=3, evals_per_epoch=2, progress=False)
    return root


def test_report_on_an_order_blind_llm(run_dir, tmp_path):
    out = tmp_path / "report"
    logs = []
    docs = analyze_run(run_dir, out, seeds="0,1", progress=False, log=logs.append)
    assert list(docs) == list(ANALYSES)
    for name in ANALYSES:
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file()
    for fig in ("fig_shuffled_inference.png", "fig_transition.png", "fig_warm_cold.png"):
        assert (out / fig).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert report.count("\n## ") == 1 + len(ANALYSES)  # summary + nine sections
    assert "seed 0,1" not in report
    assert "seeds 0,1 (mean ± std)" in report and "30 users" in report

    # an order-blind LLM: shuffled inference changes nothing for any head variant
    si = docs["shuffled-inference"]["rows"]
    for m in ("LLM-SRec", "w/o L_Uniform", "w/o L_Distill, L_Uniform", "LLM-SRec (contrastive)"):
        assert si[m]["change"]["NDCG@10"]["per_seed"] == [0.0, 0.0]
        assert si[m]["original"]["HR@10"]["per_seed"] == si[m]["shuffled"]["HR@10"]["per_seed"]
    sim = docs["similarity"]["rows"]
    assert sim["LLM-SRec (raw h_u, frozen LLM)"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert sim["LLM-SRec (f_user(h_u))"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert sim["SASRec (O_u)"]["mean"] < 0.999  # SASRec reads order
    for m in si:
        for k, cell in si[m]["original"].items():
            assert 0.0 <= cell["mean"] <= 1.0 and len(cell["per_seed"]) == 2

    tr = docs["transition"]
    assert tr["t_score"]["users_top"] + tr["t_score"]["users_rest"] == 30
    cs = docs["case-studies"]
    assert sum(cs["counts"].values()) == 30
    assert all(len(c["history"]) == 5 for c in cs["cases"])
    os_ = docs["over-smoothing"]["rows"]
    assert os_["LLM-SRec"]["distance"]["mean"] > 0

    # the SASRec of the run is reused for its seed, the others are trained once and reused
    trained = [m for m in logs if "training" in m]
    assert any("sasrec-seed1" in m for m in trained) and not any("sasrec-seed0" in m for m in trained)
    logs.clear()
    again = analyze_run(run_dir, out, only="shuffled-inference,similarity", seeds="0,1", progress=False,
                        log=logs.append)
    assert not [m for m in logs if "training" in m]
    assert again["similarity"]["rows"] == docs["similarity"]["rows"]
    assert again["shuffled-inference"]["rows"] == docs["shuffled-inference"]["rows"]
    # a partial rerun keeps the other sections in report.md
    assert (out / "report.md").read_text().count("\n## ") == 1 + len(ANALYSES)


def test_sasrec_outputs_match_the_cached_teacher(run_dir, tmp_path):
    from llmsrec.cache import open_cache
    from llmsrec.experiments.analyze import RunAnalysis

    ra = RunAnalysis(run_dir, tmp_path, [0], progress=False, log=lambda m: None)
    o = ra.sasrec(0)
    with open_cache(run_dir / "cache" / "cache.h5") as c:
        for v in ("test", "test-shuffled"):
            np.testing.assert_allclose(o.reps[v], c.user_cf(v)[1:], atol=1e-5)


def test_cli_errors(run_dir, tmp_path):
    r = CliRunner().invoke(main, ["analyze", "--run", str(run_dir), "--only", "bogus", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown analysis 'bogus'" in r.output
    r = CliRunner().invoke(main, ["analyze", "--run", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "missing; --run must be a folder written by `llmsrec run`" in r.output


def test_shuffled_training_of_prefix_heads_is_compared_with_one_sample_heads(run_dir, tmp_path):
    """Heads trained on K prefix samples per user: the cached train-shuffled view has one sample
    per user, so the shuffled-training change is taken against heads trained on the train view
    (one original sample per user), which must equal a direct train_heads(prefixes=1)."""
    import shutil

    from llmsrec.data import load_prepared
    from llmsrec.heads.model import load_heads
    from llmsrec.heads.train import load_cached_tensors, score_candidates
    from llmsrec.metrics import ranking_metrics

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("heads", "report"))
    ds = load_prepared(run / "data")
    K = 2
    cache = run / "cache" / "cache.h5"
    with h5py.File(cache, "a") as f:  # sample j of user u: the train view's state, moved by j
        h, cf, tg = f["users/train/hidden"][()], f["users/train/cf"][()], f["users/train/target"][()]
        U = len(tg) - 1
        rows = 1 + U * K
        ph, pcf = np.zeros((rows, D_LLM), np.float32), np.zeros((rows, cf.shape[1]), np.float32)
        ptg, uid = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
        for u in range(1, U + 1):
            for j in range(K):
                r = 1 + (u - 1) * K + j
                ph[r], pcf[r], ptg[r], uid[r] = h[u] + j, cf[u], ds.seqs[u][-3 - j], u
        for name, a in (("hidden", ph), ("cf", pcf), ("target", ptg), ("uid", uid)):
            f[f"users/train-prefix/{name}"] = a
        f["progress/users/train-prefix"] = np.ones(1, dtype=bool)
        prov = json.loads(f.attrs["provenance"])
        f.attrs["provenance"] = json.dumps({**prov, "prefixes": K})
    opts = dict(hidden=32, d_out=8, cf_hidden=8, lr=1e-2, epochs=3, train_negatives=3, evals_per_epoch=2,
                progress=False)
    train_heads(ds, cache, run / "heads", prefixes=K, **opts)
    docs = analyze_run(run, run / "report", only="shuffled-training", seeds="1", progress=False,
                       log=lambda m: None)
    llm = docs["shuffled-training"]["rows"]["LLM-SRec"]
    assert set(llm) == {"original, K prefix samples", "original", "shuffled", "change"}
    # the reference is exactly heads trained on one original sample per user
    train_heads(ds, cache, tmp_path / "one", prefixes=1, seed=1, **opts)
    data = load_cached_tensors(ds, cache, eval_views=("test",))
    with torch.no_grad():
        sc = score_candidates(load_heads(tmp_path / "one"), data.eval_hidden["test"], data.item_hidden,
                              data.candidates["test"])
    want = {k: float(v) for k, v in ranking_metrics(sc).items()}
    assert llm["original"]["NDCG@10"]["mean"] == pytest.approx(want["NDCG@10"], abs=1e-9)
    assert llm["original, K prefix samples"]["NDCG@10"]["mean"] != pytest.approx(want["NDCG@10"], abs=1e-9)
    ratio = llm["shuffled"]["NDCG@10"]["mean"] / want["NDCG@10"] - 1
    assert llm["change"]["NDCG@10"]["mean"] == pytest.approx(ratio, abs=1e-9)
    md = (run / "report" / "shuffled-training.md").read_text()
    assert "original, 2 prefix samples per user (the run's)" in md and "shuffled, 1 sample per user" in md
