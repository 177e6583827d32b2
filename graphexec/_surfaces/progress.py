"""The live progress bar and the unattended log line: two observers of graphexec's own.

Both are :class:`~graphexec._surfaces.hooks.Observer` subclasses, fed by the
same :class:`~graphexec._surfaces.hooks.Dispatch` as the user's observers,
but called on the scheduler's thread (``_inline``): they only count, and a
user's slow hook queued on the dispatcher thread must not freeze the bar.
That is how the bar always worked: drawing is tqdm's job and tqdm throttles
it (``mininterval``), so a dispatch costs a few attribute updates, not a
terminal write. The counts shown after the bar (running, failed, ...) are
formatted only when tqdm draws (``Bar.format_dict``).

In a Jupyter kernel the bar is tqdm's notebook widget (``tqdm.notebook``,
which needs ipywidgets) and is shown by default, since a kernel's stderr is
never a terminal; without ipywidgets it is the text bar, written to the
cell's stderr.

When nothing finishes for a while (every worker busy with a long task) no
event comes; a small thread redraws the bar once a second so that the elapsed
time keeps moving and the run does not look hung.

Without a bar (stderr is no terminal: ``nohup``, a batch job, CI) a run logs
a progress line instead (:class:`ProgressLog`, logger ``graphexec``, INFO):
every ``GRAPHEXEC_PROGRESS_LOG`` seconds (30 by default; ``0`` or ``off``
turns it off) or each tenth of the nodes, whichever comes first. It exists
only when the logger would emit INFO: a program that never configured
logging pays nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from functools import cache
from typing import Any

from .._model.node import Node
from .._model.run import Run
from .._model.state import CACHED, CANCELLED, FAILED, SKIPPED, State
from .hooks import Observer

logger = logging.getLogger("graphexec")

MININTERVAL = 0.2  # seconds between two draws at most; tqdm skips the rest
IDLE_REDRAW = 1.0  # seconds without a draw after which the bar is redrawn anyway
LOG_INTERVAL = 30.0  # seconds between two progress lines of an unattended run, at most
LOG_INTERVAL_ENV = "GRAPHEXEC_PROGRESS_LOG"
LOG_STEPS = 10  # a line each tenth of the nodes, too

_FALSE = ("", "0", "false", "no", "off")


def in_notebook() -> bool:
    """True inside a Jupyter kernel: IPython's kernel, whose shell is a ZMQInteractiveShell.

    Nothing is imported: a process that never loaded ipykernel is no kernel.
    """
    if "ipykernel" not in sys.modules:
        return False
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    if get_ipython is None:
        return False
    try:
        shell = get_ipython()
    except Exception:
        return False
    return any(cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)


def wanted(progress: bool | None) -> bool:
    """Whether to show the bar: ``progress`` if given, else outside CI in a Jupyter
    kernel or when stderr is a terminal.

    Raises:
        TypeError: ``progress`` is neither a bool nor None.
    """
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress= must be True, False or None, got {progress!r}")
    if progress is not None:
        return progress
    if os.environ.get("CI", "").strip().lower() not in _FALSE:
        return False  # CI services set CI=true and often fake a terminal
    if in_notebook():
        return True  # a kernel's stderr is a pipe, yet the user watches the cell
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def make_observers(progress: bool | None, slots: int | None = None) -> list[Observer]:
    """graphexec's own observers for a run: the bar if one is wanted (see
    :func:`wanted`), else the log line if an unattended run wants one (see
    :func:`log_interval`); none at all otherwise. ``slots``: how many calls the
    run's executor runs at once at most (``Capabilities.slots``)."""
    if wanted(progress):
        return [Progress(slots=slots)]
    interval = log_interval()
    if progress is None and interval is not None:
        return [ProgressLog(interval, slots=slots)]
    return []


def running_count(handed: int, slots: int | None) -> int:
    """How many of the ``handed`` calls run now, at most: a busy worker may hold
    short calls queued behind the one it runs (prefetched), which the scheduler's
    observers see start when handed over; no more than ``slots`` run at once."""
    return handed if slots is None else min(handed, slots)


