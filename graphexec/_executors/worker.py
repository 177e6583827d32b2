"""The worker process: receive one call at a time over its own pipe, run it, reply.

Messages (pickled tuples, one ``send_bytes`` each)::

    parent -> worker   ("fn", fn_id, fn_blob, origin, forget)  once per function and worker
                                                     (again when its pickle changed)
                       ("cache", context_id, cache_dir, task_name)
                                                     once per cache context and worker,
                                                     before the first call naming it
                       ("run", token, fn_id, node_name, args, deps, cache, hold)
                       ("batch", [run_message_bytes, ...])  several run messages, in order
                       ("stop",)
    worker -> parent   ("ready",)                    the pool's initializer ran (sent first)
                       ("initfail", exc_blob, traceback_text, (type_name, message))
                                                     it raised: the worker exits
                       ("loaded", fn_id)             the function is ready
                       ("ok",  token, result_blob, started, finished)
                       ("held", token, started, finished)  kept here for the next call
                       ("skip", token)                    its held input is not here
                       ("err", token, stage, exc_blob, traceback_text, started, finished,
                        (type_name, message)[, returned])

``forget`` lists the ids of functions the parent evicted from its registry
(an LRU, see ``ProcessPool._evict_functions``), or pickled anew
(``ProcessPool._pickle_again``), since this worker's last ``fn``: dropped
before the new one loads (so a function sent again replaces its old copy),
and this worker keeps no more functions than the parent does. Ids are never
reused.

``args`` are the call's arguments as ``encode_call`` writes them
(``_data/serialize.py``: a pickle with nodes as references, or plain values
with the positions of the nodes among them). ``deps`` is a list (a tuple
when empty) of
``(node_index, pickled_value)``, or ``(node_index,
None, token)`` for the value the call ``token`` kept here (``hold``: a chain,
see ``_call.py``); ``cache`` is None or
``(context_id, key, expires)``, the context (the cache directory and the
task's name) told before by a ``cache`` message (on its own, or earlier in
the same batch): the worker writes a large
cache entry itself, so those are written in parallel and the parent never
copies their buffers; a small one the parent stores from the reply's blob
(``_data/cache.py``).

Calls are run strictly in the order received, so the parent knows which call
a dead worker was running: the oldest one it has not answered.

``returned``, only for a failed call of a chain: the inputs this worker held
for it, pickled (``return_inputs``), so that the run keeps them for replay.

``stage`` says which step failed: ``function`` (unpickling the function),
``unpickle-arguments``, ``call`` (the task raised), ``result`` (pickling it).
An exception that will not survive the trip is replaced by a
:class:`RemoteError` carrying its type name, message and traceback text.

The worker leads its own process group, so a terminal's Ctrl-C reaches only
the parent (which then decides what to cancel), and a kill of the group also
takes any subprocess the task started. A watchdog thread ends the worker
within a second or so of the parent's death, even mid-task, with its
descendants (found by parentage: those that left the group too).

The pool's ``initializer`` (with its ``initargs``) runs once, before the
first message is read; everything it sets up — module globals, the
environment, the working directory — stays for every call this worker runs,
as anything a task leaves behind does (see ``max_calls``, ``isolate``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.util
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from typing import Any

from .._data import shm as _shm
from .._data.cache import stored_apart
from .._data.serialize import decode_call, dumps, dumps_value, loads_value
from .runtime import (
    Unloadable,
    UnloadableValue,
    arguments_unpickle_error,
    describe_exception,
    handover,
    invoke,
    load_function,
    pickle_exception,
    result_error,
    unloadable_error,
    write_cache,
)
from .threadlimits import apply_in_worker

WATCHDOG_INTERVAL = 0.5
# Seconds a stopped worker's exit (multiprocessing's finalizers, atexit hooks)
# may take before SIGALRM ends it: nobody joins a cold compute's workers.
STOP_GRACE = 2
_stopping = False  # told to stop: _end_group ends the process group at exit
_worker_pid = 0  # this worker's pid: a process with another one is a child a task forked
PARTIAL_LINE_MAX = 1024  # characters: an unfinished line longer than this is written out
ATOMIC_WRITE = 4096  # bytes: PIPE_BUF, the largest write a pipe never interleaves
# Seconds a whole line a task printed waits at most, gathered, before it is
# written: what a crash, a timeout's kill or os._exit() can lose of its output.
OUTPUT_DELAY = 0.1
FLUSH_LOCK_WAIT = 2.0  # seconds a flush waits for the stream's lock, at most

# Giving back queued calls (the pool's ``_reclaim``): the run messages this worker
# took from its pipe, in order (the pool numbers the calls it sends alike), and
# the numbers of those it gave back, to skip (see _give_back). The lock orders the
# replies the loop and the watchdog thread send on the one pipe.
_send_lock = threading.Lock()
_taken = 0
_skip: dict[int, int] = {}  # number -> id of the call given back

# This process's functions, by the parent's id (a module global so that a task,
# or a test, can see how many this worker holds).
functions: dict[int, Any] = {}
# Cache contexts by the parent's id: (cache directory, task name).
contexts: dict[int, tuple[str, str]] = {}


def main(
    conn: Any,
    worker_id: int,
    parent_pid: int,
    pool_id: int = 0,
    log_setup: tuple[int, str] | None = None,
    initializer: tuple[bytes, bytes, str | None] | None = None,
    thread_env: dict[str, str] | None = None,
    guard: Any = None,
    steal: Any = None,
) -> None:
    """Entry point of a worker process.

    ``log_setup``: the parent's root logging level and format, which tasks'
    log records follow here (see :func:`_mirror_logging`). ``initializer``:
    the pool's initializer and its arguments, pickled, and the initializer's
    source file. ``thread_env``: the thread-count variables of native libraries
    (``threadlimits.py``), set before the initializer and the first call run.
    ``guard``: a descriptor of the pipe to the pool's guard process
    (``process._Guard``), told this worker's pid and closed at once.
    ``steal``: a descriptor on which the pool asks for queued calls back
    (``process.ProcessPool._reclaim``); the watchdog thread answers.
    """
    global _stopping, _worker_pid, _taken
    if guard is not None:
        # First thing, before any call can run: the pool's guard learns our pid
        # (one line, written whole: a pipe's writes this small are atomic).
        # (Under a plain fork nothing is pickled: the object, its fd inherited.)
        fd = guard if isinstance(guard, int) else int(guard.fd)
        try:
            os.write(fd, f"+{os.getpid()}\n".encode())
        except OSError:
            pass  # no guard (it failed, or went): our watchdog still works
        finally:
            os.close(fd)
    _worker_pid = os.getpid()
    _shm.set_prefix(
        _shm.worker_prefix(parent_pid, pool_id, worker_id), _shm.pool_prefix(parent_pid, pool_id)
    )
    sys.stdout = NodeStream(sys.stdout)
    sys.stderr = NodeStream(sys.stderr)
    if log_setup is not None:
        _mirror_logging(*log_setup)
    try:
        os.setpgrp()
    except OSError:  # already a group leader, or not permitted: kills still reach us
        pass
    _prefer_for_the_oom_killer()
    if os.getpgrp() == os.getpid():
        # Last of every exit hook: multiprocessing runs its finalizers last, and
        # this one (lowest priority) last of them.
        multiprocessing.util.Finalize(None, _end_group, exitpriority=-(2**31))
    # multiprocessing made our own start method this process's default; a task
    # that starts a Pool expects the platform's default, as in a plain script
    # (fork on Linux before 3.14): forkserver or spawn children could not find
    # the script's functions, which workers receive by value, and would hang it.
    multiprocessing.set_start_method(None, force=True)
    steal_fd = None if steal is None else steal if isinstance(steal, int) else int(steal.fd)
    _taken = 0
    _skip.clear()
    threading.Thread(
        target=_watch_parent,
        args=(parent_pid, os.getppid(), conn, steal_fd),
        daemon=True,
        name="graphexec-watchdog",
    ).start()
    functions.clear()  # a forked worker's copy of its parent's, if the parent was a worker
    contexts.clear()
    if thread_env is not None:
        apply_in_worker(thread_env)
    if initializer is not None:
        ok, reply = _initialize(*initializer)
        _flush_stdio()
        try:
            conn.send_bytes(reply)
        except (BrokenPipeError, OSError):
            return
        if not ok:  # the parent gives our calls back (or fails them) when we are gone
            conn.close()
            sys.exit(1)
    held: dict[int, Any] = {}  # token -> value kept for the next call of a chain
    batch: deque[bytes] = deque()  # the calls of a batch message not run yet, in order
    stopped = False
    while True:
        if batch:
            data = batch.popleft()
        else:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                break  # the parent closed our pipe or died
        message = pickle.loads(data)
        if message[0] == "batch":
            # Several run messages in one: each is run, and answered, in turn, so
            # the parent still knows which call a death interrupted.
            batch.extend(message[1])
            continue
        if message[0] == "fn":
            _, fn_id, blob, origin, forget = message
            for old in forget:
                functions.pop(old, None)
            functions[fn_id] = load_function(blob, origin)
            try:
                # Starting this process and importing what the function needs
                # (torch, a big module) is ours, not the task's: the parent starts
                # the call's timeout clock from here.
                with _send_lock:
                    conn.send_bytes(pickle.dumps(("loaded", fn_id)))
            except (BrokenPipeError, OSError):
                break
            continue
        if message[0] == "cache":
            _, cid, cache_dir, task = message
            contexts[cid] = (cache_dir, task)
            continue
        if message[0] == "stop":
            stopped = True
            _stopping = True
            # Our exit hooks run now (a task's atexit, coverage's data file);
            # one that hangs must not keep this process: nobody may join it.
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(STOP_GRACE)
            break
        # Taken, then looked up (no lock: see _give_back, which reads _taken after
        # adding a number, and takes back one the loop may have passed).
        _taken += 1
        if _skip and _skip.pop(_taken, None) == message[1]:
            # Given back: the pool has it run elsewhere (no reply). The watchdog
            # holds _send_lock from adding its number until its "returned" is sent:
            # wait for that, so the pool hears of it before any reply, or death, of
            # a call run after it here (else it blames this call, which never ran).
            with _send_lock:
                pass
            continue
        reply = _run(message, functions, held)
        _flush_stdio()
        try:
            with _send_lock:
                conn.send_bytes(reply)
        except (BrokenPipeError, OSError):
            break
    conn.close()
    if not stopped and _parent_dies_soon(parent_pid):
        # The pipe closed because the parent died: nobody will release the
        # values of its runs, so clean them up here, as the watchdog does, and
        # end what earlier tasks left running.
        _shm.sweep(f"gx-{parent_pid}-")
        _kill_descendants()


def _initialize(blob: bytes, args_blob: bytes, origin: str | None) -> tuple[bool, bytes]:
    """Run the pool's initializer: whether it succeeded, and the message to send."""
    name = "initializer"
    fn = load_function(blob, origin)
    if type(fn) is Unloadable:
        exc, tb = fn.exc, fn.tb
    else:
        name = f"initializer {getattr(fn, '__qualname__', fn)!s}"
        try:
            fn(*pickle.loads(args_blob))
            return True, pickle.dumps(("ready",))
        except BaseException as caught:
            exc, tb = caught, traceback.format_exc()
    return False, pickle.dumps(
        ("initfail", pickle_exception(exc, tb, name), tb, describe_exception(exc)), protocol=5
    )


