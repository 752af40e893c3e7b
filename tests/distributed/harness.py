"""Run a function on several ranks, one spawned process each, over a gloo (or NCCL) process group.

Usage from a test in ``tests/distributed`` (pytest puts this folder on ``sys.path``)::

    from harness import run_ranks

    def _sum_ranks(rank, world_size, scale):       # module level, so spawn can import it
        t = torch.tensor([rank * scale])
        torch.distributed.all_reduce(t)
        return t.item()

    def test_sum():
        assert run_ranks(_sum_ranks, 2, 10) == [10, 10]

`run_ranks` raises ``AssertionError`` carrying every failed rank's traceback (and names the
ranks that timed out or died). `spawn_ranks` is the lower level: it never raises for a rank's
failure and returns one `RankResult` per rank (exit code, value, traceback), for tests that
kill a rank on purpose (``os._exit`` or ``os.kill(os.getpid(), signal.SIGKILL)`` inside ``fn``)
and check how the others cope.

How it works: each rank is a fresh interpreter (start method "spawn"); ``fn`` travels as
(module name, file path, qualified name) and is imported there, from the file if the module
name does not resolve, so it works under any pytest import mode. The process group uses a
free port on 127.0.0.1 picked by binding port 0, and a timeout equal to ``timeout`` so a
collective whose peer died raises instead of hanging. Each rank writes its outcome to a file
in a private temp dir and then waits until every rank has finished ``fn`` before tearing the
group down: rank 0 hosts the rendezvous store, and leaving early could break a slower peer.
The parent kills every rank still running ``grace_s`` seconds after the first failure, or at
``timeout``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import multiprocessing.connection
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["RankResult", "run_ranks", "spawn_ranks", "free_port"]


@dataclass(frozen=True)
class RankResult:
    """Outcome of one rank.

    Attributes:
        rank: the rank.
        exitcode: the process's exit code (0 ok; negative: killed by that signal; None: it did
            not exit, which `spawn_ranks` never returns since it kills stragglers).
        value: what ``fn`` returned (None unless ``ok``).
        error: the formatted traceback when ``fn`` raised, else None.
        timed_out: the parent killed it at the deadline or after another rank failed.
    """

    rank: int
    exitcode: int | None
    value: Any = None
    error: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """``fn`` returned and the process exited cleanly."""
        return self.error is None and not self.timed_out and self.exitcode == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    fn, world_size: int, *args, timeout: float = 120.0, backend: str = "gloo", grace_s: float = 10.0
):
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return the values by rank.

    Args:
        fn: a module-level function (spawned processes import it).
        world_size: number of ranks (processes).
        *args: picklable arguments passed to every rank.
        timeout: seconds for the whole run; ranks still running then are killed.
        backend: process-group backend; with ``"nccl"`` rank ``r`` uses ``cuda:r``.
        grace_s: after one rank fails, seconds the others get to finish before being killed.

    Returns:
        ``[fn's return value on rank 0, ..., on rank world_size - 1]``.

    Raises:
        AssertionError: any rank raised, died or timed out; the message holds every rank's
            traceback or exit code.
    """
    results = spawn_ranks(fn, world_size, *args, timeout=timeout, backend=backend, grace_s=grace_s)
    if all(r.ok for r in results):
        return [r.value for r in results]
    lines = [f"{sum(not r.ok for r in results)} of {world_size} ranks failed running {fn.__qualname__}:"]
    for r in results:
        if r.ok:
            continue
        if r.error is not None:
            lines.append(f"--- rank {r.rank} raised:\n{r.error}")
        elif r.timed_out:
            lines.append(f"--- rank {r.rank} was killed after {timeout:g} s or after another rank failed")
        else:
            lines.append(f"--- rank {r.rank} exited with code {r.exitcode} without a result")
    raise AssertionError("\n".join(lines))


