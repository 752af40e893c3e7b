"""What eplb does after a peer rank stopped answering: a roll call that names the ranks gone, a
rendezvous of every rank bounded by a timeout, and new gloo groups to replace the broken ones.

A gloo collective that timed out closes its connections: its process group cannot be used
again on any rank. eplb's own gloo groups (the control group and the weight-transfer group) are
therefore rebuilt, never repaired: once every rank is back, each one meets the others through the
job's key-value store (the one ``torch.distributed.init_process_group`` created, hosted by global
rank 0) and creates a new group of the same ranks under a name no group has had.

Every wait here is bounded by the ``timeout_s`` it is given (eplb passes ``async_timeout_s``),
the store's own operations included (`BoundedStore`): when global rank 0, which hosts the store,
is the rank that froze, the store does not answer, and eplb says so within that bound.
"""

from __future__ import annotations

import atexit
import json
import threading
import time
import weakref
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from eplb.errors import EPLBError

__all__ = [
    "BoundedStore", "GroupHealth", "NotEveryRank", "StoreSilent", "rendezvous", "new_gloo_group",
    "missing_ranks_error", "ROLL_CALL_S",
]

ROLL_CALL_S = 1.0
"""How long a rank whose collective failed waits for the others' roll-call answers (at most
``async_timeout_s``): the failure reaches the live ranks within about this long of each other."""

_POLL_S = 0.02
_GRACE_S = 0.5


class StoreSilent(EPLBError):
    """A store operation eplb issued did not complete in time: the job's key-value store (hosted
    by global rank 0) did not answer, or failed (then the store's error is chained).

    Attributes:
        operation: what eplb asked the store, e.g. ``"the roll call's check of every rank's key"``.
    """

    def __init__(self, operation: str, timeout_s: float, cause: BaseException | None = None):
        if cause is None:
            what = f"did not answer within {timeout_s:g} s"
        else:
            detail = " ".join(str(cause).split())[:200]
            what = f"failed ({type(cause).__name__}: {detail})"
        super().__init__(
            f"{operation}: the job's key-value store (hosted by global rank 0) {what}; global rank 0 is frozen, "
            "dead or unreachable"
        )
        self.operation = operation


class NotEveryRank(Exception):
    """A rendezvous ended before every rank arrived. ``missing``: the ranks (in the EP group)
    that did not arrive; ``store_error``: the `StoreSilent` of a store that did not answer."""

    def __init__(self, missing: list[int], store_error: StoreSilent | None = None):
        super().__init__(f"ranks {missing} missing" + (f" ({store_error})" if store_error is not None else ""))
        self.missing = missing
        self.store_error = store_error

    @property
    def store_silent(self) -> bool:
        """The store itself did not answer."""
        return self.store_error is not None


class BoundedStore:
    """eplb's handle on the job's key-value store: every operation waits at most the time given.

    PyTorch's store client has no timeout that holds when the store's host is frozen (``SIGSTOP``,
    a debugger, a machine that stopped scheduling it): the host's kernel keeps the connection open,
    and ``check``, ``add``, ``compare_set`` and ``delete_key`` wait for the answer without a bound
    (``get`` and ``wait`` poll until the store's timeout, then wait without a bound to cancel).
    Setting a timeout would not help, and on the job's store it would change the user's object
    (a ``PrefixStore`` passes ``set_timeout`` to the store under it). So each operation runs on a
    short-lived daemon thread over a connection of eplb's own (``store.clone()``: the user's
    store object and its timeout are never touched), and the caller waits for it at most the time
    given, then raises `StoreSilent`. A connection whose operation has not finished stays with
    that thread, which puts it back for reuse once the host answers (or drops it, with the thread,
    if the host died); the next operation opens another (the connecting is bounded the same way).

    Args:
        store: the store to reach; None: the job's (``init_process_group``'s), looked up at the
            first operation. A store that cannot be cloned (a Python subclass of
            ``torch.distributed.Store``) is used as it is, still bounded by the threads.
    """

    _IDLE_MAX = 4  # connections kept for reuse; more are closed

    def __init__(self, store: dist.Store | None = None):
        self._source = store
        self._idle: list = []
        self._lock = threading.Lock()
        self._shared = False

    def run(self, operation: str, fn, timeout_s: float):
        """``fn(store)`` (one or several store calls) on a connection of eplb's own; its result.

        Raises:
            StoreSilent: ``fn`` did not return within ``timeout_s`` (the store did not answer),
                or the store raised (chained).
        """
        outcome: dict = {}
        done = threading.Event()

        def work() -> None:
            try:
                store = self._connection()
                outcome["value"] = fn(store)  # a store that raised may be out of step: not reused
                self._release(store)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome["error"] = exc
            done.set()

        thread = threading.Thread(target=work, name="eplb-store", daemon=True)
        _waiting_calls.add(thread)
        thread.start()
        if not done.wait(max(timeout_s, 0.0)):
            raise StoreSilent(operation, timeout_s)
        if "error" in outcome:
            raise StoreSilent(operation, timeout_s, outcome["error"]) from outcome["error"]
        return outcome["value"]

    def _connection(self):
        with self._lock:
            if self._source is None:
                self._source = c10d._get_default_store()
            if self._idle:
                return self._idle.pop()
            if self._shared:
                return self._source
        try:
            return self._source.clone()  # a new connection for a TCPStore, with the job's timeout
        except dist.DistError:
            raise
        except RuntimeError:  # a store without clone(): share it (its own lock serialises calls)
            self._shared = True
            return self._source

    def _release(self, store) -> None:
        if store is self._source:
            return
        with self._lock:
            if len(self._idle) < self._IDLE_MAX:
                self._idle.append(store)


