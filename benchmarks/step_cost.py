"""What one training step of each method costs on the CPU: FLOPs, host syncs and steps per second.

Every method (and a few variants: ``<method>_no_momentum`` drops the momentum encoder,
``patchmix_mix_prob_1`` mixes on every step) trains method_step.py's ``cpu`` scale (the
quickstart's ViT at 16 px, batch 64) through ``Trainer.train_step`` on one fixed uint8 batch,
after warm-up steps:

- FLOPs per step, exact: ``torch.utils.flop_counter.FlopCounterMode`` around whole steps
  (augmentation, forward, backward, optimiser, EMA: whatever it counts; CPU fused attention
  counted too), on ``--flop-steps`` consecutive steps (they should agree). Split by operator
  and by phase: ``forward`` builds the autograd graph, ``no_grad`` does not (augmentation,
  key encoders, bank look-ups), ``backward`` runs inside it.
- Host syncs per step, by kind, with every call site: ``raymix.engine.syncs.SyncCounter``
  around each of ``--sync-steps`` steps.
- Steps per second: median of ``--repeats`` runs of ``--steps`` steps, the variants
  interleaved so machine noise hits all alike; a fresh trainer for each run.

    .venv/bin/python benchmarks/step_cost.py [--steps 20] [--repeats 3] [--methods moco,snclr]
        [--label before] [--out benchmarks/results] [--threads 1]

No Ray needed. Writes <out>/step_cost-<label>-<date>.json (machine, torch, the git commit
of the raymix that ran, overrides, one row per variant) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from method_step import METHOD_OVERRIDES, SCALES
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import raymix
from raymix.config import METHOD_NAMES, load_config
from raymix.engine.syncs import SyncCounter
from raymix.engine.trainer import Trainer

from counting import flop_counter
from machine import cpu_name, git

ROOT = Path(__file__).resolve().parents[1]
SCALE = "cpu"
NO_MOMENTUM = ["method.momentum=null"]
# Variants beyond each method's defaults: name -> (method, overrides after the method's own).
EXTRA_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "moco_no_momentum": ("moco", NO_MOMENTUM),
    "patchmix_mix_prob_1": ("patchmix", ["method.mix_prob=1.0"]),  # never a step without mixing
    "unmix_no_momentum": ("unmix", NO_MOMENTUM),
    "snclr_no_momentum": ("snclr", NO_MOMENTUM),
}
PHASES = ("forward", "no_grad", "backward")


def variants() -> dict[str, tuple[str, list[str]]]:
    """Every variant in order: each method with its defaults, then its extra variants."""
    table: dict[str, tuple[str, list[str]]] = {}
    for method in METHOD_NAMES:
        table[method] = (method, [])
        table.update({name: v for name, v in EXTRA_VARIANTS.items() if v[0] == method})
    return table


def select(spec: str | None) -> dict[str, tuple[str, list[str]]]:
    """The variants named in ``spec`` (comma-separated; a method name brings its variants too)."""
    table = variants()
    if not spec:
        return table
    wanted = {token.strip() for token in spec.split(",") if token.strip()}
    unknown = wanted - set(table) - set(METHOD_NAMES)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; allowed: {', '.join(table)}")
    return {name: v for name, v in table.items() if name in wanted or v[0] in wanted}


def overrides(method: str, extra: list[str]) -> list[str]:
    own = METHOD_OVERRIDES.get((method, SCALE), [])
    return [*SCALES[SCALE], f"method.name={method}", *own, *extra, "training.progress=false"]


def build(method: str, extra: list[str], warmup: int) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    """A trainer of ``method`` with ``extra`` overrides, one fixed batch, ``warmup`` steps taken."""
    cfg = load_config(None, overrides(method, extra))
    trainer = Trainer(cfg)
    size, batch = cfg.data.image_size, cfg.training.batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, cfg.data.synthetic_classes, (batch,), generator=generator)
    images, labels = images.to(trainer.device), labels.to(trainer.device)
    trainer.method.train()
    for _ in range(warmup):
        trainer.train_step(images, labels)
    return trainer, images, labels


# ---------------------------------------------------------------- FLOPs


def phase() -> str:
    """The phase of the operator being dispatched (see PHASES)."""
    current_node = getattr(torch._C, "_current_autograd_node", lambda: None)
    return "backward" if current_node() is not None else "forward"


class PhaseSplit(TorchDispatchMode):
    """Entered inside a FlopCounterMode: what each operator added to its total, by phase."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.flops: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        before = self.counter.get_total_flops()
        out = func(*args, **(kwargs or {}))
        added = self.counter.get_total_flops() - before
        if added:
            name = phase()
            if name == "forward":
                tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
                    name = "no_grad"
            self.flops[name] += added
        return out


