"""Which nodes run (culling) and in what order (priorities), computed once per compute.

One iterative depth-first walk from the targets, dependencies in argument
order, numbering nodes in post-order. The numbering is a topological order
and a priority: with ties broken by it, the scheduler finishes one target's
subtree before starting the next, so intermediates are consumed (and
released) soon after they are made — dask's ``order.py`` aims for the same
with more effort. Nodes the walk never reaches are not ancestors of a target
and are culled. Cost O(nodes + edges); no recursion, so a 100,000-long chain
is fine.
"""

from __future__ import annotations


def sinks(deps: list[tuple[int, ...]]) -> list[int]:
    """Nodes nothing depends on, in creation order: the graph's outputs."""
    used = bytearray(len(deps))
    for ups in deps:
        for up in ups:
            used[up] = 1
    return [i for i, flag in enumerate(used) if not flag]


def post_order(deps: list[tuple[int, ...]], targets: list[int]) -> list[int]:
    """Every ancestor of ``targets`` (and the targets), dependencies first."""
    seen = bytearray(len(deps))
    order: list[int] = []
    for target in targets:
        if seen[target]:
            continue
        seen[target] = 1
        stack = [(target, iter(deps[target]))]
        while stack:
            node, pending = stack[-1]
            for up in pending:
                if not seen[up]:
                    seen[up] = 1
                    stack.append((up, iter(deps[up])))
                    break
            else:
                stack.pop()
                order.append(node)
    return order
