"""Prefect patterns and their graphexec equivalents, each one runnable.

Every section shows the Prefect code in its docstring, then runs the
graphexec version and prints what happened. README.md ("Coming from
Prefect") has the same pairs side by side.

Run it::

    python examples/prefect_patterns.py
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import graphexec as gx

# -- tasks shared by the sections ------------------------------------------------


@gx.task
def measure(x: float) -> float:
    return x * 10


@gx.task
def risky(x: float) -> float:
    raise ValueError(f"sensor {x} is offline")


@gx.task
def describe(value: object) -> str:
    """Say what arrived in place of an upstream value."""
    if isinstance(value, gx.State):
        return f"a State: {value.name}, exception={value.exception!r}"
    if isinstance(value, BaseException):
        return f"the exception instance {value!r}"
    return f"the value {value!r}"


@gx.task
def publish() -> str:
    return "published"


def header(title: str) -> None:
    print(f"\n=== {title} ===")


# -- 1. return_state=True ----------------------------------------------------------


def return_state() -> None:
    """Prefect::

    state = risky(1, return_state=True)
    if state.is_failed(): ...
    """
    header("1. return_state=True")
    # Outside a graph a task is a plain function; return_state=True wraps the outcome.
    state = risky(1, return_state=True)
    print(f"plain call: {state!r}, is_failed()={state.is_failed()}")

    graph = gx.Graph()
    with graph:
        seen = describe(risky(2, return_state=True))  # or @gx.task(return_state=True)
    run = graph.compute(workers=2)  # does not raise: the dependent took the State
    print(f"in a graph the dependent received {run[seen]}")


# -- 2. allow_failure: a failing task whose dependents still run -----------------


def allow_failure() -> None:
    """Prefect::

    from prefect import allow_failure
    report(allow_failure(risky.submit(3)))
    """
    header("2. allow_failure")
    graph = gx.Graph()
    with graph:
        one = describe(gx.allow_failure(risky(3)))
        several = describe(gx.allow_failure([measure(1), risky(4), 7]))  # only failures replaced
    run = graph.compute(workers=2)
    print(f"describe received {run[one]}")
    print(f"on a list: {run[several]}")
    print(f"failed but handled: {[n.name for n in run.failed]}, run.ok={run.ok}")


# -- 3. submit()-style parallel tasks, results collected later ----------------------


@gx.task
def slow_square(x: int) -> int:
    time.sleep(0.2)
    return x * x


@gx.flow(workers=2)
def squares_flow() -> list[int]:
    futures = [slow_square.submit(i) for i in range(6)]  # all start now
    return [f.result() for f in futures]


def parallel_submit() -> None:
    """Prefect::

    @flow
    def squares():
        futures = [slow_square.submit(i) for i in range(6)]
        return [f.result() for f in futures]
    """
    header("3. independent tasks in parallel, results collected later")
    # Lazy: build the nodes, compute once, read the values.
    graph = gx.Graph()
    with graph:
        nodes = [slow_square(i) for i in range(6)]
    started = time.perf_counter()
    run = graph.compute(workers=2)
    elapsed = time.perf_counter() - started
    workers = sorted({run.state(n).history[-1].worker for n in nodes})
    print(
        f"lazy graph: {[run[n] for n in nodes]} on workers {workers} "
        f"in {elapsed:.1f} s (6 x 0.2 s of work)"
    )
    # Eager: the same code as Prefect's, with @gx.flow and task.submit().
    print(f"eager flow: {squares_flow()}")


# -- 4. wait_for=[a, b]: no start if an upstream fails -------------------------------


def wait_for() -> None:
    """Prefect::

    a = measure.submit(1)
    b = risky.submit(2)
    publish.submit(wait_for=[a, b])
    """
    header("4. wait_for=[a, b]")
    graph = gx.Graph()
    with graph:
        a = measure(1)
        b = risky(2)
        done = publish(wait_for=[a, b])
    try:
        graph.compute(workers=2)
    except gx.GraphFailed as failure:
        run = failure.run
        print(f"GraphFailed: {str(failure).splitlines()[0]}")
        print(f"publish: {run.state(done).name} ({run.state(done).message})")


# -- 5. wait_for combined with allow_failure -----------------------------------------


def wait_for_allow_failure() -> None:
    """Prefect::

    publish.submit(wait_for=[allow_failure(b), a])
    """
    header("5. wait_for + allow_failure")
    graph = gx.Graph()
    with graph:
        a = measure(1)
        b = risky(2)
        done = publish(wait_for=[gx.allow_failure(b), a])
    run = graph.compute(workers=2)  # the failure of b is handled: no GraphFailed
    print(
        f"publish: {run.state(done).name}, returned {run[done]!r}; "
        f"failed: {[n.name for n in run.failed]}, run.ok={run.ok}"
    )


# -- 6. retries ----------------------------------------------------------------------


# Prefect's spelling is accepted as is. The real code would say
# retry_delay_seconds=10; 0.1 keeps this demo fast.
@gx.task(retries=3, retry_delay_seconds=0.1)
def flaky_download(counter: str) -> str:
    with open(counter, "a+") as f:  # count attempts across worker processes
        f.write("x")
        f.seek(0)
        attempt = len(f.read())
    if attempt < 3:
        raise ConnectionError(f"attempt {attempt}: server busy")
    return f"downloaded on attempt {attempt}"


def retries() -> None:
    """Prefect::

    @task(retries=3, retry_delay_seconds=10)
    def flaky_download(): ...
    """
    header("6. retries=3, retry_delay_seconds")
    with tempfile.TemporaryDirectory() as tmp:
        graph = gx.Graph()
        with graph:
            got = flaky_download(os.path.join(tmp, "attempts"))
        run = graph.compute(workers=2)
    state = run.state(got)
    print(
        f"{run[got]}; attempts={state.attempts}, errors: "
        f"{[type(a.error).__name__ for a in state.history if a.error]}"
    )


# -- 7. caching ----------------------------------------------------------------------


@gx.task(cache_key_fn=gx.task_input_hash, cache_expiration=timedelta(hours=1))
def expensive_fit(n: int) -> float:
    time.sleep(0.5)
    return sum(1 / k**2 for k in range(1, n))


def caching() -> None:
    """Prefect::

    from prefect.tasks import task_input_hash

    @task(cache_key_fn=task_input_hash, cache_expiration=timedelta(hours=1))
    def expensive_fit(n): ...
    """
    header("7. cache_key_fn=task_input_hash, cache_expiration")
    with tempfile.TemporaryDirectory() as cache_dir:  # default: ./.graphexec-cache
        for attempt in ("first", "second"):
            graph = gx.Graph()
            with graph:
                fit = expensive_fit(100_000)
            started = time.perf_counter()
            run = graph.compute(workers=2, cache_dir=cache_dir)
            print(
                f"{attempt} run: {run.state(fit).name}, value {run[fit]:.6f}, "
                f"{time.perf_counter() - started:.2f} s"
            )


# -- 8. at most two tasks at a time ---------------------------------------------------


@gx.task(max_concurrency=2)
def query_db(i: int) -> int:
    time.sleep(0.3)
    return i


@gx.task(tags=["db"])
def write_db(i: int) -> int:
    time.sleep(0.3)
    return i


def most_at_once(run: gx.Run, nodes: list[gx.Node]) -> int:
    """The largest number of these nodes that were running at the same moment."""
    events = []
    for node in nodes:
        for attempt in run.state(node).history:
            events += [(attempt.started, 1), (attempt.finished, -1)]
    running = peak = 0
    for _, change in sorted(events):
        running += change
        peak = max(peak, running)
    return peak


def concurrency() -> None:
    """Prefect::

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def my_flow(): ...

    # or a tag limit: `prefect concurrency-limit create db 2` and @task(tags=["db"])
    """
    header("8. at most two at a time")
    graph = gx.Graph()
    with graph:
        queries = [query_db(i) for i in range(6)]
        writes = [write_db(i) for i in range(6)]
    run = graph.compute(workers=3, limits={"db": 2})
    print(
        f"workers=3: query_db (max_concurrency=2) ran at most {most_at_once(run, queries)} at once"
    )
    print(
        f"workers=3: write_db (tags=['db'], limits={{'db': 2}}) ran at most "
        f"{most_at_once(run, writes)} at once"
    )
    graph = gx.Graph()
    with graph:
        squares = [slow_square(i) for i in range(6)]
    run = graph.compute(workers=2)
    print(f"workers=2: slow_square ran at most {most_at_once(run, squares)} at once")


def main() -> None:
    return_state()
    allow_failure()
    parallel_submit()
    wait_for()
    wait_for_allow_failure()
    retries()
    caching()
    concurrency()
    print("\nall patterns ran")


if __name__ == "__main__":  # good practice; graphexec's workers never import this script
    main()
