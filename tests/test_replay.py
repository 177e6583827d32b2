"""The morning after: a failed node replayed in this process on its exact inputs (#13).

``run.inputs(node)`` and ``run.replay(node)`` on every scheduler; inputs that
never pass through the parent (a chained value, a buffer in /dev/shm); the
cap on kept inputs; ``run.save`` / ``Run.load`` across processes; the record
a parent killed with SIGKILL leaves in its ``run_dir``; the CLI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ALL_SCHEDULERS

import graphexec as gx
from graphexec._executors.runtime import handover

WORKTREE = Path(__file__).resolve().parents[1]
BIG = 200_000  # float64: 1.6 MB, well over the 64 KiB that go through shared memory


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(WORKTREE), **extra)


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m graphexec ARGS`` with this checkout, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "graphexec", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )


def _shm_ours() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"gx-{os.getpid()}-")]


@gx.task
def make(n):
    return np.arange(n, dtype=np.float64)


@gx.task
def check(array, limit=10.0):
    if array.sum() > limit:
        raise ValueError(f"sum {array.sum()} over {limit}")
    return array


@gx.task
def after(x):
    return x


@gx.task
def where_was_it(array, parent):
    # Raises with where its input was: in /dev/shm (a segment of the parent's
    # run is mapped now) or not (a chained value, handed over in the worker).
    shm = [n for n in os.listdir("/dev/shm") if n.startswith(f"gx-{parent}-")]
    raise ValueError(f"segments={len(shm)} sum={float(array.sum())}")


@gx.task
def consume(x):
    return x


@gx.task
def crash(array):
    os._exit(9)


@gx.task
def crash_once(flag):
    # Crashes the first time (in its worker), not when replayed.
    if not os.path.exists(flag):
        Path(flag).write_text("crashed")
        os._exit(9)
    return "fine now"


@gx.task(timeout=0.3)
def slow(seconds):
    time.sleep(seconds)
    return seconds


@gx.task
def unpicklable_result(x):
    return threading.Lock()


@gx.task
def fails(x):
    raise KeyError(x)


@gx.task
def takes_error(err):
    raise RuntimeError(f"got {err!r}")


@gx.task(return_state=True)
def stated(x):
    return x


@gx.task
def takes_state(state):
    raise RuntimeError(f"got a {type(state).__name__}")


# -- inputs and replay on every scheduler -------------------------------------------


@pytest.mark.every_backend
def test_replay_raises_the_same_error_on_the_same_inputs(compute):
    with gx.Graph() as g:
        a = make(10)
        b = check(a, limit=3.0)
        c = after(b)
    with pytest.raises(gx.GraphFailed) as info:
        compute(g)
    run = info.value.run
    args, kwargs = run.inputs(b)
    np.testing.assert_array_equal(args[0], np.arange(10.0))
    assert kwargs == {"limit": 3.0}
    # fresh objects each time: a replay that changes its input leaves the next one alone
    args[0][:] = 0
    assert run.inputs("check-0")[0][0].sum() == 45.0
    with pytest.raises(ValueError, match=re.escape("sum 45.0 over 3.0")):
        run.replay(b)
    with pytest.raises(ValueError, match=r"Skipped.*run\.replay\('check-0'\)"):
        run.replay(c)
    with pytest.raises(ValueError, match="Completed, not Failed"):
        run.inputs(a)
    assert str(info.value).splitlines()[-1] == (
        "Reproduce it: exc.run.replay('check-0')  (exc: this GraphFailed; pdb=True to debug it)"
    )


@gx.task
def _sleeps(seconds):
    time.sleep(seconds)
    return seconds


def test_a_cancelled_node_names_the_runs_failure_even_once_it_was_handled():
    # The flow looked at fails-0's failure (a caught .result()), then its body raised
    # while _sleeps-0 still ran: _sleeps-0 is Cancelled, and nothing is unhandled.
    @gx.flow(workers=2)
    def body():
        failing = fails.submit(1)
        _sleeps.submit(5)
        try:
            failing.result()
        except KeyError:
            pass
        raise RuntimeError("the body gives up")

    with pytest.raises(RuntimeError) as info:
        body()
    run = info.value.run
    assert [n.name for n in run.failed] == ["fails-0"]
    assert run.state("_sleeps-0").name == "Cancelled"
    with pytest.raises(ValueError, match=r"Cancelled.*run\.replay\('fails-0'\)") as refused:
        run.replay("_sleeps-0")
    assert "No node of this run failed" not in str(refused.value)


@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_replay_returns_when_it_does_not_fail_again(compute, tmp_path):
    with gx.Graph() as g:
        b = check(make(10), limit=3.0)
    run = compute(g, raise_on_failure=False)
    # the same node's function, given other inputs by hand, would pass; replay uses the kept ones
    assert run.state(b).is_failed()
    with pytest.raises(ValueError):
        run.replay("check-0")


@pytest.mark.every_backend
def test_policies_pass_exceptions_and_states_which_are_kept(compute):
    with gx.Graph() as g:
        bad = fails(1)
        t = takes_error(gx.allow_failure(bad))
        s = takes_state(stated(5))
    run = compute(g, raise_on_failure=False)
    (err,), _ = run.inputs(t)
    assert isinstance(err, KeyError) and err.args == (1,)
    (state,), _ = run.inputs(s)
    assert isinstance(state, gx.State) and state.result() == 5
    with pytest.raises(RuntimeError, match="got a State"):
        run.replay(s)


def test_pdb_starts_post_mortem_at_the_failure(compute, monkeypatch):
    seen = []
    monkeypatch.setattr("pdb.post_mortem", lambda tb: seen.append(tb))
    with gx.Graph() as g:
        b = check(make(10), limit=3.0)
    run = compute(g, raise_on_failure=False)
    with pytest.raises(ValueError):
        run.replay(b, pdb=True)
    (tb,) = seen
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_name == "check"
    assert tb.tb_frame.f_locals["limit"] == 3.0


@pytest.mark.parametrize("scheduler", ["processes", "sync"])
def test_a_timed_out_node_replays_without_a_timeout_unless_asked(compute):
    with gx.Graph() as g:
        s = slow(0.8)
    run = compute(g, raise_on_failure=False)
    assert isinstance(run.state(s).exception, gx.TaskTimeout)
    assert run.replay(s) == 0.8  # no timeout: it runs to its end
    with pytest.raises(gx.TaskTimeout, match=re.escape("replay of slow-0 ran longer than 0.2 s")):
        run.replay(s, timeout=0.2)


def test_a_result_that_would_not_pickle_replays(pool):
    with gx.Graph() as g:
        u = unpicklable_result(1)
    run = g.compute(pool=pool, raise_on_failure=False)
    assert isinstance(run.state(u).exception, gx.SerializationError)
    assert run.inputs(u) == ((1,), {})
    assert type(run.replay(u)) is type(threading.Lock())


# -- inputs that never pass through the parent -----------------------------------------


def test_a_chained_input_comes_back_with_the_failure(pool):
    with gx.Graph() as g:
        w = where_was_it(make(BIG), os.getpid())
    run = g.compute(pool=pool, raise_on_failure=False)
    # the value went to where_was_it inside the worker: no segment of it was mapped
    assert str(run.state(w).exception).startswith("segments=0 ")
    (array, _parent), _ = run.inputs(w)
    np.testing.assert_array_equal(array, np.arange(BIG, dtype=np.float64))
    with pytest.raises(ValueError, match=f"segments=0 sum={float(array.sum())}"):
        run.replay(w)


def test_a_shared_memory_input_is_copied_out_before_release(pool):
    with gx.Graph() as g:
        a = make(BIG)
        w = where_was_it(a, os.getpid())
        other = consume(a)  # a second consumer: no chain, the value goes through /dev/shm
    run = g.compute(w, other, pool=pool, raise_on_failure=False)
    assert not str(run.state(w).exception).startswith("segments=0 ")
    assert _shm_ours() == []  # the run released and unlinked its segments...
    (array, _), _ = run.inputs(w)  # ...and the input was copied out before that
    np.testing.assert_array_equal(array, np.arange(BIG, dtype=np.float64))


@gx.task
def listing():
    return [3, 1, 2]


@gx.task
def appends_then_fails(xs):
    xs.append(0)  # in place, before failing
    raise ValueError(f"got {xs}")


@gx.task
def negates_then_fails(array):
    array *= -1  # in place, before failing
    raise ValueError(f"sum {float(array.sum())}")


@pytest.mark.parametrize("producer", ["listing", "small array"])
def test_a_chained_input_is_kept_as_the_call_received_it(pool, producer):
    # The value is handed over inside the worker (a chain); the call changes it in
    # place, then fails: its kept inputs are the value before the call.
    with gx.Graph() as g:
        if producer == "listing":
            f = appends_then_fails(listing())
        else:
            f = negates_then_fails(make(100))
    run = g.compute(pool=pool, raise_on_failure=False)
    first = str(run.state(f).exception)
    (value,), _ = run.inputs(f)
    if producer == "listing":
        assert first == "got [3, 1, 2, 0]" and value == [3, 1, 2]
    else:
        assert first == f"sum {-float(np.arange(100.0).sum())}"
        np.testing.assert_array_equal(value, np.arange(100.0))
    with pytest.raises(ValueError, match=re.escape(first)):
        run.replay(f)  # the same error as the run's, not that of a second change


def test_a_chain_keeps_the_pickle_of_a_small_value_only():
    # The pickle of what a chained call receives is kept beside the value for as long
    # as the call runs: for a large value that doubled the worker's memory.
    small, small_pickle = handover({"a": [1, 2, 3]}, keep=True)
    assert small == {"a": [1, 2, 3]} and small_pickle is not None
    large, large_pickle = handover({"a": np.zeros(BIG)}, keep=True)
    assert large["a"].shape == (BIG,) and large_pickle is None
    _, array_pickle = handover(np.arange(10.0), keep=True)
    assert array_pickle is not None
    assert handover(np.zeros(BIG), keep=True)[1] is None
    assert handover({"a": [1]})[1] is None  # without keep (dask): nothing kept


def test_a_shared_memory_input_replays_writable(pool, tmp_path):
    # A large input comes through /dev/shm (two consumers: no chain); the call got
    # a writable array, so its replay must too (not "read-only" instead of its error).
    with gx.Graph() as g:
        a = make(BIG)
        f = negates_then_fails(a)
        other = consume(a)
    run = g.compute(f, other, pool=pool, raise_on_failure=False)
    first = str(run.state(f).exception)
    assert first == f"sum {-float(np.arange(BIG, dtype=np.float64).sum())}"
    (array,), _ = run.inputs(f)
    assert array.flags.writeable
    with pytest.raises(ValueError, match=re.escape(first)):
        run.replay(f)
    loaded = gx.Run.load(run.save(tmp_path / "run.gxrun"))
    with pytest.raises(ValueError, match=re.escape(first)):
        loaded.replay(f.name)


def test_a_crashed_worker_holding_a_chained_input_says_it_is_lost(pool):
    with gx.Graph() as g:
        c = crash(make(BIG))
    run = g.compute(pool=pool, raise_on_failure=False)
    assert isinstance(run.state(c).exception, gx.WorkerCrashed)
    with pytest.raises(
        LookupError, match=re.escape("inside a worker (a chain), and that worker stopped")
    ):
        run.inputs(c)
    assert "crash-0: the value of make-0 went from one call" in run.summary()


def test_a_crashed_node_replays_in_a_subprocess_first(pool, tmp_path, capfd):
    flag = tmp_path / "flag"
    with gx.Graph() as g:
        c = crash_once(str(flag))
    run = g.compute(pool=pool, raise_on_failure=False)
    assert isinstance(run.state(c).exception, gx.WorkerCrashed)
    assert run.replay(c) == "fine now"
    err = capfd.readouterr().err
    assert "replaying it in a fresh subprocess first" in err
    assert "did not crash in the subprocess (it returned); replaying it in this process" in err


@gx.task
def exits_with(code):
    os._exit(code)


@pytest.mark.parametrize("code", [9, 0, 3])
def test_a_node_that_crashes_again_is_not_run_in_this_process(pool, code):
    # Whatever code the call ends the process with: 0 and 3 were the replay
    # subprocess's own codes for "returned" and "raised", and such a call was then
    # run in this process, which it ended.
    with gx.Graph() as g:
        c = exits_with(code)  # no upstream: its inputs are kept
    run = g.compute(pool=pool, raise_on_failure=False)
    with pytest.raises(gx.WorkerCrashed, match=rf"crashed again .* \(exit code {code}\)"):
        run.replay(c)


# -- the cap -------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["processes", "sync"])
def test_inputs_past_the_cap_are_dropped_and_named(compute):
    with gx.Graph() as g:
        first = check(make(100), limit=1.0)  # ~800 bytes each
        second = check(make(101), limit=1.0)
    run = compute(g, raise_on_failure=False, keep_inputs=1200)
    # whichever failed first is kept; the other would go past the cap
    kept, dropped = [], []
    for node in (first, second):
        try:
            kept.append(run.inputs(node)[0][0].shape)
        except LookupError as exc:
            assert "past the cap of 1.2 kB" in str(exc)
            dropped.append(node.name)
    assert len(kept) == 1 and kept[0] in ((100,), (101,))
    assert len(dropped) == 1
    summary = run.summary()
    assert "Inputs not kept (run.replay cannot rerun these):" in summary
    assert f"{dropped[0]}: its inputs" in summary


@gx.task
def check_later(array, delay):
    time.sleep(delay)
    raise ValueError(f"sum {array.sum()}")


def test_past_the_cap_the_hint_names_a_replayable_failure_of_the_same_task(pool):
    with gx.Graph() as g:
        first = check_later(make(100), 0.5)  # first in the graph, last to fail: past the cap
        second = check_later(make(101), 0.0)
    with pytest.raises(gx.GraphFailed) as info:
        g.compute(pool=pool, keep_inputs=1200)
    run = info.value.run
    assert run.unhandled[0] == first
    with pytest.raises(LookupError, match="past the cap"):
        run.inputs(first)
    assert (
        str(info.value)
        .splitlines()[-1]
        .startswith("Its inputs were not kept, so it cannot be replayed: ")
    )
    assert str(info.value).endswith(
        f"Another failed call of check_later can be: exc.run.replay({second.name!r})  "
        "(exc: this GraphFailed; pdb=True to debug it)"
    )


def test_the_cap_comes_from_the_environment(pool, monkeypatch):
    monkeypatch.setenv("GRAPHEXEC_KEEP_INPUTS", "0")
    with gx.Graph() as g:
        b = check(make(10), limit=1.0)
    with pytest.raises(gx.GraphFailed) as info:
        g.compute(pool=pool)
    with pytest.raises(LookupError, match="keeping inputs is turned off"):
        info.value.run.inputs(b)
    assert str(info.value).endswith(
        "Its inputs were not kept, so it cannot be replayed: keeping inputs is turned off "
        "(keep_inputs=0 or GRAPHEXEC_KEEP_INPUTS=0)."
    )


def test_keep_inputs_is_validated():
    with gx.Graph() as g:
        make(1)
    with pytest.raises(ValueError, match="keep_inputs='lots' must be bytes"):
        g.compute(keep_inputs="lots")


# -- saved runs ------------------------------------------------------------------------

SCRIPT = """
import sys
import numpy as np
import graphexec as gx

