"""Stress: random DAGs with injected faults against an in-process oracle; no leaks (#4).

The oracle: every random graph is built twice from one seed. In the graph for
worker processes the faults are real — ``os._exit``, SIGKILL, segfaults,
sleeps past ``timeout=``, memory over ``memory_limit=``, results that do not
pickle. In the graph for ``scheduler="sync"`` each fault is replaced by raising
the exception graphexec turns it into (``WorkerCrashed``, ``TaskTimeout``,
``MemoryLimitExceeded``, ``SerializationError``). Same policies, same retries,
so every node must end in the same state with the same value, exception type,
skip cause and number of attempts — whatever order the pool ran things in.

Totals (faults injected, nodes checked, orphans found) are printed at the end
of the module; README's "Reliability" section quotes them.
"""

from __future__ import annotations

import gc
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections import Counter

import numpy as np
import psutil
import pytest
from conftest import is_spare, running

import graphexec as gx
from graphexec._data import cache
from graphexec._engine import scheduler as scheduler_module

pytestmark = pytest.mark.slow

TIMEOUT = 0.5  # seconds, for the nodes that inject timeouts
MEMORY_LIMIT = 250 * 2**20  # per worker; the memory fault holds 400 MiB
REACTING = ("all_done", "always", "any_failed", "all_failed")

TOTALS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_totals(request):
    yield
    if TOTALS:
        line = "graphexec stress: " + ", ".join(f"{k}={v}" for k, v in sorted(TOTALS.items()))
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if capture is None:
            print(line)
        else:
            with capture.global_and_fixture_disabled():  # shown even when output is captured
                print("\n" + line)


# -- the task every node runs ----------------------------------------------------


def _count_attempt(log_dir, ident):
    """Record this attempt (by worker pid) and return its number: 1 for the first."""
    path = os.path.join(log_dir, str(ident))
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        return len(f.read().split())


def _encode(value):
    """A stable description of an input: values as they are, failures by type name."""
    if isinstance(value, gx.State):
        inner = _encode(value.result()) if value.is_completed() else type(value.exception).__name__
        return ("state", value.name, inner)
    if isinstance(value, BaseException):
        return ("error", type(value).__name__)
    return value


def _crash(how):
    if how == "exit":
        os._exit(3)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    import ctypes
    import faulthandler

    faulthandler.disable()
    ctypes.string_at(0)


