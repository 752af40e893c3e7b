"""EPLBConfig: every knob of eplb, with defaults, constraints and the cross-field rules."""

from __future__ import annotations

import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

__all__ = ["EPLBConfig", "AsyncErrorMode", "DispatcherKind", "ReplicaChoice", "check_policy_option_field"]

MAX_REDUNDANT_EXPERTS = 1023
"""Upper bound of ``num_redundant_experts`` (vLLM's bound: at most 1024 replicas of an expert)."""
MIN_ASYNC_TIMEOUT_S = 0.1
# Python's thread waits refuse timeouts past threading.TIMEOUT_MAX (about 9.2e9 s): a larger
# async_timeout_s made the first wait on a worker raise OverflowError from inside a forward.
MAX_ASYNC_TIMEOUT_S = 1e9
"""Lower bound of ``async_timeout_s``, in seconds."""

AsyncErrorMode = Literal["log", "raise"]
"""What an error in the async worker does: ``"log"`` aborts that rebalance and logs the traceback;
``"raise"`` raises `EPLBError` (with the worker's traceback) on the main thread at the next step."""

DispatcherKind = Literal["auto", "all_to_all", "fixed_capacity"]
"""How tokens reach the ranks owning their slots: ``"fixed_capacity"`` — fixed-size buffers of
``max_tokens_per_rank`` rows per rank, no host sync (CUDA-graph capturable), also on one rank;
``"all_to_all"`` — variable-size all-to-all, one host sync per layer, no size limit; ``"auto"`` —
nothing on one rank, else ``fixed_capacity`` when ``max_tokens_per_rank`` is set, else ``all_to_all``."""

ReplicaChoice = Literal["hash", "round_robin"]
"""How a pair picks one of its expert's replicas: ``"hash"`` of the token index (equal shares on
average) or ``"round_robin"`` over the expert's pairs of the batch (equal shares in every batch)."""


def reject_bool_numbers(model: type[BaseModel], value, info: ValidationInfo):
    """A ``mode="before"`` field validator for every field of ``model``: a bool given to a number
    field (``int``/``float``, optionally ``| None``) raises, naming the field, the value and the fix.
    Pydantic's lax mode would read ``True`` as 1, so ``window_size=True`` would pass as a window of
    one step; numeric strings (``"1000"``) and integral floats for int fields still parse, as in JSON.
    """
    if isinstance(value, bool):
        annotation = model.model_fields[info.field_name].annotation
        kinds = set(typing.get_args(annotation)) or {annotation}
        if kinds & {int, float}:
            name = info.field_name
            kind = "a number" if float in kinds else "an int"
            default = model.model_fields[name].default
            example = f", e.g. {name}={default!r}" if type(default) in (int, float) else ""
            raise ValueError(f"{name} ({value!r}) is a bool, but {name} takes {kind}; pass {kind}{example}")
    return value


def check_policy_option_field(value, info: ValidationInfo):
    """A ``mode="before"`` field validator of the policy options ``migration_budget`` and ``refine``
    (`EPLBConfig`, `eplb.simulate.SimConfig`): the checks of the policies
    (`eplb.policies.check_migration_budget`, `eplb.policies.check_refine`), with their messages
    naming the field, the value, the rule and the fix. As for other number fields, a string holding
    a number (``"0.25"``, as in JSON) is read as that number."""
    from eplb.errors import EPLBError
    from eplb.policies import check_migration_budget, check_refine

    try:
        if info.field_name == "migration_budget":
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(
                        f"migration_budget ({value!r}) is not a number; pass a fraction in (0, 1], e.g. "
                        "migration_budget=0.25, or None for no limit"
                    ) from None
            return check_migration_budget(value)
        return check_refine(value)
    except EPLBError as exc:
        raise ValueError(str(exc)) from None


