"""graphexec in Jupyter: the notebook views, the progress widget, and a real kernel.

* ``_repr_html_`` of Run, Graph, State and Future: what each shows, escaped;
  their plain ``repr`` stays one line.
* The progress bar is tqdm's notebook widget inside a kernel (and shown by
  default there), the text bar elsewhere or without ipywidgets.
* ``examples/notebook.ipynb`` runs in an IPython kernel (nbclient), with its
  functions and class defined in cells running on worker processes.
* Interrupting a kernel during a long compute (what the stop button does)
  ends the cell with KeyboardInterrupt whose ``.run`` holds the finished
  results, and leaves no worker behind.

The kernel is the one this test runs under: a ``python3`` kernel spec for
``sys.executable`` is installed into a temporary directory put first on
``JUPYTER_PATH``, so that no kernel spec of another Python on the machine is
picked up; ``PYTHONPATH`` names this checkout, for the kernel and its workers.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import running

import graphexec as gx
from graphexec._model.state import FAILED, State
from graphexec._surfaces import notebook, progress
from graphexec._surfaces.report import STATE_COLOURS

WORKTREE = Path(__file__).resolve().parents[1]
EXAMPLE = WORKTREE / "examples" / "notebook.ipynb"


@gx.task
def load(x):
    return x


@gx.task
def explode(x):
    raise ValueError(f"bad <b>input</b> {x}\nsecond line of the message")


def _small_run(name: str = "demo <1>") -> tuple[gx.Graph, gx.Run, gx.Node]:
    graph = gx.Graph(name)
    with graph:
        values = [load(i) for i in range(3)]
        failing = explode(values[0])
    return graph, graph.compute(scheduler="sync", raise_on_failure=False), failing


# -- plain reprs: one line ------------------------------------------------------


def test_reprs_stay_one_line_whatever_the_names_and_messages_hold():
    graph, run, failing = _small_run("two\nlines")
    state = run.state(failing)
    for text in (repr(graph), repr(run), repr(state)):
        assert "\n" not in text, text
    assert repr(state) == "<State Failed explode-0: ValueError: bad <b>input</b> 0 …>"
    assert repr(State("Skipped", "n", message="first\r\nsecond")) == "<State Skipped n: first …>"
    assert repr(graph) == "<Graph two lines: 4 nodes>"


# -- Run ------------------------------------------------------------------------


def test_run_html_shows_summary_failures_and_the_report():
    _, run, _ = _small_run()
    page = run._repr_html_()
    assert "<table" in page and "graphexec-summary" in page
    assert STATE_COLOURS[FAILED] in page and STATE_COLOURS["Completed"] in page
    assert "1 unhandled failure" in page
    # escaped: the graph name and the message hold markup
    assert "demo &lt;1&gt;" in page and "<1>" not in page
    assert "ValueError: bad &lt;b&gt;input&lt;/b&gt; 0" in page
    assert "<b>input</b>" not in page and "second line" not in page  # one-line errors
    link = re.search(r'<a download="report.html" href="data:text/html;base64,([^"]+)"', page)
    assert link is not None
    report = base64.b64decode(link.group(1)).decode()
    assert report.startswith("<!DOCTYPE html>") and 'id="gx-summary"' in report
    assert "second line of the message" in report  # the full report has the whole error


def test_run_html_of_a_large_run_says_how_to_write_the_report(monkeypatch):
    monkeypatch.setattr(notebook, "REPORT_LINK_MAX_NODES", 3)
    _, run, _ = _small_run()
    page = run._repr_html_()
    assert "data:text/html" not in page
    assert "run.to_html(&quot;report.html&quot;)" in page


def test_run_html_lists_a_handled_failure_as_handled():
    graph = gx.Graph()
    with graph:
        failing = explode(1)
        load(gx.allow_failure(failing))
    run = graph.compute(scheduler="sync")
    page = run._repr_html_()
    assert "ok — failures handled" in page
    assert "explode-0</b> <i>(handled)</i>" in page


# -- Graph ----------------------------------------------------------------------


def test_graph_html_shows_size_per_task(monkeypatch):
    monkeypatch.setattr(notebook.shutil, "which", lambda name: None)  # no `dot` here
    graph = gx.Graph("g<raph>")
    with graph:
        values = [load(i) for i in range(4)]
        explode(values)
    page = graph._repr_html_()
    assert "g&lt;raph&gt;</b>: 5 nodes, 2 tasks, not computed yet" in page
    rows = re.findall(r"<tr><td[^>]*>(\w+)</td><td[^>]*>(\d+)</td></tr>", page)
    assert rows == [("load", "4"), ("explode", "1")]
    assert "<svg" not in page


def test_graph_html_draws_a_small_graph_inline(need_dot):
    need_dot()
    graph, _, _ = _small_run()
    page = graph._repr_html_()
    picture = page[page.index('class="graphexec-picture"') :]
    assert picture.split(">", 1)[1].startswith("<svg")  # no XML prolog inside HTML
    assert "<?xml" not in page and "<!DOCTYPE" not in page
    assert STATE_COLOURS[FAILED] in picture  # coloured by the latest run


def test_graph_html_does_not_draw_a_graph_over_the_limit(monkeypatch):
    monkeypatch.setattr(notebook.shutil, "which", lambda name: "/usr/bin/dot")
    graph = gx.Graph()
    with graph:
        for i in range(notebook.PICTURE_MAX_NODES + 1):
            load(i)
    assert "<svg" not in graph._repr_html_()
    assert notebook.graph_svg(graph) is None


# -- State and Future -------------------------------------------------------------


def test_state_html_is_one_coloured_escaped_line():
    _, run, failing = _small_run()
    page = run.state(failing)._repr_html_()
    assert STATE_COLOURS[FAILED] in page
    assert (
        "<b>Failed</b> explode-0: <code>ValueError: bad &lt;b&gt;input&lt;/b&gt; 0</code>" in page
    )
    skipped = State.skipped("x<y>", "up", "up failed <badly>\nmore")
    page = skipped._repr_html_()
    assert "x&lt;y&gt;" in page and "up failed &lt;badly&gt;" in page and "more" not in page


@gx.task
def slow(seconds):
    time.sleep(seconds)
    return seconds


@pytest.mark.timeout(60)
def test_future_html_shows_its_live_state():
    with gx.Pool(workers=1):  # its own: leaving the block closes the pool
        future = slow.submit(0.5)
        deadline = time.monotonic() + 20
        while "Running" not in future._repr_html_() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "<b>Running</b> slow-0" in future._repr_html_()
        future.result(timeout=20)
        assert "<b>Completed</b> slow-0" in future._repr_html_()
        assert future._repr_html_().startswith("<span")


# -- the progress bar --------------------------------------------------------------


def test_outside_a_kernel_the_bar_is_the_text_bar():
    assert not progress.in_notebook()
    assert progress.bar_class() is progress._bar_class()


def test_in_a_kernel_the_bar_is_the_widget_and_shown_by_default(monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.delenv("CI", raising=False)
    assert progress.wanted(None) is True  # though stderr is no terminal here
    assert progress.wanted(False) is False
    from tqdm.notebook import tqdm as tqdm_notebook

    assert issubclass(progress.bar_class(), tqdm_notebook)
    monkeypatch.setenv("CI", "true")
    assert progress.wanted(None) is False


def test_in_a_kernel_without_ipywidgets_the_bar_is_text(monkeypatch):
    import tqdm.notebook

    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(tqdm.notebook, "IProgress", None)
    progress._notebook_bar_class.cache_clear()
    try:
        assert progress.bar_class() is progress._bar_class()
    finally:
        progress._notebook_bar_class.cache_clear()


def test_a_kernel_is_recognised_by_its_shell(monkeypatch):
    class ZMQInteractiveShell:
        pass

    class TerminalInteractiveShell:
        pass

    fake_ipython = type(sys)("IPython")
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    monkeypatch.setitem(sys.modules, "ipykernel", type(sys)("ipykernel"))
    fake_ipython.get_ipython = ZMQInteractiveShell  # type: ignore[attr-defined]
    assert progress.in_notebook()
    fake_ipython.get_ipython = TerminalInteractiveShell  # type: ignore[attr-defined]
    assert not progress.in_notebook()  # IPython in a terminal: the text bar
    monkeypatch.delitem(sys.modules, "ipykernel")
    fake_ipython.get_ipython = ZMQInteractiveShell  # type: ignore[attr-defined]
    assert not progress.in_notebook()


# -- a real kernel -----------------------------------------------------------------


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernel spec for this interpreter, first on JUPYTER_PATH; the
    kernel (started from this environment) imports graphexec from this checkout."""
    pytest.importorskip("ipykernel")
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter"
    install(prefix=str(prefix), kernel_name="python3")
    spec = prefix / "share" / "jupyter" / "kernels" / "python3" / "kernel.json"
    assert sys.executable in spec.read_text()
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", str(WORKTREE))
    monkeypatch.delenv("CI", raising=False)  # so that progress=None shows the widget
    work = tmp_path / "work"
    work.mkdir()
    return work


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _html(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)


