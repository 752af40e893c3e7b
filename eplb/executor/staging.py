"""Staging, shared by the sync and async executors: one pool of staging buffers, one
`stage_layer` (transfer plan -> weights into staging -> prepared commit) and one `commit_staged`.

Legend: L layers, P physical slots, G ranks, S = P // G slots on this rank.

A layer's new weights are first gathered into a staging buffer the size of its slots, then
committed (weights and maps together) by `commit_staged`. With a side CUDA stream (async mode)
the staging runs on that stream and ends with an event; the commit makes the main stream wait on
the event (the host does not), then records on the main stream that it read the buffer, so the
buffer's memory is never reused, nor the buffer rewritten, before those reads finish.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from eplb.errors import EPLBError
from eplb.moe.slot_layer import PreparedCommit, SlotLayer
from eplb.placement import Placement
from eplb.transfer import LayerTransferPlan, plan_layer_transfer

__all__ = ["StagingBuffer", "StagingPool", "StagedLayer", "changed_layers", "stage_layer", "commit_staged",
           "placement_of", "device_of"]

Transfer = Callable[[SlotLayer, LayerTransferPlan, dict, dict], None]
"""``transfer(layer, plan, slot_tensors, staging)``: fill ``staging`` with the new contents of the
changed slots (the communicator's exchange, or a benchmark's own copy)."""


def shape_key(slot_tensors: dict[str, torch.Tensor]) -> tuple:
    """Names, shapes, dtypes and devices of a layer's slot tensors: layers with one key share buffers."""
    return tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in sorted(slot_tensors.items()))


class StagingBuffer:
    """One layer's staging tensors ``{name: [S, ...]}``; reused across layers of the same shape.

    ``free_event`` is recorded on the main stream after the commit that read it, and the side
    stream waits on it before writing the buffer again: the reuse is ordered on the device, the
    host never waits for it.
    """

    def __init__(self, slot_tensors: dict[str, torch.Tensor]):
        self.key = shape_key(slot_tensors)
        self.tensors = {n: torch.empty_like(t) for n, t in slot_tensors.items()}
        self.free_event: torch.cuda.Event | None = None


class StagingPool:
    """The staging buffers of one rebalance, keyed by layer shape.

    Args:
        limit: most buffers alive at once; None allows one per distinct layer shape (sync mode,
            where each buffer is given back before the next layer is staged).
        cond: the condition that guards the pool (the async job's; a new one by default).
        stopped: checked while waiting for a buffer; `take` returns None once it is true.

    `take` blocks while ``limit`` buffers are taken; `give_back` (after a commit) wakes it.
    A taker that finds only free buffers of another shape replaces one of them.
    """

    def __init__(self, limit: int | None = None, cond: threading.Condition | None = None,
                 stopped: Callable[[], bool] = lambda: False):
        self.limit = limit
        self.cond = cond if cond is not None else threading.Condition()
        self.stopped = stopped
        self.free: list[StagingBuffer] = []
        self.count = 0

    def take(self, slot_tensors: dict[str, torch.Tensor]) -> StagingBuffer | None:
        """A buffer shaped like ``slot_tensors`` (allocated on the current stream when new), or
        None when the pool was stopped while waiting."""
        key = shape_key(slot_tensors)
        with self.cond:
            while True:
                if self.stopped():
                    return None
                for b in self.free:
                    if b.key == key:
                        self.free.remove(b)
                        return b
                if self.limit is None or self.count < self.limit:
                    self.count += 1
                    break
                if self.free:  # a buffer of another shape is free: replace it
                    self.free.pop()
                    break
                self.cond.wait(0.1)
        return StagingBuffer(slot_tensors)

    def give_back(self, buffer: StagingBuffer) -> None:
        with self.cond:
            self.free.append(buffer)
            self.cond.notify_all()


@dataclass
class StagedLayer:
    """A layer whose new weights sit in ``buffer`` and whose commit is prepared."""

    layer: SlotLayer
    plan: LayerTransferPlan
    buffer: StagingBuffer
    prepared: PreparedCommit
    ready_event: torch.cuda.Event | None  # recorded on the side stream after staging; None without one


def changed_layers(layers: list, old: Placement, new: Placement, num_ranks: int) -> list:
    """The layers whose row differs between ``old`` and ``new``, in the given order.

    Raises `EPLBError` when the placements differ in shape, ``P`` is not a multiple of
    ``num_ranks``, or a ``layer_index`` is outside the placements.
    """
    if old.phy2log.shape != new.phy2log.shape:
        raise EPLBError(
            f"old and new placements differ in shape ({tuple(old.phy2log.shape)} vs "
            f"{tuple(new.phy2log.shape)}); a rebalance keeps num_layers and num_physical"
        )
    new.slots_per_rank(num_ranks)
    changed = []
    for layer in layers:
        i = layer.layer_index
        if not 0 <= i < old.num_layers:
            raise EPLBError(f"layer_index ({i}) is outside the placement's {old.num_layers} layers")
        if not torch.equal(old.phy2log[i], new.phy2log[i]):
            changed.append(layer)
    return changed


