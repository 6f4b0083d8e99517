"""Values the pool will not carry fail their own call, typed, before anything hangs; a reader
thread never dies of a bad frame; a timeout bounds the whole call, writing included."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from pb_faultmods import Fifo, wait_until

import poolbridge
from poolbridge import CallTimeoutError, FrameTooLargeError, Ref, ValueTooLargeError, WorkerCrashedError
from poolbridge import _testing as testing

WAIT = 30.0
SMALL = 1 << 16  # a pool bound that keeps these tests cheap (Pool(max_value_bytes=...))


# -- an argument over the limit ------------------------------------------------------------------


def test_an_argument_over_the_bound_fails_at_once_and_the_slot_serves(pool_maker: Any) -> None:
    # There is no default bound (tests/test_large_values.py sends values past the old 256 MiB).
    pool = pool_maker(workers=1, max_value_bytes=SMALL)
    big = b"y" * (SMALL + 1)
    with pytest.raises(ValueTooLargeError, match=f"max_value_bytes of {SMALL} bytes") as info:
        pool.options(timeout=WAIT).call("builtins.len", big)
    assert isinstance(info.value, FrameTooLargeError)
    assert "0.0625 MiB" in str(info.value) and "nothing was sent" in str(info.value)
    assert pool.stats().in_flight == 0  # no request left without an answer
    assert pool.call("operator.add", 1, 2) == 3


async def test_over_the_limit_fails_every_face_before_sending(pool_maker: Any) -> None:
    pool = pool_maker(workers=1, max_value_bytes=SMALL)
    big = b"y" * (SMALL + 1)
    with pytest.raises(FrameTooLargeError):
        pool.submit("builtins.len", big)
    with pytest.raises(FrameTooLargeError):
        pool.create("builtins.bytearray", big)
    with pytest.raises(FrameTooLargeError):
        await pool.aio.call("builtins.len", big)
    assert pool.stats().in_flight == 0
    assert pool.submit("builtins.len", b"y" * (SMALL // 2)).result(timeout=WAIT) == SMALL // 2


# -- a result over the limit ---------------------------------------------------------------------


def test_a_result_over_the_bound_is_an_error_or_a_ref_and_the_slot_serves(pool_maker: Any) -> None:
    pool = pool_maker(workers=1, max_value_bytes=SMALL)
    size = SMALL + 1
    ref = pool.submit("builtins.bytes", size).result(timeout=WAIT)  # ret="auto": kept as a ref
    assert isinstance(ref, Ref)
    # Through submit the slot's reader thread read that reply: later futures still complete.
    assert pool.submit("builtins.len", ref).result(timeout=WAIT) == size
    ref.release()


async def test_a_result_over_the_limit_on_every_face(pool_maker: Any) -> None:
    pool = pool_maker(workers=1, max_value_bytes=SMALL)
    with pytest.raises(FrameTooLargeError, match="the result encodes to"):
        pool.options(ret="value").call("builtins.bytes", SMALL)
    with pytest.raises(FrameTooLargeError):
        pool.options(ret="value").submit("builtins.bytes", SMALL).result(timeout=WAIT)
    assert isinstance(pool.call("builtins.bytes", SMALL), Ref)
    with pytest.raises(FrameTooLargeError):
        await pool.aio.options(ret="value").call("builtins.bytes", SMALL)
    with pytest.raises(FrameTooLargeError, match="smaller batch"):
        list(pool.options(batch=4).stream("itertools.repeat", b"z" * (SMALL // 2), 8))
    assert await pool.aio.call("operator.add", 1, 2) == 3
    assert pool.stats().streams == 0  # the stream whose batch could not be sent was closed


def test_a_reply_the_reader_cannot_read_fails_only_its_own_call(pool_maker: Any) -> None:
    """The router's reader meets a reply over its limit (here: a worker allowed larger replies):
    that one call fails, typed; the reader goes on serving the slot."""
    pool = pool_maker(workers=1, max_value_bytes=1 << 20)
    testing.channels(pool)[0]._frames.max_frame = SMALL
    with pytest.raises(FrameTooLargeError):
        pool.submit("builtins.bytes", SMALL * 2).result(timeout=WAIT)
    assert pool.submit("operator.add", 1, 2).result(timeout=WAIT) == 3
    assert pool.call("operator.add", 2, 2) == 4


def test_a_frame_that_is_not_a_reply_never_kills_the_reader(pool_maker: Any) -> None:
    """Garbage on a reply pipe cannot be matched to a request: the worker is treated as crashed
    (its calls fail, the slot restarts) — never a dead reader and futures that hang."""
    pool = pool_maker(workers=1)
    future = pool.submit("pb_reliabilitymods.write_garbage_reply")
    try:
        assert future.result(timeout=WAIT) == "after the garbage"
    except WorkerCrashedError:
        pass
    wait_until(lambda: pool.stats().slots[0].restarts == 1, WAIT, what="the slot restarted")
    assert pool.submit("operator.add", 1, 2).result(timeout=WAIT) == 3


# -- timeouts --------------------------------------------------------------------------------------


def test_a_timeout_names_the_configured_timeout(pool_maker: Any, fifo: Fifo) -> None:
    pool = pool_maker(workers=1)
    with pytest.raises(CallTimeoutError, match=r"within 0\.2s \(slot 0\)"):
        pool.options(timeout=0.2).call("pb_faultmods.wait_fifo", fifo.path)
    fifo.release()
    assert pool.call("operator.add", 1, 2) == 3


def test_a_timeout_bounds_writing_a_large_argument(pool_maker: Any, fifo: Fifo) -> None:
    """The worker is busy, so a 4 MiB argument cannot all go into its pipe: the caller still gets
    its CallTimeoutError, the half-written frame is finished off its thread, and the slot serves."""
    pool = pool_maker(workers=1, shm_threshold=None)  # through the pipe (not shared memory)
    busy = pool.submit("pb_faultmods.wait_fifo", fifo.path)
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            pool.options(timeout=0.3).call("builtins.len", b"x" * (4 << 20))
        except BaseException as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    caller.join(WAIT)
    try:
        assert not caller.is_alive(), "the call outlived its timeout while writing its argument"
        assert isinstance(outcome.get("error"), CallTimeoutError), outcome
    finally:
        fifo.release()
        caller.join(WAIT)
    assert busy.result(timeout=WAIT) == "released"
    assert pool.call("operator.add", 1, 2) == 3
    wait_until(lambda: pool.stats().in_flight == 0, WAIT, what="the late reply read")


async def test_an_async_timeout_names_the_configured_timeout(pool_maker: Any, fifo: Fifo) -> None:
    pool = pool_maker(workers=1)
    with pytest.raises(CallTimeoutError, match=r"within 0\.2s"):
        await pool.aio.options(timeout=0.2).call("pb_faultmods.wait_fifo", fifo.path)
    fifo.release()
    assert await asyncio.wait_for(pool.aio.call("operator.add", 1, 2), WAIT) == 3


def test_frame_limit_message_says_what_to_do() -> None:
    exc = poolbridge._errors.value_too_large("this request (its arguments)", 10, 8)
    assert isinstance(exc, ValueTooLargeError) and isinstance(exc, FrameTooLargeError)
    assert isinstance(exc, ValueError)
    assert "max_value_bytes of 8 bytes" in str(exc) and "Raise Pool(max_value_bytes=...)" in str(exc)