_waiting_calls: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
"""Threads of `BoundedStore.run` (a finished one drops out once collected)."""

EXIT_WAIT_S = 3.0
"""How long interpreter exit waits for store calls still running (their caller gave up on them)."""


@atexit.register
def _join_waiting_calls() -> None:
    """At interpreter exit, let store calls that are still running finish first (at most
    `EXIT_WAIT_S` in all). A thread still inside the store client's C++ code while the
    interpreter is torn down (the store's host answered, or closed the connection, just then)
    can end the process with "terminate called without an active exception"; a store host that
    stays frozen past the wait still leaves that risk (see docs/design.md)."""
    deadline = time.monotonic() + EXIT_WAIT_S
    for thread in list(_waiting_calls):
        thread.join(max(deadline - time.monotonic(), 0.0))


def _set(key: str, payload):
    """A `BoundedStore.run` body: store ``payload`` as JSON under ``key``."""
    value = json.dumps(payload)
    return lambda store: store.set(key, value)


def _get_each(keys: list[str]):
    """A `BoundedStore.run` body: the JSON values under ``keys``, decoded."""
    return lambda store: [json.loads(store.get(k)) for k in keys]


def _read_counter(key: str):
    """A `BoundedStore.run` body: the counter under ``key`` (0 if none yet)."""
    return lambda store: store.add(key, 0)


def _check_each(keys: list[str]):
    """A `BoundedStore.run` body: which of ``keys`` the store holds (one ``check`` when all do)."""
    def fn(store) -> list[bool]:
        if store.check(keys):
            return [True] * len(keys)
        return [bool(store.check([k])) for k in keys]
    return fn


def rendezvous(
    store: BoundedStore, key: str, rank: int, num_ranks: int, payload, timeout_s: float, *, what: str = "the rendezvous"
) -> list:
    """Publish ``payload`` (JSON-serialisable) under ``key`` and wait, at most ``timeout_s``,
    for every rank's; returns the ``num_ranks`` payloads in rank order.

    Collective over the ranks that use the same ``key``; calling it again with the same key
    after a `NotEveryRank` joins the same rendezvous (the payload is written again). Every store
    operation is bounded by what is left of ``timeout_s`` (`BoundedStore`); ``what`` names the
    rendezvous in a `StoreSilent`.

    Raises:
        NotEveryRank: naming the ranks that had not arrived by the deadline, or carrying the
            `StoreSilent` of a store that did not answer.
    """
    keys = [f"{key}/{r}" for r in range(num_ranks)]
    deadline = time.monotonic() + timeout_s
    present = [False] * num_ranks
    try:
        store.run(f"{what}: set of this rank's key", _set(keys[rank], payload), _left(deadline, timeout_s))
        while True:
            present = store.run(f"{what}: check of every rank's key", _check_each(keys), _left(deadline, timeout_s))
            if all(present):
                return store.run(f"{what}: get of every rank's key", _get_each(keys), _left(deadline, timeout_s))
            if time.monotonic() >= deadline:
                raise NotEveryRank([r for r, p in enumerate(present) if not p])
            time.sleep(_POLL_S)
    except StoreSilent as exc:
        raise NotEveryRank([r for r, p in enumerate(present) if not p], exc) from exc


