"""Fixtures shared by the whole suite.

* Hangs: every test is bounded by pytest-timeout (``timeout = 60`` in
  pyproject.toml, tighter per test with ``@pytest.mark.timeout``); on expiry
  pytest-timeout dumps the stack of every thread, and ``faulthandler`` is on
  for hard crashes of the test process itself.
* Leaks: :func:`no_leaked_processes` fails any test that leaves a child
  process of the test process alive (workers of the shared :func:`pool` aside).
* Schedulers: :func:`compute` runs a graph on the backend named by the
  ``scheduler`` fixture — ``"processes"`` (on the shared pool) and ``"sync"``
  by default, since behaviour must match; a test widens or narrows the set with
  ``@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)``.
* Programs: a test that needs Graphviz's ``dot`` calls :func:`need_dot` where
  it starts to; without ``dot`` it skips, unless ``GRAPHEXEC_REQUIRE_DOT`` is
  set (CI installs Graphviz and sets it, so that a broken install fails there).
  ``@pytest.mark.parametrize("scheduler", ...)``, or runs on all four backends
  (``sync``, ``threads``, ``processes`` and ``cluster``, a dask cluster) with
  ``@pytest.mark.every_backend``. :func:`backend` gives such a test the compute
  keywords of its backend and what that backend cannot do (:data:`CANNOT`).
* The dask cluster: one ``LocalCluster`` for the whole session, started by the
  first test that needs it and closed after the last one (:class:`_SharedCluster`);
  its worker processes are allowed to outlive a test, as the shared pool's are.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

import psutil
import pytest

import graphexec as gx

SCHEDULERS = ("processes", "sync")
ALL_SCHEDULERS = ("processes", "sync", "threads")
BACKENDS = ("sync", "threads", "processes", "cluster")

# Seconds an exiting worker gets to disappear before a test counts it as leaked.
LEAK_GRACE = 3.0

# Pools created by fixtures: their warm workers are meant to outlive a test.
_shared_pools: list[gx.Pool] = []


def pytest_configure(config: pytest.Config) -> None:
    if not faulthandler.is_enabled():
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
    config.addinivalue_line(
        "markers",
        "every_backend: run the test on sync, threads, processes and a dask cluster "
        "(the `scheduler` fixture); see CANNOT in conftest.py for what each cannot do",
    )


# -- leaked processes ----------------------------------------------------------


def running(pid: int) -> bool:
    """Whether process ``pid`` is still running (an unreaped zombie has ended).

    The one way the suite asks it: a process can end between any two psutil
    calls, so ``pid_exists(p) and Process(p).status()`` races.
    """
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, wait for it and close its pipes: the one end of
    a test's subprocess (a pipe left open is a ResourceWarning when it is collected,
    shown against whichever test runs then)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _is_multiprocessing_helper(proc: psutil.Process, me: int) -> bool:
    """multiprocessing's forkserver and resource tracker, and graphexec's zygote
    (a fork of this process named ``gx-zygote``), with the spares of either
    (``gx-spare``, workers forked ahead), live for the whole session.

    Only the direct children count, and the zygote's spares: processes the
    forkserver forks (our workers) carry the same command line and must not
    be ignored.
    """
    try:
        if is_spare(proc, me):
            return True
        if proc.ppid() != me:
            return False
        cmdline = " ".join(proc.cmdline())
        name = proc.name()
    except psutil.Error:
        return True  # already gone
    return "forkserver" in cmdline or "resource_tracker" in cmdline or name == "gx-zygote"


def is_spare(proc: psutil.Process, me: int | None = None) -> bool:
    """A spare (``gx-spare``) of graphexec's zygote or forkserver, a child of ``me``
    (default: this process); one already gone counts too."""
    me = os.getpid() if me is None else me
    try:
        if proc.name() != "gx-spare":
            return False
        parent = proc.parent()
        return parent is None or (
            parent.ppid() == me
            and (parent.name() == "gx-zygote" or "forkserver" in " ".join(parent.cmdline()))
        )
    except psutil.Error:
        return True


def _shared_pids() -> set[int]:
    # Private attribute: the pool has no public list of its worker pids.
    pids: set[int] = set()
    for pool in _shared_pools:
        if not pool.closed:
            pids.update(w.pid for w in list(pool._workers.values()))
    return pids | _CLUSTER.pids()


def _allowed(proc: psutil.Process, me: int, shared: set[int]) -> bool:
    if _is_multiprocessing_helper(proc, me):
        return True
    try:
        chain = [proc, *proc.parents()]
    except psutil.Error:
        return True
    return any(p.pid in shared for p in chain)


def _leaked() -> list[psutil.Process]:
    me = os.getpid()
    shared = _shared_pids()
    leaked = []
    for proc in psutil.Process(me).children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue  # exited; its parent has not reaped it yet
        except psutil.Error:
            continue
        if not _allowed(proc, me, shared):
            leaked.append(proc)
    return leaked


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def _fail_if_leaked(what: str) -> None:
    deadline = time.monotonic() + LEAK_GRACE
    leaked = _leaked()
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = _leaked()
    if leaked:
        report = "\n  ".join(_describe(p) for p in leaked)
        for proc in leaked:  # do not let one leak fail every following test
            try:
                proc.kill()
            except psutil.Error:
                pass
        pytest.fail(f"child processes survived {what}:\n  {report}", pytrace=False)


@pytest.fixture(autouse=True)
def no_leaked_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if a child process it started is still alive after it.

    After the last test that needs the dask cluster, the cluster is closed
    here, so that its processes are checked too and later tests run without it.
    """
    yield
    if request.node.nodeid == _CLUSTER.last_user:
        _CLUSTER.close()
        _fail_if_leaked("the dask cluster after its last test")
    _fail_if_leaked("the test")


