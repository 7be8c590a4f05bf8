#!/usr/bin/env bash
# GPU check of sparselearn.speed, self-contained, under 4 minutes: the gpu-marked tests, then the GPU
# benchmark (2:4 semi-structured and block-sparse linear vs dense, and accelerate's choice).
# Run from the repository root on a CUDA machine:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
echo "== gpu tests"
timeout 120 python3 -m pytest -q -m gpu tests/speed/test_gpu.py -p no:cacheprovider 2>&1 | tail -15
echo "== gpu benchmark"
timeout 150 python3 benchmarks/gpu_bench.py 2>&1 | tail -40
