"""The cache store at scale (issue #19): layout 3, its crash behaviour and its bounds.

* SIGKILL of the parent, and of a worker, while entries are being written: a
  rerun finds only whole entries, with the right values, and recomputes the rest.
* A writer killed inside its transaction leaves nothing; a large entry's file
  without its row is never read, and pruning deletes it once it is old.
* Two processes racing on one key compute it once.
* 1,000 small entries take at most ~1 KB each on disk beyond their bytes, and
  leave no file per key.
* A directory of the old layout is never misread: a warning, then recompute.
* Damage inside the database file is detected, reported and recomputed.
* A run holds at most ``WINDOW`` locks for nodes that have not finished, and
  every batched row is committed when ``compute()`` returns.

Subprocess scripts import graphexec from this checkout (``PYTHONPATH``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import psutil
import pytest

import graphexec as gx
from graphexec._data import cache as _cache
from graphexec._engine import caching as _caching
from graphexec._model import keys as _keys

WORKTREE = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(WORKTREE))


def rows(cache: Path) -> dict[str, str]:
    """key -> task of the committed rows, read with sqlite3 alone (another process)."""
    db = cache / _cache.DB_NAME
    if not db.exists():
        return {}
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT key, task FROM entries").fetchall())
    finally:
        conn.close()


def integrity(cache: Path) -> str:
    conn = sqlite3.connect(cache / _cache.DB_NAME)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def counted(counter: Path) -> list[str]:
    return counter.read_text().splitlines() if counter.exists() else []


# -- crashes in the middle of writes --------------------------------------------------

SWEEP = """\
import json, sys
import numpy as np
import graphexec as gx
from graphexec._data import cache

COUNTER, CACHE, N, BIG = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "big"
cache.BATCH_MAX_ALONE = 128  # several batches committed before the kill, not one at the end


@gx.task(cache=True)
def value(i, counter, big):
    with open(counter, "a") as f:
        f.write(f"{i}\\n")
    if big:
        return np.full(40_000, float(i))  # 320 kB: a file, written by the worker
    return i * i


graph = gx.Graph()
with graph:
    nodes = [value(i, COUNTER, BIG) for i in range(N)]
run = graph.compute(workers=2, cache_dir=CACHE, raise_on_failure=False)
values = [run[n] if run.state(n).is_completed() else None for n in nodes]
if BIG:
    values = [None if v is None else float(v[0]) for v in values]
print(json.dumps({"counts": run.counts(), "values": values}), flush=True)
"""


def _start_sweep(script: Path, counter: Path, cache: Path, n: int, big: bool) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(counter), str(cache), str(n), "big" if big else ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=script.parent,
    )


def _wait_for_rows(cache: Path, proc: subprocess.Popen, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(rows(cache)) >= at_least:
                return
        except sqlite3.Error:
            pass  # the database is being created
        time.sleep(0.01)
    raise AssertionError(f"no {at_least} rows before the sweep ended: {proc.poll()}")


def _check_rerun(script: Path, counter: Path, cache: Path, n: int, big: bool) -> dict:
    """Rerun the sweep: every value right, every entry whole, only the missing ones run."""
    store = _cache.CacheStore(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt or partial entry would warn
        listed = store.entries()
        assert all(e.readable for e in listed), [e.key for e in listed if not e.readable]
    assert integrity(cache) == "ok"
    before = len(counted(counter))
    done = _start_sweep(script, counter, cache, n, big)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert "corrupt" not in err and "Traceback" not in err, err
    result = json.loads(out)
    expected = [float(i) for i in range(n)] if big else [i * i for i in range(n)]
    assert result["values"] == expected
    cached = result["counts"].get("Cached", 0)
    assert cached == len(listed)  # every committed entry is a hit
    assert len(counted(counter)) - before == n - cached  # only the others ran
    return result


@pytest.mark.timeout(180)
def test_sigkill_of_the_parent_mid_writes_leaves_only_whole_entries(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP)
    counter, cache, n = tmp_path / "calls", tmp_path / "cache", 3000
    proc = _start_sweep(script, counter, cache, n, big=False)
    try:
        _wait_for_rows(cache, proc, 300)  # batches are being committed now
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    psutil.wait_procs(children, timeout=10)
    committed = len(rows(cache))
    assert 300 <= committed < n, committed  # killed mid-run
    _check_rerun(script, counter, cache, n, big=False)


@pytest.mark.timeout(180)
def test_sigkill_of_a_worker_mid_writes_leaves_only_whole_entries(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP)
    counter, cache, n = tmp_path / "calls", tmp_path / "cache", 150
    proc = _start_sweep(script, counter, cache, n, big=True)
    try:
        _wait_for_rows(cache, proc, 10)  # workers are writing large entries now
        workers = [  # the children of graphexec's forkserver or zygote
            worker
            for child in psutil.Process(proc.pid).children()
            if "forkserver" in " ".join(child.cmdline()) or child.name() == "gx-zygote"
            for worker in child.children()
            if worker.name() != "gx-spare"  # (a worker forked ahead, not yet a pool's)
        ]
        assert workers
        for worker in workers:  # both: whichever is in the middle of a write
            worker.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert sum(json.loads(out)["counts"].values()) == n  # the calls they ran failed
    _check_rerun(script, counter, cache, n, big=True)


KILLED_IN_TRANSACTION = """\
import os, signal, sys
from graphexec._data.cache import CacheStore
store = CacheStore(sys.argv[1])
conn = store._shared.conn()
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO entries VALUES ('halfway', 't', 0, NULL, 1, 0, x'00')")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_inside_its_transaction_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    store = _cache.CacheStore(cache)
    store.write_value("whole", 42, {"task": "t", "expires": None})
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_IN_TRANSACTION, str(cache)], env=ENV, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL
    assert rows(cache) == {"whole": "t"}
    assert store.lookup("halfway") is None and store.lookup("whole").load() == 42
    store.write_value("after", 7, {"task": "t", "expires": None})  # no lock left behind
    assert store.lookup("after").load() == 7


def test_a_large_entrys_file_without_its_row_is_never_read_and_then_pruned(tmp_path):
    cache = tmp_path / "cache"
    store = _cache.CacheStore(cache)
    store.write_value("big-entry", np.arange(50_000.0), {"task": "t", "expires": None})
    conn = sqlite3.connect(cache / _cache.DB_NAME)
    with conn:  # as if its writer died between the rename and the commit
        conn.execute("DELETE FROM entries")
    conn.close()
    path = store.path("big-entry")
    assert path.exists() and store.lookup("big-entry") is None
    assert gx.clear_cache(cache) == 0 and path.exists()  # young: a writer may commit yet
    old = time.time() - 2 * _cache.STALE_TMP
    os.utime(path, (old, old))
    gx.clear_cache(cache)
    assert not path.exists()


