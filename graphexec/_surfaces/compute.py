"""``graph.compute()``: validate the options, open an executor, run the scheduler.

::

    Graph.compute(**options) ──seam──> compute()
        ComputeOptions.validate ─> targets, culling (_model.order) ─> Run
        make_executor(options).open(run) ─> Scheduler(graph, run, executor).run()
        close the executor ─> Run, or GraphFailed carrying it

A graph computed inside a flow (or next to ``task.submit`` in a ``with
gx.Pool():`` block) is handed to that eager session instead: one scheduler,
one pool.
"""

from __future__ import annotations

from typing import Any

from .._data.cache import CacheStore
from .._engine.scheduler import Scheduler
from .._model.graph import Graph
from .._model.node import Node
from .._model.order import post_order, sinks
from .._model.run import Run
from .._model.walk import find_nodes
from .backends import make_executor
from .eager import flow_session
from .options import ComputeOptions
from .progress import make_observer
from .signals import cancel_reason, sigterm_as_interrupt


def compute(graph: Graph, targets: tuple[Any, ...], **given: Any) -> Run:
    """Run ``graph`` (or the ancestors of ``targets``); see ``Graph.compute``."""
    options = ComputeOptions.validate("compute", **given)
    target_ids = target_indices(graph, targets)
    pool = options.pool
    session = pool._session if pool is not None else flow_session()
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
        return session.compute_graph(graph, target_ids, options)
    if not target_ids:
        target_ids = sinks(graph._deps)
    members = post_order(graph._deps, target_ids)
    kept = set(members) if options.keep == "all" else set(target_ids)
    run = Run(graph, members, kept)
    observer = make_observer(options.progress)  # None unless a bar is wanted: no cost then
    store = None
    if any(graph._opts[i].cache_key_fn is not None for i in members):
        store = CacheStore(options.cache_dir)
    executor = make_executor(options)
    executor.open(run)
    sched = Scheduler(
        graph,
        run,
        executor,
        fail_fast=options.fail_fast,
        limits=options.limits,
        cache=store,
        refresh_cache=options.refresh_cache,
        observer=observer,
    )
    try:
        with sigterm_as_interrupt():  # SIGTERM raises signals.Terminated, a KeyboardInterrupt
            sched.run()
    except KeyboardInterrupt as interrupt:
        sched.cancel(cancel_reason(interrupt), everything=True)
        run._finish_run()
        graph._latest_run = run
        interrupt.run = run  # type: ignore[attr-defined]
        raise
    finally:
        if observer is not None:  # normal end, Ctrl-C (all cancelled by now) or a bug
            observer.closed(run)
        if store is not None:
            store.unlock_all()
        executor.close()
    run._finish_run()
    graph._latest_run = run
    if options.raise_on_failure:
        run._raise_if_failed()
    return run


def target_indices(graph: Graph, targets: tuple[Any, ...]) -> list[int]:
    """The node indices named by ``compute()``'s targets (nodes, or containers of them)."""
    ids: list[int] = []

    def visit(node: Node, flag: int) -> None:
        if node.graph is not graph:
            raise ValueError(f"target {node.name!r} belongs to another graph")
        ids.append(node.index)

    def refuse(value: Any) -> None:
        raise TypeError(f"compute() targets must be nodes, got {type(value).__name__}")

    for item in targets:
        find_nodes(list(item.values()) if isinstance(item, dict) else item, visit, 0, refuse)
    return list(dict.fromkeys(ids))
