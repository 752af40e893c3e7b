"""Local search on top of the default plan: a swap search (``refine``) and a migration budget.

Legend: L layers, E logical experts, P physical slots, G ranks, N nodes, S = P // G slots per rank.
Rows X are independent problems (layers, or layers x nodes); M slots per row, K packs (ranks) per
row; C candidate moves per row.

Both searches lower the largest rank load of a layer, one move at a time, and never accept a move
that raises it, so the result is never less balanced than the placement they start from:

- `refine_packing` (``refine=True``): after the greedy packing, swap two slots of different ranks
  when that lowers the heaviest rank's load below its old value without lifting the other rank
  above it, the swap that lowers the maximum most first. Replica counts do not change.
- `limit_migration` (``migration_budget``): a layer whose fresh (relabelled) plan fits the budget
  and is not less balanced takes it whole; otherwise start from the placement in effect and
  apply, one at a time, the move that lowers the busiest rank most per moved slot: a slot takes
  its expert of the fresh plan (two replica counts change), or a slot of the busiest rank swaps
  with a slot of a light rank of its node. With groups on nodes (hierarchical), the search also
  runs from the best exchange of two groups between nodes that fits (`_group_swaps`, the only
  move that changes a node's load), aiming at the default plan for that exchange's
  groups-to-nodes assignment, and each layer keeps the better end. A slot counts as moved when
  its expert was not on its rank in the old placement.

Both are greedy local searches written for eplb (a move's gain is the drop of the busiest rank's
load; for the budget, per moved slot, like a greedy knapsack); they find good placements fast, not
optimal ones.
"""

from __future__ import annotations

import numpy as np

__all__ = ["refine_packing", "limit_migration", "moved_slots"]

_TOL = 1e-9  # relative gain below which a move is not taken (float rounding cannot undo it)
_MIN_GAIN_PER_MOVE = 1e-3  # migration budget: least gain per moved slot, as a fraction of the mean rank load


