"""What a rebalance did (`RebalanceReport`) and what one step boundary did (`StepOutcome`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from eplb.placement import Placement
from eplb.planner import Decision
from eplb.transfer import LayerTransferPlan, bytes_per_expert

__all__ = ["RebalanceReport", "StepOutcome", "Tally", "Settle", "ignore_outcome"]


@dataclass(frozen=True, kw_only=True)
class RebalanceReport:
    """What one rebalance did. Counts are over all ranks (the same on every rank).

    Attributes:
        layers: layers whose placement changed (and were committed).
        slots_changed: slots that received a different expert.
        network_transfers: experts that crossed the network (once per expert and receiving rank).
        local_copies: slots filled by a copy on their own rank.
        bytes_moved: bytes that crossed the network.
        seconds: wall time of the rebalance on this rank.
        skipped: True when no weights moved because the rebalance was skipped; ``reason`` says why.
    """

    layers: int
    slots_changed: int
    network_transfers: int
    local_copies: int
    bytes_moved: int
    seconds: float
    skipped: bool = False
    reason: str = ""

    @classmethod
    def skip(cls, reason: str, *, layers: int = 0, seconds: float = 0.0) -> RebalanceReport:
        """A report of a rebalance that moved no weights (skipped or aborted) for ``reason``;
        ``layers`` counts layers already committed before an abort."""
        return cls(layers=layers, slots_changed=0, network_transfers=0, local_copies=0, bytes_moved=0,
                   seconds=seconds, skipped=True, reason=reason)


@dataclass
class Tally:
    """Running totals of the layers of one rebalance (over all ranks, as the plans count them)."""

    layers: int = 0
    slots_changed: int = 0
    network_transfers: int = 0
    local_copies: int = 0
    bytes_moved: int = 0

    def add(self, plan: LayerTransferPlan, slot_tensors: dict[str, torch.Tensor]) -> None:
        self.layers += 1
        self.slots_changed += plan.num_changed_slots
        self.network_transfers += plan.num_network_transfers
        self.local_copies += plan.num_local_copies
        self.bytes_moved += plan.bytes_moved(bytes_per_expert(slot_tensors))

    def report(self, seconds: float, *, skipped: bool = False, reason: str = "") -> RebalanceReport:
        return RebalanceReport(**asdict(self), seconds=seconds, skipped=skipped, reason=reason)


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """What an executor did at one step boundary (`Executor.on_step`) or in `Executor.drain`.

    Attributes:
        committed: layer indices committed (model order).
        placement: the placement the layers hold now, read back from the layers (mixed old/new
            while a rebalance is in flight), or None when no layer changed and nothing ended.
        report: set when the rebalance finished, was skipped or aborted.
        decision: the planner's `eplb.planner.Decision`, set with ``report`` when the rebalance
            ended after its decision was made; None otherwise.
    """

    committed: tuple[int, ...] = ()
    placement: Placement | None = None
    report: RebalanceReport | None = None
    decision: Decision | None = None


Settle = Callable[[StepOutcome], None]
"""``settle(outcome)``: the owner's bookkeeping of a `StepOutcome` (placement, report, counters),
called by an executor inside the critical section that decided the outcome (see
`eplb.executor.Executor`). It must not fail: assignments only."""


def ignore_outcome(outcome: StepOutcome) -> None:
    """The `Settle` of an owner that keeps no bookkeeping (it reads the returned outcome)."""
