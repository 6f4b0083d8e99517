"""Functions the Ray backend tests run in workers (by dotted path), on either backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from pb_testmods import wait_for_path  # noqa: F401 - called by the tests as ray_testmods.wait_for_path

import poolbridge

# token -> events recorded in this worker process (read back in the same session, so same worker).
EVENTS: dict[str, list[str]] = {}


def where() -> dict[str, Any] | None:
    """The session, slot, generation and pid of the running operation, as the worker sees them."""
    ctx = poolbridge.current_session()
    if ctx is None:
        return None
    return {"session": ctx.session_id, "slot": ctx.slot, "generation": ctx.generation, "pid": os.getpid()}


def gen_with_finally(token: str, n: int) -> Iterator[dict[str, Any] | None]:
    try:
        for _ in range(n):
            yield where()
        EVENTS.setdefault(token, []).append("exhausted")
    finally:
        EVENTS.setdefault(token, []).append("finally")


def pop_events(token: str) -> list[str]:
    return EVENTS.pop(token, [])


class Box:
    """An object kept in a worker as a ref."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.where = where()

    def add(self, n: int) -> Any:
        self.value += n
        return self.value

    def whereami(self) -> dict[str, Any] | None:
        return where()


class Custom(Exception):
    """A user exception type the caller must get back as itself."""


def raise_custom(message: str) -> None:
    raise Custom(message)
