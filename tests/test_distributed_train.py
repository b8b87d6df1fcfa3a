"""`torchrun --nproc-per-node 2 -m llmsrec train` (gloo, CPU) equals one process with the same global batch.

Both processes are started by torch's own launcher (``elastic_launch``, what ``torchrun``
runs) with the real CLI as the entry point; the one-process reference is ``train_heads``
with the same options.
"""

import json
import os
import sys
import uuid

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmsrec.data import prepare_from_interactions
from llmsrec.heads.model import load_heads
from llmsrec.heads.train import train_heads

D_LLM, D_CF = 12, 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """A 40-user dataset and a cache in the docs/cache-schema.md layout (h_u = h_target + noise)."""
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(5)
    rows = []
    for u in range(40):
        items = rng.choice(50, size=9, replace=False)
        rows += [(f"u{u}", f"i{i}", 1000 * u + t) for t, i in enumerate(items)]
    ds = prepare_from_interactions(rows, {f"i{i}": f"Item {i}" for i in range(50)}, root / "data",
                                   kcore=3, num_negatives=15, seed=0)
    U, N = ds.n_users, ds.n_items
    item_h = rng.normal(size=(N + 1, D_LLM)).astype(np.float32)
    item_h[0] = 0
    cache = root / "cache.h5"
    with h5py.File(cache, "w") as f:
        f["items/hidden"] = item_h
        f["items/cf"] = rng.normal(size=(N + 1, D_CF)).astype(np.float32)
        f["progress/items"] = np.ones(1, dtype=bool)
        for v in ("train", "valid", "test"):
            _, targets = ds.view(v)
            h = item_h[targets] + 0.3 * rng.normal(size=(U + 1, D_LLM)).astype(np.float32)
            h[0] = 0
            f[f"users/{v}/hidden"] = h.astype(np.float32)
            f[f"users/{v}/cf"] = (h @ rng.normal(size=(D_LLM, D_CF))).astype(np.float32)
            f[f"users/{v}/target"] = targets.astype(np.int64)
            f[f"progress/users/{v}"] = np.ones(1, dtype=bool)
        f.attrs["provenance"] = json.dumps({"dataset_sha256": ds.digest, "max_users": None})
    return ds, cache


def torchrun(nproc: int, argv: list[str]) -> None:
    """``torchrun --standalone --nproc-per-node NPROC -m llmsrec ARGV`` through torch's launcher API."""
    torchrun_argv(nproc, ["-m", "llmsrec", *argv])


