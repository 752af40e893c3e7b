"""Step time of an expert-parallel MoE forward, unwrapped vs wrapped, eager vs CUDA graph.

Legend: G ranks, T tokens per rank, E logical experts, K top-k, D hidden size.

Models (transformers Qwen3-MoE parts, ``grouped_mm`` experts, random weights, experts
``0..hot-1`` made hot by a router bias ``--skew``):

* ``stack``: a residual stack of MoE blocks alone (no attention): the step is mostly expert work.
* ``qwen3``: a Qwen3-MoE-like causal LM (attention + MoE layers), logits for the last token only.

Rows (each rank runs its own ``T`` tokens):

* ``unwrapped``: the model as built, every expert local, no EP (what a rank would do alone).
* ``wrapped``: one rank only — `EPLBWrapper` without a group (the experts module is called with
  slot ids directly, no dispatch): the overhead of wrapping.
* ``ep``: EP over the ``G`` ranks (a group of one on one GPU: the expert-parallel code path
  forced), `FixedCapacityDispatcher`, no redundant expert, initial placement.
* ``ep_eplb`` / ``ep_eplb_rr``: EP with ``--redundant`` extra slots after one rebalance from the
  window of ``--warmup`` steps; replica choice hash / round-robin.

Columns: median and p99 step time of the slowest rank (each step: barrier, forward, device
sync), the ratio to the unwrapped row (for ``wrapped``: the median of step-by-step ratios
against an unwrapped copy of the model run in turn with it, so host drift cancels), CPU time
per step (host time until the forward returns, median), GPU time per step (the graph-replay
median of the same row: kernels back to back, no launch gaps), balancedness
of the window (EP rows), and for ``ep_eplb`` the predicted speed-up (max rank load before /
after the rebalance, on the window's load) and the realised one (``ep`` step / this step).

Run::

    torchrun --nproc-per-node 2 benchmarks/ep_step.py                  # several GPUs
    python benchmarks/ep_step.py --tokens 256 512 2048 4096            # one GPU
    python benchmarks/ep_step.py --tiny                                # CPU, gloo, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import types
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from eplb import EPLBConfig, EPLBWrapper
from eplb.metrics import balancedness
from eplb.moe import ResidualStack
from eplb.testing import capture_graph

ROWS = ("unwrapped", "wrapped", "ep", "ep_eplb", "ep_eplb_rr")


# ------------------------------------------------------------------------------------ models
def _biased_router_forward(self, hidden_states):
    """Qwen3-MoE's top-k router with a logit bias (``self.bias_E``): skewed routing."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden_states, self.weight) + self.bias_E
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    top, ids = torch.topk(probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        top /= top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), ids


def _skew(model: nn.Module, hot: int, strength: float) -> None:
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            bias = torch.zeros(module.num_experts, device=module.weight.device, dtype=module.weight.dtype)
            bias[:hot] = strength
            module.register_buffer("bias_E", bias)
            module.forward = types.MethodType(_biased_router_forward, module)


def build(args, device, dtype) -> tuple[nn.Module, int]:
    """The model on ``device`` in ``dtype``, and its hidden size."""
    import transformers as tf
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    if args.model == "stack":
        config = tf.Qwen3MoeConfig(
            hidden_size=args.hidden, num_experts=args.stack_experts, num_experts_per_tok=args.top_k,
            moe_intermediate_size=args.inter, norm_topk_prob=True,
        )
        config._experts_implementation = args.experts_implementation
        with torch.device(device):
            model = ResidualStack([Qwen3MoeSparseMoeBlock(config) for _ in range(args.stack_layers)])
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    else:
        config = tf.Qwen3MoeConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 8), head_dim=args.head_dim,
            num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.inter,
            intermediate_size=4 * args.inter, norm_topk_prob=True, use_cache=False,
        )
        with torch.device(device):
            model = tf.Qwen3MoeForCausalLM(config)
        model.set_experts_implementation(args.experts_implementation)
    model = model.to(dtype).eval()
    _skew(model, args.hot, args.skew)
    return model, args.hidden


def make_input(args, rank: int, T: int, device, dtype) -> dict:
    gen = torch.Generator().manual_seed(1234 + rank)
    if args.model == "stack":
        return {"x": torch.randn(1, T, args.hidden, generator=gen).to(device, dtype)}
    return {"input_ids": torch.randint(0, args.vocab, (1, T), generator=gen).to(device), "logits_to_keep": 1}


