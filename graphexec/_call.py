"""What the scheduler hands an executor (a :class:`Call`) and what comes back (an outcome).

Every executor — the process :class:`Pool`, the thread executor and the
in-process "sync" executor — offers the same four operations to the scheduler::

    submit(call) -> bool          False: no free slot now, try again after poll()
    poll(timeout) -> [outcome]    block until something finished or timeout (seconds)
    cancel_running() -> [call]    stop everything in flight (fail_fast, Ctrl-C)
    close()                       idempotent

An outcome is a tuple ``(call, kind, value)``; ``kind`` is one of the
constants below. For ``OK`` the value is a handle (the value itself, or a
``Payload`` from a worker); for ``ERROR`` it is the exception, already
carrying the remote traceback as ``__cause__``. ``REQUEUE`` gives back a call
that never started (it was queued behind a call whose worker died).

Chains (process pool only): a call may carry ``then``, the calls of a chain of
sole consumers to run right behind it on the same worker. Each value but the
last stays in that worker (its outcome is ``OK`` with the value ``HELD``) and
is handed to the next call in memory (``_worker.handover``: the object itself
where nothing else can see it, else a copy), never through the parent or
shared memory. The scheduler builds a chain only where nothing could need such a
value again (see ``Scheduler._chain``), so a value lost with its worker is
never missed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ._errors import TaskTimeout
from ._graph import substitute
from ._serialize import materialize

OK = 0
ERROR = 1
REQUEUE = 2


class _Held:
    """The value of a chained call, kept by the worker that made it for the next call."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<value held by a worker for the next call of its chain>"

    def __reduce__(self) -> str:
        return "HELD"


HELD = _Held()


class Call:
    """One attempt at one node, as an executor sees it."""

    __slots__ = (
        "args",
        "cache",
        "finished",
        "fn",
        "has_nodes",
        "inputs",
        "kwargs",
        "name",
        "node",
        "number",
        "started",
        "then",
        "timeout",
        "wire",
        "worker",
    )

    def __init__(
        self,
        node: int,
        name: str,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        has_nodes: bool,
        inputs: dict[int, Any],
        timeout: float | None,
        number: int,
    ) -> None:
        self.node = node
        self.name = name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.has_nodes = has_nodes
        self.inputs = inputs  # node index -> handle of the value the task receives
        self.timeout = timeout
        self.number = number  # 1 for the first attempt
        self.started = 0.0
        self.finished = 0.0
        self.worker: Any = None
        self.wire: bytes | None = None  # the executor's encoded form, made once
        self.cache: tuple[str, str, dict] | None = None  # (cache dir, key, meta) to write
        self.then: list[Call] | None = None  # a chain to run behind this call (see above)

    def __repr__(self) -> str:
        return f"<Call {self.name} attempt {self.number}>"


def run_inline(call: Call, worker: Any) -> tuple[Call, int, Any]:
    """Run a call in this process and return its outcome (sync and thread executors).

    ``KeyboardInterrupt`` is not caught: in the sync scheduler Ctrl-C must
    reach the scheduler, which cancels the run.
    """
    call.worker = worker
    call.started = time.time()
    try:
        if call.has_nodes:
            values = {i: materialize(h) for i, h in call.inputs.items()}
            args = substitute(call.args, values)
            kwargs = substitute(call.kwargs, values) if call.kwargs else {}
        else:
            args, kwargs = call.args, call.kwargs or {}
        value = call.fn(*args, **kwargs)
    except (Exception, SystemExit) as exc:
        call.finished = time.time()
        return call, ERROR, exc
    call.finished = time.time()
    if call.timeout is not None and call.finished - call.started > call.timeout:
        # In-process work cannot be interrupted; it is judged when it returns,
        # so the final states match those of the process scheduler.
        return call, ERROR, timeout_error(call)
    if call.cache is not None:
        write_cache(call.cache, value, call.name)
    return call, OK, value


def write_cache(cache: tuple[str, str, dict], value: Any, name: str) -> None:
    """Store a successful result; a failed write costs a warning, never the result."""
    from ._cache import CacheStore

    root, key, meta = cache
    try:
        CacheStore(root).write_value(key, value, meta)
    except Exception as exc:
        logging.getLogger("graphexec").warning(
            "%s: result not cached (%s: %s)", name, type(exc).__name__, exc
        )


def timeout_error(call: Call, how: str = "it was stopped") -> TaskTimeout:
    return TaskTimeout(
        f"{call.name} ran longer than its timeout of {call.timeout:g} s "
        f"(attempt {call.number}); {how}",
        node=call.name, timeout=call.timeout,
    )