def count_flops(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, steps: int) -> dict[str, Any]:
    """FLOPs of ``steps`` consecutive steps; the first one's split by operator and phase."""
    totals: list[int] = []
    by_op: dict[str, int] = {}
    by_phase: Counter[str] = Counter()
    for i in range(steps):
        counter = flop_counter()
        with counter, PhaseSplit(counter) as split:
            trainer.train_step(images, labels)
        totals.append(int(counter.get_total_flops()))
        if i == 0:
            by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
            by_phase = split.flops
    first = totals[0]
    return {
        "flops_per_step": first,
        "gflops_per_step": round(first / 1e9, 4),
        "flops_of_counted_steps": totals,
        "flops_equal_across_steps": len(set(totals)) == 1,
        "gflops_by_phase": {p: round(by_phase.get(p, 0) / 1e9, 4) for p in PHASES},
        "flops_by_op": {
            op: {"gflops": round(n / 1e9, 4), "share": round(n / first, 4) if first else 0.0}
            for op, n in sorted(by_op.items(), key=lambda item: -item[1])
        },
    }


# ---------------------------------------------------------------- syncs


def call_site() -> str:
    """The innermost raymix frame of the current stack (else the innermost outside torch)."""
    stack = traceback.extract_stack()
    frames = [
        f
        for f in stack
        if Path(f.filename).name != "syncs.py" and "/raymix/" in f.filename.replace("\\", "/")
    ]
    if not frames:
        frames = [f for f in stack if "torch" not in f.filename and f.filename != __file__] or stack
    frame = frames[-1]
    path = frame.filename.replace("\\", "/")
    path = path[path.rfind("/raymix/") + 1 :] if "/raymix/" in path else path
    return f"{path}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


class SiteCounter(SyncCounter):
    """SyncCounter that also counts every call site (``sites``), not only the first of each kind."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        before = Counter(self.counts)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if sum(self.counts.values()) != sum(before.values()):
            site = call_site()
            for kind, added in (self.counts - before).items():
                self.sites[(kind, site)] += added
        return out


def count_syncs(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, steps: int) -> dict[str, Any]:
    """Host syncs of ``steps`` steps, one SyncCounter each: per-step means by kind and call site."""
    kinds: Counter[str] = Counter()
    sites: Counter[tuple[str, str]] = Counter()
    where: dict[str, str] = {}
    totals: list[int] = []
    for _ in range(steps):
        with SiteCounter() as counter:
            trainer.train_step(images, labels)
        kinds.update(counter.counts)
        sites.update(counter.sites)
        totals.append(sum(counter.counts.values()))
        for kind, place in counter.where.items():
            where.setdefault(kind, place.replace(str(ROOT) + "/", ""))
    return {
        "syncs_per_step": round(sum(totals) / steps, 3),
        "syncs_of_counted_steps": totals,
        "syncs_per_step_by_kind": {k: round(n / steps, 3) for k, n in sorted(kinds.items())},
        "sync_first_site": where,
        "sync_sites": [
            {"kind": kind, "per_step": round(n / steps, 3), "site": site}
            for (kind, site), n in sorted(sites.items(), key=lambda item: (item[0][0], -item[1]))
        ],
    }


# ---------------------------------------------------------------- time


def time_steps(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Seconds per training step over ``steps`` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(images, labels)
    return (time.perf_counter() - start) / steps


def measure(chosen: dict[str, tuple[str, list[str]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for name, (method, extra) in chosen.items():
        trainer, images, labels = build(method, extra, args.warmup)
        rows[name] = {"variant": name, "method": method, "overrides": extra, "batch_size": images.shape[0]}
        rows[name].update(count_flops(trainer, images, labels, args.flop_steps))
        rows[name].update(count_syncs(trainer, images, labels, args.sync_steps))
        print(f"counted {name}: {rows[name]['gflops_per_step']} GFLOP, "
              f"{rows[name]['syncs_per_step']} syncs per step", file=sys.stderr)  # fmt: skip
        del trainer
        gc.collect()
    seconds: dict[str, list[float]] = {name: [] for name in chosen}
    for repeat in range(args.repeats):
        for name, (method, extra) in chosen.items():
            trainer, images, labels = build(method, extra, args.warmup)
            seconds[name].append(time_steps(trainer, images, labels, args.steps))
            del trainer
            gc.collect()
        print(f"timed repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
    for name, row in rows.items():
        step = statistics.median(seconds[name])
        row["steps_per_second"] = round(1 / step, 3)
        row["images_per_second"] = round(row["batch_size"] / step, 1)
        row["steps_per_second_runs"] = [round(1 / s, 3) for s in seconds[name]]
        row["achieved_gflops_per_second"] = round(row["flops_per_step"] / step / 1e9, 2)
    return list(rows.values())


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each ``<method>_no_momentum`` against ``<method>``: FLOPs and steps/s."""
    by_name = {row["variant"]: row for row in rows}
    out = {}
    for name, row in by_name.items():
        base = by_name.get(name.removesuffix("_no_momentum"))
        if name.endswith("_no_momentum") and base is not None:
            out[f"{name}/{base['variant']}"] = {
                "flops": round(row["flops_per_step"] / base["flops_per_step"], 4),
                "steps_per_second": round(row["steps_per_second"] / base["steps_per_second"], 3),
            }
    return out


