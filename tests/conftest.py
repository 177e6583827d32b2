"""Fixtures shared by the whole suite.

* Hangs: every test is bounded by pytest-timeout (``timeout = 60`` in
  pyproject.toml, tighter per test with ``@pytest.mark.timeout``); on expiry
  pytest-timeout dumps the stack of every thread, and ``faulthandler`` is on
  for hard crashes of the test process itself.
* Leaks: :func:`no_leaked_processes` fails any test that leaves a child
  process of the test process alive (workers of the shared :func:`pool` aside).
* Schedulers: :func:`compute` runs a graph on the scheduler named by the
  ``scheduler`` fixture — ``"processes"`` (on the shared pool) and ``"sync"``
  by default, since behaviour must match; a test widens or narrows the set with
  ``@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)``.
* Programs: a test that needs Graphviz's ``dot`` calls :func:`need_dot` where
  it starts to; without ``dot`` it skips, unless ``GRAPHEXEC_REQUIRE_DOT`` is
  set (CI installs Graphviz and sets it, so that a broken install fails there).
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import psutil
import pytest

import graphexec as gx

SCHEDULERS = ("processes", "sync")
ALL_SCHEDULERS = ("processes", "sync", "threads")

# Seconds an exiting worker gets to disappear before a test counts it as leaked.
LEAK_GRACE = 3.0

# Pools created by fixtures: their warm workers are meant to outlive a test.
_shared_pools: list[gx.Pool] = []


def pytest_configure(config: pytest.Config) -> None:
    if not faulthandler.is_enabled():
        faulthandler.enable(file=sys.__stderr__, all_threads=True)


# -- leaked processes ----------------------------------------------------------


def _is_multiprocessing_helper(proc: psutil.Process, me: int) -> bool:
    """multiprocessing's forkserver and resource tracker live for the whole session.

    Only the direct children count: processes the forkserver forks (our
    workers) carry the same command line and must not be ignored.
    """
    try:
        if proc.ppid() != me:
            return False
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return True  # already gone
    return "forkserver" in cmdline or "resource_tracker" in cmdline


def _shared_pids() -> set[int]:
    # Private attribute: the pool has no public list of its worker pids.
    pids: set[int] = set()
    for pool in _shared_pools:
        if not pool.closed:
            pids.update(w.pid for w in list(pool._workers.values()))
    return pids


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


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail the test if a child process it started is still alive after it."""
    yield
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
        pytest.fail(f"child processes survived the test:\n  {report}", pytrace=False)


# -- pools and schedulers ------------------------------------------------------


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
    """The scheduler a test runs on; override with ``parametrize("scheduler", ...)``."""
    return request.param


@pytest.fixture
def compute(scheduler: str, request: pytest.FixtureRequest) -> Callable[..., gx.Run]:
    """``compute(graph, *targets, **kw)`` on the test's scheduler.

    ``"processes"`` uses the shared warm :func:`pool` unless ``workers=`` or
    ``pool=`` is given; ``"threads"`` uses two threads.
    """

    def run(graph: gx.Graph, *targets: Any, **kw: Any) -> gx.Run:
        if scheduler == "processes":
            if "workers" not in kw and "pool" not in kw:
                kw["pool"] = request.getfixturevalue("pool")
        else:
            kw.setdefault("scheduler", scheduler)
            if scheduler == "threads":
                kw.setdefault("workers", 2)
        return graph.compute(*targets, **kw)

    run.scheduler = scheduler  # type: ignore[attr-defined]
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
