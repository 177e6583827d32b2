"""Ctrl-C and a killed parent: nothing finished is lost, nothing is left running (#4).

Each test runs a script in its own Python process (a real SIGINT, a real
SIGKILL) and watches it from outside: the script prints marker lines when it
reaches the interesting moment, the test sends the signal, and both sides
check the outcome — the script its run's states and its child processes, the
test the worker pids it was told about.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from conftest import reap, running

import graphexec as gx


@gx.task
def noop(x):
    return x


INTERRUPTED = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    import psutil
    import graphexec as gx

    @gx.task
    def big():
        return np.ones(1_000_000)  # 8 MB: crosses workers through /dev/shm

    @gx.task
    def fast(i):
        return i * 10

    @gx.task
    def announce(values):
        print("FAST-DONE", flush=True)
        return sum(values)

    @gx.task
    def sleeper(i, array):
        sys.stdout.write(f"SLEEPING {i} {os.getpid()}\\n")  # one write: threads may race
        sys.stdout.flush()
        time.sleep(60)
        return i

    @gx.task
    def after(x):
        return x

    @gx.task(retries=3, retry_delay=60)
    def flaky():
        raise ValueError("fails, then waits a minute before its retry")

    def workers():
        me = os.getpid()
        found = []
        for p in psutil.Process().children(recursive=True):
            try:
                line = " ".join(p.cmdline())
                spare = p.name() == "gx-spare" and (p.parent().name() == "gx-zygote"
                                                    or "forkserver" in line)
                if p.status() == psutil.STATUS_ZOMBIE or spare or (
                        p.ppid() == me and ("forkserver" in line or "resource_tracker" in line
                                            or p.name() == "gx-zygote")):
                    continue
            except psutil.Error:
                continue
            found.append(p.pid)
        return found

    mode = sys.argv[1]
    graph = gx.Graph()
    with graph:
        waiting = flaky()
        fasts = [fast(i) for i in range(4)]
        done = announce(fasts)
        array = big()
        sleepers = [sleeper(i, array, wait_for=[done]) for i in range(3)]
        tails = [after(s) for s in sleepers]

    def report(exc, pool_workers=()):
        caught = time.monotonic()
        run = exc.run
        deadline = caught + 2.0
        while set(workers()) - set(pool_workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        print("RESULT " + json.dumps({
            "states": {n.name: run.state(n).name for n in run.nodes},
            "values": {n.name: run[n] for n in run.completed if n is not array},
            "attempts": {n.name: run.state(n).attempts for n in run.nodes},
            "messages": sorted({str(run.state(n).exception) for n in run.nodes
                                if run.state(n).name == "Cancelled"}),
            "left": sorted(set(workers()) - set(pool_workers)),
            "cleanup": time.monotonic() - caught,
            "same_run": exc.run is graph._latest_run,
            "ok": run.ok,
            "headline": run.summary().splitlines()[0],
            "shm": sorted(n for n in os.listdir("/dev/shm")
                          if n.startswith(f"gx-{os.getpid()}-")),
        }), flush=True)

    if mode == "pool":
        with gx.Pool(workers=2) as pool:
            try:
                graph.compute(pool=pool, keep="all")
            except KeyboardInterrupt as exc:
                report(exc, pool_workers=[w.pid for w in pool._workers.values()])
            small = gx.Graph()
            with small:
                node = after(41)
            print("AGAIN", small.compute(pool=pool)[node], flush=True)
    else:
        kw = {"workers": 2} if mode == "processes" else {"scheduler": mode, "workers": 2}
        try:
            graph.compute(keep="all", **kw)
        except KeyboardInterrupt as exc:
            report(exc)
        else:
            print("RESULT none: compute returned", flush=True)
    """
)


class _Output:
    """The lines a script prints, read by a thread so that no wait can block forever."""

    def __init__(self, proc):
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; output so far: {self.lines}"
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(5)
                raise AssertionError(
                    f"the script ended early: {self.lines}\n{self.proc.stderr.read()[-3000:]}"
                )
            self.lines.append(line)


