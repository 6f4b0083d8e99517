"""Streams: a generator lives in its session's worker and the client pulls it in batches.

Round trips are counted two ways: the worker's request counter seen by the generator itself
(how many requests produced items), and ``stats().slots[slot].calls`` deltas (every request).
"""

from __future__ import annotations

import gc
import uuid
from typing import Any

import pytest
from conftest import expect_routed
from pb_testmods import CustomError

import poolbridge
from poolbridge import Pool, RefNotFoundError

pytestmark = pytest.mark.backends  # every test with the module's ``pool``, on each backend


def tok() -> str:
    return uuid.uuid4().hex


def slot_calls(pool: Pool, sid: str) -> int:
    return pool.stats().slots[pool.slot_for(sid)].calls


def quiet_baseline(pool: Pool, sid: str) -> int:
    """Flush queued releases (so none lands inside the measurement), then read the counter."""
    gc.collect()
    pool.options(session=sid).call("pb_testmods.identity", 0)
    return slot_calls(pool, sid)


def events(pool: Pool, sid: str, token: str) -> list[str]:
    return [k for k, _ in pool.options(session=sid).call("pb_testmods.pop_events", token)]


def test_large_stream_is_pulled_in_batches(pool: Pool) -> None:
    sid, token = f"batches-{tok()[:6]}", tok()
    base = quiet_baseline(pool, sid)
    stream = pool.options(session=sid, batch=1000).stream("pb_testmods.gen_counted", token, 10_000)
    total = 0
    for expected, item in enumerate(stream):
        assert item == expected
        total += 1
    assert total == 10_000
    requests = slot_calls(pool, sid) - base
    assert 10 <= requests <= 12, f"{requests} requests for 10 batches"
    # exactly ten requests produced items: one per batch of 1000
    assert pool.options(session=sid).call("pb_testmods.pulls", token) == 10


@pytest.mark.parametrize(
    ("n", "batch", "expected_pulls"), [(10, 3, 4), (9, 3, 3), (1, 1, 1), (5, 1, 5), (100, 1000, 1)]
)
def test_items_per_request_follow_the_batch_size(pool: Pool, n: int, batch: int, expected_pulls: int) -> None:
    sid, token = f"bsize-{tok()[:6]}", tok()
    assert list(pool.options(session=sid, batch=batch).stream("pb_testmods.gen_counted", token, n)) == list(range(n))
    assert pool.options(session=sid).call("pb_testmods.pulls", token) == expected_pulls


def test_small_stream_costs_one_round_trip(pool: Pool) -> None:
    sid = f"small-{tok()[:6]}"
    base = quiet_baseline(pool, sid)
    stream = pool.options(session=sid).stream("pb_testmods.gen_range", 100)  # default batch > 100
    assert stream.closed  # everything came with the open: nothing left in the worker
    assert list(stream) == list(range(100))
    assert slot_calls(pool, sid) - base == 1


def test_empty_stream(pool: Pool) -> None:
    stream = pool.options(session="empty").stream("pb_testmods.gen_range", 0)
    assert list(stream) == []
    with pytest.raises(StopIteration):
        next(stream)


def test_non_generator_iterables_stream_too(pool: Pool) -> None:
    assert list(pool.options(session="iter", batch=2).stream("builtins.range", 5)) == [0, 1, 2, 3, 4]
    assert list(pool.options(session="iter", batch=2).stream(lambda: iter("abc"))) == ["a", "b", "c"]


def test_items_keep_their_types(pool: Pool) -> None:
    def gen() -> Any:
        yield (1, 2)
        yield {"a": [1, (2, 3)]}
        yield b"bytes"
        yield {1, 2}
        yield None

    expected = [(1, 2), {"a": [1, (2, 3)]}, b"bytes", {1, 2}, None]
    assert list(pool.options(session="types", batch=2).stream(gen)) == expected


def test_close_early_runs_the_generators_finally_in_the_worker(pool: Pool) -> None:
    sid, token = f"early-{tok()[:6]}", tok()
    slot = pool.slot_for(sid)
    before = pool.stats().slots[slot].streams
    stream = pool.options(session=sid, batch=10).stream("pb_testmods.gen_with_finally", token, 1000)
    assert [next(stream) for _ in range(15)] == list(range(15))
    assert pool.stats().slots[slot].streams == before + 1
    assert events(pool, sid, token) == []  # still suspended
    stream.close()
    assert stream.closed
    assert events(pool, sid, token) == ["finally"]  # closed early: not exhausted
    assert pool.stats().slots[slot].streams == before
    stream.close()  # idempotent


def test_closed_stream_yields_nothing_more(pool: Pool) -> None:
    """Like a closed generator: after ``close()`` iteration stops, even mid-batch."""
    stream = pool.options(session="closed-mid-batch", batch=10).stream("pb_testmods.gen_range", 1000)
    assert next(stream) == 0  # nine more items of this batch are buffered locally
    stream.close()
    assert list(stream) == []


