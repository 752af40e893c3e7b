"""Recording a wrapped model's load: start/stop at run time, a script that never closes still
leaves a complete trace (and the next run works), disabled steps are not recorded, and SGLang's
expert-distribution dumps read as traces."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import moe_models as mm
import pytest
import torch

from eplb import EPLBConfig, EPLBError, EPLBWrapper
from eplb.cli import main
from eplb.moe import EPLBExperts
from eplb.traces import Trace, load_trace

ROOT = Path(__file__).resolve().parents[2]


def _wrapper(**kw) -> EPLBWrapper:
    config = EPLBConfig(num_redundant_experts=4, use_async=False, step_interval=None)
    return EPLBWrapper(mm.build_reference_model(), config, **kw)


def _steps(wrapper, seeds) -> None:
    with torch.no_grad():
        for seed in seeds:
            wrapper(mm.hidden_batch(seed))


def test_a_script_that_never_closes_leaves_a_complete_trace_and_runs_again(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[2])
        import moe_models as mm
        from eplb import EPLBConfig, EPLBWrapper
        wrapper = EPLBWrapper(mm.build_reference_model(), EPLBConfig(use_async=False), record_trace=sys.argv[1])
        with torch.no_grad():
            for seed in range(5):
                wrapper(mm.hidden_batch(seed))
        # no close(): the script just ends
    """)
    path = tmp_path / "run.npz"
    for _ in range(2):  # the second run must not trip over the first one's leftovers
        proc = subprocess.run(
            [sys.executable, "-c", script, str(path), str(ROOT / "tests")], capture_output=True, text=True,
            timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 0, proc.stderr
        assert not (tmp_path / "run.npz.chunks").exists()
        trace = Trace.load(path)
        assert trace.steps == 5 and trace.metadata["source"] == "EPLBWrapper"


def test_start_and_stop_recording_at_run_time(tmp_path):
    wrapper = _wrapper()
    _steps(wrapper, range(2))  # not recorded
    assert not wrapper.recording and wrapper.stop_recording() is None
    wrapper.start_recording(tmp_path / "a.npz")
    assert wrapper.recording
    with pytest.raises(EPLBError, match="already recording to .*a.npz.*stop_recording"):
        wrapper.start_recording(tmp_path / "b.npz")
    _steps(wrapper, range(2, 5))
    trace = wrapper.stop_recording()
    assert trace.steps == 3 and not wrapper.recording
    assert torch.equal(Trace.load(tmp_path / "a.npz").loads, trace.loads)
    # Every recorded step routed 2 x 16 tokens x top-2 pairs per layer.
    assert torch.all(trace.loads.sum(-1) == 64)
    wrapper.start_recording(tmp_path / "b.npz")
    _steps(wrapper, [7])
    wrapper.close()  # finishes the second recording
    assert Trace.load(tmp_path / "b.npz").steps == 1


def test_stop_recording_is_idempotent_and_start_is_strict(tmp_path, caplog):
    wrapper = _wrapper()
    wrapper.start_recording(tmp_path / "a.npz")
    _steps(wrapper, range(2))
    assert wrapper.stop_recording().steps == 2
    written = (tmp_path / "a.npz").read_bytes()
    caplog.clear()
    with caplog.at_level("DEBUG", logger="eplb"):
        assert wrapper.stop_recording() is None  # a second stop: nothing runs, nothing to write
    assert not caplog.records and not wrapper.recording
    _steps(wrapper, [2])
    assert (tmp_path / "a.npz").read_bytes() == written  # neither rewritten nor appended to
    wrapper.start_recording(tmp_path / "b.npz")  # a new recording starts as usual
    with pytest.raises(EPLBError, match="already recording"):
        wrapper.start_recording(tmp_path / "c.npz")
    _steps(wrapper, [3])
    wrapper.close()  # ends the recording
    assert wrapper.stop_recording() is None and Trace.load(tmp_path / "b.npz").steps == 1
    assert not (tmp_path / "c.npz").exists()


def test_stopping_before_any_step_writes_nothing(tmp_path, caplog):
    wrapper = _wrapper()
    wrapper.start_recording(tmp_path / "a.npz")
    with caplog.at_level("WARNING", logger="eplb"):
        assert wrapper.stop_recording() is None
    assert "before any step was recorded" in caplog.text
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "a.npz.chunks").exists()


def test_steps_with_the_tracker_disabled_are_not_recorded(tmp_path):
    wrapper = _wrapper(record_trace=tmp_path / "t.npz")
    _steps(wrapper, [0])
    wrapper.tracker.enabled = False
    _steps(wrapper, [1, 2])
    wrapper.tracker.enabled = True
    _steps(wrapper, [3])
    wrapper.close()
    trace = Trace.load(tmp_path / "t.npz")
    assert trace.steps == 2 and bool((trace.loads.sum(-1) == 64).all())


def test_a_recording_is_a_load_source_for_eplb_plan(tmp_path, capsys):
    wrapper = _wrapper()
    wrapper.start_recording(tmp_path / "rec.npz")
    _steps(wrapper, range(4))
    wrapper.stop_recording()
    code = main(["plan", str(tmp_path / "rec.npz"), "--ranks", "4", "--redundant", "4", "-o",
                 str(tmp_path / "p.json")])
    assert code == 0, capsys.readouterr().err
    wrapper.close()
    again = EPLBWrapper(mm.build_reference_model(), EPLBConfig(num_redundant_experts=4, use_async=False),
                        initial_placement=tmp_path / "p.json")
    assert again.placement.num_physical == mm.NUM_EXPERTS + 4


def test_recording_to_a_folder_is_refused_before_wrapping(tmp_path):
    model = mm.build_reference_model()
    with pytest.raises(EPLBError, match="is a directory"):
        EPLBWrapper(model, EPLBConfig(use_async=False), record_trace=tmp_path)
    assert not any(isinstance(m, EPLBExperts) for m in model.modules())  # the model is untouched


@pytest.mark.parametrize("shape", [(5, 3, 8), (3, 8)])
def test_an_sglang_dump_reads_as_a_trace(tmp_path, shape):
    count = torch.randint(0, 50, shape)
    torch.save({"rank": 0, "logical_count": count}, tmp_path / "expert_distribution_recorder_1.pt")
    trace = load_trace(str(tmp_path / "expert_distribution_recorder_1.pt"))
    assert torch.equal(trace.loads, count if len(shape) == 3 else count[None])
    assert trace.metadata["source"].startswith("sglang:")
    torch.save({"rank": 0}, tmp_path / "other.pt")
    with pytest.raises(EPLBError, match="not an SGLang expert-distribution dump"):
        load_trace(str(tmp_path / "other.pt"))
