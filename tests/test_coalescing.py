"""Request write coalescing and the submit Future (_pipes.py, _replies.PoolFuture).

A request written while two others of its channel are unanswered waits in the channel's queue and
goes out with the next replies. These tests hold a worker inside a call (a fifo the test controls)
so that requests really queue, then check that nothing queued is lost, reordered, or stuck: on
release, on cancel, on a crash, on close and across recycling.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
import signal
import struct
import termios
import threading
from typing import Any

import pytest
from pb_faultmods import Fifo, pid_in, wait_until

import poolbridge
from poolbridge import CallTimeoutError, WorkerCrashedError
from poolbridge import _testing as testing
from poolbridge._calls import PoolFuture

pytestmark = pytest.mark.timeout(120)

F = "pb_faultmods"
T = "pb_testmods"
WAIT = 60.0


def _block(pool: poolbridge.Pool, fifo: Fifo, marker: str) -> concurrent.futures.Future[Any]:
    """A call that holds the (single) worker until the fifo is released; returns once it runs."""
    blocker = pool.options(session="blocker").submit(f"{F}.mark_and_wait", marker, fifo.path, WAIT, "free")
    wait_until(lambda: pid_in(marker), WAIT, what="the blocking call to start")
    return blocker


def _unread(fd: int) -> int:
    """Bytes written into a pipe and not yet read by the other end."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]


def _queue_len(pool: poolbridge.Pool) -> int:
    return len(testing.channels(pool)[0]._queue)


def test_a_burst_behind_a_busy_worker_is_queued_then_answered_in_order(pool_maker, fifo, tmp_path):
    pool = pool_maker()
    blocker = _block(pool, fifo, str(tmp_path / "m"))
    token = f"order-{os.getpid()}"
    api = pool.options(session="burst")
    futures = [api.submit(f"{T}.log_seq", token, i) for i in range(500)]
    assert _queue_len(pool) > 0, "requests behind a busy worker should wait in the queue"
    fifo.release()
    assert blocker.result(WAIT) == "free"
    assert [f.result(WAIT) for f in futures] == list(range(500))
    assert api.call(f"{T}.pop_events", token) == list(range(500))  # one session: in submission order
    assert _queue_len(pool) == 0


def test_a_sender_waits_for_the_pipe_instead_of_queueing_without_bound(pool_maker, fifo, tmp_path):
    """With the worker stuck, a sender fills the queue and the pipe, then blocks in its write
    until the worker reads again — as a plain pipe write always did. Nothing is lost."""
    pool = pool_maker()
    blocker = _block(pool, fifo, str(tmp_path / "m"))
    big = "x" * 2000
    api = pool.options(session="flood")
    out: list[Any] = []
    sender = threading.Thread(target=lambda: out.extend(api.submit(f"{F}.echo", big, i) for i in range(200)))
    sender.start()
    request_fd, _ = testing.pipe_fds(pool, 0)
    wait_until(lambda: _unread(request_fd) >= 32768, WAIT, what="requests to fill the pipe")
    assert sender.is_alive(), "400 KB of requests cannot all fit in a 64 KB pipe and a 32 KB queue"
    fifo.release()
    sender.join(WAIT)
    assert not sender.is_alive()
    assert blocker.result(WAIT) == "free"
    assert [f.result(WAIT) for f in out] == [[[big, i], "flood"] for i in range(200)]


def test_cancelled_queued_requests_never_run_and_do_not_stall_the_queue(pool_maker, fifo, tmp_path):
    pool = pool_maker()
    blocker = _block(pool, fifo, str(tmp_path / "m"))
    token = f"cancel-{os.getpid()}"
    api = pool.options(session="cancels")
    futures = [api.submit(f"{T}.log_seq", token, i) for i in range(300)]
    assert all(f.cancel() for f in futures)
    assert all(f.cancelled() for f in futures)
    fifo.release()
    assert blocker.result(WAIT) == "free"
    # No reply comes for a cancelled request: the queue must not wait for one.
    assert api.call(f"{T}.pop_events", token) == []
    assert api.submit(f"{F}.add", 1, 2).result(WAIT) == 3
    assert _queue_len(pool) == 0


