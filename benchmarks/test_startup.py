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

    measure(benchmark, fn, check, workload="startup", tool="graphexec-cold", rounds=ROUNDS_HEAVY)


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
