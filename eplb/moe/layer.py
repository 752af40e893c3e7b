"""`EPLBExperts`: the EPLB expert layer, the one chokepoint every routed token passes.

Legend: T tokens, K top-k, D hidden size, E logical experts, P physical slots, S = P // G slots
on this rank, G ranks, N rows computed on this rank, X = P - E + 1 (the widest possible
replica count), H replica-hash buckets.

One forward: mask padding rows (`EPLBExperts.valid_tokens`) → record the logical ids into the
tracker → map each (token, logical expert) to one replica's physical slot → then one of three
paths, none of which syncs with the host except the all-to-all fallback:

* one rank, an experts module that sums in top-k order (transformers ``grouped_mm`` /
  ``batched_mm``, eplb's `SwiGLUExperts`): the experts module gets ``x_TD``, the slot ids
  ``[T, K]`` and the routing weights directly — the same call as unwrapped, with slots for
  experts, so the result is the replaced module's (bitwise when its matmuls are);
* a token dispatcher (`eplb.moe.dispatch.FixedCapacityDispatcher`): each token goes once to every
  rank owning one of its slots, that rank's experts module weights and sums its pairs, and the
  partial sums come back and are added in rank order;
* a pair dispatcher (the all-to-all fallback, or one rank with an experts module that sums in
  expert order): every pair is computed alone, comes back, and is weighted and summed here in
  the replaced module's order.

Router ids ``< 0`` (and rows masked by ``valid_tokens``) are padding: not recorded, not sent,
and they contribute zero. They cost no expert compute where the experts module skips slot ids
``>= S`` (see `EPLBExperts`), else they are computed on slot 0 with weight 0.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from torch import nn

from eplb.atomic import critical_section
from eplb.comm.collectives import all_gather_rows
from eplb.errors import EPLBError, peer_failure
from eplb.moe.adapters import direct_tensors, replace_expert_tensors
from eplb.moe.dispatch import Dispatcher, LocalDispatcher
from eplb.moe.reference import SwiGLUExperts
from eplb.moe.slot_layer import PreparedCommit
from eplb.placement import Placement
from eplb.tracker import check_num_valid_tokens

if TYPE_CHECKING:
    from eplb.tracker import LoadTracker

__all__ = ["EPLBExperts", "PreparedCommit", "ReplicaChoice"]  # PreparedCommit: defined in eplb.moe.slot_layer

_HASH_MASK = 0x7FFFFFFF  # keys stay < 2**31 so the 32-bit mixing below never overflows int64
_BUCKETS = 512
"""H: hash buckets of the replica choice. Bucket ``h`` uses replica ``h % logcnt``, so replicas of an
expert with ``c`` copies get shares within ``c / H`` of each other."""
ReplicaChoice = Literal["hash", "round_robin"]


def _mix32(key: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (murmur3 finaliser) of non-negative int64 keys ``< 2**31``.

    Consecutive keys land on unrelated values, so ``hash % n`` spreads any subset of tokens
    evenly over ``n`` replicas even when the router's choices correlate with the token index.
    """
    h = key & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


