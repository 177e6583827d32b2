"""One warm :class:`ProcessPool` serving many runs from many threads (``gx.Pool``).

::

    run threads (compute, flow, `with pool:` session), each with its own Scheduler
    ------------------------------------------------------------------------------
    RunLease.submit(call) ─> the run's queue (or straight to the pool when nobody
                             else has calls queued: chains then work as usual)
    RunLease.poll()  ─> the run's outbox has outcomes? return them
                     ─> else take the drive (one thread at a time) and drive the
                        pool: feed queued calls, one per run in turn (round-robin),
                        poll the pool, route each outcome to the outbox of its
                        call's run; return when this run has outcomes
                     ─> else (another thread drives) wait for its outbox

Each run keeps its own :class:`~graphexec._engine.scheduler.Scheduler` on its
own thread (states, fail_fast, retries, cancellation, values kept or released
by its own rules); a :class:`RunLease` is that scheduler's executor. The
:class:`ProcessPool` is only ever touched by the thread holding the drive
(``SharedPool._drive``), so its code stays single-threaded; with one run, that
run's thread drives it all the time, as a private pool's lease does, at no
extra cost. When the driver returns to its scheduler it hands the drive to a
waiting run's thread. Requests that need the pool (a run's cancellation, its
close, the pool's shutdown) take the drive too: the driver gives it up at its
next wake-up (``_want``).

Per run: its queue of calls not yet sent (at most ``QUEUE_DEPTH`` per worker,
so that priorities within a run still decide in its scheduler's heap), its
outbox, its memory limit (carried by each call, ``Call.memory_limit``), its
cancellation (only workers running one of its calls are killed; other runs'
calls queued there come back as REQUEUE, untouched). Per pool: the workers,
their settings (``max_calls``, the initializer), the function registry, and
the shared-memory sweep, done when no run is open.

Fairness: queued calls go one per run with queued work in turn (round-robin),
so a run never waits for another's whole graph; within a run, its
scheduler's priorities decide what it queues first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from .._model.errors import WorkerCrashed
from .process import ProcessPool
from .protocol import ERROR, SIGNAL_SLICE, Call, Capabilities, Outcome

QUEUE_DEPTH = 2  # calls a run may have queued, not yet sent, per worker of the pool
# A waiting run's thread looks whether the drive is free at least this often
# (a safety net: the driver hands the drive on when it returns).
HANDOFF_CHECK = 0.05


class SharedPool:
    """A :class:`ProcessPool` driven, one thread at a time, for many runs."""

    def __init__(self, procs: ProcessPool) -> None:
        self.procs = procs
        self._lock = threading.Lock()  # the fields below but _drive's and _owner
        self._drive = threading.Lock()  # held by the one thread touching procs
        self._leases: list[RunLease] = []  # open runs, in round-robin order
        self._turn = 0  # index in _leases of the run whose call goes next
        self._waiters: list[RunLease] = []  # runs whose thread waits in poll
        self._want = 0  # threads waiting for the drive to cancel, close or shut down
        self._polling = False  # the driver is blocked in procs.poll: wake it by pipe
        self._piped = False  # ... and a wake-up is on its way
        # With the drive held:
        self._owner: dict[int, tuple[Call, RunLease]] = {}  # id(call) -> the call, its run
        self._refused: Call | None = None  # the pool said no to it: offered first
        self._stopped = False
        # Concurrency limits across runs (under _lock): slots taken per key, and
        # the calls counted, until their outcome comes back or they are dropped.
        self._in_use: dict[Any, int] = {}
        self._counted: dict[int, Call] = {}

    def _full(self, call: Call) -> bool:
        """A limit of ``call`` has no free slot on the pool (caller holds _lock)."""
        in_use = self._in_use
        return any(in_use.get(key, 0) >= cap for key, cap in call.limits or ())

    def _count(self, call: Call) -> None:
        """``call`` takes a slot of each of its limits (caller holds _lock)."""
        if call.limits and id(call) not in self._counted:
            self._counted[id(call)] = call
            for key, _ in call.limits:
                self._in_use[key] = self._in_use.get(key, 0) + 1

    def _uncount(self, calls: list[Call]) -> None:
        """These calls are over (answered, cancelled, dropped): free their slots."""
        with self._lock:
            for call in calls:
                if self._counted.get(id(call)) is call:
                    del self._counted[id(call)]
                    for key, _ in call.limits or ():
                        left = self._in_use[key] - 1
                        if left:
                            self._in_use[key] = left
                        else:  # (keys name functions too: none is kept once idle)
                            del self._in_use[key]

    def lease(self, memory_limit: int | None) -> RunLease:
        """A new run's executor on this pool (any number may be open at once)."""
        with self._lock:
            if self.procs.closed or self._stopped:
                raise RuntimeError("this Pool is closed; create a new one")
            lease = RunLease(self, memory_limit)
            self._leases.append(lease)
            if memory_limit is not None:
                self.procs.limited_runs += 1
        return lease

    def shutdown(self) -> None:
        """Fail what open runs still wait for, then stop the workers. Idempotent."""
        self._take_drive()
        try:
            if self._stopped:
                return
            with self._lock:
                self._stopped = True
                leases, self._leases = self._leases, []
            for lease in leases:
                lease._abandon(
                    "the pool was closed (pool.close(), or the last `with pool:` block ended) "
                    "while it was pending or running; keep the pool open until its computes end"
                )
            self.procs.shutdown()
        finally:
            self._give_drive()

    # -- the drive ---------------------------------------------------------------

    def _wake(self) -> None:
        """Make a driver blocked in the pool's poll look again (caller holds _lock)."""
        if self._polling and not self._piped:
            self._piped = True
            self.procs.wakeup()

    def _take_drive(self) -> None:
        """Take the drive, however long the driver waits (cancel, close, shutdown)."""
        with self._lock:
            self._want += 1
            self._wake()
        try:
            while not self._drive.acquire(timeout=SIGNAL_SLICE):
                with self._lock:
                    self._wake()
        finally:
            with self._lock:
                self._want -= 1

    def _give_drive(self) -> None:
        """Release the drive and tell a waiting run's thread it may take it."""
        self._drive.release()
        with self._lock:
            # One with nothing to read: it will take the drive (one with
            # outcomes returns to its scheduler first).
            waiter = next((w for w in self._waiters if not w._outbox and not w._woken), None)
        if waiter is not None:
            with waiter._cond:
                waiter._cond.notify()

    def _run_driver(self, lease: RunLease, deadline: float | None) -> None:
        """Drive the pool (drive held) until ``lease`` has outcomes, or ``deadline``."""
        procs = self.procs
        while True:
            self._feed()
            if lease._outbox or lease._woken or self._want or self._stopped:
                return
            with self._lock:
                if any(other._queue for other in self._leases) and self._refused is None:
                    continue  # queued while we fed: feed again first
                self._polling = True
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                outcomes = procs.poll(timeout)
            finally:
                with self._lock:
                    self._polling = self._piped = False
            if outcomes:
                self._route(outcomes)
            if deadline is not None and time.monotonic() >= deadline:
                return

    def _feed(self) -> None:
        """Send queued calls, one per run in turn, until the pool has no free slot."""
        procs, owner = self.procs, self._owner
        refused = self._refused
        if refused is not None:
            self._refused = None
            if not procs.submit(refused):
                self._refused = refused
                return
            owner[id(refused)][1]._sent()
        lock = self._lock
        while True:
            with lock:  # the next run with queued work, after the one served last
                leases = self._leases
                n = len(leases)
                call = None
                for k in range(n):
                    lease = leases[(self._turn + k) % n]
                    if lease._queue:
                        call = lease._queue.popleft()
                        self._turn = (self._turn + k + 1) % n
                        break
                if call is None:
                    return
            owner[id(call)] = (call, lease)
            # (outside the lock: submit pickles the call's arguments, and the
            # runs' threads queue more meanwhile)
            try:
                sent = procs.submit(call)
            except BaseException:
                # Ctrl-C in a driving main thread: a call not yet handed to a
                # worker goes back to the front of its run's queue, never lost.
                if call.worker is None and not call.finished:
                    with lock:
                        lease._queue.appendleft(call)
                raise
            if not sent:
                self._refused = call
                return
            lease._sent()

    def _route(self, outcomes: list[Outcome]) -> None:
        if self._counted:
            self._uncount([o[0] for o in outcomes])
        owner = self._owner
        routed: dict[RunLease, list[Outcome]] = {}
        for outcome in outcomes:
            call = outcome[0]
            found = owner.pop(id(call), None)
            if found is None or found[0] is not call:
                continue  # a call whose run was cancelled or closed: dropped
            lease = found[1]
            if call.then:  # a chain: its other calls answer on their own
                for nxt in call.then:
                    owner[id(nxt)] = (nxt, lease)
            mine = routed.get(lease)
            if mine is None:
                routed[lease] = [outcome]
            else:
                mine.append(outcome)
        # Runs refused a slot: one may be free now (their scheduler tries again).
        # (read without the lock: a flag set meanwhile is seen at the next route)
        for lease in [lease for lease in self._leases if lease._starved]:
            lease._starved = False
            lease._woken = True
            routed.setdefault(lease, [])
        for lease, mine in routed.items():
            with lease._cond:
                lease._outbox += mine
                lease._cond.notify()

    def _cancel(self, lease: RunLease) -> list[Call]:
        """Stop this run's calls only (drive held): queued ones never start, running
        ones are killed; other runs' calls queued on those workers come back."""
        with self._lock:
            queued = list(lease._queue)
            lease._queue.clear()
        self._withdraw(lease)
        killed = self.procs.cancel_where(lambda call: self._mine(call, lease))
        for call in killed:
            self._owner.pop(id(call), None)
        self._uncount([*queued, *killed])
        return killed

    def _mine(self, call: Call, lease: RunLease) -> bool:
        found = self._owner.get(id(call))
        return found is not None and found[0] is call and found[1] is lease

    def _withdraw(self, lease: RunLease) -> None:
        refused = self._refused
        if refused is not None and self._owner[id(refused)][1] is lease:
            self._refused = None
            del self._owner[id(refused)]
            self.procs.withdraw(refused)
            self._uncount([refused])

    def _close(self, lease: RunLease) -> None:
        """A run ended (drive held): forget its calls; with no run left, sweep the pool."""
        self._withdraw(lease)
        for key in [k for k, (_, owner) in self._owner.items() if owner is lease]:
            del self._owner[key]  # calls still running there: their outcomes are dropped
        with self._lock:
            queued = list(lease._queue)
            lease._queue.clear()
        self._uncount(queued)  # (running ones free their slots when they answer)
        with self._lock:
            if lease in self._leases:
                index = self._leases.index(lease)
                self._leases.remove(lease)
                if index < self._turn:
                    self._turn -= 1
                if lease.memory_limit is not None:
                    self.procs.limited_runs -= 1
            idle = not self._leases
        if idle and not self._stopped:
            self.procs.idle_sweep()


