"""Multi-GPU benchmark: transfer bandwidth (torch_nccl, torch_p2p), and async rebalancing under NCCL load.

Run on one host with N >= 2 GPUs, one process per GPU (NVLink multicast stays off):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --standalone --nproc-per-node N benchmarks/multi_gpu.py [--json out.json]

The script sets those three variables itself too, before NCCL starts.

Part ``bandwidth``. ``--bw-layers`` layers of ``--bw-slots`` slots per rank, each a full-size
DeepSeek-V3 expert in bf16 (hidden 7168, intermediate 2048: 84 MiB), one copy of every expert
(E = P = N * slots). The rebalance gives slot j of rank g the expert of slot j on rank
(g + 1 + j mod (N - 1)) mod N, and back: every slot changes and every rank receives from every
peer. Timed, median of ``--bw-repeats``, slowest rank:

- ``transfer``: `eplb.transfer.execute_layer_transfer` through each of ``--bw-communicators``
  (default ``torch_nccl`` and ``torch_p2p``) for every layer into a staging buffer (the network
  part of a rebalance);
- ``rebalance``: `SyncExecutor.rebalance` (transfer + commit into the slots), checked afterwards:
  every slot holds its expert's weights.

Communicators that stage each batch (``torch_gloo``) are measured for each ``--max-transfer-mib``;
``torch_nccl`` and ``torch_p2p`` move a layer in one exchange (the bound does not apply).
The bandwidth is what one rank receives per second. It is compared with the machine's plain
GPU-to-GPU copy bandwidth, measured here two ways: one NCCL send/recv of a ``--copy-mib`` buffer
from rank 0 to rank 1, and a peer copy ``dst_on_cuda1.copy_(src_on_cuda0)`` in rank 0's process
(run last: it gives rank 0 a CUDA context on GPU 1). Ratio = bandwidth / the larger of the two.
Target >= 0.80.

Part ``async``. Decode-like steps of an `EPLBWrapper` around a residual stack of `eplb.moe.MoE`
layers (``--layers``, ``--experts``, ``--hidden``, ``--inter``, ``--topk``; routing skewed towards a
few experts per layer, so the default policy moves weights), ``ep_group`` = all ranks, with the
forward users should run: ``--dispatcher fixed_capacity`` (``max_tokens_per_rank`` = ``--tokens``,
no host sync; ``all_to_all`` for the fallback) and ``--experts-impl dense`` (every expert on every
row, batched: no host sync either, so a step can be captured; ``loop`` is `eplb.moe.SwiGLUExperts`,
one host sync per layer). ``--tokens`` tokens per rank per step. Rows, each on a fresh copy of the
same model, ``--steps`` steps, the rebalance at step ``--rebalance-at``, in this order:

- ``none``: no rebalance;
- ``sync``: `EPLBWrapper.rebalance` with ``use_async=False`` (``--sync-communicator``, ``auto``
  = torch_nccl): the triggering step blocks for the whole transfer;
- ``async``: ``use_async=True``, ``communicator="auto"``: ``torch_p2p`` on one host with peer
  access (receivers pull over the copy engines), while the forwards keep dispatching over NCCL;
  ``async_layers_per_step`` = ``--async-layers-per-step`` (default None: every layer ready on
  every rank);
- ``async:NAME`` for each other name in ``--async-communicators`` (default ``torch_gloo``: staged
  through pinned host memory), for comparison;
- ``none+graph`` and ``async+graph`` (unless ``--no-graph``): the wrapped forward captured once in a
  CUDA graph after a warm-up on a side stream, then each step copies its input into the static
  buffer, replays and calls ``wrapper.step()`` (docs/guide/fast-forward.md);
- ``none#again`` (unless ``--no-repeat-none``): the baseline once more, last, so a drift of the
  machine over the run is told apart from a cost of the rows in between.

Per-step latency (wall time of the step, slowest rank) p50 / p99 / max over the steps after
``--warmup``, against the ``none`` row of the same kind (eager or graph); p50 separately for the
steps before the rebalance, while it is in flight, and after it committed (a slowdown of a whole
row is told apart from the in-flight cost); process CPU time per step (all threads: a thread that
spins shows here); OS threads before and after each row. The async run continues until the
rebalance is committed (no hang: every wait has ``--timeout``). Outputs are compared with the
unwrapped model on the same GPU every ``--check-every`` steps and at every step whose in-flight
state changes; every slot is checked against its expert's weights after the rebalance. Also
reported: on which GPUs each rank's process holds a CUDA context (expected: only its own).
Targets: async p50 <= 1.05x and p99 <= 1.10x the no-rebalance step (graph rows too); async
rebalance seconds <= 1.5x the sync rebalance's ("x sync").

Rank 0 prints the tables; ``--json`` writes every number. The script exits non-zero when a check
fails.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from eplb.moe.reference import ResidualStack
from eplb.moe.slot_layer import SlotStorage
from eplb.testing import capture_graph

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DSV3_HIDDEN, DSV3_INTER = 7168, 2048  # DeepSeek-V3 hidden size and MoE intermediate size
DEFAULT_MAX_TRANSFER_MIB = 256  # EPLBConfig.max_transfer_bytes default, in MiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run with: torchrun --standalone --nproc-per-node N benchmarks/multi_gpu.py (N >= 2 GPUs).",
    )
    ap.add_argument("--parts", default="bandwidth,async", help="comma-separated: bandwidth, async")
    ap.add_argument("--json", default=None, help="write every number to this file (rank 0)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds any wait may last before failing")
    bw = ap.add_argument_group("bandwidth")
    bw.add_argument("--bw-layers", type=int, default=4)
    bw.add_argument("--bw-slots", type=int, default=16, help="slots (experts) per rank and layer")
    bw.add_argument("--bw-hidden", type=int, default=DSV3_HIDDEN)
    bw.add_argument("--bw-inter", type=int, default=DSV3_INTER)
    bw.add_argument("--bw-repeats", type=int, default=5)
    bw.add_argument("--copy-mib", type=int, default=2048, help="buffer of the plain-copy baselines")
    bw.add_argument(
        "--max-transfer-mib", default=f"{DEFAULT_MAX_TRANSFER_MIB},8192",
        help="comma-separated max_transfer_bytes values (MiB) to measure (communicators that stage batches)",
    )
    bw.add_argument(
        "--bw-communicators", default="torch_nccl,torch_p2p",
        help="comma-separated communicators whose transfer bandwidth is measured",
    )
    load = ap.add_argument_group("async under load")
    load.add_argument("--layers", type=int, default=12)
    load.add_argument("--experts", type=int, default=32)
    load.add_argument("--redundant-per-rank", type=int, default=2, help="num_redundant_experts = this x N")
    load.add_argument("--hidden", type=int, default=2048)
    load.add_argument("--inter", type=int, default=1024)
    load.add_argument("--topk", type=int, default=4)
    load.add_argument("--tokens", type=int, default=64, help="tokens per rank per step")
    load.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    load.add_argument("--skew", type=float, default=4.0, help="router bias of the hottest expert")
    load.add_argument("--steps", type=int, default=300)
    load.add_argument("--warmup", type=int, default=10)
    load.add_argument("--rebalance-at", type=int, default=50)
    load.add_argument("--check-every", type=int, default=5)
    load.add_argument(
        "--max-extra-steps", type=int, default=5000,
        help="steps the async run may continue past --steps before it counts as hung",
    )
    load.add_argument("--sync-communicator", default="auto", help="communicator of the sync mode")
    load.add_argument(
        "--async-layers-per-step", type=int, default=None,
        help="EPLBConfig.async_layers_per_step (default: None, every layer ready on every rank)",
    )
    load.add_argument(
        "--dispatcher", choices=["fixed_capacity", "all_to_all"], default="fixed_capacity",
        help="fixed_capacity (max_tokens_per_rank = --tokens; no host sync) or the all-to-all fallback",
    )
    load.add_argument(
        "--experts-impl", choices=["dense", "loop"], default="dense",
        help="dense: every expert on every row, batched (no host sync, capturable); loop: eplb.moe.SwiGLUExperts "
        "(one matmul per expert, one host sync per layer)",
    )
    load.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows")
    load.add_argument("--no-repeat-none", action="store_true", help="skip the last 'none' row (drift check)")
    load.add_argument(
        "--async-communicators", default="auto,torch_gloo",
        help="comma-separated communicators of the async modes (auto = torch_p2p on one host with peer access)",
    )
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - {"bandwidth", "async"})
    if unknown:
        ap.error(f"--parts: unknown part(s) {unknown}; use bandwidth, async or both")
    args.max_transfer_mib = [int(v) for v in args.max_transfer_mib.split(",")]
    args.bw_communicators = [c.strip() for c in args.bw_communicators.split(",") if c.strip()]
    args.async_communicators = [c.strip() for c in args.async_communicators.split(",") if c.strip()]
    if args.rebalance_at <= args.warmup or args.rebalance_at >= args.steps:
        ap.error(f"--rebalance-at ({args.rebalance_at}) must be in (--warmup, --steps)")
    if not args.no_graph and (args.dispatcher != "fixed_capacity" or args.experts_impl != "dense"):
        ap.error("the CUDA-graph rows need --dispatcher fixed_capacity and --experts-impl dense (or --no-graph)")
    return args


def require_gpus() -> tuple[int, int]:
    """(rank, world size) of this torchrun process; exits with a clear message otherwise."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        sys.exit(
            f"benchmarks/multi_gpu.py needs a host with >= 2 CUDA GPUs; this one has {gpus}; nothing was measured."
        )
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        sys.exit(
            "benchmarks/multi_gpu.py runs one process per GPU under torchrun: "
            f"torchrun --standalone --nproc-per-node {gpus} benchmarks/multi_gpu.py"
        )
    rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if world < 2 or world > gpus or int(os.environ.get("RANK", rank)) != rank:
        sys.exit(
            f"benchmarks/multi_gpu.py needs 2 <= --nproc-per-node <= {gpus} GPUs on one host "
            f"(got WORLD_SIZE={world}, RANK={os.environ.get('RANK')}, LOCAL_RANK={rank})"
        )
    return rank, world


