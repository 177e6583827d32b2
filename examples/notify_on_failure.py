"""Be told when a sweep fails overnight: each failure is posted as JSON to a webhook.

    python examples/notify_on_failure.py https://hooks.example.com/T000/B000

A task hook (``on_failure``) posts one message per failed node as soon as
its last attempt failed; a run hook (``on_failure`` of ``compute``) posts
a summary when the sweep ends with failures. Both run in this process, on
graphexec's hook thread: a slow webhook delays neither the sweep nor its
timeouts, and ``compute`` waits for the posts before it returns or raises
(up to ``GRAPHEXEC_HOOK_WAIT`` seconds), so none is lost when the script
exits right after. The script exits with status 1 when something failed.
"""

from __future__ import annotations

import json
import sys
import urllib.request

import graphexec as gx

posted = []


def post(url: str, message: dict) -> None:
    """POST ``message`` as JSON; a webhook that is down is the hook's problem, logged."""
    request = urllib.request.Request(
        url,
        data=json.dumps(message).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def make_hooks(url: str):
    def node_failed(node: gx.Node, state: gx.State) -> None:
        post(
            url,
            {
                "event": "node_failed",
                "node": node.name,
                "error": f"{type(state.exception).__name__}: {state.exception}",
                "attempts": state.attempts,
            },
        )
        posted.append(node.name)

    def run_failed(run: gx.Run) -> None:
        post(
            url,
            {
                "event": "run_failed",
                "graph": run.graph.name,
                "failed": len(run.failed),
                "completed": len(run.completed),
                "summary": run.summary(),
            },
        )

    return node_failed, run_failed


DIVERGING = {3, 6}  # the seeds this toy simulation cannot handle


@gx.task
def simulate(seed: int) -> float:
    if seed in DIVERGING:
        raise ValueError(f"seed {seed} diverged")
    return seed / 10


def main(url: str) -> int:
    node_failed, run_failed = make_hooks(url)
    watched = simulate.with_options(on_failure=[node_failed])
    graph = gx.Graph("sweep")
    with graph:
        results = [watched(seed) for seed in range(10)]
    try:
        graph.compute(*results, workers=2, on_failure=[run_failed])
    except gx.GraphFailed as failed:
        print(failed.run.summary())
        print(f"{len(posted)} failure(s) posted to {url}")
        return 1
    print("no failures")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/notify_on_failure.py WEBHOOK_URL")
    sys.exit(main(sys.argv[1]))
