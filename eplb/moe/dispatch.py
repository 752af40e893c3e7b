"""Dispatchers: send each (token, chosen slot) pair to the rank owning the slot, and back.

Legend: T tokens, K top-k, D hidden size, N rows computed on this rank, S slots per rank,
G ranks, C capacity (the most tokens one rank may send in one forward).

Two protocols share the `Dispatcher` base class:

* **pair** dispatchers (`LocalDispatcher`, `AllToAllDispatcher`) send every (token, k) pair as
  its own row: ``dispatch(x_TD, slots_TK, S) -> (x_ND, local_slot_N, meta)`` and
  ``combine(y_ND, meta) -> y_TKD``; the EPLB layer weights and sums the ``K`` outputs itself.
  `AllToAllDispatcher` reads its split sizes on the host (one sync per layer): the fallback
  for backends or sizes the fixed-capacity dispatcher does not serve.
* **token** dispatchers (`FixedCapacityDispatcher`) send each token at most once to each rank,
  with its ``K`` local slot ids and routing weights:
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
        num_tokens: ``T``.
        row_TG: ``[T, G]`` int64 — row of token ``t`` in the ``[G * C + 1, D]`` combine buffer
            for rank ``g`` (``g * C + position``), or ``G * C`` (a row kept at zero) when the
            token has no pair on rank ``g``.
    """

    num_tokens: int
    row_TG: torch.Tensor


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
    collectives). The split sizes are read on the host (``.tolist()``): one sync per layer, so
    a step with it cannot be captured in a CUDA graph (use `FixedCapacityDispatcher`).
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


