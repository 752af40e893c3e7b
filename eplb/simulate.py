"""Replay a load trace through one or more EPLB configurations, offline, and compare them.

Legend: T steps of the trace (no token dimension here), L MoE layers, E logical experts,
P physical slots, G ranks.

Semantics follow `EPLBWrapper` in sync mode: steps count from 0; after step ``t - 1`` with
``t % step_interval == 0`` (and ``0 < t < T``) the planner (`eplb.planner.plan`, the wrapper's
own) plans from the window ``[t - window_size, t)`` of the trace, with the placement in force as
``old``, and the new placement serves from step ``t`` on. A rebalance whose predicted gain (on
the window) is below ``min_improvement`` is skipped, and so is one whose window holds no load.
The balancedness of step ``t`` is that of step ``t``'s own load under the placement in force at
step ``t`` (per step: ``sum_l mean_g / sum_l max_g``, as `eplb.metrics.balancedness`).

Between two rebalances the placement is fixed, so the rank loads of all those steps are one
batched product ``[T, L, E] x [L, E, G] -> [T, L, G]`` with `eplb.metrics.rank_share`; the
policy runs once per rebalance. Async mode is not simulated: it commits the same placement a
few steps later, layer by layer, which changes little over intervals of hundreds of steps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field, model_validator

from eplb.config import CheckedFields
from eplb.errors import EPLBError
from eplb.metrics import balancedness, rank_share
from eplb.placement import Placement
from eplb.planner import PlanOptions, plan
from eplb.policies import check_policy_inputs, check_policy_options, get_policy, set_options
from eplb.runtime import Topology
from eplb.traces import Trace

__all__ = ["SimConfig", "Rebalance", "RunResult", "SimResult", "simulate", "count_transfers"]

_CHUNK_STEPS = 1024  # steps multiplied at once: bounds memory to ~chunk * L * (E + G) floats
_PROGRESS_MIN_STEPS = 2000  # a progress bar below this many (steps x configs) is only noise


class SimConfig(CheckedFields):
    """One configuration to replay a trace through (frozen; unknown fields are rejected).

    The knobs an `EPLBConfig` also has carry its field names; ``num_ranks``, ``num_nodes`` and
    ``num_groups`` are the `EPLBWrapper` arguments of the same names. The sizes are checked
    against the trace when `simulate` starts, with the policies' own messages
    (``P = E + num_redundant_experts`` a multiple of ``num_ranks``, ``E`` a multiple of
    ``num_groups``, ``num_ranks`` a multiple of ``num_nodes``). Number fields refuse bools, as
    `EPLBConfig`'s do.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    policy: str = "default"
    """Registered policy name. Any policy works here, sync-only ones (``topk``) included."""

    window_size: int = Field(1000, gt=0)
    """Steps of load the policy plans from (as ``EPLBConfig.window_size``)."""

    step_interval: int = Field(3000, gt=0)
    """Steps between rebalances (as ``EPLBConfig.step_interval``). An interval of at least the
    trace's length never rebalances: the initial placement stays (a static placement)."""

    num_redundant_experts: int = Field(0, ge=0)
    """Redundant slots per layer (as ``EPLBConfig.num_redundant_experts``);
    ``P = E + num_redundant_experts``."""

    num_ranks: int = Field(8, gt=0)
    """``G``, expert-parallel ranks."""

    num_nodes: int = Field(1, gt=0)
    """``N``, nodes (hierarchical policies pack expert groups onto nodes first)."""

    num_groups: int = Field(1, gt=0)
    """Expert groups per layer (DeepSeek group-limited routing); must divide ``E``."""

    min_improvement: float = Field(0.0, ge=0.0, lt=1.0)
    """Skip a rebalance whose predicted balancedness gain is below this (as ``EPLBConfig.min_improvement``)."""

    migration_budget: float | None = None
    """Policy option (``EPLBConfig.migration_budget``): at most this fraction of each layer's slots
    may receive an expert their rank did not hold; in ``(0, 1]`` and at least ``1 / P`` (checked
    against the trace when `simulate` starts)."""

    refine: bool = False
    """Policy option (``EPLBConfig.refine``): swap search after packing."""

    bytes_per_expert: int = Field(0, ge=0)
    """Bytes of one expert's weights, to turn weight transfers into bytes; 0 reports 0 bytes."""

    initial_placement: Placement | Path | str | None = None
    """Placement in force at step 0 (a `Placement` or a path to a saved one); default
    ``Placement.initial(L, E, P, num_ranks)``, what the wrapper starts from."""

    name: str | None = None
    """Label in tables, plots and JSON; default built from the fields that differ between the
    configs of one `simulate` call."""

    @model_validator(mode="after")
    def _policy_accepts_options(self) -> SimConfig:
        """A registered policy must accept the options set (as `EPLBConfig` checks); an unknown
        name is reported by `simulate`, which lists the registered ones."""
        from eplb.policies import available_policies

        if self.policy in available_policies():
            try:
                check_policy_options(self.policy, _policy_options(self))
            except EPLBError as exc:
                raise ValueError(str(exc)) from None
        return self

    def resolved_initial(self, trace: Trace) -> Placement:
        """The placement at step 0 for ``trace`` (validated against its shape and ``num_ranks``)."""
        num_physical = trace.num_logical + self.num_redundant_experts
        if self.initial_placement is None:
            return Placement.initial(trace.num_layers, trace.num_logical, num_physical, self.num_ranks)
        placement = self.initial_placement
        if not isinstance(placement, Placement):
            placement = Placement.load(placement, num_ranks=self.num_ranks)
        shape = (placement.num_layers, placement.num_logical, placement.num_physical)
        if shape != (trace.num_layers, trace.num_logical, num_physical):
            raise EPLBError(
                f"initial placement {placement!r} does not fit the trace (L={trace.num_layers}, "
                f"E={trace.num_logical}) with num_redundant_experts={self.num_redundant_experts} "
                f"(P={num_physical}); set num_redundant_experts to "
                f"{placement.num_physical - placement.num_logical} or plan a new placement"
            )
        return placement.validate(self.num_ranks)


