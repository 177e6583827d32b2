"""Worker recycling, the pool's initializer and ``isolate=True`` (#18).

A worker keeps what tasks leave behind (environment, working directory,
module globals); ``max_calls_per_worker=`` replaces it after N calls,
``isolate=True`` gives one call a worker of its own, and an initializer sets
up every worker the pool starts. None of this may blame a node, lose a call
or loop: each test checks which process ran what.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import psutil
import pytest
from conftest import running

import graphexec as gx


@gx.task
def whoami(i):
    return os.getpid()


@gx.task
def step(trail):
    return [*trail, os.getpid()]


@gx.task
def leave_env(i):
    os.environ["GX_TEST_LEFT"] = "dirty"
    return os.getpid()


@gx.task
def read_env(i):
    return os.getpid(), os.environ.get("GX_TEST_LEFT")


@gx.task(isolate=True)
def alone(i):
    return os.getpid()


@gx.task
def init_env(i):
    return os.getpid(), os.environ.get("GX_TEST_INIT")


def set_init_env(tag):
    os.environ["GX_TEST_INIT"] = f"{tag}-{os.getpid()}"


def failing_init():
    raise ValueError("the database is not there")


def exiting_init(starts):
    # Ends its process instead of raising (a C extension's abort, os._exit).
    open(os.path.join(starts, str(os.getpid())), "w").close()
    os._exit(4)


def _first_time(path):
    """True in the first worker that asks only: a file marks that one did."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def exit_first_time(path):
    if _first_time(path):
        os._exit(4)


def fail_first_time(path):
    if _first_time(path):
        raise RuntimeError("transient start-up failure")


def succeed_first_time_only(path):
    if not _first_time(path):
        raise RuntimeError("only one worker may start")


def _assert_all_first_attempt(run):
    for node in run.nodes:
        state = run.state(node)
        assert state.is_completed(), state
        assert state.attempts == 1, state  # a recycle is nobody's failure


def test_compute_replaces_workers_after_max_calls_with_prefetch():
    # 300 tiny calls: the pool prefetches up to 64 per worker, which must never
    # exceed what a worker has left.
    graph = gx.Graph()
    with graph:
        nodes = [whoami(i) for i in range(300)]
    run = graph.compute(workers=2, max_calls_per_worker=5, keep="all")
    _assert_all_first_attempt(run)
    per_pid = Counter(run[n] for n in nodes)
    assert max(per_pid.values()) <= 5
    assert len(per_pid) >= 60


def test_chains_respect_the_count():
    graph = gx.Graph()
    with graph:
        trail = step([])
        for _ in range(19):
            trail = step(trail)
    run = graph.compute(workers=2, max_calls_per_worker=3)
    _assert_all_first_attempt(run)
    pids = run[trail]
    assert len(pids) == 20
    assert max(Counter(pids).values()) <= 3


def test_without_recycling_state_leaks_and_with_it_does_not():
    graph = gx.Graph()
    with graph:
        dirty = leave_env(0)
        reader = read_env(1, wait_for=[dirty])
    with gx.Pool(workers=1) as pool:
        run = graph.compute(pool=pool, keep="all")
        assert run[reader] == (run[dirty], "dirty")
    with gx.Pool(workers=1, max_calls_per_worker=1) as pool:
        assert pool.max_calls_per_worker == 1
        run = graph.compute(pool=pool, keep="all")
        pid, seen = run[reader]
        assert seen is None and pid != run[dirty]


def test_a_warm_pool_recycles_across_computes():
    with gx.Pool(workers=1, max_calls_per_worker=2) as pool:
        pids = []
        for i in range(5):
            graph = gx.Graph()
            with graph:
                node = whoami(i)
            pids.append(graph.compute(pool=pool)[node])
        assert Counter(pids).most_common(1)[0][1] == 2
        assert len(set(pids)) == 3
        gone = [pid for pid in pids[:-1] if pid != pids[-1]]
        deadline = time.monotonic() + 5
        while any(psutil.pid_exists(p) for p in gone) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in gone if running(p)]  # retired workers were reaped


def test_initializer_runs_in_every_worker_recycled_ones_too():
    graph = gx.Graph()
    with graph:
        nodes = [init_env(i) for i in range(12)]
    with gx.Pool(
        workers=2, max_calls_per_worker=2, initializer=set_init_env, initargs=("ready",)
    ) as pool:
        run = graph.compute(pool=pool, keep="all")
    _assert_all_first_attempt(run)
    results = [run[n] for n in nodes]
    assert len({pid for pid, _ in results}) >= 6
    for pid, value in results:
        assert value == f"ready-{pid}"


def test_a_failing_initializer_fails_the_calls_once_and_for_all():
    graph = gx.Graph()
    with graph:
        nodes = [whoami(i) for i in range(4)]
    started = time.monotonic()
    with gx.Pool(workers=2, initializer=failing_init) as pool:
        run = graph.compute(pool=pool, raise_on_failure=False)
        for node in nodes:
            error = run.state(node).exception
            assert isinstance(error, gx.WorkerCrashed)
            assert "initializer failing_init failed in 3 worker processes" in str(error)
            assert "create a new Pool" in str(error)
            assert isinstance(error.__cause__, ValueError)
            assert "the database is not there" in str(error.__cause__)
        # The pool gave up: a later compute fails at once, starting nothing.
        again = gx.Graph()
        with again:
            late = whoami(9)
        with pytest.raises(gx.GraphFailed):
            again.compute(pool=pool)
        assert isinstance(again._latest_run.state(late).exception, gx.WorkerCrashed)
        assert not pool._workers
    assert time.monotonic() - started < 30  # bounded: no retry loop


