"""How many threads the native libraries inside a worker may start (BLAS, OpenMP, numexpr).

numpy's BLAS (OpenBLAS, MKL, BLIS), OpenMP code and numexpr start one
thread per core in every process that uses them: N workers on N cores would
run N x N threads fighting for N cores, and a matrix product in each worker
gets slower than in one process alone. So, as joblib/loky do, each worker is
limited by default to ``cores // workers`` threads (at least 1); ``Pool`` and
``compute`` take ``inner_threads=`` (joblib's ``inner_max_num_threads``) to
choose another count, and a task option of the same name limits one task's
calls.

Two levers, because a library reads its variable once, when it loads:

- the ``THREAD_VARS`` family is set in the worker's environment before
  anything else runs there (the pool's initializer, the first call), which
  reaches every library loaded afterwards, and the subprocesses tasks start;
- a library already loaded in the worker — numpy, which graphexec's
  forkserver preloads when the parent has imported it, or what a ``fork``
  start copied — is told through its own API by ``threadpoolctl``.

A variable the user set in the parent's environment is passed on as it is,
unless ``inner_threads=`` was given explicitly (the explicit argument wins,
as in joblib). ``threadpoolctl`` is imported only in workers (and in a program
that asks for the zygote by name while it runs threads:
:func:`threads_shut_at_fork`), and only when a library it knows may be
loaded, so ``import graphexec`` never pays for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from .machine import usable_cores

# joblib's list (joblib/_parallel_backends.py, MAX_NUM_THREADS_VARS).
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

# Modules whose import loads a thread pool threadpoolctl can limit: if none is
# loaded in a starting worker, the environment alone does the job.
POOL_MODULES = frozenset({"numpy", "scipy", "torch", "numexpr", "sklearn", "mkl", "numba"})

# What the forkserver imports once when numpy is preloaded, so that no worker
# pays for importing it (about 25 ms) when it limits numpy's BLAS.
PRELOAD = "threadpoolctl"

# threadpoolctl's names for the libraries each variable governs.
_LIBRARY_VAR = {
    "openblas": "OPENBLAS_NUM_THREADS",
    "mkl": "MKL_NUM_THREADS",
    "blis": "BLIS_NUM_THREADS",
    "openmp": "OMP_NUM_THREADS",
}


def automatic(workers: int) -> int:
    """The default thread count per worker: ``cores // workers``, at least 1."""
    return max(usable_cores() // max(workers, 1), 1)


def worker_environment(inner_threads: int | None, workers: int) -> dict[str, str]:
    """The variables a pool's workers start with.

    ``inner_threads`` given: that count for every variable. ``None``: the
    automatic count, except for the variables set in this process's
    environment, which go to the workers unchanged (the forkserver that forks
    workers may have started before the user set them).
    """
    if inner_threads is not None:
        return dict.fromkeys(THREAD_VARS, str(inner_threads))
    default = str(automatic(workers))
    return {var: os.environ.get(var, default) for var in THREAD_VARS}


# The libraries found loaded in the zygote that forked this worker (see
# prepare_server); None: not probed there, so each worker probes its own.
_probed: Any = None


def prepare_server() -> None:
    """In the zygote or graphexec's forkserver, before it serves: find the loaded
    libraries whose threads workers limit, once for all the workers it forks.

    ``threadpoolctl.ThreadpoolController()`` walks every shared library the
    process has loaded: 3-5 ms in a program that imported numpy and a few big
    packages, paid by each starting worker, all at once, while the first calls
    wait. Probed here, a worker (a fork of this process, with exactly these
    libraries loaded when it starts) only sets the counts. Nothing is probed
    when no library threadpoolctl knows may be loaded.
    """
    global _probed
    if POOL_MODULES.isdisjoint(sys.modules):
        return
    try:
        import threadpoolctl
    except ImportError:
        return
    try:
        _probed = threadpoolctl.ThreadpoolController()
    except Exception:  # (a library it failed to read) each worker probes its own, as before
        _probed = None


def apply_in_worker(env: dict[str, str]) -> None:
    """Set ``env`` in this (worker) process and limit the libraries already loaded."""
    global _probed
    os.environ.update(env)
    if POOL_MODULES.isdisjoint(sys.modules):
        return
    # Used once: a process forked from this worker later (a task's own pool) has
    # loaded other libraries since, and probes its own.
    controller, _probed = _probed, None
    if controller is None:
        try:
            import threadpoolctl
        except ImportError:  # installed without its dependencies: the environment alone
            return
        controller = threadpoolctl.ThreadpoolController()
    for library, var in _LIBRARY_VAR.items():
        try:
            count = int(env.get(var, ""))
        except ValueError:  # unset, or a value the user set that is not a count
            continue
        selected = controller.select(internal_api=library)
        if selected.lib_controllers:
            selected.limit(limits=count)
            if library == "openblas" and count == 1 and os.name == "posix":
                _stop_openblas_threads(selected.lib_controllers)


# OpenBLAS's own fork handler (``pthread_atfork``), exported by its builds:
# joins the pool's threads; its next threaded call starts them again.
_OPENBLAS_SHUTDOWN = ("blas_thread_shutdown_", "scipy_blas_thread_shutdown_")


def _stop_openblas_threads(libraries: list[Any]) -> None:
    """Stop the pool threads that limiting OpenBLAS just started in this worker.

    A forked worker starts with OpenBLAS's pool stopped (its fork handler
    joined the threads in the server). ``openblas_set_num_threads`` restarts
    the pool first, whatever the count, and each new thread then spins
    looking for work for about 0.1 s of CPU before it sleeps: on two cores,
    two starting workers took that much from the parent and from each other
    (a cold 500-call chain 33 ms instead of 23 in a program that imported
    numpy). Only for a count of 1, the default with as many workers as
    cores: no call then uses the pool, so it never starts again. With more,
    the threads are kept (their first products would start the pool anyway,
    through a path some OpenBLAS releases got wrong after a fork). Builds
    without the symbol keep their threads.
    """
    for lib in libraries:
        if getattr(lib, "threading_layer", None) != "pthreads":
            continue  # OpenMP's threads are the OpenMP runtime's, not OpenBLAS's
        dynlib = getattr(lib, "dynlib", None)  # (threadpoolctl's handle of the library)
        if dynlib is None:
            continue
        for name in _OPENBLAS_SHUTDOWN:
            shutdown = getattr(dynlib, name, None)
            if shutdown is not None:
                shutdown()
                break


def threads_shut_at_fork() -> int:
    """How many of this process's threads are BLAS threads that stop themselves at ``fork``.

    OpenBLAS built on pthreads (numpy's and scipy's wheels) starts its pool
    when it loads (one thread per core beyond the first) and registers a
    ``pthread_atfork`` handler that joins those threads before every fork and
    starts them again at the next BLAS call: a fork of a program whose only
    other threads are these is as safe as a fork of a one-thread program, and
    it is what every ``multiprocessing`` user of numpy did under the ``fork``
    start method. Other pools (MKL, OpenMP, BLIS) make no such promise and
    count as foreign threads. 0 when no library that threadpoolctl knows is
    loaded (threadpoolctl is imported only then).
    """
    if POOL_MODULES.isdisjoint(sys.modules):
        return 0
    try:
        import threadpoolctl
    except ImportError:
        return 0
    count = 0
    for info in threadpoolctl.threadpool_info():
        if info.get("internal_api") == "openblas" and info.get("threading_layer") == "pthreads":
            count += max(int(info.get("num_threads") or 1) - 1, 0)
    return count


@contextlib.contextmanager
def limited(threads: int) -> Iterator[None]:
    """Limit the thread pools of the libraries loaded in this process to ``threads``,
    then put back the counts it changed.

    A library already at ``threads`` is left alone (``threadpool_limits`` sets
    every one). Setting OpenBLAS's count restarts its pool when the pool is
    stopped, as it is in a worker that starts at one thread (see
    :func:`_stop_openblas_threads`), and each new thread spins for about 0.1 s
    of CPU: ``inner_threads=1`` on the tasks of a default pool (one thread a
    worker when there are as many workers as cores) cost each worker that,
    and a thread kept for nothing; now it changes nothing there.
    """
    try:
        import threadpoolctl
    except ImportError:
        raise ImportError(
            "the task option inner_threads= needs threadpoolctl (a dependency of "
            "graphexec): pip install threadpoolctl"
        ) from None
    controller = threadpoolctl.ThreadpoolController()
    differ = [lib.filepath for lib in controller.lib_controllers if lib.num_threads != threads]
    if not differ:
        yield
        return
    # threadpoolctl's own limiter, not set_num_threads: it also lets go of OpenBLAS's
    # control by this thread when it restores (threadpoolctl lets one thread at a
    # time set OpenBLAS's count; with scheduler="threads" others would set nothing).
    with controller.select(filepath=differ).limit(limits=threads):
        yield


class ThreadLimited:
    """A task's function whose calls run with at most ``threads`` library threads.

    The scheduler makes one per task and count (the task option
    ``inner_threads=``); it travels to the worker in place of the function.
    The limit acts on libraries loaded when the call starts (threadpoolctl),
    for the call's duration, in the whole process: with ``scheduler="threads"``
    or on a dask worker's threads, concurrent calls share it.
    """

    __slots__ = ("fn", "threads")

    def __init__(self, fn: Any, threads: int) -> None:
        self.fn = fn
        self.threads = threads

    @property
    def __code__(self) -> Any:
        # Where the function comes from: a worker puts its directory on sys.path.
        return getattr(self.fn, "__code__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with limited(self.threads):
            return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ThreadLimited, (self.fn, self.threads))