class CheckedFields(BaseModel):
    """Field checks shared by `EPLBConfig` and `eplb.simulate.SimConfig`: no bool where a number
    is expected, and clear messages for the policy options (``migration_budget``, ``refine``)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value, info: ValidationInfo):
        return reject_bool_numbers(cls, value, info)

    @field_validator("migration_budget", "refine", mode="before", check_fields=False)
    @classmethod
    def _policy_option(cls, value, info: ValidationInfo):
        return check_policy_option_field(value, info)


class EPLBConfig(CheckedFields):
    """Configuration of an `EPLBWrapper` (frozen; unknown fields are rejected).

    ``EPLBConfig.model_validate_json('{"use_async": false}')`` parses JSON.

    Number fields take numbers, never a bool (``window_size=True`` is refused rather than read as
    1). As in JSON parsing, an int field also takes a string or float holding a whole number
    (``"1000"``, ``1000.0``) and stores the int; ``1000.5`` is refused.

    Raises:
        pydantic.ValidationError: a field out of its range, an unknown field or name, or an
            incompatible pair of fields; the message names the field, the value and the fix.
            Like `EPLBError` it subclasses ``ValueError``, so ``except ValueError`` catches the
            errors of the config and of the library alike.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    window_size: int = Field(1000, gt=0)
    """Steps of load kept in the sliding window the policy sees. Longer windows react slower
    to drift but plan from less noisy loads. Memory: ``window_size * L * E`` counters."""

    step_interval: int | None = Field(3000, gt=0)
    """Steps between two rebalances. Each rebalance moves weights (bytes reported in
    ``stats()``); shorter intervals follow drift better at a higher transfer cost. ``None``
    never rebalances on its own (a static placement: see `EPLBConfig.static`); an explicit
    ``wrapper.rebalance()`` still does."""

    num_redundant_experts: int = Field(0, ge=0, le=MAX_REDUNDANT_EXPERTS)
    """Extra physical slots per MoE layer (global count over all ranks), so ``P = E + this``.
    ``P`` must be a multiple of the number of ranks. Each slot costs one expert's weights.
    At most 1023, the bound vLLM sets (an expert then has at most 1024 replicas)."""

    log_balancedness: bool = False
    """Log balancedness through ``logging.getLogger("eplb")`` on rank 0. Costs one all-reduce
    on each logging step."""

    log_balancedness_interval: int = Field(1, gt=0)
    """Steps between two balancedness log lines (only with ``log_balancedness``)."""

    use_async: bool = True
    """Rebalance without blocking the forward passes: plan on a background thread, move weights
    on a side stream, commit one layer at a time. Only the ``default`` policy runs async."""

    policy: str = "default"
    """Name of a registered policy (see ``eplb.available_policies()``). Plug-ins must be
    registered before the config is built."""

    migration_budget: float | None = None
    """Policy option: at most this fraction of each layer's slots may receive an expert their rank
    did not hold before a rebalance (the rest of the plan is the best found within that limit).
    Bounds the bytes moved per rebalance; ``None`` moves whatever the plan needs. A number in
    ``(0, 1]``, at least ``1 / P`` (checked when the wrapper knows ``P``: a smaller budget lets
    no slot move)."""

    refine: bool = False
    """Policy option: a swap search after packing that lowers the heaviest rank's load without
    changing replica counts. Never less balanced; costs up to tens of ms of planning. Off keeps
    the plan identical to DeepSeek's reference algorithm."""

    communicator: str = "auto"
    """How expert weights move between ranks: ``"auto"``, ``"torch_nccl"``, ``"torch_gloo"`` or
    ``"torch_p2p"`` (or a registered plug-in). ``"auto"`` picks ``local`` for one rank; for async
    on CUDA ``torch_p2p`` (receivers pull over the copy engines) when every EP rank is on one host
    with peer access, else ``torch_gloo``; for sync ``torch_nccl`` on CUDA with an NCCL group,
    ``torch_gloo`` otherwise. The choice and why are logged. Any name gives ``local`` on one rank."""

    min_improvement: float = Field(0.0, ge=0.0, lt=1.0)
    """Skip a rebalance whose predicted balancedness gain (new - old, on the window's load) is
    below this. 0 rebalances every time."""

    async_timeout_s: float = Field(300.0, ge=MIN_ASYNC_TIMEOUT_S, le=MAX_ASYNC_TIMEOUT_S, allow_inf_nan=False)
    """An async rebalance whose next layer is not ready on every rank within this many seconds
    is aborted on all ranks; committed layers keep the new placement, the others the old one.
    Finite, at least 0.1 s (shorter would abort rebalances over ordinary scheduling jitter) and at
    most 1e9 s (Python's thread waits take no longer timeout); with several ranks, allow a few
    seconds."""

    async_layers_per_step: int | None = Field(None, gt=0)
    """Most layers the async executor commits at one step boundary; None (the default) commits
    every layer that every rank has ready. A commit is device-to-device copies of one layer's
    changed slots and maps on the main stream (no host sync), and at most ``num_buffers`` (2)
    staged layers wait at once, so a step commits at most two layers anyway: the rebalance ends
    about when its transfers do. Set 1 to spread the copies over more steps (the gentlest
    per-step cost, at the price of a rebalance lasting at least as many steps as it has layers)."""

    async_on_error: AsyncErrorMode = "log"
    """An exception in the async worker, or in the policy in sync mode: ``"log"`` aborts the
    rebalance and logs it with its traceback (the model keeps serving with its placement and
    ``stats()`` reports the aborted rebalance); ``"raise"`` raises `EPLBError` carrying it on the
    main thread (async: at the next step; sync: from the step that triggered the rebalance)."""

    max_transfer_bytes: int = Field(256 * 2**20, gt=0)
    """Largest batch of weights ``torch_gloo`` exchanges in one call through its pinned host
    buffers; bigger exchanges are split, so a hot expert with many receivers cannot exhaust host
    memory. ``torch_nccl`` and ``torch_p2p`` buffer nothing per batch and move a layer at once."""

    dispatcher: DispatcherKind = "auto"
    """How tokens reach the ranks owning their slots (see `DispatcherKind`). ``"fixed_capacity"``
    with one rank runs the expert-parallel code path on one GPU (to capture or test it); it
    needs ``max_tokens_per_rank``."""

    max_tokens_per_rank: int | None = Field(None, gt=0)
    """The most tokens one rank passes to a MoE layer in one forward (batch x sequence), for the
    fixed-capacity dispatcher. A forward with more raises `EPLBError` (never drops tokens).
    Memory: ``3 * G * max_tokens_per_rank * D`` activations; compute: ``G *`` this many rows per
    layer, of which the padding rows cost no GEMM with transformers experts."""

    replica_choice: ReplicaChoice = "hash"
    """How a pair picks a replica (see `ReplicaChoice`). ``"round_robin"`` evens the hot experts'
    replicas in every batch at the cost of a sort per layer."""

    @classmethod
    def static(cls, **fields) -> EPLBConfig:
        """A config that never rebalances on its own (``step_interval=None``): the placement it
        starts with (``initial_placement``, e.g. one planned by ``eplb plan``) stays. The tracker
        still counts, so ``stats()`` and traces work; ``rebalance()`` still rebalances on request.
        ``fields`` are the other fields, as for ``EPLBConfig(...)``."""
        if fields.get("step_interval") is not None:
            from eplb.errors import EPLBError

            raise EPLBError(
                f"EPLBConfig.static() never rebalances; drop step_interval={fields['step_interval']!r} "
                "or use EPLBConfig(step_interval=...)"
            )
        return cls(**{**fields, "step_interval": None})

    @field_validator("policy")
    @classmethod
    def _policy_is_registered(cls, value: str) -> str:
        from eplb.policies import available_policies

        names = available_policies()
        if value not in names:
            raise ValueError(
                f"policy {value!r} is not registered (registered: {', '.join(names)}); "
                "register a plug-in with @eplb.register_policy(name) before building the config"
            )
        return value

    @field_validator("communicator")
    @classmethod
    def _communicator_is_known(cls, value: str) -> str:
        from eplb.comm import available_communicators

        names = ["auto", *[n for n in available_communicators() if n != "local"]]
        if value not in names and value not in available_communicators():
            raise ValueError(f"communicator {value!r} is unknown; use one of {', '.join(names)}")
        return value

    def policy_options(self) -> dict[str, object]:
        """The policy options that are set, as keyword arguments of the policy call."""
        from eplb.policies import set_options

        return set_options(migration_budget=self.migration_budget, refine=self.refine)

    @model_validator(mode="after")
    def _policy_accepts_options(self) -> EPLBConfig:
        from eplb.errors import EPLBError
        from eplb.policies import check_policy_options

        try:
            check_policy_options(self.policy, self.policy_options())
        except EPLBError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _async_rules(self) -> EPLBConfig:
        if self.dispatcher == "fixed_capacity" and self.max_tokens_per_rank is None:
            raise ValueError(
                "dispatcher='fixed_capacity' needs max_tokens_per_rank (the most tokens one rank passes to a "
                "MoE layer in one forward); set it, or use dispatcher='auto'"
            )
        if self.use_async and self.policy != "default":
            raise ValueError(
                f"Async EPLB is only supported with the default policy (got policy={self.policy!r}); "
                f"set use_async=False to use {self.policy!r}"
            )
        if self.use_async and self.communicator == "torch_nccl":
            raise ValueError(
                "use_async=True cannot use communicator='torch_nccl': NCCL point-to-point traffic from a "
                "background stream can deadlock against the forward pass's own NCCL collectives; "
                "set communicator to 'torch_p2p' (one host), 'torch_gloo' or 'auto' (or set use_async=False)"
            )
        return self
