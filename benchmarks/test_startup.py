"""Start-up: create a pool of 2 workers, run 8 tiny tasks on it, shut it down.

Ray's is ``ray.init(num_cpus=2)``, the 8 tasks, ``ray.shutdown()`` (#14).

graphexec's cold numbers in W1-W5 include this; the other pools' numbers
exclude it (their pools are session fixtures), so it is reported on its own.
"""

import concurrent.futures
import logging

import pytest

import graphexec as gx

from . import workloads as w
from .conftest import ROUNDS_HEAVY, TIMEOUT, measure

pytestmark = [pytest.mark.benchmark(group="startup"), pytest.mark.timeout(TIMEOUT)]

SPEC = w.w3_spec(20_000, 8)  # 8 tasks of ~1.5 ms: both workers start
EXPECTED = [w.spin(20_000, i) for i in range(8)]


def check(out):
    w.check_w3(out, EXPECTED)


def test_startup_graphexec(benchmark):
    def fn():
        pool = gx.Pool(workers=w.WORKERS)
        try:
            return w.run_graphexec(SPEC, pool=pool)
        finally:
            pool.close()

    measure(
        benchmark,
        fn,
        check,
        workload="startup",
        tool="graphexec-cold",
        rounds=ROUNDS_HEAVY,
    )


# The first result of a new pool, after a pause: a program works between two
# computes (loads data, writes results), as scripts and notebooks do.
# graphexec's zygote forks workers ahead when a pool's workers exit (zygote.py's
# spares), so such a pool starts on them; back to back, as above, the next pool
# may ask before they are ready.
PAUSE = 0.1
ROUNDS_PAUSED = 21  # about 10 ms each: noisy


def test_first_result_after_a_pause_graphexec(benchmark):
    def fn():
        graph = gx.Graph()
        with graph:
            node = gx.task(w.inc)(1)
        return graph.compute(workers=w.WORKERS)[node]

    _after_a_pause(benchmark, fn, "graphexec-cold")


def test_first_result_after_a_pause_ppe(benchmark):
    def fn():
        with concurrent.futures.ProcessPoolExecutor(max_workers=w.WORKERS) as ex:
            return ex.submit(w.inc, 1).result()

    _after_a_pause(benchmark, fn, "ppe")


def _after_a_pause(benchmark, fn, tool):
    measure(
        benchmark,
        fn,
        _is_two,
        workload="startup-paused",
        tool=tool,
        rounds=ROUNDS_PAUSED,
        pause=PAUSE,
    )


def _is_two(value):
    assert value == 2


@pytest.mark.parametrize("tool", ["ppe", "loky"])
def test_startup_executor(benchmark, tool):
    if tool == "loky":
        make = pytest.importorskip("loky").ProcessPoolExecutor
    else:
        make = concurrent.futures.ProcessPoolExecutor

    def fn():
        with make(max_workers=w.WORKERS) as ex:
            return w.run_executor(ex, SPEC)

    measure(benchmark, fn, check, workload="startup", tool=tool, rounds=ROUNDS_HEAVY)


def test_startup_distributed(benchmark):
    distributed = pytest.importorskip("distributed")

    def fn():
        with (
            distributed.LocalCluster(
                n_workers=w.WORKERS,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            distributed.Client(cluster) as c,
        ):
            return w.run_distributed(c, SPEC)

    measure(benchmark, fn, check, workload="startup", tool="dask-distributed", rounds=ROUNDS_HEAVY)


def test_startup_ray(benchmark):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray)")

    def fn():
        w.ray_init(w.WORKERS)
        try:
            return w.run_ray(SPEC)
        finally:
            ray.shutdown()

    measure(benchmark, fn, check, workload="startup", tool="ray", rounds=ROUNDS_HEAVY)
