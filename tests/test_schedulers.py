"""The three schedulers: identical outcomes, real parallelism, bounded workers, prompt dispatch."""

from __future__ import annotations

import collections
import os
import threading
import time
import warnings

import pytest

import graphexec as gx
from graphexec._executors import machine
from graphexec._executors import process as process_module

TOLERANCE = 0.01


@gx.task
def ok(x=1):
    return x


@gx.task
def plus(x, y=1):
    return x + y


@gx.task
def explode(message="boom"):
    raise ValueError(message)


@gx.task
def nap(seconds, *_):
    time.sleep(seconds)
    return seconds


@gx.task
def gather(*values):
    return [v if not isinstance(v, BaseException) else f"{type(v).__name__}: {v}" for v in values]


@gx.task(retries=2)
def flaky(path, fails):
    try:
        with open(path) as f:
            n = int(f.read()) + 1
    except FileNotFoundError:
        n = 1
    with open(path, "w") as f:
        f.write(str(n))
    if n <= fails:
        raise RuntimeError(f"attempt {n}")
    return n


def _build(directory):
    graph = gx.Graph("zoo")
    with graph:
        a = ok(2)
        b = plus(a, 3)
        bad = explode("bad")
        skipped = plus(bad)
        skipped2 = plus([skipped, {"k": a}])
        gather(gx.allow_failure(bad), gx.allow_failure(skipped), b)
        gather.with_options(trigger="all_done")(skipped2, a)
        gather.with_options(trigger="any_failed")(a, b)  # unmet: skipped
        gather.with_options(trigger="none_failed")(skipped2)
        ok(ok(1, return_state=True))
        explode("handled", allow_failure=True)
        flaky(os.path.join(directory, "count"), 2)
        plus(ok(1), wait_for=[gx.allow_failure(bad)])
        explode("never", wait_for=[skipped])
        explode("loose")  # nobody accepts this one
    return graph


def _outcome(run, node):
    state = run.state(node)
    if state.is_completed():
        value = state.result()
        if isinstance(value, gx.State):
            value = ("State", value.name)
        detail = repr(value)
    else:
        detail = f"{type(state.exception).__name__}: {state.exception}"
    return (node.name, state.name, state.upstream, state.attempts, detail)


@pytest.mark.timeout(30)
def test_schedulers_agree_on_every_outcome(pool, tmp_path):
    outcomes = {}
    for scheduler in ("processes", "sync", "threads"):
        directory = tmp_path / scheduler
        directory.mkdir()
        graph = _build(str(directory))
        kwargs = {"pool": pool} if scheduler == "processes" else {"scheduler": scheduler}
        if scheduler == "threads":
            kwargs["workers"] = 2
        with pytest.raises(gx.GraphFailed) as info:
            graph.compute(keep="all", **kwargs)
        run = info.value.run
        outcomes[scheduler] = [_outcome(run, n) for n in graph.nodes]
        outcomes[scheduler].append(("unhandled", [n.name for n in run.unhandled]))
    assert outcomes["sync"] == outcomes["processes"]
    assert outcomes["threads"] == outcomes["processes"]
    # and the zoo is what the policies say it is
    by_name = {o[0]: o for o in outcomes["sync"][:-1]}
    assert by_name["plus-1"][1:3] == ("Skipped", "explode-0")
    assert by_name["flaky-0"][1] == "Completed" and by_name["flaky-0"][3] == 3
    assert by_name["explode-2"][1:3] == ("Skipped", "explode-0")
    assert by_name["gather-0"][4] == repr(
        [
            "ValueError: bad",
            "UpstreamFailed: plus-1 was skipped because its upstream explode-0 failed",
            5,
        ]
    )
    assert by_name["gather-2"][1:3] == ("Skipped", None)  # any_failed, nothing failed
    assert by_name["gather-3"][1:3] == ("Skipped", "explode-0")  # none_failed names the root
    assert by_name["ok-2"][4] == repr(("State", "Completed"))
    assert outcomes["sync"][-1] == ("unhandled", ["explode-3"])


