#!/usr/bin/env bash
# One-GPU session for the expert-parallel forward: its GPU tests, then benchmarks/ep_step.py's
# one-GPU rows. Run from the repository root on a CUDA machine with eplb importable.
# OUT (default: ./out) gets the logs and the JSON rows.
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, sys; print('torch', torch.__version__, 'transformers', transformers.__version__, 'python', sys.version.split()[0])"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/ep_step.py --tokens ${TOKENS:-256 512 2048 4096} --iters "${ITERS:-20}" \
    --json "$OUT/ep_step.json" --plot "$OUT/ep_step.png" 2>"$OUT/ep_step_rows.log" | tee "$OUT/ep_step.log"
tail -3 "$OUT/ep_step_rows.log"
