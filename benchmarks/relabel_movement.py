"""How many slots a rebalance moves after a load drift: fresh plan, relabelled plan, and a migration budget.

Run: ``python benchmarks/relabel_movement.py [--budget 0.25] [--repeats 5]``.

A log-normal (sigma 1) load is planned with the ``default`` policy; the load then drifts by a
multiplicative log-normal factor (sigma 5%, 20% and 50%) and is planned again: from scratch
(``old=None``), movement-aware (``old=`` the first plan: relabelled), and with
``migration_budget``. A slot is *moved* when its new expert was not on that rank in the old plan
(it needs a weight transfer). Balancedness is measured on the drifted load; "stale" is the old plan
on it (not rebalancing at all). Times are CPU ms of one thread (median of ``--repeats``).

Targets, DeepSeek-V3 hierarchical and global, 5% and 20% drift, budget 0.25: moved <= 25% and
balancedness >= the fresh plan's - 0.005, planning <= 100 ms for the whole model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from eplb.metrics import balancedness
from eplb.placement import Placement
from eplb.policies import get_policy

# name: (L, E, P, G ranks, N nodes, groups)
SHAPES = {
    "DeepSeek-V3 hierarchical": (58, 256, 288, 32, 4, 8),
    "DeepSeek-V3 global": (58, 256, 288, 32, 1, 1),
    "Kimi-K2-like global": (60, 384, 448, 64, 1, 1),
}
DRIFTS = (0.05, 0.20, 0.50)


def moved_fraction(new: Placement, old: Placement, num_ranks: int) -> float:
    """Fraction of slots whose expert is not on the same rank in ``old``."""
    num_layers, num_physical = new.phy2log.shape
    rank_P = torch.arange(num_physical) // (num_physical // num_ranks)
    old_holds_LEG = torch.zeros(num_layers, old.num_logical, num_ranks, dtype=torch.bool)
    layer_L1 = torch.arange(num_layers)[:, None]
    old_holds_LEG[layer_L1, old.phy2log, rank_P] = True
    return 1.0 - old_holds_LEG[layer_L1, new.phy2log, rank_P].double().mean().item()


def sorted_rank_loads(placement: Placement, load_LE: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``[L, G]`` per-rank loads, slot loads summed in sorted order (independent of slot order)."""
    per_replica_LP = torch.gather(load_LE / placement.logcnt, 1, placement.phy2log)
    per_replica_LGS = per_replica_LP.reshape(placement.num_layers, num_ranks, -1).sort(2).values
    return per_replica_LGS.sum(2).sort(1).values


def _median_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        samples.append((time.thread_time() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.25, help="migration_budget of the budget columns")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    policy = get_policy("default")

    print(f"migration_budget={args.budget}; moved = slots needing a transfer; bal = balancedness on the drifted load")
    print(f"{'shape':26} {'drift':>5} {'stale bal':>9} | {'fresh moved':>11} {'relabel moved':>13} {'fresh bal':>9} "
          f"{'plan ms':>8} | {'budget moved':>12} {'budget bal':>10} {'vs fresh':>8} {'budget ms':>9}")
    for shape_name, (L, E, P, G, N, groups) in SHAPES.items():
        kwargs = dict(num_physical=P, num_groups=groups, num_nodes=N, num_ranks=G)
        load0 = torch.randn(L, E, generator=gen, dtype=torch.float64).exp() * 1000
        old = policy(load0, **kwargs)
        for drift in DRIFTS:
            load1 = load0 * (drift * torch.randn(L, E, generator=gen, dtype=torch.float64)).exp()
            fresh = policy(load1, **kwargs)
            moved = policy(load1, old=old, **kwargs)
            if not torch.equal(sorted_rank_loads(fresh, load1, G), sorted_rank_loads(moved, load1, G)):
                raise SystemExit(f"{shape_name}: relabeling changed the per-rank loads")
            budgeted = policy(load1, old=old, migration_budget=args.budget, **kwargs)
            plan_ms = _median_ms(lambda: policy(load1, old=old, **kwargs), args.repeats)  # noqa: B023
            budget_ms = _median_ms(
                lambda: policy(load1, old=old, migration_budget=args.budget, **kwargs), args.repeats  # noqa: B023
            )
            stale_bal = balancedness(load1, old, G).aggregate
            fresh_bal = balancedness(load1, moved, G).aggregate
            budget_bal = balancedness(load1, budgeted, G).aggregate
            print(f"{shape_name:26} {drift:5.0%} {stale_bal:9.4f} | {moved_fraction(fresh, old, G):11.1%} "
                  f"{moved_fraction(moved, old, G):13.1%} {fresh_bal:9.4f} {plan_ms:8.2f} | "
                  f"{moved_fraction(budgeted, old, G):12.1%} {budget_bal:10.4f} {budget_bal - fresh_bal:+8.4f} "
                  f"{budget_ms:9.2f}")


if __name__ == "__main__":
    main()
