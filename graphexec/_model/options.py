"""Task options: validation, Prefect aliases, and the retry policy they describe."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from .keys import task_input_hash
from .signature import required_positional

TRIGGERS = frozenset(
    {"all_success", "all_done", "any_failed", "all_failed", "none_failed", "always"}
)

# Prefect spellings accepted as aliases of graphexec's own names.
ALIASES = {
    "retry_delay_seconds": "retry_delay",
    "retry_condition_fn": "retry_on",
    "timeout_seconds": "timeout",
}

# Prefect keywords graphexec has no counterpart for, and what to write instead:
# a Prefect user's unknown keyword meets one sentence that says what to do, not
# a list of the options there are. Shared by @task and @flow (``prefect_only``).
PREFECT_ONLY = {
    "cache_policy": (
        "give cache=True (an entry is keyed by the task's code and its inputs, as "
        "Prefect's TASK_SOURCE + INPUTS), or cache_key_fn= for a key of your own; "
        "the entries go in cache_dir= of compute() or @gx.flow"
    ),
    "persist_result": (
        "values stay in memory for the run; cache=True keeps them across runs "
        "(in cache_dir=), and run_dir= keeps a record of the run"
    ),
    "result_storage": (
        "values stay in memory for the run; cache=True keeps them across runs, in the "
        "directory compute(cache_dir=) or @gx.flow(cache_dir=) names"
    ),
    "result_storage_key": "cache_key_fn= names a cache entry (with cache_dir=)",
    "result_serializer": (
        "values travel and are stored pickled (cloudpickle; numpy buffers apart, "
        "without a copy); there is no other serializer"
    ),
    "cache_result_in_memory": (
        "a run keeps a value only while a node that needs it has not run, and the "
        "values asked for (compute's targets, a flow's futures)"
    ),
    "on_running": (
        "a gx.Observer (observers=[...] on compute() or @gx.flow) is told when a run "
        "starts, on_start(run), and when each attempt of a node starts, "
        "on_node_start(node, attempt)"
    ),
    "on_rollback": "graphexec has no transactions: use on_failure=",
    "on_commit": "graphexec has no transactions: use on_completion=",
    "task_runner": (
        "give workers=N (ThreadPoolTaskRunner(max_workers=N): scheduler='threads', "
        "workers=N; DaskTaskRunner: cluster=Client(...))"
    ),
}

# Prefect's flow keywords for a whole flow run that graphexec does per task.
PREFECT_FLOW_ONLY = {
    "retries": (
        "a flow's body is not run again; give retries= (and retry_delay_seconds=) "
        "to its tasks: a failed task is retried alone, nothing that completed runs "
        "twice"
    ),
    "timeout_seconds": (
        "a flow's body cannot be stopped from outside; give timeout_seconds= to its "
        "tasks (each attempt is stopped at its deadline, its worker replaced)"
    ),
    "validate_parameters": (
        "graphexec does not validate or convert a flow's parameters (Prefect's "
        "validate_parameters=True); validate_parameters=False is accepted"
    ),
}
PREFECT_FLOW_ONLY["retry_delay_seconds"] = PREFECT_FLOW_ONLY["retries"]


def unknown_option(where: str, key: str, known: Iterable[str], hints: dict[str, str]) -> str:
    """The message for an unknown option ``key=``: what to write instead when it is
    one of Prefect's (``hints``), else the options there are."""
    hint = hints.get(key)
    if hint is not None:
        return f"{where}: Prefect's {key}= has no counterpart here: {hint}"
    return f"{where}: unknown option {key}=; known options: {', '.join(sorted(known))}"


# Call keywords a task's own parameters may not use.
RESERVED_KEYWORDS = ("wait_for", "allow_failure", "return_state")


