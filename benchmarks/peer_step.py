"""raymix's MoCo v3 training step against lightly's, around the same timm backbone.

Both sides train the backbone ``raymix.models.build_backbone`` makes from raymix's config
(a second, identical copy for lightly, loaded with the same initial weights), with the
same batch, image size, head widths and depths, precision, device and optimiser
(``torch.optim.AdamW``, foreach on the CPU, fused on CUDA, raymix's lr, betas and weight
decay), and both consume the SAME two pre-augmented float views every step.

raymix side: the body of ``Trainer.train_step`` minus its augmentation, called on the
trainer's own parts: ``schedules.apply`` (lr, wd), the ``MoCo`` forward under the
trainer's autocast, ``zero_grad``/backward, gradient clipping when configured, the AdamW
step of ``build_optimizer`` and ``method.after_step`` (cosine-momentum EMA of the key
encoder). Augmentation is left out of both sides rather than charged to both: lightly
leaves it to its dataloader (``MoCoV2Transform`` etc. on PIL images, in worker
processes), which is no like-for-like counterpart to raymix's on-device batch
augmentation. raymix's augmentation of the same batch, which makes the two fixed views,
is timed on its own and reported beside the steps (``raymix_augment_ms``), not folded
into the ratio.

lightly side, built the way lightly's documentation shows: lightly ships no MoCo v3
example, so this is its MoCo example (docs.lightly.ai/examples/moco.html,
``examples/pytorch/moco.py``: a momentum copy of backbone and projection head made with
``copy.deepcopy`` + ``deactivate_requires_grad``, ``update_momentum`` with a
``cosine_schedule`` momentum at the start of each step, ``NTXentLoss``) with the MoCo v3
settings that ``MoCoProjectionHead``'s docstring gives (BN in every layer, 3 layers) and a
MoCo v3 predictor:

- projector: ``MoCoProjectionHead(D, hidden, out, num_layers=head.projector_layers, batch_norm=True)``;
- predictor: ``MoCoProjectionHead(out, hidden, out, num_layers=head.predictor_layers, batch_norm=True)``
  (MoCo v3's predictor has BN after every layer; ``BYOLPredictionHead`` would drop the last
  BN and add a bias);
- loss: ``NTXentLoss(temperature=method.temperature, memory_bank_size=0)`` on both
  (prediction, key) pairs, ``criterion(p1, k2) + criterion(p2, k1)``: in-batch negatives,
  like raymix's MoCo without a queue (``method.queue_size=0``);
- momentum: ``cosine_schedule(step, total_steps, method.momentum, 1.0)`` per step (the
  example steps it per epoch from 0.996), then ``update_momentum`` on backbone and projector;
- optimiser: AdamW over lightly's ``get_weight_decay_parameters`` groups, lr per step from
  lightly's ``CosineWarmupScheduler`` (raymix sets lr and wd per step from its schedules).

Differences that remain (the FLOP counts, the profile and the parts table show their cost):

- the loss: lightly's NTXentLoss is SimCLR's 2B-way loss (4 B x B logit blocks per call
  through einsum/bmm, the predictions' own pairs among the negatives, the diagonal masked
  out with a boolean index); raymix's is MoCo v3's B x B ``2 tau * CE(q k^T / tau)``. Under
  bf16 autocast raymix computes its similarities and softmax in float32, lightly's einsums
  run in bf16;
- the last BatchNorm of each lightly head is affine (raymix's: ``affine=False``), its
  ReLUs are not in place;
- lightly's key branch runs with frozen weights but outside ``torch.no_grad`` (as in its
  example); raymix's under ``no_grad``;
- lightly's EMA is ``_foreach_mul_`` + ``_foreach_add_`` (two passes; with a Python
  scalar the CPU runs them tensor by tensor), raymix's one ``_foreach_lerp_``;
- with a ResNet backbone raymix also shuffles the keys into ``backbone.key_bn_groups`` BN groups.

Rounds are interleaved in one process (raymix, lightly, raymix, lightly, ...), each
``--steps`` steps after warm-up; the ratio raymix / lightly of images/s is taken per
round (paired) and reported as median, quartiles and range, by the wall clock and, on
the CPU, also per CPU-second of the process (steadier on a machine other work shares;
``--threads 1`` steadier still). FLOPs per step are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention,
forward and backward; the CPU attention kernel is added to the counter). ``torch.profiler``
gives each side's top operators by self CPU time per step, and the parts where the steps
differ (key branch, online branch, loss, EMA) are timed alone on the same inputs.

    .venv/bin/python benchmarks/peer_step.py                      # CPU: vit_micro/4, 16 px, batch 64
    .venv/bin/python benchmarks/peer_step.py --backbone vit_tiny --image-size 32 --batch 128
    .venv/bin/python benchmarks/peer_step.py --device cuda        # bf16, ViT-T/2, 32 px, batch 512

Needs the ``bench`` extra (``pip install -e .[bench]``: lightly). Writes
``<out>/peer_step-<device>-<date>.json``; a run whose config is already in that file
replaces it, another config is added beside it. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from raymix.config import VIT_SIZES, load_config
from raymix.engine.optim import scaled_lr
from raymix.engine.trainer import Trainer
from raymix.methods import ContrastiveMethod
from raymix.models import build_backbone, feature_dim

from counting import flop_counter
from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
# Defaults per device type: the CPU benchmarks' small ViT (method_step.py SCALES["cpu"]) and
# the CIFAR recipe's ViT-T/2 in bf16 on a GPU (SCALES["gpu"]).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"backbone": "vit_micro", "patch_size": 4, "image_size": 16, "batch": 64, "hidden_dim": 512,
            "out_dim": 128, "precision": "fp32"},
    "cuda": {"backbone": "vit_tiny", "patch_size": 2, "image_size": 32, "batch": 512, "hidden_dim": 4096,
             "out_dim": 256, "precision": "bf16"},
}  # fmt: skip
BACKBONES = [*VIT_SIZES, "resnet18", "resnet50"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- raymix


def overrides(args: argparse.Namespace) -> list[str]:
    """raymix's config; ``training.epochs`` only stretches the schedules past the steps run here."""
    return [
        "data.name=synthetic", f"data.image_size={args.image_size}", f"backbone.name={args.backbone}",
        f"backbone.patch_size={args.patch_size}", f"head.hidden_dim={args.hidden_dim}",
        f"head.out_dim={args.out_dim}", f"training.batch_size={args.batch}", f"training.device={args.device}",
        f"training.precision={args.precision}", "method.name=moco", "training.progress=false",
        "training.epochs=1000",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- lightly


class LightlyMoCoV3(nn.Module):
    """MoCo v3 from lightly's building blocks, laid out like lightly's MoCo example."""

    def __init__(
        self, backbone: nn.Module, width: int, hidden: int, out: int, proj_layers: int, pred_layers: int
    ):
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(width, hidden, out, num_layers=proj_layers, batch_norm=True)
        self.prediction_head = MoCoProjectionHead(out, hidden, out, num_layers=pred_layers, batch_norm=True)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.backbone(x).flatten(start_dim=1)
        return self.prediction_head(self.projection_head(query))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        key = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(key).detach()


class LightlyStep:
    """One lightly MoCo v3 training step on fixed views, with its optimiser and schedules."""

    def __init__(self, trainer: Trainer, views: tuple[torch.Tensor, torch.Tensor], precision: str) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.utils import get_weight_decay_parameters
        from lightly.utils.scheduler import CosineWarmupScheduler

        cfg = trainer.cfg
        method, head, optim = cfg.method, cfg.head, cfg.optim
        assert optim.name == "adamw" and method.name == "moco" and method.momentum is not None
        self.device, self.precision, self.views = trainer.device, precision, views
        torch.manual_seed(cfg.training.seed)
        backbone = build_backbone(cfg.backbone, cfg.data.image_size)
        backbone.load_state_dict(trainer.method.backbone.state_dict())  # same start as raymix
        self.model = LightlyMoCoV3(
            backbone, feature_dim(backbone), head.hidden_dim, head.out_dim,
            head.projector_layers, head.predictor_layers,
        ).to(self.device)  # fmt: skip
        self.model.train()
        self.criterion = NTXentLoss(temperature=method.temperature, memory_bank_size=0)
        decay, no_decay = get_weight_decay_parameters([self.model.backbone, self.model.projection_head,
                                                       self.model.prediction_head])  # fmt: skip
        fast = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=scaled_lr(optim, cfg.training.batch_size), betas=optim.betas, weight_decay=optim.weight_decay,
            **fast,
        )  # fmt: skip
        self.total_steps = trainer.total_steps
        self.scheduler = CosineWarmupScheduler(
            self.optimizer, warmup_epochs=trainer.schedules.warmup, max_epochs=self.total_steps, end_value=0.0
        )
        self.base_momentum = method.momentum
        self.step = 0

    def __call__(self) -> torch.Tensor:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        model, (x1, x2) = self.model, self.views
        momentum = cosine_schedule(
            min(self.step, self.total_steps), self.total_steps, self.base_momentum, 1.0
        )
        update_momentum(model.backbone, model.backbone_momentum, m=momentum)
        update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
        with autocast(self.device, self.precision):
            p1, p2 = model(x1), model(x2)
            k1, k2 = model.forward_momentum(x1), model.forward_momentum(x2)
            loss = self.criterion(p1, k2) + self.criterion(p2, k1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.step += 1
        return loss.detach()


# ----------------------------------------------------------------------------- measuring


def time_steps(step: Callable[[], Any], device: torch.device, steps: int) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds per step over ``steps`` steps.

    CPU time (all threads of this process) leaves out the time other processes hold the
    cores; on a shared machine it is the steadier measure of the work. On CUDA only the
    wall clock means anything.
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def count_flops(step: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of one step, in total and per operator (the CPU attention kernel counted too)."""
    counter = flop_counter()
    with counter:
        step()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def profile(
    sides: dict[str, Callable[[], Any]], device: torch.device, steps: int, top: int
) -> dict[str, Any]:
    """Per side, the ``top`` operators by self CPU time in ms per step, with calls per step (and
    device time on CUDA); under ``calls_differ``, the operators called a different number of
    times per step, by the largest difference in self CPU time. One profiled step per side in
    turn, ``steps`` times, summed: load that comes and goes falls on both alike."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    totals: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
    for _ in range(steps):
        for name, step in sides.items():
            with torch_profile(activities=activities) as prof:
                step()
                sync(device)
            for event in prof.key_averages():
                acc = totals[name].setdefault(event.key, [0.0, 0.0, 0.0])
                acc[0] += event.self_cpu_time_total
                acc[1] += event.count
                acc[2] += getattr(event, "self_device_time_total", 0.0) if gpu else 0.0
    tables: dict[str, Any] = {}
    for name, ops in totals.items():
        rows = []
        for op, (cpu_us, calls, device_us) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
            row = {"op": op, "self_cpu_ms": round(cpu_us / 1000 / steps, 3), "calls": round(calls / steps, 1)}
            if gpu:
                row["self_device_ms"] = round(device_us / 1000 / steps, 3)
            rows.append(row)
        tables[name] = rows
    # Every operator whose calls per step differ between the sides (what the code does
    # differently; an operator with equal calls but unequal time is mostly noise).
    ours, theirs = totals["raymix"], totals["lightly"]
    differing: list[dict[str, Any]] = []
    for op in set(ours) | set(theirs):
        a, b = ours.get(op, [0.0, 0.0, 0.0]), theirs.get(op, [0.0, 0.0, 0.0])
        if a[1] != b[1]:
            per_step = {
                "raymix_ms": a[0] / 1000,
                "lightly_ms": b[0] / 1000,
                "raymix_calls": a[1],
                "lightly_calls": b[1],
            }
            differing.append({"op": op, **{key: round(value / steps, 3) for key, value in per_step.items()}})
    differing.sort(key=lambda row: -abs(row["raymix_ms"] - row["lightly_ms"]))
    tables["calls_differ"] = differing[:top]
    return tables


def breakdown(
    trainer: Trainer, lightly_step: LightlyStep, views: tuple[torch.Tensor, torch.Tensor], reps: int
) -> dict[str, dict[str, float]]:
    """ms of each part where the two steps differ, the same inputs on both sides, interleaved:
    ``keys`` (both key-branch forwards), ``online`` (both online branches, forward and a
    backward of their sum), ``loss`` (both contrast terms on the same predictions and keys,
    forward and backward) and ``ema`` (the momentum update of backbone and projector)."""
    from lightly.models.utils import update_momentum

    from raymix.models import ema_update

    method, model, device = trainer.method, lightly_step.model, trainer.device
    assert isinstance(method, ContrastiveMethod)
    assert method.key_backbone is not None and method.key_projector is not None
    key_backbone, key_projector = method.key_backbone, method.key_projector
    cfg = trainer.cfg
    x1, x2 = views
    generator = torch.Generator().manual_seed(1)
    shape = (cfg.training.batch_size, cfg.head.out_dim)
    p1, p2, k1, k2 = (torch.randn(shape, generator=generator).to(device) for _ in range(4))
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    tau = cfg.method.temperature

    def with_autocast(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with trainer.autocast():
                return fn()

        return run

    def backward_sum(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with trainer.autocast():
                out = module(x1).float().sum() + module(x2).float().sum()
            out.backward()

        return run

    def raymix_loss() -> None:
        (method.loss(p1, k2, 0, tau) + method.loss(p2, k1, 0, tau)).backward()

    def lightly_loss() -> None:
        (lightly_step.criterion(p1, k2) + lightly_step.criterion(p2, k1)).backward()

    def raymix_ema() -> None:
        ema_update(key_backbone, method.backbone, 0.99)
        ema_update(key_projector, method.projector, 0.99)

    def lightly_ema() -> None:
        update_momentum(model.backbone, model.backbone_momentum, m=0.99)
        update_momentum(model.projection_head, model.projection_head_momentum, m=0.99)

    parts = {
        "keys": (with_autocast(lambda: (method.keys(x1), method.keys(x2))),
                 with_autocast(lambda: (model.forward_momentum(x1), model.forward_momentum(x2)))),
        "online": (backward_sum(lambda x: method.online(x)[1]), backward_sum(model)),
        "loss": (with_autocast(raymix_loss), with_autocast(lightly_loss)),
        "ema": (raymix_ema, lightly_ema),
    }  # fmt: skip
    result = {}
    for part, (ours, theirs) in parts.items():
        times: dict[str, list[float]] = {"raymix": [], "lightly": []}
        ours(), theirs()  # warm-up
        clock = 0 if device.type == "cuda" else 1  # CPU time on the CPU, see time_steps
        for _ in range(reps):
            times["raymix"].append(1000 * time_steps(ours, device, 1)[clock])
            times["lightly"].append(1000 * time_steps(theirs, device, 1)[clock])
        result[part] = {name: round(statistics.median(t), 3) for name, t in times.items()}
    for module in (method, model):
        module.zero_grad(set_to_none=True)
    return result


def spread(values: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {
        "median": round(statistics.median(values), 4),
        "q1": round(quartiles[0], 4),
        "q3": round(quartiles[2], 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(None, overrides(args))
    trainer = Trainer(cfg)
    device = trainer.device
    batch, size = cfg.training.batch_size, cfg.data.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator).to(device)

    # raymix's augmentation, timed alone; its output is the fixed input of both steps.
    trainer.augment(images, trainer.generator)  # warm-up
    augment_seconds = statistics.median(
        time_steps(lambda: trainer.augment(images, trainer.generator), device, 1)[0] for _ in range(9)
    )
    augmented = trainer.augment(images, trainer.generator)
    views = (trainer.layout(augmented[0].contiguous()), trainer.layout(augmented[1].contiguous()))
    trainer.method.train()
    lightly_step = LightlyStep(trainer, views, args.precision)

    def raymix_step() -> torch.Tensor:
        """``Trainer.train_step`` on the fixed views, without its augmentation."""
        trainer.schedules.apply(trainer.optimizer, trainer.step)
        with trainer.autocast():
            loss, _ = trainer.model(views[0], views[1], None)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainer.method.parameters(), cfg.optim.grad_clip)
        trainer.optimizer.step()
        trainer.step += 1
        trainer.method.after_step(trainer.step, trainer.total_steps)
        return loss.detach()

    sides: dict[str, Callable[[], Any]] = {"raymix": raymix_step, "lightly": lightly_step}
    params = {
        "raymix": sum(p.numel() for p in trainer.method.parameters() if p.requires_grad),
        "lightly": sum(p.numel() for p in lightly_step.model.parameters() if p.requires_grad),
    }
    flops, flops_by_op, losses = {}, {}, {}
    for name, step in sides.items():
        for _ in range(args.warmup):
            losses[name] = float(step())
        flops[name], flops_by_op[name] = count_flops(step)

    load_start = os.getloadavg()[0]  # other processes on the machine skew both sides, not the ratio much
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):  # raymix, lightly, raymix, lightly, ...
        for name, step in sides.items():
            wall, cpu = time_steps(step, device, args.steps)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
    for name, step in sides.items():
        losses[name] = float(step())
    profiles = profile(sides, device, args.profile_steps, args.top)
    parts = breakdown(trainer, lightly_step, views, max(3, args.rounds // 2))
    load_end = os.getloadavg()[0]

    ips = {name: [batch / s for s in seconds[name]] for name in sides}
    ratios = [r / lt for r, lt in zip(ips["raymix"], ips["lightly"], strict=True)]
    cpu_ratios = [lt / r for r, lt in zip(cpu_seconds["raymix"], cpu_seconds["lightly"], strict=True)]
    return {
        "config": {
            "backbone": args.backbone,
            "patch_size": args.patch_size,
            "image_size": size,
            "batch": batch,
            "hidden_dim": cfg.head.hidden_dim,
            "out_dim": cfg.head.out_dim,
            "projector_layers": cfg.head.projector_layers,
            "predictor_layers": cfg.head.predictor_layers,
            "precision": args.precision,
            "threads": torch.get_num_threads(),
            "optimizer": "adamw " + ("fused" if device.type == "cuda" else "foreach"),
            "temperature": lightly_step.criterion.temperature,
            "momentum": lightly_step.base_momentum,
        },
        "raymix_overrides": overrides(args),
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "trainable_params": params,
        "images_per_second": {name: spread(ips[name]) for name in sides},
        "step_ms": {name: round(1000 * statistics.median(seconds[name]), 2) for name in sides},
        "images_per_second_ratio": spread(ratios),
        "images_per_second_ratio_rounds": [round(r, 4) for r in ratios],
        # Per round, images per CPU-second of this process, raymix / lightly (CPU runs only).
        "images_per_cpu_second_ratio": spread(cpu_ratios) if device.type == "cpu" else None,
        "cpu_step_ms": {name: round(1000 * statistics.median(cpu_seconds[name]), 2) for name in sides},
        "gflops_per_step": {name: round(flops[name] / 1e9, 4) for name in sides},
        "flops_ratio": round(flops["raymix"] / flops["lightly"], 5),
        "gflops_by_op": {
            name: {op: round(n / 1e9, 4) for op, n in sorted(ops.items(), key=lambda kv: -kv[1])}
            for name, ops in flops_by_op.items()
        },
        "parts_ms": parts,
        "raymix_augment_ms": round(1000 * augment_seconds, 2),
        "load_average_1min": {"start": round(load_start, 2), "end": round(load_end, 2)},
        "last_loss": {name: round(v, 4) for name, v in losses.items()},
        "profile_steps": args.profile_steps,
        "profile_top_self_cpu": profiles,
    }


# ----------------------------------------------------------------------------- output


def write(run: dict[str, Any], meta: dict[str, Any], out_dir: Path) -> Path:
    """Add ``run`` to the day's file, replacing a run of the same config.

    A file from another machine or library version is started afresh.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"peer_step-{meta['device_type']}-{meta['date']}.json"
    runs: list[dict[str, Any]] = []
    if path.exists():
        old = json.loads(path.read_text())
        if all(old.get(key) == meta[key] for key in ("device", "torch", "timm", "lightly")):
            runs = [r for r in old.get("runs", []) if r.get("config") != run["config"]]
    path.write_text(json.dumps({**meta, "runs": [*runs, run]}, indent=2) + "\n")
    return path


def report(run: dict[str, Any], meta: dict[str, Any]) -> None:
    c, ips, ratio = run["config"], run["images_per_second"], run["images_per_second_ratio"]
    flops = run["gflops_per_step"]
    title = (
        f"{c['backbone']}/{c['patch_size']} at {c['image_size']} px, batch {c['batch']}, head "
        f"{c['hidden_dim']}/{c['out_dim']}, {c['precision']}, {meta['device']}, {c['threads']} threads; "
        f"{run['rounds']} interleaved rounds x {run['steps_per_round']} steps"
    )
    print(f"\n{title}\n")
    print("| step | images/s median | images/s IQR | images/s range | ms/step | GFLOP/step |")
    print("|---|---|---|---|---|---|")
    for name in ("raymix", "lightly"):
        s = ips[name]
        print(
            f"| {name} | {s['median']:.1f} | {s['q1']:.1f}-{s['q3']:.1f} | {s['min']:.1f}-{s['max']:.1f} "
            f"| {run['step_ms'][name]} | {flops[name]:.3f} |"
        )
    print(
        f"| raymix / lightly | {ratio['median']:.3f} | {ratio['q1']:.3f}-{ratio['q3']:.3f} "
        f"| {ratio['min']:.3f}-{ratio['max']:.3f} | | {run['flops_ratio']:.4f} |"
    )
    cpu_ratio = run["images_per_cpu_second_ratio"]
    if cpu_ratio is not None:
        print(
            f"| raymix / lightly, per CPU-second | {cpu_ratio['median']:.3f} | {cpu_ratio['q1']:.3f}-"
            f"{cpu_ratio['q3']:.3f} | {cpu_ratio['min']:.3f}-{cpu_ratio['max']:.3f} | "
            f"{run['cpu_step_ms']['raymix']} / {run['cpu_step_ms']['lightly']} CPU | |"
        )
    print(f"\nraymix's augmentation of the batch (not in the steps): {run['raymix_augment_ms']} ms")
    load = run["load_average_1min"]
    print(f"1-minute load average at the start / end of the timing: {load['start']} / {load['end']}")
    print("\nThe parts where the steps differ, alone (ms, median of interleaved repeats):\n")
    print("| part | raymix | lightly | difference |")
    print("|---|---|---|---|")
    for part, ms in run["parts_ms"].items():
        print(f"| {part} | {ms['raymix']} | {ms['lightly']} | {ms['raymix'] - ms['lightly']:+.3f} |")
    profiles = run["profile_top_self_cpu"]
    for name in ("raymix", "lightly"):
        print(f"\nTop ops by self CPU time, {name} (ms per step, calls per step):\n")
        print("| op | self CPU ms | calls |")
        print("|---|---|---|")
        for row in profiles[name]:
            print(f"| {row['op']} | {row['self_cpu_ms']} | {row['calls']} |")
    print("\nOperators called a different number of times per step (ms and calls per step):\n")
    print("| op | raymix ms | lightly ms | raymix - lightly ms | raymix calls | lightly calls |")
    print("|---|---|---|---|---|---|")
    for row in profiles["calls_differ"]:
        diff = row["raymix_ms"] - row["lightly_ms"]
        print(
            f"| {row['op']} | {row['raymix_ms']} | {row['lightly_ms']} | {diff:+.3f} | {row['raymix_calls']} "
            f"| {row['lightly_calls']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 CPU, bf16 CUDA"
    )
    parser.add_argument("--backbone", choices=BACKBONES, default=None)
    parser.add_argument("--patch-size", type=int, default=None, help="ViT patch side")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--hidden-dim", type=int, default=None, help="head hidden width")
    parser.add_argument("--out-dim", type=int, default=None, help="head output width")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per side")
    parser.add_argument("--steps", type=int, default=2, help="steps per timing round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--profile-steps", type=int, default=6, help="profiled steps per side")
    parser.add_argument("--top", type=int, default=12, help="operators listed per profile table")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import lightly  # the bench extra; imported here so --help works without it

    run = measure(args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    meta = {
        "benchmark": "peer_step",
        "date": datetime.date.today().isoformat(),
        "device_type": args.device,
        "device": device,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightly": lightly.__version__,
    }
    path = write(run, meta, args.out)
    report(run, meta)
    print(f"\nwritten to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
