"""compute(cluster=distributed.Client(...)) (SPEC §8): same states and policies on dask.

One ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` serves
the whole session (``dask_client`` in conftest.py; it starts in about a
second, with the first test that needs it). Its worker processes are children
of the test process and outlive each test on purpose: the suite's leak check
lets them be (a process a test starts must still be gone after it), and
checks that closing the cluster, after the last test that needs it, left
nothing behind.

Tasks here run on dask workers, which import this module by name; counters
and markers live in files under ``tmp_path`` (the workers share the
filesystem). A timed-out task keeps its worker thread until it returns, so
such tasks sleep briefly.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import traceback
import warnings

import pytest

import graphexec as gx
from graphexec._executors import cluster as _cluster
from graphexec._executors.protocol import Call

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(60)

LEAK_GRACE = 5.0  # seconds: a crashed worker's replacement may still be starting


# -- the cluster ---------------------------------------------------------------------------


@pytest.fixture
def client(dask_client: distributed.Client) -> distributed.Client:
    """The session's cluster (conftest.py), under the name these tests use."""
    return dask_client


def _cluster_pids(client) -> set[int]:
    try:
        return set(client.run(os.getpid, wait=True).values())
    except Exception:
        return set()


def describe(value):
    """What a dependent received, as plain data."""
    if isinstance(value, gx.State):
        exc = type(value.exception).__name__ if value.exception is not None else None
        payload = value.result() if value.is_completed() else None
        return ("state", value.name, exc, value.upstream, payload)
    if isinstance(value, gx.UpstreamFailed):
        return ("upstream_failed", value.upstream)
    if isinstance(value, BaseException):
        return ("exc", type(value).__name__, str(value))
    return ("value", value)


# -- tasks (imported by name on the dask workers) --------------------------------------------


@gx.task
def ok(x=1):
    return x


@gx.task
def add(*xs):
    return sum(xs)


@gx.task
def first(x, *_):
    return x


@gx.task
def explode(message="boom"):
    raise ValueError(message)


@gx.task
def collect(*values):
    return [describe(v) for v in values]


@gx.task
def collect_items(items):
    return [describe(v) for v in items]


@gx.task
def shape(nested, scale=1):
    return {"sum": sum(nested["xs"]) * scale, "pair": nested["pair"], "n": len(nested["xs"])}


@gx.task(allow_failure=True)
def fragile(message="fragile broke"):
    raise ValueError(message)


@gx.task(return_state=True)
def stateful(x):
    return x


@gx.task(return_state=True)
def stateful_fail(message="stateful broke"):
    raise KeyError(message)


@gx.task
def nap(seconds):
    time.sleep(seconds)
    return seconds


@gx.task
def explode_after(seconds):
    time.sleep(seconds)
    raise RuntimeError("late failure")


@gx.task
def touch(path, *_):
    with open(path, "a") as f:
        f.write("x")
    return path


def read(path):
    with open(path) as f:
        return f.read()


def bump(path):
    try:
        with open(path) as f:
            count = int(f.read() or 0)
    except FileNotFoundError:
        count = 0
    with open(path, "w") as f:
        f.write(str(count + 1))
    return count + 1


@gx.task
def flaky(path, fails):
    n = bump(path)
    if n <= fails:
        raise ValueError(f"attempt {n} failed")
    return n


@gx.task
def where():
    return os.getpid()


@gx.task
def exit_now(code=3):
    os._exit(code)


@gx.task
def sigkill_after(seconds):
    time.sleep(seconds)
    os.kill(os.getpid(), signal.SIGKILL)


@gx.task
def make_lock():
    return threading.Lock()


@gx.task
def counted(path, x):
    bump(path)
    return x * 2


@gx.task
def array(n, seed):
    import numpy as np

    return np.random.default_rng(seed).random(n)


@gx.task
def total(*arrays):
    return float(sum(a.sum() for a in arrays))


# -- values, data movement --------------------------------------------------------------------


def test_values_nesting_and_kwargs(client):
    graph = gx.Graph()
    with graph:
        a, b = ok(2), ok(3)
        s = add(a, b, ok(5))
        out = shape({"xs": [a, b, s], "pair": (a, "lit")}, scale=ok(10))
    run = graph.compute(cluster=client)
    assert run.ok
    assert run[out] == {"sum": (2 + 3 + 10) * 10, "pair": (2, "lit"), "n": 3}
    assert run.state(out).name == "Completed"
    assert run.state(out).attempts == 1
    worker = run.state(out).history[0].worker
    assert isinstance(worker, str) and worker.startswith("tcp://")


def test_tasks_run_on_the_cluster_workers(client):
    graph = gx.Graph()
    with graph:
        pids = [where() for _ in range(4)]
    run = graph.compute(cluster=client)
    ran_on = {run[p] for p in pids}
    assert os.getpid() not in ran_on
    assert ran_on <= _cluster_pids(client)


def test_values_stay_on_the_cluster_until_read(client):
    pytest.importorskip("numpy")
    gc.collect()  # runs of earlier tests (a Graph and its Run refer to each other)
    before = _cluster.held_values()
    graph = gx.Graph()
    with graph:
        parts = [array(200_000, seed) for seed in range(3)]
        result = total(*parts)
    run = graph.compute(cluster=client, keep="all")
    for node in (*parts, result):
        handle = run.state(node)._value
        # a reference to the value on the cluster, not 1.6 MB of array
        assert type(handle) is gx._data.serialize.Payload and len(handle.data) < 512
    assert _cluster.held_values() == before + 4
    assert run[parts[0]].shape == (200_000,)
    assert run[result] == pytest.approx(sum(run[p].sum() for p in parts))
    del run, handle
    graph._latest_run = None
    gc.collect()
    assert _cluster.held_values() == before  # the Run is gone: so are its values


def test_a_value_read_after_its_client_closed_says_so(client):
    # It raised SerializationError "could not be unpickled ... is every module its
    # value needs importable here?": the wrong way to look.
    own = distributed.Client(client.scheduler.address, set_as_default=False)
    try:
        graph = gx.Graph()
        with graph:
            node = add(ok(1), 2)
        run = graph.compute(cluster=own, keep="all")
    finally:
        own.close()
    with pytest.raises(gx.ResultReleased, match="before closing the Client"):
        run[node]


def test_intermediates_are_released_on_the_cluster(client):
    gc.collect()
    before = _cluster.held_values()
    graph = gx.Graph()
    with graph:
        chain = ok(1)
        for _ in range(5):
            chain = add(chain, ok(1))
    run = graph.compute(cluster=client)
    assert run[chain] == 6
    assert _cluster.held_values() == before + 1  # only the target is held


# -- chains: a sole consumer goes to dask with the call it follows (issue #14) ---------------


