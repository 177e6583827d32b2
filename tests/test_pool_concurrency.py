"""One warm pool, many callers (issue #18 point 1): computes, flows and `with pool:`
blocks from several threads at once, each run with its own states, fail_fast,
failures, cancellation and values; round-robin between runs; Ctrl-C cancels the
main thread's run only; the pool closes when its last block ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

import graphexec as gx


@gx.task
def inc(x: int) -> int:
    return x + 1


@gx.task
def add_all(xs: list[int]) -> int:
    return sum(xs)


@gx.task
def pid_of(x: int) -> int:
    return os.getpid()


@gx.task
def nap(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


@gx.task
def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


@gx.task
def crash(x: int) -> int:
    os._exit(3)


def small_graph(k: int, width: int = 20) -> tuple[gx.Graph, gx.Node, int]:
    graph = gx.Graph(f"g{k}")
    with graph:
        total = add_all([inc(k + i) for i in range(width)])
    return graph, total, sum(range(k + 1, k + width + 1))


def run_threads(fns: list[Any], seconds: float = 45.0) -> list[Any]:
    """Run each fn in its own thread, all at once; their results (or raise the first error)."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(fns))

    def body(k: int) -> None:
        barrier.wait()
        try:
            results[k] = fns[k]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(k,), daemon=True) for k in range(len(fns))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds)
        assert not thread.is_alive(), "a thread computing on the shared pool hung"
    if errors:
        raise errors[0]
    return results


@pytest.mark.timeout(90)
def test_threads_compute_concurrently_on_one_pool_and_get_their_own_results(pool):
    def computes(t: int) -> list[bool]:
        out = []
        for c in range(6):
            graph, total, want = small_graph(100 * t + c)
            out.append(graph.compute(pool=pool)[total] == want)
        return out

    results = run_threads([lambda t=t: computes(t) for t in range(6)])
    assert all(all(r) for r in results)
    assert not pool.closed


@pytest.mark.timeout(90)
def test_a_failure_a_crash_and_fail_fast_in_one_run_never_touch_another_run(pool):
    """Run A crashes a worker, raises, and fail_fast cancels the rest of A; run B,
    at the same time on the same workers, completes every node at its first attempt
    (a call of B queued behind A's crashing call comes back untouched)."""

    def run_a() -> gx.Run:
        graph = gx.Graph("a")
        with graph:
            crash(0)
            boom(1)
            for i in range(20):
                nap(i, 0.05)
        return graph.compute(pool=pool, fail_fast=True, raise_on_failure=False, keep="all")

    def run_b() -> tuple[gx.Run, list[gx.Node]]:
        graph = gx.Graph("b")
        with graph:
            nodes = [inc(i) for i in range(60)]
        return graph.compute(pool=pool, keep="all"), nodes

    for _ in range(3):
        run_a_result, (run_b_result, nodes) = run_threads([run_a, run_b])
        assert not run_a_result.ok
        names = {type(run_a_result.state(n).exception).__name__ for n in run_a_result.failed}
        assert names <= {"WorkerCrashed", "ValueError"} and names
        assert run_b_result.ok
        for i, node in enumerate(nodes):
            state = run_b_result.state(node)
            assert state.name == "Completed" and run_b_result[node] == i + 1
            assert state.attempts == 1


@pytest.mark.timeout(90)
def test_a_timeout_in_one_run_kills_only_its_own_call(pool):
    def run_a() -> gx.Run:
        graph = gx.Graph("slow")
        with graph:
            nap.with_options(timeout=0.3)(0, 30.0)
        return graph.compute(pool=pool, raise_on_failure=False)

    def run_b() -> list[int]:
        out = []
        for c in range(5):
            graph, total, want = small_graph(c)
            out.append(graph.compute(pool=pool)[total] - want)
        return out

    run, diffs = run_threads([run_a, run_b])
    assert diffs == [0] * 5
    (failed,) = run.failed
    assert type(run.state(failed).exception).__name__ == "TaskTimeout"


