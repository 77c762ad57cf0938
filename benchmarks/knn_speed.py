"""Speed of the kNN evaluation at CIFAR scale: 50,000 x 384 train features, k = 200.

Times ``knn_predict`` (cosine similarities in chunks of test rows, top-k, weighted votes)
for 10,000 test rows, as after every epoch of a ViT-S run on CIFAR-10, on the CPU and,
where CUDA is seen, on the GPU. Features are random unit vectors: the cost does not
depend on their values.

    python benchmarks/knn_speed.py [--train 50000] [--test 10000] [--dim 384] [--k 200] [--repeats 3]

Writes benchmarks/results/knn_speed-<date>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from raymix.engine.knn import knn_predict

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def time_knn(device: torch.device, args: argparse.Namespace) -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(args.train, args.dim, generator=generator).to(device)
    labels = torch.randint(0, args.classes, (args.train,), generator=generator).to(device)
    test = torch.randn(args.test, args.dim, generator=generator).to(device)

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        predicted = knn_predict(
            train, labels, test, [args.k], num_classes=args.classes, chunk_size=args.chunk
        )
        predicted[args.k].sum().item()  # wait for the result
        return time.perf_counter() - start

    run()  # warm-up
    seconds = [run() for _ in range(args.repeats)]
    median = statistics.median(seconds)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "seconds": round(median, 4),
        "seconds_runs": [round(s, 4) for s in seconds],
        "test_rows_per_second": round(args.test / median, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=1024, help="test rows per similarity matrix")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [{"backend": d.type, **time_knn(d, args)} for d in devices]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "options": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"knn_speed-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| device | seconds | test rows/s |  ({args.test} x {args.train} x {args.dim}, k = {args.k})")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} ({row['device']}) | {row['seconds']} | {row['test_rows_per_second']} |")
    print(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