@gx.task
def make(n):
    return np.arange(n, dtype=np.float64)

@gx.task
def check(array, limit):
    if array.sum() > limit:
        raise ValueError(f"sum {array.sum()} over {limit}")
    return array

@gx.task
def fine(x):
    return x

if __name__ == "__main__":
    with gx.Graph("night") as g:
        a = make(200_000)
        bad = check(a, 1.0)
        ok = fine(3)
        other = fine(a)
    run = g.compute(workers=2, raise_on_failure=False)
    print(run.save(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run saved by another process whose functions live in its __main__."""
    where = tmp_path_factory.mktemp("saved")
    script = where / "night.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(where / "night.gxrun")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        cwd=where,
    )
    assert done.returncode == 0, done.stderr
    return where / "night.gxrun"


def test_a_saved_run_replays_in_another_process(saved):
    code = textwrap.dedent(f"""
        import graphexec as gx
        run = gx.Run.load({str(saved)!r})
        print(repr(run))
        (array, limit), kwargs = run.inputs("check-0")
        print(array.shape, limit, kwargs)
        try:
            run.replay("check-0")
        except ValueError as exc:
            print("again:", exc)
        """)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "<Run (saved) night: 3 completed, 1 failed>",
        "(200000,) 1.0 {}",
        f"again: sum {float(np.arange(200_000).sum())} over 1.0",
    ]


def test_a_saved_run_reads_like_a_json_one(saved):
    run = gx.Run.load(saved)
    assert [n.name for n in run.failed] == ["check-0"]
    assert run.unhandled == run.failed
    assert "check-0: ValueError: sum" in run.summary()
    with pytest.raises(gx.GraphexecError, match="not in the saved run"):
        run[run.completed[0]]
    # saved again, and loaded again: the same
    again = gx.Run.load(run.save(saved.with_name("again.gxrun")))
    assert again.inputs("check-0")[0][1] == 1.0


def test_the_cli_replays_a_saved_run(saved):
    done = _cli("replay", str(saved), "check-0")
    assert done.returncode == 1
    assert "ValueError: sum" in done.stderr
    assert "check-0 failed again" in done.stderr


def test_the_cli_replays_under_pdb(saved):
    done = _cli("replay", str(saved), "check-0", "--pdb", stdin="p limit * 7\nq\n")
    assert "(Pdb) 7.0" in done.stdout
    assert done.returncode == 1


def test_the_cli_names_what_to_replay_instead(saved):
    done = _cli("replay", str(saved), "fine-0")
    assert done.returncode == 3  # could not replay: not "failed again" (1)
    assert "fine-0 is Completed, not Failed" in done.stderr
    done = _cli("replay", str(saved), "nope")
    assert done.returncode == 3
    assert "no node named 'nope'" in done.stderr and "failed nodes: check-0" in done.stderr


def test_the_cli_reports_a_saved_run(saved, tmp_path):
    out = tmp_path / "r.html"
    done = _cli("report", str(saved), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "4 nodes, 1 unhandled failure(s)" in done.stdout
    assert "check-0" in out.read_text()


@pytest.mark.parametrize("form", ["task", "graph.add"])
def test_replay_warns_when_the_source_changed(tmp_path, form):
    # A decorated task's function is not its module's attribute (the Task is), so a
    # record carries it by value: the replay runs the code that failed. A plain
    # function given to graph.add is its module's: imported anew, the changed code.
    module = tmp_path / "nightly_tasks.py"
    decorator = "@gx.task\n" if form == "task" else ""
    module.write_text(f"import graphexec as gx\n\n{decorator}def div(x):\n    return 1 / x\n")
    build = "div(0)" if form == "task" else "g.add(div, 0)"
    save = textwrap.dedent(f"""
        import sys, graphexec as gx
        from nightly_tasks import div
        with gx.Graph() as g:
            {build}
        g.compute(workers=1, raise_on_failure=False).save(sys.argv[1])
        """)
    env = _env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{WORKTREE}"
    saved = tmp_path / "r.gxrun"
    subprocess.run([sys.executable, "-c", save, str(saved)], env=env, check=True, timeout=60)
    module.write_text(f"import graphexec as gx\n\n{decorator}def div(x):\n    return x  # fixed\n")
    done = subprocess.run(
        [sys.executable, "-m", "graphexec", "replay", str(saved), "div-0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "the source of div" in done.stderr and "changed since div-0 failed" in done.stderr
    if form == "task":
        assert "the replay runs the code that failed" in done.stderr
        assert "ZeroDivisionError" in done.stderr and done.returncode == 1
    else:
        assert "the replay runs the changed code" in done.stderr
        assert done.returncode == 0, done.stderr  # the fix, tried


def test_replay_of_a_scripts_changed_function_says_it_runs_the_code_that_failed(tmp_path):
    # A script's function is carried by value: the replay runs what failed, though the
    # traceback shows the file's new lines. The warning once said the opposite.
    script = tmp_path / "night.py"
    body = """
        import sys, graphexec as gx
        @gx.task
        def bad(x):
            raise ValueError(f"bad {x}")
        if __name__ == "__main__":
            with gx.Graph() as g:
                bad(1)
            g.compute(workers=1, raise_on_failure=False).save(sys.argv[1])
        """
    script.write_text(textwrap.dedent(body))
    saved = tmp_path / "r.gxrun"
    subprocess.run([sys.executable, str(script), str(saved)], env=_env(), check=True, timeout=60)
    script.write_text(textwrap.dedent(body.replace('raise ValueError(f"bad {x}")', "return x")))
    done = _cli("replay", str(saved), "bad-0")
    assert done.returncode == 1 and "ValueError: bad 1" in done.stderr, done.stderr
    assert "the replay runs the code that failed" in done.stderr
    assert "run.inputs('bad-0')" in done.stderr


def test_replay_of_a_function_whose_file_is_gone_warns_of_no_change(tmp_path):
    # A notebook cell's file (/tmp/ipykernel_*/N.py) is gone once its kernel ends:
    # getsource then read the running __main__'s file (graphexec's launcher) and
    # the replay warned that the source had "changed".
    script = tmp_path / "cell_7.py"
    script.write_text(
        textwrap.dedent("""
        import sys, graphexec as gx
        @gx.task
        def bad(x):
            raise ValueError(f"bad {x}")
        with gx.Graph() as g:
            bad(1)
        g.compute(workers=1, raise_on_failure=False).save(sys.argv[1])
        """)
    )
    saved = tmp_path / "r.gxrun"
    subprocess.run([sys.executable, str(script), str(saved)], env=_env(), check=True, timeout=60)
    script.unlink()
    # The installed `graphexec` command: a script, the __main__ getsource fell back to
    launcher = Path(sys.executable).with_name("graphexec")
    if not launcher.exists():
        pytest.skip("no graphexec command next to this interpreter (pip install -e .)")
    done = subprocess.run(
        [sys.executable, str(launcher), "replay", str(saved), "bad-0"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert done.returncode == 1 and "ValueError: bad 1" in done.stderr, done.stderr
    assert "changed since" not in done.stderr, done.stderr


# -- run_dir: the record written as the run goes -------------------------------------


def test_run_dir_holds_the_run_and_the_error_says_how_to_replay(pool, tmp_path):
    with gx.Graph("nightly") as g:
        b = check(make(10), limit=1.0)
        ok = consume(3)
    with pytest.raises(gx.GraphFailed) as info:
        g.compute(pool=pool, run_dir=tmp_path / "night")
    last = str(info.value).splitlines()[-1]
    assert last == (
        f"Reproduce it: python -m graphexec replay {tmp_path / 'night' / 'run.gxrun'} check-0"
        "  (--pdb to debug it)"
    )
    run = gx.Run.load(tmp_path / "night")
    assert run.ended and run.counts() == {"Completed": 2, "Failed": 1}
    assert [n.name for n in run.unhandled] == ["check-0"]
    with pytest.raises(ValueError, match=re.escape("sum 45.0 over 1.0")):
        run.replay(b.name)
    with pytest.raises(gx.GraphexecError, match="not in the saved run"):
        run[run.graph.nodes[ok.index]]


KILLED = """
import sys, time
import graphexec as gx

@gx.task
def fails(x):
    raise ValueError(f"bad {x}")

@gx.task
def quick(x):
    return x

@gx.task
def sleeper(x):
    time.sleep(60)

if __name__ == "__main__":
    with gx.Graph("killed") as g:
        fails(1)
        quick(2)
        quick(sleeper(3))
    g.compute(workers=2, run_dir=sys.argv[1])
"""

KILLED_STATES = {
    "fails-0": "Failed",
    "quick-0": "Completed",
    "sleeper-0": "Running",
    "quick-1": "Pending",
}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The run_dir of a parent SIGKILLed while sleeper-0 runs (quick-1 waits for it)."""
    where = tmp_path_factory.mktemp("killed")
    script = where / "killed.py"
    script.write_text(KILLED)
    run_dir = where / "night"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], env=_env(), cwd=where)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                run = gx.Run.load(run_dir)
            except (OSError, ValueError):  # not there, or its start not written yet
                continue
            if {n.name: run.state(n).name for n in run.nodes} == KILLED_STATES:
                break
        else:
            pytest.fail("the run never got going")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    return run_dir


