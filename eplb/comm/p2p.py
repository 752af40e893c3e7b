"""``torch_p2p``: receivers pull expert weights straight out of their peers' slot storage.

For ranks whose GPUs share one host with peer access (or share one GPU). Each rank exposes the
storage of the slot tensors it sends to a peer once, as a CUDA IPC handle
(`torch.multiprocessing.reductions`); the peer maps it into its own address space and, from then
on, receives an expert with one device-to-device copy issued on its current stream (the async
worker's side stream): between GPUs the driver moves it over NVLink on the copy engines, so no
NCCL kernel and no SM time is spent, and the forward pass's NCCL collectives are never raced.
Only small messages cross the dedicated gloo group: which views to read, and two CUDA IPC events.

Protocol of one `Communicator.execute` between a sender ``a`` and a receiver ``b`` (every rank
runs the steps for all its peers at once; the plan says who talks to whom, so the calls match):

1. **offer** (``a`` -> ``b``): ``a`` records an interprocess event ``ready`` on its stream (the
   slots hold their committed contents from that point of ``a``'s stream on) and posts, per
   tensor, which storage and view to read; handles of storages ``b`` has not mapped yet, and the
   ids of storages that are gone, travel with it.
2. **pull** (``b``): ``b`` maps new storages, waits until ``ready`` has completed, queues the
   copies into its receive tensors on its stream, records an interprocess event ``done`` and
   posts it back (**ack**). A receive that cannot be served (mismatched shapes, a handle that
   does not open) posts an error ack instead, so the sender raises too instead of waiting.
3. **settle** (``a``): ``a`` waits until ``done`` has completed and orders its stream after it:
   whatever ``a`` queues later on that stream, a commit that overwrites the slots included, runs
   after ``b``'s copies have read them.

So a peer never reads a slot while its owner overwrites it: the owner's commit of a layer is
queued on its main stream after the async executor's ready event of that layer, which is
recorded on the worker's stream after step 3.

Faults: every wait is on the host and bounded by ``timeout_s`` (a gloo receive, or polling a
peer's event), so a dead or frozen peer raises `CommunicationError` instead of hanging. A peer's
event is waited for on the host before this rank's stream is ordered after it, so no device-side
wait ever depends on another process: a peer killed mid-copy cannot stall this GPU. The price is
one host round trip per exchange, and the sender's worker thread waits for the copies of each
exchange (one per layer, so the link stays busy for all but that round trip).
"""

from __future__ import annotations

import itertools
import logging
import pickle
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from eplb.comm import register_communicator
from eplb.comm.base import CommunicationError, Communicator, Queue, copy_self_pairs, dedicated_group
from eplb.errors import EPLBError

__all__ = ["TorchP2PCommunicator", "PeerInfo", "peer_to_peer_verdict", "peer_to_peer_support"]

logger = logging.getLogger("eplb")

_TAG_OFFER, _TAG_ACK = 17, 18  # gloo tags: an offer and an ack between the same pair never mix
_HEAD = 16384  # bytes of a message's first part: a layer's offer (after the first) and an ack fit


# ----------------------------------------------------------------------------- auto selection
@dataclass(frozen=True)
class PeerInfo:
    """What one rank tells the others when ``auto`` decides on peer-to-peer copies.

    Attributes:
        host: the host name.
        device: this rank's GPU, as its UUID (indices differ between processes that see
            different ``CUDA_VISIBLE_DEVICES``); ``""`` for a CPU device.
        visible: UUID -> index of every GPU this process sees.
    """

    host: str
    device: str
    visible: dict[str, int] = field(default_factory=dict)


def peer_to_peer_verdict(
    infos: Sequence[PeerInfo], rank: int, can_access_peer: Callable[[int, int], bool]
) -> str:
    """Why ``rank`` cannot pull from every other rank with device copies, or ``""`` if it can.

    Args:
        infos: ``[G]`` one `PeerInfo` per rank of the EP group.
        rank: this rank.
        can_access_peer: ``(my GPU index, peer GPU index) -> bool``, as
            ``torch.cuda.can_device_access_peer``.

    Returns:
        ``""`` when every rank is on this rank's host, on a GPU this process sees, and that GPU
        is this rank's own or one it has peer access to; otherwise the first reason it is not.
    """
    mine = infos[rank]
    if not mine.device:
        return f"rank {rank} holds its experts on the CPU; peer-to-peer copies move GPU memory"
    hosts = sorted({info.host for info in infos})
    if len(hosts) > 1:
        return f"the EP group spans {len(hosts)} hosts ({', '.join(hosts)}); peer-to-peer copies need one host"
    my_index = mine.visible[mine.device]
    for peer, info in enumerate(infos):
        if peer == rank:
            continue
        if not info.device:
            return f"rank {peer} holds its experts on the CPU; peer-to-peer copies move GPU memory"
        index = mine.visible.get(info.device)
        if index is None:
            return f"rank {rank} does not see rank {peer}'s GPU {info.device} (check CUDA_VISIBLE_DEVICES)"
        if index != my_index and not can_access_peer(my_index, index):
            return f"GPU {my_index} of rank {rank} has no peer access to GPU {index} of rank {peer}"
    return ""


