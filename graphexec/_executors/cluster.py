"""The dask.distributed executor: ``graph.compute(cluster=distributed.Client(...))``.

graphexec's scheduler (states, policies, retries, timeouts, caching, the
``Run``) does not change; this module only runs its calls on a dask cluster,
through the executor protocol of ``_call``::

    scheduler thread                        dask scheduler            dask workers
    ----------------                        --------------            ------------
    submit(call) -- client.submit(_run_remote, key=<unique per attempt>) ---> run it
                    upstream values passed as the dask Futures that hold them
    poll(timeout) <- done callbacks (a queue) <- "key-in-memory" / "task-erred"
                  <- events: "started on worker W" (topic graphexec-start),
                             "worker W was removed" (topic "all")

Data movement
    A result stays on the worker that computed it. The outcome handed to the
    scheduler is a :class:`Payload` whose pickle is a small reference
    (``_fetch(token)``); the dask Future it stands for is held in a registry
    of this process. A dependent is submitted with those Futures as
    arguments, so dask moves the data worker-to-worker (or not at all when
    it runs where its input is): values never pass through this process.
    ``run[node]`` unpickles the reference, which fetches the value with
    ``Future.result()`` once. Futures of values the scheduler releases
    (``keep="targets"``) are dropped during the run; those of kept nodes
    live as long as the ``Run`` does. Consequence: read results before
    closing the Client.

    Values that are in this process already (cache hits, exceptions given to
    ``allow_failure`` dependents, a State for ``return_state``) are pickled
    here and sent with the call. Pickles of 1 MiB and more (arguments, a
    function's closure) are scattered to a worker instead of riding in the
    task's message through the dask scheduler; a function's is scattered
    once per compute.

Chains
    A sole consumer goes to dask with the call whose value it takes
    (``Capabilities.chains``, the scheduler's ``build_chain``): it is submitted
    at once with that call's Future as its input, so dask runs it where the
    value is, as soon as it is there, as it does a plain dask graph, with no
    round trip through this process in between. The call before it ends
    ``OK`` with ``HELD`` (its value stays on the cluster, for the next call
    only); a chained call's outcome is never handed over before that one
    (``_in_chain_order``). A call that fails breaks its chain: the calls
    behind it are cancelled on the cluster, their outcomes are never handed
    over, and the scheduler treats their nodes as after any failed upstream
    (if dask already ran the next one, it found a failure as its input and
    returned without calling the task). A chained call that fails gets its
    input back as a handle of the value on the cluster, for ``run.replay``
    (``_take_back``). A call with a timeout sends no chain: its deadline is
    judged here, and dask could start the next call with its value before
    the cancel reached it. One race remains: a head whose worker dies fails
    its node here, but dask may run it again elsewhere before the cancel
    arrives; the calls behind it may then run on the cluster although their
    nodes end ``Skipped`` (their results are dropped).

Failures
    * The task raised: ``_run_remote`` catches it and returns a
      :class:`_Failure` (a value, so dask logs nothing and never retries it);
      its type is known without fetching it (``Future.type``), then it is
      fetched and unpacked as the local pool does: the task's own exception
      (or a ``RemoteError`` stand-in) with the worker's traceback as
      ``__cause__``.
    * The worker died: the task announces itself when it starts (an event
      with its worker's address); when the dask scheduler reports that
      worker removed unexpectedly, the node fails with ``WorkerCrashed`` at
      once and its future is cancelled (dask may already have started it
      again elsewhere: it retries tasks of dead workers up to
      ``distributed.scheduler.allowed-failures`` times). A crash too quick
      for its start event ends as dask's ``KilledWorker`` once dask gives
      up; that too becomes a ``WorkerCrashed`` that says what happened.
      Such a re-run kills its new worker too, often before the cancel
      reaches it; the tasks that worker had started may have finished
      without their report getting out. That death is put down to the
      crasher, never to them (dask runs them again): :class:`_CrashLedger`.
    * A task finished, but its worker died (killed by another task) before
      graphexec read the outcome: dask reports the future "lost" and
      computes it again. The node waits for that (its outcome is read once
      dask has it), and fails only if the recompute fails or dask forgot the
      task (its future is then cancelled); see ``_LOST``.
    * Arguments or a function that do not pickle fail their node here with
      ``SerializationError``; a result that does not pickle fails on the
      worker (it is test-pickled there, large buffers aside, since the value
      would otherwise only fail when dask moves it).

Timeouts
    A dask task runs in a worker thread and cannot be killed. The deadline
    starts when the task's start event arrives here, not when it was
    submitted (a task waiting in a worker's queue does not time out); at
    the deadline the node fails with ``TaskTimeout``, its future is
    cancelled and a late result is dropped, and ``retries=`` apply. The
    task itself may go on running on its worker, holding that thread, until
    it returns. The event is sent by the worker's event loop; a call with a
    timeout waits (a few ms) until the loop has sent it, so that a task
    holding the GIL in C code cannot hold back its own deadline. The
    event's time stamp is not used for deadlines: the worker's clock may
    differ from this machine's.

Capacity and order
    Every ready call goes to dask at once, up to 32 per worker thread of the
    cluster (``client.nthreads()``, re-read while the scheduler waits for a
    slot). dask's scheduler holds root calls until a worker thread is free
    and sends a dependent to the worker holding its input; each task carries
    graphexec's priority (``priority=``, then graphexec's depth-first order)
    as its dask priority, so a worker runs a dependent whose input it just
    made before the independent calls queued on it, as plain dask does.
    docs/cluster.md measures why: with two calls per thread, and dependents
    queued behind calls submitted earlier, W4 was 1.3-1.4 x plain dask.

Caching
    The worker writes a cache entry itself (``write_cache``); the cache
    directory must therefore be one path that the workers and this process
    share. A missing entry after a successful write is reported once.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import pickle
import queue
import threading
import time
import traceback
import uuid
import weakref
from typing import Any, cast

import cloudpickle

from .._data.cache import CacheStore
from .._data.serialize import (
    PROTOCOL,
    Payload,
    arguments_error,
    dumps,
    dumps_call,
    dumps_function,
    function_error,
    loads_call,
)
from .._model.errors import (
    GraphexecError,
    RemoteTraceback,
    ResultReleased,
    SerializationError,
    WorkerCrashed,
    safe_str,
)
from .._model.handle import materialize
from .._model.keys import task_input_hash
from .._model.state import State
from .._model.walk import PLAIN
from .protocol import (
    ERROR,
    HELD,
    OK,
    Call,
    Capabilities,
    Deadlines,
    Outcome,
)
from .runtime import (
    Unloadable,
    UnloadableValue,
    arguments_unpickle_error,
    describe_exception,
    handover,
    invoke,
    load_exception,
    load_function,
    pickle_exception,
    result_error,
    timeout_error,
    unloadable_error,
    write_cache,
)

logger = logging.getLogger("graphexec")

START_TOPIC = "graphexec-start"  # events of _run_remote: started on a worker, result digest
# Calls in flight per worker thread of the cluster. Every ready call may as well be
# at dask: its scheduler keeps root calls queued until a worker thread is free
# (distributed.scheduler.worker-saturation) and sends a dependent to where its
# input is; a worker runs the calls queued on it in graphexec's order (see _ranks).
# A short window (two per thread) made workers idle: a dependent waited here for a
# slot while its input's worker ran out of work. The cap only bounds what one
# compute hands dask at once (a million-node graph).
CALLS_PER_THREAD = 32
NTHREADS_REFRESH = 2.0  # seconds between looks at the cluster's size while it is full
# dask Future statuses of a call dask computes again: "lost" (the worker holding its
# result died; dask recomputes it while it knows the key, then reports it finished,
# erred, or cancelled if it forgot it) or "pending" (retried). No done callback
# fires for that (dask fires one per future): ``poll`` looks at such futures again
# every LOST_POLL seconds. Rare: it takes a worker dying with a result not yet read.
_LOST = ("lost", "pending")
LOST_POLL = 0.05
SCATTER_BYTES = 1 << 20  # pickles this large (functions, arguments) are scattered, not
#                         sent through the dask scheduler inside the task's message


# -- values held on the cluster -------------------------------------------------------


class _Held:
    __slots__ = ("count", "future", "name")

    def __init__(self, future: Any, name: str) -> None:
        self.future = future
        self.name = name
        self.count = 1


# reference pickle -> the Future of the value; shared by every run of this process
_held: dict[bytes, _Held] = {}
_held_lock = threading.Lock()


class _Ref:
    """What a cluster value's :class:`Payload` pickles: unpickling it fetches the value."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token

    def __reduce__(self) -> Any:
        return (_fetch, (self.token,))


