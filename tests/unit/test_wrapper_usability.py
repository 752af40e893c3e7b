"""What a user expects of the wrapper beyond correctness: a static placement that never
rebalances, policy failures in sync mode that keep the step's output, a balancedness preview for
another number of ranks on one process, and log lines with one prefix and one unit."""

from __future__ import annotations

import copy
import logging

import moe_models as mm
import pytest
import torch
from pydantic import ValidationError

from eplb import EPLBConfig, EPLBError, EPLBWrapper, Placement, register_policy
from eplb.policies import unregister_policy


def _steps(wrapper, seeds):
    with torch.no_grad():
        return [wrapper(mm.hidden_batch(seed)) for seed in seeds]


# ---------------------------------------------------------------------------- static placement
@pytest.mark.parametrize("config", [EPLBConfig.static(num_redundant_experts=4, use_async=False),
                                    EPLBConfig(num_redundant_experts=4, step_interval=None)],
                         ids=["static()", "step_interval=None"])
def test_a_static_config_never_rebalances_on_its_own(config):
    wrapper = EPLBWrapper(mm.build_reference_model(), config)
    before = wrapper.placement
    _steps(wrapper, range(12))
    stats = wrapper.stats()
    assert stats["num_rebalances"] == 0 and stats["steps_to_next_rebalance"] is None
    assert wrapper.placement.equals(before) and stats["step"] == 12
    assert EPLBConfig.model_validate_json(config.model_dump_json()).step_interval is None
    wrapper.close()


def test_static_refuses_a_step_interval():
    with pytest.raises(EPLBError, match=r"never rebalances; drop step_interval=5"):
        EPLBConfig.static(step_interval=5)


def test_config_and_library_errors_are_both_value_errors():
    with pytest.raises(ValueError) as info:
        EPLBConfig(window_size=0)
    assert isinstance(info.value, ValidationError) and "window_size" in str(info.value)
    assert issubclass(EPLBError, ValueError)


def test_config_messages_use_python_spelling():
    with pytest.raises(ValidationError, match=r"set use_async=False to use 'topk'") as info:
        EPLBConfig(policy="topk")
    assert "=false" not in str(info.value)
    with pytest.raises(ValidationError, match=r"use_async=True cannot use.*set use_async=False"):
        EPLBConfig(communicator="torch_nccl")


