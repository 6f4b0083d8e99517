"""Functions the worker processes import (by dotted path) in the map / Executor / initializer tests.

Everything here runs in a worker unless said otherwise. Worker-side records are read back with a
call in the same session (hence the same worker), or through files the test names.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import poolbridge

# session key -> the sequence numbers this worker ran, in the order it ran them
ORDER: dict[str, list[int]] = {}
# set by the initializers below
INITIALIZED: dict[str, Any] = {}
# session id -> how many times session_init ran for it in this worker
SESSION_INITS: dict[str, int] = {}


def record_order(item: tuple[str, int]) -> tuple[str, int, int]:
    key, seq = item
    ORDER.setdefault(key, []).append(seq)
    return key, seq, os.getpid()


def pop_order(key: str) -> list[int]:
    return ORDER.pop(key, [])


def keyed_add(key: str, a: int, b: int) -> tuple[str, int, str | None]:
    ctx = poolbridge.current_session()
    return key, a + b, ctx.session_id if ctx is not None else None


def session_and_pid(_item: Any = None) -> tuple[str | None, int]:
    ctx = poolbridge.current_session()
    return (ctx.session_id if ctx is not None else None), os.getpid()


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise KeyError(f"item {x}")
    return x * 10


def fail_on(x: int) -> int:
    if x == 13:
        raise KeyError("thirteen")
    return x * 10


def init_worker(path: str, tag: str) -> None:
    """A pool initializer: remembers its argument and appends this pid to ``path``."""
    INITIALIZED["tag"] = tag
    INITIALIZED["pid"] = os.getpid()
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def initialized(_item: Any = None) -> Any:
    return INITIALIZED.get("tag"), os.getpid()


def failing_init() -> None:
    raise RuntimeError("initializer says no")


def load_model(session_id: str) -> dict[str, Any]:
    """A per-session initializer: counts its runs per session in this worker."""
    SESSION_INITS[session_id] = SESSION_INITS.get(session_id, 0) + 1
    return {"model_for": session_id, "pid": os.getpid()}


def load_model_or_fail(session_id: str) -> dict[str, Any]:
    if session_id.startswith("bad") and SESSION_INITS.get(session_id, 0) == 0:
        SESSION_INITS[session_id] = -1  # fails once, then works
        raise ValueError(f"no model for {session_id}")
    SESSION_INITS[session_id] = max(SESSION_INITS.get(session_id, 0), 0)
    return load_model(session_id)


def model(_item: Any = None) -> Any:
    """What session_init left in this session's state, and how often it ran for this session."""
    ctx = poolbridge.current_session()
    assert ctx is not None
    return ctx.state.get("session_init"), SESSION_INITS.get(ctx.session_id, 0)


def kill_if_slot(slot: int) -> int:
    """Broadcast probe: the worker of ``slot`` dies (SIGKILL) instead of answering."""
    ctx = poolbridge.current_session()
    if ctx is not None and ctx.slot == slot:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def raise_if_slot(slot: int) -> int:
    ctx = poolbridge.current_session()
    if ctx is not None and ctx.slot == slot:
        raise LookupError(f"slot {slot} refuses")
    return os.getpid()


def mul(x: int, y: int = 1) -> int:
    return x * y


def maybe_wait(item: tuple[str, str | None]) -> str:
    """``(name, fifo path or None)``: blocks on the fifo when there is one, then returns ``name``."""
    import pb_faultmods

    name, path = item
    if path is not None:
        pb_faultmods.wait_fifo(path, 30.0)
    return name


def die_at(x: int, bad: int) -> int:
    """Map probe: the worker running item ``bad`` dies (SIGKILL)."""
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def echo(x: Any) -> Any:
    return x


def type_name(x: Any) -> str:
    return type(x).__name__
