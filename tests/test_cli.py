"""The ``graphexec`` command, run as users run it: a subprocess, exit codes and output.

Each command is checked for what it prints and its exit code (0 done, 1 failed,
2 usage), and ``prune``/``clear`` for what they leave on disk, including
entries that a live run holds (its compute lock, or its buffers mapped).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import reap

import graphexec as gx
from graphexec._data import cache as cache_store
from graphexec._surfaces.cli import _disk_usage
from graphexec._surfaces.cli import main as cli_main

WORKTREE = Path(__file__).resolve().parents[1]
DAY = 86400.0


def graphexec(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m graphexec ARGS`` with this checkout on the path."""
    full_env = dict(os.environ, PYTHONPATH=str(WORKTREE), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "graphexec", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=60,
    )


@gx.task(cache=True)
def square(x):
    return x * x


@gx.task(cache=True, cache_expiration=0.001)
def fleeting(x):
    return x + 1


@gx.task(cache=True)
def big(n):
    return np.arange(n, dtype=np.float64)  # large enough for its buffer to be mapped


@gx.task
def broken(x):
    raise ValueError(f"bad <input> {x}")


def entries(cache: Path) -> dict[str, str]:
    """Entry key -> task name, read from the store's database directly."""
    db = cache / cache_store.DB_NAME
    if not db.exists():
        return {}
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT key, task FROM entries").fetchall())
    finally:
        conn.close()


def fill(cache: Path, monkeypatch: pytest.MonkeyPatch, *, old: int = 0) -> None:
    """Three fresh ``square`` entries, two expired ``fleeting`` ones, ``old`` ten-day-old
    ``square`` entries (written with the store's clock moved back)."""
    graph = gx.Graph()
    with graph:
        for i in range(3):
            square(i)
        for i in range(2):
            fleeting(i)
    graph.compute(scheduler="sync", cache_dir=cache)
    if old:
        monkeypatch.setattr(cache_store, "clock", lambda: time.time() - 10 * DAY)
        graph = gx.Graph()
        with graph:
            for i in range(100, 100 + old):
                square(i)
        graph.compute(scheduler="sync", cache_dir=cache)
        monkeypatch.undo()
    time.sleep(0.01)  # fleeting's entries are past their expiry


# -- help and usage -------------------------------------------------------------


