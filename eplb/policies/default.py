"""DeepSeek's EPLB policy (hierarchical / global), exact and vectorised over all layers at once.

Legend: L layers, E logical experts, P physical slots, G ranks, N nodes, S = P // G slots per rank,
R = G // N ranks per node. The building blocks work on a batch of independent rows: X rows (layers,
or layers x nodes), n items per row, K packs per row, M slots per row.

The algorithm (DeepSeek-V3's EPLB), for each layer:

1. pack the expert groups onto the nodes, heaviest group first into the lightest node with room;
2. within each node, give every extra slot to the expert with the largest load per replica;
3. pack the node's replicas onto its ranks, heaviest first into the lightest rank with room.

The global policy is the same routine with one group and one node. Every step breaks ties by the
lowest index (item, pack, expert), exactly like the pure-Python reference in the test suite, and
adds floating-point numbers in the same order, so both give the identical ``phy2log``.

Each greedy step is a Python loop over the items of one row (at most ``P``) whose body works on
all rows at once, in NumPy: for these small arrays NumPy's per-call cost is several times lower
than PyTorch's.

When the previous placement ``old`` is given, `relabel` permutes the new plan's nodes, ranks and
slots so that as many experts as possible stay where they are; every rank keeps its set of experts,
so the balancedness is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from eplb.errors import EPLBError
from eplb.placement import Placement
from eplb.policies import POLICY_OPTIONS, _register, check_migration_budget, check_refine
from eplb.policies.local_search import _max_rank_load, limit_migration, refine_packing

__all__ = ["default_policy", "pack", "replicate", "relabel"]


def _gather(values_Xn: np.ndarray, index_Xm: np.ndarray) -> np.ndarray:
    """``values[x, index[x, j]]`` as ``[X, m]``: `np.take_along_axis` along axis 1, through flat
    indices (about twice as fast on these small arrays)."""
    num_rows, n = values_Xn.shape
    return np.take(values_Xn, index_Xm + (np.arange(num_rows) * n)[:, None])


def _argsort_descending(weight_Xn: np.ndarray) -> np.ndarray:
    """``[X, n]`` -> ``[X, n]`` item indices by decreasing weight, ties by lowest index."""
    return _sort_descending(weight_Xn)[0]


def _sort_descending(weight_Xn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order_Xn, sorted_Xn)``: item indices by decreasing weight (ties by lowest index) and the
    weights in that order.

    Same order as a stable sort of ``-weight``, faster: an unstable float sort, then an integer
    sort of (run of equal weights, index) keys, which are unique. Reordering inside runs of equal
    weights leaves the sorted weights as they are.
    """
    n = weight_Xn.shape[1]
    order_Xn = np.argsort(-weight_Xn, axis=1)
    sorted_Xn = _gather(weight_Xn, order_Xn)
    run_Xn = np.zeros(weight_Xn.shape, dtype=np.int64)
    np.cumsum(sorted_Xn[:, 1:] != sorted_Xn[:, :-1], axis=1, out=run_Xn[:, 1:])
    return np.sort(run_Xn * n + order_Xn, axis=1) % n, sorted_Xn


