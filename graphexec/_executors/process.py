"""The process pool: workers the scheduler controls one by one.

::

    scheduler thread                                worker processes
    ----------------                                ----------------
    submit(call) --pickle args--> send_bytes ==pipe 1==> recv, run, reply
                                             ==pipe 2==> ...
    poll(timeout): multiprocessing.connection.wait(pipes + process sentinels)
        pipe readable      -> replies, in the order the calls were sent
        sentinel readable  -> that worker died: its oldest unanswered call is
                              the one it was running (crash, or our kill for a
                              timeout / memory limit / cancel); the calls
                              queued behind it go back to the scheduler
        deadline passed    -> kill that worker (timeout); the death path
                              above turns it into TaskTimeout

Unlike ``concurrent.futures.ProcessPoolExecutor``, whose pool is broken by
one dead worker because it cannot tell which call died, each worker here has
its own pipe and runs its calls strictly in order, so every fault is
attributed to exactly one node and only that worker is replaced.

Prefetch: a worker may hold more calls of a function whose recent calls
were short, so it never waits for the parent between tiny tasks: as many as
make about ``PREFETCH_SECONDS`` of its measured call time (up to
``PREFETCH_DEPTH``), as joblib's ``batch_size="auto"`` does, so a queue of
slower calls never holds back a free worker for long. Prefetched calls are
gathered per worker and sent as one ``batch`` message (when the scheduler
waits, or ``BATCH_CALLS`` at a time): one write and one wake-up of the worker
for many calls. The worker still runs them one by one, in order, and answers
each before it starts the next, so a crash blames exactly the call it was
running. A call with ``timeout=`` is never batched: it is sent on its own
(its deadline starts when its predecessor's answer arrives). What
waits in a worker's pipe is bounded (``QUEUE_MAX_BYTES``), or the scheduler
would block on a send until that worker is free.

Chains: a call may bring the calls of its sole consumers (``call.then``,
built by the scheduler); they go to the same free worker right behind it,
which keeps each value in memory for the next (see ``_call.py``). Where the
time goes per task, measured: ``docs/dispatch.md``.

Recycling: with ``max_calls``, a worker is sent at most that many calls
(prefetched and chained ones count) and is replaced once it has answered
them, between calls: nothing is lost and nobody is blamed. A call with
``isolate`` goes alone to a fresh worker that is discarded after it. An
``initializer`` runs once in every worker started, recycled ones too; one
that fails ``INIT_ATTEMPTS`` times in a row breaks the pool (``_broken``):
no more workers start, and calls that would need one fail with its error.

Workers are started lazily (never more than there is work for; a compute's own
pool starts those its first calls surely need when the run opens, see
``_sure_roots``), on Linux from a server of graphexec's own: the ``zygote``
(``zygote.py``: a fork of this process made while it runs one thread) by
default, else the ``forkserver`` (a fresh interpreter); ``spawn`` elsewhere:
never a plain fork of a parent that may run threads. The servers and the
contexts are graphexec's own (``_forkserver``, ``_zygote_server``,
``_CONTEXTS``): the program's own process pools start exactly as they would
without graphexec. Workers are not daemonic, so tasks may start their own
processes. A worker is asked for without waiting for the server's fork
(``_ForkServerPopen``: its pid is read when first needed), so a cold compute
asks for all its workers, and sends them their first calls, before it waits for
any. Shutdown asks politely, then kills, and always joins; an ``atexit`` hook
closes pools the program forgot. A compute's own pool, at the end of its run,
asks its workers to stop but lets go of them without joining them
(``shutdown(wait=False)``); each kills what is left in its group itself
(``worker._end_group``). Each worker leads a process group, killed with it, so
no subprocess a task started outlives it; and before a worker is killed,
retired or stopped, its descendants are found by parentage (``worker.descendants``)
and killed too, so a subprocess that left the group (``os.setsid()``, any
daemonizing tool) goes as well. Out of reach: a descendant that was re-parented
to init before we look (a double fork that finished, or any descendant of a
worker that crashed on its own). If this process dies without closing the pool
(SIGKILL, a hard crash), each worker's watchdog and the pool's guard process
(``_Guard``) end the workers and their descendants within a second or so.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import itertools
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.spawn
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from multiprocessing import reduction, resource_tracker
from multiprocessing import util as mp_util
from multiprocessing.connection import wait as mp_wait
from multiprocessing.context import set_spawning_popen
from typing import Any, cast

from .._data import shm as _shm
from .._data.serialize import (
    Payload,
    arguments_error,
    as_wire,
    dumps,
    dumps_function,
    encode_call,
    function_error,
)
from .._model.errors import (
    MemoryLimitExceeded,
    SerializationError,
    WorkerCrashed,
    describe_exitcode,
)
from .._model.sizes import size_text
from .._model.task import BoundTask, Task, pickled_by_value
from . import threadlimits
from . import worker as _worker
from . import zygote as _zygote
from .protocol import (
    ERROR,
    HELD,
    OK,
    REQUEUE,
    SHORT_CALL,
    SIGNAL_SLICE,
    Call,
    Capabilities,
    Deadlines,
    take_back,
)
from .runtime import load_exception, timeout_error

PREFETCH_MAX_BYTES = 16 * 1024  # a queued message must fit in the pipe buffer
PREFETCH_DEPTH = 64  # calls a worker may hold when its function's calls are tiny
# Bytes of values the calls queued in one worker may make, by their function's
# largest value so far (64 x 1 MB loads were alive at once, breadth-first)
PREFETCH_VALUE_BYTES = 4 * 1024 * 1024
PREFETCH_SMALL_VALUE = 4096  # values up to this size are not weighed
RECLAIM_MAX = 128  # calls asked back at once: a request stays under PIPE_BUF (4 KiB)
PREFETCH_SECONDS = 0.005  # ... and no more than this much of their measured time
# A worker whose current call has run this long is no prefetch target, whatever its
# function measured before: a call of a tiny function may still block (I/O, a lock).
HEAD_STALLED = 10 * SHORT_CALL
CALL_OVERHEAD = 2e-5  # seconds a worker spends on a call besides the call itself
QUEUE_MAX_BYTES = 32 * 1024  # unanswered messages a prefetch may leave in a worker's pipe
BATCH_CALLS = 16  # prefetched calls gathered for a worker are sent at this many
BURST_BYTES = 256 * 1024  # read size when draining a worker's replies
_HEADER = struct.Struct("!i")  # multiprocessing's message framing (Connection.send_bytes)
_LONG_HEADER = struct.Struct("!Q")
_READ_BURSTS = sys.platform.startswith("linux")  # duplex pipes are socketpairs there
CHAIN_MAX_BYTES = 64 * 1024  # messages a chain may queue behind its head (pipe buffer: ~200 KB)
FN_MESSAGE_OVERHEAD = 512  # bytes of an ("fn", ...) message besides the function's pickle
FUNCTIONS_KEPT = 256  # functions a pool keeps (and its workers): least recently used go
MEMORY_SAMPLE_INTERVAL = 0.05
STOP_TIMEOUT = 1.0
ROOTS_SCAN = 64  # members Lease.open looks at for roots that need a worker at once
LOAD_ALLOWANCE = 60.0  # seconds a worker may take to start and load a function, past timeout=
INIT_ATTEMPTS = 3  # initializer failures in a row after which no more workers are started

_live_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()
_pool_ids = itertools.count(1)


def _preparation_data(name: str) -> dict[str, Any]:
    """multiprocessing's preparation data for a graphexec worker, without ``__main__``.

    multiprocessing makes every spawned or forkserver child import the
    parent's main script again (as ``__mp_main__``) so that pickles naming
    ``__main__`` resolve. graphexec never needs that — cloudpickle sends
    functions and classes of ``__main__`` by value — and it is harmful: the
    script's top-level code runs again in every worker, and a script without
    an ``if __name__ == "__main__":`` guard tries to start processes from a
    process that is still starting ("bootstrapping phase" errors, every node
    a crash). Only graphexec's own ``Popen`` classes below call this: other
    processes of the program keep multiprocessing's behaviour untouched.
    """
    data = multiprocessing.spawn.get_preparation_data(name)
    data.pop("init_main_from_path", None)
    data.pop("init_main_from_name", None)
    return data


@contextlib.contextmanager
def _default_start_method_kept() -> Iterator[None]:
    """Leave the program's default start method unchosen if it was.

    multiprocessing's launch helpers read the default start method, and
    reading it fixes it for the whole program: after that, the user's own
    ``multiprocessing.set_start_method(...)`` fails with "context has already
    been set". Starting graphexec's workers must not choose for the user.
    """
    unchosen = multiprocessing.get_start_method(allow_none=True) is None
    try:
        yield
    finally:
        if unchosen:
            multiprocessing.set_start_method(None, force=True)


_server: tuple[int, multiprocessing.forkserver.ForkServer] | None = None  # (pid, server)
_server_lock = threading.Lock()


def _forkserver() -> multiprocessing.forkserver.ForkServer:
    """graphexec's own forkserver, never Python's shared one.

    Python has one forkserver per program, and its preload list is global:
    preloading graphexec there would load graphexec into every child of the
    user's own forkserver pools. Ours preloads what graphexec's workers need
    (so each fork starts ready) and never ``__main__``, whose top-level code
    must not run again. A process made by ``os.fork()`` gets its own server:
    the parent's is not its child to talk to.
    """
    global _server
    with _server_lock:
        if _server is None or _server[0] != os.getpid():
            _server = (os.getpid(), _zygote.ForkServer())
        server = _server[1]
        # Read when the server starts (once, or again if it died).
        server.set_forkserver_preload(_preload())
        return server


def _preload() -> list[str]:
    """What a fresh-interpreter server imports before it forks workers."""
    # (this module too: a worker unpickles its Process object, of a class defined
    # here, before it runs a line of its own: 5 ms per worker when imported there)
    preload = [_worker.__name__, __name__]
    preload += [m for m in ("numpy", "cloudpickle", "psutil") if m in sys.modules]
    if "numpy" in sys.modules:  # each worker limits numpy's BLAS: 25 ms less per start
        preload.append(threadlimits.PRELOAD)
    return preload


def _zygote_server() -> multiprocessing.forkserver.ForkServer:
    """graphexec's zygote (``zygote.py``): a fork of this process while it ran one thread."""
    return _zygote.server(_preload())


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


