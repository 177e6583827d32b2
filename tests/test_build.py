"""Building graphs (SPEC §1): decorators, nodes, edges, names and build-time errors."""

from __future__ import annotations

import os
import re
import time
from collections import namedtuple

import pytest

import graphexec as gx

Pair = namedtuple("Pair", "left right")


@gx.task
def inc(x):
    return x + 1


@gx.task(retries=2, name="loader")
def load(i):
    return i * 10


@gx.task
def echo(value):
    return value


@gx.task
def add(x, y):
    return x + y


def plain_double(x):
    return 2 * x


# -- decorators and plain calls ---------------------------------------------------


def test_bare_decorator_makes_a_task_callable_as_a_plain_function():
    assert isinstance(inc, gx.Task)
    assert inc(1) == 2
    assert inc.__name__ == "inc"
    assert inc.__doc__ is None or isinstance(inc.__doc__, str)


def test_decorator_with_options_keeps_options_and_plain_call():
    assert isinstance(load, gx.Task)
    assert load.options.retries == 2
    assert load.name == "loader"
    assert load(3) == 30


def test_plain_call_ignores_policy_keywords_and_return_state_gives_a_state():
    assert inc(1, allow_failure=True) == 2
    state = inc(1, return_state=True)
    assert isinstance(state, gx.State)
    assert state.is_completed()
    assert state.result() == 2

    @gx.task
    def bad():
        raise ValueError("plain failure")

    failed = bad(return_state=True)
    assert failed.is_failed()
    assert isinstance(failed.exception, ValueError)
    with pytest.raises(ValueError, match="plain failure"):
        failed.result()
    with pytest.raises(ValueError, match="plain failure"):
        bad()


def test_plain_call_with_wait_for_is_a_type_error():
    with pytest.raises(TypeError, match="outside a graph"):
        inc(1, wait_for=[object()])
    graph = gx.Graph()
    with graph:
        node = inc(1)
    with pytest.raises(TypeError, match="outside a graph"):  # a node alone, not a list
        inc(1, wait_for=node)
    assert inc(1, wait_for=[]) == 2  # nothing to wait for


def test_a_node_refuses_a_truth_test():
    # `if is_valid(x):` inside `with graph:` tested the placeholder, always true: the
    # other branch was silently never built. Refused, as dask refuses a Delayed's.
    graph = gx.Graph()
    with graph:
        node = inc(1)
        for test in (bool, lambda n: not n, lambda n: n or 1, lambda n: 1 if n else 0):
            with pytest.raises(TypeError, match=r"node 'inc-0' has no value yet.*run\[node\]"):
                test(node)
    assert node is not None  # the way to ask whether one was made
    assert graph.compute()[node] == 2


def test_a_future_is_true_as_in_prefect():
    # Prefect code that writes `if future:` (made or not) runs as written.
    with gx.Pool(workers=1):
        future = inc.submit(1)
        assert future and bool(future)
        assert future.result() == 2


@pytest.mark.parametrize("how", ["bare", "keyword", "in a list", "in a dict"])
def test_a_node_passed_to_a_task_outside_a_graph_says_so(how):
    # A task called outside `with graph:` runs at once: a node among its arguments
    # reached the function, which failed on it obscurely ("unsupported operand
    # type(s) for +: 'Node' and 'int'"), or not at all.
    graph = gx.Graph()
    with graph:
        node = inc(1)
    call = {
        "bare": lambda: inc(node),
        "keyword": lambda: inc(x=node),
        "in a list": lambda: plain_task([1, node]),
        "in a dict": lambda: plain_task({"a": node}),
    }[how]
    with pytest.raises(TypeError, match=r"called with the node inc-0 outside a graph"):
        call()


@pytest.mark.parametrize("how", ["bare", "in a list", "after the block"])
def test_a_future_passed_to_a_plain_call_outside_a_flow_says_so(how):
    # Inside `with gx.Pool():` (or after it) a plain call runs at once, here: a future
    # among its arguments reached the function ("unsupported operand type(s) for +:
    # 'Future' and 'int'"). In a flow a plain call runs on the flow's pool and
    # receives the future's value.
    with gx.Pool(workers=1):
        future = inc.submit(1)
        assert future.result() == 2
        if how == "bare":
            with pytest.raises(TypeError, match=r"called with the future of inc-0 outside a flow"):
                inc(future)
        elif how == "in a list":
            with pytest.raises(TypeError, match=r"future\.result\(\)"):
                plain_task([1, future])
        with pytest.raises(TypeError, match=r"\.submit\(\.\.\., wait_for=\.\.\.\)"):
            inc(1, wait_for=[future])
        assert inc.submit(future).result() == 3  # the way to pass it
    if how == "after the block":
        with pytest.raises(TypeError, match=r"called with the future of inc-0 outside a flow"):
            inc(future)


