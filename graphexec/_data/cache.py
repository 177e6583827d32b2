"""The result cache: an on-disk store that survives crashes, for millions of entries.

Keys are made in the model (``_model.keys``); :func:`wire_hash` keys a value
that is still in its wire form (a worker's result) by its content.

A cache directory (layout 3)::

    <dir>/cache.sqlite  (+ -wal, -shm)   one row per entry, SQLite in WAL mode
    <dir>/cache.lock                     compute locks: one lock per key on ONE file
    <dir>/<key[:2]>/<key>.gxb            the file of a large entry

Small entries
    A row ``(key, task, created, expires, size, crc, data)`` whose ``data`` is
    the value's pickle and ``crc`` a crc32 of the key and the pickle, checked
    on every hit (SQLite keeps no checksums of its own). Rows are written in
    transactions, so a reader sees a whole entry or none; a writer killed
    mid-transaction leaves nothing (the WAL's uncommitted frames are ignored).

Large entries
    A value with out-of-band buffers (numpy data of ``SHM_THRESHOLD`` bytes and
    more) or a pickle over ``INLINE_MAX`` is a file::

        b"GXC2" | u32 header length | u32 crc32 of the header | JSON header
                | pickle stream | buffers

    The header holds the key, the expiry, the task, the layout and a crc32 of
    everything after it; it has a crc32 of its own, so a damaged offset cannot
    point a reader at the wrong bytes. Buffers are page-aligned, so a hit is
    memory-mapped, not copied. The file is written to a temporary file,
    fsynced and renamed, and only then is its row (``data`` NULL) committed:
    the row is the entry; a file without a row (its writer died between the
    two) is never read, and pruning deletes it.

    A corrupt entry (either kind) is reported, deleted and recomputed, never
    returned; so is one this code cannot unpickle (a class renamed since),
    which a hit finds out by loading the value at once.

Who writes, and when
    The process that computed the value writes its entry, with one exception
    that costs nothing: a process-pool worker writes large entries itself (the
    parent never copies their buffers), while a small value's pickle reaches
    the parent anyway as the call's result, so the parent's cache gate stores
    it from those bytes (:meth:`CacheStore.put`). Rows written by a process
    that holds the key's compute lock (the parent; the ``sync`` and
    ``threads`` executors) join a batch that a flusher thread commits within
    ``BATCH_DELAY`` seconds or ``BATCH_MAX`` rows (``BATCH_DELAY_ALONE`` and
    ``BATCH_MAX_ALONE`` while alone, below), sorted by key, and at the end of
    each run (:meth:`CacheStore.unlock_all`); the lock of a batched key is
    released only once its row is committed, so whoever waits for the lock
    then finds the entry. Any other writer (a large entry, a dask worker)
    commits at once.

Durability
    A batch is committed without waiting for the disk (``synchronous=NORMAL``
    on the flusher's connection): visible to every process at once, and kept
    if this process dies. A syncer thread fsyncs the WAL within ``SYNC_DELAY``
    (1 s) of such a commit, and checkpoints it; the end of each run commits
    what is left with ``synchronous=FULL`` (:meth:`CacheStore.unlock_all`),
    as is every other commit (a large entry's row, a deletion). So a SIGKILL
    of the parent loses at most the batch not yet committed (the small entries
    of the last ``BATCH_DELAY_ALONE`` = 0.25 s while alone, ``BATCH_DELAY`` =
    50 ms otherwise), a power cut at most the small entries of the last
    1.25 s while alone (a row waits up to 0.25 s for its batch's commit, which
    waits up to ``SYNC_DELAY`` = 1 s for the syncer's fsync; 1.05 s otherwise),
    plus however long that commit and fsync take on a slow disk; neither
    leaves a partial or corrupt entry (SQLite's WAL keeps the database whole,
    and every entry has its checksum). A new
    directory's database is written whole from a template, fsynced and linked
    into place (:func:`_create_db`).

Concurrency
    Whoever computes an entry holds a ``fcntl`` byte-range lock on
    ``cache.lock`` at an offset made from the key (a 60-bit hash: two keys
    share a lock with a probability of about 1e-18 per pair). No file per key;
    a crashed holder's locks are released by the OS; ``F_GETLK`` names the
    holder's pid. Such locks belong to a process, not to a file descriptor,
    so a process-wide registry (``_Shared.held``) excludes this process's
    other runs, and the lock file is opened once per process and never closed
    (closing any descriptor of it would drop every lock the process holds).

Alone
    Such a lock costs a system call, and each one costs more the more locks
    the file carries (10 ns per lock held): with a lock per entry being
    computed or waiting for its batch, that was a third of the cost of a
    cold cached run of tiny tasks. Most of the time one process uses a
    directory; it need not tell anyone which entries it computes. So:

    * every process that takes compute locks read-locks ``PRESENCE`` (a byte
      above the keys') while it does (from its first lock to the end of its
      run: :meth:`_Shared.leave`);
    * a process that finds no other there write-locks ``ALONE`` and is
      *alone*: its compute locks are entries of ``held`` only (offset -1), no
      system call, and its batches may be larger and later (holding a lock
      costs nothing then);
    * a newcomer read-locks ``PRESENCE``, then tries for a read lock on
      ``ALONE`` at each call, never sleeping (its nodes wait meanwhile, as for
      a held entry, and look again every ``LOCK_POLL``). The alone process's
      flusher looks for newcomers every ``WATCH`` (50 ms); seeing one, it
      commits its batch (whose keys it then lets go of), puts each key still
      held in the lock file and only then turns its lock on ``ALONE`` into a
      read lock (:meth:`_Shared._yield`), which lets the newcomer in: from then
      on both lock as above, and the newcomer finds every entry being computed
      locked;
    * a newcomer not let in within ``JOIN_WAIT`` (2 s) of its first try (the
      alone process is stopped, or starved) goes ahead and locks in the file
      anyway: an entry both compute then may be computed twice, never returned
      wrong or partial ("each entry computed about once"). The alone process
      yields once it runs again;
    * listing (``graphexec cache ls|info``, :meth:`CacheStore.entries`) never
      joins: it cannot see an alone process's locks, and says so
      (:meth:`CacheStore.alone_elsewhere`); pruning joins, waiting
      ``JOIN_WAIT`` at most, and keeps every entry if not let in.

    A process killed while alone loses its locks with it, as ever. While
    alone, no other process adds rows, so a lookup that missed needs no second
    look once its lock is taken unless this process let go of that key's lock
    meanwhile (its row may be committed then): ``epoch`` counts the lets-go
    and the changes of mode, ``let_go`` says when each key was last let go of
    (:meth:`_Shared.let_go_since`). A process of a graphexec before this
    protocol does not announce itself: beside it, an entry may be computed
    twice (never a wrong or partial one).

Old layout
    A directory written by graphexec before layout 3 holds one ``<key>.gxc``
    file (and a ``<key>.lock`` file) per entry. They are never read: when the
    database is created in such a directory, a warning says how many there are
    and how to delete them (``clear_cache`` and ``graphexec cache clear`` do).

Security
    Entries are pickles: loading a cache directory written by someone else
    runs their code. The directory is created 0700, its files 0600.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import mmap
import os
import re
import socket
import struct
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._model.errors import safe_str
from .._model.keys import content_hash
from .._model.node import user_stacklevel
from .serialize import Payload, attach_segment, dumps_apart, loads_value

if TYPE_CHECKING:
    import sqlite3

logger = logging.getLogger("graphexec")

DEFAULT_DIR = ".graphexec-cache"
DB_NAME = "cache.sqlite"
LOCK_NAME = "cache.lock"
FILE_SUFFIX = ".gxb"  # a large entry's file
OLD_SUFFIX = ".gxc"  # an entry of the old layout (one file per entry): never read
LAYOUT = 3
MAGIC = b"GXC2"
HEAD = 12  # magic, header length, header crc32
ALIGN = mmap.ALLOCATIONGRANULARITY  # buffers start on page boundaries: mmap offsets

clock = time.time  # tests replace this to move time without sleeping
_holds = itertools.count(1)
_REPLACED = object()  # lookup: the entry changed under us, look again
MAP_READ_MIN = 1 << 20  # entries this large are checked through a mapping, not read
STALE_TMP = 3600.0  # seconds: an older .tmp- (or row-less) file was left by a writer that died
INLINE_MAX = 1 << 20  # pickles up to this size (without out-of-band buffers) are rows
# A key as it is used (a row's key, a large entry's file name, and the older layout's
# file names): a cache_key_fn's key that is not all of this is hashed instead.
SAFE_KEY = re.compile(r"[0-9a-zA-Z_-]{8,128}")
BATCH_MAX = 128  # rows: a batch this large is committed at once (and their locks let go)
# ... while alone (see "Alone"): holding locks costs nothing then, and a transaction
# of many rows rewrites fewer pages per row (random keys: every row touches a page)
BATCH_MAX_ALONE = 16384
BATCH_DELAY_ALONE = 0.25
# Seconds the flusher and the syncer wait without work before they exit (started
# again by the next batch): a process that used many directories keeps no thread
# for each.
IDLE_EXIT = 10.0
FLUSHER_CACHE_KIB = 32768  # the flusher's SQLite page cache: a large batch's pages
BATCH_DELAY = 0.05  # seconds a batched row waits at most for its commit
SYNC_DELAY = 1.0  # seconds a batch's commit waits at most to be on disk (power cuts)
WAL_KEEP = 4 << 20  # bytes of WAL file kept once the WAL restarts (journal_size_limit)
CHECKPOINT_WAIT = 0.1  # seconds the syncer's checkpoint waits for other processes
BUSY_TIMEOUT = 60.0  # seconds SQLite waits for another process's write transaction
# The lock file's two control bytes, above every key's (keys lock offsets below 2**60):
# see "Alone" in the module docstring.
PRESENCE = 1 << 62  # read-locked by every process that takes compute locks here
ALONE = PRESENCE + 1  # write-locked by a process alone here, read-locked by the others
WATCH = 0.05  # seconds between an alone process's looks for a newcomer
# Seconds a newcomer waits at most, in all, for an alone process to yield (its nodes
# wait meanwhile; nothing sleeps); then it locks in the file anyway (see "Alone").
JOIN_WAIT = 2.0
FRESH_KEPT = 1 << 21  # keys _Shared.fresh holds at most (then: None, every key asked)
# Keys _Shared.let_go remembers at most (then forgotten: every older miss is looked
# up again under its lock, once).
LET_GO_KEPT = 1 << 21
YIELD_COMMITS = 4  # commits at most of an alone process's batch before it yields
_OUT, _ALONE, _JOINED = 0, 1, 2  # _Shared.mode


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
        stacklevel=user_stacklevel(),
    )


# -- store --------------------------------------------------------------------


def expiry(expiration: Any) -> float | None:
    """Absolute expiry time for a ``cache_expiration`` (timedelta or seconds), from now."""
    if expiration is None:
        return None
    seconds = expiration.total_seconds() if isinstance(expiration, timedelta) else expiration
    return clock() + float(seconds)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY NOT NULL,
    task TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    size INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    data BLOB
) WITHOUT ROWID
"""
_SELECT = "SELECT expires, crc, data FROM entries WHERE key = ?"
SELECT_CHUNK = 500  # keys per SELECT (SQLite allows 32,766 parameters since 3.32)
# A row as a lookup judges it: (expires, crc, data, created)
Found = tuple[float | None, int, bytes | None, float]


