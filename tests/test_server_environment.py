"""What a worker's modules see, whichever server it forks from (#14 review).

An independent review of a change that had graphexec's forkserver import the
program's task modules once for all workers (and numpy programs default to
the zygote) found each case below broken by it; the change was withdrawn, and
these stay as regression tests: a task module is imported by each worker
after the program's ``sys.argv`` and ``sys.path`` are in place, a module
failing in a fresh interpreter costs nothing and prints nothing, and a numpy
program's workers do not share its module-level random generator by default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import graphexec as gx

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux servers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(gx.__file__)))


def _program(tmp_path, files: dict[str, str], main: str, argv=(), cwd=None) -> dict:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    script = tmp_path / main
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHEXEC_")}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd or tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    return {"report": json.loads(line[len("REPORT ") :]), "stderr": done.stderr}


@pytest.mark.timeout(90)
def test_task_module_state_sees_the_programs_argv_in_workers(tmp_path):
    # memory_limit= picks the forkserver by default: its preload imports
    # flagtasks with sys.argv == ["-c"], and every worker inherits SCALE == 1.
    out = _program(
        tmp_path,
        {
            "flagtasks.py": """
                import sys
                SCALE = 10 if "--big" in sys.argv else 1
                def scaled(i):
                    return i * SCALE
            """,
            "prog.py": """
                import json, graphexec as gx, flagtasks
                g = gx.Graph()
                nodes = [g.add(flagtasks.scaled, i) for i in (1, 2, 3)]
                run = g.compute(workers=2, memory_limit="2GB")
                print("REPORT " + json.dumps([run[n] for n in nodes]))
            """,
        },
        "prog.py",
        argv=["--big"],
    )
    assert out["report"] == [10, 20, 30]


@pytest.mark.timeout(90)
def test_task_module_is_the_one_on_the_programs_sys_path(tmp_path):
    # python app/run.py from a directory with another helpers.py: the
    # forkserver's sys.path starts with '' (its cwd), not the script's
    # directory (CPython's forkserver.main ignores sys_path, 3.10-3.14).
    out = _program(
        tmp_path,
        {
            "app/helpers.py": "def double(i):\n    return 2 * i\n",
            "helpers.py": "def double(i):\n    return 'the wrong helpers'\n",
            "app/run.py": """
                import json, graphexec as gx, helpers
                g = gx.Graph()
                nodes = [g.add(helpers.double, i) for i in range(3)]
                run = g.compute(workers=2, start_method="forkserver")
                print("REPORT " + json.dumps([run[n] for n in nodes]))
            """,
        },
        "app/run.py",
    )
    assert out["report"] == [0, 2, 4]


@pytest.mark.timeout(90)
def test_two_threads_computing_survive_a_task_module_failing_in_the_server(tmp_path):
    # Both threads' first workers meet the dying server (EOFError); only the
    # first to forget the program's modules retries, the other raises.
    out = _program(
        tmp_path,
        {
            "argv_tasks.py": """
                import sys, time
                if sys.argv[:1] == ["-c"]:
                    time.sleep(0.5)
                    raise RuntimeError("wants the program's sys.argv")
                def double(i):
                    return 2 * i
            """,
            "prog.py": """
                import json, threading, graphexec as gx, argv_tasks
                out = {}
                def go(k):
                    try:
                        g = gx.Graph()
                        nodes = [g.add(argv_tasks.double, i) for i in range(4)]
                        run = g.compute(workers=2, start_method="forkserver",
                                        raise_on_failure=False)
                        out[k] = run.counts()
                    except BaseException as e:
                        out[k] = repr(e)
                ts = [threading.Thread(target=go, args=(k,)) for k in range(2)]
                for t in ts: t.start()
                for t in ts: t.join()
                print("REPORT " + json.dumps(out))
            """,
        },
        "prog.py",
    )
    assert out["report"] == {"0": {"Completed": 4}, "1": {"Completed": 4}}


@pytest.mark.timeout(90)
def test_workers_of_a_numpy_program_draw_their_own_numbers(tmp_path):
    # numpy programs now get the zygote: a module-level numpy Generator (the
    # recommended idiom) is the same in every worker (CPython reseeds only
    # `random`'s own instance at a fork). Before, each forkserver worker
    # imported the module and seeded its own.
    pytest.importorskip("numpy")
    out = _program(
        tmp_path,
        {
            "mc.py": """
                import os, time
                import numpy as np
                RNG = np.random.default_rng()
                def draw(i):
                    time.sleep(0.3)
                    return os.getpid(), float(RNG.random())
            """,
            "prog.py": """
                import json, graphexec as gx, mc
                g = gx.Graph()
                nodes = [g.add(mc.draw, i) for i in range(2)]
                run = g.compute(workers=2)
                print("REPORT " + json.dumps([run[n] for n in nodes]))
            """,
        },
        "prog.py",
    )
    (pid_a, a), (pid_b, b) = out["report"]
    assert pid_a != pid_b
    assert a != b


@pytest.mark.timeout(90)
def test_a_task_module_failing_in_the_server_prints_nothing(tmp_path):
    # The compute succeeds, but the server's traceback lands on the program's stderr.
    out = _program(
        tmp_path,
        {
            "cli_tasks.py": """
                import argparse
                parser = argparse.ArgumentParser()
                parser.add_argument("--data", required=True)
                ARGS = parser.parse_args()
                def f(i):
                    return i
            """,
            "prog.py": """
                import json, graphexec as gx, cli_tasks
                g = gx.Graph()
                nodes = [g.add(cli_tasks.f, i) for i in range(4)]
                run = g.compute(workers=2, start_method="forkserver")
                print("REPORT " + json.dumps(run.counts()))
            """,
        },
        "prog.py",
        argv=["--data", "x"],
    )
    assert out["report"] == {"Completed": 4}
    assert out["stderr"] == ""
