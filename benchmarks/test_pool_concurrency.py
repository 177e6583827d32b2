"""One warm pool, many threads (issue #18): concurrent computes against the same
computes one after another.

8 threads each run 50 computes of a 100-node graph (99 tiny tasks and their sum)
on one ``gx.Pool(workers=2)``; the same 400 computes one after another on the
same pool are the serial anchor, and ``concurrent.futures.ProcessPoolExecutor``
(2 workers) doing the same 40,000 calls from 8 threads, each thread waiting for
its 99 futures and summing them in the parent, is the tool-users-would-pick
anchor. Every compute's result is checked.

Recorded in ``extra_info``: ``ratio_to_serial`` (concurrent wall time over
serial wall time, both measured in the same round, so that the machine's load
hits both alike), ``thread_spread`` (the slowest thread's finish over the
fastest's). The issue's goals: ratio <= 1.2, spread <= 1.5.

Run it with
``python -m pytest benchmarks/test_pool_concurrency.py --benchmark-only -p no:cacheprovider``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

import graphexec as gx

pytestmark = [pytest.mark.benchmark(group="pool-concurrency"), pytest.mark.timeout(900)]

THREADS = 8
COMPUTES = 50  # per thread
WIDTH = 99  # tiny tasks per compute, plus their sum: 100 nodes
WORKERS = 2
ROUNDS = 3


def inc(x: int) -> int:
    return x + 1


def add_all(xs: list[int]) -> int:
    return sum(xs)


inc_task = gx.task(inc)
sum_task = gx.task(add_all)


def expected(k: int) -> int:
    return sum(range(k + 1, k + WIDTH + 1))


def one_compute(pool: gx.Pool, k: int) -> None:
    graph = gx.Graph("pool-concurrency")
    with graph:
        total = sum_task([inc_task(k + i) for i in range(WIDTH)])
    assert graph.compute(pool=pool)[total] == expected(k)


def one_ppe(executor: ProcessPoolExecutor, k: int) -> None:
    futures = [executor.submit(inc, k + i) for i in range(WIDTH)]
    assert sum(f.result() for f in futures) == expected(k)


def serial(run_one: Any, target: Any) -> float:
    started = time.perf_counter()
    for t in range(THREADS):
        for c in range(COMPUTES):
            run_one(target, t * COMPUTES + c)
    return time.perf_counter() - started


def concurrent(run_one: Any, target: Any) -> tuple[float, list[float]]:
    """Wall time of THREADS threads doing COMPUTES each, and each thread's finish."""
    finishes: list[float] = [0.0] * THREADS
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS + 1)

    def body(t: int) -> None:
        barrier.wait()
        try:
            for c in range(COMPUTES):
                run_one(target, t * COMPUTES + c)
        except BaseException as exc:
            errors.append(exc)
        finishes[t] = time.perf_counter()

    threads = [threading.Thread(target=body, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, [f - started for f in finishes]


@pytest.fixture(scope="module")
def warm_pool() -> Iterator[gx.Pool]:
    pool = gx.Pool(workers=WORKERS)
    try:
        for k in range(4):
            one_compute(pool, k)
        yield pool
    finally:
        pool.close()


def _measure(benchmark: Any, run_one: Any, target: Any, tool: str) -> None:
    ratios: list[float] = []
    spreads: list[float] = []
    walls: list[tuple[float, float]] = []

    def round_() -> None:
        alone = serial(run_one, target)
        wall, finishes = concurrent(run_one, target)
        walls.append((alone, wall))
        ratios.append(wall / alone)
        spreads.append(max(finishes) / min(finishes))

    benchmark.pedantic(round_, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(
        tool=tool,
        threads=THREADS,
        computes_per_thread=COMPUTES,
        nodes_per_compute=WIDTH + 1,
        ratio_to_serial=round(statistics.median(ratios), 3),
        thread_spread=round(statistics.median(spreads), 3),
        ratios=[round(r, 3) for r in ratios],
        spreads=[round(s, 3) for s in spreads],
        serial_s=[round(a, 3) for a, _ in walls],
        concurrent_s=[round(b, 3) for _, b in walls],
    )


def test_graphexec_warm_pool_threads(benchmark: Any, warm_pool: gx.Pool) -> None:
    _measure(benchmark, one_compute, warm_pool, "graphexec")
    info = benchmark.extra_info
    print(f"graphexec: ratio {info['ratio_to_serial']} spread {info['thread_spread']}")


def test_process_pool_executor_threads(benchmark: Any) -> None:
    with ProcessPoolExecutor(max_workers=WORKERS) as executor:
        one_ppe(executor, 0)
        _measure(benchmark, one_ppe, executor, "ProcessPoolExecutor")
    info = benchmark.extra_info
    print(f"ProcessPoolExecutor: ratio {info['ratio_to_serial']} spread {info['thread_spread']}")
