"""torch_p2p with real CUDA IPC and streams: two processes share one GPU (gloo control group), each
maps the other's slot storage and pulls experts with device copies on its worker's stream.

- ``auto`` picks torch_p2p for async; every slot holds its expert after async rebalances
  (replicas identical: each equals its logical expert), and the wrapped model's outputs equal the
  unwrapped model's at every step while the forward keeps running;
- sync and async executors through torch_p2p, with slot storages replaced between rounds (the
  peer maps the new ones), leave every slot holding its expert;
- a peer that dies (SIGKILL) or freezes (SIGSTOP) mid-transfer makes the survivor raise
  `EPLBError` within ``async_timeout_s``, never hang; the survivor's GPU stays usable and each of
  its layers holds a whole placement (old or new).

Skipped without CUDA. Legend: L layers, P physical slots, G ranks, S = P // G slots per rank.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

_TESTS_DIR = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(_TESTS_DIR / "distributed"), str(_TESTS_DIR)) if p not in sys.path]

import moe_models as mm  # noqa: E402
from harness import run_ranks, spawn_ranks  # noqa: E402
from test_p2p_ranks import _Recorder  # noqa: E402
from test_transfer import SHAPES, FakeExperts, L, P, expected, random_placement  # noqa: E402

from eplb import EPLBConfig, EPLBWrapper  # noqa: E402
from eplb.comm.base import dedicated_group, select_communicator  # noqa: E402
from eplb.errors import EPLBError  # noqa: E402
from eplb.executor import AsyncExecutor, SyncExecutor  # noqa: E402
from eplb.moe import find_moe_layers  # noqa: E402
from eplb.planner import Decision  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _one_gpu() -> torch.device:
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def _layers_hold_their_rows(layers, rank: int, world_size: int) -> bool:
    """Each layer's slots hold the experts of the phy2log row it last committed (FakeExperts)."""
    S = P // world_size
    return all(
        torch.equal(layer.tensors[n][j].cpu(), expected(layer.layer_index, int(layer.phy2log[rank * S + j]), n))
        for layer in layers for j in range(S) for n in SHAPES
    )


# ------------------------------------------------------------------------------- the wrapper
def _async_wrapper(rank: int, world_size: int):
    device = _one_gpu()
    records = _Recorder()
    logger = logging.getLogger("eplb")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    model = mm.build_reference_model(num_layers=3).to(device)
    reference = copy.deepcopy(model)
    logical = [
        {n: getattr(spec.experts, n).detach().clone() for n in spec.expert_tensors}
        for spec in find_moe_layers(reference)
    ]
    config = EPLBConfig(num_redundant_experts=4, step_interval=10_000, async_on_error="raise", async_timeout_s=60)
    wrapper = EPLBWrapper(model, config, ep_group=dist.group.WORLD)
    S = 12 // world_size
    step = 0

    def check_step() -> None:
        nonlocal step
        x = mm.hidden_batch(1000 * step + rank, batch=1, length=3 + 2 * rank + step % 4).to(device)
        torch.testing.assert_close(wrapper(x), reference(x), rtol=1e-5, atol=1e-5)
        step += 1

    in_flight, moved = [], []
    with torch.no_grad():
        for _ in range(2):
            for _ in range(3):
                check_step()
            old = wrapper.placement
            wrapper.rebalance()
            n = 0
            while wrapper.async_in_flight:
                check_step()
                n += 1
                assert n < 500, "the async rebalance did not finish"
            in_flight.append(n)
            moved.append(not wrapper.placement.equals(old))
            for layer in wrapper.eplb_layers:
                own = wrapper.placement.phy2log[layer.layer_index][rank * S : (rank + 1) * S].to(device)
                for name, slots in layer.slot_tensors().items():
                    assert torch.equal(slots, logical[layer.layer_index][name][own]), (layer.layer_index, name)
            check_step()
    chosen = [m for m in records.messages if m.startswith("communicator:")]
    wrapper.close()
    return {"chosen": chosen, "in_flight": in_flight, "moved": moved, "placement": wrapper.placement.phy2log.tolist()}


def test_async_p2p_rebalances_keep_outputs_and_fill_every_slot():
    outs = run_ranks(_async_wrapper, 2, timeout=240)
    assert len(outs[0]["chosen"]) == 1 and outs[0]["chosen"][0].startswith("communicator: torch_p2p"), outs[0]
    for out in outs:
        assert out["moved"][0], "the first rebalance of the skewed load moves experts"
        assert all(n >= 1 for n in out["in_flight"]), "forwards ran while rebalances were in flight"
    assert outs[0]["placement"] == outs[1]["placement"]


