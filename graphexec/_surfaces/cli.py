"""The ``graphexec`` command: reports from saved runs, and the cache directory.

::

    graphexec report RUN [-o FILE] [--open]        Run.load / Run.from_json ─> run.to_html
    graphexec replay RUN NODE [--pdb] [--timeout S]  Run.load ─> run.replay(NODE)
    graphexec cache ls    [DIR] [-l]               per task: entries, size, ages
    graphexec cache info  [DIR]                    the totals
    graphexec cache prune [DIR] --older-than 7d | --expired
    graphexec cache clear [DIR] [--task NAME]
    graphexec doctor [--cache-dir DIR]             what graphexec will use here, advice

Exit codes: 0 done, 1 failed (the message says why and what to do), 2 the
command line was wrong (argparse's own code).

The cache commands read the store through its own listing
(``CacheStore.entries``: one row per entry in ``<dir>/cache.sqlite``, large
entries with a file, every checksum checked) and delete through
``CacheStore.remove``, which never deletes an entry that a live run holds: one
whose compute lock is held (a run is computing it) or whose file a running
process maps through a ``.hold-<pid>-<n>.hold`` link (a process alone in the
directory keeps its locks in memory: ``remove`` makes it yield them, waiting 2 s
at most, and keeps every entry if it does not; ``ls`` and ``info`` never ask,
and say so). Only the version of an
entry that was listed is deleted: one a run wrote since stays. Entries of the
older layout (a ``.gxc`` file each), which this version never reads, are
counted apart; ``clear`` and ``prune --expired`` delete them.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import reprlib
import sqlite3
import stat
import sys
import time
import traceback
import webbrowser
from collections.abc import Sequence
from pathlib import Path

from .._data import cache as cache_store
from .._model.node import Node
from .._model.run import Run
from .._model.sizes import size_text
from .._version import __version__
from . import doctor
from .record import is_record, load_run
from .replay import FunctionUnloadable, InputsUnloadable, kept_call

OK, ERROR = 0, 1  # (2: a command line argparse refuses, its own exit code)
# replay: the call was not made (no such node, its inputs not kept, its function not
# importable here): a script trying a fix tells this from "failed again" (1)
CANNOT_REPLAY = 3
BROKEN_PIPE = 128 + 13  # what a shell reports for a process SIGPIPE killed

_DESCRIPTION = """\
graphexec: run task graphs on every core. This command reads what runs left
behind: a saved run (to write its HTML report) and the result cache; and
says what graphexec will use on this machine (doctor).

exit codes: 0 done, 1 failed (the message says why and what to do),
2 wrong command line, 3 replay could not make the call, 141 the reader of
the output went away (`| head`: the output stops there, as any Unix tool's
killed by SIGPIPE).
"""

_DOCTOR_HELP = """\
Print what graphexec will use on this machine: the cores this process may use
(the default number of workers), threads per worker, memory and the cgroup's
limit, /dev/shm, the cache directory's filesystem; then a line of advice for
each limit a long run should know first. It starts no worker and writes
nothing.
"""

_REPORT_HELP = """\
Write the HTML report of a saved run: summary table, per-worker timeline,
failures with their tracebacks. RUN is a run saved with run.save(PATH), the
directory of compute(run_dir=DIR), or the JSON text that run.to_json() wrote.
Nothing in RUN is unpickled.
"""

_REPLAY_HELP = """\
Run a failed node of a saved run again, in this process, on the exact inputs
it received (run.replay): breakpoint() and pdb work. RUN is a run saved with
run.save(PATH) or the directory of compute(run_dir=DIR); NODE is the node's
name as the report and run.summary() show it. A node that crashed its worker
is first replayed in a fresh subprocess. Exit code 0 if the call returns this
time, 1 if it fails again (its traceback is printed), 3 if it could not be
made (no such node, its inputs were not kept, its function or inputs do not
load here), 2 for a wrong command line.

