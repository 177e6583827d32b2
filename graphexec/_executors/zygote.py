"""The zygote: graphexec's fork server, forked from the program itself while it runs one thread.

A forkserver is a fresh Python interpreter: before the first worker can fork
from it, it starts Python and imports multiprocessing and the worker module,
60-90 ms of a fresh script's first compute. The zygote is the same server
(multiprocessing's forkserver loop and protocol, so workers are forked and
run exactly as forkserver workers: same ``Popen``, same preparation data,
same worker loop) started by ``os.fork()`` of the program instead: it exists
in about a millisecond, with graphexec and the program's modules already
loaded, and the first workers fork from it at once.

Forking a process that runs several threads is unsafe (a lock another thread
held stays held forever in the child), so the zygote is forked only while
the program runs exactly one OS thread (``/proc/self/task``, which counts C
threads too). Asked for by name (``start_method="zygote"``), it does not count
OpenBLAS's pool threads: numpy's OpenBLAS starts them when numpy loads and
joins them before every fork (its ``pthread_atfork`` handler), so they are
gone at the fork, and the parent checks right after it that it ran alone
(else the child is killed before it serves). A program that imported numpy
never gets the zygote by default, however many threads it runs
(``OPENBLAS_NUM_THREADS=1``, one core): its workers would share whatever
random generators its modules made at import (``RNG =
np.random.default_rng()``), where a forkserver's workers each import the
module and seed their own. Otherwise, or when the program is large
(``ZYGOTE_MAX_RSS``: every worker's RSS counts the pages it shares with the
zygote, see ``memory_limit=``), the server is started as a fresh interpreter
instead, like graphexec's forkserver. Once running, the zygote serves every
pool of the process whatever threads the program starts later: it is a
process of its own, single-threaded, and never touches the program again.

What the zygote does with what it inherits (``_become_zygote``):

* its threads: none (the program had one: the thread that forked);
* its file descriptors: files, directories and devices stay open, as across
  a plain ``fork`` (a module-level log file keeps receiving what workers
  write); every other one (pipes, sockets) but stdin, stdout, stderr and the
  two it serves on is pointed at a pipe nobody reads (``_only_fds``): the
  program's pipes are not held open by the zygote or its workers, so their
  peers still see end-of-file, and a stale connection object used by a task
  fails loudly instead of writing into the void;
* its objects: kept, untouched, and frozen out of the garbage collector
  (``gc.freeze``): collecting or dropping the program's objects would run
  their finalizers (a temporary file's removal, a connection's goodbye) on
  resources that are the program's; it exits with ``os._exit``, and so do
  its workers, so no ``atexit`` hook of the program runs in them;
* its signal handlers: Python-level handlers go back to the defaults of a
  fresh interpreter (ignored signals stay ignored, as across ``exec``);
  ``faulthandler`` as a fresh interpreter would have it;
* ``sys.stdin``/``stdout``/``stderr``: the interpreter's own
  (``sys.__stdout__``...), not whatever the program put there (a capture, a
  tee); the program's streams are flushed before the fork, so nothing
  buffered is written twice;
* multiprocessing's own forkserver and resource tracker state: reset, so a
  task may start its own process pools as in a fresh process;
* its name: ``gx-zygote`` (``/proc/self/comm``, what ``ps`` and ``top``
  show); its workers take the program's name back.

It serves with a loop of its own (``_serve``: the stdlib's protocol, plus two
*spares*, ``gx-spare``: workers forked ahead when a pool's worker exits, which
the next pool's request starts at once).

It dies with the program: it reads the end-of-file of a pipe whose write
end only the program and the workers hold (as a forkserver does), and
workers end when the program dies (their watchdog, the pool's guard); its
spares end with it (the end of file of their sockets).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import faulthandler
import gc
import inspect
import os
import selectors
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection, resource_tracker
from multiprocessing import forkserver as mp_forkserver
from multiprocessing import process as mp_process
from multiprocessing import spawn as mp_spawn
from multiprocessing import util as mp_util
from typing import Any, cast

from . import threadlimits

# The program's RSS above which no zygote is forked (a fresh-interpreter server
# is started instead): a forked worker's RSS counts every page it shares with
# the zygote, so a big program would start each worker near its memory_limit=
# (and forking it copies page tables: a few ms per GB).
ZYGOTE_MAX_RSS = 256 * 1024 * 1024
NAME = "gx-zygote"  # /proc/<pid>/comm of the zygote (at most 15 characters)
# Workers forked ahead and waiting for a pool (see _serve): how many, and their name
# until a pool takes them.
SPARES = 2
SPARE_NAME = "gx-spare"
SPARE_ANSWER = 0.25  # seconds the zygote waits for a spare to say it took a request
# Seconds before forking again after a spare died unused (or a fork failed),
# doubling each time up to SPARE_BACKOFF, back to SPARE_RETRY once one is used.
SPARE_RETRY = 0.05
SPARE_BACKOFF = 60.0
# The stdlib's forkserver protocol as 3.10 to 3.13 speak it (_serve speaks it
# too); a later one (3.14 authenticates its clients) gets the stdlib's own loop.
_STDLIB_PROTOCOL = list(inspect.signature(mp_forkserver.main).parameters) == [
    "listener_fd",
    "alive_r",
    "preload",
    "main_path",
    "sys_path",
] and list(inspect.signature(mp_forkserver._serve_one).parameters) == [  # type: ignore[attr-defined]
    "child_r",
    "fds",
    "unused_fds",
    "handlers",
]
_ENV_MAX_RSS = "GRAPHEXEC_ZYGOTE_MAX_RSS"

_state: tuple[int, Zygote] | None = None  # (pid of the process it serves, server)
_lock = threading.Lock()


def threads() -> int | None:
    """How many OS threads this process runs (C threads too); None where unknown."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def rss() -> int | None:
    """This process's resident set size in bytes; None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def max_rss() -> int:
    """``ZYGOTE_MAX_RSS``, or ``GRAPHEXEC_ZYGOTE_MAX_RSS`` (bytes) if set."""
    try:
        return int(os.environ.get(_ENV_MAX_RSS) or ZYGOTE_MAX_RSS)
    except ValueError:
        return ZYGOTE_MAX_RSS


def why_not_fork(asked: bool = False) -> str | None:
    """Why a zygote cannot be forked from this process now, or None if it can.

    ``asked``: the zygote was asked for by name (``start_method="zygote"``):
    a program that imported numpy may have it, and OpenBLAS's pool threads,
    which stop themselves at a fork, do not count. Never by default: see
    the module's docstring.
    """
    if not asked and "numpy" in sys.modules:
        return (
            "it imported numpy: its workers would share the random generators its "
            "modules made at import (start_method='zygote' forks it anyway)"
        )
    if not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return "not Linux"
    count = threads()
    if count is None:
        return "its threads cannot be counted (no /proc)"
    if count != 1:
        # numpy's OpenBLAS threads stop themselves at a fork (threadlimits.
        # threads_shut_at_fork); any other thread, Python's or C's, rules it out.
        # _fork checks afterwards that they did stop.
        blas = 0
        if asked and threading.active_count() == 1:
            blas = threadlimits.threads_shut_at_fork()
        if count != 1 + blas:
            return f"it runs {count} threads" + (f", {blas} of them OpenBLAS's" if blas else "")
    if threading.current_thread() is not threading.main_thread():
        return "not in the main thread (signal handlers can only be set there)"
    size = rss()
    if size is None or size > max_rss():
        return f"its RSS ({size} bytes) is over {max_rss()}"
    importing = _importing()
    if importing is not None:
        return f"module {importing} is still being imported"
    return None


def _importing() -> str | None:
    """A module whose import is under way (a pool made at module level), if any.

    A zygote forked now would keep the half-built module for good: its workers
    never import it again, so a function defined below the line that made the
    pool would not be found in them.
    """
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            return name
    return None


def running() -> bool:
    """Whether this process has started its zygote (forked or not) and it may still run."""
    state = _state
    return state is not None and state[0] == os.getpid() and state[1].started


def server(preload: list[str]) -> Zygote:
    """This process's zygote server (one per process; a forked child gets its own).

    ``preload``: what a fresh-interpreter server imports, when it cannot be forked.
    """
    global _state
    with _lock:
        if _state is None or _state[0] != os.getpid():
            _state = (os.getpid(), Zygote())
        zygote = _state[1]
        zygote.set_forkserver_preload(preload)
        return zygote


class ForkServer(mp_forkserver.ForkServer):
    """multiprocessing's ``ForkServer``, whose fresh interpreter serves with ``_serve``
    (spares) instead of the stdlib's loop: graphexec's forkserver, and the zygote's
    when it cannot be forked.

    ``ensure_running`` is the stdlib's (the same in 3.10 to 3.13) but for the
    command the server runs; a Python whose protocol is not that one
    (``_STDLIB_PROTOCOL``) gets the stdlib's server, without spares.
    """

    def ensure_running(self) -> None:
        if not _STDLIB_PROTOCOL:
            super().ensure_running()
            return
        me: Any = self
        with me._lock:
            resource_tracker.ensure_running()
            if self._alive():
                return
            # The program's sys.path first, as a spawned worker gets it: graphexec may
            # be importable only through it (a checkout beside the script, a notebook's
            # sys.path.append), and the stdlib's command imports only the stdlib.
            cmd = (
                "import sys; data = %r; sys.path[:] = data.get('sys_path', sys.path); "
                f"from {__name__} import forkserver_main; forkserver_main(%d, %d, %r, **data)"
            )
            prepared = mp_spawn.get_preparation_data("ignore")
            data = {k: v for k, v in prepared.items() if k in ("main_path", "sys_path")}
            with socket.socket(socket.AF_UNIX) as listener:
                address = cast(Any, connection).arbitrary_address("AF_UNIX")
                listener.bind(address)
                if not mp_util.is_abstract_socket_namespace(address):
                    os.chmod(address, 0o600)
                listener.listen()
                # Every client holds the write end of the "alive" pipe: when all are
                # gone, the server reads its end of file.
                alive_r, alive_w = os.pipe()
                try:
                    fds_to_pass = [listener.fileno(), alive_r]
                    cmd %= (data, listener.fileno(), alive_r, me._preload_modules)
                    exe = mp_spawn.get_executable()
                    args = [exe, *mp_util._args_from_interpreter_flags(), "-c", cmd]  # type: ignore[attr-defined]
                    pid = mp_util.spawnv_passfds(cast(Any, exe), args, fds_to_pass)
                except BaseException:
                    os.close(alive_w)
                    raise
                finally:
                    os.close(alive_r)
                me._forkserver_address = address
                me._forkserver_alive_fd = alive_w
                me._forkserver_pid = pid

    def _alive(self) -> bool:
        """Whether the server runs; if it ended, forget it (it is launched again)."""
        me: Any = self
        pid = me._forkserver_pid
        if pid is None:
            return False
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else's waitpid(-1)
            done = pid
        if not done:
            return True
        if me._forkserver_alive_fd is not None:
            os.close(me._forkserver_alive_fd)
        me._forkserver_address = None
        me._forkserver_alive_fd = None
        me._forkserver_pid = None
        return False


def forkserver_main(
    listener_fd: int,
    alive_r: int,
    preload: list[str],
    main_path: str | None = None,
    sys_path: list[str] | None = None,
) -> None:
    """The fresh interpreter's server (``ForkServer``): the stdlib's preload, then ``_serve``."""
    if preload:
        if "__main__" in preload and main_path is not None:
            process = mp_process.current_process()
            process._inheriting = True  # type: ignore[attr-defined]
            try:
                mp_spawn.import_main_path(main_path)
            finally:
                del process._inheriting  # type: ignore[attr-defined]
        for module in preload:
            try:
                __import__(module)
            except ImportError:
                pass
    threadlimits.prepare_server()  # as the zygote does: once, not in every worker
    _serve(listener_fd, alive_r, _comm())


class Zygote(ForkServer):
    """multiprocessing's ``ForkServer`` whose server is a fork of this process when it can be.

    ``connect_to_new_process`` (and so ``popen_forkserver.Popen``) is the
    stdlib's, unchanged: the server side runs ``multiprocessing.forkserver.main``
    either way.
    """

    def __init__(self) -> None:
        super().__init__()
        # multiprocessing's own fields (as its __init__ sets them), typed here.
        self._lock = threading.Lock()
        self._forkserver_address: Any = None
        self._forkserver_alive_fd: int | None = None
        self._forkserver_pid: int | None = None
        self.forked = False  # the running server is a fork of this process
        self.started = False

    def ensure_running(self) -> None:
        """Start the server if it is not running: forked when :func:`why_not_fork` allows."""
        with self._lock:
            if self._alive():
                return
            # Lenient on OpenBLAS's threads: the default start method chose the
            # zygote only if why_not_fork() found none, so here it was asked for.
            if why_not_fork(asked=True) is None and self._fork():
                return
        # Several threads (or no /proc): a fresh interpreter, as a forkserver.
        super().ensure_running()
        self.forked = False
        self.started = True

    def _fork(self) -> bool:
        """Fork the zygote; False (and no zygote) if other threads ran at the fork after all."""
        address = cast(Any, connection).arbitrary_address("AF_UNIX")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(address)
            if not mp_util.is_abstract_socket_namespace(address):
                os.chmod(address, 0o600)
            listener.listen()
            # The program and every worker hold the write end; the zygote
            # exits at its end-of-file, once all of them are gone.
            alive_r, alive_w = os.pipe()
            # Ctrl-C and SIGTERM wait until the fork is over and recorded: one that
            # came while CPython ran its after-fork hooks (logging's lock release)
            # was printed as "Exception ignored" and lost, and the compute ran on.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_AT_FORK)
            try:
                try:
                    _flush_streams()  # or their buffered text would be written twice
                    pid = os.fork()
                    if pid == 0:  # (the signals still held: see _become_zygote)
                        _become_zygote(listener.fileno(), alive_r, held)  # never returns
                except BaseException:
                    os.close(alive_w)
                    raise
                finally:
                    os.close(alive_r)
                return self._forked(pid, address, alive_w)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)  # (what came is raised now)

    def _forked(self, pid: int, address: Any, alive_w: int) -> bool:
        """Keep the zygote just forked, or end it if other threads ran at the fork."""
        if threads() != 1:
            # A thread ran beside the fork: the threads why_not_fork took for
            # OpenBLAS's did not stop at it (OpenBLAS's handler leaves none
            # until the next BLAS call). The child may hold a lock one of them
            # held: it never serves; a fresh interpreter does instead.
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: reaped already
                os.waitpid(pid, 0)
            os.close(alive_w)
            if not mp_util.is_abstract_socket_namespace(address):
                with contextlib.suppress(OSError):
                    os.unlink(address)
            return False
        self._forkserver_address = address
        self._forkserver_alive_fd = alive_w
        self._forkserver_pid = pid
        self.forked = self.started = True
        return True


_HELD_AT_FORK = {signal.SIGINT, signal.SIGTERM}


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _become_zygote(listener_fd: int, alive_r: int, held: set[int | signal.Signals]) -> None:
    """In the forked child: shed what is the program's, then serve until the end of file.

    ``held``: the signal mask of the program before its fork, which held SIGINT and
    SIGTERM. One of them already pending here was meant for the program (a
    Ctrl-C reaches its whole process group): it is dropped, not raised in this
    copy of the program, which must never run the program's own code.
    """
    code = 1
    try:
        name = _comm()
        _fresh_signals()
        _drop_pending(held)
        _only_fds({0, 1, 2, listener_fd, alive_r})
        sys.stdin = sys.__stdin__
        sys.stdout = sys.__stdout__
        sys.stderr = sys.__stderr__
        _fresh_faulthandler()
        _fresh_multiprocessing()
        _set_comm(NAME)
        if name is not None:
            # Workers forked from here take the program's name back.
            os.register_at_fork(after_in_child=lambda: _set_comm(name))
        threadlimits.prepare_server()  # (before the freeze: its objects stay put too)
        gc.freeze()  # the program's objects: never collected (their finalizers are its)
        if _STDLIB_PROTOCOL:
            _serve(listener_fd, alive_r, name)
        else:  # a multiprocessing whose protocol this module does not know
            mp_forkserver.main(listener_fd, alive_r, [])
        code = 0
    except SystemExit:  # end of file on the alive pipe: the program and its workers are gone
        code = 0
    except BaseException:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
    finally:
        os._exit(code)


def _serve(listener_fd: int, alive_r: int, name: str | None) -> None:
    """``multiprocessing.forkserver.main``'s loop and protocol, with spares.

    A request is served as the stdlib serves it (the same descriptors, the
    child's pid and then its exit code written to the client), except that
    the child may be a spare: a process forked ahead, when cores came free,
    that has been through the fork and CPython's after-fork hooks and
    waits on a socket for the request's descriptors. A worker forked on
    request spends 4 to 5 ms there before it runs a line of its own (copying
    page tables, then a copy-on-write fault of about 5 us per page its
    after-fork hooks touch, on these virtual machines); a spare starts at
    once, so a new pool's workers start that much sooner. This is Android's
    zygote's pool of unspecialized processes (USAP), for the same reason.

    The zygote keeps ``SPARES`` of them, named ``gx-spare``, forked when a
    pool's worker exits (a pool closed, a worker crashed or was recycled):
    when cores come free, and never while a pool is starting and its workers
    need the cores. A spare holds nothing of any pool until it is handed one,
    and exits at the end of file of its socket: when the zygote exits, so do
    its spares. One that dies while waiting (the OOM killer, a stray kill) is
    forgotten when its exit is reaped (the next is forked after
    ``SPARE_RETRY``, doubling up to ``SPARE_BACKOFF`` while they keep dying
    unused), and a request that finds it dead gets the next spare or a process
    forked on the spot, as before.
    """
    mp_util._close_stdin()  # type: ignore[attr-defined]
    sig_r, sig_w = os.pipe()
    os.set_blocking(sig_r, False)
    os.set_blocking(sig_w, False)
    handlers: dict[signal.Signals, Any] = {
        signal.SIGCHLD: _wake_on_child,
        signal.SIGINT: signal.SIG_IGN,
    }
    old_handlers = {sig: signal.signal(sig, val) for sig, val in handlers.items()}
    signal.set_wakeup_fd(sig_w)  # (an os.write in a Python handler would race)
    pid_to_fd: dict[int, int] = {}  # a client's child -> the client's status pipe
    spares: dict[int, socket.socket] = {}  # a spare's pid -> the zygote's end of its socket

    def leave_zygote() -> None:
        """In a child of the zygote: close what is the zygote's (the stdlib's child does too)."""
        signal.set_wakeup_fd(-1)  # before its pipe is closed (a signal would write there)
        listener.close()
        selector.close()
        for fd in (alive_r, sig_r, sig_w, *pid_to_fd.values()):
            os.close(fd)
        for sock in spares.values():
            sock.close()

    with (
        socket.socket(socket.AF_UNIX, fileno=listener_fd) as listener,
        selectors.DefaultSelector() as selector,
    ):
        cast(Any, mp_forkserver._forkserver)._forkserver_address = listener.getsockname()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(alive_r, selectors.EVENT_READ)
        selector.register(sig_r, selectors.EVENT_READ)
        # When to fork spares: when a worker of a pool exits (a pool closed, a worker
        # crashed or was recycled), which is when cores come free, never while a
        # pool is starting; spares that die unused (the OOM killer in a full
        # cgroup, a process limit) later and later, not in a loop.
        due: float | None = None
        wait = SPARE_RETRY
        while True:
            try:
                timeout = None
                if due is not None and len(spares) < SPARES:
                    timeout = max(0.0, due - time.monotonic())
                events = selector.select(timeout)
                if not events:  # due, and nothing else to do first
                    try:
                        _fork_spare(spares, leave_zygote, old_handlers, name)
                    except OSError:  # (no process to spare: a limit)
                        due = time.monotonic() + wait
                        wait = min(wait * 2, SPARE_BACKOFF)
                    else:
                        if len(spares) >= SPARES:
                            due = None
                    continue
                ready = [key.fileobj for key, _ in events]
                if alive_r in ready:
                    # End of file: the program and all its workers are gone.
                    raise SystemExit
                if sig_r in ready:
                    os.read(sig_r, 65536)
                    exited, died = _reap(pid_to_fd, spares)
                    if died:
                        due = time.monotonic() + wait
                        wait = min(wait * 2, SPARE_BACKOFF)
                    elif exited and due is None and len(spares) < SPARES:
                        due = time.monotonic()  # (after the requests already waiting)
                if listener in ready:
                    with listener.accept()[0] as s:
                        fds = mp_forkserver.reduction.recvfds(  # type: ignore[attr-defined]
                            s, mp_forkserver.MAXFDS_TO_SEND + 1
                        )
                    if len(fds) > mp_forkserver.MAXFDS_TO_SEND:
                        raise RuntimeError(f"Too many ({len(fds):n}) fds to send")
                    child_r, child_w, *fds = fds
                    pid = _hand_to_spare(spares, child_r, fds)
                    if pid is not None:
                        wait = SPARE_RETRY  # spares live to be used
                    else:
                        pid = os.fork()
                        if pid == 0:
                            leave_zygote()
                            _child(child_r, fds, [child_w], old_handlers)
                    try:
                        mp_forkserver.write_signed(child_w, pid)
                    except BrokenPipeError:  # the client went
                        pass
                    pid_to_fd[pid] = child_w
                    os.close(child_r)
                    for fd in fds:
                        os.close(fd)
            except OSError as e:
                if e.errno != errno.ECONNABORTED:
                    raise


def _wake_on_child(*_: Any) -> None:
    """SIGCHLD's handler: nothing; the signal's byte on the wake-up pipe wakes the loop."""


def _reap(pid_to_fd: dict[int, int], spares: dict[int, socket.socket]) -> tuple[int, int]:
    """Send each exited child's exit code to its client; forget a spare that died.

    Returns how many of the clients' children exited, and how many spares died
    waiting.
    """
    exited = died = 0
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return exited, died
        if pid == 0:
            return exited, died
        child_w = pid_to_fd.pop(pid, None)
        if child_w is not None:
            exited += 1
            try:
                mp_forkserver.write_signed(child_w, os.waitstatus_to_exitcode(status))
            except BrokenPipeError:  # the client went
                pass
            os.close(child_w)
        else:
            sock = spares.pop(pid, None)  # (or one found dead when handed a request)
            if sock is not None:
                sock.close()
                died += 1


def _hand_to_spare(spares: dict[int, socket.socket], child_r: int, fds: list[int]) -> int | None:
    """Give a request's descriptors to the oldest live spare: its pid, or None if none took them.

    The spare says it has them: one killed a moment before (its exit not yet
    reaped) closes its socket unanswered, and the next one (or a fork) gets the
    request, which a dead process never read. One that does not answer within
    ``SPARE_ANSWER`` (stopped, or starved of CPU) keeps the request all the same:
    it has the descriptors, and it may yet read them, so no other process may.
    """
    while spares:
        pid = next(iter(spares))
        sock = spares.pop(pid)
        try:
            socket.send_fds(sock, [b"go"], [child_r, *fds])
            sock.settimeout(SPARE_ANSWER)
            if sock.recv(1) == b"!":
                return pid
        except TimeoutError:
            return pid
        except OSError:  # it died waiting (its exit not reaped yet): the next
            pass
        finally:
            sock.close()
    return None


def _fork_spare(
    spares: dict[int, socket.socket],
    leave_zygote: Callable[[], None],
    handlers: dict[signal.Signals, Any],
    name: str | None,
) -> None:
    """Fork a spare: it waits for a request's descriptors, then serves it as ``_child``."""
    ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        its.close()
        raise
    if pid:
        its.close()
        spares[pid] = ours
        return
    try:
        ours.close()
        leave_zygote()
        _set_comm(SPARE_NAME)
        _, fds, _, _ = socket.recv_fds(its, 16, mp_forkserver.MAXFDS_TO_SEND + 1)
        if not fds:  # end of file: the zygote is gone
            os._exit(0)
        its.sendall(b"!")  # (see _hand_to_spare)
        its.close()
        if name is not None:
            _set_comm(name)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
            sys.stderr.flush()
        os._exit(1)
    _child(fds[0], fds[1:], [], handlers)


