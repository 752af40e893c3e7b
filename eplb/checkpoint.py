"""Logical checkpoints: fill a wrapped model from the unwrapped model's weights, reading only
what this rank holds.

Legend: E logical experts, S slots on this rank, U distinct logical experts among them.

A wrapped model holds, per MoE layer, this rank's ``S`` physical slots instead of the ``E``
logical experts, so the unwrapped model's state dict does not fit it key for key. `LogicalLoader`
is built at wrap time from the unwrapped model: it knows, for every key of that state dict,
where the tensor lands — a dense tensor of the model (copied as is), or a per-expert tensor whose
rows are scattered into every slot that holds the expert. Sources are a state dict, a
``.safetensors`` file, or a folder of them (with or without ``model.safetensors.index.json``),
read lazily with the ``safetensors`` library: a rank reads the dense tensors and, per layer, only
the rows of the ``U <= S`` experts its slots hold. Everything is validated from the source's
metadata (keys, shapes, dtypes) before the first write.

`meta_parameters` builds a model whose parameters are on the ``meta`` device (no memory) while
its buffers keep real values, so that the wrapper can allocate only this rank's slots.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eplb.atomic import critical_section
from eplb.errors import EPLBError
from eplb.moe.adapters import StackedExpertList

__all__ = ["LoadReport", "LogicalLoader", "meta_parameters"]

logger = logging.getLogger("eplb")

_INDEX_NAME = "model.safetensors.index.json"
_SHOWN = 5  # problems listed in one message
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside this context, every parameter a module registers is moved to the ``meta`` device
    at once (buffers, e.g. rotary frequencies, keep their real values: no checkpoint holds the
    non-persistent ones). Build the model in it, then wrap it with ``device=``::

        with eplb.meta_parameters():
            model = AutoModelForCausalLM.from_config(config)
        wrapper = EPLBWrapper(model, cfg, ep_group=group, device="cuda")

    Each parameter is created by the module's own code and then dropped, one at a time, so
    the peak is one parameter, not the model. Patches ``nn.Module.register_parameter`` for the
    duration (not thread-safe; build one model at a time).
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        original(module, name, param)
        param = module._parameters.get(name)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@dataclass(frozen=True)
class LoadReport:
    """What one `LogicalLoader.load` (``wrapper.load_logical_state_dict``) did on this rank.

    Attributes:
        keys: source keys loaded (dense and per-expert).
        dense_tensors: dense tensors copied whole.
        expert_rows_read: per-expert rows read from the source (at most ``U`` per tensor and layer).
        bytes_read: bytes of tensor data read from the source (dense tensors and expert rows).
        slots_written: slot rows written (one per slot and per-expert tensor).
        in_flight: ``"none"``, or ``"waited"`` when an async rebalance was in flight and the load
            first drove it to completion (the weights then land in the new placement).
        seconds: wall time of the load.
    """

    keys: int
    dense_tensors: int
    expert_rows_read: int
    bytes_read: int
    slots_written: int
    in_flight: str
    seconds: float


@dataclass(frozen=True)
class _ExpertKey:
    """Where a per-expert source tensor lands: layer ``layer``'s slot tensor ``tensor``; the
    source holds ``[E, ...]`` rows when ``expert`` is None, else the row of expert ``expert``."""

    layer: int
    tensor: str
    expert: int | None


# ------------------------------------------------------------------------------------ sources
class _Source:
    """Lazy access to named tensors; counts what it reads."""

    def __init__(self) -> None:
        self.rows_read = 0
        self.bytes_read = 0

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        raise NotImplementedError

    def _whole(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def _rows(self, key: str, rows: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def read(self, key: str) -> torch.Tensor:
        t = self._whole(key)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """``[len(rows), ...]``: rows ``rows`` of the tensor ``key``, and nothing else read."""
        t = self._rows(key, rows)
        self.rows_read += len(rows)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_row(self, key: str) -> torch.Tensor:
        """The tensor ``key``, which holds one expert's row."""
        self.rows_read += 1
        return self.read(key)

    def close(self) -> None:
        pass