Security: this unpickles the node's function and inputs from RUN, which can
run any code: replay only runs you trust.
"""

_CACHE_HELP = """\
Look at and clean a result cache directory (compute(cache_dir=...); default
./.graphexec-cache). prune and clear never delete an entry that a running
computation holds: it is reported as kept.
"""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CommandError(Exception):
    """A failure the user can fix: printed as ``graphexec: error: ...``, exit code
    ``code`` (1, :data:`ERROR`, unless said otherwise)."""

    def __init__(self, message: str, code: int = ERROR) -> None:
        super().__init__(message)
        self.code = code


# -- the command line ------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``graphexec`` command."""
    top = argparse.ArgumentParser(
        prog="graphexec",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"graphexec {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    report = commands.add_parser(
        "report",
        help="write the HTML report of a saved run (run.save(), a run_dir, run.to_json())",
        description=_REPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "run",
        metavar="RUN",
        type=Path,
        help="the saved run: run.save()'s file, the run_dir of a compute, or run.to_json()'s text",
    )
    report.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        type=Path,
        help="where to write the report (default: RUN with the suffix .html)",
    )
    report.add_argument("--open", action="store_true", help="open the report in a browser")
    report.set_defaults(handler=_report)

    replay = commands.add_parser(
        "replay",
        help="run a failed node of a saved run again, here, on its exact inputs",
        description=_REPLAY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("run", metavar="RUN", type=Path, help="run.save()'s file, or a run_dir")
    replay.add_argument(
        "node", metavar="NODE", help="the failed node's name, or #k for run.nodes[k]"
    )
    replay.add_argument(
        "--pdb", action="store_true", help="start post-mortem debugging where it raises"
    )
    replay.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        help="stop the replay after S seconds (none by default)",
    )
    replay.set_defaults(handler=_replay)

    cache = commands.add_parser(
        "cache",
        help="list, measure, prune or clear a result cache directory",
        description=_CACHE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True)

    def with_dir(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "dir",
            metavar="DIR",
            nargs="?",
            type=Path,
            default=Path(cache_store.DEFAULT_DIR),
            help=f"the cache directory (default: ./{cache_store.DEFAULT_DIR})",
        )
        return sub

    ls = with_dir(actions.add_parser("ls", help="entries per task: count, size, ages, expired"))
    ls.add_argument("-l", "--long", action="store_true", help="one line per entry")
    ls.set_defaults(handler=_cache_ls)
    with_dir(actions.add_parser("info", help="totals: entries, size, tasks")).set_defaults(
        handler=_cache_info
    )
    prune = with_dir(
        actions.add_parser(
            "prune",
            help="delete old or expired entries",
            description="Delete the entries older than AGE, the expired ones (and the "
            "unreadable ones), or both. Entries a running computation holds are kept.",
        )
    )
    prune.add_argument(
        "--older-than",
        metavar="AGE",
        type=age,
        help="entries written more than AGE ago: a number and a unit s, m, h, d or w (7d)",
    )
    prune.add_argument(
        "--expired",
        action="store_true",
        help="entries past their cache_expiration, and unreadable ones",
    )
    prune.set_defaults(handler=_cache_prune, parser=prune)
    clear = with_dir(
        actions.add_parser(
            "clear",
            help="delete every entry (or one task's)",
            description="Delete every entry, or those of one task. Entries a running "
            "computation holds are kept.",
        )
    )
    clear.add_argument("--task", metavar="NAME", help="only the entries of this task")
    clear.set_defaults(handler=_cache_clear)

    check = commands.add_parser(
        "doctor",
        help="what graphexec will use here (cores, memory, /dev/shm, cache) and what to fix",
        description=_DOCTOR_HELP,
    )
    check.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=Path,
        default=Path(cache_store.DEFAULT_DIR),
        help=f"the cache directory to look at (default: ./{cache_store.DEFAULT_DIR})",
    )
    check.set_defaults(handler=lambda args: doctor.main(args.cache_dir))
    return top