def test_an_initializer_that_ends_its_process_fails_the_calls_once_and_for_all(tmp_path):
    # It never says "initfail": its death before "ready" is the initializer's failure,
    # not a crash of the call it was sent (that blamed every call on its task and
    # started a worker per call, without the INIT_ATTEMPTS bound).
    graph = gx.Graph()
    with graph:
        nodes = [whoami(i) for i in range(20)]
    with gx.Pool(workers=2, initializer=exiting_init, initargs=(str(tmp_path),)) as pool:
        run = graph.compute(pool=pool, raise_on_failure=False)
    assert len(os.listdir(tmp_path)) <= 2 + 3  # not one per call: INIT_ATTEMPTS in a row
    for node in nodes:
        error = run.state(node).exception
        assert isinstance(error, gx.WorkerCrashed)
        assert "initializer exiting_init failed in 3 worker processes" in str(error)
        assert isinstance(error.__cause__, gx.WorkerCrashed)
        assert "ended its worker process before returning (exit code 4" in str(error.__cause__)


@pytest.mark.parametrize("initializer", [fail_first_time, exit_first_time], ids=["raises", "exits"])
def test_an_initializer_that_fails_once_costs_no_node(tmp_path, initializer):
    graph = gx.Graph()
    with graph:
        nodes = [whoami(i) for i in range(4)]
    marker = str(tmp_path / "ran")
    with gx.Pool(workers=2, initializer=initializer, initargs=(marker,)) as pool:
        run = graph.compute(pool=pool, keep="all")
    _assert_all_first_attempt(run)
    assert all(isinstance(run[n], int) for n in nodes)
    assert os.path.exists(marker)


@pytest.mark.timeout(60)
def test_a_broken_pool_keeps_its_live_workers_but_cannot_isolate(tmp_path):
    marker = str(tmp_path / "started")
    graph = gx.Graph()
    with graph:
        nodes = [whoami(i) for i in range(6)]
    with gx.Pool(workers=2, initializer=succeed_first_time_only, initargs=(marker,)) as pool:
        # The second worker never starts; the first one runs everything.
        run = graph.compute(pool=pool, keep="all")
        _assert_all_first_attempt(run)
        assert len({run[n] for n in nodes}) == 1
        # A fresh worker is what an isolated call needs: it fails at once, no wait.
        lone = gx.Graph()
        with lone:
            node = alone(0)
        run = lone.compute(pool=pool, raise_on_failure=False)
        error = run.state(node).exception
        assert isinstance(error, gx.WorkerCrashed)
        assert isinstance(error.__cause__, RuntimeError)


def test_isolated_calls_get_a_fresh_worker_each_discarded_after():
    graph = gx.Graph()
    with graph:
        shared = [whoami(i) for i in range(6)]
        isolated = [alone(i) for i in range(4)]
    with gx.Pool(workers=2) as pool:
        run = graph.compute(pool=pool, keep="all")
        _assert_all_first_attempt(run)
        lone = [run[n] for n in isolated]
        assert len(set(lone)) == 4
        assert not set(lone) & {run[n] for n in shared}
        deadline = time.monotonic() + 5
        while any(running(p) for p in lone) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in lone if running(p)]
        assert not set(lone) & {w.pid for w in pool._workers.values()}


@gx.task(isolate=True)
def crashes_alone(x):
    os._exit(9)


def test_an_isolated_calls_crash_advises_replay_not_the_sync_scheduler():
    # sync refuses isolate=True: its advice could not be followed.
    graph = gx.Graph()
    with graph:
        node = crashes_alone(0)
    run = graph.compute(workers=1, raise_on_failure=False)
    error = run.state(node).exception
    assert isinstance(error, gx.WorkerCrashed)
    assert "scheduler='sync'" not in str(error) and "run.replay" in str(error)


@pytest.mark.parametrize("scheduler", ["threads", "sync"])
def test_isolate_is_refused_where_calls_cannot_get_a_process(scheduler):
    graph = gx.Graph()
    with graph:
        node = alone(1)
        other = whoami(2)
    run = graph.compute(scheduler=scheduler, workers=1, raise_on_failure=False)
    error = run.state(node).exception
    assert isinstance(error, ValueError)
    assert "isolate=True" in str(error) and "scheduler='processes'" in str(error)
    assert run.state(other).is_completed()


def test_isolate_must_be_a_bool():
    with pytest.raises(TypeError, match="isolate= must be True or False"):
        gx.task(isolate=1)(lambda: None)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "3"])
def test_max_calls_per_worker_is_validated(bad):
    with pytest.raises(ValueError, match="max_calls_per_worker="):
        gx.Pool(workers=1, max_calls_per_worker=bad)
    graph = gx.Graph()
    with graph:
        whoami(0)
    with pytest.raises(ValueError, match="max_calls_per_worker="):
        graph.compute(workers=1, max_calls_per_worker=bad)


def test_max_calls_per_worker_belongs_to_the_pool_and_to_processes(pool):
    graph = gx.Graph()
    with graph:
        whoami(0)
    with pytest.raises(ValueError, match=r"gx.Pool\(max_calls_per_worker=...\)"):
        graph.compute(pool=pool, max_calls_per_worker=3)
    with pytest.raises(ValueError, match="recycles worker processes"):
        graph.compute(scheduler="threads", max_calls_per_worker=3)


def test_initializer_arguments_are_checked_at_once():
    with pytest.raises(TypeError, match="initializer= must be callable"):
        gx.Pool(workers=1, initializer="not a function")
    with pytest.raises(TypeError, match="cannot be pickled"):
        gx.Pool(workers=1, initializer=set_init_env, initargs=(_Unpicklable(),))


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("no pickling")