def _spy_sends(monkeypatch) -> list[tuple[str, float, bool]]:
    """(call name, when, chained) of every call the executor hands dask."""
    sent: list[tuple[str, float, bool]] = []
    send = _cluster.ClusterExecutor._send

    def spy(self, call, after, feeds=False):
        sent.append((call.name, time.monotonic(), after is not None))
        return send(self, call, after, feeds)

    monkeypatch.setattr(_cluster.ClusterExecutor, "_send", spy)
    return sent


def test_a_chain_goes_to_dask_whole_and_its_values_stay_there(client, monkeypatch):
    """No round trip through this process between the calls of a chain: each goes to
    dask with the Future of the one before, before that one has finished."""
    sent = _spy_sends(monkeypatch)
    gc.collect()
    before = _cluster.held_values()
    graph = gx.Graph()
    with graph:
        head = nap(0.5)
        middle = ok(head)
        last = add(middle, 1)
    start = time.monotonic()
    run = graph.compute(cluster=client)
    assert run[last] == 1.5
    assert [(name, chained) for name, _, chained in sent] == [
        (head.name, False),
        (middle.name, True),
        (last.name, True),
    ]
    assert sent[-1][1] - start < 0.4  # all sent while the head still slept
    assert run.state(head).name == run.state(middle).name == "Completed"
    assert _cluster.held_values() == before + 1  # the chain's values never came here


def test_a_failure_in_a_chain_cancels_the_calls_behind_it(client, monkeypatch, tmp_path):
    sent = _spy_sends(monkeypatch)
    marker = str(tmp_path / "ran")
    graph = gx.Graph()
    with graph:
        head = ok("head broke")
        broken = explode(head)
        behind = touch(marker, broken)
        after_that = ok(behind)
        independent = ok(5)
    run = graph.compute(cluster=client, raise_on_failure=False)
    assert [name for name, _, chained in sent if chained] == [
        broken.name,
        behind.name,
        after_that.name,
    ]
    assert run.state(head).name == "Completed"
    assert run.failed == [broken]
    assert str(run.state(broken).exception) == "head broke"
    assert run.skipped == [behind, after_that]
    assert run.state(after_that).upstream == broken.name
    assert run[independent] == 5
    assert not os.path.exists(marker)  # never ran on the cluster


def test_a_chained_call_that_raises_keeps_its_input_for_replay(client, monkeypatch):
    sent = _spy_sends(monkeypatch)
    gc.collect()
    before = _cluster.held_values()
    graph = gx.Graph()
    with graph:
        head = ok(41)
        broken = explode(head)
    run = graph.compute(cluster=client, raise_on_failure=False)
    assert (broken.name, True) in [(name, chained) for name, _, chained in sent]
    assert run.failed == [broken]
    # The run keeps its own copy of the failed node's input: none stays on the cluster.
    assert _cluster.held_values() == before
    assert run.inputs(broken) == ((41,), {})  # fetched from the cluster
    with pytest.raises(ValueError, match="41"):
        run.replay(broken)


def test_a_retried_head_sends_its_chain_again(client, monkeypatch, tmp_path):
    sent = _spy_sends(monkeypatch)
    graph = gx.Graph()
    with graph:
        head = flaky.with_options(retries=1)(str(tmp_path / "count"), 1)
        middle = ok(head)
        last = add(middle, 10)
    run = graph.compute(cluster=client)
    assert run[last] == 12  # the second attempt returned 2
    assert run.state(head).attempts == 2
    names = [name for name, _, _ in sent]
    assert names.count(head.name) == 2 and names.count(last.name) == 2


def _chain_of_two():
    """An executor with no cluster behind it, and a chain of two flights on it."""
    from graphexec._executors.protocol import Deadlines

    ex = object.__new__(_cluster.ClusterExecutor)
    ex._inflight, ex._behind, ex._early, ex._held = {}, {}, {}, {}
    ex._deadlines, ex._lost = Deadlines(), set()
    ex.cancelled = []
    ex._cancel = ex.cancelled.extend
    calls = [Call(k, name, None, (), None, False, {}, None, 1) for k, name in enumerate("pc")]
    head, behind = (_cluster._Flight(c, f"future-{c.name}", c.name, [], "f") for c in calls)
    ex._behind[id(head.call)] = behind
    ex._before = {id(behind.call): head.call}
    ex._sources = {id(behind.call): ("future-p", "p", "p")}
    ex._inflight.update({"p": head, "c": behind})
    return ex, head.call, behind.call


def test_a_chained_calls_outcome_never_comes_before_the_one_it_follows():
    """dask may report the death of the worker running the second call before the
    result of the first: the scheduler starts the second at the first's outcome."""
    from graphexec._executors.protocol import ERROR, HELD, OK

    ex, head, behind = _chain_of_two()
    crashed = (behind, ERROR, gx.WorkerCrashed("died", node="c"))
    assert ex._in_chain_order([crashed]) == []  # waits for the head's outcome
    assert ex._in_chain_order([(head, OK, HELD)]) == [(head, OK, HELD), crashed]
    assert not ex._behind and not ex._early

    ex, head, behind = _chain_of_two()  # both in one poll
    crashed = (behind, ERROR, gx.WorkerCrashed("died", node="c"))
    assert ex._in_chain_order([crashed, (head, OK, HELD)]) == [(head, OK, HELD), crashed]


def test_a_failed_call_cancels_the_chain_behind_it_on_the_cluster():
    from graphexec._executors.protocol import ERROR, HELD

    for order in ("behind first", "head first"):  # both "done" in one poll
        ex, head, behind = _chain_of_two()
        behind.inputs = {0: HELD}
        early = (behind, ERROR, ValueError("its input was a failure"))
        failed = (head, ERROR, ValueError("boom"))
        both = [early, failed] if order == "behind first" else [failed, early]
        assert ex._in_chain_order(both) == [failed], order  # nothing of the chain
        assert ex.cancelled == ["future-c"]
        assert "c" not in ex._inflight
        assert not ex._behind and not ex._early and not ex._sources and not ex._before
        assert behind.inputs == {0: HELD} and not ex._held  # nothing taken back for it


def test_a_call_dask_cannot_take_fails_its_own_node_and_ends_its_chain(client, monkeypatch):
    """A scatter of a large argument that fails (the cluster going away) is the
    node's, never the compute's: a chained call that cannot be sent ends the chain
    before it, and fails when it is sent on its own."""
    large = _cluster.ClusterExecutor._large

    def failing(self, blob):
        if blob is not None and len(blob) >= _cluster.SCATTER_BYTES:
            raise OSError("the scheduler went away")
        return large(self, blob)

    monkeypatch.setattr(_cluster.ClusterExecutor, "_large", failing)
    graph = gx.Graph()
    with graph:
        head = ok(1)
        behind = first(head, b"x" * 2_000_000)  # an argument past SCATTER_BYTES
    run = graph.compute(cluster=client, raise_on_failure=False)
    assert run.state(head).name == "Completed"
    exc = run.state(behind).exception
    assert type(exc) is gx.WorkerCrashed
    assert "could not be sent to the dask cluster: OSError: the scheduler went away" in str(exc)