# -- pools and schedulers ------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def workers_server() -> None:
    """The suite's workers fork from the zygote, as a plain script's do.

    Collecting the suite imports numpy, which would give every pool the
    forkserver (a program that imported numpy gets it by default); the
    zygote, asked for by name at the start, serves every later pool of the
    session instead, so the suite runs on the default of the scripts most
    users write. CI runs the process-pool files again with
    ``GRAPHEXEC_START_METHOD=forkserver``, numpy programs' and notebooks'
    default; ``tests/test_zygote.py`` checks the choice itself in fresh
    interpreters.
    """
    if sys.platform.startswith("linux") and not os.environ.get("GRAPHEXEC_START_METHOD"):
        with gx.Pool(workers=1, start_method="zygote"):
            pass


@pytest.fixture(scope="session")
def pool() -> Iterator[gx.Pool]:
    """A warm two-worker pool shared by the session; closed at the end."""
    shared = gx.Pool(workers=2)
    _shared_pools.append(shared)
    try:
        yield shared
    finally:
        shared.close()
        _shared_pools.remove(shared)


@pytest.fixture(params=SCHEDULERS)
def scheduler(request: pytest.FixtureRequest) -> str:
    """The backend a test runs on; override with ``parametrize("scheduler", ...)``."""
    return request.param


@pytest.hookimpl(tryfirst=True)  # before the `scheduler` fixture's own params apply
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("every_backend") is None:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if "scheduler" in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return  # the test names its own backends
    if "scheduler" in metafunc.fixturenames:
        metafunc.parametrize("scheduler", BACKENDS)


@pytest.fixture
def backend(scheduler: str, request: pytest.FixtureRequest) -> Backend:
    """The test's backend: its compute keywords and what it cannot do."""
    kwargs: dict[str, Any]
    if scheduler == "processes":
        kwargs = {"pool": request.getfixturevalue("pool")}
    elif scheduler == "cluster":
        kwargs = {"cluster": request.getfixturevalue("dask_client")}
    elif scheduler == "threads":
        kwargs = {"scheduler": "threads", "workers": 2}
    else:
        kwargs = {"scheduler": scheduler}
    return Backend(scheduler, kwargs)


@pytest.fixture
def compute(backend: Backend) -> Callable[..., gx.Run]:
    """``compute(graph, *targets, **kw)`` on the test's backend.

    ``"processes"`` uses the shared warm :func:`pool` unless ``workers=`` or
    ``pool=`` is given; ``"threads"`` uses two threads.
    """

    def run(graph: gx.Graph, *targets: Any, **kw: Any) -> gx.Run:
        return backend.compute(graph, *targets, **kw)

    run.scheduler = backend.name  # type: ignore[attr-defined]
    return run


