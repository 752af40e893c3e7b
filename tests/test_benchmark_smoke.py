"""benchmarks/ep_step.py runs at a tiny size on the CPU over gloo: one process, and two ranks
under torchrun (every row, so the multi-GPU run only has to launch it); benchmarks/load_checkpoint.py
and benchmarks/sync_rebalance_cpu.py run at a tiny size; the GPU session script checks its arguments
before running anything."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"unwrapped", "wrapped", "ep", "ep_eplb", "ep_eplb_rr"}


def _run(prefix, tmp_path, *extra):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [*prefix, str(ROOT / "benchmarks" / "ep_step.py"), "--tiny", "--json", str(out), *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| model | tokens |" in result.stdout
    return json.loads(out.read_text())


def test_ep_step_runs_tiny_on_one_process(tmp_path):
    report = _run([sys.executable], tmp_path)
    assert report["ranks"] == 1
    rows = report["rows"]
    assert {r["row"] for r in rows} == ROWS and {r["model"] for r in rows} == {"stack", "qwen3"}
    assert all(r["median_ms"] > 0 and r["cpu_ms"] > 0 for r in rows)
    assert all(0 < r["balancedness"] <= 1 for r in rows if r["row"].startswith("ep"))


@pytest.mark.distributed
def test_ep_step_runs_tiny_on_two_gloo_ranks(tmp_path):
    report = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"], tmp_path,
                  "--model", "stack")
    assert report["ranks"] == 2
    rows = report["rows"]
    assert {r["row"] for r in rows} == ROWS - {"wrapped"}  # wrapping without EP is a one-rank row
    eplb = [r for r in rows if r["row"] == "ep_eplb"]
    assert eplb and all(r["predicted_speedup"] > 0 and r["realised_speedup"] > 0 for r in eplb)


def test_load_checkpoint_runs_tiny(tmp_path):
    """benchmarks/load_checkpoint.py at a tiny size: rank 0 of G reads S/E of the experts."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load_checkpoint.py"), "--layers", "2", "--experts", "16",
         "--hidden", "64", "--inter", "32", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "G" not in line]
    # G, S, rows read: 2 layers x 2 tensors x S distinct experts (one redundant slot per rank).
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [
        (g, (16 + g) // g, 2 * 2 * min((16 + g) // g, 16)) for g in (1, 2, 4, 8, 16)
    ]


def test_sync_rebalance_cpu_runs_tiny():
    """benchmarks/sync_rebalance_cpu.py on 2 gloo processes: every row, positive times."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sync_rebalance_cpu.py"), "--layers", "2", "--rebalances", "2",
         "--agreements", "5"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        if line.startswith(("rebalance wall", "rebalance cpu", "agreement")):
            name, value = line[:18].strip(), float(line[18:28])
            rows[name] = value
    assert set(rows) == {"rebalance wall", "rebalance cpu", "agreement"}, result.stdout
    assert all(v > 0 for v in rows.values()), result.stdout


def test_the_gpu_session_script_refuses_an_unknown_part_before_running_anything(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "run_gpu_checks.sh"), "tests", "ep_stpe"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OUT": "logs"},
    )
    assert result.returncode == 2
    assert "unknown part 'ep_stpe'; pass any of: tests async_stall ep_step" in result.stderr
    assert not (tmp_path / "logs").exists() and not result.stdout  # nothing ran, nothing was written
