"""The asyncio face (issue 5): every operation awaitable, a session per task, streams with
``async for`` / ``aclose``, timeouts and crashes as awaited errors — and the event loop never
blocked (checked by counting a ticker task's ticks, not by measuring time).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from pb_faultmods import ProcessHygiene, gone, sessions_for_slot, wait_until

import poolbridge
from poolbridge import (
    AsyncPool,
    CallTimeoutError,
    PoolStats,
    Ref,
    RefNotFoundError,
    SessionLostError,
    WorkerCrashedError,
)
from poolbridge import _testing as testing

M = "pb_faultmods"
WAIT = 15.0  # bound on any single await in these tests


@pytest.fixture(scope="module")
def process_pool() -> Iterator[poolbridge.Pool]:
    """This module's process pool (conftest's ``pool`` on the process backend; on Ray it is the
    session's Ray pool, which loads ``pb_faultmods`` too)."""
    p = poolbridge.Pool(2, helpers=["pb_faultmods"])
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(autouse=True)
def _hygiene(request: pytest.FixtureRequest) -> Iterator[None]:
    shared = request.getfixturevalue("pool") if "pool" in request.fixturenames else None

    def allowed() -> set[int]:
        return set(shared.pids()) if shared is not None and not shared.closed else set()

    with ProcessHygiene(allowed):
        yield


def bounded(aw: Any, limit: float = WAIT) -> Any:
    return asyncio.wait_for(aw, limit)


class Ticker:
    """A task that counts loop iterations it gets; it can fire an action after ``n`` ticks."""

    def __init__(self) -> None:
        self.ticks = 0
        self.actions: list[tuple[int, Any]] = []
        self.task: asyncio.Task[None] | None = None

    def at(self, n: int, action: Any) -> None:
        self.actions.append((n, action))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.001)
            self.ticks += 1
            for item in list(self.actions):
                if self.ticks >= item[0]:
                    self.actions.remove(item)
                    item[1]()

    def __enter__(self) -> Ticker:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


# -- every operation is awaitable -------------------------------------------------------------------


@pytest.mark.backends
async def test_every_operation_is_awaitable(pool):
    apool = pool.aio
    with apool.session("aio-ops"):
        assert await bounded(apool.call(f"{M}.add", 1, 2)) == 3
        fut = apool.submit(f"{M}.add", 2, 3)
        assert isinstance(fut, asyncio.Future)
        assert await bounded(fut) == 5
        assert await bounded(apool.getattr("math.pi")) == pytest.approx(3.14159, rel=1e-4)

        ref = await bounded(apool.create(f"{M}.Box", 10))
        assert isinstance(ref, Ref) and ref.session_id == "aio-ops"
        assert await bounded(ref.acall("incr", 5)) == 15
        assert await bounded(ref.agetattr("value")) == 15
        await bounded(ref.asetattr("value", 100))
        assert await bounded(apool.method(ref, "get")) == 100
        await bounded(apool.setattr(ref, "value", 7))
        assert await bounded(apool.getattr(ref, "value")) == 7
        await bounded(ref.arelease())
        with pytest.raises(RefNotFoundError):
            await bounded(ref.acall("get"))

        ref2 = await bounded(apool.create(f"{M}.Box", 1))
        await bounded(apool.release(ref2))
        with pytest.raises(RefNotFoundError):
            await bounded(apool.method(ref2, "get"))

        assert await bounded(apool.helper("pbf_remember", "k", "v")) == 1
        ref3 = await bounded(apool.create(f"{M}.Box", 3))
        assert await bounded(apool.close_session()) == 1  # ref3 (helper state is not counted)
        with pytest.raises(RefNotFoundError):
            await bounded(ref3.acall("get"))
        assert await bounded(apool.helper("pbf_remember", "k", "v")) == 1  # state was dropped

    stats = await bounded(apool.stats())
    assert isinstance(stats, PoolStats) and stats.workers == 2
    assert [s.pid for s in stats.slots] == pool.pids()
    # close_session of another session, by id
    other = apool.options(session="aio-other")
    kept = await bounded(other.create(f"{M}.Box", 1))  # (a dropped Ref would release itself)
    assert await bounded(apool.close_session("aio-other")) == 1
    with pytest.raises(RefNotFoundError):
        await bounded(kept.acall("get"))


async def test_an_answered_await_leaves_no_cycle_for_the_garbage_collector(process_pool):
    # The future of an awaited call points at its sink until the reply comes (to cancel the call
    # in the worker); the sink points at the future. Answered, the pair is freed by refcount.
    import gc

    from poolbridge._aio import _CallFuture

    apool = process_pool.aio
    assert await bounded(apool.call(f"{M}.add", 1, 2)) == 3
    gc.collect()
    gc.disable()
    try:
        for i in range(50):
            assert await bounded(apool.call(f"{M}.add", i, 1)) == i + 1
        assert not [o for o in gc.get_objects() if type(o) is _CallFuture]
    finally:
        gc.enable()


