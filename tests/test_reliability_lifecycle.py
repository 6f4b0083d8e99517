"""A pool's life: after ``close()`` (or its last reference) nothing of it is left — no fd, no
thread, no child; a closed pool says so consistently; an exception leaving ``with`` stops at once."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from typing import Any

import psutil
import pytest
from pb_faultmods import Fifo, pid_in, wait_until

import poolbridge
from poolbridge import PoolClosedError
from poolbridge import _testing as testing

WAIT = 30.0


def _snapshot() -> tuple[set[str], set[int], set[int]]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            fds.add(f"{name} -> {os.readlink(f'/proc/self/fd/{name}')}")
        except OSError:
            continue
    threads = {t.ident or 0 for t in threading.enumerate() if not t.name.startswith("pytest_timeout ")}
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    return fds, threads, children


def test_close_leaves_the_fds_threads_and_children_it_found() -> None:
    before = _snapshot()
    for _ in range(3):
        pool = poolbridge.Pool(workers=1)
        assert pool.call("operator.add", 1, 2) == 3
        pool.submit("operator.add", 1, 2).result(timeout=WAIT)  # the background reader ran too
        pool.options(timeout=WAIT).submit("operator.add", 1, 2).result(timeout=WAIT)  # and deadlines
        pool.close()
        after = _snapshot()
        assert after[0] == before[0], f"fds: {after[0] ^ before[0]}"
        assert after[1] == before[1], "threads left running"
        assert after[2] == before[2], "child processes left"


def test_closed_pool_reports_consistently_and_refuses_with() -> None:
    pool = poolbridge.Pool(workers=2)
    pool.close()
    assert pool.pids() == [-1, -1]
    assert [s.pid for s in pool.stats().slots] == pool.pids()
    assert not any(s.alive for s in pool.stats().slots)
    with pytest.raises(PoolClosedError), pool:
        pass
    with pytest.raises(PoolClosedError):
        pool.call("operator.add", 1, 2)


def test_a_dropped_pool_stops_its_workers_with_a_resource_warning() -> None:
    pool = poolbridge.Pool(workers=1)
    pids = pool.pids()
    alive = weakref.ref(pool)
    ref = pool.create("collections.Counter", "aab")  # a ref keeps its pool alive
    del pool
    assert alive() is not None and ref.call("most_common", 1) == [("a", 2)]
    with pytest.warns(ResourceWarning, match="unclosed poolbridge.Pool"):
        del ref
        gc.collect()
    assert alive() is None
    _, still = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=WAIT)
    assert not still


def test_a_pending_future_keeps_its_pool_until_it_completes() -> None:
    with pytest.warns(ResourceWarning, match="unclosed"):
        future = poolbridge.Pool(workers=1).submit("operator.add", 20, 22)
        assert future.result(timeout=WAIT) == 42
        del future
        gc.collect()


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, RuntimeError])
def test_an_exception_leaving_with_stops_at_once(exc_type: type[BaseException], fifo: Fifo, tmp_path: Any) -> None:
    """Not the plain exit's wait for calls in flight: what runs is stopped (its worker killed,
    its call failed), what has not started is cancelled (as by shutdown(cancel_futures=True))."""
    pool = poolbridge.Pool(workers=1)
    channel = testing.channels(pool)[0]
    marker = str(tmp_path / "running")
    with pytest.raises(exc_type), pool:
        # This call would finish by itself after 3 s (the fifo wait's own bound): a close that
        # waited would see it answered; a prompt one fails it.
        running = pool.submit("pb_faultmods.mark_and_wait", marker, fifo.path, 3.0)
        wait_until(lambda: pid_in(marker), WAIT, what="the first call to start")
        queued = pool.submit("pb_testmods.record", "never", "ran")
        raise exc_type
    assert pool.closed
    assert isinstance(running.exception(timeout=WAIT), PoolClosedError)
    assert queued.cancelled()
    assert channel.exitcode is not None and channel.exitcode < 0  # stopped, not waited for


def test_a_plain_with_exit_waits_for_calls_in_flight(fifo: Fifo) -> None:
    with poolbridge.Pool(workers=1) as pool:
        running = pool.submit("pb_faultmods.wait_fifo", fifo.path)
        fifo.release()
    assert running.result(timeout=0) == "released"


async def test_async_with_an_exception_stops_at_once(fifo: Fifo) -> None:
    aio = poolbridge.AsyncPool(workers=1)
    channel = testing.channels(aio.pool)[0]
    with pytest.raises(RuntimeError):
        async with aio:
            running = aio.submit("pb_faultmods.wait_fifo", fifo.path, 3.0)
            raise RuntimeError
    with pytest.raises(PoolClosedError):
        await running
    assert channel.exitcode is not None and channel.exitcode < 0
    with pytest.raises(PoolClosedError):
        async with aio:
            pass


def test_the_leak_check_sees_a_leaked_pipe() -> None:
    """The suite's own teardown check (conftest) reports a pipe left open, naming it."""
    from conftest import _fds, _leaked_resources, _threads

    fds, threads = _fds(), _threads()
    r, w = os.pipe()
    try:
        leaked = _leaked_resources(fds, threads, settle=0.0)
        assert any(f"fd {r} -> pipe:" in item for item in leaked), leaked
    finally:
        os.close(r)
        os.close(w)
    wait_until(lambda: not _leaked_resources(fds, threads, settle=0.0), WAIT, what="no leak")