@pytest.mark.timeout(90)
def test_dispatch_is_fair_a_small_run_does_not_wait_for_a_big_one(pool):
    """Round-robin between runs: a 4-node run started after a 120-node run of
    the same tasks finishes long before the big one does."""
    finished: dict[str, float] = {}
    started = threading.Event()

    def big() -> None:
        graph = gx.Graph("big")
        with graph:
            for i in range(120):
                nap(i, 0.02)
        started.set()
        graph.compute(pool=pool)
        finished["big"] = time.monotonic()

    def small() -> None:
        started.wait(10)
        time.sleep(0.2)  # the big run has queued its calls by now
        graph = gx.Graph("small")
        with graph:
            for i in range(4):
                nap(i, 0.02)
        graph.compute(pool=pool)
        finished["small"] = time.monotonic()

    begin = time.monotonic()
    run_threads([big, small])
    # Waiting for the whole big graph would put small last; round-robin puts it
    # within a few calls of its start.
    assert finished["small"] < finished["big"]
    assert finished["small"] - begin < 0.6 * (finished["big"] - begin)


@pytest.mark.timeout(90)
def test_a_flow_on_a_pool_runs_on_its_workers_and_leaves_it_open():
    with gx.Pool(workers=2) as pool:
        graph, total, want = small_graph(0, width=4)
        graph.compute(pool=pool)
        workers = {w.pid for w in pool._workers.values()}

        @gx.flow(pool=pool)
        def body(n: int) -> list[int]:
            return [f.result() for f in [pid_of.submit(i) for i in range(n)]]

        pids = body(6)
        assert set(pids) <= workers | {w.pid for w in pool._workers.values()}
        assert not pool.closed
        assert graph.compute(pool=pool)[total] == want

        # A flow and computes at the same time, from different threads.
        def computes() -> bool:
            return all(small_graph(c)[0].compute(pool=pool).ok for c in range(4))

        flow_pids, ok = run_threads([lambda: body(8), computes])
        assert ok and len(flow_pids) == 8
    assert pool.closed


@pytest.mark.timeout(90)
def test_with_pool_blocks_in_several_threads_close_it_when_the_last_one_ends():
    pool = gx.Pool(workers=2)
    inner_done = threading.Event()
    leave = threading.Event()
    seen: dict[str, Any] = {}

    def other_thread() -> None:
        with pool:
            futures = [inc.submit(i) for i in range(10)]
            seen["other"] = [f.result(timeout=20) for f in futures]
            inner_done.set()
            leave.wait(20)
            # The first block has ended; this one still has the pool.
            seen["after"] = inc.submit(41).result(timeout=20)

    thread = threading.Thread(target=other_thread, daemon=True)
    with pool:
        thread.start()
        assert inc.submit(1).result(timeout=20) == 2
        inner_done.wait(20)
    assert not pool.closed  # the other thread's block is still open
    leave.set()
    thread.join(30)
    assert seen == {"other": list(range(1, 11)), "after": 42}
    assert pool.closed


