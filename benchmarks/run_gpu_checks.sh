#!/usr/bin/env bash
# The GPU session: the GPU tests, then the GPU benchmarks. Run from the repository root on a CUDA
# machine with eplb importable (PYTHONPATH=. is enough). Arguments pick the parts and their order
# (default: all three):
#   tests        python3 -m pytest tests/gpu
#   async_stall  benchmarks/async_stall.py (JSON rows and a plot)
#   ep_step      benchmarks/ep_step.py's one-GPU rows (TOKENS, ITERS, BENCH_TIMEOUT; needs transformers)
# e.g. `benchmarks/run_gpu_checks.sh tests ep_step`. OUT (default: ./out) gets the logs, JSON and plots.
set -uo pipefail
OUT="${OUT:-out}"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests async_stall ep_step)
for part in "${parts[@]}"; do  # every argument is checked before anything runs
    case "$part" in
        tests | async_stall | ep_step) ;;
        *) echo "run_gpu_checks.sh: unknown part '$part'; pass any of: tests async_stall ep_step" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "
import sys, torch
try:
    import transformers; extra = ' transformers ' + transformers.__version__
except ImportError:
    extra = ''
print('torch', torch.__version__ + extra, 'python', sys.version.split()[0])"
for part in "${parts[@]}"; do
    case "$part" in
        tests)
            timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -30 ;;
        async_stall)
            timeout 400 python3 benchmarks/async_stall.py --plot "$OUT/async_stall.png" --json "$OUT/async_stall.json" \
                2>&1 | tee "$OUT/async_stall.log" | tail -12 ;;
        ep_step)
            timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/ep_step.py --tokens ${TOKENS:-256 512 2048 4096} \
                --iters "${ITERS:-20}" --json "$OUT/ep_step.json" --plot "$OUT/ep_step.png" \
                2>"$OUT/ep_step_rows.log" | tee "$OUT/ep_step.log"
            tail -3 "$OUT/ep_step_rows.log" ;;
    esac
done
