"""W4's peak memory: the whole process tree while W4 runs, against all it produces.

W4 makes 32 arrays of 16 MB and 32 sorted copies: 1 GB produced in all. A
tool whose memory is bounded by what is live holds a few of them at a time;
one that keeps what it produced (or copies each through a pipe into a queue)
grows towards the whole gigabyte. A thread samples, every 20 ms, the summed
RSS of this process and all its descendants (an upper bound: pages shared by
several processes count once for each, as a forked worker's pages of its
parent or server do), their summed PSS (each shared page divided among its
sharers) and the bytes in ``/dev/shm``; the
figures are the peaks above what they were just before the round, so a
tool's idle pool is not counted, its start-up (cold) is.

One round per tool, in its own group: the sampling thread costs a little CPU,
so these rounds are not the W4 timings.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import psutil
import pytest

from . import workloads as w
from .conftest import TIMEOUT, measure

pytestmark = [pytest.mark.benchmark(group="W4-memory"), pytest.mark.timeout(TIMEOUT)]

SPEC = w.w4_spec()
PRODUCED = 2 * w.W4_ARRAYS * w.W4_LENGTH * 8  # bytes: every array and its sorted copy
INTERVAL = 0.02
MB = 1 << 20


def _tree_rss() -> tuple[int, int]:
    """The tree's summed RSS, and its summed PSS (RSS where PSS is unknown).

    RSS counts a page shared by several processes once in each (forked
    workers share their parent's or their server's pages): an upper bound.
    PSS counts it 1/N in each of the N processes that share it: the tree's
    real footprint.
    """
    me = psutil.Process()
    rss = pss = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            full = p.memory_full_info()
        except psutil.Error:
            continue
        rss += full.rss
        pss += getattr(full, "pss", full.rss)
    return rss, pss


def _shm_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class PeakMemory:
    """Peaks of the process tree's RSS, its PSS and /dev/shm while the block runs."""

    def __init__(self) -> None:
        self.rss = self.pss = self.shm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(INTERVAL):
            self._take()

    def _take(self) -> None:
        rss, pss = _tree_rss()
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
        self.shm = max(self.shm, _shm_bytes())

    def __enter__(self) -> PeakMemory:
        (self.base_rss, self.base_pss), self.base_shm = _tree_rss(), _shm_bytes()
        self.rss, self.pss, self.shm = self.base_rss, self.base_pss, self.base_shm
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


def test_w4_memory(benchmark, tool, runner):
    w.w4_expected()  # the reference total, computed before anything is sampled
    peaks: list[PeakMemory] = []

    def run_sampled() -> w.Outcome:
        with PeakMemory() as peak:
            out = runner(SPEC)
        peaks.append(peak)
        return out

    measure(
        benchmark,
        run_sampled,
        w.check_w4,
        workload="W4-memory",
        tool=tool,
        rounds=1,
        tasks=len(SPEC),
    )
    peak = peaks[-1]
    benchmark.extra_info.update(
        peak_rss_mb=(peak.rss - peak.base_rss) / MB,
        peak_pss_mb=(peak.pss - peak.base_pss) / MB,
        peak_shm_mb=(peak.shm - peak.base_shm) / MB,
        produced_mb=PRODUCED / MB,
    )
