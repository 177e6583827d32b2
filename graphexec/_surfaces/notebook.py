"""How a Run, a Graph, a State and a Future look in a Jupyter notebook (``_repr_html_``).

::

    Run._repr_html_   ──seam──> run_html:   headline, summary table by task in the
                                            report's state colours, failures with
                                            their one-line errors, a download link
                                            holding the full report (run_to_html)
    Graph._repr_html_ ──seam──> graph_html: nodes per task, and for a small graph
                                            its picture as inline SVG (needs `dot`)
    State._repr_html_ ──seam──> state_html: one coloured line
    Future._repr_html_ ───────> future_html: the same line, for its live state

Notebooks show outputs without the page's stylesheet (and untrusted ones
strip ``<style>``), so every fragment carries inline styles only. Every name
and message is escaped: node names and exception messages can hold ``<``.
The colours and the words for errors are the report's (``report/``), so that
the notebook and the page agree.
"""

from __future__ import annotations

import base64
import html
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from .._model.errors import one_line
from .._model.graph import Graph
from .._model.run import Run
from .._model.state import RETRYING, STATE_ORDER, State
from .report import STATE_COLOURS, STATE_FILLS, run_to_html, visualize
from .report.states import RETRY_COLOUR

# Runs up to this many nodes carry their full HTML report inside the output, as
# a download link: building the page costs about a millisecond per hundred
# nodes and its bytes stay in the notebook file. Larger runs show the line of
# code that writes the report instead.
REPORT_LINK_MAX_NODES = 2_000
# ...and at most this many bytes of report (before base64) in any case.
REPORT_LINK_MAX_BYTES = 3_000_000
# Graphs up to this many nodes are drawn inline when Graphviz's `dot` is installed.
PICTURE_MAX_NODES = 50
# Failures listed in a Run's output; run.failed has them all.
FAILURES_SHOWN = 10

# (Running has its own colour in STATE_COLOURS, as in the report.)
_LIVE_COLOURS = {RETRYING: RETRY_COLOUR}
_FONT = "font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;font-size:13px"
_CELL = "padding:2px 8px;text-align:right"
_LEFT = "padding:2px 8px;text-align:left"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _chip(name: str) -> str:
    """A small square in the state's colour (white states get a border to show)."""
    colour = STATE_COLOURS.get(name) or _LIVE_COLOURS.get(name, "#ffffff")
    return (
        f'<span style="display:inline-block;width:10px;height:10px;border-radius:2px;'
        f"background:{colour};border:1px solid #8a96a3;vertical-align:middle;"
        f'margin-right:4px"></span>'
    )


def run_html(run: Run) -> str:
    """The notebook view of a run: headline, summary table, failures, the full report."""
    counts = run.counts()
    unhandled = run.unhandled
    failures = f"{len(unhandled)} unhandled failure{'s' if len(unhandled) != 1 else ''}"
    if run._interrupted is not None:  # never "ok": the run did not end
        status = f"interrupted: {run._interrupted}" + (f"; {failures}" if unhandled else "")
        status_colour = STATE_COLOURS["Failed"]
    elif unhandled:
        status = failures
        status_colour = STATE_COLOURS["Failed"]
    else:
        status = "ok — failures handled" if run.failed else "ok"
        status_colour = STATE_COLOURS["Completed"]
    state_words = ", ".join(
        f"{_chip(s)}{counts[s]:,} {s.lower()}" for s in STATE_ORDER if counts.get(s)
    )
    head = (
        f"<div><b>{_e(run.graph.name)}</b>: {len(run.members):,} nodes in "
        f"{run.duration:.2f} s — {state_words or 'nothing to run'} — "
        f'<b style="color:{status_colour}">{_e(status)}</b></div>'
    )
    parts = [head, _summary_table(run), _failures(run), _report_link(run)]
    return f'<div class="graphexec-run" style="{_FONT}">{"".join(parts)}</div>'


