"""The scheduler: one loop owns all run state, in the thread that called ``compute``
(an eager session's, a flow's or a pool block's: the session's own thread, ``serve``).

::

    graph ──order.post_order──> members in priority order (before the loop starts)
                         │
          ┌──────────────▼──────────────┐      submit(call)      ┌──────────┐
          │ ready (heap)  parked (per   │ ─────────────────────> │ executor │
          │ limit)  retry_at (heap)     │ <───────────────────── │ (pool,   │
          │ running  unsent  chained    │   poll() -> outcomes   │ threads, │
          └───────┬──────────────▲──────┘                        │ sync,    │
                  │ _finish      │ ready, or Cached              │ cluster) │
                  ▼              │                               └──────────┘
      release inputs nobody needs, wake dependents
                  │
                  ▼
      policy.resolve(d): run? skip? ──run──> caching.CacheGate: key (on its own
      (triggers, fail_fast)                  thread), lookup, lock, or wait

The engine's other modules hold what this loop decides with: ``policy.py``
the trigger rules and fail_fast (:func:`~.policy.resolve`,
:func:`~.policy.on_failure`), ``caching.py`` cache keys and entry locks
(:class:`~.caching.CacheGate`, with its own state list), ``chains.py`` the
calls sent behind a call to the same worker (:func:`~.chains.build_chain`).

State (all owned by the scheduler thread; ``i`` is an integer node id, lists
are sized to the graph):

``order[i]``       i's position in the run's priority order (heap tie break; an array)
``member[i]``      1 if i takes part in this run (the Run's bytearray)
``n_members``      how many nodes take part; ``done``: how many are final
``waiting[i]``     upstream nodes of i not yet in a final state
``dependents[i]``  nodes of this run that depend on i (None: none)
``uses[i]``        dependents that take i's value (data edges) and are not final;
                   at 0 the value is released unless i is kept
``states[i]``      the final State, or a Retrying State, or None (pending/running);
                   the Run's own list
``history[i]``     Attempt records of i until it is final (its State keeps them)
``tainted``        nodes with an upstream that ended without a value: due, they go
                   through ``policy.resolve``; the others run at once (all their
                   upstreams completed), unless the run is being cancelled
``root[i]``        for a node Skipped because of a failure: the failed node that
                   caused it, through chains of skips (see ``policy.py``)
``handled``        failed nodes whose failure a dependent accepted (or that declared
                   allow_failure / return_state): they do not make compute() raise;
                   the Run's own set
``kept``           nodes whose value the Run keeps (targets, or all); the Run's
``ready``          heap of (-priority, order, i) for nodes whose inputs are settled
``parked[key]``    heap, like ``ready``, of nodes waiting for a concurrency slot
                   (tag/task limit): a freed slot goes to the highest priority
``in_use[key]``    slots taken per limit key; ``_task_caps[id(fn)]``: a task's cap
``held``           calls given up on that still run (a thread past its timeout, or
                   cancelled): their slots stay taken until the executor's FREED
``retry_at``       heap of (time, seq, i): retries waiting out their delay, and
                   nodes that look again at a cache entry another holds; ``seq``
                   breaks ties
``running[i]``     the Call in flight for i
``unsent[i]``      a Call the executor refused for now (no free slot)
``chained[i]``     a Call sent to a worker behind another's, not started yet
``chains``         the executor runs chains (and this is not a flow's session)
``gate``           the CacheGate: cache keys, locks, waits (``locked`` is its set of
                   nodes whose entry lock this run holds, read on hot paths)
``load_kept``      compute() loads a kept value as soon as it arrives (see below)
``cancel_reason``  why the run is being cancelled (fail_fast, Ctrl-C), or None;
                   ``swept``: the cancellation sweep has run; ``fail_fast_cause``:
                   the failure that made fail_fast cancel
``observer``       progress bars and hooks (``_surfaces/hooks.py``): started, running,
                   finished, retrying; ``hold(i, state)`` before a value is released

One function, :meth:`Scheduler._finish`, handles "a node reached a final
state": record it, release inputs, wake dependents and decide for each (run,
or skip through the trigger rules), iteratively so that a skip cascade down a
100,000-node chain needs no recursion. Every dispatch and every finish is
O(edges of that node); nothing scans the graph while it runs.

Values that cannot be loaded here. A process worker's result arrives as a
``Payload`` (its pickle) and is forwarded to dependents as it is: only
workers unpickle the values they receive (a failure there is the
dependent's ``unpickle-arguments`` error). A value ``compute()`` keeps for
the Run is loaded as soon as it arrives (it would be at the end anyway):
one that cannot be unpickled in this process — or whose unpickling raises
anything, ``SystemExit`` included — fails its node with
``SerializationError`` (stage ``unpickle-result``), without retries (the
task ran), and the policies treat it like any other failure. Values that
stay remote (a dask cluster) and a flow's values are loaded when read;
``State.result`` then raises the same ``SerializationError``.
"""

