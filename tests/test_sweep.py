"""`llmsrec sweep` on a synthetic cache: grid parsing, resumption, the best variant, --jobs."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from llmsrec.cli import main
from llmsrec.errors import InputError
from llmsrec.experiments.sweep import expand_grid, load_grid, sweep
from test_heads_cache import ds, write_cache  # noqa: F401  (module fixture + cache builder)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = """
[grid]
lr = [1e-2, 1e-3]
uniform = [true, false]

[fixed]
hidden = 32
d-out = 16
cf_hidden = 8
epochs = 2
train_negatives = 3
evals_per_epoch = 2
"""


def test_grid_parsing_and_errors(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text(GRID)
    grid, fixed = load_grid(p)
    assert grid == {"lr": [1e-2, 1e-3], "uniform": [True, False]}
    assert fixed["d_out"] == 16
    v = expand_grid(grid, fixed, {"seed": 5})
    assert [x[0] for x in v] == [{"lr": 1e-2, "uniform": True}, {"lr": 1e-2, "uniform": False},
                                 {"lr": 1e-3, "uniform": True}, {"lr": 1e-3, "uniform": False}]
    assert v[0][1].seed == 5 and v[0][1].hidden == 32
    for text, msg in [("[grid]\nlrr = [1]", "lrr: unknown head option"),
                      ("[grid]\nlr = 1e-3", "expected a non-empty list"),
                      ("[fixed]\nlr = 1e-3", "non-empty \\[grid\\]"),
                      ("[grid]\nlr = [1e-3]\n[other]\nx=1", "unknown section \\[other\\]"),
                      ("[grid]\nlr = [1e-3]\n[fixed]\nlr = 1e-2", "both"),
                      ("[grid\n", "not a readable TOML")]:
        p.write_text(text)
        with pytest.raises(InputError, match=msg):
            load_grid(p)
    for grid, msg in [("train_negatives = [0]", "positive integer"), ('uniform = ["no"]', "'uniform' expects bool"),
                      ("epochs = [true]", "'epochs' expects int"), ('lr = ["x"]', "'lr' expects float"),
                      ("seed = [-1]", "'seed' must be >= 0"), ("beta1 = [1.5]", "'beta1' must be in"),
                      ("seed = [1.5]", "'seed' expects int")]:
        p.write_text(f"[grid]\n{grid}")
        with pytest.raises(InputError, match=f"sweep variant .*{msg}"):
            expand_grid(*load_grid(p))


def test_sweep_resumes_and_tests_the_best_once(ds, tmp_path):  # noqa: F811
    cache = write_cache(tmp_path / "c.h5", ds)
    g = tmp_path / "g.toml"
    g.write_text(GRID)
    out = tmp_path / "sweep"
    s = sweep(ds, cache, g, out, progress=False, log=lambda m: None)
    lines = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and s["trained"] == 4 and s["variants"] == 4
    best = max(lines, key=lambda r: r["valid"]["NDCG@10"])
    assert s["best"]["options"] == best["options"]
    res = json.loads((out / "best" / "results.json").read_text())
    assert res["valid"] == pytest.approx(best["valid"])  # retrained deterministically
    assert s["best"]["test"] == res["test"]
    md = (out / "sweep.md").read_text()
    vals = [float(row.split("|")[5]) for row in md.splitlines() if row.startswith("| ") and row[2].isdigit()]
    assert vals == sorted(vals, reverse=True) and len(vals) == 4
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    # rerun: nothing trained; a grid with one more value trains only the new variants
    assert sweep(ds, cache, g, out, progress=False, log=lambda m: None)["trained"] == 0
    g.write_text(GRID.replace("lr = [1e-2, 1e-3]", "lr = [1e-2, 1e-3, 3e-3]"))
    s3 = sweep(ds, cache, g, out, progress=False, log=lambda m: None)
    assert s3["trained"] == 2 and len((out / "sweep.jsonl").read_text().splitlines()) == 6


def test_jobs_give_the_same_records(ds, tmp_path):  # noqa: F811
    cache = write_cache(tmp_path / "c.h5", ds)
    g = tmp_path / "g.toml"
    g.write_text(GRID.replace("uniform = [true, false]", "uniform = [true]"))
    a = sweep(ds, cache, g, tmp_path / "a", progress=False, log=lambda m: None)
    b = sweep(ds, cache, g, tmp_path / "b", jobs=2, progress=False, log=lambda m: None)
    ra = sorted((json.loads(x) for x in (tmp_path / "a" / "sweep.jsonl").read_text().splitlines()),
                key=lambda r: r["options"]["lr"])
    rb = sorted((json.loads(x) for x in (tmp_path / "b" / "sweep.jsonl").read_text().splitlines()),
                key=lambda r: r["options"]["lr"])
    for x, y in zip(ra, rb):
        assert x["valid"] == pytest.approx(y["valid"], abs=1e-6) and x["best_step"] == y["best_step"]
    assert a["best"]["test"] == pytest.approx(b["best"]["test"])


def test_stacked_sweep_gives_the_same_records(ds, tmp_path):  # noqa: F811
    cache = write_cache(tmp_path / "c.h5", ds)
    g = tmp_path / "g.toml"
    g.write_text(GRID.replace("uniform = [true, false]", 'distill = ["mse", "none"]\nseed = [0, 1]'))
    ma, mb = [], []
    a = sweep(ds, cache, g, tmp_path / "a", progress=False, log=ma.append)
    b = sweep(ds, cache, g, tmp_path / "b", stack=3, progress=False, log=mb.append)
    assert "3 stacks of up to 3" in mb[0] and b["stack"] == 3 and "stack" not in a
    # alone, the best variant's heads are written as trained; stacked, it is retrained alone
    assert "writing the best variant" in ma[-1] and "retraining the best variant" in mb[-1]
    ra, rb = ([json.loads(x) for x in (tmp_path / d / "sweep.jsonl").read_text().splitlines()] for d in "ab")
    assert [r["options"] for r in ra] == [r["options"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["valid"] == pytest.approx(y["valid"], abs=1e-6) and x["best_step"] == y["best_step"]
        assert x["steps"] == y["steps"] and x["stopped_early"] == y["stopped_early"]
    assert a["best"]["options"] == b["best"]["options"] and a["best"]["test"] == pytest.approx(b["best"]["test"])
    with pytest.raises(InputError, match="--stack 0"):
        sweep(ds, cache, g, tmp_path / "c", stack=0, progress=False, log=lambda m: None)


def test_sweep_with_bf16_steps_records_them_and_equals_train(ds, tmp_path):  # noqa: F811
    """step_dtype bf16: each line equals fit_heads with bf16 steps, and says so; a sweep folder of
    one step dtype is not resumed with another."""
    from llmsrec.heads.train import TrainConfig, fit_heads, load_cached_tensors

    cache = write_cache(tmp_path / "c.h5", ds)
    g = tmp_path / "g.toml"
    g.write_text(GRID.replace("uniform = [true, false]", "uniform = [true]"))
    out = tmp_path / "s"
    s = sweep(ds, cache, g, out, step_dtype="bf16", progress=False, log=lambda m: None)
    lines = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert s["step_dtype"] == "bf16" and [r["step_dtype"] for r in lines] == ["bf16", "bf16"]
    data = load_cached_tensors(ds, cache, eval_views=("valid",))
    for r in lines:
        alone = fit_heads(data, TrainConfig(**r["config"]), progress=False, step_dtype="bf16")
        assert r["best_step"] == alone.best["step"] and r["valid"] == alone.best["metrics"]
    assert json.loads((out / "best" / "results.json").read_text())["step_dtype"] == "bf16"
    assert "Every variant: hidden=32, d_out=16, cf_hidden=8, epochs=2, train_negatives=3, evals_per_epoch=2, " \
           "bf16 training steps; other options as the run's heads." in (out / "sweep.md").read_text()
    # the best heads are bf16 steps' weights, not fp32's
    from llmsrec.heads.model import load_heads

    best_cfg = TrainConfig(**s["best"]["config"])
    got = load_heads(out / "best").state_dict()
    for dtype, same in (("bf16", True), ("fp32", False)):
        want = fit_heads(data, best_cfg, progress=False, step_dtype=dtype).heads.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want) is same, dtype
    with pytest.raises(InputError, match=r"sweep.jsonl line 1: trained with --step-dtype bf16, not fp32"):
        sweep(ds, cache, g, out, progress=False, log=lambda m: None)


@pytest.mark.parametrize("name", ["sweep.toml", "sweep-fast.toml"])
def test_example_grids_expand_to_the_24_variants_they_describe(name):
    """examples/: each grid is 24 valid variants; sweep-fast's [fixed] part is the --fast recipe
    (its lr among the grid's)."""
    from pathlib import Path

    from llmsrec.defaults import HEADS_FAST
    from llmsrec.experiments.sweep import expand_grid, load_grid

    grid, fixed = load_grid(Path(__file__).resolve().parents[1] / "examples" / name)
    variants = expand_grid(grid, fixed)
    assert len(variants) == 24 and len({json.dumps(v, sort_keys=True) for v, _ in variants}) == 24
    if name == "sweep-fast.toml":
        assert fixed == {k: v for k, v in HEADS_FAST.items() if k not in grid}  # lr: one of the grid's
        assert HEADS_FAST["lr"] in grid["lr"]
        assert all(getattr(c, k) == v for _, c in variants for k, v in fixed.items())
