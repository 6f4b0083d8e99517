"""Helpers imported by the Port servers under test (``--helpers pb_test_helpers``): the Python Port
tests (tests/test_server_*.py) and the Elixir package's ExUnit suite (examples/elixir/test/)."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from typing import Any

import poolbridge


@poolbridge.helper(context=True)
def remember(ctx: poolbridge.SessionContext, key: str, value: Any) -> int:
    """Store a value in the session's state; returns how many keys the session holds."""
    ctx.state[key] = value
    return len(ctx.state)


@poolbridge.helper(context=True)
def recall(ctx: poolbridge.SessionContext, key: str) -> Any:
    return ctx.state.get(key)


@poolbridge.helper
def whoami() -> dict[str, Any]:
    ctx = poolbridge.current_session()
    assert ctx is not None
    return {"pid": os.getpid(), "session": ctx.session_id, "slot": ctx.slot}


@poolbridge.helper
def noisy(text: str) -> str:
    """Write to fd 1 three ways: print, os.write, and libc write(2) — none may reach a frame."""
    print(text, flush=True)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    os.write(1, (text + "\n").encode())
    libc = ctypes.CDLL(None)
    data = (text + "\n").encode()
    libc.write(1, data, len(data))
    return text


def countdown(n: int) -> Iterator[int]:
    while n > 0:
        yield n
        n -= 1


def failing_stream(n: int) -> Iterator[int]:
    yield from range(n)
    raise RuntimeError("stream broke")


class Box:
    def __init__(self, value: Any = None) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value

    def add(self, x: Any) -> Any:
        self.value += x
        return self.value


def pid_add(a: int, b: int) -> list[int]:
    """``[worker pid, a + b]``: one call shows both where it ran and what it computed."""
    return [os.getpid(), a + b]


def sleep_then(seconds: float, value: Any) -> Any:
    """Work that takes a while (keeps requests in flight for crash tests), then returns ``value``."""
    import time

    time.sleep(seconds)
    return value


def _who() -> dict[str, Any]:
    ctx = poolbridge.current_session()
    assert ctx is not None
    return {"pid": os.getpid(), "session": ctx.session_id, "slot": ctx.slot}


def who() -> dict[str, Any]:
    """What the worker received: its pid, the payload's session and the slot (for ``call``)."""
    return _who()


class Probe:
    """An object whose every path (create, method, getattr, setattr) reports what the worker saw."""

    def __init__(self) -> None:
        self.created = _who()
        self.last_set: dict[str, Any] | None = None

    def who(self) -> dict[str, Any]:
        return _who()

    @property
    def seen(self) -> dict[str, Any]:
        return _who()

    @property
    def poke(self) -> dict[str, Any] | None:
        return self.last_set

    @poke.setter
    def poke(self, value: Any) -> None:
        self.last_set = {**_who(), "value": value}


def who_stream(n: int) -> Iterator[dict[str, Any]]:
    for _ in range(n):
        yield _who()


_closed: dict[str, bool] = {}


def guarded_stream(n: int, key: str) -> Iterator[int]:
    """Counts; its ``finally`` records, in this worker, that the generator was closed."""
    _closed[key] = False
    try:
        yield from range(n)
    finally:
        _closed[key] = True


def was_closed(key: str) -> bool | None:
    """``True`` once ``guarded_stream(..., key)`` ran its ``finally`` in this worker."""
    return _closed.get(key)


def kinds(*values: Any) -> list[str]:
    """The Python type names of the arguments, and big ints / floats described exactly."""
    return [type(v).__name__ for v in values]
