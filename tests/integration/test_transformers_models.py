"""EPLBWrapper on real transformers MoE architectures (tiny configs, random weights, no downloads):
outputs equal the unwrapped model before and after several forced rebalances with redundant
experts, in float32 and bfloat16; generate() falls through; unwrap() gives the original model back."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import moe_models as mm  # noqa: E402

from eplb import EPLBConfig, EPLBError  # noqa: E402
from eplb.moe import EPLBExperts, find_moe_layers  # noqa: E402
from eplb.wrapper import EPLBWrapper  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_transformers():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
        yield


def _config(**kw) -> EPLBConfig:
    base = dict(
        num_redundant_experts=4, use_async=False, step_interval=10_000, policy=mm.register_shuffle_policy()
    )
    return EPLBConfig(**{**base, **kw})


def _run_and_compare(wrapper, reference, seeds, **tol):
    with torch.no_grad():
        for seed in seeds:
            tokens = mm.token_batch(seed)
            torch.testing.assert_close(wrapper(tokens).logits, reference(tokens).logits, **tol)


@pytest.mark.parametrize(
    ("name", "implementation"),
    [(n, None) for n in mm.TRANSFORMERS_MODELS] + [("mixtral", "eager"), ("gpt_oss", "eager")],
)
def test_outputs_unchanged_across_rebalances(name, implementation):
    model = mm.build_transformers(name, experts_implementation=implementation)
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config())
    assert len(wrapper.eplb_layers) == 2 and all(
        isinstance(layer, EPLBExperts) for layer in wrapper.eplb_layers
    )
    first = wrapper.placement
    _run_and_compare(wrapper, reference, seeds=(0, 1))
    placements = [first]
    for round_ in range(3):
        report = wrapper.rebalance()
        assert not report.skipped and report.slots_changed > 0
        placements.append(wrapper.placement)
        wrapper.placement.validate(1)
        _run_and_compare(wrapper, reference, seeds=(10 * round_ + 2, 10 * round_ + 3))
    # Every rebalance really changed the placement, and the hot experts got replicas.
    assert all(not a.equals(b) for a, b in zip(placements, placements[1:]))
    hot = wrapper.tracker.window_load().sum(0).argmax().item()
    assert wrapper.placement.logcnt[:, hot].min() >= 2


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_outputs_unchanged_in_bfloat16(name):
    model = mm.build_transformers(name).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config())
    _run_and_compare(wrapper, reference, seeds=(0,))
    for round_ in range(2):
        wrapper.rebalance()
        _run_and_compare(wrapper, reference, seeds=(round_ + 1,))
    assert wrapper.eplb_layers[0].slot_tensors()["gate_up_proj"].dtype == torch.bfloat16


def test_shared_experts_stay_untouched():
    model = mm.build_transformers("qwen2_moe")
    shared = model.model.layers[0].mlp.shared_expert
    EPLBWrapper(model, _config())
    assert model.model.layers[0].mlp.shared_expert is shared
    assert [s.name for s in find_moe_layers(mm.build_transformers("qwen2_moe"))] == [
        "model.layers.0.mlp.experts",
        "model.layers.1.mlp.experts",
    ]


def test_generate_falls_through_and_steps_once_per_forward():
    model = mm.build_transformers("qwen3_moe")
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config(num_redundant_experts=0))
    prompt = mm.token_batch(5, batch=1, length=4)
    out = wrapper.generate(prompt, max_new_tokens=3, do_sample=False)
    expected = reference.generate(prompt, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, expected)
    assert wrapper.steps == 3  # one prefill and two decoding forwards
    assert wrapper.config is model.config and wrapper.module is model


def test_num_groups_comes_from_the_deepseek_config():
    wrapper = EPLBWrapper(mm.build_transformers("deepseek_v3"), _config())
    assert wrapper._num_groups == 2
    model = mm.build_transformers("deepseek_v3")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(EPLBError, match=r"num_groups \(4\) differs from the model config's n_group \(2\)"):
        EPLBWrapper(model, _config(), num_groups=4)
    assert not any(isinstance(m, EPLBExperts) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_unwrap_restores_the_original_model(name):
    model = mm.build_transformers(name)
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config())
    with torch.no_grad():
        wrapper(mm.token_batch(0))
    wrapper.rebalance()
    restored = wrapper.unwrap()
    assert restored is model
    assert not any(isinstance(m, EPLBExperts) for m in restored.modules())
    ours, theirs = restored.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    experts = restored.model.layers[0].mlp.experts
    assert (
        type(experts) is type(reference.model.layers[0].mlp.experts) and experts.num_experts == mm.NUM_EXPERTS
    )
    with torch.no_grad():
        tokens = mm.token_batch(3)
        assert torch.equal(restored(tokens).logits, reference(tokens).logits)
