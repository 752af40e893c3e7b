"""Slow, obviously-correct reference of the `default` policy (pure Python, one layer at a time).

The fast policy in `eplb.policies.default` must give the identical ``phy2log`` for every input.
Ties are broken by the lowest index everywhere (items, packs, experts).
"""

from __future__ import annotations


def reference_pack(weights: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    """weights: [n] -> (pack of each item, position in its pack); ``n // num_packs`` items per pack.

    Items are taken heaviest first; each goes to the lightest pack that still has room. With one
    item per pack, item ``k`` goes to pack ``k`` (DeepSeek's reference takes that shortcut).
    """
    n = len(weights)
    cap = n // num_packs
    if cap == 1:
        return list(range(n)), [0] * n
    order = sorted(range(n), key=lambda i: (-weights[i], i))
    pack_w = [0.0] * num_packs
    pack_n = [0] * num_packs
    pack, pos = [0] * n, [0] * n
    for i in order:
        p = min((q for q in range(num_packs) if pack_n[q] < cap), key=lambda q: (pack_w[q], q))
        pack[i], pos[i] = p, pack_n[p]
        pack_w[p] += weights[i]
        pack_n[p] += 1
    return pack, pos


def reference_replicate(weights: list[float], num_phy: int) -> tuple[list[int], list[int]]:
    """weights: [n] -> (phy2log [num_phy], logcnt [n]); each extra slot goes to max load/replica."""
    n = len(weights)
    phy2log = list(range(n))
    cnt = [1] * n
    for _ in range(n, num_phy):
        best = max(range(n), key=lambda e: (weights[e] / cnt[e], -e))
        phy2log.append(best)
        cnt[best] += 1
    return phy2log, cnt


def reference_layer(
    w: list[float], num_physical: int, num_groups: int, num_nodes: int, num_ranks: int
) -> list[int]:
    """One layer's ``phy2log`` [num_physical] for the loads ``w`` [E] (hierarchical form)."""
    E = len(w)
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    per_rank = num_physical // num_ranks
    ranks_per_node = num_ranks // num_nodes
    # Step 1: pack groups to nodes
    gw = [sum(w[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
    gpack, gpos = reference_pack(gw, num_nodes)
    mlog2log = [0] * E
    for g in range(num_groups):
        base = (gpack[g] * groups_per_node + gpos[g]) * group_size
        for j in range(group_size):
            mlog2log[base + j] = g * group_size + j
    # Step 2: replicate experts within each node
    per_node_log = E // num_nodes
    per_node_phy = num_physical // num_nodes
    row: list[int] = []
    for node in range(num_nodes):
        mw = [w[mlog2log[node * per_node_log + j]] for j in range(per_node_log)]
        phy2mlog, cnt = reference_replicate(mw, per_node_phy)
        # Step 3: pack physical experts to ranks
        pw = [mw[m] / cnt[m] for m in phy2mlog]
        pack, pos = reference_pack(pw, ranks_per_node)
        node_row = [0] * per_node_phy
        for p in range(per_node_phy):
            node_row[pack[p] * per_rank + pos[p]] = mlog2log[node * per_node_log + phy2mlog[p]]
        row.extend(node_row)
    return row


def reference_default(
    load: list[list[float]], *, num_physical: int, num_groups: int = 1, num_nodes: int = 1, num_ranks: int = 1
) -> list[list[int]]:
    """``phy2log`` [L][num_physical] of DeepSeek's EPLB: hierarchical when
    ``num_groups % num_nodes == 0``, else global (one group, one node)."""
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    return [
        reference_layer(list(map(float, row)), num_physical, num_groups, num_nodes, num_ranks) for row in load
    ]