@pytest.mark.timeout(180)
def test_the_example_notebook_runs_in_a_kernel(kernel_env):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLE, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(kernel_env)}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {c.source.splitlines()[0]: c for c in code}

    graph_cell = by_source['graph = gx.Graph("pi")']
    assert "graphexec-graph" in _html(graph_cell)
    assert re.search(r">throw</td><td[^>]*>8<", _html(graph_cell))

    compute_cell = by_source["run = graph.compute(workers=2)"]
    printed = _text(compute_cell)
    assert "from 7 batches, 1 lost" in printed  # batch 5 failed, combine handled it
    pi = float(re.search(r"pi = ([0-9.]+)", printed).group(1))
    assert abs(pi - 3.1416) < 0.02
    # the progress widget, shown by default in a kernel
    widgets = [
        o
        for o in compute_cell.outputs
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert widgets, compute_cell.outputs

    summary = _text(by_source["print(run.summary())"])
    assert "throw-5 (handled): ValueError: batch 5: detector saturated (<overflow>)" in summary

    run_view = _html(by_source["run"])
    assert "graphexec-summary" in run_view and "ok — failures handled" in run_view
    assert "detector saturated (&lt;overflow&gt;)" in run_view
    assert 'download="report.html"' in run_view

    assert "Failed" in _html(by_source["run.state(batches[5])"])
    assert (kernel_env / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "wrote report.html" in _text(by_source['path = run.to_html("report.html")'])


LONG_CELL = """
import os, sys, time
import graphexec as gx

@gx.task
def quick(i):
    open(f"quick-{i}", "w").write(str(os.getpid()))
    return i * 10

@gx.task
def snooze(values, j):
    open(f"snooze-{j}", "w").write(str(os.getpid()))
    time.sleep(120)
    return j

graph = gx.Graph("long")
with graph:
    fast = [quick(i) for i in range(4)]
    slow = [snooze(fast, j) for j in range(3)]  # start once every quick one is done
try:
    graph.compute(workers=2, keep="all", progress=False)
except KeyboardInterrupt as exc:
    caught = exc
    raise
"""

CHECK_CELL = """
run = caught.run
assert sys.last_value is caught
print("values", [run[n] for n in fast])
print("states", sorted({run.state(n).name for n in slow}))
"""


def _wait_for_files(folder: Path, pattern: str, count: int, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder.glob(pattern))
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{pattern}: {len(list(folder.glob(pattern)))} of {count} appeared")


def _workers_left(kernel_pid: int) -> list[str]:
    """Descendants of the kernel other than multiprocessing's forkserver and
    resource tracker and graphexec's zygote, which live as long as the kernel
    (as in conftest.py)."""
    left = []
    for proc in psutil.Process(kernel_pid).children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
            if proc.ppid() == kernel_pid and (
                "forkserver" in cmdline
                or "resource_tracker" in cmdline
                or proc.name() == "gx-zygote"
            ):
                continue
            if proc.name() == "gx-spare":  # the zygote's workers forked ahead
                continue
            left.append(f"{proc.pid}: {cmdline[:120]}")
        except psutil.Error:
            continue
    return left


def _execute(kc, code: str, timeout: float) -> tuple[dict, str]:
    """Run ``code``; its reply's content and what it printed."""
    msg_id = kc.execute(code)
    printed = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.1))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            printed.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    reply = kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.1))
    return reply["content"], "".join(printed)


