"""Faults at each phase of a rebalance, on 2 gloo ranks: a Ctrl-C on one rank in the middle of a
sync rebalance (every layer committed on every rank or on none), rebalance counters that every
rank agrees on, and a peer killed or frozen while planning, at the step (or commit) agreement, in
the transfer of a middle layer, or in a commit.

What tests/distributed/test_faults_ep.py already covers is not repeated here: peers dead or
frozen in the forward (with an async rebalance in flight too), a slow planner, a late transfer,
a forward cut on one rank and the random-interrupt soak.
"""

from __future__ import annotations

import copy
import functools
import os
import signal
import time

import moe_models as mm
import pytest
import torch
import torch.distributed as dist
from fault_injection import count_lines, interrupt_at_line
from fault_steps import time_the_failure, until_it_runs
from harness import spawn_ranks

from eplb import EPLBConfig, EPLBError, EPLBWrapper
from eplb.comm.recovery import ROLL_CALL_S
from eplb.executor import AsyncExecutor, SyncExecutor
from eplb.executor.staging import commit_staged
from eplb.moe import EPLBExperts

pytestmark = pytest.mark.distributed

TIMEOUT_S = 1.0  # async_timeout_s here: every interrupt or lost peer costs the others about this long
MARGIN_S = 3.0  # what a loaded CI machine may add to it


def _wrapped(rank, num_layers=2, **kw):
    reference = mm.build_reference_model(num_layers=num_layers)
    config = EPLBConfig(**{"num_redundant_experts": 4, "step_interval": 10_000, "async_timeout_s": TIMEOUT_S,
                           "min_improvement": 0.0, "policy": mm.register_shuffle_policy(), **kw})
    return EPLBWrapper(copy.deepcopy(reference), config, ep_group=dist.group.WORLD), reference


class _Seeds:
    def __init__(self, rank):
        self.next, self.rank = 0, rank

    def __call__(self):
        self.next += 1
        return self.next * 10 + self.rank


def _forward(wrapper, reference, seed):
    x = mm.hidden_batch(seed, batch=1, length=6)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), reference(x))


def _gathered(obj, world_size) -> list:
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)  # the job's own group: eplb never uses it
    return out


def _layer_rows(wrapper) -> torch.Tensor:
    return torch.stack([layer.placement_row() for layer in wrapper.eplb_layers])


# ------------------------------------------------------------------------------ a Ctrl-C in a sync rebalance
_SYNC_LINES = [EPLBWrapper._start_rebalance, SyncExecutor.drain, SyncExecutor._commit, commit_staged]


