"""Threads of native libraries inside workers: BLAS, OpenMP, numexpr (#14).

Each worker limits them by default to cores // workers; ``inner_threads=`` on
a Pool or a compute sets another count, the task option of the same name
limits one task's calls, and a variable the user set in the environment is
passed on unless a count was given. Every test asks the worker itself: the
variables it sees, and what OpenBLAS says through threadpoolctl.

Only the ``*_NUM_THREADS`` family is changed here (in this process, restored
by monkeypatch); the OpenBLAS variables the machines set (OPENBLAS_CORETYPE,
OPENBLAS_L2_SIZE) are never touched.
"""

from __future__ import annotations

import os
import sys
import time

import numpy  # loaded here, so forkserver and fork workers start with it
import pytest
import threadpoolctl

import graphexec as gx
from graphexec._executors import machine, threadlimits
from graphexec._executors.machine import usable_cores
from graphexec._executors.threadlimits import THREAD_VARS, automatic


def _openblas_threads() -> int | None:
    for lib in threadpoolctl.threadpool_info():
        if lib["internal_api"] == "openblas":
            return lib["num_threads"]
    return None


@gx.task
def report(i=0):
    """What this worker's libraries may start: its variables and OpenBLAS's count."""
    loaded_before = "numpy" in sys.modules
    numpy.zeros(1)  # OpenBLAS is numpy's (this module imports it wherever it loads)
    return {
        "env": {var: os.environ.get(var) for var in THREAD_VARS},
        "openblas": _openblas_threads(),
        "numpy_preloaded": loaded_before,
        "pid": os.getpid(),
    }


@gx.task(inner_threads=1)
def report_one(i=0):
    return report.fn(i)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This process's environment without any of the thread-count variables."""
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _reports(graph_size: int = 2, **options) -> list[dict]:
    g = gx.Graph()
    with g:
        nodes = [report(i) for i in range(graph_size)]
    run = g.compute(progress=False, **options)
    return [run[n] for n in nodes]


@pytest.mark.parametrize("start_method", ["forkserver", "spawn", "fork"])
def test_workers_limit_their_libraries_to_cores_over_workers(clean_env, start_method):
    """numpy already loaded (forkserver preload, fork: threadpoolctl acts) or loaded
    after the worker set the variables (spawn: this module, the task's, imports it)."""
    expected = automatic(2)
    for r in _reports(workers=2, start_method=start_method):
        assert r["env"] == dict.fromkeys(THREAD_VARS, str(expected))
        assert r["openblas"] == expected
    if start_method == "fork":  # the threadpoolctl path: the library was loaded before
        assert r["numpy_preloaded"]


def _openblas_pthreads_stoppable() -> bool:
    """numpy's OpenBLAS runs its own pthreads pool and exports the call that stops it."""
    import ctypes

    from graphexec._executors.threadlimits import _OPENBLAS_SHUTDOWN

    for lib in threadpoolctl.threadpool_info():
        if lib["internal_api"] == "openblas" and lib.get("threading_layer") == "pthreads":
            dynlib = ctypes.CDLL(lib["filepath"])
            return any(hasattr(dynlib, name) for name in _OPENBLAS_SHUTDOWN)
    return False


@gx.task
def threads_here(n=0):
    """OS threads of this worker beside its Python threads, before and after an
    ``n`` x ``n`` matrix product (0: none), and the CPU time it used meanwhile."""
    import threading
    import time

    def native() -> int:
        return len(os.listdir("/proc/self/task")) - threading.active_count()

    before, cpu = native(), time.process_time()
    time.sleep(0.2)  # a spinning thread would use most of this
    idle_cpu = time.process_time() - cpu
    if n:
        a = numpy.ones((n, n))
        assert float((a @ a)[0, 0]) == n
    return {
        "before": before,
        "idle_cpu": idle_cpu,
        "after": native(),
        "openblas": _openblas_threads(),
    }


needs_stoppable_openblas = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _openblas_pthreads_stoppable(),
    reason="needs /proc and numpy's OpenBLAS on its own pthreads pool",
)


