"""Running graphs (SPEC §2): the Run API, culling, release of intermediates, pools, schedulers."""

from __future__ import annotations

import functools
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from typing import Any

import pytest
from conftest import running

import graphexec as gx
from graphexec._engine import collector
from graphexec._engine.caching import CacheGate
from graphexec._engine.scheduler import Scheduler

ALL_SCHEDULERS = ("processes", "sync", "threads")


@gx.task
def ok(x=1):
    return x


@gx.task
def plus(x, y=1):
    return x + y


@gx.task
def total(values):
    return sum(values)


@gx.task
def explode(message="boom"):
    raise ValueError(message)


@gx.task
def pid():
    return os.getpid()


@gx.task
def slow_pid(seconds=0.1):
    time.sleep(seconds)
    return os.getpid()


@gx.task
def thread_name():
    return threading.current_thread().name


@gx.task
def record(path, label, *_):
    with open(path, "a") as f:
        f.write(label + "\n")
    return label


@gx.task
def bump(path):
    try:
        with open(path) as f:
            count = int(f.read())
    except FileNotFoundError:
        count = 0
    with open(path, "w") as f:
        f.write(str(count + 1))
    return count + 1


def lines(path):
    return path.read_text().split() if path.exists() else []


# -- the Run API ----------------------------------------------------------------------------


def test_run_api(compute):
    graph = gx.Graph("pipeline")
    with graph:
        a = ok(1)
        b = plus(a)
        bad = explode("bad input")
        skipped = plus(bad)
        handled = explode("handled", allow_failure=True)
        report = total([b, 10])
        sink = ok(handled)
    run = compute(graph, raise_on_failure=False)
    assert isinstance(run, gx.Run)
    assert run[report] == 12
    assert run.result(report) == 12
    assert run.completed == [a, b, report, sink]
    assert run.failed == [bad, handled]
    assert run.unhandled == [bad]
    assert run.skipped == [skipped]
    assert run.cancelled == []
    assert run.ok is False
    assert sorted(run.nodes, key=lambda n: n.index) == graph.nodes
    assert run.counts() == {"Completed": 4, "Failed": 2, "Skipped": 1}
    assert all(run.state(n).is_final() for n in run.nodes)
    assert run.duration >= 0
    assert a in run and graph.add(ok, 1) not in run

    state = run.state(report)
    assert isinstance(state, gx.State)
    assert state.name == "Completed" and state.is_completed() and not state.is_failed()
    assert state.node == report.name == "total-0"
    assert state.result() == 12
    assert state.attempts == 1
    assert state.exception is None
    assert state.duration >= 0

    bad_state = run.state(bad)
    assert bad_state.is_failed()
    assert isinstance(bad_state.exception, ValueError)
    assert bad_state.result(raise_on_failure=False) is bad_state.exception
    with pytest.raises(ValueError, match="bad input"):
        run[bad]
    with pytest.raises(gx.UpstreamFailed):
        run[skipped]
    assert run[sink] is not None  # received the handled exception

    # node.result() / node.state read the latest run
    assert report.result() == 12
    assert report.state.name == "Completed"
    with pytest.raises(ValueError, match="bad input"):
        bad.result()
    assert isinstance(bad.result(raise_on_failure=False), ValueError)
    assert repr(report) == "<Node total-0 (Completed)>"
    assert "pipeline" in repr(run)

    with pytest.raises(TypeError):
        run.state(gx.Graph().add(ok))
    with pytest.raises(TypeError):
        run[3]
    # a node's name as summary() shows it reads the same (#13)
    assert run["total-0"] == 12 and run.state("total-0") is state


def test_summary_reports_counts_durations_and_failures(compute):
    graph = gx.Graph("sweep")
    with graph:
        good = [ok(i) for i in range(3)]
        bad = explode("bad seed")
        skipped = plus(bad)
        total(good)
    run = compute(graph, raise_on_failure=False)
    text = run.summary()
    first = text.splitlines()[0]
    assert first.startswith("sweep: 6 nodes")
    assert "4 completed" in first and "1 failed" in first and "1 skipped" in first
    assert "1 unhandled failure(s)" in first
    header = text.splitlines()[1].split()
    assert header[:2] == ["task", "nodes"]
    assert {"Completed", "Failed", "Skipped", "retries"} <= set(header)
    row = next(line.split() for line in text.splitlines() if line.startswith("ok "))
    assert row[1:3] == ["3", "3"]  # ok: 3 nodes, 3 completed
    assert "Failures:" in text
    assert f"{bad.name}: ValueError: bad seed" in text
    assert "(handled)" not in text
    assert f"{skipped.name} was skipped because its upstream {bad.name} failed" in text

    graph2 = gx.Graph("fine")
    with graph2:
        ok(1)
        explode("accepted", allow_failure=True)
    ok_text = compute(graph2).summary()
    assert ok_text.splitlines()[0].endswith("— ok")
    assert "explode-0 (handled): ValueError: accepted" in ok_text