# -- two processes, one key ----------------------------------------------------------

RACE = """\
import sys, time
import graphexec as gx

COUNTER, CACHE = sys.argv[1], sys.argv[2]


@gx.task(cache=True)
def slow(counter):
    with open(counter, "a") as f:
        f.write("slow\\n")
    time.sleep(0.5)
    return 1234


graph = gx.Graph()
with graph:
    node = slow(COUNTER)
run = graph.compute(workers=1, cache_dir=CACHE)
print(run.state(node).name, run[node], flush=True)
"""


@pytest.mark.timeout(90)
def test_two_processes_racing_on_one_key_compute_it_once(tmp_path):
    script = tmp_path / "race.py"
    script.write_text(RACE)
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(counter), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for _ in range(3)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outs.append(out.split())
    assert counted(counter) == ["slow"]
    assert sorted(name for name, _ in outs) == ["Cached", "Cached", "Completed"]
    assert {value for _, value in outs} == {"1234"}


NEWCOMER = """\
import sys, time
from graphexec._data.cache import CacheStore
store = CacheStore(sys.argv[1])
started = time.monotonic()
while not store.try_lock(sys.argv[2]) and store._shared.mode == 0:  # not let in yet
    time.sleep(0.01)
print(store.try_lock(sys.argv[2]), store.holder(sys.argv[2]), time.monotonic() - started,
      flush=True)
"""


@pytest.mark.timeout(60)
def _newcomer(cache: Path, key: str) -> subprocess.CompletedProcess:
    """Run NEWCOMER, another process that tries ``key``'s lock in ``cache``."""
    return subprocess.run(
        [sys.executable, "-c", NEWCOMER, str(cache), key],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )


def test_a_process_alone_keeps_its_locks_in_memory_and_yields_them_to_a_newcomer(tmp_path):
    cache = tmp_path / "cache"
    store = _cache.CacheStore(cache)
    shared = store._shared
    assert store.try_lock("mine")
    assert shared.mode == _cache._ALONE and shared.held["mine"] == -1  # not in the file
    newcomer = _newcomer(cache, "mine")
    assert newcomer.returncode == 0, newcomer.stderr
    # It waited for this process to put its lock in the file (not JOIN_WAIT: then it
    # would have gone ahead), then saw it taken, by us.
    assert newcomer.stdout.split()[:2] == ["False", str(os.getpid())]
    assert float(newcomer.stdout.split()[2]) < _cache.JOIN_WAIT
    assert shared.mode == _cache._JOINED and shared.held["mine"] == _cache._offset("mine")
    store.unlock_all()  # the run is over: this process stops announcing itself
    assert shared.mode == _cache._OUT and not shared.present and not shared.held
    # Alone again (the newcomer is gone), with a flusher that was idle: it watches again.
    assert store.try_lock("mine") and shared.mode == _cache._ALONE
    again = _newcomer(cache, "mine")
    assert again.stdout.split()[:2] == ["False", str(os.getpid())], again.stderr
    assert float(again.stdout.split()[2]) < _cache.JOIN_WAIT
    store.unlock_all()


ALONE_THEN_STOPPED = """\
import sys
from graphexec._data.cache import CacheStore
store = CacheStore(sys.argv[1])
assert store.try_lock(sys.argv[2])
print("alone", flush=True)
sys.stdin.readline()
print(store._shared.mode, flush=True)
"""


