"""The cache gate: cache keys and entry locks of one run's nodes.

A node with a ``cache_key_fn`` passes through the gate when its upstreams are
final, before it may run::

    scheduler thread                             keying thread (one, while there is work)
    ----------------                             -------------
    enter(i): snapshot of i's inputs ─ jobs ──>  key = cache_key_fn(context, arguments)
              keying[i] = ticket                 (hashes upstream values: unpickles
                                                  wire forms, maps shared memory)
    executor.poll() returns  <── wakeup() ─────  results.append((i, ticket, key))
    keyed(): the keys of this step, together (one query for all of them):
        found, whole and unexpired   -> Cached state, i never runs (no lock taken)
        else take the lock, then look again (one query for all the misses):
            lock taken, hit          -> unlock; Cached state
            lock taken, miss         -> run; the entry is written, finished() unlocks
            lock held, hit           -> Cached state
            lock held by another     -> WAIT: look again every LOCK_POLL s (lock_waits)

A hit needs no lock: a committed row is a whole entry (a large entry's file
is written before its row), so a reader sees an entry or none. A miss takes
the lock before it looks again, so that look decides: an entry found after
taking the lock is whole (its writer committed it before letting go), and a
miss under the lock is ours to compute. Looking up the keys of one step in
one query, and taking no lock for a hit, is what makes a cached run of many
small tasks cost little more than running them, and an all-hits rerun less
(issue #19; ``docs/howto/caching.md``, "Measured"). A process alone in the
cache directory (``_data/cache.py``, "Alone") takes its locks in memory and
looks again under the lock only at the keys it let go of since the first
look (``CacheStore.let_go_since``): nobody else adds rows then.

Who writes the entry: the worker that computed the value, through
``Call.cache`` (``entry()``), except a process-pool worker's small value,
whose pickle the parent receives anyway: ``finished()`` stores it from those
bytes (``CacheStore.put``), in the store's batch; the lock is released once
the batch is committed (``_data/cache.py``, "Who writes, and when").

Keys are computed off the scheduler thread (hashing a large upstream array or
a slow ``cache_key_fn`` there would stall the scheduler, and with it every
deadline): the scheduler hands the keying thread a snapshot of what the key
needs (the task, its arguments, the upstream handles or their own keys) and
goes on; the key comes back through :attr:`CacheGate.results` and the
executor's ``wakeup()``, and the scheduler applies it (lookup, lock, queue)
on its own thread, with the keys it computed itself (:attr:`CacheGate.batch`).
Only an executor that runs calls in the caller's thread (``sync``) computes
keys inline: nothing of it runs meanwhile, and ``pdb``
in a ``cache_key_fn`` keeps working. So is a key that costs microseconds
(:func:`cheap`: ``task_input_hash`` of a few plain arguments and of upstream
values that have keys of their own, the nodes of a parameter sweep): handing
it to a thread would cost more than computing it, for two threads of one
process that both want the GIL take turns in slices of up to 5 ms.

Waiting for an entry another process computes
    Whoever computes an entry holds its lock (a byte-range lock on the
    directory's one ``cache.lock``, ``_data/cache.py``). A node whose entry is
    locked by another process waits for it, looking every ``LOCK_POLL``
    seconds, for at most ``LOCK_WAIT`` seconds (600; the environment variable
    ``GRAPHEXEC_CACHE_LOCK_WAIT`` overrides it). The wait is logged when it
    starts (INFO, naming the process that holds the entry: ``F_GETLK``). Past
    the bound the holder is taken to be stuck: the node computes its value
    without the cache (it neither reads nor writes the entry, which the holder
    still owns) and a WARNING names the holder. A node waiting for another
    node *of this run* with the same key waits without bound: that node runs
    under this run's own timeouts. A miss also waits, the same way but
    without a log line, while a process alone in the directory has not let
    this one in yet (``CacheStore.knocking``; at most ``JOIN_WAIT``, 2 s, in
    all: ``_data/cache.py``, "Alone"); its logged, bounded wait, if the
    entry is held, starts once in.

State (plain containers, touched by the scheduler thread only, except
``results``, which the keying thread appends to):

``keys[i]``        node -> its cache key (a hit, or the entry it computes)
``signatures``     task -> (inspect.Signature or None, its parameter names and
                   defaults if all are positional-or-keyword), to bind arguments
``identities``     task -> its ``task_identity`` (hashed once per run, not per node)
``_plans``         task -> what ``_flat_key`` needs of it (``_flat_plan``), once per run
``keying[i]``      nodes whose key is being computed -> ticket of that request
``results``        deque of (node, ticket, key or None) from the keying thread
``locked``         nodes whose entry lock this run holds (they write the entry)
``holders[key]``   the node of this run that holds ``key``'s lock
``lock_waits[i]``  nodes waiting for another's lock -> monotonic time to give up
                   (``inf`` when the holder is a node of this run, or while a process
                   alone in the directory has not let this one in: ``_knocking``)
``batch``          (node, ticket, key) keyed on the scheduler thread since the last
                   ``keyed()``, which settles them together (they are in ``keying``)
``parked``         (node, ticket, key) that missed while ``WINDOW`` (``WINDOW_ALONE``)
                   nodes held locks: they stay in ``keying`` and go through
                   ``keyed()`` once a lock is let go
``refreshed``      keys recomputed by this run (``refresh_cache``: once per key)
``refreshing``     nodes running to refresh their entry
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from .._data.cache import (
    INLINE_MAX,
    SAFE_KEY,
    CacheStore,
    Found,
    entry_stamp,
    expiry,
    wire_hash,
)
from .._data.serialize import Payload
from .._model.errors import safe_str
from .._model.graph import Graph
from .._model.handle import materialize
from .._model.keys import (
    CacheContext,
    Fingerprint,
    Unhashable,
    argument_digest,
    content_hash,
    identity_hasher,
    input_hash,
    items_hash,
    task_identity,
    task_input_hash,
    warn_not_cached,
)
from .._model.node import DATA, Node
from .._model.signature import signature as read_signature
from .._model.state import CACHED, State
from .._model.walk import substitute

logger = logging.getLogger("graphexec")

LOCK_POLL = 0.1  # seconds between looks at a cache entry another process is computing
LOCK_WAIT = 600.0  # seconds a node waits for an entry another process holds
LOCK_WAIT_ENV = "GRAPHEXEC_CACHE_LOCK_WAIT"
# Nodes of one run that hold their entry's lock and have not finished (WINDOW_ALONE
# while this process is alone in the directory). Beyond it, nodes that missed are
# parked (hits take no lock): the system's byte-range locks of one file cost time in
# proportion to how many are held (10,000 ready roots holding theirs made each lock
# take 40 us). Parked nodes come back once half the window is free.
WINDOW = 128
# Alone in the directory, locks cost nothing (_data/cache.py, "Alone"): the window
# bounds what a newcomer makes this process put in the lock file at once (with the
# rows batched while it commits the batch it had: the keys of that one are let go of
# first), 4,096 locks taken in ~30 ms.
WINDOW_ALONE = 4096
_NUDGE = (-1, 0, None)  # a result for no node: makes the scheduler call keyed()


class _Verdict:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


RUN_NOW: Final = _Verdict("RUN_NOW")  # queue the node (it computes; a lock is held if keyed)
KEYING: Final = _Verdict("KEYING")  # its key is being computed: results bring it back
WAIT: Final = _Verdict("WAIT")  # another holds its entry: look again in LOCK_POLL s

Verdict = State | _Verdict  # a State: the node is Cached, it does not run


def lock_wait_bound() -> float:
    """``LOCK_WAIT``, or the seconds given by ``GRAPHEXEC_CACHE_LOCK_WAIT``."""
    text = os.environ.get(LOCK_WAIT_ENV)
    if not text:
        return LOCK_WAIT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        logger.warning(
            "%s=%r is not a number of seconds >= 0; using %g", LOCK_WAIT_ENV, text, LOCK_WAIT
        )
        return LOCK_WAIT
    return seconds


class _KeyJob:
    """What computing one node's key needs, taken on the scheduler thread."""

    __slots__ = ("args", "kwargs", "name", "node", "opts", "task", "ticket", "values")

    def __init__(
        self,
        node: int,
        ticket: int,
        task: Any,
        name: str,
        opts: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        values: dict[int, tuple[str | None, Any]],
    ) -> None:
        self.node = node
        self.ticket = ticket
        self.task = task
        self.name = name
        self.opts = opts
        self.args = args
        self.kwargs = kwargs
        # upstream -> (its own key and entry's stamp if it has them and completed,
        # its value's handle)
        self.values = values