def _child(
    child_r: int, fds: list[int], unused: list[int], handlers: dict[signal.Signals, Any]
) -> None:
    """Serve one request in the child, as the stdlib's forkserver child does; never returns."""
    code = 1
    try:
        if sys.version_info >= (3, 13):  # (as 3.13's forkserver: the child's own exit hooks)
            atexit._clear()  # type: ignore[attr-defined]
            atexit.register(mp_util._exit_function)  # type: ignore[attr-defined]
        code = mp_forkserver._serve_one(child_r, fds, unused, handlers)  # type: ignore[attr-defined]
    except Exception:
        sys.excepthook(*sys.exc_info())
        sys.stderr.flush()
    finally:
        if sys.version_info >= (3, 13):
            atexit._run_exitfuncs()  # type: ignore[attr-defined]
        os._exit(code)


def _drop_pending(mask: set[int | signal.Signals]) -> None:
    """Drop SIGINT and SIGTERM pending since the fork, then restore ``mask``: ignored
    while unblocked, a pending signal is discarded; then their fresh handlers."""
    fresh = {sig: signal.getsignal(sig) for sig in _HELD_AT_FORK}
    for sig in fresh:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for sig, handler in fresh.items():
        signal.signal(sig, handler)


def _fresh_signals() -> None:
    """Python-level handlers back to a fresh interpreter's (as ``exec`` does)."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (ValueError, OSError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            try:
                signal.signal(
                    sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
                )
            except (ValueError, OSError):
                pass
    # A fresh interpreter ignores SIGPIPE (writes fail with EPIPE instead): the
    # zygote writes each worker's exit status on a pipe its pool may have
    # closed already (ProcessPool.shutdown(wait=False)), and a program that set
    # SIGPIPE back to its default (common in command-line tools) must not make
    # that write kill the zygote, and every worker it serves with it.
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def _only_fds(keep: set[int]) -> None:
    """Take the program's pipes and sockets away from the zygote; keep its files.

    A pipe or socket held here would keep its peer from seeing end of file,
    and two processes talking on one connection corrupt it: each descriptor
    but ``keep`` that is neither a file, a directory nor a device is pointed
    at the write end of a pipe nobody reads (``dup2``, so the numbers stay
    taken). A task that uses such a stale object then fails loudly (an
    ``OSError``: ``BrokenPipeError`` on a write, not a socket on a socket
    call) instead of writing into the void. Files stay open, as across a
    plain ``fork``: a module-level log file (a ``logging.FileHandler`` made
    at import) keeps receiving what the workers write, as it would if they
    had imported the module themselves.
    """
    read_end, dead = os.pipe2(os.O_CLOEXEC)
    os.close(read_end)  # nobody will ever read: writes fail with EPIPE
    try:
        for entry in os.listdir("/proc/self/fd"):
            fd = int(entry)
            if fd in keep or fd == dead:
                continue
            try:
                mode = os.fstat(fd).st_mode
                if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISCHR(mode):
                    continue
                if stat.S_ISBLK(mode):
                    continue
                os.dup2(dead, fd, inheritable=False)
            except OSError:
                pass  # closed since the listing (the listing's own descriptor)
    finally:
        os.close(dead)


def _fresh_faulthandler() -> None:
    """faulthandler as a fresh interpreter has it (the program's may write to a closed file)."""
    if faulthandler.is_enabled():
        faulthandler.disable()
    if os.environ.get("PYTHONFAULTHANDLER") or "faulthandler" in sys._xoptions:
        faulthandler.enable()


def _fresh_multiprocessing() -> None:
    """multiprocessing's own servers as in a fresh process: a task's pools start their own."""
    shared: Any = mp_forkserver._forkserver
    shared._forkserver_address = None
    shared._forkserver_alive_fd = None
    shared._forkserver_pid = None
    shared._inherited_fds = None
    tracker: Any = resource_tracker._resource_tracker
    tracker._fd = None  # each worker is handed the program's tracker, as forkserver workers are
    tracker._pid = None


def _comm() -> str | None:
    try:
        with open("/proc/self/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _set_comm(name: str) -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def _forget_in_child() -> None:
    # A forked child (the zygote, a worker, the program's own os.fork()) is not
    # the process its parent's zygote serves; it makes its own if it needs one.
    global _state, _lock
    _state = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