def test_a_parent_killed_mid_run_leaves_a_run_that_loads(killed):
    run = gx.Run.load(killed)
    assert not run.ended and not run.ok
    assert {n.name: run.state(n).name for n in run.nodes} == KILLED_STATES
    assert "1 node(s) were running when the record ended: sleeper-0" in run.summary()
    with pytest.raises(ValueError, match="bad 1"):
        run.replay("fails-0")
    with pytest.raises(ValueError, match="was running when the run's record ended"):
        run.inputs("sleeper-0")


def test_a_record_cut_off_mid_run_says_so_everywhere(killed, tmp_path):
    run = gx.Run.load(killed)
    headline = run.summary().splitlines()[0]
    assert headline.endswith(
        "1 completed, 1 failed, 1 running, 1 pending — interrupted: the record ends mid-run "
        "(the process that wrote it stopped before the run ended); 1 unhandled failure(s)"
    ), headline
    assert " ok" not in headline
    # the same states by name, in the JSON document and back from it
    doc = json.loads(run.to_json())
    assert doc["ok"] is False and doc["interrupted"].startswith("the record ends mid-run")
    assert doc["counts"] == {"Completed": 1, "Failed": 1, "Running": 1, "Pending": 1}
    assert {n["name"]: n["state"] for n in doc["nodes"]} == KILLED_STATES
    again = gx.Run.from_json(run.to_json())
    assert again.summary().splitlines()[0] == headline
    assert run.state("sleeper-0").name == "Running"
    assert "when the record ended" in run.state("sleeper-0").message
    # the report of `graphexec report`
    page = tmp_path / "report.html"
    done = _cli("report", str(killed), "-o", str(page))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(
        "(4 nodes, interrupted: the record ends mid-run (the "
        "process that wrote it stopped before the run ended); 1 unhandled failure(s))"
    )
    text = page.read_text()
    assert '<span class="badge bad">interrupted: the record ends mid-run' in text
    assert '<div class="card c-running"><div class="v">1</div><div class="k">running</div>' in text
    assert "badge good" not in text
    assert "interrupted: the record ends mid-run" in run._repr_html_()