class CacheGate:
    """Cache keys and entry locks of one run; owned by its scheduler. See the module
    docstring."""

    def __init__(
        self,
        graph: Graph,
        states: list[State | None],
        store: CacheStore | None,
        refresh_cache: bool,
        value_of: Callable[[int], Any],
        wakeup: Callable[[], None],
        offload: bool,
        remote_values: bool = False,
        notes: dict[int, str] | None = None,
    ) -> None:
        self.graph = graph
        # The run's notes (Run._notes, shown by run.summary()): what a node's wait
        # for an entry another process held cost it.
        self.notes: dict[int, str] = notes if notes is not None else {}
        self._waits: dict[int, tuple[float, str]] = {}  # node -> (wait start, holder)
        self.states = states
        self.store = store
        self.refresh_cache = refresh_cache
        self._value_of = value_of  # the handle a dependent of node i receives
        self._wakeup = wakeup  # the executor's: makes the scheduler's poll() return
        self._offload = offload
        # A Payload result is the worker's wire form (process pool) unless values stay
        # remote (a dask cluster: then it is a reference, and the dask worker wrote).
        self._from_wire = not remote_values
        self._lock_wait = lock_wait_bound()
        self.keys: dict[int, str] = {}
        # node -> the stamp of the entry its value is (entry_stamp; "" for none): taken
        # when the value is, so a dependent keys on the value it receives
        self.stamps: dict[int, str] = {}
        # node that runs to replace an entry -> that entry's `created` (a row still
        # there when it finishes is not its value's: its write failed)
        self._replacing: dict[int, float] = {}
        self.signatures: dict[Any, Any] = {}
        self.identities: dict[Any, str] = {}
        self._plans: dict[Any, Any] = {}  # task -> _flat_plan(task)
        self._metas: dict[Any, dict] = {}  # task -> its entries' meta (no expiry: shared)
        self.keying: dict[int, int] = {}
        self.results: deque[tuple[int, int, str | None]] = deque()
        self.locked: set[int] = set()
        self.holders: dict[str, int] = {}
        self.lock_waits: dict[int, float] = {}
        # Waiting nodes whose wait began before a process alone in the directory let
        # this one in: their wait (logged, bounded) starts once it has.
        self._knocking: set[int] = set()
        # (node, ticket, key, the quiet epoch at which it missed) waiting for room
        self.parked: deque[tuple[int, int, str, int | None]] = deque()
        # (key, pickle, meta) of small values finished since store_finished() ran
        self.finishing: list[tuple[str, bytes, dict]] = []
        self.batch: list[tuple[int, int, str]] = []
        self.refreshed: set[str] = set()
        self.refreshing: set[int] = set()
        self._tickets = 0
        self._jobs: deque[_KeyJob] = deque()
        self._jobs_lock = threading.Lock()
        self._worker_busy = False  # a keying thread runs (it exits when jobs run out)

    # -- entering the gate ------------------------------------------------------

    def enter(self, i: int) -> Verdict:
        """Node i is about to run: KEYING (its key and verdict come through
        :meth:`keyed`), RUN_NOW (not cached: no key), or a verdict at once."""
        key = self.keys.get(i)
        if key is not None:
            return self.with_key(i, key)
        self._tickets += 1
        ticket = self._tickets
        key = self._flat_key(i)
        if key is _NOT_FLAT:
            job = self._job(i, ticket)
            if self._offload and not cheap(job):
                return self._hand_over(job)
            key = self._key_of(job)
        if key is None:
            return RUN_NOW
        # Settled with the other nodes keyed in this scheduler step (keyed()):
        # one query looks all their entries up.
        self.keying[i] = ticket
        if not self.batch:
            self.results.append(_NUDGE)
        self.batch.append((i, ticket, key))
        return KEYING

    def _flat_key(self, i: int) -> Any:
        """The key of a node without upstreams whose arguments are a few numbers and
        short strings, under ``task_input_hash`` (a parameter sweep's nodes), or
        ``_NOT_FLAT``: :meth:`_compute_key` for that case, without its generality."""
        graph = self.graph
        args = graph._args[i]
        if (
            graph._deps[i]
            or graph._kwargs[i]
            or graph._opts[i].cache_key_fn is not task_input_hash
            or len(args) > CHEAP_ITEMS
        ):
            return _NOT_FLAT
        for a in args:
            kind = type(a)
            if kind not in _SCALARS and not (
                (kind is str or kind is bytes) and len(a) <= CHEAP_BYTES
            ):
                return _NOT_FLAT
        task = graph._tasks[i]
        try:
            plan = self._plans.get(task)
            if plan is None:
                plan = self._plans[task] = self._flat_plan(task)
            start, names, tails, one = plan
            n = len(args)
            if n == 1 and one:  # items_hash of one item: nothing to sort or join
                h = start.copy()
                h.update(one + argument_digest(args[0]) + b"}")
                return h.hexdigest()
            tail = tails[n] if n <= len(names) else None
            if tail is not None:
                items = [names[k] + argument_digest(a) for k, a in enumerate(args)]
                items += tail
                return items_hash(start, items)
            return input_hash(self.identities[task], self._arguments(task, args, {}))
        except Unhashable as exc:  # the task's identity (a closure over a socket...)
            warn_not_cached(graph._names[i], exc)
            return None

    def _flat_plan(
        self, task: Any
    ) -> tuple[Any, tuple[bytes, ...], list[list[bytes] | None], bytes]:
        """What :meth:`_flat_key` needs of a task, once per run: the hash fed with its
        identity, its parameters' digests, for n positional arguments the items of
        the defaults after them (None: a parameter would have no value, or its
        default no digest; then the general path says what to do), and what the
        one item of a one-argument call follows (b"": not that case)."""
        identity = self.identities.get(task)
        if identity is None:
            identity = self.identities[task] = task_identity(task)
        start = identity_hasher(identity)
        simple = self._spec(task)[1]
        if simple is None:
            return start, (), [None], b""
        names, defaults = simple
        digests = tuple(argument_digest(name) for name in names)
        tails: list[list[bytes] | None] = [None] * (len(names) + 1)
        tail: list[bytes] | None = []
        tails[len(names)] = []
        for k in range(len(names) - 1, -1, -1):
            if tail is not None:
                try:
                    if defaults[k] is _EMPTY:
                        raise Unhashable("no default")
                    tail = [digests[k] + argument_digest(defaults[k]), *tail]
                except Unhashable:
                    tail = None
            tails[k] = tail
        # items_hash's text around the one item, as it would join it
        one = b"dict:1{" + digests[0] if len(digests) >= 1 and tails[1] == [] else b""
        return start, digests, tails, one

    def _hand_over(self, job: _KeyJob) -> Verdict:
        """Have the keying thread compute this key."""
        self.keying[job.node] = job.ticket
        with self._jobs_lock:
            self._jobs.append(job)
            start = not self._worker_busy
            self._worker_busy = True
        if start:
            threading.Thread(target=self._work, name="graphexec-cache-keys", daemon=True).start()
        return KEYING

    def keyed(self) -> list[tuple[int, Verdict]]:
        """Settle the nodes keyed since the last call (by this thread or the keying
        thread), and parked ones while the window has room: each node's verdict.

        Fresh keys are looked up first, all in one query, without a lock: a hit
        (a committed row is a whole entry) costs no lock. Misses then take their
        entry's lock, within the window, and are looked up again under it (one
        more query for all of them): an entry committed between the two looks is
        found, and a miss under the lock is ours to compute. Parked nodes take
        the lock first, then look. The small values of the nodes finished since
        are stored first (:meth:`store_finished`).
        """
        if self.finishing:
            self.store_finished()
        out: list[tuple[int, Verdict]] = []
        results, keying = self.results, self.keying
        fresh, self.batch = self.batch, []
        while results:
            i, ticket, key = results.popleft()
            if keying.get(i) != ticket:
                continue  # the NUDGE, or a node cancelled meanwhile
            if key is None:
                del keying[i]
                out.append((i, RUN_NOW))
            else:
                fresh.append((i, ticket, key))
        if fresh:
            self._settle(fresh, out)
        parked = self.parked
        # Refilled once half the window is free: one query and one pass for many.
        window = self._window() if parked else WINDOW
        while parked and len(self.locked) <= window // 2:
            take: list[tuple[int, int, str]] = []
            # They missed at their epochs: the oldest covers them all (unknown: one
            # missed while this process was not alone).
            oldest, unknown = math.inf, False
            while parked and len(take) < window - len(self.locked):
                i, ticket, key, epoch = parked.popleft()
                if keying.get(i) == ticket:
                    take.append((i, ticket, key))
                    if epoch is None:
                        unknown = True
                    elif epoch < oldest:
                        oldest = epoch
            since = None if unknown or not take else int(oldest)
            self._lock_and_look(take, out, since)
        return out

    def _settle(self, fresh: list[tuple[int, int, str]], out: list[tuple[int, Verdict]]) -> None:
        """Fresh keys: hits now, without a lock; misses go to _lock_and_look."""
        store = self.store
        assert store is not None
        keying, keys = self.keying, self.keys
        # Alone in the directory, a miss needs no second look under the lock unless
        # this process let go of its key meanwhile: nobody else adds rows
        # (_data/cache.py, "Alone").
        epoch = store.quiet_epoch()
        refresh = self._refreshes(fresh)
        looked = [key for (_, _, key), r in zip(fresh, refresh) if not r]
        rows = store.rows(looked) if looked else {}
        misses = []
        for entry, r in zip(fresh, refresh):
            i, _, key = entry
            row = rows.get(key)
            hit = store.judge(key, row) if row is not None and not r else None
            if hit is None:
                misses.append(entry)
            else:
                del keying[i]
                keys[i] = key
                out.append((i, self._cached(i, key, hit, row)))
        if misses:
            self._lock_and_look(misses, out, epoch)

    def _window(self) -> int:
        """How many nodes of this run may hold their entry's lock before they finish."""
        assert self.store is not None
        return WINDOW_ALONE if self.store.quiet_epoch() is not None else WINDOW

    def _lock_and_look(
        self,
        entries: list[tuple[int, int, str]],
        out: list[tuple[int, Verdict]],
        epoch: int | None = None,
    ) -> None:
        """Take the locks of these keys (those the window has room for; the others are
        parked), then look them up in one query and decide; if they missed at
        ``epoch`` (a quiet epoch: alone), only the keys let go of since are looked
        up again."""
        store = self.store
        assert store is not None
        keying, keys = self.keying, self.keys
        # Not below 0: the window shrinks when a newcomer ends this process's being
        # alone, with more nodes than the new window holding locks.
        room = max(0, self._window() - len(self.locked))
        if len(entries) > room:
            self.parked.extend([(i, t, key, epoch) for i, t, key in entries[room:]])
            entries = entries[:room]
        wanted = []
        for i, _, key in entries:
            del keying[i]
            keys[i] = key
            wanted.append(key)
        got = store.try_lock_many(wanted)
        refresh = self._refreshes(entries)
        # They missed at ``epoch``: alone in the directory, only a key this process
        # let go of since may have an entry now.
        looked = store.let_go_since([key for key, r in zip(wanted, refresh) if not r], epoch)
        if any(refresh):  # the rows they replace (never hits): see _decide
            looked += [key for key, r in zip(wanted, refresh) if r]
        rows: dict[str, Found] = store.rows(looked) if looked else {}
        locked_nodes, holders, waiting = self.locked, self.holders, self.lock_waits
        for (i, _, key), r, locked in zip(entries, refresh, got):
            row = rows.get(key)
            if locked and row is None and not r and i not in waiting:  # _decide's common case
                locked_nodes.add(i)
                holders[key] = i
                out.append((i, RUN_NOW))
            else:
                out.append((i, self._decide(i, key, r, locked, row)))

    def _refreshes(self, entries: list[tuple[int, int, str]]) -> list[bool]:
        """:meth:`_refresh` of each entry, in one pass."""
        opts, refreshed = self.graph._opts, self.refreshed
        if self.refresh_cache:
            return [key not in refreshed for _, _, key in entries]
        return [opts[i].refresh_cache and key not in refreshed for i, _, key in entries]

    def look_again(self, i: int) -> Verdict:
        """A node waiting for another's lock: look at its entry again."""
        return self.with_key(i, self.keys[i])

    def with_key(self, i: int, key: str) -> Verdict:
        """Node i has its key: a hit, the lock (RUN_NOW), or WAIT for the holder.

        A miss takes the entry's lock first; if another process (or node) holds
        it, the node waits a little and looks again, so the entry is computed
        once and then found.
        """
        store = self.store
        assert store is not None
        refresh = self._refresh(i, key)
        locked = store.try_lock(key)
        row = store.rows((key,)).get(key)
        return self._decide(i, key, refresh, locked, row)

    def _refresh(self, i: int, key: str) -> bool:
        # Refresh recomputes a key once per run; other nodes with that key then hit.
        return (
            self.refresh_cache or self.graph._opts[i].refresh_cache
        ) and key not in self.refreshed

    def _decide(self, i: int, key: str, refresh: bool, locked: bool, row: Found | None) -> Verdict:
        """The verdict for node i once its entry's lock was tried (``locked``: taken)
        and its row read after that (``row``; None: none; never a hit: refresh)."""
        store = self.store
        assert store is not None
        hit = None if row is None or refresh else store.judge(key, row)
        if locked:
            if self.lock_waits:
                self.lock_waits.pop(i, None)
                self._knocking.discard(i)
            if self._waits:
                self._waited(i, key, "")
            if hit is not None:
                store.unlock(key)
                return self._cached(i, key, hit, row)
            self.locked.add(i)
            self.holders[key] = i
            if refresh:
                self.refreshing.add(i)
            if row is not None:  # expired, refreshed, or will not load: to be replaced
                self._replacing[i] = row[3]
            return RUN_NOW
        if hit is not None:  # held by another run, which wrote it meanwhile
            self.lock_waits.pop(i, None)
            self._knocking.discard(i)
            self._waited(i, key, "")
            return self._cached(i, key, hit, row)
        give_up = self.lock_waits.get(i)
        if give_up is None or i in self._knocking:
            if store.knocking():  # not let in yet (within JOIN_WAIT): no holder known
                self._knocking.add(i)
                self.lock_waits[i] = math.inf
                return WAIT
            self._knocking.discard(i)
            self.lock_waits[i] = self._start_wait(i, key)
        elif time.monotonic() >= give_up:
            del self.lock_waits[i]
            self._give_up(i, key)
            self._waited(i, key, ", then computed it without the cache")
            return RUN_NOW
        return WAIT

    def _cached(self, i: int, key: str, hit: Any, row: Any) -> State:
        if row[2] is None:  # a large entry: stamped now (a small one's bytes are the hit's)
            self.stamps[i] = entry_stamp(None, row[3])
        return State(
            CACHED,
            self.graph._names[i],
            value=hit,
            message=f"loaded from cache entry {key[:12]}",
        )

    def _start_wait(self, i: int, key: str) -> float:
        name = self.graph._names[i]
        mate = self.holders.get(key)
        if mate is not None:
            logger.debug(
                "%s waits for %s, which computes the same cache entry",
                name,
                self.graph._names[mate],
            )
            return math.inf
        holder = self._holder_text(key)
        logger.info(
            "%s waits for cache entry %s, which %s is computing (for up to %g s; "
            "%s sets the bound)",
            name,
            key[:12],
            holder,
            self._lock_wait,
            LOCK_WAIT_ENV,
        )
        now = time.monotonic()
        self._waits[i] = (now, holder)
        return now + self._lock_wait

    def _waited(self, i: int, key: str, then: str) -> None:
        """Node i's wait for an entry another process held is over: note what it cost."""
        wait = self._waits.pop(i, None)
        if wait is not None:
            started, holder = wait
            self.notes[i] = (
                f"waited {time.monotonic() - started:.1f} s for cache entry {key[:12]}, "
                f"held by {holder}{then}"
            )

    def _give_up(self, i: int, key: str) -> None:
        logger.warning(
            "%s waited %g s for cache entry %s, which %s still holds: computing it without "
            "the cache (the holder may be stuck; it keeps the entry). Set %s to wait longer",
            self.graph._names[i],
            self._lock_wait,
            key[:12],
            self._holder_text(key),
            LOCK_WAIT_ENV,
        )

    def _holder_text(self, key: str) -> str:
        assert self.store is not None
        pid = self.store.holder(key)
        if pid is None or pid < 0:
            return "another process"
        if pid == os.getpid():
            return f"this process (pid {pid}, another compute)"
        return f"process {pid}"

    # -- after the node ---------------------------------------------------------

    def finished(self, i: int, completed: bool) -> None:
        """Node i (whose lock this run holds) is final: store a small value a worker
        sent (see the module docstring), and let go of its entry."""
        key = self.keys[i]
        self.locked.discard(i)
        self.holders.pop(key, None)
        store = self.store
        assert store is not None
        stored = False  # and let go of
        if completed:
            state = self.states[i]
            value = state._value if state is not None else None
            if (
                type(value) is Payload
                and self._from_wire
                and not value.segments
                and len(value.data) <= INLINE_MAX  # not stored_apart(): a small entry
            ):
                # Stored with the others of this scheduler step (store_finished()):
                # one hold of the store's mutex for all of them. Its stamp is its
                # bytes' (_stamp), taken if a dependent needs it.
                if not self.finishing:
                    self.results.append(_NUDGE)  # the scheduler then calls keyed()
                self.finishing.append((key, value.data, self._meta(i)))
                stored = True
            else:
                # Written by whoever ran it (this process's thread, a worker for a
                # large value, a dask worker): the entry is read while this run still
                # holds its lock, so nobody else has replaced it. None, or the row it
                # was to replace: its write failed (a warning said so).
                row = store.rows((key,)).get(key)
                replaced = self._replacing.get(i)
                self.stamps[i] = (
                    "" if row is None or row[3] == replaced else entry_stamp(row[2], row[3])
                )
        if self._replacing:
            self._replacing.pop(i, None)
        if not stored:
            store.unlock(key)
        if completed and i in self.refreshing:
            self.refreshed.add(key)
        if self.parked and not self.results and len(self.locked) <= self._window() // 2:
            self.results.append(_NUDGE)

    def store_finished(self) -> None:
        """Store the small values of the nodes finished since the last call, and let
        go of their keys once their rows are committed (``CacheStore.put_many``)."""
        entries, self.finishing = self.finishing, []
        if not entries:
            return
        store = self.store
        assert store is not None
        try:
            store.put_many(entries)
        except Exception as exc:  # a damaged database: the run goes on
            logger.warning(
                "%d results not cached (%s: %s)", len(entries), type(exc).__name__, safe_str(exc)
            )
            for key, _, _ in entries:
                store.unlock(key)

    def entry(self, i: int) -> tuple[str, str, dict]:
        """What the worker of a locked node needs to write its entry (``Call.cache``)."""
        assert self.store is not None
        return (self.store._root, self.keys[i], self._meta(i))

    def _meta(self, i: int) -> dict:
        """The entry's task name and expiry (from now); one dict per task without one."""
        opts, task = self.graph._opts[i], self.graph._tasks[i]
        if opts.cache_expiration is not None:
            return {"task": task.name, "expires": expiry(opts.cache_expiration)}
        meta = self._metas.get(task)
        if meta is None:
            meta = self._metas[task] = {"task": task.name, "expires": None}
        return meta

    def cancel(self) -> None:
        """The run is cancelled: nothing waits for a key or a lock any more. The values
        of nodes that finished are stored still (their lock is let go of with them)."""
        if self.finishing:
            self.store_finished()
        self.keying.clear()
        self.lock_waits.clear()
        self._knocking.clear()
        self.parked.clear()
        self.batch.clear()

    # -- keys -------------------------------------------------------------------

    def _job(self, i: int, ticket: int) -> _KeyJob:
        graph, keys, states = self.graph, self.keys, self.states
        ups, fl = graph._deps[i], graph._flags[i]
        # The default key takes an upstream by its own key and the stamp of the entry
        # its value is (a recomputed upstream, after its entry expired or with
        # refresh_cache, may have a new value under the same key: its dependents
        # must not hit entries made from the old one). No need of its value then;
        # an upstream without an entry (its write failed) enters by its value.
        by_key = graph._opts[i].cache_key_fn is task_input_hash
        values: dict[int, tuple[str | None, Any]] = {}
        for k, up in enumerate(ups):
            if fl is None or fl[k] & DATA:
                own = keys.get(up) if by_key else None
                if own is not None:
                    st = states[up]
                    stamp = self._stamp(up) if st is not None and st.is_completed() else ""
                    own = f"{own}:{stamp}" if stamp else None
                values[up] = (own, None if by_key and own is not None else self._value_of(up))
        return _KeyJob(
            i,
            ticket,
            graph._tasks[i],
            graph._names[i],
            graph._opts[i],
            graph._args[i],
            graph._kwargs[i],
            values,
        )

    def _stamp(self, i: int) -> str:
        """The stamp of the entry node i's value is (see :attr:`stamps`); a small value
        from a worker or the cache is stamped by its bytes, here, once."""
        stamp = self.stamps.get(i)
        if stamp is None:
            state = self.states[i]
            value = state._value if state is not None else None
            stamp = ""
            if type(value) is Payload and not value.segments:
                stamp = entry_stamp(value.data, 0.0)
            self.stamps[i] = stamp
        return stamp

    def _work(self) -> None:
        """The keying thread: compute keys until no job is left, then exit."""
        while True:
            with self._jobs_lock:
                if not self._jobs:
                    self._worker_busy = False
                    return
                job = self._jobs.popleft()
            key = None
            try:
                key = self._key_of(job)
            except BaseException:  # a KeyboardInterrupt raised by user code: no key
                logger.exception("%s: computing its cache key failed; not cached", job.name)
            self.results.append((job.node, job.ticket, key))
            try:
                self._wakeup()
            except Exception:  # the run ended meanwhile (Ctrl-C): nobody waits for it
                pass

    def _key_of(self, job: _KeyJob) -> str | None:
        """The node's key, or None (not cached: said in a warning)."""
        try:
            return self._compute_key(job)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # an upstream value that cannot be loaded here...
            logger.warning(
                "%s: its cache key could not be computed (%s: %s); not cached",
                job.name,
                type(exc).__name__,
                safe_str(exc),
            )
            return None

    def _compute_key(self, job: _KeyJob) -> str | None:
        task, opts, name = job.task, job.opts, job.name
        use_fingerprints = opts.cache_key_fn is task_input_hash
        values: dict[int, Any] = {}
        try:
            for up, (own, handle) in job.values.items():
                if not use_fingerprints:
                    values[up] = materialize(handle)
                else:
                    values[up] = Fingerprint(own or fingerprint(handle, task.name))
        except Unhashable as exc:
            warn_not_cached(name, exc)
            return None
        args, kwargs = job.args, job.kwargs or {}
        if values or not all(type(a) in _FLAT for a in args) or kwargs:
            args = substitute(args, values)
            kwargs = substitute(kwargs, values) if kwargs else {}
        arguments = self._arguments(task, args, kwargs)
        if use_fingerprints:  # task_input_hash, with the task's identity hashed once a run
            try:
                identity = self.identities.get(task)
                if identity is None:
                    identity = self.identities[task] = task_identity(task)
                return input_hash(identity, arguments)
            except Unhashable as exc:
                warn_not_cached(name, exc)
                return None
        try:
            key = opts.cache_key_fn(CacheContext(task, name), arguments)
        except Exception as exc:
            logger.warning(
                "%s: cache_key_fn raised %s: %s; not cached",
                name,
                type(exc).__name__,
                exc,
            )
            return None
        if key is not None and not isinstance(key, str):
            key = content_hash(key)
        elif key is not None and not SAFE_KEY.fullmatch(key):
            key = content_hash(key)  # user keys become file names: hash anything unusual
        return key

    def _arguments(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict:
        """The call's arguments by parameter name, defaults applied (what
        ``inspect.Signature.bind`` gives, without its cost for the common case)."""
        signature, simple = self._spec(task)
        if simple is not None and not kwargs and len(args) <= len(simple[0]):
            names, defaults = simple
            arguments = dict(zip(names, args))
            for k in range(len(args), len(names)):
                if defaults[k] is _EMPTY:
                    break  # a missing argument: bind() says how, below
                arguments[names[k]] = defaults[k]
            else:
                return arguments
        try:
            if signature is None:
                raise TypeError("no signature")
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return dict(bound.arguments)
        except TypeError:
            return {"args": args, "kwargs": kwargs}

    def _spec(self, task: Any) -> tuple[Any, Any]:
        """The task's signature (None if it has none) and, if all its parameters are
        positional-or-keyword, their names and defaults; once per task, not per node:
        ``inspect.signature`` is slow."""
        spec = self.signatures.get(task)
        if spec is None:
            signature = read_signature(task.fn)
            simple = None
            if signature is not None and all(
                p.kind is p.POSITIONAL_OR_KEYWORD for p in signature.parameters.values()
            ):
                params = signature.parameters.values()
                simple = (tuple(p.name for p in params), tuple(p.default for p in params))
            spec = self.signatures[task] = (signature, simple)
        return spec


_SCALARS = frozenset({int, float, bool, complex, type(None)})
_NOT_FLAT: Final = _Verdict("NOT_FLAT")  # _flat_key: not that simple case
_FLAT = _SCALARS | {str, bytes}  # arguments that hold no node and no marker
_EMPTY = inspect.Parameter.empty
CHEAP_ITEMS = 64  # arguments (counting nested ones) a cheap key may have
CHEAP_BYTES = 4096  # the longest str or bytes among them


def cheap(job: _KeyJob) -> bool:
    """True if the node's key costs microseconds: computed inline, not on the thread.

    The default key function, every upstream value entering by its own key and stamp (no
    value to unpickle and hash), and at most ``CHEAP_ITEMS`` arguments, each a
    number, a short string or bytes, a node, or a list, tuple or dict of these.
    """
    if job.opts.cache_key_fn is not task_input_hash:
        return False
    if any(own is None for own, _ in job.values.values()):
        return False
    args = job.args
    if not job.kwargs and len(args) <= CHEAP_ITEMS:  # the common case, flat arguments
        for a in args:
            kind = type(a)
            if kind in _SCALARS or kind is Node:
                continue
            if (kind is str or kind is bytes) and len(a) <= CHEAP_BYTES:
                continue
            break
        else:
            return True
    budget = [CHEAP_ITEMS]

    def plain(value: Any) -> bool:
        budget[0] -= 1
        if budget[0] < 0:
            return False
        kind = type(value)
        if kind in _SCALARS or kind is Node:
            return True
        if kind is str or kind is bytes:
            return len(value) <= CHEAP_BYTES
        if kind is list or kind is tuple:
            return all(plain(v) for v in value)
        if kind is dict:
            return all(type(k) is str and plain(v) for k, v in value.items())
        return False

    return all(plain(a) for a in job.args) and (
        not job.kwargs or all(plain(v) for v in job.kwargs.values())
    )


def fingerprint(handle: Any, task: str) -> str:
    """An upstream value's stand-in in a key, by content (its own key and entry's stamp
    are used instead when it has them). ``task``: the task whose key it enters, for warnings."""
    if type(handle) is Payload:
        return wire_hash(handle.wire, task)
    if isinstance(handle, State):
        # (return_state=True, a trigger) A state that did not complete has no value: its
        # exception tells one failure from another (without it, every failure of the
        # upstream had one key, and a dependent got the last failure's entry)
        text = f"state:{handle.name}:" + fingerprint(handle._value, task)
        if handle.exception is not None:
            text += ":" + fingerprint(handle.exception, task)
        return text
    if isinstance(handle, BaseException):
        return content_hash(("exception", type(handle).__qualname__, safe_str(handle)))
    return content_hash(handle)
