"""Fault cases of issue 17: reproducible files, crafted inputs, concurrent writers, full
disks, corruption, interrupts. Each test failed on the code before its fix."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from llmsrec.errors import InputError

N_ITEMS = 30


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory):
    """60 users walking items i, i+1, ... (mod 30), timestamps in seconds."""
    from llmsrec.data import prepare_from_interactions

    rng = np.random.default_rng(0)
    inter = []
    for u in range(60):
        length, start = int(rng.integers(6, 10)), int(rng.integers(0, N_ITEMS))
        for t in range(length):
            inter.append((f"u{u}", f"i{(start + t) % N_ITEMS}", 1_000_000_000 + 3600 * t))
    out = tmp_path_factory.mktemp("data") / "walk"
    return prepare_from_interactions(inter, {f"i{i}": f"Item {i}" for i in range(N_ITEMS)}, out,
                                     kcore=1, num_negatives=10)


# --- 6. a teacher's file digest is reproducible ------------------------------------------------


def test_same_weights_same_checkpoint_bytes(tmp_path, one_torch_thread):
    from llmsrec.cfsrec import SASRec, SASRecConfig, save_cfsrec

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=N_ITEMS, hidden=8, maxlen=5))
    digests = set()
    for k in range(20):  # the metadata order of safetensors' own writer changes between calls
        save_cfsrec(model, tmp_path / f"m{k}")
        digests.add(_sha(tmp_path / f"m{k}" / "model.safetensors"))
    assert len(digests) == 1
    # still a plain safetensors file with the metadata and the weights
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m0" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "model": "sasrec"}
        assert torch.equal(f.get_tensor("item_emb.weight"), model.state_dict()["item_emb.weight"])


def test_two_identical_trainings_give_one_teacher_digest(tiny_ds, tmp_path, one_torch_thread):
    from llmsrec.cfsrec import train_sasrec

    for name in ("a", "b"):
        train_sasrec(tiny_ds, tmp_path / name, epochs=2, eval_every=1, hidden=8, maxlen=6, seed=3, progress=False)
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")


def test_params_and_baseline_arrays_are_reproducible(tmp_path):
    from llmsrec.precompute.params import write_params

    arrays = {"f_I/weight": np.ones((4, 3)), "f_I/bias": np.zeros(4), "tokens/user_out": np.arange(4.0),
              "tokens/item_out": np.arange(4.0)}
    digests = {_sha(write_params(tmp_path / f"p{k}.safetensors", arrays, extra={"source": "test", "step": "7"}))
               for k in range(20)}
    assert len(digests) == 1
