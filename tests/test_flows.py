"""Futures and flows (SPEC §6, issue #7): Prefect-style ``submit()`` code on graphexec.

Times are recorded inside the tasks (``time.time()`` at start and end, the
worker's pid) and returned, so ordering, overlap and "which pool ran it" are
measured where the work happens, not guessed from the parent. Key behaviours
run on the three schedulers (``@gx.flow(scheduler=...)``): eager code must mean
the same thing on processes, threads and in-process.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from datetime import timedelta

import pytest

import graphexec as gx

ALL = ("processes", "threads", "sync")
PARALLEL = ("processes", "threads")  # where tasks really run side by side


def make_flow(body, scheduler="processes", **options):
    """``body`` as a flow on ``scheduler`` (two workers unless told otherwise)."""
    if scheduler != "sync":
        options.setdefault("workers", 2)
    return gx.flow(scheduler=scheduler, **options)(body)


def run_flow(body, scheduler="processes", **options):
    return make_flow(body, scheduler, **options)()


# -- tasks -------------------------------------------------------------------------


@gx.task
def span(tag, seconds=0.0, *inputs):
    """Sleep, and say when and where: ``{tag, start, end, pid, inputs}``."""
    start = time.time()
    time.sleep(seconds)
    return {
        "tag": tag,
        "start": start,
        "end": time.time(),
        "pid": os.getpid(),
        "inputs": [i["tag"] if isinstance(i, dict) else i for i in inputs],
    }


@gx.task(max_concurrency=1)
def solo(tag, seconds):
    start = time.time()
    time.sleep(seconds)
    return {"tag": tag, "start": start, "end": time.time()}


@gx.task(tags=["db"])
def db_write(tag, seconds):
    start = time.time()
    time.sleep(seconds)
    return {"tag": tag, "start": start, "end": time.time()}


@gx.task
def add(a, b=0):
    return a + b


@gx.task
def total(values):
    """Sum of a structure of numbers (lists, tuples, dict values)."""
    if isinstance(values, dict):
        return sum(total.fn(v) for v in values.values())
    if isinstance(values, (list, tuple)):
        return sum(total.fn(v) for v in values)
    return values


@gx.task
def explode(message="boom"):
    raise ValueError(message)


@gx.task
def describe(value):
    if isinstance(value, gx.State):
        return ("state", value.name, type(value.exception).__name__)
    if isinstance(value, BaseException):
        return ("exception", type(value).__name__, str(value))
    return ("value", value)


@gx.task
def touch(path, *_):
    with open(path, "w") as f:
        f.write("ran")
    return path


@gx.task
def pid(*_):
    time.sleep(0.05)
    return os.getpid()


@gx.task
def noop(x):
    return x


@gx.task(return_state=True)
def risky_state(message):
    raise ValueError(message)


@gx.task(cache_key_fn=gx.task_input_hash, cache_expiration=timedelta(hours=1))
def cached_square(x):
    return x * x


def max_overlap(spans):
    """The largest number of spans running at the same moment (touching ends don't count)."""
    events = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def overlaps(a, b):
    return a["start"] < b["end"] and b["start"] < a["end"]


# -- futures resolve in dependency order ---------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_a_chain_of_submits_runs_in_order_with_values(scheduler):
    def body():
        a = span.submit("a", 0.05)
        b = span.submit("b", 0.05, a)
        c = span.submit("c", 0.05, b)
        return a, b, c, add.submit(add.submit(1, 2), add.submit(10))

    a, b, c, number = run_flow(body, scheduler)
    assert number == 13
    assert b["inputs"] == ["a"] and c["inputs"] == ["b"]
    assert a["end"] <= b["start"] and b["end"] <= c["start"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_a_diamond_of_submits_waits_for_both_sides(scheduler):
    def body():
        top = span.submit("top", 0.05)
        left = span.submit("left", 0.3, top)
        right = span.submit("right", 0.3, top)
        bottom = span.submit("bottom", 0.0, left, right)
        return {"top": top, "left": left, "right": right, "bottom": bottom}

    got = run_flow(body, scheduler)
    assert got["bottom"]["inputs"] == ["left", "right"]
    assert got["left"]["start"] >= got["top"]["end"]
    assert got["right"]["start"] >= got["top"]["end"]
    assert got["bottom"]["start"] >= max(got["left"]["end"], got["right"]["end"])
    if scheduler != "sync":  # independent branches do not wait for each other
        assert overlaps(got["left"], got["right"])


@pytest.mark.timeout(30)
def test_submit_returns_at_once_and_the_future_reports_its_state():
    seen = {}

    def body():
        started = time.perf_counter()
        slow = span.submit("slow", 0.6)
        seen["submit_seconds"] = time.perf_counter() - started
        seen["done_at_once"] = slow.done()
        seen["first_state"] = slow.state.name
        deadline = time.monotonic() + 5
        while slow.state.name != "Running" and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["running"] = slow.state.name
        with pytest.raises(TimeoutError, match=r"span-0 did not finish within 0\.05 s"):
            slow.result(timeout=0.05)
        seen["done_after_timeout"] = slow.done()
        state = slow.wait()
        seen["waited"] = (state.name, slow.done(), slow.state.name)
        seen["repr"] = repr(slow)
        return slow.result()["tag"]

    assert run_flow(body) == "slow"
    assert seen["submit_seconds"] < 0.3
    assert seen["done_at_once"] is False
    assert seen["first_state"] in ("Pending", "Running")
    assert seen["running"] == "Running"
    assert seen["done_after_timeout"] is False
    assert seen["waited"] == ("Completed", True, "Completed")
    assert seen["repr"] == "<Future span-0 (Completed)>"


@pytest.mark.timeout(30)
def test_future_wait_timeout_returns_none_as_prefects_and_a_later_result_still_works():
    # Prefect 2 returns the state or None; Prefect 3 returns None and code looks at
    # future.state next: neither expects an exception. result() still raises.
    seen = {}

    def body():
        slow = span.submit("slow", 0.5)
        seen["timed_out"] = slow.wait(timeout=0.05)
        seen["state_then"] = slow.state.name
        with pytest.raises(TimeoutError):
            slow.exception(timeout=0.05)
        seen["waited"] = slow.wait(timeout=10).name
        return slow.result(timeout=10)["tag"]

    assert run_flow(body) == "slow"
    assert seen["timed_out"] is None
    assert seen["state_then"] in ("Pending", "Running")
    assert seen["waited"] == "Completed"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_submit_and_map_with_return_state_give_final_states_as_prefects_do(scheduler):
    seen = {}

    def body():
        failed = explode.submit("gave a state", return_state=True)
        done = add.submit(2, 3, return_state=True)
        mapped = add.map([1, 2], [10, 20], return_state=True)
        seen["states"] = (failed, done, *mapped)
        return "the flow went on"

    assert run_flow(body, scheduler) == "the flow went on"  # the failure was handled
    failed, done, *mapped = seen["states"]
    assert all(isinstance(state, gx.State) for state in seen["states"])
    assert failed.is_failed() and str(failed.exception) == "gave a state"
    assert done.name == "Completed" and done.result() == 5
    assert [state.result() for state in mapped] == [11, 22]


# -- as_completed and wait -------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_as_completed_yields_in_completion_order(scheduler):
    def body():
        futures = [span.submit(f"t{i}", s) for i, s in enumerate([0.9, 0.05, 0.45])]
        return [f.result() for f in gx.as_completed(futures)]

    got = run_flow(body, scheduler, workers=3) if scheduler != "sync" else run_flow(body, "sync")
    assert [g["end"] for g in got] == sorted(g["end"] for g in got)
    if scheduler != "sync":  # all three run at once: the shortest sleep ends first
        assert [g["tag"] for g in got] == ["t1", "t2", "t0"]


@gx.task
def explode_late(seconds):
    time.sleep(seconds)
    raise ValueError("late")


@pytest.mark.timeout(30)
def test_as_completed_yields_a_skipped_future_when_it_was_skipped():
    # A Skipped node has no end time of its own: it became final when its
    # upstream failed, after the quick task, and is yielded then (it came first).
    def body():
        fast = span.submit("fast", 0.05)
        late = explode_late.submit(0.4)
        skipped = add.submit(late)
        slow = span.submit("slow", 0.2)
        time.sleep(1.0)  # all final before as_completed looks
        order = [f.name for f in gx.as_completed([skipped, slow, late, fast])]
        assert late.state.is_failed()  # looked at: the flow returns
        return order

    assert run_flow(body, workers=3) == ["span-0", "span-1", "explode_late-0", "add-0"]


@pytest.mark.timeout(30)
def test_as_completed_timeout_raises():
    def body():
        slow = span.submit("slow", 1.0)
        fast = span.submit("fast", 0.0)
        yielded = []
        with pytest.raises(TimeoutError, match=r"1 futures unfinished after 0\.3 s"):
            for f in gx.as_completed([slow, fast], timeout=0.3):
                yielded.append(f.result()["tag"])
        return yielded

    assert run_flow(body) == ["fast"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", PARALLEL)
def test_wait_first_completed(scheduler):
    def body():
        fast = span.submit("fast", 0.05)
        slow = span.submit("slow", 1.5)
        started = time.perf_counter()
        done, not_done = gx.wait([fast, slow], return_when="FIRST_COMPLETED")
        elapsed = time.perf_counter() - started
        return done == {fast}, not_done == {slow}, elapsed

    first, rest, elapsed = run_flow(body, scheduler)
    assert first and rest
    assert elapsed < 1.2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", PARALLEL)
def test_wait_first_exception_and_the_failure_stays_unhandled(scheduler):
    """Waiting is not looking: a failure wait() noticed still fails the flow."""
    result = {}

    def body():
        slow = span.submit("slow", 1.5)
        bad = explode.submit("first failure")
        started = time.perf_counter()
        done, not_done = gx.wait([slow, bad], return_when="FIRST_EXCEPTION")
        result["elapsed"] = time.perf_counter() - started
        result["sets"] = ({f.name for f in done}, {f.name for f in not_done})

    with pytest.raises(gx.GraphFailed, match="explode-0") as info:
        run_flow(body, scheduler)
    assert result["sets"] == ({"explode-0"}, {"span-0"})
    assert result["elapsed"] < 1.2
    assert [n.name for n in info.value.run.unhandled] == ["explode-0"]


@pytest.mark.timeout(30)
def test_wait_all_completed_and_timeout():
    result = {}

    def body():
        quick = [span.submit(f"q{i}", 0.05) for i in range(3)]
        slow = span.submit("slow", 1.0)
        started = time.perf_counter()
        done, not_done = gx.wait([*quick, slow], timeout=0.4)
        result["timeout"] = (done == set(quick), not_done == {slow}, time.perf_counter() - started)
        done, not_done = gx.wait([*quick, slow])  # ALL_COMPLETED
        result["all"] = (done == {*quick, slow}, not_done)
        assert isinstance(gx.wait(quick), gx.WaitResult)
        with pytest.raises(ValueError, match="return_when='ANY'"):
            gx.wait(quick, return_when="ANY")

    run_flow(body)
    all_quick, only_slow, elapsed = result["timeout"]
    assert all_quick and only_slow
    assert 0.35 <= elapsed < 0.9
    assert result["all"] == (True, set())


# -- wait_for, nesting, allow_failure, return_state ------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_wait_for_futures_orders_without_passing_values(scheduler):
    def body():
        a = span.submit("a", 0.2)
        b = span.submit("b", 0.05)
        after = span.submit("after", 0.0, wait_for=[a, b])
        return a, b, after

    a, b, after = run_flow(body, scheduler)
    assert after["inputs"] == []  # order only
    assert after["start"] >= max(a["end"], b["end"])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_wait_for_a_failed_future_skips_the_dependent(scheduler, tmp_path):
    marker = tmp_path / "published"

    def body():
        a = span.submit("a", 0.0)
        b = explode.submit("upstream broke")
        touch.submit(str(marker), wait_for=[a, b])

    with pytest.raises(gx.GraphFailed) as info:
        run_flow(body, scheduler)
    run = info.value.run
    assert not marker.exists()
    state = run.state(next(n for n in run.nodes if n.name == "touch-0"))
    assert state.name == "Skipped"
    assert "explode-0 failed" in state.message
    assert [n.name for n in run.unhandled] == ["explode-0"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_wait_for_with_allow_failure_runs_the_dependent(scheduler, tmp_path):
    marker = tmp_path / "published"

    def body():
        a = span.submit("a", 0.0)
        b = explode.submit("upstream broke")
        return touch.submit(str(marker), wait_for=[a, gx.allow_failure(b)])

    assert run_flow(body, scheduler) == str(marker)  # b's failure is handled: no raise
    assert marker.exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_futures_nested_in_lists_and_dicts_are_arguments(scheduler):
    def body():
        one, two, three = add.submit(1), add.submit(2), add.submit(3)
        nested = total.submit({"a": [one, (two, 100)], "b": {"c": three}})
        as_kwarg = total.submit(values=[one, [two, [three]]])
        return nested, as_kwarg

    assert run_flow(body, scheduler) == (106, 6)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_allow_failure_on_a_future(scheduler):
    def body():
        bad = explode.submit("sensor offline")
        seen = describe.submit(gx.allow_failure(bad))
        in_list = total.submit(gx.allow_failure([add.submit(1), 2]))
        return seen, in_list

    seen, in_list = run_flow(body, scheduler)  # the failure was accepted: no GraphFailed
    assert seen == ("exception", "ValueError", "sensor offline")
    assert in_list == 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_return_state_on_submit_and_on_a_plain_call(scheduler):
    seen = {}

    def body():
        state_future = explode.submit("gave a state", return_state=True)
        dependent = describe.submit(state_future)
        seen["plain"] = risky_state("plain call")  # @gx.task(return_state=True)
        seen["plain_ok"] = add(2, 3, return_state=True)
        return dependent

    assert run_flow(body, scheduler) == ("state", "Failed", "ValueError")
    assert isinstance(seen["plain"], gx.State)
    assert seen["plain"].is_failed() and str(seen["plain"].exception) == "plain call"
    assert seen["plain_ok"].name == "Completed" and seen["plain_ok"].result() == 5


# -- failures inside flows ----------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_failures_caught_in_the_body_let_the_flow_return(scheduler):
    caught = []

    def body():
        try:
            explode("plain call failed")  # runs on the pool, raises here
        except ValueError as exc:
            caught.append(str(exc))
        future = explode.submit("future failed")
        try:
            future.result()
        except ValueError as exc:
            caught.append(str(exc))
        looked = explode.submit("state was read")
        looked.wait()
        caught.append(looked.state.name)
        unraised = explode.submit("returned, not raised").result(raise_on_failure=False)
        caught.append(repr(unraised))
        return add(1, 2)

    assert run_flow(body, scheduler) == 3
    assert caught == [
        "plain call failed",
        "future failed",
        "Failed",
        "ValueError('returned, not raised')",
    ]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_an_unhandled_failure_raises_graph_failed_after_the_body(scheduler):
    progress = []

    def body():
        good = add.submit(1, 2)
        bad = explode.submit("nobody looked")
        skipped = add.submit(bad, 1)
        progress.append("body finished")
        return good, skipped.name

    with pytest.raises(gx.GraphFailed, match="explode-0") as info:
        run_flow(body, scheduler)
    assert progress == ["body finished"]  # raised at the end, not in the middle
    run = info.value.run
    assert isinstance(run, gx.Run)
    assert [n.name for n in run.failed] == ["explode-0"]
    assert [n.name for n in run.skipped] == ["add-1"]
    assert [n.name for n in run.completed] == ["add-0"]
    assert isinstance(info.value.__cause__, ValueError)
    assert "nobody looked" in str(info.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_a_dependent_of_a_failed_future_is_skipped(scheduler):
    seen = {}

    def body():
        bad = explode.submit("root cause")
        child = add.submit(bad, 1)
        grandchild = add.submit(child, 1)
        seen["child"] = child.wait()
        seen["grandchild"] = grandchild.wait()
        with pytest.raises(gx.UpstreamFailed):
            grandchild.result()
        with pytest.raises(ValueError, match="root cause"):
            bad.result()  # looked at: handled

    run_flow(body, scheduler)
    assert seen["child"].name == "Skipped" and seen["child"].upstream == "explode-0"
    assert seen["grandchild"].name == "Skipped"
    assert "explode-0 failed" in seen["grandchild"].message


@pytest.mark.timeout(30)
def test_returning_a_failed_future_raises_its_exception_with_the_run():
    def body():
        return explode.submit("returned failure")

    with pytest.raises(ValueError, match="returned failure") as info:
        run_flow(body)
    assert [n.name for n in info.value.run.failed] == ["explode-0"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_the_return_value_has_futures_and_lazy_nodes_resolved(scheduler):
    def body():
        fut = add.submit(1, 2)  # index 0 of the flow's graph ...
        graph = gx.Graph()
        with graph:
            node = add(100, 200)  # ... and index 0 of the lazy graph
        graph.compute()
        return {"future": fut, "node": node, "nested": [fut, (node, "x")], "plain": 7}

    assert run_flow(body, scheduler) == {
        "future": 3,
        "node": 300,
        "nested": [3, (300, "x")],
        "plain": 7,
    }


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", PARALLEL)
def test_an_exception_in_the_body_cancels_pending_tasks_and_reraises(scheduler, tmp_path):
    marker = tmp_path / "dependent-ran"
    seconds = 10 if scheduler == "processes" else 1.5  # threads cannot be killed

    def body():
        slow = span.submit("slow", seconds)
        touch.submit(str(marker), slow)
        time.sleep(0.2)
        raise KeyError("the body broke")

    started = time.perf_counter()
    with pytest.raises(KeyError, match="the body broke") as info:
        run_flow(body, scheduler)
    assert time.perf_counter() - started < seconds - 0.3  # did not wait for the task
    run = info.value.run
    assert {n.name: run.state(n).name for n in run.nodes} == {
        "span-0": "Cancelled",
        "touch-0": "Cancelled",
    }
    assert "the flow body raised KeyError" in run.state(run.nodes[0]).message
    # Never "ok": the run stopped before it ended (in its headline and JSON too)
    assert not run.ok
    headline = run.summary().splitlines()[0]
    assert headline.endswith("interrupted: the flow body raised KeyError: 'the body broke'")
    assert json.loads(run.to_json())["ok"] is False
    time.sleep(0.1)
    assert not marker.exists()


# -- plain calls and pools ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_plain_call_in_a_flow_runs_on_the_pool_and_returns_the_value():
    def body():
        return pid(), os.getpid()

    worker, me = run_flow(body)
    assert isinstance(worker, int) and worker != me
    assert pid() == os.getpid()  # outside a flow: a plain function


@pytest.mark.timeout(30)
def test_a_lazy_graph_computed_in_a_flow_uses_the_flows_pool():
    seen = {}

    def body():
        eager = [pid.submit(i) for i in range(6)]  # keep both workers busy: both start
        seen["eager_pids"] = {f.result() for f in eager}
        graph = gx.Graph("lazy")
        with graph:
            lazy = [pid(i) for i in range(6)]
            both = total(lazy)
        run = graph.compute()
        seen["run"] = run
        seen["lazy_values"] = [run[n] for n in lazy]
        seen["both"] = both.result()  # node.result() reads the graph's latest run
        return run

    run = run_flow(body, workers=2)
    assert isinstance(run, gx.Run) and run is seen["run"]
    assert run.graph.name == "lazy" and run.ok and len(run.completed) == 7
    assert set(seen["lazy_values"]) <= seen["eager_pids"]
    assert len(seen["eager_pids"]) == 2 and os.getpid() not in seen["eager_pids"]
    assert seen["both"] == sum(seen["lazy_values"])


def _lazy_failure(catch, held):
    graph = gx.Graph("lazy")
    with graph:
        bad = explode("lazy broke")
        add(bad, 1)
    held["bad"] = bad
    if not catch:
        graph.compute()
    try:
        graph.compute()
    except gx.GraphFailed as failure:
        return failure.run.state(bad).name
    return None


@pytest.mark.timeout(30)
def test_a_failing_lazy_graph_in_a_flow_raises_graph_failed_with_its_own_run():
    held = {}
    assert run_flow(lambda: _lazy_failure(True, held)) == "Failed"  # caught: flow returns

    with pytest.raises(gx.GraphFailed, match="explode-0") as info:
        run_flow(lambda: _lazy_failure(False, held))
    run = info.value.run  # the lazy graph's Run, whose nodes the user holds
    assert run.graph.name == "lazy"
    assert run.state(held["bad"]).name == "Failed"
    assert [n.name for n in run.skipped] == ["add-0"]


@pytest.mark.timeout(30)
def test_with_pool_makes_submit_eager_outside_a_flow():
    with gx.Pool(workers=2) as pool:
        first = add.submit(1, 2)
        second = add.submit(first, 10)
        assert second.result() == 13
        graph = gx.Graph()
        with graph:
            lazy = [pid(i) for i in range(4)]
        run = graph.compute(pool=pool)  # the same pool, the same scheduler
        eager_pids = {pid.submit(i).result() for i in range(4)}
        assert {run[n] for n in lazy} | eager_pids <= {w.pid for w in pool._workers.values()}
    assert pool.closed


@pytest.mark.timeout(30)
def test_with_pool_raises_graph_failed_at_exit_for_unseen_failures():
    with pytest.raises(gx.GraphFailed, match="explode-0") as info, gx.Pool(workers=2):
        explode.submit("unseen")
        assert add.submit(1, 1).result() == 2
    assert [n.name for n in info.value.run.unhandled] == ["explode-0"]


@pytest.mark.timeout(30)
def test_a_future_outlives_its_flow_but_belongs_to_it():
    kept = {}

    def first():
        kept["future"] = add.submit(1, 2)

    def second():
        # (said: belongs to another graph; build calls in the same `with graph:`)
        with pytest.raises(TypeError, match=r"future 'add-0' belongs to another flow.*result\(\)"):
            add.submit(kept["future"], 1)
        with pytest.raises(TypeError, match="wait_for= takes nodes"):
            add.submit(1, wait_for=[5])

    run_flow(first, workers=1)
    assert kept["future"].done() and kept["future"].result() == 3
    run_flow(second, workers=1)


def test_submit_outside_a_flow_or_pool_says_where_to_call_it():
    with pytest.raises(RuntimeError) as info:
        add.submit(1, 2)
    message = str(info.value)
    assert "add.submit()" in message
    assert "@gx.flow" in message and "gx.Pool(workers=N)" in message


# -- nested flows ------------------------------------------------------------------------------


@gx.flow(workers=2)
def inner_flow(x):
    return {"value": add.submit(x, 1), "pid": pid.submit()}


@gx.flow
def inner_flow_failing():
    explode.submit("inner failure")
    return "inner returned"


@gx.flow
def inner_flow_raising():
    raise LookupError("inner body broke")


@pytest.mark.timeout(30)
def test_nested_flows_run_in_the_outer_flows_session():
    def body():
        outer_pids = {f.result() for f in [pid.submit(i) for i in range(4)]}
        got = inner_flow(41)  # its own workers=2 is not a second pool
        return got["value"], got["pid"], outer_pids

    value, inner_pid, outer_pids = run_flow(body)
    assert value == 42
    assert len(outer_pids) == 2 and inner_pid in outer_pids


@pytest.mark.timeout(30)
def test_an_inner_flows_unhandled_failure_surfaces_in_the_outer_flow():
    progress = []

    def body():
        progress.append(inner_flow_failing())  # returns: failures surface at the end
        try:
            inner_flow_raising()
        except LookupError as exc:
            progress.append(str(exc))
        return "outer returned"

    with pytest.raises(gx.GraphFailed, match="explode-0") as info:
        run_flow(body)
    assert progress == ["inner returned", "inner body broke"]
    assert "inner failure" in str(info.value)


@gx.flow(workers=2, limits={"db": 1})
def inner_limited():
    return [db_write.submit(f"w{i}", 0.1) for i in range(3)]


@pytest.mark.timeout(30)
def test_an_inner_flows_limits_must_be_the_outer_flows():
    # One scheduler runs both: a limit the outer flow does not have would be
    # dropped (all three writes at once); it is refused, as in graph.compute.
    with pytest.raises(ValueError, match=r"inside flow 'body'.*does not limit 'db'"):
        run_flow(lambda: inner_limited(), name="body")
    spans = run_flow(lambda: inner_limited(), limits={"db": 1})
    assert max_overlap(spans) == 1


@pytest.mark.timeout(30)
def test_an_inner_flows_fail_fast_must_be_the_outer_flows():
    inner = gx.flow(fail_fast=True)(lambda: add.submit(1).result())
    with pytest.raises(ValueError, match=r"fail_fast=True, but the outer flow's is False"):
        run_flow(lambda: inner())
    assert run_flow(lambda: inner(), fail_fast=True) == 1


@pytest.mark.timeout(30)
def test_an_inner_flow_with_the_outer_flows_memory_limit_runs():
    # "2GB" was compared with the outer flow's bytes, and refused.
    inner = gx.flow(memory_limit="2GB")(lambda: add.submit(1).result())
    assert run_flow(lambda: inner(), memory_limit="2GB") == 1
    with pytest.raises(ValueError, match="memory_limit"):
        run_flow(lambda: inner(), memory_limit="1GB")


@pytest.mark.timeout(30)
def test_a_limits_warning_made_an_error_neither_hides_the_bodys_exception_nor_the_hooks():
    called = []

    def body():
        db_write.submit("w", 0.0).result()
        raise KeyError("body error")

    flow = make_flow(body, limits={"DB": 1}, on_failure=[called.append])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyError, match="body error"):
            flow()
    assert len(called) == 1


@pytest.mark.timeout(30)
def test_an_inner_flows_hooks_are_not_called_and_it_says_so():
    called = []
    inner = gx.flow(on_failure=[called.append], name="inner")(lambda: add.submit(1).result())
    with pytest.warns(UserWarning, match=r"flow 'inner' called inside flow .* on_failure"):
        assert run_flow(lambda: inner()) == 1
    assert called == []


@pytest.mark.timeout(30)
def test_an_inner_flows_worker_options_and_run_name_are_not_applied_and_it_says_so():
    # Its tasks run on the outer flow's workers: inner_threads=, workers= & co. were
    # dropped without a word (graph.compute in a flow refuses inner_threads=).
    inner = gx.flow(
        name="inner",
        workers=7,
        inner_threads=2,
        start_method="spawn",
        max_calls_per_worker=3,
        flow_run_name="inner-run",
    )(lambda: add.submit(1).result())
    with pytest.warns(UserWarning, match=r"flow 'inner' called inside flow") as seen:
        assert run_flow(lambda: inner()) == 1
    said = str(seen[0].message)
    for option in ("inner_threads", "start_method", "max_calls_per_worker", "flow_run_name"):
        assert option in said, said
    assert "workers" not in said.replace("max_calls_per_worker", "")  # the outer pool's count
    outer = gx.flow(name="outer", flow_run_name="outer-{n}")(lambda n: inner())
    with pytest.warns(UserWarning, match=r"flow 'inner' called inside flow 'outer' "):
        assert outer(3) == 1  # the outer flow by its name, not its run's


@pytest.mark.timeout(60)
def test_a_flow_in_a_pool_block_is_a_flow_of_its_own_on_that_pool():
    # Its limits, fail_fast and hooks apply, as when called outside the block;
    # its workers are the block's.
    failed = []

    @gx.flow(workers=4, limits={"db": 1}, on_failure=[failed.append])
    def writes():
        spans = [db_write.submit(f"w{i}", 0.1) for i in range(3)]
        explode.submit("in the pool block")
        return spans

    with gx.Pool(workers=3) as pool:
        with pytest.raises(gx.GraphFailed, match="in the pool block"):
            writes()
        assert len(failed) == 1 and failed[0].counts()["Failed"] == 1
        spans = gx.flow(workers=4, limits={"db": 1})(
            lambda: [db_write.submit(f"w{i}", 0.1) for i in range(3)]
        )()
        assert max_overlap(spans) == 1
        in_flow = gx.flow(workers=4)(lambda: [span.submit(i, 0.05) for i in range(8)])()
        workers = {w.pid for w in pool._workers.values()}
    # the block's three workers ran the flow's tasks: no pool of four of its own
    assert {s["pid"] for s in in_flow} <= workers


@pytest.mark.timeout(30)
def test_a_flow_limit_on_a_tag_no_task_has_warns():
    with pytest.warns(UserWarning, match=r"limits=\{'DB': 1\} limits nothing.*'db'"):
        run_flow(lambda: [db_write.submit("w", 0.0)], limits={"DB": 1})


# -- concurrency ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("spelling", ["workers", "task_runner_max_concurrency"])
@pytest.mark.parametrize("scheduler", PARALLEL)
def test_at_most_two_tasks_at_a_time(scheduler, spelling):
    def body():
        return [span.submit(f"t{i}", 0.15) for i in range(6)]

    flow = gx.flow(scheduler=scheduler, **{spelling: 2})(body)
    spans = flow()
    assert max_overlap(spans) == 2  # never more, and really two at once


def test_flow_options_are_checked_when_the_flow_is_decorated():
    def body():
        return None

    with pytest.raises(TypeError, match="not both"):
        gx.flow(workers=2, task_runner_max_concurrency=3)(body)
    with pytest.raises(TypeError, match="unknown option"):
        gx.flow(max_workers=2)(body)
    with pytest.raises(ValueError, match="scheduler='thread' is not one of"):
        gx.flow(scheduler="thread")(body)
    with pytest.raises(ValueError, match="workers=-1 is negative"):
        gx.flow(workers=-1)(body)
    with pytest.raises(ValueError, match="limits="):
        gx.flow(limits={"db": 0})(body)
    with pytest.raises(ValueError, match="memory_limit= needs worker processes"):
        gx.flow(scheduler="threads", memory_limit="1GB")(body)
    assert gx.flow(task_runner_max_concurrency=2)(body).options["workers"] == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["max_concurrency", "tag_limit"])
@pytest.mark.parametrize("scheduler", PARALLEL)
def test_a_limit_is_never_exceeded_while_other_work_proceeds(scheduler, kind):
    limited_task = solo if kind == "max_concurrency" else db_write
    options = {"limits": {"db": 1}} if kind == "tag_limit" else {}

    def body():
        limited = [limited_task.submit(f"l{i}", 0.15) for i in range(4)]
        others = [span.submit(f"o{i}", 0.1) for i in range(4)]
        return [f.result() for f in limited], [f.result() for f in others]

    limited, others = run_flow(body, scheduler, workers=2, **options)
    assert max_overlap(limited) == 1
    # The free tasks did not queue behind the limited ones: they ran alongside,
    # and were all done before the limited chain of 4 x 0.15 s was.
    assert any(overlaps(o, lim) for o in others for lim in limited)
    assert max(o["end"] for o in others) < max(lim["end"] for lim in limited)


@pytest.mark.timeout(30)
def test_a_tag_limit_of_a_lazy_graph_inside_a_flow_uses_the_flows_limits():
    def body():
        graph = gx.Graph()
        with graph:
            writes = [db_write(f"w{i}", 0.1) for i in range(4)]
        run = graph.compute()
        return [run[n] for n in writes]

    assert max_overlap(run_flow(body, workers=2, limits={"db": 1})) == 1

    def same_limits():
        graph = gx.Graph()
        with graph:
            writes = [db_write(f"w{i}", 0.1) for i in range(3)]
        run = graph.compute(limits={"db": 1})  # the flow's own limit: fine
        return [run[n] for n in writes]

    assert max_overlap(run_flow(same_limits, workers=2, limits={"db": 1})) == 1


# compute() inside a flow runs the graph in the flow's session: its limits=,
# refresh_cache=, cache_dir= and memory_limit= are honoured or refused, never
# dropped without a word (they once were).


@pytest.mark.timeout(30)
def test_a_tag_limit_given_to_compute_inside_a_flow_is_not_silently_dropped():
    def body():
        graph = gx.Graph()
        with graph:
            writes = [db_write(f"w{i}", 0.2) for i in range(4)]
        run = graph.compute(limits={"db": 1})  # the flow does not limit "db"
        return max_overlap([run[n] for n in writes])

    with pytest.raises(ValueError, match=r"give limits= to @gx\.flow"):
        run_flow(body, workers=2)


@pytest.mark.timeout(30)
def test_refresh_cache_given_to_compute_inside_a_flow_recomputes(tmp_path):
    def body():
        graph = gx.Graph()
        with graph:
            node = cached_square(5)
        first = graph.compute().state(node).name
        again = graph.compute(refresh_cache=True).state(node).name  # not Cached
        return first, again

    assert run_flow(body, cache_dir=str(tmp_path)) == ("Completed", "Completed")


@pytest.mark.timeout(30)
def test_a_cache_dir_given_to_compute_inside_a_flow_is_not_silently_dropped(tmp_path):
    flow_dir, compute_dir = tmp_path / "flow", tmp_path / "compute"

    def body():
        graph = gx.Graph()
        with graph:
            cached_square(6)
        graph.compute(cache_dir=str(compute_dir))  # the flow caches elsewhere

    with pytest.raises(ValueError, match=r"give cache_dir= to @gx\.flow"):
        run_flow(body, cache_dir=str(flow_dir))
    assert not compute_dir.exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["decorator", "with_options"])
@pytest.mark.parametrize("scheduler", ALL)
def test_higher_priority_ready_tasks_start_first(scheduler, how):
    urgent_task = (
        gx.task(priority=5)(span.fn) if how == "decorator" else span.with_options(priority=5)
    )

    def body():
        blocker = span.submit("blocker", 0.4)
        deadline = time.monotonic() + 5
        while blocker.state.name == "Pending" and time.monotonic() < deadline:
            time.sleep(0.005)
        # Queued behind the blocker on the only worker, low priority first.
        low = [span.submit(f"low{i}", 0.01) for i in range(3)]
        high = [urgent_task.submit(f"high{i}", 0.01) for i in range(3)]
        return blocker, [f.result() for f in low], [f.result() for f in high]

    blocker, low, high = run_flow(body, scheduler, workers=1)
    order = [s["tag"] for s in sorted(low + high, key=lambda s: s["start"])]
    assert order == ["high0", "high1", "high2", "low0", "low1", "low2"]
    assert min(s["start"] for s in low + high) >= blocker["end"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", PARALLEL)
def test_priority_holds_among_tasks_waiting_for_a_concurrency_slot(scheduler):
    urgent = solo.with_options(priority=5)  # same function: shares solo's single slot

    def body():
        blocker = solo.submit("blocker", 0.5)
        deadline = time.monotonic() + 5
        while blocker.state.name == "Pending" and time.monotonic() < deadline:
            time.sleep(0.005)
        low = [solo.submit(f"low{i}", 0.01) for i in range(3)]
        time.sleep(0.15)  # the low ones are parked, waiting for the slot
        high = [urgent.submit(f"high{i}", 0.01) for i in range(3)]
        return [f.result() for f in low + high]

    spans = run_flow(body, scheduler, workers=2)  # a free worker: only the slot is missing
    order = [s["tag"] for s in sorted(spans, key=lambda s: s["start"])]
    assert order == ["high0", "high1", "high2", "low0", "low1", "low2"]


@pytest.mark.timeout(30)
def test_fail_fast_flow_cancels_running_and_later_work():
    def body():
        slow = span.submit("slow", 10)
        explode.submit("first failure")
        time.sleep(0.5)
        late = span.submit("late", 0.0)  # after the cancellation: never runs
        return slow.name, late.name

    started = time.perf_counter()
    with pytest.raises(gx.GraphFailed, match="explode-0") as info:
        run_flow(body, fail_fast=True)
    assert time.perf_counter() - started < 5
    run = info.value.run
    assert {n.name: run.state(n).name for n in run.nodes} == {
        "span-0": "Cancelled",
        "explode-0": "Failed",
        "span-1": "Cancelled",
    }


# -- shared memory -------------------------------------------------------------------------


@gx.task
def big_array(value):
    import numpy as np

    return np.full(500_000, float(value))  # 4 MB: travels through shared memory


@gx.task
def array_sum(array):
    return float(array.sum())


def _my_segments():
    if not os.path.isdir("/dev/shm"):
        return set()
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"gx-{os.getpid()}-")}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["flow", "pool"])
def test_values_read_during_a_flow_leave_nothing_in_shared_memory(where):
    """future.result() maps a value mid-session; its segment must go when the session ends."""
    pytest.importorskip("numpy")
    before = _my_segments()

    def body():
        arrays = [big_array.submit(i) for i in range(3)]
        first = arrays[1].result()  # read in the parent, mid-session ...
        sums = [array_sum.submit(a) for a in arrays]  # ... and still sent to dependents
        doubled = array_sum.submit(first * 2)  # a parent-made array as an argument
        return [f.result() for f in sums], doubled.result(), float(first[0])

    if where == "flow":
        got = run_flow(body)
    else:
        with gx.Pool(workers=2):
            got = body()
    assert got == ([0.0, 500_000.0, 1_000_000.0], 1_000_000.0, 1.0)
    assert _my_segments() - before == set()


@gx.task
def hog(megabytes):
    data = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(data), 4096):  # touch every page: it counts in RSS
        data[i] = 1
    time.sleep(5)
    return len(data)


