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
