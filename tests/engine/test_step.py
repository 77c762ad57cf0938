"""The training step at GPU scale, checked on the CPU: no host syncs, no duplicate passes,
float32 logits under bf16 autocast."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from raymix.config import load_config
from raymix.engine.syncs import SyncCounter
from raymix.engine.trainer import Trainer, configure_gpu
from raymix.losses import info_nce, soft_contrast, supcon_loss
from raymix.methods.snclr import snclr_loss, soft_neighbor_weights

TINY = [
    "data.name=synthetic", "data.image_size=16", "data.synthetic_train_size=64",
    "data.synthetic_test_size=16", "backbone.patch_size=8", "backbone.depth=1",
    "head.hidden_dim=32", "head.out_dim=16",
    "training.batch_size=16", "training.progress=false", "training.device=cpu",
]  # fmt: skip

SNCLR = ["method.name=snclr", "method.bank_size=32", "method.num_neighbors=4"]
STEPS = {
    "moco": ["method.name=moco", "method.queue_size=32"],
    "moco_no_momentum": ["method.name=moco", "method.momentum=null", "optim.grad_clip=1.0"],
    "moco_resnet_shuffle_bn": [
        "method.name=moco", "backbone.name=resnet18", "backbone.key_bn_groups=2", "data.image_size=32",
    ],
    "patchmix": ["method.name=patchmix", "method.mix_prob=0.5"],
    "unmix": ["method.name=unmix", "method.prob_global=0.5", "method.queue_size=32"],
    "unmix_asymmetric": ["method.name=unmix", "method.symmetric=false", "method.momentum=null"],
    "snclr": SNCLR,
    "snclr_hard": [*SNCLR, "method.weighting=hard"],
    "snclr_threshold": [*SNCLR, "method.threshold=true"],
    "selfcon": ["method.name=selfcon", "backbone.depth=2", "method.exit_size=same"],
    "selfcon_su": ["method.name=selfcon", "backbone.depth=2", "method.use_labels=false"],
}  # fmt: skip


def trainer_and_batch(*overrides: str) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    trainer = Trainer(load_config(None, [*TINY, *overrides]))
    g = torch.Generator().manual_seed(0)
    size = trainer.cfg.data.image_size
    images = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8, generator=g)
    return trainer, images, torch.randint(0, 4, (16,), generator=g)


@pytest.mark.parametrize("case", sorted(STEPS))
def test_a_training_step_forces_no_host_sync(case):
    trainer, images, labels = trainer_and_batch(*STEPS[case])
    trainer.train_step(images, labels)  # the first step makes the constant buffers
    with SyncCounter() as counter:
        for _ in range(4):
            trainer.train_step(images, labels)
    assert counter.total == 0, (dict(counter.counts), counter.where)


def test_the_sync_counter_sees_what_would_stall_a_gpu():
    x = torch.randn(8)
    with SyncCounter() as counter:
        x.sum().item()
        bool(x.max() > 0)
        x[x > 0]
        x.nonzero()
        torch.tensor([1.0, 2.0])
        x.masked_select(x > 0)
        x[torch.tensor([0, 1])]  # a long index needs no sync (the tensor does: built from Python)
    expected = {"item": 2, "boolean_index": 1, "nonzero": 1, "tensor_from_python": 2, "masked_select": 1}
    assert counter.counts == expected
    assert "test_step.py" in counter.where["item"]
    clean = SyncCounter()
    with clean:
        (x * 2).sum().neg()
        torch.where(x > 0, x, torch.zeros_like(x))
    assert clean.total == 0


def step_flops(*overrides: str) -> int:
    trainer, images, labels = trainer_and_batch(*overrides)
    trainer.train_step(images, labels)
    with FlopCounterMode(display=False) as flops:
        trainer.train_step(images, labels)
    return flops.get_total_flops()


def test_without_a_momentum_encoder_the_keys_reuse_the_online_pass():
    # MoCo: 2 online passes (forward + backward: 3 units each) and 2 key passes (1 each) of
    # the same network; reusing the online projections leaves 6 of 8 units.
    ratio = step_flops("method.momentum=null") / step_flops()
    assert ratio == pytest.approx(0.75, abs=0.02)
    # Symmetric Un-Mix: 3 online passes and 2 key passes: 9 of 11 units.
    ratio = step_flops("method.name=unmix", "method.momentum=null") / step_flops("method.name=unmix")
    assert ratio == pytest.approx(9 / 11, abs=0.02)


def test_reused_keys_equal_a_separate_key_pass():
    trainer, images, _ = trainer_and_batch("method.momentum=null")
    method = trainer.method
    view = trainer.augment(images, trainer.generator)[0]
    z, _ = method.online(view)
    torch.testing.assert_close(method.key_from(view, z), method.keys(view))
    assert not method.key_from(view, z).requires_grad


def test_shuffle_bn_keys_are_still_computed_apart():
    trainer, images, _ = trainer_and_batch(*STEPS["moco_resnet_shuffle_bn"], "method.momentum=null")
    method = trainer.method
    view = trainer.augment(images, trainer.generator)[0]
    z, _ = method.online(view)
    torch.manual_seed(0)
    reused = method.key_from(view, z)
    torch.manual_seed(0)
    torch.testing.assert_close(reused, method.keys(view))  # the grouped pass, not z
    assert not torch.allclose(reused, z.detach())


def test_selfcon_augments_one_view():
    trainer, images, labels = trainer_and_batch(*STEPS["selfcon"])
    calls = []
    augment = trainer.augment

    def counting(images, generator, views=2):
        calls.append(views)
        return augment(images, generator, views=views)

    trainer.augment = counting
    trainer.train_step(images, labels)
    assert calls == [1]
    # The single view is the first of the two views the other methods get.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(augment(images, g1, views=1)[0], augment(images, g2)[0])


LOSSES = {
    "info_nce": lambda q, k: info_nce(q, k, 0, 0.1, k.flip(0)),
    "soft_contrast": lambda q, k: soft_contrast(q, k, torch.eye(q.shape[0]), 0.1),
    "supcon": lambda q, k: supcon_loss(torch.stack([q, k], 1), None, 0.1),
    "snclr": lambda q, k: snclr_loss(q, k, k[:, None].repeat(1, 3, 1), uniform(q), 0.1),
    "neighbour_weights": lambda q, k: soft_neighbor_weights(q, torch.stack([k, k.flip(0)], 1)),
}  # fmt: skip


def uniform(q: torch.Tensor) -> torch.Tensor:
    return torch.full((q.shape[0], 3), 1 / 3)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_compute_in_float32_under_bf16_autocast(name):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)
    exact = LOSSES[name](q, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = LOSSES[name](q, k)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-6, atol=1e-6)


def test_gpu_settings_change_nothing_on_the_cpu_and_set_tf32_and_autotuning_on_cuda():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, matmul.fp32_precision, cudnn.conv.fp32_precision)
    try:
        cudnn.benchmark, matmul.fp32_precision, cudnn.conv.fp32_precision = False, "ieee", "ieee"
        configure_gpu(torch.device("cpu"), tf32=True)
        assert not cudnn.benchmark and matmul.fp32_precision == "ieee"
        configure_gpu(torch.device("cuda"), tf32=True)  # sets flags only: no GPU needed
        assert cudnn.benchmark
        assert matmul.fp32_precision == cudnn.conv.fp32_precision == "tf32"
        configure_gpu(torch.device("cuda"), tf32=False)
        assert matmul.fp32_precision == cudnn.conv.fp32_precision == "ieee"
    finally:
        cudnn.benchmark, matmul.fp32_precision, cudnn.conv.fp32_precision = saved
