"""EPLBConfig: defaults, JSON, frozen, unknown fields, every constraint, the cross-field rules
(async only with the default policy; async never with torch_nccl), registry-backed names."""

from __future__ import annotations

import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

import eplb
from eplb import EPLBConfig
from eplb.policies import unregister_policy

DEFAULTS = {
    "window_size": 1000,
    "step_interval": 3000,
    "num_redundant_experts": 0,
    "log_balancedness": False,
    "log_balancedness_interval": 1,
    "use_async": True,
    "policy": "default",
    "communicator": "auto",
    "min_improvement": 0.0,
    "async_timeout_s": 300.0,
    "migration_budget": None,
    "refine": False,
}


def test_defaults_match_the_documented_table():
    config = EPLBConfig()
    assert {k: getattr(config, k) for k in DEFAULTS} == DEFAULTS


def test_every_field_has_an_attribute_docstring():
    import inspect

    source = inspect.getsource(EPLBConfig)
    for name in EPLBConfig.model_fields:
        after = source.split(f"\n    {name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), f"field {name} has no attribute docstring"


def test_parses_json_and_round_trips():
    config = EPLBConfig.model_validate_json('{"use_async": false}')
    assert config.use_async is False and config.policy == "default"
    assert EPLBConfig.model_validate_json(config.model_dump_json()) == config


def test_is_frozen_and_rejects_unknown_fields():
    config = EPLBConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.window_size = 5
    with pytest.raises(ValidationError, match="window_sizes"):
        EPLBConfig(window_sizes=5)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("window_size", 0, "greater than 0"),
        ("step_interval", -1, "greater than 0"),
        ("num_redundant_experts", -1, "greater than or equal to 0"),
        ("log_balancedness_interval", 0, "greater than 0"),
        ("min_improvement", 1.0, "less than 1"),
        ("min_improvement", -0.1, "greater than or equal to 0"),
        ("async_timeout_s", 0, "greater than or equal to 0.1"),
        ("async_timeout_s", 1e-9, "greater than or equal to 0.1"),
        ("async_timeout_s", float("inf"), "finite number"),
        ("async_timeout_s", float("nan"), "finite number"),
        ("async_timeout_s", 1e10, "less than or equal to 1000000000"),  # past Python's thread-wait bound
        ("num_redundant_experts", 2**40, "less than or equal to 1023"),
        ("async_layers_per_step", 0, "greater than 0"),
        ("async_on_error", "ignore", "'log' or 'raise'"),
        ("max_transfer_bytes", 0, "greater than 0"),
        ("migration_budget", 0.0, r"migration_budget \(0.0\) must be in \(0, 1\].*pass e.g. migration_budget=0.25"),
        ("migration_budget", 1.5, r"migration_budget \(1.5\) must be in \(0, 1\].*or None for no limit"),
        ("communicator", "mpi", r"communicator 'mpi' is unknown; use one of auto, .*torch_gloo, torch_nccl"),
        ("policy", "nope", "policy 'nope' is not registered"),
    ],
)
def test_each_constraint_names_the_field_and_the_rule(field, value, match):
    kwargs = {field: value, "use_async": False}
    with pytest.raises(ValidationError, match=match) as info:
        EPLBConfig(**kwargs)
    assert field in str(info.value)


NUMBER_FIELDS = sorted(
    name for name, field in EPLBConfig.model_fields.items()
    if ({int, float} & (set(typing.get_args(field.annotation)) or {field.annotation}))
)


def test_the_number_fields_are_the_ones_the_docs_list():
    assert "window_size" in NUMBER_FIELDS and "async_timeout_s" in NUMBER_FIELDS
    assert not {"use_async", "refine", "log_balancedness"} & set(NUMBER_FIELDS)


@pytest.mark.parametrize("field", NUMBER_FIELDS)
@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_refused_for_every_number_field(field, value):
    with pytest.raises(ValidationError, match=rf"{field} \({value}\) is a bool, but {field} takes an? (int|number)"):
        EPLBConfig(**{field: value, "use_async": False})
    with pytest.raises(ValidationError, match=f"{field} \\({value}\\) is a bool"):
        EPLBConfig.model_validate_json(f'{{"{field}": {str(value).lower()}, "use_async": false}}')


@given(st.integers(1, 10**6))
def test_ints_and_whole_number_strings_still_parse_for_int_fields(n):
    for value in (n, str(n), float(n)):
        config = EPLBConfig(window_size=value, log_balancedness_interval=value, max_tokens_per_rank=value)
        assert config.window_size == config.log_balancedness_interval == config.max_tokens_per_rank == n
        assert type(config.window_size) is int
    with pytest.raises(ValidationError, match="window_size"):
        EPLBConfig(window_size=n + 0.5)


def test_async_rejects_any_policy_but_default():
    with pytest.raises(
        ValidationError,
        match=r"Async EPLB is only supported with the default policy \(got policy='topk'\); "
        r"set use_async=False to use 'topk'",
    ):
        EPLBConfig(policy="topk")
    assert EPLBConfig(policy="topk", use_async=False).policy == "topk"


def test_async_rejects_torch_nccl_with_the_reason_and_the_alternatives():
    with pytest.raises(ValidationError, match=r"(?s)deadlock.*'torch_gloo' or 'auto'"):
        EPLBConfig(communicator="torch_nccl")
    assert EPLBConfig(communicator="torch_nccl", use_async=False).communicator == "torch_nccl"


