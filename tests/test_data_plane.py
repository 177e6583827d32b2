"""Large arrays travel through shared memory, are isolated copy-on-write, and never leak."""

import builtins
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import reap

import graphexec as gx
from graphexec._data import shm

N = 1_000_000  # 8 MB of float64: far above the 64 KiB shared-memory threshold


def _ours(pid=None):
    prefix = f"gx-{pid or os.getpid()}-"
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


@gx.task
def make(seed):
    return np.random.default_rng(seed).random(N)


@gx.task
def shm_entries_now(array, parent_pid):
    # Runs in a worker while the upstream value is alive: it must be in /dev/shm.
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"gx-{parent_pid}-")]


@gx.task
def zero_in_place(array):
    array[:] = 0.0  # writes to a private copy-on-write page set
    return float(array.sum())


@gx.task
def total_later(array, delay):
    time.sleep(delay)
    return float(array.sum())


@gx.task
def sort(array):
    return np.sort(array)


@gx.task
def total(arrays):
    return float(sum(a.sum() for a in arrays))


@gx.task
def die(array):
    os._exit(7)


@pytest.fixture(autouse=True)
def no_shm_leftovers():
    before = set(_ours())
    yield
    assert set(_ours()) - before == set(), "shared-memory segments left behind"


@pytest.mark.timeout(30)
def test_large_values_travel_in_shared_memory(pool):
    graph = gx.Graph()
    with graph:
        array = make(1)  # two consumers: the value leaves its worker
        seen = shm_entries_now(array, os.getpid())
        other = total_later(array, 0.0)
    run = graph.compute(pool=pool)
    assert run[other] > 0
    assert run[seen], "the array should have been in /dev/shm while its consumer ran"


@pytest.mark.timeout(30)
def test_a_task_mutating_its_input_does_not_touch_other_consumers(pool):
    expected = float(np.random.default_rng(2).random(N).sum())
    graph = gx.Graph()
    with graph:
        array = make(2)
        zeroed = zero_in_place(array)
        other = total_later(array, 0.3)
    run = graph.compute(pool=pool, keep="all")
    assert run[zeroed] == 0.0
    assert run[other] == pytest.approx(expected)
    np.testing.assert_array_equal(run[array], np.random.default_rng(2).random(N))


@pytest.mark.timeout(60)
def test_recycled_segments_carry_the_right_values(pool):
    graph = gx.Graph()
    with graph:
        result = total([sort(make(i)) for i in range(12)])
    expected = sum(float(np.sort(np.random.default_rng(i).random(N)).sum()) for i in range(12))
    for _ in range(2):  # the second round reuses segments freed in the first
        assert graph.compute(pool=pool)[result] == pytest.approx(expected)


TWO_MIB = 2 * 1024 * 1024 // 8  # float64s: a segment large enough to be recycled


@gx.task
def filled(i):
    return np.full(TWO_MIB, float(i))


@gx.task
def first_item(array):
    return float(array[0])


@pytest.mark.timeout(60)
def test_values_hooks_and_observers_kept_are_not_rewritten_by_later_results(pool):
    # Read in this process, a value's segment was recycled all the same: a later
    # result of the same size was written into it, under the kept array.
    seen = []

    class Keep(gx.Observer):
        def __init__(self):
            self.values = []

        def on_node_finish(self, node, state):
            if node.name.startswith("filled") and state.is_completed():
                self.values.append(state.result())

    keep = Keep()
    graph = gx.Graph()
    with graph:
        hooked = filled.with_options(on_completion=[lambda t, r, s: seen.append(s.result())])
        [first_item(hooked(i)) for i in range(12)]
    graph.compute(pool=pool, observers=[keep])
    assert sorted(float(v[0]) for v in keep.values) == [float(i) for i in range(12)]
    assert sorted(float(v[0]) for v in seen) == [float(i) for i in range(12)]
    assert all((v == v[0]).all() for v in keep.values)


