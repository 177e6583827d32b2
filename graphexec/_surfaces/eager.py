"""Eager execution: ``task.submit()`` and futures, on the same scheduler as lazy graphs.

::

    user thread                               scheduler thread (one per session)
    -----------                               ----------------------------------
    task.submit(x) -> graph._add_call ─┐
                      inbox.append(i)  ├─ executor.wakeup() ─> Scheduler.serve():
    future.result() <── condition ─────┘                        admit(i), dispatch,
                        notify_all()  <─────────────────────    poll, finish ...

A :class:`Session` is a :class:`Graph` that grows while it runs, plus the
ordinary :class:`Scheduler` running in ``serve`` mode in a background thread:
eager and lazy work share one scheduler, one executor and every policy
(retries, timeouts, triggers, allow_failure, caching, limits). A ``Future`` is
a ``Node`` of the session's graph, so it is accepted anywhere a node is.

Failure accounting follows graphexec's rule that success is never reported
while a failure nobody saw exists: a failure counts as handled when a
dependent accepted it (as in lazy graphs) or when the user looked at it
(``future.result()`` raised it or returned it, ``future.state`` was read).
At the end of a flow, unhandled failures raise :class:`GraphFailed`.

Values are kept for the whole session (the user may ask any future for its
result at any time), as in Prefect.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from .._data.cache import DEFAULT_DIR, CacheStore
from .._data.serialize import Payload
from .._engine.scheduler import Scheduler
from .._executors.protocol import OK, Executor
from .._model.graph import Graph
from .._model.node import Node
from .._model.order import post_order, sinks
from .._model.run import Run
from .._model.seam import NOT_EAGER
from .._model.state import FINAL, PENDING, RUNNING, State
from .options import ComputeOptions, check_limits

_local = threading.local()


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
    return session_for_pool(top)


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
    future = session.submit(task, args, kwargs)
    state = future.wait()
    session._observed(future.index)
    if future.graph._opts[future.index].return_state:
        return state
    return state.result()


def submit(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future:
    """``task.submit()``: start the call now in the innermost flow or pool block."""
    session = active_session()
    if session is None:
        raise RuntimeError(
            f"{task.name}.submit() starts work now and needs somewhere to run it: call it "
            "inside a @gx.flow, or inside `with gx.Pool(workers=N):`"
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

    __slots__ = ()

    @property
    def _session(self) -> Session:
        return self.graph._session  # type: ignore[attr-defined,no-any-return]

    def done(self) -> bool:
        """True once the task has a final state."""
        state = self._session._state(self.index)
        return state is not None and state.name in FINAL

    def wait(self, timeout: float | None = None) -> State:
        """Block until the task has a final state (or ``timeout`` seconds); return the state.

        Raises:
            TimeoutError: not final after ``timeout`` seconds.
        """
        return self._session._wait(self.index, timeout)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        """Wait for the task and return its value (Prefect's ``future.result()``).

        Args:
            timeout: seconds to wait at most (None: no limit).
            raise_on_failure: re-raise the task's exception (default), or return it.

        Raises:
            TimeoutError: the task did not finish within ``timeout``.
            Exception: the task's own exception, with its remote traceback.
        """
        state = self.wait(timeout)
        self._session._observed(self.index)
        return state.result(raise_on_failure=raise_on_failure)

    @property
    def state(self) -> State:  # type: ignore[override]
        """The current state (Pending, Running, or final); never blocks."""
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
        self.graph = Graph(name)
        self.graph._node_type = Future  # type: ignore[attr-defined]
        self.graph._session = self  # type: ignore[attr-defined]
        self.run = Run(self.graph, [], _Everything())  # type: ignore[arg-type]
        self.executor = executor
        executor.open(self.run)
        self._cache_dir = cache_dir
        self.memory_limit = memory_limit
        self._published = 0  # scheduler.done when waiters were last woken
        self.scheduler = Scheduler(
            self.graph,
            self.run,
            _PublishingExecutor(self, executor),
            fail_fast=fail_fast,
            limits=check_limits(limits),
            observer=observer,
        )
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._new: deque[int] = deque()
        self._closing = False
        self._error: BaseException | None = None
        self._finish_order: list[int] = []
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

    def _take_new(self) -> list[int]:
        with self._lock:
            new = list(self._new)
            self._new.clear()
        return new

    def _has_new(self) -> bool:
        return bool(self._new)

    def _publish(self) -> None:
        self._published = self.scheduler.done
        with self._cond:
            self._cond.notify_all()

    # -- user thread ----------------------------------------------------------

    def submit(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future:
        """Add a call to the graph and start it as soon as its inputs are ready."""
        with self._lock:
            # Under the lock: close() sets _closing under it too, so a submit either
            # is queued before the scheduler's last look at the inbox, or refused.
            if self._closing:
                raise RuntimeError("this flow/pool has finished; submit inside it")
            if self._error is not None:
                raise RuntimeError("the graphexec scheduler thread failed") from self._error
            if task.options.cache_key_fn is not None:
                self._ensure_store()
            node = self.graph._add_call(task, args, kwargs)
            # While earlier submissions wait in the inbox, their wakeup is still
            # to be handled and the scheduler takes the whole inbox at once: one
            # wakeup per batch, not one per submit (a pipe write with processes).
            wake = not self._new
            self._new.append(node.index)
        if wake:
            self.executor.wakeup()
        return node  # type: ignore[return-value]

    def _ensure_store(self) -> None:
        """Open the session's one cache store (caller holds the lock)."""
        if self.scheduler.cache is None:
            self.scheduler.cache = CacheStore(self._cache_dir)

    def _wait(self, index: int, timeout: float | None) -> State:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                state = self._state(index)
                if state is not None and state.name in FINAL:
                    return state
                if self._error is not None:
                    raise RuntimeError("the graphexec scheduler thread failed") from self._error
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    name = self.graph._names[index]
                    raise TimeoutError(f"{name} did not finish within {timeout} s")
                self._cond.wait(remaining if remaining is not None else 0.5)

    def _state(self, index: int) -> State | None:
        """The node's state, None while pending (or not yet admitted by the scheduler)."""
        states = self.run._states
        return states[index] if index < len(states) else None

    def _observed(self, index: int) -> None:
        state = self._state(index)
        if state is not None and state.name not in ("Completed", "Cached"):
            self.run._handled.add(index)

    def wait_all(self) -> None:
        """Block until every submitted task is final."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise RuntimeError("the graphexec scheduler thread failed") from self._error
                sched = self.scheduler
                if (
                    not self._new
                    and sched.done >= sched.n_members
                    and sched.n_members == len(self.graph._deps)
                ):
                    return
                self._cond.wait(0.5)

    def cancel(self, why: str) -> None:
        """Cancel every task still pending or running (Ctrl-C, an exception in the flow)."""
        with self._lock:
            self.scheduler.cancel_reason = self.scheduler.cancel_reason or why
        self.executor.wakeup()

    def close(self) -> None:
        """Let the scheduler thread finish what was submitted, then stop it."""
        with self._lock:
            self._closing = True
        self.executor.wakeup()
        self._thread.join()
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
        self.executor.close()

    def _check_compute_options(
        self, limits: dict[str, int] | None, cache_dir: Any, memory_limit: int | None
    ) -> None:
        where = "graph.compute() inside a flow (or a `with gx.Pool()` block with submits)"
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
        """
        self._check_compute_options(options.limits, options.cache_dir, options.memory_limit)
        refresh_cache, keep = options.refresh_cache, options.keep
        if not targets:
            targets = sinks(graph._deps)
        members = post_order(graph._deps, targets)
        mapping: dict[int, Future] = {}
        with self._lock:
            if any(graph._opts[i].cache_key_fn is not None for i in members):
                self._ensure_store()
            opts = self.graph._opts
            for i in members:
                node = self.graph._copy_node(graph, i, mapping)  # type: ignore[arg-type]
                mapping[i] = node  # type: ignore[assignment]
                if refresh_cache and opts[node.index].cache_key_fn is not None:
                    opts[node.index] = opts[node.index].updated(
                        {"refresh_cache": True}, "compute(refresh_cache=True)"
                    )
                self._new.append(node.index)
        self.executor.wakeup()
        kept = set(members) if keep == "all" else set(targets)
        run = Run(graph, members, kept)
        for i, fut in mapping.items():
            run._states[i] = fut.wait()
            if fut.index in self.run._handled:
                run._handled.add(i)
        run._finish_run()
        graph._latest_run = run
        # The caller gets this Run (or GraphFailed): its failures are now seen.
        self.run._handled.update(f.index for f in mapping.values())
        if options.raise_on_failure:
            run._raise_if_failed()
        return run


class _PublishingExecutor:
    """The session's executor as its scheduler sees it: publishes before each poll.

    The serve loop publishes after each scheduler step, but a node can also end
    while it is admitted (a cache hit, a skip, a cancellation), just before the
    scheduler blocks in ``poll`` waiting for work; a future waiting for such a
    node would otherwise sleep until its own next look (half a second).

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
        if session.scheduler.done != session._published:
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


class WaitResult(NamedTuple):
    """``(done, not_done)`` sets of futures, as ``concurrent.futures.wait`` returns."""

    done: set[Future]
    not_done: set[Future]


def wait(
    futures: Iterable[Future], timeout: float | None = None, return_when: str = "ALL_COMPLETED"
) -> WaitResult:
    """Wait for futures (``ALL_COMPLETED``, ``FIRST_COMPLETED`` or ``FIRST_EXCEPTION``).

    Returns:
        ``(done, not_done)``, like :func:`concurrent.futures.wait`.
    """
    if return_when not in ("ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"):
        raise ValueError(
            f"return_when={return_when!r}: use ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION"
        )
    futures = set(futures)
    deadline = None if timeout is None else time.monotonic() + timeout
    sessions = {f._session for f in futures}
    while True:
        done = {f for f in futures if f.done()}
        if (
            len(done) == len(futures)
            or (return_when == "FIRST_COMPLETED" and done)
            # (reading the session's state, not f.state: waiting is not looking
            # at a failure, which stays unhandled until result() or .state)
            or (
                return_when == "FIRST_EXCEPTION"
                and any(
                    f._session._state(f.index).name not in ("Completed", "Cached") for f in done
                )
            )
        ):
            return WaitResult(done, futures - done)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return WaitResult(done, futures - done)
        session = next(iter(sessions))
        with session._cond:
            session._cond.wait(min(0.05, remaining) if remaining is not None else 0.05)


def as_completed(futures: Iterable[Future], timeout: float | None = None) -> Iterator[Future]:
    """Yield futures as they finish, in completion order.

    Raises:
        TimeoutError: some are not finished after ``timeout`` seconds.
    """
    pending = list(dict.fromkeys(futures))
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        finished = [f for f in pending if f.done()]
        if finished:
            # Completion order: attempts' end times (cached hits: immediately).
            finished.sort(key=lambda f: f._session._state(f.index).finished or 0.0)
            for f in finished:
                pending.remove(f)
                yield f
            continue
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"{len(pending)} futures unfinished after {timeout} s")
        session = pending[0]._session
        with session._cond:
            session._cond.wait(min(0.05, remaining) if remaining is not None else 0.05)


def session_for_pool(pool: Any) -> Session:
    """The eager session of ``with gx.Pool(...):``, started on first use."""
    if pool._session is None:
        pool._session = Session(pool._lease(None), name="pool")
    return pool._session  # type: ignore[no-any-return]


def end_pool_session(pool: Any) -> None:
    session = pool._session
    if session is None:
        return
    try:
        session.wait_all()
    finally:
        pool._session = None
        session.close()
    session.run._raise_if_failed()
