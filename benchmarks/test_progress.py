"""The progress bar's cost (#14): W1 on the warm pool with the bar off and on.

docs/guide/observing.md said "about 1 µs per node (5,000 no-op tasks: 3 %
slower, within noise)"; that figure came with the README of d8bfbac, from a
measurement no benchmark kept. This is that benchmark: W1 (5,000 no-op tasks
and a sum) on graphexec's warm pool, ``progress=False`` against
``progress=True`` (the tqdm bar, drawn to this process's stderr, which pytest
captures to a file; a terminal costs its own drawing on top), and
``progress=None`` with logger ``graphexec`` at INFO: the unattended progress
line a batch job gets.

The variants run in turns, round by round, in one test, so that a burst of
load from other programs lands on all of them alike; each variant's median
goes into its own benchmark entry (``conftest.record``). The report shows
the bar's median over the bar-less one.
"""

from __future__ import annotations

import gc
import logging
import time

import pytest

from . import workloads as w
from .conftest import TIMEOUT, cpu_snapshot, cpu_window, record

pytestmark = [pytest.mark.benchmark(group="progress"), pytest.mark.timeout(TIMEOUT)]

SPEC = w.w1_spec()
ROUNDS = 11
VARIANTS = {"off": False, "bar": True, "log-line": None}


@pytest.fixture(scope="module")
def interleaved(gx_pool):
    """Seconds of each round of each variant, the variants taking turns."""
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    logger = logging.getLogger("graphexec")
    level = logger.level
    before = cpu_snapshot()
    try:
        for _ in range(ROUNDS):
            for variant, progress in VARIANTS.items():
                logger.setLevel(logging.INFO if variant == "log-line" else level)
                gc.collect()
                start = time.perf_counter()
                out = w.run_graphexec(SPEC, pool=gx_pool, progress=progress)
                times[variant].append(time.perf_counter() - start)
                w.check_w1(out)
    finally:
        logger.setLevel(level)
    return times, cpu_window(before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_progress_cost(benchmark, interleaved, variant):
    times, window = interleaved
    median = record(
        benchmark, times[variant], workload="progress", tool=variant, tasks=len(SPEC), **window
    )
    if median is not None:
        benchmark.extra_info["us_per_task"] = median / len(SPEC) * 1e6
