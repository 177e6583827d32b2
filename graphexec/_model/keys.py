"""Cache keys: a task's identity and its arguments hashed by content.

:func:`task_input_hash` hashes the task's identity (qualified name, source
and bytecode, so an edited function misses; a closure's values and a
partial's arguments too) and its arguments by content: builtins, nested
containers, dataclasses, numpy arrays (dtype, shape and bytes, sha256 at
~2 GB/s) and, as a fallback, the pickled bytes. Nothing depends on
``hash()``, so keys are stable across processes, runs and
``PYTHONHASHSEED``. In a graph, an upstream value enters the key by the
upstream's own key and the stamp of its entry when it has one (a digest of
a small entry's bytes, when a large one was written: a large intermediate
is not hashed again; ``_data.cache.entry_stamp``), else by its content (see
``_data.cache.wire_hash``).

Part of the model: a key is a property of a call, whatever stores the value.
"""

from __future__ import annotations

import collections
import copyreg
import dataclasses
import functools
import hashlib
import inspect
import threading
import types
import warnings
import weakref
from typing import Any

import cloudpickle

from .node import user_stacklevel

PROTOCOL = 5  # pickle protocol of the fallback hash (the data plane's too)


class CacheContext:
    """What a ``cache_key_fn`` receives first (Prefect passes its TaskRunContext).

    Attributes:
        task: the :class:`Task` (``context.task.fn``, ``context.task.name``).
        node: the node's name.
    """

    __slots__ = ("node", "task")

    def __init__(self, task: Any, node: str) -> None:
        self.task = task
        self.node = node


# -- keys ---------------------------------------------------------------------


class Unhashable(TypeError):
    """An argument could not be hashed by content."""


class Fingerprint:
    """Stands for an upstream value in a key: the upstream's own key with its entry's
    stamp, or its content hash."""

    __slots__ = ("digest",)

    def __init__(self, digest: str) -> None:
        self.digest = digest


def warn_not_cached(name: str, exc: BaseException) -> None:
    """Node ``name`` has no cache key (``exc`` says why): it runs without the cache,
    and a warning says so at the user's line."""
    warnings.warn(f"{name} is not cached: {exc}", RuntimeWarning, stacklevel=user_stacklevel())


def task_identity(fn: Any) -> str:
    """Digest of what a task runs: qualified name, source text and compiled code.

    The source names the version on disk; the code (bytecode, constants, names,
    recursively) is what actually runs, so a file edited but not yet re-imported
    gives a key of its own instead of filing the old code's value under the new
    source. A closure's cell contents and a ``functools.partial``'s bound
    arguments are part of the identity too: tasks made by a factory differ by
    what they close over.
    """
    h = hashlib.sha256(b"identity\n")
    _feed_callable(h, getattr(fn, "fn", fn), 0)
    return h.hexdigest()


_active = threading.local()  # functions being fed: a recursive closure refers to itself


def _feed_callable(h: Any, fn: Any, depth: int) -> None:
    if depth > 200:
        raise Unhashable("functions nested more than 200 levels deep")
    stack = getattr(_active, "stack", None)
    if stack is None:
        stack = _active.stack = set()
    kind = type(fn)
    if id(fn) in stack:
        h.update(f"recursive:{getattr(fn, '__qualname__', kind.__qualname__)};".encode())
        return
    stack.add(id(fn))
    try:
        if isinstance(fn, functools.partial):
            h.update(b"partial(")
            _feed_callable(h, fn.func, depth + 1)
            _feed(h, fn.args, depth + 1)
            _feed(h, fn.keywords, depth + 1)
            h.update(b")")
        elif isinstance(fn, types.MethodType):
            h.update(b"method(")
            _feed_callable(h, fn.__func__, depth + 1)
            _feed(h, fn.__self__, depth + 1)
            h.update(b")")
        elif isinstance(fn, types.FunctionType):
            h.update(b"function:" + _code_identity(fn))
            _feed(h, fn.__defaults__, depth + 1)
            _feed(h, fn.__kwdefaults__, depth + 1)
            for cell in fn.__closure__ or ():
                try:
                    contents = cell.cell_contents
                except ValueError:  # an empty cell
                    h.update(b"empty-cell;")
                    continue
                _feed(h, contents, depth + 1)
        elif isinstance(fn, type) or kind.__name__ in (
            "builtin_function_or_method",
            "method_descriptor",
            "wrapper_descriptor",
        ):
            name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
            h.update(b"named:%d:" % len(name.encode()) + name.encode())
        else:  # a callable instance: its class's __call__ and its own content
            h.update(f"instance:{kind.__module__}.{kind.__qualname__}(".encode())
            call = inspect.getattr_static(kind, "__call__", None)
            if isinstance(call, types.FunctionType):
                _feed_callable(h, call, depth + 1)
            _feed_pickle(h, fn)
            h.update(b")")
    finally:
        stack.discard(id(fn))


