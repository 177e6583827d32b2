"""The worker process: receive one call at a time over its own pipe, run it, reply.

Messages (pickled tuples, one ``send_bytes`` each)::

    parent -> worker   ("fn", fn_id, fn_blob, origin)  once per function and worker
                       ("run", token, fn_id, node_name, args_blob, deps, cache, hold)
                       ("stop",)
    worker -> parent   ("loaded", fn_id)             the function is ready
                       ("ok",  token, result_blob, started, finished)
                       ("held", token, started, finished)  kept here for the next call
                       ("skip", token)                    its held input is not here
                       ("err", token, stage, exc_blob, traceback_text, started, finished,
                        (type_name, message))

``deps`` is a list of ``(node_index, pickled_value)``, or ``(node_index,
None, token)`` for the value the call ``token`` kept here (``hold``: a chain,
see ``_call.py``); ``cache`` is None or
``(cache_dir, key, meta)``: the worker writes the cache entry itself, so
entries are written in parallel and the parent never copies a result.

Calls are run strictly in the order received, so the parent knows which call
a dead worker was running: the oldest one it has not answered.

``stage`` says which step failed: ``function`` (unpickling the function),
``unpickle-arguments``, ``call`` (the task raised), ``result`` (pickling it).
An exception that will not survive the trip is replaced by a
:class:`RemoteError` carrying its type name, message and traceback text.

The worker leads its own process group, so a terminal's Ctrl-C reaches only
the parent (which then decides what to cancel), and a kill of the group also
takes any subprocess the task started. A watchdog thread ends the worker
within a second or so of the parent's death, even mid-task.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from typing import Any

from . import _shm
from ._call import write_cache
from ._errors import RemoteError, SerializationError, safe_str
from ._serialize import dumps, dumps_value, loads_call, loads_value

WATCHDOG_INTERVAL = 0.5
_worker_pid = 0  # this worker's pid: a process with another one is a child a task forked
PARTIAL_LINE_MAX = 1024  # characters: an unfinished line longer than this is written out
ATOMIC_WRITE = 4096  # bytes: PIPE_BUF, the largest write a pipe never interleaves


def main(conn: Any, worker_id: int, parent_pid: int, pool_id: int = 0,
         log_setup: tuple[int, str] | None = None) -> None:
    """Entry point of a worker process.

    ``log_setup``: the parent's root logging level and format, which tasks'
    log records follow here (see :func:`_mirror_logging`).
    """
    global _worker_pid
    _worker_pid = os.getpid()
    _shm.set_prefix(_shm.worker_prefix(parent_pid, pool_id, worker_id),
                    _shm.pool_prefix(parent_pid, pool_id))
    sys.stdout = NodeStream(sys.stdout)
    sys.stderr = NodeStream(sys.stderr)
    if log_setup is not None:
        _mirror_logging(*log_setup)
    try:
        os.setpgrp()
    except OSError:  # already a group leader, or not permitted: kills still reach us
        pass
    # multiprocessing made our own start method this process's default; a task
    # that starts a Pool expects the platform's default, as in a plain script
    # (fork on Linux before 3.14): forkserver or spawn children could not find
    # the script's functions, which workers receive by value, and would hang it.
    multiprocessing.set_start_method(None, force=True)
    threading.Thread(
        target=_watch_parent, args=(parent_pid, os.getppid()), daemon=True,
        name="graphexec-watchdog",
    ).start()
    functions: dict[int, Any] = {}
    held: dict[int, Any] = {}  # token -> value kept for the next call of a chain
    stopped = False
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            break  # the parent closed our pipe or died
        message = pickle.loads(data)
        if message[0] == "fn":
            functions[message[1]] = _load_function(message[2], message[3])
            try:
                # Starting this process and importing what the function needs
                # (torch, a big module) is ours, not the task's: the parent starts
                # the call's timeout clock from here.
                conn.send_bytes(pickle.dumps(("loaded", message[1])))
            except (BrokenPipeError, OSError):
                break
            continue
        if message[0] == "stop":
            stopped = True
            break
        reply = _run(message, functions, held)
        _flush_stdio()
        try:
            conn.send_bytes(reply)
        except (BrokenPipeError, OSError):
            break
    conn.close()
    if not stopped and _parent_dies_soon(parent_pid):
        # The pipe closed because the parent died: nobody will release the
        # values of its runs, so clean them up here, as the watchdog does.
        _shm.sweep(f"gx-{parent_pid}-")


def log_setup() -> tuple[int, str]:
    """This process's root logging level and format, for the workers it starts."""
    root = logging.getLogger()
    fmt = next((h.formatter._fmt for h in root.handlers if h.formatter and h.formatter._fmt),
               logging.BASIC_FORMAT)
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
    _, token, fn_id, name, args_blob, deps, cache, hold = message
    started = time.time()
    values: dict[int, Any] = {}
    chained = False
    for dep in deps:
        if len(dep) == 3:  # the value the previous call of the chain kept here
            if dep[2] not in held:  # that call failed: the parent decides what now
                held.clear()
                return pickle.dumps(("skip", token))
            values[dep[0]] = held.pop(dep[2])
            chained = True
    if not chained:
        held.clear()  # a chain ends with a call that keeps nothing: nothing is left

    def fail(stage: str, exc: BaseException, tb: str) -> bytes:
        return pickle.dumps(
            ("err", token, stage, _pickle_exception(exc, tb, name), tb, started, time.time(),
             describe_exception(exc)),
            protocol=5,
        )

    fn = functions[fn_id]
    if type(fn) is _Unloadable:
        error = SerializationError(
            f"the function of {name} could not be unpickled in the worker: "
            f"{type(fn.exc).__name__}: {fn.exc}. Is its module importable from the worker "
            "(same virtualenv, same working directory)?",
            node=name, stage="function",
        )
        return fail("function", error, fn.tb)

    try:
        values.update((dep[0], loads_value(dep[1])) for dep in deps if len(dep) == 2)
        args, kwargs = loads_call(args_blob, values)
    except BaseException as exc:
        error = SerializationError(
            f"the arguments of {name} could not be unpickled in the worker: "
            f"{type(exc).__name__}: {exc}",
            node=name, stage="unpickle-arguments",
        )
        return fail("unpickle-arguments", error, traceback.format_exc())

    NodeStream.node = name
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt fail the node too
        _end_if_forked()
        # Start the traceback at the task's own frame, not at this loop.
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
        return fail("call", exc, tb)
    _end_if_forked()
    finished = time.time()
    del args, kwargs, values
    if hold:
        try:
            held[token] = handover(result)
        except BaseException as exc:
            return fail("result", result_error(name, result, exc), traceback.format_exc())
        return pickle.dumps(("held", token, started, finished))

    try:
        blob = dumps_value(result)
    except BaseException as exc:
        return fail("result", result_error(name, result, exc), traceback.format_exc())
    if cache is not None:
        write_cache(cache, result, name)
    return pickle.dumps(("ok", token, blob, started, finished), protocol=5)


