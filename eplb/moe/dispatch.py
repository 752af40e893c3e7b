"""Dispatchers: send each (token, chosen slot) pair to the rank owning the slot, and back.

Legend: T tokens, K top-k, D hidden size, N rows computed on this rank, S slots per rank,
G ranks, C capacity (the most tokens one rank may send in one forward).

Two protocols share the `Dispatcher` base class:

* **pair** dispatchers (`LocalDispatcher`, `AllToAllDispatcher`) send every (token, k) pair as
  its own row: ``dispatch(x_TD, slots_TK, S) -> (x_ND, local_slot_N, meta)`` and
  ``combine(y_ND, meta) -> y_TKD``; the EPLB layer weights and sums the ``K`` outputs itself.
  `AllToAllDispatcher` reads its split sizes on the host (one sync per layer): the fallback
  for backends or sizes the fixed-capacity dispatcher does not serve.
* **token** dispatchers (`FixedCapacityDispatcher`) send each token once to every rank, with its
  ``K`` slot ids and routing weights:
  ``dispatch_tokens(x_TD, slots_TK, weights_TK, S, sentinel) -> (x_ND, slots_NK, weights_NK,
  meta)``; the experts module weights and sums this rank's pairs of every row (pairs owned by
  another rank carry the ``sentinel`` slot id and weight 0), and ``combine_tokens(y_ND, meta)
  -> y_TD`` sums each token's partial results over the ranks, in rank order.

``dispatch`` returns a frozen `DispatchMeta` (or `TokenDispatchMeta`) that ``combine``
consumes; no state is kept between the two halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from eplb.errors import EPLBError

__all__ = [
    "DispatchMeta",
    "TokenDispatchMeta",
    "Dispatcher",
    "LocalDispatcher",
    "AllToAllDispatcher",
    "FixedCapacityDispatcher",
    "make_dispatcher",
]


@dataclass(frozen=True, kw_only=True)
class DispatchMeta:
    """What `Dispatcher.combine` needs to undo a pair dispatch.

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


@dataclass(frozen=True, kw_only=True)
class TokenDispatchMeta:
    """What `FixedCapacityDispatcher.combine_tokens` needs to undo a token dispatch.

    Attributes:
        num_tokens: ``T``, this rank's tokens (rows ``0..T`` of its block).
    """

    num_tokens: int


class Dispatcher:
    """Base class. Pair dispatchers implement ``dispatch``/``combine``; token dispatchers set
    ``token_level = True`` and implement ``dispatch_tokens``/``combine_tokens``."""

    num_ranks: int = 1
    rank: int = 0
    token_level: bool = False
    health = None
    """The `eplb.comm.recovery.GroupHealth` of the group the collectives run on, when eplb owns
    it (a gloo EP group): a failed collective marks it broken and names the ranks gone."""

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
    """One rank, pair protocol: every pair stays here. Static shapes and no host sync.
    Padding pairs (slot ``-1``) are computed on slot 0 and come back with that slot's output
    (not zeroed: the caller must give them weight 0). The EPLB layer uses it only for experts
    modules that sum in expert order; otherwise one rank needs no dispatcher at all."""

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
    """Expert parallelism over a process group with variable-size ``all_to_all_single``.

    Ranks may send different numbers of tokens, zero included, with no size limit; every rank
    of the group must call ``dispatch``/``combine`` the same number of times (they are
    collectives). The split sizes are read on the host (one ``.tolist()`` of the send and receive
    counts): one sync per layer, so a step with it cannot be captured in a CUDA graph (use
    `FixedCapacityDispatcher`). Its work is proportional to the real pairs, so with large batches
    in eager mode it realises a rebalance's predicted speed-up where the fixed blocks do not.
    """

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def dispatch(self, x_TD, slots_TK, slots_per_rank):
        T, K = slots_TK.shape
        G = self.num_ranks
        flat = slots_TK.reshape(-1)
        # Destination rank of every pair; padding (-1) gets G, so it sorts last and is not sent.
        dest = torch.where(flat >= 0, torch.div(flat, slots_per_rank, rounding_mode="floor"), G)
        # Stable sort keeps pairs of one destination in (token, k) order: deterministic.
        order_all = torch.argsort(dest, stable=True)
        # Counts with scatter_add_ (bincount would read its maximum on the host).
        counts = torch.zeros(G + 1, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, dest, torch.ones_like(dest))
        send_counts_G = counts[:G]
        recv_counts_G = torch.empty_like(send_counts_G)
        dist.all_to_all_single(recv_counts_G, send_counts_G, group=self.group)
        sizes = torch.cat([send_counts_G, recv_counts_G]).tolist()  # the one host sync per layer
        send_counts, recv_counts = tuple(sizes[:G]), tuple(sizes[G:])
        order = order_all[: sum(send_counts)]
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