class TaskOptions:
    """Validated options of one task (or one call with per-call overrides).

    Plain attributes with ``__slots__``: the scheduler reads them on every
    dispatch and a 100,000-node graph shares a handful of these objects.
    """

    __slots__ = (
        "allow_failure",
        "cache_expiration",
        "cache_key_fn",
        "description",
        "inner_threads",
        "isolate",
        "log_prints",
        "max_concurrency",
        "name",
        "on_completion",
        "on_failure",
        "on_retry",
        "priority",
        "refresh_cache",
        "retries",
        "retry_delay",
        "retry_jitter_factor",
        "retry_on",
        "return_state",
        "tags",
        "task_run_name",
        "timeout",
        "trigger",
        "version",
    )

    def __init__(self) -> None:
        self.name: str | None = None
        self.task_run_name: str | Callable[..., str] | None = None
        self.retries = 0
        self.retry_delay: Any = 0.0
        self.retry_jitter_factor = 0.0
        self.retry_on: Any = None
        self.timeout: float | None = None
        self.allow_failure = False
        self.return_state = False
        self.trigger = "all_success"
        self.max_concurrency: int | None = None
        self.tags: tuple[str, ...] = ()
        self.priority = 0
        self.cache_key_fn: Callable[[Any, dict[str, Any]], str | None] | None = None
        self.cache_expiration: Any = None
        self.refresh_cache = False
        # State hooks (Prefect's names), called in this process off the scheduler's
        # thread (see _surfaces/hooks.py): tuples, empty when none.
        self.on_completion: tuple[Callable[..., Any], ...] = ()
        self.on_failure: tuple[Callable[..., Any], ...] = ()
        self.on_retry: tuple[Callable[..., Any], ...] = ()
        # Run each call in a fresh worker process, discarded afterwards (the
        # executor must declare Capabilities.isolates; the scheduler checks).
        self.isolate = False
        # Threads the native libraries (BLAS, OpenMP) may use during each call;
        # None: the pool's count (see _executors/threadlimits.py).
        self.inner_threads: int | None = None
        # Prefect's metadata, for Prefect code run as written: ``Task.description``
        # and ``Task.version``. ``log_prints`` changes nothing: what a task prints
        # always reaches the terminal, prefixed with its node (as Prefect's
        # log_prints=True shows it in the run's log).
        self.description: str | None = None
        self.version: str | None = None
        self.log_prints: bool | None = None

    def copy(self) -> TaskOptions:
        new = TaskOptions.__new__(TaskOptions)
        for slot in TaskOptions.__slots__:
            setattr(new, slot, getattr(self, slot))
        return new

    def updated(self, options: dict[str, Any], where: str) -> TaskOptions:
        """Return a copy with ``options`` applied, validating each one.

        Raises:
            TypeError: unknown option, or a value of the wrong type.
            ValueError: a value out of range.
        """
        if not options:
            return self  # (options are never changed once made: shared, as DEFAULT_OPTIONS is)
        new = self.copy()
        for key, value in options.items():
            canonical = ALIASES.get(key, key)
            if canonical in options and canonical != key:
                raise TypeError(f"{where}: both {key}= and its alias {canonical}= given; use one")
            if key == "cache":  # short form of cache_key_fn=task_input_hash
                if "cache_key_fn" in options:
                    raise TypeError(f"{where}: give cache=True or cache_key_fn=, not both")
                new.cache_key_fn = task_input_hash if check_bool(value, key, where) else None
                continue
            validator = _VALIDATORS.get(canonical)
            if validator is None:
                known = set(_VALIDATORS) | set(ALIASES) | {"cache"}
                raise TypeError(unknown_option(where, key, known, PREFECT_ONLY))
            setattr(new, canonical, validator(value, key, where))
        return new


def _check_name(value: Any, key: str, where: str) -> Any:
    if value is None or (isinstance(value, str) and value):
        return value
    raise TypeError(f"{where}: {key}= must be a non-empty string")


def check_text(value: Any, key: str, where: str) -> str | None:
    """A piece of metadata (``description=``, ``version=``): a string or None."""
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{where}: {key}= must be a string, got {type(value).__name__}")


def check_optional_bool(value: Any, key: str, where: str) -> bool | None:
    """``log_prints=``: True, False or None (Prefect's default: inherit)."""
    if value is None or isinstance(value, bool):
        return value
    raise TypeError(f"{where}: {key}= must be True, False or None, got {value!r}")


def check_run_name(value: Any, key: str, where: str) -> Any:
    if value is None or isinstance(value, str) or callable(value):
        return value
    raise TypeError(
        f"{where}: {key}= must be a string (a format string such as 'sim-{{seed}}' "
        "is filled from the call's arguments) or a callable returning one"
    )


