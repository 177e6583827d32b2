"""Chains: a sole consumer runs behind its producer, on its worker, taking the value in memory.

The value never goes through a pipe or /dev/shm; and because the scheduler
chains only where nothing could need such a value again, every fault still
ends on the one node it concerns (see ``Scheduler._chain``).
"""

import os
import time

import numpy as np
import pytest

import graphexec as gx
from graphexec._executors import worker as worker_module

N = 1_000_000  # 8 MB of float64


def _ours():
    prefix = f"gx-{os.getpid()}-"
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


@gx.task
def make(seed):
    return np.random.default_rng(seed).random(N)


@gx.task
def where_am_i(array, parent):
    # Runs while its input is alive: a value passed through shared memory
    # would be in /dev/shm now.
    shm = [n for n in os.listdir("/dev/shm") if n.startswith(f"gx-{parent}-")]
    return os.getpid(), shm, float(array.sum())


@gx.task
def producer_pid(seed):
    time.sleep(0.02)  # both workers busy: a consumer lands anywhere unless chained
    return os.getpid(), np.full(N, float(seed))


@gx.task
def consumer_pid(pair):
    return pair[0], os.getpid(), float(pair[1].sum())


@gx.task
def inc(x):
    return x + 1


@gx.task
def boom(array):
    raise ValueError("bad array")


@gx.task
def crash(array):
    os._exit(9)


@gx.task(timeout=0.5)
def slow_make(seed):
    time.sleep(30)
    return np.zeros(N)


@gx.task
def total(array):
    return float(array.sum())


