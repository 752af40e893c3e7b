"""MoE adapters: find the MoE layers of a model by their structure, and describe how to wrap them.

Legend: E logical experts, T tokens, K top-k, D hidden size.

Every layer eplb wraps is reduced to one shape, the **stacked-experts convention** of
transformers (>= 5)::

    experts(hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D]

with every per-expert tensor stored stacked, ``[E, ...]``, as a direct parameter (or buffer) of
the experts module. The EPLB expert layer (`eplb.moe.layer.EPLBExperts`) replaces such a module
and runs a copy of it whose stacked tensors hold the physical slots instead of the logical
experts (``[S, ...]``). An adapter's job is to find those modules and say where they live:

* `StackedExpertsAdapter` finds modules that already follow the convention (transformers
  Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, GPT-OSS, MiniMax, ... and `eplb.moe.MoE`): the
  call signature names ``(top_k_index, top_k_weights)`` or GPT-OSS's
  ``(router_indices, routing_weights)``, and the module has stacked parameters.
* `ModuleListAdapter` finds blocks with a router and ``self.experts = nn.ModuleList([...])``;
  it stacks the list into a `StackedExpertList` (which follows the convention) and replaces the
  block's forward by ``route`` + experts, since such blocks loop over their experts themselves.

A custom adapter subclasses `MoEAdapter` (or one of the two) and is registered with
`eplb.register_adapter`, which puts it ahead of the built-ins.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eplb.errors import EPLBError

__all__ = [
    "MoEAdapter",
    "MoELayerSpec",
    "StackedExpertsAdapter",
    "ModuleListAdapter",
    "StackedExpertList",
    "follows_experts_convention",
    "replace_expert_tensors",
    "direct_tensors",
]

_ROUTING_ARG_NAMES = (("top_k_index", "top_k_weights"), ("router_indices", "routing_weights"))


@dataclass(eq=False, kw_only=True)
class MoELayerSpec:
    """One MoE layer found by an adapter: what to replace and how to compute with it.

    Attributes:
        name: qualified name of the module the adapter matched (for messages).
        adapter: the adapter that found it.
        parent, attr: ``parent.<attr>`` is the module the EPLB layer replaces.
        original: the module at ``parent.<attr>`` now (unwrap puts back a copy of it holding the
            primary copy of every expert).
        experts: a module following the stacked-experts convention that computes exactly what
            ``original`` does: ``original`` itself, or a stacked copy of a ``ModuleList``.
        expert_tensors: names of the per-expert parameters/buffers of ``experts``, each ``[E, ...]``.
        num_experts: ``E``.
        block_forward: for blocks whose forward does not call ``experts(x, ids, weights)`` itself
            (``ModuleList`` blocks): a function ``(block, experts, *args, **kwargs) -> output``
            that replaces ``parent.forward`` while the model is wrapped. None otherwise.
    """

    name: str
    adapter: MoEAdapter
    parent: nn.Module
    attr: str
    original: nn.Module
    experts: nn.Module
    expert_tensors: tuple[str, ...]
    num_experts: int
    block_forward: Callable | None = None

    def check(self) -> None:
        """Raise `EPLBError` if the spec is inconsistent (checked before the model is touched)."""
        who = f"adapter {self.adapter.name!r} on {self.name!r}"
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise EPLBError(f"{who} reported num_experts={self.num_experts!r}; it must be an int >= 1")
        if getattr(self.parent, self.attr, None) is not self.original:
            raise EPLBError(f"{who}: parent.{self.attr} is not the module the adapter reported as original")
        if not self.expert_tensors:
            raise EPLBError(f"{who} reported no per-expert tensors; list the stacked [E, ...] parameters")
        owned = direct_tensors(self.experts)
        for name in self.expert_tensors:
            t = owned.get(name)
            if t is None:
                raise EPLBError(
                    f"{who}: per-expert tensor {name!r} is not a direct parameter or buffer of "
                    f"{type(self.experts).__name__} (it has {sorted(owned)})"
                )
            if t.dim() == 0 or t.shape[0] != self.num_experts:
                raise EPLBError(
                    f"{who}: per-expert tensor {name!r} has shape {tuple(t.shape)}; its leading "
                    f"dimension must be num_experts ({self.num_experts})"
                )
        if not follows_experts_convention(self.experts):
            raise EPLBError(
                f"{who}: {type(self.experts).__name__}.forward must take (hidden_states, top_k_index, "
                "top_k_weights) (or GPT-OSS's router_indices, routing_weights)"
            )


class MoEAdapter:
    """Finds MoE layers of one kind. Subclass and implement `match`; register with
    `eplb.register_adapter`.

    The finder walks the model's modules in order (parents before children) and asks each
    adapter, user adapters first; the first spec returned wins and the matched module's
    subtree is not searched further.
    """

    name: str = "adapter"

    def match(
        self, module: nn.Module, *, name: str, parent: nn.Module | None, attr: str
    ) -> MoELayerSpec | None:
        """Return a `MoELayerSpec` if ``module`` (found at ``parent.<attr>``, qualified ``name``)
        is a MoE layer of this adapter's kind, else None. Must not modify the model."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ------------------------------------------------------------------------------------- stacked
