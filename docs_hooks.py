"""MkDocs hook (mkdocs.yml ``hooks:``): a public name without a docstring fails the build.

mkdocstrings renders an undocumented name as a bare signature, silently; so
before building, this hook walks ``graphexec.__all__`` — each name, and each
public method and property of each public class — and logs a warning for
every one without a docstring of its own, which ``mkdocs build --strict``
turns into a failure.
"""

from __future__ import annotations

import inspect
import logging
from types import ModuleType
from typing import Any

import graphexec

# A logger under "mkdocs": its warnings count towards --strict.
log = logging.getLogger("mkdocs.hooks.docstrings")


def _has_doc(obj: Any) -> bool:
    if isinstance(obj, type):
        # A class's __doc__ is its own, never inherited: None when missing.
        return bool(obj.__dict__.get("__doc__"))
    return bool(getattr(obj, "__doc__", None))


def _members(cls: type) -> list[tuple[str, Any]]:
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            members.append((name, value))
    return members


def undocumented(module: ModuleType) -> list[str]:
    """The public names of ``module`` (its ``__all__``) that lack a docstring.

    Args:
        module: a module with ``__all__``.

    Returns:
        Dotted names such as ``graphexec.Run.summary``, in ``__all__`` order.
    """
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        qualified = f"{module.__name__}.{name}"
        if not _has_doc(obj):
            missing.append(qualified)
        if isinstance(obj, type):
            missing += [f"{qualified}.{m}" for m, value in _members(obj) if not _has_doc(value)]
    return missing


def on_pre_build(config: Any) -> None:
    """Warn about every public graphexec name without a docstring (fails --strict).

    Args:
        config: the MkDocs configuration (unused).
    """
    for name in undocumented(graphexec):
        log.warning("%s has no docstring: the reference would show it bare", name)
