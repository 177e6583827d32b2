"""The run's JSON document: write it, and read it back as a :class:`LoadedRun`.

The document (``"format": "graphexec.run"``, ``"version": 1``) holds,
for every node of the run in graph order: its ``id`` (its position in the
list, used by ``edges``), ``name``, ``task``, final ``state``, ``message``,
``error``, ``handled``, ``upstream_failure`` (the root failure that skipped
it), ``duration`` and its ``attempts`` (``number``, wall-clock ``started`` and
``finished`` from ``time.time()``, ``worker``, ``error``, ``retry_delay``).
An error is ``{"type", "module", "message", "traceback", "attributes"}``:
``traceback`` is the worker's traceback text, ``attributes`` the fields of
graphexec's own errors (``exitcode``, ``signal_name``, ``upstream``, ...).
A run that did not end has ``"interrupted"``, saying why, and ``"ok": false``:
one Ctrl-C or SIGTERM cancelled (``"cancelled by Ctrl-C"``), or one loaded
from the record of a parent killed mid-run, whose nodes that were running
are ``Running``, those that never began ``Pending``.
``edges`` are ``[upstream id, dependent id, kind]`` with kind ``data``,
``order`` (``wait_for``), either followed by ``+allow_failure``. Values are
never written: they can be large and need not be JSON.

:func:`run_from_json` gives back a real :class:`Run` (a :class:`LoadedRun`)
over a rebuilt graph whose tasks cannot run: states, attempts, ``summary()``,
``failed``, ``skipped``, ``counts()``, ``to_html()`` and
``run.graph.visualize()`` work; reading a value raises. Exceptions come back
as their own class when it is a builtin or one of graphexec's, else as a
:class:`RemoteError` subclass with the original class name (nothing from the
document is imported or executed).

How an error reads as text: :func:`traceback_text` here, ``safe_str`` and
``one_line`` in ``_model/errors.py`` (run hooks use them too): the page, the
picture and a hook's state show the same words.
"""

from __future__ import annotations

import builtins
import json
import traceback
from typing import Any

from ..._model import errors as _errors
from ..._model.errors import GraphexecError, RemoteError, RemoteTraceback, safe_str
from ..._model.graph import ALLOW, DATA, ORDER, Graph, Node
from ..._model.options import TaskOptions
from ..._model.run import Run
from ..._model.state import CANONICAL, PENDING, STATE_ORDER, Attempt, State
from ..._model.task import Task

FORMAT = "graphexec.run"
VERSION = 1


def run_to_dict(run: Run) -> dict[str, Any]:
    """The JSON document of ``run`` as plain dicts and lists (see the module docstring)."""
    graph = run.graph
    members = sorted(run.members)  # graph order: every upstream before its dependents
    position = {i: k for k, i in enumerate(members)}
    nodes = []
    edges = []
    for k, i in enumerate(members):
        nodes.append(node_record(run, i, k, run._states[i]))
        flags = graph._flags[i]
        for j, up in enumerate(graph._deps[i]):
            if up in position:
                edges.append([position[up], k, _edge_kind(DATA if flags is None else flags[j])])
    counts = run.counts()
    document = {
        "format": FORMAT,
        "version": VERSION,
        "graph": graph.name,
        "started": run.started,
        "finished": run.finished,
        "duration": run.duration,
        "ok": run.ok,
        "counts": {s: counts[s] for s in STATE_ORDER if s in counts},
        "nodes": nodes,
        "edges": edges,
    }
    if run._interrupted is not None:  # only then: documents of ended runs are unchanged
        document["interrupted"] = run._interrupted
    return document


def node_record(run: Run, i: int, k: int, state: State | None) -> dict[str, Any]:
    """The document's record of node ``i`` (its ``id`` is ``k``) in ``state``."""
    return {
        "id": k,
        "name": run.graph._names[i],
        "task": run.graph._tasks[i].name,
        "state": state.name if state is not None else PENDING,
        "message": state.message if state is not None else "",
        "error": _error_record(state.exception) if state is not None else None,
        "handled": i in run._handled,
        "upstream_failure": state.upstream if state is not None else None,
        "duration": state.duration if state is not None else 0.0,
        "attempts": [_attempt_record(a) for a in state.history] if state else [],
    }


def edge_kind(graph: Graph, i: int, j: int) -> str:
    """How node ``i`` uses its ``j``-th upstream, as the document writes it."""
    flags = graph._flags[i]
    return _edge_kind(DATA if flags is None else flags[j])