@pytest.mark.timeout(30)
def test_a_flows_memory_limit_kills_the_task_over_it_and_the_flow_goes_on():
    def body():
        greedy = hog.submit(400)
        state = greedy.wait()
        after = add.submit(1, 2)  # the pool replaced the worker and goes on
        return state.name, type(state.exception).__name__, after.result(), greedy.state.name

    started = time.perf_counter()
    assert run_flow(body, memory_limit="150MB") == (
        "Failed",
        "MemoryLimitExceeded",
        3,
        "Failed",
    )
    assert time.perf_counter() - started < 4  # killed, not waited for


# -- caching and scale ------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_cached_futures_resolve_without_delay(scheduler, tmp_path):
    """A cache hit ends as it is admitted; its waiter must be woken at once."""
    seen = {}

    def body():
        assert cached_square.submit(7).result() == 49
        started = time.perf_counter()
        hits = []
        for _ in range(20):
            future = cached_square.submit(7)
            hits.append((future.result(), future.state.name))
        seen["seconds"] = time.perf_counter() - started
        return hits

    hits = run_flow(body, scheduler, cache_dir=str(tmp_path))
    assert hits == [(49, "Cached")] * 20
    assert seen["seconds"] < 2.0  # 20 sequential hits; 0.5 s each before the fix


