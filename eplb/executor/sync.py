"""`SyncExecutor`: rebalance every layer at once, blocking (a rebalance is ``begin`` + ``drain``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from eplb.comm.base import Communicator
from eplb.errors import EPLBError
from eplb.executor.report import RebalanceReport, StepOutcome, Tally
from eplb.executor.staging import StagingPool, changed_layers, commit_staged, device_of, placement_of, stage_layer
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

    Follows `eplb.executor.Executor`: `begin` only records the work, `drain` does it (`on_step`
    drains work begun and not drained). On CUDA the transfers run on a side stream and the
    commits on the current stream, so layer i+1 moves while layer i is committed; staging holds
    at most two layers at once. Every rank of the group must call them with the same
    placements and layers in the same order. A layer is committed (weights and maps together)
    only once its weights are all in staging; if a transfer fails, the layers not yet committed
    keep their old placement and the error propagates (``layer.placement_row()`` tells which
    placement each layer holds).
    """

    def __init__(self, *, rank: int, num_ranks: int, communicator: Communicator, max_transfer_bytes: int):
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

    def on_step(self) -> StepOutcome:
        """Drain the rebalance begun, if any."""
        return self.drain()

    def drain(self) -> StepOutcome:
        """Decide, then move and commit every layer that changes; blocks until done.

        Returns:
            A `StepOutcome` with the committed layers, the placement read back from the layers,
            the `RebalanceReport` and the `eplb.planner.Decision` (empty when nothing was begun).
        """
        if self._pending is None:
            return StepOutcome()
        layers, old, decide = self._pending
        self._pending = None
        decision = decide()
        if decision.new is None:
            report = RebalanceReport.skip(decision.skip_reason)
            if self.rank == 0:
                logger.info("rebalance skipped: %s", decision.skip_reason)
            self.last_report = report
            return StepOutcome(report=report, decision=decision)
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
        waiting = None  # staged, not yet committed
        for layer in changed:
            staged = stage_layer(layer, old, new, rank=self.rank, num_ranks=self.num_ranks,
                                 transfer=self._communicate, pool=pool, stream=stream, start_event=start_event)
            tally.add(staged.plan, layer.slot_tensors())
            if waiting is not None:
                committed.append(commit_staged(waiting, pool))
            waiting = staged
        if waiting is not None:
            committed.append(commit_staged(waiting, pool))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report = tally.report(time.perf_counter() - start)
        self.last_report = report
        if self.rank == 0:
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
        return StepOutcome(committed=tuple(committed), placement=placement_of(changed, old), report=report,
                           decision=decision)

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
        """Use a rebuilt communicator from now on (after a lost peer; no control group here)."""
        self.communicator = communicator

    def stop_with(self, owner: object) -> None:
        """Nothing runs in the background: nothing to stop."""

    def _communicate(self, layer, plan, slot_tensors, staging) -> None:
        execute_layer_transfer(plan, slot_tensors, staging, self.communicator, self.max_transfer_bytes)