def run_to_json(run: Run, indent: int | None = None) -> str:
    """``run`` as a JSON document (see the module docstring)."""
    return json.dumps(run_to_dict(run), indent=indent, ensure_ascii=False)


def _attempt_record(a: Attempt) -> dict[str, Any]:
    return {
        "number": a.number,
        "started": a.started,
        "finished": a.finished,
        "worker": worker_id(a.worker),
        "error": _error_record(a.error),
        "retry_delay": a.retry_delay,
    }


def worker_id(worker: Any) -> int | str | None:
    """How the document writes the worker of an attempt (an id, else its text)."""
    if worker is None or (isinstance(worker, (int, str)) and not isinstance(worker, bool)):
        return worker
    return str(worker)


def _edge_kind(flag: int) -> str:
    parts = [word for bit, word in ((DATA, "data"), (ORDER, "order")) if flag & bit]
    if flag & ALLOW:
        parts.append("allow_failure")
    return "+".join(parts)


def _parse_edge_kind(kind: str) -> int:
    bits = {"data": DATA, "order": ORDER, "allow_failure": ALLOW}
    flag = 0
    for word in kind.split("+"):
        if word not in bits:
            raise ValueError(f"unknown edge kind {kind!r} in a graphexec run document")
        flag |= bits[word]
    return flag


def _error_record(exc: BaseException | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    cls = type(exc)
    record: dict[str, Any] = {
        "type": cls.__qualname__,
        "module": cls.__module__,
        "message": safe_str(exc),
        "traceback": traceback_text(exc),
    }
    if isinstance(exc, GraphexecError) and not getattr(cls, "_gx_stand_in", False):
        attrs = {
            k: v
            for k, v in vars(exc).items()
            if not k.startswith("_") and (v is None or isinstance(v, (str, int, float, bool)))
        }
        if attrs:
            record["attributes"] = attrs
    return record


def traceback_text(exc: BaseException) -> str | None:
    """The traceback where the exception was raised: the worker's text when remote."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        return cause.tb
    remote = getattr(exc, "remote_traceback", None)
    if isinstance(remote, str) and remote:
        return remote
    if exc.__traceback__ is not None:  # raised in this process (sync, threads)
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return None


class LoadedRun(Run):
    """A :class:`Run` read back with :meth:`Run.from_json`: states and timings, no values.

    Its graph is rebuilt with the node names, task names and edges of the
    document; its tasks cannot run. Everything that reads states works
    (``summary()``, ``failed``, ``skipped``, ``counts()``, ``state(node)``,
    ``to_html()``, ``run.graph.visualize()``); ``run[node]`` of a node that
    produced a value raises, since values are not part of the document.
    """

    def result(self, node: Node | str, raise_on_failure: bool = True) -> Any:
        state = self.state(node)
        if state.is_completed():
            raise GraphexecError(
                f"{state.node} completed, but its value is not in the JSON document this run "
                "was loaded from (Run.from_json keeps states, timings and errors, not values)"
            )
        return state.result(raise_on_failure=raise_on_failure)

    def __repr__(self) -> str:
        return super().__repr__().replace("<Run ", "<Run (from JSON) ", 1)


def run_from_json(text: str | bytes) -> LoadedRun:
    """Rebuild a run from :func:`run_to_json`'s document.

    Raises:
        ValueError: the text is not JSON, or not a graphexec run document of a
            version this graphexec reads.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Run.from_json: not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            "Run.from_json: not a graphexec run document (expected "
            f'"format": {FORMAT!r}, as written by run.to_json())'
        )
    if data.get("version") != VERSION:
        raise ValueError(
            f"Run.from_json: document version {data.get('version')!r}; this "
            f"graphexec reads version {VERSION}"
        )
    return run_from_dict(data)


def run_from_dict(data: dict[str, Any], cls: type[LoadedRun] | None = None) -> LoadedRun:
    """The run of a document already parsed (a saved run's records build one too)."""
    records = data["nodes"]
    graph = Graph(data["graph"])
    tasks: dict[str, Task] = {}
    deps: list[list[int]] = [[] for _ in records]
    flags: list[list[int]] = [[] for _ in records]
    for up, down, kind in data["edges"]:
        deps[down].append(up)
        flags[down].append(_parse_edge_kind(kind))
    for k, record in enumerate(records):
        if record["id"] != k:
            raise ValueError(f"Run.from_json: node {k} has id {record['id']!r}")
        task = tasks.get(record["task"])
        if task is None:
            task = tasks[record["task"]] = _placeholder_task(record["task"])
        graph._tasks.append(task)
        graph._opts.append(task.options)
        graph._args.append(())
        graph._kwargs.append(None)
        graph._deps.append(tuple(deps[k]))
        graph._flags.append(None if all(f == DATA for f in flags[k]) else tuple(flags[k]))
        graph._names.append(record["name"])
        graph._nodes.append(Node(graph, k))
    run = (cls or LoadedRun)(graph, list(range(len(records))), set())
    run.started = data["started"]
    run.finished = data["finished"]
    if data.get("interrupted"):
        run._interrupted = str(data["interrupted"])
    for k, record in enumerate(records):
        run._states[k] = _state_from_record(record)
        if record.get("handled"):
            run._handled.add(k)
    graph._latest_run = run
    return run


