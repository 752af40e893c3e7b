"""Communicators: move sets of tensors between ranks.

Registry of communicator classes; built-ins are ``torch_nccl``, ``torch_gloo``, ``torch_p2p`` and ``local``.
"""

from __future__ import annotations

from collections.abc import Callable

from eplb.errors import EPLBError

__all__ = ["register_communicator", "get_communicator", "available_communicators"]

_REGISTRY: dict[str, Callable] = {}
_builtins_loaded = False


def register_communicator(name: str, *, override: bool = False) -> Callable[[type], type]:
    """Class decorator registering a communicator under ``name``.

    The class subclasses `eplb.comm.base.Communicator` and is built as
    ``cls(group=..., device=..., timeout_s=...)`` (``"auto"`` also passes ``gloo_group=`` to a
    class registered over ``torch_gloo`` or ``torch_p2p``); register it before building an `EPLBConfig`
    that names it. A taken name raises `EPLBError` unless ``override=True``.
    """

    def decorator(cls: type) -> type:
        _load_builtins()
        if name in _REGISTRY and not override:
            raise EPLBError(f"communicator {name!r} is already registered; pass override=True to replace it")
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_communicators() -> list[str]:
    """Registered communicator names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_communicator(name: str) -> Callable:
    """The communicator class registered as ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise EPLBError(f"unknown communicator {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from eplb.comm import base, gloo, nccl, p2p  # noqa: F401  (register on import)