def _overlap(states):
    """Largest number of intervals running at one moment."""
    events = []
    for state in states:
        events.append((state.started, 1))
        events.append((state.finished, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


@pytest.mark.parametrize("scheduler", ["processes", "threads"])
def test_independent_nodes_run_in_parallel_within_the_worker_bound(compute):
    graph = gx.Graph()
    with graph:
        naps = [nap(0.15) for _ in range(6)]
    start = time.monotonic()
    run = compute(graph, keep="all")
    elapsed = time.monotonic() - start
    states = [run.state(n) for n in naps]
    assert _overlap(states) == 2  # two workers: two at a time, never more
    assert elapsed < 6 * 0.15  # faster than one at a time


@pytest.mark.parametrize("scheduler", ["processes", "threads"])
def test_a_free_worker_takes_ready_work_at_once(compute):
    graph = gx.Graph()
    with graph:
        long = nap(0.6)
        short = nap(0.05)
        for _ in range(3):
            short = nap(0.05, short)
    run = compute(graph, keep="all")
    long_state = run.state(long)
    chain_end = run.state(short)
    # the short chain ran on the other worker while the long node was running
    assert chain_end.finished < long_state.finished
    assert chain_end.finished - long_state.started < 0.55


def test_dependents_start_after_their_upstreams_finish(compute):
    graph = gx.Graph()
    with graph:
        a = nap(0.05)
        b = nap(0.05)
        c = gather(a, b)
        d = nap(0.0, wait_for=[c])
    run = compute(graph, keep="all")
    for up, down in ((a, c), (b, c), (c, d)):
        assert run.state(up).finished <= run.state(down).started + TOLERANCE


def test_sync_failures_keep_their_real_traceback():
    graph = gx.Graph()
    with graph:
        bad = explode("here")
    run = graph.compute(scheduler="sync", raise_on_failure=False)
    tb = run.state(bad).exception.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "explode" in frames  # post-mortem debugging reaches the task's frame


def test_default_workers_is_the_cores_this_process_may_use(monkeypatch):
    pool = gx.Pool()
    try:
        assert pool.workers == machine.usable_cores() <= len(os.sched_getaffinity(0))
        assert any(method in repr(pool) for method in ("zygote", "forkserver", "spawn"))
    finally:
        pool.close()
    # A container's CPU quota (docker run --cpus=1.5) rounds up; the machine's count
    # (os.cpu_count()) was taken before, whatever the process could use.
    monkeypatch.setattr(machine, "cgroup_cpu_quota", lambda: 1.0)
    with gx.Pool() as pool:
        assert pool.workers == 1
    graph = gx.Graph()
    nodes = [graph.add(_pid_after_a_nap) for _ in range(3)]
    run = graph.compute()
    assert len({run[n] for n in nodes}) == 1 and run[nodes[0]] != os.getpid()


def _pid_after_a_nap():
    time.sleep(0.05)  # (long enough for a second worker, had there been one, to take one)
    return os.getpid()


def test_unknown_start_method_is_refused():
    with pytest.raises(ValueError, match="start_method"):
        gx.Pool(workers=1, start_method="teleport")


@pytest.mark.timeout(20)
def test_a_pool_runs_a_second_compute_while_one_is_running(pool):
    """A pool used to refuse a second compute ("already running a compute"); it now
    runs both, the second beside the first (issue #18)."""
    graph = gx.Graph()
    with graph:
        nap(0.6)
    started = threading.Event()
    errors = []

    def background():
        started.set()
        try:
            graph.compute(pool=pool)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=background)
    thread.start()
    started.wait(5)
    time.sleep(0.2)
    other = gx.Graph()
    with other:
        ok(1)
    try:
        assert other.compute(pool=pool).ok
        assert thread.is_alive()  # finished while the first one still ran
    finally:
        thread.join(10)
    assert errors == []


# -- concurrency limits (SPEC §4, implemented by the same scheduler) ----------------------------


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_max_concurrency_bounds_one_task_without_blocking_others(compute):
    single = nap.with_options(max_concurrency=1, name="single")
    graph = gx.Graph()
    with graph:
        limited = [single(0.1) for _ in range(3)]
        free = [nap(0.1) for _ in range(3)]
    run = compute(graph, keep="all")
    assert _overlap([run.state(n) for n in limited]) == 1
    # while one limited node ran, the free ones used the other worker
    first_free = min(run.state(n).started for n in free)
    last_limited = max(run.state(n).started for n in limited)
    assert first_free < last_limited


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_copies_of_a_task_share_its_count_each_under_its_own_cap(compute):
    low = nap.with_options(max_concurrency=1, name="low")
    high = low.with_options(max_concurrency=2, name="high")
    graph = gx.Graph()
    with graph:
        lows = [low(0.15) for _ in range(3)]
        highs = [high(0.15) for _ in range(3)]
    run = compute(graph, keep="all", workers=4)
    assert _overlap([run.state(n) for n in lows]) == 1
    assert _overlap([run.state(n) for n in lows + highs]) <= 2


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_tag_limits(compute):
    db = nap.with_options(tags=["db"])
    graph = gx.Graph()
    with graph:
        queries = [db(0.1) for _ in range(3)]
    run = compute(graph, keep="all", limits={"db": 1})
    assert _overlap([run.state(n) for n in queries]) == 1


_SPANS: list[tuple[float, float]] = []  # (start, end) of overstay's calls (threads)
_SPANS_LOCK = threading.Lock()


@gx.task
def overstay(seconds):
    start = time.monotonic()
    time.sleep(seconds)
    with _SPANS_LOCK:
        _SPANS.append((start, time.monotonic()))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bound", ["max_concurrency", "tag", "workers"])
def test_a_thread_past_its_timeout_keeps_its_slot_until_it_returns(bound):
    # A thread cannot be killed: its node fails at the deadline, the call runs on.
    # Its concurrency slots (and its thread) were given to the next call at once:
    # a task of max_concurrency=1 ran five at a time.
    _SPANS.clear()
    options = {"max_concurrency": 1} if bound == "max_concurrency" else {}
    if bound == "tag":
        options["tags"] = ["db"]
    task = overstay.with_options(timeout=0.05, **options)
    graph = gx.Graph()
    with graph:
        nodes = [task(0.15) for _ in range(5)]
    workers = 2 if bound == "workers" else 4
    run = graph.compute(
        scheduler="threads",
        workers=workers,
        raise_on_failure=False,
        limits={"db": 1} if bound == "tag" else None,
    )
    assert [run.state(n).name for n in nodes] == ["Failed"] * 5
    assert all(isinstance(run.state(n).exception, gx.TaskTimeout) for n in nodes)
    deadline = time.monotonic() + 10
    while len(_SPANS) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)  # the abandoned calls return on their own
    events = sorted([(s, 1) for s, _ in _SPANS] + [(e, -1) for _, e in _SPANS])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    assert len(_SPANS) == 5 and most == (2 if bound == "workers" else 1)


