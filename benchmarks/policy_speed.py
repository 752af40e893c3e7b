"""Planning time and balancedness of the built-in policies on production-sized shapes (one CPU thread).

Run: ``python benchmarks/policy_speed.py [--repeats 10]``. Prints four tables:

1. ``default`` and ``topk``: the median and fastest of ``--repeats`` timed calls after one
   warm-up call, for the registered (input-checked) policy and the bare algorithm (``policy.__wrapped__``).
2. ``default`` against a comparison baseline, side by side on the same loads (each round times
   the three one after the other; medians of ``--repeats`` rounds): DeepSeek's EPLB
   algorithm (github.com/deepseek-ai/EPLB, ``eplb.py``) written per layer in NumPy with a heap
   for the packing, the structure of vLLM's NumPy port. Two baselines, reimplemented in this
   script from the algorithm's description, only to measure against (eplb does not use them): A
   packs with one NumPy ``argmin`` per item, as vLLM's NumPy port does; B with a heap. The table
   also checks that all give the identical ``phy2log``.
3. ``refine=True``: balancedness without and with the swap search, and its planning time.
4. Relabelling with one slot per rank (DeepSeek-V3 decode: 256 experts on 320 ranks).

Loads are log-normal (sigma 1). Targets: default identical to the reference and >= 12x faster
than the baseline on DeepSeek-V3 hierarchical; refine >= 0.999 on DeepSeek-V3 global and the
Kimi-K2-like shape, >= 0.995 on the 1024-slot shape, <= 100 ms on DeepSeek-V3; one-slot-per-rank
relabel <= 10 ms.
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import time

import numpy as np
import torch

from eplb.metrics import balancedness
from eplb.placement import Placement
from eplb.policies import get_policy
from eplb.policies.default import _rebalance, _relabel

# name: (L, E, P, G ranks, N nodes, groups)
SHAPES = {
    "DeepSeek-V3 hierarchical": (58, 256, 288, 32, 4, 8),
    "DeepSeek-V3 global": (58, 256, 288, 32, 1, 1),
    "Kimi-K2-like global": (60, 384, 448, 64, 1, 1),
    "1024 slots, 256 ranks": (61, 512, 1024, 256, 1, 1),
}


def _time_ms(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up: imports, allocator
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        samples.append((time.thread_time() - start) * 1e3)
    return statistics.median(samples), min(samples)


# ---------------------------------------------------------------------- comparison baseline
def baseline_pack(weight_Xn: np.ndarray, num_packs: int, heap: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row: heaviest item first into the lightest pack with room.

    ``heap=False``: one NumPy ``argmin`` over the row's pack weights per item, full packs masked
    with inf (the structure of vLLM's NumPy port); ``heap=True``: a heap of packs."""
    num_rows, n = weight_Xn.shape
    cap = n // num_packs
    if cap == 1:  # the reference's shortcut: item k in pack k
        return np.broadcast_to(np.arange(n), (num_rows, n)).copy(), np.zeros((num_rows, n), dtype=np.int64)
    pack_Xn = np.empty((num_rows, n), dtype=np.int64)
    rank_Xn = np.empty((num_rows, n), dtype=np.int64)
    order_Xn = np.argsort(-weight_Xn, axis=1, kind="stable")
    if not heap:
        pack_weight_XK = np.zeros((num_rows, num_packs))
        pack_count_XK = np.zeros((num_rows, num_packs), dtype=np.int64)
        for x in range(num_rows):
            weights, counts = pack_weight_XK[x], pack_count_XK[x]
            for item in order_Xn[x]:
                k = int(np.argmin(weights))
                pack_Xn[x, item], rank_Xn[x, item] = k, counts[k]
                weights[k] += weight_Xn[x, item]
                counts[k] += 1
                if counts[k] == cap:
                    weights[k] = np.inf
        return pack_Xn, rank_Xn
    for x in range(num_rows):
        heap = [(0.0, k) for k in range(num_packs)]
        count = [0] * num_packs
        row = weight_Xn[x]
        for item in order_Xn[x].tolist():
            load, k = heapq.heappop(heap)
            pack_Xn[x, item], rank_Xn[x, item] = k, count[k]
            count[k] += 1
            if count[k] < cap:
                heapq.heappush(heap, (load + row[item], k))
    return pack_Xn, rank_Xn


