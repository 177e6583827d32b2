"""W4 numpy data plane: 32 x (make a 16 MB float64 array → sort → sum) → one total."""

import pytest

from . import workloads as w
from .conftest import ROUNDS_HEAVY, TIMEOUT, measure

pytestmark = [pytest.mark.benchmark(group="W4"), pytest.mark.timeout(TIMEOUT)]

SPEC = w.w4_spec()


def test_w4(benchmark, tool, runner):
    w.w4_expected()  # the reference total, computed before any timing
    measure(
        benchmark,
        lambda: runner(SPEC),
        w.check_w4,
        workload="W4",
        tool=tool,
        rounds=ROUNDS_HEAVY,
        tasks=len(SPEC),
    )


@pytest.fixture(scope="module")
def two_processes():
    floor = w.TwoProcesses()
    yield floor
    floor.close()


def test_w4_floor(benchmark, two_processes):
    """W4's floor: two warm processes, a fixed half each, only the sums sent back.

    The target "0.50 x serial" assumes two cores sort as fast together as one
    alone; they share memory bandwidth and caches, so this measures what two
    processes with nothing between them reach here, for the report to read
    graphexec against.
    """
    w.w4_expected()
    measure(
        benchmark,
        lambda: w.run_w4_floor(two_processes, SPEC),
        w.check_w4,
        workload="W4",
        tool="floor",
        rounds=ROUNDS_HEAVY,
        tasks=len(SPEC),
    )