@functools.lru_cache(maxsize=SELECT_CHUNK)
def _select(n: int) -> str:
    return (
        "SELECT key, expires, crc, data, created FROM entries WHERE key IN ("
        + ", ".join("?" * n)
        + ")"
    )


INSERT_CHUNK = 128  # rows per INSERT statement (7 parameters each)


@functools.lru_cache(maxsize=INSERT_CHUNK)
def _insert(n: int) -> str:
    return "INSERT OR REPLACE INTO entries VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * n)


_LIST = "SELECT key, task, created, expires, size, crc, data IS NULL FROM entries"
Row = tuple[str, str, float, float | None, int, int | None, bytes | None]  # crc None: batched


def _crc(key: str, data: bytes = b"") -> int:
    """A row's checksum: the key too, so a damaged key cannot make another key's hit."""
    return zlib.crc32(data, zlib.crc32(key.encode()))


def _with_crc(row: Row) -> Row:
    """A batched row (its crc left to the flusher: None) with its crc."""
    key, task, created, expires, size, _, data = row
    return (key, task, created, expires, size, _crc(key, data or b""), data)


def entry_stamp(data: bytes | None, created: float) -> str:
    """What tells one value of an entry's key from another: a digest of a row's bytes
    (a small entry: equal values, equal stamps), or when a large entry (a file,
    whose bytes are not read to be hashed) was written. A dependent's cache key
    takes its upstream's key with this stamp (``_engine/caching.py``), so that an
    upstream recomputed with a new value (its entry expired, ``refresh_cache``)
    never lets its dependents hit entries made from the old one."""
    if data is not None:
        return hashlib.blake2b(data, digest_size=16).hexdigest()
    return f"written {created!r}"


class CacheDamaged(Exception):
    """A cache directory's database cannot be opened (it is not an SQLite database)."""


def damage_text(root: Any, exc: BaseException) -> str:
    """What to say of the damaged database of the cache directory ``root``."""
    return (
        f"the cache database {Path(root) / DB_NAME} is damaged ({safe_str(exc)}): delete "
        f"{root} (or move it away) to start a new cache there"
    )


def rollback(conn: Any) -> None:
    """Roll back the transaction an error interrupted, if SQLite has not already (it
    does on a full disk: a ROLLBACK then raises, and would hide the disk's error)."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except Exception:  # the error being raised is the one to report
            pass


def store_for_run(root: str | os.PathLike[str] | None) -> CacheStore | None:
    """The store a run caches in; None, with a warning, if its database is damaged or
    the directory cannot be used (read-only, not ours, a full disk): the run then
    computes every node without the cache, rather than not at all."""
    try:
        return CacheStore(root)
    except CacheDamaged as exc:
        why = str(exc)
    except OSError as exc:  # (a path that is a file is refused before: ValueError)
        why = (
            f"the cache directory {root if root is not None else DEFAULT_DIR} cannot be "
            f"used ({exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}); "
            "give compute(cache_dir=...) a directory this process can write"
        )
    warnings.warn(
        f"{why}; this run computes without the cache",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
    return None


def _offset(key: str) -> int:
    """The byte of ``cache.lock`` that stands for ``key``'s compute lock."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 4


def stored_apart(wire: tuple[bytes, tuple]) -> bool:
    """True if the value with this wire form is a large entry (a file, written by the
    process that made the value); else it is a row (see the module docstring)."""
    data, segments = wire
    return bool(segments) or len(data) > INLINE_MAX


