"""`MoE`: a small reference Mixture-of-Experts layer (linear router, softmax top-k, SwiGLU experts).

Legend: T tokens, K top-k, E experts, D hidden size, I expert intermediate size, M = T * K pairs.

Its experts module, `SwiGLUExperts`, follows the transformers (>= 5) experts convention —
``experts(hidden_states, top_k_index, top_k_weights)`` with stacked parameters ``[E, ...]`` — so
the built-in stacked-experts adapter wraps it with no special code. `ResidualStack` chains MoE
blocks with residual connections (``x + block(x)``): a model of MoE layers alone. Examples, tests
and benchmarks use them as models that need no download.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoE", "ResidualStack", "SwiGLUExperts"]


class SwiGLUExperts(nn.Module):
    """``E`` SwiGLU experts stored as stacked tensors.

    Parameters:
        gate_up_proj: ``[E, 2 * I, D]`` — gate rows then up rows of each expert.
        down_proj: ``[E, D, I]``.

    ``forward(hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D]``: each
    pair's output is weighted and the ``K`` outputs of a token are summed in top-k order. Pairs
    with an id ``>= E`` are skipped (they contribute zero): expert-parallel padding.
    """

    eplb_combine_order = "topk"
    """How `forward` sums a token's ``K`` weighted outputs; the EPLB layer repeats it exactly."""

    eplb_skips_out_of_range_ids = True
    """Ids ``>= E`` cost nothing and contribute zero, so the EPLB layer may use them for padding."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, *, device=None, dtype=None
    ):
        super().__init__()
        self.num_experts = num_experts
        opts = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **opts))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **opts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform init in ``±1/sqrt(fan_in)``, like ``nn.Linear``."""
        with torch.no_grad():
            for p in (self.gate_up_proj, self.down_proj):
                bound = p.shape[-1] ** -0.5
                p.uniform_(-bound, bound)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        T, K = top_k_index.shape
        E = self.num_experts
        ids_M = top_k_index.reshape(-1).clamp(max=E)  # ids >= E: one bin of skipped pairs, sorted last
        # Group the pairs by expert so each expert runs one matmul; one host sync for the counts.
        order_M = torch.argsort(ids_M, stable=True)
        counts = torch.bincount(ids_M, minlength=E + 1)[:E].tolist()
        x_MD = hidden_states.index_select(0, torch.div(order_M, K, rounding_mode="floor"))
        outs, start = [], 0
        for expert, n in enumerate(counts):
            if n:
                gate, up = F.linear(x_MD[start : start + n], self.gate_up_proj[expert]).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, self.down_proj[expert]))
            start += n
        D = self.down_proj.shape[1]
        y_MD = torch.cat(outs) if outs else x_MD.new_zeros((0, D))
        y_TKD = x_MD.new_zeros((T * K, D)).index_copy_(0, order_M[:start], y_MD).view(T, K, D)
        return (y_TKD * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        E, two_i, d = self.gate_up_proj.shape
        return f"num_experts={E}, hidden_size={d}, intermediate_size={two_i // 2}"


class MoE(nn.Module):
    """A reference MoE layer: ``softmax(gate(x))`` → top-k (renormalised) → SwiGLU experts.

    Args:
        hidden_size: ``D``.
        intermediate_size: ``I`` of each expert.
        num_experts: ``E``.
        top_k: ``K`` experts per token.
        norm_topk_prob: renormalise the ``K`` chosen probabilities to sum to 1.

    ``forward(x [..., D]) -> [..., D]``. Submodules: ``gate`` (``nn.Linear(D, E)``, no bias) and
    ``experts`` (`SwiGLUExperts`).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        norm_topk_prob: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}]")
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        self.experts = SwiGLUExperts(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_TD [T, D]`` -> (``topk_ids_TK`` int64, ``topk_weights_TK`` float32)."""
        probs_TE = torch.softmax(self.gate(x_TD).float(), dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return ids_TK, weights_TK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        ids_TK, weights_TK = self.route(x_TD)
        return self.experts(x_TD, ids_TK, weights_TK).reshape(x.shape)


class ResidualStack(nn.Module):
    """``x + block_l(x)`` over a list of MoE blocks, in order: a model of MoE layers alone.

    Args:
        blocks: the blocks (`MoE`, or any module mapping ``[..., D] -> [..., D]``), kept in
            ``self.blocks`` (an ``nn.ModuleList``).

    ``forward(x [..., D]) -> [..., D]``.
    """

    def __init__(self, blocks: Iterable[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x
