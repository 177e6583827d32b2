"""The ``graphexec`` command: reports from saved runs, and the cache directory.

::

    graphexec report RUN.json [-o FILE] [--open]   Run.from_json ─> run.to_html
    graphexec cache ls    [DIR] [-l]               per task: entries, size, ages
    graphexec cache info  [DIR]                    the totals
    graphexec cache prune [DIR] --older-than 7d | --expired
    graphexec cache clear [DIR] [--task NAME]

Exit codes: 0 done, 1 failed (the message says why and what to do), 2 the
command line was wrong (argparse's own code).

The cache commands read the store's layout (``_data/cache.py``: one
``<key>.gxc`` file per entry under ``<dir>/<key[:2]>/``, a JSON header with
the task's name, creation and expiry times) through the cache module's own
header parser, and never delete an entry that a live run holds: one whose
``<key>.lock`` is locked (a run is computing it) or that a running process
has mapped through a ``.hold-<pid>-<n>.hold`` link. An entry is deleted while
the CLI holds its lock, as ``clear_cache`` does, so a run that starts
computing it meanwhile waits for the deletion and then writes a fresh one.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import struct
import sys
import time
import webbrowser
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from .._data import cache as cache_store
from .._model.run import Run
from .._version import __version__

OK, ERROR, USAGE = 0, 1, 2

_DESCRIPTION = """\
graphexec: run task graphs on every core. This command reads what runs left
behind: a saved run (to write its HTML report) and the result cache.

exit codes: 0 done, 1 failed (the message says why and what to do),
2 wrong command line.
"""

_REPORT_HELP = """\
Write the HTML report of a saved run: summary table, per-worker timeline,
failures with their tracebacks. RUN is the JSON text that run.to_json() wrote,
e.g. Path("run.json").write_text(run.to_json()) after graph.compute().
"""

_CACHE_HELP = """\
Look at and clean a result cache directory (compute(cache_dir=...); default
./.graphexec-cache). prune and clear never delete an entry that a running
computation holds: it is reported as kept.
"""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CommandError(Exception):
    """A failure the user can fix: printed as ``graphexec: error: ...``, exit code 1."""


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
        help="write the HTML report of a run saved with run.to_json()",
        description=_REPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run", metavar="RUN", type=Path, help="the saved run (run.to_json())")
    report.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        type=Path,
        help="where to write the report (default: RUN with the suffix .html)",
    )
    report.add_argument("--open", action="store_true", help="open the report in a browser")
    report.set_defaults(handler=_report)

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
    """Run the ``graphexec`` command; returns its exit code (0 done, 1 failed, 2 usage).

    Args:
        argv: the arguments, without the program name (default ``sys.argv[1:]``).
    """
    args = parser().parse_args(argv)  # exits with 2 on a usage error
    try:
        args.handler(args)
    except CommandError as exc:
        print(f"graphexec: error: {exc}", file=sys.stderr)
        return ERROR
    return OK


# -- report ------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> None:
    source: Path = args.run
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise CommandError(
            f"cannot read {source}: {exc.strerror or exc}. Give the file that "
            "run.to_json() was written to"
        ) from None
    try:
        run = Run.from_json(text)
    except ValueError as exc:
        raise CommandError(
            f"{source} is not a saved graphexec run ({exc}). Save one with "
            'Path("run.json").write_text(run.to_json())'
        ) from None
    target: Path = args.output if args.output is not None else source.with_suffix(".html")
    try:
        written = run.to_html(target)
    except OSError as exc:
        raise CommandError(
            f"cannot write {target}: {exc.strerror or exc}. Choose another place with -o FILE"
        ) from None
    print(f"wrote {written} ({len(run.members):,} nodes, {_status(run)})")
    if args.open:
        url = written.resolve().as_uri()
        if not webbrowser.open(url):
            print(f"no browser could be started here: open {url} yourself")


def _status(run: Run) -> str:
    unhandled = len(run.unhandled)
    return f"{unhandled} unhandled failure(s)" if unhandled else "ok"


# -- cache -------------------------------------------------------------------------


@dataclass
class Entry:
    """One cache entry as listed: where, whose, how large, how old, and whether held."""

    path: Path
    task: str  # "?" when the header cannot be read
    size: int
    created: float
    expires: float | None
    readable: bool
    held: bool

    def expired(self, now: float) -> bool:
        """Past its expiry, or unreadable (the cache would delete it at its next lookup)."""
        return not self.readable or (self.expires is not None and self.expires <= now)


def read_entries(root: Path) -> list[Entry]:
    """Every entry of the cache directory ``root``, read-only.

    Raises:
        CommandError: ``root`` is not a directory.
    """
    if not root.is_dir():
        raise CommandError(
            f"{root} is not a cache directory (nothing there). Give the directory that "
            f"compute(cache_dir=...) used, or run from where ./{cache_store.DEFAULT_DIR} is"
        )
    mapped = _mapped_inodes(root)
    entries = []
    for path in sorted(root.glob("*/[!.]*.gxc")):  # entries, not .tmp- or .hold- files
        try:
            st = path.stat()
        except OSError:
            continue  # deleted while we looked
        task, created, expires, readable = "?", st.st_mtime, None, True
        try:
            header = _header(path)
            task = str(header.get("task", "?"))
            created = float(header.get("created", st.st_mtime))
            expires = header.get("expires")
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            readable = False
        held = (st.st_dev, st.st_ino) in mapped or _lock_held(path.with_suffix(".lock"))
        entries.append(Entry(path, task, st.st_size, created, expires, readable, held))
    return entries


def _header(path: Path) -> dict:
    # The store's own parser (it checks the header's crc32), on the header bytes only.
    with open(path, "rb") as f:
        head = f.read(cache_store.HEAD)
        (length,) = struct.unpack("<I", head[4:8])
        header, _ = cache_store._parse(head + f.read(length))
    return header


def _mapped_inodes(root: Path) -> set[tuple[int, int]]:
    """Entries that a live process maps: the files its ``.hold-<pid>-<n>.hold`` links name."""
    found = set()
    for hold in root.glob("*/.hold-*"):
        try:
            pid = int(hold.name.split("-")[1])
            st = hold.stat()
        except (IndexError, ValueError, OSError):
            continue
        if psutil.pid_exists(pid):
            found.add((st.st_dev, st.st_ino))
    return found


def _lock_held(lock: Path) -> bool:
    """True if a run holds the entry's compute lock right now."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False  # no lock file: nobody computes it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases our lock if we took it
    return False


