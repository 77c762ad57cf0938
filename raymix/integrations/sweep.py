"""Sweeps: Ray Tune with Optuna (TPE or random) and ASHA over the engine.

``raymix tune SPACE.yaml`` runs :func:`run_sweep`. Every trial is one point of the space
(see :mod:`raymix.integrations.search_space`) trained by one of two trainables:

- one worker (``scaling.num_workers=1``, ``scaling.backend`` not ``ray``): the engine runs
  inside the Tune trial itself, which reports and checkpoints through ``ray.tune``. This
  avoids a Ray Train controller and worker group per trial (see the README for the
  measured start-up cost);
- several workers: the trial runs a ``TorchTrainer`` (``ray_train.build_trainer``) with
  Tune's report callback, one whole GPU per worker when ``scaling.use_gpu``.

Sweep folder ``<storage_path>/<name>``: Tune's experiment state, one folder per trial
(with its checkpoints), ``train/<trial_id>`` for Ray Train trials, ``sweep.yaml`` (the
resolved space and base config, compared on ``--resume``), ``leaderboard.csv`` and plots.
All MLflow writes happen here, in the driver (:mod:`raymix.integrations.tracking`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.tune
import torch
import yaml
from optuna.samplers import RandomSampler, TPESampler
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from raymix.config import Config, ConfigError, check_name
from raymix.engine.checkpoint import first_missing, load_checkpoint
from raymix.engine.loop import EpochEnd, train_loop
from raymix.engine.run import config_changes
from raymix.integrations import cluster, leaderboard, ray_train, tracking
from raymix.integrations.search_space import (
    SearchSpace,
    SearchSpaceError,
    config_for,
    encode_point,
    load_search_space,
    sample,
    trial_config,
)

TRAIN_FOLDER = "train"
TRIAL_DRIVER_CPU = 0.01  # the Tune process of a Ray Train trial only waits; Tune refuses 0


@dataclass(frozen=True)
class Sweep:
    space: SearchSpace
    base: dict[str, Any]
    source: str  # the space file
    storage_path: str
    name: str
    storage_given: bool = True  # False: the local default ./sweeps, refused on multi-node clusters

    @property
    def path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def config(self) -> Config:
        """The base config (what every trial starts from)."""
        return config_for(self.base, {})

    def resolved(self) -> dict[str, Any]:
        """What defines the sweep: the space and its base config (saved as ``sweep.yaml``)."""
        return {"space": self.space.model_dump(mode="json"), "base": self.base}


def prepare(
    space_path: str | Path,
    overrides: list[str] | None = None,
    name: str | None = None,
    num_samples: int | None = None,
) -> Sweep:
    """Load and check the space; resolve the sweep's folder and the data root to absolute paths."""
    space, base = load_search_space(space_path, overrides)
    if num_samples is not None:
        space = space.model_copy(update={"num_samples": num_samples})
    cfg = ray_train.absolute_paths(config_for(base, {}))
    if cfg.data.root:
        base = {**base, "data": {**base.get("data", {}), "root": cfg.data.root}}
    given = cluster.storage_override() or space.storage_path
    storage = given or "sweeps"
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    if name is not None:
        stem = check_name(name, "--name")
    elif space.name is not None:
        stem = space.name
    else:
        stem = check_name(Path(space_path).stem, "the space file's stem (set --name)")
    return Sweep(space, base, str(Path(space_path).resolve()), storage, stem, storage_given=bool(given))


# ---------------------------------------------------------------- the trials


def _tune_report(end: EpochEnd) -> None:
    if end.kind == "initial":
        return
    if not (end.checkpoint and end.state is not None):
        ray.tune.report(end.metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        ray_train.write_checkpoint(end.state(), end.metrics, folder)
        ray.tune.report(end.metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


def trial_in_process(point: dict[str, Any], *, space: dict[str, Any], base: dict[str, Any]) -> None:
    """A single-worker trial: the engine in the Tune trial's own process."""
    cfg = trial_config(point, space, base)
    torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))
    from raymix.engine.trainer import Trainer  # in the trial's process only

    trainer = Trainer(cfg)
    state = None
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / ray_train.STATE_FILE, map_location=trainer.device)
    trial_id = ray.tune.get_context().get_trial_id()
    rungs = SearchSpace.model_validate(space).scheduler.rungs(cfg.training.epochs)
    train_loop(
        trainer,
        state,
        _tune_report,
        extra=rungs,
        log=lambda line: print(f"[{trial_id}] {line}", flush=True),
    )


