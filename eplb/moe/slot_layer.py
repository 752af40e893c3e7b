"""The contract between a layer that holds physical slots and the executors: `SlotLayer`.

Legend: E logical experts, P physical slots, S = P // G slots on this rank, G ranks.

A commit switches a layer to a new placement row, weights and maps together, in two halves:
`SlotLayer.prepare_commit` (validate, build the new maps, put them on the device; the async
executor runs it on its worker, on the side stream) and `SlotLayer.apply_commit` (device copies
only, on the main stream). The layer is the single source of truth of its committed row
(`SlotLayer.placement_row`); the executors report which layers they committed and the wrapper
reads the rows back from the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["SlotLayer", "PreparedCommit", "SlotStorage"]


@dataclass(frozen=True, kw_only=True)
class PreparedCommit:
    """A validated commit, ready to apply with device copies only.

    Attributes:
        row_P: ``[P]`` int64 on the CPU — the new ``phy2log`` row (what `placement_row` returns
            once applied).
        slot_list: local slot ids (in ``[0, S)``) to copy from staging, as Python ints.
        packed: layer-specific data already on the layer's device (`eplb.moe.EPLBExperts`: its
            new maps, packed in one int64 vector), or None.
    """

    row_P: torch.Tensor
    slot_list: tuple[int, ...] = ()
    packed: torch.Tensor | None = None

    @classmethod
    def of(cls, phy2log_P, slots=None, packed: torch.Tensor | None = None) -> PreparedCommit:
        """From a ``[P]`` row and local slot ids (a tensor, a sequence or None)."""
        row_P = torch.as_tensor(phy2log_P, dtype=torch.int64).reshape(-1).to("cpu", copy=True)
        slot_ids = torch.as_tensor(slots if slots is not None else [], dtype=torch.int64).reshape(-1)
        return cls(row_P=row_P, slot_list=tuple(slot_ids.tolist()), packed=packed)

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell the caching allocator that ``stream`` reads this commit's device data (it was
        allocated on another stream), so its memory is not reused before those reads finish."""
        if self.packed is not None and self.packed.is_cuda:
            self.packed.record_stream(stream)


@runtime_checkable
class SlotLayer(Protocol):
    """What the executors need of a layer (`eplb.moe.EPLBExperts` is the library's one).

    Attributes:
        layer_index: the layer's row in the ``[L, P]`` placements.
    """

    layer_index: int

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """Name -> this rank's slot storage ``[S, ...]``; writing its rows writes the slots."""
        ...

    def placement_row(self) -> torch.Tensor:
        """``[P]`` int64 CPU copy of the committed ``phy2log`` row (no device sync)."""
        ...

    def prepare_commit(self, phy2log_P: torch.Tensor, *, slots=None, staged=None) -> PreparedCommit:
        """Validate a commit to ``phy2log_P`` copying local ``slots`` from ``staged`` (name ->
        ``[S, ...]``), and put what it needs on the device. May run on a worker thread, on a side
        stream; raises `eplb.EPLBError` on a bad row or slot ids."""
        ...

    def apply_commit(self, prepared: PreparedCommit, staged: dict[str, torch.Tensor] | None) -> None:
        """Apply ``prepared`` on the current stream: device copies only, in place (same storage,
        so CUDA graphs stay valid), no host sync."""
        ...


class SlotStorage:
    """A base class that makes a `SlotLayer` of anything with ``layer_index`` and
    ``slot_tensors()`` and no maps of its own (benchmarks, tests, custom slot stores).

    `apply_commit` copies the changed rows from staging, row by row, on the current stream, and
    keeps the committed row for `placement_row` (None before the first commit).
    """

    _row_P: torch.Tensor | None = None

    def placement_row(self) -> torch.Tensor:
        return self._row_P.clone()

    def prepare_commit(self, phy2log_P, *, slots=None, staged=None) -> PreparedCommit:
        return PreparedCommit.of(phy2log_P, slots)

    def apply_commit(self, prepared: PreparedCommit, staged: dict[str, torch.Tensor] | None) -> None:
        with torch.no_grad():
            for name, dst in self.slot_tensors().items():
                for s in prepared.slot_list:
                    dst[s].copy_(staged[name][s])
        self._row_P = prepared.row_P
