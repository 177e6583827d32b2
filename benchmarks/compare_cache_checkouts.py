"""Two checkouts' cache costs side by side (issue #19): N tiny tasks, in turns.

For each checkout, in a fresh interpreter per turn (its own ``PYTHONPATH``,
which the workers inherit), on a warm ``gx.Pool(workers=2)``:

* ``uncached`` — N plain tiny tasks: the baseline;
* ``first``    — the same tasks ``cache=True`` into an empty directory;
* ``rerun``    — the same again on the full directory: all hits.

The checkouts alternate which goes first each turn, so both see the same
machine; printed: each variant's median, and first/uncached and
rerun/uncached (of the medians, and the median of each round's ratio)::

    git worktree add /tmp/before <commit>
    python -m benchmarks.compare_cache_checkouts /tmp/before . --n 10000 --turns 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import gc, json, shutil, sys, tempfile, time
import graphexec as gx

N, ROUNDS = int(sys.argv[1]), int(sys.argv[2])

@gx.task(cache=True)
def tiny(i):
    return i

@gx.task
def plain(i):
    return i

def timed(task, **kw):
    gc.collect()  # as benchmarks/test_cache_scale.py does before each round
    started = time.perf_counter()
    graph = gx.Graph()
    with graph:
        [task(i) for i in range(N)]
    graph.compute(**kw)
    return time.perf_counter() - started

out = {"uncached": [], "first": [], "rerun": []}
with gx.Pool(workers=2) as pool:
    timed(plain, pool=pool)  # warm
    for _ in range(ROUNDS):
        scratch = tempfile.mkdtemp()
        out["uncached"].append(timed(plain, pool=pool))
        out["first"].append(timed(tiny, pool=pool, cache_dir=scratch + "/c"))
        out["rerun"].append(timed(tiny, pool=pool, cache_dir=scratch + "/c"))
        shutil.rmtree(scratch)
print(json.dumps(out))
"""

VARIANTS = ("uncached", "first", "rerun")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="per turn")
    args = parser.parse_args()
    paths = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    times: dict[str, dict[str, list[float]]] = {k: {v: [] for v in VARIANTS} for k in paths}
    for turn in range(args.turns):
        order = ("before", "after") if turn % 2 == 0 else ("after", "before")
        for label in order:
            env = dict(os.environ, PYTHONPATH=paths[label])
            child = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.n), str(args.rounds)],
                capture_output=True,
                text=True,
                env=env,
                cwd="/tmp",
                check=True,
            )
            for variant, values in json.loads(child.stdout.strip().splitlines()[-1]).items():
                times[label][variant] += values
    print(f"N={args.n:,}, {args.turns} turns x {args.rounds} rounds, load {os.getloadavg()}")
    for label in paths:
        t = times[label]
        med = {v: statistics.median(t[v]) for v in VARIANTS}
        per_round = statistics.median(f / u for f, u in zip(t["first"], t["uncached"]))
        print(
            f"{label:7s} uncached {med['uncached']:.3f} s  first {med['first']:.3f} s  "
            f"rerun {med['rerun']:.3f} s  first/uncached {med['first'] / med['uncached']:.2f} "
            f"(per round {per_round:.2f})  rerun/uncached {med['rerun'] / med['uncached']:.2f}"
        )


if __name__ == "__main__":
    main()
