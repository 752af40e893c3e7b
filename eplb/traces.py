"""Load traces: per-step logical expert load of a run, its file format, recording and synthetic traces.

Legend: T steps of a trace (this file has no token dimension), L MoE layers, E logical experts.

File format, version 1 (``.npz``, read with ``numpy.load(allow_pickle=False)``):

* ``header``: a 0-d unicode array holding JSON
  ``{"format": "eplb.trace", "version": 1, "metadata": {...}}``;
* ``load``: ``[T, L, E]`` array of integer or float token counts, ``>= 0``, finite.

``metadata`` always has ``num_layers`` and ``num_logical`` (they must match ``load``), and may
have ``model``, ``top_k``, ``tokens_per_step``, ``source`` and any other JSON value.

Recording (`TraceWriter`) flushes every ``chunk_steps`` steps into a directory next to the
target, ``<path>.chunks/``, one complete version-1 file per chunk, each written to a temporary
name and renamed (so a chunk on disk is never half-written). ``close()`` merges the chunks into
``<path>`` and removes the directory. A run that dies before ``close()`` leaves the directory:
`Trace.load` of ``<path>`` then reads every flushed chunk, so at most the last, unflushed
``chunk_steps`` steps are lost. A writer still open when the interpreter exits (a script that
ends without ``close()``) is closed then, so ``<path>`` is complete.
Chunks rather than appending to one ``.npz`` because appending
to a zip rewrites its central directory, and a crash during that rewrite loses the whole file.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import shutil
import uuid
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplb.atomic import critical_section
from eplb.errors import EPLBError

__all__ = [
    "Trace",
    "TraceWriter",
    "LoadRecorder",
    "load_trace",
    "from_sglang_dump",
    "lognormal",
    "zipf",
    "drift",
    "hot_shift",
    "synthetic_from_spec",
    "example_trace_path",
    "FORMAT_VERSION",
]

_FORMAT = "eplb.trace"
FORMAT_VERSION = 1
"""Version of the trace file format this eplb writes and reads."""

_CHUNK_SUFFIX = ".chunks"
_GEN_CHUNK = 256  # steps sampled at once by the generators; bounds their temporary memory
_log = logging.getLogger("eplb")


# ---------------------------------------------------------------------------------------- Trace
@dataclass(frozen=True, eq=False)
class Trace:
    """Per-step logical load of a run (recorded or synthetic) and what produced it.

    Attributes:
        loads: ``[T, L, E]`` integer or float CPU tensor — tokens routed to each logical expert
            of each MoE layer at each step (top-k picks count once each).
        metadata: JSON-ready dict: ``num_layers``, ``num_logical`` (always, matching ``loads``),
            ``model``, ``top_k``, ``tokens_per_step``, ``source`` (when known), anything else.

    Build one with ``Trace(loads, metadata)`` (validated), `Trace.load`, `load_trace`, a
    `TraceWriter`, or a generator (`lognormal`, `zipf`, `drift`, `hot_shift`).
    """

    loads: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        loads = _check_loads(self.loads, "trace loads")
        meta = dict(self.metadata)
        for key, value in (("num_layers", loads.shape[1]), ("num_logical", loads.shape[2])):
            if meta.get(key, value) != value:
                raise EPLBError(
                    f"trace metadata says {key}={meta[key]!r} but the loads have shape {tuple(loads.shape)} "
                    f"([steps, num_layers, num_logical]); fix the metadata or the loads"
                )
            meta[key] = int(value)
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise EPLBError(f"trace metadata must be JSON-serialisable: {exc}") from None
        object.__setattr__(self, "loads", loads)
        object.__setattr__(self, "metadata", meta)

    # ------------------------------------------------------------------ sizes
    @property
    def steps(self) -> int:
        """``T``, the number of steps."""
        return int(self.loads.shape[0])

    @property
    def num_layers(self) -> int:
        """``L``, MoE layers."""
        return int(self.loads.shape[1])

    @property
    def num_logical(self) -> int:
        """``E``, logical experts per layer."""
        return int(self.loads.shape[2])

    def total(self, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """``[L, E]`` float64 — load summed over steps ``[start, stop)`` (default: every step,
        what `eplb plan` plans from; a window of the simulator is ``total(t - window, t)``)."""
        # numpy: torch's reduction over the leading dimension is several times slower here.
        return torch.from_numpy(self.loads[start:stop].numpy().sum(axis=0, dtype=np.float64))

    def __repr__(self) -> str:
        src = self.metadata.get("source")
        return f"Trace(steps={self.steps}, L={self.num_layers}, E={self.num_logical}" + (
            f", source={src!r})" if src else ")"
        )

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike, *, compress: bool = True) -> None:
        """Write the trace as a version-1 ``.npz`` (see the module docstring).

        The file is written to a temporary name and renamed, so ``path`` is never half-written.
        ``compress`` trades write time for size (counts compress several-fold).
        """
        _write_npz(Path(path), self.loads.numpy(), self.metadata, compress=compress)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a trace written by `save` or by a `TraceWriter`, validated.

        If ``path`` does not exist but ``<path>.chunks/`` does (a recording that was never
        closed), the flushed chunks are read and a warning is logged. A ``*.chunks`` directory
        can also be passed directly. Raises `EPLBError` on a missing file, a file that is not an
        eplb trace, an unknown format version, a wrong shape, negative, NaN or inf loads.
        """
        p = Path(path)
        if p.is_file():
            loads, meta = _read_npz(p)
            return cls(torch.from_numpy(loads), meta)
        if p.is_dir() and not any(p.glob("chunk_*.npz")):
            raise EPLBError(f"{str(path)!r} is a directory, not an eplb trace file (.npz)")
        chunk_dir = p if p.is_dir() else p.with_name(p.name + _CHUNK_SUFFIX)
        if chunk_dir.is_dir():
            loads, meta, num_chunks = _read_chunks(chunk_dir, str(path))
            _log.warning(
                "trace %r was not closed (interrupted recording); read %d steps from %d flushed chunks",
                str(path), loads.shape[0], num_chunks,
            )
            return cls(torch.from_numpy(loads), meta)
        raise EPLBError(f"trace file {str(path)!r} does not exist")


