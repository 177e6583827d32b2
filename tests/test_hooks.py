"""Hooks and observers (issue #17): task and run hooks, gx.Observer, gx.observe().

Every hook and observer method on every backend; exactly once per event;
off the scheduler's thread (a slow hook delays no timeout); a raising hook
logged; compute() waiting for its hooks, within its bound; values held until
a node's hooks ran; observe() and threads; the unattended progress line; the
webhook example against a real local HTTP server.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

import graphexec as gx
from graphexec._engine import scheduler as scheduler_module
from graphexec._surfaces import compute as compute_module
from graphexec._surfaces.options import ComputeOptions

ROOT = Path(__file__).resolve().parent.parent


@gx.task
def square(x):
    return x * x


@gx.task
def explode(x):
    raise ValueError(f"bad {x}")


@gx.task
def nap(seconds):
    time.sleep(seconds)
    return seconds


class Recorder(gx.Observer):
    """Every event, with the thread it arrived on."""

    def __init__(self):
        self.events = []
        self.threads = set()

    def _note(self, *event):
        self.threads.add(threading.current_thread().name)
        self.events.append(event)

    def on_start(self, run):
        self._note("start", run.graph.name)

    def on_node_start(self, node, attempt):
        self._note("node_start", node.name, attempt)

    def on_node_retry(self, node, state):
        self._note("node_retry", node.name, state.name)

    def on_node_finish(self, node, state):
        self._note("node_finish", node.name, state.name)

    def on_finish(self, run):
        self._note("finish", run.ok)

    def of(self, node_name):
        return [e[0] for e in self.events if len(e) > 1 and e[1] == node_name]


def hook_log(log, label):
    """A task hook that records (label, node, state name, value or exception type)."""

    def hook(node, state):
        detail = state.result() if state.is_completed() else type(state.exception).__name__
        log.append((label, node.name, state.name, detail, threading.current_thread().name))

    return hook


# -- each hook and observer method, on each backend -------------------------------


@pytest.mark.every_backend
def test_task_hooks_and_observer_methods_fire_once_each(backend, compute):
    log = []
    flaky_calls = []

    def flaky_rule(exc):
        flaky_calls.append(exc)
        return True

    ok = square.with_options(on_completion=[hook_log(log, "completed")])
    bad = explode.with_options(
        retries=1,
        retry_on=flaky_rule,
        on_failure=[hook_log(log, "failed")],
        on_retry=[hook_log(log, "retry")],
        on_completion=[hook_log(log, "never")],
    )
    graph = gx.Graph("hooks")
    with graph:
        a = ok(3)
        b = ok(a)  # a's value is released once b has it: its hook still reads 9
        c = bad(1)
        d = ok(c)  # skipped: no task hook
    recorder = Recorder()
    run = compute(graph, b, d, observers=[recorder], raise_on_failure=False)

    main = threading.current_thread().name
    assert sorted(entry[:4] for entry in log) == [
        ("completed", a.name, "Completed", 9),
        ("completed", b.name, "Completed", 81),
        ("failed", c.name, "Failed", "ValueError"),
        ("retry", c.name, "Retrying", "ValueError"),
    ]
    assert {entry[4] for entry in log} == {"graphexec-hooks"}  # never the caller's thread
    assert recorder.threads == {"graphexec-hooks"} and main != "graphexec-hooks"
    assert recorder.events[0] == ("start", "hooks")
    assert recorder.events[-1] == ("finish", False)
    assert recorder.of(a.name) == ["node_start", "node_finish"]
    assert recorder.of(c.name) == ["node_start", "node_retry", "node_start", "node_finish"]
    assert [e for e in recorder.events if e[0] == "node_start" and e[1] == c.name] == [
        ("node_start", c.name, 1),
        ("node_start", c.name, 2),
    ]
    assert recorder.of(d.name) == ["node_finish"]  # never started; observers see Skipped
    assert ("node_finish", d.name, "Skipped") in recorder.events
    assert run.state(d).is_skipped()


@pytest.mark.every_backend
def test_run_hooks_completion_and_failure(backend, compute):
    calls = []
    graph = gx.Graph("run-hooks")
    with graph:
        square(2)
    run = compute(
        graph,
        on_completion=[lambda r: calls.append(("completion", r.ok))],
        on_failure=[lambda r: calls.append(("failure", r.ok))],
        on_cancellation=[lambda r: calls.append("cancellation")],
        on_crashed=[lambda r: calls.append("crashed")],
    )
    assert calls == [("completion", True)]
    assert run.ok

    calls.clear()
    bad_graph = gx.Graph("run-hooks-bad")
    with bad_graph:
        explode(1)
    with pytest.raises(gx.GraphFailed):
        compute(
            bad_graph,
            on_completion=[lambda r: calls.append("completion")],
            # Prefect's three-parameter form: (flow, flow_run, state)
            on_failure=[lambda flow, flow_run, state: calls.append((flow, flow_run.ok))],
        )
    assert calls == [(bad_graph, False)]


def test_prefect_run_hooks_read_the_flow_run_and_its_state_as_prefects_do(scheduler):
    # Prefect's notification hook, as its docs write it: flow_run.name, state.name,
    # state.message, state.is_failed(). The third argument was the Run again, and
    # such a hook raised AttributeError (logged only: nothing was notified).
    said = []

    def notify(flow, flow_run, state):
        said.append((flow.name, flow_run.name, state.name, state.is_failed(), state.message))

    options = {"workers": 0} if scheduler == "sync" else {"workers": 2}

    @gx.flow(on_failure=[notify], on_completion=[notify], **options)
    def nightly(fail):
        square(3)
        if fail:
            explode(1)

    nightly(False)
    with pytest.raises(ValueError):
        nightly(True)
    assert said[0] == ("nightly", "nightly", "Completed", False, "1 completed")
    flow, run_name, name, failed, message = said[1]
    assert (flow, run_name, name, failed) == ("nightly", "nightly", "Failed", True)
    assert "1 failed" in message and "first failure: explode-0 (ValueError: " in message

    said.clear()
    graph = gx.Graph("sweep")
    with graph:
        explode(2)
    graph.compute(on_failure=[notify], raise_on_failure=False, scheduler="sync")
    assert said[0][:4] == ("sweep", "sweep", "Failed", True)


def test_a_prefect_run_hooks_state_holds_what_the_flow_body_raised():
    said = []

    def notify(flow, flow_run, state):
        said.append((state.name, state.exception, state.message))

    @gx.flow(on_failure=[notify], workers=0)
    def body():
        square(2)
        raise RuntimeError("the body gave up")

    with pytest.raises(RuntimeError):
        body()
    ((name, exception, message),) = said
    assert name == "Failed"
    assert type(exception) is RuntimeError and str(exception) == "the body gave up"
    assert "1 completed" in message
    assert "the flow body raised RuntimeError: the body gave up" in message


def test_prefect_task_hook_signature():
    seen = []

    def prefect_style(task, task_run, state):
        seen.append((task.name, task_run is state, state.result()))

    graph = gx.Graph()
    with graph:
        square.with_options(on_completion=[prefect_style])(4)
    graph.compute(workers=0)
    assert seen == [("square", True, 16)]


def test_a_two_argument_hook_with_an_optional_third_is_not_prefect_style():
    # Parameters with a default are not counted: (node, state, note="x") was taken
    # for Prefect's (task, task_run, state) and got the Task as its node.
    seen = []

    def mine(node, state, note="x"):
        seen.append((type(node).__name__, node.name, state.result(), note))

    def prefect_style(task, task_run, state, *extra, flag=False):
        seen.append((type(task).__name__, task.name, state.result(), task_run is state))

    graph = gx.Graph()
    with graph:
        square.with_options(on_completion=[mine, prefect_style])(3)
    graph.compute(workers=0)
    assert seen == [("Node", "square-0", 9, "x"), ("Task", "square", 9, True)]


# -- exactly once -----------------------------------------------------------------


def test_cached_node_fires_on_completion_with_state_cached(tmp_path):
    log = []
    cached = square.with_options(cache=True, on_completion=[hook_log(log, "completed")])
    for _ in range(2):
        graph = gx.Graph()
        with graph:
            cached(5)
        graph.compute(workers=0, cache_dir=tmp_path)
    assert [entry[:4] for entry in log] == [
        ("completed", "square-0", "Completed", 25),
        ("completed", "square-0", "Cached", 25),
    ]


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_fail_fast_cancels_fire_no_task_hook_but_observers_and_on_cancellation(scheduler, pool):
    log = []
    calls = []
    graph = gx.Graph("ff")
    with graph:
        explode.with_options(on_failure=[hook_log(log, "failed")])(1)
        slow = [
            nap.with_options(on_completion=[hook_log(log, "x")], on_failure=[hook_log(log, "x")])(5)
            for _ in range(2)
        ]
    recorder = Recorder()
    kwargs = {"pool": pool} if scheduler == "processes" else {"scheduler": "threads", "workers": 3}
    start = time.monotonic()
    run = graph.compute(
        fail_fast=True,
        raise_on_failure=False,
        observers=[recorder],
        on_cancellation=[lambda r: calls.append("cancellation")],
        on_failure=[lambda r: calls.append("failure")],
        on_completion=[lambda r: calls.append("completion")],
        **kwargs,
    )
    assert time.monotonic() - start < 4  # the naps were cancelled, not waited for
    assert [entry[:3] for entry in log] == [("failed", "explode-0", "Failed")]
    for node in slow:
        assert run.state(node).is_cancelled()
        assert ("node_finish", node.name, "Cancelled") in recorder.events
    finishes = [e for e in recorder.events if e[0] == "node_finish"]
    assert len(finishes) == 3  # one per node
    assert calls == ["cancellation", "failure"]


def test_ctrl_c_ends_the_run_and_fires_on_cancellation():
    calls = []
    recorder = Recorder()

    @gx.task
    def interrupt():
        raise KeyboardInterrupt  # in the caller's thread (sync): what Ctrl-C does

    graph = gx.Graph()
    with graph:
        first = interrupt()
        after = square.with_options(on_completion=[hook_log(calls, "x")])(first)
    with pytest.raises(KeyboardInterrupt) as info:
        graph.compute(
            workers=0,
            observers=[recorder],
            on_cancellation=[lambda r: calls.append(("cancellation", len(r.cancelled)))],
            on_failure=[lambda r: calls.append("failure")],
        )
    assert calls == [("cancellation", 2)]
    assert info.value.run.state(after).is_cancelled()
    assert ("node_finish", after.name, "Cancelled") in recorder.events
    assert recorder.events[-1][0] == "finish"


def test_a_crash_inside_graphexec_fires_on_crashed(monkeypatch):
    calls = []

    def broken_step(self, idle_ok):
        raise RuntimeError("a bug in the scheduler")

    monkeypatch.setattr(scheduler_module.Scheduler, "_step", broken_step)
    graph = gx.Graph()
    with graph:
        nap(0.01)
    with pytest.raises(RuntimeError, match="a bug in the scheduler"):
        graph.compute(
            workers=0,
            on_crashed=[lambda r: calls.append("crashed")],
            on_failure=[lambda r: calls.append("failure")],
            on_completion=[lambda r: calls.append("completion")],
        )
    assert calls == ["crashed"]


# -- off the scheduler's thread; raising; waiting -----------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_a_slow_hook_delays_no_timeout(scheduler, pool):
    def slow_hook(node, state):
        time.sleep(3)

    graph = gx.Graph()
    with graph:
        square.with_options(on_completion=[slow_hook])(1)
        stuck = nap.with_options(timeout=1)(30)
    kwargs = {"pool": pool} if scheduler == "processes" else {"scheduler": "threads", "workers": 2}
    run = graph.compute(raise_on_failure=False, **kwargs)
    state = run.state(stuck)
    assert isinstance(state.exception, gx.TaskTimeout)
    # The attempt's own timing: stopped at its deadline while the hook slept on.
    assert state.history[-1].duration < 2.5


def test_a_raising_hook_is_logged_and_changes_nothing(caplog):
    def broken(node, state):
        raise ZeroDivisionError("hook bug")

    class BrokenObserver(gx.Observer):
        def on_node_finish(self, node, state):
            raise KeyError("observer bug")

    after = []
    graph = gx.Graph()
    with graph:
        a = square.with_options(on_completion=[broken])(3)
        b = square.with_options(on_completion=[lambda n, s: after.append(s.result())])(a)
    with caplog.at_level(logging.ERROR, logger="graphexec"):
        run = graph.compute(workers=0, observers=[BrokenObserver()])
    assert run.ok and run[b] == 81 and after == [81]
    records = [r for r in caplog.records if r.name == "graphexec"]
    assert any("on_completion hook broken of square-0 raised" in r.getMessage() for r in records)
    assert any("BrokenObserver.on_node_finish raised" in r.getMessage() for r in records)
    assert all(r.exc_info is not None for r in records)  # with the traceback
    assert "ZeroDivisionError: hook bug" in caplog.text


@pytest.mark.parametrize("method", ["on_start", "on_node_start", "on_node_finish", "on_finish"])
def test_every_observer_method_and_run_hook_that_raises_changes_nothing(caplog, method):
    def broken(*args):
        raise ZeroDivisionError(f"{method} bug")

    observer = type("Broken", (gx.Observer,), {method: broken})()
    run_hook_calls = []

    def run_hook(run):
        run_hook_calls.append(run.ok)
        raise KeyError("run hook bug")

    graph = gx.Graph()
    with graph:
        a = square(3)
        b = square(a)
    with caplog.at_level(logging.ERROR, logger="graphexec"):
        run = graph.compute(workers=0, observers=[observer], on_completion=[run_hook])
    assert run.ok and run[b] == 81 and run.counts() == {"Completed": 2}
    assert run_hook_calls == [True]
    records = [r for r in caplog.records if r.name == "graphexec"]
    assert any(f"Broken.{method} raised" in r.getMessage() for r in records)
    assert any("run_hook" in r.getMessage() and "raised" in r.getMessage() for r in records)
    assert all(r.exc_info is not None for r in records)


def test_compute_waits_for_its_hooks_before_returning():
    finished = []

    def slow(node, state):
        time.sleep(0.5)
        finished.append(node.name)

    graph = gx.Graph()
    with graph:
        [square.with_options(on_completion=[slow])(i) for i in range(3)]
    start = time.time()
    run = graph.compute(workers=0)
    assert finished == ["square-0", "square-1", "square-2"]
    # ...but the run's duration is its nodes', not the hooks' wait after them
    assert time.time() - start >= 1.4 and run.duration < 1.0


def test_the_wait_for_hooks_is_bounded(monkeypatch, caplog):
    monkeypatch.setenv("GRAPHEXEC_HOOK_WAIT", "0.3")
    release = threading.Event()

    def stuck(node, state):
        release.wait(10)

    graph = gx.Graph("bounded")
    with graph:
        [square.with_options(on_completion=[stuck])(i) for i in range(2)]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="graphexec"):
        run = graph.compute(workers=0)
    release.set()
    assert time.monotonic() - start < 3
    assert run.ok
    assert "hooks of bounded still running after 0.3 s" in caplog.text
    assert "abandoned" in caplog.text


@pytest.mark.parametrize("scheduler", ["sync", "processes"])
def test_a_released_value_is_held_until_its_hooks_ran(scheduler, pool, tmp_path):
    np = pytest.importorskip("numpy")
    seen = []
    done = tmp_path / "total-done"

    def late_reader(node, state):
        # The consumer finishes meanwhile (hooks run one after another, so a hook of
        # the consumer's could not say so): the value would be released.
        deadline = time.monotonic() + 5
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # its end reaches the scheduler, which would release the value
        seen.append(float(state.result().sum()))

    @gx.task
    def big(n):
        return np.ones(n)  # 1 MB: in shared memory with processes

    @gx.task
    def total(values, flag):
        Path(flag).touch()
        return float(values.sum())

    graph = gx.Graph()
    with graph:
        produced = big.with_options(on_completion=[late_reader])(125_000)
        result = total(produced, str(done))
    kwargs = {"pool": pool} if scheduler == "processes" else {"workers": 0}
    run = graph.compute(result, **kwargs)
    assert seen == [125_000.0] and run[result] == 125_000.0
    assert run.state(produced).released  # handed back once the hook ran


# -- observe() and threads ---------------------------------------------------------


def test_observe_applies_inside_the_block_and_not_to_other_threads():
    graph = gx.Graph("inside")
    with graph:
        square(1)
    other = gx.Graph("other")
    with other:
        square(2)
    inside, outer = Recorder(), Recorder()
    in_thread = []

    def compute_elsewhere():
        other.compute(workers=0)
        in_thread.append(True)

    with gx.observe(outer):
        with gx.observe(inside):
            thread = threading.Thread(target=compute_elsewhere)
            thread.start()
            thread.join()
            graph.compute(workers=0)
        # a thread running in a copy of this context sees the block's observers
        ctx = contextvars.copy_context()
        thread = threading.Thread(target=ctx.run, args=(other.compute,), kwargs={"workers": 0})
        thread.start()
        thread.join()
    graph.compute(workers=0)  # after the blocks: nobody

    assert in_thread == [True]
    assert [e for e in inside.events if e[0] == "start"] == [("start", "inside")]
    assert [e for e in outer.events if e[0] == "start"] == [("start", "inside"), ("start", "other")]


def test_observe_refuses_non_observers():
    with pytest.raises(TypeError, match=r"gx\.Observer instances"), gx.observe(object()):
        pass


def test_hook_options_are_validated():
    with pytest.raises(TypeError, match="on_failure= must be a list of functions"):
        gx.task(on_failure="notify")(lambda: 1)
    graph = gx.Graph()
    with graph:
        square(1)
    with pytest.raises(TypeError, match="on_completion= must be a list of functions"):
        graph.compute(workers=0, on_completion=[1])
    with pytest.raises(TypeError, match=r"observers must be gx\.Observer"):
        graph.compute(workers=0, observers=["x"])


def test_nothing_listening_costs_nothing(monkeypatch):
    monkeypatch.delenv("GRAPHEXEC_PROGRESS_LOG", raising=False)
    logging.getLogger("graphexec").setLevel(logging.WARNING)
    try:
        graph = gx.Graph()
        with graph:
            square(1)
        options = ComputeOptions.validate("test", workers=0, progress=None)
        assert compute_module._dispatch(graph, [0], options) is None
        options = ComputeOptions.validate("test", workers=0, observers=[gx.Observer()])
        assert compute_module._dispatch(graph, [0], options) is not None
    finally:
        logging.getLogger("graphexec").setLevel(logging.NOTSET)


# -- flows ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_flow_hooks_and_observers(scheduler):
    log, calls = [], []
    recorder = Recorder()
    noted = square.with_options(on_completion=[hook_log(log, "completed")])

    @gx.flow(
        workers=0 if scheduler == "sync" else 2,
        scheduler="threads" if scheduler == "threads" else "processes",
        observers=[recorder],
        on_completion=[lambda r: calls.append(("completion", len(r.completed)))],
        on_failure=[lambda flow, flow_run, state: calls.append(("failure", flow.name))],
    )
    def sweep(fail):
        values = [noted.submit(i).result() for i in range(3)]
        if fail:
            raise RuntimeError("the body failed")
        return values

    assert sweep(False) == [0, 1, 4]
    assert calls == [("completion", 3)]
    assert sorted(entry[3] for entry in log) == [0, 1, 4]
    assert recorder.events[0][0] == "start" and recorder.events[-1] == ("finish", True)
    assert len([e for e in recorder.events if e[0] == "node_finish"]) == 3

    calls.clear()
    with pytest.raises(RuntimeError, match="the body failed"):
        sweep(True)
    assert calls == [("failure", "sweep")]


def test_a_graph_computed_in_a_flow_fires_its_hooks():
    log, calls = [], []
    graph = gx.Graph()
    with graph:
        square.with_options(on_completion=[hook_log(log, "completed")])(6)

    @gx.flow(workers=0)
    def body():
        run = graph.compute(on_completion=[lambda r: calls.append(r.ok)])
        with pytest.raises(ValueError, match=r"give observers to @gx\.flow"):
            graph.compute(observers=[Recorder()])
        return run.ok

    assert body() is True
    assert calls == [True]
    assert [entry[3] for entry in log] == [36]


# -- the unattended progress line ----------------------------------------------------


def test_progress_line_is_logged_periodically_without_a_terminal(monkeypatch, caplog):
    monkeypatch.setenv("GRAPHEXEC_PROGRESS_LOG", "0.2")
    graph = gx.Graph("overnight")
    with graph:
        [nap(0.6) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="graphexec"):
        # (threads: a sync call is over before it is counted as running)
        graph.compute(scheduler="threads", workers=1, progress=None)  # no terminal in pytest
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("overnight:")]
    # timer lines while the first nap runs (nothing finished), a line at each tenth
    # (each node here is half the graph), none repeated at the end
    assert any(line.startswith("overnight: 0/2 done (0%), 0 failed, 1 running") for line in lines)
    assert lines[-1].startswith("overnight: 2/2 done (100%), 0 failed, 0 running")
    assert any(line.startswith("overnight: 1/2 done (50%)") for line in lines)
    assert lines.count(lines[-1]) == 1

    caplog.clear()
    monkeypatch.setenv("GRAPHEXEC_PROGRESS_LOG", "off")
    with caplog.at_level(logging.INFO, logger="graphexec"):
        graph.compute(workers=0, progress=None)
    assert not [r for r in caplog.records if r.getMessage().startswith("overnight:")]


def test_the_bar_and_the_line_count_no_more_running_than_the_executor_runs(caplog):
    # Calls handed over ahead of time (short calls queued on a busy worker) were
    # counted as running: "117 running" on 2 workers. Fed more starts than slots.
    from graphexec._surfaces.progress import Progress, ProgressLog

    graph = gx.Graph("queued")
    with graph:
        nodes = [nap(0) for _ in range(6)]
    run = graph.compute(scheduler="sync")
    bar = Progress(slots=2)
    line = ProgressLog(interval=1000.0, slots=2)
    unbounded = Progress()  # an executor that cannot say (a cluster): all of them
    for observer in (bar, line, unbounded):
        for node in nodes[:5]:
            observer.on_node_start(node, 1)
    assert bar._postfix().startswith("running=2")
    assert unbounded._postfix().startswith("running=5")
    line.on_start(run)
    try:
        with caplog.at_level(logging.INFO, logger="graphexec"):
            line._log()
    finally:
        line.on_finish(run)
    assert ", 2 running," in caplog.records[0].getMessage()


# -- the example: failures posted to a webhook -----------------------------------------


class _Collector(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        self.received.append((self.path, self.headers["Content-Type"], self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.timeout(120)
def test_notify_on_failure_example_posts_each_failure():
    _Collector.received = []
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "notify_on_failure.py"), url],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the sweep had failures
    posts = [(path, kind, json.loads(body)) for path, kind, body in _Collector.received]
    assert all(path == "/hook" and kind == "application/json" for path, kind, _ in posts)
    failures = sorted((p["node"], p["error"]) for _, _, p in posts if p["event"] == "node_failed")
    assert failures == [
        ("simulate-3", "ValueError: seed 3 diverged"),
        ("simulate-6", "ValueError: seed 6 diverged"),
    ]
    summary = [p for _, _, p in posts if p["event"] == "run_failed"]
    assert len(summary) == 1 and summary[0]["failed"] == 2 and summary[0]["completed"] == 8
    assert "2 failure(s) posted" in proc.stdout


@pytest.mark.timeout(60)
def test_submits_in_a_pool_block_fire_their_hooks_and_tell_ambient_observers():
    log = []
    recorder = Recorder()
    ok = square.with_options(on_completion=[hook_log(log, "completion")])
    bad = explode.with_options(on_failure=[hook_log(log, "failure")])
    with gx.observe(recorder), gx.Pool(workers=2):
        good = ok.submit(3)
        failed = bad.submit(1)
        assert good.result() == 9
        with pytest.raises(ValueError):
            failed.result()  # looked at: the block does not raise for it
    # The block waited for its hooks before it ended.
    assert sorted((label, detail) for label, _name, _state, detail, _thread in log) == [
        ("completion", 9),
        ("failure", "ValueError"),
    ]
    assert all(thread != threading.current_thread().name for *_, thread in log)
    assert recorder.of(good.name) == ["node_start", "node_finish"]
    assert recorder.of(failed.name) == ["node_start", "node_finish"]
    assert recorder.events[-1] == ("finish", True)
