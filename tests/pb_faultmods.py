"""Worker-side helpers of the fault-tolerance, limits, soak and asyncio tests.

Everything here is imported by dotted path inside worker processes (``tests/`` is on the parent's
``sys.path``, which workers inherit). Functions that *block* do so on something the test controls
— a named pipe (``os.mkfifo``) the test writes to — never on a sleep, and always with a bound so a
broken test cannot hang a worker forever.

The module also carries a few parent-side utilities (``ProcessHygiene``, ``wait_until``) shared by
the test files; they import nothing heavy at module level so a worker pays nothing for them.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from pb_testmods import sessions_on_slot

import poolbridge

# -- plain values -------------------------------------------------------------------------------


def echo(*args: Any) -> Any:
    """Returns its inputs, plus what the worker knows of the session (for the soak accounting)."""
    ctx = poolbridge.current_session()
    return [list(args), ctx.session_id if ctx is not None else None]


def getpid() -> int:
    return os.getpid()


def whoami() -> dict[str, Any] | None:
    ctx = poolbridge.current_session()
    if ctx is None:
        return None
    return {"session": ctx.session_id, "slot": ctx.slot, "generation": ctx.generation, "pid": os.getpid()}


def add(a: int, b: int) -> int:
    return a + b


class Box:
    """A stateful object kept in a worker as a ref."""

    def __init__(self, value: Any = 0) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value

    def incr(self, by: int = 1) -> Any:
        self.value += by
        return self.value


def make_blob(n: int) -> bytearray:
    """``n`` bytes whose pages are all touched (``bytearray(n)`` alone may stay lazily mapped)."""
    blob = bytearray(n)
    step = 4096
    for i in range(0, n, step):  # touch one byte a page: cheap, and every page becomes resident
        blob[i] = 1
    return blob


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# -- blocking on a fifo the test controls ----------------------------------------------------------


def wait_fifo(path: str, limit: float = 60.0, value: Any = "released") -> Any:
    """Block until the test writes a byte to the fifo at ``path`` (bounded by ``limit`` seconds).

    The fifo is opened read-write, which never blocks on Linux and keeps a writer open, so
    ``select`` sleeps until a byte really arrives: the worker waits on the fifo, not on a timer.
    Each byte written releases exactly one waiter.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        ready, _, _ = select.select([fd], [], [], limit)
        if not ready:
            raise TimeoutError(f"nobody wrote to {path} within {limit}s")
        os.read(fd, 1)
        return value
    finally:
        os.close(fd)


def mark_and_wait(marker: str, fifo: str, limit: float = 60.0, value: Any = "released") -> Any:
    """Create ``marker`` (the test knows the call is running), then block on ``fifo``."""
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    return wait_fifo(fifo, limit, value)


def mark(marker: str, value: Any = None) -> Any:
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    return value


def mark_then_die(marker: str, how: str) -> None:
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    die(how)


# -- ways for user code to end --------------------------------------------------------------------


class Boom(Exception):
    pass


def die(how: str, arg: Any = None) -> Any:
    """Fail inside user code in one of several ways."""
    if how == "raise":
        raise Boom(f"boom {arg}")
    if how == "sys.exit":
        sys.exit(arg if arg is not None else 3)
    if how == "os._exit":
        os._exit(arg if arg is not None else 7)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)
    if how == "abort":
        os.abort()
    raise ValueError(f"unknown way to die: {how}")


def crash_after(n: int, how: str = "sigkill") -> Iterator[int]:
    """A generator that yields ``n`` items, then takes its worker down."""
    yield from range(n)
    die(how)


def gen_raise_after(n: int) -> Iterator[int]:
    yield from range(n)
    raise Boom(f"after {n}")


# Per-worker record of generator finalisation, read back in the same session (same worker).
FINALLY: dict[str, int] = {}


def counting_gen(token: str, n: int) -> Iterator[int]:
    try:
        yield from range(n)
    finally:
        FINALLY[token] = FINALLY.get(token, 0) + 1


def finally_count(token: str) -> int:
    return FINALLY.get(token, 0)


# -- codec faults -----------------------------------------------------------------------------------


class UnpicklingBoom(Exception):
    pass


def _explode_on_unpickle(where: str) -> Any:
    raise UnpicklingBoom(f"refusing to be unpickled ({where})")


class ExplodesOnUnpickle:
    """Pickles fine everywhere; unpickling it raises — everywhere (sent as an argument, the worker
    is the only place it is ever unpickled)."""

    def __reduce__(self) -> Any:
        return (_explode_on_unpickle, ("worker",))


def _rebuild_only_in_worker(value: Any) -> Any:
    if poolbridge.current_session() is None:
        raise UnpicklingBoom("this object can only be unpickled inside a worker")
    return ParentCannotUnpickle(value)