@gx.task
def plain_task(values):
    return values


def test_task_with_fn_and_options_is_refused():
    with pytest.raises(TypeError):
        gx.task(plain_double, retries=1)


def test_redecorating_a_task_changes_its_options():
    again = gx.task(retries=5)(inc)
    assert isinstance(again, gx.Task)
    assert again.options.retries == 5
    assert inc.options.retries == 0
    assert again(1) == 2


def test_with_options_returns_a_copy():
    quick = load.with_options(retries=0, name="quick")
    assert quick.options.retries == 0
    assert quick.name == "quick"
    assert load.options.retries == 2
    assert load.name == "loader"


# -- nodes and edges -----------------------------------------------------------


def test_calls_inside_a_graph_return_nodes_and_do_not_run(tmp_path):
    marker = tmp_path / "ran"

    @gx.task
    def touch():
        marker.write_text("x")

    graph = gx.Graph()
    with graph:
        node = touch()
    assert isinstance(node, gx.Node)
    assert not marker.exists()
    assert len(graph) == 1
    assert graph.nodes == [node]
    # outside the block the task is a plain function again
    touch()
    assert marker.exists()


def test_graph_add_with_plain_function_and_task():
    graph = gx.Graph()
    a = graph.add(plain_double, 4)
    b = graph.add(inc, a)
    c = graph.add(lambda x, y: x - y, b, y=1)
    assert [n.name for n in (a, b)] == ["plain_double-0", "inc-0"]
    assert c.name == "lambda-0"
    assert b.upstream == [a]
    assert c.upstream == [b]
    run = graph.compute(workers=0)
    assert run[c] == 8


def test_graph_add_takes_reserved_keywords():
    graph = gx.Graph()
    a = graph.add(inc, 1)
    b = graph.add(inc, 2, wait_for=[a])
    c = graph.add(echo, gx.allow_failure(b), return_state=True)
    d = graph.add(echo, c)
    assert b.upstream == [a]
    assert c.upstream == [b]
    run = graph.compute(workers=0, keep="all")
    assert run[b] == 3
    assert run[c] == 3
    assert isinstance(run[d], gx.State)  # return_state: dependents receive the State
    assert run[d].result() == 3


def test_upstream_lists_data_and_order_edges_once():
    graph = gx.Graph()
    with graph:
        a = inc(1)
        b = inc(2)
        c = add(a, a, wait_for=[a, b])
    assert c.upstream == [a, b]


@pytest.mark.parametrize("scheduler", ["processes", "sync", "threads"])
def test_nodes_nested_in_containers_are_replaced_by_values(compute):
    graph = gx.Graph()
    with graph:
        a = inc(0)  # 1
        b = inc(1)  # 2
        c = inc(2)  # 3
        got = echo(
            {
                "list": [a, [b, [c]]],
                "tuple": (a, (b,)),
                "dict": {"x": a, "nested": {"y": [b]}},
                "set": {a, b},
                "frozenset": frozenset([c]),
                "namedtuple": Pair(a, c),
                "key": {a: "one"},
                "plain": [1, "two", None],
            }
        )
    assert set(got.upstream) == {a, b, c}
    value = compute(graph)[got]
    assert value == {
        "list": [1, [2, [3]]],
        "tuple": (1, (2,)),
        "dict": {"x": 1, "nested": {"y": [2]}},
        "set": {1, 2},
        "frozenset": frozenset([3]),
        "namedtuple": Pair(1, 3),
        "key": {1: "one"},
        "plain": [1, "two", None],
    }
    assert type(value["namedtuple"]) is Pair


def test_wait_for_orders_without_passing_values(tmp_path):
    log = tmp_path / "log"

    @gx.task
    def write(text):
        with open(log, "a") as f:
            f.write(text + "\n")
            f.flush()
        time.sleep(0.05)

    graph = gx.Graph()
    with graph:
        first = write("first")
        second = write("second", wait_for=[first])
        third = write("third", wait_for=second)  # a single node is accepted too
    assert second.upstream == [first]
    assert third.upstream == [second]
    run = graph.compute(workers=2, keep="all")
    assert run.ok
    assert log.read_text().split() == ["first", "second", "third"]
    assert run[second] is None


