"""Transfer plan examples, the local communicator, communicator selection and the sync executor
on one rank (with a small fake layer implementing the EPLBExperts contract)."""

import logging

import pytest
import torch

from eplb.comm import available_communicators, get_communicator
from eplb.comm.base import LocalCommunicator, select_communicator
from eplb.errors import EPLBError
from eplb.executor import RebalanceReport, SyncExecutor
from eplb.moe.slot_layer import SlotStorage
from eplb.placement import Placement
from eplb.transfer import (
    LocalCopy,
    NetworkTransfer,
    bytes_per_expert,
    execute_layer_transfer,
    plan_layer_transfer,
)


def code(layer: int, expert: int, param: int) -> int:
    return layer * 10_000 + expert * 10 + param


class FakeExperts(SlotStorage):
    """The slot-storage half of the EPLBExperts contract, with weights that encode (layer, expert, param)."""

    SHAPES = {"w_up": ((3, 4), torch.float32), "bias": ((3,), torch.float64), "scale": ((), torch.int32)}

    def __init__(self, layer_index: int, phy2log_P: torch.Tensor, rank: int, num_ranks: int):
        self.layer_index = layer_index
        self.rank = rank
        self.slots_per_rank = phy2log_P.numel() // num_ranks
        self.phy2log = phy2log_P.clone()
        S = self.slots_per_rank
        self.tensors = {n: torch.zeros(S, *shape, dtype=dt) for n, (shape, dt) in self.SHAPES.items()}
        self.storage = {n: t.data_ptr() for n, t in self.tensors.items()}
        for j in range(self.slots_per_rank):
            for p, name in enumerate(sorted(self.tensors)):
                self.tensors[name][j] = self.expected(name, int(phy2log_P[rank * self.slots_per_rank + j]), p)

    def expected(self, name: str, expert: int, param: int) -> torch.Tensor:
        shape, dtype = self.SHAPES[name]
        n = torch.Size(shape).numel()
        return (code(self.layer_index, expert, param) * 100 + torch.arange(n)).reshape(shape).to(dtype)

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def commit(self, phy2log_P, staged, slots) -> None:
        with torch.no_grad():
            for name, t in self.tensors.items():
                t[slots] = staged[name][slots]
        self.phy2log.copy_(phy2log_P)

    def placement_row(self) -> torch.Tensor:
        return self.phy2log.clone()

    def apply_commit(self, prepared, staged) -> None:
        self.commit(prepared.row_P, staged, torch.tensor(prepared.slot_list, dtype=torch.int64))

    def check(self) -> None:
        for j in range(self.slots_per_rank):
            expert = int(self.phy2log[self.rank * self.slots_per_rank + j])
            for p, name in enumerate(sorted(self.tensors)):
                assert torch.equal(self.tensors[name][j], self.expected(name, expert, p)), (name, j, expert)


def row(*experts):
    return torch.tensor(experts, dtype=torch.int64)


# ---------------------------------------------------------------------------------------- plan
def test_unchanged_placement_moves_nothing():
    plan = plan_layer_transfer(row(0, 1, 2, 3), row(0, 1, 2, 3), rank=0, num_ranks=2)
    assert plan.moves_nothing and plan.transfers == () and plan.copies == () and plan.changed_local == ()
    assert plan.bytes_moved(100) == 0


def test_swap_between_ranks_crosses_the_network_both_ways():
    # rank 0: slots 0,1; rank 1: slots 2,3. Experts 1 and 2 trade places.
    plan = plan_layer_transfer(row(0, 1, 2, 3), row(0, 2, 1, 3), rank=0, num_ranks=2)
    assert plan.transfers == (NetworkTransfer(2, 1, 2, 0, 1), NetworkTransfer(1, 0, 1, 1, 2))
    assert plan.changed_local == (1,) and plan.copies == ()
    assert [t.expert for t in plan.sends] == [1] and [t.expert for t in plan.recvs] == [2]
    assert plan.bytes_moved(64) == 128 and plan.num_changed_slots == 2


def test_expert_already_on_the_rank_is_copied_locally():
    plan = plan_layer_transfer(row(0, 1, 2, 3), row(1, 0, 2, 3), rank=0, num_ranks=2)
    assert plan.transfers == ()
    assert plan.copies == (LocalCopy(0, 1, from_staging=False), LocalCopy(1, 0, from_staging=False))
    assert plan.num_local_copies == 2


def test_each_expert_crosses_once_per_receiving_rank():
    # Rank 1 (slots 3..5) needs expert 0 three times: one network transfer, two copies from staging.
    plan = plan_layer_transfer(row(0, 1, 2, 3, 4, 5), row(0, 1, 2, 0, 0, 0), rank=1, num_ranks=2)
    assert plan.transfers == (NetworkTransfer(0, 0, 0, 1, 3),)
    assert plan.copies == (LocalCopy(1, 0, from_staging=True), LocalCopy(2, 0, from_staging=True))
    assert plan.changed_local == (0, 1, 2)


