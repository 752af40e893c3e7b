"""The torch_p2p protocol over 2 and 4 gloo ranks on the CPU (`p2p_shm`: the communicator's own
code with CPU shared memory in place of CUDA IPC; tests/gpu runs it with CUDA IPC):

- every slot holds its expert after chains of rebalances, replicas identical, each layer in one
  exchange; each peer storage is mapped once, and a freed storage is retired and re-exported;
- async rebalances through it keep the wrapped model's outputs equal to the unwrapped model at
  every step;
- mismatched sends and receives make both ranks raise at once; a peer that dies or freezes
  mid-transfer makes the survivor raise `CommunicationError` within ``timeout_s``, never hang.

Legend: L layers, E logical experts, P physical slots, G ranks, S = P // G slots per rank.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import signal
import time

import moe_models as mm
import p2p_shm
import pytest
import torch
import torch.distributed as dist
from harness import run_ranks, spawn_ranks
from test_transfer import SHAPES, FakeExperts, L, P, expected, random_placement

from eplb import EPLBConfig, EPLBWrapper
from eplb.comm.base import CommunicationError, select_communicator
from eplb.executor import SyncExecutor

pytestmark = pytest.mark.distributed


def _slots_hold(layers, placement, rank: int, world_size: int) -> bool:
    S = P // world_size
    return all(
        torch.equal(layer.tensors[n][j], expected(layer.layer_index, int(placement.phy2log[layer.layer_index,
                                                                                          rank * S + j]), n))
        for layer in layers for j in range(S) for n in SHAPES
    )


def _chain_on_rank(rank: int, world_size: int, seed: int):
    p2p_shm.register()
    comm = select_communicator(p2p_shm.NAME, use_async=False, device="cpu", group=dist.group.WORLD, timeout_s=60)
    probe_opens = len(comm.opened)
    executions = []
    execute = comm.execute
    comm.execute = lambda: (executions.append(1), execute())[1]
    placements = [random_placement(seed + k, world_size) for k in range(4)]
    layers = [FakeExperts(i, placements[0].phy2log[i], rank, world_size) for i in range(L)]
    p2p_shm.share_slots(layers)
    # max_transfer_bytes=1 would split gloo's exchanges per expert: torch_p2p moves a layer at once.
    executor = SyncExecutor(rank=rank, num_ranks=world_size, communicator=comm, max_transfer_bytes=1)
    ok, changed_layers = [], 0
    for old, new in zip(placements, placements[1:]):
        executor.rebalance(layers, old, new)
        ok.append(_slots_hold(layers, new, rank, world_size))
        changed_layers += sum(not torch.equal(old.phy2log[i], new.phy2log[i]) for i in range(L))
    opens, rounds_executions = comm.opened[probe_opens:], len(executions)
    # Fresh slot storages (the old ones freed): the peers must map the new ones, not reuse stale maps.
    fresh = [FakeExperts(i, placements[-1].phy2log[i], rank, world_size) for i in range(L)]
    p2p_shm.share_slots(fresh)
    del layers
    executor.rebalance(fresh, placements[-1], placements[0])
    ok.append(_slots_hold(fresh, placements[0], rank, world_size))
    return {
        "ok": ok, "executions": rounds_executions, "changed_layers": changed_layers, "opens": opens,
        "reopens": len(comm.opened) - probe_opens - len(opens), "mapped_now": len(comm._imports),
    }


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_slot_holds_its_expert_after_p2p_rebalances(world_size):
    outs = run_ranks(_chain_on_rank, world_size, 30 + world_size, timeout=180)
    storages = L * len(SHAPES)  # slot tensors per rank
    for o in outs:
        assert all(o["ok"]), o["ok"]
        assert o["executions"] <= o["changed_layers"], "one exchange per layer, whatever max_transfer_bytes"
        assert len(o["opens"]) == len({tuple(h) for h in o["opens"]}), "each peer storage is mapped once"
        assert len(o["opens"]) <= storages * (world_size - 1)
        assert 0 < o["reopens"] <= storages * (world_size - 1), "replaced storages are mapped anew"
        # Retired mappings are dropped once the sender's next offer says so: what stays mapped is
        # bounded by the peers' live storages (plus the probe's and the last round's not yet retired).
        assert o["mapped_now"] <= 2 * storages * (world_size - 1) + 1


def _async_wrapper_on_rank(rank: int, world_size: int):
    p2p_shm.register()
    reference = mm.build_reference_model(num_layers=3)
    config = EPLBConfig(num_redundant_experts=4, step_interval=10_000, communicator=p2p_shm.NAME,
                        async_on_error="raise", async_timeout_s=60)
    wrapper = EPLBWrapper(copy.deepcopy(reference), config, ep_group=dist.group.WORLD)
    p2p_shm.share_slots(wrapper.eplb_layers)
    steps_in_flight = 0
    with torch.no_grad():
        for seed in range(3):
            wrapper(mm.hidden_batch(10 * seed + rank, batch=1, length=6 + 3 * rank))
        for round_ in range(2):
            old = wrapper.placement
            wrapper.rebalance()
            step = 0
            while wrapper.async_in_flight:
                x = mm.hidden_batch(500 + 100 * round_ + 10 * step + rank, batch=1, length=4 + rank)
                torch.testing.assert_close(wrapper(x), reference(x))
                steps_in_flight += 1
                step += 1
                assert step < 500
            assert not wrapper.placement.equals(old), "the rebalance must move experts"
            x = mm.hidden_batch(999 + rank, batch=1, length=7)
            torch.testing.assert_close(wrapper(x), reference(x))
    name = type(wrapper._executor.communicator).name
    wrapper.close()
    return name, steps_in_flight


def test_async_p2p_outputs_equal_unwrapped_at_every_step():
    outs = run_ranks(_async_wrapper_on_rank, 2, timeout=300)
    assert all(name == p2p_shm.NAME and steps >= 2 for name, steps in outs)


def _mismatch_on_rank(rank: int, world_size: int):
    p2p_shm.register()
    comm = select_communicator(p2p_shm.NAME, use_async=False, device="cpu", group=dist.group.WORLD, timeout_s=60)
    if rank == 0:
        comm.add_send([torch.arange(4.0)], 1)
    else:
        comm.add_recv([torch.zeros(5)], 0)
    start = time.monotonic()
    with pytest.raises(CommunicationError) as info:
        comm.execute()
    return str(info.value), time.monotonic() - start


def test_mismatched_send_and_receive_raise_on_both_ranks_at_once():
    (sender, t0), (receiver, t1) = run_ranks(_mismatch_on_rank, 2, timeout=120)
    assert "same shapes and dtypes" in receiver and "rank 0 sends tensors [((4,), torch.float32)]" in receiver
    assert "receivers of rank 0 failed" in sender and "same shapes and dtypes" in sender
    assert max(t0, t1) < 30, "an error ack, not the 60 s timeout"


class _Fault:
    """Make rank 1 die (SIGKILL) or freeze (SIGSTOP) when it pulls at its ``at``-th exchange: it has
    posted its own offer, rank 0 waits for its ack."""

    def __init__(self, comm, sig: int, at: int):
        pull = comm._pull
        calls = [0]

        def faulty_pull(into, stream, posted):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), sig)
                time.sleep(60)  # SIGKILL ends the process; SIGSTOP stops it here
            return pull(into, stream, posted)

        comm._pull = faulty_pull


def _peer_fault_on_rank(rank: int, world_size: int, sig: int, timeout_s: float):
    p2p_shm.register()
    comm = select_communicator(p2p_shm.NAME, use_async=False, device="cpu", group=dist.group.WORLD,
                               timeout_s=timeout_s)
    pids: list = [None] * world_size
    dist.all_gather_object(pids, os.getpid())
    if rank == 1:
        _Fault(comm, sig, at=2)
    peer = 1 - rank
    for k in range(2):  # the first exchange works; rank 1 faults in the second
        src = torch.full((1000,), float(10 * rank + k))
        src.share_memory_()
        dst = torch.zeros(1000)
        comm.add_send([src], peer)
        comm.add_recv([dst], peer)
        start = time.monotonic()
        try:
            comm.execute()
        except CommunicationError as exc:
            elapsed = time.monotonic() - start
            with contextlib.suppress(ProcessLookupError):  # a frozen peer: end it here, the test is over
                os.kill(pids[1], signal.SIGKILL)
            return {"exchange": k, "elapsed": elapsed, "error": str(exc)}
        assert torch.equal(dst, torch.full((1000,), float(10 * peer + k)))
    return {"exchange": None}


@pytest.mark.parametrize("sig, timeout_s", [(signal.SIGKILL, 4.0), (signal.SIGSTOP, 4.0)], ids=["dies", "freezes"])
def test_a_peer_that_dies_or_freezes_mid_transfer_makes_the_survivor_raise(sig, timeout_s):
    results = spawn_ranks(_peer_fault_on_rank, 2, sig, timeout_s, timeout=90, grace_s=None)
    survivor = results[0]
    assert survivor.ok, survivor.error
    assert survivor.value["exchange"] == 1, survivor.value
    assert "torch_p2p" in survivor.value["error"]
    assert survivor.value["elapsed"] < timeout_s + 10, "raised within the timeout"
    assert results[1].exitcode == -signal.SIGKILL


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _auto_on_rank(rank: int, world_size: int, verdict: str, probe_fails: bool):
    """``auto`` for async CUDA tensors, with the host check's verdict and the constructor's probe
    replaced (no GPU here): which communicator it builds, and what rank 0 logs."""
    import eplb.comm.p2p as p2p
    from eplb.comm import register_communicator
    from eplb.comm.base import Communicator
    from eplb.errors import EPLBError

    p2p.peer_to_peer_support = lambda group, device: verdict

    gloo_groups = []

    class Fake(Communicator):
        def __init__(self, *, group, device, timeout_s, gloo_group=None):
            gloo_groups.append(gloo_group)
            if self.name == "torch_p2p" and probe_fails:
                raise EPLBError("communicator 'torch_p2p' cannot read peer memory with CUDA IPC here (rank 1: boom)")
            super().__init__(group=group, device="cpu", timeout_s=timeout_s)

        def _exchange(self, sends, recvs):
            pass

    register_communicator("torch_p2p", override=True)(type("FakeP2P", (Fake,), {"name": "torch_p2p"}))
    register_communicator("torch_gloo", override=True)(type("FakeGloo", (Fake,), {"name": "torch_gloo"}))
    records = _Recorder()
    logger = logging.getLogger("eplb")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    comm = select_communicator("auto", use_async=True, device="cuda", group=dist.group.WORLD, timeout_s=30)
    # Whatever is built, the same one dedicated gloo group: every process creates the same groups.
    assert gloo_groups and all(g is not None and g is gloo_groups[0] for g in gloo_groups), gloo_groups
    sync = select_communicator("auto", use_async=False, device="cpu", group=dist.group.WORLD, timeout_s=30)
    return comm.name, sync.name, records.messages


@pytest.mark.parametrize(
    "verdict, probe_fails, chosen, why",
    [
        ("", False, "torch_p2p", "every rank of the EP group is on one host with peer access"),
        ("the EP group spans 2 hosts (n0, n1); peer-to-peer copies need one host", False, "torch_gloo",
         "staged through pinned host memory: the EP group spans 2 hosts"),
        ("", True, "torch_gloo", "cannot read peer memory with CUDA IPC here \\(rank 1: boom\\)"),
    ],
    ids=["one-host", "two-hosts", "ipc-fails"],
)
def test_auto_picks_p2p_for_async_on_one_host_and_logs_why(verdict, probe_fails, chosen, why):
    outs = run_ranks(_auto_on_rank, 2, verdict, probe_fails, timeout=120)
    for rank, (name, sync_name, messages) in enumerate(outs):
        assert name == chosen and sync_name == "torch_gloo"
        logged = [m for m in messages if m.startswith("communicator:")]
        assert len(logged) == (2 if rank == 0 else 0)
    assert re.search(rf"communicator: {chosen} \(requested 'auto', use_async=True.*\): .*{why}", outs[0][2][0])


def _cpu_support_on_rank(rank: int, world_size: int):
    from eplb.comm.p2p import peer_to_peer_support

    return peer_to_peer_support(dist.group.WORLD, "cpu")


def test_peer_copies_are_refused_for_cpu_experts_on_every_rank():
    assert run_ranks(_cpu_support_on_rank, 2, timeout=60) == ["rank 0 holds its experts on the CPU; "
                                                              "peer-to-peer copies move GPU memory"] * 2


def _many_on_rank(rank: int, world_size: int):
    from eplb.comm.base import dedicated_group
    from eplb.comm.gloo import TorchGlooCommunicator

    p2p_shm.register()
    # Both communicators share one dedicated gloo group handed to them (as "auto" does).
    gloo_group = dedicated_group(dist.group.WORLD, "gloo", 60)
    comm = p2p_shm.ShmP2PCommunicator(group=dist.group.WORLD, device="cpu", timeout_s=60, gloo_group=gloo_group)
    staged = TorchGlooCommunicator(group=dist.group.WORLD, device="cpu", timeout_s=60, gloo_group=gloo_group)
    assert comm._pg is gloo_group and staged._pg is gloo_group
    peer = 1 - rank
    src = torch.arange(600, dtype=torch.float64) + 1000 * rank
    src.share_memory_()
    dst = torch.zeros(600, dtype=torch.float64)
    comm.add_send([src[i] for i in range(600)], peer)  # an offer of 600 views: larger than one message head
    comm.add_recv([dst[i] for i in range(600)], peer)
    comm.execute()
    return torch.equal(dst, torch.arange(600, dtype=torch.float64) + 1000 * peer)


def test_an_offer_of_many_tensors_arrives_whole():
    assert run_ranks(_many_on_rank, 2, timeout=120) == [True, True]
