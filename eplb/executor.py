"""Executors: apply a new placement to the expert layers, moving weights between ranks.

`SyncExecutor` moves every layer at once and blocks; `AsyncExecutor` plans and moves on a
background thread (and a side CUDA stream) and commits one layer at a time at step boundaries.

Legend: L layers, P physical slots, G ranks, S = P // G slots per rank.

A layer here is anything with the `eplb.moe.layer.EPLBExperts` contract: ``layer_index``,
``slot_tensors() -> {name: [S, ...]}`` and ``commit(phy2log_P, staged, slots)``.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from eplb.comm.base import Communicator
from eplb.errors import EPLBError
from eplb.placement import Placement
from eplb.transfer import bytes_per_expert, execute_layer_transfer, plan_layer_transfer

__all__ = ["RebalanceReport", "SyncExecutor", "AsyncExecutor", "StepOutcome"]

logger = logging.getLogger("eplb")


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
class _Tally:
    """Running totals of the layers of one rebalance (over all ranks, as the plans count them)."""

    layers: int = 0
    slots_changed: int = 0
    network_transfers: int = 0
    local_copies: int = 0
    bytes_moved: int = 0

    def add(self, plan, slot_tensors: dict[str, torch.Tensor]) -> None:
        self.layers += 1
        self.slots_changed += plan.num_changed_slots
        self.network_transfers += plan.num_network_transfers
        self.local_copies += plan.num_local_copies
        self.bytes_moved += plan.bytes_moved(bytes_per_expert(slot_tensors))

    def report(self, seconds: float, *, skipped: bool = False, reason: str = "") -> RebalanceReport:
        return RebalanceReport(**asdict(self), seconds=seconds, skipped=skipped, reason=reason)


class SyncExecutor:
    """Rebalance all layers at once, blocking until every layer is committed.

    Args:
        rank: this rank in the EP group.
        num_ranks: ``G``.
        communicator: moves weights between the ranks (see `eplb.comm.select_communicator`).
        max_transfer_bytes: per-rank bound of one exchange batch.

    Every rank of the group must call `rebalance` with the same placements and layers in the
    same order. A layer is committed (weights and maps together) only once its weights are all
    in staging; if a transfer fails, the layers not yet committed keep their old placement and
    the error propagates (``layer.placement_row()`` tells which placement each layer holds).
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

    def rebalance(self, layers: list, old: Placement, new: Placement) -> RebalanceReport:
        """Move from placement ``old`` to ``new``.

        Args:
            layers: the expert layers; ``layer.layer_index`` selects its row of the placements.
            old: ``[L, P]`` placement the layers hold now.
            new: ``[L, P]`` placement to apply.

        Returns:
            A `RebalanceReport`.
        """
        start = time.perf_counter()
        if old.phy2log.shape != new.phy2log.shape:
            raise EPLBError(
                f"old and new placements differ in shape ({tuple(old.phy2log.shape)} vs "
                f"{tuple(new.phy2log.shape)}); a rebalance keeps num_layers and num_physical"
            )
        S = new.slots_per_rank(self.num_ranks)
        staging_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        device = None
        tally = _Tally()
        for layer in layers:
            i = layer.layer_index
            if not 0 <= i < old.num_layers:
                raise EPLBError(f"layer_index ({i}) is outside the placement's {old.num_layers} layers")
            old_row, new_row = old.phy2log[i], new.phy2log[i]
            if torch.equal(old_row, new_row):
                continue
            plan = plan_layer_transfer(old_row, new_row, rank=self.rank, num_ranks=self.num_ranks)
            slot_tensors = layer.slot_tensors()
            for name, t in slot_tensors.items():
                if t.shape[0] != S:
                    raise EPLBError(
                        f"layer {i}: slot tensor {name!r} has {t.shape[0]} slots but the placement gives "
                        f"this rank {S} (num_physical {new.num_physical} / {self.num_ranks} ranks)"
                    )
            # One staging buffer per distinct layer shape, reused across layers, freed at the end.
            key = _shape_key(slot_tensors)
            if key not in staging_cache:
                staging_cache[key] = {n: torch.empty_like(t) for n, t in slot_tensors.items()}
            staging = staging_cache[key]
            execute_layer_transfer(plan, slot_tensors, staging, self.communicator, self.max_transfer_bytes)
            layer.commit(new_row, staging, torch.tensor(plan.changed_local, dtype=torch.int64))
            device = next(iter(slot_tensors.values())).device if slot_tensors else device
            tally.add(plan, slot_tensors)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        report = tally.report(time.perf_counter() - start)
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
        return report