@pytest.mark.timeout(60)
def test_a_flow_with_10000_submits_stays_fast():
    def body():
        futures = [noop.submit(i) for i in range(10_000)]
        return sum(f.result() for f in futures)

    started = time.perf_counter()
    assert run_flow(body) == sum(range(10_000))
    assert time.perf_counter() - started < 10


# -- futures that behave like futures (#13) ----------------------------------------------

BOTH = ("processes", "sync")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", BOTH)
def test_future_exception_returns_the_error_or_none_and_counts_as_looking(scheduler):
    def body():
        good = add.submit(1, 2)
        bad = explode.submit("looked at through exception()")
        skipped = add.submit(explode.submit("behind a skip"), 1)
        slow = span.submit("slow", 1.0)
        with pytest.raises(TimeoutError):
            slow.exception(timeout=0.05)
        return (
            good.exception(),
            repr(bad.exception()),
            type(skipped.exception()).__name__,
            slow.exception(),
        )

    # Both failures were looked at, one directly, one through the skip: no GraphFailed.
    assert run_flow(body, scheduler) == (
        None,
        "ValueError('looked at through exception()')",
        "UpstreamFailed",
        None,
    )


@pytest.mark.timeout(30)
def test_future_running_is_true_only_while_an_attempt_runs():
    seen = []

    def body():
        blocker = span.submit("blocker", 0.5)
        waiting = span.submit("waiting", 0.0, wait_for=[blocker])
        deadline = time.monotonic() + 10
        while not blocker.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append((blocker.running(), waiting.running()))
        waiting.result()
        seen.append((blocker.running(), waiting.running()))

    run_flow(body, "processes")
    assert seen == [(True, False), (False, False)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", BOTH)
def test_cancel_a_pending_future(scheduler, tmp_path):
    marker = tmp_path / "ran"
    seen = {}

    def body():
        blocker = span.submit("blocker", 0.5)
        pending = touch.submit(str(marker), wait_for=[blocker])
        dependent = add.submit(pending, 1)
        seen["cancel"] = pending.cancel()
        seen["again"] = pending.cancel()  # already cancelled: still True
        seen["cancelled"] = pending.cancelled()
        seen["finished"] = blocker.cancel()  # blocker runs (or has run): not cancelled
        blocker.result()
        seen["blocker"] = blocker.cancelled()
        with pytest.raises(gx.Cancelled):
            pending.result()
        seen["dependent"] = dependent.wait()
        return "returned"

    assert run_flow(body, scheduler) == "returned"  # a cancellation is no failure
    assert seen["cancel"] and seen["again"] and seen["cancelled"]
    assert seen["finished"] is False and seen["blocker"] is False
    assert seen["dependent"].name == "Skipped"
    assert not marker.exists()


@pytest.mark.timeout(30)
def test_cancel_a_running_future_returns_false():
    def body():
        running = span.submit("running", 0.5)
        deadline = time.monotonic() + 10
        while not running.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        return running.cancel(), running.cancelled(), running.result()["tag"]

    assert run_flow(body, "processes") == (False, False, "running")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", BOTH)
def test_done_callbacks_run_off_the_scheduler_thread_before_the_flow_returns(scheduler, caplog):
    calls = []

    def record(future):
        calls.append((future.name, future.done(), threading.current_thread().name))

    def raises(future):
        raise RuntimeError("a broken callback")

    def body():
        slow = span.submit("slow", 0.3)
        slow.add_done_callback(record)
        slow.add_done_callback(raises)  # logged, ignored
        slow.add_done_callback(record)  # each registration is called
        quick = add.submit(1, 2)
        quick.wait()
        quick.add_done_callback(record)  # already final: called now, in this thread
        calls.append(("body", "after quick"))
        return "returned"

    assert run_flow(body, scheduler) == "returned"
    here = threading.current_thread().name
    in_body = [c for c in calls if c[-1] in (here, "after quick")]
    off_thread = [c for c in calls if c not in in_body]
    assert in_body == [("add-0", True, here), ("body", "after quick")]
    assert off_thread == [("span-0", True, "graphexec-body-callbacks")] * 2
    assert "a done-callback of span-0 raised" in caplog.text


def test_a_flow_cut_short_by_ctrl_c_is_never_ok():
    """Ctrl-C in a flow's body cancels its run: the run did not end, so it is not
    ``ok`` and its headline says why, though none of its nodes failed."""

    def body():
        span.submit("done").result()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        run_flow(body, scheduler="sync")
    run = caught.value.run
    assert run.counts() == {"Completed": 1}
    assert not run.ok
    assert "cancelled by Ctrl-C" in run.summary().splitlines()[0]


def test_a_submit_whose_name_fails_does_not_shift_the_next_one():
    """A submit that raises while its node's name is made adds nothing: the next
    submit runs its own task (it ran the failed call's task, with no error)."""

    @gx.task(task_run_name="bad-{nope}")
    def bad(x):
        return ("bad", x)

    def body():
        with pytest.raises(ValueError, match="nope"):
            bad.submit(1)
        return span.submit("mine").result()["tag"]

    assert run_flow(body, scheduler="sync") == "mine"


def test_wait_for_on_a_submitted_future_is_refused():
    """The scheduler has a submitted task with its upstreams; an edge added later
    would do nothing (it was accepted silently)."""

    def body():
        first = span.submit("first")
        second = span.submit("second")
        with pytest.raises(RuntimeError, match="submitted already"):
            second.wait_for(first)
        return second.result()["tag"]

    assert run_flow(body, scheduler="sync") == "second"


# -- found by an audit of the eager API (2026-12-06) ----------------------------------


@gx.task
def _pid():
    return os.getpid()


@gx.task(retries=2, retry_delay=0.01)
def _third_time_lucky(path):
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        tries = len(f.read())
    if tries < 3:
        raise ValueError(f"attempt {tries}")
    return tries


@pytest.mark.timeout(60)
def test_a_flow_called_in_a_pool_block_runs_its_plain_calls_on_the_pool(tmp_path):
    # SPEC §6: "A plain task call inside a flow runs the task on the flow's pool";
    # a flow inside `with gx.Pool():` runs in that block's session.
    @gx.flow
    def body(path):
        return _pid(), _third_time_lucky(path)

    with gx.Pool(workers=1):
        pid, tries = body(str(tmp_path / "tries"))
    assert pid != os.getpid()
    assert tries == 3  # its retries= applied: the pool ran it


class _Abort(BaseException):
    """Not an Exception: a task's own BaseException subclass."""


@gx.task
def _abort():
    raise _Abort("stop")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL)
