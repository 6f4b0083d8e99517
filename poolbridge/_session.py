"""Where a session id comes from. ``resolve_session`` is the only function that decides one.

Priority, highest first:

1. the ref's own session — a ref is a self-routing handle;
2. the per-call override — ``pool.options(session=...)``;
3. the context session — ``with pool.session(...)``, a contextvar;
4. the auto-session — created lazily, one per thread and one per asyncio task.

An override that disagrees with the ref's session is a :class:`SessionMismatchError`, raised here,
before anything is encoded or sent.

Why the auto-session is keyed by an *owner*: contextvars alone are not enough. A new thread starts
with an empty context (good), but an asyncio task starts with a *copy* of its creator's context, so
a value set by the parent would leak into every child task. The auto-session therefore remembers
which thread or task created it, and a different owner gets a fresh one.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._errors import SessionMismatchError

__all__ = [
    "current_context_session",
    "resolve_session",
    "session_scope",
    "slot_sessions",
    "validate_session_id",
]

_context_session: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "poolbridge_context_session", default=None
)
# (owner token, session id) of the auto-session of whoever set it.
_auto_session: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar(
    "poolbridge_auto_session", default=None
)
_auto_counter = itertools.count(1)
_PROCESS_TAG = f"{os.getpid():x}-{os.urandom(4).hex()}"

MAX_SESSION_ID_BYTES = 256


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a usable session id (non-empty str, at most 256 UTF-8 bytes)."""
    if not isinstance(session_id, str):
        raise TypeError(f"session id must be a str, not {type(session_id).__name__}")
    if not session_id or len(session_id.encode("utf-8")) > MAX_SESSION_ID_BYTES:
        raise ValueError(f"session id must be 1 to {MAX_SESSION_ID_BYTES} UTF-8 bytes, got {session_id!r:.80}")
    return session_id


def _owner() -> Any:
    """A token for the current asyncio task, else the current thread.

    Tasks are compared by weakref so a finished task's context never keeps it alive.
    """
    asyncio = sys.modules.get("asyncio")
    # _get_running_loop() answers None without raising: this runs on every call of every thread.
    if asyncio is not None and (loop := asyncio._get_running_loop()) is not None:
        task = asyncio.current_task(loop)
        if task is not None:
            return weakref.ref(task)
    return threading.get_ident()


def _auto() -> str:
    owner = _owner()
    current = _auto_session.get()
    if current is not None and current[0] == owner:
        return current[1]
    session_id = f"auto-{_PROCESS_TAG}-{next(_auto_counter)}"
    _auto_session.set((owner, session_id))
    return session_id


def current_context_session() -> str | None:
    """The session set by the innermost ``with pool.session(...)`` in this context, if any."""
    return _context_session.get()


def resolve_session(ref_session: str | None = None, override: str | None = None) -> str:
    """Decide the one session id of an operation. See the module docstring for the priority."""
    if ref_session is not None:
        if override is not None and override != ref_session:
            raise SessionMismatchError(
                f"per-call session {override!r} disagrees with the ref's session {ref_session!r}"
            )
        return ref_session
    if override is not None:
        return override
    context = _context_session.get()
    if context is not None:
        return context
    return _auto()


@functools.lru_cache(maxsize=16)
def slot_sessions(n_slots: int) -> tuple[str, ...]:
    """One session id per slot (``result[slot]`` hashes to ``slot``): the sessions that
    ``broadcast`` and a map without ``session=`` run in, to reach a given worker.

    Fixed per slot count, so repeated maps reuse the same few sessions in each worker instead of
    leaving a new one behind per call. The ids start with ``poolbridge:`` (a prefix the auto-sessions
    do not use).
    """
    from ._hashing import slot_for

    found: dict[int, str] = {}
    for k in itertools.count():
        candidate = f"poolbridge:slot-{k}"
        found.setdefault(slot_for(candidate, n_slots), candidate)
        if len(found) == n_slots:
            return tuple(found[slot] for slot in range(n_slots))
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def session_scope(session_id: str) -> Iterator[str]:
    """Make ``session_id`` the context session for the block (nests; restored on exit)."""
    token = _context_session.set(validate_session_id(session_id))
    try:
        yield session_id
    finally:
        _context_session.reset(token)
