"""Atomic state changes: validate and stage first, then apply inside a short critical section.

Every change of eplb's state that a user's interrupt (Ctrl-C: ``SIGINT``, raised as
``KeyboardInterrupt``) or an exception could cut in half follows one pattern:

1. **Validate and stage**, outside any critical section: check every input and build every new
   value (new tensors, prepared layer commits, a new `eplb.Placement`). This may raise; nothing
   has changed yet, so the previous state stands.
2. **Apply** inside ``with critical_section():`` — in-place copies of validated, same-shaped
   tensors and attribute assignments, nothing that can fail on valid input and nothing that
   waits on another rank (four exceptions, where a rank interrupted half-way would part from its
   peers: an executor's commit agreement with the commits it decides and the owner's bookkeeping
   of them, ``load_state_dict``'s agreement with the apply it decides, the creation of rebuilt
   groups, and ``unwrap()``'s all-gathers with their record; see docs/design.md). A ``SIGINT`` that arrives
   meanwhile is held and delivered again when the section ends, so the interrupt lands after the
   change, never inside it.

The callers are the tracker's step and state loading, a layer's commit (slot weights and maps
together) and the wrapper's state loading. A section costs one ``getsignal`` and two ``signal``
calls of the C module behind `signal` (about 1 microsecond) on the main thread, and nothing on
other threads, which never run Python signal handlers.
"""

from __future__ import annotations

import signal
import threading

try:  # the C functions behind `signal`, without its enum conversions: ~10x cheaper per call
    import _signal as _sig
except ImportError:  # pragma: no cover - other Pythons
    _sig = signal

__all__ = ["critical_section"]


class critical_section:  # noqa: N801 - used as a statement: ``with critical_section():``
    """Context manager that defers ``SIGINT`` until the block ends, then re-delivers it.

    On the main thread, entering installs a handler that only notes a ``SIGINT``; leaving
    restores the previous handler and, if a ``SIGINT`` was noted, raises it again with
    ``signal.raise_signal``, so the previous handler (Python's ``KeyboardInterrupt``, a user's
    handler, ``SIG_IGN`` or ``SIG_DFL``) runs exactly as if the signal came at that moment.
    Nested sections defer to the outermost one. On other threads, and when the current handler
    was installed outside Python (it could not be restored), it does nothing.

    Exceptions raised inside the block are not deferred: put only code that cannot fail on
    validated input inside (see the module docstring).
    """

    __slots__ = ("_previous", "_pending")
    _outermost: critical_section | None = None  # the active outermost section (main thread only)

    def __enter__(self) -> critical_section:
        self._previous = None
        if critical_section._outermost is not None or threading.current_thread() is not threading.main_thread():
            return self
        previous = _sig.getsignal(signal.SIGINT)
        if previous is None:
            return self
        self._pending = False  # before the handler that sets it is installed
        try:
            _sig.signal(signal.SIGINT, self._hold)
        except ValueError:  # a sub-interpreter's main thread: Python delivers it no signal
            return self
        self._previous = previous
        critical_section._outermost = self
        return self

    def __exit__(self, *exc_info) -> None:
        previous = self._previous
        if previous is None:
            return
        self._previous = None
        # A SIGINT from here until the restore still reaches _hold and is re-raised below.
        critical_section._outermost = None
        _sig.signal(signal.SIGINT, previous)
        if self._pending:
            signal.raise_signal(signal.SIGINT)

    def _hold(self, signum, frame) -> None:
        self._pending = True