_IMMUTABLE = frozenset({int, float, complex, bool, str, bytes, type(None)})


def handover(result: Any) -> Any:
    """What the next call of a chain receives in place of ``result``.

    The same as a consumer on another worker would: a value of its own,
    which it may modify in place without touching anything else. So
    ``result`` itself only where nothing else in this process can see it — an
    immutable builtin, or a numpy array that owns its data and is referenced
    only from here (a fresh array: no view of, and no entry in, a cache the
    task keeps) — else a copy: ``copy(order="K")`` for other plain arrays, a
    pickle round trip for everything else (which also fails, as it would
    between workers, on a result that cannot be pickled).
    """
    kind = type(result)
    if kind in _IMMUTABLE:
        return result
    if kind.__name__ == "ndarray" and kind.__module__ == "numpy" and not result.dtype.hasobject:
        # References: the caller's variable, our argument, getrefcount's own.
        if result.flags.owndata and sys.getrefcount(result) <= 3:
            return result
        return result.copy(order="K")
    return pickle.loads(dumps(result))


def _end_if_forked() -> None:
    """End a child the task forked (``os.fork()`` without exec) that returned into us.

    Left alone it would reply on the worker's pipe as if it were the worker.
    """
    if os.getpid() != _worker_pid:
        _flush_stdio()
        os._exit(0)


def _load_function(blob: bytes, origin: str | None) -> Any:
    try:
        fn = pickle.loads(blob)
    except BaseException as exc:  # reported when a call needs it, on that node
        return _Unloadable(exc, traceback.format_exc())
    if origin:
        _restore_filenames(fn, origin)
    if getattr(fn, "__module__", None) == "__main__":
        _adopt_into_main(fn)
    return fn


def _adopt_into_main(fn: Any) -> None:
    """Make the script's functions and classes that ``fn`` uses findable as ``__main__.x``.

    They arrive by value (workers never run the script), so plain pickle — a
    ``multiprocessing.Pool`` the task starts, ``concurrent.futures`` — could
    not send them by reference ("attribute lookup sq on __main__ failed").
    Naming them in this worker's ``__main__`` lets it; a forked child of the
    worker inherits the names. The latest definition wins, as in a notebook.
    """
    main = sys.modules.get("__main__")
    if main is None:
        return
    for name, value in list(getattr(fn, "__globals__", {}).items()):
        if getattr(value, "__module__", None) == "__main__" and \
                getattr(value, "__qualname__", None) == name:
            setattr(main, name, value)