def test_plugin_policy_is_accepted_sync_and_rejected_async():
    @eplb.register_policy("test_config_plugin")
    def plugin(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
        return eplb.get_policy("default")(load, num_physical=num_physical, num_groups=num_groups,
                                          num_nodes=num_nodes, num_ranks=num_ranks, old=old)

    try:
        assert EPLBConfig(policy="test_config_plugin", use_async=False).policy == "test_config_plugin"
        with pytest.raises(ValidationError, match="only supported with the default policy"):
            EPLBConfig(policy="test_config_plugin")
    finally:
        unregister_policy("test_config_plugin")


def test_policies_of_the_entry_point_group_are_registered(monkeypatch):
    import importlib.metadata

    import eplb.policies as registry

    class FakeEntryPoint:
        name = "from_entry_point"

        def load(self):
            return registry.get_policy("default").__wrapped__

    def entry_points(group=None):
        return [FakeEntryPoint()] if group == registry.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "from_entry_point" in registry.available_policies()
        assert EPLBConfig(policy="from_entry_point", use_async=False).policy == "from_entry_point"
    finally:
        unregister_policy("from_entry_point")


def test_an_entry_point_policy_declares_its_options_with_an_attribute(monkeypatch):
    import importlib.metadata

    import eplb.policies as registry

    def with_budget(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None, migration_budget=None):
        return registry.get_policy("default")(load, num_physical=num_physical, num_ranks=num_ranks, old=old,
                                              migration_budget=migration_budget)

    with_budget.eplb_options = ("migration_budget",)

    class FakeEntryPoint:
        name = "budget_from_entry_point"

        def load(self):
            return with_budget

    def entry_points(group=None):
        return [FakeEntryPoint()] if group == registry.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert registry.policy_options("budget_from_entry_point") == {"migration_budget"}
        assert EPLBConfig(policy="budget_from_entry_point", use_async=False, migration_budget=0.3)
        with pytest.raises(ValidationError, match="does not accept the option refine=True"):
            EPLBConfig(policy="budget_from_entry_point", use_async=False, refine=True)
    finally:
        unregister_policy("budget_from_entry_point")


@given(
    window=st.integers(1, 10**6), interval=st.integers(1, 10**6), redundant=st.integers(0, 1023),
    gain=st.floats(0, 1, exclude_max=True), use_async=st.booleans(),
)
def test_valid_values_are_kept_exactly(window, interval, redundant, gain, use_async):
    config = EPLBConfig(window_size=window, step_interval=interval, num_redundant_experts=redundant,
                       min_improvement=gain, use_async=use_async)
    assert (config.window_size, config.step_interval, config.num_redundant_experts, config.min_improvement) == (
        window, interval, redundant, gain)


def test_policy_options_reach_the_policy_only_when_set():
    assert EPLBConfig().policy_options() == {}
    config = EPLBConfig(migration_budget=0.25, refine=True)
    assert config.policy_options() == {"migration_budget": 0.25, "refine": True}


def test_an_option_the_policy_does_not_accept_is_rejected_with_the_fix():
    with pytest.raises(ValidationError, match=r"policy 'topk' does not accept the option refine=True "
                                              r"\(it accepts no options\); unset refine"):
        EPLBConfig(policy="topk", use_async=False, refine=True)
    with pytest.raises(ValidationError, match="does not accept the option migration_budget=0.5"):
        EPLBConfig(policy="topk", use_async=False, migration_budget=0.5)


def test_a_plugin_declares_the_options_it_accepts():
    seen = {}

    @eplb.register_policy("budget_aware", options=("migration_budget",), override=True)
    def budget_aware(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None, migration_budget=None):
        seen["budget"] = migration_budget
        return eplb.get_policy("default")(load, num_physical=num_physical, num_ranks=num_ranks)

    try:
        # P = 2 slots: the smallest useful budget is 1/2
        config = EPLBConfig(policy="budget_aware", use_async=False, migration_budget=0.5)
        eplb.get_policy("budget_aware")([[1.0, 2.0]], num_physical=2, num_ranks=1, **config.policy_options())
        assert seen == {"budget": 0.5}
        with pytest.raises(ValidationError, match="does not accept the option refine=True"):
            EPLBConfig(policy="budget_aware", use_async=False, refine=True)
        with pytest.raises(eplb.EPLBError, match="does not accept the option refine"):
            eplb.get_policy("budget_aware")([[1.0, 2.0]], num_physical=2, num_ranks=1, refine=True)
        with pytest.raises(eplb.EPLBError, match="declares unknown option"):
            eplb.register_policy("typo", options=("budget",))
    finally:
        unregister_policy("budget_aware")


def test_the_longest_async_timeout_works_through_an_async_rebalance():
    # A longer timeout once made the forward that waits on the worker raise OverflowError.
    import torch

    from eplb import EPLBWrapper
    from eplb.moe import MoE

    torch.manual_seed(0)
    model = torch.nn.Sequential(MoE(16, 32, 8, 2), MoE(16, 32, 8, 2)).eval()
    config = EPLBConfig(num_redundant_experts=4, step_interval=2, window_size=4, async_timeout_s=1e9)
    with EPLBWrapper(model, config) as wrapper, torch.no_grad():
        for _ in range(5):  # rebalances start at steps 2 and 4, the second while the first may run
            wrapper(torch.randn(4, 16))
        wrapper.synchronize()
        assert wrapper.stats()["num_rebalances"] >= 1
