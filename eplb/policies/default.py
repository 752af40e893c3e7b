"""DeepSeek's hierarchical / global EPLB policy (straightforward per-layer version)."""

from __future__ import annotations

import torch

from eplb.placement import Placement
from eplb.policies import register_policy


def _pack(weights: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    """weights: [n] -> (pack of each item, position in its pack); n / num_packs items per pack."""
    n = len(weights)
    cap = n // num_packs
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


def _replicate(weights: list[float], num_phy: int) -> tuple[list[int], list[int]]:
    """weights: [n] -> (phy2log [num_phy], logcnt [n]); each extra slot goes to max load/replica."""
    n = len(weights)
    phy2log = list(range(n))
    cnt = [1] * n
    for _ in range(n, num_phy):
        best = max(range(n), key=lambda e: (weights[e] / cnt[e], -e))
        phy2log.append(best)
        cnt[best] += 1
    return phy2log, cnt


def _layer(w: list[float], num_physical: int, num_groups: int, num_nodes: int, num_ranks: int) -> list[int]:
    E = len(w)
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    per_rank = num_physical // num_ranks
    ranks_per_node = num_ranks // num_nodes
    # Step 1: pack groups to nodes
    gw = [sum(w[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
    gpack, gpos = _pack(gw, num_nodes)
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
        phy2mlog, cnt = _replicate(mw, per_node_phy)
        # Step 3: pack physical experts to ranks
        pw = [mw[m] / cnt[m] for m in phy2mlog]
        pack, pos = _pack(pw, ranks_per_node)
        node_row = [0] * per_node_phy
        for p in range(per_node_phy):
            node_row[pack[p] * per_rank + pos[p]] = mlog2log[node * per_node_log + phy2mlog[p]]
        row.extend(node_row)
    return row


@register_policy("default")
def default_policy(load, *, num_physical, num_groups=1, num_nodes=1, num_ranks=1, old=None) -> Placement:
    """DeepSeek's EPLB: hierarchical when ``num_groups % num_nodes == 0``, else global.

    Args:
        load: ``[L, E]`` float64 — tokens per logical expert.
    Returns:
        `Placement` with ``phy2log: [L, num_physical]``.
    """
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    rows = [_layer(r, num_physical, num_groups, num_nodes, num_ranks) for r in load.tolist()]
    phy2log = torch.tensor(rows, dtype=torch.int64).reshape(load.shape[0], num_physical)
    return Placement.from_phy2log(phy2log, load.shape[1])
