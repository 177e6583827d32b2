"""Resume and sharing (SPEC §5, issue #6), with real processes.

* A script computing 20 cached nodes is killed mid-run (SIGKILL, or Ctrl-C's
  SIGINT) and run again: only the nodes without a valid entry are recomputed,
  and ``run.summary()`` counts the cached ones.
* A run with failures is rerun once the cause is gone: only the failed nodes
  (and what they block) run.
* Two processes compute overlapping graphs on one cache directory at once.

Nodes count their calls by appending to a file; a node's call is recorded
before its result exists, so a call that was killed still counts.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

from graphexec._data import cache as _cache

N_STEPS = 20
EXPECTED_TOTAL = float(sum(i * 20_000 for i in range(N_STEPS)))

RESUME_SCRIPT = """\
import json
import os
import sys
import time

import numpy as np

import graphexec as gx

COUNTER, FLAG, CACHE = sys.argv[1:4]


@gx.task(cache=True)
def step(i, counter, flag):
    time.sleep(0.1)
    with open(counter, "a") as f:
        f.write(f"step {i}\\n")
    if i % 5 == 0 and os.path.exists(flag):
        raise RuntimeError(f"step {i} fails while {flag} exists")
    print(f"marker {i} {os.getpid()}", flush=True)
    return np.full(20_000, float(i))  # 160 kB: travels in shared memory


@gx.task(cache=True)
def total(counter, arrays):
    with open(counter, "a") as f:
        f.write("total\\n")
    return float(sum(a.sum() for a in arrays))


graph = gx.Graph()
with graph:
    parts = [step(i, COUNTER, FLAG) for i in range(20)]
    result = total(COUNTER, parts)
run = graph.compute(workers=2, cache_dir=CACHE, raise_on_failure=False)
print("SUMMARY " + run.summary().splitlines()[0], flush=True)
print("COUNTS " + json.dumps(run.counts()), flush=True)
if run.ok:
    print(f"TOTAL {run[result]}", flush=True)