def peer_to_peer_support(group: dist.ProcessGroup, device: torch.device | str) -> str:
    """``""`` when every rank of ``group`` can pull from every other with device copies, else why
    not (the same answer on every rank). Collective over ``group``: every rank calls it."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        visible = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
        info = PeerInfo(socket.gethostname(), str(torch.cuda.get_device_properties(index).uuid), visible)
    else:
        info = PeerInfo(socket.gethostname(), "")
    world = dist.get_world_size(group)
    infos: list = [None] * world
    dist.all_gather_object(infos, info, group=group)
    reason = peer_to_peer_verdict(infos, dist.get_rank(group), torch.cuda.can_device_access_peer)
    reasons: list = [None] * world
    dist.all_gather_object(reasons, reason, group=group)
    return next((r for r in reasons if r), "")


# ----------------------------------------------------------------------------- bookkeeping
@dataclass(frozen=True)
class View:
    """Where a sent tensor lives: a view of storage ``export`` (offset, size, stride in elements)."""

    export: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class Exports:
    """Sender side: which storages each peer has mapped, under which id.

    A storage is exported to a peer once (``export_fn(storage)`` makes the handle the peer opens).
    When it is freed, its id is retired: the next offer to every peer that mapped it says so, and
    the peer unmaps it (a new storage at the same address gets a new id, never a stale mapping).

    Args:
        export_fn: ``storage -> handle`` (picklable) for a peer to open.
        weakref_fn: ``storage -> ref`` with ``ref.expired()``.
    """

    def __init__(self, export_fn: Callable, weakref_fn: Callable):
        self._export_fn = export_fn
        self._weakref_fn = weakref_fn
        self._ids = itertools.count()
        self._live: dict[int, tuple[object, int, object]] = {}  # storage key -> (ref, id, handle)
        self._mapped: dict[int, set[int]] = {}  # peer -> export ids it has mapped
        self._retired: dict[int, list[int]] = {}  # peer -> ids to unmap at the next offer

    def describe(self, tensor: torch.Tensor, peer: int, new: dict[int, object]) -> View:
        """The `View` of ``tensor`` for ``peer``; adds ``{id: handle}`` to ``new`` if ``peer`` has
        not mapped its storage yet."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._live.get(key)
        if entry is None or entry[0].expired():
            if entry is not None:
                self._retire(key)
            entry = (self._weakref_fn(storage), next(self._ids), None)
            self._live[key] = entry
        ref, export_id, handle = entry
        mapped = self._mapped.setdefault(peer, set())
        if export_id not in mapped:
            if handle is None:
                handle = self._export_fn(storage)
                self._live[key] = (ref, export_id, handle)
            new[export_id] = handle
            mapped.add(export_id)
        return View(export_id, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)

    def retired(self, peer: int) -> list[int]:
        """Ids ``peer`` must unmap (freed storages), once: the caller puts them in its next offer."""
        for key in [k for k, (ref, _, _) in self._live.items() if ref.expired()]:
            self._retire(key)
        return self._retired.pop(peer, [])

    def mapped(self, peer: int) -> set[int]:
        """Export ids ``peer`` has mapped and not been told to unmap."""
        return set(self._mapped.get(peer, ()))

    def _retire(self, key: int) -> None:
        _, export_id, _ = self._live.pop(key)
        for peer, ids in self._mapped.items():
            if export_id in ids:
                ids.discard(export_id)
                self._retired.setdefault(peer, []).append(export_id)


