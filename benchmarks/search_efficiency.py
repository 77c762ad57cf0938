"""Search efficiency: random search, ASHA, TPE, TPE + ASHA and PBT on one budget and one target.

The question (issue #20): does the quickstart's TPE + ASHA reach a good configuration with
fewer trial-epochs than random search, and by how much? A fair answer needs many seeds, a
target that no arm chose, and a metric whose noise is known. Real trainings are far too
slow for dozens of seeds x several arms on 2 cores, so the study has three parts.

1. **Reference table** (real training, computed once, cached). The quickstart space
   (search_spaces/quickstart.yaml: MoCo v3, ViT-micro, 16 px digits, 8 epochs) is
   discretised into equal bins: temperature and learning rate each into ``--bins`` (3)
   log-equal bins of the space's range as the space file has it now (a grid value is its
   bin's log-centre; the recorded run of 2026-12-02, on lr 1e-3 to 1e-2: temperature 0.131,
   0.224, 0.382, lr 1.47e-3, 3.16e-3, 6.81e-3, the base config, 0.2 and 4e-3, in the middle
   bins), crop scale by its 3 choices: 27 points. A changed space makes a new table. Every point is trained
   in-process (``Trainer.train_epoch`` and ``evaluate``, no Ray; ``--workers`` at once, one
   thread each) for the full 8 epochs with training seed 0, recording knn_top1 after every
   epoch. Noise: the digits split holds out half the images (``data.test_fraction=0.5``: 899
   test images instead of 450), so the binomial standard error of knn_top1 near 0.7 is 0.015
   instead of 0.022 (recorded at the target). The table holds one training draw per point:
   training noise is in the table (and in the target's spread), not resampled by the arms.
   It is written to ``<out>/search_efficiency-reference.json`` (the recorded study's) or
   ``search_efficiency-reference-<hash of the settings>.json`` and reused by later runs with
   the same settings (``--skip-reference`` insists on it).

   **Target**: the 90th percentile of the grid's final (epoch-8) values, computed once; its
   spread is a bootstrap over the grid points (2.5 and 97.5 percentiles, standard deviation).
   Random search draws grid points uniformly (the bins are equal in the sampler's own log
   scale; crops are a categorical), so about 10% of its trials land at or above the target.

2. **Replayed arms**, driven by the product's own objects: every arm-seed builds a copy of
   the quickstart space that differs only in the arm's scheduler/searcher settings, the trial
   budget (``--trials``) and the seed, and takes ``raymix.integrations.sweep.searcher(sweep)``
   (the sweep's Optuna study search, TPE or random, seeded; trials that ASHA stops are told
   PRUNED with their intermediate values, as in a real sweep) and ``scheduler(sweep)`` (ASHA
   as shipped, or FIFO). A trial's point is snapped to its grid bin and the bin's recorded
   curve is reported epoch by epoch. No ``points_to_evaluate``: every arm starts from its own
   samples (the base config's own value is recorded separately).

   ``--engine sim`` (the default) drives those objects as Tune's controller does, in this
   process: ``suggest`` when a slot is free; per report the scheduler's ``on_trial_result``,
   then the searcher's unless the trial stops; on a stop or at the last epoch both
   ``on_trial_complete``. Trials run ``concurrency(sweep, {"CPU": 2})`` at once (2, as the
   quickstart on 2 cores); a trial starts after ``--start-cost`` epoch-times (the trainer's
   build and epoch-0 evaluation) and reports once per epoch-time, so concurrent trials
   interleave deterministically. ``--engine tune`` runs the same replay through
   ``ray.tune.Tuner`` itself (paced by ``--pace`` seconds an epoch); it costs 1 to 6 s a
   trial on 2 busy cores, hence ``--tune-check N``: the first N seeds of random and TPE +
   ASHA also run through Tune, and the JSON shows their points and costs beside the
   simulation's.

   **Cost**: trial-epochs reported, across all trials in the order they arrive, up to and
   including the first report >= target. A seed that never reaches the target is
   *censored*: its cost counts as infinite (worse than any seed that reached it), so an
   arm's median is finite only when more than half of its seeds reach the target.
   **Ratio**: random search's median cost over the arm's; its interval is a paired
   bootstrap over seeds (``--bootstrap`` resamples of the seed indices, the same for both
   arms; nearest-rank 2.5 and 97.5 percentiles; censored medians give ratios of 0 or
   infinity, which the interval then shows; resamples where both are infinite are left out
   and counted).

   Beside the four main arms (random, random + ASHA, TPE, TPE + ASHA with the quickstart's
   settings: grace 2, reduction 2, 4 start-up trials, multivariate) the study replays
   variants that tune what the shipped spaces set: ASHA grace 1 and 4, grace 1 with
   reduction 3, 8 start-up trials, univariate TPE, and TPE with Optuna's ``constant_liar``
   (raymix does not expose it; that arm gives the study its own sampler), then combinations
   (``random_asha_grace4``, ``tpe_asha_grace4_startup8`` with and without multivariate,
   ``tpe_asha_startup8_univariate``). Variants run in rounds of one seed each until
   ``--minutes`` have passed.

   ``--summarise RECORD.json`` recomputes a record's summary, the early-rung rank
   correlations (from the reference table beside it) and its plot from the stored runs.

3. **PBT** cannot be replayed (it changes hyperparameters mid-run and copies weights), so
   its arm trains for real: ``run_sweep`` on the same space and split with
   ``scheduler: {type: pbt}`` (the Scheduler model's defaults: perturbation every 2 epochs,
   quantile 0.25; ``--pbt-settings`` JSON for others), a population of
   ``--pbt-population`` (4, as search_spaces/pbt_digits.yaml), one sweep per seed, cost
   counted the same way from the trials' progress files, as many seeds as ``--pbt-seeds``
   and ``--pbt-minutes`` allow. Its budget is its population x 8 epochs, smaller than the
   other arms', and its numbers carry training noise the replayed arms' do not.

Default size on 2 busy cores: the table (27 x 8 epochs, ~25 min, once), the replayed arms
(50 seeds of the main arms, up to 50 of each variant; well under a second per arm-seed), one
Tune cross-check seed or more, PBT for up to 18 minutes. Bigger machines: ``--workers``,
``--bins``, ``--seeds``, ``--trials``, ``--pbt-seeds``, ``--pbt-minutes``, ``--engine tune``.

    .venv/bin/python benchmarks/search_efficiency.py [--seeds 50] [--trials 20] [--epochs 8]
        [--bins 3] [--workers 2] [--skip-reference] [--skip-pbt] [--pbt-seeds 10]
        [--arms main|all|a,b,...] [--engine sim|tune] [--out benchmarks/results]

Writes ``<out>/search_efficiency-<date>.json`` (the reference table separately), a plot
``<out>/search_efficiency-<date>.png`` (median best-so-far against trial-epochs per arm, with
the target line) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from machine import cpu_name, git

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
SPLIT = {"data.test_fraction": 0.5, "training.progress": False}
CROPS = ([0.3, 1.0], [0.5, 1.0], [0.7, 1.0])

# name: (searcher settings, scheduler settings, constant_liar); None keeps the quickstart's.
MAIN = {
    "random": ({"type": "random"}, {"type": "none"}, False),
    "random_asha": ({"type": "random"}, None, False),
    "tpe": (None, {"type": "none"}, False),
    "tpe_asha": (None, None, False),
}
VARIANTS = {
    "tpe_asha_grace1": (None, {"grace_period": 1}, False),
    "tpe_asha_grace4": (None, {"grace_period": 4}, False),
    "tpe_asha_rf3": (None, {"grace_period": 1, "reduction_factor": 3}, False),
    "tpe_asha_startup8": ({"n_startup_trials": 8}, None, False),
    "tpe_asha_univariate": ({"multivariate": False}, None, False),
    "tpe_asha_liar": (None, None, True),
    # combinations, replayed after the single changes above
    "random_asha_grace4": ({"type": "random"}, {"grace_period": 4}, False),
    "tpe_asha_grace4_startup8": ({"n_startup_trials": 8}, {"grace_period": 4}, False),
    "tpe_asha_grace4_startup8_univariate": (
        {"n_startup_trials": 8, "multivariate": False},
        {"grace_period": 4},
        False,
    ),
    "tpe_asha_startup8_univariate": ({"n_startup_trials": 8, "multivariate": False}, None, False),
}


# ---------------------------------------------------------------- the grid


def log_bins(low: float, high: float, bins: int) -> list[float]:
    """The log-centres of ``bins`` log-equal bins of [low, high]."""
    step = math.log(high / low) / bins
    return [low * math.exp(step * (i + 0.5)) for i in range(bins)]


def snap(value: float, low: float, high: float, bins: int) -> int:
    """The bin of ``value`` among ``bins`` log-equal bins of [low, high]."""
    i = int(math.log(value / low) / (math.log(high / low) / bins))
    return min(max(i, 0), bins - 1)


def quickstart() -> dict[str, Any]:
    return yaml.safe_load(QUICKSTART.read_text())


def grid(bins: int) -> dict[str, Any]:
    params = quickstart()["params"]
    t, lr = params["method.temperature"], params["optim.lr"]
    return {
        "method.temperature": {
            "low": t["low"],
            "high": t["high"],
            "values": log_bins(t["low"], t["high"], bins),
        },
        "optim.lr": {"low": lr["low"], "high": lr["high"], "values": log_bins(lr["low"], lr["high"], bins)},
        "augment.crop_scale": {"values": [list(c) for c in params["augment.crop_scale"]["choices"]]},
    }


def grid_key(point: dict[str, Any], g: dict[str, Any], bins: int) -> str:
    """'i,j,k': the bins of a searcher's point (crop scale as a list or its JSON encoding)."""
    crop = point["augment.crop_scale"]
    crop = json.loads(crop) if isinstance(crop, str) else list(crop)
    t, lr = g["method.temperature"], g["optim.lr"]
    i = snap(float(point["method.temperature"]), t["low"], t["high"], bins)
    j = snap(float(point["optim.lr"]), lr["low"], lr["high"], bins)
    k = g["augment.crop_scale"]["values"].index([float(c) for c in crop])
    return f"{i},{j},{k}"