"""


def calls(counter: Path) -> list[str]:
    return counter.read_text().splitlines() if counter.exists() else []


def entries(cache: Path) -> list[str]:
    """Keys of the committed entries, as the store lists them."""
    if not (cache / _cache.DB_NAME).exists():
        return []
    return sorted(e.key for e in _cache.CacheStore(cache).entries())


def parse(stdout: str) -> tuple[str, dict, float | None]:
    summary, counts, total = "", {}, None
    for line in stdout.splitlines():
        if line.startswith("SUMMARY "):
            summary = line[len("SUMMARY ") :]
        elif line.startswith("COUNTS "):
            counts = json.loads(line[len("COUNTS ") :])
        elif line.startswith("TOTAL "):
            total = float(line.split()[1])
    return summary, counts, total


def run_script(script: Path, *args: str, timeout: float = 40) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=script.parent,
    )


def wait_gone(procs: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """Wait for processes to exit (zombies count as gone); return the survivors."""
    deadline = time.monotonic() + timeout
    alive = procs
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
    return alive


def shm_of(pid: int) -> list[str]:
    try:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"gx-{pid}-")]
    except FileNotFoundError:
        return []


@pytest.fixture
def resume_script(tmp_path: Path) -> Path:
    script = tmp_path / "sweep.py"
    script.write_text(RESUME_SCRIPT)
    return script


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_rerun_after_a_crash_recomputes_only_what_has_no_entry(tmp_path, resume_script, how):
    counter, flag, cache = tmp_path / "calls", tmp_path / "no-flag", tmp_path / "cache"
    stderr = open(tmp_path / "stderr", "w+")  # noqa: SIM115 - read after the process ends
    proc = subprocess.Popen(
        [sys.executable, str(resume_script), str(counter), str(flag), str(cache)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=tmp_path,
    )
    markers = []
    try:
        for line in proc.stdout:
            if line.startswith("[step") and " marker " in line:
                markers.append(line.split())
                if len(markers) == 6:
                    break
        assert len(markers) == 6, "the script ended before its sixth node"
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 2  # the workers (and the forkserver)
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    stderr.seek(0)
    err = stderr.read()
    stderr.close()
    assert proc.returncode != 0
    if how == "SIGINT":
        assert "KeyboardInterrupt" in err, err
    # No orphans: the killed parent's workers (and forkserver) exit on their own.
    survivors = wait_gone(descendants)
    assert not survivors, [p.pid for p in survivors]

    n_cached = len(entries(cache))  # every complete entry, written before the kill
    assert 1 <= n_cached < N_STEPS, n_cached  # the kill came mid-run
    before = calls(counter)

    done = run_script(resume_script, str(counter), str(flag), str(cache))
    assert done.returncode == 0, done.stderr
    summary, counts, total = parse(done.stdout)
    assert total == EXPECTED_TOTAL
    assert counts == {"Cached": n_cached, "Completed": N_STEPS + 1 - n_cached}
    assert f"{n_cached} cached" in summary and summary.endswith("— ok")
    rerun = calls(counter)[len(before) :]
    assert len(rerun) == N_STEPS + 1 - n_cached  # only the nodes without an entry
    assert len(set(rerun)) == len(rerun) and "total" in rerun
    # and those with an entry had run (completely) before the kill
    assert {f"step {i}" for i in range(N_STEPS)} - set(rerun) <= set(before)

    again = run_script(resume_script, str(counter), str(flag), str(cache))
    assert again.returncode == 0, again.stderr
    assert parse(again.stdout)[1:] == ({"Cached": N_STEPS + 1}, EXPECTED_TOTAL)
    assert len(calls(counter)) == len(before) + len(rerun)


@pytest.mark.timeout(60)
def test_rerun_after_failures_recomputes_only_the_failed_and_what_they_blocked(
    tmp_path, resume_script
):
    counter, flag, cache = tmp_path / "calls", tmp_path / "flag", tmp_path / "cache"
    flag.touch()
    first = run_script(resume_script, str(counter), str(flag), str(cache))
    assert first.returncode == 0, first.stderr
    summary, counts, total = parse(first.stdout)
    assert counts == {"Completed": 16, "Failed": 4, "Skipped": 1}
    assert total is None
    assert len(entries(cache)) == 16  # failed and skipped nodes have none
    assert len(calls(counter)) == N_STEPS

    flag.unlink()
    second = run_script(resume_script, str(counter), str(flag), str(cache))
    assert second.returncode == 0, second.stderr
    summary, counts, total = parse(second.stdout)
    assert counts == {"Cached": 16, "Completed": 5}
    assert "16 cached" in summary
    assert total == EXPECTED_TOTAL
    assert sorted(calls(counter)[N_STEPS:]) == ["step 0", "step 10", "step 15", "step 5", "total"]


SHARING_SCRIPT = """\
import json
import sys
import time

import graphexec as gx

COUNTER, CACHE = sys.argv[1], sys.argv[2]
LO, HI = int(sys.argv[3]), int(sys.argv[4])


def log(label):
    with open(COUNTER, "a") as f:
        f.write(label + "\\n")


@gx.task(cache=True)
def slow(i, counter):
    time.sleep(0.08)
    log(f"slow {i}")
    return i * i


@gx.task(cache=True)
def pair(a, b, counter):
    time.sleep(0.04)
    log(f"pair {a} {b}")
    return a + b


@gx.task(cache=True)
def total(values, counter):
    log(f"total {len(values)} {values[0]}")
    return sum(values)


order = range(LO, HI) if LO == 0 else range(HI - 1, LO - 1, -1)  # meet in the middle
graph = gx.Graph()
with graph:
    roots = {i: slow(i, COUNTER) for i in order}
    pairs = [pair(roots[i], roots[i + 1], COUNTER) for i in range(LO, HI - 1)]
    shared = total([roots[i] for i in range(4, 12)], COUNTER)
    full = total(pairs, COUNTER)
