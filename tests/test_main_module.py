"""Workers never import the user's __main__: unguarded scripts work, top-level code runs once."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import graphexec as gx

    print("top-level code ran", flush=True)

    class Odd(Exception):
        pass

    @gx.task
    def square(x):
        if x == 3:
            raise Odd("three")
        return x * x

    graph = gx.Graph()
    with graph:
        nodes = [square(i) for i in range(5)]
    run = graph.compute(workers=2, keep="all", raise_on_failure=False)
    print("values", [run.state(n).result(raise_on_failure=False) for n in nodes if n.index != 3])
    try:
        run[nodes[3]]
    except Odd as exc:  # the class defined in __main__ is the one that comes back
        print("caught Odd:", exc)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_unguarded_script_runs_once_and_works(tmp_path, method):
    script = tmp_path / "unguarded.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, GRAPHEXEC_START_METHOD=method)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("top-level code ran") == 1, proc.stdout
    assert "values [0, 1, 4, 16]" in proc.stdout
    assert "caught Odd: three" in proc.stdout
    assert "bootstrapping" not in proc.stderr
