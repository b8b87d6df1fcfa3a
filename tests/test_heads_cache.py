"""`llmsrec train` / `evaluate --model llmsrec` on a synthetic HDF5 cache in the documented layout."""

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from llmsrec.cli import main
from llmsrec.data import prepare_from_interactions
from llmsrec.errors import InputError
from llmsrec.heads.train import evaluate_heads, load_cached_tensors, train_heads

D_LLM, D_CF = 12, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(3)
    rows = []
    for u in range(40):
        items = rng.choice(50, size=9, replace=False)
        rows += [(f"u{u}", f"i{i}", 1000 * u + t) for t, i in enumerate(items)]
    titles = {f"i{i}": f"Item {i}" for i in range(50)}
    return prepare_from_interactions(rows, titles, tmp_path_factory.mktemp("d") / "data", kcore=3,
                                     num_negatives=15, seed=0)


def write_cache(path, ds, *, views=("train", "valid", "test"), provenance=None, noise=0.2):
    """A cache file in the docs/cache-schema.md layout; h_u = h_target + noise (planted signal)."""
    rng = np.random.default_rng(0)
    U, N = ds.n_users, ds.n_items
    item_h = rng.normal(size=(N + 1, D_LLM)).astype(np.float32)
    item_h[0] = 0
    with h5py.File(path, "w") as f:
        f["items/hidden"] = item_h
        f["items/cf"] = rng.normal(size=(N + 1, D_CF)).astype(np.float32)
        f["progress/items"] = np.ones(1, dtype=bool)
        for v in views:
            base = v.split("-")[0]
            _, targets = ds.view(base)
            h = item_h[targets] + noise * rng.normal(size=(U + 1, D_LLM)).astype(np.float32)
            h[0] = 0
            f[f"users/{v}/hidden"] = h.astype(np.float32)
            f[f"users/{v}/cf"] = rng.normal(size=(U + 1, D_CF)).astype(np.float32)
            f[f"users/{v}/target"] = targets.astype(np.int64)
            f[f"progress/users/{v}"] = np.ones(2, dtype=bool)
        f["params/f_I/weight"] = np.zeros((D_LLM, D_CF), np.float32)
        f["params/f_I/bias"] = np.zeros(D_LLM, np.float32)
        f["params/tokens/user_out"] = np.zeros(D_LLM, np.float32)
        f["params/tokens/item_out"] = np.zeros(D_LLM, np.float32)
        f.attrs["provenance"] = json.dumps(provenance or {"dataset_sha256": ds.digest, "max_users": None})
    return path


# the cache written here holds the paper's last-layer states only: the paper's heads
OPTS = ["--hidden", "32", "--d-out", "16", "--cf-hidden", "8", "--lr", "1e-2", "--epochs", "8",
        "--train-negatives", "3", "--prefixes", "1", "--user-readout", "out", "--item-readout", "out"]


def test_train_and_evaluate_cli_on_cache(ds, tmp_path):
    cache = write_cache(tmp_path / "cache.h5", ds, views=("train", "valid", "test", "test-shuffled"))
    out = tmp_path / "heads"
    r = CliRunner().invoke(main, ["train", "--data", str(ds.root), "--cache", str(cache), "--out", str(out),
                                  "--no-progress", *OPTS])
    assert r.exit_code == 0, r.output
    assert "LLM-SRec" in r.output and "NDCG@10" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["valid"]["HR@10"] > 0.9 and res["test"]["HR@10"] > 0.9  # planted signal found
    assert "test-shuffled" in res
    cfg = json.loads((out / "heads_config.json").read_text())
    assert cfg["heads"] == {"d_llm": D_LLM, "d_cf": D_CF, "d_out": 16, "hidden": 32, "cf_hidden": 8,
                            "leaky_slope": 0.01, "user_readout": "out", "item_readout": "out", "n_layers": 0,
                            "n_slots": 0}
    assert cfg["train"]["lr"] == 1e-2 and cfg["train"]["train_negatives"] == 3
    # evaluate reproduces the stored metrics exactly
    ev = evaluate_heads(ds, cache, out)
    assert ev["valid"] == res["valid"] and ev["test"] == res["test"]
    r = CliRunner().invoke(main, ["evaluate", "--model", "llmsrec", "--data", str(ds.root), "--cache", str(cache),
                                  "--checkpoint", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "evaluation.json").read_text())["test"] == res["test"]
    # evaluation reads no training view: the same states without one score the same
    eval_only = tmp_path / "eval-only.h5"
    shutil.copyfile(cache, eval_only)
    with h5py.File(eval_only, "a") as f:
        del f["users/train"], f["progress/users/train"]
    ev2 = evaluate_heads(ds, eval_only, out, views=("valid", "test", "test-shuffled"))
    assert ev2 == {"valid": res["valid"], "test": res["test"], "test-shuffled": res["test-shuffled"]}
    with pytest.raises(InputError, match="train missing"):
        load_cached_tensors(ds, eval_only)
    # without --cache the evaluator uses the cache recorded in the checkpoint
    r = CliRunner().invoke(main, ["evaluate", "--model", "llmsrec", "--data", str(ds.root),
                                  "--checkpoint", str(out)])
    assert r.exit_code == 0, r.output