def _interrupted_sync_rebalances(rank, world_size, trigger, runs):
    """Rank 0 is interrupted (SIGINT, as Ctrl-C) at ``runs`` line events spread over a sync
    rebalance, started by ``rebalance()`` or by the forward of a trigger step; rank 1 is not. After
    each one both ranks keep calling the model: every layer must hold, on both ranks, its row
    before the rebalance or the planned one (never rank 0's slots on one and rank 1's on the
    other), the ranks agree on the placement and on the rebalance counters, and outputs are exact."""
    interval = 3 if trigger == "step" else 10_000
    wrapper, reference = _wrapped(rank, use_async=False, step_interval=interval)
    seed = _Seeds(rank)
    planned = []
    plan = wrapper._plan

    def recording_plan(*args, **kwargs):
        decision = plan(*args, **kwargs)
        planned.append(decision.new.phy2log.clone() if decision.new is not None else None)
        return decision

    wrapper._plan = recording_plan

    def up_to_the_trigger():
        _forward(wrapper, reference, seed())
        if trigger == "step":
            while wrapper.stats()["steps_to_next_rebalance"] != 1:
                _forward(wrapper, reference, seed())

    def action():
        if trigger == "step":
            _forward(wrapper, reference, seed())
        else:
            wrapper.rebalance()

    up_to_the_trigger()
    total = count_lines(_SYNC_LINES, action)  # one rebalance, uninterrupted, counts the lines
    assert total > runs
    outcomes = []
    for i in range(runs):
        target = (i * (total - 1)) // (runs - 1)  # spread over the rebalance, first and last line included
        up_to_the_trigger()
        old = wrapper.placement.phy2log.clone()
        planned.clear()
        where = interrupt_at_line(_SYNC_LINES, target if rank == 0 else -1)  # rank 1: never
        try:
            with where:
                action()
            outcome = "done"
        except KeyboardInterrupt:
            outcome = "interrupted"
        except EPLBError:
            outcome = "error"
        fired = where.fired_at
        assert rank != 0 or fired is not None, f"line {target} of {total} never ran"
        errors = until_it_runs(lambda: _forward(wrapper, reference, seed()))
        new = _gathered(planned[-1] if planned else None, world_size)[1]  # rank 1 always plans
        rows = wrapper.placement.phy2log
        assert torch.equal(rows, _layer_rows(wrapper)), (fired, outcome)
        for layer in range(rows.shape[0]):
            whole = torch.equal(rows[layer], old[layer]) or (new is not None and torch.equal(rows[layer], new[layer]))
            assert whole, f"layer {layer} is neither old nor new after an interrupt at {fired} ({outcome}, {errors})"
        stats = wrapper.stats()
        mine = (rows.tolist(), stats["num_rebalances"], stats["bytes_moved_total"])
        everyone = _gathered(mine, world_size)
        assert all(m == everyone[0] for m in everyone), f"the ranks differ after an interrupt at {fired}"
        outcomes.append((outcome, not torch.equal(rows, old)))
    report = wrapper.rebalance()  # later rebalances work
    for _ in range(3):
        _forward(wrapper, reference, seed())
    wrapper.close()
    return {"outcomes": outcomes, "last_skipped": report.skipped, "generation": wrapper._health.generation}


@pytest.mark.parametrize(("trigger", "runs"), [("rebalance()", 8), ("step", 3)])
def test_a_ctrl_c_on_one_rank_in_a_sync_rebalance_commits_each_layer_on_every_rank_or_on_none(trigger, runs):
    results = spawn_ranks(_interrupted_sync_rebalances, 2, trigger, runs, timeout=150, grace_s=20)
    assert all(r.ok for r in results), [r.error for r in results]
    interrupted, untouched = results[0].value, results[1].value
    assert not interrupted["last_skipped"] and not untouched["last_skipped"]
    assert interrupted["generation"] == untouched["generation"] >= 1
    seen = {moved for _, moved in interrupted["outcomes"]}
    assert seen == {False, True}, interrupted["outcomes"]  # interrupts before and after commits both ran


# ------------------------------------------------------------------------------ counters every rank agrees on
_FINISH_LINES = [EPLBWrapper._on_step, AsyncExecutor._advance, AsyncExecutor._decided, AsyncExecutor._finish]


