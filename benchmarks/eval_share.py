"""The share of a sweep trial's time spent on evaluation (kNN) and checkpoints, at two cadences.

A CIFAR-like PatchMix trial scaled to a CPU: the recipe of
launch/experiments/patchmix_cifar10.yaml (method, optimiser, augmentation, kNN k 20 and 200)
on synthetic 32 px data in CIFAR's 5:1 train:test ratio, ViT-micro with 4 px patches (64
tokens) and the CPU benchmarks' head (512/128, so the head stays about 1% of the FLOPs as the
recipe's 4096/256 head does beside ViT-T/2), batch 128. The sweep's trials
(search_spaces/patchmix_cifar10.yaml: 200 epochs, ASHA grace 50, reduction 2, warm-up 100)
are scaled to ``--epochs``: grace and warm-up by the same factor (20 epochs: rungs 5, 10, 20).

Two arms, same config and seed, each a fresh trainer run through ``train_loop``:

- ``before``: the old loop (evaluation and checkpoint every epoch: ``eval_every=1``,
  ``checkpoint_every=1``);
- ``after``: the recipe's cadence (``eval_every=10``, ``checkpoint_every=10``) and the ASHA
  rungs as ``extra`` epochs.

The reporter does what a Tune trial's does: on checkpoint epochs it builds the state, writes
the folder with ``write_checkpoint`` into a temporary folder and copies it into a storage
folder (as Ray persists a reported checkpoint); that is timed as checkpoint time. Evaluation
time is the initial (epoch 0) evaluation, timed from the call of ``train_loop`` to its
"initial" report, plus ``eval_seconds`` of every evaluated epoch; training time is the sum of
``epoch_seconds``; "other" is the rest of the ``train_loop`` call, whose length is the trial's
total (building the trainer is recorded apart: synthetic data costs nothing like CIFAR's).
Arms are interleaved (before, after, after, before, ...) and medians reported.

Cross-checks: the evaluation share expected from FLOPs (``FlopCounterMode`` around one
``train_step`` and one ``evaluate``), and the measured unit costs projected onto the sweep's
own 200-epoch cadence (the scaled "after" trial evaluates 4 times in 20 epochs, the real one 21
times in 200, so the scaled "after" share overstates the real one about twofold).

Size: 384 training and 76 test images (3 steps an epoch) keep the default run (2 x 2 trials
of 20 epochs, one thread) near 10 minutes on 2 busy cores; the shares do not depend on it
much, as evaluation (1.2 forwards per training image) and training both scale with it.

    .venv/bin/python benchmarks/eval_share.py [--epochs 20] [--repeats 2] [--train-size 384]
        [--threads 1] [--out benchmarks/results]

No Ray needed. Writes <out>/eval_share-<date>.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils._pytree import tree_flatten

import raymix
from raymix.config import load_config
from raymix.engine.loop import Cadence, EpochEnd, train_loop
from raymix.engine.trainer import Trainer
from raymix.integrations.ray_train import write_checkpoint
from raymix.integrations.search_space import Scheduler
from raymix.methods import build_method

from counting import flop_counter
from machine import cpu_name, git

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "launch" / "experiments" / "patchmix_cifar10.yaml"
SPACE = ROOT / "search_spaces" / "patchmix_cifar10.yaml"
TEST_RATIO = 5  # CIFAR: 50,000 training and 10,000 test images
ARMS = ("before", "after")
COLUMNS = ("total", "training", "evaluation", "checkpoints", "other")


def sweep_settings() -> dict[str, Any]:
    """The sweep's trial length, ASHA scheduler and warm-up, and the recipe's cadence."""
    recipe = yaml.safe_load(RECIPE.read_text())
    space = yaml.safe_load(SPACE.read_text())
    return {
        "epochs": int(space["overrides"]["training.epochs"]),
        "scheduler": space["scheduler"],
        "warmup_epochs": float(recipe["optim"]["warmup_epochs"]),
        "eval_every": int(recipe["training"]["eval_every"]),
        "checkpoint_every": int(recipe["training"]["checkpoint_every"]),
    }


def scaled(epochs: int, sweep: dict[str, Any]) -> tuple[Scheduler, float]:
    """The sweep's ASHA scheduler and warm-up scaled from its trial length to ``epochs``."""
    factor = epochs / sweep["epochs"]
    spec = sweep["scheduler"]
    grace = max(1, round(spec["grace_period"] * factor))
    scheduler = Scheduler(type="asha", grace_period=grace, reduction_factor=spec["reduction_factor"])
    return scheduler, sweep["warmup_epochs"] * factor