# ------------------------------------------------------------------------------------ timing
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, iters: int, device, group) -> tuple[list[float], list[float]]:
    """Per-step (wall, host) seconds; wall is the slowest rank's (all-reduced max)."""
    walls, hosts = [], []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group=group)
        _sync(device)
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        _sync(device)
        walls.append(time.perf_counter() - t0)
        hosts.append(t1 - t0)
    if group is not None:
        w = torch.tensor(walls, dtype=torch.float64, device=device)  # NCCL reduces device tensors only
        dist.all_reduce(w, op=dist.ReduceOp.MAX, group=group)
        walls = w.tolist()
    return walls, hosts


def time_paired(step_a, step_b, iters: int, device) -> tuple[list[float], list[float]]:
    """One process: wall seconds of ``step_a`` and ``step_b`` run alternately, so host drift
    (other work on the machine, clock changes) hits both alike; ratios are taken pair by pair."""
    walls_a, walls_b = [], []
    for _ in range(iters):
        for step, walls in ((step_a, walls_a), (step_b, walls_b)):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            walls.append(time.perf_counter() - t0)
    return walls_a, walls_b


def _p(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------------ rows
def run_row(row, model, args, T, device, dtype, group, rank, world, graph: bool, results):
    """Measure one row; returns a dict (or None when the row does not apply)."""
    if row == "wrapped" and world > 1:
        return None
    inputs = make_input(args, rank, T, device, dtype)
    wrapper = None
    extra = {}
    # The one-rank wrapped row is timed against an unwrapped copy, step by step in turn.
    reference = copy.deepcopy(model) if row == "wrapped" else None
    if row != "unwrapped":
        ep = row.startswith("ep")
        config = EPLBConfig(
            use_async=False, step_interval=10**9, window_size=max(4, args.warmup),
            num_redundant_experts=args.redundant if row.startswith("ep_eplb") else 0,
            dispatcher=args.ep_dispatcher if ep else "auto",
            max_tokens_per_rank=T if ep and args.ep_dispatcher == "fixed_capacity" else None,
            replica_choice="round_robin" if row == "ep_eplb_rr" else "hash",
        )
        wrapper = EPLBWrapper(model, config, ep_group=group if ep else None)
        target = wrapper
    else:
        target = model

    def forward():
        with torch.no_grad():
            return target(**inputs)

    for _ in range(args.warmup):
        forward()
    if wrapper is not None and row.startswith("ep"):
        load_LE = wrapper.tracker.window_load(group=group if world > 1 else None).cpu().double()
        before = balancedness(load_LE, wrapper.placement, world)
        if row.startswith("ep_eplb"):
            wrapper.rebalance()
            after = balancedness(load_LE, wrapper.placement, world)
            extra["predicted_speedup"] = before.max_tokens_per_rank / max(after.max_tokens_per_rank, 1e-9)
        wrapper.tracker.reset()
    def reference_forward():
        with torch.no_grad():
            return reference(**inputs)

    try:
        if graph:
            replay = capture_graph(forward, device=device)[0].replay

            def step():
                replay()
                if wrapper is not None:
                    wrapper.step()

            reference_step = None if reference is None else capture_graph(reference_forward, device=device)[0].replay
        else:
            step, reference_step = forward, reference_forward
        walls, hosts = time_steps(step, args.iters, device, group if world > 1 else None)
        if reference is not None:
            for _ in range(args.warmup):
                reference_forward()
            base, mine = time_paired(reference_step, step, args.iters, device)
            extra["paired_unwrapped_ms"] = 1e3 * statistics.median(base)
            extra["paired_ms"] = 1e3 * statistics.median(mine)
            extra["paired_ratio"] = statistics.median(m / b for m, b in zip(mine, base))
    except Exception as exc:  # a row that cannot be captured is reported, not fatal
        walls, hosts, extra["error"] = [], [], f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    if wrapper is not None and row.startswith("ep"):
        extra["balancedness"] = wrapper.stats(reduce=world > 1)["balancedness"]
    if wrapper is not None:
        wrapper.unwrap()
    out = {"row": row, "tokens": T, "graph": graph, **extra}
    if walls:
        out.update(median_ms=1e3 * statistics.median(walls), p99_ms=1e3 * _p(walls, 0.99),
                   cpu_ms=1e3 * statistics.median(hosts))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("stack", "qwen3"), nargs="+", default=["stack", "qwen3"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048], help="tokens per rank")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--no-graph", action="store_true", help="eager rows only")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64, help="qwen3 model: experts per layer")
    parser.add_argument("--layers", type=int, default=8, help="qwen3 model: layers")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--stack-experts", type=int, default=128)
    parser.add_argument("--stack-layers", type=int, default=4)
    parser.add_argument("--hot", type=int, default=8, help="experts 0..hot-1 get the router bias")
    parser.add_argument("--skew", type=float, default=1.0, help="router logit bias of the hot experts")
    parser.add_argument("--redundant", type=int, default=8)
    parser.add_argument("--experts-implementation", default="grouped_mm")
    parser.add_argument("--ep-dispatcher", choices=("fixed_capacity", "all_to_all"), default="fixed_capacity",
                        help="dispatcher of the EP rows (all_to_all syncs the host per layer: eager rows only)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny sizes, gloo, few steps")
    parser.add_argument("--json", help="write the rows here (rank 0)")
    parser.add_argument("--plot", help="write a PNG of step time vs unwrapped here (rank 0)")
    parser.add_argument("--replot", help="only redraw --plot from this --json file")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            report = json.load(f)
        plot(report["rows"], args.plot, report["ranks"])
        return 0
    if args.tiny:
        args.device = "cpu"
        args.hidden, args.inter, args.top_k, args.experts, args.stack_experts = 32, 16, 2, 8, 8
        args.layers, args.stack_layers, args.heads, args.head_dim, args.vocab = 2, 2, 4, 8, 64
        args.hot, args.redundant, args.iters, args.warmup = 2, 4, 3, 2
        args.tokens = [t for t in args.tokens if t <= 16] or [8]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    graphs = [False] if (args.no_graph or device.type != "cuda") else [False, True]

    # One process without torchrun: a group of one, so the EP rows run the expert-parallel path.
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, timeout=timedelta(seconds=600))
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()

    results = []
    for model_name in args.model:
        args.model = model_name
        model, _ = build(args, device, dtype)
        for T in args.tokens:
            for graph in graphs:
                for row in args.rows:
                    out = run_row(row, model, args, T, device, dtype, group, rank, world, graph, results)
                    if out is not None:
                        out["model"] = model_name
                        results.append(out)
                        if rank == 0:
                            print(json.dumps(out), file=sys.stderr, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _finish(results, args, world, device, rank)
    dist.destroy_process_group()
    return 0


def _finish(results, args, world, device, rank) -> None:
    # GPU time = the graph row's median; realised speed-up = ep / ep_eplb at equal settings.
    index = {(r["model"], r["tokens"], r["graph"], r["row"]): r for r in results}
    for r in results:
        g = index.get((r["model"], r["tokens"], True, r["row"]))
        r["gpu_ms"] = g.get("median_ms") if g else None
        base = index.get((r["model"], r["tokens"], r["graph"], "unwrapped"))
        if "paired_ratio" in r:
            r["vs_unwrapped"] = r["paired_ratio"]  # measured side by side (see time_paired)
        elif base and "median_ms" in base and "median_ms" in r:
            r["vs_unwrapped"] = r["median_ms"] / base["median_ms"]
        ep = index.get((r["model"], r["tokens"], r["graph"], "ep"))
        if r["row"].startswith("ep_eplb") and ep and "median_ms" in ep and "median_ms" in r:
            r["realised_speedup"] = ep["median_ms"] / r["median_ms"]
    if rank != 0:
        return
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": world, "device": str(device), "rows": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot, world)

    def fmt(value, spec="{:.2f}"):
        return "-" if value is None else spec.format(value)

    print(f"\nEP step, {world} rank(s) on {device.type}; tokens per rank; slowest rank; ms")
    print("| model | tokens | mode | row | median | p99 | x unwrapped | CPU/step | GPU/step | balancedness "
          "| predicted | realised |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r and "median_ms" not in r:
            print(f"| {r['model']} | {r['tokens']} | {'graph' if r['graph'] else 'eager'} | {r['row']} | "
                  f"n/a: {r['error']} |||||||| ")
            continue
        print(
            f"| {r['model']} | {r['tokens']} | {'graph' if r['graph'] else 'eager'} | {r['row']} | "
            f"{fmt(r.get('median_ms'))} | {fmt(r.get('p99_ms'))} | {fmt(r.get('vs_unwrapped'), '{:.3f}x')} | "
            f"{fmt(r.get('cpu_ms'))} | {fmt(r.get('gpu_ms'))} | {fmt(r.get('balancedness'))} | "
            f"{fmt(r.get('predicted_speedup'), '{:.2f}x')} | {fmt(r.get('realised_speedup'), '{:.2f}x')} |"
        )


def plot(rows, path, world) -> None:
    """Median step time relative to the unwrapped model, per model, tokens, eager / graph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and "vs_unwrapped" in r and r["row"] != "unwrapped"]
        groups = sorted({(r["tokens"], r["graph"]) for r in mine})
        names = [n for n in ROWS if n != "unwrapped" and any(r["row"] == n for r in mine)]
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            values = [next((r["vs_unwrapped"] for r in mine if (r["tokens"], r["graph"], r["row"]) == (*g, name)), 0)
                      for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{t}\n{'graph' if g else 'eager'}" for t, g in groups], fontsize=8)
        ax.set_title(f"{model}, {world} GPU(s): step time / unwrapped")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