def remove_entry(entry: Entry, mapped: set[tuple[int, int]]) -> bool:
    """Delete ``entry`` and its lock file unless a live run holds it; True if deleted.

    The entry's lock is taken first and kept while deleting, so no run is
    computing it meanwhile; a run that opened the lock file a moment ago finds,
    once it gets the lock, that the path names another file and locks that one
    (the store's own protocol, see ``CacheStore.try_lock``).
    """
    lock = entry.path.with_suffix(".lock")
    try:
        fd: int | None = os.open(lock, os.O_RDWR)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False  # a run is computing this entry
    try:
        try:
            st = entry.path.stat()
        except OSError:
            return False  # already gone
        if (st.st_dev, st.st_ino) in mapped:
            return False  # a running process has its buffers mapped
        entry.path.unlink()
        if fd is not None and _same_file(fd, lock):
            lock.unlink()
        return True
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _remove(root: Path, chosen: Iterable[Entry]) -> tuple[int, int, int]:
    """Delete the chosen entries; (deleted, bytes freed, kept because held)."""
    mapped = _mapped_inodes(root)
    deleted = freed = kept = 0
    for entry in chosen:
        if remove_entry(entry, mapped):
            deleted += 1
            freed += entry.size
        elif entry.path.exists():
            kept += 1
    return deleted, freed, kept


def _say_removed(deleted: int, freed: int, kept: int) -> None:
    line = f"deleted {deleted:,} entr{'y' if deleted == 1 else 'ies'} ({_size(freed)})"
    if kept:
        line += f"; kept {kept:,} held by a running computation"
    print(line)


def _cache_ls(args: argparse.Namespace) -> None:
    entries = read_entries(args.dir)
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
                    e.path.stem[:16],
                    _size(e.size),
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
                _size(sum(e.size for e in group)),
                _age(now - max(e.created for e in group)),
                _age(now - min(e.created for e in group)),
                f"{sum(e.expired(now) for e in group):,}",
                f"{sum(e.held for e in group):,}",
            ]
        )
    _table(rows)


def _cache_info(args: argparse.Namespace) -> None:
    entries = read_entries(args.dir)
    now = time.time()
    print(f"directory   {args.dir.resolve()}")
    print(f"entries     {len(entries):,}")
    print(f"size        {_size(sum(e.size for e in entries))}")
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
    _say_removed(*_remove(args.dir, chosen))


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
    _say_removed(*_remove(args.dir, entries))


# -- formatting ----------------------------------------------------------------------


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))
            ).rstrip()
        )


def _size(n: float) -> str:
    value, unit, larger = float(n), "B", ["kB", "MB", "GB", "TB"]
    while value >= 1000 and larger:
        value, unit = value / 1000, larger.pop(0)
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


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
