"""Tiny calls travel in batches (#14), and every fault still lands on one node.

The process pool gathers the calls it prefetches for a busy worker and sends
them as one ``batch`` message; the worker runs them one by one and answers
each before starting the next. These tests spy on the pool to see that
batches really are sent (so the fault cases below do exercise them), that a
crash inside a batch blames only the call that was running, that a call with
``timeout=`` is never batched, and that calls too slow to be worth it are not
queued at all, or only as many as ``PREFETCH_SECONDS`` of them.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

import graphexec as gx
from graphexec._executors import process


def _square_or_die(i: int, bad: frozenset[int]) -> int:
    if i in bad:
        os._exit(7)
    return i * i


def _nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _spy(pool: gx.Pool, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Record every batch the pool sends (its size) and every call it batches."""
    procs = pool._procs
    seen: dict[str, list[Any]] = {"flushed": [], "batched": [], "depth": []}
    flush, batch = procs._flush, procs._batch

    def spy_flush(worker: Any) -> None:
        seen["flushed"].append(len(worker.pending))
        flush(worker)

    def spy_batch(worker: Any, call: Any) -> None:
        seen["batched"].append(call)
        batch(worker, call)
        seen["depth"].append(len(worker.inflight))

    monkeypatch.setattr(procs, "_flush", spy_flush)
    monkeypatch.setattr(procs, "_batch", spy_batch)
    return seen


@pytest.mark.timeout(60)
def test_a_crash_inside_a_batch_fails_only_the_call_it_was_running(monkeypatch):
    bad = frozenset({150, 420, 421})
    graph = gx.Graph()
    with graph:
        nodes = [graph.add(_square_or_die, i, bad) for i in range(600)]
    with gx.Pool(workers=2) as pool:
        seen = _spy(pool, monkeypatch)
        run = graph.compute(pool=pool, raise_on_failure=False, keep="all")
        assert max(seen["flushed"]) > 1, "no batch was sent: the test proves nothing"
        assert sorted(n.name for n in run.failed) == sorted(nodes[i].name for i in bad)
        for i in bad:
            error = run.state(nodes[i]).exception
            assert isinstance(error, gx.WorkerCrashed)
            assert error.exitcode == 7
            assert run.state(nodes[i]).attempts == 1
        for i, node in enumerate(nodes):
            if i not in bad:
                assert run[node] == i * i
                assert run.state(node).attempts == 1
        # The pool goes on working, batching again.
        again = gx.Graph()
        with again:
            more = [again.add(_square_or_die, i, frozenset()) for i in range(300)]
        rerun = again.compute(pool=pool, keep="all")
        assert [rerun[n] for n in more] == [i * i for i in range(300)]


@pytest.mark.timeout(60)
def test_calls_with_a_timeout_are_sent_one_by_one(monkeypatch):
    graph = gx.Graph()
    with graph:
        timed = gx.task(timeout=30)(_square_or_die)
        nodes = [timed(i, frozenset()) for i in range(300)]
    with gx.Pool(workers=2) as pool:
        seen = _spy(pool, monkeypatch)
        run = graph.compute(pool=pool, keep="all")
    assert [run[n] for n in nodes] == [i * i for i in range(300)]
    assert seen["batched"] == []


@pytest.mark.timeout(60)
def test_slow_calls_are_never_queued_and_short_ones_only_a_few_ms_deep(monkeypatch):
    slow = max(2 * process.SHORT_CALL, 0.005)
    short = 0.001
    graph = gx.Graph()
    with graph:
        slow_nodes = [graph.add(_nap, slow) for _ in range(8)]
    with gx.Pool(workers=2) as pool:
        seen = _spy(pool, monkeypatch)
        graph.compute(pool=pool)
        assert seen["batched"] == []  # a free worker is never kept behind a slow queue
        graph = gx.Graph()
        with graph:
            [graph.add(_nap, short) for _ in range(60)]
        graph.compute(pool=pool)
    # Each queued call took at least `short`: no queue is deeper than the time allows.
    assert seen["depth"], "short calls were not prefetched at all"
    limit = int(process.PREFETCH_SECONDS / (short + process.CALL_OVERHEAD))
    assert max(seen["depth"]) <= max(2, limit)
    assert len(slow_nodes) == 8


