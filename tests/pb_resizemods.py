"""Worker-side objects for the resize tests (imported by workers by dotted path)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import poolbridge


class Log:
    """A per-session log whose entries must arrive in the order the session sent them."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.entries: list[int] = []

    def add(self, n: int) -> list[Any]:
        self.entries.append(n)
        return [self.session, len(self.entries), os.getpid()]


def unpicklable() -> Any:
    return threading.Lock()


def counter(n: int) -> Iterator[int]:
    yield from range(n)


class DiesWhenPickled:
    """Pickling it (the old worker handing its session out) SIGKILLs the process doing it."""

    def __reduce__(self) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def _die_on_load() -> Any:
    os.kill(os.getpid(), signal.SIGKILL)


class DiesWhenLoaded:
    """Loading it (the new worker taking the session in) SIGKILLs the process doing it."""

    def __reduce__(self) -> Any:
        return (_die_on_load, ())


@poolbridge.helper(context=True)
def remember(ctx: poolbridge.SessionContext, value: Any) -> None:
    ctx.state["remembered"] = value


@poolbridge.helper(context=True)
def recall(ctx: poolbridge.SessionContext) -> Any:
    return [ctx.state.get("remembered"), ctx.slot]
