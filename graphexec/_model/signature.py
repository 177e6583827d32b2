"""A function's signature, read once per function: the one way graphexec reads it.

``inspect.signature`` costs several microseconds a call (it walks ``__wrapped__``
and builds a ``Parameter`` per parameter), and graphexec asks about the same
function at its decoration, the first call check of each Task, binds, hooks and
cache keys: a loop of ``gx.task(f)(x)`` read it twice a node, two thirds of the
node's 32 µs (11 µs with this module). So a plain function's
:class:`inspect.Signature` is kept here, weakly (a notebook's redefined function
leaves with its old self), and every question about parameters goes through
:func:`signature`.

Only ``def`` and ``lambda`` functions are kept: they hash by identity and
live as long as their users; a bound method is a new object at every attribute
read, and a callable object may define ``__eq__``. A kept signature is read
again when what it was read from has changed in place: the function's code
(IPython's ``autoreload`` swaps ``__code__``), defaults, ``__signature__`` or
``__wrapped__``.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from types import FunctionType
from typing import Any

# id(function) -> [a weak reference to it, what it was read from (_stamp), its
# signature, its call_shape or None]. Not a WeakKeyDictionary: its lookups make a
# weak reference each, a third of a lookup here. An entry leaves with its function.
_KEPT: dict[int, list[Any]] = {}

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _stamp(fn: Any) -> tuple[Any, ...]:
    """What a plain function's signature is read from, to tell when it changed."""
    own = fn.__dict__
    return (
        fn.__code__,
        fn.__defaults__,
        fn.__kwdefaults__,
        own.get("__signature__"),
        own.get("__wrapped__"),
    )


def _kept(fn: Any) -> list[Any]:
    """A plain function's entry in ``_KEPT``, read (again) if missing or stale."""
    stamp = _stamp(fn)
    key = id(fn)
    entry = _KEPT.get(key)
    # (== on the stamps: identity first, item by item, so the usual case is cheap)
    if entry is None or entry[0]() is not fn or entry[1] != stamp:
        entry = _KEPT[key] = [weakref.ref(fn, _forget(key)), stamp, _read(fn), None]
    return entry


def _forget(key: int) -> Callable[[weakref.ref[Any]], None]:
    def gone(ref: weakref.ref[Any]) -> None:
        entry = _KEPT.get(key)
        if entry is not None and entry[0] is ref:  # (not a newer function's, same id)
            del _KEPT[key]

    return gone


def _read(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """``inspect.signature(fn)``, or None when it has none (a builtin without one, a
    non-callable); a plain function's is read once (again if it changed)."""
    if type(fn) is FunctionType:
        sig: inspect.Signature | None = _kept(fn)[2]
        return sig
    return _read(fn)


def parameter_names(fn: Callable[..., Any]) -> frozenset[str]:
    """The names of ``fn``'s parameters (none when it has no signature)."""
    sig = signature(fn)
    return frozenset(sig.parameters) if sig is not None else frozenset()


def required_positional(fn: Callable[..., Any], default: int) -> int:
    """How many positional arguments ``fn`` needs: its positional parameters without
    a default (``default`` when it has no signature). A hook ``(node, state,
    note="x")`` needs two."""
    sig = signature(fn)
    if sig is None:
        return default
    return sum(1 for p in sig.parameters.values() if p.kind in _POSITIONAL and p.default is p.empty)


def call_shape(fn: Callable[..., Any]) -> tuple[Any, ...]:
    """What a call of ``fn`` must give, for a check of a few comparisons at every
    call (``Graph``'s build): ``()`` when it has no signature (any call goes), else
    (the most positional arguments, None for ``*args``; the required positional
    ones; the names a keyword may take, None for ``**kwargs``; the names positional
    arguments fill; the required keyword-only names; the most positional arguments
    as a number, ``inf`` for ``*args``)."""
    entry = _kept(fn) if type(fn) is FunctionType else None
    if entry is not None and entry[3] is not None:
        return entry[3]
    sig = entry[2] if entry is not None else _read(fn)
    shape: tuple[Any, ...]
    if sig is None:
        shape = ()
    else:
        kind = inspect.Parameter
        parameters = sig.parameters.values()
        positional = [p for p in parameters if p.kind in _POSITIONAL]
        most = None if any(p.kind is kind.VAR_POSITIONAL for p in parameters) else len(positional)
        keywords = (
            None
            if any(p.kind is kind.VAR_KEYWORD for p in parameters)
            else frozenset(
                p.name
                for p in parameters
                if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)
            )
        )
        shape = (
            most,
            sum(1 for p in positional if p.default is kind.empty),
            keywords,
            tuple(p.name for p in positional),
            frozenset(
                p.name
                for p in parameters
                if p.kind is kind.KEYWORD_ONLY and p.default is kind.empty
            ),
            math.inf if most is None else most,
        )
    if entry is not None:
        entry[3] = shape
    return shape