def _inject(fault, real, ident):
    """Do the fault (``real``), or raise what graphexec reports it as. May return a value."""
    if fault == "raise":
        raise ValueError(f"injected failure in node {ident}")
    if not real:
        stand_in = {
            "crash": gx.WorkerCrashed,
            "timeout": gx.TaskTimeout,
            "memory": gx.MemoryLimitExceeded,
            "unpicklable": gx.SerializationError,
        }
        raise stand_in[fault](f"stand-in for {fault} in node {ident}")
    if fault == "crash":
        _crash(("exit", "sigkill", "segfault")[ident % 3])
    if fault == "timeout":
        time.sleep(60)
    if fault == "memory":
        hog = np.ones(400 * 2**20 // 8)
        time.sleep(60)
        return hog
    if fault == "unpicklable":
        return threading.Lock()
    raise AssertionError(fault)


@gx.task
def step(ident, kind, real, log_dir, *inputs):
    attempt = _count_attempt(log_dir, ident)
    if kind != "ok":
        base, _, faulty_attempts = kind.partition(":")  # "crash:2": the first 2 attempts
        if not faulty_attempts or attempt <= int(faulty_attempts):
            result = _inject(base, real, ident)
            if result is not None:
                return result
    return zlib.crc32(repr((ident, [_encode(v) for v in inputs])).encode())


# -- random graphs -----------------------------------------------------------------


class Spec:
    """How one random graph was built: what the checks need to know per node."""

    def __init__(self):
        self.kinds: list[str] = []
        self.triggers: list[str] = []
        self.retries: list[int] = []
        self.accepts: list[dict[int, bool]] = []  # upstream -> this edge allows failure
        self.lenient: list[bool] = []  # call-time allow_failure or return_state
        # upstreams in wait_for of a call with the keyword allow_failure=True, which
        # covers them as if wrapped in gx.allow_failure (issue #13)
        self.waived: list[set[int]] = []


_variants: dict[tuple, gx.Task] = {}


def _variant(**options):
    key = tuple(sorted(options.items()))
    if key not in _variants:
        _variants[key] = step.with_options(**options) if options else step
    return _variants[key]


def build(seed, n, real, log_dir, *, fault_rate=0.05, max_timeouts=4, max_memory=1):
    """A random DAG of ``n`` nodes; returns (graph, nodes, spec)."""
    rng = random.Random(seed)
    graph = gx.Graph(name=f"stress-{seed}")
    nodes: list[gx.Node] = []
    spec = Spec()
    budget = {"timeout": max_timeouts, "memory": max_memory}
    with graph:
        for i in range(n):
            kind, retries = "ok", 0
            if rng.random() < fault_rate:
                base = rng.choices(
                    ["raise", "crash", "timeout", "unpicklable", "memory"],
                    weights=[40, 25, 10, 15, 3],
                )[0]
                if base in budget:
                    if budget[base] == 0:
                        base = "raise"
                    else:
                        budget[base] -= 1
                retries = rng.choice([0, 0, 1, 2])
                if base in ("raise", "crash", "timeout") and rng.random() < 0.5:
                    kind = f"{base}:{rng.choice([1, 2])}"  # flaky: fails, then succeeds
                else:
                    kind = base
            ups = sorted(set(rng.sample(range(max(0, i - 40), i), min(i, rng.randint(0, 3)))))
            args, wait, accepts, waited = [], [], {}, set()
            for up in ups:
                r = rng.random()
                allowed = r < 0.15 or 0.9 <= r < 0.95
                accepts[up] = allowed
                node = gx.allow_failure(nodes[up]) if allowed else nodes[up]
                (wait if r >= 0.8 else args).append(node)
                if r >= 0.8:
                    waited.add(up)
            options = {}
            trigger = "all_success"
            if ups and rng.random() < 0.08:
                trigger = rng.choice(
                    ["all_done", "any_failed", "none_failed", "always", "all_failed"]
                )
                options["trigger"] = trigger
            if retries:
                options["retries"] = retries
            if kind.startswith("timeout"):
                options["timeout"] = TIMEOUT
            call_kw = {}
            r = rng.random()
            if r < 0.03:
                call_kw["allow_failure"] = True
            elif r < 0.06:
                call_kw["return_state"] = True
            if wait:
                call_kw["wait_for"] = wait
            nodes.append(_variant(**options)(i, kind, real, str(log_dir), *args, **call_kw))
            spec.kinds.append(kind)
            spec.triggers.append(trigger)
            spec.retries.append(retries)
            spec.accepts.append(accepts)
            spec.lenient.append(bool(call_kw.get("allow_failure") or call_kw.get("return_state")))
            spec.waived.append(waited if call_kw.get("allow_failure") else set())
    return graph, nodes, spec


# -- checks ------------------------------------------------------------------------


def _executions(log_dir, n):
    counts, pids = [0] * n, set()
    for i in range(n):
        path = os.path.join(log_dir, str(i))
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().split()
            counts[i] = len(lines)
            pids.update(int(p) for p in lines)
    return counts, pids


def _orphans(pids, grace=5.0):
    """Worker pids still alive ``grace`` seconds after their compute returned."""
    deadline = time.monotonic() + grace
    while True:
        alive = [pid for pid in pids if running(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _describe(run, node):
    st = run.state(node)
    return (
        st.name,
        type(st.exception).__name__ if st.exception else None,
        st.upstream,
        st.attempts,
    )


class Outcome:
    """One random graph computed on worker processes, and its oracle."""

    def __init__(self, run, nodes, oracle, oracle_nodes, spec, executions, pids):
        self.run, self.nodes, self.spec = run, nodes, spec
        self.oracle, self.oracle_nodes = oracle, oracle_nodes
        self.executions, self.pids = executions, pids


def _run_pair(seed, n, where, *, fail_fast=False, pool=None, chains=False, **shape):
    """Compute the seed's real graph on processes and its stand-in graph in-process.

    ``chains``: compute as users mostly do, keeping only the sinks' values and
    with no memory limit, so that sole consumers run chained behind their
    producers (both settings turn chains off); intermediate values are then
    checked through the sinks, whose values hash all their inputs.
    """
    real_dir, sync_dir = where / "real", where / "sync"
    real_dir.mkdir(parents=True)
    sync_dir.mkdir()
    graph, nodes, spec = build(seed, n, True, real_dir, **shape)
    oracle_graph, oracle_nodes, _ = build(seed, n, False, sync_dir, **shape)
    oracle = oracle_graph.compute(
        scheduler="sync", keep="all", raise_on_failure=False, fail_fast=fail_fast
    )
    started = time.monotonic()
    placement = {"pool": pool} if pool is not None else {"workers": 2}
    settings = {"keep": "targets"} if chains else {"keep": "all", "memory_limit": MEMORY_LIMIT}
    run = graph.compute(raise_on_failure=False, fail_fast=fail_fast, **settings, **placement)
    elapsed = time.monotonic() - started
    executions, pids = _executions(real_dir, n)
    faults = Counter()
    for node in nodes:
        for attempt in run.state(node).history:
            if attempt.error is not None and not isinstance(attempt.error, gx.Cancelled):
                faults[type(attempt.error).__name__] += 1
    TOTALS["graphs"] += 1
    TOTALS["nodes checked"] += n
    TOTALS["faulty nodes"] += sum(k != "ok" for k in spec.kinds)
    TOTALS["faults injected"] += sum(faults.values())
    TOTALS["worker crashes"] += faults["WorkerCrashed"]
    TOTALS["timeouts"] += faults["TaskTimeout"]
    TOTALS["memory kills"] += faults["MemoryLimitExceeded"]
    TOTALS["seconds"] += round(elapsed)
    return Outcome(run, nodes, oracle, oracle_nodes, spec, executions, pids)


def _no_orphans(pids):
    orphans = _orphans(pids)
    TOTALS["worker processes"] += len(pids)
    TOTALS["orphans found"] += len(orphans)
    assert orphans == [], f"worker processes outlived the run: {orphans}"


def _check_common(run, nodes, spec, executions):
    """What holds with or without fail_fast."""
    for i, node in enumerate(nodes):
        state = run.state(node)
        assert state.is_final(), f"{node.name} ended {state.name}"
        assert executions[i] <= spec.retries[i] + 1, f"{node.name} ran {executions[i]} times"
        assert executions[i] <= state.attempts
        if state.name == "Completed":
            assert executions[i] == state.attempts, f"{node.name}: attempts not as run"
        if state.name == "Failed":
            assert spec.kinds[i] != "ok", (
                f"healthy {node.name} failed: {state.exception!r}\n{state.exception.__cause__}"
            )


def _check_against_oracle(o):
    run, nodes, oracle, executions, spec = o.run, o.nodes, o.oracle, o.executions, o.spec
    _check_common(run, nodes, spec, executions)
    mismatches = []
    for i, (node, twin) in enumerate(zip(nodes, o.oracle_nodes)):
        got, want = _describe(run, node), _describe(oracle, twin)
        if got != want:
            mismatches.append(f"{node.name} ({spec.kinds[i]}): {got} != oracle {want}")
        elif got[0] == "Completed" and not run.state(node).released and run[node] != oracle[twin]:
            mismatches.append(f"{node.name}: value {run[node]!r} != oracle {oracle[twin]!r}")
        if got[0] not in ("Skipped", "Cancelled") and executions[i] != got[3]:
            mismatches.append(f"{node.name}: ran {executions[i]} times, {got[3]} attempts")
    assert mismatches == [], "\n".join(mismatches[:20])
    TOTALS["nodes matched to the oracle"] += len(nodes)
    states = Counter(run.state(n).name for n in nodes)
    assert states["Failed"] and states["Skipped"] and states["Completed"] > len(nodes) // 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2])
def test_random_faulty_graphs_end_as_the_oracle_says(tmp_path, seed):
    outcome = _run_pair(seed, 2500, tmp_path)
    _no_orphans(outcome.pids)
    _check_against_oracle(outcome)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [5, 6])
def test_random_faulty_graphs_with_chains_end_as_the_oracle_says(tmp_path, seed, monkeypatch):
    chained = []
    real_chain = scheduler_module.build_chain

    def counting(sched, i):  # a spy: the chains the scheduler builds, unchanged
        chain = real_chain(sched, i)
        chained.append(len(chain or ()))
        return chain

    monkeypatch.setattr(scheduler_module, "build_chain", counting)
    outcome = _run_pair(seed, 2500, tmp_path, chains=True, max_memory=0)
    _no_orphans(outcome.pids)
    _check_against_oracle(outcome)
    TOTALS["chained calls"] += sum(chained)
    assert sum(chained) > 100, "the random graph should have run many calls chained"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [3, 4])
def test_one_warm_pool_goes_through_faulty_graphs_one_after_another(tmp_path, seed):
    pids = set()
    with gx.Pool(workers=2) as pool:
        for round_ in range(2):
            outcome = _run_pair(seed * 10 + round_, 1200, tmp_path / str(round_), pool=pool)
            pids |= outcome.pids
            _check_against_oracle(outcome)
    _no_orphans(pids)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15])
