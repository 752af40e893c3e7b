"""Small MoE models for the wrapper/layer tests: transformers architectures from tiny configs,
a classic ``nn.ModuleList`` MoE block, and stacks of `eplb.moe.MoE`. Random weights, no downloads.

Legend: B batch, T tokens, D hidden size, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eplb.moe import MoE, ResidualStack  # noqa: F401  (ResidualStack: tests use mm.ResidualStack)
from eplb.placement import Placement
from eplb.policies import available_policies, get_policy, register_policy

HIDDEN = 32
NUM_EXPERTS = 8
TOP_K = 2
VOCAB = 64
TRANSFORMERS_MODELS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")
SHUFFLE_POLICY = "test_shuffle"


# ------------------------------------------------------------------------------ transformers
def build_transformers(name: str, *, seed: int = 0, experts_implementation: str | None = None) -> nn.Module:
    """A 2-layer transformers MoE causal LM (hidden 32, 8 experts, top-2) in eval mode, with
    skewed routing (experts 0 and 1 hot)."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_experts_per_tok=TOP_K,
    )
    if name == "mixtral":
        config = tf.MixtralConfig(**common, num_local_experts=NUM_EXPERTS)
        cls = tf.MixtralForCausalLM
    elif name == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **common, moe_intermediate_size=24, shared_expert_intermediate_size=48, num_experts=NUM_EXPERTS
        )
        cls = tf.Qwen2MoeForCausalLM
    elif name == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, moe_intermediate_size=24, num_experts=NUM_EXPERTS, head_dim=8)
        cls = tf.Qwen3MoeForCausalLM
    elif name == "deepseek_v3":
        config = tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            moe_intermediate_size=24,
            n_routed_experts=NUM_EXPERTS,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=0,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
        cls = tf.DeepseekV3ForCausalLM
    elif name == "gpt_oss":
        config = tf.GptOssConfig(**common, num_local_experts=NUM_EXPERTS, head_dim=8)
        cls = tf.GptOssForCausalLM
    else:
        raise ValueError(name)
    torch.manual_seed(seed)
    model = cls(config)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    skew_transformers(model, hot=(0, 1), seed=seed)
    return model.eval()


def skew_transformers(model: nn.Module, hot: tuple[int, ...], seed: int = 0, strength: float = 0.06) -> None:
    """Make experts ``hot`` popular in every MoE layer: push every token embedding along one
    random direction ``u`` and add ``u`` to the hot rows of every router; routers with a bias
    (GPT-OSS) or a score-correction bias (DeepSeek-V3) get it added there too."""
    gen = torch.Generator().manual_seed(seed + 1)
    u_D = torch.randn(HIDDEN, generator=gen)
    u_D /= u_D.norm()
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.05 * u_D)
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not (name.endswith(".gate") or name.endswith(".router")) or weight is None:
                continue
            if weight.dim() != 2 or weight.shape[0] != NUM_EXPERTS:
                continue
            for e in hot:
                weight[e] += strength * u_D.to(weight.dtype)
            for bias_name in ("bias", "e_score_correction_bias"):
                bias = getattr(module, bias_name, None)
                if isinstance(bias, torch.Tensor):
                    bias[list(hot)] += 0.01


def token_batch(seed: int, batch: int = 2, length: int = 9) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


# ------------------------------------------------------------------------ ModuleList block
class SwiGLUExpert(nn.Module):
    """One expert, ``w2(silu(w1 x) * w3 x)`` (the classic Mixtral expert)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ModuleListMoEBlock(nn.Module):
    """A classic MoE block: ``gate`` linear router, softmax top-k (renormalised) and an
    ``nn.ModuleList`` of experts visited one by one."""

    def __init__(
        self, hidden: int = HIDDEN, inner: int = 48, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K
    ):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, inner) for _ in range(num_experts))

    def forward(self, hidden_states):
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        probs_TE = torch.softmax(self.gate(x_TD), dim=-1, dtype=torch.float)
        weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = (weights_TK / weights_TK.sum(dim=-1, keepdim=True)).to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(ids_TK, len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            k_pos, token = torch.where(mask_EKT[e])
            out_TD.index_add_(0, token, expert(x_TD[token]) * weights_TK[token, k_pos, None])
        return out_TD.reshape(hidden_states.shape)


class SigmoidRoutedBlock(ModuleListMoEBlock):
    """Same structure, but routes with sigmoid scores: the built-in ModuleList adapter's softmax
    route does not reproduce it (its match-time check must refuse it)."""

    def forward(self, hidden_states):
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights_TK, ids_TK = torch.topk(torch.sigmoid(self.gate(x_TD)), self.top_k, dim=-1)
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            token, k_pos = torch.where(ids_TK == e)
            out_TD.index_add_(0, token, expert(x_TD[token]) * weights_TK[token, k_pos, None])
        return out_TD.reshape(hidden_states.shape)


def build_module_list_model(seed: int = 0, num_layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    model = ResidualStack([ModuleListMoEBlock() for _ in range(num_layers)])
    _skew_gates(model, seed)
    return model.eval()


def build_reference_model(
    seed: int = 0, num_layers: int = 2, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K, dtype=None
) -> nn.Module:
    """A stack of `eplb.moe.MoE` layers (hidden 32, intermediate 48)."""
    torch.manual_seed(seed)
    model = ResidualStack([MoE(HIDDEN, 48, num_experts, top_k, dtype=dtype) for _ in range(num_layers)])
    _skew_gates(model, seed)
    return model.eval()


def _skew_gates(model: nn.Module, seed: int) -> None:
    # Inputs from `hidden_batch` lean along u; the hot experts' gate rows point along u.
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(".gate"):
                u = _direction(seed).to(module.weight.dtype)
                module.weight[0] += 2.0 * u
                module.weight[1] += 1.5 * u


def _direction(seed: int) -> torch.Tensor:
    u = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed + 7))
    return u / u.norm()


def hidden_batch(
    seed: int, batch: int = 2, length: int = 16, *, model_seed: int = 0, dtype=None
) -> torch.Tensor:
    """``[batch, length, D]`` inputs leaning along the hot experts' direction."""
    x = torch.randn(batch, length, HIDDEN, generator=torch.Generator().manual_seed(seed))
    x = x + 1.5 * _direction(model_seed)
    return x if dtype is None else x.to(dtype)


# -------------------------------------------------------------------------- shuffle policy
def register_shuffle_policy() -> str:
    """Register (once) a test policy: the default policy's placement with its slots permuted by
    a permutation seeded from the load and the old placement. Deterministic, valid, and
    different at every rebalance whose load differs, so weights really move."""
    if SHUFFLE_POLICY not in available_policies():

        @register_policy(SHUFFLE_POLICY)
        def shuffle(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
            base = get_policy("default")(
                load,
                num_physical=num_physical,
                num_groups=num_groups,
                num_nodes=num_nodes,
                num_ranks=num_ranks,
                old=old,
            )
            seed = int(load.sum().item()) * 31 + (int(old.phy2log.sum().item()) if old is not None else 0)
            gen = torch.Generator().manual_seed(seed)
            perm = torch.stack([torch.randperm(num_physical, generator=gen) for _ in range(base.num_layers)])
            return Placement.from_phy2log(torch.gather(base.phy2log, 1, perm), base.num_logical)

    return SHUFFLE_POLICY
