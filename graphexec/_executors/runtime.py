"""What runs a call wherever it runs: shared by the process worker, the dask worker
and the in-process executors (``run_inline``).

Both receive a function pickled by the parent and arguments with nodes
already replaced, run the call, and send back either the result or the
exception with its traceback text. The steps that must read the same on
both backends live here: loading a function (with its source file put
back), calling it with the traceback starting at the task's own frame,
pickling an exception so that it survives the trip (or a
:class:`RemoteError` standing in for it), and, in the parent, unpacking that
exception with the worker's traceback as its ``__cause__`` (the device of
``concurrent.futures.process._RemoteTraceback``).

Each step names the ``stage`` that failed (``function``,
``unpickle-arguments``, ``call``, ``result``), so a
:class:`SerializationError` says which side of the trip broke.
"""

from __future__ import annotations

import io
import linecache
import logging
import os
import pickle
import sys
import time
import traceback
from typing import Any

import cloudpickle

from .._data.cache import CacheStore
from .._data.serialize import PROTOCOL, SHM_THRESHOLD, dumps
from .._model.errors import RemoteError, RemoteTraceback, SerializationError, TaskTimeout, safe_str
from .._model.handle import materialize
from .._model.task import hide_graphs, unhide_graphs
from .._model.walk import PLAIN, substitute
from .protocol import ERROR, OK, Call


def invoke(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any, str]:
    """Call ``fn``: ``(True, result, "")``, or ``(False, exception, traceback text)``.

    SystemExit and KeyboardInterrupt raised by the task fail its node too;
    the traceback starts at the task's own frame, not at this one.
    """
    try:
        return True, fn(*args, **kwargs), ""
    except BaseException as exc:
        tb = exc.__traceback__
        return False, exc, format_traceback(exc, tb.tb_next if tb else None)


# The formatted stacks of the tracebacks this process formatted, by their frames. A
# sweep's failures fail at the same lines, and formatting a stack costs tens of
# microseconds a frame (since Python 3.11, a compile() of each frame's line to
# place its ^^^ marks), which a worker pays before it can answer: most of what a
# failed call cost it (W5: 1,000 calls, 100 of them failing).
_stack_texts: dict[tuple, list[str]] = {}
STACK_TEXTS_KEPT = 256  # stacks remembered at most (then forgotten, all at once)


class _KnownStack(traceback.StackSummary):
    """A stack whose lines, once formatted, are remembered (``_stack_texts``)."""

    def format(self, **kwargs: Any) -> list[str]:
        # A frame by where it is and the source it shows: its statement's lines as
        # they are now (the stdlib formats from them: the first one unstripped for
        # the ^^^ marks, every one of a statement over several lines since 3.13),
        # so an edited file is never shown as it was.
        key = (
            tuple([(f.name, *[getattr(f, a, None) for a in _AT], *_source(f)) for f in self]),
            tuple(sorted(kwargs.items())),
        )
        text = _stack_texts.get(key)
        if text is None:
            text = super().format(**kwargs)
            if len(_stack_texts) >= STACK_TEXTS_KEPT:
                _stack_texts.clear()
            _stack_texts[key] = text
        return list(text)


_AT = ("end_lineno", "colno", "end_colno")  # a frame's position beyond its line (3.11+)


def _source(f: traceback.FrameSummary) -> tuple[str, ...]:
    """The file and the lines of the statement frame ``f`` was in, as linecache has
    them (read for the TracebackException just made)."""
    first = f.lineno or 0
    last = max(first, getattr(f, "end_lineno", None) or first)
    return (f.filename, *[linecache.getline(f.filename, k) for k in range(first, last + 1)])


def format_traceback(exc: BaseException, tb: Any) -> str:
    """``traceback.format_exception(type(exc), exc, tb)``, the same text, with the
    stacks of its exceptions (chained, grouped) formatted once per process."""
    top = traceback.TracebackException(type(exc), exc, tb)
    seen: set[int] = set()
    todo = [top]
    while todo:
        te = todo.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        known = _KnownStack()  # (not from_list(): it makes a plain StackSummary)
        known.extend(te.stack)
        te.stack = known
        todo += [t for t in (te.__cause__, te.__context__) if t is not None]
        todo += getattr(te, "exceptions", None) or ()
    return "".join(top.format())


