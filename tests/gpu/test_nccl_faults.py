"""A dead or frozen peer with an NCCL EP group: PyTorch's NCCL watchdog ends the survivor's
process within ``async_timeout_s`` (which eplb sets as the EP group's timeout when it wraps) plus
PyTorch's wait for flight-recorder dumps, and never leaves it waiting for torch's default
30-minute timeout.

Two ranks wrap a small MoE model with ``ep_group`` = the NCCL world; rank 1 freezes (``SIGSTOP``)
or dies (``SIGKILL``) in the middle of a forward, between two MoE layers, so rank 0 waits in the
next layer's dispatch all-to-all (its main thread blocked reading the split sizes on the host).
Expected on rank 0: the watchdog sees the collective time out (or, for a dead peer, NCCL reports
the lost connection), then ``std::terminate`` ends the process with ``SIGABRT`` (PyTorch's default
``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``), within ``TIMEOUT_S + dump wait + MARGIN_S`` of the start
of that forward. The forward never returns. A dead peer may instead surface first as an error of
the forward's own CUDA or NCCL call (the peer's memory is gone): then the forward raises and the
process exits with an error, within the same bound.

Runs with 2 GPUs (rank ``r`` on ``cuda:r``) and with 1 GPU shared by both ranks. NCCL refuses two
ranks of one communicator on one GPU ("Duplicate GPU detected"), so on one GPU each rank gets its
own ``NCCL_HOSTID``: NCCL then sees two hosts and connects them through its socket transport on
the loopback interface, which is all this test needs. ``python -m pytest -q
tests/gpu/test_nccl_faults.py``; each case takes about 20-30 s.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

_TESTS_DIR = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(_TESTS_DIR / "distributed"), str(_TESTS_DIR)) if p not in sys.path]

from harness import free_port  # noqa: E402

TIMEOUT_S = 3.0  # async_timeout_s: the EP group's collectives time out after it
DUMP_WAIT_MS = 500  # TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC; PyTorch waits up to 4x it before ending the process
MARGIN_S = 15.0  # the watchdog's polling, its logging, the abort, a busy machine
FREEZE_STEP = 3  # rank 1 freezes or dies in this forward, before its second MoE layer
DEADLINE_S = 90.0  # a survivor still running this long after its forward began: hung

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _rank_env(rank: int, shared_gpu: bool) -> dict[str, str]:
    env = {**NO_MULTICAST, "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": str(DUMP_WAIT_MS), "NCCL_DEBUG": "WARN"}
    if shared_gpu:
        env.update({
            "NCCL_HOSTID": f"eplb-nccl-fault-rank-{rank}",  # two "hosts": no duplicate-GPU refusal
            "NCCL_NET": "Socket",  # NCCL's own socket transport between the two "hosts", on loopback
            "NCCL_IB_DISABLE": "1",
            "NCCL_SOCKET_IFNAME": "lo",
            "NCCL_MNNVL_ENABLE": "0",
        })
    return env


def _mark(out_dir: str, rank: int, line: str) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.marks"), "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rank_main(rank: int, port: int, shared_gpu: bool, how: str, out_dir: str) -> None:
    """One rank: wrap, step, and (rank 1) freeze or die in the middle of forward FREEZE_STEP."""
    log = os.open(os.path.join(out_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)  # PyTorch's and NCCL's messages, for the assertion message
    os.environ.update(_rank_env(rank, shared_gpu))
    import moe_models as mm
    import torch.distributed as dist

    from eplb import EPLBConfig, EPLBWrapper

    device = torch.device("cuda", 0 if shared_gpu else rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    dist.all_reduce(torch.ones(1, device=device))  # the communicator exists before the timeout shrinks
    model = mm.build_reference_model(num_layers=2).to(device)
    config = EPLBConfig(num_redundant_experts=4, use_async=False, step_interval=10_000, async_timeout_s=TIMEOUT_S)
    wrapper = EPLBWrapper(model, config, ep_group=dist.group.WORLD)
    steps = {"n": 0}

    def fault(module, args) -> None:
        if rank == 1 and steps["n"] == FREEZE_STEP:
            _mark(out_dir, rank, f"{how} {time.monotonic()}")
            os.kill(os.getpid(), signal.SIGSTOP if how == "frozen" else signal.SIGKILL)

    model.blocks[1].register_forward_pre_hook(fault)
    with torch.no_grad():
        for step in range(FREEZE_STEP + 1):
            steps["n"] = step
            x = mm.hidden_batch(100 * step + rank, batch=1, length=5).to(device)
            if step == FREEZE_STEP:
                _mark(out_dir, rank, f"start {time.monotonic()}")
            try:
                wrapper(x)
                torch.cuda.synchronize(device)
            except BaseException:
                _mark(out_dir, rank, f"raised {time.monotonic()}")  # the traceback goes to the log
                raise
    _mark(out_dir, rank, f"returned {time.monotonic()}")


def _marks(out_dir: str, rank: int) -> dict[str, float]:
    path = os.path.join(out_dir, f"rank{rank}.marks")
    if not os.path.exists(path):
        return {}
    return {k: float(v) for k, v in (line.split() for line in Path(path).read_text().splitlines() if line)}


def _log_tail(out_dir: str, rank: int, lines: int = 25) -> str:
    path = os.path.join(out_dir, f"rank{rank}.log")
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:]) if os.path.exists(path) else ""


def _run_pair(shared_gpu: bool, how: str) -> dict:
    """Spawn both ranks; wait for rank 0 to end (or DEADLINE_S after its faulty forward began)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="eplb-nccl-faults-") as out_dir:
        procs = [ctx.Process(target=_rank_main, args=(r, port, shared_gpu, how, out_dir), daemon=False)
                 for r in range(2)]
        for p in procs:
            p.start()
        survivor = procs[0]
        setup_deadline = time.monotonic() + 120  # spawn, CUDA and NCCL start-up, three steps
        ended_at = None
        while True:
            multiprocessing.connection.wait([survivor.sentinel], timeout=0.05)
            now = time.monotonic()
            if not survivor.is_alive():
                ended_at = now
                break
            start = _marks(out_dir, 0).get("start")
            if (start is not None and now > start + DEADLINE_S) or (start is None and now > setup_deadline):
                break
        for p in procs:  # the frozen rank, or a hung survivor
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        marks = [_marks(out_dir, r) for r in range(2)]
        return {
            "exitcode": survivor.exitcode if ended_at is not None else None,
            "seconds": None if ended_at is None or "start" not in marks[0] else ended_at - marks[0]["start"],
            "marks": marks, "log": _log_tail(out_dir, 0), "peer_log": _log_tail(out_dir, 1, 10),
        }


