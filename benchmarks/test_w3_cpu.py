"""W3 CPU efficiency: 40 pure-Python tasks of ~100 ms each.

The loop count is calibrated once per session so that one task takes about
0.1 s here; the serial reference is timed once before the benchmarks
(``w3_reference`` in conftest.py).
Parallel efficiency = serial time / (workers x time) goes to ``extra_info``
(the report recomputes it from the medians of the same run).
"""

import pytest

from . import workloads as w
from .conftest import ROUNDS_HEAVY, TIMEOUT, measure

pytestmark = [pytest.mark.benchmark(group="W3"), pytest.mark.timeout(TIMEOUT)]


def test_w3(benchmark, tool, runner, w3_reference):
    spec, expected, serial = w3_reference
    median = measure(
        benchmark,
        lambda: runner(spec),
        lambda out: w.check_w3(out, expected),
        workload="W3",
        tool=tool,
        rounds=ROUNDS_HEAVY,
        tasks=len(spec),
        serial_reference_s=serial,
    )
    if median is not None:
        benchmark.extra_info["efficiency"] = serial / (w.WORKERS * median)
