"""Which executor runs a compute or a flow: the one place that names the backends.

The engine only sees the :class:`~graphexec._executors.protocol.Executor`
protocol; adding a backend means adding its module under ``_executors/`` and
a branch here.
"""

from __future__ import annotations

from typing import Any

from .. import _executors  # its dask executor loads on first use, with cluster=
from .._executors.inprocess import SyncExecutor, ThreadExecutor
from .._executors.process import ProcessPool, default_start_method, prestart
from .._executors.protocol import Executor
from .options import ComputeOptions


def make_executor(options: ComputeOptions) -> Executor:
    """The executor for ``options``; the caller opens it for its Run, and closes it."""
    executor: Executor
    if options.cluster is not None:
        executor = _executors.cluster.ClusterExecutor(options.cluster)
    elif options.scheduler == "sync":
        executor = SyncExecutor()
    elif options.scheduler == "threads":
        executor = ThreadExecutor(options.workers)
    elif options.pool is not None:
        executor = options.pool._lease(options.memory_limit)  # warm: closing keeps it
    else:
        pool = ProcessPool(
            options.workers,
            start_method=options.start_method
            or default_start_method(options.memory_limit is not None),
            max_calls=options.max_calls_per_worker,
            inner_threads=options.inner_threads,
        )
        executor = pool.lease(options.memory_limit, shutdown_on_close=True)
    return executor


def starts_own_pool(given: dict[str, Any]) -> bool:
    """Whether a compute or flow with these (unvalidated) options starts a process pool
    of its own: no ``pool=``, ``cluster=``, threads or sync."""
    return (
        given.get("scheduler", "processes") == "processes"
        and given.get("pool") is None
        and given.get("cluster") is None
        and given.get("workers") != 0
    )


def start_early(given: dict[str, Any]) -> None:
    """Start the process pool's forkserver now if a compute with these (unvalidated)
    options will need it: the first compute calls this before loading the scheduler,
    so that the forkserver's start runs meanwhile. A wrong guess costs only a
    forkserver started earlier than its first worker (it serves the whole process)."""
    if starts_own_pool(given):
        limited = given.get("memory_limit") is not None
        prestart(given.get("start_method") or default_start_method(limited))
