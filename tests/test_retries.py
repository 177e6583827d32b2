"""Retries (SPEC §3): attempt counting, delays, retry_on, Prefect aliases, non-blocking waits.

Attempts are counted in a file under ``tmp_path`` so that a task failing
then succeeding is visible across worker processes. Delays stay at 0.3 s
or less.
"""

from __future__ import annotations

import itertools
import os
import random
import time

import pytest

import graphexec as gx

ALL_SCHEDULERS = ("processes", "sync", "threads")
TOLERANCE = 0.01  # seconds of clock slack when comparing wall-clock stamps


def bump(path):
    """Add one to the counter in ``path`` and return the new count."""
    try:
        with open(path) as f:
            count = int(f.read() or 0)
    except FileNotFoundError:
        count = 0
    count += 1
    with open(path, "w") as f:
        f.write(str(count))
    return count


def read_count(path):
    with open(path) as f:
        return int(f.read())


@gx.task
def flaky(path, fails, kind=ValueError, message="attempt {n} failed"):
    """Fail the first ``fails`` attempts (counted in ``path``), then return the attempt."""
    n = bump(path)
    if n <= fails:
        raise kind(message.format(n=n))
    return n


@gx.task
def plus_one(x):
    return x + 1


@gx.task
def nap(seconds):
    time.sleep(seconds)
    return seconds


def gaps(history):
    return [b.started - a.finished for a, b in itertools.pairwise(history)]


# -- counting attempts ------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_retries_until_success(compute, tmp_path):
    counter = tmp_path / "n"
    graph = gx.Graph()
    with graph:
        node = flaky.with_options(retries=3)(str(counter), 2)
        after = plus_one(node)
    run = compute(graph, keep="all")
    assert run.ok
    assert run[node] == 3
    assert run[after] == 4
    assert read_count(counter) == 3
    state = run.state(node)
    assert state.name == "Completed"
    assert state.attempts == 3
    history = state.history
    assert [a.number for a in history] == [1, 2, 3]
    assert [type(a.error).__name__ for a in history] == ["ValueError", "ValueError", "NoneType"]
    assert str(history[0].error) == "attempt 1 failed"
    assert [a.retry_delay for a in history] == [0.0, 0.0, None]
    for attempt in history:
        assert isinstance(attempt, gx.Attempt)
        assert attempt.started <= attempt.finished
        assert attempt.duration >= 0
    assert all(g >= -TOLERANCE for g in gaps(history))
    assert state.started == history[0].started
    assert state.finished == history[-1].finished
    assert state.duration == pytest.approx(sum(a.duration for a in history))


def test_retries_n_means_n_plus_one_attempts_then_failed(compute, tmp_path):
    counter = tmp_path / "n"
    graph = gx.Graph()
    with graph:
        node = flaky.with_options(retries=2)(str(counter), 99)
        after = plus_one(node)
    with pytest.raises(gx.GraphFailed) as info:
        compute(graph)
    run = info.value.run
    assert read_count(counter) == 3
    state = run.state(node)
    assert state.name == "Failed"
    assert state.attempts == 3
    assert str(state.exception) == "attempt 3 failed"  # the last attempt's exception
    assert info.value.__cause__ is state.exception
    assert [str(a.error) for a in state.history] == [f"attempt {n} failed" for n in (1, 2, 3)]
    assert state.history[-1].retry_delay is None
    assert run.state(after).name == "Skipped"
    assert "after 3 attempts" in run.summary()


def test_no_retries_by_default(compute, tmp_path):
    counter = tmp_path / "n"
    graph = gx.Graph()
    with graph:
        node = flaky(str(counter), 1)
    with pytest.raises(gx.GraphFailed):
        compute(graph)
    assert read_count(counter) == 1
    assert graph._latest_run.state(node).attempts == 1


