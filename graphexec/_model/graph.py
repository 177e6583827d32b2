"""The graph builder: nodes, edges, and how node arguments are found and filled in.

A graph is a set of parallel lists indexed by node id (task, options, args,
kwargs, dependency ids, edge flags, name); a :class:`Node` is a two-slot handle
(graph, id) on it. That keeps a 100,000-node graph to a few hundred bytes per
node and lets the scheduler work on integers.

Edges come from the arguments (data edges: the task receives the upstream
value) and from ``wait_for=`` (order edges). Nodes are found inside lists,
tuples, dicts, sets and frozensets, at any depth; ``allow_failure(...)`` marks
the edges found inside it. Because an argument can only name a node that
already exists, such edges can never form a cycle; only ``Node.wait_for``,
which adds order edges after the fact, has to check.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterable
from types import GeneratorType, MethodType
from typing import TYPE_CHECKING, Any

from .node import ALLOW, DATA, ORDER, Node, allow_failure, call_site
from .seam import surfaces
from .signature import call_shape, signature
from .task import BoundTask, Task, as_task, pop_graph, push_graph
from .walk import PLAIN, SEQUENCES, find_nodes, remap, take_nodes

_new = object.__new__

if TYPE_CHECKING:
    from .._surfaces.hooks import Observer  # annotations only, as Pool
    from .._surfaces.pool import Pool  # for the annotation only: compute() goes through the seam
    from .run import Run


# Python's cyclic garbage collector pauses while a `with graph:` block builds.
# A build allocates millions of long-lived objects and frees none, so each
# full collection the growth triggers walks the whole heap for nothing: a
# third of a million-node build. As libraries that bulk-build object graphs
# do, the collector is disabled for the block (if it was enabled) and enabled
# again when the last block on any thread ends; nested and concurrent blocks
# share one count.
_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_paused_by_us = False


def _pause_gc() -> None:
    global _gc_pauses, _gc_paused_by_us
    with _gc_lock:
        if _gc_pauses == 0 and gc.isenabled():
            gc.disable()
            _gc_paused_by_us = True
        _gc_pauses += 1


def _resume_gc() -> None:
    global _gc_pauses, _gc_paused_by_us
    with _gc_lock:
        if _gc_pauses == 0:  # a forked child leaving a block its parent entered
            return
        _gc_pauses -= 1
        if _gc_pauses == 0 and _gc_paused_by_us:
            _gc_paused_by_us = False
            gc.enable()


def _gc_after_fork_in_child() -> None:
    """A forked child builds no graph: the collector as the program had it."""
    global _gc_lock, _gc_pauses, _gc_paused_by_us
    _gc_lock = threading.Lock()  # (another thread of the parent may have held it)
    if _gc_paused_by_us:
        gc.enable()
    _gc_pauses, _gc_paused_by_us = 0, False


os.register_at_fork(after_in_child=_gc_after_fork_in_child)


def _takes_parameters(fn: Callable[..., Any]) -> bool:
    """True unless ``fn``'s signature has no parameter at all (or none can be read)."""
    sig = signature(fn)
    return sig is None or bool(sig.parameters)  # (none: a builtin; give it the arguments)


def run_name(template: str | Callable[..., Any], arguments: dict[str, Any], what: str) -> str:
    """The name a ``task_run_name=`` or ``flow_run_name=`` template (``what``) gives
    a call whose bound ``arguments`` (defaults applied) are these."""
    if callable(template):
        # Prefect's form takes no parameters (it reads the run context); ours
        # gets the call's arguments by name.
        if not _takes_parameters(template):
            return str(template())
        return str(template(**arguments))
    try:
        return template.format(**arguments)
    except (KeyError, IndexError) as exc:
        raise ValueError(
            f"{what}{template!r} names {exc}, which is not a parameter of the function"
        ) from None


