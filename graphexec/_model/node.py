"""A node: the handle of one captured call, and the markers that decorate edges.

A :class:`Node` is a two-slot handle (graph, index) on a :class:`Graph`'s
parallel lists; ``allow_failure(...)`` marks the edges found inside it.
"""

from __future__ import annotations

import os
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .graph import Graph
    from .state import State
    from .task import Task

# Edge flags, OR-ed when one upstream appears several times in a call.
DATA = 1  # the task receives the upstream's value
ORDER = 2  # wait_for: ordering only
ALLOW = 4  # allow_failure: run even if that upstream failed or was skipped

# graphexec's own frames are skipped when naming the user's call site.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class allow_failure:  # noqa: N801 - spelled like a function, as in Prefect
    """Mark an upstream (or every upstream in a collection) as allowed to fail.

    The dependent runs even if that upstream failed or was skipped; in place of
    the value it receives the exception instance (:class:`UpstreamFailed` for a
    skipped upstream). In a collection only the failed items are replaced.

    Works as an argument and inside ``wait_for=``.

    Example::

        with graph:
            report = summarize(gx.allow_failure([a, b, 1]))
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"allow_failure({self.value!r})"

    # On the way to a worker the marker disappears: only the value inside is
    # sent, with its nodes replaced by their values.
    def __reduce__(self) -> Any:
        return (_identity, (self.value,))


def _identity(value: Any) -> Any:
    return value


class Node:
    """A call captured in a graph: a placeholder for its future value.

    Pass it as an argument to other task calls, or in ``wait_for=``. After a
    run, ``node.result()`` and ``node.state`` read the graph's latest run. It
    has no truth value (``if node:`` is a ``TypeError``): test ``run[node]``.
    """

    __slots__ = ("__weakref__", "graph", "index")

    # What to say when one is used in another graph (a Future says it its way).
    _ELSEWHERE = "node {name!r} belongs to another graph ({graph})"
    _ELSEWHERE_ADVICE = "Build dependent calls inside the same `with graph:` block"

    def __init__(self, graph: Graph, index: int) -> None:
        self.graph = graph
        self.index = index

    @property
    def name(self) -> str:
        """Readable name, unique in its graph unless given explicitly: ``simulate-17``."""
        return self.graph._names[self.index]

    @property
    def task(self) -> Task:
        """The task this node calls."""
        return self.graph._tasks[self.index]

    @property
    def upstream(self) -> list[Node]:
        """The nodes this one depends on (data and wait_for edges)."""
        nodes = self.graph._nodes
        return [nodes[i] for i in self.graph._deps[self.index]]

    @property
    def state(self) -> State:
        """This node's state in the graph's latest run."""
        return self.graph._latest_run_or_raise().state(self)

    def result(self, raise_on_failure: bool = True) -> Any:
        """This node's value in the graph's latest run (see :meth:`Run.result`)."""
        return self.graph._latest_run_or_raise().result(self, raise_on_failure=raise_on_failure)

    def wait_for(self, *upstream: Any) -> Node:
        """Add ordering edges after the node was created; returns the node.

        Raises:
            ValueError: the edge would close a cycle (the path is named).
            TypeError: an upstream is not a node of this graph.
        """
        self.graph._add_order_edges(self.index, upstream)
        return self

    def __repr__(self) -> str:
        run = self.graph._latest_run
        if run is not None and run._has(self.index):
            return f"<Node {self.name} ({run.state(self).name})>"
        return f"<Node {self.name}>"

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)

    def __bool__(self) -> bool:
        # ``if check(x):`` inside ``with graph:`` tests the placeholder, not the value
        # the task will return: always true, the other branch silently never built.
        # Refused as dask refuses a Delayed's truth. (A Future keeps Python's default:
        # Prefect's futures are true, and Prefect code is run as written.)
        raise TypeError(
            f"node {self.name!r} has no value yet: `if`, `and`, `or`, `not` and bool() on "
            "a node would decide before its task runs. Decide inside a task (a task that "
            "takes the node's value as an argument), or compute the graph and test "
            "run[node]; to check that a node was made, write `node is not None`"
        )

    def __reduce__(self) -> Any:
        raise TypeError(
            f"node {self.name!r} cannot be pickled: a node stands for a value that does not "
            "exist yet. graphexec finds nodes in arguments only inside lists, tuples, dicts, "
            "sets and deques; pass the node directly (or in one of those) instead of inside "
            "another object"
        )


def _user_frame() -> tuple[FrameType | None, int]:
    """The first frame outside graphexec above its caller's caller, and how many
    frames up from that caller it is (1: the caller's caller)."""
    level = 1
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and os.path.dirname(
        os.path.abspath(frame.f_code.co_filename)
    ).startswith(_PACKAGE_DIR):
        level += 1
        frame = frame.f_back
    return frame, level


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by its caller point at the user's
    line: the first frame outside graphexec."""
    return _user_frame()[1]


def call_site() -> str:
    """``file:line`` of the first frame outside graphexec (the user's call)."""
    frame = _user_frame()[0]
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"
