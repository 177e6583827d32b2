"""Keep what a node that ended Failed received, for ``run.inputs`` and ``run.replay``.

Called on the scheduler's thread once per failed node (never on a success),
before the node's inputs are released: a worker's value is copied out of
shared memory here, while its segments are still the run's. What a call
received that never passed through this process — a chained value held by a
worker — comes back with the failure (``Gone`` if the worker died with it,
see ``_executors/protocol.py``). The bytes kept per run are capped
(``Run._inputs_cap``, ``compute(keep_inputs=...)``); a call over the cap is
recorded as dropped.
"""

from __future__ import annotations

import logging
from typing import Any

from .._data.kept import (
    DEFAULT_CAP,
    KeptCall,
    cap_from_env,
    copy_payload,
    pickle_value,
    source_hash,
)
from .._data.serialize import Payload, dumps_call
from .._executors.protocol import HELD, Call, Gone
from .._model.handle import Deferred, materialize
from .._model.run import Run
from .._model.sizes import size_text

logger = logging.getLogger("graphexec")


def keep_failed(run: Run, call: Call, inputs: dict[int, Any], remote: bool = False) -> None:
    """Record the arguments ``call`` received (its node ended Failed).

    ``remote``: the executor's values stay where they were made (a dask
    cluster): its handles are references, so the values are fetched now.
    """
    kept = KeptCall()
    run._inputs[call.node] = kept
    hashes = run._source_hashes  # (the graph holds the function: its id stays its own)
    if id(call.fn) not in hashes:
        hashes[id(call.fn)] = source_hash(call.fn)
    kept.source_hash = hashes[id(call.fn)]
    cap = run._inputs_cap
    if cap is None:
        try:
            cap = cap_from_env()
        except ValueError as exc:
            logger.warning("%s; keeping inputs up to the default", exc)
            cap = DEFAULT_CAP
        run._inputs_cap = cap
    if cap <= 0:
        kept.dropped = "keeping inputs is turned off (keep_inputs=0 or GRAPHEXEC_KEEP_INPUTS=0)"
        return
    names = run.graph._names
    size = 0
    payloads: dict[int, Payload] = {}
    pickled: dict[int, bytes] = {}
    for up, handle in inputs.items():
        if handle is HELD:
            kept.lost[up] = (
                f"the value of {names[up]} went from one call to the next inside a worker "
                "(a chain), and that worker stopped (crashed or was killed) holding it"
            )
            continue
        if type(handle) is Gone:
            kept.lost[up] = handle.why
            continue
        if type(handle) is Payload and not remote:
            payloads[up] = handle
            if up not in run._kept_values:  # else shared with another failed node
                size += handle.nbytes
            continue
        if isinstance(handle, Deferred):  # a value on a dask cluster: fetched now
            try:
                handle = materialize(handle)
            except Exception as exc:
                kept.lost[up] = f"the value of {names[up]} could not be fetched: {exc}"
                continue
        try:
            blob = pickled[up] = pickle_value(handle, remote)
        except Exception:  # an in-process run handed over an unpicklable object
            kept.live[up] = handle
            continue
        size += len(blob)
    args: bytes | None = None
    try:
        args = dumps_call(call.args, call.kwargs, call.has_nodes)
        size += len(args)
    except Exception:
        kept.live_args = (call.args, call.kwargs)
    if run._inputs_bytes + size > cap:
        kept.live.clear()
        kept.live_args = None
        kept.dropped = (
            f"its inputs ({size_text(size)}) would take the inputs kept by this run past "
            f"the cap of {size_text(cap)} (compute(keep_inputs=...) or GRAPHEXEC_KEEP_INPUTS)"
        )
        return
    shared = run._kept_values
    for up, payload in payloads.items():
        value = shared.get(up)
        if value is None:
            try:
                value = shared[up] = copy_payload(payload)
            except (OSError, ValueError) as exc:
                kept.lost[up] = f"the value of {names[up]} could not be read back: {exc}"
                continue
        kept.values[up] = value
    for up, blob in pickled.items():
        kept.values[up] = (blob, [])
    kept.args = args
    kept.nbytes = size
    run._inputs_bytes += size
