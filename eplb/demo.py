"""``eplb demo``: expert-parallel load balancing of a small MoE model on 4 CPU ranks, in seconds.

What it shows: a stack of 4 `eplb.moe.MoE` layers (16 experts, top-2, random weights) whose
routers are biased toward a few hot experts runs on ``G`` gloo processes, each with its own
batch of decode tokens, wrapped with `EPLBWrapper` (``G`` redundant slots when ``G`` divides 16, so ``P = 16 + G``).
Halfway through, the wrapper rebalances on its own (``step_interval``); with the async executor
(the default) the forwards keep running while the weights move. Afterwards the parent process
prints the tokens each rank computed per step before and after, the balancedness (mean / max rank
load), what the rebalance moved, and that every step's output equalled the unwrapped model's on
every rank; it writes a plot of the same numbers.

Legend: L MoE layers, E logical experts, G ranks, T tokens per rank and step, D hidden size.
"""

from __future__ import annotations

import argparse
import copy
import queue
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

__all__ = ["main"]

_LAYERS, _EXPERTS, _TOP_K, _HIDDEN, _INTER, _TOKENS = 4, 16, 2, 64, 128, 32
_HOT = (2.5, 2.0, 1.5)  # router bias of each layer's hot experts, along the inputs' common direction
_TIMEOUT_S = 120.0  # whole run; also the gloo timeout, so a rank whose peer died raises instead of hanging


@dataclass(frozen=True)
class _Options:
    steps: int
    ranks: int
    sync: bool
    plot: str
    seed: int

    @property
    def interval(self) -> int:
        # Rebalance once, just past half-way: the next trigger (2 * interval) lies beyond the last step.
        return self.steps // 2 + 1


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D102 - argparse hook: one line, no usage dump
        raise _UsageError(f"{message} (see 'eplb demo --help')")


def main(argv: list[str] | None = None) -> int:
    """Run the demo with ``argv`` (the options after ``eplb demo``); returns the exit status."""
    parser = _Parser(
        prog="eplb demo",
        description="Run a small MoE model with skewed routing on several gloo ranks on the CPU, wrapped with "
        "EPLB; print the load per rank and the balancedness before and after its rebalance, what moved, and "
        "check every output against the unwrapped model; write a plot.",
    )
    parser.add_argument("--steps", type=int, default=32, help="forward steps per rank (8..10000; default 32)")
    parser.add_argument("--ranks", type=int, default=4, help="gloo processes = EP ranks (2..8; default 4)")
    parser.add_argument("--sync", action="store_true", help="use the sync executor (default: async)")
    parser.add_argument("--plot", default="eplb-demo.png", metavar="PATH",
                        help="where to write the plot (default eplb-demo.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the batches (default 0)")
    try:
        args = parser.parse_args(argv)
        if not 8 <= args.steps <= 10_000:
            raise _UsageError(f"--steps ({args.steps}) must be in [8, 10000] (see 'eplb demo --help')")
        if not 2 <= args.ranks <= 8:
            raise _UsageError(f"--ranks ({args.ranks}) must be in [2, 8] (see 'eplb demo --help')")
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except _UsageError as exc:
        return _fail(str(exc), 2)
    opts = _Options(args.steps, args.ranks, args.sync, args.plot, args.seed)
    from eplb.cli import _check_output
    from eplb.errors import EPLBError

    try:  # the folder, the format and matplotlib, before spawning anything
        _check_output("--plot", opts.plot, plot=True)
    except EPLBError as exc:
        return _fail(str(exc), 1)
    print(f"eplb demo: {opts.ranks} ranks (gloo on the CPU), {_LAYERS} MoE layers x {_EXPERTS} experts "
          f"(top-{_TOP_K}), {_EXPERTS + _redundant(opts.ranks)} slots per layer, "
          f"{'sync' if opts.sync else 'async'} executor, {opts.steps} steps ...", flush=True)
    start = time.monotonic()
    results, failure = _spawn(_rank_main, opts)
    if failure:
        return _fail(failure, 1)
    _report(opts, results)
    try:
        _plot(opts, results[0])
    except (OSError, ValueError) as exc:  # ValueError: a file extension matplotlib cannot write
        return _fail(f"could not write the plot {opts.plot}: {getattr(exc, 'strerror', None) or exc}", 1)
    print(f"wrote {opts.plot} ({time.monotonic() - start:.1f} s)")
    return 0