# -- programs outside Python -----------------------------------------------------

DOT_MISSING = (
    "Graphviz's `dot` program is not installed (Debian: apt-get install graphviz); "
    "graph.visualize() needs it to draw .svg and .png"
)


def missing_program(why: str, require: str) -> NoReturn:
    """Skip the test, or fail it where the environment variable ``require`` is set."""
    if os.environ.get(require):  # CI installs the program: a skip there would hide a gap
        pytest.fail(f"{why} ({require} is set: this run must not skip)")
    pytest.skip(why)


@pytest.fixture
def need_dot() -> Callable[[], str]:
    """Call it where the test starts needing ``dot``: its path, or skip or fail as above.

    A callable rather than a plain fixture, so that a test can check what it can
    without ``dot`` first (the report of an example, say) and skip only the rest.
    """

    def find() -> str:
        path = shutil.which("dot")
        if path is None:
            missing_program(DOT_MISSING, "GRAPHEXEC_REQUIRE_DOT")
        return path

    return find


# -- what each backend cannot do -----------------------------------------------


class Limit(NamedTuple):
    """Something a backend cannot do: why, and what happens instead.

    ``runnable=False``: running the case would take the test process down
    with it, so the suite skips it with ``reason``; every other limit is run
    and its test asserts ``instead``.
    """

    reason: str
    instead: str
    runnable: bool = True


# The one list of what each backend cannot do. docs/backends.md is written
# from it (keep the two in step: test_faults.py checks that they list the same
# cases), and each test of the policy and fault tables that meets one of these
# asserts ``instead`` rather than the processes backend's behaviour.
#   kill          stop a running call (timeout=, fail_fast)
#   crash         survive a task that kills its process (os._exit, a signal, a segfault)
#   crash-detail  say how a crashed worker died (exit code, signal)
#   memory_limit  measure and enforce compute(memory_limit=...)
#   pickle        fail a node whose argument, result or exception cannot cross a
#                 process boundary (SerializationError, RemoteError)
_IN_PROCESS_CRASH = Limit(
    reason="the task runs inside this process: os._exit, a fatal signal or a segfault ends "
    "the whole program",
    instead="the whole program dies with the task (the test suite skips these cases)",
    runnable=False,
)
_IN_PROCESS_MEMORY = Limit(
    reason="there is no worker process to measure and kill",
    instead="compute(memory_limit=...) raises ValueError (needs worker processes)",
)
_IN_PROCESS_PICKLE = Limit(
    reason="values never leave the process, so nothing is pickled",
    instead="an argument, result or exception that cannot be pickled is passed as it is: "
    "the node completes, or fails with its own exception, never with SerializationError "
    "or RemoteError",
)
CANNOT: dict[tuple[str, str], Limit] = {
    ("sync", "kill"): Limit(
        reason="the call runs in the calling thread, which nothing can interrupt safely",
        instead="a timeout is judged when the call returns: the node fails with TaskTimeout "
        "after the whole call, its result dropped; fail_fast never meets a running sibling "
        "(one call at a time)",
    ),
    ("sync", "crash"): _IN_PROCESS_CRASH,
    ("sync", "memory_limit"): _IN_PROCESS_MEMORY,
    ("sync", "pickle"): _IN_PROCESS_PICKLE,
    ("threads", "kill"): Limit(
        reason="a Python thread cannot be killed",
        instead="at its deadline the node fails with TaskTimeout (fail_fast: Cancelled) and "
        "the thread is abandoned: the call runs on until it returns, its result dropped, "
        "keeping its thread and its concurrency slots until then",
    ),
    ("threads", "crash"): _IN_PROCESS_CRASH,
    ("threads", "memory_limit"): _IN_PROCESS_MEMORY,
    ("threads", "pickle"): _IN_PROCESS_PICKLE,
    ("cluster", "kill"): Limit(
        reason="dask runs a task in a worker thread and cannot stop it",
        instead="at its deadline the node fails with TaskTimeout (fail_fast: Cancelled) and "
        "its future is cancelled; the task runs on in its worker, holding that thread, "
        "until it returns, its result dropped",
    ),
    ("cluster", "crash-detail"): Limit(
        reason="dask does not say how a worker process died",
        instead="the node fails with WorkerCrashed whose exitcode and signal_name are None; "
        "a task that kills its worker at once may be run again by dask on other workers "
        "(up to distributed.scheduler.allowed-failures + 1 of them die) before it fails",
    ),
    ("cluster", "memory_limit"): Limit(
        reason="each dask worker has its own memory limit (dask worker --memory-limit, "
        "LocalCluster(memory_limit=...))",
        instead="compute(cluster=..., memory_limit=...) raises ValueError; a worker over its "
        "own limit is restarted by its nanny and its node fails with WorkerCrashed",
    ),
}