def test_a_crash_fails_queued_requests_and_the_slot_serves_again(pool_maker, fifo, tmp_path):
    pool = pool_maker()
    marker = str(tmp_path / "m")
    blocker = _block(pool, fifo, marker)
    api = pool.options(session="doomed")
    futures = [api.submit(f"{F}.add", i, 1) for i in range(300)]
    assert _queue_len(pool) > 0
    os.kill(pid_in(marker), signal.SIGKILL)
    for f in [blocker, *futures]:
        with pytest.raises(WorkerCrashedError):
            f.result(WAIT)
    assert api.call(f"{F}.add", 2, 2) == 4
    assert pool.stats().slots[0].generation == 1


def test_close_sends_queued_requests_before_stopping_the_worker(pool_maker, fifo, tmp_path):
    pool = pool_maker()
    blocker = _block(pool, fifo, str(tmp_path / "m"))
    api = pool.options(session="closing")
    futures = [api.submit(f"{F}.add", i, 1) for i in range(300)]
    assert _queue_len(pool) > 0
    closer = threading.Thread(target=pool.close)
    closer.start()
    fifo.release()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert blocker.result(WAIT) == "free"
    assert [f.result(WAIT) for f in futures] == [i + 1 for i in range(300)]


def test_recycling_with_a_queue_loses_nothing(pool_maker):
    pool = pool_maker(max_calls_per_worker=40)
    views = [pool.options(session=f"r-{i}") for i in range(7)]
    for _ in range(3):
        futures = [views[i % 7].submit(f"{F}.add", i, 1) for i in range(400)]
        assert [f.result(WAIT) for f in futures] == [i + 1 for i in range(400)]
    assert pool.stats().slots[0].generation >= 2


def test_large_and_small_requests_interleaved(pool_maker):
    pool = pool_maker()
    api = pool.options(session="mixed")
    blob = b"b" * 300_000  # larger than the pipe: written by its sender, never left half-written
    futures = [api.submit(f"{F}.echo", blob if i % 10 == 0 else i) for i in range(100)]
    for i, f in enumerate(futures):
        assert f.result(WAIT) == [[blob if i % 10 == 0 else i], "mixed"]


def test_sync_callers_on_many_threads_share_a_queued_channel(pool_maker):
    pool = pool_maker()
    errors: list[str] = []

    def caller(t: int) -> None:
        api = pool.options(session=f"t{t}")
        for i in range(150):
            got = api.call(f"{F}.add", t, i)
            if got != t + i:
                errors.append(f"{t}/{i}: {got!r}")

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    futures = [pool.options(session="bg").submit(f"{F}.add", i, 0) for i in range(600)]
    for th in threads:
        th.join(WAIT)
    assert not any(th.is_alive() for th in threads)
    assert not errors, errors[:5]
    assert [f.result(WAIT) for f in futures] == list(range(600))


def test_a_timed_out_queued_request_fails_alone(pool_maker, fifo, tmp_path):
    pool = pool_maker()
    blocker = _block(pool, fifo, str(tmp_path / "m"))
    slow = pool.options(session="late", timeout=0.2).submit(f"{F}.add", 1, 1)
    with pytest.raises(CallTimeoutError):
        slow.result(WAIT)
    fifo.release()
    assert blocker.result(WAIT) == "free"
    assert pool.options(session="late").call(f"{F}.add", 2, 3) == 5


# -- PoolFuture: the stdlib Future contract ----------------------------------------------------------