def test_second_compute_counts_attempts_afresh(compute, tmp_path):
    counter = tmp_path / "n"
    graph = gx.Graph()
    with graph:
        node = flaky.with_options(retries=1)(str(counter), 3)
    with pytest.raises(gx.GraphFailed) as first:
        compute(graph)
    run2 = compute(graph)  # attempts 3 (fails) and 4 (succeeds)
    assert first.value.run.state(node).attempts == 2
    assert run2.state(node).attempts == 2
    assert run2[node] == 4
    assert first.value.run.state(node).name == "Failed"


def test_retry_under_fail_fast_is_not_a_failure_yet(compute, tmp_path):
    graph = gx.Graph()
    with graph:
        node = flaky.with_options(retries=1)(str(tmp_path / "n"), 1)
        others = [plus_one(i) for i in range(3)]
    run = compute(graph, fail_fast=True)
    assert run.ok
    assert run.cancelled == []
    assert run[node] == 2
    assert [run[o] for o in others] == [1, 2, 3]


@gx.task
def explode_soon(after=None):
    # Fail once the sibling has made its first attempt (a fresh worker may need a
    # moment to start and import this module), or after 0.05 s without a sibling.
    deadline = time.monotonic() + 10
    while after is not None and not os.path.exists(after) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    raise RuntimeError("sibling failed")


@pytest.mark.timeout(20)
def test_fail_fast_cancels_a_node_waiting_for_its_retry(compute, tmp_path):
    graph = gx.Graph()
    with graph:
        waiting = flaky.with_options(retries=3, retry_delay=5)(str(tmp_path / "n"), 99)
        explode_soon(str(tmp_path / "n"))
    start = time.monotonic()
    with pytest.raises(gx.GraphFailed) as info:
        compute(graph, fail_fast=True)
    assert time.monotonic() - start < 3  # nobody waited out the 5 s delay
    state = info.value.run.state(waiting)
    assert state.name == "Cancelled"
    assert state.attempts == 1
    assert read_count(tmp_path / "n") == 1


# -- delays ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        (0.1, [0.1, 0.1]),
        ([0.05, 0.15], [0.05, 0.15]),
        ([0.02, 0.05, 0.1], [0.02, 0.05]),
        ((0.08,), [0.08, 0.08]),  # the last delay repeats
        (gx.exponential_backoff(0.03, 3), [0.03, 0.09]),
        (gx.exponential_backoff(0.05, 10, max=0.1), [0.05, 0.1]),
        (lambda retry: 0.02 * retry, [0.02, 0.04]),  # any callable of the retry number
    ],
    ids=["number", "list", "longer-list", "short-list", "backoff", "backoff-max", "callable"],
)
def test_retry_delays_are_applied(compute, tmp_path, delay, expected):
    graph = gx.Graph()
    with graph:
        node = flaky.with_options(retries=2, retry_delay=delay)(str(tmp_path / "n"), 2)
    run = compute(graph)
    history = run.state(node).history
    assert [a.retry_delay for a in history[:-1]] == pytest.approx(expected)
    for gap, wanted in zip(gaps(history), expected):
        assert gap >= wanted - TOLERANCE
        assert gap < wanted + 1.0


def test_backoff_jitter_is_recorded_per_attempt(compute, tmp_path):
    backoff = gx.exponential_backoff(0.05, 2, jitter=0.5)
    graph = gx.Graph()
    with graph:
        node = flaky.with_options(retries=2, retry_delay=backoff)(str(tmp_path / "n"), 2)
    run = compute(graph)
    history = run.state(node).history
    first, second = history[0].retry_delay, history[1].retry_delay
    assert 0.025 <= first <= 0.075
    assert 0.05 <= second <= 0.15
    for gap, wanted in zip(gaps(history), (first, second)):
        assert gap >= wanted - TOLERANCE


def prefects_exponential_backoff(backoff_factor):
    """prefect.tasks.exponential_backoff, as Prefect 3 defines it: a callable that
    returns the list of delays for ``retries`` retries."""

    def retry_delays(retries):
        return [backoff_factor * max(0, 2**r) for r in range(retries)]

    return retry_delays


