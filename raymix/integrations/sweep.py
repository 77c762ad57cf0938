"""Sweeps: Ray Tune with Optuna (TPE, NSGA-II or random; its study in a storage optuna-dashboard
reads, see :mod:`raymix.integrations.study`) and ASHA over the engine.

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
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from raymix.config import Config, ConfigError
from raymix.engine.checkpoint import first_missing, load_checkpoint
from raymix.engine.loop import EpochEnd, train_loop
from raymix.engine.run import config_changes
from raymix.integrations import capacity, cluster, leaderboard, pbt, ray_train, stopping, study, tracking
from raymix.integrations.plan import Sweep, prepare
from raymix.integrations.search_space import (
    SearchSpace,
    SearchSpaceError,
    encode_point,
    sample,
    trial_config,
)

TRAIN_FOLDER = "train"
TRIAL_DRIVER_CPU = 0.01  # the Tune process of a Ray Train trial only waits; Tune refuses 0


# ---------------------------------------------------------------- the trials


def _tune_report(end: EpochEnd, extra: dict[str, Any] | None = None) -> None:
    """Report an epoch to Tune (with its checkpoint on checkpoint epochs); ``extra``: values
    added to every epoch's metrics (a PBT trial's current hyperparameters)."""
    if end.kind == "initial":
        return
    metrics = {**end.metrics, **(extra or {})}
    if not (end.checkpoint and end.state is not None):
        ray.tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        ray_train.write_checkpoint(end.state(), metrics, folder)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


def trial_in_process(point: dict[str, Any], *, space: dict[str, Any], base: dict[str, Any]) -> None:
    """A single-worker trial: the engine in the Tune trial's own process.

    It continues from the checkpoint Tune hands it, if any: its own (a retried trial, a
    resumed sweep) or, under PBT, another trial's, with ``point`` holding the perturbed
    values. The trainer is built from ``point``'s config and only the state is restored,
    so the new values of :data:`raymix.config.MUTABLE_KEYS` apply from the next step.
    """
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
    sp = SearchSpace.model_validate(space)
    rungs = sp.scheduler.rungs(cfg.training.epochs)
    hp = pbt.trial_values(cfg, sp, base)  # PBT/PB2: the values it trains with, reported each epoch
    if state is not None and hp:
        shown = ", ".join(f"{k.removeprefix(pbt.HP_PREFIX)}={v}" for k, v in hp.items())
        print(f"[{trial_id}] continues after epoch {int(state['epoch'])} with {shown}", flush=True)
    train_loop(
        trainer,
        state,
        lambda end: _tune_report(end, hp),
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


def trial_shape(sweep: Sweep) -> capacity.Shape:
    """How one trial's reservation is placed: its process on one node, or its Ray Train
    workers each on one node (and their trial driver's sliver of a CPU anywhere)."""
    need = trial_resources(sweep)
    if in_process(sweep.config):
        return capacity.Shape(need, 1, need)
    scaling = sweep.config.scaling
    worker = {"CPU": scaling.cpus_per_worker, "GPU": float(scaling.use_gpu)}
    return capacity.Shape(worker, scaling.num_workers, need)


def concurrency_plan(
    sweep: Sweep, now: dict[str, float] | capacity.Cluster, most: capacity.Cluster | None = None
) -> capacity.Plan:
    """``max_concurrent_trials`` (see :func:`raymix.integrations.capacity.plan`): the space's
    (or ``--max-concurrent``), else how many trials the cluster's maximum holds at once;
    ``now``: the nodes alive (a dict: one node), ``most``: the autoscaler's maximum, if known."""
    nodes = now if isinstance(now, capacity.Cluster) else capacity.Cluster.of_nodes([now])
    return capacity.plan(
        trial_shape(sweep),
        nodes,
        most,
        explicit=sweep.space.max_concurrent_trials,
        num_samples=sweep.space.num_samples,
    )


def concurrency(
    sweep: Sweep, now: dict[str, float] | capacity.Cluster, most: capacity.Cluster | None = None
) -> int:
    return concurrency_plan(sweep, now, most).limit


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


def searcher(sweep: Sweep) -> study.StudySearch | pbt.BasicVariantGenerator:
    """The new sweep's searcher over its Optuna study (named after the sweep), one objective or
    several (``objectives``: Optuna gets every metric and mode; Tune's scheduler the first).

    PBT and PB2 take no search algorithm: their population is drawn by Tune's random sampling.
    """
    if pbt.enabled(sweep.space):
        return pbt.variants(sweep)
    space, base = sweep.space, sweep.base
    targets = space.targets
    multi = space.multi_objective
    return study.StudySearch(
        space=DefineByRun(space, base),
        metric=[t.metric for t in targets] if multi else space.metric,
        mode=[t.mode for t in targets] if multi else space.mode,
        sampler=study.sampler(space.searcher),
        study_name=sweep.name,
        storage=study.new_study_storage(sweep),
        points_to_evaluate=[encode_point(space, p) for p in space.points_to_evaluate] or None,
        epochs=sweep.config.training.epochs,
    )


def scheduler(sweep: Sweep) -> ASHAScheduler | FIFOScheduler | pbt.PopulationBasedTraining:
    s = sweep.space.scheduler
    if s.type == "none":
        return FIFOScheduler()
    if pbt.enabled(sweep.space):
        return pbt.scheduler(sweep)
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
    optuna_storage: str | None = None,
    controls: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> leaderboard.Board:
    """Run (or, with ``resume``, continue) a sweep; returns its leaderboard.

    Bad input (the space, the folder, the cluster's resources, the tracking store) raises
    :class:`ConfigError` before any trial starts. ``optuna_storage``: the study's storage
    instead of the space's ``searcher.storage`` (see :mod:`raymix.integrations.study`).
    ``controls``: sweep controls that replace the space's (``time_budget``, ``stop``,
    ``max_concurrent_trials``, ``gpus_per_trial``: the ``raymix tune`` flags).
    """
    sweep = study.with_storage(prepare(space_path, overrides, name, num_samples, controls), optuna_storage)
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
        room = concurrency_plan(sweep, capacity.live_nodes(), capacity.autoscaler_maximum())
        limit = room.limit
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
        if room.now < limit:
            wait = f"{room.source} to add nodes" if room.autoscaling else "a trial to finish"
            log(f"{room.now:g} trial(s) fit the cluster now; the others wait for {wait}")
        stopper = stopping.sweep_stopper(sweep.space)
        if stopper is not None:
            log(f"the sweep stops early at {stopping.describe(sweep.space)}")
        log(pbt.describe(sweep) if pbt.enabled(sweep.space) else study.describe(sweep))
        if resume:
            tuner = ray.tune.Tuner.restore(sweep.path, trainable(sweep), resume_unfinished=True)
        else:
            tuner = ray.tune.Tuner(
                trainable(sweep),
                param_space=pbt.param_space(sweep),  # PBT/PB2 only: Optuna samples the others
                tune_config=ray.tune.TuneConfig(
                    metric=sweep.space.metric,
                    mode=sweep.space.mode,
                    search_alg=searcher(sweep),
                    scheduler=scheduler(sweep),
                    num_samples=sweep.space.num_samples,
                    max_concurrent_trials=None if pbt.enabled(sweep.space) else limit,  # PBT: all at once
                    trial_name_creator=trial_dirname,
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=ray.tune.RunConfig(
                    name=sweep.name,
                    storage_path=sweep.storage_path,
                    callbacks=[recorder] if recorder else [],
                    failure_config=ray.tune.FailureConfig(max_failures=sweep.space.max_failures),
                    stop=stopper,
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
    stopped = stopper.reason if stopper is not None else None  # None on --resume: Tune's own copy
    try:  # with Ray shut down: what follows reads only the sweep folder
        board = leaderboard.load(sweep.path)
        if stopped and recorder:
            recorder.client.set_tag(recorder.parent_run_id, "raymix.stopped", stopped)
        with tempfile.TemporaryDirectory() as tmp:
            skipped = leaderboard.render(board, Path(tmp))
            leaderboard.publish(Path(tmp), sweep.path)
            tracking.close_sweep(recorder, board, Path(tmp))
    except Exception as exc:
        tracking.fail_sweep(recorder, exc)
        raise
    for plot, why in skipped.items():
        log(f"plot {plot} skipped: {why}")
    if stopped:
        log(f"sweep stopped early: {stopped}; running trials were stopped, finished trials are kept")
    log(board.format())
    return board
