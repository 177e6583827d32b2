"""Reports on a finished run: JSON for tools, one self-contained HTML page, the graph drawn.

::

    Run ──run_to_dict──> dict ──json──> text ──run_from_json──> LoadedRun (a Run)
     │                     │
     │                     └──run_to_html──> report.html: summary table, per-worker
     │                                       timeline (inline SVG drawn by inline JS)
    Graph (+ its latest Run) ──visualize──> .dot / .svg / .png through graphviz

``codec`` writes and reads the JSON document, ``html`` fills the page from
the files in ``templates/`` (package data), ``graphviz`` draws the picture,
and ``states`` holds the one palette the page and the picture share.
"""

from .codec import run_from_json, run_to_json
from .graphviz import visualize
from .html import run_to_html
from .states import STATE_COLOURS, STATE_FILLS

__all__ = [
    "STATE_COLOURS",
    "STATE_FILLS",
    "run_from_json",
    "run_to_html",
    "run_to_json",
    "visualize",
]
