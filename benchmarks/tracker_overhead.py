"""Cost of LoadTracker.record for one MoE layer, against that layer's forward.

Legend: T tokens, K top-k, E experts, D hidden size, I expert intermediate size, N = T * K pairs.

For each T it times, median over many runs:
  record (eager)  back-to-back ``tracker.record(0, topk_ids_TK)`` calls, launch cost included;
  record (graph)  the same calls captured in one CUDA graph: what the GPU itself spends;
  step            ``tracker.step()`` for a whole model (``--layers`` layers, ``--window`` steps),
                  and the empty `eplb.atomic.critical_section` it runs in;
  moe             one MoE layer forward: router, top-k, sort by expert, stacked SwiGLU experts
                  through ``torch._grouped_mm`` (a per-expert loop where that is missing), combine;
  moe + record    the same forward with ``record`` inside it, as the EPLB layer runs it; its
                  difference to ``moe`` is the overhead seen in a model.
The two forward timings run ``--chain`` forwards back to back between two timestamps, like the
MoE layers of one model forward pass, so the host runs ahead of the GPU as it does in a model;
with one forward per timing, every host-side microsecond spent before the expert GEMM is
launched would show up as GPU idle time.

    python benchmarks/tracker_overhead.py                 # CUDA if available, else CPU
    python benchmarks/tracker_overhead.py --device cpu    # smaller D and I by default on the CPU

CUDA timings use CUDA events; CPU timings ``time.perf_counter``. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from eplb.atomic import critical_section
from eplb.testing import capture_graph
from eplb.tracker import LoadTracker


class StackedSwiGLUMoE:
    """A plain MoE layer: softmax router, top-k, experts as stacked SwiGLU weights ``[E, ...]``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, top_k: int, device, dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)

        def param(*shape):
            return (torch.randn(*shape, generator=gen) / shape[-2] ** 0.5).to(device, dtype)

        self.E, self.K = num_experts, top_k
        self.router_DE = param(hidden, num_experts)
        self.w13_EDI = param(num_experts, hidden, 2 * intermediate)  # gate and up, side by side
        self.w2_EID = param(num_experts, intermediate, hidden)
        # On the CPU the per-expert loop is faster than _grouped_mm's fallback and its host
        # read of the counts costs nothing.
        self.grouped = hasattr(torch, "_grouped_mm") and torch.device(device).type == "cuda"

    def _experts(self, x_ND: torch.Tensor, counts_E: torch.Tensor, w_E: torch.Tensor) -> torch.Tensor:
        if self.grouped:
            offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
            return torch._grouped_mm(x_ND, w_E, offs=offs_E)
        # Fallback: one matmul per expert (needs the counts on the host).
        outs, start = [], 0
        for e, c in enumerate(counts_E.tolist()):
            outs.append(x_ND[start : start + c] @ w_E[e])
            start += c
        return torch.cat(outs)

    def forward(self, x_TD: torch.Tensor, tracker: LoadTracker | None = None, trusted: bool = False) -> torch.Tensor:
        T, D = x_TD.shape
        scores_TE = torch.softmax((x_TD @ self.router_DE).float(), dim=-1)
        weights_TK, ids_TK = torch.topk(scores_TE, self.K, dim=-1)
        if tracker is not None:
            tracker.record(0, ids_TK, trusted=trusted)
        ids_N = ids_TK.reshape(-1)
        order_N = torch.argsort(ids_N, stable=True)
        counts_E = torch.zeros(self.E, dtype=torch.int64, device=x_TD.device)
        counts_E.index_add_(0, ids_N, torch.ones_like(ids_N))  # no host sync, unlike bincount
        x_ND = x_TD[order_N // self.K]
        gate_ND, up_ND = self._experts(x_ND, counts_E, self.w13_EDI).chunk(2, dim=-1)
        y_ND = self._experts(F.silu(gate_ND) * up_ND, counts_E, self.w2_EID)
        y_TKD = torch.empty_like(y_ND).index_copy_(0, order_N, y_ND).view(T, self.K, D)
        return (y_TKD * weights_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(1)


def time_cuda(fn, runs: int, inner: int = 1) -> list[float]:
    """Microseconds per call of ``fn``, one sample per run (``inner`` calls between two events)."""
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / inner)
    return samples


def time_cpu(fn, runs: int, inner: int = 1) -> list[float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) * 1e6 / inner)
    return samples