from __future__ import annotations

import copy
import functools
import heapq
import logging
import time
from array import array
from typing import Any

from .._data.cache import CacheStore, store_for_run
from .._data.serialize import Payload
from .._executors.protocol import ERROR, FREED, HELD, OK, REQUEUE, Call, Executor
from .._executors.threadlimits import ThreadLimited
from .._model.errors import SerializationError, WorkerCrashed, capped, one_line, safe_str
from .._model.graph import Graph
from .._model.handle import discard
from .._model.node import DATA
from .._model.options import retry_delay_for, should_retry
from .._model.run import Run
from .._model.state import (
    CACHED,
    COMPLETED,
    FAILED,
    FINAL,
    RELEASED,
    RETRYING,
    Attempt,
    State,
)
from . import collector
from .caching import KEYING, LOCK_POLL, RUN_NOW, WAIT, CacheGate, Verdict
from .chains import build_chain, unchain
from .keep import keep_failed
from .policy import RUNS_WHEN_CLEAN, Resolution, on_failure, resolve

logger = logging.getLogger("graphexec")


def value_for_dependent(graph: Graph, states: list[State | None], up: int) -> Any:
    """What a dependent of final node ``up`` receives: its State (``return_state``),
    its value, or its exception."""
    state = states[up]
    assert state is not None  # an upstream is final before its dependent runs
    if graph._opts[up].return_state:
        # A copy: the scheduler's own State has its value released once its last
        # user ran, and a dependent (in this process: sync, threads) may keep this.
        return copy.copy(state)
    if state.is_completed():
        return state._value
    return state.exception


def _name_the_input(error: SerializationError, names: list[str]) -> None:
    """An input whose value a worker could not unpickle, named: the worker knows
    its node's index only (``runtime.arguments_unpickle_error``)."""
    up = getattr(error, "input_node", None)
    if isinstance(up, int) and 0 <= up < len(names) and error.args:
        error.upstream = names[up]
        error.args = (str(error.args[0]).replace(f"node #{up}", names[up], 1), *error.args[1:])


