"""Orchestration overhead: the same training steps in the engine, in Ray Train and in a Tune trial.

Three paths train the quickstart digits config for the same epochs, kNN and checkpoint
only after the last one:

- the in-process engine (``raymix train``, one worker);
- Ray Train with one worker (``scaling.backend=ray``: controller, worker group, reports);
- a Tune trial of a one-point sweep (the engine inside the trial, as single-worker sweeps run).

Training speed is steps over the seconds spent inside the epochs (``train_seconds``);
start-up is the rest of the path's wall time (Ray, the controller or trial, data loading,
the final kNN and checkpoint). A trial's wall time is its MLflow run's duration. Runs are
interleaved so a slow spell of a shared machine hits every path alike; medians.

    python benchmarks/overhead.py [--epochs 10] [--repeats 3] [--cpus 2]

Writes benchmarks/results/overhead-<date>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from raymix.config import load_config
from raymix.engine.run import fit
from raymix.integrations import ray_train, sweep

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "launch" / "experiments" / "digits.yaml"
PATHS = ("in-process engine", "Ray Train, 1 worker", "Tune trial")


def run_engine(folder: Path, overrides: list[str]) -> dict[str, float]:
    cfg = load_config(DIGITS, [*overrides, f"training.output_dir={folder / 'run'}"])
    start = time.perf_counter()
    if cfg.scaling.backend == "ray":
        result = ray_train.run(cfg, log=lambda _: None)
    else:
        result = fit(cfg, log=lambda _: None, progress=False)
    return {
        "wall": time.perf_counter() - start,
        "train": float(result["train_seconds"]),
        "epochs": result["epoch"],
    }


def run_trial(folder: Path, overrides: list[str]) -> dict[str, float]:
    values = {}
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    space = {
        "base": str(DIGITS),
        "overrides": values,
        "storage_path": str(folder / "sweeps"),
        "num_samples": 1,
        "scheduler": {"type": "none"},
        "searcher": {"type": "random", "seed": 0},
        "params": {"optim.lr": {"type": "categorical", "choices": [4.0e-3]}},  # the config's own value
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    sweep.run_sweep(path, log=lambda _: None)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("raymix")
    assert experiment is not None
    (parent,) = client.search_runs(
        [experiment.experiment_id], f"tags.`raymix.sweep` = '{folder}/sweeps/space'"
    )
    (child,) = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    return {
        "wall": (child.info.end_time - child.info.start_time) / 1000,
        "train": child.data.metrics["train_seconds"],
        "epochs": child.data.metrics["epoch"],
    }


def measure(path: str, epochs: int, cpus: int) -> dict[str, Any]:
    common = [f"training.epochs={epochs}", "training.eval_every=0", f"training.checkpoint_every={epochs}"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if path == "in-process engine":
            got = run_engine(folder, [*common, "scaling.backend=local"])
        elif path == "Ray Train, 1 worker":
            got = run_engine(folder, [*common, "scaling.backend=ray", f"scaling.cpus_per_worker={cpus}"])
        else:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
            got = run_trial(folder, [*common, f"scaling.cpus_per_worker={cpus}", "training.progress=false"])
    cfg = load_config(DIGITS, [])
    steps = int(got["epochs"]) * (1347 // cfg.training.batch_size)  # digits' training split, drop_last
    return {
        "path": path,
        "steps": steps,
        "steps_per_second": round(steps / got["train"], 3),
        "train_seconds": round(got["train"], 2),
        "startup_seconds": round(got["wall"] - got["train"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each path")
    parser.add_argument(
        "--cpus", type=int, default=2, help="CPUs of the local Ray and of the worker or trial"
    )
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    ray.init(address="local", num_cpus=args.cpus)
    try:
        for _ in range(args.repeats):
            runs += [measure(path, args.epochs, args.cpus) for path in PATHS]
    finally:
        ray.shutdown()
    summary = []
    for path in PATHS:
        mine = [r for r in runs if r["path"] == path]
        summary.append(
            {
                "path": path,
                "steps": mine[0]["steps"],
                **{
                    key: statistics.median(float(r[key]) for r in mine)
                    for key in ("steps_per_second", "train_seconds", "startup_seconds")
                },
            }
        )
    base = summary[0]["steps_per_second"]
    for row in summary:
        row["steps_per_second_ratio"] = round(row["steps_per_second"] / base, 3)
    record = {
        "benchmark": "overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({args.cpus} cores), {cpu_name()}",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "ray": ray.__version__},
        "epochs": args.epochs,
        "medians": summary,
        "runs": runs,
    }
    out = ROOT / "benchmarks" / "results" / f"overhead-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"medians of {args.repeats} interleaved runs of {args.epochs} epochs")
    print("| path | steps | steps/s | ratio to in-process | train s | start-up s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in summary:
        print(
            f"| {row['path']} | {row['steps']} | {row['steps_per_second']:.2f} "
            f"| {row['steps_per_second_ratio']:.3f} | {row['train_seconds']:.1f} "
            f"| {row['startup_seconds']:.1f} |"
        )
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
