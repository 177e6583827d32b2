"""Triggers and failure policies: what a node does once its upstreams are final.

Pure functions over the scheduler's containers (passed in, never imported):
:func:`resolve` decides for a node whose upstreams are all final whether it
runs, is Skipped (naming the failure that caused it) or is left to the
cancellation sweep; :func:`on_failure` records a failure declared handled on
the task and says whether ``fail_fast`` must cancel the run.

``root[i]`` (owned by the scheduler): for a node Skipped because of a failure,
the failed node at the origin of its chain of skips, so that a skip counts as
failure-caused further down and a reacting dependent handles the real failure.
"""

from __future__ import annotations

import enum
from typing import Final

from .._model.graph import Graph
from .._model.node import ALLOW, DATA
from .._model.state import CANCELLED, FAILED, SKIPPED, State

# Triggers under which a dependent runs although an upstream failed (fail_fast
# leaves such a failure to them instead of cancelling the run).
REACTING_TRIGGERS = frozenset({"all_done", "always", "any_failed", "all_failed"})


class Resolution(enum.Enum):
    """What :func:`resolve` returns for a node that runs (unless its value is cached)."""

    RUN = "RUN"


RUN: Final = Resolution.RUN

# Triggers under which :func:`resolve` says RUN for a node whose upstreams all
# completed (while the run is not being cancelled): the scheduler's shortcut
# for the common case, where nothing upstream failed, was skipped or cancelled.
RUNS_WHEN_CLEAN = frozenset({"all_success", "all_done", "always", "none_failed"})


def resolve(
    graph: Graph,
    states: list[State | None],
    root: dict[int, int],
    handled: set[int],
    d: int,
    cancelling: bool,
    fail_fast_cause: int | None,
    spare_always: bool = True,
) -> State | Resolution | None:
    """All of d's upstreams are final: :data:`RUN`, its Skipped state, or None.

    None: the run is being cancelled and d would run, so the cancellation
    sweep cancels it. ``cancelling``: fail_fast (or Ctrl-C) set a cancel
    reason; ``fail_fast_cause``: the failure that did it; ``spare_always``:
    ``trigger="always"`` nodes still run (fail_fast; not Ctrl-C, which cancels
    everything). Records in ``handled`` the failures a running d accepts, and
    in ``root`` the failure behind d's skip.
    """
    opts = graph._opts[d]
    trigger = opts.trigger
    # cancelled with the rest: every node but an "always" one fail_fast spares
    cancels_it = cancelling and not (spare_always and trigger == "always")
    ups, fl = graph._deps[d], graph._flags[d]
    if not ups:  # nothing to react to: a root node runs whatever its trigger
        if cancels_it:
            return None
        return RUN
    n_failed = 0  # Failed, or Skipped because of a failure, or Cancelled
    blocking = None  # upstream that stops an all_success node: the first failure-like
    blocked_by_failure = False  # one, else the first (a skip not caused by a failure)
    first_failed = None  # first failure-like upstream (stops a none_failed node)
    problems: list[int] = []
    for k, up in enumerate(ups):
        st = states[up]
        assert st is not None  # every upstream is final
        if st.is_completed():
            continue
        failure_like = st.name is FAILED or st.name is CANCELLED or up in root
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
        if cancels_it:
            # fail_fast: it would run, so it is cancelled (by the sweep), and
            # handles nothing: only a dependent that runs handles a failure. A
            # node that an upstream failure skips is Skipped even then: it
            # names the failure, which is what it ended by.
            return None
        for up in problems:  # this dependent accepted these failures
            failed_root = up if _state(states, up).name is FAILED else root.get(up)
            if failed_root is not None and failed_root != fail_fast_cause:
                # (the failure that made fail_fast cancel the run stays unhandled:
                # a cleanup node running afterwards must not turn it into success)
                handled.add(failed_root)
        return RUN
    if trigger == "none_failed":
        # Skipped because an upstream failed, as all_success would be: record the
        # root failure so that the skip counts as failure-caused further down.
        blocking = first_failed
    if cancels_it and (
        blocking is None or (_state(states, blocking).name is not FAILED and blocking not in root)
    ):
        return None  # not ended by a failure: the cancellation sweep cancels it
    if blocking is not None:
        st = _state(states, blocking)
        failed_root = blocking if st.name is FAILED else root.get(blocking)
        if failed_root is not None:
            root[d] = failed_root
            root_name = graph._names[failed_root]
            if failed_root == blocking:
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


def _state(states: list[State | None], i: int) -> State:
    """The final state of an upstream (every upstream of a resolved node is final)."""
    st = states[i]
    assert st is not None
    return st


def on_failure(
    graph: Graph,
    dependents: list[list[int] | tuple[int, ...] | None],
    handled: set[int],
    i: int,
    watching: bool,
) -> bool:
    """Node i failed: True if fail_fast must cancel the run.

    A failure declared handled on the task (``allow_failure``, ``return_state``)
    is recorded in ``handled`` and never cancels. ``watching``: fail_fast is on
    and the run is not already being cancelled. Otherwise the run is cancelled
    unless every dependent of i accepts the failure (there must be one).
    """
    opts = graph._opts[i]
    if opts.allow_failure or opts.return_state:
        handled.add(i)  # declared on the task: its failures never block
        return False
    if not watching:
        return False
    ds = dependents[i]
    return not ds or not all(edge_accepts(graph, d, i) for d in ds)


def edge_flag(graph: Graph, d: int, up: int) -> int:
    """The flags of the edge from ``up`` to ``d`` (DATA, ALLOW...)."""
    ups, fl = graph._deps[d], graph._flags[d]
    if fl is None:
        return DATA
    return fl[ups.index(up)]


def edge_accepts(graph: Graph, d: int, up: int) -> bool:
    """True if d runs when ``up`` fails (it takes the failure as an allowed input or
    reacts to failures). none_failed is skipped by any failure, even over an
    allowed edge (``resolve``): it handles nothing, so fail_fast must not wait for it."""
    trigger = graph._opts[d].trigger
    if trigger == "none_failed":
        return False
    return bool(edge_flag(graph, d, up) & ALLOW) or trigger in REACTING_TRIGGERS


def failures_behind(graph: Graph, states: list[State | None], d: int) -> list[int]:
    """The failed nodes behind node d's skip: every failure that stopped it.

    Walks up from d through upstreams that were themselves skipped because of a
    failure, over the edges that blocked (an edge that accepts failures, or an
    upstream that declared ``allow_failure``/``return_state``, stopped nothing
    under ``all_success``). A flow's user who caught the ``UpstreamFailed`` of
    d's ``.result()`` has looked at all of them. Reads final states only, so
    any thread may call it once d is final.
    """
    st = states[d]
    if st is None or st.name is not SKIPPED or st.upstream is None:
        return []
    found: list[int] = []
    seen = {d}
    stack = [d]
    while stack:
        s = stack.pop()
        strict = graph._opts[s].trigger == "all_success"
        ups, fl = graph._deps[s], graph._flags[s]
        for k, up in enumerate(ups):
            if up in seen:
                continue
            up_state = states[up] if up < len(states) else None
            if up_state is None:
                continue
            if strict:
                upopts = graph._opts[up]
                flag = DATA if fl is None else fl[k]
                if flag & ALLOW or upopts.allow_failure or upopts.return_state:
                    continue
            if up_state.name is FAILED:
                seen.add(up)
                found.append(up)
            elif up_state.name is SKIPPED and up_state.upstream is not None:
                seen.add(up)
                stack.append(up)
    return found