_code_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _code_identity(fn: types.FunctionType) -> bytes:
    """Name, source and code of a function, computed once per function object.

    Once per object: ``inspect.getsource`` costs ~0.1 ms and a graph calls one
    function thousands of times; and a function object's code never changes, so
    the source it was first seen with is the right one even if the file is edited
    afterwards (what re-importing it would pick up, as a new object).
    """
    digest = _code_identities.get(fn)
    if digest is None:
        h = hashlib.sha256()
        name = f"{fn.__module__}.{fn.__qualname__}"
        h.update(b"%d:" % len(name.encode()) + name.encode())
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            source = ""
        _feed(h, source)
        _feed_code(h, fn.__code__, 0)
        digest = h.digest()
        _code_identities[fn] = digest
    return digest


def _feed_code(h: Any, code: types.CodeType, depth: int) -> None:
    """Bytecode and what it refers to; not line numbers or file names (moving a
    function does not change what it computes)."""
    if depth > 200:
        raise Unhashable("code nested more than 200 levels deep")
    h.update(
        b"code:%d:%d:%d:%d:"
        % (code.co_argcount, code.co_kwonlyargcount, code.co_posonlyargcount, code.co_flags)
    )
    _feed(h, code.co_code, depth + 1)
    h.update(b"consts:%d[" % len(code.co_consts))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(h, const, depth + 1)
        else:
            _feed(h, const, depth + 1)
    h.update(b"]")
    for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        _feed(h, names, depth + 1)


def task_input_hash(context: Any, arguments: dict[str, Any]) -> str | None:
    """A cache key from the task's identity and its arguments' content (Prefect's name).

    Args:
        context: has ``.task`` (the task being cached).
        arguments: the call's arguments by parameter name.

    Returns:
        A hex digest, or None (with a warning) when an argument cannot be hashed,
        in which case the node is simply not cached.

    Example::

        @gx.task(cache_key_fn=gx.task_input_hash, cache_expiration=timedelta(days=1))
        def simulate(params, seed): ...
    """
    try:
        return input_hash(task_identity(context.task), arguments)
    except Unhashable as exc:
        name = str(getattr(context, "node", None) or getattr(context.task, "name", "?"))
        warn_not_cached(name, exc)
        return None


def input_hash(identity: str, arguments: dict[str, Any]) -> str:
    """:func:`task_input_hash` of a task whose :func:`task_identity` is ``identity``
    (raises Unhashable): the cache gate computes a task's identity once per run."""
    h = identity_hasher(identity)
    if type(arguments) is dict:  # _feed's dict branch, without its dispatch
        return items_hash(h, [_sub(k, 0) + _sub(v, 0) for k, v in arguments.items()])
    _feed(h, arguments)
    return h.hexdigest()


def identity_hasher(identity: str) -> Any:
    """A hash fed with a task's identity, as :func:`input_hash` starts (copy it)."""
    data = identity.encode()
    return hashlib.sha256(b"str:%d:" % len(data) + data)  # what _feed(h, identity) feeds


def items_hash(start: Any, items: list[bytes]) -> str:
    """:func:`input_hash` from a copy of ``start`` (:func:`identity_hasher`) and the
    digests of the arguments' items, ``_sub(name) + _sub(value)`` (sorted here)."""
    items.sort()
    h = start.copy()
    h.update(b"dict:%d{" % len(items) + b"".join(items) + b"}")
    return h.hexdigest()


