"""The graph drawn through the graphviz package, its nodes coloured by state.

``visualize`` builds a ``graphviz.Digraph``; writing ``.dot`` needs nothing
more, drawing ``.svg``/``.png``/``.pdf`` needs Graphviz's ``dot`` program.
Above :data:`COLLAPSE_ABOVE` nodes it draws one box per task instead.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._model.errors import one_line
from ..._model.graph import ALLOW, DATA, Graph
from ..._model.run import Run
from ..._model.state import FAILED, PENDING, SKIPPED, STATE_ORDER
from .states import STATE_COLOURS, STATE_FILLS, STATE_WORDS

if TYPE_CHECKING:
    import graphviz

# Above this many nodes, visualize() draws one box per task instead of one per node.
COLLAPSE_ABOVE = 200

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
    elif run.graph is not graph:  # its node indices would colour this graph's nodes
        raise ValueError(
            f"graph.visualize(run=...): that run is of graph {run.graph.name!r}, not of "
            f"{graph.name!r}; draw it with run.graph.visualize(run=run)"
        )
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
            tooltip += f" — {one_line(st.exception) if state is FAILED else st.message}"
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
