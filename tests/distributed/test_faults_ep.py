"""Faults with several gloo ranks: wrap-time failures that every rank raises together, and copies
of a model wrapped over several ranks refused with a clear `EPLBError`."""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import moe_models as mm
import pytest
import torch
import torch.distributed as dist
from fault_injection import random_interrupts
from fault_steps import recovered, time_the_failure, until_it_runs
from harness import spawn_ranks

from eplb import EPLBConfig, EPLBError, EPLBWrapper
from eplb.comm.base import bound_group_timeout
from eplb.comm.recovery import ROLL_CALL_S

pytestmark = pytest.mark.distributed


def _config(**kw) -> EPLBConfig:
    return EPLBConfig(**{"num_redundant_experts": 4, "step_interval": 10_000, "async_timeout_s": 5.0, **kw})


def _wrap_with_leftover_chunks(rank, world_size, folder):
    path = os.path.join(folder, "run.npz")
    if rank == 0:
        os.makedirs(path + ".chunks", exist_ok=True)  # an interrupted recording left this
    dist.barrier()
    try:
        EPLBWrapper(mm.build_reference_model(), _config(), ep_group=dist.group.WORLD, record_trace=path)
    except EPLBError as exc:
        return str(exc)
    return "wrapped"


def test_a_wrap_time_failure_on_one_rank_raises_on_every_rank(tmp_path):
    results = spawn_ranks(_wrap_with_leftover_chunks, 2, str(tmp_path), timeout=60)
    assert all(r.ok for r in results), [r.error for r in results]
    own, peer = results[0].value, results[1].value
    assert "already exists (an interrupted recording?)" in own
    assert peer.startswith("rank 0 failed:") and "already exists" in peer


def _copy_refused(rank, world_size):
    wrapper = EPLBWrapper(mm.build_reference_model(), _config(), ep_group=dist.group.WORLD)
    messages = []
    for how in (copy.deepcopy, pickle.dumps):
        for obj in (wrapper.module, wrapper):
            try:
                how(obj)
            except EPLBError as exc:
                messages.append(str(exc))
    wrapper.close()
    return messages


def test_copying_a_model_wrapped_over_several_ranks_is_refused_with_the_way_out():
    results = spawn_ranks(_copy_refused, 2, timeout=60)
    assert all(r.ok for r in results), [r.error for r in results]
    for r in results:
        assert len(r.value) == 4
        assert all("over 2 expert-parallel ranks cannot be copied" in m and "unwrap()" in m for m in r.value)


# ------------------------------------------------------------------------------ dead, frozen, slow peers
TIMEOUT_S = 2.0  # async_timeout_s of these tests: small, so the suite stays fast
MARGIN_S = 3.0  # what a loaded CI machine may add to it


def _wrapped_pair(rank, **kw):
    reference = mm.build_reference_model()
    config = _config(async_timeout_s=TIMEOUT_S, **kw)
    wrapper = EPLBWrapper(copy.deepcopy(reference), config, ep_group=dist.group.WORLD)
    return wrapper, reference


def _forward(wrapper, reference, seed, rank):
    x = mm.hidden_batch(seed * 10 + rank, batch=1, length=6)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), reference(x))


def _peer_gone_in_the_forward(rank, world_size, how):
    """Rank 1 is killed or frozen at step 3; every other rank times its forward's failure."""
    mid_rebalance = how.endswith("mid-rebalance")
    token_dispatch = {"dispatcher": "fixed_capacity", "max_tokens_per_rank": 8} if "fixed" in how else {}
    wrapper, reference = _wrapped_pair(rank, use_async=mid_rebalance, **token_dispatch)
    _forward(wrapper, reference, 0, rank)
    if mid_rebalance:
        wrapper.rebalance()  # async: the workers plan, then move weights after the next step
    _forward(wrapper, reference, 1, rank)
    pids: list = [None] * world_size
    dist.all_gather_object(pids, os.getpid())
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL if how.startswith("killed") else signal.SIGSTOP)
        # (frozen) resumed by rank 0: its own forward now fails as well, within the timeout
        return time_the_failure(lambda: _forward(wrapper, reference, 5, rank))
    failure = time_the_failure(lambda: _forward(wrapper, reference, 5, rank))
    if how.startswith("frozen") and rank == 0:
        os.kill(pids[1], signal.SIGCONT)
    return failure