def test_senders_spread_over_the_old_holders():
    # Expert 0 sits on ranks 0 and 1; ranks 2 and 3 both need it: one sends to each.
    old = row(0, 1, 0, 2, 3, 4, 5, 6)
    new = row(0, 1, 0, 2, 0, 4, 0, 6)
    plan = plan_layer_transfer(old, new, rank=0, num_ranks=4)
    assert [(t.src_rank, t.dst_rank) for t in plan.transfers] == [(0, 2), (1, 3)]
    assert plan.transfers[1].src_slot == 2


def test_every_rank_computes_the_same_transfers():
    old, new = row(0, 1, 2, 3, 0, 5, 4, 1), row(3, 3, 2, 1, 5, 0, 4, 4)
    plans = [plan_layer_transfer(old, new, rank=r, num_ranks=4) for r in range(4)]
    assert all(p.transfers == plans[0].transfers for p in plans)
    assert sum(len(p.changed_local) for p in plans) == plans[0].num_changed_slots


def test_batches_respect_the_per_rank_bound():
    old, new = row(0, 1, 2, 3, 4, 5, 6, 7), row(4, 5, 6, 7, 0, 1, 2, 3)
    plan = plan_layer_transfer(old, new, rank=0, num_ranks=2)
    assert len(plan.batches(10, 10**9)) == 1
    batches = plan.batches(10, 25)  # two experts per rank and batch: one transfer each way
    flat = [t for b in batches for t in b]
    assert len(flat) == len(plan.transfers) and set(flat) == set(plan.transfers)
    for b in batches:
        for r in range(2):
            assert sum((t.src_rank == r) + (t.dst_rank == r) for t in b) <= 2
    assert len(plan.batches(10, 1)) == len(plan.transfers)  # an expert larger than the bound goes alone


@pytest.mark.parametrize(
    "old, new, kwargs, match",
    [
        (row(0, 1, 2), row(0, 1, 2), {"rank": 0, "num_ranks": 2}, r"num_physical \(3\) must be a multiple"),
        (row(0, 1), row(0, 1, 1), {"rank": 0, "num_ranks": 1}, "differ in length"),
        (row(0, 1), row(1, 0), {"rank": 2, "num_ranks": 2}, r"rank \(2\) must be in"),
        (row(0, 0), row(0, 1), {"rank": 0, "num_ranks": 1}, "no slot holds it"),
    ],
)
def test_bad_plan_input_raises(old, new, kwargs, match):
    with pytest.raises(EPLBError, match=match):
        plan_layer_transfer(old, new, **kwargs)


# -------------------------------------------------------------------------------- communicators
def test_builtin_communicators_are_registered():
    assert {"local", "torch_gloo", "torch_nccl"} <= set(available_communicators())
    assert get_communicator("local") is LocalCommunicator


def test_local_communicator_copies_sends_into_receives_in_order():
    comm = LocalCommunicator()
    a, b = torch.arange(4.0), torch.arange(3)
    out_a, out_b = torch.zeros(4), torch.zeros(3, dtype=torch.int64)
    comm.add_send([a], 0)
    comm.add_send([b], 0)
    comm.add_recv([out_a], 0)
    comm.add_recv([out_b], 0)
    comm.execute()
    assert torch.equal(out_a, a) and torch.equal(out_b, b)
    comm.execute()  # the queue is empty again: nothing happens


def test_local_communicator_rejects_bad_use():
    comm = LocalCommunicator()
    with pytest.raises(EPLBError, match=r"dst \(1\) must be a rank"):
        comm.add_send([torch.zeros(1)], 1)
    comm.add_send([torch.zeros(1)], 0)
    with pytest.raises(EPLBError, match="each send needs a matching receive"):
        comm.execute()
    comm.add_send([torch.zeros(2)], 0)
    comm.add_recv([torch.zeros(3)], 0)
    with pytest.raises(EPLBError, match="same shapes and dtypes"):
        comm.execute()


@pytest.mark.parametrize("name", ["auto", "torch_gloo", "torch_nccl", "local"])
def test_single_rank_selects_local_and_logs_it(name, caplog):
    with caplog.at_level(logging.INFO, logger="eplb"):
        comm = select_communicator(name, use_async=True, device="cpu", group=None)
    assert isinstance(comm, LocalCommunicator) and comm.num_ranks == 1
    assert "communicator: local" in caplog.text


