"""Caching (SPEC §5, issue #6): keys, hits and misses, expiry, invalidation, the store.

Every test uses its own cache directory under ``tmp_path`` and passes a
counter file (also under ``tmp_path``) to its tasks: workers are other
processes, so a task proves it ran by appending a line to that file. The
counter path is an argument, hence part of every key, so tests never share
entries. Expiry moves ``graphexec._data.cache.clock``; nothing sleeps for it.

Crash, resume and concurrency tests run small scripts in subprocesses; see
``tests/test_resume.py`` for the resume ones.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import importlib
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

import graphexec as gx
from graphexec._data import cache as _cache

ALL_SCHEDULERS = ("processes", "sync", "threads")


# -- tasks ----------------------------------------------------------------------------------
# Self-contained (imports inside), so that they run the same in a worker process.


@gx.task(cache=True)
def make_array(counter, seed, rows=50_000):
    import numpy as np

    with open(counter, "a") as f:
        f.write(f"make_array {seed}\n")
    # float32, 2-D, 800 kB: its buffer leaves the pickle (and travels in shared memory)
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


@gx.task(cache=True)
def describe(counter, array):
    with open(counter, "a") as f:
        f.write("describe\n")
    return {
        "sum": float(array.sum(dtype="float64")),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "tags": ("a", 1, None),
        "small": array[:3].copy(),
    }


@gx.task
def consume_in_place(array):
    array += 1  # a task that writes to its input must not write to the cache entry
    return float(array.sum(dtype="float64"))


@gx.task(cache=True)
def square(counter, x):
    with open(counter, "a") as f:
        f.write(f"square {x}\n")
    return x * x


@gx.task(cache=True)
def add(counter, x, y):
    with open(counter, "a") as f:
        f.write(f"add {x} {y}\n")
    return x + y


@gx.task
def plain_value(x):
    return x


@gx.task(cache=True)
def count_calls(counter, label):
    """Returns how many times it has run so far (so an overwritten entry is visible)."""
    with open(counter, "a") as f:
        f.write(f"{label}\n")
    with open(counter) as f:
        return sum(1 for line in f if line.strip() == label)


@gx.task(cache=True, cache_expiration=timedelta(seconds=60))
def short_lived(counter, x):
    with open(counter, "a") as f:
        f.write(f"short_lived {x}\n")
    return x


@gx.task(cache=True, cache_expiration=30)  # seconds, as a number
def shorter_lived(counter, x):
    with open(counter, "a") as f:
        f.write(f"shorter_lived {x}\n")
    return x


@gx.task(cache=True, cache_expiration=60)
def read_number(source):
    return int(Path(source).read_text())


@gx.task(cache=True, refresh_cache=True)
def read_number_fresh(source):
    return int(Path(source).read_text())


class NotForTheCache(int):
    """An int that this process can use but not pickle: its cache entry is not written."""

    def __reduce__(self):
        raise TypeError("not picklable")


@gx.task(cache=True)
def read_number_unstorable_past_one(source):
    value = int(Path(source).read_text())
    return value if value == 1 else NotForTheCache(value)


@gx.task(cache=True)
def times_ten(x):
    return int(x) * 10


@gx.task(cache=True)
def fail_while_flag(counter, flag, x):
    import os

    with open(counter, "a") as f:
        f.write(f"fail_while_flag {x}\n")
    if os.path.exists(flag):
        raise RuntimeError(f"fails while {flag} exists")
    return x


@gx.task(cache=True, retries=2)
def flaky(counter, x):
    with open(counter, "a") as f:
        f.write(f"flaky {x}\n")
    with open(counter) as f:
        if sum(1 for line in f if line.startswith("flaky")) == 1:
            raise RuntimeError("first attempt fails")
    return x


@gx.task(cache=True, timeout=0.05)
def too_slow(counter, seconds):
    import time

    with open(counter, "a") as f:
        f.write("too_slow\n")
    time.sleep(seconds)
    return seconds


@gx.task(cache=True)
def use_lock(counter, lock):
    with open(counter, "a") as f:
        f.write("use_lock\n")
    with lock:
        return 1


def calls(counter: Path) -> list[str]:
    return counter.read_text().splitlines() if counter.exists() else []


def entries(cache_dir: Path) -> list[str]:
    """Keys of the committed entries, as the store lists them."""
    if not (cache_dir / _cache.DB_NAME).exists():
        return []
    return sorted(e.key for e in _cache.CacheStore(cache_dir).entries())


def names(run: gx.Run, nodes) -> list[str]:
    return [run.state(n).name for n in nodes]


# -- hit and miss ---------------------------------------------------------------------------


def _array_graph(counter, seed=1):
    graph = gx.Graph()
    with graph:
        array = make_array(str(counter), seed)
        info = describe(str(counter), array)
        scalar = square(str(counter), 7)
    return graph, array, info, scalar


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_second_compute_is_all_cached_with_identical_values(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    graph, array, info, scalar = _array_graph(counter)
    first = compute(graph, array, info, scalar, cache_dir=cache)
    assert names(first, (array, info, scalar)) == ["Completed"] * 3
    assert sorted(calls(counter)) == ["describe", "make_array 1", "square 7"]
    assert len(entries(cache)) == 3

    graph, array2, info2, scalar2 = _array_graph(counter)  # a fresh graph: a rerun
    second = compute(graph, array2, info2, scalar2, cache_dir=cache)
    assert names(second, (array2, info2, scalar2)) == ["Cached"] * 3
    assert len(calls(counter)) == 3  # nothing ran again
    for node in (array2, info2, scalar2):
        state = second.state(node)
        assert state.is_cached() and state.is_completed()
        assert state.attempts == 0 and state.history == []  # no worker was involved
    assert second.ok and "3 cached" in second.summary().splitlines()[0]

    a1, a2 = first[array], second[array2]
    assert isinstance(a2, np.ndarray)
    assert a2.dtype == np.float32 and a2.shape == (50_000, 4) == a1.shape
    assert np.array_equal(a1, a2)
    i1, i2 = first[info], second[info2]
    assert i1.keys() == i2.keys()
    assert {k: v for k, v in i2.items() if k != "small"} == {
        k: v for k, v in i1.items() if k != "small"
    }
    assert i2["tags"] == ("a", 1, None) and type(i2["tags"]) is tuple
    assert np.array_equal(i1["small"], i2["small"]) and i2["small"].dtype == np.float32
    assert second[scalar2] == 49
    assert not list(cache.glob("*/.hold-*"))  # a hit's private link goes with the run


@pytest.mark.timeout(30)
def test_a_cached_array_is_private_to_whoever_loads_it(compute, tmp_path):
    """Writing to a loaded (memory-mapped) value never writes to the entry."""
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    graph, array, *_ = _array_graph(counter)
    expected = compute(graph, array, cache_dir=cache)[array].copy()

    graph = gx.Graph()
    with graph:
        array = make_array(str(counter), 1)
        after = consume_in_place(array)
    run = compute(graph, array, after, cache_dir=cache)
    assert names(run, (array, after)) == ["Cached", "Completed"]
    assert run[after] == pytest.approx(float(expected.sum(dtype="float64")) + expected.size)
    loaded = run[array]
    loaded[0, 0] = 1e9  # copy-on-write mapping: allowed, and stays in this process

    graph, array, *_ = _array_graph(counter)
    again = compute(graph, array, cache_dir=cache)
    assert again.state(array).is_cached()
    assert np.array_equal(again[array], expected)
    assert calls(counter) == ["make_array 1"]


@pytest.mark.timeout(30)
def test_a_fully_cached_rerun_starts_no_worker(tmp_path):
    """Hits are loaded by the scheduler: they never occupy (or even start) a worker."""
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    graph, *nodes = _array_graph(counter)
    graph.compute(scheduler="sync", cache_dir=cache)  # entries made in this process

    graph, *nodes = _array_graph(counter)
    pool = gx.Pool(workers=2)
    try:
        run = graph.compute(*nodes, pool=pool, cache_dir=cache)
        assert names(run, nodes) == ["Cached"] * 3
        assert len(pool._workers) == 0  # workers start when there is work: there was none
    finally:
        pool.close()
    assert len(calls(counter)) == 3


@pytest.mark.timeout(30)
def test_same_key_twice_in_one_graph_is_computed_once(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    graph = gx.Graph()
    with graph:
        first = square(str(counter), 3)
        second = square(str(counter), 3)
        both = add(str(counter), first, second)
    run = compute(graph, first, second, both, cache_dir=cache)
    assert sorted(names(run, (first, second))) == ["Cached", "Completed"]
    assert run[both] == 18
    assert calls(counter).count("square 3") == 1


# -- expiry ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(_cache, "clock", fake)
    return fake


@pytest.mark.timeout(30)
def test_entries_expire_by_the_injected_clock(compute, tmp_path, clock):
    counter, cache = tmp_path / "calls", tmp_path / "cache"

    def run_once():
        graph = gx.Graph()
        with graph:
            a = short_lived(str(counter), 1)  # timedelta(seconds=60)
            b = shorter_lived(str(counter), 2)  # 30 (seconds)
            c = square(str(counter), 3)  # no expiration
        run = compute(graph, a, b, c, cache_dir=cache)
        assert (run[a], run[b], run[c]) == (1, 2, 9)
        return names(run, (a, b, c))

    start = clock.now
    assert run_once() == ["Completed"] * 3
    clock.now = start + 29.9
    assert run_once() == ["Cached"] * 3
    clock.now = start + 30  # expired at exactly its expiry time
    assert run_once() == ["Cached", "Completed", "Cached"]
    clock.now = start + 59.9
    assert run_once() == ["Cached", "Cached", "Cached"]  # the new entry expires at +60
    clock.now = start + 60  # both: the 30 s one was rewritten at +30
    assert run_once() == ["Completed", "Completed", "Cached"]
    clock.now = start + 10_000_000  # entries without an expiration never expire
    assert run_once() == ["Completed", "Completed", "Cached"]
    assert sorted(calls(counter)) == sorted(
        ["short_lived 1"] * 3 + ["shorter_lived 2"] * 4 + ["square 3"]
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("recomputed_by", ["expiry", "refresh_cache"])
def test_a_dependent_never_hits_an_entry_made_from_its_upstreams_older_value(
    compute, tmp_path, clock, recomputed_by
):
    # The upstream's key stays the same when it is recomputed (its entry expired, or
    # the task refreshes it each run) and its value changes (a file it reads): its
    # dependent's entry, made from the old value, must not be hit.
    counter, cache, source = tmp_path / "calls", tmp_path / "cache", tmp_path / "source"
    reader = read_number if recomputed_by == "expiry" else read_number_fresh

    def run_once():
        clock.now += 1  # time goes on between runs (entries are told apart by it)
        graph = gx.Graph()
        with graph:
            number = reader(str(source))
            doubled = square(str(counter), number)
        run = compute(graph, number, doubled, cache_dir=cache)
        return names(run, (number, doubled)), run[doubled]

    source.write_text("2")
    assert run_once() == (["Completed", "Completed"], 4)
    if recomputed_by == "expiry":
        assert run_once() == (["Cached", "Cached"], 4)  # the upstream's entry is valid
        clock.now += 61
    # Recomputed with the same value: the dependent's entry is still its value's.
    assert run_once() == (["Completed", "Cached"], 4)
    source.write_text("5")
    clock.now += 61
    assert run_once() == (["Completed", "Completed"], 25)
    source.write_text("2")  # back to the first value: so is the dependent's entry
    clock.now += 61
    assert run_once() == (["Completed", "Cached"], 4)
    assert calls(counter) == ["square 2", "square 5"]


@gx.task(return_state=True)
def fails_with(message):
    raise KeyError(message)


@gx.task
def raises(message):
    raise KeyError(message)


@gx.task(cache=True)
def describe_state(state):
    return f"{state.name} {state.exception!r}"


@gx.task(cache=True)
def describe_error(error):
    return repr(error)


@pytest.mark.parametrize("form", ["return_state", "allow_failure"])
def test_a_dependent_never_hits_the_entry_of_another_failure_of_its_upstream(
    compute, tmp_path, form
):
    # A failed upstream has no value: its failure is what the dependent receives, and
    # two failures must not share one key (every failure once gave the same one).
    def run_once(message):
        graph = gx.Graph()
        with graph:
            if form == "return_state":
                seen = describe_state(fails_with(message))
            else:
                seen = describe_error(gx.allow_failure(raises(message)))
        return compute(graph, seen, cache_dir=tmp_path / "c", raise_on_failure=False)[seen]

    first, second = run_once("first"), run_once("second")
    assert "'first'" in first and "'second'" in second
    assert run_once("second") == second  # the same failure: a hit is right


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_an_upstream_whose_entry_write_failed_is_not_stamped_with_the_entry_it_left(
    tmp_path, scheduler
):
    # Refreshed to a value that cannot be stored, the upstream left its old entry in
    # place: its dependent, made from the new value, must not be filed under the old
    # entry's stamp, where the next run (which hits the old entry) would find it.
    source = tmp_path / "source"
    graph = gx.Graph()
    with graph:
        upstream = read_number_unstorable_past_one(str(source))
        below = times_ten(upstream)
    options = dict(cache_dir=tmp_path / "cache", scheduler=scheduler)
    source.write_text("1")
    assert graph.compute(upstream, below, **options)[below] == 10
    source.write_text("2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the entry that cannot be written, said
        run = graph.compute(upstream, below, refresh_cache=True, **options)
    assert run[below] == 20
    run = graph.compute(upstream, below, **options)
    assert (run[upstream], run.state(upstream).name) == (1, "Cached")
    assert run[below] == 10


STAMP_RACE_SCRIPT = """\
import sys, time
from pathlib import Path

