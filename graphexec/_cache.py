"""The result cache: content keys, and an on-disk store that survives crashes.

Keys
    :func:`task_input_hash` hashes the task's identity (qualified name *and*
    source, so an edited function misses) and its arguments by content:
    builtins, nested containers, dataclasses, numpy arrays (dtype, shape and
    bytes, sha256 at ~2 GB/s) and, as a fallback, the pickled bytes. Nothing
    depends on ``hash()``, so keys are stable across processes, runs and
    ``PYTHONHASHSEED``. In a graph, an upstream value enters the key by the
    upstream's own key when it has one (a large intermediate is not hashed
    again), else by the hash of its pickled bytes.

Store
    One file per entry, ``<cache_dir>/<key[:2]>/<key>.gxc``::

        b"GXC1" | u32 header length | JSON header | pickle stream | buffers

    The header holds the expiry, the task, the layout and a crc32 of
    everything after it. Buffers (numpy data) are page-aligned so a hit is
    memory-mapped, not read. Entries are written to a temporary file in the
    same directory, fsynced and renamed into place: a reader sees a whole
    entry or none. A truncated or corrupt entry is reported, deleted and
    recomputed, never returned.

Concurrency
    Whoever computes an entry holds ``flock`` on ``<key>.lock``; another
    process (or another node with the same key) waits for the lock and then
    finds the entry, so an entry is computed about once even when several
    runs share the directory. A crashed holder's lock is released by the OS.

Security
    Entries are pickles: loading a cache directory written by someone else
    runs their code. The directory is created 0700 and entries 0600.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import inspect
import json
import logging
import mmap
import os
import pickle
import struct
import tempfile
import time
import warnings
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import cloudpickle

from ._serialize import PROTOCOL, SHM_THRESHOLD, _attach

logger = logging.getLogger("graphexec")

DEFAULT_DIR = ".graphexec-cache"
MAGIC = b"GXC1"
ALIGN = mmap.ALLOCATIONGRANULARITY  # buffers start on page boundaries: mmap offsets

clock = time.time  # tests replace this to move time without sleeping


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
    """Stands for an upstream value in a key: the upstream's own key or content hash."""

    __slots__ = ("digest",)

    def __init__(self, digest: str) -> None:
        self.digest = digest


def task_identity(fn: Any) -> str:
    """Qualified name plus source text; editing the function changes it."""
    fn = getattr(fn, "fn", fn)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        source = code.co_code.hex() + repr(code.co_consts) if code is not None else ""
    return name + "\n" + source


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
    h = hashlib.sha256()
    _feed(h, task_identity(context.task))
    try:
        _feed(h, arguments)
    except Unhashable as exc:
        name = getattr(context, "node", None) or getattr(context.task, "name", "?")
        warnings.warn(f"{name} is not cached: {exc}", RuntimeWarning, stacklevel=2)
        return None
    return h.hexdigest()


def content_hash(obj: Any) -> str:
    """Hash of a value by content (raises Unhashable)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def wire_hash(wire: tuple[bytes, tuple]) -> str:
    """Hash of a pickled value (a worker's Payload) without unpickling it."""
    h = hashlib.sha256(b"wire")
    data, segments = wire
    h.update(data)
    for seg in segments:
        view = _attach(seg)
        h.update(view)
        view.release()
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
            _feed(h, item, depth + 1)
        h.update(b"]")
    elif isinstance(obj, dict):
        # Order-independent, like a dict's equality: sort the items' own digests.
        items = sorted(_sub(k, depth) + _sub(v, depth) for k, v in obj.items())
        h.update(f"{kind.__qualname__}:{len(items)}{{".encode() + b"".join(items) + b"}")
    elif isinstance(obj, (set, frozenset)):
        items = sorted(_sub(v, depth) for v in obj)
        h.update(f"set:{len(items)}{{".encode() + b"".join(items) + b"}")
    elif _is_ndarray(obj):
        import numpy as np

        if obj.dtype.hasobject:
            raise Unhashable("numpy arrays of Python objects are not hashed by content")
        array = np.ascontiguousarray(obj)
        h.update(f"ndarray:{array.dtype.str}:{array.shape};".encode())
        h.update(memoryview(array).cast("B"))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"dataclass:{kind.__module__}.{kind.__qualname__}(".encode())
        for field in dataclasses.fields(obj):
            _feed(h, field.name, depth + 1)
            _feed(h, getattr(obj, field.name), depth + 1)
        h.update(b")")
    elif callable(obj) and hasattr(obj, "__code__"):
        h.update(b"function:" + task_identity(obj).encode())
    else:
        try:
            data = cloudpickle.dumps(obj, protocol=PROTOCOL)
        except Exception as exc:
            raise Unhashable(
                f"argument of type {kind.__module__}.{kind.__qualname__} cannot be hashed "
                f"(it does not pickle: {exc}); pass a cache_key_fn that handles it"
            ) from None
        h.update(f"pickle:{kind.__module__}.{kind.__qualname__}:".encode() + data)


def _sub(obj: Any, depth: int) -> bytes:
    h = hashlib.sha256()
    _feed(h, obj, depth + 1)
    return h.digest()


def _is_ndarray(obj: Any) -> bool:
    kind = type(obj)
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy"


# -- store --------------------------------------------------------------------


def expiry(expiration: Any) -> float | None:
    """Absolute expiry time for a ``cache_expiration`` (timedelta or seconds), from now."""
    if expiration is None:
        return None
    seconds = expiration.total_seconds() if isinstance(expiration, timedelta) else expiration
    return clock() + float(seconds)