def test_prefects_callable_that_returns_a_list_of_delays_is_taken(compute, tmp_path):
    # It returned a list: "it must return a finite number of seconds", and no retry.
    graph = gx.Graph()
    with graph:
        node = flaky.with_options(
            retries=3, retry_delay_seconds=prefects_exponential_backoff(0.01)
        )(str(tmp_path / "n"), 3)
    run = compute(graph)
    history = run.state(node).history
    assert run[node] == 4
    assert [a.retry_delay for a in history[:-1]] == pytest.approx([0.01, 0.02, 0.04])
    assert gx.exponential_backoff(backoff_factor=0.5)(3) == 2.0  # Prefect's keyword too


def test_backoff_past_a_floats_range_is_its_max():
    # (2 ** 1100 raised OverflowError: the node failed as "its retry_delay failed")
    assert gx.exponential_backoff(0.5, 2.0, max=30)(1100) == 30
    assert gx.exponential_backoff(0.5, 2.0)(1100) == float("inf")  # refused when used


def test_prefects_retry_jitter_factor_spreads_each_delay(compute, tmp_path):
    # Prefect's spelling: at most (1 + factor) times the delay; within ±factor here.
    task = flaky.with_options(retries=2, retry_delay_seconds=[0.04, 0.08], retry_jitter_factor=0.5)
    assert task.options.retry_jitter_factor == 0.5
    graph = gx.Graph()
    with graph:
        node = task(str(tmp_path / "n"), 2)
    history = compute(graph).state(node).history
    first, second = history[0].retry_delay, history[1].retry_delay
    assert 0.02 <= first <= 0.06
    assert 0.04 <= second <= 0.12
    for gap, wanted in zip(gaps(history), (first, second)):
        assert gap >= wanted - TOLERANCE
    # Drawn: many delays are not all equal, and stay within their bounds.
    from graphexec._model.options import retry_delay_for

    draws = {retry_delay_for(task.options, 1) for _ in range(200)}
    assert len(draws) > 100 and min(draws) >= 0.02 and max(draws) <= 0.06
    wide = flaky.with_options(retry_delay=1.0, retry_jitter_factor=3).options
    assert all(0.0 <= retry_delay_for(wide, 1) <= 4.0 for _ in range(200))
    none = flaky.with_options(retry_delay=1.0, retry_jitter_factor=None).options  # Prefect's
    assert retry_delay_for(none, 1) == 1.0


@pytest.mark.parametrize(
    ("value", "error"), [(-0.1, ValueError), (float("inf"), ValueError), ("0.1", TypeError)]
)
def test_a_bad_retry_jitter_factor_is_refused_at_decoration(value, error):
    with pytest.raises(error, match="retry_jitter_factor"):
        gx.task(retry_jitter_factor=value)(bump)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_a_waiting_retry_blocks_no_worker(compute, tmp_path):
    delay = 0.3
    graph = gx.Graph()
    with graph:
        retried = flaky.with_options(retries=1, retry_delay=delay)(str(tmp_path / "n"), 1)
        independent = nap(0.1)
    # one worker: the independent node can only run while the retry waits
    extra = {"workers": 1} if compute.scheduler != "sync" else {}
    run = compute(graph, keep="all", **extra)
    first, second = run.state(retried).history
    other = run.state(independent)
    assert first.error is not None and second.error is None
    assert first.finished <= other.started + TOLERANCE
    assert other.started - first.finished < delay - 0.1, "the independent node waited"
    assert other.finished <= second.started + TOLERANCE
    assert second.started - first.finished >= delay - TOLERANCE


def _broken_delay(retry):
    return 1 / 0


