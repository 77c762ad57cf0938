"""The one typed configuration of raymix.

A run is described by a single :class:`Config`: YAML files, ``key=value`` overrides
on the command line and (later) Tune samples all pass through :func:`load_config`,
which validates once. Every section rejects unknown keys; every error names the
dotted key and what is allowed. Models are frozen: nothing downstream mutates them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration (or command-line input) that raymix refuses, with a readable reason."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")
# Counts larger than any real run: a typo such as epochs=1e12 is refused, not trained for years.
MAX_EPOCHS = 100_000
MAX_COUNT = 100_000_000
MAX_WIDTH = 65_536
MAX_SEED = 2**31 - 1


def check_name(name: str, key: str) -> str:
    """``name`` becomes one folder (a run or sweep): a single path component, never '.' or '..'."""
    if not NAME_CHARS.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{key} {name!r}: a name must be one folder name of letters, digits, '.', '_' and '-' "
            "(not empty, '.' or '..', no '/')"
        )
    return name


DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "stl10", "imagefolder")
BACKBONES = ("vit_micro", "vit_tiny", "vit_small", "vit_base", "resnet18", "resnet50")

Probability = Annotated[float, Field(ge=0.0, le=1.0)]

# (timm architecture, embed_dim, depth, num_heads). vit_micro is a CPU-sized ViT.
VIT_SIZES: dict[str, tuple[str, int, int, int]] = {
    "vit_micro": ("vit_tiny_patch16_224", 96, 4, 3),
    "vit_tiny": ("vit_tiny_patch16_224", 192, 12, 3),
    "vit_small": ("vit_small_patch16_224", 384, 12, 6),
    "vit_base": ("vit_base_patch16_224", 768, 12, 12),
}


class DataConfig(Section):
    name: Literal["digits", "synthetic", "cifar10", "cifar100", "stl10", "imagefolder"] = "digits"
    root: str | None = Field(None, description="dataset folder (cifar*, stl10, imagefolder)")
    download: bool = Field(False, description="let torchvision download cifar*/stl10 into root")
    image_size: int = Field(32, ge=8, le=1024, description="side of the square training images")
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="digits: held-out share")
    split_seed: int = Field(0, ge=0, le=MAX_SEED, description="digits/synthetic: seed of the fixed split")
    synthetic_train_size: int = Field(2000, ge=2, le=MAX_COUNT)
    synthetic_test_size: int = Field(500, ge=1, le=MAX_COUNT)
    synthetic_classes: int = Field(10, ge=2, le=1000)
    loader_workers: int = Field(
        0, ge=0, le=1024, description="imagefolder: decoding processes per training worker (persistent)"
    )
    prefetch: int = Field(
        4, ge=1, le=1024, description="imagefolder: batches each loader process decodes ahead"
    )
    loader: Literal["torch", "ray"] = Field(
        "torch", description="imagefolder: decode in local loader processes (torch) or as Ray Data tasks "
        "on any CPU node of the cluster (ray; trains through Ray Train)",
    )  # fmt: skip
    decode_cpus: float = Field(
        1.0, gt=0.0, le=1024, description="data.loader=ray: CPUs each Ray Data decoding task reserves"
    )
    decode: Literal["cpu", "device"] = Field(
        "cpu", description="imagefolder JPEGs: decode on the CPU at reduced size (PIL draft mode) or on the "
        "training device (torchvision.io.decode_jpeg; nvJPEG on CUDA)",
    )  # fmt: skip
    eval_crop_fraction: float = Field(
        0.875, gt=0.0, le=1.0, description="imagefolder evaluation: resize the shorter side to "
        "image_size / fraction, then take the centre image_size square (0.875: 256 -> 224)",
    )  # fmt: skip


class AugmentConfig(Section):
    """Two-view augmentation, applied batched on the training device.

    Per-view pairs are (view 1, view 2), as in MoCo v3 (blur 1.0 / 0.1, solarize 0 / 0.2).
    """

    crop_scale: tuple[Probability, Probability] = (0.2, 1.0)
    crop_ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (3 / 4, 4 / 3)
    flip_prob: Probability = 0.5
    jitter_prob: Probability = 0.8
    brightness: float = Field(0.4, ge=0.0)
    contrast: float = Field(0.4, ge=0.0)
    saturation: float = Field(0.2, ge=0.0)
    hue: float = Field(0.1, ge=0.0, le=0.5)
    grayscale_prob: Probability = 0.2
    blur_prob: tuple[Probability, Probability] = (1.0, 0.1)
    blur_sigma: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.1, 2.0)
    solarize_prob: tuple[Probability, Probability] = (0.0, 0.2)

    @model_validator(mode="after")
    def _ordered(self) -> AugmentConfig:
        for key in ("crop_scale", "crop_ratio", "blur_sigma"):
            low, high = getattr(self, key)
            if low > high or (key == "crop_scale" and low == 0.0):
                raise ValueError(f"augment.{key} must be (low, high) with 0 < low <= high, got {(low, high)}")
        return self


class BackboneConfig(Section):
    name: Literal["vit_micro", "vit_tiny", "vit_small", "vit_base", "resnet18", "resnet50"] = "vit_micro"
    patch_size: int = Field(4, ge=1, le=1024, description="ViT patch side; must divide data.image_size")
    embed_dim: int | None = Field(None, ge=8, le=MAX_WIDTH, description="ViT width override")
    depth: int | None = Field(None, ge=1, le=1000, description="ViT depth override")
    num_heads: int | None = Field(None, ge=1, le=1024, description="ViT heads override")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    cifar_stem: bool = Field(True, description="ResNet: 3x3 stride-1 stem and no max-pool")
    key_bn_groups: int = Field(
        4, ge=1, le=4096, description="ResNet keys on one worker: shuffle the batch and normalise it in this "
        "many BatchNorm groups (shuffle BN against the BN leak); 1: off. Several workers sync BN instead",
    )  # fmt: skip


class HeadConfig(Section):
    """MoCo v3 heads: Linear(no bias) -> BN -> ReLU blocks, last layer BN(affine=False)."""

    hidden_dim: int = Field(1024, ge=8, le=MAX_WIDTH)
    out_dim: int = Field(256, ge=8, le=MAX_WIDTH)
    projector_layers: int = Field(3, ge=1, le=64)
    predictor_layers: int = Field(2, ge=1, le=64)
    norm: Literal["batchnorm", "none"] = Field(
        "batchnorm",
        description="batchnorm: MoCo v3's heads; none: MoCo v2's (Linear with bias -> ReLU, no BN)",
    )


class ContrastConfig(Section):
    """The MoCo v3 base shared by the contrastive methods (METHODS.md section 0)."""

    temperature: float = Field(0.2, gt=0.0, le=10.0)
    momentum: float | None = Field(0.99, ge=0.0, lt=1.0, description="EMA m0; null: no key encoder")
    momentum_schedule: Literal["cosine", "constant"] = "cosine"


class QueueConfig(ContrastConfig):
    """The MoCo family: the v3 base, whose loss can take extra negatives from a queue of past
    clean keys, or the v2 base (no predictor, the queue as the only negatives)."""

    base: Literal["v3", "v2"] = Field(
        "v3",
        description="v3: predictor, 2 tau CE over gathered keys and the queue; v2: no predictor, "
        "CE([q.k+, q.queue] / tau) with the queue as the only negatives (needs queue_size > 0)",
    )
    queue_size: int = Field(0, ge=0, le=MAX_COUNT, description="MoCo v2 queue of past keys; 0 disables it")
    symmetric: bool = Field(True, description="both views as queries; false: view 1's queries, view 2's keys")

    @model_validator(mode="after")
    def _v2_has_queue(self) -> QueueConfig:
        if self.base == "v2" and self.queue_size == 0:
            raise ValueError(
                "method.base=v2 takes its negatives from the queue alone, and method.queue_size=0 "
                "leaves it none; allowed: method.queue_size >= 1 with base v2, or method.base=v3"
            )
        return self


class MocoConfig(QueueConfig):
    name: Literal["moco"] = "moco"


class PatchMixConfig(ContrastConfig):
    """PatchMix (METHODS.md section 1): soft contrasts between original and patch-mixed images."""

    name: Literal["patchmix"] = "patchmix"
    momentum: float | None = Field(None, ge=0.0, lt=1.0, description="EMA m0; null: no key encoder")
    mix_num: int = Field(2, ge=2, le=MAX_COUNT, description="images mixed into each mixed image (m)")
    mix_prob: Probability = Field(1.0, description="probability that a step mixes at all")
    mixed_weight: float = Field(0.5, ge=0.0, description="weight w of the two mixed terms")
    smoothing_oo: Probability = Field(0.1, description="label smoothing of the orig-orig target")
    smoothing_mixed: Probability = Field(0.0, description="label smoothing of the mixed targets")
    mix_patch_size: int | None = Field(
        None, ge=1, description="side of the mixed patches, a multiple of backbone.patch_size; null: equal"
    )


class UnmixConfig(QueueConfig):
    """Un-Mix (METHODS.md section 2): global and region mixtures with the reversed batch."""

    name: Literal["unmix"] = "unmix"
    prob_global: Probability = Field(0.5, description="P: share of steps that mix globally (mixup)")
    beta: float = Field(1.0, gt=0.0, description="lambda ~ Beta(beta, beta), one per step")


class SnclrConfig(ContrastConfig):
    """SNCLR (METHODS.md section 3): bank neighbours of the key as soft positives."""

    name: Literal["snclr"] = "snclr"
    num_neighbors: int = Field(30, ge=1, le=MAX_COUNT, description="K: bank neighbours per key")
    bank_size: int = Field(
        4096,
        ge=1,
        le=MAX_COUNT,
        description="M: past view-2 keys per worker; at most the training images per worker",
    )
    weighting: Literal["attention", "uniform", "hard"] = Field(
        "attention", description="attention: softmax of cosines to the anchor; uniform: 1/K; hard: top-1"
    )
    threshold: bool = Field(False, description="attention: drop weights below 1/K")
    detach_weights: bool = Field(False, description="no gradient through the weights")

    @model_validator(mode="after")
    def _fits_bank(self) -> SnclrConfig:
        if self.num_neighbors > self.bank_size:
            raise ValueError(
                f"method.num_neighbors={self.num_neighbors} is larger than method.bank_size="
                f"{self.bank_size}; allowed: 1..{self.bank_size}"
            )
        return self


class SelfconConfig(Section):
    """SelfCon (METHODS.md section 4): supervised contrast between the backbone and exits."""

    name: Literal["selfcon"] = "selfcon"
    temperature: float = Field(0.1, gt=0.0, le=10.0)
    exits: list[bool] | None = Field(
        None, description="one flag per attachment point (ResNet: after layer1..3; ViT: after each "
        "block but the last); null: the middle point only",
    )  # fmt: skip
    exit_size: Literal["fc", "small", "same"] = Field(
        "fc", description="fc: pool + Linear; same: a copy of the following layers; small: half of them"
    )
    use_labels: bool = Field(
        True, description="false: positives are the same image's other exits (SelfCon-SU)"
    )
    views: int = Field(
        1, ge=1, le=2, description="augmented views per image: 1 (SelfCon); 2 (SelfCon-M, or SupCon "
        "with exits all false)",
    )  # fmt: skip


# One entry per method; the union below is discriminated by ``method.name``.
METHOD_CONFIGS: dict[str, type[Section]] = {
    "moco": MocoConfig,
    "patchmix": PatchMixConfig,
    "unmix": UnmixConfig,
    "snclr": SnclrConfig,
    "selfcon": SelfconConfig,
}
METHOD_NAMES = tuple(METHOD_CONFIGS)
DEFAULT_METHOD = "moco"

#: Keys whose value may change in the middle of a run: when a run resumes from its checkpoint
#: with a new value, and when Population Based Training hands a trial another trial's
#: checkpoint with perturbed values. None of them is in the state a checkpoint holds: the
#: trainer reads each from the config it is rebuilt with (the optimiser's schedules every
#: step, the method's loss and mixing settings as plain attributes). A ``method.*`` key
#: applies to the methods whose section has it.
MUTABLE_KEYS: tuple[str, ...] = (
    "optim.lr",
    "optim.min_lr",
    "optim.weight_decay",
    "optim.weight_decay_end",
    "optim.grad_clip",
    "method.temperature",  # every method
    "method.mix_prob",  # patchmix
    "method.mixed_weight",
    "method.smoothing_oo",
    "method.smoothing_mixed",
    "method.prob_global",  # unmix
    "method.beta",
    "method.num_neighbors",  # snclr
    "method.weighting",
    "method.threshold",
    "method.detach_weights",
)
MethodConfig = Annotated[
    MocoConfig | PatchMixConfig | UnmixConfig | SnclrConfig | SelfconConfig, Field(discriminator="name")
]


class OptimConfig(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1.5e-3, gt=0.0, description="base learning rate (see lr_scaling)")
    lr_scaling: Literal["linear", "none"] = Field("linear", description="linear: lr * batch_size / 256")
    min_lr: float = Field(0.0, ge=0.0, description="end of the cosine decay (absolute)")
    warmup_epochs: float = Field(0.0, ge=0.0, le=MAX_EPOCHS)
    weight_decay: float = Field(0.05, ge=0.0)
    weight_decay_end: float | None = Field(None, ge=0.0, description="cosine wd schedule end; null: constant")
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    sgd_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0, description="max gradient norm; null: no clipping")


class TrainingConfig(Section):
    epochs: int = Field(20, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(256, ge=2, le=MAX_COUNT, description="global batch over all workers")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    compile: bool = Field(
        False, description="torch.compile the encoders (for GPUs; a minute or so of compiling first)"
    )
    channels_last: bool = Field(False, description="NHWC weights and batches: ResNets on GPU tensor cores")
    tf32: bool = Field(True, description="GPU: TF32 tensor cores for float32 matmuls and convolutions")
    eval_every: int = Field(1, ge=0, le=MAX_EPOCHS, description="kNN every n epochs; 0: only after the last")
    checkpoint_every: int = Field(1, ge=1, le=MAX_EPOCHS)
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="Ray Train: the best k by knn_top1 (the latest is kept too)"
    )
    output_dir: str | None = Field(None, description="null: runs/<run_name>")
    run_name: str | None = Field(
        None, description="the run's folder name under runs/ or scaling.storage_path"
    )
    progress: bool = True

    @model_validator(mode="after")
    def _single_folder(self) -> TrainingConfig:
        if self.run_name is not None:
            check_name(self.run_name, "training.run_name")
        return self


class EvalConfig(Section):
    knn_k: tuple[Annotated[int, Field(ge=1, le=MAX_COUNT)], ...] = Field((20, 200), min_length=1)
    knn_temperature: float = Field(0.07, gt=0.0)
    knn_chunk_size: int = Field(1024, ge=1, le=MAX_COUNT)
    linear_epochs: int = Field(50, ge=1, le=MAX_EPOCHS)
    linear_lr: float = Field(0.1, gt=0.0)
    linear_batch_size: int = Field(256, ge=1, le=MAX_COUNT)
    linear_at_end: bool = Field(False, description="run the linear probe after training")
    knn_train_subset: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="kNN and linear probe: a fixed, class-stratified subset of "
        "this many training images as the bank (null: all); bounds evaluation cost on ImageNet-1K",
    )  # fmt: skip


class TrackingConfig(Section):
    enabled: bool = Field(
        True,
        description="record in MLflow every run (raymix train: one run) and every sweep "
        "(a parent run and one child run per trial)",
    )
    uri: str | None = Field(
        None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins; null: sqlite:///mlflow.db here"
    )
    experiment: str = "raymix"
    log_checkpoints: Literal["best", "last", "both", "none"] = Field(
        "best", description="checkpoints logged as MLflow artifacts at the end of a run or trial"
    )


class ScalingConfig(Section):
    """Where a run executes. ``backend=auto`` trains in this process when one worker is asked
    for and no cluster is given (no RAY_ADDRESS), and through Ray Train otherwise."""

    backend: Literal["auto", "local", "ray"] = "auto"
    num_workers: int = Field(
        1, ge=1, le=100_000, description="data-parallel workers (processes), one GPU each with use_gpu"
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0, le=100_000)
    storage_path: str | None = Field(
        None, description="Ray Train run storage (a shared path or URI on multi-node clusters); "
        "null: the parent folder of the run's output_dir",
    )  # fmt: skip
    max_failures: int = Field(
        0, ge=0, le=1000, description="worker-group restarts from the latest checkpoint"
    )
    sync_batchnorm: Literal["global", "torch"] = Field(
        "global",
        description="BatchNorm across workers: global (raymix's, no host sync, any device) or "
        "torch (torch's SyncBatchNorm on GPUs; 3 host syncs per layer per forward)",
    )


class DebugConfig(Section):
    fail_at_epoch: int | None = Field(
        None,
        ge=1,
        le=MAX_EPOCHS,
        description="fault injection: a worker process dies once at the start of this epoch",
    )


class Config(Section):
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    backbone: BackboneConfig = BackboneConfig()
    head: HeadConfig = HeadConfig()
    method: MethodConfig = Field(default_factory=lambda: METHOD_CONFIGS[DEFAULT_METHOD]())  # type: ignore[assignment]
    optim: OptimConfig = OptimConfig()
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    scaling: ScalingConfig = ScalingConfig()
    debug: DebugConfig = DebugConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        size, patch = self.data.image_size, self.backbone.patch_size
        if self.backbone.name.startswith("vit") and size % patch:
            raise ValueError(
                f"backbone.patch_size={patch} does not divide data.image_size={size}; "
                f"allowed: a divisor of {size}"
            )
        if self.training.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"training.batch_size={self.training.batch_size} is not divisible by "
                f"scaling.num_workers={self.scaling.num_workers}"
            )
        if self.scaling.backend == "local" and self.scaling.num_workers > 1:
            raise ValueError(
                f"scaling.num_workers={self.scaling.num_workers} needs scaling.backend=ray (or auto); "
                "backend=local trains one worker in this process"
            )
        if self.data.name in ("cifar10", "cifar100", "stl10", "imagefolder") and not self.data.root:
            raise ValueError(f"data.root is required for data.name={self.data.name!r}")
        if self.data.loader == "ray":  # Ray Data tasks decode an image folder for Ray Train workers
            if self.data.name != "imagefolder":
                raise ValueError(
                    f"data.loader=ray decodes image folders on the cluster; data.name={self.data.name} "
                    "needs data.loader=torch (allowed with data.loader=ray: data.name=imagefolder)"
                )
            if self.scaling.backend == "local":
                raise ValueError(
                    "data.loader=ray trains through Ray Train; scaling.backend=local needs "
                    "data.loader=torch (allowed with data.loader=ray: scaling.backend=auto or ray)"
                )
            if self.data.decode != "cpu":
                raise ValueError(
                    f"data.loader=ray decodes on the CPUs of the cluster; data.decode={self.data.decode} "
                    "needs data.loader=torch (allowed with data.loader=ray: data.decode=cpu)"
                )
        local_batch = self.training.batch_size // self.scaling.num_workers
        groups = self.backbone.key_bn_groups
        has_keys = isinstance(self.method, ContrastConfig)  # SelfCon has no key encoder
        if (
            has_keys
            and self.backbone.name.startswith("resnet")
            and self.scaling.num_workers == 1
            and groups > 1
        ):
            if local_batch < 2 * groups:
                raise ValueError(
                    f"backbone.key_bn_groups={groups} leaves fewer than 2 images per BatchNorm group "
                    f"in a batch of {local_batch}; allowed: 1..{local_batch // 2}"
                )
        if isinstance(self.method, PatchMixConfig):
            self._check_patchmix(self.method)
        if isinstance(self.method, SelfconConfig):
            self._check_exits(self.method)
        if isinstance(self.method, UnmixConfig) and local_batch < 2:
            raise ValueError(
                f"method.name=unmix mixes each image with its partner in the reversed batch, but the "
                f"per-worker batch (training.batch_size={self.training.batch_size} / "
                f"scaling.num_workers={self.scaling.num_workers}) is 1 image; allowed: 2 or more"
            )
        return self

    def _check_exits(self, method: SelfconConfig) -> None:
        points = exit_points(self.backbone)
        backbone = f"backbone.name={self.backbone.name}"
        if self.backbone.name.startswith("vit"):
            backbone += f" with depth {points + 1}"
            if points < 1:
                raise ValueError(
                    f"backbone.depth={points + 1} leaves no attachment point for a SelfCon exit; "
                    "allowed: depth >= 2"
                )
        if method.exits is not None and len(method.exits) != points:
            raise ValueError(
                f"method.exits has {len(method.exits)} flags; {backbone} has {points} attachment points"
            )
        if method.exits is not None and not any(method.exits) and method.views == 1:
            raise ValueError(
                "method.exits selects no exit and method.views=1 leaves one embedding per image; "
                "allowed: at least one exit, or method.views=2 with no exit (SupCon)"
            )

    def _check_patchmix(self, method: PatchMixConfig) -> None:
        backbone, size = self.backbone, self.data.image_size
        if not backbone.name.startswith("vit"):
            vits = ", ".join(b for b in BACKBONES if b.startswith("vit"))
            raise ValueError(
                f"method.name=patchmix mixes ViT patches, but backbone.name={backbone.name} has no "
                f"patch grid; allowed backbones: {vits}"
            )
        local_batch = self.training.batch_size // self.scaling.num_workers
        if method.mix_num > local_batch:
            raise ValueError(
                f"method.mix_num={method.mix_num} exceeds the per-worker batch of {local_batch} images "
                f"(training.batch_size / scaling.num_workers); allowed: 2..{local_batch}"
            )
        patch = method.mix_patch_size or backbone.patch_size
        if patch % backbone.patch_size or size % patch:
            raise ValueError(
                f"method.mix_patch_size={patch} must be a multiple of backbone.patch_size="
                f"{backbone.patch_size} that divides data.image_size={size}"
            )
        positions = (size // patch) ** 2
        if method.mix_num > positions:
            raise ValueError(
                f"method.mix_num={method.mix_num} exceeds the {positions} patch positions of a "
                f"{size}px image cut into {patch}px patches; allowed: mix_num <= {positions} "
                "(smaller method.mix_patch_size gives more positions)"
            )

    @property
    def run_name(self) -> str:
        if self.training.run_name:
            return self.training.run_name
        return f"{self.method.name}-{self.data.name}-{self.backbone.name}-s{self.training.seed}"

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir or Path("runs") / self.run_name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def exit_points(backbone: BackboneConfig) -> int:
    """SelfCon attachment points: 3 in a ResNet (after layer1..3); depth - 1 in a ViT."""
    if backbone.name.startswith("resnet"):
        return 3
    return (backbone.depth or VIT_SIZES[backbone.name][2]) - 1


def exit_flags(cfg: Config) -> list[bool]:
    """SelfCon's exits with the default filled in: the middle attachment point only."""
    assert isinstance(cfg.method, SelfconConfig)
    if cfg.method.exits is not None:
        return list(cfg.method.exits)
    points = exit_points(cfg.backbone)
    return [i == (points - 1) // 2 for i in range(points)]


# ---------------------------------------------------------------- loading


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's internal steps (validator names, the union tag after ``method``)."""
    out: list[Any] = []
    for part in loc:
        if str(part).startswith("function-"):
            continue
        if out == ["method"] and part in METHOD_CONFIGS:
            continue
        out.append(part)
    return tuple(out)


def _describe(error: Any, raw: dict[str, Any]) -> str:
    loc = _clean_loc(error["loc"])
    key = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        allowed = ", ".join(sorted(_fields_at(parent, raw)))
        where = " in " + ".".join(map(str, parent)) if parent else ""
        return f"unknown key '{key}'; allowed keys{where}: {allowed}"
    if kind == "union_tag_invalid":
        got = error.get("ctx", {}).get("tag")
        return f"{key}.name: unknown method {got!r}; allowed: {', '.join(METHOD_NAMES)}"
    if kind == "value_error":
        return error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key or 'config'}: {error['msg']}{shown}"


