"""Steps per second of the in-process engine against Ray Train with one worker.

Same config, same steps: the quickstart digits config with kNN and checkpoints only
after the last epoch. Training speed is steps over the seconds spent inside the
epochs; start-up (Ray, the Train controller, the worker, data loading) is reported
separately as the wall time that is not training.

    .venv/bin/python benchmarks/train_overhead.py [--epochs 10] [--repeats 3] [--cpus 2]

Writes benchmarks/results/train_overhead-<date>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from raymix.config import load_config
from raymix.engine.run import fit
from raymix.integrations import ray_train

ROOT = Path(__file__).resolve().parents[1]


def measure(name: str, overrides: list[str]) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            ROOT / "launch/experiments/digits.yaml", [*overrides, f"training.output_dir={out}/run"]
        )
        start = time.perf_counter()
        if cfg.scaling.backend == "ray":
            result = ray_train.run(cfg, log=lambda _: None)
        else:
            result = fit(cfg, log=lambda _: None, progress=False)
        wall = time.perf_counter() - start
    steps = int(result["epoch"]) * (1347 // cfg.training.batch_size)
    train = float(result["train_seconds"])
    return {
        "path": name,
        "steps": steps,
        "train_seconds": round(train, 2),
        "steps_per_second": round(steps / train, 3),
        "wall_seconds": round(wall, 2),
        "startup_and_eval_seconds": round(wall - train, 2),
        "knn_top1": round(float(result["knn_top1"]), 4),
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each path")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray and of the one worker")
    args = parser.parse_args()
    common = [
        f"training.epochs={args.epochs}",
        "training.eval_every=0",
        f"training.checkpoint_every={args.epochs}",
    ]
    paths = {
        "in-process engine": [*common, "scaling.backend=local"],
        "Ray Train, 1 worker": [*common, "scaling.backend=ray", f"scaling.cpus_per_worker={args.cpus}"],
    }
    runs: list[dict[str, float | str]] = []
    ray.init(address="local", num_cpus=args.cpus)
    try:
        # Interleaved, so that a slow spell of a shared machine hits both paths alike.
        for _ in range(args.repeats):
            runs += [measure(name, overrides) for name, overrides in paths.items()]
    finally:
        ray.shutdown()
    summary = []
    for name in paths:
        mine = [r for r in runs if r["path"] == name]
        summary.append(
            {
                "path": name,
                "steps": mine[0]["steps"],
                "steps_per_second": median([float(r["steps_per_second"]) for r in mine]),
                "train_seconds": median([float(r["train_seconds"]) for r in mine]),
                "startup_and_eval_seconds": median([float(r["startup_and_eval_seconds"]) for r in mine]),
                "knn_top1": mine[0]["knn_top1"],
            }
        )
    ratio = float(summary[1]["steps_per_second"]) / float(summary[0]["steps_per_second"])
    record = {
        "benchmark": "train_overhead",
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({args.cpus} cores), {platform.processor() or platform.machine()}",
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "medians": summary,
        "runs": runs,
        "ray_over_local_steps_per_second": round(ratio, 3),
    }
    out = ROOT / "benchmarks/results" / f"train_overhead-{record['date']}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"medians of {args.repeats} interleaved runs")
    print("| path | steps | steps/s | train s | start-up + eval s | knn_top1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in summary:
        print(
            f"| {row['path']} | {row['steps']} | {row['steps_per_second']:.2f} | {row['train_seconds']:.1f} "
            f"| {row['startup_and_eval_seconds']:.1f} | {row['knn_top1']} |"
        )
    print(f"Ray / in-process steps per second: {ratio:.3f}  (written to {out.relative_to(ROOT)})")


if __name__ == "__main__":
    main()
