"""Fault injection for the test suite: a Ctrl-C at every line of a function, and at random moments.

`interrupt_at_every_line` runs an action once per line that the chosen functions execute, and at
that line raises ``SIGINT`` in the process (``signal.raise_signal``: exactly what Ctrl-C does,
so `eplb.atomic.critical_section` defers it as it would a user's). After each run a check
sees the state; `assert_old_or_new` is the usual check: the state is the one before the action
or the one after it, never a mix.

The line events come from a ``sys.settrace`` tracer, counted in the frames of the chosen
functions (``deep=True``: also in every Python frame they call, torch's included). Importable
from any test: ``tests/`` is on ``sys.path``. `random_interrupts` sends real ``SIGINT``s at
random moments instead, for soaks.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["interrupt_at_every_line", "interrupt_at_line", "count_lines", "assert_old_or_new", "same_state",
           "random_interrupts"]


class _InterruptAt:
    """A tracer that raises SIGINT at the ``target``-th line event of the chosen code."""

    def __init__(self, codes: set, target: int, deep: bool):
        self.codes, self.target, self.deep = codes, target, deep
        self.count = 0
        self.fired_at: str | None = None

    def __call__(self, frame, event, arg):  # global tracer: decides which frames get line events
        if event != "call":
            return None
        if frame.f_code in self.codes or (self.deep and self._inside_target(frame)):
            return self._line
        return None

    def _inside_target(self, frame) -> bool:
        frame = frame.f_back
        while frame is not None:
            if frame.f_code in self.codes:
                return True
            frame = frame.f_back
        return False

    def _line(self, frame, event, arg):
        if event == "line" and self.fired_at is None:
            if self.count == self.target:
                self.fired_at = f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
                signal.raise_signal(signal.SIGINT)  # KeyboardInterrupt here, unless deferred
            self.count += 1
        return self._line


def interrupt_at_every_line(
    functions: Iterable[Callable],
    setup: Callable[[], Any],
    action: Callable[[Any], Any],
    check: Callable[[Any, str], None],
    *,
    deep: bool = False,
    limit: int = 5000,
) -> int:
    """Run ``action(setup())`` once per line event of ``functions``, with a Ctrl-C at that line.

    Args:
        functions: the functions (or methods) whose lines are interrupted.
        setup: builds a fresh object for one run.
        action: the operation under test, called with the object.
        check: ``check(obj, where)`` asserts the object's state after an interrupted run;
            ``where`` names the interrupted line for the failure message.
        deep: also interrupt at the lines of every Python function ``functions`` call.
        limit: the most runs (a safety net against an action that never ends).

    Returns:
        The number of interrupted runs (>= 1, or the test is vacuous and this raises).

    Each run must end with the ``KeyboardInterrupt`` (raised at the line, or re-raised where a
    critical section ends): a swallowed interrupt fails the test.
    """
    assert threading.current_thread() is threading.main_thread(), "signals reach the main thread only"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "SIGINT must raise KeyboardInterrupt"
    codes = {getattr(f, "__func__", f).__code__ for f in functions}
    runs = 0
    while runs < limit:
        obj = setup()
        tracer = _InterruptAt(codes, runs, deep)
        interrupted = False
        previous = sys.gettrace()
        grad_enabled = torch.is_grad_enabled()
        sys.settrace(tracer)
        try:
            action(obj)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(previous)
            # An interrupt inside torch's own grad-mode context managers can leave the global
            # grad mode switched (torch's affair, not the code under test): restore it.
            torch.set_grad_enabled(grad_enabled)
        if tracer.fired_at is None:  # the action has fewer lines than ``runs``: every line was tried
            assert not interrupted
            assert runs > 0, "the action never executed a line of the chosen functions"
            return runs
        assert interrupted, f"the interrupt at {tracer.fired_at} was swallowed"
        check(obj, tracer.fired_at)
        runs += 1
    raise AssertionError(f"more than {limit} line events; raise limit or choose narrower functions")


class interrupt_at_line:  # noqa: N801 - used as a statement: ``with interrupt_at_line(...) as where:``
    """Context manager: a Ctrl-C (``SIGINT``) at the ``target``-th line event of ``functions``
    executed inside the block (``deep``: also in every Python function they call). ``fired_at``
    names the line once it fired (None: the block executed fewer lines). For a test that drives
    the runs itself, e.g. one rank of several interrupted at one line per run."""

    def __init__(self, functions: Iterable[Callable], target: int, *, deep: bool = False):
        self._tracer = _InterruptAt({getattr(f, "__func__", f).__code__ for f in functions}, target, deep)

    @property
    def fired_at(self) -> str | None:
        return self._tracer.fired_at

    @property
    def lines(self) -> int:
        """Line events of ``functions`` counted so far."""
        return self._tracer.count

    def __enter__(self) -> interrupt_at_line:
        self._previous = sys.gettrace()
        self._grad_enabled = torch.is_grad_enabled()
        sys.settrace(self._tracer)
        return self

    def __exit__(self, *exc_info) -> None:
        sys.settrace(self._previous)
        torch.set_grad_enabled(self._grad_enabled)


def count_lines(functions: Iterable[Callable], action: Callable[[], Any], *, deep: bool = False) -> int:
    """The line events of ``functions`` that ``action()`` executes (no interrupt)."""
    with interrupt_at_line(functions, -1, deep=deep) as counter:
        action()
    return counter.lines


def same_state(a: Any, b: Any) -> bool:
    """Structural equality of nested dicts/lists/tuples of tensors and plain values (tensors:
    same dtype, shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def assert_old_or_new(
    functions: Iterable[Callable],
    setup: Callable[[], Any],
    action: Callable[[Any], Any],
    snapshot: Callable[[Any], Any],
    *,
    deep: bool = False,
    both: bool = True,
) -> int:
    """`interrupt_at_every_line` whose check is: ``snapshot(obj)`` equals the snapshot before the
    action or the one after an uninterrupted action. Returns the number of interrupted runs. With
    ``both``, each outcome must occur (an interrupt before the change, one deferred past it), or
    the test would be vacuous; pass ``both=False`` for an action whose change is its last line."""
    obj = setup()
    old = snapshot(obj)
    action(obj)
    new = snapshot(obj)
    assert not same_state(old, new), "the action changed nothing: the test would prove nothing"
    seen = set()

    def check(obj: Any, where: str) -> None:
        state = snapshot(obj)
        if same_state(state, old):
            seen.add("old")
        elif same_state(state, new):
            seen.add("new")
        else:
            raise AssertionError(f"an interrupt at {where} left a half-applied state")

    runs = interrupt_at_every_line(functions, setup, action, check, deep=deep)
    assert seen == ({"old", "new"} if both else {"old"}), f"only the {seen} state was seen in {runs} interrupted runs"
    return runs


class random_interrupts:  # noqa: N801 - used as a statement: ``with random_interrupts(...) as armed:``
    """Context manager: a thread sends the main thread a real ``SIGINT`` at random moments,
    ``gap_s = (low, high)`` seconds apart (uniform, from ``random.Random(seed)``).

    The ``SIGINT`` raises ``KeyboardInterrupt`` only while armed (``armed.on()`` before the
    calls under test, ``armed.off()`` after), once per arming, so the test's own lines are never
    interrupted. Leaving stops the thread and restores the previous handler and grad mode (an
    interrupt inside ``torch.no_grad``'s exit can flip it)."""

    def __init__(self, gap_s: tuple[float, float], seed: int = 0):
        self._gap_s, self._rng = gap_s, random.Random(seed)
        self._armed = False
        self._stop = threading.Event()

    def on(self) -> None:
        self._armed = True

    def off(self) -> None:
        self._armed = False

    def _handler(self, signum, frame) -> None:
        if self._armed:
            self._armed = False
            raise KeyboardInterrupt

    def _send(self, main_thread: int) -> None:
        while not self._stop.wait(self._rng.uniform(*self._gap_s)):
            signal.pthread_kill(main_thread, signal.SIGINT)

    def __enter__(self) -> random_interrupts:
        self._grad_enabled = torch.is_grad_enabled()
        self._previous = signal.signal(signal.SIGINT, self._handler)
        self._thread = threading.Thread(target=self._send, args=(threading.main_thread().ident,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._armed = False
        self._stop.set()
        self._thread.join()
        signal.signal(signal.SIGINT, self._previous)
        torch.set_grad_enabled(self._grad_enabled)
