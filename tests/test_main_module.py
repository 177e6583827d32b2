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


def _run_script(tmp_path, text: str, method: str) -> subprocess.CompletedProcess:
    """Run ``text`` as a script of its own, its workers started with ``method``."""
    script = tmp_path / "script.py"
    script.write_text(text)
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=50,
        env=dict(os.environ, GRAPHEXEC_START_METHOD=method),
        cwd=tmp_path,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_unguarded_script_runs_once_and_works(tmp_path, method):
    proc = _run_script(tmp_path, SCRIPT, method)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("top-level code ran") == 1, proc.stdout
    assert "values [0, 1, 4, 16]" in proc.stdout
    assert "caught Odd: three" in proc.stdout
    assert "bootstrapping" not in proc.stderr


INITIALIZER_MODULE = textwrap.dedent(
    """
    MODEL = None

    def load_model(name):  # the pool's initializer: "warm a model"
        global MODEL
        MODEL = name
    """
)

WARMED = textwrap.dedent(
    """
    import graphexec as gx
    import models

    MODEL = None

    def load_here(name):  # defined in the script: sets its own copy of MODEL
        global MODEL
        MODEL = name

    @gx.task
    def predict(i):
        return models.MODEL, MODEL

    if __name__ == "__main__":
        for initializer in (models.load_model, load_here):
            graph = gx.Graph()
            with graph:
                nodes = [predict(i) for i in range(4)]
            with gx.Pool(workers=2, initializer=initializer, initargs=("resnet",)) as pool:
                run = graph.compute(pool=pool)
            print(initializer.__name__, sorted({run[n] for n in nodes}))
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["zygote", "forkserver", "spawn"])
def test_an_initializer_warms_the_state_of_a_module_the_tasks_read(tmp_path, method):
    # docs/guide/schedulers.md: state an initializer keeps for the tasks lives in
    # a module the workers import (one copy per worker); in the script's globals
    # it would not be seen: a function defined in the script travels by value
    # with its own copy of the globals it names (what the docs say, pinned here).
    (tmp_path / "models.py").write_text(INITIALIZER_MODULE)
    proc = _run_script(tmp_path, WARMED, method)
    assert proc.returncode == 0, proc.stderr
    assert "load_model [('resnet', None)]" in proc.stdout, proc.stdout
    assert "load_here [(None, None)]" in proc.stdout, proc.stdout
