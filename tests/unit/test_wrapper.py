"""EPLBWrapper on one process: equality with the unwrapped model, step counting and triggering,
state round trips, unwrap, training, and bad input (always leaving the model untouched)."""

from __future__ import annotations

import copy
import logging

import moe_models as mm
import pytest
import torch

import eplb
import eplb.policies
from eplb import EPLBConfig, EPLBError, EPLBWrapper, Placement
from eplb.moe import EPLBExperts, StackedExpertList, SwiGLUExperts
from eplb.traces import Trace


def _config(**kw) -> EPLBConfig:
    base = dict(
        num_redundant_experts=4, use_async=False, step_interval=10_000, policy=mm.register_shuffle_policy()
    )
    return EPLBConfig(**{**base, **kw})


def _assert_same_outputs(wrapper, reference, seeds, dtype=None):
    with torch.no_grad():
        for seed in seeds:
            x = mm.hidden_batch(seed, dtype=dtype)
            torch.testing.assert_close(wrapper(x), reference(x))


def _untouched(model, before_state, before_modules):
    state = model.state_dict()
    return (
        state.keys() == before_state.keys()
        and all(torch.equal(state[k], before_state[k]) for k in state)
        and [type(m) for m in model.modules()] == before_modules
    )


# ---------------------------------------------------------------------------- correctness
@pytest.mark.parametrize(
    "build", [mm.build_reference_model, mm.build_module_list_model], ids=["MoE", "ModuleList"]
)
def test_outputs_unchanged_across_rebalances(build):
    model = build()
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config())
    _assert_same_outputs(wrapper, reference, seeds=(0, 1))
    for round_ in range(3):
        report = wrapper.rebalance()
        assert report.slots_changed > 0
        _assert_same_outputs(wrapper, reference, seeds=(round_ + 2,))
    assert wrapper.stats()["num_rebalances"] == 3


def test_outputs_unchanged_in_bfloat16():
    model = mm.build_reference_model(dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config())
    for round_ in range(3):
        _assert_same_outputs(wrapper, reference, seeds=(round_,), dtype=torch.bfloat16)
        wrapper.rebalance()


def test_default_policy_gives_the_hot_expert_more_replicas():
    wrapper = EPLBWrapper(mm.build_reference_model(), _config(policy="default"))
    with torch.no_grad():
        for seed in range(3):
            wrapper(mm.hidden_batch(seed))
    load = wrapper.tracker.window_load()
    wrapper.rebalance()
    hot = load.argmax(dim=1)
    assert all(wrapper.placement.logcnt[layer, e] >= 2 for layer, e in enumerate(hot.tolist()))
    for layer in wrapper.eplb_layers:
        assert torch.equal(layer.placement_row(), wrapper.placement.phy2log[layer.layer_index])


def test_policy_options_of_the_config_reach_the_policy():
    seen = []

    @eplb.register_policy("options_spy", options=("migration_budget", "refine"), override=True)
    def options_spy(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None, **options):
        seen.append(options)
        return eplb.get_policy("default")(load, num_physical=num_physical, num_ranks=num_ranks, old=old,
                                          **options)

    try:
        model = mm.build_reference_model()
        reference = copy.deepcopy(model)
        wrapper = EPLBWrapper(model, _config(policy="options_spy", migration_budget=0.5, refine=True))
        with torch.no_grad():
            wrapper(mm.hidden_batch(0))
        wrapper.rebalance()
        assert seen == [{"migration_budget": 0.5, "refine": True}]
        _assert_same_outputs(wrapper, reference, seeds=(1,))
    finally:
        eplb.policies.unregister_policy("options_spy")


# ------------------------------------------------------------------------------ steps
def test_every_forward_is_one_step_and_step_interval_rebalances():
    model = mm.build_reference_model()
    wrapper = EPLBWrapper(model, _config(step_interval=3))
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
        model(mm.hidden_batch(1))  # calling the model directly counts too
        assert wrapper.steps == 2 and wrapper.stats()["num_rebalances"] == 0
        assert wrapper.stats()["steps_to_next_rebalance"] == 1
        wrapper(mm.hidden_batch(2))
    assert wrapper.steps == 3 and wrapper.stats()["num_rebalances"] == 1


def test_attributes_fall_through_to_the_model():
    model = mm.build_reference_model()
    wrapper = EPLBWrapper(model, _config())
    assert wrapper.module is model and wrapper.blocks is model.blocks
    assert wrapper.training is False
    with pytest.raises(AttributeError):
        _ = wrapper.no_such_attribute


def test_stats_report_balancedness_and_the_last_rebalance():
    wrapper = EPLBWrapper(mm.build_reference_model(), _config())
    stats = wrapper.stats()
    assert stats["last_rebalance_bytes_moved"] is None and stats["step"] == 0
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
    report = wrapper.rebalance()
    stats = wrapper.stats()
    assert stats["balancedness"] == 1.0 and len(stats["balancedness_per_layer"]) == 2  # one rank
    assert stats["last_rebalance_slots_changed"] == report.slots_changed > 0
    assert stats["last_rebalance_bytes_moved"] == 0  # nothing crosses a network on one rank
    assert stats["avg_tokens_per_rank"] == 2 * 32 * mm.TOP_K


