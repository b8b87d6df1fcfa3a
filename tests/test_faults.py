"""Fault cases: reproducible files, crafted inputs, concurrent writers, full
disks, corruption, interrupts. Each test failed on the code before its fix."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from test_analyze import run_dir  # noqa: F401  (module fixture: a tiny `llmsrec run` folder)

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


# --- 7. millisecond timestamps ----------------------------------------------------------------


def _atomic_files(tmp_path, scale: int):
    """An atomic .inter/.item pair whose timestamps are 2021 dates times ``scale``."""
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(6):
        for t in range(5):
            lines.append(f"u{u}\ti{(u + t) % 8}\t{(1_610_000_000 + 86_400 * t) * scale}")
    inter, item = tmp_path / "x.inter", tmp_path / "x.item"
    inter.write_text("\n".join(lines) + "\n")
    item.write_text("item_id:token\ttitle:token_seq\n" + "".join(f"i{i}\tItem {i}\n" for i in range(8)))
    return inter, item


def test_prepare_refuses_milliseconds_read_as_seconds_with_the_line(tmp_path):
    from click.testing import CliRunner

    from llmsrec.cli import main

    inter, item = _atomic_files(tmp_path, 1000)
    args = ["prepare", "--dataset", "atomic", "--inter", str(inter), "--item", str(item), "--kcore", "1",
            "--num-negatives", "2", "--out", str(tmp_path / "d")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {inter} line 2: field 'timestamp' 1610000000000 is not a plausible date in seconds "
        f"(year 52988; accepted: 1900 to 2099); it looks like milliseconds: pass --timestamp-unit ms"]
    assert not (tmp_path / "d").exists()
    # --skip-bad-lines does not hide a wrong unit (it would skip every line)
    assert CliRunner().invoke(main, args + ["--skip-bad-lines"]).exit_code == 2
    res = CliRunner().invoke(main, args + ["--timestamp-unit", "ms"])
    assert res.exit_code == 0, res.output
    from llmsrec.data import load_prepared

    ds = load_prepared(tmp_path / "d")
    assert ds.stats["timestamp_unit"] == "ms"
    assert ds.timestamps[1].tolist() == [1_610_000_000 + 86_400 * t for t in range(5)]


def test_far_dates_are_refused_with_their_line(tmp_path):
    from llmsrec.data import prepare_atomic, prepare_from_interactions

    inter, item = _atomic_files(tmp_path, 1)
    # a date no unit makes plausible is a bad line (skippable), named by its line
    with open(inter, "a") as f:
        f.write("u0\ti7\t1e30\n")
    with pytest.raises(InputError, match=rf"{inter} line 32: field 'timestamp' 1e\+30 is not a plausible date"):
        prepare_atomic(inter, item, tmp_path / "d", kcore=1, num_negatives=2)
    ds = prepare_atomic(inter, item, tmp_path / "d", kcore=1, num_negatives=2, skip_bad_lines=True)
    assert ds.stats["bad_lines"]["total"] == 1
    with pytest.raises(InputError, match="interaction 1: field 'timestamp' 1700000000000 is not a plausible"):
        prepare_from_interactions([("a", "b", 1), ("a", "c", 1_700_000_000_000)], {}, tmp_path / "e")


def test_prompts_name_the_user_of_a_timestamp_that_is_no_date(tiny_ds):
    from llmsrec.precompute.prompts import build_view

    kept = tiny_ds.timestamps[2]
    tiny_ds.timestamps[2] = np.full(len(tiny_ds.seqs[2]), 1_610_000_000_000, dtype=np.int64)
    try:
        with pytest.raises(InputError, match=rf"user '{tiny_ds.raw_users[2]}' \(uid 2\): timestamps "
                                             r"\[1610000000000.* no dates .*--timestamp-unit ms"):
            build_view(tiny_ds, "test", history_window=3, verb="x")
    finally:
        tiny_ds.timestamps[2] = kept


# --- 5. crafted checkpoint configs --------------------------------------------------------------


@pytest.fixture()
def sasrec_ckpt(tmp_path):
    from llmsrec.cfsrec import SASRec, SASRecConfig, save_cfsrec

    torch.manual_seed(0)
    save_cfsrec(SASRec(SASRecConfig(n_items=N_ITEMS, hidden=8, maxlen=5)), tmp_path / "sas")
    return tmp_path / "sas"


def _edit_json(path, **fields):
    doc = json.loads(path.read_text())
    for k, v in fields.items():
        doc[k] = v
    path.write_text(json.dumps(doc))


def test_crafted_sasrec_config_is_refused_before_allocating(sasrec_ckpt, tiny_ds, tmp_path):
    from click.testing import CliRunner

    from llmsrec.cfsrec import load_cfsrec
    from llmsrec.cli import main

    cfg = sasrec_ckpt / "config.json"
    _edit_json(cfg, hidden=2 ** 40)  # 8 TiB of embeddings if built
    with pytest.raises(InputError, match=rf"{cfg}: field 'hidden' is {2 ** 40}, more than the checkpoint's "
                                         r"weights allow \(at most 4096\)"):
        load_cfsrec(sasrec_ckpt)
    _edit_json(cfg, hidden=64000)  # the reported case: 20 GB before the kernel killed it
    res = CliRunner().invoke(main, ["evaluate", "--data", str(tiny_ds.root), "--model", "sasrec",
                                    "--checkpoint", str(sasrec_ckpt)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {cfg}: field 'hidden' is 64000, more than the checkpoint's weights allow (at most 4096)"]
    _edit_json(cfg, hidden=16, blocks=3)  # plausible sizes, but not the stored tensors
    with pytest.raises(InputError, match=r"model.safetensors: weights do not match .*config.json: tensor "
                                         r"'item_emb.weight' has shape \[31, 8\], the config implies \[31, 16\]"):
        load_cfsrec(sasrec_ckpt)


def test_crafted_weights_header_is_refused(sasrec_ckpt):
    from llmsrec.cfsrec import load_cfsrec

    w = sasrec_ckpt / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes((10 ** 12).to_bytes(8, "little") + data[8:])  # header length beyond the file
    with pytest.raises(InputError, match=rf"{w}: not a safetensors file \(header length 1000000000000 bytes"):
        load_cfsrec(sasrec_ckpt)


def test_crafted_heads_config_is_refused_before_allocating(tmp_path):
    from llmsrec.heads.model import HeadsConfig, LLMSRecHeads, load_heads, save_heads

    save_heads(LLMSRecHeads(HeadsConfig(d_llm=8, d_cf=4, d_out=4, hidden=8, cf_hidden=4)), tmp_path / "h")
    cfg = tmp_path / "h" / "heads_config.json"
    doc = json.loads(cfg.read_text())
    doc["heads"]["hidden"] = 10 ** 12
    cfg.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=rf"{cfg}: field 'hidden' is 1000000000000, more than the "
                                         r"checkpoint's weights allow"):
        load_heads(tmp_path / "h")
    doc["heads"]["hidden"] = 16
    cfg.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"heads.safetensors: weights do not match .*heads_config.json: tensor "
                                         r"'.*' has shape \[8, 8\], the config implies \[16, 8\]"):
        load_heads(tmp_path / "h")


# --- 9. a prompt too long for the model ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm():
    import tiny

    return tiny.tiny_llm()  # max_position_embeddings 1024


def _long_title_ds(out, title_chars: int):
    from tiny import tiny_dataset

    from llmsrec.data import load_prepared

    ds = tiny_dataset(out)
    ds = load_prepared(out)
    ds.titles[3] = "Long " * (title_chars // 5)
    return ds


def test_item_prompt_too_long_names_the_item_and_the_remedy(tmp_path, tiny_llm, one_torch_thread):
    from tiny import tiny_sasrec

    from llmsrec.precompute import precompute

    ds = _long_title_ds(tmp_path / "ds", 320_000)
    out = tmp_path / "cache.h5"
    with pytest.raises(InputError) as e:
        precompute(ds, tiny_sasrec(ds.n_items), out, llm=tiny_llm, views=("test",), history_window=4,
                   progress=False, log=lambda m: None)
    msg = str(e.value)
    assert msg.startswith("item 3 (title of 319,999 characters): its prompt has ")
    assert "tokens, more than the model's 1,024 positions; shorten this title in the dataset's item file" in msg
    assert "--history-window does not change item prompts" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no cache.h5.tmp left behind


def test_user_prompt_too_long_names_the_user_and_the_window(tmp_path, tiny_llm):
    from llmsrec.precompute.engine import tokenize_prompts
    from llmsrec.precompute.llm import USER_OUT
    from llmsrec.precompute.prompts import build_view

    ds = _long_title_ds(tmp_path / "ds", 3_000)
    vp = build_view(ds, "test", history_window=4, verb="watched movies")
    uid = next(u for u in range(1, ds.n_users + 1) if vp.prompts[u] is not None and 3 in vp.prompts[u].soft_items)
    with pytest.raises(InputError, match=rf"^user '{ds.raw_users[uid]}' \(uid {uid}\), view test: its prompt has "
                                         r"[\d,]+ tokens, more than the model's 1,024 positions; lower "
                                         r"--history-window \(now 4\) or shorten the longest title in it "
                                         r"\(item 3, 2,999 characters\)$"):
        tokenize_prompts(tiny_llm, [vp.prompts[uid]], USER_OUT)


# --- 1. two writers on one output ---------------------------------------------------------------


def _env():
    import os

    import llmsrec

    root = str(__import__("pathlib").Path(llmsrec.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _holder(code: str):
    """A second process that runs ``code`` (which ends holding something), then waits."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", code + "\nprint('held', flush=True)\nimport time; time.sleep(120)"],
                         stdout=subprocess.PIPE, text=True, env=_env())
    assert p.stdout.readline().strip() == "held"
    return p


