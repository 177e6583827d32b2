"""Failure policies (SPEC §3): skip, allow_failure, return_state, triggers, GraphFailed, fail_fast.

Each policy is checked with a failing upstream and with an upstream that was
itself skipped because of a failure further up, on every backend (the
``compute`` fixture: ``sync``, ``threads``, ``processes`` and a dask
``cluster``), whose behaviour must match; where a backend cannot do something
(``CANNOT`` in conftest.py, docs/backends.md) the test asserts what it does
instead.
"""

from __future__ import annotations

import time
import traceback

import pytest

import graphexec as gx

pytestmark = pytest.mark.every_backend


def describe(value):
    """What a dependent received, as plain data that survives the trip home."""
    if isinstance(value, gx.State):
        exc = type(value.exception).__name__ if value.exception is not None else None
        payload = value.result() if value.is_completed() else None
        return ("state", value.name, exc, value.upstream, payload)
    if isinstance(value, gx.UpstreamFailed):
        return ("upstream_failed", value.upstream)
    if isinstance(value, BaseException):
        return ("exc", type(value).__name__, str(value))
    return ("value", value)


@gx.task
def ok(x=1):
    return x


@gx.task
def explode(message="boom"):
    raise ValueError(message)


@gx.task
def collect(*values):
    return [describe(v) for v in values]


@gx.task
def collect_items(items):
    return [describe(v) for v in items]


@gx.task(allow_failure=True)
def fragile(message="fragile broke"):
    raise ValueError(message)


@gx.task(allow_failure=True)
def fragile_ok(x):
    return x


@gx.task(return_state=True)
def stateful(x):
    return x


@gx.task(return_state=True)
def stateful_fail(message="stateful broke"):
    raise KeyError(message)


@gx.task(trigger="any_failed")
def on_any_failed(*values):
    return [describe(v) for v in values]


# -- default: skip, transitively ----------------------------------------------------


def test_default_skips_dependents_transitively(compute):
    graph = gx.Graph()
    with graph:
        root = explode("root broke")
        child = ok(root)
        grandchild = ok([child])
        sink = collect(grandchild, ok(2))
        independent = ok(5)
    with pytest.raises(gx.GraphFailed) as info:
        compute(graph)
    run = info.value.run
    assert run.failed == [root]
    assert run.skipped == [child, grandchild, sink]
    assert run[independent] == 5  # keep-going: unrelated work still ran
    for node in (child, grandchild, sink):
        state = run.state(node)
        assert state.name == "Skipped"
        assert state.is_skipped() and not state.is_failed()
        assert state.upstream == root.name
        assert state.attempts == 0
        with pytest.raises(gx.UpstreamFailed) as skipped:
            run[node]
        assert skipped.value.upstream == root.name
        assert skipped.value.node == node.name
    assert root.name in run.state(child).message
    assert "was skipped" in run.state(grandchild).message
    assert run.ok is False


def test_default_skip_through_wait_for(compute):
    graph = gx.Graph()
    with graph:
        root = explode()
        waiter = ok(1, wait_for=[root])
        skipped_root = ok(explode("other"))
        waiter2 = ok(2, wait_for=[skipped_root])
    with pytest.raises(gx.GraphFailed):
        compute(graph)
    run = graph._latest_run
    assert run.state(waiter).name == "Skipped"
    assert run.state(waiter).upstream == root.name
    assert run.state(waiter2).name == "Skipped"
    assert run.state(waiter2).upstream != root.name
    assert run.state(waiter2).upstream.startswith("explode-")


# -- gx.allow_failure ---------------------------------------------------------------


def test_allow_failure_argument_receives_the_exception(compute):
    graph = gx.Graph()
    with graph:
        root = explode("root broke")
        report = collect(gx.allow_failure(root), ok(2))
    run = compute(graph)  # handled: no GraphFailed
    assert run.ok
    assert run.failed == [root]
    assert run[report] == [("exc", "ValueError", "root broke"), ("value", 2)]


def test_allow_failure_argument_on_skipped_upstream_receives_upstream_failed(compute):
    graph = gx.Graph()
    with graph:
        root = explode()
        child = ok(root)
        report = collect(gx.allow_failure(child))
    run = compute(graph)
    assert run.ok
    assert run.skipped == [child]
    assert run.failed == [root]
    assert run[report] == [("upstream_failed", root.name)]


