"""Which executor runs a compute or a flow: the one place that names the backends.

The engine only sees the :class:`~graphexec._executors.protocol.Executor`
protocol; adding a backend means adding its module under ``_executors/`` and
a branch here.
"""

from __future__ import annotations

from .._executors.cluster import ClusterExecutor
from .._executors.inprocess import SyncExecutor, ThreadExecutor
from .._executors.process import ProcessPool
from .._executors.protocol import Executor
from .options import ComputeOptions


def make_executor(options: ComputeOptions) -> Executor:
    """The executor for ``options``; the caller opens it for its Run, and closes it."""
    executor: Executor
    if options.cluster is not None:
        executor = ClusterExecutor(options.cluster)
    elif options.scheduler == "sync":
        executor = SyncExecutor()
    elif options.scheduler == "threads":
        executor = ThreadExecutor(options.workers)
    elif options.pool is not None:
        executor = options.pool._lease(options.memory_limit)  # warm: closing keeps it
    else:
        pool = ProcessPool(
            options.workers,
            start_method=options.start_method,
            max_calls=options.max_calls_per_worker,
            inner_threads=options.inner_threads,
        )
        executor = pool.lease(options.memory_limit, shutdown_on_close=True)
    return executor
