"""Faults on one process: a Ctrl-C at every line of each state change (it completes or leaves the
old state), bad input that must raise one clear `EPLBError` and change nothing, the placement a
user may edit, and copies of the wrapped model in every state.

The interrupts come from `fault_injection` (tests/): a real ``SIGINT`` at each line the chosen
functions execute.

Legend: L MoE layers, E logical experts, P physical slots, S slots on this rank.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import signal
import threading
import time

import moe_models as mm
import numpy as np
import pytest
import torch
from fault_injection import (
    assert_old_or_new,
    count_lines,
    interrupt_at_every_line,
    interrupt_at_line,
    random_interrupts,
    same_state,
)

from eplb import EPLBConfig, EPLBError, EPLBWrapper, Placement
from eplb.atomic import critical_section
from eplb.cli import main as cli_main
from eplb.executor import AsyncExecutor, SyncExecutor
from eplb.executor.staging import commit_staged
from eplb.moe import EPLBExperts, SwiGLUExperts
from eplb.traces import Trace
from eplb.tracker import LoadTracker

E, D = 8, 16


def _config(**kw) -> EPLBConfig:
    return EPLBConfig(**{"num_redundant_experts": 4, "step_interval": 10_000, "use_async": False, **kw})


def _wrapped(**kw):
    reference = mm.build_reference_model()
    return EPLBWrapper(copy.deepcopy(reference), _config(**kw)), reference


def _outputs_match(wrapper, reference, seeds=(0, 1)) -> None:
    with torch.no_grad():
        for seed in seeds:
            x = mm.hidden_batch(seed)
            torch.testing.assert_close(wrapper(x), reference(x))


def _layer_rows(wrapper) -> torch.Tensor:
    return torch.stack([layer.placement_row() for layer in wrapper.eplb_layers])


def _tracker_snapshot(tracker: LoadTracker):
    return tracker.window_load(), tracker.state_dict()


def _busy_tracker(steps: int = 5) -> LoadTracker:
    tracker = LoadTracker(2, E, 3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for layer in range(2):
            tracker.record(layer, torch.randint(0, E, (6, 2), generator=gen))
        tracker.step()
    tracker.record(0, torch.randint(0, E, (6, 2), generator=gen))
    return tracker


# ------------------------------------------------------------------------------ critical_section
def test_critical_section_defers_sigint_to_its_end():
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with critical_section():
            signal.raise_signal(signal.SIGINT)
            reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_critical_section_redelivers_to_the_handler_in_place_once():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with critical_section():
            with critical_section():  # nested: the outermost one holds the signal
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
            assert calls == []
        assert calls == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with critical_section():
            signal.raise_signal(signal.SIGINT)  # ignored before: ignored after
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_critical_section_does_nothing_off_the_main_thread():
    seen = []

    def work():
        with critical_section():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


def test_exceptions_inside_a_critical_section_propagate_and_restore_the_handler():
    with pytest.raises(RuntimeError, match="boom"):
        with critical_section():
            raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------------------ tracker
def test_tracker_step_is_old_or_new_under_an_interrupt_at_every_line():
    runs = assert_old_or_new([LoadTracker.step], _busy_tracker, LoadTracker.step, _tracker_snapshot, deep=True)
    assert runs >= 3


def test_tracker_record_is_old_or_new_under_an_interrupt_at_every_line():
    ids = torch.tensor([[0, 1], [2, -1], [7, 7]])
    # One put_ is the only change, on the last line: an interrupt always lands before it.
    assert_old_or_new(
        [LoadTracker.record], _busy_tracker, lambda t: t.record(1, ids, num_valid_tokens=2), _tracker_snapshot,
        deep=True, both=False,
    )


def test_tracker_load_state_dict_is_old_or_new_under_an_interrupt_at_every_line():
    saved = _busy_tracker(steps=9).state_dict()
    assert_old_or_new(
        [LoadTracker.load_state_dict], _busy_tracker, lambda t: t.load_state_dict(saved), _tracker_snapshot,
        deep=True,
    )


def test_tracker_window_sum_stays_the_sum_of_the_ring_after_any_interrupted_step():
    def check(tracker, where):
        state = tracker.state_dict()
        assert torch.equal(tracker.window_load(), state["window"].sum(0)), where
        tracker.step()  # and the tracker keeps working
        assert torch.equal(tracker.window_load(), tracker.state_dict()["window"].sum(0)), where

    interrupt_at_every_line([LoadTracker.step], _busy_tracker, LoadTracker.step, check, deep=True)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("position"), r"'position' \(None\) must be an int \[0, 2\]"),
        (lambda s: s.update(position=3), r"'position' \(3\) must be an int"),
        (lambda s: s.update(window=s["window"].float()), r"'window' must be an int64 tensor, got torch.float32"),
        (lambda s: s.update(current=-s["current"] - 1), r"'current' holds a negative count"),
        (lambda s: s.update(steps_recorded=1.5), r"'steps_recorded' \(1.5\) must be an int"),
        (lambda s: s.update(enabled="yes"), r"'enabled' \('yes'\) must be a bool"),
        # Past int64: the window was written before the counter's fill failed (half-applied).
        (lambda s: s.update(steps_recorded=2**63), r"'steps_recorded' \(9223372036854775808\) must be an int \[0, "),
        (lambda s: s.update(out_of_range=2**63), r"'out_of_range' \(9223372036854775808\) must be an int \[0, "),
        (lambda s: s.update(window=s["window"].to("meta")), r"'window' is a meta tensor \(no data\)"),
        (lambda s: s.update(current=s["current"].to_sparse()), r"'current' is a tensor of layout torch.sparse_coo"),
    ],
)
def test_tracker_rejects_a_bad_state_and_changes_nothing(edit, match):
    tracker = _busy_tracker()
    before = _tracker_snapshot(tracker)
    state = _busy_tracker(steps=9).state_dict()
    edit(state)
    with pytest.raises(EPLBError, match=match):
        tracker.load_state_dict(state)
    assert same_state(_tracker_snapshot(tracker), before)


def test_a_window_too_large_for_memory_is_refused_with_the_largest_that_fits():
    with pytest.raises(EPLBError, match=r"window_size \(1000000000000\) \* num_layers \(2\) \* num_logical \(8\)"):
        LoadTracker(2, 8, 10**12)
    model = mm.build_reference_model()
    experts_before = [type(m) for m in model.modules()]
    with pytest.raises(EPLBError, match=r"set window_size to at most 16777216"):
        EPLBWrapper(model, _config(window_size=10**12))
    assert [type(m) for m in model.modules()] == experts_before  # the model was not touched


# ------------------------------------------------------------------------------ layer commit
def _layer() -> tuple[EPLBExperts, dict]:
    torch.manual_seed(0)
    experts = SwiGLUExperts(E, D, 24).eval()
    row = torch.cat([torch.arange(E), torch.tensor([0, 1, 2, 3])])
    layer = EPLBExperts(experts, ("gate_up_proj", "down_proj"), layer_index=0, phy2log=row)
    full = {n: t.detach().clone() for n, t in experts.named_parameters(recurse=False)}
    return layer, full


def _layer_snapshot(layer: EPLBExperts):
    return layer.phy2log.clone(), layer.replica_slots.clone(), layer.logcnt.clone(), {
        n: t.clone() for n, t in layer.slot_tensors().items()
    }


def test_layer_commit_changes_weights_and_maps_together_under_an_interrupt_at_every_line():
    _, full = _layer()
    new_row = torch.tensor([3, 2, 1, 0, 7, 6, 5, 4, 7, 7, 0, 0])
    staged = {n: t[new_row].clone() for n, t in full.items()}

    def commit(layer):
        layer.commit(new_row, slots=torch.arange(layer.slots_per_rank), staged=staged)

    runs = assert_old_or_new(
        [EPLBExperts.commit, EPLBExperts.apply_commit], lambda: _layer()[0], commit, _layer_snapshot
    )
    assert runs >= 5


# ------------------------------------------------------------------------------ wrapper state
def _state_after_rebalance() -> dict:
    wrapper, _ = _wrapped(policy=mm.register_shuffle_policy())
    with torch.no_grad():
        for seed in range(3):
            wrapper(mm.hidden_batch(seed))
    wrapper.rebalance()
    return wrapper.state_dict()


def _wrapper_snapshot(wrapper):
    return wrapper.state_dict() | {"rows": _layer_rows(wrapper)}


def test_wrapper_load_state_dict_is_old_or_new_under_an_interrupt_at_every_line():
    saved = _state_after_rebalance()
    runs = assert_old_or_new(
        [EPLBWrapper.load_state_dict],
        lambda: _wrapped()[0],
        lambda w: w.load_state_dict(saved),
        _wrapper_snapshot,
    )
    assert runs >= 10


def _bad_states(saved: dict):
    def edited(fn):
        state = copy.deepcopy(saved)
        fn(state)
        return state

    yield edited(lambda s: s["slots"][1].pop("down_proj")), r"layer 1: saved slot tensors \['gate_up_proj'\]"
    yield edited(lambda s: s["slots"][1].update(down_proj=s["slots"][1]["down_proj"].double())), (
        r"slot tensor 'down_proj' is .* torch.float64; this model's is .* torch.float32"
    )
    yield edited(lambda s: s["slots"].pop()), r"state has slots of 1 layers; the model has 2"
    yield edited(lambda s: s["tracker"].pop("window")), r"'window' must be an int64 tensor"
    yield edited(lambda s: s.pop("placement")), r"is not an eplb placement"
    yield edited(lambda s: s.update(steps=-1)), r"'steps' \(-1\) must be an int >= 0"
    yield edited(lambda s: s["placement"]["phy2log"][1].__setitem__(0, 99)), r"expert id 99"


def test_wrapper_load_state_dict_rejects_a_bad_state_and_changes_nothing():
    saved = _state_after_rebalance()
    wrapper, reference = _wrapped()
    with torch.no_grad():
        wrapper(mm.hidden_batch(5))
    before = _wrapper_snapshot(wrapper)
    for state, match in _bad_states(saved):
        with pytest.raises(EPLBError, match=match):
            wrapper.load_state_dict(state)
        assert same_state(_wrapper_snapshot(wrapper), before), match
    _outputs_match(wrapper, reference)
    wrapper.load_state_dict(saved)  # the good one still loads
    _outputs_match(wrapper, reference)


def _resettable(wrapper):
    """A setup that puts ``wrapper`` back in its current state (cheaper than wrapping again)."""
    saved = wrapper.state_dict()

    def setup():
        wrapper.load_state_dict(saved)
        return wrapper

    return setup


def test_a_step_is_counted_whole_under_an_interrupt_at_every_line():
    wrapper, _ = _wrapped()
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))

    def snapshot(wrapper):
        return wrapper.steps, wrapper.tracker.state_dict(), wrapper.tracker.window_load()

    assert_old_or_new([EPLBWrapper._on_step], _resettable(wrapper), EPLBWrapper.step, snapshot, deep=True)


def test_an_interrupted_sync_rebalance_leaves_a_placement_that_matches_the_layers():
    """A sync rebalance commits layer by layer: an interrupt may leave some layers moved, but each
    layer is old or new as a whole, the wrapper's placement says which, and balancing goes on."""
    wrapper, reference = _wrapped(policy=mm.register_shuffle_policy())
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))

    def check(wrapper, where):
        assert torch.equal(wrapper.placement.phy2log, _layer_rows(wrapper)), where
        _outputs_match(wrapper, reference, seeds=(1,))
        assert not wrapper.rebalance().skipped, where
        assert torch.equal(wrapper.placement.phy2log, _layer_rows(wrapper)), where

    runs = interrupt_at_every_line(
        [EPLBWrapper._start_rebalance, SyncExecutor.drain, commit_staged, EPLBExperts.apply_commit],
        _resettable(wrapper), EPLBWrapper.rebalance, check,
    )
    assert runs >= 20
    _outputs_match(wrapper, reference, seeds=(2,))