def trial_with_train(
    point: dict[str, Any], *, space: dict[str, Any], base: dict[str, Any], train_root: str
) -> None:
    """A multi-worker trial: a ``TorchTrainer`` whose reports reach Tune through the callback.

    Its run folder is ``train_root/<trial_id>``: started again (driver resumed, trial
    retried), Ray Train resumes it from its latest checkpoint.
    """
    cfg = trial_config(point, space, base)
    sp = SearchSpace.model_validate(space)
    trainer = ray_train.build_trainer(
        cfg,
        train_root,
        ray.tune.get_context().get_trial_id(),
        callbacks=[TuneReportCallback()],
        score=(sp.metric, sp.mode),
        extra_epochs=sp.scheduler.rungs(cfg.training.epochs),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RuntimeError(f"Ray Train failed: {exc}") from None


# ---------------------------------------------------------------- resources


def in_process(cfg: Config) -> bool:
    """A trial trains in its own process; else through Ray Train (several workers,
    ``scaling.backend=ray`` or Ray Data decoding with ``data.loader=ray``)."""
    return cfg.scaling.num_workers == 1 and cfg.scaling.backend != "ray" and cfg.data.loader != "ray"


def trial_resources(sweep: Sweep) -> dict[str, float]:
    """What one trial reserves: its own process, or its trial driver plus the worker group."""
    scaling = sweep.config.scaling
    if in_process(sweep.config):
        gpu = sweep.space.gpus_per_trial if scaling.use_gpu else 0.0
        return {"CPU": scaling.cpus_per_worker, "GPU": gpu}
    workers = scaling.num_workers
    return {
        "CPU": TRIAL_DRIVER_CPU + workers * scaling.cpus_per_worker,
        "GPU": float(workers * scaling.use_gpu),
    }


def concurrency(sweep: Sweep, cluster: dict[str, float]) -> int:
    """``max_concurrent_trials``: the space's, else how many trials the cluster holds at once."""
    need = trial_resources(sweep)
    fits = [cluster.get(kind, 0.0) / amount for kind, amount in need.items() if amount > 0]
    most = math.floor(min(fits) + 1e-9)
    if most < 1:
        have = {kind: cluster.get(kind, 0.0) for kind in need}
        raise ConfigError(f"one trial needs {need} but the Ray cluster has {have}; lower scaling.*")
    wanted = sweep.space.max_concurrent_trials or most
    return max(1, min(wanted, sweep.space.num_samples))


def trainable(sweep: Sweep) -> Any:
    """The Tune trainable with the resources its own process reserves.

    A Ray Train trial's process only waits for its worker group, which reserves the
    workers' resources itself: the trial takes a sliver of a CPU, not the group's share.
    """
    space = sweep.space.model_dump(mode="json")
    if in_process(sweep.config):
        need = trial_resources(sweep)
        fn = ray.tune.with_parameters(trial_in_process, space=space, base=sweep.base)
        return ray.tune.with_resources(fn, {"cpu": need["CPU"], "gpu": need["GPU"]})
    train_root = f"{sweep.path}/{TRAIN_FOLDER}"
    fn = ray.tune.with_parameters(trial_with_train, space=space, base=sweep.base, train_root=train_root)
    return ray.tune.with_resources(fn, {"cpu": TRIAL_DRIVER_CPU})


# ---------------------------------------------------------------- search


@dataclass(frozen=True)
class DefineByRun:
    """Optuna's define-by-run space (a class, not a closure: Tune pickles the searcher)."""

    space: SearchSpace
    base: dict[str, Any]

    def __call__(self, trial: Any) -> None:
        sample(trial, self.space, self.base)


def searcher(sweep: Sweep) -> OptunaSearch:
    space, base = sweep.space, sweep.base
    s = space.searcher
    sampler = (
        TPESampler(seed=s.seed, multivariate=s.multivariate, n_startup_trials=s.n_startup_trials)
        if s.type == "tpe"
        else RandomSampler(seed=s.seed)
    )

    return OptunaSearch(
        space=DefineByRun(space, base),
        metric=space.metric,
        mode=space.mode,
        sampler=sampler,
        points_to_evaluate=[encode_point(space, p) for p in space.points_to_evaluate] or None,
    )


def scheduler(sweep: Sweep) -> ASHAScheduler | FIFOScheduler:
    s = sweep.space.scheduler
    if s.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=s.max_t or sweep.config.training.epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        stop_last_trials=True,  # a max_t below training.epochs stops every trial there
    )


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------- the driver


