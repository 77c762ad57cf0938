"""Ray Train (V2): the engine on N workers through ``TorchTrainer``.

Three layers, as in Ray's guide: :func:`train_fn_per_worker` runs on every worker,
:func:`build_trainer` builds the ``TorchTrainer``, :func:`run` starts or joins Ray, checks
the request against the cluster and prints the outcome. The worker rebuilds the config
from a plain dict, so the same function serves Tune trials later.

Run folder: ``<storage_path>/<name>``, by default the run's ``training.output_dir``.
Ray keeps the best ``training.keep_checkpoints`` checkpoints by knn_top1 plus the latest;
each holds ``state.pt`` (what :meth:`Trainer.state_dict` returns plus the run summary).
Running the same run again resumes from the latest checkpoint; with
``scaling.max_failures >= 1`` a failed worker group restarts from it.

With ``tracking.enabled`` the run is one MLflow run (:mod:`raymix.integrations.run_tracking`),
written on the driver's node only: the driver opens it (or reopens the one the run folder
names, when Ray Train resumes a checkpoint), :class:`EpochRecorder` in Train's controller
(which Ray places on the driver's node) logs rank 0's metrics as they are reported, and the
driver logs the checkpoints and closes it. Workers never touch the store: a SQLite store on
the driver's disk works on any cluster, and a restarted worker group cannot open a second run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # the V2 types

from raymix.config import Config, ConfigError, config_from_dict
from raymix.data import build_datasets
from raymix.engine.checkpoint import check_writable, first_missing, load_checkpoint, save_checkpoint
from raymix.engine.loop import EpochEnd
from raymix.engine.run import RunFailedError
from raymix.integrations.cluster import check_shared_storage, init_ray, storage_key, storage_override

if TYPE_CHECKING:  # MLflow loads only for runs that it records
    from raymix.integrations.run_tracking import RunRecord, RunTracker

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"


# ---------------------------------------------------------------- the worker


def _restore(device: Any) -> dict[str, Any] | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / STATE_FILE, map_location=device)


def _maybe_fail(cfg: Config, epoch: int, run_dir: str) -> None:
    """Fault injection for tests: the last worker dies once, at the start of ``epoch``."""
    if (
        cfg.debug.fail_at_epoch != epoch
        or ray.train.get_context().get_world_rank() != cfg.scaling.num_workers - 1
    ):
        return
    marker = Path(run_dir) / f".failed_at_epoch_{epoch}"
    if marker.exists():
        return
    marker.touch()
    os._exit(1)  # an abrupt death, as a crashed or preempted worker


def write_checkpoint(state: dict[str, Any], metrics: dict[str, Any], folder: str | Path) -> None:
    """A checkpoint folder: ``state.pt`` and the reported metrics beside it (read by trackers)."""
    save_checkpoint(state, Path(folder) / STATE_FILE)
    (Path(folder) / METRICS_FILE).write_text(json.dumps(metrics, default=float))


def _report(end: EpochEnd) -> None:
    """Every rank reports each trained epoch (a barrier); rank 0 attaches the checkpoint."""
    if end.kind == "initial":
        return
    if not (end.checkpoint and end.state is not None):
        ray.train.report(end.metrics)
        return
    state = end.state()
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(state, end.metrics, folder)
        checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(
            end.metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{state['epoch']:04d}"
        )


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker: rebuild the config, restore the latest checkpoint, train, report every epoch.

    ``loop_config["extra_epochs"]``: epochs that evaluate and checkpoint besides the
    config's cadence (a sweep's ASHA rungs). ``loop_config["data"]``: an object-store
    reference to the datasets, built once by the driver (else each worker builds them).
    """
    from raymix.engine.loop import train_loop  # torch and timm load in the workers only
    from raymix.engine.trainer import Trainer
    from raymix.integrations.ray_data import use_ray_data

    cfg = config_from_dict(loop_config["config"])
    rank0 = ray.train.get_context().get_world_rank() == 0
    data = loop_config.get("data")
    datasets = ray.get(data) if data is not None else None
    trainer = Trainer(cfg, device=ray.train.torch.get_device(), data=datasets)
    use_ray_data(trainer)  # data.loader=ray: the same batches, decoded by Ray Data tasks
    train_loop(
        trainer,
        _restore(trainer.device),
        _report,
        extra=loop_config.get("extra_epochs", ()),
        rank0=rank0,
        before_epoch=lambda epoch: _maybe_fail(cfg, epoch, loop_config["run_dir"]),
    )


