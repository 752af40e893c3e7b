"""How many slots need a weight transfer after a small load drift, with and without relabeling.

Run: ``python benchmarks/relabel_movement.py [--drift 0.05] [--repeats 20]``.

A log-normal (sigma 1) load is planned with the ``default`` policy; the load then drifts by a
multiplicative log-normal factor (sigma ``--drift``) and is planned again, once from scratch
(``old=None``) and once movement-aware (``old=`` the first plan). A slot needs a transfer when its
new expert is not already on that rank in the old plan. Also prints the time relabeling adds
(median of ``--repeats`` calls, single thread) and checks that per-rank loads are unchanged.

Targets, DeepSeek-V3 hierarchical: <= 70% of slots need a transfer, relabel adds <= 5 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from eplb.placement import Placement
from eplb.policies import get_policy

# name: (L, E, P, G ranks, N nodes, groups)
SHAPES = {
    "DeepSeek-V3 hierarchical": (58, 256, 288, 32, 4, 8),
    "DeepSeek-V3 global": (58, 256, 288, 32, 1, 1),
    "Kimi-K2-like global": (60, 384, 448, 64, 1, 1),
}


def transfer_fraction(new: Placement, old: Placement, num_ranks: int) -> float:
    """Fraction of slots whose expert is not on the same rank in ``old``."""
    num_layers, num_physical = new.phy2log.shape
    rank_P = torch.arange(num_physical) // (num_physical // num_ranks)
    old_holds_LEG = torch.zeros(num_layers, old.num_logical, num_ranks, dtype=torch.bool)
    layer_L1 = torch.arange(num_layers)[:, None]
    old_holds_LEG[layer_L1, old.phy2log, rank_P] = True
    return 1.0 - old_holds_LEG[layer_L1, new.phy2log, rank_P].double().mean().item()


def sorted_rank_loads(placement: Placement, load_LE: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``[L, G]`` per-rank loads (each replica carries load / replicas), sorted within each layer.

    Slot loads are sorted before summing, so the result does not depend on the slot order in a rank.
    """
    per_replica_LP = torch.gather(load_LE / placement.logcnt, 1, placement.phy2log)
    per_replica_LGS = per_replica_LP.reshape(placement.num_layers, num_ranks, -1).sort(2).values
    return per_replica_LGS.sum(2).sort(1).values


def _median_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drift", type=float, default=0.05, help="sigma of the multiplicative drift")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    policy = get_policy("default")

    print(f"{'shape':26} {'transfer, no relabel':>21} {'transfer, relabel':>18} "
          f"{'plan ms':>8} {'plan+relabel ms':>16} {'relabel adds ms':>16}")
    for shape_name, (L, E, P, G, N, groups) in SHAPES.items():
        kwargs = dict(num_physical=P, num_groups=groups, num_nodes=N, num_ranks=G)
        load0 = torch.randn(L, E, generator=gen, dtype=torch.float64).exp() * 1000
        load1 = load0 * (args.drift * torch.randn(L, E, generator=gen, dtype=torch.float64)).exp()
        old = policy(load0, **kwargs)
        fresh = policy(load1, **kwargs)
        moved = policy(load1, old=old, **kwargs)
        if not torch.equal(sorted_rank_loads(fresh, load1, G), sorted_rank_loads(moved, load1, G)):
            raise SystemExit(f"{shape_name}: relabeling changed the per-rank loads")
        plain_ms = _median_ms(lambda: policy(load1, **kwargs), args.repeats)  # noqa: B023
        relabel_ms = _median_ms(lambda: policy(load1, old=old, **kwargs), args.repeats)  # noqa: B023
        without, with_relabel = transfer_fraction(fresh, old, G), transfer_fraction(moved, old, G)
        print(f"{shape_name:26} {without:21.1%} {with_relabel:18.1%} "
              f"{plain_ms:8.2f} {relabel_ms:16.2f} {relabel_ms - plain_ms:16.2f}")


if __name__ == "__main__":
    main()
