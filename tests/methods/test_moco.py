import math

import pytest
import torch

from raymix.config import load_config
from raymix.methods import METHODS, build_method

TINY = [
    "data.image_size=16",
    "backbone.patch_size=8",
    "backbone.depth=1",
    "head.hidden_dim=32",
    "head.out_dim=16",
]


def make(*overrides):
    torch.manual_seed(0)
    return build_method(load_config(None, TINY + list(overrides)))


def test_registry_names_match_config():
    from raymix.config import METHOD_NAMES

    assert set(METHODS) == set(METHOD_NAMES)


def test_cosine_momentum_reaches_one_at_the_end():
    method = make("method.momentum=0.5")
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    method.after_step(10, 10)  # m_T = 1: the key encoder does not move
    key = dict(method.key_backbone.named_parameters())
    for name, p in method.backbone.named_parameters():
        assert not torch.allclose(key[name], p)
    method.after_step(0, 10)  # m_0 = 0.5
    for name, p in method.backbone.named_parameters():
        torch.testing.assert_close(key[name], 0.5 * (p - 1.0) + 0.5 * p)


def test_loss_is_symmetric_sum_and_keys_get_no_gradient():
    method = make()
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    loss, logs = method(x1, x2)
    loss.backward()
    assert torch.isfinite(loss) and logs["loss/contrast"] == loss.detach()
    assert all(p.grad is None for p in method.key_backbone.parameters())
    assert method.backbone.patch_embed.proj.weight.grad is not None
    # Untrained networks sit near chance: 2 tau log(B) per direction, two directions.
    assert loss.item() == pytest.approx(2 * 2 * 0.2 * math.log(6), rel=0.2)


def test_no_momentum_uses_online_projector():
    method = make("method.momentum=null")
    assert method.key_backbone is None and method.eval_backbone() is method.backbone
    method.eval()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(method.keys(x), method.online(x)[0])
    method.after_step(1, 10)  # nothing to update, no error


def test_momentum_encoder_is_evaluated_and_follows_the_ema():
    method = make("method.momentum=0.5", "method.momentum_schedule=constant")
    assert method.eval_backbone() is method.key_backbone
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.key_backbone.parameters()]
    method.after_step(1, 10)
    for p_key, p_old, p_online in zip(
        method.key_backbone.parameters(), before, method.backbone.parameters(), strict=True
    ):
        torch.testing.assert_close(p_key, 0.5 * p_old + 0.5 * p_online)


def test_queue_is_fifo_and_wraps():
    method = make("method.queue_size=10")
    method.train()
    first, second = torch.eye(16)[:6], torch.eye(16)[6:12]
    method.enqueue(first)
    assert method.queue_ptr.item() == 6
    torch.testing.assert_close(method.queue[:6], first)
    method.enqueue(second)  # rows 6..9, then wraps to 0..1
    assert method.queue_ptr.item() == 2
    torch.testing.assert_close(method.queue[6:10], second[:4])
    torch.testing.assert_close(method.queue[:2], second[4:])
    torch.testing.assert_close(method.queue[2:6], first[2:6])


