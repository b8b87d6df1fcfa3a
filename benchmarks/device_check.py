"""One-command accelerator check (``make device-check``): precompute and heads on a GPU vs the CPU.

On a small MovieLens-100k slice (``llmsrec prepare --max-users N``, default 200 users) it
runs the repository's own stages:

1. a short SASRec teacher on the CPU (the same teacher for every run below);
2. the reference: ``precompute`` on the CPU in fp32 (views valid and test, the default
   prefix samples and readout layers of ``llmsrec precompute``);
3. ``precompute`` on the device in fp32 and in bf16, each into its own cache;
4. the heads (``llmsrec train`` defaults, fewer epochs) on the CPU on the reference cache,
   and on the device on the reference cache, on the device's fp32 cache and on its bf16
   cache (head seed 0 everywhere);

then compares every float dataset of each device cache with the reference (relative L2
error of each state vector, ``||device - cpu|| / ||cpu||``, its max and mean over the
vectors of the dataset) and the heads' test NDCG@10, prints real tokens/s of each
precompute, the device memory peak (``torch.cuda.max_memory_allocated``) and pass/fail,
and exits 1 when a difference is beyond its tolerance (``TOLERANCES``, shown by
``--help``).

Without CUDA it says so in one line and exits 0. ``--device hpu`` (Gaudi) runs the same
check on an HPU. ``--device cpu`` is the self-test: the CPU stands in for the
accelerator on a tiny slice (default 20 users, history window 3, 2 head epochs), so the
whole comparison path runs on any machine (fp32 then agrees exactly; bf16 shows the CPU's
own bf16 drift).

The report (the printed lines) is also written as JSON and markdown to
``benchmarks/results/device-check-<device name>.{json,md}`` when run on an accelerator,
or to ``--out DIR`` when given. Intermediate files go to a temporary folder (``--workdir``
keeps them).

Run alone: ``python benchmarks/device_check.py [--device cuda|hpu|cpu] [--users N]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Pass/fail limits. States: relative L2 error of each cached vector vs the CPU fp32 cache,
#: the max and the mean over each dataset's vectors (rows, layers and slots; all-zero
#: padding vectors excluded, and a vector zero on one side only counts as a failure).
#: fp32: the same float32 model, so only the summation order differs (other kernels, other
#: blocking); float32 rounding (eps 1.2e-7) carried through 30 layers stays near 1e-5, and
#: two CPU process layouts already differ by ~1e-5 (docs/distributed.md): mean 1e-4, max
#: 1e-3. bf16: bf16 keeps 8 mantissa bits (eps 7.8e-3); the CPU's bf16 [UserOut] states
#: are 2.1% (mean) / 5.3% (max) from fp32 on 256 ml-100k prompts (docs/results/speed.md),
#: so about twice that: mean 0.05, max 0.15 (intermediate layers and slot states
#: included). Heads: test NDCG@10 of heads trained on the device vs on the CPU, both
#: seeded; GPU kernels are not bitwise deterministic and Adam carries a rounding
#: difference through every step, like one vs two CPU processes (0.0024 apart on 943
#: users, docs/distributed.md). On 200 users one target moving one rank near the top
#: moves NDCG@10 by ~0.002, so the spread is a few thousandths: 0.02 allows that and still
#: catches a broken device path (untrained heads score far lower).
TOLERANCES = {
    "fp32_max": 1e-3,
    "fp32_mean": 1e-4,
    "bf16_max": 0.15,
    "bf16_mean": 0.05,
    "ndcg10": 0.02,
}

#: the 8-minute budget of the check on one GPU, model loading included (reported, not gated)
BUDGET_S = 480

_SUMMARY = re.compile(r"(\d+) prompts, (\d+) real tokens, padding ([\d.]+)%, wall ([\d.]+) s")


# --- comparison (pure functions on arrays and cache files) ----------------------------------


def vector_errors(ref: np.ndarray, other: np.ndarray) -> dict:
    """Relative L2 error of each vector of ``other`` vs ``ref`` along the last axis.

    Args:
        ref, other: float arrays of the same shape (..., H); any float dtype (computed in
            float64).
    Returns:
        ``{"max", "mean"}`` of ``||other - ref|| / ||ref||`` over the vectors whose
        reference is non-zero (both 0.0 when there are none), ``"vectors"``: how many
        were compared, ``"zero_mismatch"``: vectors zero in one array and not in the
        other (padding rows/slots must agree), ``"nonfinite"``: vectors of ``other``
        with NaN or inf.
    Raises:
        ValueError: the shapes differ.
    """
    if ref.shape != other.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {other.shape}")
    h = ref.shape[-1] if ref.ndim else 1
    a = np.asarray(ref, np.float64).reshape(-1, h)
    b = np.asarray(other, np.float64).reshape(-1, h)
    finite = np.isfinite(b).all(axis=1)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(np.where(np.isfinite(b), b, 0.0), axis=1)
    live = na > 0
    rel = np.linalg.norm(a[live] - b[live], axis=1) / na[live]
    rel[~finite[live]] = np.inf
    return {"max": float(rel.max()) if rel.size else 0.0,
            "mean": float(rel.mean()) if rel.size else 0.0,
            "vectors": int(live.sum()),
            "zero_mismatch": int(((na == 0) != (nb == 0)).sum()),
            "nonfinite": int((~finite).sum())}


def float_datasets(path: str | os.PathLike) -> list[str]:
    """Names of the float state datasets under ``/items`` and ``/users`` of a cache, sorted.

    Those are the frozen LLM's states (``hidden``, ``out_layers``, ``slots``) and the
    teacher's ``cf`` vectors (see docs/cache-schema.md)."""
    import h5py

    names: list[str] = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" and obj.ndim >= 2:
                names.append(name)
        for top in ("items", "users"):
            if top in f:
                f[top].visititems(lambda n, o, top=top: visit(f"{top}/{n}", o))
    return sorted(names)