def age(text: str) -> float:
    """Seconds in an age such as ``90s``, ``15m``, ``12h``, ``7d``, ``2w``.

    Raises:
        argparse.ArgumentTypeError: not a number followed by one of those units.
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if found is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age: write a number and a unit s, m, h, d or w, e.g. 7d"
        )
    return float(found.group(1)) * _UNITS[found.group(2)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``graphexec`` command; returns its exit code (0 done, 1 failed, 2 usage,
    141 the reader of its output went away: then this process's stdout is pointed at
    /dev/null, so that nothing more is written into the closed pipe).

    Args:
        argv: the arguments, without the program name (default ``sys.argv[1:]``).
    """
    args = parser().parse_args(argv)  # exits with 2 on a usage error
    try:
        try:
            args.handler(args)
        except cache_store.CacheDamaged as exc:
            raise CommandError(str(exc)) from None
        except sqlite3.DatabaseError as exc:  # it opened, but its pages are damaged
            raise CommandError(cache_store.damage_text(getattr(args, "dir", "?"), exc)) from None
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # a read-only filesystem, a directory not ours
            raise CommandError(
                f"{exc.filename or getattr(args, 'dir', '?')}: {exc.strerror}; this command "
                "opens the cache's database and lock file for writing"
            ) from None
    except CommandError as exc:
        print(f"graphexec: error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # `graphexec cache ls -l | head`: the reader went away. Stop quietly, and keep
        # the interpreter's last flush of stdout from failing (and saying so) too.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError):
            pass
        return BROKEN_PIPE
    return OK


# -- report ------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> None:
    source: Path = args.run
    if source.is_dir() and not is_record(source):
        raise CommandError(
            f"{source} is a directory that holds no saved run. Give the run_dir of a "
            "compute (compute(run_dir=DIR)), or the file run.save() or run.to_json() wrote"
        )
    try:
        text = b"" if source.is_dir() else source.read_bytes()
    except OSError as exc:
        raise CommandError(
            f"cannot read {source}: {exc.strerror or exc}. Give the file run.save() or "
            "run.to_json() wrote, or the run_dir of the compute"
        ) from None
    try:
        run = load_run(source) if is_record(source) else Run.from_json(text)
    except ValueError as exc:
        raise CommandError(
            f"{source} is not a saved graphexec run ({exc}). Save one with "
            'run.save("night.gxrun"), or Path("run.json").write_text(run.to_json())'
        ) from None
    if args.output is not None:
        target: Path = args.output
    else:  # beside the file or directory (resolved: "." or ".." has no name of its own)
        named = source if source.name not in ("", "..") else source.resolve()
        if not named.name:
            raise CommandError(f"{source} has no name to write its report beside: give -o FILE")
        target = named.with_suffix(".html")
    try:
        written = run.to_html(target)
    except OSError as exc:
        raise CommandError(
            f"cannot write {target}: {exc.strerror or exc}. Choose another place with -o FILE"
        ) from None
    print(f"wrote {written} ({len(run.members):,} nodes, {run._status()})")
    if args.open:
        url = written.resolve().as_uri()
        if not webbrowser.open(url):
            print(f"no browser could be started here: open {url} yourself")


# -- replay ------------------------------------------------------------------------


def _replay(args: argparse.Namespace) -> None:
    try:
        run, node = _replayable(args)
    except CommandError as exc:
        raise CommandError(str(exc), CANNOT_REPLAY) from None
    print(f"replaying {args.node} from {args.run}", file=sys.stderr, flush=True)
    try:
        value = run.replay(node, pdb=args.pdb, timeout=args.timeout)
    except KeyboardInterrupt:
        raise
    except (InputsUnloadable, FunctionUnloadable) as exc:  # the call was not made: not
        raise CommandError(str(exc), CANNOT_REPLAY) from None  # "failed again"
    except BaseException:
        traceback.print_exc()
        raise CommandError(f"{args.node} failed again (its traceback is above)") from None
    print(f"{args.node} returned {reprlib.repr(value)}: it did not fail this time")


def _replayable(args: argparse.Namespace) -> tuple[Run, Node]:
    """The run and the node ``replay`` names, with a call kept to make again."""
    source: Path = args.run
    try:
        run = load_run(source)
    except OSError as exc:
        what = exc.filename or source  # (a run_dir's record file, when it is missing)
        raise CommandError(
            f"cannot read {what}: {exc.strerror or exc}. Give the file run.save() wrote, "
            "or the run_dir of the compute"
        ) from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    node = _pick_node(run, args.node, source)
    # The run's workers imported the task's module from the working directory, as
    # `python -m graphexec` does (its sys.path starts there); the `graphexec`
    # script's starts at its own bin/ directory instead.
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)
    try:
        kept_call(run, node.index)
    except (ValueError, LookupError) as exc:
        raise CommandError(str(exc)) from None
    return run, node


