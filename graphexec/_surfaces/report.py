"""Reports on a finished run: JSON for tools, one self-contained HTML page, the graph drawn.

::

    Run ──run_to_dict──> dict ──json──> text ──run_from_json──> LoadedRun (a Run)
     │                     │
     │                     └──run_to_html──> report.html: summary table, per-worker
     │                                       timeline (inline SVG drawn by inline JS)
    Graph (+ its latest Run) ──visualize──> .dot / .svg / .png through graphviz

The JSON document (``"format": "graphexec.run"``, ``"version": 1``) holds,
for every node of the run in graph order: its ``id`` (its position in the
list, used by ``edges``), ``name``, ``task``, final ``state``, ``message``,
``error``, ``handled``, ``upstream_failure`` (the root failure that skipped
it), ``duration`` and its ``attempts`` (``number``, wall-clock ``started`` and
``finished`` from ``time.time()``, ``worker``, ``error``, ``retry_delay``).
An error is ``{"type", "module", "message", "traceback", "attributes"}``:
``traceback`` is the worker's traceback text, ``attributes`` the fields of
graphexec's own errors (``exitcode``, ``signal_name``, ``upstream``, ...).
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
"""

from __future__ import annotations

import builtins
import html
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._model import errors as _errors
from .._model.errors import GraphexecError, RemoteError, RemoteTraceback
from .._model.graph import ALLOW, DATA, ORDER, Graph, Node
from .._model.options import TaskOptions
from .._model.run import Run
from .._model.state import (
    _CANONICAL,
    CACHED,
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    SKIPPED,
    Attempt,
    State,
)
from .._model.task import Task
from .._version import __version__

if TYPE_CHECKING:
    import graphviz

FORMAT = "graphexec.run"
VERSION = 1

# Above this many nodes, visualize() draws one box per task instead of one per node.
COLLAPSE_ABOVE = 200

# Tracebacks embedded in one HTML page, in characters: beyond this, failures keep
# their one-line error and the page stays small enough to open.
HTML_TRACEBACK_BUDGET = 2_000_000

STATE_ORDER = (COMPLETED, CACHED, FAILED, SKIPPED, CANCELLED, PENDING)

# One palette for the page and the picture: green done, blue cached, red failed,
# grey skipped/cancelled, amber for failed attempts that were retried.
STATE_COLOURS = {
    COMPLETED: "#3f9b5f",
    CACHED: "#4a7fc1",
    FAILED: "#d64545",
    SKIPPED: "#b8bec6",
    CANCELLED: "#7c8591",
    PENDING: "#ffffff",
}
RETRY_COLOUR = "#f0a030"
# Light fills for graph nodes, so that black text stays readable.
STATE_FILLS = {
    COMPLETED: "#cdebd6",
    CACHED: "#d3e3f6",
    FAILED: "#f6c9c9",
    SKIPPED: "#eceef1",
    CANCELLED: "#dadde2",
    PENDING: "#ffffff",
}
STATE_WORDS = {
    COMPLETED: "ok",
    CACHED: "cached",
    FAILED: "failed",
    SKIPPED: "skipped",
    CANCELLED: "cancelled",
    PENDING: "not run",
}


# -- JSON ------------------------------------------------------------------------