def _fail(message: str, status: int) -> int:
    print(f"eplb: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def _redundant(num_ranks: int) -> int:
    """Redundant slots: at least one per rank, and ``E + redundant`` a multiple of ``G``."""
    return num_ranks + (-_EXPERTS) % num_ranks


# ---------------------------------------------------------------------------------------- parent
def _spawn(target, opts: _Options) -> tuple[list, str | None]:
    """Run ``target(rank, opts, port, queue)`` on ``opts.ranks`` processes; (results by rank, failure line)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, opts, port, messages), daemon=True) for r in range(opts.ranks)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    failure, dead_before = None, False
    deadline = time.monotonic() + _TIMEOUT_S
    try:
        while len(results) < opts.ranks and failure is None:
            try:
                rank, ok, payload = messages.get(timeout=0.2)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in results and p.exitcode]
                if dead and dead_before:  # dead for two polls: no message of its own is still on the way
                    failure = f"rank {dead[0][0]} died (exit code {dead[0][1]}) without a result"
                elif time.monotonic() > deadline:
                    missing = [r for r in range(opts.ranks) if r not in results]
                    failure = f"timed out after {_TIMEOUT_S:g} s; ranks {missing} did not finish"
                dead_before = bool(dead)
                continue
            if ok:
                results[rank] = payload
            else:
                failure = f"rank {rank} failed: {payload}"
    finally:
        for p in procs:  # after a failure the others may sit in a collective: do not wait long
            p.join(timeout=10 if failure is None else 1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [results.get(r) for r in range(opts.ranks)], failure


def _report(opts: _Options, results: list[dict]) -> None:
    r0 = results[0]
    before, after = r0["phases"]["before"], r0["phases"]["after"]
    ranks = "".join(f"{'rank ' + str(g):>9}" for g in range(opts.ranks))
    print(f"{'tokens per step on each rank (all layers)':<44}{ranks}{'mean/max':>10}")
    for name, ph in (("before", before), ("after", after)):
        loads = "".join(f"{v:9.1f}" for v in ph["rank_load"])
        span = f"step {ph['first']}" if ph["first"] == ph["last"] else f"steps {ph['first']}-{ph['last']}"
        print(f"  {name + ' (' + span + ')':<42}{loads}{_row_balance(ph['rank_load']):10.2f}")
    print(f"balancedness (mean/max rank load of each layer, summed over layers): {before['balancedness']:.3f} "
          f"before -> {after['balancedness']:.3f} after")
    print("  (each layer's busiest rank counts; the mean/max of the rows above, summed over layers first, "
          "is higher)")
    print(f"  busiest rank of each layer, summed over layers: {before['busiest']:.1f} -> {after['busiest']:.1f} "
          f"tokens per step (mean rank {after['mean']:.1f})")
    rb = r0["rebalance"]
    print(f"rebalances: {r0['num_rebalances']}, triggered after step {opts.interval}: {rb['layers']} layers, "
          f"{rb['slots_changed']} slots changed")
    print(f"moved: {rb['network_transfers']} experts between ranks ({rb['bytes_moved'] / 2**20:.2f} MiB), "
          f"{rb['local_copies']} copied within a rank")
    if not opts.sync:
        note = " (finished by synchronize() before the last step)" if r0["synchronized"] else ""
        print(f"async: {r0['steps_during']} steps ran while the weights moved{note}")
    checks = sum(r["checks"] for r in results)
    diff = max(r["max_diff"] for r in results)
    print(f"outputs match the unwrapped model: yes ({checks // opts.ranks} steps x {opts.ranks} ranks checked, "
          f"max |difference| {diff:.1e})")


def _row_balance(rank_load: list[float]) -> float:
    """mean / max of one row of rank loads (the table's last column and the bars' legend)."""
    return (sum(rank_load) / len(rank_load)) / max(rank_load) if max(rank_load) > 0 else 1.0


def _plot(opts: _Options, r0: dict) -> None:
    fig = _figure(opts, r0)
    fig.savefig(opts.plot, dpi=100)


def _figure(opts: _Options, r0: dict):
    """The demo's figure: load per rank before/after (legend: the table's mean/max), balancedness per step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="tight")
    bars, line = fig.subplots(1, 2)
    ranks = torch.arange(opts.ranks).tolist()
    for shift, name in ((-0.2, "before"), (0.2, "after")):
        ph = r0["phases"][name]
        bars.bar([g + shift for g in ranks], ph["rank_load"], width=0.4,
                 label=f"{name} (mean/max {_row_balance(ph['rank_load']):.2f})")
    bars.set(xlabel="rank", ylabel="tokens per step (all layers)", xticks=ranks, title="load per rank")
    bars.legend()
    steps = list(range(1, len(r0["series"]) + 1))
    line.plot(steps, r0["series"], marker=".")
    line.axvline(opts.interval + 0.5, color="grey", linestyle="--", label="rebalance triggered")
    if r0["steps_during"]:
        lo = opts.interval + 0.5
        line.axvspan(lo, lo + r0["steps_during"], color="orange", alpha=0.2, label="async: weights moving")
    line.set(xlabel="step", ylabel="balancedness (mean/max rank load per layer)", ylim=(0, 1.05),
             title="balancedness of each step")
    line.legend(loc="lower right")
    fig.suptitle(f"eplb demo: {_LAYERS} MoE layers x {_EXPERTS} experts on {opts.ranks} ranks")
    return fig


