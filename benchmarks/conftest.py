"""Shared fixtures: the pools every benchmark reuses, and the ``measure`` helper.

Pools are created outside every timed region, once per session (the
distributed cluster once per module), warmed (all workers started, the
workload module imported) and closed at the end:

* ``gx_pool``  — the ``graphexec_pool`` fixture of graphexec's pytest plugin
  (``graphexec_pytest``: a warm ``gx.Pool`` of ``--graphexec-workers``, default
  2, for the session), its workers importing the workload module, for
  graphexec's *warm* numbers (its *cold* numbers call
  ``graph.compute(workers=2)``, start-up included);
* ``ppe``      — ``concurrent.futures.ProcessPoolExecutor(max_workers=2)``;
* ``loky_ex``  — ``loky.ProcessPoolExecutor(max_workers=2)`` (skipped if loky
  is not installed);
* ``client``   — a ``dask.distributed`` ``LocalCluster(n_workers=2,
  threads_per_worker=1, processes=True)`` and its ``Client`` (skipped if
  distributed is not installed); one per module, and its tests run last in
  the module, so that its scheduler thread in this process and its worker
  and nanny processes never run beside another tool's benchmark.

* ``ray_session`` — ``ray.init(num_cpus=2)`` before each Ray benchmark (not
  timed) and ``ray.shutdown()`` after it, so that Ray's own processes (its
  GCS, raylet and workers) never run beside another tool's benchmark; skipped
  if Ray cannot be installed or started (the JSON's ``machine_info["ray"]``
  says which, and the report's Ray column says so).

dask's processes scheduler has no pool to keep: it starts one per compute,
so its start-up is inside its times.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psutil
import pytest

import graphexec as gx
from graphexec._executors import zygote as gx_zygote

from . import workloads as w

# Installed graphexec loads its plugin by entry point; naming it here too
# keeps the benchmarks working from a checkout whose metadata predates it
# (the same module either way, registered once).
pytest_plugins = ["graphexec_pytest"]

# Rounds per benchmark: the median of these is what the report shows.
ROUNDS_LIGHT = 5  # W1: a second or less (dask.distributed: 11 s)
ROUNDS_QUICK = 11  # W2, W5: a tenth of a second, noisy (dask.distributed: 2-3 s)
ROUNDS_HEAVY = 3  # W3, W4, W6: seconds each
# Seconds per benchmark test (pyproject's 60 s is for the unit tests).
TIMEOUT = 900


def _warm_executor(executor: Any) -> None:
    # Enough calls that every worker starts and imports the workload module.
    assert list(executor.map(w.noop, range(8))) == list(range(8))


@pytest.fixture(scope="session", autouse=True)
def graphexec_zygote() -> str:
    """graphexec's zygote, asked for by name before any other tool's pool starts.

    A plain script that uses graphexec gets the zygote, a fork of itself, as
    its workers' server (docs/architecture.md, "Start methods"). This session
    also runs ProcessPoolExecutor, loky, dask and Ray, whose threads would
    rule it out if they ran first, and it has numpy loaded, whose OpenBLAS
    threads rule it out by default (a numpy program gets the forkserver
    unless it asks: ``start_method="zygote"`` forks past them, as here). So
    "graphexec cold" is what a script of tiny pure-Python tasks (W1, W2, W5)
    gets, and ``graphexec-cold-forkserver`` what a numpy program or a
    notebook gets (W4, W7). Either server starts once per process, so
    neither column includes it (the start-up table does): every cold compute
    starts and stops its own workers.
    """
    with gx.Pool(workers=1, start_method="zygote") as pool:
        graph = gx.Graph()
        node = graph.add(w.noop, 1)
        assert graph.compute(pool=pool)[node] == 1
    state = gx_zygote._state
    forked = state is not None and state[1].forked
    _cold_start_method.append("zygote" if forked else "zygote's fresh-interpreter fallback")
    return _cold_start_method[-1]


_cold_start_method: list[str] = []


@pytest.fixture(scope="session")
def gx_pool(graphexec_pool: gx.Pool) -> gx.Pool:
    """The plugin's session pool, every worker having imported the workload module."""
    if graphexec_pool.workers != w.WORKERS:
        # Every tool runs on WORKERS workers; the report divides by it.
        raise pytest.UsageError(
            f"the benchmarks compare tools at {w.WORKERS} workers: "
            f"drop --graphexec-workers={graphexec_pool.workers}"
        )
    w.check_w3(
        w.run_graphexec(w.w3_spec(200_000, 4), pool=graphexec_pool),
        [w.spin(200_000, i) for i in range(4)],
    )
    return graphexec_pool