def run_to_dict(run: Run) -> dict[str, Any]:
    """The JSON document of ``run`` as plain dicts and lists (see the module docstring)."""
    graph = run.graph
    members = sorted(run.members)  # graph order: every upstream before its dependents
    position = {i: k for k, i in enumerate(members)}
    nodes = []
    edges = []
    for k, i in enumerate(members):
        state = run._states[i]
        record: dict[str, Any] = {
            "id": k,
            "name": graph._names[i],
            "task": graph._tasks[i].name,
            "state": state.name if state is not None else PENDING,
            "message": state.message if state is not None else "",
            "error": _error_record(state.exception) if state is not None else None,
            "handled": i in run._handled,
            "upstream_failure": state.upstream if state is not None else None,
            "duration": state.duration if state is not None else 0.0,
            "attempts": [_attempt_record(a) for a in state.history] if state else [],
        }
        nodes.append(record)
        flags = graph._flags[i]
        for j, up in enumerate(graph._deps[i]):
            if up in position:
                edges.append([position[up], k, _edge_kind(DATA if flags is None else flags[j])])
    counts = run.counts()
    return {
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


def run_to_json(run: Run, indent: int | None = None) -> str:
    """``run`` as a JSON document (see the module docstring)."""
    return json.dumps(run_to_dict(run), indent=indent, ensure_ascii=False)


def _attempt_record(a: Attempt) -> dict[str, Any]:
    return {
        "number": a.number,
        "started": a.started,
        "finished": a.finished,
        "worker": _worker_id(a.worker),
        "error": _error_record(a.error),
        "retry_delay": a.retry_delay,
    }


def _worker_id(worker: Any) -> int | str | None:
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
        "message": _safe_str(exc),
        "traceback": _traceback_text(exc),
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


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a user's __str__ that raises must not break the report
        return f"<str() of {type(exc).__name__} failed>"


def _traceback_text(exc: BaseException) -> str | None:
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

    def result(self, node: Node, raise_on_failure: bool = True) -> Any:
        state = self.state(node)
        if state.is_completed():
            raise GraphexecError(
                f"{node.name} completed, but its value is not in the JSON document this run "
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
    run = LoadedRun(graph, list(range(len(records))), set())
    run.started = data["started"]
    run.finished = data["finished"]
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
    name = _CANONICAL.get(record["state"])
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


# -- HTML ------------------------------------------------------------------------


def run_to_html(run: Run, path: str | os.PathLike[str]) -> Path:
    """Write the run report to ``path``: one HTML file that needs no network."""
    path = Path(path)
    data = _timeline_data(run)
    graph = run.graph
    counts = run.counts()
    unhandled = len(run.unhandled)
    if unhandled:
        status = (
            f'<span class="badge bad">{unhandled} unhandled failure'
            f"{'s' if unhandled != 1 else ''}</span>"
        )
    elif counts.get(FAILED):
        status = '<span class="badge warn">ok — failures handled</span>'
    else:
        status = '<span class="badge good">ok</span>'
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started))
    busy = sum(b[2] - b[1] for b in data["bars"])
    lanes = max(len(data["lanes"]), 1)
    utilisation = busy / (lanes * data["span"]) if data["span"] > 0 else 0.0
    retries = sum(max(0, len(s.history) - 1) for s in _states(run) if s is not None)
    cards = [
        ("nodes", f"{len(run.members):,}", ""),
        *((s.lower(), f"{counts[s]:,}", s) for s in STATE_ORDER if counts.get(s)),
        ("retries", f"{retries:,}", "retry" if retries else ""),
        ("wall time", _fmt_seconds(run.duration), ""),
        ("workers", f"{len(data['lanes'])}", ""),
        ("busy", f"{utilisation:.0%}", ""),
    ]
    card_html = "".join(
        f'<div class="card{" c-" + cls.lower() if cls else ""}"><div class="v">{v}</div>'
        f'<div class="k">{html.escape(k)}</div></div>'
        for k, v, cls in cards
    )
    page = _PAGE.format(
        title=html.escape(f"{graph.name} — graphexec run report"),
        name=html.escape(graph.name),
        status=status,
        meta=html.escape(
            f"started {started} · {len(run.members):,} nodes · {_fmt_seconds(run.duration)}"
        ),
        cards=card_html,
        summary=_summary_table(run),
        failures=_failures_section(run),
        skipped=_skipped_section(run),
        version=html.escape(__version__),
        generated=html.escape(time.strftime("%Y-%m-%d %H:%M:%S")),
        css=_CSS,
        js=_JS,
        data=json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        .replace("</", "<\\/")
        .replace("<!--", "<\\!--"),
    )
    path.write_text(page, encoding="utf-8")
    return path


def _states(run: Run) -> list[State | None]:
    return [run._states[i] for i in run.members]


def _timeline_data(run: Run) -> dict[str, Any]:
    """What the page's script draws: lanes, one bar per attempt, nodes, errors."""
    graph = run.graph
    members = sorted(run.members)
    task_index: dict[str, int] = {}
    nodes: list[list[Any]] = []
    errors: list[list[Any]] = []  # [one line, traceback or None]
    budget = HTML_TRACEBACK_BUDGET
    lane_of: dict[Any, int] = {}
    bars: list[list[Any]] = []
    t0 = run.started
    end = run.duration

    def error_index(exc: BaseException | None) -> int:
        nonlocal budget
        if exc is None:
            return -1
        tb = _traceback_text(exc)
        if tb is not None and len(tb) <= budget:
            budget -= len(tb)
        else:
            tb = None
        errors.append([_one_line(exc), tb])
        return len(errors) - 1

    raw: list[tuple[Any, float, float, int, int, int, int]] = []
    for k, i in enumerate(members):
        state = run._states[i]
        task = graph._tasks[i].name
        t = task_index.setdefault(task, len(task_index))
        name = state.name if state is not None else PENDING
        history = state.history if state is not None else []
        for n, a in enumerate(history):
            last_attempt = n == len(history) - 1
            if a.error is not None:
                kind = 1 if last_attempt and name is FAILED else 2
            else:
                kind = 3 if last_attempt and name is CANCELLED else 0
            e = error_index(a.error)
            start = a.started if a.started > 0 else a.finished
            raw.append((a.worker, start - t0, max(a.finished - t0, start - t0), k, n + 1, kind, e))
            end = max(end, a.finished - t0)
        nodes.append([graph._names[i], t, name, len(history)])
    for worker in sorted({r[0] for r in raw}, key=_lane_key):
        lane_of[worker] = len(lane_of)
    for worker, start, finish, k, n, kind, e in sorted(raw, key=lambda r: r[1]):
        bars.append([lane_of[worker], round(start, 6), round(finish, 6), k, n, kind, e])
    return {
        "graph": graph.name,
        "span": max(end, 1e-6),
        "tasks": list(task_index),
        "lanes": [_lane_label(w) for w in lane_of],
        "nodes": nodes,
        "bars": bars,
        "errors": errors,
        "colours": {"state": STATE_COLOURS, "retry": RETRY_COLOUR},
    }


