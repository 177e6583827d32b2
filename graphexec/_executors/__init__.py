"""Executors: where calls run (in-process, a process pool with its workers, a dask cluster).

The dask executor (``cluster``) loads on first use (PEP 562 ``__getattr__``):
only a compute with ``cluster=`` needs it, and ``import graphexec`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import cluster

__all__ = ["cluster"]


def __getattr__(name: str) -> Any:
    if name == "cluster":
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