def test_same_seed_same_outputs_via_cache(ds, tmp_path):
    cache = write_cache(tmp_path / "cache.h5", ds)
    a = train_heads(ds, cache, tmp_path / "a", progress=False, hidden=16, d_out=8, epochs=1, seed=3)
    b = train_heads(ds, cache, tmp_path / "b", progress=False, hidden=16, d_out=8, epochs=1, seed=3)
    assert (tmp_path / "a/heads.safetensors").read_bytes() == (tmp_path / "b/heads.safetensors").read_bytes()
    assert a["test"] == b["test"]


def test_cache_errors(ds, tmp_path):
    cache = write_cache(tmp_path / "c1.h5", ds, views=("train", "valid"))
    with pytest.raises(InputError, match="test missing"):
        load_cached_tensors(ds, cache)
    cache = write_cache(tmp_path / "c2.h5", ds, provenance={"dataset_sha256": "0" * 64})
    with pytest.raises(InputError, match="dataset_sha256"):
        load_cached_tensors(ds, cache)
    r = CliRunner().invoke(main, ["train", "--data", str(ds.root), "--cache", str(tmp_path / "none.h5"),
                                  "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and "error:" in r.output
    r = CliRunner().invoke(main, ["train", "--data", str(ds.root), "--cache", str(cache),
                                  "--out", str(tmp_path / "h"), "--train-negatives", "lots"])
    assert r.exit_code == 2 and "--train-negatives" in r.output


def test_cache_with_max_users_restricts_users(ds, tmp_path):
    cache = write_cache(tmp_path / "c.h5", ds, provenance={"dataset_sha256": ds.digest, "max_users": 10})
    data = load_cached_tensors(ds, cache)
    assert data.train_hidden.shape[0] == 11 and data.candidates["test"].shape[0] == 10
    assert data.train_users.max() <= 10 and data.provenance["users"] == 10


def test_diverged_training_is_a_one_line_error(ds, tmp_path):
    cache = write_cache(tmp_path / "cache.h5", ds)
    out = tmp_path / "heads"
    r = CliRunner().invoke(main, ["train", "--data", str(ds.root), "--cache", str(cache), "--out", str(out),
                                  "--no-progress", "--hidden", "32", "--d-out", "16", "--cf-hidden", "8",
                                  "--lr", "1e12", "--epochs", "2", "--train-negatives", "3", "--prefixes", "1",
                                  "--user-readout", "out", "--item-readout", "out"])
    assert r.exit_code == 2, r.output
    assert "diverged" in r.output and "lower --lr" in r.output
    assert "Traceback" not in r.output and not out.exists()


def test_bad_device_and_seed_are_refused_before_work(ds, tmp_path):
    r = CliRunner().invoke(main, ["evaluate", "--data", str(ds.root), "--model", "sasrec",
                                  "--checkpoint", str(tmp_path), "--device", "banana"])
    assert r.exit_code == 2 and "--device banana" in r.output
    r = CliRunner().invoke(main, ["train", "--data", str(ds.root), "--cache", str(tmp_path / "c.h5"),
                                  "--out", str(tmp_path / "h"), "--seed", "-1"])
    assert r.exit_code == 2 and "--seed" in r.output