import graphexec as gx

role, tmp = sys.argv[1], Path(sys.argv[2])


@gx.task(cache=True)
def read(source):
    return int(Path(source).read_text())


@gx.task
def hold(value, tmp):
    (Path(tmp) / "started").touch()
    deadline = time.monotonic() + 60
    while not (Path(tmp) / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return 0


@gx.task(cache=True)
def dependent(value, _):
    return value


graph = gx.Graph()
with graph:
    upstream = read(str(tmp / "source"))
    below = dependent(upstream, hold(upstream, str(tmp)))
options = dict(cache_dir=str(tmp / "cache"), scheduler="sync")
if role == "seed":
    print(graph.compute(upstream, **options)[upstream])
elif role == "B":
    (tmp / "source").write_text("2")
    print(graph.compute(upstream, refresh_cache=True, **options)[upstream])
else:
    run = graph.compute(upstream, below, **options)
    print(run[upstream], run[below], run.state(below).name)
"""


@pytest.mark.timeout(120)
def test_a_dependent_keys_on_the_value_it_received_not_on_what_another_process_wrote_since(
    tmp_path,
):
    # A takes its upstream from the cache (1); B recomputes that upstream (2) before A
    # keys the dependent; A's dependent, made from 1, must not be filed under 2's
    # entry, where C would hit it.
    script = tmp_path / "race.py"
    script.write_text(STAMP_RACE_SCRIPT)
    (tmp_path / "source").write_text("1")

    def role(name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), name, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )

    assert role("seed").communicate(timeout=60)[0].split() == ["1"]
    a = role("A")
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():  # A read 1 from the cache
            assert time.monotonic() < deadline and a.poll() is None
            time.sleep(0.01)
        assert role("B").communicate(timeout=60)[0].split() == ["2"]
    finally:
        (tmp_path / "go").touch()
    assert a.communicate(timeout=60)[0].split() == ["1", "1", "Completed"]
    assert role("C").communicate(timeout=60)[0].split() == ["2", "2", "Completed"]


# -- refresh --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_refresh_cache_per_compute_and_per_task_recomputes_and_overwrites(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"

    def run_once(refresh_task=False, **kw):
        graph = gx.Graph()
        task = count_calls.with_options(refresh_cache=True) if refresh_task else count_calls
        with graph:
            node = task(str(counter), "x")
            other = square(str(counter), 4)
        run = compute(graph, node, other, cache_dir=cache, **kw)
        return run.state(node).name, run[node], run.state(other).name

    assert run_once() == ("Completed", 1, "Completed")
    assert run_once() == ("Cached", 1, "Cached")
    assert run_once(refresh_cache=True) == ("Completed", 2, "Completed")  # every cached task
    assert run_once() == ("Cached", 2, "Cached")  # the entry was overwritten
    assert run_once(refresh_task=True) == ("Completed", 3, "Cached")  # only that task
    assert run_once() == ("Cached", 3, "Cached")
    assert calls(counter).count("square 4") == 2
    assert len(entries(cache)) == 2


# -- invalidation when the task's source changes ------------------------------------------

MODULE_V1 = """\
import graphexec as gx


@gx.task(cache=True)
def compute_thing(counter, x):
    with open(counter, "a") as f:
        f.write("compute_thing\\n")
    return x + 1
"""

MODULE_V2 = MODULE_V1.replace("return x + 1", "return x + 100  # edited")


def _write_module(path: Path, text: str) -> None:
    path.write_text(text)
    # Make sure both the import system and linecache see a change, even within the
    # file system's timestamp resolution.
    stamp = time.time() + (100 if "edited" in text else 0)
    os.utime(path, (stamp, stamp))
    importlib.invalidate_caches()


@pytest.fixture
def edited_module(tmp_path, monkeypatch):
    """A module written to tmp_path and imported; yields (module, its path)."""
    name = f"gx_cache_edit_{uuid.uuid4().hex[:10]}"
    path = tmp_path / f"{name}.py"
    _write_module(path, MODULE_V1)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    module = importlib.import_module(name)
    try:
        yield module, path
    finally:
        sys.modules.pop(name, None)


@pytest.mark.timeout(30)
def test_editing_the_task_source_invalidates_its_entries(compute, tmp_path, edited_module):
    module, path = edited_module
    counter, cache = tmp_path / "calls", tmp_path / "cache"

    def run_once():
        graph = gx.Graph()
        with graph:
            node = module.compute_thing(str(counter), 1)
        run = compute(graph, cache_dir=cache)
        return run.state(node).name, run[node]

    assert run_once() == ("Completed", 2)
    assert run_once() == ("Cached", 2)  # unchanged source: a hit

    _write_module(path, MODULE_V2)
    module = importlib.reload(module)
    assert run_once() == ("Completed", 101)
    assert run_once() == ("Cached", 101)

    _write_module(path, MODULE_V1)  # back to the first version: its entry is still valid
    module = importlib.reload(module)
    assert run_once() == ("Cached", 2)
    assert calls(counter) == ["compute_thing"] * 2


@pytest.mark.timeout(30)
def test_source_edited_on_disk_but_not_reloaded_is_never_a_wrong_hit(
    compute, tmp_path, edited_module
):
    """The file changes while the old code still runs (a notebook without autoreload,
    a long run while its author edits): the old code's value must not be stored under
    the new code's key."""
    module, path = edited_module
    counter, cache = tmp_path / "calls", tmp_path / "cache"

    def run_once():
        graph = gx.Graph()
        with graph:
            node = module.compute_thing(str(counter), 1)
        run = compute(graph, cache_dir=cache)
        return run.state(node).name, run[node]

    assert run_once() == ("Completed", 2)
    _write_module(path, MODULE_V2)  # not reloaded: the old code still runs
    assert run_once()[1] == 2
    module = importlib.reload(module)
    assert run_once() == ("Completed", 101)


def _make_offset_task(k):
    @gx.task(cache=True)
    def offset(counter, x):
        with open(counter, "a") as f:
            f.write(f"offset {k}\n")
        return x + k

    return offset


@pytest.mark.timeout(30)
def test_tasks_made_by_a_factory_differ_by_what_they_close_over(tmp_path):
    """Same source, same qualified name, different closure: different entries."""
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    values = []
    for k in (1, 2, 1):
        graph = gx.Graph()
        with graph:
            node = _make_offset_task(k)(str(counter), 10)
        run = graph.compute(scheduler="sync", cache_dir=cache)
        values.append((run.state(node).name, run[node]))
    assert values == [("Completed", 11), ("Completed", 12), ("Cached", 11)]


# -- task_input_hash ------------------------------------------------------------------------

HASH_SCRIPT = """\
import dataclasses
import functools
import os

import numpy as np

import graphexec as gx


@dataclasses.dataclass
class Params:
    name: str
    weights: tuple
    grid: object


@gx.task
def target(params, data, options=None):
    return params, data


def scale(factor, x):
    return factor * x


@dataclasses.dataclass
class Model:
    degree: int

    def predict(self, x):
        return x ** self.degree


class Settings:  # a plain class of the script (__main__): cloudpickle pickles it by value
    def __init__(self, tags, inner):
        self.tags = tags
        self.inner = inner


class Slotted:
    __slots__ = ("level", "names")

    def __init__(self, level, names):
        self.level = level
        self.names = names


forward = os.environ["ORDER"] == "forward"
pairs = [("alpha", 1), ("beta", [1, 2, (3, 4)]), ("gamma", {"x": 1.5, "y": None, "z": "é"})]
inner = dict(pairs if forward else reversed(pairs))
words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "yuzu"]
bag = set(words if forward else reversed(words))
big = np.arange(300_000, dtype=np.float64).reshape(1000, 300)
arguments = {
    "params": Params("p", (1, 2.5, "x", b"raw"), np.arange(12, dtype=np.int32).reshape(3, 4)),
    "data": {
        "inner": inner,
        "bag": bag,
        "frozen": frozenset(bag),
        "nested": [(1, [2, (3, (4, [5]))]), ((), [], {}), (True, None, 2 + 3j)],
        "big": big,
        "strided": big[::3, ::7],
        "fortran": np.asfortranarray(big[:10]),
        "half": np.linspace(0, 1, 1000, dtype=np.float16),
        "when": np.array(["2020-01-01", "2024-02-29"], dtype="datetime64[D]"),
        "scalar": np.float64(0.5),
        "sets_in_dicts": {"s": {frozenset({"a", "b"}), frozenset({"c"})}},
        "callables": [functools.partial(scale, 3), Model(2).predict, lambda x: x + 1, len],
        "objects": [Settings(bag, Slotted(3, frozenset(bag))), Settings([1, 2], None)],
    },
    "options": None,
}
if not forward:
    arguments = {"options": None, "data": arguments["data"], "params": arguments["params"]}
print(gx.task_input_hash(gx.CacheContext(target, "target"), arguments))
partial_task = gx.task(cache=True)(functools.partial(scale, {"k": bag}))
print(gx.task_input_hash(gx.CacheContext(partial_task, "scale"), {"x": 2}))
"""


@pytest.mark.timeout(60)
def test_task_input_hash_is_stable_across_processes_and_hash_seeds(tmp_path):
    script = tmp_path / "hash_args.py"
    script.write_text(HASH_SCRIPT)
    variants = [("0", "forward"), ("1", "reversed"), ("4242", "forward"), ("random", "reversed")]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=dict(os.environ, PYTHONHASHSEED=seed, ORDER=order),
        )
        for seed, order in variants
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=50)
        assert proc.returncode == 0, err
        assert "Warning" not in err, err
        outputs.append(out.strip())
    lines = outputs[0].splitlines()
    assert len(lines) == 2 and lines[0] != lines[1]
    assert all(len(line) == 64 and set(line) <= set("0123456789abcdef") for line in lines)
    assert len(set(outputs)) == 1, outputs