# ---------------------------------------------------------------------------------------- ranks
def _rank_main(rank: int, opts: _Options, port: int, messages) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=opts.ranks, timeout=timedelta(seconds=_TIMEOUT_S))
        messages.put((rank, True, _run_rank(rank, opts)))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent, as one line
        frames = traceback.extract_tb(exc.__traceback__)
        own = [f for f in frames if "eplb" in Path(f.filename).parts]  # the deepest line of eplb's own
        where = (own or frames)[-1]
        place = "/".join(Path(where.filename).parts[-2:])
        messages.put((rank, False, f"{type(exc).__name__}: {exc} (at {place}:{where.lineno})"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _ResidualMoE(torch.nn.Module):
    """``x + moe_l(x)`` over ``L`` `eplb.moe.MoE` layers; ``forward(x_TD [T, D]) -> [T, D]``."""

    def __init__(self):
        from eplb.moe import MoE

        super().__init__()
        self.layers = torch.nn.ModuleList(
            MoE(_HIDDEN, _INTER, num_experts=_EXPERTS, top_k=_TOP_K) for _ in range(_LAYERS)
        )

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x_TD = x_TD + layer(x_TD)
        return x_TD


def _build_model(seed: int) -> tuple[_ResidualMoE, torch.Tensor]:
    """The model (eval mode, random weights) and ``u_D``, the direction that leads tokens to hot experts."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _ResidualMoE().eval()
    u_D = torch.nn.functional.normalize(torch.randn(_HIDDEN, generator=gen), dim=0)
    with torch.no_grad():
        for layer in model.layers:  # a few hot experts per layer, different ones in each layer
            hot = torch.randperm(_EXPERTS, generator=gen)[: len(_HOT)]
            for e, strength in zip(hot.tolist(), _HOT):
                layer.gate.weight[e] += strength * u_D
    return model, u_D


def _run_rank(rank: int, opts: _Options) -> dict:
    import torch.distributed as dist

    from eplb import EPLBConfig, EPLBWrapper
    from eplb.metrics import balancedness, rank_loads

    group = dist.group.WORLD
    model, u_D = _build_model(opts.seed)
    reference = copy.deepcopy(model)  # every rank keeps the whole unwrapped model to compare with
    config = EPLBConfig(num_redundant_experts=_redundant(opts.ranks), window_size=opts.interval,
                        step_interval=opts.interval, use_async=not opts.sync, async_timeout_s=_TIMEOUT_S)
    wrapper = EPLBWrapper(model, config, ep_group=group)
    gen = torch.Generator().manual_seed(opts.seed * 7919 + rank + 1)  # a different batch on each rank
    sums = {name: torch.zeros(_LAYERS, _EXPERTS, dtype=torch.float64) for name in ("before", "after")}
    spans: dict[str, list[int]] = {"before": [], "after": []}
    placements = {}
    series, checks, max_diff, during, synchronized = [], 0, 0.0, 0, False
    with torch.no_grad():
        for step in range(1, opts.steps + 1):
            if step == opts.steps and wrapper.async_in_flight:  # keep one step on the final placement
                wrapper.synchronize()
                synchronized = True
            phase = "during" if wrapper.async_in_flight else ("before" if step <= opts.interval else "after")
            placement = wrapper.placement  # commits happen after a forward: this one serves the step
            x_TD = torch.randn(_TOKENS, _HIDDEN, generator=gen) + 1.5 * u_D
            out_TD, ref_TD = wrapper(x_TD), reference(x_TD)
            torch.testing.assert_close(
                out_TD, ref_TD, msg=lambda m, step=step: f"step {step}: the output differs from the unwrapped "
                f"model's: {m}"
            )
            checks += 1
            max_diff = max(max_diff, float((out_TD - ref_TD).abs().max()))
            load_LE = wrapper.tracker.last_step_load(group=group).to(torch.float64)  # all ranks' tokens
            series.append(balancedness(load_LE, placement, opts.ranks).aggregate)
            if phase == "during":
                during += 1
            else:
                sums[phase] += load_LE
                spans[phase].append(step)
                placements[phase] = placement
    stats = wrapper.stats(reduce=True)  # collective
    wrapper.close()
    dist.barrier()  # every rank is done with the collectives before any tears the group down
    phases = {}
    for name, load_LE in sums.items():
        rank_load_G = rank_loads(load_LE, placements[name], opts.ranks).sum(0) / len(spans[name])
        b = balancedness(load_LE, placements[name], opts.ranks)
        phases[name] = {"first": spans[name][0], "last": spans[name][-1], "rank_load": rank_load_G.tolist(),
                        "balancedness": b.aggregate, "busiest": b.max_tokens_per_rank / len(spans[name]),
                        "mean": b.avg_tokens_per_rank / len(spans[name])}
    rebalance = {k: stats[f"last_rebalance_{k}"] for k in
                 ("layers", "slots_changed", "network_transfers", "local_copies", "bytes_moved")}
    return {"phases": phases, "series": series, "checks": checks, "max_diff": max_diff, "steps_during": during,
            "synchronized": synchronized, "rebalance": rebalance, "num_rebalances": stats["num_rebalances"]}