async def test_owned_async_pool_closes_its_workers():
    async with AsyncPool(workers=1) as apool:
        pids = apool.pool.pids()
        assert await bounded(apool.call(f"{M}.getpid")) == pids[0]
    assert apool.pool.closed
    loop = asyncio.get_running_loop()
    await bounded(loop.run_in_executor(None, lambda: wait_until(lambda: all(gone(p) for p in pids), 5.0)))


# -- streams ----------------------------------------------------------------------------------------


@pytest.mark.backends
async def test_async_for_over_a_stream(pool):
    apool = pool.aio.options(session="aio-stream", batch=3)
    got = [x async for x in apool.stream("builtins.range", 10)]
    assert got == list(range(10))
    assert [x async for x in apool.stream("builtins.range", 0)] == []


@pytest.mark.backends
async def test_aclose_runs_the_generators_finally(pool):
    apool = pool.aio.options(session="aio-finally", batch=2)
    token = "aclose"
    stream = apool.stream(f"{M}.counting_gen", token, 1000)
    got = []
    async for x in stream:
        got.append(x)
        if len(got) == 3:
            break
    assert got == [0, 1, 2]
    assert await bounded(apool.call(f"{M}.finally_count", token)) == 0  # still suspended
    await bounded(stream.aclose())
    assert await bounded(apool.call(f"{M}.finally_count", token)) == 1
    await bounded(stream.aclose())  # idempotent
    # async with closes it as well; a consumed stream runs its finally by itself
    async with apool.stream(f"{M}.counting_gen", token, 1000) as s2:
        assert await bounded(s2.__anext__()) == 0
    assert await bounded(apool.call(f"{M}.finally_count", token)) == 2
    assert [x async for x in apool.stream(f"{M}.counting_gen", token, 5)] == [0, 1, 2, 3, 4]
    assert await bounded(apool.call(f"{M}.finally_count", token)) == 3
    assert (await bounded(apool.stats())).streams == 0


async def test_async_stream_crash_mid_iteration(pool):
    (sid,) = sessions_for_slot(pool, 1, 1, "aio-crash-stream")
    apool = pool.aio.options(session=sid, batch=2)
    got = []
    with pytest.raises(WorkerCrashedError) as info:
        async for x in apool.stream(f"{M}.crash_after", 5, "sigkill"):
            got.append(x)
    assert info.value.signal == signal.SIGKILL
    assert got == list(range(len(got)))
    assert [x async for x in apool.stream("builtins.range", 4)] == [0, 1, 2, 3]


# -- sessions per task ------------------------------------------------------------------------------


@pytest.mark.backends
async def test_many_tasks_each_get_their_own_auto_session(pool):
    apool = pool.aio

    async def task() -> tuple[str, str]:
        first = await apool.call(f"{M}.session_of")
        await asyncio.sleep(0)  # interleave with the other tasks
        second = await apool.call(f"{M}.session_of")
        return first, second

    results = await bounded(asyncio.gather(*(task() for _ in range(500))), 60.0)
    firsts = [a for a, _ in results]
    assert all(a == b for a, b in results), "a task's auto-session changed between its calls"
    assert len(set(firsts)) == 500, "tasks shared an auto-session"
    assert all(s and s.startswith("auto-") for s in firsts)


@pytest.mark.backends
async def test_session_scopes_and_overrides_inside_tasks(pool):
    apool = pool.aio

    async def scoped(i: int) -> tuple[str, str, str, Any]:
        with apool.session(f"task-{i}"):
            await asyncio.sleep(0)
            in_scope = await apool.call(f"{M}.session_of")
            ref = await apool.create(f"{M}.Box", i)
            await asyncio.sleep(0)
            overridden = await apool.options(session=f"override-{i}").call(f"{M}.session_of")
            again = await apool.call(f"{M}.session_of")
            value = await ref.acall("get")
        return in_scope, overridden, again, (ref.session_id, value)

    results = await bounded(asyncio.gather(*(scoped(i) for i in range(100))), 60.0)
    for i, (in_scope, overridden, again, (ref_session, value)) in enumerate(results):
        assert in_scope == again == f"task-{i}"
        assert overridden == f"override-{i}"
        assert ref_session == f"task-{i}" and value == i
    # outside the scopes this task has its own auto-session, none of the above
    mine = await bounded(apool.call(f"{M}.session_of"))
    assert mine.startswith("auto-")


@pytest.mark.backends
async def test_sync_and_async_faces_share_sessions(pool):
    with pool.session("shared-face"):
        ref = pool.create(f"{M}.Box", 1)
        assert await bounded(ref.acall("incr")) == 2
        assert await bounded(pool.aio.method(ref, "incr")) == 3
    assert ref.call("get") == 3