def test_second_compute_is_independent(compute, tmp_path):
    counter = tmp_path / "count"
    graph = gx.Graph()
    with graph:
        n = bump(str(counter))
    run1 = compute(graph)
    run2 = compute(graph)
    assert run1 is not run2
    assert run1[n] == 1 and run2[n] == 2
    assert n.result() == 2  # the latest run
    assert run1.state(n) is not run2.state(n)
    assert run1.state(n).result() == 1


@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_an_empty_graph_computes_to_an_empty_run(compute):
    run = compute(gx.Graph())
    assert run.ok
    assert run.nodes == [] and run.completed == [] and run.failed == []
    assert run.counts() == {}
    assert "0 nodes" in run.summary()


def test_a_node_added_after_a_run_is_not_in_it():
    graph = gx.Graph()
    a = graph.add(ok, 1)
    run = graph.compute(workers=0)
    b = graph.add(plus, a)
    with pytest.raises(KeyError, match="not part of this run"):
        run.state(b)
    with pytest.raises(KeyError):
        b.state  # noqa: B018
    run2 = graph.compute(workers=0)
    assert run2[b] == 2


# -- culling --------------------------------------------------------------------------------


def test_compute_targets_runs_only_ancestors(compute, tmp_path):
    log = tmp_path / "log"
    graph = gx.Graph()
    with graph:
        a = record(str(log), "a")
        b = record(str(log), "b", a)
        c = record(str(log), "c", wait_for=[b])
        other = record(str(log), "other", a)
        unrelated = record(str(log), "unrelated")
    run = compute(graph, c)
    assert sorted(lines(log)) == ["a", "b", "c"]
    assert run[c] == "c"
    assert {n.name for n in run.nodes} == {a.name, b.name, c.name}
    for culled in (other, unrelated):
        assert culled not in run
        with pytest.raises(KeyError):
            run.state(culled)
        with pytest.raises(KeyError):
            run[culled]
        with pytest.raises(KeyError):
            culled.state  # noqa: B018

    log.unlink()
    run2 = compute(graph, [unrelated, other])  # a list of targets works too
    assert sorted(lines(log)) == ["a", "other", "unrelated"]
    assert run2[other] == "other" and run2[unrelated] == "unrelated"


def test_culling_a_failed_branch_away_makes_compute_succeed(compute):
    graph = gx.Graph()
    with graph:
        good = plus(ok(1))
        explode()
    run = compute(graph, good)
    assert run.ok and run.failed == []
    assert run[good] == 2


# -- release of intermediates ---------------------------------------------------------------


def test_intermediates_are_released_and_targets_kept(compute):
    graph = gx.Graph()
    with graph:
        a = ok(1)
        b = plus(a)
        c = plus(b)
        d = plus(c)
    run = compute(graph)  # no targets: the sinks are kept
    assert run[d] == 4
    for node in (a, b, c):
        state = run.state(node)
        assert state.name == "Completed"
        assert state.released
        with pytest.raises(gx.ResultReleased, match="released"):
            run[node]
        with pytest.raises(KeyError):  # ResultReleased is a KeyError too
            run[node]
    assert not run.state(d).released

    explicit = compute(graph, b, d)
    assert explicit[b] == 2 and explicit[d] == 4
    with pytest.raises(gx.ResultReleased):
        explicit[c]

    everything = compute(graph, keep="all")
    assert [everything[n] for n in (a, b, c, d)] == [1, 2, 3, 4]
    assert not any(everything.state(n).released for n in (a, b, c, d))


def test_a_value_used_by_many_dependents_lives_until_the_last(compute):
    graph = gx.Graph()
    with graph:
        shared = ok(5)
        firsts = [plus(shared, i) for i in range(6)]
        late = plus(total(firsts), wait_for=firsts)
        last = total([late, shared])  # needs shared after everything else
    run = compute(graph)
    assert run[last] == (sum(5 + i for i in range(6)) + 1) + 5


def test_order_only_upstream_value_is_released_at_once(compute):
    graph = gx.Graph()
    with graph:
        first = ok(1)
        second = ok(2, wait_for=[first])
    run = compute(graph)
    assert run.state(first).released  # nothing takes its value
    assert run[second] == 2


# Weakrefs to values made in this process (sync scheduler only).
_refs: dict[str, weakref.ref] = {}


