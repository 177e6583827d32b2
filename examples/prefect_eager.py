"""Prefect patterns in their eager form: ``@gx.flow`` and ``task.submit()``, each one runnable.

``examples/prefect_patterns.py`` shows each pattern as a lazy graph; this file
shows the same patterns written the way Prefect code is written: a flow whose
body starts tasks with ``submit()`` and collects ``.result()`` later. Each
section's docstring has the Prefect code; the flow below it is the graphexec
version, and the section prints what happened.

A flow runs its body with a pool behind it. Futures are nodes of a graph that
grows while it runs, on the same scheduler as ``graph.compute()``, so every
policy (skips, allow_failure, return_state, retries, caching, limits) means
the same thing. Unlike Prefect 3, a flow never ends quietly with a failure
nobody looked at: it raises ``gx.GraphFailed`` at its end.

Run it::

    python examples/prefect_eager.py
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


@gx.task(return_state=True)
def risky_state(x: float) -> float:
    raise ValueError(f"sensor {x} is offline")


@gx.flow(workers=2)
def return_state_flow() -> None:
    state = risky_state(1)  # a plain call in a flow runs on the pool; here it returns a State
    print(f"plain call in a flow: {state!r}, is_failed()={state.is_failed()}")
    future = risky.submit(2, return_state=True)  # call-time spelling, on a future
    print(f"its dependent received {describe.submit(future).result()}")


def return_state() -> None:
    """Prefect::

    @task(return_state=True)
    def risky(x): ...

    @flow
    def my_flow():
        state = risky(1)
        if state.is_failed(): ...
    """
    header("1. return_state=True")
    return_state_flow()  # no GraphFailed: return_state handles the failure
    print("the flow returned normally")


# -- 2. allow_failure: a failing task whose dependents still run -----------------


@gx.flow(workers=2)
def allow_failure_flow() -> list[str]:
    bad = risky.submit(3)
    one = describe.submit(gx.allow_failure(bad))
    several = describe.submit(gx.allow_failure([measure.submit(1), risky.submit(4), 7]))
    return [one, several]  # futures in the return value are resolved


def allow_failure() -> None:
    """Prefect::

    from prefect import allow_failure

    @flow
    def my_flow():
        bad = risky.submit(3)
        return describe.submit(allow_failure(bad))
    """
    header("2. allow_failure on a future")
    one, several = allow_failure_flow()
    print(f"describe received {one}")
    print(f"on a list: {several}")
    print("both failures were accepted by a dependent: the flow returned normally")


# -- 3. submit()-style parallel tasks, results collected later ----------------------


@gx.task
def slow_square(x: int) -> dict[str, float]:
    started = time.time()
    time.sleep(0.2)
    return {"value": x * x, "started": started, "finished": time.time()}


def most_at_once(spans: list[dict[str, float]]) -> int:
    """The largest number of these tasks that were running at the same moment."""
    events = sorted([(s["started"], 1) for s in spans] + [(s["finished"], -1) for s in spans])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


@gx.flow(workers=2)
def squares_flow() -> list[dict[str, float]]:
    futures = [slow_square.submit(i) for i in range(6)]  # all start now, none waits
    print(f"submitted 6 tasks; done right away: {sum(f.done() for f in futures)}")
    return [f.result() for f in futures]  # blocks on each in turn


@gx.task
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


NAPS = [0.9, 0.1, 0.5]


@gx.flow(workers=3)
def as_they_finish() -> list[float]:
    futures = [nap.submit(s) for s in NAPS]
    return [f.result() for f in gx.as_completed(futures)]


def parallel_submit() -> None:
    """Prefect::

    @flow
    def squares():
        futures = [slow_square.submit(i) for i in range(6)]
        return [f.result() for f in futures]

    for future in as_completed(futures): ...
    """
    header("3. independent submit() tasks in parallel, results collected later")
    started = time.perf_counter()
    spans = squares_flow()
    elapsed = time.perf_counter() - started
    print(
        f"results: {[s['value'] for s in spans]}; {most_at_once(spans)} ran at once; "
        f"{elapsed:.1f} s for 6 x 0.2 s of work"
    )

    print(f"gx.as_completed gave naps of {NAPS} s back as {as_they_finish()} (completion order)")


# -- 4. wait_for=[a, b]: no start if an upstream fails -------------------------------


@gx.flow(workers=2)
def wait_for_flow() -> None:
    a = measure.submit(1)
    b = risky.submit(2)
    publish.submit(wait_for=[a, b])  # order only; skipped if a or b fails


def wait_for() -> None:
    """Prefect::

    @flow
    def my_flow():
        a = measure.submit(1)
        b = risky.submit(2)
        publish.submit(wait_for=[a, b])
    """
    header("4. wait_for=[a, b]")
    try:
        wait_for_flow()
    except gx.GraphFailed as failure:  # b failed and nobody handled it
        run = failure.run
        print(f"GraphFailed: {str(failure).splitlines()[0]}")
        done = next(n for n in run.nodes if n.name == "publish-0")
        print(f"publish: {run.state(done).name} ({run.state(done).message})")


# -- 5. wait_for combined with allow_failure -----------------------------------------


@gx.flow(workers=2)
def wait_for_allow_failure_flow() -> str:
    a = measure.submit(1)
    b = risky.submit(2)
    return publish.submit(wait_for=[gx.allow_failure(b), a])


def wait_for_allow_failure() -> None:
    """Prefect::

    publish.submit(wait_for=[allow_failure(b), a])
    """
    header("5. wait_for + allow_failure")
    print(
        f"publish ran and returned {wait_for_allow_failure_flow()!r}; "
        "b's failure was accepted, so the flow returned normally"
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


@gx.flow(workers=2)
def retries_flow(counter: str) -> tuple[str, gx.State]:
    future = flaky_download.submit(counter)
    return future.result(), future.state


def retries() -> None:
    """Prefect::

    @task(retries=3, retry_delay_seconds=10)
    def flaky_download(): ...

    @flow
    def my_flow():
        return flaky_download.submit().result()
    """
    header("6. retries=3, retry_delay_seconds")
    with tempfile.TemporaryDirectory() as tmp:
        value, state = retries_flow(os.path.join(tmp, "attempts"))
    print(
        f"{value}; attempts={state.attempts}, errors: "
        f"{[type(a.error).__name__ for a in state.history if a.error]}"
    )


# -- 7. caching ----------------------------------------------------------------------


@gx.task(cache_key_fn=gx.task_input_hash, cache_expiration=timedelta(hours=1))
def expensive_fit(n: int) -> float:
    time.sleep(0.5)
    return sum(1 / k**2 for k in range(1, n))


def fit_flow(cache_dir: str) -> gx.Flow:
    @gx.flow(workers=2, cache_dir=cache_dir)  # default: ./.graphexec-cache
    def fitting() -> tuple[str, float]:
        future = expensive_fit.submit(100_000)
        return future.wait().name, future.result()

    return fitting


def caching() -> None:
    """Prefect::

    from prefect.tasks import task_input_hash

    @task(cache_key_fn=task_input_hash, cache_expiration=timedelta(hours=1))
    def expensive_fit(n): ...

    @flow
    def fitting():
        return expensive_fit.submit(100_000).result()
    """
    header("7. cache_key_fn=task_input_hash, cache_expiration")
    with tempfile.TemporaryDirectory() as cache_dir:
        fitting = fit_flow(cache_dir)
        for attempt in ("first", "second"):
            started = time.perf_counter()
            name, value = fitting()
            print(
                f"{attempt} flow run: {name}, value {value:.6f}, "
                f"{time.perf_counter() - started:.2f} s"
            )


# -- 8. at most two tasks at a time ---------------------------------------------------


@gx.task(max_concurrency=2)
def query_db(i: int) -> dict[str, float]:
    started = time.time()
    time.sleep(0.2)
    return {"started": started, "finished": time.time()}


@gx.task(tags=["db"])
def write_db(i: int) -> dict[str, float]:
    started = time.time()
    time.sleep(0.2)
    return {"started": started, "finished": time.time()}


@gx.flow(task_runner_max_concurrency=2)  # Prefect notes' spelling of workers=2
def two_at_a_time() -> list[dict[str, float]]:
    return [slow_square.submit(i) for i in range(6)]


@gx.flow(workers=3, limits={"db": 2})
def limited() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    queries = [query_db.submit(i) for i in range(6)]
    writes = [write_db.submit(i) for i in range(6)]
    return queries, writes


def concurrency() -> None:
    """Prefect::

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def my_flow():
        futures = [slow_square.submit(i) for i in range(6)]

    # or a tag limit: `prefect concurrency-limit create db 2` and @task(tags=["db"])
    """
    header("8. at most two at a time")
    print(
        f"task_runner_max_concurrency=2: slow_square ran at most "
        f"{most_at_once(two_at_a_time())} at once"
    )
    queries, writes = limited()
    print(f"workers=3: query_db (max_concurrency=2) ran at most {most_at_once(queries)} at once")
    print(
        f"workers=3: write_db (tags=['db'], limits={{'db': 2}}) ran at most "
        f"{most_at_once(writes)} at once"
    )


def main() -> None:
    return_state()
    allow_failure()
    parallel_submit()
    wait_for()
    wait_for_allow_failure()
    retries()
    caching()
    concurrency()
    print("\nall eager patterns ran")


if __name__ == "__main__":
    main()
