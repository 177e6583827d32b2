"""The workloads W1-W6 of issue #5 and W7 of #14, and one way to run them per tool.

Every workload is described once, tool-neutrally, as a :class:`Spec`: a list of
calls ``(fn, args)`` in dependency order, where an argument may be ``Ref(k)``
(the value of call ``k``) or a list of refs. The runners below turn the same
spec into what each tool's users would write:

=====================  =======================================================
``run_serial``         plain calls in order, in this process
``run_executor``       a ``concurrent.futures`` executor (ProcessPoolExecutor,
                       loky) driven by a small dependency driver: submit every
                       ready call, ``wait(FIRST_COMPLETED)``, at most 64 futures
                       in flight (``wait()`` over thousands of futures is slow)
``dask_delayed``       ``dask.delayed`` objects, for ``dask.compute`` (processes
                       scheduler) and ``client.compute`` (dask.distributed)
``build_graphexec``    task calls inside ``with graph:``
``run_ray``            ``ray.remote`` functions called with the ``ObjectRef``
                       of each input (Ray resolves them), ``ray.get`` on the
                       outputs, on ``ray.init(num_cpus=2)`` (``ray_session``)
``run_joblib``         ``joblib.Parallel(n_jobs=2)`` over independent calls
                       (W7 only: joblib has no dependencies between calls)
=====================  =======================================================

Each runner returns an :class:`Outcome` (values of the outputs, indices of the
calls that failed and of those skipped because an upstream failed), and each
workload has a ``check_*`` function that asserts the outcome is right. Building
the graph is part of the work every runner does, so it is inside every timed
region.

Task functions live at module level so that every worker process can import
them; nothing here is specific to pytest.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any

import graphexec as gx

WORKERS = 2
MAX_INFLIGHT = 64  # futures the executor driver keeps in flight

# Sizes of the issue; the smoke test passes smaller ones.
W1_TASKS = 5_000
W2_LENGTH = 500
W3_TASKS = 40
W3_SECONDS = 0.1
W4_ARRAYS = 32
W4_LENGTH = 2_000_000  # float64: 16 MB
W5_TASKS = 1_000
W5_EVERY = 10
W6_WIDTH = 100
W6_DEPTH = 1_000  # 100,000 nodes
W6_SMALL_DEPTH = 100  # 10,000 nodes
W7_TASKS = 16
W7_SIZE = 1_500  # two 1500 x 1500 float64 matrices per task (18 MB each)


# -- task functions ------------------------------------------------------------


def noop(i: int) -> int:
    return i


def total(values: Sequence[Any]) -> Any:
    return sum(values)


def inc(x: int) -> int:
    return x + 1


def spin(loops: int, seed: int) -> int:
    """Pure-Python CPU work holding the GIL: ``loops`` multiply-add-modulo steps."""
    x = seed
    for i in range(loops):
        x = (x * 31 + i) % 1_000_003
    return x


def make_array(seed: int, length: int = W4_LENGTH) -> Any:
    import numpy as np

    return np.random.default_rng(seed).random(length)


def sort_array(a: Any) -> Any:
    import numpy as np

    return np.sort(a)


def sum_array(a: Any) -> float:
    return float(a.sum())


class Boom(ValueError):
    """What every W5_EVERY-th task of W5 raises."""


def maybe_fail(i: int) -> int:
    if i % W5_EVERY == 0:
        raise Boom(f"task {i} fails on purpose")
    return i


def matmul(seed: int, size: int = W7_SIZE) -> float:
    """W7: multiply two ``size`` x ``size`` float64 matrices made from ``seed``.

    The matrices are made here (about a sixth of the task's single-threaded
    time), so every tool moves only a seed and a float; the product's sum
    checks the result.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.random((size, size))
    b = rng.random((size, size))
    return float((a @ b).sum())


def layer_root(j: int) -> int:
    return 0


def layer_node(a: int, b: int) -> int:
    return max(a, b) + 1


# -- specs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """An argument that stands for the value of call ``index``."""

    index: int


@dataclass
class Spec:
    """A workload: calls in dependency order, and which calls are its outputs."""

    name: str
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def add(self, fn: Callable[..., Any], *args: Any) -> Ref:
        self.calls.append((fn, args))
        return Ref(len(self.calls) - 1)

    def __len__(self) -> int:
        return len(self.calls)


