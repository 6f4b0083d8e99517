"""Shared fixtures of the core suite.

* ``pool``: one real pool (2 worker subprocesses, ``pb_helpers`` loaded) per test module. Tests that
  need exact counters or special options start their own pool.
* Backends: a test (or module) marked ``@pytest.mark.backends`` runs once per backend, "process" and
  "ray" (``@pytest.mark.backends("ray")``: Ray only), with the same body: its ``pool`` and
  ``pool_maker`` are that backend's. The Ray ``pool`` is one pool for the whole test session
  (``ray_pool``): poolbridge starts a small local Ray for it (``RAY_INIT``) and shuts Ray down when
  it closes, at the end of the session. The Ray runs are moved to the end of the session, so every
  other test runs (and checks its processes, fds and threads) without Ray's. Ray runs are skipped,
  with the reason, where Ray is not installed — except under ``CI``, which installs ``.[ray]``:
  there a missing Ray is an error.
* Process hygiene: after every test module, and after the whole session, no child process of the
  test process may be left (bounded wait for orderly exits first), and the test process has the
  file descriptors and threads it had before (a leaked pipe or thread fails the suite, naming it).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psutil
import pytest
from hypothesis import settings
from pb_faultmods import Fifo, ProcessHygiene, resource_tracker_fd, resource_tracker_pid

import poolbridge
from poolbridge import _testing as testing

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
    ignore = ignore | {resource_tracker_pid()} | _ray.processes()  # the stdlib's, shared by every pool (see _shm.py)
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


class _RaySession:
    """What the session's Ray (started by ``ray_pool``) owns in this test process, so the leak checks
    tell it from ours: Ray's own processes (its head processes started with the shared pool, and
    everything under them — agents, idle workers — except actors of poolbridge pools other than the
    shared one), and the fds and threads Ray keeps (gRPC, log files: some stay after its shutdown)."""

    def __init__(self) -> None:
        self.pool: poolbridge.Pool | None = None
        self.heads: set[int] = set()  # Ray's processes started under us (gcs_server, raylet, ...)
        self.fds: dict[int, str] = {}  # fds that appeared while Ray started
        self.ran = False
        self.next_test_on_ray = False  # the test about to be set up runs on backend="ray"

    def processes(self) -> set[int]:
        """Pids of Ray's own processes and of the shared pool's actors (a pool's actor is a leak once
        the pool is closed: those are not in here)."""
        if not self.heads:
            return set()
        ours = set(self.pool.pids()) if self.pool is not None and not self.pool.closed else set()
        out = set()
        for head in self.heads:
            try:
                tree = [psutil.Process(head), *psutil.Process(head).children(recursive=True)]
            except psutil.Error:
                continue
            for p in tree:
                try:
                    actor = p.name().startswith("ray::_SlotWorker")
                except psutil.Error:
                    continue
                if not actor or p.pid in ours:
                    out.add(p.pid)
        return out

    def threads(self) -> set[str]:
        """The delivery threads of the shared pool's current actors (a restart replaces them)."""
        pool = self.pool
        if pool is None or pool.closed:
            return set()
        return {f"poolbridge-ray-{slot}.{testing.generation(pool, slot)}" for slot in range(pool.workers)}

    def owns_fd(self, fd: int, target: str) -> bool:
        # Once Ray ran here, its gRPC and event-loop fds come and go (connections to new actors) and
        # some stay after its shutdown: sockets, eventfd/epoll/timerfd and its session's log files.
        # Pipes, pidfds and /dev/shm stay checked: those are poolbridge's.
        if self.fds.get(fd) == target:
            return True
        return self.ran and (
            target.startswith(("socket:", "anon_inode:[eventfd]", "anon_inode:[eventpoll]", "anon_inode:[timerfd]"))
            or target.startswith("/tmp/ray/")
        )


_ray = _RaySession()


def ray_processes() -> set[int]:
    """Pids of the session's Ray and of its shared pool's actors (empty when Ray is not running):
    for per-test process checks, which must not count Ray's own comings and goings."""
    return _ray.processes()


ProcessHygiene.ignored = staticmethod(ray_processes)  # type: ignore[method-assign]


def _leaked_resources(fds: dict[int, str], threads: dict[int, str], settle: float | None = None) -> list[str]:
    """File descriptors and threads that were not there before, after a bounded settle time:
    closing is synchronous, but a thread that was told to stop may take a moment to end."""
    deadline = time.monotonic() + (LEAK_SETTLE if settle is None else settle)
    while True:
        gc.collect()  # a pool nobody closed but nobody references either (it warns, too)
        new_fds = {
            fd: target for fd, target in _fds().items() if fds.get(fd) != target and not _ray.owns_fd(fd, target)
        }
        new_fds.pop(resource_tracker_fd(), None)  # type: ignore[arg-type]  # the stdlib's, shared by every pool
        new_threads = {ident: name for ident, name in _threads().items() if ident not in threads}
        if _ray.ran:  # Ray's own threads come and go: only ours count, less the shared Ray pool's
            shared = _ray.threads()
            new_threads = {i: n for i, n in new_threads.items() if n.startswith("poolbridge-") and n not in shared}
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
def _no_leaks_after_module(request: pytest.FixtureRequest) -> Iterator[None]:
    if _ray.next_test_on_ray:
        request.getfixturevalue("ray_pool")  # Ray and the shared pool first: they outlive this module
    before = {p.pid for p in _children()}
    fds, threads = _fds(), _threads()
    yield
    left = _leftovers(before)
    assert not left, f"child processes left after this test module: {left}"
    leaked = _leaked_resources(fds, threads)
    assert not leaked, f"left open after this test module: {leaked}"