def test_allow_failure_on_a_successful_upstream_passes_the_value(compute):
    graph = gx.Graph()
    with graph:
        report = collect(gx.allow_failure(ok(3)), gx.allow_failure({"k": ok(4)}))
    assert compute(graph)[report] == [("value", 3), ("value", {"k": 4})]


def test_allow_failure_only_covers_the_marked_edge(compute):
    graph = gx.Graph()
    with graph:
        root = explode()
        report = collect(gx.allow_failure(ok(1)), root)
    with pytest.raises(gx.GraphFailed):
        compute(graph)
    assert graph._latest_run.state(report).upstream == root.name


def test_allow_failure_covers_a_node_only_where_every_data_use_is_wrapped(compute):
    # The same upstream passed wrapped and bare: the bare argument must not receive
    # the exception (it did not ask for one), so the call is skipped, whichever
    # comes first; wrapped at every use, the call runs.
    graph = gx.Graph()
    with graph:
        root = explode("root broke")
        wrapped_first = collect(gx.allow_failure(root), root)
        bare_first = collect(root, gx.allow_failure([root]))
    with pytest.raises(gx.GraphFailed):
        compute(graph)
    run = graph._latest_run
    for node in (wrapped_first, bare_first):
        assert run.state(node).name == "Skipped"
        assert run.state(node).upstream == root.name

    graph = gx.Graph()
    with graph:
        root = explode("root broke")
        wrapped_twice = collect(gx.allow_failure(root), gx.allow_failure(root))
    exc = ("exc", "ValueError", "root broke")
    assert compute(graph)[wrapped_twice] == [exc, exc]


@pytest.mark.parametrize("chain", ["failed", "skipped"])
def test_allow_failure_in_wait_for(compute, chain):
    graph = gx.Graph()
    with graph:
        root = explode()
        upstream = root if chain == "failed" else ok(root)
        allowed = ok(7, wait_for=[gx.allow_failure(upstream)])
        plain = ok(8, wait_for=[upstream])
    run = compute(graph)  # allowed accepted the failure: handled
    assert run.ok
    assert run[allowed] == 7
    assert run.state(plain).name == "Skipped"
    assert run.state(plain).upstream == root.name


def test_allow_failure_on_a_collection_replaces_only_failed_items(compute):
    graph = gx.Graph()
    with graph:
        a = explode("a broke")
        b = ok(2)
        skipped = ok(explode("c broke"))
        report = collect_items(gx.allow_failure([a, b, 1, skipped]))
        as_tuple = collect_items(gx.allow_failure((b, a)))
        in_wait_for = ok(9, wait_for=[gx.allow_failure([a, b])])
    run = compute(graph)
    assert run.ok
    root_c = run.state(skipped).upstream
    assert run[report] == [
        ("exc", "ValueError", "a broke"),
        ("value", 2),
        ("value", 1),
        ("upstream_failed", root_c),
    ]
    assert run[as_tuple] == [("value", 2), ("exc", "ValueError", "a broke")]
    assert run[in_wait_for] == 9


# -- allow_failure=True on the task or the call -------------------------------------


def test_task_option_allow_failure(compute):
    graph = gx.Graph()
    with graph:
        broken = fragile()
        report = collect(broken)
        also = ok(1, wait_for=[broken])
    run = compute(graph)
    assert run.ok
    assert run.failed == [broken]
    assert run[report] == [("exc", "ValueError", "fragile broke")]
    assert run[also] == 1


def test_task_option_allow_failure_skipped_chain(compute):
    graph = gx.Graph()
    with graph:
        root = explode()
        passthrough = fragile_ok(root)  # skipped, but declared allow_failure
        report = collect(passthrough)
    run = compute(graph)
    assert run.ok
    assert run.state(passthrough).name == "Skipped"
    assert run[report] == [("upstream_failed", root.name)]


def test_call_keyword_allow_failure(compute):
    graph = gx.Graph()
    with graph:
        broken = explode("call broke", allow_failure=True)
        report = collect(broken)
        root = explode("root")
        passthrough = ok(root, allow_failure=True)  # a failed data input still skips it
        report2 = collect(passthrough)
        strict = explode("strict")  # the same task without the keyword is not handled
    with pytest.raises(gx.GraphFailed) as info:
        compute(graph)
    run = info.value.run
    assert run[report] == [("exc", "ValueError", "call broke")]
    assert run[report2] == [("upstream_failed", root.name)]
    assert run.state(passthrough).name == "Skipped"
    assert run.unhandled == [strict]  # root: handled by report2, which took the skip
    assert set(run.failed) == {broken, root, strict}
    assert explode.options.allow_failure is False