def _ref_bytes(token: str) -> bytes:
    return pickle.dumps(_Ref(token), protocol=PROTOCOL)


def _fetch(token: str) -> Any:
    """Bring a value computed on the cluster here (``run[node]``)."""
    entry = _held.get(_ref_bytes(token))
    if entry is None:
        raise ResultReleased(
            "this value was computed on a dask cluster and is no longer held there: it was "
            "released once no pending node needed it, or the Run was copied to another "
            "process. Keep the node (make it a target, or compute(keep='all')) and read it "
            "with run[node] in the process that called compute()"
        )
    try:
        return entry.future.result()
    except Exception as exc:
        # Gone with its Client: ResultReleased, as it is. Anything else (the value
        # will not unpickle here) the caller reports as such (SerializationError).
        client = getattr(entry.future, "client", None)
        if getattr(client, "status", "running") in ("closing", "closed"):
            raise ResultReleased(
                f"the value of {entry.name} stayed on the dask cluster and could not be "
                f"fetched ({type(exc).__name__}: {exc}). Read results with run[node] before "
                "closing the Client; a value on a worker that died is recomputed by dask "
                "only while the cluster runs"
            ) from exc
        # (the caller says what to check: SerializationError, stage unpickle-result)
        raise GraphexecError(
            f"the value of {entry.name}, computed on the dask cluster, does not unpickle "
            f"here ({type(exc).__name__}: {safe_str(exc)})"
        ) from exc


def _hold(token: str, future: Any, name: str) -> bytes:
    data = _ref_bytes(token)
    with _held_lock:
        entry = _held.get(data)
        if entry is None:
            _held[data] = _Held(future, name)
        else:  # the same content (same digest) is held already: share it
            entry.count += 1
    return data


def _drop(refs: list[bytes]) -> None:
    with _held_lock:
        for data in refs:
            entry = _held.get(data)
            if entry is not None:
                entry.count -= 1
                if entry.count <= 0:
                    del _held[data]  # the Future goes: dask releases the value


def held_values() -> int:
    """How many cluster values this process holds (for tests and diagnostics)."""
    return len(_held)


# -- what runs on a dask worker ----------------------------------------------------------


class _Failure:
    """What ``_run_remote`` returns when the call failed: the exception, pickled, and when.

    ``summary`` is ``(type name, message)`` as the worker saw them, so that an
    exception this process cannot unpickle still says what it was.
    """

    __slots__ = ("exc_blob", "finished", "stage", "started", "summary", "tb")

    def __init__(
        self,
        stage: str,
        exc_blob: bytes,
        tb: str,
        started: float,
        finished: float,
        summary: tuple[str, str] | None = None,
    ) -> None:
        self.stage = stage
        self.exc_blob = exc_blob
        self.tb = tb
        self.started = started
        self.finished = finished
        self.summary = summary

    def __reduce__(self) -> Any:
        return (
            _Failure,
            (self.stage, self.exc_blob, self.tb, self.started, self.finished, self.summary),
        )


_FAILURE_NAME = f"{_Failure.__module__}.{_Failure.__qualname__}"

_functions: collections.OrderedDict[str, Any] = collections.OrderedDict()  # fn id -> function
_FUNCTIONS_KEPT = 256


def _function(fn_id: str, blob: bytes, origin: str | None) -> Any:
    fn = _functions.get(fn_id)
    if fn is None:
        fn = _functions[fn_id] = load_function(blob, origin)
        if len(_functions) > _FUNCTIONS_KEPT:
            _functions.popitem(last=False)
    return fn


