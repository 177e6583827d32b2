"""W5 failures: 1,000 tasks, every 10th raising, each with one dependent.

Every tool must end with 900 completed, 100 failed and 100 skipped calls
(graphexec computes with ``raise_on_failure=False`` and its states are read
with ``run.state(node).name``). dask's processes scheduler raises at the first
error and reports no states, so it is not timed here.
"""

import pytest

from . import workloads as w
from .conftest import ROUNDS_QUICK, TIMEOUT, measure

pytestmark = [pytest.mark.benchmark(group="W5"), pytest.mark.timeout(TIMEOUT)]

SPEC = w.w5_spec()


def test_w5(benchmark, tool, runner):
    if tool == "dask-processes":
        pytest.skip("dask's processes scheduler raises at the first error: no states")
    measure(
        benchmark,
        lambda: runner(SPEC, states=True),
        w.check_w5,
        workload="W5",
        tool=tool,
        rounds=ROUNDS_QUICK,
        tasks=len(SPEC),
    )
