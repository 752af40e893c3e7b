"""The sync-free forward on one GPU (skipped without CUDA), with transformers ``grouped_mm`` experts:

- one rank, no group (the experts module gets slot ids directly): outputs equal the unwrapped
  model, no host sync during a step (``set_sync_debug_mode("error")``), a CUDA graph captured
  once stays right across async commits, padding through ``set_valid_tokens`` with a device tensor;
- the expert-parallel code path forced on a one-rank NCCL group (``dispatcher="fixed_capacity"``):
  the same checks, with sync rebalances between graph replays (hash and round-robin replicas).
"""

from __future__ import annotations

import copy
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

_TESTS_DIR = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(_TESTS_DIR / "distributed"), str(_TESTS_DIR)) if p not in sys.path]

import moe_models as mm  # noqa: E402
from harness import run_ranks  # noqa: E402

from eplb import EPLBConfig, EPLBWrapper  # noqa: E402
from eplb.moe.dispatch import FixedCapacityDispatcher  # noqa: E402
from eplb.testing import capture_graph  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

L, E, K, D, I, T = 4, 16, 4, 256, 128, 64
TOL = {"rtol": 2e-2, "atol": 2e-2}  # bf16; the one-rank direct path is usually bitwise


def _biased_router_forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden_states, self.weight) + self.bias_E
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    top, ids = torch.topk(probs, self.top_k, dim=-1)
    top /= top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), ids


def build_stack(device="cuda") -> nn.Module:
    """A residual stack of L transformers Qwen3-MoE sparse blocks, grouped_mm experts, bf16,
    experts 0 and 1 hot."""
    import transformers as tf
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = tf.Qwen3MoeConfig(hidden_size=D, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    model = mm.ResidualStack([Qwen3MoeSparseMoeBlock(config) for _ in range(L)])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(device, torch.bfloat16).eval()
    for block in model.blocks:
        block.gate.register_buffer("bias_E", torch.zeros(E, device=device, dtype=torch.bfloat16))
        block.gate.bias_E[:2] = 2.0
        block.gate.forward = types.MethodType(_biased_router_forward, block.gate)
    return model


def batch(seed: int, tokens: int = T) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, D, generator=gen).to("cuda", torch.bfloat16)


def _check_wrapped(wrapper, reference, *, rebalance_between_replays, grow_after_capture=False):
    """Eager equality, a sync-free step, a graph that survives rebalances, padding in the graph;
    with ``grow_after_capture``, an eager batch larger than any before (the layers' and tracker's
    caches grow) between replays, with the freed memory reused: the graph still reads valid data."""
    with torch.no_grad():
        for seed in range(2):
            torch.testing.assert_close(wrapper(batch(seed)), reference(batch(seed)), **TOL)
        x = batch(5)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = wrapper(x)  # the forward and the step the forward hook counts
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(out, reference(x), **TOL)

        static_x = batch(0).clone()
        static_out = {}
        n_valid = torch.tensor(T, device="cuda")
        wrapper.set_valid_tokens(n_valid)

        def forward():
            static_out["y"] = wrapper(static_x)

        graph, _ = capture_graph(forward)
        for step in range(6):
            static_x.copy_(batch(100 + step))
            graph.replay()
            wrapper.step()
            torch.testing.assert_close(static_out["y"], reference(static_x), **TOL, msg=f"replay {step}")
            if step == 0:
                # The replay recorded (on the graph's side branch) what an eager forward records.
                replayed = wrapper.tracker.last_step_load().clone()
                wrapper(static_x)
                assert torch.equal(wrapper.tracker.last_step_load(), replayed)
                assert int(replayed.sum()) == T * K * L
            if step in (1, 3):
                rebalance_between_replays()
            if step == 2 and grow_after_capture:
                wrapper(batch(300, tokens=8 * T))
                wrapper.tracker.reset()
                torch.cuda.empty_cache()
                torch.full((1 << 24,), -7, dtype=torch.int64, device="cuda")  # reuse what was freed
        # Padding: 3 real rows of T, no re-capture; real rows unchanged, the MoE gives the rest zero.
        wrapper.tracker.reset()
        n_valid.fill_(3)
        static_x.copy_(batch(200))
        graph.replay()
        wrapper.step()
        torch.testing.assert_close(static_out["y"][:, :3], reference(static_x[:, :3]), **TOL)
        assert torch.equal(static_out["y"][:, 3:], static_x[:, 3:])  # residual: x + 0 in every block
        assert int(wrapper.tracker.window_load().sum()) == 3 * K * L
        wrapper.set_valid_tokens(None)


def test_one_rank_forward_is_sync_free_and_graph_safe_across_async_commits():
    warnings.filterwarnings("ignore", category=UserWarning)
    model = build_stack()
    reference = copy.deepcopy(model)
    # No redundancy, identity placement: the very same grouped_mm call, slot ids for expert ids.
    plain = EPLBWrapper(copy.deepcopy(model), EPLBConfig(use_async=False))
    with torch.no_grad():
        assert torch.equal(plain(batch(9)), reference(batch(9)))
    plain.close()
    wrapper = EPLBWrapper(model, EPLBConfig(num_redundant_experts=4, step_interval=10**6, async_on_error="raise"))
    # grouped_mm experts skip slot ids >= S (as they are, or once marked expert-parallel).
    layers = wrapper.eplb_layers
    assert all(layer.dispatcher is None and (layer._skips_plain or layer._skips_marked) for layer in layers)
    placements = []

    def rebalance_async():
        wrapper.rebalance()  # async: plans on the worker, commits at the next steps
        placements.append(wrapper.placement)

    _check_wrapped(wrapper, reference, rebalance_between_replays=rebalance_async, grow_after_capture=True)
    wrapper.synchronize()
    assert wrapper.stats()["num_rebalances"] >= 1
    wrapper.close()


def _ep_on_one_rank(rank, world_size, replica_choice):
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=UserWarning)
    model = build_stack()
    reference = copy.deepcopy(model)
    config = EPLBConfig(
        num_redundant_experts=4, use_async=False, step_interval=10**6, policy=mm.register_shuffle_policy(),
        dispatcher="fixed_capacity", max_tokens_per_rank=T, replica_choice=replica_choice,
    )
    wrapper = EPLBWrapper(model, config, ep_group=dist.group.WORLD)
    assert all(isinstance(layer.dispatcher, FixedCapacityDispatcher) for layer in wrapper.eplb_layers)
    moved = []

    def rebalance_sync():
        report = wrapper.rebalance()
        moved.append(report.slots_changed)

    _check_wrapped(wrapper, reference, rebalance_between_replays=rebalance_sync)
    assert sum(moved) > 0  # weights really moved under the captured graph
    return True


@pytest.mark.parametrize("replica_choice", ["hash", "round_robin"])
def test_expert_parallel_path_on_a_one_rank_nccl_group_is_sync_free_and_graph_safe(replica_choice):
    assert run_ranks(_ep_on_one_rank, 1, replica_choice, backend="nccl", timeout=300) == [True]
