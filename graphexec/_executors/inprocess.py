"""Executors that run calls in this process: "sync" (this thread) and "threads".

Both speak the executor protocol of ``protocol.py``. The sync executor runs each
call inside ``submit`` so the scheduler, the task and pdb share one thread.
The thread executor is for work that releases the GIL (numpy, I/O).

Threads cannot be killed: a thread whose call passes its timeout is
abandoned (the node fails with ``TaskTimeout`` at the deadline, the thread's
eventual result is dropped). It keeps its place until the call returns (no
fresh thread: at most ``workers`` calls run), and so do the concurrency slots
the call took (``Call.holds_slots``; a ``FREED`` outcome gives them back).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, cast

from .protocol import (
    ERROR,
    FREED,
    SIGNAL_SLICE,
    Call,
    Capabilities,
    Deadlines,
)
from .runtime import run_inline, timeout_error


class SyncExecutor:
    """Runs each call in the calling thread, one at a time."""

    capabilities = Capabilities(in_caller_thread=True, in_process=True, slots=1)

    def __init__(self) -> None:
        self._done: list[tuple[Call, int, Any]] = []
        self._wake = threading.Event()

    def open(self, run: Any) -> None:
        pass

    def release(self, node: int, handle: Any) -> None:
        pass

    def submit(self, call: Call) -> bool:
        if self._done:
            return False  # let the scheduler take this outcome first: depth-first order
        self._done.append(run_inline(call, "sync"))
        return True

    def poll(self, timeout: float | None) -> list[tuple[Call, int, Any]]:
        if not self._done and (timeout is None or timeout > 0):
            # Only a retry delay is pending, or an eager session waits for work.
            self._wake.wait(timeout)
        self._wake.clear()
        done, self._done = self._done, []
        return done

    def wakeup(self) -> None:
        self._wake.set()

    def cancel_running(self) -> list[Call]:
        return []

    def close(self) -> None:
        self._done = []


class ThreadExecutor:
    """A fixed number of threads fed from one queue."""

    # A thread cannot be killed: an overdue call is abandoned, its result dropped.
    capabilities = Capabilities(in_process=True)

    def __init__(self, workers: int) -> None:
        self.capabilities = self.capabilities._replace(slots=workers)  # (its own threads)
        self._size = workers
        self._inbox: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        # Outcomes, and None from wakeup().
        self._outbox: queue.SimpleQueue[tuple[Call, int, Any] | None] = queue.SimpleQueue()
        self._running: dict[int, Call] = {}  # id(call) -> call, in flight
        # id(call) -> when its timeout= runs out, on the wall clock that times the
        # call's attempt (call.started): a node fails only once its own recorded
        # duration has reached its timeout.
        self._deadlines = Deadlines()
        self._abandoned: set[int] = set()  # calls past their timeout, still running
        self._threads: list[threading.Thread] = []
        self._live = 0  # threads started

    def open(self, run: Any) -> None:
        pass

    def release(self, node: int, handle: Any) -> None:
        pass

    def _loop(self) -> None:
        name = threading.current_thread().name
        while True:
            call = self._inbox.get()
            if call is None:
                return
            try:
                outcome = run_inline(call, name)
            except KeyboardInterrupt as exc:
                # Raised by the task itself (a signal reaches the main thread only): its
                # node fails, as on the process pool. Uncaught, it ended this thread
                # and the run waited for the call for ever.
                call.finished = time.time()
                outcome = (call, ERROR, exc)
            self._outbox.put(outcome)

    def submit(self, call: Call) -> bool:
        # The inbox never holds more calls than free threads: an abandoned call
        # keeps its thread until it returns (no replacement is started), so at
        # most ``workers`` calls run, as workers= says.
        if len(self._running) + len(self._abandoned) >= self._size:
            return False
        if self._live < self._size:
            self._live += 1
            thread = threading.Thread(
                target=self._loop, name=f"graphexec-thread-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        call.started = time.time()
        self._running[id(call)] = call
        if call.timeout is not None:
            self._deadlines.set(id(call), call.started + call.timeout)
        self._inbox.put(call)
        return True

    def poll(self, timeout: float | None) -> list[tuple[Call, int, Any]]:
        wait = self._deadlines.wait(timeout, time.time())
        outcomes = []
        deadline = None if wait is None else time.monotonic() + wait
        # In slices in the main thread: Ctrl-C delivered to one of our threads
        # (the kernel may pick any) does not wake this thread's lock wait;
        # returning to Python every slice runs the pending KeyboardInterrupt
        # here. Any other thread (an eager session's scheduler) only gets
        # KeyboardInterrupt from the main thread: it sleeps until there is news.
        step = SIGNAL_SLICE if threading.current_thread() is threading.main_thread() else None
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                span = left if step is None else step if left is None else min(left, step)
                try:
                    outcomes.append(
                        self._outbox.get(timeout=None if span is None else max(0.0, span))
                    )
                    break
                except queue.Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
            while True:
                outcomes.append(self._outbox.get_nowait())
        except queue.Empty:
            pass
        fresh: list[tuple[Call, int, Any]] = []
        for outcome in outcomes:
            if outcome is None:  # wakeup()
                continue
            key = id(outcome[0])
            if key in self._abandoned:  # its node already failed with TaskTimeout
                self._abandoned.discard(key)
                if outcome[0].holds_slots:  # its thread is free, and so are its slots
                    fresh.append((outcome[0], FREED, None))
            elif self._running.pop(key, None) is not None:
                self._deadlines.discard(key)
                fresh.append(outcome)
        now = time.time()
        for overdue in self._deadlines.expired(now):
            key = cast(int, overdue)
            call = self._running.get(key)
            if call is None:
                continue
            assert call.timeout is not None
            if now < call.started + call.timeout:
                # The thread started the call after it was queued (run_inline
                # stamps call.started): its time runs from there.
                self._deadlines.set(key, call.started + call.timeout)
                continue
            self._abandon(key)
            # Its node fails now, but the call runs on: its concurrency slots (tags,
            # max_concurrency) stay taken until it returns (FREED).
            call.holds_slots = True
            call.finished = time.time()
            fresh.append(
                (
                    call,
                    ERROR,
                    timeout_error(
                        call,
                        "threads cannot be killed: it was abandoned and its result will be dropped",
                    ),
                )
            )
        return fresh

    def wakeup(self) -> None:
        self._outbox.put(None)

    def _abandon(self, key: int) -> None:
        del self._running[key]
        self._deadlines.discard(key)
        self._abandoned.add(key)

    def cancel_running(self) -> list[Call]:
        calls = list(self._running.values())
        for key in list(self._running):
            self._abandon(key)
        for call in calls:  # they run on: their slots stay taken until FREED
            call.holds_slots = True
        return calls

    def close(self) -> None:
        threads, self._threads = self._threads, []
        for _ in threads:
            self._inbox.put(None)
        for thread in threads:
            # Abandoned threads are daemons still inside user code: not waited for.
            thread.join(timeout=0.05)
