"""Weight transfer of a rebalance: bytes moved and seconds, and the torch_gloo staging path's speed.

Run:
    python benchmarks/transfer.py [--ranks 4] [--layers 2] [--scale 8] [--drift 0.3] [--repeats 3]
        CPU, gloo, one process per rank. DeepSeek-V3-like MoE layers (E=256 experts, P=288 slots,
        bf16 experts of hidden 7168 and intermediate 2048, both divided by ``--scale``) move from the
        ``default`` policy's placement for one load to its movement-aware placement for a drifted
        load (log-normal factor of sigma ``--drift``) and back, ``--repeats`` times each way.
        Prints the rebalance report and the median seconds per rebalance.

    python benchmarks/transfer.py --device cuda [--experts 4] [--scale 1]
        One GPU. Sends ``--experts`` full-size DeepSeek-V3 experts from this rank to itself through
        `TorchGlooCommunicator`: device -> pinned host -> device, the staging every torch_gloo
        transfer goes through. Compares its time with the card's pinned host<->device memcpy
        bandwidth, measured here: ratio = (bytes / D2H bandwidth + bytes / H2D bandwidth) / time.

    python benchmarks/transfer.py --device cuda --p2p [--experts 8] [--scale 1] [--repeats 5]
        One GPU, two processes (gloo control group): the `TorchP2PCommunicator` pull bandwidth. Each
        process holds ``--experts`` full-size DeepSeek-V3 experts; the receiver pulls them out of
        the other process's memory (CUDA IPC) into its staging buffer. Rows: one direction (rank 1
        pulls, rank 0 idles) in one exchange and with one exchange per expert (the cost of a
        handshake), and both directions at once; each against a plain device copy of the same
        tensors inside one process (``staging.copy_(slots)`` row by row), run in the same pattern
        (one process, or both at once). Bandwidth = bytes received per second by one process.

Target: ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.comm.base import select_communicator
from eplb.comm.gloo import TorchGlooCommunicator
from eplb.executor import SyncExecutor
from eplb.moe.slot_layer import SlotStorage
from eplb.placement import Placement
from eplb.policies import get_policy
from eplb.transfer import bytes_per_expert

E, P, GROUPS = 256, 288, 8  # DeepSeek-V3: routed experts, experts + 32 redundant, expert groups
HIDDEN, INTER = 7168, 2048  # DeepSeek-V3 hidden size and MoE intermediate size


class SlotStore(SlotStorage):
    """One layer's slot storage with the executors' contract (`eplb.moe.SlotLayer`, through `SlotStorage`)."""

    def __init__(self, layer_index: int, slots: int, hidden: int, inter: int, device: str):
        self.layer_index = layer_index
        self.tensors = {
            "w13": torch.randn(slots, 2 * inter, hidden, device=device).to(torch.bfloat16),
            "w2": torch.randn(slots, hidden, inter, device=device).to(torch.bfloat16),
        }

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors


def placements(layers: int, num_ranks: int, drift: float, seed: int) -> tuple[Placement, Placement]:
    """Old and new placement: the default policy before and after a load drift (movement-aware)."""
    gen = torch.Generator().manual_seed(seed)
    load = torch.randn(layers, E, generator=gen, dtype=torch.float64).exp() * 1000
    drifted = load * (torch.randn(layers, E, generator=gen, dtype=torch.float64) * drift).exp()
    policy = get_policy("default")
    kwargs = dict(num_physical=P, num_groups=GROUPS, num_nodes=1, num_ranks=num_ranks)
    old = policy(load, **kwargs)
    return old, policy(drifted, old=old, **kwargs)


# ---------------------------------------------------------------------------------- CPU, gloo
def _cpu_rank(rank: int, num_ranks: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=num_ranks)
    try:
        comm = select_communicator("auto", use_async=False, device="cpu", group=dist.group.WORLD)
        old, new = placements(args.layers, num_ranks, args.drift, args.seed)
        S = P // num_ranks
        hidden, inter = HIDDEN // args.scale, INTER // args.scale
        layers = [SlotStore(i, S, hidden, inter, "cpu") for i in range(args.layers)]
        executor = SyncExecutor(
            rank=rank, num_ranks=num_ranks, communicator=comm, max_transfer_bytes=args.max_transfer_bytes
        )
        seconds, report = [], None
        for i in range(2 * args.repeats):
            src, dst = (old, new) if i % 2 == 0 else (new, old)
            dist.barrier()
            report = executor.rebalance(layers, src, dst)
            seconds.append(report.seconds)
        worst = torch.tensor([statistics.median(seconds)])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # a rebalance lasts as long as its slowest rank
        if rank == 0:
            expert_mb = bytes_per_expert(layers[0].slot_tensors()) / 2**20
            print(
                f"ranks {num_ranks}, layers {args.layers}, E {E}, P {P}, expert {expert_mb:.2f} MiB "
                f"(hidden {hidden}, inter {inter}, bf16), communicator {comm.name}, "
                f"max_transfer_bytes {args.max_transfer_bytes}"
            )
            print(
                f"per rebalance: {report.slots_changed} slots changed, {report.network_transfers} network "
                f"transfers ({report.bytes_moved / 2**20:.1f} MiB), {report.local_copies} local copies"
            )
            s = worst.item()
            gbps = report.bytes_moved / s / 1e9
            print(f"median seconds per rebalance (slowest rank): {s:.3f}; network {gbps:.3f} GB/s")
    finally:
        dist.destroy_process_group()


def run_cpu(args: argparse.Namespace) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_cpu_rank, args=(args.ranks, port, args), nprocs=args.ranks, join=True)


# ------------------------------------------------------------------------ one GPU, staging path
def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, pinned buffers
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run_cuda(args: argparse.Namespace) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        comm = TorchGlooCommunicator(group=dist.group.WORLD, device=device)
        hidden, inter = HIDDEN // args.scale, INTER // args.scale
        slots = SlotStore(0, args.experts, hidden, inter, str(device)).slot_tensors()
        staging = {n: torch.zeros_like(t) for n, t in slots.items()}
        nbytes = bytes_per_expert(slots) * args.experts

        def staged() -> None:
            for i in range(args.experts):
                comm.add_send([slots[n][i] for n in sorted(slots)], 0)
                comm.add_recv([staging[n][i] for n in sorted(slots)], 0)
            comm.execute()

        t_staged = _median_s(staged, args.repeats)
        assert all(torch.equal(staging[n], slots[n]) for n in slots), "staging path corrupted the weights"

        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        t_d2h = _median_s(lambda: host.copy_(dev, non_blocking=True), args.repeats)
        t_h2d = _median_s(lambda: dev.copy_(host, non_blocking=True), args.repeats)
        ratio = (t_d2h + t_h2d) / t_staged
        print(
            f"{torch.cuda.get_device_name(device)}: {args.experts} experts of "
            f"{bytes_per_expert(slots) / 2**20:.1f} MiB (hidden {hidden}, inter {inter}, bf16), "
            f"{nbytes / 2**20:.0f} MiB each way"
        )
        print(f"pinned memcpy: D2H {nbytes / t_d2h / 1e9:.1f} GB/s, H2D {nbytes / t_h2d / 1e9:.1f} GB/s")
        print(
            f"torch_gloo staging (D2H + H2D): {t_staged * 1e3:.1f} ms, "
            f"{nbytes / t_staged / 1e9:.1f} GB/s end to end; ratio to memcpy {ratio:.2f} (target >= 0.80)"
        )
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------- one GPU, two processes, torch_p2p
def _p2p_rank(rank: int, port: int, args: argparse.Namespace, results) -> None:
    from eplb.comm.p2p import TorchP2PCommunicator

    torch.cuda.set_device(args.gpu)
    device = torch.device("cuda", args.gpu)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        comm = TorchP2PCommunicator(group=dist.group.WORLD, device=device, timeout_s=120)
        hidden, inter = HIDDEN // args.scale, INTER // args.scale
        torch.manual_seed(rank)
        slots = SlotStore(0, args.experts, hidden, inter, str(device)).slot_tensors()
        staging = {n: torch.zeros_like(t) for n, t in slots.items()}
        names = sorted(slots)
        expert_bytes = bytes_per_expert(slots)
        peer = 1 - rank

        def timed(fn, active: bool) -> float:
            """Median seconds of ``fn`` (run where ``active``), the slowest process."""
            samples = []
            for _ in range(args.repeats + 1):  # the first is a warm-up (IPC mappings, allocations)
                dist.barrier()
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                if active:
                    fn()
                torch.cuda.synchronize(device)
                samples.append(time.perf_counter() - start)
            worst = torch.tensor([statistics.median(samples[1:])], dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            return float(worst.item())

        def pull(sender: bool, receiver: bool, per_expert: bool) -> None:
            for i in range(args.experts):
                if sender:
                    comm.add_send([slots[n][i] for n in names], peer)
                if receiver:
                    comm.add_recv([staging[n][i] for n in names], peer)
                if per_expert:
                    comm.execute()
            comm.execute()

        def local_copy() -> None:
            for i in range(args.experts):
                for n in names:
                    staging[n][i].copy_(slots[n][i], non_blocking=True)

        rows = {}
        rows["plain copy, one process"] = timed(local_copy, rank == 1)
        rows["p2p pull, one direction"] = timed(lambda: pull(rank == 0, rank == 1, False), True)
        rows["p2p pull, one exchange per expert"] = timed(lambda: pull(rank == 0, rank == 1, True), True)
        rows["plain copy, both processes at once"] = timed(local_copy, True)
        rows["p2p pull, both directions at once"] = timed(lambda: pull(True, True, False), True)
        # What the peer holds: rank r's experts are randn under seed r (SlotStore), pulled last.
        torch.manual_seed(peer)
        theirs = SlotStore(0, args.experts, hidden, inter, str(device)).slot_tensors()
        correct = all(torch.equal(staging[n], theirs[n]) for n in names)
        if rank == 0:
            results.update(rows=rows, nbytes=expert_bytes * args.experts, expert_bytes=expert_bytes,
                           gpu=torch.cuda.get_device_name(device), correct=correct)
        else:
            results["correct_1"] = correct
    finally:
        dist.destroy_process_group()


def run_p2p(args: argparse.Namespace) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args.gpu = torch.cuda.current_device()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_p2p_rank, args=(port, args, results), nprocs=2, join=True)
        results = dict(results)
    nbytes = results["nbytes"]
    print(
        f"{results['gpu']}, two processes: {args.experts} experts of {results['expert_bytes'] / 2**20:.1f} MiB "
        f"(bf16), {nbytes / 2**20:.0f} MiB received per process; median of {args.repeats}, slowest process"
    )
    print(f"{'':<38}{'ms':>9}{'GB/s':>9}{'vs copy':>9}")
    rows = results["rows"]
    for name, seconds in rows.items():
        ref = rows["plain copy, both processes at once" if "both" in name else "plain copy, one process"]
        print(f"{name:<38}{seconds * 1e3:>9.2f}{nbytes / seconds / 1e9:>9.1f}{ref / seconds:>9.2f}")
    ok = results["correct"] and results["correct_1"]
    print(f"pulled weights equal the sender's: {ok}")
    if not ok:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ranks", type=int, default=4, help="CPU: gloo processes (must divide 288)")
    parser.add_argument("--layers", type=int, default=2, help="CPU: MoE layers")
    parser.add_argument(
        "--scale", type=int, default=None, help="divide hidden and intermediate size (CPU 8, GPU 1)"
    )
    parser.add_argument("--drift", type=float, default=0.3, help="CPU: sigma of the log-normal load drift")
    parser.add_argument("--max-transfer-bytes", type=int, default=256 * 2**20)
    parser.add_argument("--experts", type=int, default=4, help="GPU: experts staged per exchange")
    parser.add_argument("--p2p", action="store_true", help="GPU: torch_p2p pull between two processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cuda":
        args.scale = args.scale or 1
        run_p2p(args) if args.p2p else run_cuda(args)
    else:
        args.scale = args.scale or 8
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        run_cpu(args)


if __name__ == "__main__":
    main()