def _with_wait(current: int, flag: int) -> int:
    """The flags of an edge with ``current`` once ``wait_for`` adds ``flag`` to it
    (ORDER, with ALLOW from ``gx.allow_failure`` or the call's ``allow_failure=True``).

    An allowance given in ``wait_for`` covers the wait only: if the upstream is
    also a data input, not itself wrapped in ``gx.allow_failure``, its failure
    still skips the call, which never receives an exception in place of a value
    it did not ask for (SPEC: "a failed data input still skips it unless
    wrapped").
    """
    if current & DATA and not current & ALLOW:
        flag &= ~ALLOW
    return current | flag


def _with_data(current: int, flag: int) -> int:
    """The flags of an upstream found once more among a call's arguments (``flag``:
    DATA, with ALLOW if that occurrence is wrapped in ``gx.allow_failure``).

    A call that takes one upstream twice, once wrapped and once bare
    (``report(gx.allow_failure(fits), best=fits[0])``), is allowed its failure
    only if every data occurrence is wrapped: else the bare argument would
    receive the exception in place of a value it did not ask for. An allowance
    from ``wait_for`` covers the wait only (:func:`_with_wait`).
    """
    allow = current & flag & ALLOW if current & DATA else flag & ALLOW
    return ((current | flag) & ~ALLOW) | allow