class ParentCannotUnpickle:
    """A result that pickles in the worker and cannot be unpickled in the parent (router)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        return (_rebuild_only_in_worker, (self.value,))


def make_parent_cannot_unpickle(value: Any) -> ParentCannotUnpickle:
    return ParentCannotUnpickle(value)


class PicklingBoom(Exception):
    pass


class RefusesPickling:
    """A result whose pickling raises: with ret='auto' it comes back as a Ref."""

    def __init__(self, value: Any = 1) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        raise PicklingBoom("this object refuses to be pickled")

    def get(self) -> Any:
        return self.value


def make_refuses_pickling(value: Any = 1) -> RefusesPickling:
    return RefusesPickling(value)


def accept(value: Any) -> str:
    return type(value).__name__


# -- async-side probes ------------------------------------------------------------------------------


def session_of() -> str | None:
    ctx = poolbridge.current_session()
    return ctx.session_id if ctx is not None else None


# -- parent-side utilities (used by the tests, not by workers) ---------------------------------------


def resource_tracker_pid() -> int | None:
    """The stdlib resource tracker of this process, if started: a process-wide helper that pools
    with shared memory start once and that outlives them by design (as with multiprocessing)."""
    from multiprocessing import resource_tracker

    return resource_tracker._resource_tracker._pid  # type: ignore[attr-defined,no-any-return]


def resource_tracker_fd() -> int | None:
    """This process's end of the resource tracker's pipe, if started (see resource_tracker_pid)."""
    from multiprocessing import resource_tracker

    return resource_tracker._resource_tracker._fd  # type: ignore[attr-defined,no-any-return]


def is_resource_tracker(p: Any) -> bool:
    """A resource tracker (this process's or a server's): not a worker, outlives pools by design."""
    try:
        return "multiprocessing.resource_tracker" in " ".join(p.cmdline())
    except Exception:
        return False


def wait_until(predicate: Any, limit: float, interval: float = 0.01, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {limit}s")
        time.sleep(interval)


class ProcessHygiene:
    """Children of the test process before/after a test: no zombie, no orphan.

    ``allowed()`` returns the pids that may legitimately outlive the test (workers of a pool shared
    by the module, possibly restarted by the test). Every other child that appeared during the
    test must be gone within ``limit`` seconds, and no child may be a zombie.
    """

    #: Processes that are never a test's (conftest: the session's Ray, while it runs).
    ignored: Any = staticmethod(lambda: set())

    def __init__(self, allowed: Any = None, limit: float = 15.0) -> None:
        self.allowed = allowed or (lambda: set())
        self.limit = limit

    def __enter__(self) -> ProcessHygiene:
        import psutil

        self.before = {p.pid for p in psutil.Process().children(recursive=True)}
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        import psutil

        gc.collect()
        me = psutil.Process()
        deadline = time.monotonic() + self.limit
        while True:
            allowed = set(self.allowed()) | self.ignored()
            bad = []
            for p in me.children(recursive=True):
                try:
                    status = p.status()
                except psutil.NoSuchProcess:
                    continue
                if status == psutil.STATUS_ZOMBIE:
                    bad.append(f"zombie pid {p.pid}")
                elif p.pid not in allowed and p.pid not in self.before and p.pid != resource_tracker_pid():
                    bad.append(f"orphan pid {p.pid} {' '.join(p.cmdline())[:100]}")
            if not bad:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"process hygiene: {bad}")
            time.sleep(0.02)


# -- helpers with session state (Pool(helpers=["pb_faultmods"])) -------------------------------------


@poolbridge.helper("pbf_remember", context=True)
def _pbf_remember(ctx: poolbridge.SessionContext, key: str, value: Any) -> int:
    ctx.state[key] = value
    return len(ctx.state)


@poolbridge.helper("pbf_forget", context=True)
def _pbf_forget(ctx: poolbridge.SessionContext) -> None:
    ctx.state.clear()


# -- parent-side: sessions of a slot, fifos ----------------------------------------------------------


def sessions_for_slot(pool: Any, slot: int, n: int, prefix: str) -> list[str]:
    """``n`` distinct session ids that hash to ``slot`` of ``pool``."""
    return sessions_on_slot(pool, slot, n, prefix)


class Fifo:
    """A named pipe the test holds open read-write; ``release(k)`` lets ``k`` waiters go."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.mkfifo(path)
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def release(self, k: int = 1) -> None:
        os.write(self._fd, b"x" * k)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def pid_in(marker: str) -> int:
    """The pid a worker wrote into ``marker`` (0 while it is not there yet)."""
    try:
        with open(marker) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0
    return int(text.split()[0]) if text else 0


def yield_made(factory: str, n: int, bad_at: int = 0) -> Iterator[Any]:
    """Yields ``n`` plain ints, except item ``bad_at`` which is ``factory(i)`` (a codec fault)."""
    make = globals()[factory]
    for i in range(n):
        yield make(i) if i == bad_at else i


def gone(pid: int) -> bool:
    """Not running any more (a zombie waiting for a non-reaping init counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Factory:
    """A ref whose methods and attributes produce codec faults."""

    def __init__(self) -> None:
        self.unpicklable = RefusesPickling(7)
        self.parent_cannot = ParentCannotUnpickle(7)

    def make(self, kind: str) -> Any:
        return RefusesPickling(7) if kind == "unpicklable" else ParentCannotUnpickle(7)


@poolbridge.helper("pbf_make", context=False)
def _pbf_make(kind: str) -> Any:
    return RefusesPickling(7) if kind == "unpicklable" else ParentCannotUnpickle(7)


def worker_pids_of(router_pid: int) -> list[int]:
    """The worker processes of the pool whose router is process ``router_pid``: the children of
    its template process (``_worker_template``), or its own children where workers are spawned
    directly."""
    import psutil

    workers = []
    for child in psutil.Process(router_pid).children():
        try:
            if "poolbridge._worker_template" in " ".join(child.cmdline()) and child.ppid() == router_pid:
                workers += [g.pid for g in child.children()]
            elif not is_resource_tracker(child):
                workers.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return workers
