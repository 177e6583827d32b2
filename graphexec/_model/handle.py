"""What the model knows of a value that lives outside this process's heap.

A node's value may still be a worker's pickle, in a pipe's bytes, in shared
memory or in a cache file (the data plane's ``Payload``). States and runs
hold such a value as a :class:`Deferred` and ask it for the object only when
the user reads it, so the model never imports the data plane.
"""

from __future__ import annotations

from typing import Any


class Deferred:
    """A value to be loaded on demand; the data plane's ``Payload`` is the one kind."""

    __slots__ = ()

    def load(self) -> Any:
        """The value (unpickled at most once)."""
        raise NotImplementedError

    def discard(self, recycle: bool = True) -> None:
        """Give up what the value holds outside this process's heap."""

    def settle(self) -> None:
        """Make a value that is still read independent of outside memory (a run's end)."""


def materialize(handle: Any) -> Any:
    """The value behind a handle: a :class:`Deferred` is loaded, anything else is the value."""
    if isinstance(handle, Deferred):
        return handle.load()
    return handle


def discard(handle: Any) -> None:
    """Free what a released handle holds outside this process's heap."""
    if isinstance(handle, Deferred):
        handle.discard()
