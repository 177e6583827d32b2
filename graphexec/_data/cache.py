"""The result cache: an on-disk store that survives crashes.

Keys are made in the model (``_model.keys``); :func:`wire_hash` keys a value
that is still in its wire form (a worker's result) by its content.

Store
    One file per entry, ``<cache_dir>/<key[:2]>/<key>.gxc``::

        b"GXC2" | u32 header length | u32 crc32 of the header | JSON header
                | pickle stream | buffers

    The header holds the expiry, the task, the layout and a crc32 of
    everything after it; it has a crc32 of its own, so a damaged offset cannot
    point a reader at the wrong bytes. Buffers (numpy data) are page-aligned
    so a hit is memory-mapped, not copied. Entries are written to a temporary file in the
    same directory, fsynced and renamed into place: a reader sees a whole
    entry or none. A truncated or corrupt entry is reported, deleted and
    recomputed, never returned; so is one this code cannot unpickle (a class
    renamed since), which a hit finds out by loading the value at once.

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

import fcntl
import hashlib
import itertools
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
import psutil

from .._model.errors import safe_str
from .._model.keys import content_hash
from .serialize import PROTOCOL, SHM_THRESHOLD, Payload, attach_segment, loads_value

logger = logging.getLogger("graphexec")

DEFAULT_DIR = ".graphexec-cache"
MAGIC = b"GXC2"
HEAD = 12  # magic, header length, header crc32
ALIGN = mmap.ALLOCATIONGRANULARITY  # buffers start on page boundaries: mmap offsets

clock = time.time  # tests replace this to move time without sleeping
_holds = itertools.count(1)
_REPLACED = object()  # lookup: the entry changed under us, look again
MAP_READ_MIN = 1 << 20  # entries this large are checked through a mapping, not read
STALE_TMP = 3600.0  # seconds: an older .tmp- file was left by a writer that died


CONTENT_HASH_MAX = 1 << 20  # pickle streams up to this size are hashed by content


def wire_hash(wire: tuple[bytes, tuple], task: str = "a cached task") -> str:
    """Key of a value a worker pickled (a Payload), for a cached dependent.

    By content, like :func:`content_hash` of the value itself, so that the key
    does not depend on where the value was made: a set's pickle follows
    ``PYTHONHASHSEED`` (each run's workers differ), and the sync scheduler
    hashes the value itself. The value is unpickled for this (buffers mapped,
    not copied) and dropped. A large pickle stream (a big pure-Python structure)
    is hashed as bytes instead: unpickling and walking it would cost more than
    its computation saves; that key is stable as long as its pickle is.

    A value that cannot be unpickled or hashed here is hashed as bytes too, and
    a ``RuntimeWarning`` (once per ``task``, the dependent whose key it enters)
    says so: such a key may change from run to run, and then the entry misses.
    """
    data, segments = wire
    if len(data) <= CONTENT_HASH_MAX:
        try:
            return content_hash(loads_value(wire))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: unpickling runs the value's code
            _warn_hashed_as_bytes(task, exc)
    h = hashlib.sha256(b"wire")
    h.update(data)
    for seg in segments:
        view = attach_segment(seg)
        h.update(view)
        view.release()
    return h.hexdigest()


_warned_bytes_keys: set[str] = set()  # tasks told that their keys fell back to bytes


def _warn_hashed_as_bytes(task: str, exc: BaseException) -> None:
    if task in _warned_bytes_keys:
        return
    _warned_bytes_keys.add(task)
    warnings.warn(
        f"graphexec could not hash an upstream value of {task} by content for its cache "
        f"key ({type(exc).__name__}: {safe_str(exc)}), so it hashed the value's pickled "
        f"bytes instead; those can differ from run to run (sets, PYTHONHASHSEED, object "
        f"ids), and then {task} misses its cache entries and is recomputed. Make every "
        "module the value needs importable in the process that calls compute(), return "
        f"plain data from the upstream task, or give {task} a cache_key_fn that does not "
        "depend on this value",
        RuntimeWarning,
        stacklevel=2,
    )


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
        self._root = str(self.root)
        self._locks: dict[str, int] = {}

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.gxc"

    # reading -----------------------------------------------------------------

    def lookup(self, key: str) -> Any:
        """A Payload for a valid, unexpired entry, or None. Corrupt entries are deleted.

        An entry with buffers is held for this run under a private hard link
        (``.hold-<pid>-<n>.hold``, removed when the value is released): buffers are
        mapped later, when a dependent runs, and by then another process may have
        pruned the entry or replaced it (refresh). The link is made after reading,
        and checked to name the inode that was read.
        """
        for _ in range(3):  # the entry was replaced between reading and holding it: again
            found = self._lookup_once(key)
            if found is not _REPLACED:
                return found
        return None

    def _lookup_once(self, key: str) -> Any:

        path = self._file(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size >= max(MAP_READ_MIN, 1):  # checked through a mapping: no copy
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                        return self._check_and_load(key, path, st, mapped, Payload)
                return self._check_and_load(key, path, st, f.read(), Payload)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cache entry %s unreadable (%s): recomputing", path, exc)
            return None

    def _check_and_load(
        self, key: str, path: str, st: os.stat_result, raw: Any, payload_type: Any
    ) -> Any:
        try:
            header, body_start = _parse(raw)
            if len(raw) != header["size"]:
                raise ValueError(
                    f"{len(raw)} bytes instead of {header['size']}: truncated or overwritten"
                )
            view = memoryview(raw)
            try:
                if zlib.crc32(view[body_start:]) != header["crc"]:
                    raise ValueError("checksum mismatch")
            finally:
                view.release()
        except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
            warnings.warn(
                f"graphexec cache entry {path} is corrupt ({exc}); it was deleted and the "
                "node will be recomputed",
                RuntimeWarning,
                stacklevel=4,
            )
            self._remove(Path(path))
            return None
        expires = header.get("expires")
        if expires is not None and clock() >= expires:
            return None
        data_off, data_len = header["data"]
        data = bytes(raw[data_off : data_off + data_len])
        hold = path
        if header["buffers"]:
            hold = self._hold(path, st)
            if hold is None or hold is _REPLACED:
                return hold
        segments = tuple((hold, off, size) for off, size in header["buffers"])
        payload = payload_type(data, segments)
        # Load it now: an entry whose pickle names a class or module this code no
        # longer has (renamed, moved) would fail every dependent, run after run.
        # Buffers are mapped, not read; the value stays loaded for whoever uses it.
        try:
            payload.load()
        except Exception as exc:
            warnings.warn(
                f"graphexec cache entry {path} cannot be loaded by this code "
                f"({type(exc).__name__}: {exc}); it was deleted and the node will be "
                "recomputed",
                RuntimeWarning,
                stacklevel=4,
            )
            self._remove(Path(path))
            self._release_hold(hold, path)
            return None
        return payload

    @staticmethod
    def _hold(path: str, st: os.stat_result) -> Any:
        """A private hard link to the entry just read; None if it is gone, _REPLACED if
        another file took its name meanwhile."""
        hold = os.path.join(os.path.dirname(path), f".hold-{os.getpid()}-{next(_holds)}.hold")
        try:
            os.link(path, hold)
        except FileNotFoundError:
            return None  # pruned since we read it: a miss
        except OSError:
            return path  # no hard links here (some network filesystems): map the entry
        try:
            held = os.stat(hold)
        except OSError:
            return None
        if (held.st_ino, held.st_dev) != (st.st_ino, st.st_dev):
            CacheStore._remove(Path(hold))
            return _REPLACED
        return hold

    @staticmethod
    def _release_hold(hold: str, path: str) -> None:
        if hold != path:
            CacheStore._remove(Path(hold))

    def _file(self, key: str) -> str:
        return f"{self._root}/{key[:2]}/{key}.gxc"  # path(), without pathlib's cost

    # writing -----------------------------------------------------------------

    def write(self, key: str, data: bytes, buffers: list[memoryview], meta: dict) -> None:
        """Write an entry atomically (temp file, fsync, rename)."""
        path = self.path(key)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        meta = {"created": clock(), **meta}
        parts: list[Any] = [data, *buffers]
        reserve = len(json.dumps(meta)) + 200 + 48 * len(parts)
        while True:  # the header holds offsets that depend on its own reserved size
            base = _round_up(HEAD + reserve, ALIGN)
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
            if HEAD + len(encoded) <= base:
                break
            reserve = len(encoded) + 64
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".gxc")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<II", len(encoded), zlib.crc32(encoded)) + encoded)
                f.write(bytes(base - HEAD - len(encoded)))
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
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            if _same_file(fd, path):
                break
            # clear_cache removed the file between our open and our lock: a lock
            # on a file nobody else can open excludes nobody. Try the new one.
            os.close(fd)
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
    """The header of an entry and where its body starts; ValueError if it is damaged.

    The header has its own crc32 (the one inside it covers the body): a damaged
    offset or size must not send a reader to the wrong bytes.
    """
    if raw[:4] != MAGIC:
        raise ValueError("not a graphexec cache entry")
    length, crc = struct.unpack("<II", raw[4:HEAD])
    encoded = raw[HEAD : HEAD + length]
    if len(encoded) != length or zlib.crc32(encoded) != crc:
        raise ValueError("header checksum mismatch")
    header = json.loads(encoded)
    data = header["data"]
    if not isinstance(data, list) or not all(
        isinstance(region, list)
        and len(region) == 2
        and all(isinstance(n, int) and n >= 0 for n in region)
        for region in [data, *header["buffers"]]
    ):
        raise ValueError("malformed header")
    return header, data[0]


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
    for path in root.glob("*/[!.]*.gxc"):  # entries, not .tmp- or .hold- files
        if path.name.startswith(".tmp-"):
            continue  # not an entry (yet): removed below
        if expired_only:
            try:
                with open(path, "rb") as f:
                    head = f.read(HEAD)
                    (length,) = struct.unpack("<I", head[4:8])
                    header, _ = _parse(head + f.read(length))
                expires = header.get("expires")
            except (OSError, ValueError, KeyError, TypeError, struct.error):
                expires = -1.0  # unreadable: treat as expired
            if expires is None or expires > now:
                continue
        CacheStore._remove(path)
        _remove_unheld_lock(path.with_suffix(".lock"))
        removed += 1
    for tmp in root.glob("*/.tmp-*"):  # left by a writer that was killed
        try:
            stale = time.time() - tmp.stat().st_mtime > STALE_TMP  # not being written now
        except OSError:
            continue
        if stale:
            CacheStore._remove(tmp)
    for hold in root.glob("*/.hold-*"):  # left by a run that was killed
        try:
            pid = int(hold.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if not psutil.pid_exists(pid):
            CacheStore._remove(hold)
    return removed


def _same_file(fd: int, path: Path) -> bool:
    """True if ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _remove_unheld_lock(path: Path) -> None:
    """Remove a lock file unless a run is computing its entry right now (holds it).

    Removed while locked, so a run that opened it a moment ago finds, once it
    has the lock, that the path names another file, and locks that one.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # held: its entry is being computed; the lock file stays
    try:
        if _same_file(fd, path):
            path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)