def stage_layer(
    layer: SlotLayer,
    old: Placement,
    new: Placement,
    *,
    rank: int,
    num_ranks: int,
    transfer: Transfer,
    pool: StagingPool,
    stream: torch.cuda.Stream | None = None,
    start_event: torch.cuda.Event | None = None,
) -> StagedLayer | None:
    """Plan one layer's transfer, move its new weights into a staging buffer and prepare its commit.

    Args:
        layer: the layer (its ``layer_index`` row of ``old``/``new`` differs).
        old: ``[L, P]`` — the placement the layer holds.
        new: ``[L, P]`` — the placement to stage.
        rank: this rank in the EP group.
        num_ranks: ``G``.
        transfer: fills the staging buffer (see `Transfer`).
        pool: where the buffer comes from.
        stream: the side CUDA stream to stage on (async mode on CUDA), or None for the current one.
        start_event: the side stream waits on it first (work queued on the main stream before the
            rebalance began, which the transfer reads).

    Returns:
        The `StagedLayer`, or None when the pool was stopped (an abort) while waiting for a buffer.

    Raises:
        EPLBError: a slot tensor whose ``S`` disagrees with the placement, or the layer's own checks.
    """
    i = layer.layer_index
    slot_tensors = layer.slot_tensors()
    S = new.slots_per_rank(num_ranks)
    for name, t in slot_tensors.items():
        if t.shape[0] != S:
            raise EPLBError(
                f"layer {i}: slot tensor {name!r} has {t.shape[0]} slots but the placement gives "
                f"this rank {S} (num_physical {new.num_physical} / {num_ranks} ranks)"
            )
    plan = plan_layer_transfer(old.phy2log[i], new.phy2log[i], rank=rank, num_ranks=num_ranks)
    row = new.phy2log[i].clone()
    slots = torch.tensor(plan.changed_local, dtype=torch.int64)
    event = None
    # Everything on the side stream, allocations included: a block the main stream freed but may
    # still be reading must never be written by the side stream.
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        buffer = pool.take(slot_tensors)
        if buffer is None:
            return None
        if stream is not None:
            if start_event is not None:
                stream.wait_event(start_event)
            if buffer.free_event is not None:
                stream.wait_event(buffer.free_event)
        transfer(layer, plan, slot_tensors, buffer.tensors)
        prepared = layer.prepare_commit(row, slots=slots, staged=buffer.tensors)
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
    return StagedLayer(layer=layer, plan=plan, buffer=buffer, prepared=prepared, ready_event=event)


def commit_staged(staged: StagedLayer, pool: StagingPool) -> int:
    """Commit a staged layer on the current (main) stream and give its buffer back; returns the
    layer's index. With a side stream, the main stream waits on the staging event (the host does
    not) and the buffer's and the prepared commit's memory are recorded as read by the main stream."""
    main = None
    if staged.ready_event is not None:
        # The weights' device, not the thread's current one (they differ if the user never
        # called torch.cuda.set_device): the commit must wait on the right stream.
        device = next(iter(staged.buffer.tensors.values())).device
        main = torch.cuda.current_stream(device)
        main.wait_event(staged.ready_event)
    staged.layer.apply_commit(staged.prepared, staged.buffer.tensors)  # device copies only
    if main is not None:
        staged.buffer.free_event = torch.cuda.Event()
        staged.buffer.free_event.record(main)
        # The buffers belong to the side stream; the main stream just read them. Tell the
        # allocator, so their memory is never handed out again before these reads finish.
        for t in staged.buffer.tensors.values():
            t.record_stream(main)
        staged.prepared.record_stream(main)
    pool.give_back(staged.buffer)
    return staged.layer.layer_index


def device_of(layers: list) -> torch.device:
    """The device of the first slot tensor of ``layers`` (the CPU when there is none)."""
    for layer in layers:
        for t in layer.slot_tensors().values():
            return t.device
    return torch.device("cpu")


def placement_of(layers: list, old: Placement) -> Placement:
    """``old`` with the row of each of ``layers`` read back from the layer
    (`SlotLayer.placement_row`): the placement the layers hold after committing ``layers``."""
    rows = old.phy2log.clone()
    for layer in layers:
        rows[layer.layer_index] = layer.placement_row()
    return Placement.from_phy2log(rows, old.num_logical)
