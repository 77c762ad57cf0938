"""Search efficiency on digits: TPE + ASHA against random search with the same trial budget.

For each seed, the quickstart's search space (temperature, learning rate, crop scale)
runs twice with the same number of trials, one trial at a time:

- random search, every trial trained for all epochs;
- TPE (Optuna, multivariate, ``--startup`` random trials first) with the space's ASHA
  pruning as the quickstart ships it (grace period 2 epochs, reduction factor 2;
  ``--grace`` sets another grace period).

The target is the best final knn_top1 that random search found. Each arm's cost to reach
it is the trial-epochs trained, in the order trials ran, until a trial reports a value at
or above the target (counting that trial's epochs up to that report). Random search
reaches it by construction; TPE + ASHA may not (reported as null). The ratio is random's
trial-epochs over TPE + ASHA's.

    python benchmarks/search_efficiency.py [--seeds 3] [--trials 12] [--epochs 6] [--startup 4] [--grace N]

Writes benchmarks/results/search_efficiency-<date>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
import yaml

from raymix.integrations import sweep

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"


def space_file(folder: Path, arm: str, seed: int, args: argparse.Namespace) -> Path:
    space = yaml.safe_load(QUICKSTART.read_text())
    space["base"] = str(QUICKSTART.parent / space["base"])
    space["overrides"] = {
        **space.get("overrides", {}),
        "training.epochs": args.epochs,
        "training.progress": False,
        "training.seed": seed,
    }
    space.pop("points_to_evaluate", None)  # both arms start from their own samples
    space.update(
        name=f"{arm}-{seed}",
        storage_path=str(folder / "sweeps"),
        num_samples=args.trials,
        max_concurrent_trials=1,
    )
    if arm == "random":
        space["searcher"] = {"type": "random", "seed": seed}
        space["scheduler"] = {"type": "none"}
    else:
        space["searcher"] = {
            "type": "tpe",
            "seed": seed,
            "multivariate": True,
            "n_startup_trials": args.startup,
        }
        if args.grace is not None:
            space["scheduler"] = {**space["scheduler"], "grace_period": args.grace}
    path = folder / f"{arm}-{seed}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def histories(sweep_path: Path) -> list[list[float]]:
    """knn_top1 per reported epoch of every trial, in the order the trials started."""
    trials = []
    for progress in sweep_path.glob("trial_*/progress.csv"):
        with progress.open() as handle:
            reports = list(csv.DictReader(handle))
        if reports:
            values = [float(r["knn_top1"]) for r in reports]
            trials.append((float(reports[0]["timestamp"]), values))
    return [values for _, values in sorted(trials)]


def epochs_to_reach(trials: list[list[float]], target: float) -> int | None:
    spent = 0
    for values in trials:
        for value in values:
            spent += 1
            if value >= target - 1e-9:
                return spent
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12, help="trial budget of each arm")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of a trial that is not pruned")
    parser.add_argument("--startup", type=int, default=4, help="TPE's random trials before it models")
    parser.add_argument("--grace", type=int, help="ASHA's grace period in epochs (default: the space's)")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        ray.init(address="local", num_cpus=args.cpus)
        try:
            for seed in range(args.seeds):
                found = {}
                for arm in ("random", "tpe_asha"):
                    sweep.run_sweep(space_file(folder, arm, seed, args), log=lambda _: None)
                    found[arm] = histories(folder / "sweeps" / f"{arm}-{seed}")
                target = max(values[-1] for values in found["random"])
                row: dict[str, Any] = {"seed": seed, "target_knn_top1": round(target, 4)}
                for arm, trials in found.items():
                    row[f"{arm}_trial_epochs_total"] = sum(len(v) for v in trials)
                    row[f"{arm}_trial_epochs_to_target"] = epochs_to_reach(trials, target)
                    row[f"{arm}_best_knn_top1"] = round(max(max(v) for v in trials), 4)
                reached = row["tpe_asha_trial_epochs_to_target"]
                row["ratio"] = round(row["random_trial_epochs_to_target"] / reached, 3) if reached else None
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            ray.shutdown()
    record = {
        "benchmark": "search_efficiency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({args.cpus} cores), {cpu_name()}",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "ray": ray.__version__,
            "optuna": optuna.__version__,
        },  # fmt: skip
        "options": vars(args),
        "space": str(QUICKSTART.relative_to(ROOT)),
        "tpe_asha_scheduler": yaml.safe_load(QUICKSTART.read_text())["scheduler"]
        | ({"grace_period": args.grace} if args.grace is not None else {}),
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / f"search_efficiency-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print("| seed | target | random: epochs to target / total | TPE+ASHA: epochs to target / total | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        tpe = row["tpe_asha_trial_epochs_to_target"]
        print(
            f"| {row['seed']} | {row['target_knn_top1']} | {row['random_trial_epochs_to_target']} / "
            f"{row['random_trial_epochs_total']} | {tpe if tpe else 'not reached'} / "
            f"{row['tpe_asha_trial_epochs_total']} | {row['ratio'] or '-'} |"
        )
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