class _Buffers:
    """The fixed-size buffers of one (S, D, K, dtype, device, sentinel, meta dtype): allocated once,
    reused by every layer (layers run one after another on one stream), so CUDA graphs see stable
    addresses."""

    def __init__(self, G: int, C: int, S: int, D: int, K: int, rank: int, dtype, device, sentinel: int, meta_dtype):
        # Per row: the D activations, then K global slot ids (-1: padding) and the bits of the K
        # routing weights: int32 with float32 weights (exact for bf16/fp16 too), int64 with
        # float64. Both parts share one byte row, so one all-gather moves them, when the meta
        # part's offset and the row length suit both dtypes (else two buffers, two all-gathers).
        x_size = torch.empty((), dtype=dtype).element_size()
        meta_size = torch.empty((), dtype=meta_dtype).element_size()
        x_bytes, row = D * x_size, D * x_size + 2 * K * meta_size
        self.packed = x_bytes % meta_size == 0 and row % x_size == 0 and row % meta_size == 0
        self.pad_meta = torch.zeros(C, 2 * K, dtype=meta_dtype, device=device)
        self.pad_meta[:, :K] = -1
        if self.packed:
            self.send_bytes = torch.zeros(C, row, dtype=torch.uint8, device=device)
            self.recv_bytes = torch.zeros(G * C, row, dtype=torch.uint8, device=device)
            self.send_x = self.send_bytes[:, :x_bytes].view(dtype)  # [C, D], row stride row / x_size
            self.send_meta = self.send_bytes[:, x_bytes:].view(meta_dtype)
            self.recv_x = self.recv_bytes[:, :x_bytes].view(dtype)
            self.recv_meta = self.recv_bytes[:, x_bytes:].view(meta_dtype)
        else:
            self.send_x = torch.zeros(C, D, dtype=dtype, device=device)
            self.recv_x = torch.zeros(G * C, D, dtype=dtype, device=device)
            self.send_meta = torch.zeros(C, 2 * K, dtype=meta_dtype, device=device)
            self.recv_meta = torch.zeros(G * C, 2 * K, dtype=meta_dtype, device=device)
        self.send_meta.copy_(self.pad_meta)
        self.recv_meta.copy_(self.pad_meta.repeat(G, 1))
        # Per global slot, then one entry for padding (id -1 wraps to it): its local id on this
        # rank, or the sentinel when another rank owns it; and whether this rank owns it.
        slot_Q = torch.arange(G * S, device=device)
        mine_Q = slot_Q // S == rank
        self.local_Q = torch.cat([torch.where(mine_Q, slot_Q % S, sentinel), slot_Q.new_full((1,), sentinel)])
        self.mine_Q = torch.cat([mine_Q, mine_Q.new_zeros(1)])