def test_an_ended_run_has_no_interrupted_field(pool):
    with gx.Graph() as g:
        consume(1)
    run = g.compute(pool=pool)
    assert "interrupted" not in json.loads(run.to_json())
    assert run.summary().splitlines()[0].endswith(" — ok")


@gx.task
def sees_on_disk(record, name, _after):
    # Runs after `name` finished, while the run goes on: is it on disk already?
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            run = gx.Run.load(record)
        except ValueError:  # its start is not written yet
            run = None
        if run is not None and any(n.name == name for n in run.completed):
            return True
        time.sleep(0.05)
    return False


def test_the_journal_is_on_disk_while_the_run_goes(pool, tmp_path):
    with gx.Graph() as g:
        first = consume(1)
        seen = sees_on_disk(str(tmp_path / "run.gxrun"), "consume-0", first)
    run = g.compute(pool=pool, run_dir=tmp_path)
    assert run[seen] is True
    assert gx.Run.load(tmp_path).counts() == {"Completed": 2}


def test_run_dir_keeps_chains(pool, tmp_path):
    with gx.Graph() as g:
        w = where_was_it(make(BIG), os.getpid())
    run = g.compute(pool=pool, run_dir=tmp_path, raise_on_failure=False)
    assert str(run.state(w).exception).startswith("segments=0 ")  # still chained
    loaded = gx.Run.load(tmp_path)
    np.testing.assert_array_equal(loaded.inputs(w.name)[0][0], np.arange(BIG, dtype=np.float64))