@dataclasses.dataclass
class Point:
    x: float
    y: float


@dataclasses.dataclass
class OtherPoint:
    x: float
    y: float


class Knob:  # a plain class: hashed by its name and attributes
    def __init__(self, value):
        self.value = value


class SecretKnob:
    __slots__ = ("__value", "label")  # a private slot is stored mangled

    def __init__(self, value, label="k"):
        self.__value = value
        self.label = label


def _hash(arguments, task=square):
    return gx.task_input_hash(gx.CacheContext(task, "n"), arguments)


def _scale(factor, x):
    return factor * x


def _scale_too(factor, x):
    return factor * x


def _task_of(fn):
    return gx.task(cache=True)(fn)


def test_task_input_hash_differs_when_content_differs():
    base = np.arange(12, dtype=np.int64).reshape(3, 4)
    changed = base.copy()
    changed[2, 3] += 1
    structured_a = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f4")])
    structured_b = np.zeros(3, dtype=[("x", "<f4"), ("y", "<i4")])
    variants = [
        base,
        changed,
        base.astype(np.int32),
        base.reshape(4, 3),
        base.T,
        base.astype(">i8"),
        np.array(5),
        np.array([5]),
        structured_a,
        structured_b,
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.array(["2020-01-02"], dtype="datetime64[D]"),
        np.array(["2020-01-01"], dtype="datetime64[s]"),
        1,
        1.0,
        True,
        "1",
        b"1",
        None,
        (1,),
        [1],
        {1},
        frozenset({2}),
        {"a": 1},
        {"a": 2},
        {"b": 1},
        {"a": [1, 2]},
        {"a": [2, 1]},
        Point(1.0, 2.0),
        Point(2.0, 1.0),
        OtherPoint(1.0, 2.0),
        Knob(1),
        Knob(2),
        Knob({1, 2}),
        SecretKnob(1),
        SecretKnob(2),
        [1, [2, 3]],
        [1, [3, 2]],
        [[1, 2], 3],
        ((1, 2), 3),
        0.0,
        -0.0,
        float("inf"),
        2 + 0j,
    ]
    digests = [_hash({"x": v}) for v in variants]
    assert len(set(digests)) == len(variants)
    # equal content, equal key; and a different task, a different key
    assert _hash({"x": base}) == _hash({"x": np.arange(12).reshape(3, 4)})
    assert _hash({"x": base.T}) == _hash({"x": np.ascontiguousarray(base.T)})
    assert _hash({"x": {"a": 1, "b": 2}}) == _hash({"x": {"b": 2, "a": 1}})
    assert _hash({"x": Knob([1, 2])}) == _hash({"x": Knob([1, 2])})
    assert _hash({"x": 1}) != _hash({"x": 1}, task=add)
    assert _hash({"x": 1}) != _hash({"y": 1})