def pack(weight_Xn: np.ndarray, num_packs: int) -> np.ndarray:
    """Balanced packing of ``n`` items into ``num_packs`` packs of ``n // num_packs`` items, per row.

    Items are taken heaviest first (ties: lowest index); each goes to the lightest pack that still
    has room (ties: lowest pack). With one item per pack (``n == num_packs``) item ``k`` goes to
    pack ``k``, as in DeepSeek's reference (its shortcut for that case): same pack loads, and the
    labels stay identical to the reference's.

    Args:
        weight_Xn: ``[X, n]`` float64 — weight of each item; ``n`` a multiple of ``num_packs``.
        num_packs: ``K``, packs per row.

    Returns:
        item_of_slot_Xn: ``[X, n]`` int64 — the item at position ``j`` of pack ``k`` is
        ``item_of_slot_Xn[x, k * (n // K) + j]``; positions are filled in packing order.
    """
    num_rows, n = weight_Xn.shape
    if n == num_packs:  # one item per pack: the reference keeps items in place (pack k gets item k)
        return np.broadcast_to(np.arange(n), (num_rows, n)).copy()
    cap = n // num_packs
    order_Xn, sorted_Xn = _sort_descending(weight_Xn)
    weight_nX = np.ascontiguousarray(sorted_Xn.T)
    pack_weight_XK = np.zeros((num_rows, num_packs))
    pack_count_XK = np.zeros((num_rows, num_packs), dtype=np.int64)
    flat_weight = pack_weight_XK.reshape(-1)  # views: flat indices are cheaper than 2-D ones
    flat_count = pack_count_XK.reshape(-1)
    # The item that fills a pack also adds inf to its weight, so argmin only sees packs with room.
    full_penalty_C = np.zeros(cap + 1)
    full_penalty_C[cap] = np.inf
    row_base_X = np.arange(num_rows) * num_packs
    pack_nX = np.empty((n, num_rows), dtype=np.int64)
    first = 0
    if num_packs > 1 and bool((weight_nX[num_packs - 1] > 0).all()):
        # The K heaviest items are all > 0, so the k-th of them finds packs 0..k-1 heavier than the
        # empty ones and goes to pack k (lowest index among the empty): no argmin needed.
        pack_weight_XK[:] = weight_nX[:num_packs].T
        pack_count_XK[:] = 1
        pack_nX[:num_packs] = np.arange(num_packs)[:, None]
        first = num_packs
    for k in range(first, n):
        p_X = pack_weight_XK.argmin(1)
        flat_X = row_base_X + p_X
        count_X = flat_count[flat_X] + 1
        flat_count[flat_X] = count_X
        flat_weight[flat_X] += weight_nX[k] + full_penalty_C[count_X]
        pack_nX[k] = p_X
    # Sort by (pack, arrival): the items of each pack in the order they arrived, i.e. slot order
    # (a stable sort of small ints, which NumPy does as a radix sort).
    small = np.int16 if num_packs < 2**15 else np.int64
    sorted_of_slot_Xn = np.argsort(pack_nX.T.astype(small), axis=1, kind="stable")
    return _gather(order_Xn, sorted_of_slot_Xn)


