"""The planning decision, made in one place: `plan` turns a window's load into a `Decision`.

Legend: L layers, E logical experts, P physical slots, G ranks.

The wrapper calls `plan` on the main thread (sync mode), the async executor's worker calls it
through the function the wrapper hands over (and returns the `Decision`, it writes nothing
else), and `eplb.simulate` calls it for every rebalance of a replay. Pure: the same inputs give
the same decision on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from eplb.metrics import predicted_gain
from eplb.placement import Placement
from eplb.policies import get_policy

if TYPE_CHECKING:
    from eplb.runtime import Topology

__all__ = ["Decision", "PlanOptions", "plan", "skip_empty_window"]

EMPTY_WINDOW = "no load recorded in the window"


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """The knobs of one decision besides the topology.

    Attributes:
        num_groups: expert groups of group-limited routing (a property of the model).
        min_improvement: skip a placement whose predicted balancedness gain is below this
            (``EPLBConfig.min_improvement``; 0 never skips a planned placement).
        policy_options: keyword arguments for the policy (``EPLBConfig.policy_options()``: the
            options that are set, e.g. ``migration_budget``, ``refine``).
    """

    num_groups: int = 1
    min_improvement: float = 0.0
    policy_options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What one planning round decided.

    Attributes:
        new: the placement to apply, or None when the rebalance is skipped.
        proposed: the policy's placement, also when ``min_improvement`` rejected it; None when
            the policy did not run (an empty window).
        gain: predicted balancedness gain of ``proposed`` over ``old`` on the window (see
            `eplb.metrics.predicted_gain`); None when the policy did not run.
        skip_reason: why ``new`` is None ("" when it is not).
        seconds: wall time of the policy call.
    """

    new: Placement | None
    proposed: Placement | None = None
    gain: float | None = None
    skip_reason: str = ""
    seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        return self.new is None

    @classmethod
    def move_to(cls, new: Placement) -> Decision:
        """A decision to apply ``new`` (for callers that planned elsewhere: tests, benchmarks)."""
        return cls(new=new, proposed=new)


def skip_empty_window(load_LE: torch.Tensor) -> Decision | None:
    """The skip `Decision` of a window without load (nothing to plan from), else None."""
    if not bool((load_LE > 0).any()):
        return Decision(new=None, skip_reason=EMPTY_WINDOW)
    return None


def plan(
    load_LE: torch.Tensor,
    old: Placement,
    policy: str | Callable[..., Placement],
    topology: Topology,
    options: PlanOptions = PlanOptions(),
) -> Decision:
    """Decide the next placement from a window's load.

    Args:
        load_LE: ``[L, E]`` float — tokens per logical expert over the window, summed over the
            EP group (identical on every rank).
        old: ``[L, P]`` — the placement in force (``P`` is taken from it).
        policy: a registered policy name or a checked policy (`eplb.policies.get_policy`).
        topology: an `eplb.runtime.Topology` (only ``num_ranks`` and ``num_nodes`` are read, so
            an offline topology without a process group serves the simulator).
        options: `PlanOptions`.

    Returns:
        A `Decision`: skipped when the window holds no load or when the predicted gain is below
        ``options.min_improvement`` (with ``min_improvement > 0``).

    Raises:
        EPLBError: an unknown policy, or the policy's own input/output checks.
    """
    empty = skip_empty_window(load_LE)
    if empty is not None:
        return empty
    policy_fn = get_policy(policy) if isinstance(policy, str) else policy
    start = time.perf_counter()
    proposed = policy_fn(
        load_LE,
        num_physical=old.num_physical,
        num_groups=options.num_groups,
        num_nodes=topology.num_nodes,
        num_ranks=topology.num_ranks,
        old=old,
        **options.policy_options,
    )
    seconds = time.perf_counter() - start
    gain = predicted_gain(load_LE, old, proposed, topology.num_ranks)
    if options.min_improvement > 0 and gain < options.min_improvement:
        reason = f"predicted balancedness gain {gain:.4f} < min_improvement {options.min_improvement}"
        return Decision(new=None, proposed=proposed, gain=gain, skip_reason=reason, seconds=seconds)
    return Decision(new=proposed, proposed=proposed, gain=gain, seconds=seconds)
