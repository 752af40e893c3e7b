"""`eplb demo`: end to end on gloo ranks (few steps), its printed claims, the plot, and its errors."""

import os
import re

import pytest

import eplb.demo as demo
from eplb.cli import main

pytestmark = pytest.mark.distributed


def _run(capsys, *argv):
    code = main(["demo", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _number(pattern: str, out: str) -> float:
    match = re.search(pattern, out)
    assert match, f"{pattern!r} not in:\n{out}"
    return float(match.group(1))


def _assert_one_line_error(code, err, status, match):
    assert code == status
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("eplb: error: ") and match in lines[0], lines[0]


def test_async_demo_rebalances_without_changing_outputs_and_writes_the_plot(capsys, tmp_path):
    plot = tmp_path / "demo.png"
    code, out, err = _run(capsys, "--steps", "12", "--plot", str(plot))
    assert code == 0, err
    assert "4 ranks" in out and "async executor" in out
    before = _number(r"balancedness \(.*\): ([\d.]+) before", out)
    after = _number(r"before -> ([\d.]+) after", out)
    assert 0 < before < after <= 1
    assert "rebalances: 1, triggered after step 7: 4 layers" in out
    assert _number(r"\(([\d.]+) MiB\)", out) > 0
    assert _number(r"async: (\d+) steps ran while the weights moved", out) >= 1
    assert "outputs match the unwrapped model: yes (12 steps x 4 ranks checked" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sync_demo_on_two_ranks(capsys, tmp_path):
    code, out, err = _run(capsys, "--sync", "--ranks", "2", "--steps", "8", "--plot", str(tmp_path / "d.png"))
    assert code == 0, err
    assert "sync executor" in out and "async:" not in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("  before", "  after"))]
    assert [r[0] for r in rows] == ["before", "after"]
    assert all(len(r) == 3 + 2 + 1 for r in rows), rows  # name, (steps a-b), 2 ranks, max/mean
    assert _number(r"before -> ([\d.]+) after", out) > _number(r": ([\d.]+) before", out)
    assert "(8 steps x 2 ranks checked" in out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--steps", "x"], "invalid int value: 'x'"),
        (["--steps", "3"], "--steps (3) must be in [8, 10000]"),
        (["--ranks", "1"], "--ranks (1) must be in [2, 8]"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(capsys, argv, match):
    code, out, err = _run(capsys, *argv)
    _assert_one_line_error(code, err, 2, match)
    assert out == ""


def test_a_plot_in_a_missing_folder_fails_before_any_rank_starts(capsys, tmp_path):
    code, out, err = _run(capsys, "--plot", str(tmp_path / "no" / "such" / "demo.png"))
    _assert_one_line_error(code, err, 1, "does not exist")
    assert out == ""


def _raise_on_rank_1(rank, opts, port, messages):
    # Stands in for demo._rank_main in a spawned rank: rank 1 fails, the others hang.
    import time

    if rank == 1:
        try:
            raise RuntimeError("injected failure")
        except RuntimeError as exc:
            messages.put((rank, False, f"{type(exc).__name__}: {exc}"))
        return
    time.sleep(300)


def _die_on_rank_0(rank, opts, port, messages):
    if rank == 0:
        os._exit(3)
    messages.put((rank, True, {}))


def test_a_failing_rank_is_one_line_and_the_others_are_stopped(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "_rank_main", _raise_on_rank_1)
    code, _, err = _run(capsys, "--ranks", "3", "--plot", str(tmp_path / "d.png"))
    _assert_one_line_error(code, err, 1, "rank 1 failed: RuntimeError: injected failure")
    assert not (tmp_path / "d.png").exists()


def test_a_rank_that_dies_without_a_result_is_reported():
    opts = demo._Options(steps=8, ranks=2, sync=False, plot="unused.png", seed=0)
    results, failure = demo._spawn(_die_on_rank_0, opts)
    assert failure == "rank 0 died (exit code 3) without a result"
    assert results[0] is None


def _fake_results(ranks=2):
    phases = {
        "before": {"first": 1, "last": 4, "rank_load": [30.0, 10.0], "balancedness": 0.55, "busiest": 60.0,
                   "mean": 33.0},
        "after": {"first": 6, "last": 8, "rank_load": [21.0, 19.0], "balancedness": 0.8, "busiest": 41.0,
                  "mean": 33.0},
    }
    rebalance = {"layers": 4, "slots_changed": 3, "network_transfers": 2, "local_copies": 1, "bytes_moved": 2**20}
    return [{"phases": phases, "series": [0.5] * 4 + [0.8] * 4, "checks": 8, "max_diff": 0.0, "steps_during": 1,
             "synchronized": False, "rebalance": rebalance, "num_rebalances": 1}] * ranks


def test_the_table_and_the_plot_legend_report_the_same_measure(capsys):
    opts = demo._Options(steps=8, ranks=2, sync=False, plot="unused.png", seed=0)
    results = _fake_results()
    demo._report(opts, results)
    out = capsys.readouterr().out
    assert "mean/max" in out.splitlines()[0] and "max/mean" not in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("  before", "  after"))}
    for row in rows.values():
        loads = [float(v) for v in row[-3:-1]]
        assert float(row[-1]) == pytest.approx(sum(loads) / len(loads) / max(loads), abs=0.005)
    fig = demo._figure(opts, results[0])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"before (mean/max {rows['before'][-1]})", f"after (mean/max {rows['after'][-1]})"]
    assert "balancedness (mean/max rank load of each layer, summed over layers): 0.550 before" in out


def test_a_plot_format_matplotlib_cannot_write_fails_before_any_rank_starts(capsys, tmp_path):
    code, out, err = _run(capsys, "--plot", str(tmp_path / "demo.xyz"))
    _assert_one_line_error(code, err, 1, "cannot write a .xyz")
    assert out == ""