def _interrupted_async_finishes(rank, world_size, runs):
    """Rank 0 is interrupted at ``runs`` line events spread over the step that finishes an async
    rebalance (the step agreement, the last commits, the finish and the wrapper's bookkeeping);
    rank 1 is not. After each one both ranks keep calling the model, and `stats()` must give the
    same rebalance counters on both (with the same placement)."""
    # One layer per step: the finishing step commits exactly the last layer (the same lines each time).
    wrapper, reference = _wrapped(rank, use_async=True, async_layers_per_step=1, policy="default")
    seed = _Seeds(rank)
    executor = wrapper._executor

    def last_one_left(job) -> bool:
        return executor._committed == job.total - 1

    def up_to_the_finishing_step():
        """Forwards until every rank has staged every layer and committed all but the last: the
        next step finishes the rebalance."""
        for _ in range(30):
            for _ in range(3):
                _forward(wrapper, reference, seed())
            wrapper.rebalance()
            if not wrapper.async_in_flight:  # a worker of an aborted rebalance is still busy: every rank skipped
                time.sleep(TIMEOUT_S)
                continue
            while True:
                job = executor._job
                if job is None:
                    state = "ended"  # (at the same step on every rank) nothing to move: try again
                elif job.planned and job.go and len(job.staged) == job.total > 0 and last_one_left(job):
                    state = "ready"
                else:
                    state = "moving"
                everyone = _gathered(state, world_size)
                if all(s == "ready" for s in everyone):
                    return
                if "ended" in everyone:
                    break
                _forward(wrapper, reference, seed())
                time.sleep(0.01)
        raise AssertionError("no rebalance that moves weights in 30 tries")

    def finishing_step():
        _forward(wrapper, reference, seed())

    up_to_the_finishing_step()
    total = count_lines(_FINISH_LINES, finishing_step)
    assert not wrapper.async_in_flight and total > runs
    seen = []
    for i in range(runs):
        target = (i * (total - 1)) // (runs - 1)
        up_to_the_finishing_step()
        before = wrapper.stats()["num_rebalances"]
        where = interrupt_at_line(_FINISH_LINES, target if rank == 0 else -1)
        try:
            with where:
                finishing_step()
            outcome = "done"
        except KeyboardInterrupt:
            outcome = "interrupted"
        except EPLBError:
            outcome = "error"
        assert rank != 0 or where.fired_at is not None, f"line {target} of {total} never ran"
        until_it_runs(lambda: _forward(wrapper, reference, seed()))
        wrapper.synchronize()
        stats = wrapper.stats()
        mine = {k: stats[k] for k in ("num_rebalances", "bytes_moved_total", "last_rebalance_skipped",
                                      "last_rebalance_layers")}
        mine["placement"] = wrapper.placement.phy2log.tolist()
        everyone = _gathered(mine, world_size)
        assert everyone[0] == everyone[1], f"the ranks differ after an interrupt at {where.fired_at} ({outcome})"
        assert torch.equal(wrapper.placement.phy2log, _layer_rows(wrapper))
        seen.append((outcome, stats["num_rebalances"] - before))
    wrapper.close()
    return seen


def test_every_rank_counts_the_same_rebalances_after_a_ctrl_c_on_the_step_that_finishes_one():
    results = spawn_ranks(_interrupted_async_finishes, 2, 5, timeout=150, grace_s=20)
    assert all(r.ok for r in results), [r.error for r in results]
    counted = {n for _, n in results[0].value}
    assert counted == {0, 1}, results[0].value  # interrupts before the agreement and deferred past it both ran


# ------------------------------------------------------------------------------ a peer killed or frozen in each phase
PHASES = ["planning", "agreement", "transfer", "commit"]
# What the survivor's error names (3 MoE layers; the fault is on layer 1 in the transfer and commit phases).
_OPERATION = {
    ("async", phase): "the step agreement of an async rebalance" for phase in PHASES
} | {
    ("sync", "planning"): "the weight transfer of layer 0 of a sync rebalance",  # the survivor moved on to it
    ("sync", "agreement"): "the commit agreement of layer 0 of a sync rebalance",
    ("sync", "transfer"): "the weight transfer of layer 1 of a sync rebalance",
    ("sync", "commit"): "the commit agreement of layer 2 of a sync rebalance",  # layer 1 committed, layer 2 staged
}
_ARMED: dict = {}  # this process's fault: {"phase": ..., "signal": ...}, once


def _stop_here(phase: str) -> None:
    """If a fault is armed for ``phase``: SIGKILL or SIGSTOP this process (once)."""
    if _ARMED.get("phase") == phase:
        sig = _ARMED.pop("signal")
        _ARMED.clear()
        os.kill(os.getpid(), sig)