def unloadable_error(name: str, fn: Unloadable, where: str, advice: str) -> SerializationError:
    """The error of a call whose function could not be unpickled on ``where``."""
    return SerializationError(
        f"the function of {name} could not be unpickled {where}: "
        f"{type(fn.exc).__name__}: {fn.exc}. {advice}",
        node=name,
        stage="function",
        retryable=False,
    )


def arguments_unpickle_error(
    name: str, exc: BaseException, where: str, input_node: int | None = None
) -> SerializationError:
    """The error of a call whose arguments could not be unpickled on ``where``;
    ``input_node``: the upstream whose value it was (the scheduler puts its name,
    ``.upstream``, in the message: a worker knows its index only)."""
    if input_node is None:
        return SerializationError(
            f"the arguments of {name} could not be unpickled {where}: {type(exc).__name__}: {exc}",
            node=name,
            stage="unpickle-arguments",
        )
    return SerializationError(
        f"the arguments of {name} could not be unpickled {where}: the value of node "
        f"#{input_node}, its input, did not rebuild ({type(exc).__name__}: {exc}). That "
        "node completed and its value was pickled; unpickling it here failed, usually "
        "because of a __reduce__ or __setstate__ that raises, or a class or module "
        "missing in the worker; the traceback shows where",
        node=name,
        stage="unpickle-arguments",
        input_node=input_node,
    )


def load_function(blob: bytes, origin: str | None, adopt: bool = True) -> Any:
    """Unpickle a function (an :class:`Unloadable` if it fails), its source file put back.

    ``adopt``: make the script's functions findable in ``__main__`` (a worker's;
    not a user's interpreter, where a replay must not rebind their names).
    """
    try:
        fn = pickle.loads(blob)
    except BaseException as exc:  # reported when a call needs it, on that node
        return Unloadable(exc, traceback.format_exc())
    if origin:
        _restore_filenames(fn, origin)
    if adopt and getattr(fn, "__module__", None) == "__main__":
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
        if (
            getattr(value, "__module__", None) == "__main__"
            and getattr(value, "__qualname__", None) == name
        ):
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
    consts = tuple(_refile(c, origin) if hasattr(c, "co_filename") else c for c in code.co_consts)
    return code.replace(co_filename=origin, co_consts=consts)


def result_error(name: str, result: Any, exc: BaseException) -> SerializationError:
    """The error of a node whose result would not pickle, naming the result's type."""
    kind = type(result)
    return SerializationError(
        f"the result of {name} (a {kind.__module__}.{kind.__qualname__}) cannot be "
        f"pickled: {type(exc).__name__}: {safe_str(exc)}. Return plain data (numbers, "
        "strings, arrays, lists, dicts) or make the type picklable",
        node=name,
        stage="result",
    )


class Unloadable:
    """A function that could not be unpickled: reported on the node that needs it."""

    __slots__ = ("exc", "tb")

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc, self.tb = exc, tb


def handover(result: Any, keep: bool = False) -> tuple[Any, bytes | None]:
    """What a call receives in place of a value this process holds (the next call of
    a chain its predecessor's result, a dask task an upstream value from its
    worker's memory), and the pickle of it as the call receives it, if any.

    The same as a consumer on another worker would: a value of its own,
    which it may modify in place without touching anything else. So
    ``result`` itself only where nothing else in this process can see it — an
    immutable builtin, or a numpy array that owns its data and is referenced
    only from here (a fresh array: no view of, and no entry in, a cache the
    task keeps) — else a copy: ``copy(order="K")`` for other plain arrays, a
    pickle round trip for everything else (which also fails, as it would
    between workers, on a result that cannot be pickled; one whose pickle does
    not load raises :class:`UnloadableValue`).

    With ``keep`` (a chain's link), the pickle of a small value (under 64 KiB:
    the round trip's, or a small array's, next to nothing): a failed call's
    inputs are kept from it, since the call may have changed its value in
    place. None for an immutable value (nothing to keep apart) and for a large
    one (a copy per call of a chain would cost what the chain saves, and a
    large pickle held beside its value doubles the memory; the inputs kept are
    then the value as the call left it: docs/howto/replay.md).
    """
    kind = type(result)
    if kind in PLAIN:
        return result, None
    if kind.__name__ == "ndarray" and kind.__module__ == "numpy" and not result.dtype.hasobject:
        # References: the caller's variable, our argument, getrefcount's own.
        if result.flags.owndata and sys.getrefcount(result) <= 3:
            value = result
        else:
            value = result.copy(order="K")
        return value, dumps(value) if keep and value.nbytes < SHM_THRESHOLD else None
    data = dumps(result)
    try:
        value = pickle.loads(data)
    except Exception as exc:
        raise UnloadableValue from exc
    # (a large pickle kept beside its value would double what the chain holds)
    return value, data if keep and len(data) < SHM_THRESHOLD else None


