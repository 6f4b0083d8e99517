"""Child side of ``pool.map``: apply a function over one chunk of items in one request.

A chunk is an ordinary ``call`` of :func:`apply_chunk` by its dotted path, so mapping adds no op to
the wire and each chunk runs in its session like any call (order, session state, ``session_init``).
One request per chunk instead of one per item is what makes a map of tiny functions cheap.

Items, and results, travel as one pickle of builtin values when they are only that
(:func:`~poolbridge._protocol.dumps_builtins`), else as a list through the value codec.
"""

from __future__ import annotations

import itertools
import pickle
import time
from typing import Any

from ._paths import resolve_path
from ._protocol import default_lifter, dumps_builtins
from ._wire import error_fields
from ._worker import active_core

__all__ = ["apply_chunk"]


def apply_chunk(fn: Any, payload: list[Any] | bytes, star: bool, big: bool = False) -> list[Any]:
    """``[results, error or None, seconds]``: ``fn`` over ``items`` in order, stopping at the first
    exception, whose error fields (as in an error reply) follow the results of the items before it.

    ``payload`` is the list of items, or its pickle (embedded pools only). The results are a list, or
    its pickle when they pickle as builtins — at any size if ``big`` (the caller takes a big
    pickle: it does not ask for zero-copy views), else only below the shared-memory threshold
    (no buffer in them is then big enough to be sent as a segment).
    """
    core = active_core()
    if isinstance(fn, str):
        fn = core._callable(fn) if core is not None else resolve_path(fn)
    wire = core is not None and core.wire
    if isinstance(payload, list):
        items = payload
    elif wire:  # a Port client's bytes are never unpickled
        raise TypeError(f"apply_chunk takes a list of items, not {type(payload).__name__}")
    else:
        items = pickle.loads(payload)
    out: list[Any] = []
    error = None
    started = time.perf_counter()
    try:
        # list.extend over map() keeps the items appended before an exception: the results of the
        # items that ran are not lost, and the loop runs in C.
        out.extend(itertools.starmap(fn, items) if star else map(fn, items))
    except Exception as exc:
        error = error_fields(exc)
    seconds = time.perf_counter() - started
    if not wire:
        packed = dumps_builtins(out)
        lifter = default_lifter[0]
        if packed is not None and (big or lifter is None or len(packed) < lifter.threshold):
            return [packed, error, seconds]
    return [out, error, seconds]
