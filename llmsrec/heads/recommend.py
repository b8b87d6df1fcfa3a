"""``llmsrec recommend``: the top-k unseen items for a known user or for a typed history.

A known user's representation comes from the cache (the ``test`` view: the whole
history but the held-out test item). A typed history (a new user) is turned into a prompt
with the run's template and window, the frozen LLM runs once on it (the run's f_I and
``[UserOut]`` embedding from the cache), and the cached item states are scored. Items in
the history are never recommended.
"""

from __future__ import annotations

import calendar
import datetime as _dt
import json
from pathlib import Path

import numpy as np
import torch

from llmsrec.cache import open_cache
from llmsrec.data import load_prepared
from llmsrec.defaults import HISTORY_WINDOW
from llmsrec.errors import InputError
from llmsrec.heads.model import load_heads
from llmsrec.heads.train import cached_features, readout_features
from llmsrec.precompute.engine import tokenize_prompts
from llmsrec.precompute.llm import USER_OUT, load_llm, recorded_trust
from llmsrec.precompute.prompts import user_prompt
from llmsrec.precompute.readouts import as_tree, forward_readouts

__all__ = ["parse_history", "recommend", "format_recommendations"]


def _split_entries(text: str, index: dict) -> list[str]:
    """Split a comma-separated history into entries; an item id that itself holds commas
    (MovieLens-1M: "American President, The (1995)") stays one entry: at each position the
    longest run of comma-separated pieces that names a known id (before any ``@date``) wins."""
    pieces = text.split(",")
    out, i = [], 0
    while i < len(pieces):
        j = next((j for j in range(len(pieces), i + 1, -1)
                  if not any("@" in x for x in pieces[i:j - 1])  # a date ends its entry
                  and ",".join(pieces[i:j]).partition("@")[0].strip() in index), i + 1)
        out.append(",".join(pieces[i:j]).strip())
        i = j
    return out


def parse_history(text: str, ds, default_ts: int) -> tuple[np.ndarray, np.ndarray]:
    """``"RAW,RAW@2024-05-01,..."`` -> (iids int64 (k,), Unix-second timestamps int64 (k,)).

    Raw ids may contain commas ("American President, The (1995)"): the longest known id wins.

    An entry without ``@YYYY-MM-DD`` (or ``YYYY/MM/DD``) takes the previous entry's date
    (leading undated entries: the first date given, else ``default_ts``).

    Raises:
        InputError: an empty history or entry, an unknown or repeated raw item id (named),
            a bad date, or dates not oldest first.
    """
    index = {raw: i for i, raw in enumerate(ds.raw_items) if i > 0}
    iids, ts = [], []
    entries = _split_entries(text, index)
    if not any(entries):
        raise InputError("--history: no item ids given")
    for pos, entry in enumerate(entries):
        if not entry:
            raise InputError(f"--history entry {pos + 1}: empty")
        raw, at, date = entry.partition("@")
        raw = raw.strip()
        if raw not in index:
            raise InputError(f"--history entry {pos + 1}: unknown item id {raw!r} (raw ids as in the "
                             f"dataset's items.jsonl)")
        if index[raw] in iids:
            raise InputError(f"--history entry {pos + 1}: item {raw!r} is listed twice")
        iids.append(index[raw])
        if at:
            try:
                d = _dt.datetime.strptime(date.strip().replace("/", "-"), "%Y-%m-%d")
            except ValueError:
                raise InputError(f"--history entry {pos + 1}: date {date!r} is not YYYY-MM-DD") from None
            ts.append(calendar.timegm(d.timetuple()))
        else:
            ts.append(None)
    # an undated entry takes the previous entry's date; leading ones the first date given
    first = next((t for t in ts if t is not None), int(default_ts))
    for j, t in enumerate(ts):
        ts[j] = t if t is not None else (ts[j - 1] if j else first)
        if j and ts[j] < ts[j - 1]:
            raise InputError(f"--history entry {j + 1}: date before the previous entry's "
                             f"(list the history oldest first)")
    return np.asarray(iids, dtype=np.int64), np.asarray(ts, dtype=np.int64)


def _user_state_from_llm(run: Path, ds, reader, iids, ts, device: str = "cpu", trust_remote_code: bool = False,
                         readout: str = "out") -> tuple[torch.Tensor, str]:
    """f_user's input for a typed history: one LLM forward of its prompt, read as the
    cache was (``readout``: the heads' user readout; the cache's readout layers)."""
    prov = reader.provenance
    opts = {}
    record = run / "cache" / "stage.json"
    try:
        opts = json.loads(record.read_text())["options"]
    except (OSError, ValueError, KeyError):
        pass
    if not isinstance(opts, dict):
        raise InputError(f"{record}: field 'options' is not an object")
    name = opts.get("llm", prov.get("model"))
    if not prov.get("model_weights_sha256"):
        raise InputError(f"{reader.path}: provenance field 'model_weights_sha256' missing: the LLM {name!r} cannot "
                         f"be checked before it is loaded")
    # the run folder names the model; only this command's flag may let its code run, and
    # the weights must be the ones the cache was built from (checked before loading)
    llm = load_llm(name, device=device, dtype=opts.get("dtype"),
                   trust_remote_code=recorded_trust(record, {**opts, "llm": name}, trust_remote_code),
                   expect_weights_digest=prov["model_weights_sha256"])
    w = int(prov.get("history_window", HISTORY_WINDOW))
    prompt = user_prompt(ds.titles, iids[-w:], ts[-w:], verb=prov.get("verb") or "purchases",
                         version=prov.get("template_version", "llmsrec-prompt-v1"))
    if (prompt.soft_items < 0).any():
        raise InputError(f"{reader.path}: its prompts carry the CF-SRec user representation "
                         f"(template {prov.get('template_version')}); --history needs the default template")
    p = reader.params()
    e = np.asarray(reader.item_cf(), dtype=np.float32)
    soft = torch.from_numpy(e @ p["f_I/weight"].T + p["f_I/bias"]).to(llm.device, llm.dtype)
    out_vec = torch.from_numpy(np.asarray(p["tokens/user_out"], np.float32)).to(llm.device, llm.dtype)
    toks = tokenize_prompts(llm, [prompt], USER_OUT)
    layers = tuple(int(x) for x in prov.get("readout_layers", ()))
    r = forward_readouts(llm, [as_tree(toks[0])], soft, out_vec, layers, w)
    feats = readout_features(readout, r["hidden"], r["out_layers"], r["slots"])
    return torch.from_numpy(feats[0]), prompt.text


