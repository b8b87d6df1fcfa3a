"""The ``llmsrec`` command: a thin click group; each command calls one stage function.

Bad input (``InputError``) is printed as one line ``error: ...`` and exits with code 2.
Heavy imports (torch, transformers) happen inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import sys

import click

from llmsrec import __version__
from llmsrec.devices import resolve_device
from llmsrec.errors import InputError
from llmsrec.precompute.prompts import ALL_VIEWS


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmsrec")
def main() -> None:
    """LLM-SRec: distil a frozen SASRec into a frozen LLM, train small heads on cached states.

    \b
    Pipeline (each stage reuses the previous one's output folder/file):
      llmsrec prepare       raw interactions -> leave-last-out split + 99 stored negatives
      llmsrec sasrec train  train the CF-SRec teacher (SASRec)
      llmsrec prompts       print exactly what the LLM reads for a user or an item
      llmsrec precompute    run the frozen LLM once over every prompt -> HDF5 cache
      llmsrec train         train the LLM-SRec heads on the cache (Eq. 1-4)
      llmsrec evaluate      NDCG@10/20, HR@10/20 on validation and test
      llmsrec run           all of the above, reusing unchanged stages
      llmsrec analyze       the paper's sequence-understanding analyses -> report.md
    """


# --- data (issue 3) ---------------------------------------------------------------------
@main.command()
@click.option("--dataset", "dataset", required=True,
              type=click.Choice(["ml-100k", "atomic", "amazon2023"]),
              help="ml-100k: the MovieLens-100k files bundled with recbole; atomic: any "
                   "RecBole .inter/.item pair; amazon2023: Amazon Reviews 2023 jsonl[.gz].")
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
@click.option("--kcore", default=5, show_default=True, type=int,
              help="Iterative k-core: items need K interactions, users max(K, 3).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the user sample and of the negatives.")
@click.option("--num-negatives", default=99, show_default=True, type=int,
              help="Stored negatives per user for validation and for test.")
@click.option("--max-users", default=None, type=int,
              help="Keep a seeded sample of N users before the k-core filter [default: all].")
@click.option("--skip-bad-lines", is_flag=True,
              help="Skip malformed lines and count them in stats.json instead of failing.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def prepare(dataset, out, inter, item, title_field, reviews, meta, kcore, seed, num_negatives,
            max_users, skip_bad_lines, force) -> None:
    """Raw interactions -> leave-last-out split + stored negatives in OUT.

    \b
    Dedup (earliest kept), chronological order (timestamp, then file row), iterative
    k-core, ids 1..N, leave-last-out (last = test, second-to-last = validation), and per
    user NUM_NEGATIVES validation and test negatives from items the user never touched.
    """
    from llmsrec import data

    opts = dict(kcore=kcore, seed=seed, num_negatives=num_negatives, max_users=max_users,
                skip_bad_lines=skip_bad_lines, force=force)

    def need(**kw):
        missing = [f"--{k.replace('_', '-')}" for k, v in kw.items() if v is None]
        if missing:
            raise click.UsageError(f"--dataset {dataset} needs {' and '.join(missing)}")

    if dataset == "ml-100k":
        ds = data.prepare_ml100k(out, **opts)
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

# --- cfsrec + evaluate (issue 3) --------------------------------------------------------
@main.group()
def sasrec() -> None:
    """The CF-SRec teacher: SASRec (Kang & McAuley 2018) as LLM-SRec uses it."""


@sasrec.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder to create: model.safetensors, config.json, history.jsonl, "
                   "results.json.")
@click.option("--epochs", default=200, show_default=True, type=click.IntRange(min=1),
              help="Maximum epochs (paper: 200).")
@click.option("--patience", default=5, show_default=True, type=click.IntRange(min=1),
              help="Stop after this many validations without a better validation NDCG@10.")
@click.option("--eval-every", default=5, show_default=True, type=click.IntRange(min=1),
              help="Validate every this many epochs.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seeds initialisation, dropout, user order and sampled negatives.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1),
              help="Users per step.")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate (betas 0.9, 0.98).")
@click.option("--hidden", default=64, show_default=True, type=click.IntRange(min=1),
              help="Embedding / model width d.")
@click.option("--blocks", default=2, show_default=True, type=click.IntRange(min=1),
              help="Self-attention blocks.")
@click.option("--heads", default=1, show_default=True, type=click.IntRange(min=1),
              help="Attention heads.")
@click.option("--dropout", default=0.1, show_default=True,
              type=click.FloatRange(min=0, max=1, max_open=True), help="Dropout rate.")
@click.option("--maxlen", default=128, show_default=True, type=click.IntRange(min=1),
              help="Longest input window (the last MAXLEN items are kept).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def sasrec_train(data_dir, out, epochs, patience, eval_every, seed, batch_size, lr, hidden,
                 blocks, heads, dropout, maxlen, device, force) -> None:
    """Train SASRec on DATA; keep the best-on-validation checkpoint; test it once.

    \b
    BCE with one sampled negative per position on each user's training sequence
    (all but the last two items); validation NDCG@10 on the stored candidates every
    EVAL_EVERY epochs selects the checkpoint and drives early stopping.
    """
    from llmsrec.cfsrec import train_sasrec
    from llmsrec.data import load_prepared
    from llmsrec.evaluate.report import format_table

    ds = load_prepared(data_dir)
    resolve_device(device)  # fail on a bad --device before any work
    try:
        res = train_sasrec(ds, out, epochs=epochs, patience=patience, eval_every=eval_every,
                           seed=seed, batch_size=batch_size, lr=lr, device=device, hidden=hidden,
                           blocks=blocks, heads=heads, dropout=dropout, maxlen=maxlen, force=force)
    except ValueError as e:  # invalid model config (e.g. hidden not divisible by heads)
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {out}")
    click.echo(f"best epoch {res['best_epoch']} of {res['epochs_run']}"
               f"{' (early stop)' if res['stopped_early'] else ''}, {res['seconds']:.1f} s")
    click.echo(format_table({"sasrec": {"valid": res["valid"], "test": res["test"]}}))


# --model name -> "module:function(ds, checkpoint, device) -> {"valid": m, "test": m}"
_EVALUATORS = {
    "sasrec": "llmsrec.cfsrec:evaluate_sasrec",
    "llmsrec": "llmsrec.heads.train:evaluate_heads_checkpoint",  # + cache=--cache
}


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--model", "model_name", required=True, type=click.Choice(list(_EVALUATORS)),
              help="Which kind of checkpoint --checkpoint is.")
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (e.g. the --out of `llmsrec sasrec train`).")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None,
              help="JSON file to write [default: CHECKPOINT/evaluation.json].")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--cache", default=None, type=click.Path(dir_okay=False),
              help="llmsrec: the HDF5 cache to score [default: the one the heads were trained on].")
def evaluate(data_dir, model_name, checkpoint, out_json, device, cache) -> None:
    """NDCG@10/20 and HR@10/20 on validation and test (1 target + the stored negatives).

    Prints a markdown table and writes it as JSON:
    {"model", "checkpoint", "data", "data_digest", "valid": {...}, "test": {...}}.
    """
    import importlib
    from pathlib import Path

    from llmsrec.atomic import write_json
    from llmsrec.data import load_prepared
    from llmsrec.evaluate.report import format_table

    module, func = _EVALUATORS[model_name].split(":")
    evaluator = getattr(importlib.import_module(module), func)
    ds = load_prepared(data_dir)
    resolve_device(device)  # fail on a bad --device before any work
    if cache and model_name != "llmsrec":
        raise click.UsageError("--cache applies to --model llmsrec only")
    res = evaluator(ds, checkpoint, device=device, **({"cache": cache} if cache else {}))
    out_json = Path(out_json) if out_json else Path(checkpoint) / "evaluation.json"
    write_json(out_json, {"model": model_name, "checkpoint": str(checkpoint), "data": str(data_dir),
                          "data_digest": ds.digest, "valid": res["valid"], "test": res["test"]})
    click.echo(format_table({model_name: {"valid": res["valid"], "test": res["test"]}}))
    click.echo(f"wrote {out_json}")


# --- precompute (issue 4) ---------------------------------------------------------------
_VIEW_NAMES = ALL_VIEWS


def _parse_views(views: str) -> list[str]:
    """``--views`` "a,b,c" -> ["a", "b", "c"], each a known view (InputError otherwise)."""
    view_list = [v.strip() for v in views.split(",") if v.strip()]
    for v in view_list:
        if v not in _VIEW_NAMES:
            raise InputError(f"--views: unknown view {v!r} (expected {', '.join(_VIEW_NAMES)})")
    return view_list


# Options of the frozen-LLM forward, shared by `precompute` and `run`.
_LLM_OPTIONS = [
    click.option("--llm", default="smollm2-135m", show_default=True,
                 help="Frozen LLM: 'smollm2-135m' (bundled GGUF), a local Hugging Face folder, or "
                      "a model id already in the local HF cache (never downloaded)."),
    click.option("--history-window", default=10, show_default=True, type=click.IntRange(min=1),
                 help="Last W history items shown in a user prompt."),
    click.option("--batch-tokens", default=4096, show_default=True, type=click.IntRange(min=1),
                 help="Token budget of one padded batch (batch size x longest prompt)."),
    click.option("--device", default="cpu", show_default=True,
                 help="Device of the LLM forward: cpu, cuda[:N] or hpu."),
    click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                 help="Compute dtype of the LLM [default: fp32 on CPU, bf16 on GPU/HPU]."),
    click.option("--threads", default=None, type=click.IntRange(min=1),
                 help="torch CPU threads of the LLM forward [default: torch's choice]."),
    click.option("--fi", default="moment", show_default=True, type=click.Choice(["moment", "ridge"]),
                 help="Fixed f_I of cache mode. moment: PCA-whitened SASRec E laid on the top "
                      "principal axes of the token embeddings (keeps all of E); ridge: ridge fit "
                      "to each title's mean token embedding (loses most of E, see README)."),
]


def _llm_options(f):
    for opt in reversed(_LLM_OPTIONS):
        f = opt(f)
    return f


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--sasrec", "sasrec_dir", required=True, type=click.Path(file_okay=False),
              help="SASRec checkpoint folder (model.safetensors + config.json).")
@click.option("--out", "out_h5", required=True, type=click.Path(dir_okay=False),
              help="Cache file to create or extend (built as OUT.tmp, renamed when complete).")
@click.option("--views", default="train,valid,test,test-shuffled", show_default=True,
              help=f"Comma-separated user views to compute; any of {', '.join(_VIEW_NAMES)}.")
@click.option("--verb", default=None,
              help="Noun phrase of the prompt, e.g. 'purchases' or 'watched movies' "
                   "[default: by dataset].")
@click.option("--chunk-prompts", default=64, show_default=True, type=click.IntRange(min=1),
              help="Prompts per resumable chunk (a killed run redoes at most one chunk).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the shuffled views' permutations.")
@click.option("--max-users", default=None, type=click.IntRange(min=1),
              help="Only users 1..N get user prompts (quick runs); recorded in the cache.")
@_llm_options
@click.option("--trust-remote-code", is_flag=True,
              help="Allow a local model folder's own Python code (off by default).")
@click.option("--force", is_flag=True,
              help="Rebuild even if OUT exists with a different provenance.")
def precompute(data_dir, sasrec_dir, llm, out_h5, views, history_window, verb, batch_tokens,
               chunk_prompts, device, dtype, seed, max_users, threads, fi, trust_remote_code,
               force) -> None:
    """Run every item prompt and user prompt through the frozen LLM once -> HDF5 cache.

    Stores the last-layer state at [UserOut] per user and view, at [ItemOut] per item,
    SASRec O_u and E beside them, and the fixed f_I / token vectors. A killed run resumes
    where it stopped; asking for more views later adds them to the same file.
    """
    from llmsrec.precompute import precompute as run_precompute

    view_list = _parse_views(views)
    run_precompute(data_dir, sasrec_dir, out_h5, llm=llm, views=view_list,
                   history_window=history_window, verb=verb, batch_tokens=batch_tokens,
                   chunk_prompts=chunk_prompts, device=device, dtype=dtype, seed=seed,
                   force=force, max_users=max_users, num_threads=threads, fi=fi,
                   trust_remote_code=trust_remote_code)


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder.")
@click.option("--user", "uid", default=None, type=int, help="Internal user id (1..U).")
@click.option("--item", "iid", default=None, type=int, help="Internal item id (1..N).")
@click.option("--view", default="test", show_default=True, type=click.Choice(_VIEW_NAMES),
              help="User view whose prompt is printed.")
@click.option("--history-window", default=10, show_default=True, type=click.IntRange(min=1),
              help="Last W history items shown.")
@click.option("--verb", default=None, help="Noun phrase [default: by dataset].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the shuffled views' permutations.")
def prompts(data_dir, uid, iid, view, history_window, verb, seed) -> None:
    """Print the exact prompt text the LLM reads for a user (or an item).

    Each [HistoryEmb] is replaced by f_I(E_i) of the item listed after the prompt.
    """
    from llmsrec.data import load_prepared
    from llmsrec.precompute.prompts import TEMPLATE_VERSION, build_view, item_prompt

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

# --- heads + run (issue 5) --------------------------------------------------------------
def _negatives_type(value):
    if value is None or value == "all":
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise InputError(f"--train-negatives: expected a positive integer or 'all', got {value!r}")
    return n


_HEAD_OPTIONS = [
    click.option("--paper-settings", is_flag=True,
                 help="The paper's head schedule: 3 sampled negatives, 10 epochs, patience 10 "
                      "(overrides --train-negatives, --epochs, --patience)."),
    click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1),
                 help="Maximum epochs of the heads (one sample per user per epoch; paper: 10)."),
    click.option("--batch-size", default=20, show_default=True, type=click.IntRange(min=1),
                 help="Users per step (paper: 20)."),
    click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="Adam learning rate (paper: 1e-4)."),
    click.option("--beta1", default=0.9, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                 help="Adam beta1."),
    click.option("--beta2", default=0.98, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                 help="Adam beta2 (authors' code: 0.98)."),
    click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(min=0),
                 help="Adam L2 weight decay."),
    click.option("--lr-decay", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                 help="Multiply the lr by this after every validation (authors' code: 0.95)."),
    click.option("--train-negatives", default="all", show_default=True,
                 help="Negatives per user in Eq. 1: 'all' = softmax over the whole catalogue "
                      "minus the history (chosen on ml-100k validation), or a count of sampled "
                      "ones (authors' code and paper setting: 3; never history or target)."),
    click.option("--evals-per-epoch", default=10, show_default=True, type=click.IntRange(min=1),
                 help="Validations per epoch (paper: every tenth of an epoch)."),
    click.option("--patience", default=20, show_default=True, type=click.IntRange(min=1),
                 help="Early stop after this many validations without improvement (paper: 10)."),
    click.option("--select-metric", default="NDCG@10", show_default=True,
                 type=click.Choice(["NDCG@10", "HR@10", "NDCG@20", "HR@20"]),
                 help="Validation metric that selects the heads."),
    click.option("--hidden", default=2048, show_default=True, type=click.IntRange(min=1),
                 help="Inner width of f_user / f_item."),
    click.option("--d-out", default=128, show_default=True, type=click.IntRange(min=1),
                 help="Output width d' of all heads."),
    click.option("--cf-hidden", default=128, show_default=True, type=click.IntRange(min=1),
                 help="Inner width of f_CF-user."),
    click.option("--distill", default="mse", show_default=True, type=click.Choice(["mse", "contrastive"]),
                 help="Distillation loss: mse (Eq. 2) or contrastive (Eq. 10, Appendix F.3)."),
    click.option("--no-distill", is_flag=True, help="Drop L_Distill (Table 7 ablations)."),
    click.option("--no-uniform", is_flag=True, help="Drop L_Uniform (Table 7 ablations)."),
    click.option("--retrieval-weight", default=1.0, show_default=True, type=float, help="Weight of Eq. 1."),
    click.option("--distill-weight", default=1.0, show_default=True, type=float, help="Weight of Eq. 2 / 10."),
    click.option("--uniform-weight", default=1.0, show_default=True, type=float, help="Weight of Eq. 3."),
    click.option("--contrastive-temperature", default=1.0, show_default=True,
                 type=click.FloatRange(min=0, min_open=True), help="Temperature of Eq. 10."),
]


def _head_options(f):
    for opt in reversed(_HEAD_OPTIONS):
        f = opt(f)
    return f


def _head_kwargs(kw: dict) -> dict:
    """Pop the head options out of a command's kwargs into TrainConfig fields."""
    names = ["epochs", "batch_size", "lr", "beta1", "beta2", "weight_decay", "lr_decay", "evals_per_epoch",
             "patience", "select_metric", "hidden", "d_out", "cf_hidden", "retrieval_weight",
             "distill_weight", "uniform_weight", "contrastive_temperature"]
    out = {n: kw.pop(n) for n in names}
    out["train_negatives"] = _negatives_type(kw.pop("train_negatives"))
    distill, no_distill, no_uniform = kw.pop("distill"), kw.pop("no_distill"), kw.pop("no_uniform")
    out["distill"] = "none" if no_distill else distill
    out["uniform"] = not no_uniform
    if kw.pop("paper_settings"):
        out.update(train_negatives=3, epochs=10, patience=10)
    return out


def _print_heads_result(res: dict) -> None:
    from llmsrec.evaluate.report import format_table

    b = res["best"]
    click.echo(f"selected validation {b['validation']} (step {b['step']}, epoch {b['epoch']}) of "
               f"{res['steps']} steps{' (early stop)' if res['stopped_early'] else ''}, "
               f"{res['train_seconds']:.1f} s")
    rows = {"LLM-SRec": {k: res[k] for k in ("valid", "test", "valid-shuffled", "test-shuffled") if k in res}}
    click.echo(format_table(rows))


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (from `llmsrec prepare`).")
@click.option("--cache", required=True, type=click.Path(dir_okay=False),
              help="HDF5 cache from `llmsrec precompute` for the same dataset.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to create: heads.safetensors, heads_config.json, history.jsonl, "
                   "training_curve.png, results.json.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seeds head initialisation, user order and training negatives.")
@_head_options
@click.option("--no-progress", is_flag=True, help="Hide the per-epoch progress bar.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def train(data_dir, cache, out, seed, no_progress, force, **kw) -> None:
    """Train the LLM-SRec heads on cached LLM states (Eq. 1-4) and test the best once.

    \b
    Reads the cache into memory once; Adam, batch of users, validation NDCG@10 on the
    stored candidates every tenth of an epoch, early stopping, best-on-validation heads
    kept; test evaluated once on them.
    """
    from llmsrec.data import load_prepared
    from llmsrec.heads.train import train_heads

    opts = _head_kwargs(kw)
    ds = load_prepared(data_dir)
    res = train_heads(ds, cache, out, force=force, progress=not no_progress, seed=seed, **opts)
    click.echo(f"wrote {out}")
    _print_heads_result(res)


@main.command()
@click.option("--dataset", default="ml-100k", show_default=True,
              type=click.Choice(["ml-100k", "atomic", "amazon2023"]),
              help="As `llmsrec prepare --dataset`.")
@click.option("--inter", type=click.Path(dir_okay=False), help="atomic: the .inter file.")
@click.option("--item", type=click.Path(dir_okay=False), help="atomic: the .item file (titles).")
@click.option("--title-field", default=None, help="atomic: title field of the .item file.")
@click.option("--reviews", type=click.Path(dir_okay=False), help="amazon2023: reviews .jsonl[.gz].")
@click.option("--meta", type=click.Path(dir_okay=False), help="amazon2023: metadata .jsonl[.gz].")
@click.option("--kcore", default=5, show_default=True, type=int, help="Iterative k-core.")
@click.option("--num-negatives", default=99, show_default=True, type=int,
              help="Stored negatives per user for validation and for test.")
@click.option("--max-users", default=None, type=click.IntRange(min=1),
              help="Seeded sample of N users before the k-core filter (quick runs) [default: all].")
@click.option("--skip-bad-lines", is_flag=True, help="Count malformed lines instead of failing.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="One seed for every stage.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run folder [default: runs/DATASET].")
@click.option("--sasrec-epochs", default=200, show_default=True, type=click.IntRange(min=1),
              help="SASRec maximum epochs.")
@click.option("--sasrec-patience", default=5, show_default=True, type=click.IntRange(min=1),
              help="SASRec early-stopping patience (validations).")
@click.option("--sasrec-eval-every", default=5, show_default=True, type=click.IntRange(min=1),
              help="SASRec validation interval (epochs).")
@click.option("--views", default="train,valid,test", show_default=True,
              help="User views to precompute (add test-shuffled for the shuffled-inference "
                   "analysis; it is then reported too).")
@_llm_options
@_head_options
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--force", is_flag=True, help="Rebuild every stage.")
def run(dataset, inter, item, title_field, reviews, meta, kcore, num_negatives, max_users, skip_bad_lines,
        seed, llm, out, sasrec_epochs, sasrec_patience, sasrec_eval_every, views, history_window,
        batch_tokens, device, dtype, threads, fi, no_progress, force, **kw) -> None:
    """prepare -> SASRec -> precompute -> train -> evaluate, reusing unchanged stages.

    \b
    Each stage lives in its own subfolder of OUT with a stage.json (options + input
    digests); a rerun reuses every stage whose inputs and options are unchanged, so
    changing only a head option retrains the heads in seconds. Writes OUT/results.json
    and OUT/results.md and prints SASRec next to LLM-SRec.
    """
    from llmsrec.pipeline import format_results_md, run_pipeline
    resolve_device(device)  # fail on a bad --device before any work

    head = _head_kwargs(kw)
    view_list = _parse_views(views)
    for v in ("train", "valid", "test"):
        if v not in view_list:
            raise InputError(f"--views: {v} is required by `run`")
    if dataset == "atomic" and not (inter and item):
        raise click.UsageError("--dataset atomic needs --inter and --item")
    if dataset == "amazon2023" and not (reviews and meta):
        raise click.UsageError("--dataset amazon2023 needs --reviews and --meta")
    files = {"inter": inter, "item": item, "title_field": title_field} if dataset == "atomic" else \
        {"reviews": reviews, "meta": meta} if dataset == "amazon2023" else {}
    res = run_pipeline(
        out or f"runs/{dataset}", dataset=dataset, files=files,
        data_opts=dict(kcore=kcore, num_negatives=num_negatives, max_users=max_users,
                       skip_bad_lines=skip_bad_lines),
        llm=llm,
        sasrec_opts=dict(epochs=sasrec_epochs, patience=sasrec_patience, eval_every=sasrec_eval_every),
        precompute_opts=dict(views=view_list, history_window=history_window, batch_tokens=batch_tokens,
                             device=device, dtype=dtype, threads=threads, fi=fi),
        head_opts=head, seed=seed, force=force, progress=not no_progress,
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(format_results_md(res))
    click.echo(f"wrote {out or f'runs/{dataset}'}/results.json and results.md")



# --- analyses (issue 6) -----------------------------------------------------------------
@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A run folder written by `llmsrec run` (data/, sasrec/, cache/, heads/).")
@click.option("--only", default=None,
              help="Comma-separated subset of: shuffled-inference, shuffled-training, similarity, "
                   "ablations, transition, warm-cold, over-smoothing, distillation, case-studies "
                   "[default: all nine].")
@click.option("--seeds", default=None,
              help="Model seeds, e.g. 0,1,2: numbers become mean ± std over them [default: the run's seed].")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Report folder [default: RUN/report].")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def analyze(run_dir, only, seeds, out, no_progress) -> None:
    """Sequence-understanding analyses of the paper on a run, gathered in report.md.

    \b
    Writes OUT/report.md, one <analysis>.json + .md each, and fig_*.png:
      shuffled-inference  test metrics on original vs shuffled test sequences (Fig. 1b)
      shuffled-training   models trained on shuffled sequences, tested on original (Table 3)
      similarity          cosine(original, shuffled) user representations (Table 5)
      ablations           w/o L_Distill+L_Uniform, w/o L_Uniform, full (Table 7)
      transition          transition vs non-transition users by t-score (Fig. 3)
      warm-cold           users with a warm vs cold test target (Fig. 4)
      over-smoothing      mean pairwise distance of user representations (Table 13)
      distillation        MSE vs contrastive distillation (Table 12)
      case-studies        users where SASRec and LLM-SRec disagree (Fig. 6)

    The frozen LLM runs only to add a missing cached view (train-shuffled) to the run's
    cache; head variants train on cached states in seconds; extra SASRec models (other
    seeds, shuffled training) train once and are kept under OUT/models for reruns.
    """
    from llmsrec.evaluate.analyze import analyze_run

    out = out or f"{run_dir}/report"
    docs = analyze_run(run_dir, out, only=only, seeds=seeds, progress=not no_progress,
                       log=lambda m: click.echo(m, err=True))
    for d in docs.values():
        click.echo(f"- {d['title']}: {d['interpretation']}")
    click.echo(f"wrote {out}/report.md")

if __name__ == "__main__":
    main()