def test_random_faulty_graphs_with_fail_fast(tmp_path, seed):
    o = _run_pair(seed, 1500, tmp_path, fail_fast=True, fault_rate=0.01)
    _no_orphans(o.pids)
    run, nodes, oracle, oracle_nodes, spec = o.run, o.nodes, o.oracle, o.oracle_nodes, o.spec
    _check_common(run, nodes, spec, o.executions)
    index = {node.name: i for i, node in enumerate(nodes)}
    states = [run.state(n) for n in nodes]
    failed = [i for i, st in enumerate(states) if st.name == "Failed"]
    cancelled = [i for i, st in enumerate(states) if st.name == "Cancelled"]
    assert failed, "every seed injects failures"
    if cancelled:  # the run was cancelled: by a failure nothing accepted
        assert any(not spec.lenient[i] for i in failed)
    for i, st in enumerate(states):
        if st.name != "Completed":
            continue
        ups = spec.accepts[i]
        trigger = spec.triggers[i]
        for up, allowed in ups.items():
            up_state = states[up]
            if up_state.is_completed() or trigger in REACTING:
                continue
            # A Completed node ran although this upstream did not succeed: its edge,
            # its own call keyword allow_failure=True over its wait_for, or the
            # upstream's own call-time policy accepted that (all_success), or the
            # upstream was skipped by an unmet trigger, not by a failure (none_failed).
            if trigger == "all_success":
                accepted = allowed or up in spec.waived[i] or spec.lenient[up]
            else:
                accepted = up_state.name == "Skipped" and up_state.upstream is None
            assert accepted, (
                f"{nodes[i].name} ({trigger}) completed after {nodes[up].name} "
                f"ended {up_state.name}"
            )
        # Where every input ended as in the oracle, the value must be the oracle's.
        same_inputs = all(
            _describe(run, nodes[up])[:3] == _describe(oracle, oracle_nodes[up])[:3]
            and (not states[up].is_completed() or run[nodes[up]] == oracle[oracle_nodes[up]])
            for up in ups
        )
        if same_inputs and oracle.state(oracle_nodes[i]).name == "Completed":
            assert run[nodes[i]] == oracle[oracle_nodes[i]], nodes[i].name
    assert all(
        states[index[s.upstream]].name == "Failed"
        for s in states
        if s.name == "Skipped" and s.upstream is not None
    )