class Blob:
    def __init__(self, tag):
        self.tag = tag


@gx.task
def make_blob(tag, *_):
    blob = Blob(tag)
    _refs[tag] = weakref.ref(blob)
    return blob


@gx.task
def alive_now(*_):
    gc.collect()
    return {tag: ref() is not None for tag, ref in _refs.items()}


def test_intermediate_weakref_dead_after_run_target_alive_sync():
    _refs.clear()
    graph = gx.Graph()
    with graph:
        mid = make_blob("mid")
        kept = make_blob("kept", mid)
    run = graph.compute(workers=0)
    gc.collect()
    assert _refs["mid"]() is None
    assert _refs["kept"]() is not None
    assert run[kept].tag == "kept"

    _refs.clear()
    run_all = graph.compute(workers=0, keep="all")
    gc.collect()
    assert _refs["mid"]() is run_all[mid]


def test_values_freed_while_later_nodes_run_sync():
    _refs.clear()
    graph = gx.Graph()
    with graph:
        a = make_blob("a")
        b = make_blob("b", a)
        c = make_blob("c", b)
        probe = alive_now(c)
    run = graph.compute(scheduler="sync", keep="targets")
    assert run[probe] == {"a": False, "b": False, "c": True}


# -- pools and schedulers -------------------------------------------------------------------


def test_pool_is_reused_across_computes():
    with gx.Pool(workers=2) as pool:
        assert pool.workers == 2
        seen = []
        for _ in range(3):
            graph = gx.Graph()
            with graph:
                pids = [slow_pid(0.05) for _ in range(4)]
            run = graph.compute(pool=pool)
            seen.append({run[p] for p in pids})
        assert len(seen[0]) == 2
        assert seen[1] == seen[0] and seen[2] == seen[0]  # the same warm workers
        assert os.getpid() not in seen[0]
    assert pool.closed
    graph = gx.Graph()
    with graph:
        ok(1)
    with pytest.raises(RuntimeError, match="closed"):
        graph.compute(pool=pool)
    pool.close()  # idempotent


def test_pool_fixture_survives_failures(pool):
    graph = gx.Graph()
    with graph:
        explode()
        good = ok(3)
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(pool=pool)
    assert info.value.run[good] == 3
    graph2 = gx.Graph()
    with graph2:
        again = plus(ok(1))
    assert graph2.compute(pool=pool)[again] == 2


def test_pool_argument_validation(pool):
    graph = gx.Graph()
    with graph:
        ok(1)
    with pytest.raises(ValueError, match="pool="):
        graph.compute(pool=pool, workers=3)
    with pytest.raises(ValueError, match="pool="):
        graph.compute(pool=pool, scheduler="sync")
    with pytest.raises(ValueError, match=r"gx\.Pool\(start_method"):  # it was ignored
        graph.compute(pool=pool, start_method="spawn")
    with pytest.raises(TypeError, match=r"gx\.Pool"):
        graph.compute(pool="warm")
    with pytest.raises(ValueError):
        gx.Pool(workers=0)
    with pytest.raises(ValueError):
        gx.Pool(workers=-1)


def test_compute_without_pool_stops_its_workers():
    graph = gx.Graph()
    with graph:
        pids = [slow_pid(0.05) for _ in range(4)]
    run = graph.compute(workers=2)
    worker_pids = {run[p] for p in pids}
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    deadline = time.monotonic() + 3
    alive = worker_pids
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if running(p)}
        time.sleep(0.02)
    assert not alive, f"workers still running after compute: {alive}"


@pytest.mark.parametrize(
    ("kwargs", "same_process"),
    [
        ({"workers": 0}, True),
        ({"scheduler": "sync"}, True),
        ({"scheduler": "threads"}, True),
        ({"workers": 1}, False),
    ],
)
def test_where_tasks_run(kwargs, same_process):
    graph = gx.Graph()
    with graph:
        p = pid()
        t = thread_name()
    run = graph.compute(**kwargs, keep="all")
    assert (run[p] == os.getpid()) is same_process
    if kwargs.get("scheduler") == "threads":
        assert run[t].startswith("graphexec-thread")
    elif same_process:
        assert run[t] == threading.current_thread().name


def test_depth_first_order_finishes_one_branch_before_the_next(tmp_path):
    log = tmp_path / "log"
    graph = gx.Graph()
    with graph:
        for branch in "ab":
            x = record(str(log), f"{branch}1")
            x = record(str(log), f"{branch}2", x)
            record(str(log), f"{branch}3", x)
    graph.compute(scheduler="sync")
    assert lines(log) == ["a1", "a2", "a3", "b1", "b2", "b3"]