class EPLBExperts(nn.Module):
    """Replaces a stacked-experts module (see `eplb.moe.adapters`) by physical slots.

    Args:
        experts: the module replaced, following ``experts(hidden_states, top_k_index,
            top_k_weights)`` with per-expert tensors ``[E, ...]``. It is not modified; this layer
            keeps a shallow copy (``self.experts``) whose per-expert tensors are this rank's slots.
        expert_tensors: names of the per-expert parameters/buffers of ``experts``.
        layer_index: position of the layer among the model's MoE layers (tracker row).
        phy2log: ``[P]`` int — the initial placement row (logical expert of each slot).
        num_ranks: ``G``, ranks of the expert-parallel group.
        rank: this rank's index in the group.
        dispatcher: moves tokens to slot owners; None (one rank: the experts module is called
            directly), a token dispatcher (`eplb.moe.dispatch.FixedCapacityDispatcher`) or a pair
            dispatcher (`eplb.moe.dispatch.AllToAllDispatcher`).
        tracker: a `eplb.tracker.LoadTracker` to record logical ids into, or None.
        device: where the slots live when ``experts`` is on the ``meta`` device (then the
            slots are allocated empty there, to be filled by a checkpoint load); ignored otherwise.
        replica_choice: how a pair picks one of its expert's replicas: ``"hash"`` (a hash of
            the token index, salted per rank and layer: every replica gets an equal share on
            average) or ``"round_robin"`` (the pairs of each expert in this batch take the
            replicas in turn: equal shares, within one pair, in every batch; a few more kernels).

    Padding: ``valid_tokens`` (None, an int, or a 0-d integer tensor on the layer's device that
    may be updated in place between CUDA-graph replays) marks rows ``>= valid_tokens`` as padding;
    `eplb.EPLBWrapper.set_valid_tokens` sets it on every layer. Padding rows and router ids
    ``< 0`` are not recorded, not dispatched and contribute zero to the output. An experts module
    that skips slot ids ``>= S`` computes nothing for them: a module declaring
    ``eplb_skips_out_of_range_ids = True``, or transformers experts (probed once here, as they
    are and marked ``_is_expert_parallel``; versions differ). Other modules compute them on slot 0
    with weight 0, as does a module that skips only when marked, in a one-rank forward without
    ``valid_tokens`` (marking costs it masking passes over every row).

    Attributes ``layer_index``, ``num_logical`` (E), ``num_physical`` (P), ``num_ranks`` (G),
    ``rank`` (r) and ``slots_per_rank`` (S) describe the layer.

    Buffers (on the weights' device, updated in place by `commit`, never reallocated):
        phy2log ``[P]`` int64; replica_slots ``[E, P - E + 1]`` int64 — the slots of each logical
        expert, ``-1`` padded to the widest possible replica count (one layer's ``log2phy`` at a
        fixed width, so the storage never changes); logcnt ``[E]`` int64.

    It implements `eplb.moe.SlotLayer`, the executors' contract.

    Gradients: with ``G == 1`` and no redundant slot (``P == E``) backward gives the replaced
    module's gradients (slot ``s`` gets expert ``phy2log[s]``'s). With ``P > E`` forwards work in
    any mode, and gradients for the inputs and the router are exact, but a backward that reaches
    the slot weights raises `EPLBError` (each replica would get only its own tokens' gradient).
    With ``G > 1`` a training-mode forward with grad enabled raises `EPLBError` when anything
    requires grad (the all-to-all is not differentiable here); eval mode or ``torch.no_grad()``
    work.
    """

    def __init__(
        self,
        experts: nn.Module,
        expert_tensors: Sequence[str],
        *,
        layer_index: int,
        phy2log: torch.Tensor,
        num_ranks: int = 1,
        rank: int = 0,
        dispatcher: Dispatcher | None = None,
        tracker: LoadTracker | None = None,
        device: torch.device | str | None = None,
        replica_choice: ReplicaChoice = "hash",
    ):
        super().__init__()
        owned = direct_tensors(experts)
        names = tuple(expert_tensors)
        if not names or any(n not in owned for n in names):
            raise EPLBError(
                f"expert_tensors {names} must name direct parameters/buffers of {type(experts).__name__}"
            )
        num_logical = int(owned[names[0]].shape[0])
        row_P = torch.as_tensor(phy2log, dtype=torch.int64).reshape(-1).cpu()
        Placement.from_phy2log(row_P, num_logical).validate(num_ranks)  # fail before building anything
        P = row_P.numel()
        S = P // num_ranks
        if not 0 <= rank < num_ranks:
            raise EPLBError(f"rank ({rank}) must be in [0, num_ranks={num_ranks})")
        self.layer_index = int(layer_index)
        self.num_logical = num_logical
        self.num_physical = P
        self.num_ranks = num_ranks
        self.rank = rank
        self.slots_per_rank = S
        if replica_choice not in ("hash", "round_robin"):
            raise EPLBError(f"replica_choice ({replica_choice!r}) must be 'hash' or 'round_robin'")
        self.dispatcher = dispatcher
        self.tracker = tracker
        self.replica_choice = replica_choice
        self.valid_tokens: torch.Tensor | int | None = None
        self._names = names
        # Slot s of this rank holds logical expert own_S[s]: gather those rows into fresh storage.
        own_S = row_P[rank * S : (rank + 1) * S]
        self._empty_slots = owned[names[0]].device.type == "meta"  # to be filled by a checkpoint load
        if self._empty_slots:
            if device is None or torch.device(device).type == "meta":
                raise EPLBError(
                    f"MoE layer {layer_index}: the experts are on the meta device; pass device= (where this "
                    "rank's slots are allocated)"
                )
            device = torch.device(device)
            slots = {n: torch.empty((S, *owned[n].shape[1:]), dtype=owned[n].dtype, device=device) for n in names}
        else:
            device = owned[names[0]].device
            slots = {n: owned[n].detach().index_select(0, own_S.to(owned[n].device)) for n in names}
        self.experts = replace_expert_tensors(experts, slots)
        self.register_buffer("phy2log", row_P.to(device, copy=True), persistent=False)
        self.register_buffer(
            "replica_slots",
            torch.empty(num_logical, P - num_logical + 1, dtype=torch.int64, device=device),
            persistent=False,
        )
        self.register_buffer(
            "logcnt", torch.empty(num_logical, dtype=torch.int64, device=device), persistent=False
        )
        # Salt the replica hash per rank and layer: ranks with few tokens then use different replicas.
        self._hash_salt = (rank * 0x9E3779B1 + self.layer_index * 0x632BE5AB) & _HASH_MASK
        self._init_replica_choice(device)
        self._row_P = row_P.clone()  # host copy of the committed phy2log row, set by apply_commit
        self.apply_commit(self.prepare_commit(row_P), None)
        self.train(experts.training)
        self._hooked: set[int] = set()  # ids of slot parameters carrying _refuse_replica_grad
        # Slot ids >= S mark pairs to skip (padding, another rank's pairs) where the module allows:
        # always (`_skips_plain`), or once marked expert-parallel (`_skips_marked`).
        self._was_expert_parallel = getattr(self.experts, "_is_expert_parallel", None)
        self._marked: bool | None = None  # the last value set by _mark_expert_parallel
        self._skips_plain, self._skips_marked = self._probe_skipping()
        self._combine_order = self.combine_order()  # read once: the forward is the hot path
        # Modules known to read hidden_states only by row indexing (transformers experts, eplb's
        # SwiGLUExperts) take the token dispatcher's strided rows as they are; others get a copy.
        self._gathers_rows = self._was_expert_parallel is not None or type(self.experts) is SwiGLUExperts
        self._row_ids_T1 = torch.arange(0, device=device).unsqueeze(1)  # grows to the largest T
        # Padding ids (-1) map to: nothing for a dispatcher (-1), a skipped slot (S), or slot 0
        # with weight 0 when the module cannot skip unmarked.
        pad_slot = -1 if dispatcher is not None else (S if self._skips_plain else 0)
        self._replica_HC[:, num_logical] = pad_slot

    # ------------------------------------------------------------------ SlotLayer (the executors' contract)
    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """Name -> this rank's slot storage ``[S, ...]`` of every per-expert tensor (weights,
        biases, scales). Detached aliases of the live storage: writing rows writes the slots."""
        owned = direct_tensors(self.experts)
        return {n: owned[n].detach() for n in self._names}

    def placement_row(self) -> torch.Tensor:
        """``[P]`` int64 CPU copy of the committed ``phy2log`` row (kept on the host by every
        commit, so reading it never waits for the device)."""
        return self._row_P.clone()

    def commit(
        self,
        phy2log_P: torch.Tensor,
        *,
        slots: torch.Tensor | None = None,
        staged: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Switch this layer to a new placement row in one step: weights and maps together.

        Args:
            phy2log_P: ``[P]`` int — the new row (validated: every expert keeps >= 1 replica).
            staged: name -> ``[S, ...]`` tensors holding the new contents of the changed slots.
            slots: int64 local slot ids (in ``[0, S)``) to copy from ``staged``; may be empty.

        Runs on the caller's current stream; copies in place (same storage) under no_grad.
        Equivalent to ``apply_commit(prepare_commit(phy2log_P, slots=slots, staged=staged), staged)``.
        """
        self.apply_commit(self.prepare_commit(phy2log_P, slots=slots, staged=staged), staged)

    def prepare_commit(
        self,
        phy2log_P: torch.Tensor,
        *,
        slots: torch.Tensor | None = None,
        staged: dict[str, torch.Tensor] | None = None,
    ) -> PreparedCommit:
        """Validate a commit and put everything it needs on the device, ahead of time.

        The async executor calls this on its worker (on the side stream), so that `apply_commit`
        on the main thread issues only device-to-device copies: no host sync, no host-to-device
        copy from pageable memory. Returns a `PreparedCommit`.
        """
        row_P = torch.as_tensor(phy2log_P, dtype=torch.int64).reshape(-1).cpu()
        if row_P.numel() != self.num_physical:
            raise EPLBError(
                f"phy2log row has {row_P.numel()} slots; this layer has num_physical={self.num_physical}"
            )
        placement = Placement.from_phy2log(row_P, self.num_logical).validate(self.num_ranks)
        slot_ids = torch.as_tensor(slots if slots is not None else [], dtype=torch.int64).reshape(-1).cpu()
        if slot_ids.numel():
            if staged is None:
                raise EPLBError("commit got slots to copy but no staged tensors")
            if slot_ids.min() < 0 or slot_ids.max() >= self.slots_per_rank:
                raise EPLBError(f"commit slots must be local slot ids in [0, {self.slots_per_rank})")
            current = self.slot_tensors()
            if set(staged) != set(current):
                raise EPLBError(
                    f"staged tensors {sorted(staged)} must be exactly the slot tensors {sorted(current)}"
                )
            for name, dst in current.items():
                src = staged[name]
                # Device may differ (a CPU state loaded into device slots): copy_ moves it.
                if (src.shape, src.dtype) != (dst.shape, dst.dtype):
                    raise EPLBError(
                        f"layer {self.layer_index}: staged {name!r} is {tuple(src.shape)} {src.dtype}; "
                        f"the slots are {tuple(dst.shape)} {dst.dtype}"
                    )
        replica_slots_EX = torch.full(tuple(self.replica_slots.shape), -1, dtype=torch.int64)
        replica_slots_EX[:, : placement.log2phy.shape[2]] = placement.log2phy[0]
        # One packed int64 vector: phy2log, replica_slots, logcnt; one copy to the device.
        packed = torch.cat([placement.phy2log[0], replica_slots_EX.reshape(-1), placement.logcnt[0]])
        device = self.phy2log.device
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        return PreparedCommit(row_P=placement.phy2log[0].clone(), slot_list=tuple(slot_ids.tolist()),
                              packed=packed)

    def apply_commit(self, prepared: PreparedCommit, staged: dict[str, torch.Tensor] | None) -> None:
        """Apply a `prepare_commit` result on the current stream: device copies only (no sync).

        Atomic under ``KeyboardInterrupt`` (`eplb.atomic.critical_section`): the slot weights
        and the maps change together."""
        phy2log_P, replica_slots_flat, logcnt_E = torch.split(
            prepared.packed, [self.num_physical, self.replica_slots.numel(), self.num_logical]
        )
        with torch.no_grad(), critical_section():
            if prepared.slot_list:
                for name, dst in self.slot_tensors().items():
                    src = staged[name]
                    # Row by row: one read and one write per slot, no temporary (slots are few and large).
                    for s in prepared.slot_list:
                        dst[s].copy_(src[s])
            self.phy2log.copy_(phy2log_P)
            self.replica_slots.copy_(replica_slots_flat.view(self.replica_slots.shape))
            self.logcnt.copy_(logcnt_E)
            self._refresh_replica_table()
            self._row_P = prepared.row_P

    def __getstate__(self) -> dict:
        """Copying or pickling (``copy.deepcopy``, ``pickle``, ``torch.save``) works with one rank.
        With several ranks it raises `EPLBError`: a rank holds only its own slots and the
        dispatcher holds the process group, so the copy could compute nothing alone."""
        if self.num_ranks > 1:
            raise EPLBError(not_copyable_message(self.num_ranks))
        return super().__getstate__()

    # ------------------------------------------------------------------ forward
    def _init_replica_choice(self, device) -> None:
        E = self.num_logical
        # replica_HC[h, e]: global slot of expert e for hash bucket h; column E: what padding ids
        # map to (indexing wraps an id of -1 to it).
        self.register_buffer(
            "_replica_HC", torch.full((_BUCKETS, E + 1), -1, dtype=torch.int64, device=device), persistent=False
        )
        self.register_buffer("_bucket_H1", torch.arange(_BUCKETS, device=device).unsqueeze(1), persistent=False)
        self.register_buffer("_expert_1E", torch.arange(E, device=device).unsqueeze(0), persistent=False)
        # round robin: each expert's first pair of a batch starts at a salted replica.
        self.register_buffer(
            "_rr_offset_E", _mix32((torch.arange(E, device=device) + self._hash_salt) & _HASH_MASK), persistent=False
        )
        # Without redundant slots (P == E) every row of the table is the same: row 0 is used alone.
        self._single_copy = self.num_physical == E
        self._bucket_T1 = torch.empty(0, 1, dtype=torch.int64, device=device)  # grows to the largest T
        self._retired: list[torch.Tensor] = []  # outgrown caches (about as large as the current ones)
        self._positions_M = torch.arange(0, device=device)  # grows to the largest T * K

    def _refresh_replica_table(self) -> None:
        """Derive the hash table from ``replica_slots``/``logcnt`` (device ops, in place: graph-safe)."""
        replica_HE = self._bucket_H1 % self.logcnt.unsqueeze(0)
        self._replica_HC[:, : self.num_logical] = self.replica_slots[self._expert_1E, replica_HE]

    def _grown(self, name: str, size: int, make) -> torch.Tensor:
        """The first ``size`` rows of the cached tensor ``name``, remade larger by ``make(n)`` when
        short. A tensor made during a CUDA-graph capture holds values only once replayed: not kept."""
        cached = getattr(self, name)
        if cached.shape[0] >= size:
            return cached[:size]
        fresh = make(max(size, 2 * cached.shape[0], 64))
        if not (fresh.is_cuda and torch.cuda.is_current_stream_capturing()):
            # The old tensor stays alive: a graph captured earlier still reads its address.
            self._retired.append(cached)
            setattr(self, name, fresh)
        return fresh[:size]

    def _make_buckets(self, size: int) -> torch.Tensor:
        """``[size, 1]`` int64: the hash bucket of token index ``t`` (salted per rank and layer)."""
        key = (torch.arange(size, device=self.replica_slots.device) + self._hash_salt) & _HASH_MASK
        return (_mix32(key) % _BUCKETS).unsqueeze(1)

    def choose_slots(self, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        """``[T, K]`` logical ids -> ``[T, K]`` global physical slots, one replica per pair.
        Padding ids (``-1``) give ``-1`` with a dispatcher; with one rank and no dispatcher they
        give ``S`` (a slot id the experts module skips) or ``0`` (when it cannot skip).

        ``"hash"``: replica = bucket(hash(token index)) mod replica count, read from a table
        derived from the buffers at each commit (one indexing kernel). ``"round_robin"``: the pairs of each
        expert, in (token, k) order, take its replicas in turn from a salted start (a stable
        sort and a search). Both are deterministic and computed on the device (no host sync).
        """
        ids_TK = topk_ids_TK if topk_ids_TK.dtype == torch.int64 else topk_ids_TK.long()
        if self._single_copy:
            # One copy of every expert (no redundant slot, whatever the placement): every bucket's
            # row of the table is the same, so a flat lookup of the (contiguous) table reads row 0
            # for ids in [0, E), and an id of -1 wraps to the last row's padding column, which
            # holds what every row's does. About half the cost of the two-index lookup.
            return torch.take(self._replica_HC, ids_TK)
        T, K = ids_TK.shape
        if self.replica_choice == "hash":
            return self._replica_HC[self._grown("_bucket_T1", T, self._make_buckets), ids_TK]
        M = T * K
        positions_M = self._grown("_positions_M", M, lambda n: torch.arange(n, device=ids_TK.device))
        ids_M = ids_TK.reshape(M)
        # Step 1: rank of each pair among the pairs of its expert (padding forms its own group).
        sorted_M, perm_M = torch.sort(ids_M, stable=True)
        rank_sorted_M = positions_M - torch.searchsorted(sorted_M, sorted_M)
        rank_M = torch.empty_like(rank_sorted_M).scatter_(0, perm_M, rank_sorted_M)
        # Step 2: replica = (rank + salted start) mod replica count.
        replica_TK = (rank_M.view(T, K) + self._rr_offset_E[ids_TK]) % self.logcnt[ids_TK]
        slots_TK = self.replica_slots[ids_TK, replica_TK]
        return torch.where(ids_TK >= 0, slots_TK, self._replica_HC[0, self.num_logical])

    def forward(
        self, hidden_states: torch.Tensor, top_k_index=None, top_k_weights=None, **kwargs
    ) -> torch.Tensor:
        """``hidden_states [T, D]``, ``top_k_index [T, K]`` (logical ids), ``top_k_weights [T, K]``
        -> ``[T, D]``, as the replaced experts module computes it. GPT-OSS's keyword names
        ``router_indices`` / ``routing_weights`` are accepted too. Ids ``< 0`` and rows
        ``>= valid_tokens`` are padding (see the class doc)."""
        if top_k_index is None:
            top_k_index = kwargs.pop("router_indices", None)
        if top_k_weights is None:
            top_k_weights = kwargs.pop("routing_weights", None)
        if kwargs or top_k_index is None or top_k_weights is None:
            raise EPLBError(
                "EPLBExperts is called as experts(hidden_states, top_k_index, top_k_weights); got "
                f"unexpected arguments {sorted(kwargs)} or a missing routing tensor"
            )
        x_TD, ids_TK, weights_TK = hidden_states, top_k_index, top_k_weights
        self._check_inputs(x_TD, ids_TK, weights_TK)
        self._check_grad(x_TD)
        padded = self.valid_tokens is not None
        if padded:
            if not isinstance(self.valid_tokens, torch.Tensor) or self.valid_tokens.device.type == "cpu":
                check_num_valid_tokens(self.valid_tokens, x_TD.device, x_TD.shape[0], where="the layer's input")
            rows_T1 = self._grown("_row_ids_T1", x_TD.shape[0], lambda n: torch.arange(n, device=x_TD.device)[:, None])
            ids_TK = torch.where(rows_T1 < self.valid_tokens, ids_TK, -1)
        tracker = self.tracker
        if tracker is not None:
            # Router ids are in [-1, E) (padding -> -1): one kernel.
            tracker.record(self.layer_index, ids_TK, trusted=True)
        slots_TK = self.choose_slots(ids_TK)
        dispatcher = self.dispatcher
        if dispatcher is not None and dispatcher.token_level:
            return self._forward_tokens(x_TD, slots_TK, weights_TK)
        if dispatcher is None and self._combine_order == "topk":
            return self._forward_direct(x_TD, slots_TK, weights_TK, ids_TK, padded)
        return self._forward_pairs(x_TD, slots_TK, weights_TK, ids_TK)

    def _forward_direct(self, x_TD, slots_TK, weights_TK, ids_TK, padded: bool) -> torch.Tensor:
        """One rank: the experts module gets the slot ids in place of the expert ids."""
        if self._skips_plain:
            # Padding ids already map to slot S, which the module skips: nothing else to do.
            return self.experts(x_TD, slots_TK, weights_TK)
        valid_TK = ids_TK >= 0
        if padded and self._skips_marked:
            # Padding -> slot S, skipped by the marked module (no GEMM rows), contributes zero.
            self._mark_expert_parallel(True)
            return self.experts(x_TD, torch.where(valid_TK, slots_TK, self.slots_per_rank), weights_TK)
        # Without padding rows the module runs unmarked (marking may cost it masking passes);
        # router ids < 0 are then computed on slot 0 with weight 0.
        self._mark_expert_parallel(False)
        return self.experts(x_TD, slots_TK, torch.where(valid_TK, weights_TK, 0))

    def _forward_tokens(self, x_TD, slots_TK, weights_TK) -> torch.Tensor:
        """A token dispatcher: this rank's experts module weights and sums its pairs of each row."""
        skips = self._skips_plain or self._skips_marked
        self._mark_expert_parallel(not self._skips_plain and self._skips_marked)
        sentinel = self.slots_per_rank if skips else 0
        x_ND, slots_NK, weights_NK, meta = self._collective(
            "dispatch all-to-all", self.dispatcher.dispatch_tokens, x_TD, slots_TK, weights_TK,
            self.slots_per_rank, sentinel,
        )
        if not self._gathers_rows:
            x_ND = x_ND.contiguous()  # the dispatcher's rows may have a row stride > D
        y_ND = self.experts(x_ND, slots_NK, weights_NK)
        return self._collective("combine all-to-all", self.dispatcher.combine_tokens, y_ND, meta)

    def _forward_pairs(self, x_TD, slots_TK, weights_TK, ids_TK) -> torch.Tensor:
        """Every pair alone with weight 1 (exact), then weighted and summed in the module's order."""
        self._mark_expert_parallel(False)
        dispatcher = self.dispatcher if self.dispatcher is not None else _LOCAL
        x_ND, local_slot_N, meta = self._collective(
            "dispatch all-to-all", dispatcher.dispatch, x_TD, slots_TK, self.slots_per_rank
        )
        ones_N1 = x_ND.new_ones((x_ND.shape[0], 1))
        y_ND = self.experts(x_ND, local_slot_N.unsqueeze(1), ones_N1)
        y_TKD = self._collective("combine all-to-all", dispatcher.combine, y_ND, meta)
        weights_TK = torch.where(ids_TK >= 0, weights_TK, 0)
        return self._combine(y_TKD, weights_TK, ids_TK, x_TD.dtype)

    def _probe_skipping(self) -> tuple[bool, bool]:
        """``(plain, marked)``: whether the experts module skips slot ids ``>= S`` (they contribute
        zero, whatever their weight) as it is, and once marked ``_is_expert_parallel = True``.

        A module declaring ``eplb_skips_out_of_range_ids = True`` is trusted. A transformers
        experts module (hidden size in ``module.config``) is probed: one tiny forward per mode at
        wrap time, compared with the same pairs left out (transformers versions differ here).
        Anything else, or slots with no weights yet (experts on the meta device), counts as not
        skipping.
        """
        if getattr(self.experts, "eplb_skips_out_of_range_ids", False):
            return True, True
        weight = next(iter(self.slot_tensors().values()))
        hidden = getattr(getattr(self.experts, "config", None), "hidden_size", None)
        if weight.device.type == "meta" or self._empty_slots or not isinstance(hidden, int):
            return False, False
        gen = torch.Generator().manual_seed(0)
        x_TD = torch.randn(2, hidden, generator=gen).to(weight.device, weight.dtype)
        S = self.slots_per_rank
        ids_TK = torch.tensor([[0, S], [S, S]], device=weight.device)
        w_TK = torch.tensor([[0.5, 0.25], [0.5, 0.25]], device=weight.device, dtype=weight.dtype)
        results = []
        for marked in (False, True):
            if marked and self._was_expert_parallel is None:
                results.append(False)
                continue
            try:
                with torch.no_grad(), _uninitialized_memory_as_nan():
                    self._mark_expert_parallel(marked)
                    both = self.experts(x_TD, ids_TK, w_TK)
                    alone = self.experts(x_TD[:1], ids_TK[:1, :1], w_TK[:1, :1])
                results.append(
                    bool(torch.isfinite(both).all())
                    and bool((both[1] == 0).all())
                    and torch.allclose(both[:1].float(), alone.float(), rtol=1e-2, atol=1e-3)
                )
            except (RuntimeError, IndexError, ValueError):
                results.append(False)
            finally:
                self._mark_expert_parallel(False)
        return results[0], results[1]

    def _mark_expert_parallel(self, value: bool) -> None:
        if self._was_expert_parallel is not None and value is not self._marked:
            self.experts._is_expert_parallel = value
            self._marked = value

    def _collective(self, half: str, fn, *args):
        """``fn(*args)``, a dispatcher collective; with several ranks a backend failure (a peer
        died or froze: gloo/NCCL raise RuntimeError, EPLBError is a ValueError and passes) becomes
        `eplb.errors.peer_failure` naming the step and the layer."""
        try:
            return fn(*args)
        except RuntimeError as exc:
            if self.num_ranks == 1:
                raise
            step = None
            if self.tracker is not None:
                try:
                    step = self.tracker.steps_recorded + 1  # the step this forward records
                except Exception:  # a broken device: the step is not worth a second error
                    step = None
            operation = f"rank {self.rank}: the forward's {half} of MoE layer {self.layer_index}"
            health = self.dispatcher.health
            who = health.describe(health.lost()) if health is not None else None
            raise peer_failure(operation, step=step, rank=None, cause=exc, who=who) from exc

    def combine_order(self) -> str:
        """How the replaced module sums a token's ``K`` weighted outputs:

        ``"expert"`` — in increasing logical expert id, each product rounded to the hidden dtype
        (the transformers eager loop, which ``index_add_``s expert by expert); ``"topk"`` — in
        top-k order in the product's dtype, then cast (transformers ``batched_mm`` /
        ``grouped_mm`` and kernels). A module may declare it with ``eplb_combine_order``.
        """
        declared = getattr(self.experts, "eplb_combine_order", None)
        if declared in ("expert", "topk"):
            return declared
        config = getattr(self.experts, "config", None)
        implementation = getattr(config, "_experts_implementation", None)
        return "expert" if implementation in (None, "eager") else "topk"

    def _combine(self, y_TKD, weights_TK, ids_TK, dtype) -> torch.Tensor:
        weighted_TKD = y_TKD * weights_TK.unsqueeze(-1)
        if self._combine_order == "topk":
            return weighted_TKD.sum(dim=1).to(dtype)
        weighted_TKD = weighted_TKD.to(dtype)
        order_TK = torch.argsort(ids_TK, dim=1, stable=True)
        ordered_TKD = torch.gather(weighted_TKD, 1, order_TK.unsqueeze(-1).expand_as(weighted_TKD))
        out_TD = weighted_TKD.new_zeros((weighted_TKD.shape[0], weighted_TKD.shape[2]))
        for k in range(ordered_TKD.shape[1]):
            out_TD = out_TD + ordered_TKD[:, k]
        return out_TD

    def _check_inputs(self, x_TD, ids_TK, weights_TK) -> None:
        if (
            x_TD.dim() != 2
            or ids_TK.dim() != 2
            or tuple(weights_TK.shape) != tuple(ids_TK.shape)
            or (ids_TK.shape[0] != x_TD.shape[0])
        ):
            raise EPLBError(
                f"MoE layer {self.layer_index}: expected hidden_states [T, D], top_k_index [T, K] and "
                f"top_k_weights [T, K]; got {tuple(x_TD.shape)}, {tuple(ids_TK.shape)}, "
                f"{tuple(weights_TK.shape)} (an adapter's route must return one row per token)"
            )
        if ids_TK.dtype.is_floating_point or ids_TK.dtype == torch.bool:
            raise EPLBError(
                f"MoE layer {self.layer_index}: top_k_index must be an integer tensor, got {ids_TK.dtype}"
            )
        if self.tracker is not None and ids_TK.device != self.tracker.device:
            raise EPLBError(
                f"MoE layer {self.layer_index}: routing ids are on {ids_TK.device} but eplb tracks load on "
                f"{self.tracker.device}; move the model to its device before wrapping it"
            )

    def _check_grad(self, x_TD: torch.Tensor) -> None:
        if self.num_physical > self.num_logical and torch.is_grad_enabled():
            # Hooked lazily, so experts unfrozen after wrapping are covered too.
            for param in self.experts.parameters(recurse=False):
                if param.requires_grad and id(param) not in self._hooked:
                    param.register_hook(self._refuse_replica_grad)
                    self._hooked.add(id(param))
        if self.num_ranks == 1 or not (self.training and torch.is_grad_enabled()):
            return
        slot_grad = any(t.requires_grad for t in self.experts.parameters(recurse=False))
        if slot_grad or x_TD.requires_grad:
            raise EPLBError(
                f"training through expert parallelism (num_ranks={self.num_ranks}) is not supported: the "
                "all-to-all dispatch is not differentiable here; call model.eval() or run under "
                "torch.no_grad()"
            )

    def _refuse_replica_grad(self, grad: torch.Tensor) -> torch.Tensor:
        # A parameter hook: runs only when backward computes a gradient for the slot weights.
        raise EPLBError(
            f"backward reached the expert weights of MoE layer {self.layer_index} while "
            f"num_redundant_experts ({self.num_physical - self.num_logical}) > 0: each replica would get "
            "only its own tokens' gradient. Train with num_redundant_experts=0, or freeze the experts "
            "(requires_grad_(False)); inputs and routers still get exact gradients"
        )

    # ------------------------------------------------------------------ unwrap
    def logical_tensors(self, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """Name -> ``[E, ...]``: the primary copy (first replica) of each logical expert.

        With ``G > 1`` this all-gathers the slots over ``group`` (a collective).
        """
        slots = self.slot_tensors()
        if self.num_ranks > 1:
            slots = {n: all_gather_rows(t, group, self.num_ranks) for n, t in slots.items()}
        primary_E = self.replica_slots[:, 0]
        return {n: t.index_select(0, primary_E.to(t.device)).clone() for n, t in slots.items()}

    def logical_module(self, group: dist.ProcessGroup | None = None) -> nn.Module:
        """The replaced module again (a copy holding the primary copy of every expert, ``E`` of them)."""
        module = replace_expert_tensors(self.experts, self.logical_tensors(group))
        if self._was_expert_parallel is not None:
            module._is_expert_parallel = self._was_expert_parallel
        return module

    def extra_repr(self) -> str:
        return (
            f"layer_index={self.layer_index}, num_logical={self.num_logical}, "
            f"num_physical={self.num_physical}, num_ranks={self.num_ranks}, rank={self.rank}"
        )


@contextlib.contextmanager
def _uninitialized_memory_as_nan():
    """While active, memory PyTorch allocates without writing it (``torch.empty``, also inside
    ops) holds NaN: PyTorch's deterministic mode with ``fill_uninitialized_memory``, warnings only.

    The skipping probe needs it: a module that leaves the rows of skipped ids unwritten would
    otherwise pass whenever that memory happens to be zero (fresh pages often are), and then
    return garbage for them later."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = True
            yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


def not_copyable_message(num_ranks: int) -> str:
    """Why a model wrapped over several ranks cannot be copied or pickled, and what to do."""
    return (
        f"a model wrapped by eplb over {num_ranks} expert-parallel ranks cannot be copied or pickled: each "
        "rank holds only its own expert slots and the wrapper holds process groups; call wrapper.unwrap() "
        "on every rank (it gathers every expert back into the original modules), then copy or save the "
        "model it returns (and wrap the copy again to keep balancing)"
    )


_LOCAL = LocalDispatcher()