def _install_faults(wrapper, mode: str) -> None:
    """Hooks at each phase of a rebalance that stop this process when armed (`_stop_here`).
    Call it again after a rebuild: the executor's agreement is a new one then."""
    import eplb.executor.async_executor as async_module

    executor = wrapper._executor
    if getattr(wrapper, "_plan", None) is not None and getattr(wrapper._plan, "hook", False):
        if not getattr(executor._agree, "hook", False):  # rebuilt groups: a new agreement
            agree = executor._agree

            def again(flags):
                _stop_here("agreement")
                return agree(flags)

            again.hook = True
            executor._agree = again
        return
    plan = wrapper._plan

    def planning(*args, **kwargs):  # the policy runs here (on the async worker in async mode)
        _stop_here("planning")
        return plan(*args, **kwargs)

    planning.hook = True
    wrapper._plan = planning
    agree = executor._agree

    def agreement(flags):  # async: each step agreement; sync: each layer's commit agreement
        _stop_here("agreement")
        return agree(flags)

    agreement.hook = True
    executor._agree = agreement
    if mode == "sync":
        def transfer(layer, *args):
            if layer.layer_index == 1:
                _stop_here("transfer")
            return SyncExecutor._communicate(executor, layer, *args)

        executor._communicate = transfer
    else:
        communicate = async_module._communicate

        def transfer_async(communicator, max_bytes, layer, *args):  # the worker's, with its job's communicator
            if layer.layer_index == 1:
                _stop_here("transfer")
            return communicate(communicator, max_bytes, layer, *args)

        async_module._communicate = transfer_async
    layer = wrapper.eplb_layers[1]
    apply_commit = layer.apply_commit

    def commit(*args):
        _stop_here("commit")
        return apply_commit(*args)

    layer.apply_commit = commit


def _peer_stops_in_a_phase(rank, world_size, mode, how, phases):
    """For each of ``phases``: rank 1 is killed (SIGKILL) or frozen (SIGSTOP) there in a rebalance;
    rank 0 times its failure. A frozen rank 1 is resumed (SIGCONT) by rank 0 after that; then both
    keep calling the model, and a later rebalance must commit, with exact outputs and one placement."""
    # 3 layers, one committed per step (async): the fault in layer 1 leaves a layer after it.
    kw = {"use_async": False}
    if mode == "async":
        kw = {"use_async": True, "policy": "default", "async_layers_per_step": 1}
    wrapper, reference = _wrapped(rank, num_layers=3, **kw)
    seed = _Seeds(rank)
    for _ in range(4):
        _forward(wrapper, reference, seed())
    saved = wrapper.state_dict()  # every phase rebalances from here: the same plan, which moves every layer
    pids = _gathered(os.getpid(), world_size)
    sig = signal.SIGKILL if how == "killed" else signal.SIGSTOP
    out = []
    for phase in phases:
        wrapper.load_state_dict(saved)
        if rank == 1:
            _install_faults(wrapper, mode)
        if rank == 1 and not (mode == "async" and phase == "agreement"):
            _ARMED.update(phase=phase, signal=sig)

        def rebalance(phase=phase):
            if mode == "sync":
                wrapper.rebalance()
                return
            wrapper.rebalance()
            assert wrapper.async_in_flight, wrapper.stats()["last_rebalance_reason"]
            if rank == 1 and phase == "agreement":
                _ARMED.update(phase=phase, signal=sig)  # the step agreements, not the one that began it
            wrapper.synchronize()

        failure = time_the_failure(rebalance)
        if rank == 0 and how == "frozen":
            os.kill(pids[1], signal.SIGCONT)
        assert not _ARMED, f"the {phase} fault never fired"
        if how == "killed":  # the peer never comes back: nothing to rebuild with
            out.append({"phase": phase, "failure": failure})
            break
        until_it_runs(lambda: _forward(wrapper, reference, seed()))
        reports = []
        for _ in range(5):  # the aborted rebalance's worker may be busy for async_timeout_s: every rank skips
            wrapper.rebalance()
            wrapper.synchronize()
            stats = wrapper.stats()
            reports.append(stats["last_rebalance_reason"])
            if not stats["last_rebalance_skipped"]:
                break
            time.sleep(TIMEOUT_S)
        for _ in range(3):
            _forward(wrapper, reference, seed())
        everyone = _gathered(wrapper.placement.phy2log.tolist(), world_size)
        out.append({"phase": phase, "failure": failure, "committed": not stats["last_rebalance_skipped"],
                    "reports": reports, "same_placement": everyone[0] == everyone[1]})
    wrapper.close()
    return out