def test_priority_option_runs_first(tmp_path):
    log = tmp_path / "log"
    urgent = record.with_options(priority=10)
    graph = gx.Graph()
    with graph:
        record(str(log), "normal")
        urgent(str(log), "urgent")
    graph.compute(scheduler="sync")
    assert lines(log) == ["urgent", "normal"]


# -- functions the process scheduler can run ---------------------------------------------------


class Scaler:
    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return x * self.k

    def scale(self, x):
        return x * self.k


def test_closures_lambdas_and_local_functions_on_processes(pool):
    k = 7

    def local(x):
        return x + k

    @gx.task
    def decorated_local(x):
        return [local(x), k]

    graph = gx.Graph()
    a = graph.add(lambda x: x * k, 3)
    b = graph.add(local, a)
    c = graph.add(functools.partial(plus, y=100), b)
    d = graph.add(Scaler(2), c)
    e = graph.add(Scaler(3).scale, d)
    f = graph.add(decorated_local, e)
    g = graph.add(gx.task(lambda v: ("lambda task", v)), f)
    run = graph.compute(pool=pool, keep="all")
    assert run[a] == 21
    assert run[b] == 28
    assert run[c] == 128
    assert run[d] == 256
    assert run[e] == 768
    assert run[f] == [775, 7]
    assert run[g] == ("lambda task", [775, 7])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["zygote", "forkserver", "spawn"])