def test_node_wait_for_adds_edges_after_creation():
    graph = gx.Graph()
    with graph:
        a = inc(1)
        b = inc(2)
    assert b.wait_for(a) is b
    assert b.upstream == [a]
    run = graph.compute(workers=0)
    assert run.state(a).finished <= run.state(b).started


# -- names -------------------------------------------------------------------------


def test_node_names_count_per_task_and_name_option():
    graph = gx.Graph()
    with graph:
        a0 = inc(1)
        a1 = inc(2)
        l0 = load(1)
        e0 = echo(a0)
        a2 = inc(3)
    assert [n.name for n in (a0, a1, l0, e0, a2)] == [
        "inc-0",
        "inc-1",
        "loader-0",
        "echo-0",
        "inc-2",
    ]
    assert repr(a0) == "<Node inc-0>"
    assert f"{a1}" == "inc-1"
    # names restart per graph
    other = gx.Graph()
    with other:
        assert inc(1).name == "inc-0"


def test_task_run_name_template_and_callable():
    @gx.task(task_run_name="sim-{seed}")
    def simulate(params, seed=7):
        return seed

    @gx.task(task_run_name=lambda i, **_: f"item#{i}")
    def item(i, scale=2):
        return i * scale

    graph = gx.Graph()
    with graph:
        s3 = simulate({"a": 1}, seed=3)
        s_default = simulate({"a": 1})
        first = item(1)
    assert s3.name == "sim-3"
    assert s_default.name == "sim-7"
    assert first.name == "item#1"
    run = graph.compute(workers=0)
    assert run.state(s3).node == "sim-3"
    assert run[s3] == 3


def test_task_run_name_naming_an_unknown_parameter_is_a_value_error():
    @gx.task(task_run_name="sim-{nope}")
    def simulate(seed):
        return seed

    graph = gx.Graph()
    with graph, pytest.raises(ValueError, match="nope"):
        simulate(1)


def test_task_run_name_with_arguments_not_matching_signature_is_a_type_error():
    @gx.task(task_run_name="sim-{seed}")
    def simulate(seed):
        return seed

    graph = gx.Graph()
    with graph, pytest.raises(TypeError, match="simulate"):
        simulate(1, 2)


def test_a_call_whose_name_fails_leaves_the_graph_as_it_was():
    # The name used to be made after the node's task, options and arguments were
    # appended: a failing name left those lists one longer than the names, and the
    # next node ran the failed call's task (a wrong value, without an error).
    @gx.task(task_run_name="bad-{nope}")
    def bad(x):
        return ("bad", x)

    @gx.task
    def good(x):
        return ("good", x)

    graph = gx.Graph()
    with graph:
        with pytest.raises(ValueError, match="nope"):
            bad(1)
        with pytest.raises(TypeError):
            bad(1, 2)  # the arguments do not match: the same
        node = good(42)
    assert node.index == 0 and len(graph) == 1
    assert graph.compute(workers=0)[node] == ("good", 42)


def test_task_run_name_callable_without_parameters_prefect_style():
    # Prefect's task_run_name callables take no arguments.
    @gx.task(task_run_name=lambda: "fixed-name")
    def fit(model):
        return model

    graph = gx.Graph()
    with graph:
        node = fit("lin")
    assert node.name == "fixed-name"
    assert graph.compute(workers=0)[node] == "lin"


# -- build-time errors --------------------------------------------------------------


def test_node_of_another_graph_is_a_type_error_naming_node_and_call_site():
    g1, g2 = gx.Graph("first"), gx.Graph("second")
    with g1:
        a = inc(1)
    with g2, pytest.raises(TypeError) as info:
        inc([a])
    message = str(info.value)
    assert "inc-0" in message
    assert "first" in message
    assert "test_build.py" in message
    assert len(g2) == 0  # nothing half-added

    with pytest.raises(TypeError, match="another graph"):
        g2.add(inc, 1, wait_for=[a])
    with pytest.raises(TypeError, match="another graph"):
        g2.add(echo, gx.allow_failure(a))