def test_close_runs_finally_in_the_streams_session_from_any_context(pool: Pool) -> None:
    sid, token = f"closectx-{tok()[:6]}", tok()
    stream = pool.options(session=sid, batch=1).stream("pb_testmods.gen_with_finally", token, 50)
    next(stream)
    with pool.session("somewhere-else"):
        stream.close()
    ((kind, seen),) = pool.options(session=sid).call("pb_testmods.pop_events", token)
    assert kind == "finally"
    expect_routed(pool, seen, sid)


def test_stream_as_context_manager(pool: Pool) -> None:
    sid, token = f"ctxmgr-{tok()[:6]}", tok()
    with pool.options(session=sid, batch=4).stream("pb_testmods.gen_with_finally", token, 100) as stream:
        assert isinstance(stream, poolbridge.Stream)
        assert stream.session_id == sid
        assert not stream.closed
        assert next(stream) == 0
    assert stream.closed
    assert events(pool, sid, token) == ["finally"]


def test_context_manager_closes_on_error(pool: Pool) -> None:
    sid, token = f"ctxerr-{tok()[:6]}", tok()
    with (
        pytest.raises(ZeroDivisionError),
        pool.options(session=sid).stream("pb_testmods.gen_with_finally", token, 10_000) as stream,
    ):
        next(stream)
        1 / 0  # noqa: B018
    assert events(pool, sid, token) == ["finally"]


def test_exhausted_stream_finishes_in_the_worker(pool: Pool) -> None:
    sid, token = f"exhaust-{tok()[:6]}", tok()
    with pool.options(session=sid, batch=3).stream("pb_testmods.gen_with_finally", token, 7) as stream:
        assert list(stream) == list(range(7))
    assert events(pool, sid, token) == ["exhausted", "finally"]
    assert stream.closed


def test_dropped_stream_is_closed_in_the_worker(pool: Pool) -> None:
    sid, token = f"dropped-{tok()[:6]}", tok()
    stream = pool.options(session=sid, batch=2).stream("pb_testmods.gen_with_finally", token, 100)
    next(stream)
    del stream
    gc.collect()
    # the queued close goes out ahead of this session's next request, to the same worker
    assert events(pool, sid, token) == ["finally"]


def test_generator_raising_after_items_delivers_them_then_raises(pool: Pool) -> None:
    for batch in (3, 5, 100):
        stream = pool.options(session="raising", batch=batch).stream("pb_testmods.gen_then_raise", 5, "late failure")
        got = []
        with pytest.raises(CustomError, match="late failure") as info:
            for item in stream:
                got.append(item)
        assert got == [0, 1, 2, 3, 4], batch
        assert "gen_then_raise" in str(info.value.__cause__)
        assert stream.closed
        with pytest.raises(StopIteration):
            next(stream)
    assert pool.options(session="raising").call("pb_testmods.identity", 1) == 1


def test_generator_raising_before_any_item_fails_the_open(pool: Pool) -> None:
    with pytest.raises(CustomError, match="nothing") as info:
        pool.options(session="raise-first").stream("pb_testmods.gen_raise_first", "nothing")
    assert "gen_raise_first" in str(info.value.__cause__)


def test_failed_streams_leave_nothing_open(pool: Pool) -> None:
    sid = f"leak-{tok()[:6]}"
    slot = pool.slot_for(sid)
    api = pool.options(session=sid)
    with pytest.raises(CustomError):
        api.stream("pb_testmods.gen_raise_first")
    with pytest.raises(CustomError):
        list(api.options(batch=2).stream("pb_testmods.gen_then_raise", 3))
    with pytest.raises(TypeError):
        api.stream("pb_testmods.identity", 5)  # not iterable
    assert pool.close_session(sid) == 0, "a failed stream stayed registered in its session"
    assert pool.stats().slots[slot].streams == 0


def test_unencodable_items_do_not_leak_the_stream(pool: Pool) -> None:
    sid = f"locks-{tok()[:6]}"
    try:
        items = list(pool.options(session=sid, batch=2).stream("pb_testmods.gen_locks", 3))
    except TypeError:
        pass  # refusing unencodable items is acceptable ...
    else:  # ... and so is handing them over as refs
        assert len(items) == 3 and all(isinstance(i, poolbridge.Ref) for i in items)
    # ... but either way the stream must not stay open in the worker
    assert pool.stats().slots[pool.slot_for(sid)].streams == 0, "the failed stream stayed open"
    assert pool.close_session(sid) in (0, 3)


def test_streams_interleave_within_a_session(pool: Pool) -> None:
    api = pool.options(session="interleave", batch=2)
    a = api.stream("pb_testmods.gen_range", 7)
    b = api.stream(lambda: (x * 10 for x in range(7)))
    got = [(next(a), next(b)) for _ in range(7)]
    assert got == [(i, i * 10) for i in range(7)]
    with pytest.raises(StopIteration):
        next(a)


