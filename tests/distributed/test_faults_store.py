"""Faults of the job's key-value store: global rank 0, which hosts it, frozen (``SIGSTOP``).

Every store operation eplb issues (the wrap-time agreement, the roll call after a failed
collective, the rendezvous of a rebuild) waits at most ``async_timeout_s``: the survivors raise an
`EPLBError` that names the operation and the store host within the timeout (+ the roll call + a
margin) instead of waiting without a bound, and once rank 0 is back (``SIGCONT``) eplb's groups
are rebuilt and later forwards and rebalances are exact.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import moe_models as mm
import pytest
import torch.distributed as dist
from fault_steps import recovered, time_the_failure, until_it_runs
from harness import spawn_ranks
from test_faults_ep import MARGIN_S, TIMEOUT_S, _forward

from eplb import EPLBConfig, EPLBWrapper
from eplb.comm.recovery import ROLL_CALL_S, BoundedStore, StoreSilent

pytestmark = pytest.mark.distributed

# ------------------------------------------------------------------------------ one store, one process
def _frozen_store_server():
    """A TCPStore hosted by a child process, then frozen; returns (process, port)."""
    code = (
        "import sys, time\nfrom datetime import timedelta\nimport torch.distributed as dist\n"
        "s = dist.TCPStore('127.0.0.1', 0, None, True, timedelta(seconds=60), wait_for_workers=False)\n"
        "print(s.port, flush=True)\ntime.sleep(120)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return server, int(server.stdout.readline())


def test_every_store_operation_is_bounded_when_the_host_is_frozen_and_works_once_it_is_back():
    server, port = _frozen_store_server()
    try:
        users = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=60), wait_for_workers=False)
        users.set("ready", "1")
        store = BoundedStore(users)
        assert store.run("a check", lambda s: s.check(["ready"]), TIMEOUT_S)
        os.kill(server.pid, signal.SIGSTOP)
        bodies = {
            "check": lambda s: s.check(["ready"]),
            "add": lambda s: s.add("n", 1),
            "get": lambda s: s.get("ready"),
            "compare_set": lambda s: s.compare_set("c", "", "1"),
            "delete_key": lambda s: s.delete_key("gone"),
        }
        for name, body in bodies.items():
            start = time.monotonic()
            with pytest.raises(StoreSilent, match=f"{name}: the job's key-value store .* did not answer within 0.5 s"):
                store.run(name, body, 0.5)
            assert time.monotonic() - start < 0.5 + MARGIN_S, name
        assert users.timeout == timedelta(seconds=60)  # the user's store is never changed
        os.kill(server.pid, signal.SIGCONT)
        # Operations stuck on their connections finish now; new ones answer at once.
        assert store.run("a check", lambda s: s.check(["ready"]), TIMEOUT_S)
        assert store.run("an add", lambda s: s.add("m", 5), TIMEOUT_S) == 5
        assert users.get("ready") == b"1"
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait()


def test_a_store_that_fails_is_reported_with_its_error_chained():
    server, port = _frozen_store_server()
    users = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=60), wait_for_workers=False)
    store = BoundedStore(users)
    store.run("a set", lambda s: s.set("k", "1"), TIMEOUT_S)
    server.kill()  # the host died: connections are reset
    server.wait()
    with pytest.raises(StoreSilent, match="a check: the job's key-value store .* failed") as caught:
        store.run("a check", lambda s: s.check(["k"]), TIMEOUT_S)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_a_store_without_clone_is_used_as_it_is():
    class OwnStore(dist.Store):  # a Python store: clone() is not implemented
        def __init__(self):
            super().__init__()
            self.data = {}

        def set(self, key, value):
            self.data[key] = value

        def check(self, keys):
            return all(k in self.data for k in keys)

    own = OwnStore()
    store = BoundedStore(own)
    store.run("a set", lambda s: s.set("k", "1"), TIMEOUT_S)
    assert store.run("a check", lambda s: s.check(["k"]), TIMEOUT_S)
    assert threading.active_count() < 20


# ------------------------------------------------------------------------------ ranks over gloo
def _store_host_frozen(rank, world_size, when):
    """Global rank 0 freezes itself at step 3 (before the forward, before a sync rebalance, or
    with an async rebalance in flight); rank 1 resumes it after two failed calls. Then every rank
    calls the forward until eplb's groups are rebuilt, and checks later rebalances and outputs."""
    reference = mm.build_reference_model()
    config = EPLBConfig(num_redundant_experts=4, step_interval=10_000, async_timeout_s=TIMEOUT_S,
                        use_async=when == "async rebalance", policy="default")
    wrapper = EPLBWrapper(copy.deepcopy(reference), config, ep_group=dist.group.WORLD)
    for seed in range(3):
        _forward(wrapper, reference, seed, rank)
    if when == "async rebalance":
        wrapper.rebalance()  # the workers plan, then move weights after the next step
    act = wrapper.rebalance if when == "sync rebalance" else lambda: _forward(wrapper, reference, 3, rank)
    pids: list = [None] * world_size
    dist.all_gather_object(pids, os.getpid())
    seeds = iter(range(100, 10_000))
    again = None
    if rank == 0:
        os.kill(os.getpid(), signal.SIGSTOP)  # resumed by rank 1
        first = time_the_failure(act)
    else:
        first = time_the_failure(act)  # the collective times out; the roll call gets no answer
        if rank == 1:
            # The rebuild's rendezvous cannot reach the store either: bounded too.
            again = time_the_failure(lambda: _forward(wrapper, reference, next(seeds), rank))
            os.kill(pids[0], signal.SIGCONT)
    errors = until_it_runs(lambda: _forward(wrapper, reference, next(seeds), rank))
    generation = wrapper._health.generation
    after = recovered(wrapper, lambda s: _forward(wrapper, reference, 500 + s, rank), world_size, TIMEOUT_S, 10)
    return {"first": first, "again": again, "errors": errors, "generation": generation, **after}


