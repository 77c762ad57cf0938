"""The one epoch loop: evaluation and checkpoint cadence, what each epoch reports."""

import json
import math

import pytest

from raymix.config import load_config
from raymix.engine.checkpoint import load_checkpoint
from raymix.engine.loop import EVAL_PREFIXES, Cadence, EpochEnd, fresh, train_loop
from raymix.engine.run import fit
from raymix.engine.trainer import Trainer

TINY = [
    "data.name=synthetic", "data.image_size=16", "data.synthetic_train_size=64",
    "data.synthetic_test_size=16", "backbone.patch_size=8", "backbone.depth=1",
    "head.hidden_dim=32", "head.out_dim=16",
    "training.batch_size=32", "training.progress=false", "eval.knn_k=[5]",
]  # fmt: skip


def test_cadence_follows_the_config_the_last_epoch_and_the_extra_epochs():
    cadence = Cadence(epochs=10, eval_every=4, checkpoint_every=3, extra=frozenset({5}))
    assert [e for e in range(1, 11) if cadence.evaluates(e)] == [4, 5, 8, 10]
    assert [e for e in range(1, 11) if cadence.checkpoints(e)] == [3, 5, 6, 9, 10]
    only_last = Cadence(epochs=4, eval_every=0, checkpoint_every=10)
    assert [e for e in range(1, 5) if only_last.evaluates(e)] == [4]
    assert [e for e in range(1, 5) if only_last.checkpoints(e)] == [4]


class Counting(Trainer):
    evaluations: list[int]

    def evaluate(self, linear: bool = False) -> dict[str, float]:
        self.evaluations = [*getattr(self, "evaluations", []), self.epoch]
        return super().evaluate(linear)


def test_the_loop_evaluates_and_checkpoints_only_at_its_cadence():
    cadence = ["training.epochs=5", "training.eval_every=2", "training.checkpoint_every=4"]
    trainer = Counting(load_config(None, [*TINY, *cadence]))
    ends: list[EpochEnd] = []
    states = {}  # the state is built during the report, of the trainer as it is then

    def report(end: EpochEnd) -> None:
        ends.append(end)
        if end.checkpoint and end.state is not None:
            states[end.metrics["epoch"]] = end.state()

    metrics = train_loop(trainer, None, report, extra=[3], log=lambda line: None)
    assert trainer.evaluations == [0, 2, 3, 4, 5]  # initial, every 2, the extra epoch, the last
    assert [e.kind for e in ends] == ["initial", "epoch", "epoch", "epoch", "epoch", "epoch"]
    epochs = ends[1:]
    assert [e.evaluated for e in epochs] == [False, True, True, True, True]
    assert [e.checkpoint for e in epochs] == [False, False, True, True, True]
    # Every epoch carries the latest evaluation and says when it was measured.
    assert [e.metrics["eval_epoch"] for e in epochs] == [0, 2, 3, 4, 5]
    assert epochs[0].metrics["knn_top1"] == ends[0].metrics["knn_top1"]
    assert "knn_top1" not in fresh(epochs[0].metrics) and "knn_top1" in fresh(epochs[1].metrics)
    assert "best_knn_top1" not in epochs[0].metrics  # nothing trained was measured yet
    assert epochs[1].metrics["best_knn_top1"] == epochs[1].metrics["knn_top1"]
    assert all(e.metrics["eval_seconds"] > 0 for e in epochs if e.evaluated)
    assert sorted(states) == [3, 4, 5]
    assert states[3]["epoch"] == 3 and states[3]["latest_eval"]["eval_epoch"] == 3
    assert states[4]["run"]["best_knn_top1"] == max(e.metrics["knn_top1"] for e in epochs[1:4])
    assert metrics["epoch"] == 5 and metrics["eval_epoch"] == 5


def test_other_ranks_take_part_in_evaluations_but_neither_report_them_nor_build_states():
    trainer = Counting(load_config(None, [*TINY, "training.epochs=2", "training.eval_every=0"]))
    ends: list[EpochEnd] = []
    train_loop(trainer, None, ends.append, extra=[1], rank0=False, log=lambda line: None)
    assert trainer.evaluations == [0, 1, 2]  # a collective: at rank 0's epochs exactly
    assert [e.kind for e in ends] == ["epoch", "epoch"]
    assert all(e.state is None and not e.evaluated for e in ends)
    measured = [
        k for e in ends for k in e.metrics if k in ("knn_top1", "eval_epoch") or k.startswith(EVAL_PREFIXES)
    ]
    assert not measured
    assert all(math.isnan(e.metrics["knn_top1_init"]) for e in ends)
    ends.clear()  # a finished run started again evaluates once more on every rank, reports nothing
    final = train_loop(trainer, trainer.state_dict() | {"run": {}}, ends.append, rank0=False)
    assert trainer.evaluations == [0, 1, 2, 2] and [e.kind for e in ends] == ["repeat"]
    assert not ends[0].evaluated and "knn_top1" not in final


def test_fit_writes_measured_values_and_checkpoints_at_its_cadence(tmp_path):
    out = tmp_path / "run"
    overrides = [*TINY, "training.epochs=5", "training.eval_every=2", "training.checkpoint_every=3"]
    result = fit(load_config(None, [*overrides, f"training.output_dir={out}"]), log=lambda line: None)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4, 5]
    assert [h["epoch"] for h in history if "knn_top1" in h] == [0, 2, 4, 5]  # no repeated values
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 5
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["latest_eval"]["eval_epoch"] in (2, 4, 5)
    assert best["run"]["best_knn_top1"] == max(h["knn_top1"] for h in history[1:] if "knn_top1" in h)
    assert result["knn_top1"] == history[-1]["knn_top1"]


@pytest.mark.parametrize("metrics", [{"epoch": 3, "eval_epoch": 3, "knn_top1": 0.5}, {"epoch": 3}])
def test_fresh_keeps_what_was_measured_this_epoch(metrics):
    assert fresh(metrics) == metrics


def test_fresh_drops_repeated_evaluations():
    stale = {"epoch": 4, "eval_epoch": 2, "knn_top1": 0.5, "knn_top1_k20": 0.5, "linear_top1_best": 0.4,
             "loss": 1.0, "knn_top1_init": 0.1, "best_knn_top1": 0.5}  # fmt: skip
    assert fresh(stale) == {"epoch": 4, "loss": 1.0, "knn_top1_init": 0.1, "best_knn_top1": 0.5}
