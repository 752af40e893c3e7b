"""Policy registry, the built-in ``default`` and ``topk`` policies on golden cases, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from eplb.config import EPLBConfig
from eplb.errors import EPLBError
from eplb.metrics import balancedness
from eplb.placement import Placement
from eplb.policies import available_policies, get_policy, register_policy, unregister_policy
from eplb.policies.default import pack, relabel, replicate

# DeepSeek's published example (github.com/deepseek-ai/EPLB, README).
PUBLISHED_LOAD = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
PUBLISHED_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
PUBLISHED_KWARGS = dict(num_physical=16, num_groups=4, num_nodes=2, num_ranks=8)


# ---------------------------------------------------------------------- default: golden cases
def test_default_reproduces_the_published_example():
    placement = get_policy("default")(torch.tensor(PUBLISHED_LOAD, dtype=torch.float64), **PUBLISHED_KWARGS)
    assert placement.phy2log.tolist() == PUBLISHED_PHY2LOG
    assert placement.logcnt.sum(1).tolist() == [16, 16]


@pytest.mark.parametrize(
    "load",
    [torch.tensor(PUBLISHED_LOAD), torch.tensor(PUBLISHED_LOAD, dtype=torch.float32), PUBLISHED_LOAD],
    ids=["int64", "float32", "list"],
)
def test_default_accepts_any_numeric_load(load):
    assert get_policy("default")(load, **PUBLISHED_KWARGS).phy2log.tolist() == PUBLISHED_PHY2LOG


def test_default_falls_back_to_global_when_groups_do_not_split_over_nodes():
    load = torch.tensor(PUBLISHED_LOAD, dtype=torch.float64)
    policy = get_policy("default")
    fallback = policy(load, num_physical=16, num_groups=3, num_nodes=2, num_ranks=8)
    assert fallback.equals(policy(load, num_physical=16, num_groups=1, num_nodes=1, num_ranks=8))


def test_pack_fills_the_lightest_pack_with_room_heaviest_first():
    weight = np.array([[3.0, 9.0, 4.0, 8.0, 1.0, 2.0]])
    # Two packs of 3, heaviest first (item: weight): 1:9 -> p0 (0 vs 0, lowest) = 9; 3:8 -> p1 = 8;
    # 2:4 -> p1 = 12; 0:3 -> p0 = 12; 5:2 -> p0 (12 vs 12, lowest) = 14, full; 4:1 -> p1.
    assert pack(weight, 2).tolist() == [[1, 0, 5, 3, 2, 4]]


def test_replicate_gives_extra_slots_to_the_largest_load_per_replica():
    slot2item, count = replicate(np.array([[6.0, 1.0, 2.0]]), 6)
    # 6 -> item 0 (3.0); 3 vs 2 -> item 0 (2.0); 2 vs 2 tie -> lowest index, item 0.
    assert slot2item.tolist() == [[0, 1, 2, 0, 0, 0]]
    assert count.tolist() == [[4, 1, 1]]


# ---------------------------------------------------------------------- relabel
def test_relabel_undoes_a_rank_and_slot_permutation():
    old = Placement.from_phy2log(torch.tensor([[0, 1, 2, 3]]), 4)
    new = Placement.from_phy2log(torch.tensor([[3, 2, 1, 0]]), 4)
    assert relabel(new, old, num_ranks=2).phy2log.tolist() == [[0, 1, 2, 3]]


def test_relabel_moves_whole_nodes_only():
    # 2 nodes of 2 ranks of 1 slot. New node 0 holds {2, 3}: it must take old node 1's place.
    old = Placement.from_phy2log(torch.tensor([[0, 1, 2, 3]]), 4)
    new = Placement.from_phy2log(torch.tensor([[3, 2, 1, 0]]), 4)
    assert relabel(new, old, num_ranks=4, num_nodes=2).phy2log.tolist() == [[0, 1, 2, 3]]
    # New nodes {0, 2} and {1, 3} straddle the old nodes: ranks may not cross nodes, so only half
    # the experts can stay (a rank-level assignment alone would give [0, 1, 2, 3]).
    crossed = Placement.from_phy2log(torch.tensor([[0, 2, 1, 3]]), 4)
    assert relabel(crossed, old, num_ranks=4, num_nodes=2).phy2log.tolist() == [[0, 2, 1, 3]]
    assert relabel(crossed, old, num_ranks=4, num_nodes=1).phy2log.tolist() == [[0, 1, 2, 3]]


def test_relabel_rejects_mismatched_placements():
    a = Placement.initial(2, 4, 4, 2)
    with pytest.raises(EPLBError, match="relabel needs placements of one shape"):
        relabel(a, Placement.initial(1, 4, 4, 2), num_ranks=2)
    with pytest.raises(EPLBError, match=r"num_ranks \(2\) must be a multiple of num_nodes \(3\)"):
        relabel(a, a, num_ranks=2, num_nodes=3)


# ---------------------------------------------------------------------- topk
def test_topk_sends_new_replicas_to_the_least_loaded_rank_without_that_expert():
    # 3 ranks of 2 slots, 3 spare slots: one per rank. Expert 1 has copies on r0, r1, r2 and expert
    # 2 on r1, r2; r1 and r2 have one spare candidate too many, so expert 1 keeps slot 3 (r1) and
    # expert 2 slot 4 (r2) as primaries: spare slots 1, 2, 5.
    old = Placement.from_phy2log(torch.tensor([[0, 1, 2, 1, 2, 1]]), 3)
    load = torch.tensor([[6.0, 1.0, 2.0]])  # expert 0 gets 3 extra replicas (load 1.5 each)
    placement = get_policy("topk")(load, num_physical=6, num_ranks=3, old=old)
    # Rank loads before: r0 = 1.5 (expert 0), r1 = 1, r2 = 2. 1st copy -> r1 (lightest without
    # expert 0); 2nd -> r2: r0 is lighter but already holds expert 0; 3rd -> r0, the only rank
    # with room left.
    assert placement.phy2log.tolist() == [[0, 0, 0, 1, 2, 0]]


def test_topk_keeps_the_placement_in_effect_when_its_plan_would_be_worse():
    # 2 ranks of 3 slots, 3 spare slots: r0's share is 2, r1's is 1. Expert 0 keeps slot 5 (r1 has
    # the most candidates beyond its share), expert 1 slot 3: spare slots 1, 2, 4. The plan for this
    # load (expert 1 x3, expert 2 x2) can only fill r0's free slots: r0 = 2 + 2 + 1.67 = 5.67,
    # worse than the placement in effect (r0 = 4.67, r1 = 5.33), which therefore stays.
    old = Placement.from_phy2log(torch.tensor([[2, 0, 0, 1, 1, 0]]), 3)
    load = torch.tensor([[1.0, 5.0, 4.0]])
    placement = get_policy("topk")(load, num_physical=6, num_ranks=2, old=old)
    assert placement.phy2log.tolist() == [[2, 0, 0, 1, 1, 0]]


def test_topk_spreads_spare_slots_over_every_rank():
    # One hot expert on Placement.initial (8 experts, 16 slots, 4 ranks): every rank can take a
    # replica, so the hot expert's load is spread over all four ranks.
    load = torch.ones(1, 8, dtype=torch.float64)
    load[0, 3] = 20.0
    old = Placement.initial(1, 8, 16, 4)
    placement = get_policy("topk")(load, num_physical=16, num_ranks=4, old=old)
    slots = placement.log2phy[0, 3][placement.log2phy[0, 3] >= 0]
    assert set((slots // 4).tolist()) == {0, 1, 2, 3}
    assert balancedness(load, placement, 4).aggregate >= 0.75


def test_topk_keeps_spare_slots_that_already_hold_a_chosen_expert():
    # Spare slots 4 and 5 hold experts 0 and 3; expert 3 is hot, so slot 5 keeps it.
    old = Placement.from_phy2log(torch.tensor([[0, 1, 2, 3, 0, 3]]), 4)
    load = torch.tensor([[1.0, 1.0, 1.0, 9.0]])
    placement = get_policy("topk")(load, num_physical=6, num_ranks=3, old=old)
    assert placement.phy2log[0, 5] == 3
    assert placement.logcnt.tolist() == [[1, 1, 1, 3]]
    assert (placement.phy2log != old.phy2log).sum() == 1


def test_topk_starts_from_the_initial_placement():
    load = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 9.0]])
    placement = get_policy("topk")(load, num_physical=8, num_ranks=4)
    initial = Placement.initial(1, 6, 8, 4)
    assert (placement.phy2log != initial.phy2log).sum() <= 2
    assert placement.logcnt[0, 5] == 3


# ---------------------------------------------------------------------- bad input
BAD_INPUTS = [
    (torch.tensor([[1.0, -2.0, 3.0, 4.0]]), {}, r"load contains a negative value \(-2\); loads must be >= 0"),
    (torch.tensor([[1.0, float("nan"), 3.0, 4.0]]), {}, r"load contains NaN or inf"),
    (torch.tensor([[1.0, float("inf"), 3.0, 4.0]]), {}, r"load contains NaN or inf"),
    (torch.ones(4), {}, r"load must be a \[L, E\] tensor .*got shape \(4,\)"),
    (torch.ones(1, 2, 4), {}, r"load must be a \[L, E\] tensor .*got shape \(1, 2, 4\)"),
    (torch.ones(1, 0), {}, r"load has no experts"),
    ("not a load", {}, r"load must be a \[L, E\] tensor"),
    (torch.ones(1, 4), {"num_physical": 3, "num_ranks": 1}, r"num_physical \(3\) must be >= num_logical"),
    (torch.ones(1, 4), {"num_physical": 6}, r"num_physical \(6\) must be a multiple of num_ranks \(4\)"),
    (torch.ones(1, 4), {"num_groups": 3}, r"num_logical \(4\) must be a multiple of num_groups \(3\)"),
    (torch.ones(1, 4), {"num_nodes": 3}, r"num_ranks \(4\) must be a multiple of num_nodes \(3\)"),
    (torch.ones(1, 4), {"num_ranks": 0}, r"num_ranks \(0\) must be > 0"),
    (torch.ones(1, 4), {"old": Placement.initial(2, 4, 8, 4)}, r"old placement is .* pass the placement"),
]


@pytest.mark.parametrize("name", ["default", "topk"])
@pytest.mark.parametrize(("load", "overrides", "match"), BAD_INPUTS)
def test_bad_input_raises_a_clear_error(name, load, overrides, match):
    kwargs = dict(num_physical=8, num_groups=1, num_nodes=1, num_ranks=4) | overrides
    with pytest.raises(EPLBError, match=match):
        get_policy(name)(load, **kwargs)


# ---------------------------------------------------------------------- registry
def test_builtin_policies_are_registered():
    assert {"default", "topk"} <= set(available_policies())


def test_unknown_policy_name_lists_the_registered_ones():
    with pytest.raises(EPLBError, match=r"unknown policy 'nope'; registered policies: .*default.*topk"):
        get_policy("nope")
    with pytest.raises(ValidationError, match=r"policy 'nope' is not registered"):
        EPLBConfig(use_async=False, policy="nope")


@pytest.fixture
def plugin_name():
    name = "test_round_robin"
    yield name
    unregister_policy(name)


def _round_robin(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
    num_layers, num_logical = load.shape
    row = torch.arange(num_physical) % num_logical
    return Placement.from_phy2log(row.expand(num_layers, -1), num_logical)


def test_plugin_policy_works_with_get_policy_and_sync_config(plugin_name):
    register_policy(plugin_name)(_round_robin)
    assert plugin_name in available_policies()
    placement = get_policy(plugin_name)(torch.ones(2, 4), num_physical=6, num_ranks=2)
    assert placement.phy2log.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert EPLBConfig(use_async=False, policy=plugin_name).policy == plugin_name
    async_rule = rf"Async EPLB is only supported with the default policy \(got policy='{plugin_name}'\)"
    with pytest.raises(ValidationError, match=async_rule):
        EPLBConfig(use_async=True, policy=plugin_name)
    with pytest.raises(ValidationError, match=r"Async EPLB is only supported .*to use 'topk'"):
        EPLBConfig(policy="topk")
    assert EPLBConfig(use_async=False, policy="topk").policy == "topk"


def test_registering_a_taken_name_needs_override(plugin_name):
    register_policy(plugin_name)(_round_robin)
    with pytest.raises(EPLBError, match=rf"policy '{plugin_name}' is already registered; pass override=True"):
        register_policy(plugin_name)(_round_robin)

    @register_policy(plugin_name, override=True)
    def everything_on_expert_zero_first(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
        num_layers, num_logical = load.shape
        extra = torch.zeros(num_physical - num_logical, dtype=torch.int64)
        row = torch.cat([torch.arange(num_logical), extra])
        return Placement.from_phy2log(row.expand(num_layers, -1), num_logical)

    placement = get_policy(plugin_name)(torch.ones(1, 4), num_physical=6, num_ranks=2)
    assert placement.phy2log.tolist() == [[0, 1, 2, 3, 0, 0]]


def test_plugin_output_is_checked(plugin_name):
    @register_policy(plugin_name)
    def not_a_placement(load, **kwargs):
        return load

    with pytest.raises(EPLBError, match=rf"policy '{plugin_name}' returned Tensor, expected a Placement"):
        get_policy(plugin_name)(torch.ones(1, 4), num_physical=4, num_ranks=2)

    @register_policy(plugin_name, override=True)
    def missing_expert(load, *, num_physical, **kwargs):
        only_expert_zero = torch.zeros(load.shape[0], num_physical, dtype=torch.int64)
        return Placement.from_phy2log(only_expert_zero, load.shape[1])

    with pytest.raises(EPLBError, match=rf"'{plugin_name}' returned an invalid placement: .*no replica"):
        get_policy(plugin_name)(torch.ones(1, 4), num_physical=4, num_ranks=2)

    @register_policy(plugin_name, override=True)
    def wrong_size(load, **kwargs):
        return Placement.initial(load.shape[0], load.shape[1], load.shape[1], 1)

    with pytest.raises(EPLBError, match=rf"policy '{plugin_name}' returned Placement\(L=1, E=4, P=4\)"):
        get_policy(plugin_name)(torch.ones(1, 4), num_physical=8, num_ranks=2)


def test_register_policy_rejects_an_empty_name():
    with pytest.raises(EPLBError, match="policy name must be a non-empty string"):
        register_policy("")