def test_json_documents_still_report(tmp_path):
    with gx.Graph() as g:
        check(make(10), limit=1.0)
    run = g.compute(scheduler="sync", raise_on_failure=False)
    doc = tmp_path / "run.json"
    doc.write_text(run.to_json())
    assert json.loads(doc.read_text())["format"] == "graphexec.run"
    done = _cli("report", str(doc))
    assert done.returncode == 0, done.stderr
    with pytest.raises(LookupError, match="read from a JSON document"):
        gx.Run.from_json(doc.read_text()).inputs("check-0")


def nightly_body():
    a = make.submit(10)
    check.submit(a, limit=2.0)
    return consume(4)


def test_a_failure_is_on_disk_before_its_hooks_run(tmp_path):
    # The record's writes are slowed down; an on_failure hook kills the process at
    # once. The failure must be in the record all the same (the scheduler's thread
    # waits for its write): it once read Pending, now and then.
    script = textwrap.dedent("""
        import os, sys, time
        import graphexec as gx
        from graphexec._surfaces import record

        slow = record.Writer.flush
        def flush(self):
            time.sleep(0.3)
            slow(self)
        record.Writer.flush = flush

        def die(task, run, state):
            os.kill(os.getpid(), 9)

        @gx.task
        def up():
            return 1

        @gx.task(on_failure=[die])
        def bad(x):
            raise ValueError("bad")

        with gx.Graph() as g:
            bad(up())
        g.compute(workers=1, run_dir=sys.argv[1])
        """)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "r")], env=_env(), timeout=60
    )
    assert done.returncode == -signal.SIGKILL
    run = gx.Run.load(tmp_path / "r")
    assert run.state("bad-0").name == "Failed"
    assert run.inputs("bad-0") == ((1,), {})