def _run_without_openblas_threads(pool: gx.Pool, task: gx.Task, openblas: int) -> None:
    """Two calls of ``task`` (``threads_here``) on ``pool``: each saw OpenBLAS at
    ``openblas`` threads, no native thread beside its Python ones, no CPU idle."""
    g = gx.Graph()
    with g:
        nodes = [task() for _ in range(2)]
    run = g.compute(pool=pool, progress=False)
    for node in nodes:
        r = run[node]
        assert r["openblas"] == openblas
        assert r["before"] == 0, r  # only the worker's own Python threads
        assert r["idle_cpu"] < 0.05, r


@needs_stoppable_openblas
@pytest.mark.parametrize("start_method", ["forkserver", "zygote", "fork"])
def test_a_starting_worker_runs_no_idle_openblas_thread(clean_env, start_method):
    """Limiting OpenBLAS in a forked worker restarts its pool, whose threads then
    spin for about 0.1 s of CPU each: the worker stops them again at once."""
    with gx.Pool(2, start_method=start_method) as pool:
        _run_without_openblas_threads(pool, threads_here, automatic(2))


@needs_stoppable_openblas
@pytest.mark.parametrize("start_method", ["forkserver", "zygote"])
def test_a_task_limited_to_its_workers_count_starts_no_openblas_thread(clean_env, start_method):
    """``inner_threads=1`` on a worker at one thread already changes nothing: setting
    OpenBLAS's count, to the same value too, restarted the pool the worker had
    stopped, and its thread spun for about 0.1 s of CPU."""
    limited = threads_here.with_options(inner_threads=1)
    with gx.Pool(2, inner_threads=1, start_method=start_method) as pool:
        for _ in range(2):  # the first call of each worker, then the next ones
            _run_without_openblas_threads(pool, limited, 1)


@needs_stoppable_openblas
def test_a_worker_allowed_two_threads_keeps_its_openblas_threads(clean_env):
    """Only a count of 1 stops the pool: with more, products use it."""
    with gx.Pool(1, inner_threads=2, start_method="zygote") as pool:
        g = gx.Graph()
        with g:
            node = threads_here(600)
        r = g.compute(pool=pool, progress=False)[node]
    assert r["openblas"] == 2
    assert r["before"] >= 1, r
    assert r["after"] >= 1, r


def test_the_zygotes_probe_of_libraries_serves_one_worker_only(clean_env, monkeypatch):
    """A process forked from a worker later (a task's own pool) may have loaded
    other libraries since: it probes them itself."""

    asked = []

    class Probe:
        def select(self, **kwargs):
            asked.append(kwargs)
            return threadpoolctl.ThreadpoolController().select(internal_api="none")

    monkeypatch.setattr(threadlimits, "_probed", Probe())
    clean_env.setenv("OPENBLAS_NUM_THREADS", "1")  # (put back after the test)
    threadlimits.apply_in_worker({"OPENBLAS_NUM_THREADS": "1"})  # (selects nothing)
    assert asked  # the probe was used...
    assert threadlimits._probed is None  # ...and is gone for whatever forks from here


def test_the_parents_own_libraries_are_not_limited(clean_env):
    before = _openblas_threads()
    _reports(workers=2)
    assert _openblas_threads() == before


def test_pool_inner_threads_sets_the_count_and_overrides_the_environment(clean_env):
    clean_env.setenv("OPENBLAS_NUM_THREADS", "7")
    with gx.Pool(2, inner_threads=3) as pool:
        assert pool.inner_threads == 3
        for r in _reports(pool=pool):
            assert r["env"] == dict.fromkeys(THREAD_VARS, "3")
            assert r["openblas"] == 3


@pytest.mark.parametrize("start_method", ["forkserver", "fork"])
def test_a_variable_the_user_set_is_respected(clean_env, start_method):
    mine = automatic(1) + 1  # differs from what graphexec would choose
    clean_env.setenv("OPENBLAS_NUM_THREADS", str(mine))
    with gx.Pool(1, start_method=start_method) as pool:
        assert pool.inner_threads == automatic(1)
        (r,) = _reports(1, pool=pool)
    assert r["env"]["OPENBLAS_NUM_THREADS"] == str(mine)
    assert r["openblas"] == mine
    others = {k: v for k, v in r["env"].items() if k != "OPENBLAS_NUM_THREADS"}
    assert others == dict.fromkeys(others, str(automatic(1)))


