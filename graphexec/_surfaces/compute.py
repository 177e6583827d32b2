"""``graph.compute()``: validate the options, open an executor, run the scheduler.

::

    Graph.compute(**options) ──seam──> compute()
        ComputeOptions.validate ─> targets, culling (_model.order) ─> Run
        make_executor(options).open(run) ─> Scheduler(graph, run, executor).run()
        hooks and observers (a Dispatch, only if something listens): wait for them
        close the executor ─> Run, or GraphFailed carrying it

A graph computed inside a flow (without ``pool=``) is handed to the flow's
eager session instead: one scheduler, one pool. With ``pool=`` it is a run of
its own on that pool, beside the pool's other runs (``_executors/shared.py``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

from .._data.cache import store_for_run
from .._engine.scheduler import Scheduler
from .._model.graph import Graph
from .._model.node import Node, allow_failure, user_stacklevel
from .._model.order import post_order, sinks
from .._model.run import Run
from .._model.walk import SEQUENCES
from .backends import make_executor
from .eager import flow_session
from .hooks import Dispatch, ambient_observers, call_run_hooks, end_hooks, outcome
from .options import ComputeOptions
from .progress import make_observers
from .record import Journal
from .signals import (
    cancel_reason,
    deferred_in_critical_sections,
    mark_interrupted,
    sigterm_as_interrupt,
)


def compute(graph: Graph, targets: tuple[Any, ...], **given: Any) -> Run:
    """Run ``graph`` (or the ancestors of ``targets``); see ``Graph.compute``."""
    if given.get("pool") is None:
        return _compute(graph, targets, given)
    # On a gx.Pool this thread may drive the pool for other threads' runs too:
    # Ctrl-C and SIGTERM wait out its critical sections (signals.py), from the
    # first submit to the run's close.
    with deferred_in_critical_sections():
        return _compute(graph, targets, given)


def _compute(graph: Graph, targets: tuple[Any, ...], given: dict[str, Any]) -> Run:
    options = ComputeOptions.validate("compute", **given)
    # No target: every sink. An empty selection (compute([])) is no target at all.
    target_ids = target_indices(graph, targets) if targets else sinks(graph._deps)
    pool = options.pool
    # With pool=, a run of its own on that pool (concurrent with the pool's other
    # runs, flows and submits); without, inside a flow, the flow's session.
    session = None if pool is not None else flow_session()
    if session is not None:
        # One scheduler: a lazy graph computed inside a flow (or next to submits
        # on the same pool) runs in that session, on its pool.
        if options.cluster is not None:
            raise ValueError(
                "cluster= for a graph computed inside a flow: the flow's "
                "scheduler runs it, on the flow's workers"
            )
        if options.fail_fast:
            raise ValueError(
                "fail_fast=True for a graph computed inside a flow: the flow's scheduler runs "
                "it, so give fail_fast to @gx.flow instead"
            )
        if options.inner_threads is not None:
            raise ValueError(
                "inner_threads= for a graph computed inside a flow: its workers are the "
                "flow's, so give inner_threads to @gx.flow (or gx.Pool) instead"
            )
        if options.run_dir is not None:
            raise ValueError(
                "run_dir= for a graph computed inside a flow: the flow's scheduler runs it; "
                "save the flow's run instead (exc.run.save(path) on a GraphFailed)"
            )
        if options.observers:
            raise ValueError(
                "observers= for a graph computed inside a flow: the flow's scheduler runs "
                "it, so give observers to @gx.flow instead (they see these nodes too)"
            )
        return _in_session(session, graph, target_ids, options)
    members = post_order(graph._deps, target_ids)
    if options.limits:
        warn_of_unused_limits(graph, members, options.limits)
    kept = set(members) if options.keep == "all" else set(target_ids)
    run = Run(graph, members, kept)
    run._inputs_cap = options.keep_inputs
    # The executor first: a pool that cannot run (closed, say) refuses the run
    # before its record is opened, so an earlier record there stays whole.
    executor = make_executor(options)
    # Ctrl-C while the workers start (a fork, the guard's shell): handled below as
    # one during the run, so that it too cancels every node and carries the Run.
    early: KeyboardInterrupt | None = None
    try:
        executor.open(run)
    except KeyboardInterrupt as interrupt:
        early = interrupt
    try:
        journal = None
        if options.run_dir is not None:  # the run's record, written as it goes
            journal = Journal(options.run_dir)
            run._record = journal.path
        # None when nothing listens
        dispatch = _dispatch(graph, members, options, journal, executor.capabilities.slots)
        store = None
        if any(graph._opts[i].cache_key_fn is not None for i in members):
            store = store_for_run(options.cache_dir)
    except BaseException:
        executor.close()
        raise
    sched = Scheduler(
        graph,
        run,
        executor,
        fail_fast=options.fail_fast,
        limits=options.limits,
        cache=store,
        refresh_cache=options.refresh_cache,
        observer=dispatch,
    )
    kinds: tuple[str, ...] = ("on_crashed",)  # unless the run ends as below
    try:
        if dispatch is not None:
            dispatch.bind(sched.release_held)
            if dispatch.reads_values:
                # A chained call's value stays in its worker (HELD), where no hook
                # can read it: a run whose hooks may read values sends no chains.
                sched.chains = False
        try:
            with sigterm_as_interrupt():  # SIGTERM raises signals.Terminated, a KeyboardInterrupt
                sched.run(interrupted=early)
        except KeyboardInterrupt as interrupt:
            sched.cancel(cancel_reason(interrupt), everything=True)
            mark_interrupted(run, interrupt)
            kinds = ("on_cancellation",)
            interrupt.run = run  # type: ignore[attr-defined]
            raise
        kinds = outcome(run, cancelled=sched.cancel_reason is not None)
    finally:
        # Normal end, Ctrl-C (all cancelled by now) or a bug: the hooks run first
        # (they may read values still held for them), then the run is finished,
        # as of now: its duration is not the hooks' wait.
        ended = time.time()

        def finish() -> None:
            if kinds != ("on_crashed",) and run.finished is None:
                run._finish_run(ended)
                graph._latest_run = run

        try:
            end_hooks(dispatch, run, kinds, finish)
        finally:  # (a Ctrl-C in the hooks' wait too: the workers must go all the same)
            finish()
            if store is not None:
                store.unlock_all()
            executor.close()
    if options.raise_on_failure:
        run._raise_if_failed()
    return run


def _dispatch(
    graph: Graph,
    members: list[int],
    options: ComputeOptions,
    journal: Journal | None = None,
    slots: int | None = None,
) -> Dispatch | None:
    """The run's Dispatch, if anything listens: observers (given, of ``observe()``
    blocks, graphexec's bar or log line, the run's journal), run hooks, or a task
    hook of a member."""
    observers = [
        *make_observers(options.progress, slots),
        *ambient_observers(),
        *options.observers,
    ]
    if journal is not None:
        observers.append(journal)
    # (a few TaskOptions objects are shared by all the nodes: check each once)
    unique = set(map(graph._opts.__getitem__, members))
    if (
        observers
        or any(options.hooks)
        or any(o.on_completion or o.on_failure or o.on_retry for o in unique)
    ):
        dispatch = Dispatch(observers, options.hooks, flow=graph)
        dispatch.reads_values = dispatch.observers_read_values or any(
            o.on_completion for o in unique
        )
        return dispatch
    return None


def _in_session(session: Any, graph: Graph, targets: list[int], options: ComputeOptions) -> Run:
    """A graph computed inside a flow: the flow's session runs it (its dispatcher calls
    the task hooks); the run hooks are called here, in the flow body's thread."""
    if not any(options.hooks):
        return session.compute_graph(graph, targets, options)
    try:
        run = session.compute_graph(graph, targets, options)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        failed = getattr(exc, "run", None)
        if isinstance(failed, Run):
            call_run_hooks(options.hooks, ("on_failure",), failed, graph)
        raise
    call_run_hooks(options.hooks, outcome(run, cancelled=False), run, graph)
    return run


