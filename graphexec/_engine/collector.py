"""Full collections of Python's cyclic garbage collector wait while ``compute`` runs.

A run's scheduler loop allocates one long-lived object per node (its
:class:`~graphexec.State`, kept by the Run) and leaves no cyclic garbage of
its own: everything else it makes dies by
reference counting. CPython (before 3.14) starts a full collection whenever
the objects that survived into the oldest generation since the last one
exceed a quarter of those already there, and a full collection walks every
container in the process, the graph's nodes and the run's states included.
A run's states grow the heap by that quarter again and again: two full
collections during a 100,000-node run (60-80 ms each), four during a
million-node one (about half a second each), all finding nothing to free,
about a tenth of the parent's time. Such collections, not the scheduler's
own work, were most of why a node cost more at 100,000 nodes than at 10,000
(docs/dispatch.md, "Round four").

So, while :meth:`Scheduler.run` loops, the oldest generation's threshold is
raised out of reach; young collections go on as before, so the short-lived
cycles the program's other threads make meanwhile are still collected. At
the end the program's threshold comes back, and the full collection the
run's growth calls for happens once, afterwards, instead of every time the
heap grew by a quarter. It is the same bargain ``with graph:`` makes for a
build (``_model/graph.py`` pauses the whole collector there), narrowed to
full collections because a run, unlike a build, may last hours. And only when
the calls run in other processes (``Capabilities.in_process`` false): tasks
run by the ``sync`` or ``threads`` executor make their garbage here, and a
cycle of theirs that lived long enough to reach the oldest generation must
not wait for the end of an overnight run.

The program keeps the last word: nothing changes if its collector is off or
its youngest threshold is 0 (no automatic collection), and a threshold it
sets during the run is left as it set it. Nested and concurrent runs (threads,
a shared pool) share one count; the threshold comes back when the last one
ends. A process forked meanwhile (a worker or a zygote started during a
run) gets the program's threshold back at once: it is not running the
run, and a worker lives on after it. From Python 3.14 the collector is
incremental and ignores the third threshold: nothing is changed there.
"""

from __future__ import annotations

import gc
import os
import sys
import threading

# Far above any count a run reaches: the oldest generation's count grows by one
# per collection of the middle one, that is every 7,000 net allocations or so.
_OUT_OF_REACH = 1 << 30
_APPLIES = sys.version_info < (3, 14)

_lock = threading.Lock()
_pauses = 0
_saved: tuple[int, int, int] | None = None  # the program's thresholds, while ours are set
_ours: tuple[int, int, int] | None = None


def pause_full_collections() -> None:
    """Hold off full collections until the matching :func:`resume_full_collections`."""
    global _pauses, _saved, _ours
    with _lock:
        if _pauses == 0 and _APPLIES and gc.isenabled():
            current = gc.get_threshold()
            if current[0] > 0 and current[2] < _OUT_OF_REACH:
                _saved = current
                _ours = (current[0], current[1], _OUT_OF_REACH)
                gc.set_threshold(*_ours)
        _pauses += 1


def resume_full_collections() -> None:
    """End one pause; the last one gives the program its threshold back."""
    global _pauses, _saved, _ours
    with _lock:
        _pauses -= 1
        if _pauses == 0 and _saved is not None:
            if gc.get_threshold() == _ours:  # else the program set its own meanwhile
                gc.set_threshold(*_saved)
            _saved = _ours = None


def _after_fork_in_child() -> None:
    """A forked child runs no run of the parent's: the program's threshold, no pause."""
    global _lock, _pauses, _saved, _ours
    _lock = threading.Lock()  # (another thread of the parent may have held it)
    if _saved is not None and gc.get_threshold() == _ours:
        gc.set_threshold(*_saved)
    _pauses = 0
    _saved = _ours = None


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_after_fork_in_child)
