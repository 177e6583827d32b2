"""The run report: one self-contained HTML page (summary table, per-worker timeline).

The page is ``templates/report.html`` filled by :meth:`str.format` (its
``{placeholders}`` are the only braces in it), with ``templates/report.css``
and ``templates/report.js`` pasted inline so that the file needs no network.
The script draws the timeline from the JSON in ``<script id="gx-data">``
(:func:`_timeline_data`). The templates are package data, read once through
:mod:`importlib.resources` so that they are found in a wheel or a zip too.
"""

from __future__ import annotations

import functools
import html
import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from ..._model.errors import one_line
from ..._model.run import Run
from ..._model.state import CANCELLED, FAILED, PENDING, STATE_ORDER, State
from ..._version import __version__
from .codec import traceback_text
from .states import RETRY_COLOUR, STATE_COLOURS, state_css

# Tracebacks embedded in one HTML page, in characters: beyond this, failures keep
# their one-line error and the page stays small enough to open.
HTML_TRACEBACK_BUDGET = 2_000_000


class Templates(NamedTuple):
    """The page's three files, as text."""

    page: str
    css: str
    js: str


@functools.cache
def templates() -> Templates:
    """The templates from the package data (read on first use, then kept)."""
    folder = resources.files(__package__) / "templates"
    return Templates(
        *(
            (folder / name).read_text(encoding="utf-8")
            for name in ("report.html", "report.css", "report.js")
        )
    )


def run_to_html(run: Run, path: str | os.PathLike[str]) -> Path:
    """Write the run report to ``path``: one HTML file that needs no network."""
    path = Path(path)
    data = _timeline_data(run)
    graph = run.graph
    counts = run.counts()
    unhandled = len(run.unhandled)
    if run._interrupted is not None:  # never "ok": the run did not end
        failures = f"; {unhandled} unhandled failure{'s' if unhandled != 1 else ''}"
        status = (
            f'<span class="badge bad">interrupted: {html.escape(run._interrupted)}'
            f"{failures if unhandled else ''}</span>"
        )
    elif unhandled:
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
    files = templates()
    page = files.page.format(
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
        css=state_css() + files.css,
        js=files.js,
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
        tb = traceback_text(exc)
        if tb is not None and len(tb) <= budget:
            budget -= len(tb)
        else:
            tb = None
        errors.append([one_line(exc), tb])
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
    """Per task: counts per state (with a bar of their shares), retries and durations
    (``Run._task_stats``, as ``run.summary()`` shows them)."""
    rows = run._task_stats()
    columns = [s for s in STATE_ORDER if any(r.counts[s] for r in rows.values())]
    head = "".join(
        f'<th class="num"><span class="dot s-{s.lower()}"></span>{s}</th>' for s in columns
    )
    body = []
    for task, row in rows.items():
        c = row.counts
        total_nodes = sum(c.values())
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
            f'<td class="num{" zero" if not row.retries else ""}">{row.retries:,}</td>'
            f'<td class="num">{row.total:.3f}</td><td class="num">{row.mean:.3f}</td>'
            f'<td class="num">{row.max:.3f}</td></tr>'
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
        state = run.state(node)  # never None for a failed node, and typed so
        exc = state.exception
        tb = traceback_text(exc) if exc is not None else None
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
            f'<td class="err"><code>{html.escape(one_line(exc)) if exc else ""}</code>'
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
        f"<li><b>{html.escape(n.name)}</b> — {html.escape(run.state(n).message)}</li>"
        for n in skipped[:limit]
    )
    more = f"<li>… and {len(skipped) - limit:,} more</li>" if len(skipped) > limit else ""
    return (
        f'<section><details id="gx-skipped"><summary><h2>Skipped <span class="count">'
        f'{len(skipped):,}</span></h2></summary><ul class="skips">{items}{more}</ul>'
        "</details></section>"
    )