def test_compute_inner_threads_applies_to_its_own_workers(clean_env):
    for r in _reports(workers=2, inner_threads=2):
        assert r["openblas"] == 2
        assert r["env"]["OMP_NUM_THREADS"] == "2"


def test_task_option_limits_its_calls_and_restores_after(clean_env):
    with gx.Pool(1, inner_threads=2) as pool:
        g = gx.Graph()
        with g:
            a = report(0)
            b = report_one(1, wait_for=[a])
            c = report(2, wait_for=[b])
        run = g.compute(pool=pool, progress=False, keep="all")
    assert run[a]["pid"] == run[b]["pid"] == run[c]["pid"]  # one worker ran all three
    assert run[a]["openblas"] == 2
    assert run[b]["openblas"] == 1
    assert run[c]["openblas"] == 2  # put back after the limited call


def test_task_option_in_process_restores_this_process(clean_env):
    before = _openblas_threads()
    g = gx.Graph()
    with g:
        b = report_one(1)
    run = g.compute(scheduler="sync", progress=False)
    assert run[b]["openblas"] == 1
    assert _openblas_threads() == before


@gx.task(inner_threads=1)
def blas_on_this_thread():
    import threading

    return threading.current_thread().name, _openblas_threads()


def test_task_option_limits_calls_on_every_thread_of_the_threads_scheduler():
    """threadpoolctl lets one thread at a time set OpenBLAS's count: a limit that did
    not let go of that control left the calls on the other threads unlimited."""
    if _openblas_threads() in (None, 1):
        pytest.skip("this process's OpenBLAS runs one thread already: no limit to see")
    g = gx.Graph()
    with g:
        nodes = [blas_on_this_thread()]
        for _ in range(7):
            nodes.append(blas_on_this_thread(wait_for=[nodes[-1]]))
    run = g.compute(scheduler="threads", workers=2, progress=False, keep="all")
    seen = [run[n] for n in nodes]
    assert [count for _, count in seen] == [1] * len(seen), seen


def test_task_option_keeps_a_failure_on_its_node():
    @gx.task(inner_threads=1)
    def boom():
        raise ValueError("bad input")

    g = gx.Graph()
    with g:
        node = boom()
    run = g.compute(workers=1, raise_on_failure=False, progress=False)
    assert isinstance(run.state(node).exception, ValueError)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_counts_are_refused_everywhere(bad):
    g = gx.Graph()
    with pytest.raises(ValueError, match="inner_threads"):
        gx.Pool(1, inner_threads=bad)
    with pytest.raises(ValueError, match="inner_threads"):
        g.compute(workers=1, inner_threads=bad)
    with pytest.raises(ValueError, match="inner_threads"):
        gx.task(inner_threads=bad)(lambda: 1)


def test_inner_threads_is_refused_where_it_cannot_act():
    g = gx.Graph()
    with gx.Pool(1) as pool, pytest.raises(ValueError, match=r"gx.Pool\(inner_threads"):
        g.compute(pool=pool, inner_threads=1)
    with pytest.raises(ValueError, match="runs in this process"):
        g.compute(scheduler="threads", inner_threads=1)

    @gx.flow(workers=1, progress=False)
    def inside():
        with pytest.raises(ValueError, match=r"give inner_threads to @gx.flow"):
            g.compute(inner_threads=1)
        return True

    assert inside()


def test_usable_cores_is_what_the_process_may_run_on(monkeypatch):
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(machine, "cgroup_cpu_quota", lambda: None)
    assert usable_cores() == 4  # a SLURM job's 4 cores of a larger node
    monkeypatch.setattr(machine, "cgroup_cpu_quota", lambda: 2.5)
    assert usable_cores() == 3  # a quota of 2.5 CPUs: 3 workers share it
    monkeypatch.setattr(machine, "cgroup_cpu_quota", lambda: 16.0)
    assert usable_cores() == 4  # the smaller of the two
    monkeypatch.setattr(machine, "cgroup_cpu_quota", lambda: 0.2)
    assert usable_cores() == 1


