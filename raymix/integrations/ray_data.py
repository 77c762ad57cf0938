"""Image-folder decoding as Ray Data tasks on any CPU node of the cluster (``data.loader: ray``).

:class:`RayDataLoader` is a :class:`~raymix.data.loader.BatchLoader` whose training batches are
decoded by Ray Data: each epoch it streams this rank's image indices, in the torch path's order,
through ``map_batches`` tasks that call :meth:`FolderData.train_item` (read the file, decode,
cut the RandomResizedCrops) on whichever node has a free CPU, CPU-only nodes included, and
collects the decoded rows into batches of the per-worker batch size on the training device.

Why one small pipeline per rank and per epoch, rather than one dataset split across the Train
workers with ``streaming_split``: ``streaming_split`` hands rows to whichever rank asks first, so
which images a rank trains on, and in which batches, changes from run to run. Here every rank
builds its own pipeline over exactly the indices :meth:`BatchLoader.indices` gives it for the
epoch (the seeded permutation and shard of the torch path), with ``preserve_order`` on, and a
view's crop depends only on ``(seed, epoch, index)``. So the batches are the torch path's batches,
bit for bit: runs are reproducible, a resumed run sees exactly the batches it would have seen,
and ``data.loader`` can be switched between torch and ray without changing the result. Each
batch's indices are checked against the expected ones as it arrives.

Before each epoch the loader checks that some node has ``num_cpus`` CPUs outside placement groups
(where Train workers and Tune trials hold theirs): without one, no decode task could ever start, and
it waits ``cpu_wait_s`` for one to join, then raises instead of waiting forever. Every node reads
the files at the same ``data.root`` (a shared file system); one that cannot says so.

Where decoding ran is recorded: :attr:`RayDataLoader.nodes` (node ids) and
:attr:`RayDataLoader.images_per_node`. The folder is put in the object store once per loader and
unpickled once per Ray worker process (:func:`_folder`), not once per task.

Outside Ray Train (a benchmark, a notebook), with Ray initialised::

    loader = RayDataLoader(FolderData(root, 224), 256, crops=CropSpec((0.2, 1.0), (3 / 4, 4 / 3), 2, 0))
    print(time_epoch(loader))  # seconds, images, images_per_s, batches, nodes
"""

from __future__ import annotations

import functools
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.data
import torch
from ray.util.placement_group import placement_group_table

from raymix.config import ConfigError
from raymix.data.folder import CropSpec, FolderData
from raymix.data.loader import Batch, BatchLoader

if TYPE_CHECKING:
    from raymix.engine.trainer import Trainer

# Decoded folders by object-store id, per Ray worker process: tasks of later epochs reuse them.
_FOLDERS: dict[str, FolderData] = {}
_KEEP_FOLDERS = 4


def _folder(ref: ray.ObjectRef[FolderData]) -> FolderData:
    """The folder of ``ref``, fetched once per Ray worker process; its root must be visible here."""
    key = ref.hex()
    if key not in _FOLDERS:
        folder: FolderData = ray.get(ref)
        if not folder.root.is_dir():  # else every file would be "bad", and replaced in turn
            node = ray.get_runtime_context().get_node_id()
            raise FileNotFoundError(
                f"data.root: {str(folder.root)!r} is not a folder on node {node}; data.loader=ray "
                "decodes on every node of the cluster, so the image folder must be on all of them "
                "(a shared file system) at the same path"
            )
        while len(_FOLDERS) >= _KEEP_FOLDERS:
            _FOLDERS.pop(next(iter(_FOLDERS)))
        _FOLDERS[key] = folder
    return _FOLDERS[key]


def decode_rows(
    batch: dict[str, np.ndarray], folder_ref: ray.ObjectRef[FolderData], epoch: int, crops: CropSpec
) -> dict[str, np.ndarray]:
    """The Ray Data UDF: rows ``{"item": index}`` -> their training views, labels and node id.

    A file that cannot be decoded is replaced by the next image (as in the torch path), so the
    label comes from the decode, not from the index.
    """
    folder = _folder(folder_ref)
    indices = batch["item"]
    items = [folder.train_item(int(index), epoch, crops) for index in indices]
    node = ray.get_runtime_context().get_node_id()
    return {
        "index": np.asarray(indices, dtype=np.int64),
        "image": np.stack([views.numpy() for views, _ in items]),  # (n, views, 3, S, S) uint8
        "label": np.array([label for _, label in items], dtype=np.int64),
        "node": np.array([node] * len(items)),
    }


