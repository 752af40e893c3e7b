"""How long `eplb.simulate` takes on a DeepSeek-V3-shaped trace.

Shape: 10,000 steps, 58 MoE layers, 256 logical experts, top-8, 4096 tokens per step; 32 ranks
on 4 nodes, 8 expert groups, 32 redundant slots; a rebalance every 910 steps (10 rebalances).
The trace is a slowly drifting log-normal one (`eplb.traces.drift`); generating it is timed
separately (CPU seconds), side by side with the exact multinomial sampler the generators used
before (``--compare-sampler``). Prints the simulate wall time, split into policy time and
everything else (the batched rank-load products, transfer counting, bookkeeping), and the time
to count one rebalance's transfers: vectorised (`eplb.simulate.count_transfers`) against one
`eplb.transfer.plan_layer_transfer` per layer.

Targets: trace generation >= 3x faster than the multinomial sampler with exact per-step totals.

    python benchmarks/simulate_speed.py [--steps 10000] [--policy default] [--compare-sampler]
"""

from __future__ import annotations

import argparse
import time

import torch

import eplb.traces
from eplb.simulate import SimConfig, count_transfers, simulate
from eplb.traces import drift
from eplb.transfer import plan_layer_transfer


def _generate(steps: int):
    t0 = time.thread_time()
    trace = drift(steps, 58, 256, sigma=1.0, drift_sigma=0.01, tokens_per_step=4096, top_k=8, seed=0)
    return trace, time.thread_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--interval", type=int, default=910)
    parser.add_argument("--policy", default="default")
    parser.add_argument("--compare-sampler", action="store_true",
                        help="also generate the trace with the exact multinomial sampler (slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    trace, t_gen = _generate(args.steps)
    exact = bool((trace.loads.sum(-1) == 4096 * 8).all())
    print(f"trace generation: {t_gen:.1f} s CPU; every step's total exact: {exact}")
    if args.compare_sampler:
        threshold = eplb.traces._GAUSS_MIN_MEAN
        eplb.traces._GAUSS_MIN_MEAN = 2**62  # every draw through numpy's multinomial
        try:
            _, t_multinomial = _generate(args.steps)
        finally:
            eplb.traces._GAUSS_MIN_MEAN = threshold
        print(f"  with the exact multinomial sampler: {t_multinomial:.1f} s CPU ({t_multinomial / t_gen:.1f}x slower)")
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

    # Transfer counting of the last rebalance: vectorised against the per-layer plan.
    old = run.final_placement
    new_LP = old.phy2log.flip(1).numpy()
    old_LP = old.phy2log.numpy()
    t0 = time.thread_time()
    for _ in range(10):
        fast = count_transfers(old_LP, new_LP, 32)
    t_fast = (time.thread_time() - t0) / 10
    t0 = time.thread_time()
    slow = [0, 0]
    for layer in range(old_LP.shape[0]):
        plan = plan_layer_transfer(torch.from_numpy(old_LP[layer]), torch.from_numpy(new_LP[layer]),
                                   rank=0, num_ranks=32)
        slow[0] += plan.num_changed_slots
        slow[1] += plan.num_network_transfers
    t_slow = time.thread_time() - t0
    print(f"transfer counting per rebalance: {t_fast * 1e3:.2f} ms vectorised, {t_slow * 1e3:.1f} ms with one "
          f"transfer plan per layer (same counts: {tuple(slow) == fast})")


if __name__ == "__main__":
    main()