def follows_experts_convention(module: nn.Module) -> bool:
    """True if ``module.forward``'s first three parameters are ``(hidden_states, top_k_index,
    top_k_weights)`` or ``(hidden_states, router_indices, routing_weights)`` (names after the first)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 and tuple(positional[1:3]) in _ROUTING_ARG_NAMES


def _stacked_tensors(module: nn.Module) -> tuple[int, tuple[str, ...]] | None:
    """``(E, names)`` of the per-expert tensors of a stacked-experts module, or None.

    ``E`` is ``module.num_experts`` when that is an int, else the leading dimension shared by
    all direct parameters. Per-expert tensors are the direct parameters and buffers with leading
    dimension ``E``; at least one parameter must be among them.
    """
    params = dict(module.named_parameters(recurse=False))
    buffers = dict(module.named_buffers(recurse=False))
    num = getattr(module, "num_experts", None)
    if isinstance(num, bool) or not isinstance(num, int):
        leading = {p.shape[0] for p in params.values() if p.dim() > 0}
        if len(leading) != 1:
            return None
        num = leading.pop()
    names = tuple(n for n, t in (params | buffers).items() if t.dim() > 0 and t.shape[0] == num)
    if num < 1 or not any(n in params for n in names):
        return None
    return num, names


class StackedExpertsAdapter(MoEAdapter):
    """Built-in adapter for experts modules that follow the stacked-experts convention.

    Matches a module whose ``forward`` takes ``(hidden_states, top_k_index, top_k_weights)``
    (or ``router_indices, routing_weights``) and that owns stacked parameters whose leading
    dimension is ``E`` (``module.num_experts`` when set). No class names are involved, so any
    transformers model whose experts follow this convention is covered; shared experts, which
    are ordinary MLPs, are not matched and stay untouched.
    """

    name = "stacked_experts"

    def match(self, module, *, name, parent, attr):
        if parent is None or isinstance(module, nn.ModuleList) or not follows_experts_convention(module):
            return None
        found = _stacked_tensors(module)
        if found is None:
            return None
        num_experts, names = found
        return MoELayerSpec(
            name=name,
            adapter=self,
            parent=parent,
            attr=attr,
            original=module,
            experts=module,
            expert_tensors=names,
            num_experts=num_experts,
        )


# ------------------------------------------------------------------------------- module list
class StackedExpertList(nn.Module):
    """A stacked copy of an ``nn.ModuleList`` of identical experts (each ``forward(x) -> y``),
    following the stacked-experts convention.

    Every parameter and buffer of the experts is stacked into ``[E, ...]`` (named with ``.``
    replaced by ``__``); each expert runs functionally (``torch.func.functional_call``) on a
    weightless (meta) template of expert 0. ``forward`` visits the experts in increasing id and
    ``index_add_``s each weighted output, as the classic ModuleList MoE blocks do.
    """

    eplb_combine_order = "expert"
    eplb_skips_out_of_range_ids = True  # forward visits ids [0, E) only

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        first = experts[0]
        keys = [n for n, _ in first.named_parameters()] + [n for n, _ in first.named_buffers()]
        param_keys = {n for n, _ in first.named_parameters()}
        for i, expert in enumerate(experts):
            other = dict(expert.named_parameters()) | dict(expert.named_buffers())
            if sorted(other) != sorted(keys) or type(expert) is not type(first):
                raise EPLBError(
                    f"experts[{i}] ({type(expert).__name__}) differs in structure from experts[0] "
                    f"({type(first).__name__}); a ModuleList of experts must hold identical modules"
                )
        self.num_experts = len(experts)
        self._keys = {k.replace(".", "__"): k for k in keys}  # stacked name -> name inside an expert
        for stacked_name, key in self._keys.items():
            tensors = [(dict(e.named_parameters()) | dict(e.named_buffers()))[key] for e in experts]
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) != 1:
                raise EPLBError(
                    f"expert tensor {key!r} has different shapes across experts: {sorted(shapes)}"
                )
            stacked = torch.stack([t.detach() for t in tensors])
            if key in param_keys:
                self.register_parameter(
                    stacked_name, nn.Parameter(stacked, requires_grad=tensors[0].requires_grad)
                )
            else:
                self.register_buffer(stacked_name, stacked)
        # Not a registered child: its (meta) tensors are never used, the stacked ones are.
        self.__dict__["template"] = copy.deepcopy(first).to("meta")

    def expert_state(
        self, index: int, tensors: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Name (inside one expert) -> tensor of expert ``index`` (from ``tensors`` or self)."""
        source = tensors if tensors is not None else direct_tensors(self)
        return {key: source[stacked][index] for stacked, key in self._keys.items()}

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out_TD = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token_idx, k_pos = torch.where(top_k_index == expert)
            if token_idx.numel() == 0:
                continue
            y = torch.func.functional_call(
                self.template, self.expert_state(expert), (hidden_states[token_idx],)
            )
            out_TD.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out_TD.dtype))
        return out_TD

    def to_module_list(self) -> nn.ModuleList:
        """The experts as an ``nn.ModuleList`` again (fresh modules holding copies of the rows)."""
        owned = direct_tensors(self)
        experts = []
        for index in range(self.num_experts):
            expert = copy.deepcopy(self.template)
            for stacked_name, key in self._keys.items():
                source = owned[stacked_name]
                owner_name, _, leaf = key.rpartition(".")
                owner = expert.get_submodule(owner_name) if owner_name else expert
                value = source[index].detach().clone()
                if isinstance(source, nn.Parameter):
                    owner._parameters[leaf] = nn.Parameter(value, requires_grad=source.requires_grad)
                else:
                    owner._buffers[leaf] = value
            experts.append(expert)
        return nn.ModuleList(experts)