def test_call_keyword_allow_failure_covers_its_wait_for(compute):
    # "Failures around this call are allowed": its wait_for entries count as if
    # wrapped in gx.allow_failure, failed or skipped, and are handled once it runs.
    graph = gx.Graph()
    with graph:
        failed = explode("prerequisite broke")
        skipped = ok(explode("further up"))
        after = ok(7, wait_for=[failed, skipped, ok(1)], allow_failure=True)
        returned = ok(8, wait_for=failed, allow_failure=True)  # a bare node, not a list
    run = compute(graph)
    assert run.ok
    assert run[after] == 7 and run[returned] == 8
    assert len(run.failed) == 2 and run.unhandled == []


@pytest.mark.parametrize("form", ["call keyword", "wrapped in wait_for", "added later"])
def test_an_allowed_wait_does_not_allow_the_same_nodes_data(compute, form):
    # The upstream is both a data input and in wait_for: the allowance covers the
    # wait, not the value. The call never receives the exception in place of its
    # argument: it is skipped, and the failure stays unhandled (a data input is
    # allowed to fail only when wrapped itself).
    graph = gx.Graph()
    with graph:
        failed = explode("input broke")
        if form == "call keyword":
            user = ok(failed, wait_for=[failed], allow_failure=True)
        elif form == "wrapped in wait_for":
            user = ok(failed, wait_for=[gx.allow_failure(failed)])
        else:
            user = ok(failed)
            user.wait_for(gx.allow_failure(failed))
    with pytest.raises(gx.GraphFailed) as info:
        compute(graph)
    run = info.value.run
    assert run.state(user).name == "Skipped"
    assert run.unhandled == [failed]


def test_task_option_allow_failure_does_not_cover_wait_for(compute):
    # Declared once for every call, "allowed to fail" does not also mean "runs
    # after its prerequisites failed": that takes the call keyword.
    graph = gx.Graph()
    with graph:
        failed = explode("prerequisite broke")
        waiter = fragile_ok(1, wait_for=[failed])
    with pytest.raises(gx.GraphFailed) as info:
        compute(graph)
    run = info.value.run
    assert run.state(waiter).name == "Skipped"
    assert run.unhandled == [failed]


# -- return_state=True ----------------------------------------------------------------


def test_task_option_return_state(compute):
    graph = gx.Graph()
    with graph:
        good = stateful(3)
        bad = stateful_fail()
        report = collect(good, bad)
    run = compute(graph, keep="all")
    assert run.ok
    assert run.failed == [bad]
    assert run[report] == [
        ("state", "Completed", None, None, 3),
        ("state", "Failed", "KeyError", None, None),
    ]
    assert run[good] == 3  # the node's own value is still its value


@gx.task
def keeps(value):
    return {"kept": value}


def test_a_state_a_target_keeps_is_its_own_after_the_upstream_is_released(compute):
    # The upstream is not a target: its value is released once its one user ran.
    # In-process (sync, threads) the dependent received the scheduler's own State,
    # whose value the release then took from under the kept target.
    graph = gx.Graph()
    with graph:
        kept = keeps(stateful([1, 1]))
    run = compute(graph, kept)
    state = run[kept]["kept"]
    assert state.name == "Completed"
    assert state.result() == [1, 1]


def test_task_option_return_state_skipped_chain(compute):
    graph = gx.Graph()
    with graph:
        root = explode()
        skipped = stateful(root)
        report = collect(skipped)
    run = compute(graph)
    assert run.ok
    assert run[report] == [("state", "Skipped", "UpstreamFailed", root.name, None)]


def test_call_keyword_return_state(compute):
    graph = gx.Graph()
    with graph:
        bad = explode("call broke", return_state=True)
        good = ok(5, return_state=True)
        root = explode("root")
        skipped = ok(root, return_state=True)
        report = collect(bad, good, skipped)
    run = compute(graph)
    assert run.ok
    assert run[report] == [
        ("state", "Failed", "ValueError", None, None),
        ("state", "Completed", None, None, 5),
        ("state", "Skipped", "UpstreamFailed", root.name, None),
    ]


# -- triggers -----------------------------------------------------------------------------

