"""Prove, on a tiny probe, that an experts module computes each expert from the rows eplb moves.

Legend: E logical experts, X rows of a probe module, T probe tokens, D hidden size.

The EPLB expert layer runs a shallow copy of the experts module whose per-expert tensors hold
this rank's ``S`` slots instead of the ``E`` logical experts, and calls it with slot ids. That is
right only if the module reads everything that differs between experts from those tensors, row
``id``, and nothing else: not from a plain attribute, not from a child module, not from a count
it keeps elsewhere. Guessing from leading dimensions is not enough, so `verify_expert_tensors`
checks it: it builds the module with ``X`` random rows (``base``) and with those rows permuted
and one duplicated (``moved``, ``X + 1`` rows) and requires ``moved(x, j) == base(x, sel[j])``
for every token. A tensor that stays behind (a per-expert plain attribute, a per-expert scale in
a child module) breaks the equality; a shared tensor that merely has ``E`` rows breaks it when it
is moved, and is then left alone.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from eplb.errors import EPLBError
from eplb.moe.adapters import direct_tensors, materialized_copy, random_like, replace_expert_tensors

__all__ = ["verify_expert_tensors"]

_PROBE_ROWS = 3  # X: rows of the base probe (fewer when E is smaller)
_PROBE_REPEAT = 2  # tokens per probe row
_MAX_SUBSET_SEARCH = 6  # candidate tensors beyond which only the full set and leave-one-out are tried
_PROBE_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, AssertionError, KeyError)


def verify_expert_tensors(
    experts: nn.Module, candidates: tuple[str, ...], num_experts: int, *, where: str
) -> tuple[str, ...]:
    """The per-expert tensors of ``experts`` that eplb may move, proven on a probe.

    Args:
        experts: a module following the stacked-experts convention (its real tensors or tensors
            on the ``meta`` device; a meta module is probed on a materialised CPU copy with random
            values, never on the model's storage).
        candidates: names of its direct parameters/buffers with leading dimension ``E`` (the
            adapter's guess).
        num_experts: ``E``.
        where: the module's name and adapter, for messages.

    Returns:
        The largest subset of ``candidates`` (all of them when they all follow, which is the
        usual case) for which moving rows moves the computation; it holds at least one parameter.

    Raises:
        EPLBError: no subset follows; the message names the tensors that did not follow (plain
            tensor attributes and child-module tensors with ``E`` rows) and the fix.
    """
    params = {n for n, _ in experts.named_parameters(recurse=False)}
    reasons = []
    for subset in _subsets(candidates, params):
        reason = _probe(experts, subset, num_experts)
        if reason is None:
            return subset
        reasons.append((subset, reason))
    suspects = _unmovable_per_expert_tensors(experts, num_experts)
    cls = type(experts).__name__
    subset, reason = reasons[0]
    named = (
        "it reads per-expert tensors eplb cannot move: " + ", ".join(suspects)
        if suspects
        else "it reads something per expert that is not in these tensors (a count or table kept elsewhere?)"
    )
    raise EPLBError(
        f"{where}: eplb would move the per-expert tensors {list(subset)} of {cls}, but on a probe whose "
        f"rows are permuted and duplicated the output does not follow the rows ({reason}); {named}. "
        f"Make every per-expert tensor a direct parameter or buffer of {cls} with leading dimension "
        f"num_experts ({num_experts}) (register_buffer for scales that are not trained), or register "
        "an adapter (eplb.register_adapter) whose experts module does"
    )


def _subsets(candidates: tuple[str, ...], params: set[str]):
    """Candidate subsets, largest first, each holding at least one parameter."""
    sizes = range(len(candidates), 0, -1)
    if len(candidates) > _MAX_SUBSET_SEARCH:
        sizes = (len(candidates), len(candidates) - 1)
    for size in sizes:
        for subset in itertools.combinations(candidates, size):
            if params.intersection(subset):
                yield subset


def _probe(experts: nn.Module, names: tuple[str, ...], num_experts: int) -> str | None:
    """None when ``moved(x, j) == base(x, sel[j])`` for the probe of ``names``, else why not."""
    num_rows = min(num_experts, _PROBE_ROWS)
    sel = torch.tensor([*reversed(range(num_rows)), 0])  # a permutation plus one duplicate
    gen = torch.Generator().manual_seed(0)
    try:
        module, device = _probe_module(experts, names, gen)
        owned = direct_tensors(module)
        rows = {n: random_like(owned[n][:num_rows], gen) for n in names}
        base = replace_expert_tensors(module, rows)
        moved = replace_expert_tensors(module, {n: t.index_select(0, sel.to(t.device)) for n, t in rows.items()})
    except _PROBE_ERRORS as exc:
        return f"the probe could not be built: {_first_line(exc)}"
    j_T = torch.arange(_PROBE_REPEAT * sel.numel(), device=device) % sel.numel()
    e_T = sel.to(device)[j_T]
    tried = []
    for hidden in _hidden_sizes(experts, names):
        x_TD = torch.randn(j_T.numel(), hidden, generator=gen).to(device=device, dtype=_input_dtype(module))
        ones_T1 = x_TD.new_ones((x_TD.shape[0], 1))
        try:
            with torch.no_grad():
                ref_TD = base(x_TD, e_T.unsqueeze(1), ones_T1)
        except _PROBE_ERRORS as exc:
            tried.append(f"D={hidden}: {_first_line(exc)}")
            continue
        if not isinstance(ref_TD, torch.Tensor) or tuple(ref_TD.shape) != tuple(x_TD.shape):
            tried.append(f"D={hidden}: output is not [T, D]")
            continue
        try:
            with torch.no_grad():
                got_TD = moved(x_TD, j_T.unsqueeze(1), ones_T1)
        except _PROBE_ERRORS as exc:
            return _first_line(exc)
        # Summation order may differ (an expert's tokens split over two slots): compare relative to
        # the output's scale; a tensor that stays behind changes the output by its whole scale.
        diff = (got_TD.float() - ref_TD.float()).abs().max().item()
        scale = ref_TD.float().abs().max().item()
        rtol = 1e-3 if ref_TD.dtype.itemsize >= 4 else 3e-2
        if not diff <= rtol * scale + 1e-6:
            return f"max |difference| {diff:.3g} for outputs of size {scale:.3g}"
        return None
    return "no probe forward ran: " + "; ".join(tried[:3])


def _probe_module(experts: nn.Module, names: tuple[str, ...], gen: torch.Generator) -> tuple[nn.Module, torch.device]:
    """``experts`` itself when its tensors are real; for a meta module, a CPU copy holding random
    values (`eplb.moe.adapters.materialized_copy`) whose tensors ``names`` have only the probe's rows."""
    owned = direct_tensors(experts)
    device = owned[names[0]].device
    if device.type != "meta":
        return experts, device
    num_rows = min(owned[names[0]].shape[0], _PROBE_ROWS)
    shrunk = replace_expert_tensors(experts, {n: owned[n][:num_rows] for n in names})
    return materialized_copy(shrunk, gen), torch.device("cpu")


def _hidden_sizes(experts: nn.Module, names: tuple[str, ...]) -> list[int]:
    """Candidate ``D``: the module's ``hidden_size``/``hidden_dim`` if set, then every inner
    dimension of its per-expert tensors, last dimensions first."""
    out = [getattr(experts, a) for a in ("hidden_size", "hidden_dim") if isinstance(getattr(experts, a, None), int)]
    owned = direct_tensors(experts)
    for n in names:
        out += list(reversed(owned[n].shape[1:]))
    return list(dict.fromkeys(d for d in out if d > 0))


def _input_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating tensor that is at least 16 bits wide (float8
    weights are dequantised to the activations' dtype), else float32."""
    for t in direct_tensors(module).values():
        if t.dtype.is_floating_point and t.dtype.itemsize >= 2:
            return t.dtype
    return torch.float32


def _unmovable_per_expert_tensors(experts: nn.Module, num_experts: int) -> list[str]:
    """Descriptions of tensors with ``E`` rows that eplb cannot move: plain attributes and
    tensors of child modules."""
    registered = set(direct_tensors(experts))
    out = []
    for key, value in vars(experts).items():
        if key not in registered and _has_rows(value, num_experts):
            out.append(f"{key!r} (a plain tensor attribute, not a registered parameter or buffer)")
    for child_name, child in experts.named_modules():
        if not child_name:
            continue
        for name, t in direct_tensors(child).items():
            if _has_rows(t, num_experts):
                out.append(f"{child_name + '.' + name!r} (a tensor of the child module {type(child).__name__})")
    return out


def _has_rows(value, num_experts: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == num_experts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
