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
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
import torch

from eplb.errors import EPLBError
from eplb.placement import Placement, _check_sizes

__all__ = [
    "Policy", "register_policy", "get_policy", "available_policies", "check_policy_inputs",
    "policy_options", "check_policy_options", "resolve_policy_options", "set_options", "POLICY_OPTIONS",
    "check_migration_budget", "check_refine", "smallest_budget", "budget_slots",
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

    Raises `EPLBError` for: a load that is not 2-D, negative/NaN/inf loads, sizes that are not
    positive ints (bools and floats included), ``old`` that is not a `Placement`, ``num_physical < E``,
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
    for name, value in (("num_physical", num_physical), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_ranks", num_ranks)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            fix = (f"pass {name}={int(value)}" if isinstance(value, float) and value.is_integer()
                   else "pass a positive int")
            raise EPLBError(f"{name} ({value!r}) is a {type(value).__name__}, but it takes an int; {fix}")
        if value <= 0:
            raise EPLBError(f"{name} ({value}) must be > 0")
    if old is not None and not isinstance(old, Placement):
        raise EPLBError(
            f"old ({type(old).__name__}) must be the Placement in force or None; wrap a phy2log tensor with "
            "Placement.from_phy2log(phy2log, num_logical)"
        )
    _check_sizes(num_logical, num_physical, num_ranks)
    if num_logical % num_groups:
        raise EPLBError(
            f"num_logical ({num_logical}) must be a multiple of num_groups ({num_groups}); "
            f"set num_groups to a divisor of {num_logical}"
        )
    if num_ranks % num_nodes:
        raise EPLBError(
            f"num_ranks ({num_ranks}) must be a multiple of num_nodes ({num_nodes}); "
            f"every node holds the same number of ranks: set num_nodes to a divisor of {num_ranks} "
            f"({', '.join(str(d) for d in range(1, num_ranks + 1) if num_ranks % d == 0)})"
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


def _check_signature(name: str, fn, options: Iterable[str] = ()) -> None:
    """A policy must take the load positionally and every keyword of `Policy` (or ``**kwargs``),
    and every option it declares as a keyword: checked at registration, so a wrong signature fails
    there rather than at the first rebalance."""
    if not callable(fn):
        raise EPLBError(f"policy {name!r} must be a callable, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable whose signature Python cannot read: trust it
        return
    options = sorted(options)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        named = set(_POLICY_KEYWORDS) | set(options)
    else:
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    missing = [k for k in _POLICY_KEYWORDS if k not in named]
    signature = f"{getattr(fn, '__name__', 'policy')}{inspect.signature(fn)}"
    if missing or not positional:
        raise EPLBError(
            f"policy {name!r} has the signature {signature}; "
            f"a policy takes (load, *, num_physical, num_groups, num_nodes, num_ranks, old=None)"
            + (f" and lacks {', '.join(missing)}" if missing else " and lacks the load argument")
            + "; add them (old is the placement in force, None when there is none)"
        )
    lacking = [o for o in options if o not in named]
    if lacking:
        defaults = {"migration_budget": "migration_budget=None", "refine": "refine=False"}
        raise EPLBError(
            f"policy {name!r} declares the option(s) {', '.join(lacking)} but its signature {signature} "
            f"does not take them; add the keyword argument(s) {', '.join(defaults[o] for o in lacking)} "
            "(or **options), or leave them out of options="
        )


def _option_names(name: str, options: object) -> frozenset[str]:
    """``options`` of `register_policy` as a set of names; a bare string is refused (it would be
    read as its letters)."""
    if isinstance(options, (str, bytes)):
        raise EPLBError(
            f"policy {name!r}: options must be a tuple of option names, got the string {options!r}; "
            f"write options=({options!r},)"
        )
    try:
        names = frozenset(options)
    except TypeError:
        raise EPLBError(
            f"policy {name!r}: options must be a tuple of option names ({', '.join(POLICY_OPTIONS)}), "
            f"got {type(options).__name__}"
        ) from None
    unknown = sorted(map(repr, names - set(POLICY_OPTIONS)))
    if unknown:
        raise EPLBError(
            f"policy {name!r} declares unknown option(s) {', '.join(unknown)}; "
            f"options are {', '.join(POLICY_OPTIONS)}"
        )
    return names


def set_options(*, migration_budget: float | None = None, refine: bool = False) -> dict[str, object]:
    """The policy options that are set (not at their defaults), as keyword arguments of a policy call."""
    options: dict[str, object] = {}
    if migration_budget is not None:
        options["migration_budget"] = migration_budget
    if refine:
        options["refine"] = True
    return options


def smallest_budget(num_physical: int) -> float:
    """``1 / P``: the smallest ``migration_budget`` that lets one slot of a layer change."""
    return 1.0 / num_physical


def budget_slots(migration_budget: float, num_physical: int) -> int:
    """``floor(migration_budget * P)``: the slots per layer a budget lets receive a new expert
    (with a tolerance of 1e-9 slot, so ``k / P`` allows exactly ``k``)."""
    return math.floor(migration_budget * num_physical + 1e-9)


def check_migration_budget(value: object, num_physical: int | None = None) -> float | None:
    """Validate a ``migration_budget``: None, or a real number (not a bool) in ``(0, 1]`` that, when
    ``num_physical`` (``P``) is given, lets at least one slot of a layer change (``>= 1 / P``).

    Returns:
        The budget as a float (None stays None).

    Raises:
        EPLBError: naming the value, the rule and the fix.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EPLBError(
            f"migration_budget ({value!r}) is a {type(value).__name__}, but migration_budget takes a number in "
            "(0, 1]: the fraction of each layer's slots that may receive a new expert; pass e.g. "
            "migration_budget=0.25, or None for no limit"
        )
    budget = float(value)
    if not 0 < budget <= 1:  # NaN fails this too
        raise EPLBError(
            f"migration_budget ({value!r}) must be in (0, 1]: the fraction of each layer's slots that may "
            "receive a new expert; pass e.g. migration_budget=0.25, or None for no limit"
        )
    if num_physical is not None and budget_slots(budget, num_physical) < 1:
        raise EPLBError(
            f"migration_budget ({value!r}) lets floor({value!r} * {num_physical}) = 0 of the {num_physical} "
            f"slots of a layer change, so no rebalance could move anything; pass at least "
            f"1/{num_physical} = {smallest_budget(num_physical):.6g} (one slot per layer), or None for no limit"
        )
    return budget


def check_refine(value: object) -> bool:
    """Validate ``refine``: a bool (None reads as False). Raises `EPLBError` for anything else
    (a string such as ``"no"`` would otherwise be truth-tested and turn the search on)."""
    if value is None:
        return False
    if not isinstance(value, (bool, np.bool_)):
        raise EPLBError(
            f"refine ({value!r}, of type {type(value).__name__}) is not a bool; it takes True or False: pass "
            "refine=True for the swap search after packing, refine=False (the default) for the reference plan"
        )
    return bool(value)


_OPTION_CHECKS = {"migration_budget": check_migration_budget, "refine": lambda value, _: check_refine(value)}


def resolve_policy_options(name: str, options: dict, num_physical: int | None = None) -> dict[str, object]:
    """Validate the options of a call of policy ``name``; return those to pass (the set ones).

    Every option must be one of `POLICY_OPTIONS` with a valid value (`check_migration_budget`,
    `check_refine`). A value that asks for nothing (``migration_budget=None``, ``refine=False`` or
    None) is dropped, for every policy; one that asks for a feature the policy does not accept
    raises.

    Raises:
        EPLBError: an unknown option, a bad value, or an option policy ``name`` does not accept.
    """
    accepted = _OPTIONS.get(name, frozenset())
    out: dict[str, object] = {}
    for option, value in options.items():
        if option not in _OPTION_CHECKS:
            raise EPLBError(
                f"policy {name!r} got the unknown option {option}={value!r}; policy options are "
                f"{', '.join(POLICY_OPTIONS)}"
            )
        value = _OPTION_CHECKS[option](value, num_physical)
        if value is None or value is False:
            continue  # the option's default: asks for nothing, fine for any policy
        if option not in accepted:
            takes = f"accepts {', '.join(sorted(accepted))}" if accepted else "accepts no options"
            raise EPLBError(
                f"policy {name!r} does not accept the option {option}={value!r} (it {takes}); "
                f"unset {option} or choose a policy that accepts it (the default policy accepts "
                f"{', '.join(POLICY_OPTIONS)})"
            )
        out[option] = value
    return out


def check_policy_options(name: str, options: dict, num_physical: int | None = None) -> None:
    """Raise `EPLBError` unless policy ``name`` accepts every option in ``options`` that is set
    (see `resolve_policy_options`)."""
    resolve_policy_options(name, options, num_physical)


def _check_budget_kept(name: str, out: Placement, old: Placement, budget: float, num_ranks: int) -> None:
    """A plug-in that accepts ``migration_budget`` must keep it: at most ``floor(budget * P)``
    slots per layer receive an expert their rank did not hold in ``old``."""
    from eplb.policies.local_search import moved_slots

    limit = budget_slots(budget, out.num_physical)
    moved_L = moved_slots(out.phy2log.numpy(), old.phy2log.numpy(), out.num_logical, num_ranks).sum(1)
    over = np.nonzero(moved_L > limit)[0]
    if over.size:
        layer = int(over[0])
        raise EPLBError(
            f"policy {name!r} was given migration_budget={budget!r} (at most {limit} of {out.num_physical} "
            f"slots per layer may receive an expert their rank did not hold) but its placement moves "
            f"{int(moved_L[layer])} slots in layer {layer}; a policy that accepts migration_budget must keep it "
            "(see eplb.policies.local_search.moved_slots)"
        )


def _checked(name: str, fn: Callable[..., Placement], *, trusted: bool = False) -> Callable[..., Placement]:
    """``fn`` behind the input checks and, unless ``trusted`` (a built-in whose output is valid by
    construction and covered by the test suite), the output validation."""

    @functools.wraps(fn)
    def policy(load, *, num_physical, num_groups=1, num_nodes=1, num_ranks=1, old=None, **options):
        load = check_policy_inputs(
            load, num_physical=num_physical, num_groups=num_groups, num_nodes=num_nodes,
            num_ranks=num_ranks, old=old,
        )
        options = resolve_policy_options(name, options, num_physical)
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
        if old is not None and options.get("migration_budget") is not None:
            _check_budget_kept(name, out, old, options["migration_budget"], num_ranks)
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
    options = _option_names(name, options)

    def decorator(fn: Callable[..., Placement]) -> Callable[..., Placement]:
        if not trusted:
            _load_builtins()
        if name in _REGISTRY and not override:
            raise EPLBError(f"policy {name!r} is already registered; pass override=True to replace it")
        _check_signature(name, fn, options)
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