def test_cycle_through_wait_for_is_a_value_error_naming_the_cycle():
    graph = gx.Graph()
    with graph:
        a = inc(1)
        b = inc(a)
        c = inc(b)
    with pytest.raises(ValueError, match="cycle") as info:
        a.wait_for(c)
    message = str(info.value)
    for name in ("inc-0", "inc-1", "inc-2"):
        assert name in message
    assert "inc-0 -> inc-1 -> inc-2 -> inc-0" in message
    assert a.upstream == []  # the graph is unchanged
    with pytest.raises(ValueError, match="inc-0 -> inc-0"):
        a.wait_for(a)
    assert graph.compute(workers=0)[c] == 4


def test_wait_for_accepts_allow_failure_but_no_other_objects():
    graph = gx.Graph()
    with graph:
        a = inc(1)
        ok = inc(2, wait_for=[gx.allow_failure(a)])
        with pytest.raises(TypeError, match=r"wait_for.*int 3") as info:
            inc(2, wait_for=[a, 3])
        assert "test_build.py" in str(info.value)  # the call site
        with pytest.raises(TypeError, match="wait_for"):
            inc(2, wait_for="inc-0")
        nested = inc(2, wait_for=[[a]])  # (searched like an argument's containers)
    assert ok.upstream == [a] and nested.upstream == [a]
    assert len(graph) == 3
    with pytest.raises(TypeError, match="wait_for"):
        ok.wait_for(42)
    g2 = gx.Graph()
    with g2:
        other = inc(1)
    with pytest.raises(TypeError, match="another graph"):
        ok.wait_for(other)


@pytest.mark.parametrize("keyword", ["wait_for", "allow_failure", "return_state"])
def test_reserved_parameter_names_are_refused_at_decoration(keyword):
    namespace: dict = {}
    exec(f"def f(x, {keyword}=None):\n    return x", namespace)
    fn = namespace["f"]
    with pytest.raises(TypeError, match=keyword):
        gx.task(fn)
    with pytest.raises(TypeError, match=keyword):
        gx.task(retries=1)(fn)
    with pytest.raises(TypeError, match=keyword):
        gx.Graph().add(fn, 1)


def test_reserved_keyword_only_parameter_is_refused_too():
    def f(x, *, return_state):
        return x

    with pytest.raises(TypeError, match="return_state"):
        gx.task(f)


@pytest.mark.parametrize("thing", [42, "inc", None, [inc]])
def test_non_callable_is_a_type_error(thing):
    with pytest.raises(TypeError, match="expected a function"):
        gx.task(thing) if thing is not None else gx.task()(thing)
    with pytest.raises(TypeError, match="expected a function"):
        gx.Graph().add(thing)


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"retries": -1}, ValueError, "negative"),
        ({"retries": 1.5}, TypeError, "retries"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": float("inf")}, ValueError, "timeout"),
        ({"trigger": "sometimes"}, ValueError, "sometimes"),
        ({"retires": 3}, TypeError, "unknown option retires="),
        ({"retry_delay": -0.5}, ValueError, "retry_delay"),
        ({"retry_delay": []}, ValueError, "empty"),
        ({"retry_on": "ValueError"}, TypeError, "retry_on"),
        ({"allow_failure": "yes"}, TypeError, "allow_failure"),
        ({"return_state": 1}, TypeError, "return_state"),
        ({"name": ""}, TypeError, "name"),
        ({"max_concurrency": 0}, ValueError, "max_concurrency"),
        ({"retry_delay": 1, "retry_delay_seconds": 1}, TypeError, "alias"),
    ],
)
def test_invalid_task_options(options, error, pattern):
    with pytest.raises(error, match=pattern):
        gx.task(**options)(plain_double)
    with pytest.raises(error, match=pattern):
        inc.with_options(**options)


def test_invalid_call_time_policy_values():
    graph = gx.Graph()
    with graph, pytest.raises(TypeError, match="allow_failure"):
        inc(1, allow_failure="yes")
    assert len(graph) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"workers": -3}, ValueError, "workers=-3"),
        ({"workers": 1.5}, TypeError, "workers"),
        ({"memory_limit": "lots"}, ValueError, "lots"),
        ({"memory_limit": -1}, ValueError, "memory_limit"),
        ({"scheduler": "gpu"}, ValueError, "gpu"),
        ({"keep": "some"}, ValueError, "keep"),
        ({"memory_limit": "1GB", "scheduler": "sync"}, ValueError, "memory_limit"),
        ({"limits": {"db": 0}}, ValueError, "limits"),
    ],
)
def test_invalid_compute_arguments(kwargs, error, pattern, tmp_path):
    marker = tmp_path / "ran"
    graph = gx.Graph()
    graph.add(marker.write_text, "x")
    with pytest.raises(error, match=pattern):
        graph.compute(**kwargs)
    assert not marker.exists()