class FixedCapacityDispatcher(Dispatcher):
    """Expert parallelism with fixed-size buffers and no host synchronisation (token protocol).

    Every rank contributes a fixed block of ``C = max_tokens_per_rank`` rows: its ``T <= C``
    tokens, each with its ``K`` global slot ids and routing weights (rows ``T..C`` are padding).
    The blocks are all-gathered, so every rank sees every token of the group once (token ``t`` of
    rank ``g`` at row ``g * C + t``); a rank computes, for every row, its own pairs (the slot ids
    of other ranks become the sentinel, with weight 0), and the ``[G * C, D]`` partial sums go
    back to their ranks in one ``all_to_all_single``, where they are added in rank order. Every
    size is known on the host (the fixed blocks of DeepEP's low-latency mode), nothing is
    counted or compacted, so no prefix sums, no counts exchanged, no sync: a whole step can be
    captured in a CUDA graph (with NCCL) and replayed. A destination cannot overflow (each rank
    sends ``C`` rows); a forward with more than ``C`` tokens raises `EPLBError` before anything
    is sent. Per layer: one all-gather (activations, slot ids and weights share each row) and one
    all-to-all (outputs), and about seven small kernels.

    Cost: each rank computes ``G * C`` rows per layer whatever the routing; the pairs of other
    ranks (sentinel ids) cost no GEMM when the experts module skips ids ``>= S`` (transformers
    experts, probed by the EPLB layer at wrap time; eplb's `eplb.moe.SwiGLUExperts`), but the
    module's per-pair passes (sort, gathers, weighting) still see all ``G * C * K`` pairs. The
    buffers take ``(2 G + 1) * C * D`` activation elements per (hidden size, dtype). Works with
    one rank too (a group of one: the same code path, e.g. to capture it in a graph on one GPU)
    and over gloo.

    Args:
        group: the expert-parallel process group, or None with one process (no communication).
        max_tokens_per_rank: ``C``, the most tokens any rank passes to one MoE layer at once.
    """

    token_level = True

    def __init__(self, group: dist.ProcessGroup | None, max_tokens_per_rank: int):
        if isinstance(max_tokens_per_rank, bool) or not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1:
            raise EPLBError(f"max_tokens_per_rank ({max_tokens_per_rank!r}) must be an int >= 1")
        self.group = group
        distributed = group is not None and dist.is_available() and dist.is_initialized()
        self.num_ranks = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self._communicate = distributed
        self.capacity = max_tokens_per_rank
        self._buffers: dict[tuple, _Buffers] = {}
        self._back: dict[tuple, torch.Tensor] = {}

    def _buffers_for(self, S: int, D: int, K: int, dtype, device, sentinel: int, meta_dtype) -> _Buffers:
        key = (S, D, K, dtype, device, sentinel, meta_dtype)
        buffers = self._buffers.get(key)
        if buffers is None:
            _refuse_first_use_in_capture(device)
            try:
                buffers = _Buffers(
                    self.num_ranks, self.capacity, S, D, K, self.rank, dtype, device, sentinel, meta_dtype
                )
            except RuntimeError as exc:  # torch.OutOfMemoryError too: not a peer's failure, a size
                G, C = self.num_ranks, self.capacity
                row = D * dtype.itemsize + 2 * K * meta_dtype.itemsize
                raise EPLBError(
                    f"the fixed-capacity dispatcher could not allocate its buffers for max_tokens_per_rank={C} "
                    f"(({G} + 2) x {C} rows of {row} bytes, about {(G + 2) * C * row / 2**30:.3g} GiB on {device}); "
                    "set EPLBConfig.max_tokens_per_rank to the most tokens one rank passes to a MoE layer at once"
                ) from exc
            self._buffers[key] = buffers
        return buffers

    def dispatch_tokens(
        self,
        x_TD: torch.Tensor,
        slots_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        slots_per_rank: int,
        sentinel: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TokenDispatchMeta]:
        """Send every token, with its slots and weights, to every rank; keep this rank's pairs.

        Args:
            x_TD: ``[T, D]`` token activations, ``T <= C``.
            slots_TK: ``[T, K]`` int64 global physical slot per pair; ``-1`` marks padding
                (not computed, contributes zero).
            weights_TK: ``[T, K]`` routing weights (any float dtype; sent as float32, or float64
                when they are, and given back in their dtype: exact).
            slots_per_rank: ``S``.
            sentinel: the local slot id that marks "not a pair of this rank" for the experts
                module (``S`` when it skips ids ``>= S``, else 0 with weight 0).

        Returns:
            ``x_ND [G * C, D]`` (row ``g * C + t``: token ``t`` of rank ``g``; each row
            contiguous, the row stride may exceed ``D``: the rows share a buffer with the slot
            ids), ``slots_NK
            [G * C, K]`` int64 local slot ids (``sentinel`` where not this rank's),
            ``weights_NK [G * C, K]`` (0 where not this rank's), and the meta for
            `combine_tokens`. Rows past a rank's ``T`` are padding (stale activations, sentinel
            ids, weight 0); their outputs are never read.

        Raises:
            EPLBError: ``T > C`` (checked from the shape: no sync).
        """
        T, K = slots_TK.shape
        D = x_TD.shape[-1]
        C, S = self.capacity, slots_per_rank
        if T > C:
            raise EPLBError(
                f"a MoE layer got {T} tokens on rank {self.rank} but max_tokens_per_rank is {C}: the "
                "fixed-capacity dispatcher cannot send more; raise EPLBConfig.max_tokens_per_rank to at "
                "least the largest batch (tokens per forward on one rank), or split the batch"
            )
        wide = weights_TK.dtype == torch.float64
        w_dtype, meta_dtype = (torch.float64, torch.int64) if wide else (torch.float32, torch.int32)
        buf = self._buffers_for(S, D, K, x_TD.dtype, x_TD.device, sentinel, meta_dtype)
        # Step 1: this rank's block: slot ids and weight bits of its T tokens, padding after them.
        send_meta = buf.send_meta
        send_meta[:T, :K].copy_(slots_TK)
        send_meta[:T, K:].view(w_dtype).copy_(weights_TK)
        if T < C:
            send_meta[T:].copy_(buf.pad_meta[T:])
        if T == C and x_TD.is_contiguous() and not buf.packed:
            send_x = x_TD
        else:
            send_x = buf.send_x
            send_x[:T].copy_(x_TD)
        # Step 2: every rank gets every block (fixed sizes).
        if not self._communicate:
            x_ND, meta_N2K = send_x, send_meta
        elif buf.packed:
            _all_gather(buf.recv_bytes, buf.send_bytes, self.group)
            x_ND, meta_N2K = buf.recv_x, buf.recv_meta
        else:
            _all_gather(buf.recv_x, send_x, self.group)
            _all_gather(buf.recv_meta, send_meta, self.group)
            x_ND, meta_N2K = buf.recv_x, buf.recv_meta
        # Step 3: keep this rank's pairs (other ranks' slots and padding -> sentinel, weight 0).
        global_NK = meta_N2K[:, :K]
        slots_NK = buf.local_Q[global_NK]
        weights_NK = torch.where(buf.mine_Q[global_NK], meta_N2K[:, K:].view(w_dtype), 0.0).to(weights_TK.dtype)
        return x_ND, slots_NK, weights_NK, TokenDispatchMeta(num_tokens=T)

    def combine_tokens(self, y_ND: torch.Tensor, meta: TokenDispatchMeta) -> torch.Tensor:
        """``y_ND [G * C, D]`` (each row: this rank's weighted sum for that token) -> ``y_TD``,
        the sum over ranks in rank order (accumulated in float32, or float64 for float64 outputs)."""
        T, G, C = meta.num_tokens, self.num_ranks, self.capacity
        D = y_ND.shape[-1]
        if G == 1:
            y_CD = y_ND
            if self._communicate:
                y_CD = self._back_for(D, y_ND.dtype, y_ND.device)
                dist.all_to_all_single(y_CD, y_ND.contiguous(), group=self.group)
            return y_CD[:T]
        back = self._back_for(D, y_ND.dtype, y_ND.device)
        dist.all_to_all_single(back, y_ND.contiguous(), group=self.group)
        if G == 2:  # one add: computed in float32 and rounded once, as the sum below
            return torch.add(back[:T], back[C : C + T])
        wide = torch.promote_types(y_ND.dtype, torch.float32)
        return back.view(G, C, D)[:, :T].sum(dim=0, dtype=wide).to(y_ND.dtype)

    def _back_for(self, D: int, dtype, device) -> torch.Tensor:
        """The ``[G * C, D]`` receive buffer of the outputs, shared by the layers."""
        key = (D, dtype, device)
        back = self._back.get(key)
        if back is None:
            _refuse_first_use_in_capture(device)
            back = self._back[key] = torch.zeros(self.num_ranks * self.capacity, D, dtype=dtype, device=device)
        return back


