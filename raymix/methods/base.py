"""The MoCo v3-style base that every contrastive method builds on (METHODS.md section 0).

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers"
(arXiv 2104.02057): online branch f = predictor(projector(backbone)), key branch
g = projector(backbone) of an EMA copy, or of the online weights under no_grad when
``momentum`` is null. Keys are gathered without gradient; an optional MoCo v2 queue of
past clean keys adds negatives. The MoCo family (MoCo, Un-Mix) may instead run on the
MoCo v2 base (``method.base: v2``, He et al. 2020 / Chen et al. 2020): no predictor, the
query is the projector output, and the loss contrasts it with its own key and the queue.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from raymix import dist
from raymix.config import Config, ContrastConfig
from raymix.losses import info_nce, moco_v2_loss
from raymix.models import build_backbone, ema_update, feature_dim, mlp, momentum_copy
from raymix.schedules import momentum_schedule


class Method(nn.Module):
    """What the engine needs of a method; subclasses build their networks and ``forward``.

    ``forward(view1, view2, labels)`` returns ``(loss, logs)``: the scalar to minimise
    and a dict of detached scalars named like ``loss/contrast``. The engine wraps this
    module (DDP when distributed) and calls :meth:`after_step` after each optimiser step.
    Every method has a ``backbone``.
    """

    backbone: nn.Module

    #: Whether the trainer passes class labels to ``forward`` (only supervised methods).
    uses_labels = False

    #: Augmented views per image the step uses (1: ``forward`` gets ``view2=None``).
    num_views = 2

    def check_data(self, train_images_per_worker: int, num_classes: int) -> None:
        """Refuse (ConfigError) a config that does not suit the training data."""

    def eval_backbone(self) -> nn.Module:
        """The encoder evaluated by kNN and the linear probe."""
        return self.backbone

    def probe_encoders(self) -> dict[str, nn.Module]:
        """Encoders the linear probe measures, by name ('backbone' first); several are also ensembled."""
        return {"backbone": self.eval_backbone()}

    def compile_targets(self) -> list[nn.Module]:
        """Modules whose forward the step calls and ``training.compile`` compiles in place."""
        return [self.backbone]

    #: The method's loss function (its forward calls ``self.loss``), compiled with the modules.
    loss: Callable[..., torch.Tensor]

    def compile_step(self) -> None:
        """``training.compile``: compile every module of :meth:`compile_targets` in place
        (parameter names, and so checkpoints, unchanged) and the loss function."""
        for module in self.compile_targets():
            module.compile()
        if getattr(self, "loss", None) is not None:
            self.loss = torch.compile(self.loss)

    def offset(self, local_batch: int) -> int:
        """Row of this rank's first sample among rows gathered from every worker."""
        return dist.rank() * local_batch

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimiser step (``step`` counts from 1)."""

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class ContrastiveMethod(Method):
    """The MoCo v3 base: backbone, projector, predictor, key encoder and queue.

    With ``method.base: v2`` there is no predictor (:meth:`online` returns the projection
    twice) and ``self.loss`` is :func:`~raymix.losses.moco_v2_loss`: the methods' forwards
    are the same for both bases.
    """

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        method, head = cfg.method, cfg.head
        assert isinstance(method, ContrastConfig)
        self.backbone = build_backbone(cfg.backbone, cfg.data.image_size)
        batchnorm = head.norm == "batchnorm"
        self.base = getattr(method, "base", "v3")
        width = feature_dim(self.backbone)
        self.projector = mlp(width, head.hidden_dim, head.out_dim, head.projector_layers, batchnorm=batchnorm)
        self.predictor: nn.Module | None = None
        if self.base == "v3":
            self.predictor = mlp(
                head.out_dim, head.hidden_dim, head.out_dim, head.predictor_layers, batchnorm=batchnorm
            )
        self.temperature = method.temperature
        self.loss = info_nce if self.base == "v3" else moco_v2_loss
        self.base_momentum = method.momentum
        self.momentum_schedule = method.momentum_schedule
        # Shuffle BN (He et al. 2020, section 3.3) on one worker for a ResNet's keys.
        self.key_bn_groups = cfg.backbone.key_bn_groups if cfg.backbone.name.startswith("resnet") else 1
        self.key_backbone: nn.Module | None = None
        self.key_projector: nn.Module | None = None
        if method.momentum is not None:
            self.key_backbone = momentum_copy(self.backbone)
            self.key_projector = momentum_copy(self.projector)
        # Random unit vectors until real keys replace them (MoCo v2); methods without a
        # ``queue_size`` option have an empty queue.
        queue_size = getattr(method, "queue_size", 0)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, head.out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # -- branches

    def online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projector output z, predictor output p) of the online branch, each (B, out_dim).

        The v2 base has no predictor: its query is z itself, returned as both."""
        z = self.projector(self.backbone(x))
        return z, (z if self.predictor is None else self.predictor(z))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key-branch projections (B, out_dim), never with gradient.

        A ResNet key encoder on one worker would normalise each key with statistics of the
        very batch its positive query comes from (the BatchNorm leak). In training it then
        sees the batch shuffled and cut into ``backbone.key_bn_groups`` groups, each
        normalised alone, and the keys are put back in order. Several workers synchronise
        BatchNorm across workers instead.
        """
        groups = self.key_bn_groups
        if groups == 1 or not self.training or dist.is_distributed():
            return self._encode_keys(x)
        order = torch.randperm(x.shape[0], device=x.device)
        keys = torch.cat([self._encode_keys(chunk) for chunk in x[order].tensor_split(groups)])
        return torch.empty_like(keys).index_copy_(0, order, keys)

    def key_from(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The key of view ``x`` whose online projection ``z`` the step already computed.

        Without a momentum encoder the key branch is the online network under no_grad: its
        output on the same batch, with the same BatchNorm statistics, is ``z`` itself, so it
        is reused instead of a second forward pass. Shuffle BN on one worker normalises the
        keys over other groups, so those are computed.
        """
        if self.key_backbone is None and (
            self.key_bn_groups == 1 or not self.training or dist.is_distributed()
        ):
            return z.detach()
        return self.keys(x)

    def _encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        if self.key_backbone is None or self.key_projector is None:
            return self.projector(self.backbone(x)).detach()
        return self.key_projector(self.key_backbone(x))

    def compile_targets(self) -> list[nn.Module]:
        """The encoders and their heads, online and key."""
        modules = (self.backbone, self.projector, self.predictor, self.key_backbone, self.key_projector)
        return [m for m in modules if m is not None]

    def eval_backbone(self) -> nn.Module:
        """The encoder evaluated by kNN and the linear probe: the key encoder when there is one."""
        return self.key_backbone if self.key_backbone is not None else self.backbone

    # -- queue

    def negatives(self) -> torch.Tensor | None:
        """A snapshot of the queue (so enqueuing later does not touch the autograd graph)."""
        return self.queue.clone() if self.queue.shape[0] else None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: write the gathered clean keys at the pointer, wrapping around."""
        size = self.queue.shape[0]
        if not size or not self.training:
            return
        fifo_write(self.queue, self.queue_ptr, F.normalize(keys.float(), dim=1))

    # -- steps

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the key encoder with the momentum of ``step``."""
        if self.key_backbone is None or self.key_projector is None or self.base_momentum is None:
            return
        m = self.base_momentum
        if self.momentum_schedule == "cosine":
            m = momentum_schedule(step, total_steps, m)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)