def test_stats_about_the_last_rebalance_are_none_before_the_first_one_as_documented():
    from dataclasses import fields

    from eplb.executor import RebalanceReport

    wrapper = EPLBWrapper(mm.build_reference_model(), _config())
    stats = wrapper.stats()
    last = {key for key in stats if key.startswith("last_")}
    assert last == {f"last_rebalance_{f.name}" for f in fields(RebalanceReport)} | {"last_predicted_gain"}
    assert all(stats[key] is None for key in last)  # last_rebalance_skipped too: None, not False
    assert stats["num_rebalances"] == 0 and stats["bytes_moved_total"] == 0
    doc = " ".join(EPLBWrapper.stats.__doc__.split())
    assert "Before the first rebalance (done, skipped or aborted) every ``last_rebalance_<field>``" in doc
    for key in stats:  # every key is named in the docstring
        assert f"``{key}``" in doc or f"``{key.removeprefix('last_rebalance_')}``" in doc, key
    wrapper.rebalance()  # an empty window: skipped, which sets the keys
    stats = wrapper.stats()
    assert stats["last_rebalance_skipped"] is True and stats["last_rebalance_reason"]
    assert stats["num_rebalances"] == 0 and stats["last_predicted_gain"] is None


def test_min_improvement_and_an_empty_window_skip_the_rebalance(caplog):
    wrapper = EPLBWrapper(mm.build_reference_model(), _config(min_improvement=0.5))
    with caplog.at_level(logging.INFO, logger="eplb"):
        report = wrapper.rebalance()
    assert report.skipped and "no load recorded" in report.reason
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
    before = wrapper.placement
    report = wrapper.rebalance()  # one rank: balancedness is always 1, the gain 0
    assert report.skipped and "min_improvement" in report.reason and wrapper.placement is before
    assert "rebalance skipped" in caplog.text


def test_balancedness_is_logged_when_asked(caplog):
    wrapper = EPLBWrapper(
        mm.build_reference_model(), _config(log_balancedness=True, log_balancedness_interval=2)
    )
    with caplog.at_level(logging.INFO, logger="eplb"), torch.no_grad():
        for seed in range(4):
            wrapper(mm.hidden_batch(seed))
    assert caplog.text.count("balancedness=") == 2


def test_record_trace_writes_the_load_of_every_step(tmp_path):
    path = tmp_path / "trace.npz"
    with EPLBWrapper(mm.build_reference_model(), _config(), record_trace=path) as wrapper, torch.no_grad():
        for seed in range(3):
            wrapper(mm.hidden_batch(seed))
        window = wrapper.tracker.window_load()
    trace = Trace.load(path)
    assert tuple(trace.loads.shape) == (3, 2, mm.NUM_EXPERTS)
    assert torch.equal(trace.loads.sum(0).to(torch.int64), window)


def test_close_stops_counting_and_rebalancing():
    model = mm.build_reference_model()
    with EPLBWrapper(model, _config()) as wrapper:
        pass
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
    assert wrapper.steps == 0
    with pytest.raises(EPLBError, match="closed"):
        wrapper.rebalance()


# ------------------------------------------------------------------------------ state
def test_state_dict_round_trip_restores_placement_slots_and_window():
    model = mm.build_reference_model()
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config())
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
    wrapper.rebalance()
    state = wrapper.state_dict()

    other = EPLBWrapper(copy.deepcopy(reference), _config())
    other.load_state_dict(state)
    assert other.placement.equals(wrapper.placement) and other.steps == wrapper.steps
    assert torch.equal(other.tracker.window_load(), wrapper.tracker.window_load())
    for a, b in zip(other.eplb_layers, wrapper.eplb_layers):
        assert torch.equal(a.placement_row(), b.placement_row())
        assert all(torch.equal(a.slot_tensors()[n], t) for n, t in b.slot_tensors().items())
    _assert_same_outputs(other, reference, seeds=(5,))


def test_load_state_dict_rejects_a_foreign_state():
    wrapper = EPLBWrapper(mm.build_reference_model(), _config())
    state = wrapper.state_dict()
    small = EPLBWrapper(mm.build_reference_model(), _config(num_redundant_experts=0))
    with pytest.raises(
        EPLBError, match=r"placement has \(num_layers, num_logical, num_physical\) = \(2, 8, 12\)"
    ):
        small.load_state_dict(state)
    with pytest.raises(EPLBError, match="not an EPLBWrapper state_dict"):
        small.load_state_dict({"placement": state["placement"]})


