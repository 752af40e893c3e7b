"""`AsyncExecutor`: plan and move on a background thread (and a side CUDA stream); commit ready
layers (each in one commit) at step boundaries.

Legend: L layers, P physical slots, G ranks, S = P // G slots on this rank.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

from eplb.atomic import critical_section
from eplb.comm.base import CommunicationError, Communicator
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

__all__ = ["AsyncExecutor"]

logger = logging.getLogger("eplb")


class _Job:
    """Shared state of one in-flight async rebalance (worker writes, main thread reads)."""

    def __init__(self, layers: list, old: Placement, decide: Callable[[], Decision], num_buffers: int,
                 communicator: Communicator):
        self.layers = layers
        self.communicator = communicator  # this job's: a rebuild after a lost peer gives later jobs a new one
        self.old = old
        self.decide = decide
        self.cond = threading.Condition()
        self.decision: Decision | None = None
        self.new: Placement | None = None
        self.planned = False  # decision known (possibly "skip")
        self.total = 0  # layers that change
        self.staged: list[StagedLayer] = []  # in commit order; len() = layers ready here
        self.error: BaseException | None = None
        self.error_tb = ""
        self.abort = False
        self.go = False  # set once every rank has planned: transfers need every peer
        self.pool = StagingPool(num_buffers, self.cond, stopped=lambda: self.abort)
        self.tally = Tally()  # of the layers staged so far
        self.started = time.perf_counter()
        self.start_event: torch.cuda.Event | None = None

    def stop(self) -> None:
        """Tell the worker to stop (it leaves at its next check; a transfer in progress ends first).

        The main thread takes the job's lock only inside a critical section: a Ctrl-C between
        acquiring a lock and the ``with`` block that releases it would leave the worker waiting
        on that lock forever."""
        with critical_section(), self.cond:
            self.abort = True
            self.cond.notify_all()


class AsyncExecutor:
    """Rebalance in the background; commit the layers every rank has ready at step boundaries.

    Follows `eplb.executor.Executor`. Flow of one rebalance (see docs/concepts/sync-vs-async.md):

    1. `begin` (main thread) hands ``decide`` (runs the planner on an all-reduced load
       snapshot) to a worker thread and returns at once.
    2. The worker decides, then for each layer that changes stages it (`eplb.executor.staging`:
       transfer plan, weights into a staging buffer through the communicator — on its own CUDA
       stream when the weights are on CUDA — prepared commit, event) and marks it ready.
    3. `on_step` (main thread, once per step, on every rank) agrees on a few integers over a
       dedicated gloo group (`eplb.executor.agreement`): layers ready on every rank (MIN), error
       and timeout flags (MAX). It commits the layers ready everywhere (at most ``layers_per_step``; None: all): the
       main stream waits on the layer's event (the host does not), then the layer applies its
       prepared commit in place. The staging buffer goes back to the worker, ordered by an event.

    Faults: an exception on any rank's worker aborts the rebalance on every rank at the same step
    (``on_error="raise"`` raises `EPLBError` with the traceback on the rank that failed and names
    that rank on the others; ``"log"`` logs it). A worker that owes its plan, or its next layer
    once transfers may start, for ``timeout_s`` on some rank aborts on all ranks (time the main
    thread spends between steps does not count against the worker). A rank that dies makes the
    agreement fail within ``timeout_s`` (the control group is created with that timeout):
    `EPLBError`, and ``health`` (an `eplb.comm.recovery.GroupHealth`) is marked broken, as on every
    rank when a worker's transfer failed; the owner then calls `abandon` and `replace_groups`
    once every rank is back. Layers already committed keep the new placement, the others the old
    one; both are valid.

    ``transfer_fn(layer, plan, slot_tensors, staging)`` replaces the communicator step that fills
    ``staging`` (benchmarks use it to stage from host copies on one GPU); it runs on the worker's
    stream.
    """

    def __init__(
        self,
        *,
        rank: int,
        num_ranks: int,
        communicator: Communicator,
        max_transfer_bytes: int,
        timeout_s: float,
        layers_per_step: int | None = None,
        on_error: str = "log",
        control_group: dist.ProcessGroup | None = None,
        num_buffers: int = 2,
        transfer_fn: Callable | None = None,
        health=None,
    ):
        if num_ranks > 1 and control_group is None:
            raise EPLBError("AsyncExecutor with several ranks needs a gloo control_group")
        if (layers_per_step is not None and layers_per_step <= 0) or num_buffers <= 0 or timeout_s <= 0:
            raise EPLBError(
                f"layers_per_step ({layers_per_step}), num_buffers ({num_buffers}) and timeout_s "
                f"({timeout_s}) must be > 0"
            )
        if on_error not in ("log", "raise"):
            raise EPLBError(f"on_error ({on_error!r}) must be 'log' or 'raise'")
        self.rank, self.num_ranks = rank, num_ranks
        self.communicator = communicator
        self.max_transfer_bytes = max_transfer_bytes
        self.timeout_s = timeout_s
        # None: every layer ready on every rank (commits are device copies; the pool bounds them).
        self.layers_per_step = layers_per_step if layers_per_step is not None else float("inf")
        self.on_error = on_error
        self.control_group = control_group
        self.num_buffers = num_buffers
        self.health = health
        self._agree = Agreement(control_group, num_ranks, health)
        self._transfer = transfer_fn or self._communicate
        # Set by a worker whose transfer failed (its job perhaps aborted already): the transfer
        # group's connections are closed. Raised in the next agreement; cleared by replace_groups.
        self._transfer_lost = False
        self._job: _Job | None = None
        self._thread: threading.Thread | None = None
        # The in-flight job and the latest worker, for the exit hooks (they must not hold a reference
        # to self). The job is dropped once finished or aborted: it holds the staging buffers.
        self._live: dict = {}
        # At exit, wait until the worker left its torch calls: a transfer ends within timeout_s.
        weakref.finalize(self, _stop_worker, self._live, min(timeout_s + 1.0, EXIT_JOIN_CAP_S))
        self._stream: torch.cuda.Stream | None = None
        self._committed = 0
        self._last_progress = 0.0
        self.last_report: RebalanceReport | None = None
        self.steps_in_flight = 0  # forward steps that ran while the last rebalance was in flight

    # ------------------------------------------------------------------ main thread
    @property
    def in_flight(self) -> bool:
        """True between `begin` and the step that finishes, skips or aborts the rebalance."""
        return self._job is not None

    def begin(self, layers: list, old: Placement, decide: Callable[[], Decision]) -> None:
        """Begin a rebalance from ``old``; returns at once.

        Args:
            layers: the layers (`eplb.moe.SlotLayer`; ``layer.layer_index`` selects a placement row).
            old: the committed ``[L, P]`` placement.
            decide: called on the worker; returns the `eplb.planner.Decision`.
        """
        if self._job is not None:
            raise EPLBError("a rebalance is already in flight; call synchronize() first")
        # An aborted rebalance's worker may still wait on a transfer (its communicator calls time
        # out within timeout_s), and two workers must never talk on one communicator. A rank whose
        # worker is still busy says so through the control group and every rank skips this
        # rebalance at the same step (never one rank alone, which would desynchronise the ranks).
        busy = self._thread is not None and (self._thread.join(0.05) or self._thread.is_alive())
        try:
            flags = self._agree(Flags(busy_rank=self.rank + 1 if busy else 0,
                                      transfer_failed=int(self._transfer_lost)))
        except PeerLost as exc:
            raise self._peer_lost("the agreement that begins a rebalance", exc) from exc.__cause__
        if flags.transfer_failed and not flags.busy_rank:
            if self.health is not None:
                self.health.broken = True  # every rank at this step: rebuilt at the next forward
            reason = ("a weight transfer of the previous rebalance failed, which closed the transfer group; every "
                      "rank skips this rebalance and eplb rebuilds its groups at the next forward")
            self.last_report = RebalanceReport.skip(reason)
            if self.rank == 0:
                logger.warning("%s", reason)
            return
        if flags.busy_rank:
            reason = (
                f"the previous rebalance's worker on rank {flags.busy_rank - 1} is still busy (an aborted "
                f"transfer waits out async_timeout_s, {self.timeout_s} s); every rank skips this rebalance"
            )
            self.last_report = RebalanceReport.skip(reason)
            if self.rank == 0:
                logger.warning("%s", reason)
            return
        job = _Job(layers, old, decide, self.num_buffers, self.communicator)
        device = device_of(layers)
        if device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            # Transfers read the slots: order them after everything already queued on the main stream.
            job.start_event = torch.cuda.Event()
            job.start_event.record(torch.cuda.current_stream(device))
        thread = threading.Thread(target=self._work, args=(job,), name="eplb-async-rebalance", daemon=True)
        # Atomic under Ctrl-C: never a job "in flight" without its worker.
        with critical_section():
            self._job = job
            self._committed = 0
            self._last_progress = time.monotonic()
            self.steps_in_flight = 0
            self._thread = thread
            self._live.update(job=job, thread=thread)
            thread.start()

    def on_step(self, settle: Settle | None = None) -> StepOutcome:
        """Commit what every rank has ready; finish or abort the rebalance when due. Call once per step.

        ``settle(outcome)`` (optional) runs inside the critical section that decided the outcome
        (see `eplb.executor.Executor`): an interrupt never separates a commit or a finish from the
        owner's bookkeeping of it."""
        if self._job is not None:
            self.steps_in_flight += 1
        return self._advance(settle or ignore_outcome)

    def drain(self, settle: Settle | None = None) -> StepOutcome:
        """Drive the in-flight rebalance to its end (blocking); collective like `on_step`, and
        ``settle`` is called as there, once per step boundary that did something."""
        settle = settle or ignore_outcome
        outcome = StepOutcome()
        committed: list[int] = []
        placement = None
        while self._job is not None:
            outcome = self._advance(settle)  # not a forward step: steps_in_flight stays
            committed.extend(outcome.committed)
            placement = outcome.placement or placement
            if self._job is not None and not outcome.committed:
                time.sleep(0.001)
        return StepOutcome(committed=tuple(committed), placement=placement, report=outcome.report,
                           decision=outcome.decision)

    def stop_with(self, owner: object) -> None:
        """Abort the in-flight rebalance, without waiting, once ``owner`` is garbage-collected: an
        owner dropped without `close` must not leave the worker (and the layers its job holds) behind."""
        weakref.finalize(owner, _stop_worker, self._live, 0.0).atexit = False

    def abandon(self) -> None:
        """Forget the in-flight rebalance on this rank, without a collective and without waiting:
        after a lost peer, before `replace_groups`. Its worker keeps its job's communicator and
        leaves within ``timeout_s``; until then the next `begin` skips on every rank (busy)."""
        if self._job is not None:
            self._drop_job()

    def replace_groups(self, control_group: dist.ProcessGroup, communicator: Communicator) -> None:
        """Use a rebuilt control group and communicator from now on (after `abandon`; every rank
        at the same step). A worker still running keeps the old communicator."""
        self.control_group = control_group
        self._agree = Agreement(control_group, self.num_ranks, self.health)
        self.communicator = communicator
        self._transfer_lost = False

    def close(self) -> None:
        """Abort an in-flight rebalance locally and join the worker (bounded by ``timeout_s``)."""
        if self._job is not None:
            self._drop_job()
        if self._thread is not None:
            self._thread.join(self.timeout_s)
            self._thread = None

    # ------------------------------------------------------------------ internals (main thread)
    def _peer_lost(self, operation: str, exc: PeerLost) -> EPLBError:
        return peer_failure(f"rank {self.rank}: {operation}", step=None, rank=None, cause=exc.__cause__ or exc,
                            who=exc.who)

    def _advance(self, settle: Settle) -> StepOutcome:
        job = self._job
        if job is None:
            return StepOutcome()
        with critical_section(), job.cond:
            ready, planned = len(job.staged), job.planned
            failed = job.error is not None
            transfer_failed = isinstance(job.error, CommunicationError) or self._transfer_lost
        # The clock runs only while this rank's worker owes the next piece of work (the plan, or
        # the next layer once it may transfer): time the main thread spends away from the step
        # boundaries (an idle server, a pause before synchronize()) is no stall of the worker.
        owed = not planned or (job.go and job.new is not None and ready <= self._committed < job.total)
        stalled = owed and time.monotonic() - self._last_progress > self.timeout_s
        mine = Flags(failed_rank=self.rank + 1 if failed else 0, timed_out=int(stalled), ready=ready,
                     planned=int(planned), transfer_failed=int(transfer_failed))
        # The agreement, what it decides (commits, finish, abort) and the owner's bookkeeping of it
        # (settle: placement, report, counters) form one section under Ctrl-C: a rank interrupted
        # after agreeing but before committing would hold other layers than its peers (a mixed
        # placement that may lack a logical expert on every rank), and one interrupted before its
        # bookkeeping would count other rebalances than its peers. The hold costs nothing: a Ctrl-C
        # cannot cut the all-reduce itself (Python runs its handler only once the gloo call
        # returns), and the commits after it are in-place copies.
        with critical_section():
            try:
                flags = self._agree(mine)
            except PeerLost as exc:
                return self._abort(job, peer_lost=exc)
            outcome = self._decided(job, flags)
            settle(outcome)
            return outcome

    def _decided(self, job: _Job, flags: Flags) -> StepOutcome:
        """Carry out the group's ``flags`` for ``job`` on this rank (inside `_advance`'s section)."""
        if flags.transfer_failed and self.health is not None:
            self.health.broken = True  # every rank at this step: the transfer group is closed
        if flags.failed_rank:
            return self._abort(job, failed_rank=flags.failed_rank - 1)
        if flags.timed_out:
            return self._abort(job, timed_out=True)
        if flags.planned and not job.go:
            # Every rank planned without error: the workers may start exchanging weights. Before
            # this, a rank whose planning failed would leave its peers blocked in a transfer.
            with critical_section(), job.cond:
                job.go = True
                job.cond.notify_all()
            self._last_progress = time.monotonic()  # the worker's time for the first layer starts now
        committed: list[int] = []
        while self._committed < flags.ready and len(committed) < self.layers_per_step:
            with critical_section():  # a layer committed is a layer counted (never committed twice)
                committed.append(commit_staged(job.staged[self._committed], job.pool))
                self._committed += 1
        if committed:
            self._last_progress = time.monotonic()
        if flags.planned and job.new is None:
            return self._finish(job, committed, skipped=True)
        if flags.planned and self._committed == job.total:
            return self._finish(job, committed)
        placement = self._placement(job) if committed else None
        return StepOutcome(committed=tuple(committed), placement=placement)

    def _placement(self, job: _Job) -> Placement:
        """The placement the layers hold now: ``old`` with the rows of the layers committed so far,
        read back from those layers."""
        return placement_of([staged.layer for staged in job.staged[: self._committed]], job.old)

    def _drop_job(self) -> None:
        """Stop the worker of the in-flight job and forget the job (it holds the staging buffers)."""
        job = self._job
        self._job = None
        self._live.pop("job", None)
        if job is not None:
            job.stop()

    def _finish(self, job: _Job, committed: list[int], skipped: bool = False) -> StepOutcome:
        self._job = None
        self._live.pop("job", None)
        if self._thread is not None:
            self._thread.join(self.timeout_s)
            self._thread = None
        # Every changed layer was staged (and committed) by now; a skipped job staged none.
        decision = job.decision
        report = job.tally.report(time.perf_counter() - job.started, skipped=skipped,
                                  reason=decision.skip_reason if skipped else "")
        self.last_report = report
        if self.rank == 0:
            if skipped:
                logger.info("async rebalance skipped: %s", decision.skip_reason)
            else:
                logger.info(
                    "async rebalance done: %d layers, %d slots changed, %d network transfers (%.1f MiB), "
                    "%d local copies, %.3f s, %d steps ran meanwhile",
                    report.layers, report.slots_changed, report.network_transfers, report.bytes_moved / 2**20,
                    report.local_copies, report.seconds, self.steps_in_flight,
                )
        return StepOutcome(committed=tuple(committed), placement=self._placement(job),
                           report=report, decision=decision)

    def _abort(self, job: _Job, *, failed_rank: int | None = None, timed_out: bool = False,
               peer_lost: PeerLost | None = None) -> StepOutcome:
        """The one abort path: stop the worker, drop the job, report (or raise) why."""
        self._drop_job()
        if peer_lost is not None:
            who = peer_lost.who or "the other ranks did not answer"
            raise EPLBError(
                f"rank {self.rank}: the step agreement of an async rebalance failed: {who}, within async_timeout_s "
                f"({self.timeout_s} s) ({peer_lost}); async rebalance aborted. Committed layers keep the new "
                "placement, the others the old one; eplb rebuilds its groups at the next forward or rebalance "
                "once every rank is back"
            ) from peer_lost.__cause__
        if timed_out:
            reason = (
                f"a layer was not ready on every rank within async_timeout_s ({self.timeout_s} s); "
                f"{self._committed} of {job.total} layers were committed"
            )
        elif failed_rank == self.rank:
            reason = f"the worker on rank {self.rank} failed:\n{job.error_tb}"
        else:
            reason = f"the worker on rank {failed_rank} failed (its log has the traceback)"
        report = RebalanceReport.skip(
            f"aborted: {reason}", layers=self._committed, seconds=time.perf_counter() - job.started
        )
        self.last_report = report
        message = (
            f"async rebalance aborted: {reason}. Committed layers keep the new placement, the others "
            "the old one; the next rebalance starts from that placement"
        )
        if self.on_error == "raise" and not timed_out:
            raise EPLBError(message) from (job.error if failed_rank == self.rank else None)
        logger.error("%s", message)
        return StepOutcome(placement=self._placement(job), report=report, decision=job.decision)

    # ------------------------------------------------------------------ worker thread
    def _work(self, job: _Job) -> None:
        if self._stream is not None:
            # A new thread starts on cuda:0; without this, leaving the stream context would
            # create a stray CUDA context on GPU 0 in every rank but rank 0.
            torch.cuda.set_device(self._stream.device)
        try:
            decision = job.decide()
            new = decision.new
            changed = changed_layers(job.layers, job.old, new, self.num_ranks) if new is not None else []
            with job.cond:
                job.decision = decision
                job.new = new
                job.total = len(changed)
                # decide may hold the caller (the wrapper, hence the model): drop it, so a wrapper
                # dropped mid-flight can be collected and its finaliser stop this worker.
                job.decide = None
                job.planned = True
                job.cond.notify_all()
                while not (job.go or job.abort):
                    job.cond.wait(0.1)
                if job.abort:
                    return
            transfer = self._transfer
            if transfer == self._communicate:  # the job's communicator: a rebuild gives later jobs a new one
                transfer = partial(_communicate, job.communicator, self.max_transfer_bytes)
            for layer in changed:
                staged = stage_layer(layer, job.old, new, rank=self.rank, num_ranks=self.num_ranks,
                                     transfer=transfer, pool=job.pool, stream=self._stream,
                                     start_event=job.start_event)
                if staged is None:
                    return  # aborted
                with job.cond:
                    if job.abort:
                        return
                    job.tally.add(staged.plan, layer.slot_tensors())
                    job.staged.append(staged)
                    job.cond.notify_all()
        except BaseException as exc:  # surfaced on the main thread by on_step; never swallowed
            if isinstance(exc, CommunicationError) and job.communicator is self.communicator:
                self._transfer_lost = True  # (a failure on a communicator already replaced is old news)
            with job.cond:
                job.error = exc
                job.error_tb = traceback.format_exc()
                job.cond.notify_all()
            logger.debug("async worker failed on rank %d", self.rank, exc_info=True)

    def _communicate(self, layer, plan, slot_tensors, staging) -> None:
        _communicate(self.communicator, self.max_transfer_bytes, layer, plan, slot_tensors, staging)


def _communicate(communicator: Communicator, max_transfer_bytes: int, layer, plan, slot_tensors, staging) -> None:
    execute_layer_transfer(plan, slot_tensors, staging, communicator, max_transfer_bytes)


# At interpreter exit the worker gets this long at most to leave its torch calls: a transfer that
# fails gets out within async_timeout_s (+1 s), but an exit must not wait out a 300 s default.
EXIT_JOIN_CAP_S = 30.0


def _stop_worker(live: dict, join_s: float) -> None:
    """At interpreter exit (or when the executor is collected): abort the job and wait up to
    ``join_s`` for the worker to leave its torch calls. A daemon thread still inside one when the
    interpreter finalises is killed inside C++ ("terminate called without an active exception")."""
    job, thread = live.get("job"), live.get("thread")
    if job is not None:
        job.stop()
    if thread is not None and thread is not threading.current_thread():
        thread.join(join_s)