@torch.no_grad()
def fifo_write(buffer: torch.Tensor, pointer: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` into the ring ``buffer`` (M, D) at ``pointer`` (a 0-d long tensor, moved
    past them), wrapping around; of more than M rows only the last M are kept."""
    size = buffer.shape[0]
    rows = rows[-size:]
    index = (pointer + torch.arange(rows.shape[0], device=rows.device)) % size
    buffer[index] = rows.to(buffer.dtype)
    pointer.copy_((pointer + rows.shape[0]) % size)


def mix_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s mixing draws: equal on every worker, new every step."""
    return (seed * 1_000_003 + step) % 2**63


class StepDraws(NamedTuple):
    """A training step's mixing randomness, seeded by (training.seed, step).

    ``host``: the numbers that decide the step's shape on the host (whether to mix, the
    mode, lambda, a box), drawn in Python so nothing waits for the device. ``device``: a
    generator on the images' device for tensors of random numbers (a permutation).
    """

    host: random.Random
    device: torch.Generator


def step_draws(seed: int, step: int, device: torch.device | str = "cpu") -> StepDraws:
    """Fresh :class:`StepDraws` of (seed, step), the device generator on ``device``."""
    value = mix_seed(seed, step)
    return StepDraws(random.Random(value), torch.Generator(device).manual_seed(value))


class MixingMethod(ContrastiveMethod):
    """A method that mixes images with randomness shared by every worker.

    :meth:`step_draws` gives each training step the :class:`StepDraws` of (training.seed,
    step), so workers draw the same mixing and a resumed run draws what an uninterrupted
    one would: the step counter is saved in the state dict.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.seed = cfg.training.seed
        self.mix_step = 0  # training forwards so far
        self._generators: dict[torch.device, torch.Generator] = {}

    def get_extra_state(self) -> dict[str, int]:
        return {"mix_step": self.mix_step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.mix_step = int(state["mix_step"])

    def step_draws(self, device: torch.device) -> StepDraws:
        """This step's draws (as :func:`step_draws`); the step advances in training mode only.

        The device generator is made once per device and reseeded each step (on the host:
        no device work).
        """
        value = mix_seed(self.seed, self.mix_step)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device)
        if self.training:
            self.mix_step += 1
        return StepDraws(random.Random(value), self._generators[device].manual_seed(value))