class Graph:
    """A lazily built graph of task calls.

    Task calls inside ``with graph:`` are captured as :class:`Node` objects
    instead of running; :meth:`compute` runs them. Building is single-threaded:
    build a graph from one thread at a time.

    Example::

        graph = gx.Graph()
        with graph:
            total = add(load(1), load(2))
        run = graph.compute(workers=2)
        run[total]
    """

    _node_type: type[Node] = Node  # an eager session's graph makes Futures

    def __init__(self, name: str | None = None) -> None:
        self.name = name or "graph"
        self._tasks: list[Task] = []
        self._opts: list[Any] = []
        self._args: list[tuple[Any, ...]] = []
        self._kwargs: list[dict[str, Any] | None] = []
        self._deps: list[tuple[int, ...]] = []
        self._flags: list[tuple[int, ...] | None] = []  # None: every edge is plain DATA
        self._names: list[str] = []
        self._nodes: list[Node] = []
        self._counters: dict[str, int] = {}
        # id(fn) (a bound method: ids of its object and function) -> its Task, for
        # graph.add(fn)
        self._plain_tasks: dict[Any, Task] = {}
        self._latest_run: Run | None = None

    # -- building -----------------------------------------------------------

    def __enter__(self) -> Graph:
        push_graph(self)
        _pause_gc()
        return self

    def __exit__(self, *exc: object) -> None:
        _resume_gc()
        pop_graph(self)
        if len(self._tasks) != len(self._nodes):  # (a Ctrl-C mid-add: see _trim)
            self._trim()

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def nodes(self) -> list[Node]:
        """All nodes, in the order they were added."""
        return list(self._nodes)

    def add(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Node:
        """Add a call of ``fn`` without a decorator or a ``with`` block.

        ``fn`` may be a :class:`Task` or any callable (default options). The
        keywords ``wait_for``, ``allow_failure`` and ``return_state`` mean the same
        as in a task call; every other argument is passed to ``fn``.

        Returns:
            The new :class:`Node`.
        """
        if isinstance(fn, Task):
            return self._add_call(fn, args, kwargs)
        if type(fn) is BoundTask:  # model.score, score a task of model's class
            return self._add_call(fn.task, (fn.instance, *args), kwargs)
        if type(fn) is MethodType and isinstance(fn.__func__, Task):
            # (@classmethod over a task reached on Python 3.13: a plain bound method)
            return self._add_call(fn.__func__, (fn.__self__, *args), kwargs)
        # One wrapper per function and graph, not per call: checking a callable
        # (inspect.signature) costs more than adding the node. The graph holds
        # the wrapper, and so the function, for as long as it holds its nodes:
        # id(fn) cannot be reused meanwhile. A bound method (``model.predict``) is a
        # new object at each access: it is known by its object and function, so
        # one wrapper (and one pickle of the object for the workers) serves all.
        key: Any = id(fn)
        if type(fn) is MethodType:
            key = (id(fn.__self__), id(fn.__func__))
        task = self._plain_tasks.get(key)
        if task is None:
            task = self._plain_tasks[key] = as_task(fn, "graph.add")
        return self._add_call(task, args, kwargs)

    def _mark(self) -> tuple[int, dict[str, int]]:
        """Where the graph is now, for :meth:`_rollback` (``task.map``)."""
        return len(self._nodes), dict(self._counters)

    def _trim(self) -> None:
        """Drop what an add cut short left (a Ctrl-C between its appends): every column
        as long as ``_nodes``, appended last, which says what exists. Else the next
        node's columns would be another's (its function, its arguments)."""
        self._rollback((len(self._nodes), self._counters))

    def _rollback(self, mark: tuple[int, dict[str, int]]) -> None:
        """Drop the nodes added since ``mark``: the graph is as it was then."""
        n, counters = mark
        for column in (
            self._tasks,
            self._opts,
            self._args,
            self._kwargs,
            self._deps,
            self._flags,
            self._names,
            self._nodes,
        ):
            del column[n:]
        self._counters = counters

    def _add_call(self, task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Node:
        # The hot path of building: a million calls must cost little more than
        # a dict of tuples. Plain scalars and bare nodes, the usual arguments,
        # are handled inline; anything else goes through the container walk.
        opts = task.options
        wait_for = None
        wait_flag = ORDER
        if kwargs:
            wait_for = kwargs.pop("wait_for", None)
            if "allow_failure" in kwargs or "return_state" in kwargs:
                overrides: dict[str, Any] = {
                    k: kwargs.pop(k) for k in ("allow_failure", "return_state") if k in kwargs
                }
                opts = opts.updated(overrides, f"{task.name}() call")
                if overrides.get("allow_failure") is True:
                    # The call keyword means "failures around this call are allowed":
                    # its wait_for list is covered as if each entry were wrapped in
                    # gx.allow_failure. Data inputs are not: a call never receives an
                    # exception in place of a value it did not ask for.
                    wait_flag = ORDER | ALLOW

        # The arguments must bind to the function's parameters: said at the call, not
        # when the node runs (a failure there spent its retries first). Inline for
        # positional arguments, the usual call: a few comparisons.
        arity = task._arity
        if arity is None:
            arity = task._arity = call_shape(task.fn)
        if (
            arity
            and (kwargs or not (arity[1] <= len(args) <= arity[5]) or arity[4])
            and not _fits(arity, args, kwargs)
        ):
            _refuse_arguments(task, args, kwargs)

        node_type = self._node_type
        # Upstream indices while every edge is a bare node taken as plain data
        # (the common case, no dict needed); ``found`` (index -> flags) otherwise.
        ups: list[int] = []
        found: dict[int, int] | None = None
        # id(argument) -> its copy: a container holding nodes, copied (take_nodes)
        taken: dict[int, Any] | None = None
        for value in (*args, *kwargs.values()) if kwargs else args:
            kind = type(value)
            if kind in PLAIN:
                continue
            if kind is node_type and value.graph is self and found is None:
                ups.append(value.index)
                continue
            if kind is GeneratorType:
                # Consumed when the task runs, not now: its task calls would run then,
                # as plain calls, with no edges (or it fails to pickle for a worker)
                raise TypeError(
                    f"{task.name}() at {call_site()}: an argument is a generator; a graph "
                    "is built from values, not from iterators consumed later: pass "
                    "list(...) of it"
                )
            if found is None:
                found = dict.fromkeys(ups, DATA)
            copied = take_nodes(value, self._collector(found), DATA)
            if copied is not value:
                if taken is None:
                    taken = {}
                taken[id(value)] = copied
        if taken is not None:  # the call keeps the copies: the caller may change its own
            args = tuple([taken.get(id(a), a) for a in args])
            if kwargs:
                kwargs = {k: taken.get(id(v), v) for k, v in kwargs.items()}
        if wait_for is not None:
            if found is None:
                found = dict.fromkeys(ups, DATA)
            self._scan_wait_for(wait_for, found, task.name, wait_flag)

        if opts.task_run_name is None:
            counters = self._counters
            count = counters.get(task.name, 0)
            name = f"{task.name}-{count}"
        else:
            # Before anything is appended: a name that cannot be made raises here and
            # leaves the graph as it was (its lists stay in step, index for index).
            name = self._node_name(task, opts, args, kwargs)
        index = len(self._nodes)
        if len(self._tasks) != index:  # an add cut short (Ctrl-C mid-way): undo its rest
            self._trim()
        node = _new(node_type)  # Node.__init__ without its Python call
        node.graph = self
        node.index = index
        self._tasks.append(task)
        self._opts.append(opts)
        self._args.append(args)
        self._kwargs.append(kwargs or None)
        if found is None:
            self._deps.append(tuple(dict.fromkeys(ups)) if len(ups) > 1 else tuple(ups))
            self._flags.append(None)
        else:
            self._deps.append(tuple(found))
            flags = tuple(found.values())
            self._flags.append(None if flags.count(DATA) == len(flags) else flags)
        if opts.task_run_name is None:
            counters[task.name] = count + 1
        self._names.append(name)
        self._nodes.append(node)
        return node

    def _copy_node(self, source: Graph, i: int, mapping: dict[int, Node]) -> Node:
        """Append a copy of ``source``'s node ``i``; its upstreams are already in ``mapping``."""
        index = len(self._nodes)
        if len(self._tasks) != index:  # (see _add_call)
            self._trim()
        node = self._node_type(self, index)
        self._tasks.append(source._tasks[i])
        self._opts.append(source._opts[i])
        self._args.append(remap(source._args[i], mapping))
        kwargs = source._kwargs[i]
        self._kwargs.append(remap(kwargs, mapping) if kwargs else None)
        self._deps.append(tuple(mapping[up].index for up in source._deps[i]))
        self._flags.append(source._flags[i])
        self._names.append(source._names[i])
        self._nodes.append(node)
        return node

    def _collector(self, found: dict[int, int], wait: bool = False) -> Callable[[Node, int], None]:
        """A visitor for :func:`find_nodes` recording this graph's nodes (index -> flags);
        ``wait``: they come from ``wait_for`` (:func:`_with_wait`)."""

        def visit(node: Node, flag: int) -> None:
            if node.graph is not self:
                where = node._ELSEWHERE.format(name=node.name, graph=node.graph.name)
                raise TypeError(f"{where}; used at {call_site()}. {node._ELSEWHERE_ADVICE}")
            current = found.get(node.index, 0)
            found[node.index] = (_with_wait if wait else _with_data)(current, flag)

        return visit

    def _node_name(self, task: Task, opts: Any, args: tuple, kwargs: dict) -> str:
        """The name ``task_run_name=`` gives this call (a format string or a callable)."""
        template = opts.task_run_name
        sig = signature(task.fn)
        try:
            if sig is None:
                raise ValueError("no signature")
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
        except (TypeError, ValueError):
            _refuse_arguments(task, args, kwargs)  # the one message for a call that does not bind
            raise
        return run_name(template, arguments, f"{task.name}: task_run_name=")

    def _scan_wait_for(
        self, wait_for: Any, found: dict[int, int], name: str, base: int = ORDER
    ) -> None:
        """Record the nodes of ``wait_for`` (a node, or any iterable of them, nested in
        the containers arguments are searched in, ``gx.allow_failure`` marking what it
        holds; a dict by its values) in ``found`` as order edges; anything else is a
        TypeError naming ``name`` (a task's call, or ``node.wait_for``) and where."""
        if isinstance(wait_for, dict):
            wait_for = list(wait_for.values())
        elif not isinstance(wait_for, (Node, allow_failure, str, bytes, *SEQUENCES)):
            try:
                wait_for = list(wait_for)  # a generator, dict.values(), a FutureList...
            except Exception:
                pass  # not iterable: refused below, with what it is

        def refuse(value: Any) -> None:
            raise TypeError(
                f"{name}() at {call_site()}: wait_for= takes nodes (or gx.allow_failure(node), "
                f"or lists of them), got {type(value).__name__} {value!r}"
            )

        find_nodes(wait_for, self._collector(found, wait=True), base, refuse)

    def _add_order_edges(self, index: int, upstream: Iterable[Any]) -> None:
        found: dict[int, int] = {}
        self._scan_wait_for(list(upstream), found, f"{self._names[index]}.wait_for")
        for up in found:
            path = self._path(up, index)
            if path is not None:
                # path runs from this node down its dependents to ``up``, in the
                # order they would run; the new edge closes it back to this node.
                cycle = " -> ".join(self._names[i] for i in [*path, index])
                raise ValueError(
                    f"{self._names[index]}.wait_for({self._names[up]}) would create a cycle: "
                    f"{cycle}; remove one of these edges"
                )
        deps = dict(zip(self._deps[index], self._flags[index] or [DATA] * len(self._deps[index])))
        for up, flag in found.items():
            deps[up] = _with_wait(deps.get(up, 0), flag)
        self._deps[index] = tuple(deps)
        flags = tuple(deps.values())
        self._flags[index] = None if all(f == DATA for f in flags) else flags

    def _path(self, start: int, goal: int) -> list[int] | None:
        """A dependency path from ``start`` down to ``goal``, or None (iterative DFS)."""
        parent: dict[int, int] = {start: -1}
        stack = [start]
        while stack:
            node = stack.pop()
            if node == goal:
                path = [node]
                while parent[path[-1]] != -1:
                    path.append(parent[path[-1]])
                return path
            for dep in self._deps[node]:
                if dep not in parent:
                    parent[dep] = node
                    stack.append(dep)
        return None

    # -- running ------------------------------------------------------------

    def compute(
        self,
        *targets: Any,
        workers: int | None = None,
        scheduler: str = "processes",
        fail_fast: bool = False,
        raise_on_failure: bool = True,
        keep: str = "targets",
        pool: Pool | None = None,
        memory_limit: int | str | None = None,
        limits: dict[str, int] | None = None,
        start_method: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        refresh_cache: bool = False,
        cluster: Any = None,
        progress: bool | None = None,
        observers: list[Observer] | None = None,
        on_completion: list[Callable[..., Any]] | None = None,
        on_failure: list[Callable[..., Any]] | None = None,
        on_cancellation: list[Callable[..., Any]] | None = None,
        on_crashed: list[Callable[..., Any]] | None = None,
        max_calls_per_worker: int | None = None,
        inner_threads: int | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        keep_inputs: int | str | None = None,
    ) -> Run:
        """Run the graph (or the ancestors of ``targets``) and return a :class:`Run`.

        Args:
            *targets: nodes (or lists of nodes) to compute; only their ancestors run.
                Default: the graph's outputs (nodes nothing depends on), so every
                node runs; with ``keep="targets"`` only the targets' values are kept.
                An empty list (a selection that came out empty) runs nothing.
            workers: worker processes (threads for ``scheduler="threads"``); default
                the cores this process may use (its CPU affinity and its cgroup's CPU
                quota, as in a SLURM job or a container). ``0`` runs everything
                in-process (``"sync"``).
            scheduler: ``"processes"`` (default), ``"threads"`` for work that releases
                the GIL, or ``"sync"`` to run in this thread (pdb works).
            fail_fast: cancel everything still pending at the first unhandled failure.
            raise_on_failure: raise :class:`GraphFailed` after the run if a failure was
                not handled by a dependent.
            keep: ``"targets"`` keeps the values of the targets (by default: the
                graph's outputs, the nodes nothing depends on) and frees every
                intermediate once its last dependent has finished; ``"all"`` keeps
                every value.
            pool: a :class:`Pool` whose warm workers to use (processes scheduler).
            memory_limit: per-worker RSS limit, bytes or a string such as ``"4GB"``.
            limits: concurrency limits per tag, e.g. ``{"db": 2}``.
            start_method: ``"zygote"`` (Linux default while this process runs one
                thread), ``"forkserver"`` (the default otherwise; the opt-out),
                ``"spawn"`` or ``"fork"``; see docs/guide/schedulers.md.
            cache_dir: where cached results live (tasks with ``cache=True`` or a
                ``cache_key_fn``); default ``./.graphexec-cache``.
            refresh_cache: recompute and overwrite every cached task's entry.
            cluster: a ``distributed.Client``: run the tasks on its dask cluster, with
                the same states and policies (``pip install 'graphexec[distributed]'``).
                Values stay on the cluster until read with ``run[node]``. Not with
                ``workers=``, ``pool=``, ``scheduler=``, ``memory_limit=`` or
                ``start_method=``; see docs/cluster.md for what differs (timeouts
                cannot kill a running task; the cache directory must be shared).
            progress: show a progress bar on stderr (done/total, running, failed,
                skipped, cached, ETA). ``None`` (default): only when stderr is a
                terminal and the ``CI`` environment variable is not set. A graph
                computed inside a ``@gx.flow`` shows in the flow's bar (its
                ``progress=``), and inside ``with gx.Pool():`` submits none. Without
                a bar, when logger ``graphexec`` emits INFO, a progress line is logged
                every 30 s or tenth of the nodes (``GRAPHEXEC_PROGRESS_LOG`` seconds;
                ``off`` for none).
            observers: :class:`Observer` instances told of every event of the run
                (also those of enclosing ``with gx.observe(...)`` blocks).
            on_completion: functions called with the :class:`Run` (or Prefect's
                ``(flow, flow_run, state)``: the graph, the Run, and a
                :class:`State` of the run's outcome named after it) when the
                run ends without an unhandled failure.
            on_failure: the same, when it ends with one (``not run.ok``).
            on_cancellation: the same, when Ctrl-C or ``fail_fast`` cancelled it.
            on_crashed: the same, when something outside the tasks ended it (an
                error inside graphexec, ``SystemExit`` from a signal handler).
                Run hooks, observers and task hooks run in this process off the
                scheduler's thread; ``compute`` waits for them before it returns or
                raises, up to ``GRAPHEXEC_HOOK_WAIT`` seconds (60); see
                docs/guide/hooks.md.
            max_calls_per_worker: replace a worker process after it has run this
                many calls (between calls, blaming nobody); with ``pool=``, give
                it to :class:`Pool` instead.
            inner_threads: threads that BLAS, OpenMP and numexpr may start in
                each worker process. ``None`` (default): ``cores // workers``
                (at least 1), except where you set ``OMP_NUM_THREADS``,
                ``OPENBLAS_NUM_THREADS`` and the like yourself; a count overrides
                those too. With ``pool=``, give it to :class:`Pool`; see
                docs/guide/threads.md.
            run_dir: a directory to write the run's record to as it goes (states
                and timings as nodes finish, inputs as they fail): if this process
                is killed, ``Run.load(run_dir)`` reads what finished, what failed
                (and replays it) and what was running. See docs/howto/replay.md.
            keep_inputs: bytes of failed nodes' inputs the run keeps for
                ``run.replay`` (an int or a size such as ``"200MB"``; 0 keeps
                none); default ``GRAPHEXEC_KEEP_INPUTS``, else 1 GiB.

        Returns:
            The :class:`Run`: a state for every node, values of kept nodes.

        Raises:
            GraphFailed: an unhandled failure (``raise_on_failure=True``); ``.run``
                holds the complete run.
            KeyboardInterrupt: Ctrl-C, or SIGTERM while this runs in the main
                thread (a ``Terminated``, see the schedulers guide); ``.run`` holds
                the partial run, with every node not finished ``Cancelled``.
        """
        return surfaces.compute(
            self,
            targets,
            workers=workers,
            scheduler=scheduler,
            fail_fast=fail_fast,
            raise_on_failure=raise_on_failure,
            keep=keep,
            pool=pool,
            memory_limit=memory_limit,
            limits=limits,
            start_method=start_method,
            cache_dir=cache_dir,
            refresh_cache=refresh_cache,
            cluster=cluster,
            progress=progress,
            observers=observers,
            on_completion=on_completion,
            on_failure=on_failure,
            on_cancellation=on_cancellation,
            on_crashed=on_crashed,
            max_calls_per_worker=max_calls_per_worker,
            inner_threads=inner_threads,
            run_dir=run_dir,
            keep_inputs=keep_inputs,
        )

    def visualize(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        run: Run | None = None,
        collapse: bool | None = None,
        rankdir: str = "LR",
    ) -> Any:
        """Draw the graph, nodes coloured by their state in the latest run.

        Green completed, blue cached, red failed (bold border), grey dashed
        skipped, dark grey cancelled, white not run. A graph of more than 200
        nodes is collapsed by task name: one box per task with its count per
        state, one edge per pair of tasks labelled with its count, so that a
        10,000-node graph still reads.

        Needs the ``graphviz`` Python package (``pip install 'graphexec[viz]'``)
        and, for ``.svg``/``.png``/``.pdf``, Graphviz's ``dot`` program
        (``apt-get install graphviz``); a ``.dot`` file needs no program.

        Args:
            path: file to write; its suffix picks the format (``.svg``, ``.png``,
                ``.pdf``, ``.dot``). None: only return the drawing.
            run: the run whose states colour the nodes; default the latest.
            collapse: one box per task (True) or per node (False); default by size.
            rankdir: Graphviz direction, ``"LR"`` (left to right) or ``"TB"``.

        Returns:
            The ``graphviz.Digraph`` (shown inline in Jupyter).

        Raises:
            ImportError: the ``graphviz`` package is missing (the message says what to
                install); RuntimeError: the ``dot`` program is missing.

        Example::

            run = graph.compute(raise_on_failure=False)
            graph.visualize("graph.svg")
        """
        return surfaces.visualize(self, path, run=run, collapse=collapse, rankdir=rankdir)

    def _latest_run_or_raise(self) -> Run:
        if self._latest_run is None:
            raise RuntimeError(f"{self.name} has not been computed yet: call graph.compute() first")
        return self._latest_run

    def __repr__(self) -> str:
        name = " ".join(self.name.split())  # a repr is one line, whatever the name holds
        return f"<Graph {name}: {len(self._nodes)} nodes>"

    def _repr_html_(self) -> str:
        """How the graph shows in a Jupyter notebook: nodes per task and, for a graph
        of at most 50 nodes where Graphviz's ``dot`` is installed, its picture."""
        return surfaces.graph_html(self)


# -- arguments against the function's signature, at the call -------------------------


def _fits(arity: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the call binds (a few comparisons: the build's hot path); a False is
    said exactly by :func:`_refuse_arguments`."""
    most, required, keywords, names, kw_required, _ = arity
    n = len(args)
    if most is not None and n > most:
        return False
    if not kwargs:
        return n >= required and not kw_required
    if keywords is not None and not keywords.issuperset(kwargs):
        return False
    given = names[:n]
    if any(name in kwargs for name in given):
        return False
    missing = [name for name in names[n:required] if name not in kwargs]
    return not missing and kw_required.issubset(kwargs)


def _refuse_arguments(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The call does not bind: say so now, as Python would, not when it runs."""
    sig = signature(task.fn)
    try:
        if sig is None:
            raise ValueError(f"no signature found for {task.name}")
        sig.bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:  # (ValueError: it has no signature)
        raise TypeError(
            f"{task.name}() at {call_site()}: arguments do not match its signature: {exc}"
        ) from None