def _restore_filenames(fn: Any, origin: str) -> None:
    """Put back the source file cloudpickle blanks to ``<dynamic-code>``.

    Functions pickled by value (defined in ``__main__``, a notebook, a closure)
    lose ``co_filename``; without it the remote traceback cannot say where the
    error is. The helpers such a function pulled along by value come from the
    same place.
    """
    seen: set[int] = set()
    todo = [fn]
    while todo:
        f = todo.pop()
        code = getattr(f, "__code__", None)
        if code is None or id(f) in seen or code.co_filename != "<dynamic-code>":
            continue
        seen.add(id(f))
        try:
            f.__code__ = _refile(code, origin)
        except (AttributeError, TypeError, ValueError):
            continue
        todo.extend(v for v in getattr(f, "__globals__", {}).values() if callable(v))


def _refile(code: Any, origin: str) -> Any:
    consts = tuple(
        _refile(c, origin) if hasattr(c, "co_filename") else c for c in code.co_consts
    )
    return code.replace(co_filename=origin, co_consts=consts)


def result_error(name: str, result: Any, exc: BaseException) -> SerializationError:
    """The error of a node whose result would not pickle, naming the result's type."""
    kind = type(result)
    return SerializationError(
        f"the result of {name} (a {kind.__module__}.{kind.__qualname__}) cannot be "
        f"pickled: {type(exc).__name__}: {safe_str(exc)}. Return plain data (numbers, "
        "strings, arrays, lists, dicts) or make the type picklable",
        node=name, stage="result",
    )


class _Unloadable:
    __slots__ = ("exc", "tb")

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc, self.tb = exc, tb


def describe_exception(exc: BaseException) -> tuple[str, str]:
    """``(qualified type name, str(exc))``, whatever the exception's ``__str__`` does."""
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}", safe_str(exc)


def _pickle_exception(exc: BaseException, tb: str, name: str | None = None) -> bytes:
    """Pickle ``exc`` if it survives a round trip, else a RemoteError standing in for it."""
    try:
        blob = dumps(exc)
        pickle.loads(blob)  # e.g. __init__ with required keyword arguments fails here
        return blob
    except BaseException as why:
        type_name, text = describe_exception(exc)
        who = f"{name} raised " if name else ""
        stand_in = RemoteError(
            f"{who}{type_name}: {text} (the exception itself could not be sent back from "
            f"the worker: {describe_exception(why)[1]}; its traceback is attached)",
            node=name, type_name=type_name, original_message=text, remote_traceback=tb,
        )
        return dumps(stand_in)


class NodeStream:
    """Prefixes every line a task writes with its node's name: ``[simulate-3] ...``.

    Output goes straight to the stream the worker inherited (the parent's
    terminal or log), so megabytes of output cannot fill a pipe and stall
    anyone. Lines are gathered and written whole, in writes of at most
    ``ATOMIC_WRITE`` bytes: the kernel never splits such a write to a pipe,
    so the lines of workers sharing one stdout never cut into each other.
    A partial line is completed when the task ends, or written out once it
    grows past ``PARTIAL_LINE_MAX`` (a progress bar redrawn with ``\r``).
    Output nobody can receive any more is dropped; the task goes on.
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

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
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
        if self._lines_len >= ATOMIC_WRITE // 4 or getattr(self._stream, "line_buffering", False):
            self._drain()
        return len(text)

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
                stream.write(text[start:end])
                stream.flush()
                start = end
        except (OSError, ValueError):
            # Nobody reads any more (`script.py | head`, a closed log): the output
            # is lost, but a task must not fail for printing.
            self._lost = True

    def flush(self) -> None:
        self._end_partial()
        self._drain()
        if not self._lost:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lost = True

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty, buffer ...
        return getattr(self._stream, name)


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
    import psutil

    try:
        return psutil.Process(parent_pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch_parent(parent_pid: int, first_ppid: int) -> None:
    """Kill this worker's process group once the parent is gone."""
    import psutil

    while True:
        time.sleep(WATCHDOG_INTERVAL)
        try:
            parent = psutil.Process(parent_pid)
            alive = parent.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if alive and os.getppid() == first_ppid:
            continue
        _flush_stdio()
        try:
            # Values of the dead parent's runs that nobody will ever release.
            _shm.sweep(f"gx-{parent_pid}-")
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpid(), signal.SIGKILL)  # takes the task's subprocesses too
        finally:
            os._exit(1)