def _summary_table(run: Run) -> str:
    stats = run._task_stats()  # (as run.summary() and the HTML page count them)
    by_task = {task: t.counts for task, t in stats.items()}
    seconds = {task: t.total for task, t in stats.items()}
    columns = [s for s in STATE_ORDER if any(c[s] for c in by_task.values())]
    head = "".join(f'<th style="{_CELL}">{_chip(s)}{_e(s.lower())}</th>' for s in columns)
    rows = []
    for task, c in by_task.items():
        cells = "".join(
            f'<td style="{_CELL};background:{STATE_FILLS[s] if c[s] else "transparent"}">'
            f"{c[s]:,}</td>"
            for s in columns
        )
        rows.append(
            f'<tr><td style="{_LEFT}">{_e(task)}</td><td style="{_CELL}">'
            f'{sum(c.values()):,}</td>{cells}<td style="{_CELL}">'
            f"{seconds.get(task, 0.0):.3f}</td></tr>"
        )
    return (
        '<table class="graphexec-summary" style="border-collapse:collapse;margin:4px 0">'
        f'<thead><tr><th style="{_LEFT}">task</th><th style="{_CELL}">nodes</th>{head}'
        f'<th style="{_CELL}">total s</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _failures(run: Run) -> str:
    failed = run.failed
    if not failed:
        return ""
    handled = run._handled
    items = []
    for node in failed[:FAILURES_SHOWN]:
        exc = run.state(node).exception
        tag = " <i>(handled)</i>" if node.index in handled else ""
        items.append(
            f"<li><b>{_e(node.name)}</b>{tag}: <code>{_e(one_line(exc) if exc else '')}</code></li>"
        )
    if len(failed) > FAILURES_SHOWN:
        items.append(f"<li>… and {len(failed) - FAILURES_SHOWN:,} more (run.failed)</li>")
    return (
        f'<div class="graphexec-failures" style="margin:4px 0">Failures:'
        f'<ul style="margin:2px 0">{"".join(items)}</ul></div>'
    )


def _report_link(run: Run) -> str:
    """A download link holding the whole report, or the code that writes it."""
    how = "<code>run.to_html(&quot;report.html&quot;)</code>"
    if len(run.members) <= REPORT_LINK_MAX_NODES:
        with tempfile.TemporaryDirectory(prefix="graphexec-report-") as folder:
            page = run_to_html(run, Path(folder) / "report.html").read_bytes()
        if len(page) <= REPORT_LINK_MAX_BYTES:
            data = base64.b64encode(page).decode("ascii")
            return (
                '<div style="margin:4px 0"><a download="report.html" '
                f'href="data:text/html;base64,{data}">⬇ report.html</a> (the full report: '
                f"timeline, tracebacks; open it in a browser) or write it with {how}</div>"
            )
    return f'<div style="margin:4px 0">The full report (timeline, tracebacks): {how}</div>'


def graph_html(graph: Graph) -> str:
    """The notebook view of a graph: nodes per task, and its picture when small."""
    sizes = Counter(task.name for task in graph._tasks)
    rows = "".join(
        f'<tr><td style="{_LEFT}">{_e(task)}</td><td style="{_CELL}">{n:,}</td></tr>'
        for task, n in sizes.items()
    )
    when = "computed" if graph._latest_run is not None else "not computed yet"
    parts = [
        f"<div><b>{_e(graph.name)}</b>: {len(graph):,} nodes, {len(sizes):,} tasks, {when}</div>",
        '<table class="graphexec-tasks" style="border-collapse:collapse;margin:4px 0">'
        f'<thead><tr><th style="{_LEFT}">task</th><th style="{_CELL}">nodes</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>",
    ]
    picture = graph_svg(graph)
    if picture is not None:
        parts.append(f'<div class="graphexec-picture">{picture}</div>')
    return f'<div class="graphexec-graph" style="{_FONT}">{"".join(parts)}</div>'


def graph_svg(graph: Graph) -> str | None:
    """The graph drawn as an inline ``<svg>``, or None: too large, or no Graphviz here."""
    if not 0 < len(graph) <= PICTURE_MAX_NODES or shutil.which("dot") is None:
        return None
    try:
        drawing = visualize(graph)
        svg = drawing.pipe(format="svg", encoding="utf-8")
    except (ImportError, RuntimeError, OSError):
        # No graphviz package, or `dot` failed: the table alone still says what is there.
        return None
    start = svg.find("<svg")  # drop the XML prolog and doctype: not allowed inside HTML
    return svg[start:] if start >= 0 else None


def state_html(state: State) -> str:
    """One line: the state's colour, name, node, and what happened."""
    detail = ""
    if state.exception is not None and state.is_failed():
        detail = one_line(state.exception)
    elif state.message:
        detail = state.message.strip().splitlines()[0] if state.message.strip() else ""
    attempts = f" · {state.attempts} attempts" if state.attempts > 1 else ""
    took = f" · {state.duration:.3f} s" if state.history else ""
    return (
        f'<span class="graphexec-state" style="{_FONT}">{_chip(state.name)}'
        f"<b>{_e(state.name)}</b> {_e(state.node)}"
        f"{': <code>' + _e(detail) + '</code>' if detail else ''}{_e(attempts + took)}</span>"
    )


def future_html(state: State) -> str:
    """A future's live state (Pending, Running, or final), as :func:`state_html` draws it."""
    return f'<span style="{_FONT}">Future </span>{state_html(state)}'
