"""The shared training loop (llmsrec.training) on toy callables: schedule, selection, early
stop, the kept state, history records."""

import json

import pytest

from llmsrec.training import Tick, eval_points, plot_curve, train_loop, write_history


class Toy:
    """A 'model' whose state is a list of the steps seen and whose validation scores are scripted."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.weights = {"seen": []}  # mutated in place by every step, like a state_dict's tensors
        self.calls = []

    def step(self, epoch, batch):
        self.calls.append(("step", epoch, batch))
        self.weights["seen"].append((epoch, batch))
        return {"loss": float(len(self.weights["seen"])), "aux": 1.0}

    def validate(self, steps):
        self.calls.append(("validate", steps))
        return {"NDCG@10": self.scores.pop(0), "HR@10": 0.5}

    def state(self):
        return self.weights


def record(t: Tick) -> dict:
    return {"validation": t.validation, "step": t.step, "epoch": t.progress, **t.terms,
            **(t.metrics or {}), "best": t.improved}


def test_early_stop_after_patience_keeps_the_first_best_state(tmp_path):
    toy = Toy([0.1, 0.3, 0.2, 0.3, 0.25, 0.9])
    seen = []
    fit = train_loop(toy.step, toy.validate, toy.state, record, epochs=10, batches=4, points=[2, 4],
                     select="NDCG@10", patience=3, terms=("loss",), after_validation=seen.append, progress=True)
    # validations after steps 2, 4, 6, 8, 10: two improvements, then 3 without (a tie is no improvement)
    assert fit.stopped_early and fit.steps == 10
    assert fit.epochs_run == pytest.approx(2 + 2 / 4)
    assert [h["step"] for h in fit.history] == [2, 4, 6, 8, 10]
    assert [h["best"] for h in fit.history] == [True, True, False, False, False]
    assert fit.best == {"validation": 2, "step": 4, "epoch": 1.0, "metrics": {"NDCG@10": 0.3, "HR@10": 0.5}}
    # a deep copy taken at step 4: later steps did not change it
    assert fit.state == {"seen": [(0, 0), (0, 1), (0, 2), (0, 3)]}
    assert len(toy.weights["seen"]) == 10
    # terms are averaged over the steps since the previous record; only the named ones
    assert [h["loss"] for h in fit.history] == [1.5, 3.5, 5.5, 7.5, 9.5] and "aux" not in fit.history[0]
    assert [t.validation for t in seen] == [1, 2, 3, 4, 5]
    assert toy.scores == [0.9]  # no validation after the stop
    write_history(tmp_path / "history.jsonl", fit.history)
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == fit.history


def test_every_n_steps_and_the_last_step_one_record_per_step():
    toy = Toy([0.5, 0.4, 0.6])
    epochs_begun = []
    fit = train_loop(toy.step, toy.validate, toy.state, record, epochs=7, batches=1, every=3, select="NDCG@10",
                     patience=5, record_steps=True, begin_epoch=epochs_begun.append, progress=True)
    assert not fit.stopped_early and fit.steps == 7 and fit.epochs_run == 7
    assert epochs_begun == list(range(7))
    # validation every 3 steps and after the last one
    assert [c[1] for c in toy.calls if c[0] == "validate"] == [3, 6, 7]
    assert [h["step"] for h in fit.history] == list(range(1, 8))
    assert [h["loss"] for h in fit.history] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert ["NDCG@10" in h for h in fit.history] == [False, False, True, False, False, True, True]
    assert fit.best["step"] == 7 and fit.state == {"seen": [(e, 0) for e in range(7)]}


def test_max_steps_validates_and_stops_without_early_stop():
    toy = Toy([0.2, 0.1])
    fit = train_loop(toy.step, toy.validate, toy.state, record, epochs=5, batches=3, points=[3],
                     max_steps=4, select="NDCG@10", patience=5)
    # validations after step 3 (scheduled) and step 4 (the step budget, not a scheduled point)
    assert [h["step"] for h in fit.history] == [3, 4]
    assert fit.steps == 4 and fit.epochs_run == pytest.approx(1 + 1 / 3)
    assert not fit.stopped_early and fit.best["step"] == 3
    # the budget's last validation also exhausts patience 1: that is an early stop
    toy = Toy([0.2, 0.1])
    fit = train_loop(toy.step, toy.validate, toy.state, record, epochs=5, batches=3, points=[3],
                     max_steps=4, select="NDCG@10", patience=1)
    assert fit.steps == 4 and fit.stopped_early


def test_eval_points_and_validation_order():
    assert eval_points(48, 10) == [5, 10, 15, 20, 24, 29, 34, 39, 44, 48]
    assert eval_points(3, 10) == [1, 2, 3]
    assert eval_points(7, 1) == [7]
    toy = Toy([0.1, 0.2])
    train_loop(toy.step, toy.validate, toy.state, record, epochs=1, batches=2, points=eval_points(2, 2),
               select="NDCG@10", patience=3)
    assert toy.calls == [("step", 0, 0), ("validate", 1), ("step", 0, 1), ("validate", 2)]


def test_validation_errors_propagate():
    def validate(steps):
        raise ValueError(f"diverged at {steps}")

    toy = Toy([])
    with pytest.raises(ValueError, match="diverged at 2"):
        train_loop(toy.step, validate, toy.state, record, epochs=1, batches=4, points=[2, 4],
                   select="NDCG@10", patience=1)


def test_plot_curve_writes_a_png(tmp_path):
    toy = Toy([0.1, 0.3, 0.2])
    fit = train_loop(toy.step, toy.validate, toy.state, record, epochs=3, batches=2, points=[2],
                     select="NDCG@10", patience=5, terms=("loss", "aux"))
    plot_curve(fit.history, tmp_path / "curve.png", "toy", ("loss", "aux"))
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
