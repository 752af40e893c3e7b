"""`SyncExecutor`: rebalance every layer at once, blocking (a rebalance is ``begin`` + ``drain``).

With several ranks and a control group, every layer's commit is collective: one small all-reduce
on the control group (the commit agreement), then the commit, in one `eplb.atomic.critical_section`,
so a layer is committed on every rank or on none (see docs/design.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from eplb.atomic import critical_section
from eplb.comm.base import CommunicationError, Communicator
from eplb.comm.recovery import GroupHealth
from eplb.errors import EPLBError, peer_failure
from eplb.executor.agreement import Agreement, Flags, PeerLost
from eplb.executor.report import RebalanceReport, Settle, StepOutcome, Tally, ignore_outcome
from eplb.executor.staging import (
    StagedLayer,
    StagingPool,
    changed_layers,
    commit_staged,
    device_of,
    placement_of,
    stage_layer,
)
from eplb.placement import Placement
from eplb.planner import Decision
from eplb.transfer import execute_layer_transfer

__all__ = ["SyncExecutor"]

logger = logging.getLogger("eplb")


class SyncExecutor:
    """Rebalance all layers at once, blocking until every layer is committed.

    Args:
        rank: this rank in the EP group.
        num_ranks: ``G``.
        communicator: moves weights between the ranks (see `eplb.comm.select_communicator`).
        max_transfer_bytes: per-rank bound of one exchange batch.
        control_group: a gloo group over the EP ranks for the commit agreement (its timeout
            bounds the wait, eplb uses ``async_timeout_s``); None (one rank, or a caller that needs
            no agreement): each rank commits on its own.
        health: the `eplb.comm.recovery.GroupHealth` a failed agreement or transfer marks broken.

    Follows `eplb.executor.Executor`: `begin` only records the work, `drain` does it (`on_step`
    drains work begun and not drained). On CUDA the transfers run on a side stream and the
    commits on the current stream, so layer i+1 moves while layer i is committed; staging holds
    at most two layers at once. Every rank of the group must call them with the same
    placements and layers in the same order. A layer is committed (weights and maps together)
    only once its weights are all in staging; if a transfer fails, the layers not yet committed
    keep their old placement and the error propagates (``layer.placement_row()`` tells which
    placement each layer holds).

    With a control group, each commit is collective and atomic across ranks: the ranks agree
    (one all-reduce of a few integers) that every rank staged the layer, and the agreement and the
    commit form one critical section that holds Ctrl-C. A rank that does not reach the agreement
    (interrupted, failed, dead or frozen) makes the others' agreement fail within the control
    group's timeout: no rank commits that layer, and the others raise `EPLBError` naming the
    layer and the rank that did not answer. The last layer's commit and ``settle`` of the
    finished outcome share one section, so an interrupt never separates a finished rebalance from
    its bookkeeping.
    """

    def __init__(self, *, rank: int, num_ranks: int, communicator: Communicator, max_transfer_bytes: int,
                 control_group: dist.ProcessGroup | None = None, health: GroupHealth | None = None):
        if communicator.num_ranks != num_ranks or communicator.rank != rank:
            raise EPLBError(
                f"the communicator is rank {communicator.rank} of {communicator.num_ranks} but the executor "
                f"was given rank {rank} of {num_ranks}; build both from the same process group"
            )
        if max_transfer_bytes <= 0:
            raise EPLBError(f"max_transfer_bytes ({max_transfer_bytes}) must be > 0")
        self.rank = rank
        self.num_ranks = num_ranks
        self.communicator = communicator
        self.max_transfer_bytes = max_transfer_bytes
        self.health = health
        self._agree = Agreement(control_group, num_ranks, health) if control_group is not None else None
        self.last_report: RebalanceReport | None = None
        self._pending: tuple | None = None
        self._stream: torch.cuda.Stream | None = None  # the transfers' side stream (CUDA), made once

    @property
    def in_flight(self) -> bool:
        """True between `begin` and `drain`."""
        return self._pending is not None

    def begin(self, layers: list, old: Placement, decide: Callable[[], Decision]) -> None:
        """Record a rebalance from ``old`` (the placement the layers hold); `drain` runs it."""
        if self._pending is not None:
            raise EPLBError("a rebalance is already in flight; call drain() first")
        self._pending = (layers, old, decide)

    def on_step(self, settle: Settle | None = None) -> StepOutcome:
        """Drain the rebalance begun, if any."""
        return self.drain(settle)

    def drain(self, settle: Settle | None = None) -> StepOutcome:
        """Decide, then move and commit every layer that changes; blocks until done.

        Args:
            settle: called with the final outcome inside the critical section of the last
                commit (see `eplb.executor.Executor`); None: nothing to settle.

        Returns:
            A `StepOutcome` with the committed layers, the placement read back from the layers,
            the `RebalanceReport` and the `eplb.planner.Decision` (empty when nothing was begun).

        Raises:
            EPLBError: a peer did not answer the commit agreement of a layer, or a weight transfer
                failed (layers committed before keep the new placement, on every rank).
        """
        settle = settle or ignore_outcome
        if self._pending is None:
            return StepOutcome()
        layers, old, decide = self._pending
        self._pending = None
        decision = decide()
        if decision.new is None:
            report = RebalanceReport.skip(decision.skip_reason)
            if self.rank == 0:
                logger.info("rebalance skipped: %s", decision.skip_reason)
            outcome = StepOutcome(report=report, decision=decision)
            with critical_section():
                self.last_report = report
                settle(outcome)
            return outcome
        start = time.perf_counter()
        new = decision.new
        # At most two buffers per distinct layer shape (the layer moving and the one committing),
        # reused across layers, freed at the end.
        pool = StagingPool()
        tally = Tally()
        committed: list[int] = []
        changed = changed_layers(layers, old, new, self.num_ranks)
        device = device_of(changed)
        stream = start_event = None
        if device.type == "cuda":
            # Transfers on a side stream, commits on the current one: layer i+1 moves while layer i
            # is copied into its slots. The side stream first waits for the work queued so far.
            if self._stream is None or self._stream.device != device:
                self._stream = torch.cuda.Stream(device)
            stream = self._stream
            start_event = torch.cuda.Event()
            start_event.record(torch.cuda.current_stream(device))

        def finish() -> StepOutcome:  # inside the last commit's critical section
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            report = tally.report(time.perf_counter() - start)
            self.last_report = report
            outcome = StepOutcome(committed=tuple(committed), placement=placement_of(changed, old), report=report,
                                  decision=decision)
            settle(outcome)
            return outcome

        waiting = None  # staged, not yet committed
        for layer in changed:
            try:
                staged = stage_layer(layer, old, new, rank=self.rank, num_ranks=self.num_ranks,
                                     transfer=self._communicate, pool=pool, stream=stream, start_event=start_event)
            except CommunicationError as exc:
                raise self._lost(f"the weight transfer of layer {layer.layer_index} of a sync rebalance", exc) from exc
            tally.add(staged.plan, layer.slot_tensors())
            if waiting is not None:
                self._commit(waiting, pool, committed)
            waiting = staged
        if waiting is None:
            with critical_section():
                outcome = finish()
        else:
            outcome = self._commit(waiting, pool, committed, finish)
        if self.rank == 0:
            report = outcome.report
            logger.info(
                "rebalance done: %d layers, %d slots changed, %d network transfers (%.1f MiB), "
                "%d local copies, %.3f s",
                report.layers,
                report.slots_changed,
                report.network_transfers,
                report.bytes_moved / 2**20,
                report.local_copies,
                report.seconds,
            )
        return outcome

    def _commit(self, staged: StagedLayer, pool: StagingPool, committed: list[int],
                finish: Callable[[], StepOutcome] | None = None) -> StepOutcome | None:
        """The commit agreement of ``staged``'s layer and, when every rank agreed, its commit (and
        ``finish`` after the last layer), in one critical section: on every rank or on none."""
        with critical_section():
            if self._agree is not None:
                try:
                    self._agree(Flags(ready=1))
                except PeerLost as exc:
                    raise self._lost(
                        f"the commit agreement of layer {staged.layer.layer_index} of a sync rebalance",
                        exc.__cause__ or exc, exc.who,
                    ) from exc.__cause__
            committed.append(commit_staged(staged, pool))
            return finish() if finish is not None else None

    def _lost(self, operation: str, cause: BaseException, who: str | None = None) -> EPLBError:
        """The `EPLBError` of a failed transfer or agreement (``health`` marked broken: a gloo
        group whose collective failed is closed on every rank, and eplb rebuilds it)."""
        if who is None and self.health is not None:
            who = self.health.describe(self.health.lost())
        return peer_failure(f"rank {self.rank}: {operation}", step=None, rank=None, cause=cause, who=who)

    def rebalance(self, layers: list, old: Placement, new: Placement) -> RebalanceReport:
        """Move from placement ``old`` to ``new`` at once: `begin` with ``new`` decided, then `drain`.

        Args:
            layers: the layers (`eplb.moe.SlotLayer`); ``layer.layer_index`` selects its row.
            old: ``[L, P]`` placement the layers hold now.
            new: ``[L, P]`` placement to apply.

        Returns:
            A `RebalanceReport`.
        """
        self.begin(layers, old, lambda: Decision.move_to(new))
        return self.drain().report

    def close(self) -> None:
        """Forget a rebalance begun and not drained."""
        self._pending = None

    def abandon(self) -> None:
        """Forget a rebalance begun and not drained (after a lost peer)."""
        self._pending = None

    def replace_groups(self, control_group, communicator: Communicator) -> None:
        """Use a rebuilt control group and communicator from now on (after a lost peer)."""
        self.communicator = communicator
        if control_group is not None:
            self._agree = Agreement(control_group, self.num_ranks, self.health)

    def stop_with(self, owner: object) -> None:
        """Nothing runs in the background: nothing to stop."""

    def _communicate(self, layer, plan, slot_tensors, staging) -> None:
        execute_layer_transfer(plan, slot_tensors, staging, self.communicator, self.max_transfer_bytes)