@dataclass
class Outcome:
    """What a runner reports: output values by call index, failed and skipped calls."""

    values: dict[int, Any]
    failed: set[int] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)
    n_calls: int = 0

    @property
    def n_completed(self) -> int:
        return self.n_calls - len(self.failed) - len(self.skipped)


def _deps(args: tuple[Any, ...]) -> list[int]:
    deps: list[int] = []
    for a in args:
        if type(a) is Ref:
            deps.append(a.index)
        elif type(a) is list:
            deps.extend(x.index for x in a if type(x) is Ref)
    return deps


def _resolve(args: tuple[Any, ...], get: Callable[[int], Any]) -> tuple[Any, ...]:
    out = []
    for a in args:
        if type(a) is Ref:
            out.append(get(a.index))
        elif type(a) is list:
            out.append([get(x.index) if type(x) is Ref else x for x in a])
        else:
            out.append(a)
    return tuple(out)


def w1_spec(n: int = W1_TASKS) -> Spec:
    """W1 overhead: ``n`` independent no-op tasks and one sum over them."""
    spec = Spec("W1")
    refs = [spec.add(noop, i) for i in range(n)]
    spec.outputs = [spec.add(total, refs).index]
    return spec


def check_w1(out: Outcome, n: int = W1_TASKS) -> None:
    assert not out.failed and not out.skipped
    assert list(out.values.values()) == [n * (n - 1) // 2]


def w2_spec(n: int = W2_LENGTH) -> Spec:
    """W2 latency: a chain of ``n`` dependent +1 tasks starting from 0."""
    spec = Spec("W2")
    ref = spec.add(inc, 0)
    for _ in range(n - 1):
        ref = spec.add(inc, ref)
    spec.outputs = [ref.index]
    return spec


def check_w2(out: Outcome, n: int = W2_LENGTH) -> None:
    assert not out.failed and not out.skipped
    assert list(out.values.values()) == [n]


def calibrate_spin(seconds: float = W3_SECONDS) -> int:
    """Loop count that makes ``spin`` take about ``seconds`` here (best of a few tries)."""
    loops = 20_000
    while True:
        start = time.perf_counter()
        spin(loops, 0)
        elapsed = time.perf_counter() - start
        if elapsed > 0.02:
            break
        loops *= 2
    best = elapsed
    for _ in range(3):
        start = time.perf_counter()
        spin(loops, 0)
        best = min(best, time.perf_counter() - start)
    return max(1, round(loops * seconds / best))


def w3_spec(loops: int, n: int = W3_TASKS) -> Spec:
    """W3 CPU efficiency: ``n`` independent pure-Python tasks of ``loops`` steps."""
    spec = Spec("W3")
    refs = [spec.add(spin, loops, i) for i in range(n)]
    spec.outputs = [r.index for r in refs]
    return spec


def check_w3(out: Outcome, expected: list[int]) -> None:
    assert not out.failed and not out.skipped
    assert [out.values[i] for i in sorted(out.values)] == expected


def w4_spec(n: int = W4_ARRAYS, length: int = W4_LENGTH) -> Spec:
    """W4 numpy: ``n`` x make a float64 array → sort it → sum it; one total."""
    spec = Spec("W4")
    sums = []
    for i in range(n):
        arr = spec.add(make_array, i, length)
        srt = spec.add(sort_array, arr)
        sums.append(spec.add(sum_array, srt))
    spec.outputs = [spec.add(total, sums).index]
    return spec


@functools.lru_cache(maxsize=4)
def w4_expected(n: int = W4_ARRAYS, length: int = W4_LENGTH) -> float:
    return sum(float(make_array(i, length).sum()) for i in range(n))


def check_w4(out: Outcome, n: int = W4_ARRAYS, length: int = W4_LENGTH) -> None:
    import math

    assert not out.failed and not out.skipped
    (value,) = out.values.values()
    # Summing a sorted array adds in another order: equal up to rounding.
    assert math.isclose(value, w4_expected(n, length), rel_tol=1e-9), value


def w5_spec(n: int = W5_TASKS, every: int = W5_EVERY) -> Spec:
    """W5 failures: ``n`` tasks, every ``every``-th raising, each with one dependent.

    The dependents gather consecutive groups of ``every`` tasks (one of which
    raises), so the run ends with n - n/every completed, n/every failed and
    n/every skipped calls: 900 / 100 / 100 at the issue's size.
    """
    assert n % every == 0
    spec = Spec("W5")
    refs = [spec.add(maybe_fail, i) for i in range(n)]
    spec.outputs = [spec.add(total, refs[g : g + every]).index for g in range(0, n, every)]
    return spec


def w5_counts(n: int = W5_TASKS, every: int = W5_EVERY) -> tuple[int, int, int]:
    """(completed, failed, skipped) that W5 must end with."""
    return n - n // every, n // every, n // every


def check_w5(out: Outcome, n: int = W5_TASKS, every: int = W5_EVERY) -> None:
    completed, failed, skipped = w5_counts(n, every)
    assert out.n_calls == n + n // every
    assert out.failed == set(range(0, n, every))
    assert len(out.skipped) == skipped
    assert out.n_completed == completed
    assert len(out.failed) == failed


def w6_spec(width: int = W6_WIDTH, depth: int = W6_DEPTH) -> Spec:
    """W6 scale: ``depth`` layers of ``width`` nodes, each on 2 nodes of the layer before."""
    spec = Spec("W6")
    layer = [spec.add(layer_root, j) for j in range(width)]
    for _ in range(depth - 1):
        layer = [spec.add(layer_node, layer[j], layer[(j + 1) % width]) for j in range(width)]
    spec.outputs = [r.index for r in layer]
    return spec


def check_w6(out: Outcome, width: int = W6_WIDTH, depth: int = W6_DEPTH) -> None:
    assert not out.failed and not out.skipped
    assert len(out.values) == width
    assert set(out.values.values()) == {depth - 1}


def w7_spec(n: int = W7_TASKS, size: int = W7_SIZE) -> Spec:
    """W7 BLAS: ``n`` independent products of two ``size`` x ``size`` matrices."""
    spec = Spec("W7")
    spec.outputs = [spec.add(matmul, i, size).index for i in range(n)]
    return spec


@functools.lru_cache(maxsize=4)
def w7_expected(n: int = W7_TASKS, size: int = W7_SIZE) -> tuple[float, ...]:
    return tuple(matmul(i, size) for i in range(n))


def check_w7(out: Outcome, n: int = W7_TASKS, size: int = W7_SIZE) -> None:
    import math

    assert not out.failed and not out.skipped
    got = [out.values[i] for i in sorted(out.values)]
    # BLAS sums in another order with another thread count: equal up to rounding.
    for value, expected in zip(got, w7_expected(n, size), strict=True):
        assert math.isclose(value, expected, rel_tol=1e-9), (value, expected)


# -- runners ----------------------------------------------------------------------


def run_serial(spec: Spec) -> Outcome:
    """Every call in order, in this process; a failure skips its dependents.

    A value is dropped once its last consumer has run, as the variables of a
    plain loop would be: holding W4's 64 arrays (1 GB) makes every new array
    fresh memory, which the kernel must fault in, and the serial time slower
    than the code a user would write.
    """
    values: list[Any] = [None] * len(spec.calls)
    uses = [0] * len(spec.calls)
    for _fn, args in spec.calls:
        for d in _deps(args):
            uses[d] += 1
    keep = set(spec.outputs)
    bad: set[int] = set()
    failed: set[int] = set()
    skipped: set[int] = set()
    for k, (fn, args) in enumerate(spec.calls):
        deps = _deps(args)
        if any(d in bad for d in deps):
            skipped.add(k)
            bad.add(k)
        else:
            try:
                values[k] = fn(*_resolve(args, values.__getitem__))
            except Exception:
                failed.add(k)
                bad.add(k)
        for d in deps:
            uses[d] -= 1
            if uses[d] == 0 and d not in keep:
                values[d] = None
    return Outcome(
        {k: values[k] for k in spec.outputs if k not in bad}, failed, skipped, len(spec.calls)
    )


def run_executor(executor: Executor, spec: Spec, max_inflight: int = MAX_INFLIGHT) -> Outcome:
    """The hand-written dependency driver on a ``concurrent.futures`` executor.

    Submits every call whose inputs are ready (at most ``max_inflight`` in
    flight), waits for the first to complete, and frees each value once its
    last dependent has been submitted. A failure skips its dependents
    (transitively); everything else still runs.
    """
    calls = spec.calls
    n = len(calls)
    waiting = [0] * n
    dependents: list[list[int]] = [[] for _ in range(n)]
    remaining_uses = [0] * n
    for k, (_fn, args) in enumerate(calls):
        deps = _deps(args)
        waiting[k] = len(deps)
        for d in deps:
            dependents[d].append(k)
            remaining_uses[d] += 1
    outputs = set(spec.outputs)
    values: dict[int, Any] = {}
    failed: set[int] = set()
    skipped: set[int] = set()
    ready = deque(k for k in range(n) if waiting[k] == 0)
    inflight: dict[Future[Any], int] = {}

    def skip(k: int) -> None:
        stack = [k]
        while stack:
            for d in dependents[stack.pop()]:
                if d not in skipped:
                    skipped.add(d)
                    stack.append(d)

    while ready or inflight:
        while ready and len(inflight) < max_inflight:
            k = ready.popleft()
            fn, args = calls[k]
            inflight[executor.submit(fn, *_resolve(args, values.__getitem__))] = k
            for d in _deps(args):
                remaining_uses[d] -= 1
                if remaining_uses[d] == 0 and d not in outputs:
                    del values[d]
        done, _ = wait(inflight, return_when=FIRST_COMPLETED)
        for fut in done:
            k = inflight.pop(fut)
            exc = fut.exception()
            if exc is not None:
                failed.add(k)
                skip(k)
                continue
            values[k] = fut.result()
            for d in dependents[k]:
                waiting[d] -= 1
                if waiting[d] == 0 and d not in skipped:
                    ready.append(d)
    return Outcome({k: values[k] for k in spec.outputs if k in values}, failed, skipped, n)


def dask_delayed(spec: Spec) -> list[Any]:
    """One ``dask.delayed`` object per call (``pure=False``: no hashing of arguments)."""
    import dask

    objs: list[Any] = []
    for fn, args in spec.calls:
        objs.append(dask.delayed(fn, pure=False)(*_resolve(args, objs.__getitem__)))
    return objs


def run_dask_processes(spec: Spec, workers: int = WORKERS) -> Outcome:
    """``dask.compute(..., scheduler="processes")``: starts its own pool every time."""
    import dask

    objs = dask_delayed(spec)
    values = dask.compute(
        *[objs[k] for k in spec.outputs], scheduler="processes", num_workers=workers
    )
    return Outcome(dict(zip(spec.outputs, values)), n_calls=len(spec.calls))


def run_distributed(client: Any, spec: Spec, all_states: bool = False) -> Outcome:
    """``client.compute`` on a dask.distributed cluster.

    With ``all_states`` every call gets a future, so that failed calls and the
    ones that erred because an upstream failed can be counted (distributed
    marks both ``error``; a call is counted failed when its own exception is
    the one the workload raises and it has no failed upstream).
    """
    from distributed import wait as dwait

    objs = dask_delayed(spec)
    if not all_states:
        futures = client.compute([objs[k] for k in spec.outputs])
        values = client.gather(futures)
        return Outcome(dict(zip(spec.outputs, values)), n_calls=len(spec.calls))
    futures = client.compute(objs)
    dwait(futures)
    bad = {k for k, f in enumerate(futures) if f.status == "error"}
    failed = {k for k in bad if not any(d in bad for d in _deps(spec.calls[k][1]))}
    values = {k: futures[k].result() for k in spec.outputs if k not in bad}
    out = Outcome(values, failed, bad - failed, len(spec.calls))
    for f in futures:
        f.release()
    return out


@functools.cache
def as_gx_task(fn: Callable[..., Any]) -> gx.Task:
    return gx.task(fn)


def build_graphexec(spec: Spec) -> tuple[gx.Graph, list[gx.Node]]:
    """The spec as a graphexec graph: task calls inside ``with graph:``."""
    graph = gx.Graph(spec.name)
    nodes: list[gx.Node] = []
    with graph:
        for fn, args in spec.calls:
            nodes.append(as_gx_task(fn)(*_resolve(args, nodes.__getitem__)))
    return graph, nodes


def run_graphexec(spec: Spec, **compute: Any) -> Outcome:
    """Build the graph and ``graph.compute(**compute)``; states from the Run.

    Pass ``workers=2`` (cold: the compute starts and stops its own pool),
    ``pool=`` (warm) or ``scheduler="sync"``.
    """
    graph, nodes = build_graphexec(spec)
    compute.setdefault("raise_on_failure", False)
    run = graph.compute(**compute)
    return outcome_of_run(spec, nodes, run)


def outcome_of_run(spec: Spec, nodes: list[gx.Node], run: gx.Run) -> Outcome:
    failed: set[int] = set()
    skipped: set[int] = set()
    for k, node in enumerate(nodes):
        name = run.state(node).name
        if name == "Failed":
            failed.add(k)
        elif name == "Skipped":
            skipped.add(k)
        else:
            assert name == "Completed", f"{node.name} ended {name}"
    values = {k: run[nodes[k]] for k in spec.outputs if k not in failed | skipped}
    return Outcome(values, failed, skipped, len(nodes))


def layered_graph(width: int = W6_WIDTH, depth: int = W6_DEPTH) -> tuple[gx.Graph, list[gx.Node]]:
    """W6 the way a user writes it: ``depth`` layers of ``width`` task calls.

    Returns the graph and its last layer.
    """
    root, node = as_gx_task(layer_root), as_gx_task(layer_node)
    graph = gx.Graph("W6")
    with graph:
        layer = [root(j) for j in range(width)]
        for _ in range(depth - 1):
            layer = [node(layer[j], layer[(j + 1) % width]) for j in range(width)]
    return graph, layer


def layered_graph_add(
    width: int = W6_WIDTH, depth: int = W6_DEPTH, *, inside_with: bool = True
) -> tuple[gx.Graph, list[gx.Node]]:
    """W6 built with ``graph.add(plain_function, ...)``, no decorator.

    ``inside_with``: the calls run inside ``with graph:`` (which pauses the
    garbage collector while building), else as bare ``graph.add`` calls.
    """
    graph = gx.Graph("W6")

    def build() -> list[gx.Node]:
        add = graph.add
        layer = [add(layer_root, j) for j in range(width)]
        for _ in range(depth - 1):
            layer = [add(layer_node, layer[j], layer[(j + 1) % width]) for j in range(width)]
        return layer

    if inside_with:
        with graph:
            return graph, build()
    return graph, build()


def layered_dict(width: int = W6_WIDTH, depth: int = W6_DEPTH) -> dict[str, Any]:
    """W6 as a plain dask-style dict of tuples: the floor for building any graph."""
    graph: dict[str, Any] = {}
    prev = [f"0-{j}" for j in range(width)]
    for j, key in enumerate(prev):
        graph[key] = (layer_root, j)
    for d in range(1, depth):
        cur = [f"{d}-{j}" for j in range(width)]
        for j, key in enumerate(cur):
            graph[key] = (layer_node, prev[j], prev[(j + 1) % width])
        prev = cur
    return graph


def layered_delayed(width: int = W6_WIDTH, depth: int = W6_DEPTH) -> list[Any]:
    """W6 built with ``dask.delayed``; returns the last layer."""
    import dask

    root = dask.delayed(layer_root, pure=False)
    node = dask.delayed(layer_node, pure=False)
    layer = [root(j) for j in range(width)]
    for _ in range(depth - 1):
        layer = [node(layer[j], layer[(j + 1) % width]) for j in range(width)]
    return layer


# -- Ray ----------------------------------------------------------------------------


def ray_init(workers: int = WORKERS) -> None:
    """``ray.init(num_cpus=workers)``, quiet: no dashboard, no worker logs to this terminal."""
    import logging

    import ray

    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )


def _ray_lists(fn: Callable[..., Any], sizes: tuple[int | None, ...], *flat: Any) -> Any:
    """Call ``fn`` with list arguments put back together (Ray resolves only top-level refs)."""
    args: list[Any] = []
    pos = 0
    for size in sizes:
        if size is None:
            args.append(flat[pos])
            pos += 1
        else:
            args.append(list(flat[pos : pos + size]))
            pos += size
    return fn(*args)


@functools.cache
def ray_remote(fn: Callable[..., Any]) -> Any:
    import ray

    return ray.remote(fn)


def run_ray(spec: Spec, all_states: bool = False) -> Outcome:
    """Each call a ``ray.remote`` task given its inputs' ``ObjectRef``s; ``ray.get`` outputs.

    Ray resolves ``ObjectRef`` arguments before the call, but not those inside
    a list, so a call with a list of inputs (W1's sum, W5's group sums) passes
    them flat and ``_ray_lists`` rebuilds the list in the worker. A failed
    task's error propagates to its dependents; with ``all_states``, every
    call's ref is read, and a call is counted failed when none of its inputs
    failed (as for dask.distributed).
    """
    import ray

    refs: list[Any] = []
    for fn, args in spec.calls:
        if any(type(a) is list for a in args):
            sizes = tuple(len(a) if type(a) is list else None for a in args)
            flat: list[Any] = []
            for a in _resolve(args, refs.__getitem__):
                if type(a) is list:
                    flat.extend(a)
                else:
                    flat.append(a)
            refs.append(ray_remote(_ray_lists).remote(fn, sizes, *flat))
        else:
            refs.append(ray_remote(fn).remote(*_resolve(args, refs.__getitem__)))
    if not all_states:
        values = ray.get([refs[k] for k in spec.outputs])
        return Outcome(dict(zip(spec.outputs, values)), n_calls=len(spec.calls))
    ray.wait(refs, num_returns=len(refs))
    bad: set[int] = set()
    results: dict[int, Any] = {}
    for k, ref in enumerate(refs):
        try:
            results[k] = ray.get(ref)
        except Exception:
            bad.add(k)
    failed = {k for k in bad if not any(d in bad for d in _deps(spec.calls[k][1]))}
    values = {k: results[k] for k in spec.outputs if k not in bad}
    return Outcome(values, failed, bad - failed, len(spec.calls))


