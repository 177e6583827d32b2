"""Exceptions raised by graphexec, and the stand-ins it builds for remote ones.

The hierarchy::

    GraphexecError                 base of everything graphexec raises itself
    ├── GraphFailed                compute() ended with unhandled failures; .run keeps
    │                              every result and state
    ├── TaskFailure                a fault detected *around* a task, stored as the
    │   │                          exception of that one node's Failed state
    │   ├── WorkerCrashed          the worker process died while running the node
    │   │                          (.exitcode, .signal_name)
    │   ├── TaskTimeout            the attempt ran past its timeout= (also a TimeoutError)
    │   ├── MemoryLimitExceeded    the worker's RSS went over memory_limit= (.limit, .rss;
    │   │                          also a MemoryError)
    │   └── SerializationError     an argument, result, function or exception would
    │       │                      not pickle or unpickle (.stage)
    │       └── RemoteError        the task raised an exception that cannot cross a
    │                              process boundary; keeps its type name, message and
    │                              traceback text
    ├── UpstreamFailed             what a Skipped node holds, and what a dependent that
    │                              allowed a skipped upstream receives in its place
    ├── Cancelled                  what a Cancelled node holds (fail_fast, Ctrl-C)
    └── ResultReleased             the value was freed once no pending node needed it
                                   (also a KeyError)

    KeyboardInterrupt
    └── Terminated                 SIGTERM arrived while a compute ran (a batch system's
                                   walltime, docker stop); .run holds the partial run

Every class pickles (they cross process boundaries inside ``Run`` objects and
states) and every message says which node it concerns and what to do.
"""

from __future__ import annotations

import re
import signal
from typing import Any

__all__ = [
    "Cancelled",
    "GraphFailed",
    "GraphexecError",
    "MemoryLimitExceeded",
    "RemoteError",
    "ResultReleased",
    "SerializationError",
    "TaskFailure",
    "TaskTimeout",
    "Terminated",
    "UpstreamFailed",
    "WorkerCrashed",
]


class GraphexecError(Exception):
    """Base class of the exceptions graphexec raises itself.

    Attributes set by keyword are kept in ``__dict__`` so that the default
    ``BaseException.__reduce__`` (class, args, __dict__) pickles them.
    """

    def __init__(self, message: str = "", **attrs: Any) -> None:
        super().__init__(message)
        self.__dict__.update(attrs)

    @property
    def message(self) -> str:
        """The message the exception was created with."""
        return self.args[0] if self.args else ""


class GraphFailed(GraphexecError):
    """Raised by ``compute()`` after the run, when a failure was not handled.

    ``.run`` is the complete :class:`graphexec.Run`: completed results are never
    lost. ``__cause__`` is the first failure's exception, which itself chains
    the remote traceback text.
    """

    run: Any


class TaskFailure(GraphexecError):
    """A fault graphexec detected around a task rather than one it raised.

    ``.node`` names the node it concerns. ``.retryable`` is False where another
    attempt would fail the same way without running the task (its function or
    arguments would not pickle; the pool was closed): the node's ``retries=``
    are not spent on it.
    """

    node: str | None = None
    retryable: bool = True


class WorkerCrashed(TaskFailure):
    """The worker process died while running the node (segfault, os._exit, OOM killer).

    ``.exitcode`` is the process exit code (negative: killed by a signal) and
    ``.signal_name`` the signal's name when there was one.
    """

    exitcode: int | None = None
    signal_name: str | None = None


class TaskTimeout(TaskFailure, TimeoutError):
    """The attempt ran past the task's ``timeout=``, and was stopped: on the process
    pool its worker was killed and replaced; a thread (``scheduler="threads"``) or
    a dask task cannot be killed, so its call was abandoned and runs on, its result
    dropped; ``"sync"`` judges the timeout when the call returns (docs/backends.md)."""

    timeout: float | None = None


class MemoryLimitExceeded(TaskFailure, MemoryError):
    """The worker's resident memory went over ``memory_limit=``; it was killed and replaced."""

    limit: int | None = None
    rss: int | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> MemoryLimitExceeded:
        # ``cls.__new__(cls)`` would find MemoryError.__new__, which refuses a
        # class whose layout comes from Exception ("not safe"). Unpicklers that
        # rebuild exceptions that way — tblib's, which dask.distributed installs
        # for every exception class on import — would fail on this one.
        return Exception.__new__(cls, *args)


