"""Start-up in a fresh interpreter: import the tool, get one result on 2 workers, close.

What a script, a notebook kernel or a command-line call pays on every run.
Each round runs ``python -m benchmarks.fresh_start TOOL`` (see that module for
what each tool does and how its phases are cut) in a new interpreter; the
benchmark's time is the whole process, from its start to its exit, and the
medians of the phases the child measured itself (``import``, ``first``
result, ``close``) are recorded in ``extra_info`` for the report.

The children run with Python's bytecode cache on (``PYTHONDONTWRITEBYTECODE``
removed from their environment), as an installed package has it: one
untimed round per tool first writes the cache and warms the disk cache. A
tool that is not installed is skipped and shows as "not installed" in the
report's table.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from .conftest import TIMEOUT

pytestmark = [pytest.mark.benchmark(group="startup-fresh"), pytest.mark.timeout(TIMEOUT)]

ROOT = Path(__file__).resolve().parents[1]
# Rounds per tool: the whole process is 0.1 s for most, seconds for dask and Ray.
ROUNDS = {"ray": 3, "dask": 5}
DEFAULT_ROUNDS = 9
CHILD_TIMEOUT = 180.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # This checkout first, as pytest sees it (the children import graphexec from here).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_fresh(tool: str) -> dict[str, Any]:
    """One round: a new interpreter runs ``tool``; its phases, as it printed them.

    Its output goes to files, not pipes: waiting for a pipe's end would also wait
    for helper processes that inherited it (a forkserver, Ray's daemons) to exit
    after the program did, which a user at a terminal does not wait for.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(
            [sys.executable, "-m", "benchmarks.fresh_start", tool],
            cwd=ROOT,
            env=_env(),
            stdout=out,
            stderr=err,
            timeout=CHILD_TIMEOUT,
            check=False,
        ).returncode
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise AssertionError(f"{tool} exited with {code}:\n{err.read()[-3000:]}")
        return json.loads(out.read().strip().splitlines()[-1])


@pytest.mark.parametrize(
    "tool",
    [
        "graphexec",
        "graphexec-pool",
        "graphexec-forkserver",
        "graphexec-numpy",
        "ppe",
        "loky",
        "dask",
        "ray",
    ],
)
def test_startup_fresh(benchmark: Any, tool: str) -> None:
    first = run_fresh(tool)  # untimed: writes the bytecode cache, warms the disk cache
    if "missing" in first:
        pytest.skip(f"{tool}: not installed ({first['missing']})")
    phases: list[dict[str, float]] = []

    def once() -> None:
        phases.append(run_fresh(tool))

    rounds = ROUNDS.get(tool, DEFAULT_ROUNDS)
    benchmark.pedantic(once, rounds=rounds, iterations=1)
    assert len(phases) >= 1
    benchmark.extra_info.update(
        workload="startup-fresh",
        tool=tool,
        **{
            f"{phase}_s": statistics.median(p[phase] for p in phases)
            for phase in ("import", "first", "close")
        },
    )