class _DictSource(_Source):
    def __init__(self, state: dict) -> None:
        super().__init__()
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise EPLBError(
                f"a state dict source maps str keys to tensors; {len(bad)} entries do not "
                f"(e.g. {bad[0]!r}: {type(state[bad[0]]).__name__})"
            )
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def shape_dtype(self, key):
        t = self._state[key]
        return tuple(t.shape), t.dtype

    def _whole(self, key):
        return self._state[key].detach()

    def _rows(self, key, rows):
        t = self._state[key].detach()
        return t.index_select(0, torch.tensor(rows, device=t.device))


class _SafetensorsSource(_Source):
    """Tensors of one or more ``.safetensors`` files, opened with ``safetensors.safe_open`` (memory
    mapped): a row slice reads only that row's bytes."""

    def __init__(self, files_by_key: dict[str, Path]) -> None:
        super().__init__()
        from safetensors import safe_open

        self._files_by_key = files_by_key
        self._stack = contextlib.ExitStack()
        self._handles = {}
        try:
            for path in sorted(set(files_by_key.values())):
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        except Exception as exc:
            self._stack.close()
            raise EPLBError(f"cannot open safetensors file: {exc}") from exc

    def keys(self):
        return list(self._files_by_key)

    def _slice(self, key):
        return self._handles[self._files_by_key[key]].get_slice(key)

    def shape_dtype(self, key):
        sl = self._slice(key)
        code = sl.get_dtype()
        return tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(code, code)

    def _whole(self, key):
        return self._handles[self._files_by_key[key]].get_tensor(key)

    def _rows(self, key, rows):
        sl = self._slice(key)
        return torch.cat([sl[r : r + 1] for r in rows])

    def close(self):
        self._stack.close()


def _open_source(source) -> _Source:
    """A `_Source` for a state dict, a ``.safetensors`` file, or a folder of them."""
    if isinstance(source, dict):
        return _DictSource(source)
    if not isinstance(source, (str, os.PathLike)):
        raise EPLBError(
            "source must be a state dict (the unwrapped model's keys), a .safetensors file or a folder "
            f"holding safetensors files; got {type(source).__name__}"
        )
    path = Path(source)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise EPLBError(f"checkpoint file {str(path)!r} is not a .safetensors file")
        return _SafetensorsSource(_keys_of_files([path]))
    if path.is_dir():
        index = path / _INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise EPLBError(f"{str(index)!r} is not a safetensors index (no weight_map): {exc}") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(f, str) for k, f in weight_map.items()
            ):
                raise EPLBError(
                    f"{str(index)!r}: weight_map must map each tensor name to a file name (strings), "
                    f"got {type(weight_map).__name__} {str(weight_map)[:80]}; rewrite the index as "
                    "save_pretrained writes it"
                )
            files_by_key = {k: path / f for k, f in weight_map.items()}
            missing = sorted({str(f) for f in files_by_key.values() if not f.is_file()})
            if missing:
                raise EPLBError(f"the safetensors index {str(index)!r} names missing files: {missing[:_SHOWN]}")
            return _SafetensorsSource(files_by_key)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise EPLBError(f"folder {str(path)!r} holds no .safetensors file and no {_INDEX_NAME}")
        return _SafetensorsSource(_keys_of_files(files))
    raise EPLBError(f"checkpoint {str(path)!r} does not exist")