def _check_loads(loads: Any, what: str) -> torch.Tensor:
    """Validate ``[T, L, E]`` loads; returns a contiguous CPU tensor (int32/int64/float32/float64)."""
    if isinstance(loads, torch.Tensor) and loads.dtype in (torch.uint16, torch.uint32, torch.uint64):
        loads = loads.detach().cpu().numpy()
    if isinstance(loads, np.ndarray) and loads.dtype.kind == "u":
        # Unsigned counts convert to int64: one >= 2**63 would wrap to a negative count.
        if loads.size and int(loads.max()) >= 2**63:
            raise EPLBError(
                f"{what} hold a count of {int(loads.max())}, beyond int64 (2**63 - 1); loads are token "
                "counts and cannot be that large"
            )
        loads = loads.astype(np.int64)
    if isinstance(loads, np.ndarray):
        loads = torch.from_numpy(np.ascontiguousarray(loads))
    elif not isinstance(loads, torch.Tensor):
        try:
            loads = torch.as_tensor(np.asarray(loads))
        except Exception:
            raise EPLBError(f"{what} must be a [steps, L, E] array, got {type(loads).__name__}") from None
    if loads.dim() != 3:
        raise EPLBError(
            f"{what} must have shape [steps, num_layers, num_logical], got shape {tuple(loads.shape)}"
        )
    if loads.dtype == torch.bool or loads.is_complex():
        raise EPLBError(f"{what} must hold integer or float token counts, got dtype {loads.dtype}")
    loads = loads.detach().cpu()
    if loads.dtype not in (torch.int32, torch.int64, torch.float32, torch.float64):
        loads = loads.to(torch.float64 if loads.dtype.is_floating_point else torch.int64)
    loads = loads.contiguous()
    if loads.dtype.is_floating_point and loads.numel() and not torch.isfinite(loads).all():
        raise EPLBError(f"{what} contain NaN or inf; loads must be finite token counts")
    if loads.numel() and (loads < 0).any():
        t, l, e = (loads < 0).nonzero()[0].tolist()
        raise EPLBError(
            f"{what} contain a negative count ({loads[t, l, e].item()} at step {t}, layer {l}, expert {e}); "
            "loads must be >= 0"
        )
    return loads


