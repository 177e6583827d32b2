"""The Prefect call forms users bring, as they wrote them (issue #13, part 1).

* The call keyword ``allow_failure=True`` means "failures around this call are
  allowed": a plain call returns the Failed ``gx.State`` instead of raising (in
  a flow and outside any flow), its own failure never blocks its dependents,
  and its ``wait_for`` list is covered as if each entry were wrapped in
  ``gx.allow_failure``. Failed *data* inputs still skip it.
* The task option ``@gx.task(allow_failure=True)`` keeps its meaning: its own
  failures never block; it does not cover ``wait_for``, and a plain call of it
  still raises.
* Catching the ``UpstreamFailed`` of a skipped future's ``.result()`` counts as
  looking at every failure behind the skip; a failure nobody looked at still
  makes the flow raise.

Every flow runs on ``processes`` and ``sync`` (the ``scheduler`` fixture).
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

import graphexec as gx

pytestmark = pytest.mark.timeout(60)


@gx.task
def task_1():
    raise ValueError("task_1 failed")


@gx.task
def task_2(*_):
    return "task_2 ran"


@gx.task
def explode(message="boom"):
    raise ValueError(message)


@gx.task
def ok(x=1):
    return x


@gx.task(allow_failure=True)
def tolerant(*_):
    return "tolerant ran"


@gx.task(allow_failure=True)
def tolerant_explode():
    raise ValueError("declared on the task")


def run_flow(body, scheduler):
    options = {"workers": 2} if scheduler != "sync" else {}
    return gx.flow(scheduler=scheduler, **options)(body)()


# -- form 1: a plain call with allow_failure=True ----------------------------------


def test_plain_call_with_allow_failure_returns_the_failed_state_and_the_flow_goes_on(scheduler):
    seen = {}

    def body():
        failed_result = task_1(allow_failure=True)  # raises in the task: never here
        seen["failed"] = failed_result
        seen["ok"] = ok(5, allow_failure=True)  # on success: the value
        return task_2()

    assert run_flow(body, scheduler) == "task_2 ran"  # no GraphFailed: handled
    state = seen["failed"]
    assert isinstance(state, gx.State) and state.is_failed()
    assert isinstance(state.exception, ValueError)
    assert str(state.exception) == "task_1 failed"
    assert seen["ok"] == 5


def test_plain_call_with_allow_failure_outside_any_flow():
    state = task_1(allow_failure=True)
    assert isinstance(state, gx.State) and state.is_failed()
    assert str(state.exception) == "task_1 failed"
    assert ok(3, allow_failure=True) == 3
    with pytest.raises(ValueError, match="task_1 failed"):
        task_1()  # without the keyword a plain call raises, as before
    with pytest.raises(TypeError, match="allow_failure= must be True or False"):
        ok(3, allow_failure="yes")


def test_task_option_allow_failure_still_raises_from_a_plain_call(scheduler):
    def body():
        with pytest.raises(ValueError, match="declared on the task"):
            tolerant_explode()
        return "caught"

    assert run_flow(body, scheduler) == "caught"


def test_submit_with_allow_failure_raises_from_result_but_counts_as_handled(scheduler):
    def body():
        looked = explode.submit("looked at", allow_failure=True)
        with pytest.raises(ValueError, match="looked at"):
            looked.result()  # a future still raises, as futures do
        explode.submit("never looked at", allow_failure=True)
        return "done"

    assert run_flow(body, scheduler) == "done"  # neither failure makes the flow raise


# -- form 2: wait_for covered by the call keyword ----------------------------------


def test_submit_wait_for_with_allow_failure_runs_after_the_failure(scheduler):
    def body():
        future_1 = task_1.submit()
        future_2 = task_2.submit(wait_for=[future_1], allow_failure=True)
        return future_1, future_2.state.name, future_2.result()

    with pytest.raises(ValueError, match="task_1 failed"):
        run_flow(body, scheduler)  # returning the failed future raises its exception

    def quiet():
        future_1 = task_1.submit()
        future_2 = task_2.submit(wait_for=[future_1], allow_failure=True)
        return future_2

    assert run_flow(quiet, scheduler) == "task_2 ran"  # future_1's failure was accepted


def test_allow_failure_keyword_does_not_cover_data_inputs(scheduler):
    seen = {}

    def body():
        bad = explode.submit("data input")
        dependent = task_2.submit(bad, allow_failure=True)  # data: still skipped
        seen["state"] = dependent.wait()

    with pytest.raises(gx.GraphFailed, match="explode-0") as info:
        run_flow(body, scheduler)
    assert seen["state"].name == "Skipped"
    assert [n.name for n in info.value.run.unhandled] == ["explode-0"]


def test_task_option_allow_failure_does_not_cover_wait_for(scheduler):
    seen = {}

    def body():
        bad = explode.submit("a prerequisite")
        waiter = tolerant.submit(wait_for=[bad])  # the option: its own failures only
        seen["state"] = waiter.wait()

    with pytest.raises(gx.GraphFailed, match="explode-0"):
        run_flow(body, scheduler)
    assert seen["state"].name == "Skipped"


def test_call_keyword_in_a_lazy_graph_inside_a_flow(scheduler):
    def body():
        graph = gx.Graph()
        with graph:
            a = explode("lazy prerequisite")
            after = task_2(wait_for=[a], allow_failure=True)
        run = graph.compute()
        return run[after], [n.name for n in run.failed], run.ok

    assert run_flow(body, scheduler) == ("task_2 ran", ["explode-0"], True)


# -- form 3: catching UpstreamFailed from a skipped future -------------------------


def test_catching_upstream_failed_handles_the_failure_behind_the_skip(scheduler):
    printed = []

    def body():
        future_1 = task_1.submit()
        future_2 = task_2.submit(wait_for=[future_1])
        try:
            future_2.result()
        except Exception as e:
            printed.append(f"Task 2 didn't run because: {e}")

    assert run_flow(body, scheduler) is None  # no GraphFailed for task_1
    why = "task_2-0 was skipped because its upstream task_1-0 failed"
    assert printed == [f"Task 2 didn't run because: {why}"]


def test_every_failure_behind_a_skip_and_through_skipped_chains_counts(scheduler):
    def body():
        a = explode.submit("a")
        b = explode.submit("b")
        both = task_2.submit(wait_for=[a, b])  # skipped by both
        chain = ok.submit(ok.submit(explode.submit("c")))  # skipped through a skip
        for skipped in (both, chain):
            with pytest.raises(gx.UpstreamFailed):
                skipped.result()
        return "went on"

    assert run_flow(body, scheduler) == "went on"


def test_a_failure_nobody_looked_at_still_raises(scheduler):
    def body():
        looked = explode.submit("looked at through a skip")
        skipped = task_2.submit(wait_for=[looked])
        try:
            skipped.result()
        except gx.UpstreamFailed:
            pass
        explode.submit("nobody looked")  # independent: unseen
        read_state = explode.submit("behind a skip whose state was read")
        other = task_2.submit(wait_for=[read_state])
        assert other.state.name in ("Pending", "Running", "Skipped")
        other.wait()
        assert other.state.name == "Skipped"  # reading a state is not a result()
        allowed = explode.submit("accepted by the dependent, not behind the skip")
        mixed = task_2.submit(gx.allow_failure(allowed), explode.submit("blocks"))
        with pytest.raises(gx.UpstreamFailed):
            mixed.result()

    with pytest.raises(gx.GraphFailed) as info:
        run_flow(body, scheduler)
    unhandled = sorted(str(info.value.run.state(n).exception) for n in info.value.run.unhandled)
    # "accepted ..." is behind no skip's cause and nothing ran to accept it;
    # "blocks" was looked at through the skip it caused.
    assert unhandled == [
        "accepted by the dependent, not behind the skip",
        "behind a skip whose state was read",
        "nobody looked",
    ]


def test_a_skipped_plain_call_raises_upstream_failed_and_catching_it_counts(scheduler):
    def body():
        bad = explode.submit("behind a plain call")
        try:
            ok(bad)
        except gx.UpstreamFailed as exc:
            return exc.upstream

    assert run_flow(body, scheduler) == "explode-0"


def test_async_def_tasks_and_flows_are_refused_when_decorated():
    # They were accepted, then failed at their first call with errors that
    # blamed pickling or said to call inside a flow.
    async def fetch(x):
        return x

    with pytest.raises(TypeError, match=r"fetch is an async def.*asyncio\.run"):
        gx.task(fetch)
    with pytest.raises(TypeError, match=r"fetch is an async def"):
        gx.task(retries=2)(fetch)
    with pytest.raises(TypeError, match=r"@flow: fetch is an async def.*flow's body"):
        gx.flow(workers=2)(fetch)
    with pytest.raises(TypeError, match=r"async def"):
        gx.Graph().add(fetch, 1)


# -- decorator keywords: Prefect's metadata accepted, the others say what to write --

QUICKSTART = """
import graphexec as gx