# What a trigger does with each mix of upstream outcomes, read off
# Scheduler._resolve: "failed" counts Failed nodes and nodes Skipped because of
# a failure; "unmet" is a node skipped because its own trigger was not met,
# which does not count as a failure.
SCENARIOS = {
    "ok+ok": ("ok", "ok"),
    "ok+failed": ("ok", "failed"),
    "failed+failed": ("failed", "failed"),
    "skipped": ("skipped",),
    "ok+skipped": ("ok", "skipped"),
    "unmet": ("unmet",),
    "ok+unmet": ("ok", "unmet"),
}
RUNS = {  # trigger -> scenarios in which the dependent runs
    "all_success": {"ok+ok"},
    "all_done": set(SCENARIOS),
    "always": set(SCENARIOS),
    "any_failed": {"ok+failed", "failed+failed", "skipped", "ok+skipped"},
    "all_failed": {"failed+failed", "skipped"},
    "none_failed": {"ok+ok", "unmet", "ok+unmet"},
}


def _upstream(kind: str):
    if kind == "ok":
        return ok(1)
    if kind == "failed":
        return explode("failed upstream")
    if kind == "skipped":
        return ok(explode("failed further up"))
    assert kind == "unmet"
    return on_any_failed(ok(0))  # nothing failed: skipped, trigger not met


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("trigger", list(RUNS))
def test_trigger_table(compute, trigger, scenario):
    dependent_task = collect.with_options(trigger=trigger)
    graph = gx.Graph()
    with graph:
        ups = [_upstream(kind) for kind in SCENARIOS[scenario]]
        dependent = dependent_task(*ups)
        after = ok(dependent)  # default trigger downstream of the dependent
    should_run = scenario in RUNS[trigger]
    any_failure = any(kind in ("failed", "skipped") for kind in SCENARIOS[scenario])
    if any_failure and not should_run:
        with pytest.raises(gx.GraphFailed):
            compute(graph)
        run = graph._latest_run
    else:
        run = compute(graph)  # a trigger that ran handled every failure it saw
        assert run.ok
    state = run.state(dependent)
    if should_run:
        assert state.name == "Completed", state
        received = run.result(after)
        expected = []
        for kind, up in zip(SCENARIOS[scenario], ups):
            if kind == "ok":
                expected.append(("value", 1))
            elif kind == "failed":
                expected.append(("exc", "ValueError", "failed upstream"))
            elif kind == "skipped":
                expected.append(("upstream_failed", run.state(up).upstream))
            else:
                expected.append(("upstream_failed", None))
        assert received == expected
    else:
        assert state.name == "Skipped", state
        assert run.state(after).name == "Skipped"
        if trigger in ("all_success", "none_failed"):
            # skipped because of an upstream: the root failure is named when there is one
            assert (state.upstream is not None) == any_failure
            if any_failure:
                roots = {
                    run.state(up).upstream or up.name
                    for kind, up in zip(SCENARIOS[scenario], ups)
                    if kind != "ok"
                }
                assert state.upstream in roots
        else:
            assert state.upstream is None
            assert f"trigger={trigger!r} not met" in state.message


def test_none_failed_skip_records_the_root_failure(compute):
    graph = gx.Graph()
    with graph:
        root = explode("root")
        strict = ok.with_options(trigger="none_failed")(ok(root))
        reacting = on_any_failed(strict)
    run = compute(graph)  # reacting ran, accepting the failure behind strict's skip
    assert run.ok
    assert run.state(strict).name == "Skipped"
    assert run.state(strict).upstream == root.name
    assert run[reacting] == [("upstream_failed", root.name)]


def test_trigger_unmet_skip_propagates_without_a_root(compute):
    graph = gx.Graph()
    with graph:
        unmet = on_any_failed(ok(1))
        child = ok(unmet)
    run = compute(graph)
    assert run.ok
    assert run.skipped == [unmet, child]
    assert run.state(child).upstream is None
    assert "was skipped" in run.state(child).message
    with pytest.raises(gx.UpstreamFailed) as info:
        run[unmet]
    assert info.value.upstream is None


@pytest.mark.parametrize("order", ["unmet first", "failure first"])
def test_a_failure_upstream_names_the_skip_whatever_the_argument_order(compute, order):
    # One upstream was skipped by an unmet trigger (no failure behind it), the
    # other failed: the skip is the failure's, so it counts as failure-caused
    # further down (none_failed skips, any_failed runs).
    graph = gx.Graph()
    with graph:
        unmet = on_any_failed(ok(0))
        bad = explode("bad")
        both = [unmet, bad] if order == "unmet first" else [bad, unmet]
        mid = collect(*both)
        strict = ok.with_options(trigger="none_failed")(mid)
        reacting = on_any_failed(mid)
    run = compute(graph, raise_on_failure=False, keep="all")
    assert run.state(mid).name == "Skipped"
    assert run.state(mid).upstream == bad.name
    assert run.state(strict).name == "Skipped"
    assert run.state(strict).upstream == bad.name
    assert run[reacting] == [("upstream_failed", bad.name)]