def _fields_at(loc: tuple[Any, ...], raw: dict[str, Any]) -> list[str]:
    """The keys allowed in the section at ``loc`` (the method section by its name)."""
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
        if part == "method":
            name = (raw.get("method") or {}).get("name", DEFAULT_METHOD)
            model = METHOD_CONFIGS.get(name, MocoConfig)
    return list(getattr(model, "model_fields", {}))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a nested dict into a :class:`Config`, raising :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    method = raw.get("method")
    if isinstance(method, dict) and "name" not in method:
        # A method section without a name refines the default method.
        raw = {**raw, "method": {"name": DEFAULT_METHOD, **method}}
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # A list whose items failed also reports itself as empty: say only what the items did.
        failed_items = {tuple(e["loc"][:-1]) for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
        errors = [e for e in errors if not (e["type"] == "too_short" and tuple(e["loc"]) in failed_items)]
        raise ConfigError("; ".join(_describe(e, raw) for e in errors)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is read as YAML (numbers, null, lists, booleans)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        return key, yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        return key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key=value`` override set."""
    return apply_values(raw, dict(parse_override(text) for text in overrides))


def apply_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each dotted key set to its value (sections created as needed).

    Setting ``method.name`` to another method starts that method from its own defaults: the
    keys of the previous method's section that the new one lacks are dropped (the values
    given alongside are kept, and checked).
    """
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(raw)) or {}
    name = values.get("method.name")
    section = out.get("method")
    if isinstance(name, str) and name in METHOD_CONFIGS and isinstance(section, dict):
        if section.get("name", DEFAULT_METHOD) != name:
            allowed = METHOD_CONFIGS[name].model_fields
            out["method"] = {k: v for k, v in section.items() if k in allowed}
    for key, value in values.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or the defaults when ``path`` is None), apply overrides, validate once."""
    raw = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides or []))
