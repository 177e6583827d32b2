"""``task.map`` against the same calls in a loop: 100,000 tiny calls, build and run (#13).

Issue #13 asks that mapping cost no more per item than writing the loop. Two
forms of W1's no-op calls, side by side in one session, each timed from the
first call to the last value:

* ``graph``: ``noop.map(range(N))`` against ``[noop(i) for i in range(N)]``
  inside ``with graph:``, computed on the warm pool;
* ``flow``: the same inside a ``@gx.flow(workers=2)`` (futures), whose pool
  start-up both forms pay.

The report lists both forms' medians (issue #14 asks for W1's ``task.map``
form); ``extra_info["us_per_item"]`` in the JSON has the cost per item.
"""

from __future__ import annotations

from typing import Any

import pytest

import graphexec as gx

from . import workloads as w
from .conftest import ROUNDS_HEAVY, TIMEOUT, measure

pytestmark = [pytest.mark.benchmark(group="map"), pytest.mark.timeout(TIMEOUT)]

N = 100_000
noop = gx.task(w.noop)


def _in_graph(form: str, **compute: Any) -> list[int]:
    graph = gx.Graph()
    with graph:
        nodes = noop.map(range(N)) if form == "map" else [noop(i) for i in range(N)]
    run = graph.compute(keep="all", **compute)
    return [run[n] for n in nodes]


@gx.flow(workers=w.WORKERS)
def _in_flow(form: str) -> list[int]:
    futures = noop.map(range(N)) if form == "map" else [noop.submit(i) for i in range(N)]
    return [f.result() for f in futures]


def _check(values: list[int]) -> None:
    assert values == list(range(N))


@pytest.mark.parametrize("form", ["loop", "map"])
def test_map_in_a_graph(benchmark, form, gx_pool):
    median = measure(
        benchmark,
        lambda: _in_graph(form, pool=gx_pool),
        _check,
        workload="map-graph",
        tool=form,
        rounds=ROUNDS_HEAVY,
    )
    if median is not None:
        benchmark.extra_info["us_per_item"] = median / N * 1e6


@pytest.mark.parametrize("form", ["loop", "map"])
def test_map_in_a_flow(benchmark, form):
    median = measure(
        benchmark,
        lambda: _in_flow(form),
        _check,
        workload="map-flow",
        tool=form,
        rounds=ROUNDS_HEAVY,
    )
    if median is not None:
        benchmark.extra_info["us_per_item"] = median / N * 1e6