_SETUPS = [
    pytest.param(True, id="one-gpu-shared",
                 marks=pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a GPU")),
    pytest.param(False, id="two-gpus",
                 marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 GPUs")),
]


@pytest.mark.parametrize("how", ["frozen", "killed"])
@pytest.mark.parametrize("shared_gpu", _SETUPS)
def test_the_nccl_watchdog_ends_the_survivor_within_the_timeout_when_its_peer_freezes_or_dies(shared_gpu, how):
    result = _run_pair(shared_gpu, how)
    survivor, peer = result["marks"]
    context = f"{result}"
    assert "start" in survivor, f"rank 0 never reached forward {FREEZE_STEP}: {context}"
    assert how in peer, f"rank 1 was not {how} in forward {FREEZE_STEP}: {context}"
    assert "returned" not in survivor, f"rank 0's forward returned although rank 1 was {how}: {context}"
    assert result["exitcode"] is not None, f"rank 0 still ran {DEADLINE_S} s after its forward began: {context}"
    if how == "killed" and "raised" in survivor:
        # A dead peer may surface first as an error of the forward's own CUDA or NCCL call
        # (its memory is gone): the forward raises and the process exits with an error.
        assert result["exitcode"] != 0, context
    else:
        assert result["exitcode"] == -signal.SIGABRT, f"rank 0 did not end by the watchdog's SIGABRT: {context}"
    bound = TIMEOUT_S + 4 * DUMP_WAIT_MS / 1000 + MARGIN_S
    took = result["seconds"]
    assert took < bound, f"rank 0 ended {took:.1f} s after its forward began (> {bound} s): {context}"