class _TaggedList(list):
    """A list subclass with an attribute of its own (its items do not show it)."""


def _tagged(items, tag=None):
    out = _TaggedList(items)
    if tag is not None:
        out.tag = tag
    return out


def test_task_input_hash_tells_container_subclasses_by_what_makes_them_differ():
    """An OrderedDict's order, a defaultdict's default and a subclass's attributes are
    part of the argument: equal items with another of those never share a key (a
    wrong hit: the function would see another order, another missing-key value)."""
    Pair = collections.namedtuple("Pair", "a b")
    variants = [
        collections.OrderedDict([("a", 1), ("b", 2)]),
        collections.OrderedDict([("b", 2), ("a", 1)]),
        collections.defaultdict(int),
        collections.defaultdict(list),
        collections.defaultdict(int, {"a": 1}),
        collections.defaultdict(None, {"a": 1}),
        {"a": 1},
        _tagged([1, 2]),
        _tagged([1, 2], tag="x"),
        _tagged([1, 2], tag="y"),
        [1, 2],
        Pair(1, 2),
        (1, 2),
    ]
    digests = [_hash({"x": v}) for v in variants]
    assert len(set(digests)) == len(variants)
    # equal arguments, equal keys: the same order, default and attributes
    assert _hash({"x": collections.OrderedDict([("a", 1), ("b", 2)])}) == digests[0]
    assert _hash({"x": collections.defaultdict(list)}) == digests[3]
    assert _hash({"x": _tagged([1, 2], tag="x")}) == digests[8]
    assert _hash({"x": Pair(1, 2)}) == digests[11]


@gx.task(cache=True)
def _first_key(mapping):
    return next(iter(mapping))


@gx.task(cache=True)
def _missing_key(mapping):
    return mapping["nope"]


def test_an_ordered_dict_or_defaultdict_never_hits_another_ones_entry(tmp_path):
    def run(task, arg):
        graph = gx.Graph()
        with graph:
            node = task(arg)
        run = graph.compute(scheduler="sync", cache_dir=tmp_path)
        return run[node], run.state(node).name

    assert run(_first_key, collections.OrderedDict([("a", 1), ("b", 2)])) == ("a", "Completed")
    assert run(_first_key, collections.OrderedDict([("b", 2), ("a", 1)])) == ("b", "Completed")
    assert run(_first_key, collections.OrderedDict([("b", 2), ("a", 1)])) == ("b", "Cached")
    assert run(_missing_key, collections.defaultdict(int)) == (0, "Completed")
    assert run(_missing_key, collections.defaultdict(list)) == ([], "Completed")