def _check_retries(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {key}= must be an int (the number of extra attempts)")
    if value < 0:
        raise ValueError(f"{where}: {key}={value} is negative; use 0 for no retries")
    return value


def _check_seconds(value: Any, key: str, where: str, what: str = "a number of seconds") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {key}= must be {what}, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {key}={value!r} must be a finite number >= 0")
    return float(value)


def _check_jitter(value: Any, key: str, where: str) -> float:
    if value is None:  # Prefect's default
        return 0.0
    return _check_seconds(value, key, where, "a number (0.5: each delay drawn from ±50 %)")


def _check_retry_delay(value: Any, key: str, where: str) -> Any:
    if callable(value):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: {key}= list is empty; give at least one delay")
        return tuple(_check_seconds(v, key, where) for v in value)
    return _check_seconds(value, key, where)


def _check_retry_on(value: Any, key: str, where: str) -> Any:
    if value is None:
        return None
    if isinstance(value, type) and issubclass(value, BaseException):
        return (value,)
    if isinstance(value, tuple) and all(
        isinstance(v, type) and issubclass(v, BaseException) for v in value
    ):
        return value
    if callable(value):
        return value
    raise TypeError(
        f"{where}: {key}= must be an exception type, a tuple of them, or a predicate "
        "called with the exception"
    )


def _check_timeout(value: Any, key: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ValueError(
            f"{where}: {key}={value!r} must be a number of seconds above 0 (None: no timeout)"
        )
    seconds = _check_seconds(value, key, where)
    if seconds == 0:
        raise ValueError(f"{where}: {key}=0 would fail every attempt; use None for no timeout")
    return seconds


def check_bool(value: Any, key: str, where: str) -> bool:
    """A flag: True or False, nothing else (``fail_fast="no"`` is not False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {key}= must be True or False, got {value!r}")
    return value


def _check_trigger(value: Any, key: str, where: str) -> str:
    if value not in TRIGGERS:
        raise ValueError(
            f"{where}: unknown trigger={value!r}; choose one of {', '.join(sorted(TRIGGERS))}"
        )
    return value


def _check_max_concurrency(value: Any, key: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key}= must be an int >= 1 (or None for no limit)")
    return value


def check_inner_threads(value: Any, key: str, where: str) -> int | None:
    """``inner_threads=``: None (the automatic count), or threads per worker >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{where}: {key}={value!r} must be an int >= 1 (threads that BLAS, OpenMP and "
            "numexpr may start in each worker), or None for cores // workers"
        )
    return value


def _check_tags(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or not all(isinstance(t, str) for t in value):
        raise TypeError(f"{where}: {key}= must be a list of strings")
    return tuple(dict.fromkeys(value))


def _check_key_fn(value: Any, key: str, where: str) -> Any:
    if value is None or callable(value):
        return value
    raise TypeError(f"{where}: {key}= must be a function (context, arguments) -> str | None")


def _check_expiration(value: Any, key: str, where: str) -> Any:
    if value is None:
        return None
    if isinstance(value, timedelta):
        if value.total_seconds() < 0:
            raise ValueError(f"{where}: {key}= is negative")
        return value
    return _check_seconds(value, key, where)


def _check_priority(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {key}= must be an int (higher runs first)")
    return value


def check_hooks(
    value: Any,
    key: str,
    where: str,
    called_with: str = "(node, state), or Prefect's (task, task_run, state)",
) -> tuple[Callable[..., Any], ...]:
    """A hook option (a task's, or with ``called_with`` a run's) as a tuple of callables.

    Raises:
        TypeError: not a callable or a list of them.
    """
    if value is None:
        return ()
    hooks = [value] if callable(value) else value
    if not isinstance(hooks, (list, tuple)) or not all(callable(h) for h in hooks):
        raise TypeError(f"{where}: {key}= must be a list of functions called with {called_with}")
    return tuple(hooks)


_VALIDATORS: dict[str, Callable[[Any, str, str], Any]] = {
    "name": _check_name,
    "task_run_name": check_run_name,
    "retries": _check_retries,
    "retry_delay": _check_retry_delay,
    "retry_jitter_factor": _check_jitter,
    "retry_on": _check_retry_on,
    "timeout": _check_timeout,
    "allow_failure": check_bool,
    "return_state": check_bool,
    "trigger": _check_trigger,
    "max_concurrency": _check_max_concurrency,
    "tags": _check_tags,
    "priority": _check_priority,
    "cache_key_fn": _check_key_fn,
    "cache_expiration": _check_expiration,
    "refresh_cache": check_bool,
    "on_completion": check_hooks,
    "on_failure": check_hooks,
    "on_retry": check_hooks,
    "isolate": check_bool,
    "inner_threads": check_inner_threads,
    "description": check_text,
    "version": check_text,
    "log_prints": check_optional_bool,
}

DEFAULT_OPTIONS = TaskOptions()


class exponential_backoff:  # noqa: N801 - spelled like a function, as in Prefect
    """Retry delays that grow geometrically: ``base * factor ** (attempt - 1)``.

    Args:
        base: delay before the first retry, in seconds.
        factor: growth per retry.
        max: upper bound of a delay (before jitter), or None.
        jitter: relative random spread; 0.1 draws each delay from ±10 % of its value
            so that many failing tasks do not retry in lock-step.
        backoff_factor: Prefect's name for ``base`` (``exponential_backoff(backoff_factor=10)``).

    Example::

        @gx.task(retries=5, retry_delay=gx.exponential_backoff(0.5, 2, max=30, jitter=0.1))
        def fetch(i): ...
    """

    def __init__(
        self,
        base: float = 1.0,
        factor: float = 2.0,
        max: float | None = None,
        jitter: float = 0.0,
        *,
        backoff_factor: float | None = None,
    ) -> None:
        if backoff_factor is not None:  # Prefect's spelling: backoff_factor * 2 ** retry
            base = backoff_factor
        for label, value in (("base", base), ("factor", factor), ("jitter", jitter)):
            _check_seconds(value, label, "exponential_backoff")
        if max is not None:
            _check_seconds(max, "max", "exponential_backoff")
        if jitter > 1:
            raise ValueError("exponential_backoff: jitter is a fraction between 0 and 1")
        self.base, self.factor, self.max, self.jitter = base, factor, max, jitter

    def __call__(self, retry: int) -> float:
        """Delay in seconds before retry number ``retry`` (1 for the first retry)."""
        try:
            delay = self.base * self.factor ** (retry - 1)
        except OverflowError:  # past ~1,000 retries of factor 2: as large as a float gets
            delay = math.inf
        if self.max is not None:
            delay = min(delay, self.max)
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(delay, 0.0)

    def __repr__(self) -> str:
        return (
            f"exponential_backoff(base={self.base}, factor={self.factor}, "
            f"max={self.max}, jitter={self.jitter})"
        )


def retry_delay_for(options: TaskOptions, retry: int) -> float:
    """Seconds to wait before retry number ``retry`` (1-based).

    A callable ``retry_delay`` is the user's code, called here: whatever it
    raises propagates, and so does a ValueError for an answer that is not a
    finite number of seconds ≥ 0 (the scheduler then fails the node without
    retrying it, and says why).
    """
    delay = options.retry_delay
    if isinstance(delay, tuple):
        seconds = delay[min(retry, len(delay)) - 1]
    elif callable(delay):
        given = delay(retry)
        if isinstance(given, (list, tuple)) and given:
            # Prefect's form (its exponential_backoff): a list of delays, one a retry,
            # made for ``retries`` retries; called with this retry's number, its last
            # item is this retry's delay
            given = given[min(retry, len(given)) - 1]
        try:
            seconds = float(given)
        except (TypeError, ValueError):
            seconds = math.nan
        if not 0 <= seconds < math.inf:  # (NaN fails this too)
            raise ValueError(
                f"retry_delay({retry}) returned {given!r}: it must return a finite "
                "number of seconds, 0 or more"
            )
    else:
        seconds = delay
    spread = options.retry_jitter_factor
    if spread and seconds:
        # Prefect's retry_jitter_factor: at most (1 + factor) times the delay, so that
        # many failing tasks do not retry in lock-step; uniform, centred on the delay
        # while factor <= 1 (Prefect draws from a clamped Poisson with that bound).
        return random.uniform(seconds * max(0.0, 1.0 - spread), seconds * (1.0 + spread))
    return seconds


def should_retry(options: TaskOptions, exc: BaseException, state: Any, task: Any) -> bool:
    """Whether ``retry_on`` lets this exception be retried.

    A predicate with three parameters is called Prefect's way,
    ``fn(task, task_run, state)`` (``task_run`` is the State here too); one with
    one parameter gets the exception.
    """
    rule = options.retry_on
    if rule is None:
        return True
    if isinstance(rule, tuple):
        return isinstance(exc, rule)
    if required_positional(rule, 1) >= 3:
        return bool(rule(task, state, state))
    return bool(rule(exc))


def call_state_hook(hook: Callable[..., Any], node: Any, task: Any, state: Any) -> None:
    """Call a task's state hook: ``hook(node, state)``, or Prefect's
    ``hook(task, task_run, state)`` when it takes three parameters (``task_run``
    is the State, as for ``retry_on``)."""
    if required_positional(hook, 2) >= 3:
        hook(task, state, state)
    else:
        hook(node, state)
