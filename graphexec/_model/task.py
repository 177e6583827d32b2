"""The ``@task`` decorator and the stack of graphs that capture task calls."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import cloudpickle

from .node import Node, allow_failure
from .options import DEFAULT_OPTIONS, RESERVED_KEYWORDS, TaskOptions
from .seam import NOT_EAGER, surfaces
from .signature import parameter_names, signature
from .state import State
from .walk import SEQUENCES

if TYPE_CHECKING:
    from .graph import Graph

F = TypeVar("F", bound=Callable[..., Any])

# Graphs entered with ``with graph:`` on this thread, innermost last. Building
# is single-threaded by contract; a thread-local stack keeps a worker thread
# that calls a task from ever being captured by a graph another thread builds.
_local = threading.local()


def active_graph() -> Graph | None:
    """The innermost graph entered on this thread, or None."""
    stack = getattr(_local, "graphs", None)
    return stack[-1] if stack else None


def push_graph(graph: Graph) -> None:
    stack = getattr(_local, "graphs", None)
    if stack is None:
        stack = _local.graphs = []
    stack.append(graph)


def pop_graph(graph: Graph) -> None:
    stack = getattr(_local, "graphs", None)
    if stack is None and _forked:
        return  # a forked child leaving a block its parent entered: it built nothing
    if not stack or stack[-1] is not graph:
        raise RuntimeError("graphs must be exited in the reverse order they were entered")
    stack.pop()


def hide_graphs() -> list[Graph] | None:
    """Hide this thread's graphs while a task body runs here (the sync scheduler,
    inside ``with graph:``): its task calls are plain calls, as in a worker. Give
    the result to :func:`unhide_graphs` after."""
    stack = getattr(_local, "graphs", None)
    if stack:
        _local.graphs = None
    return stack


def unhide_graphs(stack: list[Graph] | None) -> None:
    if stack:
        _local.graphs = stack


_forked = False  # this process is a fork of one that may have been building


def _after_fork_in_child() -> None:
    """A forked child (a worker, the zygote) builds none of its parent's graphs,
    even if the thread that forked was inside ``with graph:`` (its task calls are
    plain calls there, and leaving that block is not an error)."""
    global _local, _forked
    _local = threading.local()
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_callable(fn: Any, where: str) -> None:
    """Refuse non-callables and functions whose parameters collide with call keywords."""
    if not callable(fn):
        raise TypeError(f"{where}: expected a function, got {type(fn).__name__} {fn!r}")
    refuse_coroutine_function(fn, where, "a task as a plain function in a worker process")
    params = parameter_names(fn)  # (none for a builtin without a signature)
    clash = [p for p in RESERVED_KEYWORDS if p in params]
    if clash:
        raise TypeError(
            f"{where}: {fn_name(fn)}() has a parameter named {clash[0]!r}, which graphexec "
            f"reserves as a call keyword ({', '.join(RESERVED_KEYWORDS)}); rename the parameter"
        )


def refuse_coroutine_function(fn: Any, where: str, what: str) -> None:
    """An ``async def`` would return a coroutine where a value is expected (a task's
    result, a flow's body): say so when it is decorated, not at its first call."""
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"{where}: {fn_name(fn)} is an async def; graphexec runs {what}, so it is not "
            "supported. Make it a def, and run what it awaits inside it with asyncio.run(...)"
        )


def fn_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name


_CONTAINERS = (*SEQUENCES, dict)  # walk's: the containers a node is found in


