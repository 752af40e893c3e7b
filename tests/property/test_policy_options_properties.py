"""Properties of the default policy's options: ``migration_budget`` and ``refine``.

Legend: L layers, E logical experts, P physical slots, G ranks, N nodes.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from property.strategies import Shape, loads, nodes_of_groups, placements, problems, shapes
from scipy.optimize import linear_sum_assignment

from eplb.metrics import balancedness
from eplb.placement import Placement
from eplb.policies import get_policy
from eplb.policies.local_search import moved_slots

TOL = 1e-9  # float rounding of rank-load sums taken in another order


def plan(shape: Shape, load: torch.Tensor, old: Placement | None = None, **options) -> Placement:
    return get_policy("default")(load, old=old, **shape.kwargs(), **options)


def max_rank_load(placement: Placement, load_LE: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``[L]`` the busiest rank's load of each layer."""
    per_replica_LP = torch.gather(load_LE / placement.logcnt, 1, placement.phy2log)
    return per_replica_LP.reshape(placement.num_layers, num_ranks, -1).sum(2).amax(1)


def useful(budget: float, shape: Shape) -> float:
    """``budget``, raised to ``1 / P`` where smaller: a budget that lets no slot move is refused."""
    return max(budget, 1 / shape.num_physical)


def moved_per_layer(new: Placement, old: Placement, shape: Shape) -> np.ndarray:
    return moved_slots(new.phy2log.numpy(), old.phy2log.numpy(), shape.num_logical, shape.num_ranks).sum(1)