def _keys_of_files(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
        except Exception as exc:
            raise EPLBError(f"cannot read safetensors file {str(f)!r}: {exc}") from exc
        for k in keys:
            if k in out:
                raise EPLBError(f"key {k!r} is in two safetensors files: {str(out[k])!r} and {str(f)!r}")
            out[k] = f
    return out


class _View(_Source):
    """A source seen with the model's key names: keys renamed (``renames``: literal substring
    replacements), and stacked ``[E, ...]`` expert tensors assembled from per-expert keys
    (``splits``: stacked key -> templates with ``{e}``; row ``e`` is the concatenation of the
    templates' tensors along their first dimension, as checkpoints that store every expert as
    separate projections hold them)."""

    def __init__(
        self,
        src: _Source,
        renames: list[tuple[str, str]],
        splits: dict[str, list[tuple[str, ...]]],
        num_experts: dict[str, int],
    ) -> None:
        super().__init__()
        self._src = src
        self._raw: dict[str, str] = {}
        for raw in src.keys():
            visible = raw
            for old, new in renames:
                visible = visible.replace(old, new)
            self._raw[visible] = raw
        self._split: dict[str, tuple[tuple[str, ...], int]] = {}
        for key, recipes in splits.items():
            if key in self._raw:
                continue
            for parts in recipes:
                E = num_experts[key]
                if all(part.format(e=e) in self._raw for part in parts for e in range(E)):
                    self._split[key] = (parts, E)
                    break
        consumed = {part.format(e=e) for parts, E in self._split.values() for part in parts for e in range(E)}
        self._visible = [k for k in self._raw if k not in consumed] + list(self._split)

    def keys(self):
        return list(self._visible)

    def shape_dtype(self, key):
        if key not in self._split:
            return self._src.shape_dtype(self._raw[key])
        parts, E = self._split[key]
        found = set()
        for e in range(E):
            metas = [self._src.shape_dtype(self._raw[part.format(e=e)]) for part in parts]
            rest, dtypes = {m[0][1:] for m in metas}, {m[1] for m in metas}
            if len(rest) != 1 or len(dtypes) != 1:
                return (("per-expert parts", *(tuple(m[0]) for m in metas)), dtypes.pop())
            found.add(((sum(m[0][0] for m in metas), *rest.pop()), dtypes.pop()))
        if len(found) != 1:
            return (("experts differ",), "mixed")
        shape, dtype = found.pop()
        return (E, *shape), dtype

    def read(self, key):
        return self._src.read(self._raw[key])

    def read_rows(self, key, rows):
        if key not in self._split:
            return self._src.read_rows(self._raw[key], rows)
        parts, _ = self._split[key]
        return torch.stack(
            [torch.cat([self._src.read_row(self._raw[part.format(e=e)]) for part in parts]) for e in rows]
        )

    def read_row(self, key):
        return self._src.read_row(self._raw[key])

    @property
    def counts(self) -> tuple[int, int]:
        return self._src.rows_read, self._src.bytes_read

    def close(self):
        self._src.close()


def _transformers_conversions(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, tuple[str, ...]]]]:
    """The checkpoint layout transformers declares for the model's type (its weight conversion
    mapping), reduced to what eplb reads lazily: literal key renamings, and stacked expert tensors
    stored per expert (``MergeModulelist(dim=0)``, optionally then ``Concatenate(dim=1)``). Returns
    ``(renames, [(target suffix, source patterns with "*" for the expert)])``; empty for other
    models or without transformers."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return [], []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return [], []
    renames, splits = [], []
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        sources, targets = list(conv.source_patterns), list(conv.target_patterns)
        literal = all(re.fullmatch(r"[\w.*]+", p) for p in sources + targets)
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(conv, "operations", [])]
        if not literal or len(targets) != 1:
            continue
        if type(conv).__name__ == "WeightRenaming" and len(sources) == 1 and "*" not in sources[0] + targets[0]:
            renames.append((sources[0], targets[0]))
        elif ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            if all(p.count("*") == 1 for p in sources) and "*" not in targets[0]:
                splits.append((targets[0], tuple(sources)))
    return renames, splits


# ------------------------------------------------------------------------------------- loader
class LogicalLoader:
    """Maps the unwrapped model's state-dict keys onto a wrapped model, and loads sources.

    Args:
        model: the model, before the wrapper installs its layers.
        specs: its `eplb.moe.MoELayerSpec` list, in model order (layer ``i`` is ``specs[i]``).

    Built before the model is modified; `materialize` and `track_unloaded` run at install.
    """

    def __init__(self, model: nn.Module, specs: list) -> None:
        state = model.state_dict(keep_vars=True)
        names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        expert: dict[str, _ExpertKey] = {}
        unmapped: dict[str, str] = {}
        for i, spec in enumerate(specs):
            prefix = names.get(id(spec.original))
            if prefix is None:
                continue  # an adapter's module outside the model: no key of the state dict is its
            prefix = f"{prefix}." if prefix else ""
            if spec.experts is spec.original:
                expert.update({f"{prefix}{n}": _ExpertKey(i, n, None) for n in spec.expert_tensors})
            elif isinstance(spec.experts, StackedExpertList):
                for stacked_name, key in spec.experts._keys.items():
                    for e in range(spec.num_experts):
                        expert[f"{prefix}{e}.{key}"] = _ExpertKey(i, stacked_name, e)
            else:
                unmapped.update({k: spec.name for k in state if k.startswith(prefix)})
        self._expert = {k: v for k, v in expert.items() if k in state}
        self._dense = {k: t for k, t in state.items() if k not in self._expert and k not in unmapped}
        self._unmapped = unmapped
        self._unloaded: set[str] = set()
        self._renames, recipes = _transformers_conversions(model)
        self._num_experts = {k: specs[v.layer].num_experts for k, v in self._expert.items() if v.expert is None}
        self._splits = {
            key: [
                tuple(key[: -len(target)] + p.replace("*", "{e}") for p in parts)
                for target, parts in recipes
                if key.endswith(target)
            ]
            for key in self._num_experts
        }
        templates = {part for recipes in self._splits.values() for parts in recipes for part in parts}
        self._part_keys = re.compile(
            "|".join(re.escape(t).replace(re.escape("{e}"), r"\d+") for t in sorted(templates)) or r"(?!)"
        )

    # ---------------------------------------------------------------- install
    def materialize(self, model: nn.Module, device: torch.device, *, move_real: bool = False) -> int:
        """Replace every parameter and buffer of ``model`` (the wrapped one) still on the meta
        device by an empty tensor on ``device``; with ``move_real``, also move the real ones that
        sit elsewhere (a model built under `meta_parameters` keeps its buffers on the CPU). Tied
        tensors stay tied. Returns how many tensors were replaced."""
        new: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is None or (t.device.type != "meta" and not move_real):
                        continue
                    if id(t) not in new:
                        value = torch.empty_like(t, device=device) if t.device.type == "meta" else t.detach().to(device)
                        if value is t or (t.device.type != "meta" and value.data_ptr() == t.data_ptr()):
                            continue  # already there
                        new[id(t)] = (
                            type(t)(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
                        )
                    table[name] = new[id(t)]
        for key, t in self._dense.items():
            if id(t) in new:
                self._dense[key] = new[id(t)]
                if t.device.type == "meta":
                    self._unloaded.add(key)
        return len(new)

    def track_experts_unloaded(self) -> None:
        """Count every per-expert key as not loaded yet (the slots were allocated empty)."""
        self._unloaded.update(self._expert)

    @property
    def unloaded(self) -> list[str]:
        """Keys whose tensors still hold no weights (the model was wrapped on the meta device)."""
        return sorted(self._unloaded)

    def check_model_state_dict(self, state_dict: dict, wrapped_keys: set[str]) -> None:
        """Refuse, before anything is copied, a state dict with logical expert keys loaded into the
        wrapped model with ``nn.Module.load_state_dict``: it would copy the dense tensors and then
        fail on the expert keys (or silently skip them with ``strict=False``)."""
        logical = [
            k for k in state_dict
            if k not in wrapped_keys and (k in self._expert or self._part_keys.fullmatch(self._renamed(k)))
        ]
        if logical:
            raise EPLBError(
                f"model.load_state_dict got the unwrapped model's expert keys ({logical[0]!r}, ...), but the "
                "wrapped model holds physical slots; load logical weights with "
                "wrapper.load_logical_state_dict(state) (validated first, every replica updated). Nothing "
                "was loaded"
            )

    def _renamed(self, key: str) -> str:
        for old, new in self._renames:
            key = key.replace(old, new)
        return key

    # ---------------------------------------------------------------- load
    def load(
        self,
        source,
        *,
        strict: bool,
        layers: list,
        rank: int,
        before_write: Callable[[], str],
    ) -> LoadReport:
        """Validate ``source`` completely, call ``before_write`` (returns what it did with an
        in-flight rebalance), then copy the dense tensors and scatter the expert rows layer by
        layer, inside `eplb.atomic.critical_section` (a ``SIGINT`` waits for the end of the load).
        Raises `EPLBError` (no weight written; ``before_write`` still called, so ranks stay in
        step) on any key, shape or dtype mismatch. The rows are streamed from the source while
        they are written (that keeps the peak memory at one layer's rows): a read error in the
        middle of the file, after validation, leaves the weights partly updated."""
        start = time.perf_counter()
        src = _View(_open_source(source), self._renames, self._splits, self._num_experts)
        try:
            try:
                present = self._validate(src, strict, layers)
            except EPLBError:
                # Settle an in-flight rebalance all the same: a peer whose source was valid is
                # waiting for this rank in that collective.
                before_write()
                raise
            in_flight = before_write()
            # An interrupt (Ctrl-C) lands after the last row, never between two of them.
            with critical_section():
                dense, written = self._write(src, present, layers, rank)
        finally:
            src.close()
        loaded = {id(self._dense[k]) for k in present if k in self._dense}
        self._unloaded.difference_update(present)
        self._unloaded.difference_update(k for k, t in self._dense.items() if id(t) in loaded)  # tied names
        return LoadReport(
            keys=len(present),
            dense_tensors=dense,
            expert_rows_read=src.counts[0],
            bytes_read=src.counts[1],
            slots_written=written,
            in_flight=in_flight,
            seconds=time.perf_counter() - start,
        )

    def _validate(self, src: _Source, strict: bool, layers: list) -> list[str]:
        keys = src.keys()
        known = set(self._dense) | set(self._expert)
        problems = []
        unmapped = [k for k in keys if k in self._unmapped]
        if unmapped:
            problems.append(
                f"key {unmapped[0]!r} belongs to layer {self._unmapped[unmapped[0]]!r} whose adapter's experts "
                "module is neither the model's module nor a stacked ModuleList, so eplb cannot map its rows"
            )
        if strict:
            unexpected = [k for k in keys if k not in known and k not in self._unmapped]
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:_SHOWN]}")
            missing = self._missing(set(keys))
            if missing:
                problems.append(f"{len(missing)} missing keys, e.g. {missing[:_SHOWN]}")
        present = [k for k in keys if k in known]
        slots = [layer.slot_tensors() for layer in layers]
        for key in present:
            shape, dtype = src.shape_dtype(key)
            if key in self._dense:
                want_shape, want_dtype = tuple(self._dense[key].shape), self._dense[key].dtype
            else:
                where = self._expert[key]
                slot = slots[where.layer][where.tensor]
                rows = () if where.expert is not None else (layers[where.layer].num_logical,)
                want_shape, want_dtype = (*rows, *slot.shape[1:]), slot.dtype
            if shape != want_shape or dtype != want_dtype:
                problems.append(
                    f"{key!r} is {list(shape)} {dtype} in the source but {list(want_shape)} {want_dtype} in the model"
                )
        if problems:
            more = len(problems) - _SHOWN
            shown = "; ".join(problems[:_SHOWN]) + (f"; and {more} more" if more > 0 else "")
            raise EPLBError(
                f"checkpoint does not fit the unwrapped model ({shown}); nothing was loaded. The source must "
                "hold the unwrapped model's state-dict keys with the model's shapes and dtypes"
                + ("" if not strict else " (strict=False ignores missing and unexpected keys)")
            )
        return present

    def _missing(self, keys: set[str]) -> list[str]:
        """Required keys absent from ``keys``; tied dense tensors need one of their names."""
        by_tensor: dict[int, list[str]] = {}
        for k, t in self._dense.items():
            by_tensor.setdefault(id(t), []).append(k)
        missing = [names[0] for names in by_tensor.values() if not keys.intersection(names)]
        return sorted(missing + [k for k in self._expert if k not in keys])

    def _write(self, src: _Source, present: list[str], layers: list, rank: int) -> tuple[int, int]:
        dense = 0
        with torch.no_grad():
            for key in present:
                if key in self._dense:
                    target = self._dense[key]
                    target.copy_(src.read(key).to(target.device))
                    dense += 1
            by_layer: dict[int, list[str]] = {}
            for key in present:
                if key in self._expert:
                    by_layer.setdefault(self._expert[key].layer, []).append(key)
            written = 0
            # One layer at a time: the peak extra memory is one per-expert tensor's U rows.
            for i, keys in sorted(by_layer.items()):
                written += self._scatter_layer(src, keys, layers[i], rank)
        return dense, written

    def _scatter_layer(self, src: _Source, keys: list[str], layer, rank: int) -> int:
        S = layer.slots_per_rank
        own_S = layer.placement_row()[rank * S : (rank + 1) * S].tolist()
        needed_U = sorted(set(own_S))
        position = {e: u for u, e in enumerate(needed_U)}
        slots = layer.slot_tensors()
        written = 0
        for key in keys:
            where = self._expert[key]
            dst = slots[where.tensor]
            if where.expert is None:
                rows_U = src.read_rows(key, needed_U).to(dst.device)
                for s, e in enumerate(own_S):
                    dst[s].copy_(rows_U[position[e]])
                    written += 1
            elif where.expert in position:
                row = src.read_row(key).to(dst.device)
                for s, e in enumerate(own_S):
                    if e == where.expert:
                        dst[s].copy_(row)
                        written += 1
        return written


# ------------------------------------------------------------------------------- wrap time
def resolve_device(requested, found: torch.device, model: nn.Module, specs: list) -> torch.device:
    """The device of this rank's slots: ``found`` (where the experts are), or ``requested`` when
    the experts are on the meta device. Raises `EPLBError` for a meta model without ``device``, a
    ``device`` that contradicts real experts, or a meta buffer no checkpoint can fill."""
    want = None if requested is None else torch.device(requested)
    _check_meta_buffers(model, specs)
    if found.type != "meta":
        if want is not None and (want.type != found.type or (want.index is not None and want.index != found.index)):
            raise EPLBError(
                f"device ({want}) differs from the device of the experts ({found}); device= is for models "
                "built on the meta device: move the model to one device, or leave device unset"
            )
        return found
    if want is None or want.type == "meta":
        raise EPLBError(
            f"the experts are on the meta device and device is {requested!r}: pass device= (e.g. "
            "device=torch.device('cuda', local_rank)) so eplb allocates this rank's slots there"
        )
    return want


def _check_meta_buffers(model: nn.Module, specs: list) -> None:
    expert_tensors = {id(t) for spec in specs for t in _named(spec.experts, spec.expert_tensors)}
    meta_buffers = [
        f"{name}.{b}" if name else b
        for name, module in model.named_modules()
        for b, t in module._buffers.items()
        if t is not None and t.device.type == "meta" and b in module._non_persistent_buffers_set
        and id(t) not in expert_tensors
    ]
    if meta_buffers:
        raise EPLBError(
            f"non-persistent buffers {meta_buffers[:_SHOWN]} are on the meta device: no checkpoint holds them, "
            "so eplb cannot fill them. Build the model under eplb.meta_parameters() (parameters on meta, "
            "buffers real) instead of torch.device('meta')"
        )


def _named(module: nn.Module, names) -> list[torch.Tensor]:
    owned = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
    return [owned[n] for n in names]