@dataclass(frozen=True)
class Backend:
    """One backend of :data:`BACKENDS`, as a test sees it."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def limits(self) -> dict[str, Limit]:
        """Everything this backend cannot do, by the names of :data:`CANNOT`."""
        return {what: limit for (name, what), limit in CANNOT.items() if name == self.name}

    def cannot(self, what: str) -> Limit | None:
        """The limit of this backend for ``what`` (see :data:`CANNOT`), or None if it can."""
        return CANNOT.get((self.name, what))

    def require(self, what: str) -> None:
        """Skip the test, with the table's reason, if running it would kill the test process."""
        limit = self.cannot(what)
        if limit is not None and not limit.runnable:
            pytest.skip(f"{self.name} cannot {what}: {limit.reason}; {limit.instead}")

    def compute(self, graph: gx.Graph, *targets: Any, **kw: Any) -> gx.Run:
        """``graph.compute`` here; for processes, ``workers=``/``pool=`` replace the shared pool."""
        options = dict(self.kwargs)
        if self.name == "processes" and ("workers" in kw or "pool" in kw):
            del options["pool"]
        return graph.compute(*targets, **{**options, **kw})

    def settle(self) -> None:
        """Wait until the backend is whole again (a crashed dask worker replaced)."""
        if self.name == "cluster":
            self.kwargs["cluster"].wait_for_workers(_CLUSTER.workers, timeout=30)


# -- the dask cluster ----------------------------------------------------------


class _SharedCluster:
    """One ``LocalCluster`` for the session, started by the first test that needs it.

    It is closed after the last test that needs it (``last_user``, found once
    the tests are collected) rather than at the end of the session: later
    tests run without its processes and threads, and the leak check sees
    whether closing it left anything behind.
    """

    workers = 2

    def __init__(self) -> None:
        self.cluster: Any = None
        self.client: Any = None
        self.last_user: str | None = None

    def start(self) -> Any:
        distributed = pytest.importorskip("distributed")
        if self.client is None:
            # A crashed worker's nanny restarts it, but dask's SpecCluster also
            # closes a nanny for good when no worker of its name is registered
            # lost-worker-timeout (15 s) after an earlier death of that name. The
            # crash tests kill both workers every few seconds (dask re-runs the
            # crasher before graphexec's cancel lands), so a restart could fall on
            # that instant and leave the session with no workers: every later
            # cluster test then timed out.
            pytest.importorskip("dask").config.set({"distributed.deploy.lost-worker-timeout": "1h"})
            # What test_cluster.py has always used: one thread per worker, so a
            # test can tell which task holds a worker; dashboard_address=":0":
            # no fixed port to collide with another cluster.
            self.cluster = distributed.LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
            )
            self.client = distributed.Client(self.cluster)
        return self.client

    def pids(self) -> set[int]:
        """Its worker processes; a nanny knows its worker's pid before dask does."""
        if self.cluster is None:
            return set()
        return {n.pid for n in list(self.cluster.workers.values()) if n.pid is not None}

    def close(self) -> None:
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        if client is not None:
            client.close()
            cluster.close()


_CLUSTER = _SharedCluster()


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if "dask_client" in getattr(item, "fixturenames", ()) or (
            callspec is not None and callspec.params.get("scheduler") == "cluster"
        ):
            _CLUSTER.last_user = item.nodeid


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Any]:
    """A ``distributed.Client`` of the session's ``LocalCluster`` (two one-thread workers)."""
    yield _CLUSTER.start()
    _CLUSTER.close()  # already closed after its last test, unless the session stopped early