def log_interval() -> float | None:
    """Seconds between progress lines, or None when no line is wanted: logger
    ``graphexec`` does not emit INFO, or ``GRAPHEXEC_PROGRESS_LOG`` is ``0``/``off``."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    text = os.environ.get(LOG_INTERVAL_ENV, "").strip().lower()
    if not text:
        return LOG_INTERVAL
    if text in _FALSE:
        return None
    try:
        seconds = float(text)
    except ValueError:
        logger.warning(
            "%s=%r is not a number of seconds; using %g", LOG_INTERVAL_ENV, text, LOG_INTERVAL
        )
        return LOG_INTERVAL
    return seconds if seconds > 0 else None


@cache
def _bar_class() -> type:
    # tqdm is imported with the first bar: a compute without one does not pay for it.
    from tqdm import tqdm
    from tqdm.utils import _screen_shape_wrapper

    shape = _screen_shape_wrapper()

    def size(fp: Any) -> tuple[int, int]:
        # A pseudo-terminal nobody sized (script, some CI runners, docker exec)
        # reports 0 x 0, and tqdm would draw nothing at all: fall back to
        # $COLUMNS/$LINES, else 100 x 24.
        cols, rows = shape(fp) if shape is not None else (None, None)
        if not cols or cols <= 0 or not rows or rows <= 0:
            fallback = shutil.get_terminal_size((100, 24))
            cols = cols if cols and cols > 0 else fallback.columns
            rows = rows if rows and rows > 0 else fallback.lines
        return cols, rows

    class Bar(tqdm):
        """tqdm with the postfix computed when drawn, not on every update."""

        monitor_interval = 0  # our own redraw thread replaces tqdm's monitor

        def __init__(self, *args: Any, observer: Progress, **kwargs: Any) -> None:
            self._observer = observer
            cols, rows = size(kwargs["file"])
            super().__init__(*args, ncols=cols, nrows=rows, **kwargs)
            self.dynamic_ncols = size  # follow the window's size from now on

        @property
        def format_dict(self) -> dict[str, Any]:
            d = super().format_dict
            d["postfix"] = self._observer._postfix()
            return d

    return Bar


@cache
def _notebook_bar_class() -> type | None:
    """tqdm's notebook widget with the same postfix, or None without ipywidgets."""
    from tqdm import notebook

    if notebook.IProgress is None:  # tqdm.notebook imports without ipywidgets, then cannot draw
        return None

    class NotebookBar(notebook.tqdm):
        """The notebook widget, with the postfix computed when drawn."""

        monitor_interval = 0

        def __init__(self, *args: Any, observer: Progress, **kwargs: Any) -> None:
            self._observer = observer
            super().__init__(*args, **kwargs)

        @property
        def format_dict(self) -> dict[str, Any]:
            d = super().format_dict
            d["postfix"] = self._observer._postfix()
            return d

    return NotebookBar


def bar_class() -> type:
    """The bar to draw with here: the notebook widget in a Jupyter kernel that has
    ipywidgets, else the text bar."""
    if in_notebook():
        widget = _notebook_bar_class()
        if widget is not None:
            return widget
    return _bar_class()


