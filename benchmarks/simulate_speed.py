"""How long `eplb.simulate` takes on a DeepSeek-V3-shaped trace.

Shape: 10,000 steps, 58 MoE layers, 256 logical experts, top-8, 4096 tokens per step; 32 ranks
on 4 nodes, 8 expert groups, 32 redundant slots; a rebalance every 910 steps (10 rebalances).
The trace is a slowly drifting log-normal one (`eplb.traces.drift`); generating it is timed
separately. Prints the simulate wall time, split into policy time and everything else
(the batched rank-load products, transfer counting, bookkeeping).

    python benchmarks/simulate_speed.py [--steps 10000] [--policy default]
"""

from __future__ import annotations

import argparse
import time

import torch

from eplb.simulate import SimConfig, simulate
from eplb.traces import drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--interval", type=int, default=910)
    parser.add_argument("--policy", default="default")
    args = parser.parse_args()

    t0 = time.perf_counter()
    trace = drift(args.steps, 58, 256, sigma=1.0, drift_sigma=0.01, tokens_per_step=4096, top_k=8, seed=0)
    t_gen = time.perf_counter() - t0
    config = SimConfig(policy=args.policy, window_size=1000, step_interval=args.interval, num_redundant_experts=32,
                       num_ranks=32, num_nodes=4, num_groups=8, bytes_per_expert=3 * 7168 * 2048)
    t0 = time.perf_counter()
    result = simulate(trace, config, progress=False)
    t_sim = time.perf_counter() - t0
    run = result.runs[0]
    s = run.summary()
    plan_s = s["plan_time_s"]
    print(f"trace: {trace.steps} steps x {trace.num_layers} layers x {trace.num_logical} experts "
          f"(generated in {t_gen:.1f} s); torch threads: {torch.get_num_threads()}")
    print(f"simulate ({args.policy}, {len(run.rebalances)} rebalances): {t_sim:.2f} s total, "
          f"{plan_s:.2f} s in the policy, {t_sim - plan_s:.2f} s the rest")
    print(f"mean balancedness {s['mean_balancedness']:.4f}; bytes moved {s['bytes_moved'] / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
