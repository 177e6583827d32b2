"""The worker process: receive one call at a time over its own pipe, run it, reply.

Messages (pickled tuples, one ``send_bytes`` each)::

    parent -> worker   ("fn", fn_id, fn_blob)        once per function and worker
                       ("run", token, fn_id, node_name, args_blob, deps, cache)
                       ("stop",)
    worker -> parent   ("ok",  token, result_blob, started, finished)
                       ("err", token, stage, exc_blob, traceback_text, started, finished)

``deps`` is a list of ``(node_index, pickled_value)``; ``cache`` is None or
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
from ._errors import RemoteError, SerializationError
from ._serialize import dumps, dumps_value, loads_call, loads_value

WATCHDOG_INTERVAL = 0.5


def main(conn: Any, worker_id: int, parent_pid: int, pool_id: int = 0) -> None:
    """Entry point of a worker process."""
    _shm.set_prefix(_shm.worker_prefix(parent_pid, pool_id, worker_id),
                    _shm.pool_prefix(parent_pid, pool_id))
    sys.stdout = NodeStream(sys.stdout)
    sys.stderr = NodeStream(sys.stderr)
    try:
        os.setpgrp()
    except OSError:  # already a group leader, or not permitted: kills still reach us
        pass
    threading.Thread(
        target=_watch_parent, args=(parent_pid, os.getppid()), daemon=True,
        name="graphexec-watchdog",
    ).start()
    functions: dict[int, Any] = {}
    while True:
    stopped = False
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            break  # the parent closed our pipe or died
        message = pickle.loads(data)
        if message[0] == "fn":
            functions[message[1]] = _load_function(message[2], message[3])
            continue
        if message[0] == "stop":
            break
            stopped = True
        reply = _run(message, functions)
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

def _run(message: tuple, functions: dict[int, Any]) -> bytes:
    _, token, fn_id, name, args_blob, deps, cache = message
    started = time.time()

    def fail(stage: str, exc: BaseException, tb: str) -> bytes:
        return pickle.dumps(
            ("err", token, stage, _pickle_exception(exc, tb), tb, started, time.time()),
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
        values = {index: loads_value(wire) for index, wire in deps}
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
        # Start the traceback at the task's own frame, not at this loop.
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
        return fail("call", exc, tb)
    finished = time.time()
    del args, kwargs, values

    try:
        blob = dumps_value(result)
    except BaseException as exc:
        kind = type(result)
        error = SerializationError(
            f"the result of {name} (a {kind.__module__}.{kind.__qualname__}) cannot be "
            f"pickled: {type(exc).__name__}: {exc}. Return plain data (numbers, strings, "
            "arrays, lists, dicts) or make the type picklable",
            node=name, stage="result",
        )
        return fail("result", error, traceback.format_exc())
    if cache is not None:
        write_cache(cache, result, name)
    return pickle.dumps(("ok", token, blob, started, finished), protocol=5)


def _load_function(blob: bytes, origin: str | None) -> Any:
    try:
        fn = pickle.loads(blob)
    except BaseException as exc:  # reported when a call needs it, on that node
        return _Unloadable(exc, traceback.format_exc())
    if origin:
        _restore_filenames(fn, origin)
    return fn


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


class _Unloadable:
    __slots__ = ("exc", "tb")

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc, self.tb = exc, tb


def _pickle_exception(exc: BaseException, tb: str) -> bytes:
    """Pickle ``exc`` if it survives a round trip, else a RemoteError standing in for it."""
    try:
        blob = dumps(exc)
        pickle.loads(blob)  # e.g. __init__ with required keyword arguments fails here
        return blob
    except BaseException as why:
        kind = type(exc)
        type_name = f"{kind.__module__}.{kind.__qualname__}"
        try:
            text = str(exc)
        except BaseException:
            text = "<str() of the exception failed>"
        stand_in = RemoteError(
            f"{type_name}: {text} (the original exception could not be sent back from the "
            f"worker: {type(why).__name__}: {why})",
            type_name=type_name, original_message=text, remote_traceback=tb,
        )
        return dumps(stand_in)


class NodeStream:
    """Prefixes every line a task writes with its node's name: ``[simulate-3] ...``.

    Output goes straight to the stream the worker inherited (the parent's
    terminal or log), line by line, so megabytes of output cannot fill a pipe
    and stall anyone; a partial line is completed when the task ends.
    """

    node: str | None = None  # set by the worker loop before each call

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if lines:
            prefix = f"[{self.node}] " if self.node else ""
            self._stream.write("".join(f"{prefix}{line}\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        if self._partial:
            prefix = f"[{self.node}] " if self.node else ""
            self._stream.write(f"{prefix}{self._partial}\n")
            self._partial = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty, buffer ...
        return getattr(self._stream, name)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


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


