"""W2 latency: a chain of 500 dependent +1 tasks."""

import pytest

from . import workloads as w
from .conftest import ROUNDS_QUICK, TIMEOUT, measure

pytestmark = [pytest.mark.benchmark(group="W2"), pytest.mark.timeout(TIMEOUT)]

SPEC = w.w2_spec()


def test_w2(benchmark, tool, runner):
    median = measure(
        benchmark,
        lambda: runner(SPEC),
        w.check_w2,
        workload="W2",
        tool=tool,
        rounds=ROUNDS_QUICK,
        tasks=len(SPEC),
    )
    if median is not None:
        benchmark.extra_info["us_per_task"] = median / len(SPEC) * 1e6