def graph_time(fn, runs: int, inner: int) -> float:
    """Median microseconds per call of ``fn`` when ``inner`` calls are replayed from one CUDA graph."""
    def calls():
        for _ in range(inner):
            fn()

    graph, _ = capture_graph(calls, warmup=1)
    return statistics.median(time_cuda(graph.replay, runs)) / inner


def bench_tokens(
    moe: StackedSwiGLUMoE, T: int, hidden: int, runs: int, chain: int, device, dtype, trusted: bool = False
) -> str:
    """One table row for ``T`` tokens."""
    cuda = device.type == "cuda"
    timer = time_cuda if cuda else time_cpu
    tracker = LoadTracker(1, moe.E, 16, device=device)
    x_TD = torch.randn(T, hidden, device=device, dtype=dtype)
    ids_TK = torch.topk(torch.rand(T, moe.E, device=device), moe.K, dim=-1).indices

    def record():
        tracker.record(0, ids_TK, trusted=trusted)

    inner = 100 if cuda else 20
    rec_eager = statistics.median(timer(record, runs, inner))
    rec_graph = graph_time(record, runs, inner) if cuda else float("nan")
    plain, with_record = [], []
    with torch.no_grad():
        moe.forward(x_TD, tracker)  # warm-up: kernels, allocator
        # Alternate the two variants so drift (clocks, other load) hits both alike.
        for _ in range(runs):
            plain += timer(lambda: moe.forward(x_TD), 1, chain)
            with_record += timer(lambda: moe.forward(x_TD, tracker, trusted), 1, chain)
    t_moe, t_both = statistics.median(plain), statistics.median(with_record)
    graph_cols = f"{rec_graph:.1f}", f"{100 * rec_graph / t_moe:.2f}%"
    if not cuda:
        graph_cols = "-", "-"
    return (
        f"| {T} | {rec_eager:.1f} | {graph_cols[0]} | {t_moe:.1f} | {t_both:.1f} "
        f"| {100 * rec_eager / t_moe:.2f}% | {graph_cols[1]} "
        f"| {100 * (t_both - t_moe) / t_moe:.2f}% |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 8192])
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--hidden", type=int, help="D (default 2048 on CUDA, 512 on the CPU)")
    parser.add_argument("--intermediate", type=int, help="I (default 1024 on CUDA, 256 on the CPU)")
    parser.add_argument("--layers", type=int, default=58, help="L for the step() timing")
    parser.add_argument("--window", type=int, default=1000, help="W for the step() timing")
    parser.add_argument("--runs", type=int, help="timed runs per number (default 200 on CUDA, 10 on the CPU)")
    parser.add_argument("--chain", type=int, help="forwards per timing (default 10 on CUDA, 1 on the CPU)")
    parser.add_argument(
        "--trusted", action="store_true",
        help="record(..., trusted=True) as the EPLB layer calls it: ids known in [-1, E), one kernel",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    hidden = args.hidden or (2048 if cuda else 512)
    inter = args.intermediate or (1024 if cuda else 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    runs = args.runs or (200 if cuda else 10)
    chain = args.chain or (10 if cuda else 1)
    torch.manual_seed(0)

    moe = StackedSwiGLUMoE(args.experts, hidden, inter, args.topk, device, dtype)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    sizes = f"E={args.experts}, K={args.topk}, D={hidden}, I={inter}, {dtype}"
    print(f"# {name}, torch {torch.__version__}; {sizes}")
    experts = "torch._grouped_mm" if moe.grouped else "a per-expert loop"
    print(f"# experts via {experts}; median of {runs} runs; {chain} forwards back to back per timing")
    header = (
        "| T | record eager (us) | record graph (us) | moe (us) | moe + record (us) "
        "| eager / moe | graph / moe | (moe+record - moe) / moe |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for T in args.tokens:
        print(bench_tokens(moe, T, hidden, runs, chain, device, dtype, args.trusted), flush=True)

    tracker = LoadTracker(args.layers, args.experts, args.window, device=device)
    timer = time_cuda if cuda else time_cpu
    t_step = statistics.median(timer(tracker.step, runs, 10))
    in_graph = f", {graph_time(tracker.step, runs, 10):.1f} us in a graph" if cuda else ""
    print(
        f"\nstep() for L={args.layers}, E={args.experts}, W={args.window}: {t_step:.1f} us eager"
        f"{in_graph} (once per forward pass)"
    )

    def empty_section():
        with critical_section():
            pass

    t_section = statistics.median(time_cpu(empty_section, runs, 100))
    print(f"of which the critical section that makes it atomic under Ctrl-C: {t_section:.2f} us (host only)")


if __name__ == "__main__":
    main()
