"""What a user gets wrong with the policy options (``migration_budget``, ``refine``) and the policy
call itself, and the one clear error each gets: at registration, at config, at wrap time, in the
policy call and on the command line."""

from __future__ import annotations

import json
import math

import moe_models as mm
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

import eplb
from eplb import EPLBConfig, EPLBError, EPLBWrapper, Placement, get_policy, register_policy
from eplb.cli import main
from eplb.policies import unregister_policy
from eplb.simulate import SimConfig

SIZES = dict(num_physical=12, num_groups=1, num_nodes=1, num_ranks=3)


def _load() -> torch.Tensor:
    return torch.arange(1.0, 17.0, dtype=torch.float64).reshape(2, 8)  # [L=2, E=8]


def _no_options(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
    return get_policy("default")(load, num_physical=num_physical, num_ranks=num_ranks)


# ---------------------------------------------------------------------- registration
def test_declaring_an_option_the_function_does_not_take_fails_at_registration():
    with pytest.raises(EPLBError, match=r"declares the option\(s\) refine but its signature .* does not take them; "
                                        r"add the keyword argument\(s\) refine=False"):
        register_policy("lacks_refine", options=("refine",), override=True)(_no_options)
    assert "lacks_refine" not in eplb.available_policies()


def test_an_option_taken_through_kwargs_registers():
    def through_kwargs(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None, **options):
        assert options == {"refine": True}
        return get_policy("default")(load, num_physical=num_physical, num_ranks=num_ranks)

    register_policy("through_kwargs", options=("refine",), override=True)(through_kwargs)
    try:
        get_policy("through_kwargs")(_load(), refine=True, **SIZES)
    finally:
        unregister_policy("through_kwargs")


def test_options_given_as_a_bare_string_are_refused_with_the_tuple_to_write():
    with pytest.raises(EPLBError, match=r"options must be a tuple of option names, got the string 'refine'; "
                                        r"write options=\('refine',\)"):
        register_policy("bare_string", options="refine", override=True)


# ---------------------------------------------------------------------- values in a policy call
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"refine": "no"}, r"refine \('no', of type str\) is not a bool; it takes True or False"),
        ({"refine": 1}, r"refine \(1, of type int\) is not a bool"),
        ({"migration_budget": "0.5"}, r"migration_budget \('0.5'\) is a str, but migration_budget takes a number "
                                      r"in \(0, 1\].*pass e.g. migration_budget=0.25"),
        ({"migration_budget": True}, r"migration_budget \(True\) is a bool, but migration_budget takes a number"),
        ({"migration_budget": math.nan}, r"migration_budget \(nan\) must be in \(0, 1\]"),
        ({"migration_budget": 1.5}, r"migration_budget \(1.5\) must be in \(0, 1\]"),
        ({"budget": 0.5}, r"got the unknown option budget=0.5; policy options are migration_budget, refine"),
    ],
)
@pytest.mark.parametrize("policy", ["default", "topk"])
def test_a_bad_option_value_is_refused_by_every_policy(policy, options, match):
    old = get_policy("default")(_load(), **SIZES)
    with pytest.raises(EPLBError, match=match):
        get_policy(policy)(_load(), old=old, **SIZES, **options)


@given(st.integers(1, 64), st.floats(0, 1, exclude_min=True))
def test_a_budget_that_lets_no_slot_move_is_refused_with_the_smallest_useful_one(num_physical, budget):
    load = torch.ones(1, 1, dtype=torch.float64)
    old = Placement.initial(1, 1, num_physical, 1)
    call = lambda: get_policy("default")(load, num_physical=num_physical, old=old, migration_budget=budget)  # noqa: E731
    if math.floor(budget * num_physical + 1e-9) == 0:
        with pytest.raises(EPLBError, match=rf"lets floor\(.*\) = 0 of the {num_physical} slots.*pass at least "
                                            rf"1/{num_physical} = "):
            call()
    else:
        call().validate(1)


def test_the_smallest_useful_budget_is_accepted():
    old = get_policy("default")(_load(), **SIZES)
    get_policy("default")(_load().flip(1), old=old, migration_budget=1 / 12, **SIZES).validate(3)
    with pytest.raises(EPLBError, match=r"pass at least 1/12 = 0.0833333"):
        get_policy("default")(_load(), old=old, migration_budget=1e-9, **SIZES)


@pytest.mark.parametrize("policy", ["default", "topk"])
def test_the_unset_values_of_the_options_are_accepted_by_every_policy(policy):
    old = get_policy("default")(_load(), **SIZES)
    plain = get_policy(policy)(_load(), old=old, **SIZES)
    unset = get_policy(policy)(_load(), old=old, refine=False, migration_budget=None, **SIZES)
    assert unset.equals(plain)
    assert get_policy(policy)(_load(), old=old, refine=None, **SIZES).equals(plain)


def test_an_option_that_asks_for_a_feature_the_policy_lacks_is_still_refused():
    with pytest.raises(EPLBError, match=r"policy 'topk' does not accept the option refine=True"):
        get_policy("topk")(_load(), refine=True, **SIZES)
    with pytest.raises(EPLBError, match=r"policy 'topk' does not accept the option migration_budget=0.5"):
        get_policy("topk")(_load(), migration_budget=0.5, **SIZES)


