"""The zygote start method (``graphexec/_executors/zygote.py``, #14).

On Linux, workers fork from a server that is itself a fork of the program,
made while the program runs one thread; with several threads the server is a
fresh interpreter, as ``forkserver``. Each check runs a script in a fresh
interpreter, where the program's state when the zygote forks is known: its
threads, its pipes, its signal handlers, its ``sys.stdout``.

The rest of the suite runs on the zygote (``tests/conftest.py`` asks for it at
the start: collecting the suite imports numpy, which would make the
forkserver the default); the tests parametrised over start
methods elsewhere (test_faults, test_interrupt, test_run, test_pool_hygiene)
run the forkserver path too, and CI runs the process-pool files once more
with ``GRAPHEXEC_START_METHOD=forkserver``.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import graphexec as gx
from graphexec._executors import zygote

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the zygote is Linux's (it needs /proc)"
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(gx.__file__)))

PRELUDE = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, threading, time
    import psutil
    import graphexec as gx
    from graphexec._executors import zygote

    def children():
        return {p.pid: p.name() for p in psutil.Process().children()}

    def compute(fn, *args, n=1, **options):
        graph = gx.Graph()
        nodes = [graph.add(fn, *args) for _ in range(n)]
        run = graph.compute(**options)
        return [run[node] for node in nodes]

    def report(**values):
        print("REPORT " + json.dumps(values), flush=True)
    """
)


