"""Keep benchmarks/ working: its workloads at tiny sizes, its drivers and its report.

The benchmarks themselves are slow and live outside ``testpaths``; run them
as ``benchmarks/README.md`` says.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) does not add it
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks import workloads as w  # noqa: E402
from benchmarks.test_startup_fresh import run_fresh  # noqa: E402

W1_N = 50
W5_N, W5_EVERY = 40, 10


@pytest.fixture(params=["sync", "processes"])
def run_gx(request, pool):
    if request.param == "sync":
        return lambda spec: w.run_graphexec(spec, scheduler="sync")
    return lambda spec: w.run_graphexec(spec, pool=pool)


def test_w1_on_graphexec(run_gx):
    w.check_w1(run_gx(w.w1_spec(W1_N)), W1_N)


def test_w5_on_graphexec(run_gx):
    out = run_gx(w.w5_spec(W5_N, W5_EVERY))
    w.check_w5(out, W5_N, W5_EVERY)
    assert (out.n_completed, len(out.failed), len(out.skipped)) == w.w5_counts(W5_N, W5_EVERY)


def test_anchor_drivers():
    w.check_w1(w.run_serial(w.w1_spec(W1_N)), W1_N)
    w.check_w5(w.run_serial(w.w5_spec(W5_N, W5_EVERY)), W5_N, W5_EVERY)
    with ProcessPoolExecutor(max_workers=2) as ex:
        # max_inflight below the task count exercises the driver's refill.
        w.check_w1(w.run_executor(ex, w.w1_spec(W1_N), max_inflight=8), W1_N)
        w.check_w5(w.run_executor(ex, w.w5_spec(W5_N, W5_EVERY), max_inflight=8), W5_N, W5_EVERY)
        w.check_w2(w.run_executor(ex, w.w2_spec(10)), 10)


def test_w6_builders_agree():
    graph, last = w.layered_graph(5, 4)
    assert len(graph) == 20 and len(last) == 5
    assert len(w.layered_dict(5, 4)) == 20
    w.check_w6(w.run_graphexec(w.w6_spec(5, 4), scheduler="sync"), 5, 4)
    run = graph.compute(scheduler="sync")
    assert {run[node] for node in last} == {3}


def test_report_reads_pytest_benchmark_json(tmp_path):
    benches = []
    for workload, times in {
        "W1": {"serial": 0.01, "ppe": 0.6, "graphexec-cold": 0.3, "graphexec-warm": 0.15},
        "W3": {"serial": 4.0, "ppe": 2.05, "graphexec-cold": 2.1, "graphexec-warm": 2.0},
    }.items():
        for tool, median in times.items():
            benches.append(
                {"stats": {"median": median}, "extra_info": {"workload": workload, "tool": tool}}
            )
    benches.append(
        {
            "stats": {"median": 0.4},
            "extra_info": {
                "workload": "W6-build-100k",
                "tool": "graphexec",
                "nodes": 100_000,
                "bytes_per_node": 325.0,
            },
        }
    )
    benches.append({"stats": {"median": 1.0}, "extra_info": {}})  # not one of ours: ignored
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": benches, "datetime": "today"}))
    table, data = report.load([str(path)])
    text = report.report(table, data)
    assert "| W1 5k no-op + sum | 0.010 s | 0.600 s |" in text
    assert "2.000 s (100%)" in text  # W3 warm: 4.0 / (2 x 2.0)
    assert "| W1 5k no-op + sum | cold | 30.00 | 0.50 |" in text
    assert "| W6 build | ≤ 1 KB per node | 325 B | met |" in text


def test_w7_on_serial_and_graphexec(run_gx):
    spec = w.w7_spec(3, 40)
    w.check_w7(w.run_serial(spec), 3, 40)
    w.check_w7(run_gx(spec), 3, 40)


def test_w7_on_joblib():
    pytest.importorskip("joblib")
    from joblib.externals.loky import get_reusable_executor

    try:
        w.check_w7(w.run_joblib(w.w7_spec(3, 40)), 3, 40)
    finally:  # joblib keeps its workers for the next call: not past this test
        get_reusable_executor().shutdown(wait=True)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ray_driver():
    ray = pytest.importorskip("ray")
    w.ray_init(2)
    try:
        w.check_w1(w.run_ray(w.w1_spec(W1_N)), W1_N)
        out = w.run_ray(w.w5_spec(W5_N, W5_EVERY), all_states=True)
        w.check_w5(out, W5_N, W5_EVERY)
        w.check_w2(w.run_ray(w.w2_spec(10)), 10)
    finally:
        ray.shutdown()


def test_report_has_ray_w7_and_the_new_sections(tmp_path):
    def bench(workload, tool, median, **extra):
        info = {"workload": workload, "tool": tool, **extra}
        return {"stats": {"median": median}, "extra_info": info}

    benches = [
        bench("W7", "serial", 2.0),
        bench("W7", "joblib", 1.6),
        bench("W7", "graphexec-cold", 1.5),
        bench("W1", "graphexec-cold", 0.3),
        bench("W1-cache", "uncached", 0.2, nodes=5001),
        bench("W1-cache", "cached-rerun", 0.1, nodes=5001),
        bench("flow-submit", "graphexec-lazy-cold", 0.5, tasks=10_000),
        bench("flow-submit", "graphexec-flow", 1.0, tasks=10_000, submit_seconds=0.2),
        bench("progress", "off", 0.20, tasks=5001),
        bench("progress", "bar", 0.21, tasks=5001),
        bench("W6-run-10k", "graphexec-warm", 0.3, nodes=10_000),
        bench("W6-run-1M", "graphexec-warm", 36.0, nodes=1_000_000, peak_rss_mb=900.0),
    ]
    path = tmp_path / "bench.json"
    info = {"ray": "not installed (ModuleNotFoundError: No module named 'ray')"}
    path.write_text(json.dumps({"benchmarks": benches, "machine_info": info}))
    table, data = report.load([str(path)])
    text = report.report(table, data)
    assert "| W1 5k no-op + sum | - | - | - | - | - | - | not installed |" in text
    assert "| W7 cold | ≤ 1 x serial numpy (all cores) (#14) | 0.75 x | met |" in text
    assert "| W7 cold | ≤ 1 x joblib (#14) | 0.94 x | met |" in text
    assert (
        "| W1 (5001 nodes) | cache=True, full cache (all Cached) | 0.100 s | 20.0 µs | 0.50 |"
        in (text)
    )
    assert "(the submits: 0.200 s) | 100.0 µs | 2.00 |" in text
    assert "| `progress=True` (the tqdm bar) | 0.210 s | 1.05 | +2.0 µs |" in text
    assert "| W6 1M run | parent peak RSS ≤ 1.5 GB (#14) | 900 MB | met |" in text
    assert "| W6 1M run | per node ≤ 1.3 x at 10k (#14) | 1.20 x | met |" in text


def test_report_pairs_rounds_of_tools_that_ran_in_turns(tmp_path):
    def bench(tool, turns):
        info = {"workload": "W7", "tool": tool, "turn_times": turns}
        return {"stats": {"median": sorted(turns)[1]}, "extra_info": info}

    benches = [
        bench("serial", [10.0, 2.0, 3.0]),  # a burst of load in the first turn
        bench("graphexec-warm", [9.0, 1.8, 3.3]),  # per turn: 0.9, 0.9, 1.1
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": benches}))
    table, data = report.load([str(path)])
    text = report.report(table, data)
    assert "| W7 warm | ≤ 1 x serial numpy (all cores) per turn (#14) | 0.90 x | met |" in text
    assert "| W7 16 x 1500² matmul | warm | 0.90 |" in text


@pytest.mark.parametrize("tool", ["graphexec", "ppe"])
def test_fresh_start_child_reports_its_phases(tool):
    # What benchmarks/test_startup_fresh.py runs in each round, once.
    phases = run_fresh(tool)
    assert set(phases) == {"import", "first", "close"}
    assert all(0 <= phases[p] < 60 for p in phases)


def test_report_shows_fresh_start_up_and_missing_tools(tmp_path):
    extra = {"workload": "startup-fresh", "import_s": 0.02, "first_s": 0.04, "close_s": 0.0}
    benches = [
        {"stats": {"median": 0.1}, "extra_info": {**extra, "tool": "graphexec"}},
        {"stats": {"median": 0.05}, "extra_info": {**extra, "tool": "ppe", "close_s": 0.003}},
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": benches, "datetime": "today"}))
    text = report.report(*report.load([str(path)]))
    assert "| graphexec (`graph.compute(workers=2)`) | 0.020 s | 0.040 s | in first result |" in (
        text
    )
    assert "| ProcessPoolExecutor | 0.020 s | 0.040 s | 3.00 ms | 0.050 s |" in text
    assert "| Ray | not installed (or not run) |" in text


def test_w3_floor_runs_a_half_in_each_process_and_the_report_reads_it(tmp_path):
    spec = w.w3_spec(1000, n=7)
    serial = w.run_serial(spec)
    expected = [serial.values[i] for i in sorted(serial.values)]
    floor = w.w3_floor()
    try:
        w.check_w3(w.run_w3_floor(floor, spec), expected)
    finally:
        floor.close()

    def bench(tool, turns):
        info = {"workload": "W3-turns", "tool": tool, "turn_times": turns}
        return {"stats": {"median": sorted(turns)[1]}, "extra_info": info}

    benches = [
        bench("serial", [4.0, 4.2, 4.4]),
        bench("floor", [2.0, 2.1, 2.2]),
        bench("graphexec-cold", [2.2, 2.1, 2.4]),  # per turn: 1.1, 1.0, 1.09
        bench("graphexec-warm", [2.0, 2.1, 2.2]),
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": benches}))
    text = report.report(*report.load([str(path)]))
    assert "| W3 cold | ≤ 1.03 x the two-process floor, in turns | 1.09 x | **missed** |" in text
    assert "| W3 warm | ≤ 1.03 x the two-process floor, in turns | 1.00 x | met |" in text
    assert "the parallel efficiency 2 cores allow | 100.0% |" in text