@dataclass(frozen=True)
class Rebalance:
    """One rebalance of a run.

    Attributes:
        step: first step served by the new placement.
        plan_time_s: wall time of the policy call.
        slots_moved: slots (over all layers) whose expert changed.
        weight_transfers: experts that cross the network: one per (layer, expert, receiving rank)
            not already holding it (as `eplb.transfer.plan_layer_transfer` counts them).
        bytes_moved: ``weight_transfers * bytes_per_expert``.
        predicted_gain: balancedness gain of the new placement over the old one on the window.
        window_balancedness_before / window_balancedness_after: those two balancednesses.
        skipped: True when ``predicted_gain < min_improvement`` (with ``min_improvement > 0``)
            or the window holds no load; the old placement stays and nothing moves.
    """

    step: int
    plan_time_s: float
    slots_moved: int
    weight_transfers: int
    bytes_moved: int
    predicted_gain: float
    window_balancedness_before: float
    window_balancedness_after: float
    skipped: bool


@dataclass(eq=False)
class RunResult:
    """The replay of one config.

    Attributes:
        name: the config's label.
        config: the `SimConfig`.
        balancedness: ``[T]`` float64 — per step, ``sum_l mean_g / sum_l max_g`` of that step's
            rank loads under the placement in force; 1.0 for a step without load.
        max_load: ``[T]`` float64 — ``sum_l max_g`` rank load (the busiest rank of each layer).
        mean_load: ``[T]`` float64 — ``sum_l mean_g`` rank load.
        rebalances: every rebalance, skipped ones included, in step order.
        rank_load_static: ``[L, G]`` float64 — the whole trace served by the initial placement.
        rank_load: ``[L, G]`` float64 — the whole trace served as simulated (each step by the
            placement in force then).
        final_placement: the placement in force after the last step.
    """

    name: str
    config: SimConfig
    balancedness: np.ndarray
    max_load: np.ndarray
    mean_load: np.ndarray
    rebalances: list[Rebalance]
    rank_load_static: np.ndarray
    rank_load: np.ndarray
    final_placement: Placement

    def summary(self) -> dict[str, Any]:
        """One row of numbers: mean/min balancedness, overall balancedness (``sum mean / sum
        max`` over every step), rebalances done and skipped, slots moved, weight transfers,
        bytes moved, total plan time."""
        done = [r for r in self.rebalances if not r.skipped]
        total_max = float(self.max_load.sum())
        return {
            "name": self.name,
            "mean_balancedness": float(self.balancedness.mean()) if self.balancedness.size else 1.0,
            "min_balancedness": float(self.balancedness.min()) if self.balancedness.size else 1.0,
            "overall_balancedness": float(self.mean_load.sum()) / total_max if total_max > 0 else 1.0,
            "rebalances": len(done),
            "skipped": len(self.rebalances) - len(done),
            "slots_moved": sum(r.slots_moved for r in done),
            "weight_transfers": sum(r.weight_transfers for r in done),
            "bytes_moved": sum(r.bytes_moved for r in done),
            "plan_time_s": sum(r.plan_time_s for r in self.rebalances),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: config, summary, per-step series and rebalances."""
        cfg = self.config.model_dump(exclude={"initial_placement"})
        initial = self.config.initial_placement
        cfg["initial_placement"] = "<in-memory Placement>" if isinstance(initial, Placement) else (
            None if initial is None else os.fspath(initial)
        )
        return {
            "name": self.name,
            "config": cfg,
            "summary": self.summary(),
            "balancedness": self.balancedness.tolist(),
            "max_load": self.max_load.tolist(),
            "mean_load": self.mean_load.tolist(),
            "rebalances": [asdict(r) for r in self.rebalances],
        }


@dataclass(eq=False)
class SimResult:
    """Results of `simulate`: one `RunResult` per config, in the order given.

    ``result["name"]`` picks a run by name; ``result.runs`` lists them.
    """

    trace_metadata: dict[str, Any]
    steps: int
    runs: list[RunResult] = field(default_factory=list)

    def __getitem__(self, name: str) -> RunResult:
        for run in self.runs:
            if run.name == name:
                return run
        raise KeyError(f"no run named {name!r}; runs: {', '.join(r.name for r in self.runs)}")

    def summaries(self) -> list[dict[str, Any]]:
        """`RunResult.summary` of every run."""
        return [run.summary() for run in self.runs]

    def table(self) -> str:
        """A plain-text table, one row per config."""
        rows = [("config", "mean bal", "min bal", "overall", "rebal", "skipped", "slots moved",
                 "transfers", "bytes moved", "plan s")]
        for s in self.summaries():
            rows.append((
                s["name"], f"{s['mean_balancedness']:.4f}", f"{s['min_balancedness']:.4f}",
                f"{s['overall_balancedness']:.4f}", str(s["rebalances"]), str(s["skipped"]),
                str(s["slots_moved"]), str(s["weight_transfers"]), _human_bytes(s["bytes_moved"]),
                f"{s['plan_time_s']:.2f}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``format``: ``"eplb.simresult"``, ``version``: 1)."""
        return {
            "format": "eplb.simresult",
            "version": 1,
            "trace": {**self.trace_metadata, "steps": self.steps},
            "runs": [run.to_dict() for run in self.runs],
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The results as JSON (see `to_dict`); also written to ``path`` when given."""
        text = json.dumps(self.to_dict())
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def plot(self, path: str | os.PathLike) -> None:
        """Write `figure` to ``path`` (any format matplotlib writes, from its extension).

        Needs matplotlib (``pip install eplb[plot]``). Draws on its own Agg canvas, without
        pyplot, so it needs no display and leaves the caller's matplotlib backend alone.
        """
        self.figure().savefig(path, dpi=110)

    def figure(self):
        """A matplotlib ``Figure``: balancedness over time for every config (rebalances marked;
        the legend beside the plot, never over the curves), next to each config's fraction of
        slots moved per rebalance against its overall balancedness; then heat maps of the rank
        loads of the whole trace ``[L, G]`` (each layer divided by its mean rank load): one
        "no rebalance" map per distinct initial placement (configs with the same sizes share one),
        and one map per config as simulated.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise EPLBError("plotting needs matplotlib; install it with pip install 'eplb[plot]'") from None
        # Step 1: the distinct "no rebalance" maps, with the configs that share each.
        static: list[tuple[np.ndarray, list[str]]] = []
        for run in self.runs:
            for m, names in static:
                if m.shape == run.rank_load_static.shape and np.array_equal(m, run.rank_load_static):
                    names.append(run.name)
                    break
            else:
                static.append((run.rank_load_static, [run.name]))
        maps = [(f"no rebalance ({', '.join(names) if len(static) > 1 else 'every config'})", m)
                for m, names in static]
        maps += [(f"{run.name}: as simulated", run.rank_load) for run in self.runs]
        cols = min(3, len(maps))
        rows = -(-len(maps) // cols)
        fig = Figure(figsize=(13, 3.6 + 2.6 * rows), layout="constrained")
        grid = fig.add_gridspec(1 + rows, cols, height_ratios=[1.4] + [1.0] * rows)
        grid_top = grid[0, :].subgridspec(1, 3, width_ratios=[2.6, 0.8, 1.2])
        # Step 2: balancedness over time, the legend in its own column beside the curves.
        ax = fig.add_subplot(grid_top[0, 0])
        legend_ax = fig.add_subplot(grid_top[0, 1])
        legend_ax.axis("off")
        scatter = fig.add_subplot(grid_top[0, 2])
        for run in self.runs:
            (line,) = ax.plot(np.arange(self.steps), run.balancedness, lw=0.8, label=run.name)
            for r in run.rebalances:
                if not r.skipped:
                    ax.axvline(r.step, color=line.get_color(), lw=0.5, ls=":", alpha=0.6)
        ax.set_xlabel("step")
        ax.set_ylabel("balancedness (mean / max rank load)")
        ax.set_ylim(0, 1.02)
        legend_ax.legend(*ax.get_legend_handles_labels(), loc="upper left", fontsize="small", borderaxespad=0)
        # Step 3: what each config pays in movement for the balance it gets.
        for run in self.runs:
            summary = run.summary()
            done = max(summary["rebalances"], 1)
            slots = run.final_placement.num_layers * run.final_placement.num_physical
            moved = summary["slots_moved"] / (done * slots) if slots else 0.0
            scatter.scatter([moved], [summary["overall_balancedness"]], label=run.name)
            scatter.annotate(run.name, (moved, summary["overall_balancedness"]), fontsize="x-small",
                             xytext=(3, 3), textcoords="offset points")
        scatter.set_xlabel("slots moved per rebalance (fraction)")
        scatter.set_ylabel("overall balancedness")
        scatter.set_xlim(left=0)
        # Step 4: the heat maps, on one colour scale.
        vmax = max((float(_per_layer_ratio(m).max()) for _, m in maps), default=1.0)
        image = None
        heat_axes = []
        for k, (title, m) in enumerate(maps):
            hax = fig.add_subplot(grid[1 + k // cols, k % cols])
            heat_axes.append(hax)
            image = hax.imshow(_per_layer_ratio(m), aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                               interpolation="nearest")
            hax.set_title(title, fontsize="small")
            hax.set_xlabel("rank")
            hax.set_ylabel("layer")
        if image is not None:
            fig.colorbar(image, ax=heat_axes, label="rank load / layer mean", shrink=0.8)
        return fig


def simulate(
    trace: Trace, configs: SimConfig | Sequence[SimConfig], *, progress: bool = True
) -> SimResult:
    """Replay ``trace`` through each config (see the module docstring for the semantics).

    Args:
        trace: the per-step load ``[T, L, E]``.
        configs: one `SimConfig` or several, compared side by side.
        progress: show a tqdm bar on long replays (if tqdm is installed).

    Returns:
        A `SimResult` with one `RunResult` per config, in order.

    Raises:
        EPLBError: an unknown policy, sizes that do not fit the trace, duplicate names.
    """
    if not isinstance(trace, Trace):
        raise EPLBError(f"simulate needs an eplb.traces.Trace, got {type(trace).__name__}")
    configs = [configs] if isinstance(configs, SimConfig) else list(configs)
    if not configs:
        raise EPLBError("simulate needs at least one SimConfig")
    names = _names(configs)
    total_LE = trace.total()
    initials = []
    for cfg, name in zip(configs, names):
        try:
            get_policy(cfg.policy)
            check_policy_options(cfg.policy, _policy_options(cfg), trace.num_logical + cfg.num_redundant_experts)
            check_policy_inputs(
                total_LE, num_physical=trace.num_logical + cfg.num_redundant_experts,
                num_groups=cfg.num_groups, num_nodes=cfg.num_nodes, num_ranks=cfg.num_ranks,
            )
            initials.append(cfg.resolved_initial(trace))
        except EPLBError as exc:
            raise EPLBError(f"config {name!r}: {exc}") from None
    bar = _progress_bar(trace.steps * len(configs)) if progress else None
    try:
        runs = [_run(trace, total_LE, cfg, name, initial, bar)
                for cfg, name, initial in zip(configs, names, initials)]
    finally:
        if bar is not None:
            bar.close()
    return SimResult(trace_metadata=dict(trace.metadata), steps=trace.steps, runs=runs)


def _run(
    trace: Trace, total_LE: torch.Tensor, cfg: SimConfig, name: str, placement: Placement, bar
) -> RunResult:
    T, L = trace.steps, trace.num_layers
    G = cfg.num_ranks
    policy = get_policy(cfg.policy)
    balancedness_T = np.empty(T)
    max_T = np.empty(T)
    mean_T = np.empty(T)
    rank_load_LG = torch.zeros(L, G, dtype=torch.float64)
    rank_load_static_LG = torch.einsum("le,leg->lg", total_LE, rank_share(placement, G))
    rebalances: list[Rebalance] = []
    bounds = [0, *range(cfg.step_interval, T, cfg.step_interval), T]
    if bar is not None:
        bar.set_postfix_str(name)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if start > 0:
            placement, record = _rebalance(trace, cfg, policy, placement, start)
            rebalances.append(record)
        share_LEG = rank_share(placement, G)
        for a in range(start, stop, _CHUNK_STEPS):
            b = min(a + _CHUNK_STEPS, stop)
            # [T, L, E] x [L, E, G] as a batched matmul over layers: [L, T, E] @ [L, E, G].
            load_LTE = trace.loads[a:b].to(torch.float64).transpose(0, 1)
            rank_LTG = torch.bmm(load_LTE, share_LEG)
            max_T[a:b] = rank_LTG.amax(dim=2).sum(dim=0).numpy()
            mean_T[a:b] = rank_LTG.mean(dim=2).sum(dim=0).numpy()
            rank_load_LG += rank_LTG.sum(dim=1)
            if bar is not None:
                bar.update(b - a)
    idle = max_T <= 0
    # Same conventions as eplb.metrics.balancedness: idle steps are balanced, ratios clamped to 1.
    balancedness_T[:] = np.minimum(1.0, np.divide(mean_T, max_T, out=np.ones(T), where=~idle))
    return RunResult(
        name=name, config=cfg, balancedness=balancedness_T, max_load=max_T, mean_load=mean_T,
        rebalances=rebalances, rank_load_static=rank_load_static_LG.numpy(), rank_load=rank_load_LG.numpy(),
        final_placement=placement,
    )


def _rebalance(trace: Trace, cfg: SimConfig, policy, old: Placement, step: int) -> tuple[Placement, Rebalance]:
    window_LE = trace.total(max(0, step - cfg.window_size), step)
    G = cfg.num_ranks
    decision = plan(window_LE, old, policy, Topology.offline(G, cfg.num_nodes),
                    PlanOptions(num_groups=cfg.num_groups, min_improvement=cfg.min_improvement,
                                policy_options=_policy_options(cfg)))
    if decision.proposed is None:
        # As the wrapper: nothing to plan from, so no rebalance.
        return old, Rebalance(step=step, plan_time_s=0.0, slots_moved=0, weight_transfers=0, bytes_moved=0,
                              predicted_gain=0.0, window_balancedness_before=1.0,
                              window_balancedness_after=1.0, skipped=True)
    before = balancedness(window_LE, old, G).aggregate
    after = balancedness(window_LE, decision.proposed, G).aggregate
    new = decision.new
    slots = transfers = 0
    if new is not None:
        slots, transfers = count_transfers(old.phy2log.numpy(), new.phy2log.numpy(), G)
    record = Rebalance(
        step=step, plan_time_s=decision.seconds, slots_moved=slots, weight_transfers=transfers,
        bytes_moved=transfers * cfg.bytes_per_expert, predicted_gain=decision.gain,
        window_balancedness_before=before, window_balancedness_after=after, skipped=new is None,
    )
    return (old if new is None else new), record


def _policy_options(cfg: SimConfig) -> dict[str, object]:
    """The policy options a config sets (as `EPLBConfig.policy_options`)."""
    return set_options(migration_budget=cfg.migration_budget, refine=cfg.refine)


def count_transfers(old_LP: np.ndarray, new_LP: np.ndarray, num_ranks: int) -> tuple[int, int]:
    """``(changed slots, network transfers)`` of a rebalance, over all layers.

    Args:
        old_LP: ``[L, P]`` int64 ``phy2log`` before the rebalance.
        new_LP: ``[L, P]`` int64 ``phy2log`` after it.
        num_ranks: ``G``.

    Returns:
        Slots whose expert changes, and experts crossing the network: one per (layer, expert,
        receiving rank) whose rank did not hold that expert before, the count of
        `eplb.transfer.plan_layer_transfer` summed over layers.
    """
    num_layers, num_physical = old_LP.shape
    num_logical = int(max(old_LP.max(initial=0), new_LP.max(initial=0))) + 1
    rank_P = np.arange(num_physical) // (num_physical // num_ranks)
    key_base_L1 = (np.arange(num_layers)[:, None] * num_logical)
    old_key_LP = (key_base_L1 + old_LP) * num_ranks + rank_P
    new_key_LP = (key_base_L1 + new_LP) * num_ranks + rank_P
    changed_LP = old_LP != new_LP
    held_F = np.zeros(num_layers * num_logical * num_ranks, dtype=bool)
    held_F[old_key_LP] = True
    needed_F = new_key_LP[changed_LP]
    received = np.unique(needed_F[~held_F[needed_F]])
    return int(changed_LP.sum()), int(received.size)


def _names(configs: list[SimConfig]) -> list[str]:
    """Given names, or labels from the fields that differ between configs (policy always)."""
    keys = ["policy", "window_size", "step_interval", "num_redundant_experts", "num_ranks", "num_nodes",
            "num_groups", "min_improvement", "migration_budget", "refine"]
    short = {"window_size": "w", "step_interval": "i", "num_redundant_experts": "r", "num_ranks": "g",
             "num_nodes": "n", "num_groups": "grp", "min_improvement": "min", "migration_budget": "budget",
             "refine": "refine"}
    varying = [k for k in keys[1:] if len({getattr(c, k) for c in configs}) > 1]
    names = []
    for i, c in enumerate(configs):
        if c.name:
            names.append(c.name)
            continue
        label = " ".join([c.policy, *(f"{short[k]}={_label_value(getattr(c, k))}" for k in varying)])
        if isinstance(c.initial_placement, (str, Path)):
            label += f" init={os.path.basename(c.initial_placement)}"
        elif c.initial_placement is not None:
            label += f" init#{i}"
        names.append(label)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EPLBError(f"two configs are both named {dupes[0]!r}; give each SimConfig a distinct name")
    return names


def _label_value(value: object) -> str:
    if value is None or isinstance(value, bool):
        return {None: "none", True: "on", False: "off"}[value]
    return f"{value:g}"


def _per_layer_ratio(rank_load_LG: np.ndarray) -> np.ndarray:
    mean_L1 = rank_load_LG.mean(axis=1, keepdims=True)
    return np.divide(rank_load_LG, mean_L1, out=np.ones_like(rank_load_LG), where=mean_L1 > 0)


def _human_bytes(n: int) -> str:
    if n <= 0:
        return "0"
    exp = min(int(math.log(n, 1000)), 4)
    return f"{n / 1000 ** exp:.3g}{['B', 'kB', 'MB', 'GB', 'TB'][exp]}"


def _progress_bar(total: int):
    if total < _PROGRESS_MIN_STEPS:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="step", desc="simulate", leave=False)