def test_a_plugin_without_options_gets_no_unset_options():
    seen = []

    @register_policy("sees_nothing", override=True)
    def sees_nothing(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
        seen.append("called")
        return get_policy("default")(load, num_physical=num_physical, num_ranks=num_ranks)

    try:
        get_policy("sees_nothing")(_load(), refine=False, migration_budget=None, **SIZES)
        assert seen == ["called"]
    finally:
        unregister_policy("sees_nothing")


def test_a_plugin_that_breaks_its_budget_is_caught():
    @register_policy("budget_breaker", options=("migration_budget",), override=True)
    def budget_breaker(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None, migration_budget=None):
        return get_policy("default")(load, num_physical=num_physical, num_ranks=num_ranks)  # ignores old

    try:
        old = get_policy("default")(_load(), **SIZES)
        with pytest.raises(EPLBError, match=r"policy 'budget_breaker' was given migration_budget=0.1 \(at most 1 of "
                                            r"12 slots per layer.*moves \d+ slots in layer \d; a policy that accepts "
                                            r"migration_budget must keep it"):
            get_policy("budget_breaker")(_load().flip(1), old=old, migration_budget=0.1, **SIZES)
    finally:
        unregister_policy("budget_breaker")


# ---------------------------------------------------------------------- sizes and old
@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ({"num_ranks": 4.0}, r"num_ranks \(4.0\) is a float, but it takes an int; pass num_ranks=4"),
        ({"num_physical": 8.0}, r"num_physical \(8.0\) is a float, but it takes an int; pass num_physical=8"),
        ({"num_ranks": True}, r"num_ranks \(True\) is a bool, but it takes an int"),
        ({"num_nodes": 2}, r"num_ranks \(3\) must be a multiple of num_nodes \(2\); .*set num_nodes to a divisor "
                           r"of 3 \(1, 3\)"),
    ],
)
def test_bad_sizes_get_one_clear_error(sizes, match):
    with pytest.raises(EPLBError, match=match):
        get_policy("default")(_load(), **{**SIZES, **sizes})


def test_old_must_be_a_placement():
    old = get_policy("default")(_load(), **SIZES)
    with pytest.raises(EPLBError, match=r"old \(Tensor\) must be the Placement in force or None; wrap a phy2log "
                                        r"tensor with Placement.from_phy2log"):
        get_policy("default")(_load(), old=old.phy2log, **SIZES)


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("config_class", [EPLBConfig, SimConfig])
@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"migration_budget": 0}, r"migration_budget \(0\) must be in \(0, 1\]: the fraction of each layer's slots "
                                  r"that may receive a new expert; pass e.g. migration_budget=0.25, or None"),
        ({"migration_budget": math.nan}, r"migration_budget \(nan\) must be in \(0, 1\]"),
        ({"migration_budget": "x"}, r"migration_budget \('x'\) is not a number; pass a fraction in \(0, 1\]"),
        ({"refine": 2}, r"refine \(2, of type int\) is not a bool; it takes True or False: pass refine=True"),
        ({"refine": "yes"}, r"refine \('yes', of type str\) is not a bool"),
    ],
)
def test_config_option_errors_name_the_field_the_value_the_rule_and_the_fix(config_class, fields, match):
    with pytest.raises(ValidationError, match=match) as info:
        config_class(**fields)
    assert info.value.errors()[0]["loc"] == (next(iter(fields)),)


def test_a_simconfig_refuses_an_option_its_policy_does_not_accept_at_construction():
    with pytest.raises(ValidationError, match=r"policy 'topk' does not accept the option refine=True"):
        SimConfig(policy="topk", refine=True)
    with pytest.raises(ValidationError, match=r"policy 'topk' does not accept the option migration_budget=0.5"):
        SimConfig(policy="topk", migration_budget=0.5)
    assert SimConfig(policy="topk", refine=False, migration_budget=None).refine is False


def test_a_budget_too_small_for_the_model_fails_at_wrap_time():
    model = mm.build_reference_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = EPLBConfig(num_redundant_experts=4, use_async=False, migration_budget=1e-9)
    with pytest.raises(EPLBError, match=r"migration_budget \(1e-09\) lets floor\(.*\) = 0 of the \d+ slots of a "
                                        r"layer change.*pass at least 1/\d+ = "):
        EPLBWrapper(model, config)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched


# ---------------------------------------------------------------------- command line
def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_applies_the_option_flags_to_the_policies_that_accept_them(capsys, tmp_path):
    code, out, err = _run(capsys, "simulate", "example", "--policy", "default", "--policy", "topk",
                          "--migration-budget", "0.5", "--migration-budget", "0.25", "--refine",
                          "--window", "100", "--interval", "100", "--redundant", "8",
                          "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    configs = [run["config"] for run in json.loads((tmp_path / "r.json").read_text())["runs"]]
    options = [(c["policy"], c["migration_budget"], c["refine"]) for c in configs]
    assert options == [("default", 0.5, True), ("default", 0.25, True), ("topk", None, False)]


@pytest.mark.parametrize(("flags", "flag"), [(["--refine"], "--refine"), (["--migration-budget", "0.5"],
                                                                           "--migration-budget")])
def test_simulate_refuses_an_option_flag_no_policy_accepts_naming_the_flag(capsys, flags, flag):
    code, _, err = _run(capsys, "simulate", "example", "--policy", "topk", *flags)
    assert code == 1
    assert err.startswith(f"eplb: error: {flag}: no --policy given accepts it")
    assert f"add --policy default, or drop {flag}" in err


def test_simulate_refuses_a_budget_that_lets_no_slot_move_naming_the_flag(capsys):
    code, _, err = _run(capsys, "simulate", "example", "--migration-budget", "0.01", "--redundant", "8")
    assert code == 1
    assert "--migration-budget 0.01 lets no slot of a layer move" in err
    assert "pass --migration-budget 0.0138889 (1/72) or more" in err