def _left(deadline: float, timeout_s: float) -> float:
    """The bound of one store operation of a wait that ends at ``deadline``: the seconds left, but
    at least `_GRACE_S` (or ``timeout_s`` if shorter), so that a call begun just before the
    deadline on a busy machine is not reported as a silent store."""
    return max(deadline - time.monotonic(), min(_GRACE_S, timeout_s))


def new_gloo_group(global_ranks: list[int], name: str, timeout_s: float) -> dist.ProcessGroup:
    """A new gloo process group over ``global_ranks`` (sorted, this process among them), named
    ``name``, with collectives timing out after ``timeout_s``.

    Only the members call it (at the same time): it is ``torch.distributed.new_group`` with
    local synchronisation, under a name of eplb's choosing, so that a group rebuilt several
    times never meets keys its predecessors left in the store. Built on PyTorch's own group
    helper (``_new_process_group_helper``, the function ``new_group`` calls).
    """
    ranks = sorted(global_ranks)
    me = dist.get_rank()
    pg, _ = c10d._new_process_group_helper(
        len(ranks), ranks.index(me), ranks, "gloo", c10d._get_default_store(), getattr(c10d, "GroupName", str)(name),
        timeout=timedelta(seconds=timeout_s),
    )
    c10d._world.pg_group_ranks[pg] = {g: r for r, g in enumerate(ranks)}
    return pg


