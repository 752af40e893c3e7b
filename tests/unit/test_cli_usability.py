"""The eplb command as a new user meets it: their own policies through --import, output paths and
optional packages checked before any work, and errors that name the flag to change."""

from __future__ import annotations

import sys
import textwrap

import pytest

from eplb.cli import main
from eplb.policies import available_policies, unregister_policy

POLICY_MODULE = textwrap.dedent("""
    import eplb

    @eplb.register_policy("{name}")
    def mine(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
        return eplb.get_policy("default")(load, num_physical=num_physical, num_groups=num_groups,
                                          num_nodes=num_nodes, num_ranks=num_ranks, old=old)
""")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, status, match):
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eplb: error: ") and match in lines[0], err


@pytest.fixture
def policy_module(tmp_path, monkeypatch):
    """A module ``my_policies`` in the working folder registering policy ``mine_cli``."""
    (tmp_path / "my_policies.py").write_text(POLICY_MODULE.format(name="mine_cli"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield "my_policies"
    sys.modules.pop("my_policies", None)
    unregister_policy("mine_cli")


def test_import_makes_a_users_policy_available_to_simulate_and_plan(capsys, policy_module):
    code, out, err = _run(capsys, "simulate", "example", "--import", policy_module, "--policy", "mine_cli",
                          "--policy", "default", "--interval", "100")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[-2:]] == ["mine_cli", "default"]
    code, out, err = _run(capsys, "plan", "example", "--import", policy_module, "--policy", "mine_cli")
    assert code == 0 and "policy 'mine_cli'" in out, err


def test_import_takes_a_python_file_and_is_repeatable(capsys, tmp_path):
    (tmp_path / "a.py").write_text(POLICY_MODULE.format(name="from_file_a"))
    (tmp_path / "b.py").write_text(POLICY_MODULE.format(name="from_file_b"))
    try:
        code, out, err = _run(capsys, "plan", "example", "--import", str(tmp_path / "a.py"), "--import",
                              str(tmp_path / "b.py"), "--policy", "from_file_b")
        assert code == 0, err
        assert {"from_file_a", "from_file_b"} <= set(available_policies())
    finally:
        unregister_policy("from_file_a")
        unregister_policy("from_file_b")


def test_an_error_raised_by_the_users_policy_names_their_code_not_eplb(capsys, tmp_path):
    (tmp_path / "raising.py").write_text(textwrap.dedent("""
        import eplb

        @eplb.register_policy("raises_cli")
        def raises(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
            raise RuntimeError("boom")
    """))
    try:
        code, out, err = _run(capsys, "plan", "example", "--import", str(tmp_path / "raising.py"),
                              "--policy", "raises_cli")
        _one_line_error(code, err, 1, "RuntimeError: boom (raised in your code at ")
        assert "raising.py:6)" in err and "bug in eplb" not in err
    finally:
        unregister_policy("raises_cli")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--import", "no_such_module_xyz"], "--import no_such_module_xyz: ModuleNotFoundError"),
        (["--import", "missing.py"], "--import missing.py: the file does not exist"),
        (["--policy", "mine"], "--policy mine: no such policy (registered: "),
        (["--policy", "default", "--policy", "default"], "--policy default is given twice"),
        (["--ranks", "4", "--ranks", "4"], "--ranks 4 is given twice"),
        (["--plot", "out.xyz"], "--plot out.xyz: cannot write a .xyz; use one of "),
        (["--plot", "no/such/folder/out.png"], "the folder"),
        (["--json", "no/such/folder/out.json"], "--json no/such/folder/out.json: the folder"),
        (["--groups", "5"], "--groups 5 does not divide the trace's 64 experts; pass --groups one of 1, 2, 4"),
    ],
)
def test_simulate_errors_come_before_any_work_and_name_the_flag(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    # A trace that does not exist: any error about it would mean the checks ran too late.
    trace = "example" if "--groups" in argv else "never_read.npz"
    code, out, err = _run(capsys, "simulate", trace, *argv)
    _one_line_error(code, err, 1, match)
    assert out == "" and "bug in eplb" not in err


def test_a_plot_without_matplotlib_fails_before_the_replay(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = _run(capsys, "simulate", "never_read.npz", "--plot", str(tmp_path / "p.png"))
    _one_line_error(code, err, 1, "--plot needs matplotlib; install it with pip install 'eplb[plot]'")


def test_plan_checks_its_output_before_planning(capsys, tmp_path):
    code, _, err = _run(capsys, "plan", "never_read.npz", "-o", str(tmp_path / "no" / "p.json"))
    _one_line_error(code, err, 1, "-o ")
    assert "does not exist; create it" in err


def test_an_initial_placement_that_does_not_fit_names_the_flags(capsys, tmp_path):
    from eplb import Placement

    Placement.initial(4, 64, 72, 8).save(tmp_path / "p72.json")
    code, _, err = _run(capsys, "simulate", "example", "--initial", str(tmp_path / "p72.json"))
    _one_line_error(code, err, 1, "has 72 slots per layer (8 redundant) but --redundant is 0; pass --redundant 8")
    Placement.initial(2, 8, 8, 2).save(tmp_path / "small.json")
    code, _, err = _run(capsys, "simulate", "example", "--initial", str(tmp_path / "small.json"))
    _one_line_error(code, err, 1, "is for 2 layers of 8 experts but the trace has 4 of 64")


def test_an_initial_placement_planned_for_other_ranks_is_refused(capsys, tmp_path):
    path = str(tmp_path / "p4.json")
    code, _, err = _run(capsys, "plan", "example", "--ranks", "4", "-o", path)
    assert code == 0, err
    # 64 slots divide over 8 ranks as well, but this plan spread its experts over 4.
    code, _, err = _run(capsys, "simulate", "example", "--initial", path, "--ranks", "8", "--no-progress")
    _one_line_error(code, err, 1, "was planned for 4 EP ranks but is used with 8")
    assert "use 4 ranks or plan one for 8 (eplb plan --ranks 8" in err
    code, _, err = _run(capsys, "simulate", "example", "--initial", path, "--ranks", "4", "--ranks", "8",
                        "--no-progress")
    _one_line_error(code, err, 1, "was planned for 4 EP ranks but is used with 8")
    code, out, err = _run(capsys, "simulate", "example", "--initial", path, "--ranks", "4", "--no-progress")
    assert code == 0, err
