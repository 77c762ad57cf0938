"""Ray Train on a private local Ray (2 CPUs): two gloo workers, checkpoints, resume, recovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raymix.cli import main
from raymix.config import ConfigError, load_config
from raymix.integrations import ray_train

TINY = [
    "data.image_size=16",
    "backbone.patch_size=8",
    "backbone.depth=1",
    "head.hidden_dim=32",
    "head.out_dim=16",
    "training.batch_size=64",
    "training.progress=false",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
]


def tiny(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY, f"training.output_dir={tmp_path / 'run'}", *overrides])


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint_epoch_*"))


def test_two_workers_train_keep_best_and_resume(local_ray, tmp_path, capsys):
    cfg = tiny(tmp_path, "training.epochs=3", "training.keep_checkpoints=1")
    result = ray_train.run(cfg, log=lambda _: None)
    assert result["epoch"] == 3 and 0.0 <= result["knn_top1"] <= 1.0
    run_dir = tmp_path / "run"
    kept = checkpoints(run_dir)
    assert "checkpoint_epoch_0003" in kept and 1 <= len(kept) <= 2  # the best one and the latest
    best = torch.load(result["best_checkpoint"], weights_only=False)
    assert best["run"]["best_knn_top1"] == pytest.approx(
        max(best["run"]["best_knn_top1"], result["knn_top1"])
    )
    assert Path(result["best_checkpoint"]).parent.name in kept
    # raymix eval takes a Ray checkpoint folder and reproduces its kNN score.
    capsys.readouterr()
    assert main(["eval", str(run_dir / "checkpoint_epoch_0003")]) == 0
    out = capsys.readouterr().out  # Ray may still forward worker lines: pick the JSON out
    start = out.index('{\n  "epoch"')
    metrics = json.loads(out[start : out.index("\n}", start) + 2])
    assert metrics["knn_top1"] == pytest.approx(result["knn_top1"])

    # The same run again: restored from its latest checkpoint, nothing retrained.
    again = ray_train.run(cfg, log=lambda _: None)
    assert again["epoch"] == 3
    assert checkpoints(run_dir) == kept


def test_more_workers_than_the_cluster_has_fails_at_once(local_ray, tmp_path):
    cfg = tiny(tmp_path, "scaling.num_workers=4", "scaling.cpus_per_worker=1")
    with pytest.raises(ConfigError, match=r"scaling.num_workers=4 needs 4 CPU .* has 2"):
        ray_train.run(cfg, log=lambda _: None)
    with pytest.raises(ConfigError, match="needs 2 GPU"):
        ray_train.run(tiny(tmp_path, "scaling.use_gpu=true"), log=lambda _: None)


def test_unwritable_storage_fails_before_ray_starts(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for storage that cannot be written")

    monkeypatch.setattr(ray_train, "init_ray", refuse)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = tiny(tmp_path, f"scaling.storage_path={blocker}")
    with pytest.raises(ConfigError, match="^scaling.storage_path: cannot write"):
        ray_train.run(cfg, log=lambda _: None)
    monkeypatch.setenv("RAYMIX_STORAGE_PATH", str(blocker / "elsewhere"))  # named as its source
    with pytest.raises(ConfigError, match="^RAYMIX_STORAGE_PATH: cannot write to .*elsewhere"):
        ray_train.run(cfg, log=lambda _: None)
    monkeypatch.delenv("RAYMIX_STORAGE_PATH")
    with pytest.raises(ConfigError, match="^training.output_dir: cannot write"):
        ray_train.run(tiny(tmp_path, f"training.output_dir={blocker / 'run'}"), log=lambda _: None)


def test_run_location_and_absolute_data_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["training.run_name=r1"])
    assert ray_train.run_location(cfg) == (str(tmp_path / "runs"), "r1")
    shared = load_config(None, ["training.run_name=r1", "scaling.storage_path=s3://bucket/raymix"])
    assert ray_train.run_location(shared) == ("s3://bucket/raymix", "r1")
    rooted = load_config(None, ["data.name=cifar10", "data.root=data/c10"])
    assert ray_train.absolute_paths(rooted).data.root == str(tmp_path / "data" / "c10")