def compare_caches(ref_path, other_path) -> dict:
    """Per-dataset :func:`vector_errors` of cache ``other_path`` vs cache ``ref_path``.

    Returns:
        ``{dataset name: errors}`` for every float state dataset of the reference, plus
        ``"all"``: the max of the maxima, the mean over all compared vectors, and the
        summed counts.
    Raises:
        ValueError: a dataset of the reference is missing from ``other_path`` or has
            another shape.
    """
    import h5py

    out: dict[str, dict] = {}
    with h5py.File(ref_path, "r") as a, h5py.File(other_path, "r") as b:
        for name in float_datasets(ref_path):
            if name not in b:
                raise ValueError(f"{other_path}: no dataset {name} (the reference has it)")
            out[name] = vector_errors(a[name][()], b[name][()])
    n = sum(e["vectors"] for e in out.values())
    out["all"] = {"max": max((e["max"] for e in out.values()), default=0.0),
                  "mean": sum(e["mean"] * e["vectors"] for e in out.values()) / n if n else 0.0,
                  "vectors": n,
                  "zero_mismatch": sum(e["zero_mismatch"] for e in out.values()),
                  "nonfinite": sum(e["nonfinite"] for e in out.values())}
    return out


def run_checks(states: dict, heads: dict, tol: dict = TOLERANCES) -> list[dict]:
    """The pass/fail checks of a report.

    Args:
        states: ``{"fp32": compare_caches(...), "bf16": ...}`` (either may be absent).
        heads: ``{run name: {"test_ndcg10": float, ...}}`` with the reference run
            ``"cpu heads, cpu fp32 cache"``; every other run is compared with it.
        tol: the limits (:data:`TOLERANCES` keys).
    Returns:
        One dict per check: ``name``, ``value``, ``tolerance``, ``ok``.
    """
    checks = []
    for dtype, errs in states.items():
        a = errs["all"]
        checks.append({"name": f"{dtype} states: max relative error", "value": a["max"],
                       "tolerance": tol[f"{dtype}_max"], "ok": a["max"] <= tol[f"{dtype}_max"]})
        checks.append({"name": f"{dtype} states: mean relative error", "value": a["mean"],
                       "tolerance": tol[f"{dtype}_mean"], "ok": a["mean"] <= tol[f"{dtype}_mean"]})
        bad = a["zero_mismatch"] + a["nonfinite"]
        checks.append({"name": f"{dtype} states: zero-pattern / non-finite vectors", "value": bad,
                       "tolerance": 0, "ok": bad == 0})
    ref = heads.get(REF_HEADS)
    for name, r in heads.items():
        if name == REF_HEADS or ref is None:
            continue
        d = abs(r["test_ndcg10"] - ref["test_ndcg10"])
        checks.append({"name": f"test NDCG@10 |{name} - {REF_HEADS}|", "value": d,
                       "tolerance": tol["ndcg10"], "ok": bool(d <= tol["ndcg10"])})
    return checks


