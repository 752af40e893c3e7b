"""Helper of test_faults_ep (not a test): pairs of gloo ranks that leave the interpreter with an
async rebalance in flight.

``python exit_in_flight.py RUNS`` imports torch once, then forks each pair's two ranks; a rank
wraps a model, starts a rebalance, takes 0, 1 or 2 steps (planned / moving weights / committing),
rank 1 waits a moment longer than rank 0, and both return from the module's top level, so the
process goes through a real interpreter exit (atexit hooks, thread and module teardown) with the
worker thread still busy. Prints one line per rank that did not exit with status 0, then ``bad N``.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for moe_models
import moe_models as mm  # noqa: E402

from eplb import EPLBConfig, EPLBWrapper  # noqa: E402

PAIRS_AT_ONCE = 5


def _rank(rank: int, port: int, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    config = EPLBConfig(num_redundant_experts=4, step_interval=10_000, async_timeout_s=5.0)
    wrapper = EPLBWrapper(mm.build_reference_model(), config, ep_group=dist.group.WORLD)
    with torch.no_grad():
        wrapper(mm.hidden_batch(rank, batch=1, length=8))
        wrapper.rebalance()
        for step in range(steps):
            wrapper(mm.hidden_batch(10 + step + rank, batch=1, length=8))
    if rank == 1:
        # Ranks never leave at the same instant: rank 0's worker is then still exchanging with
        # rank 1 while rank 0's interpreter finalises (where a daemon thread dies inside C++).
        time.sleep(0.3 * (steps + 1))
    # No synchronize(), no close(): the interpreter exits with the rebalance in flight.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(runs: int) -> int:
    bad = 0
    pending: list[tuple[int, int, int]] = []
    for run in range(runs):
        port = _free_port()
        for rank in range(2):
            pid = os.fork()
            if pid == 0:
                _rank(rank, port, run % 3)
                sys.exit(0)  # unwinds to the top level: a normal interpreter exit
            pending.append((run, rank, pid))
        if len(pending) >= 2 * PAIRS_AT_ONCE or run == runs - 1:
            for r, k, pid in pending:
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    bad += 1
                    print(f"run {r} rank {k}: exit status {code}", flush=True)
            pending = []
    print(f"bad {bad}", flush=True)
    return bad


if __name__ == "__main__":
    sys.exit(1 if main(int(sys.argv[1])) else 0)