def baseline_replicate(weight_Xn: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_rows, n = weight_Xn.shape
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, n), dtype=np.int64)
    rows = np.arange(num_rows)
    for i in range(n, num_phy):
        best = (weight_Xn / logcnt).argmax(1)
        phy2log[:, i] = best
        rank[:, i] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, rank, logcnt


def baseline_inverse(perm_XM: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm_XM)
    np.put_along_axis(inv, perm_XM, np.broadcast_to(np.arange(perm_XM.shape[1]), perm_XM.shape), 1)
    return inv


def baseline_default(
    load_LE: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int, heap: bool = False
):
    """DeepSeek's hierarchical EPLB (global: one group, one node) -> (phy2log, log2phy, logcnt)."""
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    L, E = load_LE.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_node = num_physical // num_nodes
    # Step 1: pack groups to nodes
    tokens_per_group = load_LE.reshape(L, num_groups, group_size).sum(-1)
    group_pack, group_rank = baseline_pack(tokens_per_group, num_nodes, heap)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(L, E)
    mlog2log = baseline_inverse(log2mlog)
    # Step 2: replicate experts within nodes
    tokens_per_mlog = np.take_along_axis(load_LE, mlog2log, 1).reshape(L * num_nodes, E // num_nodes)
    phy2mlog, phyrank, mlogcnt = baseline_replicate(tokens_per_mlog, phy_per_node)
    # Step 3: pack physical experts to ranks
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, 1)
    pack_index, rank_in_pack = baseline_pack(tokens_per_phy, num_ranks // num_nodes, heap)
    phy2pphy = pack_index * (phy_per_node // (num_ranks // num_nodes)) + rank_in_pack
    pphy2phy = baseline_inverse(phy2pphy)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, 1)
    node_offset = (np.arange(num_nodes) * (E // num_nodes))[:, None]
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, -1) + node_offset).reshape(L, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, 1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, 1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, 1)
    # log2phy: [L, E, max replicas], -1 padded, as the reference returns it
    log2phy = np.full((L, E, int(logcnt.max())), -1, dtype=np.int64)
    log2phy[np.arange(L)[:, None], phy2log, pphyrank] = np.arange(num_physical)
    return phy2log, log2phy, logcnt


# ---------------------------------------------------------------------- tables
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    loads = {name: torch.randn(L, E, generator=gen, dtype=torch.float64).exp() * 1000
             for name, (L, E, *_rest) in SHAPES.items()}

    print("1. planning time, CPU ms of one thread (median / fastest)")
    print(f"{'policy':8} {'shape':26} {'L':>3} {'E':>4} {'P':>5} {'G':>4} {'N':>2} "
          f"{'median ms':>10} {'min ms':>7} {'raw median ms':>14}")
    for policy_name in ("default", "topk"):
        policy = get_policy(policy_name)
        for shape_name, (L, E, P, G, N, groups) in SHAPES.items():
            load = loads[shape_name]
            kwargs = dict(num_physical=P, num_groups=groups, num_nodes=N, num_ranks=G)
            old = Placement.initial(L, E, P, G) if policy_name == "topk" else None
            median, fastest = _time_ms(lambda: policy(load, old=old, **kwargs), args.repeats)  # noqa: B023
            raw_median, _ = _time_ms(lambda: policy.__wrapped__(load, old=old, **kwargs), args.repeats)  # noqa: B023
            print(f"{policy_name:8} {shape_name:26} {L:3d} {E:4d} {P:5d} {G:4d} {N:2d} "
                  f"{median:10.2f} {fastest:7.2f} {raw_median:14.2f}")

    print("\n2. default against comparison baselines reimplemented in this script (DeepSeek's algorithm per"
          " layer in NumPy; A: NumPy argmin per packed item, the structure of vLLM's NumPy port; B: a heap),"
          " CPU ms")
    print(f"{'shape':26} {'eplb default ms':>16} {'baseline A ms':>14} {'speed-up':>9} {'baseline B ms':>14} "
          f"{'speed-up':>9} {'identical phy2log':>18}")
    policy = get_policy("default")
    for shape_name, (_, _, P, G, N, groups) in SHAPES.items():
        load = loads[shape_name]
        kwargs = dict(num_physical=P, num_groups=groups, num_nodes=N, num_ranks=G)
        ours = policy(load, **kwargs)
        same = all(
            np.array_equal(ours.phy2log.numpy(), theirs[0]) and np.array_equal(ours.logcnt.numpy(), theirs[2])
            for theirs in (baseline_default(load.numpy(), P, groups, N, G, heap) for heap in (False, True))
        )
        # Side by side: each round times eplb, then baseline A, then baseline B, on the same load,
        # so a busy machine slows all three alike; medians over the rounds.
        calls = (lambda: policy(load, **kwargs),  # noqa: B023
                 lambda: baseline_default(load.numpy(), P, groups, N, G, False),  # noqa: B023
                 lambda: baseline_default(load.numpy(), P, groups, N, G, True))  # noqa: B023
        samples = [[], [], []]
        for fn in calls:
            fn()  # warm-up
        for _ in range(args.repeats):
            for fn, out in zip(calls, samples):
                start = time.thread_time()
                fn()
                out.append((time.thread_time() - start) * 1e3)
        ours_ms, *base_ms = (statistics.median(s) for s in samples)
        print(f"{shape_name:26} {ours_ms:16.2f} {base_ms[0]:14.2f} {base_ms[0] / ours_ms:8.1f}x "
              f"{base_ms[1]:14.2f} {base_ms[1] / ours_ms:8.1f}x {str(same):>18}")

    print("\n3. refine=True: balancedness of the plan without and with the swap search, CPU ms")
    print(f"{'shape':26} {'default':>8} {'refined':>8} {'default ms':>11} {'refine ms':>10}")
    for shape_name, (_, _, P, G, N, groups) in SHAPES.items():
        load = loads[shape_name]
        kwargs = dict(num_physical=P, num_groups=groups, num_nodes=N, num_ranks=G)
        plain, refined = policy(load, **kwargs), policy(load, refine=True, **kwargs)
        plain_ms, _ = _time_ms(lambda: policy(load, **kwargs), args.repeats)  # noqa: B023
        refine_ms, _ = _time_ms(lambda: policy(load, refine=True, **kwargs), max(args.repeats // 2, 2))  # noqa: B023
        print(f"{shape_name:26} {balancedness(load, plain, G).aggregate:8.4f} "
              f"{balancedness(load, refined, G).aggregate:8.4f} {plain_ms:11.2f} {refine_ms:10.2f}")

    print("\n4. relabel with one slot per rank (DeepSeek-V3 decode: 58 layers, 256 experts, 320 slots on 320 ranks),"
          " after a 5% drift, CPU ms")
    L, E, P, G = 58, 256, 320, 320
    load0 = torch.randn(L, E, generator=gen, dtype=torch.float64).exp() * 1000
    load1 = load0 * (0.05 * torch.randn(L, E, generator=gen, dtype=torch.float64)).exp()
    old_LP = _rebalance(load0.numpy(), P, 1, 1, G)
    new_LP = _rebalance(load1.numpy(), P, 1, 1, G)
    for N in (1, 8):
        relabel_ms, _ = _time_ms(lambda: _relabel(new_LP, old_LP, E, N, G), args.repeats)  # noqa: B023
        kept = float((_relabel(new_LP, old_LP, E, N, G) == old_LP).mean())
        print(f"nodes={N}: relabel {relabel_ms:.2f} ms; slots keeping their expert {kept:.1%}")


if __name__ == "__main__":
    main()
