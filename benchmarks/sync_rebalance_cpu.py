"""Host cost of a sync rebalance on 2 gloo ranks on the CPU, and of its per-layer commit agreement.

Legend: L MoE layers, E logical experts, P physical slots, G = 2 ranks.

Each rank wraps the same small model (``--layers`` MoE layers of ``--experts`` experts, hidden
size ``--hidden``), runs a few forwards, then ``--rebalances`` sync rebalances
(``use_async=False``) with a test policy that permutes the default placement's slots, so every
layer moves at every rebalance. Rows (medians over the rebalances, rank 0; both ranks do the
same work):

* ``rebalance wall``: wall time of ``wrapper.rebalance()``;
* ``rebalance cpu``: CPU time of this process over the same call (``time.process_time``);
* ``per layer``: the two above divided by L;
* ``agreement``: one all-reduce of the commit agreement alone (`eplb.executor.agreement`, on a
  gloo group of the 2 ranks), median of ``--agreements`` calls: what each layer's commit adds.

    python benchmarks/sync_rebalance_cpu.py                       # L=8, E=16, 20 rebalances
    python benchmarks/sync_rebalance_cpu.py --layers 16 --rebalances 40

Nothing here is asserted; run it before and after a change of the sync executor to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb import EPLBConfig, EPLBWrapper, Placement
from eplb.moe import MoE, ResidualStack
from eplb.policies import available_policies, get_policy, register_policy

POLICY = "bench_permuted_default"


def _register_policy() -> None:
    if POLICY in available_policies():
        return

    @register_policy(POLICY)
    def permuted(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
        base = get_policy("default")(load, num_physical=num_physical, num_groups=num_groups, num_nodes=num_nodes,
                                     num_ranks=num_ranks, old=old)
        seed = int(old.phy2log.sum().item()) if old is not None else 0
        gen = torch.Generator().manual_seed(seed)
        perm = torch.stack([torch.randperm(num_physical, generator=gen) for _ in range(base.num_layers)])
        return Placement.from_phy2log(torch.gather(base.phy2log, 1, perm), base.num_logical)


def _rank(rank: int, args, init_file: str, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    _register_policy()
    torch.manual_seed(0)
    model = ResidualStack([MoE(args.hidden, 2 * args.hidden, args.experts, 2) for _ in range(args.layers)]).eval()
    config = EPLBConfig(num_redundant_experts=args.redundant, use_async=False, policy=POLICY, min_improvement=0.0,
                        step_interval=10**9)
    wrapper = EPLBWrapper(model, config, ep_group=dist.group.WORLD)
    x = torch.randn(4, 8, args.hidden, generator=torch.Generator().manual_seed(rank))
    walls, cpus = [], []
    with torch.no_grad():
        for i in range(args.rebalances + 2):
            wrapper(x)
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            report = wrapper.rebalance()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            assert report.layers == args.layers, report
            if i >= 2:  # warm-up
                walls.append(wall)
                cpus.append(cpu)
    # The agreement alone, on a gloo group like the control group.
    from eplb.executor.agreement import Agreement, Flags

    group = dist.new_group(backend="gloo")
    agree = Agreement(group, 2)
    times = []
    for _ in range(args.agreements):
        start = time.perf_counter()
        agree(Flags(ready=1))
        times.append(time.perf_counter() - start)
    wrapper.close()
    if rank == 0:
        out.update(wall=statistics.median(walls), cpu=statistics.median(cpus), agreement=statistics.median(times))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--redundant", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rebalances", type=int, default=20)
    parser.add_argument("--agreements", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(_rank, args=(args, init_file, out), nprocs=2)
            out = dict(out)
    L = args.layers
    print(f"sync rebalance on 2 gloo ranks (CPU): L={L}, E={args.experts}, "
          f"P={args.experts + args.redundant}, D={args.hidden}, {args.rebalances} rebalances (rank 0, medians)")
    print(f"{'row':<18}{'ms':>10}{'ms / layer':>12}")
    print(f"{'rebalance wall':<18}{out['wall'] * 1e3:>10.2f}{out['wall'] * 1e3 / L:>12.3f}")
    print(f"{'rebalance cpu':<18}{out['cpu'] * 1e3:>10.2f}{out['cpu'] * 1e3 / L:>12.3f}")
    print(f"{'agreement':<18}{out['agreement'] * 1e3:>10.3f}{'':>12}")


if __name__ == "__main__":
    main()
