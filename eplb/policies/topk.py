"""The ``topk`` policy: replicate the hottest experts into the spare slots, move almost nothing.

Legend: L layers, E logical experts, P physical slots, G ranks, S = P // G slots per rank,
T = P - E spare slots per layer.

Every logical expert keeps one primary copy where it is; only the ``T`` spare slots of a layer can
change, so a rebalance moves at most ``T`` experts per layer. The spare slots are the redundant
copies of the placement in effect, chosen so that every rank has its share of them (as
`Placement.initial` spreads its redundant slots): each expert with several copies keeps as primary
the copy on the rank with the most spare candidates beyond its share. A layer whose new plan would
have a heavier busiest rank than the placement in effect, on the given load, keeps that placement.
Replica counts follow the `default` policy's rule (each spare slot to the expert with the largest
load per replica, so a very hot expert can get several). Node and group structure is not
used. Sync mode only: `EPLBConfig` rejects ``policy="topk"`` with ``use_async=True``.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.placement import Placement
from eplb.policies import _register
from eplb.policies.default import replicate
from eplb.policies.local_search import _max_rank_load

__all__ = ["topk_policy"]


@_register("topk", (), override=False, trusted=True)
def topk_policy(
    load: torch.Tensor,
    *,
    num_physical: int,
    num_groups: int = 1,
    num_nodes: int = 1,
    num_ranks: int = 1,
    old: Placement | None = None,
) -> Placement:
    """Give the spare slots to the hottest experts, keeping every expert's primary copy in place.

    Args:
        load: ``[L, E]`` float64 — tokens per logical expert.
        num_physical: ``P``, slots per layer (a multiple of ``num_ranks``).
        num_groups: unused (accepted for the common policy signature).
        num_nodes: unused (accepted for the common policy signature).
        num_ranks: ``G``, each holding ``P // G`` slots.
        old: placement in effect; ``Placement.initial`` when None.

    Returns:
        `Placement` that differs from ``old`` in at most ``P - E`` slots per layer.
    """
    load_LE = np.asarray(load, dtype=np.float64)
    num_layers, num_logical = load_LE.shape
    per_rank = num_physical // num_ranks
    num_spare = num_physical - num_logical
    if old is None:
        old = Placement.initial(num_layers, num_logical, num_physical, num_ranks)
    held_LP = old.phy2log.numpy().copy()
    layer_L1 = np.arange(num_layers)[:, None]
    slot_P = np.arange(num_physical)
    layer_LP = np.broadcast_to(layer_L1, held_LP.shape)
    rank_LP = np.broadcast_to(slot_P // per_rank, held_LP.shape)

    # Step 1: one primary copy per expert; the other T slots are spare, spread over the ranks.
    spare_LP = _spare_slots(held_LP, old.logcnt.numpy(), old.log2phy.numpy(), num_ranks)

    # Step 2: replica counts by the default rule (largest load per replica first).
    _, count_LE = replicate(load_LE, num_physical)
    per_replica_LE = load_LE / count_LE

    # Step 3: a spare slot already holding a chosen expert keeps it: the first count - 1 spare
    # copies of each expert, in slot order. occ = index of a spare slot among the spare copies of
    # its expert (sort spare slots by (expert, slot); primaries sort last).
    key_LP = np.where(spare_LP, held_LP, num_logical) * num_physical + slot_P
    order_LP = np.argsort(key_LP, axis=1)
    group_LP = np.take_along_axis(key_LP, order_LP, 1) // num_physical
    run_start_LP = np.ones_like(spare_LP)
    run_start_LP[:, 1:] = group_LP[:, 1:] != group_LP[:, :-1]
    first_LP = np.maximum.accumulate(np.where(run_start_LP, slot_P, 0), axis=1)
    occ_LP = np.empty_like(held_LP)
    np.put_along_axis(occ_LP, order_LP, slot_P - first_LP, 1)
    kept_LP = spare_LP & (occ_LP < np.take_along_axis(count_LE, held_LP, 1) - 1)
    free_LP = np.ascontiguousarray(spare_LP & ~kept_LP)  # C order: free_LGS below is a view of it
    placed_LE = np.ones_like(count_LE)
    np.add.at(placed_LE, (layer_LP[kept_LP], held_LP[kept_LP]), 1)
    need_LE = count_LE - placed_LE

    # Step 4: the replicas still needed, hottest (load per replica) first, ties by expert id.
    expert_order_LE = np.argsort(-per_replica_LE, axis=1, kind="stable")
    need_cum_LE = np.cumsum(np.take_along_axis(need_LE, expert_order_LE, 1), axis=1)
    todo_pos_LT = (need_cum_LE[:, None, :] <= np.arange(num_spare)[None, :, None]).sum(2)
    todo_LT = np.take_along_axis(expert_order_LE, np.minimum(todo_pos_LT, num_logical - 1), 1)
    num_todo_L = need_cum_LE[:, -1]

    # Step 5: each new replica goes to the least loaded rank with a free slot that does not hold
    # that expert yet (any rank with a free slot if none qualifies), into its lowest free slot.
    occupied_LP = ~free_LP
    rank_load_LG = (np.take_along_axis(per_replica_LE, held_LP, 1) * occupied_LP).reshape(
        num_layers, num_ranks, per_rank
    ).sum(2)
    holds_LGE = np.zeros((num_layers, num_ranks, num_logical), dtype=bool)
    holds_LGE[layer_LP[occupied_LP], rank_LP[occupied_LP], held_LP[occupied_LP]] = True
    free_LGS = free_LP.reshape(num_layers, num_ranks, per_rank)  # view: updates follow free_LP
    for k in range(num_spare):
        rows = np.nonzero(k < num_todo_L)[0]
        if rows.size == 0:
            break
        expert = todo_LT[rows, k]
        has_room = free_LGS[rows].any(2)
        allowed = has_room & ~holds_LGE[rows, :, expert]
        nowhere_new = ~allowed.any(1)  # every rank with room already holds the expert
        allowed[nowhere_new] = has_room[nowhere_new]
        rank = np.where(allowed, rank_load_LG[rows], np.inf).argmin(1)
        slot = rank * per_rank + free_LGS[rows, rank].argmax(1)
        held_LP[rows, slot] = expert
        free_LP[rows, slot] = False
        rank_load_LG[rows, rank] += per_replica_LE[rows, expert]
        holds_LGE[rows, rank, expert] = True

    # Step 6: never worse than the placement in effect on this load (beyond float rounding, so
    # that equal plans do not flip with the summation order).
    old_LP = old.phy2log.numpy()
    worse_L = _max_rank_load(load_LE, held_LP, num_ranks) > _max_rank_load(load_LE, old_LP, num_ranks) * (1 + 1e-9)
    held_LP[worse_L] = old_LP[worse_L]
    return Placement._of_valid(held_LP, num_logical)


def _spare_slots(
    phy2log_LP: np.ndarray, logcnt_LE: np.ndarray, log2phy_LER: np.ndarray, num_ranks: int
) -> np.ndarray:
    """``[L, P]`` bool: the slots that may change (all copies of an expert but its primary).

    Rank ``g``'s share of the ``T = P - E`` spare slots is ``T // G`` (+1 for the first ``T % G``
    ranks). Every copy of a replicated expert starts as a spare candidate; expert by expert, the
    primary is the copy on the rank with the most candidates beyond its share (ties: lowest slot).
    """
    num_layers, num_physical = phy2log_LP.shape
    num_logical = logcnt_LE.shape[1]
    per_rank = num_physical // num_ranks
    num_spare = num_physical - num_logical
    share_G = num_spare // num_ranks + (np.arange(num_ranks) < num_spare % num_ranks)
    rank_P = np.arange(num_physical) // per_rank
    layer_L = np.arange(num_layers)
    spare_LP = np.take_along_axis(logcnt_LE, phy2log_LP, 1) > 1
    excess_LG = spare_LP.reshape(num_layers, num_ranks, per_rank).sum(2) - share_G
    single_LE = logcnt_LE == 1
    # Experts with one copy: that copy is the primary.
    spare_LP[layer_L[:, None].repeat(num_logical, 1)[single_LE], log2phy_LER[:, :, 0][single_LE]] = False
    for e in np.nonzero((logcnt_LE > 1).any(0))[0]:
        rows = np.nonzero(logcnt_LE[:, e] > 1)[0]
        slots_XR = log2phy_LER[rows, e]
        valid_XR = slots_XR >= 0
        rank_XR = rank_P[np.where(valid_XR, slots_XR, 0)]
        score_XR = np.where(valid_XR, excess_LG[rows[:, None], rank_XR], -np.iinfo(np.int64).max)
        pick_X = score_XR.argmax(1)  # first maximum: the lowest slot on ties
        slot_X = slots_XR[np.arange(rows.size), pick_X]
        spare_LP[rows, slot_X] = False
        excess_LG[rows, rank_P[slot_X]] -= 1
    return spare_LP
