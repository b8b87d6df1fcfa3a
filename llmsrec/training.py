"""The one training loop of the package: CF-SRec training (:mod:`llmsrec.cfsrec.train`), the
heads on cached states (:mod:`llmsrec.heads.train`) and the LLM-in-the-loop trainers
(:mod:`llmsrec.e2e.loop`, and through it the LLM4Rec baselines).

The loop owns what every trainer shares: the schedule (epochs of ``batches`` steps,
validation at given batch counts of each epoch or every N steps, an optional step budget),
model selection (the first validation with the highest ``select`` metric wins), early stopping
(after ``patience`` validations without improvement), a deep copy of the selected state, the
history records, and the timings. The trainer passes in what is model-specific:

* ``step(epoch, batch)``: one training step, returning its loss terms (floats);
* ``validate(step)``: the validation metrics (floats) after ``step`` steps;
* ``state()``: what to keep when a validation improves (e.g. a ``state_dict``; the loop keeps
  a deep copy);
* ``record(tick)``: the ``history.jsonl`` line of a :class:`Tick`.

:func:`write_history` writes the records, :func:`plot_curve` the training-curve PNG.

Determinism: the loop draws no random numbers; the trainer's callables run in a fixed order
(``begin_epoch``, then ``step`` and, where due, ``validate``, ``state``, ``after_validation``).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from llmsrec.atomic import atomic_file

__all__ = ["Tick", "LoopResult", "eval_points", "train_loop", "write_history", "plot_curve"]


@dataclass
class Tick:
    """Where the loop stands when it makes a history record (after a step, and its validation if any).

    Attributes:
        epoch: 0-based epoch; batch: batches done in this epoch (1-based); batches: per epoch.
        step: training steps done in all.
        terms: each loss term's mean over the steps since the previous record.
        step_seconds: wall time of this step (training only, no validation), s.
        seconds: wall time since the loop started, s (after this step's validation).
        validation: validations done so far (this one included).
        metrics: this step's validation metrics, or None when it had no validation.
        improved: this validation is the best so far (False without validation).
    """

    epoch: int
    batch: int
    batches: int
    step: int
    terms: dict[str, float]
    step_seconds: float
    seconds: float
    validation: int
    metrics: dict[str, float] | None
    improved: bool

    @property
    def progress(self) -> float:
        """Epochs done, fractional: ``epoch + batch / batches``, rounded to 4 decimals."""
        return round(self.epoch + self.batch / self.batches, 4)


@dataclass
class LoopResult:
    """What :func:`train_loop` returns.

    Attributes:
        history: the records, in order.
        best: ``{"validation", "step", "epoch" (fractional, :attr:`Tick.progress`), "metrics"}``
            of the selected validation.
        state: the deep copy of ``state()`` taken at the selected validation.
        steps: training steps run.
        epochs_run: epochs run, fractional when the loop stopped inside an epoch (not rounded).
        stopped_early: stopped by patience (not by the epoch or step budget).
        seconds: wall time of the loop, s; step_seconds, validation_seconds: of which
            training steps and validations.
    """

    history: list[dict]
    best: dict
    state: Any
    steps: int
    epochs_run: float
    stopped_early: bool
    seconds: float
    step_seconds: float
    validation_seconds: float


def eval_points(n_batches: int, evals_per_epoch: int) -> list[int]:
    """Batch counts (1-based, within an epoch of ``n_batches``) after which to validate: every
    ``1 / evals_per_epoch`` of the epoch, the last batch always included (fewer points when
    the epoch has fewer batches)."""
    pts = {max(1, math.ceil((j + 1) * n_batches / evals_per_epoch)) for j in range(evals_per_epoch)}
    return sorted(pts)


def train_loop(
    step: Callable[[int, int], dict[str, float]],
    validate: Callable[[int], dict[str, float]],
    state: Callable[[], Any],
    record: Callable[[Tick], dict],
    *,
    epochs: int,
    batches: int,
    select: str,
    patience: int,
    terms: Iterable[str] = ("loss",),
    points: Iterable[int] = (),
    every: int | None = None,
    max_steps: int | None = None,
    record_steps: bool = False,
    begin_epoch: Callable[[int], None] | None = None,
    after_validation: Callable[[Tick], None] | None = None,
    progress: bool = False,
    desc: str = "epoch",
) -> LoopResult:
    """Train for up to ``epochs`` epochs of ``batches`` steps, validate on a schedule, keep the best.

    Validation runs after batch ``b`` of an epoch when ``b`` is in ``points``; with ``every``,
    after every ``every``-th step and after the last step of the budget; and at the step that
    reaches ``max_steps``. A validation improves when ``metrics[select]`` beats every earlier
    one (ties keep the earlier); then ``state()`` is deep-copied. The loop stops after
    ``patience`` validations in a row without improvement, at ``max_steps``, or after
    ``epochs`` epochs.

    Args:
        step: ``(epoch, batch)`` (both 0-based) -> the step's loss terms; the keys ``terms``
            are averaged into the records.
        validate: ``(steps done)`` -> metrics (floats, ``select`` among them); it may raise
            (e.g. ``InputError`` on divergence).
        state: the state to keep (the loop deep-copies it).
        record: a :class:`Tick` -> the history record (a JSON-able dict).
        epochs, batches: epoch budget and steps per epoch (both >= 1).
        select: the metric selection and early stopping read; patience: validations without
            improvement before stopping.
        terms: loss-term names averaged over the steps since the previous record.
        points, every, max_steps: the validation schedule (above); max_steps None = no limit.
        record_steps: a record after every step (metrics None between validations); default
            one per validation.
        begin_epoch: called with the 0-based epoch before its first step (e.g. the user order).
        after_validation: called with each validation's tick, after the best state is kept
            (e.g. a learning-rate decay, a log line).
        progress: show a tqdm bar (over epochs when ``batches`` is 1, else one per epoch
            over its batches); desc: its label.

    Returns:
        :class:`LoopResult`. Its ``state`` is None if no validation ran (impossible with a
        schedule that validates at the end of the budget).
    """
    terms = tuple(terms)
    points = set(points)
    budget = epochs * batches
    history: list[dict] = []
    best_value, best, kept = -math.inf, {}, None
    bad = n_valid = steps = 0
    stopped = last = False
    epochs_run = 0.0
    run, run_n = dict.fromkeys(terms, 0.0), 0
    t_steps = t_valid = 0.0
    t0 = time.perf_counter()
    one_bar = batches == 1
    bar = tqdm(total=epochs, desc=desc, unit="epoch", disable=not progress, leave=False) if one_bar else None
    for epoch in range(epochs):
        if begin_epoch is not None:
            begin_epoch(epoch)
        if not one_bar:
            bar = tqdm(total=batches, desc=f"{desc} {epoch + 1}/{epochs}", unit="batch", disable=not progress,
                       leave=False)
        shown = dict.fromkeys(terms, 0.0)
        for b in range(1, batches + 1):
            t = time.perf_counter()
            got = step(epoch, b - 1)
            dt = time.perf_counter() - t
            t_steps += dt
            steps += 1
            for k in terms:
                run[k] += got[k]
                shown[k] += got[k]
            run_n += 1
            last = max_steps is not None and steps >= max_steps
            due = b in points or last or (every is not None and (steps % every == 0 or steps == budget))
            metrics, improved = None, False
            if due:
                t = time.perf_counter()
                metrics = validate(steps)
                t_valid += time.perf_counter() - t
                n_valid += 1
                improved = metrics[select] > best_value
            if due or record_steps:
                tick = Tick(epoch, b, batches, steps, {k: run[k] / max(run_n, 1) for k in terms}, dt,
                            time.perf_counter() - t0, n_valid, metrics, improved)
                history.append(record(tick))
                run, run_n = dict.fromkeys(terms, 0.0), 0
            if due:
                if improved:
                    best_value = metrics[select]
                    kept = copy.deepcopy(state())
                    best = {"validation": n_valid, "step": steps, "epoch": tick.progress, "metrics": metrics}
                    bad = 0
                else:
                    bad += 1
                if after_validation is not None:
                    after_validation(tick)
            if progress:
                post = {k: f"{shown[k] / b:.4f}" for k in terms}  # the epoch's mean so far
                if best:
                    post.update({select: f"{best['metrics'][select]:.4f}", "best": best["step"]})
                bar.set_postfix(post, refresh=False)
                bar.update()
            if due and (bad >= patience or last):
                stopped = bad >= patience
                epochs_run = epoch + b / batches
                break
        if not one_bar:
            bar.close()
        if stopped or last:
            break
        epochs_run = epoch + 1
    if one_bar:
        bar.close()
    return LoopResult(history=history, best=best, state=kept, steps=steps, epochs_run=epochs_run,
                      stopped_early=stopped, seconds=time.perf_counter() - t0, step_seconds=t_steps,
                      validation_seconds=t_valid)


def write_history(path: str | Path, history: list[dict]) -> None:
    """Write ``history.jsonl``: one JSON object per record, in order (atomically)."""
    with atomic_file(path) as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")


def plot_curve(history: list[dict], path: str | Path, title: str, terms: Iterable[str]) -> None:
    """The training-curve PNG (as the paper's Figure 7): the ``terms`` of each record and its
    validation NDCG@10/HR@10 against ``step``; the selected validation (the last record with
    ``best`` true) is marked. Written atomically."""
    import matplotlib  # deferred: matplotlib is slow to import and only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in terms:
        a.plot(steps, [h[k] for h in history], label=k, marker="." if len(steps) < 30 else None)
    a.set_xlabel("training step (batches)")
    a.set_ylabel("mean loss since previous validation")
    a.set_yscale("symlog", linthresh=1e-3)
    a.legend(fontsize=8)
    for k in ("NDCG@10", "HR@10"):
        b.plot(steps, [h[k] for h in history], label=f"valid {k}", marker=".")
    bi = [h["step"] for h in history if h.get("best")]
    if bi:
        b.axvline(bi[-1], color="grey", ls=":", lw=1, label="selected")
    b.set_xlabel("training step (batches)")
    b.set_ylabel("validation metric")
    b.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