def test_a_call_with_a_timeout_sends_no_chain(client, monkeypatch, tmp_path):
    """Its deadline is judged here: dask could start the next call with its value
    before the cancel reached it, and that call would run for a Skipped node."""
    sent = _spy_sends(monkeypatch)
    graph = gx.Graph()
    with graph:
        head = nap.with_options(timeout=5)(0.05)
        behind = ok(head)
    run = graph.compute(cluster=client)
    assert run[behind] == 0.05
    assert [(name, chained) for name, _, chained in sent] == [
        (head.name, False),
        (behind.name, False),
    ]


def test_each_dask_task_carries_graphexec_order_as_its_priority(client, monkeypatch):
    """A worker runs the tasks queued on it by dask priority: a dependent submitted
    once its input is ready must outrank the independent calls submitted before it
    (issue #14: W4 lost 40 % to sorts waiting behind later arrays), and priority=
    outranks everything."""
    sent: dict[str, int] = {}
    submit = client.submit

    def recording(*args, **kwargs):
        sent[kwargs["key"].split("-", 1)[0]] = kwargs["priority"]
        return submit(*args, **kwargs)

    monkeypatch.setattr(client, "submit", recording)
    graph = gx.Graph()
    with graph:
        firsts = [ok.with_options(name=f"first{i}")(i) for i in range(4)]
        seconds = [add.with_options(name=f"second{i}")(f, 1) for i, f in enumerate(firsts)]
        urgent = ok.with_options(name="urgent", priority=3)(9)
    run = graph.compute(cluster=client)
    assert [run[n] for n in seconds] == [1, 2, 3, 4] and run[urgent] == 9
    assert len(sent) == 9, sent
    assert sent["urgent"] == max(sent.values())
    for i in range(4):
        # depth first: each pair before the next pair, a second right after its first
        assert sent[f"first{i}"] > sent[f"second{i}"]
        assert all(sent[f"second{i}"] > sent[f"first{j}"] for j in range(i + 1, 4))


# -- attributing a worker's death (issue #14): events fed to the executor, no cluster ------


class _FakeFuture:
    """What the executor reads of a dask Future."""

    def __init__(self, key, status="pending"):
        self.key = key
        self.status = status
        self.type = int


class _FakeClient:
    """Just enough of a distributed.Client for a ClusterExecutor and its hub."""

    def __init__(self):
        self.id = f"fake-{id(self)}"
        self._event_handlers = {}
        self.cancelled = []

    def nthreads(self):
        return {"tcp://a": 1, "tcp://b": 1, "tcp://c": 1}

    def subscribe_topic(self, topic, handler):
        self._event_handlers[topic] = handler

    def unsubscribe_topic(self, topic):
        self._event_handlers.pop(topic, None)

    def cancel(self, futures):
        self.cancelled.extend(f.key for f in futures)

    def started(self, executor, key, worker):
        """The event ``_run_remote`` sends when it starts, as the dask scheduler relays it."""
        self._event_handlers[_cluster.START_TOPIC](
            (time.time(), {"x": executor.id, "k": key, "t": time.time(), "worker": worker})
        )

    def removed(self, worker, processing):
        """The dask scheduler removed ``worker``, which had ``processing`` assigned."""
        msg = {
            "action": "remove-worker",
            "processing-tasks": set(processing),
            "expected": False,
            "worker": worker,
        }
        self._event_handlers["all"]((time.time(), msg))


@pytest.fixture
def ledger(monkeypatch):
    """A fresh record of crashers: what earlier tests left must not explain these deaths."""
    fresh = _cluster._CrashLedger()
    monkeypatch.setattr(_cluster, "_ledger", fresh)
    return fresh


@pytest.fixture
def fake():
    client = _FakeClient()
    executors = []

    def executor(*keys):
        """A ClusterExecutor with a call in flight for each key (node i for the i-th key)."""
        ex = _cluster.ClusterExecutor(client)
        for node, key in enumerate(keys):
            call = Call(node, key.split("-")[0], None, (), None, False, {}, None, 1)
            ex._inflight[key] = _cluster._Flight(call, _FakeFuture(key), key, [], "f")
        executors.append(ex)
        return ex

    yield client, executor
    for ex in executors:
        ex.close()


def _blamed(outcomes):
    return [
        call.name
        for call, status, error in outcomes
        if status == _cluster.ERROR and type(error) is gx.WorkerCrashed
    ]


def test_a_crashers_rerun_dropped_from_the_scheduler_blames_no_healthy_node(ledger, fake):
    """The race of issue #14, step by step as the failing run logged it: ``crash``
    kills worker A and fails; graphexec cancels its future; dask had already given
    it to worker B, which finished ``double`` (its report not yet out) and started
    the re-run before the cancel reached it. The scheduler, having processed the
    cancel, lists only ``double`` in B's tasks when B dies."""
    client, executor = fake
    ex = executor("crash-k", "double-h")
    client.started(ex, "crash-k", "tcp://a")
    client.started(ex, "double-h", "tcp://b")
    assert ex.poll(0) == []
    client.removed("tcp://a", {"crash-k"})
    outcomes = ex.poll(0)
    assert _blamed(outcomes) == ["crash"]
    assert "tcp://a" in str(outcomes[0][2])
    assert client.cancelled == ["crash-k"]
    client.removed("tcp://b", {"double-h"})  # the re-run's start event died with B
    assert ex.poll(0) == []  # put down to the crasher: double-h is not failed
    assert "double-h" in ex._inflight and client.cancelled == ["crash-k"]
    # dask runs double-h again elsewhere, and it completes
    client.started(ex, "double-h", "tcp://c")
    ex._inflight["double-h"].future.status = "finished"
    ex._inbox.put(("done", "double-h"))
    ex._inbox.put(("done", "crash-k"))  # the cancelled future: its node failed already
    ((call, status, value),) = ex.poll(0)
    assert (call.name, status, type(value)) == ("double", _cluster.OK, _cluster.Payload)
    assert ex._inflight == {}


