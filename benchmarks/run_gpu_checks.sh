#!/usr/bin/env bash
# The GPU session: GPU tests, then the async-stall benchmark. Run from the repository root on a
# CUDA machine with eplb importable (PYTHONPATH=. is enough). OUT (default: ./out) gets the logs.
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout 400 python3 benchmarks/async_stall.py --plot "$OUT/async_stall.png" --json "$OUT/async_stall.json" \
    2>&1 | tee "$OUT/async_stall.log" | tail -12
