"""Pickling between the parent and the workers.

* Functions, arguments and results go through cloudpickle (protocol 5), so
  lambdas, closures and functions defined in ``__main__`` or a notebook work.
* A call's arguments are pickled with the nodes inside them replaced by
  persistent ids (their node index); the worker's unpickler puts the upstream
  values in their place. Nothing is copied to do it, at any nesting depth.
* Results stay pickled in the parent (:class:`Payload`): a value made by one
  worker and consumed by another is forwarded as bytes and only unpickled in
  the parent if the user asks for it.
* Large contiguous buffers (numpy arrays of 64 KiB and more) leave the pickle
  stream through protocol 5's ``buffer_callback`` and travel in shared memory
  (``_shm``): the pipe carries only their names. A value on the wire is
  ``(pickle bytes, ((segment name, size), ...))``.
* Pickling happens in the parent before dispatch, so an argument that does not
  pickle fails its own node with a :class:`SerializationError` naming it,
  never the pool.
"""

from __future__ import annotations

import errno
import io
import logging
import mmap
import os
import pickle
import weakref
from collections.abc import Callable
from typing import Any

import cloudpickle

from .._model.errors import SerializationError
from .._model.graph import Node
from .._model.handle import Deferred
from .._model.sizes import size_text
from .._model.walk import PLAIN
from . import shm as _shm

PROTOCOL = 5
SHM_THRESHOLD = 64 * 1024  # smaller buffers cost less in-band than a segment does

Wire = tuple[bytes, tuple[tuple, ...]]
# Values the C pickler writes exactly as cloudpickle does (nothing by value).


class Payload(Deferred):
    """A value pickled by a worker, unpickled lazily (at most once) in the parent.

    Owns the shared-memory segments its buffers live in: :meth:`discard`
    unlinks them once no one needs the value.
    """

    __slots__ = ("_error", "_loaded", "_value", "data", "segments")

    def __init__(self, data: bytes, segments: tuple[tuple, ...] = ()) -> None:
        self.data = data
        self.segments = segments
        self._error: BaseException | None = None
        self._loaded = False
        self._value: Any = None

    @classmethod
    def from_wire(cls, wire: Wire) -> Payload:
        data, segments = wire
        if segments:
            _shm.live.update(seg[0] for seg in segments if len(seg) == 2)
        return cls(data, segments)

    @property
    def wire(self) -> Wire:
        return (self.data, self.segments)

    def load(self) -> Any:
        """The value; an unpickling failure is remembered and raised again on each call
        (the shared memory it came from may be gone by then)."""
        if not self._loaded:
            if self._error is not None:
                raise self._error
            try:
                self._value = loads_value(self.wire)
            except Exception as exc:
                self._error = exc
                raise
            self._loaded = True
        return self._value

    def discard(self, recycle: bool = True) -> None:
        """Give up the shared-memory segments (values already loaded keep their mapping).

        ``recycle`` lets a later result of the same size reuse a segment while the
        run goes on (``shm.release``: not one a worker still maps); at the end of
        a run segments are unlinked. A value loaded here is never recycled: a
        recycled segment is rewritten in place, under every mapping of it (the
        value a hook kept would change). Regions of a cache file,
        ``(path, offset, size)``, stay.
        """
        if not self.segments:  # a small value, all in its pickle: every tiny task's
            return
        for path in {seg[0] for seg in self.segments if len(seg) == 3}:
            if os.path.basename(path).startswith(".hold-"):  # a cache hit's private link
                try:
                    os.unlink(path)
                except OSError:
                    pass
        shm = [seg for seg in self.segments if len(seg) == 2]
        if not shm:
            return
        if recycle and not self._loaded:
            _shm.release(shm)
        else:
            _shm.unlink([name for name, _ in shm])

    def settle(self) -> None:
        """Map the value privately and unlink its segments (the end of a run): nothing
        of the run stays in /dev/shm, and the value stays readable."""
        if self.segments:
            try:
                self.load()
            except Exception:  # remembered: run[node] raises SerializationError
                pass
            self.discard(recycle=False)

    @property
    def in_shared_memory(self) -> bool:
        return any(len(seg) == 2 for seg in self.segments)

    @property
    def nbytes(self) -> int:
        """Bytes of the value: its pickle and its buffers (a segment's size is last)."""
        return len(self.data) + sum(seg[-1] for seg in self.segments)

    def __reduce__(self) -> Any:
        # Sent inside a State to a worker: the segments stay owned by the parent.
        return (Payload, (self.data, self.segments))


def dumps(obj: Any) -> bytes:
    return cloudpickle.dumps(obj, protocol=PROTOCOL)


def dumps_function(fn: Any) -> bytes | BaseException:
    """A task's function pickled for the workers, or why it cannot be: the error is
    kept in its place, for each call of it to fail with (``function_error``)."""
    try:
        return dumps(fn)
    except Exception as exc:
        return exc