def _set_up(conn: Any, busy: type[Exception]) -> None:
    """WAL mode, full sync and the table, on a new connection, however busy the file.

    SQLite answers "database is locked" at once, without its busy handler, where
    waiting could deadlock: switching the journal mode while another process
    opens the file or checkpoints the WAL (the syncer's TRUNCATE) is such a case.
    Nothing is held here, so trying again until ``BUSY_TIMEOUT`` is safe.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(_SCHEMA)
            return
        except busy as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


class _Held:
    """A thread's connection, closed when the thread ends (its ``threading.local``
    values go then) or the store goes: left to the garbage collector, an open
    connection is a ``ResourceWarning`` on Python 3.13 (an error under pytest's
    ``-W error``) for every thread that ever looked an entry up.

    Not closed in a forked child (clearing the parent's other threads there drops
    their values: see :func:`_after_fork`, an inherited connection is never
    touched) nor while the interpreter exits (its main thread then clears the
    daemon threads' values, and a close would wait for whatever SQLite call such
    a thread was in, up to ``BUSY_TIMEOUT``)."""

    __slots__ = ("conn", "pid")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.pid = os.getpid()

    def __del__(self) -> None:
        if self.pid != os.getpid() or sys.is_finalizing():
            return
        try:
            self.conn.close()
        except Exception:  # (closed already, or an interpreter half gone: nothing to do)
            pass


@functools.cache
def _empty_db() -> bytes:
    """The bytes of an empty cache database in WAL mode, with its table."""
    import sqlite3

    mem = sqlite3.connect(":memory:")
    try:
        mem.execute(_SCHEMA)
        serialize = getattr(mem, "serialize", None)  # Python 3.11 and later
        if serialize is None:
            raise NotImplementedError("sqlite3.Connection.serialize")
        data = bytearray(serialize())
    finally:
        mem.close()
    data[18:20] = b"\x02\x02"  # the header's file format versions: 2 is WAL mode
    return bytes(data)


def _create_db(root: Path, db: str) -> None:
    """Create the directory's database, whole, in WAL mode and private (0600: SQLite
    gives its -wal and -shm files the same mode), unless another process just did.

    Written to a temporary file, fsynced and linked into place (a link does not
    replace a database another process created meanwhile): two fsyncs, where
    creating it with SQLite (the switch to WAL, then the table) took a run ~20 ms
    of waiting for the disk, a sixth of a cold run of 5,000 tiny tasks.
    """
    # (with shutil and random, 5 ms: a sync or threads run without a cache need not
    # pay it; the process pool's multiprocessing.connection imports it anyway)
    import tempfile

    try:
        data = _empty_db()
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".sqlite")
    except Exception:  # no serialize() in this sqlite3: SQLite creates it (_set_up)
        os.close(os.open(db, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        return
    try:
        try:
            view = memoryview(data)
            while view:  # a short write (a full disk) would link a truncated database
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(f"could not write {DB_NAME} in {root}")
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, db)
        except FileExistsError:
            return  # another process created it first
        except OSError:  # no hard links here: an empty file, which SQLite sets up
            os.close(os.open(db, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            return
        dir_fd = os.open(root, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)  # the link itself: durable
        finally:
            os.close(dir_fd)
    finally:
        CacheStore._remove(Path(tmp))


class _Shared:
    """What the stores of one directory share in this process: connections (one per
    thread), the batch of rows not yet committed, and the compute locks held."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = str(root / DB_NAME)
        self.mutex = threading.Lock()  # guards pending, writing, release, held
        self.wake = threading.Event()  # the flusher has a batch to commit (soon)
        self.committing = threading.Lock()  # one commit at a time from this process
        self.local = threading.local()
        self.pending: dict[str, Row] = {}  # rows of the batch, visible to lookups here
        self.writing: dict[str, Row] = {}  # the batch being committed: visible too
        self.release: set[str] = set()  # keys to unlock once their rows are committed
        self.held: dict[str, int] = {}  # keys whose compute lock this process holds:
        # their offsets in the lock file, or -1 while alone (no lock in the file)
        self.mode = _OUT  # see "Alone" in the module docstring
        self.present = False  # PRESENCE is read-locked (mode _JOINED or _ALONE, or joining)
        # When this process first found another alone here and not yielding (0.0: not
        # waiting for one): see _join.
        self.knocked = 0.0
        # Bumped by whatever may have let a row in since a lookup that missed (a lock
        # let go by this process, a change of mode). ``let_go`` holds the epoch at
        # which each key was last let go of, ``any_since`` the last epoch that
        # concerned any key, so that a miss is looked up again under its lock only
        # if its own key was let go of meanwhile (let_go_since): one dict lookup a
        # key, however old the miss (the nodes a run parks until its window has
        # room missed at its start).
        # Alone in a directory that held no entry when this process became alone:
        # every key it has locked or written since (a superset of the keys with an
        # entry), so that a lookup of any other key is a miss without a query (the
        # first run of a sweep into a new directory). None otherwise.
        self.fresh: set[str] | None = None
        self.epoch = 0
        self.let_go: dict[str, int] = {}
        self.any_since = 0
        self.since = 0.0  # when the oldest row of the batch joined it
        self.flusher: threading.Thread | None = None
        # Commits of the flusher not yet on disk (see _flush_loop): the syncer's cue.
        self.unsynced = threading.Event()
        self.syncing = threading.Lock()
        self.checkpoint_due = False  # the flusher's commits are in the WAL only
        self.syncer: threading.Thread | None = None
        self.warned_damage = False
        new = not os.path.exists(self.db)
        if new:
            _create_db(root, self.db)
        self.lock_fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        import sqlite3

        try:
            self.conn()
        except sqlite3.DatabaseError as exc:  # not a database (a file overwritten, truncated)
            os.close(self.lock_fd)
            raise CacheDamaged(damage_text(root, exc)) from None
        if new:
            _warn_old_layout(root)
        _warn_if_shared_across_machines(root, self.conn())  # (once per directory and process)

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are not shared between threads).

        ``synchronous=FULL`` (a commit returns once the WAL is on disk), except the
        flusher's: see :meth:`_flush_loop`.
        """
        import sqlite3  # deferred: only a run that caches needs it (import graphexec stays fast)

        held = getattr(self.local, "conn", None)
        if held is None:
            conn = sqlite3.connect(
                self.db, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            try:
                _set_up(conn, sqlite3.OperationalError)
            except BaseException:
                conn.close()
                raise
            held = self.local.conn = _Held(conn)
        return held.conn

    # rows ----------------------------------------------------------------------

    def enqueue(self, row: Row, release: bool = False) -> None:
        """Add a row to the batch (its key's lock is held here: see the docstring);
        ``release``: and let go of that lock once the row is committed.

        The flusher is woken for the first row of a batch and when it is full, not
        for each row: this runs on the scheduler's thread, once per entry.
        """
        with self.mutex:
            first = not self.pending
            if first:
                self.since = time.monotonic()
            self.pending[row[0]] = row
            if release:
                self.release.add(row[0])
            full = len(self.pending) == self._batch_max()
            if first or full:
                self._start_flusher()
        if first or full:
            self.wake.set()

    def enqueue_many(self, rows: list[Row]) -> None:
        """:meth:`enqueue` of each row, each with ``release``, in one hold of the mutex
        (a scheduler step's finished nodes)."""
        with self.mutex:
            pending = self.pending
            first = not pending
            if first:
                self.since = time.monotonic()
            for row in rows:
                pending[row[0]] = row
            self.release.update([row[0] for row in rows])
            full = len(pending) >= self._batch_max()
            if first or full:
                self._start_flusher()
        if first or full:
            self.wake.set()

    def _batch_max(self) -> int:
        return BATCH_MAX_ALONE if self.mode == _ALONE else BATCH_MAX

    def _start_flusher(self) -> None:
        """Under the mutex: start the flusher unless it runs (it exits once idle)."""
        if self.flusher is None:
            self.flusher = threading.Thread(
                target=self._flush_loop, name="graphexec-cache-flush", daemon=True
            )
            self.flusher.start()

    def _flush_loop(self) -> None:
        """Commit batches: within ``BATCH_DELAY`` of their first row, or once full.

        Its commits do not wait for the disk (``synchronous=NORMAL``: an fsync per
        commit kept the batch's locks, and with them every other lock operation,
        waiting for it) and never checkpoint the WAL (that copies every page the
        WAL holds, an unbounded wait): the syncer thread makes them durable within
        ``SYNC_DELAY`` seconds, and checkpoints. Committed rows are visible to every
        process at once, and survive the death of this one; a power cut may lose
        those of the last ``SYNC_DELAY`` seconds (SQLite keeps the database whole).
        """
        conn = self.conn()
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={WAL_KEEP}")
        conn.execute(f"PRAGMA cache_size=-{FLUSHER_CACHE_KIB}")
        self.local.relaxed = True
        while True:
            alone = self.mode == _ALONE
            if not self.wake.wait(WATCH if alone else IDLE_EXIT) and not alone:
                with self.mutex:  # idle: exit (a directory used once keeps no thread)
                    if not self.pending and not self.release and self.mode != _ALONE:
                        self.flusher = None
                        return
            self.wake.clear()  # before looking: a row added after this sets it again
            while True:
                if self.mode == _ALONE:
                    self._watch()
                with self.mutex:
                    count, since = len(self.pending), self.since
                if not count:
                    break
                alone = self.mode == _ALONE
                delay = BATCH_DELAY_ALONE if alone else BATCH_DELAY
                left = since + delay - time.monotonic()
                if count < (BATCH_MAX_ALONE if alone else BATCH_MAX) and left > 0:
                    self.wake.wait(min(left, WATCH))
                    self.wake.clear()
                    continue
                self.commit()

    def commit(self) -> None:
        """Commit the batch, then release the locks that waited for it.

        The batch is taken whole (``pending`` becomes ``writing``, a new dict
        takes the next rows), and what its commit lets go of is settled in one
        hold of the mutex, with set operations: the scheduler's thread takes the
        mutex for every entry, and a flusher that took it over and over (a slice
        of rows at a time) made it wait for the GIL after each, up to the 5 ms
        switch interval: 2 us an entry on a first run of 10,000.
        """
        with self.committing:
            with self.mutex:
                batch = self.pending
                if batch:
                    self.writing = batch  # lookups still find them until committed
                    self.pending = {}
            if batch:
                try:
                    self.write([batch[key] for key in sorted(batch)])
                    self._written()
                except (KeyboardInterrupt, SystemExit):
                    # Not committed, and not given up on: the batch goes back (rows
                    # batched meanwhile are newer) for the next commit.
                    with self.mutex:
                        self.writing = {}
                        for key, row in batch.items():
                            self.pending.setdefault(key, row)
                    raise
                except Exception as exc:  # a full disk, a damaged database: not cached
                    logger.warning(
                        "%d cache entries not written to %s (%s: %s); their nodes will be "
                        "recomputed next time",
                        len(batch),
                        self.db,
                        type(exc).__name__,
                        safe_str(exc),
                    )
            in_file: list[int] = []
            done: set[str] = set()
            with self.mutex:
                # Its rows were visible to lookups here before (``writing``), and no
                # other process adds rows while this one is alone: no bump for them.
                self.writing = {}
                release, held = self.release, self.held
                if release:
                    # Keys whose lock waited for this batch; one batched again since
                    # (a newer row) keeps its lock until that row is committed.
                    done = release.intersection(batch)
                    if done and self.pending:
                        done.difference_update(self.pending)
                    release -= done
                    if done:
                        self._bump(done)
                    for key in done:
                        offset = held.get(key)
                        if offset is not None:
                            if offset < 0:  # taken while alone: no lock in the file
                                del held[key]
                            else:
                                in_file.append(offset)
                    if release and not self.pending:  # their rows went another way (a
                        for key in list(release):  # deletion)
                            self._unlock(key)
                        release.clear()
            # Unlocked outside the mutex; each key stays in ``held`` until its lock is
            # let go, so that this process does not take it again meanwhile (a lock it
            # holds already would be granted, then released here).
            if in_file:
                fd = self.lock_fd
                for offset in in_file:
                    fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)
                with self.mutex:
                    self._bump(done)
                    for key in done:
                        offset = held.get(key)
                        if offset is not None and offset >= 0:
                            del held[key]

    def _written(self) -> None:
        """A batch was committed (by this thread's connection)."""
        if getattr(self.local, "relaxed", False):  # the flusher: on disk within SYNC_DELAY
            self.checkpoint_due = True
            self.unsynced.set()
            with self.mutex:  # beside the syncer's exit (see _sync_loop)
                if self.syncer is None:
                    self.syncer = threading.Thread(
                        target=self._sync_loop, name="graphexec-cache-sync", daemon=True
                    )
                    self.syncer.start()
        else:  # synchronous=FULL: the WAL is on disk, with every commit before this one
            self.unsynced.clear()

    def _sync_loop(self) -> None:
        self.conn().execute(f"PRAGMA busy_timeout={int(CHECKPOINT_WAIT * 1000)}")
        while True:
            if not self.unsynced.wait(IDLE_EXIT):
                with self.mutex:  # idle: exit, unless a commit came meanwhile
                    if not self.unsynced.is_set():
                        self.syncer = None
                        return
                continue
            time.sleep(SYNC_DELAY)  # the commits of the next SYNC_DELAY s share one fsync
            try:
                self.sync()
            except Exception as exc:  # a full disk, a damaged database: nothing to lose
                logger.warning("cache %s: syncing failed (%s)", self.db, safe_str(exc))

    def sync(self, checkpoint: bool = True) -> None:
        """Put the flusher's commits on disk (fsync of the WAL), if there are any, and
        checkpoint the WAL into the database (which bounds the WAL); the end of a run
        only syncs, and leaves the checkpoint to the syncer thread."""
        with self.syncing:
            if self.unsynced.is_set():
                self.unsynced.clear()  # a commit after this sets it again: next round
                try:
                    # SQLite locks the database and its -shm file, never the WAL: this
                    # descriptor can be closed without dropping a lock of SQLite's.
                    fd = os.open(self.db + "-wal", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = -1  # checkpointed and deleted: the database file holds it all
                if fd >= 0:
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            if checkpoint and self.checkpoint_due:
                self.checkpoint_due = False
                # With this process's commits held back, the checkpoint can complete
                # and empty the WAL (TRUNCATE): concurrent commits kept the WAL from
                # ever restarting, and it grew by every page written. Other processes
                # do not hold it up: this thread's connection waits CHECKPOINT_WAIT.
                with self.committing:
                    self.conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def write_now(self, row: Row) -> None:
        """Commit one row at once (a large entry's, or one without this process's
        lock). Its key joins ``fresh``: batched rows' keys are there from their lock."""
        fresh = self.fresh
        if fresh is not None:
            fresh.add(row[0])
        with self.committing:
            self.write([row])

    def write(self, rows: list[Row]) -> None:
        """Insert (or replace) rows, given in key order, in one transaction, now.

        Key order: SQLite inserts keys in order with fewer page visits (a batch
        sorts its keys alone, cheaper than its rows: ``commit``). One statement
        per chunk of ``INSERT_CHUNK`` rows, not ``executemany``: that lets go of
        the GIL and takes it back for every row, and each time it is taken back
        the scheduler's thread is made to hand it over.
        """
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for start in range(0, len(rows), INSERT_CHUNK):
                # a chunk's crcs here, between statements (which let go of the GIL):
                # not all at once, which would keep the scheduler's thread waiting
                params: list[Any] = []
                for row in rows[start : start + INSERT_CHUNK]:
                    params.extend(row if row[5] is not None else _with_crc(row))
                conn.execute(_insert(len(params) // 7), params)
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise

    def delete(self, key: str, crc: int) -> None:
        """Delete the row of ``key`` if it is still the one that was judged (``crc``)."""
        import sqlite3

        with self.mutex:
            row = self.pending.get(key)
            if row is not None and (row[5] if row[5] is not None else _with_crc(row)[5]) == crc:
                del self.pending[key]
                release = self._unbatch(key)
            else:
                release = False
        try:
            with self.committing:
                self.conn().execute("DELETE FROM entries WHERE key = ? AND crc = ?", (key, crc))
        except sqlite3.Error as exc:
            self.damaged(exc)
        finally:
            if release:
                with self.mutex:
                    self._unlock(key)

    def _unbatch(self, key: str) -> bool:
        """Under the mutex, ``key``'s row just taken out of the batch: did its lock
        wait for that row's commit? Then the caller lets go of it (:meth:`_unlock`)
        once the row that replaces it (or its deletion) is committed: no later batch
        would (the lock was held until then, and nobody else could compute it)."""
        if key in self.release:
            self.release.discard(key)
            return True
        return False

    def damaged(self, exc: BaseException) -> None:
        if not self.warned_damage:
            self.warned_damage = True
            warnings.warn(
                f"{damage_text(self.root, exc)}; meanwhile every entry counts as missing "
                "and nodes are recomputed",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    # locks ---------------------------------------------------------------------

    def try_lock_many(self, keys: list[str]) -> list[bool]:
        """Try each key's lock without waiting (one pass under the mutex): taken?

        Alone (see the module docstring), a lock is an entry of ``held`` only.
        """
        got = []
        held, fd = self.held, self.lock_fd
        with self.mutex:
            if self.mode == _OUT and not self._join():
                return [False] * len(keys)  # an alone process has not yielded yet
            if self.mode == _ALONE:
                for key in keys:
                    if key in held:
                        got.append(False)  # another run of this process computes it
                    else:
                        held[key] = -1
                        got.append(True)
                fresh = self.fresh
                if fresh is not None:
                    fresh.update(keys)
                    if len(fresh) > FRESH_KEPT:
                        self.fresh = None
                return got
            for key in keys:
                if key in held:
                    got.append(False)  # another run of this process computes it
                    continue
                offset = _offset(key)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
                except OSError:
                    got.append(False)
                    continue
                held[key] = offset
                got.append(True)
        return got

    def quiet_epoch(self) -> int | None:
        """``epoch`` if this process is alone in the directory (it joins now if it has
        not), else None: while alone, no other process adds rows, so a lookup that
        missed still holds under the lock as long as ``epoch`` has not changed."""
        with self.mutex:
            if self.mode == _OUT:
                self._join()
            return self.epoch if self.mode == _ALONE else None

    def let_go_since(self, keys: list[str], epoch: int | None) -> list[str]:
        """Those of ``keys``, each of which missed at ``epoch`` (a :meth:`quiet_epoch`;
        None: not alone then), that may have an entry now: the keys this process
        let go of since, or all of them if this process is no longer alone (or
        that epoch is older than what ``let_go`` remembers)."""
        with self.mutex:
            if epoch is None or self.mode != _ALONE or epoch < self.any_since:
                return keys
            if epoch == self.epoch:
                return []
            let_go = self.let_go
            return [key for key in keys if let_go.get(key, -1) > epoch]

    def _bump(self, keys: Iterable[str] | None) -> None:
        """Under the mutex: a new epoch, for ``keys`` (None: any key)."""
        self.epoch += 1
        let_go = self.let_go
        if keys is None:  # a change of mode: ``fresh`` is known no more
            self.any_since = self.epoch
            let_go.clear()
            self.fresh = None
            return
        let_go.update(dict.fromkeys(keys, self.epoch))
        if len(let_go) > LET_GO_KEPT:  # forget them: older misses look again, once
            let_go.clear()
            self.any_since = self.epoch

    def _no_entries(self) -> bool:
        """True if the database holds no entry (asked once alone: nobody adds one)."""
        import sqlite3

        try:
            return self.conn().execute("SELECT 1 FROM entries LIMIT 1").fetchone() is None
        except sqlite3.Error:
            return False

    def unlock(self, key: str) -> None:
        with self.mutex:
            if key in self.pending or key in self.writing:
                self.release.add(key)  # once its row is committed
            else:
                self._unlock(key)

    def _unlock(self, key: str) -> None:
        offset = self.held.pop(key, None)
        self._bump((key,))  # its entry may be written (a large one commits at once)
        if offset is not None and offset >= 0:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN, 1, offset)

    # alone ---------------------------------------------------------------------

    def _join(self) -> bool:
        """Under the mutex, from ``_OUT``, without waiting: announce this process, and
        be alone if no other is here, or join the others; False while a process alone
        here has not yielded yet (the caller's nodes wait, as for a held entry, and
        try again at their next look).

        Nothing sleeps here: this runs on a scheduler's thread, under the mutex. Once
        ``JOIN_WAIT`` seconds have passed since this process first found the alone
        process not yielding (it may be stopped, or starved), this one joins anyway
        and locks in the file: beside a process that has not yielded an entry may be
        computed twice, never returned wrong or partial.
        """
        fd = self.lock_fd
        if not self.present:
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, PRESENCE)
                self.present = True
            except OSError:  # an alone process's look for newcomers (an instant)
                pass
        if self.present:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, ALONE)
            except OSError:  # another process is alone (it yields once it sees us), or
                try:  # others have joined (they read-lock ALONE): then we join them
                    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, ALONE)
                except OSError:
                    pass
                else:
                    return self._joined()
            else:
                if not self._others_present():
                    self.mode = _ALONE
                    self.knocked = 0.0
                    self._bump(None)
                    self.fresh = set() if self._no_entries() else None
                    self._start_flusher()  # it watches for newcomers...
                    self.wake.set()  # ...from now, if it was waiting without a timeout
                    return True
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, ALONE)  # from write: granted
                return self._joined()
        now = time.monotonic()
        if not self.knocked:
            self.knocked = now
            return False
        if now - self.knocked < JOIN_WAIT:
            return False
        logger.warning(
            "cache %s: another process (pid %s), alone in it, has not let this one in "
            "within %g s (stopped? starved?); this process locks its entries anyway: "
            "an entry both compute now may be computed twice",
            self.root,
            self._alone_pid(under_mutex=True) or "unknown",
            JOIN_WAIT,
        )
        return self._joined()

    def _joined(self) -> bool:
        self.mode = _JOINED
        self.knocked = 0.0
        self._bump(None)
        return True

    def _others_present(self) -> bool:
        """Under the mutex, PRESENCE read-locked: does another process hold it too?
        (Asked by trying to turn this process's read lock into a write lock, which
        works where F_GETLK's struct differs.)"""
        fd = self.lock_fd
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, PRESENCE)
        except OSError:
            return True
        fcntl.lockf(fd, fcntl.LOCK_SH, 1, PRESENCE)  # back to a read lock: granted
        return False

    def _watch(self) -> None:
        """The flusher, every WATCH s while alone: a newcomer makes this process yield.

        The batch is committed first, and its keys let go of: only the locks of the
        nodes still running (at most ``WINDOW_ALONE``, the gate's) and of rows batched
        meanwhile go into the file. Each lock taken costs time in proportion to the
        locks the file holds: the window plus a whole batch (20,000 locks) took 5 s,
        under the mutex.
        """
        with self.mutex:
            if self.mode != _ALONE or not self._others_present():
                return
        # Still alone meanwhile (the newcomer waits, JOIN_WAIT at most), so the run
        # batches more rows during a commit: again while that left a batch to commit
        # (each is shorter than the one before).
        for _ in range(YIELD_COMMITS):
            self.commit()
            if len(self.pending) <= BATCH_MAX:
                break
        with self.mutex:
            if self.mode == _ALONE:
                self._yield()

    def _yield(self) -> None:
        """Under the mutex: stop being alone. Every key held gets its lock in the file
        first, then ALONE is only read-locked, which lets the newcomer in."""
        fd = self.lock_fd
        held = self.held
        # Highest offset first: Linux keeps a process's locks sorted, and a lock below
        # all the others is found its place at once (a third of the time of random order)
        taken = sorted(((_offset(key), key) for key, offset in held.items() if offset < 0),
                       reverse=True)  # fmt: skip
        for offset, key in taken:
            held[key] = offset
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            except OSError:  # a process that does not announce itself (an older
                pass  # graphexec), or a newcomer past JOIN_WAIT, holds it: both compute it
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, ALONE)  # from write: granted
        self.mode = _JOINED
        self._bump(None)
        logger.debug("cache %s: another process joined; compute locks now in the file", self.root)

    def leave(self) -> None:
        """Stop announcing this process, if it holds no compute lock (end of a run)."""
        with self.mutex:
            if self.held:
                return  # another run of this process computes entries
            if not self.present and self.mode == _OUT:
                self.knocked = 0.0  # knocked without announcing itself (an instant)
                return
            fd = self.lock_fd
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, ALONE)
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, PRESENCE)
            self.mode = _OUT
            self.present = False
            self.knocked = 0.0
            self._bump(None)

    def join(self, wait: float) -> None:
        """Join (or be alone) as a run does, waiting up to ``wait`` s for an alone
        process to yield, outside the mutex: for pruning, which must see what every
        process computes (``holder``); :meth:`leave` when done."""
        deadline = time.monotonic() + wait
        while True:
            with self.mutex:
                if self.mode != _OUT or self._join():
                    return
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)

    def holder(self, key: str) -> int | None:
        """The pid of the process computing ``key`` now (this one included), or None;
        -1 if unknown: the system cannot say who, or a process alone here (which keeps
        its locks in memory) may be computing it.

        Never joins (never makes an alone process yield): ``graphexec cache ls`` and
        a waiting node's log line ask this, and must not slow a run down or wait.
        """
        if key in self.held:
            return os.getpid()
        pid = self.file_holder(key)
        if pid is None and self._alone_pid() is not None:
            return -1
        return pid

    def file_holder(self, key: str) -> int | None:
        """The pid of the process holding ``key``'s lock in the lock file (-1 where
        the system cannot say who), or None: not counting a process alone here."""
        if not sys.platform.startswith("linux"):
            return -1 if _locked_elsewhere(self.lock_fd, _offset(key)) else None
        return _getlk(self.lock_fd, fcntl.F_WRLCK, _offset(key))

    def _alone_pid(self, under_mutex: bool = False) -> int | None:
        """The pid of another process alone here (it write-locks ALONE; -1 where the
        system cannot say who), or None."""
        if self.mode == _ALONE:
            return None  # this one
        if sys.platform.startswith("linux"):
            return _getlk(self.lock_fd, fcntl.F_RDLCK, ALONE)
        if not under_mutex:  # the test below takes a lock: not beside _join
            with self.mutex:
                return self._alone_pid(under_mutex=True)
        # Elsewhere: can this process read-lock ALONE? Joined, it holds that lock
        # already (granted again), or went ahead without it (JOIN_WAIT): keeps it.
        try:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, ALONE)
        except OSError:
            return -1
        if self.mode == _OUT:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN, 1, ALONE)
        return None