class RunLease:
    """One run's executor on a :class:`SharedPool` (the engine's view of it)."""

    def __init__(self, shared: SharedPool, memory_limit: int | None) -> None:
        self.shared = shared
        self.memory_limit = memory_limit
        # Chains only when a call goes straight to the pool (submit): the pool
        # cuts a chain to what it sends, which the scheduler reads back then.
        # Off with memory_limit=, as on a private pool (process.Lease).
        self.capabilities = Capabilities(
            kills_calls=True, memory_limit=True, chains=memory_limit is None, isolates=True
        )
        self._depth = QUEUE_DEPTH * shared.procs.workers
        self._queue: deque[Call] = deque()  # under shared._lock
        self._starved = False  # submit said no: wake the run when its queue has room
        self._cond = threading.Condition(threading.Lock())
        self._outbox: list[Outcome] = []  # under _cond
        self._woken = False
        self._abandoned: str | None = None
        self._closed = False

    def open(self, run: Any) -> None:
        pass

    def submit(self, call: Call) -> bool:
        call.memory_limit = self.memory_limit
        if self._abandoned is not None:
            call.then = None
            self._fail(call, self._abandoned)
            return True
        shared = self.shared
        if call.limits:
            with shared._lock:
                if shared._full(call):
                    # Another run holds the slots: wait (as a whole: the scheduler
                    # stops dispatching) until a call ends somewhere (_route).
                    self._starved = True
                    return False
                shared._count(call)
        if not self._queue and shared._refused is None and shared._drive.acquire(blocking=False):
            # Nobody drives: straight to the pool, unless another run has calls
            # waiting (they go first, in turn).
            try:
                with shared._lock:
                    alone = len(shared._leases) == 1
                    direct = not shared._stopped and not any(
                        other._queue for other in shared._leases
                    )
                if direct:
                    shared._owner[id(call)] = (call, self)
                    if shared.procs.submit(call):
                        return True
                    if alone:
                        # As on a private pool: the scheduler keeps it (and its
                        # chain) until a slot frees; _route wakes this run then.
                        del shared._owner[id(call)]
                        shared._uncount([call])
                        self._starved = True
                        return False
                    call.then = None  # (sent later, alone)
                    shared._refused = call
                    return True
            finally:
                shared._give_drive()
        call.then = None
        with shared._lock:
            if len(self._queue) >= self._depth:
                self._starved = True
                full = True
            else:
                full = False
                self._queue.append(call)
                shared._wake()
        if full:
            shared._uncount([call])
            return False
        return True

    def _sent(self) -> None:
        """The driver sent one of this run's queued calls."""
        if self._starved and len(self._queue) <= self._depth // 2:
            self._starved = False
            self.wakeup()  # its scheduler may queue more now

    def poll(self, timeout: float | None) -> list[Outcome]:
        shared = self.shared
        deadline = None if timeout is None else time.monotonic() + timeout
        in_main = threading.current_thread() is threading.main_thread()
        cond = self._cond
        while True:
            with cond:
                if self._outbox or self._woken:
                    return self._take()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                # (not while another thread asks for the drive to cancel or
                # close: it would have to win the lock against this loop)
                if (
                    self._abandoned is None
                    and not shared._want
                    and shared._drive.acquire(blocking=False)
                ):
                    drive = True
                else:
                    drive = False
                    with shared._lock:
                        shared._waiters.append(self)
                    try:
                        # (the driver notifies under this condition's lock: no
                        # wake-up is lost between the acquire above and this wait)
                        wait = HANDOFF_CHECK if self._abandoned is None else SIGNAL_SLICE
                        if in_main:
                            wait = min(wait, SIGNAL_SLICE)
                        cond.wait(wait if remaining is None else min(remaining, wait))
                    finally:
                        with shared._lock:
                            shared._waiters.remove(self)
            if drive:
                try:
                    shared._run_driver(self, deadline)
                finally:
                    shared._give_drive()

    def _take(self) -> list[Outcome]:
        """The outbox (caller holds _cond)."""
        outcomes, self._outbox = self._outbox, []
        self._woken = False
        return outcomes

    def wakeup(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify()
        shared = self.shared
        if shared._polling:
            with shared._lock:
                shared._wake()

    def release(self, node: int, handle: Any) -> None:
        pass

    def cancel_running(self) -> list[Call]:
        if self._abandoned is not None:
            return []
        shared = self.shared
        shared._take_drive()
        try:
            killed = shared._cancel(self)
        finally:
            shared._give_drive()
        with self._cond:
            # Outcomes already routed for calls it killed: those are cancelled now.
            gone = {id(c) for c in killed}
            self._outbox = [o for o in self._outbox if id(o[0]) not in gone]
        return killed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shared = self.shared
        shared._take_drive()
        try:
            shared._close(self)
        finally:
            shared._give_drive()

    def _fail(self, call: Call, why: str) -> None:
        call.started = call.finished = time.time()
        error = WorkerCrashed(f"{call.name} did not finish: {why}", node=call.name)
        with self._cond:
            self._outbox.append((call, ERROR, error))
            self._cond.notify()

    def _abandon(self, why: str) -> None:
        """The pool is gone (drive held): each call this run waits for fails, on its node."""
        self._abandoned = why
        with self.shared._lock:
            queued = list(self._queue)
            self._queue.clear()
        pending = [c for c, lease in self.shared._owner.values() if lease is self]
        for call in dict.fromkeys([*queued, *pending]):
            self._fail(call, why)
