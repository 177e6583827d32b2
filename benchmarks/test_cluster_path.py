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

Workloads, runners, checks and fixtures are the ones of the W1-W6 suite
(``workloads.py``, ``conftest.py``); the ``extra_info`` workloads are named
``cluster-W1`` ... so that ``benchmarks/report.py``'s W1-W6 tables are not
touched. Run it alone with::

    python -m pytest benchmarks/test_cluster_path.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from . import workloads as w
from .conftest import ROUNDS_HEAVY, ROUNDS_LIGHT, measure

pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(1800)

TOOLS = ("graphexec-pool", "graphexec-cluster", "dask-distributed")


@pytest.fixture(params=TOOLS)
def cluster_tool(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cluster_runner(cluster_tool: str, request: pytest.FixtureRequest) -> Callable[..., w.Outcome]:
    if cluster_tool == "graphexec-pool":
        pool = request.getfixturevalue("gx_pool")
        return lambda spec: w.run_graphexec(spec, pool=pool)
    client = request.getfixturevalue("client")
    if cluster_tool == "graphexec-cluster":
        return lambda spec: w.run_graphexec(spec, cluster=client)
    return lambda spec: w.run_distributed(client, spec)


def _measure(
    benchmark: Any,
    tool: str,
    workload: str,
    spec: w.Spec,
    runner: Callable[..., w.Outcome],
    check: Callable[[w.Outcome], None],
    rounds: int,
    **extra: Any,
) -> None:
    measure(
        benchmark,
        lambda: runner(spec),
        check,
        workload=f"cluster-{workload}",
        tool=tool,
        rounds=rounds,
        tasks=len(spec),
        **extra,
    )


@pytest.mark.benchmark(group="cluster-W1")
def test_cluster_w1(benchmark, cluster_tool, cluster_runner):
    _measure(benchmark, cluster_tool, "W1", w.w1_spec(), cluster_runner, w.check_w1, ROUNDS_LIGHT)


@pytest.mark.benchmark(group="cluster-W3")
def test_cluster_w3(benchmark, cluster_tool, cluster_runner, w3_reference):
    spec, expected, serial = w3_reference
    _measure(
        benchmark,
        cluster_tool,
        "W3",
        spec,
        cluster_runner,
        lambda out: w.check_w3(out, expected),
        ROUNDS_HEAVY,
        serial_reference_s=serial,
    )


@pytest.mark.benchmark(group="cluster-W4")
def test_cluster_w4(benchmark, cluster_tool, cluster_runner):
    w.w4_expected()  # the reference total, computed before any timing
    _measure(benchmark, cluster_tool, "W4", w.w4_spec(), cluster_runner, w.check_w4, ROUNDS_HEAVY)
