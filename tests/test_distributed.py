"""Two gloo worker processes on CPU compute the loss and gradients of one process.

Each case builds the same method in both settings; the two workers each take half of
one batch, synchronise BatchNorm, gather keys and average gradients through DDP. Method
issues add their configs to CASES. The same workers also extract evaluation features of
their shards and evaluate, as one process does alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from raymix import dist
from raymix.config import load_config
from raymix.engine.trainer import Trainer
from raymix.methods import build_method
from raymix.methods.base import step_draws
from raymix.methods.patchmix import patch_mix, patchmix_targets, smooth
from raymix.methods.unmix import sample_unmix, unmix_images
from raymix.models.syncbn import GlobalBatchNorm, convert_batchnorm

TINY = ["data.image_size=16", "head.hidden_dim=32", "head.out_dim=16"]
VIT = ["backbone.patch_size=8", "backbone.depth=1"]
CASES = {
    "moco-vit-momentum-queue": [*VIT, "method.momentum=0.99", "method.queue_size=16"],
    "moco-vit-no-momentum": [*VIT, "method.momentum=null"],
    # training.compile: compiled encoders inside DDP (each worker compiles; one process stays eager).
    "moco-vit-compiled": [*VIT, "method.momentum=0.99", "training.compile=true"],
    "moco-resnet18": ["backbone.name=resnet18", "method.queue_size=16"],
    "patchmix-no-momentum": [*VIT, "backbone.patch_size=4", "method.name=patchmix"],
    "patchmix-momentum-m3": [
        *VIT, "backbone.patch_size=4", "method.name=patchmix", "method.mix_num=3",
        "method.momentum=0.99", "method.smoothing_mixed=0.1",
    ],
    "unmix-vit-symmetric-queue": [*VIT, "method.name=unmix", "method.queue_size=16"],
    "unmix-v2-resnet18-asymmetric-region": [
        "backbone.name=resnet18", "method.name=unmix", "method.symmetric=false",
        "method.prob_global=0", "method.queue_size=16", "method.base=v2", "head.norm=none",
    ],
    # Each worker looks up its own bank; at the first step every bank holds the same start.
    "snclr-vit": [*VIT, "method.name=snclr", "method.bank_size=32", "method.num_neighbors=4"],
    "snclr-vit-hard-no-momentum": [
        *VIT, "method.name=snclr", "method.bank_size=32", "method.num_neighbors=3",
        "method.weighting=hard", "method.momentum=null",
    ],
    # SelfCon gathers its embeddings with gradient; classes and images span both workers.
    "selfcon-resnet18-labels-two-exits": [
        "backbone.name=resnet18", "method.name=selfcon", "method.exits=[true,false,true]",
    ],
    "selfcon-vit-su-same": [
        *VIT, "backbone.depth=3", "method.name=selfcon", "method.use_labels=false", "method.exit_size=same",
    ],
}  # fmt: skip
WORLD, BATCH = 2, 8


def _patchmix_one_process(method, view1, view2):
    """PatchMix mixes each worker's batch alone: mix each half as its worker does, with the
    same (seed, step) generator, and give every row its worker's targets."""
    halves = []
    for rank in range(WORLD):
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        g = step_draws(0, 0).device
        halves.append([patch_mix(v[rows], method.num_mix, method.patch_size, g)[0] for v in (view1, view2)])
    mixes = (torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves]))
    per_rank = [patchmix_targets(BATCH // WORLD, method.num_mix, r, WORLD) for r in range(WORLD)]
    targets = (
        smooth(torch.eye(BATCH), method.smoothing_oo),
        smooth(torch.cat([t[0] for t in per_rank]), method.smoothing_mixed),
        smooth(torch.cat([t[1] for t in per_rank]), method.smoothing_mixed),
    )
    return method.contrast(view1, view2, mixes, targets)


def _unmix_one_process(method, view1, view2):
    """Un-Mix mixes each worker's batch with its own reverse: mix each half as its worker
    does, with the same (seed, step) generator, and pair rows within their half."""
    halves, partners, half = [], [], BATCH // WORLD
    for rank in range(WORLD):
        rng = step_draws(0, 0).host
        mode, lam = sample_unmix(method.beta, method.prob_global, rng)
        mixed, lam = unmix_images(view1[rank * half : (rank + 1) * half], lam, mode, rng)
        halves.append(mixed)
        partners.append(torch.arange(rank * half, (rank + 1) * half).flip(0))
    return method.contrast(view1, view2, torch.cat(halves), lam, torch.cat(partners))


# How one process computes what the workers compute together (default: the same forward).
ONE_PROCESS = {
    name: _patchmix_one_process if name.startswith("patchmix") else _unmix_one_process
    for name in CASES
    if name.startswith(("patchmix", "unmix"))
}


def _config(case: str, *extra: str):
    return load_config(None, TINY + CASES[case] + list(extra))


def _batch():
    g = torch.Generator().manual_seed(0)
    views = torch.randn(BATCH, 3, 16, 16, generator=g), torch.randn(BATCH, 3, 16, 16, generator=g)
    return *views, torch.tensor([0, 1, 2, 0, 1, 2, 0, 3])  # labels: classes span both workers


def _step(model, method, view1, view2, labels, forward=None):
    """One forward and backward; returns (loss, grads by name, queue, bn running mean)."""
    labels = labels if method.uses_labels else None
    loss, _ = forward(method, view1, view2) if forward else model(view1, view2, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    running = {n: b.clone() for n, b in method.named_buffers() if n.endswith("running_mean")}
    # Keys that went into a queue; for SNCLR's per-worker bank, the rows rank 0 wrote.
    queue = (
        method.bank[: BATCH // WORLD].clone() if hasattr(method, "bank") else getattr(method, "queue", None)
    )
    return loss.detach(), grads, queue, running


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """Run every case on this rank's half of the batch; rank 0 saves what it saw."""
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for case in CASES:
            torch.manual_seed(0)
            cfg = _config(case)
            method = convert_batchnorm(build_method(cfg), torch.device("cpu"))
            if cfg.training.compile:
                method.compile_step()
            model = dist.data_parallel(method, torch.device("cpu"))
            view1, view2, labels = _batch()
            loss, grads, queue, running = _step(model, method, view1[rows], view2[rows], labels[rows])
            loss = dist.all_reduce_mean(loss)  # the global mean over all rows
            if rank == 0:
                saved = {"loss": loss, "grads": grads, "queue": queue, "running": running}
                torch.save(saved, f"{out_dir}/{case}.pt")
        # gather_with_grad: d/dx_r of sum_w <gather(x), weight> is W * weight[rows of r].
        x = torch.full((BATCH // WORLD, 3), float(rank + 1), requires_grad=True)
        weight = torch.arange(BATCH * 3, dtype=torch.float32).view(BATCH, 3)
        gathered = dist.gather_with_grad(x)
        (gathered * weight).sum().backward()
        torch.save({"gathered": gathered.detach(), "grad": x.grad}, f"{out_dir}/gather{rank}.pt")
        # Sharded feature extraction and evaluation; each rank saves what it got.
        torch.save(_evaluation(Trainer(load_config(None, EVAL))), f"{out_dir}/eval{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="spawn")
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_workers_equal_one_process(two_workers: Path, case: str) -> None:
    got = torch.load(two_workers / f"{case}.pt")
    torch.manual_seed(0)
    # Workers synchronise BatchNorm (a ResNet's keys are not shuffled there); one process
    # normalises the whole batch at once.
    method = build_method(_config(case, "backbone.key_bn_groups=1"))
    loss, grads, queue, running = _step(method, method, *_batch(), ONE_PROCESS.get(case))

    torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-5)
    assert got["grads"].keys() == grads.keys() and grads
    for name, grad in grads.items():
        # 5e-5 relative to the tensor's scale: float32 sums run in another order on two workers,
        # and BatchNorm over 8 rows behind a head's first layer amplifies that (seen: 2.8e-5).
        tolerance = 5e-5 * max(1.0, grad.abs().max().item())
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=tolerance, msg=name)
    if queue is not None:
        # Unit-length keys; a ResNet's BatchNorm over 8 rows amplifies float32 reordering
        # (seen: 2.5e-6 on one CPU model, under 1e-6 on another). A misplaced key is off by ~0.1.
        torch.testing.assert_close(got["queue"], queue, rtol=1e-5, atol=1e-5)
    for name in running:
        torch.testing.assert_close(got["running"][name], running[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gather_with_grad_routes_gradients_to_their_rank(two_workers: Path) -> None:
    weight = torch.arange(BATCH * 3, dtype=torch.float32).view(BATCH, 3)
    for rank in range(WORLD):
        got = torch.load(two_workers / f"gather{rank}.pt")
        expected = torch.cat([torch.full((BATCH // WORLD, 3), float(r + 1)) for r in range(WORLD)])
        torch.testing.assert_close(got["gathered"], expected)
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        torch.testing.assert_close(got["grad"], WORLD * weight[rows])


# ---------------------------------------------------------------- evaluation

# Odd sizes: shards of 32/31 training, 9/8 test and 21/20 subset images. SelfCon on a ResNet
# probes three encoders (backbone and two exits), each extracted by every rank, and its
# synchronised BatchNorm must run on running statistics, without a collective.
EVAL = [
    *TINY, "data.name=synthetic", "data.synthetic_train_size=63", "data.synthetic_test_size=17",
    "backbone.name=resnet18", "method.name=selfcon", "method.exits=[true,false,true]",
    "training.batch_size=16", "eval.knn_k=[3,10]", "eval.linear_epochs=2", "eval.knn_train_subset=41",
]  # fmt: skip


def _evaluation(trainer: Trainer) -> dict[str, object]:
    return {
        "train": trainer.features(trainer.train_data),
        "test": trainer.features(trainer.test_data),
        "metrics": trainer.evaluate(linear=True),
    }


def test_two_workers_extract_and_evaluate_like_one_process(two_workers: Path) -> None:
    expected = _evaluation(Trainer(load_config(None, EVAL)))
    assert len(expected["train"][0]) == 63 and len(expected["test"][0]) == 17
    for rank in range(WORLD):
        got = torch.load(two_workers / f"eval{rank}.pt")
        for split in ("train", "test"):  # every rank holds every row, in dataset order
            torch.testing.assert_close(got[split][0], expected[split][0], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[split][1], expected[split][1])
        # Rank 0 measures (the kNN bank is the 41-image subset); the other ranks return nothing.
        assert got["metrics"] == (pytest.approx(expected["metrics"]) if rank == 0 else {})
    assert {"knn_top1_k3", "knn_top1_k10", "linear_exit1_top1_best", "linear_ensemble_top1_last"} <= set(
        expected["metrics"]
    )


def test_global_batchnorm_is_plain_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(4)
    converted = convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), torch.device("cpu"))
    assert isinstance(converted[0], GlobalBatchNorm)
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(converted(x), plain(x))


def test_identity_helpers_without_a_process_group() -> None:
    assert not torch_dist.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.rank() == 0 and dist.world_size() == 1
    assert dist.gather_with_grad(x) is x
    assert not dist.gather_no_grad(x).requires_grad
    module = torch.nn.Linear(2, 2)
    assert dist.data_parallel(module, torch.device("cpu")) is module
