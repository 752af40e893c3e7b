"""Properties of the transfer plan: simulating every rank's plan in one process turns the old
placement into the new one, with the fewest network transfers, reading only old contents.

Legend: G ranks, S slots per rank, P = G * S slots, E logical experts.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eplb.errors import EPLBError
from eplb.transfer import plan_layer_transfer


@st.composite
def layer_changes(draw):
    """(G, old_P, new_P): two valid placements of one layer (every expert has a replica)."""
    G = draw(st.integers(1, 4))
    S = draw(st.integers(1, 4))
    P = G * S
    E = draw(st.integers(1, P))

    def random_row():
        extra = draw(st.lists(st.integers(0, E - 1), min_size=P - E, max_size=P - E))
        return draw(st.permutations(list(range(E)) + extra))

    old = random_row()
    if draw(st.booleans()):
        new = random_row()
    else:  # a few swaps of the old row: most slots unchanged
        new = list(old)
        for a, b in draw(st.lists(st.tuples(st.integers(0, P - 1), st.integers(0, P - 1)), max_size=3)):
            new[a], new[b] = new[b], new[a]
    return G, old, new


def plans_of(G, old, new):
    return [plan_layer_transfer(torch.tensor(old), torch.tensor(new), rank=r, num_ranks=G) for r in range(G)]


def simulate(G, old, plans):
    """Run every rank's plan on slot contents (the expert id stands for its weights)."""
    S = len(old) // G
    staging = [dict() for _ in range(G)]
    for t in plans[0].transfers:
        # The sender reads an OLD slot of its own that holds the expert.
        assert t.src_slot // S == t.src_rank != t.dst_rank and t.dst_slot // S == t.dst_rank
        assert old[t.src_slot] == t.expert
        staging[t.dst_rank][t.dst_slot - t.dst_rank * S] = old[t.src_slot]
    final = list(old)
    for r, plan in enumerate(plans):
        for c in plan.copies:
            if c.from_staging:
                assert c.src_local in staging[r], "copy from a staging slot that was not received"
                staging[r][c.dst_local] = staging[r][c.src_local]
            else:
                staging[r][c.dst_local] = old[r * S + c.src_local]
        assert set(staging[r]) == set(plan.changed_local), "staging filled exactly the changed slots"
        for j in plan.changed_local:
            final[r * S + j] = staging[r][j]
    return final


@given(layer_changes())
def test_simulated_plans_reach_the_new_placement(change):
    G, old, new = change
    assert simulate(G, old, plans_of(G, old, new)) == new