def _check_survivor(mode, how, phase, failure):
    where = f"{how} peer, {mode} rebalance, {phase}: {failure}"
    assert failure["message"] is not None, f"the survivor did not fail ({where})"
    assert failure["seconds"] < TIMEOUT_S + ROLL_CALL_S + MARGIN_S, where
    assert _OPERATION[mode, phase] in failure["message"], where
    assert "rank 1 did not answer" in failure["message"], where
    assert failure["chained"], where


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_peer_killed_in_a_phase_of_a_rebalance_makes_the_survivor_raise_within_the_timeout(mode, phase):
    results = spawn_ranks(_peer_stops_in_a_phase, 2, mode, "killed", [phase], timeout=60, grace_s=None)
    assert results[1].exitcode == -signal.SIGKILL, results[1]
    assert results[0].ok, results[0].error
    _check_survivor(mode, "killed", phase, results[0].value[0]["failure"])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_peer_frozen_in_each_phase_of_a_rebalance_then_resumed_leaves_later_rebalances_working(mode):
    """One run per mode goes through every phase in turn (a frozen peer comes back, so the ranks
    carry on): the survivor raises within the timeout, naming the operation and rank 1; after the
    rebuild a rebalance commits on both ranks, outputs are exact and the ranks hold one placement."""
    results = spawn_ranks(_peer_stops_in_a_phase, 2, mode, "frozen", PHASES, timeout=150, grace_s=None)
    assert all(r.ok for r in results), [r.error for r in results]
    survivor, frozen = results[0].value, results[1].value
    assert [p["phase"] for p in survivor] == [p["phase"] for p in frozen] == PHASES
    for mine, peer in zip(survivor, frozen):
        _check_survivor(mode, "frozen", mine["phase"], mine["failure"])
        for r in (mine, peer):
            assert r["committed"] and r["same_placement"], r
        assert mine["reports"] == peer["reports"]


# ------------------------------------------------------------------------------ a Ctrl-C in unwrap()
def _unwrap_once(wrapper):
    """``unwrap()``, where an interrupt at its last line (after it finished) is no failure."""
    try:
        wrapper.unwrap()
    except EPLBError as exc:
        if "already unwrapped; the model is wrapper.module" not in str(exc):
            raise


def _interrupted_unwraps(rank, world_size):
    """Rank 0 is interrupted (SIGINT) at every line of ``unwrap()``; then both ranks call it
    again until it returns. Both must end unwrapped, with the model equal to the unwrapped one. An
    interrupt after the all-gather once left rank 0 unable to unwrap at all: its peer had finished,
    so each call again gathered alone and timed out."""
    def rebalanced_pair():
        wrapper, reference = _wrapped(rank, use_async=False)
        _forward(wrapper, reference, rank)
        assert wrapper.rebalance().slots_changed > 0  # the slots no longer hold the initial layout
        return wrapper, reference

    wrapper, _ = rebalanced_pair()
    total = count_lines([EPLBWrapper.unwrap], wrapper.unwrap)
    outcomes = []
    for target in range(total):
        wrapper, reference = rebalanced_pair()
        where = interrupt_at_line([EPLBWrapper.unwrap], target if rank == 0 else -1)  # rank 1: never
        try:
            with where:
                wrapper.unwrap()
            outcome = "done"
        except KeyboardInterrupt:
            outcome = "interrupted"
        except EPLBError:
            outcome = "error"
        errors = [] if outcome == "done" else until_it_runs(functools.partial(_unwrap_once, wrapper), attempts=4)
        x = mm.hidden_batch(7, batch=1, length=6)
        with torch.no_grad():
            torch.testing.assert_close(wrapper.module(x), reference(x))
        assert not any(isinstance(m, EPLBExperts) for m in wrapper.module.modules())
        outcomes.append((where.fired_at, outcome, len(errors)))
    return outcomes


def test_a_ctrl_c_on_one_rank_anywhere_in_unwrap_leaves_every_rank_able_to_unwrap():
    results = spawn_ranks(_interrupted_unwraps, 2, timeout=240, grace_s=20)
    assert all(r.ok for r in results), [r.error for r in results]
    interrupted = results[0].value
    assert sum(outcome == "interrupted" for _, outcome, _ in interrupted) >= 5, interrupted


# ------------------------------------------------------------------------------ load_state_dict on several ranks
_LOAD_TARGETS = (1, 4, 9, 16, 24, 32, 40, 10**6)  # line events of load_state_dict on rank 1; the last never fires