@pytest.fixture(scope="session")
def w3_reference() -> tuple[w.Spec, list[int], float]:
    """W3 calibrated here: its spec, the expected values and the serial seconds."""
    loops = w.calibrate_spin(w.W3_SECONDS)
    spec = w.w3_spec(loops)
    start = time.perf_counter()
    out = w.run_serial(spec)
    serial = time.perf_counter() - start
    expected = [out.values[i] for i in sorted(out.values)]
    return spec, expected, serial


@pytest.fixture(scope="session")
def ppe() -> Iterator[ProcessPoolExecutor]:
    executor = ProcessPoolExecutor(max_workers=w.WORKERS)
    try:
        _warm_executor(executor)
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def loky_ex() -> Iterator[Any]:
    loky = pytest.importorskip("loky")
    executor = loky.ProcessPoolExecutor(max_workers=w.WORKERS)
    try:
        _warm_executor(executor)
        yield executor
    finally:
        executor.shutdown(wait=True)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=w.WORKERS,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    c = distributed.Client(cluster)
    try:
        assert c.gather(c.map(w.noop, range(8))) == list(range(8))
        yield c
    finally:
        c.close()
        cluster.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--w6-1m",
        action="store_true",
        help="also run W6 at 1,000,000 nodes (test_w6_scale.py::test_w6_run_1m; minutes)",
    )


# -- tools ---------------------------------------------------------------------------

# Tool keys, as recorded in extra_info, in the order the tests run.
# dask.distributed comes last: its cluster lives for one module (its event loop
# thread in this process and its four processes stay out of other tools' times).
TOOLS = (
    "serial",
    "ppe",
    "loky",
    "dask-processes",
    "graphexec-cold",
    "graphexec-cold-forkserver",
    "graphexec-warm",
    "ray",
    "dask-distributed",
)


def ray_status() -> str:
    """Ray's version, or why it is not there (for the report's Ray column)."""
    try:
        import ray
    except Exception as exc:  # not installed, or broken on this platform
        return f"not installed ({type(exc).__name__}: {exc})"
    return str(ray.__version__)


def pytest_benchmark_update_machine_info(config: Any, machine_info: dict[str, Any]) -> None:
    machine_info["ray"] = ray_status()
    # What "graphexec cold" forked its workers from (graphexec_zygote).
    if _cold_start_method:
        machine_info["graphexec_start_method"] = _cold_start_method[-1]


@pytest.fixture
def ray_session() -> Iterator[None]:
    """``ray.init(num_cpus=2)``, warmed, for one test; ``ray.shutdown()`` after it."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray)")
    w.ray_init(w.WORKERS)
    try:
        assert ray.get([w.ray_remote(w.noop).remote(i) for i in range(8)]) == list(range(8))
        yield
    finally:
        ray.shutdown()


@pytest.fixture(params=TOOLS)
def tool(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def runner(tool: str, request: pytest.FixtureRequest) -> Callable[..., w.Outcome]:
    """``runner(spec, states=False)`` runs a spec on the test's tool.

    ``states=True`` asks for failed and skipped calls to be reported (W5);
    dask's processes scheduler cannot: it raises at the first error.
    """
    if tool == "serial":
        return lambda spec, states=False: w.run_serial(spec)
    if tool == "ppe":
        ex = request.getfixturevalue("ppe")
        return lambda spec, states=False: w.run_executor(ex, spec)
    if tool == "loky":
        ex = request.getfixturevalue("loky_ex")
        return lambda spec, states=False: w.run_executor(ex, spec)
    if tool == "dask-processes":
        pytest.importorskip("dask")

        def run(spec: w.Spec, states: bool = False) -> w.Outcome:
            if states:
                pytest.skip("dask's processes scheduler raises at the first error: no states")
            return w.run_dask_processes(spec)

        return run
    if tool == "dask-distributed":
        c = request.getfixturevalue("client")
        return lambda spec, states=False: w.run_distributed(c, spec, all_states=states)
    if tool == "graphexec-cold":
        return lambda spec, states=False: w.run_graphexec(spec, workers=w.WORKERS)
    if tool == "graphexec-cold-forkserver":
        return lambda spec, states=False: w.run_graphexec(
            spec, workers=w.WORKERS, start_method="forkserver"
        )
    if tool == "graphexec-warm":
        pool = request.getfixturevalue("gx_pool")
        return lambda spec, states=False: w.run_graphexec(spec, pool=pool)
    if tool == "ray":
        request.getfixturevalue("ray_session")
        return lambda spec, states=False: w.run_ray(spec, all_states=states)
    raise AssertionError(tool)


def _cpu(p: psutil.Process) -> float:
    # user, system, and the children it has reaped (a pytest run's workers)
    return sum(p.cpu_times()[:4])


Snapshot = tuple[float, float, float, dict[tuple[int, float], float]]


def cpu_snapshot() -> Snapshot:
    """Wall clock; the machine's busy CPU seconds; this tree's; each other process's."""
    me = psutil.Process()
    mine_pids = {me.pid, *(c.pid for c in me.children(recursive=True))}
    mine, others = 0.0, {}
    for p in psutil.process_iter():
        try:
            if p.pid in mine_pids:
                mine += _cpu(p)
            else:
                others[(p.pid, p.create_time())] = _cpu(p)
        except psutil.Error:
            pass
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    return time.monotonic(), busy, mine, others


