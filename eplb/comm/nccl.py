"""``torch_nccl``: ``torch.distributed.batch_isend_irecv`` on a dedicated NCCL group.

The group is not the one the forward pass uses, so its traffic never interleaves with the
model's collectives. Work is issued on the caller's current CUDA stream; `Communicator.execute`
makes that stream wait for it (the host does not block). Only for sync rebalancing: NCCL
point-to-point traffic from a background thread can deadlock against the forward pass's own
NCCL collectives (see `eplb.config.EPLBConfig.communicator`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from eplb.comm import register_communicator
from eplb.comm.base import CommunicationError, Communicator, Queue, copy_self_pairs, dedicated_group
from eplb.errors import EPLBError

__all__ = ["TorchNCCLCommunicator"]


@register_communicator("torch_nccl")
class TorchNCCLCommunicator(Communicator):
    """NCCL point-to-point on a dedicated group; tensors must be on this rank's CUDA device.

    Creating it is collective over the whole job. ``timeout_s`` is the NCCL group's timeout
    (enforced by PyTorch's NCCL watchdog, which by default tears the process down).
    """

    name = "torch_nccl"
    # Sends read the slots and receives land in staging: no buffer per batch, so a layer moves in
    # one batch_isend_irecv (every batch boundary is a pause of the link).
    stages_batches = False

    def __init__(self, *, group: dist.ProcessGroup | None, device="cuda", timeout_s: float = 300.0):
        if group is None:
            raise EPLBError("communicator 'torch_nccl' needs a process group; use 'local' for one rank")
        if torch.device(device).type != "cuda":
            raise EPLBError(
                f"communicator 'torch_nccl' moves CUDA tensors but device is {device!r}; "
                "use 'torch_gloo' (or 'auto') for CPU tensors"
            )
        super().__init__(group=group, device=device, timeout_s=timeout_s)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._global_ranks = dist.get_process_group_ranks(group)
        self._pg = dedicated_group(group, "nccl", timeout_s)
        # NCCL builds its communicator at the group's first operation, and batch_isend_irecv
        # needs every rank of the group in that first one: do it now, while all ranks are here.
        dist.all_reduce(torch.zeros(1, device=self.device), group=self._pg)

    def _exchange(self, sends: Queue, recvs: Queue) -> None:
        copy_self_pairs(sends, recvs, self.rank)
        ops: list[dist.P2POp] = []
        copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        # k-th send to a peer matches the k-th receive from us there: keep call order.
        for peer, tensors in sends:
            if peer != self.rank:
                for t in tensors:
                    ops.append(dist.P2POp(dist.isend, t.contiguous(), self._global_ranks[peer], self._pg))
        for peer, tensors in recvs:
            if peer != self.rank:
                for t in tensors:
                    buf = t
                    if not t.is_contiguous():
                        buf = torch.empty_like(t, memory_format=torch.contiguous_format)
                        copy_back.append((t, buf))
                    ops.append(dist.P2POp(dist.irecv, buf, self._global_ranks[peer], self._pg))
        if not ops:
            return
        try:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        except RuntimeError as exc:
            raise CommunicationError(f"torch_nccl: exchange of rank {self.rank} failed: {exc}") from exc
        with torch.no_grad():
            for t, buf in copy_back:
                t.copy_(buf)
