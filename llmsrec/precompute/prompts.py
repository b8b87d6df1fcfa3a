"""Prompt templates (data, versioned) and the user/item prompts of every view.

The templates follow Table 2 (b) of the paper (the LLaRA/LLM-SRec column):

* user prompt: an opening sentence, then for each of the last W history items its
  number (1..W in the window), its date ``YYYY/MM/DD`` (UTC), its quoted title and one
  ``[HistoryEmb]`` soft token, then a closing sentence ending in ``[UserOut]``;
* item prompt: the quoted title and ``[HistoryEmb]``, ending in ``[ItemOut]``.

Views of a user (input sequence -> target, see docs/internals.md): ``train``
``seq[:-3] -> seq[-3]``, ``valid`` ``seq[:-2] -> seq[-2]``, ``test`` ``seq[:-1] -> seq[-1]``,
and ``<view>-shuffled``: the titles and soft tokens of the window are permuted with a
seeded permutation while numbers and dates stay in place (paper Sec. 2.1, "Discussion
regarding prompt design"). The SASRec input of a shuffled view is the input sequence
with its window permuted the same way.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field

import numpy as np

from llmsrec.data.views import check_view, view_permutation
from llmsrec.defaults import HISTORY_WINDOW, LLM
from llmsrec.errors import InputError
from llmsrec.precompute.llm import HISTORY_EMB, ITEM_OUT, SPECIAL_TOKENS, USER_OUT

#: the default template (``--template``), the paper's Table 2 (b)
TEMPLATE_VERSION = LLM["template"]

#: version -> template pieces. ``{verb}`` is the dataset's noun phrase ("purchases",
#: "watched movies"); with "purchases" the text is exactly Table 2 (b).
TEMPLATES: dict[str, dict[str, str]] = {
    "llmsrec-prompt-v1": {
        "user_open": "This user has made a series of {verb} in the following order: "
                     "(History Item List: ",
        "user_item": "[No.{number} Time: {date} Title: \"{title}\", " + HISTORY_EMB + "]",
        "user_sep": ", ",
        "user_close": "). Based on this sequence of {verb}, generate user representation "
                      "token: " + USER_OUT,
        "item": "The item title and item embedding are as follows: \"Title\": \"{title}\", "
                + HISTORY_EMB + ", then generate item representation token: " + ITEM_OUT,
    },
    # Table 2 (c) / Table 11: the CF-SRec user representation O_u as a soft token up front
    "llmsrec-prompt-v1-userrep": {
        "user_open": "This is user representation from recommendation models: " + HISTORY_EMB
                     + ", and this user has made a series of {verb} in the following order: "
                     "(History Item List: ",
        "user_item": "[No.{number} Time: {date} Title: \"{title}\", " + HISTORY_EMB + "]",
        "user_sep": ", ",
        "user_close": "). Based on this sequence of {verb} and user representation, generate user "
                      "representation token: " + USER_OUT,
        "item": "The item title and item embedding are as follows: \"Title\": \"{title}\", "
                + HISTORY_EMB + ", then generate item representation token: " + ITEM_OUT,
    },
}

#: soft item id that stands for the prompt's own CF-SRec user representation (the
#: ``llmsrec-prompt-v1-userrep`` template); precompute replaces it by f_I(O_u)
USER_REP_ITEM = -1


def has_user_rep(version: str) -> bool:
    """True when the template's user prompt carries the CF-SRec user representation."""
    return TEMPLATES[version]["user_open"].count(HISTORY_EMB) > 0



def template_text(version: str = TEMPLATE_VERSION) -> str:
    """The template of ``version`` as canonical JSON (recorded in the cache provenance)."""
    if version not in TEMPLATES:
        raise InputError(f"template version {version!r}: unknown (have {', '.join(TEMPLATES)})")
    return json.dumps({"version": version, **TEMPLATES[version]}, sort_keys=True)


def default_verb(stats: dict) -> str:
    """"watched movies" for MovieLens data, "purchases" otherwise (Amazon)."""
    name = " ".join(str(stats.get(k, "")) for k in ("dataset", "name", "source")).lower()
    return "watched movies" if ("ml-" in name or "movielens" in name) else "purchases"


def format_date(ts: int) -> str:
    """Unix seconds -> ``YYYY/MM/DD`` in UTC."""
    return _dt.datetime.fromtimestamp(int(ts), tz=_dt.timezone.utc).strftime("%Y/%m/%d")