def test_task_identity_covers_what_the_task_runs():
    """Callables in arguments, and tasks made from partials, closures and methods."""
    args = {"x": 1}
    variants = [
        _hash({"f": functools.partial(_scale, 1)}),
        _hash({"f": functools.partial(_scale, 2)}),
        _hash({"f": functools.partial(_scale_too, 1)}),  # same body, another name
        _hash({"f": Point(1.0, 2.0).__repr__}),
        _hash({"f": Point(2.0, 1.0).__repr__}),
        _hash({"f": _make_offset_task(1)}),
        _hash({"f": _make_offset_task(2)}),
        _hash(args, task=_task_of(functools.partial(_scale, 1))),
        _hash(args, task=_task_of(functools.partial(_scale, 2))),
        _hash(args, task=_task_of(functools.partial(_scale, factor=2))),
        _hash(args, task=_make_offset_task(1)),
        _hash(args, task=_make_offset_task(2)),
    ]
    assert len(set(variants)) == len(variants)
    # stable for equal content (no addresses in the key)
    assert _hash(args, task=_task_of(functools.partial(_scale, 1))) == variants[7]
    assert _hash(args, task=_make_offset_task(1)) == variants[10]
    assert _hash({"f": Point(1.0, 2.0).__repr__}) == variants[3]


def _recursive_closure():
    def countdown(n):
        return 0 if n == 0 else countdown(n - 1)

    return countdown


def test_a_recursive_closure_can_be_hashed():
    task = _task_of(_recursive_closure())
    assert _hash({"n": 3}, task=task) == _hash({"n": 3}, task=_task_of(_recursive_closure()))


