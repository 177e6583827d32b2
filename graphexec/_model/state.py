"""States of a node: one small record per node, as the user sees it."""

from __future__ import annotations

import time
from typing import Any

from .errors import (
    Cancelled,
    GraphexecError,
    ResultReleased,
    SerializationError,
    UpstreamFailed,
    capped,
    safe_str,
)
from .handle import discard, materialize
from .seam import surfaces

PENDING = "Pending"
RUNNING = "Running"
RETRYING = "Retrying"
COMPLETED = "Completed"
CACHED = "Cached"
FAILED = "Failed"
SKIPPED = "Skipped"
CANCELLED = "Cancelled"
CRASHED = "Crashed"  # a run's outcome only (a Prefect-style run hook's state), never a node's

FINAL = frozenset({COMPLETED, CACHED, FAILED, SKIPPED, CANCELLED})
# The order every report lists states in. Running and Pending come last: a finished
# run has none; a record cut off mid-run (Run.load of a killed parent's run_dir)
# shows what was running and what never began.
STATE_ORDER = (COMPLETED, CACHED, FAILED, SKIPPED, CANCELLED, RUNNING, PENDING)

# State names are compared by identity (``state.name is COMPLETED``) on the hot
# paths; a State that crossed a process boundary gets its name back from here.
CANONICAL = {
    n: n for n in (PENDING, RUNNING, RETRYING, COMPLETED, CACHED, FAILED, SKIPPED, CANCELLED)
}

# What a released value becomes (``State._release``; the scheduler sets it
# itself for a value that holds nothing outside this process's heap).
RELEASED = _RELEASED = object()


class Attempt:
    """One try of a node: when and where it ran and how it ended (``error`` or None)."""

    __slots__ = ("error", "finished", "number", "retry_delay", "started", "worker")

    def __init__(
        self,
        number: int,
        started: float,
        finished: float,
        worker: Any,
        error: BaseException | None,
    ) -> None:
        self.number = number
        self.started = started  # time.time() wall clock, for timelines
        self.finished = finished
        self.worker = worker
        self.error = error
        self.retry_delay: float | None = None  # delay chosen before the next attempt

    @property
    def duration(self) -> float:
        """Seconds the attempt ran."""
        return self.finished - self.started

    def __repr__(self) -> str:
        outcome = "ok" if self.error is None else type(self.error).__name__
        return f"<Attempt {self.number} {outcome} {self.duration:.3f}s on {self.worker}>"


