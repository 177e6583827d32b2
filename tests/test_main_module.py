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


SHARED_GLOBALS = textwrap.dedent(
    """
    import sys
    import graphexec as gx

    MODEL = None
    THRESHOLD = 5

    def load_model(name):  # the pool's initializer: "warm a model" into a global
        global MODEL
        MODEL = name

    def helper():
        return MODEL, THRESHOLD

    class Box:
        def get(self):
            return MODEL

    @gx.task
    def predict(i):
        return helper(), Box().get()

    @gx.task
    def later(i):
        return THRESHOLD

    if __name__ == "__main__":
        graph = gx.Graph()
        with graph:
            nodes = [predict(i) for i in range(4)]
        with gx.Pool(workers=2, initializer=load_model, initargs=("resnet",)) as pool:
            run = graph.compute(pool=pool)
            print("seen", sorted({repr(run[n]) for n in nodes}))
            THRESHOLD = 10  # sent with the next function the workers have not seen
            second = gx.Graph()
            with second:
                more = [later(i) for i in range(2)]
            print("later", [second.compute(pool=pool)[n] for n in more])
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["zygote", "forkserver", "spawn"])
def test_what_an_initializer_in_the_script_sets_the_tasks_see(tmp_path, method):
    # The script's functions travel by value, each pickle with its own copy of the
    # globals it names: the initializer set MODEL in its copy, and every task read
    # None from its own (docs/guide/schedulers.md has initializer= "warm a model").
    # In a worker they now share its __main__, as in the script.
    proc = _run_script(tmp_path, SHARED_GLOBALS, method)
    assert proc.returncode == 0, proc.stderr
    assert "seen [\"(('resnet', 5), 'resnet')\"]" in proc.stdout, proc.stdout
    assert "later [10, 10]" in proc.stdout, proc.stdout