def test_compute_targets_must_be_nodes_of_this_graph():
    graph, other = gx.Graph(), gx.Graph()
    a = graph.add(inc, 1)
    b = other.add(inc, 1)
    with pytest.raises(TypeError, match="targets"):
        graph.compute("inc-0", workers=0)
    with pytest.raises(ValueError, match="another graph"):
        graph.compute(b, workers=0)
    assert graph.compute([a], workers=0)[a] == 2


def test_compute_targets_may_be_nested_lists_and_dicts_whose_keys_are_labels():
    graph = gx.Graph()
    a = graph.add(inc, 1)
    b = graph.add(inc, a)
    c = graph.add(inc, 10)
    for targets in ([{"k": b}], {"k": {"j": b}}, ({"k": [b]},)):
        run = graph.compute(targets, workers=0)
        assert run[b] == 3
        assert c.index not in run.members  # culled: only b's ancestors ran
    with pytest.raises(TypeError, match="targets must be nodes, got int"):
        graph.compute({"k": [b, 3]}, workers=0)
    assert graph.compute(gx.allow_failure(b), workers=0)[b] == 3  # as find_nodes reads it


def test_arguments_too_deep_or_holding_themselves_are_refused_clearly():
    # They crashed the build with graphexec's own RecursionError, or (a node a few
    # hundred levels deep) failed the node at run time, retried, on sync and threads.
    graph = gx.Graph()
    a = graph.add(inc, 1)
    nested = a
    for _ in range(50):
        nested = [nested]
    fine = graph.add(echo, nested)
    got = graph.compute(fine, workers=0)[fine]
    for _ in range(50):
        got = got[0]
    assert got == 2
    for _ in range(100):
        nested = [nested]
    with pytest.raises(TypeError, match=r"inc-0 is nested 15\d containers deep .*at most 100"):
        graph.add(echo, nested)
    plain = 1
    for _ in range(5000):
        plain = [plain]
    with pytest.raises(TypeError, match="deeper than Python's recursion limit, or contains"):
        graph.add(echo, plain)
    itself: list = [1]
    itself.append(itself)
    with pytest.raises(TypeError, match="contains itself"):
        graph.add(echo, itself)
    assert len(graph.nodes) == 2  # nothing of the refused calls was added


def test_an_add_cut_short_by_ctrl_c_leaves_no_column_out_of_step():
    # A Ctrl-C between an add's appends left the first columns one longer: the next
    # node then ran the cut-short call's function on its arguments (a wrong value,
    # silently). Here the cut is made by hand: the first three columns appended.
    graph = gx.Graph()
    with graph:
        first = inc(1)
    graph._tasks.append(graph._tasks[0])
    graph._opts.append(graph._opts[0])
    graph._args.append((41,))
    with graph:
        second = echo(100)
    run = graph.compute(workers=0)
    assert (run[first], run[second]) == (2, 100)
    with pytest.raises(KeyboardInterrupt), graph:
        graph._tasks.append(graph._tasks[0])
        raise KeyboardInterrupt
    assert len(graph._tasks) == len(graph._nodes) == 2


@gx.task
def keyword_only(a, *, scale, offset=0):
    return a * scale + offset


@gx.task
def anything(*args, **kwargs):
    return len(args) + len(kwargs)


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda: add(1, 2, 3), "too many positional arguments"),
        (lambda: add(1), "missing a required argument: 'y'"),
        (lambda: add(1, 2, z=3), "unexpected keyword argument 'z'"),
        (lambda: add(1, 2, x=3), "multiple values for argument 'x'"),
        # (Python 3.13 says "a required keyword-only argument")
        (lambda: keyword_only(1), "missing a required (keyword-only )?argument: 'scale'"),
        (lambda: keyword_only(1, 2), "too many positional arguments"),
    ],
)
def test_arguments_that_do_not_bind_are_refused_at_the_call(call, says):
    # They were found when the node ran, after its retries (and an overnight run's hours).
    graph = gx.Graph()
    with graph, pytest.raises(TypeError, match=f"at .*test_build.py:\\d+: .*{says}"):
        call()
    assert len(graph.nodes) == 0