def _gone(pid):
    return not running(pid)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "target"),
    [
        ("processes", "pid"),
        ("processes", "group"),  # what a terminal's Ctrl-C does: the whole foreground group
        ("pool", "group"),
        ("sync", "pid"),
        ("threads", "pid"),
    ],
)
def test_ctrl_c_cancels_what_is_pending_keeps_what_is_done_and_stops_workers(
    tmp_path, mode, target
):
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        output = _Output(proc)
        sleepers = 1 if mode == "sync" else 2

        def ready(lines):
            return (
                any("FAST-DONE" in x for x in lines)
                and sum(x.count("SLEEPING") for x in lines) == sleepers
            )

        output.wait_for(ready, 30)
        sleeping_pids = [int(p) for x in output.lines for p in re.findall(r"SLEEPING \d+ (\d+)", x)]
        interrupted = time.monotonic()
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        output.wait_for(lambda lines: lines[-1].startswith("RESULT"), 15)
        reported = time.monotonic() - interrupted
        proc.wait(15)
        err = proc.stderr.read()
        output.wait_for(lambda lines: mode != "pool" or lines[-1].startswith("AGAIN"), 15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    (result,) = [json.loads(x[len("RESULT ") :]) for x in output.lines if x.startswith("RESULT")]
    states = result["states"]
    expected = {f"fast-{i}": "Completed" for i in range(4)}
    expected["announce-0"] = "Completed"
    expected["big-0"] = "Completed"
    expected.update({f"sleeper-{i}": "Cancelled" for i in range(3)})
    expected.update({f"after-{i}": "Cancelled" for i in range(3)})
    expected["flaky-0"] = "Cancelled"  # waiting out its retry delay
    assert states == expected
    assert result["values"] == {**{f"fast-{i}": 10 * i for i in range(4)}, "announce-0": 60}
    assert result["attempts"]["flaky-0"] == 1
    assert result["messages"] and all("interrupted (Ctrl-C)" in m for m in result["messages"])
    assert result["same_run"]
    # The run did not end: never "ok", though no node failed.
    assert result["ok"] is False
    assert "cancelled by Ctrl-C" in result["headline"], result["headline"]
    assert result["shm"] == [], "shared memory left behind after Ctrl-C"
    if mode in ("processes", "pool"):
        assert result["left"] == [], "workers still running after Ctrl-C"
        assert result["cleanup"] < 2.0
        assert reported < 5.0
        for pid in sleeping_pids:
            assert _gone(pid), f"worker {pid} survived Ctrl-C"
    if mode == "pool":  # the warm pool went on working
        assert output.lines[-1] == "AGAIN 41"


KILLED = textwrap.dedent(
    """
    import os, re, subprocess, sys, time
    import graphexec as gx

    @gx.task
    def hold(i, how):
        child = subprocess.Popen(["sleep", "600"])
        print(f"HOLDING {os.getpid()} {child.pid}", flush=True)
        if how == "gil":  # a catastrophic regex: C code that holds the GIL for hours
            re.match(r"(a+)+$", "a" * 60 + "b")
        time.sleep(600)

    graph = gx.Graph()
    with graph:
        nodes = [hold(i, sys.argv[2]) for i in range(2)]
    graph.compute(workers=2, start_method=sys.argv[1])
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("start_method", "how"),
    [
        ("zygote", "sleep"),
        ("forkserver", "sleep"),
        ("spawn", "sleep"),
        # The worker's own watchdog thread cannot run: only the guard, which
        # each worker tells its pid itself, first thing (the pool learns a
        # forkserver worker's pid only when it next polls), kills it.
        ("zygote", "gil"),
        ("forkserver", "gil"),
        ("spawn", "gil"),
    ],
)
def test_a_killed_parent_leaves_no_process_behind(tmp_path, start_method, how):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    proc = subprocess.Popen(
        [sys.executable, str(script), start_method, how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pids: set[int] = set()
    try:
        output = _Output(proc)
        output.wait_for(lambda lines: sum("HOLDING" in x for x in lines) == 2, 30)
        pids = {int(p) for x in output.lines if "HOLDING" in x for p in x.split()[-2:]}
        # Everything the script started: workers, their subprocesses, forkserver,
        # resource tracker.
        pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        guards = _guards_of(proc.pid)
        assert guards, "the pool should have its guard"
        pids |= set(guards)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5.0
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = sorted(p for p in pids if not _gone(p))
    finally:
        reap(proc)
        for pid in pids:  # whatever survived: do not let it outlive the test
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes outlived their killed parent by 5 s: {left}"
    assert len(pids) >= 4


FORGOTTEN = textwrap.dedent(
    """
    import os, sys
    import graphexec as gx

    @gx.task
    def pid_of(i):
        return os.getpid()

    pool = gx.Pool(workers=2)
    graph = gx.Graph()
    with graph:
        nodes = [pid_of(i) for i in range(4)]
    run = graph.compute(pool=pool, keep="all")
    print("PIDS", *sorted({run[n] for n in nodes}), flush=True)
    if sys.argv[1] == "interrupted-close":
        # A second Ctrl-C lands while close() asks the first worker to stop.
        worker = next(iter(pool._workers.values()))

        class Interrupted:
            def __init__(self, conn):
                self.conn = conn

            def send_bytes(self, data):
                worker.conn = self.conn
                raise KeyboardInterrupt

            def __getattr__(self, name):
                return getattr(self.conn, name)

        worker.conn = Interrupted(worker.conn)
        try:
            pool.close()
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
    # and the script ends without closing the pool (again)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["forgotten", "interrupted-close"])
def test_a_pool_left_open_does_not_hang_the_exit_or_leave_workers(tmp_path, how):
    script = tmp_path / "forgotten.py"
    script.write_text(FORGOTTEN)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script), how], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 15
    lines = done.stdout.splitlines()
    assert ("INTERRUPTED" in lines) == (how == "interrupted-close")
    pids = [int(p) for p in lines[0].split()[1:]]
    assert pids
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids)