class SerializationError(TaskFailure):
    """Something about a node would not pickle or unpickle.

    ``.stage`` is one of ``"function"``, ``"arguments"``, ``"unpickle-arguments"``,
    ``"result"``, ``"unpickle-result"``, or ``"exception"`` (a :class:`RemoteError`).
    At ``"unpickle-arguments"``, ``.upstream`` names the input node whose value did
    not rebuild in the worker, when it was a node's value (else None).
    """

    stage: str | None = None
    upstream: str | None = None
    input_node: int | None = None  # the worker's: that input's index, named by the scheduler


class RemoteError(SerializationError):
    """The task raised an exception that could not be sent back to the parent.

    A :class:`SerializationError` at ``.stage == "exception"``, standing in for it:
    ``.type_name`` is the qualified name of the original type, ``.original_message``
    its ``str()``, and ``.remote_traceback`` the traceback text from the worker.
    """

    stage: str | None = "exception"
    type_name: str | None = None
    original_message: str | None = None
    remote_traceback: str | None = None


class UpstreamFailed(GraphexecError):
    """The node was skipped: an upstream node failed, or its trigger was not met.

    ``.node`` is the skipped node's name and ``.upstream`` the failed node that
    caused the skip (the root cause, through chains of skips), or None when
    the node's ``trigger=`` was not met although nothing failed (e.g.
    ``any_failed`` when every upstream succeeded).
    """

    node: str | None = None
    upstream: str | None = None


class Cancelled(GraphexecError):
    """The node was cancelled before it finished (``fail_fast=True`` or Ctrl-C)."""

    node: str | None = None


class ResultReleased(GraphexecError, KeyError):
    """The node ran, but its value is gone: freed once no pending node needed it (or,
    on a dask cluster, no longer held there: the Client was closed, the worker died)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a compute ran; raised like Ctrl-C's ``KeyboardInterrupt``.

    ``.run`` holds the partial run, as for Ctrl-C. Uncaught, it ends the
    process by SIGTERM (see the module docstring).
    """

    signum = signal.SIGTERM
    run: Any


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the ``__cause__`` of its exception.

    The same device as ``concurrent.futures.process._RemoteTraceback``: the user
    catches their own exception type and still sees where it was raised.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except BaseException:
        return f"<str() of the {type(exc).__name__} failed>"


# Characters of an error's text that a line of a report (one_line) and a State's
# message keep: an exception with megabytes of message made every summary, report
# and GraphFailed that big (the exception itself keeps all of it)
LINE_MAX = 500
MESSAGE_MAX = 4000
# what str.splitlines() splits at, for the first line alone (not a list of them all)
_LINE_BREAK = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def capped(text: str, limit: int = MESSAGE_MAX) -> str:
    """``text``, or its first ``limit`` characters and how many there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters in all)"


def one_line(exc: BaseException | None) -> str:
    """``Type: first line of the message``: how reports, pictures and run hooks name an
    error ("" for None); at most :data:`LINE_MAX` characters of it."""
    if exc is None:
        return ""
    first = _LINE_BREAK.split(safe_str(exc).strip(), maxsplit=1)[0]
    if not first:  # (a bare KeyboardInterrupt, ValueError())
        return type(exc).__name__
    return f"{type(exc).__name__}: {capped(first, LINE_MAX)}"


def describe_exitcode(exitcode: int | None) -> tuple[str | None, str]:
    """Return ``(signal_name, advice)`` for a worker's exit code."""
    if exitcode is None:
        return None, "the worker vanished without an exit code"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hints = {
            "SIGKILL": "killed with SIGKILL: often the kernel's out-of-memory killer; "
            "check `dmesg` and consider memory_limit=",
            "SIGSEGV": "segmentation fault: a bug in a C extension, or a stack overflow",
            "SIGABRT": "aborted: a C library called abort()",
            "SIGBUS": "bus error: often a truncated memory-mapped file",
            "SIGTERM": "terminated by another process",
        }
        return name, hints.get(name, f"killed by {name}")
    return None, f"the process exited with code {exitcode} (a call to sys.exit or os._exit?)"
