"""The engine end to end on tiny CPU configs: exact resume, schedules, outputs, learning."""

import json

import pytest
import torch

from raymix.config import ConfigError, load_config
from raymix.engine.checkpoint import load_checkpoint, save_checkpoint
from raymix.engine.run import config_changes, fit
from raymix.engine.trainer import Trainer

TINY = [
    "data.name=synthetic",
    "data.image_size=16",
    "data.synthetic_train_size=96",
    "data.synthetic_test_size=32",
    "backbone.patch_size=8",
    "backbone.depth=1",
    "backbone.drop_path=0.2",
    "head.hidden_dim=32",
    "head.out_dim=16",
    "training.batch_size=32",
    "training.epochs=3",
    "training.progress=false",
    "optim.warmup_epochs=1",
    "optim.weight_decay_end=0.2",
]


def tiny(*overrides: str):
    return load_config(None, [*TINY, *overrides])


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Tensors of the method's state; extra state (PatchMix's step counter) as a tensor too."""
    state = trainer.method.state_dict()
    return {k: v.clone() if torch.is_tensor(v) else torch.tensor(list(v.values())) for k, v in state.items()}


@pytest.mark.parametrize(
    "extra",
    [
        ["method.queue_size=48"],
        ["method.momentum=null", "optim.name=sgd"],
        ["method.name=patchmix", "method.mix_prob=0.5"],  # the mixing step counter resumes too
        ["method.name=unmix", "method.queue_size=48"],
        ["method.name=snclr", "method.bank_size=64", "method.num_neighbors=4"],  # the bank resumes
        ["method.name=selfcon", "backbone.depth=2", "method.exit_size=same"],
    ],
)
def test_resume_gives_the_identical_next_epoch(tmp_path, extra):
    cfg = tiny(*extra)
    first = Trainer(cfg)
    first.train_epoch()
    save_checkpoint(first.state_dict(), tmp_path / "ckpt.pt")
    first.train_epoch()
    expected = params(first)

    resumed = Trainer(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    assert (resumed.epoch, resumed.step) == (1, first.steps_per_epoch)
    resumed.train_epoch()
    got = params(resumed)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # And the run really moved: the state after two epochs differs from a fresh start.
    fresh = params(Trainer(cfg))
    assert not torch.equal(fresh["backbone.cls_token"], expected["backbone.cls_token"])


def test_schedules_follow_the_step():
    cfg = tiny("optim.lr=0.256", "optim.min_lr=0.001")
    trainer = Trainer(cfg)  # 96 images / 32 = 3 steps per epoch, 9 steps, 3 warm-up
    assert trainer.total_steps == 9
    lrs = [trainer.schedules.lr(s) for s in range(9)]
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(0.256 * 32 / 256)
    assert lrs[3] > lrs[5] > lrs[8] > 0.001
    trainer.train_epoch()
    group = next(g for g in trainer.optimizer.param_groups if g["decay"])
    assert group["weight_decay"] == pytest.approx(trainer.schedules.weight_decay(2))
    assert all(g["weight_decay"] == 0.0 for g in trainer.optimizer.param_groups if not g["decay"])


def test_no_decay_on_norms_biases_and_embeddings():
    trainer = Trainer(tiny())
    names = {id(p): n for n, p in trainer.method.named_parameters()}
    no_decay = next(g for g in trainer.optimizer.param_groups if not g["decay"])["params"]
    skipped = {names[id(p)] for p in no_decay}
    assert "backbone.cls_token" in skipped and "backbone.pos_embed" in skipped
    assert "backbone.norm.weight" in skipped and "backbone.blocks.0.attn.qkv.bias" in skipped
    assert not any("key_" in n for n in names.values() if n in skipped)  # frozen copies are not optimised


def test_non_finite_loss_stops_the_epoch():
    trainer = Trainer(tiny("optim.lr=1e30", "optim.warmup_epochs=0", "optim.lr_scaling=none"))
    with pytest.raises(FloatingPointError, match="not finite"):
        for _ in range(3):
            trainer.train_epoch()


def test_fit_writes_outputs_and_resumes(tmp_path):
    cfg = tiny(f"training.output_dir={tmp_path / 'run'}", "training.epochs=2")
    lines: list[str] = []
    result = fit(cfg, log=lines.append, progress=False)
    out = tmp_path / "run"
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert all(0.0 <= h["knn_top1"] <= 1.0 for h in history)
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "best.pt").exists()
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2
    assert result["knn_top1_init"] == history[0]["knn_top1"]

    # Same run, more epochs: continues from epoch 2 instead of starting over.
    longer = tiny(f"training.output_dir={tmp_path / 'run'}", "training.epochs=3")
    with pytest.raises(ConfigError, match="training.epochs"):
        fit(longer, log=lines.append, progress=False)
    lines.clear()
    fit(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"knn_k": (5,)})}), log=lines.append)
    lines = [line for line in lines if not line.startswith("MLflow ")]  # the tracking store's own line
    assert lines[0].startswith("resuming") and len(lines) == 1  # nothing left to train


def test_config_changes_ignores_resumable_keys():
    a = tiny().to_dict()
    b = tiny("eval.knn_k=[5]", "training.progress=true", "optim.lr_scaling=none").to_dict()
    assert config_changes(a, b) == ["optim.lr_scaling"]  # optim.lr may change (MUTABLE_KEYS)


def test_config_changes_allow_switching_compile_and_channels_last():
    a = tiny().to_dict()
    assert config_changes(a, tiny("training.compile=true", "training.channels_last=true").to_dict()) == []


def steps(trainer: Trainer, count: int) -> list[float]:
    """Losses of ``count`` steps on the first batch; the global RNG (drop-path, key BN shuffle) reseeded."""
    torch.manual_seed(0)
    images, labels = next(iter(trainer.train_loader))
    return [float(trainer.train_step(images, labels)["loss"]) for _ in range(count)]


RESNET = ["backbone.name=resnet18", "backbone.cifar_stem=true", "backbone.key_bn_groups=2"]


def test_channels_last_trains_the_same_in_nhwc():
    eager = Trainer(tiny(*RESNET))
    nhwc = Trainer(tiny(*RESNET, "training.channels_last=true"))
    conv = nhwc.method.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nhwc.layout(torch.zeros(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)
    assert steps(nhwc, 3) == pytest.approx(steps(eager, 3), rel=1e-4)
    features, _ = nhwc.features(nhwc.test_data)
    assert torch.allclose(features, eager.features(eager.test_data)[0], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moco", "selfcon"])
def test_compiled_encoders_train_like_eager_ones_and_keep_checkpoint_names(tmp_path, method):
    extra = ["method.name=selfcon", "backbone.depth=2"] if method == "selfcon" else []
    eager = Trainer(tiny(*extra))
    compiled = Trainer(tiny(*extra, "training.compile=true"))
    targets = compiled.method.compile_targets()
    assert targets and all(m._compiled_call_impl is not None for m in targets)
    assert steps(compiled, 2) == pytest.approx(steps(eager, 2), rel=1e-4)
    # Compiling in place keeps parameter names: checkpoints load either way.
    assert list(compiled.state_dict()["method"]) == list(eager.state_dict()["method"])
    eager.load_state_dict(compiled.state_dict())
    for a, b in zip(eager.method.parameters(), compiled.method.parameters(), strict=True):
        assert torch.equal(a, b)
    assert compiled.evaluate()["knn_top1"] == pytest.approx(eager.evaluate()["knn_top1"], abs=1 / 32)


def test_image_folder_run_resumes_exactly(tmp_path):
    """Folder crops come from (seed, epoch, index): a resumed run decodes the same views."""
    from PIL import Image

    for split, count in (("train", 24), ("val", 6)):
        for i in range(count):
            folder = tmp_path / "images" / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (30 + i, 40, 3), generator=torch.Generator().manual_seed(i))
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.jpg")
    cfg = tiny(
        "data.name=imagefolder", f"data.root={tmp_path / 'images'}", "training.batch_size=8",
        "eval.knn_train_subset=12", "data.loader_workers=1",
    )  # fmt: skip
    first = Trainer(cfg)
    assert first.train_loader.crops.views == first.method.num_views
    first.train_epoch()
    save_checkpoint(first.state_dict(), tmp_path / "ckpt.pt")
    first.train_epoch()
    resumed = Trainer(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    resumed.train_epoch()
    expected, got = params(first), params(resumed)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # Evaluation decodes a 12-image, class-stratified bank of the folder (4 per class).
    assert len(resumed.eval_train_data) == 12
    assert resumed.evaluate()["knn_top1"] >= 0.0
