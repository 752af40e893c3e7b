"""Communicator base class, the one-rank `LocalCommunicator`, and `select_communicator`.

A communicator moves sets of tensors between the ranks of the expert-parallel (EP) group:
queue sends and receives with `Communicator.add_send` / `Communicator.add_recv`, then run them all
with `Communicator.execute`. Ranks are positions in the EP group (``0 .. G-1``), not global ranks.

Matching rule: the k-th `add_send` from rank a to rank b pairs with the k-th `add_recv` on rank b
from rank a, and the tensors of the two calls must have the same shapes and dtypes, in order.
A send to oneself pairs with a receive from oneself, as a copy.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from eplb.comm import get_communicator, register_communicator
from eplb.errors import EPLBError

__all__ = ["Communicator", "CommunicationError", "LocalCommunicator", "bound_group_timeout", "select_communicator"]

logger = logging.getLogger("eplb")

Queue = list[tuple[int, list[torch.Tensor]]]
"""Queued operations: (peer rank in the EP group, tensors), in call order."""


class CommunicationError(RuntimeError):
    """A transfer failed or timed out (e.g. a peer died). The communicator is unusable afterwards."""


class Communicator(ABC):
    """Moves tensors between the ranks of a process group.

    Args:
        group: the EP process group (``None``: one rank, no ``torch.distributed``).
        device: where the tensors live (``"cpu"`` or a CUDA device).
        timeout_s: an exchange that does not finish within this many seconds raises
            `CommunicationError` instead of hanging (where the backend supports it).

    Work on CUDA tensors is issued on the caller's current stream at `execute` time.
    """

    name: str = ""
    stages_batches: bool = True
    """Whether each exchange goes through a buffer of its size (``torch_gloo``'s pinned host
    memory), so `eplb.transfer.execute_layer_transfer` splits a layer's exchange into batches of
    at most ``max_transfer_bytes``. False for communicators that send from the slots and receive
    into staging directly (``torch_nccl``, ``torch_p2p``): a layer moves in one exchange."""

    def __init__(
        self,
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        timeout_s: float = 300.0,
    ):
        if timeout_s <= 0:
            raise EPLBError(f"timeout_s ({timeout_s}) must be > 0")
        self.group = group
        self.device = torch.device(device)
        self.timeout_s = float(timeout_s)
        if group is None:
            self.rank, self.num_ranks = 0, 1
        else:
            self.rank, self.num_ranks = dist.get_rank(group), dist.get_world_size(group)
        self._sends: Queue = []
        self._recvs: Queue = []

    def add_send(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        """Queue sending ``tensors`` to rank ``dst``; they must not change until `execute` returns."""
        self._sends.append((self._check_peer(dst, "dst"), list(tensors)))

    def add_recv(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        """Queue receiving into ``tensors`` from rank ``src``."""
        self._recvs.append((self._check_peer(src, "src"), list(tensors)))

    def execute(self) -> None:
        """Run every queued operation and clear the queue.

        On return the received tensors hold their data (on CUDA: for work queued later on the
        current stream), and sent tensors may be overwritten by work queued later on that stream.
        Raises `CommunicationError` when a peer fails or the timeout passes.
        """
        sends, recvs = self._sends, self._recvs
        self._sends, self._recvs = [], []
        if sends or recvs:
            self._exchange(sends, recvs)

    @abstractmethod
    def _exchange(self, sends: Queue, recvs: Queue) -> None:
        """Run the queued sends and receives (subclasses)."""

    def _check_peer(self, peer: int, what: str) -> int:
        if not 0 <= peer < self.num_ranks:
            raise EPLBError(f"{what} ({peer}) must be a rank of the group, in [0, {self.num_ranks})")
        return int(peer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, num_ranks={self.num_ranks}, device={self.device})"


def copy_self_pairs(sends: Queue, recvs: Queue, rank: int) -> None:
    """Do the sends to oneself as copies into the matching receives from oneself, in order."""
    own_sends = [ts for peer, ts in sends if peer == rank]
    own_recvs = [ts for peer, ts in recvs if peer == rank]
    if len(own_sends) != len(own_recvs):
        raise EPLBError(
            f"rank {rank} queued {len(own_sends)} sends to itself but {len(own_recvs)} receives from itself; "
            "each send needs a matching receive"
        )
    with torch.no_grad():
        for src, dst in zip(own_sends, own_recvs):
            check_match(src, dst)
            for s, d in zip(src, dst):
                d.copy_(s)


def check_match(src: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
    if [(t.shape, t.dtype) for t in src] != [(t.shape, t.dtype) for t in dst]:
        raise EPLBError(
            "a send and its matching receive must hold tensors of the same shapes and dtypes; got "
            f"{[(tuple(t.shape), t.dtype) for t in src]} and {[(tuple(t.shape), t.dtype) for t in dst]}"
        )


def dedicated_group(group: dist.ProcessGroup, backend: str, timeout_s: float) -> dist.ProcessGroup:
    """A new process group of ``backend`` over the same ranks as ``group``.

    Address its members by global rank (``dist.get_process_group_ranks(group)[peer]``), which
    does not depend on the order the groups list their ranks in.

    ``dist.new_group`` is collective over the WHOLE job: every process must call this at the same
    time (so every rank builds its communicator at the same time, e.g. when the model is wrapped).
    When ``group`` is a subgroup (e.g. one EP group per data-parallel replica), each process
    learns every EP group's ranks first and creates them all, in the same order everywhere.
    """
    timeout = timedelta(seconds=timeout_s)
    ranks = dist.get_process_group_ranks(group)
    world = dist.get_world_size()
    if len(ranks) == world:
        return dist.new_group(backend=backend, timeout=timeout)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, sorted(ranks))
    mine = None
    for member_ranks in sorted({tuple(r) for r in everyone}):
        # The same creation order on every process, as new_group requires.
        new = dist.new_group(list(member_ranks), backend=backend, timeout=timeout)
        if list(member_ranks) == sorted(ranks):
            mine = new
    assert mine is not None
    return mine


def bound_group_timeout(group: dist.ProcessGroup, timeout_s: float) -> bool:
    """Make collectives issued on ``group`` from now on time out after ``timeout_s`` (the group is
    the user's: the NCCL EP group the forward runs on). Uses PyTorch's setter for an existing
    group (``torch.distributed.distributed_c10d._set_pg_timeout``, for NCCL and gloo backends).

    Returns False (and changes nothing) where this PyTorch has no such setter or it refuses;
    the caller then tells the user to create the group with ``timeout=``."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        return False
    try:
        setter(timedelta(seconds=timeout_s), group)
    except Exception as exc:  # noqa: BLE001 - a backend without the setter: the caller says what to do
        logger.debug("could not set the EP group's timeout: %s", exc)
        return False
    return True


def select_communicator(
    name: str,
    *,
    use_async: bool,
    device: torch.device | str,
    group: dist.ProcessGroup | None,
    timeout_s: float = 300.0,
) -> Communicator:
    """Build the communicator a config names, resolving ``"auto"``.

    ``"auto"``: ``local`` for one rank (``group`` None or of size 1). Async rebalancing of CUDA
    tensors: ``torch_p2p`` when every rank of the group is on one host with peer access between
    its GPUs (`eplb.comm.p2p.peer_to_peer_support`) and a first exchange through CUDA IPC works,
    else ``torch_gloo``; both issue no NCCL work, so they can run beside the forward pass's NCCL
    collectives. Sync rebalancing of CUDA tensors: ``torch_nccl`` when the group's backend
    includes NCCL. ``torch_gloo`` otherwise. Any name on one rank also gives ``local``. The choice
    and its reason are logged at INFO on ``logging.getLogger("eplb")`` (rank 0).

    Creating any communicator but ``local`` is collective (it creates a process group): call this
    on every process at the same time.
    """
    device = torch.device(device)
    single = group is None or dist.get_world_size(group) == 1
    communicator = None
    if single:
        chosen, why = "local", "one rank"
    elif name != "auto":
        chosen, why = name, "named in the config"
    elif use_async and device.type == "cuda":
        from eplb.comm.p2p import peer_to_peer_support

        # The same verdict on every rank (gathered), so every rank takes the same branch below.
        why = peer_to_peer_support(group, device)
        chosen = "torch_gloo" if why else "torch_p2p"
        # One gloo group whichever is built: every process of the job creates the same groups in
        # the same order, even when EP groups of one job decide differently.
        gloo_group = dedicated_group(group, "gloo", timeout_s)
        if not why:
            why = "every rank of the EP group is on one host with peer access: receivers pull with device copies"
            try:
                communicator = get_communicator("torch_p2p")(
                    group=group, device=device, timeout_s=timeout_s, gloo_group=gloo_group
                )
            except EPLBError as exc:  # raised on every rank alike (the probe's verdict is gathered)
                chosen, why = "torch_gloo", str(exc)
        if chosen == "torch_gloo":
            why = f"async without peer-to-peer copies, staged through pinned host memory: {why}"
            communicator = get_communicator("torch_gloo")(
                group=group, device=device, timeout_s=timeout_s, gloo_group=gloo_group
            )
    elif use_async:
        chosen, why = "torch_gloo", "async on the CPU"
    elif device.type == "cuda" and "nccl" in str(dist.get_backend(group)).lower():
        chosen, why = "torch_nccl", "sync on CUDA with an NCCL group"
    else:
        chosen, why = "torch_gloo", "sync on the CPU" if device.type == "cpu" else "sync without an NCCL group"
    if communicator is None:
        cls = get_communicator(chosen)
        communicator = cls(group=None if single else group, device=device, timeout_s=timeout_s)
    if communicator.rank == 0:
        logger.info(
            "communicator: %s (requested %r, use_async=%s, device=%s, ranks=%d): %s",
            chosen,
            name,
            use_async,
            device,
            communicator.num_ranks,
            why,
        )
    return communicator


# Last in the file: registering triggers loading the other built-ins, which import the names above.
@register_communicator("local")
class LocalCommunicator(Communicator):
    """One rank: every send is to itself and becomes a plain copy into the matching receive."""

    name = "local"

    def __init__(self, *, group=None, device="cpu", timeout_s=300.0):
        super().__init__(group=None, device=device, timeout_s=timeout_s)
        if group is not None and dist.get_world_size(group) != 1:
            raise EPLBError(
                f"communicator 'local' serves one rank but the group has {dist.get_world_size(group)}; "
                "use 'torch_gloo' or 'torch_nccl' (or 'auto')"
            )

    def _exchange(self, sends, recvs):
        copy_self_pairs(sends, recvs, self.rank)
