"""The cache at scale (issue #19): many tiny cached tasks, graphexec beside joblib.Memory.

For N tiny tasks (``tiny(i) -> i``), each tool:

* ``uncached``  — the same calls without a cache: the baseline;
* ``first``     — every call cached, into an empty cache directory each round
                  (keys, lookups, locks and writing every entry);
* ``rerun``     — the same calls on the full directory: all hits, nothing runs.

graphexec runs on the warm ``gx_pool`` fixture (``gx.Pool(workers=2)``, started
outside the timed region); joblib runs ``Parallel(n_jobs=2)`` (its loky pool
stays warm between rounds too) over ``Memory(location).cache(tiny)``. N is
10,000 and 100,000 for both, to show that the cost per entry stays flat
(joblib's 100,000-entry first run takes about a minute: one round). Building
the graph is inside graphexec's timed region.

``extra_info`` has the bytes and files the directory holds after a round
(``disk_bytes``, ``files``; for graphexec also ``disk_bytes_settled``, two
seconds later, once its WAL has been checkpointed and emptied),
``us_per_task``, and, for ``first`` and ``rerun``, ``vs_uncached``: the median
divided by the same tool's uncached median (taken in the same session:
``uncached`` runs first). The ratios are also printed at
the end of the module (to the terminal, past pytest's capture).

Each round starts with ``gc.collect()`` (untimed, every tool and variant): in
a benchmark session the heap holds every tool's modules, and a full collection
over it costs 100 ms or more. Which round's allocations happened to trigger one
moved single rounds by that much (a first run of 10,000 entries took 0.24 to
0.37 s), and the ratios below compare the cache's cost, not the collector's.

Run: ``python -m pytest benchmarks/test_cache_scale.py --benchmark-only -q``.
"""

from __future__ import annotations

import gc
import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import graphexec as gx
from graphexec._data.cache import SYNC_DELAY

pytestmark = [pytest.mark.timeout(1800)]

VARIANTS = ("uncached", "first", "rerun")
ROUNDS = {10_000: 5, 100_000: 2}
medians: dict[tuple[str, int, str], float] = {}


@gx.task
def tiny(i: int) -> int:
    return i


tiny_cached = tiny.with_options(cache=True)


def plain(i: int) -> int:
    return i


def _disk(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


@pytest.fixture(scope="module", autouse=True)
def print_ratios() -> Any:
    yield
    lines = ["", "cache at scale (median s; first and rerun also as x uncached):"]
    for tool, n in sorted({(t, n) for t, n, _ in medians}):
        base = medians.get((tool, n, "uncached"))
        cells = []
        for variant in VARIANTS:
            m = medians.get((tool, n, variant))
            if m is None:
                continue
            ratio = f" ({m / base:.2f}x)" if base and variant != "uncached" else ""
            cells.append(f"{variant} {m:.3f}{ratio}")
        lines.append(f"  {tool:9} {n:>7,}: " + ", ".join(cells))
    print("\n".join(lines), file=sys.__stderr__)


def _record(benchmark: Any, tool: str, n: int, variant: str, root: Path | None) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    median = stats.stats.median
    medians[(tool, n, variant)] = median
    benchmark.extra_info["us_per_task"] = median / n * 1e6
    base = medians.get((tool, n, "uncached"))
    if base and variant != "uncached":
        benchmark.extra_info["vs_uncached"] = median / base
    if root is not None and root.exists():
        benchmark.extra_info["disk_bytes"], benchmark.extra_info["files"] = _disk(root)
        if tool == "graphexec":  # once the syncer has checkpointed the WAL (1 s)
            time.sleep(2 * SYNC_DELAY)
            benchmark.extra_info["disk_bytes_settled"] = _disk(root)[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [10_000, 100_000])
def test_graphexec(benchmark, gx_pool, tmp_path, n, variant):
    dirs = (tmp_path / f"cache-{k}" for k in itertools.count())
    full = tmp_path / "cache-full"
    current: list[Path] = [full]
    task = tiny if variant == "uncached" else tiny_cached

    def build() -> gx.Graph:
        graph = gx.Graph()
        with graph:
            for i in range(n):
                task(i)
        return graph

    if variant == "rerun":  # fill it once, untimed
        assert build().compute(pool=gx_pool, cache_dir=full).counts() == {"Completed": n}

    def setup() -> None:
        if variant == "first":  # a new, empty directory each round
            for old in current:
                shutil.rmtree(old, ignore_errors=True)
            current[:] = [next(dirs)]
        gc.collect()  # see the module docstring

    counts: list[dict[str, int]] = []

    def once() -> None:
        kw = {} if variant == "uncached" else {"cache_dir": current[0]}
        counts.append(build().compute(pool=gx_pool, **kw).counts())

    benchmark.group = f"cache-scale-{n}"
    benchmark.extra_info.update(
        workload=f"cache-scale-{n}",
        tool=f"graphexec-{variant}",
        label="graphexec (warm gx_pool, 2 workers)",
        tasks=n,
    )
    benchmark.pedantic(once, setup=setup, rounds=ROUNDS[n], iterations=1)
    state = "Cached" if variant == "rerun" else "Completed"
    assert all(c == {state: n} for c in counts), counts
    _record(benchmark, "graphexec", n, variant, None if variant == "uncached" else current[0])


JOBLIB_ROUNDS = {10_000: 3, 100_000: 1}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [10_000, 100_000])
def test_joblib(benchmark, tmp_path, n, variant):
    joblib = pytest.importorskip("joblib")
    dirs = (tmp_path / f"joblib-{k}" for k in itertools.count())
    full = tmp_path / "joblib-full"
    current: list[Path] = [full]
    parallel = joblib.Parallel(n_jobs=2)

    def run() -> list[int]:
        fn = plain if variant == "uncached" else joblib.Memory(current[0], verbose=0).cache(plain)
        return parallel(joblib.delayed(fn)(i) for i in range(n))

    if variant == "rerun":
        assert run() == list(range(n))

    def setup() -> None:
        if variant == "first":
            for old in current:
                shutil.rmtree(old, ignore_errors=True)
            current[:] = [next(dirs)]
        gc.collect()  # see the module docstring

    results: list[list[int]] = []
    benchmark.group = f"cache-scale-{n}"
    benchmark.extra_info.update(
        workload=f"cache-scale-{n}",
        tool=f"joblib-{variant}",
        label="joblib.Memory + Parallel(n_jobs=2)",
        tasks=n,
    )
    benchmark.pedantic(
        lambda: results.append(run()), setup=setup, rounds=JOBLIB_ROUNDS[n], iterations=1
    )
    assert all(r == list(range(n)) for r in results)
    _record(benchmark, "joblib", n, variant, None if variant == "uncached" else current[0])
