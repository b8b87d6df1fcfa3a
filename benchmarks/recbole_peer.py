"""Peer check: RecBole 1.2.1's own SASRec and GRU4Rec on exactly our split and candidates.

    .venv/bin/python benchmarks/recbole_peer.py --data runs/demo/data --ours runs/compare/compare.json

1. Makes a throwaway venv (default ``/tmp/recbole-venv``) that reuses this project's torch,
   numpy and llmsrec through a ``.pth`` file, and pip-installs ``recbole==1.2.1`` (no deps)
   plus what its training path imports (pandas, scikit-learn, tensorboard, colorlog,
   colorama, texttable). Nothing is installed into the project's ``.venv``; RecBole is not a
   dependency of llmsrec. The script then re-runs itself with that venv's python.
2. Exports our prepared dataset as RecBole atomic files: one ``.inter`` row per
   interaction, ``timestamp`` = the position in the user's sequence, so RecBole's
   leave-one-out split (``LS: valid_and_test``, order ``TO``) gives exactly our split:
   training sequence ``seq[:-2]``, validation target ``seq[-2]``, test target ``seq[-1]``.
3. Trains RecBole's SASRec and GRU4Rec with RecBole's own trainer (its early stopping on
   its full-ranking validation NDCG@10; the best weights are kept in memory, nothing is
   pickled), then scores OUR stored candidates (target + the stored negatives) of every
   user from the same inputs as ours (``seq[:-2]`` for validation, ``seq[:-1]`` for test)
   with RecBole's trained model and computes NDCG@10/20, HR@10/20 with
   ``llmsrec.metrics.ranking_metrics``.
4. Writes ``benchmarks/results/recbole_peer.json`` and ``.md``: RecBole's numbers beside
   ours (mean ± std from a ``llmsrec compare`` ``compare.json`` given with ``--ours``).

Presets: ``recbole`` (default) keeps RecBole's shipped model configs (SASRec: 2 heads,
inner 256, dropout 0.5, GELU, CE loss; GRU4Rec: embedding 64, GRU 128, dropout 0.3, CE) and
its ``MAX_ITEM_LIST_LENGTH`` 50; ``ours`` sets our hyper-parameters (SASRec: 1 head,
inner 64, dropout 0.1, ReLU, maxlen 128, and BPR with one sampled negative, the nearest
RecBole loss to our BCE with one negative; GRU4Rec: our defaults, maxlen 128).
Both: Adam lr 1e-3, RecBole's batch 2048 prefixes, up to ``--epochs`` epochs, stop after
``--stopping-step`` validations without improvement.

A killed run resumes: at the start of every epoch the trainer's state (weights, Adam state,
best weights, early-stopping counters) is written under ``--work`` as safetensors + JSON, and
a rerun with the same model, preset, seed, ``--epochs`` and ``--stopping-step`` continues at
that epoch (RecBole's batch order after a resume differs from an uninterrupted run's).

RecBole 1.2.1 turns on autograd anomaly detection when its models are imported (SINE's module
does it); the script turns it off before training, which is 10-40x faster on CPU.
RecBole 1.2.1 predates numpy 2: its ``Config`` aliases removed numpy names
(``np.float_`` ...); the script restores those aliases before importing it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("SASRec", "GRU4Rec")
OURS_NAME = {"SASRec": "sasrec", "GRU4Rec": "gru4rec"}
METRICS = ("NDCG@10", "NDCG@20", "HR@10", "HR@20")
# what RecBole's training path imports besides torch/numpy/scipy/yaml/tqdm (from this venv)
VENV_PACKAGES = ["pandas", "scikit-learn", "tensorboard", "colorlog==4.7.2", "colorama==0.4.4", "texttable"]
PRESETS = {
    "recbole": {"SASRec": {}, "GRU4Rec": {}},
    "ours": {
        "SASRec": {"n_layers": 2, "n_heads": 1, "hidden_size": 64, "inner_size": 64, "hidden_dropout_prob": 0.1,
                   "attn_dropout_prob": 0.1, "hidden_act": "relu", "layer_norm_eps": 1e-8, "loss_type": "BPR",
                   "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1, "alpha": 1.0,
                                             "dynamic": False, "candidate_num": 0},
                   "MAX_ITEM_LIST_LENGTH": 128},
        "GRU4Rec": {"embedding_size": 64, "hidden_size": 128, "num_layers": 1, "dropout_prob": 0.3,
                    "loss_type": "CE", "MAX_ITEM_LIST_LENGTH": 128},
    },
}


# --- 1. the throwaway venv ----------------------------------------------------------------------


def _in_venv(venv: Path) -> bool:
    return Path(sys.prefix).resolve() == venv.resolve()


def ensure_venv(venv: Path) -> Path:
    """Create ``venv`` (once) and return its python. Reuses this interpreter's site-packages."""
    py = venv / "bin" / "python"
    stamp = venv / ".recbole-peer-ready"
    if stamp.is_file():
        return py
    import site
    import sysconfig

    base = getattr(sys, "_base_executable", sys.executable)
    print(f"creating {venv} (base {base})", flush=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    target = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    parents = [sysconfig.get_paths()["purelib"], *site.getsitepackages(), str(ROOT)]
    (Path(target) / "_llmsrec_parent.pth").write_text("\n".join(dict.fromkeys(parents)) + "\n")
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-warn-conflicts"]
    subprocess.run([*pip, "--no-deps", "recbole==1.2.1"], check=True)
    subprocess.run([*pip, *VENV_PACKAGES], check=True)
    subprocess.run([str(py), "-c", "import torch, numpy, llmsrec; print('venv ok: torch', torch.__version__, "
                    "'numpy', numpy.__version__)"], check=True)
    stamp.write_text("ok\n")
    return py


# --- 2. export --------------------------------------------------------------------------------------


def export_atomic(ds, work: Path, name: str, users: list[int]) -> Path:
    """Write ``work/name/name.inter``: user, item (our ids as tokens), timestamp = position."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in users:
            for t, i in enumerate(ds.seqs[u]):
                f.write(f"{u}\t{int(i)}\t{t}\n")
    return d


# --- 3. RecBole training and scoring of our candidates -------------------------------------------


def _numpy2_aliases() -> None:
    import numpy as np

    for old, new in (("float_", "float64"), ("complex_", "complex128"), ("unicode_", "str_")):
        if not hasattr(np, old):
            setattr(np, old, getattr(np, new))


def train_recbole(model_name: str, preset: str, work: Path, name: str, seed: int, epochs: int,
                  stopping_step: int, device: str) -> tuple[object, object, dict]:
    """Train one RecBole model; return (model with the best weights, RecBole dataset, info)."""
    _numpy2_aliases()
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import get_model, init_logger, init_seed

    resume = work / f"resume-{model_name}-{preset}-seed{seed}-e{epochs}-s{stopping_step}"

    class InMemoryTrainer(Trainer):
        """RecBole's trainer, keeping the best-on-validation weights in memory (no torch.save).

        At the start of every epoch it writes its whole state (weights, Adam state, best weights,
        early-stopping counters) to ``resume`` as safetensors + JSON, so a killed run continues
        at that epoch (RecBole's own resume uses torch.load, i.e. pickle).
        """

        best_state = None
        best_epoch = -1

        def _save_checkpoint(self, epoch, verbose=True, **kwargs):
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.best_epoch = epoch

        def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
            if epoch_idx > 0:
                save_resume(self, resume, epoch_idx)
            return super()._train_epoch(train_data, epoch_idx, *args, **kwargs)

    config_dict = {
        "data_path": str(work), "dataset": name,
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["NDCG", "Hit"], "topk": [10, 20], "valid_metric": "NDCG@10",
        "epochs": epochs, "stopping_step": stopping_step, "learning_rate": 1e-3,
        "seed": seed, "reproducibility": True, "show_progress": False, "log_wandb": False,
        "save_dataset": False, "save_dataloaders": False, "checkpoint_dir": str(work / "saved"),
        "use_gpu": device != "cpu",
        **({"train_neg_sample_args": None} if PRESETS[preset][model_name].get("loss_type", "CE") == "CE" else {}),
        **PRESETS[preset][model_name],
    }
    config = Config(model=model_name, dataset=name, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = InMemoryTrainer(config, model)
    # RecBole 1.2.1's SINE module calls torch.autograd.set_detect_anomaly(True) when get_model imports
    # the sequential models, so every backward checks for NaNs: about 20 min per SASRec epoch on one
    # core instead of seconds. Turned off again here; results are unchanged.
    torch.autograd.set_detect_anomaly(False)
    t0 = time.perf_counter()
    done_before = load_resume(trainer, resume)
    if done_before:
        print(f"[{model_name} seed {seed}] resuming at epoch {trainer.start_epoch + 1} ({resume})", flush=True)
    best_score, _ = trainer.fit(train_data, valid_data, verbose=False, saved=True, show_progress=False)
    seconds = time.perf_counter() - t0 + done_before
    model.load_state_dict(trainer.best_state)
    model.eval()
    info = {"best_epoch": trainer.best_epoch + 1, "epochs_run": len(trainer.train_loss_dict),
            "recbole_valid_full_ranking_NDCG@10": float(best_score), "seconds": round(seconds, 1),
            "config": {k: config[k] for k in ("MAX_ITEM_LIST_LENGTH", "loss_type", "train_batch_size",
                                              "learning_rate", "epochs", "stopping_step")},
            "model_params": {k: config[k] for k in PRESETS["ours"][model_name]
                             if k not in ("train_neg_sample_args", "MAX_ITEM_LIST_LENGTH")}}
    return model, dataset, info


def save_resume(trainer, folder: Path, epoch: int) -> None:
    """Write the trainer's state before ``epoch`` (0-based) into ``folder`` (replaced atomically)."""
    import shutil

    from safetensors.torch import save_file

    opt = trainer.optimizer.state_dict()
    tensors = {f"model/{k}": v.contiguous() for k, v in trainer.model.state_dict().items()}
    tensors.update({f"best/{k}": v.contiguous() for k, v in (trainer.best_state or {}).items()})
    for pid, st in opt["state"].items():
        tensors.update({f"opt/{pid}/{k}": v.contiguous() for k, v in st.items()})
    meta = {"epoch": epoch, "best_epoch": trainer.best_epoch, "best_valid_score": float(trainer.best_valid_score),
            "cur_step": trainer.cur_step, "best_valid_result": {k: float(v) for k, v in
                                                                (trainer.best_valid_result or {}).items()},
            "train_loss_dict": {str(k): float(v) for k, v in trainer.train_loss_dict.items()},
            "param_groups": opt["param_groups"], "seconds": time.perf_counter() - trainer._resume_t0
            + trainer._resume_before}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_resume(trainer, folder: Path) -> float:
    """Restore a state written by :func:`save_resume`; return the seconds already spent (0 if none)."""
    from safetensors.torch import load_file

    trainer._resume_t0, trainer._resume_before = time.perf_counter(), 0.0
    if not (folder / "state.json").is_file():
        return 0.0
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    trainer.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
    trainer.best_state = best or None
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    trainer.start_epoch = meta["epoch"]
    trainer.best_epoch = meta["best_epoch"]
    trainer.best_valid_score = meta["best_valid_score"]
    trainer.cur_step = meta["cur_step"]
    trainer.best_valid_result = meta["best_valid_result"] or None
    trainer.train_loss_dict = {int(k): v for k, v in meta["train_loss_dict"].items()}
    trainer._resume_before = meta["seconds"]
    return float(meta["seconds"])


def score_candidates(model, dataset, ds, users: list[int], split: str):
    """RecBole model scores (float32 ``(len(users), 1 + m)``) of our stored candidates, column 0 the target."""
    import numpy as np
    import torch

    maxlen = model.max_seq_length
    dev = next(model.parameters()).device
    cand = ds.candidates(split)[np.asarray(users) - 1]  # rows of uids 1..U
    cut = -1 if split == "test" else -2
    # our item id -> RecBole's; an item RecBole never saw (only with --max-users) -> 0 (padding)
    token2id = dataset.field2token_id["item_id"]
    to_rb = np.asarray([0] + [token2id.get(str(i), 0) for i in range(1, ds.n_items + 1)], dtype=np.int64)
    out = np.empty(cand.shape, dtype=np.float32)
    with torch.no_grad():
        for s in range(0, len(users), 512):
            batch = users[s : s + 512]
            seqs = [to_rb[np.asarray(ds.seqs[u][:cut], dtype=np.int64)[-maxlen:]] for u in batch]
            item_seq = torch.zeros(len(batch), maxlen, dtype=torch.long)
            for r, q in enumerate(seqs):  # RecBole pads on the right
                item_seq[r, : len(q)] = torch.from_numpy(q)
            lengths = torch.tensor([len(q) for q in seqs], dtype=torch.long)
            h = model.forward(item_seq.to(dev), lengths.to(dev))  # (B, d)
            c = torch.from_numpy(to_rb[cand[s : s + 512]]).to(dev)
            out[s : s + 512] = (h[:, None, :] * model.item_embedding(c)).sum(-1).float().cpu().numpy()
    return out


# --- 4. report -----------------------------------------------------------------------------------


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def write_report(results: dict, out_dir: Path) -> None:
    from llmsrec.atomic import atomic_file, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "recbole_peer.json", results)
    seeds = results["seeds"]
    cols, cells = [], []
    for m in results["models"]:
        ours = results.get("ours", {}).get(OURS_NAME[m])
        if ours:
            cols.append(f"{m} (llmsrec)")
            cells.append({k: _fmt(ours["mean"][k], ours["std"][k] if len(ours["seeds"]) > 1 else None)
                          for k in METRICS})
        rb = results["recbole"][m]
        cols.append(f"{m} (RecBole)")
        cells.append({k: _fmt(rb["mean"][k], rb["std"][k] if len(seeds) > 1 else None) for k in METRICS})
    lines = [f"# RecBole 1.2.1 vs llmsrec on {results['dataset']} (test, our stored candidates)", "",
             f"Same split (leave-last-out), same training sequences, same {results['negatives']} stored negatives "
             f"per user; RecBole preset `{results['preset']}`, seeds {', '.join(map(str, seeds))} "
             f"(llmsrec: seeds of the compare run). Mean ± sample std where there are several seeds.", "",
             "| Metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for k in METRICS:
        lines.append(f"| {k} | " + " | ".join(c[k] for c in cells) + " |")
    lines += ["", "RecBole runs (per seed): " + "; ".join(
        f"{m} seed {s}: best epoch {r['best_epoch']} of {r['epochs_run']}, {r['seconds']:.0f} s"
        for m in results["models"] for s, r in results["recbole"][m]["runs"].items()), ""]
    with atomic_file(out_dir / "recbole_peer.md") as f:
        f.write("\n".join(lines))


def _ours(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    doc = json.loads((p / "compare.json" if p.is_dir() else p).read_text())
    out = {}
    for name in OURS_NAME.values():
        entry = doc.get("models", {}).get(name)
        if entry:
            out[name] = {"mean": entry["mean"]["test"], "std": entry["std"]["test"],
                         "seeds": doc["protocol"]["seeds"], "source": str(p)}
    return out


def run(args) -> None:
    import numpy as np
    import torch

    from llmsrec.data import load_prepared
    from llmsrec.metrics import ranking_metrics

    ds = load_prepared(args.data)
    out_dir = Path(args.out_dir).resolve()
    users = list(range(1, ds.n_users + 1))[: args.max_users] if args.max_users else list(range(1, ds.n_users + 1))
    work = Path(args.work).resolve()
    name = "llmsrec_peer"
    export_atomic(ds, work, name, users)
    os.chdir(work)  # RecBole writes log/ and log_tensorboard/ into the working folder
    results = {"dataset": ds.stats.get("dataset") or ds.root.name, "data_digest": ds.digest,
               "negatives": int(ds.test_negatives.shape[1]), "users": len(users), "preset": args.preset,
               "seeds": args.seeds, "models": args.models, "recbole": {}}
    for m in args.models:
        runs = {}
        for seed in args.seeds:
            # one finished (model, seed) is kept in --work, so a crash later never costs its hours again
            key = f"{m}-{args.preset}-seed{seed}-e{args.epochs}-s{args.stopping_step}-u{len(users)}-{ds.digest[:12]}"
            done = work / f"result-{key}.json"
            if done.is_file():
                info = json.loads(done.read_text())
                print(f"[{m} seed {seed}] reusing {done}", flush=True)
            else:
                print(f"[{m} seed {seed}] training RecBole ({args.preset} preset) ...", flush=True)
                model, dataset, info = train_recbole(m, args.preset, work, name, seed, args.epochs,
                                                     args.stopping_step, args.device)
                threads = torch.get_num_threads()
                info["valid"] = ranking_metrics(score_candidates(model, dataset, ds, users, "valid"))
                info["test"] = ranking_metrics(score_candidates(model, dataset, ds, users, "test"))
                torch.set_num_threads(threads)  # numba's first parallel call resizes the shared OpenMP pool
                tmp = done.with_name(done.name + ".tmp")
                tmp.write_text(json.dumps(info, indent=1))
                tmp.rename(done)
                import shutil

                shutil.rmtree(work / f"resume-{m}-{args.preset}-seed{seed}-e{args.epochs}-s{args.stopping_step}",
                              ignore_errors=True)  # finished: its per-epoch state is no longer needed
            print(f"[{m} seed {seed}] best epoch {info['best_epoch']} of {info['epochs_run']}, "
                  f"{info['seconds']:.0f} s; test " + ", ".join(f"{k} {info['test'][k]:.4f}" for k in METRICS),
                  flush=True)
            runs[str(seed)] = info
        vals = {k: np.asarray([r["test"][k] for r in runs.values()]) for k in METRICS}
        results["recbole"][m] = {
            "runs": runs,
            "mean": {k: float(v.mean()) for k, v in vals.items()},
            "std": {k: float(v.std(ddof=1)) if v.size > 1 else 0.0 for k, v in vals.items()},
        }
    results["ours"] = _ours(args.ours)  # read last: our compare run may finish while RecBole trains
    write_report(results, out_dir)
    print((out_dir / "recbole_peer.md").read_text())
    print(f"wrote {out_dir / 'recbole_peer.json'} and recbole_peer.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/data", help="prepared dataset folder")
    ap.add_argument("--ours", default=None, help="compare.json (or its folder) of `llmsrec compare` to put beside")
    ap.add_argument("--models", default="SASRec,GRU4Rec", help="RecBole models (SASRec, GRU4Rec)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--preset", default="recbole", choices=sorted(PRESETS))
    ap.add_argument("--epochs", type=int, default=300, help="RecBole max epochs (its default 300)")
    ap.add_argument("--stopping-step", type=int, default=10, help="RecBole early-stopping patience (default 10)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--max-users", type=int, default=None, help="only the first N users (smoke tests)")
    ap.add_argument("--venv", default="/tmp/recbole-venv", help="throwaway venv for RecBole")
    ap.add_argument("--work", default="/tmp/recbole-peer", help="folder for the atomic files and RecBole logs")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where the json/md go")
    ap.add_argument("--setup-only", action="store_true", help="only create the venv")
    ap.add_argument("--report-only", action="store_true",
                    help="no training: reread OUT_DIR/recbole_peer.json, put --ours beside it, rewrite the report")
    args = ap.parse_args()
    if args.report_only:
        out_dir = Path(args.out_dir).resolve()
        results = json.loads((out_dir / "recbole_peer.json").read_text())
        results["ours"] = _ours(args.ours)
        write_report(results, out_dir)
        print((out_dir / "recbole_peer.md").read_text())
        return
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad} (expected {', '.join(MODELS)})")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    # absolute before run() changes into --work (RecBole writes log/ into the working folder)
    args.data = str(Path(args.data).resolve())
    args.ours = str(Path(args.ours).resolve()) if args.ours else None
    venv = Path(args.venv)
    if not _in_venv(venv):
        py = ensure_venv(venv)
        if args.setup_only:
            return
        os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])  # same cwd
    run(args)


if __name__ == "__main__":
    main()