_GONE = ["killed", "frozen", "killed mid-rebalance", "frozen mid-rebalance"]


@pytest.mark.parametrize(
    ("how", "world_size"),
    [(how, 2) for how in [*_GONE, "killed, fixed-capacity dispatch"]] + [(how, 4) for how in _GONE],
)
def test_a_peer_dead_or_frozen_in_the_forward_raises_an_eplb_error_within_the_timeout(how, world_size):
    results = spawn_ranks(_peer_gone_in_the_forward, world_size, how, timeout=90, grace_s=None)
    for survivor in (r for r in results if r.rank != 1):
        assert survivor.ok, survivor.error
        failure = survivor.value
        assert failure["message"] is not None, f"the forward of rank {survivor.rank} did not fail"
        # The roll call that names the rank gone adds at most ROLL_CALL_S.
        assert failure["seconds"] < TIMEOUT_S + MARGIN_S + ROLL_CALL_S, (survivor.rank, failure)
        assert "step 3" in failure["message"] and "all-to-all" in failure["message"], failure["message"]
        # Rank 0 resumes a frozen rank 1 only after its own roll call; the other survivors' roll
        # calls may end after that, when rank 1 has answered too.
        named = "rank 1 did not answer" in failure["message"]
        back = "frozen or slow" in failure["message"]
        assert named or (how.startswith("frozen") and survivor.rank != 0 and back), failure["message"]
        assert failure["cause"] is not None
    if how.startswith("frozen"):
        assert results[1].ok, results[1].error
        assert results[1].value["message"] is not None and "step 3" in results[1].value["message"]


def _slow_peer(rank, world_size):
    """Rank 1 plans for 3 timeouts; the abort, the next trigger and a later rebalance are collective."""
    wrapper, reference = _wrapped_pair(rank, policy="default", async_on_error="log")
    events = []
    if rank == 1:
        plan = wrapper._plan

        def slow_plan(*args, **kwargs):
            if not events or events[-1] != "slept":
                time.sleep(3 * TIMEOUT_S)
                events.append("slept")
            return plan(*args, **kwargs)

        wrapper._plan = slow_plan
    seed = 0

    def steps_until_done(limit_s):
        nonlocal seed
        start = time.monotonic()
        while wrapper.async_in_flight and time.monotonic() - start < limit_s:
            _forward(wrapper, reference, seed, rank)
            seed += 1
            time.sleep(0.05)
        return wrapper.steps

    _forward(wrapper, reference, seed, rank)
    wrapper.rebalance()  # rank 1's worker now sleeps past the timeout
    first_abort_step = steps_until_done(4 * TIMEOUT_S)
    first = wrapper.stats()["last_rebalance_reason"]
    wrapper.rebalance()  # rank 1's worker may still be asleep: both skip or abort together
    second_end_step = steps_until_done(4 * TIMEOUT_S)
    second = wrapper.stats()["last_rebalance_reason"]
    time.sleep(3 * TIMEOUT_S)  # the slow worker is done by now
    wrapper.rebalance()
    wrapper.synchronize()
    third = wrapper.stats()
    _forward(wrapper, reference, 999, rank)
    wrapper.close()
    return {
        "first_abort_step": first_abort_step, "first": first, "second_end_step": second_end_step,
        "second": second, "third_skipped": third["last_rebalance_skipped"],
        "third_reason": third["last_rebalance_reason"],
    }


def test_a_slow_peer_aborts_collectively_and_later_rebalances_work():
    results = spawn_ranks(_slow_peer, 2, timeout=120, grace_s=20)
    assert all(r.ok for r in results), [r.error for r in results]
    a, b = (r.value for r in results)
    assert "async_timeout_s" in a["first"] and "async_timeout_s" in b["first"], (a, b)
    assert a["first_abort_step"] == b["first_abort_step"]
    assert a["second_end_step"] == b["second_end_step"], (a, b)
    assert "rank 1 is still busy" in a["second"] and "rank 1 is still busy" in b["second"], (a, b)
    assert not a["third_skipped"] and not b["third_skipped"], (a, b)