# ------------------------------------------------------------------------------ wrapper.placement
def test_editing_the_placement_a_wrapper_returns_changes_nothing_it_uses():
    policy = mm.register_shuffle_policy()
    wrapper, reference = _wrapped(policy=policy)
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
    wrapper.rebalance()
    placement = wrapper.placement
    assert wrapper.placement is placement  # the same copy until the placement changes
    kept = placement.phy2log.clone()
    placement.phy2log.zero_()  # a user "normalising" in place
    placement.logcnt.div_(2, rounding_mode="floor")
    assert torch.equal(wrapper.placement.phy2log, placement.phy2log)  # the user's copy, edited
    assert torch.equal(_layer_rows(wrapper), kept)  # ... but the layers never read it
    for seed in range(1, 6):
        _outputs_match(wrapper, reference, seeds=(seed,))
        wrapper.rebalance()
        assert torch.equal(wrapper.placement.phy2log, _layer_rows(wrapper))
    _outputs_match(wrapper, reference, seeds=(7,))


def test_an_initial_placement_is_copied_at_wrap_time():
    initial = Placement.initial(2, mm.NUM_EXPERTS, mm.NUM_EXPERTS + 4, 1)
    wrapper = EPLBWrapper(mm.build_reference_model(), _config(), initial_placement=initial)
    initial.phy2log.zero_()
    assert wrapper.placement.phy2log[0, 1] == 1 and torch.equal(wrapper.placement.phy2log, _layer_rows(wrapper))


