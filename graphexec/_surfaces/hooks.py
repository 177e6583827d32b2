"""Hooks and observers: user code told about a run, in this process, off the scheduler's thread.

::

    scheduler thread                            dispatcher thread (one per run, started
    ----------------                            by the first event that needs it)
    started(run) running(i, call)
    retrying(i, state) finished(i, state)
         │
         ▼
    Dispatch ──> inline observers, now:          events, in the order they happened
         │       the bar, the log line           ─────────────────────────────────>
         └──> queue: (event, node, state copy,   task hooks of the node (on_completion,
              the task's hooks) ───────────────> on_failure, on_retry), every Observer's
                                                 method, the run hooks at the end
    compute() / a flow, at the end:
      drain()  wait for the node events, then hand the held values back
      finish() on_finish and the run hooks, then stop the thread
      (both within GRAPHEXEC_HOOK_WAIT seconds, 60 by default)

Cost: ``compute`` builds a :class:`Dispatch` only when something listens
(an observer, a hook, the bar, the log line), so a run nobody watches pays
nothing. Without queued listeners no thread is started; an event with no
hook and no queued observer is not queued.

Values. A hook may read a node's value (``state.result()``). The scheduler
asks :meth:`Dispatch.hold` before it releases a value; a node whose
completion event is still queued is held, and handed back (released on the
scheduler's thread, as every release is) once its hooks ran. Hooks get a
copy of the State, so that loading the value in the hook never swaps the
Run's own handle (the scheduler forwards that handle to dependents).

A hook or observer method that raises is logged on the ``graphexec``
logger with its traceback, and changes nothing.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from queue import SimpleQueue
from typing import Any, ClassVar, NamedTuple

from .._model.errors import one_line
from .._model.node import Node
from .._model.options import call_state_hook, check_hooks
from .._model.run import Run
from .._model.signature import required_positional
from .._model.state import CANCELLED, COMPLETED, CRASHED, FAILED, State
from .._model.task import fn_name
from .signals import sigterm_as_interrupt

logger = logging.getLogger("graphexec")

HOOK_WAIT = 60.0  # seconds compute() and a flow wait for queued hooks at most
HOOK_WAIT_ENV = "GRAPHEXEC_HOOK_WAIT"

# Run-level hooks, in the order they are called when several apply.
RUN_HOOKS = ("on_cancellation", "on_crashed", "on_failure", "on_completion")


class Observer:
    """Watch runs from your own code, the way dask's callbacks do: subclass it and
    override the methods you need (each does nothing by default).

    Every method is called in this process, on one thread per run that is not
    the scheduler's: a slow method delays other observers and hooks of that
    run, never the run itself. Events of one node arrive in the order they
    happened. A method that raises is logged (logger ``graphexec``) and
    changes nothing.

    Use it with ``graph.compute(observers=[...])``, ``@gx.flow(observers=[...])``
    or ``with gx.observe(...)``.

    Example::

        class Failures(gx.Observer):
            def __init__(self):
                self.failed = []

            def on_node_finish(self, node, state):
                if state.is_failed():
                    self.failed.append((node.name, state.message))

        watcher = Failures()
        graph.compute(observers=[watcher], raise_on_failure=False)
    """

    # graphexec's own bar and log line are called on the scheduler's thread:
    # they only count, and a user's slow hook must not freeze them.
    _inline: ClassVar[bool] = False
    # Whether it may read nodes' values (state.result()): then a completed node's
    # value is held until its event was delivered, and compute() sends no chains.
    _reads_values: ClassVar[bool] = True

    def on_start(self, run: Run) -> None:
        """The run starts (a flow's run has no nodes yet: they come as they are submitted)."""

    def on_node_start(self, node: Node, attempt: int) -> None:
        """An attempt of ``node`` was dispatched: handed to a worker (the parent's view;
        the worker may start it a moment later, behind a call it is finishing).

        Args:
            node: the node (a :class:`Future` in a flow).
            attempt: 1 for the first attempt, 2 for the first retry, ...
        """

    def on_node_retry(self, node: Node, state: State) -> None:
        """An attempt of ``node`` failed and it will run again; ``state`` is
        ``Retrying`` and holds the failed attempt's exception."""

    def on_node_finish(self, node: Node, state: State) -> None:
        """``node`` reached its final state: Completed, Cached, Failed (after its last
        attempt), Skipped or Cancelled. ``state.result()`` gives a completed node's value."""

    def on_finish(self, run: Run) -> None:
        """The run ended (after the last ``on_node_finish``); ``run`` is complete."""


_ambient: ContextVar[tuple[Observer, ...]] = ContextVar("graphexec_observers", default=())


@contextmanager
def observe(*observers: Observer) -> Iterator[None]:
    """Apply observers to every compute and flow started inside the block.

    The observers are kept in a context variable, read when a compute or a
    flow starts: a thread started inside the block does not see them (as
    with any context variable) unless it runs in a copy of the context
    (``contextvars.copy_context().run``); a compute running in another
    thread is not affected. Blocks nest: the inner one adds its observers.

    Args:
        *observers: :class:`Observer` instances.

    Raises:
        TypeError: something that is not an Observer.

    Example::

        with gx.observe(MyObserver()):
            graph.compute()
    """
    token = _ambient.set(_ambient.get() + check_observers(observers, "observe()"))
    try:
        yield
    finally:
        _ambient.reset(token)


def ambient_observers() -> tuple[Observer, ...]:
    """The observers of the enclosing ``observe()`` blocks in this context."""
    return _ambient.get()


def check_observers(observers: Any, where: str) -> tuple[Observer, ...]:
    """``observers`` as a tuple of :class:`Observer` instances.

    Raises:
        TypeError: not a list of Observer instances.
    """
    if observers is None:
        return ()
    if isinstance(observers, Observer):
        observers = (observers,)
    if not isinstance(observers, (list, tuple)) or not all(
        isinstance(o, Observer) for o in observers
    ):
        raise TypeError(f"{where}: observers must be gx.Observer instances, got {observers!r}")
    return tuple(observers)


def check_run_hooks(value: Any, key: str, where: str) -> tuple[Callable[..., Any], ...]:
    """A run-level hook option as a tuple of callables.

    Raises:
        TypeError: not a callable or a list of them.
    """
    return check_hooks(value, key, where, "(run), or Prefect's (flow, flow_run, state)")


class RunHooks(NamedTuple):
    """The run-level hooks of one compute or flow (tuples of callables)."""

    on_completion: tuple[Callable[..., Any], ...] = ()
    on_failure: tuple[Callable[..., Any], ...] = ()
    on_cancellation: tuple[Callable[..., Any], ...] = ()
    on_crashed: tuple[Callable[..., Any], ...] = ()


NO_HOOKS = RunHooks()


def outcome(run: Run, cancelled: bool) -> tuple[str, ...]:
    """The run hooks due for a run that ended without an exception of its own.

    ``cancelled``: fail_fast cancelled what was pending (the run then also failed).
    """
    kinds = ("on_cancellation",) if cancelled else ()
    return (*kinds, "on_completion" if run.ok else "on_failure")


def call_run_hooks(hooks: RunHooks, kinds: Sequence[str], run: Run, flow: Any) -> None:
    """Call the run hooks of ``kinds`` with ``run``, or Prefect's ``(flow, flow_run,
    state)`` (the graph or flow, the run, :func:`run_state`), each guarded."""
    for kind in RUN_HOOKS:
        if kind in kinds:
            for hook in getattr(hooks, kind):
                what = f"{kind} hook {fn_name(hook)}"
                if required_positional(hook, 1) >= 3:
                    _guarded(what, hook, flow, run, run_state(kind, run))
                else:
                    _guarded(what, hook, run)


_RUN_STATES = {
    "on_completion": COMPLETED,
    "on_failure": FAILED,
    "on_cancellation": CANCELLED,
    "on_crashed": CRASHED,
}


def run_state(kind: str, run: Run) -> State:
    """A run's outcome as the ``state`` of a Prefect-style run hook: what Prefect's
    flow-run hooks read (``state.name``, ``state.message``, ``state.is_failed()``),
    named after the run. Its message: the nodes per state, how the run ended if not
    well (the run's headline words), and its first failure; a Failed one holds that
    failure's exception (the first unhandled one's, else the first one's), or the
    exception its flow's body raised."""
    name = _RUN_STATES[kind]
    parts = [run._counts_text() or "no nodes"]
    status = run._status()
    if status != "ok":
        parts.append(status)
    exception = None
    first = (run.unhandled or run.failed)[:1]
    if first:
        exception = run.state(first[0]).exception
        if exception is not None:
            parts.append(f"first failure: {first[0].name} ({one_line(exception)})")
    if exception is None:
        exception = run._raised
    return State(
        name, run.name, exception=exception if name is FAILED else None, message="; ".join(parts)
    )


def _guarded(what: str, fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except BaseException:  # SystemExit too: it must not end the dispatcher thread
        logger.exception("%s raised; the run goes on unchanged", what)


def end_hooks(
    dispatch: Dispatch | None,
    run: Run,
    kinds: tuple[str, ...],
    between: Callable[[], None] | None = None,
) -> None:
    """The end of a run's hooks: wait (``hook_wait()`` at most) for the node hooks and
    observers still queued, call ``between``, then run the run hooks ``kinds``.

    A Ctrl-C or SIGTERM meanwhile (SIGTERM is Ctrl-C here too, as during the run)
    stops the wait: the hooks still running are abandoned, and the interrupt goes
    on with ``.run``; whoever called this still closes the run's executor.
    """
    try:
        with sigterm_as_interrupt():
            deadline = time.monotonic() + hook_wait()
            if dispatch is not None:
                dispatch.drain(deadline)
            if between is not None:
                between()
            if dispatch is not None:
                dispatch.finish(run, kinds, deadline)
    except KeyboardInterrupt as interrupt:
        if getattr(interrupt, "run", None) is None:
            interrupt.run = run  # type: ignore[attr-defined]
        raise


def hook_wait() -> float:
    """Seconds to wait for queued hooks: ``GRAPHEXEC_HOOK_WAIT``, else 60."""
    text = os.environ.get(HOOK_WAIT_ENV, "").strip()
    if not text:
        return HOOK_WAIT
    try:
        seconds = float(text)
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using %g", HOOK_WAIT_ENV, text, HOOK_WAIT)
        return HOOK_WAIT
    return max(seconds, 0.0)


_START, _NODE_START, _RETRY, _FINISH, _END, _BARRIER = range(6)


class Dispatch:
    """The scheduler's observer for a run that someone listens to; see the module docstring.

    Scheduler-thread side: ``started``, ``running``, ``retrying``, ``finished``,
    ``hold``. Caller side, once the scheduler is done: ``drain``, ``finish``.
    """

    def __init__(
        self,
        observers: Sequence[Observer] = (),
        run_hooks: RunHooks | None = None,
        flow: Any = None,
    ) -> None:
        self._inline = [o for o in observers if o._inline]
        self._queued = [o for o in observers if not o._inline]
        self._holds = any(o._reads_values for o in self._queued)
        self._run_hooks = run_hooks or RunHooks()
        self._flow = flow  # what a Prefect-style run hook gets as `flow`
        self._graph: Any = None
        self._queue: SimpleQueue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._busy: set[int] = set()  # completed nodes whose finish event is queued
        self._held: dict[int, State] = {}  # values the scheduler left to us, by node
        self._ran: deque[int] = deque()  # the dispatcher's word: this node's hooks ran
        self._release: Callable[[int, State], None] | None = None
        # Whether a hook may read a completed node's value (compute() then sends no
        # chains); a flow's values are all readable anyway.
        self.reads_values = True

    @property
    def observers_read_values(self) -> bool:
        """Whether a queued observer may read values (a run's journal does not)."""
        return any(o._reads_values for o in self._queued)

    def bind(self, release: Callable[[int, State], None]) -> None:
        """How to release a held value once its hooks ran (the scheduler's own release)."""
        self._release = release

    # -- scheduler thread -------------------------------------------------------

    def started(self, run: Run) -> None:
        self._graph = run.graph
        for o in self._inline:
            o.on_start(run)
        if self._queued:
            self._put((_START, run))

    def running(self, i: int, call: Any) -> None:
        if self._ran:
            self._hand_back()
        if self._inline:
            node = self._graph._nodes[i]
            for o in self._inline:
                o.on_node_start(node, call.number)
        if self._queued:
            self._put((_NODE_START, i, call.number))

    def retrying(self, i: int, state: State) -> None:
        if self._inline:
            node = self._graph._nodes[i]
            for o in self._inline:
                o.on_node_retry(node, state)
        hooks = self._graph._opts[i].on_retry
        if hooks or self._queued:
            self._put((_RETRY, i, copy.copy(state), hooks))

    def finished(self, i: int, state: State) -> None:
        if self._ran:
            self._hand_back()
        if self._inline:
            node = self._graph._nodes[i]
            for o in self._inline:
                o.on_node_finish(node, state)
        opts = self._graph._opts[i]
        completed = state.is_completed()
        if completed:
            hooks = opts.on_completion
        elif state.name is FAILED:
            hooks = opts.on_failure
        else:
            hooks = ()  # Skipped, Cancelled: observers only
        if hooks or self._queued:
            if completed and (hooks or self._holds):
                self._busy.add(i)
            self._put((_FINISH, i, copy.copy(state), hooks))

    def hold(self, i: int, state: State) -> bool:
        """The scheduler is about to release node i's value: keep it if a hook is due.

        True: the value stays, and is released through ``bind``'s function once
        the node's hooks ran.
        """
        if self._ran:
            self._hand_back()
        if i in self._busy:
            self._held[i] = state
            return True
        return False

    def _hand_back(self) -> None:
        ran = self._ran
        while ran:
            i = ran.popleft()
            self._busy.discard(i)
            state = self._held.pop(i, None)
            if state is not None and self._release is not None:
                self._release(i, state)

    # -- the caller, once the scheduler is done -----------------------------------

    def drain(self, deadline: float) -> None:
        """Wait (until ``deadline``, monotonic) for the node events, then release what
        was held for them. Values whose hooks did not run in time stay held: the run
        settles them as kept values (a hook may still be reading one)."""
        if self._queue is not None:
            reached = threading.Event()
            self._queue.put((_BARRIER, reached))
            reached.wait(max(0.0, deadline - time.monotonic()))
        self._hand_back()

    def finish(self, run: Run, kinds: Sequence[str], deadline: float) -> None:
        """The run ended: ``on_finish`` of every observer, the run hooks of ``kinds``;
        wait for them until ``deadline``, then log what is abandoned."""
        for o in self._inline:
            o.on_finish(run)
        hooks = self._run_hooks
        if self._queued or any(getattr(hooks, kind) for kind in kinds):
            self._put((_END, run, tuple(kinds)))
        queue, thread = self._queue, self._thread
        if queue is None or thread is None:
            return
        queue.put(None)
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            logger.warning(
                "hooks of %s still running after %g s (%s): abandoned, with %d event(s) "
                "still queued; they go on in the background while this process lives",
                run.graph.name,
                hook_wait(),
                HOOK_WAIT_ENV,
                queue.qsize(),
            )

    # -- the dispatcher thread ------------------------------------------------------

    def _put(self, event: tuple[Any, ...]) -> None:
        if self._queue is None:
            self._queue = SimpleQueue()
            self._thread = threading.Thread(target=self._serve, name="graphexec-hooks", daemon=True)
            self._thread.start()
        self._queue.put(event)

    def _serve(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            event = queue.get()
            if event is None:
                return
            kind = event[0]
            if kind is _BARRIER:
                event[1].set()
                continue
            try:
                self._deliver(kind, event)
            except BaseException:  # a bug here must not leave compute() waiting
                logger.exception("graphexec's hook dispatcher failed on an event")
            if kind is _FINISH and event[2].is_completed():
                self._ran.append(event[1])

    def _deliver(self, kind: int, event: tuple[Any, ...]) -> None:
        graph = self._graph
        if kind is _START:
            for o in self._queued:
                _guarded(f"{type(o).__name__}.on_start", o.on_start, event[1])
        elif kind is _NODE_START:
            node = graph._nodes[event[1]]
            for o in self._queued:
                _guarded(f"{type(o).__name__}.on_node_start", o.on_node_start, node, event[2])
        elif kind is _RETRY or kind is _FINISH:
            _, i, state, hooks = event
            node, task = graph._nodes[i], graph._tasks[i]
            label = (
                "on_retry"
                if kind is _RETRY
                else ("on_completion" if state.is_completed() else "on_failure")
            )
            for hook in hooks:
                _guarded(
                    f"{label} hook {fn_name(hook)} of {node.name}",
                    call_state_hook,
                    hook,
                    node,
                    task,
                    state,
                )
            method = "on_node_retry" if kind is _RETRY else "on_node_finish"
            for o in self._queued:
                _guarded(f"{type(o).__name__}.{method}", getattr(o, method), node, state)
        elif kind is _END:
            run, kinds = event[1], event[2]
            for o in self._queued:
                _guarded(f"{type(o).__name__}.on_finish", o.on_finish, run)
            call_run_hooks(self._run_hooks, kinds, run, self._flow)