def _alone_and_stopped(cache: Path, key: str) -> subprocess.Popen:
    """A process alone in ``cache``, holding ``key``'s lock (in its memory), stopped
    (SIGSTOP: its watcher cannot yield); a line on its stdin, once it runs again,
    makes it print its mode."""
    alone = subprocess.Popen(
        [sys.executable, "-c", ALONE_THEN_STOPPED, str(cache), key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert alone.stdout is not None and alone.stdout.readline().strip() == "alone"
    os.kill(alone.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while psutil.Process(alone.pid).status() != psutil.STATUS_STOPPED:  # delivered
        assert time.monotonic() < deadline, "SIGSTOP did not stop the alone process"
        time.sleep(0.005)
    return alone


def _who(store: _cache._Shared, key: str, alone: subprocess.Popen) -> str:
    """What a failed assertion needs: who holds ``key`` in the file, the alone
    process's state."""
    return (
        f"{key} held in the file by {store.file_holder(key)}; the alone process "
        f"{alone.pid} is {psutil.Process(alone.pid).status()}"
    )


def _end(alone: subprocess.Popen) -> str:
    os.kill(alone.pid, signal.SIGCONT)
    out, _ = alone.communicate("mode\n", timeout=30)
    return out.strip()


# Review of the "alone" protocol (#19), defect 2: a newcomer slept up to JOIN_WAIT on
# its scheduler's thread under the mutex at every call while an alone process did not
# yield, and after that waited for it per node (LOCK_WAIT, 600 s by default).


@pytest.mark.timeout(60)
def test_a_newcomer_never_sleeps_for_a_stopped_alone_process_and_goes_ahead_after_join_wait(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(_cache, "JOIN_WAIT", 1.0)
    cache = tmp_path / "cache"
    alone = _alone_and_stopped(cache, "theirs")
    try:
        store = _cache.CacheStore(cache)
        started = time.monotonic()
        assert store.try_lock_many(["theirs", "mine"]) == [False, False]  # not let in yet
        assert store.quiet_epoch() is None
        assert store.holder("theirs") == -1  # it may be computing it: unknown
        assert store.holder("mine") == -1
        # Nothing slept on the caller's thread: a sleep would last JOIN_WAIT (1 s).
        assert time.monotonic() - started < 0.9
        time.sleep(1.1)  # past JOIN_WAIT since this process knocked
        started = time.monotonic()
        # It went ahead, locking in the file: "theirs" may be computed twice, never wrong.
        got = store.try_lock_many(["theirs", "mine"])
        assert got == [True, True], _who(store._shared, "theirs", alone)
        assert time.monotonic() - started < 0.9
        assert store._shared.mode == _cache._JOINED
        assert store.holder("other") == -1  # the stopped process is still alone
        os.kill(alone.pid, signal.SIGCONT)  # it sees this one and yields
        deadline = time.monotonic() + 10
        while store.holder("other") == -1:
            assert time.monotonic() < deadline, "the alone process never yielded"
            time.sleep(0.02)
        assert store.holder("other") is None
        assert store.holder("mine") == os.getpid()
        store.unlock_all()
        assert store._shared.mode == _cache._OUT and not store._shared.present
    finally:
        assert _end(alone) == str(_cache._JOINED)


@gx.task(cache=True)
def plus_one(x: int) -> int:
    return x + 1


@gx.task
def plain(x: int) -> int:
    return x


@pytest.mark.timeout(60)
def test_a_run_beside_a_stopped_alone_process_waits_join_wait_at_most(tmp_path, monkeypatch):
    monkeypatch.setattr(_cache, "JOIN_WAIT", 0.5)
    monkeypatch.setenv("GRAPHEXEC_CACHE_LOCK_WAIT", "30")  # the reviewer's run took 8 s at 6
    cache = tmp_path / "cache"
    alone = _alone_and_stopped(cache, "unrelated")
    try:
        graph = gx.Graph()
        with graph:
            nodes = [plus_one(i) for i in range(20)]
            other = plain(0)
        started = time.monotonic()
        run = graph.compute(scheduler="sync", cache_dir=cache)
        took = time.monotonic() - started
        assert [run[n] for n in nodes] == list(range(1, 21)) and run[other] == 0
        assert took < 0.5 + 3  # JOIN_WAIT, a look (LOCK_POLL) and the run: not LOCK_WAIT
        again = graph.compute(scheduler="sync", cache_dir=cache)
        assert {again.state(n).name for n in nodes} == {"Cached"}
    finally:
        _end(alone)


@pytest.mark.timeout(60)
def test_listing_beside_a_stopped_alone_process_neither_waits_nor_makes_it_yield(tmp_path):
    cache = tmp_path / "cache"
    store = _cache.CacheStore(cache)
    for k in range(5):
        store.put(f"entry{k}", pickle.dumps(k), {"task": "t"})  # no lock: committed now
    alone = _alone_and_stopped(cache, "entry0")
    try:
        started = time.monotonic()
        listed = store.entries()
        assert time.monotonic() - started < 0.5  # JOIN_WAIT (2 s) was waited per listing
        assert len(listed) == 5 and not any(e.held for e in listed)  # its lock: unseen
        assert store.alone_elsewhere() == alone.pid  # which `cache ls` says
        assert not store._shared.present  # this process did not announce itself
    finally:
        assert _end(alone) == str(_cache._ALONE)  # never made to yield


@pytest.mark.timeout(60)
def test_a_yield_commits_the_batch_first_so_only_running_nodes_locks_go_in_the_file(
    tmp_path, monkeypatch
):
    # Review defect 3: the window's locks and the whole batch's (up to ~20,000 keys)
    # went into the lock file under the mutex, at a cost quadratic in their number.
    monkeypatch.setattr(_cache, "BATCH_DELAY_ALONE", 60.0)  # the batch waits for the yield
    cache = tmp_path / "cache"
    store = _cache.CacheStore(cache)
    shared = store._shared
    keys = [f"{i:064x}" for i in range(3000)]
    assert all(store.try_lock_many(keys)) and shared.mode == _cache._ALONE
    for key in keys[:2500]:  # finished: their locks go once their rows are committed
        store.put(key, pickle.dumps(key), {"task": "t"}, release=True)
    assert len(shared.pending) == 2500
    put_in_file = []
    to_yield = shared._yield

    def spy() -> None:
        put_in_file.append(sum(offset < 0 for offset in shared.held.values()))
        to_yield()

    monkeypatch.setattr(shared, "_yield", spy)
    newcomer = _newcomer(cache, "other")
    assert newcomer.returncode == 0, newcomer.stderr
    assert put_in_file == [500]  # the running nodes' locks only (3,000 before)
    assert shared.mode == _cache._JOINED and not shared.pending
    assert len(store.rows(keys)) == 2500  # committed before the newcomer came in
    store.unlock_all()


def test_a_batched_row_replaced_or_deleted_lets_go_of_its_lock_at_once(tmp_path, monkeypatch):
    # Review defect 6: its key stayed locked until a later commit.
    monkeypatch.setattr(_cache, "BATCH_DELAY_ALONE", 60.0)  # no commit meanwhile
    monkeypatch.setattr(_cache, "BATCH_DELAY", 60.0)
    store = _cache.CacheStore(tmp_path / "cache")
    shared = store._shared
    data = pickle.dumps(1)
    for key in ("replaced", "deleted"):
        assert store.try_lock(key)
        store.put(key, data, {"task": "t"}, release=True)  # let go once committed
        assert key in shared.held and key in shared.pending
    store.write("replaced", cloudpickle.dumps(2), [], {"task": "t"})  # a large entry
    assert "replaced" not in shared.held and "replaced" not in shared.pending
    assert store.lookup("replaced").load() == 2
    shared.delete("deleted", _cache._crc("deleted", data))  # as a corrupt entry is
    assert "deleted" not in shared.held and "deleted" not in shared.pending
    assert store.try_lock("deleted")  # free for this process's next run
    store.unlock_all()


def test_alone_a_miss_is_looked_up_again_only_if_its_key_was_let_go_of_meanwhile(
    tmp_path, monkeypatch
):
    # A process alone in the directory looks a miss up again under its lock only if
    # this process let go of that key since the first look (its row may be committed
    # now): let_go_since names those keys; a change of mode means any key.
    store = _cache.CacheStore(tmp_path / "cache")
    keys = ["a", "b", "c"]
    epoch = store.quiet_epoch()
    assert epoch is not None and store.let_go_since(keys, epoch) == []
    assert store.rows(keys) == {}  # all miss at that epoch
    # Another run of this process computes "a" meanwhile and lets go of it.
    assert store.try_lock("a")
    store.put("a", pickle.dumps(1), {"task": "t"}, release=True)
    assert store.let_go_since(keys, epoch) == []  # held until its row is committed
    store.flush()
    assert store.let_go_since(keys, epoch) == ["a"]  # "b" and "c" need no second look
    assert store.try_lock("b")
    store.unlock("b")  # a hit's lock: let go of at once
    assert store.let_go_since(keys, epoch) == ["a", "b"]
    later = store.quiet_epoch()
    assert later is not None and store.let_go_since(keys, later) == []
    assert store.let_go_since(keys, None) == keys  # missed while not alone: all
    store.unlock_all()  # the run ends: no longer alone
    assert store.let_go_since(keys, later) == keys
    # More keys let go of than it remembers: an older miss looks again, once.
    monkeypatch.setattr(_cache, "LET_GO_KEPT", 8)
    fresh = _cache.CacheStore(tmp_path / "cache")
    start = fresh.quiet_epoch()
    assert start is not None
    for k in range(9):
        assert fresh.try_lock(f"k{k}")
        fresh.unlock(f"k{k}")
    assert fresh.let_go_since(["x"], start) == ["x"]
    now = fresh.quiet_epoch()
    assert now is not None
    assert fresh.try_lock("k9")
    fresh.unlock("k9")
    assert fresh.let_go_since(["x", "k9"], now) == ["k9"]  # newer misses: as before
    fresh.unlock_all()


WRITER = """
import sys
import cloudpickle
from graphexec._data.cache import CacheStore
CacheStore(sys.argv[1]).write(sys.argv[2], cloudpickle.dumps(5), [], {"task": "t"})
"""


def test_alone_in_a_new_directory_a_miss_costs_no_query_and_every_write_is_found(
    tmp_path, monkeypatch
):
    # Alone since the directory was empty, only keys this process locked or wrote
    # can have an entry: others miss without a query (a sweep's first run).
    cache = tmp_path / "cache"
    store = _cache.CacheStore(cache)
    assert store.quiet_epoch() is not None and store._shared.fresh == set()
    asked: list[int] = []
    select = _cache._select
    monkeypatch.setattr(_cache, "_select", lambda n: asked.append(n) or select(n))
    assert store.rows(["a", "b"]) == {} and asked == []
    assert store.try_lock("a")
    # A worker process writes "a" (a large entry) under this process's lock.
    subprocess.run([sys.executable, "-c", WRITER, str(cache), "a"], check=True, env=ENV, timeout=60)
    assert set(store.rows(["a", "b"])) == {"a"} and asked == [1]
    assert store.lookup("a").load() == 5
    store.put("c", pickle.dumps(6), {"task": "t"})  # without a lock: committed at once
    assert set(store.rows(["b", "c"])) == {"c"}
    store.unlock_all()
    # The next run finds entries there: every key is asked for again.
    assert store.quiet_epoch() is not None and store._shared.fresh is None
    asked.clear()
    assert set(store.rows(["a", "b", "c"])) == {"a", "c"} and asked == [3]
    store.unlock_all()


def test_a_directory_used_once_keeps_no_thread_once_idle(tmp_path, monkeypatch):
    # Its flusher and syncer exit after IDLE_EXIT s without work (a notebook that
    # used a hundred directories kept two threads for each), and start again.
    monkeypatch.setattr(_cache, "IDLE_EXIT", 0.2)
    monkeypatch.setattr(_cache, "SYNC_DELAY", 0.05)
    cache = tmp_path / "cache"
    for rerun in (False, True):
        graph = gx.Graph()
        with graph:
            nodes = [small(i) for i in range(50)]
        run = graph.compute(workers=2, cache_dir=cache)  # rows batched by the parent
        assert [run[n] for n in nodes] == [i * 1.5 for i in range(50)]
        assert run.counts() == {"Cached" if rerun else "Completed": 50}
        shared = _cache.CacheStore(cache)._shared
        threads = [t for t in (shared.flusher, shared.syncer) if t is not None]
        assert shared.flusher is not None or rerun  # the first run batched its rows
        deadline = time.monotonic() + 10
        while shared.flusher is not None or shared.syncer is not None:
            assert time.monotonic() < deadline, "the cache threads never exited"
            time.sleep(0.05)
        for thread in threads:
            thread.join(5)
            assert not thread.is_alive()
    assert len(rows(cache)) == 50


def test_a_batch_being_committed_stays_visible_to_lookups(tmp_path, monkeypatch):
    # commit() takes the batch whole ("writing") and a new dict takes the next rows:
    # a lookup during the commit finds the rows either there or in the database.
    monkeypatch.setattr(_cache, "BATCH_DELAY_ALONE", 60.0)
    store = _cache.CacheStore(tmp_path / "cache")
    shared = store._shared
    keys = [f"{i:064x}" for i in range(300)]
    assert all(store.try_lock_many(keys))
    for key in keys:
        store.put(key, pickle.dumps(key), {"task": "t"}, release=True)
    seen: list[int] = []
    write = shared.write

    def spy(rows):  # inside the commit, before its transaction
        assert not shared.pending and len(shared.writing) == 300
        seen.append(len(store.rows(keys)))
        assert store.has(keys[0])
        store.unlock(keys[1])  # already releasing: stays locked until committed
        assert keys[1] in shared.held
        write(rows)

    store.put("late", pickle.dumps(0), {"task": "t"})  # no lock: committed at once
    monkeypatch.setattr(shared, "write", spy)
    store.flush()
    assert seen == [300]
    assert not shared.writing and not shared.held  # every lock let go after the commit
    assert len(store.rows(keys)) == 300
    store.unlock_all()


def test_a_new_database_is_written_whole_through_short_writes(tmp_path, monkeypatch):
    # Review defect 5: os.write's count was not checked (a full disk writes short).
    if not hasattr(sqlite3.Connection, "serialize"):
        pytest.skip("no sqlite3 serialize() before Python 3.11: SQLite creates the database")
    real = os.write
    monkeypatch.setattr(_cache.os, "write", lambda fd, data: real(fd, bytes(data[:1000])))
    db = tmp_path / _cache.DB_NAME
    _cache._create_db(tmp_path, str(db))
    monkeypatch.undo()
    assert db.read_bytes() == _cache._empty_db()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM entries").fetchone() == (0,)
    conn.close()


# -- bounds ---------------------------------------------------------------------------


@gx.task(cache=True)
def small(i):
    return i * 1.5


def test_a_thousand_small_entries_cost_at_most_a_kilobyte_each_and_no_file_per_key(tmp_path):
    cache = tmp_path / "cache"
    graph = gx.Graph()
    with graph:
        for i in range(1000):
            small(i)
    graph.compute(scheduler="sync", cache_dir=cache)
    conn = sqlite3.connect(cache / _cache.DB_NAME)
    (values,) = conn.execute("SELECT sum(length(data)) FROM entries").fetchone()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL is bounded, not per entry
    conn.close()
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files if not p.name.startswith(_cache.DB_NAME)) == [
        _cache.LOCK_NAME
    ]
    on_disk = sum(p.stat().st_size for p in files)
    assert (on_disk - values) / 1000 <= 1024, on_disk


@gx.task(cache=True)
def counted_square(counter, i):
    with open(counter, "a") as f:
        f.write(f"{i}\n")
    return i * i


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheduler", ["processes", "sync", "threads"])
def test_a_run_holds_at_most_window_locks_and_commits_before_it_returns(
    compute, tmp_path, monkeypatch
):
    monkeypatch.setattr(_caching, "WINDOW", 4)
    monkeypatch.setattr(_caching, "WINDOW_ALONE", 4)  # this process is alone here
    held: list[int] = []
    real = _cache._Shared.try_lock_many

    def counting(self, keys):
        taken = real(self, keys)
        held.append(len(self.held) - len(self.release))  # locks of unfinished nodes
        return taken

    monkeypatch.setattr(_cache._Shared, "try_lock_many", counting)
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    graph = gx.Graph()
    with graph:
        nodes = [counted_square(str(counter), i) for i in range(40)]
        twins = [counted_square(str(counter), i) for i in range(5)]  # same keys
    run = compute(graph, cache_dir=cache)
    assert [run[n] for n in nodes + twins] == [i * i for i in range(40)] + [0, 1, 4, 9, 16]
    assert sorted(map(int, counted(counter))) == list(range(40))  # each key once
    assert max(held) <= 4 + 1  # the window, and the lock being taken
    assert len(rows(cache)) == 40  # committed: another process sees them all now


def _gate_of(n: int, tmp_path: Path) -> tuple[list[gx.Node], Any, Any]:
    """n cached nodes, a store in a new directory, and a gate of theirs (driven by
    hand, without a scheduler)."""
    graph = gx.Graph()
    with graph:
        nodes = [small(i) for i in range(n)]
    store = _cache.CacheStore(tmp_path / "cache")
    gate = _caching.CacheGate(
        graph, [None] * len(nodes), store, False, lambda i: None, lambda: None, False
    )
    return nodes, store, gate


def test_no_lock_is_taken_while_more_nodes_hold_locks_than_the_window_allows(tmp_path, monkeypatch):
    # Review defect 4: once a newcomer shrinks the window (WINDOW_ALONE to WINDOW),
    # more nodes than it allows may hold locks; a negative room then locked the first
    # entries and parked only the last ones.
    monkeypatch.setattr(_caching, "WINDOW_ALONE", 4)
    nodes, store, gate = _gate_of(8, tmp_path)
    gate.locked.update(range(100, 110))  # ten nodes holding locks: six too many
    entries = [(n.index, 1, f"key{n.index}") for n in nodes]
    gate.keying.update((i, 1) for i, _, _ in entries)
    out: list = []
    gate._lock_and_look(entries, out)
    # all wait for room, with the epoch they missed at (none: no first look)
    assert out == [] and list(gate.parked) == [(*entry, None) for entry in entries]
    store.unlock_all()


def test_a_miss_whose_key_was_let_go_of_since_its_lookup_is_looked_up_again(tmp_path):
    # Alone, the gate skips the second look under the lock for keys nobody let go of
    # since the first: one that was (another run of this process committed its entry
    # meanwhile) is looked up again and hits, not computed twice.
    nodes, store, gate = _gate_of(2, tmp_path)
    epoch = store.quiet_epoch()
    assert epoch is not None
    entries = [(n.index, 1, f"key{n.index}") for n in nodes]
    assert store.rows([key for _, _, key in entries]) == {}  # the first look: misses
    other = _cache.CacheStore(tmp_path / "cache")  # another run of this process
    assert other.try_lock("key0")
    other.put("key0", pickle.dumps(7), {"task": "small"}, release=True)
    other.flush()  # committed and let go of
    gate.keying.update((i, 1) for i, _, _ in entries)
    out: list = []
    gate._lock_and_look(entries, out, epoch)
    verdicts = dict(out)
    assert verdicts[nodes[0].index].name == "Cached"  # looked up again: found
    assert verdicts[nodes[1].index] is _caching.RUN_NOW  # not let go of: no second look
    store.unlock_all()


def test_a_parked_miss_is_looked_up_again_only_if_its_key_was_let_go_of(tmp_path, monkeypatch):
    # Nodes beyond the window are parked; when room comes they take their locks.
    # They missed at the run's start: alone, only a key let go of since may have an
    # entry (here another run of this process committed one). Before, every parked
    # key was asked again, a query each time the window refilled: most of a
    # 100,000-node first run's misses.
    monkeypatch.setattr(_caching, "WINDOW_ALONE", 4)
    seed = _cache.CacheStore(tmp_path / "cache")  # a directory that is not empty
    assert seed.try_lock("seed")
    seed.put("seed", pickle.dumps(0), {"task": "small"}, release=True)
    seed.unlock_all()
    nodes, store, gate = _gate_of(6, tmp_path)
    entries = [(n.index, 1, f"key{n.index}") for n in nodes]
    gate.keying.update((i, 1) for i, _, _ in entries)
    out: list = []
    gate._settle(entries, out)
    assert store._shared.fresh is None  # so only the epoch can spare the second look
    assert [v for _, v in out] == [_caching.RUN_NOW] * 4 and len(gate.parked) == 2
    other = _cache.CacheStore(tmp_path / "cache")  # another run of this process
    assert other.try_lock("key5")
    other.put("key5", pickle.dumps(7), {"task": "small"}, release=True)
    other.flush()
    asked: list[str] = []
    real_rows = _cache.CacheStore.rows

    def rows(self, keys):
        keys = list(keys)
        asked.extend(keys)
        return real_rows(self, keys)

    monkeypatch.setattr(_cache.CacheStore, "rows", rows)
    gate.locked.clear()  # the first four finished
    verdicts = dict(gate.keyed())
    assert verdicts[nodes[5].index].name == "Cached"  # let go of since: found
    assert verdicts[nodes[4].index] is _caching.RUN_NOW
    assert asked == ["key5"]
    store.unlock_all()


@gx.task(cache=True)
def halved(i):
    return i / 2


def _interrupted_sweep(pool: gx.Pool, tmp_path: Path) -> Path:
    """Four cached nodes computed into a new directory, until a KeyboardInterrupt
    (the caller's patch raises it); the directory."""
    cache = tmp_path / "cache"
    graph = gx.Graph()
    with graph:
        [halved(i) for i in range(4)]
    with pytest.raises(KeyboardInterrupt):
        graph.compute(pool=pool, cache_dir=cache)
    return cache


@pytest.mark.timeout(60)
def test_a_value_finished_just_before_ctrl_c_is_still_stored(pool, tmp_path, monkeypatch):
    # Review defect 1: CacheGate.finished() only appends a process-pool worker's
    # small value to ``finishing``; it is stored at the next keyed(). A Ctrl-C (or any
    # exception) between the two: compute() cancels, unlock_all() lets go of the
    # key, and the completed node's value is never stored. Before, put() batched
    # it at once and unlock_all() committed it.
    real = _caching.CacheGate.finished
    done: list[str] = []

    def finished_then_ctrl_c(self, i, completed):
        real(self, i, completed)
        if completed and not done:
            done.append(self.keys[i])
            raise KeyboardInterrupt  # Ctrl-C arriving right after this node finished

    monkeypatch.setattr(_caching.CacheGate, "finished", finished_then_ctrl_c)
    cache = _interrupted_sweep(pool, tmp_path)
    assert done
    shared = _cache.CacheStore(cache)._shared
    assert not shared.held  # its lock was let go of (no leak here)
    assert done[0] in rows(cache), "the completed node's value was dropped"


def test_a_commit_interrupted_keeps_its_batch(tmp_path, monkeypatch):
    # Review defect 3: commit() moves the batch out of ``pending`` before writing it;
    # a KeyboardInterrupt in write() (the end-of-run commit in unlock_all(), on the
    # main thread; a second Ctrl-C, or the first arriving there) drops the batch for
    # good: no later commit (the flusher, atexit's _commit_all, the next run) has it,
    # ``writing`` keeps serving it to this process's lookups although it is in no
    # database, and its keys stay locked until some later commit. Before, the rows
    # stayed in ``pending`` and the flusher committed them within BATCH_DELAY.
    monkeypatch.setattr(_cache, "BATCH_DELAY_ALONE", 60.0)  # only flush() commits
    cache = tmp_path / "cache"
    store = _cache.CacheStore(cache)
    shared = store._shared
    assert store.try_lock("k")
    store.put("k", pickle.dumps(1), {"task": "t"}, release=True)
    real = _cache._Shared.write

    def interrupted(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(_cache._Shared, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.flush()
    monkeypatch.setattr(_cache._Shared, "write", real)
    store.flush()  # what the flusher, atexit or the next run would do
    try:
        assert "k" in rows(cache), "the interrupted batch was lost"
        assert not getattr(shared, "writing", {}), "a lost batch still serves lookups"
    finally:
        store.unlock_all()


@pytest.mark.timeout(60)
def test_ctrl_c_inside_put_many_leaks_no_lock(pool, tmp_path, monkeypatch):
    # Review defect 2 (a pattern older than put_many, whose window it widened):
    # put_many() takes each key out of the run's locks while it builds the rows, and
    # hands them to enqueue_many() after the loop; a Ctrl-C in between (or an
    # Exception: store_finished()'s handler then unlocks keys the store no longer
    # lists) leaves those keys in ``_Shared.held`` for good: unlock_all() does not
    # know them, leave() then returns early, the process stays alone (flusher never
    # exits), and a later run with the same key waits LOCK_WAIT (600 s) for
    # "this process (another compute)". put() had the same pattern per key.
    def ctrl_c(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(_cache._Shared, "enqueue_many", ctrl_c)
    cache = _interrupted_sweep(pool, tmp_path)
    shared = _cache.CacheStore(cache)._shared
    try:
        assert not shared.held, f"locks never let go of: {sorted(shared.held)}"
        assert shared.mode == _cache._OUT  # the run ended: left the directory
    finally:
        shared.held.clear()
        shared.leave()


# -- the old layout and damage ---------------------------------------------------------


@gx.task(cache=True)
def square_of(counter, x):
    with open(counter, "a") as f:
        f.write("square_of\n")
    return x * x


def test_an_old_layout_directory_is_never_misread(tmp_path, caplog):
    counter = tmp_path / "calls"
    # The key square_of(counter, 3) has, and an old-layout entry for it holding 999.
    scratch = tmp_path / "scratch"
    graph = gx.Graph()
    with graph:
        square_of(str(counter), 3)
    graph.compute(scheduler="sync", cache_dir=scratch)
    (key,) = rows(scratch)
    old = tmp_path / "old"
    writer = _cache.CacheStore(tmp_path / "writer")
    writer.write(key, cloudpickle.dumps(999), [], {"task": "square_of", "expires": None})
    (old / key[:2]).mkdir(parents=True)
    writer.path(key).rename(old / key[:2] / f"{key}.gxc")  # a GXC2 file, as before #19
    (old / key[:2] / f"{key}.lock").touch()

    caplog.set_level(logging.WARNING, logger="graphexec")
    for expected in ("Completed", "Cached"):
        graph = gx.Graph()
        with graph:
            node = square_of(str(counter), 3)
        run = graph.compute(scheduler="sync", cache_dir=old)
        assert (run.state(node).name, run[node]) == (expected, 9)
    said = [r.getMessage() for r in caplog.records if "older graphexec" in r.getMessage()]
    assert len(said) == 1 and "1 cache entries" in said[0] and "cache clear" in said[0]

    listing = subprocess.run(
        [sys.executable, "-m", "graphexec", "cache", "ls", str(old)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert listing.returncode == 0 and "square_of" in listing.stdout
    assert "1 entries" in listing.stderr and "older graphexec" in listing.stderr
    assert gx.clear_cache(old, expired_only=False) == 2  # the old one and the new one
    assert not list(old.glob("*/*.gxc")) and not list(old.glob("*/*.lock"))


def test_a_directory_that_is_no_cache_loses_no_file(tmp_path):
    # A project's directory given by mistake: its lock files looked like the old
    # layout's (any */*.lock), and clear deleted them while reporting 0 entries.
    project = tmp_path / "proj"
    keep = [
        project / "frontend" / "yarn.lock",
        project / "rust" / "Cargo.lock",
        project / "docs" / "Gemfile.lock",
        project / "ab" / "abc.lock",  # a two-letter directory, a short name
        project / "da" / "data.gxc",
    ]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    assert gx.clear_cache(project) == 0
    assert gx.clear_cache(project, expired_only=False) == 0
    for command in (["clear", str(project)], ["prune", "--expired", str(project)]):
        done = subprocess.run(
            [sys.executable, "-m", "graphexec", "cache", *command],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
        assert done.returncode != 0 and "not a graphexec cache directory" in done.stderr
    assert all(path.read_text() == "mine" for path in keep)


def test_a_key_that_is_not_all_safe_characters_is_hashed(tmp_path):
    # Keys name large entries' files: one with a path in it after 8 safe characters
    # passed a prefix match and was used as it was.
    @gx.task(cache_key_fn=lambda context, arguments: "abcdefgh/../../escaped")
    def large():
        return np.zeros(1 << 17)

    cache = tmp_path / "cache"
    graph = gx.Graph()
    with graph:
        large()
    graph.compute(scheduler="sync", cache_dir=cache)
    (key,) = rows(cache)
    assert _cache.SAFE_KEY.fullmatch(key), key
    assert not (tmp_path / "escaped.gxb").exists()
    assert all(p.is_relative_to(cache) for p in tmp_path.rglob("*.gxb"))


def test_damage_inside_the_database_file_is_reported_and_recomputed(tmp_path):
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    marker = b"graphexec-damage-me-" * 4

    @gx.task(cache=True)
    def text(counter):
        with open(counter, "a") as f:
            f.write("text\n")
        return marker.decode()

    def run_once():
        graph = gx.Graph()
        with graph:
            node = text(str(counter))
        run = graph.compute(scheduler="sync", cache_dir=cache)
        return run.state(node).name, run[node]

    assert run_once() == ("Completed", marker.decode())
    conn = sqlite3.connect(cache / _cache.DB_NAME)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the row is in the database file now
    conn.close()
    db = cache / _cache.DB_NAME
    raw = bytearray(db.read_bytes())
    at = raw.index(marker)
    raw[at + 5] ^= 0x01  # one bit of the value's pickle, as a bad sector would
    db.write_bytes(bytes(raw))
    _cache._registry.clear()  # a new process: nothing cached in memory
    with pytest.warns(RuntimeWarning, match="corrupt.*checksum"):
        assert run_once() == ("Completed", marker.decode())
    assert counted(counter) == ["text", "text"]
    assert run_once() == ("Cached", marker.decode())


# -- durability of batched rows, and the keys of the fast paths -------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_a_batch_is_on_disk_within_sync_delay_and_when_compute_returns(tmp_path, monkeypatch):
    monkeypatch.setattr(_cache, "SYNC_DELAY", 0.2)
    synced: list[tuple[float, str]] = []
    real_fsync = os.fsync

    def recording(fd):
        real_fsync(fd)
        synced.append((time.monotonic(), os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(_cache.os, "fsync", recording)
    cache = tmp_path / "cache"
    store = _cache.CacheStore(cache)
    wal = str(cache / f"{_cache.DB_NAME}-wal")
    assert store.try_lock("batched")
    store.put("batched", cloudpickle.dumps(1), {"task": "t", "expires": None})
    deadline = time.monotonic() + 10
    while "batched" not in rows(cache):  # committed by the flusher (visible to all)
        assert time.monotonic() < deadline, "the batch was never committed"
        time.sleep(0.01)
    committed = time.monotonic()
    while not any(path == wal and at >= committed - 0.05 for at, path in synced):
        assert time.monotonic() < committed + 5, f"the WAL was not fsynced: {synced}"
        time.sleep(0.01)
    store.unlock("batched")

    # compute() returns with its entries on disk, not within a second of it: the
    # flusher's commits fsynced, the rest committed with synchronous=FULL
    monkeypatch.setattr(_cache, "SYNC_DELAY", 60.0)
    monkeypatch.setattr(_cache, "BATCH_DELAY", 0.0)  # the flusher commits most of them
    monkeypatch.setattr(_cache, "BATCH_DELAY_ALONE", 0.0)
    graph = gx.Graph()
    with graph:
        nodes = [counted_square(str(tmp_path / "calls"), i) for i in range(200)]
    shared = store._shared
    flushed = []
    real_written = _cache._Shared._written
    monkeypatch.setattr(
        _cache._Shared, "_written", lambda self: (flushed.append(1), real_written(self))
    )
    run = graph.compute(scheduler="threads", cache_dir=cache)
    assert [run[n] for n in nodes] == [i * i for i in range(200)]
    assert flushed and not shared.unsynced.is_set()
    # the same, deterministically: every row committed by the flusher, then the end
    assert store.try_lock("late")
    store.put("late", cloudpickle.dumps(2), {"task": "t", "expires": None})
    deadline = time.monotonic() + 10
    # committed, in the WAL, not yet on disk (the flusher notes it just after the
    # commit, which another connection may see first)
    while "late" not in rows(cache) or not shared.unsynced.is_set():
        assert time.monotonic() < deadline, "the late row was never committed unsynced"
        time.sleep(0.01)
    store.unlock_all()
    assert not shared.unsynced.is_set()


def test_the_fast_paths_of_the_default_key_give_the_general_paths_keys(tmp_path):
    def general(obj, depth):
        h = hashlib.sha256()
        _keys._feed(h, obj, depth + 1)
        return h.digest()

    values = [0, -7, 2**80, 1.5, float("inf"), -0.0, True, None, 1 + 2j, "", "é\ud800",
              "x" * 64, "x" * 65, b"ab", (1, "a"), [2.0], {"k": 1}, {3, 4}]  # fmt: skip
    for value in values:
        for depth in (0, 198, 199):
            try:
                expected = general(value, depth)
            except _keys.Unhashable:
                with pytest.raises(_keys.Unhashable):
                    _keys._sub(value, depth)
                continue
            assert _keys._sub(value, depth) == expected, (value, depth)

    @gx.task(cache=True)
    def sweep(a, b=2, c="x"):
        return (a, b, c)

    cache = tmp_path / "cache"
    graph = gx.Graph()
    with graph:
        flat = [sweep(1), sweep(1.5, 3), sweep("s", 4, "t")]  # the gate's flat path
        general_path = sweep("s", c="y")  # keyword arguments: the general path
    run = graph.compute(scheduler="threads", cache_dir=cache)
    assert run[general_path] == ("s", 2, "y")
    arguments = [
        {"a": 1, "b": 2, "c": "x"},
        {"a": 1.5, "b": 3, "c": "x"},
        {"a": "s", "b": 4, "c": "t"},
        {"a": "s", "b": 2, "c": "y"},
    ]
    expected = {
        gx.task_input_hash(gx.CacheContext(sweep, run.state(node).name), args)
        for node, args in zip([*flat, general_path], arguments)
    }
    assert set(rows(cache)) == expected


def test_a_new_connection_waits_out_a_database_locked_at_once():
    # SQLite answers "database is locked" without waiting when waiting could
    # deadlock (switching to WAL while another process opens the file or
    # checkpoints it): seen as a second process failing its first cached
    # compute. The set-up tries again; any other error goes through at once.
    class Flaky:
        def __init__(self, failures: int, message: str = "database is locked") -> None:
            self.failures, self.message, self.statements = failures, message, []

        def execute(self, sql: str) -> None:
            if self.failures:
                self.failures -= 1
                raise sqlite3.OperationalError(self.message)
            self.statements.append(sql)

    flaky = Flaky(3)
    _cache._set_up(flaky, sqlite3.OperationalError)
    assert flaky.statements[0] == "PRAGMA journal_mode=WAL"
    assert len(flaky.statements) == 3

    broken = Flaky(1, "disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        _cache._set_up(broken, sqlite3.OperationalError)


@gx.task(cache=True, cache_expiration=600)
def big_lived(i: int) -> Any:
    return np.full(20_000, float(i))  # 160 kB: a file, written by the worker


@gx.task(cache=True)
def big_kept(i: int) -> Any:
    return np.full(20_000, -float(i))


@pytest.mark.timeout(120)
def test_a_worker_writes_a_large_entry_under_its_directory_task_and_expiry(tmp_path):
    # A run message names the cache directory and the task by a context id that each
    # worker is told once (#19: sent whole, they tripled a tiny call's message).
    # Two directories and two tasks on one pool, whose workers are replaced after
    # every call: a new worker knows the contexts made before it started.
    with gx.Pool(workers=2, max_calls_per_worker=1) as pool:
        for name in ("one", "two"):
            cache = tmp_path / name
            graph = gx.Graph()
            with graph:
                nodes = [big_lived(i) for i in range(3)] + [big_kept(i) for i in range(3)]
            before = time.time()
            run = graph.compute(pool=pool, cache_dir=cache)
            assert run.counts() == {"Completed": 6}
            listed = _cache.CacheStore(cache).entries()
            assert len(listed) == 6 and all(e.file is not None and e.readable for e in listed)
            lived = [e for e in listed if e.task == "big_lived"]
            kept = [e for e in listed if e.task == "big_kept"]
            assert len(lived) == 3 and len(kept) == 3
            assert all(before + 600 <= e.expires <= time.time() + 600 for e in lived)  # type: ignore[operator]
            assert all(e.expires is None for e in kept)
            again = graph.compute(pool=pool, cache_dir=cache)
            assert again.counts() == {"Cached": 6}
            assert [float(again[n][0]) for n in nodes] == [0, 1, 2, 0, -1, -2]


@gx.task(timeout=1)
def overstays() -> int:
    time.sleep(30)
    return 1


def _echo(i: int) -> int:
    return i


@pytest.mark.timeout(60)
def test_many_cache_contexts_never_block_the_scheduler_on_a_busy_worker(tmp_path):
    # Review of #19: the pool told every live worker of each new (cache dir, task
    # name) context at once, busy ones too; past ~300 of them a busy worker's pipe
    # was full, the scheduler blocked in send until its call ended, and the call's
    # timeout was never enforced (it ended Completed after 30 s). A worker is now
    # told a context with the first call that names it, within the pipe's budget.
    tasks = [gx.task(cache=True, name=f"echo{k}")(_echo) for k in range(600)]
    with gx.Pool(workers=2) as pool:
        graph = gx.Graph()
        with graph:
            slow = overstays()
            nodes = [task(k) for k, task in enumerate(tasks)]
        run = graph.compute(pool=pool, cache_dir=tmp_path / "cache", raise_on_failure=False)
        assert run.state(slow).name == "Failed"
        assert "timeout" in str(run.state(slow).exception)
        assert [run[n] for n in nodes] == list(range(600))


def test_a_rollback_after_sqlite_rolled_back_itself_keeps_the_first_error(tmp_path):
    # On a full disk SQLite ends the transaction itself: a ROLLBACK then raised "no
    # transaction is active", and the warning named that instead of the full disk.
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (1)")
    _cache.rollback(conn)
    assert not conn.in_transaction and conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    _cache.rollback(conn)  # nothing to roll back: nothing raised
    conn.close()


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 27 0:50 / /home rw,relatime - nfs4 server:/home rw,vers=4.2
41 40 0:51 / /home/me/scratch\\040space rw - lustre 10.0.0.1@tcp:/fs rw
42 40 8:2 / /home/me/local rw - xfs /dev/sdb1 rw
50 27 0:60 / /data rw - autofs systemd-1 rw
51 50 0:61 / /data rw - nfs4 fs1:/export/data rw
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/home/me/project/.graphexec-cache", "nfs4"),
        ("/home/me/scratch space/cache", "lustre"),  # (an escaped space in mountinfo)
        ("/home/me/local/cache", None),  # a local disk mounted under the network one
        ("/tmp/cache", None),
        ("/homework/cache", None),  # not under /home
        ("/data/cache", "nfs4"),  # mounted by an automounter over its autofs entry
    ],
)
def test_network_filesystems_are_told_from_local_ones(tmp_path, path, kind):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert _cache.network_filesystem(path, str(info)) == kind
    assert _cache.network_filesystem(path, str(tmp_path / "missing")) is None


def test_a_cache_on_a_network_filesystem_shared_by_two_machines_warns(tmp_path, monkeypatch):
    # SQLite's WAL needs every process that uses the database on one machine: the
    # tasks of a SLURM array on several nodes sharing a cache on NFS could corrupt it.
    # One machine alone on NFS is fine, and is not warned about.
    import socket

    monkeypatch.setattr(_cache, "network_filesystem", lambda path: "nfs4")

    @gx.task(cache=True)
    def double(x):
        return 2 * x

    def run(cache_dir):
        graph = gx.Graph()
        with graph:
            node = double(21)
        return graph.compute(scheduler="sync", cache_dir=cache_dir)[node]

    def as_another_process(host):  # a new process, here on machine `host`
        _cache._registry.clear()
        monkeypatch.setattr(socket, "gethostname", lambda: host)

    shared = tmp_path / "shared"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_another_process("node-1")
        assert run(shared) == 42
        as_another_process("node-1")
        assert run(shared) == 42  # the same machine again: nothing to say
    as_another_process("node-2")
    with pytest.warns(
        RuntimeWarning,
        match=r"network filesystem \(nfs4\).*another machine too \(node-1\).*own\s+cache_dir=",
    ):
        assert run(shared) == 42
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_another_process("node-3")
        monkeypatch.setattr(_cache, "network_filesystem", lambda path: None)
        assert run(shared) == 42  # a local filesystem: not even looked at


def test_a_connection_is_closed_only_by_the_process_and_interpreter_that_use_it(tmp_path):
    # In a forked child, clearing the parent's other threads dropped their connections
    # there, and closed them (an inherited SQLite connection must not be touched).
    conn = sqlite3.connect(tmp_path / "x.sqlite")
    held = _cache._Held(conn)
    held.pid = -1  # as in a child forked from the process that opened it
    del held
    assert conn.execute("SELECT 1").fetchone() == (1,)
    held = _cache._Held(conn)
    del held
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")


HOLDS_THE_DATABASE = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(30)
"""

WAITS_IN_A_DAEMON_THREAD = """
import sys, threading, time
from pathlib import Path
from graphexec._data import cache
store = cache._shared(Path(sys.argv[1]))
def wait_for_the_lock():
    store.conn().execute("BEGIN IMMEDIATE")  # waits: the other process holds it
threading.Thread(target=wait_for_the_lock, daemon=True).start()
time.sleep(0.5)
"""


def test_exit_does_not_wait_for_a_daemon_threads_database_call(tmp_path):
    # The interpreter's exit closed the daemon threads' connections from its main
    # thread, and each close waited for the SQLite call its thread was in: up to the
    # busy timeout (60 s) for a thread waiting on another process's lock.
    _cache._shared(tmp_path)  # the database
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDS_THE_DATABASE, str(tmp_path / _cache.DB_NAME)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        waiter = subprocess.run(
            [sys.executable, "-c", WAITS_IN_A_DAEMON_THREAD, str(tmp_path)],
            timeout=20,  # (the holder keeps its lock for 30 s)
            env={**os.environ, "PYTHONPATH": str(Path(gx.__file__).parent.parent)},
        )
        assert waiter.returncode == 0
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
