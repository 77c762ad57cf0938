"""The sweep's Optuna study: a live storage (journal or RDB), PRUNED trials, multi-objective fronts.

Two small sweeps on a private local Ray (2 CPUs) against a real MLflow store (SQLite); the
rest drives :class:`StudySearch` and the leaderboard directly, without Ray.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from raymix.cli import main
from raymix.integrations import leaderboard, study, sweep
from raymix.integrations.leaderboard import Board, Row, dominates
from raymix.integrations.plan import prepare
from raymix.integrations.search_space import SearchSpaceError, load_search_space
from tests.integrations.test_sweep import TINY, mlflow_runs, write_space

OBJECTIVES = [{"metric": "knn_top1", "mode": "max"}, {"metric": "encoder_params", "mode": "min"}]
SMALL = {**TINY, "data.test_fraction": 0.8, "optim.lr_scaling": "none", "optim.warmup_epochs": 0}
DEPTH = {"type": "categorical", "choices": [1, 2]}  # a deeper encoder has more parameters
LR = {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}


def journal(path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def front_by_brute_force(points: dict[str, list[float]], modes: list[str]) -> set[str]:
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    signed = {k: [s * v for s, v in zip(signs, vs, strict=True)] for k, vs in points.items()}
    return {
        k for k, mine in signed.items()
        if not any(all(o >= m for o, m in zip(other, mine, strict=True)) and other != mine
                   for j, other in signed.items() if j != k)
    }  # fmt: skip


# ---------------------------------------------------------------- sweeps on Ray


def test_an_asha_sweep_leaves_a_journal_with_pruned_trials(local_ray, tracking, tmp_path):
    """Sequential trials, encoder parameters minimised (an ASHA decision known in advance): the
    second trial, deeper than the first, is worse at the first rung and stopped there."""
    path = write_space(
        tmp_path,
        metric="encoder_params",
        mode="min",
        num_samples=2,
        max_concurrent_trials=1,
        overrides={**SMALL, "scaling.cpus_per_worker": 2.0},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        params={"optim.lr": LR, "backbone.depth": DEPTH},
        points_to_evaluate=[{"optim.lr": 1.0e-2, "backbone.depth": d} for d in (1, 2)],
    )
    lines: list[str] = []
    board = sweep.run_sweep(path, log=lines.append)
    folder = tmp_path / "sweeps" / "space"
    file = folder / "optuna.journal"
    assert f"Optuna study 'space' in {file}: browse it with optuna-dashboard {file}" in lines

    # After the sweep, with Ray's searcher gone: the journal opens in Optuna on its own.
    found = journal(file, "space")
    assert found.direction == optuna.study.StudyDirection.MINIMIZE
    trials = {t.params["backbone.depth"]: t for t in found.trials}
    rows = {row.point["backbone.depth"]: row for row in board.rows}
    assert len(trials) == len(rows) == 2
    assert [rows[1].outcome, rows[2].outcome] == ["completed", "pruned"] and rows[2].epochs == 1
    assert [trials[1].state, trials[2].state] == [TrialState.COMPLETE, TrialState.PRUNED]
    for depth, row in rows.items():
        trial = trials[depth]
        # every epoch's value is an intermediate value at step = epoch; the trial's value the last
        assert sorted(trial.intermediate_values) == list(range(1, row.epochs + 1))
        assert trial.intermediate_values == pytest.approx(row.history)
        assert trial.value == pytest.approx(row.last)
    # The leaderboard's own plots see the pruned trial as PRUNED too.
    assert (folder / "plots" / "optimization_history.png").is_file()


def test_a_multi_objective_sweep_marks_its_pareto_front(local_ray, tracking, tmp_path, capsys):
    """knn_top1 up, encoder parameters down (deeper encoders cost more), NSGA-II, an RDB study."""
    path = write_space(
        tmp_path,
        name="mo",
        objectives=OBJECTIVES,
        num_samples=3,
        overrides={**SMALL, "training.epochs": 1},
        searcher={"type": "nsga2", "seed": 0, "population_size": 4},
        params={"optim.lr": LR, "backbone.depth": DEPTH},
        points_to_evaluate=[{"backbone.depth": 1}, {"backbone.depth": 2}],
    )
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert main(["tune", str(path), "--optuna-storage", url]) == 0
    out = capsys.readouterr().out
    assert "Pareto front on knn_top1 (max), encoder_params (min):" in out
    folder = tmp_path / "sweeps" / "mo"
    board = leaderboard.load(str(folder))
    assert board.space.searcher.storage == url and board.space.multi_objective

    # The leaderboard's front is what a brute-force dominance check finds over the trials.
    points = {row.trial_id: [row.last, row.value("encoder_params")] for row in board.rows}
    assert all(row.outcome == "completed" for row in board.rows) and len(points) == 3
    front = {row.trial_id for row in board.front()}
    assert front and front == front_by_brute_force(points, ["max", "min"])
    depth = {row.trial_id: row.point["backbone.depth"] for row in board.rows}
    params = {row.value("encoder_params") for row in board.rows}
    assert len(params) == 2  # both depths were trained, and cost differently
    # ... and what Optuna's study (in the RDB given with --optuna-storage) calls best.
    found = optuna.load_study(study_name="mo", storage=url)
    assert sorted(t.values for t in found.best_trials) == sorted(points[k] for k in front)
    csv = (folder / "leaderboard.csv").read_text().splitlines()
    header = csv[0].split(",")
    assert header[4:8] == ["knn_top1", "best_knn_top1", "encoder_params", "pareto"]
    marked = {line.split(",")[1] for line in csv[1:] if line.split(",")[7] == "True"}
    assert marked == front and csv[1].split(",")[1] in front  # front members rank first
    assert (folder / leaderboard.PARETO_FILE).read_text().count("\n") == len(front) + 1
    assert (folder / "plots" / "pareto_front.png").is_file()
    best = board.best_row()
    assert best is not None and best.trial_id in front
    assert best.last == max(points[k][0] for k in front)

    # MLflow: the front's runs tagged, the front on the parent.
    client, parent, children = mlflow_runs(tracking)
    tags = {r.data.tags["raymix.trial_id"]: r.data.tags["raymix.pareto"] for r in children}
    assert tags == {k: str(k in front).lower() for k in points}
    assert set(parent.data.tags["raymix.pareto_front"].split(",")) == front
    assert parent.data.tags["raymix.optuna_storage"] == url
    assert parent.data.tags["raymix.optuna_study"] == "mo"
    assert leaderboard.PARETO_FILE in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {depth[k] for k in points} == {1, 2}

    # raymix best: the front marked, the pick explained.
    assert main(["best", str(folder), "--out", str(tmp_path / "best.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "pareto" in printed.splitlines()[0]
    assert "the best config is the front's best on knn_top1" in printed


# ---------------------------------------------------------------- without Ray


def _searcher(tmp_path: Path, **fields) -> tuple[study.StudySearch, optuna.Study]:
    s = prepare(write_space(tmp_path, overrides={**TINY, "training.epochs": 3}, **fields))
    searcher = sweep.searcher(s)
    return searcher, journal(Path(s.path) / "optuna.journal", "space")


def test_study_search_reports_evaluated_epochs_and_prunes_stopped_trials(tmp_path):
    searcher, found = _searcher(tmp_path)
    for trial_id in ("stopped", "full", "failed"):
        searcher.suggest(trial_id)
    # epoch 2 repeats epoch 1's evaluation (eval_epoch 1): not a measurement at step 2
    searcher.on_trial_result("stopped", {"epoch": 1, "eval_epoch": 1, "knn_top1": 0.3, "loss": 5.0})
    searcher.on_trial_complete("stopped", {"epoch": 2, "eval_epoch": 1, "knn_top1": 0.3, "loss": 4.0})
    # A resumed sweep: Tune restores the searcher from its saved state, over the same journal.
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher = study.StudySearch.__new__(study.StudySearch)
    searcher.restore(str(tmp_path / "searcher.pkl"))
    for epoch in (1, 2):
        searcher.on_trial_result("full", {"epoch": epoch, "eval_epoch": epoch, "knn_top1": 0.1 * epoch})
    searcher.on_trial_result("full", {"epoch": 2, "eval_epoch": 2, "knn_top1": 0.2})  # a retry: once
    searcher.on_trial_complete("full", {"epoch": 3, "eval_epoch": 3, "knn_top1": 0.5})
    searcher.on_trial_complete("failed", error=True)
    trials = {t.number: t for t in found.trials}
    stopped, full, failed = trials[0], trials[1], trials[2]
    assert stopped.state == TrialState.PRUNED and stopped.intermediate_values == {1: 0.3}
    assert stopped.value == 0.3
    assert full.state == TrialState.COMPLETE and full.value == 0.5
    assert full.intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.5})
    assert failed.state == TrialState.FAIL


def test_multi_objective_study_search_prunes_without_values(tmp_path):
    searcher, found = _searcher(tmp_path, objectives=OBJECTIVES, searcher={"type": "tpe", "seed": 0})
    assert found.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    searcher.suggest("a")
    searcher.suggest("b")
    result = {"eval_epoch": 1, "knn_top1": 0.4, "encoder_params": 1000}
    searcher.on_trial_result("a", {"epoch": 1, **result})  # Optuna keeps none for two objectives
    searcher.on_trial_complete("a", {"epoch": 1, **result})
    searcher.on_trial_complete("b", {"epoch": 3, **result, "eval_epoch": 3})
    a, b = found.trials
    assert a.state == TrialState.PRUNED and a.values is None and a.intermediate_values == {}
    assert b.state == TrialState.COMPLETE and b.values == [0.4, 1000]


def test_a_new_sweep_refuses_a_study_of_its_name_already_in_the_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="space", storage=url)
    s = study.with_storage(prepare(write_space(tmp_path)), url)
    with pytest.raises(SearchSpaceError, match="holds a study named 'space' already"):
        study.new_study_storage(s)
    memory = study.with_storage(s, "memory")
    assert study.new_study_storage(memory) is None and "in memory only" in study.describe(memory)
    on_s3 = prepare(write_space(tmp_path, name="remote", storage_path="s3://bucket/sweeps"))
    assert study.location(on_s3) is None and "is not local" in study.describe(on_s3)


def test_pareto_front_ranking_and_plots_without_ray(tmp_path):
    space, base = load_search_space(write_space(tmp_path, objectives=OBJECTIVES))

    def row(trial_id: str, outcome: str, knn: float, size: float) -> Row:
        values = {"knn_top1": knn, "encoder_params": size}
        return Row(trial_id, outcome, 2, knn, knn, {"optim.lr": 1e-3}, values=values)

    rows = [
        row("a", "completed", 0.5, 100), row("b", "completed", 0.6, 200), row("c", "completed", 0.4, 300),
        row("d", "completed", 0.6, 200), row("e", "pruned", 0.9, 10), row("f", "completed", 0.3, 50),
    ]  # fmt: skip
    board = Board(space, base, str(tmp_path), rows)
    front = {r.trial_id for r in board.front()}
    assert front == {"a", "b", "d", "f"}  # c is dominated by a; e was stopped early; b and d tie
    points = {r.trial_id: [r.last, r.value("encoder_params")] for r in rows if r.outcome == "completed"}
    assert front == front_by_brute_force(points, ["max", "min"])
    assert [r.trial_id for r in board.ranked()][:4] == ["b", "d", "a", "f"]
    assert board.best_row().trial_id == "b" and dominates([1.0, -1.0], [1.0, -2.0])
    assert "Pareto front on knn_top1 (max), encoder_params (min): 4 of 5 completed" in board.format()
    skipped = leaderboard.render(board, tmp_path)
    assert "pareto_front" not in skipped and (tmp_path / "plots" / "pareto_front.png").is_file()
    header = (tmp_path / leaderboard.PARETO_FILE).read_text().splitlines()[0]
    assert header == "trial_id,knn_top1,encoder_params,augment.crop_scale,optim.lr"


@pytest.mark.parametrize(
    "fields, argv, message",
    [
        ({"objectives": OBJECTIVES[:1]}, [], "objectives: one objective"),
        (
            {"objectives": [OBJECTIVES[0], {"metric": "gflops", "mode": "min"}]},
            [],
            "objectives[1].metric 'gflops' is never reported",
        ),
        ({"objectives": [OBJECTIVES[0]] * 2}, [], "objectives[1].metric 'knn_top1' is given twice"),
        ({"objectives": OBJECTIVES, "metric": "loss"}, [], "metric 'loss' differs from objectives[0].metric"),
        ({"objectives": [{"metric": "loss"}, OBJECTIVES[0]]}, [], "objectives.0.mode: Field required"),
        ({"searcher": {"storage": "redis://host"}}, [], "searcher.storage: redis:// is not a database URL"),
        ({}, ["--optuna-storage", "ftp://x"], "--optuna-storage 'ftp://x': ftp:// is not a database URL"),
    ],
)
def test_bad_objectives_and_storages_exit_2_before_ray_starts(
    tmp_path, capsys, monkeypatch, fields, argv, message
):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad space")

    monkeypatch.setattr(sweep.ray_train, "init_ray", no_ray)
    assert main(["tune", str(write_space(tmp_path, **fields)), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_tpe_grouping_and_constant_liar_reach_the_sampler():
    from raymix.integrations.search_space import Searcher
    from raymix.integrations.study import sampler

    tpe = sampler(Searcher(group=True, constant_liar=True))
    assert tpe._group and tpe._constant_liar  # Optuna keeps them as these attributes
    assert not sampler(Searcher())._constant_liar
    with pytest.raises(ValueError, match=r"searcher\.group=true needs searcher\.multivariate=true"):
        Searcher(group=True, multivariate=False)
