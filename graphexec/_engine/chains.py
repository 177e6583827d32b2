"""Chains: a sole consumer sent to a worker right behind the call it consumes.

For an executor with ``Capabilities.chains`` (the process pool, in
``compute``), the scheduler hands ``submit`` a call together with the calls of
its chain of sole consumers (``Call.then``); the worker runs them one after
another and hands each value to the next in memory (see ``_executors/protocol.py``).
:func:`build_chain` decides which consumers may go; :func:`unchain` forgets
a chain that will not run behind its head.

A value is kept in a worker only where nothing could need it again: its node
has one consumer, which takes it once as plain data; it is not kept for the
Run nor written to the cache; the consumer will surely run (its other inputs
are all completed, plain ``all_success``) and never runs twice (no retries)
nor waits for a slot (no concurrency limit) nor keys a cache entry on it, and
has no timeout (a timeout kills the worker). So a value lost with a worker —
a crash, a kill — is never needed by the run: its consumer either failed
with that worker or never started, and then its upstream failed too. Only
``run.replay`` of a consumer that crashed its worker misses it, and
``run.inputs`` says so; a consumer that raised sends it back.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any, Protocol

from .._executors.protocol import Call
from .._model.graph import Graph
from .._model.node import DATA
from .._model.state import State

# Calls chained behind one. They wait in the worker's pipe (the pool also caps
# their bytes) and can run nowhere else anyway: each needs the one before.
CHAIN_MAX = 32


class ChainHost(Protocol):
    """The scheduler state a chain is built from (see ``scheduler.py``'s docstring)."""

    graph: Graph

    @property
    def kept(self) -> Container[int]: ...  # read only: a set, or a session's "everything"

    locked: set[int]
    uses: list[int]
    dependents: list[list[int] | tuple[int, ...] | None]
    states: list[State | None]
    waiting: list[int]
    chained: dict[int, Call]
    running: dict[int, Call]
    unsent: dict[int, Call]
    cancel_reason: str | None

    def _limit_keys(self, i: int) -> list[Any] | tuple[()]: ...

    def _make_call(self, i: int, held: int = -1) -> Call: ...


def build_chain(s: ChainHost, i: int) -> list[Call] | None:
    """Calls to send right behind node i's, on its worker, each taking the value of
    the one before it in that worker's memory; None if no consumer qualifies."""
    graph = s.graph
    kept, locked, uses, dependents = s.kept, s.locked, s.uses, s.dependents
    states, waiting = s.states, s.waiting
    chain: list[Call] = []
    x = i
    while len(chain) < CHAIN_MAX and s.cancel_reason is None:
        if x in kept or x in locked or uses[x] != 1 or graph._opts[x].return_state:
            break
        consumers = dependents[x]
        if consumers is None or len(consumers) != 1:
            break
        d = consumers[0]
        opts = graph._opts[d]
        if (
            states[d] is not None
            or waiting[d] != 1
            or d in s.chained
            or d in s.running
            or d in s.unsent
            or opts.retries
            # a timeout kills the worker, and with it the held input a replay needs
            or opts.timeout is not None
            or opts.cache_key_fn is not None
            or opts.trigger != "all_success"
            or s._limit_keys(d)
        ):
            break
        fl = graph._flags[d]
        if not all(
            (fl is None or fl[k] == DATA) if up == x else _completed(states[up])
            for k, up in enumerate(graph._deps[d])
        ):
            break
        chain.append(s._make_call(d, held=x))
        x = d
    return chain or None


def _completed(state: State | None) -> bool:
    return state is not None and state.is_completed()


def unchain(chained: dict[int, Call], call: Call) -> None:
    """``call``'s chain will not run behind it: forget the calls chained to it."""
    nxt = call.then[0] if call.then else None
    call.then = None
    while nxt is not None:
        chained.pop(nxt.node, None)
        after = nxt.then[0] if nxt.then else None
        nxt.then = None
        nxt = after
