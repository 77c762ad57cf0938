"""Start-up time of a Ray Train run, phase by phase, the way ``raymix train`` starts one.

Each repeat is a new Python process (as a user's ``raymix train`` is) that imports
``raymix.integrations.ray_train`` and calls ``run(cfg)`` with no Ray running: a private
local Ray starts, the ``TorchTrainer`` trains digits with a one-block ViT for one epoch
on ``--workers`` gloo workers of one CPU each, and Ray shuts down.

Timestamps (wall clock, one machine) come from the benchmark alone, never from raymix:
the driver wraps ``init_ray``, ``build_trainer`` and ``ray.shutdown``; two Ray Train
callbacks, one first and one last in the trainer's callback list, stamp the controller
and worker-group events; the worker function is wrapped to stamp its own imports (Ray
otherwise makes them while unpickling the function: same process, same cost), the data,
the ``Trainer``, the first step and the first report. Figures are medians.

    python benchmarks/ray_startup.py --label before [--repeats 3] [--workers 1 2]
    python benchmarks/ray_startup.py --variant before=/tmp/base --variant after=.  # interleaved

``--source`` / ``--variant`` measure other raymix trees (``git archive HEAD raymix | tar -x
-C /tmp/base``): the runs import raymix from there (checked), so a tree under edit elsewhere
does not disturb the figures. On a busy machine interleave the variants: each pair of runs
then shares the load, which the record notes (1-minute load average at each start).
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # before any heavy import: the driver's imports are a phase too

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.name=digits", "data.image_size=16", "backbone.patch_size=8", "backbone.depth=1",
    "head.hidden_dim=32", "head.out_dim=16", "training.batch_size=64", "training.progress=false",
    "eval.knn_k=[20]", "training.epochs=1", "scaling.backend=ray", "scaling.cpus_per_worker=1",
]  # fmt: skip

# Set in the child before the run; the worker function and the callbacks are pickled by
# value (they live in __main__), so they carry this path to the controller and workers.
EVENTS = ""


def stamp(event: str, **extra: Any) -> None:
    """Append one timestamped event to the events file (any process of the run)."""
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **extra})
    with open(EVENTS, "a") as f:
        f.write(line + "\n")


# ---------------------------------------------------------------- in the Ray processes


def loaded() -> list[str]:
    """Which of the heavy packages this process has imported so far."""
    heavy = ("torch", "torchvision", "timm", "sklearn", "raymix", "pandas", "mlflow", "optuna")
    return [name for name in heavy if name in sys.modules]


def timed_train_fn(loop_config: dict[str, Any]) -> None:
    """The project's worker function, with stamps around its imports and its first steps."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    stamp("fn_start", rank=rank, loaded=loaded())
    import raymix.engine.trainer as engine
    import raymix.integrations.ray_train as rt

    stamp("fn_imported", rank=rank, module=rt.__file__)
    firsts: set[str] = set()

    def once(event: str) -> None:
        if event not in firsts:
            firsts.add(event)
            stamp(event, rank=rank)

    def wrap(owner: Any, name: str, before: str | None, after: str | None) -> None:
        original = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before:
                once(before)
            out = original(*args, **kwargs)
            if after:
                once(after)
            return out

        setattr(owner, name, wrapped)

    wrap(engine, "build_datasets", "data_start", "data_end")
    wrap(engine.Trainer, "__init__", "trainer_start", "trainer_end")
    wrap(engine.Trainer, "evaluate", "eval0_start", "eval0_end")
    wrap(engine.Trainer, "train_step", "step1_start", "step1_end")
    wrap(ray.train, "report", "report1_start", "report1_end")  # Ray's own: a barrier of every rank
    rt.train_fn_per_worker(loop_config)
    stamp("fn_end", rank=rank)