def test_help_names_commands_and_exit_codes(tmp_path):
    out = graphexec("--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "report" in out.stdout and "cache" in out.stdout
    assert "exit codes: 0 done, 1 failed" in out.stdout
    report = graphexec("report", "--help", cwd=tmp_path)
    assert report.returncode == 0
    assert "run.to_json()" in report.stdout  # says which format it reads
    prune = graphexec("cache", "prune", "--help", cwd=tmp_path)
    assert "--older-than AGE" in prune.stdout and "--expired" in prune.stdout


def test_console_script_is_declared():
    text = (WORKTREE / "pyproject.toml").read_text()
    assert 'graphexec = "graphexec._surfaces.cli:main"' in text


@pytest.mark.parametrize(
    "args",
    [
        [],  # no command
        ["frobnicate"],
        ["cache"],  # no action
        ["cache", "prune"],  # nothing said about what to prune
        ["cache", "prune", "--older-than", "7 parsecs"],
    ],
)
def test_usage_errors_exit_2(tmp_path, args):
    out = graphexec(*args, cwd=tmp_path)
    assert out.returncode == 2, out
    assert "usage: graphexec" in out.stderr


def test_prune_without_a_criterion_says_what_to_give(tmp_path):
    out = graphexec("cache", "prune", cwd=tmp_path)
    assert "--older-than AGE (e.g. 7d), --expired, or both" in out.stderr


def test_age_units():
    from graphexec._surfaces.cli import age

    assert age("90s") == 90
    assert age("15m") == 900
    assert age("7d") == 7 * DAY
    assert age("2w") == 14 * DAY
    assert age("1.5h") == 5400


# -- report -----------------------------------------------------------------------


def test_report_writes_the_html_of_a_saved_run(tmp_path):
    graph = gx.Graph("saved")
    with graph:
        ok = square.with_options(cache=False)(3)
        broken(ok)
    run = graph.compute(scheduler="sync", raise_on_failure=False)
    (tmp_path / "run.json").write_text(run.to_json())

    out = graphexec("report", "run.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "run.html").read_text()  # default: RUN with the suffix .html
    assert "saved — graphexec run report" in page
    assert "bad &lt;input&gt; 9" in page
    assert "wrote run.html (2 nodes, 1 unhandled failure(s))" in out.stdout

    out = graphexec("report", "run.json", "-o", "elsewhere/r.html", cwd=tmp_path)
    assert out.returncode == 1  # the folder does not exist
    assert "cannot write elsewhere/r.html" in out.stderr and "-o FILE" in out.stderr
    (tmp_path / "elsewhere").mkdir()
    out = graphexec("report", "run.json", "-o", "elsewhere/r.html", cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "elsewhere" / "r.html").is_file()


def test_report_open_starts_the_browser(tmp_path):
    run = gx.Graph("opened")
    with run:
        square.with_options(cache=False)(2)
    (tmp_path / "run.json").write_text(run.compute(scheduler="sync").to_json())
    opener = tmp_path / "browser.sh"
    opener.write_text(f'#!/bin/sh\necho "$1" > {tmp_path / "opened.txt"}\n')
    opener.chmod(opener.stat().st_mode | stat.S_IEXEC)
    out = graphexec("report", "run.json", "--open", cwd=tmp_path, env={"BROWSER": str(opener)})
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 10
    while not (tmp_path / "opened.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "opened.txt").read_text().strip() == (tmp_path / "run.html").as_uri()


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "cannot read run.json: No such file or directory"),
        ("{}", "run.json is not a saved graphexec run"),
        ("not json at all", "run.json is not a saved graphexec run"),
        ("a directory", "run.json is a directory that holds no saved run"),
    ],
)
def test_report_errors_exit_1_and_say_what_to_do(tmp_path, content, said):
    if content == "a directory":
        (tmp_path / "run.json").mkdir()
    elif content is not None:
        (tmp_path / "run.json").write_text(content)
    out = graphexec("report", "run.json", cwd=tmp_path)
    assert out.returncode == 1
    assert said in out.stderr
    assert "run.to_json()" in out.stderr  # how to make the file it wants
    assert "Traceback" not in out.stderr


# -- cache ls / info ------------------------------------------------------------


