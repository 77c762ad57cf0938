"""The training engine: data, augmentation, method, optimiser and one epoch at a time.

No Ray, no MLflow: the CLI drives it in-process and the Ray Train worker drives the same
object on each worker. ``training.batch_size`` is the global batch; each of the
``world_size`` workers trains on ``batch_size // world_size`` images per step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from raymix import dist
from raymix.config import Config
from raymix.data import BatchLoader, FolderData, ImageData, TwoViewAugment, build_datasets, normalize
from raymix.data.folder import CropSpec
from raymix.engine.features import stratified_subset, subset_view, unshard
from raymix.engine.knn import knn_accuracies
from raymix.engine.linear import linear_probe_ensemble
from raymix.engine.optim import Schedules, build_optimizer
from raymix.methods import Method, build_method
from raymix.models.syncbn import convert_batchnorm

EVAL_BATCH = 512
Datasets = tuple[ImageData | FolderData, ImageData | FolderData]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device=cuda but no CUDA device is visible; use training.device=cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "bf16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def configure_gpu(device: torch.device, tf32: bool) -> None:
    """What every fast trainer sets on a GPU: cuDNN picks its fastest convolution for the
    (fixed) shapes, and float32 matmuls and convolutions run on TF32 tensor cores (with
    ``tf32``). Process-wide settings; nothing changes on other devices."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision  # type: ignore[attr-defined]