@pytest.mark.timeout(30)
def test_task_input_hash_of_large_arrays_is_fast():
    array = np.ones(100 * 2**20 // 8)  # 100 MB
    _hash({"x": array[:1000]})  # warm up imports
    start = time.perf_counter()
    digest = _hash({"x": array})
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"hashing 100 MB took {elapsed:.2f} s"
    array[-1] = 2.0
    assert _hash({"x": array}) != digest


def test_task_input_hash_returns_none_with_a_warning_for_unhashable_arguments():
    with pytest.warns(RuntimeWarning, match="not cached"):
        assert _hash({"lock": threading.Lock()}) is None
    with pytest.warns(RuntimeWarning, match="not cached"):
        assert _hash({"x": np.array([object()])}) is None


# -- keys in a graph: upstream values ---------------------------------------------------------


@pytest.mark.timeout(30)
def test_upstream_values_enter_the_key_by_their_own_key(compute, tmp_path, monkeypatch):
    counter, cache = tmp_path / "calls", tmp_path / "cache"

    def run_once(seed):
        graph = gx.Graph()
        with graph:
            array = make_array(str(counter), seed)
            info = describe(str(counter), array)
        run = compute(graph, array, info, cache_dir=cache)
        return names(run, (array, info)), run[info]["sum"]

    from graphexec._engine import caching as _caching

    hashed = []
    for fn in ("content_hash", "wire_hash"):  # the big array must not be hashed again
        original = getattr(_caching, fn)
        monkeypatch.setattr(
            _caching, fn, lambda *a, _f=original, _n=fn: hashed.append(_n) or _f(*a)
        )

    names1, sum1 = run_once(1)
    assert names1 == ["Completed", "Completed"]
    assert run_once(1) == (["Cached", "Cached"], sum1)  # downstream hits when upstream hits
    names2, sum2 = run_once(2)  # upstream's argument changed: both miss
    assert names2 == ["Completed", "Completed"] and sum2 != sum1
    assert run_once(2) == (["Cached", "Cached"], sum2)
    assert run_once(1) == (["Cached", "Cached"], sum1)
    assert hashed == []
    assert sorted(calls(counter)) == ["describe", "describe", "make_array 1", "make_array 2"]


@pytest.mark.timeout(30)
def test_uncached_upstream_enters_the_key_by_content(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"

    def run_once(value):
        graph = gx.Graph()
        with graph:
            node = square(str(counter), plain_value(value))
        run = compute(graph, cache_dir=cache)
        return run.state(node).name, run[node]

    assert run_once(3) == ("Completed", 9)
    assert run_once(3) == ("Cached", 9)
    assert run_once(4) == ("Completed", 16)
    assert run_once(3.0) == ("Completed", 9.0)  # equal, but not the same content
    assert run_once(np.arange(4))[0] == "Completed"
    assert run_once(np.arange(4))[0] == "Cached"
    assert run_once(np.arange(5))[0] == "Completed"


UNCACHED_UPSTREAM_SCRIPT = """\
import sys

import graphexec as gx


@gx.task
def words():
    return {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"}


@gx.task(cache=True)
def count(counter, ws):
    with open(counter, "a") as f:
        f.write("count\\n")
    return len(ws)


graph = gx.Graph()
with graph:
    n = count(sys.argv[1], words())
run = graph.compute(workers=1, cache_dir=sys.argv[2])
print(run.state(n).name, run[n])
"""


@pytest.mark.timeout(60)
def test_uncached_upstream_key_is_stable_across_runs(tmp_path):
    """A set's pickle depends on PYTHONHASHSEED; the key must not."""
    script = tmp_path / "uncached_upstream.py"
    script.write_text(UNCACHED_UPSTREAM_SCRIPT)
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    outs = []
    for seed in ("1", "2", "3"):
        proc = subprocess.run(
            [sys.executable, str(script), str(counter), str(cache)],
            capture_output=True,
            text=True,
            timeout=50,
            cwd=tmp_path,
            env=dict(os.environ, PYTHONHASHSEED=seed),
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout.strip())
    assert outs == ["Completed 9", "Cached 9", "Cached 9"]
    assert calls(counter) == ["count"]


# -- keys that cannot be made, and custom key functions ----------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ["sync", "threads"])  # a lock cannot go to a worker
def test_unhashable_argument_warns_and_is_never_cached(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    for _ in range(2):
        graph = gx.Graph()
        with graph:
            node = use_lock(str(counter), threading.Lock())
        with pytest.warns(RuntimeWarning, match="use_lock.*not cached"):
            run = compute(graph, cache_dir=cache)
        assert run.state(node).name == "Completed" and run[node] == 1
    assert calls(counter) == ["use_lock"] * 2
    assert entries(cache) == []


@pytest.mark.timeout(30)
def test_unhashable_upstream_value_warns_and_is_never_cached(tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    for _ in range(2):
        graph = gx.Graph()
        with graph:
            node = use_lock(str(counter), plain_value(threading.Lock()))
        with pytest.warns(RuntimeWarning, match="not cached"):
            run = graph.compute(scheduler="sync", cache_dir=cache)
        assert run.state(node).name == "Completed"
    assert calls(counter) == ["use_lock"] * 2
    assert entries(cache) == []


seen_contexts: list[tuple] = []


def key_on_x_only(context, arguments):
    seen_contexts.append((context.task.name, context.task.fn, context.node))
    return f"xonly-{context.task.name}-{arguments['x']}"


def no_key(context, arguments):
    return None


def tuple_key(context, arguments):
    return ("not", "a", "string", arguments["x"])


def unsafe_key(context, arguments):
    return f"../../escape/{arguments['x']}"


def raising_key(context, arguments):
    raise ValueError("no key today")


@gx.task(cache_key_fn=key_on_x_only)
def keyed(counter, x, noise):
    with open(counter, "a") as f:
        f.write(f"keyed {x} {noise}\n")
    return (x, noise)


@pytest.mark.timeout(30)
def test_custom_cache_key_fn_receives_context_and_arguments(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    seen_contexts.clear()

    def run_once(x, noise):
        graph = gx.Graph()
        with graph:
            node = keyed(str(counter), x, noise=noise)
        run = compute(graph, cache_dir=cache)
        return run.state(node).name, run[node]

    assert run_once(1, "a") == ("Completed", (1, "a"))
    assert run_once(1, "b") == ("Cached", (1, "a"))  # the key ignores noise, by design
    assert run_once(2, "b") == ("Completed", (2, "b"))
    assert seen_contexts[0][0] == "keyed"
    assert seen_contexts[0][1] is keyed.fn
    assert seen_contexts[0][2].startswith("keyed")
    assert "xonly-keyed-1" in entries(cache)  # a safe key is used as it is


@pytest.mark.timeout(30)
def test_key_fn_returning_none_or_raising_means_not_cached(tmp_path, caplog):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    for key_fn in (no_key, raising_key):
        task = square.with_options(cache_key_fn=key_fn)
        for _ in range(2):
            graph = gx.Graph()
            with graph:
                node = task(str(counter), 5)
            run = graph.compute(scheduler="sync", cache_dir=cache)
            assert run.state(node).name == "Completed"
    assert calls(counter) == ["square 5"] * 4
    assert entries(cache) == []
    assert "no key today" in caplog.text


@pytest.mark.timeout(30)
def test_unusual_keys_are_hashed_into_safe_file_names(tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    for key_fn in (tuple_key, unsafe_key):
        for expected in ("Completed", "Cached"):
            graph = gx.Graph()
            with graph:
                node = square.with_options(cache_key_fn=key_fn)(str(counter), 6)
            run = graph.compute(scheduler="sync", cache_dir=cache)
            assert run.state(node).name == expected
    assert len(entries(cache)) == 2
    assert not (tmp_path / "escape").exists()
    for path in cache.rglob("*"):
        assert path.resolve().is_relative_to(cache.resolve())


def test_cache_options_are_validated():
    with pytest.raises(TypeError, match="not both"):
        gx.task(cache=True, cache_key_fn=gx.task_input_hash)(lambda x: x)
    with pytest.raises(TypeError, match="cache_key_fn"):
        gx.task(cache_key_fn="task_input_hash")(lambda x: x)
    with pytest.raises(ValueError, match="negative"):
        gx.task(cache=True, cache_expiration=timedelta(seconds=-1))(lambda x: x)
    with pytest.raises(TypeError, match="refresh_cache"):
        gx.task(cache=True, refresh_cache="yes")(lambda x: x)


# -- the store: corruption, truncation, permissions --------------------------------------------


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    return _cache._parse(raw)


def _corrupt_header_digit(path: Path) -> None:
    """Change one digit of the header's buffer offset: still valid JSON, wrong layout."""
    raw = bytearray(path.read_bytes())
    header, _ = _header(path)
    offset = header["buffers"][0][0]
    text = str(offset).encode()
    where = raw.index(text, 4)
    shorter = str(offset - 4096).encode()
    assert len(shorter) == len(text)
    raw[where : where + len(text)] = shorter
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "flip-in-buffer": lambda p: _flip(p, _header(p)[0]["buffers"][0][0] + 1234),
    "flip-in-pickle": lambda p: _flip(p, _header(p)[0]["data"][0] + 20),
    "flip-last-byte": lambda p: _flip(p, p.stat().st_size - 1),
    "flip-in-magic": lambda p: _flip(p, 1),
    "header-offset": _corrupt_header_digit,
    "truncated-body": lambda p: os.truncate(p, p.stat().st_size - 1000),
    "truncated-in-header": lambda p: os.truncate(p, 30),
    "truncated-to-4": lambda p: os.truncate(p, 4),
    "empty": lambda p: os.truncate(p, 0),
    "appended": lambda p: p.write_bytes(p.read_bytes() + b"extra"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
@pytest.mark.parametrize("reading", ["read", "mapped"])  # small entries are read, large mapped
def test_corrupt_or_truncated_entry_is_reported_deleted_and_recomputed(
    compute, tmp_path, monkeypatch, damage, reading
):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    monkeypatch.setattr(_cache, "MAP_READ_MIN", 0 if reading == "mapped" else 1 << 40)
    graph, array, *_ = _array_graph(counter)
    expected = compute(graph, array, cache_dir=cache)[array].copy()
    (key,) = entries(cache)
    entry = _cache.CacheStore(cache).path(key)  # a large entry: its file
    CORRUPTIONS[damage](entry)

    graph, array, *_ = _array_graph(counter)
    with pytest.warns(RuntimeWarning, match="corrupt") as record:
        run = compute(graph, array, cache_dir=cache)
    assert str(entry) in str(record[0].message)
    assert run.state(array).name == "Completed"  # recomputed, never returned
    assert np.array_equal(run[array], expected)
    assert calls(counter) == ["make_array 1"] * 2
    assert entries(cache) == [key] and entry.exists()  # deleted, then written again

    graph, array, *_ = _array_graph(counter)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = compute(graph, array, cache_dir=cache)
    assert again.state(array).is_cached() and np.array_equal(again[array], expected)


def test_an_entry_replaced_while_it_is_looked_up_is_read_whole(tmp_path, monkeypatch):
    """Another process refreshes the entry between our read and our hold on it: the
    value must come from one file, never one's pickle with the other's buffers."""
    store = _cache.CacheStore(tmp_path / "cache")
    key = "ab" + "0" * 62
    old_value, new_value = np.zeros((300, 100)), np.ones((100, 300))  # same layout on disk
    store.write_value(key, old_value, {"expires": None})
    real_link = os.link
    replaced = []

    def link_after_a_refresh(src, dst, **kw):
        if not replaced:
            replaced.append(src)
            store.write_value(key, new_value, {"expires": None})
        return real_link(src, dst, **kw)

    monkeypatch.setattr(_cache.os, "link", link_after_a_refresh)
    payload = store.lookup(key)
    assert replaced
    loaded = payload.load()
    assert loaded.shape == (100, 300) and np.array_equal(loaded, new_value)
    assert len(list(store.root.glob("*/.hold-*"))) == 1  # held until the value is released
    payload.discard()
    assert not list(store.root.glob("*/.hold-*"))


def test_a_file_whose_row_was_never_committed_is_not_a_hit(tmp_path, monkeypatch):
    """A writer renamed its new file into place and was killed before committing its row
    (or has not committed it yet): the old row, whose time stamps its dependents' keys,
    must not be paired with the new value (a dependent then hit its old entry)."""
    store = _cache.CacheStore(tmp_path / "cache")
    key = "ef" + "2" * 62
    store.write_value(key, np.zeros(100_000), {"expires": None})

    def killed(self, row):
        raise KeyboardInterrupt  # as a SIGKILL between the rename and the commit

    monkeypatch.setattr(_cache._Shared, "write_now", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write_value(key, np.ones(100_000), {"expires": None})
    monkeypatch.undo()
    assert store.lookup(key) is None  # a miss: the node recomputes, its write fixes both
    store.write_value(key, np.ones(100_000), {"expires": None})
    assert np.array_equal(store.lookup(key).load(), np.ones(100_000))


def test_entries_are_written_to_a_temporary_file_synced_then_renamed(tmp_path, monkeypatch):
    store = _cache.CacheStore(tmp_path / "cache")
    key = "cd" + "1" * 62
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(_cache.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))

    def replace(src, dst):
        events.append(("replace", Path(src).name.startswith(".tmp-"), Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(_cache.os, "replace", replace)
    store.write_value(key, np.arange(100_000), {"expires": None})
    assert events == ["fsync", ("replace", True, f"{key}.gxb")]

    def crash(src, dst):  # the writer dies between writing and renaming
        raise OSError("simulated crash")

    monkeypatch.setattr(_cache.os, "replace", crash)
    other = "cd" + "2" * 62
    with pytest.raises(OSError, match="simulated"):
        store.write_value(other, np.arange(20_000), {"expires": None})
    assert store.lookup(other) is None  # nothing half-written is ever visible
    assert not list(store.root.glob("*/.tmp-*"))
    assert np.array_equal(store.lookup(key).load(), np.arange(100_000))


def test_a_hit_maps_large_arrays_instead_of_reading_them(tmp_path):
    import mmap

    counter, cache = tmp_path / "calls", tmp_path / "cache"
    for _ in range(2):
        graph, array, *_ = _array_graph(counter)
        run = graph.compute(array, scheduler="sync", cache_dir=cache)
    assert run.state(array).is_cached()
    base = run[array]
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


@pytest.mark.timeout(30)
def test_cache_files_are_private_to_the_user(tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    old = os.umask(0o022)  # a usual umask: group and others could read by default
    try:
        graph, *_ = _array_graph(counter)
        graph.compute(scheduler="sync", cache_dir=cache)
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    paths = list(cache.rglob("*"))
    assert len([p for p in paths if p.suffix == ".gxb"]) == 1  # make_array's: large
    assert (cache / _cache.DB_NAME).exists() and (cache / _cache.LOCK_NAME).exists()
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


# -- failures, skips, retries ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_failed_and_skipped_nodes_are_not_cached(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    flag = tmp_path / "flag"
    flag.touch()

    def run_once():
        graph = gx.Graph()
        with graph:
            bad = fail_while_flag(str(counter), str(flag), 1)
            skipped = square(str(counter), bad)
            grandchild = add(str(counter), skipped, 1)
            good = square(str(counter), 2)
        run = compute(
            graph, bad, skipped, grandchild, good, cache_dir=cache, raise_on_failure=False
        )
        return run, names(run, (bad, skipped, grandchild, good))

    run, states = run_once()
    assert states == ["Failed", "Skipped", "Skipped", "Completed"]
    assert len(entries(cache)) == 1  # only good
    run, states = run_once()
    assert states == ["Failed", "Skipped", "Skipped", "Cached"]
    assert len(entries(cache)) == 1

    flag.unlink()
    run, states = run_once()
    assert states == ["Completed", "Completed", "Completed", "Cached"]
    assert run.ok
    assert calls(counter).count("fail_while_flag 1") == 3
    assert len(entries(cache)) == 4


@pytest.mark.timeout(30)
def test_a_retry_that_succeeds_is_cached(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    for expected, attempts in (("Completed", 2), ("Cached", 0)):
        graph = gx.Graph()
        with graph:
            node = flaky(str(counter), 8)
        run = compute(graph, cache_dir=cache)
        assert run.state(node).name == expected and run[node] == 8
        assert run.state(node).attempts == attempts
    assert calls(counter) == ["flaky 8", "flaky 8"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ["sync", "processes"])
def test_a_timed_out_node_is_not_cached(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    for _ in range(2):
        graph = gx.Graph()
        with graph:
            node = too_slow(str(counter), 0.3)
        run = compute(graph, cache_dir=cache, raise_on_failure=False)
        assert run.state(node).name == "Failed"
        assert isinstance(run.state(node).exception, gx.TaskTimeout)
    assert calls(counter) == ["too_slow"] * 2
    assert entries(cache) == []


@gx.task(cache=True)
def make_generator(counter, n):
    with open(counter, "a") as f:
        f.write("make_generator\n")
    return (i for i in range(n))  # runs fine, but cannot be pickled into an entry


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ["sync", "threads"])  # a worker could not send it back
def test_a_result_that_cannot_be_stored_costs_a_warning_not_the_result(compute, tmp_path, caplog):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    for _ in range(2):
        graph = gx.Graph()
        with graph:
            node = make_generator(str(counter), 3)
        run = compute(graph, cache_dir=cache)
        assert run.state(node).name == "Completed" and list(run[node]) == [0, 1, 2]
    assert "not cached" in caplog.text
    assert calls(counter) == ["make_generator"] * 2
    assert entries(cache) == [] and not list(cache.glob("*/.tmp-*"))


RESULT_MODULE = """\
import dataclasses


@dataclasses.dataclass
class {name}:
    value: int


def make(x):
    return {name}(x)
"""


@gx.task(cache=True)
def build_result(counter, module_name, x):
    import importlib

    with open(counter, "a") as f:
        f.write("build_result\n")
    return importlib.import_module(module_name).make(x)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheduler", ["sync", "threads"])  # workers would not find the module
def test_an_entry_this_code_cannot_load_is_deleted_and_recomputed(compute, tmp_path, monkeypatch):
    """The task is unchanged but a class its result used was renamed: resuming must not
    fail every dependent, run after run."""
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    name = f"gx_cache_result_{uuid.uuid4().hex[:10]}"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)

    def run_once():
        graph = gx.Graph()
        with graph:
            node = build_result(str(counter), name, 7)
            text = plain_value(node)
        run = compute(graph, node, text, cache_dir=cache)
        return run.state(node).name, type(run[text]).__name__, run[text].value

    try:
        _write_module(tmp_path / f"{name}.py", RESULT_MODULE.format(name="Result"))
        assert run_once() == ("Completed", "Result", 7)
        assert run_once() == ("Cached", "Result", 7)
        sys.modules.pop(name)  # a new process, with the class renamed
        _write_module(tmp_path / f"{name}.py", RESULT_MODULE.format(name="Outcome") + "# edited")
        with pytest.warns(RuntimeWarning, match="cannot be loaded.*Result"):
            assert run_once() == ("Completed", "Outcome", 7)
        assert run_once() == ("Cached", "Outcome", 7)
    finally:
        sys.modules.pop(name, None)
    assert calls(counter) == ["build_result"] * 2


@pytest.mark.timeout(30)
def test_refresh_computes_a_key_once_per_run(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    graph = gx.Graph()
    with graph:
        copies = [square(str(counter), 12) for _ in range(3)]
    run = compute(graph, *copies, cache_dir=cache, refresh_cache=True)
    assert sorted(names(run, copies)) == ["Cached", "Cached", "Completed"]
    assert calls(counter) == ["square 12"]


@gx.task(cache=True, priority=10)
def interrupt_while_flag(counter, flag):
    import os

    with open(counter, "a") as f:
        f.write("interrupt_while_flag\n")
    if os.path.exists(flag):
        raise KeyboardInterrupt  # Ctrl-C while a task runs in the scheduler's thread
    return "done"


@pytest.mark.timeout(30)
def test_ctrl_c_releases_the_locks_of_nodes_that_did_not_run(tmp_path):
    """After Ctrl-C, a rerun in the same process must not wait for locks the
    interrupted run took for its ready nodes."""
    counter, cache, flag = tmp_path / "calls", tmp_path / "cache", tmp_path / "flag"
    flag.touch()

    def build():
        graph = gx.Graph()
        with graph:
            first = interrupt_while_flag(str(counter), str(flag))  # runs first (priority)
            others = [square(str(counter), i) for i in range(3)]  # ready and locked
        return graph, first, others

    graph, first, others = build()
    with pytest.raises(KeyboardInterrupt) as info:
        graph.compute(scheduler="sync", cache_dir=cache)
    assert names(info.value.run, others) == ["Cancelled"] * 3
    assert entries(cache) == []
    flag.unlink()
    graph, first, others = build()
    start = time.monotonic()
    run = graph.compute(scheduler="sync", cache_dir=cache)
    assert time.monotonic() - start < 5
    assert names(run, [first, *others]) == ["Completed"] * 4
    assert calls(counter) == ["interrupt_while_flag"] * 2 + [f"square {i}" for i in range(3)]


# -- release of cached intermediates --------------------------------------------------------


@pytest.mark.timeout(30)
def test_cached_intermediates_are_released_like_computed_ones(compute, tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"

    def run_once():
        graph = gx.Graph()
        with graph:
            a = square(str(counter), 2)
            b = add(str(counter), a, 1)
            c = add(str(counter), b, 1)
        return compute(graph, cache_dir=cache), (a, b, c)

    run, (a, b, c) = run_once()
    assert [run.state(n).released for n in (a, b, c)] == [True, True, False]
    run, (a, b, c) = run_once()
    assert names(run, (a, b, c)) == ["Cached"] * 3
    assert run[c] == 6
    assert [run.state(n).released for n in (a, b, c)] == [True, True, False]


# -- clear_cache ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_clear_cache_prunes_expired_entries_then_everything(tmp_path, clock):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    graph = gx.Graph()
    with graph:
        short_lived(str(counter), 1)
        shorter_lived(str(counter), 2)
        square(str(counter), 3)
    graph.compute(scheduler="sync", cache_dir=cache)
    assert len(entries(cache)) == 3
    shard = cache / "ab"  # where a large entry's file is written
    shard.mkdir(exist_ok=True)
    leftover = shard / ".tmp-killedwriter.gxc"  # a writer killed before its rename
    leftover.write_bytes(b"half an entry")
    two_hours_ago = time.time() - 7200
    os.utime(leftover, (two_hours_ago, two_hours_ago))
    writing = shard / ".tmp-writingnow.gxc"  # another process writing at this moment
    writing.write_bytes(b"being written")

    assert gx.clear_cache(cache) == 0  # nothing expired yet
    assert len(entries(cache)) == 3 and not leftover.exists()
    assert writing.exists(), "a temporary file being written now must not be deleted"
    writing.unlink()
    clock.now += 45
    assert gx.clear_cache(cache) == 1  # the 30 s one
    clock.now += 15
    assert gx.clear_cache(cache, expired_only=True) == 1  # the 60 s one
    assert len(entries(cache)) == 1
    assert gx.clear_cache(cache, expired_only=False) == 1
    assert entries(cache) == []
    assert gx.clear_cache(tmp_path / "does-not-exist") == 0

    graph.compute(scheduler="sync", cache_dir=cache)  # and the cache still works
    assert len(entries(cache)) == 3


@pytest.mark.timeout(30)
def test_clear_cache_keeps_an_entry_being_computed_and_its_lock(tmp_path):
    # A run computing the entry again (refresh) holds its lock: the entry stays, and
    # the lock still excludes others (there is no lock file that clearing could delete).
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    graph = gx.Graph()
    with graph:
        square(str(counter), 5)
    graph.compute(scheduler="sync", cache_dir=cache)
    (key,) = entries(cache)
    computing = _cache.CacheStore(cache)
    assert computing.try_lock(key)
    try:
        assert gx.clear_cache(cache, expired_only=False) == 0
        assert entries(cache) == [key]
        assert not _cache.CacheStore(cache).try_lock(key), "the lock must still exclude"
    finally:
        computing.unlock_all()
    assert gx.clear_cache(cache, expired_only=False) == 1
    other = _cache.CacheStore(cache)
    assert other.try_lock(key)
    other.unlock_all()


@pytest.mark.timeout(30)
def test_default_cache_dir_is_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    counter = tmp_path / "calls"
    for expected in ("Completed", "Cached"):
        graph = gx.Graph()
        with graph:
            node = square(str(counter), 11)
        run = graph.compute(scheduler="sync")
        assert run.state(node).name == expected
    assert len(entries(tmp_path / ".graphexec-cache")) == 1
    assert gx.clear_cache(expired_only=False) == 1
    assert entries(tmp_path / ".graphexec-cache") == []


@pytest.mark.timeout(30)
def test_an_entry_pruned_during_the_run_that_loaded_it_still_serves_that_run(tmp_path):
    """A prune (or another run's refresh) while a run holds a hit it has not used yet."""
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    graph, array, *_ = _array_graph(counter)
    expected = graph.compute(array, scheduler="sync", cache_dir=cache)[array].copy()

    graph = gx.Graph()
    with graph:
        array = make_array(str(counter), 1)
        pruned = prune(str(cache), wait_for=[array])
        after = consume_in_place(array, wait_for=[pruned])
    run = graph.compute(array, after, scheduler="sync", cache_dir=cache, raise_on_failure=False)
    assert run.state(array).is_cached()
    assert run.state(after).name == "Completed", run.state(after).message
    assert run[after] == pytest.approx(float(expected.sum(dtype="float64")) + expected.size)


@gx.task
def prune(cache_dir):
    import graphexec as gx

    return gx.clear_cache(cache_dir, expired_only=False)


# -- shared memory and processes -------------------------------------------------------------


def _my_segments() -> set[str]:
    prefix = f"gx-{os.getpid()}-"
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}
    except FileNotFoundError:
        return set()


@pytest.mark.timeout(30)
def test_cached_runs_leave_nothing_in_dev_shm(tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    before = _my_segments()
    for expected in ("Completed", "Cached"):
        graph = gx.Graph()
        with graph:
            arrays = [make_array(str(counter), seed) for seed in range(4)]
            sums = [consume_in_place(a) for a in arrays]
        run = graph.compute(*arrays, *sums, workers=2, cache_dir=cache)
        assert names(run, arrays) == [expected] * 4
        assert _my_segments() - before == set()
    assert len(calls(counter)) == 4


def test_a_node_that_cannot_be_keyed_is_warned_of_at_the_users_line(tmp_path):
    # The warning pointed into graphexec (_engine/caching.py), not at the compute.
    @gx.task(cache=True)
    def takes(x):
        return 1

    graph = gx.Graph()
    with graph:
        takes(threading.Lock())
    with pytest.warns(RuntimeWarning, match="is not cached") as caught:
        graph.compute(scheduler="sync", cache_dir=tmp_path)
    assert {w.filename for w in caught} == {__file__}


def test_a_thread_that_looked_entries_up_leaves_no_open_connection(tmp_path, monkeypatch):
    # Each thread has its own SQLite connection; one left to the garbage collector
    # when its thread ended was a ResourceWarning on Python 3.13 ("unclosed database"),
    # an error under pytest's -W error, for every thread that ran a cached compute.
    made = []
    connect = sqlite3.connect

    def recording(database, *args, **kwargs):
        conn = connect(database, *args, **kwargs)
        if database != ":memory:":  # (a new directory's database is made in memory)
            made.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", recording)

    @gx.task(cache=True)
    def square(x):
        return x * x

    def run():
        graph = gx.Graph()
        with graph:
            nodes = [square(i) for i in range(3)]
        run = graph.compute(scheduler="sync", cache_dir=tmp_path)
        assert [run[n] for n in nodes] == [0, 1, 4]

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    del thread
    gc.collect()
    # (the store's own threads, the flusher and the syncer, keep theirs while they live)
    assert any(_closed(c) for c in made), "the ended thread's connection is still open"


def _closed(conn):
    try:
        conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False
