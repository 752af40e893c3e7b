"""Simulator: rebalance timing and windows, per-step balancedness, moved slots/bytes, outputs."""

import json
import sys

import numpy as np
import pytest
import torch

import eplb.simulate as sim
from eplb.errors import EPLBError
from eplb.metrics import balancedness, rank_loads
from eplb.placement import Placement
from eplb.policies import get_policy, register_policy, unregister_policy
from eplb.simulate import SimConfig, simulate
from eplb.traces import Trace, drift, hot_shift


def _constant(steps, row):
    return Trace(torch.tensor(row, dtype=torch.int64).expand(steps, 1, -1).clone())


@pytest.fixture
def spy_policy():
    """A policy recording what it is called with; it returns the placement built by ``plan``."""
    calls = []

    def spy(load, *, num_physical, num_groups, num_nodes, num_ranks, old=None):
        calls.append((load.clone(), old))
        return spy.plan(load, old)

    spy.plan = lambda load, old: old
    register_policy("spy_sim", override=True)(spy)
    yield spy, calls
    unregister_policy("spy_sim")


def test_a_balanceable_constant_load_is_perfect_after_the_first_rebalance():
    # Experts 0, 1 are hot; the initial placement puts both on rank 0: balancedness 4 / 6.
    trace = _constant(5, [3, 3, 1, 1])
    run = simulate(trace, SimConfig(window_size=2, step_interval=2, num_ranks=2), progress=False).runs[0]
    assert run.balancedness.tolist() == pytest.approx([4 / 6, 4 / 6, 1.0, 1.0, 1.0])
    assert [r.step for r in run.rebalances] == [2, 4]
    first, second = run.rebalances
    assert first.window_balancedness_before == pytest.approx(4 / 6)
    assert first.window_balancedness_after == pytest.approx(1.0)
    assert first.predicted_gain == pytest.approx(1 / 3)
    assert first.slots_moved >= 2 and first.weight_transfers >= 2
    # The same load again: the deterministic policy returns the same placement, nothing moves.
    assert (second.slots_moved, second.weight_transfers, second.predicted_gain) == (0, 0, 0.0)
    assert run.max_load.tolist() == pytest.approx([6, 6, 4, 4, 4])
    assert run.mean_load.tolist() == pytest.approx([4] * 5)


def test_policy_sees_the_window_before_the_rebalance_and_the_placement_in_force(spy_policy):
    spy, calls = spy_policy
    loads = torch.arange(7 * 4, dtype=torch.int64).reshape(7, 1, 4)
    trace = Trace(loads)
    swapped = Placement.from_phy2log(torch.tensor([[2, 3, 0, 1]]), 4)
    spy.plan = lambda load, old: swapped
    run = simulate(trace, SimConfig(policy="spy_sim", window_size=2, step_interval=3, num_ranks=2),
                   progress=False).runs[0]
    assert [r.step for r in run.rebalances] == [3, 6]
    assert torch.equal(calls[0][0], loads[1:3].sum(0).double())  # steps 1, 2 for the rebalance at 3
    assert torch.equal(calls[1][0], loads[4:6].sum(0).double())
    assert calls[0][1].equals(Placement.initial(1, 4, 4, 2))
    assert calls[1][1].equals(swapped)
    assert run.final_placement.equals(swapped)


def test_window_longer_than_the_history_uses_every_step_so_far(spy_policy):
    spy, calls = spy_policy
    loads = torch.arange(5 * 2, dtype=torch.int64).reshape(5, 1, 2)
    simulate(Trace(loads), SimConfig(policy="spy_sim", window_size=100, step_interval=4, num_ranks=1), progress=False)
    assert torch.equal(calls[0][0], loads[:4].sum(0).double())


