"""Shared-memory segments that carry large buffers (numpy arrays) between processes.

A worker that returns a large array copies its buffer once into a POSIX
shared-memory segment (``/dev/shm`` on Linux) and sends only the segment's
name through its pipe; whoever needs the value maps the segment instead of
reading megabytes from a pipe.

Mappings are ``MAP_PRIVATE``: reading is zero-copy, and a task that writes to
an input array gets copy-on-write pages instead of corrupting the value seen
by every other consumer.

Names say who made a segment, so leftovers can always be found::

    /gx-<parent pid>-<pool id>-w<worker id>-<n>

Lifetime (the parent decides, the workers only create):

* the parent unlinks a value's segments when the value is released, and at
  the end of a run maps the kept values and unlinks the rest of the pool's
  prefix — ``/dev/shm`` holds nothing of a run after ``compute`` returns;
* when a worker dies mid-copy, the parent unlinks that worker's segments no
  live value refers to;
* when the parent dies, each worker unlinks everything under the parent's
  pid before exiting.

Recycling: a released segment of 1 MiB or more is renamed to a free name,
``/gx-<parent pid>-<pool id>-f<size>-<n>`` (at most ``FREE_MAX`` per pool),
and the next result of exactly that size claims it with an atomic rename.
Rewriting pages tmpfs already holds costs about half of allocating new ones
(3 ms instead of 5.5 ms for 16 MB here), and the parent skips the unlink —
sweeps of parameter grids produce arrays of one size over and over. A segment
is rewritten in place, under every mapping of it (``MAP_PRIVATE`` copies only
the pages its own process writes), so one that anyone may still map is never
recycled: the parent's loaded values (``Payload.discard``), and a worker's
input that the task kept a reference to (a module-level cache) — the worker
adds a hard link to it, ``<name>.pin<pid>``, before it replies (:func:`pin`),
removed when its mapping goes, and :func:`release` unlinks a segment with
more than one link instead of recycling it.

``multiprocessing.shared_memory`` is not used: it registers every segment
with a resource-tracker process, which warns about (and unlinks) segments
that another process created on purpose.
"""

from __future__ import annotations

import mmap
import os
import threading

try:  # POSIX only; without it large buffers simply travel in-band
    import _posixshmem  # type: ignore[import-not-found]  # CPython's, no stubs
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

AVAILABLE = _posixshmem is not None and os.path.isdir("/dev/shm")
SHM_DIR = "/dev/shm"

RECYCLE_MIN = 1 << 20  # smaller segments are cheap to make: not worth a rename
FREE_MAX = 8  # free segments kept per pool

_lock = threading.Lock()
_prefix = f"gx-{os.getpid()}-p"
_free_prefix = ""  # where this process may claim recycled segments ("" = nowhere)
_counter = 0
live: set[str] = set()  # segments referenced by values alive in this (parent) process


def set_prefix(prefix: str, pool: str = "") -> None:
    """Name the segments this process creates from now on (called by each worker);
    ``pool`` is the pool's prefix, under which recycled segments are found."""
    global _prefix, _counter, _free_prefix
    _prefix = prefix
    _free_prefix = f"{pool}f" if pool else ""
    _counter = 0


def worker_prefix(parent_pid: int, pool_id: int, worker_id: int) -> str:
    return f"gx-{parent_pid}-{pool_id}-w{worker_id}-"


def pool_prefix(parent_pid: int, pool_id: int) -> str:
    return f"gx-{parent_pid}-{pool_id}-"


def create(data: memoryview) -> str:
    """Copy ``data`` (a flat byte view, as ``PickleBuffer.raw()`` gives) into a new segment."""
    global _counter
    with _lock:
        _counter += 1
        name = f"{_prefix}{_counter}"
    if _free_prefix and data.nbytes >= RECYCLE_MIN and _claim(data, name):
        return name
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        # write() into tmpfs is about twice as fast as faulting in a fresh
        # shared mapping page by page (5 ms vs 11 ms for 16 MB here).
        written = 0
        while written < data.nbytes:
            written += os.write(fd, data[written:])
    except BaseException:
        unlink([name])
        raise
    finally:
        os.close(fd)
    return name