# -- backends ----------------------------------------------------------------------------------------

BACKENDS = ("process", "ray")
# The session's local Ray: small, no dashboard, quiet about the driver's log lines.
RAY_INIT: dict[str, Any] = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A marked test that takes no pool of the backend (its own ``make_pool``, no pool) runs once.
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "backend" in metafunc.fixturenames:
        names: Sequence[str] = marker.args or BACKENDS
        metafunc.parametrize("backend", names, indirect=True, scope="module")


def _on_ray(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("backend") == "ray"


@pytest.hookimpl(trylast=True)  # after pytest's own grouping by module-scoped parameters
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The Ray runs last (in their order): Ray, once started, runs until the session ends, and no
    other test should see its processes, fds and threads come and go."""
    items[:] = [item for item in items if not _on_ray(item)] + [item for item in items if _on_ray(item)]


@pytest.hookimpl(tryfirst=True)  # before the fixtures of ``item`` are set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    _ray.next_test_on_ray = _on_ray(item)


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """The backend of this run of a test: "process" unless the test is marked ``backends``."""
    name: str = getattr(request, "param", "process")
    if name == "ray":
        request.getfixturevalue("ray_pool")
    return name


@pytest.fixture(scope="session")
def ray_pool() -> Iterator[poolbridge.Pool]:
    """The Ray pool of the whole session (2 actors, helpers ``pb_helpers`` and ``pb_faultmods``).
    Creating it starts Ray (poolbridge does, with ``RAY_INIT``); closing it, the last Ray pool, shuts
    Ray down again."""
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            raise  # CI installs poolbridge[ray]: a missing Ray is a broken job, not a skip
        pytest.skip("Ray is not installed (pip install 'poolbridge[ray]')")
    assert not ray.is_initialized(), "the tests start their own Ray"
    children, fds = {p.pid for p in _children()}, _fds()
    pool = make_pool(backend="ray", ray_init=RAY_INIT, helpers=["pb_helpers", "pb_faultmods"])
    _ray.ran, _ray.pool = True, pool
    _ray.heads = {p.pid for p in psutil.Process().children() if p.pid not in children}
    _ray.fds = {fd: target for fd, target in _fds().items() if fds.get(fd) != target}
    try:
        yield pool
    finally:
        pool.close()
        _ray.pool = None
    # poolbridge started Ray for this pool, so closing the last Ray pool shut it down; the session's
    # check then finds none of Ray's processes left either.
    assert not ray.is_initialized(), "closing the last Ray pool did not shut down the Ray poolbridge started"
    _, alive = psutil.wait_procs([p for p in _children() if p.pid in _ray.processes()], timeout=EXIT_WAIT)
    _ray.heads = set()
    assert not alive, f"Ray processes left after Ray shut down: {alive}"


def make_pool(**kwargs: object) -> poolbridge.Pool:
    kwargs.setdefault("workers", 2)
    kwargs.setdefault("helpers", ["pb_helpers"])
    return poolbridge.Pool(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def pool_maker(backend: str) -> Iterator[Callable[..., poolbridge.Pool]]:
    """A factory of pools of this test alone (one worker unless told; on the test's backend), all
    closed with ``cancel=True`` after it: for tests that kill, block or recycle workers."""
    pools: list[poolbridge.Pool] = []

    def make(**kwargs: Any) -> poolbridge.Pool:
        kwargs.setdefault("workers", 1)
        kwargs.setdefault("backend", backend)
        p = poolbridge.Pool(**kwargs)  # type: ignore[arg-type]
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.close(cancel=True)
    for p in pools:  # and their shared memory, all of it (see poolbridge/_shm.py)
        prefix = testing.shm_prefix(p)
        if prefix is not None:
            left = [e for e in os.listdir("/dev/shm") if e.startswith(prefix.lstrip("/"))]
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
def process_pool() -> Iterator[poolbridge.Pool]:
    p = make_pool()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest, backend: str) -> poolbridge.Pool:
    """This module's pool on the test's backend: the module's process pool, or the session's Ray pool."""
    return request.getfixturevalue("ray_pool" if backend == "ray" else "process_pool")  # type: ignore[no-any-return]


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
