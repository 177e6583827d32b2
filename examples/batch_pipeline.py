"""A batch pipeline over 48 camera frames, with a run report and a picture of the graph.

Each frame goes through four steps, then one node gathers every result::

    load(i) ──> check ──> denoise ──> measure ──> store ──┐
    load(j) ──> check ──> denoise ──> measure ──> store ──┼──> catalogue(all)
    ...                                                   ┘

* ``load`` synthesises a 512x512 frame (a few bright "stars" on sky noise).
  Three frames are broken the way real ones are: sensor drop-outs (NaN
  pixels), a truncated read (wrong shape), a saturated exposure.
* ``check`` refuses those three: they fail, and their later steps are Skipped.
* ``denoise`` (a separable Gaussian blur) and ``measure`` (Sobel edges,
  background, star count) are plain numpy.
* ``store`` writes the measurements to a "remote" archive that drops the
  first connection for some frames; ``retries=2`` gets them through.
* ``catalogue`` takes ``gx.allow_failure(stored)``: it runs even though some
  frames failed, receiving the exception in place of those frames' values.

Afterwards the pipeline writes ``report.html`` (summary table and a timeline
per worker, failures and retries highlighted) and ``graph.svg`` (the graph
coloured by state; with 241 nodes it is drawn one box per task) to the
directory given as the first argument, default ``./out``.

Run it::

    python examples/batch_pipeline.py [out-dir]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import graphexec as gx

FRAMES = 48
SIZE = 512
BROKEN = {7: "dropout", 23: "truncated", 41: "saturated"}
FLAKY = {3, 16, 29, 38}  # frames whose first upload attempt loses its connection


@gx.task
def load(i: int) -> np.ndarray:
    """A synthetic frame: sky noise plus a few Gaussian stars, seeded by its number."""
    rng = np.random.default_rng(i)
    frame = rng.normal(100.0, 8.0, (SIZE, SIZE))
    yy, xx = np.mgrid[-8:9, -8:9]
    for _ in range(5 + i % 7):  # each star drawn in its own 17x17 patch
        y, x = rng.integers(8, SIZE - 8, 2)
        frame[y - 8 : y + 9, x - 8 : x + 9] += rng.uniform(200, 900) * np.exp(
            -(yy**2 + xx**2) / 8.0
        )
    kind = BROKEN.get(i)
    if kind == "dropout":
        frame[rng.integers(0, SIZE, 300), rng.integers(0, SIZE, 300)] = np.nan
    elif kind == "truncated":
        frame = frame[: SIZE // 3]
    elif kind == "saturated":
        frame[:] = 65535.0
    return frame


@gx.task
def check(frame: np.ndarray, i: int) -> np.ndarray:
    """Refuse frames that would silently poison the catalogue."""
    if frame.shape != (SIZE, SIZE):
        raise ValueError(
            f"frame {i}: shape {frame.shape}, expected {(SIZE, SIZE)} (truncated read)"
        )
    bad = int(np.isnan(frame).sum())
    if bad:
        raise ValueError(f"frame {i}: {bad} NaN pixels (sensor drop-out)")
    if np.ptp(frame) == 0:
        raise ValueError(f"frame {i}: every pixel is {frame.flat[0]:g} (saturated exposure)")
    return frame


@gx.task
def denoise(frame: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Separable Gaussian blur: one 1-D convolution along each axis."""
    radius = int(3 * sigma)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(frame, radius, mode="reflect")
    rows = np.apply_along_axis(np.convolve, 1, padded, kernel, mode="valid")
    return np.apply_along_axis(np.convolve, 0, rows, kernel, mode="valid")


@gx.task
def measure(frame: np.ndarray, i: int) -> dict:
    """Background level, edge strength (Sobel) and a count of bright sources."""
    gy, gx_ = np.gradient(frame)
    edges = np.hypot(gx_, gy)
    background = float(np.median(frame))
    bright = frame > background + 10 * frame.std() / 3
    # local maxima among the bright pixels count the stars
    core = frame[1:-1, 1:-1]
    peaks = (
        bright[1:-1, 1:-1]
        & (core > frame[:-2, 1:-1])
        & (core > frame[2:, 1:-1])
        & (core > frame[1:-1, :-2])
        & (core > frame[1:-1, 2:])
    )
    return {
        "frame": i,
        "background": background,
        "edges": float(edges.mean()),
        "stars": int(peaks.sum()),
    }


@gx.task(retries=2, retry_delay=0.2)
def store(row: dict, archive: str) -> dict:
    """Send the row to the archive; some frames lose the first connection."""
    marker = Path(archive) / f".attempted-{row['frame']}"
    if row["frame"] in FLAKY and not marker.exists():
        marker.touch()
        raise ConnectionError(f"archive dropped the connection while storing frame {row['frame']}")
    return row


@gx.task
def catalogue(rows: list) -> dict:
    """Everything that made it through; the failed frames arrive as exceptions."""
    good = [r for r in rows if isinstance(r, dict)]
    return {
        "frames": len(good),
        "lost": len(rows) - len(good),
        "stars": sum(r["stars"] for r in good),
        "background": float(np.mean([r["background"] for r in good])),
    }


def build(archive: Path) -> tuple[gx.Graph, gx.Node]:
    graph = gx.Graph("frame-pipeline")
    with graph:
        stored = []
        for i in range(FRAMES):
            frame = check(load(i), i)
            stored.append(store(measure(denoise(frame), i), str(archive)))
        result = catalogue(gx.allow_failure(stored))
    return graph, result


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for marker in out.glob(".attempted-*"):  # a fresh archive: the flaky frames fail again
        marker.unlink()
    graph, result = build(out)
    run = graph.compute(workers=2)  # a progress bar shows when stderr is a terminal
    print(run.summary())
    cat = run[result]
    print(
        f"\ncatalogue: {cat['frames']} frames, {cat['lost']} lost, {cat['stars']} stars, "
        f"mean background {cat['background']:.1f}"
    )
    retried = [n.name for n in run.nodes if run.state(n).attempts > 1]
    print(f"retried and then stored: {', '.join(retried)}")
    report = run.to_html(out / "report.html")
    picture = out / "graph.svg"
    try:
        graph.visualize(picture)
    except (ImportError, RuntimeError) as exc:  # graphviz missing: the report is still there
        print(f"no picture: {exc}")
    else:
        print(f"wrote {picture}")
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "out")))
