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
read, and a callable object may define ``__eq__``. A function whose
``__signature__``, ``__wrapped__`` or ``__defaults__`` is reassigned after its
first use keeps its first signature here, as a Task keeps its first options.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from types import FunctionType
from typing import Any

_SIGNATURES: weakref.WeakKeyDictionary[Callable[..., Any], inspect.Signature | None] = (
    weakref.WeakKeyDictionary()
)
_SHAPES: weakref.WeakKeyDictionary[Callable[..., Any], tuple[Any, ...]] = (
    weakref.WeakKeyDictionary()
)

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """``inspect.signature(fn)``, or None when it has none (a builtin without one, a
    non-callable); a plain function's is read once."""
    keep = type(fn) is FunctionType
    if keep:
        try:
            return _SIGNATURES[fn]
        except KeyError:
            pass
    try:
        found: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):
        found = None
    if keep:
        _SIGNATURES[fn] = found
    return found


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
    keep = type(fn) is FunctionType
    if keep:
        shape = _SHAPES.get(fn)
        if shape is not None:
            return shape
    sig = signature(fn)
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
    if keep:
        _SHAPES[fn] = shape
    return shape