def _stop(p):
    p.kill()
    p.wait()


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    from llmsrec.locks import lock_path, output_lock

    out = tmp_path / "runs" / "demo"
    p = _holder(f"from llmsrec.locks import output_lock\nlock = output_lock({str(out)!r})")
    try:
        assert lock_path(out).read_text().strip() == str(p.pid)
        with pytest.raises(InputError, match=rf"^{out}: another llmsrec process \(pid {p.pid}\) is writing it; "
                                             r"wait for it or stop it$"):
            output_lock(out)
    finally:
        _stop(p)  # killed: the kernel drops its lock, its lock file stays behind
    assert lock_path(out).read_text().strip() == str(p.pid)
    with output_lock(out) as lock:
        assert lock.stale_pid == str(p.pid)
        with output_lock(out):  # re-entrant in one process
            pass
        assert lock_path(out).read_text().strip() == str(__import__("os").getpid())
    assert not lock_path(out).exists()  # removed on release


def test_second_precompute_on_one_cache_is_refused_and_leaves_the_first_build_alone(tmp_path):
    from click.testing import CliRunner

    from llmsrec.cli import main

    out = tmp_path / "cache.h5"
    # the first writer: a build in progress (its .tmp open, as precompute holds it)
    p = _holder("from llmsrec.cache.store import CacheWriter\n"
                f"w = CacheWriter({str(out)!r}, {{'model': 'x'}}, log=lambda m: None)\n"
                "w.needs(['items'])\nw.require('items/cf', __import__('numpy').ones((3, 2), 'f4'))\nw.flush()")
    try:
        res = CliRunner().invoke(main, ["precompute", "--data", str(tmp_path / "d"), "--sasrec", str(tmp_path / "s"),
                                        "--out", str(out)])
        assert res.exit_code == 2
        assert res.output.strip().splitlines() == [
            f"error: {out}: another llmsrec process (pid {p.pid}) is writing it; wait for it or stop it"]
        from llmsrec.cache.store import CacheWriter

        with pytest.raises(InputError, match=rf"pid {p.pid}"):
            CacheWriter(out, {"model": "x"}, log=lambda m: None)
        assert (tmp_path / "cache.h5.tmp").exists()  # not taken for a damaged build and deleted
    finally:
        _stop(p)


