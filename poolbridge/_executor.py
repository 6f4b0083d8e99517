"""Parent side: :class:`Pool` as a ``concurrent.futures.Executor`` — ``shutdown`` and cancelling
what has not started. ``submit`` and ``map`` live with the other operations (_pool.py, _mapping.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import TYPE_CHECKING, cast

from ._calls import PoolFuture
from ._mapengine import cancel_runs

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["ExecutorFace", "cancel_not_started"]


def cancel_not_started(pool: Pool) -> int:
    """Cancel every submitted call (sync futures and asyncio awaits) that its worker has not
    started, and every map of the pool; returns how many calls were cancelled. Calls already running
    are left to finish."""
    cancel_runs(pool)
    cancelled = 0
    for ch in pool._supervisor.channels():
        if ch is None:
            continue
        for sink in list(ch.pending.values()):
            if isinstance(sink, PoolFuture):
                cancelled += sink.cancel()
            else:
                future = getattr(sink, "future", None)
                if isinstance(future, asyncio.Future):
                    # Cancelling the asyncio future reaches the worker (its done callback in
                    # _aio.py), on the loop's own thread.
                    future.get_loop().call_soon_threadsafe(future.cancel)
                    cancelled += 1
    return cancelled


class ExecutorFace(concurrent.futures.Executor):
    """What makes a pool a ``concurrent.futures.Executor`` beyond ``submit`` and ``map``."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the pool, as ``Executor.shutdown``.

        ``cancel_futures=True`` first cancels every call (and map) not yet started in its worker;
        calls already running finish. ``wait=False`` returns at once: new calls are refused from
        here on, and the workers stop once they have finished. Idempotent.
        """
        pool = cast("Pool", self)
        if cancel_futures:
            cancel_not_started(pool)
        if wait:
            pool.close()
            return
        if pool.closed:
            return
        closer = threading.Thread(target=pool.close, name="poolbridge-shutdown")
        closer.start()
        # Pool.close refuses new calls as its first step; return once that has happened.
        while not pool.closed and closer.is_alive():
            closer.join(0.001)