def timing_callback(where: str) -> Any:
    """A Ray Train callback that stamps the controller, worker-group and worker events."""
    from ray.train.v2._internal.execution.callback import (
        ControllerCallback,
        WorkerCallback,
        WorkerGroupCallback,
    )

    class Timing(ControllerCallback, WorkerGroupCallback, WorkerCallback):
        def after_controller_start(self, train_run_context: Any) -> None:
            stamp(f"controller_started.{where}", loaded=loaded())

        def before_worker_group_start(self, worker_group_context: Any) -> None:
            stamp(f"wg_start.{where}")

        def after_worker_group_start(self, worker_group: Any) -> None:
            stamp(f"wg_started.{where}")

        def after_worker_group_training_start(self, worker_group: Any) -> None:
            stamp(f"wg_training.{where}")

        def before_worker_group_shutdown(self, worker_group: Any) -> None:
            stamp(f"wg_shutdown.{where}")

        def after_worker_group_shutdown(self, worker_group_context: Any) -> None:
            stamp(f"wg_down.{where}")

        async def before_controller_shutdown(self) -> None:
            stamp(f"controller_shutdown.{where}")

        def after_controller_finish(self, result: Any) -> None:
            stamp(f"controller_finished.{where}")

        def after_init_train_context(self) -> None:
            import ray.train

            stamp(f"worker_context.{where}", rank=ray.train.get_context().get_world_rank())

    return Timing()


# ---------------------------------------------------------------- one run (child process)


def child(workers: int, folder: Path) -> None:
    global EVENTS
    EVENTS = str(folder / "events.jsonl")
    stamp("process_start", t_override=T_PROCESS)
    import ray

    import raymix.integrations.ray_train as rt
    from raymix.config import load_config

    stamp("driver_imported")
    original_init, original_build, original_shutdown = rt.init_ray, rt.build_trainer, ray.shutdown

    def init_ray(*args: Any, **kwargs: Any) -> bool:
        stamp("init_start")
        started = original_init(*args, **kwargs)
        stamp("init_end")
        return started

    def build_trainer(*args: Any, **kwargs: Any) -> Any:
        trainer: Any = original_build(*args, **kwargs)  # fit() asks it for its callbacks
        defaults = trainer._create_default_callbacks
        trainer._create_default_callbacks = lambda: [
            timing_callback("first"),
            *defaults(),
            timing_callback("last"),
        ]
        stamp("fit_start")
        return trainer

    def shutdown(*args: Any, **kwargs: Any) -> None:
        stamp("shutdown_start")
        original_shutdown(*args, **kwargs)
        stamp("shutdown_end")

    rt.init_ray, rt.build_trainer, ray.shutdown = init_ray, build_trainer, shutdown
    rt.train_fn_per_worker = timed_train_fn
    cfg = load_config(
        None,
        [*TINY, f"scaling.num_workers={workers}", f"training.output_dir={folder / 'run'}"],
    )
    stamp("call")
    result = rt.run(cfg, log=lambda _: None)
    stamp("return", epoch=result.get("epoch"))


# ---------------------------------------------------------------- phases


def phases(events: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of each phase of one run from its events (rank 0's for worker events)."""
    t: dict[str, float] = {}
    for e in events:
        if e.get("rank", 0) != 0:
            continue
        t.setdefault(e["event"], e.get("t_override", e["t"]))  # first occurrence

    def span(a: str, b: str) -> float:
        return t[b] - t[a] if a in t and b in t else float("nan")

    return {
        "driver_imports": span("process_start", "driver_imported"),
        "ray_init": span("init_start", "init_end"),
        "driver_checks_build": span("init_end", "fit_start"),
        "controller_start": span("fit_start", "controller_started.first"),
        "to_worker_group_start": span("controller_started.first", "wg_start.first"),
        "placement_group_and_worker_actors": span("wg_start.first", "wg_started.first"),
        "backend_and_callbacks_setup": span("wg_started.first", "wg_started.last"),
        "launch_train_fn": span("wg_started.last", "fn_start"),
        "worker_imports": span("fn_start", "fn_imported"),
        "to_trainer": span("fn_imported", "trainer_start"),
        "data_loading": span("data_start", "data_end"),  # part of trainer_construction
        "trainer_construction": span("trainer_start", "trainer_end"),
        "initial_eval_and_restore": span("trainer_end", "step1_start"),  # kNN of the initial encoder
        "first_step": span("step1_start", "step1_end"),
        "first_epoch_to_report": span("step1_start", "report1_start"),  # with its evaluation
        "report_and_checkpoint": span("report1_start", "report1_end"),
        "fn_end": span("report1_end", "fn_end"),
        "controller_notices_end": span("fn_end", "wg_shutdown.first"),
        "worker_group_shutdown": span("wg_shutdown.first", "wg_down.last"),
        "controller_shutdown_callbacks": span("controller_shutdown.first", "controller_shutdown.last"),
        "controller_finish_to_driver": span("controller_shutdown.last", "shutdown_start"),
        "ray_shutdown": span("shutdown_start", "shutdown_end"),
        # Headline figures, from the call to run(cfg).
        "call_to_first_step": span("call", "step1_start"),
        "call_to_first_report": span("call", "report1_start"),
        "call_to_return": span("call", "return"),
        "process_total": span("process_start", "return"),
    }


def median(values: list[float]) -> float:
    """The median of the runs that have the phase (NaN: a phase that did not happen)."""
    present = [v for v in values if not math.isnan(v)]
    return statistics.median(present) if present else math.nan


def one_run(workers: int, source: str | None) -> tuple[dict[str, float], dict[str, Any]]:
    """One run in a new process; ``source``: a raymix tree imported instead of the installed one."""
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="ray_startup-") as tmp:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(workers), "--folder", tmp],
            capture_output=True, text=True, cwd=tmp, env=env, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"run with {workers} worker(s) failed:\n{proc.stderr[-4000:]}")
        events = [json.loads(line) for line in (Path(tmp) / "events.jsonl").read_text().splitlines()]
        modules = {e["module"] for e in events if "module" in e}
        expected = str(Path(source or ROOT).resolve())
        if not all(m.startswith(expected) for m in modules):
            raise RuntimeError(f"the workers imported raymix from {modules}, not from {expected}")
        loaded_at = {e["event"]: e["loaded"] for e in events if "loaded" in e}
        notes = {
            "controller": loaded_at.get("controller_started.first"),
            "worker_before_train_fn": loaded_at.get("fn_start"),
        }
        return phases(events), notes


