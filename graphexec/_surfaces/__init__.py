"""The surfaces users call: compute, flows and futures, the public Pool, progress, reports.

Importing this package fills the model's seam (``_model/seam.py``), the one
door through which ``Graph.compute``, ``Graph.visualize``, ``Run.to_html``,
the notebook views (``_repr_html_``) and task calls in a flow reach the
layers that carry them out.

Its modules load on first use, not with the package (PEP 562 ``__getattr__``
below): ``import graphexec`` stays fast, and so does a worker's start (a
worker imports the package but never computes, draws or reports). The seam's
entries are small functions that reach their module through this package's
attributes when first called.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from .._model.seam import NOT_EAGER
from .._model.seam import surfaces as _seam

if TYPE_CHECKING:
    from . import (
        backends,
        compute,
        eager,
        flow,
        hooks,
        notebook,
        options,
        pool,
        progress,
        record,
        replay,
        report,
    )

__all__ = [
    "backends",
    "compute",
    "eager",
    "flow",
    "hooks",
    "notebook",
    "options",
    "pool",
    "progress",
    "record",
    "replay",
    "report",
]

# The modules of this package that load when first used (an attribute of the
# package): those it lists, and the CLI's and the signal handling's.
_MODULES = frozenset({*__all__, "cli", "signals"})


def __getattr__(name: str) -> Any:
    # PEP 562: called only for names not yet set; importing the submodule binds it
    # as this package's attribute, so this runs once per module.
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_this: Any = sys.modules[__name__]


def _compute(*args: Any, **kwargs: Any) -> Any:
    if f"{__name__}.compute" not in sys.modules:
        # The first compute: the workers' forkserver starts before the scheduler
        # loads, and boots while it does (in a fresh interpreter, most of the wait).
        _this.backends.start_early(kwargs)
    return _this.compute.compute(*args, **kwargs)


def _call_eagerly(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # A plain task call outside ``with graph:`` (and in every worker, a task calling
    # another): only a flow makes it eager, and flows live in ``eager``, so while
    # that module is not loaded no flow can be running.
    if f"{__name__}.eager" not in sys.modules:
        return NOT_EAGER
    return _this.eager.call_eagerly(task, args, kwargs)


def _submit(*args: Any, **kwargs: Any) -> Any:
    return _this.eager.submit(*args, **kwargs)


def _future_list(*args: Any, **kwargs: Any) -> Any:
    return _this.eager.future_list(*args, **kwargs)


def _late(module: str, name: str) -> Any:
    # A seam entry that reaches ``module.name`` when first called, not at import.
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(getattr(_this, module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


_seam.install(
    compute=_compute,
    visualize=_late("report", "visualize"),
    run_to_json=_late("report", "run_to_json"),
    run_from_json=_late("report", "run_from_json"),
    run_to_html=_late("report", "run_to_html"),
    call_eagerly=_call_eagerly,
    submit=_submit,
    future_list=_future_list,
    run_html=_late("notebook", "run_html"),
    graph_html=_late("notebook", "graph_html"),
    state_html=_late("notebook", "state_html"),
    run_inputs=_late("replay", "run_inputs"),
    run_replay=_late("replay", "run_replay"),
    replay_hint=_late("replay", "replay_hint"),
    run_save=_late("record", "save_run"),
    run_load=_late("record", "load_run"),
)