def test_a_crashers_rerun_seen_starting_explains_that_workers_death_only(ledger, fake, monkeypatch):
    """A start event of a failed crasher names the worker its re-run killed, however
    long after the cancel that worker dies; a death elsewhere is not its."""
    monkeypatch.setattr(_cluster, "CRASHER_GRACE", -1.0)  # no benefit of the doubt
    client, executor = fake
    ex = executor("crash-k", "double-h", "double-i")
    client.started(ex, "crash-k", "tcp://a")
    client.started(ex, "double-h", "tcp://b")
    client.started(ex, "double-i", "tcp://c")
    client.removed("tcp://a", {"crash-k"})
    assert _blamed(ex.poll(0)) == ["crash"]
    client.started(ex, "crash-k", "tcp://b")  # dask re-ran it on B before the cancel
    client.removed("tcp://b", {"double-h"})
    assert ex.poll(0) == [] and "double-h" in ex._inflight
    client.removed("tcp://c", {"double-i"})  # nothing ties this death to the crasher
    assert _blamed(ex.poll(0)) == ["double"]
    assert "double-i" not in ex._inflight and "double-h" in ex._inflight


def test_a_crasher_still_listed_on_the_dead_worker_blames_no_other_node(ledger, fake):
    """The scheduler had not processed the cancel yet: it lists the re-run on B."""
    client, executor = fake
    ex = executor("crash-k", "double-h")
    client.started(ex, "crash-k", "tcp://a")
    client.removed("tcp://a", {"crash-k"})
    assert _blamed(ex.poll(0)) == ["crash"]
    client.started(ex, "double-h", "tcp://b")
    client.removed("tcp://b", {"crash-k", "double-h"})
    assert ex.poll(0) == [] and "double-h" in ex._inflight


def test_an_unseen_rerun_explains_one_death_only(ledger, fake):
    """Without a start event, a crasher is given at most one death (dask runs a task
    on one worker at a time), and only one that comes within CRASHER_GRACE of its
    cancel (next test): a later crash is its own task's."""
    client, executor = fake
    ex = executor("crash-k", "double-h", "sink-s")
    client.started(ex, "crash-k", "tcp://a")
    client.started(ex, "double-h", "tcp://b")
    client.removed("tcp://a", {"crash-k"})
    assert _blamed(ex.poll(0)) == ["crash"]
    client.removed("tcp://b", {"double-h"})
    assert ex.poll(0) == []  # within the grace: the crasher's re-run's
    client.started(ex, "sink-s", "tcp://c")
    client.removed("tcp://c", {"sink-s"})
    assert _blamed(ex.poll(0)) == ["sink"]  # the crasher's one unseen death is used up
    assert list(ledger.loose) == ["sink-s"]


def test_an_unseen_rerun_explains_no_death_long_after_its_cancel(ledger, fake, monkeypatch):
    monkeypatch.setattr(_cluster, "CRASHER_GRACE", -1.0)  # its cancel went through long ago
    client, executor = fake
    ex = executor("crash-k", "double-h")
    client.started(ex, "crash-k", "tcp://a")
    client.started(ex, "double-h", "tcp://b")
    client.removed("tcp://a", {"crash-k"})
    assert _blamed(ex.poll(0)) == ["crash"]
    client.removed("tcp://b", {"double-h"})
    assert _blamed(ex.poll(0)) == ["double"]
    assert list(ledger.loose) == ["double-h"]  # the expired crasher is forgotten


def test_an_instant_crasher_never_seen_starting_blames_no_healthy_node(ledger, fake):
    """A task that kills its worker at once is never seen to start: the first death
    has no known cause. dask runs it again on a worker that had just finished a
    healthy task (its report lost with the worker): that death is the suspect's too.
    The crasher fails once, when dask gives up (KilledWorker); the healthy task runs
    again and completes."""
    client, executor = fake
    ex = executor("exit_now-x", "ok-h")
    client.removed("tcp://a", {"exit_now-x"})
    assert ex.poll(0) == [] and set(ledger.suspects) == {"exit_now-x"}
    client.started(ex, "ok-h", "tcp://b")
    client.removed("tcp://b", {"exit_now-x", "ok-h"})
    assert ex.poll(0) == [] and set(ex._inflight) == {"exit_now-x", "ok-h"}
    client.started(ex, "ok-h", "tcp://c")
    assert set(ledger.suspects) == {"exit_now-x"}
    healthy = ex._inflight["ok-h"].future
    healthy.status = "finished"
    crasher = ex._inflight["exit_now-x"].future
    crasher.status = "error"
    killed = distributed.KilledWorker("exit_now-x", "tcp://d", 3)
    crasher.exception = lambda: killed
    ex._inbox.put(("done", "ok-h"))
    ex._inbox.put(("done", "exit_now-x"))
    outcomes = {call.name: (status, value) for call, status, value in ex.poll(0)}
    assert outcomes["ok"][0] == _cluster.OK
    status, error = outcomes["exit_now"]
    assert status == _cluster.ERROR and type(error) is gx.WorkerCrashed
    assert "KilledWorker" in str(error)
    assert not ledger.suspects


def test_a_suspect_seen_starting_is_blamed_for_its_own_crash(ledger, fake):
    """A suspect seen starting is a plain task again: when the worker it started
    on dies with it, it is blamed, not let off as a suspect."""
    client, executor = fake
    ex = executor("crash-q", "double-h")
    client.removed("tcp://a", {"crash-q"})  # it died before its start event got out
    assert ex.poll(0) == [] and set(ledger.suspects) == {"crash-q"}
    client.started(ex, "crash-q", "tcp://b")  # this time it lived a while
    client.started(ex, "double-h", "tcp://c")
    assert ex.poll(0) == [] and not ledger.suspects
    client.removed("tcp://b", {"crash-q"})
    assert _blamed(ex.poll(0)) == ["crash"] and "double-h" in ex._inflight


def test_a_new_crasher_let_off_by_a_guess_stays_suspect(ledger, fake):
    """A second crasher that kills its worker within CRASHER_GRACE of the first's
    cancel is let off (the death is put down to the first); it stays a suspect, so
    that its re-run, killing another worker before its start event gets out, does
    not get the healthy task that had finished there failed."""
    client, executor = fake
    ex = executor("crash-k", "crash-k2", "double-h")
    client.started(ex, "crash-k", "tcp://a")
    client.removed("tcp://a", {"crash-k"})
    assert _blamed(ex.poll(0)) == ["crash"]
    client.started(ex, "crash-k2", "tcp://b")
    client.removed("tcp://b", {"crash-k2"})
    assert ex.poll(0) == [] and set(ledger.suspects) == {"crash-k2"}
    client.started(ex, "double-h", "tcp://c")
    client.removed("tcp://c", {"crash-k2", "double-h"})
    assert ex.poll(0) == [] and set(ex._inflight) == {"crash-k2", "double-h"}


