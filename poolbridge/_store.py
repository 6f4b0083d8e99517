"""Child side: a worker's per-session registry — sessions, their refs and streams, idle expiry.

:class:`SessionStore` is the state half of :class:`~poolbridge._worker.WorkerCore` (which adds the
op dispatch): a session is entered once per request (its routing checked the first time it
arrives), every ref and stream is made by :meth:`SessionStore._store` under the per-session cap,
and every ref key that comes back is checked against the request's session and this worker's slot
and generation before it is looked up.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

from . import _helpers, _migrate
from ._errors import (
    BadRequestError,
    MisroutedError,
    RefNotFoundError,
    SessionLimitError,
    SessionLostError,
    SessionMismatchError,
)
from ._hashing import slot_for
from ._warmup import Warmup

log = logging.getLogger("poolbridge.worker")

__all__ = ["SessionStore"]


class _Session:
    """Everything one session keeps in this worker."""

    __slots__ = ("ctx", "last_used", "refs", "streams")

    def __init__(self, ctx: _helpers.SessionContext) -> None:
        self.ctx = ctx
        self.refs: dict[int, Any] = {}
        self.streams: dict[int, _StreamState] = {}
        self.last_used = time.monotonic()


class _StreamState:
    __slots__ = ("error", "iterator")

    def __init__(self, iterator: Iterator[Any]) -> None:
        self.iterator = iterator
        self.error: BaseException | None = None  # raised by the generator after items already sent

    def close(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("closing a stream's generator raised")


class SessionStore:
    """The sessions one worker holds. Single-threaded: a worker runs one request at a time."""

    _warmup: Warmup  # set by the worker core, after its helpers are imported
    _init_error: BaseException | None

    def __init__(
        self, slot: int, n_slots: int, generation: int, max_refs_per_session: int | None, session_ttl: float | None
    ) -> None:
        self.slot = slot
        self.n_slots = n_slots
        self.generation = generation
        self.max_refs_per_session = max_refs_per_session
        self.session_ttl = session_ttl
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count(1)
        self._session: _Session | None = None  # the session of the request being decoded/run
        self._last_sweep = time.monotonic()

    def _enter(self, session_id: Any, create: bool = True) -> _Session:
        """The session a request runs in. ``create=False``: a session not held here is not created
        (the request gets a transient, empty one: its refs and streams are simply not found)."""
        if self._init_error is not None:
            raise self._init_error
        try:
            session = self._sessions.get(session_id)
        except TypeError:  # unhashable: a list or map where the session id belongs
            session = None
        if session is None:
            # A session's slot never changes, so routing is checked once, when it first arrives.
            if not isinstance(session_id, str) or not session_id:
                raise BadRequestError(f"session id must be a non-empty string, got {session_id!r:.80}")
            if slot_for(session_id, self.n_slots) != self.slot:
                raise MisroutedError(
                    f"session {session_id!r} hashes to slot {slot_for(session_id, self.n_slots)}, "
                    f"not to this worker's slot {self.slot}"
                )
            session = _Session(_helpers.SessionContext(session_id, self.slot, self.generation))
            if create:
                self._sessions[session_id] = session
                if self._warmup.session_init is not None:
                    self._init_session(session)
        if self.session_ttl is not None:
            session.last_used = time.monotonic()
        self._session = session
        _helpers._current[0] = session.ctx
        return session

    def adopt(self, session_id: str, refs: dict[int, Any], state: dict[str, Any]) -> None:
        """Take in a session moved here by a resize (_migrate.py): its refs keep their ids."""
        session = _Session(_helpers.SessionContext(session_id, self.slot, self.generation))
        session.refs = refs
        session.ctx.state = state
        self._sessions[session_id] = session

    def _init_session(self, session: _Session) -> None:
        # Runs with the session current (current_session() works in it); a failure leaves no
        # session behind, so the next operation of that session tries again.
        _helpers._current[0] = session.ctx
        try:
            self._warmup.init_session(session.ctx.session_id, session.ctx.state)
        except BaseException:
            del self._sessions[session.ctx.session_id]
            raise
        finally:
            _helpers._current[0] = None

    # -- refs and streams -----------------------------------------------------------------------

    def _check_key(self, key: Any) -> tuple[_Session, int]:
        """Validate a ref key ``[session, id, slot, generation]`` against the current request."""
        try:
            ref_session, ref_id, slot, generation = key
        except (TypeError, ValueError):
            raise BadRequestError(f"malformed ref {key!r:.80}") from None
        session = self._session
        assert session is not None
        if ref_session != session.ctx.session_id:
            raise SessionMismatchError(
                f"a ref of session {ref_session!r} was used in session {session.ctx.session_id!r}"
            )
        if (slot != self.slot or generation != self.generation) and not _migrate.accepts(
            self, ref_session, slot, generation
        ):
            why = _migrate.lost_reason(self, ref_session)
            raise SessionLostError(
                f"ref {ref_id} of session {ref_session!r} belongs to slot {slot} generation {generation}; "
                + (f"the session lost its state in a resize: {why}" if why else
                   f"that worker is gone (now slot {self.slot} generation {self.generation})")
            )
        return session, ref_id

    def _lookup_ref(self, key: Any) -> Any:
        session, ref_id = self._check_key(key)
        try:
            return session.refs[ref_id]
        except (KeyError, TypeError):
            raise RefNotFoundError(
                f"ref {ref_id} is not in session {session.ctx.session_id!r} (released or expired)"
            ) from None

    def _store(self, session: _Session, table: dict[int, Any], obj: Any) -> list[Any]:
        """Keep ``obj`` in one of the session's tables (refs or streams), under the per-session
        cap; returns its key ``[session, id, slot, generation]``. Every ref and stream is made here."""
        cap = self.max_refs_per_session
        if cap is not None and len(session.refs) + len(session.streams) >= cap:
            raise SessionLimitError(
                f"session {session.ctx.session_id!r} holds {cap} refs/streams, its cap; release some"
            )
        obj_id = next(self._ids)
        table[obj_id] = obj
        return [session.ctx.session_id, obj_id, self.slot, self.generation]

    def _stream(self, key: Any) -> tuple[_Session, int, _StreamState]:
        session, stream_id = self._check_key(key)
        state = session.streams.get(stream_id)
        if state is None:
            raise RefNotFoundError(f"stream {stream_id} is not open in session {session.ctx.session_id!r}")
        return session, stream_id, state

    def drop_session(self, session_id: str) -> int:
        """Forget a session: its refs, its streams (their generators closed) and its state."""
        session = self._sessions.pop(session_id, None)
        _migrate.forget(self, session_id)
        if session is None:
            return 0
        count = len(session.refs) + len(session.streams)
        for state in session.streams.values():
            state.close()
        session.refs.clear()
        session.streams.clear()
        session.ctx.state.clear()
        return count

    def sweep(self, now: float | None = None) -> list[str]:
        """Drop sessions idle for longer than ``session_ttl``; returns their ids."""
        if self.session_ttl is None:
            return []
        now = time.monotonic() if now is None else now
        self._last_sweep = now
        expired = [sid for sid, s in self._sessions.items() if now - s.last_used > self.session_ttl]
        for sid in expired:
            self.drop_session(sid)
        if expired:
            log.debug("slot %d: expired %d idle sessions", self.slot, len(expired))
        return expired

    def holds_state(self) -> bool:
        """True while any session has refs, streams or helper state here."""
        return any(s.refs or s.streams or s.ctx.state for s in self._sessions.values())

    def next_sweep_in(self) -> float | None:
        if self.session_ttl is None:
            return None
        return max(0.0, self._last_sweep + min(self.session_ttl, 1.0) - time.monotonic())
