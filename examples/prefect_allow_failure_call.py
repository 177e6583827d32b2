"""A Prefect form, verbatim: a plain call with ``allow_failure=True`` (issue #13).

Users copy this from answers that say "the failed state will be passed
downstream but won't prevent execution". Only the import differs from the
Prefect code. Real Prefect 3 refuses the keyword (``ParameterBindError``);
graphexec does what the answer promised: the plain call returns the Failed
``State`` instead of raising, ``task_2`` runs, and the flow ends without
raising, because the failure was allowed.

Run it::

    python examples/prefect_allow_failure_call.py
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
    # "The failed state will be passed downstream but won't prevent execution"
    failed_result = task_1(allow_failure=True)  # task_1 raises ValueError  # noqa: F841
    task_2()


my_flow()
print("my_flow ended without raising")

# What failed_result held, shown with the same call outside any flow (it means the same there):
print(f"task_1(allow_failure=True) returned {task_1(allow_failure=True)!r}")
