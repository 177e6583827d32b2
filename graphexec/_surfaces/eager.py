"""Eager execution: ``task.submit()`` and futures, on the same scheduler as lazy graphs.

::

    user threads                                 scheduler thread (one per session)
    ------------                                 ----------------------------------
    task.submit(x) -> graph._add_call ─┐
                      inbox ("admit", i) ├─ executor.wakeup() ─> Scheduler.serve():
    future.result() ── mailbox <───────┘                          apply the inbox,
                        put(future)  <───── _publish() ────────   dispatch, poll, finish

A :class:`Session` is a :class:`Graph` that grows while it runs, plus the
ordinary :class:`Scheduler` running in ``serve`` mode in a background thread:
eager and lazy work share one scheduler, one executor and every policy
(retries, timeouts, triggers, allow_failure, caching, limits). A ``Future`` is
a ``Node`` of the session's graph, so it is accepted anywhere a node is.

Thread model (who owns what):

* **The session's scheduler thread** owns the :class:`Scheduler` and the
  session's :class:`Run` (states, ``handled``, the cache store, the
  cancellation reason, the executor's run state): from its start until
  :meth:`Session.close` joins it, no other thread writes them.
* **User threads** (the flow body, ``with gx.Pool()`` code, any thread holding
  a future) never write scheduler or Run state. Under ``Session._lock`` they
  append nodes to the graph and post messages to the session's inbox, which
  the serve loop applies between steps, in order: ``("admit", i)``,
  ``("cancel", (why, everything))``, ``("observed", i)`` (a failure the user looked at),
  ``("open-cache", dir)`` (posted once per session: one :class:`CacheStore`),
  ``("claim", (indices, mailbox))`` (a lazy graph's run: which failures a
  dependent accepted; answered through the mailbox), ``("cancel-node", (i,
  mailbox))`` (``Future.cancel``: whether i was cancelled before it started). A message that needs
  the scheduler now comes with ``executor.wakeup()``.
* **The graph is append-only** and built by user threads under the lock; the
  scheduler reads node ``i`` only after its ``("admit", i)`` message, posted
  under the same lock once the node is complete, so it never sees a node
  half-built. (Appending to and indexing a list are atomic under the GIL.)
* **User threads read** ``run._states[i]`` (assigned once by the scheduler when
  the node ends; a final state never changes), ``scheduler.running`` for
  ``Future.state``, and options fixed at the session's start.
* **Waiting is event-driven.** A waiting thread registers a :class:`_Mailbox`
  for the futures it waits for; the scheduler thread, publishing what finished
  (:meth:`Session._publish`), puts each finished future into the mailboxes
  waiting for it, so one mailbox can wait for futures of several sessions.
  ``wait_all`` waits on the session's condition, notified at each publish.
  When the scheduler thread ends (closed, or failed) it wakes every waiter,
  so no wait outlives it. A done-callback is such a waiter: its "mailbox"
  queues the call for the session's callback thread, which runs the user's
  functions off the scheduler's thread; :meth:`Session.close` drains and joins
  it. Only a wait in the main thread wakes on its own, every
  ``SIGNAL_SLICE``, so that Ctrl-C still interrupts it.
* **After** :meth:`Session.close` **joins the thread**, the closing thread owns
  the Run (finishing it, unlinking shared memory, unlocking cache entries).

Failure accounting follows graphexec's rule that success is never reported
while a failure nobody saw exists: a failure counts as handled when a
dependent accepted it (as in lazy graphs) or when the user looked at it
(``future.result()`` raised it or returned it, ``future.state`` was read).
At the end of a flow, unhandled failures raise :class:`GraphFailed`.

Values are kept for the whole session (the user may ask any future for its
result at any time), as in Prefect.
"""

from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, cast

from .. import _surfaces as _package  # its notebook module loads on first use
from .._data.cache import DEFAULT_DIR
from .._data.serialize import Payload
from .._engine.policy import failures_behind
from .._engine.scheduler import Scheduler
from .._executors.protocol import OK, SIGNAL_SLICE, Executor
from .._model.graph import Graph
from .._model.node import Node
from .._model.order import post_order
from .._model.run import Run
from .._model.seam import NOT_EAGER
from .._model.state import FINAL, PENDING, RUNNING, State
from .hooks import Dispatch, ambient_observers, end_hooks, outcome
from .options import ComputeOptions, check_limits
from .signals import deferred_in_critical_sections

_local = threading.local()
logger = logging.getLogger("graphexec")


class _Everything:
    """Kept set of a session: every value stays available to its futures."""

    def __contains__(self, item: object) -> bool:
        return True


def active_session() -> Session | None:
    """The session ``task.submit`` uses on this thread: the innermost flow, or the
    innermost ``with gx.Pool():`` block (its session starts on first use)."""
    stack = getattr(_local, "sessions", None)
    if not stack:
        return None
    top = stack[-1]
    if isinstance(top, Session):
        return top
    return session_for_pool(cast(PoolBlock, top))


def pool_block() -> PoolBlock | None:
    """The innermost context on this thread if it is a ``with gx.Pool():`` block."""
    stack = getattr(_local, "sessions", None)
    if stack and isinstance(stack[-1], PoolBlock):
        return stack[-1]
    return None


