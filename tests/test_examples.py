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
