"""SelfCon's loss, multi-exit encoder, config and evaluation against METHODS.md section 4."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raymix.config import ConfigError, load_config
from raymix.engine.checkpoint import load_checkpoint
from raymix.engine.trainer import Trainer
from raymix.losses import supcon_loss
from raymix.methods import build_method

TINY = [
    "method.name=selfcon",
    "data.image_size=16",
    "backbone.patch_size=4",
    "backbone.depth=4",
    "backbone.embed_dim=32",
    "backbone.num_heads=2",
    "head.out_dim=16",
]


# ---------------------------------------------------------------- supcon_loss


def reference_supcon(features, labels, tau, base_tau=0.07, anchor_images=None):
    """The formula of METHODS.md section 4, anchor by anchor."""
    batch, views, _ = features.shape
    z = F.normalize(features, dim=-1)
    rows = [(i, v) for v in range(views) for i in range(batch)]
    same = (lambda a, b: labels[a] == labels[b]) if labels is not None else (lambda a, b: a == b)
    terms = []
    for a, (i, v) in enumerate(rows):
        if anchor_images is not None and i not in anchor_images:
            continue
        others = [n for n in range(len(rows)) if n != a]
        denominator = torch.logsumexp(torch.stack([z[i, v] @ z[rows[n]] / tau for n in others]), 0)
        positives = [n for n in others if same(i, rows[n][0])]
        if not positives:
            continue
        logs = [z[i, v] @ z[rows[p]] / tau - denominator for p in positives]
        terms.append(-sum(logs) / len(positives))
    return (tau / base_tau) * torch.stack(terms).mean()


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("views", [1, 2, 3])
def test_supcon_matches_the_slow_reference(with_labels, views):
    g = torch.Generator().manual_seed(views)
    features = torch.randn(6, views, 5, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0]) if with_labels else None
    if views == 1 and not with_labels:  # no anchor has a positive: zero, not NaN
        loss = supcon_loss(features, None, 0.1)
        assert loss.item() == 0.0
        return
    expected = reference_supcon(features, labels, 0.2)
    torch.testing.assert_close(supcon_loss(features, labels, 0.2), expected)
    # A worker's own anchors (images 2..3) against every row: its share of the mean.
    part = supcon_loss(features, labels, 0.2, anchors=slice(2, 4))
    torch.testing.assert_close(part, reference_supcon(features, labels, 0.2, anchor_images={2, 3}))


def test_supcon_exact_value_and_no_nan_for_anchors_without_positives():
    # Equal embeddings: every log-probability is -log(V * B - 1).
    features = torch.ones(4, 2, 3)
    assert supcon_loss(features, None, 0.1).item() == pytest.approx((0.1 / 0.07) * math.log(7))
    # Label 3 appears once with one view: that anchor has no positive and is left out.
    features = torch.randn(4, 1, 3, requires_grad=True)
    loss = supcon_loss(features, torch.tensor([0, 0, 1, 3]), 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
    # Scale of the features does not matter (they are normalised).
    torch.testing.assert_close(
        supcon_loss(5 * features.detach(), torch.tensor([0, 0, 1, 3])),
        supcon_loss(features.detach(), torch.tensor([0, 0, 1, 3])),
    )


# ---------------------------------------------------------------- the multi-exit encoder


@pytest.mark.parametrize("size", ["fc", "small", "same"])
@pytest.mark.parametrize(
    "backbone, exits",
    [
        (["backbone.name=resnet18"], [True, True, True]),
        ([], [True, True, True]),  # a 4-block ViT: after blocks 1, 2, 3
    ],
)
def test_exit_features_have_the_backbone_width_at_every_position(size, backbone, exits):
    torch.manual_seed(0)
    flags = "[" + ",".join(str(e).lower() for e in exits) + "]"
    method = build_method(
        load_config(None, [*TINY, *backbone, f"method.exits={flags}", f"method.exit_size={size}"])
    )
    x = torch.randn(3, 3, 16, 16)
    outputs = method.multi(x)
    width = method.backbone.num_features
    assert len(outputs) == 4 and all(o.shape == (3, width) for o in outputs)
    torch.testing.assert_close(outputs[0], method.backbone(x))  # the trunk pass is the backbone's
    encoders = method.probe_encoders()
    assert list(encoders) == ["backbone", "exit1", "exit2", "exit3"]
    for index, name in enumerate(["exit1", "exit2", "exit3"]):
        torch.testing.assert_close(encoders[name](x), outputs[index + 1])


def test_sub_network_sizes():
    def count(size):
        torch.manual_seed(0)
        cfg = load_config(None, [*TINY, "backbone.name=resnet18", "method.exits=[true,false,false]",
                                 f"method.exit_size={size}"])  # fmt: skip
        method = build_method(cfg)
        return sum(p.numel() for p in method.multi.subnets.parameters()), method

    fc, method = count("fc")
    assert fc == 64 * 512 + 512  # pooled layer1 (64 channels) -> Linear to the final 512
    small, method = count("small")
    assert [len(stage) for stage in method.multi.subnets[0].layers] == [1, 1, 1]  # half of 2 blocks
    same, method = count("same")
    assert [len(stage) for stage in method.multi.subnets[0].layers] == [2, 2, 2]  # layer2..layer4
    layers = method.backbone
    assert same == sum(
        p.numel() for m in (layers.layer2, layers.layer3, layers.layer4) for p in m.parameters()
    )
    assert fc < small < same
    # Unshared: the copy's weights are separate tensors from the backbone's.
    assert method.multi.subnets[0].layers[0][0].conv1.weight is not layers.layer2[0].conv1.weight


def test_default_exit_is_the_middle_point_and_no_stop_gradient():
    torch.manual_seed(0)
    method = build_method(load_config(None, [*TINY, "backbone.name=resnet18"]))
    assert method.multi.points == [1]  # after layer2, the 2nd of 3 points
    vit = build_method(load_config(None, TINY))
    assert vit.multi.points == [1]  # depth 4: after block 2
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    method.zero_grad()
    # The exit's loss alone reaches the shared trunk (stem to layer2) but not layer3/4.
    outputs = method.multi(x)
    method.heads[1](outputs[1]).sum().backward()
    assert method.backbone.conv1.weight.grad.abs().sum() > 0
    assert method.backbone.layer2[0].downsample[0].weight.grad.abs().sum() > 0
    assert method.backbone.layer3[0].conv1.weight.grad is None
    loss, logs = method(x, x, labels)
    assert torch.isfinite(loss) and logs["loss/supcon"] == loss.detach()


def test_forward_is_supcon_over_backbone_and_exit_embeddings():
    torch.manual_seed(0)
    for use_labels in (True, False):
        method = build_method(load_config(None, [*TINY, f"method.use_labels={str(use_labels).lower()}",
                                                 "method.temperature=0.2"]))  # fmt: skip
        assert method.uses_labels == use_labels
        x, labels = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 0, 1, 2])
        loss, _ = method(x, torch.randn_like(x), labels)  # the second view is not used
        outputs = method.multi(x)
        features = torch.stack([h(z) for h, z in zip(method.heads, outputs, strict=True)], dim=1)
        expected = reference_supcon(features, labels if use_labels else None, 0.2)
        torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("exits", ["[false,false,false]", "[false,true,false]"])
def test_two_views_stack_both_views_outputs_supcon_without_exits(exits):
    """method.views=2: rows are view 1's outputs, then view 2's; with no exit this is SupCon
    over the backbone's two views (Khosla et al. 2020), the base SelfCon is compared with."""
    torch.manual_seed(0)
    method = build_method(load_config(None, [*TINY, "method.views=2", f"method.exits={exits}"]))
    assert method.num_views == 2 and len(method.heads) == 1 + exits.count("true")
    x1, x2, labels = torch.randn(5, 3, 16, 16), torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 0, 1, 2])
    loss, _ = method(x1, x2, labels)
    rows = [h(z) for x in (x1, x2) for h, z in zip(method.heads, method.multi(x), strict=True)]
    expected = reference_supcon(torch.stack(rows, dim=1), labels, method.temperature)
    torch.testing.assert_close(loss, expected)
    # The trainer augments two views for it.
    cfg = load_config(None, [*TINY, "method.views=2", f"method.exits={exits}", "data.name=synthetic",
                             "training.batch_size=16"])  # fmt: skip
    assert Trainer(cfg).method.num_views == 2


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.exits=[false,false,false]"], "method.exits selects no exit and method.views=1"),
        (["method.views=3"], "method.views"),
        (["method.exits=[true,false]"],
         "method.exits has 2 flags; backbone.name=vit_micro with depth 4 has 3"),
        (["backbone.name=resnet18", "method.exits=[true,false,true,true]"],
         "method.exits has 4 flags; backbone.name=resnet18 has 3"),
        (["backbone.depth=1"], "backbone.depth=1 leaves no attachment point"),
        (["method.exit_size=large"], "method.exit_size"),
        (["method.temperature=0"], "method.temperature"),
    ],
)  # fmt: skip
def test_bad_options_name_the_option(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [*TINY, *overrides])


