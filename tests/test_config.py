from pathlib import Path

import pytest

from raymix.config import Config, ConfigError, apply_overrides, config_from_dict, load_config, parse_override

EXPERIMENTS = sorted(Path(__file__).parents[1].joinpath("launch", "experiments").glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config()
    assert cfg.method.name == "moco"
    assert cfg.run_name == "moco-digits-vit_micro-s0"
    assert cfg.output_dir == Path("runs/moco-digits-vit_micro-s0")


# A recipe's file name names its dataset; ImageNet recipes read an image folder.
STEM_NAMES = {"imagefolder": ("imagefolder", "imagenet")}
IMAGENET = [p for p in EXPERIMENTS if "imagenet" in p.stem]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_example_config_loads(path):
    cfg = load_config(path)
    assert any(name in path.stem for name in STEM_NAMES.get(cfg.data.name, (cfg.data.name,)))


@pytest.mark.parametrize("path", IMAGENET, ids=lambda p: p.stem)
def test_imagenet_recipes_are_gpu_image_folder_runs(path):
    cfg = load_config(path)
    assert cfg.data.name == "imagefolder" and cfg.data.image_size == 224
    assert cfg.scaling.use_gpu and cfg.training.checkpoint_every == 10
    if cfg.backbone.name.startswith("resnet"):
        assert not cfg.backbone.cifar_stem
    else:
        assert cfg.backbone.patch_size == 16
    # ImageNet-1K's kNN bank is a bounded subset; ImageNet-100's training set fits whole.
    assert (cfg.eval.knn_train_subset is not None) == ("imagenet1k" in path.stem)


def test_example_for_every_dataset():
    from raymix.config import DATASETS

    assert {p.stem for p in EXPERIMENTS} >= set(DATASETS)


def test_overrides_parse_yaml_values():
    cfg = load_config(
        None, ["optim.lr=1e-3", "method.momentum=null", "eval.knn_k=[5, 10]", "training.progress=false"]
    )
    assert cfg.optim.lr == 1e-3
    assert cfg.method.momentum is None
    assert cfg.eval.knn_k == (5, 10)
    assert cfg.training.progress is False


def test_override_without_method_name_refines_default():
    assert load_config(None, ["method.temperature=0.3"]).method.temperature == 0.3


def test_overrides_do_not_mutate_input():
    raw = {"optim": {"lr": 1.0}}
    apply_overrides(raw, ["optim.lr=2.0"])
    assert raw == {"optim": {"lr": 1.0}}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.colour=1"], "unknown key 'data.colour'; allowed keys in data: decode, decode_cpus, download"),
        (["method.bogus=1"], "unknown key 'method.bogus'; allowed keys in method: base, momentum"),
        (["nonsense=1"], "unknown key 'nonsense'; allowed keys: augment"),
        (["method.name=simclr"], "method.name: unknown method 'simclr'; allowed: moco"),
        (["data.name=mnist"], "data.name: Input should be 'digits', 'synthetic'"),
        (["backbone.name=vit_huge"], "backbone.name: Input should be 'vit_micro'"),
        (["method.temperature=-1"], "method.temperature: Input should be greater than 0"),
        (["training.batch_size=many"], "training.batch_size: Input should be a valid integer"),
        (["backbone.patch_size=5"], "backbone.patch_size=5 does not divide data.image_size=32"),
        (["data.name=cifar10"], "data.root is required for data.name='cifar10'"),
        (["scaling.num_workers=3"], "training.batch_size=256 is not divisible by scaling.num_workers=3"),
        (["augment.crop_scale=[0.9, 0.1]"], "augment.crop_scale must be (low, high)"),
        (["augment.flip_prob=1.5"], "augment.flip_prob: Input should be less than or equal to 1"),
    ],
)
def test_bad_values_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_resnet_ignores_patch_size():
    assert load_config(None, ["backbone.name=resnet18", "backbone.patch_size=5"]).backbone.patch_size == 5


@pytest.mark.parametrize("text", ["novalue", "=3", "a..b=1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override(text)


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="'lr' is a value"):
        apply_overrides({"optim": {"lr": 1}}, ["optim.lr.x=2"])


def test_malformed_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  name: [digits\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_config_is_frozen():
    from pydantic import ValidationError

    cfg = Config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.training.epochs = 3  # type: ignore[misc]


def test_round_trip_through_dict():
    cfg = load_config(None, ["method.queue_size=128", "optim.betas=[0.9, 0.95]"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_switching_method_drops_the_old_methods_keys_and_keeps_shared_ones():
    digits = Path(__file__).parents[1] / "launch" / "experiments" / "digits.yaml"
    cfg = load_config(digits, ["method.name=selfcon"])  # digits.yaml's moco has momentum: null
    assert cfg.method.name == "selfcon" and cfg.method.temperature == 0.2  # kept from the file
    cfg = load_config(digits, ["method.name=patchmix", "method.mix_num=3"])
    assert cfg.method.momentum is None and cfg.method.mix_num == 3
    # Without a switch an unknown key still fails, naming it.
    with pytest.raises(ConfigError, match="unknown key 'method.mix_num'"):
        load_config(digits, ["method.mix_num=3"])
