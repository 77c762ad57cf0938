"""Training steps per second of each method on one device, and what mixing and look-ups cost.

Every method trains the same backbone on the same uint8 batch through ``Trainer.train_step``
(augmentation, forward passes, backward, optimiser, EMA). Two scales:

- ``cpu``: the quickstart's ViT at 16 px, batch 64 (what tests and the quickstart run);
- ``gpu``: ViT-T/2 at 32 px, batch 512, bf16 (the CIFAR recipes), only where CUDA is seen.

    .venv/bin/python benchmarks/method_step.py [--steps 30] [--repeats 3] [--scale auto|cpu|gpu]

No Ray needed. Writes benchmarks/results/method_step-<scale>-<date>.json and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from raymix.config import METHOD_NAMES, load_config
from raymix.engine.trainer import Trainer
from raymix.methods.patchmix import patch_mix
from raymix.methods.snclr import bank_topk

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
SCALES = {
    "cpu": [
        "data.name=synthetic", "data.image_size=16", "backbone.name=vit_micro", "backbone.patch_size=4",
        "head.hidden_dim=512", "head.out_dim=128", "training.batch_size=64", "training.device=cpu",
    ],
    "gpu": [
        "data.name=synthetic", "data.image_size=32", "backbone.name=vit_tiny", "backbone.patch_size=2",
        "head.hidden_dim=4096", "head.out_dim=256", "training.batch_size=512", "training.device=cuda",
        "training.precision=bf16", "data.synthetic_train_size=20000",
    ],
}  # fmt: skip
# Per method and scale: what its recipe sets beyond the scale (SNCLR's bank fits the data).
METHOD_OVERRIDES = {
    ("snclr", "cpu"): ["method.bank_size=1024", "method.num_neighbors=5"],
    ("snclr", "gpu"): ["method.bank_size=16384"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(method: str, scale: str) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    """A trainer of ``method`` at ``scale`` and one fixed uint8 batch, warmed up."""
    extra = METHOD_OVERRIDES.get((method, scale), [])
    cfg = load_config(None, [*SCALES[scale], f"method.name={method}", *extra, "training.progress=false"])
    trainer = Trainer(cfg)
    size, batch = cfg.data.image_size, cfg.training.batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    images, labels = images.to(trainer.device), torch.zeros(batch, dtype=torch.long, device=trainer.device)
    trainer.method.train()
    for _ in range(3):  # warm-up: allocator, kernels
        trainer.train_step(images, labels)
    return trainer, images, labels


def time_steps(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Seconds per training step over ``steps`` steps."""
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(images, labels)
    sync(trainer.device)
    return (time.perf_counter() - start) / steps


def measure(scale: str, steps: int, repeats: int) -> list[dict[str, float | str]]:
    """Each method timed ``repeats`` times, interleaved so machine noise hits all alike; medians.

    One trainer lives at a time, so the GPU's peak memory is that method's alone.
    """
    seconds: dict[str, list[float]] = {name: [] for name in METHOD_NAMES}
    peaks: dict[str, float] = {}
    batch = 0
    for _ in range(repeats):
        for name in METHOD_NAMES:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer, images, labels = build(name, scale)
            seconds[name].append(time_steps(trainer, images, labels, steps))
            batch = images.shape[0]
            if trainer.device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
            del trainer, images, labels
            gc.collect()
    rows: list[dict[str, float | str]] = []
    for name in METHOD_NAMES:
        step = statistics.median(seconds[name])
        row: dict[str, float | str] = {
            "method": name,
            "steps_per_second": round(1 / step, 3),
            "images_per_second": round(batch / step, 1),
            "steps_per_second_runs": ", ".join(f"{1 / s:.3f}" for s in seconds[name]),
        }
        if name in peaks:
            row["peak_memory_gib"] = round(peaks[name], 2)
        rows.append(row)
    return rows


def time_mixing(scale: str, steps: int) -> dict[str, float]:
    """patch_mix alone on one normalised view (two per step in training)."""
    cfg = load_config(None, [*SCALES[scale], "method.name=patchmix"])
    device = torch.device(cfg.training.device)
    size, batch, patch = cfg.data.image_size, cfg.training.batch_size, cfg.backbone.patch_size
    view = torch.randn(batch, 3, size, size, device=device)
    generator = torch.Generator().manual_seed(0)
    patch_mix(view, 2, patch, generator)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        patch_mix(view, 2, patch, generator)
    sync(device)
    return {"patch_mix_ms": round(1000 * (time.perf_counter() - start) / steps, 3)}


def time_bank_lookup(scale: str, repeats: int) -> dict[str, float]:
    """SNCLR's top-30 look-up of one batch of keys in a bank of 65,536 x 256 (the largest searched)."""
    device = torch.device("cuda" if scale == "gpu" else "cpu")
    batch = 512 if scale == "gpu" else 256
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(batch, 256, generator=generator).to(device)
    bank = torch.randn(65536, 256, generator=generator).to(device)
    bank_topk(keys, bank, 30)
    times = []
    for _ in range(max(repeats, 3)):
        sync(device)
        start = time.perf_counter()
        bank_topk(keys, bank, 30)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"bank_lookup_keys": batch, "bank_lookup_ms": round(1000 * statistics.median(times), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", choices=["auto", "cpu", "gpu"], default="auto")
    args = parser.parse_args()
    scale = args.scale if args.scale != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    rows = measure(scale, args.steps, args.repeats)
    mixing = {**time_mixing(scale, args.steps), **time_bank_lookup(scale, args.repeats)}
    device = torch.cuda.get_device_name() if scale == "gpu" else cpu_name()
    result = {
        "date": datetime.date.today().isoformat(),
        "scale": scale,
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": SCALES[scale],
        "method_overrides": {m: o for (m, sc), o in METHOD_OVERRIDES.items() if sc == scale},
        "steps": args.steps,
        "repeats": args.repeats,
        "methods": rows,
        **mixing,
    }
    out = ROOT / "benchmarks" / "results" / f"method_step-{scale}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"| method | steps/s | images/s |  ({scale}, {device}, median of {args.repeats} x {args.steps} steps)"
    )
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['steps_per_second']} | {row['images_per_second']} |")
    print(f"patch_mix of one view: {mixing['patch_mix_ms']} ms")
    lookup = f"{mixing['bank_lookup_keys']} keys in a 65,536 x 256 bank: {mixing['bank_lookup_ms']} ms"
    print(f"SNCLR top-30 look-up of {lookup}; written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