def _swap_max(
    slot_load_XM: np.ndarray, pack_load_XK: np.ndarray, heavy_X: np.ndarray, per_pack: int,
    partner_XC: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The larger of the two pack loads after each swap of a heavy-pack slot with a partner slot.

    Args:
        slot_load_XM: ``[X, M]`` load of each slot (packs of ``per_pack`` consecutive slots).
        pack_load_XK: ``[X, K]`` load of each pack.
        heavy_X: ``[X]`` the pack whose slots are swapped out (the heaviest).
        per_pack: slots per pack.
        partner_XC: ``[X, C]`` candidate partner packs.

    Returns:
        (pair_max_XSD, heavy_slot_XS, partner_slot_XD): ``[X, S, D]`` ``max(heavy, partner)`` load
        after swapping slot ``heavy_slot[x, a]`` with ``partner_slot[x, b]`` (``D = C * per_pack``;
        ``inf`` where the partner is the heavy pack itself), and the slot ids. Other packs keep
        their loads.
    """
    num_rows = slot_load_XM.shape[0]
    rows_X1 = np.arange(num_rows)[:, None]
    offset_S = np.arange(per_pack)
    heavy_slot_XS = heavy_X[:, None] * per_pack + offset_S
    partner_slot_XD = (partner_XC[:, :, None] * per_pack + offset_S).reshape(num_rows, -1)
    heavy_load_X11 = pack_load_XK[rows_X1[:, 0], heavy_X][:, None, None]
    diff_XSD = slot_load_XM[rows_X1, heavy_slot_XS][:, :, None] - slot_load_XM[rows_X1, partner_slot_XD][:, None, :]
    partner_pack_XD = np.repeat(partner_XC, per_pack, axis=1)
    partner_load_X1D = pack_load_XK[rows_X1, partner_pack_XD][:, None, :]
    pair_max_XSD = np.maximum(heavy_load_X11 - diff_XSD, partner_load_X1D + diff_XSD)
    pair_max_XSD[np.broadcast_to((partner_pack_XD == heavy_X[:, None])[:, None, :], pair_max_XSD.shape)] = np.inf
    return pair_max_XSD, heavy_slot_XS, partner_slot_XD


def _best_swap(
    slot_load_XM: np.ndarray, pack_load_XK: np.ndarray, heavy_X: np.ndarray, per_pack: int,
    partner_XC: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the swap of `_swap_max` with the smallest pair maximum: ``(pair_max, a, b)``, ``[X]`` each."""
    pair_max_XSD, heavy_slot_XS, partner_slot_XD = _swap_max(
        slot_load_XM, pack_load_XK, heavy_X, per_pack, partner_XC
    )
    rows = np.arange(slot_load_XM.shape[0])
    flat_XW = pair_max_XSD.reshape(rows.size, -1)
    best_X = flat_XW.argmin(1)
    per_d = partner_slot_XD.shape[1]
    return flat_XW[rows, best_X], heavy_slot_XS[rows, best_X // per_d], partner_slot_XD[rows, best_X % per_d]


def refine_packing(
    weight_XM: np.ndarray, num_packs: int, max_rounds: int | None = None, num_partners: int = 16
) -> np.ndarray:
    """Swap items between packs while that lowers the heaviest pack of a row.

    Args:
        weight_XM: ``[X, M]`` float64 — weight of the item at each position; pack ``k`` holds
            positions ``[k * M // K, (k + 1) * M // K)``.
        num_packs: ``K``.
        max_rounds: cap on swaps per row (default ``4 * M``).
        num_partners: swaps of the heaviest pack are first tried with the ``num_partners``
            lightest packs, and with every pack only when none of those helps.

    Returns:
        ``[X, M]`` int64 — position permutation: the refined row holds ``weight[x, perm[x, j]]``
        at position ``j``. Each row's heaviest pack is never heavier than before; items only move
        between packs (positions inside a pack keep their order otherwise).
    """
    num_rows, num_items = weight_XM.shape
    per_pack = num_items // num_packs
    perm_XM = np.broadcast_to(np.arange(num_items), (num_rows, num_items)).copy()
    if num_packs < 2 or num_items == 0:
        return perm_XM
    weight_XM = np.array(weight_XM, dtype=np.float64)
    active = np.arange(num_rows)
    num_partners = min(num_partners, num_packs - 1)
    for _ in range(max_rounds if max_rounds is not None else 4 * num_items):
        if active.size == 0:
            break
        w_XM = weight_XM[active]
        load_XK = w_XM.reshape(active.size, num_packs, per_pack).sum(2)
        heavy_X = load_XK.argmax(1)
        heavy_load_X = load_XK[np.arange(active.size), heavy_X]
        # The lightest packs first; rows where none of them helps try every pack.
        if num_partners < num_packs - 1:
            partner_XC = np.argpartition(load_XK, num_partners, axis=1)[:, :num_partners]
            best_max_X, a_X, b_X = _best_swap(w_XM, load_XK, heavy_X, per_pack, partner_XC)
            retry = np.nonzero(best_max_X >= heavy_load_X * (1 - _TOL))[0]
        else:
            best_max_X, a_X, b_X = np.empty(active.size), heavy_X.copy(), heavy_X.copy()
            retry = np.arange(active.size)
        if retry.size:
            every_XC = np.broadcast_to(np.arange(num_packs), (retry.size, num_packs))
            best_max_X[retry], a_X[retry], b_X[retry] = _best_swap(
                w_XM[retry], load_XK[retry], heavy_X[retry], per_pack, every_XC
            )
        improves_X = best_max_X < heavy_load_X * (1 - _TOL)
        rows_g, a, b = active[improves_X], a_X[improves_X], b_X[improves_X]
        weight_XM[rows_g, a], weight_XM[rows_g, b] = weight_XM[rows_g, b], weight_XM[rows_g, a]
        perm_XM[rows_g, a], perm_XM[rows_g, b] = perm_XM[rows_g, b], perm_XM[rows_g, a]
        active = rows_g
    return perm_XM


def _max_rank_load(load_LE: np.ndarray, phy2log_LP: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[L]`` the busiest rank's load of each layer (each replica carries load / replicas)."""
    num_layers = phy2log_LP.shape[0]
    count_LE = np.zeros(load_LE.shape, dtype=np.int64)
    np.add.at(count_LE, (np.arange(num_layers)[:, None], phy2log_LP), 1)
    slot_load_LP = np.take_along_axis(load_LE / np.maximum(count_LE, 1), phy2log_LP, 1)
    return slot_load_LP.reshape(num_layers, num_ranks, -1).sum(2).max(1)


def _pair_ids(num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``([C], [C])`` the groups ``a < b`` of every unordered pair of groups."""
    a_C, b_C = np.triu_indices(num_groups, 1)
    return a_C.astype(np.int64), b_C.astype(np.int64)


def _group_swaps(
    load_XE: np.ndarray, cur_XP: np.ndarray, old_XP: np.ndarray, room_X: np.ndarray,
    num_ranks: int, num_nodes: int, num_groups: int, num_candidates: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the best exchange of two groups that sit on different nodes, within the budget.

    The only moves that change a node's load when every group keeps all its replicas on one node:
    group ``A`` (node ``a``) and group ``B`` (node ``b``) trade places. Only exchanges that lower
    the largest node load are considered (so exchanges never cycle), the ``num_candidates`` that
    lower it most per row. In each, ``B``'s experts take one slot each among the slots ``A`` held,
    heaviest first into the rank of least load that still has such a slot, and the rest of ``A``'s
    slots keep a copy of an expert of the node's other group that was on that rank (no transfer);
    the same for ``A`` on node ``b``. An exchange so moves two groups' worth of slots, and the
    greedy search that follows spends the rest of the budget (replicas of the incoming experts,
    repairs of the other nodes).

    Args:
        load_XE: ``[X, E]`` float64 — tokens per logical expert.
        cur_XP: ``[X, P]`` int64 — the placement to improve.
        old_XP: ``[X, P]`` int64 — the placement in effect (what a moved slot is counted against).
        room_X: ``[X]`` int64 — moved slots still allowed per row (on top of ``cur_XP``'s).
        num_ranks, num_nodes, num_groups: ``G``, ``N`` and the expert groups.
        num_candidates: exchanges built and scored per row.

    Returns:
        ``(new_XP, swapped_X)``: per row the candidate with the lowest score (the busiest rank of
        the two nodes it changes, or the mean rank load of another node where that is larger:
        what the search can bring that node down to), ties to the first pair in ``(A, B)``
        order, where it fits the room and its score is below the row's largest rank load; rows
        where none does, or where some group spans nodes, are returned unchanged.
    """
    from eplb.policies.default import _argsort_descending

    num_rows, num_physical = cur_XP.shape
    num_logical = load_XE.shape[1]
    group_size = num_logical // num_groups
    per_node = num_physical // num_nodes
    per_rank = num_physical // num_ranks
    ranks_per_node = num_ranks // num_nodes
    rows_X1 = np.arange(num_rows)[:, None]
    rank_P = np.arange(num_physical) // per_rank
    node_P = rank_P // ranks_per_node
    on_node_XQN = np.zeros((num_rows, num_groups, num_nodes), dtype=bool)
    on_node_XQN[rows_X1, cur_XP // group_size, node_P] = True
    node_XQ = on_node_XQN.argmax(2)
    pair_a_C, pair_b_C = _pair_ids(num_groups)
    node_a_XC, node_b_XC = node_XQ[:, pair_a_C], node_XQ[:, pair_b_C]
    valid_XC = (on_node_XQN.sum(2) == 1).all(1)[:, None] & (node_a_XC != node_b_XC)
    # Node loads after each exchange, from the group loads: keep those that lower the largest.
    group_load_XQ = load_XE.reshape(num_rows, num_groups, group_size).sum(2)
    node_load_XN = np.zeros((num_rows, num_nodes))
    np.add.at(node_load_XN, (rows_X1, node_XQ), group_load_XQ)
    delta_XC = group_load_XQ[:, pair_b_C] - group_load_XQ[:, pair_a_C]
    after_XCN = np.broadcast_to(node_load_XN[:, None, :], valid_XC.shape + (num_nodes,)).copy()
    rows_XC = np.broadcast_to(rows_X1, valid_XC.shape)
    cols_XC = np.broadcast_to(np.arange(valid_XC.shape[1]), valid_XC.shape)
    after_XCN[rows_XC, cols_XC, node_a_XC] += delta_XC
    after_XCN[rows_XC, cols_XC, node_b_XC] -= delta_XC
    node_after_XC = np.where(valid_XC, after_XCN.max(2), np.inf)
    lowers_XC = node_after_XC < node_load_XN.max(1, keepdims=True) * (1 - _TOL)
    keep_XK = np.argsort(node_after_XC, axis=1, kind="stable")[:, :num_candidates]
    kept_XC = np.zeros(valid_XC.shape, dtype=bool)
    kept_XC[rows_X1, keep_XK] = True
    cand_x_H, cand_c_H = np.nonzero(kept_XC & lowers_XC)  # H candidate exchanges
    if cand_x_H.size == 0:
        return cur_XP, np.zeros(num_rows, dtype=bool)
    num_cand = cand_x_H.size
    count_XE = np.bincount((rows_X1 * num_logical + cur_XP).reshape(-1), minlength=num_rows * num_logical)
    count_XE = count_XE.reshape(num_rows, num_logical)
    old_holds_XEG = np.zeros((num_rows, num_logical, num_ranks), dtype=bool)
    old_holds_XEG[rows_X1, old_XP, rank_P] = True
    stays_XP = old_holds_XEG[rows_X1, cur_XP, rank_P]
    slot_load_XP = np.take_along_axis(load_XE / count_XE, cur_XP, 1)
    rank_load_XG = slot_load_XP.reshape(num_rows, num_ranks, per_rank).sum(2)
    # A node the exchange does not touch is scored by its mean rank load: what the search after
    # the exchange can bring its busiest rank down to.
    node_mean_XN = rank_load_XG.reshape(num_rows, num_nodes, ranks_per_node).mean(2)

    # Halves h, each on one node (M = its slots, R its ranks): the incoming group takes the
    # outgoing group's slots. Half h < H brings B to A's slots, half H + h brings A to B's slots.
    # Groups live on one node, so an expert's replica count is its count on that node.
    x_h = np.concatenate([cand_x_H, cand_x_H])
    x_h1 = x_h[:, None]
    out_h = np.concatenate([pair_a_C[cand_c_H], pair_b_C[cand_c_H]])
    in_h = np.concatenate([pair_b_C[cand_c_H], pair_a_C[cand_c_H]])
    num_halves = x_h.size
    node_h = node_XQ[x_h, out_h]
    slot_hM = node_h[:, None] * per_node + np.arange(per_node)
    cur_hM = cur_XP[x_h1, slot_hM]
    out_hRS = (cur_hM // group_size == out_h[:, None]).reshape(num_halves, ranks_per_node, per_rank)
    stays_hM = stays_XP[x_h1, slot_hM]
    # The incoming group takes one slot per expert, heaviest first into the rank of least load
    # that still has a freed slot (a rank starts with the load of its slots that stay); the other
    # freed slots keep a copy of an expert of the staying group that was on that rank (no
    # transfer). An exchange so moves two groups' worth of slots; the greedy search then spends
    # what is left of the budget (replicas of the incoming experts, repairs of the other nodes).
    in_expert_hQ = in_h[:, None] * group_size + np.arange(group_size)
    in_load_hQ = load_XE[x_h1, in_expert_hQ]
    cap_hR = out_hRS.sum(2)
    kept_load_hRS = np.where(out_hRS, 0.0, slot_load_XP[x_h1, slot_hM].reshape(out_hRS.shape))
    rank_load_hR = np.where(cap_hR > 0, kept_load_hRS.sum(2), np.inf)
    order_hQ = _argsort_descending(in_load_hQ)
    sorted_load_Qh = np.take_along_axis(in_load_hQ, order_hQ, 1).T
    filled_hR = np.zeros((num_halves, ranks_per_node), dtype=np.int64)
    flat_load, flat_filled, flat_cap = rank_load_hR.reshape(-1), filled_hR.reshape(-1), cap_hR.reshape(-1)
    row_base_h = np.arange(num_halves) * ranks_per_node
    pack_Qh = np.empty((group_size, num_halves), dtype=np.int64)
    for k in range(group_size):
        flat = row_base_h + rank_load_hR.argmin(1)
        flat_filled[flat] += 1
        full = flat_filled[flat] == flat_cap[flat]
        flat_load[flat] += np.where(full, np.inf, sorted_load_Qh[k])
        pack_Qh[k] = flat - row_base_h
    # Incoming experts in (rank, arrival) order fill each rank's first freed slots.
    expert_hQ = np.take_along_axis(
        in_expert_hQ, np.take_along_axis(order_hQ, np.argsort(pack_Qh.T, axis=1, kind="stable"), 1), 1
    )
    # The filler of a rank: the staying expert whose extra copy adds least to the rank
    # (load * (c - 1) / (c * (c + 1)) with c replicas; none at all with one replica); where the
    # rank has none, the heaviest incoming expert.
    load_hM, count_hM = load_XE[x_h1, cur_hM], count_XE[x_h1, cur_hM]
    extra_hRS = np.where(
        stays_hM & ~out_hRS.reshape(num_halves, -1), load_hM * (count_hM - 1) / (count_hM * (count_hM + 1)), np.inf
    ).reshape(out_hRS.shape)
    cur_hRS = cur_hM.reshape(out_hRS.shape)
    filler_hR = np.take_along_axis(cur_hRS, extra_hRS.argmin(2)[:, :, None], 2)[:, :, 0]
    heaviest_h1 = in_expert_hQ[np.arange(num_halves), order_hQ[:, 0]][:, None]
    filler_hR = np.where(np.isfinite(extra_hRS.min(2)), filler_hR, heaviest_h1)
    pos_hRS = np.cumsum(out_hRS, 2) - 1  # place among the rank's freed slots
    first_item_hR = np.cumsum(filled_hR, 1) - filled_hR
    item_hRS = np.minimum(first_item_hR[:, :, None] + pos_hRS, group_size - 1)
    incoming_hRS = out_hRS & (pos_hRS < filled_hR[:, :, None])
    new_hRS = np.where(
        incoming_hRS, np.take_along_axis(expert_hQ, item_hRS.reshape(num_halves, -1), 1).reshape(out_hRS.shape),
        np.where(out_hRS, filler_hR[:, :, None], cur_hRS),
    )
    new_hM = new_hRS.reshape(num_halves, per_node)

    # Score of a candidate that fits the room: the busiest rank of the two nodes it changes, or
    # the mean rank load of another node where that is larger.
    key_hM = np.arange(num_halves)[:, None] * num_logical + new_hM
    new_count_hM = np.bincount(key_hM.reshape(-1), minlength=num_halves * num_logical)[key_hM]
    new_rank_load_hR = (load_XE[x_h1, new_hM] / new_count_hM).reshape(out_hRS.shape).sum(2)
    rank_hM = np.repeat(node_h[:, None] * ranks_per_node + np.arange(ranks_per_node), per_rank, axis=1)
    cost_h = (~old_holds_XEG[x_h1, new_hM, rank_hM]).sum(1) - (~stays_hM).sum(1)
    cand_H = np.arange(num_cand)
    node_max_HN = node_mean_XN[cand_x_H]
    node_max_HN[cand_H, node_h[:num_cand]] = new_rank_load_hR[:num_cand].max(1)
    node_max_HN[cand_H, node_h[num_cand:]] = new_rank_load_hR[num_cand:].max(1)
    fits_H = cost_h[:num_cand] + cost_h[num_cand:] <= room_X[cand_x_H]
    score_XC = np.full(valid_XC.shape, np.inf)
    score_XC[cand_x_H, cand_c_H] = np.where(fits_H, node_max_HN.max(1), np.inf)
    best_X = score_XC.argmin(1)
    swapped_X = score_XC[np.arange(num_rows), best_X] < rank_load_XG.max(1) * (1 - _TOL)
    index_XC = np.zeros(valid_XC.shape, dtype=np.int64)
    index_XC[cand_x_H, cand_c_H] = cand_H
    chosen = index_XC[swapped_X, best_X[swapped_X]]
    new_XP = cur_XP.copy()
    rows = np.nonzero(swapped_X)[0][:, None]
    new_XP[rows, slot_hM[chosen]] = new_hM[chosen]
    new_XP[rows, slot_hM[chosen + num_cand]] = new_hM[chosen + num_cand]
    return new_XP, swapped_X


def _node_bound(load_XE: np.ndarray, phy2log_XP: np.ndarray, num_ranks: int, num_nodes: int) -> np.ndarray:
    """``[X]`` the largest mean rank load of a node: a floor for the busiest rank of any placement
    that keeps every node's set of experts (its load)."""
    num_rows, num_physical = phy2log_XP.shape
    count_XE = np.zeros(load_XE.shape, dtype=np.int64)
    np.add.at(count_XE, (np.arange(num_rows)[:, None], phy2log_XP), 1)
    slot_load_XP = np.take_along_axis(load_XE / np.maximum(count_XE, 1), phy2log_XP, 1)
    per_node = num_physical // num_nodes
    return slot_load_XP.reshape(num_rows, num_nodes, per_node).sum(2).max(1) / (num_ranks // num_nodes)


def _exchange_targets(
    load_XE: np.ndarray, cur_XP: np.ndarray, old_XP: np.ndarray, fresh_XP: np.ndarray,
    num_ranks: int, num_nodes: int, num_groups: int,
) -> np.ndarray:
    """``[X, P]`` the default plan with ``cur_XP``'s groups on each node (step 1 of the algorithm
    replaced), relabelled against ``old_XP``: the aim of the greedy search after an exchange.
    Rows whose nodes do not each hold ``num_groups // num_nodes`` whole groups keep ``fresh_XP``."""
    from eplb.policies.default import _rebalance, _relabel

    num_rows, num_physical = cur_XP.shape
    num_logical = load_XE.shape[1]
    group_size = num_logical // num_groups
    node_P = np.arange(num_physical) // (num_physical // num_nodes)
    on_node_XQN = np.zeros((num_rows, num_groups, num_nodes), dtype=bool)
    on_node_XQN[np.arange(num_rows)[:, None], cur_XP // group_size, node_P] = True
    ok_X = (on_node_XQN.sum(2) == 1).all(1) & (on_node_XQN.sum(1) == num_groups // num_nodes).all(1)
    out_XP = fresh_XP.copy()
    if ok_X.any():
        group_of_mgroup_XQ = np.argsort(on_node_XQN[ok_X].argmax(2), axis=1, kind="stable")
        plan_XP = _rebalance(load_XE[ok_X], num_physical, num_groups, num_nodes, num_ranks,
                             group_of_mgroup_LG=group_of_mgroup_XQ)
        out_XP[ok_X] = _relabel(plan_XP, old_XP[ok_X], num_logical, num_nodes, num_ranks)
    return out_XP


def moved_slots(new_LP: np.ndarray, old_LP: np.ndarray, num_logical: int, num_ranks: int) -> np.ndarray:
    """``[L, P]`` bool: slots whose expert in ``new_LP`` is not on that slot's rank in ``old_LP``."""
    num_layers, num_physical = new_LP.shape
    rank_P = np.arange(num_physical) // (num_physical // num_ranks)
    layer_L1 = np.arange(num_layers)[:, None]
    old_holds_LEG = np.zeros((num_layers, num_logical, num_ranks), dtype=bool)
    old_holds_LEG[layer_L1, old_LP, rank_P] = True
    return ~old_holds_LEG[layer_L1, new_LP, rank_P]


def limit_migration(
    load_LE: np.ndarray,
    old_LP: np.ndarray,
    fresh_LP: np.ndarray,
    budget: float,
    *,
    num_ranks: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    num_partners: int = 4,
) -> np.ndarray:
    """The best placement found within a migration budget, per layer.

    Args:
        load_LE: ``[L, E]`` float64 — tokens per logical expert.
        old_LP: ``[L, P]`` int64 — the placement in effect.
        fresh_LP: ``[L, P]`` int64 — the unconstrained plan, relabelled against ``old_LP``.
        budget: fraction in ``(0, 1]``: at most ``floor(budget * P)`` slots per layer may receive
            an expert that is not on their rank in ``old_LP``.
        num_ranks: ``G``.
        num_nodes: ``N``; swaps stay inside a node, a slot change puts an expert only on a node
            that already holds a replica of its group, and groups change node only by whole
            exchanges of two groups (`_group_swaps`), so a placement that keeps each group on
            one node (hierarchical) keeps doing so.
        num_groups: expert groups (blocks of ``E // num_groups`` consecutive experts).
        num_partners: swaps pair the heaviest rank with the ``num_partners`` lightest ranks of its
            node (the partners that can take load).

    A move must lower the busiest rank by at least 0.1% of the layer's mean rank load per moved
    slot: smaller gains are not worth a weight transfer, so the search may stop below the budget.

    Returns:
        ``[L, P]`` int64 — ``fresh_LP`` for layers where it fits the budget and is not less
        balanced than ``old_LP``; elsewhere ``old_LP`` improved by greedy moves (after a group
        exchange where that ends better): every layer's largest rank load is at most
        ``old_LP``'s (ties keep the search without an exchange). Deterministic: ties go to the
        lowest index.
    """
    num_layers, num_logical = load_LE.shape
    num_physical = old_LP.shape[1]
    limit = int(np.floor(budget * num_physical + 1e-9))
    out_LP = fresh_LP.copy()
    over_L = moved_slots(fresh_LP, old_LP, num_logical, num_ranks).sum(1) > limit
    # A fresh plan less balanced than the stale one on this load is no shortcut either.
    worse_L = _max_rank_load(load_LE, fresh_LP, num_ranks) > _max_rank_load(load_LE, old_LP, num_ranks)
    todo = np.nonzero(over_L | worse_L)[0]
    if todo.size == 0:
        return out_LP
    w_XE, target_XP, old_XP = load_LE[todo], fresh_LP[todo], old_LP[todo]
    # The greedy search starts from the placement in effect and, with several nodes, also from
    # that placement after the best exchanges of two groups between nodes that fit the budget
    # (`_group_swaps`), the only moves that change a node's load. Without exchanges a layer's
    # busiest rank stays at or above its busiest node's mean rank load (node loads are fixed), so
    # an exchange start is kept only where it lowers that bound, searched first, and the search
    # from the placement in effect runs only for layers where it could still do better. Each
    # layer keeps the better result (the placement in effect on ties).
    best_XP = old_XP.copy()
    best_max_X = np.full(todo.size, np.inf)
    old_rows = np.arange(todo.size)
    group_size = num_logical // num_groups
    if num_nodes > 1 and num_groups > 1 and limit >= 2 * group_size:
        swap_XP, swapped_X = old_XP.copy(), np.zeros(todo.size, dtype=bool)
        room_X = np.full(todo.size, limit)
        rows = np.arange(todo.size)
        while rows.size:  # an exchange moves at least two groups' worth of slots
            after_XP, more_X = _group_swaps(
                w_XE[rows], swap_XP[rows], old_XP[rows], room_X[rows], num_ranks, num_nodes, num_groups
            )
            rows = rows[more_X]
            swap_XP[rows], swapped_X[rows] = after_XP[more_X], True
            room_X[rows] = limit - moved_slots(swap_XP[rows], old_XP[rows], num_logical, num_ranks).sum(1)
            rows = rows[room_X[rows] >= 2 * group_size]
        old_bound_X = _node_bound(w_XE, old_XP, num_ranks, num_nodes)
        rows = np.nonzero(swapped_X)[0]
        rows = rows[_node_bound(w_XE[rows], swap_XP[rows], num_ranks, num_nodes) < old_bound_X[rows] * (1 - _TOL)]
        if rows.size:
            aim_XP = _exchange_targets(w_XE[rows], swap_XP[rows], old_XP[rows], target_XP[rows], num_ranks,
                                       num_nodes, num_groups)
            best_XP[rows] = _greedy_moves(
                w_XE[rows], old_XP[rows], aim_XP, swap_XP[rows], limit,
                num_ranks=num_ranks, num_nodes=num_nodes, num_groups=num_groups, num_partners=num_partners,
            )
            best_max_X[rows] = _max_rank_load(w_XE[rows], best_XP[rows], num_ranks)
        old_rows = np.nonzero(best_max_X > old_bound_X)[0]
    if old_rows.size:
        found_XP = _greedy_moves(
            w_XE[old_rows], old_XP[old_rows], target_XP[old_rows], old_XP[old_rows], limit,
            num_ranks=num_ranks, num_nodes=num_nodes, num_groups=num_groups, num_partners=num_partners,
        )
        better = _max_rank_load(w_XE[old_rows], found_XP, num_ranks) <= best_max_X[old_rows]
        best_XP[old_rows[better]] = found_XP[better]
    out_LP[todo] = best_XP
    return out_LP


def _move_score(
    gain: np.ndarray, cost: np.ndarray, max_load: np.ndarray, mean_load: np.ndarray, room: np.ndarray
) -> np.ndarray:
    """Gain per moved slot of each candidate move (``-inf`` where it is not allowed): the gain must
    beat float rounding, buy at least `_MIN_GAIN_PER_MOVE` of the mean rank load per moved slot
    (moving weights for less is not worth the transfer, and ends the search early) and fit the
    room. Broadcasting arrays: gain, cost (moved slots, may be <= 0), the busiest rank's load, the
    mean rank load, the room."""
    ok = (gain > max_load * _TOL) & (gain >= mean_load * _MIN_GAIN_PER_MOVE * np.maximum(cost, 0)) & (cost <= room)
    return np.where(ok, gain / np.maximum(cost, 0.5), -np.inf)


def _greedy_moves(
    w_XE: np.ndarray, old_XP: np.ndarray, target_XP: np.ndarray, cur_XP: np.ndarray, limit: int, *,
    num_ranks: int, num_nodes: int, num_groups: int, num_partners: int,
) -> np.ndarray:
    """`limit_migration`'s greedy search from ``cur_XP``, per row: ``[X, P]`` the improved rows.

    Moves (slot swaps within a node, a slot taking its expert of ``target_XP``) are applied one
    at a time, the one that lowers the busiest rank most per moved slot first, while the slots
    that hold an expert their rank did not hold in ``old_XP`` stay at most ``limit``. ``cur_XP``
    must be within the limit; no row's largest rank load grows.
    """
    num_rows, num_physical = cur_XP.shape
    num_logical = w_XE.shape[1]
    per_rank = num_physical // num_ranks
    ranks_per_node = num_ranks // num_nodes
    rank_P = np.arange(num_physical) // per_rank
    node_of_rank_G = np.arange(num_ranks) // ranks_per_node
    num_partners = min(num_partners, ranks_per_node - 1)
    rows_X1 = np.arange(num_rows)[:, None]
    old_holds_F = np.zeros(num_rows * num_logical * num_ranks, dtype=bool)  # [X, E, G] flat
    old_holds_F[(rows_X1 * num_logical + old_XP) * num_ranks + rank_P] = True
    cur_XP = cur_XP.copy()
    held_F = np.bincount(((rows_X1 * num_logical + cur_XP) * num_ranks + rank_P).reshape(-1),
                         minlength=old_holds_F.size)  # replicas per (x, e, g)
    count_XE = held_F.reshape(num_rows, num_logical, num_ranks).sum(2)
    moved_XP = ~old_holds_F[(rows_X1 * num_logical + cur_XP) * num_ranks + rank_P]
    used_X = moved_XP.sum(1)
    group_size = num_logical // num_groups
    node_P = rank_P // ranks_per_node
    group_on_node_XQN = np.zeros((num_rows, num_groups, num_nodes), dtype=np.int64)
    np.add.at(group_on_node_XQN, (np.arange(num_rows)[:, None], cur_XP // group_size, node_P), 1)
    active = np.arange(num_rows)
    for _ in range(4 * num_physical):
        if active.size == 0:
            break
        n = active.size
        rows = np.arange(n)
        r1 = rows[:, None]
        cur, w, cnt = cur_XP[active], w_XE[active], count_XE[active]
        base_X1 = active[:, None] * (num_logical * num_ranks)
        slot_load_XP = (w / cnt)[r1, cur]
        rank_load_XG = slot_load_XP.reshape(n, num_ranks, per_rank).sum(2)
        heavy_X = rank_load_XG.argmax(1)
        max_X1 = rank_load_XG[rows, heavy_X][:, None]
        room_X1 = limit - used_X[active][:, None]

        # Step 1: swaps of a slot of the heaviest rank with a slot of one of the lightest ranks of
        # its node. Cost: the slots that end up holding an expert their rank did not hold, minus
        # those that did before the swap.
        if num_partners > 0:
            same_node_XG = node_of_rank_G[None, :] == node_of_rank_G[heavy_X][:, None]
            masked_XG = np.where(same_node_XG, rank_load_XG, np.inf)
            masked_XG[rows, heavy_X] = np.inf
            partner_XC = np.argsort(masked_XG, axis=1, kind="stable")[:, :num_partners]
            pair_max_XSD, a_XS, b_XD = _swap_max(slot_load_XP, rank_load_XG, heavy_X, per_rank, partner_XC)
            ea_XS1 = cur[r1, a_XS][:, :, None]
            eb_X1D = cur[r1, b_XD][:, None, :]
            ra_XS1 = rank_P[a_XS][:, :, None]
            rb_X1D = rank_P[b_XD][:, None, :]
            b1 = base_X1[:, :, None]
            moved_now_XP = moved_XP[active]
            swap_cost_XSD = (
                (~old_holds_F[b1 + eb_X1D * num_ranks + ra_XS1]).astype(np.int64)
                + ~old_holds_F[b1 + ea_XS1 * num_ranks + rb_X1D]
                - moved_now_XP[r1, a_XS][:, :, None]
                - moved_now_XP[r1, b_XD][:, None, :]
            )
            swap_gain_XW = max_X1 - pair_max_XSD.reshape(n, -1)
            swap_cost_XW = swap_cost_XSD.reshape(n, -1)
        else:
            swap_gain_XW = np.full((n, 0), -np.inf)
            swap_cost_XW = np.zeros((n, 0), dtype=np.int64)

        # Step 2: a slot takes its expert of the fresh plan (two replica counts change, so every
        # rank holding either expert changes load). Only slots on the heaviest rank, or whose new
        # expert the heaviest rank holds, can relieve it.
        tgt = target_XP[active]
        held_XEG = held_F.reshape(num_rows, num_logical, num_ranks)
        candidate_XP = (cur != tgt) & (cnt[r1, cur] >= 2) & (
            (rank_P[None, :] == heavy_X[:, None]) | (held_XEG[active[:, None], tgt, heavy_X[:, None]] > 0)
        )
        if num_nodes > 1:  # the new expert's group must already be on that node
            candidate_XP &= group_on_node_XQN[active[:, None], tgt // group_size, node_P] > 0
        c_row, c_slot = np.nonzero(candidate_XP)  # rows, then slots, ascending
        if c_row.size:
            x, y, r, g = cur[c_row, c_slot], tgt[c_row, c_slot], rank_P[c_slot], active[c_row]
            wx, cx, wy, cy = w[c_row, x], cnt[c_row, x], w[c_row, y], cnt[c_row, y]
            held_x_CG, held_y_CG = held_XEG[g, x], held_XEG[g, y]
            new_CG = (rank_load_XG[c_row] + held_x_CG * (wx / (cx - 1) - wx / cx)[:, None]
                      - held_y_CG * (wy / cy - wy / (cy + 1))[:, None])
            c_idx = np.arange(c_row.size)
            new_CG[c_idx, r] += wy / (cy + 1) - wx / (cx - 1)
            touched_CG = (held_x_CG > 0) | (held_y_CG > 0)
            touched_CG[c_idx, r] = True
            worst_C = np.where(touched_CG, new_CG, -np.inf).max(1)
            relieves_C = new_CG[c_idx, heavy_X[c_row]] < max_X1[c_row, 0]
            change_gain_C = np.where(relieves_C, max_X1[c_row, 0] - worst_C, -np.inf)
            change_cost_C = (~old_holds_F[(g * num_logical + y) * num_ranks + r]).astype(np.int64) - moved_XP[g, c_slot]

        # Step 3: per row, the move that relieves the heaviest rank most per moved slot within the
        # budget (ties: swaps first, then the lowest index). A move never leaves a changed rank at
        # or above the old maximum, so no layer's maximum ever grows.
        mean_X1 = rank_load_XG.mean(1, keepdims=True)
        swap_score_XW = _move_score(swap_gain_XW, swap_cost_XW, max_X1, mean_X1, room_X1)
        num_swaps = swap_score_XW.shape[1]
        best_X = swap_score_XW.argmax(1) if num_swaps else np.zeros(n, dtype=np.int64)
        best_score_X = swap_score_XW[rows, best_X] if num_swaps else np.full(n, -np.inf)
        if c_row.size:
            change_score_C = _move_score(
                change_gain_C, change_cost_C, max_X1[c_row, 0], mean_X1[c_row, 0], room_X1[c_row, 0]
            )
            top_X = np.full(n, -np.inf)
            np.maximum.at(top_X, c_row, change_score_C)
            at_top = np.nonzero(change_score_C == top_X[c_row])[0]
            top_rows, first = np.unique(c_row[at_top], return_index=True)
            better = top_X[top_rows] > best_score_X[top_rows]
            best_X[top_rows[better]] = num_swaps + c_slot[at_top[first[better]]]
            best_score_X[top_rows[better]] = top_X[top_rows[better]]
        go_X = best_score_X > -np.inf
        best_X, go_rows = best_X[go_X], rows[go_X]
        g_X = active[go_X]
        is_swap = best_X < num_swaps
        if is_swap.any():
            i, j = go_rows[is_swap], best_X[is_swap]
            per_d = b_XD.shape[1]
            a, b, g = a_XS[i, j // per_d], b_XD[i, j % per_d], g_X[is_swap]
            ea, eb = cur_XP[g, a], cur_XP[g, b]
            cur_XP[g, a], cur_XP[g, b] = eb, ea
            base = g * num_logical
            held_F[(base + ea) * num_ranks + rank_P[a]] -= 1
            held_F[(base + eb) * num_ranks + rank_P[b]] -= 1
            held_F[(base + eb) * num_ranks + rank_P[a]] += 1
            held_F[(base + ea) * num_ranks + rank_P[b]] += 1
            moved_XP[g, a] = ~old_holds_F[(base + eb) * num_ranks + rank_P[a]]
            moved_XP[g, b] = ~old_holds_F[(base + ea) * num_ranks + rank_P[b]]
        is_change = ~is_swap
        if is_change.any():
            s_, g = best_X[is_change] - num_swaps, g_X[is_change]
            x, y = cur_XP[g, s_], target_XP[g, s_]
            cur_XP[g, s_] = y
            base = g * num_logical
            held_F[(base + x) * num_ranks + rank_P[s_]] -= 1
            held_F[(base + y) * num_ranks + rank_P[s_]] += 1
            count_XE[g, x] -= 1  # one move per row: the indices of each update are distinct
            count_XE[g, y] += 1
            group_on_node_XQN[g, x // group_size, node_P[s_]] -= 1
            group_on_node_XQN[g, y // group_size, node_P[s_]] += 1
            moved_XP[g, s_] = ~old_holds_F[(base + y) * num_ranks + rank_P[s_]]
        used_X[g_X] = moved_XP[g_X].sum(1)
        active = g_X
    return cur_XP