def run_joblib(spec: Spec, workers: int = WORKERS) -> Outcome:
    """``joblib.Parallel(n_jobs=workers)`` over a spec of independent calls (its loky
    backend limits BLAS/OpenMP threads in its workers to cores // n_jobs)."""
    import joblib

    assert not any(_deps(args) for _fn, args in spec.calls), "joblib runs independent calls"
    values = joblib.Parallel(n_jobs=workers)(joblib.delayed(fn)(*args) for fn, args in spec.calls)
    return Outcome(dict(enumerate(values)), n_calls=len(spec.calls))


# -- W4's floor: two processes, a static half each, nothing between them -----------


def w4_half_server(conn: Any) -> None:
    """One of W4's two floor processes: run a half of W4 per request, answer its sum."""
    while True:
        request = conn.recv()
        if request is None:
            return
        k, n, length = request
        total = 0.0
        for i in range(k, n, WORKERS):
            total += sum_array(sort_array(make_array(i, length)))
        conn.send(total)


def w3_half_server(conn: Any) -> None:
    """One of W3's floor processes: its fixed share of W3's tasks per request."""
    while True:
        request = conn.recv()
        if request is None:
            return
        k, n, loops = request
        conn.send([spin(loops, i) for i in range(k, n, WORKERS)])


class TwoProcesses:
    """A floor on ``WORKERS`` cores: ``WORKERS`` warm processes, each running its
    fixed share of a workload (``server``: W4's by default), only the results
    sent back: what no scheduler can beat on this machine. For W4, whatever the
    cores share (memory bandwidth, caches) when they all sort 16 MB arrays at
    once; for W3, what two busy cores of this machine give against one alone
    (a virtual machine's two CPUs may be two threads of one core)."""

    def __init__(self, server: Any = None, warm: tuple = (WORKERS * 2, 1000)) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        self.conns = []
        self.procs = []
        try:
            for _ in range(WORKERS):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=server or w4_half_server, args=(theirs,), daemon=True)
                proc.start()
                theirs.close()
                self.conns.append(mine)
                self.procs.append(proc)
            self.ask(*warm)  # every process started, its imports done
        except BaseException:
            self.close()
            raise

    def ask(self, *request: Any) -> list:
        """Send each process ``(its number, *request)``; their answers, in order."""
        for k, conn in enumerate(self.conns):
            conn.send((k, *request))
        return [conn.recv() for conn in self.conns]

    def run(self, n: int = W4_ARRAYS, length: int = W4_LENGTH) -> float:
        """W4's total, each process summing its share of the arrays."""
        return sum(self.ask(n, length))

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:  # that process died: terminated below if need be
                pass
        for conn, proc in zip(self.conns, self.procs):
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
            conn.close()


def run_w4_floor(floor: TwoProcesses, spec: Spec) -> Outcome:
    """W4 on the floor processes (``spec`` only names the output's index)."""
    return Outcome({spec.outputs[0]: floor.run()}, n_calls=len(spec))


def w3_floor() -> TwoProcesses:
    """W3's floor processes (``w3_half_server``), started and warm."""
    return TwoProcesses(w3_half_server, warm=(WORKERS, 10))


def run_w3_floor(floor: TwoProcesses, spec: Spec) -> Outcome:
    """W3 on the floor processes: task i runs in process i % WORKERS."""
    loops = spec.calls[0][1][0]
    shares = floor.ask(len(spec.outputs), loops)
    values = {}
    for k, share in enumerate(shares):
        for j, value in enumerate(share):
            values[spec.outputs[k + j * WORKERS]] = value
    return Outcome(values, n_calls=len(spec))
