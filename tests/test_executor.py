"""``Pool`` as a ``concurrent.futures.Executor``: the contract tests of CPython's
``test_concurrent_futures`` executor tests that apply (submit, map ordering, exceptions and
timeouts, shutdown and ``cancel_futures``, use after shutdown), and the stdlib consumers of an
executor (``loop.run_in_executor``, ``wait``, ``as_completed``).

Blocking is done on a fifo the test releases (``pb_faultmods.wait_fifo``), never on sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import operator
from collections.abc import Callable
from typing import Any

import pytest
from pb_faultmods import Fifo, pid_in, wait_until

import poolbridge
from poolbridge import Pool, PoolClosedError

WAIT = 30.0  # bound on any single wait in these tests
F = "pb_faultmods"
M = "pb_mapmods"



@pytest.mark.backends
def test_pool_is_an_executor(pool: Pool) -> None:
    assert isinstance(pool, cf.Executor)


@pytest.mark.backends
def test_submit(pool: Pool) -> None:
    assert pool.submit(pow, 2, 8).result(WAIT) == 256


@pytest.mark.backends
def test_submit_keyword(pool: Pool) -> None:
    assert pool.submit(f"{M}.mul", 2, y=8).result(WAIT) == 16
    with pytest.raises(TypeError):
        pool.submit(fn=pow)  # type: ignore[call-arg]


@pytest.mark.backends
def test_map(pool: Pool) -> None:
    assert list(pool.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
    assert list(pool.map(pow, range(10), range(10), chunksize=3)) == list(map(pow, range(10), range(10)))


@pytest.mark.backends
def test_map_stops_at_the_shortest_iterable(pool: Pool) -> None:
    assert list(pool.map(operator.add, range(5), range(100))) == [0, 2, 4, 6, 8]
    assert list(pool.map(abs, [])) == []


@pytest.mark.backends
def test_map_exception(pool: Pool) -> None:
    # As in CPython: the exception is raised when its item is reached.
    i = pool.map(divmod, [1, 1, 1, 1], [2, 2, 0, 2], chunksize=1)
    assert next(i) == (0, 1)
    assert next(i) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(i)
    with pytest.raises(StopIteration):  # the iteration ended with the exception
        next(i)


@pytest.mark.backends
def test_map_timeout(pool: Pool, fifo: Fifo) -> None:
    # CPython's test_map_timeout, with a fifo instead of sleep(6): the third item blocks until
    # released; the first two come back, then next() raises TimeoutError at the deadline.
    pool.broadcast(f"{M}.maybe_wait", ("warm-up", None))  # imported in both workers before timing
    results = []
    items = [("a", None), ("b", None), ("c", fifo.path)]
    with pytest.raises(TimeoutError):
        # buffersize=1: "c" is sent once "b" is back, never in one pipe read with "a" or "b" (a
        # worker writes the replies of one read together, so theirs would wait for "c")
        for r in pool.map(f"{M}.maybe_wait", items, timeout=3.0, chunksize=1, buffersize=1):
            results.append(r)
    assert results == ["a", "b"]
    fifo.release()


@pytest.mark.backends
def test_map_timeout_is_a_concurrent_futures_timeout(pool: Pool, fifo: Fifo) -> None:
    it = pool.map(f"{F}.wait_fifo", [fifo.path], timeout=0.2)
    with pytest.raises(cf.TimeoutError):
        next(it)
    fifo.release()


def test_map_submits_without_iteration(pool_maker: Callable[..., Pool], tmp_path: Any) -> None:
    # CPython issue 11777: a map nobody iterates still runs (here: the first window, which holds
    # all of a short input) and shutdown(wait=True) waits for it.
    p = pool_maker(workers=2)
    marker = str(tmp_path / "ran")
    p.map(f"{F}.mark", [marker] * 10)
    p.shutdown(wait=True)
    with open(marker) as f:
        assert len(f.read().split()) == 10


def test_use_after_shutdown_raises_runtime_error(pool_maker: Callable[..., Pool]) -> None:
    p = pool_maker(workers=1)
    p.shutdown()
    for use in (
        lambda: p.submit(pow, 2, 5),
        lambda: p.map(abs, [1]),
        lambda: p.imap(abs, [1]),
        lambda: p.broadcast(abs, 1),
    ):
        with pytest.raises(RuntimeError):
            use()
    assert issubclass(PoolClosedError, RuntimeError)


def test_shutdown_is_idempotent(pool_maker: Callable[..., Pool]) -> None:
    p = pool_maker(workers=1)
    p.shutdown()
    p.shutdown()
    p.shutdown(wait=False, cancel_futures=True)
    assert p.closed


def test_context_manager_shuts_down(pool_maker: Callable[..., Pool]) -> None:
    with pool_maker(workers=1) as p:
        assert p.submit(abs, -1).result(WAIT) == 1
    with pytest.raises(RuntimeError):
        p.submit(abs, -1)


def test_shutdown_wait_lets_submitted_calls_finish(pool_maker: Callable[..., Pool]) -> None:
    p = pool_maker(workers=2)
    futures = [p.submit(pow, 2, i) for i in range(50)]
    p.shutdown(wait=True)
    assert [f.result(0) for f in futures] == [2**i for i in range(50)]


def test_shutdown_no_wait_refuses_new_calls_and_finishes(
    pool_maker: Callable[..., Pool], fifo: Fifo, tmp_path: Any
) -> None:
    p = pool_maker(workers=1)
    blocked = _start_blocked(p, fifo, tmp_path)
    p.shutdown(wait=False)
    with pytest.raises(RuntimeError):
        p.submit(abs, 1)
    fifo.release()
    assert blocked.result(WAIT) == "released"


def _start_blocked(p: Pool, fifo: Fifo, tmp_path: Any) -> cf.Future[Any]:
    """A call that is running (its marker is written) and blocked on the fifo."""
    marker = str(tmp_path / "running")
    running = p.submit(f"{F}.mark_and_wait", marker, fifo.path)
    wait_until(lambda: pid_in(marker), WAIT, what="the blocking call to start")
    return running


@pytest.mark.backends
def test_a_cancelled_future_never_runs_and_an_uncancelled_one_does(pool: Pool, fifo: Fifo, tmp_path: Any) -> None:
    """``Future.cancel()`` on each backend: True only for a call that will never run, False for one
    that may have started (it then runs, once). On the process backend every call queued behind a
    running one can be cancelled; on Ray those already handed to the actor cannot (docs/ray.md)."""
    sid = f"cancel-{tmp_path.name}"
    token = f"{sid}-seq"
    api = pool.options(session=sid)
    running = api.submit(f"{F}.mark_and_wait", str(tmp_path / "running"), fifo.path)
    wait_until(lambda: pid_in(str(tmp_path / "running")), WAIT, what="the blocking call to start")
    queued = [api.submit("pb_testmods.log_seq", token, i) for i in range(20)]
    cancelled = {i for i, f in enumerate(queued) if f.cancel()}
    assert len(cancelled) >= 18, "calls queued behind a running one could not be cancelled"
    fifo.release()
    assert running.result(WAIT) == "released"
    for i, f in enumerate(queued):
        assert f.cancelled() if i in cancelled else f.result(WAIT) == i
    assert api.call("pb_testmods.pop_events", token) == [i for i in range(20) if i not in cancelled]


def test_cancel_futures(pool_maker: Callable[..., Pool], fifo: Fifo, tmp_path: Any) -> None:
    # One worker, blocked on the fifo: every call queued behind it has not started and is
    # cancelled; the running one finishes (as in CPython's test_cancel_futures).
    p = pool_maker(workers=1)
    running = _start_blocked(p, fifo, tmp_path)
    queued = [p.submit(pow, 2, i) for i in range(20)]
    p.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    fifo.release()
    assert running.result(WAIT) == "released"
    assert not running.cancelled()


def test_cancel_futures_stops_maps(pool_maker: Callable[..., Pool], fifo: Fifo, tmp_path: Any) -> None:
    p = pool_maker(workers=1)
    running = _start_blocked(p, fifo, tmp_path)
    it = p.map(abs, range(1000), chunksize=10)
    p.shutdown(wait=False, cancel_futures=True)
    fifo.release()
    assert running.result(WAIT) == "released"
    with pytest.raises(cf.CancelledError):  # as a cancelled future's result(): never silently short
        list(it)


@pytest.mark.backends
def test_wait_and_as_completed(pool: Pool) -> None:
    futures = [pool.options(session=f"s{i}").submit(pow, 3, i) for i in range(20)]
    done, not_done = cf.wait(futures, timeout=WAIT)
    assert not not_done and len(done) == 20
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=WAIT)) == sorted(3**i for i in range(20))
    first = cf.wait(futures, timeout=WAIT, return_when=cf.FIRST_COMPLETED)
    assert first.done


@pytest.mark.backends
async def test_run_in_executor(pool: Pool) -> None:
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.run_in_executor(pool, pow, 2, 10), WAIT) == 1024
    results = await asyncio.wait_for(
        asyncio.gather(*(loop.run_in_executor(pool, operator.mul, i, i) for i in range(10))), WAIT
    )
    assert results == [i * i for i in range(10)]


@pytest.mark.backends
def test_submit_future_is_a_concurrent_future(pool: Pool) -> None:
    f = pool.submit(abs, -3)
    assert isinstance(f, cf.Future)
    assert f.result(WAIT) == 3 and f.done() and not f.cancelled()


def test_workers_must_be_positive() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError):
            Pool(bad)


class _Holder:
    def method(self) -> int:
        return 7


@pytest.mark.backends
def test_no_stale_references(pool: Pool) -> None:
    # CPython issue 16284: the executor keeps no reference to a submitted callable (here: an
    # object pickled by value with its bound method) once its future is done.
    import gc
    import weakref

    holder = _Holder()
    gone = weakref.ref(holder)
    future = pool.submit(holder.method)
    assert future.result(WAIT) == 7
    del holder
    gc.collect()
    assert gone() is None
    items = [_Holder() for _ in range(3)]
    refs = [weakref.ref(item) for item in items]
    results = pool.map(lambda h: h.method(), items)
    assert list(results) == [7, 7, 7]
    del items
    gc.collect()
    assert all(ref() is None for ref in refs)  # a finished map keeps none of its items


def test_executor_names() -> None:
    for name in ("submit", "map", "shutdown", "__enter__", "__exit__"):
        assert callable(getattr(poolbridge.Pool, name))