def _lane_key(worker: Any) -> tuple[int, Any]:
    if worker is None:
        return (2, "")
    if isinstance(worker, int):
        return (0, worker)
    return (1, str(worker))


def _lane_label(worker: Any) -> str:
    if worker is None:
        return "not started"
    if isinstance(worker, int):
        return f"worker {worker}"
    return str(worker)


def _one_line(exc: BaseException) -> str:
    text = _safe_str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600:
        return f"{int(s // 60)} min {s % 60:.0f} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def _summary_table(run: Run) -> str:
    """Per task: counts per state (with a bar of their shares), retries and durations."""
    graph = run.graph
    rows: dict[str, dict[str, Any]] = {}
    for i in run.members:
        task = graph._tasks[i].name
        row = rows.setdefault(
            task, {"counts": dict.fromkeys(STATE_ORDER, 0), "total": 0.0, "max": 0.0, "retries": 0}
        )
        state = run._states[i]
        name = state.name if state is not None else PENDING
        row["counts"][name] = row["counts"].get(name, 0) + 1
        if state is not None and state.history:
            d = state.duration
            row["total"] += d
            row["max"] = max(row["max"], d)
            row["retries"] += len(state.history) - 1
    columns = [s for s in STATE_ORDER if any(r["counts"][s] for r in rows.values())]
    head = "".join(
        f'<th class="num"><span class="dot s-{s.lower()}"></span>{s}</th>' for s in columns
    )
    body = []
    for task, row in rows.items():
        c = row["counts"]
        total_nodes = sum(c.values())
        ran = (c[COMPLETED] + c[FAILED]) or 1
        share = "".join(
            f'<span class="s-{s.lower()}" style="width:{100 * c[s] / total_nodes:.3f}%" '
            f'title="{c[s]:,} {s.lower()}"></span>'
            for s in columns
            if c[s]
        )
        cells = "".join(
            f'<td class="num{" zero" if not c[s] else ""}">{c[s]:,}</td>' for s in columns
        )
        body.append(
            f'<tr><td class="task">{html.escape(task)}</td><td class="num">{total_nodes:,}</td>'
            f'<td class="share"><div class="stack">{share}</div></td>{cells}'
            f'<td class="num{" zero" if not row["retries"] else ""}">{row["retries"]:,}</td>'
            f'<td class="num">{row["total"]:.3f}</td><td class="num">{row["total"] / ran:.3f}</td>'
            f'<td class="num">{row["max"]:.3f}</td></tr>'
        )
    return (
        '<table id="gx-summary" class="grid"><thead><tr><th>task</th><th class="num">nodes</th>'
        f'<th>states</th>{head}<th class="num">retries</th><th class="num">total s</th>'
        f'<th class="num">mean s</th><th class="num">max s</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _failures_section(run: Run, limit: int = 200) -> str:
    failed = run.failed
    if not failed:
        return ""
    rows = []
    for node in failed[:limit]:
        state = run._states[node.index]
        exc = state.exception
        tb = _traceback_text(exc) if exc is not None else None
        detail = (
            f"<details><summary>traceback</summary><pre>{html.escape(tb)}</pre></details>"
            if tb
            else ""
        )
        handled = (
            '<span class="badge warn small">handled</span>' if node.index in run._handled else ""
        )
        rows.append(
            f'<tr class="gx-failure"><td class="task">{html.escape(node.name)} {handled}</td>'
            f'<td>{html.escape(node.task.name)}</td><td class="num">{state.attempts}</td>'
            f'<td class="err"><code>{html.escape(_one_line(exc)) if exc else ""}</code>'
            f"{detail}</td></tr>"
        )
    more = (
        f'<p class="muted">… and {len(failed) - limit:,} more failed nodes '
        "(run.failed lists them all).</p>"
        if len(failed) > limit
        else ""
    )
    return (
        f'<section><h2>Failures <span class="count">{len(failed):,}</span></h2>'
        '<table id="gx-failures" class="grid"><thead><tr><th>node</th><th>task</th>'
        '<th class="num">attempts</th><th>error</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>{more}</section>"
    )


def _skipped_section(run: Run, limit: int = 200) -> str:
    skipped = run.skipped
    if not skipped:
        return ""
    items = "".join(
        f"<li><b>{html.escape(n.name)}</b> — {html.escape(run._states[n.index].message)}</li>"
        for n in skipped[:limit]
    )
    more = f"<li>… and {len(skipped) - limit:,} more</li>" if len(skipped) > limit else ""
    return (
        f'<section><details id="gx-skipped"><summary><h2>Skipped <span class="count">'
        f'{len(skipped):,}</span></h2></summary><ul class="skips">{items}{more}</ul>'
        "</details></section>"
    )


_CSS = """
:root{--fg:#1f2933;--muted:#6b7785;--line:#e3e7ec;--bg:#f6f8fa;--card:#fff;
--ok:#3f9b5f;--cached:#4a7fc1;--failed:#d64545;--skipped:#b8bec6;--cancelled:#7c8591;
--retry:#f0a030;--accent:#2f5d8a}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,
"Noto Sans","DejaVu Sans",sans-serif}
header{background:#1f2f45;color:#fff;padding:18px 28px 16px}
header h1{margin:0;font-size:20px;font-weight:600;letter-spacing:.2px}
header h1 small{font-weight:400;color:#aab8c8;font-size:14px;margin-left:8px}
header .meta{color:#c3cfdc;margin-top:4px;font-size:13px}
main{padding:18px 28px 28px;max-width:1800px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:14px 18px 16px;margin:0 0 18px;box-shadow:0 1px 2px rgba(16,24,40,.04)}
h2{font-size:15px;margin:0 0 10px;font-weight:600;display:inline-block}
h2 .count{background:var(--bg);border:1px solid var(--line);border-radius:10px;
padding:0 8px;font-size:12px;font-weight:500;color:var(--muted);margin-left:4px}
.badge{display:inline-block;border-radius:12px;padding:2px 10px;font-size:12px;
font-weight:600;vertical-align:middle;margin-left:10px}
.badge.small{margin-left:6px;padding:0 7px;font-size:11px}
.badge.good{background:#d9f2e1;color:#1d6b3a}
.badge.bad{background:#fbdada;color:#9b1c1c}
.badge.warn{background:#fdecc8;color:#8a5300}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:0 0 18px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:8px 14px;min-width:104px;border-top:3px solid #c9d2dc}
.card .v{font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}
.card .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.4px}
.card.c-completed{border-top-color:var(--ok)}.card.c-cached{border-top-color:var(--cached)}
.card.c-failed{border-top-color:var(--failed)}.card.c-failed .v{color:var(--failed)}
.card.c-skipped{border-top-color:var(--skipped)}
.card.c-cancelled{border-top-color:var(--cancelled)}.card.c-retry{border-top-color:var(--retry)}
table.grid{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
.grid th{text-align:left;font-weight:600;color:var(--muted);font-size:12px;
text-transform:uppercase;letter-spacing:.3px;border-bottom:2px solid var(--line);
padding:6px 10px;white-space:nowrap}
.grid td{border-bottom:1px solid var(--line);padding:6px 10px;vertical-align:top}
.grid tbody tr:hover{background:#f9fbfd}
.grid .num{text-align:right}.grid td.zero{color:#c3cad3}
.grid td.task{font-weight:600;white-space:nowrap}
td.share{width:22%;min-width:120px;vertical-align:middle}
.stack{display:flex;height:10px;border-radius:5px;overflow:hidden;background:#eef1f4}
.stack span{display:block;height:100%}
.s-completed{background:var(--ok)}.s-cached{background:var(--cached)}
.s-failed{background:var(--failed)}.s-skipped{background:var(--skipped)}
.s-cancelled{background:var(--cancelled)}.s-pending{background:#e3e7ec}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:5px;
vertical-align:baseline}
td.err code{color:#9b1c1c;white-space:pre-wrap;word-break:break-word}
details summary{cursor:pointer;color:var(--accent);font-size:12px}
details summary h2{cursor:pointer}
pre{background:#1f2933;color:#e6edf3;padding:10px 12px;border-radius:6px;overflow:auto;
font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;
max-height:340px;margin:6px 0 0}
.muted{color:var(--muted)}
ul.skips{margin:8px 0 0;padding-left:18px;columns:2;column-gap:32px;font-size:13px}
.toolbar{display:flex;align-items:center;gap:14px;flex-wrap:wrap;margin:0 0 8px}
.toolbar .spacer{flex:1}
.toolbar button{border:1px solid var(--line);background:#fff;border-radius:6px;
padding:2px 10px;font-size:13px;cursor:pointer;color:var(--fg)}
.toolbar button:hover{background:var(--bg)}
.legend{display:flex;gap:14px;flex-wrap:wrap;font-size:12px;color:var(--muted)}
.legend i{display:inline-block;width:14px;height:10px;border-radius:2px;margin-right:5px;
vertical-align:-1px}
.legend i.failed{background:var(--failed);outline:1.5px solid #7f1d1d}
.legend i.retried{background:repeating-linear-gradient(135deg,var(--retry) 0 3px,
#fbd38d 3px 6px)}
.legend i.cancelled{background:repeating-linear-gradient(135deg,#9aa3ad 0 3px,#d5dae0 3px 6px)}
.tl{display:flex;border:1px solid var(--line);border-radius:6px;overflow:hidden}
.tl-labels{flex:0 0 auto;background:#fbfcfd;border-right:1px solid var(--line)}
.tl-scroll{flex:1 1 auto;overflow-x:auto;overflow-y:hidden}
svg text{font-size:11px;fill:#52606d}
svg .gx-lane-label{font-size:12px;fill:var(--fg);font-weight:500}
svg .gx-lane-sub{font-size:10px;fill:var(--muted)}
svg .gx-bar{cursor:pointer}
svg .gx-bar:hover{stroke:#111;stroke-width:1.5}
svg .gx-bar.gx-failed{stroke:#7f1d1d;stroke-width:1.5}
svg .gx-bar.gx-sel{stroke:#111;stroke-width:2.5}
#gx-tip{position:fixed;pointer-events:none;background:#1f2933;color:#f1f5f9;
border-radius:6px;padding:8px 10px;font-size:12px;max-width:460px;display:none;z-index:10;
box-shadow:0 4px 14px rgba(0,0,0,.25)}
#gx-tip b{color:#fff}#gx-tip .e{color:#fca5a5;margin-top:4px;word-break:break-word}
#gx-tip .r{color:#cbd5e1}
#gx-detail{margin-top:12px;border-top:1px solid var(--line);padding-top:10px;display:none}
#gx-detail h3{margin:0 0 4px;font-size:14px}
#gx-detail table{font-size:13px;border-collapse:collapse}
#gx-detail td{padding:1px 14px 1px 0;vertical-align:top}
#gx-detail td:first-child{color:var(--muted)}
footer{color:var(--muted);font-size:12px;padding:0 28px 24px}
"""

_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("gx-data").textContent);
  // Task colours: no red or amber (failures and retries) and green only last
  // (green means completed in the table above).
  var PALETTE = ["#4e79a7", "#76b7b2", "#b07aa1", "#9c755f", "#2a7f7a", "#a49ad1",
                 "#4b5d73", "#8f9e3f", "#d4a6c8", "#a0cbe8", "#79706e", "#59a14f"];
  var ROW = 30, BAR = 20, AXIS = 26, LABEL = 170, PAD = 18;
  var labels = document.getElementById("gx-lanes");
  var scroll = document.getElementById("gx-scroll");
  var tip = document.getElementById("gx-tip");
  var detail = document.getElementById("gx-detail");
  var zoom = 1, selected = -1;

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }
  function fmt(s) {
    if (s === 0) return "0";
    if (s < 1e-3) return (s * 1e6).toFixed(0) + " \u00b5s";
    if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : 0) + " ms";
    if (s < 60) return s.toFixed(2) + " s";
    return Math.floor(s / 60) + " min " + (s % 60).toFixed(0) + " s";
  }
  function step(span, px) {
    var raw = span / Math.max(px / 110, 1), p = Math.pow(10, Math.floor(Math.log10(raw)));
    var m = [1, 2, 5, 10].find(function (k) { return k * p >= raw; });
    return m * p;
  }
  function colour(bar) {
    if (bar[5] === 1) return D.colours.state.Failed;
    if (bar[5] === 2) return "url(#gx-hatch-retry)";
    if (bar[5] === 3) return "url(#gx-hatch-cancel)";
    return PALETTE[D.nodes[bar[3]][1] % PALETTE.length];
  }
  var KIND = ["gx-ok", "gx-failed", "gx-retried", "gx-cancelled"];
  var busy = D.lanes.map(function () { return [0, 0]; });
  D.bars.forEach(function (b) { busy[b[0]][0] += b[2] - b[1]; busy[b[0]][1] += 1; });

  function drawLabels() {
    var h = AXIS + D.lanes.length * ROW + 6, out = [];
    out.push('<svg width="' + LABEL + '" height="' + h + '">');
    out.push('<text x="12" y="17" class="gx-lane-sub">worker</text>');
    D.lanes.forEach(function (name, k) {
      var y = AXIS + k * ROW;
      out.push('<g class="gx-lane-name"><text class="gx-lane-label" x="12" y="' + (y + 13) +
        '">' + esc(name) + '</text><text class="gx-lane-sub" x="12" y="' + (y + 25) + '">' +
        busy[k][1] + " attempts \u00b7 " + (100 * busy[k][0] / D.span).toFixed(0) +
        '% busy</text></g>');
    });
    out.push("</svg>");
    labels.innerHTML = out.join("");
  }

  function draw() {
    var width = Math.max(scroll.clientWidth - 2, 400) * zoom, plot = width - PAD * 2;
    var h = AXIS + D.lanes.length * ROW + 6, span = D.span, out = [];
    var x = function (t) { return PAD + (t / span) * plot; };
    out.push('<svg xmlns="http://www.w3.org/2000/svg" class="gx-gantt" width="' + width +
      '" height="' + h + '">');
    out.push('<defs><pattern id="gx-hatch-retry" width="6" height="6" ' +
      'patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" ' +
      'height="6" fill="#fbd38d"/><rect width="3" height="6" fill="' + D.colours.retry +
      '"/></pattern><pattern id="gx-hatch-cancel" width="6" height="6" ' +
      'patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" ' +
      'height="6" fill="#d5dae0"/><rect width="3" height="6" fill="#9aa3ad"/></pattern></defs>');
    D.lanes.forEach(function (name, k) {
      out.push('<g class="gx-lane" data-lane="' + k + '"><rect x="0" y="' + (AXIS + k * ROW) +
        '" width="' + width + '" height="' + ROW + '" fill="' + (k % 2 ? "#fafbfc" : "#fff") +
        '"/></g>');
    });
    var s = step(span, plot);
    for (var t = 0; t <= span + 1e-9; t += s) {
      var gx = x(t).toFixed(1);
      out.push('<line x1="' + gx + '" x2="' + gx + '" y1="' + (AXIS - 6) + '" y2="' + h +
        '" stroke="#e3e7ec"/><text x="' + gx + '" y="14" text-anchor="middle">' +
        esc(fmt(t)) + "</text>");
    }
    out.push('<line x1="0" x2="' + width + '" y1="' + AXIS + '" y2="' + AXIS +
      '" stroke="#cfd6de"/>');
    // ok bars first, failures and retries on top: at 10,000 bars they must still show
    D.bars.forEach(function (b, i) { if (b[5] === 0) bar(b, i); });
    D.bars.forEach(function (b, i) { if (b[5] !== 0) bar(b, i); });
    function bar(b, i) {
      var x0 = x(b[1]), w = Math.max(x(b[2]) - x0, 1.5), y = AXIS + b[0] * ROW + (ROW - BAR) / 2;
      var cls = "gx-bar " + KIND[b[5]] + (b[3] === selected ? " gx-sel" : "");
      out.push('<rect class="' + cls + '" data-b="' + i + '" x="' + x0.toFixed(2) + '" y="' +
        y + '" width="' + w.toFixed(2) + '" height="' + BAR + '" rx="2" fill="' + colour(b) +
        '"/>');
    }
    out.push("</svg>");
    scroll.innerHTML = out.join("");
  }

  function describe(b) {
    var n = D.nodes[b[3]], err = b[6] >= 0 ? D.errors[b[6]] : null;
    var what = ["completed", "failed", "failed, retried", "cancelled"][b[5]];
    return {node: n, err: err, what: what,
            attempt: "attempt " + b[4] + " of " + n[3], lane: D.lanes[b[0]]};
  }
  function showTip(ev, b) {
    var d = describe(b);
    tip.innerHTML = "<b>" + esc(d.node[0]) + "</b> <span class=\"r\">(" +
      esc(D.tasks[d.node[1]]) + ")</span><br>" + esc(d.attempt) + " \u00b7 " + esc(d.what) +
      "<br>" + esc(d.lane) + " \u00b7 " + fmt(b[2] - b[1]) + ", started at +" + fmt(b[1]) +
      (d.err ? '<div class="e">' + esc(d.err[0]) + "</div>" : "");
    tip.style.display = "block";
    var x = ev.clientX + 14, y = ev.clientY + 14;
    var r = tip.getBoundingClientRect();
    if (x + r.width > window.innerWidth - 8) x = ev.clientX - r.width - 14;
    if (y + r.height > window.innerHeight - 8) y = ev.clientY - r.height - 14;
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  function select(b) {
    selected = b ? b[3] : -1;
    scroll.querySelectorAll(".gx-bar").forEach(function (el) {
      el.classList.toggle("gx-sel", D.bars[+el.getAttribute("data-b")][3] === selected);
    });
    if (!b) { detail.style.display = "none"; return; }
    var d = describe(b), rows = [["task", D.tasks[d.node[1]]], ["final state", d.node[2]],
      ["this attempt", d.attempt + " \u00b7 " + d.what], ["worker", d.lane],
      ["started", "+" + fmt(b[1])], ["duration", fmt(b[2] - b[1])]];
    if (d.err) rows.push(["error", d.err[0]]);
    var html = "<h3>" + esc(d.node[0]) + "</h3><table>" + rows.map(function (r) {
      return "<tr><td>" + esc(r[0]) + "</td><td>" + esc(r[1]) + "</td></tr>";
    }).join("") + "</table>";
    if (d.err && d.err[1]) html += "<pre>" + esc(d.err[1]) + "</pre>";
    detail.innerHTML = html;
    detail.style.display = "block";
  }
  function barOf(ev) {
    var i = ev.target.getAttribute && ev.target.getAttribute("data-b");
    return i === null || i === undefined ? null : D.bars[+i];
  }
  scroll.addEventListener("mousemove", function (ev) {
    var b = barOf(ev);
    if (b) showTip(ev, b); else tip.style.display = "none";
  });
  scroll.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  scroll.addEventListener("click", function (ev) { select(barOf(ev)); });
  function setZoom(z) {
    var centre = (scroll.scrollLeft + scroll.clientWidth / 2) / Math.max(scroll.scrollWidth, 1);
    zoom = Math.min(Math.max(z, 1), 64);
    draw();
    scroll.scrollLeft = centre * scroll.scrollWidth - scroll.clientWidth / 2;
    document.getElementById("gx-zoom-level").textContent = zoom + "\u00d7";
  }
  document.getElementById("gx-zoom-in").addEventListener("click", function () {
    setZoom(zoom * 2);
  });
  document.getElementById("gx-zoom-out").addEventListener("click", function () {
    setZoom(zoom / 2);
  });
  document.getElementById("gx-zoom-fit").addEventListener("click", function () { setZoom(1); });
  var pending = 0;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(draw, 120);
  });
  if (!D.bars.length) {
    document.getElementById("gx-timeline").innerHTML =
      '<p class="muted">No attempt ran (every node was cached, skipped or cancelled).</p>';
    return;
  }
  var legend = document.getElementById("gx-legend"), shown = D.tasks.slice(0, 12);
  legend.insertAdjacentHTML("afterbegin", shown.map(function (name, t) {
    return '<span class="gx-task-key"><i style="background:' + PALETTE[t % PALETTE.length] +
      '"></i>' + esc(name) + "</span>";
  }).join("") + (D.tasks.length > shown.length ? "<span>…</span>" : ""));
  drawLabels();
  draw();
  // Links into the report: #first-failure, or #node=<name> (its last attempt).
  var hash = decodeURIComponent(location.hash.slice(1)), target = null;
  if (hash === "first-failure") {
    target = D.bars.find(function (b) { return b[5] === 1; });
  } else if (hash.indexOf("node=") === 0) {
    D.bars.forEach(function (b) { if (D.nodes[b[3]][0] === hash.slice(5)) target = b; });
  }
  if (target) { select(target); detail.scrollIntoView(); }
  document.body.setAttribute("data-gx-rendered", String(D.bars.length));
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="graphexec {version}">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{name}<small>graphexec run report</small>{status}</h1>
<div class="meta">{meta}</div>
</header>
<main>
<div class="cards" id="gx-cards">{cards}</div>
<section>
<h2>Summary by task</h2>
{summary}
</section>
<section>
<div class="toolbar"><h2>Timeline by worker</h2>
<div class="legend" id="gx-legend"><span><i class="failed"></i>failed</span>
<span><i class="retried"></i>failed, then retried</span>
<span><i class="cancelled"></i>cancelled</span></div>
<div class="spacer"></div>
<button id="gx-zoom-out" title="zoom out">&minus;</button>
<span id="gx-zoom-level" class="muted">1&times;</span>
<button id="gx-zoom-in" title="zoom in">+</button>
<button id="gx-zoom-fit" title="fit to width">fit</button>
</div>
<div id="gx-timeline" class="tl"><div id="gx-lanes" class="tl-labels"></div>
<div id="gx-scroll" class="tl-scroll"></div></div>
<noscript><p class="muted">The timeline is drawn by JavaScript, which is off.</p></noscript>
<p class="muted" style="margin:6px 0 0;font-size:12px">Hover over an attempt for its node,
duration and error; click it to see the traceback (or open this page with
<code>#node=NAME</code> or <code>#first-failure</code>). Cached and skipped nodes did not run
and have no bar.</p>
<div id="gx-detail"></div>
</section>
{failures}
{skipped}
</main>
<footer>Generated by graphexec {version} on {generated}. This file is self-contained: it
needs no network.</footer>
<div id="gx-tip"></div>
<script id="gx-data" type="application/json">{data}</script>
<script>{js}</script>
</body>
</html>
"""


# -- graph picture ---------------------------------------------------------------

_INSTALL_PACKAGE = (
    "graph.visualize() needs the graphviz Python package: "
    "pip install graphviz (or pip install 'graphexec[viz]')"
)


def visualize(
    graph: Graph,
    path: str | os.PathLike[str] | None = None,
    *,
    run: Run | None = None,
    collapse: bool | None = None,
    rankdir: str = "LR",
) -> graphviz.Digraph:
    """Draw ``graph`` with its nodes coloured by state; see :meth:`Graph.visualize`."""
    fmt = None
    if path is not None:
        path = Path(path)
        fmt = path.suffix.lower().lstrip(".")
        if fmt not in ("svg", "png", "dot", "gv", "pdf"):
            raise ValueError(
                f"graph.visualize({str(path)!r}): write .svg, .png, .pdf or .dot "
                "(the format comes from the file name)"
            )
    try:
        import graphviz
    except ImportError:
        raise ImportError(_INSTALL_PACKAGE) from None
    if run is None:
        run = graph._latest_run
    if collapse is None:
        collapse = len(graph) > COLLAPSE_ABOVE
    dot = graphviz.Digraph(
        name=graph.name,
        graph_attr={
            "rankdir": rankdir,
            "fontname": "Helvetica",
            "fontsize": "11",
            "bgcolor": "white",
            "nodesep": "0.25",
            "ranksep": "0.45",
            "labelloc": "b",
            "labeljust": "l",
        },
        node_attr={
            "fontname": "Helvetica",
            "fontsize": "10",
            "shape": "box",
            "style": "rounded,filled",
            "color": "#8a96a3",
            "penwidth": "1",
        },
        edge_attr={"color": "#9aa5b1", "arrowsize": "0.6"},
    )
    states = _node_states(graph, run)
    if collapse:
        _draw_by_task(dot, graph, states)
    else:
        _draw_nodes(dot, graph, states, run)
    dot.attr(label=_caption(graph, states, run, collapse))
    if path is None:
        return dot
    if fmt in ("dot", "gv"):
        path.write_text(dot.source, encoding="utf-8")
        return dot
    try:
        data = dot.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise RuntimeError(
            f"graph.visualize({str(path)!r}) needs Graphviz's `dot` program to draw .{fmt}: "
            "apt-get install graphviz (Debian/Ubuntu), brew install graphviz (macOS) or "
            "conda install graphviz. A .dot file needs no program."
        ) from None
    path.write_bytes(data)
    return dot


def _node_states(graph: Graph, run: Run | None) -> list[str]:
    """State name per graph node; nodes outside the run (or with no run yet) are Pending."""
    states = [PENDING] * len(graph)
    if run is not None and run.graph is graph:
        for i in run.members:
            state = run._states[i]
            if state is not None and state.name in STATE_FILLS:
                states[i] = state.name
    return states


def _draw_nodes(dot: Any, graph: Graph, states: list[str], run: Run | None) -> None:
    for i, name in enumerate(graph._names):
        state = states[i]
        tooltip = f"{name} ({graph._tasks[i].name}): {state}"
        st = run._states[i] if run is not None and run.graph is graph else None
        if st is not None and st.exception is not None and state in (FAILED, SKIPPED):
            tooltip += f" — {_one_line(st.exception) if state is FAILED else st.message}"
        attrs = {"fillcolor": STATE_FILLS[state], "tooltip": tooltip}
        if state is FAILED:
            attrs.update(color=STATE_COLOURS[FAILED], penwidth="2", fontcolor="#7f1d1d")
        elif state is SKIPPED:
            attrs.update(style="rounded,filled,dashed", fontcolor="#6b7785")
        elif state is PENDING:
            attrs.update(color="#c3cad3", fontcolor="#6b7785")
        dot.node(f"n{i}", name, **attrs)
    for i, ups in enumerate(graph._deps):
        flags = graph._flags[i]
        for j, up in enumerate(ups):
            flag = DATA if flags is None else flags[j]
            attrs = {}
            if not flag & DATA:
                attrs["style"] = "dashed"
            if flag & ALLOW:
                attrs["arrowhead"] = "odot"
            dot.edge(f"n{up}", f"n{i}", **attrs)


def _draw_by_task(dot: Any, graph: Graph, states: list[str]) -> None:
    """One box per task name with its counts per state; edges between tasks, counted."""
    task_of: list[int] = []
    tasks: dict[str, int] = {}
    counts: list[dict[str, int]] = []
    for i, task in enumerate(graph._tasks):
        t = tasks.get(task.name)
        if t is None:
            t = tasks[task.name] = len(tasks)
            counts.append({})
        task_of.append(t)
        c = counts[t]
        c[states[i]] = c.get(states[i], 0) + 1
    edges: dict[tuple[int, int], int] = {}
    for i, ups in enumerate(graph._deps):
        ti = task_of[i]
        for up in ups:
            key = (task_of[up], ti)
            edges[key] = edges.get(key, 0) + 1
    for name, t in tasks.items():
        c = counts[t]
        total = sum(c.values())
        cells = "".join(
            f'<TD BGCOLOR="{STATE_FILLS[s]}" BORDER="1" COLOR="{STATE_COLOURS[s]}">'
            f"{c[s]:,} {STATE_WORDS[s]}</TD>"
            for s in STATE_ORDER
            if c.get(s)
        )
        span = sum(1 for s in STATE_ORDER if c.get(s))
        label = (
            '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="3" CELLPADDING="3">'
            f'<TR><TD COLSPAN="{span}"><B>{html.escape(name)}</B>  &#215;{total:,}</TD></TR>'
            f"<TR>{cells}</TR></TABLE>>"
        )
        attrs = {
            "fillcolor": "white",
            "shape": "box",
            "margin": "0.05",
            "tooltip": f"{name}: "
            + ", ".join(f"{c[s]:,} {s.lower()}" for s in STATE_ORDER if c.get(s)),
        }
        if c.get(FAILED):
            attrs.update(color=STATE_COLOURS[FAILED], penwidth="2")
        dot.node(f"t{t}", label, **attrs)
    for (a, b), n in edges.items():
        attrs = {"penwidth": f"{min(1 + math.log10(n), 4):.2f}"}
        if n > 1:
            attrs.update(label=f"{n:,}", fontsize="9", fontcolor="#6b7785")
        dot.edge(f"t{a}", f"t{b}", **attrs)


def _caption(graph: Graph, states: list[str], run: Run | None, collapse: bool) -> str:
    counts: dict[str, int] = {}
    for s in states:
        counts[s] = counts.get(s, 0) + 1
    keys = "".join(
        f'<TD BGCOLOR="{STATE_FILLS[s]}" BORDER="1" COLOR="{STATE_COLOURS[s]}">'
        f"{counts[s]:,} {s.lower() if s is not PENDING else 'not run'}</TD>"
        for s in STATE_ORDER
        if counts.get(s)
    )
    what = f"{len(graph):,} nodes" + (" (one box per task)" if collapse else "")
    when = "latest run" if run is not None else "not computed yet"
    return (
        '<<TABLE BORDER="0" CELLSPACING="4" CELLPADDING="3"><TR>'
        f"<TD><B>{html.escape(graph.name)}</B>  {what}, {when}:</TD>{keys}</TR></TABLE>>"
    )