def _guards_of(pid, pool=None):
    """The guard processes of ``pid``'s pools (of its pool ``pool``)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if (
            "graphexec-guard" in args
            and f"gx-{pid}-" in args
            and (pool is None or f"pool-{pool.id}" in args)
        ):
            found.append(proc.pid)
    return found


@pytest.mark.timeout(30)
def test_the_pools_guard_leaves_with_the_pool():
    graph = gx.Graph()
    with graph:
        node = noop(1)
    with gx.Pool(workers=1) as pool:
        graph.compute(pool=pool)
        assert _guards_of(os.getpid(), pool), "a running pool has a guard"
    deadline = time.monotonic() + 3
    while _guards_of(os.getpid(), pool) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _guards_of(os.getpid(), pool) == []
    assert node.result() == 1


@gx.task
def nap(seconds):
    time.sleep(seconds)
    return seconds


@pytest.mark.timeout(30)
def test_the_shell_that_starts_the_guard_is_reaped_while_the_pool_lives():
    # It forks the guard and exits at once; the pool reaps it at a poll, so a
    # warm pool between runs has no exited child of this process waiting.
    graph = gx.Graph()
    with graph:
        nap(0.3)
    with gx.Pool(workers=1) as pool:
        graph.compute(pool=pool)
        assert _guards_of(os.getpid(), pool)
        zombies = [
            child.pid
            for child in psutil.Process().children()
            if child.status() == psutil.STATUS_ZOMBIE
        ]
        assert zombies == []


FORKED = textwrap.dedent(
    """
    import os
    import graphexec as gx

    @gx.task
    def pid_of(i):
        return os.getpid()

    pool = gx.Pool(workers=2)
    graph = gx.Graph()
    with graph:
        nodes = [pid_of(i) for i in range(4)]
    before = {graph.compute(pool=pool, keep="all")[n] for n in nodes}
    if os.fork() == 0:
        raise SystemExit(0)  # a forked copy (a pre-fork server's child) exits normally
    os.wait()
    run = graph.compute(pool=pool, keep="all")
    print("RESULT", [run.state(n).name for n in nodes], {run[n] for n in nodes} == before)
    pool.close()
    """
)


@pytest.mark.timeout(60)
def test_a_forked_copy_of_the_parent_does_not_stop_its_pool(tmp_path):
    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        done.stdout.splitlines()[-1] == "RESULT ['Completed', 'Completed', "
        "'Completed', 'Completed'] True"
    )


@gx.task
def _naps(i):
    time.sleep(0.3)
    return i


@pytest.mark.timeout(60)
@pytest.mark.parametrize("watched", [False, True])
def test_ctrl_c_while_the_workers_start_cancels_every_node_and_carries_the_run(
    monkeypatch, tmp_path, watched
):
    # Ctrl-C landing in the pool's start (the guard's shell, a fork) came out bare:
    # no .run, no node Cancelled; the worker started meanwhile is stopped too.
    from graphexec._executors import process

    real_start = process._Guard.start
    fired = []

    def interrupted(self):
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt
        return real_start(self)

    monkeypatch.setattr(process._Guard, "start", interrupted)
    graph = gx.Graph()
    with graph:
        [_naps(i) for i in range(6)]
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}  # (the zygote, a tracker)
    # watched: a run's record and an observer (what a progress bar is) see it too
    seen: list[str] = []

    class Seen(gx.Observer):
        def on_start(self, run):
            seen.append("start")

        def on_node_finish(self, node, state):
            seen.append(state.name)

    options = {"run_dir": tmp_path / "rec", "observers": [Seen()]} if watched else {}
    with pytest.raises(KeyboardInterrupt) as info:
        graph.compute(workers=2, **options)
    run = info.value.run
    assert run.counts() == {"Cancelled": 6}
    if watched:
        assert seen == ["start"] + ["Cancelled"] * 6
        assert gx.Run.load(tmp_path / "rec").counts() == {"Cancelled": 6}
    assert "cancelled by Ctrl-C" in run.summary()

    _assert_no_new_workers(me, before)


def _assert_no_new_workers(me, before):
    """Within 5 s, no process of ``me``'s tree is left that ``before`` did not hold
    but the servers (the zygote, its spares and multiprocessing's tracker stay: per
    process)."""

    def is_server(p):
        return p.name() == "gx-zygote" or any(
            word in " ".join(p.cmdline()) for word in ("resource_tracker", "forkserver_main")
        )

    def new_ones():
        found = []
        for p in me.children(recursive=True):
            try:
                # a spare: a server's child that is no pool's yet
                server = is_server(p) or (p.name() == "gx-spare" and is_server(p.parent()))
                if p.pid not in before and not server and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    deadline = time.monotonic() + 5
    while new_ones() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not new_ones()


def _stopped_during_the_hooks(how: signal.Signals):
    def late_stop(task, run, state):
        time.sleep(0.3)  # the run is over: compute waits for this hook
        os.kill(os.getpid(), how)
        time.sleep(3)

    return late_stop


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_while_compute_waits_for_hooks_stops_its_workers(how):
    # The hooks' wait came after the run's signal handling: a Ctrl-C there left the
    # compute's own workers running for the rest of the process, without .run, and
    # a SIGTERM there killed the process.
    @gx.task(on_failure=[_stopped_during_the_hooks(how)])
    def fails():
        raise ValueError("overnight")

    graph = gx.Graph()
    with graph:
        fails()
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}  # (the zygote, a tracker)
    # (graphexec handles SIGTERM only where nobody else does: a library imported by
    # an earlier test of this session, Ray's driver, may have set its own)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            graph.compute(workers=2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.run.counts() == {"Failed": 1}
    _assert_no_new_workers(me, before)


@gx.task
def _boom():
    raise ValueError("overnight")


@gx.task
def _long_nap():
    time.sleep(20)


@gx.task(trigger="always")
def _cleanup(*values):
    return "cleaned"


def test_after_ctrl_c_an_always_node_that_never_ran_handles_no_failure():
    # Ctrl-C cancels "always" nodes too (fail_fast does not): cleanup never runs, so
    # boom's failure stays unhandled; it was counted as handled. And the attempt
    # Ctrl-C cut short is not a success.
    class InterruptAfterBoom(gx.Observer):
        def on_node_finish(self, node, state):
            if node.name.startswith("_boom"):
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()

    graph = gx.Graph()
    with graph:
        boom, nap = _boom(), _long_nap()
        cleanup = _cleanup(boom, nap)
    with pytest.raises(KeyboardInterrupt) as info:
        graph.compute(workers=2, observers=[InterruptAfterBoom()])
    run = info.value.run
    assert run.state(cleanup).name == "Cancelled" and not run.state(cleanup).history
    assert run.unhandled == [boom]
    assert "(handled)" not in run.summary()
    (attempt,) = run.state(nap).history
    assert isinstance(attempt.error, gx.Cancelled), attempt