@gx.task(log_prints=True, description="says hello", version="2")
def hello(name):
    print(f"Hello {name}!")
    return name

@gx.flow(log_prints=True, flow_run_name="greet-{n}", workers=2, validate_parameters=False)
def greet(n=2):
    return [hello.submit(f"p{i}") for i in range(n)]

print("VALUES", greet(), greet(n=3, return_state=True).name)
"""


@pytest.mark.timeout(60)
def test_prefect_metadata_keywords_run_as_written_and_prints_reach_the_terminal(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(QUICKSTART)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert "VALUES ['p0', 'p1'] Completed" in out
    # log_prints=True: what the task prints reaches the terminal, on its node's line
    assert {"[hello-0] Hello p0!", "[hello-1] Hello p1!", "[hello-2] Hello p2!"} <= set(out)


def test_description_and_version_read_back_as_prefect_does():
    @gx.task
    def plain(x):
        """Twice x."""
        return 2 * x

    described = plain.with_options(description="doubles", version="1.2")
    assert (plain.description, plain.version) == ("Twice x.", None)
    assert (described.description, described.version) == ("doubles", "1.2")
    assert described(3) == 6  # the options change nothing else

    def body(n):
        """A sweep."""
        return n

    assert gx.flow(body).description == "A sweep."
    made = gx.flow(description="sweeps", version="7", log_prints=False)(body)
    assert (made.description, made.version, made(4)) == ("sweeps", "7", 4)
    with pytest.raises(TypeError, match=r"version= must be a string, got int"):
        gx.task(version=2)(body)
    with pytest.raises(TypeError, match=r"log_prints= must be True, False or None"):
        gx.flow(log_prints="yes")(body)


def test_flow_run_name_names_each_calls_run(scheduler):
    seen = []

    def hook(flow, flow_run, state):
        seen.append((flow.name, flow_run.name, state.name))

    def body(seed, scale=2):
        return seed * scale

    options = {"workers": 2} if scheduler != "sync" else {}
    templated = gx.flow(
        flow_run_name="sim-{seed}-x{scale}", on_completion=[hook], scheduler=scheduler, **options
    )(body)
    assert templated(3) == 6
    assert templated(seed=1, scale=5) == 5
    by_callable = gx.flow(
        flow_run_name=lambda: "fixed", on_completion=[hook], scheduler=scheduler, **options
    )(body)
    by_callable(1)
    assert seen == [
        ("body", "sim-3-x2", "Completed"),
        ("body", "sim-1-x5", "Completed"),
        ("body", "fixed", "Completed"),
    ]
    with pytest.raises(ValueError, match=r"flow_run_name='\{sed\}' names 'sed', which is not a"):
        gx.flow(flow_run_name="{sed}", scheduler=scheduler, **options)(body)(1)
    with pytest.raises(TypeError, match=r"missing a required argument|required positional"):
        templated()  # does not bind: Python's own error, not the template's
    # A name that cannot be made leaves no run open on a pool (it was made after
    # the pool's lease was taken, outside what closes it)
    with gx.Pool(workers=1) as own:
        bad = gx.flow(flow_run_name="{sed}", pool=own)(body)
        for _ in range(3):
            with pytest.raises(ValueError, match="flow_run_name="):
                bad(1)
        assert own._shared._leases == []


@pytest.mark.parametrize(
    ("decorator", "options", "says"),
    [
        (
            gx.task,
            {"cache_policy": object()},
            r"Prefect's cache_policy= has no counterpart here: give cache=True",
        ),
        (gx.task, {"persist_result": True}, r"persist_result=.*cache=True keeps them across runs"),
        (gx.task, {"result_storage": "s3/bucket"}, r"result_storage=.*cache_dir="),
        (gx.task, {"result_serializer": "json"}, r"result_serializer=.*pickled"),
        (gx.task, {"on_running": []}, r"on_running=.*on_node_start"),
        (
            gx.flow,
            {"retries": 2},
            r"retries=.*give retries= \(and retry_delay_seconds=\) to its tasks",
        ),
        (gx.flow, {"retry_delay_seconds": 5}, r"retry_delay_seconds=.*to its tasks"),
        (gx.flow, {"timeout_seconds": 60}, r"timeout_seconds=.*to its tasks"),
        (gx.flow, {"validate_parameters": True}, r"does not validate or convert"),
        (gx.flow, {"task_runner": object()}, r"task_runner=.*workers=N"),
        (gx.flow, {"cache_policy": object()}, r"cache_policy=.*cache=True"),
    ],
)
def test_prefect_keywords_done_another_way_say_what_to_write(decorator, options, says):
    def body(x=1):
        return x

    with pytest.raises(TypeError, match=says):
        decorator(**options)(body)
    with pytest.raises(TypeError, match=r"unknown option\(?s?\)? bogus"):
        decorator(bogus=1)(body)  # an unknown keyword of no one still lists the known ones


# -- a task defined in a class is a method ------------------------------------------


class Model:
    def __init__(self, k):
        self.k = k

    @gx.task(retries=1)
    def score(self, x):
        """Scaled by the model."""
        return self.k * x


def test_a_task_defined_in_a_class_is_a_method_of_its_instances(scheduler):
    # It was called without its instance ("missing a required argument: 'x'").
    model = Model(3)
    graph = gx.Graph()
    with graph:
        one = model.score(2)
        many = model.score.map([1, 2, 3])  # the instance whole to every call
        added = graph.add(model.score, 5)
        renamed = model.score.with_options(name="fast")(7)
    options = {"workers": 2} if scheduler != "sync" else {}
    run = graph.compute(scheduler=scheduler, **options)
    assert (run[one], [run[n] for n in many], run[added], run[renamed]) == (6, [3, 6, 9], 15, 21)
    assert (one.name, added.name, renamed.name) == ("score-0", "score-4", "fast-0")
    assert run.state(one).attempts == 1
    assert graph.nodes[added.index].task is Model.score  # graph.add kept the task, options and all
    retried = gx.task(retries=3)(model.score)  # re-optioned, still bound
    assert retried.options.retries == 3 and retried(1) == 3

    def body():
        return model.score.submit(4).result(), model.score.map([1, 2]).result()

    assert run_flow(body, scheduler) == (12, [3, 6])
    assert model.score(10) == 30  # a plain call
    assert Model.score.name == "score" and model.score.description == "Scaled by the model."
    assert isinstance(Model.score, gx.Task)  # through the class: the task itself


@gx.task
def _load(x):
    return x * 10


class Steps:  # a namespace of module-level tasks: not methods
    load = _load

    @gx.task
    @staticmethod
    def parse(x):
        return x + 1


def test_a_task_put_in_a_class_or_made_static_is_not_bound():
    # Binding every task reached through an instance broke both (one argument too many)
    steps = Steps()
    assert steps.load(1) == 10 and Steps.load(1) == 10
    assert steps.parse(1) == 2 and Steps.parse(1) == 2
    graph = gx.Graph()
    with graph:
        node = steps.parse(41)
    assert graph.compute(workers=0)[node] == 42


class Units:
    factor = 10

    @gx.task(retries=1)
    @classmethod
    def task_over_classmethod(cls, x):
        return cls.factor * x

    @classmethod
    @gx.task
    def classmethod_over_task(cls, x):
        return cls.factor * x


class MoreUnits(Units):
    factor = 100


@pytest.mark.parametrize("name", ["task_over_classmethod", "classmethod_over_task"])
def test_a_classmethod_task_passes_its_class(name):
    # @classmethod over @gx.task lost the class on Python 3.9 to 3.12 ("missing a
    # required argument: 'x'"); @gx.task over @classmethod was refused as not callable.
    for owner in (Units, Units(), MoreUnits):
        assert getattr(owner, name)(2) == (200 if owner is MoreUnits else 20)  # a plain call
    graph = gx.Graph()
    with graph:
        one = getattr(Units, name)(2)
        sub = getattr(MoreUnits, name)(3)
        through_instance = getattr(Units(), name)(4)
    run = graph.compute(workers=1)
    assert (run[one], run[sub], run[through_instance]) == (20, 300, 40)
    assert one.name == f"{name}-0"


def test_a_task_over_a_classmethod_submits_maps_and_keeps_its_options():
    method = Units.task_over_classmethod
    assert method.options.retries == 1 and repr(method) == "<Task task_over_classmethod of Units>"
    faster = method.with_options(retries=0)
    assert faster.options.retries == 0 and faster(1) == 10
    graph = gx.Graph()
    with graph:
        many = MoreUnits.task_over_classmethod.map([1, 2])  # the class whole to every call
    run = graph.compute(workers=1)
    assert [run[n] for n in many] == [100, 200]
    with gx.Pool(workers=1):
        assert Units.task_over_classmethod.submit(5).result() == 50


@pytest.mark.parametrize("name", ["task_over_classmethod", "classmethod_over_task"])
def test_a_classmethod_task_is_added_re_optioned_and_pickled_by_name(name):
    # graph.add and gx.task(...) of one lost the class on Python 3.13 (a plain bound
    # method there); the standard pickle refused one ("not the same object as
    # ...Units.task_over_classmethod"): a task is pickled by its name.
    method = getattr(MoreUnits, name)
    graph = gx.Graph()
    with graph:
        added = graph.add(method, 3)
        retried = gx.task(retries=2)(method)
        again = retried(4)
    run = graph.compute(workers=1)
    assert (run[added], run[again]) == (300, 400)
    assert retried.options.retries == 2 and run.state(again).attempts == 1
    raw = vars(Units)[name]
    task = raw if isinstance(raw, gx.Task) else raw.__func__
    assert pickle.loads(pickle.dumps(task)) is task
    assert pickle.loads(pickle.dumps(getattr(Units, name)))(2) == 20
