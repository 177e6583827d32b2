"""SIGTERM handled like Ctrl-C while a compute runs, then the process dies of it.

Batch systems (SLURM and PBS at walltime), ``docker stop`` and Kubernetes end
a job with SIGTERM, then SIGKILL a little later. Python's default for
SIGTERM is to die on the spot: no cancel, no run record, no ``finally``. So
while ``compute()`` runs the scheduler in the main thread, and only if
nobody else has claimed SIGTERM (its handler is ``SIG_DFL``),
:func:`sigterm_as_interrupt` installs a handler that raises
:class:`Terminated` — a ``KeyboardInterrupt``, so everything that handles
Ctrl-C handles it: the compute cancels, stops its workers and raises it with
``.run``, the partial run; the program's ``except``/``finally`` run.

Then, as Python itself does for an uncaught ``KeyboardInterrupt`` (which
ends the process by SIGINT), a ``Terminated`` that nobody catches ends the
process by SIGTERM: after the traceback, the ``atexit`` hooks run (pools
close, logs flush), the default handler is restored and the process sends
itself SIGTERM, so its parent sees "killed by SIGTERM" (status -15 to
``subprocess``, 143 in a shell). A program that catches it decides itself.

A second SIGTERM meanwhile is not intercepted: the default action ends the
process at once, and the pool's guard and its workers' watchdogs take the
workers and their descendants down, as after a SIGKILL.

On a shared pool (``gx.Pool``) the main thread may be driving the pool for
other threads' runs too; a ``KeyboardInterrupt`` raised between two of its
bytecodes there could lose another run's outcomes. So while a compute on a
``gx.Pool`` runs in the main thread, :func:`deferred_in_critical_sections`
wraps the Python handlers of SIGINT and SIGTERM (``default_int_handler``,
this module's, or the program's own) so that inside the pool's critical
sections they wait (``_executors/shared.py``'s ``SHIELD``) and run when the
section ends: at most ``SIGNAL_SLICE`` later.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .._executors.shared import SHIELD
from .._model.errors import Terminated


def cancel_reason(interrupt: BaseException) -> str:
    """What a node cancelled by ``interrupt`` says it was cancelled by."""
    if isinstance(interrupt, Terminated):
        return "terminated (SIGTERM)"
    return "interrupted (Ctrl-C)"


def mark_interrupted(run: Any, interrupt: BaseException) -> None:
    """``run`` was cancelled by ``interrupt`` (Ctrl-C, SIGTERM) before it ended: it
    is not ``ok``, and its headline, JSON and report say why."""
    run._interrupted = "cancelled by " + (
        "SIGTERM" if isinstance(interrupt, Terminated) else "Ctrl-C"
    )


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread.

    Nothing is installed outside the main thread (Python runs handlers only
    there), nor over a handler someone else set (anything but ``SIG_DFL``,
    including ``SIG_IGN`` and a handler set outside Python). The default is
    put back when the block ends without a SIGTERM.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            yield
            return
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        yield
        return
    received = False

    def on_sigterm(signum: int, frame: Any) -> None:
        nonlocal received
        received = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends us at once
        if SHIELD.defer(on_sigterm, signum, frame):
            return  # raised when the shared pool's critical section ends
        _die_of_sigterm_if_uncaught()
        raise Terminated("SIGTERM: the compute was cancelled; .run holds what finished")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if not received:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def deferred_in_critical_sections() -> Iterator[None]:
    """Within the block, SIGINT's and SIGTERM's Python handlers wait out the critical
    sections of a shared pool's drive (``SHIELD``), then run as they would have.

    Main thread only (elsewhere nothing is installed: Python runs handlers
    there only); a handler that is not a Python callable (``SIG_DFL``,
    ``SIG_IGN``, one set outside Python) is left alone. Each wrapped handler
    is put back when the block ends, unless someone replaced the wrapper
    meanwhile. Nested blocks wrap once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wrapped: list[tuple[int, Any, Any]] = []
    signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
    for signum in signums:
        try:
            handler = signal.getsignal(signum)
        except (ValueError, OSError):  # no signals here (an embedded interpreter)
            continue
        if not callable(handler) or getattr(handler, "_graphexec_deferring", False):
            continue
        wrapper = _deferring(handler)
        signal.signal(signum, wrapper)
        wrapped.append((signum, handler, wrapper))
    try:
        yield
    finally:
        for signum, handler, wrapper in wrapped:
            if signal.getsignal(signum) is wrapper:
                signal.signal(signum, handler)


def _deferring(handler: Any) -> Any:
    """``handler``, run at the end of the critical section it lands in, if any."""

    def deferring(signum: int, frame: Any) -> Any:
        if SHIELD.defer(handler, signum, frame):
            return None
        return handler(signum, frame)

    deferring._graphexec_deferring = True  # type: ignore[attr-defined]
    return deferring


def _die_of_sigterm_if_uncaught() -> None:
    """Make an uncaught :class:`Terminated` end the process by SIGTERM."""
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        if isinstance(value, Terminated):
            _die_of_sigterm()

    sys.excepthook = excepthook


def _die_of_sigterm() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    # What an orderly exit would still run: pools close, logging flushes.
    atexit._run_exitfuncs()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)  # delivered at once unless blocked; then the shell's convention
    os._exit(128 + signal.SIGTERM)