# ------------------------------------------------------------------------------ copies
def _torch_save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


_COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_save_load,
}


def _in_state(state: str):
    """A wrapped model in ``state``; returns (model, wrapper, reference)."""
    use_async = state.startswith("async")
    wrapper, reference = _wrapped(use_async=use_async, policy="default" if use_async else mm.register_shuffle_policy())
    with torch.no_grad():
        wrapper(mm.hidden_batch(0))
    if state != "fresh":
        wrapper.rebalance()
    if state == "async done":
        wrapper.synchronize()
    if state == "closed":
        wrapper.close()
    if state == "unwrapped":
        wrapper.unwrap()
    return wrapper.module, wrapper, reference


@pytest.mark.parametrize("how", sorted(_COPIES))
def test_a_copy_without_redundant_slots_follows_its_own_commits(how):
    reference = mm.build_reference_model()
    wrapper = EPLBWrapper(
        copy.deepcopy(reference),
        _config(num_redundant_experts=0, use_async=False, policy=mm.register_shuffle_policy()),
    )
    copied = _COPIES[how](wrapper.module)
    (hook,) = copied._forward_hooks.values()
    twin = hook.__self__
    for round_ in range(3):  # the replica lookup reads the copy's own committed table
        with torch.no_grad():
            for seed in (5, 6):
                x = mm.hidden_batch(seed + round_)
                torch.testing.assert_close(copied(x), reference(x))
        assert twin.rebalance().slots_changed > 0
    twin.close()
    wrapper.close()


