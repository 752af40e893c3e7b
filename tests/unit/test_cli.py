"""The eplb command: simulate / plan / show / demo, exit codes and one-line errors."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from eplb.cli import main
from eplb.placement import Placement


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, status=1, match=""):
    assert code == status
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("eplb: error: ")
    assert match in lines[0]
    assert "Traceback" not in err


def test_simulate_prints_one_row_per_config_and_writes_json_and_plot(capsys, tmp_path):
    code, out, err = _run(
        capsys, "simulate", "example", "--policy", "default", "--interval", "100", "--interval", "1000",
        "--window", "100", "--redundant", "8", "--bytes-per-expert", "1M", "--no-progress",
        "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
    )
    assert code == 0, err
    assert "trace: example (400 steps, 4 layers, 64 experts)" in out
    rows = [line for line in out.splitlines() if line.startswith("default ")]
    assert [r.split()[1] for r in rows] == ["i=100", "i=1000"]
    data = json.loads((tmp_path / "r.json").read_text())
    assert [len(run["rebalances"]) for run in data["runs"]] == [3, 0]
    assert data["runs"][0]["config"]["bytes_per_expert"] == 10**6
    assert (tmp_path / "r.png").stat().st_size > 0


def test_simulate_compares_policies_on_a_synthetic_spec(capsys):
    spec = "synthetic:lognormal?steps=60&layers=2&experts=16&tokens=64&top_k=2&seed=0"
    code, out, err = _run(capsys, "simulate", spec, "--policy", "default", "--policy", "topk",
                          "--interval", "20", "--window", "20", "--ranks", "4", "--redundant", "4")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[-2:]] == ["default", "topk"]


def test_simulate_compares_migration_budgets_with_refine(capsys, tmp_path):
    code, out, err = _run(capsys, "simulate", "example", "--interval", "100", "--window", "100",
                          "--redundant", "8", "--migration-budget", "0.1", "--migration-budget", "1",
                          "--refine", "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("default ")]
    assert [r.split()[:2] for r in rows] == [["default", "budget=0.1"], ["default", "budget=1"]]
    data = json.loads((tmp_path / "b.json").read_text())
    assert [run["config"]["refine"] for run in data["runs"]] == [True, True]
    moved = [run["summary"]["slots_moved"] for run in data["runs"]]
    assert moved[0] < moved[1]


@pytest.mark.parametrize("value", ["0", "1.5", "x"])
def test_simulate_rejects_a_budget_outside_0_1(capsys, value):
    code, _, err = _run(capsys, "simulate", "example", "--migration-budget", value)
    assert code == 2
    assert "--migration-budget" in err and ("(0, 1]" in err or "fraction" in err)


def test_simulate_rejects_an_option_the_policy_does_not_accept(capsys):
    code, _, err = _run(capsys, "simulate", "example", "--policy", "topk", "--refine")
    assert code == 1
    assert "policy 'topk' does not accept the option refine=True" in err


def test_simulate_notes_when_nothing_rebalances(capsys):
    code, out, _ = _run(capsys, "simulate", "example")
    assert code == 0
    assert "no config rebalances" in out


def test_plan_then_show(capsys, tmp_path):
    path = tmp_path / "placement.json"
    code, out, err = _run(capsys, "plan", "example", "--ranks", "8", "--redundant", "8", "--groups", "8",
                          "--nodes", "2", "-o", str(path))
    assert code == 0, err
    assert "initial placement 0." in out and f"wrote {path}" in out
    placement = Placement.load(path)
    assert (placement.num_layers, placement.num_logical, placement.num_physical) == (4, 64, 72)
    planned = float(out.split("-> planned ")[1].split()[0])

    code, out, err = _run(capsys, "show", str(path), "--trace", "example")
    assert code == 0, err
    assert "4 layers, 64 logical experts, 72 slots per layer (8 redundant)" in out
    assert "planned by policy 'default' on 8 ranks" in out
    assert sum(line.lstrip().startswith("rank ") for line in out.splitlines()) == 4 * 8
    assert f"balancedness {planned:.4f}" in out


def test_show_without_rank_count_lists_replicas_only(capsys, tmp_path):
    Placement.initial(6, 8, 10, 2).save(tmp_path / "p.json")
    code, out, _ = _run(capsys, "show", str(tmp_path / "p.json"))
    assert code == 0
    assert "pass --ranks G" in out and "rank 0" not in out
    assert "per-layer details for 1 of 6 layers" in out
    code, out, _ = _run(capsys, "show", str(tmp_path / "p.json"), "--ranks", "2", "--layer", "5")
    assert code == 0
    assert "layer 5:" in out and "  rank 1: " in out


def test_plan_without_output_does_not_write(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(capsys, "plan", "example")
    assert code == 0 and "not saved" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, status, match",
    [
        ([], 2, "choose a command"),
        (["bogus"], 2, "invalid choice"),
        (["simulate"], 2, "TRACE"),
        (["simulate", "example", "--ranks", "x"], 2, "'x' is not an integer"),
        (["simulate", "example", "--window", "0"], 2, "must be > 0"),
        (["simulate", "example", "--bytes-per-expert", "4Q"], 2, "byte size"),
        (["simulate", "missing.npz"], 1, "trace file 'missing.npz' does not exist"),
        (["simulate", "synthetic:gauss"], 1, "unknown kind 'gauss'"),
        (["simulate", "synthetic:lognormal?steps=x"], 1, "steps='x' must be an integer"),
        (["simulate", "example", "--ranks", "7"], 1,
         "--ranks 7 does not divide the 64 slots per layer (64 experts + --redundant 0); pass --redundant 6 or 13"),
        (["simulate", "example", "--policy", "nope"], 1, "--policy nope: no such policy"),
        (["simulate", "example", "--min-improvement", "2"], 2, "--min-improvement: '2' must be in [0, 1)"),
        (["simulate", "example", "--initial", "missing.json"], 1, "does not exist"),
        (["plan", "example", "--groups", "3"], 1, "--groups 3 does not divide the trace's 64 experts"),
        (["plan", "example", "--nodes", "3"], 1, "--nodes 3 does not divide --ranks 8"),
        (["show", "missing.json"], 1, "placement file 'missing.json' does not exist"),
    ],
)
def test_errors_are_one_line_with_a_nonzero_exit(capsys, tmp_path, monkeypatch, argv, status, match):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, *argv)
    _assert_one_line_error(code, err, status, match)
    assert out == ""


def test_show_errors(capsys, tmp_path):
    Placement.initial(2, 8, 8, 2).save(tmp_path / "p.json")
    code, _, err = _run(capsys, "show", str(tmp_path / "p.json"), "--trace", "example")
    _assert_one_line_error(code, err, 1, "--trace needs the number of ranks")
    code, _, err = _run(capsys, "show", str(tmp_path / "p.json"), "--trace", "example", "--ranks", "2")
    _assert_one_line_error(code, err, 1, "the trace has L=4, E=64 but the placement has L=2, E=8")
    code, _, err = _run(capsys, "show", str(tmp_path / "p.json"), "--ranks", "3")
    _assert_one_line_error(code, err, 1, "--ranks 3 does not divide the placement's 8 slots per layer")
    (tmp_path / "t.json").write_text("{not json")
    code, _, err = _run(capsys, "show", str(tmp_path / "t.json"))
    _assert_one_line_error(code, err, 1, "not valid JSON")


def test_help_and_version_exit_zero(capsys):
    assert main(["--help"]) == 0
    assert "simulate" in capsys.readouterr().out
    assert main(["simulate", "--help"]) == 0
    assert "--min-improvement" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("eplb ")


def test_demo_passes_its_arguments_to_eplb_demo(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("eplb.demo")
    fake.main = lambda args: seen.append(args) or 7
    monkeypatch.setitem(sys.modules, "eplb.demo", fake)
    assert main(["demo", "--ranks", "4", "--help"]) == 7
    assert seen == [["--ranks", "4", "--help"]]


def test_demo_missing_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "eplb.demo", None)  # import eplb.demo now fails
    code, _, err = _run(capsys, "demo")
    _assert_one_line_error(code, err, 1, "eplb.demo is missing")


def test_console_script(tmp_path):
    script = shutil.which("eplb", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the eplb console script is not installed next to this python")
    out = tmp_path / "p.json"
    proc = subprocess.run([script, "plan", "example", "--redundant", "8", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Placement.load(out).num_physical == 72
    proc = subprocess.run([script, "simulate", "synthetic:nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("eplb: error: synthetic spec 'synthetic:nope': unknown kind 'nope'; use one of")
