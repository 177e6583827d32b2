"""Eager sessions under threads (issue #12): one owner of run state, waits that end.

A flow or ``with gx.Pool()`` block runs a scheduler in a background thread;
user threads submit into it and wait on its futures. These tests race user
threads against the scheduler thread and against ``close``, and check that:

* only the session's scheduler thread writes scheduler and Run state;
* a submit or a lazy compute racing ``close`` runs or is refused, never hangs,
  and a dead scheduler thread ends every wait;
* threads submitting cached tasks into one flow share one cache store, and no
  entry lock outlives the flow;
* ``gx.wait``/``gx.as_completed`` are woken by the scheduler (no polling),
  work across sessions, and are O(n log n);
* an idle session's executor sleeps instead of waking every slice.

Sessions are built directly (``Session(executor)``) where a test needs to hold
one across threads or close it at a chosen moment.
"""

from __future__ import annotations

import fcntl
import os
import random
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import graphexec as gx
from graphexec._data.cache import CacheStore
from graphexec._engine.scheduler import Scheduler
from graphexec._executors import process as process_module
from graphexec._executors.inprocess import SyncExecutor, ThreadExecutor
from graphexec._model.graph import Graph
from graphexec._surfaces import eager
from graphexec._surfaces.eager import (
    PoolBlock,
    Session,
    flow_session,
    pop_context,
    push_context,
)
from graphexec._surfaces.options import ComputeOptions

# -- tasks ------------------------------------------------------------------------------


@gx.task
def inc(x: int) -> int:
    return x + 1


@gx.task
def explode(message: str = "boom") -> None:
    raise ValueError(message)


@gx.task
def hold(gate: threading.Event, tag: str) -> str:
    """Block until ``gate`` opens (threads and sync only: an Event does not pickle)."""
    gate.wait(20)
    return tag


@gx.task(cache_key_fn=gx.task_input_hash, cache_expiration=timedelta(hours=1))
def cached_inc(x: int) -> int:
    return x + 1


def in_thread(fn: Any, seconds: float = 10.0) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not end."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} still waiting after {seconds} s: a hang"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- one owner for run state ----------------------------------------------------------


