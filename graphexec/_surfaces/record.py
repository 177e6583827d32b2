"""A run's record on disk: ``run.save(path)``, ``compute(run_dir=...)``, ``Run.load``.

One format for every tool (``Run.load``, ``graphexec report``, ``graphexec
replay``): a file ``run.gxrun`` that starts with :data:`MAGIC` and goes on as
an append-only journal of frames, each ``kind`` (1 byte), ``length`` (8
bytes, little-endian) and a body. A ``J`` frame holds a JSON array of the
records written together (a batch); a record whose pickle follows
(``value``, ``inputs``) is the last of its frame::

    J  {"t": "start", "format", "version", "graph", "started", "pid", "host",
        "python", "graphexec", "nodes": [{"name", "task"}], "edges": [[up, down, kind]]}
    J  {"t": "add", "id", "name", "task", "edges"}      a node a flow submitted since
    J  ["run", id, attempt, at]                         an attempt was dispatched (written
                                                        only if it did not end in the batch)
    J  {"t": "value", "up"}                             an upstream value a failed node got,
    P  pickle of (data, buffers)                        written once for all who got it
    J  {"t": "inputs", "id", "nbytes", "dropped", "lost", "source_hash", "origin"}
    P  pickle of (fn_blob, KeptCall.portable_state() without values, value keys)
    J  {"t": "node", ...the JSON report's node record}  a node reached its final state,
       or ["ok", id, started, finished, worker]         a Completed node of one clean
                                                        attempt (most of them), compact
    J  {"t": "end", "finished", "handled", "ok"}        the run ended

Node ids are positions in graph order, as in ``run.to_json()`` (a flow's
nodes, which come as they are submitted, are numbered in the order the
record first sees them); a node's record is the same dict. ``run.save``
writes the whole journal at once; ``compute(run_dir=...)`` and
``@gx.flow(run_dir=...)`` write it as the run goes, from a thread of its own
(:class:`Journal`, an inline :class:`Observer`: the scheduler's thread only
appends events to a deque). Records are gathered and written, unbuffered,
every :attr:`Journal.EVERY` seconds (0.05) and at once for a failure, so a
process killed mid-run (SIGKILL, a batch system's walltime) leaves all but
the events of its last 50 ms; a torn last frame is ignored. Such a record
has no ``end``: it loads as interrupted (its headline, JSON and report say
so, never "ok"); the nodes it saw start but not finish load as ``Running``,
those it never saw start as ``Pending``.

Reading the states and the report parses JSON only. The pickles (a failed
node's function and arguments) are unpickled only when they are used
(``run.inputs``, ``run.replay``): that runs code from the file, so load
only records you trust.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from .._data.kept import KeptCall
from .._data.serialize import dumps
from .._model.errors import GraphexecError
from .._model.node import Node
from .._model.run import Run
from .._model.state import COMPLETED, FAILED, RUNNING, State
from .._version import __version__
from .hooks import HOOK_WAIT_ENV, Observer, hook_wait
from .report.codec import (
    FORMAT,
    VERSION,
    LoadedRun,
    edge_kind,
    node_record,
    run_from_dict,
    worker_id,
)

logger = logging.getLogger("graphexec")

MAGIC = b"GXRUN\x001\n"
FILE = "run.gxrun"  # the record inside a run directory
# What a loaded record without an ``end`` says in its headline, JSON and report.
INTERRUPTED = "the record ends mid-run (the process that wrote it stopped before the run ended)"
_HEAD = struct.Struct("<cQ")


# One encoder for every record (json.dumps would build one per call), compact.
_encode = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":")).encode


class Writer:
    """Appends frames to a record file: gathered, and written by :meth:`flush` in one
    unbuffered write (so what was flushed is in the kernel's hands, killed or not).

    JSON records are kept as dicts until the flush, which encodes them together
    as one ``J`` frame holding a JSON array: one call into the C encoder per
    batch, not one per node.
    """

    BATCH = 1 << 20  # bytes gathered before a write, whether or not anyone flushes
    RECORDS = 4096  # records gathered before a write, whether or not anyone flushes

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 (closed by close())
        self.values: set[int] = set()  # upstream values written (by node index)
        self._pending: list[bytes] = [MAGIC]
        self._size = len(MAGIC)
        self._records: list[dict[str, Any] | list[Any]] = []  # records not encoded yet
        self.flush()

    def json(self, record: dict[str, Any] | list[Any]) -> None:
        records = self._records
        records.append(record)
        if len(records) >= self.RECORDS:
            self.flush()

    def blob(self, body: bytes) -> None:
        self._seal()  # the records before it stay before it
        self._frame(b"P", body)

    def _seal(self) -> None:
        """The gathered records as one frame, in their place among the frames."""
        records = self._records
        if records:
            body = _encode(records).encode()  # an array, even of one
            records.clear()
            self._frame(b"J", body)

    def _frame(self, kind: bytes, body: bytes) -> None:
        self._pending.append(_HEAD.pack(kind, len(body)))
        self._pending.append(body)
        self._size += _HEAD.size + len(body)
        if self._size >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        self._seal()
        if not self._pending:
            return
        view = memoryview(b"".join(self._pending))
        self._pending.clear()
        self._size = 0
        while view:
            n = self._file.write(view)
            view = view[n:]

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._file.close()


def record_path(path: str | os.PathLike[str]) -> Path:
    """The record file of ``path``: itself, or ``run.gxrun`` in a run directory."""
    p = Path(path)
    return p / FILE if p.is_dir() else p


def is_record(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a saved run (a record file, or a run directory)."""
    try:
        with open(record_path(path), "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# -- writing ------------------------------------------------------------------------


class _Positions:
    """Node index <-> id (position in graph order) of one run."""

    def __init__(self, run: Run) -> None:
        self.members = sorted(run.members)
        self.id = {i: k for k, i in enumerate(self.members)}


def _start(run: Run, positions: _Positions) -> dict[str, Any]:
    graph = run.graph
    edges = []
    for k, i in enumerate(positions.members):
        for j, up in enumerate(graph._deps[i]):
            if up in positions.id:
                edges.append([positions.id[up], k, edge_kind(graph, i, j)])
    return {
        "t": "start",
        "format": FORMAT,
        "version": VERSION,
        "graph": graph.name,
        "started": run.started,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "graphexec": __version__,
        "nodes": [
            {"name": graph._names[i], "task": graph._tasks[i].name} for i in positions.members
        ],
        "edges": edges,
    }


def _write_inputs(writer: Writer, run: Run, i: int, k: int) -> None:
    kept: KeptCall | None = run._inputs.get(i)
    if kept is None:
        return
    if kept.packed is not None:  # read from a saved run: its bytes and values, not its code
        kept.unpack()
    fn_blob, why = kept.fn_blob, None
    if fn_blob is None:
        try:
            fn_blob = dumps(run.graph._tasks[i].fn)
        except Exception as exc:
            why = f"its function could not be pickled: {type(exc).__name__}: {exc}"
    state = kept.portable_state()
    if why is None and kept.complete and not kept.portable:
        why = "its inputs could not be pickled (they replay only in the process that ran it)"
    if why is not None:
        state = (None, {}, kept.lost, why, 0, kept.source_hash)
        fn_blob = None
    values = state[1]
    for up, value in values.items():  # each upstream value once per record
        if up not in writer.values:
            writer.values.add(up)
            writer.json({"t": "value", "up": up})
            writer.blob(dumps(value))
    if kept.origin is None:
        code = getattr(run.graph._tasks[i].fn, "__code__", None)
        kept.origin = getattr(code, "co_filename", None)
    meta = _meta(kept, k)
    meta["dropped"] = state[3]
    meta["origin"] = kept.origin
    writer.json(meta)
    writer.blob(dumps((fn_blob, (state[0], {}, *state[2:]), list(values))))


def _meta(kept: KeptCall, k: int) -> dict[str, Any]:
    return {
        "t": "inputs",
        "id": k,
        "nbytes": kept.nbytes,
        "dropped": kept.dropped,
        "lost": {str(up): why for up, why in kept.lost.items()},
        "source_hash": kept.source_hash,
    }


def _end(run: Run, positions: _Positions) -> dict[str, Any]:
    frame = {
        "t": "end",
        "finished": run.finished if run.finished is not None else time.time(),
        "handled": sorted(positions.id[i] for i in run._handled if i in positions.id),
        "ok": run.ok,
    }
    if run._interrupted is not None:  # Ctrl-C or SIGTERM cancelled it: never ok, loaded too
        frame["interrupted"] = run._interrupted
    return frame


def save_run(run: Run, path: str | os.PathLike[str]) -> Path:
    """``run.save(path)``: the whole record at once (written aside, then renamed)."""
    target = record_path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    positions = _Positions(run)
    writer = Writer(temporary)
    try:
        writer.json(_start(run, positions))
        for k, i in enumerate(positions.members):
            state = run._states[i]
            if state is None:
                continue
            if state.name is FAILED:
                _write_inputs(writer, run, i, k)
            writer.json({"t": "node", **node_record(run, i, k, state)})
        if not isinstance(run, SavedRun) or run.ended:
            writer.json(_end(run, positions))
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(temporary, target)
    run._record = target
    run._record_ids = None  # the saved file numbers its nodes in graph order
    return target


class Journal(Observer):
    """Writes a run's record as it goes (``compute(run_dir=...)``, ``@gx.flow(run_dir=...)``);
    see the module docstring.

    On the scheduler's thread (an inline observer) it appends each event to a
    deque, for about a microsecond; its own thread encodes and writes them, every
    :attr:`EVERY` seconds, and at once for a failure, whose write the scheduler's
    thread waits for (:attr:`FAILURE_WAIT` at most: the failure is on disk before
    its hooks run). (Through the hooks' dispatcher, every event cost a queue
    hand-off and a thread wake-up: most of what a run_dir cost on small tasks.)
    """

    # Called on the scheduler's thread: it only queues (and waits, bounded, for a
    # failure's write), never raises.
    _inline = True
    # It reads states, never values: a run it watches keeps its chains, and no
    # value is held back for it.
    _reads_values = False
    EVERY = 0.05  # seconds between writes: a killed process loses the events of these
    FAILURE_WAIT = 1.0  # seconds the scheduler's thread waits at most for a failure's write

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        directory = Path(run_dir)
        self.path = directory / FILE
        try:  # here, before the run: not a record that stops at its first event
            directory.mkdir(parents=True, exist_ok=True)
            self._writer: Writer | None = Writer(self.path)
        except OSError as exc:
            raise ValueError(
                f"run_dir={str(directory)!r}: the run's record cannot be written there "
                f"({exc.strerror or exc}); give a directory this process can write"
            ) from None
        self._run: Run | None = None
        self._positions: _Positions | None = None
        # Events from the scheduler's thread to the journal's: (i, attempt, at) for
        # a start, (i, state) for a final state. deque: append and popleft are atomic.
        self._events: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._ended = False
        self._thread: threading.Thread | None = None
        # Failures queued by the scheduler's thread, and written (flushed) by the
        # journal's: the first waits for the second (FAILURE_WAIT at most), so that a
        # process killed right after a failure (by its on_failure hook, a walltime)
        # still has it on disk.
        self._failures = 0
        self._failures_out = 0
        self._flushed = threading.Condition()

    def on_start(self, run: Run) -> None:
        self._run = run
        try:
            thread = threading.Thread(target=self._serve, name="graphexec-journal", daemon=True)
            thread.start()
        except RuntimeError as exc:  # no thread to be had: the run goes on, unrecorded
            logger.warning("the run's record %s is not written: %s", self.path, exc)
            return
        self._thread = thread
        self._wake.set()  # the start of the run on disk at once

    def on_node_start(self, node: Node, attempt: int) -> None:
        self._events.append((node.index, attempt, time.time()))

    def on_node_finish(self, node: Node, state: State) -> None:
        # (a final state is not changed any more: it is read on the journal's thread)
        if state.name is not FAILED:
            self._events.append((node.index, state))
            return
        # A failure is on disk before anything else happens (its hooks run after the
        # observers): the journal's thread writes it at once, and this one waits.
        self._failures += 1
        mine = self._failures
        self._events.append((node.index, state))
        self._wake.set()
        thread = self._thread
        if thread is None:
            return
        with self._flushed:
            self._flushed.wait_for(
                lambda: self._failures_out >= mine or self._writer is None or not thread.is_alive(),
                self.FAILURE_WAIT,
            )

    def on_finish(self, run: Run) -> None:
        self._ended = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(hook_wait())
            if thread.is_alive():
                logger.warning(
                    "the run's record %s is still being written after %g s (%s)",
                    self.path,
                    hook_wait(),
                    HOOK_WAIT_ENV,
                )
        elif self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- the journal's thread ------------------------------------------------------

    def _serve(self) -> None:
        run = self._run
        assert run is not None
        self._positions = _Positions(run)
        run._record_ids = self._positions.id  # replay_hint's `#k` (a flow adds to it)
        self._guard(lambda w: w.json(_start(run, self._positions)))
        events, wake = self._events, self._wake
        while self._writer is not None:
            wake.wait(self.EVERY)
            wake.clear()
            self._guard(lambda w: self._write(w, events))
            # on_finish comes after the last event: ended and drained, it is all written
            if self._ended and not events:
                break
        positions = self._positions
        self._guard(lambda w: w.json(_end(run, positions)))
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(self, w: Writer, events: deque[tuple[Any, ...]]) -> None:
        run = self._run
        assert run is not None
        # Starts whose node finished in the same batch are not written: the final
        # state says it ran. Only those still running then are (as Running, if the
        # record ends there): half the records of a run of small tasks.
        begun: dict[int, tuple[Any, ...]] = {}
        failures = 0
        while events:
            event = events.popleft()
            i = event[0]
            if len(event) == 3:
                begun[i] = event
                continue
            begun.pop(i, None)
            k = self._id(w, i)
            state = event[1]
            history = state.history
            if (  # a Completed node of one clean attempt: most of a run, written short
                state.name is COMPLETED
                and len(history) == 1
                and state.exception is None
                and not state.message
                and (a := history[0]).error is None
                and a.number == 1
                and a.retry_delay is None
            ):
                w.json(["ok", k, a.started, a.finished, worker_id(a.worker)])
                continue
            if state.name is FAILED:
                _write_inputs(w, run, i, k)
                failures += 1
            w.json({"t": "node", **node_record(run, i, k, state)})
        for i, attempt, at in begun.values():
            w.json(["run", self._id(w, i), attempt, at])
        w.flush()
        if failures:
            with self._flushed:
                self._failures_out += failures
                self._flushed.notify_all()

    def _id(self, writer: Writer, i: int) -> int:
        """Node ``i``'s id in the record; a node a flow submitted since is added first."""
        positions, run = self._positions, self._run
        assert positions is not None and run is not None
        k = positions.id.get(i)
        if k is None:
            graph = run.graph
            k = positions.id[i] = len(positions.members)
            positions.members.append(i)
            edges = [
                [positions.id[up], k, edge_kind(graph, i, j)]
                for j, up in enumerate(graph._deps[i])
                if up in positions.id
            ]
            writer.json(
                {
                    "t": "add",
                    "id": k,
                    "name": graph._names[i],
                    "task": graph._tasks[i].name,
                    "edges": edges,
                }
            )
        return k

    def _guard(self, action: Any) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            action(writer)
        except OSError as exc:  # a full disk: the run goes on, its record stops here
            logger.warning("the run's record %s stops here: %s", writer.path, exc)
            writer.close()
            self._writer = None
        except Exception:  # a bug here must not leave on_finish waiting for this thread
            logger.exception("the run's record %s stops here", writer.path)
            writer.close()
            self._writer = None


# -- reading ------------------------------------------------------------------------


class SavedRun(LoadedRun):
    """A :class:`Run` read back with :meth:`Run.load`: states, timings, errors, and
    the failed nodes' functions and inputs (``inputs``, ``replay`` work)."""

    ended = True  # False: the process that wrote it stopped mid-run
    running: list[str] = []  # nodes it saw start and not finish (only when not ended)

    def result(self, node: Any, raise_on_failure: bool = True) -> Any:
        state = self.state(node)
        if state.is_completed():
            raise GraphexecError(
                f"{state.node} completed, but its value is not in the saved run (a saved "
                "run keeps states, timings, errors and the inputs of failed nodes, not values)"
            )
        return state.result(raise_on_failure=raise_on_failure)

    def summary(self) -> str:
        text = super().summary()
        if self.ended or not self.running:
            return text
        names = ", ".join(self.running[:10]) + (" ..." if len(self.running) > 10 else "")
        return f"{text}\n{len(self.running)} node(s) were running when the record ended: {names}"

    def __repr__(self) -> str:
        return Run.__repr__(self).replace("<Run ", "<Run (saved) ", 1)


def _frames(data: bytes) -> list[tuple[bytes, bytes]]:
    frames = []
    at, end = len(MAGIC), len(data)
    while at + _HEAD.size <= end:
        kind, size = _HEAD.unpack_from(data, at)
        body_at = at + _HEAD.size
        if body_at + size > end:
            break  # torn by a kill mid-write
        frames.append((kind, data[body_at : body_at + size]))
        at = body_at + size
    return frames


def load_run(path: str | os.PathLike[str]) -> SavedRun:
    """``Run.load(path)``: see the module docstring (reads JSON frames only).

    Raises:
        ValueError: not a saved graphexec run.
        OSError: it cannot be read.
    """
    source = record_path(path)
    data = source.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(
            f"{source} is not a saved graphexec run (run.save() or compute(run_dir=...) "
            "write those; a run.to_json() document is read with Run.from_json)"
        )
    start: dict[str, Any] | None = None
    finals: dict[int, Any] = {}  # node id -> its node record, or compact ["ok", ...]
    started: dict[int, dict[str, Any]] = {}
    inputs: dict[int, KeptCall] = {}
    end: dict[str, Any] | None = None
    pending: KeptCall | None = None
    value: int | None = None
    shared: dict[int, Any] = {}  # upstream values, pickled, each stored once
    for kind, body in _frames(data):
        if kind == b"P":
            if pending is not None:
                pending.packed, pending.shared = body, shared
                pending = None
            elif value is not None:
                shared[value] = body
                value = None
            continue
        parsed = json.loads(body)
        # A batch; a lone dict is a frame of the first format (one record per frame).
        for record in parsed if isinstance(parsed, list) else (parsed,):
            if isinstance(record, list):  # compact: ["run", id, attempt, at], ["ok", id, ...]
                if record[0] == "run":
                    started[record[1]] = {"attempt": record[2], "at": record[3]}
                elif record[0] == "ok":
                    finals[record[1]] = record
                continue
            t = record.get("t")
            if t == "start":
                start = record
            elif t == "node":
                finals[record["id"]] = record
            elif t == "run":  # (the first format's attempt record)
                started[record["id"]] = record
            elif t == "add" and start is not None:  # a node a flow submitted
                start["nodes"].append({"name": record["name"], "task": record["task"]})
                start["edges"].extend(record["edges"])
            elif t == "inputs":  # its pickle is the next frame
                pending = inputs[record["id"]] = _kept_from_meta(record)
            elif t == "value":  # its pickle is the next frame
                value = record["up"]
            elif t == "end":
                end = record
    if start is None:
        raise ValueError(f"{source} holds no run yet (its writer stopped before the run started)")
    latest = start["started"]
    nodes = []
    for k, node in enumerate(start["nodes"]):
        record = finals.get(k)
        if isinstance(record, list):
            record = _completed(k, node, record)
        elif record is None:
            begun = started.get(k)
            state = RUNNING if begun is not None and end is None else "Pending"
            message = (
                f"was running (attempt {begun['attempt']}) when the record ended"
                if state is RUNNING and begun is not None
                else ""
            )
            record = {
                "id": k,
                "name": node["name"],
                "task": node["task"],
                "state": state,
                "message": message,
                "error": None,
                "attempts": [],
            }
        for a in record["attempts"]:
            latest = max(latest, a["finished"] or 0.0)
        nodes.append(record)
    for begun in started.values():
        latest = max(latest, begun["at"])
    document = {
        "graph": start["graph"],
        "started": start["started"],
        "finished": end["finished"] if end is not None else latest,
        "nodes": nodes,
        "edges": start["edges"],
    }
    if end is None:
        document["interrupted"] = INTERRUPTED
    elif end.get("interrupted"):
        document["interrupted"] = str(end["interrupted"])
    run = run_from_dict(document, SavedRun)
    assert isinstance(run, SavedRun)
    if end is not None:
        run._handled.clear()
        run._handled.update(end["handled"])
    else:
        run.ended = False
        run.running = [n["name"] for n in nodes if n["state"] == RUNNING]
    run._inputs.update(inputs)
    run._record = source
    return run


def _completed(k: int, node: dict[str, Any], compact: list[Any]) -> dict[str, Any]:
    """The node record of a compact ``["ok", id, started, finished, worker]``."""
    _, _, began, ended, worker = compact
    return {
        "id": k,
        "name": node["name"],
        "task": node["task"],
        "state": COMPLETED,
        "message": "",
        "error": None,
        "handled": False,
        "upstream_failure": None,
        "duration": ended - began,
        "attempts": [
            {
                "number": 1,
                "started": began,
                "finished": ended,
                "worker": worker,
                "error": None,
                "retry_delay": None,
            }
        ],
    }


def _kept_from_meta(record: dict[str, Any]) -> KeptCall:
    kept = KeptCall()
    kept.nbytes = record.get("nbytes", 0)
    kept.dropped = record.get("dropped")
    kept.lost = {int(up): why for up, why in (record.get("lost") or {}).items()}
    kept.source_hash = record.get("source_hash")
    kept.origin = record.get("origin")
    return kept
