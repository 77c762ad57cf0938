"""The engine benchmarks run where only torch and timm are installed (a bare GPU image):
each is started with Ray, Optuna and MLflow made unimportable, on tiny sizes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raymix.config import load_config
from raymix.models import build_backbone

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "optuna", "mlflow")
# Runs a script with the blocked packages unimportable, as on a machine without them.
RUNNER = """
import importlib.abc, os, runpy, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not installed here")
        return None

sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python script.py` does
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_bare(script: str, *args: str) -> str:
    code = RUNNER.format(blocked=BLOCKED)
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_blocker_blocks(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import ray\n")
    code = RUNNER.format(blocked=BLOCKED)
    result = subprocess.run([sys.executable, "-c", code, str(probe)], capture_output=True, text=True)
    assert result.returncode != 0 and "ray is not installed here" in result.stderr


@pytest.mark.slow
def test_throughput_without_ray(tmp_path):
    out = run_bare(
        "throughput.py", "--methods", "moco,patchmix", "--backbones", "vit_tiny,resnet18",
        "--batch-size", "8", "--steps", "1", "--warmup", "0", "--profile", "--out", str(tmp_path),
    )  # fmt: skip
    (path,) = tmp_path.glob("throughput-*.json")
    assert str(path.name) in out and not path.stem.endswith(("-bf16", "-compile"))
    record = json.loads(path.read_text())
    assert record["versions"]["torch"] and record["versions"]["timm"] and record["date"]
    rows = {(r["method"], r["backbone"]): r for r in record["rows"]}
    assert set(rows) == {(m, b) for m in ("moco", "patchmix") for b in ("vit_tiny", "resnet18")}
    assert "ViT" in rows[("patchmix", "resnet18")]["skipped"]  # PatchMix mixes ViT patches
    for key in [("moco", "vit_tiny"), ("patchmix", "vit_tiny"), ("moco", "resnet18")]:
        row = rows[key]
        assert row["images_per_second"] > 0 and row["gflops_per_step"] > 0 and "mfu_bf16" not in row
        assert 0 < len(row["top_kernels"]) <= 10
        shares = [k["share"] for k in row["top_kernels"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001


def load_throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its helpers sit beside it
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_counter_counts_a_vit_exactly(monkeypatch):
    """ViT-T/2 at 32 px: patch embedding, 12 blocks of linear layers and attention (CPU kernel too)."""
    cfg = load_config(None, ["backbone.name=vit_tiny", "backbone.patch_size=2", "data.name=synthetic"])
    backbone = build_backbone(cfg.backbone, 32)
    batch, tokens, width, patches = 2, 257, 192, 256
    embed = 2 * batch * patches * (3 * 2 * 2) * width
    linear = 2 * batch * tokens * 12 * width**2  # qkv 3D^2, proj D^2, MLP 4D^2 + 4D^2
    attention = 2 * 2 * batch * tokens**2 * width  # QK^T and AV over all heads
    counter = load_throughput(monkeypatch).flop_counter()
    with counter, torch.no_grad():
        backbone(torch.randn(batch, 3, 32, 32))
    assert counter.get_total_flops() == embed + 12 * (linear + attention)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [("NVIDIA H200 NVL", 835.5), ("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4),
     ("NVIDIA H100 NVL", 835.5), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0)],
)  # fmt: skip
def test_each_gpu_gets_its_own_bf16_peak(monkeypatch, name, tflops):
    assert load_throughput(monkeypatch).peak_of(name) == pytest.approx(tflops * 1e12)


def test_throughput_flops_scale_with_batch(tmp_path):
    """Counted FLOPs are the whole step's: doubling the batch about doubles them."""
    gflops = {}
    for batch in (4, 8):
        folder = tmp_path / str(batch)
        run_bare(
            "throughput.py", "--methods", "moco", "--backbones", "vit_tiny", "--batch-size", str(batch),
            "--steps", "1", "--warmup", "0", "--name", "", "--out", str(folder),
        )  # fmt: skip
        (path,) = folder.glob("throughput-*.json")
        gflops[batch] = json.loads(path.read_text())["rows"][0]["gflops_per_step"]
    assert 1.9 < gflops[8] / gflops[4] < 2.1


def test_knn_speed_without_ray(tmp_path):
    out = run_bare(
        "knn_speed.py", "--train", "500", "--test", "100", "--dim", "16", "--k", "20",
        "--repeats", "1", "--out", str(tmp_path),
    )  # fmt: skip
    (path,) = tmp_path.glob("knn_speed-*.json")
    record = json.loads(path.read_text())
    assert record["options"]["train"] == 500 and "out" not in record["options"]
    assert record["rows"][0]["backend"] == "cpu" and record["rows"][0]["seconds"] > 0
    assert "| cpu" in out


def test_data_pipeline_without_ray(tmp_path):
    out = run_bare(
        "data_pipeline.py", "--images", "12", "--classes", "3", "--batch-size", "4", "--workers", "1",
        "--repeats", "1", "--warmup", "1", "--skip-ray", "--cache", str(tmp_path / "cache"),
        "--out", str(tmp_path),
    )  # fmt: skip
    record = json.loads((tmp_path / "data_pipeline.json").read_text())
    assert "data_pipeline.json" in out and record["folder"]["images"] == 12
    assert len(list((tmp_path / "cache").glob("raymix-data-pipeline-*/train/class_*/*.jpg"))) == 12
    rows = {r["arm"]: r for r in record["rows"]}
    assert set(rows) == {
        "previous",
        "raymix_cpu",
        "raymix_cpu_no_draft",
        "reference",
        "raymix_device_decode_cpu",
    }
    for r in rows.values():
        assert r["images_per_epoch"] == 12 and r["images_per_second"] > 0 and r["cores"] == 1
    assert rows["raymix_cpu"]["output"].startswith("(4, 2, 3, 224, 224) uint8")
    assert rows["previous"]["output"].startswith("(4, 3, 224, 224) uint8")
    assert record["ray"]["measured"] is False and record["gpu"]["measured"] is torch.cuda.is_available()
    assert "1" in record["goals"]["raymix_cpu_over_reference_per_core"]
    for r in rows.values():  # CPU seconds from /proc (None where there is none, or too few ticks)
        assert r["images_per_cpu_second"] is None or r["images_per_cpu_second"] > 0


def test_search_efficiency_grid_cost_and_censoring(monkeypatch):
    """The study's bookkeeping (no training, no Ray): grid snapping, cost, censored medians."""
    import argparse

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "search_efficiency", ROOT / "benchmarks" / "search_efficiency.py"
    )
    se = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(se)
    g = se.grid(4)
    assert len(se.grid_points(g)) == 48
    t, lr = g["method.temperature"], g["optim.lr"]
    for i, (tv, lv) in enumerate(zip(t["values"], lr["values"], strict=True)):  # each centre in its own bin
        point = {"method.temperature": tv, "optim.lr": lv, "augment.crop_scale": "[0.5, 1.0]"}
        assert se.grid_key(point, g, 4) == f"{i},{i},1"
    edges = {"method.temperature": t["low"], "optim.lr": lr["high"], "augment.crop_scale": [0.7, 1.0]}
    assert se.grid_key(edges, g, 4) == "0,3,2"

    def run(values):
        return {"reports": [["0,0,0", e, v] for e, v in enumerate(values, 1)]}

    assert se.cost(run([0.1, 0.5, 0.9])["reports"], 0.5) == 2 and se.cost(run([0.1])["reports"], 0.5) is None
    arms = {
        "random": [run([0.0] * 9 + [1.0]), run([0.0] * 9 + [1.0]), run([0.0] * 3)],
        "fast": [run([0.0, 1.0]), run([1.0]), run([0.0] * 3)],
        "never": [run([0.0] * 3)] * 2,  # fewer seeds: paired with random's first two
    }
    summary = se.summarise(arms, 0.9, argparse.Namespace(bootstrap=50))
    assert summary["random"]["median_trial_epochs_to_target"] == 10 and summary["random"]["reached"] == 2
    assert summary["fast"]["ratio_to_random"] == 5.0 and summary["fast"]["fraction_reached"] == 0.667
    assert summary["never"]["median_trial_epochs_to_target"] is None
    assert summary["never"]["ratio_to_random"] == 0.0 and summary["never"]["random_seeds_paired"] == 2


def test_method_gains_pairs_seeds_and_every_arm_config_loads():
    """The gains study's statistics (paired by seed, t interval) and that every arm's
    overrides make a valid config (no training)."""
    spec = importlib.util.spec_from_file_location("method_gains", ROOT / "benchmarks" / "method_gains.py")
    mg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mg)
    for arm, overrides in mg.ARMS.items():
        load_config(mg.DIGITS, overrides)  # raises on a bad key
        assert any(arm in pair for pair in mg.PAIRS), arm
    runs = [{"arm": "moco-v3", "seed": s, "knn_top1": v} for s, v in enumerate([0.90, 0.92, 0.91])]
    runs += [{"arm": "patchmix", "seed": s, "knn_top1": v} for s, v in enumerate([0.93, 0.93, 0.95])]
    runs.append({"arm": "patchmix", "seed": 7, "knn_top1": 0.1})  # no partner seed: not paired
    summary = mg.summarise(runs)
    (pair,) = summary["pairs"]
    assert (pair["method"], pair["base"], pair["seeds"], pair["wins"]) == ("patchmix", "moco-v3", 3, 3)
    diffs = [0.03, 0.01, 0.04]
    mean = sum(diffs) / 3
    se = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5 / 3**0.5
    assert pair["diff"] == pytest.approx(mean, abs=1e-4)
    half = 4.302653 * se  # t(0.975, 2)
    assert pair["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-4)
    assert summary["arms"]["patchmix"]["n"] == 4
