"""Per-trial start-up overhead of a sweep: in-process trials against Ray Train trials.

Runs the same small sweep (digits, a one-block ViT, FIFO, one trial at a time) with
trials of 1 and of 3 epochs, in both trial modes: in-process (the engine inside the Tune
trial, what single-worker sweeps use) and Ray Train with one worker (``scaling.backend=ray``).
A trial's wall time is its MLflow child run's duration (opened when Tune starts the
trial, closed when it ends). With T1 and T3 the mean durations, an epoch costs
(T3 - T1) / 2 and the start-up overhead is T1 minus one epoch.

    python benchmarks/trial_overhead.py [--trials 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from raymix.integrations import sweep

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "data.image_size": 16,
    "backbone.patch_size": 8,
    "backbone.depth": 1,
    "head.hidden_dim": 32,
    "head.out_dim": 16,
    "training.batch_size": 64,
    "training.progress": False,
    "eval.knn_k": [20],
    "scaling.cpus_per_worker": 1.0,
}


def trial_seconds(folder: Path, mode: str, epochs: int, trials: int) -> list[float]:
    name = f"{mode}-{epochs}"
    space = {
        "base": str(ROOT / "launch" / "experiments" / "digits.yaml"),
        "overrides": {
            **BASE,
            "training.epochs": epochs,
            "scaling.backend": "ray" if mode == "train" else "auto",
        },
        "storage_path": str(folder / "sweeps"),
        "num_samples": trials,
        "max_concurrent_trials": 1,
        "scheduler": {"type": "none"},
        "searcher": {"type": "random", "seed": 0},
        "params": {"optim.lr": {"type": "float", "low": 2e-3, "high": 4e-3}},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    sweep.run_sweep(path, log=lambda _: None)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("raymix")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`raymix.sweep` = '{folder / 'sweeps' / name}'"
    )
    parent = runs[0].info.run_id
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return [(r.info.end_time - r.info.start_time) / 1000 for r in children]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        ray.init(address="local", num_cpus=2)
        try:
            for mode in ("in-process", "train"):
                t1 = statistics.mean(trial_seconds(folder, mode, 1, args.trials))
                t3 = statistics.mean(trial_seconds(folder, mode, 3, args.trials))
                epoch = (t3 - t1) / 2
                figures[mode] = {
                    "trial_1_epoch_s": t1,
                    "trial_3_epochs_s": t3,
                    "epoch_s": epoch,
                    "startup_s": t1 - epoch,
                }
                print(mode, json.dumps({k: round(v, 2) for k, v in figures[mode].items()}), flush=True)
        finally:
            ray.shutdown()
    record = {
        "benchmark": "trial_overhead",
        "date": date.today().isoformat(),
        "device": f"cpu x{os.cpu_count()} ({cpu_name()})",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "ray": ray.__version__},
        "trials_per_point": args.trials,
        "figures": figures,
        "startup_ratio_train_over_in_process": figures["train"]["startup_s"]
        / figures["in-process"]["startup_s"],
    }
    out = Path(args.out) / f"trial_overhead-{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
