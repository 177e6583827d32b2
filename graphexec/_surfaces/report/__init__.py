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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .codec import run_from_json, run_to_json
from .states import STATE_COLOURS, STATE_FILLS

if TYPE_CHECKING:
    from .graphviz import visualize
    from .html import run_to_html

# Loaded on first use (PEP 562, as the surfaces package does): a run's record needs
# only the codec, and the page's and the picture's modules (html, importlib's
# resources) cost the first compute of a fresh interpreter about 5 ms.
_LATE = {"visualize": "graphviz", "run_to_html": "html"}


def __getattr__(name: str) -> Any:
    module = _LATE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "STATE_COLOURS",
    "STATE_FILLS",
    "run_from_json",
    "run_to_html",
    "run_to_json",
    "visualize",
]