def _run_remote(fn_blob: bytes, spec: tuple, remote: dict[int, Any]) -> Any:
    """Run one call on a dask worker; return its value, or a :class:`_Failure`.

    ``remote`` maps node index -> upstream value (dask put the values of the
    Futures in place); ``spec`` carries everything else, pickled here once.
    """
    (
        exec_id,
        key,
        name,
        fn_id,
        origin,
        args_blob,
        local_blob,
        cache,
        want_digest,
        timed,
        owned,
        hand_over,
    ) = spec
    started = time.time()
    worker = _this_worker()
    if worker is not None:
        _announce(worker, {"x": exec_id, "k": key, "t": started}, timed)

    def fail(stage: str, exc: BaseException, tb: str) -> _Failure:
        return _Failure(
            stage,
            pickle_exception(exc, tb, name),
            tb,
            started,
            time.time(),
            describe_exception(exc),
        )

    fn = _function(fn_id, fn_blob, origin)
    if type(fn) is Unloadable:
        return fail(
            "function",
            unloadable_error(
                name,
                fn,
                "on the dask worker",
                "Is its module importable there (same packages, same code on every worker)?",
            ),
            fn.tb,
        )
    for index, value in remote.items():
        if type(value) is _Failure:  # dask recomputed a lost upstream value, and it failed
            error = WorkerCrashed(
                f"an upstream value of {name} (node {index}) was lost with the dask worker "
                f"that held it; dask computed it again and this time it failed: {value.tb}",
                node=name,
            )
            return fail("unpickle-arguments", error, value.tb)
    # A value of its own, as from a process worker: dask hands every task on a
    # worker the object in its memory, which a task changing its input in place
    # would change for its siblings, its own retries and the Run. Not the input
    # of a chain's link (``owned``): its producer made it a value of its own
    # (``hand_over``), and nothing else will read it (``_engine/chains.py``).
    values: dict[int, Any] = {}
    for index, value in remote.items():
        if index == owned:
            values[index] = value
            continue
        try:
            values[index] = handover(value)[0]
        except UnloadableValue as exc:
            cause = exc.__cause__ or exc
            return fail(
                "unpickle-arguments",
                arguments_unpickle_error(name, cause, "on the dask worker", input_node=index),
                traceback.format_exc(),
            )
    try:
        if local_blob is not None:
            for index, (kind, value) in pickle.loads(local_blob).items():
                if kind == "state" and index in values:
                    value._value = values[index]  # a return_state State, its value from dask
                values[index] = value
        args, kwargs = loads_call(args_blob, values)
    except BaseException as exc:
        return fail(
            "unpickle-arguments",
            arguments_unpickle_error(name, exc, "on the dask worker"),
            traceback.format_exc(),
        )
    ok, result, tb = invoke(fn, args, kwargs)
    if not ok:
        return fail("call", result, tb)
    del args, kwargs, values
    if hand_over:  # the next link changes it at will: not an object the task keeps
        try:
            result = handover(result)[0]
        except BaseException as exc:  # (UnloadableValue: its consumer fails to load it)
            return fail("result", result_error(name, result, exc), traceback.format_exc())
    if want_digest or not _plainly_picklable(result):
        try:
            digest = _digest(result)
        except BaseException as exc:
            return fail("result", result_error(name, result, exc), traceback.format_exc())
        if want_digest and worker is not None:
            worker.log_event(START_TOPIC, {"x": exec_id, "k": key, "d": digest})
    if cache is not None:
        write_cache(cache, result, name)
    return result


def _held_index(call: Call) -> int | None:
    """The input of a chain's link that its predecessor's value stands for."""
    return next((index for index, handle in call.inputs.items() if handle is HELD), None)


def _announce(worker: Any, msg: dict, wait: bool) -> None:
    """Tell the client this call started on ``worker`` (its deadline starts then).

    The worker's event loop sends the event. A call with a timeout waits until
    the loop has taken it and had time to flush it (a few ms): a task that then
    holds the GIL in C code would otherwise delay the event, and the deadline,
    until it is nearly done.
    """
    if not wait:
        worker.log_event(START_TOPIC, msg)
        return
    taken = threading.Event()

    def send() -> None:
        worker.log_event(START_TOPIC, msg)  # in the loop's thread: straight to its stream
        taken.set()

    worker.loop.add_callback(send)
    if taken.wait(0.2):
        stream = getattr(worker, "batched_stream", None)
        time.sleep(min(getattr(stream, "interval", 0.002), 0.05) + 0.001)


def _this_worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def _plainly_picklable(value: Any) -> bool:
    kind = type(value)
    if kind in PLAIN:
        return True
    if kind.__name__ == "ndarray" and kind.__module__ == "numpy":
        return not value.dtype.hasobject
    return False


def _digest(value: Any) -> str:
    """A content hash of a value, from its pickle (large buffers hashed in place)."""
    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=buffers.append)
    h = hashlib.sha256(b"cluster-value")
    h.update(data)
    for buffer in buffers:
        try:
            h.update(buffer.raw())
        except BufferError:  # not contiguous
            h.update(memoryview(buffer).tobytes())
    return h.hexdigest()


# -- events from the cluster ---------------------------------------------------------------

# Seconds after a crasher's cancel returned during which a worker death that no
# other evidence explains is put down to it: a re-run dask started before the
# cancel reached its worker, and that died before its start event got out, dies
# within milliseconds of the cancel (48 to 200 ms apart in the runs that showed it).
CRASHER_GRACE = 2.0
CRASHERS_KEPT = 1024


class _Departure:
    """One worker-removed event, shared by every executor it is given to.

    ``culprit`` is the known crasher (or suspect) the death was put down to;
    once set it stays, so that the executors judging the same death agree and a crasher's
    one possible unseen death (see :class:`_CrashLedger`) is used up once.
    """

    __slots__ = ("culprit", "guessed", "processing", "when", "worker")

    def __init__(self, worker: str | None, processing: set, when: float) -> None:
        self.worker = worker
        self.processing = processing  # the keys dask had assigned to the worker
        self.when = when  # time.monotonic() when the event reached this process
        self.culprit: str | None = None
        self.guessed = False  # no evidence ties a culprit to the worker (a loose one, if any)


