"""The cache gate (``_engine/caching.py``): keys off the scheduler thread, bounded
lock waits, and keys that fall back to a value's bytes say so (issue #12, defects 4,
7 and 8).

Each test uses its own cache directory under ``tmp_path``; nothing is shared.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import graphexec as gx
from graphexec._data import cache as _cache
from graphexec._data.serialize import dumps_value
from graphexec._engine import caching as _caching
from graphexec._model import keys

# -- defect 7: keys are computed off the scheduler thread ---------------------------

KEY_SECONDS = 3.0  # as long as hashing a 500 MB upstream array takes on a slow disk


def slow_key(context: object, arguments: dict) -> str:
    """A cache_key_fn that takes seconds, as hashing a huge upstream value does."""
    time.sleep(KEY_SECONDS)
    return f"slow-key-{arguments['x']}"


@gx.task(timeout=1)
def overruns(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@gx.task
def quick(x: int) -> int:
    time.sleep(0.3)  # finishes once `overruns` has started: its key is hashed meanwhile
    return x


@gx.task(cache_key_fn=slow_key)
def keyed_after(x: int) -> int:
    return x + 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheduler", ["processes", "threads"])
def test_a_timeout_is_kept_while_another_nodes_key_takes_seconds(compute, tmp_path):
    graph = gx.Graph()
    with graph:
        late = overruns(5)
        keyed = keyed_after(quick(1))
    run = compute(graph, cache_dir=tmp_path / "cache", raise_on_failure=False)
    assert run[keyed] == 2
    state = run.state(late)
    assert state.name == "Failed" and isinstance(state.exception, gx.TaskTimeout)
    attempt = state.history[-1]
    # The deadline is 1 s after the attempt started; the scheduler may take up to a
    # second more to notice, not the KEY_SECONDS the key takes.
    assert attempt.finished - attempt.started < 2.0, attempt.duration


# -- defect 4: waiting for an entry another process holds is bounded ----------------

HELD_KEY = "held-by-another-process"

HOLD_LOCK = """
import sys
from graphexec._data.cache import CacheStore
store = CacheStore(sys.argv[1])
assert store.try_lock(sys.argv[2])  # what a run computing the entry holds
print("locked", flush=True)
sys.stdin.read()  # holds the lock until the test closes our stdin
"""
WORKTREE = Path(__file__).resolve().parents[1]


def hold_lock(cache: Path, key: str) -> subprocess.Popen:
    """Another process that holds ``key``'s compute lock until its stdin is closed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(cache), key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(WORKTREE)),
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    return holder


def held_key(context: object, arguments: dict) -> str:
    return HELD_KEY


@gx.task(cache_key_fn=held_key)
def computes_a_held_entry(x: int) -> int:
    return x * 10


@pytest.mark.timeout(60)
def test_a_wait_for_an_entry_another_process_holds_is_bounded_and_names_it(
    compute, tmp_path, monkeypatch, caplog
):
    cache = tmp_path / "cache"
    store = _cache.CacheStore(cache)
    holder = hold_lock(cache, HELD_KEY)
    try:
        monkeypatch.setenv("GRAPHEXEC_CACHE_LOCK_WAIT", "1")
        caplog.set_level(logging.INFO, logger="graphexec")
        graph = gx.Graph()
        with graph:
            node = computes_a_held_entry(4)
        started = time.monotonic()
        run = compute(graph, cache_dir=cache)
        waited = time.monotonic() - started
        assert run.state(node).name == "Completed" and run[node] == 40
        assert 1.0 <= waited < 10.0
        assert not store.has(HELD_KEY), "the holder's entry is not ours to write"
        starts = [r for r in caplog.records if "waits for cache entry" in r.getMessage()]
        assert len(starts) == 1 and f"process {holder.pid}" in starts[0].getMessage()
        gave_up = [r for r in caplog.records if "without the cache" in r.getMessage()]
        assert len(gave_up) == 1 and gave_up[0].levelno == logging.WARNING
        assert f"process {holder.pid}" in gave_up[0].getMessage()
        assert "GRAPHEXEC_CACHE_LOCK_WAIT" in gave_up[0].getMessage()
        # ... and the run's summary says what the wait cost, and for whom.
        summary = run.summary()
        assert "Waits for cache entries other processes held:" in summary
        assert f"{node.name}: waited " in summary
        assert f"held by process {holder.pid}, then computed it without the cache" in summary
    finally:
        holder.communicate(timeout=10)  # closes its stdin: it exits, the lock goes
    # Once the holder is gone the entry is computed and written as usual.
    graph = gx.Graph()
    with graph:
        node = computes_a_held_entry(4)
    assert compute(graph, cache_dir=cache).state(node).name == "Completed"
    assert store.has(HELD_KEY)


def test_the_lock_wait_bound_comes_from_the_environment(monkeypatch, caplog):
    monkeypatch.delenv("GRAPHEXEC_CACHE_LOCK_WAIT", raising=False)
    assert _caching.lock_wait_bound() == _caching.LOCK_WAIT == 600.0
    monkeypatch.setenv("GRAPHEXEC_CACHE_LOCK_WAIT", "2.5")
    assert _caching.lock_wait_bound() == 2.5
    monkeypatch.setenv("GRAPHEXEC_CACHE_LOCK_WAIT", "soon")
    assert _caching.lock_wait_bound() == 600.0
    assert "GRAPHEXEC_CACHE_LOCK_WAIT='soon'" in caplog.text


