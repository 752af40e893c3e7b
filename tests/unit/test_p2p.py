"""torch_p2p without processes or GPUs: when ``auto`` may pick it (`peer_to_peer_verdict`), the
sender's and receiver's bookkeeping of mapped storages (`Exports`, `Imports`) with fake handles,
the errors users can hit, and one exchange per layer for communicators that stage nothing."""

from __future__ import annotations

import gc
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from torch.multiprocessing.reductions import StorageWeakRef

from eplb import EPLBConfig
from eplb.comm.base import CommunicationError, Communicator
from eplb.comm.p2p import Exports, Imports, PeerInfo, TorchP2PCommunicator, View, peer_to_peer_verdict
from eplb.errors import EPLBError
from eplb.transfer import execute_layer_transfer, plan_layer_transfer

GPU = {"a": 0, "b": 1, "c": 2}


def _infos(*devices, hosts=None):
    hosts = hosts or ["node0"] * len(devices)
    return [PeerInfo(h, d, dict(GPU)) for h, d in zip(hosts, devices)]


def test_auto_may_use_peer_copies_on_one_host_with_peer_access():
    assert peer_to_peer_verdict(_infos("a", "b", "c"), 1, lambda i, j: True) == ""


def test_two_processes_on_one_gpu_need_no_peer_access():
    assert peer_to_peer_verdict(_infos("a", "a"), 0, lambda i, j: False) == ""


@pytest.mark.parametrize(
    "infos, rank, access, reason",
    [
        (_infos("a", "b", hosts=["n0", "n1"]), 0, True, r"spans 2 hosts \(n0, n1\); peer-to-peer copies need one host"),
        (_infos("a", "b"), 0, False, r"GPU 0 of rank 0 has no peer access to GPU 1 of rank 1"),
        (_infos("a", "zz"), 0, True, r"rank 0 does not see rank 1's GPU zz \(check CUDA_VISIBLE_DEVICES\)"),
        (_infos("", ""), 0, True, r"rank 0 holds its experts on the CPU"),
        (_infos("a", ""), 0, True, r"rank 1 holds its experts on the CPU"),
    ],
)
def test_auto_says_why_peer_copies_are_not_possible(infos, rank, access, reason):
    assert re.search(reason, peer_to_peer_verdict(infos, rank, lambda i, j: access))


class _FakeIpc:
    """Handles are ids into a table of snapshots of the exported storages (a copy, as another
    process's mapping would be: holding it must not keep the sender's storage alive)."""

    def __init__(self):
        self.snapshots: dict[int, torch.Tensor] = {}
        self.exported = 0

    def export(self, storage):
        self.exported += 1
        self.snapshots[self.exported] = torch.empty(0, dtype=torch.uint8).set_(storage).clone()
        return self.exported

    def open(self, handle):
        return self.snapshots[handle]


def _send(exports, imports, tensor, peer=1):
    new: dict = {}
    view = exports.describe(tensor, peer, new)
    imports.update(0, new, exports.retired(peer))
    return view, new


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int16, torch.float64]),
    index=st.integers(0, 3),
    transpose=st.booleans(),
)
def test_a_described_view_reads_the_same_elements_on_the_receiver(shape, dtype, index, transpose):
    ipc = _FakeIpc()
    exports, imports = Exports(ipc.export, StorageWeakRef), Imports(ipc.open)
    slots = (torch.randn(4, *shape) * 100).to(dtype)
    row = slots[index]
    if transpose and row.dim() >= 2:
        row = row.transpose(0, 1)
    view, _ = _send(exports, imports, row)
    assert torch.equal(imports.view(0, view), row)


def test_a_storage_is_exported_once_per_peer():
    ipc = _FakeIpc()
    exports, imports = Exports(ipc.export, StorageWeakRef), Imports(ipc.open)
    slots = torch.arange(12.0).reshape(3, 4)
    _, first = _send(exports, imports, slots[0])
    _, again = _send(exports, imports, slots[2])
    assert len(first) == 1 and again == {}
    other_peer: dict = {}
    exports.describe(slots[1], 2, other_peer)
    assert list(other_peer) == list(first), "the same id, one export for both peers"
    assert ipc.exported == 1


def test_a_freed_storage_is_retired_and_its_successor_mapped_anew():
    ipc = _FakeIpc()
    exports, imports = Exports(ipc.export, StorageWeakRef), Imports(ipc.open)
    slots = torch.zeros(3, 4)
    view, first = _send(exports, imports, slots[1])
    del slots
    gc.collect()
    assert exports.retired(1) == list(first), "the peer is told once"
    assert exports.retired(1) == []
    imports.update(0, {}, list(first))
    assert len(imports) == 0
    with pytest.raises(CommunicationError, match="not mapped here"):
        imports.view(0, view)
    replacement = torch.ones(3, 4)
    view2, second = _send(exports, imports, replacement[1])
    assert len(second) == 1 and set(second).isdisjoint(first)
    assert torch.equal(imports.view(0, view2), replacement[1])


def test_a_view_beyond_the_peer_storage_is_refused():
    ipc = _FakeIpc()
    exports, imports = Exports(ipc.export, StorageWeakRef), Imports(ipc.open)
    view, _ = _send(exports, imports, torch.zeros(4))
    bad = View(view.export, 2, (4,), (1,), torch.float32)
    with pytest.raises(CommunicationError, match=r"beyond its storage of 16 bytes"):
        imports.view(0, bad)


def test_torch_p2p_needs_a_group_and_cuda_tensors():
    with pytest.raises(EPLBError, match="'torch_p2p' needs a process group; use 'local' for one rank"):
        TorchP2PCommunicator(group=None, device="cuda")


def test_async_config_accepts_torch_p2p_and_points_nccl_users_to_it():
    assert EPLBConfig(communicator="torch_p2p").communicator == "torch_p2p"
    with pytest.raises(ValidationError, match="set communicator to 'torch_p2p' \\(one host\\), 'torch_gloo'"):
        EPLBConfig(communicator="torch_nccl")


class _Counting(Communicator):
    """Two ranks seen from rank 0: counts exchanges, sends nothing."""

    def __init__(self, stages_batches: bool):
        super().__init__()
        self.rank, self.num_ranks = 0, 2
        self.stages_batches = stages_batches
        self.exchanges = 0

    def _exchange(self, sends, recvs):
        self.exchanges += 1


@pytest.mark.parametrize("stages, exchanges", [(True, 3), (False, 1)])
def test_communicators_that_stage_nothing_move_a_layer_in_one_exchange(stages, exchanges):
    old, new = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([3, 4, 5, 0, 1, 2])  # 3 experts each way
    plan = plan_layer_transfer(old, new, rank=0, num_ranks=2)
    slots = {"w": torch.zeros(3, 8)}
    comm = _Counting(stages)
    execute_layer_transfer(plan, slots, {"w": torch.zeros(3, 8)}, comm, max_transfer_bytes=64)
    assert comm.exchanges == exchanges


def test_polling_naps_grow_with_the_wait_and_stay_bounded():
    from eplb.comm.p2p import _nap

    waits = [0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1.0, 100.0]
    naps = [_nap(w) for w in waits]
    assert naps == sorted(naps), "a longer wait never polls more often"
    assert all(1e-5 <= n <= 1e-3 for n in naps)
    assert all(n <= max(w / 8, 1e-5) for w, n in zip(waits, naps)), "a wake-up is at most 1/8 of the wait late"
