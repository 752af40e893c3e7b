"""Dispatchers: send each (token, chosen slot) pair to the rank owning the slot, and back.

Legend: T tokens, K top-k, D hidden size, N pairs received by this rank, S slots per rank,
G ranks. ``dispatch`` returns a frozen `DispatchMeta` that ``combine`` consumes; no state is
kept between the two halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DispatchMeta", "Dispatcher", "LocalDispatcher", "AllToAllDispatcher", "make_dispatcher"]


@dataclass(frozen=True, kw_only=True)
class DispatchMeta:
    """What `Dispatcher.combine` needs to undo a dispatch.

    Attributes:
        num_tokens: ``T``.  top_k: ``K``.
        order: ``[M]`` int64 or None — flat pair index (``t * K + k``) of each sent row, sorted by
            destination rank; None for the local dispatcher (all ``T * K`` pairs, in order).
        send_counts / recv_counts: rows sent to / received from each rank (all-to-all only).
    """

    num_tokens: int
    top_k: int
    order: torch.Tensor | None = None
    send_counts: tuple[int, ...] = ()
    recv_counts: tuple[int, ...] = ()


class Dispatcher:
    """Base class: ``dispatch`` pairs to slot owners, ``combine`` their outputs back."""

    num_ranks: int = 1
    rank: int = 0

    def dispatch(
        self, x_TD: torch.Tensor, slots_TK: torch.Tensor, slots_per_rank: int
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        """Send pairs to the ranks owning their slots.

        Args:
            x_TD: ``[T, D]`` token activations.
            slots_TK: ``[T, K]`` int64 global physical slot per pair; ``-1`` marks padding.
            slots_per_rank: ``S``.
        Returns:
            ``x_ND`` (rows to compute here), ``local_slot_N`` (slot index in ``[0, S)``), meta.
        """
        raise NotImplementedError

    def combine(self, y_ND: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """Return each pair's output to its token: ``y_ND -> y_TKD``."""
        raise NotImplementedError


class LocalDispatcher(Dispatcher):
    """One rank: every pair stays here. Static shapes and no host sync (CUDA-graph safe).
    Padding pairs (slot ``-1``) are computed on slot 0 and come back with that slot's output
    (not zeroed: the caller must give them weight 0)."""

    def dispatch(self, x_TD, slots_TK, slots_per_rank):
        T, K = slots_TK.shape
        # Explicit sizes, not -1: with zero tokens a -1 would be ambiguous.
        x_ND = x_TD.unsqueeze(1).expand(T, K, x_TD.shape[-1]).reshape(T * K, x_TD.shape[-1])
        local_slot_N = slots_TK.reshape(-1).clamp(min=0)
        meta = DispatchMeta(num_tokens=T, top_k=K, order=None)
        return x_ND, local_slot_N, meta

    def combine(self, y_ND, meta):
        return y_ND.reshape(meta.num_tokens, meta.top_k, y_ND.shape[-1])


class AllToAllDispatcher(Dispatcher):
    """Expert parallelism over a process group with ``all_to_all_single``.

    Ranks may send different numbers of tokens, zero included; every rank of the group must
    call ``dispatch``/``combine`` the same number of times (they are collectives).
    """

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def dispatch(self, x_TD, slots_TK, slots_per_rank):
        T, K = slots_TK.shape
        flat = slots_TK.reshape(-1)
        valid = (flat >= 0).nonzero().squeeze(1)
        dest = flat[valid] // slots_per_rank
        # Stable sort keeps pairs of one destination in (token, k) order: deterministic.
        perm = torch.argsort(dest, stable=True)
        order = valid[perm]
        send_counts_G = torch.bincount(dest, minlength=self.num_ranks)
        recv_counts_G = torch.empty_like(send_counts_G)
        dist.all_to_all_single(recv_counts_G, send_counts_G, group=self.group)
        send_counts = tuple(send_counts_G.tolist())
        recv_counts = tuple(recv_counts_G.tolist())
        send_x = x_TD.index_select(0, torch.div(order, K, rounding_mode="floor"))
        send_slot = flat.index_select(0, order)
        recv_x = x_TD.new_empty((sum(recv_counts), x_TD.shape[-1]))
        recv_slot = flat.new_empty((sum(recv_counts),))
        dist.all_to_all_single(recv_x, send_x.contiguous(), list(recv_counts), list(send_counts), group=self.group)
        dist.all_to_all_single(recv_slot, send_slot, list(recv_counts), list(send_counts), group=self.group)
        local_slot_N = recv_slot - self.rank * slots_per_rank
        meta = DispatchMeta(num_tokens=T, top_k=K, order=order, send_counts=send_counts, recv_counts=recv_counts)
        return recv_x, local_slot_N, meta

    def combine(self, y_ND, meta):
        back = y_ND.new_empty((sum(meta.send_counts), y_ND.shape[-1]))
        dist.all_to_all_single(
            back, y_ND.contiguous(), list(meta.send_counts), list(meta.recv_counts), group=self.group
        )
        y_MD = y_ND.new_zeros((meta.num_tokens * meta.top_k, y_ND.shape[-1]))
        y_MD.index_copy_(0, meta.order, back)
        return y_MD.reshape(meta.num_tokens, meta.top_k, y_ND.shape[-1])


def make_dispatcher(group: dist.ProcessGroup | None) -> Dispatcher:
    """`LocalDispatcher` without a group (or with a group of one rank), else `AllToAllDispatcher`."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return LocalDispatcher()
    return AllToAllDispatcher(group)
