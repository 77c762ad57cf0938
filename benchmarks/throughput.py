"""Training throughput of each method x backbone, with FLOPs counted and, on GPUs, MFU.

Every method trains through ``Trainer.train_step`` (augmentation, forward passes,
backward, optimiser, EMA) on one uint8 batch that already sits on the device, so the
figures are the engine's, not the data loader's. Backbones: ViT-T/2 and ViT-S/2 at
32 px, ResNet-18 with the CIFAR stem (PatchMix mixes ViT patches: no ResNet row).

FLOPs are counted for the whole step with ``torch.utils.flop_counter`` (matmuls,
convolutions and attention, forward and backward; elementwise work is not counted). The
counter knows the GPU attention kernels; the CPU one is added here, so CPU and GPU rows
count the same work.
On a GPU, MFU = achieved FLOP/s over the device's dense bf16 peak.

    python benchmarks/throughput.py                        # every method x backbone, this device
    python benchmarks/throughput.py --methods moco --backbones vit_small --precision bf16 --compile
    python benchmarks/throughput.py --backbones resnet18 --channels-last --profile

Only the engine is needed (no Ray, Optuna or MLflow). Writes
benchmarks/results/throughput-<device>-<date>[-<options>].json (options: bf16, compile,
channels-last; ``--name`` sets another suffix) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch

from raymix.config import METHOD_NAMES, ConfigError, load_config
from raymix.engine.trainer import Trainer

from counting import flop_counter
from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {
    "vit_tiny": ["backbone.name=vit_tiny", "backbone.patch_size=2"],
    "vit_small": ["backbone.name=vit_small", "backbone.patch_size=2"],
    "resnet18": ["backbone.name=resnet18", "backbone.cifar_stem=true"],
}
COMMON = ["data.name=synthetic", "data.image_size=32", "data.synthetic_train_size=20000", "head.out_dim=256"]
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name substring;
# the first key found in the name wins, so the more specific names come first.
BF16_PEAK = {
    "H200 NVL": 835.5e12, "H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12,
    "H100 NVL": 835.5e12, "H100 PCIe": 756.0e12, "H100": 756.0e12, "A100": 312.0e12, "L40S": 362.1e12,
    "A10G": 70.0e12, "L4": 121.0e12,
}  # fmt: skip


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_of(torch.cuda.get_device_name(device))


def peak_of(name: str) -> float | None:
    """The dense bf16 peak of a device named ``name`` (as CUDA names it), if known."""
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(method: str, backbone: str, args: argparse.Namespace) -> Trainer:
    extra = ["method.bank_size=4096"] if method == "snclr" else []
    cfg = load_config(
        None,
        [
            *COMMON, *BACKBONES[backbone], f"method.name={method}", *extra,
            f"training.batch_size={args.batch_size}", f"training.device={args.device}",
            f"training.precision={args.precision}", "training.progress=false",
            f"training.channels_last={args.channels_last and backbone.startswith('resnet')}",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg)  # compiled later (training.compile), after its FLOPs are counted eagerly
    trainer.method.train()
    return trainer


def batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    size, count = trainer.cfg.data.image_size, trainer.cfg.training.batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return images.to(trainer.device), labels.to(trainer.device)


def count_flops(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> float:
    counter = flop_counter()
    with counter:
        trainer.train_step(images, labels)
    return float(counter.get_total_flops())


def profile(
    trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, top: int = 10
) -> list[dict[str, Any]]:
    """The ``top`` kernels (GPU) or operators (CPU) by their own time over 5 steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(5):
            trainer.train_step(images, labels)
        sync(trainer.device)
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [
        {
            "name": e.key[:120],
            "share": round(getattr(e, key) / total, 4),
            "ms_per_step": round(getattr(e, key) / 5000, 3),
        }
        for e in events[:top]
    ]