run = graph.compute(workers=1, cache_dir=CACHE)
print(json.dumps({"shared": run[shared], "full": run[full], "counts": run.counts()}))
"""


@pytest.mark.timeout(60)
def test_two_processes_share_one_cache_directory(tmp_path):
    script = tmp_path / "share.py"
    script.write_text(SHARING_SCRIPT)
    counter, cache = tmp_path / "calls", tmp_path / "cache"
    ranges = [(0, 12), (4, 16)]

    def start(lo, hi):
        return subprocess.Popen(
            [sys.executable, str(script), str(counter), str(cache), str(lo), str(hi)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )

    procs = [start(lo, hi) for lo, hi in ranges]  # at the same time
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=50)
        assert proc.returncode == 0, err
        assert "corrupt" not in err and "Traceback" not in err, err
        outs.append(json.loads(out))
        assert shm_of(proc.pid) == []

    squares = {i: i * i for i in range(16)}
    for (lo, hi), out in zip(ranges, outs):
        assert out["shared"] == sum(squares[i] for i in range(4, 12))
        assert out["full"] == sum(squares[i] + squares[i + 1] for i in range(lo, hi - 1))
    # Each entry was computed exactly once: whoever holds an entry's lock computes it,
    # the other waits for the lock and then finds the entry (no slack needed).
    counted = collections.Counter(calls(counter))
    assert all(n == 1 for n in counted.values()), counted
    assert len(counted) == 16 + 15 + 3  # slow 0..15, pair 0..14, three totals
    cached = sum(out["counts"].get("Cached", 0) for out in outs)
    assert cached == sum(sum(out["counts"].values()) for out in outs) - len(counted)

    # The store is whole: every entry reads back, nothing half-written is left.
    assert not list(cache.glob("*/.tmp-*"))
    store = _cache.CacheStore(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for key in entries(cache):
            assert store.lookup(key) is not None, key
    assert len(entries(cache)) == len(counted)

    for lo, hi in ranges:  # and a rerun of either is all cached
        again = run_script(script, str(counter), str(cache), str(lo), str(hi))
        assert again.returncode == 0, again.stderr
        assert list(json.loads(again.stdout)["counts"]) == ["Cached"]
    assert sum(collections.Counter(calls(counter)).values()) == len(counted)


IDLE_HOLDER_SCRIPT = """\
import numpy as np

import graphexec as gx


@gx.task(cache=True)
def make(i):
    return np.full(50_000, float(i))  # 400 kB: in shared memory until the parent uses it


@gx.task(retries=1, retry_delay=60)
def fail_then_wait(*_):
    print("waiting", flush=True)
    raise RuntimeError("retried in a minute: the workers sit idle meanwhile")


@gx.task
def total(arrays, _):
    return sum(float(a.sum()) for a in arrays)


graph = gx.Graph()
with graph:
    arrays = [make(i) for i in range(4)]
    total(arrays, fail_then_wait(*arrays))
graph.compute(workers=2, cache_dir="cache")
"""


@pytest.mark.timeout(60)
def test_a_killed_parent_leaves_nothing_in_dev_shm(tmp_path):
    """SIGKILL a parent holding values in shared memory while its workers are idle.

    Three at once: a worker's watchdog (every 0.5 s) may happen to clean up first; all
    three parents' segments are checked.
    """
    procs = []
    for k in range(3):
        work = tmp_path / f"run{k}"
        work.mkdir()
        (work / "idle.py").write_text(IDLE_HOLDER_SCRIPT)
        procs.append(
            subprocess.Popen(
                [sys.executable, "idle.py"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=work,
            )
        )
    children = []
    try:
        for proc in procs:
            assert "waiting" in proc.stdout.readline()
        time.sleep(0.3)  # the failure reaches the parent; the workers go idle
        for proc in procs:
            assert proc.poll() is None
            assert shm_of(proc.pid), "the values should be in shared memory now"
            children += psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
    assert not wait_gone(children)
    leftovers = [name for proc in procs for name in shm_of(proc.pid)]
    for name in leftovers:  # clean up after the bug
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:
            pass
    assert leftovers == []
