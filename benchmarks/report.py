"""Print the benchmark tables of issue #5 as markdown.

Commands, from the repository root::

    pip install -e '.[bench]'
    python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json -p no:cacheprovider
    python -m benchmarks.report --json bench.json

``--json`` takes several files: a later file's entries replace an earlier
one's (to rerun some benchmarks, e.g. ``-k w3``, and merge). A number marked
† was taken while other programs used more than a quarter of a core.
``python -m benchmarks.report`` without ``--json`` runs that pytest command
itself first (about 13 minutes on 2 cores; ``--save PATH`` keeps its JSON,
``-k EXPR`` selects benchmarks as in pytest).

The tables: the median seconds per workload and tool; graphexec's time
divided by each anchor's (below 1: graphexec is faster), cold (its own pool
start-up included) and warm (a ``gx.Pool`` started before timing); W3's
parallel efficiency, serial / (2 x time), from the medians of the same run;
W6's build time, bytes per node and the cost per node at 10,000 and 100,000
nodes; and the targets of issue #5, met or missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

# Column order and headings.
ANCHORS = {
    "serial": "serial",
    "ppe": "ProcessPoolExecutor",
    "loky": "loky",
    "joblib": "joblib",
    "dask-processes": "dask processes",
    "dask-distributed": "dask.distributed",
    "ray": "Ray",
    "floor": "two processes, half each",
}
# Anchors that only some workloads have: an empty cell elsewhere is expected.
ONLY_IN = {"joblib": {"W7"}, "floor": {"W3-turns", "W4"}}
# Workloads only some tools run (in turns, in one fixture): the other cells are blank.
ONLY_TOOLS = {"W3-turns": {"serial", "floor", "graphexec-cold", "graphexec-warm"}}
GX = {
    "graphexec-cold": "graphexec cold",
    # Workers forked from a fresh-interpreter server: a program running threads.
    "graphexec-cold-forkserver": "graphexec cold (forkserver)",
    "graphexec-warm": "graphexec warm",
}
ROWS = {
    "W1": "W1 5k no-op + sum",
    "W2": "W2 chain of 500",
    "W3": "W3 40 x 0.1 s CPU",
    "W3-turns": "W3 in turns with its floor",
    "W4": "W4 numpy 32 x 16 MB",
    "W5": "W5 10 % failing",
    "W6-run-10k": "W6 run 10k nodes",
    "W6-run-100k": "W6 run 100k nodes",
    "W6-run-1M": "W6 run 1M nodes",
    "W7": "W7 16 x 1500² matmul",
    "startup": "start-up (pool + 8 tiny tasks + close)",
    "startup-paused": "first result of a new pool (1 task), 0.1 s after the last",
}
WORKERS = 2
DISTURBED = 0.25  # cores used by other programs, on average, that flag a number

Table = dict[str, dict[str, dict[str, Any]]]  # workload -> tool -> {median, extra}


def load(paths: list[str]) -> tuple[Table, list[dict[str, Any]]]:
    """Medians and extra_info by workload and tool, from pytest-benchmark JSON files.

    A later file's entry replaces an earlier one's (a rerun of some benchmarks).
    """
    table: Table = {}
    runs = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        runs.append(data)
        for bench in data["benchmarks"]:
            extra = bench.get("extra_info", {})
            workload, tool = extra.get("workload"), extra.get("tool")
            if workload is None or tool is None:
                continue
            table.setdefault(workload, {})[tool] = {"median": bench["stats"]["median"], **extra}
    return table, runs


def disturbed(entry: dict[str, Any] | None) -> bool:
    """Other programs used more than DISTURBED cores on average during the benchmark."""
    if not entry or not entry.get("window_s"):
        return False
    return entry.get("foreign_cpu_s", 0.0) / entry["window_s"] > DISTURBED


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 0.01:
        return f"{seconds:.3f} s"
    return f"{seconds * 1000:.2f} ms"


def median(table: Table, workload: str, tool: str) -> float | None:
    entry = table.get(workload, {}).get(tool)
    return entry["median"] if entry else None


def efficiency(table: Table, tool: str) -> float | None:
    serial, t = median(table, "W3", "serial"), median(table, "W3", tool)
    if serial is None or t is None:
        return None
    return serial / (WORKERS * t)


def missing(runs: list[dict[str, Any]], tool: str) -> str | None:
    """Why a tool has no numbers at all in these runs (Ray not installed), or None."""
    if tool != "ray":
        return None
    for data in runs:
        status = data.get("machine_info", {}).get("ray", "")
        if status.startswith("not installed"):
            return "not installed"
    return None


def medians_table(table: Table, runs: list[dict[str, Any]] | None = None) -> list[str]:
    tools = {**ANCHORS, **GX}
    lines = [
        "| workload | " + " | ".join(tools.values()) + " |",
        "|---|" + "---|" * len(tools),
    ]
    for workload, label in ROWS.items():
        if workload not in table:
            continue
        cells = []
        for tool in tools:
            if workload in ONLY_TOOLS and tool not in ONLY_TOOLS[workload]:
                cells.append("")
                continue
            cell = fmt(median(table, workload, tool))
            if workload == "W3" and tool != "serial":
                eff = efficiency(table, tool)
                if eff is not None:
                    cell += f" ({eff:.0%})"
            why = missing(runs or [], tool)
            if cell == "-" and why and workload not in ("W6-run-10k", "W6-run-100k"):
                cell = why
            if workload == "W5" and tool == "dask-processes":
                cell = "raises at first error"
            elif disturbed(table.get(workload, {}).get(tool)):
                cell += " †"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def ratios_table(table: Table) -> list[str]:
    lines = [
        "| workload | graphexec | " + " | ".join(ANCHORS.values()) + " |",
        "|---|---|" + "---|" * len(ANCHORS),
    ]
    for workload, label in ROWS.items():
        if workload in ("startup", "startup-paused"):
            continue
        for tool, gx_label in GX.items():
            mine = median(table, workload, tool)
            if mine is None:
                continue
            cells = []
            for anchor in ANCHORS:
                if (anchor in ONLY_IN and workload not in ONLY_IN[anchor]) or (
                    workload in ONLY_TOOLS and anchor not in ONLY_TOOLS[workload]
                ):
                    cells.append("")
                    continue
                paired = turn_ratio(table, workload, tool, anchor)
                if paired is not None:  # ran in turns: the median of per-turn ratios
                    cells.append(f"{paired:.2f}")
                    continue
                other = median(table, workload, anchor)
                cells.append(f"{mine / other:.2f}" if other else "-")
            kind = gx_label.removeprefix("graphexec ")
            lines.append(f"| {label} | {kind} | " + " | ".join(cells) + " |")
    return lines


W6_FORMS = {
    "graphexec": "task calls in `with graph:`",
    "graphexec-add": "`graph.add(fn, ...)` in `with graph:`",
    "graphexec-add-bare": "`graph.add(fn, ...)`, no block",
}


def w6_lines(table: Table) -> list[str]:
    lines = [
        "| nodes | build | time | per node | vs plain dict | bytes per node |",
        "|---|---|---|---|---|---|",
    ]
    for size in ("10k", "100k", "1M"):
        build = table.get(f"W6-build-{size}", {})
        plain = median(table, f"W6-build-{size}", "plain-dict")
        for tool, label in W6_FORMS.items():
            gx = build.get(tool)
            if gx is None:
                continue
            ratio = f"{gx['median'] / plain:.2f}" if plain else "-"
            lines.append(
                f"| {gx['nodes']:,} | {label} | {fmt(gx['median'])} |"
                f" {gx['median'] / gx['nodes'] * 1e6:.2f} µs | {ratio} |"
                f" {gx['bytes_per_node']:.0f} B |"
            )
        if plain is not None:
            lines.append(f"| | plain dict of tuples | {fmt(plain)} | | 1.00 | |")
        delayed = median(table, f"W6-build-{size}", "dask.delayed")
        if delayed is not None:
            lines.append(f"| | dask.delayed | {fmt(delayed)} | | | |")
    lines += [
        "",
        "Cost per node, 10k vs 100k (and 1M) nodes (flat = linear):",
        "",
        "| | 10k | 100k | 100k / 10k | 1M | 1M / 10k |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(f"build: {label}", "W6-build", tool) for tool, label in W6_FORMS.items()]
    rows += [
        (f"run: {ANCHORS.get(t, GX.get(t, t))}", "W6-run", t)
        for t in ("serial", "ppe", "loky", "graphexec-warm")
    ]
    for label, prefix, tool in rows:
        per = []
        for size in ("10k", "100k", "1M"):
            entry = table.get(f"{prefix}-{size}", {}).get(tool)
            per.append(entry["median"] / entry["nodes"] * 1e6 if entry else None)
        if per[0] is None and per[1] is None:
            continue
        cells = [f"{p:.1f} µs" if p is not None else "-" for p in per]
        ratio = f"{per[1] / per[0]:.2f}" if None not in per[:2] else "-"
        big = f"{per[2] / per[0]:.2f}" if per[2] is not None and per[0] is not None else "-"
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} | {cells[2]} | {big} |")
    return lines


def memory_lines(table: Table) -> list[str]:
    """W4's peak memory per tool (``test_w4_memory``), above the idle baseline."""
    entries = table.get("W4-memory", {})
    lines = [
        "| tool | process tree RSS, peak | process tree PSS, peak | /dev/shm, peak |"
        " of all W4 produces (RSS) |",
        "|---|---|---|---|---|",
    ]
    for tool, label in {**ANCHORS, **GX}.items():
        e = entries.get(tool)
        if e is None:
            continue
        peak = e["peak_rss_mb"] + e["peak_shm_mb"]
        pss = f"{e['peak_pss_mb']:.0f} MB" if "peak_pss_mb" in e else "-"
        lines.append(
            f"| {label} | {e['peak_rss_mb']:.0f} MB | {pss} | {e['peak_shm_mb']:.0f} MB | "
            f"{peak / e['produced_mb']:.0%} of {e['produced_mb']:.0f} MB |"
        )
    return lines


