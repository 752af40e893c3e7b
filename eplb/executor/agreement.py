"""The step-boundary agreement of the async executor: one small all-reduce of readiness and
error flags on a dedicated gloo group, so every rank commits, aborts or finishes at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from eplb.comm.collectives import agree

__all__ = ["Agreement", "Flags", "PeerLost"]


class PeerLost(Exception):
    """The agreement all-reduce failed: a peer died or hung past the control group's timeout.
    ``who``: words on the ranks that did not answer (from the roll call), or None."""

    def __init__(self, message: str, who: str | None = None):
        super().__init__(message)
        self.who = who


@dataclass(frozen=True, kw_only=True)
class Flags:
    """One rank's state at a step boundary, or (returned by `Agreement.__call__`) the group's.

    Attributes:
        failed_rank: 1 + the rank whose worker failed, 0 when none (MAX over ranks).
        timed_out: 1 when the worker owes work past the timeout (MAX).
        ready: layers staged and ready (MIN: ready on every rank).
        planned: 1 once the plan is known (MIN: planned on every rank).
        busy_rank: 1 + a rank that cannot begin a rebalance (its previous worker is still busy),
            0 when none (MAX): every rank then skips that rebalance together.
        transfer_failed: 1 when a worker's weight transfer failed (MAX): the transfer group's
            connections are closed, so every rank rebuilds eplb's groups before the next rebalance.
    """

    failed_rank: int = 0
    timed_out: int = 0
    ready: int = 0
    planned: int = 0
    busy_rank: int = 0
    transfer_failed: int = 0


class Agreement:
    """Agree on `Flags` over ``control_group`` (a gloo group over the EP ranks; None for one rank).
    A failure marks ``health`` (an `eplb.comm.recovery.GroupHealth`, when given) broken."""

    def __init__(self, control_group: dist.ProcessGroup | None, num_ranks: int, health=None):
        self.control_group = control_group
        self.num_ranks = num_ranks
        self.health = health

    def __call__(self, mine: Flags) -> Flags:
        """The group's flags; raises `PeerLost` when the all-reduce fails."""
        if self.num_ranks == 1 or self.control_group is None:
            return mine
        try:
            out = agree(
                self.control_group,
                at_least={"failed_rank": mine.failed_rank, "timed_out": mine.timed_out, "busy_rank": mine.busy_rank,
                          "transfer_failed": mine.transfer_failed},
                at_most={"ready": mine.ready, "planned": mine.planned},
            )
        except Exception as exc:  # a peer died or hung: gloo gives up after the group timeout
            who = self.health.describe(self.health.lost()) if self.health is not None else None
            raise PeerLost(f"{type(exc).__name__}: {exc}", who) from exc
        return Flags(**out)
