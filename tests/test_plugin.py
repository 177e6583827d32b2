"""The pytest plugin (``graphexec_pytest``), run in real pytest sessions.

Each test writes a small test suite into a temporary directory and runs
pytest on it in a subprocess (pytester), with the plugin loaded by ``-p``
as its entry point loads it in an installed graphexec; what the inner
session saw comes back through its output and a JSON file.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import running

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli below 3.11
    import tomli as tomllib

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "graphexec_pytest"
INNER_TIMEOUT = 90  # seconds for one inner pytest session

# Reports, at the very end of the inner session, which modules it imported.
MODULES_AT_EXIT = """
import sys

import pytest


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    loaded = {name: name in sys.modules for name in ("graphexec_pytest", "graphexec")}
    print(f"\\nAT-EXIT {loaded}")
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester whose subprocesses import this checkout's graphexec and plugin."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), path])))
    # The CI variable and a terminal decide graphexec's progress bar; keep it off.
    monkeypatch.setenv("CI", "1")
    return pytester


def run_inner(pytester: pytest.Pytester, *args: str, plugin: bool = True) -> pytest.RunResult:
    extra = ("-p", PLUGIN) if plugin else ()
    return pytester.runpytest_subprocess(
        *extra, "-s", "-p", "no:cacheprovider", *args, timeout=INNER_TIMEOUT
    )


@pytest.mark.timeout(INNER_TIMEOUT + 30)
def test_a_session_that_does_not_use_it_never_imports_graphexec(inner: pytest.Pytester) -> None:
    inner.makeconftest(MODULES_AT_EXIT)
    inner.makepyfile(
        test_plain="""
        import sys

        def test_plain():
            assert "graphexec" not in sys.modules

        def test_another(tmp_path, monkeypatch):
            monkeypatch.setenv("X", "1")
            assert "graphexec" not in sys.modules
        """
    )
    result = run_inner(inner)
    result.assert_outcomes(passed=2)
    # The plugin was loaded (its options exist), graphexec never was.
    result.stdout.fnmatch_lines(["AT-EXIT {'graphexec_pytest': True, 'graphexec': False}"])


POOL_SUITE = {
    "conftest": """
        import json
        import os
        import pytest

        SEEN = []  # (test, id of the pool, worker pids its tasks ran in)

        @pytest.hookimpl(trylast=True)
        def pytest_sessionfinish(session):
            pools = {id(pool): pool for _, pool, _ in SEEN}
            record = {
                "tests": [name for name, _, _ in SEEN],
                "pools": len(pools),
                "closed": [pool.closed for pool in pools.values()],
                "workers": [pool.workers for pool in pools.values()],
                "pids": sorted({pid for _, _, pids in SEEN for pid in pids}),
                "test_process": os.getpid(),
            }
            with open(os.environ["POOL_RECORD"], "w") as f:
                json.dump(record, f)
        """,
    "test_first": """
        import os
        import graphexec as gx
        from conftest import SEEN

        @gx.task
        def where(i):
            return os.getpid()

        def run_on(pool, name):
            # warm before the test: every worker already runs
            assert len(pool._workers) == pool.workers
            graph = gx.Graph()
            with graph:
                nodes = [where(i) for i in range(6)]
            run = graph.compute(pool=pool)
            SEEN.append((name, pool, {run[n] for n in nodes}))

        def test_first(graphexec_pool):
            run_on(graphexec_pool, "first")
        """,
    "test_second": """
        from test_first import run_on

        def test_second(graphexec_pool):
            run_on(graphexec_pool, "second")

        def test_third(graphexec_pool):
            run_on(graphexec_pool, "third")
        """,
}


@pytest.mark.timeout(INNER_TIMEOUT + 30)
def test_one_warm_pool_for_the_session_closed_at_its_end(
    inner: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_path = tmp_path / "record.json"
    monkeypatch.setenv("POOL_RECORD", str(record_path))
    inner.makepyfile(**POOL_SUITE)
    result = run_inner(inner)
    result.assert_outcomes(passed=3)
    record = json.loads(record_path.read_text())
    assert record["tests"] == ["first", "second", "third"]
    assert record["pools"] == 1, "each test must get the same pool"
    assert record["closed"] == [True], "the pool must be closed when the session ends"
    assert record["workers"] == [2], "--graphexec-workers defaults to 2"
    # The tasks ran in the pool's own workers: two processes, none of them
    # the test process, and none alive once the session is over.
    pids = record["pids"]
    assert len(pids) == 2 and record["test_process"] not in pids, record
    assert [pid for pid in pids if running(pid)] == [], "orphaned workers"


@pytest.mark.timeout(INNER_TIMEOUT + 30)
def test_graphexec_workers_sets_the_pool_size(
    inner: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_path = tmp_path / "record.json"
    monkeypatch.setenv("POOL_RECORD", str(record_path))
    inner.makepyfile(**POOL_SUITE)
    result = run_inner(inner, "--graphexec-workers", "3")
    result.assert_outcomes(passed=3)
    record = json.loads(record_path.read_text())
    assert record["workers"] == [3]
    assert record["closed"] == [True]
    assert [pid for pid in record["pids"] if running(pid)] == []


@pytest.mark.timeout(INNER_TIMEOUT + 30)
def test_graphexec_workers_must_be_positive(inner: pytest.Pytester) -> None:
    # Refused when the command line is read: it was an error of each test that asked
    # for the pool, and the others ran.
    inner.makepyfile(
        test_pool="def test_pool(graphexec_pool):\n    pass\n",
        test_plain="def test_plain():\n    pass\n",
    )
    for value, says in (
        ("0", "must be at least 1, got 0"),
        ("two", "must be a whole number, got 'two'"),
    ):
        result = run_inner(inner, "--graphexec-workers", value)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"*--graphexec-workers: {says}*"])
        assert "passed" not in result.stdout.str()