def test_a_task_raising_a_base_exception_fails_its_node_only(scheduler):
    # SPEC §3: a failure is the task raising; a Failed state of that node only.
    def body():
        return _abort.submit().wait(timeout=10)  # a Failed State, returned: the flow fails

    with pytest.raises(_Abort) as caught:
        run_flow(body, scheduler)
    (failed,) = caught.value.run.failed
    assert isinstance(caught.value.run.state(failed).exception, _Abort)
    graph = gx.Graph()
    with graph:
        node = _abort()
    run = graph.compute(scheduler=scheduler, raise_on_failure=False, workers=1)
    assert isinstance(run.state(node).exception, _Abort)


@gx.task(retries=1, retry_delay=0.01)
def _slow_second_attempt(path):
    if not os.path.exists(path):
        open(path, "w").close()
        raise ValueError("first attempt")
    time.sleep(1.0)
    return "second"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", PARALLEL)
def test_a_retried_attempt_is_running(tmp_path, scheduler):
    def body():
        future = _slow_second_attempt.submit(str(tmp_path / "first"))
        seen = set()
        while not future.done():
            seen.add((future.state.name, future.running()))
            time.sleep(0.01)
        return seen, future.result()

    seen, value = run_flow(body, scheduler)
    assert value == "second"
    assert ("Retrying", True) in seen  # the second attempt, running


