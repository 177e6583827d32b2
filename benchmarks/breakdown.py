"""Where the time goes per task: ``python -m benchmarks.breakdown``.

Times each step of graphexec's dispatch path on its own, in this process, then
the end-to-end figures on a warm 2-worker pool, and prints a Markdown table
(the one in ``docs/dispatch.md``). Steps:

- build: one task call inside ``with graph:`` (W1's graph, per node);
- scheduler: ordering, the ready heap, the Call, ``_finish`` and the Run, per
  node: W1 on the in-process ``sync`` scheduler minus its build;
- encode: pickling one call's arguments and its ``run`` message;
- worker: the worker's handling of one message (unpickle the arguments, call
  the no-op, pickle the reply), run here by calling the worker's own function;
- decode: unpickling one reply in the parent (its value stays pickled);
- round trip: what W2's per-link latency leaves after the steps above, with
  chains off (``keep="all"``): two pipe writes and reads, and two processes
  waking up;
- W1 and W2 end to end (W2 with and without chains), beside
  ProcessPoolExecutor with the benchmarks' driver.

Medians of several repetitions; figures move by 10-20 % between runs on a
shared 2-core machine, so read them as sizes, not as exact costs.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import graphexec as gx
from graphexec._data.serialize import Payload, dumps, encode_call
from graphexec._engine.chains import CHAIN_MAX
from graphexec._executors import worker as _worker

from . import workloads as w


def _median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _per_call(fn: Callable[[], Any], calls: int, repeat: int) -> float:
    """Median seconds of one ``fn()``, timed over ``calls`` calls at a time."""

    def batch() -> None:
        for _ in range(calls):
            fn()

    return _median_seconds(batch, repeat) / calls


def measure(repeat: int = 5) -> list[tuple[str, str, float]]:
    """The rows ``(step, where, microseconds per task)``."""
    w1, w2 = w.w1_spec(), w.w2_spec()
    n1, n2 = len(w1.calls), len(w2.calls)
    rows: list[tuple[str, str, float]] = []

    build = _median_seconds(lambda: w.build_graphexec(w1), repeat) / n1
    rows.append(("build: one task call in `with graph:`", "parent", build))
    sync = _median_seconds(lambda: w.run_graphexec(w1, scheduler="sync"), repeat) / n1
    rows.append(("scheduler: order, ready heap, Call, `_finish`, Run", "parent", sync - build))

    fn_id, token = 0, 12345
    encode = _per_call(
        lambda: pickle.dumps(
            ("run", token, fn_id, "noop-1", encode_call((1,), None, False), [], None, False),
            protocol=5,
        ),
        2000,
        repeat,
    )
    rows.append(("encode: pickle the arguments and the `run` message", "parent", encode))

    message = pickle.loads(
        pickle.dumps(
            ("run", token, fn_id, "noop-1", encode_call((1,), None, False), [], None, False),
            protocol=5,
        )
    )
    functions = {fn_id: pickle.loads(dumps(w.noop))}
    # The worker's loop ends a process whose pid is not the worker's (a child a
    # task forked); here this process plays the worker.
    _worker._worker_pid = os.getpid()
    handle = _per_call(lambda: _worker._run(message, functions, {}), 2000, repeat)
    rows.append(("worker: unpickle the arguments, call, pickle the reply", "worker", handle))

    reply = _worker._run(message, functions, {})
    decode = _per_call(lambda: Payload.from_wire(pickle.loads(reply)[2]), 2000, repeat)
    rows.append(("decode: unpickle the reply (the value stays pickled)", "parent", decode))

    with gx.Pool(workers=w.WORKERS) as pool:
        w.run_graphexec(w.w1_spec(50), pool=pool)  # workers up, functions loaded
        link = _median_seconds(lambda: w.run_graphexec(w2, pool=pool), repeat) / n2
        # keep="all" keeps every value for the Run, which turns chains off: each
        # link then makes the round trip through the parent.
        unchained = _median_seconds(lambda: w.run_graphexec(w2, pool=pool, keep="all"), repeat) / n2
        per_task = _median_seconds(lambda: w.run_graphexec(w1, pool=pool), repeat) / n1
    steps = build + (sync - build) + encode + handle + decode
    rows.append(
        (
            "round trip: two pipe messages, two wake-ups (unchained link minus the above)",
            "kernel",
            unchained - steps,
        )
    )
    rows.append(
        ('**W2: one link, unchained (`keep="all"`): a round trip each**', "graphexec", unchained)
    )
    rows.append(
        (
            f"**W2: one link, chained (default): up to {CHAIN_MAX + 1} links per dispatch**",
            "graphexec",
            link,
        )
    )
    rows.append(
        ("**W1: one task of 5,000, end to end (2 workers, prefetch)**", "graphexec", per_task)
    )

    with ProcessPoolExecutor(max_workers=w.WORKERS) as executor:
        w.run_executor(executor, w.w1_spec(50))
        ppe_link = _median_seconds(lambda: w.run_executor(executor, w2), repeat) / n2
        ppe_task = _median_seconds(lambda: w.run_executor(executor, w1), repeat) / n1
    rows.append(("W2 link, ProcessPoolExecutor driver", "anchor", ppe_link))
    rows.append(("W1 task, ProcessPoolExecutor driver", "anchor", ppe_task))
    return rows


def table(rows: list[tuple[str, str, float]]) -> str:
    lines = ["| step | where | µs per task |", "|---|---|---:|"]
    lines += [f"| {step} | {where} | {seconds * 1e6:.1f} |" for step, where, seconds in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per figure")
    args = parser.parse_args(argv)
    print(table(measure(args.repeat)))


if __name__ == "__main__":
    main()