def test_functions_defined_in_main_run_on_workers(tmp_path, start_method):
    script = tmp_path / "pipeline.py"
    script.write_text(
        textwrap.dedent(f"""
        import graphexec as gx

        OFFSET = 100

        @gx.task
        def square(x):
            return x * x + OFFSET

        @gx.task
        def fail():
            raise RuntimeError("main failure")

        if __name__ == "__main__":
            graph = gx.Graph()
            with graph:
                total = gx.task(lambda xs: sum(xs))([square(i) for i in range(4)])
                bad = fail()
            try:
                graph.compute(workers=2, start_method={start_method!r})
            except gx.GraphFailed as exc:
                print("total", exc.run[total])
                print("cause", repr(exc.__cause__))
                print("traceback-has-line", "raise RuntimeError" in str(exc.__cause__.__cause__))
    """)
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=25,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert "total 414" in out
    assert "cause RuntimeError('main failure')" in out
    assert "traceback-has-line True" in out


def _child_square(x, queue):
    queue.put(x * x)


@gx.task
def start_own_processes(x):
    import multiprocessing

    out = subprocess.run(
        [sys.executable, "-c", f"print({x} + 1)"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout.strip()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_square, args=(x, queue))  # refused in a daemon
    child.start()
    value = queue.get(timeout=20)
    child.join(20)
    return int(out), value


@pytest.mark.timeout(30)
def test_tasks_may_start_their_own_processes(pool):
    graph = gx.Graph()
    with graph:
        node = start_own_processes(6)
    assert graph.compute(pool=pool)[node] == (7, 36)


# -- scale ---------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_long_chain_runs_and_skips_without_recursion():
    graph = gx.Graph()
    with graph:
        node = explode()
        for _ in range(20_000):
            node = plus(node)
        good = ok(1)
        for _ in range(20_000):
            good = plus(good)
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(scheduler="sync")
    run = info.value.run
    assert run[good] == 20_001
    assert len(run.skipped) == 20_000
    assert run.state(node).upstream == "explode-0"


# -- the garbage collector during a run (#14, docs/dispatch.md "Round four") --------


def test_a_node_done_at_its_first_try_has_its_attempt_in_its_history():
    graph = gx.Graph()
    with graph:
        node = plus(1)
    before = time.time()
    for scheduler in ALL_SCHEDULERS:
        state = graph.compute(scheduler=scheduler, workers=1).state(node)
        assert state.attempts == 1
        (attempt,) = state.history
        assert state.history[0] is attempt  # made once, then kept
        assert attempt.number == 1 and attempt.error is None and attempt.retry_delay is None
        assert before <= attempt.started <= attempt.finished <= time.time()
        assert state.started == attempt.started and state.finished == attempt.finished
        assert attempt.worker is not None
        # a State that crossed a process boundary (return_state, run.save) keeps it
        (again,) = pickle.loads(pickle.dumps(state)).history
        assert again.number == 1
        assert (again.started, again.finished) == (attempt.started, attempt.finished)
    assert gx.State("Skipped", "x").attempts == 0 and gx.State("Skipped", "x").history == []


@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_a_run_leaves_no_cycle_behind(scheduler):
    """Its scheduler's per-node lists go when compute() returns, not at some later
    full collection."""
    graph = gx.Graph()
    with graph:
        layer = [plus(j) for j in range(10)]
        for _ in range(3):
            layer = [plus(layer[j], layer[(j + 1) % 10]) for j in range(10)]

    def schedulers():  # (an eager session an earlier test left open may hold its own)
        return {id(o): o for o in gc.get_objects() if type(o) in (Scheduler, CacheGate)}

    gc.collect()
    gc.disable()
    try:
        earlier = schedulers()
        run = graph.compute(scheduler=scheduler, workers=1)
        assert run.counts() == {"Completed": 40}
        left = [o for k, o in schedulers().items() if k not in earlier]
        assert left == []
    finally:
        gc.enable()


@gx.task
def thresholds(_=None):
    return gc.get_threshold()


def _seeing(record: list, then: Any = None) -> Any:
    """A cache_key_fn that notes the thresholds in this process during the run (it
    runs here, beside the scheduler), does ``then``, and caches nothing."""

    def key(context: Any, arguments: Any) -> None:
        record.append(gc.get_threshold())
        if then is not None:
            then()

    return key


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="an incremental collector: no change")
def test_full_collections_wait_while_the_scheduler_runs_and_the_program_keeps_its_settings(
    pool, tmp_path, monkeypatch
):
    seen: list = []

    def during(then: Any = None) -> tuple[int, int, int]:
        graph = gx.Graph()
        with graph:
            thresholds.with_options(cache_key_fn=_seeing(seen, then))()
        graph.compute(pool=pool, cache_dir=tmp_path)
        return seen.pop()

    program = gc.get_threshold()
    try:
        gc.set_threshold(500, 5, 7)
        noted = during()
        assert noted[:2] == (500, 5) and noted[2] > 1_000_000  # young ones go on
        assert gc.get_threshold() == (500, 5, 7)
        # A collector the program disabled, or whose automatic collection it turned
        # off, is left alone.
        gc.disable()
        try:
            assert during() == (500, 5, 7)
        finally:
            gc.enable()
        gc.set_threshold(0, 5, 7)
        assert during() == (0, 5, 7)
        # A threshold set during the run stays as the program set it.
        gc.set_threshold(500, 5, 7)
        during(lambda: gc.set_threshold(400, 4, 4))
        assert gc.get_threshold() == (400, 4, 4)
        # A run interrupted (Ctrl-C) gives it back too.
        gc.set_threshold(500, 5, 7)

        def ctrl_c(self: Any, idle_ok: bool) -> None:
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(Scheduler, "_step", ctrl_c)
            with pytest.raises(KeyboardInterrupt):
                during()
        assert gc.get_threshold() == (500, 5, 7)
        # Calls that run in this process (sync, threads): their garbage is this
        # process's, and nothing is changed.
        graph = gx.Graph()
        with graph:
            seen_in_task = thresholds()
        for scheduler in ("sync", "threads"):
            assert graph.compute(scheduler=scheduler)[seen_in_task] == (500, 5, 7)
    finally:
        gc.set_threshold(*program)


@pytest.mark.skipif(
    sys.version_info >= (3, 14) or not hasattr(os, "fork"), reason="no change, or no fork"
)
def test_a_process_forked_during_a_run_has_the_programs_thresholds():
    """A worker (or zygote) forked while full collections wait lives on after the run."""
    program = gc.get_threshold()
    read, write = os.pipe()
    collector.pause_full_collections()
    try:
        assert gc.get_threshold()[2] > 1_000_000
        pid = os.fork()
        if pid == 0:  # the child: report its thresholds and leave at once
            os.write(write, repr(gc.get_threshold()).encode())
            os._exit(0)
        os.waitpid(pid, 0)
    finally:
        collector.resume_full_collections()
    os.close(write)
    with os.fdopen(read) as pipe:
        assert pipe.read() == repr(program)
    assert gc.get_threshold() == program


def test_an_empty_target_list_runs_nothing():
    # compute([]) (a selection that came out empty) ran every node, as compute() does.
    graph = gx.Graph()
    graph.add(int, 1)
    run = graph.compute([], scheduler="sync")
    assert run.nodes == [] and run.ok
    assert len(graph.compute(scheduler="sync").nodes) == 1


@pytest.mark.timeout(30)
def test_an_empty_target_list_in_a_flow_runs_nothing():
    graph = gx.Graph()
    graph.add(int, 1)

    @gx.flow(scheduler="threads", workers=1)
    def body():
        return len(graph.compute([]).nodes), len(graph.compute().nodes)

    assert body() == (0, 1)