def target_indices(graph: Graph, targets: tuple[Any, ...]) -> list[int]:
    """The node indices named by ``compute()``'s targets (nodes, or containers of them)."""
    ids: list[int] = []

    def visit(item: Any) -> None:
        # A dict's keys are labels (``{"fit": fit, "plot": [a, b]}``) at any depth, not
        # targets: this is not find_nodes, which searches a call's keys too.
        if isinstance(item, Node):
            if item.graph is not graph:
                raise ValueError(f"target {item.name!r} belongs to another graph")
            ids.append(item.index)
        elif type(item) is allow_failure:  # (as find_nodes unwraps it)
            visit(item.value)
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, SEQUENCES):
            for value in item:
                visit(value)
        else:
            raise TypeError(f"compute() targets must be nodes, got {type(item).__name__}")

    visit(targets)
    return list(dict.fromkeys(ids))


def warn_of_unused_limits(graph: Graph, members: Sequence[int], limits: dict[str, int]) -> None:
    """A ``limits=`` tag that no task of the run has limits nothing: most often a typo
    (``"gpus"`` for ``"gpu"``), which would otherwise let every tagged call run at once."""
    opts = graph._opts
    distinct = dict(zip(map(id, map(opts.__getitem__, members)), map(opts.__getitem__, members)))
    tags = {tag for o in distinct.values() for tag in o.tags}
    for tag, cap in limits.items():
        if tag not in tags:
            warnings.warn(
                f"limits={{{tag!r}: {cap}}} limits nothing: no task of this run has the tag "
                f"{tag!r} (its tags: {', '.join(map(repr, sorted(tags))) or 'none'}); check "
                "the spelling, or the tasks' tags=",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
