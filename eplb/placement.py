"""Placement: which logical expert each physical slot holds, and the maps derived from it.

Legend: L layers, E logical experts, P physical slots, R largest replica count, G ranks,
S = P // G slots per rank.
"""

from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass

import numpy as np
import torch

from eplb.errors import EPLBError

__all__ = ["Placement"]

_FORMAT = "eplb.placement"
_VERSION = 1


@dataclass(frozen=True, eq=False)
class Placement:
    """A placement of logical experts onto physical slots, for every MoE layer.

    Attributes:
        phy2log: ``[L, P]`` int64 — logical expert held by each slot; slot ``s`` lives on rank
            ``s // (P // G)``.
        log2phy: ``[L, E, R]`` int64 — slots of each logical expert in increasing slot order,
            padded with ``-1``; ``R`` is the largest replica count.
        logcnt: ``[L, E]`` int64 — replica count of each logical expert (>= 1, rows sum to ``P``).

    Build one with `Placement.from_phy2log` or `Placement.initial`; all tensors live on the CPU.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_phy2log(cls, phy2log: torch.Tensor, num_logical: int) -> Placement:
        """Derive ``log2phy`` and ``logcnt`` from ``phy2log``.

        Args:
            phy2log: ``[L, P]`` int — logical expert of each slot (a ``[P]`` tensor is read as one layer).
            num_logical: ``E``, the number of logical experts per layer.

        Returns:
            The placement; raises `EPLBError` if an id is out of ``[0, E)``.
        """
        phy2log = torch.as_tensor(phy2log)
        if phy2log.dim() == 1:
            phy2log = phy2log.unsqueeze(0)
        if phy2log.dim() != 2:
            raise EPLBError(
                f"phy2log must be a [L, P] tensor, got shape {tuple(phy2log.shape)}; pass one row per layer"
            )
        if phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
            raise EPLBError(f"phy2log must hold integer expert ids, got dtype {phy2log.dtype}")
        # A private copy: a Placement never aliases a caller's (or a layer's) tensor.
        phy2log = phy2log.detach().to("cpu", torch.int64, copy=True).contiguous()
        if num_logical <= 0:
            raise EPLBError(f"num_logical ({num_logical}) must be > 0")
        if phy2log.numel() and (phy2log.min() < 0 or phy2log.max() >= num_logical):
            bad = phy2log[(phy2log < 0) | (phy2log >= num_logical)][0].item()
            raise EPLBError(
                f"phy2log holds expert id {bad}, outside [0, num_logical={num_logical}); "
                "every slot must hold a valid logical expert"
            )
        return cls._of_valid(phy2log.numpy(), num_logical, phy2log)

    @classmethod
    def _of_valid(
        cls, phy2log_LP: np.ndarray, num_logical: int, phy2log: torch.Tensor | None = None
    ) -> Placement:
        """Build from an ``[L, P]`` int64 array whose ids are known to be in ``[0, E)`` (built-in
        policies, `from_phy2log` after its checks); ``phy2log`` may pass the tensor sharing its memory.
        The array is owned by the result afterwards: the caller must not modify it."""
        num_layers, num_physical = phy2log_LP.shape
        layer_base_L1 = (np.arange(num_layers) * num_logical)[:, None]
        flat_F = (phy2log_LP + layer_base_L1).reshape(-1)
        logcnt_F = np.bincount(flat_F, minlength=num_layers * num_logical)
        # Slots in (expert, slot) order per layer: a stable sort of the ids (a radix sort on small
        # ints). The position inside each expert's run is its replica index.
        small_LP = phy2log_LP.astype(np.int16 if num_logical < 2**15 else np.int32)
        order_LP = np.argsort(small_LP, axis=1, kind="stable")
        layer_slot_base_L1 = (np.arange(num_layers) * num_physical)[:, None]
        sorted_F = (np.take(phy2log_LP, order_LP + layer_slot_base_L1) + layer_base_L1).reshape(-1)
        first_F = np.cumsum(logcnt_F) - logcnt_F
        replica_F = np.arange(sorted_F.size) - first_F[sorted_F]
        max_rep = max(int(logcnt_F.max()) if logcnt_F.size else 1, 1)
        log2phy_F = np.full(num_layers * num_logical * max_rep, -1, dtype=np.int64)
        log2phy_F[sorted_F * max_rep + replica_F] = order_LP.reshape(-1)
        if phy2log is None:
            phy2log = torch.from_numpy(np.ascontiguousarray(phy2log_LP, dtype=np.int64))
        return cls(
            phy2log=phy2log,
            log2phy=torch.from_numpy(log2phy_F.reshape(num_layers, num_logical, max_rep)),
            logcnt=torch.from_numpy(logcnt_F.reshape(num_layers, num_logical)),
        )

    @classmethod
    def initial(cls, num_layers: int, num_logical: int, num_physical: int, num_ranks: int) -> Placement:
        """The placement before any load is known.

        Every logical expert gets one primary slot, in order; the ``P - E`` redundant slots are
        spread evenly over the ranks (the first ``(P - E) % G`` ranks get one more) and hold
        copies spread evenly over the experts, each preferably on a rank away from its primary.

        Args:
            num_layers: ``L``.
            num_logical: ``E``.
            num_physical: ``P >= E``, a multiple of ``num_ranks``.
            num_ranks: ``G``.

        Returns:
            A `Placement` with ``phy2log: [num_layers, num_physical]``.
        """
        for name, value, low in (
            ("num_layers", num_layers, 0),
            ("num_logical", num_logical, 1),
            ("num_physical", num_physical, 1),
            ("num_ranks", num_ranks, 1),
        ):
            if not _is_int(value) or value < low:
                rule = ">= 0" if low == 0 else "> 0"
                raise EPLBError(f"Placement.initial: {name} ({value!r}) must be {rule} (an int)")
        num_layers, num_logical, num_physical, num_ranks = map(
            operator.index, (num_layers, num_logical, num_physical, num_ranks)
        )
        _check_sizes(num_logical, num_physical, num_ranks)
        per_rank = num_physical // num_ranks
        num_redundant = num_physical - num_logical
        redundant_per_rank = [num_redundant // num_ranks + (g < num_redundant % num_ranks) for g in range(num_ranks)]
        row: list[int] = []
        next_primary = 0
        k = 0
        for g in range(num_ranks):
            n_primary = per_rank - redundant_per_rank[g]
            row.extend(range(next_primary, next_primary + n_primary))
            next_primary += n_primary
            for _ in range(redundant_per_rank[g]):
                # Offset by half the experts so the copy tends to sit on another rank than its primary.
                row.append((k * num_logical // max(num_redundant, 1) + num_logical // 2) % num_logical)
                k += 1
        phy2log = torch.tensor(row, dtype=torch.int64).expand(num_layers, -1).clone()
        return cls.from_phy2log(phy2log.reshape(num_layers, num_physical), num_logical)

    # ------------------------------------------------------------------ sizes and helpers
    @property
    def num_layers(self) -> int:
        """``L``, the number of MoE layers."""
        return int(self.phy2log.shape[0])

    @property
    def num_logical(self) -> int:
        """``E``, logical experts per layer."""
        return int(self.logcnt.shape[1])

    @property
    def num_physical(self) -> int:
        """``P``, physical slots per layer."""
        return int(self.phy2log.shape[1])

    def slots_per_rank(self, num_ranks: int) -> int:
        """``S = P // G``; raises `EPLBError` when ``P`` is not a multiple of ``G``."""
        _check_sizes(self.num_logical, self.num_physical, num_ranks)
        return self.num_physical // num_ranks

    def rank_of_slot(self, slot: int | torch.Tensor, num_ranks: int) -> int | torch.Tensor:
        """Rank owning ``slot`` (an int or an int tensor of any shape)."""
        per_rank = self.slots_per_rank(num_ranks)
        return slot // per_rank

    def slots_of_rank(self, rank: int, num_ranks: int) -> range:
        """The slots ``[rank * S, (rank + 1) * S)`` owned by ``rank``."""
        per_rank = self.slots_per_rank(num_ranks)
        if not 0 <= rank < num_ranks:
            raise EPLBError(f"rank ({rank}) must be in [0, num_ranks={num_ranks})")
        return range(rank * per_rank, (rank + 1) * per_rank)

    def layer(self, index: int) -> Placement:
        """The placement of layer ``index`` (in ``[-L, L)``), as a one-layer `Placement`."""
        index = self._layer_index(index)
        return Placement.from_phy2log(self.phy2log[index : index + 1], self.num_logical)

    def replace_layer(self, index: int, other: Placement) -> Placement:
        """A copy with layer ``index`` taken from the one-layer (or same-sized) ``other``."""
        index = self._layer_index(index)
        if other.num_logical != self.num_logical or other.num_physical != self.num_physical or (
            other.num_layers not in (1, self.num_layers)
        ):
            raise EPLBError(
                f"replace_layer: the other placement is {other!r}; expected one layer (or {self.num_layers}) "
                f"with E={self.num_logical} and P={self.num_physical}"
            )
        row = other.phy2log[0] if other.num_layers == 1 else other.phy2log[index]
        phy2log = self.phy2log.clone()
        phy2log[index] = row
        return Placement.from_phy2log(phy2log, self.num_logical)

    def _layer_index(self, index: int) -> int:
        L = self.num_layers
        if not _is_int(index) or not -L <= index < L:
            raise EPLBError(f"layer index ({index!r}) must be an int in [-{L}, {L}) for a placement of {L} layers")
        return operator.index(index) % L

    def clone(self) -> Placement:
        """A copy whose tensors share no storage with this placement's."""
        return Placement(phy2log=self.phy2log.clone(), log2phy=self.log2phy.clone(), logcnt=self.logcnt.clone())

    def equals(self, other: Placement) -> bool:
        """True when both describe the same slot contents (``phy2log [L, P]`` equal).

        Raises:
            EPLBError: ``other`` is not a `Placement`.
        """
        if not isinstance(other, Placement):
            raise EPLBError(
                f"Placement.equals compares two placements; got {type(other).__name__}: build one with "
                "Placement.from_phy2log(phy2log, num_logical)"
            )
        return self.phy2log.shape == other.phy2log.shape and bool(torch.equal(self.phy2log, other.phy2log))

    def experts_of_rank(self, layer: int, rank: int, num_ranks: int) -> list[int]:
        """Logical experts held by ``rank`` in ``layer``, in slot order."""
        slots = self.slots_of_rank(rank, num_ranks)
        return self.phy2log[layer, slots.start : slots.stop].tolist()

    # ------------------------------------------------------------------ validation
    def validate(self, num_ranks: int | None = None) -> Placement:
        """Check every invariant; raise `EPLBError` naming the first broken one.

        Checks: ids in range, every logical expert has >= 1 replica, ``logcnt`` rows sum to ``P``,
        ``log2phy``/``logcnt`` agree with ``phy2log``, and (with ``num_ranks``) ``P % G == 0``.

        Returns:
            ``self``, so calls can be chained.
        """
        for name in ("phy2log", "log2phy", "logcnt"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise EPLBError(f"Placement.{name} must be an int64 tensor; build placements with from_phy2log")
        if self.phy2log.dim() != 2 or self.logcnt.dim() != 2 or self.log2phy.dim() != 3:
            raise EPLBError(
                f"Placement shapes must be phy2log [L, P], log2phy [L, E, R], logcnt [L, E]; got "
                f"{tuple(self.phy2log.shape)}, {tuple(self.log2phy.shape)}, {tuple(self.logcnt.shape)}"
            )
        num_layers, num_physical = self.phy2log.shape
        num_logical = self.logcnt.shape[1]
        if num_ranks is not None:
            _check_sizes(num_logical, num_physical, num_ranks)
        if num_physical < num_logical:
            raise EPLBError(f"num_physical ({num_physical}) must be >= num_logical ({num_logical})")
        bad = (self.phy2log < 0) | (self.phy2log >= num_logical)
        if bad.any():
            l, s = bad.nonzero()[0].tolist()
            raise EPLBError(
                f"layer {l}, slot {s} holds expert {self.phy2log[l, s].item()}, outside [0, {num_logical})"
            )
        counts = torch.zeros(num_layers, num_logical, dtype=torch.int64)
        counts.scatter_add_(1, self.phy2log, torch.ones_like(self.phy2log))
        missing = counts == 0
        if missing.any():
            l, e = missing.nonzero()[0].tolist()
            raise EPLBError(
                f"layer {l}: logical expert {e} has no replica; every logical expert needs at least one slot"
            )
        if not torch.equal(counts, self.logcnt):
            raise EPLBError("logcnt does not match phy2log; rebuild the placement with Placement.from_phy2log")
        ref = Placement.from_phy2log(self.phy2log, num_logical)
        if ref.log2phy.shape != self.log2phy.shape or not torch.equal(ref.log2phy, self.log2phy):
            raise EPLBError("log2phy does not match phy2log; rebuild the placement with Placement.from_phy2log")
        return self

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> dict:
        """A JSON-ready dict: format, version, shape metadata and ``phy2log``."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "num_layers": self.num_layers,
            "num_logical": self.num_logical,
            "num_physical": self.num_physical,
            "phy2log": self.phy2log.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "placement") -> Placement:
        """Inverse of `to_dict`, validated: raises `EPLBError` on a wrong format, version or shape."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise EPLBError(f"{source} is not an eplb placement (expected \"format\": \"{_FORMAT}\")")
        if data.get("version") != _VERSION:
            raise EPLBError(
                f"{source} has placement format version {data.get('version')!r}; this eplb reads version {_VERSION}"
            )
        for key in ("num_layers", "num_logical", "num_physical"):
            if not _is_int(data.get(key)) or data[key] < 0:
                raise EPLBError(
                    f"{source} is malformed: {key!r} ({data.get(key)!r}) must be an int >= 0; "
                    "save placements with Placement.save"
                )
        rows = data.get("phy2log")
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise EPLBError(
                f"{source} is malformed: 'phy2log' must be a list of rows of expert ids, one row per layer"
            )
        expect = (data["num_layers"], data["num_physical"])
        if len({len(row) for row in rows}) > 1:
            raise EPLBError(f"{source}: phy2log rows have different lengths; every layer has num_physical slots")
        shape = (len(rows), len(rows[0]) if rows else expect[1])
        if shape != expect:
            raise EPLBError(
                f"{source}: phy2log has shape {shape} but the header says [num_layers, num_physical] = {list(expect)}"
            )
        num_logical = data["num_logical"]
        # Checked before any array of E entries is built: the header's E is bounded by the data's P.
        if not 1 <= num_logical <= expect[1]:
            raise EPLBError(
                f"{source}: num_logical ({num_logical}) must be in [1, num_physical={expect[1]}]: every "
                "logical expert needs at least one slot"
            )
        for l, row in enumerate(rows):
            for s, value in enumerate(row):
                # A float id would be silently truncated by a tensor conversion.
                if not _is_int(value):
                    raise EPLBError(f"{source} is malformed: phy2log[{l}][{s}] ({value!r}) must be an int expert id")
                if not 0 <= value < num_logical:
                    raise EPLBError(
                        f"{source}: phy2log holds expert id {value} (layer {l}, slot {s}), outside "
                        f"[0, num_logical={num_logical})"
                    )
        phy2log = torch.tensor(rows, dtype=torch.int64) if rows else torch.empty(0, expect[1], dtype=torch.int64)
        try:
            return cls.from_phy2log(phy2log, num_logical).validate()
        except EPLBError as exc:  # e.g. an expert without a replica: say which file
            raise EPLBError(f"{source}: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the placement as JSON (see `to_dict`)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_ranks: int | None = None) -> Placement:
        """Read a placement written by `save` (or by ``eplb plan -o``); validated.

        Args:
            path: the JSON file.
            num_ranks: ``G`` the placement is to be used with, or None. When given, ``P`` must be
                a multiple of it, and a file that records the ranks it was planned for (the
                ``"plan"`` record ``eplb plan -o`` writes) must have been planned for ``G`` ranks:
                slot ``s`` lives on rank ``s // (P // G)``, so the same file spreads its experts
                differently over another number of ranks.

        Raises `EPLBError` (one line, naming the file) for a missing or unreadable path, a folder,
        a file that is not UTF-8 JSON, NaN or infinite values, JSON nested too deeply, every
        check of `from_dict` and `validate`, and a placement planned for other ranks.
        """
        name = f"placement file {str(path)!r}"
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise EPLBError(f"{name} does not exist") from None
        except IsADirectoryError:
            raise EPLBError(f"{name} is a directory; pass the .json file written by Placement.save") from None
        except OSError as exc:
            raise EPLBError(f"{name} cannot be read ({type(exc).__name__}: {exc.strerror or exc})") from None
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise EPLBError(f"{name} is not a text (JSON) file; pass the file written by Placement.save") from None
        except json.JSONDecodeError as exc:
            raise EPLBError(f"{name} is not valid JSON ({exc})") from None
        except RecursionError:
            raise EPLBError(f"{name} holds JSON nested too deeply; it is not a placement") from None
        except ValueError as exc:  # NaN / Infinity (from _reject_constant)
            raise EPLBError(f"{name}: {exc}") from None
        placement = cls.from_dict(data, source=name)
        if num_ranks is None:
            return placement
        plan = data.get("plan")
        planned = plan.get("num_ranks") if isinstance(plan, dict) else None
        if _is_int(planned) and planned != num_ranks:
            raise EPLBError(
                f"{name} was planned for {planned} EP ranks but is used with {num_ranks}: its "
                f"{placement.num_physical} slots per layer are spread over the ranks in order, so another "
                f"number of ranks holds other experts; use {planned} ranks or plan one for {num_ranks} "
                f"(eplb plan --ranks {num_ranks} -o ...)"
            )
        try:
            return placement.validate(num_ranks)
        except EPLBError as exc:
            raise EPLBError(f"{name}: {exc}") from None

    def __repr__(self) -> str:
        return f"Placement(L={self.num_layers}, E={self.num_logical}, P={self.num_physical})"


def _is_int(value) -> bool:
    """An integer (Python, numpy or 0-d integer tensor), not a bool and not a float."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _reject_constant(name: str):
    raise ValueError(f"{name} is not an expert id or a size; placements hold integers only")


def _redundant_fixes(num_logical: int, num_redundant: int, num_ranks: int) -> list[int]:
    """The two smallest redundant-slot counts ``>= num_redundant`` for which ``num_logical + r``
    is a multiple of ``num_ranks`` (what error messages suggest)."""
    return [r for r in range(num_redundant, num_redundant + 2 * num_ranks + 1)
            if (num_logical + r) % num_ranks == 0][:2]


def _check_sizes(num_logical: int, num_physical: int, num_ranks: int) -> None:
    if num_ranks <= 0:
        raise EPLBError(f"num_ranks ({num_ranks}) must be > 0")
    if num_physical < num_logical:
        raise EPLBError(
            f"num_physical ({num_physical}) must be >= num_logical ({num_logical}); "
            "num_redundant_experts cannot be negative"
        )
    if num_physical % num_ranks:
        fixes = _redundant_fixes(num_logical, num_physical - num_logical, num_ranks)
        raise EPLBError(
            f"num_physical ({num_physical}) must be a multiple of num_ranks ({num_ranks}); "
            f"set num_redundant_experts to {' or '.join(map(str, fixes))}"
        )