# -- the loop is never blocked ------------------------------------------------------------------------


@pytest.mark.backends
async def test_event_loop_keeps_running_while_slow_calls_are_awaited(pool, fifo):
    """20 calls block in the workers until the *ticker task* releases them after 50 ticks: if any
    await (or send) blocked the loop, the ticker could not run and the calls could not finish."""
    apool = pool.aio
    with Ticker() as ticker:
        ticker.at(50, lambda: fifo.release(20))
        calls = [apool.options(session=f"slow-{i}").call(f"{M}.wait_fifo", fifo.path, 10.0, i) for i in range(20)]
        results = await bounded(asyncio.gather(*calls), 30.0)
        assert results == list(range(20))
        assert ticker.ticks >= 50


async def test_backpressure_does_not_block_the_event_loop(fifo):
    """At max_in_flight, an async caller must wait without blocking the loop thread.

    The two in-flight calls are released by the ticker task after 30 ticks. If ``send`` blocks
    the loop thread at the in-flight bound, the ticker cannot tick until the workers give up on
    their fifo (5 s) — the third call then completes with the ticker having ticked 0 times.

    Regression: ``AsyncPool._arun`` used to call ``pool._supervisor.send(..., block=True)`` on the
    loop thread; at the bound ``ProcessChannel._wait_for_space`` waited on a
    ``threading.Condition``, freezing the whole event loop until a reply arrived (a deadlock if
    that reply depends on the loop).
    """
    async with AsyncPool(workers=1, max_in_flight=2) as apool:
        assert await bounded(apool.call(f"{M}.add", 0, 0)) == 0
        with Ticker() as ticker:
            ticker.at(30, lambda: fifo.release(2))
            a = apool.submit(f"{M}.wait_fifo", fifo.path, 5.0, "a")
            b = apool.submit(f"{M}.wait_fifo", fifo.path, 5.0, "b")
            ticks_before = ticker.ticks
            third = await bounded(apool.call(f"{M}.add", 1, 2))
            outcomes = await bounded(asyncio.gather(a, b, return_exceptions=True))
            assert outcomes == ["a", "b"], (
                "the event loop was blocked while the third call waited for room: the ticker could not "
                f"release the in-flight calls before the workers gave up (5 s); they ended as {outcomes!r}"
            )
            assert third == 3
            assert ticker.ticks - ticks_before >= 30


# -- timeouts and crashes, awaited ----------------------------------------------------------------------


@pytest.mark.backends
async def test_async_timeout_keep(pool, fifo):
    (sid,) = sessions_for_slot(pool, 0, 1, "aio-timeout")
    apool = pool.aio.options(session=sid)
    pid = pool.pids()[0]
    with pytest.raises(CallTimeoutError) as info:
        await bounded(apool.options(timeout=0.3).call(f"{M}.wait_fifo", fifo.path, 30.0, "late"))
    assert isinstance(info.value, TimeoutError)
    nxt = apool.submit(f"{M}.add", 20, 22)
    fifo.release(1)
    assert await bounded(nxt) == 42  # not the dropped "late" reply
    assert pool.pids()[0] == pid


async def test_async_timeout_restart(pool, fifo):
    (sid,) = sessions_for_slot(pool, 0, 1, "aio-timeout-restart")
    apool = pool.aio.options(session=sid)
    ref = await bounded(apool.create(f"{M}.Box", 1))
    pid = pool.pids()[0]
    gen = testing.generation(pool, 0)
    with pytest.raises(CallTimeoutError):
        await bounded(apool.options(timeout=0.3, on_timeout="restart").call(f"{M}.wait_fifo", fifo.path, 30.0))
    # The next call, made after the timeout error, goes to the restarted worker — not into the
    # one being killed (regression, see the sync twin in test_faults_limits.py).
    assert await bounded(apool.call(f"{M}.add", 1, 1)) == 2
    assert pool.pids()[0] != pid
    assert testing.generation(pool, 0) == gen + 1
    with pytest.raises(SessionLostError):
        await bounded(ref.acall("get"))


async def test_async_worker_crash_is_an_awaited_error(pool):
    (sid,) = sessions_for_slot(pool, 1, 1, "aio-crash")
    (other,) = sessions_for_slot(pool, 0, 1, "aio-bystander")
    pids = pool.pids()
    apool = pool.aio
    crash = apool.options(session=sid).call(f"{M}.die", "sigkill")
    bystanders = [apool.options(session=other).call(f"{M}.echo", i) for i in range(50)]
    results = await bounded(asyncio.gather(crash, *bystanders, return_exceptions=True))
    err = results[0]
    assert isinstance(err, WorkerCrashedError), repr(err)
    assert err.pid == pids[1] and err.signal == signal.SIGKILL
    assert [r[0] for r in results[1:]] == [[i] for i in range(50)]
    assert pool.pids()[0] == pids[0]
    assert await bounded(apool.options(session=sid).call(f"{M}.add", 2, 2)) == 4
    assert pool.pids()[1] != pids[1]