class _CrashLedger:
    """Tasks failed because their dask worker died, for every executor of this process.

    dask re-runs a dead worker's tasks on other workers at once; graphexec
    cancels a crasher's future when it fails the node, but a re-run may start
    before the cancel reaches its new worker and kill that worker too, even
    after the compute ended. A later death is the crasher's when

    * the worker-removed event lists the crasher among the worker's tasks
      (the dask scheduler had not processed the cancel yet), or
    * the crasher's start event came from that worker (``hosts``), or
    * neither, because the scheduler processed the cancel (and dropped the
      key from the worker's tasks) while the worker had already started the
      re-run, which killed it before its start event got out. Then nothing
      says where it ran: until ``CRASHER_GRACE`` after its cancel returned,
      a crasher not seen since is ``loose``, and the first death in that time
      is put down to it, once. Blaming instead the task that started there
      last would fail a healthy node whose result was lost with the worker;
      dask runs that task again. If that guess was wrong, the
      real crasher kills another worker and is blamed then (or ends as dask's
      ``KilledWorker``): a fault is still put on one node, one death late.

    A task that kills its worker within milliseconds of starting is never
    seen to start, so it is never blamed here (dask's ``KilledWorker`` ends
    it). A death that no started task explains makes the tasks dask had
    given that worker without their start being seen there ``suspects``; a
    later death of a worker that dask lists one of them on (not seen to start
    since) is put down to it too, not to a task that started there.

    The executors call it from their scheduler threads, the hub from the
    Client's event loop: a lock guards it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.keys: collections.OrderedDict[str, None] = collections.OrderedDict()
        # crasher key -> time.monotonic() until which an unseen re-run may kill a
        # worker (infinite until its cancel returned)
        self.loose: dict[str, float] = {}
        # worker -> the crasher key whose re-run started there
        self.hosts: collections.OrderedDict[str, str] = collections.OrderedDict()
        # keys on a worker that died of no known cause, not seen starting since
        self.suspects: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, key: str) -> None:
        """``key``'s worker died under it: the node failed, its future is being cancelled."""
        with self._lock:
            self.keys[key] = None
            if len(self.keys) > CRASHERS_KEPT:
                gone, _ = self.keys.popitem(last=False)
                self.loose.pop(gone, None)
            self.loose[key] = float("inf")

    def cancelled(self, keys: list[str], now: float) -> None:
        """The cancel of these crashers returned (the scheduler has processed it)."""
        with self._lock:
            for key in keys:
                if self.loose.get(key) == float("inf"):
                    self.loose[key] = now + CRASHER_GRACE

    def started(self, key: str, worker: str | None) -> bool:
        """A start event for a key no executor runs: a crasher's re-run, if it is one."""
        with self._lock:
            if key not in self.keys or worker is None:
                return False
            self.loose.pop(key, None)  # it is on ``worker`` now, nowhere else
            self.hosts.pop(worker, None)
            self.hosts[worker] = key
            if len(self.hosts) > CRASHERS_KEPT:
                self.hosts.popitem(last=False)
            return True

    def suspect(self, keys: list[str]) -> None:
        """A worker died with ``keys`` on it, no start of theirs seen there, no cause known."""
        with self._lock:
            for key in keys:
                self.suspects[key] = None
            while len(self.suspects) > CRASHERS_KEPT:
                self.suspects.popitem(last=False)

    def seen(self, key: str) -> None:
        """``key`` started (its start event says where) or ended: no longer a suspect."""
        with self._lock:
            self.suspects.pop(key, None)

    def culprit(self, gone: _Departure) -> str | None:
        """The known crasher or suspect ``gone``'s worker died of, or None (see the class)."""
        with self._lock:
            if gone.culprit is not None:
                return gone.culprit
            key = self.hosts.pop(gone.worker, None) if gone.worker is not None else None
            if key is None:
                key = next((k for k in gone.processing if k in self.keys), None)
            if key is not None and key in gone.processing:
                # the cancel had not reached the scheduler: dask queues the crasher
                # again, and may start it once more before the cancel does
                self.loose[key] = max(self.loose.get(key, 0.0), gone.when + CRASHER_GRACE)
            if key is None:
                key = next((k for k in gone.processing if k in self.suspects), None)
            gone.guessed = key is None
            if key is None:
                for k, until in list(self.loose.items()):
                    if until < gone.when:
                        del self.loose[k]  # its cancel went through long ago
                    elif key is None:
                        key = k
                if key is not None:
                    del self.loose[key]  # a crasher dies once: this was its unseen death
            if key is not None:
                logger.info(
                    "the dask worker %s died; put down to %s (it killed a worker before, or "
                    "was on one that died, and dask ran it again): the other tasks that "
                    "worker started run again",
                    gone.worker,
                    key,
                )
            gone.culprit = key
            return key


_ledger = _CrashLedger()