def cpu_window(before: Snapshot) -> dict[str, float]:
    """Wall seconds since ``before``, and CPU seconds other programs used meanwhile.

    Two estimates, each of which errs high in its own way, and the smaller is
    kept: the machine's busy time minus this process tree's (high when a
    worker of ours exited unreaped, its time lost), and the sum over every
    other process of the CPU it (and the children it reaped) used (high when
    an orphaned worker of ours turns up as a new process). A benchmark with
    much of it was disturbed by other programs; the report flags it.
    """
    start, busy, mine, others = before
    now, busy_now, mine_now, others_now = cpu_snapshot()
    by_machine = (busy_now - busy) - (mine_now - mine)
    by_process = sum(max(0.0, cpu - others.get(key, 0.0)) for key, cpu in others_now.items())
    return {"window_s": now - start, "foreign_cpu_s": max(0.0, min(by_machine, by_process))}


def measure(
    benchmark: Any,
    fn: Callable[[], Any],
    check: Callable[[Any], None],
    *,
    workload: str,
    tool: str,
    rounds: int,
    pause: float = 0.0,
    **extra: Any,
) -> float | None:
    """Time ``fn`` for ``rounds`` rounds (one call each); ``check`` every result.

    Before each round the garbage collector runs (untimed); after it the
    result is checked and dropped (untimed), so that no round's live objects
    slow down the next one's garbage collections. ``pause``: seconds slept
    before each round (untimed), as a program works between two computes.

    Records ``workload`` and ``tool`` (and ``extra``) in ``benchmark.extra_info``
    for the report; returns the median seconds (None when benchmarks are disabled).
    """
    pending: list[Any] = []
    checked = 0

    def setup() -> None:
        gc.collect()  # no round pays for the garbage of the one before
        if pause:
            time.sleep(pause)

    def once() -> None:
        pending.append(fn())

    def check_and_drop() -> None:  # after each round, outside the timed region
        nonlocal checked
        check(pending.pop())
        checked += 1

    benchmark.extra_info.update(workload=workload, tool=tool, **extra)
    before = cpu_snapshot()
    benchmark.pedantic(once, setup=setup, teardown=check_and_drop, rounds=rounds, iterations=1)
    benchmark.extra_info.update(cpu_window(before))
    while pending:  # --benchmark-disable: one call, no teardown
        check_and_drop()
    assert checked >= 1
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else None


def take_turns(
    runners: dict[str, Callable[[w.Spec], Any]],
    spec: w.Spec,
    check: Callable[[Any], None],
    turns: int,
) -> dict[str, list[float]]:
    """Seconds of each round of each tool, the tools taking turns round by round
    (``turns`` rounds each; the garbage collected before each, untimed): a burst of
    load from other programs then lands on all of them alike (see :func:`record`)."""
    times: dict[str, list[float]] = {tool: [] for tool in runners}
    for _ in range(turns):
        for tool, run in runners.items():
            gc.collect()
            start = time.perf_counter()
            out = run(spec)
            times[tool].append(time.perf_counter() - start)
            check(out)
    return times


def record(
    benchmark: Any, times: list[float], *, workload: str, tool: str, **extra: Any
) -> float | None:
    """Report rounds timed elsewhere (tools run in turns) as this benchmark's rounds.

    For workloads whose tools take turns round by round in one fixture, so
    that a burst of load from other programs lands on all of them alike;
    pytest-benchmark times a no-op once and its statistics are replaced by
    ``times``. Returns the median (None when benchmarks are disabled).
    """
    benchmark.extra_info.update(workload=workload, tool=tool, **extra)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return None
    # Its statistics are cached properties of the data: a fresh dict drops them.
    stats.stats.__dict__ = {"data": list(times)}
    return stats.stats.median  # type: ignore[no-any-return]
