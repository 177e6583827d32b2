"""Start-up: what `import graphexec` and a worker's start load, and the early forkserver.

Times are for benchmarks/ (test_startup_fresh.py); these tests check the
structure that keeps them low, which a timing could not check reliably on a
shared machine: `import graphexec` loads the model and nothing that only a
compute, a cache, a report or a dask cluster needs (those load on first use),
a worker's start (what graphexec's forkserver preloads) does not load the
scheduler or the surfaces, and a pool starts its forkserver when it is made.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import graphexec as gx

# Loaded on first use only: the scheduler and process pool (a compute), the
# surfaces' modules, the dask executor, reports and notebook views, and the
# third-party or stdlib modules that only some runs need.
NOT_AT_IMPORT = [
    "graphexec._surfaces.compute",
    "graphexec._surfaces.eager",
    "graphexec._surfaces.pool",
    "graphexec._surfaces.notebook",
    "graphexec._surfaces.report",
    "graphexec._engine.scheduler",
    "graphexec._executors.process",
    "graphexec._executors.cluster",
    "graphexec._data.cache",
    "multiprocessing",
    "sqlite3",
    "psutil",
    "tempfile",
]
# A worker loads what runs calls, not what schedules them or shows results.
NOT_IN_A_WORKER = [
    "graphexec._surfaces.compute",
    "graphexec._surfaces.eager",
    "graphexec._surfaces.notebook",
    "graphexec._surfaces.report",
    "graphexec._engine.scheduler",
    "graphexec._executors.process",
    "graphexec._executors.cluster",
    "sqlite3",
    "psutil",
]


def _loaded_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(out.stdout))


def test_import_graphexec_loads_only_what_building_needs():
    loaded = _loaded_after("import graphexec")
    assert [m for m in NOT_AT_IMPORT if m in loaded] == []


def test_a_worker_start_loads_no_scheduler_and_no_surfaces():
    # What graphexec's forkserver preloads (process._forkserver), and a spawned worker imports.
    loaded = _loaded_after("import graphexec._executors.worker")
    assert [m for m in NOT_IN_A_WORKER if m in loaded] == []


def test_the_public_names_load_on_first_use():
    names = _loaded_after(
        "import graphexec as gx; assert set(gx.__all__) <= set(dir(gx)); "
        "from graphexec import Pool, flow, wait, clear_cache, observe; gx.Future"
    )
    assert "graphexec._surfaces.pool" in names and "graphexec._data.cache" in names
    for name in gx.__all__:
        assert getattr(gx, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        gx.nothing  # noqa: B018


def test_a_plain_task_call_outside_a_flow_loads_no_session_module():
    # In a worker a task may call another task plainly: that must stay a plain
    # call, without loading the eager sessions (which only a flow needs).
    loaded = _loaded_after("import graphexec as gx; f = gx.task(lambda x: x + 1); assert f(1) == 2")
    assert "graphexec._surfaces.eager" not in loaded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forkserver is Linux's")
def test_a_new_pool_starts_its_forkserver_before_any_call():
    # In a fresh interpreter, so that no earlier forkserver (ours or Python's) counts.
    code = (
        "import psutil\n"
        "from graphexec._executors.process import ProcessPool\n"
        "def servers():\n"
        "    return [p.pid for p in psutil.Process().children()\n"
        "            if 'forkserver' in ' '.join(p.cmdline())]\n"
        "assert servers() == []\n"
        "pool = ProcessPool(2, start_method='forkserver')\n"
        "first = servers()\n"
        "assert len(first) == 1 and pool._workers == {}, (first, pool._workers)\n"
        "ProcessPool(2, start_method='forkserver').shutdown()\n"
        "assert servers() == first  # one server for the whole process\n"
        "pool.shutdown()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_first_compute_in_a_fresh_interpreter_works_without_surfaces_loaded():
    # The seam's entries load compute (and start the forkserver early) on first use.
    code = (
        "import os\n"
        "import graphexec as gx\n"
        "g = gx.Graph()\n"
        "with g:\n"
        "    n = gx.task(lambda: os.getpid())()\n"
        "run = g.compute(workers=2)\n"
        "assert run[n] != os.getpid()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_compute_loads_neither_the_report_page_nor_the_picture():
    # A run's record needs the report's codec only: the page's module (html,
    # importlib's resources) and the picture's load when a page or picture is made.
    loaded = _loaded_after(
        "import graphexec as gx\n"
        "g = gx.Graph()\n"
        "with g:\n"
        "    n = gx.task(lambda: 1)()\n"
        "assert g.compute(scheduler='sync', progress=False)[n] == 1\n"
        "from graphexec._surfaces import report\n"
        "assert report.run_to_html and report.visualize"  # ...and they load on first use
    )
    assert "graphexec._surfaces.report.codec" in loaded
    assert "graphexec._surfaces.report.html" in loaded  # by the last line alone
    loaded = _loaded_after(
        "import graphexec as gx\n"
        "g = gx.Graph()\n"
        "with g:\n"
        "    n = gx.task(lambda: 1)()\n"
        "assert g.compute(scheduler='sync', progress=False)[n] == 1"
    )
    assert "graphexec._surfaces.report.codec" in loaded
    late = ["graphexec._surfaces.report.html", "graphexec._surfaces.report.graphviz", "html"]
    assert [m for m in late if m in loaded] == []
