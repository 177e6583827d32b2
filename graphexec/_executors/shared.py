"""One warm :class:`ProcessPool` serving many runs from many threads (``gx.Pool``).

::

    run threads (compute, flow, `with pool:` session), each with its own Scheduler
    ------------------------------------------------------------------------------
    RunLease.submit(call) ─> straight to the pool when nobody drives and no other
                             run has calls queued; else the run's queue; a call
                             whose tag limit / task cap is full on the pool waits
                             in the run's held list (the run goes on dispatching)
    RunLease.poll()  ─> the run's outbox has outcomes? return them
                     ─> else take the drive (one thread at a time) and drive the
                        pool: promote held calls whose slot is free, feed queued
                        calls, one per run in turn (round-robin), poll the pool,
                        route each outcome to the outbox of its call's run;
                        return when this run has outcomes
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
held calls (waiting for a slot of a limit shared with other runs), its
outbox, its memory limit (carried by each call, ``Call.memory_limit``), its
cancellation (only workers running one of its calls are killed; other runs'
calls queued there come back as REQUEUE, untouched). Per pool: the workers,
their settings (``max_calls``, the initializer), the function registry, the
slots taken per limit key, and the shared-memory sweep, done when no run is
open.

Fairness: queued calls go one per run with queued work in turn (round-robin),
so a run never waits for another's whole graph; within a run, its
scheduler's priorities decide what it queues first. A slot of a shared limit
that frees goes to the runs holding calls for it in the same turn order.

Chains (sole consumers sent behind a call to its worker, ``_engine/chains.py``)
are kept whether a call goes straight to the pool or waits in a queue: the
lease keeps the chain's list (``RunLease._chains``) and hands it to the pool
when it sends the call, then gives the call back the one-by-one links its
scheduler made (``head.then == [first]``); calls the pool did not send behind
it are unchained by the scheduler when the last one sent answers with its
value, as on a private pool. A queued call with a chain is not sent before
its run's thread has come back into the lease (``_gate``): until then its
scheduler may still be linking the chain's calls, and the two threads would
both write ``Call.then``. The driver registers every call of a chain as the
run's when it sends it, so that none of their outcomes depends on the
scheduler's links.

Ctrl-C and SIGTERM: Python raises ``KeyboardInterrupt`` (and graphexec's
handler :class:`~graphexec.Terminated`) in the main thread, between any two
bytecodes. While the main thread holds the drive — outcomes of other runs
taken from the pool and not yet in their outboxes, a call taken from a run's
queue and not yet sent — such an exception would lose another run's work
and leave it waiting forever. So every stretch where the main thread holds,
takes or gives the drive is a critical section (``with SHIELD:``, as trio
protects its run loop from ``KeyboardInterrupt``): the handlers graphexec
installs while a compute on a shared pool runs (``_surfaces/signals.py``)
ask :meth:`SignalShield.defer` and, inside one, are run only when it ends —
within ``SIGNAL_SLICE``, since a driving main thread polls the pool in
slices — after the outcomes are delivered and the drive is released. The
driver's state is also left consistent if anything else escapes (a bug):
the drive is released in a ``finally``, a call not handed to a worker goes
back to its queue, and a pool closed half-way fails the calls of every run
still open.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from threading import get_ident, main_thread
from typing import Any

from .._model.handle import discard
from .process import PROGRAM_EXITED, ProcessPool, did_not_finish
from .protocol import ERROR, OK, SIGNAL_SLICE, Call, Capabilities, Outcome

# Seconds the interpreter's exit waits for a thread driving an open pool to give up
# the drive (SharedPool.shutdown_at_exit) before it stops the workers anyway.
EXIT_DRIVE_WAIT = 5.0
QUEUE_DEPTH = 2  # calls a run may have queued, not yet sent, per worker of the pool
# A waiting run's thread looks whether the drive is free at least this often
# (a safety net: the driver hands the drive on when it returns).
HANDOFF_CHECK = 0.05
POOL_CLOSED = (
    "the pool was closed (pool.close(), or the last `with pool:` block ended) "
    "while it was pending or running; keep the pool open until its computes end"
)


class SignalShield:
    """Critical sections of the main thread in which signal handlers wait.

    ``with SHIELD:`` in the main thread marks one (nested ones count; in other
    threads it does nothing: Python runs signal handlers only in the main
    thread). A handler that would raise asks :meth:`defer` first; inside a
    section it is queued and runs when the outermost section ends, so its
    exception leaves from there.
    """

    __slots__ = ("depth", "main", "pending")

    def __init__(self) -> None:
        self.depth = 0
        self.pending: list[tuple[Callable[[int, Any], Any], int, Any]] = []
        # The main thread's id, read on every dispatch: kept here, and read
        # again in a child of os.fork(), whose main thread is the forking one.
        self.main = main_thread().ident
        if hasattr(os, "register_at_fork"):  # (POSIX)
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.main = main_thread().ident

    def __enter__(self) -> None:
        if get_ident() == self.main:
            self.depth += 1  # (no bytecode after this can raise before the block)

    def __exit__(self, *exc: object) -> None:
        if get_ident() != self.main:
            return
        self.depth -= 1
        if self.depth or not self.pending:
            return
        pending, self.pending = self.pending, []
        first: BaseException | None = None
        for handler, signum, frame in pending:
            try:
                handler(signum, frame)
            except BaseException as raised:
                first = first or raised
        if first is not None:
            raise first

    def defer(self, handler: Callable[[int, Any], Any], signum: int, frame: Any) -> bool:
        """For a signal handler: True if a critical section runs (``handler(signum,
        frame)`` is then called when it ends), False if it may act now."""
        if self.depth:
            self.pending.append((handler, signum, frame))
            return True
        return False


SHIELD = SignalShield()


class SharedPool:
    """A :class:`ProcessPool` driven, one thread at a time, for many runs."""

    def __init__(self, procs: ProcessPool) -> None:
        self.procs = procs
        procs.at_exit = weakref.WeakMethod(self.shutdown_at_exit)
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
        # the calls counted, until their outcome comes back or they are dropped;
        # calls held (RunLease._held) per key, and in all.
        self._in_use: dict[Any, int] = {}
        self._counted: dict[int, Call] = {}
        self._held_keys: dict[Any, int] = {}
        self._n_held = 0
        # A slot freed while calls were held, and _promote has not looked since: a
        # new call naming a slot they wait for waits behind them (_must_hold).
        self._freed = False

    def _full(self, call: Call) -> bool:
        """A limit of ``call`` has no free slot on the pool (caller holds _lock)."""
        in_use = self._in_use
        return any(in_use.get(key, 0) >= cap for key, cap in call.limits or ())

    def _must_hold(self, call: Call) -> bool:
        """``call`` waits for a slot: one of its limits is full, or calls already
        wait for one of them and a slot freed since they were last looked at (they
        may take it: first come, first served; caller holds _lock). Calls held for
        another of its limits, still full, do not keep it from a free slot."""
        held, in_use = self._held_keys, self._in_use
        limits = call.limits or ()
        if any(in_use.get(key, 0) >= cap for key, cap in limits):
            return True
        return self._freed and any(key in held for key, _ in limits)

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
            if self._n_held:
                self._freed = True
                self._wake()  # a held call may take the slot (the driver promotes it)

    def _hold(self, lease: RunLease, call: Call) -> None:
        """``call`` waits in its run's held list for its slots (caller holds _lock)."""
        lease._held.append(call)
        self._n_held += 1
        for key, _ in call.limits or ():
            self._held_keys[key] = self._held_keys.get(key, 0) + 1

    def _unhold(self, call: Call) -> None:
        """``call`` leaves a held list (caller holds _lock and removed it there)."""
        self._n_held -= 1
        for key, _ in call.limits or ():
            left = self._held_keys[key] - 1
            if left:
                self._held_keys[key] = left
            else:
                del self._held_keys[key]

    def _drop_held(self, lease: RunLease) -> list[Call]:
        """Empty ``lease``'s held list; return its calls (caller holds _lock)."""
        held, lease._held = lease._held, []
        for call in held:
            self._unhold(call)
        return held

    def _promote(self) -> None:
        """Held calls whose slots are free take them and go to the front of their
        run's queue, one per run in turn (caller holds _lock and the drive)."""
        self._freed = False
        leases = self._leases
        n = len(leases)
        front: dict[RunLease, int] = {}
        moved = True
        while moved and self._n_held:
            moved = False
            for k in range(n):
                lease = leases[(self._turn + k) % n]
                for index, call in enumerate(lease._held):
                    if not self._full(call):
                        del lease._held[index]
                        self._unhold(call)
                        self._count(call)
                        at = front.get(lease, 0)
                        lease._queue.insert(at, call)  # (they were dispatched first)
                        front[lease] = at + 1
                        moved = True
                        break

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
        with SHIELD:
            self._take_drive(None)
            try:
                self._stop(POOL_CLOSED)
            finally:
                self._give_drive()

    def _stop(self, why: str) -> None:
        """:meth:`shutdown`, the drive held: the open runs' calls fail saying ``why``.
        Once more, it finishes a shutdown a Ctrl-C interrupted (the exit's does)."""
        with self._lock:
            self._stopped = True
            leases, self._leases = self._leases, []
        try:
            for lease in leases:
                lease._abandon(why)
        finally:
            # (a run this loop did not reach fails its calls when it next
            # drives: _run_driver sees _stopped)
            self.procs.shutdown()

    # -- the drive ---------------------------------------------------------------

    def _wake(self) -> None:
        """Make a driver blocked in the pool's poll look again (caller holds _lock)."""
        if self._polling and not self._piped:
            self._piped = True
            self.procs.wakeup()

    def shutdown_at_exit(self) -> None:
        """The interpreter exits with this pool open (a thread may still be running a
        compute on it: a daemon, or one Ctrl-C left behind): :meth:`shutdown`, so that
        its runs end as a closed pool's do, unless the thread driving the pool does
        not give the drive up within ``EXIT_DRIVE_WAIT``; then the workers are
        stopped at once, as the exit must not hang."""
        with SHIELD:
            if not self._take_drive(EXIT_DRIVE_WAIT):
                self.procs.shutdown()
                return
            try:
                self._stop(PROGRAM_EXITED)
            finally:
                self._give_drive()

    def _take_drive(self, wait: float | None) -> bool:
        """Take the drive, however long the driver waits (cancel, close, shutdown), or
        within ``wait`` seconds: False if not.

        In the main thread, call it inside ``with SHIELD:`` (and give it back there).
        """
        give_up = None if wait is None else time.monotonic() + wait
        with self._lock:
            self._want += 1
            self._wake()
        try:
            while not self._drive.acquire(timeout=SIGNAL_SLICE):
                if give_up is not None and time.monotonic() >= give_up:
                    return False
                with self._lock:
                    self._wake()
            return True
        finally:
            with self._lock:
                self._want -= 1

    def _give_drive(self) -> None:
        """Release the drive and tell a waiting run's thread it may take it."""
        self._drive.release()
        if not self._waiters:
            # Read without the lock: a run's thread registers as a waiter before
            # it looks at the drive, which is free by now, so it does not sleep.
            return
        with self._lock:
            # One with nothing to read: it will take the drive (one with
            # outcomes returns to its scheduler first).
            waiter = next((w for w in self._waiters if not w._outbox and not w._woken), None)
        if waiter is not None:
            with waiter._cond:
                waiter._cond.notify()

    def _run_driver(self, lease: RunLease, deadline: float | None, in_main: bool) -> None:
        """Drive the pool (drive held) until ``lease`` has outcomes, or ``deadline``."""
        procs = self.procs
        while True:
            if self._stopped:
                # Closed while this run was open: its calls will never answer.
                if lease._abandoned is None:
                    lease._abandon(POOL_CLOSED)
                return
            self._feed()
            if lease._outbox or lease._woken or self._want or (in_main and SHIELD.pending):
                return
            with self._lock:
                if self._refused is None and any(
                    other._queue and other._queue[0] is not other._gate for other in self._leases
                ):
                    continue  # queued while we fed: feed again first
                self._polling = True
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if in_main:
                # A signal deferred meanwhile (SHIELD) is acted on at the next slice.
                timeout = SIGNAL_SLICE if timeout is None else min(timeout, SIGNAL_SLICE)
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
        lock = self._lock
        if self._n_held:
            with lock:
                self._promote()
        owner = self._owner
        refused = self._refused
        if refused is not None:
            lease = owner[id(refused)][1]
            if refused is lease._gate:
                return  # its scheduler is still linking its chain (see the docstring)
            self._refused = None
            if not self._send(refused, lease):
                self._refused = refused
                return
            lease._sent()
        while True:
            with lock:  # the next run with queued work, after the one served last
                leases = self._leases
                n = len(leases)
                call = None
                for k in range(n):
                    lease = leases[(self._turn + k) % n]
                    queue = lease._queue
                    if queue and queue[0] is not lease._gate:
                        # (left in the queue until sent: never lost in between)
                        call = queue[0]
                        self._turn = (self._turn + k + 1) % n
                        break
                if call is None:
                    return
            owner[id(call)] = (call, lease)
            # (outside the lock: submit pickles the call's arguments, and the
            # runs' threads queue more meanwhile)
            sent = None
            try:
                sent = self._send(call, lease)
            finally:
                # Sent, or refused (then offered again first): out of the queue.
                # An exception (a bug) before a worker had it: it stays in front.
                if sent is not None or call.worker is not None or call.finished:
                    with lock:
                        if queue and queue[0] is call:
                            queue.popleft()
            if not sent:
                self._refused = call
                return
            lease._sent()

    def _send(self, call: Call, lease: RunLease) -> bool:
        """Offer ``call`` to the pool with its chain, if it has one (drive held)."""
        chain = lease._chains.get(id(call)) if lease._chains else None
        if chain is None:
            return self.procs.submit(call)
        call.then = chain
        try:
            sent = self.procs.submit(call)
            if sent:
                for nxt in call.then or ():  # (cut to the calls the pool sent)
                    self._owner[id(nxt)] = (nxt, lease)
                lease._chains.pop(id(call), None)
        finally:
            # Back to the links its scheduler made when the call was queued.
            call.then = [chain[0]]
        return sent

    def _route(self, outcomes: list[Outcome]) -> None:
        if self._counted:
            self._uncount([o[0] for o in outcomes])
        owner = self._owner
        routed: dict[RunLease, list[Outcome]] = {}
        for outcome in outcomes:
            call = outcome[0]
            found = owner.pop(id(call), None)
            if found is None or found[0] is not call:
                _drop(outcome)  # a call whose run was cancelled or closed
                continue
            lease = found[1]
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
        """Stop this run's calls only (drive held): queued and held ones never start,
        running ones are killed; other runs' calls queued on those workers come back."""
        with self._lock:
            queued = self._empty(lease)
        self._withdraw(lease)
        killed = self.procs.cancel_where(lambda call: self._mine(call, lease))
        for call in killed:
            self._owner.pop(id(call), None)
        self._uncount([*queued, *killed])
        return killed

    def _empty(self, lease: RunLease) -> list[Call]:
        """(lock held) Take back a run's queued, held and chained calls: none will
        start; return the queued ones, whose slots the caller frees."""
        queued = list(lease._queue)
        lease._queue.clear()
        self._drop_held(lease)
        lease._chains.clear()
        lease._gate = None
        return queued

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
            queued = self._empty(lease)
            while lease in self._waiters:  # (left by an exception in its poll)
                self._waiters.remove(lease)
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