def _run(
    body: str, env: dict[str, str] | None = None, stderr: list[str] | None = None
) -> tuple[dict, str]:
    """Run ``body`` after PRELUDE in a fresh interpreter: its report and stdout (``stderr``:
    a list that receives its standard error)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHEXEC_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, environ.get("PYTHONPATH")]))
    environ.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if stderr is not None:
        stderr.append(done.stderr)
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :]), done.stdout


@pytest.mark.timeout(90)
def test_a_single_threaded_program_forks_its_zygote_and_workers_fork_from_it():
    report, _ = _run(
        """
        def where():
            return os.getppid(), open("/proc/self/comm").read().strip()

        assert zygote.threads() == 1
        with gx.Pool(workers=2) as pool:
            method = pool.start_method
            # Made with the pool, before any worker (it names itself just after
            # the fork: a loaded machine may take a moment).
            deadline = time.monotonic() + 5
            helpers = children()
            while "gx-zygote" not in helpers.values() and time.monotonic() < deadline:
                time.sleep(0.01)
                helpers = children()
            parents = compute(where, n=4, pool=pool)
        report(method=method, helpers=helpers, parents=parents, me=psutil.Process().name())
        """
    )
    assert report["method"] == "zygote"
    zygotes = [pid for pid, name in report["helpers"].items() if name == "gx-zygote"]
    assert len(zygotes) == 1  # started when the pool was made
    for parent, name in report["parents"]:
        assert parent == int(zygotes[0])
        assert name == report["me"]  # a worker takes the program's name back


@pytest.mark.timeout(90)
def test_a_threaded_program_gets_a_forkserver_and_never_a_fork():
    report, _ = _run(
        """
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        default = gx._surfaces.pool.default_start_method()
        with gx.Pool(workers=1) as pool:
            compute(os.getpid, pool=pool)
            default_names = sorted(children().values())
        # Asked for by name, the zygote is still no fork of a threaded program:
        # its server is a fresh interpreter, as a forkserver.
        with gx.Pool(workers=1, start_method="zygote") as pool:
            compute(os.getpid, pool=pool)
            server = zygote.server([])
            forked = server.forked
            zygote_names = sorted(children().values())
        stop.set()
        thread.join()
        report(default=default, default_names=default_names, forked=forked,
               zygote_names=zygote_names)
        """
    )
    assert report["default"] == "forkserver"
    assert "gx-zygote" not in report["default_names"]
    assert report["forked"] is False
    assert "gx-zygote" not in report["zygote_names"]


@pytest.mark.timeout(90)
def test_a_numpy_program_gets_a_forkserver_unless_it_asks_for_the_zygote():
    # OpenBLAS (numpy's wheels) starts a thread per core beyond the first when
    # numpy loads, and joins them at every fork: asked for by name, the zygote
    # forks such a program as safely as a one-thread one. Not by default: its
    # workers would share the module-level random generators the program made.
    pytest.importorskip("numpy")
    report, _ = _run(
        """
        import numpy as np
        from graphexec._executors import threadlimits
        before = zygote.threads()
        blas = threadlimits.threads_shut_at_fork()
        default = gx._surfaces.pool.default_start_method()

        def product(n):
            a = np.arange(n * n, dtype=float).reshape(n, n)
            return float((a @ a).sum()), os.getppid()

        why_not = zygote.why_not_fork(asked=True)  # (said if the fork did not happen)
        with gx.Pool(workers=2, start_method="zygote") as pool:
            method = pool.start_method
            results = compute(product, 200, n=4, pool=pool)
            forked = zygote.server([]).forked
            helpers = children()  # after the calls: the zygote has named itself
        a = np.arange(200 * 200, dtype=float).reshape(200, 200)
        here = float((a @ a).sum())  # the program's own BLAS still works after the fork
        report(before=before, blas=blas, default=default, method=method, forked=forked,
               helpers=helpers, results=results, here=here, why_not=why_not,
               threads_now=zygote.threads())
        """,
        env={"OPENBLAS_NUM_THREADS": "2"},
    )
    if report["blas"] == 0:
        pytest.skip("this numpy's BLAS starts no threads of its own here")
    assert report["before"] == 1 + report["blas"]
    assert report["default"] == "forkserver"
    assert report["method"] == "zygote"
    assert report["forked"] is True, report  # (why_not: why_not_fork just before)
    zygotes = [pid for pid, name in report["helpers"].items() if name == "gx-zygote"]
    assert len(zygotes) == 1
    for value, parent in report["results"]:
        assert value == report["here"]
        assert parent == int(zygotes[0])


@pytest.mark.timeout(90)
def test_a_numpy_program_without_blas_threads_still_gets_a_forkserver_by_default():
    # One BLAS thread (OPENBLAS_NUM_THREADS=1, a one-core machine): one thread,
    # but a zygote's workers would still share the program's module-level
    # random generators.
    pytest.importorskip("numpy")
    report, _ = _run(
        """
        import numpy as np
        report(threads=zygote.threads(), default=gx._surfaces.pool.default_start_method(),
               why=zygote.why_not_fork())
        """,
        env={"OPENBLAS_NUM_THREADS": "1"},
    )
    assert report["threads"] == 1
    assert report["default"] == "forkserver"
    assert "numpy" in report["why"]


@pytest.mark.timeout(90)
def test_a_thread_that_survives_the_fork_means_no_zygote_and_nothing_left_behind():
    # why_not_fork took the extra thread for OpenBLAS's (forced here); it did
    # not stop at the fork, so the forked child is killed before it serves and
    # the server is a fresh interpreter.
    report, _ = _run(
        """
        from graphexec._executors import threadlimits
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        threading.active_count = lambda: 1
        threadlimits.threads_shut_at_fork = lambda: zygote.threads() - 1
        allowed = zygote.why_not_fork(asked=True)
        with gx.Pool(workers=1, start_method="zygote") as pool:
            value = compute(os.getpid, pool=pool)
            forked = zygote.server([]).forked
            names = sorted(children().values())
        zombies = [p.pid for p in psutil.Process().children() if p.status() == "zombie"]
        stop.set()
        thread.join()
        report(allowed=allowed, forked=forked, names=names, zombies=zombies, value=value)
        """
    )
    assert report["allowed"] is None
    assert report["forked"] is False
    assert "gx-zygote" not in report["names"]
    assert report["zombies"] == []
    assert len(report["value"]) == 1


@pytest.mark.timeout(90)
def test_a_large_program_gets_a_forkserver():
    # Every worker's RSS would count the pages it shares with a large zygote.
    report, _ = _run(
        "report(default=gx._surfaces.pool.default_start_method())",
        env={"GRAPHEXEC_ZYGOTE_MAX_RSS": "1000"},
    )
    assert report["default"] == "forkserver"


@pytest.mark.timeout(90)
def test_the_zygote_holds_none_of_the_programs_pipes_but_keeps_its_files(tmp_path):
    # A subprocess whose stdin pipe the program made before the zygote forked
    # must still see end of file when the program closes it: the zygote and its
    # workers point every pipe and socket at a dead pipe. A file the program
    # opened (a module-level log) stays open, as across a plain fork, so that
    # what a task writes to it is not lost; a stale socket fails loudly.
    log_path = tmp_path / "program.log"
    # A module of the program's (functions of __main__ travel by value, and a
    # file object does not pickle): imported, with its file open, before the fork.
    (tmp_path / "program_module.py").write_text(
        textwrap.dedent(
            f"""
            import os, socket
            LOG = open({str(log_path)!r}, "a", buffering=1)
            A, B = socket.socketpair()

            def write_log():
                LOG.write(f"from worker {{os.getpid()}}\\n")
                LOG.flush()
                return os.getpid()

            def use_socket():
                try:
                    A.sendall(b"x")
                except OSError as exc:
                    return type(exc).__name__
                return "sent"
            """
        )
    )
    report, _ = _run(
        f"""
        sys.path.insert(0, {str(tmp_path)!r})
        from program_module import write_log, use_socket
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        (worker,) = compute(write_log, workers=1)
        (sock,) = compute(use_socket, workers=1)
        (server,) = [pid for pid, name in children().items() if name == "gx-zygote"]
        targets = {{}}
        for fd in os.listdir(f"/proc/{{server}}/fd"):
            try:
                targets[fd] = os.readlink(f"/proc/{{server}}/fd/{{fd}}")
            except OSError:
                pass
        pipe = os.readlink(f"/proc/self/fd/{{cat.stdin.fileno()}}")
        cat.stdin.close()
        code = cat.wait(10)
        report(code=code, targets=targets, pipe=pipe, worker=worker, sock=sock)
        """
    )
    assert report["code"] == 0  # cat saw end of file: nobody else held its stdin
    assert report["pipe"] not in report["targets"].values()
    assert str(log_path) in report["targets"].values()  # the file is still the program's
    assert log_path.read_text() == f"from worker {report['worker']}\n"
    assert report["sock"] in ("OSError", "BrokenPipeError")  # loud, never "sent"


@pytest.mark.timeout(90)
def test_workers_get_a_fresh_interpreters_signals_and_streams():
    report, out = _run(
        """
        import io
        signal.signal(signal.SIGUSR1, lambda *a: None)  # the program's handler
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)   # ignored: stays so, as across exec
        sys.stdout.write("BEFORE\\n")  # buffered (stdout is a pipe): never written twice
        real, sys.stdout = sys.stdout, io.StringIO()   # the program captures its own prints

        def inside():
            print("FROM-THE-WORKER")
            return (
                signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
                signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN,
                signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                sys.stdout.__class__.__name__,
            )

        (seen,) = compute(inside, workers=1)
        sys.stdout = real
        report(seen=seen)
        """
    )
    usr1, usr2, sigint_default, stream = report["seen"]
    assert usr1 is True  # the program's handler is not the worker's
    assert usr2 is True
    assert sigint_default is True
    assert stream == "NodeStream"
    assert out.count("BEFORE") == 1
    assert "FROM-THE-WORKER" in out  # the real stdout, not the program's StringIO


@pytest.mark.timeout(90)
def test_workers_of_the_zygote_have_the_programs_modules_and_their_own_random_state():
    # What a fork gives: the program's modules are loaded already (functions
    # load faster); what it must not: workers drawing the same random numbers.
    report, _ = _run(
        """
        import decimal, random  # loaded by the program before its first compute

        def probe(_):
            time.sleep(0.2)  # both workers take one
            return "decimal" in sys.modules, random.random(), os.getpid()

        graph = gx.Graph()
        nodes = [graph.add(probe, i) for i in range(2)]
        run = graph.compute(workers=2)
        report(seen=[run[n] for n in nodes])
        """
    )
    (a_loaded, a_random, a_pid), (b_loaded, b_random, b_pid) = report["seen"]
    assert a_loaded and b_loaded
    assert a_pid != b_pid and a_random != b_random


@pytest.mark.timeout(90)
def test_forkserver_opts_out_by_option_and_by_environment():
    report, _ = _run(
        """
        with gx.Pool(workers=1, start_method="forkserver") as pool:
            compute(os.getpid, pool=pool)
            names = sorted(children().values())
        report(env=gx._surfaces.pool.default_start_method(), names=names)
        """,
        env={"GRAPHEXEC_START_METHOD": "forkserver"},
    )
    assert report["env"] == "forkserver"
    assert "gx-zygote" not in report["names"]


def test_zygote_is_a_start_method_a_pool_accepts():
    with gx.Pool(workers=1, start_method="zygote") as pool:
        assert pool.start_method == "zygote"
        graph = gx.Graph()
        node = graph.add(os.getpid)
        assert graph.compute(pool=pool)[node] != os.getpid()


@pytest.mark.timeout(90)
def test_a_killed_zygote_is_replaced_and_never_by_a_fork_of_a_threaded_program():
    report, _ = _run(
        """
        compute(os.getpid, workers=1)
        server = zygote.server([])
        first = server._forkserver_pid
        os.kill(first, signal.SIGKILL)
        while psutil.pid_exists(first) and psutil.Process(first).status() != "zombie":
            time.sleep(0.01)
        compute(os.getpid, workers=1)  # one thread still: forked again
        second, forked_again = server._forkserver_pid, server.forked
        os.kill(second, signal.SIGKILL)
        while psutil.pid_exists(second) and psutil.Process(second).status() != "zombie":
            time.sleep(0.01)
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        pids = compute(os.getpid, workers=1)  # the default is still the zygote: it runs
        third, forked_last = server._forkserver_pid, server.forked
        stop.set()
        thread.join()
        report(first=first, second=second, third=third, forked_again=forked_again,
               forked_last=forked_last, me=os.getpid(), pids=pids)
        """
    )
    assert len({report["first"], report["second"], report["third"]}) == 3
    assert report["forked_again"] is True
    assert report["forked_last"] is False  # a fresh interpreter, as a forkserver
    assert report["me"] not in report["pids"]


@pytest.mark.timeout(90)
def test_a_pool_made_while_its_module_is_imported_finds_what_the_module_defines_later(tmp_path):
    # A zygote forked in the middle of an import would keep the half-built
    # module for good: a function defined below the pool's line would be
    # missing in every worker. Such a pool gets a forkserver; later ones, once
    # the import is done, the zygote.
    (tmp_path / "module_with_pool.py").write_text(
        textwrap.dedent(
            """
            import graphexec as gx
            pool = gx.Pool(1)

            def helper(x):
                return x * 10

            @gx.task
            def f(x):
                return helper(x) + 1
            """
        )
    )
    report, _ = _run(
        f"""
        sys.path.insert(0, {str(tmp_path)!r})
        import module_with_pool as m
        graph = gx.Graph()
        with graph:
            node = m.f(1)
        value = graph.compute(pool=m.pool)[node]
        method = m.pool.start_method
        m.pool.close()
        later = gx.Pool(1)
        later_method = later.start_method
        later.close()
        report(value=value, method=method, later=later_method)
        """
    )
    assert report == {"value": 11, "method": "forkserver", "later": "zygote"}


@pytest.mark.timeout(90)
def test_a_memory_limited_pool_gets_a_forkserver_by_default():
    # A zygote's worker counts the pages it shares with the program in its RSS,
    # which memory_limit= limits: a limited pool's workers start small instead.
    report, _ = _run(
        """
        limited = gx.Pool(1, memory_limit="1GB")
        plain = gx.Pool(1)
        asked = gx.Pool(1, memory_limit="1GB", start_method="zygote")
        report(limited=limited.start_method, plain=plain.start_method,
               asked=asked.start_method)
        for p in (limited, plain, asked):
            p.close()
        """
    )
    assert report == {"limited": "forkserver", "plain": "zygote", "asked": "zygote"}


# -- asking the server for workers without waiting for its fork -------------------


def test_a_pool_asks_for_its_next_worker_before_the_first_is_forked():
    # CPython's Popen waits for the server's fork (its pid) before it returns;
    # graphexec's reads the pid when first needed, so a pool asks for all its
    # workers, and sends them their first calls, before it waits for any.
    from graphexec._executors.process import ProcessPool

    pool = ProcessPool(2, start_method="zygote")
    try:
        first = pool._spawn()
        second = pool._spawn()
        assert not second.born  # nothing has read its pid yet
        pids = [first.pid, second.pid]
        assert all(isinstance(pid, int) and pid > 1 for pid in pids)
        assert pids[0] != pids[1]
        server = gx._executors.zygote.server([])._forkserver_pid
        assert {psutil.Process(pid).ppid() for pid in pids} == {server}
    finally:
        pool.shutdown()


def _server_dies_once(monkeypatch):
    """The next worker's server dies before forking it (its answer: end of file)."""
    from graphexec._executors import process

    real = process._ForkServerPopen._launch
    calls = []

    def launch(self, process_obj):
        calls.append(process_obj.name)
        if len(calls) > 1:
            return real(self, process_obj)
        read, write = os.pipe()
        os.close(write)
        self.sentinel = read
        self.finalizer = multiprocessing.util.Finalize(self, os.close, (read,))
        self._pid_lock = threading.Lock()

    monkeypatch.setattr(process._ForkServerPopen, "_launch", launch)
    return calls