@st.composite
def stale_problems(draw):
    """``(shape, load, old)``: ``old`` is a random placement or the plan of a drifted load."""
    shape, load = draw(problems())
    if draw(st.booleans()):
        old = draw(placements(shape))
    else:
        sigma = draw(st.sampled_from([0.05, 0.2, 0.5]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        drifted = load * torch.from_numpy(np.exp(sigma * rng.standard_normal(tuple(load.shape))))
        old = plan(shape, drifted)
    return shape, load, old


# ---------------------------------------------------------------------- migration_budget
@given(stale_problems(), st.floats(0.01, 1.0))
def test_migration_budget_is_never_exceeded(problem, budget):
    shape, load, old = problem
    budget = useful(budget, shape)
    placement = plan(shape, load, old, migration_budget=budget)
    limit = math.floor(budget * shape.num_physical + 1e-9)
    assert (moved_per_layer(placement, old, shape) <= limit).all()
    placement.validate(shape.num_ranks)


@given(stale_problems(), st.floats(0.01, 1.0))
def test_migration_budget_is_never_less_balanced_than_the_stale_plan(problem, budget):
    shape, load, old = problem
    budget = useful(budget, shape)
    placement = plan(shape, load, old, migration_budget=budget)
    G = shape.num_ranks
    assert (max_rank_load(placement, load, G) <= max_rank_load(old, load, G) * (1 + TOL)).all()
    assert balancedness(load, placement, G).aggregate >= balancedness(load, old, G).aggregate - TOL


@given(stale_problems())
def test_migration_budget_takes_the_fresh_plan_when_it_fits(problem):
    shape, load, old = problem
    fresh = plan(shape, load, old)
    needed = int(moved_per_layer(fresh, old, shape).max())
    budget = max(needed, 1) / shape.num_physical
    placement = plan(shape, load, old, migration_budget=budget)
    # Every layer whose fresh plan is clearly better than the stale one takes it whole.
    G = shape.num_ranks
    better_L = max_rank_load(fresh, load, G) < max_rank_load(old, load, G) * (1 - 1e-6)
    assert torch.equal(placement.phy2log[better_L], fresh.phy2log[better_L])


@given(problems(hierarchical=True), st.floats(0.01, 1.0), st.integers(0, 2**32 - 1))
def test_migration_budget_keeps_every_replica_of_a_group_on_its_node(problem, budget, seed):
    shape, load = problem
    budget = useful(budget, shape)
    drift = np.exp(0.3 * np.random.default_rng(seed).standard_normal(tuple(load.shape)))
    old = plan(shape, load * torch.from_numpy(drift))  # hierarchical: each group on one node
    placement = plan(shape, load, old, migration_budget=budget)
    for node_of_group in nodes_of_groups(placement, shape):
        assert all(len(nodes) == 1 for nodes in node_of_group.values())


@given(problems(hierarchical=True), st.floats(0.01, 1.0), st.sampled_from([0.2, 0.5, 1.0]), st.integers(0, 2**32 - 1))
def test_migration_budget_exchanging_groups_between_nodes_keeps_every_promise(problem, budget, sigma, seed):
    # A drifted hierarchical plan as the placement in effect: the budget may pay for exchanging
    # whole groups between nodes. Within the budget, never less balanced than the stale plan,
    # every group on one node.
    shape, load = problem
    budget = useful(budget, shape)
    drift = np.exp(sigma * np.random.default_rng(seed).standard_normal(tuple(load.shape)))
    old = plan(shape, load * torch.from_numpy(drift))
    placement = plan(shape, load, old, migration_budget=budget)
    placement.validate(shape.num_ranks)
    assert (moved_per_layer(placement, old, shape) <= math.floor(budget * shape.num_physical + 1e-9)).all()
    G = shape.num_ranks
    assert (max_rank_load(placement, load, G) <= max_rank_load(old, load, G) * (1 + TOL)).all()
    for node_of_group in nodes_of_groups(placement, shape):
        assert all(len(nodes) == 1 for nodes in node_of_group.values())


@given(stale_problems(), st.floats(0.01, 1.0))
def test_migration_budget_is_deterministic(problem, budget):
    shape, load, old = problem
    budget = useful(budget, shape)
    assert plan(shape, load, old, migration_budget=budget).equals(plan(shape, load, old, migration_budget=budget))


# ---------------------------------------------------------------------- refine
@given(problems(), st.booleans())
def test_refine_never_lowers_balancedness(problem, with_old):
    shape, load = problem
    old = plan(shape, load.flip(1)) if with_old else None
    plain = plan(shape, load, old)
    refined = plan(shape, load, old, refine=True)
    G = shape.num_ranks
    assert (max_rank_load(refined, load, G) <= max_rank_load(plain, load, G) * (1 + TOL)).all()
    assert balancedness(load, refined, G).aggregate >= balancedness(load, plain, G).aggregate - TOL
    assert torch.equal(refined.logcnt, plain.logcnt)  # swaps only: replica counts unchanged
    refined.validate(G)


@given(problems(hierarchical=True))
def test_refine_keeps_every_replica_of_a_group_on_its_node(problem):
    shape, load = problem
    placement = plan(shape, load, refine=True)
    for node_of_group in nodes_of_groups(placement, shape):
        assert all(len(nodes) == 1 for nodes in node_of_group.values())


@given(stale_problems(), st.floats(0.01, 1.0))
def test_refine_and_budget_together_keep_both_promises(problem, budget):
    shape, load, old = problem
    budget = useful(budget, shape)
    placement = plan(shape, load, old, migration_budget=budget, refine=True)
    assert (moved_per_layer(placement, old, shape) <= math.floor(budget * shape.num_physical + 1e-9)).all()
    G = shape.num_ranks
    assert (max_rank_load(placement, load, G) <= max_rank_load(old, load, G) * (1 + TOL)).all()


@given(stale_problems(), st.floats(0.01, 1.0))
def test_refine_with_a_budget_is_never_less_balanced_than_the_budget_alone(problem, budget):
    # The budgeted search aims at the refined fresh plan with refine=True: that target may lead it
    # to a worse end within the budget than the plain one, so refine must keep the better of both.
    shape, load, old = problem
    budget = useful(budget, shape)
    alone = plan(shape, load, old, migration_budget=budget)
    refined = plan(shape, load, old, migration_budget=budget, refine=True)
    G = shape.num_ranks
    assert (moved_per_layer(refined, old, shape) <= math.floor(budget * shape.num_physical + 1e-9)).all()
    assert (max_rank_load(refined, load, G) <= max_rank_load(alone, load, G) * (1 + TOL)).all()
    assert balancedness(load, refined, G).aggregate >= balancedness(load, alone, G).aggregate - TOL
    refined.validate(G)


def test_refine_with_a_budget_keeps_the_better_plan_on_a_known_case():
    # A case where the search towards the refined fresh plan ends at 0.9863 and the plain one at 1.
    shape = Shape(1, 8, 12, 1, 1, 3)
    first = torch.tensor([[18, 10, 15, 6, 17, 19, 10, 2]], dtype=torch.float64)
    drift = torch.tensor([[17, 13, 15, 8, 16, 13, 19, 7]], dtype=torch.float64)
    old = plan(shape, first)
    alone = plan(shape, drift, old, migration_budget=0.25)
    refined = plan(shape, drift, old, migration_budget=0.25, refine=True)
    assert balancedness(drift, alone, 3).aggregate == pytest.approx(1.0)
    assert balancedness(drift, refined, 3).aggregate == pytest.approx(1.0)
    assert (moved_per_layer(refined, old, shape) <= 3).all()


# ---------------------------------------------------------------------- one slot per rank
@given(st.data())
def test_one_slot_per_rank_relabel_keeps_the_most_experts_in_place(data):
    # With one slot per rank the best rank assignment is a maximum matching of copies; compare the
    # experts kept in place with the optimum of the rank-level assignment problem.
    num_ranks = data.draw(st.integers(1, 12))
    num_logical = data.draw(st.integers(1, num_ranks))
    shape = Shape(data.draw(st.integers(1, 3)), num_logical, num_ranks, 1, 1, num_ranks)
    load = data.draw(loads(shape))
    old = data.draw(placements(shape))
    moved = plan(shape, load, old)
    for l in range(shape.num_layers):
        new_row, old_row = moved.phy2log[l].numpy(), old.phy2log[l].numpy()
        stay_GG = (new_row[:, None] == old_row[None, :]).astype(int)
        rows, cols = linear_sum_assignment(stay_GG, maximize=True)
        assert int((new_row == old_row).sum()) == int(stay_GG[rows, cols].sum())
        assert Counter(new_row.tolist()) == Counter(plan(shape, load).phy2log[l].tolist())


@given(shapes(max_layers=2), st.data())
def test_options_leave_the_plan_without_old_unchanged_except_refine(shape, data):
    load = data.draw(loads(shape))
    # migration_budget needs a placement in effect; without one the plan is the reference plan.
    assert plan(shape, load, migration_budget=useful(0.1, shape)).equals(plan(shape, load))
