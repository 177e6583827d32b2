"""The result of one compute: a final state for every node, values of the kept ones."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Container
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GraphFailed, capped, one_line
from .graph import Node
from .handle import Deferred
from .seam import surfaces
from .state import (
    CACHED,
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    SKIPPED,
    STATE_ORDER,
    State,
    single_line,
)

if TYPE_CHECKING:
    from .graph import Graph

# Characters of the first failure's traceback that GraphFailed's message shows (its
# exception keeps all of it, as __cause__)
TRACEBACK_MAX = 20_000


class TaskStats:
    """One task's line of a run's summary: its nodes' states, retries and durations."""

    __slots__ = ("counts", "max", "ran", "retries", "total")

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()  # state name -> nodes
        self.total = 0.0  # seconds its attempts ran, summed
        self.max = 0.0  # the longest node's
        self.retries = 0
        self.ran = 0  # nodes with an attempt: the mean is over these

    @property
    def mean(self) -> float:
        return self.total / (self.ran or 1)


class Run:
    """What ``graph.compute()`` returns (and ``GraphFailed.run`` carries).

    Example::

        run = graph.compute()
        run[report]            # value, or re-raises the node's exception
        run.state(report)      # gx.State
        run.failed, run.skipped, run.completed
        print(run.summary())
    """

    # Why the run stopped before it ended, else None: Ctrl-C or SIGTERM cancelled it
    # (``signals.mark_interrupted``), or it was loaded from the record of a parent
    # killed mid-run. Its headline says so, and it is not ok.
    _interrupted: str | None = None
    # The exception a flow's body raised, which ended its run (a run hook's state
    # holds it when no node failed).
    _raised: BaseException | None = None

    def __init__(self, graph: Graph, members: list[int], kept: Container[int]) -> None:
        self.graph = graph
        self.members = members
        # 1 at each member's index: a byte a node (a set of them took 32-40), and
        # the scheduler's own (it extends it as an eager session admits nodes)
        member = self._member = bytearray(len(graph._deps))
        for i in members:
            member[i] = 1
        self._kept = kept
        self._states: list[State | None] = [None] * len(graph._deps)
        self._handled: set[int] = set()
        # What happened to a node besides its state, for summary(): e.g. how long
        # it waited for a cache entry another process was computing.
        self._notes: dict[int, str] = {}
        # What failed nodes received, for inputs() and replay(): node -> the data
        # plane's KeptCall (``_engine/keep.py``); at most _inputs_cap bytes (None:
        # GRAPHEXEC_KEEP_INPUTS, else 1 GiB).
        self._inputs: dict[int, Any] = {}
        self._inputs_cap: int | None = None
        self._inputs_bytes = 0
        # A worker's value copied out for one failed node, by upstream node: the
        # next failed node that received it shares the copy (and the cap counts it once).
        self._kept_values: dict[int, Any] = {}
        self._source_hashes: dict[int, str | None] = {}  # id(function) -> its source's hash
        # Where this run's record is (compute(run_dir=...), save(), load()): the
        # failure report then shows the command line that replays from it.
        self._record: Path | None = None
        # node -> its id in the record this run writes (the journal's numbering: graph
        # order for a compute, the order a flow submitted them in), which `#k` names
        # on the command line; None for a run without one, or loaded (graph order).
        self._record_ids: dict[int, int] | None = None
        self.started = time.time()
        self.finished: float | None = None

    # -- lookup ---------------------------------------------------------------

    def _index(self, node: Any) -> int:
        if not isinstance(node, Node) or node.graph is not self.graph:
            raise TypeError(f"expected a node of {self.graph.name} or its name, got {node!r}")
        if not self._has(node.index):
            raise KeyError(
                f"{node.name} was not part of this run: it is not an ancestor of the "
                "targets given to compute(), or was added to the graph afterwards"
            )
        return node.index

    def _lookup(self, node: Any) -> int:
        """The index of ``node``: a node of this run, or its name as reports show it.

        Raises:
            KeyError: no node of this run has that name, or several have (the
                message lists them, with the ``run.nodes[k]`` that picks each).
            TypeError: neither a node of this run's graph nor a string.
        """
        if not isinstance(node, str):
            return self._index(node)
        names = self.graph._names
        found = [(k, i) for k, i in enumerate(self.members) if names[i] == node]
        if len(found) == 1:
            return found[0][1]
        if not found:
            raise KeyError(f"no node named {node!r} in this run of {self.graph.name}")
        states = self._states
        listed = ", ".join(
            f"run.nodes[{k}] ({self.graph._tasks[i].name}, "
            f"{st.name if (st := states[i]) is not None else PENDING})"
            for k, i in found[:10]
        )
        more = f" and {len(found) - 10} more" if len(found) > 10 else ""
        raise KeyError(
            f"{len(found)} nodes of this run of {self.graph.name} are named {node!r}: "
            f"{listed}{more}; pass the node itself instead of its name"
        )

    def _has(self, i: int) -> bool:
        member = self._member
        return i < len(member) and member[i] == 1

    def state(self, node: Node | str) -> State:
        """The node's :class:`State` in this run.

        Args:
            node: a node of this run, or its name as ``summary()`` shows it
                (``run.state("load-3")``: a loaded run's nodes need no search).

        Raises:
            KeyError: the node was not part of this run; no node has that name,
                or several do (the message lists them).
        """
        i = self._lookup(node)
        state = self._states[i]
        return state if state is not None else State(PENDING, self.graph._names[i])

    def result(self, node: Node | str, raise_on_failure: bool = True) -> Any:
        """The node's value (``node``: a node or its name, as :meth:`state`); see
        :meth:`State.result` for what is raised."""
        return self.state(node).result(raise_on_failure=raise_on_failure)

    def __getitem__(self, node: Node | str) -> Any:
        return self.result(node)

    def __contains__(self, node: Node | str) -> bool:
        if isinstance(node, str):
            names = self.graph._names
            return any(names[i] == node for i in self.members)
        try:
            self._index(node)
        except (KeyError, TypeError):
            return False
        return True

    # -- views ----------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        """Every node that took part in this run, dependencies first."""
        nodes = self.graph._nodes
        return [nodes[i] for i in self.members]

    def _with(self, *names: str) -> list[Node]:
        nodes, states = self.graph._nodes, self._states
        return [
            nodes[i]
            for i in sorted(self.members)
            if (st := states[i]) is not None and st.name in names
        ]

    @property
    def completed(self) -> list[Node]:
        """Nodes that produced a value (Completed or Cached)."""
        return self._with(COMPLETED, CACHED)

    @property
    def failed(self) -> list[Node]:
        """Nodes that ended Failed, handled or not."""
        return self._with(FAILED)

    @property
    def skipped(self) -> list[Node]:
        """Nodes that never ran because an upstream failed (or their trigger was not met)."""
        return self._with(SKIPPED)

    @property
    def cancelled(self) -> list[Node]:
        """Nodes cancelled by fail_fast or Ctrl-C."""
        return self._with(CANCELLED)

    @property
    def name(self) -> str:
        """The name of what ran: its graph's (``gx.Graph(name)``), or its flow's (what
        Prefect's run hooks read as ``flow_run.name``)."""
        return self.graph.name

    @property
    def unhandled(self) -> list[Node]:
        """Failed nodes whose failure no dependent accepted: these make compute() raise."""
        return [n for n in self.failed if n.index not in self._handled]

    @property
    def ok(self) -> bool:
        """True when compute() would not raise: no unhandled failure, and the run ended
        (never for a run Ctrl-C or SIGTERM cancelled, nor for one loaded from a record
        cut off mid-run)."""
        return self._interrupted is None and not self.unhandled

    @property
    def duration(self) -> float:
        """Wall-clock seconds of the run."""
        end = self.finished if self.finished is not None else time.time()
        return end - self.started

    def counts(self) -> dict[str, int]:
        """Number of nodes per state name."""
        counter = Counter(
            (st.name if (st := self._states[i]) is not None else PENDING) for i in self.members
        )
        return dict(counter)

    # -- reports --------------------------------------------------------------

    def _task_stats(self) -> dict[str, TaskStats]:
        """Per task (by name, in the order tasks first appear): what every summary
        shows, the text one, the HTML page's and the notebook's."""
        stats: dict[str, TaskStats] = {}
        graph = self.graph
        for i in self.members:
            task = graph._tasks[i].name
            row = stats.get(task)
            if row is None:
                row = stats[task] = TaskStats()
            state = self._states[i]
            row.counts[state.name if state is not None else PENDING] += 1
            if state is not None and state.history:
                d = state.duration
                row.total += d
                row.max = max(row.max, d)
                row.retries += max(0, state.attempts - 1)
                row.ran += 1
        return stats

    def summary(self) -> str:
        """A human-readable table: per task, counts per state and durations; then failures."""
        by_task = self._task_stats()
        columns = [s for s in STATE_ORDER if any(t.counts[s] for t in by_task.values())]
        header = ["task", "nodes", *columns, "retries", "total s", "mean s", "max s"]
        rows = []
        for task, t in by_task.items():
            rows.append(
                [
                    task,
                    str(sum(t.counts.values())),
                    *(str(t.counts[s]) for s in columns),
                    str(t.retries),
                    f"{t.total:.3f}",
                    f"{t.mean:.3f}",
                    f"{t.max:.3f}",
                ]
            )
        widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths))
            )

        counts = self.counts()
        status = self._status()
        out = [
            f"{self.graph.name}: {len(self.members)} nodes in {self.duration:.2f} s — "
            + (
                ", ".join(f"{counts[s]} {s.lower()}" for s in STATE_ORDER if counts.get(s))
                or "nothing to run"
            )
            + f" — {status}",
            line(header),
            line(["-" * w for w in widths]),
            *(line(r) for r in rows),
        ]
        failed = self.failed
        if failed:
            out.append("")
            out.append("Failures:")
            for node in failed[:20]:
                state = self._final(node.index)
                exc = state.exception
                tag = "" if node.index not in self._handled else " (handled)"
                attempts = f" after {state.attempts} attempts" if state.attempts > 1 else ""
                out.append(f"  {node.name}{tag}: {one_line(exc)}{attempts}")
            if len(failed) > 20:
                out.append(f"  ... and {len(failed) - 20} more")
        not_kept = [
            (node, kept)
            for node in failed
            if (kept := self._inputs.get(node.index)) is not None and (kept.dropped or kept.lost)
        ]
        if not_kept:
            out.append("Inputs not kept (run.replay cannot rerun these):")
            for node, kept in not_kept[:20]:
                out.append(f"  {node.name}: {kept.dropped or next(iter(kept.lost.values()))}")
            if len(not_kept) > 20:
                out.append(f"  ... and {len(not_kept) - 20} more")
        skipped = self.skipped
        if skipped:
            out.append(
                f"Skipped: {len(skipped)} node(s), e.g. {self._final(skipped[0].index).message}"
            )
        if self._notes:
            out.append("")
            out.append("Waits for cache entries other processes held:")
            nodes = self.graph._nodes
            for i in sorted(self._notes)[:20]:
                out.append(f"  {nodes[i].name}: {self._notes[i]}")
            if len(self._notes) > 20:
                out.append(f"  ... and {len(self._notes) - 20} more")
        return "\n".join(out)

    def _status(self) -> str:
        """How the run ended, in words: ``ok``, unhandled failures, or interrupted."""
        unhandled = len(self.unhandled)
        failures = f"{unhandled} unhandled failure(s)"
        if self._interrupted is not None:  # never "ok": the run did not end
            return f"interrupted: {self._interrupted}" + (f"; {failures}" if unhandled else "")
        return failures if unhandled else "ok"

    def to_json(self, indent: int | None = None) -> str:
        """The run as a JSON document for tools: per node its name, task, state, error
        (type, message, worker traceback), worker and timings of every attempt; the edges.

        Values are not included. :meth:`from_json` reads it back.
        """
        return surfaces.run_to_json(self, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> Run:
        """Rebuild a run from :meth:`to_json`'s text.

        Returns a ``Run`` over a rebuilt graph (same node names, task names and
        edges; its tasks cannot run) whose states, attempts and errors are those
        of the document: ``summary()``, ``failed``, ``skipped``, ``counts()``,
        ``state(node)``, ``to_html()`` and ``run.graph.visualize()`` work. Values
        are not in the document: reading one raises. An exception comes back as
        its own class if it is a builtin or graphexec's, else as a
        :class:`RemoteError` subclass of the same name (nothing is imported).

        Raises:
            ValueError: not a graphexec run document, or of another version.
        """
        return surfaces.run_from_json(text)

    # -- the morning after: inputs, replay, the saved run ----------------------------

    def inputs(self, node: Node | str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The exact arguments a failed node received: ``(args, kwargs)``.

        Upstream values are in place of the nodes, and exceptions or States
        where a policy passed those (``gx.allow_failure``, ``return_state``).
        Each call gives fresh objects. A run keeps them for every node that
        ended Failed, up to ``compute(keep_inputs=...)`` bytes per run
        (``GRAPHEXEC_KEEP_INPUTS``; 1 GiB by default).

        Args:
            node: a node of this run, or its name as ``summary()`` shows it.

        Raises:
            ValueError: the node did not fail (a Skipped or Cancelled node names
                the failure to look at instead).
            LookupError: its inputs were not kept: over the cap, or lost with a
                worker that crashed holding a chained value; the message says which.

        Example::

            args, kwargs = run.inputs("load-3")
        """
        return surfaces.run_inputs(self, node)

    def replay(self, node: Node | str, pdb: bool = False, timeout: float | None = None) -> Any:
        """Run a failed node's function again, in this process, on its exact inputs.

        So ``breakpoint()``, ``pdb`` and a debugger work. A node that crashed its
        worker (``WorkerCrashed``) is first run in a fresh subprocess, and the
        replay says so: if it crashes there again, it is not run here (it would
        take this interpreter down) and :class:`WorkerCrashed` is raised. A node
        that went over its memory limit (:class:`MemoryLimitExceeded`) is first
        run in a fresh subprocess too, killed there if it goes over that limit
        again (then that error is raised, and it is not run here). A loaded run
        warns when the function's source changed since it was recorded.

        Args:
            node: a failed node of this run, or its name.
            pdb: start post-mortem debugging where the replay raises.
            timeout: seconds after which the replay raises :class:`TaskTimeout`
                (main thread only); none by default, even for a node that timed out.

        Returns:
            The function's value, if it does not fail this time.

        Raises:
            Exception: whatever the function raises (the original failure, again).
            ValueError, LookupError: as :meth:`inputs`.

        Example::

            try:
                graph.compute()
            except gx.GraphFailed as exc:
                exc.run.replay("load-3", pdb=True)
        """
        return surfaces.run_replay(self, node, pdb=pdb, timeout=timeout)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the run to ``path``: states, timings, errors, and the failed nodes'
        functions and inputs, in the one format :meth:`load`, ``graphexec report``
        and ``graphexec replay`` read (the format of ``compute(run_dir=...)``).

        Values of completed nodes are not saved. Functions and inputs are
        pickled: :meth:`load` unpickles them (only from files you trust).

        Returns:
            The path written.
        """
        return surfaces.run_save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Run:
        """Read a run written by :meth:`save` or ``compute(run_dir=...)`` (the
        directory or its ``run.gxrun`` file), in any process with the same environment.

        States, timings, errors and the report work as after :meth:`from_json`;
        failed nodes replay (:meth:`replay`, :meth:`inputs`). A run whose process
        was killed reads as far as it was written: what finished, what failed,
        and what was running (state ``Running``).

        Security: replaying or reading the inputs of a loaded run unpickles the
        functions and values in it, which can run arbitrary code: load only
        runs you (or someone you trust) wrote. The report reads no pickle.

        Raises:
            ValueError: not a saved graphexec run.
        """
        return surfaces.run_load(path)

    def to_html(self, path: str | os.PathLike[str]) -> Path:
        """Write a report to ``path``: one self-contained HTML file (no network needed).

        On top, the state counts and the summary table by task; below, a
        timeline with one lane per worker and one bar per attempt, failures and
        retried attempts highlighted (hover for node, duration and error; click
        for the traceback); then the failed and skipped nodes. Opened as
        ``report.html#node=NAME`` (or ``#first-failure``) it shows that attempt.

        Returns:
            The path written.

        Example::

            run = graph.compute(raise_on_failure=False)
            run.to_html("report.html")
        """
        return surfaces.run_to_html(self, path)

    def _failure_report(self) -> str:
        unhandled = self.unhandled
        counts = self.counts()
        names = ", ".join(n.name for n in unhandled[:10])
        more = f" and {len(unhandled) - 10} more" if len(unhandled) > 10 else ""
        lines = [
            f"{len(unhandled)} of {len(self.members)} nodes failed without being handled: "
            f"{names}{more}. {counts.get(SKIPPED, 0)} skipped, "
            f"{counts.get(COMPLETED, 0) + counts.get(CACHED, 0)} completed, "
            f"{counts.get(CANCELLED, 0)} cancelled; all results are kept in .run.",
        ]
        for node in unhandled[:10]:
            lines.append(f"  {node.name}: {one_line(self._final(node.index).exception)}")
        first = self._first_unhandled()
        tb = getattr(first.__cause__, "tb", None) if first is not None else None
        if tb:
            lines.append(f"Traceback of {unhandled[0].name} (in its worker):")
            lines.append(capped(tb.rstrip(), TRACEBACK_MAX))
        lines.append(surfaces.replay_hint(self, unhandled[0].index))
        return "\n".join(lines)

    def _raise_if_failed(self) -> None:
        """Raise :class:`GraphFailed` if a failure was not handled (the one builder of it).

        ``__cause__`` is the first unhandled failure's exception, which itself
        chains the remote traceback text.
        """
        if not self.ok:
            raise GraphFailed(self._failure_report(), run=self) from self._first_unhandled()

    def _first_unhandled(self) -> BaseException | None:
        unhandled = self.unhandled
        if not unhandled:
            return None
        return self._final(unhandled[0].index).exception

    def _final(self, i: int) -> State:
        """The state of node i, which a listing of final states just named."""
        state = self._states[i]
        assert state is not None, f"node {i} has no state"
        return state

    def _finish_run(self, ended: float | None = None) -> None:
        """Close the run, which ``ended`` then (``time.time()``; default: now): values
        still held in shared memory are mapped privately and their segments unlinked,
        so nothing of the run stays in /dev/shm. ``finished`` is set last: a Ctrl-C
        meanwhile leaves it None, and a second call settles the rest."""
        states = self._states
        for i in self.members:
            state = states[i]
            if state is not None and (state.name is COMPLETED or state.name is CACHED):
                handle = state._value
                if isinstance(handle, Deferred):
                    handle.settle()
        self.finished = time.time() if ended is None else ended

    def _counts_text(self) -> str:
        """``3 completed, 1 failed``: the nodes per state, in words."""
        return ", ".join(f"{v} {k.lower()}" for k, v in sorted(self.counts().items()))

    def __repr__(self) -> str:
        return f"<Run {single_line(self.graph.name)}: {self._counts_text()}>"

    def _repr_html_(self) -> str:
        """How the run shows in a Jupyter notebook.

        The headline (nodes, time, counts per state, ok or not), the summary
        table by task in the report's state colours, the failures with their
        one-line errors, and a download link holding the full :meth:`to_html`
        report (runs up to 2,000 nodes and 3 MB of report; larger runs show
        the line of code that writes it).
        """
        return surfaces.run_html(self)