def test_a_generator_argument_and_misspelt_switches_are_refused_at_once():
    # A generator was consumed when the task ran: its task calls then ran as plain
    # calls (sync, threads) or it failed to pickle (processes). fail_fast="no" was on.
    graph = gx.Graph()
    with graph, pytest.raises(TypeError, match=r"an argument is a generator.*list\(\.\.\.\)"):
        echo(inc(i) for i in range(3))
    assert len(graph.nodes) == 0
    with graph:
        echo(1)
    for key, value in (("fail_fast", "no"), ("raise_on_failure", None)):
        with pytest.raises(TypeError, match=f"{key}= must be True or False"):
            graph.compute(workers=0, **{key: value})
    assert graph.compute(workers=0, fail_fast=1, raise_on_failure=0).ok
    with pytest.raises(ValueError, match="timeout=-1 must be a number of seconds above 0"):
        gx.task(timeout=-1)(inc)


def test_arguments_that_bind_are_taken_in_every_form():
    graph = gx.Graph()
    with graph:
        nodes = [
            add(1, 2),
            add(1, y=2),
            add(x=1, y=2),
            keyword_only(2, scale=3),
            keyword_only(a=2, scale=3, offset=1),
            anything(),
            anything(1, 2, k=3),
            graph.add(lambda a, b=2: a + b, 1),
        ]
    run = graph.compute(workers=0)
    assert [run[n] for n in nodes] == [3, 3, 3, 6, 7, 0, 3, 3]


def test_node_result_before_any_compute_is_an_error():
    graph = gx.Graph()
    node = graph.add(inc, 1)
    with pytest.raises(RuntimeError, match="not been computed"):
        node.result()
    with pytest.raises(RuntimeError, match="not been computed"):
        node.state  # noqa: B018


def test_node_cannot_be_pickled():
    import pickle

    node = gx.Graph().add(inc, 1)
    with pytest.raises(TypeError, match="inc-0"):
        pickle.dumps(node)


def test_graphs_nest_and_must_exit_in_order():
    outer, inner = gx.Graph(), gx.Graph()
    with outer:
        a = inc(1)
        with inner:
            b = inc(2)
        c = inc(a)
    assert a.graph is outer and c.graph is outer and b.graph is inner
    assert len(outer) == 2 and len(inner) == 1


# -- scale -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_hundred_thousand_node_graph_builds_fast():
    @gx.task
    def step(x):
        return x

    graph = gx.Graph()
    start = time.perf_counter()
    with graph:
        previous = step(0)
        for i in range(1, 100_000):
            previous = step(previous) if i % 2 else step(i, wait_for=[previous])
    elapsed = time.perf_counter() - start
    assert len(graph) == 100_000
    assert previous.name == "step-99999"
    assert elapsed < 5.0, f"building 100,000 nodes took {elapsed:.2f} s"
    # the whole chain culls to itself and its names are readable
    assert re.fullmatch(r"step-\d+", graph.nodes[12345].name)


def test_nodes_cost_a_few_hundred_bytes():
    import tracemalloc

    @gx.task
    def step(x):
        return x

    graph = gx.Graph()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with graph:
            previous = step(0)
            for i in range(1, 20_000):
                previous = step(previous) if i % 2 else step(i, wait_for=[previous])
        per_node = (tracemalloc.get_traced_memory()[0] - before) / len(graph)
    finally:
        tracemalloc.stop()
    assert per_node < 1024, f"{per_node:.0f} bytes per node"


def test_graph_add_wraps_a_plain_function_once_per_graph():
    # One Task per function, not per call (#15): wrapping checks the signature,
    # which cost more than adding the node, and kept a wrapper per node.
    def plain(a, b=0):
        return a + b

    graph = gx.Graph()
    nodes = [graph.add(plain, i) for i in range(1000)]
    assert len({id(node.task) for node in nodes}) == 1
    assert nodes[5].task.fn is plain
    assert [n.name for n in nodes[:2]] == ["plain-0", "plain-1"]
    # a Task passed to graph.add is used as it is
    decorated = gx.task(plain)
    assert graph.add(decorated, 1).task is decorated


