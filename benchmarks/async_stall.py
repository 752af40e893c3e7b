"""Per-step latency of a decode-like loop while a rebalance moves most expert weights.

One rank holding a stack of MoE layers shaped like DeepSeek-V3's routed experts (58 layers,
9 slots of hidden 7168 x intermediate 2048, bf16: about 46 GB). The forward of one step is
captured once in a CUDA graph and replayed; commits write the same storage in place, so the
graph is never re-captured. A rebalance replaces every slot of every layer with weights staged
from pinned host memory (the ``torch_gloo`` path: host -> device copies), either

- ``sync``: all layers at once, on the main stream, blocking the step that triggers it; or
- ``async``: `eplb.executor.AsyncExecutor` — a worker thread copies each layer into a staging
  buffer on a side stream; the main thread commits one ready layer per step.

Prints median / p99 step latency per mode, the rebalance's total time, and the ratios against
no rebalance; ``--plot`` writes per-step latency over time. Run on a GPU:

    python benchmarks/async_stall.py --plot docs/img/async_stall.png

``--small`` runs a scaled-down shape (for a quick check, or on the CPU without the graph).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from eplb.executor import AsyncExecutor
from eplb.moe.slot_layer import SlotStorage
from eplb.placement import Placement
from eplb.planner import Decision
from eplb.testing import capture_graph


class BenchLayer(SlotStorage):
    """Slot storage of one MoE layer with the `EPLBExperts` commit contract (one rank)."""

    def __init__(self, index: int, w13_E: torch.Tensor, w2_E: torch.Tensor, phy2log: list[int]):
        self.layer_index = index
        rows = torch.tensor(phy2log, device=w13_E.device)
        self.w13 = w13_E.index_select(0, rows)  # [S, 2I, D]
        self.w2 = w2_E.index_select(0, rows)  # [S, D, I]

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return {"w13": self.w13, "w2": self.w2}

    def commit(self, phy2log_P, staged, slots) -> None:
        # Row by row, like EPLBExperts.apply_commit: one read and one write per slot, no temporary.
        for name, t in self.slot_tensors().items():
            for s in slots.tolist():
                t[s].copy_(staged[name][s])


def forward(layers: list[BenchLayer], x_TD: torch.Tensor, rows_S: list[torch.Tensor]) -> torch.Tensor:
    """A decode step: every slot computes SwiGLU on its (fixed) rows; layers are chained."""
    for layer in layers:
        out = torch.zeros_like(x_TD)
        for s, rows in enumerate(rows_S):
            h = x_TD.index_select(0, rows) @ layer.w13[s].t()
            gate, up = h.chunk(2, dim=-1)
            out.index_add_(0, rows, (torch.nn.functional.silu(gate) * up) @ layer.w2[s].t())
        x_TD = x_TD + 0.01 * out
    return x_TD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--slots", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rebalance-at", type=int, default=50)
    ap.add_argument("--small", action="store_true", help="scaled-down shape for a quick check")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.small:
        args.layers, args.slots, args.hidden, args.inter, args.steps, args.rebalance_at = 6, 4, 256, 128, 60, 10
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    S, L = args.slots, args.layers
    # One layer's worth of expert weights on the host (pinned), shared by all layers: transfers
    # move the same bytes as distinct weights would, and the host needs 1/L of the memory.
    host_w13 = (torch.randn(S, 2 * args.inter, args.hidden) * 0.02).to(dtype).pin_memory() if cuda else \
        (torch.randn(S, 2 * args.inter, args.hidden) * 0.02).to(dtype)
    host_w2 = (torch.randn(S, args.hidden, args.inter) * 0.02).to(dtype)
    host_w2 = host_w2.pin_memory() if cuda else host_w2
    old_row = list(range(S))
    new_row = [(s + 1) % S for s in range(S)]  # every slot changes
    old = Placement.from_phy2log(torch.tensor([old_row] * L), S)
    new = Placement.from_phy2log(torch.tensor([new_row] * L), S)
    bytes_per_rebalance = L * S * (host_w13[0].numel() + host_w2[0].numel()) * host_w13.element_size()

    x_TD = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    pairs = torch.randint(0, S, (args.tokens * args.topk,), generator=torch.Generator().manual_seed(1))
    token = torch.arange(args.tokens * args.topk) // args.topk
    rows_S = [token[pairs == s].unique().to(device) for s in range(S)]

    def host_transfer(layer, plan, slot_tensors, staging) -> None:
        # Stage from host copies: slot s of the new placement needs expert new_row[s].
        for c in plan.changed_local:
            e = new_row[c]
            staging["w13"][c].copy_(host_w13[e], non_blocking=True)
            staging["w2"][c].copy_(host_w2[e], non_blocking=True)

    results: dict[str, dict] = {}
    for mode in ("none", "sync", "async"):
        w13_E, w2_E = host_w13.to(device), host_w2.to(device)
        layers = [BenchLayer(i, w13_E, w2_E, old_row) for i in range(L)]
        del w13_E, w2_E
        static_x = x_TD.clone()
        if cuda:
            graph, static_out = capture_graph(lambda layers=layers, x=static_x: forward(layers, x, rows_S))

            def step(graph=graph):
                graph.replay()
        else:
            def step(layers=layers, static_x=static_x):
                forward(layers, static_x, rows_S)
        executor = AsyncExecutor(rank=0, num_ranks=1, communicator=None, max_transfer_bytes=1 << 30,
                                 timeout_s=600, layers_per_step=1, transfer_fn=host_transfer)
        times, total = [], None
        rebalance_start = None
        for i in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if i == args.rebalance_at:
                rebalance_start = t0
                if mode == "sync":
                    staging = {n: torch.empty_like(t) for n, t in layers[0].slot_tensors().items()}
                    from eplb.transfer import plan_layer_transfer

                    for layer in layers:
                        plan = plan_layer_transfer(old.phy2log[0], new.phy2log[0], rank=0, num_ranks=1)
                        host_transfer(layer, plan, layer.slot_tensors(), staging)
                        layer.commit(new.phy2log[0], staging, torch.tensor(plan.changed_local))
                    if cuda:
                        torch.cuda.synchronize()
                    total = time.perf_counter() - t0
                elif mode == "async":
                    executor.begin(layers, old, lambda: Decision.move_to(new))
            if mode == "async" and executor.in_flight:
                outcome = executor.on_step()
                if outcome.report is not None:
                    total = time.perf_counter() - rebalance_start
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        executor.close()
        if mode != "none":
            # Every slot of every layer holds its new expert's weights.
            for layer in layers[:: max(1, L // 5)]:
                for s in range(S):
                    assert torch.equal(layer.w13[s].cpu(), host_w13[new_row[s]]), (mode, layer.layer_index, s)
                    assert torch.equal(layer.w2[s].cpu(), host_w2[new_row[s]]), (mode, layer.layer_index, s)
        warm = times[5:]
        results[mode] = {
            "median_ms": statistics.median(warm) * 1e3,
            "p99_ms": sorted(warm)[int(0.99 * (len(warm) - 1))] * 1e3,
            "max_ms": max(warm) * 1e3,
            "rebalance_s": total,
            "times_ms": [t * 1e3 for t in times],
        }
        del layers
        if cuda:
            del graph, static_out
            torch.cuda.empty_cache()

    base = results["none"]
    print(f"\nshape: {L} layers x {S} slots, hidden {args.hidden}, intermediate {args.inter}, {dtype}, "
          f"{args.tokens} tokens top-{args.topk}; rebalance moves {bytes_per_rebalance / 1e9:.1f} GB from host")
    print(f"{'mode':<7}{'median ms':>11}{'p99 ms':>10}{'max ms':>10}{'median x':>10}{'p99 x':>8}{'rebalance s':>13}")
    for mode, r in results.items():
        reb = "-" if r["rebalance_s"] is None else f"{r['rebalance_s']:.3f}"
        print(f"{mode:<7}{r['median_ms']:>11.2f}{r['p99_ms']:>10.2f}{r['max_ms']:>10.2f}"
              f"{r['median_ms'] / base['median_ms']:>10.3f}{r['p99_ms'] / base['p99_ms']:>8.3f}{reb:>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        for mode in ("sync", "async", "none"):
            ax.plot(results[mode]["times_ms"], label=mode, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("step latency (ms)")
        ax.axvline(args.rebalance_at, color="grey", ls=":", lw=1)
        ax.legend()
        ax.set_title("Per-step latency, rebalance triggered at the dotted line")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