def _getlk(fd: int, kind: int, offset: int) -> int | None:
    """Linux: the pid of another process whose lock on byte ``offset`` conflicts with
    a lock of ``kind``, or None (``F_GETLK``; this process's own locks never do)."""
    # struct flock on Linux: short type, short whence, off_t start, off_t len, pid_t pid
    query = struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)
    found, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return None if found == fcntl.F_UNLCK else pid


def _locked_elsewhere(fd: int, offset: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
    except OSError:
        return True
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)
    return False


_registry: dict[str, _Shared] = {}
_registry_lock = threading.Lock()
_inherited: list[_Shared] = []  # a forked child's copies: never used, never closed


def _shared(root: Path) -> _Shared:
    shared = _registry.get(str(root))
    if shared is None:
        with _registry_lock:
            shared = _registry.get(str(root))
            if shared is None:
                shared = _registry[str(root)] = _Shared(root)
    return shared


def _after_fork() -> None:
    # The parent's connections, threads and locks are not the child's: closing an
    # inherited SQLite connection could even disturb the parent's. Keep, never use.
    global _registry_lock
    _inherited.extend(_registry.values())
    _registry.clear()
    _registry_lock = threading.Lock()


def _commit_all() -> None:
    for shared in list(_registry.values()):
        shared.commit()
        shared.sync(checkpoint=False)  # a checkpoint may wait for other processes


