"""What this machine lets this process use: cores and memory, as a batch system or a
container limits them.

``os.cpu_count()`` and ``psutil.virtual_memory()`` describe the whole machine. A
SLURM job gets a cpuset of a node's cores (the process's CPU affinity), and a
container or a job's cgroup a CPU quota (``docker run --cpus``, a Kubernetes
limit) and a memory limit (``--memory``): what graphexec sizes its pool by, and
what ``graphexec doctor`` reports. cgroup v1 and v2 are both read, the smallest
limit along the process's path in the hierarchy (a parent's limit applies to
its children). loky's ``cpu_count`` and dask's ``CPU_COUNT`` read the same.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# cgroup v1 mounts the controllers at these names, alone or together.
_V1_MOUNTS = {
    "cpu": ("cpu", "cpu,cpuacct", "cpuacct,cpu"),
    "memory": ("memory",),
}
NO_LIMIT = 2**60  # (v1 writes "no limit" as a page-rounded 2**63 - 1)

# Seconds a cgroup limit read is used again: every compute asks (a quarter of a
# millisecond of file reads each time), and a limit can change under a running
# process (Kubernetes resizing a pod in place, systemctl set-property).
FRESH_FOR = 5.0


def _fresh_for(seconds: float) -> Callable[[F], F]:
    """Keep a function's result per arguments for ``seconds``."""

    def wrap(fn: F) -> F:
        kept: dict[tuple[Any, ...], tuple[float, Any]] = {}

        @functools.wraps(fn)
        def read(*args: Any) -> Any:
            now = time.monotonic()
            hit = kept.get(args)
            if hit is not None and now - hit[0] < seconds:
                return hit[1]
            value = fn(*args)
            kept[args] = (now, value)
            return value

        read.cache_clear = kept.clear  # type: ignore[attr-defined]
        return read  # type: ignore[return-value]

    return wrap


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity where the OS tells it (a
    SLURM job's cpuset, ``taskset``), less if its cgroup's CPU quota is smaller
    (``docker run --cpus``, a Kubernetes CPU limit), rounded up; at least 1.

    The default number of workers, and of threads per worker. ``os.cpu_count()``
    counts the whole machine: a job given 4 of a node's 64 cores started 64
    workers on them. (loky's ``cpu_count`` and dask's ``CPU_COUNT`` read the
    same two limits.)
    """
    cores = cpu_affinity() or os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(math.ceil(quota), 1))
    return cores


def cpu_affinity() -> int | None:
    """How many cores this process may run on (its affinity mask), or None where the
    OS does not say (not Linux)."""
    try:
        return len(os.sched_getaffinity(0)) or None
    except AttributeError:
        return None


@_fresh_for(FRESH_FOR)
def cgroup_cpu_quota(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs this process's cgroup may use (``quota / period``, the smallest along
    its path to the root), or None if none is set or it cannot be read. Read again
    after ``FRESH_FOR`` seconds.

    cgroup v2: ``cpu.max`` (``"max 100000"`` or ``"200000 100000"``) in the
    unified hierarchy (``root``, or ``root/unified`` on a hybrid system); v1:
    ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us`` under the ``cpu``
    controller's mount. The paths come from ``proc`` (``/proc/self/cgroup``).
    """
    return _smallest(proc, root, "cpu", _v2_quota, _v1_quota)


def _smallest(
    proc: str,
    root: str,
    controller: str,
    v2: Callable[[str], float | None],
    v1: Callable[[str], float | None],
) -> float | None:
    """The smallest limit ``v2`` (in the unified hierarchy) or ``v1`` (under the
    ``controller``'s mount) reads along this process's paths in ``proc``."""
    try:
        with open(proc) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue  # (not a cgroup line: nothing to read from it)
        _, controllers, path = fields
        if controllers == "":  # v2
            for base in (root, os.path.join(root, "unified")):
                found += _levels(base, path, v2)
        elif controller in controllers.split(","):  # v1
            for mount in _V1_MOUNTS[controller]:
                found += _levels(os.path.join(root, mount), path, v1)
    return min(found) if found else None


def _levels(base: str, path: str, read: Callable[[str], float | None]) -> list[float]:
    """The quotas ``read`` finds from ``base + path`` up to ``base`` (a parent's limit
    applies to its children). Inside a container ``path`` is often ``/``, and the
    files at ``base`` are the container's own."""
    quotas = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        quota = read(os.path.join(base, *parts[:depth]))
        if quota is not None:
            quotas.append(quota)
    return quotas


def _v2_quota(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
    except (OSError, ValueError):
        return None


def _v1_quota(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(directory, "cpu.cfs_period_us")) as f:
            period = int(f.read())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


@_fresh_for(FRESH_FOR)
def cgroup_memory_limit(
    proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> int | None:
    """The bytes this process's cgroup may use (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), the smallest along its path, or None if none is set
    or it cannot be read. Read again after ``FRESH_FOR`` seconds."""
    found = _smallest(proc, root, "memory", _v2_memory, _v1_memory)
    return None if found is None else int(found)


def _v2_memory(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "memory.max")) as f:
            text = f.read().strip()
        return None if text == "max" else float(int(text))
    except (OSError, ValueError):
        return None


def _v1_memory(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "memory.limit_in_bytes")) as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    return float(limit) if 0 < limit < NO_LIMIT else None