class Progress(Observer):
    """Counts what the run reports and shows it as one tqdm bar on stderr.

    The bar reads ``done/total``, the rate, the ETA, and after it the nodes
    running now and, once non-zero, how many failed, were skipped, came from
    the cache, were cancelled or retried. For an eager flow the total grows
    as tasks are submitted.
    """

    _inline = True

    def __init__(self, file: Any = None, slots: int | None = None) -> None:
        self._file = file
        self._slots = slots
        self._run: Any = None
        self._bar: Any = None  # the tqdm bar, from on_start() to on_finish()
        self._running: set[int] = set()
        self._failed = 0
        self._skipped = 0
        self._cached = 0
        self._cancelled = 0
        self._retries = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- events (scheduler thread) ---------------------------------------------

    def on_start(self, run: Run) -> None:
        self._run = run
        total = len(run.members) or None  # a flow starts empty and grows
        self._bar = bar_class()(
            total=total,
            desc=run.graph.name,
            unit="task",
            file=self._file if self._file is not None else sys.stderr,
            mininterval=MININTERVAL,
            smoothing=0.1,
            leave=True,
            observer=self,
        )
        self._thread = threading.Thread(target=self._redraw, name="graphexec-progress", daemon=True)
        self._thread.start()

    def on_node_start(self, node: Node, attempt: int) -> None:
        self._running.add(node.index)

    def on_node_retry(self, node: Node, state: State) -> None:
        self._running.discard(node.index)
        self._retries += 1

    def on_node_finish(self, node: Node, state: State) -> None:
        self._running.discard(node.index)
        name = state.name
        if name is FAILED:
            self._failed += 1
        elif name is SKIPPED:
            self._skipped += 1
        elif name is CACHED:
            self._cached += 1
        elif name is CANCELLED:
            self._cancelled += 1
        bar = self._bar
        if bar is not None:
            members = len(self._run.members)
            if members != bar.total:
                bar.total = members
            bar.update(1)

    # -- end (the thread that called compute) --------------------------------

    def on_finish(self, run: Run) -> None:
        """Draw the final counts and release the terminal line; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        bar, self._bar = self._bar, None
        if bar is None:
            return
        bar.total = max(len(run.members), bar.n)
        bar.close()  # draws the final counts once more, then the newline

    # -- drawing ----------------------------------------------------------------

    def _postfix(self) -> str:
        parts = [f"running={running_count(len(self._running), self._slots)}"]
        for label, count in (
            ("failed", self._failed),
            ("skipped", self._skipped),
            ("cached", self._cached),
            ("cancelled", self._cancelled),
            ("retries", self._retries),
        ):
            if count:
                parts.append(f"{label}={count}")
        return " ".join(parts)

    def _redraw(self) -> None:
        while not self._stop.wait(IDLE_REDRAW):
            bar = self._bar
            if bar is None:
                return
            if bar._time() - bar.last_print_t >= IDLE_REDRAW:
                bar.refresh()


class ProgressLog(Observer):
    """A progress line on logger ``graphexec`` (INFO) for runs nobody watches on a terminal.

    One line every ``interval`` seconds (a small thread wakes up when nothing
    finishes for that long) or each time another tenth of the nodes is done,
    whichever comes first, and a last one at the end::

        sweep: 450/1000 done (45%), 3 failed, 2 running, 0:01:30 elapsed, ETA 0:01:50
    """

    _inline = True

    def __init__(self, interval: float = LOG_INTERVAL, slots: int | None = None) -> None:
        self.interval = interval
        self._slots = slots
        self._run: Any = None
        self._done = 0
        self._failed = 0
        self._running: set[int] = set()
        self._next_step = 0  # done count at which the next tenth is logged
        self._last = 0.0  # monotonic time of the last line
        self._logged = -1  # done count of the last line
        self._started = 0.0
        self._lock = threading.Lock()  # the timer thread and the scheduler both log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_start(self, run: Run) -> None:
        self._run = run
        self._started = self._last = time.monotonic()
        self._next_step = self._step()
        self._thread = threading.Thread(
            target=self._tick, name="graphexec-progress-log", daemon=True
        )
        self._thread.start()

    def on_node_start(self, node: Node, attempt: int) -> None:
        self._running.add(node.index)

    def on_node_retry(self, node: Node, state: State) -> None:
        self._running.discard(node.index)

    def on_node_finish(self, node: Node, state: State) -> None:
        self._running.discard(node.index)
        self._done += 1
        if state.name is FAILED:
            self._failed += 1
        if self._done >= self._next_step:
            self._next_step = self._done + self._step()
            self._log()

    def on_finish(self, run: Run) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._run is not None and self._logged != self._done:
            self._log()
        self._run = None

    def _step(self) -> int:
        return max(1, -(-len(self._run.members) // LOG_STEPS))

    def _tick(self) -> None:
        while not self._stop.wait(self.interval / 4):
            if time.monotonic() - self._last >= self.interval:
                self._log()

    def _log(self) -> None:
        with self._lock:
            run = self._run
            if run is None:
                return
            now = time.monotonic()
            self._last = now
            self._logged = self._done
            total = len(run.members)
            done = self._done
            elapsed = now - self._started
            eta = _clock(elapsed / done * (total - done)) if 0 < done < total else "-"
            percent = f" ({100 * done // total}%)" if total else ""
            logger.info(
                "%s: %d/%d done%s, %d failed, %d running, %s elapsed, ETA %s",
                run.graph.name,
                done,
                total,
                percent,
                self._failed,
                running_count(len(self._running), self._slots),
                _clock(elapsed),
                eta,
            )


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