def _all_gather(out: torch.Tensor, part: torch.Tensor, group) -> None:
    """``out [G * n, ...]`` <- every rank's ``part [n, ...]``, in rank order."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, part, group=group)


def _refuse_first_use_in_capture(device) -> None:
    # Buffers made inside a capture would hold their initial values only once the graph is
    # replayed; every eager use before that would read garbage.
    if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise EPLBError(
            "the fixed-capacity dispatcher allocates its buffers at the first forward; run the model once "
            "(a warm-up forward, as torch.cuda.graphs recommends) before capturing it in a CUDA graph"
        )


def make_dispatcher(
    group: dist.ProcessGroup | None, *, kind: str = "auto", max_tokens_per_rank: int | None = None
) -> Dispatcher | None:
    """The dispatcher for an expert-parallel group.

    Args:
        group: the expert-parallel process group (a group of one rank is allowed), or None.
        kind: ``"auto"``, ``"all_to_all"`` or ``"fixed_capacity"`` (see ``EPLBConfig.dispatcher``).
        max_tokens_per_rank: ``C`` for `FixedCapacityDispatcher`.

    Returns:
        None for one rank under ``"auto"``/``"all_to_all"`` (the EPLB layer then calls the experts
        module directly), `FixedCapacityDispatcher` for ``"fixed_capacity"`` (any group size, so
        the expert-parallel path can run, and be captured, on one rank) or for ``"auto"`` with
        several ranks and ``max_tokens_per_rank`` set, else `AllToAllDispatcher`.
    """
    distributed = group is not None and dist.is_available() and dist.is_initialized()
    num_ranks = dist.get_world_size(group) if distributed else 1
    if kind == "fixed_capacity":
        if max_tokens_per_rank is None:
            raise EPLBError(
                "dispatcher='fixed_capacity' needs max_tokens_per_rank (the most tokens one rank passes to a "
                "MoE layer at once); set EPLBConfig.max_tokens_per_rank"
            )
        return FixedCapacityDispatcher(group if distributed else None, max_tokens_per_rank)
    if kind not in ("auto", "all_to_all"):
        raise EPLBError(f"dispatcher {kind!r} is unknown; use 'auto', 'all_to_all' or 'fixed_capacity'")
    if num_ranks == 1:
        return None
    if kind == "auto" and max_tokens_per_rank is not None:
        return FixedCapacityDispatcher(group, max_tokens_per_rank)
    return AllToAllDispatcher(group)