def recommend(run, *, user: str | None = None, history: str | None = None, k: int = 10, device: str = "cpu",
              show_last: int = 10, trust_remote_code: bool = False) -> dict:
    """Top-k unseen items of a run's LLM-SRec for a known user or a typed history.

    Args:
        run: a run folder (``data/``, ``cache/cache.h5``, ``heads/``).
        user: a raw user id of the dataset (scored from the cached ``test`` view).
        history: comma-separated raw item ids, oldest first, each optionally ``@YYYY-MM-DD``
            (default date: the dataset's last interaction day); the LLM runs once.
        k: number of items; show_last: history entries listed in the output.
        trust_remote_code: allow the LLM folder's own code (``--history``); a run folder's
            recorded ``true`` is refused without it.
    Returns:
        ``{"source", "user", "history": [{"item", "title"}], "recommendations": [{"rank",
        "item", "title", "score"}], "held_out": {...} (known users: the test item and its
        rank among all unseen items)}``; items are raw ids, scores f_user . f_item (float).
    Raises:
        InputError: not exactly one of ``user``/``history``, an unknown user or item id,
            a user without a cached prompt, k < 1; ``--history``: a recorded
            ``trust_remote_code`` without the flag, LLM weights other than the cache's.
    """
    if (user is None) == (history is None):
        raise InputError("give exactly one of --user or --history")
    if k < 1:
        raise InputError("--k must be >= 1")
    run = Path(run)
    for sub in ("data", "cache/cache.h5", "heads/heads.safetensors"):
        if not (run / sub).exists():
            raise InputError(f"{run / sub}: missing; --run must be a folder written by `llmsrec run`")
    ds = load_prepared(run / "data")
    heads = load_heads(run / "heads")
    held = None

    with open_cache(run / "cache" / "cache.h5") as reader:
        items_h = torch.from_numpy(cached_features(reader, "items", heads.config.item_readout))
        if user is not None:
            try:
                uid = ds.raw_users.index(str(user), 1)
            except ValueError:
                raise InputError(f"--user {user!r}: not a user of {ds.root} (raw ids as in sequences.jsonl)") from None
            h = cached_features(reader, "test", heads.config.user_readout)[uid]
            if not np.any(h):
                raise InputError(f"--user {user!r}: no cached test prompt (cache built with --max-users?)")
            h_u = torch.from_numpy(h)
            inputs, targets = ds.view("test")
            iids = np.asarray(inputs[uid], dtype=np.int64)
            held = int(targets[uid])
            source, prompt_text = "cache (test view)", None
        else:
            last_ts = max(int(t[-1]) for t in ds.timestamps[1:])
            iids, ts = parse_history(history, ds, last_ts)
            h_u, prompt_text = _user_state_from_llm(run, ds, reader, iids, ts, device=device,
                                                    trust_remote_code=trust_remote_code,
                                                    readout=heads.config.user_readout)
            source = "LLM forward of this history"
    with torch.no_grad():
        scores = heads.item(items_h) @ heads.user(h_u[None])[0]
    scores[0] = -torch.inf
    scores[torch.from_numpy(np.array(iids, dtype=np.int64))] = -torch.inf
    k = min(k, int(torch.isfinite(scores).sum()))
    top = torch.topk(scores, k)
    out = {
        "source": source,
        "user": user,
        "history": [{"item": ds.raw_items[i], "title": ds.titles[i]} for i in iids[-show_last:]],
        "recommendations": [{"rank": r + 1, "item": ds.raw_items[int(i)], "title": ds.titles[int(i)],
                             "score": float(s)} for r, (s, i) in enumerate(zip(top.values, top.indices))],
    }
    if held is not None:
        out["held_out"] = {"item": ds.raw_items[held], "title": ds.titles[held],
                           "rank": int((scores > scores[held]).sum()) + 1}
    if prompt_text is not None:
        out["prompt"] = prompt_text
    return out


def format_recommendations(rec: dict) -> str:
    """Plain-text rendering of :func:`recommend`'s result."""
    who = f"user {rec['user']}" if rec["user"] is not None else "typed history"
    lines = [f"{who}, from the {rec['source']}; last {len(rec['history'])} history items, oldest first:"]
    lines += [f"  {h['item']:>8}  {h['title']}" for h in rec["history"]]
    if "held_out" in rec:
        ho = rec["held_out"]
        lines.append(f"held-out test item: {ho['item']} {ho['title']} (rank {ho['rank']} among unseen items)")
    lines.append(f"top {len(rec['recommendations'])} unseen items (rank, item id, score, title):")
    lines += [f"  {r['rank']:>3}. {r['item']:>8}  {r['score']:8.3f}  {r['title']}" for r in rec["recommendations"]]
    return "\n".join(lines)
