"""``torch_gloo``: point-to-point over a dedicated gloo group, staged through (pinned) host memory.

CUDA tensors are copied device -> pinned host buffer, exchanged by gloo, and copied host -> device;
no NCCL work is ever issued, so this runs safely from a background thread while the forward pass
uses NCCL. CPU tensors go through the same host buffers (one message per peer and direction).
The host buffers are kept and reused; their size is bounded by the largest exchange, which
`eplb.transfer.execute_layer_transfer` bounds by ``max_transfer_bytes``.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from eplb.comm import register_communicator
from eplb.comm.base import CommunicationError, Communicator, Queue, check_match, dedicated_group
from eplb.errors import EPLBError

__all__ = ["TorchGlooCommunicator"]

_ALIGN = 64  # bytes; every tensor starts aligned so the byte buffer can be viewed as any dtype

Region = tuple[int, int, list[tuple[torch.Tensor, int]]]
"""One peer's part of a host buffer: (start, end, [(tensor, byte offset)])."""


@register_communicator("torch_gloo")
class TorchGlooCommunicator(Communicator):
    """Gloo send/recv on a dedicated group, staged through reusable host buffers.

    Creating it is collective over the whole job (it creates a process group, unless
    ``gloo_group`` hands it a dedicated gloo group over the same ranks, created with
    `eplb.comm.base.dedicated_group`). ``timeout_s`` is the gloo group's timeout and every wait's:
    a dead or stuck peer raises `CommunicationError`.
    """

    name = "torch_gloo"

    def __init__(
        self,
        *,
        group: dist.ProcessGroup | None,
        device="cpu",
        timeout_s: float = 300.0,
        gloo_group: dist.ProcessGroup | None = None,
    ):
        if group is None:
            raise EPLBError("communicator 'torch_gloo' needs a process group; use 'local' for one rank")
        super().__init__(group=group, device=device, timeout_s=timeout_s)
        self._global_ranks = dist.get_process_group_ranks(group)
        self._pg = gloo_group if gloo_group is not None else dedicated_group(group, "gloo", timeout_s)
        self._pinned = self.device.type == "cuda"
        self._send_buf = self._new_buffer(0)
        self._recv_buf = self._new_buffer(0)

    def _exchange(self, sends: Queue, recvs: Queue) -> None:
        send_regions, send_bytes = _layout(sends)
        recv_regions, recv_bytes = _layout(recvs)
        if self.rank in send_regions or self.rank in recv_regions:
            own_sends = [ts for peer, ts in sends if peer == self.rank]
            own_recvs = [ts for peer, ts in recvs if peer == self.rank]
            if len(own_sends) != len(own_recvs):
                raise EPLBError(
                    f"rank {self.rank} queued {len(own_sends)} sends to itself but {len(own_recvs)} "
                    "receives from itself; each send needs a matching receive"
                )
            for src, dst in zip(own_sends, own_recvs):
                check_match(src, dst)
        if self._send_buf.numel() < send_bytes:
            self._send_buf = self._new_buffer(send_bytes)
        if self._recv_buf.numel() < recv_bytes:
            self._recv_buf = self._new_buffer(recv_bytes)
        send_buf, recv_buf = self._send_buf, self._recv_buf

        with torch.no_grad():
            # Step 1: stage what we send into host memory, one contiguous region per peer.
            for _, _, items in send_regions.values():
                for t, offset in items:
                    _view(send_buf, offset, t).copy_(t, non_blocking=True)
            self._sync()

            # Step 2: exchange the regions; a region for ourselves is read in place in step 3.
            works = []
            try:
                for peer, (start, end, _) in send_regions.items():
                    if peer != self.rank:
                        works.append(dist.isend(send_buf[start:end], self._global_ranks[peer], self._pg))
                for peer, (start, end, _) in recv_regions.items():
                    if peer != self.rank:
                        works.append(dist.irecv(recv_buf[start:end], self._global_ranks[peer], self._pg))
                for work in works:
                    work.wait(timeout=timedelta(seconds=self.timeout_s))
            except RuntimeError as exc:
                peers = sorted((set(send_regions) | set(recv_regions)) - {self.rank})
                raise CommunicationError(
                    f"torch_gloo: exchange of rank {self.rank} with ranks {peers} failed or timed out "
                    f"(timeout_s={self.timeout_s}): {exc}"
                ) from exc

            # Step 3: unstage into the receiving tensors.
            for peer, (start, _, items) in recv_regions.items():
                buf, shift = (send_buf, send_regions[peer][0] - start) if peer == self.rank else (recv_buf, 0)
                for t, offset in items:
                    t.copy_(_view(buf, offset + shift, t), non_blocking=True)
            # The host buffers are reused by the next exchange: the copies must be done.
            self._sync()

    def _new_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pinned)

    def _sync(self) -> None:
        if self._pinned:
            torch.cuda.current_stream(self.device).synchronize()


def _layout(queue: Queue) -> tuple[dict[int, Region], int]:
    """Place every queued tensor in one byte buffer, grouped by peer in call order."""
    by_peer: dict[int, list[torch.Tensor]] = {}
    for peer, tensors in queue:
        by_peer.setdefault(peer, []).extend(tensors)
    regions: dict[int, Region] = {}
    offset = 0
    for peer in sorted(by_peer):
        start = offset
        items = []
        for t in by_peer[peer]:
            items.append((t, offset))
            offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        regions[peer] = (start, offset, items)
    return regions, offset


def _view(buf: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """``buf[offset:]`` viewed as a tensor of ``like``'s dtype and shape."""
    nbytes = like.numel() * like.element_size()
    return buf[offset : offset + nbytes].view(like.dtype).view(like.shape)