class Scheduler:
    """Runs the members of one :class:`Run` on one executor. See the module docstring."""

    def __init__(
        self,
        graph: Graph,
        run: Run,
        executor: Executor,
        *,
        fail_fast: bool,
        limits: dict[str, int],
        cache: CacheStore | None = None,
        refresh_cache: bool = False,
        observer: Any = None,
    ) -> None:
        self.graph = graph
        self.run_ = run
        self.executor = executor
        self.fail_fast = fail_fast
        self.limits = limits
        n = len(graph._deps)
        self.n_members = len(run.members)
        self.done = 0
        # machine integers: a list would hold an int object per node (32 bytes)
        self.order = array("q", (0,)) * n
        self.member = run._member  # (the Run marked its members)
        self.waiting = [0] * n
        self.uses = [0] * n
        # lists while nodes are linked (built below as lists: Any); run() makes
        # them tuples (see there)
        linked: list[Any] = [None] * n
        self.dependents: list[list[int] | tuple[int, ...] | None] = linked
        self.states = run._states
        self.history: dict[int, list[Attempt]] = {}
        self.root: dict[int, int] = {}
        # Nodes with an upstream that ended without a value (Failed, Skipped,
        # Cancelled): only these go through policy.resolve when they are due.
        self.tainted: set[int] = set()
        self.handled = run._handled
        self.kept = run._kept
        self.ready: list[tuple[int, int, int]] = []
        self.retry_at: list[tuple[float, int, int]] = []
        self.parked: dict[Any, list[tuple[int, int, int]]] = {}
        self.in_use: dict[Any, int] = {}
        # id(call) -> node, of calls given up on while still running (Call.holds_slots:
        # a thread past its timeout, or cancelled): their slots stay taken until
        # their FREED; parked nodes waiting for them are not a stall
        self.held: dict[int, int] = {}
        self.running: dict[int, Call] = {}
        self.unsent: dict[int, Call] = {}
        # Chains: only the process pool runs them, and only for compute() (a
        # flow's user may read any value).
        self.chained: dict[int, Call] = {}
        self.chains = executor.capabilities.chains
        self.cancel_reason: str | None = None
        self.cancel_all = False  # the cancel spares no "always" node (Ctrl-C, not fail_fast)
        self.swept = False
        self.fail_fast_cause: int | None = None
        self.seq = 0
        self._task_caps: dict[int, int] = {}
        # (id(fn), count) -> the function wrapped for the task option inner_threads=
        self._limited: dict[tuple[int, int], ThreadLimited] = {}
        # What a dependent of a node receives. Not a bound method: the gate would
        # then refer back to this scheduler, and the cycle would keep its lists
        # (a few per node) alive after the run until a full collection.
        self._value_for_dependent = functools.partial(value_for_dependent, graph, self.states)
        # Keys are hashed on a thread of the gate's unless calls run in this
        # thread anyway (sync): then nothing runs meanwhile that could be delayed.
        self.gate = CacheGate(
            graph,
            self.states,
            cache,
            refresh_cache,
            self._value_for_dependent,
            executor.wakeup,
            offload=not executor.capabilities.in_caller_thread,
            remote_values=executor.capabilities.remote_values,
            notes=run._notes,
        )
        self.locked = self.gate.locked
        self.load_kept = False  # run() turns it on: compute() reads its kept values
        # Progress bars and hooks watch the run through four calls: started(run),
        # running(i, call), finished(i, state), retrying(i, state); and hold(i, state)
        # keeps a value a queued hook may read (see _release). None: no cost at all.
        self.observer = observer

        # _link for every member, inlined: this loop runs once per node.
        deps, flags = graph._deps, graph._flags
        order, waiting = self.order, self.waiting
        dependents, uses = linked, self.uses
        for pos, i in enumerate(run.members):
            order[i] = pos
            ups = deps[i]
            if not ups:
                continue
            waiting[i] = len(ups)
            fl = flags[i]
            for k, up in enumerate(ups):
                lst = dependents[up]
                if lst is None:
                    dependents[up] = [i]
                else:
                    lst.append(i)
                if fl is None or fl[k] & DATA:
                    uses[up] += 1

    @property
    def cache(self) -> CacheStore | None:
        """The cache store of the run (a flow's session opens it on first use)."""
        return self.gate.store

    @cache.setter
    def cache(self, store: CacheStore | None) -> None:
        self.gate.store = store

    def _link(self, i: int) -> None:
        """Register node i as a dependent of its upstreams (and a user of their values)."""
        fl = self.graph._flags[i]
        for k, up in enumerate(self.graph._deps[i]):
            lst = self.dependents[up]
            if lst is None:
                self.dependents[up] = [i]
            elif isinstance(lst, list):
                lst.append(i)
            else:  # (admit() links nodes, and run() never admits: not reached)
                self.dependents[up] = (*lst, i)
            if fl is None or fl[k] & DATA:
                self.uses[up] += 1

    # -- main loop ------------------------------------------------------------

    def run(self, interrupted: KeyboardInterrupt | None = None) -> None:
        """Run every member to a final state (``graph.compute``).

        ``interrupted``: a Ctrl-C that came while the executor opened, raised here
        once the observers know the run started (its nodes are then cancelled as
        after any interrupt, which they see too).
        """
        # Remote values (a cluster) stay where they are until read: loading
        # them here would fetch each one on this thread.
        self.load_kept = not self.executor.capabilities.remote_values
        # Every member is linked: each node's dependents become a tuple of ints,
        # which the garbage collector stops tracking (a list it walks in every full
        # collection while the run lasts, one per node), and 8-16 bytes smaller.
        dependents = self.dependents
        for up, lst in enumerate(dependents):
            if lst is not None:
                dependents[up] = tuple(lst)
        if self.observer is not None:
            self.observer.started(self.run_)
        if interrupted is not None:
            raise interrupted
        # No full collection while the loop runs: each would walk the whole heap
        # and find nothing (see collector.py); young collections go on. Not when
        # the calls run in this process: a task's own garbage (cycles that lived
        # long enough to reach the oldest generation) must not wait hours for the
        # end of an overnight run.
        pause = not self.executor.capabilities.in_process
        if pause:
            collector.pause_full_collections()
        try:
            for i in self.run_.members:
                if self.waiting[i] == 0 and self.states[i] is None:
                    cached = self._become_ready(i)
                    if cached is not None:
                        self._finish(i, cached)
            while self.done < self.n_members:
                self._step(idle_ok=False)
        finally:
            if pause:
                collector.resume_full_collections()
            # Values finished in the last step, if it was cut short: stored still.
            self.gate.store_finished()

    def serve(self, session: Any) -> None:
        """Run nodes as a :class:`Session` submits them, until it closes (eager mode).

        Same state, same policies, same executor protocol as :meth:`run`; nodes
        are admitted one by one, and waiting for the next submission is normal.
        This loop is the only writer of the scheduler's and the Run's state:
        user threads post messages to the session's inbox (see
        ``_surfaces/eager.py``), applied here in order between steps.
        """
        if self.observer is not None:
            self.observer.started(self.run_)
        self.chains = False
        while True:
            messages, closing = session._take_inbox()
            for kind, arg in messages:
                if kind == "admit":
                    self.admit(arg)
                elif kind == "observed":  # the user looked at this failure
                    self.handled.add(arg)
                elif kind == "cancel":  # (why, everything: Ctrl-C spares no "always" node)
                    why, everything = arg
                    self.cancel_reason = self.cancel_reason or why
                    self.cancel_all = self.cancel_all or everything
                elif kind == "open-cache":  # once per session, before its first cached node
                    if self.cache is None:
                        self.cache = store_for_run(arg)
                elif kind == "cancel-node":  # Future.cancel(): the answer goes back by mailbox
                    i, reply = arg
                    reply.put(self.cancel_pending(i))
                elif kind == "claim":  # a lazy graph's run: accepted failures, then all seen
                    indices, reply = arg
                    accepted = [i in self.handled for i in indices]
                    self.handled.update(indices)
                    reply.put(accepted)
                else:
                    raise ValueError(f"unknown session message {kind!r}")
            # (closing was read with the inbox: no node can be admitted after it)
            if closing and self.done >= self.n_members:
                return
            self._step(idle_ok=True)
            session._publish()

    def admit(self, i: int) -> None:
        """Add node ``i`` (already in the graph) to a running session."""
        graph = self.graph
        # Up to i only: nodes after it may still be being built by a user thread.
        extra = i + 1 - len(self.order)
        if extra > 0:  # the graph grew since the last admission
            self.order.extend([0] * extra)
            self.member.extend(bytes(extra))
            self.waiting.extend([0] * extra)
            self.uses.extend([0] * extra)
            self.dependents.extend([None] * extra)
            self.states.extend([None] * extra)
        run = self.run_
        run.members.append(i)
        self.member[i] = 1  # (the Run's: extended above)
        self.order[i] = self.n_members
        self.n_members += 1
        self._link(i)
        waiting = 0
        for up in graph._deps[i]:
            state = self.states[up]
            if state is None or state.name not in FINAL:
                waiting += 1
            elif not state.is_completed():
                self.tainted.add(i)
        self.waiting[i] = waiting
        if self.swept and graph._opts[i].trigger != "always":
            self._finish(i, State.cancelled(graph._names[i], self.cancel_reason or "cancelled"))
        elif waiting == 0:
            final = self._resolve(i)
            if final is not None:
                self._finish(i, final)

    def _step(self, idle_ok: bool) -> None:
        """Dispatch what is ready, wait for the executor, apply what came back."""
        if self.cancel_reason is not None and not self.swept:
            self.cancel(self.cancel_reason, everything=self.cancel_all)
            return  # the caller re-checks whether anything is left to do
        gate = self.gate
        if gate.results:  # nodes keyed since the last step, settled together
            self._settle_keys()
        self._dispatch()
        if not idle_ok and self.done >= self.n_members:
            return  # dispatch itself finished the last node (isolate=True refused)
        timeout = None
        if self.retry_at:
            timeout = max(0.0, self.retry_at[0][0] - time.monotonic())
        if (
            not self.running
            and not self.ready
            and timeout is None
            and not idle_ok
            and not gate.keying
            and not self.held
        ):
            raise RuntimeError(
                f"graphexec scheduler stalled with {self.n_members - self.done} nodes "
                "unfinished; this is a bug, please report it"
            )
        for call, kind, value in self.executor.poll(timeout):
            self._on_outcome(call, kind, value)
        if gate.results:  # keys computed meanwhile (the keying thread woke poll up)
            self._settle_keys()
        now = time.monotonic()
        while self.retry_at and self.retry_at[0][0] <= now:
            i = heapq.heappop(self.retry_at)[2]
            if i in gate.lock_waits:
                cached = self._gate_says(i, gate.look_again(i))
                if cached is not None:
                    self._finish(i, cached)
            else:
                self._push_ready(i)

    def _settle_keys(self) -> None:
        """Apply the cache gate's verdicts, until it has none: nodes it finds Cached
        wake their dependents, whose keys it then settles too (a chain of hits goes
        through in one step, without waiting for the executor)."""
        gate = self.gate
        while gate.results:
            for i, verdict in gate.keyed():
                cached = self._gate_says(i, verdict)
                if cached is not None:
                    self._finish(i, cached)

    def _push_ready(self, i: int) -> None:
        heapq.heappush(self.ready, (-self.graph._opts[i].priority, self.order[i], i))

    def _dispatch(self) -> None:
        ready = self.ready
        if not ready:
            return
        executor = self.executor
        submit = executor.submit
        opts_of, limits = self.graph._opts, self.limits
        unsent, running, uses = self.unsent, self.running, self.uses
        heappop = heapq.heappop
        while ready:
            i = ready[0][2]
            opts = opts_of[i]
            if opts.max_concurrency is None and not (opts.tags and limits):
                keys: list[Any] | tuple[()] = ()  # the common case: nothing to count
            else:
                keys = self._limit_keys(i)
                full = next((k for k in keys if self.in_use.get(k, 0) >= self._cap(k)), None)
                if full is not None:
                    entry = heappop(ready)
                    heapq.heappush(self.parked.setdefault(full, []), entry)
                    # Woken by a slot of another of its keys (or come while one is
                    # free): that slot goes to the next node waiting for it if that
                    # one's priority is as high (else it would stay unused until
                    # this one's `full` frees); a lower one's does not take it: it
                    # stays this node's, which would never run under a stream of
                    # nodes that need one of its keys.
                    for k in keys:
                        waiting = self.parked.get(k) if k != full else None
                        if (
                            waiting
                            and waiting[0][0] <= entry[0]
                            and self.in_use.get(k, 0) < self._cap(k)
                        ):
                            self._push_ready(heappop(waiting)[2])
                    continue
            call = (unsent.pop(i, None) if unsent else None) or self._make_call(i)
            if keys:  # (a shared pool counts them across its runs too)
                call.limits = [(k, self._cap(k)) for k in keys]
            if call.isolate and not executor.capabilities.isolates:
                heappop(ready)
                error = ValueError(
                    f"{call.name} has isolate=True, which needs a fresh worker process per "
                    "call; this scheduler runs calls in this process or on a cluster: "
                    "compute with scheduler='processes'"
                )
                self._finish(i, State(FAILED, call.name, exception=error, message=str(error)))
                continue
            # (build_chain stops at once unless i's value has exactly one use)
            if self.chains and uses[i] == 1:
                call.then = build_chain(self, i)
            # Running from here: a sync executor runs the call inside submit(), and a
            # flow's body (another thread) may look at its future meanwhile.
            running[i] = call
            if not submit(call):
                del running[i]
                call.then = None
                unsent[i] = call
                return
            if call.then:  # the pool cut it to what it sent: link it call by call
                prev = call
                for nxt in call.then:
                    self.chained[nxt.node] = nxt
                    prev.then = [nxt]
                    prev = nxt
            heappop(ready)
            for k in keys:
                self.in_use[k] = self.in_use.get(k, 0) + 1
            if self.observer is not None:
                self.observer.running(i, call)

    def _free_slots(self, i: int) -> None:
        """A call of node ``i`` ended: the concurrency slots it took go to the next
        node waiting for each."""
        in_use = self.in_use
        if in_use:  # some node holds a concurrency slot: maybe this one
            for k in self._limit_keys(i):
                if not in_use.get(k):  # (a FREED after the run let go of every slot)
                    continue
                in_use[k] -= 1
                waiting = self.parked.get(k)
                if waiting:
                    self._push_ready(heapq.heappop(waiting)[2])

    def _limit_keys(self, i: int) -> list[Any] | tuple[()]:
        opts = self.graph._opts[i]
        if opts.max_concurrency is None and not (opts.tags and self.limits):
            return ()  # the common case, on the path of every node: nothing to count
        keys: list[Any] = []
        if opts.max_concurrency is not None:
            fn_key = id(self.graph._tasks[i].fn)
            # known before the first dispatch of this task: _dispatch reads the cap
            # before any call of it is made
            self._task_caps[fn_key] = opts.max_concurrency
            keys.append(("task", fn_key))
        if opts.tags and self.limits:
            keys.extend(("tag", t) for t in opts.tags if t in self.limits)
        return keys

    def _cap(self, key: Any) -> int:
        if key[0] == "tag":
            return self.limits[key[1]]
        # every node of one task shares its options' max_concurrency
        return self._task_caps[key[1]]

    def _make_call(self, i: int, held: int = -1) -> Call:
        """The Call for node i; ``held``: the upstream whose value a worker keeps for it."""
        graph = self.graph
        opts_of = graph._opts
        opts = opts_of[i]
        inputs: dict[int, Any] = {}
        ups = graph._deps[i]
        if ups:
            fl = graph._flags[i]
            states = self.states
            for k, up in enumerate(ups):
                if up == held:
                    inputs[up] = HELD
                elif fl is None or fl[k] & DATA:
                    st = states[up]
                    # _value_for_dependent, inlined for the common case
                    if st is not None and st.name is COMPLETED and not opts_of[up].return_state:
                        inputs[up] = st._value
                    else:
                        inputs[up] = self._value_for_dependent(up)
        fn = graph._tasks[i].fn
        if opts.inner_threads is not None:
            fn = self._thread_limited(fn, opts.inner_threads)
        history = self.history.get(i)
        call = Call(
            i,
            graph._names[i],
            fn,
            graph._args[i],
            graph._kwargs[i],
            bool(inputs),
            inputs,
            opts.timeout,
            1 if history is None else len(history) + 1,
        )
        if i in self.locked:
            call.cache = self.gate.entry(i)
        if opts.isolate:
            call.isolate = True
        return call

    def _thread_limited(self, fn: Any, threads: int) -> ThreadLimited:
        """One wrapper per function and count, so executors send it once, as the function."""
        key = (id(fn), threads)
        wrapper = self._limited.get(key)
        if wrapper is None:
            wrapper = self._limited[key] = ThreadLimited(fn, threads)
        return wrapper

    # -- outcomes -------------------------------------------------------------

    def _on_outcome(self, call: Call, kind: int, value: Any) -> None:
        i = call.node
        if kind == FREED:  # an abandoned call ended: its node's outcome came before
            if self.held.pop(id(call), None) is not None:
                self._free_slots(i)
            return
        running = self.running
        if running.get(i) is not call:
            # Cancelled while in flight (already final), or a call left running by
            # an earlier compute on a shared pool: its node index means nothing here.
            # Its value is nobody's: its shared memory goes now (not at a sweep,
            # which skips what a value alive in this process names).
            if kind == OK and value is not HELD:
                discard(value)
                self.executor.release(i, value)
            return
        del running[i]
        if call.then:
            if kind == OK and value is HELD:  # the next call of the chain starts now
                nxt = call.then[0]
                call.then = None
                del self.chained[nxt.node]
                self.running[nxt.node] = nxt
                if self.observer is not None:
                    self.observer.running(nxt.node, nxt)
            else:
                unchain(self.chained, call)
        if kind == REQUEUE and any(h is HELD for h in call.inputs.values()):
            # Cannot happen (a chained call runs right after the call it follows,
            # or not at all); if it did, its input is gone: say so on this node.
            kind, value = (
                ERROR,
                WorkerCrashed(
                    f"the input of {call.name} was kept by a worker that stopped before "
                    f"{call.name} started; compute again",
                    node=call.name,
                ),
            )
            call.finished = call.started = time.time()
        # Done with this call: drop the upstream values it carried (and their wire
        # form), so that a value released below is not kept alive by a Call that
        # some frame or executor still refers to.
        inputs = call.inputs
        if inputs:
            call.inputs = {}
        call.wire = None
        if call.holds_slots:  # until it ends (FREED)
            self.held[id(call)] = i
        else:
            self._free_slots(i)
        if kind == REQUEUE:
            self._push_ready(i)
            return
        error = None if kind == OK else value
        if kind == OK and self.load_kept and type(value) is Payload and i in self.kept:
            error = self._unloadable(i, value)
        name = self.graph._names[i]
        if error is None:
            # Final: the state keeps the attempts (earlier ones only if it was retried).
            history = self.history.pop(i, None)
            if history is None:
                # The first try: its numbers only, the Attempt and its list are made
                # if someone reads state.history (fewer objects for the collector).
                state = State(COMPLETED, name, value)
                state._attempt = (call.number, call.started, call.finished, call.worker)
            else:
                history.append(Attempt(call.number, call.started, call.finished, call.worker, None))
                state = State(COMPLETED, name, value, None, history)
            self._finish(i, state)
            return
        if type(error) is SerializationError and error.stage == "unpickle-arguments":
            _name_the_input(error, self.graph._names)
        attempt = Attempt(call.number, call.started, call.finished, call.worker, error)
        history = self.history.setdefault(i, [])
        history.append(attempt)
        opts = self.graph._opts[i]
        failed = State(
            FAILED,
            name,
            exception=error,
            history=history,
            message=capped(f"{type(error).__name__}: {safe_str(error)}"),
        )
        # (a value that cannot be loaded is not retried: the task ran and succeeded;
        # nor a failure another attempt would meet the same way without running the
        # task: TaskFailure.retryable, a call that would not pickle, a closed pool)
        if (
            kind == ERROR
            and call.number <= opts.retries
            and self.cancel_reason is None
            and getattr(error, "retryable", True)
        ):
            try:
                again = should_retry(opts, error, failed, self.graph._tasks[i])
            except Exception as exc:  # the user's predicate: this node only, and it says so
                logger.exception("retry_on/retry_condition_fn of %s raised; not retrying", name)
                failed = State(
                    FAILED,
                    name,
                    exception=error,
                    history=history,
                    message=f"{failed.message} (not retried: its retry_on/retry_condition_fn "
                    f"raised {type(exc).__name__}: {safe_str(exc)})",
                )
                again = False
            if again:
                try:
                    delay = retry_delay_for(opts, call.number)
                except Exception as exc:  # the user's retry_delay callable: this node only
                    logger.exception("retry_delay of %s failed; not retrying", name)
                    failed = State(
                        FAILED,
                        name,
                        exception=error,
                        history=history,
                        message=f"{failed.message} (not retried: its retry_delay failed: "
                        f"{type(exc).__name__}: {safe_str(exc)})",
                    )
                    again = False
            if again:
                attempt.retry_delay = delay
                retrying = self.states[i] = State(
                    RETRYING,
                    name,
                    exception=error,
                    history=history,
                    message=f"attempt {call.number} failed ({one_line(error)}); "
                    f"retry {call.number} of {opts.retries} in {delay:g} s",
                )
                logger.info("%s: %s", name, retrying.message)
                if self.observer is not None:
                    self.observer.retrying(i, self.states[i])
                if delay > 0:
                    self.seq += 1
                    heapq.heappush(self.retry_at, (time.monotonic() + delay, self.seq, i))
                else:
                    self._push_ready(i)
                return
        logger.warning("%s failed: %s: %s", name, type(error).__name__, safe_str(error))
        # for run.replay, before the inputs are released
        keep_failed(self.run_, call, inputs, self.executor.capabilities.remote_values)
        del self.history[i]  # final: its state keeps the attempts
        self._finish(i, failed)

    def _unloadable(self, i: int, payload: Payload) -> SerializationError | None:
        """Load a kept value now; if it cannot be, drop it and return the node's error.

        Anything its unpickling raises but Ctrl-C (``SystemExit`` too) is the
        node's failure, not the caller's: it must not escape ``compute``.
        """
        try:
            payload.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            payload.discard()
            self.executor.release(i, payload)
            name = self.graph._names[i]
            error = SerializationError(
                f"the result of {name} could not be unpickled in this process: "
                f"{type(exc).__name__}: {safe_str(exc)}. The task ran and returned it; is "
                "every module its value needs importable here (same environment)?",
                node=name,
                stage="unpickle-result",
                retryable=False,  # the task succeeded: another attempt would not help
            )
            error.__cause__ = exc
            return error
        return None

    def _finish(self, i: int, state: State) -> None:
        """Node ``i`` reached a final state: record it, release inputs, wake dependents."""
        graph = self.graph
        states, locked, root, handled = self.states, self.locked, self.root, self.handled
        deps, flags, opts_of = graph._deps, graph._flags, graph._opts
        uses, kept, waiting, tainted = self.uses, self.kept, self.waiting, self.tainted
        dependents, running, observer = self.dependents, self.running, self.observer
        work = [(i, state)]
        while work:
            i, state = work.pop()
            current = states[i]
            if current is not None and current.name in FINAL:
                continue
            states[i] = state
            self.done += 1
            if observer is not None:
                observer.finished(i, state)
            if locked and i in locked:
                self.gate.finished(i, state.is_completed())
            name = state.name
            if name is COMPLETED or name is CACHED:
                if uses[i] == 0 and i not in kept:
                    self._release(i, state)
            else:
                # Its dependents cannot take the shortcut below: resolve() decides.
                tainted.update(dependents[i] or ())
                if name is FAILED and on_failure(
                    graph, dependents, handled, i, self.fail_fast and self.cancel_reason is None
                ):
                    self.cancel_reason = f"fail_fast: {graph._names[i]} failed"
                    self.fail_fast_cause = i
            ups, fl = deps[i], flags[i]
            for k, up in enumerate(ups):
                if fl is None or fl[k] & DATA:
                    left = uses[up] - 1
                    uses[up] = left
                    if left == 0 and up not in kept:
                        up_state = states[up]
                        if up_state is not None and (
                            up_state.name is COMPLETED or up_state.name is CACHED
                        ):
                            self._release(up, up_state)
            cancelling = self.cancel_reason is not None
            for d in dependents[i] or ():
                left = waiting[d] - 1
                waiting[d] = left
                if left == 0 and states[d] is None and d not in running:
                    opts = opts_of[d]
                    if not cancelling and d not in tainted and opts.trigger in RUNS_WHEN_CLEAN:
                        # Every upstream completed: resolve() would say RUN.
                        if self.gate.store is None or opts.cache_key_fn is None:
                            heapq.heappush(self.ready, (-opts.priority, self.order[d], d))
                            continue
                        final = self._become_ready(d)
                        if final is not None:
                            work.append((d, final))
                        continue
                    verdict = resolve(
                        graph,
                        states,
                        root,
                        handled,
                        d,
                        cancelling,
                        self.fail_fast_cause,
                        not self.cancel_all,
                    )
                    if verdict is Resolution.RUN:
                        final = self._become_ready(d)
                        if final is not None:
                            work.append((d, final))
                    elif verdict is not None:
                        work.append((d, verdict))

    def _release(self, i: int, state: State) -> None:
        """Drop node i's value: nobody pending needs it and it is not kept."""
        if self.observer is not None and self.observer.hold(i, state):
            return  # a hook of i is queued and may read it: release_held comes later
        handle = state._value
        if type(handle) is Payload and not handle.segments:
            state._value = RELEASED  # all in its pickle: nothing else to discard
        else:
            state._release()
        self.executor.release(i, handle)

    def release_held(self, i: int, state: State) -> None:
        """Drop a value the observer held until node i's hooks ran (this thread only).
        (A hook that loaded it may keep what it read: Payload.discard recycles no
        loaded value's segments.)"""
        handle = state._value
        state._release()
        self.executor.release(i, handle)

    # -- policies and caching (policy.py, caching.py) ---------------------------

    def _resolve(self, d: int) -> State | None:
        """All of d's upstreams are final: queue d to run, or return its final state
        (Skipped by the policies, or Cached); None also while the cancellation sweep
        is due to cancel it or the cache gate holds it."""
        verdict = resolve(
            self.graph,
            self.states,
            self.root,
            self.handled,
            d,
            self.cancel_reason is not None,
            self.fail_fast_cause,
            not self.cancel_all,
        )
        if verdict is Resolution.RUN:
            return self._become_ready(d)
        return verdict

    def _become_ready(self, i: int) -> State | None:
        """Queue node i, unless its result is cached: then return its Cached state.

        A cached task goes through the gate first: its key may take a while (the
        gate holds the node meanwhile), and another may hold its entry's lock.
        """
        gate = self.gate
        if gate.store is None or self.graph._opts[i].cache_key_fn is None:
            self._push_ready(i)
            return None
        return self._gate_says(i, gate.enter(i))

    def _gate_says(self, i: int, verdict: Verdict) -> State | None:
        """Act on the cache gate's verdict for node i; a Cached state is returned."""
        if isinstance(verdict, State):
            return verdict
        if verdict is RUN_NOW:
            self._push_ready(i)
        elif verdict is WAIT:
            self.seq += 1
            heapq.heappush(self.retry_at, (time.monotonic() + LOCK_POLL, self.seq, i))
        else:
            assert verdict is KEYING  # the gate's results bring it back
        return None

    # -- cancellation ---------------------------------------------------------

    def cancel_pending(self, i: int) -> bool:
        """Cancel node i if it has not started (``Future.cancel``); True if it now is.

        Started means running, final, or in the cache gate (keying or waiting
        for an entry lock). Its dependents then resolve as after any cancellation.
        """
        st, gate = self.states[i], self.gate
        if st is not None and st.name in FINAL:
            return False
        if i in self.running or i in gate.keying or i in gate.lock_waits:
            return False
        heaps: list[list[Any]] = [self.ready, self.retry_at, *self.parked.values()]
        for heap in heaps:
            if any(entry[2] == i for entry in heap):
                heap[:] = [entry for entry in heap if entry[2] != i]
                heapq.heapify(heap)
        self.unsent.pop(i, None)
        name = self.graph._names[i]
        self._finish(i, State.cancelled(name, "future.cancel()", self.history.get(i)))
        return True

    def cancel(self, why: str, everything: bool) -> None:
        """Give every unfinished node a final state: Cancelled.

        ``everything=False`` (fail_fast) spares ``trigger="always"`` nodes that have
        not started: they still run once their upstreams are final.
        """
        self.cancel_reason = why
        self.cancel_all = self.cancel_all or everything
        self.swept = True
        logger.warning("cancelling the run: %s", why)
        for call in self.executor.cancel_running():
            if call.holds_slots:  # it runs on (a thread): its slots stay taken
                self.held[id(call)] = call.node
            if self.running.get(call.node) is call:
                del self.running[call.node]
                history = self.history.setdefault(call.node, [])
                call.finished = time.time()
                state = State.cancelled(self.graph._names[call.node], why, history)
                if call.started:  # (one queued on a worker, never started: no attempt)
                    # ended by the cancel: its error is the state's Cancelled
                    history.append(
                        Attempt(
                            call.number, call.started, call.finished, call.worker, state.exception
                        )
                    )
                self._finish(call.node, state)
        self.ready.clear()
        self.retry_at.clear()
        self.gate.cancel()
        self.parked.clear()
        self.unsent.clear()
        self.chained.clear()
        # What runs no more lets go of its slots; a call that runs on keeps them.
        self.in_use.clear()
        for i in self.held.values():
            for k in self._limit_keys(i):
                self.in_use[k] = self.in_use.get(k, 0) + 1
        graph = self.graph
        if not everything:
            # "always" nodes that were queued (ready, parked, waiting out a retry
            # delay) go back to the queue once. Those whose last upstream gets
            # cancelled below are queued by _resolve instead: queuing them here
            # as well would run them twice.
            for i in self.run_.members:
                st = self.states[i]
                if (
                    (st is None or st.name not in FINAL)
                    and graph._opts[i].trigger == "always"
                    and self.waiting[i] == 0
                    and i not in self.running
                ):
                    self._push_ready(i)
        for i in self.run_.members:
            st = self.states[i]
            if st is not None and st.name in FINAL:
                continue
            if not everything and graph._opts[i].trigger == "always":
                continue
            self.running.pop(i, None)
            self._finish(i, State.cancelled(graph._names[i], why, self.history.get(i)))