# ----------------------------------------------------------------------------- async


@dataclass
class _StagedLayer:
    layer: object
    row: torch.Tensor  # [P] new phy2log row
    slots: torch.Tensor  # [n] local slot ids the commit writes
    buffer: _StagingBuffer
    ready_event: torch.cuda.Event | None
    prepared: object | None = None  # layer.prepare_commit(...) result, when the layer has one


class _StagingBuffer:
    """One layer's staging tensors ``{name: [S, ...]}``; reused across layers of the same shape.

    ``free_event`` is recorded on the main stream after the commit that read it, and the worker's
    stream waits on it before writing the buffer again: the reuse is ordered on the device, the
    host never waits for it.
    """

    def __init__(self, slot_tensors: dict[str, torch.Tensor]):
        self.key = _shape_key(slot_tensors)
        self.tensors = {n: torch.empty_like(t) for n, t in slot_tensors.items()}
        self.free_event: torch.cuda.Event | None = None


def _shape_key(slot_tensors: dict[str, torch.Tensor]) -> tuple:
    return tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in sorted(slot_tensors.items()))


class _Job:
    """Shared state of one in-flight async rebalance (worker writes, main thread reads)."""

    def __init__(self, layers: list, old: Placement, plan_fn: Callable[[], Placement | None]):
        self.layers = layers
        self.old = old
        self.plan_fn = plan_fn
        self.cond = threading.Condition()
        self.new: Placement | None = None
        self.planned = False  # plan known (possibly "skip")
        self.skip_reason = ""
        self.total = 0  # layers that change
        self.staged: list[_StagedLayer] = []  # in commit order; len() = layers ready here
        self.error: BaseException | None = None
        self.error_tb = ""
        self.abort = False
        self.go = False  # set once every rank has planned: transfers need every peer
        self.free_buffers: list[_StagingBuffer] = []
        self.num_buffers = 0
        self.tally = _Tally()  # of the layers staged so far
        self.started = time.perf_counter()


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """What `AsyncExecutor.on_step` did at one step boundary.

    Attributes:
        committed: layer indices committed at this step (model order).
        placement: the placement now committed (mixed old/new while in flight), or None if unchanged.
        report: set when the rebalance finished, was skipped or aborted at this step.
    """

    committed: tuple[int, ...] = ()
    placement: Placement | None = None
    report: RebalanceReport | None = None