class Trainer:
    """Holds everything a run needs; ``train_epoch`` and ``evaluate`` advance and measure it.

    When torch.distributed is initialised (one process per worker), the trainer shards
    the data by rank, synchronises BatchNorm across workers and wraps the method in DDP;
    the unwrapped module stays available as ``self.method``.
    """

    def __init__(
        self, cfg: Config, *, device: torch.device | None = None, data: Datasets | None = None
    ) -> None:
        """``data``: the (train, test) datasets of ``cfg.data`` when the caller has them
        already (a Ray Train worker receives them through the object store)."""
        rank, world_size = dist.rank(), dist.world_size()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = device or resolve_device(cfg.training.device)
        self.amp_dtype = resolve_precision(cfg.training.precision, self.device)
        configure_gpu(self.device, cfg.training.tf32)
        seed = cfg.training.seed

        self.train_data, self.test_data = data if data is not None else build_datasets(cfg.data)
        torch.manual_seed(seed)  # identical initial weights on every rank
        self.method: Method = build_method(cfg).to(self.device)
        #: Model sizes, reported with every epoch (a cost a multi-objective sweep can minimise):
        #: the evaluated encoder's parameters, and every parameter the optimiser trains.
        self.sizes = {
            "encoder_params": sum(p.numel() for p in self.method.eval_backbone().parameters()),
            "model_params": sum(p.numel() for p in self.method.parameters() if p.requires_grad),
        }
        local_batch = cfg.training.batch_size // world_size
        # Image folders cut each view's crop from the full image while decoding.
        crops = CropSpec(cfg.augment.crop_scale, cfg.augment.crop_ratio, self.method.num_views, seed)
        self.train_loader = BatchLoader(
            self.train_data, local_batch, shuffle=True, drop_last=True, seed=seed,
            rank=rank, world_size=world_size, device=self.device, num_workers=cfg.data.loader_workers,
            prefetch=cfg.data.prefetch, crops=crops, decode=cfg.data.decode,
        )  # fmt: skip
        self.augment = TwoViewAugment(
            cfg.augment, cfg.data.image_size, self.train_data.mean, self.train_data.std
        )
        self.method.check_data(len(self.train_loader) * local_batch, self.train_data.num_classes)
        self.channels_last = cfg.training.channels_last
        if world_size > 1:
            convert_batchnorm(self.method, self.device, cfg.scaling.sync_batchnorm)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if cfg.training.compile:
            self.compile()
        self.model = dist.data_parallel(self.method, self.device)
        self.optimizer = build_optimizer(self.method, cfg.optim, self.device)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * cfg.training.epochs
        self.schedules = Schedules(
            cfg.optim, cfg.training.batch_size, self.steps_per_epoch, cfg.training.epochs
        )
        # Augmentation randomness differs per rank; dropout/drop-path uses the global RNG.
        self.generator = torch.Generator(self.device).manual_seed(seed * 1000 + rank + 1)
        torch.manual_seed(seed * 1000 + rank + 1)
        self.epoch = 0
        self.step = 0
        self.train_seconds = 0.0  # time spent in train_epoch over the whole run, resumes included

    # ------------------------------------------------------------------ training

    def compile(self) -> None:
        """torch.compile the method's encoders, heads and loss (checkpoint names unchanged)."""
        self.method.compile_step()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        """A batch in the memory format of the weights (NHWC with ``training.channels_last``)."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step on a batch of uint8 images; returns detached logs (no host sync)."""
        self.schedules.apply(self.optimizer, self.step)
        views = self.augment(images, self.generator, views=self.method.num_views)  # (B, 3, S, S) each
        view1 = self.layout(views[0])
        view2 = self.layout(views[1]) if len(views) > 1 else None
        with self.autocast():
            loss, logs = self.model(view1, view2, labels if self.method.uses_labels else None)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.grad_clip
        if clip is not None:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.method.parameters(), clip).detach()
        self.optimizer.step()
        self.step += 1
        self.method.after_step(self.step, self.total_steps)
        logs["loss"] = loss.detach()
        return logs

    def train_epoch(self, progress: bool = False) -> dict[str, float]:
        """One pass over this rank's shard; returns epoch means of every logged value."""
        self.method.train()
        self.train_loader.set_epoch(self.epoch)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}  # a value some steps do not log is averaged over the steps that do
        start = time.perf_counter()
        bar = tqdm(
            self.train_loader, desc=f"epoch {self.epoch + 1}/{self.cfg.training.epochs}",
            disable=None if progress else True, leave=False, dynamic_ncols=True,  # None: only on a terminal
        )  # fmt: skip
        for i, (images, labels) in enumerate(bar):
            logs = self.train_step(images, labels)
            for key, value in logs.items():
                sums[key] = sums.get(key, 0) + value.float()
                counts[key] = counts.get(key, 0) + 1
            if not bar.disable and i % 10 == 0:  # a sync, only while a bar is shown
                bar.set_postfix(loss=f"{logs['loss'].item():.4f}")
        self.epoch += 1
        names = list(sums)
        # One all-reduce and one read back to the host for the whole epoch.
        totals = dist.all_reduce_mean(torch.stack([sums[key] for key in names])).tolist() if names else []
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        metrics = {key: total / counts[key] for key, total in zip(names, totals, strict=True)}
        if not math.isfinite(metrics.get("loss", 0.0)):
            raise FloatingPointError(f"loss is not finite ({metrics.get('loss')}) in epoch {self.epoch}")
        metrics["lr"] = self.schedules.lr(self.step - 1)  # the rate of the epoch's last step
        metrics["epoch"] = self.epoch
        metrics["epoch_seconds"] = seconds
        metrics["train_seconds"] = self.train_seconds
        global_batch = self.train_loader.batch_size * self.world_size
        metrics["images_per_second"] = self.steps_per_epoch * global_batch / seconds
        metrics.update(self.sizes)
        return metrics

    # ------------------------------------------------------------------ evaluation

    @contextlib.contextmanager
    def _eval_mode(self, module: nn.Module) -> Iterator[None]:
        was_training = module.training
        module.eval()
        try:
            yield
        finally:
            module.train(was_training)

    @functools.cached_property
    def eval_train_data(self) -> Any:
        """The training images evaluation encodes for the kNN bank and the linear probe: all of
        them, or with ``eval.knn_train_subset`` (smaller than the training set) a fixed,
        class-stratified subset of that many, drawn from the labels with ``training.seed``
        before any image is decoded (the same subset on every rank and at every evaluation)."""
        size = self.cfg.eval.knn_train_subset
        if size is None or size >= len(self.train_data):
            return self.train_data
        indices = stratified_subset(self.train_data.labels, size, self.cfg.training.seed)
        return subset_view(self.train_data, indices)

    @torch.no_grad()
    def features(self, data: Any, encoder: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, D) float32 of every image of ``data`` (no augmentation) and their labels
        (N,), in dataset order, from ``encoder`` (default: the evaluated backbone).

        A collective when distributed: each rank encodes only its shard (the strided indices
        ``rank::world_size``) and the shards are gathered to every rank and put back in dataset
        order, so every rank must call it, and each gets what one process computes alone.
        """
        encoder = encoder or self.method.eval_backbone()
        loader = BatchLoader(
            data, EVAL_BATCH, shuffle=False, drop_last=False, rank=self.rank, world_size=self.world_size,
            device=self.device, num_workers=self.cfg.data.loader_workers, prefetch=self.cfg.data.prefetch,
            persistent=False,  # the decoding processes end with the pass
        )  # fmt: skip
        feats, labels = [], []
        with self._eval_mode(encoder):
            for images, targets in loader:
                x = self.layout(normalize(images, data.mean, data.std))
                with self.autocast():
                    feats.append(encoder(x).float())
                labels.append(targets)
        # A rank may hold no image at all (fewer images than ranks); the gather fills in D.
        shard_x = torch.cat(feats) if feats else torch.empty(0, 0, device=self.device)  # (n_rank, D)
        shard_y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64, device=self.device)
        return unshard(dist.all_gather_uneven(shard_x)), unshard(dist.all_gather_uneven(shard_y))

    def evaluate(self, linear: bool = False) -> dict[str, float]:
        """kNN top-1 for each configured k (``knn_top1`` is the first k); linear probe if asked.

        A collective when distributed: every rank must call it, with the same ``linear``. All
        ranks extract features of their shards (:meth:`features`); rank 0 alone then runs the
        kNN and the probe and returns the metrics, the other ranks return ``{}``. The kNN bank
        and the probe's training set are :attr:`eval_train_data`.
        """
        cfg = self.cfg.eval
        train_data = self.eval_train_data
        train_x, train_y = self.features(train_data)
        test_x, test_y = self.features(self.test_data)
        extra = self._probe_features(train_data) if linear else ([], [])  # before any rank-0 work
        if self.rank != 0:
            return {}
        accs = knn_accuracies(
            train_x, train_y, test_x, test_y, ks=cfg.knn_k, temperature=cfg.knn_temperature,
            chunk_size=cfg.knn_chunk_size,
        )  # fmt: skip
        metrics = {f"knn_top1_k{k}": acc for k, acc in accs.items()}
        metrics["knn_top1"] = accs[cfg.knn_k[0]]
        if linear:
            metrics.update(self.linear_metrics(train_x, train_y, test_x, test_y, extra=extra))
        return metrics

    def _probe_features(self, train_data: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(train, test) features of each probed encoder after the backbone (a collective)."""
        encoders = list(self.method.probe_encoders().values())[1:]
        trains = [self.features(train_data, encoder)[0] for encoder in encoders]
        tests = [self.features(self.test_data, encoder)[0] for encoder in encoders]
        return trains, tests

    def linear_metrics(
        self,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        *,
        extra: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        """``linear_top1_best``/``_last`` of the backbone (features given, of
        :attr:`eval_train_data` and the test set); with a method that has more encoders
        (SelfCon's exits), ``linear_<name>_top1_*`` of each and of their ensemble.

        ``extra``: the other encoders' (train, test) features when the caller has them; else
        they are extracted here, a collective every rank must call. The probe itself runs on
        rank 0; other ranks return ``{}``.
        """
        cfg = self.cfg.eval
        encoders = self.method.probe_encoders()
        extra_trains, extra_tests = extra if extra is not None else self._probe_features(self.eval_train_data)
        if self.rank != 0:
            return {}
        trains, tests = [train_x, *extra_trains], [test_x, *extra_tests]
        results, ensemble = linear_probe_ensemble(
            trains, train_y, tests, test_y, epochs=cfg.linear_epochs, lr=cfg.linear_lr,
            batch_size=cfg.linear_batch_size, seed=self.cfg.training.seed,
        )  # fmt: skip
        names = ["" if name == "backbone" else f"_{name}" for name in encoders]
        if len(encoders) > 1:
            names, results = [*names, "_ensemble"], [*results, ensemble]
        metrics = {}
        for name, result in zip(names, results, strict=True):
            metrics[f"linear{name}_top1_best"] = result.best_top1
            metrics[f"linear{name}_top1_last"] = result.last_top1
        return metrics

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: weights, optimiser, counters, RNG states."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "augment": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "train_seconds": self.train_seconds,
            "rng": rng,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        self.generator.set_state(rng["augment"].cpu())
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