@pytest.mark.parametrize(
    ("delay", "why"),
    [
        (_broken_delay, "ZeroDivisionError"),
        (lambda retry: -1, "returned -1"),
        (lambda retry: float("nan"), "returned nan"),
        (lambda retry: "soon", "returned 'soon'"),
    ],
)
def test_a_retry_delay_that_fails_fails_its_node_only(compute, tmp_path, delay, why):
    """A callable retry_delay is the user's code: if it raises, or answers no number
    of seconds >= 0, its node fails with its own error, not retried, the message
    says why, and the rest of the run goes on (it crashed the whole compute)."""
    graph = gx.Graph()
    with graph:
        node = flaky.with_options(retries=2, retry_delay=delay)(str(tmp_path / "n"), 1)
        other = plus_one(1)
    with pytest.raises(gx.GraphFailed) as caught:
        compute(graph)
    run = caught.value.run
    state = run.state(node)
    assert state.name == "Failed" and isinstance(state.exception, ValueError)
    assert state.attempts == 1
    assert "not retried: its retry_delay failed" in state.message and why in state.message
    assert run[other] == 2


def test_retry_delay_seconds_alias(compute, tmp_path):
    task = flaky.with_options(retries=1, retry_delay_seconds=0.05)
    assert task.options.retry_delay == 0.05
    graph = gx.Graph()
    with graph:
        node = task(str(tmp_path / "n"), 1)
    run = compute(graph)
    assert run.state(node).history[0].retry_delay == 0.05
    assert gaps(run.state(node).history)[0] >= 0.05 - TOLERANCE


@gx.task
def _sleeps(seconds):
    time.sleep(seconds)
    return seconds


def test_timeout_seconds_alias(pool):
    # Prefect's spelling of timeout=: the same option, enforced the same way (on a
    # process pool: sync cannot stop a call that runs in the caller's thread).
    task = _sleeps.with_options(timeout_seconds=0.3)
    assert task.options.timeout == 0.3
    graph = gx.Graph()
    with graph:
        slow = task(30)
        quick = _sleeps(0)
    started = time.monotonic()
    run = graph.compute(pool=pool, raise_on_failure=False)
    state = run.state(slow)
    assert state.name == "Failed" and isinstance(state.exception, gx.TaskTimeout)
    assert run[quick] == 0
    assert time.monotonic() - started < 20  # not the task's 30 s


def test_aliases_and_their_originals_are_exclusive():
    with pytest.raises(TypeError, match="alias"):
        gx.task(retry_delay=1, retry_delay_seconds=1)(bump)
    with pytest.raises(TypeError, match="alias"):
        gx.task(retry_on=ValueError, retry_condition_fn=lambda e: True)(bump)
    with pytest.raises(TypeError, match="alias"):
        gx.task(timeout=1, timeout_seconds=1)(bump)


# -- retry_on ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_on", "kind", "attempts"),
    [
        (ValueError, ValueError, 3),
        (ValueError, TypeError, 1),
        ((KeyError, ValueError), ValueError, 3),
        ((KeyError, OSError), ValueError, 1),
        (LookupError, KeyError, 3),  # subclasses match
        (None, TypeError, 3),  # None: retry everything
    ],
)
def test_retry_on_exception_types(compute, tmp_path, retry_on, kind, attempts):
    graph = gx.Graph()
    with graph:
        node = flaky.with_options(retries=2, retry_on=retry_on)(str(tmp_path / "n"), 99, kind)
    with pytest.raises(gx.GraphFailed):
        compute(graph)
    state = graph._latest_run.state(node)
    assert state.attempts == attempts
    assert isinstance(state.exception, kind)
    assert read_count(tmp_path / "n") == attempts


class TwoArgsError(Exception):
    """Its __init__ does not take its own args back (as many user exceptions): the
    default pickle cannot rebuild it, so it once arrived as a RemoteError, which
    retry_on=TwoArgsError did not match: no retry."""

    def __init__(self, path, code):
        super().__init__(f"{path} failed with code {code}")
        self.code = code


@gx.task
def fails_with_two_args(path):
    raise TwoArgsError(path, bump(path))


def test_retry_on_matches_an_exception_whose_init_takes_other_arguments(compute, tmp_path):
    graph = gx.Graph()
    with graph:
        node = fails_with_two_args.with_options(retries=2, retry_on=TwoArgsError)(
            str(tmp_path / "n")
        )
    run = compute(graph, raise_on_failure=False)
    state = run.state(node)
    assert state.attempts == 3
    assert type(state.exception) is TwoArgsError and state.exception.code == 3


