"""W6 scale: a layered graph, each node on 2 nodes of the layer before.

100 nodes wide; 100 layers (10,000 nodes) and 1,000 layers (100,000 nodes),
so that the two sizes show whether the cost per node stays flat; the build
also at 10,000 layers (1,000,000 nodes).

* ``W6-build``: building the graph with graphexec, three ways (``task``:
  decorated task calls inside ``with graph:``; ``add``: ``graph.add(fn, ...)``
  of a plain function inside ``with graph:``; ``add-bare``: the same calls
  without the block, so with the garbage collector running), bytes per node
  (tracemalloc, measured once outside the timed rounds), against a plain dict
  of tuples and ``dask.delayed`` (10,000 nodes only: its build time grows with
  the square of the depth).
* ``W6-run``: running the built graph (build not timed) on graphexec's warm
  pool, against serial calls and the executor driver. dask's schedulers are
  not run here: ``dask.delayed`` cannot build the 100,000-node graph in
  reasonable time; nor is Ray (its 5,000 no-op tasks of W1 take seconds).
* ``W6-run-1M`` (#14), only with ``--w6-1m`` (about 2 minutes on 2 quiet cores:
  kept out of quick runs): 10,000 layers, 1,000,000 nodes, built and run on
  the warm pool, one round, against serial calls; ``extra_info`` has the
  build's seconds and the parent's peak RSS (``peak_rss_mb``; the target is
  1.5 GB), taken from a program that does just that in a fresh interpreter
  (``benchmarks/w6_million.py``: the session's own peak would start from what
  earlier benchmarks left in its heap; that one, sampled every 50 ms over
  build and run, is ``session_peak_rss_mb``).
"""

import functools
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import psutil
import pytest

from . import workloads as w
from .conftest import ROUNDS_HEAVY, TIMEOUT, measure

pytestmark = pytest.mark.timeout(TIMEOUT)

WIDTH = w.W6_WIDTH
SIZES = {"10k": w.W6_SMALL_DEPTH, "100k": w.W6_DEPTH}
BUILD_SIZES = {**SIZES, "1M": 10 * w.W6_DEPTH}
BUILDERS = {
    "task": w.layered_graph,
    "add": functools.partial(w.layered_graph_add, inside_with=True),
    "add-bare": functools.partial(w.layered_graph_add, inside_with=False),
}


def _check_graph(built, depth):
    graph, last = built
    assert len(graph) == WIDTH * depth
    assert len(last) == WIDTH


@functools.cache
def _bytes_per_node(form, depth):
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        graph, _last = BUILDERS[form](WIDTH, depth)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / len(graph)


@pytest.mark.benchmark(group="W6-build")
@pytest.mark.parametrize("size", BUILD_SIZES)
@pytest.mark.parametrize("form", BUILDERS)
def test_w6_build_graphexec(benchmark, size, form):
    depth = BUILD_SIZES[size]
    per_node = _bytes_per_node(form, depth)
    build = BUILDERS[form]
    median = measure(
        benchmark,
        lambda: build(WIDTH, depth),
        lambda built: _check_graph(built, depth),
        workload=f"W6-build-{size}",
        tool="graphexec" if form == "task" else f"graphexec-{form}",
        rounds=ROUNDS_HEAVY,
        nodes=WIDTH * depth,
        bytes_per_node=per_node,
    )
    if median is not None:
        benchmark.extra_info["us_per_node"] = median / (WIDTH * depth) * 1e6


@pytest.mark.benchmark(group="W6-build")
@pytest.mark.parametrize("size", BUILD_SIZES)
def test_w6_build_plain_dict(benchmark, size):
    depth = BUILD_SIZES[size]

    def check(graph):
        assert len(graph) == WIDTH * depth

    measure(
        benchmark,
        lambda: w.layered_dict(WIDTH, depth),
        check,
        workload=f"W6-build-{size}",
        tool="plain-dict",
        rounds=ROUNDS_HEAVY,
        nodes=WIDTH * depth,
    )


