"""One tool's start-up, in the interpreter that runs this file: import, first result, close.

``python -m benchmarks.fresh_start TOOL`` imports the tool, gets the result of
one call of a function returning 1 on 2 worker processes, shuts the tool's
workers down, and prints one JSON line: the seconds of each phase, measured
here with ``time.perf_counter``. ``benchmarks/test_startup_fresh.py`` runs it
in a new interpreter per round (and times the whole process from outside,
interpreter start and exit included): a script, a notebook kernel or a CLI
call pays this on every run.

The phases:

* ``import``: the tool's import statement (the interpreter's own start is not
  in it; the whole-process time has it);
* ``first``: from after the import until the first result is in hand: the
  pool or cluster made, its workers started, the call sent and answered;
* ``close``: shutting the workers down. ``graph.compute(workers=2)`` closes
  its own pool before returning, so for ``graphexec`` that is inside
  ``first`` and ``close`` is 0; ``graphexec-pool`` makes a ``gx.Pool`` and
  closes it apart, for the split.

Tools: ``graphexec`` (``graph.compute(workers=2)`` of a 1-node graph; on
Linux its workers fork from the zygote, a fork of this process),
``graphexec-pool`` (the same on a ``gx.Pool(workers=2)``),
``graphexec-forkserver`` (``graph.compute(workers=2,
start_method="forkserver")``: the opt-out, workers forked from a fresh
interpreter), ``graphexec-numpy`` (as ``graphexec``, numpy imported first,
untimed: OpenBLAS's threads run when the pool starts), ``ppe``
(``concurrent.futures.ProcessPoolExecutor(2)``, fork on Linux before Python
3.14), ``loky`` (``loky.ProcessPoolExecutor(2)``, joblib's backend), ``dask``
(``dask.compute(..., scheduler="processes", num_workers=2)``: dask's local
processes scheduler makes a pool per compute) and ``ray``
(``ray.init(num_cpus=2)``, a remote function, ``ray.get``, ``ray.shutdown``).
A tool that is not installed prints ``{"missing": "..."}``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Callable

clock = time.perf_counter


def one() -> int:
    return 1


def graphexec_compute(**options: str) -> tuple[float, float, float]:
    t0 = clock()
    import graphexec as gx

    t1 = clock()
    graph = gx.Graph()
    with graph:
        node = gx.task(one)()
    run = graph.compute(workers=2, **options)  # closes its own pool before returning
    assert run[node] == 1
    t2 = clock()
    return t1 - t0, t2 - t1, 0.0


def graphexec_forkserver() -> tuple[float, float, float]:
    # The opt-out of the zygote: workers fork from a fresh interpreter.
    return graphexec_compute(start_method="forkserver")


def graphexec_numpy() -> tuple[float, float, float]:
    # A scientific script: numpy (and its OpenBLAS thread pool) loaded first.
    import numpy  # noqa: F401  (untimed: the script's own import)

    return graphexec_compute()


def graphexec_pool() -> tuple[float, float, float]:
    t0 = clock()
    import graphexec as gx

    t1 = clock()
    pool = gx.Pool(workers=2)
    graph = gx.Graph()
    with graph:
        node = gx.task(one)()
    run = graph.compute(pool=pool)
    assert run[node] == 1
    t2 = clock()
    pool.close()
    return t1 - t0, t2 - t1, clock() - t2


def ppe() -> tuple[float, float, float]:
    t0 = clock()
    from concurrent.futures import ProcessPoolExecutor

    t1 = clock()
    ex = ProcessPoolExecutor(max_workers=2)
    assert ex.submit(one).result() == 1
    t2 = clock()
    ex.shutdown(wait=True)
    return t1 - t0, t2 - t1, clock() - t2


def loky() -> tuple[float, float, float]:
    t0 = clock()
    import loky

    t1 = clock()
    ex = loky.ProcessPoolExecutor(max_workers=2)
    assert ex.submit(one).result() == 1
    t2 = clock()
    ex.shutdown(wait=True)
    return t1 - t0, t2 - t1, clock() - t2


def dask() -> tuple[float, float, float]:
    t0 = clock()
    import dask

    t1 = clock()
    # The processes scheduler starts a pool for each compute and closes it after.
    (value,) = dask.compute(dask.delayed(one)(), scheduler="processes", num_workers=2)
    assert value == 1
    return t1 - t0, clock() - t1, 0.0


def ray() -> tuple[float, float, float]:
    t0 = clock()
    import ray

    t1 = clock()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    assert ray.get(ray.remote(one).remote()) == 1
    t2 = clock()
    ray.shutdown()
    return t1 - t0, t2 - t1, clock() - t2


TOOLS: dict[str, Callable[[], tuple[float, float, float]]] = {
    "graphexec": graphexec_compute,
    "graphexec-pool": graphexec_pool,
    "graphexec-forkserver": graphexec_forkserver,
    "graphexec-numpy": graphexec_numpy,
    "ppe": ppe,
    "loky": loky,
    "dask": dask,
    "ray": ray,
}
# The module each tool imports: if it cannot be found, the tool is not installed.
MODULES = {
    "graphexec-pool": "graphexec",
    "graphexec-forkserver": "graphexec",
    "graphexec-numpy": "numpy",
    "ppe": "concurrent.futures",
}


def main(tool: str) -> None:
    module = MODULES.get(tool, tool)
    if importlib.util.find_spec(module) is None:
        print(json.dumps({"missing": f"{module} is not installed"}))
        return
    phases = TOOLS[tool]()
    print(json.dumps(dict(zip(("import", "first", "close"), phases))))


if __name__ == "__main__":
    main(sys.argv[1])