@pytest.mark.timeout(30)
def test_fail_fast_keeps_the_slot_of_a_call_that_runs_on():
    # After fail_fast's cancel, "always" nodes of the tag ran beside the timed-out
    # call still running, and its FREED later gave a slot back twice.
    _SPANS.clear()
    gpu = overstay.with_options(tags=["gpu"])
    graph = gx.Graph()
    with graph:
        gpu.with_options(timeout=0.05)(0.5)
        for _ in range(3):
            gpu.with_options(trigger="always")(0.2)
    with pytest.raises(gx.GraphFailed):
        graph.compute(scheduler="threads", workers=4, limits={"gpu": 1}, fail_fast=True)
    deadline = time.monotonic() + 10
    while len(_SPANS) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    ordered = sorted(_SPANS)
    assert len(ordered) == 4
    assert all(ordered[k][1] <= ordered[k + 1][0] for k in range(3))  # one at a time


def test_a_limit_on_a_tag_no_task_has_is_a_warning_naming_the_tags_there_are():
    # A typo ("gpus" for "gpu") limited nothing, silently: every tagged call ran at once.
    gpu = nap.with_options(tags=["gpu"])
    graph = gx.Graph()
    with graph:
        calls = [gpu(0.0) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"limits=\{'gpus': 1\} limits nothing.*'gpu'"):
        graph.compute(calls, scheduler="sync", limits={"gpus": 1, "gpu": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph.compute(calls, scheduler="sync", limits={"gpu": 1})  # no warning


@gx.task
def times_ten(x):
    return x * 10


@gx.task
def calls_times_ten(x):
    return times_ten(x) + 1


def test_a_sync_compute_inside_with_graph_runs_task_bodies_outside_it():
    # The body's plain task call must run, not add a node to the graph being built.
    graph = gx.Graph()
    with graph:
        node = calls_times_ten(1)
        assert graph.compute(scheduler="sync")[node] == 11
        assert len(graph.nodes) == 1
        after = calls_times_ten(2)  # the block still builds
    assert graph.compute(scheduler="sync")[after] == 21


@gx.task
def five():
    return 5


@gx.task
def identity(x):
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheduler", ["sync", "threads", "processes"])
def test_dict_subclasses_holding_nodes_keep_their_type_and_items(scheduler):
    import collections

    graph = gx.Graph()
    with graph:
        counter = identity(collections.Counter({"apples": five()}))
        default = identity(collections.defaultdict(list, {"a": five()}))
        ordered = identity(collections.OrderedDict([("z", five()), ("a", 1)]))
    run = graph.compute(scheduler=scheduler, workers=2)
    assert run[counter] == collections.Counter({"apples": 5})
    assert type(run[counter]) is collections.Counter
    assert run[default] == {"a": 5} and run[default].default_factory is list
    assert list(run[ordered].items()) == [("z", 5), ("a", 1)]
    assert type(run[ordered]) is collections.OrderedDict


class Window(collections.deque):
    """A deque subclass: rebuilt as itself, its maxlen kept."""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheduler", ["sync", "threads", "processes"])
def test_a_deque_holding_nodes_is_filled_in_like_a_list(scheduler):
    # A node inside a deque was no edge: sync passed the Node itself, the process
    # pool failed the call ("node cannot be pickled").
    import collections

    graph = gx.Graph()
    with graph:
        window = identity(collections.deque([five(), 1, five()], maxlen=3))
        mine = identity(Window([five(), 2], maxlen=2))
    run = graph.compute(scheduler=scheduler, workers=2)
    assert run[window] == collections.deque([5, 1, 5], maxlen=3)
    assert type(run[window]) is collections.deque and run[window].maxlen == 3
    assert list(run[mine]) == [5, 2] and type(run[mine]) is Window and run[mine].maxlen == 2


CELL = """
OFFSET = 5

def scale(x):
    return 2 * x

def shifted(x):
    return scale(x) + OFFSET
"""


def _cell() -> dict:
    """Functions as a notebook cell or a script makes them: of a module no worker
    can import, so they travel by value, with the globals they name."""
    namespace: dict = {"__name__": "gx_test_notebook_cell"}
    exec(CELL, namespace)
    return namespace


@pytest.mark.timeout(30)
def test_a_warm_pool_runs_a_cells_function_with_its_globals_as_they_are_now():
    # A warm pool kept the first pickle of such a function: after the user
    # changed a constant or a helper, it went on returning the old results.
    cell = _cell()
    shifted = gx.task(cell["shifted"])
    own = gx.Pool(workers=2)

    def compute(x):
        graph = gx.Graph()
        with graph:
            node = shifted(x)
        return graph.compute(pool=own)[node]

    with own:  # closed at the end of the block
        assert compute(1) == 7
        assert compute(2) == 9  # unchanged: the same pickle (not sent again)
        cell["OFFSET"] = 100
        assert compute(1) == 102
        exec("def scale(x):\n    return 10 * x\n", cell)  # the helper redefined
        assert compute(1) == 110
        cell["OFFSET"] = 0
        assert gx.flow(pool=own)(lambda: shifted.submit(3).result())() == 30
        cell["OFFSET"] = 1
        assert shifted.submit(3).result() == 31  # the block's own calls


@pytest.mark.timeout(30)
def test_a_warm_pool_pickles_a_function_again_only_when_a_name_it_reads_was_rebound(
    monkeypatch,
):
    # Pickling it again in every run cost what its globals cost (a large array
    # it names: 0.2 s a run); the objects it names are compared first.
    cell = _cell()
    shifted = gx.task(cell["shifted"])
    pickled = []
    dumps = process_module.dumps_function

    def counting(obj, *args, **kwargs):
        if obj is cell["shifted"]:
            pickled.append(1)
        return dumps(obj, *args, **kwargs)

    monkeypatch.setattr(process_module, "dumps_function", counting)
    with gx.Pool(workers=2) as own:
        procs = own._procs

        def compute(x):
            graph = gx.Graph()
            with graph:
                nodes = [shifted(x) for _ in range(8)]  # both workers load it
            run = graph.compute(pool=own)
            values = {run[n] for n in nodes}
            assert len(values) == 1
            return values.pop()

        def blob():
            return procs._fn_blobs[procs._fn_ids[id(cell["shifted"])]]

        assert compute(1) == 7
        first = blob()
        assert compute(1) == 7 and compute(2) == 9
        assert blob() is first and len(pickled) == 1  # nothing it names changed
        cell["OFFSET"] = 6
        graph = gx.Graph()
        with graph:
            one = shifted(1)  # one call: one worker loads the new pickle
        assert graph.compute(pool=own)[one] == 8
        assert blob() != first and len(pickled) == 2
        fn_id = procs._fn_ids[id(cell["shifted"])]
        for w in procs._workers.values():
            # loaded again, or told to forget its old copy (which it kept for good)
            assert (fn_id in w.functions) != (fn_id in w.forget), (w.functions, w.forget)


@pytest.mark.timeout(30)
def test_a_call_refused_before_its_function_stopped_pickling_fails_as_unpicklable():
    # Its message was made (then refused: the one worker busy) before another run
    # found the function no longer pickles: the error object went to the worker
    # as the function's pickle, and the node failed "could not be unpickled".
    cell = _cell()
    cell["OFFSET"] = 0
    exec("import time\ndef slow(x):\n    time.sleep(x)\n    return OFFSET\n", cell)
    slow = gx.task(cell["slow"])
    outcome = {}
    with gx.Pool(workers=1) as own:

        def first_run():
            graph = gx.Graph()
            with graph:
                slow(1.0)
                slow(0.01)
            outcome["run"] = graph.compute(pool=own, raise_on_failure=False)

        thread = threading.Thread(target=first_run)
        thread.start()
        time.sleep(0.5)  # slow(1.0) runs, slow(0.01) waits, its message made
        cell["OFFSET"] = threading.Lock()  # the function, by value, no longer pickles
        graph = gx.Graph()
        with graph:
            slow(0.0)
        second = graph.compute(pool=own, raise_on_failure=False)
        thread.join(20)
    for run in (second, outcome["run"]):
        for node in run.failed:
            message = run.state(node).message
            assert "cannot be pickled" in message and "unpickled" not in message, message
    assert len(outcome["run"].failed) == 1 and len(second.failed) == 1


DEEP_CELL = """
OFFSET = 1

class Scaler:  # a class of the cell: pickled by value, its methods' globals with it
    def shift(self, x):
        return x + OFFSET

SCALER = Scaler()

def via_class(x):
    return SCALER.shift(x)

class Shifter:
    def __call__(self, x):
        return x + OFFSET

def h4(x):
    return x + OFFSET

def h3(x):
    return h4(x)

def h2(x):
    return h3(x)

def h1(x):
    return h2(x)

def deep(x):
    return h1(x)

TABLE = {"h": h4}

def via_dict(x):
    return TABLE["h"](x)

def via_default(x, helper=h4):
    return helper(x)

def make_local():
    class Local:  # a class no worker can import by name
        def shift(self, x):
            return x + OFFSET
    return Local()

LOCAL = make_local()

def via_local_class(x):
    return LOCAL.shift(x)
"""


@pytest.mark.timeout(30)
def test_a_warm_pool_sees_a_rebound_name_through_a_cells_class_object_or_deep_helper():
    # The identity walk stopped at classes, callable objects and 3 helpers deep:
    # those ran with the old constant (a review of its first version).
    cell = {"__name__": "gx_test_deep_cell"}
    exec(DEEP_CELL, cell)
    exec(
        "import graphexec as gx\n"
        "h4_task = gx.task(h4)\n"
        "def via_task(x):\n    return h4_task.fn(x)\n",
        cell,
    )
    names = ("via_class", "deep", "via_dict", "via_default", "via_local_class", "via_task")
    kinds = {name: cell[name] for name in names}
    kinds["callable"] = cell["Shifter"]()
    with gx.Pool(workers=1) as own:

        def values():
            graph = gx.Graph()
            with graph:
                nodes = {kind: graph.add(fn, 0) for kind, fn in kinds.items()}
            run = graph.compute(pool=own)
            return {kind: run[node] for kind, node in nodes.items()}

        assert values() == dict.fromkeys(kinds, 1)
        cell["OFFSET"] = 100
        assert values() == dict.fromkeys(kinds, 100)