class _WriteLog:
    """Which threads wrote the state the scheduler thread must own."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []  # (what, thread name)
        self.armed = False

    def note(self, what: str) -> None:
        if self.armed:
            self.writes.append((what, threading.current_thread().name))


class _LoggedSet(set):
    def __init__(self, log: _WriteLog) -> None:
        super().__init__()
        self.log = log

    def add(self, item: Any) -> None:
        self.log.note("run._handled")
        super().add(item)

    def update(self, *items: Any) -> None:
        self.log.note("run._handled")
        super().update(*items)


@pytest.mark.timeout(60)
def test_only_the_scheduler_thread_writes_scheduler_and_run_state(monkeypatch):
    """Cancel, cache opening, looked-at failures and a lazy compute all go through the
    inbox: every write to cancel_reason, cache and run._handled happens on the
    session's scheduler thread (before: the flow body's thread wrote them)."""
    log = _WriteLog()

    class LoggedScheduler(Scheduler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.handled = self.run_._handled = _LoggedSet(log)

        def __setattr__(self, name: str, value: Any) -> None:
            if name in ("cancel_reason", "cache"):
                log.note(name)
            super().__setattr__(name, value)

    monkeypatch.setattr(eager, "Scheduler", LoggedScheduler)

    def body(cache: str) -> None:
        log.armed = True
        assert cached_inc.submit(1).result() == 2
        with pytest.raises(ValueError):
            explode.submit().result()  # looked at: handled
        with gx.Graph() as graph:
            node = explode("lazy")
        graph.compute(raise_on_failure=False)
        gate = threading.Event()
        hold.submit(gate, "never")
        assert node is not None
        raise KeyError("stop")  # the flow cancels what is left

    with pytest.raises(KeyError):
        gx.flow(scheduler="threads", workers=2, name="owned")(body)(cache="x")
    assert {what for what, _ in log.writes} >= {"cancel_reason", "cache", "run._handled"}
    assert {thread for _, thread in log.writes} == {"graphexec-owned"}, log.writes


@pytest.mark.timeout(60)
def test_cancel_from_a_user_thread_is_applied_by_the_scheduler_thread():
    """While the scheduler thread is busy, a cancel waits in its inbox; the scheduler
    applies it at its next step and cancels what is pending."""
    session = Session(SyncExecutor(), name="busy")
    gate = threading.Event()
    try:
        first = session.submit(hold, (gate, "first"), {})
        second = session.submit(inc, (1,), {})
        deadline = time.monotonic() + 5
        while not session.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        session.cancel("user said stop")
        assert session.scheduler.cancel_reason is None  # not written by this thread
        gate.set()
        assert first.wait(10).name == "Completed"  # it was running in this thread
        assert second.wait(10).name == "Cancelled"
        assert session.scheduler.cancel_reason == "user said stop"
    finally:
        gate.set()
        session.close()


# -- defect 2: submit racing close ----------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("executor", ["threads", "sync"])
def test_submits_racing_close_either_run_or_are_refused(executor, monkeypatch):
    """Eight threads submit as fast as they can while the session closes: each submit
    returns a future that ends, or raises RuntimeError; nothing hangs.

    Building a node is slowed down to widen the race: a submit that had seen the
    session open used to queue its node after the scheduler thread had left.
    """
    real_add_call = Graph._add_call

    def slow_add_call(self: Graph, *args: Any) -> Any:
        time.sleep(0.002)
        return real_add_call(self, *args)

    monkeypatch.setattr(Graph, "_add_call", slow_add_call)
    for delay in range(10):  # close at different points of the burst
        _submit_while_closing(executor, 0.003 * delay)


def _submit_while_closing(executor: str, delay: float) -> None:
    session = Session(ThreadExecutor(2) if executor == "threads" else SyncExecutor())
    start = threading.Barrier(9)
    futures: list[Any] = []
    refused: list[RuntimeError] = []
    lock = threading.Lock()

    def submitter() -> None:
        push_context(session)
        try:
            start.wait()
            for k in range(200):
                try:
                    future = inc.submit(k)
                except RuntimeError as exc:
                    with lock:
                        refused.append(exc)
                    return
                with lock:
                    futures.append(future)
        finally:
            pop_context(session)

    threads = [threading.Thread(target=submitter, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(delay)
    in_thread(session.close)
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert refused  # the close did race the submits
    for exc in refused:
        assert "this flow/pool has finished" in str(exc)
    results = in_thread(lambda: [f.result(timeout=10) for f in futures])
    assert sorted(results) == sorted(f.graph._args[f.index][0] + 1 for f in futures)


@pytest.mark.timeout(60)
def test_a_lazy_compute_after_the_session_closed_is_refused_not_hung():
    """graph.compute() into a pool's session that another thread just closed: it used
    to queue its nodes for a scheduler thread that had already left, and wait forever."""
    session = Session(ThreadExecutor(1))
    session.close()
    with gx.Graph() as graph:
        inc(1)
    with pytest.raises(RuntimeError, match="this flow/pool has finished"):
        in_thread(lambda: session.compute_graph(graph, [], ComputeOptions.validate("test")))


@pytest.mark.timeout(60)
def test_a_dead_scheduler_thread_ends_every_wait(monkeypatch):
    """If the scheduler thread dies, result(), wait_all(), gx.wait and gx.as_completed
    raise RuntimeError at once (gx.wait and as_completed used to poll forever)."""

    def broken_admit(self: Scheduler, i: int) -> None:
        raise OSError("scheduler thread broke")

    monkeypatch.setattr(Scheduler, "admit", broken_admit)
    session = Session(ThreadExecutor(1), name="doomed")
    try:
        future = session.submit(inc, (1,), {})
        for wait in (
            lambda: future.result(),
            session.wait_all,
            lambda: gx.wait([future]),
            lambda: list(gx.as_completed([future])),
        ):
            with pytest.raises(RuntimeError, match="scheduler thread failed") as info:
                in_thread(wait)
            assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(RuntimeError, match="scheduler thread failed"):
            session.submit(inc, (2,), {})
    finally:
        session.close()


# -- defect 3: one cache store per flow -----------------------------------------------


def _lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # (closing drops our own lock, if we got it)
    return True


@pytest.mark.timeout(120)
def test_threads_submitting_cached_tasks_into_one_flow_share_one_cache_store(monkeypatch, tmp_path):
    """Eight threads submit cached tasks into one flow at once: one CacheStore takes
    the entries' locks, and after the flow every lock is free (two stores used to
    leave the first one's flock held for the life of the process). (Workers write
    entries through stores of their own, which never lock.)"""
    lockers: set[int] = set()
    real_try_lock = CacheStore.try_lock_many
    real_init = CacheStore.__init__

    def slow_init(self: CacheStore, root: Any) -> None:
        time.sleep(0.02)  # widens the race between threads opening the store
        real_init(self, root)

    monkeypatch.setattr(CacheStore, "__init__", slow_init)

    def noting_try_lock(self: CacheStore, keys: list[str]) -> list[bool]:
        lockers.add(id(self))
        return real_try_lock(self, keys)

    monkeypatch.setattr(CacheStore, "try_lock_many", noting_try_lock)  # try_lock's too

    def body() -> list[int]:
        session = flow_session()
        assert session is not None
        start = threading.Barrier(8)
        results: list[int] = []
        lock = threading.Lock()

        def submitter(n: int) -> None:
            push_context(session)
            try:
                start.wait()
                futures = [cached_inc.submit(10 * n + k) for k in range(10)]
                values = [f.result() for f in futures]
            finally:
                pop_context(session)
            with lock:
                results.extend(values)

        threads = [threading.Thread(target=submitter, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        return sorted(results)

    flow = gx.flow(scheduler="threads", workers=2, cache_dir=str(tmp_path))(body)
    assert flow() == [x + 1 for x in range(80)]
    assert len(lockers) == 1
    locks = list(tmp_path.rglob("*.lock"))
    assert locks  # every entry was computed under its lock
    assert all(_lock_is_free(path) for path in locks)


@pytest.mark.timeout(60)
def test_threads_submitting_into_one_pool_block_share_one_session():
    """The first submits of a `with gx.Pool()` block, from several threads at once,
    start one session (each used to be able to start its own)."""
    with gx.Pool(workers=1) as pool:
        block = PoolBlock(pool)  # (one block's context, entered by six threads)
        start = threading.Barrier(6)
        futures: list[Any] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def submitter() -> None:
            push_context(block)
            try:
                start.wait()
                future = inc.submit(1)
            except BaseException as exc:  # a second session is refused the pool
                with lock:
                    errors.append(exc)
                return
            finally:
                pop_context(block)
            with lock:
                futures.append(future)

        threads = [threading.Thread(target=submitter) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors
        assert len({f._session for f in futures}) == 1
        assert [f.result(timeout=30) for f in futures] == [2] * 6


# -- defect 5: event-driven wait and as_completed ---------------------------------------


def _two_sessions_with_gates() -> tuple[list[Session], list[threading.Event], list[Any]]:
    """Two thread-pool sessions, two held futures in each."""
    sessions = [Session(ThreadExecutor(2), name=f"s{k}") for k in range(2)]
    gates = [threading.Event() for _ in range(4)]
    futures = [sessions[k % 2].submit(hold, (gates[k], f"t{k}"), {}) for k in range(4)]
    return sessions, gates, futures


@pytest.mark.timeout(60)
def test_as_completed_over_futures_of_two_sessions_follows_completion_order():
    sessions, gates, futures = _two_sessions_with_gates()
    order = [3, 0, 1, 2]  # alternating sessions
    try:
        seen: list[str] = []

        def release() -> None:
            for k in order:
                gates[k].set()
                time.sleep(0.15)

        releaser = threading.Thread(target=release, daemon=True)
        releaser.start()
        for future in gx.as_completed(futures, timeout=20):
            seen.append(future.result())
        releaser.join(10)
        assert seen == [f"t{k}" for k in order]
    finally:
        for gate in gates:
            gate.set()
        for session in sessions:
            session.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["as_completed", "wait"])
def test_waiting_across_sessions_does_not_poll(monkeypatch, how):
    """While gx.wait / gx.as_completed wait one second for futures of two sessions,
    nobody looks at their states over and over (they used to, every 50 ms): the
    scheduler threads hand them each future as it ends."""
    sessions, gates, futures = _two_sessions_with_gates()
    looks = [0]
    real_state = Session._state

    def counting_state(self: Session, index: int) -> Any:
        looks[0] += 1
        return real_state(self, index)

    try:
        monkeypatch.setattr(Session, "_state", counting_state)
        timer = threading.Timer(1.0, lambda: [g.set() for g in gates])
        timer.start()
        started = time.monotonic()
        if how == "as_completed":
            assert sorted(f.result() for f in gx.as_completed(futures, timeout=20)) == [
                "t0",
                "t1",
                "t2",
                "t3",
            ]
        else:
            done, not_done = gx.wait(futures, timeout=20)
            assert len(done) == 4 and not not_done
        assert time.monotonic() - started >= 0.9
        # A handful per future (registering, the end, the result): not 20 per second.
        assert looks[0] <= 6 * len(futures), looks[0]
        timer.join()
    finally:
        for gate in gates:
            gate.set()
        for session in sessions:
            session.close()


@pytest.mark.timeout(60)
def test_wait_first_completed_across_two_sessions_returns_on_the_second_sessions_future():
    sessions, gates, futures = _two_sessions_with_gates()
    try:
        gates[1].set()  # a future of the second session
        done, not_done = gx.wait(futures, timeout=20, return_when="FIRST_COMPLETED")
        assert done == {futures[1]}
        assert not_done == {futures[0], futures[2], futures[3]}
    finally:
        for gate in gates:
            gate.set()
        for session in sessions:
            session.close()


@pytest.mark.timeout(120)
def test_as_completed_over_20000_finished_futures_is_n_log_n():
    """20,000 finished futures: as_completed costs a small multiple of looking at each
    once (it was quadratic: a list.remove per future), and keeps completion order."""
    session = Session(SyncExecutor(), name="many")
    try:
        futures = [session.submit(inc, (k,), {}) for k in range(20_000)]
        session.wait_all()
        random.Random(0).shuffle(futures)  # any order in, completion order out

        def look_at_each() -> None:
            for f in futures:
                f.done()

        def through_as_completed() -> list[Any]:
            return list(gx.as_completed(futures))

        def best_of_three(fn: Any) -> float:
            times = []
            for _ in range(3):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return min(times)

        baseline = best_of_three(look_at_each)
        elapsed = best_of_three(through_as_completed)
        assert elapsed < 25 * baseline, (elapsed, baseline)
        yielded = through_as_completed()
        assert len(yielded) == 20_000 and set(yielded) == set(futures)
        ends = [f.wait().finished or 0.0 for f in yielded]
        assert ends == sorted(ends)
    finally:
        session.close()


# -- idle executors sleep -------------------------------------------------------------


class _CountingQueue:
    """A ThreadExecutor outbox that counts the waits of its reader."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gets = 0

    def get(self, *args: Any, **kwargs: Any) -> Any:
        self.gets += 1
        return self.inner.get(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.timeout(60)
def test_an_idle_thread_session_sleeps_until_there_is_work():
    """An idle session on threads blocks in one wait (it woke every 0.25 s before)."""
    executor = ThreadExecutor(1)
    counting = _CountingQueue(executor._outbox)
    executor._outbox = counting  # type: ignore[assignment]
    session = Session(executor, name="idle")
    try:
        assert session.submit(inc, (1,), {}).result(timeout=10) == 2
        before = counting.gets
        time.sleep(1.2)
        assert counting.gets - before <= 1
        assert session.submit(inc, (2,), {}).result(timeout=10) == 3  # and wakes for work
    finally:
        session.close()


@pytest.mark.timeout(60)
def test_an_idle_sync_session_sleeps_until_there_is_work():
    executor = SyncExecutor()
    waits = [0]
    real_wait = executor._wake.wait

    def counting_wait(timeout: float | None = None) -> bool:
        waits[0] += 1
        return real_wait(timeout)

    executor._wake.wait = counting_wait  # type: ignore[method-assign]
    session = Session(executor, name="idle-sync")
    try:
        assert session.submit(inc, (1,), {}).result(timeout=10) == 2
        before = waits[0]
        time.sleep(1.2)
        assert waits[0] - before <= 1
        assert session.submit(inc, (2,), {}).result(timeout=10) == 3
    finally:
        session.close()


@pytest.mark.timeout(60)
def test_an_idle_pool_session_sleeps_until_there_is_work(monkeypatch):
    """An idle `with gx.Pool()` session waits on its pipes in one call (0.25 s slices
    before: only the main thread needs them, for Ctrl-C)."""
    calls = [0]
    real_wait = process_module.mp_wait

    def counting_wait(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "graphexec-pool":
            calls[0] += 1
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(process_module, "mp_wait", counting_wait)
    with gx.Pool(workers=1) as pool:
        assert inc.submit(1).result(timeout=30) == 2
        before = calls[0]
        time.sleep(1.2)
        assert calls[0] - before <= 1
        assert inc.submit(2).result(timeout=30) == 3
    assert pool.closed