def _claim(data: memoryview, name: str) -> bool:
    """Take a recycled segment of exactly this size, rename it ``name``, fill it."""
    wanted = f"{_free_prefix}{data.nbytes}-"
    try:
        candidates = [n for n in os.listdir(SHM_DIR) if n.startswith(wanted)]
    except OSError:
        return False
    for free in candidates:
        try:
            os.rename(f"{SHM_DIR}/{free}", f"{SHM_DIR}/{name}")  # atomic: one claimant wins
        except OSError:
            continue
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        except OSError:
            return False
        try:
            written = 0
            while written < data.nbytes:
                written += os.pwrite(fd, data[written:], written)
        except BaseException:
            unlink([name])
            raise
        finally:
            os.close(fd)
        return True
    return False


def release(segments: list[tuple[str, int]]) -> None:
    """The parent no longer needs these segments: recycle the large ones, unlink the rest."""
    free_count: dict[str, int] = {}
    for name, size in segments:
        live.discard(name)
        pool = name[: name.rfind("-w") + 1] if "-w" in name else ""
        if not pool or size < RECYCLE_MIN:
            unlink([name])
            continue
        if pool not in free_count:
            try:
                free_count[pool] = sum(n.startswith(f"{pool}f") for n in os.listdir(SHM_DIR))
            except OSError:
                free_count[pool] = FREE_MAX
        if free_count[pool] >= FREE_MAX:
            unlink([name])
            continue
        try:
            if os.stat(f"{SHM_DIR}/{name}").st_nlink > 1:  # pinned: a worker maps it
                unlink([name])
                continue
        except OSError:
            unlink([name])
            continue
        global _counter
        with _lock:
            _counter += 1
            free = f"{pool}f{size}-{os.getpid()}x{_counter}"
        try:
            os.rename(f"{SHM_DIR}/{name}", f"{SHM_DIR}/{free}")
            free_count[pool] += 1
        except OSError:
            unlink([name])


def attach(name: str, size: int) -> memoryview:
    """Map a segment copy-on-write; the mapping lives as long as the returned view."""
    fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    try:
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return memoryview(mapping)


_pins: dict[str, int] = {}  # segment -> this process's mappings of it still pinned


def pin(name: str) -> bool:
    """A worker still maps segment ``name`` after its call: a second link to it (one per
    process, counted per mapping), so that :func:`release` does not recycle it. Call
    :func:`unpin` once that mapping goes; False if the segment is gone."""
    with _lock:
        count = _pins.get(name, 0)
        if not count:
            path = f"{SHM_DIR}/{name}"
            try:
                os.link(path, f"{path}.pin{os.getpid()}")
            except FileExistsError:
                pass
            except OSError:
                return False
        _pins[name] = count + 1
    return True


def unpin(name: str) -> None:
    """A mapping :func:`pin` counted is gone: the link goes with the last one (a sweep
    may have removed it already)."""
    with _lock:
        count = _pins.get(name, 0) - 1
        if count > 0:
            _pins[name] = count
            return
        _pins.pop(name, None)
    try:
        os.unlink(f"{SHM_DIR}/{name}.pin{os.getpid()}")
    except OSError:
        pass


def unlink(names: list[str] | tuple[str, ...]) -> None:
    """Remove segments by name; already-missing ones are fine."""
    for name in names:
        live.discard(name)
        try:
            _posixshmem.shm_unlink("/" + name)
        except FileNotFoundError:
            pass


def room() -> tuple[int, int] | None:
    """``/dev/shm``'s free and total bytes, or None where there is none to read."""
    if not AVAILABLE:
        return None
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def drop_free() -> int:
    """Unlink the recycled segments this process's pool keeps free (for a value that
    found no room: ``/dev/shm`` full); return the count. Safe at any time: a free
    segment is mapped by nobody, and one another worker claims meanwhile (an
    atomic rename) is simply no longer there to unlink."""
    if not (AVAILABLE and _free_prefix):
        return 0
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(_free_prefix)]
    except OSError:
        return 0
    unlink(names)
    return len(names)


def sweep(prefix: str) -> int:
    """Unlink every segment under ``prefix`` that no live value uses; return the count."""
    if not AVAILABLE:
        return 0
    try:
        # (a pin, "<segment>.pin<pid>", of a value alive here stays: another worker maps
        # it, and the segment must not be recycled under that mapping)
        names = [
            n
            for n in os.listdir(SHM_DIR)
            if n.startswith(prefix) and n not in live and n.partition(".pin")[0] not in live
        ]
    except OSError:
        return 0
    unlink(names)
    return len(names)