@pytest.mark.parametrize("scheduler", ["processes", "threads"])
def test_trigger_option_on_threads_and_processes(compute):
    graph = gx.Graph()
    with graph:
        root = explode("x")
        skipped = ok(root)
        done = collect.with_options(trigger="all_done")(root, skipped, ok(3))
    run = compute(graph)
    assert run.ok
    assert run[done] == [("exc", "ValueError", "x"), ("upstream_failed", root.name), ("value", 3)]


def test_one_accepting_dependent_handles_the_failure(compute):
    graph = gx.Graph()
    with graph:
        root = explode()
        accepting = collect(gx.allow_failure(root))
        strict = ok(root)
    run = compute(graph)
    assert run.ok
    assert run.failed == [root]
    assert run.unhandled == []
    assert run.state(strict).name == "Skipped"
    assert run.state(accepting).name == "Completed"


# -- GraphFailed --------------------------------------------------------------------------


def test_graph_failed_carries_run_names_failures_and_chains_the_remote_traceback(compute):
    graph = gx.Graph()
    with graph:
        first = explode("first broke")
        second = explode("second broke")
        skipped = ok(first)
        good = ok(4)
    with pytest.raises(gx.GraphFailed) as info:
        compute(graph)
    error = info.value
    run = error.run
    assert isinstance(run, gx.Run)
    assert run is graph._latest_run
    assert run[good] == 4  # partial results are kept
    message = str(error)
    assert first.name in message and second.name in message
    assert skipped.name not in message.splitlines()[0].split(":", 1)[1]
    assert "2 of 4 nodes failed" in message
    assert "ValueError: first broke" in message
    cause = error.__cause__
    assert isinstance(cause, ValueError)
    assert str(cause) == "first broke"
    assert cause is run.state(first).exception
    if compute.scheduler in ("processes", "cluster"):  # the task ran in another process
        remote = cause.__cause__
        assert remote is not None
        text = str(remote)
        assert "in explode" in text
        assert "raise ValueError(message)" in text
        assert "Traceback of explode-0 (in its worker)" in message
        assert "raise ValueError(message)" in message
    else:
        text = "".join(traceback.format_exception(cause))
        assert "in explode" in text
        assert "raise ValueError(message)" in text


def test_graph_failed_lists_at_most_ten_nodes():
    graph = gx.Graph()
    with graph:
        for i in range(12):
            explode(f"n{i}")
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(workers=0)
    first_line = str(info.value).splitlines()[0]
    assert "12 of 12 nodes failed" in first_line
    assert "explode-9" in first_line and "explode-10" not in first_line
    assert "and 2 more" in first_line


def test_raise_on_failure_false_returns_the_run(compute):
    graph = gx.Graph()
    with graph:
        root = explode()
        child = ok(root)
    run = compute(graph, raise_on_failure=False)
    assert not run.ok
    assert run.unhandled == [root]
    assert run.state(child).name == "Skipped"
    with pytest.raises(ValueError, match="boom"):
        run[root]
    assert isinstance(run.result(root, raise_on_failure=False), ValueError)


def test_exception_types_survive_intact(compute):
    class Custom(Exception):  # local class: pickled by value to and from the worker
        def __init__(self, code):
            super().__init__(f"code {code}")
            self.code = code

    @gx.task
    def custom():
        raise Custom(42)

    graph = gx.Graph()
    with graph:
        node = custom()
    with pytest.raises(gx.GraphFailed) as info:
        compute(graph)
    cause = info.value.__cause__
    assert type(cause).__name__ == "Custom"
    assert cause.code == 42
    assert info.value.run.state(node).exception is cause


# -- fail_fast ---------------------------------------------------------------------------


@gx.task
def nap(seconds):
    time.sleep(seconds)
    return seconds


@gx.task
def explode_after(seconds):
    time.sleep(seconds)
    raise RuntimeError("late failure")


@gx.task
def touch(path, *_):
    with open(path, "a") as f:
        f.write("x")
    return path


@gx.task
def nap_then_touch(seconds, path):
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write("x")
    return seconds