def test_second_writer_of_a_folder_is_refused_before_its_work(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from llmsrec import data
    from llmsrec.cli import main

    out = tmp_path / "d"
    called = []
    monkeypatch.setattr(data, "prepare_ml100k", lambda *a, **k: called.append(1))
    p = _holder(f"from llmsrec.locks import output_lock\nlock = output_lock({str(out)!r})")
    try:
        res = CliRunner().invoke(main, ["prepare", "--dataset", "ml-100k", "--out", str(out)])
        assert res.exit_code == 2 and f"(pid {p.pid}) is writing it" in res.output
        assert called == []
        from llmsrec.atomic import atomic_dir

        with pytest.raises(InputError, match=rf"pid {p.pid}"):
            with atomic_dir(out):
                pass
    finally:
        _stop(p)


# --- 3. full disk, damaged unfinished builds, --force ---------------------------------------------


def test_oserror_is_one_line_naming_the_output(tmp_path, monkeypatch, tiny_ds):
    import errno

    from click.testing import CliRunner

    from llmsrec.cfsrec import train as cf_train
    from llmsrec.cli import main
    from llmsrec.data import dataset

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dataset, "_write_folder", full)
    inter, item = _atomic_files(tmp_path, 1)
    res = CliRunner().invoke(main, ["prepare", "--dataset", "atomic", "--inter", str(inter), "--item", str(item),
                                    "--kcore", "1", "--num-negatives", "2", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {tmp_path / 'd'}: No space left on device; free some space and rerun the same command "
        f"(unfinished outputs are resumed or redone)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.inter", "x.item"]  # no .d.tmp-* left
    monkeypatch.setattr(cf_train, "save_cfsrec", full)
    res = CliRunner().invoke(main, ["sasrec", "train", "--data", str(tiny_ds.root), "--out", str(tmp_path / "s"),
                                    "--epochs", "1", "--eval-every", "1", "--hidden", "8", "--maxlen", "5"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith(f"error: {tmp_path / 's'}: No space left on device")


@pytest.fixture(scope="module")
def pc_inputs(tmp_path_factory):
    from tiny import tiny_dataset, tiny_sasrec

    ds = tiny_dataset(tmp_path_factory.mktemp("pc") / "ds")
    return ds, tiny_sasrec(ds.n_items)


def _pc(inputs, llm, out, **kw):
    from llmsrec.precompute import precompute

    ds, sas = inputs
    logs = kw.pop("logs", [])
    kw.setdefault("views", ("train", "test"))
    return precompute(ds, sas, out, llm=llm, history_window=4, chunk_prompts=4,
                      batch_tokens=400, progress=False, log=logs.append, **kw)


class _Kill(Exception):
    pass


def _killed_after(n):
    count = []

    def on_chunk(group, chunk):
        count.append(1)
        if len(count) == n:
            raise _Kill

    return on_chunk


def _states(path):
    import h5py

    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("items/hidden", "users/train/hidden", "users/test/hidden")}


@pytest.fixture(scope="module")
def clean_states(pc_inputs, tiny_llm, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "cache.h5"
    _pc(pc_inputs, tiny_llm, out)
    return _states(out)


@pytest.mark.parametrize("force", [False, True])
def test_damaged_unfinished_build_is_started_over(pc_inputs, tiny_llm, clean_states, tmp_path, force, one_torch_thread):
    import h5py

    out = tmp_path / "cache.h5"
    with pytest.raises(_Kill):
        _pc(pc_inputs, tiny_llm, out, on_chunk=_killed_after(2))
    with h5py.File(f"{out}.tmp", "r+") as f:  # the disk filled while the f_I parameters were written
        del f["params/f_I/bias"]
    logs = []
    _pc(pc_inputs, tiny_llm, out, force=force, logs=logs)
    want = (f"--force: discarding the unfinished build {out}.tmp" if force else
            f"{out}.tmp: damaged unfinished build (/params/f_I/bias missing), starting over")
    assert want in logs
    got = _states(out)
    for k, v in clean_states.items():
        np.testing.assert_array_equal(got[k], v)


def _zero(path, dataset, rows=None):
    """Zero the stored bytes of ``rows`` (default all) of a dataset (contiguous, or chunked in
    whole rows without filters), behind HDF5's back."""
    import h5py

    with h5py.File(path, "r") as f:
        ds = f[dataset]
        row_bytes, n = ds.dtype.itemsize * int(np.prod(ds.shape[1:])), ds.shape[0]
        if ds.chunks is None:
            where = {r: ds.id.get_offset() + r * row_bytes for r in range(n)}
        else:  # chunk i holds rows chunk_offset[0] .. + chunks[0] - 1, stored row after row
            where = {}
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                first = info.chunk_offset[0]
                for r in range(first, min(n, first + ds.chunks[0])):
                    where[r] = info.byte_offset + (r - first) * row_bytes
    with open(path, "r+b") as fh:
        for r in (range(n) if rows is None else rows):
            fh.seek(where[r])
            fh.write(b"\0" * row_bytes)


def test_finished_chunks_are_kept_only_if_they_verify(pc_inputs, tiny_llm, clean_states, tmp_path, one_torch_thread):
    import h5py

    out = tmp_path / "cache.h5"
    with pytest.raises(_Kill):
        _pc(pc_inputs, tiny_llm, out, on_chunk=_killed_after(3))  # items: 4 chunks, 3 done
    tmp = f"{out}.tmp"
    with h5py.File(tmp, "r") as f:
        done = f["progress/items"][()].tolist()
    assert done == [True, True, True, False]
    _zero(tmp, "items/hidden")  # the finished chunks' states lost (a zeroed block)
    logs = []
    _pc(pc_inputs, tiny_llm, out, logs=logs)
    assert any(m.startswith(f"{tmp}: the finished chunks of items do not verify (/items/hidden: 12 of its 12 "
                            f"written rows differ from their checksums") and m.endswith("redoing items")
               for m in logs), logs
    got = _states(out)
    for k, v in clean_states.items():
        np.testing.assert_array_equal(got[k], v)


# --- 10. interrupts and leftovers ---------------------------------------------------------------


@pytest.mark.parametrize("command, module, func, resumes", [
    ("prepare", "llmsrec.data", "prepare_ml100k", False),
    ("precompute", "llmsrec.precompute", "precompute", True),
])
def test_ctrl_c_exits_130_saying_what_to_do(tmp_path, monkeypatch, command, module, func, resumes):
    import importlib

    from click.testing import CliRunner

    from llmsrec.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), func, interrupted)
    out = tmp_path / "o"
    args = {"prepare": ["prepare", "--dataset", "ml-100k", "--out", str(out)],
            "precompute": ["precompute", "--data", "d", "--sasrec", "s", "--out", str(out)]}[command]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 130
    assert res.output.strip().splitlines() == [
        f"Aborted: interrupted; finished chunks are kept in {out}: rerun the same command to resume" if resumes else
        f"Aborted: interrupted; nothing half-written was left in {out} (outputs are renamed into place when "
        f"complete): rerun the same command to start again"]


def test_leftovers_of_a_killed_writer_are_cleared_by_the_next_one(tmp_path):
    from llmsrec.data import prepare_from_interactions

    for left in (".d.tmp-k1ll3d", ".d.old-4711"):
        (tmp_path / left).mkdir()
        (tmp_path / left / "sequences.jsonl").write_text("half")
    (tmp_path / ".other.tmp-x").mkdir()  # another output's: not ours to remove
    prepare_from_interactions([("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("b", "x", 1), ("b", "y", 2),
                               ("b", "w", 3)], {}, tmp_path / "d", kcore=1, num_negatives=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", "d"]


# --- 2. untrusted run folders ------------------------------------------------------------------


def _evil_llm(folder, marker):
    """A model folder whose config asks for its own Python code, which leaves ``marker`` when run."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "architectures": ["EvilForCausalLM"],
                                                    "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture()
def crafted_run(run_dir, tmp_path):  # noqa: F811
    """A copy of a tiny run folder whose cache stage names a model with its own code and
    records trust_remote_code: true."""
    import shutil

    import h5py

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "code-ran"
    evil = _evil_llm(tmp_path / "evil", marker)
    (run / "cache" / "stage.json").write_text(json.dumps({
        "stage": "precompute", "status": "done", "options": {
            "llm": str(evil), "trust_remote_code": True, "views": ["train", "valid", "test"], "history_window": 10,
            "verb": None, "batch_tokens": 4096, "chunk_prompts": 64, "device": "cpu", "dtype": None, "fi": "moment",
            "ridge_alpha": 1e-3, "seed": 0}}))
    with h5py.File(run / "cache" / "cache.h5", "r+") as f:
        prov = json.loads(f.attrs["provenance"])
        f.attrs["provenance"] = json.dumps({**prov, "model": str(evil), "model_weights_sha256": "0" * 64})
    return run, marker


def test_run_folder_cannot_make_recommend_run_code(crafted_run):
    from click.testing import CliRunner

    from llmsrec.cli import main

    run, marker = crafted_run
    res = CliRunner().invoke(main, ["recommend", "--run", str(run), "--history", "i2,i4"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {run / 'cache' / 'stage.json'}: records trust_remote_code: true for --llm {run.parent / 'evil'}; "
        f"a run folder cannot allow a model's own Python code to run: pass --trust-remote-code to this command "
        f"if you trust that model"]
    assert not marker.exists()
    # with the flag, the weights are checked against the cache before anything of the folder is read
    res = CliRunner().invoke(main, ["recommend", "--run", str(run), "--history", "i2,i4", "--trust-remote-code"])
    assert res.exit_code == 2
    assert "its weights (sha256 " in res.output and "are not the ones expected (000000000000...)" in res.output
    assert not marker.exists()


def test_run_folder_cannot_make_analyze_run_code(crafted_run):
    from llmsrec.pipeline import extend_run_cache

    run, marker = crafted_run
    with pytest.raises(InputError, match="records trust_remote_code: true .* pass --trust-remote-code"):
        extend_run_cache(run, ["valid-shuffled"], progress=False, log=lambda m: None)
    with pytest.raises(InputError, match="are not the ones expected"):
        extend_run_cache(run, ["valid-shuffled"], progress=False, log=lambda m: None, trust_remote_code=True)
    assert not marker.exists()


# --- 8. a run folder reused for other data; 4. a stage whose output changed is rebuilt ------------


def _pipeline(out, inter, item, llm_dir, **kw):
    from llmsrec.pipeline import run_pipeline

    logs = kw.pop("logs", [])
    res = run_pipeline(out, dataset="atomic", files={"inter": str(inter), "item": str(item)}, llm=str(llm_dir),
                       data_opts=dict(kcore=1, num_negatives=2, max_users=kw.pop("max_users", None)),
                       sasrec_opts=dict(epochs=2, eval_every=1, hidden=8, maxlen=6, batch_size=8),
                       precompute_opts=dict(history_window=3, batch_tokens=800),
                       head_opts=dict(epochs=1, hidden=16, d_out=8, cf_hidden=8, evals_per_epoch=1, batch_size=4),
                       progress=False, log=logs.append, **kw)
    return res, logs


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from tiny import tiny_llama_folder

    return tiny_llama_folder(tmp_path_factory.mktemp("llm") / "tiny")


def test_run_folder_of_other_data_is_refused_and_results_say_what_ran(tmp_path, llm_dir, one_torch_thread):
    out = tmp_path / "run"
    a = tmp_path / "a"
    a.mkdir()
    inter, item = _atomic_files(a, 1)
    res, _ = _pipeline(out, inter, item, llm_dir, max_users=5)
    assert res["data"] == {"users": 5, "items": 8, "interactions": 25, "max_users": 5, "kcore": 1}
    assert res["llm"] == str(llm_dir)
    assert json.loads((out / "results.json").read_text())["data"] == res["data"]
    md = (out / "results.md").read_text()
    assert f"Data: 5 users, 8 items, 25 interactions (--max-users 5, --kcore 1); LLM: {llm_dir}." in md
    before = {p: p.read_bytes() for p in (out / "results.md", out / "data" / "stage.json")}

    b = tmp_path / "b"
    b.mkdir()
    inter_b, item_b = _atomic_files(b, 1)
    with open(inter_b, "a") as f:
        f.write("u9\ti1\t1610000000\nu9\ti2\t1610086400\nu9\ti3\t1610172800\n")
    with pytest.raises(InputError, match=rf"^{out}: holds a run of other data \(input 'inter': \"sha256:[0-9a-f]+\" "
                                         r"there, \"sha256:[0-9a-f]+\" asked\); pass --force to replace it, or "
                                         r"choose another --out$"):
        _pipeline(out, inter_b, item_b, llm_dir, max_users=5)
    with pytest.raises(InputError, match=r"holds a run of other data \(option 'max_users': 5 there, null asked\)"):
        _pipeline(out, inter, item, llm_dir)
    assert {p: p.read_bytes() for p in before} == before  # nothing replaced
    res, logs = _pipeline(out, inter_b, item_b, llm_dir, force=True)
    assert any("held a run of other data" in m and "--force: replacing it" in m for m in logs)
    assert res["data"]["users"] == 7 and res["data"]["max_users"] is None

    # 4. the cache changed since it was built (a zeroed block): the stage is rebuilt, not accepted
    cache = out / "cache" / "cache.h5"
    _zero(cache, "items/hidden", rows=[1, 2])
    again, logs = _pipeline(out, inter_b, item_b, llm_dir)
    assert "[precompute] running: " + str(llm_dir) + ", views train,valid,test (rebuild)" in logs
    assert again["models"] == res["models"]


# --- 4. silent corruption -------------------------------------------------------------------------


def test_corrupted_cache_is_refused_by_readers_and_found_by_verify(pc_inputs, tiny_llm, tmp_path, one_torch_thread):
    import shutil

    import h5py
    from click.testing import CliRunner

    from llmsrec.cache import open_cache
    from llmsrec.cli import main

    cache = tmp_path / "cache.h5"
    _pc(pc_inputs, tiny_llm, cache, views=("train", "valid", "test"))
    res = CliRunner().invoke(main, ["verify", str(cache)])
    assert res.exit_code == 0, res.output
    with h5py.File(cache, "r") as f:
        n = sum(1 for _ in _walk(f))
        written = int(np.count_nonzero(f["checksums/users/train/hidden"][()]))
    assert res.output.splitlines() == [f"{cache}: {n} of {n} datasets verified by checksum", f"{cache}: verified"]
    shutil.copy(cache, tmp_path / "clean.h5")
    _zero(cache, "users/train/hidden", rows=[2, 3])  # 'zeroed inside a complete cache.h5'
    with open_cache(cache) as c:
        np.testing.assert_array_equal(c.item_hidden(), open_cache(tmp_path / "clean.h5").item_hidden())
        with pytest.raises(InputError, match=rf"^{cache}: /users/train/hidden: 2 of its {written} written rows differ "
                                             r"from their checksums \(first: row 2\): the file is damaged; rebuild it "
                                             r"\(precompute --force\) or check it with `llmsrec verify`$"):
            c.user_hidden("train")
    ds, _ = pc_inputs
    res = CliRunner().invoke(main, ["train", "--data", str(ds.root), "--cache", str(cache), "--out", str(tmp_path / "h"),
                                    "--epochs", "1", "--hidden", "8", "--no-progress", "--prefixes", "1",
                                    "--user-readout", "out", "--item-readout", "out"])  # a paper-readout cache
    assert res.exit_code == 2 and "/users/train/hidden: 2 of its" in res.output.splitlines()[-1]
    assert not (tmp_path / "h").exists()
    res = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert f"damaged: {cache}: /users/train/hidden: " in "\n".join(lines)
    assert lines[-1].startswith(f"error: {tmp_path}: 1 problem(s); first: {cache}: /users/train/hidden: ")


def _walk(f):
    import h5py

    found = []
    f.visititems(lambda k, v: found.append(k) if isinstance(v, h5py.Dataset) else None)
    return found


def test_verify_checks_run_stages_and_checkpoints(sasrec_ckpt, tmp_path):
    from click.testing import CliRunner

    from llmsrec.cli import main
    from llmsrec.pipeline import Stage
    from llmsrec.run_layout import file_digest

    run = tmp_path / "run"
    import shutil

    shutil.copytree(sasrec_ckpt, run / "sasrec")
    Stage(run, "sasrec", {}, {}).done(file_digest(run / "sasrec" / "model.safetensors"), 1.0)
    res = CliRunner().invoke(main, ["verify", str(run)])
    assert res.exit_code == 0, res.output
    assert f"{run / 'sasrec'}: output as recorded by stage sasrec" in res.output
    w = run / "sasrec" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-8:] = b"\0" * 8  # the last weights zeroed: a valid file with other numbers
    w.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["verify", str(run)])
    assert res.exit_code == 2
    assert f"damaged: {run / 'sasrec'}: output changed since the stage finished" in res.output


# --- 11. distributed teardown ----------------------------------------------------------------------

_TEARDOWN = """
import json, os, sys
import torch
from llmsrec import distributed as dd

def threads():
    return len(os.listdir("/proc/self/task"))

torch.ones(4).sum()
base = threads()
dd.init_distributed("cpu")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
model(torch.ones(1, 2)).sum().backward()
during = threads()
dd.broadcast_json({"heads": "written"})  # Python-owned tensors in the last collectives
del model
dd.shutdown_distributed()
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w") as f:
    json.dump([base, during, threads()], f)
"""


def test_shutdown_joins_the_gloo_threads_before_the_interpreter_exits(tmp_path, monkeypatch):
    """Rank 1 aborted at exit ('terminate called without an active exception') 2 of 13 runs:
    a gloo worker still alive during interpreter finalization freed the last collectives'
    Python tensors, needed the GIL and was ended inside a C++ destructor. The threads lived
    on because torch._dynamo, imported by DDP after the group existed, kept the group."""
    from test_distributed_train import torchrun_argv

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    torchrun_argv(2, ["-c", _TEARDOWN, str(tmp_path)])
    for rank in (0, 1):
        base, during, after = json.loads((tmp_path / f"rank{rank}").read_text())
        assert during > base  # gloo's worker threads
        assert after == base, (rank, base, during, after)  # joined when the group was destroyed
