"""A Prefect form, verbatim: ``wait_for`` with the call keyword ``allow_failure=True`` (issue #13).

Users copy this from answers that say "task_2 will run even if task_1
fails". Only the import differs from the Prefect code. Real Prefect 3
refuses the keyword (``ParameterBindError``); its own spelling is
``task_2.submit(wait_for=[allow_failure(future_1)])``. In graphexec the call
keyword covers the call's ``wait_for`` list as if each entry were wrapped in
``gx.allow_failure``: ``task_2`` runs once ``task_1`` has failed, and the flow
ends without raising, because that failure was allowed.

Run it::

    python examples/prefect_wait_for_allow_failure.py
"""

from graphexec import flow, task


@task
def task_1():
    raise ValueError("task_1 failed")


@task
def task_2():
    print("task_2 ran")


@flow
def my_flow():
    future_1 = task_1.submit()  # fails
    # "task_2 will run even if task_1 fails"
    future_2 = task_2.submit(wait_for=[future_1], allow_failure=True)  # noqa: F841


my_flow()
print("my_flow ended without raising")
