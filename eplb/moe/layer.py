"""`EPLBExperts`: the EPLB expert layer, the one chokepoint every routed token passes.

Legend: T tokens, K top-k, D hidden size, E logical experts, P physical slots, S = P // G slots
on this rank, G ranks, N pairs computed on this rank, X = P - E + 1 (the widest possible
replica count).

One forward: record the logical ids into the tracker → map each (token, logical expert) to one
replica's physical slot → dispatch the pairs to the slots' owner ranks → run the experts with
the slot weights → combine each pair's output back to its token → weight and sum in the same
order as the replaced module, so the result matches it (bitwise when the matmuls are).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from eplb.comm.collectives import all_gather_rows
from eplb.errors import EPLBError
from eplb.moe.adapters import direct_tensors, replace_expert_tensors
from eplb.moe.dispatch import Dispatcher, LocalDispatcher
from eplb.moe.slot_layer import PreparedCommit
from eplb.placement import Placement

if TYPE_CHECKING:
    from eplb.tracker import LoadTracker

__all__ = ["EPLBExperts", "PreparedCommit"]  # PreparedCommit: defined in eplb.moe.slot_layer

_HASH_MASK = 0x7FFFFFFF  # keys stay < 2**31 so the 32-bit mixing below never overflows int64


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
        dispatcher: moves pairs to slot owners; `LocalDispatcher` by default (one rank).
        tracker: a `eplb.tracker.LoadTracker` to record logical ids into, or None.

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
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.tracker = tracker
        self._names = names
        device = owned[names[0]].device
        # Slot s of this rank holds logical expert own_S[s]: gather those rows into fresh storage.
        own_S = row_P[rank * S : (rank + 1) * S]
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
        self._row_P = row_P.clone()  # host copy of the committed phy2log row, set by apply_commit
        self.apply_commit(self.prepare_commit(row_P), None)
        self.train(experts.training)
        self._hooked: set[int] = set()  # ids of slot parameters carrying _refuse_replica_grad
        # Salt the replica hash per rank and layer: ranks with few tokens then use different replicas.
        self._hash_salt = (rank * 0x9E3779B1 + self.layer_index * 0x632BE5AB) & _HASH_MASK

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
        """Apply a `prepare_commit` result on the current stream: device copies only (no sync)."""
        phy2log_P, replica_slots_flat, logcnt_E = torch.split(
            prepared.packed, [self.num_physical, self.replica_slots.numel(), self.num_logical]
        )
        with torch.no_grad():
            if prepared.slot_list:
                for name, dst in self.slot_tensors().items():
                    src = staged[name]
                    # Row by row: one read and one write per slot, no temporary (slots are few and large).
                    for s in prepared.slot_list:
                        dst[s].copy_(src[s])
            self.phy2log.copy_(phy2log_P)
            self.replica_slots.copy_(replica_slots_flat.view(self.replica_slots.shape))
            self.logcnt.copy_(logcnt_E)
        self._row_P = prepared.row_P

    # ------------------------------------------------------------------ forward
    def choose_slots(self, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        """``[T, K]`` logical ids -> ``[T, K]`` global physical slots, one replica per pair.

        Replica = hash(token index) mod replica count: deterministic, spread evenly over the
        replicas, computed on the device from the buffers (no host sync).
        """
        ids_TK = topk_ids_TK.long()
        T = ids_TK.shape[0]
        key_T = (torch.arange(T, device=ids_TK.device) + self._hash_salt) & _HASH_MASK
        replica_TK = _mix32(key_T).unsqueeze(1) % self.logcnt[ids_TK]
        return self.replica_slots[ids_TK, replica_TK]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index=None, top_k_weights=None, **kwargs
    ) -> torch.Tensor:
        """``hidden_states [T, D]``, ``top_k_index [T, K]`` (logical ids), ``top_k_weights [T, K]``
        -> ``[T, D]``, as the replaced experts module computes it. GPT-OSS's keyword names
        ``router_indices`` / ``routing_weights`` are accepted too."""
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
        if self.tracker is not None:
            # Router ids are in [0, E) (choose_slots indexes the maps with them too): one kernel.
            self.tracker.record(self.layer_index, ids_TK, trusted=True)
        slots_TK = self.choose_slots(ids_TK)
        x_ND, local_slot_N, meta = self.dispatcher.dispatch(x_TD, slots_TK, self.slots_per_rank)
        # Each pair alone with weight 1 (exact): weighting and summing happen in _combine.
        ones_N1 = x_ND.new_ones((x_ND.shape[0], 1))
        y_ND = self.experts(x_ND, local_slot_N.unsqueeze(1), ones_N1)
        y_TKD = self.dispatcher.combine(y_ND, meta)
        return self._combine(y_TKD, weights_TK, ids_TK, x_TD.dtype)

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
        if self.combine_order() == "topk":
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
        return replace_expert_tensors(self.experts, self.logical_tensors(group))

    def extra_repr(self) -> str:
        return (
            f"layer_index={self.layer_index}, num_logical={self.num_logical}, "
            f"num_physical={self.num_physical}, num_ranks={self.num_ranks}, rank={self.rank}"
        )