@gx.task
def keep_as(key, array):
    builtins.__dict__.setdefault("_graphexec_test_kept", {})[key] = array  # a module cache
    return key


@gx.task
def drop_kept(key):
    del builtins._graphexec_test_kept[key]
    return key


@gx.task
def read_kept(key):
    array = builtins._graphexec_test_kept.pop(key)
    return float(array.sum()), float(array[0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keepers", [1, 2], ids=["one call keeps it", "two, one lets go"])
def test_an_input_a_worker_keeps_is_not_rewritten_by_a_later_result(keepers):
    # One worker: its tasks keep a reference to their input; the parent releases the
    # value once its consumers are done, and a later result of the same size must not
    # be written into that segment (recycled) under the worker's mapping. With two
    # calls keeping it and the first letting go, the second's mapping must still
    # count (one pin per process once served only the first mapping).
    graph = gx.Graph()
    with graph:
        ones = filled(1)
        kept = keep_as("b", ones)
        if keepers == 2:
            kept = drop_kept("a").wait_for([keep_as("a", ones).wait_for([kept])])
        other = first_item(ones).wait_for([kept])
        sevens = filled(7).wait_for([other])
        later = first_item(sevens)
        back = read_kept("b").wait_for([later])
    run = graph.compute(back, later, sevens, workers=1)  # sevens: to this process, in shm
    assert run[later] == 7.0
    assert run[back] == (float(TWO_MIB), 1.0)
    assert _ours() == []  # the worker's pins went with the run's other segments


def _fail_fast_beside(pool):
    @gx.task
    def fails():
        time.sleep(0.05)
        raise ValueError("x")

    graph = gx.Graph()
    with graph:
        small = [small_array(i) for i in range(300)]
        fails()
        [total(small[k : k + 2]) for k in range(0, 300, 2)]
    run = graph.compute(pool=pool, fail_fast=True, raise_on_failure=False)
    assert not run.ok


@gx.task
def small_array(i):
    return np.full(20_000, float(i))  # 160 kB: shared memory, a fast call


@pytest.mark.timeout(120)
def test_a_run_cancelled_beside_another_on_one_pool_leaks_no_shared_memory(pool):
    # Outcomes that a cancelled or ended run never read (its killed calls' answers
    # routed already, its answers after it closed) kept their segments for good.
    def steady():
        graph = gx.Graph()
        with graph:
            small = [small_array(i) for i in range(1500)]
            [total(small[k : k + 4]) for k in range(0, 1500, 4)]
        graph.compute(pool=pool)

    for _ in range(3):
        threads = [
            threading.Thread(target=steady),
            threading.Thread(target=_fail_fast_beside, args=(pool,)),
        ]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(60)
        assert _ours() == []


@pytest.mark.timeout(30)
def test_kept_large_values_are_readable_after_the_run(pool):
    graph = gx.Graph()
    with graph:
        arrays = [sort(make(i)) for i in range(3)]
    run = graph.compute(pool=pool)
    assert _ours() == []  # mapped privately and unlinked at the end of the run
    for i, node in enumerate(arrays):
        np.testing.assert_array_equal(run[node], np.sort(np.random.default_rng(i).random(N)))


@pytest.mark.timeout(30)
def test_a_worker_dying_while_holding_an_array_leaks_nothing(pool):
    graph = gx.Graph()
    with graph:
        array = make(3)
        dead = die(array)
        fine = total_later(array, 0.0)
    run = graph.compute(pool=pool, raise_on_failure=False)
    assert isinstance(run.state(dead).exception, gx.WorkerCrashed)
    assert run[fine] == pytest.approx(float(np.random.default_rng(3).random(N).sum()))


@pytest.mark.timeout(30)
def test_fail_fast_with_arrays_in_flight_leaks_nothing(pool):
    graph = gx.Graph()
    with graph:
        arrays = [make(i) for i in range(4)]
        dead = die(arrays[0])
        rest = [total_later(a, 2.0) for a in arrays[1:]]
    with pytest.raises(gx.GraphFailed) as info:
        graph.compute(pool=pool, fail_fast=True)
    assert info.value.run.state(dead).is_failed()
    assert any(info.value.run.state(n).is_cancelled() for n in rest)


PARENT = textwrap.dedent(
    """
    import time
    import numpy as np
    import graphexec as gx

    @gx.task
    def make(seed):
        return np.random.default_rng(seed).random(1_000_000)

    @gx.task
    def hold(array):
        print("holding", flush=True)
        time.sleep(60)

    graph = gx.Graph()
    with graph:
        arrays = [make(i) for i in range(2)]
        held = [hold(a) for a in arrays]
    graph.compute(workers=2, keep="all")  # kept: the arrays leave their workers
    """
)


@pytest.mark.timeout(60)
def test_a_killed_parent_leaves_no_shared_memory(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while proc.stdout.readline().find("holding") < 0:
            assert time.monotonic() < deadline, "the script never started its tasks"
        assert _ours(proc.pid), "arrays should be in shared memory while held"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _ours(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # the workers' watchdogs notice within about a second
        assert _ours(proc.pid) == []
    finally:
        reap(proc)


@pytest.mark.timeout(60)
def test_shared_memory_in_use_is_bounded_by_what_is_live_not_by_what_was_made(pool):
    # 48 arrays of 8 MB (384 MB made), each read by two consumers, so each goes
    # through /dev/shm; a value's segment is released (or recycled, at most
    # FREE_MAX kept) once both consumers are done.
    arrays = 48
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.005):
            size = 0
            for name in _ours():
                try:
                    size += os.stat(f"/dev/shm/{name}").st_size
                except OSError:
                    pass
            peak[0] = max(peak[0], size)

    graph = gx.Graph()
    with graph:
        sums = []
        for i in range(arrays):
            array = make(i)
            sums += [total_later(array, 0.0), total_later(array, 0.0)]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run = graph.compute(pool=pool)
    finally:
        stop.set()
        sampler.join()
    assert len({run[s] for s in sums}) == arrays
    made = arrays * N * 8
    assert peak[0] > 0, "the arrays should have gone through /dev/shm"
    assert peak[0] <= made // 4, f"peak {peak[0] >> 20} MB in /dev/shm of {made >> 20} MB made"
    assert _ours() == []


def test_a_sweep_keeps_the_pin_of_a_value_alive_here():
    # A dead producer's segments are swept, but not one a live value names: nor its
    # pin, which another worker's mapping needs (else the segment could be recycled).
    name = f"gx-{os.getpid()}-99-w0-1"
    path = f"/dev/shm/{name}"
    with open(path, "wb") as f:
        f.write(b"x" * 100)
    try:
        shm.live.add(name)
        assert shm.pin(name)
        assert os.stat(path).st_nlink == 2
        shm.sweep(f"gx-{os.getpid()}-99-w0-")
        assert os.stat(path).st_nlink == 2  # the value and its pin both stay
        shm.unpin(name)
        assert os.stat(path).st_nlink == 1
    finally:
        shm.live.discard(name)
        shm.sweep(f"gx-{os.getpid()}-99-")
    assert not os.path.exists(path)


def test_a_full_dev_shm_sends_large_values_through_the_pipe(monkeypatch, caplog):
    # A container's /dev/shm (64 MB under Docker and Kubernetes) filled by a 100 MB
    # result failed the node: "cannot be pickled: OSError: No space left on device.
    # ... make the type picklable".
    import errno

    from graphexec._data import serialize

    made = []
    create = shm.create

    def full(raw):
        if made:
            raise OSError(errno.ENOSPC, "No space left on device")
        made.append(create(raw))  # the first buffer fits, the second does not
        return made[-1]

    monkeypatch.setattr(serialize._shm, "create", full)
    monkeypatch.setattr(serialize, "_said_shm_is_full", False)
    value = {"a": np.arange(300_000.0), "b": np.ones(400_000)}
    with caplog.at_level("WARNING", logger="graphexec"):
        data, segments = serialize.dumps_value(value)
        serialize.dumps_value(value)
    assert segments == () and not os.path.exists(f"/dev/shm/{made[0]}")  # nothing left
    again = serialize.loads_value((data, segments))
    assert np.array_equal(again["a"], value["a"]) and np.array_equal(again["b"], value["b"])
    said = [r.getMessage() for r in caplog.records if "no room" in r.getMessage()]
    assert len(said) == 1 and "--shm-size" in said[0]  # once per process
    monkeypatch.setattr(
        serialize._shm,
        "create",
        lambda raw: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied")),
    )
    with pytest.raises(OSError, match="Permission denied"):  # any other error: as before
        serialize.dumps_value(value)


SMALL_DEV_SHM = """
import numpy as np, graphexec as gx
def big(n):
    return np.ones(n // 8)
graph = gx.Graph()
node = graph.add(big, 80 * 2**20)
print("MB", graph.compute(workers=1)[node].nbytes // 2**20)
"""


@pytest.mark.timeout(120)
def test_a_result_larger_than_a_containers_dev_shm_arrives(tmp_path):
    # The real thing: /dev/shm of 32 MB in a mount namespace of its own (root only).
    if (
        os.geteuid() != 0
        or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0
    ):
        pytest.skip("needs root and unshare -m to give a process a small /dev/shm")
    script = tmp_path / "big.py"
    script.write_text(SMALL_DEV_SHM)
    root = os.path.dirname(os.path.dirname(os.path.abspath(gx.__file__)))
    out = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=32m tmpfs /dev/shm && exec {sys.executable} {script}",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert out.returncode == 0, out.stderr
    assert "MB 80" in out.stdout and "/dev/shm has no room" in out.stderr


def test_a_full_dev_shm_first_lets_the_pools_recycled_segments_go(monkeypatch, caplog):
    # Up to FREE_MAX recycled segments per pool, kept for results of their sizes,
    # could be what filled a container's small /dev/shm: the value then went through
    # the pipe and the warning blamed the container. They go first now.
    from graphexec._data import serialize

    create, tries, dropped = shm.create, [], []

    def full_once(raw):
        tries.append(raw.nbytes)
        if len(tries) == 1:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        return create(raw)

    monkeypatch.setattr(serialize._shm, "create", full_once)
    monkeypatch.setattr(serialize._shm, "drop_free", lambda: dropped.append(1) or 3)
    monkeypatch.setattr(serialize, "_said_shm_is_full", False)
    value = np.arange(200_000.0)
    with caplog.at_level("WARNING", logger="graphexec"):
        data, segments = serialize.dumps_value(value)
    try:
        assert dropped == [1] and len(segments) == 1  # the second try found room
        assert np.array_equal(serialize.loads_value((data, segments)), value)
        assert not [r for r in caplog.records if "no room" in r.getMessage()]
    finally:
        shm.unlink([name for name, _ in segments])


def test_drop_free_unlinks_the_pools_free_segments_only(monkeypatch):
    free_prefix = f"gx-test{os.getpid()}-1-f"
    monkeypatch.setattr(shm, "_free_prefix", free_prefix)
    names = [f"{free_prefix}1048576-{k}" for k in range(2)] + [f"gx-test{os.getpid()}-1-w0-1"]
    for name in names:
        with open(f"/dev/shm/{name}", "wb") as f:
            f.write(b"x")
    try:
        assert shm.drop_free() == 2
        assert [n for n in names if os.path.exists(f"/dev/shm/{n}")] == names[2:]
    finally:
        shm.unlink(names)
