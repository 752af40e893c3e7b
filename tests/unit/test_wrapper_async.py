"""EPLBWrapper with use_async=True (the default) on one process: forward steps keep running while
the worker plans and stages, outputs equal the unwrapped model after every step (generation
included), the end state equals the sync wrapper's, unusual model shapes, skips, logging and
traces, timeouts and worker errors surface, and the counters and staging buffers of a rebalance.

Legend: E logical experts, K top-k.
"""

from __future__ import annotations

import copy
import gc
import logging
import threading
import time
import weakref

import moe_models as mm
import pytest
import torch
from async_helpers import _config, _layer_rows, _steps, _wait_planned, _workers

from eplb import EPLBConfig, EPLBError, EPLBWrapper
from eplb.moe import MoE
from eplb.traces import Trace


def _wrapped_pair(**kw):
    reference = mm.build_reference_model(num_layers=3)
    return EPLBWrapper(copy.deepcopy(reference), _config(**kw)), reference


# ------------------------------------------------------------------------------------ in flight
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
        EPLBWrapper(copy.deepcopy(reference), _config(use_async=use_async)) for use_async in (True, False)
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
    wrapper, reference = _wrapped_pair(step_interval=4, window_size=4, async_layers_per_step=1)
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


def test_by_default_a_step_commits_every_layer_ready_on_every_rank():
    wrapper, reference = _wrapped_pair(window_size=4)
    assert wrapper.eplb_config.async_layers_per_step is None
    _steps(wrapper, reference, range(4))
    old_rows = _layer_rows(wrapper)
    wrapper.rebalance()
    job = wrapper._executor._job
    _wait_planned(wrapper)
    _steps(wrapper, reference, [50])  # every rank planned: transfers may start
    with job.cond:  # the worker stages up to num_buffers (2) layers ahead of the commits
        assert job.cond.wait_for(lambda: len(job.staged) >= min(2, job.total), timeout=30)
        ready = len(job.staged)
    old_rows = _layer_rows(wrapper)
    _steps(wrapper, reference, [51])
    changed = int((_layer_rows(wrapper) != old_rows).any(dim=1).sum())
    assert ready >= 2 and changed == ready, f"{ready} layers were ready, {changed} committed in one step"
    wrapper.synchronize()
    _steps(wrapper, reference, [52])
    wrapper.close()


# ----------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_generate_with_async_rebalances_in_flight_gives_the_unwrapped_tokens(name):
    import transformers

    transformers.logging.set_verbosity_error()
    reference = mm.build_transformers(name)
    wrapper = EPLBWrapper(copy.deepcopy(reference), EPLBConfig(num_redundant_experts=4, step_interval=3,
                                                                window_size=3))
    assert wrapper.eplb_config.use_async
    ids = mm.token_batch(0, batch=2, length=5)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
    initial = wrapper.placement
    placements_seen = []
    wrapper.module.register_forward_hook(lambda *_: placements_seen.append(wrapper.placement))
    with torch.no_grad():
        wrapper(ids)
        wrapper.rebalance()
        _wait_planned(wrapper)  # commits then land during the generation below
        expected = reference.generate(ids, **kw)
        got = wrapper.generate(ids, **kw)
    assert torch.equal(got, expected)
    assert wrapper.steps == 1 + 24
    assert any(not p.equals(initial) for p in placements_seen), "no commit landed during generation"
    wrapper.synchronize()
    assert wrapper.stats()["num_rebalances"] >= 1
    assert torch.equal(_layer_rows(wrapper), wrapper.placement.phy2log)
    unwrapped = wrapper.unwrap()
    got_state, want_state = unwrapped.state_dict(), reference.state_dict()
    assert got_state.keys() == want_state.keys()
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    assert not _workers()