class State:
    """The state of one node in one run.

    ``name`` is one of ``Pending``, ``Running``, ``Retrying``, ``Completed``,
    ``Cached``, ``Failed``, ``Skipped``, ``Cancelled``. ``result()`` returns the
    value or re-raises, as Prefect's ``State.result()`` does. (A run hook taking
    Prefect's ``(flow, flow_run, state)`` gets the run's outcome as a State too:
    ``Completed``, ``Failed``, ``Cancelled`` or ``Crashed``, named after the run.)

    Attributes:
        name: the state's name.
        node: the node's name.
        exception: the exception of a Failed node (the task's own, or a
            :class:`TaskFailure`), :class:`UpstreamFailed` for Skipped,
            :class:`Cancelled` for Cancelled; None otherwise.
        attempts: how many attempts ran (retries included).
        history: the :class:`Attempt` records, oldest first.
        upstream: for a Skipped node, the name of the failed node that caused the
            skip (the root cause, through chains of skips); None when the skip
            came from an unmet trigger.
        message: one line saying what happened.
    """

    # ``history`` is a property over two slots: ``_history``, the list once made,
    # and ``_attempt``, the fields of a node's only attempt while nobody has read
    # it. The scheduler records a node that completed at its first try without
    # an Attempt and a list: that is two objects fewer per node for the garbage
    # collector to walk (their numbers are in a tuple of atomic values, which
    # the collector stops tracking). See docs/dispatch.md, "Round four".
    __slots__ = (
        "_attempt",
        "_history",
        "_value",
        "exception",
        "message",
        "name",
        "node",
        "upstream",
    )

    def __init__(
        self,
        name: str,
        node: str,
        value: Any = None,
        exception: BaseException | None = None,
        history: list[Attempt] | None = None,
        upstream: str | None = None,
        message: str = "",
    ) -> None:
        self.name = name
        self.node = node
        self._value = value
        self.exception = exception
        self._history = history  # None: made when first read (see history)
        # (number, started, finished, worker) of the only attempt, which ended
        # without an error, while _history is None (the scheduler sets it)
        self._attempt: tuple[int, float, float, Any] | None = None
        self.upstream = upstream
        self.message = message

    @property
    def history(self) -> list[Attempt]:
        """The :class:`Attempt` records, oldest first."""
        history = self._history
        if history is None:
            once = self._attempt
            if once is None:
                history = self._history = []
            else:
                history = self._history = [Attempt(once[0], once[1], once[2], once[3], None)]
                self._attempt = None
        return history

    @history.setter
    def history(self, history: list[Attempt]) -> None:
        self._history = history
        self._attempt = None

    # -- predicates (Prefect's names) ----------------------------------------

    def is_completed(self) -> bool:
        """True for Completed and Cached: a value is available."""
        return self.name is COMPLETED or self.name is CACHED

    def is_cached(self) -> bool:
        """True if the value was loaded from the cache instead of computed."""
        return self.name is CACHED

    def is_failed(self) -> bool:
        """True if the node ran and failed (after its last attempt)."""
        return self.name is FAILED

    def is_skipped(self) -> bool:
        """True if the node never ran: an upstream failed, or its trigger was not met."""
        return self.name is SKIPPED

    def is_cancelled(self) -> bool:
        """True if the node was cancelled (``fail_fast`` or Ctrl-C)."""
        return self.name is CANCELLED

    def is_pending(self) -> bool:
        """True if the node has not started yet."""
        return self.name is PENDING

    def is_running(self) -> bool:
        """True while an attempt of the node is running."""
        return self.name is RUNNING

    def is_final(self) -> bool:
        """True once the node has a terminal state."""
        return self.name in FINAL

    # -- timing --------------------------------------------------------------

    @property
    def attempts(self) -> int:
        """Number of attempts that ran (0 if the node never ran)."""
        if self._history is None:
            return 0 if self._attempt is None else 1
        return len(self._history)

    @property
    def duration(self) -> float:
        """Seconds spent running, summed over attempts."""
        return sum(a.duration for a in self.history)

    @property
    def started(self) -> float | None:
        """Wall-clock start of the first attempt (``time.time()``), or None."""
        return self.history[0].started if self.history else None

    @property
    def finished(self) -> float | None:
        """Wall-clock end of the last attempt, or None."""
        return self.history[-1].finished if self.history else None

    # -- value ---------------------------------------------------------------

    def result(self, raise_on_failure: bool = True) -> Any:
        """The node's value; re-raises its exception for a Failed, Skipped or Cancelled node.

        Args:
            raise_on_failure: if false, return the exception instead of raising it.

        Raises:
            Exception: the task's own exception (with the remote traceback as
                ``__cause__``), or a :class:`TaskFailure`, for a Failed node.
            UpstreamFailed: for a Skipped node.
            Cancelled: for a Cancelled node.
            ResultReleased: the value was freed during the run.
            SerializationError: the value cannot be unpickled in this process
                (stage ``unpickle-result``); whatever its unpickling raised, but
                ``KeyboardInterrupt``, is its ``__cause__``.
        """
        if self.is_completed():
            if self._value is _RELEASED:
                raise ResultReleased(
                    f"the value of {self.node} was released once no pending node needed it; "
                    "pass the node as a target (graph.compute(node)) or use "
                    "compute(keep='all') to keep it"
                )
            try:
                self._value = materialize(self._value)
            except (KeyboardInterrupt, ResultReleased):  # (a cluster's value, gone: as it is)
                raise
            except BaseException as exc:  # SystemExit too: unpickling runs the value's code
                raise SerializationError(
                    f"the result of {self.node} could not be unpickled in this process: "
                    f"{type(exc).__name__}: {safe_str(exc)}. The task ran and returned it; is "
                    "every module its value needs importable here (same environment)?",
                    node=self.node,
                    stage="unpickle-result",
                ) from exc
            return self._value
        if self.exception is not None:
            if raise_on_failure:
                raise self.exception
            return self.exception
        raise GraphexecError(f"{self.node} is {self.name}: it has no result yet")

    def _release(self) -> None:
        discard(self._value)
        self._value = _RELEASED

    @property
    def released(self) -> bool:
        """True if the value was freed during the run."""
        return self._value is _RELEASED

    def __copy__(self) -> State:
        """A State of its own with the same fields, its history list copied (the
        scheduler's grows with the next attempt; a first try's numbers, not yet made
        into a list, are a tuple: shared as they are). What hooks and dependents
        receive: the scheduler's own may be released or retried meanwhile."""
        twin = State.__new__(State)
        for slot in State.__slots__:
            setattr(twin, slot, getattr(self, slot))
        if twin._history is not None:
            twin._history = list(twin._history)
        return twin

    def __reduce__(self) -> Any:
        # Sent to a worker (return_state=True) or pickled with a Run: unpickled
        # strings are new objects, so the name is restored to the canonical one.
        released = self._value is _RELEASED
        return (
            _restore_state,
            (
                self.name,
                self.node,
                None if released else self._value,
                self.exception,
                self.history,
                self.upstream,
                self.message,
                released,
            ),
        )

    def __repr__(self) -> str:
        extra = ""
        if self.exception is not None and self.name is FAILED:
            extra = f": {type(self.exception).__name__}: {safe_str(self.exception)}"
        elif self.message:
            extra = f": {self.message}"
        return single_line(f"<State {self.name} {self.node}{extra}") + ">"

    def _repr_html_(self) -> str:
        """How the state shows in a Jupyter notebook: one coloured line."""
        return surfaces.state_html(self)

    # -- construction helpers -----------------------------------------------

    @classmethod
    def skipped(cls, node: str, upstream: str | None, message: str) -> State:
        """A Skipped state; ``upstream`` names the failed node that caused it, if any."""
        exc = UpstreamFailed(message, node=node, upstream=upstream)
        return cls(SKIPPED, node, exception=exc, upstream=upstream, message=message)

    @classmethod
    def cancelled(cls, node: str, why: str, history: list[Attempt] | None = None) -> State:
        """A Cancelled state holding a :class:`Cancelled` exception that says why."""
        message = f"{node} was cancelled ({why})"
        return cls(
            CANCELLED,
            node,
            exception=Cancelled(message, node=node),
            history=history,
            message=message,
        )

    @classmethod
    def from_call(cls, node: str, fn: Any, args: tuple, kwargs: dict) -> State:
        """Run ``fn`` in-process and wrap the outcome (``return_state=True`` outside a graph)."""
        started = time.time()
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:
            attempt = Attempt(1, started, time.time(), "local", exc)
            return cls(FAILED, node, exception=exc, history=[attempt], message=capped(str(exc)))
        attempt = Attempt(1, started, time.time(), "local", None)
        return cls(COMPLETED, node, value=value, history=[attempt])


def single_line(text: str) -> str:
    """``text`` up to its first line break, with "…" if there was more: a repr is one line."""
    lines = text.strip().splitlines() or [""]
    return lines[0].rstrip() + (" …" if any(line.strip() for line in lines[1:]) else "")


def _restore_state(
    name: str,
    node: str,
    value: Any,
    exception: BaseException | None,
    history: list[Attempt],
    upstream: str | None,
    message: str,
    released: bool = False,
) -> State:
    state = State(CANONICAL.get(name, name), node, value, exception, history, upstream, message)
    if released:
        state._release()
    return state
