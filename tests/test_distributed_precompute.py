"""Sharded precompute under torchrun (2 CPU processes, gloo) equals the one-process cache.

Tiny random-weight LLaMA saved to a folder (the processes load it with --llm FOLDER) and the
tiny dataset of test_precompute; two launches: `python -m torch.distributed.run` with
--assemble virtual, then `llmsrec precompute --nproc 2` resuming damaged shards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_precompute import _contents
from tiny import tiny_dataset, tiny_llama_folder, tiny_sasrec

from llmsrec.cache import open_cache
from llmsrec.cli import main
from llmsrec.errors import InputError
from llmsrec.precompute import precompute
from llmsrec.precompute.prompts import build_view
from llmsrec.precompute.shards import shard_dir, shard_path, split_rows

W = 4
VIEWS = "train,test,test-shuffled"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(dataset, SASRec folder, LLM folder, the one-process reference cache)."""
    from llmsrec.cfsrec import save_sasrec

    root = tmp_path_factory.mktemp("dist")
    ds = tiny_dataset(root / "ds")
    save_sasrec(tiny_sasrec(ds.n_items), root / "sasrec")
    tiny_llama_folder(root / "llm")
    ref = precompute(ds.root, root / "sasrec", root / "ref.h5", llm=str(root / "llm"),
                     views=VIEWS.split(","), history_window=W, chunk_prompts=2, batch_tokens=400,
                     progress=False, log=lambda m: None)
    return ds, root / "sasrec", root / "llm", ref


def _args(ds, sasrec, llm, out):
    return ["precompute", "--data", str(ds.root), "--sasrec", str(sasrec), "--llm", str(llm),
            "--out", str(out), "--views", VIEWS, "--history-window", str(W), "--chunk-prompts", "2",
            "--batch-tokens", "400", "--readout-layers", "none", "--prefixes", "1"]  # sharded: paper readout only


def _assert_same_cache(ref, out):
    a, b = _contents(ref), _contents(out)
    # row checksums follow the float bits of the states (other batch shapes round otherwise);
    # a virtual cache has them in its shards
    a, b = ({k: v for k, v in c.items() if not k.startswith("checksums/")} for c in (a, b))
    assert a.keys() == b.keys()
    assert json.loads(a.pop("@provenance")) == json.loads(b.pop("@provenance"))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if k.endswith("hidden"):
            np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=0, err_msg=k)
        else:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def _prompt_rows(ds, group):
    if group == "items":
        return np.arange(1, ds.n_items + 1)
    vp = build_view(ds, group.removeprefix("users/"), history_window=W)
    return np.asarray([u for u in range(1, ds.n_users + 1) if vp.prompts[u] is not None])


@pytest.fixture(scope="module")
def virtual_run(inputs, tmp_path_factory):
    """`python -m torch.distributed.run --nproc-per-node 2 -m llmsrec precompute --assemble virtual`."""
    ds, sasrec, llm, _ = inputs
    out = tmp_path_factory.mktemp("virtual") / "new" / "c.h5"  # the folder is made
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "-m", "llmsrec",
                        *_args(ds, sasrec, llm, out), "--assemble", "virtual"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stderr


def test_split_rows_contiguous_token_balanced():
    np.testing.assert_array_equal(split_rows([10, 10, 10, 10], 2), [0, 2, 4])
    np.testing.assert_array_equal(split_rows([1, 1, 1, 100], 2), [0, 3, 4])
    np.testing.assert_array_equal(split_rows([5, 5], 3), [0, 1, 1, 2])  # a rank may get none
    np.testing.assert_array_equal(split_rows([], 2), [0, 0, 0])
    lengths = np.random.default_rng(0).integers(20, 300, size=1000)
    b = split_rows(lengths, 8)
    assert b[0] == 0 and b[-1] == 1000 and (np.diff(b) >= 0).all()
    per = [lengths[b[r] : b[r + 1]].sum() for r in range(8)]
    assert max(per) - min(per) <= 2 * lengths.max()