# ---------------------------------------------------------------- report


def short(op: str) -> str:
    """An operator's name for a table header: aten._scaled_dot_product_..._backward -> sdpa bwd."""
    name = op.removeprefix("aten.").replace("_scaled_dot_product_flash_attention_for_cpu", "sdpa")
    return name.replace("convolution", "conv").replace("_backward", " bwd")


def print_tables(result: dict[str, Any]) -> None:
    rows = result["rows"]
    print(
        f"| variant | GFLOP/step | forward / no-grad / backward GFLOP | same FLOPs each step | "
        f"syncs/step by kind | steps/s | images/s |  ({result['label']}, {result['git_commit']}, "
        f"{result['machine']}, {result['threads']} thread(s), median of {result['repeats']} x "
        f"{result['steps']} steps)"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        phases = " / ".join(str(row["gflops_by_phase"][p]) for p in PHASES)
        kinds = ", ".join(f"{k} {n:g}" for k, n in row["syncs_per_step_by_kind"].items()) or "0"
        same = (
            "yes"
            if row["flops_equal_across_steps"]
            else "NO: " + ", ".join(map(str, row["flops_of_counted_steps"]))
        )
        print(
            f"| {row['variant']} | {row['gflops_per_step']} | {phases} | {same} | {kinds} | "
            f"{row['steps_per_second']} | {row['images_per_second']} |"
        )
    ops = sorted({op for row in rows for op in row["flops_by_op"]})
    print("\n| variant | " + " | ".join(short(op) for op in ops) + " |  (share of the step's FLOPs)")
    print("|---|" + "---|" * len(ops))
    for row in rows:
        shares = [f"{row['flops_by_op'][op]['share']:.3f}" if op in row["flops_by_op"] else "-" for op in ops]
        print(f"| {row['variant']} | " + " | ".join(shares) + " |")
    print("\n| variant | kind | per step | call site |")
    print("|---|---|---|---|")
    for row in rows:
        for site in row["sync_sites"]:
            print(f"| {row['variant']} | {site['kind']} | {site['per_step']:g} | `{site['site']}` |")
    for pair, ratio in result["ratios"].items():
        print(f"\n{pair}: FLOPs x{ratio['flops']}, steps/s x{ratio['steps_per_second']}", end="")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before anything is measured")
    parser.add_argument("--flop-steps", type=int, default=2, help="consecutive steps whose FLOPs are counted")
    parser.add_argument("--sync-steps", type=int, default=4, help="steps whose syncs are counted")
    parser.add_argument("--methods", default=None, help=f"comma-separated, of: {', '.join(variants())}")
    parser.add_argument("--label", default="run", help="goes into the file name (before, after, ...)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if min(args.steps, args.repeats, args.flop_steps, args.sync_steps) < 1 or args.warmup < 0:
        raise SystemExit("--steps, --repeats, --flop-steps and --sync-steps must be >= 1, --warmup >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    chosen = select(args.methods)
    source = Path(raymix.__file__).resolve().parent
    print(f"raymix from {source}", file=sys.stderr)
    if not source.is_relative_to(ROOT):
        print(f"warning: raymix is not the one beside this script ({ROOT})", file=sys.stderr)
    rows = measure(chosen, args)
    date = datetime.date.today().isoformat()
    result = {
        "date": date,
        "label": args.label,
        "machine": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_changes_in_raymix": git(
            "status", "--porcelain", "--untracked-files=all", "--", "."
        ).splitlines(),
        "raymix_path": str(source),
        "scale": SCALE,
        "config": SCALES[SCALE],
        "method_overrides": {m: o for (m, sc), o in METHOD_OVERRIDES.items() if sc == SCALE},
        "variants": {name: extra for name, (_, extra) in chosen.items()},
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "flop_steps": args.flop_steps,
        "sync_steps": args.sync_steps,
        "ratios": {},
        "rows": rows,
    }
    result["ratios"] = ratios(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"step_cost-{args.label}-{date}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