@gx.task
def _nap():
    time.sleep(0.5)
    return "woke"


@pytest.mark.timeout(30)
def test_a_sync_flows_future_is_running_while_its_task_runs():
    def body():
        future = _nap.submit()
        seen = set()
        while not future.done():
            seen.add((future.state.name, future.running()))
            time.sleep(0.01)
        return seen

    assert ("Running", True) in run_flow(body, "sync")


@pytest.mark.timeout(30)
def test_submit_from_a_thread_the_flow_started_says_flows_hold_per_thread():
    def body():
        errors = []

        def job():
            try:
                add.submit(1)
            except RuntimeError as exc:
                errors.append(str(exc))

        worker = threading.Thread(target=job, name="helper-thread")
        worker.start()
        worker.join()
        return errors

    (text,) = run_flow(body)
    assert "this thread (helper-thread) is in none" in text


@gx.task
def _slow_step():
    time.sleep(5)
    return 1


@gx.task(trigger="always")
def _cleanup_marker(path, *upstream):
    with open(path, "w") as f:
        f.write("ran")
    return "cleaned"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", ["flow", "pool block"])
def test_ctrl_c_in_a_flow_body_runs_no_always_task(tmp_path, form):
    # As in compute: Ctrl-C cancels "always" tasks too (fail_fast and a body that raises
    # another exception leave them to run); a flow's cancel once spared them.
    marker = tmp_path / "cleanup"

    def body():
        step = _slow_step.submit()
        _cleanup_marker.submit(str(marker), step)
        time.sleep(0.3)
        raise KeyboardInterrupt

    if form == "flow":
        with pytest.raises(KeyboardInterrupt) as info:
            gx.flow(workers=2)(body)()
        assert info.value.run.counts() == {"Cancelled": 2}
    else:
        with pytest.raises(KeyboardInterrupt), gx.Pool(workers=2):
            body()
    time.sleep(0.5)  # a cleanup that ran would have written by now
    assert not marker.exists()