class _Hub:
    """One per Client while executors use it: routes the cluster's events to them.

    A Client keeps one handler per topic, so executors cannot subscribe each
    on their own; the handlers run in the Client's event-loop thread and only
    put messages in the executors' queues. The subscriptions end with the
    last executor (a Client subscribed to "all" while it closes makes the
    scheduler log an error).
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.executors: dict[str, ClusterExecutor] = {}
        handlers = getattr(client, "_event_handlers", None)
        previous = handlers.get("all") if isinstance(handlers, dict) else None
        owner = getattr(previous, "__self__", None)
        if isinstance(owner, _Hub):  # an earlier hub's (unsubscribing leaves it in place)
            previous = owner._previous
        self._previous: Any = previous
        client.subscribe_topic(START_TOPIC, self._on_start)
        client.subscribe_topic("all", self._on_all)

    def close(self) -> None:
        try:
            self.client.unsubscribe_topic(START_TOPIC)
            if self._previous is not None:
                self.client.subscribe_topic("all", self._previous)
            else:
                self.client.unsubscribe_topic("all")
        except Exception:  # the client is closing or closed: subscriptions went with it
            pass

    def _on_start(self, event: Any) -> None:
        msg = event[1]
        executor = self.executors.get(msg.get("x"))
        if executor is None:  # its compute ended; a crasher's re-run still counts
            if "d" not in msg:
                _ledger.started(msg.get("k"), msg.get("worker"))
            return
        if "d" in msg:
            executor._inbox.put(("digest", msg["k"], msg["d"]))
        else:
            executor._inbox.put(("start", msg["k"], msg.get("worker"), msg.get("t")))

    def _on_all(self, event: Any) -> Any:
        msg = event[1]
        if (
            isinstance(msg, dict)
            and msg.get("action") == "remove-worker"
            and not msg.get("expected")
        ):
            gone = _Departure(
                msg.get("worker"), set(msg.get("processing-tasks") or ()), time.monotonic()
            )
            for executor in list(self.executors.values()):
                executor._inbox.put(("gone", gone))
        if self._previous is not None:  # someone else's handler for "all" keeps working
            return self._previous(event)
        return None


_hubs: dict[str, _Hub] = {}  # client id -> its hub, while an executor uses the client
_hubs_lock = threading.Lock()


def _join_hub(client: Any, executor: ClusterExecutor) -> None:
    with _hubs_lock:
        hub = _hubs.get(client.id)
        if hub is None:
            hub = _hubs[client.id] = _Hub(client)
        hub.executors[executor.id] = executor


def _leave_hub(client: Any, executor: ClusterExecutor) -> None:
    with _hubs_lock:
        hub = _hubs.get(client.id)
        if hub is None:
            return
        hub.executors.pop(executor.id, None)
        if not hub.executors:
            del _hubs[client.id]
            hub.close()


# -- the executor ------------------------------------------------------------------------------


class _Flight:
    __slots__ = (
        "call",
        "digest",
        "fn_id",
        "future",
        "inputs",
        "key",
        "lost",
        "started",
        "submitted",
        "worker",
    )

    def __init__(self, call: Call, future: Any, key: str, inputs: list[int], fn_id: str) -> None:
        self.call = call
        self.future = future
        self.key = key
        self.fn_id = fn_id
        self.inputs = inputs  # node indices whose values the call received
        self.submitted = time.time()
        self.started: float | None = None  # time.monotonic() of its start event
        self.worker: str | None = None
        self.digest: str | None = None
        self.lost = False  # dask lost its result with a worker: see _LOST


_executor_ids = itertools.count(1)


class ClusterExecutor:
    """Runs calls on a dask.distributed cluster through ``client``.

    The cluster's copy of a value is dropped when the scheduler releases it
    (:meth:`release`); the values still held when the run closes (kept nodes)
    stay on the cluster for as long as the :class:`Run` given to :meth:`open`
    lives.
    """

    # Dask runs a task in a worker thread: it cannot be killed, only abandoned.
    capabilities = Capabilities(remote_values=True, chains=True)

    def __init__(self, client: Any) -> None:
        self.client = client
        self.id = f"{uuid.uuid4().hex}-{next(_executor_ids)}"
        self._run: Any = None
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inflight: dict[str, _Flight] = {}  # dask key -> the call in flight
        self._lost: set[str] = set()  # keys in flight whose result dask computes again
        self._deadlines = Deadlines()  # dask key -> when its timeout runs out (from its start)
        self._outbox: list[tuple[Call, int, Any]] = []
        # Chains (see the module docstring): id(call) -> the flight of the call sent
        # behind it, until the call's outcome is handed over; id(call) -> outcomes of
        # the calls behind it that came first, handed over right after its own.
        self._behind: dict[int, _Flight] = {}
        self._early: dict[int, list[Outcome]] = {}
        # id(chained call) -> the Future, dask key and name of the call before it,
        # until its outcome is handed over (its input, should it fail: _take_back);
        # id(chained call) -> the call before it, until that one's outcome is.
        self._sources: dict[int, tuple[Any, str, str]] = {}
        self._before: dict[int, Call] = {}
        self._functions: dict[int, tuple[Any, str, Any]] = {}  # id(fn) -> (fn, fn id, blob)
        self._held: dict[int, tuple[bytes, Payload]] = {}  # node -> its value on the cluster
        self._digest_nodes: set[int] = set()
        self._ranks: dict[int, int] = {}  # node -> its dask priority (see _rank)
        self._stores: dict[str, Any] = {}
        self._warned_cache = False
        self._closed = False
        self._threads = 0
        self._sized = 0.0
        self._resize()
        _join_hub(client, self)

    # -- capacity -------------------------------------------------------------

    def _resize(self) -> None:
        self._sized = time.monotonic()
        try:
            threads = sum(self.client.nthreads().values())
        except Exception as exc:
            logger.warning("could not read the dask cluster's size (%s); assuming 1 thread", exc)
            threads = 1
        if threads == 0 and self._threads == 0:
            logger.warning(
                "the dask cluster at %s has no workers yet; tasks wait for workers",
                getattr(getattr(self.client, "scheduler", None), "address", "?"),
            )
        self._threads = max(threads, 1)

    def _full(self) -> bool:
        return len(self._inflight) >= CALLS_PER_THREAD * self._threads

    # -- executor protocol ----------------------------------------------------

    def submit(self, call: Call) -> bool:
        if self._full():
            if time.monotonic() - self._sized < NTHREADS_REFRESH:
                return False
            self._resize()
            if self._full():
                return False
        chain, call.then = call.then, None
        if call.timeout is not None:
            # Its deadline is judged here, and dask may have started the next call
            # with its value before the cancel reaches it: that call would run though
            # its node ends Skipped. The chain waits for the outcome instead.
            chain = None
        flight = self._send(call, None, bool(chain))
        if flight is None or not chain:
            return True
        # Its chain goes to dask now, each call with the Future of the one before
        # it: dask runs it where that value is, as soon as it is there, with no
        # round trip through this process (see "Chains").
        sent: list[Call] = []
        for k, nxt in enumerate(chain):
            behind = self._send(nxt, flight, k + 1 < len(chain))
            if behind is None:  # not sendable: the chain ends before it (the
                break  # scheduler sends it on its own later, and it fails then)
            self._behind[id(flight.call)] = behind
            self._before[id(nxt)] = flight.call
            sent.append(nxt)
            flight = behind
        call.then = sent or None  # (cut to the calls sent, as the protocol asks)
        return True

    def _send(self, call: Call, after: _Flight | None, feeds: bool = False) -> _Flight | None:
        """Submit ``call`` to dask; ``after``: the flight of the call before it in a
        chain, whose Future stands for its input HELD; ``feeds``: a chain's next call
        takes its value. None if it was not sent:
        its failure is handed over then, unless it is a chained call (the chain
        ends before it, and the scheduler sends it on its own later)."""
        key = f"{call.name}-{uuid.uuid4().hex}"
        try:
            fn_id, origin, blob = self._function(call)
            args_blob = self._arguments(call)
            remote, local_blob = self._inputs(call, after)
            spec = (
                self.id,
                key,
                call.name,
                fn_id,
                origin,
                self._large(args_blob),
                self._large(local_blob),
                call.cache,
                call.node in self._digest_nodes,
                call.timeout is not None,
                _held_index(call) if after is not None else None,
                feeds,
            )
            rank = self._ranks.get(call.node)
            if rank is None:  # a node a flow added after open()
                rank = _rank(self._run, call.node, 0)
            call.started = time.time()
            future = self.client.submit(
                _run_remote,
                blob,
                spec,
                remote,
                key=key,
                pure=False,
                priority=rank,
            )
        except SerializationError as exc:
            if after is None:
                call.started = call.finished = time.time()
                self._outbox.append((call, ERROR, exc))
            return None
        except Exception as exc:  # the cluster: a scatter or the submit itself failed
            if after is None:
                call.finished = max(time.time(), call.started)
                self._outbox.append(
                    (
                        call,
                        ERROR,
                        WorkerCrashed(
                            f"{call.name} could not be sent to the dask cluster: "
                            f"{type(exc).__name__}: {exc}",
                            node=call.name,
                        ),
                    )
                )
            return None
        flight = _Flight(call, future, key, list(call.inputs), fn_id)
        if after is not None:
            self._sources[id(call)] = (after.future, after.key, after.call.name)
        self._inflight[key] = flight
        inbox = self._inbox
        future.add_done_callback(lambda f, key=key: inbox.put(("done", key)))
        return flight

    def poll(self, timeout: float | None) -> list[tuple[Call, int, Any]]:
        if self._outbox:
            timeout = 0.0
        wait = self._deadlines.wait(timeout, time.monotonic())
        if self._lost:
            wait = LOST_POLL if wait is None else min(wait, LOST_POLL)
        items = []
        try:
            if wait is not None and wait <= 0:
                items.append(self._inbox.get_nowait())
            else:
                items.append(self._inbox.get(timeout=wait))
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        cancel: list[Any] = []
        crashed: list[str] = []
        for item in items:
            if item is None:  # wakeup()
                continue
            what = item[0]
            if what == "done":
                if _ledger.suspects:
                    _ledger.seen(item[1])
                done = self._inflight.get(item[1])
                self._deadlines.discard(item[1])
                if done is not None:
                    self._finish(done)
            elif what == "start":
                self._started(*item[1:])
            elif what == "digest":
                hashed = self._inflight.get(item[1])
                if hashed is not None:
                    hashed.digest = item[2]
            elif what == "gone":
                self._worker_gone(item[1], cancel, crashed)
        if self._lost:
            self._check_lost()
        self._check_deadlines(cancel)
        if cancel:
            self._cancel(cancel)
        if crashed:  # the scheduler has their cancel: see _CrashLedger
            _ledger.cancelled(crashed, time.monotonic())
        outcomes, self._outbox = self._outbox, []
        if self._sources:  # chained calls in flight
            outcomes = self._in_chain_order(outcomes)
        return outcomes

    def _in_chain_order(self, outcomes: list[Outcome]) -> list[Outcome]:
        """The outcomes, a chained call's never before that of the call it follows.

        The scheduler starts a chained call when the call before it ends ``OK`` with
        ``HELD``, and ignores what comes for a call it has not started. Events
        from dask may come in another order (a worker's death is reported before
        the result its last task sent), so an early outcome waits here for the
        one it follows. A call that failed breaks its chain: the calls behind it
        are cancelled on the cluster and never reported (the scheduler decides
        what becomes of their nodes, as for any failed upstream).
        """
        out: list[Outcome] = []
        waiting = self._before  # (kept up to date as calls come and go: no rebuild)
        broken: set[int] = set()  # calls cancelled behind a failure: never handed over
        pending = collections.deque(outcomes)
        while pending:
            outcome = pending.popleft()
            call = outcome[0]
            if id(call) in broken:
                continue
            before = waiting.get(id(call))
            if before is not None:
                self._early.setdefault(id(before), []).append(outcome)
                continue
            source = self._sources.pop(id(call), None)
            if source is not None and outcome[1] == ERROR:
                self._take_back(call, source)
            out.append(outcome)
            behind = self._behind.pop(id(call), None)
            if behind is None:
                continue
            waiting.pop(id(behind.call), None)
            early = self._early.pop(id(call), [])
            if outcome[1] == OK and outcome[2] is HELD:
                pending.extendleft(reversed(early))  # the next call has started: its
                # outcome may follow
            else:
                broken |= self._break_chain(behind)
        return out

    def _break_chain(self, first: _Flight | None) -> set[int]:
        """The call before ``first`` failed: cancel ``first`` and the calls behind it;
        their ids (an outcome of theirs already here is dropped)."""
        futures, ids = [], set()
        while first is not None:
            self._inflight.pop(first.key, None)
            self._deadlines.discard(first.key)
            self._lost.discard(first.key)
            self._early.pop(id(first.call), None)
            self._sources.pop(id(first.call), None)
            self._before.pop(id(first.call), None)
            futures.append(first.future)
            ids.add(id(first.call))
            first = self._behind.pop(id(first.call), None)
        self._cancel(futures)
        return ids

    def wakeup(self) -> None:
        """Make a blocked :meth:`poll` return (called from another thread)."""
        self._inbox.put(None)

    def cancel_running(self) -> list[Call]:
        flights = list(self._inflight.values())
        self._inflight.clear()
        self._behind.clear()
        self._early.clear()
        self._sources.clear()
        self._before.clear()
        self._lost.clear()
        self._deadlines.clear()
        if flights:
            self._cancel([f.future for f in flights])
        for flight in flights:
            if flight.started is None:  # never seen starting: no attempt (call.started
                flight.call.started = 0.0  # was its submit time)
        return [f.call for f in flights]

    def _drain(self) -> None:
        """Events left in the inbox at close: only a crasher's re-run or death still matters."""
        try:
            while True:
                item = self._inbox.get_nowait()
                if item is None:
                    continue
                if item[0] == "start":
                    _ledger.started(item[1], item[2])
                elif item[0] == "gone":
                    _ledger.culprit(item[1])
        except queue.Empty:
            pass

    def open(self, run: Any) -> None:
        """Bind to ``run``: its lifetime bounds that of the values it keeps here."""
        self._run = run
        self._digest_nodes = _nodes_needing_digests(run)
        self._ranks = _ranks(run)

    def release(self, node: int, handle: Any) -> None:
        """The scheduler dropped ``node``'s value: drop the cluster's copy too."""
        entry = self._held.get(node)
        # (HELD: the value stayed on the cluster for a chained call that failed, and
        # was held here for it since: _take_back)
        if entry is not None and (entry[1] is handle or handle is HELD):
            del self._held[node]
            _drop([entry[0]])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._inflight:
            self.cancel_running()
        _leave_hub(self.client, self)
        self._drain()
        self._outbox = []
        self._functions.clear()
        refs = [data for data, _ in self._held.values()]
        self._held.clear()
        if refs:
            # Kept nodes' values stay on the cluster while the Run can be read
            # (a flow's Run: until the flow's caller lets go of it).
            if self._run is not None:
                finalizer = weakref.finalize(self._run, _drop, refs)
                finalizer.atexit = False
            else:
                _drop(refs)

    # -- submitting -----------------------------------------------------------

    def _function(self, call: Call) -> tuple[str, str | None, Any]:
        entry = self._functions.get(id(call.fn))
        if entry is None:
            fn_id = f"{self.id}-{len(self._functions)}"
            blob: Any = dumps_function(call.fn)
            if isinstance(blob, bytes) and len(blob) >= SCATTER_BYTES:
                blob = self.client.scatter(blob, hash=False)  # a big closure: once, not per call
            entry = self._functions[id(call.fn)] = (call.fn, fn_id, blob)
        _, fn_id, blob = entry
        if isinstance(blob, BaseException):
            raise function_error(call.name, blob)
        origin = getattr(getattr(call.fn, "__code__", None), "co_filename", None)
        return fn_id, origin, blob

    def _large(self, blob: bytes | None) -> Any:
        """A large pickle goes to a worker directly (scatter), not inside the task's
        message through the dask scheduler; the task receives the bytes either way."""
        if blob is None or len(blob) < SCATTER_BYTES:
            return blob
        return self.client.scatter(blob, hash=False)

    def _arguments(self, call: Call) -> bytes:
        try:
            return dumps_call(call.args, call.kwargs, call.has_nodes)
        except Exception as exc:
            raise arguments_error(call, exc, "the dask cluster") from None

    def _inputs(self, call: Call, after: _Flight | None) -> tuple[dict[int, Any], bytes | None]:
        """Upstream values: Futures of values on the cluster, and the rest pickled here;
        ``after``: the flight whose value stands for the input ``HELD`` (a chain)."""
        remote: dict[int, Any] = {}
        local: dict[int, tuple[str, Any]] = {}
        for index, handle in call.inputs.items():
            if handle is HELD:
                if after is None:  # (the scheduler holds an input only behind a call)
                    raise SerializationError(
                        f"an input of {call.name} was kept for a chain that is not there",
                        node=call.name,
                        stage="arguments",
                        retryable=False,
                    )
                remote[index] = after.future
                continue
            if isinstance(handle, State):
                future = self._future_of(handle._value)
                if future is not None:
                    template = State(
                        handle.name,
                        handle.node,
                        None,
                        handle.exception,
                        handle.history,
                        handle.upstream,
                        handle.message,
                    )
                    local[index] = ("state", template)
                    remote[index] = future
                else:
                    local[index] = ("value", _local_state(handle))
                continue
            future = self._future_of(handle)
            if future is not None:
                remote[index] = future
            else:
                local[index] = ("value", _local(handle))
        if not local:
            return remote, None
        try:
            return remote, dumps(local)
        except Exception as exc:
            names = self._run.graph._names if self._run is not None else None
            which = ", ".join(names[i] if names else str(i) for i in local)
            raise SerializationError(
                f"an upstream value given to {call.name} (from {which}) cannot be pickled to "
                f"send it to the dask cluster: {type(exc).__name__}: {exc}",
                node=call.name,
                stage="arguments",
                retryable=False,
            ) from None

    @staticmethod
    def _future_of(handle: Any) -> Any:
        if type(handle) is Payload and not handle.segments and len(handle.data) < 512:
            entry = _held.get(handle.data)
            if entry is not None:
                return entry.future
        return None

    # -- outcomes -------------------------------------------------------------

    def _finish(self, flight: _Flight) -> None:
        """``flight``'s future is done, or was lost with its worker (then dask computes
        it again: it stays in flight, with no deadline until its re-run starts)."""
        if flight.future.status in _LOST:
            flight.lost = True
            self._lost.add(flight.key)
            return
        del self._inflight[flight.key]
        self._outbox.append(self._outcome(flight))

    def _check_lost(self) -> None:
        """Lost futures that dask computed again (or gave up on) end now."""
        for key in list(self._lost):
            flight = self._inflight.get(key)
            if flight is None:  # failed meanwhile: its re-run's worker died, or timed out
                self._lost.discard(key)
            elif flight.future.status not in _LOST:
                self._lost.discard(key)
                self._deadlines.discard(key)
                if _ledger.suspects:
                    _ledger.seen(key)
                self._finish(flight)

    def _outcome(self, flight: _Flight) -> tuple[Call, int, Any]:
        call, future = flight.call, flight.future
        now = time.time()
        call.finished = max(now, call.started)
        status = future.status
        if status == "finished":
            if _is_failure(future.type):
                return self._failed(flight)
            if id(call) in self._behind:
                # Its value stays on the cluster for the call behind it, which has it
                # as an input already: nothing of it is held here.
                return call, OK, HELD
            token = f"d:{flight.digest}" if flight.digest else f"k:{flight.key}"
            handle = self._keep(call.node, token, future, call.name)
            if call.cache is not None:
                self._check_cache_entry(call)
            return call, OK, handle
        if status == "error":
            return call, ERROR, self._dask_error(flight)
        if flight.lost:
            return (
                call,
                ERROR,
                WorkerCrashed(
                    f"the dask worker holding the result of {call.name} died before graphexec "
                    f"read it, and dask did not compute it again (its future is {status}): the "
                    "dask scheduler forgot the task (an input it needs was lost too, or the "
                    "task was cancelled). Only this node failed",
                    node=call.name,
                ),
            )
        return (
            call,
            ERROR,
            WorkerCrashed(
                f"the dask scheduler dropped {call.name} (its future is {status}): the cluster "
                "was restarted, this client lost its connection to the scheduler, or another "
                "client cancelled the task. Only this node failed",
                node=call.name,
            ),
        )

    def _failed(self, flight: _Flight) -> tuple[Call, int, Any]:
        call = flight.call
        try:
            failure = flight.future.result()
        except Exception as exc:
            return (
                call,
                ERROR,
                WorkerCrashed(
                    f"{call.name} failed on the dask cluster, and its error could not be "
                    f"fetched ({type(exc).__name__}: {exc}): its worker probably died since",
                    node=call.name,
                ),
            )
        call.started = failure.started
        call.finished = max(failure.finished, failure.started)
        return call, ERROR, load_exception(failure.exc_blob, failure.tb, call.name, failure.summary)

    def _take_back(self, call: Call, source: tuple[Any, str, str]) -> None:
        """A chained call failed: its input ``HELD`` becomes a handle of the value on the
        cluster, held here as any other (as ``protocol.take_back`` does for the local
        pool), so that the run keeps it for ``run.replay``."""
        future, key, name = source
        for index, handle in call.inputs.items():
            if handle is HELD:
                call.inputs[index] = self._keep(index, f"k:{key}", future, name)

    def _keep(self, node: int, token: str, future: Any, name: str) -> Payload:
        """Hold ``future`` here as ``node``'s value on the cluster (one held per node:
        an earlier one is let go of); its handle, whose pickle is a reference."""
        data = _hold(token, future, name)
        handle = Payload(data)
        old = self._held.pop(node, None)
        if old is not None:
            _drop([old[0]])
        self._held[node] = (data, handle)
        return handle

    def _dask_error(self, flight: _Flight) -> BaseException:
        """A task that dask itself failed (not the task's code: that returns a _Failure)."""
        from distributed import KilledWorker
        from distributed.comm import CommClosedError

        call, future = flight.call, flight.future
        exc = future.exception()
        if isinstance(exc, KilledWorker):
            last = getattr(exc.last_worker, "address", exc.last_worker)
            return WorkerCrashed(
                f"the dask workers running {call.name} died: dask ran it on "
                f"{exc.allowed_failures + 1} workers and each died while running it, the last "
                f"{last} (dask's KilledWorker; its limit is the scheduler's "
                "distributed.scheduler.allowed-failures). The task probably kills its "
                "process (segfault, os._exit, memory). Only this node failed; see the "
                "workers' logs",
                node=call.name,
            )
        if isinstance(exc, (CommClosedError, OSError)):
            return WorkerCrashed(
                f"{call.name} was lost on the dask cluster: {type(exc).__name__}: {exc} "
                "(a worker or the scheduler went away). Only this node failed",
                node=call.name,
            )
        tb = future.traceback()
        text = "".join(traceback.format_tb(tb)) if tb is not None else ""
        exc.__cause__ = RemoteTraceback(
            f"Traceback (on the dask cluster, raised by dask running {call.name}):\n{text}"
            f"{type(exc).__name__}: {exc}\n"
        )
        return exc

    def _started(self, key: str, worker: str | None, when: float | None) -> None:
        flight = self._inflight.get(key)
        if flight is None:  # done, timed out, or a crasher dask re-ran before our cancel
            _ledger.started(key, worker)
            return
        if _ledger.suspects:
            _ledger.seen(key)
        flight.started = time.monotonic()  # a re-run elsewhere restarts the clock
        if flight.call.timeout is not None:
            self._deadlines.set(key, flight.started + flight.call.timeout)
        flight.worker = worker
        call = flight.call
        call.worker = worker
        if when is not None:
            call.started = min(max(when, flight.submitted), time.time())

    def _worker_gone(self, gone: _Departure, cancel: list, crashed: list[str]) -> None:
        worker, processing = gone.worker, gone.processing
        culprit = _ledger.culprit(gone)
        if culprit is not None:
            # dask re-ran a task that had already killed a worker (of this compute or
            # an earlier one) here, before the cancel reached it: it killed this one
            # too. A task that started on this worker just before it died may have
            # finished without its report getting out; blaming it would fail a
            # healthy node. dask runs it again.
            if gone.guessed:  # a loose crasher, but nothing ties it to this worker
                self._suspect(gone, started_there=True)
            return
        blamed = False
        for key, flight in list(self._inflight.items()):
            if flight.worker != worker or worker is None or key not in processing:
                continue
            blamed = True
            del self._inflight[key]
            self._deadlines.discard(key)
            _ledger.add(key)
            crashed.append(key)
            cancel.append(flight.future)  # dask may have started it again elsewhere
            call = flight.call
            call.finished = max(time.time(), call.started)
            self._outbox.append(
                (
                    call,
                    ERROR,
                    WorkerCrashed(
                        f"the dask worker {worker} running {call.name} died "
                        f"(attempt {call.number}): its process was killed or exited (segfault, "
                        "os._exit, the out-of-memory killer, or its nanny restarting it over its "
                        "memory limit). Only this node "
                        "failed; the worker's log on the cluster says more",
                        node=call.name,
                    ),
                )
            )
        if not blamed:
            self._suspect(gone, started_there=False)

    def _suspect(self, gone: _Departure, started_there: bool) -> None:
        """No started task explains ``gone``: its tasks not seen starting there become
        suspects (one may have killed it before its start event got out), and those
        that did too when the death was only put down to a loose crasher (a guess:
        one of them may be a new crasher, blamed by nobody if it killed a worker
        again)."""
        inflight = self._inflight
        keys = [
            key
            for key in gone.processing
            if key in inflight and (started_there or inflight[key].worker != gone.worker)
        ]
        if keys:
            _ledger.suspect(keys)

    def _check_deadlines(self, cancel: list) -> None:
        for key in self._deadlines.expired(time.monotonic()):
            flight = self._inflight.pop(cast(str, key), None)
            if flight is not None:
                call = flight.call
                cancel.append(flight.future)
                call.finished = max(time.time(), call.started)
                self._outbox.append(
                    (
                        call,
                        ERROR,
                        timeout_error(
                            call,
                            "a dask task cannot be stopped: its future was cancelled and its "
                            "result will be dropped, but it may run on in its worker "
                            f"({flight.worker}) until it returns",
                        ),
                    )
                )

    def _cancel(self, futures: list[Any]) -> None:
        try:
            self.client.cancel(futures)
        except Exception as exc:  # the cluster is gone: nothing left to stop
            logger.warning("could not cancel %d dask task(s): %s", len(futures), exc)

    def _check_cache_entry(self, call: Call) -> None:
        if self._warned_cache or call.cache is None:
            return
        root, key, _ = call.cache
        store = self._stores.get(root)
        if store is None:
            store = self._stores[root] = CacheStore(root)
        if not store.has(key):
            self._warned_cache = True
            logger.warning(
                "%s: the dask worker ran it but its cache entry is not in %s. The cache "
                "directory must be a path that every worker and this process share (a shared "
                "filesystem), or the write failed: see the worker's log",
                call.name,
                root,
            )