# ---------------------------------------------------------------- the driver


def run_location(cfg: Config) -> tuple[str, str]:
    """(storage_path, name) of the run: ``<storage>/run_name`` or the output folder.

    The storage is RAYMIX_STORAGE_PATH, else ``scaling.storage_path``.
    """
    storage = storage_override() or cfg.scaling.storage_path
    if storage:
        if "://" not in storage:
            storage = str(Path(storage).expanduser().resolve())
        return storage, cfg.run_name
    out = cfg.output_dir.expanduser().resolve()
    return str(out.parent), out.name


def build_trainer(
    cfg: Config,
    storage_path: str,
    name: str,
    *,
    callbacks: Sequence[Any] = (),
    score: tuple[str, str] = ("knn_top1", "max"),
    extra_epochs: Sequence[int] = (),
    data: Any = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` of one run; ``score`` ranks the checkpoints Ray keeps (by the
    latest evaluation each reports); ``extra_epochs`` evaluate and checkpoint besides the
    config's cadence; ``data``: an object-store reference to the run's datasets, if any."""
    scaling = cfg.scaling
    resources: dict[str, float] = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1.0  # one whole GPU per worker: NCCL refuses two workers on one device
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": str(Path(storage_path) / name),
            "extra_epochs": sorted(extra_epochs),
            "data": data,
        },
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        # ray.train.torch's stubs still name the V1 config types; V2 is what runs.
        run_config=RunConfig(  # type: ignore[arg-type]
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=scaling.max_failures, controller_failure_limit=3),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.training.keep_checkpoints,
                checkpoint_score_attribute=score[0],
                checkpoint_score_order=score[1],  # type: ignore[arg-type]
            ),
        ),
    )


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """Refuse at once what the cluster can never place, instead of a run pending forever."""
    scaling = cfg.scaling
    need = {"CPU": scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        need["GPU"] = float(scaling.num_workers)
    for kind, amount in need.items():
        have = available.get(kind, 0.0)
        if amount > have + 1e-9:
            per = "scaling.cpus_per_worker" if kind == "CPU" else "one GPU per worker"
            raise ConfigError(
                f"scaling.num_workers={scaling.num_workers} needs {amount:g} {kind} "
                f"({per}) but the Ray cluster has {have:g}"
            )


def check_storage(storage_path: str, name: str, key: str = "scaling.storage_path") -> None:
    """A local run folder must be writable before training starts; ``key`` names the setting."""
    if "://" in storage_path:
        return  # remote storage (s3://, gs://, ...) is checked by Ray when the run starts
    check_writable(Path(storage_path) / name, key)


def _best(result: Any) -> Any:
    """The best reported checkpoint by knn_top1, if any."""
    scored = [(m.get("knn_top1", -math.inf), c) for c, m in (result.best_checkpoints or [])]
    if not scored:
        return None
    return max(scored, key=lambda pair: pair[0])[1]


def best_checkpoint(result: Any) -> str | None:
    """Path of the state file of the best reported checkpoint by knn_top1."""
    checkpoint = _best(result)
    return None if checkpoint is None else str(Path(checkpoint.path) / STATE_FILE)


# ---------------------------------------------------------------- the MLflow record


class EpochRecorder(ray.train.UserCallback):
    """Rank 0's reported epochs into the run's MLflow record, from Train's controller."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            self.record.epoch(metrics[0])  # metrics[i]: world rank i's; rank 0 holds the evaluation


def has_checkpoint(storage_path: str, name: str) -> bool:
    """Whether the run folder holds a checkpoint that Ray Train will resume from."""
    import pyarrow.fs

    location = f"{storage_path.rstrip('/')}/{name}"
    try:
        if "://" in location:
            fs, path = pyarrow.fs.FileSystem.from_uri(location)
        else:
            fs, path = pyarrow.fs.LocalFileSystem(), location
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return False
    return any(
        i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in infos
    )


def close_record(record: RunRecord, result: Any) -> None:
    """The best and latest checkpoints (local copies of remote ones) into the record; FINISHED."""
    from raymix.integrations.run_tracking import CHECKPOINT_KINDS

    with ExitStack() as stack:
        folders = {
            kind: stack.enter_context(checkpoint.as_directory())
            for kind, checkpoint in (("best", _best(result)), ("last", result.checkpoint))
            if checkpoint is not None and kind in CHECKPOINT_KINDS[record.log_checkpoints]
        }
        record.finish(folders)


def absolute_paths(cfg: Config) -> Config:
    """Workers run in another working directory: make the data root absolute first."""
    if not cfg.data.root or "://" in cfg.data.root:
        return cfg
    raw = cfg.to_dict()
    raw["data"]["root"] = str(Path(cfg.data.root).expanduser().resolve())
    return config_from_dict(raw)


def run(cfg: Config, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``cfg`` with Ray Train; returns the final metrics and the best checkpoint's path.

    Raises :class:`ConfigError` before anything starts for requests the cluster cannot
    place and storage that cannot be written; a run that fails past its retries raises
    :class:`RunFailedError`.
    """
    cfg = absolute_paths(cfg)
    storage_path, name = run_location(cfg)
    tracker: RunTracker | None = None
    if cfg.tracking.enabled:
        from raymix.integrations.run_tracking import RunTracker

        tracker = RunTracker.connect(cfg)  # an MLflow server that does not answer stops the run here
    given = bool(storage_override() or cfg.scaling.storage_path)
    key = storage_key("scaling.storage_path")
    created = first_missing(f"{storage_path}/{name}")  # removed again if the run is refused
    check_storage(storage_path, name, key if given else "training.output_dir")  # needs no cluster
    started = training = False
    record: RunRecord | None = None
    # The datasets are built once, here, while Ray starts, and reach every worker through
    # the object store; a bad data setting fails before any worker starts.
    pool = ThreadPoolExecutor(1)
    datasets = pool.submit(build_datasets, cfg.data)
    pool.shutdown(wait=False)
    try:
        started = init_ray()
        check_resources(cfg, ray.cluster_resources())
        check_shared_storage(storage_path, given, key)
        data = ray.put(datasets.result())
        log(f"Ray Train: {cfg.scaling.num_workers} worker(s), run folder {Path(storage_path) / name}")
        if tracker is not None:
            resumed = has_checkpoint(storage_path, name)
            record = tracker.start(cfg, f"{storage_path}/{name}", resumed=resumed, log=log)
        training = True
        callbacks = [EpochRecorder(record)] if record else []
        result = build_trainer(cfg, storage_path, name, data=data, callbacks=callbacks).fit()
    except ray.train.TrainingFailedError as exc:
        error = RunFailedError(f"training failed after {cfg.scaling.max_failures} restart(s): {exc}")
        if record:
            record.fail(error)
        raise error from exc
    except ConfigError as exc:
        if not training and created is not None:  # refused before training: leave nothing behind
            shutil.rmtree(created, ignore_errors=True)
        if record:
            record.fail(exc)
        raise
    except BaseException as exc:
        if record:
            record.fail(exc)
        raise
    finally:
        if started:
            ray.shutdown()
    if record:
        close_record(record, result)
    metrics = dict(result.metrics or {})
    summary = {key: metrics[key] for key in ("epoch", "loss", "knn_top1", "knn_top1_init") if key in metrics}
    log("final: " + json.dumps(summary))
    return {
        **metrics,
        "best_checkpoint": best_checkpoint(result),
        "output_dir": str(Path(storage_path) / name),
    }