def test_two_processes_equal_one_virtual(inputs, virtual_run):
    ds, _, _, ref = inputs
    out, log = virtual_run
    assert "[rank 1/2]" in log and "precompute on 2 processes" in log
    _assert_same_cache(ref, out)
    with h5py.File(out, "r") as f:
        assert f["items/hidden"].is_virtual and f["users/test/hidden"].is_virtual
        assert not f["users/test/cf"].is_virtual
    # every prompt row in exactly one shard, each shard a contiguous slab of rows
    for g in ("items", "users/train", "users/test", "users/test-shuffled"):
        parts = []
        for r in range(2):
            with h5py.File(shard_path(out, r, 2), "r") as f:
                rows = f[f"{g}/rows"][()]
                assert f[f"{g}/hidden"].shape[0] == rows[-1] - rows[0] + 1
                parts.append(rows)
        assert len(parts[0]) and len(parts[1]) and parts[0][-1] < parts[1][0]
        np.testing.assert_array_equal(np.concatenate(parts), _prompt_rows(ds, g))
    with open_cache(ref) as a, open_cache(out) as b:
        assert b.views == a.views
        np.testing.assert_allclose(b.user_hidden("test-shuffled"), a.user_hidden("test-shuffled"),
                                   atol=1e-5)
    # the virtual datasets need their shards: refused, not zeros, when they are gone
    moved = out.with_name("elsewhere")
    shard_dir(out).rename(moved)
    try:
        with pytest.raises(InputError, match="missing"):
            open_cache(out)
    finally:
        moved.rename(shard_dir(out))


def test_resume_damaged_shard_with_nproc(inputs, virtual_run, tmp_path, capfd):
    """A killed run: rank 1's shard unfinished, all its item chunks (rows NaN) and one
    users/test chunk not done; `llmsrec precompute --nproc 2` redoes exactly those chunks
    (rank 0's complete shard is skipped) and assembles by copy."""
    ds, sasrec, llm, ref = inputs
    out = tmp_path / "c.h5"
    shutil.copytree(shard_dir(virtual_run[0]), shard_dir(out))
    s1 = shard_path(out, 1, 2)
    tmp = s1.with_name(s1.name + ".tmp")
    s1.rename(tmp)
    with h5py.File(tmp, "r+") as f:
        f["progress/items"][...] = False
        f["items/hidden"][...] = np.nan
        f["progress/users/test"][0] = False
        n_todo = len(f["progress/items"]) + 1
        n_all = sum(len(f[f"progress/{g}"]) for g in ("items", "users/train", "users/test",
                                                       "users/test-shuffled"))
        assert len(f["progress/users/test"]) > 1 and n_all > n_todo
    for stale in ("rank0-of-3.h5.tmp", "rank2-of-3.h5"):  # an earlier killed --nproc 3 run
        (shard_dir(out) / stale).write_bytes(b"")
    capfd.readouterr()
    r = CliRunner().invoke(main, [*_args(ds, sasrec, llm, out), "--nproc", "2"])
    log = capfd.readouterr().err
    assert r.exit_code == 0, r.output + log
    assert f"[rank 1/2] rank1-of-2.h5: {n_todo} of {n_all} chunks to do" in log
    assert "[rank 0/2] rank0-of-2.h5: complete, nothing to compute" in log
    _assert_same_cache(ref, out)
    with h5py.File(out, "r") as f:
        assert not f["items/hidden"].is_virtual
    assert not shard_dir(out).exists()  # copy assembly deletes the shards, and other N's
    assert (f"[rank 0/2] removed 4 shard file(s) {out} does not use from {shard_dir(out)} (and the "
            f"folder): rank0-of-2.h5, rank0-of-3.h5.tmp, rank1-of-2.h5, rank2-of-3.h5") in log