def _is_failure(kind: Any) -> bool:
    if kind is _Failure:
        return True
    name = (
        kind
        if isinstance(kind, str)
        else f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', '')}"
    )
    return name == _FAILURE_NAME


def _local(handle: Any) -> Any:
    return materialize(handle)


def _local_state(state: Any) -> Any:
    value = state._value
    if type(value) is not Payload:
        return state
    copy = State(
        state.name, state.node, None, state.exception, state.history, state.upstream, state.message
    )
    copy._value = value.load()
    return copy


RANK_SPAN = 1 << 40  # dask priorities: one band per user priority, graphexec's order inside


def _rank(run: Any, node: int, behind: int) -> int:
    """Node's dask priority (higher runs first): its ``priority=``, then ``behind``
    (how far from the last of graphexec's order it is)."""
    priority = run.graph._opts[node].priority if run is not None else 0
    return priority * RANK_SPAN + behind


def _ranks(run: Any) -> dict[int, int]:
    """Each member's dask priority: graphexec's own order (user priority, then depth first).

    A dask worker runs the tasks queued on it by priority, and by submission
    time among equals. Without this, a dependent submitted once its input is
    ready queues behind independent calls submitted earlier (a dozen
    ``make_array`` calls ahead of the ``sort_array`` of an array already
    made): the worker holding the input falls behind, the other idles, and
    arrays pile up in memory. With it a worker runs the dependent next, as
    plain dask does with the priorities of ``dask.order``. Nodes a flow adds
    later rank by their ``priority=`` alone (``_rank``).
    """
    if run is None:
        return {}
    size = len(run.members)
    return {i: _rank(run, i, size - pos) for pos, i in enumerate(run.members)}


def _nodes_needing_digests(run: Any) -> set[int]:
    """Upstream nodes whose values enter a dependent's ``task_input_hash`` cache key.

    Their value is hashed on the worker (a stable key needs its content, and
    it is not here); an upstream with a cache key of its own enters by that key.
    """
    if run is None:
        return set()
    graph = run.graph
    opts, deps = graph._opts, graph._deps
    need: set[int] = set()
    for d in run.members:
        if opts[d].cache_key_fn is task_input_hash:
            need.update(up for up in deps[d] if opts[up].cache_key_fn is None)
    return need