os.register_at_fork(after_in_child=_after_fork)
atexit.register(_commit_all)


# Filesystems whose files other machines may open too (mountinfo's type field).
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
        "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.cephfs", "9p", "afs",
        "ocfs2", "gfs2", "panfs", "wekafs", "fuse.s3fs", "fuse.gcsfuse",
    }
)  # fmt: skip


def network_filesystem(path: Path | str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the network filesystem ``path`` is on (``"nfs4"``, ``"lustre"``...),
    or None: a local one, or the system does not say (not Linux)."""
    real = os.path.realpath(path)
    best, found = -1, None
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                if "-" not in fields:
                    continue
                # (mountinfo escapes a space, tab, newline or backslash as \ooo)
                mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                # (>=: of mounts on one point the last is the one in use, as an
                # NFS share an automounter put over its autofs entry)
                if inside and len(mount) >= best:
                    best, found = len(mount), fields[fields.index("-") + 1]
    except (OSError, IndexError):
        return None
    return found if found in NETWORK_FILESYSTEMS else None


# How recently another machine must have used a directory for a warning.
OTHER_MACHINE_WINDOW = 7 * 24 * 3600.0


def _other_machines(conn: Any, now: float) -> list[str]:
    """Record that this machine uses the directory; the others that did lately.

    Only on a network filesystem (a local one cannot be opened from elsewhere), in a
    table of its own that older graphexecs ignore: one row per machine."""
    me = socket.gethostname()
    conn.execute("CREATE TABLE IF NOT EXISTS machines (host TEXT PRIMARY KEY, seen REAL)")
    conn.execute("INSERT OR REPLACE INTO machines VALUES (?, ?)", (me, now))
    rows = conn.execute(
        "SELECT host FROM machines WHERE host != ? AND seen > ? ORDER BY seen DESC",
        (me, now - OTHER_MACHINE_WINDOW),
    ).fetchall()
    return [host for (host,) in rows]


def _warn_if_shared_across_machines(root: Path, conn: Any) -> None:
    kind = network_filesystem(root)
    if kind is None:
        return
    try:
        others = _other_machines(conn, time.time())
    except Exception as exc:  # (read-only, busy: the warning is a courtesy)
        logger.debug("graphexec: could not record this machine in %s: %s", root, exc)
        return
    if others:
        warnings.warn(
            f"graphexec's cache directory {root} is on a network filesystem ({kind}) and "
            f"was used in the last week from another machine too ({', '.join(others[:3])}). "
            "Its database (SQLite in WAL mode) is safe only while every process using "
            "it runs on one machine: shared between machines (the tasks of a SLURM "
            "array on several nodes) it can be corrupted, and its lookups then fail "
            "and nodes are recomputed. Give each machine its own cache_dir= (a local "
            "disk, $TMPDIR, or a directory named after the machine)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


def _warn_old_layout(root: Path) -> None:
    old = sum(1 for p in old_layout_files(root) if p.suffix == OLD_SUFFIX)
    if old:
        logger.warning(
            "%s holds %d cache entries written by an older graphexec (one %s file each). "
            "This version keeps its entries in %s and never reads those: their nodes are "
            "recomputed once. `graphexec cache clear %s` (or gx.clear_cache(..., "
            "expired_only=False)) deletes them",
            root,
            old,
            OLD_SUFFIX,
            DB_NAME,
            root,
        )


@dataclass
class EntryInfo:
    """One entry as listed (``graphexec cache ls``, pruning)."""

    key: str
    task: str
    created: float
    expires: float | None
    size: int  # bytes of the value: the pickle, or the file
    file: Path | None  # a large entry's file
    readable: bool  # its checksums hold (and its file is there)
    held: bool  # a run computes it now, or a live process maps its file

    def expired(self, now: float) -> bool:
        """Past its expiry, or unreadable (a lookup would delete it)."""
        return not self.readable or (self.expires is not None and self.expires <= now)


class CacheStore:
    """One cache directory. Safe to share between processes and threads; cheap to make
    (what is costly is made once per directory and process)."""

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = Path(root if root is not None else DEFAULT_DIR).resolve()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._root = str(self.root)
        self._shared = _shared(self.root)
        self._locks: set[str] = set()  # keys this store (one run) holds

    def path(self, key: str) -> Path:
        """Where a large entry of ``key`` has its file."""
        return self.root / key[:2] / f"{key}{FILE_SUFFIX}"

    def _file(self, key: str) -> str:
        return f"{self._root}/{key[:2]}/{key}{FILE_SUFFIX}"  # path(), without pathlib's cost

    # reading -----------------------------------------------------------------

    def has(self, key: str) -> bool:
        """True if ``key`` has an entry (valid or not, expired or not)."""
        import sqlite3

        shared = self._shared
        if key in shared.pending or key in shared.writing:
            return True
        try:
            return shared.conn().execute(_SELECT, (key,)).fetchone() is not None
        except sqlite3.Error:
            return False

    def lookup(self, key: str) -> Any:
        """A Payload for a valid, unexpired entry, or None. Corrupt entries are deleted.

        A large entry is held for this run under a private hard link
        (``.hold-<pid>-<n>.hold``, removed when the value is released): buffers are
        mapped later, when a dependent runs, and by then another process may have
        pruned the entry or replaced it (refresh). The link is made after reading,
        and checked to name the inode that was read.
        """
        return self.judge(key, self.rows((key,)).get(key))

    def rows(self, keys: Iterable[str]) -> dict[str, Found]:
        """The rows of those of ``keys`` that have one, unjudged: ``(expires, crc, data,
        created)``.

        One query per ``SELECT_CHUNK`` keys (a run's gate asks for every node it
        keyed in one scheduler step at once: a query costs 4 us, a key in it 0.4 us).
        Rows of this process's batch not yet committed are found too.
        """
        # Alone since the directory was empty: a key never locked nor written here
        # has no entry (``_Shared.fresh``); a stale set (this process no longer
        # alone) only makes a miss, which its lock's second look settles.
        fresh = self._shared.fresh
        if fresh is not None:  # a key batched or being written is in ``fresh`` too
            keys = [key for key in keys if key in fresh]
        batched, ask = self._batched(keys)
        found: dict[str, Found] = {}
        for key, row in batched.items():
            crc = row[5] if row[5] is not None else _crc(key, row[6] or b"")
            found[key] = (row[3], crc, row[6], row[2])
        for key, expires, crc, data, created in self._query(_select, ask):
            found[key] = (expires, crc, data, created)
        return found

    def _batched(self, keys: Iterable[str]) -> tuple[dict[str, Row], list[str]]:
        """The rows of ``keys`` batched here and not committed yet, and the other keys
        (for SQLite)."""
        shared = self._shared
        # In this order: commit() makes a batch ``writing`` before it replaces
        # ``pending``, and empties ``writing`` only once the batch is committed.
        pending = shared.pending
        writing = shared.writing
        batched: dict[str, Row] = {}
        ask: list[str] = []
        for key in keys:
            row = pending.get(key) if pending else None
            if row is None and writing:
                row = writing.get(key)
            if row is None:
                ask.append(key)
            else:
                batched[key] = row
        return batched, ask

    def _query(self, query: Callable[[int], str], keys: list[str]) -> list[Any]:
        """The rows ``query(n)`` selects for ``keys``, ``SELECT_CHUNK`` keys a query; none
        from a damaged database (reported once: ``_Shared.damaged``)."""
        import sqlite3

        shared = self._shared
        out: list[Any] = []
        try:
            conn = shared.conn()
            for start in range(0, len(keys), SELECT_CHUNK):
                chunk = keys[start : start + SELECT_CHUNK]
                out.extend(conn.execute(query(len(chunk)), chunk))
        except sqlite3.Error as exc:
            shared.damaged(exc)
        return out

    def judge(self, key: str, found: Found | None) -> Any:
        """:meth:`lookup` of a row :meth:`rows` fetched (None: no row): a Payload, or
        None for a miss (a corrupt or unloadable entry is deleted)."""
        if found is None:
            return None
        expires, crc, data, created = found
        if expires is not None and clock() >= expires:
            return None
        shared = self._shared
        if data is None:
            for _ in range(3):
                if crc != _crc(key):
                    return self._corrupt(key, crc, f"{key} in {shared.db}", "checksum mismatch")
                hit = self._lookup_file(key, crc, created)
                if hit is not _REPLACED:
                    return hit
                # The file was replaced between reading and holding it: by an entry
                # whose row says when it was made (its value's stamp), read anew
                again = self.rows((key,)).get(key)
                if again is None or again[2] is not None:
                    return None
                expires, crc, _, created = again
                if expires is not None and clock() >= expires:
                    return None
            return None
        if _crc(key, data) != crc:
            return self._corrupt(key, crc, f"{key} in {shared.db}", "checksum mismatch")
        payload = Payload(data)
        # Load it now: an entry whose pickle names a class or module this code no
        # longer has (renamed, moved) would fail every dependent, run after run.
        try:
            payload.load()
        except Exception as exc:
            self._unloadable(f"{key} in {shared.db}", exc)
            shared.delete(key, crc)
            return None
        return payload

    def _corrupt(self, key: str, crc: int, where: str, why: str) -> None:
        warnings.warn(
            f"graphexec cache entry {where} is corrupt ({why}); it was deleted and the "
            "node will be recomputed",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        self._remove(Path(self._file(key)))
        self._shared.delete(key, crc)

    @staticmethod
    def _unloadable(where: str, exc: BaseException) -> None:
        warnings.warn(
            f"graphexec cache entry {where} cannot be loaded by this code "
            f"({type(exc).__name__}: {exc}); it was deleted and the node will be "
            "recomputed",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    def _lookup_file(self, key: str, crc: int, created: float) -> Any:
        path = self._file(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size >= max(MAP_READ_MIN, 1):  # checked through a mapping: no copy
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                        return self._check_and_load(key, crc, created, path, st, mapped)
                return self._check_and_load(key, crc, created, path, st, f.read())
        except FileNotFoundError:
            self._shared.delete(key, crc)  # pruned, or lost to a power cut: no entry
            return None
        except OSError as exc:
            logger.warning("cache entry %s unreadable (%s): recomputing", path, exc)
            return None

    def _check_and_load(
        self, key: str, crc: int, created: float, path: str, st: os.stat_result, raw: Any
    ) -> Any:
        try:
            header, body_start = _parse(raw)
            if len(raw) != header["size"]:
                raise ValueError(
                    f"{len(raw)} bytes instead of {header['size']}: truncated or overwritten"
                )
            if header.get("key") != key:
                raise ValueError("the file is another entry's")
            view = memoryview(raw)
            try:
                if zlib.crc32(view[body_start:]) != header["crc"]:
                    raise ValueError("checksum mismatch")
            finally:
                view.release()
        except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
            return self._corrupt(key, crc, path, str(exc))
        if header.get("created") != created:
            # A whole entry, but not the row's: a writer put its file in place and has
            # not committed its row yet (a refresh in another process), or was killed
            # in between. Its value is not the one the row stamps, which dependents key
            # on: a miss (the node recomputes; its write replaces both).
            return None
        data_off, data_len = header["data"]
        data = bytes(raw[data_off : data_off + data_len])
        hold = path
        if header["buffers"]:
            hold = self._hold(path, st)
            if hold is None or hold is _REPLACED:
                return hold
        segments = tuple((hold, off, size) for off, size in header["buffers"])
        payload = Payload(data, segments)
        try:
            payload.load()  # buffers are mapped, not read
        except Exception as exc:
            self._unloadable(path, exc)
            self._remove(Path(path))
            self._shared.delete(key, crc)
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

    # writing -----------------------------------------------------------------

    def write_value(self, key: str, value: Any, meta: dict) -> None:
        """Pickle ``value`` (large buffers kept apart, for mapping) and store it."""
        buffers: list[memoryview] = []
        data = dumps_apart(value, buffers.append)
        if buffers or len(data) > INLINE_MAX:
            self.write(key, data, buffers, meta)
        else:
            self.put(key, data, meta)

    def put(self, key: str, data: bytes, meta: dict, release: bool = False) -> None:
        """Store a small entry: ``data`` is the value's pickle (no out-of-band buffers).

        Batched if this process holds the key's compute lock (the lock is released
        once the batch is committed), else committed now. ``release``: the caller
        is done with the key, as :meth:`unlock` after this.
        """
        shared = self._shared
        row: Row
        if key in shared.held:
            # The crc is the flusher's to compute (None until then): this runs on
            # the scheduler's thread, once per entry.
            row = (key, str(meta.get("task", "?")), clock(), meta.get("expires"), len(data),
                   None, data)  # fmt: skip
            if release and key in self._locks:
                shared.enqueue(row, release=True)
                self._locks.discard(key)  # only now: see put_many
                return
            shared.enqueue(row)
        else:
            row = (key, str(meta.get("task", "?")), clock(), meta.get("expires"), len(data),
                   _crc(key, data), data)  # fmt: skip
            shared.write_now(row)
        if release:
            self.unlock(key)

    def put_many(self, entries: list[tuple[str, bytes, dict]]) -> None:
        """:meth:`put` of each ``(key, data, meta)`` with ``release``, the rows batched
        together (one hold of the mutex for all: a scheduler step's finished nodes)."""
        shared = self._shared
        held, locks, now = shared.held, self._locks, clock()
        rows: list[Row] = []
        for key, data, meta in entries:
            if key in held and key in locks:
                rows.append((key, str(meta.get("task", "?")), now, meta.get("expires"),
                             len(data), None, data))  # fmt: skip
            else:  # not this run's lock (an unusual path): as one put
                self.put(key, data, meta, release=True)
        if rows:
            shared.enqueue_many(rows)
            # Only now: interrupted before, unlock_all() still lets go of these keys
            # (after, unlock() finds their rows batched and waits for them).
            locks.difference_update([row[0] for row in rows])

    def write(self, key: str, data: bytes, buffers: list[memoryview], meta: dict) -> None:
        """Write a large entry: its file atomically (temp file, fsync, rename), then its
        row, committed now."""
        path = self.path(key)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        created = clock()
        meta = {"created": created, "key": key, "layout": LAYOUT, **meta}
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
        import tempfile  # (see _create_db)

        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=FILE_SUFFIX)
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
        row = (key, str(meta.get("task", "?")), created, meta.get("expires"), pos, _crc(key),
               None)  # fmt: skip
        shared = self._shared
        with shared.mutex:
            # an older batched row must not replace this one
            release = shared.pending.pop(key, None) is not None and shared._unbatch(key)
        try:
            shared.write_now(row)
        finally:
            if release:
                with shared.mutex:
                    shared._unlock(key)

    def flush(self) -> None:
        """Commit this process's batched rows for this directory now."""
        self._shared.commit()

    # locking -----------------------------------------------------------------

    def try_lock(self, key: str) -> bool:
        """Take the compute lock of ``key`` without waiting; True if now ours."""
        return self.try_lock_many([key])[0]

    def try_lock_many(self, keys: list[str]) -> list[bool]:
        """:meth:`try_lock` of each key, in one pass: which were taken."""
        got = self._shared.try_lock_many(keys)
        self._locks.update([key for key, taken in zip(keys, got) if taken])
        return got

    def unlock(self, key: str) -> None:
        """Let go of ``key``'s lock (once its batched row, if any, is committed)."""
        if key in self._locks:
            self._locks.discard(key)
            self._shared.unlock(key)

    def unlock_all(self) -> None:
        """The run is over: commit its batched rows (on disk when this returns), and
        release every lock it holds."""
        self._shared.commit()
        self._shared.sync(checkpoint=False)
        for key in list(self._locks):
            self.unlock(key)
        self._shared.leave()  # unless another run of this process holds locks

    def quiet_epoch(self) -> int | None:
        """See :meth:`_Shared.quiet_epoch`."""
        return self._shared.quiet_epoch()

    def let_go_since(self, keys: list[str], epoch: int | None) -> list[str]:
        """See :meth:`_Shared.let_go_since`."""
        return self._shared.let_go_since(keys, epoch)

    def holder(self, key: str) -> int | None:
        """The pid of the process computing ``key`` now (this one included), or None;
        -1 where the system cannot say who, or while another process is alone in the
        directory (it may be computing it: asking would make it yield)."""
        return self._shared.holder(key)

    def knocking(self) -> bool:
        """True while a process alone in the directory has not let this one in yet
        (its locks are not known: every miss waits, see :meth:`_Shared._join`)."""
        shared = self._shared
        return shared.mode == _OUT and shared.knocked > 0.0

    def alone_elsewhere(self) -> int | None:
        """The pid of another process alone in the directory, whose compute locks
        are in its memory only (-1 where the system cannot say who), or None."""
        return self._shared._alone_pid()

    # listing and pruning -----------------------------------------------------

    def entries(self) -> list[EntryInfo]:
        """Every entry, with its checksums checked (the files' headers only).

        ``held`` counts the compute locks this process and the processes that lock
        in the file hold, not those of a process alone in the directory (asking for
        them would make it yield and slow it down: :meth:`alone_elsewhere` says if
        there is one)."""
        shared = self._shared
        shared.commit()
        mapped = _mapped_inodes(self.root)
        found = []
        conn = shared.conn()
        for key, task, created, expires, size, crc, in_file in conn.execute(_LIST).fetchall():
            file = self.path(key) if in_file else None
            readable = True
            held_file = False
            if file is None:
                (data,) = conn.execute("SELECT data FROM entries WHERE key = ?", (key,)).fetchone()
                readable = data is not None and _crc(key, data) == crc
            else:
                try:
                    header = _read_header(file)
                    st = file.stat()
                    readable = header.get("key") == key and crc == _crc(key)
                    held_file = (st.st_dev, st.st_ino) in mapped
                except (OSError, ValueError, KeyError, TypeError, struct.error):
                    readable = False
            held = held_file or key in shared.held or shared.file_holder(key) is not None
            found.append(EntryInfo(key, task, created, expires, size, file, readable, held))
        return found

    def remove(self, chosen: Iterable[EntryInfo]) -> tuple[int, int, int]:
        """Delete the chosen entries unless a live run holds them (computes one, or maps
        its file); returns (deleted, bytes freed, kept because held)."""
        shared = self._shared
        chosen = list(chosen)
        if chosen:
            # An alone process yields its locks to this one (within JOIN_WAIT); one
            # that does not keeps every entry (holder() cannot say: -1, held).
            shared.join(JOIN_WAIT)
        mapped = _mapped_inodes(self.root)
        doomed: list[EntryInfo] = []
        kept = 0
        for entry in chosen:
            held = shared.holder(entry.key) is not None
            if not held and entry.file is not None:
                try:
                    st = entry.file.stat()
                    held = (st.st_dev, st.st_ino) in mapped
                except OSError:
                    pass
            if held:
                kept += 1
            else:
                doomed.append(entry)
        deleted = freed = 0
        gone: list[Path] = []
        if doomed:
            conn = shared.conn()
            with shared.committing:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for entry in doomed:
                        # only the version judged: a run may have written a new one since
                        cursor = conn.execute(
                            "DELETE FROM entries WHERE key = ? AND created = ?",
                            (entry.key, entry.created),
                        )
                        if cursor.rowcount:
                            deleted += 1
                            freed += entry.size
                            if entry.file is not None:
                                gone.append(entry.file)
                    conn.execute("COMMIT")
                except BaseException:
                    rollback(conn)
                    raise
        for path in gone:  # after the commit: a row never names a missing file for long
            self._remove(path)
        shared.leave()
        return deleted, freed, kept

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass


def _read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(HEAD)
        (length,) = struct.unpack("<I", head[4:8])
        header, _ = _parse(head + f.read(length))
    return header


def _mapped_inodes(root: Path) -> set[tuple[int, int]]:
    """Files that a live process maps: those its ``.hold-<pid>-<n>.hold`` links name."""
    import psutil

    found = set()
    for hold in root.glob("*/.hold-*"):
        try:
            pid = int(hold.name.split("-")[1])
            st = hold.stat()
        except (IndexError, ValueError, OSError):
            continue
        if psutil.pid_exists(pid):
            found.add((st.st_dev, st.st_ino))
    return found


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


def old_layout_files(root: Path) -> list[Path]:
    """Entries (and lock files) of the layout before this one: never read here.

    Only ``<key[:2]>/<key>.gxc`` and ``<key[:2]>/<key>.lock`` with a key as
    :data:`SAFE_KEY` has it: a directory given by mistake (a project's, with its
    ``yarn.lock`` and ``Cargo.lock``) must not lose a file to a cleanup.
    """
    return [
        p
        for suffix in (OLD_SUFFIX, ".lock")
        for p in root.glob(f"*/*{suffix}")
        if SAFE_KEY.fullmatch(p.stem) and p.parent.name == p.stem[:2]
    ]