def spawn_ranks(
    fn, world_size: int, *args, timeout: float = 120.0, backend: str = "gloo", grace_s: float | None = 10.0
) -> list[RankResult]:
    """Like `run_ranks`, but return every rank's `RankResult` instead of raising.

    ``grace_s=None`` lets the other ranks run until ``timeout`` after a failure (for tests that
    kill a rank and expect the survivors to notice and finish).
    """
    if world_size < 1:
        raise ValueError(f"world_size ({world_size}) must be >= 1")
    target = _function_ref(fn)
    ctx = mp.get_context("spawn")
    release = ctx.Event()  # set by the parent once every rank is done with fn
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="eplb-ranks-") as out_dir:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(rank, world_size, port, backend, timeout, target, args, out_dir, release),
                name=f"rank{rank}",
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        timed_out = _supervise(procs, out_dir, release, timeout, grace_s)
        return [_collect(rank, procs[rank], out_dir, rank in timed_out) for rank in range(world_size)]


# ---------------------------------------------------------------------- parent side
def _function_ref(fn) -> tuple[str, str | None, str]:
    if "<locals>" in fn.__qualname__ or fn.__name__ == "<lambda>":
        raise ValueError(f"{fn.__qualname__} must be a module-level function so spawned ranks can import it")
    try:
        path = inspect.getfile(fn)
    except TypeError:
        path = None
    return fn.__module__, path, fn.__qualname__


def _result_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"rank{rank}.pkl")


def _read_result(out_dir: str, rank: int) -> tuple[str, Any] | None:
    path = _result_path(out_dir, rank)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _supervise(procs, out_dir: str, release, timeout: float, grace_s: float | None) -> set[int]:
    """Wait for the ranks; return the ranks killed by the parent."""
    deadline = time.monotonic() + timeout
    failed_at = None
    while True:
        finished = []  # done with fn: reported, or died without reporting
        for rank, p in enumerate(procs):
            outcome = _read_result(out_dir, rank)
            dead = not p.is_alive()
            if outcome is not None or dead:
                finished.append(rank)
                bad = (outcome is not None and outcome[0] == "error") or (outcome is None and dead)
                if bad and failed_at is None:
                    failed_at = time.monotonic()
        if len(finished) == len(procs):
            release.set()
            break
        now = time.monotonic()
        if now >= deadline or (failed_at is not None and grace_s is not None and now >= failed_at + grace_s):
            release.set()
            break
        multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=0.05)
    # Let every rank tear its group down; kill whatever is left.
    killed = set()
    for rank, p in enumerate(procs):
        p.join(timeout=max(1.0, min(10.0, deadline - time.monotonic())))
        if p.is_alive():
            killed.add(rank)
            p.terminate()
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return killed


def _collect(rank: int, proc, out_dir: str, killed: bool) -> RankResult:
    outcome = _read_result(out_dir, rank)
    if outcome is None:
        return RankResult(rank=rank, exitcode=proc.exitcode, timed_out=killed)
    kind, payload = outcome
    if kind == "ok":
        # A rank that finished fn but hung in teardown still counts as a result.
        return RankResult(rank=rank, exitcode=0 if killed else proc.exitcode, value=payload)
    return RankResult(rank=rank, exitcode=proc.exitcode, error=payload)


# ---------------------------------------------------------------------- child side
def _resolve(target: tuple[str, str | None, str]):
    module_name, path, qualname = target
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        if path is None:
            raise
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _write_result(out_dir: str, rank: int, outcome: tuple[str, Any]) -> None:
    path = _result_path(out_dir, rank)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            pickle.dump(outcome, f)
    except Exception:  # the value did not pickle: report that instead of losing the rank
        with open(tmp, "wb") as f:
            pickle.dump(("error", "fn's return value could not be pickled:\n" + traceback.format_exc()), f)
    os.replace(tmp, path)  # atomic: the parent never reads half a file


def _rank_main(rank, world_size, port, backend, timeout, target, args, out_dir, release) -> None:
    import torch.distributed as dist

    # Ranks share the machine's cores; one thread each avoids oversubscription.
    torch.set_num_threads(1)
    outcome: tuple[str, Any]
    try:
        if "nccl" in backend:
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        fn = _resolve(target)
        outcome = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        outcome = ("error", traceback.format_exc())
    _write_result(out_dir, rank, outcome)
    release.wait(timeout)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # teardown after the result is recorded must not mask it
            pass
    sys.exit(0 if outcome[0] == "ok" else 1)