def common_overrides(args: argparse.Namespace, warmup: float) -> list[str]:
    return [
        "data.name=synthetic", "data.image_size=32", f"data.synthetic_train_size={args.train_size}",
        f"data.synthetic_test_size={args.train_size // TEST_RATIO}", "backbone.name=vit_micro",
        "backbone.patch_size=4", "head.hidden_dim=512", "head.out_dim=128", "training.batch_size=128",
        "training.device=cpu", "training.progress=false", "eval.knn_k=[20, 200]",
        f"training.epochs={args.epochs}", f"optim.warmup_epochs={warmup:g}",
    ]  # fmt: skip


def arm_overrides(sweep: dict[str, Any]) -> dict[str, list[str]]:
    return {
        "before": ["training.eval_every=1", "training.checkpoint_every=1"],
        "after": [
            f"training.eval_every={sweep['eval_every']}",
            f"training.checkpoint_every={sweep['checkpoint_every']}",
        ],
    }


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


class TrialReport:
    """A Tune trial's report, timed: checkpoint folders written to a temporary folder, then
    copied into ``storage`` (as Ray persists them); evaluation and training seconds summed."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.started = 0.0
        self.initial_eval = 0.0
        self.eval_seconds = 0.0
        self.train_seconds = 0.0
        self.eval_epochs: list[int] = []
        self.checkpoint_seconds: list[float] = []
        self.checkpoint_bytes: list[int] = []

    def __call__(self, end: EpochEnd) -> None:
        if end.kind == "initial":  # arrives right after the initial evaluation
            self.initial_eval = time.perf_counter() - self.started
            self.eval_epochs.append(0)
            return
        metrics = end.metrics
        self.train_seconds += metrics["epoch_seconds"]
        if end.evaluated:
            self.eval_seconds += metrics["eval_seconds"]
            self.eval_epochs.append(int(metrics["epoch"]))
        if end.checkpoint and end.state is not None:
            start = time.perf_counter()
            state = end.state()
            with tempfile.TemporaryDirectory() as folder:
                write_checkpoint(state, metrics, folder)
                target = self.storage / f"checkpoint_epoch_{state['epoch']:04d}"
                shutil.copytree(folder, target)
            self.checkpoint_seconds.append(time.perf_counter() - start)
            self.checkpoint_bytes.append(folder_bytes(target))


def run_arm(overrides: list[str], extra: list[int], storage_root: Path) -> dict[str, Any]:
    """One trial of one arm: a fresh trainer through ``train_loop``; its time split."""
    cfg = load_config(RECIPE, overrides)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    setup = time.perf_counter() - start
    storage = Path(tempfile.mkdtemp(prefix="trial-", dir=storage_root))
    report = TrialReport(storage)
    try:
        report.started = time.perf_counter()
        last = train_loop(trainer, None, report, extra=extra, log=lambda line: None)
        total = time.perf_counter() - report.started
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    evaluation = report.initial_eval + report.eval_seconds
    checkpoints = sum(report.checkpoint_seconds)
    parts = {
        "total": total,
        "training": report.train_seconds,
        "evaluation": evaluation,
        "checkpoints": checkpoints,
        "other": total - report.train_seconds - evaluation - checkpoints,
    }
    return {
        "seconds": {key: round(value, 3) for key, value in parts.items()},
        "share": round((evaluation + checkpoints) / total, 4),
        "setup_seconds": round(setup, 3),
        "initial_eval_seconds": round(report.initial_eval, 3),
        "evaluations": len(report.eval_epochs),
        "eval_epochs": report.eval_epochs,
        "checkpoints": len(report.checkpoint_seconds),
        "checkpoint_bytes": sorted(set(report.checkpoint_bytes)),
        "checkpoint_seconds_each": [round(s, 4) for s in report.checkpoint_seconds],
        "final_knn_top1": round(float(last["knn_top1"]), 4),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over an arm's runs, per column and per unit (an epoch, an evaluation, a checkpoint)."""
    first = runs[0]
    med = {key: statistics.median(run["seconds"][key] for run in runs) for key in COLUMNS}
    each_eval = [run["seconds"]["evaluation"] / run["evaluations"] for run in runs]
    each_ckpt = [s for run in runs for s in run["checkpoint_seconds_each"]]
    return {
        "seconds": {key: round(value, 3) for key, value in med.items()},
        "share": round(statistics.median(run["share"] for run in runs), 4),
        "share_runs": [run["share"] for run in runs],
        "total_runs": [run["seconds"]["total"] for run in runs],
        "evaluations": first["evaluations"],
        "checkpoints": first["checkpoints"],
        "checkpoint_bytes": first["checkpoint_bytes"],
        "eval_seconds_each": round(statistics.median(each_eval), 4),
        "checkpoint_seconds_each": round(statistics.median(each_ckpt), 4),
    }


