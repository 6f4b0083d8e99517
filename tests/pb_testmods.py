"""Functions and classes that the worker processes import (by dotted path) in the core tests.

Everything here runs in a worker unless said otherwise. ``whoami()`` is the probe: the session the
worker received for the running operation (``poolbridge.current_session()``) and its own pid.
Side effects are recorded in ``EVENTS`` (per worker process, keyed by a token the test chooses) and
read back with ``pop_events`` in the same session, hence in the same worker.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import poolbridge

# token -> list of (kind, whoami) recorded in this worker process.
EVENTS: dict[str, list[Any]] = {}
# token -> set of the worker's request counter values seen while producing items of a stream.
PULLS: dict[str, set[int]] = {}


def whoami(*_args: Any, **_kwargs: Any) -> dict[str, Any] | None:
    """What the worker knows about the running operation: session, slot, generation, pid."""
    ctx = poolbridge.current_session()
    if ctx is None:
        return None
    return {"session": ctx.session_id, "slot": ctx.slot, "generation": ctx.generation, "pid": os.getpid()}


def record(token: str, kind: str, value: Any = None) -> None:
    EVENTS.setdefault(token, []).append((kind, value))


def record_call(token: str, *args: Any, **kwargs: Any) -> str:
    """A side effect that proves a request reached a worker and ran."""
    record(token, "called", whoami())
    return "ran"


def log_seq(token: str, i: int) -> int:
    """Appends ``i`` to the token's events: the order in which calls ran."""
    EVENTS.setdefault(token, []).append(i)
    return i


def pop_events(token: str) -> list[Any]:
    return EVENTS.pop(token, [])


def getpid() -> int:
    return os.getpid()


def identity(value: Any) -> Any:
    return value


def describe(value: Any) -> str:
    """Type and repr of an argument as the worker sees it."""
    return f"{type(value).__module__}.{type(value).__qualname__}:{value!r}"


def make_lock() -> threading.Lock:
    return threading.Lock()


def make_unencodable_list() -> list[Any]:
    return [1, threading.Lock()]


def wait_for_path(path: str, limit: float = 60.0) -> bool:
    """Block (bounded) until ``path`` exists; the test releases it by creating the file."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class Recorder:
    """An object kept in a worker as a ref; every way of touching it records the session it ran in."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.created_in = whoami()
        self.set_in: Any = None
        self._value: Any = None
        self.calls = 0

    def who(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return whoami()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        record(self.token, "call", whoami())
        return whoami()

    @property
    def where(self) -> Any:
        return whoami()

    @where.setter
    def where(self, value: Any) -> None:
        self.set_in = whoami()
        self._value = value

    @property
    def value(self) -> Any:
        return self._value

    def gen(self, n: int) -> Any:
        for _ in range(n):
            yield whoami()

    def __del__(self) -> None:
        # Dropped by release / close_session: runs inside that op, so the session is still current.
        record(self.token, "del", whoami())


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.n = start

    def incr(self, by: int = 1) -> int:
        self.n += by
        return self.n


# -- generators for streams --------------------------------------------------------------------


def gen_whoami(n: int) -> Any:
    for _ in range(n):
        yield whoami()


def gen_range(n: int) -> Any:
    yield from range(n)


def gen_counted(token: str, n: int) -> Any:
    """Yields 0..n-1, noting which worker request produced each item."""
    from poolbridge import _worker

    core = _worker.active_core()
    seen = PULLS.setdefault(token, set())
    for i in range(n):
        if core is not None:
            seen.add(core.calls)
        yield i


def pulls(token: str) -> int:
    return len(PULLS.pop(token, set()))


def gen_with_finally(token: str, n: int) -> Any:
    try:
        yield from range(n)
        record(token, "exhausted", whoami())
    finally:
        record(token, "finally", whoami())


def gen_then_raise(n: int, message: str = "generator failed") -> Any:
    yield from range(n)
    raise CustomError(message)


def gen_raise_first(message: str = "no items") -> Any:
    raise CustomError(message)
    yield  # pragma: no cover - makes this a generator


def gen_locks(n: int) -> Any:
    for _ in range(n):
        yield threading.Lock()


# -- exceptions ---------------------------------------------------------------------------------


class CustomError(Exception):
    """A user exception that pickles fine: must come back as itself."""


class NeedsTwoArgsError(Exception):
    """Pickles, but cannot be rebuilt (``args`` holds one value, ``__init__`` wants two)."""

    def __init__(self, a: Any, b: Any) -> None:
        super().__init__(f"{a}/{b}")


class HoldsLockError(Exception):
    """Cannot be pickled at all (holds a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def boom_custom_error(message: str) -> None:
    raise CustomError(message)


def boom_value_error(message: str) -> None:
    raise ValueError(message)


def boom_key_error(key: Any) -> None:
    raise KeyError(key)


def boom_needs_two_args(a: str, b: str) -> None:
    raise NeedsTwoArgsError(a, b)


def boom_holds_lock(message: str) -> None:
    raise HoldsLockError(message)


def boom_system_exit(code: int) -> None:
    raise SystemExit(code)


def boom_chained(message: str) -> None:
    try:
        raise KeyError("inner")
    except KeyError as exc:
        raise CustomError(message) from exc


# -- parent-side utilities (used by the tests, not by workers) ----------------------------------


def sessions_on_slot(pool: Any, slot: int, count: int, prefix: str = "s") -> list[str]:
    """``count`` distinct session ids that all map to ``slot`` of ``pool``."""
    found = []
    i = 0
    while len(found) < count:
        sid = f"{prefix}-{i}"
        if pool.slot_for(sid) == slot:
            found.append(sid)
        i += 1
        if i > 100_000:  # pragma: no cover
            raise AssertionError("no session maps to that slot")
    return found


def session_not_on_slot(pool: Any, slot: int, prefix: str = "other") -> str:
    i = 0
    while True:
        sid = f"{prefix}-{i}"
        if pool.slot_for(sid) != slot:
            return sid
        i += 1
