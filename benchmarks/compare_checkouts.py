"""Time two checkouts of graphexec against each other, alternating, in one session.

A refactor must cost nothing; on a shared machine whose speed drifts from day
to day, the honest check is the old and the new code timed in turns, not
today's figures against last month's. Each round runs a fresh interpreter
with one checkout first on ``PYTHONPATH`` (workers inherit it), so both see
the same machine::

    git worktree add /tmp/before <commit>
    python -m benchmarks.compare_checkouts /tmp/before .           # all workloads
    python -m benchmarks.compare_checkouts /tmp/before . --turns 3 --only w1 w6
    python -m benchmarks.compare_checkouts /tmp/before . --only w2-cold --start-method zygote

Prints, per workload, each checkout's median of every turn. For warm
workloads it also prints the CPU time per task of this process (the
scheduler) and of the pool's workers: on a machine other programs load,
CPU time moves far less than wall time does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The child: measures one workload with the graphexec it imports, prints JSON.
CHILD = r"""
import json, resource, statistics, sys, time
import graphexec as gx
import numpy as np
import psutil

which, rounds = sys.argv[1], int(sys.argv[2])

def noop(i):
    return i

def total(xs):
    return sum(xs)

def inc(x):
    return x + 1

def make(i):
    return np.random.default_rng(i).random(2_000_000)

def srt(a):
    return np.sort(a)

def sm(a):
    return float(a.sum())

def tot(*xs):
    return sum(xs)

def layered(depth):
    node, root = gx.task(total), gx.task(noop)
    graph = gx.Graph()
    with graph:
        layer = [root(j) for j in range(100)]
        for _ in range(depth - 1):
            layer = [node([layer[j], layer[(j + 1) % 100]]) for j in range(100)]
    return graph

def w1(**kw):
    t = time.perf_counter()
    g = gx.Graph()
    with g:
        total_ = gx.task(total)([gx.task(noop)(i) for i in range(5000)])
    g.compute(**kw)
    return time.perf_counter() - t

def w2(**kw):
    t = time.perf_counter()
    g = gx.Graph()
    step = gx.task(inc)
    with g:
        x = step(0)
        for _ in range(499):
            x = step(x)
    g.compute(**kw)
    return time.perf_counter() - t

def w4(**kw):
    t = time.perf_counter()
    g = gx.Graph()
    with g:
        gx.task(tot)(*[gx.task(sm)(gx.task(srt)(gx.task(make)(i))) for i in range(32)])
    g.compute(**kw)
    return time.perf_counter() - t

def fail(i):
    if i % 10 == 0:
        raise ValueError(i)
    return i

def w5(**kw):
    t = time.perf_counter()
    g = gx.Graph()
    with g:
        xs = [gx.task(fail)(i) for i in range(1000)]
        [gx.task(total)(xs[k:k + 10]) for k in range(0, 1000, 10)]
    g.compute(raise_on_failure=False, **kw)
    return time.perf_counter() - t

def w6(depth, **kw):
    graph = layered(depth)
    t = time.perf_counter()
    graph.compute(**kw)
    return time.perf_counter() - t

cold = {"w1-cold": w1, "w2-cold": w2, "w4-cold": w4, "w5-cold": w5}
warm = {"w1-warm": w1, "w2-warm": w2, "w5-warm": w5,
        "w6-10k-warm": lambda **kw: w6(100, **kw),
        "w6-100k-warm": lambda **kw: w6(1000, **kw)}
extra = {}
if which in cold:
    cold[which](workers=2)
    times = [cold[which](workers=2) for _ in range(rounds)]
else:
    tasks = {"w1-warm": 5001, "w2-warm": 500, "w5-warm": 1100, "w6-10k-warm": 10_000,
             "w6-100k-warm": 100_000}[which]
    with gx.Pool(workers=2) as pool:
        warm[which](pool=pool)
        workers = psutil.Process().children(recursive=True)  # forkserver children
        def cpu():
            me = resource.getrusage(resource.RUSAGE_SELF)
            kids = sum(sum(p.cpu_times()[:2]) for p in workers if p.is_running())
            return me.ru_utime + me.ru_stime, kids
        times, mine, theirs = [], [], []
        for _ in range(rounds):
            before = cpu()
            times.append(warm[which](pool=pool))
            after = cpu()
            mine.append((after[0] - before[0]) / tasks * 1e6)
            theirs.append((after[1] - before[1]) / tasks * 1e6)
    extra = {"parent_us": statistics.median(mine), "workers_us": statistics.median(theirs)}
print(json.dumps({"median": statistics.median(times), "file": gx.__file__, **extra}))
"""

ROUNDS = {
    "w1-cold": 9,
    "w1-warm": 9,
    "w2-cold": 15,
    "w2-warm": 15,
    "w4-cold": 3,
    "w5-cold": 5,
    "w5-warm": 9,
    "w6-10k-warm": 7,
    "w6-100k-warm": 2,
}


def measure(checkout: Path, which: str, start_method: str | None = None) -> dict[str, float]:
    """The child's medians: ``median`` (seconds), and for warm workloads
    ``parent_us`` and ``workers_us`` (CPU microseconds per task).

    ``start_method``: ``GRAPHEXEC_START_METHOD`` in the child. The child
    imports numpy, so its default is the forkserver; ``zygote`` times what a
    script without numpy gets (as the benchmarks' "graphexec cold" column).
    """
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    if start_method is not None:
        env["GRAPHEXEC_START_METHOD"] = start_method
    out = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(ROUNDS[which])],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["file"].startswith(str(checkout)):
        raise SystemExit(f"{checkout}: imported graphexec from {result['file']}")
    del result["file"]
    return {k: float(v) for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--turns", type=int, default=2, help="alternations (default 2)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="workload name prefixes, e.g. w1 w6"
    )
    parser.add_argument(
        "--start-method", default=None, help="the workers' start method (default: the child's)"
    )
    args = parser.parse_args()
    names = [n for n in ROUNDS if not args.only or any(n.startswith(o) for o in args.only)]
    before, after = args.before.resolve(), args.after.resolve()
    print(f"before: {before}\nafter:  {after}\n{time.strftime('%Y-%m-%d %H:%M')}")
    for name in names:
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(args.turns):
            runs["before"].append(measure(before, name, args.start_method))
            runs["after"].append(measure(after, name, args.start_method))
        cells = {k: ", ".join(f"{r['median']:.3f}" for r in rs) for k, rs in runs.items()}
        ratio = statistics.median(r["median"] for r in runs["after"]) / statistics.median(
            r["median"] for r in runs["before"]
        )
        line = (
            f"{name:14s} before {cells['before']} s | after {cells['after']} s | "
            f"after/before {ratio:.2f}"
        )
        if "parent_us" in runs["before"][0]:
            cpu = {
                k: "/".join(
                    f"{statistics.median(r[f] for r in rs):.1f}"
                    for f in ("parent_us", "workers_us")
                )
                for k, rs in runs.items()
            }
            line += f" | CPU us/task parent/workers {cpu['before']} -> {cpu['after']}"
        print(line)


if __name__ == "__main__":
    main()