def dumps_apart(obj: Any, put: Callable[[memoryview], None]) -> bytes:
    """Pickle ``obj`` with its contiguous buffers of ``SHM_THRESHOLD`` bytes or more
    out of band, each handed to ``put`` (shared memory, a cache file); smaller or
    non-contiguous ones stay in the pickle."""

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: pickled in-band
            return True
        if raw.nbytes < SHM_THRESHOLD:
            return True
        put(raw)
        return False

    return cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=out_of_band)


def dumps_value(obj: Any) -> Wire:
    """Pickle a value for another process, large buffers into shared memory."""
    if type(obj) in PLAIN:
        # The pickle's own C code, as cloudpickle would write it: a tiny result
        # pays no cloudpickle Pickler set-up (a few microseconds each).
        return pickle.dumps(obj, PROTOCOL), ()
    if not _shm.AVAILABLE:
        return dumps(obj), ()
    full: OSError | None = None
    for again in (False, True):
        # (again: the pool's recycled segments, kept for results of their sizes, may
        # be what fills it; let them go, and try once more if there were any)
        if again and not _shm.drop_free():
            break
        try:
            return _into_segments(obj)
        except OSError as exc:
            if exc.errno not in _SHM_FULL:
                raise
            full = exc
    assert full is not None
    _say_shm_is_full(full)
    return dumps(obj), ()  # in band, through the pipe: slower, but it arrives


def _into_segments(obj: Any) -> Wire:
    """The pickle of ``obj`` and its large buffers in new segments (none left behind
    if it fails)."""
    segments: list[tuple[str, int]] = []
    try:
        data = dumps_apart(obj, lambda raw: segments.append((_shm.create(raw), raw.nbytes)))
    except BaseException:
        _shm.unlink([name for name, _ in segments])
        raise
    return data, tuple(segments)


# /dev/shm out of room: a container's (Docker and Kubernetes give it 64 MB), or one
# filled by other programs. A value's large buffers then travel in its pickle. (Not
# ENOMEM: out of memory, two more copies of the value in band would not help.)
_SHM_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_said_shm_is_full = False


def _say_shm_is_full(exc: OSError) -> None:
    global _said_shm_is_full
    if _said_shm_is_full:
        return
    _said_shm_is_full = True
    space = _shm.room()
    room = (
        "its size unknown"
        if space is None
        else f"{size_text(space[0], binary=True)} free of {size_text(space[1], binary=True)}"
    )
    logging.getLogger("graphexec").warning(
        "graphexec: %s has no room for a value's buffers (%s: %s), so values with large "
        "buffers travel through the workers' pipes instead, more slowly. Values kept "
        "from earlier runs hold their part of it until they are let go of. In a "
        "container, give it room (docker run --shm-size=4g; Kubernetes: an emptyDir "
        "volume with medium: Memory mounted at /dev/shm)",
        _shm.SHM_DIR,
        room,
        exc.strerror,
    )


def loads_value(wire: Wire, mapped: list[tuple[str, Any]] | None = None) -> Any:
    """Inverse of :func:`dumps_value`; segments are shared memory ``(name, size)`` or
    cache-file regions ``(path, offset, size)``, both mapped copy-on-write.
    ``mapped``, if given, receives ``(segment name, weakref to its mapping)`` for each
    shared-memory segment (a worker pins those its task still maps: ``shm.pin``)."""
    data, segments = wire
    if not segments:
        return pickle.loads(data)
    buffers = [attach_segment(seg) for seg in segments]
    if mapped is not None:
        mapped.extend(
            (seg[0], weakref.ref(view.obj)) for seg, view in zip(segments, buffers) if len(seg) == 2
        )
    return pickle.loads(data, buffers=buffers)


def attach_segment(segment: tuple) -> memoryview:
    if len(segment) == 2:
        return _shm.attach(*segment)
    path, offset, size = segment
    with open(path, "rb") as f:
        mapping = mmap.mmap(
            f.fileno(),
            size,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=offset,
        )
    return memoryview(mapping)


def as_wire(handle: Any) -> Wire:
    """Wire form of a handle, for sending to a worker (a Payload is forwarded as it is)."""
    if type(handle) is Payload:
        return handle.wire
    return dumps(handle), ()


