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
  and is not less balanced takes it whole; otherwise start from the placement in effect (with
  several nodes, after re-planning whole pairs of nodes where that fits) and apply, one at a time,
  the move that lowers the busiest rank most per moved slot: a slot takes its expert of the fresh
  plan (two replica counts change), or a slot of the busiest rank swaps with a slot of a light
  rank of its node. A slot counts as moved when its expert was not on its rank in the old
  placement.

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


def _replan_node_pairs(
    load_XE: np.ndarray, cur_XP: np.ndarray, old_XP: np.ndarray, room_X: np.ndarray,
    num_ranks: int, num_nodes: int, num_groups: int,
) -> np.ndarray:
    """One round of node-pair re-planning for rows whose groups each sit on one node.

    For every pair of nodes, the groups of both are planned afresh onto the two nodes with the
    hierarchical algorithm (groups to nodes, replicas, ranks) and relabelled against ``old_XP``;
    per row, the pair whose plan lowers the row's largest rank load most, within the remaining
    budget ``room_X`` (slots that receive an expert their rank did not hold in ``old_XP``), is
    taken. Whole groups move, so each group stays on one node.

    Returns:
        ``[X, P]`` the new rows (unchanged where no pair helps or a row is not group-consistent).
    """
    from eplb.policies.default import _rebalance, _relabel

    num_rows, num_physical = cur_XP.shape
    num_logical = load_XE.shape[1]
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    per_node = num_physical // num_nodes
    ranks_per_node = num_ranks // num_nodes
    node_P = np.arange(num_physical) // per_node
    rows_X1 = np.arange(num_rows)[:, None]
    # Node of each group; rows where a group spans nodes, or a node holds another number of
    # groups than the hierarchical plan gives it, are left alone.
    on_node_XQN = np.zeros((num_rows, num_groups, num_nodes), dtype=bool)
    on_node_XQN[rows_X1, cur_XP // group_size, node_P] = True
    node_XQ = on_node_XQN.argmax(2)
    consistent_X = (on_node_XQN.sum(2) == 1).all(1) & (
        np.stack([(node_XQ == n).sum(1) for n in range(num_nodes)], 1) == groups_per_node
    ).all(1)
    pairs = [(a, b) for a in range(num_nodes) for b in range(a + 1, num_nodes)]
    num_pairs = len(pairs)
    rows = np.nonzero(consistent_X)[0]
    if rows.size == 0 or num_pairs == 0:
        return cur_XP
    n = rows.size
    pair_a = np.array([a for a, _ in pairs])
    pair_b = np.array([b for _, b in pairs])
    # Step 1: the groups of each node pair, in group order: [n, Q, 2 * groups_per_node].
    node_n1Q = node_XQ[rows][:, None, :]
    in_pair_nQK = (node_n1Q == pair_a[None, :, None]) | (node_n1Q == pair_b[None, :, None])
    sub_groups = np.argsort(~in_pair_nQK, axis=2, kind="stable")[:, :, : 2 * groups_per_node]
    sub_experts = (sub_groups[..., None] * group_size + np.arange(group_size)).reshape(n * num_pairs, -1)
    row_of = np.repeat(rows, num_pairs)
    sub_load = load_XE[row_of[:, None], sub_experts]
    # Step 2: plan the pair afresh and relabel it against the old placement of the two nodes.
    sub_phy = _rebalance(sub_load, 2 * per_node, 2 * groups_per_node, 2, 2 * ranks_per_node)
    new_sub = np.take_along_axis(sub_experts, sub_phy, 1)
    slots_nQS = np.concatenate(
        [(pair_a[:, None] * per_node + np.arange(per_node)), (pair_b[:, None] * per_node + np.arange(per_node))], 1
    )  # [Q, 2 * per_node] slot ids of the pair
    slots_F = np.tile(slots_nQS, (n, 1))
    old_sub = old_XP[row_of[:, None], slots_F]
    new_sub = _relabel(new_sub, old_sub, num_logical, 2, 2 * ranks_per_node)
    # Step 3: the candidate rows, their cost and largest rank load.
    cand = np.repeat(cur_XP[rows], num_pairs, axis=0)
    cand[np.arange(cand.shape[0])[:, None], slots_F] = new_sub
    moved_C = moved_slots(cand, np.repeat(old_XP[rows], num_pairs, axis=0), num_logical, num_ranks).sum(1)
    now_moved_C = np.repeat(moved_slots(cur_XP[rows], old_XP[rows], num_logical, num_ranks).sum(1), num_pairs)
    fits_C = moved_C - now_moved_C <= np.repeat(room_X[rows], num_pairs)
    cand_max_C = _max_rank_load(load_XE[row_of], cand, num_ranks)
    cur_max_n = _max_rank_load(load_XE[rows], cur_XP[rows], num_ranks)
    score_nQ = np.where(fits_C, cand_max_C, np.inf).reshape(n, num_pairs)
    best_n = score_nQ.argmin(1)
    better_n = score_nQ[np.arange(n), best_n] < cur_max_n * (1 - _TOL)
    out_XP = cur_XP.copy()
    pick = np.nonzero(better_n)[0]
    out_XP[rows[pick]] = cand.reshape(n, num_pairs, num_physical)[pick, best_n[pick]]
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
        num_nodes: ``N``; swaps stay inside a node, and a slot change puts an expert only on a
            node that already holds a replica of its group, so a placement that keeps each
            group on one node (hierarchical) keeps doing so.
        num_groups: expert groups (blocks of ``E // num_groups`` consecutive experts).
        num_partners: swaps pair the heaviest rank with the ``num_partners`` lightest ranks of its
            node (the partners that can take load).

    A move must lower the busiest rank by at least 0.1% of the layer's mean rank load per moved
    slot: smaller gains are not worth a weight transfer, so the search may stop below the budget.

    Returns:
        ``[L, P]`` int64 — ``fresh_LP`` for layers where it fits the budget and is not less
        balanced than ``old_LP``; elsewhere ``old_LP`` improved by greedy moves: every layer's
        largest rank load is at most ``old_LP``'s.
    """
    num_layers, num_logical = load_LE.shape
    num_physical = old_LP.shape[1]
    per_rank = num_physical // num_ranks
    ranks_per_node = num_ranks // num_nodes
    limit = int(np.floor(budget * num_physical + 1e-9))
    out_LP = fresh_LP.copy()
    over_L = moved_slots(fresh_LP, old_LP, num_logical, num_ranks).sum(1) > limit
    # A fresh plan less balanced than the stale one on this load is no shortcut either.
    worse_L = _max_rank_load(load_LE, fresh_LP, num_ranks) > _max_rank_load(load_LE, old_LP, num_ranks)
    todo = np.nonzero(over_L | worse_L)[0]
    if todo.size == 0:
        return out_LP
    rank_P = np.arange(num_physical) // per_rank
    node_of_rank_G = np.arange(num_ranks) // ranks_per_node
    num_partners = min(num_partners, ranks_per_node - 1)
    num_rows = todo.size
    w_XE = load_LE[todo]
    target_XP = fresh_LP[todo]
    old_XP = old_LP[todo]
    rows_X1 = np.arange(num_rows)[:, None]
    flat_old_XP = (rows_X1 * num_logical + old_XP) * num_ranks + rank_P
    old_holds_F = np.zeros(num_rows * num_logical * num_ranks, dtype=bool)  # [X, E, G] flat
    old_holds_F[flat_old_XP] = True
    # Step 0: with several nodes, re-plan pairs of nodes where that fits (`_replan_node_pairs`):
    # the only moves that take groups to another node. The search below starts from there.
    cur_XP = old_XP.copy()
    if num_nodes > 1 and num_groups > 1:
        for _ in range(num_nodes):
            room_X = limit - moved_slots(cur_XP, old_XP, num_logical, num_ranks).sum(1)
            after_XP = _replan_node_pairs(w_XE, cur_XP, old_XP, room_X, num_ranks, num_nodes, num_groups)
            if np.array_equal(after_XP, cur_XP):
                break
            cur_XP = after_XP
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
            swap_cost_XSD = (
                (~old_holds_F[b1 + eb_X1D * num_ranks + ra_XS1]).astype(np.int64)
                + ~old_holds_F[b1 + ea_XS1 * num_ranks + rb_X1D]
                - moved_XP[active][r1, a_XS][:, :, None]
                - moved_XP[active][r1, b_XD][:, None, :]
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
        change_gain_XP = np.full((n, num_physical), -np.inf)
        change_cost_XP = np.zeros((n, num_physical), dtype=np.int64)
        candidate_XP = (cur != tgt) & (cnt[r1, cur] >= 2) & (
            (rank_P[None, :] == heavy_X[:, None]) | (held_XEG[active[:, None], tgt, heavy_X[:, None]] > 0)
        )
        if num_nodes > 1:  # the new expert's group must already be on that node
            candidate_XP &= group_on_node_XQN[active[:, None], tgt // group_size, node_P] > 0
        c_row, c_slot = np.nonzero(candidate_XP)
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
            change_gain_XP[c_row, c_slot] = np.where(relieves_C, max_X1[c_row, 0] - worst_C, -np.inf)
            change_cost_XP[c_row, c_slot] = (
                (~old_holds_F[(g * num_logical + y) * num_ranks + r]).astype(np.int64) - moved_XP[g, c_slot]
            )

        # Step 3: per row, the move that relieves the heaviest rank most per moved slot within the
        # budget. A move never leaves a changed rank at or above the old maximum, so no layer's
        # maximum ever grows.
        gain_XW = np.concatenate([swap_gain_XW, change_gain_XP], axis=1)
        cost_XW = np.concatenate([swap_cost_XW, change_cost_XP], axis=1)
        # A moved slot must buy at least _MIN_GAIN_PER_MOVE of the mean rank load: moving weights
        # for less is not worth the transfer (and ends the search early).
        min_gain_XW = rank_load_XG.mean(1, keepdims=True) * _MIN_GAIN_PER_MOVE * np.maximum(cost_XW, 0)
        ok_XW = (gain_XW > max_X1 * _TOL) & (gain_XW >= min_gain_XW) & (cost_XW <= room_X1)
        score_XW = np.where(ok_XW, gain_XW / np.maximum(cost_XW, 0.5), -np.inf)
        best_X = score_XW.argmax(1)
        go_X = ok_XW[rows, best_X]
        best_X, go_rows = best_X[go_X], rows[go_X]
        g_X = active[go_X]
        num_swaps = swap_gain_XW.shape[1]
        is_swap = best_X < num_swaps
        if is_swap.any():
            i, j = go_rows[is_swap], best_X[is_swap]
            per_d = b_XD.shape[1]
            a, b, g = a_XS[i, j // per_d], b_XD[i, j % per_d], g_X[is_swap]
            ea, eb = cur_XP[g, a], cur_XP[g, b]
            cur_XP[g, a], cur_XP[g, b] = eb, ea
            base = g * num_logical
            np.add.at(held_F, (base + ea) * num_ranks + rank_P[a], -1)
            np.add.at(held_F, (base + eb) * num_ranks + rank_P[b], -1)
            np.add.at(held_F, (base + eb) * num_ranks + rank_P[a], 1)
            np.add.at(held_F, (base + ea) * num_ranks + rank_P[b], 1)
            moved_XP[g, a] = ~old_holds_F[(base + eb) * num_ranks + rank_P[a]]
            moved_XP[g, b] = ~old_holds_F[(base + ea) * num_ranks + rank_P[b]]
        is_change = ~is_swap
        if is_change.any():
            s_, g = best_X[is_change] - num_swaps, g_X[is_change]
            x, y = cur_XP[g, s_], target_XP[g, s_]
            cur_XP[g, s_] = y
            base = g * num_logical
            np.add.at(held_F, (base + x) * num_ranks + rank_P[s_], -1)
            np.add.at(held_F, (base + y) * num_ranks + rank_P[s_], 1)
            np.add.at(count_XE, (g, x), -1)
            np.add.at(count_XE, (g, y), 1)
            np.add.at(group_on_node_XQN, (g, x // group_size, node_P[s_]), -1)
            np.add.at(group_on_node_XQN, (g, y // group_size, node_P[s_]), 1)
            moved_XP[g, s_] = ~old_holds_F[(base + y) * num_ranks + rank_P[s_]]
        used_X[g_X] = moved_XP[g_X].sum(1)
        active = g_X
    out_LP[todo] = cur_XP
    return out_LP