@pytest.mark.timeout(180)
def test_interrupting_the_kernel_cancels_the_run_and_leaves_no_worker(kernel_env):
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(kernel_env))
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        kernel_pid = km.provisioner.process.pid  # type: ignore[union-attr]
        # stop_on_error=False: else the kernel aborts requests that arrive
        # shortly after the interrupted cell, as it does for queued cells.
        msg_id = kc.execute(LONG_CELL, stop_on_error=False)
        _wait_for_files(kernel_env, "quick-*", 4, 60)
        _wait_for_files(kernel_env, "snooze-*", 2, 60)  # both workers busy for 120 s
        pids = {int(p.read_text()) for p in kernel_env.glob("*-*")}
        assert pids and kernel_pid not in pids  # cell-defined functions ran in workers

        started = time.monotonic()
        km.interrupt_kernel()  # the stop button: SIGINT
        while True:
            reply = kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert time.monotonic() - started < 30  # not the 120 s the tasks sleep
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"

        content, printed = _execute(kc, CHECK_CELL, 60)
        assert content["status"] == "ok", content
        assert "values [0, 10, 20, 30]" in printed
        assert "states ['Cancelled']" in printed

        deadline = time.monotonic() + 10
        while (left := _workers_left(kernel_pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == []
        alive = [p for p in pids if running(p)]
        assert alive == []
    finally:
        # The kernel's forkserver and resource tracker end with it: wait for them,
        # so that the suite's leak check does not catch them on their way out.
        kernel = psutil.Process(km.provisioner.process.pid)  # type: ignore[union-attr]
        tree = [kernel, *kernel.children(recursive=True)]
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        psutil.wait_procs(tree, timeout=10)


def test_kernel_spec_is_this_interpreter(kernel_env):
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable  # not another Python's kernel on the machine
    assert os.environ["PYTHONPATH"] == str(WORKTREE)