# --------------------------------------------------------------------------------- model shapes
@pytest.mark.parametrize(
    "num_layers, top_k, redundant, dtype",
    [(1, 2, 4, None), (2, 8, 4, None), (2, 2, 24, None), (3, 2, 4, torch.bfloat16)],
    ids=["one-layer", "top_k=E", "redundant=3E", "bf16"],
)
def test_async_rebalances_keep_outputs_for_unusual_shapes(num_layers, top_k, redundant, dtype):
    reference = mm.build_reference_model(num_layers=num_layers, top_k=top_k, dtype=dtype)
    wrapper = EPLBWrapper(
        copy.deepcopy(reference), _config(num_redundant_experts=redundant, step_interval=3, window_size=3)
    )
    _steps(wrapper, reference, range(15), dtype=dtype)
    wrapper.synchronize()
    _steps(wrapper, reference, range(90, 92), dtype=dtype)
    assert wrapper.stats()["num_rebalances"] >= 1
    assert int(wrapper.placement.logcnt.max()) > 1
    assert torch.equal(_layer_rows(wrapper), wrapper.placement.phy2log)
    wrapper.close()


def test_layers_with_different_expert_sizes_rebalance_async():
    # Three distinct slot shapes: more than the executor's two staging buffers.
    torch.manual_seed(0)
    reference = mm.ResidualStack([MoE(mm.HIDDEN, inner, 8, 2) for inner in (48, 16, 64)]).eval()
    mm._skew_gates(reference, 0)
    wrapper = EPLBWrapper(copy.deepcopy(reference), _config(step_interval=3, window_size=3))
    _steps(wrapper, reference, range(15))
    wrapper.synchronize()
    _steps(wrapper, reference, range(90, 92))
    assert wrapper.stats()["num_rebalances"] >= 1
    wrapper.close()


def test_layers_with_different_expert_counts_are_refused_and_the_model_untouched():
    model = mm.ResidualStack([MoE(mm.HIDDEN, 48, 8, 2), MoE(mm.HIDDEN, 48, 4, 2)]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EPLBError, match=r"different numbers of experts.*blocks\.1\.experts: 4"):
        EPLBWrapper(model, _config())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not _workers()


# ---------------------------------------------------------------------- skip, logging and trace
def test_min_improvement_skips_async_rebalances():
    # One rank: every placement is perfectly balanced across ranks, so the predicted gain is 0.
    reference = mm.build_reference_model()
    wrapper = EPLBWrapper(copy.deepcopy(reference), _config(min_improvement=0.5, step_interval=3))
    initial = wrapper.placement
    _steps(wrapper, reference, range(10))
    wrapper.synchronize()
    stats = wrapper.stats()
    assert stats["num_rebalances"] == 0 and stats["last_rebalance_skipped"]
    assert "min_improvement" in stats["last_rebalance_reason"]
    assert stats["last_predicted_gain"] == 0.0
    assert wrapper.placement.equals(initial) and torch.equal(_layer_rows(wrapper), initial.phy2log)
    wrapper.close()


def test_balancedness_log_and_trace_record_every_step_with_async(tmp_path, caplog):
    reference = mm.build_reference_model()
    path = tmp_path / "trace.npz"
    wrapper = EPLBWrapper(
        copy.deepcopy(reference),
        _config(step_interval=3, window_size=3, log_balancedness=True, log_balancedness_interval=2),
        record_trace=path,
    )
    with caplog.at_level(logging.INFO, logger="eplb"):
        _steps(wrapper, reference, range(7))
        wrapper.synchronize()
    wrapper.close()
    wrapper.close()  # idempotent
    trace = Trace.load(path)
    assert trace.steps == 7
    # hidden_batch: 2 x 16 tokens, top-2: every step routes 64 pairs in every layer.
    assert torch.all(torch.as_tensor(trace.loads).sum(-1) == 64)
    assert sum("balancedness" in r.getMessage() for r in caplog.records) >= 3


# ------------------------------------------------------------------- worker errors and timeouts
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


def test_a_pause_longer_than_the_timeout_before_synchronize_does_not_abort_the_rebalance():
    """The stall clock measures the worker, not the time the user spends away from the steps."""
    reference = mm.build_reference_model(num_layers=3)
    wrapper = EPLBWrapper(copy.deepcopy(reference), _config(async_timeout_s=0.3))
    _steps(wrapper, reference, range(3))
    old = wrapper.placement
    wrapper.rebalance()
    time.sleep(0.6)  # evaluation, checkpointing, an idle server...
    report = wrapper.synchronize()
    assert not report.skipped, report.reason
    assert report.layers == 3 and not wrapper.placement.equals(old)
    _steps(wrapper, reference, range(3, 5))
    wrapper.close()


