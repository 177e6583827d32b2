"""The executor protocol: what the engine hands an executor and what comes back.

The scheduler drives every backend through :class:`Executor` and never asks
which class it has; what a backend can or cannot do is in its
:class:`Capabilities`::

    open(run)                     bind to the run being computed (kept values live as
                                  long as it does)
    submit(call) -> bool          False: no free slot now, try again after poll()
    poll(timeout) -> [outcome]    block until something finished or timeout (seconds)
    wakeup()                      make a blocked poll() return; the one thread-safe method
    release(node, handle)         the scheduler dropped node's value: free its copies
    cancel_running() -> [call]    stop everything in flight (fail_fast, Ctrl-C)
    close()                       the run is over; idempotent

An outcome is a tuple ``(call, kind, value)``; ``kind`` is one of the
constants below. For ``OK`` the value is a handle (the value itself, or a
``Payload`` from a worker); for ``ERROR`` it is the exception, already
carrying the remote traceback as ``__cause__``. ``REQUEUE`` gives back a call
that never started (it was queued behind a call whose worker died). ``FREED``
comes after an outcome given while its call still ran (``Call.holds_slots``: a
thread abandoned at its timeout): the call has ended, and the concurrency
slots it counted against are free.

Chains (executors with ``Capabilities.chains``): a call may carry ``then``,
the calls of a chain of sole consumers to run right behind it on the same
worker. Each value but the last stays in that worker (its outcome is ``OK``
with the value ``HELD``) and is handed to the next call in memory
(``runtime.handover``: the object itself where nothing else can see it, else a
copy), never through the parent or shared memory. The scheduler builds a
chain only where nothing could need such a value again (see
``_engine/chains.py``), so a value lost with its worker is never missed
by the run; a chained call that fails sends its held input back with the
error (:func:`take_back`), so that ``run.replay`` has it. On a dask cluster
(``cluster.py``) "that worker" is the cluster: the chain's calls go to dask
together, each with the Future of the one before, and dask moves the value
if it runs the next call elsewhere.

Deadlines: every executor that enforces ``timeout=`` keeps them in a
:class:`Deadlines` heap (lazy deletion, as trio does), so ``poll`` knows how
long it may block and which calls are overdue in O(log n).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from .._model.run import Run

from .._data.serialize import Payload

OK = 0
ERROR = 1
REQUEUE = 2
# A call whose outcome was given while it still ran (``Call.holds_slots``: a thread
# past its timeout, abandoned) has ended now: its concurrency slots are free.
FREED = 3

Outcome = tuple["Call", int, Any]

# A call shorter than this (measured by the worker) is dominated by dispatch:
# a worker may hold a few more of its function's calls (prefetch).
SHORT_CALL = 0.002
# The longest a blocked wait may delay Ctrl-C: a signal the kernel hands to
# another thread of this process does not interrupt a lock or pipe wait.
SIGNAL_SLICE = 0.25


class _Held:
    """The value of a chained call, kept by the worker that made it for the next call."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<value held by a worker for the next call of its chain>"

    def __reduce__(self) -> str:
        return "HELD"


HELD = _Held()