def _a_node_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Node | None:
    """A node among a plain call's arguments (and in the lists, tuples, sets, deques and dicts
    they are), if there is one; none is looked for deeper. Not ``walk.find_nodes``,
    which goes to any depth: a plain call (a task called inside another) may carry
    large containers, and this runs at every one of them."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Node):  # (a future of the eager API is one too)
            return value
        if isinstance(value, _CONTAINERS):
            for item in value.values() if isinstance(value, dict) else value:
                if isinstance(item, Node):
                    return item
    return None


class Task:
    """A function with graphexec options; calling it inside ``with graph:`` adds a node.

    Outside a graph the task is a plain function: ``simulate(p, seed=1)`` runs it
    in-process and returns its value, so tasks stay unit-testable.

    Use the :func:`task` decorator rather than this class directly.
    """

    # What a call must give (graph._arity), made at the first call in a graph
    _arity: tuple[Any, ...] | None = None

    def __init__(
        self,
        fn: Callable[..., Any],
        options: TaskOptions,
        method: bool | Literal["class"] | None = None,
    ) -> None:
        self.fn = fn
        self.options = options
        self.name = options.name or fn_name(fn)
        functools.update_wrapper(self, fn)
        # Whether it binds to an instance (see __get__): set by __set_name__ for a
        # function defined in that class's body; False for a staticmethod; "class"
        # for a classmethod (it binds to the class).
        self._method = method is True
        self._static = method is False
        self._classmethod = method == "class"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stack = getattr(_local, "graphs", None)  # active_graph(), inlined: the build's hot path
        if stack:
            return stack[-1]._add_call(self, args, kwargs)
        # Prefect's rule: a plain call in a flow runs the task on the flow's pool.
        value = surfaces.call_eagerly(self, args, kwargs)
        if value is not NOT_EAGER:
            return value
        return self._call_plain(args, kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        """Start the task now and return a :class:`Future` (Prefect's ``task.submit``).

        Works inside a ``@gx.flow`` and inside ``with gx.Pool(...):``; inside
        ``with graph:`` it adds a lazy node like a plain call. ``wait_for=``,
        ``allow_failure=`` and ``return_state=`` mean what they mean in a call;
        with ``return_state=True`` it also waits, as Prefect's does, and returns
        the task's final :class:`State` instead of the future.

        Raises:
            RuntimeError: outside a flow, a pool block or a graph.
        """
        graph = active_graph()
        if graph is not None:
            return graph._add_call(self, args, kwargs)
        wants_state = kwargs.get("return_state") is True
        future = surfaces.submit(self, args, kwargs)
        return future.wait() if wants_state else future

    def map(self, *args: Any, **kwargs: Any) -> list[Any]:
        """One call per item of the iterable arguments (Prefect's ``task.map``).

        Every iterable argument, positional or keyword, is mapped over, item by
        item, except strings and bytes; any other argument, and one wrapped in
        :class:`unmapped`, is passed whole to every call. ``gx.allow_failure``
        around an iterable marks each of its items. ``wait_for=``,
        ``allow_failure=`` and ``return_state=`` apply to every call. A
        generator is consumed once, here.

        Returns:
            Inside ``with graph:`` a list of :class:`Node`; in a flow or a
            ``with gx.Pool():`` block a :class:`FutureList` of futures, submitted
            at once (a list with Prefect 3's ``.result()`` and ``.wait()``; with
            ``return_state=True``, as in Prefect, their final states, once all
            are final).

        Raises:
            TypeError: no argument to map over, or an argument that is a node or
                future: its length is unknown while building (pass
                ``future.result()``, or build the calls inside a task).
            ValueError: the mapped arguments have different lengths.
            RuntimeError: outside a graph, a flow or a pool block.

        Example::

            with graph:
                fits = fit.map(seeds, data=gx.unmapped(table))
        """
        reserved = {k: kwargs.pop(k) for k in RESERVED_KEYWORDS if k in kwargs}
        columns: list[Any] = []
        lengths: dict[str, int] = {}
        for label, value in (
            *((f"argument {k}", v) for k, v in enumerate(args)),
            *((f"{k}=", v) for k, v in kwargs.items()),
        ):
            items = self._map_items(label, value)
            if items is None:
                columns.append(repeat(value.value if type(value) is unmapped else value))
            else:
                columns.append(items)
                lengths[label] = len(items)
        if not lengths:
            raise TypeError(
                f"{self.name}.map() got nothing to map over: give at least one list (or other "
                "iterable) argument; arguments wrapped in gx.unmapped() are passed whole"
            )
        if len(set(lengths.values())) > 1:
            sizes = ", ".join(f"{label} has {n}" for label, n in lengths.items())
            raise ValueError(
                f"{self.name}.map(): the mapped arguments differ in length ({sizes}); give "
                "them the same length, or wrap an argument passed whole in gx.unmapped()"
            )
        graph = active_graph()
        call: Callable[..., Any] = graph._add_call if graph is not None else surfaces.submit
        n_args = len(args)
        names = tuple(kwargs)
        calls: list[Any]
        # One map is one call to its user: one that fails part way (a task_run_name
        # that cannot be made, a node of another graph) leaves the graph as it was.
        mark = graph._mark() if graph is not None else None
        try:
            if not names and not reserved:  # the common form: positional iterables only
                calls = [call(self, row, {}) for row in zip(*columns)]
            else:
                calls = [
                    call(self, row[:n_args], {**dict(zip(names, row[n_args:])), **reserved})
                    for row in zip(*columns)
                ]
        except BaseException:
            if graph is not None and mark is not None:
                graph._rollback(mark)
            raise
        if graph is not None:
            return calls
        if reserved.get("return_state") is True:
            return [future.wait() for future in calls]  # Prefect's: their final States
        return surfaces.future_list(calls)  # (Prefect 3's: .result() and .wait() too)

    def _map_items(self, label: str, value: Any) -> list[Any] | None:
        """The items ``task.map`` maps ``value`` over, or None to pass it whole."""
        if type(value) is unmapped:
            return None
        if isinstance(value, Node):
            raise TypeError(
                f"{self.name}.map(): {label} is a single {type(value).__name__} "
                f"({value.name}), whose length is unknown until it has run: map over "
                "future.result() in a flow, or build the calls inside a task; wrap it in "
                "gx.unmapped() to pass it whole to every call"
            )
        if type(value) is allow_failure:
            inner = self._map_items(label, value.value)
            return None if inner is None else [allow_failure(v) for v in inner]
        if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Iterable):
            return None  # one value to its user, as in Prefect
        return list(value)

    def _call_plain(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        wait_for = kwargs.pop("wait_for", None)
        opts = self.options
        call_allows = False  # the call keyword allow_failure=True (not the task option)
        if "allow_failure" in kwargs or "return_state" in kwargs:
            overrides: dict[str, Any] = {
                k: kwargs.pop(k) for k in ("allow_failure", "return_state") if k in kwargs
            }
            opts = opts.updated(overrides, f"{self.name}() call")
            call_allows = overrides.get("allow_failure") is True
        if isinstance(wait_for, Node) or wait_for:  # (a node refuses a truth test)
            raise TypeError(
                f"{self.name}() called with wait_for= outside a graph or a flow: a plain call "
                "runs at once, in this process, and waits for nothing. Call it inside `with "
                "graph:` to build a node, or start it with .submit(..., wait_for=...) in a "
                "flow or a `with gx.Pool():` block"
            )
        node = _a_node_in(args, kwargs)
        if node is not None:  # (else the function gets a Node, and fails on it obscurely)
            if type(node) is Node:
                raise TypeError(
                    f"{self.name}() called with the node {node.name} outside a graph: a "
                    "node's value exists only once its graph is computed. Call it inside "
                    "`with graph:` to build a node, or pass the value (run[node], "
                    "node.result())"
                )
            raise TypeError(  # a future, outside a flow (a flow's plain call resolves it)
                f"{self.name}() called with the future of {node.name} outside a flow: a plain "
                "call runs at once, in this process, and would get the future itself. Pass "
                "its value (future.result()), or start the call with .submit(), which "
                "waits for the future and receives its value"
            )
        if opts.return_state:
            return State.from_call(self.name, self.fn, args, kwargs)
        if call_allows:
            # The call keyword: a failure is returned as its Failed State, never raised.
            state = State.from_call(self.name, self.fn, args, kwargs)
            return state.result() if state.is_completed() else state
        return self.fn(*args, **kwargs)

    def with_options(self, **options: Any) -> Task:
        """Return a copy of this task with some options changed.

        Example::

            quick = simulate.with_options(retries=0, timeout=5)
        """
        return Task(
            self.fn,
            self.options.updated(options, f"{self.name}.with_options"),
            self._binding(),
        )

    @property
    def description(self) -> str | None:
        """Prefect's ``description``: the ``description=`` option, else the function's
        docstring."""
        return self.options.description or inspect.getdoc(self.fn)

    @property
    def version(self) -> str | None:
        """Prefect's ``version``: the ``version=`` option (None when not given)."""
        return self.options.version

    def _binding(self) -> bool | Literal["class"] | None:
        """The ``method=`` a copy of this task is made with (with_options, pickling)."""
        if self._classmethod:
            return "class"
        return False if self._static else self._method

    def __set_name__(self, owner: type, name: str) -> None:
        """Put in a class body: a method if its function was defined there (``def``
        under ``@gx.task`` in that class), not if a task made elsewhere is given a
        name in it (a namespace of steps: ``load = load_task``)."""
        fn = self.fn
        if not (self._static or self._classmethod) and isinstance(fn, types.FunctionType):
            self._method = fn.__qualname__ == f"{owner.__qualname__}.{fn.__name__}"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        """A task defined in a class is a method: reached through an instance, its
        calls pass that instance first, as a function's do (Prefect 3 binds them
        too). The instance travels to the worker as an argument, pickled. A
        classmethod's passes the class."""
        if self._classmethod:  # @gx.task over @classmethod
            return BoundTask(self, owner if owner is not None else type(instance))
        if instance is None:
            return self
        if self._method:
            return BoundTask(self, instance)
        if instance is owner and isinstance(instance, type):
            # @classmethod over @gx.task: Python 3.9 to 3.12 hand the class to the
            # task's __get__ as both instance and owner (3.13 makes a bound method,
            # whose call passes the class too).
            return BoundTask(self, instance)
        return self

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    # Tasks are sent to workers as their plain function (see _pool); a Task
    # object pickled inside an argument or result keeps its options. One whose
    # module holds it under its function's name is pickled by that name, as a
    # function is: its function cannot be (the name finds the Task), so the
    # standard pickle (a ProcessPoolExecutor, a multiprocessing queue) refused it.
    # Elsewhere (__main__, a closure) cloudpickle takes the function by value.
    def __reduce__(self) -> Any:
        fn = self.fn
        module = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", "")
        if module and "<locals>" not in qualname and not pickled_by_value(module):
            try:
                found = _by_name(module, qualname)
            except Exception:
                found = None
            if found is self:
                return (_by_name, (module, qualname))
            if type(found) is Task and found.fn is fn:  # a copy (with_options)
                return (_by_name, (module, qualname, self.options))
        return (Task, (fn, self.options, self._binding()))


def pickled_by_value(module: str | None) -> bool:
    """Whether cloudpickle pickles what ``module`` defines by value: a script's or a
    notebook's (``__main__``), one no process can import by that name, or one
    ``cloudpickle.register_pickle_by_value`` was told of (a module a dask worker
    cannot import, say): its tasks then go by value too."""
    if not module or module == "__main__" or module not in sys.modules:
        return True
    registry = cloudpickle.list_registry_pickle_by_value()
    return any(module == name or module.startswith(name + ".") for name in registry)


def _by_name(module: str, qualname: str, options: TaskOptions | None = None) -> Any:
    """What ``module.qualname`` names; with ``options``, a Task of its function with
    them (a copy made with ``with_options``: its original's name, its own options)."""
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    # A task of a class is reached bound (a classmethod's, to the class): the task
    if type(found) is BoundTask:
        found = found.task
    elif isinstance(found, types.MethodType) and isinstance(found.__func__, Task):
        found = found.__func__  # (@classmethod over a task, Python 3.13)
    if options is None:
        return found
    return Task(found.fn, options, found._binding())


@overload
def task(fn: F, /) -> Task: ...
@overload
def task(fn: None = None, /, **options: Any) -> Callable[[F], Task]: ...
def task(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Turn a function into a task; ``@task`` and ``@task(**options)`` both work.

    Args:
        fn: the function (when used as a bare ``@task``).
        **options: ``name``, ``task_run_name`` (format string such as ``"sim-{seed}"``,
            or a callable given the call's arguments by name; one without
            parameters, Prefect's form, is called without), ``retries``, ``retry_delay``
            (seconds, a list per retry, or :func:`exponential_backoff`),
            ``retry_jitter_factor`` (Prefect's: each delay drawn at random, at most
            ``1 + factor`` times itself; ±factor while factor <= 1), ``retry_on``
            (exception types or a predicate), ``timeout`` (seconds per attempt),
            ``allow_failure``, ``return_state``, ``trigger``, ``max_concurrency``,
            ``tags``, ``priority``, the state hooks ``on_completion``, ``on_failure``,
            ``on_retry`` (lists of functions called with ``(node, state)``; see
            docs/guide/hooks.md), ``isolate``, ``inner_threads`` (threads BLAS and
            OpenMP may use during each call; see docs/guide/threads.md). Prefect
            spellings ``retry_delay_seconds``, ``retry_condition_fn`` and
            ``timeout_seconds`` are accepted too, and Prefect's ``description``
            and ``version`` (read back as :attr:`Task.description`, else the
            docstring, and :attr:`Task.version`) and ``log_prints`` (it changes
            nothing: what a task prints always reaches the terminal).

    Returns:
        A :class:`Task` (or a decorator producing one).

    Raises:
        TypeError: an unknown option (one of Prefect's that graphexec does another
            way, ``cache_policy=`` say, says what to write), a non-callable, or a
            function with a parameter named ``wait_for``, ``allow_failure`` or
            ``return_state``.
        ValueError: an option value out of range.

    Example::

        @gx.task(retries=3, retry_delay=0.5, timeout=60)
        def simulate(params, seed): ...
    """

    def decorate(f: Callable[..., Any]) -> Task:
        if isinstance(f, (staticmethod, classmethod)):  # never bound; bound to the class
            inner = f.__func__
            where = f"@task on {fn_name(inner)}"
            check_callable(inner, where)
            binding = False if isinstance(f, staticmethod) else "class"
            return Task(inner, DEFAULT_OPTIONS.updated(options, where), method=binding)
        where = f"@task on {fn_name(f)}"
        if isinstance(f, BoundTask):  # gx.task(...)(model.score): the task, re-optioned
            return f.with_options(**options)  # type: ignore[return-value]
        if isinstance(f, types.MethodType) and isinstance(f.__func__, Task):
            # (@classmethod over a task reached on Python 3.13: a plain bound method)
            return BoundTask(f.__func__, f.__self__).with_options(**options)  # type: ignore[return-value]
        check_callable(f, where)
        if isinstance(f, Task):
            return f.with_options(**options)
        return Task(f, DEFAULT_OPTIONS.updated(options, where))

    if fn is None:
        return decorate
    if options:
        raise TypeError("use @task(**options) or @task, not task(fn, **options)")
    return decorate(fn)


class unmapped:  # noqa: N801 - spelled like a function, as in Prefect
    """Pass an argument whole to every call of :meth:`Task.map` instead of mapping it.

    Example::

        with graph:
            scores = score.map(samples, model=gx.unmapped(model))  # same model each call
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"unmapped({self.value!r})"


class BoundTask:
    """A task reached through an instance (``model.score``, ``score`` a task defined
    in ``model``'s class): each call, submit and map passes the instance first, to
    every call of a map whole (:class:`unmapped`). Everything else is the task's."""

    __slots__ = ("instance", "task")

    def __init__(self, task: Task, instance: Any) -> None:
        self.task = task
        self.instance = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(self.instance, *args, **kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`Task.submit` with the instance first."""
        return self.task.submit(self.instance, *args, **kwargs)

    def map(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`Task.map` with the instance given whole to every call."""
        return self.task.map(unmapped(self.instance), *args, **kwargs)

    def with_options(self, **options: Any) -> BoundTask:
        """:meth:`Task.with_options`, bound to the same instance."""
        return BoundTask(self.task.with_options(**options), self.instance)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in BoundTask.__slots__:
            raise AttributeError(name)  # (not yet set: being unpickled, copied)
        return getattr(self.task, name)  # name, fn, options, description, ...

    # What a bound method answers too (its __doc__ is the class's: a slot class's
    # docstring cannot be a property)
    @property
    def __name__(self) -> str:
        return str(getattr(self.task.fn, "__name__", self.task.name))

    @property
    def __signature__(self) -> inspect.Signature | None:
        """The function's, without its first parameter (the instance), as a bound
        method's."""
        found = signature(self.task.fn)
        if found is None:
            return None
        return found.replace(parameters=list(found.parameters.values())[1:])

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is BoundTask and other.task is self.task and other.instance is self.instance
        )

    def __hash__(self) -> int:
        return hash((id(self.task), id(self.instance)))

    def __repr__(self) -> str:
        owner = self.instance if isinstance(self.instance, type) else type(self.instance)
        return f"<Task {self.task.name} of {owner.__name__}>"


def as_task(fn: Any, where: str) -> Task:
    """The Task for ``fn``: itself if already one, else one with default options."""
    if isinstance(fn, Task):
        return fn
    check_callable(fn, where)
    return Task(fn, DEFAULT_OPTIONS)
