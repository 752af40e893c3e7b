"""run.sh on a fresh machine, with a stand-in Python that records what it is asked to do: it
says what it does and how long it takes, marks a finished install, repairs an interrupted one,
points to a quick subset of the tests, and leaves nothing marked when a step fails."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for the venv's python: logs its arguments; "pip install" fails when FAIL_ON matches.
VENV_PYTHON = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$*" in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && exit 1 ;; esac
exit 0
"""
# A stand-in for the system python3: "-m venv DIR" creates DIR/bin/python as above.
SYSTEM_PYTHON = """#!/bin/sh
echo "system $*" >> "$CALLS"
mkdir -p "$3/bin" && cp "$STUB" "$3/bin/python" && chmod +x "$3/bin/python"
"""


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def env(tmp_path):
    stub = _script(tmp_path / "venv_python", VENV_PYTHON)
    system = _script(tmp_path / "python3", SYSTEM_PYTHON)
    return {"PATH": os.environ["PATH"], "CALLS": str(tmp_path / "calls"), "STUB": str(stub),
            "PYTHON": str(system), "EPLB_VENV": str(tmp_path / "venv"), "FAIL_ON": ""}


def _run(env, *args):
    proc = subprocess.run(["bash", str(ROOT / "run.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=60)
    calls = Path(env["CALLS"]).read_text().splitlines() if Path(env["CALLS"]).exists() else []
    Path(env["CALLS"]).unlink(missing_ok=True)
    return proc, calls


def test_first_run_says_what_it_does_and_marks_the_install(env):
    proc, calls = _run(env, "setup")
    assert proc.returncode == 0, proc.stderr
    assert "first run: installing into" in proc.stderr and "a few minutes, once" in proc.stderr
    assert proc.stderr.count("done in ") == 4 and "installed in " in proc.stderr
    assert calls[0].startswith("system -m venv") and "install -q torch==2.13.0" in calls[2]
    assert calls[3] == "-m pip install -q -e .[dev]"
    assert (Path(env["EPLB_VENV"]) / ".eplb-install-complete").exists()
    proc, calls = _run(env, "demo", "--steps", "8")  # installed: straight to the demo
    assert proc.returncode == 0 and calls == ["-m eplb.cli demo --steps 8"], (proc.stderr, calls)
    assert "demo finished in " in proc.stderr


def test_an_interrupted_install_is_repaired_on_the_next_run(env):
    _run(env, "setup")
    (Path(env["EPLB_VENV"]) / ".eplb-install-complete").unlink()  # as if killed before the last step
    proc, calls = _run(env, "demo")
    assert proc.returncode == 0, proc.stderr
    assert "was not finished (interrupted?); repairing it" in proc.stderr
    assert any("-e .[dev]" in c for c in calls) and calls[-1] == "-m eplb.cli demo"


def test_a_failed_step_marks_nothing_and_says_how_to_retry(env):
    env["FAIL_ON"] = "torch=="
    proc, calls = _run(env, "demo")
    assert proc.returncode == 1
    assert "failed: installing torch==2.13.0" in proc.stderr and "'bash run.sh demo' retries" in proc.stderr
    assert not (Path(env["EPLB_VENV"]) / ".eplb-install-complete").exists()
    assert not any("eplb.cli" in c for c in calls)


def test_a_changed_torch_spec_updates_the_install(env):
    _run(env, "setup")
    env["TORCH_SPEC"] = "torch==9.9"
    proc, calls = _run(env, "setup")
    assert "is out of date" in proc.stderr and any("torch==9.9" in c for c in calls)


def test_the_test_job_says_how_long_and_how_to_run_a_quick_subset(env):
    _run(env, "setup")
    proc, calls = _run(env, "test")
    assert "about 10 minutes" in proc.stderr and "bash run.sh quick" in proc.stderr
    assert calls == ["-m pytest -q"]
    proc, calls = _run(env, "quick")
    assert calls == ["-m pytest tests/unit -m not distributed and not slow -q"]
    proc, _ = _run(env)
    assert proc.returncode == 2 and "bash run.sh quick" in proc.stderr