@pytest.mark.timeout(30)
def test_the_holder_of_a_lock_is_read_from_the_system(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("F_GETLK's struct layout is Linux's here")
    cache = tmp_path / "cache"
    store = _cache.CacheStore(cache)
    holder = hold_lock(cache, "some-entry-key")
    try:
        # Alone in the directory, it keeps its locks in memory; asking does not make it
        # yield them (cache ls must not slow a run down): unknown.
        assert store.holder("some-entry-key") == -1
        deadline = time.monotonic() + 10
        while not store.try_lock("another-key"):  # this process joins: it yields
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert store.holder("some-entry-key") == holder.pid
        assert not store.try_lock("some-entry-key")
        store.unlock("another-key")
    finally:
        holder.communicate(timeout=10)
    assert store.holder("some-entry-key") is None  # its process ended: the OS let go
    assert store.try_lock("some-entry-key")
    try:
        assert store.holder("some-entry-key") == os.getpid()
    finally:
        store.unlock_all()
    assert store.holder("some-entry-key") is None


# -- defect 8: a key that falls back to a value's bytes says so ----------------------


def _rebuild_only_in_a_worker(label: str) -> Refuses:
    if multiprocessing.parent_process() is None:  # the test process: refuse
        raise RuntimeError("this value cannot be rebuilt here")
    return Refuses(label)


class Refuses:
    """Travels between workers, refuses to unpickle in the parent."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __reduce__(self) -> tuple:
        return (_rebuild_only_in_a_worker, (self.label,))


@gx.task
def makes_a_refusing_value() -> Refuses:
    return Refuses("made in a worker")


@gx.task(cache=True)
def keyed_on_a_refusing_value(value: Refuses, n: int) -> str:
    return f"{value.label} {n}"


@pytest.mark.timeout(30)
def test_an_upstream_value_hashed_as_bytes_warns_once_per_task(pool, tmp_path, monkeypatch):
    monkeypatch.setattr(_cache, "_warned_bytes_keys", set(), raising=False)
    graph = gx.Graph()
    with graph:
        value = makes_a_refusing_value()
        keyed = [keyed_on_a_refusing_value(value, n) for n in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = graph.compute(pool=pool, cache_dir=tmp_path / "cache")
    assert [run[k] for k in keyed] == [f"made in a worker {n}" for n in range(3)]
    said = [w for w in caught if "hashed the value's pickled bytes" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    text = str(said[0].message)
    assert said[0].category is RuntimeWarning
    assert "keyed_on_a_refusing_value" in text and "cannot be rebuilt here" in text
    assert "cache_key_fn" in text  # what to do


def _exit_when_loaded() -> None:
    sys.exit(3)


class ExitsWhenLoaded:
    def __reduce__(self) -> tuple:
        return (_exit_when_loaded, ())


def test_wire_hash_falls_back_to_bytes_even_when_unpickling_exits(monkeypatch):
    monkeypatch.setattr(_cache, "_warned_bytes_keys", set(), raising=False)
    wire = (pickle.dumps(ExitsWhenLoaded()), ())
    with pytest.warns(RuntimeWarning, match="SystemExit") as caught:
        first = _cache.wire_hash(wire, "some_task")
        assert _cache.wire_hash(wire, "some_task") == first
    assert len(caught) == 1
    with pytest.warns(RuntimeWarning, match="other_task"):
        _cache.wire_hash(wire, "other_task")


def test_wire_hash_of_a_plain_value_is_by_content_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cache.wire_hash(dumps_value({"a": {1, 2, 3}})) == _cache.content_hash(
            {"a": {3, 2, 1}}
        )


def test_keys_are_the_same_from_one_release_to_the_next():
    # Pinned digests (those of the graphexec that wrote today's cache directories):
    # a change in how arguments are hashed would silently recompute every entry,
    # and a faster hash for the few bytes of a scalar (#19) must give the same keys.
    arguments = {"a": 1, "b": "x", "c": 2.5, "d": None, "e": True, "f": 2**70, "g": -3, "h": 1 + 2j}
    assert keys.input_hash("mod.task:src", arguments) == (
        "c652704bc9344644beee94139febd9edc0c4e8ac260e211c72ba525c4ccbbd2f"
    )
    assert keys.content_hash([1, "x", {"k": 2}]) == (
        "9b68da591c14c89f312b51b18f7d9d8d20ba274d22d6b4f317508b08f565f8c3"
    )


@gx.task(cache=True)
def one_argument(i):
    return i


@gx.task(cache=True)
def two_arguments(a, b):
    return a, b


@gx.task(cache=True)
def with_a_default(a, b=3):
    return a, b


def test_a_parameter_sweeps_keys_are_the_general_paths():
    # The gate keys a sweep's nodes (no upstream, a few scalars) without the general
    # path (_flat_key, with a shortcut for one argument): the same keys, or the
    # entries written by one path would be missed by the other.
    graph = gx.Graph()
    with graph:
        nodes = [
            one_argument(7),
            one_argument("x"),
            two_arguments(1, 2.5),
            with_a_default(1),
            with_a_default(1, 4),
        ]
    gate = _caching.CacheGate(
        graph, [None] * len(nodes), None, False, lambda i: None, lambda: None, False
    )
    expected = [
        keys.input_hash(keys.task_identity(one_argument), {"i": 7}),
        keys.input_hash(keys.task_identity(one_argument), {"i": "x"}),
        keys.input_hash(keys.task_identity(two_arguments), {"a": 1, "b": 2.5}),
        keys.input_hash(keys.task_identity(with_a_default), {"a": 1, "b": 3}),
        keys.input_hash(keys.task_identity(with_a_default), {"a": 1, "b": 4}),
    ]
    assert [gate._flat_key(node.index) for node in nodes] == expected