def _interrupted_loads(rank, world_size):
    """Both ranks load the state they saved before a rebalance, but rank 1 gets a Ctrl-C at one
    line of its ``load_state_dict`` per run (none in the last run). Whatever the line, both ranks
    then hold one placement (the saved one or the rebalanced one), forwards are exact, and a later
    rebalance commits."""
    wrapper, reference = _wrapped(rank, use_async=False)
    seed = _Seeds(rank)
    runs = []
    for target in _LOAD_TARGETS:
        _forward(wrapper, reference, seed())
        saved = wrapper.state_dict()
        wrapper.rebalance()
        moved = wrapper.placement.phy2log.clone()
        where = interrupt_at_line([EPLBWrapper.load_state_dict], target if rank == 1 else -1)
        try:
            with where:
                wrapper.load_state_dict(saved)
            outcome = "loaded"
        except KeyboardInterrupt:
            outcome = "interrupted"
        except EPLBError as exc:
            outcome = "error: " + str(exc)[:160]
        errors = until_it_runs(lambda: _forward(wrapper, reference, seed()))
        held = wrapper.placement.phy2log
        assert torch.equal(held, _layer_rows(wrapper))
        which = "saved" if torch.equal(held, torch.tensor(saved["placement"]["phy2log"])) else (
            "rebalanced" if torch.equal(held, moved) else "other")
        runs.append({"fired_at": where.fired_at, "outcome": outcome, "holds": which, "recoveries": len(errors),
                     "all": _gathered(which, world_size)})
    assert wrapper.rebalance().slots_changed > 0
    _forward(wrapper, reference, seed())
    wrapper.close()
    return runs


def test_a_ctrl_c_on_one_rank_in_load_state_dict_leaves_every_rank_on_one_placement():
    results = spawn_ranks(_interrupted_loads, 2, timeout=240, grace_s=20)
    assert all(r.ok for r in results), [r.error for r in results]
    survivor, interrupted = results[0].value, results[1].value
    for s, i in zip(survivor, interrupted):
        assert s["holds"] in ("saved", "rebalanced") and len(set(s["all"])) == 1, (s, i)
        if i["outcome"] == "interrupted" and s["holds"] == "rebalanced":
            # Rank 1 left before the agreement: rank 0 loaded nothing, and said so.
            assert s["outcome"].startswith("error: ") and "load_state_dict" in s["outcome"], (s, i)
    assert sum(i["outcome"] == "interrupted" for i in interrupted) >= 4, interrupted
    assert survivor[-1]["outcome"] == interrupted[-1]["outcome"] == "loaded"
    assert survivor[-1]["holds"] == "saved"


def _mismatched_loads(rank, world_size):
    """The ranks load states saved at different steps (rank 1's is one rebalance older)."""
    wrapper, reference = _wrapped(rank, use_async=False)
    seed = _Seeds(rank)
    _forward(wrapper, reference, seed())
    older = wrapper.state_dict()
    wrapper.rebalance()
    _forward(wrapper, reference, seed())
    newer = wrapper.state_dict()
    wrapper.rebalance()
    before = wrapper.placement.phy2log.clone()
    try:
        wrapper.load_state_dict(newer if rank == 0 else older)
        message = None
    except EPLBError as exc:
        message = str(exc)
    unchanged = torch.equal(wrapper.placement.phy2log, before) and torch.equal(_layer_rows(wrapper), before)
    _forward(wrapper, reference, seed())
    wrapper.load_state_dict(newer)  # the same state on both: loads
    loaded = torch.equal(wrapper.placement.phy2log, torch.tensor(newer["placement"]["phy2log"]))
    _forward(wrapper, reference, seed())
    wrapper.close()
    return {"message": message, "unchanged": unchanged, "loaded": loaded}


def test_states_saved_at_different_steps_are_refused_on_every_rank_and_nothing_is_loaded():
    results = spawn_ranks(_mismatched_loads, 2, timeout=120, grace_s=20)
    assert all(r.ok for r in results), [r.error for r in results]
    for r in results:
        v = r.value
        assert v["message"] and "different placements or step counts" in v["message"], v
        assert v["unchanged"] and v["loaded"], v