class _CallPickler(cloudpickle.Pickler):
    """Pickles a call's arguments, writing each node as its index."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Node):
            return obj.index
        return None


class _FlatCallPickler(pickle.Pickler):
    """The C pickler, for arguments that are plain values and nodes only (no cloudpickle)."""

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is Node:
            return obj.index
        return None


def _flat(args: tuple[Any, ...]) -> bool:
    """True if every argument is a plain value or a node (the common tiny call)."""
    return all(type(a) in PLAIN or type(a) is Node for a in args)


class _CallUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, values: dict[int, Any]) -> None:
        super().__init__(io.BytesIO(data))
        self._values = values

    def persistent_load(self, pid: Any) -> Any:
        return self._values[pid]


def dumps_call(args: tuple[Any, ...], kwargs: dict[str, Any] | None, has_nodes: bool) -> bytes:
    """Pickle a call's arguments; nodes inside become references to their values."""
    if not kwargs and _flat(args):
        # The common tiny call, f(1, node): the C pickler, a tenth of the cost.
        if not has_nodes:
            return pickle.dumps((args, None), PROTOCOL)
        buffer = io.BytesIO()
        _FlatCallPickler(buffer, protocol=PROTOCOL).dump((args, None))
        return buffer.getvalue()
    if not has_nodes:
        return dumps((args, kwargs))
    buffer = io.BytesIO()
    _CallPickler(buffer, protocol=PROTOCOL).dump((args, kwargs))
    return buffer.getvalue()


def loads_call(data: bytes, values: dict[int, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inverse of :func:`dumps_call`, given the upstream values by node index."""
    args, kwargs = _CallUnpickler(data, values).load()
    return args, kwargs or {}


# A call's arguments inside a ``run`` message (``encode_call``): the pickle of
# ``dumps_call``, or for the common tiny call — positional arguments that are
# plain values, nodes, or lists of those (``total([a, b, c])``) — ``(args,
# refs)``: the arguments with each node replaced by its index, and where those
# nodes were: ``k`` (argument k) or ``(k, j)`` (item j of the list in argument
# k). The message is then pickled once, by the C pickler, with no nested
# pickle and no Python callback per argument.
EncodedCall = bytes | tuple[tuple[Any, ...], tuple[Any, ...]]
_NO_REFS: list[Any] = []  # never appended to: encode_call replaces it first


def encode_call(
    args: tuple[Any, ...], kwargs: dict[str, Any] | None, has_nodes: bool
) -> EncodedCall:
    """A call's arguments for a ``run`` message; :func:`decode_call` is its inverse."""
    if kwargs:
        return dumps_call(args, kwargs, has_nodes)
    out: list[Any] | None = None
    refs: list[Any] = _NO_REFS  # (replaced by a list of its own at the first node)
    seen: dict[int, list[Any]] | None = None  # id(list with nodes) -> its copy
    for k, a in enumerate(args):
        kind = type(a)
        if kind in PLAIN:
            continue
        if kind is Node:
            if out is None:
                out = list(args)
            out[k] = a.index
            if refs is _NO_REFS:
                refs = []
            refs.append(k)
        elif kind is list:
            if seen is not None and out is not None and id(a) in seen:
                # The same list again: the same copy (pickled once, filled once).
                out[k] = seen[id(a)]
                continue
            inner: list[Any] | None = None
            for j, x in enumerate(a):
                kind = type(x)
                if kind is Node:
                    if inner is None:
                        inner = list(a)
                    inner[j] = x.index
                    if refs is _NO_REFS:
                        refs = []
                    refs.append((k, j))
                elif kind not in PLAIN:
                    return dumps_call(args, kwargs, has_nodes)
            if inner is not None:
                if out is None:
                    out = list(args)
                out[k] = inner
                if seen is None:
                    seen = {}
                seen[id(a)] = inner
        else:
            return dumps_call(args, kwargs, has_nodes)
    return (tuple(out) if out is not None else args), tuple(refs)


def decode_call(
    encoded: EncodedCall, values: dict[int, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inverse of :func:`encode_call`, given the upstream values by node index.

    The lists in ``encoded`` are filled in place: it must be a fresh copy (the
    message was just unpickled).
    """
    if isinstance(encoded, bytes):
        return loads_call(encoded, values)
    args, refs = encoded
    if not refs:
        return args, {}
    filled = list(args)
    for ref in refs:
        if type(ref) is int:
            filled[ref] = values[filled[ref]]
        else:
            items = filled[ref[0]]
            items[ref[1]] = values[items[ref[1]]]
    return tuple(filled), {}


def arguments_error(call: Any, exc: BaseException, destination: str) -> SerializationError:
    """The error of a call whose arguments cannot be pickled for ``destination``."""
    culprit = find_unpicklable(call.args, call.kwargs)
    return SerializationError(
        f"{culprit} of {call.name} cannot be pickled to send it to {destination}: "
        f"{type(exc).__name__}: {exc}. Pass plain data, or create the object inside "
        "the task (locks, open files, sockets and generators cannot be sent)",
        node=call.name,
        stage="arguments",
        retryable=False,
    )


def function_error(name: str, exc: BaseException) -> SerializationError:
    """The error of a call whose function cannot be pickled (it failed here, once per pool)."""
    return SerializationError(
        f"the function of {name} cannot be pickled: {type(exc).__name__}: "
        f"{exc}. Define it at module level, or make what it closes over picklable",
        node=name,
        stage="function",
        retryable=False,
    )


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
    if isinstance(value, Node):
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
