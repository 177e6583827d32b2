"""Soak (issue #18): thousands of computes on one warm pool, from several threads,
with random faults (a task that raises, a worker crash, a timeout, a memory kill).

Every run's states are checked against an oracle, and between rounds (all
threads paused) the parent's and the workers' RSS, open fds and threads, and
this pool's ``/dev/shm`` entries are sampled: what must not grow is checked by
its slope over the second half of the rounds (per 1,000 computes), after a
warm-up half, and printed.

Size: ``GRAPHEXEC_SOAK_COMPUTES`` computes in all (default 2000: about a minute
and a half on 2 busy cores), e.g.
``GRAPHEXEC_SOAK_COMPUTES=20000 python -m pytest tests/test_soak.py -m slow -s``
for a longer soak.
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from typing import Any

import numpy as np
import psutil
import pytest

import graphexec as gx
from graphexec._data import shm

THREADS = 4
ROUNDS = 10
COMPUTES = int(os.environ.get("GRAPHEXEC_SOAK_COMPUTES", "2000"))
PER_THREAD_ROUND = max(1, COMPUTES // (THREADS * ROUNDS))
WIDTH = 6  # healthy nodes per compute, besides the fault and its dependent
MEMORY_LIMIT = 300 * 2**20
# Faults per compute: mostly none; the expensive ones (a worker replaced) rarer.
FAULTS = [("none", 0.78), ("raise", 0.12), ("crash", 0.05), ("timeout", 0.03), ("memory", 0.02)]
EXPECTED_ERROR = {
    "raise": "ValueError",
    "crash": "WorkerCrashed",
    "timeout": "TaskTimeout",
    "memory": "MemoryLimitExceeded",
}


@gx.task
def inc(x: int) -> int:
    return x + 1


@gx.task
def add_all(xs: list[int]) -> int:
    return sum(xs)


@gx.task
def array_of(x: int) -> np.ndarray:
    return np.full(32_768, x, dtype=np.int64)  # 256 kB: travels through /dev/shm


@gx.task
def array_sum(a: np.ndarray) -> int:
    return int(a.sum())


@gx.task(timeout=20)
def fault(kind: str, x: int) -> int:
    if kind == "raise":
        raise ValueError(f"planned failure {x}")
    if kind == "crash":
        os._exit(7)
    if kind == "timeout":
        time.sleep(30)
    if kind == "memory":
        block = np.ones(2 * MEMORY_LIMIT // 8)  # every page written: RSS over the limit
        time.sleep(30)
        return int(block[0])
    return x


def one_compute(pool: gx.Pool, rng: random.Random) -> None:
    """Build a compute with at most one planned fault; check its states against the oracle."""
    kind = rng.choices([k for k, _ in FAULTS], weights=[w for _, w in FAULTS])[0]
    base = rng.randrange(1000)
    graph = gx.Graph("soak")
    with graph:
        healthy = [inc(base + i) for i in range(WIDTH)]
        total = add_all(healthy)
        big = array_sum(array_of(base))  # a value in shared memory, released mid-run
        # (the memory hog needs a while to fill its pages on a busy machine)
        bad = (fault.with_options(timeout=0.5) if kind == "timeout" else fault)(kind, base)
        after = inc(bad)
    run = graph.compute(pool=pool, keep="all", raise_on_failure=False, memory_limit=MEMORY_LIMIT)
    for i, node in enumerate(healthy):
        assert run.state(node).name == "Completed" and run[node] == base + i + 1
    assert run[total] == sum(base + i + 1 for i in range(WIDTH))
    assert run[big] == 32_768 * base
    if kind == "none":
        assert run.state(bad).name == "Completed" and run[after] == base + 1
        return
    state = run.state(bad)
    assert state.name == "Failed", (kind, state)
    assert type(state.exception).__name__ == EXPECTED_ERROR[kind], (kind, state.exception)
    assert run.state(after).name == "Skipped"
    assert run.failed == [bad]


def sample(pool: gx.Pool) -> dict[str, float]:
    # Runs and their graphs refer to each other: the values they mapped (an fd
    # each) go at the next collection, which comes at its own time; we count
    # what is left after it.
    gc.collect()
    me = psutil.Process()
    workers = []
    for w in list(pool._workers.values()):
        try:
            workers.append(psutil.Process(w.pid))
        except psutil.Error:
            pass
    prefix = shm.pool_prefix(os.getpid(), pool.id)
    shm_entries = len([n for n in os.listdir("/dev/shm") if n.startswith(prefix)])

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    def of_workers(fn: Any) -> float:
        values = []
        for proc in workers:
            try:
                values.append(float(fn(proc)))
            except psutil.Error:
                pass
        return mean(values)

    return {
        "parent_rss_mb": me.memory_info().rss / 2**20,
        "parent_fds": me.num_fds(),
        "parent_threads": me.num_threads(),
        "shm_entries": shm_entries,
        "worker_rss_mb": of_workers(lambda p: p.memory_info().rss / 2**20),
        "worker_fds": of_workers(lambda p: p.num_fds()),
        "worker_threads": of_workers(lambda p: p.num_threads()),
    }


def slope_per_1000(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (computes), per 1,000 computes."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


# RSS may drift this much per 1,000 computes after the warm-up half (MB: the
# allocator's high-water marks, a worker replaced just before a sample).
RSS_BOUNDS = {"parent_rss_mb": 8.0, "worker_rss_mb": 8.0}
# Counts must not climb past what the warm-up half reached (a transient
# thread, a worker being replaced while sampled, count once, not per compute).
COUNTS = ["parent_fds", "parent_threads", "shm_entries", "worker_fds", "worker_threads"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_thousands_of_computes_with_faults_from_several_threads():
    pool = gx.Pool(workers=2)
    try:
        samples: list[dict[str, float]] = []
        done: list[int] = []
        errors: list[BaseException] = []
        started = time.monotonic()
        for round_ in range(ROUNDS):

            def body(t: int, r: int = round_) -> None:
                rng = random.Random(1000 * r + t)
                try:
                    for _ in range(PER_THREAD_ROUND):
                        one_compute(pool, rng)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=body, args=(t,)) for t in range(THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
                assert not thread.is_alive(), "a soak thread hung"
            if errors:
                raise errors[0]
            done.append((round_ + 1) * THREADS * PER_THREAD_ROUND)
            samples.append(sample(pool))
        elapsed = time.monotonic() - started
        half = ROUNDS // 2
        xs = [float(x) for x in done[half:]]
        slopes = {k: slope_per_1000(xs, [s[k] for s in samples[half:]]) for k in samples[0]}
        print(
            f"\nsoak: {done[-1]} computes in {elapsed:.0f} s; slopes per 1000 computes "
            + ", ".join(f"{k} {v:+.2f}" for k, v in slopes.items())
            + "; first/last samples "
            + ", ".join(f"{k} {samples[0][k]:.1f}/{samples[-1][k]:.1f}" for k in slopes)
        )
        for key, bound in RSS_BOUNDS.items():
            assert slopes[key] <= bound, (key, slopes[key], [s[key] for s in samples])
        for key in COUNTS:
            early = max(s[key] for s in samples[:half])
            late = max(s[key] for s in samples[half:])
            assert late <= early, (key, [s[key] for s in samples])
        # At rest nothing of a run is left: no shared memory, no extra threads.
        assert samples[-1]["shm_entries"] == 0
        assert samples[-1]["parent_threads"] <= samples[0]["parent_threads"]
    finally:
        pool.close()