@pytest.mark.timeout(60)
def test_a_server_that_dies_before_forking_fails_only_that_node(monkeypatch):
    # A pool's worker started for a call (not ahead of the run, see below).
    calls = _server_dies_once(monkeypatch)
    graph = gx.Graph()
    first = graph.add(os.getpid)
    with gx.Pool(workers=1, start_method="zygote") as pool:
        run = graph.compute(pool=pool, raise_on_failure=False)
        state = run.state(first)
        assert state.is_failed()
        error = state.result(raise_on_failure=False)
        assert isinstance(error, gx.WorkerCrashed)
        assert "ended before it started the worker that was to run" in str(error)
        # The next worker is forked as usual.
        assert graph.compute(pool=pool)[first] != os.getpid()
    assert len(calls) == 2


@pytest.mark.timeout(60)
def test_a_retry_runs_the_node_on_a_worker_the_server_did_fork(monkeypatch):
    _server_dies_once(monkeypatch)
    graph = gx.Graph()
    node = graph.add(gx.task(retries=1)(os.getpid))
    with gx.Pool(workers=1, start_method="zygote") as pool:
        run = graph.compute(pool=pool)
    assert run[node] != os.getpid()
    assert run.state(node).attempts == 2


@pytest.mark.timeout(60)
def test_a_worker_started_ahead_that_was_never_forked_is_replaced_unblamed(monkeypatch):
    # A cold compute starts its first workers before the first call (Lease.open):
    # one whose server died before forking it is found dead while idle, and
    # replaced, as any worker that dies idle.
    calls = _server_dies_once(monkeypatch)
    graph = gx.Graph()
    node = graph.add(os.getpid)
    run = graph.compute(workers=1, start_method="zygote")
    assert run[node] != os.getpid()
    assert run.state(node).attempts == 1
    assert len(calls) == 2