@pytest.mark.parametrize(
    ("when", "world_size"),
    [("forward", 2), ("sync rebalance", 2), ("async rebalance", 2), ("forward", 3)],
)
def test_a_frozen_store_host_makes_the_others_raise_within_the_timeout_and_later_calls_work(when, world_size):
    results = spawn_ranks(_store_host_frozen, world_size, when, timeout=150, grace_s=None)
    assert all(r.ok for r in results), [r.error for r in results]
    for r in results[1:]:
        first = r.value["first"]
        assert first["message"] is not None, f"rank {r.rank}'s call did not fail"
        # The collective times out after async_timeout_s; the roll call adds at most ROLL_CALL_S.
        assert first["seconds"] < TIMEOUT_S + ROLL_CALL_S + MARGIN_S, (r.rank, first)
        assert "global rank 0, which hosts the job's key-value store, did not answer the roll call" in first["message"]
        assert first["cause"] is not None
    again = results[1].value["again"]
    assert again["message"] is not None, "the rebuild did not fail while rank 0 was frozen"
    assert again["seconds"] < TIMEOUT_S + MARGIN_S, again
    assert "rebuilding eplb's process groups" in again["message"], again["message"]
    assert "the job's key-value store (hosted by global rank 0) did not answer" in again["message"], again["message"]
    assert again["cause"] == "StoreSilent"
    assert results[0].value["first"]["message"] is not None  # rank 0's own call fails once it is back
    values = [r.value for r in results]
    for v in values:
        assert v["generation"] == 1, v
        assert not v["reports"][-1][0], v["reports"]
        assert v["same_placement"]
    assert all(v["reports"] == values[0]["reports"] for v in values)


def _store_host_frozen_at_wrap(rank, world_size):
    pids: list = [None] * world_size
    dist.all_gather_object(pids, os.getpid())
    if rank == 0:
        os.kill(os.getpid(), signal.SIGSTOP)  # resumed by rank 1
        return None
    config = EPLBConfig(num_redundant_experts=4, async_timeout_s=TIMEOUT_S)
    failure = time_the_failure(lambda: EPLBWrapper(mm.build_reference_model(), config, ep_group=dist.group.WORLD))
    os.kill(pids[0], signal.SIGCONT)
    return failure


def test_the_wrap_time_agreement_with_a_frozen_store_host_fails_within_the_timeout():
    results = spawn_ranks(_store_host_frozen_at_wrap, 2, timeout=60, grace_s=None)
    assert all(r.ok for r in results), [r.error for r in results]
    failure = results[1].value
    assert failure["message"] is not None, "the wrap did not fail"
    assert failure["seconds"] < TIMEOUT_S + MARGIN_S, failure
    assert "wrap-time agreement" in failure["message"], failure["message"]
    assert "key-value store (hosted by global rank 0) did not answer" in failure["message"], failure["message"]
    assert failure["cause"] == "StoreSilent"
