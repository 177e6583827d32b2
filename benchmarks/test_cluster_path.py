"""What ``compute(cluster=...)`` costs on one machine: W1, W3, W4 (issue #9).

The same graphexec graph, built the same way, runs on three back ends with
two workers each, all started before timing:

=====================  ==================================================================
``graphexec-pool``     ``graph.compute(pool=gx.Pool(workers=2))``: the local process pool
``graphexec-cluster``  ``graph.compute(cluster=client)`` on a ``LocalCluster(n_workers=2,
                       threads_per_worker=1, processes=True)``
``dask-distributed``   the same tasks as ``dask.delayed`` and ``client.compute`` on that
                       cluster: what dask itself costs, without graphexec on top
=====================  ==================================================================

Each benchmark records in ``extra_info["foreign_cpu_s"]`` the CPU seconds
other programs used while it ran: a large value means the number was
disturbed. Workloads (sizes of issue #5): W1 5,000 no-op tasks and one sum; W3 40
pure-Python tasks of ~100 ms (calibrated once); W4 32 x (make a 16 MB float64
array -> sort -> sum) -> total. Results are checked after every round.

Standalone: its fixtures and task functions are its own, and its
``extra_info`` workloads are named ``cluster-W1`` ... so that
``benchmarks/report.py``'s W1-W6 tables are not touched. Run it with::

    python -m pytest benchmarks/test_cluster_path.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

import graphexec as gx

distributed = pytest.importorskip("distributed")
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(1800)

WORKERS = 2
W1_TASKS = 5_000
W3_TASKS = 40
W3_SECONDS = 0.1
W4_ARRAYS = 32
W4_LENGTH = 2_000_000  # float64: 16 MB
ROUNDS = {"W1": 5, "W3": 3, "W4": 3}
TOOLS = ("graphexec-pool", "graphexec-cluster", "dask-distributed")


# -- task functions (imported by name on the workers) ---------------------------------------


def noop(i: int) -> int:
    return i


def total(values: list[Any]) -> Any:
    return sum(values)


def spin(loops: int, seed: int) -> int:
    x = seed
    for i in range(loops):
        x = (x * 31 + i) % 1_000_003
    return x


def make_array(seed: int, length: int) -> Any:
    return np.random.default_rng(seed).random(length)


def sort_array(a: Any) -> Any:
    return np.sort(a)


def sum_array(a: Any) -> float:
    return float(a.sum())


def calibrate_spin(seconds: float = W3_SECONDS) -> int:
    loops = 20_000
    while True:
        start = time.perf_counter()
        spin(loops, 0)
        elapsed = time.perf_counter() - start
        if elapsed > 0.02:
            break
        loops *= 2
    for _ in range(3):
        start = time.perf_counter()
        spin(loops, 0)
        elapsed = min(elapsed, time.perf_counter() - start)
    return max(1, round(loops * seconds / elapsed))


# -- workloads: (fn, args) calls in dependency order; an int in REFS position is a call index --


class Ref(int):
    """An argument that stands for the value of call ``int(self)``."""


def w1() -> list[tuple[Callable, tuple]]:
    calls: list[tuple[Callable, tuple]] = [(noop, (i,)) for i in range(W1_TASKS)]
    calls.append((total, ([Ref(i) for i in range(W1_TASKS)],)))
    return calls


def w3(loops: int) -> list[tuple[Callable, tuple]]:
    return [(spin, (loops, i)) for i in range(W3_TASKS)]


def w4() -> list[tuple[Callable, tuple]]:
    calls: list[tuple[Callable, tuple]] = []
    sums = []
    for i in range(W4_ARRAYS):
        calls.append((make_array, (i, W4_LENGTH)))
        calls.append((sort_array, (Ref(len(calls) - 1),)))
        calls.append((sum_array, (Ref(len(calls) - 1),)))
        sums.append(Ref(len(calls) - 1))
    calls.append((total, (sums,)))
    return calls


def _resolve(args: tuple, made: list[Any]) -> tuple:
    def one(a: Any) -> Any:
        if type(a) is Ref:
            return made[a]
        if type(a) is list:
            return [one(x) for x in a]
        return a

    return tuple(one(a) for a in args)


def run_graphexec(calls: list[tuple[Callable, tuple]], outputs: list[int], **kw: Any) -> list:
    tasks: dict[Callable, gx.Task] = {}
    graph = gx.Graph()
    with graph:
        nodes: list[Any] = []
        for fn, args in calls:
            task = tasks.get(fn) or tasks.setdefault(fn, gx.task(fn))
            nodes.append(task(*_resolve(args, nodes)))
    targets = [nodes[i] for i in outputs]
    run = graph.compute(*targets, **kw)
    return [run[n] for n in targets]


def run_dask(client: Any, calls: list[tuple[Callable, tuple]], outputs: list[int]) -> list:
    import dask

    made: list[Any] = []
    for fn, args in calls:
        made.append(dask.delayed(fn, pure=False)(*_resolve(args, made)))
    futures = client.compute([made[i] for i in outputs])
    return client.gather(futures)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_pool() -> Iterator[gx.Pool]:
    pool = gx.Pool(workers=WORKERS)
    try:
        run_graphexec(w3(200_000)[:4], [0, 1, 2, 3], pool=pool)  # both workers started
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def cluster_client() -> Iterator[Any]:
    cluster = distributed.LocalCluster(
        n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(cluster)
    try:
        assert client.gather(client.map(noop, range(8), pure=False)) == list(range(8))
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture(scope="module")
def spin_loops() -> int:
    return calibrate_spin()


@pytest.fixture(params=TOOLS)
def runner(request: pytest.FixtureRequest) -> Callable[..., list]:
    tool = request.param
    if tool == "graphexec-pool":
        pool = request.getfixturevalue("local_pool")
        return lambda calls, outputs: run_graphexec(calls, outputs, pool=pool)
    client = request.getfixturevalue("cluster_client")
    if tool == "graphexec-cluster":
        return lambda calls, outputs: run_graphexec(calls, outputs, cluster=client)
    return lambda calls, outputs: run_dask(client, calls, outputs)


def _busy() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _tree_cpu() -> float:
    """CPU seconds of this process and its descendants (the workers)."""
    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            total += sum(p.cpu_times()[:4])
        except psutil.Error:
            pass
    return total


def measure(benchmark: Any, request: pytest.FixtureRequest, workload: str,
            fn: Callable[[], list], check: Callable[[list], None], **extra: Any) -> None:
    tool = request.node.callspec.params["runner"]
    results: list[list] = []

    def once() -> None:
        results.append(fn())

    def setup() -> None:
        gc.collect()  # untimed: no round pays for the garbage of the one before

    benchmark.extra_info.update(workload=f"cluster-{workload}", tool=tool, **extra)
    busy, mine = _busy(), _tree_cpu()
    benchmark.pedantic(once, setup=setup, rounds=ROUNDS[workload], iterations=1)
    # CPU seconds other programs used meanwhile: much of it means a disturbed number
    benchmark.extra_info["foreign_cpu_s"] = max(0.0, (_busy() - busy) - (_tree_cpu() - mine))
    assert results
    for result in results:
        check(result)


# -- benchmarks ------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="cluster-W1")
def test_cluster_w1(benchmark, request, runner):
    calls = w1()
    expected = W1_TASKS * (W1_TASKS - 1) // 2

    def check(result: list) -> None:
        assert result == [expected]

    measure(benchmark, request, "W1", lambda: runner(calls, [len(calls) - 1]), check,
            tasks=len(calls))


@pytest.mark.benchmark(group="cluster-W3")
def test_cluster_w3(benchmark, request, runner, spin_loops):
    calls = w3(spin_loops)
    expected = [spin(spin_loops, i) for i in range(W3_TASKS)]

    def check(result: list) -> None:
        assert result == expected

    start = time.perf_counter()
    spin(spin_loops, 0)
    measure(benchmark, request, "W3", lambda: runner(calls, list(range(W3_TASKS))), check,
            tasks=len(calls), serial_estimate_s=(time.perf_counter() - start) * W3_TASKS)


@pytest.mark.benchmark(group="cluster-W4")
def test_cluster_w4(benchmark, request, runner):
    calls = w4()
    expected = sum(float(make_array(i, W4_LENGTH).sum()) for i in range(W4_ARRAYS))

    def check(result: list) -> None:
        assert math.isclose(result[0], expected, rel_tol=1e-9), result

    measure(benchmark, request, "W4", lambda: runner(calls, [len(calls) - 1]), check,
            tasks=len(calls))
