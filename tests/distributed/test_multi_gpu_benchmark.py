"""benchmarks/multi_gpu.py's async part on the CPU over gloo (2 ranks, tiny sizes): every row runs,
outputs equal the unwrapped model, every slot holds its expert, and the per-phase numbers exist."""

from __future__ import annotations

import importlib.util
import pathlib

import torch
from harness import run_ranks

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "multi_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("multi_gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _async_part(rank, world_size):
    bench = _bench()
    args = bench.parse_args([
        "--parts", "async", "--layers", "2", "--experts", "8", "--hidden", "32", "--inter", "16",
        "--topk", "2", "--tokens", "8", "--steps", "24", "--warmup", "2", "--rebalance-at", "8",
        "--check-every", "1", "--timeout", "60", "--no-graph", "--async-communicators", "torch_gloo",
    ])
    results = bench.run_async(args, rank, world_size, torch.device("cpu"))
    ok = bench.print_async(results, args, world_size) if rank == 0 else True
    return ok, results


def test_async_rows_run_correctly_on_cpu_and_report_each_phase():
    outs = run_ranks(_async_part, 2, timeout=600)
    ok, results = outs[0]
    assert ok
    assert [r["mode"] for r in results] == ["none", "sync", "async:torch_gloo", "none#again"]
    by_mode = {r["mode"]: r for r in results}
    for mode in ("sync", "async:torch_gloo"):
        r = by_mode[mode]
        assert r["bytes_moved"] > 0 and r["slots_ok"] and r["max_err"] <= r["tolerance"]
        assert r["p50_before_ms"] is not None and r["p50_in_flight_ms"] is not None
        assert r["p50_after_ms"] is not None, "steps run after the commit"
    assert by_mode["async:torch_gloo"]["steps_in_flight"] >= 1
    assert by_mode["none"]["p50_in_flight_ms"] is None and by_mode["none"]["p50_after_ms"] is None