# ---------------------------------------------------------------------------- policy failures
@pytest.fixture
def failing_policy():
    name = "test_fails_at_rebalance"

    @register_policy(name)
    def fails(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
        raise RuntimeError("the policy broke")

    yield name
    unregister_policy(name)


def test_a_failing_policy_in_sync_mode_is_logged_and_the_step_output_kept(failing_policy, caplog):
    model = mm.build_reference_model()
    reference = copy.deepcopy(model)
    config = EPLBConfig(num_redundant_experts=4, use_async=False, step_interval=3, policy=failing_policy)
    wrapper = EPLBWrapper(model, config)
    before = wrapper.placement
    with caplog.at_level(logging.ERROR, logger="eplb"):
        outs = _steps(wrapper, range(4))  # step 3 triggers the rebalance
    with torch.no_grad():
        for seed, out in enumerate(outs):
            torch.testing.assert_close(out, reference(mm.hidden_batch(seed)))
    assert "rebalance aborted: policy 'test_fails_at_rebalance' failed at step 3: RuntimeError" in caplog.text
    stats = wrapper.stats()
    assert stats["last_rebalance_skipped"] and "the policy broke" in stats["last_rebalance_reason"]
    assert stats["num_rebalances"] == 0 and wrapper.placement.equals(before)


def test_a_failing_policy_in_sync_mode_raises_with_on_error_raise(failing_policy):
    config = EPLBConfig(num_redundant_experts=4, use_async=False, step_interval=2, policy=failing_policy,
                        async_on_error="raise")
    wrapper = EPLBWrapper(mm.build_reference_model(), config)
    before = wrapper.placement
    _steps(wrapper, [0])
    with pytest.raises(EPLBError, match="failed at step 2: RuntimeError: the policy broke") as info:
        _steps(wrapper, [1])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert wrapper.placement.equals(before)


@pytest.mark.parametrize(
    "signature",
    [
        lambda load, *, num_physical, num_groups, num_nodes, num_ranks: None,
        lambda *, num_physical, num_groups, num_nodes, num_ranks, old=None: None,
    ],
    ids=["no old", "no load"],
)
def test_register_policy_rejects_a_wrong_signature_at_registration(signature):
    with pytest.raises(EPLBError, match=r"a policy takes \(load, \*, num_physical, .*old=None\) and lacks"):
        register_policy("test_wrong_signature")(signature)
    assert "test_wrong_signature" not in __import__("eplb").available_policies()


# ---------------------------------------------------------------------------- preview
def test_stats_previews_balancedness_for_another_number_of_ranks():
    planned = Placement.initial(2, mm.NUM_EXPERTS, mm.NUM_EXPERTS + 4, 4)
    config = EPLBConfig(num_redundant_experts=4, use_async=False, step_interval=None)
    wrapper = EPLBWrapper(mm.build_reference_model(), config, initial_placement=planned)
    _steps(wrapper, range(6))
    assert wrapper.stats()["balancedness"] == 1.0  # one process: always perfectly balanced
    preview = wrapper.stats(num_ranks=4)
    from eplb.metrics import balancedness

    expected = balancedness(wrapper.tracker.window_load(), planned, 4).aggregate
    assert preview["num_ranks"] == 4 and preview["balancedness"] == pytest.approx(expected) and expected < 1
    assert expected <= preview["planned_balancedness"] <= 1
    with pytest.raises(EPLBError, match=r"stats\(num_ranks=5\): the 12 physical slots per layer cannot be split"):
        wrapper.stats(num_ranks=5)


# ---------------------------------------------------------------------------- log lines
def test_log_lines_carry_one_prefix_and_one_unit(caplog):
    config = EPLBConfig(num_redundant_experts=4, use_async=False, step_interval=2, policy=mm.register_shuffle_policy())
    wrapper = EPLBWrapper(mm.build_reference_model(), config)
    async_wrapper = EPLBWrapper(mm.build_reference_model(), EPLBConfig(num_redundant_experts=4, step_interval=2))
    with caplog.at_level(logging.INFO, logger="eplb"):
        _steps(wrapper, range(2))
        _steps(async_wrapper, range(2))
        async_wrapper.synchronize()
        async_wrapper.close()
    lines = [logging.Formatter("%(name)s: %(message)s").format(r) for r in caplog.records]
    done = [line for line in lines if "rebalance done" in line]
    assert len(done) == 2, lines
    assert all(not line.startswith("eplb: eplb") for line in lines), lines
    assert all(" MiB)" in line and "bytes" not in line for line in done), done


# ---------------------------------------------------------------------------- Prometheus
def test_prometheus_exporter_publishes_balancedness_rebalances_and_bytes():
    prometheus_client = pytest.importorskip("prometheus_client")
    from eplb.metrics import PrometheusExporter

    config = EPLBConfig(num_redundant_experts=4, use_async=False, step_interval=3, policy=mm.register_shuffle_policy())
    wrapper = EPLBWrapper(mm.build_reference_model(), config)
    registry = prometheus_client.CollectorRegistry()
    exporter = PrometheusExporter(wrapper, registry=registry, prefix="test_eplb")
    assert registry.get_sample_value("test_eplb_balancedness", {"rank": "0"}) is None  # no snapshot yet
    _steps(wrapper, range(7))  # rebalances after steps 3 and 6
    stats = exporter.update()
    sample = registry.get_sample_value
    assert sample("test_eplb_balancedness", {"rank": "0"}) == stats["balancedness"]
    assert sample("test_eplb_layer_balancedness", {"rank": "0", "layer": "1"}) == stats["balancedness_per_layer"][1]
    assert sample("test_eplb_steps_total", {"rank": "0"}) == 7
    assert sample("test_eplb_rebalances_total", {"rank": "0"}) == 2 == stats["num_rebalances"]
    assert sample("test_eplb_bytes_moved_total", {"rank": "0"}) == stats["bytes_moved_total"]
    assert sample("test_eplb_last_rebalance_seconds", {"rank": "0"}) >= 0
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE test_eplb_rebalances_total counter" in text
    exporter.close()
    assert registry.get_sample_value("test_eplb_balancedness", {"rank": "0"}) is None


def test_prometheus_exporter_without_the_package_says_how_to_install(monkeypatch):
    import sys

    from eplb.metrics import PrometheusExporter

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(EPLBError, match=r"pip install 'eplb\[metrics\]'"):
        PrometheusExporter(object())
