"""No escaped descendants: a task's subprocess that left the worker's session (#18).

Each task here starts a "daemon" that calls ``os.setsid()`` — out of the
worker's process group, so a group kill cannot reach it — and waits until it
has. Whichever way its worker ends (killed for a timeout, retired after
``max_calls_per_worker``, stopped by ``pool.close()``, or orphaned by a parent
that was SIGKILLed), the daemon must be gone too. What stays out of reach (a
double fork that re-parented to init before graphexec looked) is documented in
docs/guide/schedulers.md, not tested.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import reap, running

import graphexec as gx

DAEMON = (
    "import os, sys, time; os.setsid(); "
    "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
)


def start_daemon(path):
    """Start a process in a session of its own; return its pid once it is there."""
    subprocess.Popen([sys.executable, "-c", DAEMON, path])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                text = f.read()
            if text:
                pid = int(text)
                # It really left the worker's session and group: a group kill misses it.
                assert os.getsid(pid) == pid and os.getpgid(pid) == pid
                return pid
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise RuntimeError("the daemon did not start")


@gx.task
def daemonize(path):
    return start_daemon(path)


@gx.task(timeout=1.0)
def daemonize_and_hang(path):
    start_daemon(path)
    time.sleep(60)


def _gone_soon(pid, within=5.0):
    deadline = time.monotonic() + within
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not running(pid)


def _read_pid(path):
    with open(path) as f:
        return int(f.read())


@pytest.fixture
def daemons():
    """Pids to kill at the end whatever happens: a failed test must not leak them."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_a_timeout_kill_takes_the_daemon_too(tmp_path, daemons):
    path = str(tmp_path / "pid")
    graph = gx.Graph()
    with graph:
        node = daemonize_and_hang(path)
    with gx.Pool(workers=1) as pool:
        run = graph.compute(pool=pool, raise_on_failure=False)
        assert isinstance(run.state(node).exception, gx.TaskTimeout)
        pid = _read_pid(path)
        daemons.append(pid)
        assert _gone_soon(pid)


def test_a_recycled_worker_takes_its_daemon(tmp_path, daemons):
    graph = gx.Graph()
    with graph:
        node = daemonize(str(tmp_path / "pid"))
    with gx.Pool(workers=1, max_calls_per_worker=1) as pool:
        pid = graph.compute(pool=pool)[node]
        daemons.append(pid)
        assert _gone_soon(pid)  # the pool is still open: the retirement did it


def test_closing_the_pool_takes_the_daemon(tmp_path, daemons):
    graph = gx.Graph()
    with graph:
        node = daemonize(str(tmp_path / "pid"))
    with gx.Pool(workers=1) as pool:
        pid = graph.compute(pool=pool)[node]
        daemons.append(pid)
        time.sleep(0.2)
        assert running(pid)  # a warm worker keeps what its tasks started
    assert _gone_soon(pid)


def test_a_compute_without_pool_takes_the_daemon(tmp_path, daemons):
    graph = gx.Graph()
    with graph:
        node = daemonize(str(tmp_path / "pid"))
    pid = graph.compute(workers=1)[node]
    daemons.append(pid)
    assert _gone_soon(pid)


ORPHANED = textwrap.dedent(
    """
    import sys, time
    import graphexec as gx
    sys.path.insert(0, sys.argv[2])
    from test_descendants import start_daemon

    @gx.task
    def daemonize_and_wait(path):
        start_daemon(path)
        print("DAEMON-UP", flush=True)
        time.sleep(60)

    graph = gx.Graph()
    with graph:
        daemonize_and_wait(sys.argv[1])
    graph.compute(workers=1)
    """
)


@pytest.mark.timeout(60)
def test_a_sigkilled_parent_leaves_no_daemon(tmp_path, daemons):
    # The guard lists the workers' descendants before it kills their groups.
    path = str(tmp_path / "pid")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", ORPHANED, path, os.path.dirname(__file__)],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"DAEMON-UP" in line:
                break
        pid = _read_pid(path)
        daemons.append(pid)
        workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.kill()
        proc.wait(10)
        assert _gone_soon(pid, within=10)
        for worker in workers:
            assert _gone_soon(worker, within=10)
    finally:
        reap(proc)


@gx.task
def background_job():
    # A shell's background job: the shell exits at once, so the job is no longer
    # the worker's descendant (init adopts it), but it is still in its group.
    out = subprocess.run(
        ["/bin/sh", "-c", "sleep 120 >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def test_a_compute_without_pool_takes_a_job_left_in_the_workers_group(daemons):
    # Nobody joins a cold compute's workers: each kills its group as its last act.
    graph = gx.Graph()
    with graph:
        node = background_job()
    pid = graph.compute(workers=1)[node]
    daemons.append(pid)
    assert _gone_soon(pid)


def _mark(path):
    with open(path, "w") as f:
        f.write("exited")


@gx.task
def register_exit_hook(path):
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _mark, args=(path,), exitpriority=0)
    return os.getpid()


def test_a_compute_without_pool_lets_its_workers_run_their_exit_hooks(tmp_path):
    # (coverage.py saves a subprocess's data from such a hook)
    path = tmp_path / "mark"
    graph = gx.Graph()
    with graph:
        node = register_exit_hook(str(path))
    pid = graph.compute(workers=1)[node]
    assert _gone_soon(pid)
    assert path.read_text() == "exited"