@pytest.mark.timeout(120)
def test_retries_turn_flaky_faults_into_successes(tmp_path):
    # Every fault flaky, every faulty node retried enough: nothing may fail.
    graph = gx.Graph()
    log_dir = tmp_path / "flaky"
    log_dir.mkdir()
    kinds = ["crash:2", "timeout:1", "raise:2", "crash:1"] * 5
    with graph:
        flaky = [
            step.with_options(retries=2, timeout=TIMEOUT)(i, kind, True, str(log_dir))
            for i, kind in enumerate(kinds)
        ]
        total = step(len(kinds), "ok", True, str(log_dir), *flaky)
    run = graph.compute(workers=2, keep="all")
    assert [run.state(n).attempts for n in flaky] == [int(k[-1]) + 1 for k in kinds]
    assert run.state(total).name == "Completed"
    TOTALS["faults injected"] += sum(int(k[-1]) for k in kinds)
    TOTALS["nodes checked"] += len(kinds) + 1


# -- leaks ---------------------------------------------------------------------------


@gx.task
def array_of(i):
    return np.full(200_000, float(i))  # 1.6 MB: travels in shared memory


@gx.task
def mean(a):
    return float(a.mean())


@gx.task
def dies():
    os._exit(9)


@gx.task
def raises():
    raise ValueError("planned")


@gx.task
def nap(i):
    time.sleep(0.05)
    return i


def _leak_graph():
    graph = gx.Graph()
    with graph:
        arrays = [array_of(i) for i in range(4)]
        # Two consumers each: the arrays cross workers through /dev/shm (a sole
        # consumer would take its array in memory, in a chain).
        means = [mean(a) for a in arrays] + [mean(a) for a in arrays]
        dies()
        raises()
    return graph, means


