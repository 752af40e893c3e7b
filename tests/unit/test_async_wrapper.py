"""EPLBWrapper with use_async=True (the default) on one process: forward steps keep running while
the worker plans and stages, outputs equal the unwrapped model after every step, the end state
equals the sync wrapper's, worker errors surface, and no thread outlives the wrapper."""

from __future__ import annotations

import copy
import logging
import threading

import moe_models as mm
import pytest
import torch

from eplb import EPLBConfig, EPLBError, EPLBWrapper


def _async_config(**kw) -> EPLBConfig:
    return EPLBConfig(**{"num_redundant_experts": 4, "step_interval": 10_000, **kw})


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "eplb-async-rebalance"]


def _wrapped_pair(**kw):
    reference = mm.build_reference_model(num_layers=3)
    return EPLBWrapper(copy.deepcopy(reference), _async_config(**kw)), reference


def test_async_is_the_default_and_runs_the_default_policy():
    config = EPLBConfig()
    assert config.use_async and config.policy == "default"
    with pytest.raises(ValueError, match="Async EPLB is only supported with the default policy"):
        EPLBConfig(policy="topk")


def test_steps_run_while_the_rebalance_is_in_flight_and_outputs_never_change():
    wrapper, reference = _wrapped_pair()
    with torch.no_grad():
        for seed in range(3):
            wrapper(mm.hidden_batch(seed))
        old = wrapper.placement
        assert wrapper.rebalance() is None  # async: returns at once
        steps_in_flight = 0
        seed = 100
        while wrapper.async_in_flight:
            x = mm.hidden_batch(seed)
            # Every step sees, per layer, either the old or the new weights with their own maps.
            torch.testing.assert_close(wrapper(x), reference(x))
            wrapper.placement.validate()
            steps_in_flight += 1
            seed += 1
            assert steps_in_flight < 10_000
    report = wrapper.stats()
    assert steps_in_flight >= 1
    assert not wrapper.placement.equals(old), "skewed routing must move experts"
    assert report["num_rebalances"] == 1 and report["last_rebalance_layers"] >= 1
    for layer in wrapper.eplb_layers:
        assert torch.equal(layer.placement_row(), wrapper.placement.phy2log[layer.layer_index])
    with torch.no_grad():
        x = mm.hidden_batch(999)
        torch.testing.assert_close(wrapper(x), reference(x))
    wrapper.close()
    assert not _workers()


def test_async_end_state_equals_sync_from_the_same_load():
    reference = mm.build_reference_model(num_layers=3)
    wrappers = [
        EPLBWrapper(copy.deepcopy(reference), _async_config(use_async=use_async)) for use_async in (True, False)
    ]
    with torch.no_grad():
        for w in wrappers:
            for seed in range(4):
                w(mm.hidden_batch(seed))
            w.rebalance()
        wrappers[0].synchronize()
    a, s = wrappers
    assert a.placement.equals(s.placement)
    for la, ls in zip(a.eplb_layers, s.eplb_layers):
        for name, t in la.slot_tensors().items():
            assert torch.equal(t, ls.slot_tensors()[name])
    for w in wrappers:
        w.close()


def test_step_interval_triggers_async_rebalances_and_commits_one_layer_per_step():
    wrapper, reference = _wrapped_pair(step_interval=4, window_size=4)
    committed_rows = []
    with torch.no_grad():
        for seed in range(20):
            x = mm.hidden_batch(seed)
            torch.testing.assert_close(wrapper(x), reference(x))
            committed_rows.append(wrapper.placement.phy2log.clone())
    wrapper.synchronize()
    assert wrapper.stats()["num_rebalances"] >= 1
    changed_layers = [
        int((a != b).any(dim=1).sum()) for a, b in zip(committed_rows, committed_rows[1:])
    ]
    assert max(changed_layers) == 1, "async_layers_per_step=1 commits at most one layer per step"
    wrapper.close()


@pytest.mark.parametrize("mode", ["log", "raise"])
def test_worker_error_is_never_swallowed(mode, caplog, monkeypatch):
    wrapper, reference = _wrapped_pair(async_on_error=mode)
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
    before = wrapper.placement

    def broken_plan(load, old):
        raise RuntimeError("policy blew up")

    monkeypatch.setattr(wrapper, "_plan", broken_plan)
    wrapper.rebalance()
    with caplog.at_level(logging.ERROR, logger="eplb"), torch.no_grad():
        if mode == "raise":
            with pytest.raises(EPLBError, match=r"(?s)worker on rank 0 failed.*RuntimeError: policy blew up"):
                wrapper.synchronize()
        else:
            wrapper.synchronize()
            assert "policy blew up" in caplog.text
            assert wrapper.stats()["last_rebalance_reason"].startswith("aborted")
    assert wrapper.placement is before or wrapper.placement.equals(before)
    with torch.no_grad():
        x = mm.hidden_batch(5)
        torch.testing.assert_close(wrapper(x), reference(x))
    wrapper.close()
    assert not _workers()


def test_close_stops_an_in_flight_rebalance_and_leaves_valid_layers():
    wrapper, reference = _wrapped_pair()
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
        wrapper.rebalance()
        wrapper(mm.hidden_batch(1))
    wrapper.close()
    assert not _workers()
    for layer in wrapper.eplb_layers:  # each layer wholly old or wholly new
        row = layer.placement_row()
        assert torch.equal(row, wrapper.placement.phy2log[layer.layer_index])
    with torch.no_grad():
        x = mm.hidden_batch(2)
        torch.testing.assert_close(wrapper.module(x), reference(x))


def test_load_state_dict_during_a_rebalance_is_refused():
    wrapper, _ = _wrapped_pair()
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
    state = wrapper.state_dict()
    wrapper.rebalance()
    if wrapper.async_in_flight:
        with pytest.raises(EPLBError, match="synchronize"):
            wrapper.load_state_dict(state)
    wrapper.synchronize()
    wrapper.load_state_dict(state)
    wrapper.close()


def test_interpreter_exit_never_hangs_on_an_in_flight_rebalance(tmp_path):
    import subprocess
    import sys
    import textwrap
    import time
    from pathlib import Path

    script = tmp_path / "exit_mid_rebalance.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import moe_models as mm
        from eplb import EPLBConfig, EPLBWrapper
        wrapper = EPLBWrapper(mm.build_reference_model(), EPLBConfig(num_redundant_experts=4))
        wrapper._executor._transfer = lambda *a: time.sleep(120)   # a transfer that never ends
        with torch.no_grad():
            wrapper(mm.hidden_batch(0))
            wrapper.rebalance()
            wrapper(mm.hidden_batch(1))
        assert wrapper.async_in_flight
        print("exiting with a rebalance in flight")
    """))
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exiting with a rebalance in flight" in result.stdout
    assert time.monotonic() - start < 60
