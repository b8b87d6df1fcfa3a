"""Atomic outputs follow the umask (mkstemp/mkdtemp alone would make them private)."""

import os
import stat

import pytest

from llmsrec.atomic import atomic_dir, atomic_file, write_json
from llmsrec.errors import InputError


def test_outputs_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.txt") as f:
            f.write("half")
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d"):
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_dir_needs_force(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="--force"):
        with atomic_dir(tmp_path / "d"):
            pass


def test_read_json_and_jsonable(tmp_path):
    from llmsrec.atomic import jsonable, read_json

    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert read_json(tmp_path / "bad.json") is None
    write_json(tmp_path / "ok.json", {"a": (1, 2), "p": str(tmp_path)})
    assert read_json(tmp_path / "ok.json") == jsonable({"a": (1, 2), "p": tmp_path}) == {"a": [1, 2], "p": str(tmp_path)}