def test_cache_ls_lists_entries_per_task(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    fill(cache, monkeypatch, old=2)
    out = graphexec("cache", "ls", str(cache), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["task", "entries", "size", "newest", "oldest", "expired", "held"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["square"][1] == "5" and rows["fleeting"][1] == "2"
    assert rows["square"][-4:-2] == ["10.0", "d"]  # its oldest entry is ten days old
    assert rows["fleeting"][-2:] == ["2", "0"]  # both expired, none held

    long = graphexec("cache", "ls", "-l", str(cache), cwd=tmp_path)
    assert long.returncode == 0
    assert (
        sum(line.startswith("fleeting") and "expired" in line for line in long.stdout.splitlines())
        == 2
    )
    assert len(long.stdout.splitlines()) == 1 + 7


def test_cache_ls_default_directory_and_missing_directory(tmp_path, monkeypatch):
    fill(tmp_path / cache_store.DEFAULT_DIR, monkeypatch)
    out = graphexec("cache", "ls", cwd=tmp_path)
    assert out.returncode == 0 and "square" in out.stdout
    missing = graphexec("cache", "ls", "nowhere", cwd=tmp_path)
    assert missing.returncode == 1
    assert "nowhere is not a cache directory" in missing.stderr
    assert "compute(cache_dir=...)" in missing.stderr


def test_cache_ls_and_info_refuse_a_directory_that_is_no_cache(tmp_path):
    # A run_dir, a project, /usr: not listed as an empty cache, nor walked whole by
    # info (which summed every file under it as the cache's size on disk).
    other = tmp_path / "project"
    (other / "src").mkdir(parents=True)
    (other / "src" / "main.py").write_text("print('hi')\n")
    for action in ("ls", "info"):
        out = graphexec("cache", action, str(other), cwd=tmp_path)
        assert out.returncode == 1, out.stdout
        assert "project is not a graphexec cache directory" in out.stderr
        assert "compute(cache_dir=...)" in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = graphexec("cache", "ls", str(empty), cwd=tmp_path)
    assert out.returncode == 0 and "no entries" in out.stdout


def test_cache_ls_into_a_pipe_closed_early_stops_quietly(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    graph = gx.Graph()
    with graph:
        for i in range(3000):
            square(i)
    graph.compute(scheduler="sync", cache_dir=cache)
    proc = subprocess.Popen(
        [sys.executable, "-m", "graphexec", "cache", "ls", "-l", str(cache)],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(WORKTREE)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    reap(proc)
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_cache_info_counts_a_held_entrys_second_link_once(tmp_path):
    (tmp_path / "ab").mkdir()
    entry = tmp_path / "ab" / "abcdef12.gxb"
    entry.write_bytes(b"x" * 10_000)
    os.link(entry, tmp_path / "ab" / ".hold-abcdef12")  # what a hit holds while it reads
    (tmp_path / "cache.sqlite").write_bytes(b"y" * 100)
    assert _disk_usage(tmp_path) == 10_100


def test_cache_info_totals(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    fill(cache, monkeypatch)
    out = graphexec("cache", "info", str(cache), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    info = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines()}
    assert info["entries"] == "5"
    assert info["tasks"] == "2"
    assert info["expired"] == "2"
    assert info["held"] == "0"
    assert info["directory"] == str(cache.resolve())
    conn = sqlite3.connect(cache / cache_store.DB_NAME)
    (total,) = conn.execute("SELECT sum(length(data)) FROM entries").fetchone()
    conn.close()
    assert info["size"] == f"{total} B"  # the values' bytes (five small pickles)
    on_disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert info["on"] == f"disk     {on_disk / 1000:.1f} kB"


def test_cache_ls_reports_an_unreadable_entry(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    fill(cache, monkeypatch)
    conn = sqlite3.connect(cache / cache_store.DB_NAME)
    with conn:  # a damaged value: its checksum no longer holds
        conn.execute("UPDATE entries SET data = X'00' WHERE task = 'square' AND key = "
                     "(SELECT min(key) FROM entries WHERE task = 'square')")  # fmt: skip
    conn.close()
    out = graphexec("cache", "ls", "-l", str(cache), cwd=tmp_path)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert sum(line.startswith("square") and "unreadable" in line for line in lines) == 1


# -- prune / clear --------------------------------------------------------------


def test_prune_expired(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    fill(cache, monkeypatch)
    out = graphexec("cache", "prune", "--expired", str(cache), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("deleted 2 entries")
    assert sorted(entries(cache).values()) == ["square"] * 3


def test_prune_older_than(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    fill(cache, monkeypatch, old=2)
    out = graphexec("cache", "prune", "--older-than", "7d", str(cache), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("deleted 2 entries")
    assert len(entries(cache)) == 5  # the fresh ones, expired included (not asked for)
    both = graphexec("cache", "prune", "--older-than", "1w", "--expired", str(cache), cwd=tmp_path)
    assert both.stdout.startswith("deleted 2 entries")
    assert sorted(entries(cache).values()) == ["square"] * 3


@pytest.mark.parametrize("command", [["prune", "--older-than", "7d"], ["clear"]])
def test_prune_and_clear_remove_what_killed_writers_left_as_clear_cache_does(
    tmp_path, monkeypatch, command
):
    # They had their own deletion, which left a killed writer's temporary file, an
    # entry file whose row never came and a dead run's hold link for ever.
    cache = tmp_path / "cache"
    fill(cache, monkeypatch)
    shard = cache / "ab"
    shard.mkdir(exist_ok=True)
    left = [shard / ".tmp-killedwriter.gxb", shard / f"ab{'0' * 62}{cache_store.FILE_SUFFIX}"]
    for path in left:
        path.write_bytes(b"half an entry")
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    hold = shard / f".hold-{int(dead.stdout)}-1"
    os.link(left[1], hold)
    writing = shard / ".tmp-writingnow.gxb"  # being written now: not touched
    writing.write_bytes(b"x")
    out = graphexec("cache", *command, str(cache), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [p for p in [*left, hold] if p.exists()] == []
    assert writing.exists()


def test_clear_one_task_then_all(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    fill(cache, monkeypatch)
    out = graphexec("cache", "clear", "--task", "fleeting", str(cache), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(entries(cache).values()) == ["square"] * 3
    unknown = graphexec("cache", "clear", "--task", "nope", str(cache), cwd=tmp_path)
    assert unknown.returncode == 1
    assert "no entries of task 'nope'" in unknown.stderr and "square" in unknown.stderr
    out = graphexec("cache", "clear", str(cache), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("deleted 3 entries")
    assert entries(cache) == {}
    # one lock file for the directory, none per entry
    assert [p.name for p in cache.rglob("*lock*")] == [cache_store.LOCK_NAME]


HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from graphexec._data.cache import CacheStore
    assert CacheStore(sys.argv[1]).try_lock(sys.argv[2])  # as a run computing the entry
    print("held", flush=True)
    sys.stdin.read()
    """
)

MAP_ENTRY = textwrap.dedent(
    """
    import sys
    from graphexec._data.cache import CacheStore
    payload = CacheStore(sys.argv[1]).lookup(sys.argv[2])  # a run reading a hit
    value = payload.load()
    print("mapped", value.sum(), flush=True)
    sys.stdin.read()
    """
)


def _holder(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(WORKTREE)),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(("held", "mapped")), line
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()  # type: ignore[union-attr]
    proc.wait(timeout=10)
    proc.stdout.close()  # type: ignore[union-attr]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "command",
    [["clear"], ["clear", "--task", "square"], ["prune", "--older-than", "1s"]],
)
def test_an_entry_a_live_run_holds_survives(tmp_path, monkeypatch, command):
    cache = tmp_path / "cache"
    fill(cache, monkeypatch)
    graph = gx.Graph()
    with graph:
        big(20_000)  # 160 kB: the buffer is stored apart and mapped on a hit
    graph.compute(scheduler="sync", cache_dir=cache)
    time.sleep(1.1)  # every entry is now older than 1 s
    by_task = {v: k for k, v in entries(cache).items()}
    locked = sorted(n for n, t in entries(cache).items() if t == "square")[0]
    mapped = by_task["big"]

    computing = _holder(HOLD_LOCK, str(cache), locked)
    reading = _holder(MAP_ENTRY, str(cache), mapped)
    try:
        listing = graphexec("cache", "info", str(cache), cwd=tmp_path)
        # The mapped file; the lock of the process alone in the directory is in its
        # memory, not asked for (that would make it yield, and wait for it): said so.
        assert "held        1" in listing.stdout
        assert f"process {computing.pid} is running alone" in listing.stderr
        out = graphexec("cache", *command, str(cache), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        left = entries(cache)
        assert locked in left  # a run is computing it: untouched
        others = {n: t for n, t in left.items() if n not in (locked, mapped)}
        if command[-1] != "square":  # --task square does not select big's entry
            assert mapped in left
            assert "kept 2 held by a running computation" in out.stdout
            assert others == {}  # the rest went
        else:
            assert "kept 1 held by a running computation" in out.stdout
            assert sorted(others.values()) == ["fleeting"] * 2  # other tasks stay
    finally:
        _release(computing)
        _release(reading)
    # Released: now they go.
    out = graphexec("cache", "clear", str(cache), cwd=tmp_path)
    assert out.returncode == 0
    assert entries(cache) == {}


# -- a project's run, from the shell (SPEC audit) --------------------------------------

PIPELINE = """
import graphexec as gx
import helpers

if __name__ == "__main__":
    graph = gx.Graph("nightly")
    for i in range(1, 6):
        graph.add(helpers.ratio, list(range(i)))
    try:
        graph.compute(workers=2, run_dir="nightly-run")
    except gx.GraphFailed as exc:
        print(str(exc).splitlines()[-1])
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A script whose task lives in a module beside it, run with run_dir=: ratio-2
    (of 1, 2 and 3 values: one over zero) failed."""
    (tmp_path / "helpers.py").write_text(
        "def ratio(data):\n    return sum(data) / (len(data) - 3)\n"
    )
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    done = subprocess.run(
        [sys.executable, "pipeline.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(WORKTREE)),
        timeout=120,
    )
    assert "python -m graphexec replay nightly-run/run.gxrun ratio-2" in done.stdout, done
    return tmp_path


@pytest.mark.timeout(120)
def test_report_of_the_current_directory_is_written_beside_it(project):
    # `graphexec report .` from inside a run_dir: Path(".") has no name to give a
    # suffix, and the command died with a traceback.
    done = graphexec("report", ".", cwd=project / "nightly-run")
    assert done.returncode == 0, done.stderr
    assert (project / "nightly-run.html").exists()


@pytest.mark.timeout(120)
def test_report_of_the_parent_directory_is_written_beside_it(project):
    below = project / "nightly-run" / "below"
    below.mkdir()
    done = graphexec("report", "..", cwd=below)
    assert done.returncode == 0, done.stderr
    assert (project / "nightly-run.html").exists()
    assert not list(below.iterdir())  # (not a hidden "...html" here)


@pytest.mark.timeout(120)
def test_a_replay_whose_function_cannot_be_loaded_does_not_say_it_failed_again(
    project, tmp_path_factory
):
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # helpers.py cannot be imported here
    done = graphexec("replay", str(project / "nightly-run"), "ratio-2", cwd=elsewhere)
    assert done.returncode == 3  # the call was not made: not "failed again" (1)
    assert "the function of ratio-2 could not be loaded here" in done.stderr
    assert "failed again" not in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.timeout(120)
def test_the_graphexec_script_replays_a_module_task_from_the_runs_directory(project):
    # The `graphexec` console script's sys.path starts at its bin/ directory, not at
    # the working directory as `python -m graphexec`'s does: helpers.py, beside the
    # script, could not be imported there.
    script = (
        "import sys; sys.path[0] = sys.prefix + '/bin'\n"  # as a console script's
        "from graphexec._surfaces.cli import main\n"
        "sys.exit(main(['replay', 'nightly-run', 'ratio-2']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=project,
        env=dict(os.environ, PYTHONPATH=str(WORKTREE)),
        timeout=120,
    )
    assert done.returncode == 1
    assert "ZeroDivisionError" in done.stderr, done.stderr
    assert "ratio-2 failed again" in done.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [["ls"], ["info"], ["prune", "--expired"], ["clear"]])
def test_cache_commands_on_a_damaged_database_say_so(tmp_path, command):
    (tmp_path / cache_store.DB_NAME).write_bytes(b"this is not an sqlite database" * 200)
    done = graphexec("cache", *command, str(tmp_path), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("graphexec: error:"), done.stderr
    assert "is damaged" in done.stderr and "to start a new cache there" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(120)
def test_cache_commands_on_a_database_with_damaged_pages_say_so(tmp_path, monkeypatch):
    # It opens (its header is whole), but a query meets a damaged page.
    fill(tmp_path, monkeypatch)
    cache_store.CacheStore(tmp_path).flush()
    conn = sqlite3.connect(tmp_path / cache_store.DB_NAME)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file itself
    conn.close()
    with open(tmp_path / cache_store.DB_NAME, "r+b") as f:
        f.seek(4096)  # the first page is the header's: the table's pages follow
        f.write(os.urandom(3 * 4096))
    done = graphexec("cache", "ls", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("graphexec: error:"), done.stderr
    assert "is damaged" in done.stderr and "Traceback" not in done.stderr


def _read_only_lock_file(monkeypatch):
    """Opening the cache's lock file for writing fails as on a read-only filesystem (a
    test running as root writes through any permission bits)."""
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if os.fspath(path).endswith(cache_store.LOCK_NAME) and flags & (os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(cache_store.os, "open", read_only)


def test_a_run_on_a_read_only_cache_directory_computes_without_the_cache(tmp_path, monkeypatch):
    _read_only_lock_file(monkeypatch)
    graph = gx.Graph()
    with graph:
        node = square(7)
    with pytest.warns(RuntimeWarning, match="cannot be used .*Read-only file system"):
        run = graph.compute(scheduler="sync", cache_dir=tmp_path)
    assert run[node] == 49 and run.state(node).name == "Completed"


def test_cache_commands_on_a_read_only_directory_say_so(tmp_path, monkeypatch, capsys):
    _read_only_lock_file(monkeypatch)
    (tmp_path / cache_store.DB_NAME).write_bytes(b"")  # a cache directory, by its look
    assert cli_main(["cache", "ls", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("graphexec: error:") and "Read-only file system" in err, err
    assert "Traceback" not in err


@pytest.mark.timeout(120)
def test_a_run_on_a_damaged_cache_database_computes_without_the_cache(tmp_path):
    (tmp_path / cache_store.DB_NAME).write_bytes(b"this is not an sqlite database" * 200)
    graph = gx.Graph()
    with graph:
        node = square(7)
    with pytest.warns(RuntimeWarning, match="this run computes without the cache"):
        run = graph.compute(scheduler="sync", cache_dir=tmp_path)
    assert run[node] == 49
    assert run.state(node).name == "Completed"


def test_doctor_prints_what_graphexec_will_use_here(tmp_path, capsys):
    assert cli_main(["doctor", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    for fact in ("workers by default", "threads per worker", "memory", "/dev/shm"):
        assert f"  {fact}" in out
    assert f"{tmp_path / 'cache'} (not made yet; local)" in out
    assert not (tmp_path / "cache").exists()  # it writes nothing


def test_doctor_says_what_to_change_on_a_cluster_node_or_in_a_container(tmp_path, monkeypatch):
    # A job's 8 cores under a quota of 1.5 CPUs, a 1 GiB memory limit, a small
    # /dev/shm, a cache directory on NFS: each a fact, and a line of advice.
    from graphexec._executors import machine, threadlimits
    from graphexec._surfaces import doctor

    for var in threadlimits.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(machine, "cgroup_cpu_quota", lambda: 1.5)
    monkeypatch.setattr(machine, "cgroup_memory_limit", lambda: 2**30)
    monkeypatch.setattr(doctor, "SHM_ADVISED", 2**62)
    monkeypatch.setattr(cache_store, "network_filesystem", lambda path: "nfs4")
    found = doctor.checkup(tmp_path)
    text = found.text()
    assert "workers by default  2 (machine" in text and "cgroup CPU quota 1.5" in text
    assert "memory              this cgroup may use 1.0 GiB (the machine: " in text
    starts = (
        "the cgroup's CPU quota (1.5 CPUs) is below the 8 cores this process may run on",
        "this process's cgroup may use 1.0 GiB",
        "/dev/shm holds",
        "the cache directory is on nfs4",
    )
    assert len(found.advice) == 4, found.advice
    assert all(line.startswith(s) for line, s in zip(found.advice, starts)), found.advice
    assert "\n! the cache directory is on nfs4" in text and "nothing to change" not in text


def test_doctor_says_what_the_environment_and_a_bad_cache_path_would_do(tmp_path, monkeypatch):
    from graphexec._executors import threadlimits
    from graphexec._surfaces import doctor

    for var in threadlimits.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # passed to every worker as it is
    monkeypatch.setattr(doctor.shm, "AVAILABLE", False)  # no /dev/shm at all
    (tmp_path / "afile").write_text("")
    found = doctor.checkup(tmp_path / "afile" / "cache")
    text = found.text()
    assert "from your environment: OMP_NUM_THREADS=4" in text
    assert any("gives each worker 4 threads (OMP_NUM_THREADS=4)" in a for a in found.advice)
    assert any(a.startswith("there is no /dev/shm") for a in found.advice)
    assert f"{tmp_path / 'afile'} is not a directory" in text
    assert any(a.startswith(f"{tmp_path / 'afile'} is not a directory") for a in found.advice)


def test_the_command_works_without_docstrings(tmp_path):
    # python -OO drops docstrings: the doctor's help was made from its module's, and
    # every graphexec command failed (IndexError), --version included.
    for args in (["--version"], ["doctor", "--cache-dir", str(tmp_path)]):
        out = subprocess.run(
            [sys.executable, "-OO", "-m", "graphexec", *args],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(WORKTREE)),
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