def is_cache_dir(root: Path) -> bool:
    """True if ``root`` holds a cache: this version's database, or an older layout's
    entries. What deletes files in a directory asks this first."""
    return (root / DB_NAME).exists() or any(p.suffix == OLD_SUFFIX for p in old_layout_files(root))


def clear_cache(
    cache_dir: str | os.PathLike[str] | None = None, *, expired_only: bool = True
) -> int:
    """Delete cache entries; by default only the expired ones. Returns how many.

    Entries a running computation holds (computes now, or has mapped) stay.
    Entries of an older graphexec's layout (which this version never reads) are
    deleted either way, and counted.

    Args:
        cache_dir: the directory (default ``./.graphexec-cache``).
        expired_only: False deletes every entry.

    Example::

        gx.clear_cache()                       # prune expired entries
        gx.clear_cache("runs/cache", expired_only=False)
    """
    root = Path(cache_dir if cache_dir is not None else DEFAULT_DIR)
    if not root.is_dir() or not is_cache_dir(root):
        return 0  # (not a cache: nothing here is ours to delete)
    chosen: list[EntryInfo] = []
    if (root / DB_NAME).exists():
        now = clock()
        chosen = [e for e in CacheStore(root).entries() if not expired_only or e.expired(now)]
    return prune(root, chosen, old=True)[0]