def median_max(seconds: list[float], device: torch.device) -> float:
    """Median over repeats of this rank, then the max over ranks (an exchange lasts as long as its
    slowest rank)."""
    t = torch.tensor([statistics.median(seconds)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def contexts() -> list[int]:
    """GPUs on which this process holds a CUDA primary context."""
    has = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    return [] if has is None else [i for i in range(torch.cuda.device_count()) if has(i)]


# -------------------------------------------------------------------------------------- bandwidth
class Slots(SlotStorage):
    """One layer's slot storage with the executors' contract (`eplb.moe.SlotLayer`, through
    `SlotStorage`). Expert ``e`` of layer ``i`` has fixed pseudo-random weights, so any slot can be
    checked on any rank."""

    def __init__(self, layer_index: int, experts: list[int], shapes: dict, device: torch.device):
        self.layer_index = layer_index
        self.shapes = shapes
        self.device = device
        per_expert = [self.weights(e) for e in experts]
        self.tensors = {n: torch.stack([w[n] for w in per_expert]) for n in shapes}

    def weights(self, expert: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator(device=self.device).manual_seed(1_000_003 * self.layer_index + expert)
        return {
            n: torch.randn(shape, generator=gen, device=self.device).to(torch.bfloat16)
            for n, shape in self.shapes.items()
        }

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def check(self, experts: list[int], tensors: dict[str, torch.Tensor] | None = None) -> bool:
        """Row j of ``tensors`` (default: the slots) holds expert ``experts[j]``'s weights."""
        tensors = self.tensors if tensors is None else tensors
        for j, e in enumerate(experts):
            weights = self.weights(e)
            if not all(torch.equal(tensors[n][j], weights[n]) for n in self.shapes):
                return False
        return True


def spread_placements(num_layers: int, num_ranks: int, slots: int):
    """(old, new) `Placement` pair: one copy per expert, every slot changes, each rank receives
    from every peer (with ``slots >= num_ranks - 1``)."""
    from eplb.placement import Placement

    P = num_ranks * slots
    old_P = torch.arange(P)
    new_P = torch.empty(P, dtype=torch.int64)
    for g in range(num_ranks):
        for j in range(slots):
            src = (g + 1 + j % max(num_ranks - 1, 1)) % num_ranks
            new_P[g * slots + j] = src * slots + j  # for each j, g -> src is a bijection
    old = Placement.from_phy2log(old_P.repeat(num_layers, 1), P).validate(num_ranks)
    new = Placement.from_phy2log(new_P.repeat(num_layers, 1), P).validate(num_ranks)
    return old, new


def peer_copy_seconds(nbytes: int, repeats: int) -> float:
    """Rank 0 only: median seconds of one cuda:0 -> cuda:1 copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    samples = []
    for _ in range(repeats + 1):  # the first is a warm-up (peer access set-up)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])


def nccl_one_buffer_seconds(rank: int, nbytes: int, repeats: int, device: torch.device) -> float:
    """Median seconds of one NCCL send/recv of ``nbytes`` from rank 0 to rank 1 (others idle)."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    samples = []
    for _ in range(repeats + 1):  # the first is a warm-up (creates the pair's NCCL communicator)
        dist.barrier(device_ids=[rank])
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
        torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    t = torch.tensor([statistics.median(samples[1:]) if rank == 1 else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # rank 1's receive time, on every rank
    return float(t.item())


def run_bandwidth(args, rank: int, world: int, device: torch.device) -> dict:
    from eplb.comm.base import select_communicator
    from eplb.executor import SyncExecutor
    from eplb.transfer import bytes_per_expert, execute_layer_transfer, plan_layer_transfer

    S, L = args.bw_slots, args.bw_layers
    shapes = {"w13": (2 * args.bw_inter, args.bw_hidden), "w2": (args.bw_hidden, args.bw_inter)}
    old, new = spread_placements(L, world, S)
    mine = slice(rank * S, (rank + 1) * S)
    layers = [Slots(i, old.phy2log[i, mine].tolist(), shapes, device) for i in range(L)]
    expert_bytes = bytes_per_expert(layers[0].slot_tensors())
    plans = [
        plan_layer_transfer(old.phy2log[i], new.phy2log[i], rank=rank, num_ranks=world) for i in range(L)
    ]
    received = sum(t.dst_rank == rank for plan in plans for t in plan.transfers) * expert_bytes
    staging = {n: torch.empty_like(t) for n, t in layers[0].slot_tensors().items()}

    nccl_s = nccl_one_buffer_seconds(rank, args.copy_mib * 2**20, args.bw_repeats, device)
    rows = []
    ok = True
    runs = []
    for name in args.bw_communicators:  # building one is collective: every rank, in this order
        comm = select_communicator(name, use_async=False, device=device, group=dist.group.WORLD,
                                   timeout_s=args.timeout)
        # max_transfer_bytes only splits the exchanges of communicators that stage each batch.
        runs += [(comm, mib) for mib in (args.max_transfer_mib if comm.stages_batches else [None])]
    for comm, max_mib in runs:
        max_bytes = (max_mib or DEFAULT_MAX_TRANSFER_MIB) * 2**20

        samples = []
        for _ in range(args.bw_repeats + 1):  # the first is a warm-up
            dist.barrier(device_ids=[rank])
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for layer, plan in zip(layers, plans):
                execute_layer_transfer(plan, layer.slot_tensors(), staging, comm, max_bytes)
            torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - start)
        transfer_s = median_max(samples[1:], device)
        ok &= layers[-1].check(new.phy2log[L - 1, mine].tolist(), staging)  # staging holds the last layer

        executor = SyncExecutor(rank=rank, num_ranks=world, communicator=comm, max_transfer_bytes=max_bytes)
        samples = []
        for i in range(2 * args.bw_repeats):  # old -> new -> old ...: the layers end where they began
            src, dst = (old, new) if i % 2 == 0 else (new, old)
            dist.barrier(device_ids=[rank])
            samples.append(executor.rebalance(layers, src, dst).seconds)  # ends with a device sync
            if i == 0:  # every slot holds its new expert
                ok &= all(layer.check(new.phy2log[layer.layer_index, mine].tolist()) for layer in layers)
        rebalance_s = median_max(samples, device)
        rows.append({"communicator": comm.name, "max_transfer_mib": max_mib, "transfer_s": transfer_s,
                     "rebalance_s": rebalance_s})
    ok &= all(layer.check(old.phy2log[layer.layer_index, mine].tolist()) for layer in layers)
    flags = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flags)
    return {
        "ranks": world, "layers": L, "slots_per_rank": S, "expert_mib": expert_bytes / 2**20,
        "received_bytes_per_rank": received, "nccl_one_buffer_s": nccl_s, "copy_bytes": args.copy_mib * 2**20,
        "rows": rows, "ranks_with_wrong_slots": int(flags.item()),
    }


def print_bandwidth(bw: dict) -> bool:
    received = bw["received_bytes_per_rank"]
    nccl_gbps = bw["copy_bytes"] / bw["nccl_one_buffer_s"] / 1e9
    peer_gbps = bw["copy_bytes"] / bw["peer_copy_s"] / 1e9 if bw.get("peer_copy_s") else 0.0
    base = max(nccl_gbps, peer_gbps)
    print(
        f"\n== transfer bandwidth: {bw['ranks']} GPUs, {bw['layers']} layers x "
        f"{bw['slots_per_rank']} slots per rank, expert {bw['expert_mib']:.1f} MiB bf16; each rank receives "
        f"{received / 2**30:.2f} GiB per rebalance"
    )
    print(
        f"plain GPU-to-GPU copy of {bw['copy_bytes'] / 2**20:.0f} MiB, rank 0 -> 1: NCCL send/recv "
        f"{nccl_gbps:.1f} GB/s, peer copy {peer_gbps:.1f} GB/s (P2P access: {bw.get('peer_access')})"
    )
    print(f"{'communicator':<13}{'max_transfer MiB':>17}{'part':>11}{'ms':>10}{'GB/s per rank':>15}{'ratio':>8}")
    for row in bw["rows"]:
        batch = row["max_transfer_mib"] or "one per layer"
        for part in ("transfer", "rebalance"):
            s = row[f"{part}_s"]
            gbps = received / s / 1e9
            print(f"{row['communicator']:<13}{batch:>17}{part:>11}{s * 1e3:>10.1f}{gbps:>15.1f}{gbps / base:>8.2f}")
    print("ratio = received GB/s / max(NCCL send/recv, peer copy); target >= 0.80")
    if bw["ranks_with_wrong_slots"]:
        print(f"FAILED: {bw['ranks_with_wrong_slots']} rank(s) hold wrong weights after the rebalances")
    return bw["ranks_with_wrong_slots"] == 0


# --------------------------------------------------------------------------- async under load
def dense_swiglu_experts():
    """`eplb.moe.SwiGLUExperts` computed without a host sync: every expert on every row (batched
    matmuls), then each pair picks its expert's row. Same maths and top-k summation order as the
    loop (GEMM rounding aside), so the EPLB layer treats it alike; costs ``X / K`` times the FLOPs
    of the pairs (``X`` experts or slots), which at decode sizes is a few ms per step."""
    import torch.nn.functional as F

    from eplb.moe import SwiGLUExperts

    class DenseSwiGLUExperts(SwiGLUExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            X = self.gate_up_proj.shape[0]  # experts, or this rank's slots once wrapped
            T = hidden_states.shape[0]
            gate_XTI, up_XTI = torch.matmul(hidden_states, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
            y_XTD = torch.matmul(F.silu(gate_XTI) * up_XTI, self.down_proj.transpose(1, 2))
            skipped_TK = top_k_index >= X  # expert-parallel padding: contributes zero
            y_TKD = y_XTD[top_k_index.clamp(max=X - 1), torch.arange(T, device=y_XTD.device).unsqueeze(1)]
            w_TK = torch.where(skipped_TK, 0.0, top_k_weights)
            return (y_TKD * w_TK.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)

    return DenseSwiGLUExperts


class MoEStack(ResidualStack):
    """``x + moe_l(x)`` over ``L`` `eplb.moe.MoE` layers; input and output ``[T, D]``."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        from eplb.moe import MoE

        super().__init__(
            MoE(args.hidden, args.inter, args.experts, args.topk, device=device, dtype=dtype)
            for _ in range(args.layers)
        )
        if args.experts_impl == "dense":
            dense = dense_swiglu_experts()
            for block in self.blocks:
                experts = dense(args.experts, args.hidden, args.inter, device=device, dtype=dtype)
                experts.load_state_dict(block.experts.state_dict())
                block.experts = experts


def build_model(args, device: torch.device, dtype: torch.dtype, direction_D: torch.Tensor) -> MoEStack:
    """The same model on every rank (rank 0's parameters are broadcast), with skewed routing: in
    layer l, the i-th expert of a per-layer permutation gets ``skew / (i + 1)`` along ``direction_D``,
    which every input leans along."""
    torch.manual_seed(0)
    model = MoEStack(args, device, dtype).eval()
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            perm = torch.randperm(args.experts, generator=torch.Generator().manual_seed(layer))
            for i, e in enumerate(perm.tolist()):
                block.gate.weight[e] += (args.skew / (i + 1)) * direction_D.to(device, dtype)
        for p in model.parameters():
            dist.broadcast(p, 0)
    return model


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _sync(device: torch.device) -> None:
    """Wait for the device (CUDA; the CPU smoke test runs the same code on gloo)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def _threads() -> int:
    """OS threads of this process (Python's and the libraries' own: NCCL, gloo, CUDA)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _capture_step(wrapper, static_x: torch.Tensor, device: torch.device):
    """Capture ``wrapper(static_x)`` in a CUDA graph after a warm-up on a side stream (it
    allocates the dispatcher's buffers; those forwards count as steps), as
    docs/guide/fast-forward.md does. Returns (replay, the static output)."""
    with torch.no_grad():
        graph, static_out = capture_graph(lambda: wrapper(static_x), warmup=3, device=device)  # no step counted
    return graph.replay, static_out


def run_mode(mode: str, base: MoEStack, pool: list[torch.Tensor], args, rank: int, world: int,
             device: torch.device) -> dict:
    """One row. ``mode``: ``none``, ``sync``, ``async`` or ``async:COMMUNICATOR``, with a ``+graph``
    suffix for the CUDA-graph variant (capture once, then replay + ``wrapper.step()`` per step)."""
    from eplb import EPLBConfig, EPLBWrapper
    from eplb.moe import find_moe_layers

    kind, graph = mode.split("#")[0].removesuffix("+graph"), mode.endswith("+graph")
    use_async = kind.startswith("async")
    config = EPLBConfig(
        num_redundant_experts=args.redundant_per_rank * world,
        window_size=args.rebalance_at,
        step_interval=10**9,  # rebalances only when called below
        use_async=use_async,
        communicator=(kind.partition(":")[2] or "auto") if use_async else args.sync_communicator,
        async_timeout_s=args.timeout,
        async_layers_per_step=args.async_layers_per_step,
        async_on_error="raise",
        dispatcher=args.dispatcher,
        max_tokens_per_rank=args.tokens if args.dispatcher == "fixed_capacity" else None,
    )
    records = _Records()
    logger = logging.getLogger("eplb")
    level = logger.level
    logger.setLevel(logging.INFO)  # select_communicator logs its choice at INFO on rank 0
    logger.addHandler(records)
    wrapper = EPLBWrapper(copy.deepcopy(base), config, ep_group=dist.group.WORLD)
    logical = [{n: getattr(s.experts, n) for n in s.expert_tensors} for s in find_moe_layers(base)]
    S = (args.experts + config.num_redundant_experts) // world
    # Relative to the MoE layers' contribution; bf16 residual adds round differently once a GEMM differs.
    tol = 1e-3 if args.dtype == "float32" else 1e-1
    contexts_before = contexts()
    threads_before = _threads()
    static_x = pool[0].clone()
    replay, static_out = _capture_step(wrapper, static_x, device) if graph else (None, None)
    # phase of each step: 0 before the rebalance, 1 in flight (or the sync rebalance's step), 2 after
    times, cpu, phases, worst_err, in_flight_steps, step = [], [], [], 0.0, 0, 0
    plan_s = None
    with torch.no_grad():
        while step < args.steps or wrapper.async_in_flight:  # in-flight state is agreed by all ranks
            if step >= args.steps + args.max_extra_steps:  # the same step on every rank: none is left waiting
                raise RuntimeError(f"{mode}: the async rebalance is still in flight after {step} steps")
            x = pool[step % len(pool)]
            if kind != "none" and step == args.rebalance_at:
                # The planner alone on this window (untimed step part): the sync report excludes
                # planning, the async one includes it (the worker plans first).
                load_LE = wrapper.tracker.window_load(group=dist.group.WORLD).to("cpu", torch.float64)
                t0 = time.perf_counter()
                wrapper._plan(load_LE, wrapper.placement)
                plan_s = time.perf_counter() - t0
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            if kind != "none" and step == args.rebalance_at:
                wrapper.rebalance()
            was_in_flight = wrapper.async_in_flight
            if graph:
                static_x.copy_(x)
                replay()
                wrapper.step()
                out = static_out
            else:
                out = wrapper(x)
            _sync(device)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            phases.append(0 if step < args.rebalance_at or kind == "none" else
                          1 if was_in_flight or (kind == "sync" and step == args.rebalance_at) else 2)
            in_flight_steps += was_in_flight
            due = step % args.check_every == 0 or step == args.rebalance_at
            if due or was_in_flight != wrapper.async_in_flight:
                ref = base(x)
                # Relative to what the MoE layers add to x, so a wrong expert cannot hide in the residual.
                err = (out.float() - ref.float()).abs().max() / (ref.float() - x.float()).abs().max()
                worst_err = max(worst_err, float(err))
            step += 1
    threads_after = _threads()
    stats = wrapper.stats()
    slots_ok = all(
        torch.equal(t, logical[layer.layer_index][n][
            wrapper.placement.phy2log[layer.layer_index, rank * S : (rank + 1) * S].to(device)])
        for layer in wrapper.eplb_layers for n, t in layer.slot_tensors().items()
    )
    contexts_after = contexts()
    wrapper.close()
    logger.removeHandler(records)
    logger.setLevel(level)
    chosen = [m.split()[1] for m in records.messages if m.startswith("communicator:")]
    local = {
        "times": times, "cpu": cpu, "worst_err": worst_err, "slots_ok": slots_ok,
        "contexts": (contexts_before, contexts_after), "threads": (threads_before, threads_after),
        "plan_s": plan_s,
    }
    everyone: list = [None] * world
    dist.all_gather_object(everyone, local)
    del wrapper, replay, static_out
    gc.collect()
    torch.cuda.empty_cache()
    per_step = [max(r["times"][i] for r in everyone) for i in range(len(times))]  # slowest rank
    cpu_step = [max(r["cpu"][i] for r in everyone) for i in range(len(times))]

    def p50(phase: int, values=per_step) -> float | None:
        picked = [v for i, (v, ph) in enumerate(zip(values, phases)) if i >= args.warmup and ph == phase]
        return statistics.median(picked) * 1e3 if picked else None

    warm = sorted(per_step[args.warmup :])
    return {
        "mode": mode,
        "graph": graph,
        "communicator": "-" if kind == "none" else (chosen[0] if chosen else config.communicator),
        "p50_ms": statistics.median(warm) * 1e3,
        "p99_ms": warm[int(0.99 * (len(warm) - 1))] * 1e3,
        "max_ms": warm[-1] * 1e3,
        "p50_before_ms": p50(0), "p50_in_flight_ms": p50(1), "p50_after_ms": p50(2),
        "cpu_p50_before_ms": p50(0, cpu_step), "cpu_p50_in_flight_ms": p50(1, cpu_step),
        "cpu_p50_after_ms": p50(2, cpu_step),
        "steps": len(per_step),
        "steps_in_flight": in_flight_steps,
        "plan_s": max((r["plan_s"] for r in everyone), default=None) if plan_s is not None else None,
        "rebalance_s": stats["last_rebalance_seconds"],
        "bytes_moved": stats["last_rebalance_bytes_moved"],
        "skipped": stats["last_rebalance_skipped"],
        "reason": stats["last_rebalance_reason"],
        "max_err": max(r["worst_err"] for r in everyone),
        "tolerance": tol,
        "slots_ok": all(r["slots_ok"] for r in everyone),
        "contexts": [r["contexts"] for r in everyone],
        "threads": [r["threads"] for r in everyone],
        "per_step_ms": [t * 1e3 for t in per_step],
        "cpu_per_step_ms": [t * 1e3 for t in cpu_step],
        "phases": phases,
    }


def async_modes(args) -> list[str]:
    """The rows, in run order: the no-rebalance baseline first and (drift check) again last."""
    modes = ["none", "sync", *(f"async:{c}" if c != "auto" else "async" for c in args.async_communicators)]
    if not args.no_graph:
        modes += ["none+graph", "async+graph"]
    if not args.no_repeat_none:
        modes.append("none#again")
    return modes


def run_async(args, rank: int, world: int, device: torch.device) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    direction_D = torch.randn(args.hidden, generator=torch.Generator().manual_seed(7))
    direction_D /= direction_D.norm()
    base = build_model(args, device, dtype, direction_D)
    gen = torch.Generator(device=device).manual_seed(100 + rank)  # each rank its own tokens
    pool = [
        (0.5 * torch.randn(args.tokens, args.hidden, generator=gen, device=device) + direction_D.to(device))
        .to(dtype) for _ in range(16)
    ]
    return [run_mode(mode, base, pool, args, rank, world, device) for mode in async_modes(args)]


def print_async(results: list[dict], args, world: int) -> bool:
    expert_mib = 3 * args.hidden * args.inter * (4 if args.dtype == "float32" else 2) / 2**20
    print(
        f"\n== async under load: {world} GPUs, {args.layers} layers x {args.experts} experts "
        f"(+{args.redundant_per_rank * world} redundant), hidden {args.hidden}, inter {args.inter}, "
        f"{args.dtype} ({expert_mib:.1f} MiB per expert), {args.tokens} tokens per rank top-{args.topk}, "
        f"dispatcher {args.dispatcher}, experts {args.experts_impl}; rebalance at step {args.rebalance_at}"
    )
    print(
        f"{'mode':<17}{'comm':>11}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'p50 x':>7}{'p99 x':>7}"
        f"{'before':>8}{'flight':>8}{'after':>8}{'cpu ms':>8}"
        f"{'rebal s':>9}{'x sync':>7}{'plan s':>8}{'GB':>6}{'flight':>7}{'max err':>9}"
    )
    ok = True
    sync_s = next((r["rebalance_s"] for r in results if r["mode"] == "sync"), None)
    # Each row against the no-rebalance row of its own kind (eager or graph).
    bases = {False: next(r for r in results if r["mode"] == "none")}
    bases[True] = next((r for r in results if r["mode"] == "none+graph"), bases[False])
    for r in results:
        base = bases[r["graph"]]
        none = r["mode"].startswith("none")
        reb = "-" if none else f"{r['rebalance_s']:.3f}"
        vs_sync = "-" if none or not sync_s else f"{r['rebalance_s'] / sync_s:.2f}"
        moved = "-" if none else f"{r['bytes_moved'] / 1e9:.2f}"
        cpu = r["cpu_p50_in_flight_ms"] if r["cpu_p50_in_flight_ms"] is not None else r["cpu_p50_before_ms"]
        print(
            f"{r['mode']:<17}{r['communicator']:>11}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['max_ms']:>8.2f}"
            f"{r['p50_ms'] / base['p50_ms']:>7.3f}{r['p99_ms'] / base['p99_ms']:>7.3f}"
            f"{_fmt(r['p50_before_ms']):>8}{_fmt(r['p50_in_flight_ms']):>8}{_fmt(r['p50_after_ms']):>8}{_fmt(cpu):>8}"
            f"{reb:>9}{vs_sync:>7}{_fmt(r['plan_s']):>8}{moved:>6}{r['steps_in_flight']:>7}{r['max_err']:>9.1e}"
        )
        if r["max_err"] > r["tolerance"]:
            print(f"FAILED: {r['mode']}: outputs differ from the unwrapped model (error {r['max_err']:.2e})")
            ok = False
        if not r["slots_ok"]:
            print(f"FAILED: {r['mode']}: a slot does not hold its expert's weights after the rebalance")
            ok = False
        if not none and (r["skipped"] or not r["bytes_moved"]):
            print(f"FAILED: {r['mode']}: the rebalance moved nothing ({r['reason'] or 'no bytes moved'})")
            ok = False
    print(
        "p50/p99 x: against the 'none' row of the same kind (eager or graph). before / flight / after: p50 ms of "
        "the steps before the rebalance, while it is in flight (sync: its step), after it committed; cpu ms: "
        "process CPU time per step (all threads; in flight where there is one). plan s: the planner alone on the "
        "rebalance's window (slowest rank); sync's rebal s excludes it, async's includes it."
    )
    print("targets: async p50 x <= 1.05, p99 x <= 1.10 (per step, slowest rank); async rebalance <= 1.5 x sync")
    for r in results:
        strays = [(g, after) for g, (_, after) in enumerate(r["contexts"]) if after not in ([], [g])]
        if strays:
            print(f"note: {r['mode']}: ranks hold CUDA contexts beyond their own GPU: {strays} (rank, GPUs)")
        grown = [(g, before, after) for g, (before, after) in enumerate(r["threads"]) if after > before]
        if grown:
            print(f"note: {r['mode']}: OS threads grew during the row (rank, before, after): {grown}")
    return ok


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world = require_gpus()
    os.environ.update(NO_MULTICAST)  # before NCCL reads its environment (its first communicator)
    torch.cuda.set_device(rank)  # before any model or group is built: rank r works on cuda:r
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", timeout=timedelta(seconds=args.timeout))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("eplb").setLevel(logging.INFO)  # eplb logs its choices and rebalances on rank 0
    results: dict = {"ranks": world, "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}
    ok = True
    try:
        if "bandwidth" in args.parts:
            results["bandwidth"] = run_bandwidth(args, rank, world, device)
            torch.cuda.empty_cache()  # its slots are gone: give the memory back before the next part
        if "async" in args.parts:
            results["async"] = run_async(args, rank, world, device)
        if "bandwidth" in args.parts:
            dist.barrier(device_ids=[rank])
            bw = results["bandwidth"]
            bw["peer_access"] = torch.cuda.can_device_access_peer(0, 1)
            # Last: the copy gives rank 0 a context on GPU 1, which would blur the context report.
            if rank == 0:
                bw["peer_copy_s"] = peer_copy_seconds(args.copy_mib * 2**20, args.bw_repeats)
            dist.barrier(device_ids=[rank])
        if rank == 0:
            print(f"{world} x {results['gpu']}, torch {results['torch']}")
            if "bandwidth" in results:
                ok &= print_bandwidth(results["bandwidth"])
            if "async" in results:
                ok &= print_async(results["async"], args, world)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    finally:
        dist.destroy_process_group()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
