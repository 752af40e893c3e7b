"""What eplb does after a peer rank stopped answering: a roll call that names the ranks gone, a
rendezvous of every rank bounded by a timeout, and new gloo groups to replace the broken ones.

A gloo collective that timed out closes its connections: its process group cannot be used
again on any rank. eplb's own gloo groups (the control group and the weight-transfer group) are
therefore rebuilt, never repaired: once every rank is back, each one meets the others through the
job's key-value store (the one ``torch.distributed.init_process_group`` created, hosted by global
rank 0) and creates a new group of the same ranks under a name no group has had.

Every wait here is bounded by the ``timeout_s`` it is given (eplb passes ``async_timeout_s``),
except when global rank 0, which hosts the store, is the rank that froze: then the store itself
does not answer and its own timeout (``init_process_group``'s) applies.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from eplb.errors import EPLBError

__all__ = ["GroupHealth", "NotEveryRank", "rendezvous", "new_gloo_group", "missing_ranks_error", "ROLL_CALL_S"]

ROLL_CALL_S = 1.0
"""How long a rank whose collective failed waits for the others' roll-call answers (at most
``async_timeout_s``): the failure reaches the live ranks within about this long of each other."""

_POLL_S = 0.02


class NotEveryRank(Exception):
    """A rendezvous ended before every rank arrived. ``missing``: the ranks (in the EP group)
    that did not arrive; ``store_silent``: the store itself did not answer."""

    def __init__(self, missing: list[int], store_silent: bool):
        super().__init__(f"ranks {missing} missing" + (" (the store did not answer)" if store_silent else ""))
        self.missing = missing
        self.store_silent = store_silent


def _store():
    return c10d._get_default_store()


def _present(store, key: str) -> bool | None:
    """Whether ``key`` is in the store; None when the store does not answer."""
    try:
        return bool(store.check([key]))
    except Exception:  # noqa: BLE001 - the store's host froze or left: treated as "no answer"
        return None


def rendezvous(key: str, rank: int, num_ranks: int, payload, timeout_s: float) -> list:
    """Publish ``payload`` (JSON-serialisable) under ``key`` and wait, at most ``timeout_s``,
    for every rank's; returns the ``num_ranks`` payloads in rank order.

    Collective over the ranks that use the same ``key``; calling it again with the same key
    after a `NotEveryRank` joins the same rendezvous (the payload is written again).

    Raises:
        NotEveryRank: naming the ranks that had not arrived by the deadline.
    """
    store = _store()
    keys = [f"{key}/{r}" for r in range(num_ranks)]
    store.set(keys[rank], json.dumps(payload))
    deadline = time.monotonic() + timeout_s
    while True:
        present = [_present(store, k) for k in keys]
        if all(present):
            return [json.loads(store.get(k)) for k in keys]
        if time.monotonic() >= deadline:
            silent = any(p is None for p in present)
            raise NotEveryRank([r for r, p in enumerate(present) if not p], silent)
        time.sleep(_POLL_S)


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
        len(ranks), ranks.index(me), ranks, "gloo", _store(), getattr(c10d, "GroupName", str)(name),
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

    ``broken`` is set by `lost` (a collective failed); the wrapper then rebuilds the groups
    before eplb's next collective, and ``generation`` counts the rebuilds (the same on every rank).
    """

    def __init__(self, key: str, rank: int, num_ranks: int, timeout_s: float):
        self.key, self.rank, self.num_ranks, self.timeout_s = key, rank, num_ranks, timeout_s
        self.broken = False
        self.generation = 0
        self._silent: list[int] | None = None
        self._roll_called = False

    def lost(self) -> list[int] | None:
        """Mark the groups broken and, the first time in this generation, hold a roll call: every
        rank whose collective failed answers it, and the ranks that have not answered within
        `ROLL_CALL_S` (or ``timeout_s`` if shorter) are returned, as the ranks that stopped
        answering. ``[]``: every rank answered (one was slow or frozen and is back, maybe this
        one). None: the store did not answer either."""
        self.broken = True
        if self._roll_called:
            return self._silent
        self._roll_called = True
        try:
            rendezvous(f"{self.key}/roll-call/{self.generation}", self.rank, self.num_ranks, 1,
                       min(ROLL_CALL_S, self.timeout_s))
            self._silent = []
        except NotEveryRank as exc:
            self._silent = None if exc.store_silent else exc.missing
        except Exception:  # noqa: BLE001 - the store's host is gone: no names to give
            self._silent = None
        return self._silent

    def left(self) -> None:
        """Mark the groups broken because this rank left a sequence of collectives in the middle
        (an exception or Ctrl-C on this rank, not a failed collective): its peers may wait in a
        collective it will never issue. Answers this generation's roll call at once, without
        waiting, so a peer whose collective times out learns that this rank is alive."""
        self.broken = True
        try:
            _store().set(f"{self.key}/roll-call/{self.generation}/{self.rank}", json.dumps(1))
        except Exception:  # noqa: BLE001 - the store's host is gone: the rebuild says so
            pass

    def meet(self, payload) -> tuple[list, str]:
        """The rendezvous of a rebuild: publish ``payload`` (JSON-serialisable) and wait, at most
        ``timeout_s``, for every rank's. Returns the payloads in rank order and a store prefix
        no group has used, the same on every rank (the names of the new groups start with it).

        Attempts are numbered by a counter in the store. A rank that gives up on an attempt
        withdraws its payload and moves the counter on; a rank still waiting follows the counter
        and publishes again under the new number, so ranks that come back at different times
        meet. Raises `NotEveryRank` naming the ranks that did not come."""
        store = _store()
        base = f"{self.key}/rebuild/{self.generation}"
        counter = f"{base}/attempt"
        deadline = time.monotonic() + self.timeout_s
        attempt = None
        while True:
            current = int(store.add(counter, 0))
            if current != attempt:
                attempt = current
                store.set(f"{base}/{attempt}/{self.rank}", json.dumps(payload))
            keys = [f"{base}/{attempt}/{r}" for r in range(self.num_ranks)]
            present = [_present(store, k) for k in keys]
            if all(present):
                return [json.loads(store.get(k)) for k in keys], f"{base}/{attempt}"
            if time.monotonic() >= deadline:
                missing = [r for r, p in enumerate(present) if not p]
                self.give_up(f"{base}/{attempt}")
                raise NotEveryRank(missing, any(p is None for p in present))
            time.sleep(_POLL_S)

    def give_up(self, prefix: str) -> None:
        """Withdraw from the attempt ``prefix`` (from `meet`) and move the counter past it."""
        store = _store()
        base, attempt = prefix.rsplit("/", 1)
        try:
            store.delete_key(f"{prefix}/{self.rank}")
            store.compare_set(f"{base}/attempt", attempt, str(int(attempt) + 1))
        except Exception:  # noqa: BLE001 - the store is gone: the next attempt says so
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
            return "a peer rank died or stopped answering (the store, hosted by global rank 0, did not answer either)"
        if silent:
            names = ", ".join(map(str, silent))
            return f"rank {names} did not answer" if len(silent) == 1 else f"ranks {names} did not answer"
        return ("every rank answered a roll call afterwards: one was frozen or slow past async_timeout_s "
                "(perhaps this one), or left the collective (an exception or Ctrl-C on that rank)")


def missing_ranks_error(what: str, exc: NotEveryRank, timeout_s: float) -> EPLBError:
    """The `EPLBError` of a rendezvous that did not gather every rank."""
    if exc.store_silent:
        who = "the store (hosted by global rank 0) did not answer"
    else:
        names = ", ".join(map(str, exc.missing))
        who = f"rank {names} did not arrive" if len(exc.missing) == 1 else f"ranks {names} did not arrive"
    return EPLBError(
        f"{what}: {who} within async_timeout_s ({timeout_s} s); every rank of the expert-parallel group "
        "must reach this point within async_timeout_s of the others (retry once they are back, or raise "
        "async_timeout_s)"
    )
