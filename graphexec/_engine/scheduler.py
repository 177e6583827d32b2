"""The scheduler: one loop, in the thread that called ``compute``, owns all run state.

::

    graph ──_order──> members in priority order
                         │
          ┌──────────────▼──────────────┐      submit(call)      ┌──────────┐
          │ ready (heap)  parked (per   │ ─────────────────────> │ executor │
          │ limit)  retry_at (heap)     │ <───────────────────── │ (pool,   │
          │ running (dict)              │   poll() -> outcomes   │ threads, │
          └──────────────┬──────────────┘                        │ sync)    │
                         │ _finish(node, state)                  └──────────┘
                         ▼
          release inputs nobody needs ─ wake dependents ─ apply trigger/policy

State containers (all indexed by integer node id; lists sized to the graph):

``waiting[i]``     upstream nodes of i not yet in a final state
``dependents[i]``  nodes of this run that depend on i
``uses[i]``        dependents that take i's value (data edges) and are not final;
                   at 0 the value is released unless i is kept
``states[i]``      the final State, or a Retrying State, or None (pending/running)
``history[i]``     Attempt records of i
``ready``          heap of (-priority, order, i) for nodes whose inputs are settled
``parked[key]``    heap, like ``ready``, of nodes waiting for a concurrency slot
                   (tag/task limit): a freed slot goes to the highest priority
``in_use[key]``    slots taken per limit key
``retry_at``       heap of (time, seq, i): retries waiting out their delay
``running[i]``     the Call in flight for i
``handled``        failed nodes whose failure a dependent accepted (or that declared
                   allow_failure / return_state): they do not make compute() raise

One function, :meth:`Scheduler._finish`, handles "a node reached a final
state": record it, release inputs, wake dependents and decide for each (run,
or skip through the trigger rules), iteratively so that a skip cascade down a
100,000-node chain needs no recursion. Every dispatch and every finish is
O(edges of that node); nothing scans the graph while it runs.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import re
import time
import warnings
from typing import Any

from .._data.cache import CacheStore, expiry, wire_hash
from .._data.serialize import Payload
from .._executors.protocol import ERROR, HELD, OK, REQUEUE, Call, Executor
from .._model.errors import WorkerCrashed, safe_str
from .._model.graph import Graph
from .._model.handle import materialize
from .._model.keys import CacheContext, Fingerprint, Unhashable, content_hash, task_input_hash
from .._model.node import ALLOW, DATA
from .._model.options import retry_delay_for, should_retry
from .._model.run import Run
from .._model.state import (
    CACHED,
    CANCELLED,
    COMPLETED,
    FAILED,
    FINAL,
    RETRYING,
    Attempt,
    State,
)
from .._model.walk import substitute

logger = logging.getLogger("graphexec")

LOCK_POLL = 0.1  # seconds between looks at a cache entry another process is computing
CHAIN_MAX = 8  # calls chained behind one: each waits in the worker's pipe
_SAFE_KEY = re.compile(r"[0-9a-zA-Z_-]{8,128}")

# Triggers under which a dependent runs although an upstream failed (fail_fast
# leaves such a failure to them instead of cancelling the run).
_REACTING_TRIGGERS = frozenset({"all_done", "always", "any_failed", "all_failed"})


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
        self.order = [0] * n
        self.member = bytearray(n)
        self.waiting = [0] * n
        self.uses = [0] * n
        self.dependents: list[list[int] | None] = [None] * n
        self.states = run._states
        self.history: dict[int, list[Attempt]] = {}
        self.root: dict[int, int] = {}  # skipped node -> the failed node that caused it
        self.handled = run._handled
        self.kept = run._kept
        self.ready: list[tuple[int, int, int]] = []
        self.retry_at: list[tuple[float, int, int]] = []
        self.parked: dict[Any, list[tuple[int, int, int]]] = {}
        self.in_use: dict[Any, int] = {}
        self.running: dict[int, Call] = {}
        self.unsent: dict[int, Call] = {}  # calls the executor refused for now
        # Chains (see _chain): calls sent to a worker behind the call of their
        # sole upstream, not running until it answers; only the process pool
        # runs them, and only for compute() (a flow's user may read any value).
        self.chained: dict[int, Call] = {}
        self.chains = executor.capabilities.chains
        self.cancel_reason: str | None = None
        self.swept = False  # the cancellation sweep has run
        self.fail_fast_cause: int | None = None  # the failure that cancelled the run
        self.seq = 0
        self._task_caps: dict[int, int] = {}
        self.cache = cache
        self.refresh_cache = refresh_cache
        self.keys: dict[int, str] = {}  # node -> its cache key (hit, or ours to write)
        self.signatures: dict[Any, Any] = {}  # task -> inspect.Signature (or None), for keys
        self.locked: set[int] = set()  # nodes whose cache lock we hold
        self.lock_waits: set[int] = set()  # nodes waiting for another's cache lock
        self.refreshed: set[str] = set()  # keys recomputed by this run (refresh_cache)
        self.refreshing: set[int] = set()  # nodes running to refresh their entry
        # Progress bars and reports watch the run through four calls:
        # started(run), running(i, call), finished(i, state), retrying(i, state).
        self.observer = observer

        deps = graph._deps
        for pos, i in enumerate(run.members):
            self.order[i] = pos
            self.member[i] = 1
        for i in run.members:
            self.waiting[i] = len(deps[i])
            self._link(i)

    def _link(self, i: int) -> None:
        """Register node i as a dependent of its upstreams (and a user of their values)."""
        fl = self.graph._flags[i]
        for k, up in enumerate(self.graph._deps[i]):
            lst = self.dependents[up]
            if lst is None:
                self.dependents[up] = [i]
            else:
                lst.append(i)
            if fl is None or fl[k] & DATA:
                self.uses[up] += 1

    # -- main loop ------------------------------------------------------------

    def run(self) -> None:
        """Run every member to a final state (``graph.compute``)."""
        if self.observer is not None:
            self.observer.started(self.run_)
        for i in self.run_.members:
            if self.waiting[i] == 0 and self.states[i] is None:
                cached = self._become_ready(i)
                if cached is not None:
                    self._finish(i, cached)
        while self.done < self.n_members:
            self._step(idle_ok=False)

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
                elif kind == "cancel":
                    self.cancel_reason = self.cancel_reason or arg
                elif kind == "open-cache":  # once per session, before its first cached node
                    if self.cache is None:
                        self.cache = CacheStore(arg)
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
        run._member_set.add(i)
        self.member[i] = 1
        self.order[i] = self.n_members
        self.n_members += 1
        self._link(i)
        waiting = 0
        for up in graph._deps[i]:
            state = self.states[up]
            if state is None or state.name not in FINAL:
                waiting += 1
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
            self.cancel(self.cancel_reason, everything=False)
            return  # the caller re-checks whether anything is left to do
        self._dispatch()
        timeout = None
        if self.retry_at:
            timeout = max(0.0, self.retry_at[0][0] - time.monotonic())
        if not self.running and not self.ready and timeout is None and not idle_ok:
            raise RuntimeError(
                f"graphexec scheduler stalled with {self.n_members - self.done} nodes "
                "unfinished; this is a bug, please report it"
            )
        for call, kind, value in self.executor.poll(timeout):
            self._on_outcome(call, kind, value)
        now = time.monotonic()
        while self.retry_at and self.retry_at[0][0] <= now:
            i = heapq.heappop(self.retry_at)[2]
            if i in self.lock_waits:
                self.lock_waits.discard(i)
                cached = self._become_ready(i)
                if cached is not None:
                    self._finish(i, cached)
            else:
                self._push_ready(i)

    def _push_ready(self, i: int) -> None:
        heapq.heappush(self.ready, (-self.graph._opts[i].priority, self.order[i], i))

    def _dispatch(self) -> None:
        ready, executor = self.ready, self.executor
        while ready:
            i = ready[0][2]
            keys = self._limit_keys(i)
            if keys:
                full = next((k for k in keys if self.in_use.get(k, 0) >= self._cap(k)), None)
                if full is not None:
                    heapq.heappush(self.parked.setdefault(full, []), heapq.heappop(ready))
                    continue
            call = self.unsent.pop(i, None) or self._make_call(i)
            if self.chains:
                call.then = self._chain(i)
            if not executor.submit(call):
                call.then = None
                self.unsent[i] = call
                return
            if call.then:  # the pool cut it to what it sent: link it call by call
                prev = call
                for nxt in call.then:
                    self.chained[nxt.node] = nxt
                    prev.then = [nxt]
                    prev = nxt
            heapq.heappop(ready)
            for k in keys:
                self.in_use[k] = self.in_use.get(k, 0) + 1
            self.running[i] = call
            if self.observer is not None:
                self.observer.running(i, call)

    def _limit_keys(self, i: int) -> list[Any]:
        opts = self.graph._opts[i]
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

    def _chain(self, i: int) -> list[Call] | None:
        """Calls to send right behind node i's, on its worker, each taking the value
        of the one before it in that worker's memory (see ``_call.py``).

        A value is kept in a worker only where nothing could need it again: its
        node has one consumer, which takes it once as plain data; it is not kept
        for the Run nor written to the cache; the consumer will surely run (its
        other inputs are all completed, plain ``all_success``) and never runs
        twice (no retries) nor waits for a slot (no concurrency limit) nor keys
        a cache entry on it. So a value lost with a worker — a crash, a kill —
        is never needed: its consumer either failed with that worker or never
        started, and then its upstream failed too.
        """
        graph = self.graph
        chain: list[Call] = []
        x = i
        while len(chain) < CHAIN_MAX and self.cancel_reason is None:
            if (
                x in self.kept
                or x in self.locked
                or self.uses[x] != 1
                or graph._opts[x].return_state
            ):
                break
            consumers = self.dependents[x]
            if consumers is None or len(consumers) != 1:
                break
            d = consumers[0]
            opts = graph._opts[d]
            if (
                self.states[d] is not None
                or self.waiting[d] != 1
                or d in self.chained
                or d in self.running
                or d in self.unsent
                or opts.retries
                or opts.cache_key_fn is not None
                or opts.trigger != "all_success"
                or self._limit_keys(d)
            ):
                break
            fl = graph._flags[d]
            if not all(
                (fl is None or fl[k] == DATA)
                if up == x
                else (self.states[up] is not None and self.states[up].is_completed())
                for k, up in enumerate(graph._deps[d])
            ):
                break
            chain.append(self._make_call(d, held=x))
            x = d
        return chain or None

    def _unchain(self, call: Call) -> None:
        """``call``'s chain will not run behind it: forget the calls chained to it."""
        nxt = call.then[0] if call.then else None
        call.then = None
        while nxt is not None:
            self.chained.pop(nxt.node, None)
            after = nxt.then[0] if nxt.then else None
            nxt.then = None
            nxt = after

    def _make_call(self, i: int, held: int = -1) -> Call:
        """The Call for node i; ``held``: the upstream whose value a worker keeps for it."""
        graph = self.graph
        opts = graph._opts[i]
        inputs: dict[int, Any] = {}
        ups = graph._deps[i]
        if ups:
            fl = graph._flags[i]
            for k, up in enumerate(ups):
                if up == held:
                    inputs[up] = HELD
                elif fl is None or fl[k] & DATA:
                    inputs[up] = self._value_for_dependent(up)
        call = Call(
            i,
            graph._names[i],
            graph._tasks[i].fn,
            graph._args[i],
            graph._kwargs[i],
            bool(inputs),
            inputs,
            opts.timeout,
            len(self.history.get(i, ())) + 1,
        )
        if i in self.locked:
            meta = {"task": graph._tasks[i].name, "expires": expiry(opts.cache_expiration)}
            call.cache = (str(self.cache.root), self.keys[i], meta)
        return call

    def _value_for_dependent(self, up: int) -> Any:
        state = self.states[up]
        if self.graph._opts[up].return_state:
            return state
        if state.is_completed():
            return state._value
        return state.exception

    # -- outcomes -------------------------------------------------------------

    def _on_outcome(self, call: Call, kind: int, value: Any) -> None:
        i = call.node
        if self.running.get(i) is not call:
            # Cancelled while in flight (already final), or a call left running by
            # an earlier compute on a shared pool: its node index means nothing here.
            if kind == OK and value is not HELD:
                self.executor.release(i, value)
            return
        del self.running[i]
        if call.then:
            if kind == OK and value is HELD:  # the next call of the chain starts now
                nxt = call.then[0]
                call.then = None
                del self.chained[nxt.node]
                self.running[nxt.node] = nxt
                if self.observer is not None:
                    self.observer.running(nxt.node, nxt)
            else:
                self._unchain(call)
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
        call.inputs = {}
        call.wire = None
        for k in self._limit_keys(i):
            self.in_use[k] -= 1
            waiting = self.parked.get(k)
            if waiting:
                self._push_ready(heapq.heappop(waiting)[2])
        if kind == REQUEUE:
            self._push_ready(i)
            return
        error = None if kind == OK else value
        attempt = Attempt(call.number, call.started, call.finished, call.worker, error)
        history = self.history.setdefault(i, [])
        history.append(attempt)
        name = self.graph._names[i]
        if kind == OK:
            self._finish(i, State(COMPLETED, name, value=value, history=history))
            return
        opts = self.graph._opts[i]
        failed = State(
            FAILED,
            name,
            exception=error,
            history=history,
            message=f"{type(error).__name__}: {safe_str(error)}",
        )
        if call.number <= opts.retries and self.cancel_reason is None:
            try:
                again = should_retry(opts, error, failed, self.graph._tasks[i])
            except Exception:
                logger.exception("retry_on/retry_condition_fn of %s raised; not retrying", name)
                again = False
            if again:
                delay = retry_delay_for(opts, call.number)
                attempt.retry_delay = delay
                self.states[i] = State(
                    RETRYING,
                    name,
                    exception=error,
                    history=history,
                    message=f"attempt {call.number} failed "
                    f"({type(error).__name__}: {safe_str(error)}); "
                    f"retry {call.number} of {opts.retries} in {delay:g} s",
                )
                logger.info("%s: %s", name, self.states[i].message)
                if self.observer is not None:
                    self.observer.retrying(i, self.states[i])
                if delay > 0:
                    self.seq += 1
                    heapq.heappush(self.retry_at, (time.monotonic() + delay, self.seq, i))
                else:
                    self._push_ready(i)
                return
        logger.warning("%s failed: %s: %s", name, type(error).__name__, safe_str(error))
        self._finish(i, failed)

    def _finish(self, i: int, state: State) -> None:
        """Node ``i`` reached a final state: record it, release inputs, wake dependents."""
        graph = self.graph
        work = [(i, state)]
        while work:
            i, state = work.pop()
            if self.states[i] is not None and self.states[i].name in FINAL:
                continue
            self.states[i] = state
            self.done += 1
            if self.observer is not None:
                self.observer.finished(i, state)
            if i in self.locked:
                self.locked.discard(i)
                self.cache.unlock(self.keys[i])
                if i in self.refreshing and state.is_completed():
                    self.refreshed.add(self.keys[i])
            if state.is_completed() and self.uses[i] == 0 and i not in self.kept:
                self._release(i, state)
            elif state.name is FAILED:
                self._on_failure(i)
            ups, fl = graph._deps[i], graph._flags[i]
            for k, up in enumerate(ups):
                if fl is None or fl[k] & DATA:
                    self.uses[up] -= 1
                    if self.uses[up] == 0 and up not in self.kept:
                        up_state = self.states[up]
                        if up_state is not None and up_state.is_completed():
                            self._release(up, up_state)
            for d in self.dependents[i] or ():
                self.waiting[d] -= 1
                if self.waiting[d] == 0 and self.states[d] is None and d not in self.running:
                    skip = self._resolve(d)
                    if skip is not None:
                        work.append((d, skip))

    def _release(self, i: int, state: State) -> None:
        """Drop node i's value: nobody pending needs it and it is not kept."""
        handle = state._value
        state._release()
        self.executor.release(i, handle)

    def _on_failure(self, i: int) -> None:
        opts = self.graph._opts[i]
        if opts.allow_failure or opts.return_state:
            self.handled.add(i)  # declared on the task: its failures never block
            return
        if not self.fail_fast or self.cancel_reason is not None:
            return
        accepted_by_all = all(self._edge_accepts(d, i) for d in self.dependents[i] or ()) and bool(
            self.dependents[i]
        )
        if not accepted_by_all:
            self.cancel_reason = f"fail_fast: {self.graph._names[i]} failed"
            self.fail_fast_cause = i

    def _edge_flag(self, d: int, up: int) -> int:
        ups, fl = self.graph._deps[d], self.graph._flags[d]
        if fl is None:
            return DATA
        return fl[ups.index(up)]

    def _edge_accepts(self, d: int, up: int) -> bool:
        # Triggers that react to failures take this one; none_failed (like
        # all_success) is skipped by it, so it handles nothing.
        return (
            bool(self._edge_flag(d, up) & ALLOW)
            or self.graph._opts[d].trigger in _REACTING_TRIGGERS
        )

    # -- policies -------------------------------------------------------------

    def _resolve(self, d: int) -> State | None:
        """All of d's upstreams are final: queue d to run, or return its final state
        (Skipped by the policies, or Cached)."""
        graph = self.graph
        opts = graph._opts[d]
        trigger = opts.trigger
        ups, fl = graph._deps[d], graph._flags[d]
        if not ups:  # nothing to react to: a root node runs whatever its trigger
            if self.cancel_reason is not None and trigger != "always":
                return None
            return self._become_ready(d)
        n_failed = 0  # Failed, or Skipped because of a failure, or Cancelled
        blocking = None  # upstream that stops an all_success node: the first failure-like
        blocked_by_failure = False  # one, else the first (a skip not caused by a failure)
        first_failed = None  # first failure-like upstream (stops a none_failed node)
        problems: list[int] = []
        for k, up in enumerate(ups):
            st = self.states[up]
            if st.is_completed():
                continue
            failure_like = st.name is FAILED or st.name is CANCELLED or up in self.root
            if failure_like:
                n_failed += 1
                if first_failed is None:
                    first_failed = up
            problems.append(up)
            if trigger == "all_success" and not blocked_by_failure:
                flag = DATA if fl is None else fl[k]
                upopts = graph._opts[up]
                if not (flag & ALLOW or upopts.allow_failure or upopts.return_state) and (
                    blocking is None or failure_like
                ):
                    # A failure upstream wins over a skip that no failure caused,
                    # whatever the argument order: the skip must count as failure-
                    # caused further down.
                    blocking, blocked_by_failure = up, failure_like
        name = graph._names[d]
        if trigger == "all_success":
            run = blocking is None
        elif trigger in ("all_done", "always"):
            run = True
        elif trigger == "any_failed":
            run = n_failed > 0
        elif trigger == "all_failed":
            run = n_failed == len(ups)
        else:  # none_failed
            run = n_failed == 0
        if run:
            if self.cancel_reason is not None and trigger != "always":
                # fail_fast: it would run, so it is cancelled (by the sweep), and
                # handles nothing: only a dependent that runs handles a failure. A
                # node that an upstream failure skips is Skipped even then: it
                # names the failure, which is what it ended by.
                return None
            for up in problems:  # this dependent accepted these failures
                root = up if self.states[up].name is FAILED else self.root.get(up)
                if root is not None and root != self.fail_fast_cause:
                    # (the failure that made fail_fast cancel the run stays unhandled:
                    # a cleanup node running afterwards must not turn it into success)
                    self.handled.add(root)
            return self._become_ready(d)
        if trigger == "none_failed":
            # Skipped because an upstream failed, as all_success would be: record the
            # root failure so that the skip counts as failure-caused further down.
            blocking = first_failed
        if (
            self.cancel_reason is not None
            and trigger != "always"
            and (
                blocking is None
                or (self.states[blocking].name is not FAILED and blocking not in self.root)
            )
        ):
            return None  # not ended by a failure: the cancellation sweep cancels it
        if blocking is not None:
            st = self.states[blocking]
            root = blocking if st.name is FAILED else self.root.get(blocking)
            if root is not None:
                self.root[d] = root
                root_name = graph._names[root]
                if root == blocking:
                    why = f"{name} was skipped because its upstream {root_name} failed"
                else:
                    why = (
                        f"{name} was skipped because its upstream {graph._names[blocking]} "
                        f"was skipped ({root_name} failed)"
                    )
                return State.skipped(name, root_name, why)
            return State.skipped(
                name,
                None,
                f"{name} was skipped because its upstream {graph._names[blocking]} "
                f"was {st.name.lower()}",
            )
        return State.skipped(
            name,
            None,
            f"{name} was skipped: trigger={trigger!r} not met "
            f"({n_failed} of {len(ups)} upstream nodes failed)",
        )

    # -- caching --------------------------------------------------------------

    def _become_ready(self, i: int) -> State | None:
        """Queue node i, unless its result is cached: then return its Cached state.

        A miss takes the entry's lock first; if another process (or node) holds
        it, the node waits a little and looks again, so the entry is computed
        once and then found.
        """
        opts = self.graph._opts[i]
        if self.cache is None or opts.cache_key_fn is None:
            self._push_ready(i)
            return None
        key = self.keys.get(i) or self._cache_key(i)
        if key is None:
            self._push_ready(i)
            return None
        self.keys[i] = key
        # Refresh recomputes a key once per run; other nodes with that key then hit.
        refresh = (self.refresh_cache or opts.refresh_cache) and key not in self.refreshed
        if not refresh:
            hit = self.cache.lookup(key)
            if hit is not None:
                return State(
                    CACHED,
                    self.graph._names[i],
                    value=hit,
                    message=f"loaded from cache entry {key[:12]}",
                )
        if self.cache.try_lock(key):
            # Another process may have written the entry between our lookup and lock.
            hit = None if refresh else self.cache.lookup(key)
            if hit is not None:
                self.cache.unlock(key)
                return State(
                    CACHED,
                    self.graph._names[i],
                    value=hit,
                    message=f"loaded from cache entry {key[:12]}",
                )
            self.locked.add(i)
            if refresh:
                self.refreshing.add(i)
            self._push_ready(i)
            return None
        self.lock_waits.add(i)
        self.seq += 1
        heapq.heappush(self.retry_at, (time.monotonic() + LOCK_POLL, self.seq, i))
        return None

    def _cache_key(self, i: int) -> str | None:
        graph = self.graph
        task, opts = graph._tasks[i], graph._opts[i]
        ups, fl = graph._deps[i], graph._flags[i]
        use_fingerprints = opts.cache_key_fn is task_input_hash
        values: dict[int, Any] = {}
        try:
            for k, up in enumerate(ups):
                if fl is None or fl[k] & DATA:
                    handle = self._value_for_dependent(up)
                    values[up] = (
                        Fingerprint(self._fingerprint(up, handle))
                        if use_fingerprints
                        else materialize(handle)
                    )
        except Unhashable as exc:
            warnings.warn(f"{graph._names[i]} is not cached: {exc}", RuntimeWarning, stacklevel=2)
            return None
        args = substitute(graph._args[i], values)
        kwargs = substitute(graph._kwargs[i], values) if graph._kwargs[i] else {}
        signature = self.signatures.get(task, False)
        if signature is False:  # once per task, not per node: signature() is slow
            try:
                signature = inspect.signature(task.fn)
            except (TypeError, ValueError):
                signature = None
            self.signatures[task] = signature
        try:
            if signature is None:
                raise TypeError("no signature")
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
        except TypeError:
            arguments = {"args": args, "kwargs": kwargs}
        try:
            key = opts.cache_key_fn(CacheContext(task, graph._names[i]), arguments)
        except Exception as exc:
            logger.warning(
                "%s: cache_key_fn raised %s: %s; not cached",
                graph._names[i],
                type(exc).__name__,
                exc,
            )
            return None
        if key is not None and not isinstance(key, str):
            key = content_hash(key)
        elif key is not None and not _SAFE_KEY.match(key):
            key = content_hash(key)  # user keys become file names: hash anything unusual
        return key

    def _fingerprint(self, up: int, handle: Any) -> str:
        """An upstream value's stand-in in a key: its own key, else its content hash."""
        key = self.keys.get(up)
        if key is not None and self.states[up].is_completed():
            return key
        if type(handle) is Payload:
            return wire_hash(handle.wire)
        if isinstance(handle, State):
            return f"state:{handle.name}:" + self._fingerprint(up, handle._value)
        if isinstance(handle, BaseException):
            return content_hash(("exception", type(handle).__qualname__, safe_str(handle)))
        return content_hash(handle)

    # -- cancellation ---------------------------------------------------------

    def cancel(self, why: str, everything: bool) -> None:
        """Give every unfinished node a final state: Cancelled.

        ``everything=False`` (fail_fast) spares ``trigger="always"`` nodes that have
        not started: they still run once their upstreams are final.
        """
        self.cancel_reason = why
        self.swept = True
        logger.warning("cancelling the run: %s", why)
        for call in self.executor.cancel_running():
            if self.running.get(call.node) is call:
                del self.running[call.node]
                history = self.history.setdefault(call.node, [])
                call.finished = time.time()
                history.append(
                    Attempt(
                        call.number, call.started or call.finished, call.finished, call.worker, None
                    )
                )
                self._finish(call.node, State.cancelled(self.graph._names[call.node], why, history))
        self.ready.clear()
        self.retry_at.clear()
        self.parked.clear()
        self.unsent.clear()
        self.chained.clear()
        self.in_use.clear()
        graph = self.graph
        if not everything:
            # "always" nodes that were queued (ready, parked, waiting out a retry
            # delay) go back to the queue once. Those whose last upstream gets
            # cancelled below are queued by _resolve instead: queuing them here
            # as well would run them twice.
            for i in self.run_.members:
                if (
                    (self.states[i] is None or self.states[i].name not in FINAL)
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