# Tagged copies: with limits={"serial": 1} they run one at a time on a dask
# cluster, whose worker count is not graphexec's to set (workers=1 elsewhere).
serial_ok, serial_explode, serial_touch = (
    t.with_options(tags=["serial"]) for t in (ok, explode, touch)
)


def _one_at_a_time(compute):
    """Compute keywords that run one call at a time, so a failure comes before the rest start."""
    if compute.scheduler in ("processes", "threads"):
        return {"workers": 1}
    if compute.scheduler == "cluster":
        return {"limits": {"serial": 1}}
    return {}  # sync: one at a time already


@pytest.mark.timeout(30)
def test_fail_fast_cancels_a_long_running_sibling_promptly(backend, tmp_path):
    cannot_kill = backend.cannot("kill")
    finished = tmp_path / "slow finished"
    # sync runs one call at a time (see CANNOT in conftest.py): no sibling is ever running
    seconds = 0.1 if backend.name == "sync" else 20 if cannot_kill is None else 2.0
    graph = gx.Graph()
    with graph:
        # priority follows creation order here: slow and bad take the two workers
        slow = nap_then_touch(seconds, str(finished))
        bad = explode_after(0.3)
        after = ok(bad)
        queued = [nap.with_options(name="queued")(0.5) for _ in range(4)]
    start = time.monotonic()
    with pytest.raises(gx.GraphFailed) as info:
        backend.compute(graph, fail_fast=True)
    elapsed = time.monotonic() - start
    run = info.value.run
    assert run.state(bad).name == "Failed"
    # its dependent was skipped by the failure itself, not cancelled
    assert run.state(after).name == "Skipped"
    assert run.state(after).upstream == bad.name
    for node in queued:
        assert run.state(node).name == "Cancelled"
    assert run.unhandled == [bad]
    if backend.name == "sync":
        assert run.state(slow).name == "Completed"  # it had finished before bad started
        assert set(run.cancelled) == set(queued)
    else:
        assert elapsed < (5 if cannot_kill is None else 1.5), f"fail_fast took {elapsed:.1f} s"
        assert run.state(slow).name == "Cancelled"
        assert run.state(slow).is_cancelled()
        assert set(run.cancelled) == {slow, *queued}
        # its attempt ran until the cancel (the timeline, JSON and summary show it)
        (attempt,) = run.state(slow).history
        assert attempt.duration >= 0.2 and attempt.worker is not None
        if backend.name != "cluster":  # (dask may start one as bad's thread frees)
            assert all(not run.state(node).history for node in queued)  # never started
        with pytest.raises(gx.Cancelled):
            run[slow]
        if cannot_kill is not None:  # abandoned, not stopped: the call runs on
            deadline = time.monotonic() + 10
            while not finished.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert finished.read_text() == "x"
    # the backend is still usable afterwards
    g2 = gx.Graph()
    with g2:
        again = ok(11)
    assert backend.compute(g2)[again] == 11


@pytest.mark.timeout(20)
def test_under_fail_fast_a_dependent_cancelled_before_it_ran_handles_nothing(pool):
    # bad's only dependent accepts failures (all_done), so bad alone does not
    # cancel the run; the later failure does, and the dependent, waiting for
    # the nap, is cancelled without running: bad's failure stays unhandled.
    graph = gx.Graph()
    with graph:
        napping = nap(20)
        bad = explode("bad")
        cleanup = collect.with_options(trigger="all_done")(bad, napping)
        late = explode_after(0.5)
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(pool=pool, fail_fast=True)
    run = info.value.run
    assert run.state(cleanup).name == "Cancelled"
    assert set(run.unhandled) == {bad, late}
    assert bad.name in str(info.value)


def test_fail_fast_cancels_pending_work_that_never_starts(compute, tmp_path):
    graph = gx.Graph()
    with graph:
        gate = serial_explode("gate")
        dependent = serial_touch(str(tmp_path / "dep"), gate)
        pending = [serial_touch(str(tmp_path / f"f{i}"), wait_for=[serial_ok(i)]) for i in range(3)]
    # one at a time: the gate runs first (it is first in priority order) and alone
    with pytest.raises(gx.GraphFailed):
        compute(graph, fail_fast=True, **_one_at_a_time(compute))
    run = graph._latest_run
    assert run.state(gate).name == "Failed"
    assert run.state(dependent).name == "Skipped"
    assert run.state(dependent).upstream == gate.name
    for node in pending:
        assert run.state(node).name == "Cancelled"
    assert list(tmp_path.iterdir()) == []
    # every member has a final state
    assert all(run.state(n).is_final() for n in run.nodes)


