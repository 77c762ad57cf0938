"""Images/s per CPU core of the image-folder training pipelines, and of Ray Data on one and two nodes.

A folder of JPEGs at ImageNet-like sizes is generated once (``--images`` seeded images with
structure: a smooth colour field, shapes and grain; sides 300-500 px; quality 90; ``--classes``
class folders) and cached under the temporary folder, keyed by those parameters. No download.
Every arm yields two 224 px views per image (or, for the previous path, one 224 px image the
views were cut from), uint8, in shuffled batches of ``--batch-size``:

- ``previous``: raymix before this change: torchvision ``ImageFolder`` with ``Resize(224,
  antialias)`` + ``CenterCrop(224)`` + ``PILToTensor`` (one decode and one resize per image),
  a new DataLoader each epoch; both views were then cut on the training device from that one
  centre square, so its figure is the loader's images/s.
- ``raymix_cpu``: ``FolderData`` + ``CropSpec((0.08, 1), (3/4, 4/3), views=2)`` through
  ``BatchLoader(crops=..., num_workers=W, prefetch=4)``: each view a RandomResizedCrop of the
  whole image, JPEGs decoded at reduced size where the crops allow (PIL draft mode).
- ``raymix_cpu_no_draft``: the same with ``FolderData(draft=False)``: what draft mode buys.
- ``reference``: what a user would otherwise write: torchvision ``ImageFolder`` whose transform
  applies ``transforms.v2.Compose([RandomResizedCrop(224, scale=(0.08, 1)),
  RandomHorizontalFlip(), ToImage(), ToDtype(uint8)])`` twice to the decoded image (a two-crop
  wrapper), ``DataLoader(shuffle, drop_last, num_workers=W, persistent_workers=True)``.
- ``raymix_device_decode_cpu`` (for information): ``BatchLoader(decode="device",
  device="cpu")``: the W loader processes only read the files and draw the boxes; the main
  process decodes the batch with ``torchvision.io.decode_jpeg`` and cuts the views.
- ``ray_data``: ``raymix.integrations.ray_data.RayDataLoader`` on a ``ray.cluster_utils.Cluster``
  whose head has no CPUs and which has 1 or 2 nodes of one CPU each; the driver iterates.
- ``gpu_device_decode`` (only where CUDA is seen): ``decode="device"`` on the GPU (nvJPEG).

Colour augmentations are left out on every side (raymix applies them batched on the training
device); the reference's flip is kept, as a user's pipeline has it (raymix flips on the device).
Each arm is warmed up (``--warmup`` batches), then timed over whole epochs (from asking for
the first batch to holding the last), ``--repeats`` times, the arms interleaved (order reversed
on every other repeat); medians are reported. Per core: images/s over the cores the arm decodes
with (its W loader processes; 1 for decoding in the main process; 1 per Ray node). On a machine
shared with other jobs the cores an arm asks for are not all its own, so each epoch also
records the CPU seconds of this process and all its descendants (loader processes, the Ray
cluster's processes; from /proc): images per CPU-second is the per-core rate other jobs do not
move, and CPU seconds over wall seconds ("cores busy") shows how many cores the arm really got.

    .venv/bin/python benchmarks/data_pipeline.py [--images 2000] [--workers 1 2] [--repeats 3]
        [--batch-size 64] [--skip-ray] [--out benchmarks/results]

Writes <out>/data_pipeline.json (machine, versions, the git commit of the raymix that ran, the
folder's statistics, one row per arm and worker count, the goals) and prints Markdown tables.
Ray is imported only by the Ray arm (``--skip-ray`` runs without it).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageDraw, features
from torchvision import datasets as tv_datasets
from torchvision import transforms
from torchvision.transforms import v2

import raymix
from raymix.data.folder import CropSpec, FolderData, centre_box, crop_rng, draft_factor, random_resized_box
from raymix.data.loader import BatchLoader, epoch_order, shard_indices

from machine import cpu_name, git

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
PREFETCH = 4  # raymix's default data.prefetch
OBJECT_STORE_MB = 512  # per Ray node (ray.cluster_utils' default, 150, is below a few batches)
GENERATOR_VERSION = 1  # bump when the images change: the cache key includes it
LOCAL_ARMS = ("previous", "raymix_cpu", "raymix_cpu_no_draft", "reference", "raymix_device_decode_cpu")
GOAL_PER_CORE = 1.0  # raymix_cpu per core over reference per core
GOAL_NODES = 1.8  # two Ray nodes over one

Loader = Any  # set_epoch(epoch), __iter__ -> (images, labels) batches


# ---------------------------------------------------------------- the folder


def jpeg(seed: int, index: int, low: int, high: int, quality: int) -> tuple[bytes, int, int]:
    """One image with some structure, as JPEG bytes: (bytes, width, height)."""
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(low, high + 1, 2))
    grid = rng.integers(0, 256, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)  # smooth colours
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):  # flat shapes with hard edges
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    coarse = rng.integers(108, 149, (height // 3 + 1, width // 3 + 1, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    grain = rng.integers(-18, 19, (height, width, 3), dtype=np.int16)
    pixels = np.asarray(image, dtype=np.int16) + texture.astype(np.int16) - 128 + grain
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), width, height


def image_folder(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The generated folder (``<root>/train/<class>/<image>.jpg``) and its statistics; built
    once per parameter set, then found in the cache."""
    params = {
        "images": args.images, "classes": args.classes, "min_side": args.min_side,
        "max_side": args.max_side, "quality": args.quality, "seed": args.seed,
        "generator": GENERATOR_VERSION,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache = args.cache if args.cache is not None else Path(tempfile.gettempdir())
    root = cache / f"raymix-data-pipeline-{key}"
    record = root / "folder.json"
    if record.is_file():
        return root, {**json.loads(record.read_text()), "cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=root.name + ".part-", dir=cache))
    start = time.perf_counter()
    widths, heights, sizes = [], [], []
    for index in range(args.images):
        data, width, height = jpeg(args.seed, index, args.min_side, args.max_side, args.quality)
        folder = partial / "train" / f"class_{index % args.classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:07d}.jpg").write_bytes(data)
        widths.append(width)
        heights.append(height)
        sizes.append(len(data))
    stats = {
        **params,
        "mean_width": round(float(np.mean(widths)), 1),
        "mean_height": round(float(np.mean(heights)), 1),
        "mean_kb": round(float(np.mean(sizes)) / 1e3, 1),
        "total_mb": round(sum(sizes) / 1e6, 1),
        "generation_seconds": round(time.perf_counter() - start, 1),
    }
    (partial / "folder.json").write_text(json.dumps(stats, indent=2) + "\n")
    try:
        partial.rename(root)
    except OSError:  # another run built it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return root, {**stats, "cached": False}


def draft_share(train: FolderData) -> dict[str, float]:
    """How often draft mode can reduce the decode on this folder: the share of images whose two
    training crops (epoch 0, seed 0) allow a JPEG scale factor above 1, and of evaluation items."""
    reduced_train = reduced_eval = 0
    for index in range(len(train)):
        with Image.open(train.path(index)) as image:  # reads the header only
            width, height = image.size
        rng = crop_rng(0, 0, index)
        boxes = [random_resized_box(width, height, rng, SCALE, RATIO) for _ in range(2)]
        reduced_train += draft_factor(boxes, SIZE) > 1
        reduced_eval += draft_factor([centre_box(width, height, SIZE, train.eval_fraction)], SIZE) > 1
    return {
        "train_images_decoded_reduced": round(reduced_train / len(train), 4),
        "eval_images_decoded_reduced": round(reduced_eval / len(train), 4),
    }


# ---------------------------------------------------------------- the arms


class PreviousPath:
    """raymix's folder loader before this change: an ImageFolder resized and centre-cropped to
    one S x S image, the epoch's shuffled batches through a new DataLoader every epoch."""

    def __init__(self, train: Path, batch_size: int, workers: int, seed: int = 0) -> None:
        transform = transforms.Compose(
            [transforms.Resize(SIZE, antialias=True), transforms.CenterCrop(SIZE), transforms.PILToTensor()]
        )
        self.folder = tv_datasets.ImageFolder(str(train), transform=transform)
        self.batch_size, self.workers, self.seed, self.epoch = batch_size, workers, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.folder), True, self.seed, self.epoch)
        batches = torch.split(shard_indices(order, self.batch_size, 0, 1, True), self.batch_size)
        loader = torch.utils.data.DataLoader(
            self.folder, batch_sampler=[idx.tolist() for idx in batches], num_workers=self.workers
        )
        yield from loader


