"""Shared fixtures of the core suite.

* ``pool``: one real pool (2 worker subprocesses, ``pb_helpers`` loaded) per test module. Tests that
  need exact counters or special options start their own pool.
* Process hygiene: after every test module, and after the whole session, no child process of the
  test process may be left (bounded wait for orderly exits first), and the test process has the
  file descriptors and threads it had before (a leaked pipe or thread fails the suite, naming it).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from hypothesis import settings
from pb_faultmods import Fifo, resource_tracker_fd, resource_tracker_pid

import poolbridge

# No example database: the suite leaves no files behind in the working tree.
settings.register_profile("poolbridge", database=None, deadline=None)
settings.load_profile("poolbridge")

EXIT_WAIT = 15.0  # upper bound for children to go away after their pool closed


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:  # pragma: no cover
        return []


def _leftovers(ignore: set[int]) -> list[str]:
    gc.collect()  # a pool nobody closed but nobody references either
    ignore = ignore | {resource_tracker_pid()}  # the stdlib's, shared by every pool (see _shm.py)
    procs = [p for p in _children() if p.pid not in ignore]
    _, alive = psutil.wait_procs(procs, timeout=EXIT_WAIT)
    out = []
    for p in alive:
        try:
            out.append(f"pid {p.pid} {p.status()} {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            continue
    return out


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd of the listing itself, closed meanwhile
            continue
    return out


def _threads() -> dict[int, str]:
    # pytest-timeout's timer of the running test (timeout_method = "thread") is not ours.
    return {t.ident or 0: t.name for t in threading.enumerate() if not t.name.startswith("pytest_timeout ")}


# Ray, once started in this process, keeps threads, sockets, pipes and log files of its own after
# shutdown (gRPC, its log monitor, its driver logs): those are Ray's, not leaks of ours. The fds
# that appeared in the test module that started Ray are exempt from then on, and with Ray loaded
# only our own threads (poolbridge-*) are counted; the Ray tests check their own teardown
# (tests/test_ray_backend.py: no actor, process or Ray runtime left).
_ray_fds: dict[int, str] = {}


def _leaked_resources(fds: dict[int, str], threads: dict[int, str], settle: float | None = None) -> list[str]:
    """File descriptors and threads that were not there before, after a bounded settle time:
    closing is synchronous, but a thread that was told to stop may take a moment to end."""
    deadline = time.monotonic() + (LEAK_SETTLE if settle is None else settle)
    while True:
        gc.collect()  # a pool nobody closed but nobody references either (it warns, too)
        new_fds = {fd: target for fd, target in _fds().items() if fds.get(fd) != target and _ray_fds.get(fd) != target}
        new_fds.pop(resource_tracker_fd(), None)  # type: ignore[arg-type]  # the stdlib's, shared by every pool
        new_threads = {ident: name for ident, name in _threads().items() if ident not in threads}
        if _ray_fds:
            new_threads = {i: n for i, n in new_threads.items() if n.startswith("poolbridge-")}
        if (not new_fds and not new_threads) or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # polling a condition, bounded by LEAK_SETTLE
    return [f"fd {fd} -> {target}" for fd, target in sorted(new_fds.items())] + [
        f"thread {name!r}" for name in sorted(new_threads.values())
    ]


LEAK_SETTLE = 5.0  # upper bound for stopped threads to end and fds to close after teardown


@pytest.fixture(scope="session", autouse=True)
def _no_leaks_after_suite() -> Iterator[None]:
    fds, threads = _fds(), _threads()
    yield
    left = _leftovers(set())
    assert not left, f"child processes left after the test session: {left}"
    leaked = _leaked_resources(fds, threads)
    assert not leaked, f"left open after the test session: {leaked}"


@pytest.fixture(scope="module", autouse=True)
def _no_leaks_after_module() -> Iterator[None]:
    before = {p.pid for p in _children()}
    fds, threads = _fds(), _threads()
    yield
    left = _leftovers(before)
    assert not left, f"child processes left after this test module: {left}"
    new_fds = {fd: target for fd, target in _fds().items() if fds.get(fd) != target}
    if any("/ray/session_" in target for target in new_fds.values()):  # Ray ran in this process
        _ray_fds.update(new_fds)
    leaked = _leaked_resources(fds, threads)
    assert not leaked, f"left open after this test module: {leaked}"


def make_pool(**kwargs: object) -> poolbridge.Pool:
    kwargs.setdefault("workers", 2)
    kwargs.setdefault("helpers", ["pb_helpers"])
    return poolbridge.Pool(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def pool_maker() -> Iterator[Callable[..., poolbridge.Pool]]:
    """A factory of pools of this test alone (one worker unless told), all closed with
    ``cancel=True`` after it: for tests that kill, block or recycle workers."""
    pools: list[poolbridge.Pool] = []

    def make(**kwargs: Any) -> poolbridge.Pool:
        kwargs.setdefault("workers", 1)
        p = poolbridge.Pool(**kwargs)  # type: ignore[arg-type]
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.close(cancel=True)
    for p in pools:  # and their shared memory, all of it (see poolbridge/_shm.py)
        if p._shm is not None:
            prefix = p._shm.prefix.lstrip("/")
            left = [e for e in os.listdir("/dev/shm") if e.startswith(prefix)]
            assert not left, f"shared memory left after close(): {left}"


@pytest.fixture
def fifo(tmp_path: Any) -> Iterator[Fifo]:
    """A named pipe that blocks workers (``pb_faultmods.wait_fifo``) until the test releases them."""
    f = Fifo(str(tmp_path / "gate"))
    try:
        yield f
    finally:
        f.release(256)  # never leave a worker blocked on it
        f.close()


@pytest.fixture(scope="module")
def pool() -> Iterator[poolbridge.Pool]:
    p = make_pool()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def fresh_pool() -> Iterator[poolbridge.Pool]:
    """A pool of this test alone: for exact counters (stats) and per-pool options."""
    p = make_pool()
    try:
        yield p
    finally:
        p.close()


def expect_routed(pool: poolbridge.Pool, seen: dict | None, session: str) -> None:
    """``seen`` (a ``pb_testmods.whoami()`` result) ran in ``session``, in that session's worker."""
    assert seen is not None, "the worker reported no current session"
    slot = pool.slot_for(session)
    assert seen["session"] == session
    assert seen["slot"] == slot
    assert seen["pid"] == pool.pids()[slot]


THREAD_WAIT = 60.0  # bound for every helper thread


def run_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a fresh thread (a fresh context: its own auto-session), bounded;
    return its result or raise its exception here."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(THREAD_WAIT)
    assert not t.is_alive(), "thread did not finish"
    if "error" in box:
        raise box["error"]
    return box["value"]