def test_without_fail_fast_independent_work_still_runs(compute, tmp_path):
    graph = gx.Graph()
    with graph:
        gate = explode("gate")
        pending = [touch(str(tmp_path / f"f{i}"), wait_for=[ok(i)]) for i in range(3)]
    with pytest.raises(gx.GraphFailed):
        compute(graph)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0", "f1", "f2"]
    assert graph._latest_run.state(gate).is_failed()
    assert all(graph._latest_run.state(n).is_completed() for n in pending)


@pytest.mark.timeout(20)
def test_fail_fast_still_runs_trigger_always_nodes_once(compute, tmp_path):
    counter = tmp_path / "cleanup"
    graph = gx.Graph()
    with graph:
        # running when bad fails, except on sync, which runs one call at a time
        slow = nap(0.0 if compute.scheduler == "sync" else 0.5)
        bad = explode_after(0.1)
        middle = ok(slow)
        cleanup = touch.with_options(trigger="always")(str(counter), middle)
        cleanup_done = touch.with_options(trigger="all_done")(str(tmp_path / "all_done"), middle)
    with pytest.raises(gx.GraphFailed):
        compute(graph, fail_fast=True)
    run = graph._latest_run
    assert run.state(bad).name == "Failed"
    assert run.state(cleanup).name == "Completed"
    assert run.state(cleanup).attempts == 1
    time.sleep(0.3)  # a duplicate dispatch would still be running on the other worker
    assert counter.read_text() == "x", "the always node ran more than once"
    assert run.state(cleanup_done).name == "Cancelled"
    assert not (tmp_path / "all_done").exists()


def test_fail_fast_does_not_cancel_for_a_handled_failure(compute):
    graph = gx.Graph()
    with graph:
        root = explode()
        report = collect(gx.allow_failure(root))
        other = [ok(i) for i in range(4)]
    run = compute(graph, fail_fast=True)
    assert run.ok
    assert run.cancelled == []
    assert [run[n] for n in other] == [0, 1, 2, 3]
    assert run[report] == [("exc", "ValueError", "boom")]


def test_fail_fast_cancels_when_the_only_dependent_will_not_accept(compute, tmp_path):
    graph = gx.Graph()
    with graph:
        gate = serial_explode("gate")
        strict = serial_touch.with_options(trigger="none_failed")(str(tmp_path / "strict"), gate)
        pending = [serial_touch(str(tmp_path / f"f{i}"), wait_for=[serial_ok(i)]) for i in range(3)]
    with pytest.raises(gx.GraphFailed):
        compute(graph, fail_fast=True, **_one_at_a_time(compute))
    run = graph._latest_run
    assert run.state(strict).name == "Skipped"
    assert [run.state(n).name for n in pending] == ["Cancelled"] * 3
    assert list(tmp_path.iterdir()) == []


def test_fail_fast_cancels_when_a_none_failed_dependent_takes_it_as_allowed(compute, tmp_path):
    # none_failed is skipped by any failure, allow_failure or not: the failure stays
    # unhandled, so fail_fast cancels the rest at once (it waited for nothing).
    graph = gx.Graph()
    with graph:
        gate = serial_explode("gate")
        strict = serial_touch.with_options(trigger="none_failed")(
            str(tmp_path / "strict"), gx.allow_failure(gate)
        )
        pending = [serial_touch(str(tmp_path / f"f{i}"), wait_for=[serial_ok(i)]) for i in range(3)]
    with pytest.raises(gx.GraphFailed):
        compute(graph, fail_fast=True, **_one_at_a_time(compute))
    run = graph._latest_run
    assert run.state(strict).name == "Skipped"
    assert run.unhandled == [gate]
    assert [run.state(n).name for n in pending] == ["Cancelled"] * 3
    assert list(tmp_path.iterdir()) == []


def test_the_failure_fail_fast_stopped_for_stays_unhandled_after_an_always_node(compute, tmp_path):
    # A cleanup that runs after the failure itself (trigger="always", on the failed
    # node) does not turn the failure that made fail_fast cancel into a success.
    graph = gx.Graph()
    with graph:
        bad = serial_explode("first")
        strict = serial_touch(str(tmp_path / "strict"), bad)
        cleanup = serial_touch.with_options(trigger="always")(str(tmp_path / "cleanup"), bad)
    with pytest.raises(gx.GraphFailed):
        compute(graph, fail_fast=True, **_one_at_a_time(compute))
    run = graph._latest_run
    assert run.state(bad).name == "Failed"
    assert run.state(strict).name == "Skipped"
    assert run.state(cleanup).name == "Completed"
    assert run.unhandled == [bad] and not run.ok


