"""SIGTERM while a compute runs is handled like Ctrl-C, then ends the process by SIGTERM (#18).

Batch systems, ``docker stop`` and Kubernetes send SIGTERM before SIGKILL.
Each test runs a script in its own Python process, waits until both of its
long tasks are running, sends the real signal and checks from outside: the
exit status, the file the script wrote in its ``except`` block (what
finished, what was cancelled and why), and that no worker survived.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import running

from graphexec._surfaces.signals import Terminated, sigterm_as_interrupt

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import graphexec as gx

    @gx.task
    def fast(i):
        return i * 10

    @gx.task
    def slow(i, inputs):
        sys.stdout.write(f"SLOW {os.getpid()}\\n")
        sys.stdout.flush()
        time.sleep(60)
        return i

    mode, out = sys.argv[1], sys.argv[2]
    if mode == "user-handler":
        def mine(signum, frame):
            with open(out, "w") as f:
                f.write("the user's handler ran")
            sys.exit(3)
        signal.signal(signal.SIGTERM, mine)

    graph = gx.Graph()
    with graph:
        fasts = [fast(i) for i in range(3)]
        slows = [slow(i, fasts) for i in range(2)]

    try:
        graph.compute(workers=2, keep="all")
    except KeyboardInterrupt as exc:
        run = exc.run
        with open(out, "w") as f:
            json.dump({
                "type": type(exc).__name__,
                "states": {n.name: run.state(n).name for n in run.nodes},
                "values": {n.name: run[n] for n in run.completed},
                "why": sorted({str(run.state(n).exception) for n in run.nodes
                               if run.state(n).name == "Cancelled"}),
                "ok": run.ok,
                "headline": run.summary().splitlines()[0],
                "json_ok": json.loads(run.to_json())["ok"],
            }, f)
        if mode == "caught":
            print("CAUGHT, carrying on", flush=True)
            sys.exit(0)
        if mode == "second":
            print("CLEANING-UP", flush=True)
            time.sleep(60)  # a slow cleanup the second SIGTERM cuts short
        raise
    """
)


def _start(mode, out):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, mode, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _wait_for_workers(proc):
    """Read the script's output until both slow tasks run; their workers' pids."""
    pids = []
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(rb"SLOW (\d+)", line)
        if found:
            pids.append(int(found.group(1)))
            if len(pids) == 2:
                return pids
    raise AssertionError(f"the script ended early: {proc.stderr.read().decode()}")


def _none_alive(pids, within=5.0):
    deadline = time.monotonic() + within
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not [p for p in pids if running(p)]


def _finish(proc, timeout=30):
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err.decode()


@pytest.mark.timeout(90)
def test_sigterm_cancels_keeps_what_finished_and_dies_of_sigterm(tmp_path):
    out = tmp_path / "out.json"
    proc = _start("default", out)
    workers = _wait_for_workers(proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == -signal.SIGTERM, err
    assert time.monotonic() - sent < 15  # the run record is written in seconds
    assert "Terminated" in err  # the traceback, as for an uncaught Ctrl-C
    report = json.loads(out.read_text())
    assert report["type"] == "Terminated"
    assert report["values"] == {"fast-0": 0, "fast-1": 10, "fast-2": 20}
    assert report["states"]["slow-0"] == report["states"]["slow-1"] == "Cancelled"
    assert any("SIGTERM" in why for why in report["why"]), report["why"]
    # The run did not end: never "ok", though no node failed.
    assert report["ok"] is False and report["json_ok"] is False
    assert "cancelled by SIGTERM" in report["headline"], report["headline"]
    assert _none_alive(workers)


@pytest.mark.timeout(90)
def test_a_program_that_catches_it_decides_how_to_end(tmp_path):
    out = tmp_path / "out.json"
    proc = _start("caught", out)
    workers = _wait_for_workers(proc)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 0, err
    assert json.loads(out.read_text())["type"] == "Terminated"
    assert _none_alive(workers)


@pytest.mark.timeout(90)
def test_a_handler_the_program_installed_is_left_alone(tmp_path):
    out = tmp_path / "out.txt"
    proc = _start("user-handler", out)
    workers = _wait_for_workers(proc)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 3, err  # its sys.exit(3): not turned into anything else
    assert out.read_text() == "the user's handler ran"
    assert _none_alive(workers)  # SystemExit went through compute's cleanup


@pytest.mark.timeout(90)
def test_a_second_sigterm_ends_the_process_at_once_without_orphans(tmp_path):
    out = tmp_path / "out.json"
    proc = _start("second", out)
    workers = _wait_for_workers(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    for line in proc.stdout:
        if b"CLEANING-UP" in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == -signal.SIGTERM, err
    assert time.monotonic() - sent < 5  # not after the script's 60 s cleanup
    assert _none_alive(workers)


def test_the_handler_is_installed_only_in_the_main_thread_over_the_default():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with sigterm_as_interrupt():
        assert callable(signal.getsignal(signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    seen = []

    def in_thread():
        with sigterm_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_terminated_is_a_keyboard_interrupt():
    # Code written for Ctrl-C (`except KeyboardInterrupt as e: e.run`) handles it.
    assert issubclass(Terminated, KeyboardInterrupt)
    assert Terminated.signum == signal.SIGTERM


EAGER_SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    import graphexec as gx

    @gx.task
    def slow(i):
        # a descendant that leaves the worker's process group, as a task's tool may
        child = subprocess.Popen(["sleep", "60"], start_new_session=True)
        sys.stdout.write(f"SLOW {os.getpid()} {child.pid}\\n")
        sys.stdout.flush()
        time.sleep(60)
        return i

    if sys.argv[1] == "flow":
        @gx.flow(workers=2)
        def body():
            return [f.result() for f in [slow.submit(0), slow.submit(1)]]
        body()
    else:
        with gx.Pool(workers=2):
            [f.result() for f in [slow.submit(0), slow.submit(1)]]
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["flow", "pool-block"])
def test_sigterm_in_an_eager_session_ends_the_process_and_leaves_no_worker_behind(mode):
    # There SIGTERM keeps its default (docs/guide/schedulers.md): the process ends at
    # once, and the pool's guard stops the workers and their descendants.
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", EAGER_SCRIPT, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    pids = []
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(rb"SLOW (\d+) (\d+)", line)
        if found:
            pids += [int(found.group(1)), int(found.group(2))]
            if len(pids) == 4:
                break
    assert len(pids) == 4, _finish(proc)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == -signal.SIGTERM, err
    assert _none_alive(pids), [p for p in pids if running(p)]
