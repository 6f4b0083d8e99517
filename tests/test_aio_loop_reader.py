"""Replies to asyncio calls are read on the event loop itself (``add_reader`` on a dup of the
worker's reply pipe): no thread hop on the way back. These tests pin who reads, that mixing with
threads that read the same pipe never loses a reply, and that a worker's death leaves no fd behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any

import pytest
from pb_faultmods import sessions_for_slot

import poolbridge
from poolbridge import WorkerCrashedError, _aio
from poolbridge import _testing as testing
from poolbridge._aio import _loop_state

WAIT = 15.0


@pytest.fixture
def pool(pool_maker: Any) -> poolbridge.Pool:
    return pool_maker(workers=2, helpers=["pb_faultmods"])  # type: ignore[no-any-return]


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_the_reply_is_read_and_settled_on_the_loop_thread(pool: poolbridge.Pool, monkeypatch: Any) -> None:
    """No reply takes the cross-thread path (the inbox drained via ``call_soon_threadsafe``)."""
    hand_offs: list[int] = []
    original = _aio._LoopState.post

    def post(self: Any, future: Any, value: Any, exc: BaseException | None) -> None:
        if threading.get_ident() != self.thread:
            hand_offs.append(1)
        original(self, future, value, exc)

    monkeypatch.setattr(_aio._LoopState, "post", post)

    async def main() -> Any:
        values = [await asyncio.wait_for(pool.aio.call("operator.add", i, 1), WAIT) for i in range(20)]
        calls = (pool.aio.call("operator.add", i, 1) for i in range(20))
        values += await asyncio.wait_for(asyncio.gather(*calls), WAIT)
        return values, set(_loop_state(asyncio.get_running_loop()).readers)

    values, watched = asyncio.run(main())
    assert values == [i + 1 for i in range(20)] * 2
    assert hand_offs == []
    assert watched and watched <= set(testing.channels(pool))  # the loop watched what it sent to


def test_sync_threads_and_the_loop_share_a_pipe_without_losing_a_reply(pool: poolbridge.Pool) -> None:
    """Threads leading sync calls and the loop's reader take turns on one reply pipe; whoever reads
    a reply delivers it, and every call gets its own value."""
    (sid,) = sessions_for_slot(pool, 0, 1, "aio-mixed")
    view = pool.options(session=sid)
    stop = threading.Event()
    errors: list[BaseException] = []

    def sync_caller(k: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                assert view.call("operator.add", k * 100_000, i) == k * 100_000 + i
            except BaseException as exc:
                errors.append(exc)
                return
            i += 1

    threads = [threading.Thread(target=sync_caller, args=(k,)) for k in range(1, 3)]
    for t in threads:
        t.start()

    async def main() -> list[Any]:
        aview = pool.aio.options(session=sid)
        out = []
        for i in range(300):
            out.append(await asyncio.wait_for(aview.call("operator.add", i, 0), WAIT))
        # and concurrently, with futures submitted from threads reading through the background reader
        futs = [view.submit("operator.add", i, 1) for i in range(50)]
        out += await asyncio.wait_for(asyncio.gather(*(aview.call("operator.add", i, 2) for i in range(300))), WAIT)
        assert [f.result(WAIT) for f in futs] == [i + 1 for i in range(50)]
        return out

    try:
        out = asyncio.run(main())
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)
    assert not errors, errors
    assert out == list(range(300)) + [i + 2 for i in range(300)]


def test_a_worker_death_closes_the_loops_copy_of_its_pipe(pool: poolbridge.Pool, fifo: Any) -> None:
    (sid,) = sessions_for_slot(pool, 1, 1, "aio-death")
    before = _open_fds()

    async def main() -> tuple[int, int, bool]:
        aview = pool.aio.options(session=sid)
        pid = await asyncio.wait_for(aview.call("os.getpid"), WAIT)
        state = _loop_state(asyncio.get_running_loop())
        old = testing.channels(pool)[1]
        assert old in state.readers
        in_flight = aview.submit("pb_faultmods.wait_fifo", fifo.path, 30.0, "x")  # written now
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            await asyncio.wait_for(in_flight, WAIT)
        # the next call runs on the new generation, watched through a new dup
        new_pid = await asyncio.wait_for(aview.call("os.getpid"), WAIT)
        for _ in range(100):  # the forget callback runs on this loop, soon after the close
            if old not in state.readers:
                break
            await asyncio.sleep(0)
        return pid, new_pid, old in state.readers

    pid, new_pid, still_watched = asyncio.run(main())
    assert new_pid != pid
    assert not still_watched
    pool.close()
    assert _open_fds() <= before  # the pool's pipes and the loop's copies are all closed
