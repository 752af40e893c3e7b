"""Steps the multi-rank fault tests share: time a call that should fail, call until it runs
again, and check that the ranks recovered (a rebalance commits, outputs stay exact, one
placement on every rank)."""

from __future__ import annotations

import time

import torch.distributed as dist

from eplb import EPLBError


def time_the_failure(fn) -> dict:
    """Call ``fn``; how long it took and the `EPLBError` it raised (None if it returned):
    ``{"seconds", "message", "cause": the chained error's type name or None, "chained"}``."""
    start = time.monotonic()
    try:
        fn()
    except EPLBError as exc:
        cause = exc.__cause__
        return {"seconds": time.monotonic() - start, "message": str(exc),
                "cause": type(cause).__name__ if cause is not None else None, "chained": cause is not None}
    return {"seconds": time.monotonic() - start, "message": None, "cause": None, "chained": False}


def until_it_runs(fn, attempts: int = 12) -> list[str]:
    """Call ``fn`` until it returns; the `EPLBError` messages of the failed calls, in order."""
    errors = []
    for _ in range(attempts):
        try:
            fn()
            return errors
        except EPLBError as exc:
            errors.append(str(exc))
    raise AssertionError(f"still failing after {attempts} calls: {errors}")


def recovered(wrapper, forward, world_size: int, timeout_s: float, forwards: int) -> dict:
    """After a fault every rank got past: rebalance until one commits (a worker of an aborted
    rebalance may stay busy for ``timeout_s``), then ``forward(i)`` for ``i < forwards`` (each
    checks its output), then gather the placements over the job's own group (which eplb never
    uses) and close the wrapper. Returns ``{"reports": [(skipped, reason), ...],
    "same_placement": bool}``."""
    reports = []
    for _ in range(4):
        wrapper.rebalance()
        wrapper.synchronize()
        report = wrapper.stats()
        reports.append((report["last_rebalance_skipped"], report["last_rebalance_reason"]))
        if not report["last_rebalance_skipped"]:
            break
        time.sleep(timeout_s)
    for i in range(forwards):
        forward(i)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, wrapper.placement.phy2log.tolist())
    wrapper.close()
    return {"reports": reports, "same_placement": all(p == gathered[0] for p in gathered)}
