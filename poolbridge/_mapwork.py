"""Child side of ``pool.map``: apply a function over one chunk of items in one request.

A chunk is an ordinary ``call`` of :func:`apply_chunk` by its dotted path, so mapping adds no op to
the wire and each chunk runs in its session like any call (order, session state, ``session_init``).
One request per chunk instead of one per item is what makes a map of tiny functions cheap.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from ._paths import resolve_path
from ._wire import error_fields
from ._worker import active_core

__all__ = ["apply_chunk"]


def apply_chunk(fn: Any, items: list[Any], star: bool) -> list[Any]:
    """``[results, error or None, seconds]``: ``fn`` over ``items`` in order, stopping at the first
    exception, whose error fields (as in an error reply) follow the results of the items before it.
    """
    if isinstance(fn, str):
        core = active_core()
        fn = core._callable(fn) if core is not None else resolve_path(fn)
    out: list[Any] = []
    error = None
    started = time.perf_counter()
    try:
        # list.extend over map() keeps the items appended before an exception: the results of the
        # items that ran are not lost, and the loop runs in C.
        out.extend(itertools.starmap(fn, items) if star else map(fn, items))
    except Exception as exc:
        error = error_fields(exc)
    return [out, error, time.perf_counter() - started]