def _tree(tmp_path, proc_lines, files):
    proc = tmp_path / "cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(proc), str(tmp_path / "fs")


@pytest.mark.parametrize(
    ("proc_lines", "files", "quota"),
    [
        # cgroup v2, the limit on the process's own group
        (["0::/job/step"], {"job/step/cpu.max": "150000 100000\n"}, 1.5),
        # ... on a parent's (a parent's limit applies to its children): the smallest
        (["0::/job/step"], {"job/cpu.max": "200000 100000", "job/step/cpu.max": "max 100000"}, 2.0),
        # a container: its group is "/" in its own namespace
        (["0::/"], {"cpu.max": "400000 100000"}, 4.0),
        (["0::/"], {"cpu.max": "max 100000"}, None),
        # a hybrid system: the v2 hierarchy under unified/
        (["1:cpu:/", "0::/"], {"unified/cpu.max": "50000 100000"}, 0.5),
        # cgroup v1
        (
            ["4:memory:/x", "3:cpu,cpuacct:/docker/abc"],
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
            },
            3.0,
        ),
        (
            ["2:cpu:/"],
            {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
            None,
        ),
        # nothing readable: no limit
        (["0::/gone"], {}, None),
        (["0::/"], {"cpu.max": "garbage"}, None),
    ],
)
def test_cgroup_cpu_quota_reads_v1_and_v2_limits(tmp_path, proc_lines, files, quota):
    proc, root = _tree(tmp_path, proc_lines, files)
    assert machine.cgroup_cpu_quota(proc, root) == quota
    assert machine.cgroup_cpu_quota(str(tmp_path / "no-such-file"), root) is None


def test_flow_inner_threads_applies_to_its_workers(clean_env):
    @gx.flow(workers=1, inner_threads=2, progress=False)
    def body():
        return report.submit(0).result()

    r = body()
    assert r["openblas"] == 2
    assert r["env"]["NUMEXPR_NUM_THREADS"] == "2"


@pytest.mark.parametrize(
    ("proc_lines", "files", "limit"),
    [
        (["0::/job"], {"job/memory.max": "4294967296\n"}, 4 * 2**30),
        (["0::/job/step"], {"job/memory.max": "max", "job/step/memory.max": "1073741824"}, 2**30),
        (["0::/"], {"memory.max": "max"}, None),
        (["5:memory:/docker/abc"], {"memory/docker/abc/memory.limit_in_bytes": "536870912"}, 2**29),
        (["5:memory:/"], {"memory/memory.limit_in_bytes": "9223372036854771712"}, None),
        (["0::/gone"], {}, None),
    ],
)
def test_cgroup_memory_limit_reads_v1_and_v2_limits(tmp_path, proc_lines, files, limit):
    proc, root = _tree(tmp_path, proc_lines, files)
    assert machine.cgroup_memory_limit(proc, root) == limit


def test_a_cgroup_limit_changed_under_a_running_process_is_read_again(tmp_path, monkeypatch):
    # Kubernetes resizes a pod in place, systemctl set-property a unit's quota: the
    # pool is sized by what holds now, not what held at the first compute (read at
    # most every FRESH_FOR seconds: every compute asks).
    proc, root = _tree(tmp_path, ["0::/job"], {"job/cpu.max": "200000 100000"})
    assert machine.cgroup_cpu_quota(proc, root) == 2.0
    (tmp_path / "fs" / "job" / "cpu.max").write_text("100000 100000")
    assert machine.cgroup_cpu_quota(proc, root) == 2.0  # within FRESH_FOR: kept
    later = time.monotonic() + machine.FRESH_FOR + 1
    monkeypatch.setattr(machine.time, "monotonic", lambda: later)
    assert machine.cgroup_cpu_quota(proc, root) == 1.0


def test_a_malformed_cgroup_line_is_skipped(tmp_path):
    proc, root = _tree(tmp_path, ["garbage", "0::/job"], {"job/cpu.max": "150000 100000"})
    assert machine.cgroup_cpu_quota(proc, root) == 1.5
