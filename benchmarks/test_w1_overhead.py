"""W1 overhead: 5,000 independent no-op tasks and one sum over them."""

import pytest

from . import workloads as w
from .conftest import ROUNDS_LIGHT, TIMEOUT, measure

pytestmark = [pytest.mark.benchmark(group="W1"), pytest.mark.timeout(TIMEOUT)]

SPEC = w.w1_spec()


def test_w1(benchmark, tool, runner):
    median = measure(
        benchmark,
        lambda: runner(SPEC),
        w.check_w1,
        workload="W1",
        tool=tool,
        rounds=ROUNDS_LIGHT,
        tasks=len(SPEC),
    )
    if median is not None:
        benchmark.extra_info["us_per_task"] = median / len(SPEC) * 1e6
