"""``run.inputs(node)`` and ``run.replay(node)``: a failed node again, in this process.

::

    run.replay(node)
      check: Failed, inputs kept (else the error names why, or the failure
             behind a Skipped/Cancelled node)
      the function: the run's graph holds it; a saved run's is unpickled
      its source hash now == when it failed?  else a warning
      WorkerCrashed ─> first in a fresh subprocess (python -c, the call pickled
                       on its stdin): crashes again ─> WorkerCrashed, not run here
      MemoryLimitExceeded ─> the same, its RSS watched against the limit it had:
                       over it again ─> MemoryLimitExceeded, not run here
      fn(*args, **kwargs) with fresh copies of the inputs, no timeout unless
      asked (SIGALRM, main thread); pdb=True: post-mortem where it raised

The inputs were kept when the node failed (``_engine/keep.py``); the last
line of ``GraphFailed``'s message is :func:`replay_hint`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import os
import pdb as _pdb
import pickle
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

from .._data.kept import KeptCall, source_hash
from .._data.serialize import dumps
from .._executors.runtime import Unloadable, load_function
from .._model.errors import (
    MemoryLimitExceeded,
    TaskTimeout,
    WorkerCrashed,
    describe_exitcode,
    one_line,
    safe_str,
)
from .._model.node import user_stacklevel
from .._model.run import Run
from .._model.sizes import size_text
from .._model.state import CANCELLED, FAILED, RUNNING, SKIPPED
from .._model.task import fn_name

# What the replay subprocess writes to its outcome pipe once the call is over: its
# exit code cannot say it, since the call itself may end the process with any code
# (os._exit(0) in a task is a crash here, not a return).
RETURNED, RAISED = b"R", b"E"
OUTCOME_FD_ENV = "GRAPHEXEC_REPLAY_OUTCOME_FD"
WATCH_INTERVAL = 0.05  # seconds between looks at the replay subprocess's memory
_CHILD = "from graphexec._surfaces.replay import child; child()"


def run_inputs(run: Run, node: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``Run.inputs``: fresh ``(args, kwargs)`` of a failed node."""
    i = run._lookup(node)
    return load_inputs(kept_call(run, i), run.graph._names[i])