class CacheStore:
    """One cache directory. Safe to share between processes."""

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = Path(root if root is not None else DEFAULT_DIR).resolve()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._locks: dict[str, int] = {}

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.gxc"

    # reading -----------------------------------------------------------------

    def lookup(self, key: str) -> Any:
        """A Payload for a valid, unexpired entry, or None. Corrupt entries are deleted."""
        from ._serialize import Payload

        path = self.path(key)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cache entry %s unreadable (%s): recomputing", path, exc)
            return None
        try:
            header, body_start = _parse(raw)
            if zlib.crc32(memoryview(raw)[body_start:]) != header["crc"]:
                raise ValueError("checksum mismatch")
            if len(raw) != header["size"]:
                raise ValueError("truncated")
        except (ValueError, KeyError, struct.error, json.JSONDecodeError) as exc:
            warnings.warn(
                f"graphexec cache entry {path} is corrupt ({exc}); it was deleted and the "
                "node will be recomputed", RuntimeWarning, stacklevel=2,
            )
            self._remove(path)
            return None
        expires = header.get("expires")
        if expires is not None and clock() >= expires:
            return None
        data_off, data_len = header["data"]
        data = raw[data_off : data_off + data_len]
        segments = tuple((str(path), off, size) for off, size in header["buffers"])
        return Payload(data, segments)

    # writing -----------------------------------------------------------------

    def write(self, key: str, data: bytes, buffers: list[memoryview], meta: dict) -> None:
        """Write an entry atomically (temp file, fsync, rename)."""
        path = self.path(key)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        meta = {"created": clock(), **meta}
        parts: list[Any] = [data, *buffers]
        reserve = len(json.dumps(meta)) + 200 + 48 * len(parts)
        while True:  # the header holds offsets that depend on its own reserved size
            base = _round_up(8 + reserve, ALIGN)
            offsets, pos = [], base
            for k, part in enumerate(parts):
                if k:
                    pos = _round_up(pos, ALIGN)
                size = memoryview(part).nbytes
                offsets.append([pos, size])
                pos += size
            header = dict(meta, data=offsets[0], buffers=offsets[1:], size=pos)
            crc, cursor = 0, base
            for (offset, _), part in zip(offsets, parts):
                crc = zlib.crc32(bytes(offset - cursor), crc)
                crc = zlib.crc32(part, crc)
                cursor = offset + memoryview(part).nbytes
            header["crc"] = crc
            encoded = json.dumps(header).encode()
            if 8 + len(encoded) <= base:
                break
            reserve = len(encoded) + 64
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".gxc")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(encoded)) + encoded)
                f.write(bytes(base - 8 - len(encoded)))
                cursor = base
                for (offset, size), part in zip(offsets, parts):
                    f.write(bytes(offset - cursor))
                    f.write(part)
                    cursor = offset + size
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            self._remove(Path(tmp))
            raise

    def write_value(self, key: str, value: Any, meta: dict) -> None:
        """Pickle ``value`` (large buffers kept apart, for mapping) and write it."""
        buffers: list[memoryview] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            try:
                raw = buffer.raw()
            except BufferError:
                return True
            if raw.nbytes < SHM_THRESHOLD:
                return True
            buffers.append(raw)
            return False

        data = cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=out_of_band)
        self.write(key, data, buffers, meta)

    # locking -----------------------------------------------------------------

    def try_lock(self, key: str) -> bool:
        """Take the compute lock of ``key`` without waiting; True if now ours."""
        if key in self._locks:
            return False  # another node of this run computes the same entry
        path = self.path(key).with_suffix(".lock")
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._locks[key] = fd
        return True

    def unlock(self, key: str) -> None:
        fd = self._locks.pop(key, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def unlock_all(self) -> None:
        for key in list(self._locks):
            self.unlock(key)

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass


def _parse(raw: bytes) -> tuple[dict, int]:
    if raw[:4] != MAGIC:
        raise ValueError("not a graphexec cache entry")
    (length,) = struct.unpack("<I", raw[4:8])
    header = json.loads(raw[8 : 8 + length])
    return header, header["data"][0]


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def clear_cache(
    cache_dir: str | os.PathLike[str] | None = None, *, expired_only: bool = True
) -> int:
    """Delete cache entries; by default only the expired ones. Returns how many.

    Args:
        cache_dir: the directory (default ``./.graphexec-cache``).
        expired_only: False deletes every entry.

    Example::

        gx.clear_cache()                       # prune expired entries
        gx.clear_cache("runs/cache", expired_only=False)
    """
    root = Path(cache_dir if cache_dir is not None else DEFAULT_DIR)
    if not root.is_dir():
        return 0
    removed = 0
    now = clock()
    for path in root.glob("*/*.gxc"):
        if expired_only:
            try:
                with open(path, "rb") as f:
                    head = f.read(8)
                    (length,) = struct.unpack("<I", head[4:8])
                    expires = json.loads(f.read(length)).get("expires")
            except (OSError, ValueError, struct.error):
                expires = -1.0  # unreadable: treat as expired
            if expires is None or expires > now:
                continue
        CacheStore._remove(path)
        CacheStore._remove(path.with_suffix(".lock"))
        removed += 1
    for tmp in root.glob("*/.tmp-*"):  # left by a writer that was killed
        CacheStore._remove(tmp)
    return removed
