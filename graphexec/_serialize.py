"""Pickling between the parent and the workers.

* Functions, arguments and results go through cloudpickle (protocol 5), so
  lambdas, closures and functions defined in ``__main__`` or a notebook work.
* A call's arguments are pickled with the nodes inside them replaced by
  persistent ids (their node index); the worker's unpickler puts the upstream
  values in their place. Nothing is copied to do it, at any nesting depth.
* Results stay pickled in the parent (:class:`Payload`): a value made by one
  worker and consumed by another is forwarded as bytes and only unpickled in
  the parent if the user asks for it.
* Pickling happens in the parent before dispatch, so an argument that does not
  pickle fails its own node with a :class:`SerializationError` naming it,
  never the pool.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import cloudpickle

from ._graph import Node

PROTOCOL = 5


class Payload:
    """A value pickled by a worker, unpickled lazily (at most once) in the parent."""

    __slots__ = ("_loaded", "_value", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._loaded = False
        self._value: Any = None

    def load(self) -> Any:
        if not self._loaded:
            self._value = pickle.loads(self.data)
            self._loaded = True
        return self._value

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def __reduce__(self) -> Any:
        return (Payload, (self.data,))


def materialize(handle: Any) -> Any:
    """The value behind a handle: a :class:`Payload` is unpickled, anything else is the value."""
    if type(handle) is Payload:
        return handle.load()
    return handle


def dumps(obj: Any) -> bytes:
    return cloudpickle.dumps(obj, protocol=PROTOCOL)


def as_bytes(handle: Any) -> bytes:
    """Pickled form of a handle, for sending to a worker (no re-pickling of Payloads)."""
    if type(handle) is Payload:
        return handle.data
    return dumps(handle)


class _CallPickler(cloudpickle.Pickler):
    """Pickles a call's arguments, writing each node as its index."""

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is Node:
            return obj.index
        return None


class _CallUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, values: dict[int, Any]) -> None:
        super().__init__(io.BytesIO(data))
        self._values = values

    def persistent_load(self, pid: Any) -> Any:
        return self._values[pid]


def dumps_call(args: tuple[Any, ...], kwargs: dict[str, Any] | None, has_nodes: bool) -> bytes:
    """Pickle a call's arguments; nodes inside become references to their values."""
    if not has_nodes:
        return dumps((args, kwargs))
    buffer = io.BytesIO()
    _CallPickler(buffer, protocol=PROTOCOL).dump((args, kwargs))
    return buffer.getvalue()


def loads_call(data: bytes, values: dict[int, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inverse of :func:`dumps_call`, given the upstream values by node index."""
    args, kwargs = _CallUnpickler(data, values).load()
    return args, kwargs or {}


def find_unpicklable(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> str:
    """Describe which argument would not pickle, e.g. ``argument 'lock' (a _thread.lock)``."""
    named = [(f"argument {i}", v) for i, v in enumerate(args)]
    named += [(f"argument {k!r}", v) for k, v in (kwargs or {}).items()]
    for label, value in named:
        path = _first_unpicklable(value, label, depth=0)
        if path is not None:
            return path
    return "the arguments"


def _first_unpicklable(value: Any, label: str, depth: int) -> str | None:
    if type(value) is Node:
        return None
    try:
        dumps_call((value,), None, has_nodes=True)
        return None
    except Exception:
        pass
    if depth < 4:
        if isinstance(value, dict):
            for key, item in value.items():
                found = _first_unpicklable(item, f"{label}[{key!r}]", depth + 1)
                if found:
                    return found
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                found = _first_unpicklable(item, f"{label}[{i}]", depth + 1)
                if found:
                    return found
    kind = type(value)
    return f"{label} (a {kind.__module__}.{kind.__qualname__})"