def test_interpreter_exit_with_a_rebalance_in_flight_never_aborts_the_process():
    """20 pairs of ranks leave with an async rebalance in flight (worker planning, moving weights
    or waiting to commit): every process exits with status 0, never "terminate called ..."."""
    script = Path(__file__).with_name("exit_in_flight.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script), "20"], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0 and "bad 0" in done.stdout, done.stdout + done.stderr[-3000:]


# ------------------------------------------------------------------------------ rebuilt groups
def _frozen_then_back(rank, world_size, mode):
    """Rank 1 freezes with an async rebalance in flight (or in the forward); rank 0 resumes it
    after its own forward failed. Then every rank keeps calling the forward until eplb's groups
    are rebuilt, and later rebalances and outputs are checked."""
    wrapper, reference = _wrapped_pair(rank, use_async=mode != "sync", policy="default")
    for seed in range(4):
        _forward(wrapper, reference, seed, rank)
    if mode == "async":
        wrapper.rebalance()  # the workers plan, then move weights after the next step
        _forward(wrapper, reference, 4, rank)
    pids: list = [None] * world_size
    dist.all_gather_object(pids, os.getpid())
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # resumed by rank 0
        failure = time_the_failure(lambda: _forward(wrapper, reference, 5, rank))
    else:
        failure = time_the_failure(lambda: _forward(wrapper, reference, 5, rank))
        os.kill(pids[1], signal.SIGCONT)
    seed = iter(range(100, 10_000))
    errors = until_it_runs(lambda: _forward(wrapper, reference, next(seed), rank))
    generation = wrapper._health.generation
    after = recovered(wrapper, lambda s: _forward(wrapper, reference, 500 + s, rank), world_size, TIMEOUT_S, 20)
    return {"failure": failure, "errors": errors, "generation": generation, **after}


@pytest.mark.parametrize("mode", ["async", "forward", "sync"])
def test_after_a_frozen_peer_is_back_the_groups_are_rebuilt_and_later_rebalances_work(mode):
    results = spawn_ranks(_frozen_then_back, 2, mode, timeout=120, grace_s=None)
    assert all(r.ok for r in results), [r.error for r in results]
    survivor, frozen = results[0].value, results[1].value
    assert survivor["failure"]["message"] is not None, "the forward did not fail"
    assert survivor["failure"]["seconds"] < TIMEOUT_S + MARGIN_S + ROLL_CALL_S, survivor["failure"]
    assert "rank 1 did not answer" in survivor["failure"]["message"], survivor["failure"]["message"]
    assert frozen["failure"]["message"] is not None
    for r in (survivor, frozen):
        assert r["generation"] == 1, r
        assert not r["reports"][-1][0], r["reports"]
        assert r["same_placement"]
    assert survivor["reports"] == frozen["reports"]


# ------------------------------------------------------------------------------ bounded waits
def _late_to_wrap(rank, world_size):
    if rank == 1:
        time.sleep(TIMEOUT_S + MARGIN_S + 2)  # never reaches the agreement in time
        return None
    return time_the_failure(
        lambda: EPLBWrapper(mm.build_reference_model(), _config(async_timeout_s=TIMEOUT_S), ep_group=dist.group.WORLD)
    )


def test_the_wrap_time_agreement_waits_at_most_async_timeout_s_and_names_the_missing_rank():
    results = spawn_ranks(_late_to_wrap, 2, timeout=60, grace_s=None)
    assert results[0].ok, results[0].error
    failure = results[0].value
    assert failure["message"] is not None, "the wrap did not fail"
    assert failure["seconds"] < TIMEOUT_S + MARGIN_S, failure
    assert "wrap-time agreement" in failure["message"] and "rank 1 did not arrive" in failure["message"], failure


def _user_group_bounded(rank, world_size):
    group = dist.new_group(backend="gloo")  # the job's timeout: far longer than the test
    set_ok = bound_group_timeout(group, TIMEOUT_S)
    dist.all_reduce(torch.ones(1), group=group)
    if rank == 1:
        time.sleep(TIMEOUT_S + MARGIN_S + 1)
        return {"set": set_ok}
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError:
        return {"set": set_ok, "seconds": time.monotonic() - start}
    return {"set": set_ok, "seconds": None}


def test_the_timeout_eplb_sets_on_a_users_group_bounds_its_collectives():
    """What eplb does to an NCCL EP group at wrap time (``bound_group_timeout``), checked on a
    gloo group: a collective whose peer does not come raises within the new timeout."""
    results = spawn_ranks(_user_group_bounded, 2, timeout=60, grace_s=None)
    assert all(r.ok for r in results), [r.error for r in results]
    assert results[0].value["set"] and results[1].value["set"]
    seconds = results[0].value["seconds"]
    assert seconds is not None and seconds < TIMEOUT_S + MARGIN_S, seconds


def _ranks_committed_different_layers(rank, world_size):
    """Rank 1's maps of layer 0 disagree with rank 0's about rank 0's slots (as when one rank saw
    the last agreement and the other did not); after a lost peer the rebuild makes every rank
    take the placement the slots hold, and the outputs are exact again."""
    wrapper, reference = _wrapped_pair(rank)
    _forward(wrapper, reference, 0, rank)
    layer = wrapper.eplb_layers[0]
    slots = wrapper.placement.num_physical // world_size
    true_row = wrapper.placement.phy2log[0].clone()
    if rank == 1:
        row = true_row.clone()
        row[:slots] = true_row[:slots].roll(1)  # rank 0's slots, as rank 1 wrongly believes they are
        layer.apply_commit(layer.prepare_commit(row), None)  # maps only: no weight moves
    wrapper._health.lost()  # what a failed collective does
    _forward(wrapper, reference, 1, rank)  # rebuilds first, then is exact
    for seed in range(2, 6):
        _forward(wrapper, reference, seed, rank)
    agreed = torch.equal(wrapper.placement.phy2log[0], true_row)
    wrapper.close()
    return {"agreed": agreed, "generation": wrapper._health.generation}


def test_a_rebuild_makes_every_rank_take_the_placement_the_slots_hold():
    results = spawn_ranks(_ranks_committed_different_layers, 2, timeout=90)
    assert all(r.ok for r in results), [r.error for r in results]
    assert all(r.value == {"agreed": True, "generation": 1} for r in results), [r.value for r in results]


def _transfer_times_out(rank, world_size):
    """Rank 1's first weight transfer starts 3 timeouts late: rank 0's times out, which closes
    the transfer group. The abort is collective, every rank rebuilds, later rebalances work."""
    wrapper, reference = _wrapped_pair(rank, use_async=True, policy="default")
    executor = wrapper._executor
    if rank == 1:
        def late_once(*args):
            executor._transfer = executor._communicate  # later transfers are on time
            time.sleep(3 * TIMEOUT_S)
            raise RuntimeError("this transfer came too late")

        executor._transfer = late_once
    seed = iter(range(10_000))
    for _ in range(3):
        _forward(wrapper, reference, next(seed), rank)
    wrapper.rebalance()
    start = time.monotonic()
    while wrapper.async_in_flight and time.monotonic() - start < 6 * TIMEOUT_S:
        _forward(wrapper, reference, next(seed), rank)
        time.sleep(0.05)
    first = wrapper.stats()["last_rebalance_reason"]
    broken = wrapper._health.broken
    reports = []
    for _ in range(5):  # rank 1's late worker keeps every rank skipping until it has left
        wrapper.rebalance()
        wrapper.synchronize()
        stats = wrapper.stats()
        reports.append((stats["last_rebalance_skipped"], stats["last_rebalance_reason"]))
        if not stats["last_rebalance_skipped"]:
            break
        time.sleep(TIMEOUT_S)
    for _ in range(10):
        _forward(wrapper, reference, next(seed), rank)
    generation = wrapper._health.generation
    wrapper.close()
    return {"first": first, "broken": broken, "reports": reports, "generation": generation}


def test_a_transfer_that_timed_out_makes_every_rank_rebuild_and_later_rebalances_work():
    results = spawn_ranks(_transfer_times_out, 2, timeout=120, grace_s=20)
    assert all(r.ok for r in results), [r.error for r in results]
    a, b = (r.value for r in results)
    assert "aborted" in a["first"] and "aborted" in b["first"], (a, b)
    # Whether the groups are already marked broken at the abort, or only at the next rebalance's
    # begin, depends on which of two equal timeouts fires first (rank 0's transfer or the step
    # agreement); either way every rank rebuilds exactly once.
    assert a["generation"] == b["generation"] == 1, (a, b)
    assert a["reports"] == b["reports"] and not a["reports"][-1][0], (a, b)


def _forward_cut_on_one_rank(rank, world_size, how):
    """Rank 0's forward is cut between its two MoE layers (a Ctrl-C, or an error of the model's
    own code); rank 1 waits in the second layer's all-to-all. Then both keep calling the model."""
    wrapper, reference = _wrapped_pair(rank, use_async=True)
    for seed in range(2):
        _forward(wrapper, reference, seed, rank)

    def cut(module, args):
        raise KeyboardInterrupt if how == "interrupt" else ValueError("the model's own code failed")

    if rank == 0:
        handle = wrapper.module.blocks[1].register_forward_pre_hook(cut)
        with pytest.raises(KeyboardInterrupt if how == "interrupt" else ValueError):
            _forward(wrapper, reference, 2, rank)
        handle.remove()
        failure = None
    else:
        failure = time_the_failure(lambda: _forward(wrapper, reference, 2, rank))
    seed = iter(range(100, 10_000))
    errors = until_it_runs(lambda: _forward(wrapper, reference, next(seed), rank))
    for _ in range(10):
        _forward(wrapper, reference, next(seed), rank)  # exact: no collective pairs with another's
    wrapper.rebalance()
    wrapper.synchronize()
    committed = not wrapper.stats()["last_rebalance_skipped"]
    _forward(wrapper, reference, next(seed), rank)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, wrapper.placement.phy2log.tolist())
    wrapper.close()
    return {"failure": failure, "errors": errors, "generation": wrapper._health.generation,
            "committed": committed, "same_placement": all(p == gathered[0] for p in gathered)}