def _write_npz(path: Path, loads: np.ndarray, metadata: dict, *, compress: bool) -> None:
    header = json.dumps({"format": _FORMAT, "version": FORMAT_VERSION, "metadata": metadata})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the renamed file; "xb" honours the umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            (np.savez_compressed if compress else np.savez)(f, header=np.array(header), load=loads)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_npz(path: Path) -> tuple[np.ndarray, dict]:
    name = str(path)
    if not zipfile.is_zipfile(path):
        raise EPLBError(f"{name!r} is not an eplb trace (not an .npz file); write traces with Trace.save")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "header" not in npz.files or "load" not in npz.files:
                raise EPLBError(
                    f"{name!r} is not an eplb trace (it has arrays {sorted(npz.files)}, expected 'header' "
                    "and 'load'); write traces with Trace.save or TraceWriter"
                )
            header_text = str(npz["header"][()])
            loads = npz["load"]
    except EPLBError:
        raise
    except Exception as exc:  # a damaged archive fails in zipfile, zlib, numpy's header parser...
        raise EPLBError(
            f"{name!r} is not a readable eplb trace (.npz), it is damaged ({type(exc).__name__}: {exc})"
        ) from None
    try:
        header = json.loads(header_text)
    except json.JSONDecodeError as exc:
        raise EPLBError(f"{name!r} has a corrupt trace header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise EPLBError(f"{name!r} is not an eplb trace (its header lacks \"format\": \"{_FORMAT}\")")
    if header.get("version") != FORMAT_VERSION:
        raise EPLBError(
            f"{name!r} has trace format version {header.get('version')!r}; this eplb reads version "
            f"{FORMAT_VERSION}; upgrade eplb or re-export the trace"
        )
    meta = header.get("metadata", {})
    if not isinstance(meta, dict):
        raise EPLBError(f"{name!r} has trace metadata of type {type(meta).__name__}, expected an object")
    _check_loads(loads, f"trace {name!r}")  # message names the file
    return loads, meta


def _read_chunks(chunk_dir: Path, name: str) -> tuple[np.ndarray, dict, int]:
    chunks = sorted(chunk_dir.glob("chunk_*.npz"))
    if not chunks:
        raise EPLBError(f"trace {name!r} was never closed and has no flushed chunk in {str(chunk_dir)!r}")
    parts = [_read_npz(c) for c in chunks]
    shapes = {part[0].shape[1:] for part in parts}
    if len(shapes) != 1:
        raise EPLBError(f"chunks of {str(chunk_dir)!r} have different [L, E] shapes {sorted(shapes)}")
    return np.concatenate([part[0] for part in parts]), parts[0][1], len(chunks)


def load_trace(source: str | os.PathLike) -> Trace:
    """The trace named by ``source``, the way the ``eplb`` command reads its TRACE argument.

    ``source`` is one of:

    * a path to a trace file (or an interrupted recording, see `Trace.load`);
    * ``"example"``: the small trace bundled with eplb (`example_trace_path`);
    * a synthetic spec, ``"synthetic:<kind>?key=value&..."`` (see `synthetic_from_spec`);
    * a ``.pt`` dump of SGLang's expert-distribution recorder (`from_sglang_dump`).
    """
    text = os.fspath(source)
    if text == "example":
        return Trace.load(example_trace_path())
    if text.startswith("synthetic:"):
        return synthetic_from_spec(text)
    if text.endswith(".pt"):
        return from_sglang_dump(text)
    return Trace.load(text)


def from_sglang_dump(path: str | os.PathLike) -> Trace:
    """A trace from a dump of SGLang's expert-distribution recorder (``dump_expert_distribution_record``
    in its ``stat`` mode): a ``torch.save`` dict whose ``"logical_count"`` is ``[T, L, E]`` (one
    row per recorded forward pass) or ``[L, E]`` (already summed; read as one step).

    Read with ``torch.load(weights_only=True)``: no code in the file runs. Raises `EPLBError` for a
    missing or unreadable file, or one without a ``logical_count`` of those shapes.
    """
    name = os.fspath(path)
    if not Path(name).is_file():
        raise EPLBError(f"trace file {name!r} does not exist")
    try:
        dump = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EPLBError(f"{name!r} is not a readable torch.save file: {' '.join(str(exc).split())[:200]}") from None
    count = dump.get("logical_count") if isinstance(dump, dict) else None
    if not isinstance(count, torch.Tensor) or count.dim() not in (2, 3):
        raise EPLBError(
            f"{name!r} is not an SGLang expert-distribution dump: expected a dict with a 'logical_count' tensor "
            "of shape [steps, num_layers, num_logical] or [num_layers, num_logical]"
        )
    loads = count if count.dim() == 3 else count.unsqueeze(0)
    return Trace(loads, {"source": f"sglang:{Path(name).name}"})


def example_trace_path() -> Path:
    """Path of the bundled example trace: 400 steps, 4 layers, 64 experts, top-8, 1024 tokens per
    step; synthetic (log-normal popularity, sigma 1, slow drift, hot experts reshuffled at step 200).
    Its ``metadata["source"]`` is the spec that regenerates it."""
    return Path(__file__).resolve().parent / "data" / "example_trace.npz"


# ---------------------------------------------------------------------------------------- writer
class TraceWriter:
    """Record a trace one step at a time, flushing to disk every ``chunk_steps`` steps.

    ``append`` keeps the step's ``[L, E]`` load (a device tensor stays on its device, so
    recording adds no host synchronisation per step); every ``chunk_steps`` steps the buffer is
    copied to the CPU, validated and written as ``<path>.chunks/chunk_NNNNNN.npz``. ``close()``
    merges the chunks into ``path``. A crash loses at most the unflushed steps; `Trace.load`
    reads what was flushed. Use as a context manager to close on exit.

    Args:
        path: target ``.npz`` file.
        metadata: JSON-ready dict (``model``, ``top_k``, ``tokens_per_step``, ``source``, ...);
            ``num_layers`` / ``num_logical``, if given, are checked against the appended loads.
        chunk_steps: steps per flushed chunk (> 0).
        compress: compress the final file (chunks are written uncompressed, for speed).
    """

    def __init__(
        self, path: str | os.PathLike, metadata: dict[str, Any] | None = None, *, chunk_steps: int = 256,
        compress: bool = True,
    ) -> None:
        if int(chunk_steps) <= 0:
            raise EPLBError(f"chunk_steps ({chunk_steps}) must be > 0")
        self.path = Path(path)
        self.chunk_dir = self.path.with_name(self.path.name + _CHUNK_SUFFIX)
        if self.chunk_dir.exists():
            raise EPLBError(
                f"{str(self.chunk_dir)!r} already exists (an interrupted recording?); load it with "
                f"Trace.load({str(self.path)!r}) and save it elsewhere, or delete it"
            )
        self.metadata = dict(metadata or {})
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise EPLBError(f"trace metadata must be JSON-serialisable: {exc}") from None
        self.chunk_steps = int(chunk_steps)
        self.compress = compress
        self.steps = 0
        self.closed = False
        self._shape: tuple[int, int] | None = None
        self._buffer: list[Any] = []
        self._num_chunks = 0
        self.chunk_dir.mkdir(parents=True)
        self._exit_hook = _finish_at_exit(self)

    def append(self, load_LE: torch.Tensor | np.ndarray) -> None:
        """Add one step. ``load_LE``: ``[L, E]`` int or float — tokens per logical expert.

        A CPU load is validated at once (``EPLBError``, nothing recorded). A device load is
        validated when its chunk is flushed, so recording never waits for the device; a
        negative or NaN count found then drops that whole chunk and raises.
        """
        if self.closed:
            raise EPLBError(f"TraceWriter for {str(self.path)!r} is closed; open a new one to record more")
        shape = tuple(load_LE.shape)
        if self._shape is None:
            if len(shape) != 2:
                raise EPLBError(
                    f"TraceWriter.append expects one step's load [num_layers, num_logical], got {shape}"
                )
            for key, got in (("num_layers", shape[0]), ("num_logical", shape[1])):
                if self.metadata.get(key, got) != got:
                    raise EPLBError(
                        f"TraceWriter.append got a load of shape {shape} but the metadata says "
                        f"{key}={self.metadata[key]!r}"
                    )
            self._shape = shape
        elif shape != self._shape:
            raise EPLBError(f"TraceWriter.append got shape {shape}, but earlier steps had {self._shape}")
        # Copy: trackers reuse their counters, and a device copy here does not block the host.
        if isinstance(load_LE, torch.Tensor) and load_LE.device.type != "cpu":
            self._buffer.append(load_LE.detach().clone())
        else:
            step = load_LE.detach().numpy().copy() if isinstance(load_LE, torch.Tensor) else np.array(load_LE)
            _check_loads(step[None], "the appended step's loads")
            self._buffer.append(step)
        self.steps += 1
        if len(self._buffer) >= self.chunk_steps:
            self.flush()

    def flush(self) -> None:
        """Write the buffered steps as one chunk now (no-op when the buffer is empty)."""
        if not self._buffer:
            return
        steps = [b.cpu().numpy() if isinstance(b, torch.Tensor) else b for b in self._buffer]
        chunk = np.stack(steps)
        try:
            _check_loads(chunk, f"loads appended to {str(self.path)!r}")
        except EPLBError as exc:
            self._buffer = []
            self.steps -= len(steps)
            raise EPLBError(f"{exc}; dropped the {len(steps)} steps of this chunk") from None
        # The buffer is dropped only once its chunk is written: a flush cut short (Ctrl-C) is
        # simply done again, over the same chunk file.
        _write_npz(self.chunk_dir / f"chunk_{self._num_chunks:06d}.npz", chunk, self._meta(), compress=False)
        with critical_section():
            self._buffer = []
            self._num_chunks += 1

    def close(self) -> Trace:
        """Flush, merge the chunks into ``path``, remove the chunk directory; returns the trace
        (``loads`` ``[T, L, E]``). Called again after a close cut short (Ctrl-C), it finishes it.

        Raises:
            EPLBError: no step was appended (nothing written), or the last chunk held a negative
                or NaN count (that chunk is dropped).
        """
        if self.closed:
            shutil.rmtree(self.chunk_dir, ignore_errors=True)  # a close cut short in its cleanup
            return Trace.load(self.path)
        self.flush()
        if self._num_chunks == 0:
            self.closed = True
            atexit.unregister(self._exit_hook)
            shutil.rmtree(self.chunk_dir, ignore_errors=True)
            raise EPLBError(
                f"TraceWriter for {str(self.path)!r} closed before any step was appended; nothing written"
            )
        loads, meta, _ = _read_chunks(self.chunk_dir, str(self.path))
        trace = Trace(torch.from_numpy(loads), meta)
        trace.save(self.path, compress=self.compress)
        # Closed only once the file is written: a close cut short (Ctrl-C) is done again by the
        # next close, finish or the exit hook, from the chunks, which stay until then.
        self.closed = True
        atexit.unregister(self._exit_hook)
        shutil.rmtree(self.chunk_dir, ignore_errors=True)
        return trace

    def _meta(self) -> dict:
        assert self._shape is not None
        return {**self.metadata, "num_layers": self._shape[0], "num_logical": self._shape[1]}

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> Trace | None:
        """`close` if a step was appended (returns the trace); else remove the chunk directory
        and write nothing (returns None). Idempotent; runs at interpreter exit if still open."""
        if self.closed:
            shutil.rmtree(self.chunk_dir, ignore_errors=True)  # a close cut short in its cleanup
            return None
        if self.steps:
            return self.close()
        self.closed = True
        atexit.unregister(self._exit_hook)
        shutil.rmtree(self.chunk_dir, ignore_errors=True)
        return None


def _finish_at_exit(writer: TraceWriter):
    """Register (and return) an atexit hook that finishes ``writer`` if it is still open then.
    It holds only a weak reference, so it keeps no writer (and no device buffer) alive."""
    ref = weakref.ref(writer)

    def hook() -> None:
        live = ref()
        if live is None or live.closed:
            return
        try:
            live.finish()
            _log.info("trace %r was still open at exit; closed it (%d steps)", str(live.path), live.steps)
        except Exception:  # noqa: BLE001 - at exit, report and let the other hooks run
            _log.exception("could not close the trace %r at exit; its flushed chunks stay readable",
                           str(live.path))

    atexit.register(hook)
    return hook


class LoadRecorder:
    """Records the per-step load of a wrapped model into a trace file, started and stopped at
    run time (`EPLBWrapper.start_recording` / ``stop_recording``, the controls of SGLang's
    expert-distribution recorder). The file is a version-1 trace: a load source for
    ``eplb plan``, ``eplb simulate``, `load_trace` and `Trace.load`.

    `on_step` records the tracker's last step, summed over ``group`` (a collective: with several
    ranks every rank calls `start`, `on_step` and `stop` alike; rank 0 writes). Steps taken while
    ``tracker.enabled`` is False are not recorded: the tracker counted nothing for them.

    Args:
        metadata: JSON-ready trace metadata (``num_layers``, ``num_logical``, ``model``, ...).
        rank: this process's rank in ``group``; only rank 0 writes.
        group: the process group the load is summed over (None: this process's load).
    """

    def __init__(self, metadata: dict[str, Any], *, rank: int = 0, group: dist.ProcessGroup | None = None) -> None:
        self.metadata = dict(metadata)
        self.rank = rank
        self.group = group
        self._path: Path | None = None
        self._writer: TraceWriter | None = None

    @property
    def recording(self) -> bool:
        """True between `start` and `stop`."""
        return self._path is not None

    @property
    def unfinished(self) -> bool:
        """True while a recording runs or a `stop` cut short (Ctrl-C) left its file unwritten:
        the next `stop` writes it."""
        return self._writer is not None

    @property
    def path(self) -> Path | None:
        """The file being recorded, or None."""
        return self._path

    def start(self, path: str | os.PathLike, *, chunk_steps: int = 256) -> None:
        """Record every following step into ``path`` (see `TraceWriter` for ``chunk_steps``).

        Raises `EPLBError` when a recording is already running or ``path`` cannot be written.
        """
        if self._path is not None:
            raise EPLBError(
                f"already recording to {str(self._path)!r}; call stop_recording() before starting another"
            )
        if self._writer is not None:
            raise EPLBError(
                f"the stop of the recording to {str(self._writer.path)!r} was cut short; call "
                "stop_recording() again to write that file before starting another"
            )
        target = Path(path)
        if target.is_dir():
            raise EPLBError(f"cannot record to {str(target)!r}: it is a directory; pass a file path such as run.npz")
        try:
            self._writer = TraceWriter(target, self.metadata, chunk_steps=chunk_steps) if self.rank == 0 else None
        except OSError as exc:
            raise EPLBError(f"cannot write the trace {str(target)!r} ({exc})") from None
        self._path = target

    def wants(self, tracker) -> bool:
        """True when the step ``tracker`` just completed is to be recorded (recording, and the
        tracker enabled): the caller then all-reduces its load and passes it to `append`."""
        return self._path is not None and tracker.enabled

    def append(self, load_LE) -> None:
        """Record one step's ``[L, E]`` load, already summed over the group (rank 0 writes)."""
        if self._writer is not None:
            self._writer.append(load_LE)

    def on_step(self, tracker) -> None:
        """Record ``tracker``'s last completed step, summed over ``group`` (no-op when not
        recording or disabled): `wants` + `append`."""
        if self.wants(tracker):
            self.append(tracker.last_step_load(group=self.group))

    def discard(self) -> None:
        """Abandon a recording with no step recorded yet (a wrap that failed after `start`):
        removes its chunk folder and writes nothing."""
        writer, self._path, self._writer = self._writer, None, None
        if writer is not None and writer.steps == 0:
            writer.finish()

    def idle_copy(self) -> LoadRecorder:
        """A recorder with the same metadata and rank, not recording (for a copied wrapper: a
        file has one writer)."""
        return LoadRecorder(self.metadata, rank=self.rank, group=None)

    def stop(self) -> Trace | None:
        """End the recording and write the file. Returns the recorded `Trace` on rank 0; None on
        the other ranks, or when no step was recorded (then no file is written and a warning is
        logged).

        Idempotent, like closing a file: with no recording running (never started, already
        stopped, or ended by the wrapper's ``close``) it does nothing and returns None, so a
        ``finally:`` block may call it unconditionally. `start` is the strict half: starting while
        a recording runs raises `EPLBError`, since it would drop the running one."""
        # The recording ends at once, on every rank alike (`wants` gates a collective), but the
        # writer is forgotten only once its file is complete: a stop cut short (Ctrl-C) is
        # finished by the next one, and no step is appended to a writer being closed.
        path, writer, self._path = self._path, self._writer, None
        if writer is None:
            return None
        trace = writer.close() if writer.closed else writer.finish()  # closed: only its cleanup was cut
        self._writer = None
        if trace is None:
            _log.warning("recording to %r stopped before any step was recorded; nothing written", str(path))
        return trace


# ---------------------------------------------------------------------------------------- synthetic
def lognormal(
    steps: int, num_layers: int, num_logical: int, *, sigma: float = 1.0, tokens_per_step: int = 4096,
    top_k: int = 8, seed: int = 0,
) -> Trace:
    """Fixed log-normal expert popularity per layer, counts sampled per step.

    Each layer's popularity is ``exp(sigma * z)``, ``z ~ N(0, 1)`` per expert, normalised; each
    step draws exactly ``tokens_per_step * top_k`` picks per layer from it (multinomially
    distributed; from 50 picks per expert on, drawn from the Gaussian with the multinomial's mean
    and covariance, see `_sample_counts`. Picks are independent, so a token may pick an expert
    twice, which top-k routing forbids; immaterial for load statistics). ``sigma = 1`` gives a
    max/mean rank load of about 2.4 with 256 experts on 32 ranks without redundancy, close to
    the 2.56 DeepSeek reported for R1 decode on 32 GPUs.

    Returns:
        `Trace` with ``loads: [steps, num_layers, num_logical]`` int32 (int64 when
        ``tokens_per_step * top_k`` exceeds int32).
    """
    args = _check_gen(steps, num_layers, num_logical, tokens_per_step, top_k, sigma=sigma)
    spec = _spec("lognormal", args, sigma=sigma, seed=seed)
    return _generate(args, seed, spec, base="lognormal", sigma=sigma)


def zipf(
    steps: int, num_layers: int, num_logical: int, *, alpha: float = 1.0, tokens_per_step: int = 4096,
    top_k: int = 8, seed: int = 0,
) -> Trace:
    """Fixed Zipf popularity per layer: the expert of popularity rank ``r`` (0-based) gets weight
    ``1 / (r + 1) ** alpha``; which expert holds which rank is a random permutation per layer.
    Counts are sampled per step as in `lognormal`."""
    args = _check_gen(steps, num_layers, num_logical, tokens_per_step, top_k, alpha=alpha)
    spec = _spec("zipf", args, alpha=alpha, seed=seed)
    return _generate(args, seed, spec, base="zipf", alpha=alpha)


def drift(
    steps: int, num_layers: int, num_logical: int, *, sigma: float = 1.0, drift_sigma: float = 0.01,
    tokens_per_step: int = 4096, top_k: int = 8, seed: int = 0,
) -> Trace:
    """Log-normal popularity that drifts slowly: every step multiplies each expert's popularity by
    log-normal noise of log-sd ``drift_sigma``.

    The log-popularity follows a mean-reverting walk ``x[t+1] = rho * x[t] + drift_sigma * z``
    with ``rho = sqrt(1 - (drift_sigma / sigma) ** 2)``, so every step has the skew of
    ``lognormal(sigma=sigma)`` while which experts are hot changes over roughly
    ``(sigma / drift_sigma) ** 2`` steps (10,000 with the defaults; the log-popularity of an
    expert then moves by about ``drift_sigma * sqrt(k)`` over ``k`` steps, 0.3 over 1000 steps).
    Requires ``drift_sigma <= sigma``.
    """
    args = _check_gen(
        steps, num_layers, num_logical, tokens_per_step, top_k, sigma=sigma, drift_sigma=drift_sigma
    )
    if drift_sigma > sigma:
        raise EPLBError(
            f"drift_sigma ({drift_sigma}) must be <= sigma ({sigma}): the per-step noise cannot exceed the "
            "stationary skew; lower drift_sigma or raise sigma"
        )
    spec = _spec("drift", args, sigma=sigma, drift=drift_sigma, seed=seed)
    return _generate(args, seed, spec, base="lognormal", sigma=sigma, drift_sigma=drift_sigma)


def hot_shift(
    steps: int, num_layers: int, num_logical: int, *, sigma: float = 1.0,
    shift_steps: tuple[int, ...] | None = None, drift_sigma: float = 0.0, tokens_per_step: int = 4096,
    top_k: int = 8, seed: int = 0,
) -> Trace:
    """Log-normal popularity whose hot experts change suddenly: at each step in ``shift_steps``
    (default: ``steps // 2``) every layer's popularities are randomly permuted among its experts,
    so the skew stays the same but other experts are hot. ``drift_sigma`` adds slow drift as in
    `drift`."""
    args = _check_gen(
        steps, num_layers, num_logical, tokens_per_step, top_k, sigma=sigma, drift_sigma=drift_sigma
    )
    shifts = tuple(int(s) for s in (shift_steps if shift_steps is not None else (steps // 2,)))
    bad = [s for s in shifts if not 0 < s < steps]
    if bad:
        raise EPLBError(
            f"shift step {bad[0]} is outside (0, steps={steps}); shifts must happen inside the trace"
        )
    if drift_sigma > sigma:
        raise EPLBError(f"drift_sigma ({drift_sigma}) must be <= sigma ({sigma})")
    extra = {"drift": drift_sigma} if drift_sigma else {}
    spec = _spec("hot_shift", args, sigma=sigma, shifts=",".join(map(str, shifts)), **extra, seed=seed)
    return _generate(args, seed, spec, base="lognormal", sigma=sigma, drift_sigma=drift_sigma, shifts=shifts)


def _check_gen(
    steps, num_layers, num_logical, tokens_per_step, top_k, **floats
) -> tuple[int, int, int, int, int]:
    for name, value in (("steps", steps), ("num_layers", num_layers), ("num_logical", num_logical),
                        ("tokens_per_step", tokens_per_step), ("top_k", top_k)):
        if int(value) != value or value <= 0:
            raise EPLBError(f"{name} ({value!r}) must be a positive integer")
    if top_k > num_logical:
        raise EPLBError(
            f"top_k ({top_k}) must be <= num_logical ({num_logical}): a token picks distinct experts"
        )
    for name, value in floats.items():
        if not math.isfinite(value) or value < 0:
            raise EPLBError(f"{name} ({value!r}) must be a finite number >= 0")
    return int(steps), int(num_layers), int(num_logical), int(tokens_per_step), int(top_k)


def _spec(kind: str, args: tuple[int, ...], **params: Any) -> str:
    steps, layers, experts, tokens, top_k = args
    items = {"steps": steps, "layers": layers, "experts": experts, "tokens": tokens, "top_k": top_k, **params}
    query = "&".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())
    return f"synthetic:{kind}?{query}"


def _generate(
    args: tuple[int, int, int, int, int], seed: int, spec: str, *, base: str, sigma: float = 1.0,
    alpha: float = 1.0, drift_sigma: float = 0.0, shifts: tuple[int, ...] = (),
) -> Trace:
    steps, L, E, tokens, top_k = args
    # Separate streams for the popularity path and the sampling, so neither depends on chunking.
    pop_rng, sample_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    if base == "zipf":
        weights_E = np.arange(1, E + 1, dtype=np.float64) ** -float(alpha)
        logp_LE = np.log(np.stack([weights_E[pop_rng.permutation(E)] for _ in range(L)]))
    else:
        logp_LE = sigma * pop_rng.standard_normal((L, E))
    rho = math.sqrt(1.0 - (drift_sigma / sigma) ** 2) if drift_sigma else 1.0
    picks = tokens * top_k
    dtype = np.int32 if picks < 2**31 else np.int64
    out_TLE = np.empty((steps, L, E), dtype=dtype)
    shift_set = set(shifts)
    logp_CLE = np.empty((_GEN_CHUNK, L, E))
    for start in range(0, steps, _GEN_CHUNK):
        stop = min(start + _GEN_CHUNK, steps)
        # Segments end at shift steps: a shift permutes before that step's drift. Each segment
        # draws its drift noise at once (the same stream as one draw per step).
        cuts = sorted({start, stop, *(t for t in shift_set if start < t < stop)})
        for a, b in zip(cuts[:-1], cuts[1:]):
            if a in shift_set:
                logp_LE = np.take_along_axis(logp_LE, np.argsort(pop_rng.random((L, E)), axis=1), axis=1)
            first_drift = max(a, 1)
            noise_KLE = None
            if drift_sigma and b > first_drift:
                noise_KLE = pop_rng.standard_normal((b - first_drift, L, E), dtype=np.float32)
                noise_KLE *= np.float32(drift_sigma)
            for t in range(a, b):
                row_LE = logp_CLE[t - start]
                if noise_KLE is not None and t >= first_drift:
                    np.multiply(logp_LE, rho, out=row_LE)
                    row_LE += noise_KLE[t - first_drift]
                    logp_LE = row_LE
                else:
                    row_LE[...] = logp_LE
            logp_LE = logp_LE.copy()  # the chunk buffer is reused
        # Popularities in float32: their log is within a few units of the row maximum.
        chunk_CLE = logp_CLE[: stop - start]
        p_CLE = np.exp((chunk_CLE - chunk_CLE.max(axis=-1, keepdims=True)).astype(np.float32))
        p_CLE /= p_CLE.sum(axis=-1, keepdims=True)
        out_TLE[start:stop] = _sample_counts(sample_rng, picks, p_CLE)
    meta = {"model": None, "top_k": top_k, "tokens_per_step": tokens, "source": spec}
    return Trace(torch.from_numpy(out_TLE), meta)


_GAUSS_MIN_MEAN = 50  # mean picks per expert from which counts are drawn from the Gaussian approximation


def _sample_counts(rng: np.random.Generator, picks: int, p_XE: np.ndarray) -> np.ndarray:
    """``[..., E]`` integer counts summing to exactly ``picks`` per row, distributed like
    ``Multinomial(picks, p)``.

    With a mean of at least 50 picks per expert, a Gaussian with the multinomial's mean and
    covariance (``x = n p + sqrt(n) (sqrt(p) z - p sum(sqrt(p) z))``, whose rows sum to ``n``
    exactly) is clipped at 0 and rounded to the nearest integer; the few picks the rounding adds
    or drops (about ``sqrt(E / 12)``) go to the row's largest count. About 5x faster than NumPy's
    multinomial at 32,768 picks over 256 experts. Below that mean, the exact multinomial.
    """
    num_experts = p_XE.shape[-1]
    if picks < _GAUSS_MIN_MEAN * num_experts:
        return rng.multinomial(picks, p_XE)
    # float32 represents every count exactly below 2**24 and halves the cost of the noise.
    dtype = np.float32 if picks < 2**24 else np.float64
    p = p_XE.astype(dtype, copy=False)
    y = rng.standard_normal(p.shape, dtype=dtype)
    y *= np.sqrt(p)
    root = dtype(math.sqrt(picks))
    x = p * (dtype(picks) - root * y.sum(-1, keepdims=True))
    y *= root
    x += y
    np.maximum(x, 0, out=x)
    np.rint(x, out=x)
    counts = x.astype(np.int32 if picks < 2**31 else np.int64)
    hot = counts.argmax(-1)[..., None]
    short = picks - counts.sum(-1, keepdims=True, dtype=np.int64)
    np.put_along_axis(counts, hot, np.take_along_axis(counts, hot, -1) + short, -1)
    return counts


# ---------------------------------------------------------------------------------------- spec strings
_COMMON_KEYS = {"steps": int, "layers": int, "experts": int, "tokens": int, "top_k": int, "seed": int}
_SPEC_KEYS: dict[str, dict[str, type]] = {
    "lognormal": {"sigma": float},
    "zipf": {"alpha": float},
    "drift": {"sigma": float, "drift": float},
    "hot_shift": {"sigma": float, "shifts": tuple, "drift": float},
}
_RENAME = {"layers": "num_layers", "experts": "num_logical", "tokens": "tokens_per_step",
           "drift": "drift_sigma", "shifts": "shift_steps"}
_SPEC_KEY_OF = {argument: key for key, argument in _RENAME.items()}
_SPEC_NAMES = re.compile(r"\b(" + "|".join(_SPEC_KEY_OF) + r")\b")
_SPEC_DEFAULTS = {"steps": 1000, "layers": 4, "experts": 64, "tokens": 4096, "top_k": 8, "seed": 0}


def synthetic_from_spec(spec: str) -> Trace:
    """Generate the trace described by a spec string.

    Grammar: ``synthetic:KIND[?KEY=VALUE(&KEY=VALUE)*]``, KIND one of ``lognormal``, ``zipf``,
    ``drift``, ``hot_shift``. Keys of every kind (defaults in brackets): ``steps`` [1000],
    ``layers`` [4], ``experts`` [64], ``tokens`` (per step) [4096], ``top_k`` [8], ``seed`` [0].
    Per kind: lognormal ``sigma`` [1]; zipf ``alpha`` [1]; drift ``sigma`` [1], ``drift`` (per-step
    log-sd) [0.01]; hot_shift ``sigma`` [1], ``shifts`` (comma-separated steps) [steps/2],
    ``drift`` [0]. Example: ``synthetic:lognormal?steps=2000&layers=4&experts=64&sigma=1&seed=0``.
    A generated trace's ``metadata["source"]`` is the full spec, so it can be regenerated.

    Raises:
        EPLBError: one line naming the bad part of the spec.
    """
    if not isinstance(spec, str) or not spec.startswith("synthetic:"):
        raise EPLBError(
            f"synthetic spec {spec!r} must start with 'synthetic:', e.g. synthetic:lognormal?sigma=1"
        )
    body = spec[len("synthetic:"):]
    kind, _, query = body.partition("?")
    if kind not in _SPEC_KEYS:
        raise EPLBError(f"synthetic spec {spec!r}: unknown kind {kind!r}; use one of {', '.join(_SPEC_KEYS)}")
    allowed = {**_COMMON_KEYS, **_SPEC_KEYS[kind]}
    values: dict[str, Any] = dict(_SPEC_DEFAULTS)
    for item in filter(None, query.split("&")):
        key, eq, raw = item.partition("=")
        if not eq or not raw:
            raise EPLBError(f"synthetic spec {spec!r}: {item!r} is not KEY=VALUE")
        if key not in allowed:
            raise EPLBError(
                f"synthetic spec {spec!r}: unknown key {key!r} for {kind}; keys: {', '.join(allowed)}"
            )
        try:
            if allowed[key] is tuple:
                values[key] = tuple(int(s) for s in raw.split(","))
            elif allowed[key] is int:
                number = float(raw)
                if number != int(number):
                    raise ValueError
                values[key] = int(number)
            else:
                values[key] = float(raw)
        except ValueError:
            expected = {int: "an integer", float: "a number", tuple: "comma-separated integers"}[allowed[key]]
            raise EPLBError(f"synthetic spec {spec!r}: {key}={raw!r} must be {expected}") from None
    kwargs = {_RENAME.get(k, k): v for k, v in values.items() if k != "steps"}
    num_layers, num_logical = kwargs.pop("num_layers"), kwargs.pop("num_logical")
    generator = {"lognormal": lognormal, "zipf": zipf, "drift": drift, "hot_shift": hot_shift}[kind]
    try:
        return generator(values["steps"], num_layers, num_logical, **kwargs)
    except EPLBError as exc:
        # The generators speak of their arguments (num_logical); the user wrote the spec's keys (experts).
        message = _SPEC_NAMES.sub(lambda m: _SPEC_KEY_OF[m.group(0)], str(exc))
        raise EPLBError(f"synthetic spec {spec!r}: {message}") from None
