"""Does each method beat its base? Every method and its base on the bundled digits at the
quickstart scale (launch/experiments/digits.yaml: ViT-micro, 16 px, batch 64, 20 epochs),
the same seeds for every arm.

Pairs (method vs base, each arm with its defaults plus the overrides below):
- patchmix, unmix (v3 base), snclr vs moco (the MoCo v3 base of the quickstart);
- unmix on the MoCo v2 base vs moco on the MoCo v2 base (as the released Un-Mix code);
- selfcon (one view, one exit) and selfcon-m (two views, one exit) vs SupCon (two views,
  no exit).

Each run's knn_top1 (k = 20, the quickstart's first k) on the held-out quarter of digits
after the last epoch is the measure; the best epoch would reward noise. Reported: the mean
and standard error of each arm over seeds, and for each pair the mean paired difference
(same seed: same initialisation of the shared modules, same data order and crops) with
its 95% t interval. Results go to benchmarks/results/method_gains-<date>.json after every
run, so an interrupted study resumes (``--resume FILE``).

    python benchmarks/method_gains.py                 # 9 arms x 5 seeds, ~35 min on 2 cores
    python benchmarks/method_gains.py --seeds 10 --arms moco-v2 unmix-v2
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "launch" / "experiments" / "digits.yaml"
RESULTS = ROOT / "benchmarks" / "results"

# MoCo v2 base at this scale: a momentum encoder keeps the queue's keys consistent (MoCo v2,
# Un-Mix CIFAR: constant 0.99) and a queue of 1,024 keys (about 0.75 of an epoch of 1,347
# training images). The heads keep their BatchNorm: with MoCo v2's plain heads
# (head.norm=none) MoCo v2 reached knn_top1 0.56-0.58 after 20 epochs (seeds 0, 1; MoCo v3:
# 0.91-0.92), and 0.41-0.50 against 0.74 with BatchNorm in 10-epoch runs (the results file's
# "diagnostics"): a base that weak says nothing about Un-Mix at this budget.
V2 = ["method.base=v2", "method.queue_size=1024", "method.momentum=0.99", "method.momentum_schedule=constant"]
ARMS: dict[str, list[str]] = {
    "moco-v3": [],
    "patchmix": ["method.name=patchmix"],
    "unmix-v3": ["method.name=unmix"],
    "snclr": ["method.name=snclr", "method.bank_size=1024", "method.num_neighbors=5"],
    "moco-v2": V2,
    "unmix-v2": ["method.name=unmix", *V2],
    "supcon": ["method.name=selfcon", "method.views=2", "method.exits=[false,false,false]"],
    "selfcon": ["method.name=selfcon"],
    # SelfCon with SupCon's two views: the exit's share of a difference to SupCon, at equal views.
    "selfcon-m": ["method.name=selfcon", "method.views=2"],
}
PAIRS: list[tuple[str, str]] = [
    ("patchmix", "moco-v3"),
    ("unmix-v3", "moco-v3"),
    ("snclr", "moco-v3"),
    ("unmix-v2", "moco-v2"),
    ("selfcon", "supcon"),
    ("selfcon-m", "supcon"),
]


def train(job: tuple[str, int, list[str], int]) -> dict[str, Any]:
    """Train one arm with one seed in this process; knn_top1 after every ``eval_every`` epochs."""
    arm, seed, extra, threads = job
    import torch

    torch.set_num_threads(threads)
    from raymix.config import load_config
    from raymix.engine.trainer import Trainer

    overrides = [*ARMS[arm], *extra, f"training.seed={seed}", "training.progress=false"]
    trainer = Trainer(load_config(DIGITS, overrides))
    start, curve = time.perf_counter(), {}
    every = 5
    while trainer.epoch < trainer.cfg.training.epochs:
        trainer.train_epoch()
        if trainer.epoch % every == 0 or trainer.epoch == trainer.cfg.training.epochs:
            curve[trainer.epoch] = round(float(trainer.evaluate()["knn_top1"]), 5)
    final = curve[trainer.cfg.training.epochs]
    return {"arm": arm, "seed": seed, "knn_top1": final, "curve": curve,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return mean, se


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_arm: dict[str, dict[int, float]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run["knn_top1"]
    arms = {}
    for arm, values in by_arm.items():
        mean, se = mean_se(list(values.values()))
        arms[arm] = {"n": len(values), "mean": round(mean, 4), "se": round(se, 4)}
    pairs = []
    for method, base in PAIRS:
        if method not in by_arm or base not in by_arm:
            continue
        seeds = sorted(set(by_arm[method]) & set(by_arm[base]))
        diffs = [by_arm[method][s] - by_arm[base][s] for s in seeds]
        if len(diffs) < 2:
            continue
        mean, se = mean_se(diffs)
        half = t_quantile(len(diffs) - 1) * se
        pairs.append({
            "method": method, "base": base, "seeds": len(diffs), "diff": round(mean, 4), "se": round(se, 4),
            "ci95": [round(mean - half, 4), round(mean + half, 4)],
            "wins": sum(d > 0 for d in diffs),
        })  # fmt: skip
    return {"arms": arms, "pairs": pairs}


def print_table(summary: dict[str, Any]) -> None:
    print("| arm | seeds | knn_top1 mean ± SE |")
    print("| --- | --- | --- |")
    for arm, row in summary["arms"].items():
        print(f"| {arm} | {row['n']} | {row['mean']:.3f} ± {row['se']:.3f} |")
    print()
    print("| method − base | seeds | mean paired difference (95% t interval) | seeds won |")
    print("| --- | --- | --- | --- |")
    for p in summary["pairs"]:
        low, high = p["ci95"]
        print(f"| {p['method']} − {p['base']} | {p['seeds']} | {p['diff']:+.3f} ({low:+.3f} to {high:+.3f}) "
              f"| {p['wins']}/{p['seeds']} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 for every arm")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--resume", type=Path, help="a results file to extend (runs in it are kept)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    parser.add_argument("--out", type=Path, help="results file (default: results/method_gains-<date>.json)")
    args = parser.parse_args()

    out = args.resume or args.out or RESULTS / f"method_gains-{datetime.date.today()}.json"
    record: dict[str, Any] = json.loads(out.read_text()) if args.resume else {
        "benchmark": "method_gains", "config": str(DIGITS.relative_to(ROOT)), "overrides": args.set,
        "arms": ARMS, "measure": "knn_top1 (k=20) after the last epoch, digits held-out quarter",
        "machine": platform.processor() or platform.machine(), "date": str(datetime.date.today()),
        "runs": [],
    }  # fmt: skip
    record["arms"] = ARMS
    done = {(r["arm"], r["seed"]) for r in record["runs"]}
    jobs = [(arm, seed, record["overrides"], 1) for seed in range(args.seeds) for arm in args.arms
            if (arm, seed) not in done]  # fmt: skip
    print(f"{len(jobs)} runs to do, {len(done)} kept; writing {out}", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for run in pool.imap_unordered(train, jobs):
            record["runs"].append(run)
            record["summary"] = summarise(record["runs"])
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(out)
            print(f"{run['arm']:>9} seed {run['seed']}: knn_top1 {run['knn_top1']:.3f} "
                  f"({run['seconds']:.0f} s)", flush=True)  # fmt: skip
    print_table(record["summary"])


if __name__ == "__main__":
    main()
