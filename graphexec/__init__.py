"""graphexec: run CPU-heavy task graphs on every core, with failure handling you can trust.

Build a graph by calling decorated functions inside ``with graph:``, run it
with ``graph.compute()``, read values and states from the returned ``Run``::

    import graphexec as gx

    @gx.task(retries=2)
    def simulate(seed): ...

    @gx.task
    def summarize(values): ...

    graph = gx.Graph()
    with graph:
        report = summarize([simulate(s) for s in range(100)])
    run = graph.compute(workers=4)
    print(run[report], run.summary())

Everything public is re-exported here; modules starting with ``_`` are private.
"""

import logging as _logging

from ._data.cache import clear_cache
from ._model.errors import (
    Cancelled,
    GraphexecError,
    GraphFailed,
    MemoryLimitExceeded,
    RemoteError,
    ResultReleased,
    SerializationError,
    TaskFailure,
    TaskTimeout,
    Terminated,
    UpstreamFailed,
    WorkerCrashed,
)
from ._model.graph import Graph
from ._model.keys import CacheContext, task_input_hash
from ._model.node import Node, allow_failure
from ._model.options import exponential_backoff
from ._model.run import Run
from ._model.state import Attempt, State
from ._model.task import Task, task, unmapped
from ._surfaces.eager import Future, WaitResult, as_completed, wait
from ._surfaces.flow import Flow, flow
from ._surfaces.hooks import Observer, observe
from ._surfaces.pool import Pool
from ._version import __version__ as __version__

# A library logs, the application decides where it goes (no "No handlers" noise).
_logging.getLogger("graphexec").addHandler(_logging.NullHandler())

__all__ = [
    # building
    "Graph",
    "Node",
    "Task",
    "task",
    "allow_failure",
    "unmapped",
    "exponential_backoff",
    # caching
    "task_input_hash",
    "clear_cache",
    "CacheContext",
    # eager: flows and futures
    "flow",
    "Flow",
    "Future",
    "wait",
    "WaitResult",
    "as_completed",
    # running
    "Pool",
    "Run",
    "State",
    "Attempt",
    # watching: hooks and observers
    "Observer",
    "observe",
    # errors
    "GraphexecError",
    "GraphFailed",
    "TaskFailure",
    "WorkerCrashed",
    "TaskTimeout",
    "MemoryLimitExceeded",
    "SerializationError",
    "RemoteError",
    "UpstreamFailed",
    "Cancelled",
    "Terminated",
    "ResultReleased",
]
