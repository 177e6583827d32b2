"""The state colours and words shared by the JSON counts, the HTML page and the picture."""

from __future__ import annotations

from ..._model.state import (
    CACHED,
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    SKIPPED,
)

# One palette for the page and the picture: green done, blue cached, red failed,
# grey skipped/cancelled, violet running (cut off mid-run), amber for failed
# attempts that were retried.
STATE_COLOURS = {
    COMPLETED: "#3f9b5f",
    CACHED: "#4a7fc1",
    FAILED: "#d64545",
    SKIPPED: "#b8bec6",
    CANCELLED: "#7c8591",
    RUNNING: "#8a63c9",
    PENDING: "#ffffff",
}
RETRY_COLOUR = "#f0a030"
# Light fills for graph nodes, so that black text stays readable.
STATE_FILLS = {
    COMPLETED: "#cdebd6",
    CACHED: "#d3e3f6",
    FAILED: "#f6c9c9",
    SKIPPED: "#eceef1",
    CANCELLED: "#dadde2",
    RUNNING: "#e3d8f5",
    PENDING: "#ffffff",
}
STATE_WORDS = {
    COMPLETED: "ok",
    CACHED: "cached",
    FAILED: "failed",
    SKIPPED: "skipped",
    CANCELLED: "cancelled",
    RUNNING: "running",
    PENDING: "not run",
}


def state_css() -> str:
    """The states' colours as CSS variables for the HTML page (report.css reads
    ``--ok``, ``--failed``, ... by the states' words), from the palette above; a
    pending node's dot is drawn in the page's line grey, its colour being white."""
    colours = [f"--{STATE_WORDS[s]}:{c}" for s, c in STATE_COLOURS.items() if s != PENDING]
    return ":root{" + ";".join([*colours, f"--retry:{RETRY_COLOUR}"]) + "}\n"