def test_stream_items_report_the_session_they_ran_in(pool: Pool) -> None:
    with pool.session("stream-ctx"):
        stream = pool.options(batch=1).stream("pb_testmods.gen_whoami", 3)
    assert stream.session_id == "stream-ctx"
    for seen in stream:  # pulled outside the block: the stream routes itself
        expect_routed(pool, seen, "stream-ctx")


def test_stream_repr_and_state(pool: Pool) -> None:
    stream = pool.options(session="repr-s", batch=1).stream("pb_testmods.gen_range", 3)
    assert "repr-s" in repr(stream) and "open" in repr(stream)
    assert iter(stream) is stream
    stream.close()
    assert "closed" in repr(stream)


def test_close_session_closes_its_streams(pool: Pool) -> None:
    sid, token = f"closesess-{tok()[:6]}", tok()
    stream = pool.options(session=sid, batch=1).stream("pb_testmods.gen_with_finally", token, 100)
    next(stream)
    assert pool.close_session(sid) == 1
    assert events(pool, sid, token) == ["finally"]
    with pytest.raises(RefNotFoundError):
        list(stream)


@pytest.mark.parametrize("batch", [0, -1])
def test_invalid_batch(pool: Pool, batch: int) -> None:
    with pytest.raises(ValueError):
        pool.options(batch=batch)


# -- the asyncio face --------------------------------------------------------------------------


async def test_async_stream_is_pulled_in_batches(pool: Pool) -> None:
    sid, token = f"abatches-{tok()[:6]}", tok()
    base = quiet_baseline(pool, sid)
    stream = pool.aio.options(session=sid, batch=1000).stream("pb_testmods.gen_counted", token, 10_000)
    got = [item async for item in stream]
    assert got == list(range(10_000))
    assert 10 <= slot_calls(pool, sid) - base <= 12
    assert pool.options(session=sid).call("pb_testmods.pulls", token) == 10


async def test_async_stream_aclose_runs_finally(pool: Pool) -> None:
    sid, token = f"aclose-{tok()[:6]}", tok()
    stream = pool.aio.options(session=sid, batch=5).stream("pb_testmods.gen_with_finally", token, 1000)
    assert [await stream.__anext__() for _ in range(7)] == list(range(7))
    assert stream.session_id == sid
    await stream.aclose()
    assert events(pool, sid, token) == ["finally"]
    await stream.aclose()  # idempotent


async def test_async_stream_context_manager(pool: Pool) -> None:
    sid, token = f"actx-{tok()[:6]}", tok()
    async with pool.aio.options(session=sid, batch=3).stream("pb_testmods.gen_with_finally", token, 100) as stream:
        assert await stream.__anext__() == 0
    assert events(pool, sid, token) == ["finally"]


async def test_closed_async_stream_yields_nothing_more(pool: Pool) -> None:
    stream = pool.aio.options(session="aclosed-mid-batch", batch=10).stream("pb_testmods.gen_range", 1000)
    assert await stream.__anext__() == 0
    await stream.aclose()
    assert [item async for item in stream] == []


async def test_async_stream_generator_raising_after_items(pool: Pool) -> None:
    got = []
    with pytest.raises(CustomError, match="async late") as info:
        stream = pool.aio.options(session="araise", batch=2).stream("pb_testmods.gen_then_raise", 5, "async late")
        async for item in stream:
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
    assert "gen_then_raise" in str(info.value.__cause__)


async def test_async_stream_runs_in_the_task_session(pool: Pool) -> None:
    with pool.session("astream-ctx"):
        items = [i async for i in pool.aio.options(batch=1).stream("pb_testmods.gen_whoami", 3)]
    for seen in items:
        expect_routed(pool, seen, "astream-ctx")


def test_closing_a_stream_whose_session_was_closed_is_a_no_op(pool: Pool) -> None:
    """``close()`` is idempotent: if the generator is already gone (close_session, idle TTL) there
    is nothing left to close, and leaving a ``with`` block must not raise over the block's result."""
    api = pool.options(session=f"gone-{tok()[:6]}", batch=1)
    stream = api.stream("pb_testmods.gen_range", 100)
    next(stream)
    pool.close_session(stream.session_id)
    stream.close()
    assert stream.closed
    with pytest.raises(KeyError, match="the block's own error"), api.stream("pb_testmods.gen_range", 100) as other:
        next(other)
        pool.close_session(other.session_id)
        raise KeyError("the block's own error")


async def test_aclosing_an_async_stream_whose_session_was_closed_is_a_no_op(pool: Pool) -> None:
    sid = f"agone-{tok()[:6]}"
    stream = pool.aio.options(session=sid, batch=1).stream("pb_testmods.gen_range", 100)
    await stream.__anext__()
    pool.close_session(sid)
    await stream.aclose()