@gx.task
def _raises_bad():
    raise ValueError("bad")


@gx.task
def _fine():
    return 1


@pytest.mark.parametrize("shape", ["state", "list of states"])
def test_a_flow_returning_a_failed_state_fails(shape):
    # As in Prefect, a returned Failed State makes the flow Failed; it came back as a
    # plain value and the flow succeeded.
    @gx.flow(workers=2)
    def returns_states():
        failed = _raises_bad(return_state=True)
        if shape == "state":
            return failed
        return [_fine(return_state=True), failed]

    with pytest.raises(ValueError, match="bad"):
        returns_states()


def test_a_flow_returning_completed_states_returns_them():
    @gx.flow(workers=2)
    def returns_states():
        return [_fine(return_state=True), _fine.submit(return_state=True)]

    states = returns_states()
    assert [s.result() for s in states] == [1, 1]


def test_a_flow_call_takes_prefects_return_state_and_wait_for():
    # Both went into the flow's own function: "unexpected keyword argument".
    @gx.flow(workers=2)
    def child(x):
        return _fine() + x

    @gx.flow(workers=2)
    def failing():
        return _raises_bad()

    state = child(1, return_state=True)
    assert state.is_completed() and state.result() == 2
    state = failing(return_state=True)
    assert state.is_failed() and isinstance(state.exception, ValueError)
    with pytest.raises(ValueError):
        state.result()

    @gx.flow(workers=2)
    def parent_that_looks():
        ok, bad = _fine.submit(), _raises_bad.submit()
        after_bad = child(3, wait_for=[bad], return_state=True)
        bad.state  # looked at: handled  # noqa: B018
        return child(2, wait_for=[ok]), type(after_bad.exception).__name__

    assert parent_that_looks() == (3, "UpstreamFailed")