def count_flops(overrides: list[str]) -> dict[str, Any]:
    """FLOPs of one training step (a real batch, after one warm-up step) and of one evaluation."""
    cfg = load_config(RECIPE, overrides)
    trainer = Trainer(cfg)
    trainer.method.train()
    images, labels = next(iter(trainer.train_loader))
    trainer.train_step(images, labels)  # warm-up: allocator, lazy state
    with flop_counter() as step:
        trainer.train_step(images, labels)
    with flop_counter() as evaluation:
        trainer.evaluate()
    train_flops = step.get_total_flops() * trainer.steps_per_epoch
    eval_flops = evaluation.get_total_flops()
    images_seen = len(trainer.train_data) + len(trainer.test_data)
    return {
        "gflops_per_step": round(step.get_total_flops() / 1e9, 3),
        "steps_per_epoch": trainer.steps_per_epoch,
        "gflops_per_epoch": round(train_flops / 1e9, 2),
        "gflops_per_evaluation": round(eval_flops / 1e9, 2),
        "eval_images": images_seen,
        "evaluation_over_epoch": round(eval_flops / train_flops, 4),
    }


def recipe_checkpoint_bytes() -> int:
    """The recipe's own checkpoint (ViT-T/2, 4096/256 head) estimated: the method's state dict
    plus AdamW's two moments of every trainable parameter (float32), no data needed."""
    cfg = load_config(RECIPE, ["data.name=synthetic", "training.device=cpu"])
    torch.manual_seed(0)
    method = build_method(cfg)
    leaves = tree_flatten(method.state_dict())[0]
    state = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
    moments = sum(2 * p.numel() * 4 for p in method.parameters() if p.requires_grad)
    return state + moments


def flop_share(evaluations: int, epochs: int, ratio: float) -> float:
    """Evaluation's share of training + evaluation FLOPs."""
    return evaluations * ratio / (epochs + evaluations * ratio)