class TwoCrops:
    """A user's two-crop wrapper: the same random transform applied twice to one decoded image."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [self.transform(image), self.transform(image)]


class Reference:
    """torchvision ImageFolder + transforms.v2 two-crop pipeline in a persistent DataLoader."""

    def __init__(self, train: Path, batch_size: int, workers: int, seed: int = 0) -> None:
        view = v2.Compose(
            [
                v2.RandomResizedCrop(SIZE, scale=SCALE, ratio=RATIO, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToImage(),
                v2.ToDtype(torch.uint8),
            ]
        )
        folder = tv_datasets.ImageFolder(str(train), transform=TwoCrops(view))
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(
            folder, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=False, generator=self.generator,
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        pass  # the DataLoader's generator moves on by itself

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        yield from self.loader


def spec() -> CropSpec:
    return CropSpec(SCALE, RATIO, views=2, seed=0)


def batch_loader(
    train: Path, batch_size: int, workers: int, *, draft: bool, decode: str, device: str
) -> Loader:
    data = FolderData(train, SIZE, draft=draft)
    return BatchLoader(
        data, batch_size, shuffle=True, drop_last=True, crops=spec(), num_workers=workers,
        prefetch=PREFETCH, decode=decode, device=device,
    )  # fmt: skip


def build_local(arm: str, train: Path, batch_size: int, workers: int) -> Loader:
    if arm == "previous":
        return PreviousPath(train, batch_size, workers)
    if arm == "reference":
        return Reference(train, batch_size, workers)
    if arm == "raymix_cpu":
        return batch_loader(train, batch_size, workers, draft=True, decode="cpu", device="cpu")
    if arm == "raymix_cpu_no_draft":
        return batch_loader(train, batch_size, workers, draft=False, decode="cpu", device="cpu")
    if arm == "raymix_device_decode_cpu":  # data.decode=device builds its folders without draft
        return batch_loader(train, batch_size, workers, draft=False, decode="device", device="cpu")
    if arm == "gpu_device_decode":
        return batch_loader(train, batch_size, workers, draft=False, decode="device", device="cuda")
    raise ValueError(arm)


def close(loader: Loader) -> None:
    """Let go of a loader's processes now. A BatchLoader and its DataLoader refer to each other
    (the batch sampler reads the loader's epoch), so dropping the BatchLoader leaves them to the
    garbage collector, whose teardown waits out the workers' 5 s poll; dropping the DataLoader
    first ends its processes at once."""
    if isinstance(loader, BatchLoader):
        loader._loader = None


def cores_of(arm: str, workers: int) -> int:
    """CPU cores an arm decodes with: its loader processes, or the main process."""
    return 1 if arm in ("raymix_device_decode_cpu", "gpu_device_decode") else max(workers, 1)


# ---------------------------------------------------------------- timing


def shape_of(images: torch.Tensor | list[torch.Tensor]) -> str:
    if isinstance(images, torch.Tensor):
        return f"{tuple(images.shape)} {str(images.dtype).removeprefix('torch.')} on {images.device.type}"
    return "[" + ", ".join(shape_of(view) for view in images) + "]"


def warm_up(loader: Loader, batches: int) -> str:
    """Iterate ``batches`` batches of epoch 0 (processes started, imports done); the first
    batch's shape."""
    loader.set_epoch(0)
    shape = ""
    for i, (images, _labels) in enumerate(loader):
        shape = shape or shape_of(images)
        if i + 1 >= batches:
            break
    return shape


def synchronize(loader: Loader) -> None:
    device = getattr(loader, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)


def tree_cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by this process and all its descendants, those
    that ended included (a parent that waited for a child holds its time); None without /proc."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    try:
        entries = [e for e in Path("/proc").iterdir() if e.name.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            text = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()  # from field 3 (state) on
        parents[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def settle(idle_cores: float = 0.2, window: float = 1.0, limit: float = 60.0) -> float:
    """Wait until this process tree uses under ``idle_cores`` cores over ``window`` seconds (a
    new Ray cluster's dashboard and agents keep starting for a while); at most ``limit`` s.
    Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        before = tree_cpu_seconds()
        time.sleep(window)
        after = tree_cpu_seconds()
        if before is None or after is None or (after - before) / window < idle_cores:
            break
    return time.perf_counter() - start


Run = tuple[float, int, float | None]  # seconds, images, CPU seconds of the process tree


def time_epoch(loader: Loader, epoch: int) -> Run:
    """One whole epoch (from asking for the first batch to having the last): its seconds,
    images, and the CPU seconds this process and its descendants (loader processes, a Ray
    cluster's processes) spent meanwhile."""
    loader.set_epoch(epoch)
    images = 0
    cpu = tree_cpu_seconds()
    start = time.perf_counter()
    for _images, labels in loader:
        images += len(labels)
    synchronize(loader)
    seconds = time.perf_counter() - start
    after = tree_cpu_seconds()
    return seconds, images, (after - cpu if cpu is not None and after is not None else None)


def row(arm: str, workers: int, cores: int | None, runs: list[Run], output: str) -> dict[str, Any]:
    rates = [n / s for s, n, _ in runs]
    rate = statistics.median(rates)
    cpu = [c for _, _, c in runs if c is not None and c > 0]
    per_cpu = [n / c for _, n, c in runs if c is not None and c > 0]
    return {
        "arm": arm,
        "workers": workers,
        "cores": cores,
        "images_per_second": round(rate, 1),
        "images_per_second_per_core": round(rate / cores, 1) if cores else None,
        "images_per_second_runs": [round(r, 1) for r in rates],
        "epoch_seconds_runs": [round(s, 3) for s, _, _ in runs],
        "images_per_epoch": runs[0][1],
        # Robust to other jobs on the machine: what the pipeline's processes used, not the wall.
        "images_per_cpu_second": round(statistics.median(per_cpu), 1) if per_cpu else None,
        "cpu_seconds_runs": [round(c, 2) for c in cpu],
        "cores_busy": round(statistics.median(c / s for s, _, c in runs if c), 2) if cpu else None,
        "output": output,
    }


def measure_local(
    arms: Iterable[str], train: Path, args: argparse.Namespace, loads: list[float]
) -> list[dict[str, Any]]:
    """Each arm at each worker count: warmed up, then whole epochs, interleaved across arms
    (the 1-minute load average at each repeat's start goes into ``loads``)."""
    rows: list[dict[str, Any]] = []
    arms = list(arms)
    for workers in args.workers:
        loaders = {arm: build_local(arm, train, args.batch_size, workers) for arm in arms}
        shapes = {arm: warm_up(loader, max(args.warmup, 1)) for arm, loader in loaders.items()}
        runs: dict[str, list[Run]] = {arm: [] for arm in arms}
        for repeat in range(args.repeats):
            loads.append(round(os.getloadavg()[0], 2))
            for arm in arms if repeat % 2 == 0 else arms[::-1]:
                runs[arm].append(time_epoch(loaders[arm], repeat + 1))
                seconds, images, _ = runs[arm][-1]
                print(
                    f"W={workers} repeat {repeat + 1} {arm}: {images / seconds:.1f} images/s", file=sys.stderr
                )
        for arm in arms:
            rows.append(row(arm, workers, cores_of(arm, workers), runs[arm], shapes[arm]))
        for loader in loaders.values():
            close(loader)
        del loaders  # shuts the persistent loader processes down
        gc.collect()
    return rows


def measure_gpu(train: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """decode="device" on the GPU: nvJPEG decodes each batch, the views are cut there."""
    rows = []
    for workers in args.workers:
        loader = build_local("gpu_device_decode", train, args.batch_size, workers)
        shape = warm_up(loader, max(args.warmup, 1))
        runs = [time_epoch(loader, repeat + 1) for repeat in range(args.repeats)]
        rows.append(row("gpu_device_decode", workers, None, runs, shape))
        close(loader)
        del loader
        gc.collect()
    return rows


# ---------------------------------------------------------------- Ray Data


def measure_ray(train: Path, args: argparse.Namespace) -> dict[str, Any]:
    """RayDataLoader on a cluster whose head has no CPUs, with 1, then 2 nodes of one CPU each;
    the driver (on the head) iterates. Which node decoded each image is recorded per epoch."""
    try:
        import ray
        from ray.cluster_utils import Cluster

        from raymix.integrations.cluster import (
            DASHBOARD_PORT,
            LOCALHOST,
            free_port,
            inherited_env,
            private_cluster_env,
        )
        from raymix.integrations.ray_data import RayDataLoader
    except ImportError as exc:
        return {"measured": False, "reason": f"cannot import Ray or raymix's Ray Data loader: {exc}"}
    store = {"object_store_memory": OBJECT_STORE_MB * 2**20}
    rows = []
    for nodes in (1, 2):
        # As raymix's private clusters: a dashboard port of its own, which the cluster's
        # processes are told, so they never ask another cluster of the machine.
        port = free_port(DASHBOARD_PORT)
        with inherited_env(private_cluster_env(port)):
            head = {"num_cpus": 0, "dashboard_host": LOCALHOST, "dashboard_port": port, **store}
            cluster = Cluster(initialize_head=True, head_node_args=head)
            try:
                for _ in range(nodes):
                    cluster.add_node(num_cpus=1, **store)
                cluster.wait_for_nodes()
                start = time.perf_counter()
                ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
                logging.getLogger("ray.data").setLevel(logging.WARNING)  # no line per epoch
                loader = RayDataLoader(
                    FolderData(train, SIZE), args.batch_size, crops=spec(), shuffle=True,
                    drop_last=True, prefetch=PREFETCH, cpu_wait_s=60.0,
                )  # fmt: skip
                # The warm-up is a whole epoch: the epoch after one left part-way waited ~6 s
                # with the CPUs idle (Ray 2.60), which a timed epoch must not inherit.
                shape, cold_start, cold_images = "", time.perf_counter(), 0
                for images, labels in loader:  # epoch 0
                    shape = shape or shape_of(images)
                    cold_images += len(labels)
                cold_seconds = time.perf_counter() - cold_start
                warm = time.perf_counter() - start
                settled = settle()
                runs, split = [], []
                for repeat in range(args.repeats):
                    before = Counter(loader.images_per_node)
                    runs.append(time_epoch(loader, repeat + 1))
                    split.append(sorted((loader.images_per_node - before).values(), reverse=True))
                    seconds, images, _ = runs[-1]
                    print(f"Ray Data, {nodes} node(s), repeat {repeat + 1}: {images / seconds:.1f} "
                          f"images/s, images per node {split[-1]}", file=sys.stderr)  # fmt: skip
                name = f"ray_data_{nodes}_node" + ("s" if nodes > 1 else "")
                rows.append(
                    {**row(name, nodes, nodes, runs, shape), "nodes": nodes, "images_per_node_runs": split,
                     "start_and_warmup_seconds": round(warm, 1),
                     "first_epoch_images_per_second": round(cold_images / cold_seconds, 1),
                     "settle_seconds": round(settled, 1)}
                )  # fmt: skip
                del loader
            finally:
                ray.shutdown()
                cluster.shutdown()
    return {
        "measured": True,
        "ray": ray.__version__,
        "object_store_mb_per_node": OBJECT_STORE_MB,
        "rows": rows,
    }


# ---------------------------------------------------------------- report


def ratio_of(mine: dict[str, Any], ref: dict[str, Any], key: str, goal: float) -> dict[str, Any] | None:
    if mine.get(key) is None or not ref.get(key):
        return None
    ratio = mine[key] / ref[key]
    return {"ratio": round(ratio, 3), "met": ratio >= goal}


def goals(rows: list[dict[str, Any]], ray_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals: raymix_cpu per core at least the reference's (at each W; also per CPU
    second of the pipeline's processes, which other jobs on the machine do not move); Ray Data on
    two nodes at least 1.8 times one node."""
    by = {(r["arm"], r["workers"]): r for r in rows}
    per_core: dict[str, Any] = {}
    per_cpu: dict[str, Any] = {}
    for (arm, workers), mine in by.items():
        ref = by.get(("reference", workers))
        if arm == "raymix_cpu" and ref:
            per_core[str(workers)] = ratio_of(mine, ref, "images_per_second_per_core", GOAL_PER_CORE)
            per_cpu[str(workers)] = ratio_of(mine, ref, "images_per_cpu_second", GOAL_PER_CORE)
    nodes = {r["nodes"]: r for r in ray_rows}
    two = one = None
    if 1 in nodes and 2 in nodes:
        two = ratio_of(nodes[2], nodes[1], "images_per_second", GOAL_NODES)
        one = ratio_of(nodes[2], nodes[1], "images_per_cpu_second", 1.0)
    return {
        "goal_per_core": GOAL_PER_CORE,
        "raymix_cpu_over_reference_per_core": per_core,
        "raymix_cpu_over_reference_per_cpu_second": per_cpu,
        "goal_nodes": GOAL_NODES,
        "ray_two_nodes_over_one": two,
        "ray_two_nodes_over_one_per_cpu_second": one,
    }


def verdict(value: dict[str, Any] | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return f"{value['ratio']} (goal >= {goal:g}: {'met' if value['met'] else 'MISSED'})"


def print_tables(result: dict[str, Any]) -> None:
    folder, options = result["folder"], result["options"]
    print(
        "| arm | loader processes (Ray: nodes) | cores | images/s | images/s per core | images per "
        "CPU-second | cores busy | images/s of each run | output |  "
        f"({folder['images']} JPEGs, {folder['min_side']}-{folder['max_side']} px, mean "
        f"{folder['mean_kb']} KB; batch {options['batch_size']}; {result['machine']}, "
        f"{result['cpu_count']} cores; median of {options['repeats']} epochs)"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [*result["rows"], *result["ray"].get("rows", []), *result["gpu"].get("rows", [])]
    for r in rows:
        runs = ", ".join(f"{x:g}" for x in r["images_per_second_runs"])
        cells = [
            r["arm"], r["workers"], r["cores"], r["images_per_second"], r["images_per_second_per_core"],
            r["images_per_cpu_second"], r["cores_busy"], runs, r["output"],
        ]  # fmt: skip
        print("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    g = result["goals"]
    for workers, value in g["raymix_cpu_over_reference_per_core"].items():
        by_cpu = g["raymix_cpu_over_reference_per_cpu_second"].get(workers)
        print(f"\nraymix_cpu / reference per core, W={workers}: {verdict(value, GOAL_PER_CORE)}; "
              f"per CPU-second: {verdict(by_cpu, GOAL_PER_CORE)}", end="")  # fmt: skip
    if g["ray_two_nodes_over_one"]:
        print(f"\nRay Data two nodes / one: {verdict(g['ray_two_nodes_over_one'], GOAL_NODES)}; "
              f"per CPU-second: {g['ray_two_nodes_over_one_per_cpu_second']['ratio']}", end="")  # fmt: skip
    else:
        print(f"\nRay Data: {result['ray'].get('reason', 'not measured')}", end="")
    if not result["gpu"].get("measured"):
        print(f"\nGPU decode: {result['gpu']['reason']}", end="")
    draft = result["draft"]
    print(
        f"\ndraft mode reduces the decode of {draft['train_images_decoded_reduced']:.1%} of training "
        f"images and {draft['eval_images_decoded_reduced']:.1%} of evaluation images here"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the generated folder")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--min-side", type=int, default=300, help="px, each side drawn in [min, max]")
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--seed", type=int, default=0, help="of the generated images")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader processes (W)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per arm (median)")
    parser.add_argument("--warmup", type=int, default=4, help="batches iterated before timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--arms", default=None, help=f"comma-separated subset of: {', '.join(LOCAL_ARMS)}")
    parser.add_argument("--skip-ray", action="store_true", help="no Ray Data arm (Ray not imported)")
    parser.add_argument("--cache", type=Path, default=None, help="where the folder is generated (temp)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if min(args.images, args.repeats, args.batch_size, min(args.workers) + 1) < 1:
        raise SystemExit("--images, --repeats and --batch-size must be >= 1, --workers >= 0")
    if args.images < args.batch_size * max(args.workers, default=1):
        raise SystemExit("--images must hold at least one batch per loader process")
    if not 8 <= args.min_side <= args.max_side:
        raise SystemExit("--min-side must be >= 8 and <= --max-side")
    arms = list(LOCAL_ARMS)
    if args.arms:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = set(arms) - set(LOCAL_ARMS)
        if unknown:
            raise SystemExit(f"--arms: unknown {sorted(unknown)}; allowed: {', '.join(LOCAL_ARMS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    source = Path(raymix.__file__).resolve().parent
    if not source.is_relative_to(ROOT):
        print(f"warning: raymix from {source}, not the one beside this script", file=sys.stderr)

    load = os.getloadavg()
    root, folder = image_folder(args)
    train = root / "train"
    print(f"folder {root} ({'cached' if folder['cached'] else 'generated'})", file=sys.stderr)
    draft = draft_share(FolderData(train, SIZE))
    started = time.perf_counter()
    loads: list[float] = []
    rows = measure_local(arms, train, args, loads)
    if torch.cuda.is_available():
        gpu: dict[str, Any] = {
            "measured": True, "device": torch.cuda.get_device_name(), "rows": measure_gpu(train, args)
        }  # fmt: skip
    else:
        gpu = {"measured": False, "reason": "not measured: no CUDA device on this machine"}
    if args.skip_ray:
        ray_result: dict[str, Any] = {"measured": False, "reason": "skipped (--skip-ray)"}
    else:
        try:
            ray_result = measure_ray(train, args)
        except Exception as exc:  # the local figures are kept and written
            traceback.print_exc()
            ray_result = {"measured": False, "reason": f"failed: {type(exc).__name__}: {exc}"}
    date = datetime.date.today().isoformat()
    result = {
        "date": date,
        "machine": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "load_average_1min_at_repeats": loads,
        "measure_seconds": round(time.perf_counter() - started, 1),
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        },
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_changes_in_raymix": git(
            "status", "--porcelain", "--untracked-files=all", "--", "."
        ).splitlines(),
        "raymix_path": str(source),
        "folder": {**folder, "path": str(root)},
        "draft": draft,
        "options": {
            "batch_size": args.batch_size,
            "workers": args.workers,
            "repeats": args.repeats,
            "warmup_batches": args.warmup,
            "prefetch": PREFETCH,
            "image_size": SIZE,
            "crop_scale": SCALE,
            "crop_ratio": RATIO,
            "views": 2,
            "arms": arms,
        },
        "notes": {
            "previous": "one 224 px centre square per image (both views were cut from it on the device)",
            "colour": "colour augmentations excluded on every side (raymix applies them on the device); "
            "the reference flips on the CPU, raymix on the device",
            "cores": "the loader's processes; raymix_device_decode_cpu decodes in the main process "
            "(its W processes only read files and draw boxes): 1; a Ray node has one CPU",
        },
        "rows": rows,
        "ray": ray_result,
        "gpu": gpu,
        "goals": {},
    }
    result["goals"] = goals(rows, ray_result.get("rows", []))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "data_pipeline.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