class UnloadableValue(Exception):
    """:func:`handover`: the value pickles, but its pickle does not load here."""


def run_inline(call: Call, worker: Any) -> tuple[Call, int, Any]:
    """Run a call in this process and return its outcome (sync and thread executors).

    ``KeyboardInterrupt`` is not caught: in the sync scheduler Ctrl-C must
    reach the scheduler, which cancels the run.
    """
    call.worker = worker
    call.started = time.time()
    try:
        if call.has_nodes:
            values = {i: materialize(h) for i, h in call.inputs.items()}
            args = substitute(call.args, values)
            kwargs = substitute(call.kwargs, values) if call.kwargs else {}
        else:
            args, kwargs = call.args, call.kwargs or {}
        hidden = hide_graphs()  # its task calls are plain calls, as in a worker
        try:
            value = call.fn(*args, **kwargs)
        finally:
            unhide_graphs(hidden)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit, a task's own BaseException: a worker's too
        call.finished = time.time()
        return call, ERROR, exc
    call.finished = time.time()
    if call.timeout is not None and call.finished - call.started > call.timeout:
        # In-process work cannot be interrupted; it is judged when it returns,
        # so the final states match those of the process scheduler.
        return (
            call,
            ERROR,
            timeout_error(
                call,
                "an in-process call cannot be interrupted: it ran to its end and was judged then",
            ),
        )
    if call.cache is not None:
        write_cache(call.cache, value, call.name)
    return call, OK, value


def write_cache(cache: tuple[str, str, dict], value: Any, name: str) -> None:
    """Store a successful result; a failed write costs a warning, never the result."""
    root, key, meta = cache
    try:
        store = _stores.get((os.getpid(), root))
        if store is None:  # one per directory and process: opening one has a cost
            store = _stores[(os.getpid(), root)] = CacheStore(root)
        store.write_value(key, value, meta)
    except Exception as exc:
        logging.getLogger("graphexec").warning(
            "%s: result not cached (%s: %s)", name, type(exc).__name__, exc
        )


_stores: dict[tuple[int, str], CacheStore] = {}  # (pid, cache dir) -> its store, for writing


def timeout_error(call: Call, how: str = "it was stopped") -> TaskTimeout:
    return TaskTimeout(
        f"{call.name} ran longer than its timeout of {call.timeout:g} s "
        f"(attempt {call.number}); {how}",
        node=call.name,
        timeout=call.timeout,
    )


def describe_exception(exc: BaseException) -> tuple[str, str]:
    """``(qualified type name, str(exc))``, whatever the exception's ``__str__`` does."""
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}", safe_str(exc)


class _ByState:
    """Pickles as :func:`rebuild_exception` of what it holds."""

    def __init__(self, kind: type, args: tuple[Any, ...], state: dict[str, Any]) -> None:
        self.reduced = (rebuild_exception, (kind, args, state))

    def __reduce__(self) -> Any:
        return self.reduced


