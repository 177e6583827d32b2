"""The examples run as a user runs them, and print what the README says they print.

Each example runs as ``python examples/<name>.py`` in a subprocess from the
repository root (so functions defined in a script's ``__main__`` travel to
the workers by value, for real), must exit 0 within
a bound, and must print its key lines. README's single test command therefore
covers the examples too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RUN_TIMEOUT = 90  # seconds; both examples take a few seconds on 2 cores


def run_example(name: str) -> str:
    """Run ``examples/<name>`` from the repository root; return its stdout."""
    try:
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / name)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{name} did not finish within {RUN_TIMEOUT} s; output so far:\n"
            f"{exc.stdout}\n{exc.stderr}"
        )
    assert proc.returncode == 0, (
        f"{name} exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n"
        f"{proc.stderr}"
    )
    return proc.stdout


def assert_lines(output: str, expected: list[str]) -> None:
    missing = [line for line in expected if line not in output]
    assert not missing, f"missing from the output: {missing}\n--- output\n{output}"


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_quickstart() -> None:
    out = run_example("quickstart.py")
    assert_lines(
        out,
        [
            # the bad sweep point raises GraphFailed, with the worker's traceback ...
            "graphexec raised GraphFailed:",
            "validate-4: ValueError: sweep point 'typo': volatility must be > 0",
            "Traceback of validate-4 (in its worker):",
            # ... its dependents are skipped, transitively, naming the root cause ...
            "typo      Skipped: estimate-4 was skipped because its upstream validate-4 failed",
            "simulate-16 was skipped because its upstream validate-4 failed",
            # ... and everything else completed
            "option-sweep: 30 nodes in",
            "24 completed, 1 failed, 5 skipped — 1 unhandled failure(s)",
        ],
    )
    # Every good sweep point agrees with the exact Black-Scholes price.
    rows = re.findall(
        r"^(calm|normal|volatile|wild)\s+([\d.]+)\s+([\d.]+) ± ([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)$",
        out,
        re.MULTILINE,
    )
    assert [r[0] for r in rows] == ["calm", "normal", "volatile", "wild"], out
    for name, _sigma, price, stderr, exact, _z in rows:
        assert abs(float(price) - float(exact)) < 5 * float(stderr), (name, price, exact)


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_prefect_patterns() -> None:
    out = run_example("prefect_patterns.py")
    assert_lines(
        out,
        [
            # 1. return_state
            "plain call: <State Failed risky: ValueError: sensor 1 is offline>, is_failed()=True",
            "in a graph the dependent received a State: Failed, "
            "exception=ValueError('sensor 2 is offline')",
            # 2. allow_failure
            "describe received the exception instance ValueError('sensor 3 is offline')",
            "on a list: the value [10, ValueError('sensor 4 is offline'), 7]",
            "failed but handled: ['risky-0', 'risky-1'], run.ok=True",
            # 3. parallel tasks, collected later: lazy and eager
            "lazy graph: [0, 1, 4, 9, 16, 25] on workers",
            "eager flow: [0, 1, 4, 9, 16, 25]",
            # 4. wait_for: the dependent does not start
            "GraphFailed: 1 of 3 nodes failed without being handled: risky-0.",
            "publish: Skipped (publish-0 was skipped because its upstream risky-0 failed)",
            # 5. wait_for + allow_failure
            "publish: Completed, returned 'published'; failed: ['risky-0'], run.ok=True",
            # 6. retries
            "downloaded on attempt 3; attempts=3, errors: ['ConnectionError', 'ConnectionError']",
            # 7. caching
            "first run: Completed, value 1.644924",
            "second run: Cached, value 1.644924",
            # 8. concurrency
            "query_db (max_concurrency=2) ran at most 2 at once",
            "write_db (tags=['db'], limits={'db': 2}) ran at most 2 at once",
            "workers=2: slow_square ran at most 2 at once",
            "all patterns ran",
        ],
    )


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_prefect_eager() -> None:
    out = run_example("prefect_eager.py")
    assert_lines(
        out,
        [
            # 1. return_state
            "plain call in a flow: <State Failed risky_state-0: ValueError: sensor 1 is offline>, "
            "is_failed()=True",
            "its dependent received a State: Failed, exception=ValueError('sensor 2 is offline')",
            # 2. allow_failure on a future
            "describe received the exception instance ValueError('sensor 3 is offline')",
            "on a list: the value [10, ValueError('sensor 4 is offline'), 7]",
            # 3. submit() in parallel, collected later; as_completed
            "submitted 6 tasks; done right away: 0",
            "results: [0, 1, 4, 9, 16, 25]; 2 ran at once;",
            "gx.as_completed gave naps of [0.9, 0.1, 0.5] s back as [0.1, 0.5, 0.9]",
            # 4. wait_for: the dependent does not start, the flow raises at its end
            "GraphFailed: 1 of 3 nodes failed without being handled: risky-0.",
            "publish: Skipped (publish-0 was skipped because its upstream risky-0 failed)",
            # 5. wait_for + allow_failure
            "publish ran and returned 'published'",
            # 6. retries
            "downloaded on attempt 3; attempts=3, errors: ['ConnectionError', 'ConnectionError']",
            # 7. caching across two flow runs
            "first flow run: Completed, value 1.644924",
            "second flow run: Cached, value 1.644924",
            # 8. concurrency
            "task_runner_max_concurrency=2: slow_square ran at most 2 at once",
            "query_db (max_concurrency=2) ran at most 2 at once",
            "write_db (tags=['db'], limits={'db': 2}) ran at most 2 at once",
            "all eager patterns ran",
        ],
    )


# The Prefect forms of issue #13, as users copy them: each must do what the
# answer it came from promised, and the flow must end without raising.
PREFECT_FORMS = {
    "prefect_allow_failure_call.py": [
        "[task_2-0] task_2 ran",
        "my_flow ended without raising",
        "task_1(allow_failure=True) returned <State Failed task_1: ValueError: task_1 failed>",
    ],
    "prefect_wait_for_allow_failure.py": [
        "[task_2-0] task_2 ran",
        "my_flow ended without raising",
    ],
    "prefect_handle_skipped.py": [
        "Task 2 didn't run because: task_2-0 was skipped because its upstream task_1-0 failed",
        "my_flow ended without raising",
    ],
}


@pytest.mark.timeout(RUN_TIMEOUT + 30)
@pytest.mark.parametrize("name", sorted(PREFECT_FORMS))
def test_prefect_forms_run_as_written(name: str) -> None:
    out = run_example(name)
    assert_lines(out, PREFECT_FORMS[name])
    source = (EXAMPLES / name).read_text(encoding="utf-8")
    assert "from graphexec import flow, task\n" in source  # the one line changed
    assert "import graphexec" not in source  # nothing else of graphexec's is used


def test_ci_runs_the_readme_test_command() -> None:
    """README's test command and .ci/run must not drift apart."""
    command = (
        "python -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    )
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert command in readme.splitlines(), "README.md lost its test command"
    assert command in ci.splitlines(), ".ci/run does not run README's test command"