@pytest.mark.backends
async def test_cancelled_await_leaves_the_pool_consistent(pool, fifo):
    (sid,) = sessions_for_slot(pool, 0, 1, "aio-cancel")
    apool = pool.aio.options(session=sid)
    task = asyncio.ensure_future(apool.call(f"{M}.wait_fifo", fifo.path, 30.0, "never seen"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fifo.release(1)
    assert await bounded(apool.call(f"{M}.add", 1, 2)) == 3
    assert all(not ch.pending for ch in testing.channels(pool))


async def test_async_stream_of_a_dead_generation(pool):
    (sid,) = sessions_for_slot(pool, 0, 1, "aio-lost-stream")
    apool = pool.aio.options(session=sid, batch=1)
    s1 = apool.stream("builtins.range", 10)
    s2 = apool.stream("builtins.range", 10)
    assert await bounded(s1.__anext__()) == 0
    assert await bounded(s2.__anext__()) == 0
    assert await bounded(apool.call(f"{M}.add", 0, 0)) == 0  # prefetches answered before this
    old = pool.pids()[0]
    os.kill(old, signal.SIGKILL)
    loop = asyncio.get_running_loop()
    await bounded(loop.run_in_executor(None, lambda: wait_until(lambda: pool.pids()[0] != old, 10.0)))
    with pytest.raises(SessionLostError):
        # item 1 was prefetched; item 2 needs the dead worker
        await bounded(s1.__anext__())
        await bounded(s1.__anext__())
    await bounded(s2.aclose())  # closing a stream whose worker is gone is a no-op, as in sync code
    assert [x async for x in apool.stream("builtins.range", 3)] == [0, 1, 2]


@pytest.mark.backends
def test_loop_closed_with_calls_in_flight_leaves_the_pool_working(pool, fifo):
    """asyncio.run() ends while a call is still running in a worker: its reply arrives for a
    closed loop and is dropped quietly; the pool (and a new loop) keep working."""
    (sid,) = sessions_for_slot(pool, 1, 1, "aio-closed-loop")

    async def leave_a_call_behind() -> None:
        apool = pool.aio.options(session=sid)
        apool.submit(f"{M}.wait_fifo", fifo.path, 30.0, "orphaned reply")
        await asyncio.sleep(0)

    asyncio.run(leave_a_call_behind())
    fifo.release(1)
    # the same session, after the abandoned call: served in order, with its own value
    assert pool.options(session=sid).call(f"{M}.add", 2, 2) == 4

    async def again() -> Any:
        return await bounded(pool.aio.options(session=sid).call(f"{M}.add", 3, 3))

    assert asyncio.run(again()) == 6
    assert all(not ch.pending for ch in testing.channels(pool))


async def test_many_tasks_across_worker_kills_every_reply_accounted_for(pool):
    """A small asyncio soak: 2 000 tasks over 200 sessions while both workers are SIGKILLed once
    mid-way; each task gets its own value for its own session, or WorkerCrashedError."""
    apool = pool.aio
    loop = asyncio.get_running_loop()
    done = 0

    async def one(i: int) -> Any:
        nonlocal done
        sid = f"aio-soak-{i % 200}"
        try:
            value = await apool.options(session=sid).call(f"{M}.echo", i)
        except WorkerCrashedError as exc:
            return exc
        finally:
            done += 1
        assert value == [[i], sid], (i, value)
        return "ok"

    async def killer() -> list[int]:
        killed = []
        for slot, at in ((0, 500), (1, 1200)):
            while done < at:
                await asyncio.sleep(0.001)
            pid = pool.pids()[slot]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            await loop.run_in_executor(None, lambda s=slot, p=pid: wait_until(lambda: pool.pids()[s] != p, 10.0))
        return killed

    kill_task = asyncio.ensure_future(killer())
    outcomes = await bounded(asyncio.gather(*(one(i) for i in range(2000))), 120.0)
    killed = await bounded(kill_task)
    crashes = [o for o in outcomes if isinstance(o, WorkerCrashedError)]
    assert outcomes.count("ok") + len(crashes) == 2000
    assert all(c.pid in killed for c in crashes), {c.pid for c in crashes}
    assert len(killed) == 2
    assert await bounded(asyncio.gather(*(apool.call(f"{M}.add", i, 1) for i in range(50)))) == [
        i + 1 for i in range(50)
    ]
    assert await bounded(apool.options(session="aio-soak-0").call(f"{M}.add", 1, 1)) == 2
