"""Balancedness metrics: golden values, zero loads, stats, logging and input errors."""

import logging

import pytest
import torch

from eplb.errors import EPLBError
from eplb.metrics import (
    STATS_KEYS,
    BalancednessLogger,
    balancedness,
    compute_stats,
    format_stats,
    predicted_gain,
    rank_loads,
    rank_share,
)
from eplb.placement import Placement
from eplb.tracker import LoadTracker


@pytest.mark.parametrize(("E", "G"), [(4, 1), (8, 2), (16, 4), (12, 3)])
def test_perfectly_even_load_has_balancedness_one(E, G):
    placement = Placement.initial(3, E, E, G)
    b = balancedness(torch.full((3, E), 7.0), placement, G)
    assert b.aggregate == 1.0 and b.imbalance == 1.0
    assert torch.equal(b.per_layer, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_all_load_on_one_expert_with_one_replica_is_one_over_num_ranks(G):
    E = 8
    placement = Placement.initial(2, E, E, G)
    load_LE = torch.zeros(2, E)
    load_LE[:, 5] = 1000
    b = balancedness(load_LE, placement, G)
    assert b.aggregate == pytest.approx(1 / G)
    assert b.imbalance == pytest.approx(G)
    assert torch.allclose(b.per_layer, torch.full((2,), 1 / G, dtype=torch.float64))


def test_rank_loads_split_an_experts_load_evenly_over_its_replicas():
    # 4 experts, 6 slots on 2 ranks: rank 0 holds [0, 1, 2], rank 1 holds [2, 3, 0].
    placement = Placement.from_phy2log(torch.tensor([[0, 1, 2, 2, 3, 0]]), 4)
    load_LE = torch.tensor([[10.0, 4.0, 6.0, 1.0]])
    # rank 0: 10/2 + 4 + 6/2 = 12; rank 1: 6/2 + 1 + 10/2 = 9
    assert rank_loads(load_LE, placement, 2).tolist() == [[12.0, 9.0]]
    share = rank_share(placement, 2)
    assert share[0].tolist() == [[0.5, 0.5], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    b = balancedness(load_LE, placement, 2)
    assert b.aggregate == pytest.approx(10.5 / 12)
    assert b.avg_tokens_per_rank == 10.5 and b.max_tokens_per_rank == 12.0


def test_aggregate_weights_layers_by_their_load():
    placement = Placement.initial(2, 2, 2, 2)
    load_LE = torch.tensor([[100.0, 0.0], [1.0, 1.0]])  # layer 0: 0.5, layer 1: 1.0
    b = balancedness(load_LE, placement, 2)
    assert b.per_layer.tolist() == [0.5, 1.0]
    assert b.aggregate == pytest.approx((50 + 1) / (100 + 1))
    assert b.per_layer_imbalance.tolist() == [2.0, 1.0]


def test_zero_load_layers_count_as_balanced_and_never_nan():
    placement = Placement.initial(3, 4, 4, 2)
    load_LE = torch.tensor([[0.0, 0, 0, 0], [4.0, 0, 0, 0], [0.0, 0, 0, 0]])
    b = balancedness(load_LE, placement, 2)
    assert b.per_layer.tolist() == [1.0, 0.5, 1.0]
    assert b.aggregate == 0.5
    empty = balancedness(torch.zeros(3, 4), placement, 2)
    assert empty.aggregate == 1.0 and empty.imbalance == 1.0
    assert empty.avg_tokens_per_rank == 0.0 and empty.max_tokens_per_rank == 0.0
    assert not torch.isnan(empty.per_layer).any() and not torch.isnan(empty.per_layer_imbalance).any()


def test_predicted_gain_of_replicating_the_hot_expert():
    old = Placement.from_phy2log(torch.tensor([[0, 1, 2, 3]]), 4)  # expert 0 alone on rank 0
    new = Placement.from_phy2log(torch.tensor([[0, 1, 0, 2, 3, 1]]), 4)
    load_LE = torch.tensor([[8.0, 2.0, 1.0, 1.0]])
    # old: ranks [10, 2] -> 6/10; new: ranks [4+1+4, 1+1+1] = [9, 3] -> 6/9
    assert predicted_gain(load_LE, old, new, 2) == pytest.approx(6 / 9 - 6 / 10)
    assert predicted_gain(load_LE, new, old, 2) == pytest.approx(-(6 / 9 - 6 / 10))
    assert predicted_gain(load_LE, old, old, 2) == 0.0


def test_metrics_accept_an_int64_tracker_load():
    tracker = LoadTracker(1, 4, 2)
    tracker.record(0, torch.tensor([[0, 1], [0, 2], [-1, 0]]))
    tracker.step()
    placement = Placement.initial(1, 4, 4, 2)
    assert rank_loads(tracker.window_load(), placement, 2).tolist() == [[4.0, 1.0]]


def test_compute_stats_returns_plain_python_numbers():
    placement = Placement.initial(1, 4, 4, 2)
    stats = compute_stats(torch.tensor([[3, 1, 0, 0]]), placement, 2, step=10, steps_to_next_rebalance=5)
    assert tuple(stats) == STATS_KEYS
    assert stats == {
        "step": 10,
        "avg_tokens_per_rank": 2.0,
        "max_tokens_per_rank": 4.0,
        "balancedness": 0.5,
        "imbalance": 2.0,
        "steps_to_next_rebalance": 5,
    }
    assert all(type(v) in (int, float) for v in stats.values())
    assert format_stats(stats) == (
        "step=10 avg_tokens_per_rank=2.0 max_tokens_per_rank=4.0 balancedness=0.5000 "
        "imbalance=2.0000 steps_to_next_rebalance=5"
    )
    assert format_stats(compute_stats(torch.zeros(1, 4), placement, 2)).startswith("avg_tokens_per_rank=0.0")


def _run_logger(rank: int, interval: int, steps: int, caplog) -> list:
    placement = Placement.initial(1, 4, 4, 2)
    tracker = LoadTracker(1, 4, 3)
    log = BalancednessLogger(interval, num_ranks=2, rank=rank)
    returned = []
    with caplog.at_level(logging.INFO, logger="eplb"):
        for step in range(1, steps + 1):
            tracker.record(0, torch.tensor([[0, 0], [step % 4, 1]]))
            tracker.step()
            returned.append(log(step, tracker, placement, steps_to_next_rebalance=steps - step))
    return returned


def test_logger_logs_every_interval_steps_on_rank_zero(caplog):
    returned = _run_logger(rank=0, interval=2, steps=5, caplog=caplog)
    assert [r is None for r in returned] == [True, False, True, False, True]
    messages = [r.getMessage() for r in caplog.records if r.name == "eplb"]
    assert len(messages) == 2
    assert messages[0].startswith("step=2 ") and "steps_to_next_rebalance=3" in messages[0]
    # Step 2 recorded ids [0, 0, 2, 1] -> rank loads [3, 1] on 2 ranks of 2 slots.
    assert returned[1]["balancedness"] == pytest.approx(2 / 3)


def test_logger_is_silent_on_other_ranks_but_returns_stats(caplog):
    returned = _run_logger(rank=1, interval=1, steps=3, caplog=caplog)
    assert all(r is not None for r in returned)
    assert not [r for r in caplog.records if r.name == "eplb"]


def test_logger_rejects_bad_interval():
    with pytest.raises(EPLBError, match=r"interval \(0\) must be an int >= 1"):
        BalancednessLogger(0, 2)


@pytest.mark.parametrize(
    ("load", "match"),
    [
        (torch.zeros(2, 4), r"load has shape \(2, 4\) but the placement is \[L, E\] = \[1, 4\]"),
        (torch.zeros(4), r"load has shape \(4,\)"),
        (torch.tensor([[1.0, -1.0, 0.0, 0.0]]), r"negative value \(-1.0\)"),
        (torch.tensor([[1.0, float("nan"), 0.0, 0.0]]), "NaN or infinite"),
        (torch.tensor([[True, False, False, False]]), "real token counts"),
    ],
)
def test_metrics_reject_bad_load(load, match):
    placement = Placement.initial(1, 4, 4, 2)
    with pytest.raises(EPLBError, match=match):
        balancedness(load, placement, 2)


def test_metrics_reject_bad_placement_or_ranks():
    placement = Placement.initial(1, 4, 4, 2)
    with pytest.raises(EPLBError, match="placement must be an eplb.Placement"):
        rank_loads(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.int64), 2)
    with pytest.raises(EPLBError, match=r"num_physical \(4\) must be a multiple of num_ranks \(3\)"):
        rank_loads(torch.zeros(1, 4), placement, 3)
    with pytest.raises(EPLBError, match=r"num_physical \(4\) must be a multiple of num_ranks \(3\)"):
        rank_share(placement, 3)