def _resources():
    me = psutil.Process()
    ours = f"gx-{os.getpid()}-"
    shm = (
        sorted(n for n in os.listdir("/dev/shm") if n.startswith(ours))
        if os.path.isdir("/dev/shm")
        else []
    )
    # (not the servers' spares: at most two each, forked as workers exit, so their
    # number at a given moment depends on the order of the last exits)
    children = [p for p in me.children(recursive=True) if running(p.pid) and not is_spare(p)]
    return {
        "fds": me.num_fds(),
        "threads": me.num_threads(),
        "children": len(children),
        "shm": len(shm),
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("warm", [False, True], ids=["fresh pool", "warm pool"])
def test_fifty_computes_leak_nothing(warm):
    graph, means = _leak_graph()

    def compute(pool):
        kw = {"pool": pool} if pool is not None else {"workers": 2}
        run = graph.compute(raise_on_failure=False, **kw)
        assert [run[m] for m in means] == [0.0, 1.0, 2.0, 3.0] * 2
        assert {type(run.state(n).exception) for n in run.failed} == {gx.WorkerCrashed, ValueError}

    naps = gx.Graph()
    with naps:
        [nap(i) for i in range(2)]

    def settled(pool):
        # A warm pool replaces a crashed worker when it next has work for it: give
        # it two parallel tasks so it is back to two workers whenever we measure.
        if pool is not None:
            naps.compute(pool=pool)
        gc.collect()
        return _resources()

    def measure(pool):
        for _ in range(3):
            compute(pool)
        before = settled(pool)
        for _ in range(50):
            compute(pool)
        after = settled(pool)
        deadline = time.monotonic() + 3
        while after != before and time.monotonic() < deadline:
            time.sleep(0.1)  # a replaced worker may not be reaped yet
            after = settled(pool)
        return before, after

    if warm:
        with gx.Pool(workers=2) as pool:
            before, after = measure(pool)
    else:
        before, after = measure(None)
    assert after == before
    assert after["shm"] == 0


# -- deep, wide, and a full disk (#18: measured, and kept) ------------------------------


@gx.task
def plus_one(x):
    return x + 1


@gx.task
def count(*values):
    return len(values), sum(values)


@pytest.mark.timeout(120)
def test_a_20000_node_chain():
    graph = gx.Graph()
    with graph:
        x = plus_one(0)
        for _ in range(19_999):
            x = plus_one(x)
    run = graph.compute(workers=2)
    assert run[x] == 20_000
    assert len(run.completed) == 20_000


@pytest.mark.timeout(120)
def test_a_node_with_20000_inputs():
    graph = gx.Graph()
    with graph:
        total = count(*[plus_one(i) for i in range(20_000)])
    run = graph.compute(workers=2)
    assert run[total] == (20_000, sum(range(1, 20_001)))


FULL_DISK = textwrap.dedent(
    """
    import errno, logging, os, sys
    import numpy as np
    import graphexec as gx
    from graphexec._data import cache

    logging.basicConfig()  # graphexec's warnings reach stderr, as in a configured program

    def disk_full():
        # In each worker: the writer of a large entry's file fails its fsync
        # as on a full disk.
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync = fsync

    # Small entries are rows this process commits in batches (one transaction
    # each): the database write fails the same way here.
    def write(self, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    cache._Shared.write = write

    @gx.task(cache=True)
    def square(i):
        return i * i

    @gx.task(cache=True)
    def big(i):
        return np.full(100_000, i, dtype=np.float64)  # 800 kB: a file of its own

    graph = gx.Graph()
    with graph:
        nodes = [square(i) for i in range(4)]
        arrays = [big(i) for i in range(2)]
    with gx.Pool(workers=2, initializer=disk_full) as pool:
        run = graph.compute(pool=pool, keep="all", cache_dir=sys.argv[1])
    print("VALUES", [run[n] for n in nodes], [float(run[a][0]) for a in arrays], flush=True)
    print("STATES", sorted({run.state(n).name for n in [*nodes, *arrays]}), flush=True)
    """
)


@pytest.mark.timeout(120)
def test_a_full_disk_costs_the_cache_entries_never_the_results(tmp_path):
    cache_dir = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.returncode == 0, proc.stderr
    assert "VALUES [0, 1, 4, 9] [0.0, 1.0]" in proc.stdout
    assert "STATES ['Completed']" in proc.stdout
    enospc = r"\(OSError: \[Errno 28\] No space left on device\)"
    for i in range(2):
        # A large entry is written by its worker: the node says so on the
        # worker's stderr, prefixed with its name.
        assert re.search(rf"\[big-{i}\] .*big-{i}: result not cached {enospc}", proc.stderr), (
            proc.stderr
        )
    # The small entries' batches (one, or a few) say how many were not written, and why.
    counts = re.findall(rf"(\d+) cache entries not written to .* {enospc}", proc.stderr)
    assert sum(map(int, counts)) == 4, proc.stderr
    # Nothing half-written stays behind: no entry file, no row.
    assert not [p for p in cache_dir.rglob("*.gxb")]
    assert cache.CacheStore(cache_dir).entries() == []
