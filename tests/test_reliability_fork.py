"""A pool belongs to the process that made it: after ``os.fork()`` the child cannot use it, never
touches the parent's pipes or workers (not even at exit), and the parent's calls are untouched."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import select
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from pb_faultmods import Fifo

import poolbridge
from poolbridge import PoolClosedError
from poolbridge import _testing as testing

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

WAIT = 30.0


def _pipe_inodes(pool: poolbridge.Pool) -> set[int]:
    """The inodes of the pool's worker pipes and template socket (as this process holds them)."""
    inodes = set()
    for slot in range(pool.workers):
        for fd in testing.pipe_fds(pool, slot):
            inodes.add(os.fstat(fd).st_ino)
    template = testing.template_fd(pool)
    if template is not None:
        inodes.add(os.fstat(template).st_ino)
    return inodes


def _open_inodes() -> set[int]:
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            inodes.add(os.fstat(int(name)).st_ino)
        except OSError:
            continue
    return inodes


def _in_child(work: Callable[[], dict[str, Any]], hold: tuple[int, int] | None = None) -> tuple[int, int]:
    """Fork; the child runs ``work`` and reports its result as JSON through a pipe, then (if
    ``hold`` is a pipe) waits for EOF on it before exiting. Returns (pid, report fd)."""
    r, w = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns about forking a threaded process: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            try:
                report = work()
            except BaseException as exc:
                report = {"crashed": repr(exc)}
                code = 1
            os.write(w, json.dumps(report).encode())
            os.close(w)
            if hold is not None:
                os.close(hold[1])
                select.select([hold[0]], [], [], WAIT)
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _report(pid: int, r: int) -> dict[str, Any]:
    data = b""
    deadline = time.monotonic() + WAIT
    while (remaining := deadline - time.monotonic()) > 0 and select.select([r], [], [], remaining)[0]:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    assert data, "the child reported nothing"
    return json.loads(data)  # type: ignore[no-any-return]


def _reap(pid: int, wait: float = WAIT) -> int:
    """The child's exit code; a child still running after ``wait`` is killed (and the test fails)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)  # polling the child's exit, bounded
    _kill(pid)
    raise AssertionError("the forked child did not exit")


def _kill(pid: int) -> None:
    os.kill(pid, 9)
    os.waitpid(pid, 0)


def _raises(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except PoolClosedError as exc:
        return f"PoolClosedError: {exc}"
    except BaseException as exc:
        return f"other {type(exc).__name__}: {exc}"
    return "no error"


def test_a_forked_child_cannot_use_the_pool_and_the_parent_is_untouched(pool_maker: Any, fifo: Fifo) -> None:
    pool = pool_maker(workers=2)
    pids = pool.pids()
    parent = os.getpid()
    # A call in flight at the fork: its reply must reach the parent, and only the parent.
    in_flight = pool.options(session="p").submit("pb_faultmods.wait_fifo", fifo.path, 60.0, 540)
    pipes = _pipe_inodes(pool)

    def child() -> dict[str, Any]:
        aio = pool.aio
        report = {
            "call": _raises(lambda: pool.options(session="c", timeout=2).call("operator.add", 40, 0)),
            "submit": _raises(lambda: pool.options(session="c").submit("operator.add", 40, 0)),
            "create": _raises(lambda: pool.create("collections.Counter")),
            "stats": _raises(pool.stats),
            "pids": _raises(pool.pids),
            "with": _raises(lambda: pool.__enter__()),
            "aio": _raises(lambda: asyncio.run(aio.call("operator.add", 1, 2))),
            "inherited future": _raises(lambda: in_flight.result(timeout=2)),
            "holds parent pipes": bool(pipes & _open_inodes()),
        }
        # Everything that runs at a child's exit must leave the parent's workers alone.
        pool.close()
        pool.close(cancel=True)
        poolbridge._pool._close_live_pools()
        gc.collect()
        return report

    pid, r = _in_child(child)
    try:
        report = _report(pid, r)
    except BaseException:
        _kill(pid)  # e.g. a child stuck in a call that reached the parent's worker
        raise
    assert _reap(pid) == 0, report
    for what in ("call", "submit", "create", "stats", "pids", "with", "aio", "inherited future"):
        assert report[what].startswith("PoolClosedError"), (what, report[what])
        assert f"belongs to process {parent}" in report[what] and "make a new Pool in the child" in report[what]
    assert report["holds parent pipes"] is False

    # The parent: same workers, its in-flight call answered to it, new calls answered to it.
    assert pool.pids() == pids
    fifo.release()
    assert in_flight.result(timeout=WAIT) == 540
    assert pool.options(session="p", timeout=WAIT).call("operator.add", 1000, 0) == 1000
    assert pool.options(session="c", timeout=WAIT).call("operator.add", 40, 0) == 40


def test_a_living_forked_child_does_not_keep_the_parents_workers_alive(pool_maker: Any) -> None:
    """The child's copies of the request pipes are closed at fork: when the parent closes its
    pool, the workers see EOF and exit cleanly (exit code 0), child or no child."""
    pool = pool_maker(workers=2)
    assert pool.call("operator.add", 1, 2) == 3
    hold_r, hold_w = os.pipe()
    pid, r = _in_child(lambda: {"ok": True}, hold=(hold_r, hold_w))
    try:
        assert _report(pid, r) == {"ok": True}
        channels = testing.channels(pool)
        pool.close()
        assert [ch.exitcode for ch in channels] == [0, 0]  # EOF, not killed after a timeout
    finally:
        os.close(hold_w)  # the child exits on EOF
        os.close(hold_r)
        _reap(pid, 5.0)
