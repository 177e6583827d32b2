"""graphexec's pytest plugin: a warm pool for the session, and in-process computes for debugging.

Installed with graphexec (the ``pytest11`` entry point ``graphexec_pytest``),
so every pytest session loads it; it does nothing until a test asks for one of
its fixtures:

* ``graphexec_pool`` — one warm :class:`graphexec.Pool` for the whole session
  (``--graphexec-workers N``, default 2), closed when the session ends. Pass
  it as ``graph.compute(pool=graphexec_pool)``: rounds of a benchmark then
  measure the graph, not process start-up.
* ``graphexec_sync`` — while the test runs, every ``Graph.compute()`` and
  every ``@gx.flow`` call runs on the ``"sync"`` scheduler, in the test's own
  process (a graph's tasks in the test's thread), so that ``pdb``,
  breakpoints and coverage see the tasks.
  ``@pytest.mark.usefixtures("graphexec_sync")`` applies it to a whole module
  or class. Under ``--pdb``, a test that fails with ``GraphFailed`` from such
  a compute is debugged where the task raised, not where ``compute()``
  re-raised it.

This module lives outside the ``graphexec`` package on purpose: importing
``graphexec.anything`` runs ``graphexec/__init__.py``, which imports the
whole library, and a session that never uses these fixtures must not pay
for that. graphexec is imported inside the fixtures, when a test asks.
Disable the plugin with ``-p no:graphexec_pytest``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import graphexec as gx

DEFAULT_WORKERS = 2

# Options that choose *where* tasks run, and the settings of the worker processes
# they would run in; graphexec_sync replaces them with scheduler="sync". Every
# other option (retries, timeouts, caching, limits, fail_fast, ...) keeps its
# meaning; memory_limit= is refused on "sync", as graphexec refuses it there,
# rather than silently dropped.
_WHERE = (
    "workers",
    "pool",
    "cluster",
    "start_method",
    "scheduler",
    "max_calls_per_worker",
    "inner_threads",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--graphexec-workers`` (the size of the ``graphexec_pool`` fixture's pool)."""
    group = parser.getgroup("graphexec")
    group.addoption(
        "--graphexec-workers",
        type=_workers,
        default=DEFAULT_WORKERS,
        metavar="N",
        help=f"worker processes of the graphexec_pool fixture (default {DEFAULT_WORKERS})",
    )


def _workers(text: str) -> int:
    """``--graphexec-workers``'s value, refused when the command line is read (not
    as an error of every test that asks for the pool)."""
    try:
        workers = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if workers < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {workers}")
    return workers


@pytest.fixture(scope="session")
def graphexec_pool(pytestconfig: pytest.Config) -> Iterator[gx.Pool]:
    """One warm ``gx.Pool`` for the session, closed when the session ends.

    Its size is ``--graphexec-workers`` (default 2). Every worker is started
    before the first test gets the pool, so no test pays for start-up. Use it
    as ``graph.compute(pool=graphexec_pool)``; do not close it, and do not
    enter it with ``with`` (leaving the block would close it for the tests
    that follow).

    Yields:
        The session's pool.
    """
    import graphexec as gx  # deferred: sessions that do not ask pay nothing

    workers = pytestconfig.getoption("graphexec_workers")
    pool = gx.Pool(workers=workers)
    try:
        _warm(gx, pool)
        yield pool
    finally:
        pool.close()


def _warm(gx: Any, pool: gx.Pool) -> None:
    # Workers start lazily, one per ready node: as many sleeps as workers,
    # each long enough that no worker finishes before the last has started.
    graph = gx.Graph()
    for _ in range(pool.workers):
        graph.add(time.sleep, 0.05)
    graph.compute(pool=pool, progress=False)


@pytest.fixture
def graphexec_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run this test's computes in-process (``scheduler="sync"``), for debugging.

    While the test runs, ``Graph.compute()`` and ``@gx.flow`` calls ignore the
    options that choose where tasks run (``workers``, ``pool``, ``cluster``,
    ``start_method``, ``scheduler``) and run every task in the test's own
    process, one at a time, so ``pdb``, breakpoints, coverage and ``caplog``
    see the tasks: a graph's tasks in the test's thread, a flow's on the
    thread that runs the flow's scheduler. Everything else (retries, triggers, caching, limits,
    timeouts judged when a call returns) behaves as on ``scheduler="sync"``.
    Tasks submitted inside ``with gx.Pool():`` still run on that pool.
    """
    import graphexec as gx  # deferred: sessions that do not ask pay nothing

    compute = gx.Graph.compute
    call_flow = gx.Flow.__call__

    def compute_in_process(self: gx.Graph, *targets: Any, **options: Any) -> gx.Run:
        return compute(self, *targets, **_in_process(options))

    def flow_in_process(self: gx.Flow, *args: Any, **kwargs: Any) -> Any:
        return call_flow(self._with_run_options(_in_process(self.options)), *args, **kwargs)

    monkeypatch.setattr(gx.Graph, "compute", compute_in_process)
    monkeypatch.setattr(gx.Flow, "__call__", flow_in_process)


@pytest.hookimpl(tryfirst=True)
def pytest_exception_interact(node: Any, call: pytest.CallInfo[Any], report: Any) -> None:
    """Under ``--pdb``, debug a ``GraphFailed`` where its first failed task raised.

    A compute that ran in this process (``graphexec_sync``, ``scheduler="sync"``)
    raises ``GraphFailed`` from the task's own exception, whose traceback still
    holds the task's frames: pdb would stop in ``compute()``'s re-raise, where
    none of the task's variables can be read. This runs before pytest's pdb
    plugin and hands it the task's exception instead. A failure on a worker
    process has no frames here (its traceback is text): left alone.
    """
    gx = sys.modules.get("graphexec")
    excinfo = call.excinfo
    if gx is None or excinfo is None or not node.config.getoption("usepdb", False):
        return
    failure = excinfo.value
    if isinstance(failure, gx.GraphFailed):
        cause = failure.__cause__
        if cause is not None and cause.__traceback__ is not None:
            call.excinfo = pytest.ExceptionInfo.from_exception(cause)


def _in_process(options: dict[str, Any]) -> dict[str, Any]:
    kept = {name: value for name, value in options.items() if name not in _WHERE}
    kept["scheduler"] = "sync"
    return kept