def decode_capacity() -> tuple[float, float]:
    """(CPUs of the node with the most CPUs outside placement groups, that total over alive nodes).

    Ray Train workers and Tune trials hold their CPUs in placement groups; a Ray Data task can only
    ever run on CPUs outside them, so a task needing more than the first number never starts.
    """
    free: dict[str, float] = {
        node["NodeID"]: float(node["Resources"].get("CPU", 0.0)) for node in ray.nodes() if node["Alive"]
    }
    for group in placement_group_table().values():
        if group.get("state") != "CREATED":
            continue
        for key, bundle in group.get("bundles", {}).items():
            node = group.get("bundles_to_node_id", {}).get(key)
            if node in free:
                free[node] -= float(bundle.get("CPU", 0.0))
    return max(free.values(), default=0.0), sum(free.values())


class RayDataLoader(BatchLoader):
    """A :class:`BatchLoader` over a :class:`FolderData` whose training views are decoded by Ray
    Data tasks anywhere on the cluster; the batches are those of the torch path.

    ``num_cpus``: CPUs each decode task reserves; ``rows_per_task``: images per task (default: the
    per-worker batch); ``cpu_wait_s``: how long to wait for the cluster to offer a node with
    ``num_cpus`` CPUs outside placement groups (an autoscaler adding one) before giving up with a
    clear error instead of waiting forever. Ray must be initialised (a Train worker is).
    """

    def __init__(
        self,
        data: FolderData,
        batch_size: int,
        *,
        crops: CropSpec,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        prefetch: int = 2,
        num_cpus: float = 1.0,
        rows_per_task: int | None = None,
        cpu_wait_s: float = 60.0,
    ) -> None:
        if not isinstance(data, FolderData) or crops is None:
            raise ConfigError(
                "data.loader=ray decodes the training views of image folders; "
                "allowed with data.name=imagefolder only (other datasets: data.loader=torch)"
            )
        if num_cpus <= 0:
            raise ValueError(f"decode tasks need a positive number of CPUs, got num_cpus={num_cpus}")
        super().__init__(
            data, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, rank=rank,
            world_size=world_size, device=device, prefetch=prefetch, crops=crops,
        )  # fmt: skip
        self.folder = data
        self.train_crops = crops
        self.num_cpus = num_cpus
        self.rows_per_task = max(1, rows_per_task or batch_size)
        self.cpu_wait_s = cpu_wait_s
        self.nodes: set[str] = set()  # ids of the nodes that decoded images, over all epochs
        self.images_per_node: Counter[str] = Counter()
        self._folder_ref: ray.ObjectRef[FolderData] | None = None

    @classmethod
    def replacing(cls, loader: BatchLoader, **options: Any) -> RayDataLoader:
        """The Ray Data loader with ``loader``'s data, batches, shard, seed, device and prefetch."""
        if loader.decode != "cpu":
            raise ConfigError(
                f"data.loader=ray decodes on the CPUs of the cluster; data.decode={loader.decode} "
                "needs data.loader=torch"
            )
        if not isinstance(loader.data, FolderData) or loader.crops is None:
            raise ConfigError(
                "data.loader=ray decodes the training views of image folders; "
                "allowed with data.name=imagefolder only (other datasets: data.loader=torch)"
            )
        new = cls(
            loader.data, loader.batch_size, crops=loader.crops, shuffle=loader.shuffle,
            drop_last=loader.drop_last, seed=loader.seed, rank=loader.rank,
            world_size=loader.world_size, device=loader.device, prefetch=loader.prefetch, **options,
        )  # fmt: skip
        new.set_epoch(loader.epoch)
        return new

    # ---------------------------------------------------------------- the pipeline

    def check_cluster(self) -> None:
        """Raise if no node can run a decode task, after waiting ``cpu_wait_s`` for one to join."""
        deadline = time.monotonic() + self.cpu_wait_s
        most, total = decode_capacity()
        if most >= self.num_cpus:
            return
        if self.cpu_wait_s > 0:
            warnings.warn(
                f"data.loader=ray: no node has {self.num_cpus:g} CPU free for decode tasks; "
                f"waiting up to {self.cpu_wait_s:g} s for one",
                RuntimeWarning,
                stacklevel=2,
            )
        while time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            most, total = decode_capacity()
            if most >= self.num_cpus:
                return
        raise ConfigError(
            f"data.loader=ray: each decode task needs {self.num_cpus:g} CPU, but no node of the Ray "
            f"cluster has that many outside the training workers' reservations ({total:g} CPU in "
            f"all, at most {most:g} on one node, after waiting {self.cpu_wait_s:g} s); add a CPU "
            "node, or lower scaling.num_workers or scaling.cpus_per_worker"
        )

    def dataset(self, indices: torch.Tensor) -> ray.data.Dataset:
        """The Ray Data pipeline decoding ``indices`` in order (one epoch of this rank)."""
        if self._folder_ref is None:
            self._folder_ref = ray.put(self.folder)
        items = indices.tolist()
        blocks = max(1, -(-len(items) // self.rows_per_task))
        ds = ray.data.from_items(items, override_num_blocks=blocks)  # built here, no tasks
        context = ds.context  # a copy of the process's DataContext, owned by this dataset
        context.execution_options.preserve_order = True  # batches in the torch path's order
        context.enable_progress_bars = False  # one line per epoch in the worker's log, not four
        context.print_on_execution_start = False
        # Ray Data spreads tasks with small arguments (here: indices) over all nodes; they run
        # outside the Train worker's placement group, on any node with a free CPU.
        return ds.map_batches(
            functools.partial(
                decode_rows, folder_ref=self._folder_ref, epoch=self.epoch, crops=self.train_crops
            ),
            batch_size=self.rows_per_task,
            batch_format="numpy",
            num_cpus=self.num_cpus,
        )

    def __iter__(self) -> Iterator[Batch]:
        """Yield (uint8 (b, views, 3, S, S), int64 labels (b,)) on ``device``: the torch path's batches."""
        expected = self._batches()
        if not expected:
            return
        self.check_cluster()
        ds = self.dataset(torch.cat(expected))
        rows = ds.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",
            drop_last=self.drop_last,
            prefetch_batches=self.prefetch,
        )
        count = 0
        for count, batch in enumerate(rows, 1):
            want = expected[count - 1] if count <= len(expected) else None
            if want is None or not np.array_equal(batch["index"], want.numpy()):
                raise RuntimeError(
                    f"data.loader=ray: batch {count} of epoch {self.epoch} on rank {self.rank} holds "
                    "other images than the torch path's (Ray Data did not keep the order)"
                )
            nodes, counts = np.unique(batch["node"], return_counts=True)
            for node, n in zip(nodes.tolist(), counts.tolist(), strict=True):
                self.nodes.add(node)
                self.images_per_node[node] += n
            pinned = self.device.type == "cuda"
            yield self._to_device(_tensor(batch["image"], pinned), _tensor(batch["label"], pinned))
        if count != len(expected):
            raise RuntimeError(
                f"data.loader=ray: epoch {self.epoch} on rank {self.rank} gave {count} batches, "
                f"expected {len(expected)}"
            )


def use_ray_data(trainer: Trainer, **options: Any) -> None:
    """With ``data.loader: ray``, make ``trainer`` read its training batches through Ray Data
    (before its first epoch; a Ray Train worker does this). Other settings: nothing changes."""
    if trainer.cfg.data.loader == "ray":
        options.setdefault("num_cpus", trainer.cfg.data.decode_cpus)
        trainer.train_loader = RayDataLoader.replacing(trainer.train_loader, **options)


def _tensor(array: np.ndarray, pinned_next: bool) -> torch.Tensor:
    """A tensor of a batch column. Ray Data hands out read-only memory when a batch is one block:
    it is copied, unless the next step (pinning for a CUDA device) copies it anyway."""
    if not array.flags.c_contiguous or not (array.flags.writeable or pinned_next):
        array = np.array(array, copy=True, order="C")
    with warnings.catch_warnings():  # read-only memory that is only read, then copied
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def time_epoch(loader: RayDataLoader, epoch: int = 0) -> dict[str, Any]:
    """Decode one epoch of ``loader`` and measure it (for benchmarks): seconds, images,
    images_per_s, batches and the images each node decoded."""
    loader.set_epoch(epoch)
    before = Counter(loader.images_per_node)
    start = time.perf_counter()
    batches = images = 0
    for views, _ in loader:
        batches += 1
        images += len(views)
    seconds = time.perf_counter() - start
    per_node = dict(loader.images_per_node - before)
    return {
        "seconds": seconds,
        "images": images,
        "images_per_s": images / seconds if seconds > 0 else float("inf"),
        "batches": batches,
        "nodes": per_node,
    }
