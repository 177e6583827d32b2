"""``task.map`` and ``gx.unmapped`` (issue #13, part 2), on ``processes`` and ``sync``.

A lazy graph gets a list of nodes; a flow or a ``with gx.Pool()`` block a
list of futures, submitted at once. The call keywords apply to every call.
"""

from __future__ import annotations

import time

import pytest

import graphexec as gx

pytestmark = pytest.mark.timeout(60)


@gx.task
def add(a, b=0):
    return a + b


@gx.task
def label(prefix, x):
    return f"{prefix}{x}"


@gx.task
def explode(message="boom"):
    raise ValueError(message)


@gx.task
def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"item {x}")
    return x


@gx.task
def describe(value):
    if isinstance(value, gx.State):
        return ("state", value.name)
    if isinstance(value, BaseException):
        return ("exception", str(value))
    return ("value", value)


@gx.task
def nap(seconds, *_):
    time.sleep(seconds)
    return seconds


def flow_on(scheduler):
    options = {"workers": 2} if scheduler != "sync" else {}
    return gx.flow(scheduler=scheduler, **options)


# -- a lazy graph -------------------------------------------------------------------


def test_map_in_a_graph_returns_nodes_one_per_item(compute):
    produced = []

    def numbers():
        for i in range(3):
            produced.append(i)
            yield i

    graph = gx.Graph()
    with graph:
        firsts = add.map([1, 2, 3], b=gx.unmapped(10))
        seconds = add.map(firsts, [100, 200, 300])  # iterables may hold nodes
        from_generator = add.map(numbers(), b=5)  # a generator is consumed once, here
        keyword = add.map(a=[1, 2], b=[3, 4])
        whole = label.map("p-", [1, 2])  # a string is one value, as in Prefect
        empty = add.map([])
    assert produced == [0, 1, 2]
    assert all(isinstance(n, gx.Node) for n in firsts + seconds)
    assert [n.name for n in firsts] == ["add-0", "add-1", "add-2"]
    assert len(graph) == 13 and empty == []
    run = compute(graph, keep="all")
    assert [run[n] for n in firsts] == [11, 12, 13]
    assert [run[n] for n in seconds] == [111, 212, 313]
    assert [run[n] for n in from_generator] == [5, 6, 7]
    assert [run[n] for n in keyword] == [4, 6]
    assert [run[n] for n in whole] == ["p-1", "p-2"]


def test_unmapped_passes_a_node_or_a_list_whole_to_every_call(compute):
    graph = gx.Graph()
    with graph:
        base = add(1, 1)
        with_node = add.map([1, 2], gx.unmapped(base))
        lists = add.map([[1], [2]], gx.unmapped([0]))
    run = compute(graph, keep="all")
    assert [run[n] for n in with_node] == [3, 4]
    assert [run[n] for n in lists] == [[1, 0], [2, 0]]
    assert repr(gx.unmapped(3)) == "unmapped(3)"


def test_call_keywords_apply_to_every_mapped_call_in_a_graph(compute):
    graph = gx.Graph()
    with graph:
        failed = explode("prerequisite")
        after = add.map([1, 2], wait_for=[failed], allow_failure=True)
        states = fail_on.map([1, 2], gx.unmapped(2), return_state=True)
        seen = describe.map(states)
        accepted = describe.map(gx.allow_failure(fail_on.map([3, 4], gx.unmapped(4))))
    run = compute(graph, keep="all")
    assert run.ok  # every failure was allowed by the calls around it
    assert [run[n] for n in after] == [1, 2]
    assert [run[n] for n in seen] == [("state", "Completed"), ("state", "Failed")]
    assert [run[n] for n in accepted] == [("value", 3), ("exception", "item 4")]


def test_a_node_as_the_iterable_is_a_type_error_saying_what_to_do():
    graph = gx.Graph()
    with graph:
        one = add(1)
        with pytest.raises(TypeError, match=r"argument 0 is a single Node \(add-0\).*result\(\)"):
            add.map(one)
        with pytest.raises(TypeError, match=r"b= is a single Node"):
            add.map([1, 2], b=one)
        with pytest.raises(TypeError, match="single Node"):
            add.map(gx.allow_failure(one))
    assert len(graph) == 1  # nothing was added by the refused calls


def test_mismatched_lengths_and_nothing_to_map_are_clear_errors():
    graph = gx.Graph()
    with graph:
        with pytest.raises(
            ValueError, match=r"differ in length \(argument 0 has 3, b= has 2\).*gx.unmapped"
        ):
            add.map([1, 2, 3], b=[1, 2])
        with pytest.raises(TypeError, match="nothing to map over"):
            add.map(1, b=gx.unmapped([1, 2]))
    assert len(graph) == 0


def test_map_outside_a_graph_flow_or_pool_says_where_to_call_it():
    with pytest.raises(RuntimeError, match=r"inside a @gx.flow") as info:
        add.map([1, 2])
    assert ".map() outside `with graph:`" in str(info.value)  # not .submit() alone