def _hold(release: str, limit: float) -> str:
    """Wait for ``release`` to exist (at most ``limit`` seconds): how it ended."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if os.path.exists(release):
            return "released"
        time.sleep(0.01)
    return "timed out"


def _mark(done: str, i: int) -> int:
    open(os.path.join(done, str(i)), "w").close()
    return i


@pytest.mark.timeout(60)
def test_short_calls_are_never_queued_behind_another_tasks_long_call(tmp_path):
    # The long call is released only once every short call has run: short calls
    # queued behind it (its worker busy, the other free) would wait for it, and
    # it would time out. (They were: prefetching looked at the queued calls'
    # function only, not at what the worker was running.)
    release, done = tmp_path / "release", tmp_path / "done"
    done.mkdir()
    n = 100
    with gx.Pool(workers=2) as pool:
        warm = gx.Graph()
        with warm:
            [warm.add(_mark, str(tmp_path), -i - 1) for i in range(20)]  # measured short
        warm.compute(pool=pool)
        graph = gx.Graph()
        with graph:
            held = graph.add(_hold, str(release), 20.0)
            [graph.add(_mark, str(done), i) for i in range(n)]

        def release_when_all_ran() -> None:
            deadline = time.monotonic() + 25
            while len(os.listdir(done)) < n and time.monotonic() < deadline:
                time.sleep(0.01)
            release.touch()

        threading.Thread(target=release_when_all_ran, daemon=True).start()
        run = graph.compute(pool=pool)
    assert run[held] == "released"


def _mark_or_hold(done: str, release: str, i: int, hold: int) -> Any:
    """A tiny task (measured so) whose call ``hold`` blocks until ``release`` exists."""
    if i == hold:
        return _hold(release, 20.0)
    # O_EXCL: a call run twice (given back, yet run where it was queued) fails
    os.close(os.open(os.path.join(done, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return i


@pytest.mark.timeout(60)
def test_calls_queued_behind_a_call_that_blocks_are_given_back_to_a_free_worker(
    tmp_path, monkeypatch
):
    # A call of a tiny function may still block (I/O, a lock, a rare slow input):
    # the calls prefetched behind it once waited for it while the other worker
    # stood idle. They are asked back and run there; the blocked call is let go
    # only once every other has run (else it times out: "timed out").
    release, done = tmp_path / "release", tmp_path / "done"
    done.mkdir()
    n, hold = 300, 40
    graph = gx.Graph()
    with graph:
        nodes = [graph.add(_mark_or_hold, str(done), str(release), i, hold) for i in range(n)]

    def release_when_all_ran() -> None:
        deadline = time.monotonic() + 25
        while len(os.listdir(done)) < n - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.touch()

    threading.Thread(target=release_when_all_ran, daemon=True).start()
    with gx.Pool(workers=2) as pool:
        seen = _spy(pool, monkeypatch)
        run = graph.compute(pool=pool)
    assert run[nodes[hold]] == "released"
    assert [run[node] for i, node in enumerate(nodes) if i != hold] == [
        i for i in range(n) if i != hold
    ]  # each ran once (O_EXCL), none lost
    assert max(seen["depth"]) >= 2, "nothing was prefetched: the case did not happen"


def _log_and_nap(log: str, i: int, seconds: float, *_: Any) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{i}\n".encode())
    os.close(fd)
    time.sleep(seconds)
    return i


def _count(values: list[int]) -> int:
    return len(values)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_give_backs_racing_the_calls_they_ask_for_lose_and_repeat_nothing(tmp_path, seed):
    # Waves of tiny calls, one in 16 blocking 18-30 ms (just past HEAD_STALLED):
    # give-backs race the worker finishing the call ahead. A call given back as it
    # became the head once stayed there: the run hung, or a later reply came "out
    # of turn" and calls ran twice (an independent review's reproduction).
    import random

    rng, log = random.Random(seed), str(tmp_path / "log")
    graph = gx.Graph()
    with graph:
        prev = None
        for wave in range(60):
            delays = [rng.choice([0.0] * 15 + [rng.uniform(0.018, 0.03)]) for _ in range(30)]
            calls = [
                graph.add(_log_and_nap, log, wave * 100 + i, d, prev) for i, d in enumerate(delays)
            ]
            prev = graph.add(_count, calls)
    run = graph.compute(workers=2)
    assert run.ok
    with open(log) as f:
        ran = f.read().split()
    assert len(ran) == len(set(ran)) == 60 * 30  # each call once


def _its_one_worker_taken_busy(pool: gx.Pool) -> tuple[Any, Any]:
    """The pool's process pool and its one worker, live, out of the idle list (as a
    busy one is): for tests of the bookkeeping of a worker's answers."""
    graph = gx.Graph()
    with graph:
        graph.add(_nap, 0.0)
    graph.compute(pool=pool)
    procs = pool._procs
    (w,) = procs._workers.values()
    procs._idle.remove(w)
    return procs, w


