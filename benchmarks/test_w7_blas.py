"""W7 BLAS (#14): 16 independent products of two 1500 x 1500 float64 matrices.

The question is threads inside workers. numpy's BLAS starts one thread per
core in every process: serial numpy in this process uses every core by
itself, and a pool of 2 workers that does not limit them runs 2 x cores
threads on the cores. graphexec (like joblib/loky, dask.distributed's nanny
and Ray) limits each worker to cores // workers threads; ``ProcessPoolExecutor``
and loky's bare executor do not, and dask's processes scheduler neither.

Tools: those of the other workloads, plus ``joblib``
(``joblib.Parallel(n_jobs=2)``, its loky backend; its reusable executor is
started before timing, as the session pools are). ``serial`` runs the 16
products in this process, its BLAS using every core.

Each round takes seconds of full cores, so load from other programs moves it
a lot: the tools that keep no runtime of their own running (serial,
ProcessPoolExecutor, loky, joblib, dask processes, graphexec cold and warm)
take turns, one round each per turn (``turns``), and each one's rounds are
reported as its benchmark (``conftest.record``); Ray and dask.distributed,
whose processes would idle beside the others' turns, run on their own
(``measure``) afterwards.

Fair numpy timing: some machines here set ``OPENBLAS_CORETYPE`` (and
``OPENBLAS_L2_SIZE``) for older OpenBLAS builds, which slows a current numpy;
unset both in the benchmark command alone (``env -u OPENBLAS_CORETYPE -u
OPENBLAS_L2_SIZE python -m pytest ...``) and check the kernel in
``extra_info["blas"]`` (threadpoolctl's ``architecture``). Never in tests or CI.
"""

import pytest

from . import workloads as w
from .conftest import ROUNDS_HEAVY, TIMEOUT, cpu_snapshot, cpu_window, measure, record, take_turns

pytestmark = [pytest.mark.benchmark(group="W7"), pytest.mark.timeout(TIMEOUT)]

SPEC = w.w7_spec()
# Turns: more than ROUNDS_HEAVY, for a median that a burst of load moves less.
TURNS = 5
IN_TURNS = (
    "serial",
    "ppe",
    "loky",
    "joblib",
    "dask-processes",
    "graphexec-cold",
    "graphexec-cold-forkserver",  # a numpy program's default
    "graphexec-warm",
)
ON_THEIR_OWN = ("ray", "dask-distributed")  # dask.distributed last, as everywhere


def _blas() -> dict:
    """This process's BLAS: library, threads, kernel (threadpoolctl), for the record."""
    import numpy  # noqa: F401 - loads the BLAS threadpoolctl reads
    import threadpoolctl

    for lib in threadpoolctl.threadpool_info():
        if lib["user_api"] == "blas":
            return {k: lib.get(k) for k in ("internal_api", "num_threads", "architecture")}
    return {}


def _runners(request) -> dict:
    runners = {}
    for tool in IN_TURNS:
        if tool == "joblib":
            joblib = pytest.importorskip("joblib")
            # Starts joblib's reusable loky executor (kept, as the other pools are)
            # and imports the workload module in its workers.
            warm = joblib.Parallel(n_jobs=w.WORKERS)(joblib.delayed(w.noop)(i) for i in range(8))
            assert warm == list(range(8))
            runners[tool] = w.run_joblib
        elif tool == "loky":
            try:
                runners[tool] = _runner_for(request, tool)
            except pytest.skip.Exception:  # loky not installed: the others still run
                continue
        else:
            runners[tool] = _runner_for(request, tool)
    return runners


def _runner_for(request, tool):
    ex = {"ppe": "ppe", "loky": "loky_ex"}.get(tool)
    if ex is not None:
        executor = request.getfixturevalue(ex)
        return lambda spec: w.run_executor(executor, spec)
    if tool == "serial":
        return w.run_serial
    if tool == "dask-processes":
        pytest.importorskip("dask")
        return w.run_dask_processes
    if tool == "graphexec-cold":
        return lambda spec: w.run_graphexec(spec, workers=w.WORKERS)
    if tool == "graphexec-cold-forkserver":
        return lambda spec: w.run_graphexec(spec, workers=w.WORKERS, start_method="forkserver")
    if tool == "graphexec-warm":
        pool = request.getfixturevalue("gx_pool")
        return lambda spec: w.run_graphexec(spec, pool=pool)
    raise AssertionError(tool)


@pytest.fixture(scope="module")
def turns(request):
    """Seconds of each round of each tool of IN_TURNS, the tools taking turns."""
    w.w7_expected()  # the reference values, computed before any timing
    runners = _runners(request)
    before = cpu_snapshot()
    times = take_turns(runners, SPEC, w.check_w7, TURNS)
    return times, cpu_window(before)


@pytest.mark.parametrize("tool", IN_TURNS)
def test_w7(benchmark, tool, turns):
    times, window = turns
    if tool not in times:
        pytest.skip(f"{tool} is not installed")
    record(
        benchmark,
        times[tool],
        workload="W7",
        tool=tool,
        tasks=len(SPEC),
        blas=_blas(),
        in_turns=True,
        turn_times=times[tool],  # the report pairs them turn by turn
        **window,
    )


@pytest.mark.parametrize("tool", ON_THEIR_OWN)
def test_w7_own_runtime(benchmark, tool, runner):
    w.w7_expected()
    measure(
        benchmark,
        lambda: runner(SPEC),
        w.check_w7,
        workload="W7",
        tool=tool,
        rounds=ROUNDS_HEAVY,
        tasks=len(SPEC),
        blas=_blas(),
        in_turns=False,
    )
