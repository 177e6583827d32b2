"""The public, warm pool: ``with gx.Pool(workers=4) as pool: graph.compute(pool=pool)``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from .._executors.process import ProcessPool, default_start_method
from .._executors.shared import RunLease, SharedPool
from .._model.options import check_inner_threads
from .eager import PoolBlock, cancel_pool_session, end_pool_session, pop_context, push_context
from .options import check_max_calls, check_workers, parse_memory
from .signals import deferred_in_critical_sections


class Pool:
    """A pool of worker processes, kept warm across computes.

    Args:
        workers: number of worker processes (default: the cores this process may
            use, its CPU affinity and its cgroup's CPU quota, not the whole machine's).
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
            ``concurrent.futures.ProcessPoolExecutor``. If it raises, or ends its
            process (``os._exit``, a crash in a C extension), that worker ends
            and its calls go to another one; after ``INIT_ATTEMPTS`` (3)
            failures in a row the pool starts no more workers and each call
            that would need one fails with :class:`WorkerCrashed` whose
            ``__cause__`` is the initializer's error (a ``WorkerCrashed`` with
            the exit code for a process it ended).
        initargs: arguments for ``initializer`` (pickled with cloudpickle).
        inner_threads: threads that BLAS (OpenBLAS, MKL, BLIS), OpenMP and numexpr
            may start in each worker, as joblib's ``inner_max_num_threads``.
            ``None`` (default): ``cores // workers``, at least 1, so that workers x
            threads fit the cores; a variable such as ``OMP_NUM_THREADS`` or
            ``OPENBLAS_NUM_THREADS`` set in this process's environment when the
            pool is made is passed on unchanged. A count applies to all of them.
            A task's option ``inner_threads=`` overrides it for that task's calls.
            See docs/guide/threads.md.
        memory_limit: the RSS a worker may reach while it runs a call of a
            compute on this pool (bytes, or ``"2GB"``); over it the worker is
            killed and that one call fails with :class:`MemoryLimitExceeded`.
            A compute's own ``memory_limit=`` applies to its calls instead.

    One pool serves any number of threads at once: ``compute(pool=pool)``,
    ``@gx.flow(pool=pool)`` and ``with pool:`` submits, concurrently. Each
    run keeps its own states, ``fail_fast``, cancellation and values; the
    workers take calls from the runs that have work ready in turn
    (round-robin), so no run waits for another's whole graph. ``with pool:``
    may be entered by several threads (each block has its own submits, and is
    left by the thread that entered it); the pool closes when the last block
    ends, or at :meth:`close`.

    Example::

        with gx.Pool(workers=4) as pool:
            for params in sweeps:
                graph.compute(pool=pool)

    Workers start when there is work for them and stay until :meth:`close`.
    Inside ``with pool:``, ``task.submit()`` starts tasks on it at once.

    Raises:
        TypeError: ``initializer`` is not callable, or it or ``initargs`` cannot
            be pickled.
        ValueError: ``workers``, ``max_calls_per_worker`` or ``inner_threads`` out
            of range.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        start_method: str | None = None,
        max_calls_per_worker: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        inner_threads: int | None = None,
        memory_limit: int | str | None = None,
    ) -> None:
        count = check_workers(workers, "Pool")
        if count == 0:
            raise ValueError("Pool(workers=0) has no workers; use workers >= 1")
        max_calls = check_max_calls(max_calls_per_worker, "Pool")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"Pool: initializer= must be callable, got {initializer!r}")
        threads = check_inner_threads(inner_threads, "inner_threads", "Pool")
        self._memory_limit = parse_memory(memory_limit)
        method = start_method or default_start_method(self._memory_limit is not None)
        self._procs = ProcessPool(
            count,
            start_method=method,
            max_calls=max_calls,
            initializer=initializer,
            initargs=tuple(initargs),
            inner_threads=threads,
        )
        self._shared = SharedPool(self._procs)  # every run on it; their threads drive it in turn
        self._blocks_lock = threading.Lock()
        self._blocks = 0  # `with pool:` blocks open, in any thread: the last one closes
        self._local = threading.local()  # this thread's open blocks (PoolBlock), innermost last

    @property
    def workers(self) -> int:
        """The number of worker processes."""
        return self._procs.workers

    @property
    def max_calls_per_worker(self) -> int | None:
        """Calls a worker runs before it is replaced (None: no limit)."""
        return self._procs.max_calls

    @property
    def inner_threads(self) -> int:
        """Threads each worker's BLAS/OpenMP libraries may start (given, or cores // workers).

        Variables the environment set when the pool was made win over the
        automatic count (see the ``inner_threads`` argument).
        """
        return self._procs.inner_threads

    @property
    def memory_limit(self) -> int | None:
        """The RSS (bytes) a worker may reach running a call of a compute without its own."""
        return self._memory_limit

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

    def _lease(self, memory_limit: int | None) -> RunLease:
        """The executor for one run on these workers (closing it keeps them warm).

        Any number may be open at once, from any threads (``_executors/shared.py``).
        """
        limit = memory_limit if memory_limit is not None else self._memory_limit
        return self._shared.lease(limit)

    def __enter__(self) -> Pool:
        with self._blocks_lock:
            if self.closed:
                raise RuntimeError("this Pool is closed; create a new one")
            self._blocks += 1
        block = PoolBlock(self)
        stack = getattr(self._local, "blocks", None)
        if stack is None:
            stack = self._local.blocks = []
        stack.append(block)
        push_context(block)  # task.submit() inside the block runs on this pool
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        stack = getattr(self._local, "blocks", None)
        if not stack:
            # Each block belongs to the thread that entered it (its submits, its
            # session): which of several threads' blocks another thread means is
            # not defined. Nothing is changed: the entering thread can still exit.
            raise RuntimeError(
                f"`with pool:` exited in thread {threading.current_thread().name!r}, which "
                "did not enter it: exit each `with pool:` block in the thread that entered "
                "it (to share the pool with other threads, pass pool=pool to their "
                "computes and flows, or let them enter their own `with pool:` blocks)"
            )
        block = stack.pop()
        pop_context(block)
        try:
            if exc_type is None:
                end_pool_session(block)  # waits; raises GraphFailed for unseen failures
            else:
                cancel_pool_session(
                    block,
                    "the `with gx.Pool()` block raised",
                    everything=isinstance(exc_type, type)
                    and issubclass(exc_type, KeyboardInterrupt),
                )
        finally:
            with self._blocks_lock:
                self._blocks -= 1
                last = self._blocks == 0
            if last:
                self.close()

    def close(self) -> None:
        """Stop every worker: ask, then kill stragglers; always join. Idempotent.

        Runs still going on the pool in other threads end: each call they
        were waiting for fails with :class:`WorkerCrashed` saying the pool closed.
        """
        # (Ctrl-C while this thread drives the pool for other runs waits for
        # the end of the critical section: signals.py)
        with deferred_in_critical_sections():
            self._shared.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._procs._workers)} running"
        return f"<Pool workers={self.workers} {self.start_method} ({state})>"