def git_commit() -> str:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def table(figures: dict[str, dict[str, float]]) -> str:
    columns = list(figures)
    rows = [f"{'phase (median s)':36}" + "".join(f"{c:>22}" for c in columns)]
    for phase in next(iter(figures.values())):
        rows.append(f"{phase:36}" + "".join(f"{figures[c][phase]:22.2f}" for c in columns))
    return "\n".join(rows)


def no_nan(value: Any) -> Any:
    """The record with NaN (a phase that did not happen) as null: plain JSON."""
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="current")
    parser.add_argument(
        "--source", help="a raymix source tree (e.g. a `git archive` of a commit) to measure instead"
    )
    parser.add_argument(
        "--variant", action="append", metavar="LABEL=SOURCE", default=[],
        help="measure several source trees, their runs interleaved (fair on a busy machine); "
        "one record per label. Replaces --label/--source",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, Path(args.folder))
        return

    import ray
    import torch

    from machine import cpu_name

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "ray": ray.__version__}
    variants = dict(v.split("=", 1) for v in args.variant) or {args.label: args.source}
    keys = {w: f"{w}_worker" + ("s" if w > 1 else "") for w in args.workers}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {v: {k: [] for k in keys.values()} for v in variants}
    loads: dict[str, dict[str, list[float]]] = {v: {k: [] for k in keys.values()} for v in variants}
    notes: dict[str, dict[str, Any]] = {v: {} for v in variants}
    for i in range(args.repeats):
        for workers, key in keys.items():
            for label, source in variants.items():
                loads[label][key].append(os.getloadavg()[0])
                figures_one, notes[label][key] = one_run(workers, source or None)
                runs[label][key].append(figures_one)
                print(f"{label} {key} #{i + 1}: {figures_one['call_to_return']:.1f} s to return", flush=True)
    for label, source in variants.items():
        figures = {
            key: {phase: median([r[phase] for r in rs]) for phase in rs[0]} for key, rs in runs[label].items()
        }
        print(f"{label}:\n{table(figures)}")
        record = {
            "benchmark": "ray_startup",
            "label": label,
            "date": date.today().isoformat(),
            "device": f"cpu x{os.cpu_count()} ({cpu_name()})",
            "commit": git_commit(),
            "source": source or str(ROOT),
            "interleaved_with": [v for v in variants if v != label],
            "versions": versions,
            "config": TINY,
            "repeats": args.repeats,
            "environment": {k: v for k, v in os.environ.items() if k.startswith(("RAY_TRAIN_", "RAYMIX_"))},
            "load_average_1min_at_start": loads[label],
            "median_s": figures,
            "packages_imported": notes[label],
            "runs_s": runs[label],
        }
        out = Path(args.out) / f"ray_startup-{label}-{record['date']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(no_nan(record), indent=2) + "\n")
        print(f"written {out}")


if __name__ == "__main__":
    main()