def test_future_contract_through_stdlib_helpers(pool):
    api = pool.options(session="futures")
    futures = [api.submit("operator.add", i, 1) for i in range(50)]
    done, not_done = concurrent.futures.wait(futures, timeout=WAIT)
    assert not not_done and len(done) == 50
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=WAIT)) == list(range(1, 51))
    seen: list[Any] = []
    late = api.submit("operator.add", 2, 2)
    late.add_done_callback(lambda f: seen.append(f.result()))
    assert late.result(WAIT) == 4
    wait_until(lambda: seen, WAIT, what="the callback")
    late.add_done_callback(lambda f: seen.append(("after", f.result())))  # already done: runs now
    assert seen == [4, ("after", 4)]
    failing = api.submit("operator.truediv", 1, 0)
    assert isinstance(failing.exception(WAIT), ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        failing.result()
    assert failing.done() and not failing.cancelled() and not failing.running()
    assert "finished" in repr(late)


def test_future_result_timeout_then_value(pool, fifo, tmp_path):
    api = pool.options(session="waiting")
    f = api.submit(f"{F}.wait_fifo", fifo.path, WAIT, "done")
    with pytest.raises(concurrent.futures.TimeoutError):
        f.result(timeout=0.05)
    fifo.release()
    assert f.result(WAIT) == "done"


def test_future_awaitable_through_asyncio(pool):
    async def main() -> Any:
        return await asyncio.wrap_future(pool.options(session="wrap").submit("operator.mul", 6, 7))

    assert asyncio.run(main()) == 42


def test_settling_reaches_everyone_who_registered_first() -> None:
    fut = PoolFuture(lambda status, body: body)
    calls: list[Any] = []
    results: list[Any] = []
    fut.add_done_callback(lambda f: calls.append(f.result()))
    waiting = [
        threading.Thread(target=lambda: results.append(fut.result(WAIT))),
        threading.Thread(target=lambda: results.append(len(concurrent.futures.wait([fut], timeout=WAIT).done))),
    ]
    for t in waiting:
        t.start()
    # Both are parked: one on the future's Condition, one as a wait() waiter.
    wait_until(lambda: len(fut._condition._waiters) == 1 and len(fut._waiters) == 1, WAIT, what="waiters")
    fut.deliver(0, "v")
    for t in waiting:
        t.join(WAIT)
    assert sorted(results, key=str) == [1, "v"]
    assert calls == ["v"]


def test_settling_before_anyone_asks() -> None:
    fut = PoolFuture(lambda status, body: body)
    fut.deliver(0, "v")
    assert fut.done() and fut.result(0) == "v"
    calls: list[Any] = []
    fut.add_done_callback(lambda f: calls.append(f.result()))
    assert calls == ["v"]
    assert concurrent.futures.wait([fut], timeout=0).done == {fut}
    failed = PoolFuture(lambda status, body: body)
    failed.fail(KeyError("k"))
    with pytest.raises(KeyError):
        failed.result(0)


def _race_once(value: int, barrier: threading.Barrier) -> None:
    fut = PoolFuture(lambda status, body: body)
    calls: list[int] = []
    results: list[Any] = []

    def by_result() -> None:
        barrier.wait(WAIT)
        results.append(fut.result(WAIT))

    def by_callback() -> None:
        barrier.wait(WAIT)
        fut.add_done_callback(lambda _: calls.append(1))

    def by_wait() -> None:
        barrier.wait(WAIT)
        done, _ = concurrent.futures.wait([fut], timeout=WAIT)
        results.append(fut.result(0) if done else "early")

    threads = [threading.Thread(target=t) for t in (by_result, by_callback, by_wait)]
    for t in threads:
        t.start()
    barrier.wait(WAIT)
    fut.deliver(0, value)
    for t in threads:
        t.join(WAIT)
    assert results == [value, value], (value, results)
    assert calls == [1], (value, calls)


def test_settling_races_waiters_callbacks_and_wait() -> None:
    """Settling against every way of waiting, started at the same moment, many times: each waiter
    sees the value, each callback runs exactly once, wait() never returns early."""
    barrier = threading.Barrier(4)
    for i in range(1000):
        _race_once(i, barrier)
