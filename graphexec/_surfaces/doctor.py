"""``graphexec doctor``: what graphexec will use on this machine, and what to fix first.

An overnight run on a cluster node or in a container meets limits a laptop does
not have: a job's share of a node's cores, a container's 64 MB ``/dev/shm``, a
memory limit that ``free`` does not show, a cache directory on NFS that other
nodes share. Each is handled when it happens (the pool is sized by the usable
cores, a value finding ``/dev/shm`` full goes through the pipe, a shared
network cache warns), but it is better known before the run: this prints each
fact on a line, then a ``!`` line for each that deserves a change, with what to
do. It starts no worker and writes nothing.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .._data import cache as cache_store
from .._data import shm
from .._executors import machine, threadlimits
from .._model.sizes import size_text
from .._version import __version__

# Below this, /dev/shm cannot carry a few large arrays at once (Docker's default
# is 64 MB): worth a line of advice.
SHM_ADVISED = 1 << 30

# The optional packages whose presence changes what graphexec does.
OPTIONAL = ("numpy", "threadpoolctl", "distributed", "ipywidgets", "graphviz", "tqdm")


@dataclass
class Checkup:
    """The facts (name, value) and the advice (one sentence each) of a checkup."""

    facts: list[tuple[str, str]] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    def text(self) -> str:
        width = max(len(name) for name, _ in self.facts)
        lines = [f"graphexec {__version__}, Python {platform.python_version()} on "
                 f"{platform.system()} {platform.machine()}", ""]  # fmt: skip
        lines += [f"  {name:<{width}}  {value}" for name, value in self.facts]
        if self.advice:
            lines.append("")
            lines += [f"! {line}" for line in self.advice]
        else:
            lines += ["", "nothing to change"]
        return "\n".join(lines)


def checkup(cache_dir: Path) -> Checkup:
    """Look at this machine as graphexec's defaults will use it."""
    found = Checkup()
    _cores(found)
    _memory(found)
    _shared_memory(found)
    _cache(found, cache_dir)
    dot = shutil.which("dot")
    found.facts.append(
        ("Graphviz dot", dot or "not found: graph.visualize() shows nodes, draws no picture")
    )
    found.facts.append(("optional packages", ", ".join(_versions())))
    return found


def _cores(found: Checkup) -> None:
    affinity = machine.cpu_affinity()
    quota = machine.cgroup_cpu_quota()
    cores = machine.usable_cores()
    limits = [f"machine {os.cpu_count()}"]
    if affinity is not None:
        limits.append(f"CPU affinity {affinity}")
    limits.append(f"cgroup CPU quota {quota:g}" if quota is not None else "no cgroup CPU quota")
    found.facts.append(("workers by default", f"{cores} ({', '.join(limits)})"))
    threads = threadlimits.worker_environment(None, cores)  # what each worker starts with
    counts = sorted({int(v) for v in threads.values() if v.isdigit()})
    yours = {k: v for k, v in threads.items() if k in os.environ}
    shown = f"{counts[0]} to {counts[-1]}" if len(counts) > 1 else "".join(map(str, counts))
    text = (
        f"{shown or 'as your environment says'} (BLAS and OpenMP in each worker: "
        "cores // workers; inner_threads= changes it)"
    )
    if yours:
        text += "; from your environment: " + ", ".join(f"{k}={v}" for k, v in yours.items())
    found.facts.append(("threads per worker", text))
    if counts and counts[-1] > 1 and yours:  # (workers x threads > cores)
        found.advice.append(
            f"your environment gives each worker {counts[-1]} threads "
            f"({', '.join(f'{k}={v}' for k, v in yours.items())}): {cores} workers would "
            f"run up to {counts[-1] * cores} threads on {cores} cores. Unset it, or give "
            "inner_threads= (it wins over the environment)"
        )
    if quota is not None and affinity is not None and math.ceil(quota) < affinity:
        found.advice.append(
            f"the cgroup's CPU quota ({quota:g} CPUs) is below the {affinity} cores this "
            f"process may run on: {cores} workers by default, as the quota allows"
        )


def _memory(found: Checkup) -> None:
    import psutil

    memory = psutil.virtual_memory()
    total = size_text(memory.total, binary=True)
    text = f"{size_text(memory.available, binary=True)} available of {total}"
    limit = machine.cgroup_memory_limit()
    if limit is not None and limit < memory.total:
        text = f"this cgroup may use {size_text(limit, binary=True)} (the machine: {text})"
        found.advice.append(
            f"this process's cgroup may use {size_text(limit, binary=True)} of the machine's "
            f"{total}: when its tasks together pass it, the "
            "kernel kills a worker (its node fails, the run goes on); memory_limit= per "
            "worker stops a hungry task first, with a clear message"
        )
    found.facts.append(("memory", text))


def _shared_memory(found: Checkup) -> None:
    space = shm.room()
    if space is None:
        found.facts.append(("/dev/shm", "none: large values travel through pipes"))
        found.advice.append(
            "there is no /dev/shm: values with large arrays travel through pipes, more "
            "slowly. In a container, mount one (docker run --shm-size=4g)"
        )
        return
    free, total = space
    found.facts.append(
        (
            "/dev/shm",
            f"{size_text(free, binary=True)} free of {size_text(total, binary=True)} "
            "(large arrays between processes)",
        )
    )
    if total < SHM_ADVISED:
        found.advice.append(
            f"/dev/shm holds {size_text(total, binary=True)}: values with larger arrays "
            "travel through pipes, more slowly. In a container, give it room (docker run "
            "--shm-size=4g; Kubernetes: an emptyDir with medium: Memory at /dev/shm)"
        )


def _cache(found: Checkup, cache_dir: Path) -> None:
    where = Path(os.path.abspath(cache_dir))
    probe, problem = where, None
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent  # (not made yet: where it would be made)
        if not probe.is_dir():
            problem = f"{probe} is not a directory"
        elif not os.access(probe, os.W_OK | os.X_OK):
            problem = f"{probe} is not writable by this user"
    except OSError as exc:  # (a parent this user may not enter)
        problem = f"{probe} cannot be looked at ({exc.strerror})"
    kind = cache_store.network_filesystem(probe)
    state = "exists" if probe == where and problem is None else "not made yet"
    found.facts.append(
        (
            "cache directory",
            f"{where} ({state if problem is None else problem}; "
            f"{kind + ', a network filesystem' if kind else 'local'})",
        )
    )
    if kind:
        found.advice.append(
            f"the cache directory is on {kind}: share it only between processes of one "
            "machine (SQLite's WAL); for a job on several nodes, give each node its own "
            "cache_dir= (a local disk, $TMPDIR)"
        )
    if problem is not None:
        found.advice.append(
            f"{problem}: a cached compute would run without its cache; give "
            "compute(cache_dir=...) a directory this user can make and write"
        )


def _versions() -> list[str]:
    found = []
    for name in OPTIONAL:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return found


def main(cache_dir: Path) -> None:
    """Print the checkup (the ``graphexec doctor`` command)."""
    sys.stdout.write(checkup(cache_dir).text() + "\n")