def projection(runs: dict[str, list[dict[str, Any]]], sweep: dict[str, Any], epochs: int) -> dict[str, Any]:
    """Unit costs pooled over every run of both arms (an epoch's training and other, an
    evaluation, a checkpoint: medians), on the sweep's own cadence of each arm."""
    every = [run for arm in ARMS for run in runs[arm]]
    per_epoch = statistics.median((r["seconds"]["training"] + r["seconds"]["other"]) / epochs for r in every)
    per_eval = statistics.median(r["seconds"]["evaluation"] / r["evaluations"] for r in every)
    per_ckpt = statistics.median(s for r in every for s in r["checkpoint_seconds_each"])
    real_epochs = sweep["epochs"]
    spec = sweep["scheduler"]
    rungs = Scheduler(
        type="asha", grace_period=spec["grace_period"], reduction_factor=spec["reduction_factor"]
    )
    marks = frozenset(rungs.rungs(real_epochs))
    cadences = {
        "before": Cadence(real_epochs, 1, 1),
        "after": Cadence(real_epochs, sweep["eval_every"], sweep["checkpoint_every"], marks),
    }
    out: dict[str, Any] = {
        "epochs": real_epochs,
        "rungs": sorted(marks),
        "unit_seconds": {
            "epoch": round(per_epoch, 3),
            "evaluation": round(per_eval, 3),
            "checkpoint": round(per_ckpt, 4),
        },
    }
    for arm, cadence in cadences.items():
        evals = 1 + sum(cadence.evaluates(e) for e in range(1, real_epochs + 1))
        ckpts = sum(cadence.checkpoints(e) for e in range(1, real_epochs + 1))
        ev, ck = evals * per_eval, ckpts * per_ckpt
        total = real_epochs * per_epoch + ev + ck
        out[arm] = {
            "evaluations": evals,
            "checkpoints": ckpts,
            "seconds": round(total, 1),
            "share": round((ev + ck) / total, 4),
        }
    return out