def test_queue_not_touched_in_eval_mode_and_forward_enqueues_both_views():
    method = make("method.queue_size=32")
    method.eval()
    method.enqueue(torch.eye(16)[:4])
    assert method.queue_ptr.item() == 0
    method.train()
    method(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert method.queue_ptr.item() == 8


def test_queue_adds_negatives_to_the_loss():
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    plain = make()(x1, x2)[0]
    queued = make("method.queue_size=64")(x1, x2)[0]
    assert queued > plain  # more negatives in the denominator


@pytest.mark.parametrize("momentum", ["0.99", "null"])
def test_resnet_keys_use_shuffled_batchnorm_groups_on_one_worker(momentum):
    """Each key is normalised with the statistics of its own group of the shuffled batch."""
    method = make("backbone.name=resnet18", "backbone.key_bn_groups=2", f"method.momentum={momentum}")
    encode = method._encode_keys
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(5)
    order = torch.randperm(8)
    expected = torch.empty(8, 16)
    for group in order.tensor_split(2):
        expected[group] = encode(x[group])
    torch.manual_seed(5)
    torch.testing.assert_close(method.keys(x), expected)
    # Not what the whole batch would give: its statistics mix both groups.
    assert not torch.allclose(method.keys(x), encode(x), atol=1e-3)
    # Changing an image of the other group leaves a key alone.
    torch.manual_seed(5)
    before = method.keys(x)
    changed = x.clone()
    changed[order[4]] += 5.0  # in the second group
    torch.manual_seed(5)
    after = method.keys(changed)
    torch.testing.assert_close(after[order[:4]], before[order[:4]])
    # Evaluation uses running statistics: no shuffle, no groups.
    method.eval()
    torch.testing.assert_close(method.keys(x), encode(x))


def test_vit_keys_and_grouping_off_see_the_whole_batch():
    assert make().key_bn_groups == 1  # a ViT's heads: the MoCo v3 recipe, no shuffle
    method = make("backbone.name=resnet18", "backbone.key_bn_groups=1")
    x = torch.randn(8, 3, 16, 16)
    torch.testing.assert_close(method.keys(x), method._encode_keys(x))


# ---------------------------------------------------------------- the MoCo v2 base


def v2_reference(method, x1, x2, symmetric):
    """The released MoCo v2 / Un-Mix CIFAR loss written from its definition: the query is
    the normalised projection, the positive its own key, the negatives the queue alone."""
    queue = method.queue.clone()
    tau = method.temperature

    def ce(q, k):
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
        n = torch.nn.functional.normalize(queue, dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ n.T], dim=1) / tau
        return torch.nn.functional.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))

    z1 = method.projector(method.backbone(x1))
    k1, k2 = method.keys(x1), method.keys(x2)
    if not symmetric:
        return ce(z1, k2)
    z2 = method.projector(method.backbone(x2))
    return ce(z1, k2) + ce(z2, k1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_v2_base_computes_the_released_loss(symmetric):
    method = make("method.base=v2", "method.queue_size=12", f"method.symmetric={str(symmetric).lower()}")
    assert method.predictor is None
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    expected = v2_reference(method, x1, x2, symmetric)
    loss, _ = method(x1, x2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Only the keys used as keys enter the queue: both views' when symmetric, view 2's otherwise.
    assert method.queue_ptr.item() == (12 if symmetric else 6) % 12
    loss.backward()
    assert method.projector[0].weight.grad is not None
    assert all(p.grad is None for p in method.key_backbone.parameters())


def test_v2_base_needs_a_queue_and_heads_without_batchnorm():
    from raymix.config import ConfigError

    with pytest.raises(ConfigError, match="method.base=v2.*method.queue_size"):
        load_config(None, [*TINY, "method.base=v2"])
    with pytest.raises(ConfigError, match="method.base"):
        load_config(None, [*TINY, "method.base=v1"])
    method = make("method.base=v2", "method.queue_size=8", "head.norm=none", "head.projector_layers=2")
    layers = list(method.projector)
    assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Linear"]
    assert all(m.bias is not None for m in layers if isinstance(m, torch.nn.Linear))
    # One layer: the single linear layer of the CIFAR MoCo code.
    single = make("method.base=v2", "method.queue_size=8", "head.norm=none", "head.projector_layers=1")
    assert [type(m).__name__ for m in single.projector] == ["Linear"]
    # v3 heads keep BatchNorm and a predictor.
    v3 = make()
    assert v3.predictor is not None and any(isinstance(m, torch.nn.BatchNorm1d) for m in v3.projector)


def test_asymmetric_v3_contrasts_view_1_with_view_2_only():
    method = make("method.symmetric=false", "method.momentum=null")
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    from raymix.losses import info_nce

    expected = info_nce(method.online(x1)[1], method.keys(x2), 0, method.temperature)
    loss, _ = method(x1, x2)
    torch.testing.assert_close(loss, expected)
