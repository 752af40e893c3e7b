"""Multi-GPU checks: one process per GPU over NCCL, rank ``r`` on ``cuda:r``.

Skipped with fewer than 2 GPUs; the 4-rank cases need 4. Run on a multi-GPU host with
``python -m pytest -q tests/gpu/test_multi_gpu.py`` (docs/benchmarks.md, "Multi-GPU validation").

- Transfers with CUDA tensors: ``torch_nccl`` (sync), ``torch_gloo`` and ``torch_p2p`` (sync and
  async executors) leave every slot holding its expert's weights, with the fewest network
  transfers, in place.
- `EPLBWrapper` with ``ep_group`` = the NCCL world (all-to-all dispatch over NCCL): outputs equal
  the unwrapped model's on the same GPU, before, during (async) and after rebalances, and every
  slot holds its expert's weights after each rebalance.
- The async worker thread touches no GPU but its rank's own (no stray CUDA context on ``cuda:0``).

NVLink multicast stays off (the multi-GPU machines require it): the fixture below sets the
variables in this process, and the spawned ranks inherit them; each rank reports what it saw.

Legend: L layers, E logical experts, P physical slots, G ranks, S = P // G slots per rank.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

# tests/gpu is not on the path pytest gives tests/distributed: put that folder (harness,
# test_transfer) and tests/ (moe_models) first. Spawned ranks inherit sys.path and import this file.
_TESTS_DIR = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(_TESTS_DIR / "distributed"), str(_TESTS_DIR)) if p not in sys.path]

import moe_models as mm  # noqa: E402
from harness import run_ranks  # noqa: E402
from test_transfer import (  # noqa: E402
    SHAPES,
    FakeExperts,
    L,
    P,
    expected,
    minimum_transfers,
    random_placement,
)

from eplb import EPLBConfig, EPLBWrapper  # noqa: E402
from eplb.comm.base import dedicated_group, select_communicator  # noqa: E402
from eplb.executor import AsyncExecutor, SyncExecutor  # noqa: E402
from eplb.moe import find_moe_layers  # noqa: E402
from eplb.moe.dispatch import AllToAllDispatcher  # noqa: E402
from eplb.planner import Decision  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs >= 2 GPUs"
)

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TIMEOUT = 300.0
# The wrapper's model has E = 8 experts and 4 redundant slots: P = 12 divides over 2 and 4 ranks.
# (2 ranks need no mark of their own: pytestmark skips the whole file below 2 GPUs.)
WORLD_SIZES = [
    2,
    pytest.param(4, marks=pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs >= 4 GPUs")),
]


@pytest.fixture(autouse=True, scope="module")
def _nvlink_multicast_off():
    with pytest.MonkeyPatch.context() as patch:
        for name, value in NO_MULTICAST.items():
            patch.setenv(name, value)
        yield


def _rank_env() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in NO_MULTICAST}


def _gpus_with_context() -> list[int]:
    """GPUs on which this process holds a CUDA primary context."""
    return [i for i in range(torch.cuda.device_count()) if torch._C._cuda_hasPrimaryContext(i)]


def _check_rank_setup(rank: int) -> torch.device:
    assert dist.get_backend() == "nccl"
    assert torch.cuda.current_device() == rank, "the harness sets cuda:rank before init"
    return torch.device("cuda", rank)


# ------------------------------------------------------------------------------ transfers
def _rebalance_fake_experts(rank: int, world_size: int, seed: int, communicator: str, use_async: bool):
    device = _check_rank_setup(rank)
    group = dist.group.WORLD
    comm = select_communicator(communicator, use_async=use_async, device=device, group=group, timeout_s=120)
    control = dedicated_group(group, "gloo", 120) if use_async else None
    old, new = random_placement(seed, world_size), random_placement(seed + 1, world_size)
    runs = []
    # One batch for everything, then one expert per batch: the results must be identical.
    for max_bytes in (1 << 30, 1):
        layers = [FakeExperts(i, old.phy2log[i], rank, world_size, device) for i in range(L)]
        storage = [{n: t.data_ptr() for n, t in layer.tensors.items()} for layer in layers]
        if use_async:
            executor = AsyncExecutor(
                rank=rank, num_ranks=world_size, communicator=comm, max_transfer_bytes=max_bytes,
                timeout_s=120, on_error="raise", control_group=control,
            )
            executor.begin(layers, old, lambda new=new: Decision.move_to(new))
            executor.drain()
            executor.close()
            report = executor.last_report
        else:
            executor = SyncExecutor(
                rank=rank, num_ranks=world_size, communicator=comm, max_transfer_bytes=max_bytes
            )
            report = executor.rebalance(layers, old, new)
        torch.cuda.synchronize(device)
        now = [{n: t.data_ptr() for n, t in layer.tensors.items()} for layer in layers]
        assert now == storage, "slots are updated in place"
        assert all(t.device == device for layer in layers for t in layer.tensors.values())
        assert all(torch.equal(layer.phy2log, new.phy2log[layer.layer_index]) for layer in layers)
        tensors = [{n: t.cpu() for n, t in layer.tensors.items()} for layer in layers]
        runs.append((report.skipped, report.network_transfers, report.slots_changed, tensors))
    return {"communicator": comm.name, "env": _rank_env(), "runs": runs}


@pytest.mark.parametrize(
    "communicator, use_async",
    [("torch_nccl", False), ("torch_gloo", False), ("torch_gloo", True), ("torch_p2p", False), ("torch_p2p", True)],
)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_slot_holds_its_expert_after_cuda_rebalance(world_size, communicator, use_async):
    seed = 10 * world_size + 3
    outs = run_ranks(
        _rebalance_fake_experts, world_size, seed, communicator, use_async, timeout=TIMEOUT, backend="nccl"
    )
    old, new = random_placement(seed, world_size), random_placement(seed + 1, world_size)
    S = P // world_size
    fewest = minimum_transfers(old, new, world_size)
    assert fewest > 0
    for rank, out in enumerate(outs):
        assert out["communicator"] == communicator
        assert out["env"] == NO_MULTICAST, f"rank {rank} did not inherit the NVLink-multicast switches"
        for run, (skipped, transfers, changed, tensors) in enumerate(out["runs"]):
            assert not skipped
            assert (transfers, changed) == (fewest, int((old.phy2log != new.phy2log).sum())), (rank, run)
            for i in range(L):
                for j in range(S):
                    expert = int(new.phy2log[i, rank * S + j])
                    for n in SHAPES:
                        assert torch.equal(tensors[i][n][j], expected(i, expert, n)), (rank, run, i, j, n)


# --------------------------------------------------------------------------- the wrapper
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _wrapped_equals_unwrapped(rank: int, world_size: int, communicator: str, use_async: bool):
    device = _check_rank_setup(rank)
    group = dist.group.WORLD
    records = _Records()
    logger = logging.getLogger("eplb")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    # Built on the CPU from one seed, then moved: the same model on every rank.
    model = mm.build_reference_model(num_layers=3).to(device)
    reference = copy.deepcopy(model)  # the unwrapped model, on this rank's GPU
    logical = [
        {n: getattr(spec.experts, n).detach().clone() for n in spec.expert_tensors}
        for spec in find_moe_layers(reference)
    ]
    # Async runs the default policy only; sync uses the shuffling test policy so weights surely move.
    policy = "default" if use_async else mm.register_shuffle_policy()
    config = EPLBConfig(
        num_redundant_experts=4, use_async=use_async, communicator=communicator, policy=policy,
        step_interval=10_000, async_on_error="raise", async_timeout_s=120,
    )
    wrapper = EPLBWrapper(model, config, ep_group=group)
    assert all(isinstance(layer.dispatcher, AllToAllDispatcher) for layer in wrapper.eplb_layers)
    S = 12 // world_size
    zero_rank = world_size - 1
    step = 0

    def check_step() -> None:
        nonlocal step
        # Ranks see different token counts; the last rank sends none every third step.
        length = 0 if (rank == zero_rank and step % 3 == 1) else 3 + 2 * rank + step % 4
        x = mm.hidden_batch(1000 * step + rank, batch=1, length=length).to(device)
        out = wrapper(x)
        assert out.device == device
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
        step += 1

    def check_slots() -> None:
        for layer in wrapper.eplb_layers:
            own = wrapper.placement.phy2log[layer.layer_index][rank * S : (rank + 1) * S]
            for name, slots in layer.slot_tensors().items():
                assert slots.device == device and slots.shape[0] == S
                assert torch.equal(slots, logical[layer.layer_index][name][own.to(device)])

    moved, steps_in_flight, bytes_moved = [], [], []
    with torch.no_grad():
        for _ in range(2):
            for _ in range(4):
                check_step()
            old = wrapper.placement
            wrapper.rebalance()
            in_flight = 0
            while wrapper.async_in_flight:  # agreed by every rank at the same step
                check_step()
                in_flight += 1
                assert in_flight < 500, "the async rebalance did not finish"
            stats = wrapper.stats()
            assert not stats["last_rebalance_skipped"], stats["last_rebalance_reason"]
            moved.append(not wrapper.placement.equals(old))
            steps_in_flight.append(in_flight)
            bytes_moved.append(stats["last_rebalance_bytes_moved"])
            check_slots()
            check_step()
    wrapper.close()
    logger.removeHandler(records)
    chosen = [m.split()[1] for m in records.messages if m.startswith("communicator:")]
    return {
        "env": _rank_env(), "communicator": chosen, "moved": moved, "steps_in_flight": steps_in_flight,
        "bytes": bytes_moved, "placement": wrapper.placement.phy2log.tolist(),
    }


@pytest.mark.parametrize(
    "communicator, use_async, chosen",
    [
        ("torch_nccl", False, "torch_nccl"),
        ("torch_gloo", False, "torch_gloo"),
        ("torch_gloo", True, "torch_gloo"),
        ("auto", True, "torch_p2p"),  # one host, peer access: receivers pull over the copy engines
    ],
)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_wrapped_outputs_equal_unwrapped_with_nccl_dispatch(world_size, communicator, use_async, chosen):
    outs = run_ranks(
        _wrapped_equals_unwrapped, world_size, communicator, use_async, timeout=TIMEOUT, backend="nccl"
    )
    assert outs[0]["communicator"] == [chosen]  # rank 0 logs the choice
    for rank, out in enumerate(outs):
        assert out["env"] == NO_MULTICAST, f"rank {rank} did not inherit the NVLink-multicast switches"
        # The first rebalance of the skewed load moves weights across GPUs; no move, no bytes.
        assert out["moved"][0] and out["bytes"][0] > 0, (out["moved"], out["bytes"])
        assert all(m or b == 0 for m, b in zip(out["moved"], out["bytes"])), (out["moved"], out["bytes"])
        if use_async:
            assert all(n >= 1 for n in out["steps_in_flight"]), "forwards run while a rebalance is in flight"
    # Every rank committed the same placements at the same steps.
    assert len({str(o["placement"]) for o in outs}) == 1
    assert len({tuple(o["steps_in_flight"]) for o in outs}) == 1
    assert len({tuple(o["bytes"]) for o in outs}) == 1


# ------------------------------------------------------------------- the async worker's GPU
def _contexts_around_async_rebalance(rank: int, world_size: int):
    device = _check_rank_setup(rank)
    group = dist.group.WORLD
    comm = select_communicator("torch_gloo", use_async=True, device=device, group=group, timeout_s=120)
    executor = AsyncExecutor(
        rank=rank, num_ranks=world_size, communicator=comm, max_transfer_bytes=1 << 30, timeout_s=120,
        on_error="raise", control_group=dedicated_group(group, "gloo", 120),
    )
    old, new = random_placement(5, world_size), random_placement(6, world_size)
    layers = [FakeExperts(i, old.phy2log[i], rank, world_size, device) for i in range(L)]
    before = _gpus_with_context()
    executor.begin(layers, old, lambda: Decision.move_to(new))
    executor.drain()
    executor.close()
    torch.cuda.synchronize(device)
    return before, _gpus_with_context()


def test_async_worker_uses_only_its_ranks_gpu():
    """A thread starts on cuda:0; a worker that never selects its rank's device makes every rank
    hold a CUDA context (hundreds of MiB) on GPU 0."""
    outs = run_ranks(_contexts_around_async_rebalance, 2, timeout=TIMEOUT, backend="nccl")
    for rank, (before, after) in enumerate(outs):
        assert before == [rank], f"rank {rank} held contexts on GPUs {before} before the rebalance"
        assert after == [rank], f"rank {rank} holds contexts on GPUs {after} after an async rebalance"
