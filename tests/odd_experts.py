"""Experts modules whose per-expert data is laid out in ways eplb must prove, not guess: a
per-expert weight kept as a plain attribute, a per-expert scale in a child module, a shared tensor
that merely has ``E`` rows, and float8 weights with per-expert scales. Random weights, no downloads.

Legend: T tokens, D hidden size, I intermediate size, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moe_models import HIDDEN, NUM_EXPERTS, TOP_K, ResidualStack, _skew_gates
from torch import nn

INNER = 16


class _LoopExperts(nn.Module):
    """``forward(hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D]``:
    visits the experts hit in increasing id; ``expert(e, x_ND)`` computes one expert."""

    eplb_combine_order = "expert"

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out_TD = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            token, k_pos = torch.where(top_k_index == e)
            y = self.expert(e, hidden_states[token])
            out_TD.index_add_(0, token, (y * top_k_weights[token, k_pos, None]).to(out_TD.dtype))
        return out_TD

    def _swiglu(self, x, gate_up_ID2, down_DI):
        gate, up = F.linear(x, gate_up_ID2).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down_DI)


class PlainAttributeExperts(_LoopExperts):
    """``down`` is a per-expert tensor kept as a plain attribute (not a parameter or buffer)."""

    def __init__(self, E=NUM_EXPERTS):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * INNER, HIDDEN) * 0.2)
        self.down = torch.randn(E, HIDDEN, INNER) * 0.2

    def expert(self, e, x):
        return self._swiglu(x, self.gate_up_proj[e], self.down[e])


class _Scales(nn.Module):
    def __init__(self, E):
        super().__init__()
        self.down_scale = nn.Parameter(torch.rand(E) + 0.5)


class ChildScaleExperts(_LoopExperts):
    """The per-expert output scale lives in a child module (``scales.down_scale``)."""

    def __init__(self, E=NUM_EXPERTS):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * INNER, HIDDEN) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(E, HIDDEN, INNER) * 0.2)
        self.scales = _Scales(E)

    def expert(self, e, x):
        return self._swiglu(x, self.gate_up_proj[e], self.down_proj[e]) * self.scales.down_scale[e]


class SharedRowsExperts(_LoopExperts):
    """``act_scale [I]`` is shared by every expert; ``I == E``, so its leading dimension equals E."""

    def __init__(self, E=NUM_EXPERTS):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * E, HIDDEN) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(E, HIDDEN, E) * 0.2)
        self.act_scale = nn.Parameter(torch.rand(E) + 0.5)

    def expert(self, e, x):
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up * self.act_scale, self.down_proj[e])


class Float8Experts(_LoopExperts):
    """float8 (e4m3) weights with one float32 scale per expert and matrix, all parameters
    (frozen, as in inference checkpoints); dequantised per expert in the forward."""

    def __init__(self, E=NUM_EXPERTS):
        super().__init__()
        self.num_experts = E
        gate_up = torch.randn(E, 2 * INNER, HIDDEN) * 0.2
        down = torch.randn(E, HIDDEN, INNER) * 0.2
        gate_up_scale = gate_up.abs().amax(dim=(1, 2)) / 448
        down_scale = down.abs().amax(dim=(1, 2)) / 448
        fp8 = torch.float8_e4m3fn
        self.gate_up_scale = nn.Parameter(gate_up_scale, requires_grad=False)
        self.down_scale = nn.Parameter(down_scale, requires_grad=False)
        self.gate_up_proj = nn.Parameter((gate_up / gate_up_scale[:, None, None]).to(fp8), requires_grad=False)
        self.down_proj = nn.Parameter((down / down_scale[:, None, None]).to(fp8), requires_grad=False)

    def expert(self, e, x):
        gate_up = self.gate_up_proj[e].to(x.dtype) * self.gate_up_scale[e]
        down = self.down_proj[e].to(x.dtype) * self.down_scale[e]
        return self._swiglu(x, gate_up, down)


class RoutedBlock(nn.Module):
    """``gate`` linear router, softmax top-k renormalised, then ``experts(x, ids, weights)``."""

    def __init__(self, experts: nn.Module, E=NUM_EXPERTS):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, E, bias=False)
        self.experts = experts

    def forward(self, hidden_states):
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        probs_TE = torch.softmax(self.gate(x_TD), dim=-1, dtype=torch.float)
        weights_TK, ids_TK = torch.topk(probs_TE, TOP_K, dim=-1)
        weights_TK = (weights_TK / weights_TK.sum(dim=-1, keepdim=True)).to(x_TD.dtype)
        return self.experts(x_TD, ids_TK, weights_TK).reshape(hidden_states.shape)


def build_odd_model(kind: str, seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A residual stack of `RoutedBlock` over experts of ``kind``: ``plain_attribute``,
    ``child_scale``, ``shared_rows`` or ``float8``."""
    cls = {
        "plain_attribute": PlainAttributeExperts,
        "child_scale": ChildScaleExperts,
        "shared_rows": SharedRowsExperts,
        "float8": Float8Experts,
    }[kind]
    torch.manual_seed(seed)
    model = ResidualStack([RoutedBlock(cls()) for _ in range(num_layers)])
    _skew_gates(model, seed)
    return model.eval()