def test_executors_sharing_a_client_agree_on_a_death(ledger, fake):
    """One death, judged by each executor the hub gave it to: the crasher's unseen
    re-run is used up once, and no executor blames its own healthy task."""
    client, executor = fake
    first = executor("crash-k")
    second = executor("double-h", "sink-s")
    client.started(first, "crash-k", "tcp://a")
    client.started(second, "double-h", "tcp://b")
    client.removed("tcp://a", {"crash-k"})
    assert _blamed(first.poll(0)) == ["crash"] and second.poll(0) == []
    client.removed("tcp://b", {"double-h"})
    assert first.poll(0) == [] and second.poll(0) == []
    assert "double-h" in second._inflight
    client.started(second, "sink-s", "tcp://c")
    client.removed("tcp://c", {"sink-s"})
    assert first.poll(0) == [] and _blamed(second.poll(0)) == ["sink"]


def test_a_rerun_after_its_compute_ended_still_explains_the_death(ledger, fake, monkeypatch):
    """The crasher's executor closed (its compute ended) before the re-run's start
    event came: the hub records it, and the next compute's task is not blamed."""
    monkeypatch.setattr(_cluster, "CRASHER_GRACE", -1.0)
    client, executor = fake
    first = executor("crash-k")
    second = executor("double-h")  # keeps the hub (and its subscriptions) alive
    client.started(first, "crash-k", "tcp://a")
    client.removed("tcp://a", {"crash-k"})
    assert _blamed(first.poll(0)) == ["crash"]
    second.poll(0)
    first.close()
    client.started(first, "crash-k", "tcp://b")
    client.started(second, "double-h", "tcp://b")
    client.removed("tcp://b", {"double-h"})
    assert second.poll(0) == [] and "double-h" in second._inflight


def _lost_on_b(client, ex):
    """``crash`` kills worker A and fails; ``nap`` finishes on B, and B dies (the
    crasher's re-run) before graphexec reads the outcome: dask reports nap's future
    lost (its key was in memory on B, not processing there) and computes it again."""
    client.started(ex, "crash-k", "tcp://a")
    client.started(ex, "nap-h", "tcp://b")
    client.removed("tcp://a", {"crash-k"})
    assert _blamed(ex.poll(0)) == ["crash"]
    ex._inflight["nap-h"].future.status = "lost"
    ex._inbox.put(("done", "nap-h"))  # the done callback fired, the result is gone
    client.removed("tcp://b", set())
    assert ex.poll(0) == []  # waits for dask's recompute
    assert "nap-h" in ex._inflight and ex._lost == {"nap-h"}


def test_a_result_lost_with_its_worker_is_read_once_dask_computed_it_again(ledger, fake):
    """Issue #14: a finished task whose worker another task's crash killed before
    its outcome was read is not failed; its node completes with dask's recompute."""
    client, executor = fake
    ex = executor("crash-k", "nap-h")
    _lost_on_b(client, ex)
    client.started(ex, "nap-h", "tcp://c")  # the recompute
    assert ex.poll(0) == [] and "nap-h" in ex._inflight
    ex._inflight["nap-h"].future.status = "finished"  # no second done callback comes
    began = time.monotonic()
    ((call, status, value),) = ex.poll(5.0)  # poll looks at lost futures again itself
    assert time.monotonic() - began < 1.0
    assert (call.name, status, type(value)) == ("nap", _cluster.OK, _cluster.Payload)
    assert ex._inflight == {} and not ex._lost
    assert client.cancelled == ["crash-k"]  # the crasher failed once, nothing else


def test_a_lost_result_dask_forgot_fails_its_node_with_a_clear_message(ledger, fake):
    """dask could not compute the lost value again (it forgot the key: its future
    is cancelled): the node fails, once, saying so."""
    client, executor = fake
    ex = executor("crash-k", "nap-h")
    _lost_on_b(client, ex)
    ex._inflight["nap-h"].future.status = "cancelled"
    ((call, status, error),) = ex.poll(5.0)
    assert (call.name, status, type(error)) == ("nap", _cluster.ERROR, gx.WorkerCrashed)
    assert "died before graphexec read it" in str(error) and "forgot" in str(error)
    assert ex._inflight == {} and not ex._lost
    assert ex.poll(0) == []


def test_a_lost_results_recompute_follows_the_crash_rules(ledger, fake):
    """The recompute is a run like any other: when dask gives up on it (its own
    crashes, KilledWorker) the node fails once; a worker death while it runs is
    put on it only as any running task's would be."""
    client, executor = fake
    ex = executor("crash-k", "nap-h")
    _lost_on_b(client, ex)
    client.started(ex, "nap-h", "tcp://c")
    future = ex._inflight["nap-h"].future
    future.status = "error"
    killed = distributed.KilledWorker("nap-h", "tcp://c", 3)
    future.exception = lambda: killed
    outcomes = ex.poll(5.0)
    assert _blamed(outcomes) == ["nap"] and "KilledWorker" in str(outcomes[0][2])
    assert ex._inflight == {} and not ex._lost
    second = executor("crash-k2", "nap-i")
    client.started(second, "crash-k2", "tcp://a")
    client.started(second, "nap-i", "tcp://b")
    second._inflight["nap-i"].future.status = "lost"
    second._inbox.put(("done", "nap-i"))
    assert second.poll(0) == []
    client.started(second, "nap-i", "tcp://c")  # its recompute runs on C, which dies
    client.removed("tcp://c", {"nap-i"})  # crash-k's one unseen death was B's
    assert _blamed(second.poll(0)) == ["nap"]  # nothing else explains that death
    assert not second._lost and "crash-k2" in second._inflight


# -- skip, allow_failure, return_state ------------------------------------------------------


def test_default_skips_dependents_transitively(client):
    graph = gx.Graph()
    with graph:
        root = explode("root broke")
        child = ok(root)
        grandchild = ok([child])
        independent = ok(5)
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(cluster=client)
    run = info.value.run
    assert run.failed == [root]
    assert run.skipped == [child, grandchild]
    assert run[independent] == 5
    assert run.state(grandchild).upstream == root.name
    with pytest.raises(gx.UpstreamFailed):
        run[grandchild]


def test_allow_failure_argument_wait_for_and_collection(client, tmp_path):
    graph = gx.Graph()
    with graph:
        root = explode("root broke")
        skipped = ok(explode("further up"))
        arg = collect(gx.allow_failure(root), gx.allow_failure(skipped))
        waiter = touch(str(tmp_path / "waited"), wait_for=[gx.allow_failure(root)])
        items = collect_items(gx.allow_failure([ok(1), root, ok(3)]))
        soft = ok(fragile())
    run = graph.compute(cluster=client, raise_on_failure=False)
    assert run[arg] == [
        ("exc", "ValueError", "root broke"),
        ("upstream_failed", run.state(skipped).upstream),
    ]
    assert run.state(waiter).is_completed() and (tmp_path / "waited").exists()
    assert run[items] == [("value", 1), ("exc", "ValueError", "root broke"), ("value", 3)]
    # allow_failure=True on the task: dependents get its exception
    assert isinstance(run[soft], ValueError)
    assert root not in run.unhandled


