"""The one protocol both executors follow: `Executor` (begin, on_step, drain, close)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from eplb.executor.report import RebalanceReport, Settle, StepOutcome
from eplb.moe.slot_layer import SlotLayer
from eplb.placement import Placement
from eplb.planner import Decision

__all__ = ["Executor"]


@runtime_checkable
class Executor(Protocol):
    """Applies a planned placement to the layers, moving weights between ranks.

    Every rank of the EP group calls the methods at the same steps, with the same arguments.

    - `begin` hands over the layers, the placement they hold (``old``) and ``decide``, which
      returns the `eplb.planner.Decision` (called once: at once by the sync executor's `drain`,
      on the worker thread by the async executor).
    - `on_step` runs at every step boundary: commits what is ready everywhere, finishes or aborts.
    - `drain` drives the rebalance in flight to its end, blocking. The sync executor does all
      its work here: a sync rebalance is ``begin`` + ``drain``.
    - Both take ``settle`` (an `eplb.executor.report.Settle`): the owner's bookkeeping of an
      outcome (placement, report, counters), called inside the critical section in which the
      ranks agreed on the outcome and committed it, so that a Ctrl-C never lands between a
      commit (or the end of a rebalance) and its bookkeeping: every rank counts the same
      rebalances. Commits are collective (a layer is committed on every rank or on none): the
      async executor agrees at every step boundary, the sync executor before each layer's commit.
    - `close` aborts what is in flight (locally) and releases the worker.
    - `abandon` and `replace_groups`: after a peer stopped answering, forget the work in flight
      and take the rebuilt groups (`eplb.comm.recovery`).

    The layers are the single source of truth of the committed placement: each `StepOutcome`
    lists the layers committed and carries the placement read back from the layers.
    """

    last_report: RebalanceReport | None

    @property
    def in_flight(self) -> bool:
        """True between `begin` and the outcome that finishes, skips or aborts the rebalance."""
        ...

    def begin(self, layers: list[SlotLayer], old: Placement, decide: Callable[[], Decision]) -> None:
        ...

    def on_step(self, settle: Settle | None = None) -> StepOutcome:
        ...

    def drain(self, settle: Settle | None = None) -> StepOutcome:
        ...

    def close(self) -> None:
        ...

    def abandon(self) -> None:
        """Forget the work in flight on this rank alone, without waiting (after a lost peer)."""
        ...

    def replace_groups(self, control_group, communicator) -> None:
        """Use a rebuilt control group and communicator from now on (every rank at the same step,
        after `abandon`)."""
        ...

    def stop_with(self, owner: object) -> None:
        """Abort the work in flight once ``owner`` is garbage-collected (no-op when nothing runs
        in the background)."""
        ...