def test_timeout_must_be_positive():
    with pytest.raises(EPLBError, match=r"timeout_s \(0\) must be > 0"):
        LocalCommunicator(timeout_s=0)


# ------------------------------------------------------------------------------------ executor
def test_execute_layer_transfer_reads_old_contents_when_slots_swap():
    old, new = row(0, 1, 2), row(2, 0, 1)  # a cycle: every slot is both a source and a destination
    layer = FakeExperts(0, old, rank=0, num_ranks=1)
    plan = plan_layer_transfer(old, new, rank=0, num_ranks=1)
    staging = {n: torch.empty_like(t) for n, t in layer.slot_tensors().items()}
    execute_layer_transfer(plan, layer.slot_tensors(), staging, LocalCommunicator(), 1 << 20)
    layer.commit(new, staging, torch.tensor(plan.changed_local))
    layer.check()


def test_execute_layer_transfer_rejects_mismatched_staging():
    layer = FakeExperts(0, row(0, 1), rank=0, num_ranks=1)
    plan = plan_layer_transfer(row(0, 1), row(1, 0), rank=0, num_ranks=1)
    staging = {n: torch.empty_like(t) for n, t in layer.slot_tensors().items()}
    staging["bias"] = torch.empty(2, 5, dtype=torch.float64)
    with pytest.raises(EPLBError, match=r"staging\['bias'\]"):
        execute_layer_transfer(plan, layer.slot_tensors(), staging, LocalCommunicator(), 1 << 20)


def test_sync_executor_one_rank_every_slot_holds_its_expert(caplog):
    E, P = 4, 6
    old = Placement.initial(3, E, P, 1)
    new_rows = old.phy2log.clone()
    new_rows[0] = row(3, 3, 3, 2, 1, 0)
    new_rows[2] = row(1, 0, 2, 3, 1, 0)
    new = Placement.from_phy2log(new_rows, E)
    layers = [FakeExperts(i, old.phy2log[i], rank=0, num_ranks=1) for i in range(3)]
    executor = SyncExecutor(rank=0, num_ranks=1, communicator=LocalCommunicator(), max_transfer_bytes=1 << 20)
    with caplog.at_level(logging.INFO, logger="eplb"):
        report = executor.rebalance(layers, old, new)
    for layer in layers:
        layer.check()
        assert torch.equal(layer.phy2log, new.phy2log[layer.layer_index])
        assert {n: t.data_ptr() for n, t in layer.tensors.items()} == layer.storage  # in place
    changed = int((old.phy2log != new.phy2log).sum())
    assert report.layers == 2 and report.slots_changed == changed == report.local_copies
    assert report.network_transfers == 0 and report.bytes_moved == 0 and not report.skipped
    assert "rebalance done: 2 layers" in caplog.text


def test_sync_executor_no_change_touches_nothing():
    old = Placement.initial(2, 4, 4, 1)
    layers = [FakeExperts(i, old.phy2log[i], rank=0, num_ranks=1) for i in range(2)]
    executor = SyncExecutor(rank=0, num_ranks=1, communicator=LocalCommunicator(), max_transfer_bytes=64)
    report = executor.rebalance(layers, old, old)
    assert (report.layers, report.slots_changed, report.bytes_moved, report.local_copies) == (0, 0, 0, 0)


def test_bytes_per_expert_counts_every_per_expert_tensor():
    layer = FakeExperts(0, row(0, 1), rank=0, num_ranks=1)
    assert bytes_per_expert(layer.slot_tensors()) == 12 * 4 + 3 * 8 + 4


def test_sync_executor_rejects_mismatched_ranks_and_shapes():
    with pytest.raises(EPLBError, match="build both from the same process group"):
        SyncExecutor(rank=0, num_ranks=2, communicator=LocalCommunicator(), max_transfer_bytes=1)
    executor = SyncExecutor(rank=0, num_ranks=1, communicator=LocalCommunicator(), max_transfer_bytes=1)
    with pytest.raises(EPLBError, match="differ in shape"):
        executor.rebalance([], Placement.initial(1, 4, 4, 1), Placement.initial(2, 4, 4, 1))
    layer = FakeExperts(0, row(0, 1, 2, 3), rank=0, num_ranks=1)
    old, new = Placement.initial(1, 4, 6, 1), Placement.from_phy2log(row(0, 1, 2, 3, 3, 2), 4)
    with pytest.raises(EPLBError, match="has 4 slots but the placement gives this rank 6"):
        executor.rebalance([layer], old, new)


def test_report_is_frozen():
    report = RebalanceReport(
        layers=0, slots_changed=0, network_transfers=0, local_copies=0, bytes_moved=0, seconds=0.0
    )
    with pytest.raises(AttributeError):
        report.layers = 1
