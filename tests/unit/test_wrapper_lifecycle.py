"""The lifecycle of an async EPLBWrapper: misuse answered clearly, a failing forward mid-flight,
state round trips and unwrap between rebalances, close, a dropped wrapper and interpreter exit
with a rebalance in flight (no thread outlives the wrapper).
"""

from __future__ import annotations

import copy
import gc
import time
import weakref

import moe_models as mm
import pytest
import torch
from async_helpers import _config, _layer_rows, _steps, _wait_planned, _workers

from eplb import EPLBError, EPLBWrapper


def _wrapped_pair(**kw):
    reference = mm.build_reference_model(num_layers=3)
    return EPLBWrapper(copy.deepcopy(reference), _config(**kw)), reference


# --------------------------------------------------------------------------------------- misuse
def test_lifecycle_misuse_gives_clear_answers():
    reference = mm.build_reference_model()
    wrapper = EPLBWrapper(copy.deepcopy(reference), _config())
    report = wrapper.rebalance()  # right after construction: the window is empty
    assert report.skipped and "no load" in report.reason and not wrapper.async_in_flight
    assert wrapper.synchronize() is None  # nothing in flight
    _steps(wrapper, reference, range(3))
    assert wrapper.rebalance() is None and wrapper.rebalance() is None  # the second finishes the first
    first = wrapper.synchronize()
    assert first is not None and not first.skipped
    assert wrapper.synchronize() is None
    assert wrapper.stats()["num_rebalances"] == 2
    wrapper.close()
    wrapper.close()
    for call in (wrapper.rebalance, wrapper.synchronize, wrapper.step):
        with pytest.raises(EPLBError, match="closed"):
            call()
    with pytest.raises(EPLBError, match="closed"):
        wrapper.load_state_dict(wrapper.state_dict())
    _steps(wrapper, reference, range(3))  # the model keeps running with its placement
    unwrapped = wrapper.unwrap()
    with pytest.raises(EPLBError, match="already unwrapped"):
        wrapper.unwrap()
    assert unwrapped is wrapper.module


def test_an_exception_in_the_forward_while_a_rebalance_is_in_flight_leaves_the_wrapper_consistent():
    reference = mm.build_reference_model(num_layers=3)
    wrapper = EPLBWrapper(copy.deepcopy(reference), _config())
    _steps(wrapper, reference, range(3))
    wrapper.rebalance()

    def explode(module, args, output):
        raise KeyError("boom")

    handle = wrapper.module.blocks[2].register_forward_hook(explode)
    with torch.no_grad():
        for seed in range(4):
            with pytest.raises(KeyError, match="boom"):
                wrapper(mm.hidden_batch(seed))
    handle.remove()
    assert wrapper.steps == 3, "a failed forward is not a step"
    _steps(wrapper, reference, range(10, 14))
    wrapper.synchronize()
    _steps(wrapper, reference, range(20, 22))
    assert wrapper.stats()["num_rebalances"] == 1
    assert torch.equal(_layer_rows(wrapper), wrapper.placement.phy2log)
    wrapper.close()


# ----------------------------------------------------------------------------- state and unwrap
def test_state_round_trip_mid_flight_into_a_fresh_copy_and_unwrap_after_async_rebalances():
    reference = mm.build_module_list_model(num_layers=3)
    config = _config(step_interval=3, window_size=3)
    wrapper = EPLBWrapper(copy.deepcopy(reference), config)
    _steps(wrapper, reference, range(8))
    state = wrapper.state_dict()  # possibly with a rebalance in flight: a mixed, committed placement
    fresh = EPLBWrapper(copy.deepcopy(reference), config)
    fresh.load_state_dict(state)
    assert fresh.placement.equals(wrapper.placement) and fresh.steps == wrapper.steps
    assert torch.equal(_layer_rows(fresh), fresh.placement.phy2log)
    _steps(fresh, reference, range(50, 60))
    fresh.synchronize()
    unwrapped = fresh.unwrap()
    got, want = unwrapped.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [type(m) for m in unwrapped.modules()] == [type(m) for m in reference.modules()]
    wrapper.close()


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


# --------------------------------------------------------------------------------------- ending
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


def test_a_wrapper_dropped_with_a_rebalance_in_flight_frees_the_model_and_its_worker():
    def wrap_and_drop():
        model = mm.build_reference_model()
        wrapper = EPLBWrapper(model, _config(step_interval=2))
        with torch.no_grad():
            for seed in range(2):
                wrapper(mm.hidden_batch(seed))
        assert wrapper.async_in_flight
        _wait_planned(wrapper)
        return weakref.ref(model)

    model_ref = wrap_and_drop()
    deadline = time.monotonic() + 10
    while (model_ref() is not None or _workers()) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert model_ref() is None, "the dropped model is still alive"
    assert not _workers(), "the worker outlived its wrapper"


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