def test_retry_on_predicate_gets_the_exception(compute, tmp_path):
    seen = []

    def transient(exc):
        seen.append(exc)
        return "transient" in str(exc)

    retrying = flaky.with_options(retries=3, retry_on=transient)
    graph = gx.Graph()
    with graph:
        healed = retrying(str(tmp_path / "a"), 2, message="transient glitch {n}")
        fatal = retrying(str(tmp_path / "b"), 2, message="disk full {n}")
    with pytest.raises(gx.GraphFailed) as info:
        compute(graph)
    run = info.value.run
    assert run[healed] == 3
    assert run.state(fatal).attempts == 1
    assert run.unhandled == [fatal]
    # the predicate runs in this process and sees the task's own exceptions
    assert sorted(str(e) for e in seen) == [
        "disk full 1",
        "transient glitch 1",
        "transient glitch 2",
    ]
    assert all(isinstance(e, ValueError) for e in seen)


def test_retry_condition_fn_prefect_form(compute, tmp_path):
    calls = []

    def retry_condition_fn(task, task_run, state):
        calls.append((task, task_run, state))
        return isinstance(state.exception, ValueError) and state.attempts < 2

    retrying = flaky.with_options(retries=5, retry_condition_fn=retry_condition_fn)
    graph = gx.Graph()
    with graph:
        node = retrying(str(tmp_path / "n"), 99)
    with pytest.raises(gx.GraphFailed):
        compute(graph)
    state = graph._latest_run.state(node)
    assert state.attempts == 2  # the predicate said no once two attempts had run
    assert len(calls) == 2
    task, task_run, failed = calls[0]
    assert isinstance(task, gx.Task)
    assert task.name == "flaky"
    assert isinstance(failed, gx.State)
    assert failed.is_failed()
    assert str(failed.exception) == "attempt 1 failed"
    assert isinstance(task_run, gx.State)


def test_retry_predicate_that_raises_stops_retrying(compute, tmp_path, caplog):
    def broken(exc):
        raise RuntimeError("bug in predicate")

    graph = gx.Graph()
    with graph:
        node = flaky.with_options(retries=3, retry_on=broken)(str(tmp_path / "n"), 99)
    with pytest.raises(gx.GraphFailed) as info:
        compute(graph)
    state = info.value.run.state(node)
    assert state.attempts == 1
    assert isinstance(state.exception, ValueError)  # the task's failure, not the predicate's
    assert "bug in predicate" in caplog.text
    # and the state says why retries=3 never happened (run.summary() shows it)
    assert (
        "not retried: its retry_on/retry_condition_fn raised RuntimeError: bug in predicate"
        in state.message
    )


# -- exponential_backoff ------------------------------------------------------------------------


def test_exponential_backoff_values():
    backoff = gx.exponential_backoff(0.5, 2)
    assert [backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    capped = gx.exponential_backoff(base=1, factor=3, max=10)
    assert [capped(n) for n in (1, 2, 3, 4, 5)] == [1, 3, 9, 10, 10]
    default = gx.exponential_backoff()
    assert [default(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert "base=0.5" in repr(backoff)


def test_exponential_backoff_jitter_spreads_within_bounds():
    rng_state = random.getstate()
    try:
        random.seed(1234)
        backoff = gx.exponential_backoff(2, 2, max=4, jitter=0.25)
        firsts = [backoff(1) for _ in range(300)]
        capped = [backoff(5) for _ in range(300)]
    finally:
        random.setstate(rng_state)
    assert all(1.5 <= d <= 2.5 for d in firsts)
    assert all(3.0 <= d <= 5.0 for d in capped)  # jitter applies after the cap
    assert len(set(firsts)) > 100  # not in lock-step
    assert min(firsts) < 1.75 and max(firsts) > 2.25


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": -1},
        {"factor": -2},
        {"jitter": 1.5},
        {"jitter": -0.1},
        {"max": -3},
        {"base": float("nan")},
    ],
)
def test_exponential_backoff_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        gx.exponential_backoff(**kwargs)
