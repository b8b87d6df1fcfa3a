"""``--config FILE.toml`` (``run``, ``train``, ``compare``, ``sweep``) and the resolved
``config.toml`` each of them writes beside its outputs.

A config file holds option values at its top level, keyed by the option's name with ``-``
or ``_`` (``history-window = 10``, ``train_negatives = 3``, ``no-progress = true``); paths
are read as on the command line (relative to the current folder). Flags given on the
command line override the file, the file overrides the defaults (click's ``default_map``).
A value equal to the option's default acts as the default (an option a command refuses
unless it is given, e.g. ``--lora-r`` beside ``--model allmrec``, is not refused for it).
An unknown key or a value of the wrong type is one line, ``error: FILE: key 'x': ...``,
exit 2.

After its work each command writes ``config.toml``: every option's value after file,
flags and defaults (options without a value are left out), so ``llmsrec CMD --config
OUT/config.toml`` reruns it. The stage folders keep their own records besides (``stage.json``
of a run folder, ``request.json`` of compare's model runs): those hold what a stage was
asked, this holds what the command was given.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

import click

from llmsrec.atomic import atomic_file
from llmsrec.errors import InputError

#: the resolved config a command writes into its output folder
CONFIG_FILE = "config.toml"


def _options_by_key(command: click.Command) -> dict[str, click.Option]:
    """Option name with ``_`` for ``-`` (``history_window``) -> the click option; ``--config`` left out
    (``--fast``, which passes no value of its own, is in: it fills other options' values)."""
    out = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name != "config" and (p.expose_value or p.name == "fast"):
            for opt in p.opts:
                if opt.startswith("--"):
                    out[opt[2:].replace("-", "_")] = p
    return out


def _expected(param: click.Option) -> tuple[tuple[type, ...], str]:
    """The TOML value types an option takes and their name in an error message."""
    t = param.type
    if param.is_flag or isinstance(t, click.types.BoolParamType):
        return (bool,), "true or false"
    if isinstance(t, click.types.IntParamType):
        return (int,), "an integer"
    if isinstance(t, click.types.FloatParamType):
        return (int, float), "a number"
    if isinstance(t, (click.Choice, click.Path)):
        return (str,), "a string"
    return (str, int, float), "a string"  # free text, e.g. --seeds 0,1,2 or --train-negatives 3


def _check_value(ctx: click.Context, param: click.Option, key: str, value: Any, where: str) -> Any:
    """``value`` converted by the option's click type; InputError ``FILE: key 'x': ...`` if it does not fit."""
    kinds, name = _expected(param)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise InputError(f"{where}: key {key!r}: expected {name}, got {_toml_value(value, strict=False)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: key {key!r}: expected a finite number, got {value}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and str in kinds:
        value = str(value)
    try:
        return param.type_cast_value(ctx, value)
    except click.BadParameter as e:
        raise InputError(f"{where}: key {key!r}: {e.message}") from None


def read_config(ctx: click.Context, path: str | os.PathLike) -> dict[str, Any]:
    """The values of a config file for the command of ``ctx``: option name -> value (only
    those that differ from the option's default).

    Raises:
        InputError: not TOML, a table or an array, an unknown key, a value of the wrong type
            or outside the option's range (one line naming the file and the key).
        OSError: the file cannot be read.
    """
    where = str(path)
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: not a TOML file ({e})") from None
    options = _options_by_key(ctx.command)
    values: dict[str, Any] = {}
    for key, value in doc.items():
        param = options.get(key.replace("-", "_"))
        if param is None:
            raise InputError(f"{where}: key {key!r}: not an option of llmsrec {ctx.info_name}")
        if param.name in values:
            raise InputError(f"{where}: key {key!r}: given twice (with - and with _)")
        value = _check_value(ctx, param, key, value, where)
        default = param.get_default(ctx, call=True)  # a plain value, or None / click's "no default"
        if not isinstance(default, (str, int, float)) or value != param.type_cast_value(ctx, default):
            values[param.name] = value
    return values


def _load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **read_config(ctx, value)}


def config_option(f):
    """Adds ``--config FILE.toml`` to a command (read before its other options)."""
    return click.option(
        "--config", type=click.Path(dir_okay=False), default=None, is_eager=True, expose_value=False,
        callback=_load, metavar="FILE.toml",
        help="TOML file of option values (keys: option names, with - or _); options given on the "
             f"command line override it. Every run writes all its options' values as {CONFIG_FILE} "
             "beside its outputs.")(f)


def _toml_value(value: Any, strict: bool = True) -> str:
    """One TOML value: a bool, an integer, a finite float, a string or an array of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if strict and not math.isfinite(value):
            raise ValueError(f"not a TOML-safe number: {value}")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, strict) for v in value) + "]"
    if isinstance(value, dict) and not strict:
        return "a table"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: JSON's escapes


def resolved_options(ctx: click.Context) -> dict[str, Any]:
    """Every option of the running command with a value (after file, flags and defaults),
    keyed by its long name without ``--``; ``--config`` and options without a value left out."""
    out = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p.expose_value and ctx.params.get(p.name) is not None:
            out[max(p.opts, key=len)[2:]] = ctx.params[p.name]
    return out


def write_config(ctx: click.Context, folder: str | os.PathLike) -> Path:
    """Write ``folder/config.toml`` (atomically): :func:`resolved_options` of the running
    command, so ``llmsrec CMD --config folder/config.toml`` reruns it."""
    path = Path(folder) / CONFIG_FILE
    lines = [f"# llmsrec {ctx.info_name}: every option of this run (config file, flags, defaults).",
             f"# Rerun: llmsrec {ctx.info_name} --config {path}"]
    lines += [f"{key} = {_toml_value(v)}" for key, v in resolved_options(ctx).items()]
    with atomic_file(path) as f:
        f.write("\n".join(lines) + "\n")
    return path