def clean_title(title: str) -> str:
    """A title safe to put in a prompt: the special-token strings removed, whitespace
    collapsed, ``(no title)`` when empty (a title must not add soft tokens)."""
    for t in SPECIAL_TOKENS:
        title = title.replace(t, "")
    title = " ".join(str(title).split())
    return title or "(no title)"


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text and the item ids behind its ``[HistoryEmb]`` tokens.

    Attributes:
        text: the exact text given to the tokenizer.
        soft_items: int64 ``(n_soft,)`` iids, in the order the ``[HistoryEmb]`` tokens
            appear in ``text``; each is replaced by f_I(E_iid).
        who: whose prompt it is, for messages (``item 17 (title of 320,000 characters)``,
            ``user 'A2' (uid 5), view test``); "" when unknown.
        remedy: what shortens it, for the "prompt too long" message.
    """

    text: str
    soft_items: np.ndarray
    who: str = field(default="", compare=False)
    remedy: str = field(default="lower --history-window", compare=False)


def user_prompt(titles, window, window_ts, *, verb: str, order=None,
                version: str = TEMPLATE_VERSION) -> Prompt:
    """Build a user prompt (Table 2 (b)).

    Args:
        titles: indexable iid -> title.
        window: int ``(k,)`` the last k <= W input items, chronological.
        window_ts: int ``(k,)`` their Unix-second timestamps.
        verb: noun phrase ("purchases", "watched movies").
        order: optional permutation ``(k,)``: slot j shows item ``window[order[j]]``, with
            slot j's own number ``j+1`` and date ``window_ts[j]`` (shuffled views).
    """
    t = TEMPLATES[version]
    k = len(window)
    order = np.arange(k) if order is None else np.asarray(order)
    items = [int(window[o]) for o in order]
    parts = [
        t["user_item"].format(number=j + 1, date=format_date(window_ts[j]),
                              title=clean_title(titles[iid]))
        for j, iid in enumerate(items)
    ]
    text = (t["user_open"].format(verb=verb) + t["user_sep"].join(parts)
            + t["user_close"].format(verb=verb))
    lead = [USER_REP_ITEM] * t["user_open"].count(HISTORY_EMB)
    return Prompt(text=text, soft_items=np.asarray(lead + items, dtype=np.int64))


def item_prompt(titles, iid: int, *, version: str = TEMPLATE_VERSION) -> Prompt:
    """Build the item prompt of ``iid`` (Table 2 (b)): title, ``[HistoryEmb]``, ``[ItemOut]``."""
    title = clean_title(titles[iid])
    text = TEMPLATES[version]["item"].format(title=title)
    return Prompt(text=text, soft_items=np.asarray([iid], dtype=np.int64),
                  who=f"item {iid} (title of {len(title):,} characters)",
                  remedy="shorten this title in the dataset's item file and prepare it again "
                         "(--history-window does not change item prompts)")


@dataclass
class ViewPrompts:
    """The prompts of one view for users 1..U.

    Attributes:
        view: the view name.
        prompts: list (len U+1) of Prompt or None (index 0, users not selected, and
            users whose input is empty, e.g. the ``train`` view of a 3-interaction user).
        targets: int64 ``(U+1,)`` the target iid of each user (0 for row 0).
        cf_inputs: list (len U+1) of int64 arrays: the SASRec input of the same view (for
            a shuffled view, the input with its last-W window permuted like the prompt).
        permutation: int16 ``(U+1, W)`` for shuffled views (slot j shows window item
            ``permutation[j]``; -1 pads), else None.
    """

    view: str
    prompts: list
    targets: np.ndarray
    cf_inputs: list
    permutation: np.ndarray | None


def build_view(ds, view: str, *, history_window: int = HISTORY_WINDOW, verb: str | None = None,
               seed: int = 0, users=None, version: str = TEMPLATE_VERSION) -> ViewPrompts:
    """Build the user prompts of ``view`` for a PreparedDataset.

    Args:
        ds: ``llmsrec.data.PreparedDataset``.
        view: one of ``ALL_VIEWS``.
        history_window: W, the number of last input items shown (>= 1).
        verb: None = ``default_verb(ds.stats)``.
        seed: seed of the shuffled views' permutations.
        users: iterable of uids to build (default all 1..U).

    Raises:
        InputError: unknown view, a non-positive window, or a timestamp that is no date.
    """
    check_view(view)
    if history_window < 1:
        raise InputError(f"--history-window {history_window}: must be >= 1")
    verb = verb or default_verb(ds.stats)
    base = view.removesuffix("-shuffled")
    shuffled = view != base
    inputs, targets = ds.view(base)
    n = ds.n_users
    users = range(1, n + 1) if users is None else users
    prompts: list = [None] * (n + 1)
    cf_inputs: list = [np.zeros(0, dtype=np.int64) for _ in range(n + 1)]
    perm = np.full((n + 1, history_window), -1, dtype=np.int16) if shuffled else None
    for uid in users:
        inp = np.asarray(inputs[uid], dtype=np.int64)
        cf_inputs[uid] = inp
        if len(inp) == 0:
            continue
        ts = np.asarray(ds.timestamps[uid][: len(inp)])
        window, wts = inp[-history_window:], ts[-history_window:]
        order = None
        if shuffled:
            order = view_permutation(seed, view, uid, len(window))
            perm[uid, : len(window)] = order
            cf = inp.copy()
            cf[len(inp) - len(window):] = window[order]
            cf_inputs[uid] = cf
        try:
            p = user_prompt(ds.titles, window, wts, verb=verb, order=order, version=version)
            longest = max(window.tolist(), key=lambda i: len(ds.titles[i]))
            chars = len(clean_title(ds.titles[longest]))
            prompts[uid] = Prompt(p.text, p.soft_items, who=f"user {ds.raw_users[uid]!r} (uid {uid}), view {view}",
                                  remedy=f"lower --history-window (now {history_window}) or shorten the "
                                         f"longest title in it (item {longest}, {chars:,} characters)")
        except (ValueError, OverflowError, OSError):  # datetime: a "year 52672" timestamp
            raise InputError(f"{ds.root}: user {ds.raw_users[uid]!r} (uid {uid}): timestamps "
                             f"{wts.tolist()} are no dates in Unix seconds (milliseconds prepared as "
                             f"seconds?); prepare the data again with --timestamp-unit ms") from None
    return ViewPrompts(view=view, prompts=prompts, targets=np.asarray(targets, dtype=np.int64),
                       cf_inputs=cf_inputs, permutation=perm)


@dataclass
class PrefixPrompts:
    """The prefix training samples of users 1..U: K samples per user.

    Sample j of user u (``j = 0..K-1``) has input ``seq[:-3-j]`` and target ``seq[-3-j]``
    (j = 0 is the ``train`` view's target). Its row is ``1 + (u-1)*K + j`` (row 0 pads).
    All of a user's prompts start at the first item of the earliest sample's W-item
    window, so each is a prefix of sample 0's prompt up to its closing sentence (sample 0
    shows up to W+K-1 items, sample K-1 shows W); a sample never shows its target or a
    later item.

    Attributes:
        k: K.
        prompts: list (len U+1) of lists of Prompt, sample 0 first (None: no sample).
        targets: int64 ``(U*K+1,)`` (0: no sample in that row).
        uids: int64 ``(U*K+1,)`` the user of each row (0 for row 0).
        cf_inputs: list (len U*K+1) of int64 arrays: each sample's CF-SRec input.
    """

    k: int
    prompts: list
    targets: np.ndarray
    uids: np.ndarray
    cf_inputs: list


def build_prefix_view(ds, k: int, *, history_window: int = HISTORY_WINDOW, verb: str | None = None,
                      users=None, version: str = TEMPLATE_VERSION) -> PrefixPrompts:
    """Build the prefix training samples (:class:`PrefixPrompts`) of a PreparedDataset.

    Raises:
        InputError: ``k < 1`` or a non-positive window.
    """
    if k < 1:
        raise InputError(f"--prefixes {k}: must be >= 1")
    if history_window < 1:
        raise InputError(f"--history-window {history_window}: must be >= 1")
    verb = verb or default_verb(ds.stats)
    inputs, _ = ds.view("train")
    n = ds.n_users
    users = range(1, n + 1) if users is None else users
    rows = n * k + 1
    targets = np.zeros(rows, dtype=np.int64)
    uids = np.zeros(rows, dtype=np.int64)
    cf_inputs: list = [np.zeros(0, dtype=np.int64) for _ in range(rows)]
    prompts: list = [None] * (n + 1)
    for uid in users:
        seq = np.asarray(ds.seqs[uid], dtype=np.int64)
        ts = np.asarray(ds.timestamps[uid])
        base = len(inputs[uid])  # sample 0's input length (= len(seq) - 3)
        ks = [j for j in range(k) if base - j >= 1]
        if not ks:
            continue
        start = max(0, base - (len(ks) - 1) - history_window)
        own = []
        for j in ks:
            end = base - j
            row = 1 + (uid - 1) * k + j
            targets[row], uids[row] = seq[end], uid
            cf_inputs[row] = seq[:end]
            try:
                p = user_prompt(ds.titles, seq[start:end], ts[start:end], verb=verb, version=version)
            except (ValueError, OverflowError, OSError):  # datetime: a "year 52672" timestamp
                raise InputError(f"{ds.root}: user {ds.raw_users[uid]!r} (uid {uid}): timestamps "
                                 f"{ts[start:end].tolist()} are no dates in Unix seconds (milliseconds prepared "
                                 f"as seconds?); prepare the data again with --timestamp-unit ms") from None
            own.append(Prompt(p.text, p.soft_items, who=f"user {ds.raw_users[uid]!r} (uid {uid}), prefix sample {j}",
                              remedy=f"lower --history-window (now {history_window}) or --prefixes (now {k})"))
        prompts[uid] = own
    return PrefixPrompts(k=k, prompts=prompts, targets=targets, uids=uids, cf_inputs=cf_inputs)