CACHE_VARIANTS = {
    "uncached": "plain tasks",
    "cold-cache": "cache=True, empty cache",
    "cached-rerun": "cache=True, full cache (all Cached)",
}


def cache_lines(table: Table) -> list[str]:
    """test_cache_rerun.py: W1 and W4 uncached, on an empty cache, fully cached (warm pool)."""
    lines = [
        "| workload | variant | time | per node | vs uncached |",
        "|---|---|---|---|---|",
    ]
    for workload in ("W1-cache", "W4-cache"):
        entries = table.get(workload, {})
        base = median(table, workload, "uncached")
        for variant, label in CACHE_VARIANTS.items():
            e = entries.get(variant)
            if e is None:
                continue
            per = f"{e['median'] / e['nodes'] * 1e6:.1f} µs" if e.get("nodes") else "-"
            ratio = f"{e['median'] / base:.2f}" if base else "-"
            lines.append(
                f"| {workload.split('-')[0]} ({e.get('nodes', '?')} nodes) | {label} |"
                f" {fmt(e['median'])}{' †' if disturbed(e) else ''} | {per} | {ratio} |"
            )
    return lines


FLOW_FORMS = {
    "graphexec-flow": "`@gx.flow(workers=2)`, 10,000 `submit()` then `.result()` (start-up in)",
    "graphexec-lazy-cold": "the same calls in `with graph:`, `compute(workers=2)` (start-up in)",
    "graphexec-lazy-warm": "the same graph, `compute(pool=warm pool)`",
}