@pytest.mark.timeout(120)
def test_cold_computes_beside_a_thread_that_polls_every_child():
    # multiprocessing's _cleanup() (any Process.start, active_children()) polls
    # every child from whichever thread calls it: a pid not read yet, and a
    # worker let go at the end of a run, must never be misread there.
    stop = threading.Event()

    def poll_children():
        while not stop.is_set():
            multiprocessing.active_children()

    poller = threading.Thread(target=poll_children, daemon=True)
    poller.start()
    try:
        for _ in range(40):
            graph = gx.Graph()
            nodes = [graph.add(abs, -i) for i in range(6)]
            run = graph.compute(workers=3, start_method="zygote")
            assert [run[n] for n in nodes] == list(range(6))
    finally:
        stop.set()
        poller.join()


def test_an_interrupted_pid_read_is_done_again(monkeypatch):
    from graphexec._executors import process

    pool = process.ProcessPool(1, start_method="zygote")
    try:
        worker = pool._spawn()
        real = multiprocessing.forkserver.read_signed

        def interrupted(fd):
            monkeypatch.setattr(multiprocessing.forkserver, "read_signed", real)
            raise KeyboardInterrupt

        monkeypatch.setattr(multiprocessing.forkserver, "read_signed", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _ = worker.process.pid
        assert not worker.born
        pid = worker.pid
        assert isinstance(pid, int) and psutil.Process(pid).ppid() != os.getpid()
        assert worker.process.exitcode is None  # its pid was not taken for an exit status
    finally:
        pool.shutdown()


@pytest.mark.timeout(90)
def test_a_program_with_sigpipe_at_its_default_keeps_its_zygote():
    # A pool lets go of a cold compute's workers: the zygote's write of their
    # exit status then meets a closed pipe, which must fail, not kill it.
    report, _ = _run(
        """
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        compute(os.getpid, n=2, workers=2)
        first = zygote.server([])._forkserver_pid
        for _ in range(3):
            compute(os.getpid, n=2, workers=2)
            time.sleep(0.2)  # the workers' exit reaches the zygote meanwhile
        server = zygote.server([])
        report(first=first, last=server._forkserver_pid, alive=server._alive())
        """
    )
    assert report["alive"] and report["first"] == report["last"]


def test_a_pid_never_read_kills_no_process_group():
    # os.killpg(0, ...) is the caller's own group: a worker whose server died
    # before forking it has no pid (None) and must never be "killed".
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from graphexec._executors.process import _kill_group\n"
            "from graphexec._executors.worker import descendants\n"
            "_kill_group(None); _kill_group(0); _kill_group(1)\n"
            "assert descendants(None) == []\n"
            "print('alive')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # were it broken, it kills its own group, not pytest
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert out.stdout.strip() == "alive", out.stderr


# -- a cold compute starts its first workers before it builds its scheduler ----------


@pytest.fixture
def spawns(monkeypatch):
    """The workers each cold compute starts, and how many before the first submit."""
    from graphexec._executors import process

    seen = {"spawned": 0, "before_submit": None}
    real_spawn, real_submit = process.ProcessPool._spawn, process.ProcessPool.submit

    def spawn(self):
        seen["spawned"] += 1
        return real_spawn(self)

    def submit(self, call):
        if seen["before_submit"] is None:
            seen["before_submit"] = seen["spawned"]
        return real_submit(self, call)

    monkeypatch.setattr(process.ProcessPool, "_spawn", spawn)
    monkeypatch.setattr(process.ProcessPool, "submit", submit)
    return seen


@gx.task
def _plus(x):
    return x + 1


def test_independent_tasks_get_their_workers_before_the_first_call(spawns):
    graph = gx.Graph()
    with graph:
        nodes = [_plus(i) for i in range(6)]
    run = graph.compute(workers=2)
    assert [run[n] for n in nodes] == list(range(1, 7))
    assert spawns == {"spawned": 2, "before_submit": 2}


def test_a_chain_still_gets_one_worker(spawns):
    graph = gx.Graph()
    with graph:
        x = _plus(0)
        for _ in range(5):
            x = _plus(x)
    assert graph.compute(workers=2)[x] == 6
    assert spawns == {"spawned": 1, "before_submit": 1}


def test_a_rerun_whose_entries_are_all_cached_starts_no_worker(spawns, tmp_path):
    cached = gx.task(cache=True)(_plus.fn)
    graph = gx.Graph()
    with graph:
        nodes = [cached(i) for i in range(4)]
    graph.compute(workers=2, cache_dir=tmp_path)
    spawns.update(spawned=0, before_submit=None)
    run = graph.compute(workers=2, cache_dir=tmp_path)
    assert [run[n] for n in nodes] == [1, 2, 3, 4]
    assert spawns == {"spawned": 0, "before_submit": None}


@pytest.mark.timeout(90)
def test_a_zygote_started_inside_with_graph_gives_its_workers_no_graph_and_the_collector():
    # The zygote is forked when the first pool starts: inside `with graph:` (a
    # notebook computing in the block) it copied the graph stack and the paused
    # collector, and every later worker's plain task call returned a Node.
    report, _ = _run(
        """
        import gc

        @gx.task
        def helper(x):
            return x * 10

        @gx.task
        def calls_helper(x):
            return helper(x) + 1

        @gx.task
        def collector_on(_):
            return gc.isenabled()

        graph = gx.Graph()
        with graph:
            a, b = calls_helper(1), collector_on(0)
            inside = graph.compute(workers=1, keep="all")
            inside = [inside[a], inside[b]]
        after = graph.compute(workers=1, keep="all")
        report(inside=inside, after=[after[a], after[b]], started=zygote._state is not None)
        """
    )
    assert report == {"inside": [11, True], "after": [11, True], "started": True}


@pytest.mark.timeout(90)
def test_ctrl_c_and_sigterm_wait_out_the_zygotes_fork_and_the_zygote_gets_them_back():
    # A Ctrl-C that came while CPython ran its after-fork hooks in the program was
    # printed as "Exception ignored" and lost: the compute ran to its end. Both
    # signals are held during the fork (and delivered after it); the zygote, and
    # so its workers, do not keep them held.
    report, stdout = _run(
        """
        real_fork = os.fork
        held = []

        def fork():
            held.append(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
            return real_fork()

        os.fork = fork
        program = os.getpid()

        def ctrl_c_in_the_zygote():  # a Ctrl-C reaching the new child as it starts
            if os.getppid() == program and zygote.threads() == 1:
                os.kill(os.getpid(), signal.SIGINT)

        os.register_at_fork(after_in_child=ctrl_c_in_the_zygote)

        def blocked():
            return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))

        with gx.Pool(workers=1) as pool:
            in_worker = compute(blocked, pool=pool)[0]
        # (a copy of this program escaping from the zygote would print a second one)
        report(held=held, in_worker=in_worker, after=blocked(), pid=os.getpid())
        """
    )
    assert stdout.count("REPORT ") == 1, stdout  # the zygote dropped the Ctrl-C: no copy ran on
    assert report["held"] and {signal.SIGINT, signal.SIGTERM} <= set(report["held"][0])
    assert signal.SIGINT not in report["in_worker"] and signal.SIGTERM not in report["in_worker"]
    assert signal.SIGINT not in report["after"]


SPARES = """
def spares(wanted=zygote.SPARES, server=None):
    # The zygote's spares (or ``server``'s), once it has made ``wanted`` of them
    # (it waits for a pause in requests first).
    zpid = (server or zygote.server([]))._forkserver_pid
    deadline = time.monotonic() + 10
    while True:
        found = []
        for p in psutil.Process(zpid).children():
            try:
                if p.name() == "gx-spare" and p.status() != "zombie":
                    found.append(p.pid)
            except psutil.Error:  # (a pool's worker exiting)
                pass
        found.sort()
        if len(found) >= wanted or time.monotonic() > deadline:
            return zpid, found
        time.sleep(0.01)

def me_and_parent():
    return os.getpid(), os.getppid(), open("/proc/self/comm").read().strip()
"""


@pytest.mark.timeout(90)
def test_a_new_pool_starts_on_the_spares_the_zygote_forked_while_idle():
    report, _ = _run(
        SPARES
        + textwrap.dedent(
            """
        compute(os.getpid, workers=1)
        zpid, ahead = spares()
        with gx.Pool(workers=2) as pool:
            seen = compute(me_and_parent, n=8, pool=pool)
            workers = sorted(pool._workers)
            pids = sorted(w.pid for w in pool._workers.values())
        # Used up: the zygote makes new ones after a pause, and the next pool runs
        # on those.
        _, again = spares()
        report(zpid=zpid, ahead=ahead, pids=pids, seen=seen, again=again,
               me=psutil.Process().name())
        """
        )
    )
    assert len(report["ahead"]) == 2
    assert report["pids"] == report["ahead"]  # no fork when the pool asked
    for pid, parent, name in report["seen"]:
        assert pid in report["ahead"]
        assert parent == report["zpid"]
        assert name == report["me"]  # a spare takes the program's name when a pool takes it
    assert len(report["again"]) == 2 and not set(report["again"]) & set(report["ahead"])


@pytest.mark.timeout(90)
def test_spares_are_forked_when_a_pools_workers_exit_not_while_it_runs():
    # While a pool runs, its workers need the cores: forking spares then took
    # CPU from the run; when its workers exit, cores have come free.
    report, _ = _run(
        SPARES
        + textwrap.dedent(
            """
        with gx.Pool(workers=2) as pool:
            compute(os.getpid, n=4, pool=pool)
            time.sleep(0.5)
            zpid = zygote.server([])._forkserver_pid
            during = [p.pid for p in psutil.Process(zpid).children() if p.name() == "gx-spare"]
        _, after = spares()
        report(during=during, after=after)
        """
        )
    )
    assert report["during"] == []
    assert len(report["after"]) == 2


@pytest.mark.timeout(90)
def test_a_worker_that_exits_while_the_spares_are_full_forks_none_later():
    # A review found the exit remembered: the next pool to take the spares had
    # them forked again at its start.
    report, _ = _run(
        SPARES
        + textwrap.dedent(
            """
        def spares_now():
            zpid = zygote.server([])._forkserver_pid
            return [p.pid for p in psutil.Process(zpid).children() if p.name() == "gx-spare"]

        a = gx.Pool(workers=1)
        compute(os.getpid, pool=a)
        compute(os.getpid, workers=1)  # its worker exits: two spares
        full = spares()[1]
        a.close()  # an exit while the spares are full
        time.sleep(0.3)
        with gx.Pool(workers=2) as c:
            compute(os.getpid, n=4, pool=c)  # takes both
            time.sleep(0.5)
            during = spares_now()
        report(full=full, during=during)
        """
        )
    )
    assert len(report["full"]) == 2
    assert report["during"] == []


@pytest.mark.timeout(90)
def test_graphexecs_forkserver_finds_graphexec_through_the_programs_sys_path():
    # The server is a fresh interpreter: it must import graphexec wherever the
    # program found it (a checkout beside the script, a notebook's
    # sys.path.append). -S (which the server inherits) keeps site-packages, and
    # the editable install's finder, off its default path.
    import sysconfig

    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{ROOT!r}, {sysconfig.get_paths()["purelib"]!r}]
        import graphexec as gx

        def where():
            import graphexec
            return graphexec.__file__

        graph = gx.Graph()
        node = graph.add(where)
        print("RESULT", graph.compute(workers=1, start_method="forkserver")[node])
        """
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GRAPHEXEC_", "PYTHON"))}
    done = subprocess.run(
        [sys.executable, "-S", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT " + os.path.join(ROOT, "graphexec", "__init__.py") in done.stdout


@pytest.mark.timeout(90)
def test_graphexecs_forkserver_keeps_spares_too():
    # A fresh interpreter (a numpy program's or a notebook's default server)
    # serves with the same loop.
    report, _ = _run(
        SPARES
        + textwrap.dedent(
            """
        from graphexec._executors import process
        compute(os.getpid, workers=1, start_method="forkserver")
        server = process._forkserver()
        zpid, ahead = spares(server=server)
        with gx.Pool(workers=2, start_method="forkserver") as pool:
            seen = compute(me_and_parent, n=8, pool=pool)
        report(zpid=zpid, ahead=ahead, seen=seen, cmdline=psutil.Process(zpid).cmdline(),
               server_name=psutil.Process(zpid).name())
        """
        )
    )
    assert "forkserver_main" in " ".join(report["cmdline"])
    assert len(report["ahead"]) == 2
    for pid, parent, name in report["seen"]:
        assert pid in report["ahead"]
        assert parent == report["zpid"]
        assert name == report["server_name"] != "gx-spare"  # a fresh interpreter's name


@pytest.mark.timeout(90)
def test_a_spare_that_died_waiting_is_replaced_unnoticed():
    errors: list[str] = []
    report, _ = _run(
        SPARES
        + textwrap.dedent(
            """
        compute(os.getpid, workers=1)
        zpid, ahead = spares()
        for pid in ahead:
            os.kill(pid, signal.SIGKILL)
        # Asked at once, before the zygote reaped them, and again after.
        first = compute(os.getpid, n=4, workers=2)
        time.sleep(0.2)
        second = compute(os.getpid, n=4, workers=2)
        report(ahead=ahead, first=first, second=second, left=spares()[1])
        """
        ),
        stderr=errors,
    )
    assert errors == [""]  # no warning, no traceback: the zygote, the pools
    assert len(report["first"]) == len(report["second"]) == 4  # every node ran
    assert len(report["left"]) == 2  # and the zygote forks spares again


@pytest.mark.timeout(90)
def test_spares_end_with_the_zygote_and_with_the_program():
    # The zygote killed under a running pool (whose workers, forked from it, hold
    # no spare's socket): its spares exit at once. Then the program killed: the
    # zygote it made next, and that one's spares, are gone too.
    script = (
        PRELUDE
        + textwrap.dedent(SPARES)
        + textwrap.dedent(
            """
        with gx.Pool(workers=2) as pool:
            compute(os.getpid, n=2, pool=pool)
            compute(os.getpid, workers=1)  # (the idle wait below is after a request)
            zpid, ahead = spares()
            os.kill(zpid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            def running(pid):
                try:
                    return psutil.Process(pid).status() != "zombie"
                except psutil.Error:  # (gone, or reaped by init meanwhile)
                    return False
            while any(running(p) for p in ahead) and time.monotonic() < deadline:
                time.sleep(0.01)
            alive = [p for p in ahead if running(p)]
            compute(os.getpid, workers=1)  # a new zygote
            zpid2, ahead2 = spares()
        report(alive=alive, ahead=ahead, ahead2=ahead2, zpid2=zpid2)
        sys.stdout.flush()
        time.sleep(60)
        """
        )
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHEXEC_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=environ
    )
    try:
        assert proc.stdout is not None
        line = next(x for x in proc.stdout if x.startswith("REPORT "))
        report = json.loads(line[len("REPORT ") :])
        assert len(report["ahead"]) == 2 and report["alive"] == []
        assert len(report["ahead2"]) == 2
        proc.kill()
        proc.wait(timeout=30)
        left = [report["zpid2"], *report["ahead2"]]
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in left if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _spare_peer(answer: bytes | None) -> tuple[socket.socket, threading.Thread, list[list[int]]]:
    """The zygote's end of a socket to a pretend spare that takes descriptors and
    answers ``answer`` (None: never; b"": closes unanswered, as a dead one)."""
    ours, its = socket.socketpair()
    got: list[list[int]] = []

    def spare() -> None:
        with its:
            if answer == b"":
                return
            _, fds, _, _ = socket.recv_fds(its, 16, 8)
            if not fds:  # the zygote's end closed: never handed a request
                return
            got.append(fds)
            if answer is not None:
                its.sendall(answer)
            else:
                its.recv(1)  # until the zygote's end closes
            for fd in fds:
                os.close(fd)

    thread = threading.Thread(target=spare, daemon=True)
    thread.start()
    return ours, thread, got


@pytest.fixture
def request_fds(monkeypatch):
    """A request's descriptors (a pipe's two ends); no spare may be killed meanwhile."""
    monkeypatch.setattr(os, "kill", lambda *a: pytest.fail("no spare is killed"))
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def test_a_request_goes_to_the_first_spare_that_answers(request_fds):
    r, w = request_fds
    dead, t1, _ = _spare_peer(b"")
    t1.join()  # its end closed: a spare that died before its exit was reaped
    live, t2, got2 = _spare_peer(b"!")
    spares = {101: dead, 102: live}
    assert zygote._hand_to_spare(spares, r, [w]) == 102
    t2.join(5)
    assert spares == {} and len(got2) == 1 and len(got2[0]) == 2  # child_r and the rest
    assert zygote._hand_to_spare({}, r, [w]) is None  # none left: the zygote forks


def test_a_spare_too_slow_to_answer_keeps_the_request(monkeypatch, request_fds):
    # It has the descriptors and may yet read the request: giving the request to
    # another process too would have two serve it (a review found that race).
    r, w = request_fds
    monkeypatch.setattr(zygote, "SPARE_ANSWER", 0.05)
    slow, thread, got = _spare_peer(None)
    other, t2, _ = _spare_peer(b"!")
    spares = {201: slow, 202: other}
    try:
        assert zygote._hand_to_spare(spares, r, [w]) == 201
        thread.join(5)
        assert len(got) == 1
        assert list(spares) == [202]  # the next request's
    finally:
        other.close()
        t2.join(5)


def test_graphexecs_forkserver_does_once_what_each_worker_did(monkeypatch):
    # Measured per worker of a numpy program before: 5 ms probing the loaded
    # libraries (threadpoolctl) and 5 ms importing the module its Process object
    # comes from; the server now does both before it serves.
    from graphexec._executors import process, threadlimits

    assert process.__name__ in process._preload()
    done: list[str] = []
    monkeypatch.setattr(threadlimits, "prepare_server", lambda: done.append("probed"))
    monkeypatch.setattr(zygote, "_serve", lambda *a: done.append("served"))
    zygote.forkserver_main(-1, -1, ["json"])
    assert done == ["probed", "served"]