class Gone:
    """In a failed call's ``inputs``: a chained value its worker could not send back."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def take_back(call: Call, returned: tuple[tuple[int, bytes | None, str], ...]) -> None:
    """A worker failed ``call`` and sent back the chained inputs it held for it (see
    ``worker.py``): put them where the call's ``HELD`` markers are, so that the run
    keeps them like any other input of a failed node (``_engine/keep.py``)."""
    for up, blob, why in returned:
        call.inputs[up] = Payload(blob, ()) if blob is not None else Gone(why)


class Call:
    """One attempt at one node, as an executor sees it."""

    __slots__ = (
        "args",
        "cache",
        "context",
        "finished",
        "fn",
        "has_nodes",
        "holds_slots",
        "inputs",
        "isolate",
        "kwargs",
        "limits",
        "memory_limit",
        "name",
        "node",
        "number",
        "seq",
        "started",
        "then",
        "timeout",
        "wire",
        "worker",
    )

    def __init__(
        self,
        node: int,
        name: str,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        has_nodes: bool,
        inputs: dict[int, Any],
        timeout: float | None,
        number: int,
    ) -> None:
        self.node = node
        self.name = name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.has_nodes = has_nodes
        self.inputs = inputs  # node index -> handle of the value the task receives
        self.timeout = timeout
        self.number = number  # 1 for the first attempt
        self.started = 0.0
        self.finished = 0.0
        self.worker: Any = None
        # A prefetched call's number in its worker's stream of calls (process pool):
        # what asks for it back if the call ahead of it stalls (0: not prefetched).
        self.seq = 0
        self.wire: bytes | None = None  # the executor's encoded form, made once
        self.context: int | None = None  # its cache context's id in ``wire`` (process pool)
        self.cache: tuple[str, str, dict] | None = None  # (cache dir, key, meta) to write
        self.then: list[Call] | None = None  # a chain to run behind this call (see above)
        self.isolate = False  # run in a fresh worker, discarded after (Capabilities.isolates)
        self.memory_limit: int | None = None  # a shared pool's run sets its own (shared.py)
        # (key, cap) of each concurrency limit the call counts against (tags, the
        # task's max_concurrency): a shared pool holds them across its runs.
        self.limits: list[tuple[Any, int]] | None = None
        # Set by an executor that gives the call's outcome while the call still runs
        # (a thread cannot be killed at its timeout): its slots stay taken until a
        # FREED outcome for it says it ended.
        self.holds_slots = False

    def __repr__(self) -> str:
        return f"<Call {self.name} attempt {self.number}>"


class Capabilities(NamedTuple):
    """What a backend can do; the engine asks this, never for a concrete class.

    Attributes:
        kills_calls: a running call can be stopped (a timeout kills it, Ctrl-C
            stops it); otherwise an overdue call is abandoned and its result dropped.
        memory_limit: it measures and enforces ``memory_limit=`` per worker.
        chains: it runs ``Call.then`` chains, keeping values in a worker.
        remote_values: results stay where they were made; handles are references.
        in_caller_thread: calls run in the scheduler's own thread (``pdb`` works).
        isolates: it runs a call with ``Call.isolate`` in a fresh worker process
            that is discarded afterwards (the task option ``isolate=True``); the
            scheduler refuses such a node on an executor without it.
        in_process: calls run in this process (its threads): their garbage is
            this process's, so the scheduler leaves its garbage collector alone.
        slots: how many calls it runs at once at most (its workers or threads),
            or None if it cannot say (a cluster); more calls may be handed to it
            (queued on a busy worker), and a progress bar counts at most this
            many of them as running.
    """

    kills_calls: bool = False
    memory_limit: bool = False
    chains: bool = False
    remote_values: bool = False
    in_caller_thread: bool = False
    isolates: bool = False
    in_process: bool = False
    slots: int | None = None


class Executor(Protocol):
    """What the scheduler drives; see the module docstring for the contract."""

    capabilities: Capabilities

    def open(self, run: Run) -> None:
        """Bind to the run being computed, before the first submit."""

    def submit(self, call: Call) -> bool:
        """Start ``call``, or return False when no slot is free (retry after poll)."""

    def poll(self, timeout: float | None) -> list[Outcome]:
        """Outcomes of finished calls; blocks up to ``timeout`` seconds (None: until one)."""

    def wakeup(self) -> None:
        """Make a blocked :meth:`poll` return; safe from any thread."""

    def release(self, node: int, handle: Any) -> None:
        """The scheduler no longer holds ``node``'s value ``handle``."""

    def cancel_running(self) -> list[Call]:
        """Stop every call in flight; return them (none of them finished)."""

    def close(self) -> None:
        """The run is over: free what it held. Idempotent."""


class Deadlines:
    """When in-flight calls must end: a heap with lazy deletion.

    ``set(key, when)`` (re)arms a key, ``discard(key)`` disarms it; stale heap
    entries are skipped when they surface. ``when`` is on whichever clock the
    executor reads ``now`` from (one clock per tracker).
    """

    __slots__ = ("_due", "_heap", "_seq")

    def __init__(self) -> None:
        self._due: dict[Hashable, float] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()

    def set(self, key: Hashable, when: float) -> None:
        self._due[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))

    def discard(self, key: Hashable) -> None:
        self._due.pop(key, None)

    def clear(self) -> None:
        self._due.clear()
        self._heap.clear()

    def __bool__(self) -> bool:
        return bool(self._due)

    def next(self) -> float | None:
        """The earliest armed deadline, or None."""
        heap, due = self._heap, self._due
        while heap:
            when, _, key = heap[0]
            if due.get(key) == when:
                return when
            heapq.heappop(heap)
        return None

    def expired(self, now: float) -> list[Hashable]:
        """Disarm and return the keys whose deadline is at or before ``now``."""
        heap, due = self._heap, self._due
        out = []
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            if due.get(key) == when:
                del due[key]
                out.append(key)
        return out

    def wait(self, timeout: float | None, now: float) -> float | None:
        """``timeout`` shortened to reach the next deadline (seconds, >= 0)."""
        when = self.next()
        if when is None:
            return timeout
        until = max(0.0, when - now)
        return until if timeout is None else min(timeout, until)