def test_a_flow_writes_its_record_as_it_goes(tmp_path):
    flow = gx.flow(workers=2, run_dir=tmp_path / "flow")(nightly_body)
    with pytest.raises(gx.GraphFailed) as info:
        flow()
    assert (
        str(info.value)
        .splitlines()[-1]
        .startswith(
            f"Reproduce it: python -m graphexec replay {tmp_path / 'flow' / 'run.gxrun'} check-0"
        )
    )
    run = gx.Run.load(tmp_path / "flow")
    assert run.ended
    (checked,) = [n for n in run.nodes if n.name == "check-0"]
    assert [run.graph.nodes[up].name for up in run.graph._deps[checked.index]] == ["make-0"]
    assert {n.name: run.state(n).name for n in run.nodes} == {
        "make-0": "Completed",
        "check-0": "Failed",
        "consume-0": "Completed",
    }
    assert [n.name for n in run.unhandled] == ["check-0"]
    (array,), kwargs = run.inputs("check-0")
    np.testing.assert_array_equal(array, np.arange(10.0))
    assert kwargs == {"limit": 2.0}
    with pytest.raises(ValueError, match=re.escape("sum 45.0 over 2.0")):
        run.replay("check-0")


@gx.task
def locked(lock, x):
    with lock:
        raise ValueError(f"x={x}")


def test_an_unpicklable_input_replays_here_but_is_not_saved(tmp_path):
    lock = threading.Lock()
    with gx.Graph() as g:
        n = locked(lock, consume(2))
    run = g.compute(scheduler="threads", workers=2, raise_on_failure=False)
    (got, x), _ = run.inputs(n)
    assert got is lock and x == 2  # the object itself: it would not pickle
    with pytest.raises(ValueError, match="x=2"):
        run.replay(n)
    loaded = gx.Run.load(run.save(tmp_path / "r.gxrun"))
    with pytest.raises(LookupError, match=r"could not be pickled \(they replay only in the"):
        loaded.inputs("locked-0")
    assert "locked-0: its inputs could not be pickled" in loaded.summary()


def test_a_value_many_failed_nodes_got_is_kept_and_saved_once(pool, tmp_path):
    with gx.Graph() as g:
        a = make(BIG)  # 1.6 MB
        bad = [check(a, limit=float(k)) for k in range(5)]
    run = g.compute(pool=pool, raise_on_failure=False, keep_inputs="2MB")
    for node in bad:  # all five kept under a 2 MB cap: the array counts once
        np.testing.assert_array_equal(run.inputs(node)[0][0], np.arange(BIG, dtype=np.float64))
    saved = run.save(tmp_path / "r.gxrun")
    assert saved.stat().st_size < 2 * BIG * 8
    loaded = gx.Run.load(saved)
    first, last = loaded.inputs("check-0")[0][0], loaded.inputs("check-4")[0][0]
    np.testing.assert_array_equal(first, last)
    assert loaded.inputs("check-4")[1] == {"limit": 4.0}


def test_an_unwritable_run_dir_is_refused_before_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with gx.Graph() as g:
        consume(1)
    with pytest.raises(ValueError, match="exists and is not a directory"):
        g.compute(scheduler="sync", run_dir=blocker)
    with pytest.raises(ValueError, match="the run's record cannot be written there"):
        g.compute(scheduler="sync", run_dir=blocker / "sub")


def test_a_run_its_pool_refuses_leaves_the_record_already_there_whole(tmp_path):
    # The executor is opened before the record: a closed pool refuses the run
    # without emptying the record an earlier run left in the same directory.
    with gx.Graph() as g:
        fails(1)
    with gx.Pool(workers=1) as pool:
        first = g.compute(pool=pool, run_dir=tmp_path, raise_on_failure=False)
    with pytest.raises(RuntimeError, match="closed"):
        g.compute(pool=pool, run_dir=tmp_path, raise_on_failure=False)
    loaded = gx.Run.load(tmp_path)
    assert [n.name for n in loaded.failed] == [n.name for n in first.failed]
    assert loaded.summary().count("interrupted") == 0


# -- a node by its name ------------------------------------------------------------------


@gx.task(task_run_name="load-{x}")
def load(x):
    return x


def test_state_and_getitem_take_a_name(pool):
    with gx.Graph() as g:
        a = consume(1)
        b = fails(2)
    run = g.compute(pool=pool, raise_on_failure=False)
    assert run.state("consume-0") is run.state(a)
    assert run["consume-0"] == run[a] == 1
    assert run.state("fails-0").exception is run.state(b).exception
    with pytest.raises(KeyError):
        run["fails-0"]  # the node's own exception, re-raised, as run[b] does
    assert "consume-0" in run and "nothing-0" not in run
    with pytest.raises(KeyError, match="no node named 'nothing-0'"):
        run.state("nothing-0")


def test_a_loaded_run_is_read_by_names(pool, tmp_path):
    with gx.Graph() as g:
        consume(1)
        fails(2)
    g.compute(pool=pool, run_dir=tmp_path, raise_on_failure=False)
    run = gx.Run.load(tmp_path)
    assert run.state("fails-0").name == "Failed"
    with pytest.raises(gx.GraphexecError, match="consume-0 completed, but its value is not"):
        run["consume-0"]


