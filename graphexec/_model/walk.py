"""The one walk over call arguments: finding nodes, and replacing them.

Nodes are found inside lists, tuples, dicts (keys and values), sets,
frozensets and deques (up to NODE_DEPTH_MAX deep), and inside :class:`allow_failure` markers, which
mark what they hold. Building a graph finds them, and copies the containers
that hold them (:func:`take_nodes`);
running a call in-process fills in values (:func:`substitute`); a flow moves
calls between graphs (:func:`remap`) and resolves its return value
(:func:`replace_nodes`). Containers without nodes are returned as they are,
never copied.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable
from typing import Any

from .node import ALLOW, Node, allow_failure, call_site

# The containers searched for nodes (besides dicts): here, and in a plain call's check.
SEQUENCES = (list, tuple, set, frozenset, deque)
# Plain immutable values: they hold no node, need no copy, and pickle as they are
# (the hot paths of building a graph, encoding a call and handing a value over).
PLAIN = frozenset({int, float, complex, bool, str, bytes, type(None)})


def find_nodes(
    obj: Any,
    visit: Callable[[Node, int], None],
    flag: int,
    other: Callable[[Any], None] | None = None,
) -> None:
    """Call ``visit(node, flag)`` for every node inside ``obj``; ``allow_failure``
    adds :data:`ALLOW` to the flag of what it holds. ``other``, if given, is
    called with every value that is neither a node nor a container."""
    if isinstance(obj, Node):
        visit(obj, flag)
    elif type(obj) is allow_failure:
        find_nodes(obj.value, visit, flag | ALLOW, other)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            find_nodes(key, visit, flag, other)
            find_nodes(value, visit, flag, other)
    elif isinstance(obj, SEQUENCES):
        for value in obj:
            find_nodes(value, visit, flag, other)
    elif other is not None:
        other(obj)


def take_nodes(obj: Any, visit: Callable[[Node, int], None], flag: int) -> Any:
    """:func:`find_nodes` for a call being added: ``obj`` with every container that
    holds a node (at any depth) copied, so that changing the caller's list or
    dict afterwards changes neither the call's arguments nor its edges (a
    loop that appends to one list and passes it to each call). Containers
    without nodes are returned as they are, never copied.

    Raises:
        TypeError: a node nested more than :data:`NODE_DEPTH_MAX` containers deep
            (replacing it by its value, later, would go past Python's recursion
            limit), or an argument too deep to search at all, or that contains
            itself.
    """
    try:
        return _take(obj, visit, flag, 0)[0]
    except RecursionError:
        raise TypeError(
            "an argument nests containers deeper than Python's recursion limit, or "
            "contains itself: graphexec cannot search it for nodes. Flatten it, or make "
            "it inside a task (its result goes to the next task as it is)"
        ) from None


# Containers a node may be nested in, in an argument: its value replaces it by a walk
# that recurses (and pickle's own depth limit is a few hundred on the process pool)
NODE_DEPTH_MAX = 100


def _take(obj: Any, visit: Callable[[Node, int], None], flag: int, depth: int) -> tuple[Any, bool]:
    """(:func:`take_nodes` of ``obj``, whether it is or holds a node)."""
    if isinstance(obj, Node):
        if depth > NODE_DEPTH_MAX:
            _too_deep(obj, depth)
        visit(obj, flag)
        return obj, True
    if type(obj) is allow_failure:
        inner, held = _take(obj.value, visit, flag | ALLOW, depth)
        return (allow_failure(inner) if held else obj), held
    if isinstance(obj, dict):
        items: list[Any] = []
        held = False
        for key, value in obj.items():
            k, held_k = _take(key, visit, flag, depth + 1)
            v, held_v = _take(value, visit, flag, depth + 1)
            items.append((k, v))
            held = held or held_k or held_v
        return (rebuild(obj, items) if held else obj), held
    if isinstance(obj, SEQUENCES):
        items = []
        held = False
        for value in obj:
            if isinstance(value, Node):  # (inline: a list of nodes is the usual case)
                if depth >= NODE_DEPTH_MAX:
                    _too_deep(value, depth + 1)
                visit(value, flag)
                held = True
                items.append(value)
            else:
                v, held_v = _take(value, visit, flag, depth + 1)
                items.append(v)
                held = held or held_v
        if not held:
            return obj, False
        kind = type(obj)
        return (
            items if kind is list else tuple(items) if kind is tuple else rebuild(obj, items)
        ), True
    _refuse_hidden_node(obj)
    return obj, False


def _too_deep(node: Node, depth: int) -> None:
    raise TypeError(
        f"{node.name} is nested {depth} containers deep in an argument (at most "
        f"{NODE_DEPTH_MAX}): flatten the structure that holds it"
    )


def _refuse_hidden_node(obj: Any) -> None:
    """A node in a dataclass's fields (at any depth, in containers or dataclasses
    there) is not an edge: the sync and thread schedulers would hand the task the
    Node itself, the process pool fail to pickle it. Said at the call, the same
    for every backend. Only dataclasses are looked into (the usual config object;
    ``slots=True`` too): walking every object's attributes would make building
    slow."""
    if not hasattr(type(obj), "__dataclass_fields__") or isinstance(obj, type):
        return
    found = _hidden(obj, 0)
    if found is not None:
        node, path = found
        kind = type(obj).__name__
        raise TypeError(
            f"node {node.name!r} is inside a {kind} dataclass ({kind}{path}), used at "
            f"{call_site()}: only lists, tuples, dicts, sets and deques are searched for "
            f"nodes, so it would not be a dependency. Pass the node as an argument of its "
            f"own and build the {kind} inside the task"
        )


def _hidden(value: Any, depth: int) -> tuple[Node, str] | None:
    """A node in ``value`` (containers and dataclass fields), with the path to it."""
    if depth > 50:  # (a cycle)
        return None
    if isinstance(value, Node):
        return value, ""
    if type(value) is allow_failure:
        return _hidden(value.value, depth + 1)
    items: Any
    if isinstance(value, dict):
        items = (*value.keys(), *value.values())
    elif isinstance(value, SEQUENCES):
        items = value
    elif hasattr(type(value), "__dataclass_fields__") and not isinstance(value, type):
        for name in type(value).__dataclass_fields__:
            try:
                field = getattr(value, name)
            except Exception:  # a field not set (init=False), a property that raises
                continue
            found = _hidden(field, depth + 1)
            if found is not None:
                return found[0], f".{name}{found[1]}"
        return None
    else:
        return None
    for item in items:
        found = _hidden(item, depth + 1)
        if found is not None:
            return found[0], f"[...]{found[1]}"
    return None


def replace_nodes(obj: Any, replace: Callable[[Node], Any], keep_markers: bool = False) -> Any:
    """``obj`` with every node replaced by ``replace(node)``.

    ``keep_markers``: keep ``allow_failure`` wrappers (moving a call to another
    graph) instead of unwrapping them (filling in values).
    """
    if isinstance(obj, Node):
        return replace(obj)
    if type(obj) is allow_failure:
        inner = replace_nodes(obj.value, replace, keep_markers)
        return allow_failure(inner) if keep_markers else inner
    if isinstance(obj, dict):
        items = [
            (replace_nodes(k, replace, keep_markers), replace_nodes(v, replace, keep_markers))
            for k, v in obj.items()
        ]
        if all(a is k and b is v for (a, b), (k, v) in zip(items, obj.items())):
            return obj
        return rebuild(obj, items)
    if isinstance(obj, SEQUENCES):
        items = [replace_nodes(v, replace, keep_markers) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return rebuild(obj, items)
    return obj


def substitute(obj: Any, values: dict[int, Any]) -> Any:
    """``obj`` with each node replaced by ``values[node.index]``, markers unwrapped.

    Used by the in-process executors; the process pool does the same while
    unpickling (``_data/serialize.py``).
    """
    return replace_nodes(obj, lambda node: values[node.index])


def remap(obj: Any, mapping: dict[int, Node]) -> Any:
    """``obj`` with each node replaced by ``mapping[node.index]``, markers kept."""
    return replace_nodes(obj, lambda node: mapping[node.index], keep_markers=True)


def rebuild(obj: Any, items: list[Any]) -> Any:
    """A container of ``obj``'s type holding ``items`` (pairs for a dict)."""
    kind = type(obj)
    # A list of futures (gx.FutureList), once filled in with their values: a list.
    kind = getattr(kind, "_graphexec_values_as", kind)
    if hasattr(kind, "_fields"):  # namedtuple
        return kind(*items)
    if isinstance(obj, deque):  # its maxlen too (a subclass's: as unpickling gives it)
        try:
            return kind(items, obj.maxlen)
        except TypeError:
            return deque(items, obj.maxlen)
    if kind is not dict and isinstance(obj, dict):
        # A copy, refilled: Counter(pairs) would count the pairs, and defaultdict
        # takes its factory first. What unpickling gives the process pool's
        # workers: the type, its attributes (a default_factory), the new items.
        try:
            new = copy.copy(obj)
            new.clear()
            for key, value in items:
                new[key] = value
            return new
        except Exception:
            return dict(items)
    try:
        return kind(items)
    except TypeError:  # a subclass with another constructor: fall back to the base type
        for base in (dict, *SEQUENCES):
            if isinstance(obj, base):
                return base(items)
        raise
