"""data.loader=ray: image-folder decoding as Ray Data tasks on a two-node local cluster."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from ray.cluster_utils import Cluster

from raymix.cli import uses_ray
from raymix.config import ConfigError, load_config
from raymix.data import BatchLoader
from raymix.data.folder import CropSpec, FolderData
from raymix.integrations import sweep
from raymix.integrations.ray_data import RayDataLoader, time_epoch, use_ray_data

CROPS = CropSpec((0.2, 1.0), (3 / 4, 4 / 3), 2, seed=7)


def write_folder(root: Path, count: int = 24) -> Path:
    """``count`` small JPEGs (40-70 px, random noise) in two classes."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        width, height = 40 + (i * 7) % 31, 70 - (i * 5) % 31
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node, one CPU each; this process joins as the driver."""
    saved = os.environ.pop("RAY_ADDRESS", None)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def test_batches_equal_the_torch_path_and_decoding_uses_both_nodes(two_nodes, tmp_path):
    folder = FolderData(write_folder(tmp_path / "train"), 32)
    for epoch in (0, 1):
        torch_path = BatchLoader(folder, 8, shuffle=True, drop_last=True, seed=3, crops=CROPS)
        ray_path = RayDataLoader(folder, 8, crops=CROPS, seed=3, rows_per_task=2, cpu_wait_s=0)
        torch_path.set_epoch(epoch)
        ray_path.set_epoch(epoch)
        assert len(ray_path) == len(torch_path) == 3
        expected, got = list(torch_path), list(ray_path)
        assert len(got) == 3
        for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
            assert images.shape == (8, 2, 3, 32, 32) and images.dtype == torch.uint8
            assert labels.dtype == torch.int64
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    # 12 decode tasks of 2 images each, spread over both nodes.
    assert ray_path.nodes == {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(ray_path.nodes) == 2 and sum(ray_path.images_per_node.values()) == 24

    # A shard of a two-worker run is the torch path's shard too; the benchmark helper measures.
    base = BatchLoader(folder, 4, shuffle=True, drop_last=True, seed=3, rank=1, world_size=2, crops=CROPS)
    sharded = RayDataLoader.replacing(base, rows_per_task=4, cpu_wait_s=0)
    assert sharded.rank == 1 and len(sharded) == 3
    timing = time_epoch(sharded, epoch=2)
    assert timing["images"] == 12 and timing["batches"] == 3 and sum(timing["nodes"].values()) == 12
    base.set_epoch(2)
    assert torch.equal(torch.cat([labels for _, labels in sharded]), torch.cat([lab for _, lab in base]))


def test_no_cpu_for_decode_tasks_or_no_folder_on_a_node_are_clear_errors(two_nodes, tmp_path):
    folder = FolderData(write_folder(tmp_path / "train", count=8), 32)
    loader = RayDataLoader(folder, 4, crops=CROPS, num_cpus=2, cpu_wait_s=0.5)  # no node has 2 CPUs
    with (
        pytest.warns(RuntimeWarning, match="waiting up to 0.5 s"),
        pytest.raises(ConfigError, match=r"each decode task needs 2 CPU.*at most 1 on one node"),
    ):
        next(iter(loader))
    # Training workers holding every CPU leave none for decoding either.
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="SPREAD")
    ray.get(group.ready(), timeout=30)
    try:
        with pytest.raises(ConfigError, match=r"needs 1 CPU.*\(0 CPU in all"):
            next(iter(RayDataLoader(folder, 4, crops=CROPS, cpu_wait_s=0)))
    finally:
        remove_placement_group(group)
    # A node that does not see the folder (not on a shared file system) says so.
    loader = RayDataLoader(folder, 4, crops=CROPS, cpu_wait_s=10)  # the group's CPUs come back
    (tmp_path / "train").rename(tmp_path / "moved")
    with pytest.raises(Exception, match=r"data\.root: .* is not a folder on node .*shared file system"):
        next(iter(loader))


def test_trainer_trains_an_epoch_on_ray_data_batches(two_nodes, tmp_path):
    from raymix.engine.trainer import Trainer

    write_folder(tmp_path / "data" / "train", count=16)
    write_folder(tmp_path / "data" / "val", count=4)
    cfg = load_config(
        None,
        [
            "data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.image_size=32",
            "data.loader=ray", "backbone.patch_size=8", "backbone.depth=1", "head.hidden_dim=32",
            "head.out_dim=16", "training.batch_size=8", "training.epochs=1", "training.progress=false",
            f"training.output_dir={tmp_path / 'run'}",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg)
    use_ray_data(trainer)  # as the Ray Train worker does
    assert isinstance(trainer.train_loader, RayDataLoader) and len(trainer.train_loader) == 2
    logs = trainer.train_epoch()
    assert trainer.step == 2 and np.isfinite(float(logs["loss"]))
    assert trainer.train_loader.nodes  # decoded by Ray Data tasks


def test_ray_loader_settings_are_checked_and_train_through_ray(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    folder = ["data.name=imagefolder", f"data.root={tmp_path}"]
    for overrides, allowed in [
        (["data.loader=ray"], "data.name=imagefolder"),  # digits
        ([*folder, "data.loader=ray", "scaling.backend=local"], "scaling.backend=auto or ray"),
        ([*folder, "data.loader=ray", "data.decode=device"], "data.decode=cpu"),
    ]:
        with pytest.raises(ConfigError, match=rf"data\.loader=ray.*allowed.*{allowed}"):
            load_config(None, overrides)
    cfg = load_config(None, [*folder, "data.loader=ray"])
    assert uses_ray(cfg) and not sweep.in_process(cfg)
    plain = load_config(None, folder)
    assert not uses_ray(plain) and sweep.in_process(plain)
    # Outside a config: only an image folder's training views can go through Ray Data.
    with pytest.raises(ConfigError, match="data.name=imagefolder"):
        RayDataLoader(object(), 4, crops=CROPS)  # type: ignore[arg-type]
