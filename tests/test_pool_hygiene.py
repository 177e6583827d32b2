"""graphexec leaves the program's multiprocessing alone (#12).

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
from typing import Any

import pytest

import graphexec as gx
from graphexec._executors import process as _process
from graphexec._executors import worker as _worker

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

            for method in ("forkserver", "spawn"):
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