# ------------------------------------------------------------------------------- the executors
def _executors(rank: int, world_size: int, use_async: bool):
    device = _one_gpu()
    group = dist.group.WORLD
    comm = select_communicator("torch_p2p", use_async=use_async, device=device, group=group, timeout_s=60)
    control = dedicated_group(group, "gloo", 60) if use_async else None
    placements = [random_placement(70 + k, world_size) for k in range(3)]
    results = []
    for _ in range(2):  # fresh slot storages in the second round: peers map them anew
        layers = [FakeExperts(i, placements[0].phy2log[i], rank, world_size, device) for i in range(L)]
        for old, new in zip(placements, placements[1:]):
            if use_async:
                executor = AsyncExecutor(rank=rank, num_ranks=world_size, communicator=comm,
                                         max_transfer_bytes=1, timeout_s=60, on_error="raise",
                                         control_group=control)
                executor.begin(layers, old, lambda new=new: Decision.move_to(new))
                executor.drain()
                executor.close()
            else:
                SyncExecutor(rank=rank, num_ranks=world_size, communicator=comm,
                             max_transfer_bytes=1).rebalance(layers, old, new)
            torch.cuda.synchronize(device)
            results.append(all(torch.equal(layer.phy2log, new.phy2log[layer.layer_index]) for layer in layers)
                           and _layers_hold_their_rows(layers, rank, world_size))
    return results


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_every_slot_holds_its_expert_after_p2p_rebalances_on_one_gpu(use_async):
    outs = run_ranks(_executors, 2, use_async, timeout=240)
    assert all(all(o) and len(o) == 4 for o in outs), outs


# ------------------------------------------------------------------------------- faults
def _fault(rank: int, world_size: int, sig: int, timeout_s: float):
    device = _one_gpu()
    group = dist.group.WORLD
    comm = select_communicator("torch_p2p", use_async=True, device=device, group=group, timeout_s=timeout_s)
    control = dedicated_group(group, "gloo", timeout_s)
    pids: list = [None] * world_size
    dist.all_gather_object(pids, os.getpid())
    old, new = random_placement(90, world_size), random_placement(91, world_size)
    layers = [FakeExperts(i, old.phy2log[i], rank, world_size, device) for i in range(L)]
    if rank == 1:  # in its worker thread, at its second exchange: after posting its offer
        pull, calls = comm._pull, [0]

        def faulty_pull(into, stream, posted):
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), sig)
                time.sleep(120)
            return pull(into, stream, posted)

        comm._pull = faulty_pull
    executor = AsyncExecutor(rank=rank, num_ranks=world_size, communicator=comm, max_transfer_bytes=1 << 30,
                             timeout_s=timeout_s, on_error="raise", control_group=control)
    executor.begin(layers, old, lambda: Decision.move_to(new))
    start = time.monotonic()
    error = ""
    x = torch.randn(256, 256, device=device)
    try:
        for _ in range(100_000):  # steps with GPU work on the main stream, until the error
            x = torch.tanh(x @ x) * 0.5
            executor.on_step()
            time.sleep(0.005)
            if not executor.in_flight:
                break
    except EPLBError as exc:
        error = str(exc)
    elapsed = time.monotonic() - start
    torch.cuda.synchronize(device)  # the survivor's GPU work still completes: no stream waits on the dead peer
    whole = _layers_hold_their_rows(layers, rank, world_size)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pids[1], signal.SIGKILL)  # end a frozen peer; the test is over
    executor.close()
    return {"error": error, "elapsed": elapsed, "whole": whole}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "freezes"])
def test_a_peer_that_dies_or_freezes_mid_transfer_makes_the_survivor_raise(sig):
    timeout_s = 5.0
    results = spawn_ranks(_fault, 2, sig, timeout_s, timeout=120, grace_s=None)
    survivor = results[0]
    assert survivor.ok, survivor.error
    assert "async rebalance aborted" in survivor.value["error"], survivor.value
    assert survivor.value["elapsed"] < 3 * timeout_s + 10, survivor.value
    assert survivor.value["whole"], "every layer holds a whole placement (old or new)"
    assert results[1].exitcode == -signal.SIGKILL