def flow_session() -> Session | None:
    """The session of the flow whose body runs on this thread (innermost), or None."""
    stack = getattr(_local, "sessions", None)
    if stack and isinstance(stack[-1], Session):
        return stack[-1]
    return None


def call_eagerly(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A plain task call: inside a flow it runs on the flow's pool (Prefect's rule).

    Returns the value, or the State with ``return_state=True``; a failure raises
    here, in the flow body, where it can be caught. Outside a flow: NOT_EAGER.
    """
    session = flow_session()
    if session is None:
        return NOT_EAGER
    # The call keyword (not the task option): a failure comes back as its State.
    call_allows = kwargs.get("allow_failure") is True
    future = session.submit(task, args, kwargs)
    state = session._wait(future.index, None)
    if future.graph._opts[future.index].return_state or (call_allows and not state.is_completed()):
        session._observed(future.index)
        return state
    # Raised here, a skip's UpstreamFailed is caught in the body or ends the flow.
    session._observed(future.index, through_skip=True)
    return state.result()


def submit(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future:
    """``task.submit()``: start the call now in the innermost flow or pool block."""
    session = active_session()
    if session is None:
        thread = threading.current_thread()
        raise RuntimeError(
            f"{task.name}.submit() (and .map() outside `with graph:`) starts work now and "
            "needs somewhere to run it: call it inside a @gx.flow, or inside `with "
            "gx.Pool(workers=N):`; inside `with graph:`, .map() adds nodes instead"
            + (
                ""
                if thread is threading.main_thread()
                else f". A flow or pool block holds in the thread that entered it, and "
                f"this thread ({thread.name}) is in none, even if a flow started it: submit "
                "from the flow's thread, or enter `with pool:` here (a gx.Pool serves "
                "many threads)"
            )
        )
    return session.submit(task, args, kwargs)


def push_context(context: Any) -> None:
    if not hasattr(_local, "sessions"):
        _local.sessions = []
    _local.sessions.append(context)


def pop_context(context: Any) -> None:
    stack = getattr(_local, "sessions", None)
    if stack and stack[-1] is context:
        stack.pop()


class Future(Node):
    """The eventual value of a submitted task: ``task.submit(...)`` returns one.

    Accepted anywhere a node is: as an argument (also nested), in ``wait_for``,
    inside :func:`allow_failure`.
    """

    _ELSEWHERE = "future {name!r} belongs to another flow or pool block ({graph})"
    _ELSEWHERE_ADVICE = (
        "A future is an argument only where it was submitted (its flow, or its "
        "`with gx.Pool()` block): pass its value, future.result(), instead"
    )

    __slots__ = ()

    def __bool__(self) -> bool:
        return True  # as Prefect's futures (Node refuses it: see Node.__bool__)

    @property
    def _session(self) -> Session:
        return cast(_SessionGraph, self.graph).session

    def wait_for(self, *upstream: Any) -> Node:
        """Refused: a submitted task starts with the upstreams it was submitted with.

        (``Node.wait_for`` adds edges to a lazy graph before it runs; here the
        scheduler already has the task, and an edge added now would do nothing.)

        Raises:
            RuntimeError: always; pass ``wait_for=`` to ``submit()`` instead.
        """
        raise RuntimeError(
            f"{self.name} was submitted already: its upstreams were fixed then. Pass "
            "wait_for=[...] to submit() instead"
        )

    def done(self) -> bool:
        """True once the task has a final state."""
        state = self._session._state(self.index)
        return state is not None and state.name in FINAL

    def wait(self, timeout: float | None = None) -> State | None:
        """Block until the task has a final state; return that state, or None if it
        has none after ``timeout`` seconds.

        Prefect's form: its 2.x ``wait`` returns the state or None, and its 3.x
        returns None and is followed by a look at ``future.state``; both work
        here. :meth:`result` and :meth:`exception` raise ``TimeoutError`` instead.

        Raises:
            RuntimeError: its flow's (or pool's) scheduler thread failed: it never ends.
        """
        if timeout is None:
            return self._session._wait(self.index, None)
        try:
            return self._session._wait(self.index, timeout)
        except TimeoutError:
            return None

    # timeout first, as in concurrent.futures and Prefect: a deliberate difference
    # from Node.result, whose node has no wait to bound.
    def result(  # type: ignore[override]
        self, timeout: float | None = None, raise_on_failure: bool = True
    ) -> Any:
        """Wait for the task and return its value (Prefect's ``future.result()``).

        Args:
            timeout: seconds to wait at most (None: no limit).
            raise_on_failure: re-raise the task's exception (default), or return it.

        Raises:
            TimeoutError: the task did not finish within ``timeout``.
            RuntimeError: its flow's (or pool's) scheduler thread failed: it never ends.
            Exception: the task's own exception, with its remote traceback.
        """
        state = self._session._wait(self.index, timeout)
        # Raised or returned here, a skip's UpstreamFailed shows the failures behind it.
        self._session._observed(self.index, through_skip=True)
        return state.result(raise_on_failure=raise_on_failure)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the task; return its exception, or None if it completed.

        As :meth:`result` with ``raise_on_failure=False``, it counts as looking
        at the failure (and, for a skipped future, at the failures behind it).
        A Skipped future gives its :class:`UpstreamFailed`, a Cancelled one its
        :class:`Cancelled`.

        Raises:
            TimeoutError: the task did not finish within ``timeout``.
            RuntimeError: its flow's (or pool's) scheduler thread failed: it never ends.
        """
        state = self._session._wait(self.index, timeout)
        self._session._observed(self.index, through_skip=True)
        return None if state.is_completed() else state.exception

    def running(self) -> bool:
        """True while an attempt of the task runs (not while it waits, nor once final).

        A retried attempt runs too: its state reads ``Retrying`` meanwhile, as
        Prefect's does, between attempts and during them.
        """
        session = self._session
        state = session._state(self.index)
        return (state is None or state.name not in FINAL) and self.index in (
            session.scheduler.running
        )

    def cancelled(self) -> bool:
        """True if the task ended Cancelled (:meth:`cancel`, ``fail_fast``, the flow raising)."""
        state = self._session._state(self.index)
        return state is not None and state.is_cancelled()

    def cancel(self) -> bool:
        """Cancel the task if it has not started, as :meth:`concurrent.futures.Future.cancel`.

        A cancelled task ends ``Cancelled`` and its dependents are Skipped;
        a cancellation is not a failure, so it does not make the flow raise.

        Returns:
            True if the task is now cancelled (also when it already was);
            False if it is running or has ended otherwise.
        """
        if self.cancelled():
            return True
        return self._session._cancel_one(self.index)

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(future)`` once the task is final.

        The call happens in this process, on a thread of the flow's (or pool
        block's) own, never the scheduler's; a future already final calls it
        at once, in the calling thread. The flow returns after every callback
        has run. An exception from ``fn`` is logged and ignored, as
        ``concurrent.futures`` does.
        """
        if not self._session._add_callback(self, fn):
            _run_callback(fn, self)

    @property
    def state(self) -> State:
        """The current state (Pending, Running, Retrying, or final); never blocks.

        ``Retrying`` from a failed attempt that will be retried until the
        task is final: while it waits for its retry and while that runs
        (:meth:`running` tells which).
        """
        session = self._session
        state = session._state(self.index)
        if state is not None:
            if state.name in FINAL:
                session._observed(self.index)
            return state
        name = RUNNING if self.index in session.scheduler.running else PENDING
        return State(name, self.name)

    def __repr__(self) -> str:
        state = self._session._state(self.index)
        return f"<Future {self.name} ({state.name if state else 'Pending'})>"

    def _repr_html_(self) -> str:
        """How the future shows in a Jupyter notebook: its live state, one coloured line."""
        # Not self.state: showing a failed future must not count as the user
        # having looked at its failure (that would handle it in a flow).
        session = self._session
        state = session._state(self.index)
        if state is None:
            name = RUNNING if self.index in session.scheduler.running else PENDING
            state = State(name, self.name)
        return _package.notebook.future_html(state)  # loaded on first use (notebooks)


class _Mailbox:
    """What one waiting user thread listens to: items put by any scheduler thread.

    ``put`` never blocks (it runs on a scheduler thread); ``take`` blocks until
    something was put, or the deadline.
    """

    __slots__ = ("_cond", "_items")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[Any] = deque()

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def take(self, deadline: float | None) -> list[Any]:
        """Everything put so far, waiting for at least one item; [] at the deadline."""
        with self._cond:
            while not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                _wait_on(self._cond, remaining)
            items = list(self._items)
            self._items.clear()
        return items


def _wait_on(cond: threading.Condition, remaining: float | None) -> None:
    """``cond.wait``; in slices in the main thread, where a Ctrl-C must get through.

    (The kernel may hand SIGINT to any thread: to a scheduler or worker thread,
    it does not interrupt the main thread's lock wait, so the main thread comes
    back to Python every slice to run the pending KeyboardInterrupt. Any other
    thread sleeps until it is notified.)
    """
    if threading.current_thread() is threading.main_thread():
        remaining = SIGNAL_SLICE if remaining is None else min(remaining, SIGNAL_SLICE)
    cond.wait(remaining)


def _run_callback(fn: Callable[[Future], Any], future: Future) -> None:
    try:
        fn(future)
    except Exception:
        logger.exception("a done-callback of %s raised; ignored", future.name)


class _Callback:
    """One ``add_done_callback``: a waiter that hands its future to the callback thread."""

    __slots__ = ("fn", "runner")

    def __init__(self, fn: Callable[[Future], Any], runner: _CallbackThread) -> None:
        self.fn = fn
        self.runner = runner

    def put(self, future: Future) -> None:  # on the scheduler thread: never blocks
        self.runner.queue.put((self.fn, future))


class _CallbackThread:
    """The thread that runs a session's done-callbacks, off the scheduler's thread.

    Started by the session's first ``add_done_callback``; :meth:`close` lets it
    run what was queued, then joins it.
    """

    def __init__(self, name: str) -> None:
        self.queue: queue.SimpleQueue[tuple[Callable[[Future], Any], Future] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(
            target=self._run, name=f"graphexec-{name}-callbacks", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            _run_callback(*item)

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join()


class _SessionGraph(Graph):
    """A session's graph: it grows while it runs, and its nodes are Futures."""

    _node_type = Future

    def __init__(self, name: str, session: Session) -> None:
        super().__init__(name)
        self.session = session