@pytest.mark.parametrize("how", ["interrupt", "error"])
def test_a_forward_cut_on_one_rank_makes_every_rank_rebuild_instead_of_pairing_wrong_collectives(how):
    """Without the rebuild, rank 0's next forward would pair its first all-to-all with the one
    rank 1 waits in (another layer's): wrong outputs, or gloo aborting the process."""
    results = spawn_ranks(_forward_cut_on_one_rank, 2, how, timeout=90, grace_s=20)
    assert all(r.ok for r in results), [r.error for r in results]
    cut, waiting = results[0].value, results[1].value
    assert waiting["failure"]["message"] is not None, "rank 1's collective did not fail"
    assert waiting["failure"]["seconds"] < TIMEOUT_S + MARGIN_S + ROLL_CALL_S, waiting["failure"]
    assert "left the collective" in waiting["failure"]["message"], waiting["failure"]["message"]
    for r in (cut, waiting):
        assert r["generation"] == 1 and r["committed"] and r["same_placement"], r


# ------------------------------------------------------------------------------ random-interrupt soak
SOAK_TIMEOUT_S = 1.0  # async_timeout_s of the soak: a cut collective costs the peer this long
# Seconds between one rank's interrupts (uniform). Each interrupt that cuts a forward costs the
# peer async_timeout_s (its collective times out) plus a rebuild, about 1.5 s here: gaps of a few
# ms would keep the ranks rebuilding without ever stepping. At 0.05-1 s some recoveries are cut
# again and some complete, and the ranks still step and rebalance: one 60 s run saw 173
# interrupts (both ranks), 48 rebuilds, and on each rank 215 rebalances committed and 737
# forwards checked. A 60 s run at 5-200 ms gaps also passed (639 interrupts, 55 rebuilds, and on
# each rank 16 rebalances and 129 forwards).
SOAK_GAP_S = (0.05, 1.0)


