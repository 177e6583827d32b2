"""The edges of one pool shared by many runs (issue #18 point 1, follow-up): Ctrl-C
and SIGTERM landing while the main thread drives the pool for other runs, a run
waiting for a slot of a limit another run holds, chains of calls that wait in a
queue, and `with pool:` exited in the wrong thread.

The interrupts are injected deterministically: a signal raised (``signal.raise_signal``)
from inside the pool's poll, right after it returned another run's outcomes,
where Python runs the handler at the next bytecode.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import pytest

import graphexec as gx


@gx.task
def nap(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


@gx.task
def other(x: int) -> int:
    return x * 10


def _wait_for(condition: Any, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


def _background_run(pool: gx.Pool, box: dict[str, Any], n: int = 6) -> threading.Thread:
    """A run of `other` nodes in a thread, started once the main thread's run drives."""
    shared = pool._shared

    def body() -> None:
        # The main thread's run is open and holds the drive: this run's calls are
        # queued, sent and answered by the main thread.
        _wait_for(lambda: len(shared._leases) == 1 and shared._drive.locked())
        graph = gx.Graph("background")
        with graph:
            nodes = [other(i) for i in range(n)]
        try:
            run = graph.compute(pool=pool, keep="all", raise_on_failure=False)
            box["values"] = [run[n] if run.state(n).is_completed() else None for n in nodes]
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def _signal_after_poll(monkeypatch: pytest.MonkeyPatch, pool: gx.Pool, signum: int) -> list:
    """Raise ``signum`` in the main thread right after the pool's poll returned an
    outcome of the background run (before the driver has handed it over)."""
    procs = pool._procs
    real_poll = procs.poll
    fired: list[str] = []

    def poll(timeout: float | None) -> list:
        outcomes = real_poll(timeout)
        if (
            not fired
            and threading.current_thread() is threading.main_thread()
            and any(o[0].name.startswith("other") for o in outcomes)
        ):
            fired.append(outcomes[0][0].name)
            signal.raise_signal(signum)
        return outcomes

    monkeypatch.setattr(procs, "poll", poll)
    return fired


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_while_the_main_thread_routes_another_runs_outcomes_loses_none(
    monkeypatch, signum
):
    if signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by someone else in this process")
    expected = gx.Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # (graphexec's SIGTERM wraps it)
    box: dict[str, Any] = {}
    with gx.Pool(workers=2) as pool:
        fired = _signal_after_poll(monkeypatch, pool, signum)
        thread = _background_run(pool, box)
        graph = gx.Graph("main")
        with graph:
            nap(0, 20.0)
        began = time.monotonic()
        with pytest.raises(expected) as caught:
            graph.compute(pool=pool)
        assert fired, "the interrupt was not injected"
        # Acted on at once (within a signal slice of the hand-off), not at the end.
        assert time.monotonic() - began < 10
        assert caught.value.run.state(graph.nodes[0]).name == "Cancelled"
        thread.join(20)
        assert not thread.is_alive(), "the other run lost an outcome and hangs"
        monkeypatch.undo()
    assert "error" not in box, box.get("error")
    assert box["values"] == [i * 10 for i in range(6)]
    if signum == signal.SIGTERM:
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # and no exit: it was caught


@pytest.mark.timeout(60)
def test_the_main_threads_run_failing_in_the_driver_hands_the_drive_on(monkeypatch):
    """Anything escaping the driver (here a bug, injected in the pool's poll) ends
    the main thread's compute; the other run takes the drive and completes."""
    box: dict[str, Any] = {}
    with gx.Pool(workers=2) as pool:
        procs = pool._procs
        real_poll = procs.poll
        fired: list[bool] = []

        def poll(timeout: float | None) -> list:
            if (
                not fired
                and threading.current_thread() is threading.main_thread()
                and len(pool._shared._leases) > 1
            ):
                fired.append(True)
                raise RuntimeError("injected")
            return real_poll(timeout)

        monkeypatch.setattr(procs, "poll", poll)
        thread = _background_run(pool, box)
        graph = gx.Graph("main")
        with graph:
            nap(0, 20.0)
        with pytest.raises(RuntimeError, match="injected"):
            graph.compute(pool=pool)
        thread.join(20)
        assert not thread.is_alive(), "the drive was not handed on"
        monkeypatch.undo()
    assert box["values"] == [i * 10 for i in range(6)]


@gx.task(tags=["db"], priority=10)
def db_call(marker: str, seconds: float) -> int:
    with open(marker, "w"):
        pass
    time.sleep(seconds)
    return 1


@pytest.mark.timeout(90)
def test_a_run_waiting_for_a_slot_another_run_holds_goes_on_with_its_other_nodes(pool, tmp_path):
    """Run A holds the only "db" slot for 3 s. Run B's "db" node (its first, by
    priority) waits for it; B's untagged nodes run meanwhile, long before A's call
    ends; B's "db" node runs after it."""
    marker = str(tmp_path / "a-running")
    box: dict[str, Any] = {}

    def run_a() -> None:
        graph = gx.Graph("a")
        with graph:
            db_call(marker, 3.0)
        box["a"] = graph.compute(pool=pool, limits={"db": 1}, keep="all")

    thread = threading.Thread(target=run_a, daemon=True)
    thread.start()
    _wait_for(lambda: os.path.exists(marker))
    graph = gx.Graph("b")
    with graph:
        slot = db_call(str(tmp_path / "b-running"), 0.0)
        rest = [other(i) for i in range(6)]
    run_b = graph.compute(pool=pool, limits={"db": 1}, keep="all")
    thread.join(30)
    run_a_result = box["a"]
    a_end = run_a_result.state(run_a_result.graph.nodes[0]).history[-1].finished
    assert run_b[slot] == 1 and [run_b[n] for n in rest] == [i * 10 for i in range(6)]
    rest_end = max(run_b.state(n).history[-1].finished for n in rest)
    slot_start = run_b.state(slot).history[-1].started
    assert rest_end < a_end - 1.0, "B's untagged nodes waited for A's db call"
    assert slot_start >= a_end - 0.05, "B's db node did not wait for the slot"


