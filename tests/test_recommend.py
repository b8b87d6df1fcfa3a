"""`llmsrec recommend` for a known user (from the cache) and history parsing (the LLM path is
covered by the integration test with the real bundled model)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from llmsrec.cli import main
from llmsrec.data import load_prepared
from llmsrec.errors import InputError
from llmsrec.heads.model import load_heads
from llmsrec.heads.recommend import parse_history, recommend
from test_analyze import run_dir  # noqa: F401  (module fixture: a tiny run folder)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_known_user_matches_the_heads_scores(run_dir):  # noqa: F811
    import h5py

    ds = load_prepared(run_dir / "data")
    rec = recommend(run_dir, user="u3", k=4)
    uid = ds.raw_users.index("u3")
    with h5py.File(run_dir / "cache" / "cache.h5") as f:
        h_u, items = f["users/test/hidden"][uid], f["items/hidden"][:]
    heads = load_heads(run_dir / "heads")
    with torch.no_grad():
        s = (heads.item(torch.from_numpy(items)) @ heads.user(torch.from_numpy(h_u)[None])[0]).numpy()
    s[0] = -np.inf
    s[ds.seqs[uid][:-1]] = -np.inf
    want = np.argsort(-s, kind="stable")[:4]
    assert [r["item"] for r in rec["recommendations"]] == [ds.raw_items[i] for i in want]
    assert [r["score"] for r in rec["recommendations"]] == pytest.approx(s[want].tolist(), abs=1e-5)
    assert rec["held_out"]["item"] == ds.raw_items[ds.seqs[uid][-1]]
    assert rec["held_out"]["rank"] == int((s > s[ds.seqs[uid][-1]]).sum()) + 1
    assert len(rec["history"]) == 10 and rec["history"][-1]["item"] == ds.raw_items[ds.seqs[uid][-2]]


def test_cli_text_json_and_errors(run_dir):  # noqa: F811
    r = CliRunner().invoke(main, ["recommend", "--run", str(run_dir), "--user", "u3", "--k", "3"])
    assert r.exit_code == 0 and "top 3 unseen items (rank, item id, score, title):" in r.output and "held-out test item:" in r.output
    r = CliRunner().invoke(main, ["recommend", "--run", str(run_dir), "--user", "u3", "--format", "json"])
    assert len(json.loads(r.stdout)["recommendations"]) == 10
    r = CliRunner().invoke(main, ["recommend", "--run", str(run_dir), "--user", "nobody"])
    assert r.exit_code == 2 and "--user 'nobody': not a user" in r.output
    r = CliRunner().invoke(main, ["recommend", "--run", str(run_dir)])
    assert r.exit_code == 2 and "exactly one of --user or --history" in r.output


def test_parse_history(run_dir):  # noqa: F811
    ds = load_prepared(run_dir / "data")
    iids, ts = parse_history(" i2 , i4@1998-03-01,i6@1998/03/02, i8", ds, 7)
    assert [ds.raw_items[i] for i in iids] == ["i2", "i4", "i6", "i8"]
    assert ts.tolist() == [888710400, 888710400, 888796800, 888796800]  # undated: neighbours' dates
    assert parse_history("i2,i4", ds, 7)[1].tolist() == [7, 7]
    with pytest.raises(InputError, match="entry 2: date before the previous"):
        parse_history("i2@1998-03-05,i4@1998-03-01", ds, 0)
    with pytest.raises(InputError, match="listed twice"):
        parse_history("i2,i2", ds, 0)
    with pytest.raises(InputError, match="entry 2: empty"):
        parse_history("i2,,i4", ds, 0)
    with pytest.raises(InputError, match="entry 2: unknown item id 'zz'"):
        parse_history("i2,zz", ds, 0)
    with pytest.raises(InputError, match="not YYYY-MM-DD"):
        parse_history("i2@03-01-1998", ds, 0)
    with pytest.raises(InputError, match="not YYYY-MM-DD"):
        parse_history("i2@", ds, 0)
    with pytest.raises(InputError, match="no item ids"):
        parse_history(" , ", ds, 0)


def test_parse_history_keeps_ids_that_hold_commas(run_dir):  # noqa: F811
    """MovieLens-1M ids such as "American President, The (1995)" contain commas."""
    import copy

    ds = copy.copy(load_prepared(run_dir / "data"))
    ds.raw_items = list(ds.raw_items)
    iid = {raw: i for i, raw in enumerate(ds.raw_items)}
    a, b = [i for i in range(1, len(ds.raw_items)) if ds.raw_items[i] not in ("i2", "i4", "i8")][:2]
    ds.raw_items[a] = "Cape Fear, The (1991)"
    ds.raw_items[b] = "i2, i4"  # a comma id that is also two ids: the longest known id wins
    iids, ts = parse_history("i2, Cape Fear, The (1991)@1998-03-01,i8", ds, 7)
    assert iids.tolist() == [iid["i2"], a, iid["i8"]] and ts.tolist() == [888710400] * 3
    assert parse_history("i2, i4,i8", ds, 7)[0].tolist() == [b, iid["i8"]]
    with pytest.raises(InputError, match="entry 2: unknown item id 'Cape Fear'"):
        parse_history("i2,Cape Fear,i8", ds, 0)