def flow_lines(table: Table) -> list[str]:
    """test_flow_submit.py: eager submits in a flow against the same lazy graph."""
    entries = table.get("flow-submit", {})
    cold = median(table, "flow-submit", "graphexec-lazy-cold")
    lines = ["| form | time | per task | vs lazy cold |", "|---|---|---|---|"]
    for tool, label in FLOW_FORMS.items():
        e = entries.get(tool)
        if e is None:
            continue
        extra = ""
        if "submit_seconds" in e:
            extra = f" (the submits: {fmt(e['submit_seconds'])})"
        ratio = f"{e['median'] / cold:.2f}" if cold else "-"
        lines.append(
            f"| {label} | {fmt(e['median'])}{' †' if disturbed(e) else ''}{extra} |"
            f" {e['median'] / e['tasks'] * 1e6:.1f} µs | {ratio} |"
        )
    return lines


# test_startup_fresh: each tool in a new interpreter (import, first result, close).
FRESH = {
    "graphexec": "graphexec (`graph.compute(workers=2)`)",
    "graphexec-pool": "graphexec (`gx.Pool(workers=2)`)",
    "graphexec-forkserver": 'graphexec (`start_method="forkserver"`)',
    "graphexec-numpy": "graphexec (numpy imported first)",
    "ppe": "ProcessPoolExecutor",
    "loky": "loky",
    "dask": "dask processes",
    "ray": "Ray",
}