def content_hash(obj: Any) -> str:
    """Hash of a value by content (raises Unhashable)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any, depth: int = 0) -> None:
    if depth > 200:
        raise Unhashable("arguments nested more than 200 levels deep")
    kind = type(obj)
    if obj is None or kind in (bool, int, float, complex):
        h.update(f"{kind.__name__}:{obj!r};".encode())
    elif kind is str:
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"str:%d:" % len(data) + data)
    elif kind in (bytes, bytearray, memoryview):
        data = bytes(obj)
        h.update(b"bytes:%d:" % len(data) + data)
    elif kind is Fingerprint:
        h.update(b"upstream:" + obj.digest.encode())
    elif isinstance(obj, (list, tuple)):
        h.update(f"{kind.__qualname__}:{len(obj)}[".encode())
        for item in obj:
            if type(item) is Fingerprint:  # a reduction's upstreams: _feed's branch, inline
                h.update(b"upstream:" + item.digest.encode())
            else:
                _feed(h, item, depth + 1)
        h.update(b"]")
        if kind is not list and kind is not tuple:
            _feed_subclass_state(h, obj, depth)
    elif isinstance(obj, dict):
        if isinstance(obj, collections.OrderedDict):
            # Its order is part of its equality (and of what a function sees first).
            items = [_sub(k, depth) + _sub(v, depth) for k, v in obj.items()]
        else:  # order-independent, like a dict's equality: sort the items' own digests
            items = sorted(_sub(k, depth) + _sub(v, depth) for k, v in obj.items())
        h.update(f"{kind.__qualname__}:{len(items)}{{".encode() + b"".join(items) + b"}")
        if kind is not dict:
            if isinstance(obj, collections.defaultdict):
                # What a missing key gives: defaultdict(int) and defaultdict(list) differ.
                h.update(b"default:")
                _feed(h, obj.default_factory, depth + 1)
            _feed_subclass_state(h, obj, depth)
    elif isinstance(obj, (set, frozenset)):
        items = sorted(_sub(v, depth) for v in obj)
        h.update(f"set:{len(items)}{{".encode() + b"".join(items) + b"}")
        if kind is not set and kind is not frozenset:
            _feed_subclass_state(h, obj, depth)
    elif _is_ndarray(obj):
        import numpy as np

        if obj.dtype.hasobject:
            raise Unhashable("numpy arrays of Python objects are not hashed by content")
        # The full dtype description (a structured dtype's fields, a datetime's unit,
        # the byte order) and the array's own shape: ascontiguousarray makes a 0-d
        # array 1-d, and the buffer protocol refuses datetimes, so hash a byte view.
        descr = np.lib.format.dtype_to_descr(obj.dtype)
        h.update(f"ndarray:{descr!r}:{obj.shape};".encode())
        h.update(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"dataclass:{kind.__module__}.{kind.__qualname__}(".encode())
        for field in dataclasses.fields(obj):
            _feed(h, field.name, depth + 1)
            _feed(h, getattr(obj, field.name), depth + 1)
        h.update(b")")
    elif isinstance(obj, (types.FunctionType, types.MethodType, functools.partial)):
        _feed_callable(h, obj, depth + 1)
    elif _plain_object(kind):
        _feed_object(h, obj, depth)
    else:
        _feed_pickle(h, obj)


def _feed_subclass_state(h: Any, obj: Any, depth: int) -> None:
    """A container subclass's own attributes (its instance ``__dict__``), which its
    items do not show: two instances with equal items but other attributes are
    other arguments. None (a namedtuple, a plain subclass): nothing is fed, and the
    key is its items' and its class name's, as before."""
    state = getattr(obj, "__dict__", None)
    if state:
        h.update(b"attributes:")
        _feed(h, state, depth + 1)


# What object's own reduce names to rebuild an instance (typeshed does not list it).
_NEWOBJ = getattr(copyreg, "__newobj__")  # noqa: B009


def _plain_object(kind: type) -> bool:
    """True for a class that leaves pickling to ``object`` (no ``__reduce__`` or
    ``__reduce_ex__`` of its own): :func:`_feed_object` then asks that protocol
    for the instance's state."""
    return (
        kind.__reduce_ex__ is object.__reduce_ex__
        and kind.__reduce__ is object.__reduce__
        and not issubclass(kind, type)
    )