@gx.task
def fail(x: int) -> int:
    raise ValueError("fails on purpose")


@pytest.mark.timeout(90)
def test_a_run_cancelled_while_its_calls_wait_for_a_slot_leaves_no_claim_on_it(pool, tmp_path):
    """Run B's "db" calls wait for the slot run A holds; B fails fast meanwhile.
    Its waiting calls are dropped (Cancelled), and once A's call ends the slot is
    free for the next run: nothing of B's is still counted or waiting."""
    marker = str(tmp_path / "a-running")
    box: dict[str, Any] = {}

    def run_a() -> None:
        graph = gx.Graph("a")
        with graph:
            db_call(marker, 1.5)
        box["a"] = graph.compute(pool=pool, limits={"db": 1})

    thread = threading.Thread(target=run_a, daemon=True)
    thread.start()
    _wait_for(lambda: os.path.exists(marker))
    graph = gx.Graph("b")
    with graph:
        waiting = [db_call(str(tmp_path / f"b{i}"), 0.0) for i in range(3)]
        nap(0, 0.2)
        fail(0)
    run_b = graph.compute(pool=pool, limits={"db": 1}, fail_fast=True, raise_on_failure=False)
    assert {run_b.state(n).name for n in waiting} == {"Cancelled"}
    thread.join(30)
    assert box["a"].ok
    shared = pool._shared
    assert shared._n_held == 0 and not shared._held_keys
    _wait_for(lambda: not shared._in_use)  # A's call answered: its slot is free
    after = gx.Graph("c")
    with after:
        last = db_call(str(tmp_path / "c"), 0.0)
    assert after.compute(pool=pool, limits={"db": 1})[last] == 1


@gx.task
def first(x: int) -> int:
    return x + 1


@gx.task
def second(x: int) -> int:
    return x * 2


@gx.task
def third(x: int) -> int:
    return x - 3


@pytest.mark.timeout(90)
def test_chains_are_sent_when_calls_wait_in_a_queue_behind_another_runs(monkeypatch):
    """Run A's thread drives the pool all along (it waits for its one long call), so
    every call of run B waits in B's queue until A's thread sends it; B's chains
    (first -> second -> third, sole consumers) still go to a worker as one unit,
    and every value is right."""
    with gx.Pool(workers=2) as pool:
        procs, shared = pool._procs, pool._shared
        real_deliver = procs._deliver
        chains: list[tuple[int, bool]] = []

        def deliver(worker: Any, calls: list) -> int:
            if calls and calls[0][0].name.startswith("first"):
                mine = threading.current_thread() is threading.main_thread()
                chains.append((len(calls), mine))
            return real_deliver(worker, calls)

        monkeypatch.setattr(procs, "_deliver", deliver)
        box: dict[str, Any] = {}

        def run_a() -> None:
            graph = gx.Graph("a")
            with graph:
                nap(0, 3.0)
            box["a"] = graph.compute(pool=pool)

        thread = threading.Thread(target=run_a, daemon=True)
        thread.start()
        _wait_for(lambda: len(shared._leases) == 1 and shared._drive.locked())
        graph = gx.Graph("b")
        with graph:
            ends = [third(second(first(i))) for i in range(8)]
        run = graph.compute(pool=pool)
        thread.join(30)
        assert [run[e] for e in ends] == [(i + 1) * 2 - 3 for i in range(8)]
        assert box["a"].ok
        assert chains and not any(mine for _, mine in chains), "B sent its own calls"
        assert max(n for n, _ in chains) == 3, chains


@pytest.mark.timeout(60)
def test_exiting_with_pool_in_another_thread_is_a_clear_error():
    pool = gx.Pool(workers=1)
    try:
        pool.__enter__()
        errors: list[BaseException] = []

        def exit_elsewhere() -> None:
            try:
                pool.__exit__(None, None, None)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=exit_elsewhere, name="elsewhere")
        thread.start()
        thread.join(20)
        (error,) = errors
        assert type(error) is RuntimeError
        assert "did not enter it" in str(error) and "'elsewhere'" in str(error)
        assert not pool.closed  # nothing changed
        assert other.submit(4).result(timeout=20) == 40
        pool.__exit__(None, None, None)  # the entering thread still can
        assert pool.closed
    finally:
        pool.close()


def test_a_handler_of_your_own_waits_for_the_end_of_the_critical_section():
    """The mechanism itself: inside ``with SHIELD:`` (nested too) a wrapped handler
    does not run; it runs once, as the outermost section ends, and its exception
    leaves from there. Outside any section it runs at once. The handler is put
    back afterwards."""
    from graphexec._executors.shared import SHIELD
    from graphexec._surfaces.signals import deferred_in_critical_sections

    seen: list[int] = []

    def mine(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, mine)
    try:
        with deferred_in_critical_sections():
            assert signal.getsignal(signal.SIGINT) is not mine  # wrapped
            with pytest.raises(KeyboardInterrupt), SHIELD:
                with SHIELD:
                    signal.raise_signal(signal.SIGINT)
                    assert seen == []
                assert seen == []  # still inside the outer section
            assert seen == [signal.SIGINT]
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
            assert seen == [signal.SIGINT] * 2
        assert signal.getsignal(signal.SIGINT) is mine
        assert SHIELD.depth == 0 and not SHIELD.pending
    finally:
        signal.signal(signal.SIGINT, previous)