@gx.task(retries=1)
def crash_once(array, marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return float(array.sum())


@gx.task
def generator_maker():
    return (i for i in range(3))  # cannot be pickled


@gx.task
def drain(gen):
    return sum(gen)


def _rebuilt_outside_workers(value):
    if worker_module._worker_pid == os.getpid():
        raise RuntimeError("ParentOnly can only be rebuilt outside a worker")
    return ParentOnly(value)


class ParentOnly:
    """Pickles anywhere; its pickle loads in the parent only."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (_rebuilt_outside_workers, (self.value,))


@gx.task
def make_parent_only(value):
    return ParentOnly(value)


@gx.task
def take(anything):
    return "taken"


def _expected(seed):
    return float(np.random.default_rng(seed).random(N).sum())


@pytest.mark.timeout(30)
def test_a_sole_consumer_runs_on_its_producers_worker_without_shared_memory(pool):
    graph = gx.Graph()
    with graph:
        pairs = [consumer_pid(producer_pid(i)) for i in range(8)]
        seen = where_am_i(make(7), os.getpid())
    run = graph.compute(pool=pool)
    for i, node in enumerate(pairs):
        made_in, used_in, value = run[node]
        assert made_in == used_in, "the consumer should run where its input was made"
        assert value == float(i) * N
    _, shm, value = run[seen]
    assert shm == [], "a chained value should never be copied into /dev/shm"
    assert value == pytest.approx(_expected(7))
    assert _ours() == []


@pytest.mark.timeout(30)
def test_a_long_chain_computes_the_right_value(pool):
    graph = gx.Graph()
    with graph:
        x = 0
        for _ in range(50):  # longer than one chain: several hand-overs
            x = inc(x)
    run = graph.compute(pool=pool, keep="all")
    assert run[x] == 50
    assert run.ok and len(run.completed) == 50


@pytest.mark.timeout(30)
def test_kept_values_of_a_chain_are_readable(pool):
    graph = gx.Graph()
    with graph:
        array = make(3)
        result = total(array)
    run = graph.compute(pool=pool, keep="all")
    assert run[result] == pytest.approx(_expected(3))
    assert float(run[array].sum()) == pytest.approx(_expected(3))


@pytest.mark.timeout(30)
def test_a_failure_inside_a_chain_skips_the_rest(pool):
    graph = gx.Graph()
    with graph:
        array = make(1)
        bad = boom(array)
        after = total(bad)
        fine = total(make(2))
    run = graph.compute(pool=pool, raise_on_failure=False)
    assert run.state(array).name == "Completed"
    assert isinstance(run.state(bad).exception, ValueError)
    assert run.state(after).name == "Skipped"
    assert run[fine] == pytest.approx(_expected(2))


@pytest.mark.timeout(30)
def test_a_crash_inside_a_chain_is_the_crashing_nodes_alone(pool):
    graph = gx.Graph()
    with graph:
        array = make(1)
        dead = crash(array)
        after = total(dead)
        fine = [total(make(i)) for i in range(2, 5)]
    run = graph.compute(pool=pool, raise_on_failure=False)
    assert run.state(array).name == "Completed"
    error = run.state(dead).exception
    assert isinstance(error, gx.WorkerCrashed) and error.exitcode == 9
    assert run.state(after).name == "Skipped"
    assert [run[n] for n in fine] == pytest.approx([_expected(i) for i in range(2, 5)])
    assert _ours() == []


@pytest.mark.timeout(30)
def test_a_consumer_with_retries_is_not_chained_so_its_retry_still_has_the_value(pool, tmp_path):
    # Had the array been kept in the worker the first attempt killed, the
    # retry would have nothing to read.
    graph = gx.Graph()
    with graph:
        result = crash_once(make(5), str(tmp_path / "crashed-once"))
    run = graph.compute(pool=pool)
    assert run[result] == pytest.approx(_expected(5))
    assert run.state(result).attempts == 2


@pytest.mark.timeout(30)
def test_fail_fast_in_the_middle_of_chains_leaves_nothing_behind(pool):
    graph = gx.Graph()
    with graph:
        dead = crash(make(0))
        rest = [total(slow_make(i)) for i in range(3)]
    with pytest.raises(gx.GraphFailed):
        graph.compute(pool=pool, fail_fast=True)
    assert graph._latest_run.state(dead).name == "Failed"
    assert all(graph._latest_run.state(n).name in ("Cancelled", "Failed", "Skipped") for n in rest)
    assert _ours() == []
    graph2 = gx.Graph()
    with graph2:
        ok = total(make(1))
    assert graph2.compute(pool=pool)[ok] == pytest.approx(_expected(1))


@pytest.mark.timeout(30)
def test_a_result_that_cannot_be_pickled_fails_its_node_even_in_a_chain(pool):
    # Its sole consumer would take it in memory, but whether a result can leave
    # its worker must not depend on the graph's shape.
    graph = gx.Graph()
    with graph:
        gen = generator_maker()
        result = drain(gen)
    run = graph.compute(pool=pool, raise_on_failure=False)
    error = run.state(gen).exception
    assert isinstance(error, gx.SerializationError)
    assert "generator" in str(error)
    assert run.state(result).name == "Skipped"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("consumers", [1, 2])
def test_a_result_that_will_not_unpickle_in_a_worker_fails_its_consumers_whatever_the_shape(
    pool, consumers
):
    # With one consumer the two calls are chained (the value never leaves the
    # worker); with two they are not. Either way the producer completed (its
    # value reached the parent) and each consumer fails to unpickle its argument.
    graph = gx.Graph()
    with graph:
        made = make_parent_only(1)
        takers = [take(made) for _ in range(consumers)]
    run = graph.compute(pool=pool, raise_on_failure=False)
    assert run.state(made).name == "Completed"
    for taker in takers:
        error = run.state(taker).exception
        assert isinstance(error, gx.SerializationError)
        assert error.stage == "unpickle-arguments"
        assert "could not be unpickled" in str(error)
        assert "outside a worker" in str(error)


_TABLES = {}


@gx.task
def load_table(n):
    # Memoised in the worker: the array it returns is also kept in _TABLES.
    if n not in _TABLES:
        _TABLES[n] = np.arange(n, dtype=float)
    return _TABLES[n]


@gx.task
def load_view(n):
    return load_table.fn(n)[1:]  # a view of the memoised array


@gx.task
def load_list(n):
    return _TABLES.setdefault(("list", n), [0.0] * n)


@gx.task
def shift(values):
    if isinstance(values, list):
        values[0] += 1.0
        return values[0]
    values += 1.0  # in place: fine on a value of its own
    return float(values[0])


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "loader",
    [load_table, load_view, load_list],
    ids=["memoised array", "view of it", "memoised list"],
)
def test_a_chained_consumer_modifying_its_input_never_touches_its_producers_objects(loader):
    # Each consumer must get a value of its own, as from another worker: here
    # the producer returns an object it also keeps, on a one-worker pool.
    with gx.Pool(workers=1) as one:
        seen = []
        for _ in range(3):
            graph = gx.Graph()
            with graph:
                result = shift(loader(1000))
            seen.append(graph.compute(pool=one)[result])
    first = 1.0 if loader is not load_view else 2.0
    assert seen == [first] * 3


def _consumer_of_a_big_function():
    weights = np.ones(500_000)  # 4 MB, pickled with the function: by value

    def weigh(x):
        return float(x.sum()) + weights.size

    weigh.__qualname__ = weigh.__name__ = "weigh"
    return gx.task(weigh)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("consumer", ["small function", "4 MB function"])
def test_a_timeout_at_the_head_of_a_chain_fails_the_head_only(pool, consumer):
    # With a 4 MB function, a consumer queued behind the running head would
    # block the scheduler until the head ended, and no timeout would fire:
    # a chain never queues more than the pipe holds.
    if consumer == "small function":
        use, extra = total, 0
    else:
        use, extra = _consumer_of_a_big_function(), 500_000
    graph = gx.Graph()
    with graph:
        late = slow_make(1)
        after = use(late)
        fine = use(make(2))
    start = time.monotonic()
    run = graph.compute(pool=pool, raise_on_failure=False)
    assert time.monotonic() - start < 10
    assert isinstance(run.state(late).exception, gx.TaskTimeout)
    assert run.state(after).name == "Skipped"
    assert run[fine] == pytest.approx(_expected(2) + extra)


@pytest.mark.timeout(30)
def test_with_a_memory_limit_values_cross_workers_and_nothing_is_chained(pool):
    # A chained call would start in a worker whose memory its producer left
    # high, before the pool could replace that worker without blaming anyone.
    graph = gx.Graph()
    with graph:
        seen = where_am_i(make(7), os.getpid())
    run = graph.compute(pool=pool, memory_limit="8GB")
    _, shm, value = run[seen]
    assert shm, "without chains the array should have gone through /dev/shm"
    assert value == pytest.approx(_expected(7))


@pytest.mark.timeout(30)
def test_a_worker_that_dies_once_the_head_of_a_chain_is_through_blames_the_head():
    # A send fails only when the worker is dead. Once the head's message went
    # through, the head may have killed it: it must not be re-run silently.
    graph = gx.Graph()
    with graph:
        head = make(3)
        after = total(head)
    with gx.Pool(workers=1) as one:
        graph.compute(pool=one)  # the worker is up and has both functions
        (w,) = one._workers.values()
        real_send = w.conn.send_bytes
        sends = []

        def send_then_die(data):
            sends.append(data)
            if len(sends) == 2:  # the head went through; the worker dies now
                os.kill(w.pid, 9)
                w.process.join(5)
                raise BrokenPipeError("the worker died")
            return real_send(data)

        w.conn.send_bytes = send_then_die
        run = graph.compute(pool=one, raise_on_failure=False)
    assert len(sends) == 2, "the head and its chained consumer went together"
    assert isinstance(run.state(head).exception, gx.WorkerCrashed)
    assert run.state(head).attempts == 1
    assert run.state(after).name == "Skipped"