def replicate(weight_Xn: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Give ``num_slots - n`` extra slots, one at a time, to the item of largest weight per replica.

    Args:
        weight_Xn: ``[X, n]`` float64 — load of each item (e.g. logical expert).
        num_slots: ``M >= n``, slots per row.

    Returns:
        (slot2item_XM, count_Xn): ``[X, M]`` int64 — item held by each slot (slot ``i < n`` holds
        item ``i``, extra slots follow in the order they were given out), and ``[X, n]`` int64 —
        replicas of each item (each row sums to ``M``). Ties go to the lowest item index.
    """
    num_rows, n = weight_Xn.shape
    slot2item_XM = np.empty((num_rows, num_slots), dtype=np.int64)
    slot2item_XM[:, :n] = np.arange(n)
    count_Xn = np.ones((num_rows, n), dtype=np.int64)
    # C order so that the flat reshapes below are views, not copies.
    per_replica_Xn = np.array(weight_Xn, dtype=np.float64, order="C")
    flat_per_replica = per_replica_Xn.reshape(-1)
    flat_count = count_Xn.reshape(-1)
    flat_weight = np.ascontiguousarray(weight_Xn, dtype=np.float64).reshape(-1)
    row_base_X = np.arange(num_rows) * n
    for slot in range(n, num_slots):
        best_X = per_replica_Xn.argmax(1)  # first maximum: lowest index on ties
        slot2item_XM[:, slot] = best_X
        flat_X = row_base_X + best_X
        count_X = flat_count[flat_X] + 1
        flat_count[flat_X] = count_X
        flat_per_replica[flat_X] = flat_weight[flat_X] / count_X
    return slot2item_XM, count_Xn


def _rebalance(
    load_LE: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
    refine: bool = False, group_of_mgroup_LG: np.ndarray | None = None,
) -> np.ndarray:
    """``phy2log`` ``[L, P]`` of the hierarchical algorithm (global: one group, one node);
    ``refine`` adds the swap search of `refine_packing` after step 3; ``group_of_mgroup_LG``
    (``[L, num_groups]``, groups node by node) replaces step 1's packing of groups to nodes."""
    num_layers, num_logical = load_LE.shape
    group_size = num_logical // num_groups
    log_per_node = num_logical // num_nodes
    phy_per_node = num_physical // num_nodes

    # Step 1: pack groups to nodes. Group loads are summed left to right (cumsum), the same order
    # as the reference, so near-equal groups compare identically.
    group_load_LG = np.cumsum(load_LE.reshape(num_layers, num_groups, group_size), axis=2)[:, :, -1]
    if group_of_mgroup_LG is None:
        group_of_mgroup_LG = pack(group_load_LG, num_nodes)
    # mlog: "meta-logical" ids, the experts renumbered node by node after step 1.
    mlog2log_LE = (group_of_mgroup_LG[:, :, None] * group_size + np.arange(group_size)).reshape(
        num_layers, num_logical
    )

    # Step 2: replicate experts within each node (rows: layers x nodes).
    mlog_load_Xn = _gather(load_LE, mlog2log_LE).reshape(num_layers * num_nodes, log_per_node)
    phy2mlog_XM, mlogcnt_Xn = replicate(mlog_load_Xn, phy_per_node)

    # Step 3: pack each node's replicas onto its ranks.
    phy_load_XM = _gather(mlog_load_Xn / mlogcnt_Xn, phy2mlog_XM)
    phy_of_pphy_XM = pack(phy_load_XM, num_ranks // num_nodes)
    if refine:  # Step 3b: swap replicas between the node's ranks while that lowers its heaviest rank.
        perm_XM = refine_packing(_gather(phy_load_XM, phy_of_pphy_XM), num_ranks // num_nodes)
        phy_of_pphy_XM = _gather(phy_of_pphy_XM, perm_XM)
    pphy2mlog_XM = _gather(phy2mlog_XM, phy_of_pphy_XM)
    node_offset_N = np.arange(num_nodes) * log_per_node
    pphy2mlog_LNM = pphy2mlog_XM.reshape(num_layers, num_nodes, phy_per_node) + node_offset_N[:, None]
    pphy2mlog_LP = pphy2mlog_LNM.reshape(num_layers, num_physical)
    return _gather(mlog2log_LE, pphy2mlog_LP)


def _relabel(
    new_LP: np.ndarray, old_LP: np.ndarray, num_logical: int, num_nodes: int, num_ranks: int
) -> np.ndarray:
    """Permute nodes, ranks within nodes, and slots within ranks of ``new_LP`` to match ``old_LP``."""
    num_layers, num_physical = new_LP.shape
    per_rank = num_physical // num_ranks
    if per_rank == 1:
        return _relabel_one_slot_per_rank(new_LP, old_LP, num_logical, num_nodes)
    ranks_per_node = num_ranks // num_nodes
    layer_L1 = np.arange(num_layers)[:, None]
    rank_of_slot_P = np.arange(num_physical) // per_rank

    # Step 1: stay_LGG[l, a, b] = slots of new rank a whose expert old rank b already holds.
    old_holds_LEG = np.zeros((num_layers, num_logical, num_ranks), dtype=bool)
    old_holds_LEG[layer_L1, old_LP, rank_of_slot_P] = True
    holds_LGSG = old_holds_LEG[layer_L1, new_LP].reshape(num_layers, num_ranks, per_rank, num_ranks)
    stay_LGG = np.zeros((num_layers, num_ranks, num_ranks), dtype=np.int64)
    for j in range(per_rank):  # numpy reduces a short middle axis slowly; add the S slices instead
        stay_LGG += holds_LGSG[:, :, j]

    # Step 2: assign new nodes to old nodes. A node pair's value is an upper bound of the slots
    # that can stay: each new rank counted with its best old rank of that node.
    stay_LNRNR = stay_LGG.reshape(num_layers, num_nodes, ranks_per_node, num_nodes, ranks_per_node)
    old_node_LN = np.broadcast_to(np.arange(num_nodes), (num_layers, num_nodes)).copy()
    if num_nodes > 1:
        node_value_LNN = stay_LNRNR.max(4).sum(2)
        for l in range(num_layers):
            old_node_LN[l] = linear_sum_assignment(node_value_LNN[l], maximize=True)[1]

    # Step 3: assign new ranks to old ranks within each matched node pair.
    block_LNRR = stay_LNRNR[layer_L1, np.arange(num_nodes), :, old_node_LN, :]  # [L, N, R, R]
    block_XRR = block_LNRR.reshape(-1, ranks_per_node, ranks_per_node)
    old_local_XR = np.empty((block_XRR.shape[0], ranks_per_node), dtype=np.int64)
    for x in range(block_XRR.shape[0]):
        old_local_XR[x] = linear_sum_assignment(block_XRR[x], maximize=True)[1]
    old_rank_LNR = old_node_LN[:, :, None] * ranks_per_node + old_local_XR.reshape(num_layers, num_nodes, -1)
    old_rank_LG = old_rank_LNR.reshape(num_layers, num_ranks)
    # Node values are a bound, not the optimum: never do worse than leaving the ranks as they are.
    kept_L = np.take_along_axis(stay_LGG, old_rank_LG[:, :, None], 2).sum((1, 2))
    worse_L = kept_L < np.trace(stay_LGG, axis1=1, axis2=2)
    old_rank_LG[worse_L] = np.arange(num_ranks)
    moved_LGS = np.empty((num_layers, num_ranks, per_rank), dtype=np.int64)
    moved_LGS[layer_L1, old_rank_LG] = new_LP.reshape(num_layers, num_ranks, per_rank)

    # Step 4: within each rank, an expert that was there keeps its old slot.
    return _keep_in_place(moved_LGS.reshape(num_layers, num_physical), old_LP, num_logical, per_rank)


def _relabel_one_slot_per_rank(
    new_LP: np.ndarray, old_LP: np.ndarray, num_logical: int, num_nodes: int
) -> np.ndarray:
    """`_relabel` when every rank holds one slot: a rank's expert stays iff the rank is matched to
    an old rank holding it, so the best rank assignment within a node pair is one matching of
    copies (`_keep_in_place` over the node as one block). Node pairs are matched on their exact
    value, ``sum_e min(copies of e in the new node, copies in the old node)``."""
    num_layers, num_physical = new_LP.shape
    per_node = num_physical // num_nodes
    new_LNR = new_LP.reshape(num_layers, num_nodes, per_node)
    if num_nodes > 1:
        layer_L1 = np.arange(num_layers)[:, None]
        node_NR = np.broadcast_to(np.arange(num_nodes)[:, None], (num_nodes, per_node)).reshape(-1)
        new_LNE = np.zeros((num_layers, num_nodes, num_logical), dtype=np.int64)
        old_LNE = np.zeros((num_layers, num_nodes, num_logical), dtype=np.int64)
        np.add.at(new_LNE, (layer_L1, node_NR, new_LP), 1)
        np.add.at(old_LNE, (layer_L1, node_NR, old_LP), 1)
        value_LNN = np.minimum(new_LNE[:, :, None, :], old_LNE[:, None, :, :]).sum(3)
        moved_LNR = np.empty_like(new_LNR)
        for l in range(num_layers):
            moved_LNR[l, linear_sum_assignment(value_LNN[l], maximize=True)[1]] = new_LNR[l]
        new_LNR = moved_LNR
    return _keep_in_place(new_LNR.reshape(num_layers, num_physical), old_LP, num_logical, per_node)


def _keep_in_place(new_LP: np.ndarray, old_LP: np.ndarray, num_logical: int, block: int) -> np.ndarray:
    """Permute ``new_LP`` within blocks of ``block`` consecutive slots so that the k-th copy of an
    expert in a block takes the slot of its k-th copy in ``old_LP``'s block, where there is one;
    the other experts fill the remaining slots of the block in order."""
    num_layers, num_physical = new_LP.shape
    num_rows = new_LP.size // block
    # Keys (block row, expert, copy) are unique; old keys in (expert, copy) order per row are
    # ascending overall, so one sorted search matches all blocks at once.
    new_key_F, _, _ = _copy_keys(new_LP.reshape(num_rows, block), num_logical)
    _, old_key_sorted_F, old_order_F = _copy_keys(old_LP.reshape(num_rows, block), num_logical)
    size = new_key_F.size
    found_F = np.minimum(np.searchsorted(old_key_sorted_F, new_key_F), size - 1)
    target_F = old_order_F[found_F]
    matched_F = old_key_sorted_F[found_F] == new_key_F
    taken_F = np.zeros(size, dtype=bool)
    taken_F[target_F[matched_F]] = True
    # Per block, as many new slots are unmatched as old slots are free, and both lists are in
    # row-major order: pairing them in order keeps every expert in its block.
    target_F[~matched_F] = np.nonzero(~taken_F)[0]
    out_F = np.empty(size, dtype=new_LP.dtype)
    out_F[target_F] = new_LP.reshape(-1)
    return out_F.reshape(num_layers, num_physical)


def _copy_keys(ids_XB: np.ndarray, num_ids: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Key ``(row * num_ids + id) * B + copy`` of every entry (``copy``: earlier entries of the same
    row with the same id).

    Returns:
        ``(key_F, sorted_key_F, order_F)``, ``[X * B]`` each: the keys in entry order, the keys
        ascending, and the flat entry index of each ascending key.
    """
    num_rows, block = ids_XB.shape
    # A stable sort of small ints per row is a radix sort: (id, position) order within each row.
    order_XB = np.argsort(ids_XB.astype(np.int16 if num_ids < 2**15 else np.int32), axis=1, kind="stable")
    sorted_XB = _gather(ids_XB, order_XB)
    pos_B = np.arange(block)
    run_start_XB = np.ones(ids_XB.shape, dtype=bool)
    run_start_XB[:, 1:] = sorted_XB[:, 1:] != sorted_XB[:, :-1]
    copy_sorted_XB = pos_B - np.maximum.accumulate(np.where(run_start_XB, pos_B, 0), axis=1)
    row_X1 = np.arange(num_rows)[:, None]
    key_sorted_XB = (row_X1 * num_ids + sorted_XB) * block + copy_sorted_XB
    order_F = (order_XB + row_X1 * block).reshape(-1)
    key_F = np.empty(ids_XB.size, dtype=np.int64)
    key_F[order_F] = key_sorted_XB.reshape(-1)
    return key_F, key_sorted_XB.reshape(-1), order_F


def relabel(new: Placement, old: Placement, *, num_ranks: int, num_nodes: int = 1) -> Placement:
    """Relabel ``new`` so that as many experts as possible stay on their rank and slot of ``old``.

    Nodes of ``new`` are matched to nodes of ``old``, then ranks to ranks within each matched
    node pair (assignment problems maximising the slots whose expert the old rank already holds),
    then, inside each rank, an expert that was already there keeps its old slot. Only whole nodes,
    whole ranks and slots within a rank move, so every rank keeps its multiset of experts and every
    node its ranks: per-rank loads and balancedness are unchanged.

    Args:
        new: placement to relabel, ``phy2log [L, P]``.
        old: the placement in effect, same shape.
        num_ranks: ``G``.
        num_nodes: ``N``; use 1 when ``new`` is not node-structured (global policy).

    Returns:
        The relabeled `Placement`.
    """
    if new.phy2log.shape != old.phy2log.shape or new.num_logical != old.num_logical:
        raise EPLBError(f"relabel needs placements of one shape, got {new!r} and {old!r}")
    new.slots_per_rank(num_ranks)
    if num_nodes <= 0 or num_ranks % num_nodes:
        raise EPLBError(f"num_ranks ({num_ranks}) must be a multiple of num_nodes ({num_nodes})")
    phy2log_LP = _relabel(new.phy2log.numpy(), old.phy2log.numpy(), new.num_logical, num_nodes, num_ranks)
    return Placement._of_valid(phy2log_LP, new.num_logical)


@_register("default", POLICY_OPTIONS, override=False, trusted=True)
def default_policy(
    load: torch.Tensor,
    *,
    num_physical: int,
    num_groups: int = 1,
    num_nodes: int = 1,
    num_ranks: int = 1,
    old: Placement | None = None,
    migration_budget: float | None = None,
    refine: bool = False,
) -> Placement:
    """DeepSeek's EPLB: hierarchical when ``num_groups % num_nodes == 0``, else global.

    Args:
        load: ``[L, E]`` float64 — tokens per logical expert.
        num_physical: ``P``, slots per layer (a multiple of ``num_ranks``).
        num_groups: expert groups (blocks of ``E // num_groups`` consecutive experts).
        num_nodes: ``N``; the hierarchical form keeps each group's replicas on one node.
        num_ranks: ``G``, each holding ``P // G`` slots.
        old: placement in effect; when given, the plan is relabeled to move as little as possible.
        migration_budget: with ``old``, at most ``floor(migration_budget * P)`` slots per layer
            receive an expert their rank did not hold (see `limit_migration`); ``None``: no limit.
            A real number in ``[1 / P, 1]`` (smaller lets no slot move). Ignored without ``old``.
        refine: swap search after packing (`refine_packing`): never less balanced, not identical
            to the reference algorithm any more. A bool (None reads as False). With
            ``migration_budget``, the budgeted search runs towards both the refined and the plain
            fresh plan and each layer keeps the better result, so it is never less balanced than
            the same call without ``refine`` and keeps the budget.

    Returns:
        `Placement` with ``phy2log: [L, num_physical]``.

    Raises:
        EPLBError: ``migration_budget`` not a number in ``[1 / P, 1]``, ``refine`` not a bool.
    """
    migration_budget = check_migration_budget(migration_budget, num_physical)
    refine = check_refine(refine)
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    load_LE = np.asarray(load, dtype=np.float64)
    num_logical = load_LE.shape[1]
    phy2log_LP = _rebalance(load_LE, num_physical, num_groups, num_nodes, num_ranks, refine)
    if old is None:
        return Placement._of_valid(phy2log_LP, num_logical)
    old_LP = old.phy2log.numpy()
    phy2log_LP = _relabel(phy2log_LP, old_LP, num_logical, num_nodes, num_ranks)
    if migration_budget is None:
        return Placement._of_valid(phy2log_LP, num_logical)
    budgeted_LP = limit_migration(
        load_LE, old_LP, phy2log_LP, migration_budget, num_ranks=num_ranks, num_nodes=num_nodes,
        num_groups=num_groups,
    )
    if refine:
        # The search aims at the refined fresh plan, which can lead it elsewhere than the plain
        # one within the budget: run it towards the plain plan too (on the layers where the two
        # differ) and keep, per layer, the less loaded busiest rank (the plain end on ties), so
        # refine never ends below the same call without it.
        plain_LP = _relabel(
            _rebalance(load_LE, num_physical, num_groups, num_nodes, num_ranks), old_LP, num_logical, num_nodes,
            num_ranks,
        )
        rows = np.nonzero((plain_LP != phy2log_LP).any(1))[0]
        if rows.size:
            plain_XP = limit_migration(
                load_LE[rows], old_LP[rows], plain_LP[rows], migration_budget, num_ranks=num_ranks,
                num_nodes=num_nodes, num_groups=num_groups,
            )
            worse_X = (_max_rank_load(load_LE[rows], budgeted_LP[rows], num_ranks)
                       >= _max_rank_load(load_LE[rows], plain_XP, num_ranks))
            budgeted_LP[rows[worse_X]] = plain_XP[worse_X]
    return Placement._of_valid(budgeted_LP, num_logical)
