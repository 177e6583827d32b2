"""Caching overhead (issue #6): W1 and W4 uncached, on an empty cache, and fully cached.

* ``uncached``      — plain tasks: the baseline;
* ``cold-cache``    — every task ``cache=True`` and an empty cache directory each
                      round: the baseline plus hashing keys and writing (and fsyncing)
                      every entry;
* ``cached-rerun``  — the same graph again on a full cache directory: every node is
                      ``Cached``, nothing runs.

``extra_info["other_cpu_s_median"]`` is the CPU time other programs used during a
round (median): numbers taken on a busy machine say so.

W1 is 5,000 no-op tasks and a sum over them; W4 is 32 x (make a 16 MB float64
array → sort → sum) → total. Both on a warm ``gx.Pool(workers=2)``; building the
graph is inside the timed region, as in the other benchmarks. Standalone: its own
tasks, pool and cache directories (under pytest's tmp_path), nothing shared with
``conftest.py`` or ``workloads.py``.

Run: ``python -m pytest benchmarks/test_cache_rerun.py --benchmark-only -p no:cacheprovider``.
"""

from __future__ import annotations

import itertools
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphexec as gx

W1_TASKS = 5_000
W4_ARRAYS = 32
W4_LENGTH = 2_000_000  # float64: 16 MB
ROUNDS = {"W1": 5, "W4": 3}
VARIANTS = ("uncached", "cold-cache", "cached-rerun")

pytestmark = [pytest.mark.timeout(1800)]


@gx.task
def noop(i: int) -> int:
    return i


@gx.task
def total(values: list[Any]) -> Any:
    return sum(values)


@gx.task
def make_array(seed: int, length: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).random(length)


@gx.task
def sort_array(a: Any) -> Any:
    import numpy as np

    return np.sort(a)


@gx.task
def sum_array(a: Any) -> float:
    return float(a.sum())


def _tasks(cached: bool) -> dict[str, gx.Task]:
    plain = {
        "noop": noop,
        "total": total,
        "make_array": make_array,
        "sort_array": sort_array,
        "sum_array": sum_array,
    }
    return {k: t.with_options(cache=True) for k, t in plain.items()} if cached else plain


def build_w1(cached: bool) -> tuple[gx.Graph, Any]:
    t = _tasks(cached)
    graph = gx.Graph()
    with graph:
        result = t["total"]([t["noop"](i) for i in range(W1_TASKS)])
    return graph, result


def build_w4(cached: bool) -> tuple[gx.Graph, Any]:
    t = _tasks(cached)
    graph = gx.Graph()
    with graph:
        sums = [
            t["sum_array"](t["sort_array"](t["make_array"](i, W4_LENGTH))) for i in range(W4_ARRAYS)
        ]
        result = t["total"](sums)
    return graph, result


BUILD: dict[str, Callable[[bool], tuple[gx.Graph, Any]]] = {"W1": build_w1, "W4": build_w4}


def expected(workload: str) -> float:
    if workload == "W1":
        return W1_TASKS * (W1_TASKS - 1) // 2
    return sum(float(np.random.default_rng(i).random(W4_LENGTH).sum()) for i in range(W4_ARRAYS))


@pytest.fixture(scope="module")
def rerun_pool() -> Iterator[gx.Pool]:
    pool = gx.Pool(workers=2)
    try:
        graph = gx.Graph()
        with graph:  # start both workers before any timing
            total([make_array(i, 1000) for i in range(4)])
        graph.compute(pool=pool)
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def expected_totals() -> dict[str, float]:
    return {w: expected(w) for w in BUILD}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("workload", ["W1", "W4"])
def test_cache_rerun(benchmark, rerun_pool, expected_totals, tmp_path, workload, variant):
    build = BUILD[workload]
    want = expected_totals[workload]
    n_nodes = len(build(False)[0]._deps)
    dirs = (tmp_path / f"cache-{k}" for k in itertools.count())
    cache_dir: Path = tmp_path / "cache-full"
    if variant == "cached-rerun":  # fill it once, untimed
        graph, _ = build(True)
        first = graph.compute(pool=rerun_pool, cache_dir=cache_dir)
        assert first.counts() == {"Completed": n_nodes}

    outcomes: list[tuple[dict[str, int], Any]] = []
    current: list[Path] = []

    def setup() -> None:
        if variant == "cold-cache":  # a new, empty directory each round
            for old in current:
                shutil.rmtree(old, ignore_errors=True)
            current[:] = [next(dirs)]

    others: list[float] = []

    def once() -> None:
        before = _cpu_of_others()
        graph, result = build(variant != "uncached")
        kw = (
            {}
            if variant == "uncached"
            else {"cache_dir": current[0] if variant == "cold-cache" else cache_dir}
        )
        run = graph.compute(result, pool=rerun_pool, **kw)
        outcomes.append((run.counts(), run[result]))
        others.append(_cpu_of_others() - before)

    benchmark.group = f"{workload}-cache"
    benchmark.extra_info.update(workload=f"{workload}-cache", tool=variant, nodes=n_nodes)
    benchmark.pedantic(once, setup=setup, rounds=ROUNDS[workload], iterations=1)
    for current_dir in current:
        shutil.rmtree(current_dir, ignore_errors=True)

    assert outcomes
    state = "Cached" if variant == "cached-rerun" else "Completed"
    for counts, value in outcomes:
        assert counts == {state: n_nodes}, counts
        assert math.isclose(value, want, rel_tol=1e-9), value
    benchmark.extra_info["other_cpu_s_median"] = sorted(others)[len(others) // 2]
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["us_per_node"] = stats.stats.median / n_nodes * 1e6


def _cpu_of_others() -> float:
    """CPU seconds used so far by every process but this one and its children: how
    busy the machine was around a round (2 cores: 2 s of it per wall second is all)."""
    import psutil

    busy = psutil.cpu_times()
    total = sum(getattr(busy, f, 0.0) for f in ("user", "system", "nice", "irq", "softirq"))
    mine = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        mine += t.user + t.system
    return total - mine