@pytest.mark.parametrize("how", sorted(_COPIES))
@pytest.mark.parametrize("state", ["fresh", "sync rebalanced", "async done", "async in flight", "closed", "unwrapped"])
def test_the_wrapped_model_copies_in_every_state(state, how):
    model, wrapper, reference = _in_state(state)
    copied = _COPIES[how](model)
    with torch.no_grad():
        for seed in (1, 2):
            x = mm.hidden_batch(seed)
            torch.testing.assert_close(copied(x), reference(x))
    hooks = list(copied._forward_hooks.values())
    if state in ("closed", "unwrapped"):
        assert not hooks
        return
    (hook,) = hooks
    twin = hook.__self__  # the copy's own wrapper: it balances the copy, independently
    assert twin is not wrapper and twin.module is copied and not twin.async_in_flight
    # The copy's tracker records what its forward routes (its views follow its own buffers).
    with torch.no_grad():
        x = mm.hidden_batch(4)
        copied(x)
    tokens = x.reshape(-1, x.shape[-1]).shape[0]
    assert int(twin.tracker.last_step_load().sum()) == tokens * mm.TOP_K * len(twin.eplb_layers)
    assert torch.equal(twin.placement.phy2log, _layer_rows(twin))
    twin.rebalance()
    twin.synchronize()
    with torch.no_grad():
        x = mm.hidden_batch(3)
        torch.testing.assert_close(copied(x), reference(x))
    twin.close()
    wrapper.synchronize()  # the original is untouched by all this
    _outputs_match(wrapper, reference, seeds=(4,))
    wrapper.close()