def test_return_state(client):
    graph = gx.Graph()
    with graph:
        good = stateful(5)
        bad = stateful_fail()
        root = explode()
        skipped = stateful(root)
        report = collect(good, bad, skipped)
    run = graph.compute(cluster=client, raise_on_failure=False)
    assert run[report] == [
        ("state", "Completed", None, None, 5),
        ("state", "Failed", "KeyError", None, None),
        ("state", "Skipped", "UpstreamFailed", root.name, None),
    ]
    assert run.ok  # a return_state dependent handles what it received


# -- triggers -----------------------------------------------------------------------------------

SCENARIOS = {
    "ok+ok": ("ok", "ok"),
    "ok+failed": ("ok", "failed"),
    "failed+failed": ("failed", "failed"),
    "skipped": ("skipped",),
    "unmet": ("unmet",),
}
RUNS = {
    "all_success": {"ok+ok"},
    "all_done": set(SCENARIOS),
    "always": set(SCENARIOS),
    "any_failed": {"ok+failed", "failed+failed", "skipped"},
    "all_failed": {"failed+failed", "skipped"},
    "none_failed": {"ok+ok", "unmet"},
}


def _upstream(kind):
    if kind == "ok":
        return ok(1)
    if kind == "failed":
        return explode("failed upstream")
    if kind == "skipped":
        return ok(explode("failed further up"))
    return collect.with_options(trigger="any_failed")(ok(0))  # nothing failed: unmet


@pytest.mark.parametrize("trigger", list(RUNS))
def test_every_trigger(client, trigger):
    dependent_task = collect.with_options(trigger=trigger)
    graph = gx.Graph()
    with graph:
        cases = {}
        for name, kinds in SCENARIOS.items():
            ups = [_upstream(kind) for kind in kinds]
            cases[name] = (kinds, ups, dependent_task(*ups))
    run = graph.compute(cluster=client, raise_on_failure=False)
    for name, (kinds, ups, dependent) in cases.items():
        state = run.state(dependent)
        if name in RUNS[trigger]:
            assert state.name == "Completed", (name, state)
            expected = []
            for kind, up in zip(kinds, ups):
                if kind == "ok":
                    expected.append(("value", 1))
                elif kind == "failed":
                    expected.append(("exc", "ValueError", "failed upstream"))
                elif kind == "skipped":
                    expected.append(("upstream_failed", run.state(up).upstream))
                else:
                    expected.append(("upstream_failed", None))
            assert run[dependent] == expected, name
        else:
            assert state.name == "Skipped", (name, state)


# -- fail_fast ------------------------------------------------------------------------------------


def test_fail_fast_cancels_running_and_pending_work(client, tmp_path):
    graph = gx.Graph()
    with graph:
        slow = nap(1.5)
        bad = explode_after(0.2)
        after = ok(bad)
        pending = [touch(str(tmp_path / f"f{i}"), wait_for=[slow]) for i in range(3)]
    start = time.monotonic()
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(cluster=client, fail_fast=True)
    assert time.monotonic() - start < 1.4  # did not wait for the slow sibling
    run = info.value.run
    assert run.state(bad).name == "Failed"
    assert run.state(slow).name == "Cancelled"
    assert run.state(after).name == "Skipped"
    assert all(run.state(n).name == "Cancelled" for n in pending)
    assert run.unhandled == [bad]
    assert list(tmp_path.iterdir()) == []


def test_fail_fast_ignores_a_handled_failure(client):
    graph = gx.Graph()
    with graph:
        report = collect(gx.allow_failure(explode()))
        others = [ok(i) for i in range(3)]
    run = graph.compute(cluster=client, fail_fast=True)
    assert run.ok and run.cancelled == []
    assert run[report] == [("exc", "ValueError", "boom")]
    assert [run[n] for n in others] == [0, 1, 2]


# -- retries, GraphFailed, culling -----------------------------------------------------------------


def test_retries_count_attempts(client, tmp_path):
    graph = gx.Graph()
    with graph:
        recovers = flaky.with_options(retries=3)(str(tmp_path / "a"), 2)
        gives_up = flaky.with_options(retries=1)(str(tmp_path / "b"), 5)
    run = graph.compute(cluster=client, raise_on_failure=False)
    assert run[recovers] == 3
    assert run.state(recovers).attempts == 3
    assert [type(a.error).__name__ if a.error else None for a in run.state(recovers).history] == [
        "ValueError",
        "ValueError",
        None,
    ]
    assert run.state(gives_up).name == "Failed"
    assert run.state(gives_up).attempts == 2
    assert str(run.state(gives_up).exception) == "attempt 2 failed"


def test_graph_failed_names_failures_and_chains_the_remote_traceback(client):
    graph = gx.Graph()
    with graph:
        first = explode("first broke")
        ok(first)
        good = ok(4)
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(cluster=client)
    error = info.value
    assert error.run[good] == 4
    message = str(error)
    assert "1 of 3 nodes failed" in message and first.name in message
    assert "ValueError: first broke" in message
    assert f"Traceback of {first.name} (in its worker)" in message
    assert "raise ValueError(message)" in message
    cause = error.__cause__
    assert isinstance(cause, ValueError) and str(cause) == "first broke"
    remote = cause.__cause__
    assert isinstance(remote, gx._model.errors.RemoteTraceback)
    assert "in explode" in str(remote)
    assert "in explode" in "".join(traceback.format_exception(cause))


def test_exception_types_survive_and_unpicklable_ones_are_stood_in_for(client):
    class Custom(Exception):  # local class: by value to the worker and back
        def __init__(self, code):
            super().__init__(f"code {code}")
            self.code = code

    class Stubborn(Exception):
        def __init__(self, a, b):  # the default unpickling calls Stubborn("...") and fails
            super().__init__(f"{a}/{b}")

    class Locked(Exception):
        def __init__(self):
            super().__init__("holds a lock")
            self.lock = threading.Lock()  # does not pickle at all

    @gx.task
    def custom():
        raise Custom(42)

    @gx.task
    def stubborn():
        raise Stubborn(1, 2)

    @gx.task
    def locked():
        raise Locked()

    graph = gx.Graph()
    with graph:
        c, s, k = custom(), stubborn(), locked()
    run = graph.compute(cluster=client, raise_on_failure=False)
    exc = run.state(c).exception
    assert type(exc).__name__ == "Custom" and exc.code == 42
    rebuilt = run.state(s).exception  # sent by state: itself, without its __init__
    assert type(rebuilt).__name__ == "Stubborn" and str(rebuilt) == "1/2"
    stand_in = run.state(k).exception
    assert isinstance(stand_in, gx.RemoteError)
    assert stand_in.type_name.endswith("Locked") and "holds a lock" in str(stand_in)