@pytest.mark.parametrize("trigger", ["all_done", "always", "any_failed"])
def test_fail_fast_does_not_cancel_for_a_reacting_trigger(compute, trigger):
    graph = gx.Graph()
    with graph:
        gate = explode("gate")
        reaction = collect.with_options(trigger=trigger)(gate)
        others = [ok(i) for i in range(3)]
    run = compute(graph, fail_fast=True)
    assert run.ok
    assert run.cancelled == []
    assert run[reaction] == [("exc", "ValueError", "gate")]
    assert [run[n] for n in others] == [0, 1, 2]


def test_fail_fast_runs_a_queued_always_node_that_had_not_started(compute, tmp_path):
    marker = tmp_path / "cleanup"
    graph = gx.Graph()
    with graph:
        bad = serial_explode("first")
        cleanup = serial_touch.with_options(trigger="always")(str(marker))
        later = serial_touch(str(tmp_path / "later"))
    # one at a time: bad runs first, cleanup and later wait in the queue
    with pytest.raises(gx.GraphFailed):
        compute(graph, fail_fast=True, **_one_at_a_time(compute))
    run = graph._latest_run
    assert run.state(bad).name == "Failed"
    assert run.state(cleanup).name == "Completed"
    assert marker.read_text() == "x"
    assert run.state(later).name == "Cancelled"
    assert not (tmp_path / "later").exists()


@pytest.mark.timeout(30)
def test_the_summary_mean_is_over_the_nodes_that_ran():
    # A node cancelled while it ran counts in the total, and in the mean's count too.
    graph = gx.Graph()
    with graph:
        quick, cut = nap(0.0), nap(20)
        explode_after(0.5)
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(workers=3, fail_fast=True)
    run = info.value.run
    assert run.state(quick).name == "Completed" and run.state(cut).name == "Cancelled"
    row = next(line.split() for line in run.summary().splitlines() if line.startswith("nap "))
    total, mean, longest = (float(x) for x in row[-3:])
    assert longest >= 0.4 and mean <= longest
    assert mean == pytest.approx(total / 2, abs=0.002)


# -- a slot waited for by a node that also waits for another ------------------------


@gx.task(tags=["b"], priority=20)
def holds_b() -> float:
    time.sleep(1.5)
    return time.time()  # when "b" frees


@gx.task(tags=["a"], priority=20)
def holds_a_briefly() -> float:
    time.sleep(0.2)
    return time.time()


@gx.task(tags=["a", "b"])
def needs_a_and_b() -> float:
    return time.time()


@gx.task(tags=["a"])
def needs_a() -> float:
    return time.time()  # when it started


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_a_node_waiting_for_two_slots_leaves_a_freed_one_to_the_next_waiter(scheduler):
    # Both wait for "a"; when it frees, the first still waits for "b": the slot
    # goes to the next node waiting for "a" (of the same priority), not unused
    # until "b" frees (SPEC: waiting for a slot never blocks other ready work).
    # Before, the one woken was parked again under "b" and "a" stayed free.
    # With a higher priority the first keeps it instead (next test).
    graph = gx.Graph()
    with graph:
        b_frees, both, a_only = holds_b(), needs_a_and_b(), needs_a()
        holds_a_briefly()
    run = graph.compute(workers=4, scheduler=scheduler, limits={"a": 1, "b": 1})
    assert run[a_only] < run[b_frees], "the free slot of 'a' waited for 'b'"
    assert run[both] >= run[b_frees]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_a_freed_slot_is_kept_for_a_higher_priority_node_that_waits_for_another(scheduler):
    # Handing "a" to every lower-priority node waiting for it starved the urgent
    # node under a stream of them: it needs "a" and "b" free at once (a review
    # found it starting only after the whole stream). Kept for it, "a" waits for
    # "b" with it, and it runs first.
    graph = gx.Graph()
    with graph:
        holds_b()
        holds_a_briefly()
        urgent = needs_a_and_b.with_options(priority=10)()
        after = [needs_a() for _ in range(3)]
    run = graph.compute(workers=4, scheduler=scheduler, limits={"a": 1, "b": 1})
    assert all(run[urgent] <= run[n] for n in after)
