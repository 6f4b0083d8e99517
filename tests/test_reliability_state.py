"""Worker-side state follows the caller's handles: nothing a caller gave up on, dropped or closed
stays behind in a worker, and nothing comes back to life."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from pb_faultmods import Fifo, wait_until

import poolbridge
from poolbridge import CallTimeoutError, SessionMismatchError
from poolbridge import _testing as testing

WAIT = 30.0


# -- close_session is final ------------------------------------------------------------------------


def test_a_ref_dropped_after_close_session_does_not_bring_the_session_back(pool_maker: Any) -> None:
    pool = pool_maker(workers=1)
    pool.options(session="keep").call("operator.add", 1, 2)
    ref = pool.options(session="gone").create("collections.Counter")
    assert pool.close_session("gone") == 1
    del ref  # its release is queued, and sent with the next request
    gc.collect()
    pool.options(session="keep").call("operator.add", 1, 2)
    assert pool.stats().sessions == 1


def test_operations_on_an_unknown_session_do_not_create_it(pool_maker: Any) -> None:
    pool = pool_maker(workers=1)
    ref = pool.options(session="gone").create("collections.Counter")
    stream = pool.options(session="gone", batch=1).stream("builtins.range", 10)
    assert next(stream) == 0
    pool.close_session("gone")
    assert pool.close_session("gone") == 0
    with pytest.raises(poolbridge.RefNotFoundError):
        ref.call("most_common")
    with pytest.raises(poolbridge.RefNotFoundError):
        ref.setattr("x", 1)
    with pytest.raises(poolbridge.RefNotFoundError):
        ref.release()
    with pytest.raises(poolbridge.RefNotFoundError):
        list(stream)
    assert pool.stats().sessions == 0


# -- an abandoned async stream ---------------------------------------------------------------------


async def test_an_abandoned_async_stream_is_closed_in_its_worker(pool_maker: Any) -> None:
    pool = pool_maker(workers=1)
    aio = pool.aio
    async for _ in aio.options(session="s", batch=2).stream("builtins.range", 100):
        break
    gc.collect()
    assert (await aio.stats()).streams == 0


# -- replies to calls given up on ------------------------------------------------------------------


@pytest.mark.parametrize("face", ["call", "submit", "aio"])
async def test_a_timed_out_create_releases_its_object(pool_maker: Any, fifo: Fifo, face: str) -> None:
    pool = pool_maker(workers=1)
    api = pool.options(timeout=0.2, session="s")
    with pytest.raises(CallTimeoutError, match=r"within 0\.2s"):
        if face == "call":
            api.create("pb_reliabilitymods.blocked_then", fifo.path, "made")
        elif face == "submit":
            api.options(ret="ref").submit("pb_reliabilitymods.blocked_then", fifo.path, "made").result(timeout=WAIT)
        else:
            aio = pool.aio.options(timeout=0.2, session="s")
            await aio.create("pb_reliabilitymods.blocked_then", fifo.path, "made")
    fifo.release()
    # The late reply is read, its ref released: stats() sends what dropped handles queued.
    wait_until(lambda: pool.stats().refs == 0 and pool.stats().in_flight == 0, WAIT, what="the late ref released")


def test_a_timed_out_stream_open_closes_its_stream(pool_maker: Any, fifo: Fifo) -> None:
    pool = pool_maker(workers=1)
    with pytest.raises(CallTimeoutError):
        pool.options(timeout=0.2, session="s", batch=2).stream("pb_reliabilitymods.gen_after_fifo", fifo.path, 10)
    fifo.release()
    wait_until(lambda: pool.stats().streams == 0 and pool.stats().in_flight == 0, WAIT, what="the late stream closed")


async def test_a_cancelled_await_releases_what_its_call_made(pool_maker: Any, fifo: Fifo) -> None:
    import asyncio

    pool = pool_maker(workers=1)
    task = asyncio.ensure_future(pool.aio.options(session="s").create("pb_reliabilitymods.blocked_then", fifo.path, 1))
    await asyncio.sleep(0)  # let the task send its request
    wait_until(lambda: len(testing.channels(pool)[0].pending) == 1, WAIT, what="the create sent")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fifo.release()
    wait_until(lambda: pool.stats().refs == 0 and pool.stats().in_flight == 0, WAIT, what="the late ref released")


# -- misuse gets poolbridge's own errors -------------------------------------------------------------


def test_a_ref_of_another_pool_is_a_session_mismatch(pool_maker: Any) -> None:
    a, b = pool_maker(workers=1), pool_maker(workers=1)
    ref = a.create("collections.Counter", "xyz")
    with pytest.raises(SessionMismatchError, match="belongs to another pool"):
        b.method(ref, "most_common")
    with pytest.raises(SessionMismatchError, match="belongs to another pool"):
        b.call("builtins.len", ref)
    with pytest.raises(ValueError, match="another pool"):  # still a ValueError, as before
        b.call("builtins.len", [ref])
    assert a.call("builtins.len", ref) == 3


def test_a_missing_module_is_named(pool_maker: Any) -> None:
    pool = pool_maker(workers=1)
    with pytest.raises(ModuleNotFoundError, match="no module named 'nosuchmodule' could be imported"):
        pool.call("nosuchmodule.fn")
    with pytest.raises(AttributeError, match="nosuch"):
        pool.call("math.nosuch")
    assert pool.call("len", "abc") == 3  # a bare builtin name still works