@pytest.mark.timeout(90)
def test_closing_the_pool_under_another_threads_compute_fails_its_pending_calls_not_hangs():
    pool = gx.Pool(workers=1)
    box: dict[str, Any] = {}

    def compute() -> None:
        graph = gx.Graph("doomed")
        with graph:
            for i in range(4):
                # retries must not be spent on a closed pool: it stays closed
                nap.with_options(retries=2, retry_delay=20)(i, 1.0)
        box["run"] = graph.compute(pool=pool, raise_on_failure=False)

    thread = threading.Thread(target=compute, daemon=True)
    thread.start()
    time.sleep(1.0)
    pool.close()
    thread.join(30)
    assert not thread.is_alive()
    run = box["run"]
    assert run.failed
    for node in run.failed:
        state = run.state(node)
        assert "the pool was closed" in str(state.exception)
        assert state.exception.retryable is False and state.attempts == 1


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import graphexec as gx

    @gx.task
    def nap(x, seconds):
        time.sleep(seconds)
        return x

    def background(pool, box):
        graph = gx.Graph("background")
        with graph:
            nodes = [nap(i, 0.2) for i in range(12)]
        run = graph.compute(pool=pool, keep="all")
        box["background"] = [run.state(n).name for n in nodes]

    if __name__ == "__main__":
        pool = gx.Pool(workers=2)
        box = {}
        thread = threading.Thread(target=background, args=(pool, box))
        thread.start()
        graph = gx.Graph("main")
        with graph:
            for i in range(6):
                nap(i, 5.0)
        threading.Timer(0.8, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            graph.compute(pool=pool)
        except KeyboardInterrupt as exc:
            states = sorted({exc.run.state(n).name for n in graph.nodes})
            print("main:", ",".join(states), flush=True)
        thread.join(60)
        print("background:", ",".join(sorted(set(box["background"]))), flush=True)
        pool.close()
    """
)


@pytest.mark.timeout(90)
def test_ctrl_c_cancels_the_main_threads_run_and_not_the_runs_of_other_threads(tmp_path):
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=80, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert lines["main"] == "Cancelled", done.stdout
    assert lines["background"] == "Completed", done.stdout


@pytest.mark.timeout(60)
def test_a_pool_has_its_own_memory_limit_setting():
    with gx.Pool(workers=1, memory_limit="4GB") as pool:
        assert pool.memory_limit is not None and pool.memory_limit >= 4 * 10**9
        graph, total, want = small_graph(0, width=3)
        assert graph.compute(pool=pool)[total] == want
    with pytest.raises(ValueError):
        gx.Pool(workers=1, memory_limit="lots")


@gx.task(tags=["db"])
def exclusive(marker: str, x: int) -> bool:
    """True if no other call held the marker while this one ran (it holds it 50 ms)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    try:
        time.sleep(0.05)
    finally:
        os.close(fd)
        os.unlink(marker)
    return True


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["tag", "task"])
def test_tag_limits_and_task_caps_hold_across_the_runs_of_a_pool(pool, tmp_path, how):
    marker = str(tmp_path / "held")
    task = exclusive if how == "tag" else exclusive.with_options(tags=[], max_concurrency=1)
    limits = {"db": 1} if how == "tag" else None

    def run() -> list[bool]:
        graph = gx.Graph("limited")
        with graph:
            nodes = [task(marker, i) for i in range(6)]
        result = graph.compute(pool=pool, limits=limits, keep="all")
        return [result[n] for n in nodes]

    results = run_threads([run, run, run])
    assert all(all(r) for r in results), results


@gx.task
def hold_memory(megabytes: int, seconds: float) -> int:
    block = bytearray(megabytes * 2**20)
    for k in range(0, len(block), 4096):  # touch every page: RSS grows
        block[k] = 1
    time.sleep(seconds)
    return len(block) // 2**20


@pytest.mark.timeout(90)
def test_a_memory_limit_is_the_runs_own_on_a_shared_pool(pool):
    """Run A (memory_limit=150MB) has its hog killed; run B, on the same workers at
    the same time without a limit, holds as much and completes."""

    def run_a() -> gx.Run:
        graph = gx.Graph("limited")
        with graph:
            hold_memory(300, 5.0)
        return graph.compute(pool=pool, memory_limit="150MB", raise_on_failure=False)

    def run_b() -> gx.Run:
        graph = gx.Graph("unlimited")
        with graph:
            hold_memory(300, 1.0)
        return graph.compute(pool=pool, raise_on_failure=False)

    limited, unlimited = run_threads([run_a, run_b])
    (failed,) = limited.failed
    assert type(limited.state(failed).exception) is gx.MemoryLimitExceeded
    assert unlimited.ok


@gx.task
def crash_later(seconds: float) -> int:
    time.sleep(seconds)
    os._exit(3)


@pytest.mark.timeout(90)
def test_calls_of_another_run_queued_behind_a_crashing_call_come_back_untouched():
    """One worker: run B's tiny calls are queued on it (prefetch) behind run A's
    call, which then kills the worker. Only A's node fails; B's calls run again
    elsewhere, each at its first attempt."""
    with gx.Pool(workers=1) as pool:
        warm = gx.Graph("warm")
        with warm:
            inc(0)
        warm.compute(pool=pool)  # inc is known to be tiny: its calls may be prefetched
        a_started = threading.Event()

        def run_a() -> gx.Run:
            graph = gx.Graph("a")
            with graph:
                crash_later(1.0)
            a_started.set()
            return graph.compute(pool=pool, raise_on_failure=False)

        def run_b() -> tuple[gx.Run, list[gx.Node]]:
            a_started.wait(10)
            time.sleep(0.4)  # A's call is running on the only worker
            graph = gx.Graph("b")
            with graph:
                nodes = [inc(i) for i in range(5)]
            return graph.compute(pool=pool, keep="all"), nodes

        run, (b_run, nodes) = run_threads([run_a, run_b])
        (failed,) = run.failed
        assert type(run.state(failed).exception) is gx.WorkerCrashed
        assert b_run.ok
        for i, node in enumerate(nodes):
            assert b_run[node] == i + 1 and b_run.state(node).attempts == 1