if sys.platform != "win32":
    import multiprocessing.popen_forkserver
    import multiprocessing.popen_spawn_posix

    class _ForkServerPopen(multiprocessing.popen_forkserver.Popen):
        """CPython's forkserver ``Popen`` (the same in 3.10 to 3.13), but its
        ``_launch`` asks graphexec's forkserver, with :func:`_preparation_data`,
        and does not wait for the server's fork.

        The server answers with the child's pid once it has forked it (a
        millisecond or two: the server, then this process, each wake up);
        CPython's ``_launch`` waits for that answer, so a pool asking for two
        workers waited for the first one's fork before asking for the second,
        and sent no call meanwhile. Here the pid is read when first needed
        (``pid``, ``poll``, ``wait``): a pool asks for all its workers, and
        sends each its first calls (the pipe holds them), before it waits for
        any. ``pid`` is None if the server died before forking the child (its
        exit code is then 255).
        """

        _fds: list[int]
        _server = staticmethod(_forkserver)  # the server asked to fork the worker
        _pid: int | None = None
        _pid_read = False

        _pid_lock: threading.Lock

        @property  # type: ignore[override]
        def pid(self) -> int | None:
            if not self._pid_read:
                # Any thread may ask first: multiprocessing's _cleanup() polls
                # every child from whichever thread starts a process. One reads,
                # the others wait for it; the flag is set once the read is done,
                # so an interrupted read (Ctrl-C) is simply done again.
                with self._pid_lock:
                    if not self._pid_read:
                        try:
                            self._pid = multiprocessing.forkserver.read_signed(self.sentinel)
                        except (OSError, EOFError):  # the server died before forking it
                            self.returncode = 255
                        self._pid_read = True
            return self._pid

        @pid.setter
        def pid(self, value: int | None) -> None:
            self._pid, self._pid_read = value, True

        def poll(self, flag: int = os.WNOHANG) -> int | None:
            if not self._pid_read:
                if flag == os.WNOHANG and not mp_wait([self.sentinel], 0):
                    return None  # not forked yet, so surely running
                _ = self.pid  # the server's first answer: the pid, not the exit
            return super().poll(flag)

        def wait(self, timeout: float | None = None) -> int | None:
            if not self._pid_read:
                _ = self.pid
            return super().wait(timeout)

        def _launch(self, process_obj: Any) -> None:
            self._pid_lock = threading.Lock()
            prep_data = _preparation_data(process_obj._name)
            buf = io.BytesIO()
            set_spawning_popen(self)
            try:
                reduction.dump(prep_data, buf)
                reduction.dump(process_obj, buf)
            finally:
                set_spawning_popen(None)
            self.sentinel, w = self._server().connect_to_new_process(self._fds)
            # As CPython: a duplicate of the data pipe's write end is the child's
            # sentinel of its parent.
            parent_w = os.dup(w)
            self.finalizer = mp_util.Finalize(self, _close_fds, (parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            # (the pid: read when first needed, see the class)

    class _ZygotePopen(_ForkServerPopen):
        """The forkserver ``Popen``, asking graphexec's zygote (``zygote.py``)."""

        _server = staticmethod(_zygote_server)

    class _SpawnPopen(multiprocessing.popen_spawn_posix.Popen):
        """CPython's posix spawn ``Popen`` (the same in 3.10 to 3.13), but its
        ``_launch`` sends :func:`_preparation_data`."""

        _fds: list[int]

        def _launch(self, process_obj: Any) -> None:
            tracker_fd = resource_tracker.getfd()
            assert tracker_fd is not None  # getfd() starts the tracker if need be
            self._fds.append(tracker_fd)
            prep_data = _preparation_data(process_obj._name)
            fp = io.BytesIO()
            set_spawning_popen(self)
            try:
                reduction.dump(prep_data, fp)
                reduction.dump(process_obj, fp)
            finally:
                set_spawning_popen(None)
            parent_r = child_w = child_r = parent_w = None
            try:
                parent_r, child_w = os.pipe()
                child_r, parent_w = os.pipe()
                cmd = multiprocessing.spawn.get_command_line(
                    tracker_fd=tracker_fd, pipe_handle=child_r
                )
                self._fds.extend([child_r, child_w])
                exe: Any = multiprocessing.spawn.get_executable()  # str or bytes, by version
                self.pid = mp_util.spawnv_passfds(exe, cmd, self._fds)
                self.sentinel = parent_r
                with open(parent_w, "wb", closefd=False) as f:
                    f.write(fp.getbuffer())
            finally:
                self.finalizer = mp_util.Finalize(
                    self, _close_fds, [fd for fd in (parent_r, parent_w) if fd is not None]
                )
                for fd in (child_r, child_w):
                    if fd is not None:
                        os.close(fd)

    class _ForkServerProcess(multiprocessing.context.ForkServerProcess):
        @staticmethod
        def _Popen(process_obj: Any) -> Any:  # noqa: N802 (multiprocessing's name)
            with _default_start_method_kept():
                return _ForkServerPopen(process_obj)

    class _ZygoteProcess(multiprocessing.context.ForkServerProcess):
        @staticmethod
        def _Popen(process_obj: Any) -> Any:  # noqa: N802 (multiprocessing's name)
            with _default_start_method_kept():
                return _ZygotePopen(process_obj)

    class _SpawnProcess(multiprocessing.context.SpawnProcess):
        @staticmethod
        def _Popen(process_obj: Any) -> Any:  # noqa: N802 (multiprocessing's name)
            with _default_start_method_kept():
                return _SpawnPopen(process_obj)

    class _ForkServerContext(multiprocessing.context.ForkServerContext):
        """A context of graphexec's own: its processes come from :func:`_forkserver`."""

        Process = _ForkServerProcess

    class _ZygoteContext(multiprocessing.context.ForkServerContext):
        """A context of graphexec's own: its processes come from :func:`_zygote_server`."""

        Process = _ZygoteProcess

    class _SpawnContext(multiprocessing.context.SpawnContext):
        """A context of graphexec's own: its processes never import ``__main__``."""

        Process = _SpawnProcess

    _CONTEXTS: dict[str, multiprocessing.context.BaseContext] = {
        "forkserver": _ForkServerContext(),
        "spawn": _SpawnContext(),
        "zygote": _ZygoteContext(),
    }
else:  # graphexec runs on Linux (README); Windows keeps multiprocessing's own contexts
    _CONTEXTS = {}


def prestart(start_method: str | None = None) -> None:
    """Start graphexec's forkserver now, in the background, if workers will come from it.

    Its start (a Python interpreter importing what a worker needs) is most of a
    first compute's time; started when a pool is made (or earlier, see
    ``_surfaces/__init__.py``) it runs while the parent still builds the run,
    loads the scheduler and pickles the first calls, rather than after. It
    starts once per process and serves every pool, as it would at the first
    worker; nothing waits for it here.
    """
    method = start_method or default_start_method()
    if method in ("forkserver", "zygote") and method in _CONTEXTS:
        try:
            with _default_start_method_kept():  # its preparation data reads the default
                (_forkserver() if method == "forkserver" else _zygote_server()).ensure_running()
        except OSError:
            pass  # the first worker's start tries again, and reports what fails there


def default_start_method(memory_limited: bool = False) -> str:
    """``GRAPHEXEC_START_METHOD`` if set; on Linux ``zygote`` while it can be forked
    (this process runs one thread, or already has its zygote) and the workers'
    memory is not limited, else ``forkserver``; elsewhere ``spawn``. See
    ``zygote.py`` and docs/architecture.md.

    ``memory_limited``: a zygote's worker counts the pages it shares with the
    program in its RSS, which ``memory_limit=`` limits; a forkserver's starts small.
    """
    env = os.environ.get("GRAPHEXEC_START_METHOD")
    if env:
        return env
    if sys.platform.startswith("linux"):
        if memory_limited:
            return "forkserver"
        if _zygote.running() or _zygote.why_not_fork() is None:
            return "zygote"
        return "forkserver"
    return "spawn"


def start_methods() -> list[str]:
    """The start methods a pool accepts here."""
    return [
        *multiprocessing.get_all_start_methods(),
        *(["zygote"] if "zygote" in _CONTEXTS else []),
    ]


class _Worker:
    __slots__ = (
        "_pid",
        "asked",
        "calls_left",
        "conn",
        "contexts",
        "ctrl",
        "forget",
        "functions",
        "head_started",
        "id",
        "inflight",
        "init_error",
        "kill",
        "loading",
        "pending",
        "process",
        "ps",
        "queued",
        "rbuf",
        "ready",
        "runs",
        "sock",
    )

    def __init__(self, wid: int, process: Any, conn: Any, calls_left: int | None) -> None:
        self.id = wid
        self.process = process
        self.conn = conn
        self._pid: int | None = 0  # 0: not read yet (see pid)
        self.inflight: deque[Call] = deque()  # sent, not answered; head is running
        # Prefetched calls (in inflight already) not sent yet: one batch message, soon.
        self.pending: list[bytes] = []
        self.queued = 0  # bytes of the inflight calls' messages (what its pipe may hold)
        self.runs = 0  # calls sent to it so far: the next one's number is runs + 1
        # Where it is asked for prefetched calls back (_reclaim; -1: nowhere), and
        # whether it was asked and has not answered.
        self.ctrl = -1
        self.asked = False
        # Its replies are read in bursts, as many as have arrived, through a
        # non-blocking duplicate of the pipe's socket (None: read message by message).
        self.rbuf = bytearray()
        self.sock: socket.socket | None = None
        if _READ_BURSTS:
            try:
                self.sock = socket.socket(fileno=os.dup(conn.fileno()))
            except OSError:
                self.sock = None
        self.functions: set[int] = set()
        self.contexts: set[int] = set()  # the cache contexts it was told (_tell_context)
        self.forget: list[int] = []  # evicted functions it still has: dropped at the next load
        self.head_started = 0.0
        self.loading: set[int] = set()  # functions sent, not yet acknowledged as loaded
        self.kill: tuple[Call, BaseException] | None = None  # why we killed it, for whom
        self.ps: Any = None
        # Calls it may still be sent (None: no limit); at 0 it is retired once idle.
        self.calls_left = calls_left
        self.init_error: BaseException | None = None  # its initializer raised this
        self.ready = False  # its initializer (if the pool has one) returned: "ready"

    @property
    def pid(self) -> int | None:
        """Its pid, read from the server's answer when first asked (``_ForkServerPopen``);
        None if the server died before forking it."""
        if self._pid == 0:
            self._pid = self.process.pid
        return self._pid

    @property
    def born(self) -> bool:
        """Whether its pid has been read (the server's first answer on the sentinel)."""
        return self._pid != 0 or getattr(self.process._popen, "_pid_read", True)


class ProcessPool:
    """Worker processes the scheduler controls one by one; see the module docstring.

    The public, warm ``gx.Pool`` (``_surfaces/pool.py``) owns one; a compute
    without ``pool=`` makes its own. A run drives it through a :class:`Lease`,
    the :class:`~graphexec._executors.protocol.Executor` the engine sees.
    """

    def __init__(
        self,
        workers: int,
        *,
        start_method: str | None = None,
        max_calls: int | None = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        inner_threads: int | None = None,
    ) -> None:
        self.workers = workers
        self.max_calls = max_calls
        # Library threads per worker (threadlimits.py): read from the environment now.
        self.inner_threads = inner_threads or threadlimits.automatic(workers)
        self._thread_env = threadlimits.worker_environment(inner_threads, workers)
        # The initializer travels by value (cloudpickle), pickled once: workers
        # never import __main__, where it is often defined.
        self._init: tuple[bytes, bytes, str | None] | None = None
        self._init_name = ""
        if initializer is not None:
            self._init_name = getattr(initializer, "__qualname__", None) or repr(initializer)
            try:
                self._init = (
                    dumps(initializer),
                    dumps(tuple(initargs)),
                    getattr(getattr(initializer, "__code__", None), "co_filename", None),
                )
            except Exception as exc:
                raise TypeError(
                    f"initializer={self._init_name} or its initargs cannot be pickled: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        self._init_failures = 0  # initializer failures in a row (INIT_ATTEMPTS)
        self._broken: BaseException | None = None  # the initializer's error, once it gave up
        method = start_method or default_start_method()
        if method not in start_methods():
            raise ValueError(
                f"start_method={method!r} is not available here; choose one of "
                f"{', '.join(start_methods())}"
            )
        self.start_method = method
        # Never multiprocessing's own contexts: theirs would change what the
        # program's other processes do (see _forkserver, _preparation_data).
        self._ctx: Any = _CONTEXTS.get(method) or multiprocessing.get_context(method)
        self._workers: dict[int, _Worker] = {}
        # Workers that used up max_calls, told to stop: no longer counted, still reaped.
        self._retiring: dict[int, _Worker] = {}
        self._idle: list[_Worker] = []
        self._waitables: dict[Any, _Worker] = {}
        # Worker id -> when the call it runs must be done (monotonic), re-armed
        # whenever its head call or that call's start changes (see _arm).
        self._deadlines = Deadlines()
        self._next_id = 0
        # The function registry, an LRU of at most about FUNCTIONS_KEPT (see
        # _evict_functions). Ids come from a counter, never reused: a worker may
        # still hold an evicted id until it is told to forget it.
        self._fn_ids: dict[int, int] = {}  # id(fn) -> fn id; _fn_keep holds the fn alive
        self._fn_keep: OrderedDict[int, Any] = OrderedDict()  # fn id -> fn, oldest use first
        self._fn_blobs: dict[int, bytes | BaseException] = {}
        # fn id -> how long its last calls took (seconds, smoothed), for prefetch
        self._fn_short: dict[int, float] = {}
        self._fn_bytes: dict[int, int] = {}  # fn id -> its largest value (if > 4 KiB)
        # Runs started on this pool (new_run), the run count each function was last
        # looked at in, and what it named then (_names): a script's or a
        # notebook's function travels by value, with the globals it names as they
        # were when pickled, so a new run that finds them rebound pickles it again
        # (see _pickle_again).
        self._runs = 0
        self._fn_made: dict[int, int] = {}
        self._fn_names: dict[int, tuple[Any, ...] | None] = {}
        # The function last looked up, its id (the last entry of _fn_keep), and
        # the run it was looked up in: consecutive calls of one function in one
        # run skip the registry.
        self._last_fn: Any = None
        self._last_id = 0
        self._last_run = 0
        self._batching: list[_Worker] = []  # workers with pending calls to send
        # (cache dir, task name) -> id: a cached call names its context by this id
        # (_cache_field); a worker is told a context, once, with the first call
        # it receives that names it (_tell_context). The "cache" message of each id:
        self._contexts: dict[tuple[str, str], int] = {}
        self._context_messages: list[bytes] = []
        # Where _drain_burst reads (allocating a large buffer per read would cost more).
        self._scratch = memoryview(bytearray(BURST_BYTES))
        self._fn_counter = itertools.count()
        # Calls refused by submit() keep their message, which names its function's
        # id: id(call) -> fn id, so that function stays until the call comes back.
        self._refused: dict[int, int] = {}
        self._outbox: list[tuple[Call, int, Any]] = []
        self._memory_limit: int | None = None
        # Runs of a shared pool (shared.py) with a memory limit: sample while > 0.
        self.limited_runs = 0
        self._next_sample = 0.0
        self._closed = False  # no new work (set first thing in close)
        self._stopped = False  # close() has finished: every worker is gone
        self._owner_lock = threading.Lock()
        self.id = next(_pool_ids)
        self._shm_prefix = _shm.pool_prefix(os.getpid(), self.id)
        # A submission from another thread (an eager session) interrupts poll().
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._guard = _Guard(f"pool-{self.id}")
        self._owner_pid = os.getpid()
        # What the interpreter's exit calls for this pool while it is open: its
        # owner's shutdown (a shared pool ends its open runs first), else ours.
        self.at_exit: weakref.WeakMethod[Callable[[], None]] | None = None
        self._exiting = False  # the program exits while a run uses it (_end_at_exit)
        self._shutdown_lock = threading.RLock()
        _live_pools.add(self)
        prestart(method)

    # -- lifetime -------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._workers)} running"
        return f"<ProcessPool workers={self.workers} {self.start_method} ({state})>"

    def shutdown(self, wait: bool = True) -> None:
        """Stop every worker: ask (a busy one is killed), then join. Idempotent.

        Re-entrant too: a close interrupted half-way (a second Ctrl-C) is finished
        by the next call, at the latest by the exit hook — a worker left unstopped
        would make multiprocessing's own exit hook wait for it forever.

        ``wait=False`` (a compute's own pool, at the end of its run): the
        workers are asked to stop (busy ones killed) as with ``wait=True``, but a
        worker of the zygote or the forkserver is then let go
        (:func:`_abandon`) rather than joined: joining took the worker, the
        server and this process a wake-up each, 2-3 ms of a cold compute on a
        busy 2-core machine. What the join made sure of, the worker does
        itself: it ends within ``STOP_TIMEOUT`` + 1 s whatever its exit hooks
        do, and as its very last act kills what its tasks left in its process
        group (``worker._end_group``). (A ``spawn`` worker is this process's
        child: it is joined.)

        One thread at a time: at the program's exit, the hook and a run's own
        thread, ending its compute, may both stop the pool (``_end_at_exit``).
        """
        with self._shutdown_lock:
            self._shut_down(wait)

    def _shut_down(self, wait: bool) -> None:
        if self._stopped:
            return
        if os.getpid() != self._owner_pid:
            # A forked copy of the process that made the pool (os.fork(), a
            # pre-fork server) exiting: the workers are not its to stop.
            return
        self._closed = True
        workers = list(self._workers.values())
        for w in workers:
            if w.inflight:
                self._kill(w)
            else:
                # What earlier tasks left running (a daemon they started), found
                # while the worker is still there to be their parent.
                _worker.kill_all(_worker.descendants(w.pid))
                try:
                    w.conn.send_bytes(pickle.dumps(("stop",)))
                except OSError:
                    pass
        workers += self._retiring.values()
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in workers:
            if not wait and isinstance(w.process._popen, _ForkServerPopen):
                self._forget(w, close_process=False, stopping=True)
                _abandon(w.process)
                continue
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.exitcode is None:
                self._kill(w)
                w.process.join(STOP_TIMEOUT)
            _kill_group(w.pid)  # processes a task started and left running
            self._forget(w, stopping=True)
        self._fn_ids.clear()
        self._contexts.clear()
        self._context_messages.clear()
        self._fn_keep.clear()
        self._fn_made.clear()
        self._fn_names.clear()
        self._last_fn = None
        self._fn_blobs.clear()
        self._fn_short.clear()
        self._fn_bytes.clear()
        self._wake_r.close()
        self._wake_w.close()
        self._guard.close()
        self._stopped = True

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def lease(self, memory_limit: int | None, *, shutdown_on_close: bool) -> Lease:
        """The executor for one run (or one eager session) on these workers.

        One run at a time: a second lease while one is open is a RuntimeError.
        ``shutdown_on_close``: the pool was made for this run and ends with it.
        """
        self._acquire(memory_limit)
        return Lease(self, memory_limit, shutdown_on_close)

    def _acquire(self, memory_limit: int | None) -> None:
        if self._closed:
            raise RuntimeError("this Pool is closed; create a new one")
        if not self._owner_lock.acquire(blocking=False):
            raise RuntimeError(
                "this Pool is already running a compute; a Pool runs one compute at a time"
            )
        self._memory_limit = memory_limit
        self._next_sample = 0.0

    def _release(self) -> None:
        self.idle_sweep()
        self._memory_limit = None
        self._outbox = []
        self._owner_lock.release()

    def _end_at_exit(self) -> None:
        """The program exits while a run (in another thread: a daemon's compute or
        flow) uses this pool: its workers are killed here, by pid, so that nothing its
        thread still touches is closed under it; that thread then fails the run's
        calls saying the program exited (``_exiting``), lets go of the pool, and the
        pool is shut down, if within ``EXIT_RUN_WAIT``: the exit must not hang."""
        self._exiting = True
        for w in list(self._workers.values()):
            if w.pid is not None:
                _kill_group(w.pid)
        try:
            self.wakeup()
        except (OSError, ValueError):
            pass
        if self._owner_lock.acquire(timeout=EXIT_RUN_WAIT):
            self._owner_lock.release()
            self.shutdown()

    def idle_sweep(self) -> None:
        """No run is using the pool: sweep its shared memory, reap retired workers."""
        # Everything the runs still needed is mapped or released by now; what
        # is left under our prefix was written by a worker that died mid-copy.
        _shm.sweep(self._shm_prefix)
        if self._guard.unreaped:
            self._guard.reap()
        for w in list(self._retiring.values()):
            if w.process.exitcode is not None:  # reaped now rather than at the next run
                self._bury(w)
        self._refused.clear()  # the runs' calls are done with: none comes back

    # -- workers --------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        wid = self._next_id
        self._next_id += 1
        # The worker tells the guard its pid itself, first thing, before it can
        # run a call: this process learns the pid only when it next polls
        # (_ForkServerPopen), and a task holding the GIL would keep the
        # worker's own watchdog from acting if we died meanwhile. The guard's
        # pipe exists now; its shell starts once the worker's fork is asked for.
        self._guard.open()
        guard_fd = self._guard.fileno()
        guard = _InheritedFd(guard_fd) if guard_fd is not None else None
        steal_r, steal_w = os.pipe()  # (both close on exec: the child gets a duplicate)
        os.set_blocking(steal_w, False)
        process = self._ctx.Process(
            target=_worker.main,
            args=(child_conn, wid, os.getpid(), self.id, _worker.log_setup(), self._init),
            kwargs={
                "thread_env": self._thread_env,
                "guard": guard,
                "steal": _InheritedFd(steal_r),
            },
            name=f"graphexec-worker-{wid}",
            daemon=False,
        )
        try:
            process.start()
        except BaseException:
            os.close(steal_w)
            raise
        finally:
            child_conn.close()
            os.close(steal_r)
        w = _Worker(wid, process, parent_conn, self.max_calls)
        w.ctrl = steal_w
        self._workers[wid] = w
        self._waitables[parent_conn] = w
        self._waitables[process.sentinel] = w
        # Started after the worker's fork was asked for, so that both start at once:
        # starting the shell keeps this thread for 1.5 to 2 ms (until its exec), a
        # fifth of a cold compute's start, which the fork must not wait behind.
        # (After the worker is ours: interrupted here, shutdown still stops it.)
        self._guard.start()
        return w

    def _forget(self, w: _Worker, close_process: bool = True, stopping: bool = False) -> None:
        """Drop a worker that is gone, or (``stopping``: shutdown) being stopped.

        ``stopping`` leaves the guard as it is (shutdown dismisses it with one
        line) and, with ``close_process=False``, the ``Process`` to the reaper.
        """
        self._deadlines.discard(w.id)
        w.pending.clear()
        w.queued = 0
        if w in self._batching:
            self._batching.remove(w)
        if not stopping and w.pid is not None:
            self._guard.remove(w.pid)
        self._workers.pop(w.id, None)
        self._retiring.pop(w.id, None)
        self._waitables.pop(w.conn, None)
        self._waitables.pop(w.process.sentinel, None)
        if w in self._idle:
            self._idle.remove(w)
        try:
            w.conn.close()
        except OSError:
            pass
        if w.ctrl >= 0:
            os.close(w.ctrl)
            w.ctrl = -1
        if w.sock is not None:
            w.sock.close()
        if close_process and w.process.exitcode is not None:
            w.process.close()

    def _kill(self, w: _Worker) -> None:
        """SIGKILL the worker, its process group and every descendant it has.

        The descendants are looked up first, while the worker is alive to be
        their parent: once it is dead they belong to init, and one that left
        the group (``os.setsid()``) could no longer be told from any process.
        """
        if w.pid is None:  # never forked
            return
        tree = _worker.descendants(w.pid)
        try:
            os.killpg(w.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            try:
                w.process.kill()
            except (OSError, ValueError):
                pass
        _worker.kill_all(tree)

    def _retire(self, w: _Worker) -> None:
        """Replace a worker that has answered all the calls it may take.

        Between calls, so nobody is blamed and nothing is lost: it is told to
        stop and no longer counts against ``workers`` (a fresh one may start at
        once); ``poll`` reaps it when it has gone (``_bury``).
        """
        self._workers.pop(w.id, None)
        self._retiring[w.id] = w
        _worker.kill_all(_worker.descendants(w.pid))
        try:
            w.conn.send_bytes(pickle.dumps(("stop",)))
        except OSError:
            pass  # already gone: its sentinel says so

    def start_workers(self, n: int) -> None:
        """Start up to ``n`` workers now, idle until the run's first calls (``Lease.open``).

        Not with an initializer (its reply, read while the worker is idle, would
        be taken for its death by ``_idle_worker``) nor a memory limit (checking
        an idle worker's memory needs its pid at once).
        """
        if self._init is not None or self._memory_limit is not None:
            return
        while len(self._workers) < n and self._may_spawn():
            self._idle.append(self._spawn())

    def _may_spawn(self) -> bool:
        return self._broken is None and len(self._workers) < self.workers

    def _initializer_error(self, call: Call) -> WorkerCrashed:
        cause = self._broken
        error = WorkerCrashed(
            f"the pool's initializer {self._init_name} failed in {INIT_ATTEMPTS} worker "
            f"processes in a row ({type(cause).__name__}: {cause}), so {call.name} did not "
            "run: this pool starts no more workers. Fix the initializer and create a new Pool",
            node=call.name,
        )
        error.__cause__ = cause
        return error

    # -- executor protocol ----------------------------------------------------

    def submit(self, call: Call) -> bool:
        if self._exiting:  # (_end_at_exit) no worker will run it
            call.started = call.finished = time.time()
            self._outbox.append((call, ERROR, did_not_finish(call, PROGRAM_EXITED)))
            return True
        if len(self._fn_keep) > FUNCTIONS_KEPT:
            # Before this call's functions are looked up: evicting one of them
            # half-way through building its chain would leave a dangling id.
            self._evict_functions()
        if self._refused:
            self._refused.pop(id(call), None)
        fn_id = self._function_id(call.fn)
        message = None
        if call.wire is None:
            try:
                message = self._message(call, fn_id)
                call.wire = pickle.dumps((*message, False), protocol=5)  # _wire, inlined
            except SerializationError as exc:
                call.then = None
                call.started = call.finished = time.time()
                self._outbox.append((call, ERROR, exc))
                return True
        elif type(self._fn_blobs[fn_id]) is not bytes:
            # Encoded (then refused) before a new run found its function no longer
            # pickles (see _pickle_again): it fails here, as _message fails it.
            call.then = None
            call.started = call.finished = time.time()
            error = self._fn_blobs[fn_id]
            assert isinstance(error, BaseException)
            self._outbox.append((call, ERROR, function_error(call.name, error)))
            return True
        if call.isolate:
            return self._submit_isolated(call, fn_id)
        worker = self._idle_worker(call.memory_limit) if self._idle else None
        # (not self._may_spawn(), inlined)
        if worker is None and (self._broken is not None or len(self._workers) >= self.workers):
            if self._broken is not None and not self._workers:
                return self._fail_unstartable(call)
            worker = self._prefetch_target(call, fn_id)
            if worker is None:
                self._refused[id(call)] = fn_id
                return False
            call.then = None  # a chain starts only on a free worker
            # A failed send means the worker died running the call ahead of this
            # one: poll() sees the sentinel and fails that one, requeues this one.
            if call.timeout is None:
                self._batch(worker, call)
            else:  # on its own: see the module docstring
                self._deliver(worker, [(call, fn_id)])
                call.seq = worker.runs  # may be asked back (_reclaim)
            return True
        left = worker.calls_left if worker is not None else self.max_calls
        calls = self._chain(call, fn_id, message, left)
        if worker is not None and self._deliver(worker, calls) == 0:
            # It died while idle after all, its exit not yet reported (a forkserver
            # child's status arrives later than its pipe closes): not one message
            # reached it, so nobody is blamed and a fresh worker takes the calls.
            # (Once a message is through, the head may be running: a later failed
            # send is a death poll() attributes, as anywhere else.)
            for sent, _ in calls:
                if sent in worker.inflight:
                    worker.inflight.remove(sent)
            self._bury(worker)
            worker = None
        if worker is None:
            if not self._may_spawn():  # the stale idle worker was the last chance
                call.then = None
                if self._broken is not None and not self._workers:
                    return self._fail_unstartable(call)
                self._refused[id(call)] = fn_id
                return False
            # A failed send here means the worker died starting: poll() sees it.
            self._deliver(self._spawn(), calls)
        return True

    def _submit_isolated(self, call: Call, fn_id: int) -> bool:
        """``call`` alone in a fresh worker, retired once it answers (``isolate=True``).

        With every slot taken, an idle worker is retired to make room; with
        none idle the call waits (False), as any other would.
        """
        call.then = None
        if self._broken is not None:  # no fresh worker will ever start
            return self._fail_unstartable(call)
        if not self._may_spawn():
            idle = self._idle_worker(call.memory_limit)
            if idle is None:
                self._refused[id(call)] = fn_id
                return False
            self._retire(idle)
        worker = self._spawn()
        worker.calls_left = 1
        self._deliver(worker, [(call, fn_id)])
        return True

    def _fail_unstartable(self, call: Call) -> bool:
        """The pool is broken (its initializer) and cannot run ``call``: fail it."""
        call.then = None
        call.started = call.finished = time.time()
        self._outbox.append((call, ERROR, self._initializer_error(call)))
        return True

    def _chain(
        self, call: Call, fn_id: int, message: tuple | None, left: int | None
    ) -> list[tuple[Call, int]]:
        """``call`` and the chain behind it (``call.then``, see ``_call.py``) that can go.

        Whatever follows the head waits in the pipe while the head runs, so
        the chained calls' messages, and their functions' (counted as if the
        worker had none), must fit in ``CHAIN_MAX_BYTES``, well inside the
        pipe's buffer: a send that does not fit would block the scheduler until
        the head ends, holding up every timeout and every other worker. A call
        whose arguments cannot be pickled ends the chain too: dispatched on its
        own later, it fails with the usual error. ``left``: the calls the
        worker may still take (``max_calls``), the head included; an isolated
        call never rides in a chain. ``call.then`` is cut to the calls sent,
        which the scheduler reads back.
        """
        calls = [(call, fn_id)]
        if not call.then:
            return calls
        if message is None:  # encoded on an earlier, refused submit
            try:
                message = self._message(call, fn_id)
            except SerializationError:  # pickled once already; if not twice, no chain
                call.then = []
                return calls
        prev = call
        budget = CHAIN_MAX_BYTES
        functions = {fn_id}
        for nxt in call.then:
            if nxt.isolate or (left is not None and len(calls) >= left):
                break
            nxt_fn = self._function_id(nxt.fn)
            try:
                nxt_message = self._message(nxt, nxt_fn, prev=prev)
            except SerializationError:
                break
            # Every call but the last keeps its value for the next one.
            wire = _wire(nxt_message, hold=True)
            cost = len(wire)
            if nxt_fn not in functions:
                # (The first function message of a delivery also carries the
                # worker's forget list: ids of at most the registry's size, a
                # few kB, well inside the slack left below the pipe's buffer.)
                blob = self._fn_blobs[nxt_fn]
                # (an unpicklable function failed _message above: blob is bytes)
                cost += (len(blob) if isinstance(blob, bytes) else 0) + FN_MESSAGE_OVERHEAD
            if cost > budget:
                break
            budget -= cost
            functions.add(nxt_fn)
            nxt.wire = wire
            calls.append((nxt, nxt_fn))
            prev, last_message = nxt, nxt_message
        call.then = [c for c, _ in calls[1:]]
        if call.then:
            call.wire = _wire(message, hold=True)
            prev.wire = _wire(last_message, hold=False)
        return calls

    def _deliver(self, worker: _Worker, calls: list[tuple[Call, int]]) -> int:
        """Send the calls (and each function, the first time) to ``worker``, in order.

        Returns how many messages went through: fewer than needed if its pipe
        closed (the worker died), 0 if none did.
        """
        sent = 0
        if worker.pending:  # prefetched calls go first: calls run in the order sent
            self._flush(worker)
        # The first call goes at once (the worker starts on it); the calls of a
        # chain behind it go together, in one batch message (a function the
        # worker lacks goes before the call that needs it, ending a batch).
        behind: list[bytes] = []
        taken = 0  # calls in worker.inflight so far
        try:
            for call, fn_id in calls:
                cid = call.context
                if cid is not None and cid not in worker.contexts:
                    # Its cache context first: in the batch, or on its own before a
                    # call that goes on its own.
                    behind.append(self._tell_context(worker, cid))
                if fn_id not in worker.functions:
                    if behind:
                        sent += self._send_batch(worker, behind)
                        behind = []
                    origin = getattr(getattr(call.fn, "__code__", None), "co_filename", None)
                    # Functions evicted here since its last load go with the next
                    # one: a worker's dict only grows by loads, so it stays bounded.
                    forget, worker.forget = worker.forget, []
                    worker.conn.send_bytes(
                        pickle.dumps(("fn", fn_id, self._fn_blobs[fn_id], origin, forget))
                    )
                    sent += 1
                    worker.functions.add(fn_id)
                    worker.loading.add(fn_id)
                if not worker.inflight:
                    worker.head_started = time.monotonic()
                if worker.calls_left is not None:
                    worker.calls_left -= 1
                worker.inflight.append(call)
                worker.runs += 1
                call.seq = 0  # (one given back before keeps no number of its old worker)
                call.worker = worker.id
                taken += 1
                wire = call.wire
                assert wire is not None  # submit() and _chain() encode before delivery
                worker.queued += len(wire)
                if sent and call.timeout is None:
                    behind.append(wire)
                else:  # the first, or a call with a timeout: on its own (module docstring)
                    if behind:
                        sent += self._send_batch(worker, behind)
                        behind = []
                    worker.conn.send_bytes(wire)
                    sent += 1
            if behind:
                sent += self._send_batch(worker, behind)
        except OSError:
            # Gone: it died starting (or its server did, before forking it), or
            # since. The calls not taken yet are its too, their functions never
            # loaded, so that poll() fails or gives back each, as the rest.
            for call, fn_id in calls[taken:]:
                if not worker.inflight:
                    worker.head_started = time.monotonic()
                worker.inflight.append(call)
                call.worker = worker.id
                worker.loading.add(fn_id)
        self._arm(worker)
        return sent

    @staticmethod
    def _send_batch(worker: _Worker, wires: list[bytes]) -> int:
        """Send run messages to ``worker`` as one message (raises OSError if it is gone)."""
        if len(wires) == 1:
            worker.conn.send_bytes(wires[0])
        else:
            worker.conn.send_bytes(pickle.dumps(("batch", wires), protocol=5))
        return 1

    def _batch(self, worker: _Worker, call: Call) -> None:
        """Queue a prefetched call for ``worker``: sent with others as one message."""
        assert call.wire is not None
        if worker.calls_left is not None:
            worker.calls_left -= 1
        worker.inflight.append(call)
        worker.runs += 1
        call.seq = worker.runs  # may be asked back (_reclaim)
        call.worker = worker.id
        worker.queued += len(call.wire)
        if not worker.pending:
            self._batching.append(worker)
        cid = call.context
        if cid is not None and cid not in worker.contexts:  # its cache context first
            worker.pending.append(self._tell_context(worker, cid))
        worker.pending.append(call.wire)
        if len(worker.pending) >= BATCH_CALLS:
            self._flush(worker)

    def _flush(self, worker: _Worker) -> None:
        """Send ``worker``'s pending calls, one message for all (see the module docstring).

        A failed send means the worker died: poll() sees its sentinel, fails
        the call it was running and gives back the others, these included.
        """
        pending, worker.pending = worker.pending, []
        self._batching.remove(worker)
        try:
            self._send_batch(worker, pending)
        except OSError:
            pass

    def _idle_worker(self, limit: int | None = None) -> _Worker | None:
        """An idle worker, live and (``limit``: bytes of RSS) under the memory limit."""
        limit = limit if limit is not None else self._memory_limit
        while self._idle:
            w = self._idle.pop()
            # An idle worker has nothing to say: a readable pipe means it closed (the
            # worker died) even when its exit code has not been reported yet.
            if w.process.exitcode is None and not w.conn.poll():
                if self._rss_over_limit(w, limit) is None:
                    return w
                # Memory earlier tasks left behind (a module-level cache): the next
                # task must not be killed for it. Nothing runs there: nobody is blamed.
                self._kill(w)
            # Or it died while idle (between computes nobody watches it: the OOM
            # killer, a stray kill): no node was running on it, so none is blamed.
            self._bury(w)
        return None

    def _rss_over_limit(self, w: _Worker, limit: int | None) -> Any:
        """The worker's memory (psutil's ``memory_info()``: ``.rss``, ``.shared``) if a
        memory limit is set and its RSS is over it, else None."""
        if limit is None:
            return None
        import psutil

        try:
            if w.ps is None:
                if w.pid is None:
                    return None
                w.ps = psutil.Process(w.pid)
            memory = w.ps.memory_info()
        except psutil.Error:
            return None
        return memory if memory.rss > limit else None

    def _prefetch_target(self, call: Call, fn_id: int) -> _Worker | None:
        """A busy worker that may queue this call behind its current one, or None.

        As many calls as make ``PREFETCH_SECONDS`` of this function's measured
        time (at most ``PREFETCH_DEPTH``), so a free worker is never kept
        waiting long behind a queue; none once a call of it took ``SHORT_CALL``.
        Only behind a current call of a function measured short, running for less
        than ``HEAD_STALLED``: queued behind a long or stuck call of another
        task, ready calls waited for it (or forever) while another worker went
        free, and their own ``timeout=`` never started.
        """
        wire = call.wire
        cost = self._fn_short.get(fn_id)
        if wire is None or len(wire) > PREFETCH_MAX_BYTES or cost is None or cost >= SHORT_CALL:
            return None
        if call.memory_limit is not None or self._memory_limit is not None:
            # As chains are off there: a call queued behind another would start in
            # a worker that call may leave over the limit, and be blamed for it.
            return None
        depth = min(PREFETCH_DEPTH, max(2, int(PREFETCH_SECONDS / (cost + CALL_OVERHEAD))))
        value = self._fn_bytes.get(fn_id)
        if value is not None:  # large values: as many as make PREFETCH_VALUE_BYTES
            depth = min(depth, max(1, PREFETCH_VALUE_BYTES // value))
        room = QUEUE_MAX_BYTES - len(wire)
        # The worker holding the fewest calls, fewer than ``depth`` (the first on a tie).
        best, fewest = None, depth
        fn_ids, short = self._fn_ids, self._fn_short
        stalled = time.monotonic() - HEAD_STALLED
        for w in self._workers.values():
            n = len(w.inflight)
            if (
                n < fewest
                and w.queued <= room
                and w.kill is None
                and (w.calls_left is None or w.calls_left > 0)
                and fn_id in w.functions
                and w.head_started > stalled
            ):
                if n:  # what it runs now: a call of a function measured short
                    head = w.inflight[0].fn
                    cost = short.get(fn_id if head is call.fn else fn_ids.get(id(head), -1))
                    if cost is None or cost >= SHORT_CALL:
                        continue
                best, fewest = w, n
        return best

    def _reclaim(self, now: float) -> float | None:
        """A worker is idle while another's current call has run ``HEAD_STALLED`` with
        prefetched calls queued behind it: ask that worker for them back.

        A queue cannot be taken back from a pipe, and a call of a function
        measured tiny may still block (I/O, a lock, a rare slow input): the
        calls behind it waited for it while a worker stood idle (SPEC: a ready
        node goes to a free worker). The worker's watchdog thread answers at
        once, whatever its call is doing (unless it holds the GIL in C code),
        with those it has not started; its loop then skips them, and they come
        back here as REQUEUE, to run on the free worker. Returns when to look
        again: the time a head not yet stalled would be.
        """
        stalled, again = now - HEAD_STALLED, None
        for w in self._workers.values():
            if len(w.inflight) < 2 or w.asked or w.ctrl < 0 or w.kill is not None:
                continue
            if w.head_started > stalled:
                when = w.head_started + HEAD_STALLED
                again = when if again is None else min(again, when)
                continue
            wanted = [c for c in itertools.islice(w.inflight, 1, RECLAIM_MAX + 1) if c.seq]
            if not wanted:
                continue
            request = " ".join(f"{c.seq}:{id(c)}" for c in wanted) + "\n"
            try:
                os.write(w.ctrl, request.encode())
            except OSError:  # (its pipe full or gone: it is not answering anyway)
                continue
            w.asked = True
        return again

    def new_run(self) -> None:
        """A run starts on this pool (its lease opens): functions it calls are
        pickled again at their first call in it (see :meth:`_function_id`)."""
        self._runs += 1

    def _function_id(self, fn: Any) -> int:
        runs = self._runs
        if fn is self._last_fn and self._last_run == runs:  # nothing to move or check
            return self._last_id
        key = id(fn)
        fn_id = self._fn_ids.get(key)
        if fn_id is not None:
            self._fn_keep.move_to_end(fn_id)
            if self._fn_made[fn_id] != runs:
                self._fn_made[fn_id] = runs
                self._pickle_again(fn_id, fn)
        else:
            fn_id = self._fn_ids[key] = next(self._fn_counter)
            self._fn_keep[fn_id] = fn  # keeps id(fn) from being reused while we map it
            self._fn_made[fn_id] = runs
            self._fn_names[fn_id] = _names(fn)
            self._fn_blobs[fn_id] = dumps_function(fn)
        self._last_fn, self._last_id, self._last_run = fn, fn_id, runs
        return fn_id

    def _pickle_again(self, fn_id: int, fn: Any) -> None:
        """The first call of a known function in a new run: pickle it again if what
        it names was rebound since.

        A function of a script or a notebook (``__main__``) travels by value, with
        the globals and helpers it names as they are when it is pickled: a warm
        pool that kept its first pickle ran a notebook's old constant or helper
        after the cell that changed it, with no sign of it. Pickling each function
        again in every run costs what its globals cost (a 200 MB array it names:
        0.2 s a run), so a run first compares the objects it names, by identity
        (:func:`_names`: a few µs), and pickles it again only if one was rebound
        (``OFFSET = 100``, a helper redefined); a value changed in place is not
        seen (pass such a value as an argument). A pickle that changed is sent to
        the workers again under the same id, each loading it with its next call
        of it; calls already queued on a worker, from a run before, run as they
        were sent (its old copy is forgotten after them).
        """
        names, before = _names(fn), self._fn_names[fn_id]
        if (
            names is not None
            and before is not None
            and len(names) == len(before)
            and all(a is b for a, b in zip(names, before))
        ):
            return
        self._fn_names[fn_id] = names
        blob = dumps_function(fn)
        old = self._fn_blobs[fn_id]
        if blob == old or (isinstance(blob, BaseException) and isinstance(old, BaseException)):
            return
        self._fn_blobs[fn_id] = blob
        for w in self._workers.values():
            if fn_id in w.functions:
                # Forgotten with the next function message, after the calls already
                # in its pipe; a worker sent none keeps no stale copy (evictions
                # only tell the workers that still have an id).
                w.functions.discard(fn_id)
                w.loading.discard(fn_id)
                w.forget.append(fn_id)

    def _evict_functions(self) -> None:
        """Forget the least recently used functions, down to 3/4 of ``FUNCTIONS_KEPT``.

        A warm pool that gets a new lambda or ``functools.partial`` every
        compute would otherwise keep them all, here and in every worker. Never
        a function whose id a message still names: one queued or running on a
        worker (``inflight``: prefetched and chained calls too) or one
        ``submit`` refused, which comes back with its message. Evicting well
        below the cap batches the work and the workers' forget lists.
        """
        excess = len(self._fn_keep) - (FUNCTIONS_KEPT - FUNCTIONS_KEPT // 4)
        if excess <= 0:
            return
        busy: set[int | None] = set(self._refused.values())
        for w in self._workers.values():
            for call in w.inflight:
                busy.add(self._fn_ids.get(id(call.fn)))
        victims = []
        for fn_id in self._fn_keep:  # oldest use first
            if fn_id not in busy:
                victims.append(fn_id)
                if len(victims) == excess:
                    break
        self._last_fn = None
        for fn_id in victims:
            del self._fn_ids[id(self._fn_keep.pop(fn_id))]
            del self._fn_blobs[fn_id]
            del self._fn_made[fn_id]
            del self._fn_names[fn_id]
            self._fn_short.pop(fn_id, None)
            self._fn_bytes.pop(fn_id, None)
            for w in self._workers.values():
                if fn_id in w.functions:
                    w.functions.discard(fn_id)
                    w.loading.discard(fn_id)
                    w.forget.append(fn_id)

    def _message(self, call: Call, fn_id: int, prev: Call | None = None) -> tuple:
        """The ``run`` message of ``call`` but its last field (``_wire`` adds it).

        ``prev``: the call before it in its chain, which keeps its input.
        """
        blob = self._fn_blobs[fn_id]
        if isinstance(blob, BaseException):
            raise function_error(call.name, blob)
        if not call.inputs:  # (a root task: no list to build, nor to collect)
            try:
                args = encode_call(call.args, call.kwargs, call.has_nodes)
            except Exception as exc:
                raise arguments_error(call, exc, "a worker") from None
            cache = None if call.cache is None else self._cache_field(call)
            return ("run", id(call), fn_id, call.name, args, (), cache)
        deps: list[tuple] = []
        others = None  # inputs that are not a worker's value: pickled below
        for i, h in call.inputs.items():
            if type(h) is Payload:  # a worker's value, forwarded as it came
                deps.append((i, (h.data, h.segments)))
            elif h is HELD:  # kept by the worker, by the call before this one
                if prev is None or prev.node != i:
                    raise RuntimeError(
                        f"the input of {call.name} from node {i} was kept "
                        "by a worker and is gone; this is a bug"
                    )
                deps.append((i, None, id(prev)))
            elif others is None:
                others = [(i, h)]
            else:
                others.append((i, h))
        try:
            args = encode_call(call.args, call.kwargs, call.has_nodes)
            if others is not None:
                deps += [(i, as_wire(h)) for i, h in others]
        except Exception as exc:
            raise arguments_error(call, exc, "a worker") from None
        cache = None if call.cache is None else self._cache_field(call)
        return ("run", id(call), fn_id, call.name, args, deps, cache)

    def _cache_field(self, call: Call) -> tuple[int, str, float | None]:
        """A cached call's ``cache`` as its run message carries it: ``(context, key,
        expires)``, the context (cache dir, task name) by its id (``call.context``).

        The worker needs them only to write a large value's entry itself; sent
        whole with every call, they made a tiny call's message three times as
        long (180 bytes against 60), and a first cached run of 100,000 tiny
        tasks a tenth slower: longer pickles both ways, and full pipes.
        """
        assert call.cache is not None
        root, key, meta = call.cache
        context = (root, str(meta.get("task", "?")))
        cid = self._contexts.get(context)
        if cid is None:
            cid = self._contexts[context] = len(self._context_messages)
            self._context_messages.append(pickle.dumps(("cache", cid, *context)))
        call.context = cid
        return (cid, key, meta.get("expires"))

    def _tell_context(self, worker: _Worker, cid: int) -> bytes:
        """The message that tells ``worker`` the cache context ``cid``, which it is
        taken to know from now on: the caller sends it ahead of the call naming it."""
        worker.contexts.add(cid)
        return self._context_messages[cid]

    def poll(self, timeout: float | None) -> list[tuple[Call, int, Any]]:
        if self._guard.unreaped:
            self._guard.reap()
        while self._batching:
            self._flush(self._batching[-1])
        if self._outbox:
            timeout = 0.0
        now = time.monotonic()
        wake = None if timeout is None else now + timeout
        if self._idle and len(self._workers) > 1:
            again = self._reclaim(now)
            if again is not None:
                wake = again if wake is None else min(wake, again)
        deadline = self._deadlines.next()
        if deadline is not None:
            wake = deadline if wake is None else min(wake, deadline)
        # (calls of a shared pool's runs carry their own limit: Call.memory_limit)
        if (self._memory_limit is not None or self.limited_runs) and any(
            w.inflight for w in self._workers.values()
        ):
            wake = self._next_sample if wake is None else min(wake, self._next_sample)
        waitables = [self._wake_r, *self._waitables]
        # In slices in the main thread: a Ctrl-C the kernel hands to another
        # thread of this process (a progress bar's, the user's) does not
        # interrupt this wait; back in Python every slice, the KeyboardInterrupt
        # is raised. Another thread (an eager session's scheduler) never gets
        # KeyboardInterrupt itself: it sleeps until a pipe or the wakeup speaks.
        in_main = threading.current_thread() is threading.main_thread()
        while True:
            if wake is None and not in_main:
                ready = mp_wait(waitables)
                break
            left = SIGNAL_SLICE if wake is None else wake - time.monotonic()
            ready = mp_wait(waitables, max(0.0, min(left, SIGNAL_SLICE) if in_main else left))
            if ready or (wake is not None and (left <= SIGNAL_SLICE or not in_main)):
                break
        dead = []
        for obj in ready:
            if obj is self._wake_r:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
                continue
            found = self._waitables.get(obj)
            if found is None:
                continue
            w = found
            if obj is w.conn:
                if not self._drain(w):
                    dead.append(w)
            elif w not in dead:
                # The server's first answer is the pid (read now if nobody has:
                # another thread's multiprocessing._cleanup() may have, since):
                # only a sentinel still readable after it says the worker died.
                if w.pid is not None and not mp_wait([obj], 0):
                    continue
                dead.append(w)
        for w in dead:
            self._bury(w)
        self._check_deadlines()
        if self._memory_limit is not None or self.limited_runs:
            self._check_memory()
        outcomes, self._outbox = self._outbox, []
        return outcomes

    def _drain(self, w: _Worker) -> bool:
        """Read every reply waiting on ``w``'s pipe; False if the pipe is closed."""
        if w.sock is not None:
            return self._drain_burst(w, w.sock)
        try:
            while w.conn.poll():
                if not self._reply(w, pickle.loads(w.conn.recv_bytes())):
                    return False
        except (EOFError, OSError):
            return False
        return True

    def _drain_burst(self, w: _Worker, sock: socket.socket) -> bool:
        """``_drain`` in one read: every byte that has arrived, then each whole message.

        A poll and two reads per reply would cost more than the rest of the
        parent's work on a tiny call. The framing is multiprocessing's
        (``Connection.send_bytes``): a 4-byte big-endian length, or -1 and an
        8-byte one. A message not yet whole waits in ``w.rbuf`` for the next poll.
        """
        buf, scratch = w.rbuf, self._scratch
        open_ = True
        try:
            while True:
                n = sock.recv_into(scratch, BURST_BYTES, socket.MSG_DONTWAIT)
                if not n:
                    open_ = False
                    break
                buf += scratch[:n]
                if n < BURST_BYTES:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            open_ = False
        pos, end = 0, len(buf)
        try:
            while end - pos >= 4:
                (size,) = _HEADER.unpack_from(buf, pos)
                start = pos + 4
                if size == -1:
                    if end - pos < 12:
                        break
                    (size,) = _LONG_HEADER.unpack_from(buf, start)
                    start += 8
                if end - start < size:
                    break
                pos = start + size
                if not self._reply(w, pickle.loads(buf[start:pos])):
                    return False
        finally:
            del buf[:pos]
        return open_

    def _reply(self, w: _Worker, message: tuple) -> bool:
        """Apply one message of ``w``; False if it broke the protocol (``w`` is being killed)."""
        if message[0] == "loaded":
            # The worker is up and has the function of the call it runs next (its
            # messages come in order, so any call before that one has answered):
            # that call's timeout starts now.
            w.loading.discard(message[1])
            w.head_started = time.monotonic()
            self._arm(w)
            return True
        if message[0] == "ready":  # its initializer succeeded
            w.ready = True
            self._init_failures = 0
            return True
        if message[0] == "returned":  # prefetched calls it gave back (_reclaim)
            w.asked = False
            given = set(message[1])
            # The head too: the worker may have answered the call ahead of it and
            # given this one back before taking it (its answer was read first).
            head = w.inflight[0] if w.inflight else None
            for call in [c for c in w.inflight if id(c) in given]:
                call.seq = 0
                w.inflight.remove(call)
                w.queued -= len(call.wire or b"")
                if w.calls_left is not None:
                    w.calls_left += 1
                self._outbox.append((call, REQUEUE, None))
            if head is not None and (not w.inflight or w.inflight[0] is not head):
                w.head_started = time.monotonic()  # the next call starts now
                self._arm(w)
            # Answered all its calls before this came (an empty answer, late): idle now.
            self._maybe_free(w)
            return True
        if message[0] == "initfail":
            # The worker exits after this; _bury gives its calls back, or fails
            # them once the initializer has failed INIT_ATTEMPTS times in a row.
            _, exc_blob, tb, summary = message
            self._init_failed(
                w, load_exception(exc_blob, tb, f"initializer {self._init_name}", summary)
            )
            return False
        if not w.inflight or message[1] != id(w.inflight[0]):
            # A reply nobody waits for: never guess which node it belongs to. The
            # likely cause is a task that forked without exec, its child running on
            # into the worker loop; the worker's own guard normally stops that.
            if w.inflight and w.kill is None:
                head = w.inflight[0]
                w.kill = (
                    head,
                    WorkerCrashed(
                        f"the worker running {head.name} sent a reply out of turn (did the task "
                        "fork a child that returned instead of ending with os._exit?); the "
                        "worker was killed and replaced",
                        node=head.name,
                    ),
                )
            self._kill(w)
            return False
        call = w.inflight.popleft()
        w.queued -= len(call.wire or b"")
        w.head_started = time.monotonic()
        if message[0] == "ok":  # the common case first
            _, _, blob, started, finished = message
            call.started, call.finished = started, finished
            data, segments = blob
            value = Payload(data) if not segments else Payload.from_wire(blob)
            # (_learn, inlined)
            fn_id = self._fn_ids.get(id(call.fn))
            if fn_id is not None:
                took = finished - started
                # Its largest value bounds how many of its calls are queued
                # (_prefetch_target): they make their values all at once,
                # breadth-first, each held until its dependents ran.
                if (segments or len(data) > PREFETCH_SMALL_VALUE) and value.nbytes > (
                    self._fn_bytes.get(fn_id, 0)
                ):
                    self._fn_bytes[fn_id] = value.nbytes
                before = self._fn_short.get(fn_id)
                self._fn_short[fn_id] = (
                    took if before is None or took > before else (before + took) / 2
                )
            self._outbox.append((call, OK, value))
        elif message[0] == "held":
            _, _, call.started, call.finished = message
            self._learn(call)
            if w.kill is not None and w.kill[0] is call:
                # Killed for this call (its timeout, memory) as it finished: the
                # value it kept dies with the worker, so the kill's verdict stands.
                self._outbox.append((call, ERROR, w.kill[1]))
            else:
                self._outbox.append((call, OK, HELD))
        elif message[0] == "skip":  # its chain broke before it: the scheduler decides
            self._outbox.append((call, REQUEUE, None))
        else:
            _, _, _stage, exc_blob, tb, call.started, call.finished, summary, *back = message
            if back:
                take_back(call, back[0])
            self._learn(call)
            self._outbox.append((call, ERROR, load_exception(exc_blob, tb, call.name, summary)))
        inflight = w.inflight
        self._maybe_free(w)
        # Only a call with a timeout is armed: when neither the call answered nor
        # the one now running has one, nothing changes (see _arm).
        if call.timeout is not None or (inflight and inflight[0].timeout is not None):
            self._arm(w)
        return True

    def _maybe_free(self, w: _Worker) -> None:
        """``w`` has answered or given back all its calls: idle, or retired once it may
        take no more. Not while its answer to a give-back is due (``asked``): an idle
        worker has nothing to say (``_idle_worker`` takes a readable pipe for its
        death), and the answer frees it."""
        if not w.inflight and w.kill is None and not w.asked:
            if w.calls_left == 0:
                self._retire(w)
            else:
                self._idle.append(w)

    def _learn(self, call: Call) -> None:
        fn_id = self._fn_ids.get(id(call.fn))
        if fn_id is not None:
            took = call.finished - call.started
            before = self._fn_short.get(fn_id)
            # Up at once (a slow call stops prefetch), down gently (one quick call
            # after slow ones does not fill a queue).
            self._fn_short[fn_id] = took if before is None or took > before else (before + took) / 2

    def _bury(self, w: _Worker) -> None:
        """A worker died: fail the call it was running, give back the ones queued."""
        self._drain(w)  # replies sent before it died still count
        w.process.join(STOP_TIMEOUT)
        if w.process.exitcode is None:
            self._kill(w)
            w.process.join(STOP_TIMEOUT)
        exitcode = w.process.exitcode
        _kill_group(w.pid)  # a crashed task's subprocesses would outlive it, orphaned
        if w.pending and len(w.pending) >= len(w.inflight):
            # Its running call was answered and the rest never left here: none started.
            w.pending.clear()
            for call in w.inflight:
                self._outbox.append((call, REQUEUE, None))
            w.inflight.clear()
        if (
            self._init is not None
            and not w.ready
            and w.init_error is None
            and w.kill is None
            and w.pid is not None
            and not self._exiting
        ):
            # It died before its initializer returned (os._exit, a crash in a C
            # extension): the initializer's failure, as if it had raised, not a crash
            # of the call it was sent.
            self._initializer_died(w, exitcode)
        if w.inflight and w.init_error is not None:
            # None of its calls started: the initializer failed before them. Once
            # the pool is broken they fail, unless a live worker is left to take
            # them (calls prefetched behind this one's first belong to no one).
            for call in w.inflight:
                if self._broken is not None and not self._workers.keys() - {w.id}:
                    call.started = call.finished = time.time()
                    self._outbox.append((call, ERROR, self._initializer_error(call)))
                else:
                    self._outbox.append((call, REQUEUE, None))
            w.inflight.clear()
        if w.inflight and self._exiting:  # (_end_at_exit) killed: the program exits
            _date_head(w)
            for call in w.inflight:
                call.finished = time.time()
                self._outbox.append((call, ERROR, did_not_finish(call, PROGRAM_EXITED)))
            w.inflight.clear()
        if w.inflight:
            _date_head(w)
            head = w.inflight.popleft()
            head.finished = time.time()
            if w.kill is None:
                loading = self._fn_ids.get(id(head.fn)) in w.loading
                if w.pid is None:  # never forked: see _ForkServerPopen
                    error = _unforked_error(head, self.start_method)
                else:
                    error = _crash_error(head, exitcode, loading)
                self._outbox.append((head, ERROR, error))
            elif w.kill[0] is head:
                self._outbox.append((head, ERROR, w.kill[1]))
            else:  # killed for a call that finished just in time: this one never ran
                head.started = head.finished = 0.0
                self._outbox.append((head, REQUEUE, None))
            for call in w.inflight:
                self._outbox.append((call, REQUEUE, None))
            w.inflight.clear()
        self._forget(w)
        _shm.sweep(_shm.worker_prefix(os.getpid(), self.id, w.id))

    def _initializer_died(self, w: _Worker, exitcode: int | None) -> None:
        """``w`` ended inside the pool's initializer: an initializer failure."""
        code, signal_name, advice = _exit_words(exitcode)
        error = WorkerCrashed(
            f"the pool's initializer {self._init_name} ended its worker process before "
            f"returning ({code}: {advice})",
            exitcode=exitcode,
            signal_name=signal_name,
        )
        self._init_failed(w, error)

    def _init_failed(self, w: _Worker, error: BaseException) -> None:
        """The initializer failed in ``w`` (it raised, or ended the process): its calls
        go to another worker, until INIT_ATTEMPTS failures in a row break the pool."""
        w.init_error = error
        self._init_failures += 1
        if self._init_failures >= INIT_ATTEMPTS and self._broken is None:
            self._broken = error

    def _deadline(self, w: _Worker) -> float | None:
        """When the call ``w`` runs must be done (monotonic), or None for no timeout.

        Starting a worker and loading a call's function (its imports) do not
        count against the call's timeout — a task that imports for longer than
        its timeout could otherwise never succeed — but are bounded too.
        """
        head = w.inflight[0]
        if head.timeout is None:
            return None
        if w.loading and self._fn_ids.get(id(head.fn)) in w.loading:
            return w.head_started + head.timeout + LOAD_ALLOWANCE
        return w.head_started + head.timeout

    def _arm(self, w: _Worker) -> None:
        """Track when ``w``'s running call must be done (after its head or start changed)."""
        deadline = self._deadline(w) if w.inflight and w.kill is None else None
        if deadline is None:
            self._deadlines.discard(w.id)
        else:
            self._deadlines.set(w.id, deadline)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for wid in self._deadlines.expired(now):
            w = self._workers.get(cast(int, wid))
            if w is None or not w.inflight or w.kill is not None:
                continue
            deadline = self._deadline(w)
            if deadline is not None and now < deadline:  # moved later since it was armed
                self._deadlines.set(w.id, deadline)
            elif deadline is not None:
                head = w.inflight[0]
                how = "its worker was killed and replaced"
                if self._fn_ids.get(id(head.fn)) in w.loading:
                    how = (
                        f"its worker was still starting or loading the function after "
                        f"{(head.timeout or 0.0) + LOAD_ALLOWANCE:g} s; it was killed and replaced"
                    )
                w.kill = (head, timeout_error(head, how))
                self._kill(w)
                self._bury(w)

    def _check_memory(self) -> None:
        now = time.monotonic()
        if now < self._next_sample:
            return
        self._next_sample = now + MEMORY_SAMPLE_INTERVAL
        for w in list(self._workers.values()):
            if not w.inflight or w.kill is not None:
                continue
            head = w.inflight[0]
            limit = head.memory_limit if head.memory_limit is not None else self._memory_limit
            memory = self._rss_over_limit(w, limit)
            if memory is not None:
                rss = memory.rss
                shared = getattr(memory, "shared", 0)  # (Linux: mapped files, shared memory)
                # RSS counts pages the worker shares: inputs mapped from /dev/shm, libraries
                of_which = (
                    f", of which {size_text(shared, binary=True)} are pages it shares (its "
                    "inputs mapped from shared memory, libraries), which RSS counts"
                    if shared > rss // 4
                    else ""
                )
                error = MemoryLimitExceeded(
                    f"{head.name} used {size_text(rss, binary=True)} of memory (RSS of its "
                    f"worker{of_which}), over memory_limit={size_text(limit or 0)} "
                    f"({size_text(limit or 0, binary=True)}); the worker was killed and "
                    "replaced. Reduce the task's memory use, split its input, or raise "
                    "memory_limit=",
                    node=head.name,
                    limit=limit,
                    rss=rss,
                )
                w.kill = (head, error)
                self._kill(w)
                self._bury(w)

    def wakeup(self) -> None:
        """Make a blocked :meth:`poll` return (called from another thread)."""
        try:
            self._wake_w.send_bytes(b"")
        except OSError:
            pass

    def cancel_running(self) -> list[Call]:
        """Kill every busy worker; return the calls they held (none of them finished)."""
        cancelled: list[Call] = []
        busy = [w for w in self._workers.values() if w.inflight]
        for w in busy:
            self._kill(w)
        for w in busy:
            w.process.join(STOP_TIMEOUT)
            _date_head(w)  # (the calls queued behind it never started: started stays 0)
            cancelled.extend(w.inflight)
            w.inflight.clear()
            self._forget(w)
        self._outbox = [o for o in self._outbox if o[1] != REQUEUE]
        return cancelled

    # -- a pool shared by several runs (shared.py) -----------------------------

    def cancel_where(self, mine: Callable[[Call], bool]) -> list[Call]:
        """Stop the calls ``mine`` picks (one run's, on a shared pool); return them.

        A worker whose running call is picked is killed; the calls of other
        runs queued behind it there come back as REQUEUE outcomes, untouched.
        A picked call queued behind another run's call is left to run: its
        outcome comes back as usual, and the caller drops it.
        """
        busy = [w for w in self._workers.values() if w.inflight and mine(w.inflight[0])]
        for w in busy:
            self._kill(w)
        cancelled: list[Call] = []
        for w in busy:
            w.process.join(STOP_TIMEOUT)
            _date_head(w)
            for call in w.inflight:
                if mine(call):
                    cancelled.append(call)
                else:
                    self._outbox.append((call, REQUEUE, None))
            w.inflight.clear()
            self._forget(w)
        self._outbox = [o for o in self._outbox if not (o[1] == REQUEUE and mine(o[0]))]
        return cancelled

    def withdraw(self, call: Call) -> None:
        """A call ``submit`` refused will not be offered again (its run ended)."""
        self._refused.pop(id(call), None)


class _Guard:
    """A ``/bin/sh`` process that kills the pool's workers if this process dies.

    Each worker also watches for that with a thread, but a thread needs the
    GIL: a task stuck in C code that holds it (a catastrophic regex, a long C
    loop) would keep its worker alive, orphaned, for as long as that call
    lasts. The guard learns the workers' pids over a pipe: each worker
    writes its own ``+pid`` line first thing, before it can run a call,
    through a duplicate of the pipe it then closes (this process learns a
    forkserver worker's pid only when it next polls), and this process
    writes ``-pid`` once a worker is gone. End of file without ``bye`` means
    we are gone (SIGKILL, a hard crash): it lists the workers' descendants by
    parentage (``/proc/*/stat``, before any dies: a task's subprocess may have
    left the group with ``setsid``), kills each worker's process group and
    those descendants, and removes our shared memory.
    A shell rather than Python: it starts in about a millisecond, shares no
    memory with us and waits in ``read``, without polling. It runs in its own
    session, detached (so not a child of ours), ignoring Ctrl-C; the shell
    that starts it exits at once, and is reaped at the pool's next poll.
    """

    SCRIPT = r"""
    exec 3<&0
    (
      trap '' INT HUP TERM
      groups=""
      while IFS= read -r line; do
        case $line in
          bye) exit 0 ;;
          +*) groups="$groups ${line#+}" ;;
          -*) keep=""
              for g in $groups; do [ "$g" = "${line#-}" ] || keep="$keep $g"; done
              groups=$keep ;;
        esac
      done
      prefix=$1
      found=$groups; tree=""
      while [ -n "$found" ]; do
        tree="$tree $found"; next=""
        for f in /proc/[0-9]*/stat; do
          { read -r s < "$f"; } 2>/dev/null || continue
          set -- ${s##*") "}
          case " $found " in *" $2 "*) p=${f#/proc/}; next="$next ${p%/stat}" ;; esac
        done
        found=$next
      done
      for g in $groups; do kill -s KILL -- "-$g" || kill -s KILL "$g"; done
      for p in $tree; do kill -s KILL "$p"; done
      rm -f /dev/shm/"$prefix"*
    ) <&3 >/dev/null 2>&1 &
    """

    def __init__(self, label: str) -> None:
        self._label = label  # names the pool on the guard's command line (ps)
        self._shell: subprocess.Popen[bytes] | None = None
        self._pipe: Any = None
        self._read_end = -1  # the shell's input, until the shell has it
        self.unreaped = False  # the shell that started the guard is still our child

    def open(self) -> None:
        """Make the shell's input pipe, if not yet: a worker may write its ``+pid``
        line there before the shell runs (the pipe keeps it)."""
        if self._shell is None and self._pipe is None and os.path.exists("/bin/sh"):
            r, w = os.pipe()  # (both close on exec)
            # (closed by close(), or by start() if the shell cannot start)
            self._read_end, self._pipe = r, open(w, "wb", buffering=0)  # noqa: SIM115

    def start(self) -> None:
        """Start the shell on the pipe of :meth:`open`, if not yet."""
        if self._shell is not None or self._read_end < 0:
            return
        try:
            self._shell = subprocess.Popen(
                [
                    "/bin/sh",
                    "-c",
                    self.SCRIPT,
                    "graphexec-guard",
                    f"gx-{os.getpid()}-",
                    self._label,
                ],
                stdin=self._read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.unreaped = True
        except BaseException as exc:
            # No guard (the workers' own watchdogs still work), never half of one: a
            # pipe without its reader would take the +pid lines of later workers.
            self._shell = None
            self._pipe.close()  # a worker's line, or ours, then fails at once (EPIPE)
            self._pipe = None
            if not isinstance(exc, OSError):
                raise  # (an interrupt: the pool is being stopped)
        finally:
            os.close(self._read_end)
            self._read_end = -1

    def reap(self) -> None:
        """Reap the shell that started the guard once it has exited (it forks the guard
        and exits at once). Not waited for in :meth:`start`, on a cold compute's
        critical path: the pool calls this at each poll, and at the end of each run,
        until it is done."""
        if self._shell is None or self._shell.poll() is not None:
            self.unreaped = False

    def remove(self, pid: int) -> None:
        self._tell(f"-{pid}")

    def fileno(self) -> int | None:
        """The write end of the shell's input (a worker writes its own ``+pid`` line), or None."""
        if self._pipe is None:
            return None
        try:
            return int(self._pipe.fileno())
        except (OSError, ValueError):
            return None

    def _tell(self, line: str) -> None:
        if self.unreaped:
            self.reap()
        if self._pipe is None:
            return
        try:
            self._pipe.write(f"{line}\n".encode())
            self._pipe.flush()
        except (OSError, ValueError):
            self._pipe = None

    def close(self) -> None:
        """Dismiss the guard (the pool stopped its workers itself)."""
        self._tell("bye")
        if self._read_end >= 0:  # opened, never started (the worker's start failed)
            os.close(self._read_end)
            self._read_end = -1
        if self._pipe is not None:
            try:
                self._pipe.close()
            except OSError:
                pass
            self._pipe = None
        if self._shell is not None:
            try:
                self._shell.wait(STOP_TIMEOUT)  # the shell that started the guard
            except subprocess.TimeoutExpired:
                pass
            self._shell = None


def _date_head(w: _Worker) -> None:
    """Date the start of ``w``'s running call, which has not replied (it started
    when its predecessor ended, or when its function loaded): for its attempt."""
    head = w.inflight[0]
    if not head.started:
        head.started = time.time() - (time.monotonic() - w.head_started)


def _wire(message: tuple, hold: bool) -> bytes:
    """A ``run`` message as sent: ``hold`` says whether the worker keeps the result."""
    return pickle.dumps((*message, hold), protocol=5)


def _kill_group(pid: int | None) -> None:
    """SIGKILL what is left of a dead worker's process group (it led the group).

    While any member is alive the kernel keeps the group's id (the worker's
    pid) from being reused, so this reaches only the task's processes; an
    empty group is simply gone (ESRCH). Only a pid recycled in the moment
    since the worker died, by a process that leads its own group, could be hit.
    """
    if pid is None or pid <= 1:  # never forked (killpg of 0 would be our own group)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _names(fn: Any) -> tuple[Any, ...] | None:
    """What ``fn`` names, or None when that cannot be told from its code alone.

    The objects the function reads, as cloudpickle will send them: the globals
    its code names (and the code of the functions and lambdas inside it), its
    closure's values and its defaults; and the same, each once, of what travels
    with it by value among them: functions of the script (a helper, a helper's
    helper, a task's function), partials, methods, and the items of lists,
    tuples, sets and dicts. A function or class a worker imports by name is
    not walked: the worker's module is what it runs. Compared by identity with
    what an earlier call gave, it tells whether a name was rebound since (a
    value changed in place stays the same object). The objects themselves are
    kept, not their ids: a rebound name's old object, freed, could leave its
    id to the new one.

    None (the caller then pickles the function each run and compares the
    pickles, as exact as it is dear) for what this walk cannot see through: a
    class of the script, or an object of one (its methods read globals too), a
    callable object, a container of over ``NAMES_CONTAINER_MAX`` items, more
    than ``NAMES_FUNCTIONS_MAX`` functions or ``NAMES_VALUES_MAX`` objects, or
    a walk that fails (an odd callable).
    """
    try:
        return _walk_names(fn)
    except Exception:
        return None


NAMES_FUNCTIONS_MAX = 200
NAMES_VALUES_MAX = 20_000
NAMES_CONTAINER_MAX = 10_000
_PLAIN_VALUES = (str, bytes, int, float, complex, bool, type(None), types.ModuleType)


def _walk_names(fn: Any) -> tuple[Any, ...] | None:
    seen: list[Any] = []
    todo, visited, functions = [fn], set(), 0
    while todo:
        value = todo.pop()
        if id(value) in visited:
            continue
        visited.add(id(value))
        seen.append(value)
        if len(visited) > NAMES_VALUES_MAX:
            return None
        if isinstance(value, _PLAIN_VALUES) or type(value) is types.BuiltinFunctionType:
            continue
        if isinstance(value, Task):
            todo.append(value.fn)
        elif type(value) is BoundTask:
            todo += [value.task, value.instance]
        elif isinstance(value, functools.partial):
            todo += [value.func, *value.args, *value.keywords.values()]
        elif type(value) is types.MethodType:
            todo += [value.__func__, value.__self__]
        elif type(value) is types.FunctionType:
            if _travels_by_name(value):
                continue  # the worker imports it: its module's globals are the worker's
            functions += 1
            if functions > NAMES_FUNCTIONS_MAX:
                return None
            glob = value.__globals__
            codes = [value.__code__]
            while codes:
                code = codes.pop()
                for name in code.co_names:
                    found = glob.get(name, _MISSING)
                    if found is not _MISSING:
                        todo.append(found)
                codes.extend(k for k in code.co_consts if isinstance(k, types.CodeType))
            for cell in value.__closure__ or ():
                try:
                    todo.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    continue
            todo += value.__defaults__ or ()
            todo += (value.__kwdefaults__ or {}).values()
        elif isinstance(value, (tuple, list, set, frozenset, dict)):
            if len(value) > NAMES_CONTAINER_MAX:
                return None
            todo += value.values() if isinstance(value, dict) else value
        elif isinstance(value, type):
            if not _travels_by_name(value):
                return None  # a class of the script: pickled with its methods
        elif not _travels_by_name(type(value)) or callable(value):
            return None  # an object of a script's class, or a callable object
    return tuple(seen)


def _travels_by_name(obj: Any) -> bool:
    """Whether cloudpickle sends ``obj`` (a function or a class) by reference: its
    module imports in the worker and names it there by its qualified name."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<locals>" in qualname:
        return False
    if pickled_by_value(module):
        return False
    found: Any = sys.modules[module]
    for part in qualname.split("."):
        found = getattr(found, part, _MISSING)
        if found is _MISSING:
            return False
    return found is obj


_MISSING = object()


EXIT_RUN_WAIT = 5.0  # seconds the exit waits for a run it ended to let go of its pool


# Why a run's calls fail when the program exits under it (here, and shared.py's)
PROGRAM_EXITED = (
    "the program exited while it was pending or running (a compute or a flow in a "
    "daemon thread, or one a Ctrl-C left running): join the threads that compute "
    "before the program ends"
)


def did_not_finish(call: Call, why: str) -> WorkerCrashed:
    """The error of a call its pool ended before it did (closed, the program exiting):
    not retryable, as every attempt would end so."""
    return WorkerCrashed(f"{call.name} did not finish: {why}", node=call.name, retryable=False)


def _exit_words(exitcode: int | None) -> tuple[str, str | None, str]:
    """``("exit code -11, SIGSEGV", "SIGSEGV", advice)`` for a worker's exit code."""
    signal_name, advice = describe_exitcode(exitcode)
    return (
        f"exit code {exitcode}" + (f", {signal_name}" if signal_name else ""),
        signal_name,
        advice,
    )


def _crash_error(call: Call, exitcode: int | None, loading: bool = False) -> WorkerCrashed:
    code, signal_name, advice = _exit_words(exitcode)
    if loading:
        what = (
            f"the worker process that was to run {call.name} died while starting or "
            f"loading the task's function, before running it ({code}: {advice}). Is "
            "every module the function needs importable, without crashing, in a fresh "
            "process?"
        )
    else:
        what = f"the worker process running {call.name} died ({code}: {advice})."
    # isolate=True needs a worker process per call: sync would refuse it
    see = (
        "replay it (run.replay runs a crashed node in a fresh subprocess first)"
        if call.isolate
        else "compute with scheduler='sync'"
    )
    return WorkerCrashed(
        f"{what} Only this node failed; the worker was replaced. To see the crash "
        f"in-process, {see}",
        node=call.name,
        exitcode=exitcode,
        signal_name=signal_name,
    )


def _sure_roots(run: Any, most: int) -> int:
    """How many of the run's first calls surely go to a worker at once (at most ``most``).

    Its roots among the first ``ROOTS_SCAN`` members (post order puts a graph's
    roots first) that nothing may hold back: no cache to look up first (a
    hit needs no worker), no isolation (a worker of its own), no limit on
    how many run at once. "Started lazily, never more than there is work
    for" stays true: a chain gets one worker, a cached rerun none.
    """
    deps, opts = run.graph._deps, run.graph._opts
    n = 0
    for i in itertools.islice(run.members, ROOTS_SCAN):
        o = opts[i]
        if deps[i] or o.cache_key_fn is not None or o.isolate or o.max_concurrency or o.tags:
            continue
        n += 1
        if n >= most:
            break
    return n


class _InheritedFd:
    """A file descriptor of this process that a worker inherits, as a plain int there.

    Pickled with the worker's arguments, it passes the descriptor as
    multiprocessing passes a ``Connection``'s (``reduction.DupFd``: the
    forkserver's or spawn's list of inherited descriptors), but leaves no
    object behind in the worker: only the number, which the worker closes.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_worker.inherited_fd, (reduction.DupFd(self.fd),))


def _abandon(process: Any) -> None:
    """Let go of a stopping worker of the zygote or the forkserver without joining it.

    The server is its parent and reaps it; the status it then writes on the
    sentinel nobody reads. The ``Process`` leaves multiprocessing's list of
    children (whose ``_cleanup``, at every process start, would poll it), so
    that dropping it here frees it, and its pipes close, at once. Not sooner:
    another thread's ``_cleanup`` may still hold it, and a sentinel closed
    under that thread could be a new worker's by the time it polls (the
    number reused), whose pid it would then read as this one's exit status.
    """
    multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]


def _unforked_error(call: Call, start_method: str) -> WorkerCrashed:
    server = "zygote" if start_method == "zygote" else "forkserver"
    return WorkerCrashed(
        f"graphexec's {server} (the process that starts the workers) ended before it "
        f"started the worker that was to run {call.name}, so it did not run. The "
        "operating system may have killed it (out of memory?); the next worker starts "
        "a new one. Only this node failed; give it retries= to run it again",
        node=call.name,
    )


class Lease:
    """A :class:`ProcessPool` as one run's executor (the engine's view of it).

    The hot methods are the pool's own, bound once: a lease adds no call per
    submit or poll. Values need no release here: a ``Payload``'s shared
    memory is recycled when the scheduler drops it.
    """

    def __init__(
        self, pool: ProcessPool, memory_limit: int | None, shutdown_on_close: bool
    ) -> None:
        self.pool = pool
        # Chains are off with memory_limit=: a chained call would start in a
        # worker whose memory the previous call left high, before the pool's
        # check between calls (ProcessPool._idle_worker) could replace it
        # without blaming anyone.
        self.capabilities = Capabilities(
            kills_calls=True,
            memory_limit=True,
            chains=memory_limit is None,
            isolates=True,
            slots=pool.workers,
        )
        self.submit = pool.submit
        self.poll = pool.poll
        self.wakeup = pool.wakeup
        self.cancel_running = pool.cancel_running
        self._shutdown = shutdown_on_close
        self._closed = False

    def open(self, run: Any) -> None:
        self.pool.new_run()
        if self._shutdown:
            # A compute's own pool: its first workers start now, while this
            # process orders the graph and builds the scheduler, not at the
            # first submit after that (about 1 ms of a 1,000-node graph, more
            # of a larger one, against 4 to 5 ms for a worker to boot).
            self.pool.start_workers(_sure_roots(run, self.pool.workers))

    def release(self, node: int, handle: Any) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.pool._release()
        finally:
            if self._shutdown:
                self.pool.shutdown(wait=False)


@atexit.register
def _close_forgotten_pools() -> None:
    # Runs before multiprocessing's own exit hook (registered earlier), which
    # would otherwise join our non-daemonic workers forever.
    for pool in list(_live_pools):
        owner = pool.at_exit() if pool.at_exit is not None else None
        if owner is not None:
            owner()
        elif pool._owner_lock.acquire(blocking=False):  # no run uses it
            pool._owner_lock.release()
            pool.shutdown()
        else:
            pool._end_at_exit()