def inherited_fd(dup: Any) -> int:
    """The descriptor a worker inherits from its pool (``process._InheritedFd``)."""
    return int(dup.detach())


def _end_group() -> None:
    """A stopped worker's last act: kill what its tasks left running in its group.

    A task's subprocess that outlived its own parent (a shell's background
    job) is no longer our descendant, but still in the group this worker
    leads. The pool used to kill the group once it had joined the worker;
    a cold compute's pool no longer joins it (``ProcessPool.shutdown``). So
    the worker, told to stop, kills its group as the last of its exit hooks,
    itself included: its exit is done by then. (Looking in ``/proc`` for
    another member first cost about a millisecond of CPU per worker.)
    """
    if _stopping:
        os.killpg(os.getpid(), signal.SIGKILL)


def _kill_descendants() -> None:
    """SIGKILL every descendant of this process, by parentage (whatever its group)."""
    kill_all(descendants(os.getpid()))


# Added to the kernel's out-of-memory score of every worker (and what its task
# starts): -1000 to 1000, where 1000 stands for all of memory (Ray gives its workers
# 1000). When memory runs out, a worker goes first rather than this pool's parent.
OOM_SCORE_ADJ = 500


def _prefer_for_the_oom_killer() -> None:
    """Make this worker the kernel's first choice when memory runs out (Linux).

    The out-of-memory killer picks the process with the most points, about its
    share of memory: the parent, which holds the run's results, outweighs any one
    of several workers whose tasks together exhausted memory, and killing it ends
    the whole run. A killed worker ends one node, ``WorkerCrashed`` with SIGKILL's
    hint, and the run goes on. Added to what the worker inherited (the program's
    own, through the zygote or forkserver), at most 1000: raising one's own score
    needs no privilege."""
    try:
        with open("/proc/self/oom_score_adj", "r+") as f:
            inherited = int(f.read() or 0)
            f.seek(0)
            f.write(str(min(inherited + OOM_SCORE_ADJ, 1000)))
    except (OSError, ValueError):
        pass  # not Linux, a kernel without it, or a read-only /proc