def _feed_object(h: Any, obj: Any, depth: int) -> None:
    """An instance pickled the default way, by its class's name and its state (its
    ``__dict__`` and slots, or what its ``__getstate__`` gives), walked like any
    argument: a set's order, a dict's, do not matter.

    Its pickle is no stable key: cloudpickle pickles a class of ``__main__`` (a
    script's, a notebook's) by value with an id drawn per process, and a set
    inside pickles in an order that depends on PYTHONHASHSEED, so the same
    argument had another key in every process and a resumed sweep recomputed it.
    Anything else (state the default protocol does not give, a C type's own, a
    walk that fails: a cycle) is hashed by its pickle, as before.
    """
    kind = type(obj)
    try:
        reduced = obj.__reduce_ex__(PROTOCOL)
    except Exception:  # e.g. a lock: its pickle fails too, and says why
        _feed_pickle(h, obj)
        return
    if not (
        isinstance(reduced, tuple)
        and len(reduced) >= 3
        and reduced[0] is _NEWOBJ
        and reduced[1] == (kind,)
        and all(extra is None for extra in reduced[3:])
    ):
        _feed_pickle(h, obj)
        return
    inner = hashlib.sha256()
    try:
        _feed(inner, reduced[2], depth + 1)
    except Unhashable:
        _feed_pickle(h, obj)
        return
    h.update(f"object:{kind.__module__}.{kind.__qualname__}:".encode() + inner.digest())


def _feed_pickle(h: Any, obj: Any) -> None:
    kind = type(obj)
    try:
        data = cloudpickle.dumps(obj, protocol=PROTOCOL)
    except Exception as exc:
        raise Unhashable(
            f"argument of type {kind.__module__}.{kind.__qualname__} cannot be hashed "
            f"(it does not pickle: {exc}); pass a cache_key_fn that handles it"
        ) from None
    h.update(f"pickle:{kind.__module__}.{kind.__qualname__}:".encode() + data)


try:  # CPython's own SHA-256 (3.12+, then 3.11 and before): for the few bytes of a
    # scalar's digest half the cost of OpenSSL's, whose set-up per hash dominates
    # there (a parameter sweep's key makes one per argument). The same digests.
    from _sha2 import sha256 as _small_sha256  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - the Python in use decides
    try:
        from _sha256 import sha256 as _small_sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:
        _small_sha256 = hashlib.sha256

_SCALARS = (bool, int, float, complex, type(None))
_short_digests: dict[str, bytes] = {}  # _sub of short strings: parameter names, mostly
SHORT_STR = 64  # strings up to this long have their digest remembered...
SHORT_STR_KEPT = 4096  # ...this many of them


def _sub(obj: Any, depth: int = 0) -> bytes:
    """The digest of ``obj`` alone (a dict's item): what ``_feed`` gives a new hash.

    A dict of arguments is hashed item by item (its order must not matter), so
    a parameter sweep's key makes two of these per argument: the parameter's
    name, remembered, and a plain value, fed without the general walk.
    """
    kind = type(obj)
    if depth < 199:  # deeper, _feed raises Unhashable: let it
        if kind is str and len(obj) <= SHORT_STR:
            digest = _short_digests.get(obj)
            if digest is None:
                data = obj.encode("utf-8", "surrogatepass")
                digest = _small_sha256(b"str:%d:" % len(data) + data).digest()
                if len(_short_digests) < SHORT_STR_KEPT:
                    _short_digests[obj] = digest
            return digest
        if kind is int:  # repr() of an int is its %d
            return _small_sha256(b"int:%d;" % obj).digest()
        if kind in _SCALARS:
            return _small_sha256(f"{kind.__name__}:{obj!r};".encode()).digest()
    h = hashlib.sha256()
    _feed(h, obj, depth + 1)
    return h.digest()


# The digest of an argument's name or value as an item of the arguments, for
# items_hash: _sub itself (not a function calling it: a parameter sweep's key
# makes one per node, on the scheduler's thread).
argument_digest = _sub


def _is_ndarray(obj: Any) -> bool:
    kind = type(obj)
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy"