def test_an_ambiguous_name_lists_the_candidates(pool):
    with gx.Graph() as g:
        first = load(1)
        load(1)
        fails(load(2))
    run = g.compute(pool=pool, raise_on_failure=False)
    assert run.state("load-2").name == "Completed"
    message = (
        "2 nodes of this run of graph are named 'load-1': run.nodes[0] (load, Completed), "
        "run.nodes[1] (load, Completed); pass the node itself instead of its name"
    )
    for look in (run.state, run.__getitem__, run.inputs, run.replay):
        with pytest.raises(KeyError, match=re.escape(message)):
            look("load-1")
    assert "load-1" in run
    assert run.nodes[0] is first


@gx.task(task_run_name="fit-{model}")
def fit(model, seed):
    raise ValueError(f"{model} diverged at {seed}")


def test_failed_nodes_sharing_a_name_are_replayed_by_position(pool, tmp_path):
    # fit.map over seeds with one model: three nodes named fit-lin. The hint named
    # "fit-lin", which run.replay and the CLI refused as ambiguous.
    with gx.Graph() as g:
        fit.map("lin", [0, 1, 2])
    with pytest.raises(gx.GraphFailed) as caught:
        g.compute(pool=pool, run_dir=tmp_path)
    message = str(caught.value)
    (hint,) = [line for line in message.splitlines() if "Reproduce it" in line]
    assert " '#0' " in hint or " #0 " in hint, hint
    done = _cli("replay", str(tmp_path), "#1")
    assert done.returncode == 1 and "lin diverged at 1" in done.stderr, done.stderr[-2000:]
    done = _cli("replay", str(tmp_path), "fit-lin")
    assert done.returncode == 3
    assert "3 nodes" in done.stderr and "give '#k' for run.nodes[k]" in done.stderr
    run = gx.Run.load(tmp_path)
    with pytest.raises(ValueError, match="lin diverged at 2"):
        run.replay(run.nodes[2])


@gx.task
def source(x):
    return x


@gx.task(task_run_name="step")
def step(value, broken):
    if broken:
        raise ValueError(f"step broke on {value}")
    return value


def test_the_hint_of_a_shared_name_gives_the_records_position(pool, tmp_path):
    # A record numbers nodes in graph order; run.members is dependencies first.
    # The hint once gave the latter's position to the command line, which then
    # replayed another node ("source-1 is Completed, not Failed").
    with gx.Graph() as g:
        a, b = source(1), source(2)
        broken = step(b, True)
        step(a, False)
    with pytest.raises(gx.GraphFailed) as caught:
        g.compute(pool=pool, run_dir=tmp_path)
    run = caught.value.run
    (hint,) = [line for line in str(caught.value).splitlines() if "Reproduce it" in line]
    position = re.search(r"'?#(\d+)'?", hint).group(1)
    done = _cli("replay", str(tmp_path), f"#{position}")
    assert done.returncode == 1 and "step broke on 2" in done.stderr, (hint, done.stderr[-2000:])
    assert run.nodes.index(broken) != int(position)  # the two orders differ here


@gx.task
def waits(i):
    time.sleep(0.3 * (2 - i))  # the later submitted, the sooner done
    return i


@gx.task(task_run_name="job")
def bad_job(x):
    raise ValueError(f"bad {x}")


def test_the_hint_of_a_shared_name_in_a_flow_gives_its_records_number(tmp_path):
    # A flow's record numbers nodes as it first sees them (here the last submitted
    # first); the hint once counted in graph order and replayed another job.
    @gx.flow(workers=2, run_dir=tmp_path / "night")
    def night():
        jobs = [bad_job.submit(w) for w in [waits.submit(i) for i in range(3)]]
        gx.wait(jobs)
        return 1

    with pytest.raises(gx.GraphFailed) as caught:
        night()
    message = str(caught.value)
    first = re.search(r"ValueError: (bad \d)", message).group(1)
    hint = message.splitlines()[-1]
    assert hint.startswith("Reproduce it: python -m graphexec replay"), hint
    position = re.search(r"'?#(\d+)'?", hint).group(1)
    done = _cli("replay", str(tmp_path / "night"), f"#{position}")
    assert done.returncode == 1 and first in done.stderr, (hint, done.stderr[-2000:])
    # Saved again, the run's file numbers its nodes in graph order: the hint follows
    run = caught.value.run
    run.save(tmp_path / "archive.gxrun")
    hint = run._failure_report().splitlines()[-1]
    position = re.search(r"'?#(\d+)'?", hint).group(1)
    done = _cli("replay", str(tmp_path / "archive.gxrun"), f"#{position}")
    assert done.returncode == 1 and first in done.stderr, (hint, done.stderr[-2000:])


@gx.task
def holds_a_lock(lock):
    raise RuntimeError("never runs")


def test_the_hint_of_a_call_whose_inputs_live_in_this_process_only_is_the_python_one(tmp_path):
    # A lock cannot be pickled into the record: the command line could not replay it.
    with gx.Graph() as g:
        holds_a_lock(threading.Lock())
    with pytest.raises(gx.GraphFailed) as caught:
        g.compute(workers=1, run_dir=tmp_path)
    (hint,) = [line for line in str(caught.value).splitlines() if "Reproduce it" in line]
    assert hint.startswith("Reproduce it: exc.run.replay('holds_a_lock-0')"), hint


RECORDS_A_MODULES_OBJECT = textwrap.dedent(
    """
    import sys
    import graphexec as gx
    import labmod

    @gx.task
    def analyse(sample):
        raise ValueError("analysis failed")

    with gx.Graph() as g:
        analyse(labmod.Sample())
    g.compute(workers=1, run_dir=sys.argv[1], raise_on_failure=False)
    """
)