@pytest.mark.timeout(INNER_TIMEOUT + 30)
def test_graphexec_sync_runs_computes_and_flows_in_the_test_thread(
    inner: pytest.Pytester,
) -> None:
    inner.makepyfile(
        test_sync="""
        import os
        import threading
        import pytest
        import graphexec as gx

        @gx.task
        def where():
            return os.getpid(), threading.get_ident()

        @gx.flow(workers=2)
        def flow_where():
            return where.submit()

        HERE = (os.getpid(), threading.get_ident())

        def compute_where(**options):
            graph = gx.Graph()
            with graph:
                node = where()
            return graph.compute(**options)[node]

        def test_compute(graphexec_sync):
            assert compute_where(workers=2) == HERE
            assert compute_where(scheduler="processes", start_method="spawn") == HERE
            # worker processes' settings: there are none to apply them to
            assert compute_where(workers=2, max_calls_per_worker=50, inner_threads=1) == HERE

        def test_compute_on_the_session_pool(graphexec_sync, graphexec_pool):
            assert compute_where(pool=graphexec_pool) == HERE

        def test_flow(graphexec_sync):
            # in this process; a flow's scheduler runs on a thread of its own
            pid, _ = flow_where()
            assert pid == os.getpid()

        def test_flow_keeps_its_prefect_keywords(graphexec_sync):
            names = []

            @gx.flow(workers=2, flow_run_name="sweep-{n}", on_completion=[
                lambda flow, flow_run, state: names.append(flow_run.name)])
            def sweep(n):
                return n

            assert sweep(2) == 2 and names == ["sweep-2"]

        @pytest.mark.usefixtures("graphexec_sync")
        class TestWholeClass:
            def test_compute(self):
                assert compute_where(workers=2) == HERE

        def test_policies_still_apply(graphexec_sync):
            calls = []

            @gx.task(retries=2)
            def flaky():
                calls.append(1)
                if len(calls) < 3:
                    raise ConnectionError("not yet")
                return "ok"

            graph = gx.Graph()
            with graph:
                node = flaky()
            run = graph.compute(workers=2)
            assert run[node] == "ok" and run.state(node).attempts == 3

        # Without the fixture, and after a test that used it: workers again.
        def test_restored_afterwards():
            pid, _ = compute_where(workers=1)
            assert pid != os.getpid()
            pid, _ = flow_where()
            assert pid != os.getpid()
        """
    )
    result = run_inner(inner)
    result.assert_outcomes(passed=7)


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_the_distribution_declares_the_plugin() -> None:
    config = _pyproject()
    # The entry point's name is the module's, so that `-p graphexec_pytest`
    # and the entry point name one plugin rather than registering it twice.
    assert config["project"]["entry-points"]["pytest11"] == {PLUGIN: PLUGIN}
    assert PLUGIN in config["tool"]["setuptools"]["py-modules"]
    assert (ROOT / f"{PLUGIN}.py").is_file()


def _installed_entry_point() -> bool:
    return any(ep.value == PLUGIN for ep in entry_points(group="pytest11"))


@pytest.mark.timeout(INNER_TIMEOUT + 30)
def test_installed_graphexec_loads_the_plugin_by_itself(inner: pytest.Pytester) -> None:
    if not _installed_entry_point():
        # A developer's venv may hold metadata installed before the plugin
        # existed; CI installs this checkout (`pip install -e '.[test]'`).
        pytest.skip("the installed graphexec metadata has no pytest11 entry point: reinstall")
    inner.makeconftest(MODULES_AT_EXIT)
    inner.makepyfile(
        test_pool="def test_pool(graphexec_pool):\n    assert graphexec_pool.workers == 2\n"
    )
    result = run_inner(inner, plugin=False)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["AT-EXIT {'graphexec_pytest': True, 'graphexec': True}"])


@pytest.mark.timeout(INNER_TIMEOUT + 30)
def test_under_pdb_a_graph_failure_is_debugged_where_its_task_raised(
    inner: pytest.Pytester,
) -> None:
    # pytest --pdb stopped in compute()'s re-raise of GraphFailed, where none of the
    # task's variables can be read ("NameError: name 'secret' is not defined").
    inner.makepyfile(
        test_debug="""
        import graphexec as gx

        @gx.task
        def boom(x):
            secret = x + 40
            raise ValueError(f"bad {secret}")

        def test_in_process(graphexec_sync):
            graph = gx.Graph()
            with graph:
                boom(1)
            graph.compute(workers=2)
        """
    )
    result = inner.run(
        sys.executable,
        "-m",
        "pytest",
        "-p",
        PLUGIN,
        "-p",
        "no:cacheprovider",
        "--pdb",
        "test_debug.py",
        stdin=b"p f'<{secret}>'\nq\n",
        timeout=INNER_TIMEOUT,
    )
    result.stdout.fnmatch_lines(["*test_debug.py(6)boom()*", "*<41>*"])
