"""Planning time of the built-in policies on production-sized shapes (single CPU thread).

Run: ``python benchmarks/policy_speed.py [--repeats 20]``. Prints one row per (policy, shape):
the median and the fastest of ``--repeats`` timed calls after one warm-up call, for the registered
(input- and output-checked) policy and for the bare algorithm (``policy.__wrapped__``).

Targets: ``default`` <= 5 ms on DeepSeek-V3 hierarchical, <= 10 ms global on the
DeepSeek-V3 shape and on the Kimi-K2-like shape.
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


def _time_ms(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up: imports, allocator
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)

    print(f"{'policy':8} {'shape':26} {'L':>3} {'E':>4} {'P':>4} {'G':>3} {'N':>2} "
          f"{'median ms':>10} {'min ms':>7} {'raw median ms':>14}")
    for policy_name in ("default", "topk"):
        policy = get_policy(policy_name)
        for shape_name, (L, E, P, G, N, groups) in SHAPES.items():
            load = torch.randn(L, E, generator=gen, dtype=torch.float64).exp() * 1000  # log-normal, sigma 1
            kwargs = dict(num_physical=P, num_groups=groups, num_nodes=N, num_ranks=G)
            old = Placement.initial(L, E, P, G) if policy_name == "topk" else None
            median, fastest = _time_ms(lambda: policy(load, old=old, **kwargs), args.repeats)  # noqa: B023
            raw_median, _ = _time_ms(lambda: policy.__wrapped__(load, old=old, **kwargs), args.repeats)  # noqa: B023
            print(f"{policy_name:8} {shape_name:26} {L:3d} {E:4d} {P:4d} {G:3d} {N:2d} "
                  f"{median:10.2f} {fastest:7.2f} {raw_median:14.2f}")


if __name__ == "__main__":
    main()