def _check_resume(sweep: Sweep, resume: bool) -> None:
    exists = ray.tune.Tuner.can_restore(sweep.path)
    if exists and not resume:
        raise SearchSpaceError(
            f"sweep {sweep.path} already exists: add --resume to continue it, or --name NAME for a new one"
        )
    if resume and not exists:
        raise SearchSpaceError(f"--resume: there is no sweep to continue at {sweep.path}")
    if resume:
        saved = yaml.safe_load(leaderboard.read_text(f"{sweep.path}/{leaderboard.SWEEP_FILE}"))
        changed = config_changes(saved, sweep.resolved())
        if changed:
            raise SearchSpaceError(
                f"--resume: the space differs from the one {sweep.path} was started with "
                f"({', '.join(changed)}); start a new sweep with --name NAME"
            )


def run_sweep(
    space_path: str | Path,
    overrides: list[str] | None = None,
    *,
    name: str | None = None,
    resume: bool = False,
    num_samples: int | None = None,
    log: Callable[[str], None] = print,
) -> leaderboard.Board:
    """Run (or, with ``resume``, continue) a sweep; returns its leaderboard.

    Bad input (the space, the folder, the cluster's resources, the tracking store) raises
    :class:`ConfigError` before any trial starts.
    """
    sweep = prepare(space_path, overrides, name, num_samples)
    tracking.check_reachable(sweep.config.tracking)
    _check_resume(sweep, resume)
    created = first_missing(sweep.path)  # removed again if the sweep is refused before its trials
    key = cluster.storage_key("storage_path")
    ray_train.check_storage(sweep.storage_path, sweep.name, key)  # creates the local folder
    started = False
    recorder: tracking.TrialRecorder | None = None
    fitting = False
    try:
        started = ray_train.init_ray()
        ray_train.check_resources(sweep.config, ray.cluster_resources())
        limit = concurrency(sweep, ray.cluster_resources())
        cluster.check_shared_storage(sweep.storage_path, sweep.storage_given, key)
        recorder = tracking.open_sweep(sweep, resume=resume)
        if not resume:
            leaderboard.write_text(
                f"{sweep.path}/{leaderboard.SWEEP_FILE}", yaml.safe_dump(sweep.resolved(), sort_keys=False)
            )
        shown = tracking.redact_uri(recorder.uri) if recorder else ""
        where = f"MLflow {shown} (parent run {recorder.parent_run_id})" if recorder else "no MLflow"
        mode = "in-process" if in_process(sweep.config) else f"Ray Train x{sweep.config.scaling.num_workers}"
        log(f"sweep {sweep.path}: {sweep.space.num_samples} trials ({mode}), up to {limit} at once, " + where)
        if resume:
            tuner = ray.tune.Tuner.restore(sweep.path, trainable(sweep), resume_unfinished=True)
        else:
            tuner = ray.tune.Tuner(
                trainable(sweep),
                tune_config=ray.tune.TuneConfig(
                    metric=sweep.space.metric,
                    mode=sweep.space.mode,
                    search_alg=searcher(sweep),
                    scheduler=scheduler(sweep),
                    num_samples=sweep.space.num_samples,
                    max_concurrent_trials=limit,
                    trial_name_creator=trial_dirname,
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=ray.tune.RunConfig(
                    name=sweep.name,
                    storage_path=sweep.storage_path,
                    callbacks=[recorder] if recorder else [],
                    failure_config=ray.tune.FailureConfig(max_failures=sweep.space.max_failures),
                    checkpoint_config=ray.tune.CheckpointConfig(
                        num_to_keep=sweep.config.training.keep_checkpoints,
                        checkpoint_score_attribute=sweep.space.metric,
                        checkpoint_score_order=sweep.space.mode,
                    ),
                    verbose=1,
                ),
            )
        # Save Tune's state often, so a killed driver loses at most a second of bookkeeping.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
        fitting = True
        tuner.fit()
    except ConfigError:
        if not fitting and created:  # refused before any trial: leave nothing behind
            tracking.discard_sweep(recorder)
            shutil.rmtree(created, ignore_errors=True)
        raise
    except Exception as exc:  # an interrupted sweep's parent stays RUNNING: --resume continues it
        tracking.fail_sweep(recorder, exc)
        raise
    finally:
        if started:
            ray.shutdown()
    try:  # with Ray shut down: what follows reads only the sweep folder
        board = leaderboard.load(sweep.path)
        with tempfile.TemporaryDirectory() as tmp:
            skipped = leaderboard.render(board, Path(tmp))
            leaderboard.publish(Path(tmp), sweep.path)
            tracking.close_sweep(recorder, board, Path(tmp))
    except Exception as exc:
        tracking.fail_sweep(recorder, exc)
        raise
    for plot, why in skipped.items():
        log(f"plot {plot} skipped: {why}")
    log(board.format())
    return board