def test_graph_add_does_not_keep_functions_alive_after_the_graph():
    import gc
    import weakref

    def make():
        def fresh(x):
            return x

        return fresh

    fn = make()
    ref = weakref.ref(fn)
    graph = gx.Graph()
    graph.add(fn, 1)
    del fn, graph
    gc.collect()
    assert ref() is None


def test_the_garbage_collector_pauses_while_a_graph_is_built():
    import gc

    assert gc.isenabled()
    outer, inner = gx.Graph(), gx.Graph()
    with outer:
        assert not gc.isenabled()
        with inner:
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still builds
    assert gc.isenabled()
    # A collector the program disabled itself stays disabled.
    gc.disable()
    try:
        with outer:
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    # ... and one block raising re-enables it.
    with pytest.raises(ZeroDivisionError), outer:
        raise ZeroDivisionError
    assert gc.isenabled()


def test_a_child_forked_inside_with_graph_runs_task_calls_and_leaves_the_block_cleanly():
    import gc

    graph = gx.Graph()
    read, write = os.pipe()
    with graph:
        pid = os.fork()
        if pid == 0:  # the child: builds nothing of its parent's graph
            try:
                value = gx.task(lambda x: x * 2)(2)
                ok = value == 4 and len(graph.nodes) == 0
            except BaseException:
                ok = False
    if pid == 0:
        os.write(write, b"ok" if ok and gc.isenabled() else b"no")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 10) == b"ok"
    os.close(read)


@gx.task
def total(values):
    return sum(values)