def _default_route(block: nn.Module, router: nn.Module, top_k: int, x_TD: torch.Tensor):
    probs_TE = torch.softmax(router(x_TD), dim=-1, dtype=torch.float)
    weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if getattr(block, "norm_topk_prob", True):
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return ids_TK, weights_TK.to(x_TD.dtype)


class ModuleListAdapter(MoEAdapter):
    """Adapter for blocks with a router and ``self.experts = nn.ModuleList([...])``.

    Such a block loops over its experts itself, so while it is wrapped its ``forward`` is
    replaced by `block_forward`: flatten the tokens, `route` them, call the (EPLB) experts,
    restore the shape. At match time the adapter checks on a small random input that this
    replacement reproduces the block's own output, and raises `EPLBError` if not, so a block
    whose router differs is never wrapped silently wrong.

    Built-in rule (`matches`): ``block.experts`` is a ``ModuleList`` of >= 2 identical modules;
    ``block.gate`` or ``block.router`` is an ``nn.Linear(D, E)``; ``block.top_k`` (or
    ``num_experts_per_tok``) is an int; the block has no other child with parameters (so no
    shared expert would be dropped). Default `route`: softmax in float32, top-k, renormalised
    unless ``block.norm_topk_prob`` is False, weights cast to the input dtype.

    For another block, subclass and override `matches`, `route` and, if the block does more than
    route + experts (shared experts, auxiliary outputs), `block_forward`.
    """

    name = "module_list"
    experts_attr = "experts"
    router_attrs = ("gate", "router")

    # ---------------------------------------------------------------- hooks to override
    def matches(self, block: nn.Module) -> bool:
        """Whether ``block`` is a MoE block this adapter handles (structure only)."""
        experts = getattr(block, self.experts_attr, None)
        if not isinstance(experts, nn.ModuleList) or len(experts) < 2:
            return False
        router = self.router(block)
        if (
            not isinstance(router, nn.Linear)
            or router.out_features != len(experts)
            or self._top_k(block) is None
        ):
            return False
        allowed = {self.experts_attr, *self.router_attrs}
        return all(
            child_name in allowed or next(child.parameters(), None) is None
            for child_name, child in block.named_children()
        )

    def router(self, block: nn.Module) -> nn.Module | None:
        """The block's router module (first of `router_attrs` that exists)."""
        for name in self.router_attrs:
            module = getattr(block, name, None)
            if isinstance(module, nn.Module):
                return module
        return None

    def route(self, block: nn.Module, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_TD [T, D]`` -> (``topk_ids_TK`` int, ``topk_weights_TK``) as the block's router decides."""
        return _default_route(block, self.router(block), self._top_k(block), x_TD)

    def block_forward(
        self, block: nn.Module, experts: nn.Module, hidden_states: torch.Tensor, *args, **kwargs
    ):
        """The block's forward while wrapped: route, run ``experts(x, ids, weights)``, reshape."""
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        ids_TK, weights_TK = self.route(block, x_TD)
        return experts(x_TD, ids_TK, weights_TK).reshape(hidden_states.shape)

    def probe_input(self, block: nn.Module) -> torch.Tensor:
        """A small input for the match-time check: ``[2, 3, D]`` with the router's D, dtype, device."""
        weight = self.router(block).weight
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, weight.shape[1], generator=gen)
        return x.to(device=weight.device, dtype=weight.dtype)

    # ---------------------------------------------------------------- matching
    def match(self, module, *, name, parent, attr):
        if not self.matches(module):
            return None
        original = getattr(module, self.experts_attr)
        stacked = StackedExpertList(original)
        forward = functools.partial(_BlockForward(self), module)
        self._check_reproduces(module, stacked, name)
        return MoELayerSpec(
            name=name,
            adapter=self,
            parent=module,
            attr=self.experts_attr,
            original=original,
            experts=stacked,
            expert_tensors=tuple(stacked._keys),
            num_experts=stacked.num_experts,
            block_forward=forward,
        )

    def _top_k(self, block: nn.Module) -> int | None:
        for attr in ("top_k", "num_experts_per_tok"):
            value = getattr(block, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def _check_reproduces(self, block: nn.Module, stacked: nn.Module, name: str) -> None:
        if any(t.device.type == "meta" for t in block.parameters()):
            # A meta block has no values to compare: check a CPU copy holding random ones.
            block = materialized_copy(block, torch.Generator().manual_seed(0))
            stacked = StackedExpertList(getattr(block, self.experts_attr))
        modes = {m: m.training for m in block.modules()}
        try:
            block.eval()
            with torch.no_grad():
                x = self.probe_input(block)
                expected = block.forward(x.clone())
                got = self.block_forward(block, stacked, x.clone())
            torch.testing.assert_close(got, expected)
        except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EPLBError(
                f"adapter {self.name!r} matched {name!r} ({type(block).__name__}) but its route + experts do "
                f"not reproduce the block's own output ({first}); subclass eplb.moe.ModuleListAdapter, "
                "override route() (and block_forward() if the block does more than route + experts) "
                "and register it with eplb.register_adapter"
            ) from None
        finally:
            for m, training in modes.items():
                m.training = training


class _BlockForward:
    """``forward`` of a wrapped ModuleList block: calls the adapter with the block's current
    ``experts`` (the EPLB layer once installed). A class, not a closure, so models stay
    deep-copyable and picklable."""

    def __init__(self, adapter: ModuleListAdapter):
        self.adapter = adapter

    def __call__(self, block: nn.Module, *args, **kwargs):
        return self.adapter.block_forward(block, getattr(block, self.adapter.experts_attr), *args, **kwargs)


# ------------------------------------------------------------------------------------ helpers
def materialized_copy(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """A CPU deep copy of ``module`` whose tensors on the meta device (parameters, buffers and
    plain tensor attributes, of every submodule) hold random values drawn from ``gen``; for checks
    that must run a module built on the meta device."""
    out = copy.deepcopy(module)
    with torch.no_grad():
        for sub in out.modules():
            for table in (sub._parameters, sub._buffers):
                for key, t in table.items():
                    if t is not None and t.device.type == "meta":
                        value = random_like(torch.empty_like(t, device="cpu"), gen)
                        table[key] = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(
                            t, nn.Parameter
                        ) else value
            for key, value in list(vars(sub).items()):
                if isinstance(value, torch.Tensor) and value.device.type == "meta":
                    sub.__dict__[key] = random_like(torch.empty_like(value, device="cpu"), gen)
    return out


def random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``t``'s shape, dtype and device with random values: normal with std
    ``1/sqrt(last dim)`` (0.5 for vectors) for floating dtypes (float8 included), small
    non-negative integers otherwise."""
    if t.dtype.is_floating_point:
        std = t.shape[-1] ** -0.5 if t.dim() >= 2 and t.shape[-1] > 0 else 0.5
        values = torch.randn(t.shape, generator=gen) * std
    elif t.dtype == torch.bool:
        values = torch.randint(0, 2, t.shape, generator=gen)
    else:
        values = torch.randint(0, 8, t.shape, generator=gen)
    return values.to(dtype=t.dtype, device=t.device)


def direct_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of the parameters and buffers owned by ``module`` itself (not its children)."""
    return dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))


