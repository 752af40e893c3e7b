"""The runnable examples run (the distributed one under torchrun is in tests/distributed)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wrap_transformers_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "wrap_transformers.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the example prints what it did"


def test_load_sharded_example_runs():
    """examples/load_sharded.py starts 2 gloo ranks, loads a sharded checkpoint into meta models,
    rebalances, pushes new weights, and checks every output against the full model."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "load_sharded.py")],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every output equals the full model's" in result.stdout
    assert "rank 1: 6 of 12 slots per layer" in result.stdout