def test_initial_placement_from_a_file(tmp_path):
    row = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 1, 1])
    placement = Placement.from_phy2log(torch.stack([row, row.flip(0)]), mm.NUM_EXPERTS)
    placement.save(tmp_path / "p.json")
    model = mm.build_reference_model()
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config(), initial_placement=tmp_path / "p.json")
    assert wrapper.placement.equals(placement)
    _assert_same_outputs(wrapper, reference, seeds=(0,))


@pytest.mark.parametrize(
    "build", [mm.build_reference_model, mm.build_module_list_model], ids=["MoE", "ModuleList"]
)
def test_unwrap_restores_the_original_layers_with_their_weights(build):
    model = build()
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config())
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
    wrapper.rebalance()
    restored = wrapper.unwrap()
    assert [type(m) for m in restored.modules()] == [type(m) for m in reference.modules()]
    assert not any(isinstance(m, (EPLBExperts, StackedExpertList)) for m in restored.modules())
    ours, theirs = restored.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        x = mm.hidden_batch(1)
        assert torch.equal(restored(x), reference(x))
    assert all("forward" not in vars(block) for block in restored.blocks)
    with pytest.raises(EPLBError, match="already unwrapped"):
        wrapper.unwrap()


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "build", [mm.build_reference_model, mm.build_module_list_model], ids=["MoE", "ModuleList"]
)
def test_training_without_redundancy_gives_the_unwrapped_gradients(build):
    model = build().train()
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config(num_redundant_experts=0))
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
    wrapper.rebalance()  # a permutation of the experts: gradients must follow their expert
    x = mm.hidden_batch(1)
    (wrapper(x) ** 2).sum().backward()
    (reference(x) ** 2).sum().backward()
    for block, ref_block, layer in zip(model.blocks, reference.blocks, wrapper.eplb_layers):
        torch.testing.assert_close(block.gate.weight.grad, ref_block.gate.weight.grad)
        row = layer.placement_row()
        slots = layer.experts
        if isinstance(ref_block.experts, SwiGLUExperts):
            torch.testing.assert_close(slots.gate_up_proj.grad, ref_block.experts.gate_up_proj.grad[row])
        else:
            expected = torch.stack([ref_block.experts[e].w1.weight.grad for e in row.tolist()])
            torch.testing.assert_close(slots.w1__weight.grad, expected)


def test_training_with_redundancy_raises_a_clear_error_at_backward():
    model = mm.build_reference_model().train()
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, _config())
    x = mm.hidden_batch(0)
    out = wrapper(x)  # a training-mode forward without no_grad is fine
    torch.testing.assert_close(out, reference(x))
    with pytest.raises(
        EPLBError, match=r"backward reached the expert weights .* num_redundant_experts \(4\)"
    ):
        out.sum().backward()


# ---------------------------------------------------------------------------- bad input
class _NoMoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize(
    ("build", "kwargs", "match"),
    [
        (
            mm.build_reference_model,
            dict(num_groups=3),
            r"num_logical \(8\) must be a multiple of num_groups \(3\)",
        ),
        (
            mm.build_reference_model,
            dict(num_nodes=2),
            r"num_ranks \(1\) must be a multiple of num_nodes \(2\)",
        ),
        (mm.build_reference_model, dict(num_groups=0), r"num_groups \(0\) must be an int >= 1"),
        (mm.build_reference_model, dict(config="x"), "config must be an eplb.EPLBConfig"),
        (
            mm.build_reference_model,
            dict(initial_placement=Placement.initial(2, 8, 16, 1)),
            r"placement has \(num_layers, num_logical, num_physical\) = \(2, 8, 16\) but the model and "
            r"config give \(2, 8, 12\)",
        ),
        (mm.build_reference_model, dict(initial_placement="/no/such/placement.json"), "does not exist"),
        (_NoMoE, {}, r"no MoE layer found in _NoMoE \(module types seen: _NoMoE, Linear\)"),
        (lambda: mm.ResidualStack([mm.SigmoidRoutedBlock()]), {}, "do not reproduce the block's own output"),
    ],
    ids=[
        "groups",
        "nodes",
        "zero-groups",
        "config",
        "placement-shape",
        "placement-path",
        "no-moe",
        "sigmoid",
    ],
)
def test_bad_input_raises_and_leaves_the_model_untouched(build, kwargs, match):
    model = build()
    before_state = copy.deepcopy(model.state_dict())
    before_modules = [type(m) for m in model.modules()]
    config = kwargs.pop("config", _config())
    with pytest.raises(EPLBError, match=match):
        EPLBWrapper(model, config, **kwargs)
    assert _untouched(model, before_state, before_modules)
    assert not model._forward_hooks


def test_ep_group_without_torch_distributed_is_refused():
    model = mm.build_reference_model()
    with pytest.raises(EPLBError, match="torch.distributed is not initialised"):
        EPLBWrapper(model, _config(), ep_group=object())
    assert all(isinstance(b.experts, SwiGLUExperts) for b in model.blocks)