def replace_expert_tensors(experts: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of a stacked-experts module whose per-expert tensors are ``tensors``.

    Args:
        experts: a module following the stacked-experts convention.
        tensors: name -> ``[X, ...]`` new per-expert tensors (parameters stay parameters, with
            the ``requires_grad`` of the tensor they replace).

    Returns:
        The copy; its ``num_experts`` (if it has one) is set to ``X``. ``experts`` itself, its
        other tensors and its submodules are shared, not copied. Used to build the slot module
        (``X = S``) and, on unwrap, the logical module again (``X = E``).
    """
    out = copy.copy(experts)
    # copy.copy shares the registration dicts (parameters, buffers, hooks); give the copy its own.
    for key, value in list(vars(out).items()):
        if isinstance(value, (dict, set)):
            out.__dict__[key] = copy.copy(value)
    counts = set()
    for name, value in tensors.items():
        counts.add(value.shape[0])
        if name in out._parameters:
            old = out._parameters[name]
            out._parameters[name] = nn.Parameter(value, requires_grad=old is not None and old.requires_grad)
        elif name in out._buffers:
            out._buffers[name] = value
        else:
            raise EPLBError(f"{type(experts).__name__} has no parameter or buffer {name!r}")
    if len(counts) != 1:
        raise EPLBError(f"per-expert tensors have different leading dimensions {sorted(counts)}")
    if isinstance(getattr(out, "num_experts", None), int):
        out.num_experts = counts.pop()
    return out
