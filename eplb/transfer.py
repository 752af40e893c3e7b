"""Transfer plan: which expert weights move where when one layer's placement changes.

Legend: P physical slots per layer, G ranks, S = P // G slots per rank (slot ``s`` lives on rank
``s // S``; its local id there is ``s % S``), E logical experts.

Every rank computes the same plan from the same ``(old, new)`` rows, so no negotiation is needed:

1. A slot whose expert does not change is not touched.
2. A changed slot whose new expert is already on its rank (in the old placement) is filled by a
   local copy from that old slot.
3. Otherwise the expert crosses the network **once** per receiving rank, into the lowest changed
   slot that needs it there; further slots of that rank needing it copy the received weights locally.
4. The sender of each network transfer is the old holder of the expert that has sent the fewest
   experts so far in this layer (ties to the lowest rank), visiting receivers in slot order: the
   senders spread over the replicas.

Received and copied weights land in a staging buffer ``[S, ...]`` and are committed afterwards,
together with the layer's maps, so every read sees the OLD slot contents even when a slot is
both a source and a destination.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from eplb.errors import EPLBError

if TYPE_CHECKING:
    from eplb.comm.base import Communicator

__all__ = [
    "NetworkTransfer",
    "LocalCopy",
    "LayerTransferPlan",
    "plan_layer_transfer",
    "execute_layer_transfer",
    "slot_runs",
    "bytes_per_expert",
]


@dataclass(frozen=True)
class NetworkTransfer:
    """One expert crossing the network. Slots are global ids; ``src_slot`` holds ``expert`` in the
    old placement, ``dst_slot`` receives it (into the receiver's staging buffer)."""

    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


@dataclass(frozen=True)
class LocalCopy:
    """One copy on this rank into ``staging[dst_local]``, from the old slot contents
    (``from_staging=False``) or from a slot already filled in staging by a network transfer."""

    dst_local: int
    src_local: int
    from_staging: bool


@dataclass(frozen=True, kw_only=True)
class LayerTransferPlan:
    """The plan of one layer, as seen by ``rank``.

    Attributes:
        rank, num_ranks, slots_per_rank: ``r``, ``G``, ``S``.
        transfers: every network transfer of the layer (all ranks), in the order they are batched.
        copies: this rank's local copies, in execution order (network receives come first).
        changed_local: this rank's local slot ids whose expert changes — what ``commit`` writes.
        num_changed_slots: changed slots over all ranks.
        num_local_copies: local copies over all ranks.
    """

    rank: int
    num_ranks: int
    slots_per_rank: int
    transfers: tuple[NetworkTransfer, ...]
    copies: tuple[LocalCopy, ...]
    changed_local: tuple[int, ...]
    num_changed_slots: int
    num_local_copies: int

    @property
    def num_network_transfers(self) -> int:
        """Experts crossing the network, over all ranks."""
        return len(self.transfers)

    @property
    def sends(self) -> tuple[NetworkTransfer, ...]:
        """Transfers this rank sends."""
        return tuple(t for t in self.transfers if t.src_rank == self.rank)

    @property
    def recvs(self) -> tuple[NetworkTransfer, ...]:
        """Transfers this rank receives."""
        return tuple(t for t in self.transfers if t.dst_rank == self.rank)

    @property
    def moves_nothing(self) -> bool:
        """True when no slot of the layer changes (on any rank)."""
        return self.num_changed_slots == 0

    def bytes_moved(self, expert_bytes: int) -> int:
        """Bytes crossing the network, over all ranks, for experts of ``expert_bytes`` bytes each."""
        return len(self.transfers) * expert_bytes

    def batches(self, expert_bytes: int, max_transfer_bytes: int) -> list[tuple[NetworkTransfer, ...]]:
        """Split ``transfers`` into batches in which every rank sends plus receives at most
        ``max_transfer_bytes`` (at least one expert, even if it alone is larger).

        First fit in transfer order: each transfer joins the first batch where both its sender
        and its receiver still have room. Deterministic, so every rank forms the same batches.
        """
        if max_transfer_bytes <= 0:
            raise EPLBError(f"max_transfer_bytes ({max_transfer_bytes}) must be > 0")
        per_rank = max(1, max_transfer_bytes // max(expert_bytes, 1))
        batches: list[list[NetworkTransfer]] = []
        used: list[list[int]] = []  # [batch][rank] experts sent + received
        for t in self.transfers:
            fits = (b for b, n in enumerate(used) if n[t.src_rank] < per_rank and n[t.dst_rank] < per_rank)
            b = next(fits, len(batches))
            if b == len(batches):
                batches.append([])
                used.append([0] * self.num_ranks)
            batches[b].append(t)
            used[b][t.src_rank] += 1
            used[b][t.dst_rank] += 1
        return [tuple(b) for b in batches]


def plan_layer_transfer(
    old_phy2log_P: torch.Tensor, new_phy2log_P: torch.Tensor, *, rank: int, num_ranks: int
) -> LayerTransferPlan:
    """Plan how ``rank`` moves from the old to the new placement of one layer.

    Args:
        old_phy2log_P: ``[P]`` int — logical expert of each slot before.
        new_phy2log_P: ``[P]`` int — logical expert of each slot after.
        rank: this rank, in ``[0, num_ranks)``.
        num_ranks: ``G``; must divide ``P``.

    Returns:
        A `LayerTransferPlan`, identical on every rank except for the per-rank fields.
    """
    old = [int(e) for e in torch.as_tensor(old_phy2log_P).reshape(-1).tolist()]
    new = [int(e) for e in torch.as_tensor(new_phy2log_P).reshape(-1).tolist()]
    num_physical = len(old)
    if len(new) != num_physical:
        raise EPLBError(
            f"old and new phy2log rows differ in length ({num_physical} vs {len(new)}); "
            "a rebalance keeps num_physical fixed"
        )
    if num_ranks <= 0 or num_physical % num_ranks:
        raise EPLBError(
            f"num_physical ({num_physical}) must be a multiple of the number of ranks ({num_ranks}); "
            "choose num_redundant_experts so that num_logical + num_redundant_experts divides evenly"
        )
    if not 0 <= rank < num_ranks:
        raise EPLBError(f"rank ({rank}) must be in [0, num_ranks={num_ranks})")
    S = num_physical // num_ranks

    # Step 1: where each expert sits in the old placement (lowest slot per rank).
    old_slot: dict[tuple[int, int], int] = {}
    for s, e in enumerate(old):
        old_slot.setdefault((e, s // S), s)
    holders: dict[int, list[int]] = {}
    for e, g in sorted(old_slot):
        holders.setdefault(e, []).append(g)

    # Step 2: walk the changed slots in order; local copy, or receive once per (expert, rank).
    transfers: list[NetworkTransfer] = []
    received: dict[tuple[int, int], int] = {}  # (expert, rank) -> global slot it lands in
    sent_count = [0] * num_ranks
    copies: list[LocalCopy] = []
    staged_copies: list[LocalCopy] = []
    changed_local: list[int] = []
    num_changed = num_local = 0
    for s in range(num_physical):
        if old[s] == new[s]:
            continue
        e, g = new[s], s // S
        num_changed += 1
        mine = g == rank
        if mine:
            changed_local.append(s - g * S)
        if (e, g) in old_slot:
            num_local += 1
            if mine:
                copies.append(LocalCopy(s - g * S, old_slot[(e, g)] - g * S, from_staging=False))
        elif (e, g) in received:
            num_local += 1
            if mine:
                staged_copies.append(LocalCopy(s - g * S, received[(e, g)] - g * S, from_staging=True))
        else:
            if e not in holders:
                raise EPLBError(
                    f"expert {e} is needed in slot {s} but no slot holds it in the old placement; "
                    "every logical expert must have a replica before a rebalance"
                )
            # Step 3: the least busy old holder sends (ties to the lowest rank).
            src = min(holders[e], key=lambda h: (sent_count[h], h))
            sent_count[src] += 1
            received[(e, g)] = s
            transfers.append(NetworkTransfer(e, src, old_slot[(e, src)], g, s))

    return LayerTransferPlan(
        rank=rank,
        num_ranks=num_ranks,
        slots_per_rank=S,
        transfers=tuple(transfers),
        copies=tuple(copies + staged_copies),
        changed_local=tuple(changed_local),
        num_changed_slots=num_changed,
        num_local_copies=num_local,
    )


def bytes_per_expert(slot_tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of one slot over every per-expert tensor ``[S, ...]`` (weights, biases, scales)."""
    return sum(math.prod(t.shape[1:]) * t.element_size() for t in slot_tensors.values())


def slot_runs(batch: Sequence[NetworkTransfer], rank: int) -> list[tuple[int, int, int, int, int]]:
    """The transfers of ``batch`` that ``rank`` sends or receives, as runs of consecutive slots.

    Transfers between one (sender, receiver) pair whose source slots and destination slots both
    follow on from the previous transfer of that pair (in batch order) merge into one run, so a
    run moves ``count`` rows of each slot tensor as one contiguous view: fewer, larger messages
    (one per tensor and peer when a rank's slots move together). The runs depend only on the
    batch, so a sender and its receiver form the same runs in the same order (the matching rule
    of `eplb.comm.Communicator`).

    Returns:
        ``(src_rank, src_slot, dst_rank, dst_slot, count)`` per run, slots global, in the order
        of each run's first transfer.
    """
    runs: list[list[int]] = []
    last: dict[tuple[int, int], list[int]] = {}  # (src, dst) -> its latest run
    for t in batch:
        if rank not in (t.src_rank, t.dst_rank):
            continue
        run = last.get((t.src_rank, t.dst_rank))
        if run is not None and t.src_slot == run[1] + run[4] and t.dst_slot == run[3] + run[4]:
            run[4] += 1
            continue
        run = [t.src_rank, t.src_slot, t.dst_rank, t.dst_slot, 1]
        last[(t.src_rank, t.dst_rank)] = run
        runs.append(run)
    return [tuple(r) for r in runs]


def execute_layer_transfer(
    plan: LayerTransferPlan,
    slot_tensors: Mapping[str, torch.Tensor],
    staging: Mapping[str, torch.Tensor],
    communicator: Communicator,
    max_transfer_bytes: int,
) -> None:
    """Fill ``staging[name][plan.changed_local]`` with the new experts' weights.

    Network transfers run first, in batches of at most ``max_transfer_bytes`` per rank (see
    `LayerTransferPlan.batches`) when the communicator stages each batch in a buffer
    (``communicator.stages_batches``; else in one exchange), then the local copies. Slot storage
    is only read, so the old contents stay valid for every source; the caller commits staging
    afterwards.

    Args:
        plan: this rank's plan of the layer.
        slot_tensors: name -> ``[S, ...]`` slot storage of the layer (same names and shapes on every rank).
        staging: name -> ``[S, ...]`` buffer of the same shapes and dtypes.
        communicator: an `eplb.comm.Communicator` over the same ranks as the plan.
        max_transfer_bytes: per-rank bound of one batch.
    """
    names = sorted(slot_tensors)
    if sorted(staging) != names:
        raise EPLBError(f"staging holds {sorted(staging)} but the layer's slot tensors are {names}")
    for n in names:
        if staging[n].shape != slot_tensors[n].shape or staging[n].dtype != slot_tensors[n].dtype:
            raise EPLBError(
                f"staging[{n!r}] is {tuple(staging[n].shape)} {staging[n].dtype}, the slots are "
                f"{tuple(slot_tensors[n].shape)} {slot_tensors[n].dtype}; allocate it with torch.empty_like"
            )
    base = plan.rank * plan.slots_per_rank
    if not getattr(communicator, "stages_batches", True):
        max_transfer_bytes = sys.maxsize  # nothing is buffered per batch: one exchange per layer
    for batch in plan.batches(bytes_per_expert(slot_tensors), max_transfer_bytes):
        queued = False
        for src_rank, src_slot, dst_rank, dst_slot, count in slot_runs(batch, plan.rank):
            if src_rank == plan.rank:
                a = src_slot - base
                communicator.add_send([slot_tensors[n][a : a + count] for n in names], dst_rank)
                queued = True
            if dst_rank == plan.rank:
                a = dst_slot - base
                communicator.add_recv([staging[n][a : a + count] for n in names], src_rank)
                queued = True
        if queued:
            communicator.execute()
    with torch.no_grad():
        for c in plan.copies:
            source = staging if c.from_staging else slot_tensors
            for n in names:
                staging[n][c.dst_local].copy_(source[n][c.src_local])
