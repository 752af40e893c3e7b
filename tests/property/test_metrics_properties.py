"""Invariants of the balancedness metrics over random loads and placements, and a differential
check of `rank_loads` against a slow per-slot reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eplb.metrics import balancedness, predicted_gain, rank_loads, rank_share
from eplb.placement import Placement


@st.composite
def placements(draw, num_layers=None, num_logical=None, num_ranks=None):
    """(placement, G): every expert once plus random extra replicas, slots shuffled per layer."""
    L = num_layers if num_layers is not None else draw(st.integers(1, 4))
    E = num_logical if num_logical is not None else draw(st.integers(1, 12))
    G = num_ranks if num_ranks is not None else draw(st.integers(1, 6))
    P = E + draw(st.integers(0, 2 * G))
    P += -P % G  # round up to a multiple of G
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(L):
        extra = torch.randint(0, E, (P - E,), generator=gen)
        row = torch.cat([torch.arange(E), extra])
        rows.append(row[torch.randperm(P, generator=gen)])
    return Placement.from_phy2log(torch.stack(rows), E), G


@st.composite
def load_and_placement(draw):
    placement, G = draw(placements())
    L, E = placement.num_layers, placement.num_logical
    values = draw(
        st.lists(
            st.one_of(st.integers(0, 10_000).map(float), st.floats(0, 1e6, allow_nan=False)),
            min_size=L * E,
            max_size=L * E,
        )
    )
    return torch.tensor(values, dtype=torch.float64).reshape(L, E), placement, G


def reference_rank_loads(load_LE, placement, G):
    """Slow, obviously correct: walk every slot, give it load / replicas of its expert."""
    S = placement.num_physical // G
    out = [[0.0] * G for _ in range(placement.num_layers)]
    for l in range(placement.num_layers):
        for s in range(placement.num_physical):
            e = int(placement.phy2log[l, s])
            out[l][s // S] += float(load_LE[l, e]) / int(placement.logcnt[l, e])
    return torch.tensor(out, dtype=torch.float64)


@given(load_and_placement())
def test_balancedness_is_in_zero_one(case):
    load_LE, placement, G = case
    b = balancedness(load_LE, placement, G)
    assert 0 < b.aggregate <= 1
    assert ((b.per_layer > 0) & (b.per_layer <= 1)).all()
    assert b.imbalance >= 1 and (b.per_layer_imbalance >= 1).all()
    assert b.imbalance == pytest.approx(1 / b.aggregate)
    assert torch.allclose(b.per_layer * b.per_layer_imbalance, torch.ones_like(b.per_layer))


@given(load_and_placement(), st.floats(1e-3, 1e3))
def test_balancedness_is_invariant_to_scaling_the_load(case, scale):
    load_LE, placement, G = case
    b = balancedness(load_LE, placement, G)
    scaled = balancedness(load_LE * scale, placement, G)
    assert scaled.aggregate == pytest.approx(b.aggregate, rel=1e-9)
    assert torch.allclose(scaled.per_layer, b.per_layer, rtol=1e-9)


@given(load_and_placement())
def test_rank_loads_sum_to_the_layers_total_load(case):
    load_LE, placement, G = case
    loads_LG = rank_loads(load_LE, placement, G)
    assert loads_LG.shape == (placement.num_layers, G)
    assert torch.allclose(loads_LG.sum(1), load_LE.sum(1), rtol=1e-12, atol=1e-6)


@given(load_and_placement())
def test_rank_loads_match_the_per_slot_reference_and_rank_share(case):
    load_LE, placement, G = case
    loads_LG = rank_loads(load_LE, placement, G)
    assert torch.allclose(loads_LG, reference_rank_loads(load_LE, placement, G), rtol=1e-12, atol=1e-6)
    share_LEG = rank_share(placement, G)
    ones_LE = torch.ones(placement.num_layers, placement.num_logical, dtype=torch.float64)
    assert torch.allclose(share_LEG.sum(-1), ones_LE)
    assert torch.allclose(torch.einsum("le,leg->lg", load_LE, share_LEG), loads_LG, rtol=1e-12, atol=1e-6)


@given(load_and_placement())
def test_aggregate_lies_between_the_layers_balancedness(case):
    # sum mean / sum max is a max-weighted mean of the per-layer ratios of the loaded layers.
    load_LE, placement, G = case
    b = balancedness(load_LE, placement, G)
    loaded = load_LE.sum(1) > 0
    if loaded.any():
        assert b.per_layer[loaded].min() - 1e-12 <= b.aggregate <= b.per_layer[loaded].max() + 1e-12


@given(load_and_placement(), st.randoms(use_true_random=False))
def test_balancedness_does_not_depend_on_rank_order(case, rng):
    load_LE, placement, G = case
    S = placement.num_physical // G
    ranks = list(range(G))
    rng.shuffle(ranks)
    blocks = placement.phy2log.view(placement.num_layers, G, S)[:, ranks].reshape(placement.num_layers, -1)
    permuted = Placement.from_phy2log(blocks, placement.num_logical)
    expected = balancedness(load_LE, placement, G).aggregate
    assert balancedness(load_LE, permuted, G).aggregate == pytest.approx(expected)


@given(load_and_placement(), st.data())
def test_predicted_gain_is_antisymmetric(case, data):
    load_LE, old, G = case
    new, _ = data.draw(placements(old.num_layers, old.num_logical, G))
    gain = predicted_gain(load_LE, old, new, G)
    assert gain == pytest.approx(-predicted_gain(load_LE, new, old, G))
    b_new, b_old = balancedness(load_LE, new, G), balancedness(load_LE, old, G)
    assert gain == pytest.approx(b_new.aggregate - b_old.aggregate)
    assert predicted_gain(load_LE, old, old, G) == 0.0
