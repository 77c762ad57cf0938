#!/usr/bin/env bash
# The GPU benchmarks in one go, on a machine with torch and timm (Ray is not needed):
#   1. ViT-S/2 MoCo in bf16, eager and compiled, each with a profile's top kernels (the MFU target);
#   2. every method x backbone in bf16;
#   3. ResNet-18 MoCo in bf16, channels_last and compiled;
#   4. kNN at CIFAR scale (50,000 x 384, k = 200) on the CPU and the GPU.
# About 7 minutes on an H100, most of it compiling; each writes a JSON record to the results
# folder. A run that fails or passes STEP_TIMEOUT seconds (default 300) does not stop the
# others; the script exits 1 if any did.
#
#   benchmarks/gpu.sh [RESULTS_DIR]          (default: benchmarks/results)
#
# raymix's own code runs from this checkout (no install). On a machine without internet, the
# few pure-Python packages it needs beyond torch and timm (pydantic, PyYAML, tqdm,
# scikit-learn) can be brought as wheels: put them in a folder named by WHEELS and they are
# installed into a temporary folder first, e.g. on a machine with internet
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d wheels pydantic
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${WHEELS:-}" ]]; then
    site=$(mktemp -d)
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
fi
"$python" -c "import torch, timm, pydantic, yaml, tqdm; assert torch.cuda.is_available(), 'no CUDA device'"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; fi

failed=()
run() {
    echo "+ $*"
    timeout "${STEP_TIMEOUT:-300}" "$python" "$@" --out "$results" || failed+=("$*")
}
run benchmarks/throughput.py --methods moco --backbones vit_small --precision bf16 --profile
run benchmarks/throughput.py --methods moco --backbones vit_small --precision bf16 --compile --profile
run benchmarks/throughput.py --precision bf16 --name bf16-all
run benchmarks/throughput.py --methods moco --backbones resnet18 --precision bf16 --channels-last --compile
run benchmarks/knn_speed.py
if ((${#failed[@]})); then
    printf 'failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