def test_per_step_numbers_match_the_metrics_with_the_placement_in_force(spy_policy):
    spy, _ = spy_policy
    trace = drift(40, 3, 16, sigma=1.0, drift_sigma=0.3, tokens_per_step=64, top_k=2, seed=0)
    placements = {}
    rng = torch.Generator().manual_seed(0)

    def plan(load, old):
        # randperm(20) % 16 holds every expert, four of them twice.
        phy2log = torch.stack([torch.randperm(20, generator=rng) % 16 for _ in range(3)])
        new = Placement.from_phy2log(phy2log, 16)
        placements[len(placements) + 1] = new
        return new

    spy.plan = plan
    cfg = SimConfig(policy="spy_sim", window_size=7, step_interval=9, num_redundant_experts=4, num_ranks=4)
    run = simulate(trace, cfg, progress=False).runs[0]
    in_force = [Placement.initial(3, 16, 20, 4)] + [placements[i] for i in sorted(placements)]
    for t in range(trace.steps):
        b = balancedness(trace.loads[t], in_force[t // 9], 4)
        assert run.balancedness[t] == pytest.approx(b.aggregate, abs=1e-12)
        assert run.max_load[t] == pytest.approx(b.max_tokens_per_rank)
        assert run.mean_load[t] == pytest.approx(b.avg_tokens_per_rank)
    expected = sum(rank_loads(trace.loads[t], in_force[t // 9], 4) for t in range(trace.steps))
    np.testing.assert_allclose(run.rank_load, expected.numpy())
    np.testing.assert_allclose(run.rank_load_static, rank_loads(trace.total(), in_force[0], 4).numpy())


def test_moved_slots_and_transfers_count_what_changed(spy_policy):
    spy, _ = spy_policy
    # Rank 0 holds slots 0-2, rank 1 slots 3-5. Changed: slot 1 (1 -> 2, 2 is on rank 0: local copy),
    # slot 2 (2 -> 3: network), slot 4 (3 -> 1, 1 is on rank 1: local copy), slot 5 (1 -> 0: network).
    old = Placement.from_phy2log(torch.tensor([[0, 1, 2, 3, 3, 1]]), 4)
    new = Placement.from_phy2log(torch.tensor([[0, 2, 3, 3, 1, 0]]), 4)
    spy.plan = lambda load, o: new
    cfg = SimConfig(policy="spy_sim", window_size=1, step_interval=1, num_redundant_experts=2, num_ranks=2,
                    bytes_per_expert=1000, initial_placement=old)
    rebalance = simulate(_constant(2, [1, 1, 1, 1]), cfg, progress=False).runs[0].rebalances[0]
    assert rebalance.slots_moved == 4
    assert rebalance.weight_transfers == 2
    assert rebalance.bytes_moved == 2000


def test_transfers_equal_new_expert_rank_pairs_on_random_plans():
    trace = hot_shift(60, 4, 16, sigma=1.5, shift_steps=(20, 40), tokens_per_step=64, top_k=2, seed=1)
    run = simulate(trace, SimConfig(window_size=20, step_interval=20, num_redundant_experts=8, num_ranks=4,
                                    bytes_per_expert=7),
                   progress=False).runs[0]
    old = Placement.initial(4, 16, 24, 4)
    new = None
    for r in run.rebalances:
        window = trace.loads[r.step - 20 : r.step].sum(0).double()
        new = get_policy("default")(window, num_physical=24, num_groups=1, num_nodes=1, num_ranks=4, old=old)
        pairs_old = {(l, s // 6, int(e)) for l in range(4) for s, e in enumerate(old.phy2log[l])}
        pairs_new = {(l, s // 6, int(e)) for l in range(4) for s, e in enumerate(new.phy2log[l])}
        assert r.weight_transfers == len(pairs_new - pairs_old)
        assert r.slots_moved == int((old.phy2log != new.phy2log).sum())
        assert r.bytes_moved == 7 * r.weight_transfers
        old = new
    assert run.final_placement.equals(new)


def test_min_improvement_skips_rebalances_that_gain_too_little():
    trace = _constant(6, [1, 1, 1, 1])  # already perfectly balanced: every gain is 0
    runs = simulate(trace, [SimConfig(window_size=2, step_interval=2, num_ranks=2, name="always"),
                            SimConfig(window_size=2, step_interval=2, num_ranks=2, min_improvement=0.01, name="picky")],
                    progress=False)
    assert [r.skipped for r in runs["always"].rebalances] == [False, False]
    assert [r.skipped for r in runs["picky"].rebalances] == [True, True]
    assert all(r.slots_moved == 0 for r in runs["picky"].rebalances)
    assert runs["picky"].final_placement.equals(Placement.initial(1, 4, 4, 2))
    assert runs["picky"].summary()["skipped"] == 2 and runs["picky"].summary()["rebalances"] == 0


def test_interval_beyond_the_trace_keeps_the_initial_placement():
    trace = _constant(4, [3, 3, 1, 1])
    run = simulate(trace, SimConfig(step_interval=4, num_ranks=2), progress=False).runs[0]
    assert run.rebalances == []
    assert run.balancedness.tolist() == pytest.approx([4 / 6] * 4)
    np.testing.assert_allclose(run.rank_load, run.rank_load_static)


def test_initial_placement_from_object_or_file(tmp_path):
    trace = _constant(3, [3, 3, 1, 1])
    good = Placement.from_phy2log(torch.tensor([[0, 2, 1, 3]]), 4)
    good.save(tmp_path / "p.json")
    configs = [SimConfig(step_interval=10, num_ranks=2, initial_placement=good),
               SimConfig(step_interval=10, num_ranks=2, initial_placement=str(tmp_path / "p.json")),
               SimConfig(step_interval=10, num_ranks=2, initial_placement=tmp_path / "p.json", name="path")]
    res = simulate(trace, configs, progress=False)
    for run in res.runs:
        assert run.balancedness.tolist() == pytest.approx([1.0] * 3)
    configs = [run["config"]["initial_placement"] for run in json.loads(res.to_json())["runs"]]
    assert configs == ["<in-memory Placement>", str(tmp_path / "p.json"), str(tmp_path / "p.json")]
    with pytest.raises(EPLBError, match="set num_redundant_experts to 0"):
        simulate(trace, SimConfig(step_interval=10, num_ranks=2, num_redundant_experts=2, initial_placement=good),
                 progress=False)


def test_results_do_not_depend_on_the_step_chunking(monkeypatch):
    trace = drift(50, 2, 8, sigma=1.0, drift_sigma=0.2, tokens_per_step=32, top_k=2, seed=3)
    cfg = SimConfig(window_size=10, step_interval=7, num_redundant_experts=4, num_ranks=4)
    whole = simulate(trace, cfg, progress=False).runs[0]
    monkeypatch.setattr(sim, "_CHUNK_STEPS", 3)
    chunked = simulate(trace, cfg, progress=False).runs[0]
    np.testing.assert_allclose(chunked.balancedness, whole.balancedness)
    np.testing.assert_allclose(chunked.rank_load, whole.rank_load)


def test_idle_steps_count_as_balanced():
    trace = Trace(torch.tensor([[[0, 0]], [[2, 0]]]))
    run = simulate(trace, SimConfig(num_ranks=2), progress=False).runs[0]
    assert run.balancedness.tolist() == [1.0, 0.5]


def test_invalid_configs_are_reported_with_their_name():
    trace = _constant(3, [1, 1, 1, 1])
    with pytest.raises(EPLBError, match=r"config 'default': num_physical \(4\) must be a multiple"):
        simulate(trace, SimConfig(num_ranks=3), progress=False)
    with pytest.raises(EPLBError, match="unknown policy 'nope'"):
        simulate(trace, SimConfig(policy="nope", num_ranks=2), progress=False)
    with pytest.raises(EPLBError, match="num_groups"):
        simulate(trace, SimConfig(num_ranks=2, num_groups=3), progress=False)
    with pytest.raises(EPLBError, match="distinct name"):
        simulate(trace, [SimConfig(num_ranks=2), SimConfig(num_ranks=2)], progress=False)
    with pytest.raises(EPLBError, match="at least one"):
        simulate(trace, [], progress=False)
    with pytest.raises(ValueError):
        SimConfig(window_size=0)
    with pytest.raises(ValueError):
        SimConfig(unknown_field=1)


def test_default_names_show_what_differs():
    trace = _constant(3, [1, 1, 1, 1])
    res = simulate(trace, [SimConfig(num_ranks=2, step_interval=1), SimConfig(num_ranks=2, step_interval=2),
                           SimConfig(num_ranks=4, step_interval=2)], progress=False)
    assert [r.name for r in res.runs] == ["default i=1 g=2", "default i=2 g=2", "default i=2 g=4"]
    with pytest.raises(KeyError, match="runs: default i=1"):
        res["other"]


def test_json_output_has_every_series_and_rebalance(tmp_path):
    trace = _constant(5, [3, 3, 1, 1])
    res = simulate(trace, SimConfig(window_size=2, step_interval=2, num_ranks=2, bytes_per_expert=10), progress=False)
    text = res.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(text) == data
    assert data["format"] == "eplb.simresult" and data["trace"]["steps"] == 5
    (run,) = data["runs"]
    assert run["config"]["step_interval"] == 2
    assert run["balancedness"] == pytest.approx([4 / 6, 4 / 6, 1, 1, 1])
    assert len(run["max_load"]) == len(run["mean_load"]) == 5
    assert [r["step"] for r in run["rebalances"]] == [2, 4]
    assert run["summary"]["rebalances"] == 2
    assert run["summary"]["bytes_moved"] == 10 * sum(r["weight_transfers"] for r in run["rebalances"])


def test_table_has_one_row_per_config():
    trace = _constant(5, [3, 3, 1, 1])
    configs = [SimConfig(window_size=2, step_interval=2, num_ranks=2),
               SimConfig(window_size=2, step_interval=10, num_ranks=2)]
    res = simulate(trace, configs, progress=False)
    lines = res.table().splitlines()
    assert len(lines) == 4 and lines[2].startswith("default i=2") and lines[3].startswith("default i=10")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    trace = _constant(6, [3, 3, 1, 1])
    res = simulate(trace, [SimConfig(window_size=2, step_interval=2, num_ranks=2),
                           SimConfig(step_interval=10, num_ranks=2)], progress=False)
    res.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_only_on_long_replays_and_only_with_tqdm(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    assert sim._progress_bar(10) is None
    trace = _constant(3000, [3, 3, 1, 1])
    run = simulate(trace, SimConfig(window_size=10, step_interval=1000, num_ranks=2), progress=True).runs[0]
    assert "simulate" in capsys.readouterr().err  # the bar went to stderr
    assert [r.step for r in run.rebalances] == [1000, 2000]
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # tqdm not installed
    assert sim._progress_bar(10**6) is None


def test_a_window_without_load_skips_the_rebalance_as_the_wrapper_does(spy_policy):
    spy, calls = spy_policy
    trace = Trace(torch.tensor([[[0, 0]], [[0, 0]], [[5, 1]], [[5, 1]]]))
    run = simulate(trace, SimConfig(policy="spy_sim", window_size=2, step_interval=2, num_ranks=1),
                   progress=False).runs[0]
    (rebalance,) = run.rebalances
    assert rebalance.step == 2 and rebalance.skipped and calls == []


def test_an_initial_placement_file_planned_for_other_ranks_is_refused(tmp_path):
    trace = _constant(3, [3, 3, 1, 1])
    planned = {**Placement.initial(1, 4, 4, 2).to_dict(), "plan": {"num_ranks": 2}}
    (tmp_path / "p.json").write_text(json.dumps(planned))
    config = SimConfig(step_interval=10, num_ranks=4, initial_placement=tmp_path / "p.json")
    with pytest.raises(EPLBError, match=r"p.json' was planned for 2 EP ranks but is used with 4"):
        simulate(trace, config, progress=False)
    assert simulate(trace, config.model_copy(update={"num_ranks": 2}), progress=False).runs


@pytest.mark.parametrize("field", ["window_size", "num_ranks", "min_improvement", "bytes_per_expert"])
def test_sim_config_refuses_a_bool_for_a_number(field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=rf"{field} \(True\) is a bool"):
        SimConfig(**{field: True})
    assert SimConfig(refine=True).refine is True