def prune(root: Path, chosen: list[EntryInfo], *, old: bool) -> tuple[int, int, int]:
    """Delete the ``chosen`` entries of the cache in ``root`` (those a running
    computation holds stay), and the older layout's files if ``old``; then what
    killed writers and runs left behind. Returns (entries deleted, bytes freed,
    entries kept because held). The one pruning of :func:`clear_cache` and of
    ``graphexec cache prune|clear``."""
    import psutil

    deleted = freed = kept = 0
    if old:
        for path in old_layout_files(root):
            try:
                size = path.stat().st_size
                path.unlink()
            except OSError:
                continue
            if path.suffix == OLD_SUFFIX:
                deleted += 1
                freed += size
    if (root / DB_NAME).exists():
        store = CacheStore(root)
        if chosen:
            n, size, kept = store.remove(chosen)
            deleted, freed = deleted + n, freed + size
        _remove_orphans(store)
    # left by a writer (or the database's creator, at the top) that was killed
    for tmp in [*root.glob("*/.tmp-*"), *root.glob(".tmp-*")]:
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
    return deleted, freed, kept


def _remove_orphans(store: CacheStore) -> None:
    """Delete large-entry files without a row: their writer died before committing it
    (only old ones: a writer may be between its rename and its commit right now)."""
    import sqlite3

    conn = store._shared.conn()
    for path in store.root.glob(f"*/[!.]*{FILE_SUFFIX}"):
        key = path.name[: -len(FILE_SUFFIX)]
        try:
            if conn.execute(_SELECT, (key,)).fetchone() is not None:
                continue
            if time.time() - path.stat().st_mtime > STALE_TMP:
                CacheStore._remove(path)
        except (OSError, sqlite3.Error):
            continue
