"""eplb: expert-parallel load balancing for Mixture-of-Experts models, in pure PyTorch.

Public names are imported lazily so ``import eplb`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "EPLBError": "eplb.errors",
    "EPLBConfig": "eplb.config",
    "Placement": "eplb.placement",
    "register_policy": "eplb.policies",
    "get_policy": "eplb.policies",
    "available_policies": "eplb.policies",
    "LoadTracker": "eplb.tracker",
    "rank_loads": "eplb.metrics",
    "balancedness": "eplb.metrics",
    "predicted_gain": "eplb.metrics",
    "EPLBWrapper": "eplb.wrapper",
    "meta_parameters": "eplb.checkpoint",
    "LoadReport": "eplb.checkpoint",
    "register_adapter": "eplb.moe",
    "register_communicator": "eplb.comm",
    "available_communicators": "eplb.comm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eplb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