@given(layer_changes())
def test_network_transfers_are_the_minimum(change):
    G, old, new = change
    S = len(old) // G
    held = {(e, s // S) for s, e in enumerate(old)}
    needed = {(e, s // S) for s, e in enumerate(new) if old[s] != e and (e, s // S) not in held}
    plans = plans_of(G, old, new)
    assert plans[0].num_network_transfers == len(needed)
    assert {(t.expert, t.dst_rank) for t in plans[0].transfers} == needed


@given(layer_changes())
def test_all_ranks_agree_and_unchanged_slots_are_untouched(change):
    G, old, new = change
    S = len(old) // G
    plans = plans_of(G, old, new)
    for r, plan in enumerate(plans):
        assert plan.transfers == plans[0].transfers
        assert plan.num_changed_slots == plans[0].num_changed_slots
        assert plan.num_local_copies == plans[0].num_local_copies
        assert list(plan.changed_local) == [j for j in range(S) if old[r * S + j] != new[r * S + j]]
    changed = sum(a != b for a, b in zip(old, new))
    assert plans[0].num_changed_slots == changed == plans[0].num_network_transfers + plans[0].num_local_copies
    assert plans[0].moves_nothing == (old == new)


@given(layer_changes())
def test_sends_spread_over_holders(change):
    """No holder sends two more experts than another holder of the same expert could have."""
    G, old, new = change
    S = len(old) // G
    holders = {}
    for s, e in enumerate(old):
        holders.setdefault(e, set()).add(s // S)
    sent = [0] * G
    for t in plans_of(G, old, new)[0].transfers:
        assert sent[t.src_rank] == min(sent[h] for h in holders[t.expert])
        sent[t.src_rank] += 1


@given(layer_changes(), st.integers(1, 8), st.integers(1, 40))
def test_batches_partition_transfers_within_the_bound(change, expert_bytes, max_bytes):
    G, old, new = change
    plan = plans_of(G, old, new)[0]
    batches = plan.batches(expert_bytes, max_bytes)
    flat = [t for b in batches for t in b]
    assert sorted(flat, key=lambda t: t.dst_slot) == sorted(plan.transfers, key=lambda t: t.dst_slot)
    per_rank = max(1, max_bytes // expert_bytes)
    for b in batches:
        assert b, "no empty batch"
        for r in range(G):
            assert sum((t.src_rank == r) + (t.dst_rank == r) for t in b) <= per_rank


@given(st.integers(2, 5), st.integers(1, 20))
def test_group_size_must_divide_num_physical(G, P):
    row = torch.arange(P)
    if P % G:
        with pytest.raises(EPLBError, match=r"must be a multiple of the number of ranks"):
            plan_layer_transfer(row, row, rank=0, num_ranks=G)
    else:
        assert plan_layer_transfer(row, row, rank=0, num_ranks=G).moves_nothing


@given(st.lists(layer_changes(), min_size=1, max_size=3))
def test_simulator_transfer_count_matches_the_transfer_plan(layers):
    # The simulator counts every layer at once; it must agree with the per-layer plan, summed.
    import numpy as np

    from eplb.simulate import count_transfers

    G = layers[0][0]
    layers = [(g, old, new) for g, old, new in layers if g == G and len(old) == len(layers[0][1])]
    old_LP = np.array([old for _, old, _ in layers], dtype=np.int64)
    new_LP = np.array([new for _, _, new in layers], dtype=np.int64)
    plans = [plan_layer_transfer(torch.tensor(o), torch.tensor(n), rank=0, num_ranks=G) for o, n in zip(old_LP, new_LP)]
    assert count_transfers(old_LP, new_LP, G) == (
        sum(p.num_changed_slots for p in plans), sum(p.num_network_transfers for p in plans)
    )


@given(layer_changes(), st.integers(1, 4))
def test_slot_runs_cover_each_transfer_once_and_match_between_sender_and_receiver(change, per_batch):
    """Merged runs move exactly the batch's transfers, slot for slot, and a sender and its
    receiver see the same runs of their pair in the same order (the matching rule)."""
    from eplb.transfer import slot_runs

    G, old, new = change
    plan = plans_of(G, old, new)[0]
    for batch in plan.batches(expert_bytes=1, max_transfer_bytes=per_batch):
        for rank in range(G):
            runs = slot_runs(batch, rank)
            expanded = [(s, a + i, d, b + i) for s, a, d, b, n in runs for i in range(n)]
            mine = [(t.src_rank, t.src_slot, t.dst_rank, t.dst_slot) for t in batch if rank in (t.src_rank, t.dst_rank)]
            assert sorted(expanded) == sorted(mine)
            for src, dst in {(s, d) for s, _, d, _, _ in runs}:
                pair = [r for r in runs if (r[0], r[2]) == (src, dst)]
                other = dst if src == rank else src
                assert pair == [r for r in slot_runs(batch, other) if (r[0], r[2]) == (src, dst)]


def test_slot_runs_merge_consecutive_slots_of_one_pair():
    from eplb.transfer import NetworkTransfer, slot_runs

    batch = [NetworkTransfer(e, 0, e, 1, 4 + e) for e in range(3)] + [NetworkTransfer(9, 1, 6, 0, 0)]
    assert slot_runs(batch, 0) == [(0, 0, 1, 4, 3), (1, 6, 0, 0, 1)]
    gap = [NetworkTransfer(0, 0, 0, 1, 4), NetworkTransfer(1, 0, 1, 1, 6)]  # destinations not consecutive
    assert slot_runs(gap, 1) == [(0, 0, 1, 4, 1), (0, 1, 1, 6, 1)]