# ------------------------------------------------------------------------------ one-line errors
def _write(tmp_path, name, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def test_bad_placement_files_raise_one_line_errors(tmp_path):
    good = Placement.initial(2, 4, 6, 2).to_dict()
    cases = [
        (str(tmp_path), r"is a directory"),
        (_write(tmp_path, "binary.json", bytes(range(256))), r"is not a text \(JSON\) file"),
        (_write(tmp_path, "nan.json", json.dumps({**good, "num_logical": float("nan")})), r"NaN is not an expert id"),
        (_write(tmp_path, "nested.json", "[" * 100_000 + "]" * 100_000), r"nested too deeply"),
        (_write(tmp_path, "nested_rows.json", json.dumps({**good, "phy2log": [[[0]] * 6] * 2})), r"must be an int"),
        (_write(tmp_path, "float.json", json.dumps({**good, "phy2log": [[0.9, 1, 2, 3, 0, 1]] * 2})),
         r"phy2log\[0\]\[0\] \(0.9\) must be an int expert id"),
        (_write(tmp_path, "huge.json", json.dumps({**good, "phy2log": [[2**70, 1, 2, 3, 0, 1]] * 2})),
         r"expert id 1180591620717411303424"),
    ]
    for path, match in cases:
        with pytest.raises(EPLBError, match=match) as info:
            Placement.load(path)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("args", "match"),
    [((1, 0, 4, 1), r"num_logical \(0\) must be > 0"), ((1, 4, 4.0, 1), r"num_physical \(4.0\) must be > 0")],
)
def test_placement_initial_rejects_sizes_that_cannot_work(args, match):
    with pytest.raises(EPLBError, match=match):
        Placement.initial(*args)


def test_a_layer_outside_the_placement_is_refused():
    placement = Placement.initial(2, 4, 6, 2)
    with pytest.raises(EPLBError, match=r"layer index \(9\) must be an int in \[-2, 2\)"):
        placement.layer(9)
    assert placement.layer(-1).equals(placement.layer(1))
    with pytest.raises(EPLBError, match=r"layer index \(2\)"):
        placement.replace_layer(2, placement.layer(0))


