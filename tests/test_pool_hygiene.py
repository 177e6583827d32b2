"""A warm pool stays bounded, and graphexec leaves the program's multiprocessing alone (#12).

* Defect 6: the pool's function registry, and each worker's copy of it, is
  an LRU: a lambda per compute through one warm pool does not add up.
* Defect 9: graphexec starts its workers with a context, a forkserver and a
  preparation step of its own: no global patch, no change to Python's
  shared forkserver, no default start method chosen for the program.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from conftest import running

import graphexec as gx
from graphexec._executors import process as _process
from graphexec._executors import worker as _worker

# -- defect 6: a bounded function registry ---------------------------------------------------

BLOB = 8 * 1024  # bytes each function closes over: a worker keeping them all grows visibly


def _closure(i: int) -> Callable[[int], int]:
    """A new function object every call, sent by value (cloudpickle) with its blob."""
    blob = bytes([i % 251]) * BLOB
    return lambda x: x + len(blob) + i


def _worker_registry(_: int) -> tuple[int, int]:
    time.sleep(0.05)  # long enough for every worker to take one of these
    return os.getpid(), len(_worker.functions)


def _registries(pool: gx.Pool) -> dict[int, int]:
    """pid -> size of that worker's function dict, for every worker of ``pool``."""
    graph = gx.Graph()
    nodes = [graph.add(_worker_registry, i) for i in range(4 * pool.workers)]
    run = graph.compute(pool=pool)
    return dict(run[n] for n in nodes)


def _parent_registry(pool: gx.Pool) -> list[int]:
    procs = pool._procs
    return [len(procs._fn_ids), len(procs._fn_keep), len(procs._fn_blobs), len(procs._fn_short)]


def _rss(pool: gx.Pool) -> dict[int, int]:
    return {w.pid: psutil.Process(w.pid).memory_info().rss for w in pool._workers.values()}


@pytest.mark.timeout(240)
def test_ten_thousand_distinct_functions_leave_a_warm_pool_flat() -> None:
    kept = _process.FUNCTIONS_KEPT
    with gx.Pool(workers=2) as pool:
        rss_before: dict[int, int] = {}
        for batch in range(100):
            graph = gx.Graph()
            ks = range(batch * 100, batch * 100 + 100)
            nodes = [graph.add(_closure(k), 1) for k in ks]
            run = graph.compute(pool=pool)
            # Right values: no function id ever named another function.
            assert [run[n] for n in nodes] == [1 + BLOB + k for k in ks]
            if batch == 9:  # warm: imports done, arenas grown, the LRU full
                _registries(pool)
                rss_before = _rss(pool)
        sizes = _registries(pool)
        rss_after = _rss(pool)
        assert max(_parent_registry(pool)) <= kept + 1, _parent_registry(pool)
        assert len(sizes) == 2 and max(sizes.values()) <= kept + 1, sizes
        assert rss_after.keys() == rss_before.keys()  # the same two workers all along
        for pid, rss in rss_after.items():
            # Unbounded, each worker would keep ~4,500 more functions of 8 KiB: +36 MiB.
            assert rss - rss_before[pid] < 12 * 2**20, (rss_before, rss_after)


def _step(name: str, k: int) -> Callable[[Any], Any]:
    def fn(x: Any) -> Any:
        return [*x, (name, k)] if isinstance(x, list) else [(name, k)]

    return fn


def _tiny(k: int) -> int:
    return k


