"""LoadTracker.window_load(group) and the balancedness logger over 2 and 4 gloo ranks."""

import logging
import os
import signal

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks, spawn_ranks

from eplb.metrics import BalancednessLogger, balancedness
from eplb.placement import Placement
from eplb.tracker import LoadTracker

pytestmark = pytest.mark.distributed

L, E, W, T, K = 3, 8, 4, 16, 2


def _rank_ids(rank: int, step: int, layer: int) -> torch.Tensor:
    """Deterministic per-(rank, step, layer) ids with padding, so any process can rebuild them."""
    gen = torch.Generator().manual_seed(1000 * rank + 10 * step + layer)
    return torch.randint(-1, E, (T, K), generator=gen)


def _step_load(ranks: range, step: int) -> torch.Tensor:
    """[L, E] int64 — bincount reference of one step's ids summed over ``ranks``."""
    load_LE = torch.zeros(L, E, dtype=torch.int64)
    for rank in ranks:
        for layer in range(L):
            ids = _rank_ids(rank, step, layer).reshape(-1)
            load_LE[layer] += torch.bincount(ids[ids >= 0], minlength=E)
    return load_LE


def _window_reference(ranks: range, num_steps: int) -> torch.Tensor:
    return sum(_step_load(ranks, step) for step in range(max(0, num_steps - W), num_steps))


def _window_on_rank(rank: int, world_size: int, num_steps: int):
    tracker = LoadTracker(L, E, W)
    for step in range(num_steps):
        for layer in range(L):
            tracker.record(layer, _rank_ids(rank, step, layer))
        tracker.step()
    local_LE = tracker.window_load()
    global_LE = tracker.window_load(group=dist.group.WORLD)
    # The reduction must not touch the tracker's own state.
    assert torch.equal(tracker.window_load(), local_LE)
    return local_LE, global_LE, tracker.last_step_load(group=dist.group.WORLD)


@pytest.mark.parametrize("world_size", [2, 4])
def test_window_load_all_reduce_gives_global_sum_on_every_rank(world_size):
    num_steps = W + 2  # the window has wrapped
    results = run_ranks(_window_on_rank, world_size, num_steps)
    everyone = range(world_size)
    for rank, (local_LE, global_LE, last_LE) in enumerate(results):
        assert torch.equal(local_LE, _window_reference(range(rank, rank + 1), num_steps)), f"rank {rank}"
        assert torch.equal(global_LE, _window_reference(everyone, num_steps)), f"rank {rank}"
        assert torch.equal(last_LE, _step_load(everyone, num_steps - 1)), f"rank {rank}"


def _log_on_rank(rank: int, world_size: int, interval: int, num_steps: int):
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger(f"eplb.test.rank{rank}")
    logger.setLevel(logging.INFO)
    logger.addHandler(_Collect())
    placement = Placement.initial(L, E, E, world_size)
    tracker = LoadTracker(L, E, W)
    log = BalancednessLogger(interval, world_size, rank, logger=logger)
    returned = []
    for step in range(1, num_steps + 1):
        for layer in range(L):
            tracker.record(layer, _rank_ids(rank, step, layer))
        tracker.step()
        stats = log(step, tracker, placement, dist.group.WORLD, steps_to_next_rebalance=num_steps - step)
        returned.append(stats)
    return records, returned


def test_logger_reduces_only_on_logging_steps_and_logs_on_rank_zero():
    world_size, interval, num_steps = 2, 3, 7
    results = run_ranks(_log_on_rank, world_size, interval, num_steps)
    (records0, stats0), (records1, stats1) = results
    assert len(records0) == 2 and records1 == []  # steps 3 and 6, rank 0 only
    assert [s is None for s in stats0] == [step % interval != 0 for step in range(1, num_steps + 1)]
    # Both ranks computed the same global numbers on the logging steps.
    assert stats0 == stats1
    placement = Placement.initial(L, E, E, world_size)
    for stats in filter(None, stats0):
        step = stats["step"]
        # The logger reports the step just recorded (the tracker was fed step numbers from 1).
        expected = balancedness(_step_load(range(world_size), step), placement, world_size)
        assert stats["balancedness"] == pytest.approx(expected.aggregate)
        assert stats["max_tokens_per_rank"] == pytest.approx(expected.max_tokens_per_rank)
        assert stats["steps_to_next_rebalance"] == num_steps - step
        assert f"step={step} " in records0[step // interval - 1]


def _die_on_rank_one(rank: int, world_size: int):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def test_harness_reports_a_killed_rank_and_the_survivors_result():
    results = spawn_ranks(_die_on_rank_one, 2, timeout=60, grace_s=None)
    assert results[0].ok and results[0].value == 0
    assert not results[1].ok and results[1].exitcode == -signal.SIGKILL


def _raise_on_rank_zero(rank: int, world_size: int):
    if rank == 0:
        raise RuntimeError("planted failure")
    return rank


def test_harness_raises_with_the_failing_ranks_traceback():
    with pytest.raises(AssertionError, match="rank 0 raised:(.|\n)*planted failure"):
        run_ranks(_raise_on_rank_zero, 2, timeout=60)