def test_a_damaged_trace_raises_one_line_errors_in_the_api_and_the_cli(tmp_path, capsys):
    path = tmp_path / "trace.npz"
    Trace(torch.randint(0, 50, (40, 2, 8)), {}).save(path)
    raw = path.read_bytes()
    damaged = tmp_path / "damaged.npz"
    for offset in range(0, len(raw), max(len(raw) // 64, 1)):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x24
        damaged.write_bytes(bytes(flipped))
        try:
            Trace.load(damaged)
        except EPLBError as exc:
            assert "\n" not in str(exc)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(flipped))
    assert cli_main(["simulate", str(damaged)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged" in err and "bug in eplb" not in err


def test_unsigned_counts_beyond_int64_are_refused_not_wrapped():
    loads = np.zeros((3, 2, 4), dtype=np.uint64)
    loads[1, 0, 2] = 2**63 + 5
    for value in (loads, torch.from_numpy(loads)):
        with pytest.raises(EPLBError, match=r"count of 9223372036854775813, beyond int64"):
            Trace(value, {})
    loads[1, 0, 2] = 7
    assert Trace(loads, {}).loads[1, 0, 2].item() == 7


# ------------------------------------------------------------------------------ random-interrupt soak
def test_random_interrupts_while_stepping_async_never_leave_a_wrong_output():
    """Real SIGINTs every 1-5 ms while an async wrapper steps and rebalances (every 3 steps).
    After each interrupt the placement matches the layers, and every completed forward equals the
    unwrapped model. EPLB_SOAK_S sets the duration (default 3 s; run 30 or more by hand)."""
    duration_s = float(os.environ.get("EPLB_SOAK_S", "3"))
    reference = mm.build_reference_model()
    wrapper = EPLBWrapper(
        copy.deepcopy(reference),
        EPLBConfig(num_redundant_experts=4, step_interval=3, window_size=4, async_timeout_s=5.0),
    )
    forwards = interrupts = 0
    deadline = time.monotonic() + duration_s
    with random_interrupts((0.001, 0.005), seed=0) as armed:
        while time.monotonic() < deadline:
            x = mm.hidden_batch(forwards % 7)
            with torch.no_grad():
                expected = reference(x)
            try:
                armed.on()
                with torch.no_grad():
                    out = wrapper(x)
                armed.off()
            except KeyboardInterrupt:
                interrupts += 1
                assert torch.equal(wrapper.placement.phy2log, _layer_rows(wrapper)), f"after interrupt {interrupts}"
                continue
            torch.testing.assert_close(out, expected)
            forwards += 1
    report = wrapper.synchronize()
    _outputs_match(wrapper, reference, seeds=(11,))
    wrapper.close()
    assert interrupts > 10 and forwards > 3, (interrupts, forwards, report)


# ------------------------------------------------------------------------------ async executor
def _async_wrapper_with_load():
    wrapper, reference = _wrapped(use_async=True, policy="default", async_timeout_s=5.0)
    with torch.no_grad():
        for seed in range(3):
            wrapper(mm.hidden_batch(seed))
    return wrapper, reference


def test_beginning_an_async_rebalance_is_atomic_under_an_interrupt_at_every_line():
    """Never a rebalance "in flight" without its worker: after an interrupt anywhere in begin,
    either nothing is in flight or the worker runs, and synchronize() finishes at once."""
    wrapper, reference = _async_wrapper_with_load()

    def setup():
        wrapper.synchronize()
        return wrapper

    def check(wrapper, where):
        executor = wrapper._executor
        if executor.in_flight:
            assert executor._thread is not None and executor._thread.ident is not None, where
        start = time.monotonic()
        wrapper.synchronize()
        assert time.monotonic() - start < 3.0, where
        assert torch.equal(wrapper.placement.phy2log, _layer_rows(wrapper)), where

    runs = interrupt_at_every_line([AsyncExecutor.begin], setup, EPLBWrapper.rebalance, check)
    assert runs >= 10
    _outputs_match(wrapper, reference)
    wrapper.close()


def test_async_commits_are_counted_once_under_an_interrupt_at_every_line():
    """An interrupt between a layer's commit and its count would commit it twice (from a buffer
    already handed back to the worker): every layer is committed once, outputs stay exact."""
    wrapper, reference = _async_wrapper_with_load()
    saved = wrapper.state_dict()

    def setup():
        wrapper.synchronize()
        wrapper.load_state_dict(saved)
        wrapper.rebalance()
        job = wrapper._executor._job
        while not job.planned:
            time.sleep(0.001)
        wrapper.step()  # every rank planned: the worker may move weights now
        while job.total and len(job.staged) < 1:
            time.sleep(0.001)  # the worker staged a layer: the next step commits it
        assert job.total, "the rebalance moves nothing: the test would prove nothing"
        return wrapper

    def check(wrapper, where):
        assert torch.equal(wrapper.placement.phy2log, _layer_rows(wrapper)), where
        report = wrapper.synchronize()
        assert report is None or report.skipped or report.layers >= 1, where
        assert torch.equal(wrapper.placement.phy2log, _layer_rows(wrapper)), where
        _outputs_match(wrapper, reference, seeds=(1,))

    runs = interrupt_at_every_line([AsyncExecutor._advance], setup, EPLBWrapper.step, check)
    assert runs >= 10
    wrapper.close()


# ------------------------------------------------------------------------------ close() cut short
_RECORDED_STEPS = 5


def _recording(path):
    wrapper, _ = _wrapped()
    wrapper.start_recording(path, chunk_steps=2)  # several chunks, and steps still buffered at close
    with torch.no_grad():
        for seed in range(_RECORDED_STEPS):
            wrapper(mm.hidden_batch(seed))
    return wrapper


def _cut_short(tmp_path, method: str, runs: int):
    """For ``runs`` line events spread over ``wrapper.<method>()`` of a recording wrapper (and
    what it calls), call it with a Ctrl-C at that line; yield ``(target, wrapper, path)`` after
    each. Asserts at the end that most targets fired (line counts vary a little between runs)."""
    function = getattr(EPLBWrapper, method)
    total = count_lines([function], lambda: getattr(_recording(tmp_path / "count.npz"), method)(), deep=True)
    cut = 0
    targets = sorted({int(i * total / runs) for i in range(runs)})
    for target in targets:
        path = tmp_path / f"cut_{target}.npz"
        wrapper = _recording(path)
        where = interrupt_at_line([function], target, deep=True)
        try:
            with where:
                getattr(wrapper, method)()
        except KeyboardInterrupt:
            pass
        except (ValueError, AttributeError) as exc:
            # Cut inside zipfile's writer, whose cleanup then fails on its half-written state.
            assert isinstance(exc.__context__, KeyboardInterrupt) or "ZIP" in str(exc) or "zip" in str(exc), exc
        cut += where.fired_at is not None
        yield target, wrapper, path
    assert cut >= len(targets) // 3, (cut, total)


def test_a_ctrl_c_anywhere_in_close_of_a_recording_wrapper_still_writes_the_whole_trace(tmp_path):
    for target, wrapper, path in _cut_short(tmp_path, "close", 60):
        wrapper.close()  # finishes what the interrupt cut short
        assert not wrapper.recording
        trace = Trace.load(path)
        assert trace.loads.shape[0] == _RECORDED_STEPS, (target, trace.loads.shape)
        assert not os.path.exists(str(path) + ".chunks"), target


def test_a_ctrl_c_anywhere_in_stop_recording_ends_the_recording_and_the_next_stop_writes_the_whole_trace(
    tmp_path, caplog
):
    for target, wrapper, path in _cut_short(tmp_path, "stop_recording", 40):
        still = wrapper.recording  # cut before the stop began: the next step is still recorded
        with torch.no_grad():
            wrapper(mm.hidden_batch(99))  # the model keeps running (no step goes to a writer being closed)
        caplog.clear()
        wrapper.stop_recording()  # finishes what the interrupt cut short
        assert "nothing written" not in caplog.text, (target, caplog.text)
        assert not wrapper.recording
        assert Trace.load(path).loads.shape[0] == _RECORDED_STEPS + still, target
        assert not os.path.exists(str(path) + ".chunks"), target
        wrapper.start_recording(tmp_path / f"again_{target}.npz")  # a new recording may start
        wrapper.close()
