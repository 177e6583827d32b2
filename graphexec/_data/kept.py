"""The exact arguments of a failed call, kept so that it can be replayed.

A :class:`KeptCall` is self-contained: its arguments are pickled with the
nodes inside them as references (``dumps_call``), and each upstream value is
its own pickle plus the bytes of its large buffers, copied out of shared
memory (or a cache file) before the run releases them. Nothing in it points
to a worker, a pipe or ``/dev/shm``, so it outlives the run, is written to a
saved run as it is, and loads in another process. :meth:`KeptCall.load`
gives fresh ``(args, kwargs)`` every time, so a replay that changes its
input in place does not change the next one.

Values that could not be pickled (an in-process run handing a lock to a
task) are kept as the objects themselves (``live``): they replay in this
process, and a saved run says they are missing. Values that are gone (a
chained value held by a worker that crashed) are named in ``lost``.

How many bytes a run keeps is capped (:func:`cap_from_env`, 1 GiB by
default); a call over the cap is kept as a record that says so
(``dropped``), without its arguments.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import pickle
from typing import Any

import cloudpickle

from .._model.sizes import parse_size
from .._model.walk import substitute
from .serialize import PROTOCOL, Payload, attach_segment, dumps, loads_call

DEFAULT_CAP = 1 << 30  # bytes of kept inputs per run
CAP_ENV = "GRAPHEXEC_KEEP_INPUTS"

# One upstream value: its pickle and the bytes of its out-of-band buffers.
Value = tuple[bytes, list[bytes]]


class KeptCall:
    """What a failed node received: see the module docstring.

    Attributes:
        args: ``(args, kwargs)`` pickled with nodes as references, or None if they
            could not be pickled (then ``live_args`` holds them).
        values: upstream node index -> its value's pickle and buffers.
        live: upstream node index -> the object itself (it would not pickle).
        live_args: ``(args, kwargs)`` with nodes inside, when they would not pickle.
        lost: upstream node index -> why that value is gone.
        dropped: why nothing was kept (over the cap, keeping turned off), or None.
        nbytes: bytes this record holds.
        source_hash: a hash of the function's source when it failed (None: unknown).
        fn_blob: the function, pickled (a record read from a saved run; None in the
            run that made it, whose graph holds the function).
        origin: the function's source file, which cloudpickle blanks in a function
            pickled by value (a saved run's; tracebacks and the source check need it).
        packed: a saved run's pickle of ``(fn_blob, portable_state(), value keys)``,
            not read yet (reading it unpickles); :meth:`unpack` reads it, taking
            the values from ``shared``.
        shared: a saved run's upstream values by node index, each stored once
            however many failed nodes received it (pickled until unpacked).
    """

    __slots__ = (
        "args",
        "dropped",
        "fn_blob",
        "live",
        "live_args",
        "lost",
        "nbytes",
        "origin",
        "packed",
        "shared",
        "source_hash",
        "values",
    )

    def __init__(self) -> None:
        self.args: bytes | None = None
        self.values: dict[int, Value] = {}
        self.live: dict[int, Any] = {}
        self.live_args: tuple[tuple[Any, ...], dict[str, Any] | None] | None = None
        self.lost: dict[int, str] = {}
        self.dropped: str | None = None
        self.nbytes = 0
        self.source_hash: str | None = None
        self.fn_blob: bytes | None = None
        self.packed: bytes | None = None
        self.shared: dict[int, Any] | None = None
        self.origin: str | None = None  # the function's source file (a saved run's)

    def unpack(self) -> None:
        """Read :attr:`packed` (a saved run's record) into the fields: unpickles it."""
        if self.packed is None:
            return
        fn_blob, state, keys = pickle.loads(self.packed)
        shared = self.shared if self.shared is not None else {}
        values = {}
        for up in keys:
            value = shared[up]
            if type(value) is bytes:  # decoded once, shared by every node that got it
                value = shared[up] = pickle.loads(value)
            values[up] = value
        kept = KeptCall.from_state(state, fn_blob)
        kept.values = values
        for name in self.__slots__:
            if name not in ("packed", "origin", "shared"):
                setattr(self, name, getattr(kept, name))
        self.packed = None

    @property
    def complete(self) -> bool:
        """Every argument is here (in this process at least)."""
        return self.dropped is None and not self.lost

    @property
    def portable(self) -> bool:
        """Every argument is pickled: the record can be saved and loaded elsewhere."""
        return self.complete and not self.live and self.live_args is None

    def load(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Fresh ``(args, kwargs)``, as the call received them."""
        # Out-of-band buffers as writable copies: the call got a writable array, and a
        # task that works in place must fail on replay as it did (kept bytes would
        # unpickle as read-only arrays).
        values: dict[int, Any] = {
            up: pickle.loads(data, buffers=[bytearray(b) for b in buffers])
            if buffers
            else pickle.loads(data)
            for up, (data, buffers) in self.values.items()
        }
        values.update(self.live)
        if self.args is not None:
            args, kwargs = loads_call(self.args, values)
            return tuple(args), dict(kwargs)
        assert self.live_args is not None
        live_args, live_kwargs = self.live_args
        return (
            tuple(substitute(live_args, values)),
            dict(substitute(live_kwargs, values) if live_kwargs else {}),
        )

    def portable_state(self) -> tuple[Any, ...]:
        """The record as plain bytes, dicts and strings (what a saved run stores)."""
        return (self.args, self.values, self.lost, self.dropped, self.nbytes, self.source_hash)

    @classmethod
    def from_state(cls, state: tuple[Any, ...], fn_blob: bytes | None) -> KeptCall:
        """Inverse of :meth:`portable_state`."""
        kept = cls()
        kept.args, kept.values, kept.lost, kept.dropped, kept.nbytes, kept.source_hash = state
        kept.fn_blob = fn_blob
        return kept


def copy_payload(payload: Payload) -> Value:
    """A worker's value as bytes of this process: its buffers copied out of shared
    memory (or a cache file), so it survives the release of its segments."""
    return payload.data, [bytes(attach_segment(seg)) for seg in payload.segments]


class _KeepPickler(cloudpickle.Pickler):
    """Pickles a value in-band; a worker's value inside it (a State's) is copied out of
    shared memory as it goes, so that the pickle does not name segments that the run
    will unlink (``remote``: a cluster's reference, which the run will release, is
    replaced by the value, fetched)."""

    def __init__(self, file: Any, remote: bool) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self.remote = remote

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is Payload:
            if obj.segments:
                return (_inline_payload, copy_payload(obj))
            if self.remote:
                return (_inline_payload, (dumps(obj.load()), []))
        return super().reducer_override(obj)


def _inline_payload(data: bytes, buffers: list[bytes]) -> Payload:
    return Payload(dumps(pickle.loads(data, buffers=buffers)), ())


def pickle_value(value: Any, remote: bool = False) -> bytes:
    """``value`` pickled in-band (its buffers inside the pickle); ``remote``: the
    values of a cluster inside it (a State's) are fetched."""
    buffer = io.BytesIO()
    _KeepPickler(buffer, remote).dump(value)
    return buffer.getvalue()


def source_hash(fn: Any) -> str | None:
    """A short hash of ``fn``'s source text, or None if its source cannot be read."""
    target = inspect.unwrap(getattr(fn, "func", fn))  # functools.partial
    code = getattr(target, "__code__", None)
    if code is not None and not os.path.isfile(code.co_filename):
        # Its file is gone (a notebook cell's, after the kernel ended; a deleted
        # script): getsource would read another file, the running __main__'s,
        # whose text is no source of this function.
        return None
    try:
        text = inspect.getsource(target)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cap_from_env() -> int:
    """The cap on kept inputs per run: ``GRAPHEXEC_KEEP_INPUTS`` (bytes, or a size
    such as ``200MB``, ``2GiB``; ``0`` keeps none), else 1 GiB."""
    text = os.environ.get(CAP_ENV, "").strip()
    if not text:
        return DEFAULT_CAP
    cap = parse_size(text)
    if cap is None:
        raise ValueError(
            f"{CAP_ENV}={text!r} is not a size: write bytes, or a number with a unit "
            "such as 500MB or 2GiB (0 keeps no inputs)"
        )
    return cap