# -- a flow and a pool block: futures -------------------------------------------------


def test_map_in_a_flow_submits_every_call_at_once(scheduler):
    seen = {}

    @flow_on(scheduler)
    def body():
        started = time.monotonic()
        futures = nap.map([0.4, 0.4])
        seen["returned_after"] = time.monotonic() - started
        seen["types"] = {type(f) for f in futures}
        seen["done_at_once"] = [f.done() for f in futures]
        sums = add.map(futures, futures)  # futures as items
        return [f.result() for f in sums]

    assert body() == [0.8, 0.8]
    assert seen["types"] == {gx.Future}
    if scheduler != "sync":  # sync runs each call as it is admitted, in its own thread
        assert seen["returned_after"] < 0.3
        assert seen["done_at_once"] == [False, False]


def test_map_under_a_pool_block_returns_futures():
    with gx.Pool(workers=2):  # (its own: leaving the block closes the pool)
        futures = add.map(range(4), b=1)
        assert all(isinstance(f, gx.Future) for f in futures)
        assert [f.result() for f in futures] == [1, 2, 3, 4]


def test_mapped_futures_have_prefect_3s_result_and_wait(scheduler):
    # Prefect 3's task.map returns a PrefectFutureList: `.result()` is the form
    # people copy. In a lazy graph map returns plain nodes (nothing to wait for).
    @flow_on(scheduler)
    def body():
        futures = add.map(range(3), b=10)
        assert futures.wait() is None
        assert all(f.done() for f in futures)
        values = futures.result()
        errors = fail_on.map([1, 2, 3], bad=2).result(raise_on_failure=False)
        return type(futures), values, [type(e).__name__ for e in errors]

    kind, values, errors = body()
    assert kind is gx.FutureList and issubclass(kind, list)
    assert values == [10, 11, 12]
    assert errors == ["int", "ValueError", "int"]
    with gx.Graph():
        assert type(add.map([1, 2])) is list


@gx.task
def kind_of(values):
    return type(values).__name__, list(values)


def test_mapped_futures_filled_in_are_a_plain_list(scheduler):
    # Futures in a FutureList, passed on or returned, arrive as their values in a
    # plain list, as they did before map returned a FutureList: never a FutureList
    # of values (whose .result() would fail), nor another cache key.
    @flow_on(scheduler)
    def body():
        squares = add.map(range(3), b=10)
        passed = kind_of.submit(squares).result()
        called = kind_of(add.map(range(2), b=1))  # a plain call in a flow
        return squares, passed, called

    returned, passed, called = body()
    assert type(returned) is list and returned == [10, 11, 12]
    assert passed == ("list", [10, 11, 12])
    assert called == ("list", [1, 2])


def test_mapped_futures_result_raises_the_first_failure_or_times_out():
    with gx.Pool(workers=2):
        with pytest.raises(ValueError):
            fail_on.map([1, 2, 3], bad=2).result()
        slow = nap.map([1.0, 0])  # (the block waits for it at its end)
        with pytest.raises(TimeoutError, match=r"1 of 2 futures did not finish within 0\.2 s"):
            slow.result(timeout=0.2)


def test_call_keywords_apply_to_every_mapped_call_in_a_flow(scheduler):
    @flow_on(scheduler)
    def body():
        failed = explode.submit("prerequisite")
        after = add.map([1, 2], wait_for=[failed], allow_failure=True)
        states = fail_on.map([1, 2], gx.unmapped(2), return_state=True)  # final States
        own = fail_on.map([5, 6], gx.unmapped(6), allow_failure=True)  # never looked at
        return [f.result() for f in after], [s.name for s in states], len(own)

    assert body() == ([1, 2], ["Completed", "Failed"], 2)  # no GraphFailed


def test_a_future_as_the_iterable_is_a_type_error(scheduler):
    @flow_on(scheduler)
    def body():
        listing = add.submit([1, 2], [])
        with pytest.raises(TypeError, match=r"single Future \(add-0\).*future.result\(\)"):
            add.map(listing)
        return add.map(listing.result(), b=1)

    assert body() == [2, 3]


def test_a_map_that_fails_part_way_leaves_the_graph_as_it_was():
    # One map is one call: its first calls stayed in the graph, half a map.
    named = gx.task(task_run_name=lambda x: f"n-{10 // x}")(lambda x: x)
    plain = gx.task(name="plain")(lambda x: x)
    other = gx.Graph()
    with other:
        foreign = plain(9)
    graph = gx.Graph()
    with graph:
        first = plain.map([1, 2])
        with pytest.raises(ZeroDivisionError):
            named.map([1, 2, 0, 4])
        with pytest.raises(TypeError, match="belongs to another graph"):
            plain.map([1, 2, foreign])
        after = plain(3)
    assert len(graph) == 3 and graph.nodes == [*first, after]
    assert after.name == "plain-2"  # the names go on from where the graph was
