"""The cost of ``compute(run_dir=...)`` (issue #13): the run's record written as it goes.

W1 at 2,000 no-op tasks (and one sum), the case where a per-node cost shows
most, side by side in one session:

* ``ppe``                — the same calls on ``ProcessPoolExecutor(max_workers=2)``
                           with the hand-written driver of ``workloads.run_executor``;
* ``graphexec-warm``     — ``graph.compute(pool=pool)`` on the warm pool: the anchor;
* ``graphexec-run_dir``  — the same with ``run_dir=`` a new directory each round
                           (the journal writes every node's start and end).

Building the graph is inside the timed region, as in the other benchmarks.
``extra_info["parent_cpu_s_median"]`` is the CPU time of this process (all its
threads: the scheduler's, the journal's) per round, which a busy machine
disturbs less than wall time.

Run: ``python -m pytest benchmarks/test_run_dir.py --benchmark-only -p no:cacheprovider``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest

import graphexec as gx

from . import workloads as w
from .conftest import TIMEOUT, measure

N_TASKS = 2_000
ROUNDS = 15
VARIANTS = ("ppe", "graphexec-warm", "graphexec-run_dir")

pytestmark = [pytest.mark.benchmark(group="run_dir"), pytest.mark.timeout(TIMEOUT)]

SPEC = w.w1_spec(N_TASKS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_run_dir(benchmark, request, tmp_path, variant):
    dirs = (tmp_path / f"run-{k}" for k in itertools.count())
    run: Callable[[], Any]
    if variant == "ppe":
        executor = request.getfixturevalue("ppe")

        def run() -> Any:
            return w.run_executor(executor, SPEC)

    else:
        pool: gx.Pool = request.getfixturevalue("gx_pool")
        record = variant == "graphexec-run_dir"

        def run() -> Any:
            kw = {"run_dir": next(dirs)} if record else {}
            return w.run_graphexec(SPEC, pool=pool, **kw)

    cpu: list[float] = []

    def timed() -> Any:
        before = time.process_time()
        out = run()
        cpu.append(time.process_time() - before)
        return out

    measure(
        benchmark,
        timed,
        lambda out: w.check_w1(out, N_TASKS),
        workload="run_dir",
        tool=variant,
        rounds=ROUNDS,
        tasks=N_TASKS,
    )
    benchmark.extra_info["parent_cpu_s_median"] = sorted(cpu)[len(cpu) // 2]
    if variant == "graphexec-run_dir":  # the record of the last round reads back whole
        last = sorted(tmp_path.glob("run-*"), key=lambda p: int(p.name[4:]))[-1]
        assert gx.Run.load(last).counts() == {"Completed": N_TASKS + 1}