@pytest.mark.benchmark(group="W6-build")
def test_w6_build_dask_delayed(benchmark):
    pytest.importorskip("dask")
    depth = SIZES["10k"]

    def check(last):
        assert len(last) == WIDTH

    measure(
        benchmark,
        lambda: w.layered_delayed(WIDTH, depth),
        check,
        workload="W6-build-10k",
        tool="dask.delayed",
        rounds=ROUNDS_HEAVY,
        nodes=WIDTH * depth,
    )


@pytest.mark.benchmark(group="W6-run")
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("tool", ["serial", "ppe", "loky", "graphexec-warm"])
def test_w6_run(benchmark, tool, size, request):
    depth = SIZES[size]
    n = WIDTH * depth
    if tool == "graphexec-warm":
        pool = request.getfixturevalue("gx_pool")
        graph, last = w.layered_graph(WIDTH, depth)  # built per test: no big leftovers

        def fn():
            return graph.compute(pool=pool)

        def check(run):
            assert run.counts() == {"Completed": n}
            assert {run[node] for node in last} == {depth - 1}
    else:
        spec = w.w6_spec(WIDTH, depth)
        if tool == "serial":

            def fn():
                return w.run_serial(spec)
        else:
            ex = request.getfixturevalue("ppe" if tool == "ppe" else "loky_ex")

            def fn():
                return w.run_executor(ex, spec)

        def check(out):
            w.check_w6(out, WIDTH, depth)

    median = measure(
        benchmark, fn, check, workload=f"W6-run-{size}", tool=tool, rounds=ROUNDS_HEAVY, nodes=n
    )
    if median is not None:
        benchmark.extra_info["us_per_node"] = median / n * 1e6


DEPTH_1M = BUILD_SIZES["1M"]


class PeakRSS:
    """This process's peak RSS while the block runs (a thread samples every 50 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._me.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._me.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._me.memory_info().rss)


@pytest.mark.benchmark(group="W6-run")
@pytest.mark.parametrize("tool", ["serial", "graphexec-warm"])
def test_w6_run_1m(benchmark, tool, request):
    """As the 10k and 100k runs (the build is not timed), with this process's
    peak RSS sampled from before the build to after the run."""
    if not request.config.getoption("--w6-1m"):
        pytest.skip("W6 at 1,000,000 nodes runs with --w6-1m only (minutes)")
    # The fresh program first, while this session holds no 1M-node graph of its own.
    fresh_info: dict[str, float] = {}
    if tool == "graphexec-warm":
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.w6_million", str(DEPTH_1M)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        fresh = json.loads(done.stdout.strip().splitlines()[-1])
        fresh_info = dict(
            peak_rss_mb=fresh["peak_rss_mb"],
            fresh_run_s=fresh["run_s"],
            fresh_build_s=fresh["build_s"],
        )
    n = WIDTH * DEPTH_1M
    with PeakRSS() as peak:
        start = time.perf_counter()
        if tool == "graphexec-warm":
            pool = request.getfixturevalue("gx_pool")
            graph, last = w.layered_graph(WIDTH, DEPTH_1M)

            def fn():
                return graph.compute(pool=pool, progress=False)

            def check(run):
                assert run.counts() == {"Completed": n}
                assert {run[node] for node in last} == {DEPTH_1M - 1}
        else:
            spec = w.w6_spec(WIDTH, DEPTH_1M)

            def fn():
                return w.run_serial(spec)

            def check(out):
                w.check_w6(out, WIDTH, DEPTH_1M)

        build_s = time.perf_counter() - start
        median = measure(benchmark, fn, check, workload="W6-run-1M", tool=tool, rounds=1, nodes=n)
    benchmark.extra_info.update(
        session_peak_rss_mb=peak.peak / (1 << 20), build_s=build_s, **fresh_info
    )
    if median is not None:
        benchmark.extra_info["us_per_node"] = median / n * 1e6
