"""W6 at 1,000,000 nodes in a program of its own: build, run, and its peak RSS.

``python -m benchmarks.w6_million [DEPTH]`` starts a warm ``gx.Pool(workers=2)``,
builds W6's layered graph (100 wide, ``DEPTH`` layers: 10,000 by default),
runs it on the pool, checks the last layer, and prints one JSON line: the
build's and the run's seconds and this process's peak RSS (the kernel's own
high-water mark, from the interpreter's start to the end of the run, nothing
missed between samples).

The peak is Linux's ``VmHWM`` (``/proc/self/status``), the high-water mark of
this program's own memory, not ``ru_maxrss``: Linux carries ``ru_maxrss``
across ``exec``, so a program that ``subprocess`` starts (with ``vfork``, its
default) reports the peak of the process that started it if that was higher.
The pytest session of ``benchmarks/test_w6_scale.py`` had built million-node
graphs before starting this program, and its 1,588 MB stood for this
program's peak in RESULTS.md until #14's fourth session found it (about
920 MB here). Elsewhere ``ru_maxrss`` is used.

``benchmarks/test_w6_scale.py`` runs it with ``--w6-1m``: measured inside
the benchmark session, the peak would start from whatever the session's
earlier benchmarks left in its heap; a program that builds and runs a
million-node graph starts from a fresh interpreter, as here.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time

import graphexec as gx

from . import workloads as w


def peak_rss() -> int:
    """This program's peak RSS in bytes: ``VmHWM`` on Linux, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            found = re.search(r"^VmHWM:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        found = None
    if found is not None:
        return int(found.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def main(depth: int) -> None:
    with gx.Pool(workers=w.WORKERS) as pool:
        warm = gx.Graph()
        nodes = [warm.add(w.noop, i) for i in range(8)]
        run = warm.compute(pool=pool)
        assert [run[n] for n in nodes] == list(range(8))
        start = time.perf_counter()
        graph, last = w.layered_graph(w.W6_WIDTH, depth)
        built = time.perf_counter()
        run = graph.compute(pool=pool, progress=False)
        ran = time.perf_counter()
        assert run.counts() == {"Completed": w.W6_WIDTH * depth}
        assert {run[node] for node in last} == {depth - 1}
    peak = peak_rss()
    print(
        json.dumps(
            {
                "nodes": w.W6_WIDTH * depth,
                "build_s": built - start,
                "run_s": ran - built,
                "peak_rss_mb": peak / (1 << 20),
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10 * w.W6_DEPTH)