def _soak_rank(rank, world_size, duration_s):
    """Real SIGINTs at random moments of this rank's forwards while an async wrapper steps and
    rebalances every 3 steps; the rank catches KeyboardInterrupt and EPLBError and keeps
    stepping. Every completed forward must equal the unwrapped model, and after each failure the
    placement must match what the layers hold."""
    import threading

    baseline_threads = threading.active_count()
    reference = mm.build_reference_model()
    config = EPLBConfig(num_redundant_experts=4, step_interval=3, window_size=4, async_timeout_s=SOAK_TIMEOUT_S,
                        min_improvement=0.0)
    wrapper = EPLBWrapper(copy.deepcopy(reference), config, ep_group=dist.group.WORLD)

    def layer_rows():
        return torch.stack([layer.placement_row() for layer in wrapper.eplb_layers])

    counts = {"forwards": 0, "interrupts": 0, "errors": 0}
    seed = iter(range(10**9))
    deadline = time.monotonic() + duration_s
    with random_interrupts(SOAK_GAP_S, seed=1000 + rank) as armed:
        while time.monotonic() < deadline:
            x = mm.hidden_batch(next(seed) * 2 + rank, batch=1, length=6)
            with torch.no_grad():
                expected = reference(x)
            try:
                armed.on()
                with torch.no_grad():
                    out = wrapper(x)
                armed.off()
            except (KeyboardInterrupt, EPLBError) as exc:
                armed.off()
                counts["interrupts" if isinstance(exc, KeyboardInterrupt) else "errors"] += 1
                assert torch.equal(wrapper.placement.phy2log, layer_rows()), counts
                continue
            torch.testing.assert_close(out, expected, msg=lambda m: f"{counts}: {m}")
            counts["forwards"] += 1
    soak_rebalances = wrapper.stats()["num_rebalances"]
    recoveries = wrapper._health.generation
    # No more interrupts here. The ranks agree on a last step through the job's store (each left
    # its loop at its own deadline, after its own number of forwards) and step until then: after
    # the last rebuild their step counts are equal and move together.
    store = dist.distributed_c10d._get_default_store()
    store.set(f"soak/end/{rank}", str(wrapper.steps))
    last_step, settle_errors = None, 0
    while last_step is None or wrapper.steps < last_step:
        if last_step is None and store.check([f"soak/end/{r}" for r in range(world_size)]):
            last_step = 20 + max(int(store.get(f"soak/end/{r}")) for r in range(world_size))
        try:
            _forward(wrapper, reference, next(seed), rank)
        except EPLBError:
            settle_errors += 1
            assert settle_errors < 20, "the ranks do not get back in step"
    wrapper.synchronize()
    placement = wrapper.placement.phy2log.tolist()
    assert placement == layer_rows().tolist()
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, placement)  # the job's own group: eplb never uses it
    wrapper.close()
    threads_deadline = time.monotonic() + SOAK_TIMEOUT_S + 5
    while threading.active_count() > baseline_threads and time.monotonic() < threads_deadline:
        time.sleep(0.05)
    return {**counts, "rebalances": soak_rebalances, "recoveries": recoveries, "settle_errors": settle_errors,
            "same_placement": all(p == gathered[0] for p in gathered),
            "threads": (baseline_threads, threading.active_count())}


def test_soak_random_interrupts_on_two_ranks_never_give_a_wrong_output_or_a_hang():
    """Two ranks, each interrupted (SIGINT) at random moments of its forwards for EPLB_SOAK_S
    seconds (default 4; run 60 or more by hand): a cut forward leaves the ranks' collectives out
    of step, which eplb must turn into a rebuild of its groups, with exact outputs throughout.
    The whole run has a deadline (a hang fails it), the ranks end on one placement, rebalances
    commit while the interrupts run, and close() leaves no thread behind."""
    duration_s = float(os.environ.get("EPLB_SOAK_S", "4"))
    results = spawn_ranks(_soak_rank, 2, duration_s, timeout=duration_s + 60, grace_s=30)
    assert all(r.ok for r in results), [r.error for r in results]
    for r in results:
        v = r.value
        print(f"rank {r.rank}: {v}")
        assert v["same_placement"], v
        assert v["threads"][1] <= v["threads"][0], v
        assert v["interrupts"] >= 1 and v["forwards"] >= 3, v
        assert v["rebalances"] >= 1, v