def torchrun_argv(nproc: int, argv: list[str]) -> None:
    """``torchrun --standalone --nproc-per-node NPROC`` running ``python ARGV`` in each process."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    elastic_launch(config, sys.executable)(*argv)


def to_cli(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        if (k, v) == ("distill", "none"):
            out.append("--no-distill")
            continue
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


CASES = {
    # full-catalogue softmax, MSE distillation, uniformity across ranks; 40 users in batches
    # of 7: the ranks get 3/4 rows (last batch 2/3)
    "full-mse": dict(batch_size=7, train_negatives="all", distill="mse"),
    # sampled negatives (same seeded draws on both ranks), no L_Distill (f_CF-user gets no
    # gradient; DDP is told so); batches of 3 leave a last batch of 1 user: rank 0 has none.
    # The contrastive L_Distill is checked by test_sharded_loss_gradients_add_up.
    "sampled-no-distill": dict(batch_size=3, train_negatives=3, distill="none"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_processes_equal_one_process(run_inputs, tmp_path, monkeypatch, case):
    ds, cache = run_inputs
    opts = dict(hidden=32, d_out=16, cf_hidden=8, lr=3e-3, epochs=2, evals_per_epoch=3, seed=2, **CASES[case])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    one = train_heads(ds, cache, tmp_path / "one", progress=False, **opts)
    torchrun(2, ["train", "--data", str(ds.root), "--cache", str(cache), "--out", str(tmp_path / "two"),
                 "--no-progress", *to_cli(opts), "--prefixes", "1", "--user-readout", "out",
                 "--item-readout", "out"])  # train_heads' (TrainConfig's) defaults: the paper's heads

    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert "distributed" not in one
    # the same training: validation curve, selected step, metrics, weights
    assert two["steps"] == one["steps"] and two["best"]["step"] == one["best"]["step"]
    for split in ("valid", "test"):
        for k, v in one[split].items():
            assert two[split][k] == pytest.approx(v, abs=1e-5), (split, k)
    h1 = [json.loads(x) for x in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    assert len(h1) == len(h2) == 6
    for a, b in zip(h1, h2):
        for k in ("loss", "retrieval", "distill", "uniform", "NDCG@10", "HR@10"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), k
    assert h1[0]["uniform"] > 0 and (h1[0]["distill"] > 0) == (opts["distill"] != "none")
    w1, w2 = load_file(tmp_path / "one" / "heads.safetensors"), load_file(tmp_path / "two" / "heads.safetensors")
    assert w1.keys() == w2.keys()
    # f_item's output bias b adds the same u.b to every score of a user, which neither
    # softmax (Eq. 1) nor any ranking sees: its gradient is zero up to rounding noise, and
    # Adam's normalisation turns that noise into steps. It is compared through the scores.
    gauge = "f_item.3.bias"
    for k in w1.keys() - {gauge}:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)
    with h5py.File(cache) as f:
        users, items = torch.from_numpy(f["users/valid/hidden"][1:]), torch.from_numpy(f["items/hidden"][1:])
    s1, s2 = (load_heads(tmp_path / n).score(users, items.expand(len(users), -1, -1)).detach() for n in ("one", "two"))
    torch.testing.assert_close(s2 - s2.mean(1, keepdim=True), s1 - s1.mean(1, keepdim=True), atol=1e-5, rtol=0)
    # written once, by rank 0, through a temporary folder that was renamed
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]
    assert {"heads.safetensors", "heads_config.json", "results.json", "history.jsonl"} <= set(
        os.listdir(tmp_path / "two"))


def test_two_gloo_processes_streamed_read_half_each(run_inputs, tmp_path, monkeypatch):
    """``train --stream`` under torchrun: each rank reads only its rows of every batch and its
    validation users (about half the bytes of one streamed process, the two adding up to it
    exactly), and the training equals one in-memory process."""
    ds, cache = run_inputs
    opts = dict(hidden=32, d_out=16, cf_hidden=8, lr=3e-3, epochs=2, evals_per_epoch=3, seed=2, batch_size=8,
                train_negatives="all", distill="mse")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    one = train_heads(ds, cache, tmp_path / "one", progress=False, stream=False, **opts)
    one_s = train_heads(ds, cache, tmp_path / "one-s", progress=False, stream=True, shuffle_buffer=0, **opts)
    torchrun(2, ["train", "--data", str(ds.root), "--cache", str(cache), "--out", str(tmp_path / "two"),
                 "--no-progress", *to_cli(opts), "--prefixes", "1", "--user-readout", "out", "--item-readout", "out",
                 "--stream", "--shuffle-buffer", "0"])
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["distributed"]["world_size"] == 2
    assert two["steps"] == one["steps"] == one_s["steps"] and two["best"]["step"] == one["best"]["step"]
    for split in ("valid", "test"):
        assert one_s[split] == one[split]
        for k, v in one[split].items():
            assert two[split][k] == pytest.approx(v, abs=1e-5), (split, k)
    (b1,), b2 = one_s["stream"]["fit_bytes_read_per_rank"], two["stream"]["fit_bytes_read_per_rank"]
    # every row of every batch and validation is read once, by exactly one rank
    assert len(b2) == 2 and sum(b2) == b1
    assert all(0.4 < b / b1 < 0.6 for b in b2), (b1, b2)


def test_dist_env_and_backends(monkeypatch):
    from llmsrec.distributed import backend_for, dist_env, local_device, shard
    from llmsrec.errors import InputError

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert dist_env() is None
    assert local_device("cuda") == "cuda"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == (3, 4, 1)
    assert local_device("cuda") == "cuda:1" and local_device("cuda:0") == "cuda:0" and local_device("hpu") == "hpu"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="RANK=4"):
        dist_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InputError, match="RANK"):
        dist_env()
    assert [backend_for(d) for d in ("cpu", "cuda", "cuda:3", "hpu")] == ["gloo", "nccl", "nccl", "hccl"]
    with pytest.raises(InputError, match="--device tpu"):
        backend_for("tpu")
    assert [shard(7, r, 2) for r in range(2)] == [(0, 3), (3, 7)]
    assert [shard(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("distill,uniform", [("mse", True), ("contrastive", True), ("contrastive", False),
                                             ("none", True)])
def test_sharded_loss_gradients_add_up(monkeypatch, full, distill, uniform):
    """Summed over simulated ranks, the shares' gradients are those of Eq. 4 on the whole batch."""
    import torch.distributed

    from llmsrec import distributed as dd
    from llmsrec.heads.losses import LossConfig, exclusion_mask, full_retrieval_loss, retrieval_loss, total_loss
    from llmsrec.heads.train import sharded_loss

    torch.manual_seed(0)
    n, d, n_items, k, world = 5, 6, 9, 3, 3  # shards of 1, 2, 2 rows
    cfg = LossConfig(distill=distill, uniform=uniform, distill_weight=0.7, uniform_weight=1.3,
                     contrastive_temperature=0.5)
    U, C = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    items = torch.randn(n_items + 1, d, requires_grad=True) if full else torch.randn(n, 1 + k, d, requires_grad=True)
    tg = np.array([1, 4, 4, 7, 9])
    mask = exclusion_mask([np.array([2, 3]), np.array([]), np.array([5, 4]), np.array([1]), np.array([8, 2])],
                          tg, n_items)
    cf = C if distill != "none" else None

    def global_loss():
        r = full_retrieval_loss(U, items, torch.from_numpy(tg), mask) if full else \
            retrieval_loss(U, items[:, 0], items[:, 1:])
        return total_loss(r, U, cf, cfg)

    loss, terms = global_loss()
    want = torch.autograd.grad(loss, [U, C, items], allow_unused=True)

    z_all = U.detach() if cf is None else torch.cat([U, C], 1).detach()
    monkeypatch.setattr(dd, "comm_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(dd, "all_gather_rows", lambda x, rows: z_all)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: None)  # one rank's sums only
    got = [torch.zeros_like(t) for t in (U, C, items)]
    for r in range(world):
        lo, hi = dd.shard(n, r, world)
        share, _ = sharded_loss(U[lo:hi], items if full else items[lo:hi], None if cf is None else C[lo:hi],
                                torch.from_numpy(tg[lo:hi]), mask[lo:hi] if full else None, n, lo, hi, cfg)
        for acc, g in zip(got, torch.autograd.grad(share, [U, C, items], allow_unused=True)):
            if g is not None:
                acc += g
    for w, g in zip(want, got):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, atol=1e-6, rtol=1e-5)
    # one rank holding the whole batch reports the one-process terms
    _, t1 = sharded_loss(U, items, cf, torch.from_numpy(tg), mask if full else None, n, 0, n, cfg)
    assert t1 == pytest.approx(terms, abs=1e-6)