@pytest.mark.timeout(90)
def test_replay_says_clearly_when_the_inputs_cannot_be_loaded_and_checks_its_timeout(tmp_path):
    (tmp_path / "labmod.py").write_text("class Sample:\n    pass\n")
    (tmp_path / "script.py").write_text(RECORDS_A_MODULES_OBJECT)
    made = subprocess.run(
        [sys.executable, "script.py", str(tmp_path / "night")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    (tmp_path / "labmod.py").unlink()  # replayed where the module is not importable
    done = _cli("replay", str(tmp_path / "night"), "analyse-0")
    assert done.returncode == 3, done.stderr[-2000:]
    assert "the inputs of analyse-0 could not be loaded" in done.stderr
    assert "ModuleNotFoundError" in done.stderr and "Traceback" not in done.stderr
    assert "failed again" not in done.stderr
    for bad in ("-1", "0", "nan", "soon"):
        done = _cli("replay", str(tmp_path / "night"), "analyse-0", "--timeout", bad)
        assert done.returncode == 2 and "not a number of seconds above 0" in done.stderr
    run = gx.Run.load(tmp_path / "night")
    with pytest.raises(ValueError, match="could not be loaded from the record"):
        run.inputs("analyse-0")
    with pytest.raises(ValueError, match="a number of seconds above 0"):
        run.replay("analyse-0", timeout=-1)


# -- a node over its memory limit ------------------------------------------------------


@gx.task
def hog(megabytes, flag):
    # Holds touched memory (np.ones writes every page) while a sampler looks; after a
    # first time (its worker killed), only when the flag file says "again".
    if Path(flag).exists() and Path(flag).read_text() != "again":
        return "small now"
    Path(flag).write_text("hogged")
    block = np.ones(megabytes * 2**20 // 8)
    time.sleep(10)
    return float(block[-1])


@pytest.mark.timeout(60)
def test_a_node_over_its_memory_limit_replays_in_a_subprocess_first(pool, tmp_path, capfd):
    flag = tmp_path / "flag"
    with gx.Graph() as g:
        h = hog(300, str(flag))
    run = g.compute(pool=pool, memory_limit="150MB", raise_on_failure=False)
    assert type(run.state(h).exception) is gx.MemoryLimitExceeded
    capfd.readouterr()
    assert run.replay(h) == "small now"
    err = capfd.readouterr().err
    assert (
        "graphexec: hog-0 went over its memory limit (143.1 MiB); replaying it in a fresh "
        "subprocess first, so that it cannot exhaust this interpreter's memory"
    ) in err
    assert "did not run out of memory in the subprocess (it returned); replaying it" in err
    # over the limit again: killed in the subprocess, never run here
    flag.write_text("again")
    started = time.monotonic()
    with pytest.raises(gx.MemoryLimitExceeded, match="again when replayed in a fresh subproc"):
        run.replay(h)
    assert time.monotonic() - started < 8  # killed, not left to sleep its 10 s
    assert flag.read_text() == "hogged"  # it did run, in the subprocess


# -- what the journal costs the run -----------------------------------------------------


def test_the_journal_hands_nothing_to_the_hooks_thread_and_writes_batches(
    pool, tmp_path, monkeypatch
):
    # Each event handed to the hooks' dispatcher cost a queue hand-off and a thread
    # wake-up, and each record its own frame: most of run_dir's cost on small tasks.
    started: list[str] = []
    real_start = threading.Thread.start

    def start(self):
        started.append(self.name)
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with gx.Graph() as g:
        [consume(i) for i in range(300)]
    g.compute(pool=pool, run_dir=tmp_path)
    monkeypatch.undo()
    assert "graphexec-hooks" not in started
    assert started.count("graphexec-journal") == 1
    data = (tmp_path / "run.gxrun").read_bytes()
    frames, at = 0, len(b"GXRUN\x001\n")
    while at < len(data):
        kind, size = data[at : at + 1], int.from_bytes(data[at + 1 : at + 9], "little")
        assert kind == b"J"
        frames, at = frames + 1, at + 9 + size
    assert frames < 100  # 600 events, in batches
    assert gx.Run.load(tmp_path).counts() == {"Completed": 300}


def test_a_record_of_the_first_format_still_loads(tmp_path):
    # One dict per frame, attempts as {"t": "run"}: what run_dir wrote at first.
    def frame(record):
        body = json.dumps(record).encode()
        return b"J" + len(body).to_bytes(8, "little") + body

    start = {
        "t": "start",
        "format": "graphexec.run",
        "version": 1,
        "graph": "old",
        "started": 100.0,
        "nodes": [{"name": "a-0", "task": "a"}, {"name": "b-0", "task": "b"}],
        "edges": [],
    }
    (tmp_path / "run.gxrun").write_bytes(
        b"GXRUN\x001\n" + frame(start) + frame({"t": "run", "id": 1, "attempt": 1, "at": 101.0})
    )
    run = gx.Run.load(tmp_path)
    assert [run.state(n).name for n in run.nodes] == ["Pending", "Running"]
    assert "interrupted" in run.summary().splitlines()[0]


@gx.task
def pressed_ctrl_c(x):
    raise KeyboardInterrupt  # what Ctrl-C does to a task in the caller's thread


def test_a_run_ctrl_c_cancelled_is_not_ok_once_saved_and_loaded(tmp_path):
    with gx.Graph() as g:
        done = consume(1)
        pressed_ctrl_c(done)
    with pytest.raises(KeyboardInterrupt) as caught:
        g.compute(scheduler="sync", run_dir=tmp_path / "journal")
    run = caught.value.run
    assert not run.ok
    for loaded in (
        gx.Run.load(run.save(tmp_path / "saved.gxrun")),
        gx.Run.load(tmp_path / "journal"),
    ):
        assert not loaded.ok
        assert "cancelled by Ctrl-C" in loaded.summary().splitlines()[0]
        assert loaded.state("consume-0").name == "Completed"