def fresh_lines(table: Table) -> list[str]:
    """Start-up in a fresh interpreter: the child's phases and the whole process."""
    entries = table.get("startup-fresh", {})
    lines = [
        "| tool | import | first result | close | whole process |",
        "|---|---|---|---|---|",
    ]
    for tool, label in FRESH.items():
        e = entries.get(tool)
        if e is None:
            lines.append(f"| {label} | not installed (or not run) | | | |")
            continue
        close = "in first result" if tool in ("graphexec", "dask") else fmt(e["close_s"])
        lines.append(
            f"| {label} | {fmt(e['import_s'])} | {fmt(e['first_s'])} | {close} |"
            f" {fmt(e['median'])} |"
        )
    return lines


PROGRESS_FORMS = {
    "off": "`progress=False`",
    "bar": "`progress=True` (the tqdm bar)",
    "log-line": "`progress=None`, logger `graphexec` at INFO (the unattended line)",
}


def cache_scale_lines(table: Table) -> list[str]:
    """test_cache_scale.py: N tiny cached tasks, graphexec beside joblib.Memory (#19)."""
    lines = [
        "| entries | tool | uncached | first run | x uncached | all hits | x uncached "
        "| on disk per entry |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in (10_000, 100_000):
        entries = table.get(f"cache-scale-{n}", {})
        for tool, label in (("graphexec", "graphexec"), ("joblib", "joblib.Memory")):
            base = entries.get(f"{tool}-uncached")
            first = entries.get(f"{tool}-first")
            rerun = entries.get(f"{tool}-rerun")
            if base is None or (first is None and rerun is None):
                continue
            cells = [fmt(base["median"])]
            for e in (first, rerun):
                cells += (
                    [fmt(e["median"]), f"{e['median'] / base['median']:.2f}"] if e else ["-", "-"]
                )
            disk = (first or {}).get("disk_bytes_settled", (first or {}).get("disk_bytes"))
            cells.append(f"{disk / n:.0f} B" if disk else "-")
            lines.append(f"| {n:,} | {label} | " + " | ".join(cells) + " |")
    return lines


def map_lines(table: Table) -> list[str]:
    """test_map.py: ``task.map`` against the same calls in a loop (W1's no-op, 100,000)."""
    lines = ["| where | loop | `task.map` | map / loop |", "|---|---|---|---|"]
    for workload, label in (
        ("map-graph", "in `with graph:`, warm pool"),
        ("map-flow", "in `@gx.flow(workers=2)`, start-up in"),
    ):
        loop, mapped = median(table, workload, "loop"), median(table, workload, "map")
        if loop is None or mapped is None:
            continue
        lines.append(f"| {label} | {fmt(loop)} | {fmt(mapped)} | {mapped / loop:.2f} |")
    return lines


def progress_lines(table: Table) -> list[str]:
    """test_progress.py: W1 on the warm pool with and without the bar, in turns."""
    entries = table.get("progress", {})
    off = median(table, "progress", "off")
    lines = ["| progress | W1 time | vs off | per node, over off |", "|---|---|---|---|"]
    for tool, label in PROGRESS_FORMS.items():
        e = entries.get(tool)
        if e is None:
            continue
        ratio = f"{e['median'] / off:.2f}" if off else "-"
        over = f"{(e['median'] - off) / e['tasks'] * 1e6:+.1f} µs" if off else "-"
        lines.append(
            f"| {label} | {fmt(e['median'])}{' †' if disturbed(e) else ''} | {ratio} | {over} |"
        )
    return lines


def turn_ratio(table: Table, workload: str, tool: str, anchor: str) -> float | None:
    """The median of per-turn ratios, for tools that ran in turns (W7), else None.

    Pairing each round with the anchor's round of the same turn cancels most
    of what a burst of load from other programs does to both.
    """
    entries = table.get(workload, {})
    mine = (entries.get(tool) or {}).get("turn_times")
    other = (entries.get(anchor) or {}).get("turn_times")
    if not mine or not other or len(mine) != len(other):
        return None
    ratios = sorted(a / b for a, b in zip(mine, other))
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2


def targets(table: Table) -> list[str]:
    """Issue #5's targets (cold: graphexec's pool start-up included) and SPEC §9's."""

    def ratio(workload: str, tool: str, anchor: str) -> float | None:
        paired = turn_ratio(table, workload, tool, anchor)
        if paired is not None:
            return paired
        mine, other = median(table, workload, tool), median(table, workload, anchor)
        return mine / other if mine is not None and other else None

    def verdict(value: float | None, limit: float, below: bool = True) -> str:
        if value is None:
            return ""
        return "met" if (value <= limit if below else value >= limit) else "**missed**"

    rows: list[tuple[str, str, float | None, str]] = []
    for tool in ("graphexec-cold", "graphexec-warm"):
        kind = tool.split("-")[1]
        r = ratio("W1", tool, "ppe")
        rows.append((f"W1 {kind}", "≤ 0.5 x ProcessPoolExecutor", r, verdict(r, 0.5)))
        r = ratio("W1", tool, "dask-processes")
        rows.append(
            (
                f"W1 {kind}",
                "≤ 0.2 x dask processes (SPEC §9; issue: ≥ 10x faster)",
                r,
                verdict(r, 0.2),
            )
        )
        r = ratio("W2", tool, "ppe")
        rows.append((f"W2 {kind}", "≤ 1 x ProcessPoolExecutor", r, verdict(r, 1.0)))
        e = efficiency(table, tool)
        rows.append((f"W3 {kind}", "parallel efficiency ≥ 95 %", e, verdict(e, 0.95, False)))
        r = ratio("W4", tool, "serial")
        rows.append((f"W4 {kind}", "≤ 0.55 x serial", r, verdict(r, 0.55)))
        rows.append((f"W4 {kind}", "≤ 0.53 x serial (#14)", r, verdict(r, 0.53)))
        r = ratio("W4", tool, "floor")
        rows.append((f"W4 {kind}", "≤ 1.05 x the two-process floor", r, verdict(r, 1.05)))
        r = ratio("W4", tool, "dask-distributed")
        rows.append((f"W4 {kind}", "faster than dask.distributed", r, verdict(r, 1.0)))
        r = ratio("W4", tool, "dask-processes")
        rows.append(
            (f"W4 {kind}", "≥ 3x faster than dask processes (SPEC §9)", r, verdict(r, 1 / 3))
        )
        r = ratio("W5", tool, "ppe")
        rows.append((f"W5 {kind}", "≤ 1 x ProcessPoolExecutor", r, verdict(r, 1.0)))
        for anchor, label in (("serial", "serial numpy (all cores)"), ("joblib", "joblib")):
            r = ratio("W7", tool, anchor)
            how = " per turn" if turn_ratio(table, "W7", tool, anchor) is not None else ""
            rows.append((f"W7 {kind}", f"≤ 1 x {label}{how} (#14)", r, verdict(r, 1.0)))
    # Issue #14's targets for tiny tasks: cold, start-up included (ratios to PPE).
    for workload, limit in (("W1", 0.15), ("W2", 0.15), ("W5", 0.2)):
        for tool in ("graphexec-cold", "graphexec-cold-forkserver"):
            r = ratio(workload, tool, "ppe")
            kind = GX[tool].removeprefix("graphexec ")
            rows.append(
                (
                    f"{workload} {kind}",
                    f"≤ {limit} x ProcessPoolExecutor (#14)",
                    r,
                    verdict(r, limit),
                )
            )
    r = ratio("W6-run-100k", "graphexec-warm", "ppe")
    rows.append(("W6 100k warm", "≤ 0.1 x ProcessPoolExecutor (#14)", r, verdict(r, 0.1)))
    small = table.get("W6-run-10k", {}).get("graphexec-warm")
    mid = table.get("W6-run-100k", {}).get("graphexec-warm")
    if small and mid:
        r = (mid["median"] / mid["nodes"]) / (small["median"] / small["nodes"])
        rows.append(("W6 100k warm", "per node ≤ 1.2 x at 10k (#14)", r, verdict(r, 1.2)))
    e = efficiency(table, "graphexec-cold")
    rows.append(("W3 cold", "parallel efficiency ≥ 97 % (#14)", e, verdict(e, 0.97, False)))
    # W3 beside its floor, in turns (test_w3_floor): the machine's share of the target.
    paired = turn_ratio(table, "W3-turns", "serial", "floor")
    floor_e = paired / WORKERS if paired is not None else None
    for tool in ("graphexec-cold", "graphexec-warm"):
        r = ratio("W3-turns", tool, "floor")
        rows.append(
            (f"W3 {tool.split('-')[1]}", "≤ 1.03 x the two-process floor, in turns", r,
             verdict(r, 1.03))
        )  # fmt: skip
    for anchor, label in (("serial", "serial numpy (all cores)"), ("joblib", "joblib")):
        r = ratio("W7", "graphexec-cold-forkserver", anchor)
        rows.append(("W7 cold (forkserver)", f"≤ 1 x {label} (#14)", r, verdict(r, 1.0)))
    # Issue #19: the cache at scale (test_cache_scale.py).
    for n in (10_000, 100_000):
        entries = table.get(f"cache-scale-{n}", {})
        base = entries.get("graphexec-uncached")
        first, rerun = entries.get("graphexec-first"), entries.get("graphexec-rerun")
        if base and first:
            r = first["median"] / base["median"]
            rows.append((f"cache {n:,}", "first run ≤ 1.5 x uncached (#19)", r, verdict(r, 1.5)))
            disk = first.get("disk_bytes_settled", first.get("disk_bytes"))
            if disk:
                rows.append(
                    (
                        f"cache {n:,}",
                        "≤ 1 KB on disk per entry (#19)",
                        disk / n,
                        verdict(disk / n, 1024),
                    )
                )
        if base and rerun:
            r = rerun["median"] / base["median"]
            rows.append((f"cache {n:,}", "all hits ≤ 1 x uncached (#19)", r, verdict(r, 1.0)))
    build = table.get("W6-build-100k", {}).get("graphexec")
    if build:
        rows.append(
            ("W6 build", "≤ 1 s for 100k nodes", build["median"], verdict(build["median"], 1.0))
        )
        rows.append(
            (
                "W6 build",
                "≤ 1 KB per node",
                build["bytes_per_node"],
                verdict(build["bytes_per_node"], 1024),
            )
        )
    floor = ratio("W4", "floor", "serial")
    rows.append(("W4 floor", "two processes, half each, x serial: what 2 cores allow", floor, ""))
    rows.append(
        (
            "W3 floor",
            "two processes, half each, in turns: the parallel efficiency 2 cores allow",
            floor_e,
            "",
        )
    )
    big = table.get("W6-run-1M", {}).get("graphexec-warm")
    small = table.get("W6-run-10k", {}).get("graphexec-warm")
    if big:
        rss = big.get("peak_rss_mb")
        if rss is not None:
            rows.append(("W6 1M run", "parent peak RSS ≤ 1.5 GB (#14)", rss, verdict(rss, 1536)))
        if small:
            r = (big["median"] / big["nodes"]) / (small["median"] / small["nodes"])
            rows.append(("W6 1M run", "per node ≤ 1.3 x at 10k (#14)", r, verdict(r, 1.3)))
    lines = ["| workload | target | measured | |", "|---|---|---|---|"]
    for name, target, value, ok in rows:
        if value is None:
            continue  # that workload or anchor was not in this run
        if "efficiency" in target:
            shown = f"{value:.1%}"
        elif "KB" in target:
            shown = f"{value:.0f} B"
        elif "RSS" in target:
            shown = f"{value:.0f} MB"
        elif name == "W6 build":
            shown = fmt(value)
        else:
            shown = f"{value:.2f} x"
        lines.append(f"| {name} | {target} | {shown} | {ok} |")
    return lines


def report(table: Table, runs: list[dict[str, Any]]) -> str:
    header = []
    for data in runs:
        machine = data.get("machine_info", {})
        cpu = machine.get("cpu", {})
        header.append(
            f"Run {data.get('datetime', '?')} on {cpu.get('count', '?')} cores "
            f"({cpu.get('brand_raw') or machine.get('processor') or '?'}), Python "
            f"{machine.get('python_version', '?')}."
            + (
                f" graphexec cold forked its workers from its {machine['graphexec_start_method']}"
                " (a plain script's default; the forkserver column: a fresh-interpreter"
                " server, a numpy program's or a notebook's default). Either server starts"
                " once per process, its start in the start-up table, not here."
                if machine.get("graphexec_start_method")
                else ""
            )
        )
    header += [
        "",
        f"workers={WORKERS}; medians; building the graph is inside every time except W6-run's. ",
    ]
    if any(disturbed(e) for tools in table.values() for e in tools.values()):
        header[-1] += (
            f"†: other programs used more than {DISTURBED} of a core on average during "
            "that benchmark (`foreign_cpu_s` in its extra_info): treat it with care."
        )
    out = [
        "## Median seconds",
        "",
        *header,
        "",
        *medians_table(table, runs),
        "",
        "## graphexec time / anchor time (below 1: graphexec is faster)",
        "",
        "Workloads run in turns (W7: each tool one round per turn) show the median of "
        "the per-turn ratios.",
        "",
        *ratios_table(table),
        "",
        *(["## W6 scale", "", *w6_lines(table), ""] if "W6-build-10k" in table else []),
        *(
            [
                "## W4 peak memory (above the idle baseline; summed over the process tree)",
                "",
                *memory_lines(table),
                "",
            ]
            if "W4-memory" in table
            else []
        ),
        *(
            ["## Caching (test_cache_rerun.py)", "", *cache_lines(table), ""]
            if "W1-cache" in table or "W4-cache" in table
            else []
        ),
        *(
            [
                "## Flows: submits against a lazy graph (test_flow_submit.py)",
                "",
                *flow_lines(table),
                "",
            ]
            if "flow-submit" in table
            else []
        ),
        *(
            [
                "## The cache at scale (test_cache_scale.py, #19)",
                "",
                *cache_scale_lines(table),
                "",
            ]
            if "cache-scale-10000" in table or "cache-scale-100000" in table
            else []
        ),
        *(
            ["## W1 as `task.map`, 100,000 calls (test_map.py)", "", *map_lines(table), ""]
            if "map-graph" in table or "map-flow" in table
            else []
        ),
        *(
            ["## The progress bar's cost (test_progress.py)", "", *progress_lines(table), ""]
            if "progress" in table
            else []
        ),
        *(
            [
                "## Start-up in a fresh interpreter (import, first result of 1 call, close)",
                "",
                *fresh_lines(table),
                "",
            ]
            if "startup-fresh" in table
            else []
        ),
        "## Targets of issues #5 and #14 (ratios: graphexec / anchor)",
        "",
        *targets(table),
    ]
    return "\n".join(out) + "\n"


def run_benchmarks(json_path: str, select: str | None) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks",
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "-p",
        "no:cacheprovider",
        "-q",
    ]
    if select:
        cmd += ["-k", select]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=root, check=True, stdout=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--json",
        nargs="+",
        metavar="PATH",
        help="pytest-benchmark JSON files to read; a later file's entries replace an "
        "earlier one's (default: run the benchmarks now)",
    )
    parser.add_argument("--save", help="where to keep the JSON of a fresh run")
    parser.add_argument("-k", dest="select", help="pytest -k expression for a fresh run")
    args = parser.parse_args(argv)
    paths = args.json
    if paths is None:
        scratch = not args.save
        if args.save:
            path = os.path.abspath(args.save)
        else:
            fd, path = tempfile.mkstemp(suffix=".json", prefix="graphexec-bench-")
            os.close(fd)
        try:
            run_benchmarks(path, args.select)
            table, data = load([path])
        finally:
            if scratch:
                os.unlink(path)
    else:
        table, data = load(paths)
    if not table:
        print("no graphexec benchmarks in the JSON", file=sys.stderr)
        return 1
    sys.stdout.write(report(table, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
