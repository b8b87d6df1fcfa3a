"""`--config FILE.toml` of train/run/compare/sweep and the resolved config.toml they write."""

import json
import tomllib

import pytest
from click.testing import CliRunner

from llmsrec.cli import main
from test_heads_cache import ds, write_cache  # noqa: F401  (module fixture + cache builder)
from test_sweep import GRID

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny heads on the synthetic cache of test_heads_cache (the paper's last-layer readouts)
HEADS = """
hidden = 32
d-out = 16
cf_hidden = 8
lr = 0.01
epochs = 3
train-negatives = "3"
prefixes = 1
user-readout = "out"
item_readout = "out"
no-progress = true
"""


@pytest.fixture(scope="module")
def cache(ds, tmp_path_factory):  # noqa: F811
    return write_cache(tmp_path_factory.mktemp("c") / "cache.h5", ds)


def _train(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_file_values_are_used_and_flags_override_them(ds, cache, tmp_path):  # noqa: F811
    cfg = tmp_path / "heads.toml"
    cfg.write_text(f'data = "{ds.root}"\ncache = "{cache}"\n' + HEADS)
    out = tmp_path / "h"
    r = _train("--config", cfg, "--out", out, "--epochs", "1")
    assert r.exit_code == 0, r.output
    train = json.loads((out / "heads_config.json").read_text())["train"]
    assert train["lr"] == 0.01 and train["hidden"] == 32 and train["train_negatives"] == 3  # from the file
    assert train["epochs"] == 1  # the flag wins over the file's 3
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["epochs"] == 1 and resolved["lr"] == 0.01 and resolved["out"] == str(out)
    assert resolved["data"] == str(ds.root) and resolved["train-negatives"] == "3"
    assert resolved["batch-size"] == 20 and resolved["model"] == "llmsrec"  # defaults are written too
    assert "config" not in resolved and "threads" not in resolved  # no value: left out


def test_written_config_reruns_the_same_options(ds, cache, tmp_path):  # noqa: F811
    first, second = tmp_path / "a", tmp_path / "b"
    r = _train("--data", ds.root, "--cache", cache, "--out", first, "--hidden", "32", "--d-out", "16",
               "--cf-hidden", "8", "--epochs", "2", "--train-negatives", "3", "--prefixes", "1",
               "--user-readout", "out", "--item-readout", "out", "--no-progress")
    assert r.exit_code == 0, r.output
    # every option is in the file, the LoRA ones too: at their defaults they do not count as given
    r = _train("--config", first / "config.toml", "--out", second)
    assert r.exit_code == 0, r.output
    a, b = (tomllib.loads((d / "config.toml").read_text()) for d in (first, second))
    assert a.pop("out") == str(first) and b.pop("out") == str(second)
    assert a == b and a["lora-r"] == 8
    res = [json.loads((d / "results.json").read_text()) for d in (first, second)]
    assert res[0]["valid"] == res[1]["valid"] and res[0]["test"] == res[1]["test"]


def test_fast_sets_its_recipe_under_flags_and_file_values(ds, cache, tmp_path):  # noqa: F811
    """--fast: HEADS_FAST where nothing else gives a value; a flag or a --config value wins;
    the written config.toml holds the values used, so it reruns them without --fast."""
    from llmsrec.defaults import HEADS_FAST

    out = tmp_path / "f"
    r = _train("--data", ds.root, "--cache", cache, "--out", out, "--fast", "--hidden", "32", "--d-out", "16",
               "--cf-hidden", "8", "--epochs", "2", "--train-negatives", "3", "--prefixes", "1",
               "--user-readout", "out", "--item-readout", "out", "--no-progress")
    assert r.exit_code == 0, r.output
    train = json.loads((out / "heads_config.json").read_text())["train"]
    assert HEADS_FAST["hidden"] != 32 and train["hidden"] == 32  # the flag wins
    assert {k: train[k] for k in HEADS_FAST if k != "hidden"} == {k: v for k, v in HEADS_FAST.items() if k != "hidden"}
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["batch-size"] == HEADS_FAST["batch_size"] and resolved["patience"] == HEADS_FAST["patience"]
    again = tmp_path / "g"
    r = _train("--config", out / "config.toml", "--out", again)
    assert r.exit_code == 0, r.output
    assert json.loads((again / "heads_config.json").read_text())["train"] == train
    # in a file: fast = true with one of its options set there too
    cfg = tmp_path / "fast.toml"
    cfg.write_text(f'data = "{ds.root}"\ncache = "{cache}"\nfast = true\nbatch-size = 7\n' + HEADS)
    r = _train("--config", cfg, "--out", tmp_path / "h")
    assert r.exit_code == 0, r.output
    train = json.loads((tmp_path / "h" / "heads_config.json").read_text())["train"]
    assert train["batch_size"] == 7 and train["hidden"] == 32 and train["lr"] == 0.01  # the file's
    assert train["patience"] == HEADS_FAST["patience"] and train["evals_per_epoch"] == HEADS_FAST["evals_per_epoch"]
    # a file value equal to the built-in default counts as the default, as everywhere: --fast on top
    # of a written config.toml of the default heads is the fast recipe, whatever the flags' order
    plain = tmp_path / "plain.toml"
    plain.write_text(f'data = "{ds.root}"\ncache = "{cache}"\nhidden = 2048\npatience = 20\n'
                     + HEADS.replace("hidden = 32\n", ""))
    for n, args in enumerate([("--fast", "--config", plain), ("--config", plain, "--fast")]):
        r = _train(*args, "--out", tmp_path / f"o{n}", "--epochs", "1")
        assert r.exit_code == 0, r.output
        train = json.loads((tmp_path / f"o{n}" / "heads_config.json").read_text())["train"]
        assert (train["hidden"], train["patience"]) == (HEADS_FAST["hidden"], HEADS_FAST["patience"]), args
        assert train["lr"] == 0.01  # the file's, not the default
        assert r.output.splitlines()[0] == "--fast: --hidden 128, --batch-size 200, --evals-per-epoch 1, " \
                                           "--patience 3 (given: lr)"
    both = tmp_path / "both.toml"
    both.write_text(plain.read_text().replace("hidden = 2048", "hidden = 256") + "fast = true\n")
    r = _train("--config", both, "--out", tmp_path / "o2", "--epochs", "1")
    assert r.exit_code == 0, r.output
    train = json.loads((tmp_path / "o2" / "heads_config.json").read_text())["train"]
    assert (train["hidden"], train["patience"], train["batch_size"]) == (256, HEADS_FAST["patience"],
                                                                        HEADS_FAST["batch_size"])
    # the recipe of the cache-mode heads only: one line
    for extra, what in ((("--mode", "e2e"), "--mode e2e"), (("--model", "tallrec"), "--model tallrec")):
        r = _train("--data", ds.root, "--cache", cache, "--out", tmp_path / "e", "--fast", *extra)
        assert r.exit_code == 2 and r.output.strip().splitlines() == [
            f"error: --fast: a recipe for the LLM-SRec heads in cache mode, not for {what}"]
    r = _train("--data", ds.root, "--cache", cache, "--out", tmp_path / "p", "--fast", "--paper-settings")
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == \
        "error: --fast and --paper-settings: choose one (each sets the heads' schedule)"
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("line, message", [
    ("bogus = 1", "key 'bogus': not an option of llmsrec train"),
    ('epochs = "many"', "key 'epochs': expected an integer, got \"many\""),
    ("epochs = 2.5", "key 'epochs': expected an integer, got 2.5"),
    ("epochs = 0", "key 'epochs': 0 is not in the range x>=1."),
    ("lr = true", "key 'lr': expected a number, got true"),
    ('mode = "fast"', "key 'mode': 'fast' is not one of 'cache', 'e2e'."),
    ("no-progress = 1", "key 'no-progress': expected true or false, got 1"),
    ("hidden = [32]", "key 'hidden': expected an integer, got [32]"),
    ("[cache]\npath = 'c.h5'", "key 'cache': expected a string, got a table"),
])
def test_a_bad_key_is_one_line_and_exit_2(tmp_path, line, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(line + "\n")
    r = _train("--config", cfg, "--data", tmp_path, "--out", tmp_path / "h")
    assert r.exit_code == 2
    assert r.output.splitlines() == [f"error: {cfg}: {message}"]
    assert not (tmp_path / "h").exists()


def test_a_file_that_is_not_toml_is_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("epochs = = 3\n")
    r = _train("--config", cfg)
    assert r.exit_code == 2 and len(r.output.splitlines()) == 1
    assert r.output.startswith(f"error: {cfg}: not a TOML file")
    r = _train("--config", tmp_path / "missing.toml")
    assert r.exit_code == 2 and r.output.splitlines() == [
        f"error: {tmp_path / 'missing.toml'}: No such file or directory"]


def test_sweep_writes_and_reads_its_config(ds, cache, tmp_path):  # noqa: F811
    grid = tmp_path / "g.toml"
    grid.write_text(GRID)
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'data = "{ds.root}"\ncache = "{cache}"\ngrid = "{grid}"\nno_progress = true\n')
    r = CliRunner().invoke(main, ["sweep", "--config", str(cfg), "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    resolved = tomllib.loads((tmp_path / "s" / "config.toml").read_text())
    assert resolved == {"data": str(ds.root), "cache": str(cache), "grid": str(grid), "out": str(tmp_path / "s"),
                        "jobs": 1, "stack": 1, "step-dtype": "fp32", "no-progress": True}
    r = CliRunner().invoke(main, ["sweep", "--config", str(tmp_path / "s" / "config.toml")])
    assert r.exit_code == 0, r.output  # reruns (resumes) the same sweep from its own record


def test_config_option_of_each_command():
    for name in ("run", "train", "compare", "sweep"):
        assert "config" in {p.name for p in main.commands[name].params}, name
    for name in ("prepare", "precompute", "evaluate", "analyze"):
        assert "config" not in {p.name for p in main.commands[name].params}, name
