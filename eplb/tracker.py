"""LoadTracker: a device-resident sliding window of the logical load of every MoE layer.

Legend: L MoE layers, E logical experts, W window steps, T tokens, K top-k, C = E + 2 counter
columns (the E experts, then one column for out-of-range ids, then one for padding).

`record` is two kernels: ``clamp(-1, E)`` and ``put_(..., accumulate=True)`` into the layer's
counter row. ``put_`` wraps negative indices, so padding (-1 after the clamp) lands in the
last column and ids ``>= E`` in column ``E``, with no branch and no extra kernel. With
``trusted=True`` the caller vouches for ids in ``[-1, E)`` and the clamp is skipped.

Everything on the hot path (`LoadTracker.record`, `LoadTracker.step`) is a fixed sequence of
device kernels on preallocated buffers: no host synchronisation, no allocation whose size
depends on the data, no Python branch on device values. So both can run inside a captured
CUDA graph and under ``torch.cuda.set_sync_debug_mode("error")``, and every replay updates the
buffers in place. The ring position is a device tensor for the same reason: a Python counter
would be baked into the graph at capture time.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.distributed as dist

from eplb.atomic import critical_section
from eplb.comm.collectives import all_reduce_sum
from eplb.errors import EPLBError

__all__ = ["LoadTracker", "check_window_size", "check_num_valid_tokens"]

logger = logging.getLogger("eplb")

_FORMAT = "eplb.load_tracker"
_VERSION = 1
MAX_WINDOW_COUNTERS = 2**28
"""Largest ``window_size * L * E`` a tracker allocates: 2 GiB of int64 counters per rank."""


def check_num_valid_tokens(
    num_valid_tokens: torch.Tensor | int, device: torch.device, num_tokens: int | None = None, *,
    where: str = "the tracker",
) -> torch.Tensor | int:
    """Validate a count of real rows (rows ``>= num_valid_tokens`` are padding) without a device sync.

    Args:
        num_valid_tokens: an int, or a one-element (``0-d`` or ``[1]``) integer tensor on ``device``.
        device: where the rows live; a tensor must be there (graph replays read it there).
        num_tokens: ``T``, the rows of the batch it applies to, when known.
        where: what lives on ``device``, for the message.

    Returns:
        The int, or the tensor reshaped to ``0-d``.

    Raises:
        EPLBError: a bool, a float, another type, a tensor of more than one element or on
            another device; a count ``< 0`` or ``> num_tokens``. The count's value is checked
            for an int and for a CPU tensor; a tensor on an accelerator is read only by the
            kernels (checking it would sync the host at every forward): a negative value then
            marks every row as padding and a value above ``T`` marks none.
    """
    n = num_valid_tokens
    if isinstance(n, torch.Tensor):
        if n.numel() != 1 or n.dim() > 1 or n.dtype.is_floating_point or n.is_complex() or n.dtype == torch.bool:
            raise EPLBError(
                f"num_valid_tokens must be a one-element integer tensor, got shape {tuple(n.shape)} and dtype "
                f"{n.dtype}; use torch.tensor(k, device=...)"
            )
        if n.device != torch.device(device):
            raise EPLBError(
                f"num_valid_tokens is on {n.device} but {where} is on {device}; create it there so graph "
                "replays read it there"
            )
        n = n.reshape(())
        if n.device.type != "cpu":
            return n
        value = int(n)
    else:
        try:
            if isinstance(n, bool):
                raise TypeError
            value = n = operator.index(n)
        except TypeError:
            raise EPLBError(
                f"num_valid_tokens must be an int tensor or an int, got {type(n).__name__} ({n!r}); pass the "
                "number of real rows"
            ) from None
    if value < 0:
        raise EPLBError(f"num_valid_tokens ({value}) must be >= 0: it counts the real rows of the batch")
    if num_tokens is not None and value > num_tokens:
        raise EPLBError(
            f"num_valid_tokens ({value}) must be <= the batch's {num_tokens} rows (rows from num_valid_tokens on "
            f"are padding); set it to the number of real rows, at most {num_tokens}"
        )
    return n


def check_window_size(window_size: int, num_layers: int, num_logical: int) -> None:
    """Raise `EPLBError` when the window ring ``[W, L, E]`` int64 would exceed `MAX_WINDOW_COUNTERS`.

    The wrapper calls this before the ranks agree at wrap time, so every rank raises together.
    """
    counters = window_size * num_layers * num_logical
    if counters > MAX_WINDOW_COUNTERS:
        largest = max(MAX_WINDOW_COUNTERS // max(num_layers * num_logical, 1), 1)
        raise EPLBError(
            f"window_size ({window_size}) * num_layers ({num_layers}) * num_logical ({num_logical}) = "
            f"{counters} load counters ({counters * 8 / 2**30:.1f} GiB of int64) exceeds the bound of "
            f"{MAX_WINDOW_COUNTERS} ({MAX_WINDOW_COUNTERS * 8 // 2**30} GiB); set window_size to at most {largest}"
        )


class LoadTracker:
    """Tokens routed to each logical expert of each MoE layer, over the last ``window_size`` steps.

    The tracker counts **logical** expert ids (what the router chose), not physical slots, so
    the window stays meaningful when the placement changes inside it: nothing has to be
    re-attributed after a rebalance.

    Args:
        num_layers: ``L``, MoE layers tracked (``record`` takes a layer index in ``[0, L)``).
        num_logical: ``E``, logical experts per layer.
        window_size: ``W``, completed steps kept in the window.
        device: where the counters live; record ids from the same device.

    Buffers (all int64, allocated once, updated in place):
        current ``[L, C]`` — the step being recorded (plus the out-of-range and padding
        columns); window ``[W, L, E]`` — a ring of completed steps (`window_load` sums it: one
        reduction, off the hot path, so `step` stays four kernels, replayed as one small CUDA graph
        on a GPU); ring position, steps recorded and the enabled flag — device scalars.
    """

    def __init__(
        self, num_layers: int, num_logical: int, window_size: int, device: str | torch.device = "cpu"
    ):
        for name, value, low in (
            ("num_layers", num_layers, 1),
            ("num_logical", num_logical, 1),
            ("window_size", window_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EPLBError(f"{name} ({value!r}) must be an int >= {low}")
        check_window_size(window_size, num_layers, num_logical)
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.window_size = window_size
        self.device = _normalise_device(device)
        E, W, L = num_logical, window_size, num_layers
        opts = {"dtype": torch.int64, "device": self.device}
        # Column E collects ids >= E and is never cleared by step(): its sum is the number of
        # bad ids seen, checked later without a sync on the hot path. Column E + 1 collects
        # padding and is never read.
        self._current_LC = torch.zeros(L, E + 2, **opts)
        self._window_WLE = torch.zeros(W, L, E, **opts)
        self._counters_2 = torch.zeros(2, **opts)  # [ring row the next step() writes, steps done]
        # The recording gate: 1 counts, 0 records nothing; flipped without re-capturing a graph.
        self._enabled = torch.ones((), **opts)
        self._enabled_host = True
        # The put_ source: the gate's value in a contiguous buffer (an expanded view would cost
        # put_ a copy kernel per record); outgrown buffers stay alive for graphs that read them.
        self._flags_N = torch.ones(0, **opts)
        self._make_views()
        self._retired_flags: list[torch.Tensor] = []
        self._retired_rows: list[torch.Tensor] = []
        self._row_ids_N1 = torch.arange(0, device=self.device).unsqueeze(1)  # grows to the largest T
        self._step_graph = self._capture_step()

    # ------------------------------------------------------------------ hot path
    def record(
        self,
        layer: int,
        topk_ids: torch.Tensor,
        num_valid_tokens: torch.Tensor | int | None = None,
        *,
        trusted: bool = False,
    ) -> None:
        """Add one batch of routing decisions of ``layer`` to the current step.

        Args:
            layer: MoE layer index in ``[0, L)`` (a Python int).
            topk_ids: ``[T, K]`` int — logical expert chosen for each (token, k); negative ids
                are padding and are ignored.
            num_valid_tokens: optional ``0-d``/``[1]`` int tensor on the tracker's device (or a
                Python int) ``>= 0`` — rows ``>= num_valid_tokens`` are ignored. A tensor can be
                updated in place between CUDA-graph replays of a padded batch; its value is checked
                only on the CPU (see `check_num_valid_tokens`).
            trusted: the caller guarantees ids in ``[-1, E)`` (a router's top-k output, as the
                EPLB expert layer passes it): skips the clamping kernel, so recording is one
                kernel launch. An id outside that range is then miscounted or faults.

        Ids ``>= E`` raise `EPLBError` at once when ``topk_ids`` is on the CPU. On an
        accelerator they are counted in a device counter (checking them here would need a
        host sync) and the next `window_load` raises.
        """
        if trusted and num_valid_tokens is None and topk_ids.dtype is torch.int64 and not topk_ids.is_cpu:
            # The EPLB layer's hot path: its layer index is known good, its ids are int64 in [-1, E).
            numel = topk_ids.numel()
            source = self._sources.get(numel)
            if source is None:
                source = self._source(numel)
            self._rows_C[layer].put_(topk_ids, source, accumulate=True)
            return
        row_C = self._rows_C[self._check_layer(layer)]
        ids_TK = self._check_ids(topk_ids)
        E = self.num_logical
        if ids_TK.dtype != torch.int64:
            ids_TK = ids_TK.to(torch.int64)  # put_ takes int64 indices only
        if ids_TK.device.type == "cpu" and ids_TK.numel() and int(ids_TK.max()) >= E:
            bad = int(ids_TK.max())
            raise EPLBError(
                f"topk_ids holds expert id {bad}, outside [0, num_logical={E}); "
                "record logical expert ids (use a negative id for padding)"
            )
        # Padding -> -1, which put_ wraps to the last (padding) column; ids >= E -> column E.
        col_TK = ids_TK if trusted else ids_TK.clamp(-1, E)
        if num_valid_tokens is not None:
            col_TK = self._mask_rows(col_TK, num_valid_tokens)
        row_C.put_(col_TK, self._source(col_TK.numel()), accumulate=True)

    def step(self) -> None:
        """Close the current step: it becomes the newest step of the window, the oldest drops out.

        No host sync; safe to capture in a CUDA graph together with the `record` calls. Atomic
        under ``KeyboardInterrupt`` (see `eplb.atomic`): the ring, its sum and the counters
        move together or not at all.
        """
        with critical_section():
            graph = self._step_graph
            if (
                graph is not None
                and torch.cuda.current_device() == self.device.index
                and not torch.cuda.is_current_stream_capturing()
            ):
                graph.replay()  # the four kernels below, launched at once (about a sixth of the host time)
            else:
                self._step_kernels()

    def _step_kernels(self) -> None:
        self._window_WLE.index_copy_(0, self._pos_1, self._current_1LE)
        self._current_1LE.zero_()
        self._counters_2.add_(1)
        self._pos_1.remainder_(self.window_size)

    def _capture_step(self) -> torch.cuda.CUDAGraph | None:
        """The kernels of `step` captured once in a CUDA graph over this tracker's buffers, which
        are updated in place for the tracker's life (None off CUDA or inside a capture).

        Launching four small kernels costs far more host time than the GPU time they take; in an
        eager loop `step` replays this graph instead (measured on 1 H200 GPU: 7 us vs 50 us of
        host time). Capturing runs nothing: the buffers are unchanged.
        """
        if self.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return None
        try:
            return self._capture_step_kernels()
        except RuntimeError as exc:  # a platform without graph capture: the kernels one by one
            logger.debug("the tracker's step runs without a CUDA graph: %s", exc)
            return None

    def _capture_step_kernels(self) -> torch.cuda.CUDAGraph:
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                # Load the kernels outside the capture, on scratch copies (the state must not move).
                scratch = LoadTracker.__new__(LoadTracker)
                scratch.__dict__.update(
                    _window_WLE=self._window_WLE[:1].clone(), _current_1LE=self._current_1LE.clone(),
                    _counters_2=torch.zeros_like(self._counters_2), window_size=self.window_size,
                )
                scratch._pos_1 = scratch._counters_2[:1]
                scratch._step_kernels()
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._step_kernels()
                finally:
                    graph.capture_end()
            torch.cuda.current_stream().wait_stream(stream)
        return graph

    def _make_views(self) -> None:
        """Views of the buffers, made once: each view costs a dispatcher call on the hot path."""
        E = self.num_logical
        self._rows_C = list(self._current_LC.unbind(0))
        self._current_1LE = self._current_LC[:, :E].unsqueeze(0)
        self._out_of_range_L = self._current_LC[:, E]
        self._pos_1 = self._counters_2[:1]
        self._steps = self._counters_2[1]
        self._sources: dict[int, torch.Tensor] = {}  # numel -> view of _flags_N

    _VIEWS = ("_rows_C", "_current_1LE", "_out_of_range_L", "_pos_1", "_steps", "_sources", "_step_graph")

    def __getstate__(self) -> dict:
        # Views and the step graph are made again: pickle would turn each view into a detached
        # copy (records would land where nothing reads them), and a CUDA graph does not copy.
        return {k: v for k, v in self.__dict__.items() if k not in self._VIEWS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_views()
        self._step_graph = self._capture_step()

    # ------------------------------------------------------------------ reading
    def window_load(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """The load over the window.

        Args:
            group: ``None`` for this process's load, or a ``torch.distributed`` process group
                to sum over (a collective: every rank of the group must call it). A CUDA
                tracker with a group whose backend is not NCCL (e.g. gloo) reduces a CPU copy.

        Returns:
            ``[L, E]`` int64 on the tracker's device — tokens routed to each logical expert over
            the last ``min(steps_recorded, W)`` completed steps (the current step not included).
        """
        self._raise_on_out_of_range()
        load_LE = self._window_WLE.sum(0)
        return all_reduce_sum(load_LE, group) if group is not None else load_LE

    def last_step_load(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """``[L, E]`` int64 — the load of the most recently completed step (zeros before the first).

        ``group`` works as in `window_load`. No host sync without a group.
        """
        last_1 = (self._pos_1 - 1).remainder(self.window_size)
        load_LE = self._window_WLE.index_select(0, last_1)[0]
        return all_reduce_sum(load_LE, group) if group is not None else load_LE

    @property
    def steps_recorded(self) -> int:
        """Completed steps since construction or `reset` (reads a device scalar: a host sync
        on an accelerator, so keep it off the hot path)."""
        return int(self._steps.item())

    @property
    def enabled(self) -> bool:
        """Recording gate: while False, `record` adds nothing (the kernels still run, so a
        captured graph keeps working and honours the flag on replay). True by default."""
        return self._enabled_host

    @enabled.setter
    def enabled(self, value: bool) -> None:
        value = bool(value)
        with critical_section():
            self._enabled_host = value
            self._fill_gate(int(value))

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything recorded (in place, so captured graphs stay valid)."""
        with critical_section():
            for buf in (self._current_LC, self._window_WLE, self._counters_2):
                buf.zero_()

    def state_dict(self) -> dict:
        """A checkpointable copy (CPU tensors): sizes, the window ring ``window`` ``[W, L, E]``
        int64 tokens, the current step ``current`` ``[L, E]`` int64, ``position`` (the ring's next
        row), ``steps_recorded``, ``out_of_range`` and ``enabled``."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "num_layers": self.num_layers,
            "num_logical": self.num_logical,
            "window_size": self.window_size,
            "window": self._window_WLE.cpu().clone(),
            "current": self._current_LC[:, : self.num_logical].cpu().clone(),
            "position": int(self._pos_1.item()),
            "steps_recorded": int(self._steps.item()),
            "out_of_range": int(self._out_of_range_L.sum().item()),
            "enabled": self._enabled_host,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` into this tracker's buffers (in place; sizes must match).

        Everything is validated first (`EPLBError`, nothing changed), then applied at once.
        """
        self.apply_staged_state(self.stage_state_dict(state))

    def stage_state_dict(self, state: dict) -> dict:
        """The first half of `load_state_dict`: validate ``state`` completely, change nothing.

        Returns the values `apply_staged_state` writes. Raises `EPLBError` naming the first
        wrong field: format, version, sizes, tensor shapes or dtypes (int64, no casts), meta or
        sparse tensors, negative counts, the ring position or the counters (at most int64's
        largest value).
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise EPLBError(f"state is not a LoadTracker state_dict (expected \"format\": \"{_FORMAT}\")")
        if state.get("version") != _VERSION:
            raise EPLBError(
                f"LoadTracker state has version {state.get('version')!r}; this eplb reads version {_VERSION}"
            )
        ours = (self.num_layers, self.num_logical, self.window_size)
        theirs = (state.get("num_layers"), state.get("num_logical"), state.get("window_size"))
        if theirs != ours:
            raise EPLBError(
                f"LoadTracker state has (num_layers, num_logical, window_size) = {theirs} but this "
                f"tracker has {ours}; build the tracker with the sizes of the checkpoint"
            )
        L, E, W = ours
        window = _state_counts(state, "window", (W, L, E))
        current = _state_counts(state, "current", (L, E))
        position = _state_int(state, "position", 0, W - 1)
        steps = _state_int(state, "steps_recorded", 0, None)
        out_of_range = _state_int({"out_of_range": 0, **state}, "out_of_range", 0, None)
        enabled = state.get("enabled", True)
        if not isinstance(enabled, bool):
            raise EPLBError(f"LoadTracker state field 'enabled' ({enabled!r}) must be a bool")
        return {
            "window": window.to(self.device),
            "current": current.to(self.device),
            "position": position,
            "steps": steps,
            "out_of_range": out_of_range,
            "enabled": enabled,
        }

    def apply_staged_state(self, staged: dict) -> None:
        """The second half of `load_state_dict`: write a `stage_state_dict` result (cannot fail
        on a staged value; atomic under ``KeyboardInterrupt``, see `eplb.atomic`)."""
        E = self.num_logical
        with critical_section():
            self._window_WLE.copy_(staged["window"])
            self._current_LC.zero_()
            self._current_LC[:, :E].copy_(staged["current"])
            self._out_of_range_L[0] = staged["out_of_range"]
            self._pos_1.fill_(staged["position"])
            self._steps.fill_(staged["steps"])
            self._enabled_host = staged["enabled"]
            self._fill_gate(int(staged["enabled"]))

    def __repr__(self) -> str:
        return (
            f"LoadTracker(num_layers={self.num_layers}, num_logical={self.num_logical}, "
            f"window_size={self.window_size}, device={str(self.device)!r})"
        )

    # ------------------------------------------------------------------ checks
    def _check_layer(self, layer) -> int:
        try:
            index = operator.index(layer)
        except TypeError:
            raise EPLBError(f"layer must be a Python int, got {type(layer).__name__}") from None
        if isinstance(layer, bool) or not 0 <= index < self.num_layers:
            raise EPLBError(f"layer ({layer!r}) must be in [0, num_layers={self.num_layers})")
        return index

    def _check_ids(self, topk_ids) -> torch.Tensor:
        if not isinstance(topk_ids, torch.Tensor):
            raise EPLBError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
        if topk_ids.dim() != 2:
            raise EPLBError(
                f"topk_ids must be a [T, K] tensor, got shape {tuple(topk_ids.shape)}; "
                "pass the router's top-k expert ids, one row per token"
            )
        if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
            raise EPLBError(f"topk_ids must hold integer expert ids, got dtype {topk_ids.dtype}")
        if topk_ids.device != self.device:
            raise EPLBError(
                f"topk_ids is on {topk_ids.device} but the tracker is on {self.device}; "
                f"build the LoadTracker with device={str(topk_ids.device)!r}"
            )
        return topk_ids

    def _mask_rows(self, col_TK: torch.Tensor, num_valid_tokens) -> torch.Tensor:
        T = col_TK.shape[0]
        # A count above T marks no row (the tracker records any batch); the layer refuses one.
        n = check_num_valid_tokens(num_valid_tokens, self.device)
        if isinstance(n, torch.Tensor):
            # rows >= n -> padding, computed on the device so graph replays can change n.
            if self._row_ids_N1.shape[0] >= T:
                rows_T1 = self._row_ids_N1[:T]
            else:
                rows_T1 = torch.arange(T, device=col_TK.device).unsqueeze(1)
                # A tensor made during capture holds no values until replay: never keep it.
                if not (col_TK.is_cuda and torch.cuda.is_current_stream_capturing()):
                    self._retired_rows.append(self._row_ids_N1)  # a graph captured before may read it
                    self._row_ids_N1 = rows_T1
            # Out of place: col_TK may be the caller's own ids (trusted, int64).
            return col_TK.masked_fill(rows_T1 >= n, -1)
        if n >= T:
            return col_TK
        col_TK = col_TK.clone()  # never write into the caller's ids
        col_TK[n:] = -1
        return col_TK

    def _source(self, numel: int) -> torch.Tensor:
        """``[numel]`` — the gate's value, contiguous (put_'s source)."""
        flags = self._flags_N
        if flags.numel() < numel:
            if flags.is_cuda and torch.cuda.is_current_stream_capturing():
                # A buffer filled in a capture holds values only once replayed: read the gate itself.
                return self._enabled.expand(numel)
            self._retired_flags.append(flags)
            flags = self._flags_N = self._enabled.expand(max(numel, 2 * flags.numel(), 1024)).clone()
            self._sources.clear()  # views of the outgrown buffer
        if len(self._sources) >= 64:  # many batch sizes: keep the cache small
            self._sources.clear()
        source = self._sources[numel] = flags[:numel]  # a view costs a dispatcher call: made once per size
        return source

    def _fill_gate(self, value: int) -> None:
        """Set the recording gate, and every put_ source a captured graph may read."""
        self._enabled.fill_(value)
        self._flags_N.fill_(value)
        for old in self._retired_flags:
            old.fill_(value)

    def _raise_on_out_of_range(self) -> None:
        bad = int(self._out_of_range_L.sum().item())
        if bad:
            raise EPLBError(
                f"{bad} recorded expert id(s) were >= num_logical ({self.num_logical}) and were not counted; "
                "record logical expert ids in [0, num_logical) (negative ids mark padding); "
                "call reset() to clear this error"
            )


_INT64_MAX = 2**63 - 1


def _state_counts(state: dict, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise EPLBError(f"LoadTracker state field {key!r} must be an int64 tensor, got {got}")
    if value.layout != torch.strided or value.is_meta:
        got = "a meta tensor (no data)" if value.is_meta else f"a tensor of layout {value.layout}"
        raise EPLBError(
            f"LoadTracker state field {key!r} is {got}; it must be a dense int64 tensor holding counts "
            "(load the checkpoint without map_location='meta', and densify a sparse tensor with .to_dense())"
        )
    if tuple(value.shape) != shape:
        raise EPLBError(
            f"LoadTracker state tensor shapes do not match: {key!r} is {tuple(value.shape)}; expected {shape}"
        )
    value = value.detach().cpu()
    if value.numel() and int(value.min()) < 0:
        raise EPLBError(f"LoadTracker state field {key!r} holds a negative count ({int(value.min())})")
    return value


def _state_int(state: dict, key: str, low: int, high: int | None) -> int:
    # The counters are int64 device scalars: a larger value would fail half-way through applying.
    high = _INT64_MAX if high is None else high
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > high:
        bound = f"[{low}, {high}]"
        raise EPLBError(
            f"LoadTracker state field {key!r} ({value!r}) must be an int {bound}; the state is damaged: "
            "load a state_dict() as the tracker wrote it"
        )
    return value


def _normalise_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        # torch.device("cuda") != torch.device("cuda:0"); pin the index so device checks compare equal.
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