def print_tables(result: dict[str, Any]) -> None:
    arms, flops, proj = result["arms"], result["flops"], result["projection"]
    print(
        f"| arm | evaluations | checkpoints | bytes/checkpoint | total s | training s | evaluation s | "
        f"checkpoints s | other s | (eval + ckpt) / total |  ({result['epochs']} epochs, rungs "
        f"{result['rungs']}, {result['machine']}, {result['threads']} thread(s), median of "
        f"{result['repeats']})"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        row = arms[arm]
        secs = " | ".join(f"{row['seconds'][key]:.1f}" for key in COLUMNS)
        size = f"{statistics.median(row['checkpoint_bytes']) / 1e6:.1f} MB"
        runs = ", ".join(f"{s:.3f}" for s in row["share_runs"])
        print(
            f"| {arm} | {row['evaluations']} | {row['checkpoints']} | {size} | {secs} | "
            f"{row['share']:.3f} ({runs}) |"
        )
    unit = proj["unit_seconds"]
    print(
        f"\nPer unit (medians over both arms' runs): an epoch {unit['epoch']:.2f} s, an evaluation "
        f"{unit['evaluation']:.2f} s, a checkpoint {unit['checkpoint'] * 1000:.0f} ms; the recipe's own "
        f"checkpoint (ViT-T/2, 4096/256 head, AdamW) would be about "
        f"{result['recipe_checkpoint_bytes_estimate'] / 1e6:.0f} MB"
    )
    if not flops:
        print_projection(proj)
        return
    print(
        f"FLOPs: {flops['gflops_per_step']} GFLOP/step x {flops['steps_per_epoch']} steps = "
        f"{flops['gflops_per_epoch']} GFLOP/epoch; evaluation {flops['gflops_per_evaluation']} GFLOP "
        f"({flops['eval_images']} images) = {flops['evaluation_over_epoch']:.3f} epochs"
    )
    print("\n| arm | evaluation / (training + evaluation), FLOPs | measured |")
    print("|---|---|---|")
    for arm in ARMS:
        print(f"| {arm} | {result['flop_share'][arm]:.3f} | {result['measured_eval_share'][arm]:.3f} |")
    print_projection(proj)


def print_projection(proj: dict[str, Any]) -> None:
    print(
        f"\nProjected onto the sweep's {proj['epochs']}-epoch trial (rungs {proj['rungs']}) "
        "at these unit costs (checkpoints at this scale's size):"
    )
    print("| arm | evaluations | checkpoints | total s | (eval + ckpt) / total |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        row = proj[arm]
        print(
            f"| {arm} | {row['evaluations']} | {row['checkpoints']} | {row['seconds']} | {row['share']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="trial length (the sweep's 200, scaled)")
    parser.add_argument("--repeats", type=int, default=2, help="trials per arm, interleaved (median)")
    parser.add_argument(
        "--train-size", type=int, default=384, help=f"synthetic training images (test: 1/{TEST_RATIO})"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a Tune trial: cpus_per_worker)"
    )
    parser.add_argument("--storage", type=Path, default=None, help="where checkpoints are copied (temp)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP cross-check")
    args = parser.parse_args()
    if args.epochs < 1 or args.repeats < 1 or args.train_size < 2 * 128:
        raise SystemExit("--epochs and --repeats must be >= 1, --train-size >= 256")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    source = Path(raymix.__file__).resolve().parent
    if not source.is_relative_to(ROOT):
        print(f"warning: raymix from {source}, not the one beside this script", file=sys.stderr)

    sweep = sweep_settings()
    scheduler, warmup = scaled(args.epochs, sweep)
    rungs = scheduler.rungs(args.epochs)
    common = common_overrides(args, warmup)
    per_arm = arm_overrides(sweep)
    extra = {"before": [], "after": rungs}
    load = os.getloadavg()

    flops: dict[str, Any] = {}
    if not args.no_flops:  # also the warm-up of this process (imports, allocator, kernels)
        flops = count_flops([*common, *per_arm["before"]])
        gc.collect()
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    storage_root = Path(tempfile.mkdtemp(prefix="eval_share-", dir=args.storage))
    try:
        for repeat in range(args.repeats):
            for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
                run = run_arm([*common, *per_arm[arm]], extra[arm], storage_root)
                runs[arm].append(run)
                secs = ", ".join(f"{key} {value:.1f}" for key, value in run["seconds"].items())
                print(f"repeat {repeat + 1} {arm}: {secs} s; share {run['share']:.3f}", file=sys.stderr)
                gc.collect()
    finally:
        shutil.rmtree(storage_root, ignore_errors=True)

    arms = {arm: summarise(runs[arm]) for arm in ARMS}
    measured_eval_share = {
        arm: round(
            arms[arm]["seconds"]["evaluation"]
            / (arms[arm]["seconds"]["training"] + arms[arm]["seconds"]["evaluation"]),
            4,
        )
        for arm in ARMS
    }
    date = datetime.date.today().isoformat()
    result = {
        "date": date,
        "machine": cpu_name(),
        "threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_changes_in_raymix": git(
            "status", "--porcelain", "--untracked-files=all", "--", "."
        ).splitlines(),
        "base": str(RECIPE.relative_to(ROOT)),
        "config": common,
        "arm_overrides": per_arm,
        "extra_epochs": extra,
        "epochs": args.epochs,
        "rungs": rungs,
        "repeats": args.repeats,
        "order": "before, after, after, before, ... (alternating pairs)",
        "sweep": sweep,
        "arms": arms,
        "runs": runs,
        "measured_eval_share": measured_eval_share,
        "flops": flops,
        "recipe_checkpoint_bytes_estimate": recipe_checkpoint_bytes(),
        "flop_share": {},
        "projection": {},
    }
    if flops:
        ratio = flops["evaluation_over_epoch"]
        result["flop_share"] = {
            arm: round(flop_share(arms[arm]["evaluations"], args.epochs, ratio), 4) for arm in ARMS
        }
    result["projection"] = projection(runs, sweep, args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"eval_share-{date}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
