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

import importlib as _importlib
import logging as _logging
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from . import _surfaces as _surfaces  # fills the model's seam; its modules load on first use
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
from ._version import __version__ as __version__

if _TYPE_CHECKING:
    from ._data.cache import clear_cache
    from ._surfaces.eager import Future, FutureList, WaitResult, as_completed, wait
    from ._surfaces.flow import Flow, flow
    from ._surfaces.hooks import Observer, observe
    from ._surfaces.pool import Pool

# Public names whose modules load when a name is first used (PEP 562), so that
# `import graphexec` (and every worker's start, which imports the package) does
# not pay for the scheduler, the process pool and the cache store: name -> module.
_LAZY = {
    "clear_cache": "._data.cache",
    "Future": "._surfaces.eager",
    "FutureList": "._surfaces.eager",
    "WaitResult": "._surfaces.eager",
    "as_completed": "._surfaces.eager",
    "wait": "._surfaces.eager",
    "Flow": "._surfaces.flow",
    "flow": "._surfaces.flow",
    "Observer": "._surfaces.hooks",
    "observe": "._surfaces.hooks",
    "Pool": "._surfaces.pool",
}


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "FutureList",
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