class GroupHealth:
    """Whether this rank's eplb gloo groups may still be used, and the roll call that names the
    ranks that stopped answering.

    Args:
        key: a store key prefix the ranks of one wrapper share (agreed at wrap time).
        rank: this rank in the EP group.
        num_ranks: ``G``.
        timeout_s: ``async_timeout_s``.
        store: the `BoundedStore` the roll call and the rebuild's rendezvous go through (None:
            a new one over the job's store).

    ``broken`` is set by `lost` (a collective failed); the wrapper then rebuilds the groups
    before eplb's next collective, and ``generation`` counts the rebuilds (the same on every rank).
    """

    def __init__(self, key: str, rank: int, num_ranks: int, timeout_s: float, store: BoundedStore | None = None):
        self.key, self.rank, self.num_ranks, self.timeout_s = key, rank, num_ranks, timeout_s
        self.store = store if store is not None else BoundedStore()
        self.broken = False
        self.generation = 0
        self._silent: list[int] | None = None
        self._roll_called = False

    def lost(self) -> list[int] | None:
        """Mark the groups broken and, the first time in this generation, hold a roll call: every
        rank whose collective failed answers it, and the ranks that have not answered within
        `ROLL_CALL_S` (or ``timeout_s`` if shorter) are returned, as the ranks that stopped
        answering. ``[]``: every rank answered (one was slow or frozen and is back, maybe this
        one). None: the store did not answer either (within the same bound)."""
        self.broken = True
        if self._roll_called:
            return self._silent
        self._roll_called = True
        try:
            rendezvous(self.store, f"{self.key}/roll-call/{self.generation}", self.rank, self.num_ranks, 1,
                       self._roll_call_s, what="the roll call")
            self._silent = []
        except NotEveryRank as exc:
            self._silent = None if exc.store_silent else exc.missing
        return self._silent

    @property
    def _roll_call_s(self) -> float:
        return min(ROLL_CALL_S, self.timeout_s)

    def left(self) -> None:
        """Mark the groups broken because this rank left a sequence of collectives in the middle
        (an exception or Ctrl-C on this rank, not a failed collective): its peers may wait in a
        collective it will never issue. Answers this generation's roll call at once (waiting at
        most `ROLL_CALL_S` for the store), so a peer whose collective times out learns that this
        rank is alive."""
        self.broken = True
        key = f"{self.key}/roll-call/{self.generation}/{self.rank}"
        try:
            self.store.run("the roll call's answer", _set(key, 1), self._roll_call_s)
        except StoreSilent:  # the store's host is frozen or gone: the rebuild says so
            pass

    def meet(self, payload) -> tuple[list, str]:
        """The rendezvous of a rebuild: publish ``payload`` (JSON-serialisable) and wait, at most
        ``timeout_s``, for every rank's. Returns the payloads in rank order and a store prefix
        no group has used, the same on every rank (the names of the new groups start with it).

        Attempts are numbered by a counter in the store. A rank that gives up on an attempt
        withdraws its payload and moves the counter on; a rank still waiting follows the counter
        and publishes again under the new number, so ranks that come back at different times
        meet. Every store operation is bounded by what is left of ``timeout_s``.

        Raises:
            NotEveryRank: naming the ranks that did not come, or carrying the `StoreSilent` of
                a store that did not answer (then nothing is withdrawn: the store is silent).
        """
        base = f"{self.key}/rebuild/{self.generation}"
        counter = f"{base}/attempt"
        deadline = time.monotonic() + self.timeout_s
        attempt = None
        present = [False] * self.num_ranks
        try:
            while True:
                current = int(self.store.run("the rebuild's read of the attempt counter", _read_counter(counter),
                                             _left(deadline, self.timeout_s)))
                if current != attempt:
                    attempt = current
                    mine = _set(f"{base}/{attempt}/{self.rank}", payload)
                    self.store.run("the rebuild's set of this rank's key", mine, _left(deadline, self.timeout_s))
                keys = [f"{base}/{attempt}/{r}" for r in range(self.num_ranks)]
                present = self.store.run("the rebuild's check of every rank's key", _check_each(keys),
                                         _left(deadline, self.timeout_s))
                if all(present):
                    values = self.store.run("the rebuild's get of every rank's key", _get_each(keys),
                                            _left(deadline, self.timeout_s))
                    return values, f"{base}/{attempt}"
                if time.monotonic() >= deadline:
                    self.give_up(f"{base}/{attempt}")
                    raise NotEveryRank([r for r, p in enumerate(present) if not p])
                time.sleep(_POLL_S)
        except StoreSilent as exc:
            raise NotEveryRank([r for r, p in enumerate(present) if not p], exc) from exc

    def give_up(self, prefix: str) -> None:
        """Withdraw from the attempt ``prefix`` (from `meet`) and move the counter past it
        (waiting at most `ROLL_CALL_S` for the store; a silent store is left as it is)."""
        base, attempt = prefix.rsplit("/", 1)

        def withdraw(store) -> None:
            store.delete_key(f"{prefix}/{self.rank}")
            store.compare_set(f"{base}/attempt", attempt, str(int(attempt) + 1))

        try:
            self.store.run("the rebuild's withdrawal", withdraw, self._roll_call_s)
        except StoreSilent:  # the store is frozen or gone: the next attempt says so
            pass

    def rebuilt(self) -> None:
        """The groups were rebuilt on every rank: usable again, next generation."""
        self.generation += 1
        self.broken = False
        self._silent = None
        self._roll_called = False

    def describe(self, silent: list[int] | None) -> str:
        """A few words on who did not answer, for `eplb.errors.peer_failure`."""
        if silent is None:
            return (f"global rank 0, which hosts the job's key-value store, did not answer the roll call within "
                    f"{self._roll_call_s:g} s either: it is the rank that froze or died, or its host is unreachable")
        if silent:
            names = ", ".join(map(str, silent))
            return f"rank {names} did not answer" if len(silent) == 1 else f"ranks {names} did not answer"
        return ("every rank answered a roll call afterwards: one was frozen or slow past async_timeout_s "
                "(perhaps this one), or left the collective (an exception or Ctrl-C on that rank)")


def missing_ranks_error(what: str, exc: NotEveryRank, timeout_s: float) -> EPLBError:
    """The `EPLBError` of a rendezvous that did not gather every rank; raise it ``from
    exc.store_error`` (None when ranks were missing) so a store's failure stays chained."""
    if exc.store_error is not None:
        return EPLBError(
            f"{what}: {exc.store_error} (async_timeout_s is {timeout_s} s); every rank must reach this point "
            "within async_timeout_s of the others: retry once global rank 0 is back, or restart every rank"
        )
    names = ", ".join(map(str, exc.missing))
    who = f"rank {names} did not arrive" if len(exc.missing) == 1 else f"ranks {names} did not arrive"
    return EPLBError(
        f"{what}: {who} within async_timeout_s ({timeout_s} s); every rank of the expert-parallel group "
        "must reach this point within async_timeout_s of the others (retry once they are back, or raise "
        "async_timeout_s)"
    )
