"""The one door from the model up to the layers that run things.

Users call ``graph.compute()``, ``graph.visualize()``, ``run.to_html()``, and
tasks inside a flow; what carries those out lives in the surfaces, above the
model. Rather than import upward (a cycle hidden in function bodies), the
model calls through :data:`surfaces`, a table of functions that the surfaces
layer fills in when ``graphexec`` is imported (``_surfaces/__init__.py``).
Importing any part of graphexec imports the package first, so the table is
always filled before a user can reach it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _missing(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("graphexec's surfaces are not installed; import graphexec first")


# What an eager call returns when there is no flow or pool to run it in.
NOT_EAGER: Any = object()


class Surfaces:
    """The functions the model delegates to; each is replaced by ``install``."""

    __slots__ = (
        "call_eagerly",
        "compute",
        "future_list",
        "graph_html",
        "replay_hint",
        "run_from_json",
        "run_html",
        "run_inputs",
        "run_load",
        "run_replay",
        "run_save",
        "run_to_html",
        "run_to_json",
        "state_html",
        "submit",
        "visualize",
    )

    def __init__(self) -> None:
        #: ``compute(graph, targets, **options) -> Run``: ``Graph.compute``.
        self.compute: Callable[..., Any] = _missing
        #: ``visualize(graph, path, **options)``: ``Graph.visualize``.
        self.visualize: Callable[..., Any] = _missing
        #: ``Run.to_json``, ``Run.from_json``, ``Run.to_html``.
        self.run_to_json: Callable[..., Any] = _missing
        self.run_from_json: Callable[..., Any] = _missing
        self.run_to_html: Callable[..., Any] = _missing
        #: ``Run.inputs``, ``Run.replay``, ``Run.save``, ``Run.load``, and the last line
        #: of ``GraphFailed``'s message (``replay_hint(run, i)``): ``_surfaces/replay.py``.
        self.run_inputs: Callable[..., Any] = _missing
        self.run_replay: Callable[..., Any] = _missing
        self.run_save: Callable[..., Any] = _missing
        self.run_load: Callable[..., Any] = _missing
        self.replay_hint: Callable[..., Any] = _missing
        #: ``call_eagerly(task, args, kwargs)``: a plain task call inside a flow runs
        #: there and returns its value (or State); elsewhere it returns NOT_EAGER.
        self.call_eagerly: Callable[..., Any] = _missing
        #: ``submit(task, args, kwargs) -> Future``: ``task.submit`` in a flow or pool.
        self.submit: Callable[..., Any] = _missing
        #: ``future_list(futures)``: what ``task.map`` returns in a flow or pool block.
        self.future_list: Callable[..., Any] = _missing
        #: ``Run._repr_html_``, ``Graph._repr_html_``, ``State._repr_html_``: how
        #: each shows in a Jupyter notebook (``_surfaces/notebook.py``).
        self.run_html: Callable[..., Any] = _missing
        self.graph_html: Callable[..., Any] = _missing
        self.state_html: Callable[..., Any] = _missing

    def install(self, **functions: Callable[..., Any]) -> None:
        """Fill in the table (the surfaces layer, once, at import)."""
        for name, fn in functions.items():
            setattr(self, name, fn)


surfaces = Surfaces()