def descendants(pid: int | None) -> list[Any]:
    """The live descendants of ``pid`` by parentage (``psutil.Process``), whatever
    their session or process group; [] when it has none or is gone.

    The common case, a worker with no child, costs a read of
    ``/proc/<pid>/task/*/children`` rather than psutil's walk over every process.
    """
    if pid is None:  # a worker never forked
        return []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                if f.read().strip():
                    break
        else:
            return []
    except OSError:
        pass  # not Linux, a kernel without the file, or a thread that just ended: ask psutil
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def kill_all(processes: list[Any]) -> None:
    """SIGKILL each ``psutil.Process`` (psutil refuses a pid reused since it was listed)."""
    if not processes:
        return
    import psutil

    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass


def log_setup() -> tuple[int, str]:
    """This process's root logging level and format, for the workers it starts."""
    root = logging.getLogger()
    fmt = next(
        (h.formatter._fmt for h in root.handlers if h.formatter and h.formatter._fmt),
        logging.BASIC_FORMAT,
    )
    return root.getEffectiveLevel(), fmt


def _mirror_logging(level: int, fmt: str) -> None:
    """Log records of tasks (and of graphexec here) go to stderr as in the parent.

    A worker is a fresh process with no logging set up: without this, a
    task's ``logging.info`` would vanish even when the parent logs at INFO,
    and graphexec's own warnings here would be eaten by its NullHandler.
    stderr is the node-prefixing stream, so each record comes out as
    ``[node] <the parent's format>``.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]  # a forked worker's copies of the parent's would duplicate
    root.setLevel(level)


def _run(message: tuple, functions: dict[int, Any], held: dict[int, Any]) -> bytes:
    """Run one call; its reply. Shared-memory inputs the task still maps once the call
    is over (it kept a reference: a module-level cache) are pinned before the reply
    goes: the parent may release them as soon as it has it (``shm.pin``)."""
    mapped: list[tuple[str, Any]] = []
    reply = _call(message, functions, held, mapped)
    # _call's locals are gone: a mapping alive now is the task's doing
    for segment, ref in mapped:
        mapping = ref()
        if mapping is not None and _shm.pin(segment):
            weakref.finalize(mapping, _shm.unpin, segment)
    return reply


def _call(message: tuple, functions: dict[int, Any], held: dict[int, Any], mapped: list) -> bytes:
    _, token, fn_id, name, encoded, deps, cache, hold = message
    started = time.time()
    values: dict[int, Any] = {}
    # Chained inputs: they never passed through the parent, so a failure sends
    # them back (run.replay needs them): (value, its pickle from before the call
    # or None), a reference until the reply is made.
    chained: dict[int, tuple[Any, bytes | None]] = {}
    for dep in deps:
        if len(dep) == 3:  # the value the previous call of the chain kept here
            if dep[2] not in held:  # that call failed: the parent decides what now
                held.clear()
                return pickle.dumps(("skip", token))
            chained[dep[0]] = kept = held.pop(dep[2])
            values[dep[0]] = kept[0]
    if not chained:
        held.clear()  # a chain ends with a call that keeps nothing: nothing is left

    def fail(stage: str, exc: BaseException, tb: str) -> bytes:
        reply: tuple[Any, ...] = (
            "err",
            token,
            stage,
            pickle_exception(exc, tb, name),
            tb,
            started,
            time.time(),
            describe_exception(exc),
        )
        # Its frames (the task's arguments) go now, not at a collection: else its
        # inputs would look still mapped, and be pinned (_run)
        exc.__traceback__ = None
        if chained:
            reply += (return_inputs(chained),)
        return pickle.dumps(reply, protocol=5)

    fn = functions[fn_id]
    if type(fn) is Unloadable:
        return fail(
            "function",
            unloadable_error(
                name,
                fn,
                "in the worker",
                "Is its module importable from the worker (same "
                "virtualenv, same working directory)?",
            ),
            fn.tb,
        )

    dep = None  # the input being loaded (its node is named in the error)
    try:
        for dep in deps:
            if len(dep) == 2:
                values[dep[0]] = loads_value(dep[1], mapped)
        dep = None
        args, kwargs = decode_call(encoded, values)
    except BaseException as exc:
        return fail(
            "unpickle-arguments",
            arguments_unpickle_error(name, exc, "in the worker", None if dep is None else dep[0]),
            traceback.format_exc(),
        )

    NodeStream.node = name
    ok, result, tb = invoke(fn, args, kwargs)
    if not ok:
        _end_if_forked()
        return fail("call", result, tb)
    _end_if_forked()
    finished = time.time()
    del args, kwargs, values
    if hold:
        try:
            held[token] = handover(result, keep=True)
        except UnloadableValue:
            # It pickles but will not unpickle in a worker: it goes to the parent as
            # any value does, and the next call, not finding it here, comes back
            # ("skip") to fail as it would on another worker: unpickle-arguments,
            # on the consumer, not a "cannot be pickled" on this node.
            pass
        except BaseException as exc:
            return fail("result", result_error(name, result, exc), traceback.format_exc())
        else:
            return pickle.dumps(("held", token, started, finished))

    try:
        blob = dumps_value(result)
    except BaseException as exc:
        return fail("result", result_error(name, result, exc), traceback.format_exc())
    if cache is not None and stored_apart(blob):
        # A large entry is written here, so the parent never copies its buffers; a
        # small one the parent stores from this blob (it batches its rows).
        cid, key, expires = cache
        context = contexts.get(cid)
        if context is None:  # the parent tells a worker a context before naming it
            logging.getLogger("graphexec").warning(
                "%s: result not cached (cache context %s unknown to this worker; a bug "
                "in graphexec, please report it)",
                name,
                cid,
            )
        else:
            cache_dir, task = context
            write_cache((cache_dir, key, {"task": task, "expires": expires}), result, name)
    return pickle.dumps(("ok", token, blob, started, finished), protocol=5)


def return_inputs(
    chained: dict[int, tuple[Any, bytes | None]],
) -> tuple[tuple[int, bytes | None, str], ...]:
    """The chained inputs of a failed call, pickled to go back to the parent:
    ``(node, pickle, "")``, or ``(node, None, why)`` for one that will not pickle.
    The pickle made before the call where there is one (the call may have changed
    its value in place), else the value as the call left it (a large array)."""
    out: list[tuple[int, bytes | None, str]] = []
    for up, (value, before) in chained.items():
        try:
            out.append((up, before if before is not None else dumps(value), ""))
        except Exception as exc:
            out.append((up, None, f"it could not be pickled in the worker: {exc}"))
    return tuple(out)


def _end_if_forked() -> None:
    """End a child the task forked (``os.fork()`` without exec) that returned into us.

    Left alone it would reply on the worker's pipe as if it were the worker.
    """
    if os.getpid() != _worker_pid:
        _flush_stdio()
        os._exit(0)


class NodeStream:
    """Prefixes every line a task writes with its node's name: ``[simulate-3] ...``.

    Output goes straight to the stream the worker inherited (the parent's
    terminal or log), so megabytes of output cannot fill a pipe and stall
    anyone. Lines are gathered and written whole, in writes of at most
    ``ATOMIC_WRITE`` bytes: the kernel never splits such a write to a pipe,
    so the lines of workers sharing one stdout never cut into each other.
    Gathered lines are written within ``OUTPUT_DELAY`` seconds (a thread of
    this stream's), at once if the stream is line-buffered (a terminal) or
    unbuffered (``python -u``, ``PYTHONUNBUFFERED``): so a long task's lines
    reach a log file as it runs, and a task that crashes, is killed for its
    timeout or calls ``os._exit()`` loses at most the lines of its last
    ``OUTPUT_DELAY`` seconds (plain Python, block-buffered, loses up to 8 KiB).
    A partial line is completed when the task ends, or written out once it
    grows past ``PARTIAL_LINE_MAX`` (a progress bar redrawn with ``\r``).
    Output nobody can receive any more is dropped; the task goes on. On a
    terminal each write first clears the line the cursor is on (``\r`` and
    ``ESC [K``): that is where the parent's progress bar is drawn, and a task's
    line written after it was glued to the bar's text; the bar is redrawn
    below at its next refresh.
    """

    node: str | None = None  # set by the worker loop before each call

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        # The unfinished line, in pieces: joining on every write would make a
        # task that writes one character at a time quadratic (minutes for 1 MB).
        self._partial: list[str] = []
        self._partial_len = 0
        self._lines: list[str] = []  # whole, prefixed lines not written yet
        self._lines_len = 0
        self._lost = False  # the stream broke: output is dropped from now on
        self._at_once = bool(
            getattr(stream, "line_buffering", False) or getattr(stream, "write_through", False)
        )
        self._clear = CLEAR_LINE if _a_terminal(stream) else ""
        self._reset()
        _streams.append(self)

    def _reset(self) -> None:
        """The lock and the writer thread's wakeup (anew in a forked child: a lock
        another thread held at the fork would stay held there for ever)."""
        # Reentrant: a signal handler (a timeout's) may print while this thread
        # holds it.
        self._lock = threading.RLock()
        self._due = threading.Event()  # lines are gathered: the writer thread writes them
        self._writer: threading.Thread | None = None

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        with self._lock:
            if "\n" not in text:
                self._partial.append(text)
                self._partial_len += len(text)
                if self._partial_len >= PARTIAL_LINE_MAX:
                    self._end_partial()
                    self._drain()
                return len(text)
            lines = text.split("\n")
            if self._partial:
                lines[0] = "".join(self._partial) + lines[0]
                self._partial, self._partial_len = [], 0
            last = lines.pop()
            if last:
                self._partial, self._partial_len = [last], len(last)
            prefix = f"[{self.node}] " if self.node else ""
            out = "".join(f"{prefix}{line}\n" for line in lines)
            self._lines.append(out)
            self._lines_len += len(out)
            if self._at_once or self._lines_len >= ATOMIC_WRITE // 4:
                self._drain()
            elif not self._due.is_set():
                self._due.set()
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._write_later, daemon=True, name="graphexec-output"
                    )
                    self._writer.start()
        return len(text)

    def _write_later(self) -> None:
        """The writer thread: gathered lines are written ``OUTPUT_DELAY`` s after the
        first of them (a task printing a line at a time costs one write per delay)."""
        due = self._due
        while True:
            due.wait()
            time.sleep(OUTPUT_DELAY)
            with self._lock:
                due.clear()
                self._drain()

    def _end_partial(self) -> None:
        if self._partial:
            prefix = f"[{self.node}] " if self.node else ""
            out = f"{prefix}{''.join(self._partial)}\n"
            self._partial, self._partial_len = [], 0
            self._lines.append(out)
            self._lines_len += len(out)

    def _drain(self) -> None:
        """Write the gathered lines: whole lines, at most ATOMIC_WRITE bytes a write."""
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines, self._lines_len = [], 0
        if self._lost:
            return
        limit = ATOMIC_WRITE if text.isascii() else ATOMIC_WRITE // 4  # UTF-8: <= 4 B/char
        start, stream = 0, self._stream
        try:
            while start < len(text):
                end = text.rfind("\n", start, start + limit) + 1
                if end <= start:  # one line longer than the limit: written whole, best effort
                    end = text.find("\n", start) + 1 or len(text)
                stream.write(self._clear + text[start:end])
                stream.flush()
                start = end
        except (OSError, ValueError):
            # Nobody reads any more (`script.py | head`, a closed log): the output
            # is lost, but a task must not fail for printing.
            self._lost = True

    def flush(self) -> None:
        if self._partial or self._lines:  # (not the loop's flush after each call)
            # Bounded: at an interpreter's exit, the writer thread (a daemon) may
            # have been stopped holding the lock, in a write; the last flush must
            # not hang.
            if not self._lock.acquire(timeout=FLUSH_LOCK_WAIT):
                return
            try:
                if self._partial:
                    self._end_partial()
                if self._lines:
                    self._drain()
            finally:
                self._lock.release()
        if not self._lost:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lost = True

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty, buffer ...
        return getattr(self._stream, name)


_streams: list[NodeStream] = []  # this process's (its stdout's and stderr's)

CLEAR_LINE = "\r\x1b[K"  # back to the line's start, and erase it (ANSI: every terminal here)


def _a_terminal(stream: Any) -> bool:
    """A terminal that takes ANSI sequences (not ``TERM=dumb``): where a progress bar
    may be drawn on the line a task's output would be glued to."""
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
    return tty and os.environ.get("TERM", "") not in ("", "dumb")


def _before_fork() -> None:
    """A task forks: not while a stream's writer thread is in a write, whose buffer's
    lock (the real stdout's) the child would hold for ever, and hang on its first
    flush. The streams' locks are held across the fork (a writer may delay it)."""
    for stream in _streams:
        stream._lock.acquire()


def _after_fork_in_parent() -> None:
    for stream in reversed(_streams):
        stream._lock.release()


def _after_fork_in_child() -> None:
    """A task forked: its child must not wait for a lock another thread held then."""
    global _send_lock
    _send_lock = threading.Lock()
    for stream in _streams:
        stream._reset()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _parent_dies_soon(parent_pid: int, wait: float = 2.0) -> bool:
    """After an EOF: a parent being killed closes its pipes before it is a zombie."""
    deadline = time.monotonic() + wait
    while _parent_alive(parent_pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _parent_alive(parent_pid: int) -> bool:
    """The parent exists and is not a zombie.

    On Linux from ``/proc/<pid>/stat`` (the state follows the command name's
    closing parenthesis), so that a starting worker does not import psutil
    (milliseconds of a worker's start); elsewhere psutil.
    """
    try:
        with open(f"/proc/{parent_pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass  # no /proc: ask psutil
    import psutil

    try:
        return psutil.Process(parent_pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _give_back(conn: Any, request: bytes) -> None:
    """The pool asks for calls queued here (``number:id`` pairs): give back those not
    taken yet, which the loop then skips, and say which (one reply, out of turn)."""
    wanted = []
    for pair in request.split():
        number, _, call_id = pair.partition(b":")
        try:
            wanted.append((int(number), int(call_id)))
        except ValueError:
            continue
    # Lock-free against the loop, which counts a call taken (_taken) before it looks
    # for it in _skip: a number added here while the loop has not reached it is
    # skipped there; one the loop reached meanwhile either was skipped (its entry
    # is gone) or ran (its entry is still here: taken back, not given back).
    # _send_lock (one sender at a time on the pipe) is held from before the numbers
    # are added until the answer is sent: a loop that skips one waits for it (see
    # main), so nothing it runs next can answer, or die, before the pool has this.
    with _send_lock:
        back = [(n, i) for n, i in wanted if n > _taken]
        for n, i in back:
            _skip[n] = i
        reached = _taken
        back = [(n, i) for n, i in back if n > reached or _skip.pop(n, None) is None]
        try:
            conn.send_bytes(pickle.dumps(("returned", [i for _, i in back])))
        except (OSError, ValueError):  # the pool is gone, or killing us: they run here
            for n, _ in back:
                _skip.pop(n, None)


def _watch_parent(parent_pid: int, first_ppid: int, conn: Any, steal_fd: int | None) -> None:
    """Kill this worker's process group once the parent is gone; meanwhile answer the
    pool's requests for queued calls (``steal_fd``)."""
    check = time.monotonic() + WATCHDOG_INTERVAL
    pending = b""
    while True:
        left = check - time.monotonic()
        if left > 0:
            if steal_fd is None:
                time.sleep(left)
                continue
            try:
                readable = select.select([steal_fd], [], [], left)[0]
                chunk = os.read(steal_fd, 65536) if readable else None
            except OSError:
                chunk = b""
            if chunk is not None and not chunk:  # closed: the pool forgot us, or died
                with contextlib.suppress(OSError):
                    os.close(steal_fd)
                steal_fd = None
            elif chunk:
                *requests, pending = (pending + chunk).split(b"\n")
                for request in requests:
                    _give_back(conn, request)
            continue
        check = time.monotonic() + WATCHDOG_INTERVAL
        alive = _parent_alive(parent_pid)
        if alive and os.getppid() == first_ppid:
            continue
        _flush_stdio()
        try:
            # Values of the dead parent's runs that nobody will ever release.
            _shm.sweep(f"gx-{parent_pid}-")
            _kill_descendants()
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpid(), signal.SIGKILL)  # takes the task's subprocesses too
        finally:
            os._exit(1)