def _placeholder_task(name: str) -> Task:
    def not_stored(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"task {name!r} was loaded from a run's JSON document: its "
            "function is not stored there, so it cannot run"
        )

    not_stored.__name__ = not_stored.__qualname__ = name
    options = TaskOptions()
    options.name = name
    return Task(not_stored, options)


def _state_from_record(record: dict[str, Any]) -> State | None:
    name = CANONICAL.get(record["state"])
    if name is None:
        raise ValueError(f"Run.from_json: unknown state {record['state']!r}")
    if name is PENDING:
        return None
    history = []
    last_error: tuple[Any, BaseException | None] = (None, None)
    for a in record["attempts"]:
        error = _error_from_record(a["error"])
        attempt = Attempt(a["number"], a["started"], a["finished"], a["worker"], error)
        attempt.retry_delay = a.get("retry_delay")
        history.append(attempt)
        last_error = (a["error"], error)
    # The final state's exception is usually the last attempt's: keep them one object.
    exc = (
        last_error[1]
        if record["error"] is not None and record["error"] == last_error[0]
        else _error_from_record(record["error"])
    )
    state = State(
        name,
        record["name"],
        exception=exc,
        history=history,
        upstream=record.get("upstream_failure"),
        message=record.get("message", ""),
    )
    if state.is_completed():
        state._release()  # the value is not in the document
    return state


_STAND_INS: dict[tuple[str, str, bool], type] = {}


def _error_from_record(record: dict[str, Any] | None) -> BaseException | None:
    if record is None:
        return None
    module, qualname, message = record["module"], record["type"], record["message"]
    tb = record.get("traceback")
    exc: BaseException | None = None
    if module.split(".")[0] == "graphexec":
        cls = getattr(_errors, qualname, None)
        if isinstance(cls, type) and issubclass(cls, GraphexecError):
            try:
                exc = cls(message, **record.get("attributes", {}))
            except Exception:
                exc = None
    if exc is None:
        exc = loaded_error(module, qualname, message, tb)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc


def loaded_error(module: str, qualname: str, message: str, tb: str | None) -> BaseException:
    """An exception standing for one read from a document: same class name and message.

    It is a :class:`RemoteError` (``.type_name``, ``.original_message``,
    ``.remote_traceback``), and also an instance of the builtin class when the
    original was a builtin (``isinstance(exc, ValueError)`` holds).
    """
    type_name = qualname if module == "builtins" else f"{module}.{qualname}"
    attrs = {"type_name": type_name, "original_message": message, "remote_traceback": tb}
    for mixin in (True, False):
        cls = _stand_in_class(module, qualname, mixin)
        try:
            return cls(message, **attrs)
        except Exception:  # a builtin whose constructor wants other arguments
            continue
    raise AssertionError("unreachable: the plain stand-in takes a message")


def _stand_in_class(module: str, qualname: str, mixin: bool) -> type:
    key = (module, qualname, mixin)
    cls = _STAND_INS.get(key)
    if cls is not None:
        return cls
    bases: tuple[type, ...] = (RemoteError,)
    builtin = getattr(builtins, qualname, None) if module == "builtins" and mixin else None
    if (
        isinstance(builtin, type)
        and issubclass(builtin, BaseException)
        and not issubclass(RemoteError, builtin)
    ):
        bases = (RemoteError, builtin)
    namespace = {
        "__module__": module,
        "__qualname__": qualname,
        "__doc__": f"Stands for {qualname} read from a graphexec run document.",
        "_gx_stand_in": True,
        "__str__": lambda self: self.original_message,
        "__reduce__": lambda self: (
            loaded_error,
            (module, qualname, self.original_message, self.remote_traceback),
        ),
    }
    try:
        cls = type(qualname.rsplit(".", 1)[-1], bases, namespace)
    except TypeError:  # an instance layout that cannot be combined
        cls = type(qualname.rsplit(".", 1)[-1], (RemoteError,), namespace)
    _STAND_INS[key] = cls
    return cls