def test_use_labels_needs_a_labelled_dataset():
    cfg = load_config(
        None, [*TINY, "data.name=synthetic", "data.synthetic_classes=2", "training.batch_size=32"]
    )
    Trainer(cfg)  # two classes: fine
    method = build_method(cfg)
    with pytest.raises(ConfigError, match="method.use_labels=true needs a labelled dataset"):
        method.check_data(100, 1)
    build_method(load_config(None, [*TINY, "method.use_labels=false"])).check_data(100, 1)


# ---------------------------------------------------------------- training and evaluation


def test_short_digits_run_beats_initialisation_and_probes_every_exit(digits_run):
    cfg, result, _ = digits_run("method.name=selfcon", "training.epochs=3", "eval.linear_epochs=5")
    assert result["knn_top1"] > result["knn_top1_init"] + 0.05, result
    trainer = Trainer(cfg)
    trainer.load_state_dict(load_checkpoint(cfg.output_dir / "checkpoints" / "last.pt"))  # the trained one
    metrics = trainer.evaluate(linear=True)
    for name in ("linear_top1", "linear_exit2_top1", "linear_ensemble_top1"):
        assert 0.0 <= metrics[f"{name}_last"] <= metrics[f"{name}_best"] <= 1.0, name


def test_shuffle_bn_groups_do_not_constrain_a_method_without_keys():
    load_config(None, [*TINY, "backbone.name=resnet18", "training.batch_size=4"])  # no key encoder
    with pytest.raises(ConfigError, match="backbone.key_bn_groups=4"):
        load_config(None, ["backbone.name=resnet18", "training.batch_size=4"])  # MoCo's keys