def grid_points(g: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for i, t in enumerate(g["method.temperature"]["values"]):
        for j, lr in enumerate(g["optim.lr"]["values"]):
            for k, crop in enumerate(g["augment.crop_scale"]["values"]):
                out[f"{i},{j},{k}"] = {"method.temperature": t, "optim.lr": lr, "augment.crop_scale": crop}
    return out


# ---------------------------------------------------------------- the reference table


def base_dict(epochs: int) -> dict[str, Any]:
    from raymix.integrations.search_space import load_search_space

    _, base = load_search_space(
        QUICKSTART, [f"{k}={v}" for k, v in {**SPLIT, "training.epochs": epochs}.items()]
    )
    return base


def train_point(job: tuple[str, dict[str, Any], dict[str, Any], int]) -> dict[str, Any]:
    """Train one grid point in this process; its knn_top1 after every epoch."""
    key, point, base, threads = job
    import torch

    torch.set_num_threads(threads)
    from raymix.engine.trainer import Trainer
    from raymix.integrations.search_space import config_for

    start = time.perf_counter()
    trainer = Trainer(config_for(base, point))
    curve = []
    while trainer.epoch < trainer.cfg.training.epochs:
        trainer.train_epoch()
        curve.append(round(float(trainer.evaluate()["knn_top1"]), 5))
    return {"key": key, "point": point, "curve": curve, "seconds": round(time.perf_counter() - start, 1)}


def reference_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What defines a reference table (the grid follows the space file as it is)."""
    settings = {"space": str(QUICKSTART.relative_to(ROOT)), "bins": args.bins, "epochs": args.epochs,
                "overrides": SPLIT, "training_seed": 0, "grid": grid(args.bins)}  # fmt: skip
    return json.loads(json.dumps(settings))


def reference_path(args: argparse.Namespace) -> Path:
    """The cache of a table: the plain name for the recorded study's (2026-12-02: the
    quickstart's lr range of 1e-3 to 1e-2), a name with a hash of the settings for others."""
    path = args.out / "search_efficiency-reference.json"
    if path.exists() and json.loads(path.read_text()).get("settings") == reference_settings(args):
        return path
    digest = hashlib.sha1(json.dumps(reference_settings(args), sort_keys=True).encode()).hexdigest()[:8]
    return args.out / f"search_efficiency-reference-{digest}.json"


def reference(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    g = grid(args.bins)
    settings = reference_settings(args)
    table: dict[str, Any] = {}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("settings") == settings:
            table = cached["table"]
    if args.skip_reference and len(table) < len(grid_points(g)):
        raise SystemExit(f"--skip-reference: {path} lacks a complete table for these settings")
    todo = [(k, p) for k, p in grid_points(g).items() if k not in table]
    if todo:
        base = base_dict(args.epochs)
        started = time.perf_counter()
        print(f"reference: training {len(todo)} grid points, {args.workers} at a time", flush=True)
        jobs = [(k, p, base, args.threads) for k, p in todo]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for n, row in enumerate(pool.imap_unordered(train_point, jobs), 1):
                table[row["key"]] = {k: row[k] for k in ("point", "curve", "seconds")}
                record = {
                    "settings": settings,
                    "machine": cpu_name(),
                    "git_commit": git("rev-parse", "--short", "HEAD"),
                    "seconds": round(time.perf_counter() - started),
                    "table": table,
                }
                path.write_text(json.dumps(record, indent=1) + "\n")
                print(
                    f"  {n}/{len(todo)} {row['key']} final {row['curve'][-1]:.3f} ({row['seconds']} s)",
                    flush=True,
                )
    return table


def target_of(table: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    finals = np.array([row["curve"][-1] for row in table.values()])
    rng = np.random.default_rng(0)
    boot = np.percentile(rng.choice(finals, (args.bootstrap, len(finals))), args.percentile, axis=1)
    target = float(np.percentile(finals, args.percentile))
    n_test = math.ceil(1797 * SPLIT["data.test_fraction"])  # scikit-learn's train_test_split
    return {
        "knn_top1": round(target, 4),
        "percentile": args.percentile,
        "of": f"the final knn_top1 of {len(finals)} grid points",
        "bootstrap_95": [round(float(x), 4) for x in np.percentile(boot, [2.5, 97.5])],
        "bootstrap_std": round(float(boot.std()), 4),
        "points_at_or_above": int((finals >= target - 1e-9).sum()),
        "test_images": n_test,
        "metric_standard_error_at_target": round(math.sqrt(target * (1 - target) / n_test), 4),
        "grid_final": {
            "min": round(float(finals.min()), 4),
            "median": round(float(np.median(finals)), 4),
            "max": round(float(finals.max()), 4),
        },
    }


def early_ranks(table: dict[str, Any]) -> dict[str, float]:
    """Spearman's correlation of each epoch's knn_top1 with the final one, over the grid:
    how well a rung at that epoch ranks the configurations (ties broken by order)."""
    curves = np.array([row["curve"] for row in table.values()])

    def ranks(x: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(x)).astype(float)

    final = ranks(curves[:, -1])
    return {
        f"epoch_{e + 1}": round(float(np.corrcoef(ranks(curves[:, e]), final)[0, 1]), 3)
        for e in range(curves.shape[1] - 1)
    }


# ---------------------------------------------------------------- the replayed arms


def space_file(folder: Path, arm: str, spec: tuple, seed: int, args: argparse.Namespace) -> Path:
    searcher_over, scheduler_over, _ = spec
    space = quickstart()
    space["base"] = str(QUICKSTART.parent / space["base"])
    space["overrides"] = {**space.get("overrides", {}), **SPLIT, "training.epochs": args.epochs}
    space.pop("points_to_evaluate", None)
    space.update(name=f"{arm}-{seed}", storage_path=str(folder / "sweeps"), num_samples=args.trials)
    if searcher_over and searcher_over.get("type") == "random":
        space["searcher"] = {"type": "random", "seed": seed}
    else:
        space["searcher"] = {**space["searcher"], **(searcher_over or {}), "seed": seed}
    if scheduler_over and scheduler_over.get("type") == "none":
        space["scheduler"] = {"type": "none"}
    else:
        space["scheduler"] = {**space["scheduler"], **(scheduler_over or {})}
    path = folder / f"{arm}-{seed}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def replay(
    config: dict[str, Any], *, curves: dict[str, list[float]], g: dict[str, Any], bins: int, pace: float
) -> None:
    import ray.tune

    curve = curves[grid_key(config, g, bins)]
    for epoch, value in enumerate(curve, 1):
        time.sleep(pace)
        ray.tune.report({"epoch": epoch, "knn_top1": value})


def run_arm(
    arm: str, spec: tuple, seed: int, folder: Path, table: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    import ray.tune
    from optuna.samplers import TPESampler

    from raymix.integrations import sweep as sw
    from raymix.integrations.plan import prepare

    plan = prepare(space_file(folder, arm, spec, seed, args))
    search = sw.searcher(plan)
    if spec[2]:  # constant_liar: the same TPE with Optuna's liar for running trials
        s = plan.space.searcher
        liar = TPESampler(
            seed=s.seed, multivariate=s.multivariate, n_startup_trials=s.n_startup_trials, constant_liar=True
        )
        search._sampler = search._ot_study.sampler = liar
    reports: list[tuple[str, int, float]] = []
    points: dict[str, str] = {}

    class Record(ray.tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
            reports.append((trial.trial_id, int(result["epoch"]), float(result["knn_top1"])))
            points.setdefault(trial.trial_id, grid_key(trial.config, grid(args.bins), args.bins))

    curves = {k: v["curve"] for k, v in table.items()}
    fn = ray.tune.with_parameters(replay, curves=curves, g=grid(args.bins), bins=args.bins, pace=args.pace)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(fn, {"cpu": sw.trial_resources(plan)["CPU"]}),
        tune_config=ray.tune.TuneConfig(
            metric=plan.space.metric,
            mode=plan.space.mode,
            search_alg=search,
            scheduler=sw.scheduler(plan),
            num_samples=plan.space.num_samples,
            max_concurrent_trials=sw.concurrency(plan, {"CPU": args.cpus}),
            reuse_actors=True,
        ),
        run_config=ray.tune.RunConfig(
            name=f"{arm}-{seed}", storage_path=str(folder / "tune"), callbacks=[Record()], verbose=0
        ),
    )
    tuner.fit()
    return {
        "seed": seed,
        "reports": [[points[t], e, v] for t, e, v in reports],
        "scheduler": plan.space.scheduler.model_dump(mode="json"),
        "searcher": plan.space.searcher.model_dump(mode="json")
        | ({"constant_liar": True} if spec[2] else {}),
        "max_concurrent_trials": sw.concurrency(plan, {"CPU": args.cpus}),
    }


def simulate_arm(
    arm: str, spec: tuple, seed: int, folder: Path, table: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The arm as Tune's controller drives it, without Ray's processes: the product's searcher
    and scheduler objects get the same calls in the same order (``suggest`` when a slot is
    free; per report the scheduler's ``on_trial_result``, then the searcher's unless the
    trial stops; on a stop or the last epoch both ``on_trial_complete``). ``concurrency``
    trials run at once; a trial starts after ``--start-cost`` epoch-times (the trainer's
    build and its epoch-0 evaluation) and reports one epoch per epoch-time, so concurrent
    trials interleave deterministically (ties: the earlier trial first)."""
    import heapq
    from types import SimpleNamespace

    from optuna.samplers import TPESampler
    from ray.tune.schedulers import TrialScheduler

    from raymix.integrations import sweep as sw
    from raymix.integrations.plan import prepare

    plan = prepare(space_file(folder, arm, spec, seed, args))
    search, sched = sw.searcher(plan), sw.scheduler(plan)
    if spec[2]:
        s = plan.space.searcher
        liar = TPESampler(
            seed=s.seed, multivariate=s.multivariate, n_startup_trials=s.n_startup_trials, constant_liar=True
        )
        search._sampler = search._ot_study.sampler = liar
    metric, mode = plan.space.metric, plan.space.mode
    search.set_search_properties(metric, mode, {})
    sched.set_search_properties(metric, mode)
    slots = sw.concurrency(plan, {"CPU": args.cpus})
    epochs = plan.config.training.epochs
    g = grid(args.bins)
    events: list[tuple[float, int, int]] = []  # (time, trial number, epoch)
    trials: list[Any] = []
    reports: list[list[Any]] = []

    def launch(now: float) -> None:
        n = len(trials)
        config = search.suggest(f"t{n:03d}")
        trial = SimpleNamespace(trial_id=f"t{n:03d}", key=grid_key(config, g, args.bins), last=None)
        trials.append(trial)
        sched.on_trial_add(None, trial)
        heapq.heappush(events, (now + args.start_cost + 1.0, n, 1))

    for _ in range(min(slots, args.trials)):
        launch(0.0)
    while events:
        now, n, epoch = heapq.heappop(events)
        trial = trials[n]
        result = {"epoch": epoch, metric: table[trial.key]["curve"][epoch - 1], "training_iteration": epoch}
        reports.append([trial.key, epoch, result[metric]])
        decision = sched.on_trial_result(None, trial, result)
        if decision != TrialScheduler.STOP:
            search.on_trial_result(trial.trial_id, result)
        if decision == TrialScheduler.STOP or epoch >= epochs:
            sched.on_trial_complete(None, trial, result)
            search.on_trial_complete(trial.trial_id, result=result)
            if len(trials) < args.trials:
                launch(now)
        else:
            heapq.heappush(events, (now + 1.0, n, epoch + 1))
    searcher_settings = plan.space.searcher.model_dump(mode="json", exclude={"storage", "population_size"})
    return {
        "seed": seed,
        "reports": reports,
        "scheduler": plan.space.scheduler.model_dump(
            mode="json", include={"type", "grace_period", "reduction_factor"}
        ),
        "searcher": searcher_settings | ({"constant_liar": True} if spec[2] else {}),
        "max_concurrent_trials": slots,
    }


# ---------------------------------------------------------------- PBT (real training)


def pbt_available() -> bool:
    from raymix.integrations.search_space import Scheduler

    return "pbt" in typing.get_args(Scheduler.model_fields["type"].annotation)


def run_pbt(seed: int, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    import csv

    from raymix.integrations import sweep as sw
    from raymix.integrations.plan import prepare

    path = space_file(folder, "pbt", (None, None, False), seed, args)
    space = yaml.safe_load(path.read_text())
    space["scheduler"] = {"type": "pbt", **json.loads(args.pbt_settings)}
    space["searcher"] = {"seed": seed}  # seeds the population's random draw
    space["num_samples"] = args.pbt_population
    path.write_text(yaml.safe_dump(space))
    plan = prepare(path)
    sw.run_sweep(path, log=lambda _: None)
    rows = []
    for progress in Path(plan.path).glob("trial_*/progress.csv"):
        with progress.open() as handle:
            for r in csv.DictReader(handle):
                if r.get("knn_top1") not in (None, ""):
                    rows.append(
                        (
                            float(r["timestamp"]),
                            progress.parent.name,
                            int(float(r["epoch"])),
                            float(r["knn_top1"]),
                        )
                    )
    rows.sort()
    return {
        "seed": seed,
        "reports": [[t, e, v] for _, t, e, v in rows],
        "scheduler": plan.space.scheduler.model_dump(mode="json"),
    }


# ---------------------------------------------------------------- analysis


def cost(reports: list[list[Any]], target: float) -> int | None:
    for n, (_, _, value) in enumerate(reports, 1):
        if value >= target - 1e-9:
            return n
    return None


def median_cost(costs: np.ndarray) -> float:
    return float(np.median(costs))  # inf for censored seeds: finite only when most reach


def summarise(
    arms: dict[str, list[dict[str, Any]]], target: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Per arm: median cost, seeds reaching the target, and the ratio to random search with a
    paired bootstrap interval (an arm with fewer seeds is paired with random's first seeds)."""
    costs = {
        a: np.array([c if (c := cost(r["reports"], target)) else math.inf for r in runs])
        for a, runs in arms.items()
    }
    out = {}
    for arm, c in costs.items():
        runs = arms[arm]
        m = median_cost(c)
        row: dict[str, Any] = {
            "seeds": len(c),
            "median_trial_epochs_to_target": None if math.isinf(m) else m,
            "reached": int(np.isfinite(c).sum()),
            "fraction_reached": round(float(np.isfinite(c).mean()), 3),
            "median_trial_epochs_spent": float(np.median([len(r["reports"]) for r in runs])),
            "median_best": round(float(np.median([max(v for _, _, v in r["reports"]) for r in runs])), 4),
            "trial_epochs_to_target_per_seed": [None if math.isinf(x) else int(x) for x in c],
        }
        if "random" in costs and arm != "random" and len(costs["random"]) >= len(c):
            ref = costs["random"][: len(c)]
            idx = np.random.default_rng(1).integers(0, len(c), (args.bootstrap, len(c)))  # every arm alike
            with np.errstate(divide="ignore", invalid="ignore"):
                num, den = np.median(ref[idx], axis=1), np.median(c[idx], axis=1)
                ratios = np.where(np.isinf(num) & np.isinf(den), np.nan, num / den)
                point = (
                    median_cost(ref) / m if not (math.isinf(m) and math.isinf(median_cost(ref))) else math.nan
                )
            defined = ratios[~np.isnan(ratios)]  # inf stays inf: nearest rank, no interpolation
            lo, hi = (
                np.percentile(defined, [2.5, 97.5], method="nearest") if len(defined) else (math.nan,) * 2
            )
            row["random_seeds_paired"] = len(ref)
            row["random_median_on_those_seeds"] = None if math.isinf(median_cost(ref)) else median_cost(ref)
            row["ratio_to_random"] = _num(point)
            row["ratio_ci95"] = [_num(lo), _num(hi)]
            row["ratio_undefined_resamples"] = int(np.isnan(ratios).sum())
        out[arm] = row
    return out


def _num(x: float) -> float | str:
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else round(float(x), 3))


def best_so_far(reports: list[list[Any]], length: int) -> np.ndarray:
    values = np.array([v for _, _, v in reports] or [np.nan])
    best = np.maximum.accumulate(values)
    return np.concatenate([best, np.full(max(0, length - len(best)), best[-1])])[:length]


def plot(arms: dict[str, list[dict[str, Any]]], target: dict[str, Any], path: Path, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    x = np.arange(1, budget + 1)
    for arm, runs in arms.items():
        curves = np.stack([best_so_far(r["reports"], budget) for r in runs])
        width = 2.2 if arm in ("random", "tpe_asha", "pbt") else 1.0
        style = "-" if arm in MAIN or arm == "pbt" else ":"
        (line,) = ax.plot(x, np.median(curves, axis=0), style, lw=width, label=arm)
        if arm in ("random", "tpe_asha"):
            lo, hi = np.percentile(curves, [25, 75], axis=0)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(
        target["knn_top1"],
        color="k",
        ls="--",
        lw=1,
        label=f"target {target['knn_top1']:.3f} (p{target['percentile']})",
    )
    lo, hi = target["bootstrap_95"]
    ax.axhspan(lo, hi, color="k", alpha=0.07)
    ax.set_xlabel("trial-epochs (all trials, in the order Tune received them)")
    ax.set_ylabel("best knn_top1 so far (median over seeds; IQR shaded)")
    ax.set_ylim(bottom=max(0.0, target["grid_final"]["median"] - 0.1))
    ax.set_xscale("log")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Quickstart space on digits: best-so-far per arm")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=50, help="searcher seeds per arm (0..N-1)")
    parser.add_argument("--variant-seeds", type=int, default=50, help="seeds of the tuning variants")
    parser.add_argument("--trials", type=int, default=20, help="trial budget of every arm")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of a full trial (the quickstart's 8)")
    parser.add_argument(
        "--bins", type=int, default=3, help="bins of temperature and of lr (grid: bins^2 x 3)"
    )
    parser.add_argument("--percentile", type=float, default=90.0, help="the target's percentile of the grid")
    parser.add_argument("--workers", type=int, default=2, help="reference trainings at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each reference training")
    parser.add_argument(
        "--cpus", type=int, default=2, help="Ray's CPUs (sets trials at once, as the product)"
    )
    parser.add_argument("--engine", choices=("sim", "tune"), default="sim", help="see the docstring")
    parser.add_argument("--start-cost", type=float, default=1.0, help="sim: a trial's start in epoch-times")
    parser.add_argument(
        "--tune-check", type=int, default=3, help="sim: seeds of random, TPE+ASHA through Tune"
    )
    parser.add_argument("--pace", type=float, default=0.05, help="seconds per replayed epoch")
    parser.add_argument("--arms", default="all", help="main, all, or a comma list")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--skip-reference", action="store_true", help="require the cached reference table")
    parser.add_argument("--skip-pbt", action="store_true")
    parser.add_argument("--pbt-seeds", type=int, default=10)
    parser.add_argument("--pbt-population", type=int, default=4)
    parser.add_argument("--pbt-minutes", type=float, default=18, help="no new PBT seed after this")
    parser.add_argument("--minutes", type=float, default=55, help="no new variant round after this")
    parser.add_argument("--pbt-settings", default="{}", help="JSON: the pbt scheduler's fields")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--summarise", type=Path, help="recompute a record's summary and plot from its runs")
    args = parser.parse_args()
    if args.summarise:
        record = json.loads(args.summarise.read_text())
        record["summary"] = summarise(record["runs"], record["target"]["knn_top1"], args)
        record["summary_recomputed"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
        cached = args.summarise.parent / record["reference_table"]["file"]
        if cached.exists():
            record["rank_correlation_with_final"] = early_ranks(json.loads(cached.read_text())["table"])
        args.summarise.write_text(json.dumps(record, indent=1) + "\n")
        budget = record["options"]["trials"] * record["options"]["epochs"]
        plot(record["runs"], record["target"], args.summarise.with_suffix(".png"), budget)
        print_table(record["summary"])
        return
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load = [round(x, 2) for x in os.getloadavg()]

    cache = reference_path(args)
    table = reference(args, cache)
    reference_seconds = round(time.perf_counter() - started)
    cached = json.loads(cache.read_text())
    reference_run = {k: cached.get(k) for k in ("machine", "git_commit", "seconds")}
    target = target_of(table, args)
    t = target["knn_top1"]
    print(
        f"target {t} (bootstrap 95% {target['bootstrap_95']}), "
        f"{target['points_at_or_above']} grid points reach it",
        flush=True,
    )
    g = grid(args.bins)
    base_key = grid_key(
        {"method.temperature": 0.2, "optim.lr": 4e-3, "augment.crop_scale": [0.5, 1.0]}, g, args.bins
    )
    ranked = sorted(table, key=lambda k: -table[k]["curve"][-1])

    chosen = {"main": dict(MAIN), "all": {**MAIN, **VARIANTS}}.get(args.arms)
    if chosen is None:
        everything = {**MAIN, **VARIANTS}
        chosen = {a: everything[a] for a in args.arms.split(",")}
    arms: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    check: list[dict[str, Any]] = []
    import ray

    deadline = started + 60 * args.minutes
    main_arms = {a: spec for a, spec in chosen.items() if a in MAIN}
    variants = {a: spec for a, spec in chosen.items() if a not in MAIN}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

        def replayed(names: dict[str, tuple], seeds: range) -> None:
            for seed in seeds:
                for arm, spec in names.items():
                    begun = time.perf_counter()
                    one = run_arm if args.engine == "tune" else simulate_arm
                    arms.setdefault(arm, []).append(one(arm, spec, seed, folder, table, args))
                    seconds[arm] = round(seconds.get(arm, 0.0) + time.perf_counter() - begun, 1)

        if args.engine == "tune":
            ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            replayed(main_arms, range(args.seeds))
            for arm in main_arms:
                print(
                    f"{arm}: {seconds[arm]} s, to target {[cost(r['reports'], t) for r in arms[arm]]}",
                    flush=True,
                )
            if args.tune_check and args.engine == "sim":  # the same seeds through Ray Tune itself
                ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
                (folder / "check").mkdir()
                for arm in ("random", "tpe_asha"):
                    for seed in range(min(args.tune_check, args.seeds)):
                        tuned = run_arm(arm, MAIN[arm], seed, folder / "check", table, args)
                        sim = arms[arm][seed]
                        check.append({
                            "arm": arm, "seed": seed,
                            "tune_trial_epochs_to_target": cost(tuned["reports"], t),
                            "sim_trial_epochs_to_target": cost(sim["reports"], t),
                            "tune_trial_epochs": len(tuned["reports"]),
                            "sim_trial_epochs": len(sim["reports"]),
                            "tune_points": list(dict.fromkeys(k for k, _, _ in tuned["reports"])),
                            "sim_points": list(dict.fromkeys(k for k, _, _ in sim["reports"])),
                        })  # fmt: skip
                        print(f"tune check {json.dumps(check[-1])}", flush=True)
        finally:
            ray.shutdown()
        pbt: dict[str, Any] = {"run": False}
        if args.skip_pbt:
            pbt["why"] = "--skip-pbt"
        elif not pbt_available():
            pbt["why"] = "raymix's Scheduler model has no 'pbt' type at this checkout"
        else:  # real training: as many seeds as --pbt-seeds and --pbt-minutes allow
            begun = time.perf_counter()
            runs = []
            for seed in range(args.pbt_seeds):
                if runs and time.perf_counter() - begun > 60 * args.pbt_minutes:
                    break
                runs.append(run_pbt(seed, folder, args))
                print(f"pbt seed {seed}: to target {cost(runs[-1]['reports'], t)}", flush=True)
            arms["pbt"] = runs
            seconds["pbt"] = round(time.perf_counter() - begun, 1)
            pbt = {"run": True, "seeds": len(runs), "seeds_asked": args.pbt_seeds,
                   "population": args.pbt_population, "minutes_cap": args.pbt_minutes,
                   "scheduler": runs[0]["scheduler"]}  # fmt: skip
        if variants:  # rounds of one seed per variant, while the deadline allows
            if args.engine == "tune":
                ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            try:
                for seed in range(args.variant_seeds):
                    if seed and time.perf_counter() > deadline:
                        break
                    replayed(variants, range(seed, seed + 1))
                    print(f"variants: seed {seed} done", flush=True)
            finally:
                ray.shutdown()

    summary = summarise(arms, t, args)
    date = datetime.date.today().isoformat()
    record = {
        "benchmark": "search_efficiency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_name(),
        "cpus": args.cpus,
        "load_average_before": load,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "versions": _versions(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_changes_in_raymix": git(
            "status", "--porcelain", "--untracked-files=all", "--", "."
        ).splitlines(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "space": str(QUICKSTART.relative_to(ROOT)),
        "quickstart_settings": {k: quickstart()[k] for k in ("scheduler", "searcher", "num_samples")},
        "study_overrides": {**SPLIT, "training.epochs": args.epochs},
        "grid": g,
        "target": target,
        "reference_table": {"file": cache.name, "computed_by": reference_run},
        "rank_correlation_with_final": early_ranks(table),
        "base_config": {
            "grid_point": base_key,
            "final": table[base_key]["curve"][-1],
            "rank": ranked.index(base_key) + 1,
            "of": len(ranked),
        },
        "best_grid_points": [
            {"grid_point": k, **table[k]["point"], "final": table[k]["curve"][-1]} for k in ranked[:8]
        ],
        "seconds": {"total": round(time.perf_counter() - started), "reference": reference_seconds, **seconds},
        "cost": "trial-epochs reported, all trials in arrival order, up to the first report >= target; "
        "seeds that never reach it are censored (infinite)",
        "pbt": pbt,
        "tune_check": check,
        "summary": summary,
        "runs": arms,
    }
    out = args.out / f"search_efficiency-{date}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(arms, target, args.out / f"search_efficiency-{date}.png", args.trials * args.epochs)
    print_table(summary)
    print(f"written to {out}", flush=True)


def print_table(summary: dict[str, Any]) -> None:
    print("| arm | median trial-epochs to target | seeds reaching it | ratio to random (95% CI) |")
    print("| --- | --- | --- | --- |")
    for arm, row in summary.items():
        m = row["median_trial_epochs_to_target"]
        ratio = (
            f"{row['ratio_to_random']} ({row['ratio_ci95'][0]}, {row['ratio_ci95'][1]})"
            if "ratio_to_random" in row
            else "1"
        )
        print(
            f"| {arm} | {m if m is not None else 'not reached'} | {row['reached']}/{row['seeds']} | {ratio} |"
        )


def _versions() -> dict[str, str]:
    import optuna
    import ray
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
    }


if __name__ == "__main__":
    main()