def test_a_give_back_naming_the_head_leaves_the_worker_idle_and_requeues_all():
    # The worker answered the call ahead, then gave the next back before taking it:
    # by the time the pool reads "returned", that call is its head.
    with gx.Pool(workers=1) as pool:
        procs, w = _its_one_worker_taken_busy(pool)
        calls = [
            gx._executors.protocol.Call(i, f"c-{i}", _nap, (0.0,), None, False, {}, None, 1)
            for i in range(3)
        ]
        w.inflight.extend(calls)
        assert procs._reply(w, ("returned", [id(c) for c in calls[:2]]))
        assert list(w.inflight) == [calls[2]]  # the head went back too
        assert [o[0] for o in procs._outbox if o[1] == process.REQUEUE] == calls[:2]
        assert procs._reply(w, ("returned", [id(calls[2])]))
        assert not w.inflight and w in procs._idle
        procs._outbox.clear()


def test_a_worker_whose_give_back_answer_is_due_is_not_idle_until_it_is_read():
    # A worker may answer all its calls before its watchdog answers the give-back
    # (an empty "returned"). Idle meanwhile, its readable pipe was taken for its
    # death: the pool stalled a second burying it and killed a healthy worker.
    with gx.Pool(workers=1) as pool:
        procs, w = _its_one_worker_taken_busy(pool)
        pid = w.pid
        w.asked = True  # asked for calls back, it answered them all first
        procs._maybe_free(w)
        assert w not in procs._idle
        assert procs._reply(w, ("returned", []))  # its late, empty answer
        assert not w.asked and w in procs._idle
        assert procs._idle_worker() is w  # live: not taken for dead
        procs._idle.append(w)
        again = gx.Graph()
        with again:
            node = again.add(_nap, 0.0)
        again.compute(node, pool=pool)
        assert [x.pid for x in procs._workers.values()] == [pid]


def _megabyte(i: int) -> Any:
    import numpy as np

    return np.full(1 << 17, float(i))  # 1 MiB: carried in shared memory


def _total(a: Any, k: int) -> float:
    return float(a.sum()) * k


@pytest.mark.timeout(60)
def test_calls_that_make_large_values_are_queued_only_a_few_megabytes_deep(monkeypatch):
    # 64 queued loads of 1 MiB each were made at once, breadth-first, and held
    # until their consumers ran: the depth of a queue is bounded by its values too.
    graph = gx.Graph()
    with graph:
        sums = [graph.add(_total, graph.add(_megabyte, i), 2) for i in range(200)]
    with gx.Pool(workers=2) as pool:
        graph.compute(pool=pool)  # measured: the first calls' values say how large
        seen = _spy(pool, monkeypatch)
        depths: list[int] = []
        batch = pool._procs._batch

        def spy_batch(worker: Any, call: Any) -> None:
            batch(worker, call)
            if call.fn is _megabyte:
                depths.append(len(worker.inflight))

        monkeypatch.setattr(pool._procs, "_batch", spy_batch)
        run = graph.compute(pool=pool)
    assert [run[node] for node in sums] == [2.0 * i * (1 << 17) for i in range(200)]
    limit = process.PREFETCH_VALUE_BYTES // (1 << 20)
    assert depths and max(depths) <= limit, (max(depths or [0]), limit)
    assert seen["batched"]  # they were prefetched: a few at a time


@pytest.mark.timeout(60)
def test_calls_under_a_memory_limit_are_never_queued_behind_another(monkeypatch):
    # A call queued behind another would start in a worker that call may have
    # left over the limit, and be blamed for memory that is not its own (chains
    # are off with memory_limit= for the same reason).
    graph = gx.Graph()
    with graph:
        nodes = [graph.add(_square_or_die, i, frozenset()) for i in range(300)]
    with gx.Pool(workers=2) as pool:
        seen = _spy(pool, monkeypatch)
        run = graph.compute(pool=pool, keep="all")
        assert seen["batched"], "no call was prefetched without a limit: the test proves nothing"
        seen["batched"].clear()
        limited = graph.compute(pool=pool, keep="all", memory_limit="2GB")
        assert seen["batched"] == []
    with gx.Pool(workers=2, memory_limit="2GB") as pool:
        seen = _spy(pool, monkeypatch)
        pooled = graph.compute(pool=pool, keep="all")
        assert seen["batched"] == []
    for done in (run, limited, pooled):
        assert [done[n] for n in nodes] == [i * i for i in range(300)]


def _step(x: int, die_at: int) -> int:
    if x == die_at:
        os._exit(7)
    return x + 1


