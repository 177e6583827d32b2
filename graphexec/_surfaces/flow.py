"""``@gx.flow``: a function whose body runs with a pool behind it (Prefect's flows).

The body runs in the calling thread; its ``task.submit()`` calls and plain
task calls go to an eager :class:`~graphexec._surfaces.eager.Session` whose
scheduler thread runs them on the flow's executor. When the body returns,
the flow waits for what it submitted, resolves futures in its return value,
and raises :class:`GraphFailed` for failures nobody handled or looked at.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from .._model.errors import UpstreamFailed, one_line
from .._model.graph import run_name
from .._model.node import user_stacklevel
from .._model.options import (
    PREFECT_FLOW_ONLY,
    PREFECT_ONLY,
    check_bool,
    check_optional_bool,
    check_run_name,
    check_text,
    unknown_option,
)
from .._model.signature import parameter_names, signature
from .._model.state import COMPLETED, FAILED, State
from .._model.task import refuse_coroutine_function
from .._model.walk import find_nodes, replace_nodes
from .backends import make_executor, starts_own_pool
from .compute import warn_of_unused_limits
from .eager import Future, Session, flow_session, pool_block, pop_context, push_context, wait
from .hooks import Dispatch, ambient_observers, end_hooks, outcome
from .options import ComputeOptions
from .progress import make_observers
from .record import Journal
from .signals import mark_interrupted

# Flow options that are run options (the rest: name, task_runner_max_concurrency).
_RUN_OPTIONS = frozenset(
    {
        "workers",
        "pool",
        "memory_limit",
        "cache_dir",
        "progress",
        "limits",
        "fail_fast",
        "scheduler",
        "start_method",
        "cluster",
        "max_calls_per_worker",
        "inner_threads",
        "run_dir",
        "keep_inputs",
        "observers",
        "on_completion",
        "on_failure",
        "on_cancellation",
        "on_crashed",
    }
)


# Options that make a flow's workers: inside `with gx.Pool():`, the block's pool has them.
_WORKER_OPTIONS = frozenset(
    {"workers", "scheduler", "start_method", "max_calls_per_worker", "inner_threads"}
)
# Not applied to a flow called inside another flow, and said so: what only a run of
# its own has, and where its tasks run (the outer flow's pool runs them).
_OWN_RUN_OPTIONS = (
    "observers",
    "on_completion",
    "on_failure",
    "on_cancellation",
    "on_crashed",
    "run_dir",
    "progress",
    "keep_inputs",
    "scheduler",
    "pool",
    "cluster",
    # (not workers=: how many tasks at a time, which a subflow written to run on
    # its own too often gives, the outer flow's pool decides, as a nested call is
    # expected to; the others change what the worker processes are)
    *sorted(_WORKER_OPTIONS - {"scheduler", "workers"}),
)


class Flow:
    """A function whose body runs with a pool behind it; see :func:`flow`."""

    def __init__(
        self, fn: Callable[..., Any], options: dict[str, Any], prefect: dict[str, Any] | None = None
    ) -> None:
        self.fn = fn
        self.options = options
        self.name: str = options.get("name") or getattr(fn, "__name__", None) or "flow"
        functools.update_wrapper(self, fn)
        prefect = self._prefect = prefect or {}
        #: Prefect's ``description``: the ``description=`` option, else the docstring.
        self.description: str | None = prefect.get("description") or inspect.getdoc(fn)
        #: Prefect's ``version``: the ``version=`` option (None when not given).
        self.version: str | None = prefect.get("version")
        #: Prefect's ``flow_run_name``: each call's :class:`Run` is named from it
        #: (a format string filled from the call's arguments, or a callable).
        self.flow_run_name: str | Callable[..., str] | None = prefect.get("flow_run_name")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the flow. Prefect's call keywords, which the flow's own parameters do
        not take: ``return_state=True`` returns the flow's final :class:`State`
        (Completed with its value, or Failed with the exception it would raise)
        instead of raising; ``wait_for=[futures]`` waits for them first, and does
        not run the flow (UpstreamFailed) if one of them did not complete."""
        params = _parameters(self.fn)
        return_state = kwargs.pop("return_state", False) if "return_state" not in params else False
        wait_for = kwargs.pop("wait_for", None) if "wait_for" not in params else None
        if not return_state:
            return self._run(wait_for, args, kwargs)
        try:
            value = self._run(wait_for, args, kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # (a GraphFailed, the body's own exception)
            return State(FAILED, self.name, exception=exc, message=one_line(exc))
        return State(COMPLETED, self.name, value=value)

    def _run(self, wait_for: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if wait_for is not None:
            found: list[Any] = []
            find_nodes(wait_for, lambda node, flag: found.append(node), 0)
            futures = [f for f in found if isinstance(f, Future)]
            wait(futures)
            for future in futures:
                state = future.state
                if not state.is_completed():
                    raise UpstreamFailed(
                        f"flow {self.name} did not run: its wait_for upstream "
                        f"{future.name} ended {state.name}",
                        node=self.name,
                    )
        outer = flow_session()
        if outer is not None:
            # A flow called inside a flow runs in the outer one's session: same
            # pool, same scheduler, its failures reported by the outer flow. Pushed
            # as this body's session, so that its plain task calls run there too,
            # not in this process.
            self._check_nested(outer)
            push_context(outer)
            try:
                return _resolve(self.fn(*args, **kwargs))
            finally:
                pop_context(outer)
        opts = self.options
        block = pool_block()
        if block is not None and starts_own_pool(opts):
            # Inside `with gx.Pool():` a flow is a flow of its own on the block's
            # pool (as with pool=): its limits, fail_fast, hooks and run; the
            # options that make workers are the pool's.
            opts = {k: v for k, v in opts.items() if k not in _WORKER_OPTIONS}
            opts["pool"] = block.pool
        options = ComputeOptions.validate(
            f"@flow {self.name}", **{k: v for k, v in opts.items() if k in _RUN_OPTIONS}
        )
        name = self._run_name(args, kwargs)  # (before any executor: it may raise)
        # Always a Dispatch: tasks submitted later may carry hooks. Its thread
        # starts only with the first event that needs one.
        journal = Journal(options.run_dir) if options.run_dir is not None else None
        executor = make_executor(options)
        try:
            dispatch = Dispatch(
                [
                    *make_observers(options.progress, executor.capabilities.slots),
                    *ambient_observers(),
                    *options.observers,
                    *([journal] if journal is not None else []),
                ],
                options.hooks,
                flow=self,
            )
        except BaseException:
            executor.close()
            raise
        session = Session(
            executor,
            name=name,
            fail_fast=options.fail_fast,
            limits=options.limits,
            cache_dir=options.cache_dir,
            observer=dispatch,
            memory_limit=options.memory_limit,
        )
        session.flow_name = self.name
        session.run._inputs_cap = options.keep_inputs
        if journal is not None:
            session.run._record = journal.path
        push_context(session)
        kinds: tuple[str, ...] = ("on_crashed",)
        try:
            try:
                value = self.fn(*args, **kwargs)
                session.wait_all()
                value = _resolve(value)
            except BaseException as exc:
                kinds = _outcome_of(exc, session)
                session.cancel(
                    f"the flow body raised {type(exc).__name__}",
                    everything=isinstance(exc, KeyboardInterrupt),
                )
                session.close()
                if isinstance(exc, KeyboardInterrupt):
                    mark_interrupted(session.run, exc)
                elif session.run._interrupted is None:
                    # Its run stopped before it ended, as by Ctrl-C: never "ok".
                    session.run._interrupted = _body_raised(exc)
                    session.run._raised = exc
                if getattr(exc, "run", None) is None:
                    # (a GraphFailed from a lazy graph computed in the body keeps
                    # that graph's Run, whose nodes the user holds)
                    exc.run = session.run  # type: ignore[attr-defined]
                raise
            session.close()
            kinds = outcome(session.run, cancelled=_fail_fast(session))
        finally:
            pop_context(session)
            end_hooks(dispatch, session.run, kinds)
        if options.limits and session.graph._nodes:
            # (not in the finally above: a warning made an error must not replace the
            # body's exception, nor keep the hooks from running)
            warn_of_unused_limits(session.graph, range(len(session.graph._nodes)), options.limits)
        session.run._raise_if_failed()
        return value

    def _with_run_options(self, options: dict[str, Any]) -> Flow:
        """This flow with other run options (``options`` replaces them all), its
        Prefect metadata kept (the pytest plugin's ``graphexec_sync``)."""
        return Flow(self.fn, options, self._prefect)

    def _run_name(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The name of this call's run: ``flow_run_name=`` filled from the call's
        arguments, else the flow's name (also when they do not bind: the body's
        call then raises Python's own TypeError)."""
        if self.flow_run_name is None:
            return self.name
        sig = signature(self.fn)
        try:
            if sig is None:
                return self.name
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return self.name
        bound.apply_defaults()
        return run_name(self.flow_run_name, bound.arguments, f"flow {self.name}: flow_run_name=")

    def _check_nested(self, outer: Session) -> None:
        """This flow runs in ``outer``'s session: an option that would change what its
        tasks do there is refused, as ``graph.compute`` in a flow refuses it; one
        that belongs to a run of its own (hooks, observers) is not applied: say so."""
        opts = self.options
        where = f"flow {self.name!r} called inside flow {outer.flow_name!r}"
        # Validated (memory_limit="2GB" in bytes, as the outer flow's is kept)
        given = {k: v for k, v in opts.items() if k in _RUN_OPTIONS}
        mine = ComputeOptions.validate(f"@flow {self.name}", **given)
        outer.check_options(
            mine.limits if "limits" in given else None,
            opts.get("cache_dir"),
            mine.memory_limit,
            where,
        )
        fail_fast = opts.get("fail_fast")
        if fail_fast is not None and bool(fail_fast) != outer.scheduler.fail_fast:
            raise ValueError(
                f"{where}: fail_fast={fail_fast!r}, but the outer flow's is "
                f"{outer.scheduler.fail_fast}; one scheduler runs both: give fail_fast= to "
                "the outer flow"
            )
        unused = sorted(
            k
            for k in _OWN_RUN_OPTIONS
            if opts.get(k) and (k, opts[k]) != ("scheduler", "processes")
        )
        if self.flow_run_name is not None:
            unused.append("flow_run_name")
        if unused:
            warnings.warn(
                f"{where} runs in the outer flow's session, on its pool, with no run of its "
                f"own: its {', '.join(unused)} not applied. Give them to the outer flow, or "
                "call this flow outside it",
                UserWarning,
                stacklevel=user_stacklevel(),
            )


def _body_raised(exc: BaseException) -> str:
    """Why a flow's run stopped when its body raised ``exc``: its headline's words."""
    return f"the flow body raised {one_line(exc)}"


def _fail_fast(session: Session) -> bool:
    reason = session.scheduler.cancel_reason
    return reason is not None and reason.startswith("fail_fast")


def _outcome_of(exc: BaseException, session: Session) -> tuple[str, ...]:
    """The run hooks due when the flow body raised ``exc`` (see docs/guide/hooks.md)."""
    if isinstance(exc, KeyboardInterrupt):
        return ("on_cancellation",)
    if session._error is not None or not isinstance(exc, Exception):
        return ("on_crashed",)  # graphexec's scheduler thread failed, or SystemExit & co.
    return ("on_cancellation", "on_failure") if _fail_fast(session) else ("on_failure",)


def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    """The names ``fn`` takes (its own ``return_state``/``wait_for`` stay its own)."""
    return parameter_names(fn)


def _resolve(value: Any) -> Any:
    """The flow's return value with futures and nodes in it replaced by their values.

    A future gives its result; a node of a lazy graph its value in that graph's
    latest run (a graph computed in the body). Nodes of different graphs share
    indices, so each is looked up by its own graph, never by index alone. A
    Failed or Skipped :class:`State` in it (``return_state=True``) fails the flow
    with its exception, as Prefect makes such a flow Failed (a State returned
    as a plain value was the flow's success).
    """
    resolved = replace_nodes(value, lambda node: node.result())

    def fail_on(obj: Any) -> None:
        if isinstance(obj, State) and (obj.is_failed() or obj.is_skipped()):
            obj.result()  # raises the failure (UpstreamFailed for a skip)

    find_nodes(resolved, lambda node, flag: None, 0, fail_on)
    return resolved


# Every option @gx.flow takes: the run options, its name, and Prefect's alias of workers=.
_FLOW_OPTIONS = _RUN_OPTIONS | {"name", "task_runner_max_concurrency"}


# Prefect's flow keywords kept for Prefect code run as written (see Flow.__init__);
# log_prints changes nothing: a task's prints always reach the terminal.
_PREFECT_CHECKS: dict[str, Callable[[Any, str, str], Any]] = {
    "description": check_text,
    "version": check_text,
    "flow_run_name": check_run_name,
    "log_prints": check_optional_bool,
    "validate_parameters": check_bool,  # True is refused in decorate, with why
}


def flow(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Make a function a flow: its body runs with a pool, tasks start on ``submit()``.

    Args:
        fn: the function (bare ``@flow``).
        **options: ``workers`` (max tasks at a time; Prefect's
            ``task_runner_max_concurrency`` is an alias), ``memory_limit``,
            ``cache_dir``, ``progress``, ``limits`` (per tag), ``fail_fast``,
            ``scheduler`` (``"processes"``, ``"threads"``, ``"sync"``), ``cluster``
            (a ``distributed.Client``: tasks run on its dask cluster),
            ``start_method``, ``max_calls_per_worker`` (replace a worker after that
            many calls), ``pool`` (a :class:`Pool` you own: the flow runs on its
            workers, beside its other computes and flows, and leaves it open),
            ``run_dir`` (write the flow's record there as it goes) and
            ``keep_inputs`` (the cap on failed nodes' inputs kept for
            ``run.replay``), ``inner_threads`` (threads of BLAS/OpenMP in each
            worker), ``name``; ``observers`` (:class:`Observer` instances
            that see every node of the flow) and the run hooks ``on_completion``,
            ``on_failure``, ``on_cancellation``, ``on_crashed`` (lists of functions
            called with the flow's :class:`Run`, or Prefect's ``(flow, flow_run,
            state)``), as for ``Graph.compute``; see docs/guide/hooks.md.
            Prefect's ``description``, ``version`` (read back as
            ``Flow.description`` and ``Flow.version``), ``flow_run_name`` (names
            each call's :class:`Run`: a format string filled from the call's
            arguments, or a callable), ``log_prints`` (changes nothing: task
            output always reaches the terminal) and ``validate_parameters=False``.

    Returns:
        A callable :class:`Flow`. Calling it runs the body and returns its value
        with futures in it (and nodes of lazy graphs computed in it) replaced by
        their values; a returned future that failed raises its exception.

    Raises:
        TypeError: (when decorating) an unknown option; one of Prefect's that
            graphexec does another way (``retries=`` on a flow, ``cache_policy=``,
            ``persist_result=``, ...) says what to write instead.
        GraphFailed: when the body returned but a task failure was never handled:
            no dependent accepted it (``allow_failure``, ``return_state``, a
            trigger) and nobody looked at it (``future.result()`` raising or
            returning it, reading ``future.state``). Waiting (``future.wait()``,
            :func:`wait`, :func:`as_completed`) is not looking.
        Exception: whatever the body raised, after every pending task was
            cancelled; the exception carries ``.run`` (unless it had one: a
            ``GraphFailed`` from a lazy graph keeps that graph's Run).

    A flow called inside another flow runs in the outer one's session: same pool,
    same scheduler. It returns its body's value; its unhandled failures are reported
    when the outer flow ends. Its ``limits``, ``fail_fast``, ``cache_dir`` and
    ``memory_limit`` must be the outer flow's (else ``ValueError``); its hooks,
    observers, ``run_dir``, ``progress``, ``flow_run_name`` and worker options
    (``inner_threads``, ``start_method``, ``max_calls_per_worker``) are not applied
    (a ``UserWarning`` says so). Inside ``with gx.Pool():`` a flow that would start
    a process pool of its own is a flow of its own on that block's pool, as with
    ``pool=`` (one given ``scheduler="threads"``/``"sync"``, ``cluster=`` or its own
    ``pool=`` runs where it says). A lazy graph computed in a flow runs there too
    (unless given ``pool=``: then it is a run of its own on that pool);
    ``compute``'s ``limits``, ``cache_dir`` and ``memory_limit`` must then match the
    flow's. A flow keeps every value until it ends (a future may be asked for its
    result at any time).

    Example::

        @gx.flow(workers=2)
        def my_flow():
            futures = [square.submit(i) for i in range(5)]
            return [f.result() for f in futures]
    """

    def decorate(f: Callable[..., Any]) -> Flow:
        where = f"@flow on {getattr(f, '__name__', 'flow')}"
        opts = dict(options)
        prefect = {
            k: _PREFECT_CHECKS[k](opts.pop(k), k, where) for k in options if k in _PREFECT_CHECKS
        }
        if prefect.get("validate_parameters") is True:
            raise TypeError(unknown_option(where, "validate_parameters", (), PREFECT_FLOW_ONLY))
        unknown = sorted(set(opts) - _FLOW_OPTIONS)
        for key in unknown:
            if key in PREFECT_FLOW_ONLY or key in PREFECT_ONLY:
                raise TypeError(
                    unknown_option(where, key, (), {**PREFECT_ONLY, **PREFECT_FLOW_ONLY})
                )
        if unknown:
            raise TypeError(
                f"@flow: unknown option(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(_FLOW_OPTIONS | set(_PREFECT_CHECKS)))}"
            )
        alias = opts.pop("task_runner_max_concurrency", None)
        if alias is not None:
            if opts.get("workers") not in (None, alias):
                raise TypeError("@flow: give workers= or task_runner_max_concurrency=, not both")
            opts["workers"] = alias
        if not callable(f):
            raise TypeError(f"@flow expects a function, got {type(f).__name__}")
        refuse_coroutine_function(f, "@flow", "a flow's body as a plain function")
        _check_flow_options(opts, where)
        return Flow(f, opts, prefect)

    if fn is None:
        return decorate
    return decorate(fn)


def _check_flow_options(opts: dict[str, Any], where: str) -> None:
    """Refuse bad option values when the flow is decorated, as ``compute`` refuses them."""
    ComputeOptions.validate(where, **{k: v for k, v in opts.items() if k in _RUN_OPTIONS})