class Imports:
    """Receiver side: the peers' storages mapped here, by (peer, export id).

    Args:
        open_fn: ``handle -> tensor`` — a 1-D uint8 tensor over the whole mapped storage.
    """

    def __init__(self, open_fn: Callable):
        self._open_fn = open_fn
        self._bases: dict[tuple[int, int], torch.Tensor] = {}

    def update(self, peer: int, new: dict[int, object], retired: Sequence[int]) -> None:
        """Unmap ``retired`` ids of ``peer``, map its ``new`` ones."""
        for export_id in retired:
            self._bases.pop((peer, export_id), None)
        for export_id, handle in new.items():
            self._bases[(peer, export_id)] = self._open_fn(handle)

    def view(self, peer: int, view: View) -> torch.Tensor:
        """``peer``'s tensor described by ``view``, over its mapped storage (no copy)."""
        base = self._bases.get((peer, view.export))
        if base is None:
            raise CommunicationError(f"torch_p2p: rank {peer} offered storage {view.export}, which is not mapped here")
        itemsize = view.dtype.itemsize
        extent = 1 + sum((n - 1) * s for n, s in zip(view.size, view.stride)) if all(view.size) else 0
        if view.offset < 0 or (view.offset + extent) * itemsize > base.numel():
            raise CommunicationError(
                f"torch_p2p: rank {peer} offered a view (offset {view.offset}, size {view.size}, stride "
                f"{view.stride}, {view.dtype}) beyond its storage of {base.numel()} bytes"
            )
        out = torch.empty(0, dtype=view.dtype, device=base.device)
        return out.set_(base.untyped_storage(), view.offset, view.size, view.stride)

    def __len__(self) -> int:
        return len(self._bases)


# ----------------------------------------------------------------------------- CUDA IPC
def _export_cuda(storage: torch.UntypedStorage):
    from torch.multiprocessing.reductions import reduce_tensor

    whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    _, args = reduce_tensor(whole)
    return args


def _open_cuda(device_index: int) -> Callable:
    def open_fn(args) -> torch.Tensor:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        args = list(args)
        # Map into this rank's own GPU context (peer access is enabled lazily by the driver): the
        # peer's GPU gets no context in this process.
        args[6] = device_index
        return rebuild_cuda_tensor(*args)

    return open_fn


def _storage_weakref(storage: torch.UntypedStorage):
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(storage)


