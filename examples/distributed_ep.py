"""Expert parallelism with load balancing over several ranks, on the CPU with gloo.

Run:
    torchrun --nproc-per-node 4 examples/distributed_ep.py [--steps 12] [--step-interval 5]

Every rank builds the same small MoE model (same seed), wraps it with ``ep_group`` = all ranks,
and runs it on its own batch: data parallel outside the MoE layers, expert parallel inside. Rank
``r`` keeps only the weights of its slots; tokens travel to the rank owning their expert's slot
and back. The router favours a few experts, so the wrapper rebalances every ``--step-interval``
steps. Ranks see different token counts, and the last rank gets no tokens at all on one step.

After every step each rank checks its output against the unwrapped model (kept aside on every
rank for this check only): rebalancing must not change what the model computes. Rank 0 prints
the balancedness before and after each rebalance.
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch
import torch.distributed as dist

from eplb import EPLBConfig, EPLBWrapper
from eplb.moe import MoE, ResidualStack

HIDDEN, INTER, EXPERTS, TOP_K, LAYERS = 32, 64, 8, 2, 2
HOT_EXPERTS = 3  # the router prefers experts 0..2


class TinyMoEModel(ResidualStack):
    """``LAYERS`` residual MoE blocks (``x + block(x)``)."""

    def __init__(self):
        super().__init__(MoE(HIDDEN, INTER, EXPERTS, TOP_K) for _ in range(LAYERS))
        with torch.no_grad():
            for block in self.blocks:
                # Inputs have a positive mean: these gate rows then win most tokens.
                block.gate.weight[:HOT_EXPERTS] += 0.2


def batch(rank: int, step: int, num_ranks: int) -> torch.Tensor:
    """This rank's tokens at this step: a different count per rank, none for the last rank at step 3."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    num_tokens = 0 if (step == 3 and rank == num_ranks - 1) else 4 + 3 * rank
    return torch.randn(num_tokens, HIDDEN, generator=gen) + 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--step-interval", type=int, default=5)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(name)s: %(message)s")
    torch.manual_seed(0)  # the same model on every rank
    model = TinyMoEModel().eval()
    reference = copy.deepcopy(model)  # for the check only: the unwrapped model

    config = EPLBConfig(
        num_redundant_experts=num_ranks,  # P = E + G slots, one spare per rank
        window_size=args.step_interval,
        step_interval=args.step_interval,
        use_async=False,
    )
    wrapper = EPLBWrapper(model, config, ep_group=dist.group.WORLD)

    with torch.no_grad():
        for step in range(args.steps):
            x = batch(rank, step, num_ranks)
            rebalances = wrapper.stats()["num_rebalances"]
            out = wrapper(x)  # one step; the rebalance runs after the forward when it is due
            torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
            stats = wrapper.stats(reduce=True)  # collective: every rank calls it
            if stats["num_rebalances"] > rebalances and rank == 0:
                moved, mib = (
                    stats["last_rebalance_network_transfers"],
                    stats["last_rebalance_bytes_moved"] / 2**20,
                )
                print(
                    f"step {step + 1}: rebalanced; {moved} experts crossed the network ({mib:.1f} MiB); "
                    f"balancedness of the window: predicted gain {stats['last_predicted_gain']:+.3f}, "
                    f"now {stats['balancedness']:.3f}"
                )
    if rank == 0:
        print(
            f"{num_ranks} ranks, {args.steps} steps: every output equals the unwrapped model's; "
            f"placement (phy2log) now:\n{wrapper.placement.phy2log}"
        )
    wrapper.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