def _seconds(text: str) -> float:
    """``--timeout``'s value: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _pick_node(run: Run, given: str, source: Path) -> Node:
    """The node ``given`` names: its name, or ``#k`` for ``run.nodes[k]`` (what tells
    apart nodes that share a name, as ``replay_hint`` writes it)."""
    try:
        return run.graph._nodes[run._lookup(given)]
    except KeyError as exc:
        why = str(exc.args[0]) if exc.args else ""
    position = re.fullmatch(r"#(\d+)", given)
    if position is not None and int(position.group(1)) < len(run.members):
        return run.nodes[int(position.group(1))]
    if given in run:  # several nodes have that name: _lookup's message lists them
        raise CommandError(f"{why}; on the command line, give '#k' for run.nodes[k]")
    failed = ", ".join(n.name for n in run.failed[:10]) or "none"
    raise CommandError(f"no node named {given!r} in {source}; failed nodes: {failed}")


# -- cache -------------------------------------------------------------------------


Entry = cache_store.EntryInfo


def read_entries(root: Path) -> list[Entry]:
    """Every entry of the cache directory ``root`` (read-only but for committing this
    process's own batch, which it has none of).

    Raises:
        CommandError: ``root`` is not a directory.
    """
    if not root.is_dir():
        raise CommandError(
            f"{root} is not a cache directory (nothing there). Give the directory that "
            f"compute(cache_dir=...) used, or run from where ./{cache_store.DEFAULT_DIR} is"
        )
    if not cache_store.is_cache_dir(root):
        if any(root.iterdir()):  # a run_dir, a project, /usr: never walked as a cache
            raise CommandError(
                f"{root} is not a graphexec cache directory (no {cache_store.DB_NAME}, no "
                "entries of an older graphexec). Give the directory that "
                "compute(cache_dir=...) used"
            )
        return []  # an empty directory: no cache yet
    if not (root / cache_store.DB_NAME).exists():
        return []  # only an older graphexec's entries (_say_old says so)
    return cache_store.CacheStore(root).entries()


def _old_entries(root: Path) -> list[Path]:
    """Entries of the older layout, never read by this version."""
    return [p for p in cache_store.old_layout_files(root) if p.suffix == cache_store.OLD_SUFFIX]


def _say_old(root: Path) -> None:
    old = _old_entries(root)
    if old:
        print(
            f"note: {len(old):,} entries in {root} were written by an older graphexec "
            f"(one {cache_store.OLD_SUFFIX} file each) and are never read; "
            f"`graphexec cache clear {root}` deletes them",
            file=sys.stderr,
        )


def _say_alone(root: Path) -> None:
    """Say that "held" leaves out what a process alone in ``root`` computes: it keeps
    those locks in memory, and asking would make it yield them (slow it down)."""
    if not (root / cache_store.DB_NAME).exists():
        return
    pid = cache_store.CacheStore(root).alone_elsewhere()
    if pid is not None:
        who = "another process" if pid < 0 else f"process {pid}"
        print(
            f"note: {who} is running alone in {root}: the entries it is computing now "
            "are not counted as held (asking would slow it down)",
            file=sys.stderr,
        )


def _remove(root: Path, chosen: list[Entry], old: bool) -> tuple[int, int, int]:
    """Delete the chosen entries (and the older layout's, if ``old``); (deleted, bytes
    freed, kept because held).

    Raises:
        CommandError: ``root`` holds no cache (nothing there is deleted).
    """
    if not cache_store.is_cache_dir(root):
        raise CommandError(
            f"{root} is not a graphexec cache directory (no {cache_store.DB_NAME}, no entries "
            "of an older graphexec): nothing deleted. Give the directory that "
            "compute(cache_dir=...) used"
        )
    return cache_store.prune(root, chosen, old=old)


def _say_removed(deleted: int, freed: int, kept: int) -> None:
    line = f"deleted {deleted:,} entr{'y' if deleted == 1 else 'ies'} ({size_text(freed)})"
    if kept:
        line += f"; kept {kept:,} held by a running computation"
    print(line)


def _cache_ls(args: argparse.Namespace) -> None:
    entries = read_entries(args.dir)
    _say_old(args.dir)
    _say_alone(args.dir)
    now = time.time()
    if not entries:
        print(f"{args.dir}: no entries")
        return
    if args.long:
        rows = [["task", "key", "size", "age", "expires", "state"]]
        for e in sorted(entries, key=lambda e: (e.task, -e.created)):
            state = "unreadable" if not e.readable else "held" if e.held else ""
            if e.readable and e.expired(now):
                state = "expired"
            rows.append(
                [
                    e.task,
                    e.key[:16],
                    size_text(e.size),
                    _age(now - e.created),
                    "never" if e.expires is None else _when(e.expires - now),
                    state,
                ]
            )
        _table(rows)
        return
    by_task: dict[str, list[Entry]] = {}
    for e in entries:
        by_task.setdefault(e.task, []).append(e)
    rows = [["task", "entries", "size", "newest", "oldest", "expired", "held"]]
    for task in sorted(by_task, key=lambda t: -sum(e.size for e in by_task[t])):
        group = by_task[task]
        rows.append(
            [
                task,
                f"{len(group):,}",
                size_text(sum(e.size for e in group)),
                _age(now - max(e.created for e in group)),
                _age(now - min(e.created for e in group)),
                f"{sum(e.expired(now) for e in group):,}",
                f"{sum(e.held for e in group):,}",
            ]
        )
    _table(rows)


def _cache_info(args: argparse.Namespace) -> None:
    entries = read_entries(args.dir)
    _say_old(args.dir)
    _say_alone(args.dir)
    now = time.time()
    print(f"directory   {args.dir.resolve()}")
    print(f"entries     {len(entries):,}")
    print(f"size        {size_text(sum(e.size for e in entries))}")
    print(f"on disk     {size_text(_disk_usage(args.dir))}")
    print(f"tasks       {len({e.task for e in entries if e.readable}):,}")
    print(f"expired     {sum(e.expired(now) for e in entries):,}")
    print(f"held        {sum(e.held for e in entries):,}")
    if entries:
        print(f"newest      {_age(now - max(e.created for e in entries))} old")
        print(f"oldest      {_age(now - min(e.created for e in entries))} old")


def _cache_prune(args: argparse.Namespace) -> None:
    if args.older_than is None and not args.expired:
        args.parser.error(  # a usage error: exits with 2
            "say what to prune: --older-than AGE (e.g. 7d), --expired, or both "
            "(graphexec cache clear deletes every entry)"
        )
    entries = read_entries(args.dir)
    now = time.time()
    chosen = [
        e
        for e in entries
        if (args.expired and e.expired(now))
        or (args.older_than is not None and now - e.created > args.older_than)
    ]
    _say_removed(*_remove(args.dir, chosen, old=args.expired))


def _disk_usage(root: Path) -> int:
    """Bytes of every file under the cache directory ``root``: the database, its WAL,
    entries' files; a file with several links there (an entry a hit holds) once."""
    total, seen = 0, set()
    for path in root.rglob("*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _cache_clear(args: argparse.Namespace) -> None:
    entries = read_entries(args.dir)
    if args.task is not None:
        tasks = {e.task for e in entries}
        if args.task not in tasks:
            known = ", ".join(sorted(tasks)) or "none"
            raise CommandError(
                f"no entries of task {args.task!r} in {args.dir} (tasks there: {known}); "
                "graphexec cache ls lists them"
            )
        entries = [e for e in entries if e.task == args.task]
    _say_removed(*_remove(args.dir, entries, old=args.task is None))


# -- formatting ----------------------------------------------------------------------


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))
            ).rstrip()
        )


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _when(seconds: float) -> str:
    return f"in {_age(seconds)}" if seconds > 0 else f"{_age(-seconds)} ago"