class _Buffers:
    """The fixed-size send/receive buffers of one (S, D, K, dtype, device, sentinel, meta dtype):
    allocated once, reused by every layer (layers run one after another on one stream), so CUDA
    graphs see stable addresses."""

    def __init__(self, G: int, C: int, S: int, D: int, K: int, dtype, device, sentinel: int, meta_dtype):
        rows = G * C + 1  # the last row: a target for tokens a rank does not receive / a zero row
        self.send_x = torch.zeros(rows, D, dtype=dtype, device=device)
        self.recv_x = torch.zeros(G * C, D, dtype=dtype, device=device)
        # Per row: K local slot ids, then the bits of the K routing weights (one exchange): int32
        # with float32 weights (exact for bf16/fp16 too), int64 with float64 weights.
        self.empty_meta = torch.zeros(rows, 2 * K, dtype=meta_dtype, device=device)
        self.empty_meta[:, :K] = sentinel
        self.send_meta = self.empty_meta.clone()
        self.recv_meta = torch.empty(G * C, 2 * K, dtype=meta_dtype, device=device)
        self.rank_G1 = torch.arange(G, device=device).unsqueeze(1)  # [G, 1]
        self.rank_1G1 = self.rank_G1.view(1, G, 1)
        self.base_1G = (self.rank_G1 * C - 1).view(1, G)  # a block's start, minus 1 for 1-based counts
        # Per global slot (index -1, the last entry, for padding): owner rank (G: none) and local id.
        slot_Q = torch.arange(G * S, device=device)
        self.dest_Q = torch.cat([slot_Q // S, slot_Q.new_full((1,), G)])
        self.local_Q = torch.cat([slot_Q % S, slot_Q.new_full((1,), sentinel)]).to(meta_dtype)
        self.sentinel = sentinel


class FixedCapacityDispatcher(Dispatcher):
    """Expert parallelism with fixed-size buffers and no host synchronisation (token protocol).

    Every rank sends each of its tokens at most once to each rank that owns one of the token's
    chosen slots, into a fixed block of ``C = max_tokens_per_rank`` rows per destination (the
    layout of DeepEP's low-latency mode): rows beyond a rank's real tokens are padding whose slot
    ids are the sentinel, so no counts are exchanged and every size is known on the host. A
    destination can never overflow (a rank has at most ``C`` tokens, each sent once per rank);
    a forward with more than ``C`` tokens raises `EPLBError` before anything is sent. The
    dispatch is three ``all_to_all_single`` calls of fixed size per layer (activations and
    slot ids + weights there, outputs back) and about twenty small kernels, none of which
    syncs, so a whole step can be captured in a CUDA graph (with NCCL) and replayed.

    Cost: each rank computes ``G * C`` rows per layer, of which the padding rows (sentinel ids)
    cost no GEMM when the experts module skips ids ``>= S`` (transformers experts, probed by the
    EPLB layer at wrap time; eplb's `eplb.moe.SwiGLUExperts`); the buffers take
    ``3 * G * C * D`` activation elements per (hidden size, dtype). Works with one rank too (a
    group of one: the same code path, e.g. to capture it in a graph on one GPU) and over gloo.

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
            buffers = self._buffers[key] = _Buffers(
                self.num_ranks, self.capacity, S, D, K, dtype, device, sentinel, meta_dtype
            )
        return buffers

    def _back_for(self, D: int, dtype, device) -> torch.Tensor:
        key = (D, dtype, device)
        back = self._back.get(key)
        if back is None:
            _refuse_first_use_in_capture(device)
            # G * C rows of outputs, then one row that stays zero (tokens a rank did not receive).
            back = self._back[key] = torch.zeros(self.num_ranks * self.capacity + 1, D, dtype=dtype, device=device)
        return back

    def dispatch_tokens(
        self,
        x_TD: torch.Tensor,
        slots_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        slots_per_rank: int,
        sentinel: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TokenDispatchMeta]:
        """Send each token to the ranks owning its chosen slots.

        Args:
            x_TD: ``[T, D]`` token activations, ``T <= C``.
            slots_TK: ``[T, K]`` int64 global physical slot per pair; ``-1`` marks padding
                (not sent, not computed, contributes zero).
            weights_TK: ``[T, K]`` routing weights (any float dtype; sent as float32, or float64
                when they are, and given back in their dtype: exact).
            slots_per_rank: ``S``.
            sentinel: the local slot id that marks "not a pair of this rank" for the experts
                module (``S`` when it skips ids ``>= S``, else 0 with weight 0).

        Returns:
            ``x_ND [G * C, D]``, ``slots_NK [G * C, K]`` int64 local slot ids (``sentinel`` where
            not this rank's), ``weights_NK [G * C, K]`` (0 where not this rank's), and the meta
            for `combine_tokens`. Padding rows hold stale activations: give them weight 0.

        Raises:
            EPLBError: ``T > C`` (checked from the shape: no sync).
        """
        T, K = slots_TK.shape
        D = x_TD.shape[-1]
        G, C, S = self.num_ranks, self.capacity, slots_per_rank
        if T > C:
            raise EPLBError(
                f"a MoE layer got {T} tokens on rank {self.rank} but max_tokens_per_rank is {C}: the "
                "fixed-capacity dispatcher cannot send more; raise EPLBConfig.max_tokens_per_rank to at "
                "least the largest batch (tokens per forward on one rank), or split the batch"
            )
        wide = weights_TK.dtype == torch.float64
        w_dtype, meta_dtype = (torch.float64, torch.int64) if wide else (torch.float32, torch.int32)
        buf = self._buffers_for(S, D, K, x_TD.dtype, x_TD.device, sentinel, meta_dtype)
        # Step 1: owner rank (G for padding) and local slot id of every pair, and which ranks each
        # token visits.
        dest_TK = buf.dest_Q[slots_TK]
        hit_TG = torch.zeros(T, G + 1, dtype=torch.int64, device=x_TD.device)
        hit_TG.scatter_(1, dest_TK, 1)
        hit_TG = hit_TG[:, :G]
        # Step 2: position of each token in its block of each destination: a prefix sum.
        row_TG = torch.where(hit_TG > 0, buf.base_1G + hit_TG.cumsum(0), G * C)
        # Step 3: fill the send buffers (tokens not sent to a rank land in the spare last row).
        on_TGK = dest_TK.unsqueeze(1) == buf.rank_1G1
        local_TGK = torch.where(on_TGK, buf.local_Q[slots_TK].unsqueeze(1), sentinel)
        w_TGK = torch.where(on_TGK, weights_TK.unsqueeze(1).to(w_dtype), 0.0)
        meta_TG2K = torch.cat([local_TGK, w_TGK.view(meta_dtype)], dim=2)
        buf.send_meta.copy_(buf.empty_meta)
        buf.send_meta.index_put_((row_TG,), meta_TG2K)
        buf.send_x.index_put_((row_TG,), x_TD.unsqueeze(1).expand(T, G, D))
        # Step 4: exchange (fixed sizes: C rows to every rank).
        send_x, send_meta = buf.send_x[: G * C], buf.send_meta[: G * C]
        if self._communicate:
            dist.all_to_all_single(buf.recv_x, send_x, group=self.group)
            dist.all_to_all_single(buf.recv_meta, send_meta, group=self.group)
            x_ND, meta_N2K = buf.recv_x, buf.recv_meta
        else:
            x_ND, meta_N2K = send_x, send_meta
        slots_NK = meta_N2K[:, :K].to(torch.int64)
        weights_NK = meta_N2K[:, K:].view(w_dtype).to(weights_TK.dtype)
        return x_ND, slots_NK, weights_NK, TokenDispatchMeta(num_tokens=T, row_TG=row_TG)

    def combine_tokens(self, y_ND: torch.Tensor, meta: TokenDispatchMeta) -> torch.Tensor:
        """``y_ND [G * C, D]`` (each row: this rank's weighted sum for that token) -> ``y_TD``,
        the sum over ranks in rank order (float32 accumulation with several ranks)."""
        T, G, C = meta.num_tokens, self.num_ranks, self.capacity
        D = y_ND.shape[-1]
        back = self._back_for(D, y_ND.dtype, y_ND.device)
        if self._communicate:
            dist.all_to_all_single(back[: G * C], y_ND.contiguous(), group=self.group)
        else:
            back[: G * C].copy_(y_ND)
        y_TGD = back.index_select(0, meta.row_TG.reshape(-1)).view(T, G, D)
        if G == 1:
            return y_TGD.view(T, D)
        return y_TGD.sum(dim=1, dtype=torch.float32).to(y_ND.dtype)


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