def test_culling_runs_only_ancestors(client, tmp_path):
    graph = gx.Graph()
    with graph:
        wanted = counted(str(tmp_path / "wanted"), ok(2))
        counted(str(tmp_path / "other"), ok(3))
        explode("never runs")
    run = graph.compute(wanted, cluster=client)
    assert run[wanted] == 4
    assert len(run.nodes) == 2
    assert not (tmp_path / "other").exists()


# -- faults ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_worker_killed_mid_task_fails_only_its_node(client):
    graph = gx.Graph()
    with graph:
        victim = sigkill_after(0.3)
        child = ok(victim)
        others = [nap(0.05) for _ in range(6)]
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(cluster=client)
    run = info.value.run
    assert run.failed == [victim]
    exc = run.state(victim).exception
    assert type(exc) is gx.WorkerCrashed
    assert exc.node == victim.name and "died" in str(exc)
    assert run.state(child).name == "Skipped"
    assert all(run[n] == 0.05 for n in others)  # the run went on
    client.wait_for_workers(2, timeout=30)


@pytest.mark.timeout(60)
def test_an_instant_crash_ends_as_worker_crashed_not_killed_worker(client):
    graph = gx.Graph()
    with graph:
        victim = exit_now()
        survivor = ok(7)
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(cluster=client)
    run = info.value.run
    exc = run.state(victim).exception
    assert type(exc) is gx.WorkerCrashed  # dask's KilledWorker never leaks
    assert exc.node == victim.name and "died" in str(exc)
    assert run[survivor] == 7
    client.wait_for_workers(2, timeout=30)
    # the cluster works afterwards
    g2 = gx.Graph()
    with g2:
        again = ok(11)
    assert g2.compute(cluster=client)[again] == 11


def test_timeout_ends_the_node_at_its_deadline_and_retries(client):
    graph = gx.Graph()
    with graph:
        stuck = nap.with_options(timeout=0.3, retries=1)(1.0)
        fine = nap.with_options(timeout=5)(0.1)
    start = time.monotonic()
    run = graph.compute(cluster=client, raise_on_failure=False)
    elapsed = time.monotonic() - start
    state = run.state(stuck)
    assert state.name == "Failed"
    assert isinstance(state.exception, gx.TaskTimeout)
    assert state.attempts == 2
    assert all(isinstance(a.error, gx.TaskTimeout) for a in state.history)
    assert "cannot be stopped" in str(state.exception)
    assert run[fine] == 0.1
    assert elapsed < 2.5  # two attempts of 0.3 s, not two of 1 s
    time.sleep(1.0)  # the abandoned attempts finish on their workers


@gx.task(timeout=0.5)
def hold_the_gil(n):
    return sum(range(n))  # one C call: the worker's event loop waits for the GIL


def test_a_task_holding_the_gil_still_times_out_at_its_deadline(client):
    n = 10_000_000
    start = time.perf_counter()
    sum(range(n))
    n = int(n * 3.0 / max(time.perf_counter() - start, 1e-3))  # ~3 s here
    graph = gx.Graph()
    with graph:
        node = hold_the_gil(n)
    start = time.monotonic()
    run = graph.compute(cluster=client, raise_on_failure=False)
    elapsed = time.monotonic() - start
    assert isinstance(run.state(node).exception, gx.TaskTimeout)
    assert elapsed < 2.0
    time.sleep(max(0.0, 3.5 - elapsed))  # let the abandoned call finish on its worker


def test_unpicklable_argument_result_and_function(client):
    lock = threading.Lock()

    @gx.task
    def closes_over_lock():
        return lock.locked()

    graph = gx.Graph()
    with graph:
        bad_arg = ok({"lock": lock})
        bad_result = make_lock()
        bad_fn = closes_over_lock()
        fine = ok(1)
        child = ok(bad_result)
    run = graph.compute(cluster=client, raise_on_failure=False)
    arg_exc = run.state(bad_arg).exception
    assert isinstance(arg_exc, gx.SerializationError)
    assert arg_exc.stage == "arguments" and arg_exc.node == bad_arg.name
    assert "argument 0['lock']" in str(arg_exc)
    res_exc = run.state(bad_result).exception
    assert isinstance(res_exc, gx.SerializationError)
    assert res_exc.stage == "result" and bad_result.name in str(res_exc)
    fn_exc = run.state(bad_fn).exception
    assert isinstance(fn_exc, gx.SerializationError) and fn_exc.stage == "function"
    assert run[fine] == 1
    assert run.state(child).name == "Skipped"


