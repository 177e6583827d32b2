"""What ``compute(cluster=...)`` costs on one machine: W1, W2, W3, W4 (issues #9, #14).

The same graphexec graph, built the same way, runs on three back ends with
two workers each, all started before timing:

=====================  ==================================================================
``graphexec-pool``     ``graph.compute(pool=gx.Pool(workers=2))``: the local process pool
``graphexec-cluster``  ``graph.compute(cluster=client)`` on a ``LocalCluster(n_workers=2,
                       threads_per_worker=1, processes=True)``
``dask-distributed``   the same tasks as ``dask.delayed`` and ``client.compute`` on that
                       cluster: what dask itself costs, without graphexec on top
=====================  ==================================================================

The three take turns round by round (the pool and dask, in turns first,
then graphexec on the cluster, then again), so that a burst of load from other programs hits them
alike: on a shared machine, times taken one tool after the other are not
comparable. pytest-benchmark times ``graphexec-cluster``; the rounds of the
other two are timed here, in the same session, and recorded in its
``extra_info`` (``dask_s``, ``pool_s``, their medians, ``ratio``:
graphexec-cluster's median over dask's, and ``paired_ratio``: the median over
rounds of graphexec's time over the dask time of the same round). At the end
of the module a table of the medians and ratios is written to the terminal.

Workloads, runners, checks and fixtures are the ones of the W1-W6 suite
(``workloads.py``, ``conftest.py``); the ``extra_info`` workloads are named
``cluster-W1`` ... so that ``benchmarks/report.py``'s W1-W6 tables are not
touched. Run it alone with::

    python -m pytest benchmarks/test_cluster_path.py --benchmark-only -p no:cacheprovider

``CLUSTER_ROUNDS=7`` (the environment) runs more rounds of each than the default.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from . import workloads as w
from .conftest import ROUNDS_HEAVY, cpu_snapshot, cpu_window

pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(3600)

# W1 on dask.distributed takes about ten seconds a round: five rounds of three tools
# are ten minutes already.
ROUNDS = int(os.environ.get("CLUSTER_ROUNDS", "0")) or None

_rows: dict[str, dict[str, float]] = {}  # workload -> tool -> median seconds


@pytest.fixture(scope="module", autouse=True)
def ratio_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: the medians side by side, and graphexec-cluster / dask."""
    yield
    if not _rows:
        return
    lines = [
        "",
        "cluster path, medians of alternating rounds (seconds)",
        f"{'workload':<10}{'pool':>10}{'gx-cluster':>12}{'dask':>10}{'gx/dask':>10}"
        f"{'per round':>11}",
    ]
    for workload, row in _rows.items():
        lines.append(
            f"{workload:<10}{row['pool']:>10.3f}{row['cluster']:>12.3f}{row['dask']:>10.3f}"
            f"{row['cluster'] / row['dask']:>10.3f}{row['paired']:>11.3f}"
        )
    # Past pytest's output capture, which a module fixture's teardown is still inside.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        print("\n".join(lines))


def _alternate(
    benchmark: Any,
    workload: str,
    spec: Callable[[], w.Spec],
    check: Callable[[w.Outcome], None],
    rounds: int,
    client: Any,
    pool: Any,
    **extra: Any,
) -> None:
    """Rounds of dask, graphexec on the cluster and the pool, in turn.

    pytest-benchmark times graphexec on the cluster; the setup of each of its
    rounds runs (and times) one round of dask and one of the pool first.
    Every result is checked, outside the timed regions.
    """
    others: dict[str, list[float]] = {"dask": [], "pool": []}
    pending: list[w.Outcome] = []

    def timed(tool: str, fn: Callable[[], w.Outcome]) -> None:
        gc.collect()
        start = time.perf_counter()
        out = fn()
        others[tool].append(time.perf_counter() - start)
        check(out)

    def setup() -> None:
        # The two take turns at coming right before graphexec's round.
        runs = [
            ("dask", lambda: w.run_distributed(client, spec())),
            ("pool", lambda: w.run_graphexec(spec(), pool=pool)),
        ]
        for tool, fn in runs if len(others["dask"]) % 2 else runs[::-1]:
            timed(tool, fn)
        pending.append(spec())  # built outside the timed region, as the others' are
        gc.collect()

    def once() -> None:
        pending.append(w.run_graphexec(pending.pop(), cluster=client))

    def check_and_drop() -> None:
        check(pending.pop())

    benchmark.extra_info.update(
        workload=f"cluster-{workload}", tool="graphexec-cluster", tasks=len(spec()), **extra
    )
    before = cpu_snapshot()
    benchmark.pedantic(once, setup=setup, teardown=check_and_drop, rounds=rounds, iterations=1)
    benchmark.extra_info.update(cpu_window(before))
    while pending:  # --benchmark-disable: one round, no teardown
        check_and_drop()
    stats = getattr(benchmark, "stats", None)
    mine = stats.stats.median if stats is not None else None
    dask_median = statistics.median(others["dask"])
    pool_median = statistics.median(others["pool"])
    benchmark.extra_info.update(
        dask_s=others["dask"],
        pool_s=others["pool"],
        dask_median_s=dask_median,
        pool_median_s=pool_median,
    )
    if mine is not None:
        # Each round's graphexec time over the dask time just before it: under bursty
        # load from other programs, steadier than the ratio of the medians.
        paired = statistics.median(
            gx / dask for gx, dask in zip(stats.stats.data, others["dask"], strict=False)
        )
        benchmark.extra_info.update(ratio=mine / dask_median, paired_ratio=paired)
        _rows[workload] = {
            "pool": pool_median,
            "cluster": mine,
            "dask": dask_median,
            "paired": paired,
        }


@pytest.mark.benchmark(group="cluster-W1")
def test_cluster_w1(benchmark, client, gx_pool):
    _alternate(benchmark, "W1", w.w1_spec, w.check_w1, ROUNDS or 3, client, gx_pool)


@pytest.mark.benchmark(group="cluster-W2")
def test_cluster_w2(benchmark, client, gx_pool):
    """A chain of 500 +1 tasks: latency. Each link was a round trip through this
    process before chains reached the cluster path; now 33 links go at once."""
    _alternate(benchmark, "W2", w.w2_spec, w.check_w2, ROUNDS or ROUNDS_HEAVY + 2, client, gx_pool)


@pytest.mark.benchmark(group="cluster-W3")
def test_cluster_w3(benchmark, client, gx_pool, w3_reference):
    spec, expected, serial = w3_reference
    _alternate(
        benchmark,
        "W3",
        lambda: spec,
        lambda out: w.check_w3(out, expected),
        ROUNDS or ROUNDS_HEAVY + 2,
        client,
        gx_pool,
        serial_reference_s=serial,
    )


@pytest.mark.benchmark(group="cluster-W4")
def test_cluster_w4(benchmark, client, gx_pool):
    w.w4_expected()  # the reference total, computed before any timing
    _alternate(benchmark, "W4", w.w4_spec, w.check_w4, ROUNDS or ROUNDS_HEAVY + 2, client, gx_pool)