def test_a_pause_longer_than_the_timeout_before_a_skipped_rebalance_reports_the_skip():
    reference = mm.build_reference_model()
    wrapper = EPLBWrapper(copy.deepcopy(reference), _config(async_timeout_s=0.3, min_improvement=0.5))
    _steps(wrapper, reference, range(3))
    wrapper.rebalance()
    time.sleep(0.6)
    _steps(wrapper, reference, range(3, 5))
    assert not wrapper.async_in_flight
    assert "min_improvement" in wrapper.stats()["last_rebalance_reason"]
    wrapper.close()


def test_a_worker_that_makes_no_progress_still_times_out():
    reference = mm.build_reference_model(num_layers=3)
    wrapper = EPLBWrapper(copy.deepcopy(reference), _config(async_timeout_s=0.3))
    release = threading.Event()
    wrapper._executor._transfer = lambda *a: release.wait(30)  # a transfer that hangs
    _steps(wrapper, reference, range(3))
    old = wrapper.placement
    wrapper.rebalance()
    report = wrapper.synchronize()
    assert report.skipped and "async_timeout_s" in report.reason
    assert wrapper.placement.equals(old) and torch.equal(_layer_rows(wrapper), old.phy2log)
    release.set()
    wrapper.close()
    assert not _workers()


def test_a_failed_synchronize_keeps_the_placement_in_step_with_the_committed_layers():
    """on_error="raise": layers committed inside synchronize() before the worker failed must be
    reflected in ``placement`` (state_dict saves it next to the slot weights)."""
    reference = mm.build_reference_model(num_layers=3)
    config = _config(async_on_error="raise")
    wrapper = EPLBWrapper(copy.deepcopy(reference), config)
    executor = wrapper._executor
    transfer = executor._transfer

    def fail_on_layer_1(layer, plan, slot_tensors, staging):
        if layer.layer_index == 1:
            job = executor._job
            deadline = time.monotonic() + 30
            while executor._committed < 1 and not job.abort and time.monotonic() < deadline:
                time.sleep(0.001)  # fail only once layer 0 is committed
            raise RuntimeError("link down")
        return transfer(layer, plan, slot_tensors, staging)

    executor._transfer = fail_on_layer_1
    _steps(wrapper, reference, range(3))
    initial = wrapper.placement
    wrapper.rebalance()
    with pytest.raises(EPLBError, match="link down"):
        wrapper.synchronize()
    rows = _layer_rows(wrapper)
    assert not torch.equal(rows[0], initial.phy2log[0]), "layer 0 was committed before the failure"
    assert torch.equal(rows[1:], initial.phy2log[1:])
    assert torch.equal(rows, wrapper.placement.phy2log)
    fresh = EPLBWrapper(copy.deepcopy(reference), config)
    fresh.load_state_dict(wrapper.state_dict())
    _steps(fresh, reference, range(10, 12))
    wrapper.close()
    fresh.close()


# ----------------------------------------------------------------- counters and staging buffers
def test_steps_in_flight_counts_forward_steps_not_synchronize_polls():
    reference = mm.build_reference_model(num_layers=3)
    wrapper = EPLBWrapper(copy.deepcopy(reference), _config())
    _steps(wrapper, reference, range(3))
    wrapper.rebalance()
    _steps(wrapper, reference, range(3, 4))
    wrapper.synchronize()
    assert wrapper._executor.steps_in_flight == 1
    wrapper.close()


def test_a_finished_rebalance_releases_its_staging_buffers():
    reference = mm.build_reference_model(num_layers=3)
    wrapper = EPLBWrapper(copy.deepcopy(reference), _config())
    _steps(wrapper, reference, range(3))
    wrapper.rebalance()
    job = weakref.ref(wrapper._executor._job)
    wrapper.synchronize()
    gc.collect()
    assert job() is None, "the finished job (and its staging buffers) is still referenced"
    wrapper.close()

