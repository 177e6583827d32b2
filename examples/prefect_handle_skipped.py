"""A Prefect form, verbatim: handling a task that did not run because of a failure (issue #13).

Users copy this from answers that say "task_2 won't start if task_1 fails"
and "you can handle failures explicitly". Only the import differs from the
Prefect code. Real Prefect 3 raises from ``future_2.result()`` too, and the
flow then ends Failed or Completed depending on what it returns. In graphexec
``future_2.result()`` raises ``gx.UpstreamFailed``; catching it counts as
having looked at ``task_1``'s failure behind it, so the flow ends without
raising. A failure nobody looked at, directly or through a skipped dependent,
would still make the flow raise ``gx.GraphFailed``.

Run it::

    python examples/prefect_handle_skipped.py
"""

from graphexec import flow, task


@task
def task_1():
    raise ValueError("task_1 failed")


@task
def task_2():
    return "never computed"


@flow
def my_flow():
    future_1 = task_1.submit()  # fails
    future_2 = task_2.submit(wait_for=[future_1])  # "task_2 won't start if task_1 fails"
    try:
        result = future_2.result()  # noqa: F841
    except Exception as e:
        print(f"Task 2 didn't run because: {e}")  # "You can handle failures explicitly"


my_flow()
print("my_flow ended without raising")
