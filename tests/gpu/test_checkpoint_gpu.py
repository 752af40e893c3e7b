"""GPU checks of meta-device wrapping and logical loads (run on a CUDA machine; skipped elsewhere):
float8 experts with per-expert scales built on the meta device, wrapped with ``device="cuda"``,
filled from safetensors, rebalanced with redundancy and updated by a weight push; outputs equal
the full model on the GPU."""

from __future__ import annotations

import copy

import moe_models as mm
import odd_experts as odd
import pytest
import torch
from checkpoints import updated
from safetensors.torch import save_model

from eplb import EPLBConfig, EPLBWrapper, meta_parameters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_meta_float8_model_on_the_gpu_loads_rebalances_and_takes_new_weights(tmp_path):
    full = odd.build_odd_model("float8")
    path = tmp_path / "model.safetensors"
    save_model(full, str(path))
    full = full.cuda()
    with meta_parameters():
        model = odd.build_odd_model("float8")
    config = EPLBConfig(num_redundant_experts=4, use_async=False, policy=mm.register_shuffle_policy())
    wrapper = EPLBWrapper(model, config, device="cuda")
    assert all(t.is_cuda for layer in wrapper.eplb_layers for t in layer.slot_tensors().values())
    wrapper.load_logical_state_dict(path)
    reference = full
    with torch.no_grad():
        for step in range(4):
            x = mm.hidden_batch(step).cuda()
            torch.testing.assert_close(wrapper(x), reference(x))
            assert not wrapper.rebalance().skipped
            if step == 1:
                reference = updated(copy.deepcopy(full).cpu(), seed=3).cuda()
                wrapper.load_logical_state_dict(reference.state_dict())


def test_meta_transformers_model_moves_to_the_gpu_whole(tmp_path):
    """Rotary buffers stay real (on the CPU) under meta_parameters(); wrapping with device="cuda"
    moves them along with the materialised parameters."""
    full = mm.build_transformers("qwen3_moe")
    full.save_pretrained(tmp_path)
    full = full.cuda()
    with meta_parameters():
        model = mm.build_transformers("qwen3_moe")
    wrapper = EPLBWrapper(model, EPLBConfig(num_redundant_experts=4, use_async=False), device="cuda")
    assert all(t.is_cuda for t in wrapper.module.state_dict().values())
    assert all(b.is_cuda for b in wrapper.module.buffers())
    wrapper.load_logical_state_dict(tmp_path)
    x = mm.token_batch(0).cuda()
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x).logits, full(x).logits)
