"""Flow overhead (issue #7): 10,000 ``submit()`` calls in a flow vs the same lazy graph.

The same work three ways, 2 workers each:

* ``graphexec-flow``       — ``@gx.flow(workers=2)`` whose body submits 10,000
  no-op tasks, then collects every ``.result()``. A flow starts its own pool,
  so its start-up is inside the time;
* ``graphexec-lazy-cold``  — the same 10,000 calls inside ``with graph:`` and
  ``graph.compute(workers=2)``: the lazy equivalent, start-up included;
* ``graphexec-lazy-warm``  — the same graph on a warm ``gx.Pool(workers=2)``
  (``graph.compute(pool=...)``), start-up excluded.

Flow minus lazy-cold is what eager execution costs over lazy (a scheduler
thread, one admission per submit, a condition wait per result). The flow
records how long the 10,000 ``submit()`` calls themselves took in
``extra_info["submit_seconds"]``.

Self-contained: its fixtures are its own (the shared ones in conftest.py are
not used). Run it with
``python -m pytest benchmarks/test_flow_submit.py --benchmark-only -p no:cacheprovider``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import graphexec as gx

pytestmark = [pytest.mark.benchmark(group="flow-submit"), pytest.mark.timeout(900)]

TASKS = 10_000
WORKERS = 2
ROUNDS = 5
EXPECTED = sum(range(TASKS))


def noop(x: int) -> int:
    return x


noop_task = gx.task(noop)


@gx.flow(workers=WORKERS)
def submit_flow(n: int, timings: dict[str, float]) -> int:
    started = time.perf_counter()
    futures = [noop_task.submit(i) for i in range(n)]
    timings["submit_seconds"] = time.perf_counter() - started
    return sum(f.result() for f in futures)


def lazy_graph(n: int) -> tuple[gx.Graph, list[gx.Node]]:
    graph = gx.Graph("flow-submit")
    with graph:
        nodes = [noop_task(i) for i in range(n)]
    return graph, nodes


def run_lazy(n: int, **compute: Any) -> int:
    graph, nodes = lazy_graph(n)  # building is part of the work, as a flow's submits are
    run = graph.compute(keep="all", **compute)
    return sum(run[node] for node in nodes)


@pytest.fixture(scope="module")
def warm_pool() -> Iterator[gx.Pool]:
    pool = gx.Pool(workers=WORKERS)
    try:
        assert run_lazy(200, pool=pool) == sum(range(200))  # both workers up and warm
        yield pool
    finally:
        pool.close()


def measure(benchmark: Any, fn: Any, tool: str, **extra: Any) -> None:
    results: list[int] = []
    benchmark.extra_info.update(workload="flow-submit", tool=tool, tasks=TASKS, **extra)
    benchmark.pedantic(lambda: results.append(fn()), rounds=ROUNDS, iterations=1)
    assert results and all(r == EXPECTED for r in results)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["us_per_task"] = stats.stats.median / TASKS * 1e6


def test_flow_10000_submits(benchmark: Any) -> None:
    timings: dict[str, float] = {}
    submits: list[float] = []

    def once() -> int:
        value = submit_flow(TASKS, timings)
        submits.append(timings["submit_seconds"])
        return value  # type: ignore[no-any-return]

    measure(benchmark, once, "graphexec-flow")
    benchmark.extra_info["submit_seconds"] = sorted(submits)[len(submits) // 2]


def test_lazy_graph_cold(benchmark: Any) -> None:
    measure(benchmark, lambda: run_lazy(TASKS, workers=WORKERS), "graphexec-lazy-cold")


def test_lazy_graph_warm_pool(benchmark: Any, warm_pool: gx.Pool) -> None:
    measure(benchmark, lambda: run_lazy(TASKS, pool=warm_pool), "graphexec-lazy-warm")
