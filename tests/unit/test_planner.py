"""The planner (one decision for wrapper, async worker and simulator), the executor protocol and
the runtime's topology.

Legend: L layers, E logical experts, P physical slots, G ranks.
"""

from __future__ import annotations

import pytest
import torch

from eplb import EPLBConfig, EPLBError, Placement
from eplb.comm.base import LocalCommunicator
from eplb.executor import AsyncExecutor, Executor, SyncExecutor
from eplb.metrics import predicted_gain
from eplb.moe import EPLBExperts, SlotLayer, SwiGLUExperts
from eplb.planner import Decision, PlanOptions, plan
from eplb.policies import get_policy
from eplb.runtime import Topology, build_runtime

L, E, P, G = 2, 8, 12, 4


def _skewed_load() -> torch.Tensor:
    load_LE = torch.ones(L, E, dtype=torch.float64)
    load_LE[:, 0] = 50.0
    return load_LE


def test_plan_returns_the_policy_placement_and_its_gain():
    old = Placement.initial(L, E, P, G)
    load_LE = _skewed_load()
    decision = plan(load_LE, old, "default", Topology.offline(G), PlanOptions())
    expected = get_policy("default")(load_LE, num_physical=P, num_groups=1, num_nodes=1, num_ranks=G, old=old)
    assert decision.new is decision.proposed and decision.new.equals(expected)
    assert decision.gain == predicted_gain(load_LE, old, expected, G) and decision.gain > 0
    assert not decision.skipped and decision.skip_reason == "" and decision.seconds >= 0


def test_plan_skips_an_empty_window_without_calling_the_policy():
    calls = []

    def policy(*args, **kwargs):
        calls.append(1)

    decision = plan(torch.zeros(L, E), Placement.initial(L, E, P, G), policy, Topology.offline(G))
    assert decision.skipped and "no load" in decision.skip_reason
    assert decision.proposed is None and decision.gain is None and calls == []


def test_plan_skips_below_min_improvement_and_keeps_the_proposal():
    old = Placement.initial(L, E, P, G)
    decision = plan(_skewed_load(), old, "default", Topology.offline(G), PlanOptions(min_improvement=0.99))
    assert decision.skipped and decision.proposed is not None
    assert "min_improvement 0.99" in decision.skip_reason and decision.gain < 0.99


def test_plan_passes_the_policy_options_and_honours_the_budget():
    old = Placement.initial(L, E, P, G)
    options = PlanOptions(policy_options=EPLBConfig(migration_budget=0.25, refine=True).policy_options())
    decision = plan(_skewed_load(), old, "default", Topology.offline(G), options)
    expected = get_policy("default")(_skewed_load(), num_physical=P, num_ranks=G, old=old,
                                     migration_budget=0.25, refine=True)
    assert decision.new.equals(expected)
    per_rank = P // G
    for layer in range(L):
        moved = sum(
            int(e) not in old.phy2log[layer, (s // per_rank) * per_rank:(s // per_rank + 1) * per_rank].tolist()
            for s, e in enumerate(decision.new.phy2log[layer].tolist())
        )
        assert moved <= 0.25 * P


def test_plan_passes_policy_errors_through():
    with pytest.raises(EPLBError, match="unknown policy"):
        plan(_skewed_load(), Placement.initial(L, E, P, G), "nope", Topology.offline(G))


def test_decision_is_frozen():
    decision = Decision.move_to(Placement.initial(L, E, P, G))
    with pytest.raises(AttributeError):
        decision.new = None


def test_both_executors_follow_one_protocol_and_the_layer_its_contract():
    sync = SyncExecutor(rank=0, num_ranks=1, communicator=LocalCommunicator(), max_transfer_bytes=1)
    asynchronous = AsyncExecutor(rank=0, num_ranks=1, communicator=LocalCommunicator(), max_transfer_bytes=1,
                                 timeout_s=1.0)
    assert isinstance(sync, Executor) and isinstance(asynchronous, Executor)
    experts = SwiGLUExperts(E, 4, 6)
    layer = EPLBExperts(experts, ("gate_up_proj", "down_proj"), layer_index=0, phy2log=torch.arange(E))
    assert isinstance(layer, SlotLayer)
    asynchronous.close()


def test_sync_begin_then_drain_applies_the_decision():
    old = Placement.initial(1, E, E, 1)
    experts = SwiGLUExperts(E, 4, 6)
    layer = EPLBExperts(experts, ("gate_up_proj", "down_proj"), layer_index=0, phy2log=old.phy2log[0])
    new = Placement.from_phy2log(old.phy2log.flip(1), E)
    executor = SyncExecutor(rank=0, num_ranks=1, communicator=LocalCommunicator(), max_transfer_bytes=1 << 20)
    executor.begin([layer], old, lambda: Decision.move_to(new))
    assert executor.in_flight
    outcome = executor.drain()
    assert not executor.in_flight and outcome.committed == (0,)
    assert outcome.placement.equals(new) and torch.equal(layer.placement_row(), new.phy2log[0])
    assert outcome.report.layers == 1 and outcome.decision.new is new


def test_one_process_topology_and_runtime():
    topology = Topology.from_group(None, num_nodes=1)
    assert (topology.group, topology.rank, topology.num_ranks, topology.control_group) == (None, 0, 1, None)
    runtime = build_runtime(topology, EPLBConfig(use_async=False), num_layers=L, num_logical=E,
                            device=torch.device("cpu"))
    assert isinstance(runtime.executor, SyncExecutor) and runtime.communicator.name == "local"
    assert runtime.tracker.num_layers == L and runtime.tracker.num_logical == E
    with pytest.raises(AttributeError):
        topology.rank = 1
