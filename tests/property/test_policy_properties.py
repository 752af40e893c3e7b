"""Properties of the built-in policies: invariants, metamorphic relations, and the fast ``default``
policy against the slow pure-Python reference (tests/reference_policy.py).

Legend: L layers, E logical experts, P physical slots, G ranks, N nodes, S = P // G slots per rank.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from property.strategies import LOAD_KINDS, loads, nodes_of_groups, one_per_pack_shapes, placements, problems, shapes
from reference_policy import reference_default

from eplb.placement import Placement
from eplb.policies import get_policy
from eplb.policies.default import relabel, replicate

POLICIES = ("default", "topk")


def plan(name: str, shape, load: torch.Tensor, old: Placement | None = None) -> Placement:
    return get_policy(name)(load, old=old, **shape.kwargs())


def rank_multisets(placement: Placement, num_ranks: int) -> list[list[tuple[int, ...]]]:
    """Per layer, the sorted list of each rank's sorted experts: what relabeling must preserve."""
    slots_LGS = placement.phy2log.reshape(placement.num_layers, num_ranks, -1).sort(2).values
    return [sorted(map(tuple, layer.tolist())) for layer in slots_LGS]


def sorted_rank_loads(placement: Placement, load_LE: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``[L, G]`` rank loads, slot loads summed in sorted order so slot order cannot change them."""
    per_replica_LP = torch.gather(load_LE / placement.logcnt, 1, placement.phy2log)
    per_replica_LGS = per_replica_LP.reshape(placement.num_layers, num_ranks, -1).sort(2).values
    return per_replica_LGS.sum(2).sort(1).values


def max_rank_load(placement: Placement, load_LE: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``[L]`` the busiest rank's load of each layer."""
    return sorted_rank_loads(placement, load_LE, num_ranks)[:, -1]


def transfers(new: Placement, old: Placement, num_ranks: int) -> int:
    """Slots whose expert is not on the same rank in ``old``."""
    per_rank = new.num_physical // num_ranks
    count = 0
    for l in range(new.num_layers):
        for s, e in enumerate(new.phy2log[l].tolist()):
            r = s // per_rank
            count += e not in old.phy2log[l, r * per_rank : (r + 1) * per_rank].tolist()
    return count


# ---------------------------------------------------------------------- fast == reference
@given(problems())
def test_fast_default_equals_reference(problem):
    shape, load = problem
    expected = reference_default(load.tolist(), **shape.kwargs())
    assert plan("default", shape, load).phy2log.tolist() == expected


@given(problems(hierarchical=True, kind="ties"))
def test_fast_default_equals_reference_with_many_ties(problem):
    shape, load = problem
    assert plan("default", shape, load).phy2log.tolist() == reference_default(load.tolist(), **shape.kwargs())


@given(st.data())
def test_fast_default_equals_reference_with_one_item_per_pack(data):
    shape = data.draw(one_per_pack_shapes())
    load = data.draw(loads(shape, data.draw(st.sampled_from(LOAD_KINDS))))
    assert plan("default", shape, load).phy2log.tolist() == reference_default(load.tolist(), **shape.kwargs())


# ---------------------------------------------------------------------- invariants
@pytest.mark.parametrize("name", POLICIES)
@given(problem=problems())
def test_every_logical_expert_has_a_replica_and_maps_agree(name, problem):
    shape, load = problem
    placement = plan(name, shape, load)
    assert (placement.logcnt >= 1).all()
    assert (placement.logcnt.sum(1) == shape.num_physical).all()
    for l in range(shape.num_layers):
        counts = Counter(placement.phy2log[l].tolist())
        for e in range(shape.num_logical):
            slots = [s for s in placement.log2phy[l, e].tolist() if s >= 0]
            assert slots == sorted(slots) and len(slots) == counts[e] == placement.logcnt[l, e]
            assert all(placement.phy2log[l, s] == e for s in slots)
    per_rank = shape.num_physical // shape.num_ranks
    covered = [s for g in range(shape.num_ranks) for s in placement.slots_of_rank(g, shape.num_ranks)]
    assert covered == list(range(shape.num_physical))
    assert all(len(placement.slots_of_rank(g, shape.num_ranks)) == per_rank for g in range(shape.num_ranks))
    placement.validate(shape.num_ranks)


@given(problems(hierarchical=True), st.booleans())
def test_hierarchical_keeps_every_replica_of_a_group_on_its_node(problem, with_old):
    shape, load = problem
    old = plan("default", shape, load.flip(1)) if with_old else None
    placement = plan("default", shape, load, old=old)
    for node_of_group in nodes_of_groups(placement, shape):
        assert all(len(nodes) == 1 for nodes in node_of_group.values())
        per_node = Counter(next(iter(nodes)) for nodes in node_of_group.values())
        assert set(per_node.values()) == {shape.num_groups // shape.num_nodes}


# ---------------------------------------------------------------------- metamorphic relations
@pytest.mark.parametrize("name", POLICIES)
@given(problem=problems(), exponent=st.integers(-20, 20))
def test_scaling_by_a_power_of_two_changes_nothing(name, problem, exponent):
    # Power-of-two scaling is exact in floating point, so even tied loads must give the same plan.
    shape, load = problem
    scaled = load * 2.0**exponent
    assume(torch.equal(scaled * 2.0**-exponent, load))  # exact only without underflow (subnormals) or overflow
    assert plan(name, shape, scaled).equals(plan(name, shape, load))


@pytest.mark.parametrize("name", POLICIES)
@given(problem=problems(kind="continuous"), factor=st.floats(1e-3, 1e3))
def test_scaling_by_a_positive_constant_changes_nothing(name, problem, factor):
    shape, load = problem
    assert plan(name, shape, load * factor).equals(plan(name, shape, load))


@st.composite
def structure_preserving_permutations(draw, shape) -> np.ndarray:
    """``perm [E]``: groups permuted, experts permuted within each group (groups stay valid)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    group_size = shape.num_logical // shape.num_groups
    group_order = rng.permutation(shape.num_groups)
    return np.concatenate([g * group_size + rng.permutation(group_size) for g in group_order])


@given(data=st.data())
def test_permuting_experts_permutes_the_plan(data):
    shape, load = data.draw(problems(kind="continuous"))
    perm = data.draw(structure_preserving_permutations(shape))
    inverse = np.argsort(perm)
    # New expert j is old expert perm[j]; old expert e is called inverse[e] now.
    permuted = plan("default", shape, load[:, torch.from_numpy(perm)])
    expected = torch.from_numpy(inverse)[plan("default", shape, load).phy2log]
    one_per_pack = shape.num_physical == shape.num_ranks or (
        shape.hierarchical and shape.num_groups == shape.num_nodes > 1
    )
    if one_per_pack:
        # With one item per pack the reference keeps items in place rather than sorting them, so
        # the plan is equivariant only up to a relabeling of nodes and ranks.
        expected_placement = Placement.from_phy2log(expected, shape.num_logical)
        assert rank_multisets(permuted, shape.num_ranks) == rank_multisets(expected_placement, shape.num_ranks)
    else:
        assert torch.equal(permuted.phy2log, expected)


# ---------------------------------------------------------------------- relabeling
@given(data=st.data())
def test_relabeling_never_changes_per_rank_loads(data):
    shape, load = data.draw(problems())
    old = data.draw(st.one_of(placements(shape), st.just(None)))
    if old is None:  # the realistic case: the previous plan of a drifted load
        old = plan("default", shape, data.draw(loads(shape)))
    fresh = plan("default", shape, load)
    moved = plan("default", shape, load, old=old)
    assert rank_multisets(moved, shape.num_ranks) == rank_multisets(fresh, shape.num_ranks)
    G = shape.num_ranks
    assert torch.equal(sorted_rank_loads(moved, load, G), sorted_rank_loads(fresh, load, G))
    assert transfers(moved, old, shape.num_ranks) <= transfers(fresh, old, shape.num_ranks)
    nodes = shape.num_nodes if shape.hierarchical else 1
    assert relabel(fresh, old, num_ranks=shape.num_ranks, num_nodes=nodes).equals(moved)


@given(problems())
def test_relabeling_a_plan_against_itself_moves_nothing(problem):
    shape, load = problem
    placement = plan("default", shape, load)
    assert plan("default", shape, load, old=placement).equals(placement)


@given(data=st.data())
def test_relabeling_keeps_staying_experts_in_their_old_slot(data):
    shape, load = data.draw(problems())
    old = data.draw(placements(shape))
    moved = plan("default", shape, load, old=old)
    per_rank = shape.num_physical // shape.num_ranks
    for l in range(shape.num_layers):
        for g in range(shape.num_ranks):
            rank = slice(g * per_rank, (g + 1) * per_rank)
            new_slots, old_slots = moved.phy2log[l, rank].tolist(), old.phy2log[l, rank].tolist()
            # An expert on this rank before and after has min(old, new) copies in unchanged slots.
            for e in set(new_slots) & set(old_slots):
                same = sum(n == o == e for n, o in zip(new_slots, old_slots))
                assert same == min(new_slots.count(e), old_slots.count(e))


# ---------------------------------------------------------------------- topk
@given(data=st.data())
def test_topk_changes_at_most_the_spare_slots(data):
    shape, load = data.draw(problems())
    old = data.draw(st.one_of(placements(shape), st.just(None)))
    base = old if old is not None else Placement.initial(
        shape.num_layers, shape.num_logical, shape.num_physical, shape.num_ranks
    )
    placement = plan("topk", shape, load, old=old)
    changed_L = (placement.phy2log != base.phy2log).sum(1)
    assert (changed_L <= shape.num_physical - shape.num_logical).all()
    # Every expert keeps a primary copy: one of its slots in the old placement still holds it.
    kept_LP = (placement.phy2log == base.phy2log)
    kept_LE = torch.zeros(shape.num_layers, shape.num_logical, dtype=torch.bool)
    kept_LE.scatter_reduce_(1, base.phy2log, kept_LP, reduce="amax")
    assert kept_LE.all()


@given(data=st.data())
def test_topk_is_never_worse_than_the_placement_it_starts_from(data):
    shape, load = data.draw(problems())
    old = data.draw(st.one_of(placements(shape), st.just(None)))
    if old is None:  # the realistic case: a default plan of a drifted load
        old = plan("default", shape, data.draw(loads(shape)))
    placement = plan("topk", shape, load, old=old)
    G = shape.num_ranks
    assert (max_rank_load(placement, load, G) <= max_rank_load(old, load, G) * (1 + 1e-9)).all()


@given(problems())
def test_topk_replica_counts_follow_the_default_rule(problem):
    shape, load = problem
    _, count_LE = replicate(load.numpy(), shape.num_physical)
    placement = plan("topk", shape, load)
    initial = Placement.initial(shape.num_layers, shape.num_logical, shape.num_physical, shape.num_ranks)
    for layer, counts in enumerate(placement.logcnt.tolist()):
        # A layer whose plan would be worse than the initial placement keeps the initial one.
        assert counts == count_LE[layer].tolist() or torch.equal(placement.phy2log[layer], initial.phy2log[layer])


@given(shapes(), st.data())
def test_topk_is_stable_when_the_load_does_not_change(shape, data):
    load = data.draw(loads(shape))
    first = plan("topk", shape, load)
    assert plan("topk", shape, load, old=first).equals(first)