@pytest.mark.timeout(60)
def test_a_crash_in_the_middle_of_a_long_chain_fails_that_link_alone(monkeypatch):
    # The links of a chain behind its head travel in one batch message; the
    # worker still answers each link before it runs the next.
    graph = gx.Graph()
    with graph:
        links = [graph.add(_step, 0, 17)]
        for _ in range(59):
            links.append(graph.add(_step, links[-1], 17))
    with gx.Pool(workers=2) as pool:
        sent: list[int] = []
        send_batch = process.ProcessPool._send_batch
        monkeypatch.setattr(
            process.ProcessPool,
            "_send_batch",
            staticmethod(
                lambda worker, wires: sent.append(len(wires)) or send_batch(worker, wires)
            ),
        )
        run = graph.compute(pool=pool, raise_on_failure=False)
        assert max(sent) > 8, "the chain was not sent as a batch: the test proves nothing"
        states = [run.state(n).name for n in links]
        assert states[:17] == ["Completed"] * 17
        assert states[17] == "Failed"
        error = run.state(links[17]).exception
        assert isinstance(error, gx.WorkerCrashed) and error.exitcode == 7
        assert run.state(links[17]).attempts == 1
        assert states[18:] == ["Skipped"] * 42
        again = gx.Graph()
        with again:
            x = again.add(_step, 0, -1)
            for _ in range(59):
                x = again.add(_step, x, -1)
        assert again.compute(pool=pool)[x] == 60


WATCHDOG_DELAY = 1.5  # seconds a worker's watchdog takes to send its "returned" answer


@gx.task
def _logged(log: str, label: str, seconds: float = 0.0, slow_watchdog: bool = False) -> str:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{label}\n".encode())
    os.close(fd)
    if slow_watchdog:
        # This worker's watchdog thread is late to send its answer to a give-back,
        # as when the OS deschedules it: it waits before taking the pipe's lock.
        from graphexec._executors import worker

        class SlowForWatchdog:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def __enter__(self) -> Any:
                if threading.current_thread().name == "graphexec-watchdog":
                    time.sleep(WATCHDOG_DELAY)
                return self.inner.__enter__()

            def __exit__(self, *exc: Any) -> Any:
                return self.inner.__exit__(*exc)

        worker._send_lock = SlowForWatchdog(worker._send_lock)
    if label == "crash":
        os._exit(3)
    time.sleep(seconds)
    return label


@gx.task
def _logged_slow(log: str, label: str, seconds: float = 0.0, slow_watchdog: bool = False) -> str:
    return _logged.fn(log, label, seconds, slow_watchdog)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("last", ["ok", "crash"])
def test_a_late_give_back_answer_never_blames_the_call_given_back(tmp_path, monkeypatch, last):
    # A call given back is skipped by the worker's loop, which then runs the next call
    # the pool queued there. If the watchdog's "returned" came after that call's
    # reply (or its crash), the pool took the given-back call, still its head, for
    # the one running: "a reply out of turn", or the crash, was blamed on a call
    # that never ran, and the next one ran twice.
    log = str(tmp_path / "log")
    asked: list[int] = []
    with gx.Pool(workers=2) as pool:
        procs = pool._procs
        reclaim = procs._reclaim

        def spy_reclaim(now: float) -> Any:
            before = [w.id for w in procs._workers.values() if w.asked]
            again = reclaim(now)
            asked.extend(w.id for w in procs._workers.values() if w.asked and w.id not in before)
            return again

        monkeypatch.setattr(procs, "_reclaim", spy_reclaim)
        with pool:
            # Both workers load both functions, measured tiny (prefetch is on).
            for task in (_logged, _logged_slow):
                for f in [task.submit(log, "warm", 0.05), task.submit(log, "warm", 0.05)]:
                    f.result(timeout=30)
            for _ in range(12):
                _logged.submit(log, "warm").result(timeout=30)
                _logged_slow.submit(log, "warm").result(timeout=30)
            head = _logged_slow.submit(log, "head", 0.6, True)  # blocks on one worker
            nap = _logged_slow.submit(log, "nap", 0.05)  # the other, briefly
            # Queued one behind each; the one behind `head` is asked back once the
            # other worker is idle.
            queued = [_logged.submit(log, "b1"), _logged.submit(log, "b2")]
            deadline = time.monotonic() + 20
            while not asked and time.monotonic() < deadline:
                time.sleep(0.005)
            busy = _logged_slow.submit(log, "busy", 2.0)  # the idle worker: busy again
            # Ready when `head` answers: queued behind the call the pool believes next.
            after = _logged.submit(log, last, wait_for=[head])
            futures = [head, nap, *queued, busy, after]
            gx.wait(futures, timeout=60)
            states = [f.state for f in futures]
    assert asked, "no call was asked back: the case did not happen"
    assert [st.name for st in states[:5]] == ["Completed"] * 5, [
        (st.name, st.exception) for st in states
    ]
    with open(log) as f:
        ran = [line for line in f.read().split() if line != "warm"]
    assert sorted(ran) == sorted(["head", "nap", "b1", "b2", "busy", last])  # each once
    if last == "crash":
        assert isinstance(states[5].exception, gx.WorkerCrashed)
        assert states[5].attempts == 1
    else:
        assert states[5].name == "Completed"