class AsyncExecutor:
    """Rebalance in the background; commit one layer at a time at step boundaries.

    Flow of one rebalance (see docs/concepts/sync-vs-async.md):

    1. `start` (main thread) hands ``plan_fn`` (runs the policy on an all-reduced load snapshot)
       to a worker thread and returns at once.
    2. The worker plans, then for each layer that changes builds the transfer plan and moves the
       weights through the communicator into a staging buffer — on its own CUDA stream when the
       weights are on CUDA — records an event, and marks the layer ready.
    3. `on_step` (main thread, once per step, on every rank) all-reduces a few integers on a
       dedicated gloo group: layers ready on every rank (MIN), error and timeout flags (MAX). It
       commits up to ``layers_per_step`` layers ready everywhere: the main stream waits on the
       layer's event (the host does not), then ``layer.commit`` copies staging into the slots and
       updates the maps in place. The staging buffer goes back to the worker, ordered by an event.

    Faults: an exception on any rank's worker aborts the rebalance on every rank at the same step
    (``on_error="raise"`` raises `EPLBError` with the traceback on the rank that failed and names
    that rank on the others; ``"log"`` logs it). A worker that owes its plan, or its next layer
    once transfers may start, for ``timeout_s`` on some rank aborts on all ranks (time the main
    thread spends between steps does not count against the worker). A rank that dies makes the
    all-reduce fail within ``timeout_s`` (the control group is created with that timeout):
    `EPLBError`. Layers already committed keep the new placement, the others the old one; both
    are valid.

    Every rank must call `start`, `on_step`, `synchronize` and `close` at the same steps.

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
        layers_per_step: int = 1,
        on_error: str = "log",
        control_group: dist.ProcessGroup | None = None,
        num_buffers: int = 2,
        transfer_fn: Callable | None = None,
    ):
        if num_ranks > 1 and control_group is None:
            raise EPLBError("AsyncExecutor with several ranks needs a gloo control_group")
        if layers_per_step <= 0 or num_buffers <= 0 or timeout_s <= 0:
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
        self.layers_per_step = layers_per_step
        self.on_error = on_error
        self.control_group = control_group
        self.num_buffers = num_buffers
        self._transfer = transfer_fn or self._communicate
        self._job: _Job | None = None
        self._thread: threading.Thread | None = None
        # The in-flight job and the latest worker, for the exit hooks (they must not hold a reference
        # to self). The job is dropped once finished or aborted: it holds the staging buffers.
        self._live: dict = {}
        weakref.finalize(self, _stop_worker, self._live)
        self._stream: torch.cuda.Stream | None = None
        self._committed = 0
        self._placement: Placement | None = None
        self._last_progress = 0.0
        self.last_report: RebalanceReport | None = None
        self.steps_in_flight = 0  # forward steps that ran while the last rebalance was in flight

    # ------------------------------------------------------------------ main thread
    @property
    def in_flight(self) -> bool:
        """True between `start` and the step that finishes, skips or aborts the rebalance."""
        return self._job is not None

    def start(self, layers: list, old: Placement, plan_fn: Callable[[], Placement | None]) -> None:
        """Begin a rebalance from ``old``; returns at once.

        Args:
            layers: the expert layers (``layer.layer_index`` selects a placement row).
            old: the committed ``[L, P]`` placement.
            plan_fn: called on the worker; returns the new placement, or None to skip.
        """
        if self._job is not None:
            raise EPLBError("a rebalance is already in flight; call synchronize() first")
        if self._thread is not None and self._thread.is_alive():
            # An aborted rebalance's worker may still wait on a transfer; its communicator calls
            # time out within timeout_s. Never let two workers talk on one communicator.
            self._thread.join(self.timeout_s)
            if self._thread.is_alive():
                raise EPLBError(
                    f"the previous rebalance's worker is still blocked after async_timeout_s "
                    f"({self.timeout_s} s); a rank is probably gone"
                )
        job = _Job(layers, old, plan_fn)
        device = _device_of(layers)
        if device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            # Transfers read the slots: order them after everything already queued on the main stream.
            job.start_event = torch.cuda.Event()
            job.start_event.record(torch.cuda.current_stream(device))
        self._job = job
        self._committed = 0
        self._placement = old
        self._last_progress = time.monotonic()
        self.steps_in_flight = 0
        self._thread = threading.Thread(
            target=self._work, args=(job,), name="eplb-async-rebalance", daemon=True
        )
        self._thread.start()
        self._live.update(job=job, thread=self._thread)

    def on_step(self) -> StepOutcome:
        """Commit what every rank has ready; finish or abort the rebalance when due. Call once per step."""
        if self._job is not None:
            self.steps_in_flight += 1
        return self._advance()

    def _advance(self) -> StepOutcome:
        job = self._job
        if job is None:
            return StepOutcome()
        with job.cond:
            ready, planned = len(job.staged), job.planned
            failed = job.error is not None
        # The clock runs only while this rank's worker owes the next piece of work (the plan, or
        # the next layer once it may transfer): time the main thread spends away from the step
        # boundaries (an idle server, a pause before synchronize()) is no stall of the worker.
        owed = not planned or (job.go and job.new is not None and ready <= self._committed < job.total)
        stalled = owed and time.monotonic() - self._last_progress > self.timeout_s
        flags = self._agree(
            failed_rank=self.rank + 1 if failed else 0, timed_out=int(stalled), ready=ready,
            planned=int(planned),
        )
        if flags["failed_rank"]:
            return self._abort(job, failed_rank=flags["failed_rank"] - 1)
        if flags["timed_out"]:
            return self._abort(job, timed_out=True)
        if flags["planned"] and not job.go:
            # Every rank planned without error: the workers may start exchanging weights. Before
            # this, a rank whose planning failed would leave its peers blocked in a transfer.
            with job.cond:
                job.go = True
                job.cond.notify_all()
            self._last_progress = time.monotonic()  # the worker's time for the first layer starts now
        committed: list[int] = []
        while self._committed < flags["ready"] and len(committed) < self.layers_per_step:
            committed.append(self._commit_next(job))
        if committed:
            self._last_progress = time.monotonic()
        if flags["planned"] and job.new is None:
            return self._finish(job, committed, skipped=True)
        if flags["planned"] and self._committed == job.total:
            return self._finish(job, committed)
        return StepOutcome(committed=tuple(committed), placement=self._placement if committed else None)

    def synchronize(self) -> StepOutcome:
        """Drive the in-flight rebalance to its end (blocking); collective like `on_step`."""
        outcome = StepOutcome()
        committed: list[int] = []
        while self._job is not None:
            outcome = self._advance()  # not a forward step: steps_in_flight stays
            committed.extend(outcome.committed)
            if self._job is not None and not outcome.committed:
                time.sleep(0.001)
        return StepOutcome(
            committed=tuple(committed), placement=outcome.placement or self._placement, report=outcome.report
        )

    def stop_with(self, owner: object) -> None:
        """Abort the in-flight rebalance, without waiting, once ``owner`` is garbage-collected: an
        owner dropped without `close` must not leave the worker (and the layers its job holds) behind."""
        weakref.finalize(owner, _stop_worker, self._live, 0.0).atexit = False

    def close(self) -> None:
        """Abort an in-flight rebalance locally and join the worker (bounded by ``timeout_s``)."""
        job = self._job
        if job is not None:
            with job.cond:
                job.abort = True
                job.cond.notify_all()
            self._job = None
            self._live.pop("job", None)
        if self._thread is not None:
            self._thread.join(self.timeout_s)
            self._thread = None

    # ------------------------------------------------------------------ internals (main thread)
    def _agree(self, **values: int) -> dict[str, int]:
        """MAX over ranks of failed_rank/timed_out/planned, MIN of ready, in one all-reduce."""
        if self.num_ranks == 1 or self.control_group is None:
            return values
        t = torch.tensor(
            [values["failed_rank"], values["timed_out"], -values["ready"], -values["planned"]],
            dtype=torch.int64,
        )
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        except Exception as exc:  # a peer died or hung: gloo gives up after the group timeout
            job = self._job
            self._job = None
            self._live.pop("job", None)
            if job is not None:
                with job.cond:
                    job.abort = True
                    job.cond.notify_all()
            raise EPLBError(
                f"async rebalance aborted on rank {self.rank}: the other ranks did not answer within "
                f"async_timeout_s ({self.timeout_s} s) ({type(exc).__name__}: {exc}); a rank has probably "
                "died. Committed layers keep the new placement, the others the old one"
            ) from None
        failed, timed_out, neg_ready, neg_planned = t.tolist()
        # MAX of negated values is the MIN: ready and planned must hold on every rank.
        return {"failed_rank": failed, "timed_out": timed_out, "ready": -neg_ready, "planned": -neg_planned}

    def _commit_next(self, job: _Job) -> int:
        staged = job.staged[self._committed]
        if staged.ready_event is not None:
            # The weights' device, not the thread's current one (they differ if the user never
            # called torch.cuda.set_device): the commit must wait on the right stream.
            torch.cuda.current_stream(self._stream.device).wait_event(staged.ready_event)
        if staged.prepared is not None:  # device copies only: no host sync on the main thread
            staged.layer.apply_commit(staged.prepared, staged.buffer.tensors)
        else:
            staged.layer.commit(staged.row, staged.buffer.tensors, staged.slots)
        if staged.ready_event is not None:
            main = torch.cuda.current_stream(self._stream.device)
            staged.buffer.free_event = torch.cuda.Event()
            staged.buffer.free_event.record(main)
            # The buffers belong to the worker's stream; the main stream just read them. Tell the
            # allocator, so their memory is never handed out again before these reads finish.
            for t in staged.buffer.tensors.values():
                t.record_stream(main)
            packed = getattr(staged.prepared, "packed", None)
            if isinstance(packed, torch.Tensor) and packed.is_cuda:
                packed.record_stream(main)
        with job.cond:
            job.free_buffers.append(staged.buffer)
            job.cond.notify_all()
        self._committed += 1
        i = staged.layer.layer_index
        self._placement = self._placement.replace_layer(i, job.new)
        return i

    def _finish(self, job: _Job, committed: list[int], skipped: bool = False) -> StepOutcome:
        self._job = None
        self._live.pop("job", None)
        if self._thread is not None:
            self._thread.join(self.timeout_s)
            self._thread = None
        # Every changed layer was staged (and committed) by now; a skipped job staged none.
        report = job.tally.report(time.perf_counter() - job.started, skipped=skipped, reason=job.skip_reason)
        if not skipped:
            self._placement = job.new
        self.last_report = report
        if self.rank == 0:
            if skipped:
                logger.info("async rebalance skipped: %s", job.skip_reason)
            else:
                logger.info(
                    "async rebalance done: %d layers, %d slots changed, %d network transfers (%.1f MiB), "
                    "%d local copies, %.3f s, %d steps ran meanwhile",
                    report.layers, report.slots_changed, report.network_transfers, report.bytes_moved / 2**20,
                    report.local_copies, report.seconds, self.steps_in_flight,
                )
        return StepOutcome(committed=tuple(committed), placement=self._placement, report=report)

    def _abort(self, job: _Job, *, failed_rank: int | None = None, timed_out: bool = False) -> StepOutcome:
        with job.cond:
            job.abort = True
            job.cond.notify_all()
        self._job = None
        self._live.pop("job", None)
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
        return StepOutcome(placement=self._placement, report=report)

    # ------------------------------------------------------------------ worker thread
    def _work(self, job: _Job) -> None:
        if self._stream is not None:
            # A new thread starts on cuda:0; without this, leaving the stream context would
            # create a stray CUDA context on GPU 0 in every rank but rank 0.
            torch.cuda.set_device(self._stream.device)
        try:
            new = job.plan_fn()
            changed = []
            if new is not None:
                changed = [l for l in job.layers if not torch.equal(job.old.phy2log[l.layer_index],
                                                                    new.phy2log[l.layer_index])]
            with job.cond:
                job.new = new
                job.total = len(changed)
                if new is None:
                    job.skip_reason = getattr(job.plan_fn, "skip_reason", "") or "the plan was skipped"
                # plan_fn may hold the caller (the wrapper, hence the model): drop it, so a wrapper
                # dropped mid-flight can be collected and its finaliser stop this worker.
                job.plan_fn = None
                job.planned = True
                job.cond.notify_all()
                while not (job.go or job.abort):
                    job.cond.wait(0.1)
                if job.abort:
                    return
            stream = self._stream
            for layer in changed:
                i = layer.layer_index
                slot_tensors = layer.slot_tensors()
                plan = plan_layer_transfer(job.old.phy2log[i], new.phy2log[i], rank=self.rank,
                                           num_ranks=self.num_ranks)
                row = new.phy2log[i].clone()
                slots = torch.tensor(plan.changed_local, dtype=torch.int64)
                prepare = getattr(layer, "prepare_commit", None)
                event = None
                # Everything on the worker's stream, allocations included: a block the main stream
                # freed but may still be reading must never be written by the side stream.
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    buffer = self._take_buffer(job, slot_tensors)
                    if buffer is None:
                        return  # aborted
                    if stream is not None:
                        stream.wait_event(job.start_event)
                        if buffer.free_event is not None:
                            stream.wait_event(buffer.free_event)
                    self._transfer(layer, plan, slot_tensors, buffer.tensors)
                    prepared = prepare(row, slots, buffer.tensors) if prepare is not None else None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                staged = _StagedLayer(layer=layer, row=row, slots=slots, buffer=buffer, ready_event=event,
                                      prepared=prepared)
                with job.cond:
                    if job.abort:
                        return
                    job.tally.add(plan, slot_tensors)
                    job.staged.append(staged)
                    job.cond.notify_all()
        except BaseException as exc:  # surfaced on the main thread by on_step; never swallowed
            with job.cond:
                job.error = exc
                job.error_tb = traceback.format_exc()
                job.cond.notify_all()
            logger.debug("async worker failed on rank %d", self.rank, exc_info=True)

    def _communicate(self, layer, plan, slot_tensors, staging) -> None:
        execute_layer_transfer(plan, slot_tensors, staging, self.communicator, self.max_transfer_bytes)

    def _take_buffer(self, job: _Job, slot_tensors: dict[str, torch.Tensor]) -> _StagingBuffer | None:
        key = _shape_key(slot_tensors)
        with job.cond:
            while True:
                if job.abort:
                    return None
                for b in job.free_buffers:
                    if b.key == key:
                        job.free_buffers.remove(b)
                        return b
                if job.num_buffers < self.num_buffers:
                    job.num_buffers += 1
                    break
                if job.free_buffers:  # a buffer of another shape is free: replace it
                    job.free_buffers.pop()
                    break
                job.cond.wait(0.1)
        return _StagingBuffer(slot_tensors)


def _stop_worker(live: dict, join_s: float = 2.0) -> None:
    """At interpreter exit (or when the executor is collected): abort the job and give the worker
    a moment to leave its torch calls, so the process never dies inside one at shutdown."""
    job, thread = live.get("job"), live.get("thread")
    if job is not None:
        with job.cond:
            job.abort = True
            job.cond.notify_all()
    if thread is not None and thread is not threading.current_thread():
        thread.join(join_s)


def _device_of(layers: list) -> torch.device:
    for layer in layers:
        for t in layer.slot_tensors().values():
            return t.device
    return torch.device("cpu")
