"""W3 CPU efficiency: 40 pure-Python tasks of ~100 ms each.

The loop count is calibrated once per session so that one task takes about
0.1 s here; the serial reference is timed once before the benchmarks
(``w3_reference`` in conftest.py).
Parallel efficiency = serial time / (workers x time) goes to ``extra_info``
(the report recomputes it from the medians of the same run).

``test_w3_floor``: the floor, two warm processes each running a fixed half of
the tasks with nothing between them, taking turns with serial and graphexec
(cold and warm): the efficiency no scheduler can beat here. On the 2-CPU
development machine two bare processes reached 83-95 % of the serial run's
speed in a quiet script: two busy CPUs of a virtual machine (perhaps two
threads of one core) run pure Python slower than one alone; so the report
reads graphexec against the floor too.
"""

import statistics

import pytest

from . import workloads as w
from .conftest import (
    ROUNDS_HEAVY,
    TIMEOUT,
    cpu_snapshot,
    cpu_window,
    measure,
    record,
    take_turns,
)

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


# W3 against its floor, the tools taking turns round by round (as in W7), so that
# the machine's drift over the module (its speed moved W3 by 20 % from one
# minute to the next) lands on all of them alike.
FLOOR_TURNS = 5
IN_TURNS = ("serial", "floor", "graphexec-cold", "graphexec-warm")


@pytest.fixture(scope="module")
def floor_turns(w3_reference, gx_pool):
    """Seconds of each round of each tool of IN_TURNS, taking turns."""
    spec, expected, _ = w3_reference
    floor = w.w3_floor()
    runners = {
        "serial": w.run_serial,
        "floor": lambda spec: w.run_w3_floor(floor, spec),
        "graphexec-cold": lambda spec: w.run_graphexec(spec, workers=w.WORKERS),
        "graphexec-warm": lambda spec: w.run_graphexec(spec, pool=gx_pool),
    }
    before = cpu_snapshot()
    try:
        times = take_turns(runners, spec, lambda out: w.check_w3(out, expected), FLOOR_TURNS)
    finally:
        floor.close()
    return times, cpu_window(before)


@pytest.mark.parametrize("tool", IN_TURNS)
def test_w3_floor(benchmark, tool, floor_turns):
    """W3 beside its floor: two warm processes, a fixed half of the tasks each."""
    all_times, window = floor_turns
    times = all_times[tool]
    median = record(
        benchmark,
        times,
        workload="W3-turns",
        tool=tool,
        tasks=w.W3_TASKS,
        in_turns=True,
        turn_times=times,
        **window,
    )
    if median is not None and tool != "serial":
        serial = statistics.median(all_times["serial"])
        benchmark.extra_info["efficiency"] = serial / (w.WORKERS * median)