@pytest.mark.timeout(120)
def test_eviction_never_drops_a_function_with_calls_queued_or_chained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A tiny cap: every submit evicts, while chains (distinct functions queued
    # behind a running call), prefetch (tiny calls queued on busy workers) and
    # refused submits (their message already names a function id) are in flight.
    monkeypatch.setattr(_process, "FUNCTIONS_KEPT", 4)
    with gx.Pool(workers=2) as pool:
        for rnd in range(6):
            graph = gx.Graph()
            chains = []
            for c in range(6):
                node = graph.add(_step("a", c), None)
                for s in range(1, 6):  # a -> b -> ... each node the sole consumer
                    node = graph.add(_step(f"s{s}", rnd * 100 + c), node)
                chains.append(node)
            tiny = [graph.add(_tiny, k) for k in range(200)]  # one function, prefetched
            again = [graph.add(_closure(k % 3), k) for k in range(30)]  # re-sent after eviction
            run = graph.compute(pool=pool)
            for c, node in enumerate(chains):
                assert run[node] == [("a", c)] + [(f"s{s}", rnd * 100 + c) for s in range(1, 6)]
            assert [run[n] for n in tiny] == list(range(200))
            assert [run[n] for n in again] == [k + BLOB + k % 3 for k in range(30)]
        assert max(_parent_registry(pool)) <= 4 + 8, _parent_registry(pool)
        assert max(_registries(pool).values()) <= 4 + 8


# -- defect 9: graphexec's start-up machinery is its own ---------------------------------------

# A program that uses graphexec and its own process pools. What the user's
# children have imported is compared with the same program run without
# graphexec: graphexec must change nothing about them.
PROGRAM = textwrap.dedent(
    """
    import concurrent.futures, json, multiprocessing, multiprocessing.forkserver
    import multiprocessing.spawn, os, sys

    ORIGINAL_PREPARATION = multiprocessing.spawn.get_preparation_data

    def probe(_):
        return sorted(sys.modules)

    def user_pool(method):
        ctx = multiprocessing.get_context(method)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            return ex.submit(probe, 0).result()

    def parent_pid(_):
        return os.getppid()

    if __name__ == "__main__":
        order = sys.argv[1]  # none | graphexec-first | user-first
        report = {"children": {}}
        if order == "user-first":
            report["children"]["forkserver-before"] = user_pool("forkserver")
        if order != "none":
            import graphexec as gx

            for method in ("zygote", "forkserver", "spawn"):
                graph = gx.Graph()
                nodes = [graph.add(parent_pid, i) for i in range(4)]
                run = graph.compute(workers=2, start_method=method)
                report[f"{method}-worker-parents"] = sorted({run[n] for n in nodes})
            report["start-method"] = multiprocessing.get_start_method(allow_none=True)
            report["shared-forkserver"] = multiprocessing.forkserver._forkserver._forkserver_pid
        report["children"]["forkserver"] = user_pool("forkserver")
        report["children"]["spawn"] = user_pool("spawn")
        report["patched"] = multiprocessing.spawn.get_preparation_data is not ORIGINAL_PREPARATION
        report["preload"] = multiprocessing.forkserver._forkserver._preload_modules
        print("REPORT", json.dumps(report))
    """
)


def _env() -> dict[str, str]:
    """The environment of a program that imports the graphexec under test."""
    env = {k: v for k, v in os.environ.items() if k != "GRAPHEXEC_START_METHOD"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(gx.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _program(tmp_path: Any, order: str) -> dict[str, Any]:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    done = subprocess.run(
        [sys.executable, str(script), order],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=tmp_path,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    report: dict[str, Any] = json.loads(line[len("REPORT ") :])
    return report


@pytest.mark.timeout(120)
@pytest.mark.parametrize("order", ["graphexec-first", "user-first"])
def test_the_users_own_process_pools_start_as_without_graphexec(tmp_path: Any, order: str) -> None:
    plain = _program(tmp_path, "none")
    report = _program(tmp_path, order)
    assert report["patched"] is False  # multiprocessing.spawn.get_preparation_data untouched
    assert report["preload"] == plain["preload"] == ["__main__"]  # Python's forkserver too
    for kind, modules in report["children"].items():
        assert not [m for m in modules if m.split(".")[0] == "graphexec"], kind
        assert modules == plain["children"][kind.replace("-before", "")], kind
    # graphexec's workers never came from Python's shared forkserver ...
    shared = report["shared-forkserver"]
    assert shared not in report["forkserver-worker-parents"]
    assert shared not in report["zygote-worker-parents"]
    if order == "graphexec-first":
        # ... which it did not even start; nor did it choose the program's
        # default start method (set_start_method() would then fail).
        assert shared is None
        assert report["start-method"] is None


@pytest.mark.timeout(60)
def test_graphexecs_forkserver_preloads_its_worker_module() -> None:
    graph = gx.Graph()
    nodes = [graph.add(os.getppid) for _ in range(2)]
    with gx.Pool(workers=1, start_method="forkserver") as pool:
        run = graph.compute(pool=pool)
    server = _process._forkserver()
    assert {run[n] for n in nodes} == {server._forkserver_pid}
    assert _worker.__name__ in server._preload_modules
    # Every name resolves: a stale one is silently skipped, and workers start slow.
    assert all(importlib.util.find_spec(m) is not None for m in server._preload_modules)


EXIT_WITH_A_DAEMON_COMPUTING = """\
import atexit, json, os, sys, threading, time
from pathlib import Path

import psutil

here, how = Path(sys.argv[1]), sys.argv[2]


def wait_for_the_daemon():
    # Registered before graphexec's own exit hook, so run after it (atexit is
    # last in, first out): the daemon thread reports its run meanwhile.
    deadline = time.monotonic() + 20
    while not (here / "states.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


atexit.register(wait_for_the_daemon)

import graphexec as gx


@gx.task
def quick(i):
    return i


@gx.task
def slow(path, after):
    Path(path).touch()
    time.sleep(60)


pool = gx.Pool(workers=2) if how == "open-pool" else None


@gx.flow(workers=2)
def flow():
    first = quick.submit(1)
    return [first, slow.submit(str(here / "started"), first)]


def compute():
    if how == "flow":
        try:
            flow()
        except Exception as exc:  # the failure of its value's node: the flow's run
            run = exc.run
        states = {n.name: (run.state(n).name, str(run.state(n).exception)) for n in run.nodes}
    else:
        graph = gx.Graph()
        with graph:
            first = quick(1)
            nodes = [first, slow(str(here / "started"), first)]
        run = graph.compute(pool=pool, raise_on_failure=False)
        states = {n.name: (run.state(n).name, str(run.state(n).exception)) for n in nodes}
    (here / "states.tmp").write_text(json.dumps(states))
    os.replace(here / "states.tmp", here / "states.json")  # whole, or not there


threading.Thread(target=compute, daemon=True).start()
while not (here / "started").exists():
    time.sleep(0.01)
print("PIDS", json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
# The program ends here, a daemon thread's compute running on its pool.
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["open-pool", "own-pool", "flow"])
def test_a_program_exiting_while_a_daemon_thread_computes_ends_its_run_cleanly(
    tmp_path: Any, how: str
) -> None:
    # The exit hook stopped the workers behind the back of the thread driving the pool:
    # "ValueError: process object is closed" in the hook, nodes blamed on a SIGKILL
    # "often the kernel's out-of-memory killer", or the compute raising an internal
    # error. Now the pool is shut down as close() does it: the run's pending nodes
    # fail saying the program exited, and no worker is left.
    script = tmp_path / "program.py"
    script.write_text(EXIT_WITH_A_DAEMON_COMPUTING)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), how],
        capture_output=True,
        text=True,
        timeout=80,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    pids = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("PIDS "))[5:])
    deadline = time.monotonic() + 10
    while any(running(p) for p in pids):
        assert time.monotonic() < deadline, "a worker outlived the program"
        time.sleep(0.05)
    states = json.loads((tmp_path / "states.json").read_text())
    assert states["quick-0"][0] == "Completed"
    assert states["slow-0"][0] == "Failed"
    assert "the program exited" in states["slow-0"][1]
