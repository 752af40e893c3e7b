"""MoE adapters, the EPLB expert layer and a reference MoE layer.

`find_moe_layers` walks a model and asks the registered adapters — user adapters first (see
`register_adapter`), then the built-ins `StackedExpertsAdapter` and `ModuleListAdapter` — which
modules are MoE layers. Adapters match by structure, never by class name.
"""

from __future__ import annotations

import torch
from torch import nn

from eplb.errors import EPLBError
from eplb.moe.adapters import (
    ModuleListAdapter,
    MoEAdapter,
    MoELayerSpec,
    StackedExpertList,
    StackedExpertsAdapter,
)
from eplb.moe.layer import EPLBExperts
from eplb.moe.probe import verify_expert_tensors
from eplb.moe.reference import MoE, ResidualStack, SwiGLUExperts
from eplb.moe.slot_layer import PreparedCommit, SlotLayer

__all__ = [
    "MoE",
    "ResidualStack",
    "SwiGLUExperts",
    "EPLBExperts",
    "SlotLayer",
    "PreparedCommit",
    "MoEAdapter",
    "MoELayerSpec",
    "StackedExpertsAdapter",
    "ModuleListAdapter",
    "StackedExpertList",
    "register_adapter",
    "unregister_adapter",
    "registered_adapters",
    "find_moe_layers",
]

_USER_ADAPTERS: list[MoEAdapter] = []


def register_adapter(adapter: MoEAdapter) -> MoEAdapter:
    """Register a `MoEAdapter` instance; it is asked before every built-in adapter (and before
    adapters registered later). Returns ``adapter``."""
    if not isinstance(adapter, MoEAdapter):
        raise EPLBError(
            f"register_adapter expects a MoEAdapter instance, got {type(adapter).__name__}; subclass "
            "eplb.moe.MoEAdapter (or ModuleListAdapter) and pass an instance"
        )
    if any(a is adapter for a in _USER_ADAPTERS):
        raise EPLBError(f"adapter {adapter!r} is already registered")
    _USER_ADAPTERS.append(adapter)
    return adapter


def unregister_adapter(adapter: MoEAdapter) -> None:
    """Remove an adapter added with `register_adapter`."""
    for i, a in enumerate(_USER_ADAPTERS):
        if a is adapter:
            del _USER_ADAPTERS[i]
            return
    raise EPLBError(f"adapter {adapter!r} is not registered")


def registered_adapters() -> list[MoEAdapter]:
    """The adapters in the order they are asked: user adapters, then the built-ins."""
    return [*_USER_ADAPTERS, StackedExpertsAdapter(), ModuleListAdapter()]


def find_moe_layers(model: nn.Module) -> list[MoELayerSpec]:
    """The MoE layers of ``model`` in module order, each claimed by the first adapter that matches.

    Does not modify the model. Each layer's per-expert tensors are proven on a tiny probe
    (`eplb.moe.probe.verify_expert_tensors`; once per distinct module type and tensor layout):
    a shared tensor that merely has ``E`` rows is dropped from ``spec.expert_tensors``. Raises
    `EPLBError` when the model is already wrapped, when an adapter reports an inconsistent layer,
    when a layer reads per-expert data eplb cannot move, when the layers disagree on the number
    of experts, or when no MoE layer is found (the message lists the module types seen).
    """
    if not isinstance(model, nn.Module):
        raise EPLBError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    asked = registered_adapters()
    specs: list[MoELayerSpec] = []
    seen_types: dict[str, None] = {}
    verified: dict[tuple, tuple[str, ...]] = {}

    def visit(module: nn.Module, name: str, parent: nn.Module | None, attr: str) -> None:
        if isinstance(module, EPLBExperts):
            raise EPLBError(f"{name or 'the model'} is already wrapped by eplb (found an EPLBExperts layer)")
        seen_types.setdefault(type(module).__name__)
        for adapter in asked:
            spec = adapter.match(module, name=name, parent=parent, attr=attr)
            if spec is not None:
                spec.check()
                key = _layout_key(spec)
                if key not in verified:
                    where = f"adapter {spec.adapter.name!r} on {spec.name!r}"
                    verified[key] = verify_expert_tensors(
                        spec.experts, tuple(spec.expert_tensors), spec.num_experts, where=where
                    )
                spec.expert_tensors = verified[key]
                specs.append(spec)
                return
        for child_attr, child in module.named_children():
            visit(child, f"{name}.{child_attr}" if name else child_attr, module, child_attr)

    visit(model, "", None, "")
    if not specs:
        types = ", ".join(list(seen_types)[:20]) + (", ..." if len(seen_types) > 20 else "")
        raise EPLBError(
            f"no MoE layer found in {type(model).__name__} (module types seen: {types}); eplb finds experts "
            "modules called as experts(hidden_states, top_k_index, top_k_weights) with stacked [E, ...] "
            "parameters, and blocks with a router and an nn.ModuleList of experts. For another layout, "
            "write an adapter (subclass eplb.moe.MoEAdapter or ModuleListAdapter) and register it with "
            "eplb.register_adapter (see docs/guide/wrapping.md)"
        )
    counts = {spec.num_experts for spec in specs}
    if len(counts) > 1:
        detail = ", ".join(f"{s.name}: {s.num_experts}" for s in specs[:6])
        raise EPLBError(
            f"MoE layers have different numbers of experts ({detail}); eplb needs the same E in every "
            "wrapped layer (register an adapter that matches only the layers to balance)"
        )
    return specs


def _layout_key(spec: MoELayerSpec) -> tuple:
    """What decides a probe's outcome: the experts class, its candidate tensors, and the name,
    shape and dtype of every tensor it holds (registered anywhere below it, or plain attributes)."""
    experts = spec.experts
    registered = [*experts.named_parameters(), *experts.named_buffers()]
    tensors = [(n, tuple(t.shape), t.dtype) for n, t in registered]
    plain = [
        (n, tuple(v.shape), v.dtype) for n, v in sorted(vars(experts).items()) if isinstance(v, torch.Tensor)
    ]
    return (type(experts), tuple(spec.expert_tensors), spec.num_experts, tuple(tensors), tuple(plain))