@gx.task(tags=["b"])
def keeps_b() -> float:
    time.sleep(1.5)
    return time.time()  # when "b" frees


@gx.task(tags=["a", "b"])
def wants_a_and_b() -> float:
    return time.time()


@gx.task(tags=["a"])
def wants_a() -> float:
    return time.time()  # when it started


@pytest.mark.timeout(60)
def test_a_call_held_for_one_slot_does_not_keep_a_later_call_from_another_free_one(pool):
    # Run 1 holds "b"; run 2's call waits for "a" and "b" ("b" is full); run 3's call
    # wants "a" only, which is free: it runs now, not behind run 2's call (first
    # come, first served is per slot: run 2's call could not take "a" anyway).
    # Before, any call held on the pool for a slot kept every later call naming
    # that slot waiting, free or not.
    out: dict[str, float] = {}

    def run(task: Any, key: str, limits: dict[str, int]) -> None:
        graph = gx.Graph()
        with graph:
            node = task()
        out[key] = graph.compute(pool=pool, limits=limits)[node]

    first = threading.Thread(target=run, args=(keeps_b, "b", {"b": 1}))
    first.start()
    time.sleep(0.3)  # (keeps_b is running: "b" is taken)
    second = threading.Thread(target=run, args=(wants_a_and_b, "both", {"a": 1, "b": 1}))
    second.start()
    time.sleep(0.3)  # (its call is held for "b")
    third = threading.Thread(target=run, args=(wants_a, "a", {"a": 1}))
    third.start()
    for thread in (first, second, third):
        thread.join(30)
    assert out["a"] < out["b"], "the call wanting only the free slot 'a' waited for 'b'"
    assert out["both"] >= out["b"]


@gx.task(isolate=True)
def isolated_pid(x: int) -> int:
    time.sleep(0.05)
    return os.getpid()


@pytest.mark.timeout(90)
def test_isolated_calls_of_several_runs_each_get_a_worker_no_other_call_used():
    """isolate=True from three threads while two others keep the pool busy: each
    isolated call runs in a fresh worker of its own, which ran no other call, of
    its run or of another (issue #18: isolation holds on a shared pool)."""
    with gx.Pool(workers=2) as pool:

        def isolated(t: int) -> list[int]:
            graph = gx.Graph(f"iso{t}")
            with graph:
                nodes = [isolated_pid(100 * t + k) for k in range(3)]
            run = graph.compute(pool=pool, keep="all")
            return [run[n] for n in nodes]

        def busy(t: int) -> list[int]:
            graph = gx.Graph(f"busy{t}")
            with graph:
                nodes = [pid_of(k) for k in range(30)]
            run = graph.compute(pool=pool, keep="all")
            return [run[n] for n in nodes]

        results = run_threads(
            [lambda t=t: isolated(t) for t in range(3)] + [lambda t=t: busy(t) for t in range(2)]
        )
    isolated_pids = [pid for r in results[:3] for pid in r]
    other_pids = {pid for r in results[3:] for pid in r}
    assert len(set(isolated_pids)) == len(isolated_pids) == 9  # one worker per call
    assert not set(isolated_pids) & other_pids


@pytest.mark.timeout(90)
def test_max_calls_per_worker_holds_across_the_runs_of_a_pool():
    """Four threads' runs on one pool with max_calls_per_worker=3: no worker runs
    more calls than it may, whatever run they come from (calls are queued on
    workers ahead of time), and every result goes to its own run."""
    with gx.Pool(workers=2, max_calls_per_worker=3) as pool:

        def computes(t: int) -> list[int]:
            pids = []
            for c in range(5):
                graph = gx.Graph(f"r{t}-{c}")
                with graph:
                    firsts = [pid_of(k) for k in range(4)]
                    seconds = [pid_of(first) for first in firsts]  # each after its first
                run = graph.compute(pool=pool, keep="all")
                pids += [run[n] for n in firsts + seconds]
            return pids

        results = run_threads([lambda t=t: computes(t) for t in range(4)])
    pids = [pid for r in results for pid in r]
    counts = {pid: pids.count(pid) for pid in set(pids)}
    assert len(pids) == 4 * 5 * 8
    assert max(counts.values()) <= 3, counts