REF_HEADS = "cpu heads, cpu fp32 cache"


def parse_summary(lines: list[str]) -> dict | None:
    """The precompute summary line (``llmsrec.precompute.job.summary``) among ``lines``, parsed:
    ``prompts``, ``real_tokens``, ``padding`` (fraction), ``forward_s``, ``tokens_per_s``;
    None when there is none."""
    for line in reversed(lines):
        m = _SUMMARY.search(line)
        if m:
            prompts, real, pad, wall = m.groups()
            wall = max(float(wall), 1e-9)
            return {"prompts": int(prompts), "real_tokens": int(real), "padding": float(pad) / 100,
                    "forward_s": float(wall), "tokens_per_s": int(real) / wall}
    return None


# --- the stages ------------------------------------------------------------------------------


class Device:
    """The checked device: its torch name, a file-name-safe label and its memory counters."""

    def __init__(self, name: str):
        self.name = name
        self.kind = name.split(":")[0]
        #: how reports name the device's runs (the self-test's stand-in is "cpu-as-device")
        self.tag = "cpu-as-device" if self.kind == "cpu" else self.kind

    def label(self) -> str:
        """``cpu`` or the accelerator's model name as lower-case words joined by ``-``
        (e.g. ``nvidia-h200``): no host name, so results of machines of one kind share it."""
        import torch

        if self.kind == "cuda":
            raw = torch.cuda.get_device_name(torch.device(self.name))
        elif self.kind == "hpu":
            raw = getattr(getattr(torch, "hpu", None), "get_device_name", lambda: "gaudi")()
        else:
            raw = "cpu-selftest"
        return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-") or self.kind

    def reset_peak(self) -> None:
        import torch

        gc.collect()  # the previous stage's model, so that the peak is this stage's alone
        if self.kind == "cuda":
            torch.cuda.synchronize(self.name)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.name)
        elif self.kind == "hpu" and hasattr(getattr(torch, "hpu", None), "reset_peak_memory_stats"):
            torch.hpu.reset_peak_memory_stats()

    def peak(self) -> int | None:
        """Bytes of device memory allocated at the peak since :meth:`reset_peak` (None on CPU)."""
        import torch

        if self.kind == "cuda":
            return int(torch.cuda.max_memory_allocated(self.name))
        if self.kind == "hpu" and hasattr(getattr(torch, "hpu", None), "max_memory_allocated"):
            return int(torch.hpu.max_memory_allocated())
        return None