def _drop(outcome: Outcome) -> None:
    """An outcome no run will read: its value's shared memory goes now (a sweep skips
    the segments a value alive in this process names, so they would stay)."""
    if outcome[1] == OK:
        discard(outcome[2])


class RunLease:
    """One run's executor on a :class:`SharedPool` (the engine's view of it)."""

    def __init__(self, shared: SharedPool, memory_limit: int | None) -> None:
        self.shared = shared
        self.memory_limit = memory_limit
        # Off with memory_limit=, as on a private pool (process.Lease).
        self.capabilities = Capabilities(
            kills_calls=True,
            memory_limit=True,
            chains=memory_limit is None,
            isolates=True,
            slots=shared.procs.workers,
        )
        self._depth = QUEUE_DEPTH * shared.procs.workers
        self._queue: deque[Call] = deque()  # under shared._lock
        self._held: list[Call] = []  # waiting for a slot of a shared limit; under shared._lock
        # Chains of calls not sent straight away: id(head) -> the chain's calls, and
        # the last one queued, whose links its scheduler may still be making.
        self._chains: dict[int, list[Call]] = {}
        self._gate: Call | None = None
        self._starved = False  # submit said no: wake the run when its queue has room
        self._cond = threading.Condition(threading.Lock())
        self._outbox: list[Outcome] = []  # under _cond
        self._woken = False
        self._abandoned: str | None = None
        self._closed = False

    def open(self, run: Any) -> None:
        self.shared.procs.new_run()

    def _ungate(self) -> None:
        """The run's thread is back: the chain it queued last is linked, may be sent."""
        shared = self.shared
        with shared._lock:
            self._gate = None
            shared._wake()

    def submit(self, call: Call) -> bool:
        call.memory_limit = self.memory_limit
        if self._gate is not None:
            self._ungate()
        if self._abandoned is not None:
            call.then = None
            self._fail(call, self._abandoned)
            return True
        shared = self.shared
        chain = call.then
        if call.limits:
            with shared._lock:
                if shared._must_hold(call):
                    # Its slots are taken by other runs' calls (or wanted by calls
                    # that came first): it waits here, and the scheduler goes on
                    # with its other ready nodes. The driver queues it when a
                    # slot frees (_promote).
                    shared._hold(self, call)
                    if chain:
                        self._chains[id(call)] = chain
                        self._gate = call
                    return True
                shared._count(call)
        if not self._queue and shared._refused is None:
            with SHIELD:
                if shared._drive.acquire(blocking=False):
                    # Nobody drives: straight to the pool, unless another run has
                    # calls waiting (they go first, in turn).
                    try:
                        done = self._direct(call, chain)
                    finally:
                        shared._give_drive()
                    if done is not None:
                        return done
        with shared._lock:
            if len(self._queue) >= self._depth:
                self._starved = True
                full = True
            else:
                full = False
                self._queue.append(call)
                if chain:
                    self._chains[id(call)] = chain
                    self._gate = call
                shared._wake()
        if full:
            call.then = None
            shared._uncount([call])
            return False
        return True

    def _direct(self, call: Call, chain: list[Call] | None) -> bool | None:
        """``submit`` with the drive held and this run's queue empty; None: queue it."""
        shared = self.shared
        with shared._lock:
            leases = shared._leases
            alone = len(leases) == 1
            direct = (
                not shared._stopped
                and shared._refused is None  # (looked at before the drive was ours)
                # (alone: the one lease is this one, whose queue is empty)
                and (alone or not any(other._queue for other in leases))
            )
        if not direct:
            return None
        shared._owner[id(call)] = (call, self)
        if shared.procs.submit(call):
            # Its chain's calls are this run's from now (the pool cut it to what it
            # sent; the scheduler links them once this returns).
            for nxt in call.then or ():
                shared._owner[id(nxt)] = (nxt, self)
            return True
        del shared._owner[id(call)]
        if alone:
            # As on a private pool: the scheduler keeps it (and its chain) until
            # a slot frees; _route wakes this run then.
            shared._uncount([call])
            self._starved = True
            call.then = None
            return False
        # Offered again first, with its chain, when a slot frees.
        call.then = chain
        with shared._lock:
            if chain:
                self._chains[id(call)] = chain
                self._gate = call
        shared._owner[id(call)] = (call, self)
        shared._refused = call
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
        if self._gate is not None:
            self._ungate()
        while True:
            with cond:
                if self._outbox or self._woken:
                    return self._take()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
            # (not while another thread asks for the drive to cancel or close:
            # it would have to win the lock against this loop)
            may_drive = self._abandoned is None and not shared._want
            if may_drive:
                with SHIELD:
                    if shared._drive.acquire(blocking=False):
                        try:
                            shared._run_driver(self, deadline, in_main)
                        finally:
                            shared._give_drive()
                        continue
            wait = HANDOFF_CHECK if self._abandoned is None else SIGNAL_SLICE
            if in_main:
                wait = min(wait, SIGNAL_SLICE)
            if remaining is not None:
                wait = min(wait, remaining)
            with cond:
                try:
                    with shared._lock:
                        shared._waiters.append(self)
                    # (registered before looking: a driver that gives the drive up
                    # after this look notifies under this condition's lock, which
                    # only the wait releases; one that gave it up before is seen)
                    if not (self._outbox or self._woken) and (
                        not may_drive or shared._drive.locked()
                    ):
                        cond.wait(wait)
                finally:
                    with shared._lock:
                        if self in shared._waiters:
                            shared._waiters.remove(self)

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
        with SHIELD:
            shared._take_drive(None)
            try:
                killed = shared._cancel(self)
            finally:
                shared._give_drive()
        with self._cond:
            # Outcomes already routed for calls it killed: those are cancelled now.
            gone = {id(c) for c in killed}
            kept: list[Outcome] = []
            for outcome in self._outbox:
                if id(outcome[0]) not in gone:
                    kept.append(outcome)
                else:
                    _drop(outcome)
            self._outbox = kept
        return killed

    def close(self) -> None:
        if self._closed:
            return
        shared = self.shared
        with SHIELD:
            shared._take_drive(None)
            try:
                shared._close(self)
            finally:
                shared._give_drive()
        with self._cond:
            left, self._outbox = self._outbox, []
        for outcome in left:  # outcomes the run ended without reading
            _drop(outcome)
        self._closed = True

    def _fail(self, call: Call, why: str) -> None:
        call.started = call.finished = time.time()
        error = did_not_finish(call, why)
        with self._cond:
            self._outbox.append((call, ERROR, error))
            self._cond.notify()

    def _abandon(self, why: str) -> None:
        """The pool is gone (drive held): each call this run waits for fails, on its node."""
        self._abandoned = why
        shared = self.shared
        with shared._lock:
            queued = list(self._queue)
            self._queue.clear()
            held = shared._drop_held(self)
            self._chains.clear()
            self._gate = None
        pending = [c for c, lease in shared._owner.values() if lease is self]
        for call in dict.fromkeys([*queued, *held, *pending]):
            self._fail(call, why)