def _load_on_one_rank(rank, world_size, peer):
    """Only rank 0 calls load_state_dict; rank 1 idles (``peer="idle"``) or steps the model once
    (``"forward"``: that forward meets rank 0's agreement and fails). Rank 0 must raise `EPLBError`
    after ``async_timeout_s`` and the roll call, nothing loaded on either rank; later forwards run
    and are exact on both, on one placement."""
    wrapper, reference = _wrapped(rank, use_async=False)
    seed = _Seeds(rank)
    _forward(wrapper, reference, seed())
    saved = wrapper.state_dict()
    wrapper.rebalance()
    moved = wrapper.placement.phy2log.clone()
    failure = None
    if rank == 0:
        failure = time_the_failure(lambda: wrapper.load_state_dict(saved))
    elif peer == "idle":
        time.sleep(TIMEOUT_S + ROLL_CALL_S + 0.5)
    else:  # its forward meets rank 0's agreement: it fails, and the ranks rebuild at their next calls
        failure = time_the_failure(lambda: _forward(wrapper, reference, seed()))
    unchanged = torch.equal(wrapper.placement.phy2log, moved) and torch.equal(_layer_rows(wrapper), moved)
    until_it_runs(lambda: _forward(wrapper, reference, seed()))
    for _ in range(3):
        _forward(wrapper, reference, seed())
    same = len({str(p) for p in _gathered(wrapper.placement.phy2log.tolist(), world_size)}) == 1
    wrapper.close()
    return {"failure": failure, "unchanged": unchanged, "same": same}


@pytest.mark.parametrize("peer", ["idle", "forward"])
def test_load_state_dict_on_one_rank_only_raises_there_and_loads_nothing(peer):
    results = spawn_ranks(_load_on_one_rank, 2, peer, timeout=120, grace_s=20)
    assert all(r.ok for r in results), [r.error for r in results]
    failure = results[0].value["failure"]
    assert failure["message"] and "load_state_dict" in failure["message"] and "nothing was loaded" in failure["message"]
    assert failure["chained"] and failure["seconds"] < TIMEOUT_S + ROLL_CALL_S + MARGIN_S, failure
    assert all(r.value["unchanged"] and r.value["same"] for r in results), [r.value for r in results]


# ------------------------------------------------------------------------------ stop_recording on several ranks
def _interrupted_stop(rank, world_size, folder):
    """Rank 0's stop_recording is cut by a Ctrl-C while its trace file is merged; rank 1's stops.
    Both ranks must stop recording alike (the trace's load all-reduce is a collective): the next
    forwards run on both without an error, and rank 0's next stop writes every recorded step."""
    from eplb.traces import Trace, TraceWriter

    wrapper, reference = _wrapped(rank, use_async=False)
    seed = _Seeds(rank)
    wrapper.start_recording(os.path.join(folder, "run.npz"), chunk_steps=2)
    for _ in range(5):
        _forward(wrapper, reference, seed())
    if rank == 0:
        merge = TraceWriter.close

        def cut_short(writer):
            TraceWriter.close = merge
            raise KeyboardInterrupt

        TraceWriter.close = cut_short
    try:
        wrapper.stop_recording()
        outcome = "stopped"
    except KeyboardInterrupt:
        outcome = "interrupted"
    errors = []
    for _ in range(3):
        try:
            _forward(wrapper, reference, seed())
        except EPLBError as exc:
            errors.append(str(exc))
    wrapper.stop_recording()
    steps = Trace.load(os.path.join(folder, "run.npz")).loads.shape[0] if rank == 0 else None
    wrapper.close()
    return {"outcome": outcome, "errors": errors, "steps": steps}


def test_a_ctrl_c_in_stop_recording_on_one_rank_ends_the_recording_on_every_rank_alike(tmp_path):
    results = spawn_ranks(_interrupted_stop, 2, str(tmp_path), timeout=120, grace_s=20)
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.value["outcome"] for r in results] == ["interrupted", "stopped"]
    assert [r.value["errors"] for r in results] == [[], []]
    assert results[0].value["steps"] == 5
