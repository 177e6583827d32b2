"""Options of a run, validated in one place for every door that takes them.

``Graph.compute()``, ``@gx.flow(...)`` and ``gx.Pool(...)`` accept overlapping
sets of keywords; each builds a :class:`ComputeOptions` with
:meth:`ComputeOptions.validate`, so a value is refused with the same message
wherever it is given, and nothing downstream checks again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._executors.machine import usable_cores
from .._model.options import check_inner_threads
from .._model.sizes import parse_size
from .hooks import NO_HOOKS, Observer, RunHooks, check_observers, check_run_hooks

SCHEDULERS = ("processes", "threads", "sync")


@dataclass(frozen=True)
class ComputeOptions:
    """Validated options of one compute or flow (see ``Graph.compute`` for each).

    ``workers`` is the resolved count (the usable cores by default, the
    pool's size with ``pool=``); ``scheduler`` is ``"sync"`` when it is 0;
    ``memory_limit`` is in bytes; ``observers`` a tuple of :class:`Observer`;
    ``hooks`` the run-level hooks.
    """

    workers: int
    scheduler: str = "processes"
    fail_fast: bool = False
    raise_on_failure: bool = True
    keep: str = "targets"
    pool: Any = None
    memory_limit: int | None = None
    limits: dict[str, int] = field(default_factory=dict)
    start_method: str | None = None
    cache_dir: Any = None
    refresh_cache: bool = False
    cluster: Any = None
    progress: bool | None = None
    observers: tuple[Observer, ...] = ()
    hooks: RunHooks = NO_HOOKS
    max_calls_per_worker: int | None = None
    inner_threads: int | None = None
    run_dir: Any = None
    keep_inputs: int | None = None

    @classmethod
    def validate(
        cls,
        where: str,
        *,
        workers: int | None = None,
        scheduler: str = "processes",
        fail_fast: bool = False,
        raise_on_failure: bool = True,
        keep: str = "targets",
        pool: Any = None,
        memory_limit: int | str | None = None,
        limits: dict[str, int] | None = None,
        start_method: str | None = None,
        cache_dir: Any = None,
        refresh_cache: bool = False,
        cluster: Any = None,
        progress: bool | None = None,
        observers: Any = None,
        on_completion: Any = None,
        on_failure: Any = None,
        on_cancellation: Any = None,
        on_crashed: Any = None,
        max_calls_per_worker: int | None = None,
        inner_threads: int | None = None,
        run_dir: Any = None,
        keep_inputs: int | str | None = None,
    ) -> ComputeOptions:
        """Check every option and resolve defaults.

        Raises:
            TypeError, ValueError: a value of the wrong type, out of range, or a
                combination that cannot work, with what to do instead.
        """
        if scheduler not in SCHEDULERS:
            raise ValueError(
                f"{where}: scheduler={scheduler!r} is not one of {', '.join(map(repr, SCHEDULERS))}"
            )
        if keep not in ("targets", "all"):
            raise ValueError(f"{where}: keep={keep!r} must be 'targets' or 'all'")
        if cluster is not None:
            check_cluster(
                cluster,
                workers=workers,
                scheduler=scheduler,
                pool=pool,
                memory_limit=memory_limit,
                start_method=start_method,
            )
        limit_bytes = parse_memory(memory_limit)
        max_calls = check_max_calls(max_calls_per_worker, where)
        if max_calls is not None and (pool is not None or cluster is not None):
            raise ValueError(
                f"{where}: max_calls_per_worker= belongs to the workers: with pool=, give it "
                "to gx.Pool(max_calls_per_worker=...); a dask cluster recycles its own "
                "workers (dask's worker lifetime settings)"
            )
        threads = check_inner_threads(inner_threads, "inner_threads", where)
        if threads is not None and (pool is not None or cluster is not None):
            raise ValueError(
                f"{where}: inner_threads= belongs to the workers: with pool=, give it to "
                "gx.Pool(inner_threads=...), or to a task (@gx.task(inner_threads=...)); a "
                "dask cluster's workers have their own settings (OMP_NUM_THREADS and the "
                "like in their environment)"
            )
        if pool is not None:
            if not hasattr(pool, "_lease"):
                raise TypeError(f"pool= must be a gx.Pool, got {type(pool).__name__}")
            if scheduler != "processes" or workers not in (None, pool.workers):
                raise ValueError(
                    "pool= sets the workers itself; do not combine it with "
                    "workers= or another scheduler"
                )
            if start_method is not None:
                raise ValueError(
                    f"{where}: start_method= belongs to the workers: with pool=, give it to "
                    "gx.Pool(start_method=...)"
                )
            count = pool.workers
        else:
            count = check_workers(workers, where)
        if count == 0:
            scheduler = "sync"
        if limit_bytes is not None and scheduler != "processes":
            raise ValueError(
                f"{where}: memory_limit= needs worker processes to measure and kill; "
                f"scheduler={scheduler!r} runs in this process"
            )
        if threads is not None and scheduler != "processes":
            raise ValueError(
                f"{where}: inner_threads= limits the libraries inside worker processes; "
                f"scheduler={scheduler!r} runs in this process (a task option "
                "@gx.task(inner_threads=...) limits a task's calls there)"
            )
        if max_calls is not None and scheduler != "processes":
            raise ValueError(
                f"{where}: max_calls_per_worker= recycles worker processes; "
                f"scheduler={scheduler!r} runs in this process"
            )
        for key, flag in (("fail_fast", fail_fast), ("raise_on_failure", raise_on_failure)):
            # (bool("no") is True: a switch takes True or False, 1 or 0, numpy's bools)
            if isinstance(flag, str) or flag not in (True, False):
                raise TypeError(f"{where}: {key}= must be True or False, got {flag!r}")
        return cls(
            workers=count,
            scheduler=scheduler,
            fail_fast=bool(fail_fast),
            raise_on_failure=bool(raise_on_failure),
            keep=keep,
            pool=pool,
            memory_limit=limit_bytes,
            limits=check_limits(limits),
            start_method=start_method,
            cache_dir=cache_dir,
            refresh_cache=bool(refresh_cache),
            cluster=cluster,
            progress=progress,
            observers=check_observers(observers, where),
            hooks=RunHooks(
                check_run_hooks(on_completion, "on_completion", where),
                check_run_hooks(on_failure, "on_failure", where),
                check_run_hooks(on_cancellation, "on_cancellation", where),
                check_run_hooks(on_crashed, "on_crashed", where),
            ),
            max_calls_per_worker=max_calls,
            inner_threads=threads,
            run_dir=check_run_dir(run_dir, where),
            keep_inputs=check_keep_inputs(keep_inputs, where),
        )


def check_workers(workers: Any, where: str) -> int:
    if workers is None:
        return usable_cores()  # (the affinity mask and the cgroup's CPU quota)
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"{where}: workers= must be an int, got {workers!r}")
    if workers < 0:
        raise ValueError(
            f"{where}: workers={workers} is negative; use a positive count"
            + ("" if where == "Pool" else ", or 0 to run in-process")
        )
    return workers


def check_run_dir(value: Any, where: str) -> Path | None:
    """``run_dir=``: None, or the directory the run's record is written to as it goes."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{where}: run_dir= must be a path, got {type(value).__name__}")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{where}: run_dir={str(path)!r} exists and is not a directory")
    return path


def check_keep_inputs(value: Any, where: str) -> int | None:
    """``keep_inputs=``: bytes of failed nodes' inputs a run keeps (None: the default)."""
    if value is None:
        return None
    size = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value if value >= 0 else None
    elif isinstance(value, str):
        size = parse_size(value)
    if size is None:
        raise ValueError(
            f"{where}: keep_inputs={value!r} must be bytes (an int >= 0) or a size such as "
            "'200MB' (0 keeps none)"
        )
    return size


def check_max_calls(value: Any, where: str) -> int | None:
    """``max_calls_per_worker=``: None, or the calls a worker runs before it is replaced."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{where}: max_calls_per_worker={value!r} must be an int >= 1 (calls a worker "
            "runs before it is replaced), or None to keep workers for good"
        )
    return value


def parse_memory(limit: int | str | None) -> int | None:
    """Bytes from ``4GB``, ``512 MiB``, ``1.5e9`` or an int; None stays None."""
    if limit is None:
        return None
    if isinstance(limit, bool):
        raise TypeError("memory_limit= must be bytes (int) or a string such as '4GB'")
    if isinstance(limit, (int, float)):
        if not 1 <= limit < float("inf"):  # (also NaN; 0.5 would be a limit of 0 bytes)
            raise ValueError(f"memory_limit={limit!r} must be positive: a number of bytes >= 1")
        return int(limit)
    if not isinstance(limit, str):
        raise TypeError("memory_limit= must be bytes (int) or a string such as '4GB'")
    value = parse_size(limit)
    if value is not None and value > 0:
        return value
    raise ValueError(
        f"memory_limit={limit!r} is not a size; write it as bytes or like '4GB', '512MiB'"
    )


def check_limits(limits: Any) -> dict[str, int]:
    if limits is None:
        return {}
    if not isinstance(limits, dict):
        raise TypeError("limits= must be a dict of tag -> max concurrent runs")
    for tag, cap in limits.items():
        if not isinstance(tag, str) or isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"limits={{{tag!r}: {cap!r}}}: use a tag string and an int >= 1")
    return dict(limits)


def check_cluster(
    cluster: Any, *, workers: Any, scheduler: str, pool: Any, memory_limit: Any, start_method: Any
) -> None:
    """Validate ``compute(cluster=...)`` and the arguments that cannot go with it."""
    try:
        from distributed import Client
    except ImportError:
        raise TypeError(
            "cluster= takes a distributed.Client, and dask.distributed is not installed: "
            "pip install 'graphexec[distributed]'"
        ) from None
    if not isinstance(cluster, Client):
        hint = ""
        if hasattr(cluster, "scheduler_address"):  # a LocalCluster, SLURMCluster, ...
            hint = "; connect a Client to it first: cluster=distributed.Client(cluster)"
        raise TypeError(
            f"cluster= must be a distributed.Client, got {type(cluster).__name__}{hint}"
        )
    if cluster.asynchronous:
        raise ValueError("cluster= needs a synchronous Client (asynchronous=False)")
    if cluster.status != "running":
        raise ValueError(
            f"the Client given as cluster= is not connected (status {cluster.status!r}); "
            "connect it to the dask scheduler first"
        )
    if pool is not None:
        raise ValueError("cluster= and pool= both say where tasks run; give one of them")
    if workers is not None:
        raise ValueError(
            "workers= sets local worker processes; with cluster= the dask cluster's "
            "workers run the tasks (scale the cluster instead)"
        )
    if scheduler != "processes":
        raise ValueError(
            f"scheduler={scheduler!r} runs tasks in this process; it cannot be combined "
            "with cluster="
        )
    if start_method is not None:
        raise ValueError("start_method= is for local worker processes; not with cluster=")
    if memory_limit is not None:
        raise ValueError(
            "memory_limit= is enforced by graphexec's local worker processes. On a dask "
            "cluster each worker has its own memory limit (`dask worker --memory-limit 4GB`, "
            "LocalCluster(memory_limit=...)): its nanny restarts a worker that goes over it, "
            "and the node that was running fails with WorkerCrashed"
        )
