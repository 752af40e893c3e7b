"""Policy registry: a policy turns a load ``[L, E]`` into a `Placement`.

A policy is a pure, deterministic callable::

    policy(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None, **options) -> Placement

with ``load: [L, E]`` non-negative float. ``options`` are the policy options set in `EPLBConfig`
(``migration_budget``, ``refine``; see `POLICY_OPTIONS`); a policy declares the ones it accepts
when it is registered and receives only those that are set. Register one with `register_policy`;
third-party packages can also register through the entry-point group ``eplb.policies`` (each entry
point names a policy callable, registered under the entry point's name, accepting no options
unless the callable has an ``eplb_options`` attribute listing them).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Protocol

import torch

from eplb.errors import EPLBError
from eplb.placement import Placement, _check_sizes

__all__ = [
    "Policy", "register_policy", "get_policy", "available_policies", "check_policy_inputs",
    "policy_options", "check_policy_options", "set_options", "POLICY_OPTIONS",
]

ENTRY_POINT_GROUP = "eplb.policies"

POLICY_OPTIONS = ("migration_budget", "refine")
"""Options a policy may accept (they are `EPLBConfig` fields of the same names). A config passes
an option to the policy only when it is set (``migration_budget`` not None, ``refine`` True)."""


class Policy(Protocol):
    """The signature of a policy (see the module docstring): ``load: [L, E]`` float64 -> `Placement`."""

    def __call__(
        self,
        load: torch.Tensor,
        *,
        num_physical: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old: Placement | None = None,
        **options: object,
    ) -> Placement: ...


_REGISTRY: dict[str, Callable[..., Placement]] = {}
_OPTIONS: dict[str, frozenset[str]] = {}
_entry_points_loaded = False
_builtins_loaded = False


def check_policy_inputs(
    load: torch.Tensor, *, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
    old: Placement | None = None,
) -> torch.Tensor:
    """Validate a policy call; return ``load`` as a contiguous float64 CPU tensor ``[L, E]``.

    Raises `EPLBError` for: a load that is not 2-D, negative/NaN/inf loads, ``num_physical < E``,
    ``num_physical % num_ranks != 0``, ``E % num_groups != 0``, ``num_ranks % num_nodes != 0``,
    or an ``old`` placement of another shape.
    """
    if not isinstance(load, torch.Tensor):
        try:
            load = torch.as_tensor(load)
        except Exception:
            raise EPLBError(f"load must be a [L, E] tensor, got {type(load).__name__}") from None
    if load.dim() != 2:
        raise EPLBError(f"load must be a [L, E] tensor (layers x logical experts), got shape {tuple(load.shape)}")
    load = load.detach().to("cpu", torch.float64).contiguous()
    if not torch.isfinite(load).all():
        raise EPLBError("load contains NaN or inf; loads must be finite token counts")
    if (load < 0).any():
        raise EPLBError(f"load contains a negative value ({load.min().item():g}); loads must be >= 0")
    num_logical = load.shape[1]
    if num_logical == 0:
        raise EPLBError("load has no experts (shape [L, 0]); pass one column per logical expert")
    for name, value in (("num_groups", num_groups), ("num_nodes", num_nodes), ("num_ranks", num_ranks)):
        if int(value) <= 0:
            raise EPLBError(f"{name} ({value}) must be > 0")
    _check_sizes(num_logical, num_physical, num_ranks)
    if num_logical % num_groups:
        raise EPLBError(
            f"num_logical ({num_logical}) must be a multiple of num_groups ({num_groups}); "
            f"set num_groups to a divisor of {num_logical}"
        )
    if num_ranks % num_nodes:
        raise EPLBError(
            f"num_ranks ({num_ranks}) must be a multiple of num_nodes ({num_nodes}); "
            "every node holds the same number of ranks"
        )
    if old is not None and (old.num_layers, old.num_logical, old.num_physical) != (
        load.shape[0], num_logical, num_physical
    ):
        raise EPLBError(
            f"old placement is {old!r} but the load is [{load.shape[0]}, {num_logical}] with "
            f"num_physical={num_physical}; pass the placement this load was measured under"
        )
    return load


_POLICY_KEYWORDS = ("num_physical", "num_groups", "num_nodes", "num_ranks", "old")


def _check_signature(name: str, fn) -> None:
    """A policy must take the load positionally and every keyword of `Policy` (or ``**kwargs``):
    checked at registration, so a wrong signature fails there rather than at the first rebalance."""
    if not callable(fn):
        raise EPLBError(f"policy {name!r} must be a callable, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable whose signature Python cannot read: trust it
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        named = set(_POLICY_KEYWORDS)
    else:
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    missing = [k for k in _POLICY_KEYWORDS if k not in named]
    if missing or not positional:
        raise EPLBError(
            f"policy {name!r} has the signature {getattr(fn, '__name__', 'policy')}{inspect.signature(fn)}; "
            f"a policy takes (load, *, num_physical, num_groups, num_nodes, num_ranks, old=None)"
            + (f" and lacks {', '.join(missing)}" if missing else " and lacks the load argument")
            + "; add them (old is the placement in force, None when there is none)"
        )



def set_options(*, migration_budget: float | None = None, refine: bool = False) -> dict[str, object]:
    """The policy options that are set (not at their defaults), as keyword arguments of a policy call."""
    options: dict[str, object] = {}
    if migration_budget is not None:
        options["migration_budget"] = migration_budget
    if refine:
        options["refine"] = True
    return options


def check_policy_options(name: str, options: dict) -> None:
    """Raise `EPLBError` unless policy ``name`` accepts every option in ``options``."""
    accepted = _OPTIONS.get(name, frozenset())
    for option in options:
        if option not in accepted:
            takes = f"accepts {', '.join(sorted(accepted))}" if accepted else "accepts no options"
            raise EPLBError(
                f"policy {name!r} does not accept the option {option}={options[option]!r} (it {takes}); "
                f"unset {option} or choose a policy that accepts it (the default policy accepts "
                f"{', '.join(POLICY_OPTIONS)})"
            )


def _checked(name: str, fn: Callable[..., Placement], *, trusted: bool = False) -> Callable[..., Placement]:
    """``fn`` behind the input checks and, unless ``trusted`` (a built-in whose output is valid by
    construction and covered by the test suite), the output validation."""

    @functools.wraps(fn)
    def policy(load, *, num_physical, num_groups=1, num_nodes=1, num_ranks=1, old=None, **options):
        check_policy_options(name, options)
        load = check_policy_inputs(
            load, num_physical=num_physical, num_groups=num_groups, num_nodes=num_nodes,
            num_ranks=num_ranks, old=old,
        )
        out = fn(load, num_physical=num_physical, num_groups=num_groups, num_nodes=num_nodes,
                 num_ranks=num_ranks, old=old, **options)
        if trusted:
            return out
        if not isinstance(out, Placement):
            raise EPLBError(f"policy {name!r} returned {type(out).__name__}, expected a Placement")
        if (out.num_layers, out.num_logical, out.num_physical) != (load.shape[0], load.shape[1], num_physical):
            raise EPLBError(
                f"policy {name!r} returned {out!r} for a load of shape {tuple(load.shape)} and "
                f"num_physical={num_physical}"
            )
        try:
            out.validate(num_ranks)
        except EPLBError as exc:
            raise EPLBError(f"policy {name!r} returned an invalid placement: {exc}") from None
        return out

    return policy


def register_policy(
    name: str, *, options: Iterable[str] = (), override: bool = False
) -> Callable[[Callable[..., Placement]], Callable[..., Placement]]:
    """Decorator registering a policy under ``name``.

    Args:
        name: the name `EPLBConfig.policy` refers to.
        options: the policy options (names from `POLICY_OPTIONS`) the policy accepts as keyword
            arguments; a config setting any other option for this policy is rejected.
        override: replace a policy registered under ``name`` (raises `EPLBError` otherwise).

    The registered callable validates its inputs (`check_policy_inputs`, the options) and its
    output (`Placement.validate`), so plug-ins get the same error messages as built-ins.
    Registering a taken name raises `EPLBError` unless ``override=True``; so does a function
    whose signature lacks the load or one of the keywords of `Policy` (``old`` included).
    """
    return _register(name, options, override=override, trusted=False)


def _register(
    name: str, options: Iterable[str], *, override: bool, trusted: bool
) -> Callable[[Callable[..., Placement]], Callable[..., Placement]]:
    if not isinstance(name, str) or not name:
        raise EPLBError(f"policy name must be a non-empty string, got {name!r}")
    options = frozenset(options)
    unknown = sorted(options - set(POLICY_OPTIONS))
    if unknown:
        raise EPLBError(
            f"policy {name!r} declares unknown option(s) {', '.join(unknown)}; "
            f"options are {', '.join(POLICY_OPTIONS)}"
        )

    def decorator(fn: Callable[..., Placement]) -> Callable[..., Placement]:
        if not trusted:
            _load_builtins()
        if name in _REGISTRY and not override:
            raise EPLBError(f"policy {name!r} is already registered; pass override=True to replace it")
        _check_signature(name, fn)
        _REGISTRY[name] = _checked(name, fn, trusted=trusted)
        _OPTIONS[name] = options
        return fn

    return decorator


def policy_options(name: str) -> frozenset[str]:
    """The options policy ``name`` accepts (`EPLBError` for an unknown name)."""
    get_policy(name)
    return _OPTIONS.get(name, frozenset())


def unregister_policy(name: str) -> None:
    """Remove a registered policy (tests and notebooks); built-ins can be removed too."""
    _REGISTRY.pop(name, None)
    _OPTIONS.pop(name, None)


def available_policies() -> list[str]:
    """Names of every registered policy, built-ins and entry points included, sorted."""
    _load_builtins()
    _load_entry_points()
    return sorted(_REGISTRY)


def get_policy(name: str) -> Callable[..., Placement]:
    """The checked policy registered as ``name``; `EPLBError` lists the known names otherwise.

    The function as registered, without the checks, is its ``__wrapped__`` attribute
    (`functools.wraps`), e.g. to time the bare algorithm.
    """
    names = available_policies()
    if name not in _REGISTRY:
        raise EPLBError(
            f"unknown policy {name!r}; registered policies: {', '.join(names)}. "
            "Register yours with @eplb.register_policy(name) before building the config"
        )
    return _REGISTRY[name]


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from eplb.policies import default, topk  # noqa: F401  (registers on import)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            fn = ep.load()
            _check_signature(ep.name, fn)
        except Exception as exc:  # a broken plug-in must not break eplb itself
            import logging

            logging.getLogger("eplb").warning("could not load policy entry point %r: %s", ep.name, exc)
            continue
        try:
            _register(ep.name, getattr(fn, "eplb_options", ()), override=False, trusted=False)(fn)
        except EPLBError as exc:
            import logging

            logging.getLogger("eplb").warning("could not register policy entry point %r: %s", ep.name, exc)
