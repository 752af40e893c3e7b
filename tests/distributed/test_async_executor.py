"""AsyncExecutor over 2 and 4 gloo ranks with real worker threads: steps keep running while
weights move, the end state equals the sync executor's, and faults (a worker exception, a stuck
rank, a dead rank) end the rebalance on every rank within the timeout, leaving valid layers.

Legend: L layers, E logical experts, P physical slots, G ranks, S = P // G slots per rank.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks, spawn_ranks
from test_transfer import SHAPES, FakeExperts, L, P, expected, random_placement

from eplb.comm.base import dedicated_group, select_communicator
from eplb.errors import EPLBError
from eplb.executor import AsyncExecutor, SyncExecutor
from eplb.planner import Decision

pytestmark = pytest.mark.distributed


def _executor(rank, world_size, timeout_s=60.0, on_error="log", transfer_fn=None, layers_per_step=1):
    comm = select_communicator("auto", use_async=True, device="cpu", group=dist.group.WORLD, timeout_s=timeout_s)
    control = dedicated_group(dist.group.WORLD, "gloo", timeout_s)
    return AsyncExecutor(
        rank=rank, num_ranks=world_size, communicator=comm, max_transfer_bytes=1 << 20, timeout_s=timeout_s,
        layers_per_step=layers_per_step, on_error=on_error, control_group=control, transfer_fn=transfer_fn,
    )


def _layer_state(layers):
    return [{n: t.clone() for n, t in layer.tensors.items()} for layer in layers]


def _async_equals_sync(rank, world_size, seed):
    old, new = random_placement(seed, world_size), random_placement(seed + 1, world_size)
    executor = _executor(rank, world_size)
    layers = [FakeExperts(i, old.phy2log[i], rank, world_size) for i in range(L)]
    executor.begin(layers, old, lambda: Decision.move_to(new))
    steps, committed_per_step = 0, []
    while executor.in_flight:
        outcome = executor.on_step()  # stands for one forward step of the model
        steps += 1
        committed_per_step.append(len(outcome.committed))
        # A layer's maps and weights change together: each layer is wholly old or wholly new.
        for layer in layers:
            row = layer.phy2log
            S = row.numel() // world_size
            for j in range(S):
                e = int(row[rank * S + j])
                assert all(torch.equal(layer.tensors[n][j], expected(layer.layer_index, e, n)) for n in SHAPES)
        time.sleep(0.002)
    report = outcome.report
    async_state = _layer_state(layers)
    executor.close()

    sync_layers = [FakeExperts(i, old.phy2log[i], rank, world_size) for i in range(L)]
    comm = select_communicator("auto", use_async=False, device="cpu", group=dist.group.WORLD)
    sync_report = SyncExecutor(rank=rank, num_ranks=world_size, communicator=comm,
                               max_transfer_bytes=1 << 20).rebalance(sync_layers, old, new)
    same = all(torch.equal(a[n], b[n]) for a, b in zip(async_state, _layer_state(sync_layers)) for n in SHAPES)
    return {
        "steps": steps, "max_commits": max(committed_per_step), "same_as_sync": same,
        "placement_ok": outcome.placement.equals(new), "report": report, "sync_report": sync_report,
    }


@pytest.mark.parametrize("world_size", [2, 4])
def test_async_rebalance_runs_beside_steps_and_equals_sync(world_size):
    outs = run_ranks(_async_equals_sync, world_size, 7 * world_size, timeout=120)
    for o in outs:
        assert o["same_as_sync"] and o["placement_ok"]
        assert o["steps"] >= L, "one layer is committed per step at most"
        assert o["max_commits"] == 1
        r, s = o["report"], o["sync_report"]
        assert not r.skipped
        assert (r.layers, r.slots_changed, r.network_transfers, r.bytes_moved) == (
            s.layers, s.slots_changed, s.network_transfers, s.bytes_moved)
    assert len({o["steps"] for o in outs}) == 1, "every rank finishes at the same step"


def _worker_error(rank, world_size, on_error):
    old, new = random_placement(3, world_size), random_placement(4, world_size)

    def plan():
        if rank == 1:
            raise RuntimeError("policy exploded on rank 1")
        return Decision.move_to(new)

    executor = _executor(rank, world_size, on_error=on_error)
    layers = [FakeExperts(i, old.phy2log[i], rank, world_size) for i in range(L)]
    before = _layer_state(layers)
    executor.begin(layers, old, plan)
    steps = 0
    try:
        while executor.in_flight:
            outcome = executor.on_step()
            steps += 1
            time.sleep(0.002)
        result = ("report", outcome.report.reason, steps)
    except EPLBError as exc:
        result = ("raised", str(exc), steps)
    unchanged = all(torch.equal(b[n], layer.tensors[n]) for b, layer in zip(before, layers) for n in SHAPES)
    executor.close()
    return result, unchanged


@pytest.mark.parametrize("on_error", ["log", "raise"])
def test_worker_exception_aborts_on_every_rank(on_error):
    outs = run_ranks(_worker_error, 2, on_error, timeout=120)
    (kind0, msg0, steps0), unchanged0 = outs[0]
    (kind1, msg1, steps1), unchanged1 = outs[1]
    assert unchanged0 and unchanged1, "nothing was committed: every layer keeps the old placement"
    assert steps0 == steps1
    if on_error == "raise":
        assert kind0 == kind1 == "raised"
        assert "policy exploded on rank 1" in msg1 and "Traceback" in msg1
        assert "worker on rank 1 failed" in msg0
    else:
        assert kind0 == kind1 == "report"
        assert "aborted" in msg0 and "policy exploded" in msg1


def _stuck_rank(rank, world_size, timeout_s):
    old, new = random_placement(5, world_size), random_placement(6, world_size)
    changed = [i for i in range(L) if not torch.equal(old.phy2log[i], new.phy2log[i])]

    def transfer(layer, plan, slot_tensors, staging):
        if rank == 1 and layer.layer_index == changed[1]:
            time.sleep(timeout_s + 3)  # stuck: the others must give up on their own
        from eplb.transfer import execute_layer_transfer

        execute_layer_transfer(plan, slot_tensors, staging, comm, 1 << 20)

    executor = _executor(rank, world_size, timeout_s=timeout_s, transfer_fn=transfer)
    comm = executor.communicator
    layers = [FakeExperts(i, old.phy2log[i], rank, world_size) for i in range(L)]
    executor.begin(layers, old, lambda: Decision.move_to(new))
    t0 = time.monotonic()
    while executor.in_flight:
        outcome = executor.on_step()
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    rows = [layer.phy2log.clone() for layer in layers]
    S = P // world_size
    consistent = all(
        torch.equal(layer.tensors[n][j], expected(layer.layer_index, int(layer.phy2log[rank * S + j]), n))
        for layer in layers for n in SHAPES for j in range(S)
    )
    return outcome.report.reason, elapsed, rows, outcome.placement.phy2log, consistent, changed


def test_stuck_rank_times_out_with_a_valid_mixed_placement():
    timeout_s = 3.0
    outs = run_ranks(_stuck_rank, 2, timeout_s, timeout=120)
    old, new = random_placement(5, 2), random_placement(6, 2)
    for reason, elapsed, rows, placement, consistent, changed in outs:
        # Either the executor's own stall check or the communicator's timeout (also
        # async_timeout_s) fires first; both abort on every rank at the same step.
        assert "async_timeout_s" in reason or "timed out" in reason or "failed" in reason, reason
        assert elapsed < timeout_s + 10
        assert consistent, "each slot holds the expert its map names"
        # The first changed layer was committed; the stuck one and later ones kept the old row.
        assert torch.equal(rows[changed[0]], new.phy2log[changed[0]])
        for i in changed[1:]:
            assert torch.equal(rows[i], old.phy2log[i])
        assert torch.equal(placement, torch.stack(rows))


def _dying_rank(rank, world_size, timeout_s):
    old, new = random_placement(8, world_size), random_placement(9, world_size)

    def transfer(layer, plan, slot_tensors, staging):
        if rank == 1:
            os._exit(17)  # the process dies in the middle of the rebalance
        from eplb.transfer import execute_layer_transfer

        execute_layer_transfer(plan, slot_tensors, staging, comm, 1 << 20)

    executor = _executor(rank, world_size, timeout_s=timeout_s, transfer_fn=transfer)
    comm = executor.communicator
    layers = [FakeExperts(i, old.phy2log[i], rank, world_size) for i in range(L)]
    executor.begin(layers, old, lambda: Decision.move_to(new))
    t0 = time.monotonic()
    try:
        while executor.in_flight:
            executor.on_step()
            time.sleep(0.01)
        return "finished", time.monotonic() - t0
    except EPLBError as exc:
        return str(exc), time.monotonic() - t0


def test_dead_rank_does_not_hang_the_survivors():
    timeout_s = 5.0
    results = spawn_ranks(_dying_rank, 2, timeout_s, timeout=90, grace_s=None)
    assert results[1].exitcode == 17
    survivor = results[0]
    assert survivor.ok, survivor.error
    message, elapsed = survivor.value
    assert "aborted" in message or "did not answer" in message
    assert elapsed < timeout_s + 15