def test_large_arguments_and_closures_are_scattered_not_sent_through_the_scheduler(client):
    blob = os.urandom(12 << 20)  # 12 MB: above dask's 10 MB large-graph warning

    @gx.task
    def closure_size(n):
        return len(blob) + n  # closes over the 12 MB

    graph = gx.Graph()
    with graph:
        sizes = [ok(blob) for _ in range(2)]
        closed = [closure_size(i) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dask warns about large objects in a task graph
        run = graph.compute(cluster=client)
    assert [run[n] for n in sizes] == [blob, blob]
    assert [run[n] for n in closed] == [len(blob), len(blob) + 1]


@gx.task
def zeros(n):
    import numpy as np

    return np.zeros(n)


@gx.task
def increment_in_place(a):
    a += 1  # the task changes its input
    return float(a.sum())


@gx.task
def sum_after(a, *_after):
    return float(sum(a))


@gx.task
def three():
    return [1, 2, 3]


@gx.task(retries=2)
def append_then_fail(xs, path):
    xs.append(99)  # before failing: a retry must not see it
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        if len(f.read()) < 3:
            raise ValueError("not yet")
    return list(xs)


def test_a_task_that_changes_its_input_changes_only_its_own_copy(client, tmp_path):
    # dask gives every task on a worker the object in its memory: graphexec hands a
    # copy, as the process pool does (a value of its own), to siblings, retries and
    # the Run alike.
    graph = gx.Graph()
    with graph:
        a = zeros(4)
        changed = increment_in_place(a)
        sibling = sum_after(a, changed)
        xs = three()
        retried = append_then_fail(xs, str(tmp_path / "attempts"))
        after = sum_after(xs, retried)
    run = graph.compute(a, changed, sibling, xs, retried, after, cluster=client)
    assert run[changed] == 4.0
    assert run[sibling] == 0.0
    assert run[a].tolist() == [0.0] * 4
    assert run.state(retried).attempts == 3
    assert run[retried] == [1, 2, 3, 99]  # each attempt started from [1, 2, 3]
    assert run[after] == 6.0 and run[xs] == [1, 2, 3]


_MEMO: dict = {}


@gx.task
def memoised():
    import numpy as np

    return _MEMO.setdefault("zeros", np.zeros(4))  # an object the task keeps


@gx.task
def bump_sum(a):
    a += 1
    return float(a.sum())


def test_a_chain_link_that_changes_its_input_leaves_what_the_producer_keeps(client):
    # Each bump_sum is its input's sole consumer: a chain, its input not copied on
    # arrival, so the producer made its value one of its own before dask held it.
    graph = gx.Graph()
    with graph:
        sums = [bump_sum(memoised()) for _ in range(6)]
    run = graph.compute(cluster=client)
    assert [run[s] for s in sums] == [4.0] * 6


class Homesick:
    """Unpickles anywhere but in the process whose pid it carries."""

    def __init__(self, home: int) -> None:
        self.home = home

    def __reduce__(self):
        return (_rebuild_homesick, (self.home,))


def _rebuild_homesick(home: int) -> Homesick:
    if os.getpid() == home:
        raise RuntimeError("cannot rebuild here")
    return Homesick(home)


@gx.task
def homesick(home):
    return Homesick(home)


def test_a_value_that_does_not_unpickle_here_says_so_not_that_the_client_closed(client):
    graph = gx.Graph()
    with graph:
        node = homesick(os.getpid())
    run = graph.compute(cluster=client)
    with pytest.raises(gx.SerializationError) as info:
        run[node]
    text = str(info.value)
    assert "does not unpickle here" in text and "cannot rebuild here" in text
    assert "closing the Client" not in text


# -- caching ---------------------------------------------------------------------------------------


def test_cache_hit_on_the_second_compute(client, tmp_path):
    counter = str(tmp_path / "runs")
    cached = counted.with_options(cache=True)

    def build():
        graph = gx.Graph()
        with graph:
            root = cached(counter, 5)  # literal arguments
            after = cached(counter, ok(21))  # an upstream computed on the cluster
        return graph, root, after

    cache_dir = tmp_path / "cache"
    graph, root, after = build()
    first = graph.compute(cluster=client, cache_dir=cache_dir)
    assert (first[root], first[after]) == (10, 42)
    assert read(counter) == "2"
    graph, root, after = build()
    second = graph.compute(cluster=client, cache_dir=cache_dir)
    assert (second[root], second[after]) == (10, 42)
    assert second.state(root).name == "Cached"
    assert second.state(after).name == "Cached"  # the upstream's content is hashed remotely
    assert read(counter) == "2"


# -- arguments ------------------------------------------------------------------------------------


def test_cluster_argument_validation(client):
    graph = gx.Graph()
    with graph:
        ok(1)
    with pytest.raises(TypeError, match=r"distributed\.Client"):
        graph.compute(cluster="tcp://127.0.0.1:8786")
    with pytest.raises(TypeError, match="connect a Client"):
        graph.compute(cluster=client.cluster)
    with pytest.raises(ValueError, match="workers="):
        graph.compute(cluster=client, workers=2)
    with pytest.raises(ValueError, match="scheduler="):
        graph.compute(cluster=client, scheduler="threads")
    pool = gx.Pool(workers=1)
    try:
        with pytest.raises(ValueError, match="pool="):
            graph.compute(cluster=client, pool=pool)
    finally:
        pool.close()
    with pytest.raises(ValueError, match="memory-limit"):
        graph.compute(cluster=client, memory_limit="1GB")
    with pytest.raises(ValueError, match="start_method"):
        graph.compute(cluster=client, start_method="spawn")


def _topics_of(client) -> set[str] | None:
    """Topics the scheduler sends this client (None if this dask keeps them elsewhere)."""
    me = client.id

    def topics(dask_scheduler):
        broker = getattr(dask_scheduler, "_broker", None)
        if broker is None:
            return None
        return {name for name, topic in broker._topics.items() if me in topic.subscribers}

    return client.run_on_scheduler(topics)


def _settled_topics(client, done) -> set[str] | None:
    """The client's topics once ``done(topics)`` (subscribing is asynchronous), or at 10 s."""
    deadline = time.monotonic() + 10
    while True:
        topics = _topics_of(client)
        if topics is None or done(topics) or time.monotonic() > deadline:
            return topics
        time.sleep(0.02)


def test_event_subscriptions_end_with_the_compute_and_spare_the_users_handler(client):
    graph = gx.Graph()
    with graph:
        ok(1)
    graph.compute(cluster=client)
    topics = _settled_topics(client, lambda t: not t & {"all", _cluster.START_TOPIC})
    if topics is not None:  # subscribed to "all" while closing, the scheduler logs errors
        assert not topics & {"all", _cluster.START_TOPIC}
    seen = []
    client.subscribe_topic("all", lambda event: seen.append(event[1]))
    try:
        graph.compute(cluster=client)
        graph.compute(cluster=client)
        client.log_event("all", {"action": "graphexec-test"})
        deadline = time.monotonic() + 10
        while {"action": "graphexec-test"} not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {"action": "graphexec-test"} in seen  # our handler gave way to the user's
        topics = _settled_topics(client, lambda t: _cluster.START_TOPIC not in t)
        if topics is not None:
            assert "all" in topics and _cluster.START_TOPIC not in topics
    finally:
        client.unsubscribe_topic("all")


@pytest.mark.timeout(60)
def test_a_flow_runs_its_submits_on_the_cluster(client):
    @gx.task
    def square(x):
        return x * x

    @gx.task
    def fails(x):
        raise ValueError(f"no {x}")

    @gx.flow(cluster=client)
    def ok_flow():
        futures = [square.submit(i) for i in range(6)]
        total = square.submit(sum([3]))  # a plain value
        return [f.result() for f in futures], total

    values, total = ok_flow()
    assert values == [0, 1, 4, 9, 16, 25]
    assert total == 9

    @gx.flow(cluster=client)
    def failing_flow():
        fails.submit(1)  # nobody looks at it: the flow must not report success
        return "done"

    with pytest.raises(gx.GraphFailed) as info:
        failing_flow()
    [node] = info.value.run.failed
    assert isinstance(info.value.run.state(node).exception, ValueError)

    with pytest.raises(ValueError):
        gx.flow(cluster=client, workers=2)(lambda: None)


def test_a_flow_on_the_cluster_releases_its_values_when_done(client):
    # Defect: a flow's cluster executor had no Run, kept every value, and its
    # registry was global: each flow's results stayed pinned on the cluster
    # until the process exited.
    gc.collect()
    before = _cluster.held_values()

    @gx.flow(cluster=client)
    def sweep():
        parts = [array.submit(1000, seed) for seed in range(3)]
        return total.submit(*parts).result()

    for _ in range(3):
        assert sweep() > 0
    gc.collect()
    assert _cluster.held_values() == before