def test_nproc_errors(inputs, tmp_path):
    ds, sasrec, llm, _ = inputs
    base = _args(ds, sasrec, llm, tmp_path / "x.h5")
    for extra, msg in ((["--nproc", "0"], "--nproc 0"),
                       (["--nproc", "2", "--device", "cuda:0"], "pins one device"),
                       (["--nproc", "3", "--device", "cuda"], "device(s) here"),
                       (["--assemble", "virtual"], "--assemble virtual: only for several processes"),
                       (["--nproc", "1", "--assemble", "virtual"], "--assemble virtual: only for")):
        if extra[-1] == "cuda" and torch.cuda.device_count() >= 3:
            continue
        r = CliRunner().invoke(main, [*base, *extra])
        assert r.exit_code == 2 and msg in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists()


def test_one_process_commands_refused_under_torchrun(inputs, tmp_path, monkeypatch):
    """e.g. `torchrun --nproc-per-node 2 -m llmsrec sasrec train`: refused once, before any work."""
    ds, sasrec, llm, _ = inputs
    cmd = ["sasrec", "train", "--data", str(ds.root), "--out", str(tmp_path / "s")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r = CliRunner().invoke(main, cmd)
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: llmsrec sasrec runs as one process, not under torchrun (WORLD_SIZE=2); only "
        "precompute and train (cache mode) are distributed"]
    monkeypatch.setenv("RANK", "1")
    r = CliRunner().invoke(main, ["evaluate", "--data", str(ds.root)])
    assert r.exit_code == 2 and r.output == ""  # the other ranks exit silently
    assert not (tmp_path / "s").exists()
    # train passes the guard, but its one-process modes are refused the same way (once)
    for extra, msg in ((["--mode", "e2e"], "--mode e2e: runs as one process"),
                       (["--model", "tallrec"], "--model tallrec: runs as one process")):
        train = ["train", "--data", str(ds.root), "--sasrec", str(sasrec), "--out", str(tmp_path / "t"), *extra]
        monkeypatch.setenv("RANK", "0")
        r = CliRunner().invoke(main, train)
        assert r.exit_code == 2 and r.output.strip().splitlines() == [f"error: {msg} (distributed training "
                                                                      "is for --mode cache)"], r.output
        monkeypatch.setenv("RANK", "1")
        r = CliRunner().invoke(main, train)
        assert r.exit_code == 2 and r.output == ""
    assert not (tmp_path / "t").exists()
    # precompute passes the guard (and refuses --nproc itself under torchrun)
    r = CliRunner().invoke(main, [*_args(ds, sasrec, llm, tmp_path / "x.h5"), "--nproc", "2"])
    assert r.exit_code == 2 and "already running under torchrun" in r.output
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1: every command runs
    monkeypatch.setenv("RANK", "0")
    r = CliRunner().invoke(main, ["prompts", "--data", str(ds.root), "--item", "1"])
    assert r.exit_code == 0, r.output


_SLEEPER = """
import os, time
from pathlib import Path
import llmsrec.cli as cli
cli._DISTRIBUTED_COMMANDS += ("sleep",)
@cli.main.command()
def sleep():
    Path(os.environ["READY_DIR"], "rank" + os.environ["RANK"]).write_text("x")
    time.sleep(300)
cli.main(["sleep"])
"""
_DRIVER = """
import sys
import llmsrec.distributed as d
launch = d.launch
d.launch = lambda n, args: launch(n, args, module="sleeper")  # children: sleeper.py, not precompute
from llmsrec.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_nproc_run_exits_with_one_line(tmp_path, sig):
    """`llmsrec precompute --nproc 2` interrupted (Ctrl-C reaches the whole process group, a
    SIGTERM only the launcher): every process stops, one line, exit 128 + signal; no
    torchrun SignalException traceback. The children are llmsrec commands that sleep."""
    (tmp_path / "sleeper.py").write_text(_SLEEPER)
    (tmp_path / "driver.py").write_text(_DRIVER)
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "READY_DIR": str(ready),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    p = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), "precompute", "--data", "d",
                          "--sasrec", "s", "--out", str(tmp_path / "c.h5"), "--nproc", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # a safety net only
        while not all((ready / f"rank{r}").exists() for r in range(2)):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.1)
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 128 + sig, err
    assert err.strip().splitlines() == [
        f"Aborted! ({sig.name}: all 2 processes stopped; rerun the same command to resume)"]