class Session:
    """A growing graph with its own scheduler thread; see the module docstring."""

    def __init__(
        self,
        executor: Executor,
        *,
        name: str = "flow",
        fail_fast: bool = False,
        limits: dict[str, int] | None = None,
        cache_dir: Any = None,
        observer: Any = None,
        memory_limit: int | None = None,
    ) -> None:
        self.graph: _SessionGraph = _SessionGraph(name, self)
        # The flow's own name (the graph's is its run's: flow_run_name= names it)
        self.flow_name = name
        self.run = Run(self.graph, [], _Everything())
        self.executor = executor
        executor.open(self.run)
        self._cache_dir = cache_dir
        self.memory_limit = memory_limit
        self.observer = observer  # the user's (progress bar); the scheduler sees _Watch
        self.scheduler = Scheduler(
            self.graph,
            self.run,
            _PublishingExecutor(self, executor),
            fail_fast=fail_fast,
            limits=check_limits(limits),
            observer=_Watch(self, observer),
        )
        # Shared by user threads and the scheduler thread, under _lock:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # notified at each publish (wait_all)
        self._inbox: deque[tuple[str, Any]] = deque()  # messages to the scheduler, in order
        self._woken = False  # a wakeup for the inbox is on its way to the scheduler
        self._submitted = 0  # nodes sent for admission
        self._published_done = 0  # nodes final at the last publish
        # node -> what waits for it: mailboxes, and done-callbacks (which put like one)
        self._waiters: dict[int, list[_Mailbox | _Callback]] = {}
        self._replies: set[_Mailbox] = set()  # mailboxes waiting for a "claim" answer
        self._cache_requested = False  # ("open-cache", dir) was posted
        self._callbacks: _CallbackThread | None = None  # started by the first done-callback
        self._closing = False  # close() began: no more submissions
        self._stopped = False  # the scheduler thread has ended
        self._error: BaseException | None = None  # what ended it, if not close()
        # Scheduler thread only:
        self._fresh: list[int] = []  # nodes final since the last publish
        # node -> its rank among every session's nodes by when it became final
        # (as_completed's order: a skipped or cached node has no end time of its own)
        self._ended_rank: dict[int, int] = {}
        self._payloads: list[Payload] = []  # results that came in shared memory
        self._thread = threading.Thread(target=self._serve, name=f"graphexec-{name}", daemon=True)
        self._thread.start()

    # -- scheduler thread -----------------------------------------------------

    def _serve(self) -> None:
        try:
            self.scheduler.serve(self)
        except BaseException as exc:  # never leave a waiter hanging on a dead thread
            self._error = exc
        finally:
            self._publish()
            self._stop()

    def _take_inbox(self) -> tuple[list[tuple[str, Any]], bool]:
        """The messages posted so far, and whether the session is closing.

        Read together under the lock: once closing is seen, no message can follow
        (``submit`` refuses under the same lock), so an empty inbox then is final.
        """
        with self._lock:
            messages = list(self._inbox)
            self._inbox.clear()
            self._woken = False
            return messages, self._closing

    def _publish(self) -> None:
        """Wake whoever waits for the nodes that finished since the last publish."""
        fresh = self._fresh
        if not fresh:
            return
        self._fresh = []
        nodes = self.graph._nodes
        woken: list[tuple[_Mailbox | _Callback, Any]] = []
        with self._lock:
            self._published_done = self.scheduler.done
            waiters = self._waiters
            if waiters:
                for i in fresh:
                    for mailbox in waiters.pop(i, ()):
                        woken.append((mailbox, nodes[i]))
            self._cond.notify_all()
        for mailbox, future in woken:
            mailbox.put(future)

    def _stop(self) -> None:
        """The scheduler thread ends: wake every waiter (it sees why and returns or raises)."""
        nodes = self.graph._nodes
        with self._lock:
            self._stopped = True
            waiters, self._waiters = self._waiters, {}
            replies, self._replies = self._replies, set()
            self._cond.notify_all()
        for i, mailboxes in waiters.items():
            for mailbox in mailboxes:
                mailbox.put(cast(Future, nodes[i]))
        for mailbox in replies:
            mailbox.put(None)

    # -- user threads ---------------------------------------------------------

    def _post(self, message: tuple[str, Any], wake: bool) -> None:
        """Queue a message for the scheduler thread (caller holds the lock)."""
        self._inbox.append(message)
        if wake and not self._woken:
            # One wakeup per batch: until the scheduler takes the inbox, the
            # wakeup already sent covers later messages (a pipe write with processes).
            self._woken = True
            self.executor.wakeup()

    def _check_open(self) -> None:
        """Raise unless new work can still be added (caller holds the lock)."""
        if self._error is not None:
            raise RuntimeError("the graphexec scheduler thread failed") from self._error
        if self._closing or self._stopped:
            raise RuntimeError("this flow/pool has finished; submit inside it")

    def _raise_ended(self, index: int) -> None:
        """Node ``index`` will never end: its session's scheduler thread is gone."""
        if self._error is not None:
            raise RuntimeError("the graphexec scheduler thread failed") from self._error
        raise RuntimeError(
            f"{self.graph._names[index]} never ran: its flow/pool finished without it"
        )

    def submit(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future:
        """Add a call to the graph and start it as soon as its inputs are ready."""
        with self._lock:
            # Under the lock: close() sets _closing under it too, so a submit either
            # is queued before the scheduler's last look at the inbox, or refused.
            self._check_open()
            node = self.graph._add_call(task, args, kwargs)
            if node.graph._opts[node.index].cache_key_fn is not None:
                self._request_cache()
            self._submitted += 1
            self._post(("admit", node.index), wake=True)
        return node  # type: ignore[return-value]

    def _request_cache(self) -> None:
        """Have the scheduler open the session's one cache store (caller holds the lock)."""
        if not self._cache_requested:
            self._cache_requested = True
            self._post(("open-cache", self._cache_dir), wake=True)

    def _add_waiter(self, index: int, mailbox: _Mailbox) -> bool:
        """Have ``mailbox`` receive the future ``index`` when it ends.

        False when there is nothing to wait for: it is final, or never will be.
        """
        with self._lock:
            state = self._state(index)
            if (state is not None and state.name in FINAL) or self._stopped:
                return False
            self._waiters.setdefault(index, []).append(mailbox)
            return True

    def _add_callback(self, future: Future, fn: Callable[[Future], Any]) -> bool:
        """Have ``fn(future)`` called on the callback thread when the future ends.

        False when there is nothing to wait for (final, or never will be).
        """
        with self._lock:
            state = self._state(future.index)
            if (state is not None and state.name in FINAL) or self._stopped:
                return False
            if self._callbacks is None:
                self._callbacks = _CallbackThread(self.graph.name)
            self._waiters.setdefault(future.index, []).append(_Callback(fn, self._callbacks))
            return True

    def _cancel_one(self, index: int) -> bool:
        """Ask the scheduler thread to cancel node ``index`` if it has not started."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("future.cancel() cannot be called from a task running in-process")
        state = self._state(index)
        if state is not None and state.name in FINAL:
            return False
        mailbox = _Mailbox()
        with self._lock:
            if self._stopped:
                return False
            self._replies.add(mailbox)
            self._post(("cancel-node", (index, mailbox)), wake=True)
        try:
            answer = mailbox.take(None)[0]  # the answer, or None from _stop
        finally:
            with self._lock:
                self._replies.discard(mailbox)
        return bool(answer)

    def _remove_waiter(self, index: int, mailbox: _Mailbox) -> None:
        with self._lock:
            mailboxes = self._waiters.get(index)
            if mailboxes is not None and mailbox in mailboxes:
                mailboxes.remove(mailbox)
                if not mailboxes:
                    del self._waiters[index]

    def _wait(self, index: int, timeout: float | None) -> State:
        state = self._state(index)
        if state is not None and state.name in FINAL:
            return state
        deadline = None if timeout is None else time.monotonic() + timeout
        mailbox = _Mailbox()
        if self._add_waiter(index, mailbox):
            try:
                if not mailbox.take(deadline):
                    name = self.graph._names[index]
                    raise TimeoutError(f"{name} did not finish within {timeout} s")
            finally:
                self._remove_waiter(index, mailbox)
        state = self._state(index)
        if state is None or state.name not in FINAL:
            self._raise_ended(index)
        return state  # type: ignore[return-value]

    def _state(self, index: int) -> State | None:
        """The node's state, None while pending (or not yet admitted by the scheduler)."""
        states = self.run._states
        return states[index] if index < len(states) else None

    def _observed(self, index: int, through_skip: bool = False) -> None:
        """The user looked at this future's final state: a failure in it is handled.

        ``through_skip``: the user got the ``UpstreamFailed`` of a skipped future
        (``.result()`` raised or returned it), which names the failures behind the
        skip: they count as looked at too.
        """
        state = self._state(index)
        if state is None or state.name in ("Completed", "Cached"):
            return
        seen = [index]
        if through_skip and state.name == "Skipped":
            seen += failures_behind(self.graph, self.run._states, index)
        with self._lock:
            for i in seen:
                if self._stopped:
                    # The scheduler thread is gone and applies nothing more; the
                    # Run is the user's now (a future outliving its flow).
                    self.run._handled.add(i)
                else:
                    # No wakeup: nothing runs differently; the scheduler applies it
                    # at its next step, and at the latest before the session ends.
                    self._post(("observed", i), wake=False)

    def wait_all(self) -> None:
        """Block until every submitted task is final."""
        with self._cond:
            while self._published_done < self._submitted:
                if self._stopped:
                    if self._error is not None:
                        raise RuntimeError("the graphexec scheduler thread failed") from (
                            self._error
                        )
                    return  # closed by another thread: every admitted node ended
                _wait_on(self._cond, None)

    def cancel(self, why: str, everything: bool = False) -> None:
        """Cancel every task still pending or running (Ctrl-C, an exception in the flow).
        ``everything``: ``trigger="always"`` tasks too (Ctrl-C), else they still run,
        as after fail_fast."""
        with self._lock:
            if not self._stopped:
                self._post(("cancel", (why, everything)), wake=True)

    def close(self) -> None:
        """Let the scheduler thread finish what was submitted, then stop it."""
        with self._lock:
            if self._closing:
                closed_already = True
            else:
                closed_already = False
                self._closing = True
                self._woken = True
                self.executor.wakeup()
        self._thread.join()
        if closed_already:
            return
        if self._callbacks is not None:
            # Every waiter was woken when the scheduler thread ended: the last
            # callbacks are queued. They run before values are released.
            self._callbacks.close()
        self.run._finish_run()
        # Values read during the session (future.result()) lost their handle to
        # _finish_run: unlink their segments too, or /dev/shm keeps them after
        # the program ends (the mapped values stay valid: mappings are private).
        payloads, self._payloads = self._payloads, []
        for payload in payloads:
            if payload._loaded:
                payload.discard(recycle=False)
        if self.scheduler.cache is not None:
            self.scheduler.cache.unlock_all()
        # (on a gx.Pool, Ctrl-C waits out the close's critical section: signals.py)
        with deferred_in_critical_sections():
            self.executor.close()

    def check_options(
        self,
        limits: dict[str, int] | None,
        cache_dir: Any,
        memory_limit: int | None,
        where: str = "graph.compute() inside a flow (or a `with gx.Pool()` block with submits)",
    ) -> None:
        """Refuse run options of a compute (or a flow called) in this session that its
        one scheduler and pool cannot honour: they belong to the flow."""
        for tag, cap in (limits or {}).items():
            have = self.scheduler.limits.get(tag)
            if have != cap:
                # (the flow's tasks of that tag may be running already: a limit
                # cannot start counting half-way through the session)
                raise ValueError(
                    f"{where}: limits={{{tag!r}: {cap}}}, but the flow "
                    + (
                        f"limits {tag!r} to {have}"
                        if have is not None
                        else f"does not limit {tag!r}"
                    )
                    + "; one scheduler runs both: give limits= to @gx.flow"
                )
        if cache_dir is not None and not _same_dir(cache_dir, self._cache_dir):
            raise ValueError(
                f"{where}: cache_dir={str(cache_dir)!r} differs from the flow's cache "
                "directory; give cache_dir= to @gx.flow instead"
            )
        if memory_limit is not None and memory_limit != self.memory_limit:
            raise ValueError(
                f"{where}: memory_limit= is a property of the flow's pool; give it to "
                "@gx.flow instead"
            )

    def compute_graph(self, graph: Graph, targets: list[int], options: ComputeOptions) -> Run:
        """Run a lazy graph's nodes on this session's scheduler; return that graph's Run.

        The nodes are copied into the session (their nodes replaced by the
        session's futures), so eager and lazy work share one scheduler and pool.
        ``graph.compute``'s options mean what they mean outside a flow:
        ``refresh_cache`` recomputes this graph's cached nodes; ``limits``,
        ``cache_dir`` and ``memory_limit`` belong to the flow (its scheduler and
        pool), so a value other than the flow's is a ``ValueError`` saying to
        give it to ``@gx.flow``, never silently ignored.

        Raises:
            RuntimeError: the session has finished (a compute racing its close).
        """
        self.check_options(options.limits, options.cache_dir, options.memory_limit)
        refresh_cache, keep = options.refresh_cache, options.keep
        members = post_order(graph._deps, targets)
        mapping: dict[int, Future] = {}
        with self._lock:
            self._check_open()
            if any(graph._opts[i].cache_key_fn is not None for i in members):
                self._request_cache()
            opts = self.graph._opts
            for i in members:
                node = self.graph._copy_node(graph, i, mapping)  # type: ignore[arg-type]
                mapping[i] = node  # type: ignore[assignment]
                if refresh_cache and opts[node.index].cache_key_fn is not None:
                    # (still building the node: the scheduler reads it once admitted)
                    opts[node.index] = opts[node.index].updated(
                        {"refresh_cache": True}, "compute(refresh_cache=True)"
                    )
                self._submitted += 1
                self._post(("admit", node.index), wake=True)
        kept = set(members) if keep == "all" else set(targets)
        run = Run(graph, members, kept)
        for i, fut in mapping.items():
            run._states[i] = self._wait(fut.index, None)
        # The caller gets this Run (or GraphFailed): its failures are now seen.
        accepted = self._claim([f.index for f in mapping.values()])
        run._handled.update(i for i, yes in zip(mapping, accepted) if yes)
        run._finish_run()
        graph._latest_run = run
        if options.raise_on_failure:
            run._raise_if_failed()
        return run

    def _claim(self, indices: list[int]) -> list[bool]:
        """Which of these (final) nodes' failures a dependent accepted; then mark all seen."""
        mailbox = _Mailbox()
        with self._lock:
            posted = not self._stopped
            if posted:
                self._replies.add(mailbox)
                self._post(("claim", (indices, mailbox)), wake=True)
        answer: list[bool] | None = None
        if posted:
            try:
                answer = mailbox.take(None)[0]  # the answer, or None from _stop
            finally:
                with self._lock:
                    self._replies.discard(mailbox)
        if answer is None:
            # The scheduler thread ended before answering: the Run is ours now.
            with self._lock:
                handled = self.run._handled
                answer = [i in handled for i in indices]
                handled.update(indices)
        return answer


class _Watch:
    """The scheduler's observer in a session: notes each finished node for
    :meth:`Session._publish`, and passes every event on to the user's observer
    (a progress bar), if any. Runs on the scheduler thread."""

    def __init__(self, session: Session, user: Any) -> None:
        self._session = session
        self._user = user

    def started(self, run: Run) -> None:
        if self._user is not None:
            self._user.started(run)

    def running(self, i: int, call: Any) -> None:
        if self._user is not None:
            self._user.running(i, call)

    def retrying(self, i: int, state: State) -> None:
        if self._user is not None:
            self._user.retrying(i, state)

    def finished(self, i: int, state: State) -> None:
        session = self._session
        session._fresh.append(i)
        session._ended_rank[i] = next(_ENDED)
        if self._user is not None:
            self._user.finished(i, state)


class _PublishingExecutor:
    """The session's executor as its scheduler sees it: publishes before each poll.

    The serve loop publishes after each scheduler step, but a node can also end
    while it is admitted (a cache hit, a skip, a cancellation), just before the
    scheduler blocks in ``poll`` waiting for work; a future waiting for such a
    node would otherwise sleep until the next outcome.

    It also notes every result that arrived in shared memory. ``State.result()``
    swaps a value's handle for the value when the user reads it, so at the end
    of the session ``Run._finish_run`` no longer sees those segments; the
    session unlinks them itself (see :meth:`Session.close`).
    """

    def __init__(self, session: Session, executor: Executor) -> None:
        self._session = session
        self._poll = executor.poll
        self.capabilities = executor.capabilities._replace(chains=False)  # any value may be read
        self.open = executor.open
        self.submit = executor.submit
        self.wakeup = executor.wakeup
        self.release = executor.release
        self.cancel_running = executor.cancel_running
        self.close = executor.close

    def poll(self, timeout: float | None) -> Any:
        session = self._session
        session._publish()
        outcomes = self._poll(timeout)
        for _call, kind, value in outcomes:
            if kind == OK and type(value) is Payload and value.in_shared_memory:
                session._payloads.append(value)
        return outcomes


def _same_dir(a: Any, b: Any) -> bool:
    return (
        Path(a if a is not None else DEFAULT_DIR).resolve()
        == Path(b if b is not None else DEFAULT_DIR).resolve()
    )


class FutureList(list):
    """What ``task.map`` returns in a flow or a ``with gx.Pool():`` block: a list of
    its futures, with the two methods of Prefect 3's ``PrefectFutureList``.

    Example::

        squares = square.map(range(10)).result()

    Passed to a task (``total.submit(futures)``), it arrives as a plain ``list`` of
    the values, with a plain list's cache key.
    """

    # A container of futures filled in with their values is a plain list (walk.rebuild),
    # and so is its pickle (a worker's copy): the methods are for the futures only.
    _graphexec_values_as = list

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (list(self),))

    def __copy__(self) -> FutureList:
        return FutureList(self)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every future is final, or ``timeout`` seconds have passed."""
        wait(self, timeout=timeout)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> list[Any]:
        """Wait for every future and return their values, in order.

        Args:
            timeout: seconds to wait at most for all of them (None: no limit).
            raise_on_failure: re-raise the first failed task's exception (default),
                or return each failed task's exception in its place.

        Raises:
            TimeoutError: not all of them finished within ``timeout``.
        """
        if timeout is not None:
            not_done = wait(self, timeout=timeout).not_done
            if not_done:
                raise TimeoutError(
                    f"{len(not_done)} of {len(self)} futures did not finish within {timeout} s"
                )
        return [future.result(raise_on_failure=raise_on_failure) for future in self]


def future_list(futures: list[Future]) -> FutureList:
    """``task.map``'s futures, as :class:`FutureList` (the model's seam calls this)."""
    return FutureList(futures)


class WaitResult(NamedTuple):
    """``(done, not_done)`` sets of futures, as ``concurrent.futures.wait`` returns."""

    done: set[Future]
    not_done: set[Future]


def _failed(future: Future) -> bool:
    # (the session's state, not future.state: waiting is not looking at a
    # failure, which stays unhandled until result() or .state)
    state = future._session._state(future.index)
    return state is not None and state.name not in ("Completed", "Cached")


def _listen(futures: Iterable[Future], mailbox: _Mailbox) -> tuple[list[Future], list[Future]]:
    """Register ``mailbox`` with the session of each unfinished future.

    Returns:
        (ended, listened): those with nothing to wait for (final, or their session
        ended) and those the mailbox will receive when they end.
    """
    ended: list[Future] = []
    listened: list[Future] = []
    for f in futures:
        if f.done() or not f._session._add_waiter(f.index, mailbox):
            ended.append(f)
        else:
            listened.append(f)
    return ended, listened


def _unlisten(futures: Iterable[Future], mailbox: _Mailbox) -> None:
    for f in futures:
        f._session._remove_waiter(f.index, mailbox)


def _ended(futures: list[Future]) -> list[Future]:
    """``futures`` that ended, in completion order; raise for one that never will."""
    for f in futures:
        if not f.done():
            f._session._raise_ended(f.index)
    return sorted(futures, key=_finished_at)


_ENDED = itertools.count()  # ranks of nodes by when they became final, all sessions


def _finished_at(future: Future) -> int:
    """When a final future ended, as a rank among all sessions' final nodes (one the
    scheduler made final a moment ago may have no rank yet: the newest)."""
    return future._session._ended_rank.get(future.index, sys.maxsize)


def wait(
    futures: Iterable[Future], timeout: float | None = None, return_when: str = "ALL_COMPLETED"
) -> WaitResult:
    """Wait for futures (``ALL_COMPLETED``, ``FIRST_COMPLETED`` or ``FIRST_EXCEPTION``).

    The futures may come from several flows or pools.

    Args:
        futures: the futures to wait for.
        timeout: seconds to wait at most (None: until ``return_when`` holds); the
            futures not done then are in ``not_done``, nothing raises.
        return_when: ``"ALL_COMPLETED"`` (default), ``"FIRST_COMPLETED"``, or
            ``"FIRST_EXCEPTION"`` (a future ended Failed, Skipped or Cancelled).

    Returns:
        ``(done, not_done)``, like :func:`concurrent.futures.wait`.

    Raises:
        ValueError: ``return_when`` is none of the three.
        RuntimeError: a future's scheduler thread failed, so it will never end.
    """
    if return_when not in ("ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"):
        raise ValueError(
            f"return_when={return_when!r}: use ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION"
        )
    futures = set(futures)
    deadline = None if timeout is None else time.monotonic() + timeout
    mailbox = _Mailbox()
    ended, listened = _listen(futures, mailbox)
    pending = set(listened)
    try:
        done: set[Future] = set(_ended(ended))
        failed = any(_failed(f) for f in done)
        while pending:
            if (return_when == "FIRST_COMPLETED" and done) or (
                return_when == "FIRST_EXCEPTION" and failed
            ):
                break
            batch = [f for f in mailbox.take(deadline) if f in pending]
            if not batch:  # the deadline passed
                break
            pending.difference_update(batch)
            done.update(_ended(batch))
            failed = failed or any(_failed(f) for f in batch)
    finally:
        _unlisten(pending, mailbox)
    return WaitResult(done, futures - done)


def as_completed(futures: Iterable[Future], timeout: float | None = None) -> Iterator[Future]:
    """Yield futures as they finish, in completion order.

    The futures may come from several flows or pools; each is yielded once.

    Raises:
        TimeoutError: some are not finished after ``timeout`` seconds.
        RuntimeError: a future's scheduler thread failed, so it will never end.
    """
    unique = list(dict.fromkeys(futures))
    deadline = None if timeout is None else time.monotonic() + timeout
    mailbox = _Mailbox()
    ended, listened = _listen(unique, mailbox)
    pending = set(listened)
    try:
        yield from _ended(ended)
        while pending:
            batch = [f for f in mailbox.take(deadline) if f in pending]
            if not batch:
                raise TimeoutError(f"{len(pending)} futures unfinished after {timeout} s")
            pending.difference_update(batch)
            yield from _ended(batch)
    finally:
        _unlisten(pending, mailbox)


class PoolBlock:
    """One ``with pool:`` block, in the thread that entered it: its submits' session.

    Each block (each thread, each nesting) has its own session, started on
    its first submit: its own futures, failures and values, on the pool's
    shared workers.
    """

    __slots__ = ("pool", "session")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.session: Session | None = None


_block_lock = threading.Lock()  # one session per block, whichever thread submits first


def session_for_pool(block: PoolBlock) -> Session:
    """The eager session of a ``with gx.Pool(...):`` block, started on first use."""
    with _block_lock:
        if block.session is None:
            # Its Dispatch fires the submitted tasks' hooks and tells the
            # observers of enclosing `with gx.observe()` blocks, as in a flow.
            block.session = Session(
                block.pool._lease(None), name="pool", observer=Dispatch(ambient_observers())
            )
        return block.session


def end_pool_session(block: PoolBlock) -> None:
    """The ``with gx.Pool()`` block ended: wait for its submits, then close its session."""
    session = block.session
    if session is None:
        return
    try:
        session.wait_all()
    finally:
        block.session = None
        session.close()
        _finish_hooks(session, outcome(session.run, cancelled=False))
    session.run._raise_if_failed()


def cancel_pool_session(block: PoolBlock, why: str, everything: bool = False) -> None:
    """The ``with gx.Pool()`` block raised: cancel what it submitted and close
    (``everything``: Ctrl-C, ``Session.cancel``)."""
    session, block.session = block.session, None
    if session is None:
        return
    session.cancel(why, everything)
    session.close()
    _finish_hooks(session, ("on_cancellation",))


def _finish_hooks(session: Session, kinds: tuple[str, ...]) -> None:
    """Let the session's queued hooks and observers run (bounded), then end them."""
    dispatch = session.observer
    if isinstance(dispatch, Dispatch):
        end_hooks(dispatch, session.run, kinds)