def _timed_precompute(ds, sasrec, cache, dev: Device, device: str, dtype: str, args) -> dict:
    from llmsrec.defaults import LLMSREC_HEADS
    from llmsrec.precompute import precompute

    lines: list[str] = []
    dev.reset_peak()
    t = time.perf_counter()
    precompute(ds, sasrec, cache, llm=args.llm, views=("valid", "test"), history_window=args.history_window,
               device=device, dtype=dtype, max_users=None, readout_layers="auto",
               prefixes=LLMSREC_HEADS["prefixes"], progress=False, log=lines.append,
               num_threads=args.threads)
    total = time.perf_counter() - t
    res = parse_summary(lines) or {}
    res.update(total_s=total, peak_bytes=dev.peak() if device != "cpu" else None)
    return res


def _timed_heads(ds, cache, out, dev: Device, device: str, args) -> dict:
    from llmsrec.defaults import LLMSREC_HEADS
    from llmsrec.heads.train import train_heads

    dev.reset_peak()
    t = time.perf_counter()
    res = train_heads(ds, cache, out, device=device, progress=False, seed=0, epochs=args.heads_epochs, force=True,
                      **LLMSREC_HEADS)
    return {"test_ndcg10": float(res["test"]["NDCG@10"]), "valid_ndcg10": float(res["valid"]["NDCG@10"]),
            "total_s": time.perf_counter() - t, "peak_bytes": dev.peak() if device != "cpu" else None}


def device_check(args, work: Path, say=print) -> dict:
    """Run every stage in ``work`` and return the report (see the module docstring)."""
    import torch

    from llmsrec.cfsrec import train_sasrec
    from llmsrec.data.loaders import prepare_ml100k

    dev = Device(args.device)
    t0 = time.perf_counter()
    ds = prepare_ml100k(work / "data", max_users=args.users, num_negatives=args.negatives, force=True)
    say(f"device-check: {dev.name} ({dev.label()}), torch {torch.__version__}; ml-100k slice of "
        f"{ds.n_users} users / {ds.n_items} items, history window {args.history_window}, {args.llm}")
    res = train_sasrec(ds, work / "sasrec", epochs=args.sasrec_epochs, eval_every=min(5, args.sasrec_epochs),
                       device="cpu", seed=0, force=True, progress=False)
    say(f"  SASRec teacher on the CPU: {args.sasrec_epochs} epochs, test NDCG@10 {res['test']['NDCG@10']:.4f}")
    pre = {}
    caches = {"reference": work / "cpu-fp32.h5", "fp32": work / "dev-fp32.h5", "bf16": work / "dev-bf16.h5"}
    for mode, device, dtype in (("reference", "cpu", "fp32"), ("fp32", dev.name, "fp32"),
                                ("bf16", dev.name, "bf16")):
        pre[mode] = _timed_precompute(ds, work / "sasrec", caches[mode], dev, device, dtype, args)
        say(f"  precompute {_mode_name(mode, dev)}: {_pre_line(pre[mode])}")
    states = {m: compare_caches(caches["reference"], caches[m]) for m in ("fp32", "bf16")}
    for m, errs in states.items():
        a = errs["all"]
        say(f"  {m} states vs cpu fp32: relative L2 max {a['max']:.3g}, mean {a['mean']:.3g} "
            f"over {a['vectors']} vectors ({len(errs) - 1} datasets)")
    heads = {}
    for name, device, cache in ((REF_HEADS, "cpu", "reference"),
                                (f"{dev.tag} heads, cpu fp32 cache", dev.name, "reference"),
                                (f"{dev.tag} heads, {dev.tag} fp32 cache", dev.name, "fp32"),
                                (f"{dev.tag} heads, {dev.tag} bf16 cache", dev.name, "bf16")):
        heads[name] = _timed_heads(ds, caches[cache], work / f"heads-{len(heads)}", dev, device, args)
        h = heads[name]
        say(f"  heads ({name}): test NDCG@10 {h['test_ndcg10']:.4f}, valid {h['valid_ndcg10']:.4f}, "
            f"{h['total_s']:.1f} s{_peak(h['peak_bytes'])}")
    checks = run_checks(states, heads)
    wall = time.perf_counter() - t0
    return {"device": dev.name, "device_label": dev.label(), "torch": torch.__version__, "llm": args.llm,
            "slice": {"dataset": "ml-100k", "max_users": args.users, "users": ds.n_users, "items": ds.n_items,
                      "negatives": args.negatives, "history_window": args.history_window,
                      "views": ["valid", "test", "train-prefix"],
                      "sasrec_epochs": args.sasrec_epochs, "heads_epochs": args.heads_epochs},
            "tolerances": TOLERANCES, "precompute": pre, "states": states, "heads": heads, "checks": checks,
            "passed": all(c["ok"] for c in checks), "wall_s": wall, "budget_s": BUDGET_S}