class _ExceptionPickler(cloudpickle.Pickler):
    """Pickles exceptions the standard way, ``type(*args)`` plus ``__dict__``.

    dask.distributed installs tblib's reducers on every exception class in the
    processes that import it; they rebuild an exception without calling its
    ``__init__``, so a ``SystemExit(4)`` arrives with ``code`` None. An
    exception class that defines its own ``__reduce__`` keeps it.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException) and type(obj).__reduce__ is BaseException.__reduce__:
            return obj.__reduce__()
        return super().reducer_override(obj)


def _dumps_exception(exc: BaseException) -> bytes:
    buffer = io.BytesIO()
    _ExceptionPickler(buffer, protocol=PROTOCOL).dump(exc)
    return buffer.getvalue()


def rebuild_exception(kind: type, args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """An exception rebuilt from what its instance held, without calling its own
    ``__init__`` (see :func:`pickle_exception`): its builtin base's ``__init__``
    sets that base's fields from ``args`` (``SystemExit.code``,
    ``StopIteration.value``), then its attributes are put back."""
    exc = kind.__new__(kind, *args)
    base = next(k for k in kind.__mro__ if k.__module__ == "builtins")
    base.__init__(exc, *args)  # type: ignore[misc]  # (the base of kind, on its instance)
    for name, value in state.items():
        setattr(exc, name, value)
    return exc


def _state_of(exc: BaseException) -> dict[str, Any]:
    """What an exception's instance holds beyond ``args``: its ``__dict__`` and the
    slots of its classes."""
    state = dict(getattr(exc, "__dict__", {}))
    for klass in type(exc).__mro__:
        if klass.__module__ == "builtins":
            break
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(exc, name):
                state[name] = getattr(exc, name)
    return state


def pickle_exception(exc: BaseException, tb: str, name: str | None = None) -> bytes:
    """Pickle ``exc`` if it survives a round trip, else a RemoteError standing in for it.

    The standard way first (``type(*args)`` plus ``__dict__``); an exception whose
    ``__init__`` does not take its own ``args`` back (keyword-only or several
    parameters, a message built from them: common in user code) is then sent by
    state, rebuilt without ``__init__`` (:func:`rebuild_exception`): it arrives as
    its own type, so ``retry_on=`` and ``except`` clauses still match it.
    """
    try:
        blob = _dumps_exception(exc)
        pickle.loads(blob)  # e.g. __init__ with required keyword arguments fails here
        return blob
    except BaseException:
        pass
    try:
        if type(exc).__reduce__ is not BaseException.__reduce__:
            raise TypeError("its class pickles itself, and that failed")
        blob = dumps(_ByState(type(exc), exc.args, _state_of(exc)))
        str(pickle.loads(blob))  # whole: its __str__ finds what it reads
        return blob
    except BaseException as why:
        type_name, text = describe_exception(exc)
        who = f"{name} raised " if name else ""
        stand_in = RemoteError(
            f"{who}{type_name}: {text} (the exception itself could not be sent back from "
            f"the worker: {describe_exception(why)[1]}; its traceback is attached)",
            node=name,
            type_name=type_name,
            original_message=text,
            remote_traceback=tb,
        )
        return dumps(stand_in)


def load_exception(
    blob: bytes, tb: str, name: str, summary: tuple[str, str] | None = None
) -> BaseException:
    """The exception a worker sent back, or a :class:`RemoteError` standing in for it.

    ``summary`` is ``(type name, message)`` as the worker saw them, so the
    stand-in keeps both even when the exception cannot be rebuilt here (its
    class exists only in the worker, its ``__reduce__`` fails in this process).
    """
    type_name, text = summary if summary is not None else (None, None)
    try:
        exc = pickle.loads(blob)
    except KeyboardInterrupt:
        raise
    except BaseException as why:  # SystemExit too (a module whose import exits): one node's
        what = f"{type_name}: {text}" if type_name else "an exception"
        exc = RemoteError(
            f"{name} raised {what} (it could not be unpickled in the parent: "
            f"{type(why).__name__}: {why}; its traceback is attached)",
            node=name,
            type_name=type_name,
            original_message=text,
            remote_traceback=tb,
        )
    if not isinstance(exc, BaseException):
        exc = RemoteError(
            f"{name} failed: {exc!r}",
            node=name,
            type_name=type_name,
            original_message=text,
            remote_traceback=tb,
        )
    exc.__cause__ = RemoteTraceback(tb)
    return exc