def load_inputs(kept: KeptCall, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``kept.load()``; a failure to load is :class:`InputsUnloadable`, which says so."""
    try:
        return kept.load()
    except Exception as exc:  # a damaged record, or a class no longer importable here
        raise InputsUnloadable(
            f"the inputs of {name} could not be loaded from the record: "
            f"{type(exc).__name__}: {safe_str(exc)}. Is every module they need importable "
            "here (same environment as the run)? If the record is damaged, run the "
            "pipeline again to record it anew."
        ) from exc


class InputsUnloadable(ValueError):
    """A replay could not load the call's inputs (so the call was not made)."""


class FunctionUnloadable(LookupError):
    """A replay could not load the call's function (so the call was not made)."""


def kept_call(run: Run, i: int) -> KeptCall:
    """What failed node ``i`` received, ready to load.

    Raises:
        ValueError: the node did not fail (the message names what to replay instead).
        LookupError: its inputs were not kept, or were lost.
    """
    graph = run.graph
    name = graph._names[i]
    state = run._states[i]
    kind = state.name if state is not None else "Pending"
    if kind is SKIPPED or kind is CANCELLED:
        raise ValueError(
            f"{name} was {kind}: it never ran, so there is nothing to replay. {_root(run, i)}"
        )
    if kind is RUNNING:
        raise ValueError(
            f"{name} was running when the run's record ended: it never finished, and only "
            "nodes that ended Failed keep their inputs"
        )
    if kind is not FAILED:
        raise ValueError(
            f"{name} is {kind}, not Failed: only nodes that ended Failed keep their inputs "
            "and can be replayed"
        )
    kept: KeptCall | None = run._inputs.get(i)
    if kept is None:
        raise LookupError(
            f"the inputs of {name} were not kept: it failed before any call was made "
            "(or the run was read from a JSON document, which holds no inputs)"
        )
    if kept.dropped is not None:
        raise LookupError(f"the inputs of {name} were not kept: {kept.dropped}")
    if kept.lost:
        raise LookupError(
            f"the inputs of {name} are incomplete, so it cannot be replayed: "
            + "; ".join(kept.lost.values())
        )
    kept.unpack()
    return kept


def _root(run: Run, i: int) -> str:
    """Which failure to replay instead of Skipped/Cancelled node ``i``."""
    graph, states = run.graph, run._states
    seen, todo, roots = {i}, [i], []
    while todo:
        for up in graph._deps[todo.pop()]:
            if up in seen or not run._has(up):
                continue
            seen.add(up)
            st = states[up]
            if st is None:
                continue
            if st.name is FAILED:
                roots.append(up)
            elif st.name is SKIPPED or st.name is CANCELLED:
                todo.append(up)
    if not roots:  # cancelled (fail_fast, a flow body that raised): the run's failure
        # that nobody handled, else its first failure (one handled by a caught
        # .result() still names the node to replay)
        roots = [n.index for n in (run.unhandled or run.failed)[:1]]
    if not roots:
        return "No node of this run failed."
    first = graph._names[min(roots)]
    exc = run._final(min(roots)).exception
    what = f" ({one_line(exc)})" if exc is not None else ""
    others = f" (and {len(roots) - 1} more failed upstream)" if len(roots) > 1 else ""
    return f"The failure behind it is {first}{what}{others}: run.replay({first!r})"


def run_replay(run: Run, node: Any, pdb: bool = False, timeout: float | None = None) -> Any:
    """``Run.replay``: see the module docstring."""
    i = run._lookup(node)
    kept = kept_call(run, i)
    name = run.graph._names[i]
    fn = function_of(run, i, kept)
    check_source(fn, kept, name)
    if timeout is not None:
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(
                f"run.replay(timeout={timeout!r}): give a number of seconds above 0, or None "
                "for no timeout"
            )
        if threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "run.replay(timeout=...) works in the main thread only (it uses SIGALRM)"
            )
    failure = run._final(i).exception
    # Both could take this interpreter down (a segfault; memory the OOM killer or
    # the machine runs out of): a fresh subprocess tries first.
    if isinstance(failure, WorkerCrashed):
        in_subprocess(fn, kept, name, timeout, "crashed its worker")
    elif isinstance(failure, MemoryLimitExceeded):
        limit = failure.limit if isinstance(failure.limit, int) else None
        went = (
            f"went over its memory limit ({size_text(limit or 0, binary=True)})"
            if limit
            else "used too much memory"
        )
        in_subprocess(fn, kept, name, timeout, went, limit, memory=True)
    args, kwargs = load_inputs(kept, name)
    try:
        with _deadline(timeout, name):
            return fn(*args, **kwargs)
    except BaseException as exc:
        if pdb and not isinstance(exc, KeyboardInterrupt):
            _pdb.post_mortem(exc.__traceback__)
        raise


def function_of(run: Run, i: int, kept: KeptCall) -> Any:
    """The function node ``i`` ran: the graph's own, or a saved run's, unpickled."""
    if kept.fn_blob is None:
        return run.graph._tasks[i].fn
    fn = load_function(kept.fn_blob, kept.origin, adopt=False)
    if type(fn) is not Unloadable:
        return fn
    raise FunctionUnloadable(
        f"the function of {run.graph._names[i]} could not be loaded here: "
        f"{type(fn.exc).__name__}: {fn.exc}. Is its module importable (same environment "
        "and working directory as the run)?"
    ) from fn.exc