def _mode_name(mode: str, dev: Device) -> str:
    return "cpu fp32 (reference)" if mode == "reference" else f"{dev.tag} {mode}"


def _peak(b: int | None) -> str:
    return "" if b is None else f", peak {b / 2**20:.0f} MiB"


def _pre_line(p: dict) -> str:
    if "tokens_per_s" not in p:
        return f"{p['total_s']:.1f} s with loading{_peak(p['peak_bytes'])}"
    return (f"{p['tokens_per_s']:.0f} real tokens/s ({p['real_tokens']} tokens, {p['prompts']} prompts, "
            f"forward {p['forward_s']:.1f} s, {p['total_s']:.1f} s with loading){_peak(p['peak_bytes'])}")


def format_markdown(rep: dict) -> str:
    """The report as a markdown page (what ``benchmarks/results/device-check-*.md`` holds)."""
    s = rep["slice"]
    dev = Device(rep["device"])
    lines = [f"# device-check: {rep['device_label']} ({rep['device']})", "",
             f"torch {rep['torch']}, {rep['llm']}; ml-100k slice (`prepare --max-users {s['max_users']}`): "
             f"{s['users']} users, {s['items']} items, {s['negatives']} negatives, history window "
             f"{s['history_window']}, views "
             f"{', '.join(s['views'])}; SASRec {s['sasrec_epochs']} epochs on the CPU, heads "
             f"{s['heads_epochs']} epochs (seed 0). Wall {rep['wall_s']:.0f} s (budget {rep['budget_s']} s, "
             f"model loading included). Result: **{'PASS' if rep['passed'] else 'FAIL'}**.", "",
             "| precompute | real tokens/s | tokens | forward s | with loading s | peak memory MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode, p in rep["precompute"].items():
        peak = "" if p.get("peak_bytes") is None else f"{p['peak_bytes'] / 2**20:.0f}"
        lines.append(f"| {_mode_name(mode, dev)} | {p.get('tokens_per_s', 0):.0f} | {p.get('real_tokens', 0)} | "
                     f"{p.get('forward_s', 0):.1f} | {p['total_s']:.1f} | {peak} |")
    lines += ["", "| states vs cpu fp32 (relative L2 per vector) | max | mean | vectors |", "|---|---:|---:|---:|"]
    for mode, errs in rep["states"].items():
        for name, e in errs.items():
            lines.append(f"| {mode} {name} | {e['max']:.3g} | {e['mean']:.3g} | {e['vectors']} |")
    lines += ["", "| heads | test NDCG@10 | valid NDCG@10 | s | peak memory MiB |", "|---|---:|---:|---:|---:|"]
    for name, h in rep["heads"].items():
        peak = "" if h.get("peak_bytes") is None else f"{h['peak_bytes'] / 2**20:.0f}"
        lines.append(f"| {name} | {h['test_ndcg10']:.4f} | {h['valid_ndcg10']:.4f} | {h['total_s']:.1f} | {peak} |")
    lines += ["", "| check | value | tolerance | result |", "|---|---:|---:|---|"]
    for c in rep["checks"]:
        lines.append(f"| {c['name']} | {c['value']:.3g} | {c['tolerance']:g} | {'ok' if c['ok'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def _unavailable(device: str) -> str | None:
    """One line saying why ``device`` cannot be checked here, or None when it can."""
    import torch

    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "hpu"):
        return f"device-check: --device {device}: expected cuda, cuda:N, hpu or cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        return (f"device-check: CUDA is not available (torch {torch.__version__}); nothing to check "
                f"(--device cpu runs the self-test, --device hpu checks a Gaudi)")
    if kind == "hpu":
        from llmsrec.devices import prepare_hpu
        from llmsrec.errors import InputError

        try:
            prepare_hpu()
        except InputError as e:
            return f"device-check: {e}"
    return None