def sync_free(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> str:
    """On CUDA: 'yes' when two steps run under ``set_sync_debug_mode("error")``, else the error."""
    torch.cuda.synchronize(trainer.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            trainer.train_step(images, labels)
        return "yes"
    except RuntimeError as exc:
        return f"no: {str(exc).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(trainer.device)


def measure(method: str, backbone: str, args: argparse.Namespace) -> dict[str, Any]:
    try:
        trainer = build(method, backbone, args)
    except ConfigError as exc:
        return {"method": method, "backbone": backbone, "skipped": str(exc)}
    images, labels = batch(trainer)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    flops = count_flops(trainer, images, labels)  # eager: the counter sees every operator
    if args.compile:
        trainer.compile()
    for _ in range(args.warmup):  # allocator, kernels, compilation
        trainer.train_step(images, labels)
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(images, labels)
    sync(trainer.device)
    seconds = (time.perf_counter() - start) / args.steps
    row: dict[str, Any] = {
        "method": method,
        "backbone": backbone,
        "images_per_second": round(images.shape[0] / seconds, 1),
        "ms_per_step": round(1000 * seconds, 2),
        "gflops_per_step": round(flops / 1e9, 1),
        "achieved_tflops": round(flops / seconds / 1e12, 3),
    }
    peak = bf16_peak(trainer.device)
    if peak:
        row["mfu_bf16"] = round(flops / seconds / peak, 4)
    if trainer.device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(trainer.device) / 2**30, 2)
        row["sync_free_step"] = sync_free(trainer, images, labels)
    if args.profile:
        row["top_kernels"] = profile(trainer, images, labels)
    del trainer, images, labels
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def suffix(args: argparse.Namespace) -> str:
    """'-bf16-compile' and the like: runs with other options on the same day keep their files."""
    if args.name is not None:
        return f"-{args.name}" if args.name else ""
    parts = [args.precision] if args.precision != "auto" else []
    parts += [flag for flag in ("compile", "channels_last") if getattr(args, flag)]
    return "".join(f"-{part.replace('_', '-')}" for part in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--backbones", help="default: all on a GPU; vit_tiny,resnet18 on a CPU")
    parser.add_argument("--batch-size", type=int, help="default: 256 on a GPU, 16 on a CPU")
    parser.add_argument("--steps", type=int, help="timed steps (default: 30 on a GPU, 2 on a CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 5 on a GPU, 1 on a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--channels-last", action="store_true", help="ResNets: training.channels_last")
    parser.add_argument("--compile", action="store_true", help="training.compile: torch.compile the encoders")
    parser.add_argument("--profile", action="store_true", help="record the top kernels of 5 steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument("--name", help="suffix of the results file (default: from the options)")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (256 if gpu else 16)
    args.steps = args.steps or (30 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.backbones = args.backbones or ",".join(BACKBONES if gpu else ["vit_tiny", "resnet18"])
    methods, backbones = args.methods.split(","), args.backbones.split(",")
    for name in backbones:
        if name not in BACKBONES:
            parser.error(f"--backbones: {name!r} is not one of {', '.join(BACKBONES)}")
    for name in methods:
        if name not in METHOD_NAMES:
            parser.error(f"--methods: {name!r} is not one of {', '.join(METHOD_NAMES)}")

    rows = [measure(m, b, args) for b in backbones for m in methods]
    device = torch.cuda.get_device_name() if gpu else cpu_name()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "bf16_peak_tflops": (bf16_peak(torch.device(args.device)) or 0) / 1e12 or None,
        "cpu_threads": torch.get_num_threads(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "timm": timm.__version__,
            "cuda": torch.version.cuda,
        },  # fmt: skip
        "options": {k: v for k, v in vars(args).items() if k != "out"},
        "config": COMMON,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-") or "device"
    out = args.out / f"throughput-{slug}-{datetime.date.today().isoformat()}{suffix(args)}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    options = f"batch {args.batch_size}, precision {args.precision}" + (", compile" if args.compile else "")
    print(f"| method | backbone | images/s | ms/step | GFLOP/step | TFLOP/s | MFU |  ({device}, {options})")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['method']} | {row['backbone']} | skipped: {row['skipped']} | | | | |")
            continue
        mfu = f"{100 * row['mfu_bf16']:.1f}%" if "mfu_bf16" in row else "-"
        print(
            f"| {row['method']} | {row['backbone']} | {row['images_per_second']} | {row['ms_per_step']} | "
            f"{row['gflops_per_step']} | {row['achieved_tflops']} | {mfu} |"
        )
    print(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