def check_source(fn: Any, kept: KeptCall, name: str) -> None:
    """Warn when ``fn``'s source file changed since the call failed, saying which
    code the replay runs: the one that failed (the live function, or one a record
    carries by value: a script's, a closure), whose traceback lines and pdb then
    show the file's new text; or the changed one (a record names a module's
    function, which is imported anew)."""
    if kept.source_hash is None:
        return
    now = source_hash(fn)
    if now is None or now == kept.source_hash:
        return
    code = getattr(fn, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    # cloudpickle pickles a function by value with its own helpers, by reference as a
    # plain global: the blob of the latter never names cloudpickle
    if kept.fn_blob is None or b"cloudpickle" in kept.fn_blob:
        what = (
            "the replay runs the code that failed, but tracebacks and pdb show the "
            "file's current lines, which are not that code. To try your change, call "
            f"the changed function on run.inputs({name!r})"
        )
    else:
        what = (
            "the replay runs the changed code, imported from its module now, not the "
            "code that failed"
        )
    warnings.warn(
        f"the source of {fn_name(fn)}{where} changed since {name} failed: {what}",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


@contextlib.contextmanager
def _deadline(timeout: float | None, name: str) -> Iterator[None]:
    if timeout is None:
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise TaskTimeout(
            f"the replay of {name} ran longer than {timeout:g} s", node=name, timeout=timeout
        )

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def in_subprocess(
    fn: Any,
    kept: KeptCall,
    name: str,
    timeout: float | None,
    why: str,
    limit: int | None = None,
    memory: bool = False,
) -> None:
    """Run the call in a fresh Python first (it crashed its worker, or went over
    its memory limit, ``why``); with ``limit``, the subprocess is killed when its
    resident memory goes over it.

    Raises:
        WorkerCrashed: it crashed there too; it is not run in this process.
        MemoryLimitExceeded: it went over ``limit`` there too; not run here either.
        TaskTimeout: ``timeout`` seconds passed.
    """
    print(
        f"graphexec: {name} {why}; replaying it in a fresh subprocess first, so that "
        + (
            "it cannot exhaust this interpreter's memory"
            if memory
            else "a crash cannot take this interpreter down"
        ),
        file=sys.stderr,
        flush=True,
    )
    blob = dumps((fn, kept.portable_state()))
    env = dict(os.environ)
    # The same imports as here: this process's path, the script's directory included.
    env["PYTHONPATH"] = os.pathsep.join([p or os.getcwd() for p in sys.path])
    said, tell = os.pipe()  # the subprocess's outcome (RETURNED, RAISED), or nothing
    env[OUTCOME_FD_ENV] = str(tell)  # (not an argument: the call may read sys.argv)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, env=env, pass_fds=(tell,)
        )
    except BaseException:
        os.close(said)
        raise
    finally:
        os.close(tell)
    # Fed from a thread: the call's inputs may be larger than the pipe, and the
    # subprocess is watched meanwhile.
    feeder = threading.Thread(target=_feed, args=(proc, blob), daemon=True)
    feeder.start()
    try:
        rss = _watch(proc, name, timeout, limit)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        feeder.join()
        # Written before it exited; not waited for (a process the call started may
        # hold the pipe open): nothing there now is nothing at all.
        os.set_blocking(said, False)
        try:
            outcome = os.read(said, 1)
        except BlockingIOError:
            outcome = b""
        finally:
            os.close(said)
    if rss is not None:
        assert limit is not None
        raise MemoryLimitExceeded(
            f"{name} used {size_text(rss or 0, binary=True)} of memory again when replayed in "
            f"a fresh subprocess, over its memory limit ({size_text(limit, binary=True)}); it "
            "was killed there and is not run in this process, whose memory it would exhaust "
            "too. Its inputs are "
            f"run.inputs({name!r})",
            node=name,
            limit=limit,
            rss=rss,
        )
    code = proc.returncode
    if outcome in (RETURNED, RAISED):
        how = "returned" if outcome == RETURNED else "raised (its traceback is above)"
        print(
            f"graphexec: {name} did not {'run out of memory' if memory else 'crash'} "
            f"in the subprocess (it {how}); replaying it in this process now",
            file=sys.stderr,
            flush=True,
        )
        return
    # (0 too: the call ended the process itself, os._exit(0), before returning)
    signal_name = describe_exitcode(code)[0]
    died = f"killed by {signal_name}" if signal_name else f"exit code {code}"
    raise WorkerCrashed(
        f"{name} crashed again when replayed in a fresh subprocess ({died}); it is not run "
        "in this process, which it would take down too. Its inputs are "
        f"run.inputs({name!r}); the subprocess's output (with a faulthandler traceback "
        "for a fatal signal) is above",
        node=name,
        exitcode=code,
        signal_name=died[10:] if code < 0 else None,
    )


def _feed(proc: subprocess.Popen[bytes], blob: bytes) -> None:
    stdin = proc.stdin
    assert stdin is not None
    try:
        stdin.write(blob)
        stdin.close()
    except OSError:  # it died before reading it all: its exit code says how
        pass


def _watch(
    proc: subprocess.Popen[bytes], name: str, timeout: float | None, limit: int | None
) -> int | None:
    """Wait for the replay subprocess; its RSS when it went over ``limit`` (it is then
    still running), else None once it exited.

    Raises:
        TaskTimeout: ``timeout`` seconds passed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    ps = None
    if limit is not None:
        import psutil  # deferred: psutil loads slowly, and only this path needs it

        ps = psutil.Process(proc.pid)
    while True:
        wait = WATCH_INTERVAL if ps is not None else None
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            wait = left if wait is None else min(wait, left)
        try:
            proc.wait(wait)
            return None
        except subprocess.TimeoutExpired:
            pass
        if ps is not None and limit is not None:
            try:
                rss = ps.memory_info().rss
            except Exception:  # it exited between the wait and the look
                continue
            if rss > limit:
                return rss
        if deadline is not None and time.monotonic() >= deadline:
            raise TaskTimeout(
                f"the replay of {name} in a fresh subprocess ran longer than {timeout:g} s",
                node=name,
                timeout=timeout,
            )


def child() -> None:
    """The replay subprocess: the call arrives pickled on stdin; its outcome goes to
    the descriptor named by ``OUTCOME_FD_ENV`` (see ``RETURNED``)."""
    faulthandler.enable()
    tell = int(os.environ.pop(OUTCOME_FD_ENV))
    os.set_inheritable(tell, False)  # not into processes the call starts
    fn, state = pickle.loads(sys.stdin.buffer.read())
    args, kwargs = KeptCall.from_state(state, None).load()
    try:
        fn(*args, **kwargs)
    except BaseException:
        traceback.print_exc()
        outcome = RAISED
    else:
        outcome = RETURNED
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(tell, outcome)
    os._exit(0)


def replay_hint(run: Run, i: int) -> str:
    """The last line of ``GraphFailed``'s message: how to reproduce node i's failure."""
    name = run.graph._names[i]
    kept: KeptCall | None = run._inputs.get(i)
    if kept is None:
        return f"{name} failed before a call was made: there is nothing to replay."
    if kept.dropped is not None or kept.lost:
        why = kept.dropped if kept.dropped is not None else "; ".join(kept.lost.values())
        # Past the cap, a later failure of the same task may still be replayable
        task = run.graph._tasks[i]
        for node in run.unhandled:
            other = run._inputs.get(node.index)
            if run.graph._tasks[node.index] is task and other is not None and other.complete:
                return (
                    f"Its inputs were not kept, so it cannot be replayed: {why}. Another "
                    f"failed call of {fn_name(task.fn)} can be: "
                    f"{replay_hint(run, node.index).removeprefix('Reproduce it: ')}"
                )
        return f"Its inputs were not kept, so it cannot be replayed: {why}."
    names = run.graph._names
    shared = sum(1 for k in run.members if names[k] == name) > 1  # then by position
    # exc.run.nodes lists the members in run order; `#k` on the command line names
    # the record's numbering (record.py's journal: graph order for a compute, the
    # order of submission for a flow; a loaded run's graph order is its record's)
    python = f"exc.run.nodes[{run.members.index(i)}]" if shared else repr(name)
    cli: str | None = name
    if shared:
        ids = run._record_ids
        at = sum(1 for k in run.members if k < i) if ids is None else ids.get(i)
        cli = None if at is None else f"#{at}"  # None: not in the record yet
    # An argument that would not pickle is in this process only: no command line
    if run._record is not None and kept.portable and cli is not None:
        return (
            f"Reproduce it: python -m graphexec replay {shlex.quote(str(run._record))} "
            f"{shlex.quote(cli)}  (--pdb to debug it)"
        )
    return f"Reproduce it: exc.run.replay({python})  (exc: this GraphFailed; pdb=True to debug it)"