def _parser() -> argparse.ArgumentParser:
    tol = TOLERANCES
    ap = argparse.ArgumentParser(
        prog="device_check.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(f"tolerances (exit 1 beyond any): cached states vs CPU fp32, relative L2 error per vector: "
                f"fp32 max {tol['fp32_max']:g} / mean {tol['fp32_mean']:g} (float32 summation order only); "
                f"bf16 max {tol['bf16_max']:g} / mean {tol['bf16_mean']:g} (about twice the CPU's own bf16 drift, "
                f"5.3% max / 2.1% mean); test NDCG@10 of heads trained on the device vs on the CPU: "
                f"|difference| <= {tol['ndcg10']:g} (seeded heads; GPU kernels are not bitwise deterministic). "
                f"Without CUDA (and without --device) it prints one line and exits 0."))
    ap.add_argument("--device", default="cuda", help="cuda[:N] (default), hpu (Gaudi), or cpu (self-test)")
    ap.add_argument("--users", type=int, default=None, help="--max-users of the ml-100k slice [200; cpu: 20]")
    ap.add_argument("--negatives", type=int, default=None,
                    help="stored test/valid negatives per user (prepare --num-negatives) [99; cpu: 5]")
    ap.add_argument("--history-window", type=int, default=None, help="W of the prompts [10; cpu: 3]")
    ap.add_argument("--sasrec-epochs", type=int, default=None, help="SASRec teacher epochs on the CPU [20; cpu: 2]")
    ap.add_argument("--heads-epochs", type=int, default=None, help="heads epochs [10; cpu: 2]")
    ap.add_argument("--llm", default="smollm2-135m", help="frozen LLM (as llmsrec precompute --llm)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's choice]")
    ap.add_argument("--out", default=None,
                    help="folder of the JSON + markdown report [benchmarks/results on an accelerator; "
                         "none with --device cpu]")
    ap.add_argument("--workdir", default=None, help="keep the intermediate files here [a temporary folder]")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the check, print and write the report; the exit status."""
    args = _parser().parse_args(argv)
    selftest = args.device == "cpu"
    for name, full, small in (("users", 200, 20), ("history_window", 10, 3), ("sasrec_epochs", 20, 2),
                              ("heads_epochs", 10, 2), ("negatives", 99, 5)):
        if getattr(args, name) is None:
            setattr(args, name, small if selftest else full)
    why = _unavailable(args.device)
    if why is not None:
        print(why)
        return 0 if args.device.split(":")[0] == "cuda" else 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rep = device_check(args, work)
    for c in rep["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['value']:.3g} (tolerance {c['tolerance']:g})")
    print(f"device-check: {'PASS' if rep['passed'] else 'FAIL'} in {rep['wall_s']:.0f} s "
          f"(budget {BUDGET_S} s{'' if rep['wall_s'] <= BUDGET_S else ': OVER'})")
    out = args.out or (None if selftest else str(Path(__file__).resolve().parent / "results"))
    if out:
        base = Path(out) / f"device-check-{rep['device_label']}"
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(rep, indent=1) + "\n")
        base.with_suffix(".md").write_text(format_markdown(rep))
        print(f"wrote {base}.json and {base}.md")
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
