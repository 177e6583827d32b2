"""The public, warm pool: ``with gx.Pool(workers=4) as pool: graph.compute(pool=pool)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .._executors.process import Lease, ProcessPool, default_start_method
from .eager import cancel_pool_session, end_pool_session, pop_context, push_context
from .options import check_max_calls, check_workers


class Pool:
    """A pool of worker processes, kept warm across computes.

    Args:
        workers: number of worker processes (default ``os.cpu_count()``).
        start_method: ``"zygote"`` (default on Linux while this process runs one
            thread: workers fork from a fork of it), ``"forkserver"`` (the
            default otherwise, and the opt-out: workers fork from a fresh
            interpreter), ``"spawn"`` or ``"fork"``; ``GRAPHEXEC_START_METHOD``
            sets the default. See docs/architecture.md, "Start methods".
        max_calls_per_worker: replace a worker after it has run this many calls
            (between calls; nobody is blamed), so that what tasks leave behind —
            environment variables, the working directory, module globals, memory a
            C extension leaks — does not build up. ``None`` (default): keep them.
        initializer: called as ``initializer(*initargs)`` once in every worker
            the pool starts (replacements too), before its first call, as in
            ``concurrent.futures.ProcessPoolExecutor``. If it raises, that worker
            ends and its calls go to another one; after
            ``INIT_ATTEMPTS`` (3) failures in a row the pool starts no more
            workers and each call that would need one fails with
            :class:`WorkerCrashed` whose ``__cause__`` is the initializer's error.
        initargs: arguments for ``initializer`` (pickled with cloudpickle).

    Example::

        with gx.Pool(workers=4) as pool:
            for params in sweeps:
                graph.compute(pool=pool)

    Workers start when there is work for them and stay until :meth:`close`.
    Inside ``with pool:``, ``task.submit()`` starts tasks on it at once.

    Raises:
        TypeError: ``initializer`` is not callable, or it or ``initargs`` cannot
            be pickled.
        ValueError: ``workers`` or ``max_calls_per_worker`` out of range.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        start_method: str | None = None,
        max_calls_per_worker: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
    ) -> None:
        count = check_workers(workers, "Pool")
        if count == 0:
            raise ValueError("Pool(workers=0) has no workers; use workers >= 1")
        max_calls = check_max_calls(max_calls_per_worker, "Pool")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"Pool: initializer= must be callable, got {initializer!r}")
        method = start_method or default_start_method()
        self._procs = ProcessPool(
            count,
            start_method=method,
            max_calls=max_calls,
            initializer=initializer,
            initargs=tuple(initargs),
        )
        self._session: Any = None  # the eager Session of `with pool:` submits, if any

    @property
    def workers(self) -> int:
        """The number of worker processes."""
        return self._procs.workers

    @property
    def max_calls_per_worker(self) -> int | None:
        """Calls a worker runs before it is replaced (None: no limit)."""
        return self._procs.max_calls

    @property
    def start_method(self) -> str:
        """How workers are started: ``zygote``, ``forkserver``, ``spawn`` or ``fork``."""
        return self._procs.start_method

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._procs.closed

    @property
    def id(self) -> int:
        """This pool's number in the process (names its workers' shared memory and guard)."""
        return self._procs.id

    @property
    def _workers(self) -> dict[int, Any]:
        """The live worker records (pid, process), for tests and diagnostics."""
        return self._procs._workers

    def _lease(self, memory_limit: int | None) -> Lease:
        """The executor for one run on these workers (closing it keeps them warm)."""
        return self._procs.lease(memory_limit, shutdown_on_close=False)

    def __enter__(self) -> Pool:
        push_context(self)  # task.submit() inside the block runs on this pool
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        pop_context(self)
        try:
            if exc_type is None:
                end_pool_session(self)  # waits; raises GraphFailed for unseen failures
            else:
                cancel_pool_session(self, "the `with gx.Pool()` block raised")
        finally:
            self.close()

    def close(self) -> None:
        """Stop every worker: ask, then kill stragglers; always join. Idempotent."""
        self._procs.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._procs._workers)} running"
        return f"<Pool workers={self.workers} {self.start_method} ({state})>"