@gx.task
def pick(params):
    return params["k"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheduler", ["sync", "processes"])
def test_a_container_changed_after_the_call_changes_neither_its_arguments_nor_edges(scheduler):
    # The call keeps the list or dict as it was (its edges were taken then): the
    # later items reached the task, which failed with an internal KeyError.
    graph = gx.Graph()
    with graph:
        acc = []
        totals = []
        for i in range(4):
            acc.append(inc(i))
            totals.append(total(acc))  # a running total: each call sees its own list
        params = {"k": inc(10)}
        first = pick(params)
        params["k"] = inc(20)
        second = pick(params)
        marked = total(gx.allow_failure(acc[:1]))
    assert [len(t.upstream) for t in totals] == [1, 2, 3, 4]
    kw = {"workers": 2} if scheduler == "processes" else {}
    run = graph.compute(scheduler=scheduler, **kw)
    assert [run[t] for t in totals] == [1, 3, 6, 10]
    assert (run[first], run[second], run[marked]) == (11, 21, 1)
    assert graph._args[first.index][0] is not params  # a copy, nodes and all
    assert len(acc) == 4 and isinstance(acc[0], gx.Node)  # the caller's own is untouched


class _Model:
    def __init__(self, scale):
        self.scale = scale

    def predict(self, x):
        return x * self.scale


def test_graph_add_of_a_bound_method_makes_one_wrapper_for_its_object():
    # model.predict is a new object at each access: each call made a wrapper of its
    # own (and the pool pickled the model again for every call).
    model, other = _Model(2), _Model(3)
    graph = gx.Graph()
    nodes = [graph.add(model.predict, i) for i in range(50)]
    more = graph.add(other.predict, 1)
    assert len({id(graph._tasks[n.index]) for n in nodes}) == 1
    assert graph._tasks[more.index] is not graph._tasks[nodes[0].index]
    assert len(graph._plain_tasks) == 2
    run = graph.compute(scheduler="sync")
    assert [run[n] for n in nodes[:3]] == [0, 2, 4] and run[more] == 3


def test_a_node_inside_a_dataclass_is_refused_at_the_call_on_every_scheduler():
    # sync and threads handed the task the Node itself (run.ok), the process pool
    # failed to pickle it: now the call says so, the same for all, at any depth.
    import dataclasses

    @dataclasses.dataclass
    class Config:
        source: object
        scale: int = 1

    @dataclasses.dataclass(slots=True)
    class Slotted:
        inner: object

    graph = gx.Graph()
    with graph:
        node = inc(1)
        for value, path in [
            (Config(node), r"Config\.source\)"),
            (Slotted(node), r"Slotted\.inner\)"),
            (Config([1, node]), r"Config\.source\[\.\.\.\]\)"),
            (Config(Slotted({"k": node})), r"Config\.source\.inner\[\.\.\.\]\)"),
            ([Config(node)], r"Config\.source\)"),
        ]:
            with pytest.raises(
                TypeError, match=r"node 'inc-0' is inside a \w+ dataclass \(" + path
            ):
                echo(value)
        fine = echo({"cfg": Config(3), "x": node})  # dataclasses without nodes: as before
    assert len(graph) == 2
    assert graph.compute(scheduler="sync")[fine]["cfg"] == Config(3)


def test_a_task_pickles_with_the_standard_pickle_by_its_name():
    # Its function's name finds the Task, so pickle refused the function inside it
    # ("not the same object"): a ProcessPoolExecutor or a Queue could not take one.
    import pickle

    assert pickle.loads(pickle.dumps(inc)) is inc
    copy = load.with_options(retries=5)
    back = pickle.loads(pickle.dumps(copy))
    assert back.fn is load.fn and back.options.retries == 5 and back.name == "loader"
    assert back(3) == load(3)


def test_wait_for_takes_nodes_in_any_iterable_and_the_containers_arguments_take():
    # A generator, dict.values(), a deque, a nested list were refused, though an
    # argument may hold nodes in all of them; node.wait_for([b]) was too.
    from collections import deque

    graph = gx.Graph()
    with graph:
        a, b, c, d = inc(1), inc(2), inc(3), inc(4)
        g1 = echo(0, wait_for=(n for n in (a, b)))
        g2 = echo(0, wait_for={"x": c}.values())
        g2b = echo(0, wait_for={"x": c})  # a dict: by its values (said "got str 'x'")
        g3 = echo(0, wait_for=[[a, b], deque([c])])
        g4 = echo(0, wait_for=[gx.allow_failure([[d]])])
        with pytest.raises(TypeError, match=r"echo\(\) at .*wait_for= takes nodes.*got int 5"):
            echo(0, wait_for=[a, 5])
    assert [n.name for n in g1.upstream] == ["inc-0", "inc-1"]
    assert [n.name for n in g2.upstream] == [n.name for n in g2b.upstream] == ["inc-2"]
    assert [n.name for n in g3.upstream] == ["inc-0", "inc-1", "inc-2"]
    assert [n.name for n in g4.upstream] == ["inc-3"]
    d.wait_for([a, b])
    assert [n.name for n in d.upstream] == ["inc-0", "inc-1"]
    with pytest.raises(TypeError, match=r"inc-3.wait_for\(\) at .*got str"):
        d.wait_for("inc-2")


@pytest.mark.timeout(60)
def test_a_task_of_a_module_cloudpickle_takes_by_value_goes_by_value(tmp_path, monkeypatch):
    # cloudpickle.register_pickle_by_value(module) sends a module the other side
    # cannot import (a dask worker's); its tasks were pickled by name regardless.
    import importlib
    import pickle
    import subprocess
    import sys

    import cloudpickle

    (tmp_path / "byvalue_tasks.py").write_text(
        "import graphexec as gx\n\n@gx.task(retries=1)\ndef inc(x):\n    return x + 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("byvalue_tasks")
    cloudpickle.register_pickle_by_value(module)
    try:
        data = cloudpickle.dumps(module.inc)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        sys.modules.pop("byvalue_tasks", None)
    code = (
        "import pickle, sys; t = pickle.loads(sys.stdin.buffer.read()); "
        "print(t(1), t.options.retries)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=data, capture_output=True, timeout=50, cwd="/"
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["2", "1"]
    assert pickle.loads(pickle.dumps(inc)) is inc  # an importable one: by name


def test_a_function_changed_in_place_is_checked_by_its_new_signature():
    # IPython's autoreload swaps a function's __code__ and __defaults__ in place: the
    # signature read once for it (kept per function) must be read again.
    def step(x, y):
        return x + y

    def two(graph, *args):
        with graph:
            return graph.add(step, *args)

    with pytest.raises(TypeError, match="missing a required argument: 'y'"):
        two(gx.Graph(), 1)
    step.__defaults__ = (10,)
    graph = gx.Graph()
    node = two(graph, 1)
    assert graph.compute(scheduler="sync")[node] == 11

    def step_v2(x, y, z):
        return x + y + z

    step.__code__, step.__defaults__ = step_v2.__code__, None
    with pytest.raises(TypeError, match="missing a required argument: 'z'"):
        two(gx.Graph(), 1, 2)