@register_communicator("torch_p2p")
class TorchP2PCommunicator(Communicator):
    """Receivers pull experts from their peers' slot storage with device copies (CUDA IPC).

    Every rank of the group must be on one host, with peer access between its GPUs (or on one
    GPU); `peer_to_peer_support` tells. Creating it is collective over the whole job: it creates
    a gloo group for its small messages (unless ``gloo_group`` hands it one, as for
    `eplb.comm.gloo.TorchGlooCommunicator`) and checks, with one real exchange around the ring of
    ranks, that every rank can map and read its neighbour's memory (`EPLBError` on every rank
    otherwise). ``timeout_s`` bounds every wait for a peer's message.

    No batch bound applies (``stages_batches = False``): nothing is staged on the way, so the
    executor moves each layer in one exchange.
    """

    name = "torch_p2p"
    stages_batches = False
    device_type = "cuda"  # what the memory handles and events below are for

    def __init__(
        self,
        *,
        group: dist.ProcessGroup | None,
        device="cuda",
        timeout_s: float = 300.0,
        gloo_group: dist.ProcessGroup | None = None,
    ):
        if group is None:
            raise EPLBError("communicator 'torch_p2p' needs a process group; use 'local' for one rank")
        if torch.device(device).type != self.device_type:
            raise EPLBError(
                f"communicator 'torch_p2p' moves CUDA tensors but device is {str(device)!r}; "
                "use 'torch_gloo' (or 'auto') for CPU tensors"
            )
        super().__init__(group=group, device=device, timeout_s=timeout_s)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._global_ranks = dist.get_process_group_ranks(group)
        self._pg = gloo_group if gloo_group is not None else dedicated_group(group, "gloo", timeout_s)
        self._exports = Exports(self._export, _storage_weakref)
        self._imports = Imports(self._open)
        self._ready = None  # our last ready event, alive until every receiver has opened it
        self._held: dict[int, object] = {}  # peer -> our last done event, which it may still open
        self._probe()

    # ------------------------------------------------------------------ memory handles and events
    # (CUDA IPC; tests replace these five to run the same protocol on CPU shared memory)
    def _export(self, storage: torch.UntypedStorage):
        """A picklable handle a peer's `_open` maps: the storage's CUDA IPC handle."""
        return _export_cuda(storage)

    def _open(self, handle) -> torch.Tensor:
        """A 1-D uint8 tensor over the storage behind a peer's ``handle``."""
        return _open_cuda(self.device.index)(handle)

    def _stream(self):
        return torch.cuda.current_stream(self.device)

    def _record(self, stream) -> tuple[object, bytes]:
        """Record an interprocess event on ``stream``: (the event, its handle for peers)."""
        event = torch.cuda.Event(interprocess=True)
        event.record(stream)
        return event, event.ipc_handle()

    def _wait(self, stream, handle: bytes) -> None:
        """Wait on the host until a peer's event has completed (at most ``timeout_s``), then order
        ``stream`` after it. Never a device-side wait on an unfinished peer event: a peer killed
        before its GPU work ran would leave that wait pending forever, and this GPU with it."""
        event = torch.cuda.Event.from_ipc_handle(self.device, handle)
        start = time.monotonic()
        while not event.query():
            waited = time.monotonic() - start
            if waited > self.timeout_s:
                raise CommunicationError(
                    f"torch_p2p: a peer's GPU work did not finish within timeout_s ({self.timeout_s} s); "
                    "its process has probably died"
                )
            time.sleep(_nap(waited))
        stream.wait_event(event)

    # ------------------------------------------------------------------ one exchange
    def _exchange(self, sends: Queue, recvs: Queue) -> None:
        copy_self_pairs(sends, recvs, self.rank)
        out = _by_peer(sends, self.rank)
        into = _by_peer(recvs, self.rank)
        if not out and not into:
            return
        stream = self._stream()
        posted: list = []  # (send work, its buffers): the buffers live until the send completes
        try:
            self._offer(out, stream, posted)
            self._pull(into, stream, posted)
            self._settle(out, stream)
            for work, _ in posted:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except (CommunicationError, EPLBError):
            raise
        except RuntimeError as exc:  # gloo: a peer closed its connection or the timeout passed
            peers = sorted(set(out) | set(into))
            raise CommunicationError(
                f"torch_p2p: exchange of rank {self.rank} with ranks {peers} failed or timed out "
                f"(timeout_s={self.timeout_s}): {exc}"
            ) from exc

    def _offer(self, out: dict[int, list[torch.Tensor]], stream, posted: list) -> None:
        """Step 1: tell each receiver which views to read, and from which point of our stream."""
        if not out:
            return
        self._ready, handle = self._record(stream)  # alive until every receiver acked (it opened it)
        for peer, tensors in out.items():
            new: dict[int, object] = {}
            views = [self._exports.describe(t, peer, new) for t in tensors]
            retired = self._exports.retired(peer)
            self._post(peer, {"views": views, "new": new, "retired": retired, "ready": handle}, _TAG_OFFER, posted)

    def _pull(self, into: dict[int, list[torch.Tensor]], stream, posted: list) -> None:
        """Step 2: map, wait for each sender's ready point, copy, and ack with our done event."""
        if not into:
            return
        failures: dict[int, str] = {}
        with torch.no_grad():
            for peer, tensors in into.items():
                offer = self._receive(peer, _TAG_OFFER)
                self._held.pop(peer, None)  # the peer is past our previous exchange: it opened that event
                try:
                    _check_offer(peer, offer["views"], tensors)
                    self._imports.update(peer, offer["new"], offer["retired"])
                    sources = [self._imports.view(peer, v) for v in offer["views"]]
                    self._wait(stream, offer["ready"])
                    for dst, src in zip(tensors, sources):
                        dst.copy_(src, non_blocking=True)
                except Exception as exc:  # tell the sender, so it raises instead of waiting for an ack
                    failures[peer] = f"{type(exc).__name__}: {exc}"
        done, handle = self._record(stream)
        for peer in into:
            if peer in failures:
                self._post(peer, {"error": failures[peer]}, _TAG_ACK, posted)
            else:
                self._held[peer] = done
                self._post(peer, {"done": handle}, _TAG_ACK, posted)
        if failures:
            peer, reason = next(iter(failures.items()))
            raise CommunicationError(f"torch_p2p: rank {self.rank} could not read from rank {peer}: {reason}")

    def _settle(self, out: dict[int, list[torch.Tensor]], stream) -> None:
        """Step 3: our stream waits until every receiver has read what we sent."""
        errors = []
        for peer in out:
            ack = self._receive(peer, _TAG_ACK)
            if "error" in ack:
                errors.append(f"rank {peer}: {ack['error']}")
                continue
            self._wait(stream, ack["done"])
        self._ready = None
        if errors:
            raise CommunicationError(f"torch_p2p: receivers of rank {self.rank} failed: {'; '.join(errors)}")

    # ------------------------------------------------------------------ messages over gloo
    def _post(self, peer: int, message: dict, tag: int, posted: list) -> None:
        """Send ``message`` to ``peer``: one gloo message of ``_HEAD`` bytes (length + the start of
        the pickle), and a second with the rest only when it does not fit."""
        data = pickle.dumps(message)
        head = torch.zeros(_HEAD, dtype=torch.uint8)
        head[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        first = data[: _HEAD - 8]
        head[8 : 8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        dst = self._global_ranks[peer]
        posted.append((dist.isend(head, dst, self._pg, tag=tag), head))
        if len(data) > len(first):
            rest = torch.frombuffer(bytearray(data[len(first) :]), dtype=torch.uint8)
            posted.append((dist.isend(rest, dst, self._pg, tag=tag), rest))

    def _receive(self, peer: int, tag: int) -> dict:
        src = self._global_ranks[peer]
        timeout = timedelta(seconds=self.timeout_s)
        head = torch.empty(_HEAD, dtype=torch.uint8)
        dist.irecv(head, src, self._pg, tag=tag).wait(timeout=timeout)
        length = int(head[:8].view(torch.int64).item())
        data = head[8 : 8 + min(length, _HEAD - 8)].numpy().tobytes()
        if length > len(data):
            rest = torch.empty(length - len(data), dtype=torch.uint8)
            dist.irecv(rest, src, self._pg, tag=tag).wait(timeout=timeout)
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    # ------------------------------------------------------------------ construction check
    def _probe(self) -> None:
        """One exchange around the ring: each rank sends a pattern to the next and checks what
        it pulled from the previous. Raises `EPLBError` on every rank if any rank failed."""
        error = ""
        timeout_s, self.timeout_s = self.timeout_s, min(self.timeout_s, 30.0)  # a failing probe fails soon
        try:
            nxt, prv = (self.rank + 1) % self.num_ranks, (self.rank - 1) % self.num_ranks
            source = torch.arange(256, dtype=torch.int32, device=self.device) + 1000 * self.rank
            target = torch.full((256,), -1, dtype=torch.int32, device=self.device)
            self.add_send([source], nxt)
            self.add_recv([target], prv)
            self.execute()
            expected = torch.arange(256, dtype=torch.int32, device=self.device) + 1000 * prv
            if not torch.equal(target, expected):
                error = f"rank {self.rank} read wrong data from rank {prv}'s memory"
        except Exception as exc:
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        finally:
            self.timeout_s = timeout_s
        errors: list = [None] * self.num_ranks
        dist.all_gather_object(errors, error, group=self._pg)
        failed = [e for e in errors if e]
        if failed:
            raise EPLBError(
                "communicator 'torch_p2p' cannot read peer memory with CUDA IPC here ("
                + "; ".join(failed)
                + "); use 'torch_gloo' (or 'auto', which falls back to it)"
            )


def _nap(waited: float) -> float:
    """Seconds to sleep before polling a peer's event again, after ``waited`` seconds of waiting:
    an eighth of the wait, between 10 us and 1 ms. A wake-up is then at most about 1/8 late (the
    link idles that long), while a long wait polls about 1000 times a second instead of 20000:
    each poll takes the GIL, which a host-bound forward on the main thread is waiting for."""
    return min(max(waited / 8, 1e-5), 1e-3)


def _by_peer(queue: Queue, rank: int) -> dict[int, list[torch.Tensor]]:
    """Tensors queued for each peer other than ``rank``, in call order (the matching order)."""
    by_peer: dict[int, list[torch.Tensor]] = {}
    for peer, tensors in queue:
        if peer != rank:
            by_peer.setdefault(peer, []).extend(tensors)
    return by_peer


def _check_offer(peer: int, views: Sequence[View], tensors: Sequence[torch.Tensor]) -> None:
    offered = [(tuple(v.size), v.dtype) for v in views]
    wanted = [(tuple(t.shape), t.dtype) for t in tensors]
    if offered != wanted:
        raise EPLBError(
            f"rank {peer} sends tensors {offered} but this rank receives {wanted}; a send and its matching "
            "receive must hold tensors of the same shapes and dtypes"
        )
