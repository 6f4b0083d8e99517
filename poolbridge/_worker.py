"""Child side: the worker core and its per-session object store. Runs only in worker processes
(_worker_main.py drives it over the pipes) or inside a Ray actor (backends/ray.py).

A worker executes one request at a time, in the order its frames arrive. For every request it:

1. reads ``[id, op, session, body]`` — the session checked to hash to this worker's slot
   (a misrouted payload is rejected, never served from the wrong store);
2. decodes ``body`` with this request's session as context, so every ref argument is checked to
   belong to that session and to this slot's generation, then looked up in that session's store;
3. runs the op and encodes the result — as a value, or as a new ref in the session's store when it
   cannot be encoded (or a ref was asked for);
4. replies ``[id, status, body]``; any failure in 1-3 becomes that request's error reply.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import msgpack

from . import _helpers, _migrate, _shm
from ._allow import AllowList
from ._errors import (
    BadRequestError,
    HelperNotFoundError,
    RefNotFoundError,
    SessionLimitError,
    value_too_large,
)
from ._paths import split_path
from ._protocol import (
    EXT_REF,
    INT_TAG,
    OK,
    OK_SHM,
    RET_AUTO,
    RET_REF,
    RET_VALUE,
    WireRef,
    default_lifter,
    make_unpacker,
    pack_plain,
    pack_value,
)
from ._store import SessionStore, _Session, _StreamState
from ._warmup import Warmup
from ._wire import EXISTING_SESSION_OPS, OPS, SESSIONLESS_OPS, decode_request, encode_error, encode_reply

log = logging.getLogger("poolbridge.worker")

_active: list[WorkerCore | None] = [None]


def active_core() -> WorkerCore | None:
    """The worker core of this process, if this process is a worker."""
    return _active[0]

class WorkerCore(SessionStore):
    """The transport-free worker: ``handle(request frame body) -> reply frame body``."""

    def __init__(
        self,
        slot: int,
        n_slots: int,
        generation: int,
        *,
        helpers: tuple[str, ...] = (),
        wire: bool = False,
        max_refs_per_session: int | None = None,
        session_ttl: float | None = None,
        max_calls: int | None = None,
        max_rss: int | None = None,
        initializer: bytes | None = None,
        session_init: str | bytes | None = None,
        max_value_bytes: int | None = None,
        allow_modules: tuple[str, ...] = (),
    ) -> None:
        SessionStore.__init__(self, slot, n_slots, generation, max_refs_per_session, session_ttl)
        #: The Port server's --allow-module list, enforced here while resolving (see _allow.py).
        self.allow = AllowList(allow_modules) if allow_modules else None
        self.wire = wire
        self.calls = 0
        self.max_calls = max_calls
        self.max_rss = max_rss
        self.max_value_bytes = max_value_bytes
        self.retiring = False
        self._over_limit_logged = False
        self._paths: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._wire_session: _Session | None = None
        self._wire_packer = msgpack.Packer(default=self._wire_default, use_bin_type=True)
        self._unpack = make_unpacker(self._lookup_ref)
        for module in helpers:
            importlib.import_module(module)
        _active[0] = self
        self._warmup = Warmup(slot, initializer, session_init)  # after helpers: it may use them
        self._init_error = self._warmup.error
        # One handler per op of the wire's table (_wire.OPS): _op_<name>.
        self._ops: dict[str, Callable[..., bytes]] = {op: getattr(self, f"_op_{op}") for op in OPS}
        # Not in the table: the router's resize control ops, [n_slots, ...] bodies (_migrate.py).
        self._admin_ops = _migrate.ops(self)

    # -- the request cycle -----------------------------------------------------------------

    def handle(self, frame: bytes | bytearray) -> bytes:
        req_id: Any = None
        lifter = default_lifter[0]
        try:
            try:
                # A fifth element lists the request's segments (the router unlinks them); a sixth,
                # segments of earlier results the router has finished reading (see _shm.py).
                request = decode_request(frame)
                req_id, op, session_id, body = request[0], request[1], request[2], request[3]
                if len(request) > 5 and lifter is not None:
                    for name in request[5]:
                        lifter.recycle(name)
            except Exception as exc:
                raise BadRequestError(f"undecodable request: {exc}") from None
            handler = self._ops.get(op)
            if handler is None:
                if op in _migrate.MIGRATE_OPS:
                    return encode_reply(req_id, OK, self._admin_ops[op](body))
                raise BadRequestError(f"unknown op {op!r}")
            if op in SESSIONLESS_OPS:
                return encode_reply(req_id, OK, handler())
            session = self._enter(session_id, op not in EXISTING_SESSION_OPS)
            try:
                fields = self._unpack(body)
                self.calls += 1
                result = handler(session, *fields)
                names: list[str] = []
                held: list[str] = []
                size = len(result)
                if lifter is not None:
                    fields = None  # the arguments' mappings may go now
                    names, segments_size = lifter.take()
                    held = _shm.held()
                    size += segments_size
                if self.max_value_bytes is not None and size > self.max_value_bytes:
                    for name in names:  # e.g. a stream batch: results are checked below
                        lifter.drop(name)  # type: ignore[union-attr]
                    raise value_too_large("the reply", size, self.max_value_bytes)
                if names or held:
                    return encode_reply(req_id, OK_SHM, [result, names, held])
                return encode_reply(req_id, OK, result)
            finally:
                self._session = None
                _helpers._current[0] = None
                if self.session_ttl is not None:  # idle time counts from the end of a call
                    session.last_used = time.monotonic()
        except BaseException as exc:
            if lifter is not None:
                lifter.discard()  # segments made for a reply that is not sent
                _shm.held()
            return encode_error(req_id, exc, port=self.wire)

    def _new_ref(self, session: _Session, obj: Any) -> bytes:
        key = self._store(session, session.refs, obj)
        return pack_plain(msgpack.ExtType(EXT_REF, pack_plain(key)))

    def _result(self, session: _Session, value: Any, ret: int) -> bytes:
        if ret == RET_REF:
            return self._new_ref(session, value)
        try:
            return self._sized(self._encode(session, value) if self.wire else pack_value(value))
        except Exception:
            if ret == RET_VALUE:
                raise
            return self._new_ref(session, value)

    def _oversize(self, body: bytes) -> int:
        """0 when a reply can carry ``body`` and the segments made for it; else their size (and
        those segments are unlinked: the value is not sent)."""
        limit = self.max_value_bytes
        if limit is None:
            return 0
        lifter = default_lifter[0]
        size = len(body) + (lifter.batch_bytes() if lifter is not None else 0)
        if size <= limit - 64:  # room for the reply's [id, status, ...] around it
            return 0
        if lifter is not None:
            lifter.discard()
        return size

    def _sized(self, body: bytes) -> bytes:
        """``body`` if a reply can carry it; else :class:`ValueTooLargeError` (which ``ret="auto"``
        turns into a ref, as for a value that cannot be encoded)."""
        size = self._oversize(body)
        if size:
            raise value_too_large("the result", size, self.max_value_bytes or 0)
        return body

    def _encode(self, session: _Session, value: Any) -> bytes:
        if not self.wire:
            return pack_value(value)
        # Port mode never pickles: whatever msgpack cannot carry stays here as a ref, in the
        # session being encoded for (one reused Packer: building one per reply costs more than
        # the rest of a tiny call).
        self._wire_session = session
        lifter = default_lifter[0]
        if lifter is not None:
            value = lifter.lift(value)  # big bytes and str in segments: the server maps them
        try:
            packed: bytes = self._wire_packer.pack(value)
        except BaseException:
            self._wire_packer = msgpack.Packer(default=self._wire_default, use_bin_type=True)
            raise
        return packed

    def _wire_default(self, obj: Any) -> Any:
        if isinstance(obj, tuple):
            return list(obj)
        if isinstance(obj, int):  # beyond msgpack's 64 bits: a tagged decimal string (docs/protocol.md)
            return {INT_TAG: str(int(obj))}
        session = self._wire_session
        assert session is not None
        return msgpack.ExtType(EXT_REF, pack_plain(self._store(session, session.refs, obj)))

    # -- ops -------------------------------------------------------------------------------

    def _callable(self, fn: Any) -> Any:
        allow = self.allow
        if isinstance(fn, str):
            # Cache the import, not the object: attributes are read on every use, so a rebound
            # name or a module-level __getattr__ is seen as it is now (and checked as it is now).
            split = self._paths.get(fn)
            if split is None:
                split = self._paths[fn] = split_path(fn) if allow is None else allow.split(fn)
            obj, attrs = split
            if allow is not None:
                return allow.walk(obj, attrs)
            for attr in attrs:
                obj = getattr(obj, attr)
            return obj
        if allow is not None:
            return allow.check_obj(fn, "the called ref")
        return fn

    def _attr(self, target: Any, name: str) -> Any:
        allow = self.allow
        return getattr(target, name) if allow is None else allow.getattr(target, name)

    def _op_call(self, session: _Session, fn: Any, args: list[Any], kwargs: dict[str, Any], ret: int) -> bytes:
        # The hot path: a dotted path already imported, a value that encodes.
        if self.allow is not None:
            self.allow.check_kwargs(kwargs)
            fn = self._callable(fn)
        elif type(fn) is str and (split := self._paths.get(fn)) is not None:
            fn, attrs = split
            for attr in attrs:
                fn = getattr(fn, attr)
        else:
            fn = self._callable(fn)
        value = fn(*args, **kwargs)
        if ret == RET_AUTO:
            try:
                body = self._encode(session, value) if self.wire else pack_value(value)
            except Exception:  # noqa: S110 - not encodable: _result below hands it over as a ref
                pass
            else:
                if not self._oversize(body):
                    return body
                return self._new_ref(session, value)  # too large to carry: kept here, as a ref
        return self._result(session, value, ret)

    def _op_getattr(self, session: _Session, target: Any, name: str | None, ret: int) -> bytes:
        value = self._callable(target) if name is None else self._attr(target, name)
        return self._result(session, value, ret)

    def _op_setattr(self, session: _Session, target: Any, name: str, value: Any) -> bytes:
        if self.allow is not None:
            self.allow.check_name(name)
            self.allow.check_obj(target, "the target ref")
        setattr(target, name, value)
        return pack_value(None)

    def _op_method(
        self, session: _Session, target: Any, name: str, args: list[Any], kwargs: dict[str, Any], ret: int
    ) -> bytes:
        if self.allow is not None:
            self.allow.check_kwargs(kwargs)
        return self._result(session, self._attr(target, name)(*args, **kwargs), ret)

    def _op_helper(self, session: _Session, name: str, args: list[Any], kwargs: dict[str, Any], ret: int) -> bytes:
        if self.allow is not None:
            self.allow.check_name(name, "helper")
            self.allow.check_kwargs(kwargs)
        entry = _helpers.registry().get(name)
        if entry is None:
            raise HelperNotFoundError(f"no helper named {name!r} in this worker (is its module in helpers=?)")
        if entry.context:
            value = entry.fn(session.ctx, *args, **kwargs)
        else:
            value = entry.fn(*args, **kwargs)
        return self._result(session, value, ret)

    def _op_stream_open(
        self, session: _Session, fn: Any, args: list[Any], kwargs: dict[str, Any], batch: int
    ) -> bytes:
        if self.allow is not None:
            self.allow.check_kwargs(kwargs)
        state = _StreamState(iter(self._callable(fn)(*args, **kwargs)))
        try:
            key = self._store(session, session.streams, state)
        except SessionLimitError:
            state.close()
            raise
        items, done = self._pull(session, key[1], state, batch)
        # The whole key comes back: the generation is this worker's, which the caller cannot know
        # if the slot restarted while the open was on its way.
        return pack_plain([key, items, done])

    def _pull(self, session: _Session, stream_id: int, state: _StreamState, n: int) -> tuple[bytes, bool]:
        if state.error is not None:
            session.streams.pop(stream_id, None)
            raise state.error
        items: list[Any] = []
        append = items.append
        done = False
        try:
            for item in itertools.islice(state.iterator, n):
                append(item)
            done = len(items) < n
        except BaseException as exc:
            if not items:
                session.streams.pop(stream_id, None)
                raise
            state.error = exc  # hand over what was produced; raise on the next pull
        if done:
            session.streams.pop(stream_id, None)
        try:
            body = self._encode(session, items)
        except Exception:  # noqa: S110 - some item is not encodable: handed over as refs below
            pass
        else:
            size = self._oversize(body)
            if size:
                # The batch is lost: end the stream rather than leave it suspended, its key unsent.
                if session.streams.pop(stream_id, None) is not None:
                    state.close()
                what = f"a batch of {len(items)} stream items (use a smaller batch=)"
                raise value_too_large(what, size, self.max_value_bytes or 0)
            return body, done
        # Like a call's result: an item that cannot be encoded is handed over as a ref. If that
        # fails too (the session's cap), the batch is lost: undo its refs and end the stream,
        # rather than leave objects and a suspended generator nobody holds a key to.
        made: list[int] = []
        try:
            return self._encode(session, [self._item_or_ref(session, item, made) for item in items]), done
        except BaseException:
            for ref_id in made:
                session.refs.pop(ref_id, None)
            if session.streams.pop(stream_id, None) is not None:
                state.close()
            raise

    def _item_or_ref(self, session: _Session, item: Any, made: list[int]) -> Any:
        try:
            self._encode(session, item)
        except Exception:
            key = self._store(session, session.refs, item)
            made.append(key[1])
            return WireRef(*key)
        return item

    def _op_stream_next(self, session: _Session, key: Any, n: int) -> bytes:
        session, stream_id, state = self._stream(key)
        items, done = self._pull(session, stream_id, state, n)
        return pack_plain([items, done])

    def _op_stream_close(self, session: _Session, key: Any) -> bytes:
        session, stream_id, state = self._stream(key)
        del session.streams[stream_id]
        state.close()
        return pack_plain(None)

    def _op_release(self, session: _Session, key: Any) -> bytes:
        session, ref_id = self._check_key(key)
        if session.refs.pop(ref_id, _MISSING) is _MISSING:
            raise RefNotFoundError(f"ref {ref_id} is not in session {session.ctx.session_id!r}")
        return pack_plain(None)

    def _op_close_session(self, session: _Session) -> bytes:
        dropped = self.drop_session(session.ctx.session_id)
        return pack_plain(dropped)

    def _op_stats(self) -> bytes:
        return pack_plain(self.stats())

    def _op_ping(self) -> bytes:
        return pack_plain([self.slot, self.generation, os.getpid()])

    # -- housekeeping ----------------------------------------------------------------------

    def wants_retire(self) -> bool:
        """Past ``max_calls`` or ``max_rss`` and holding no session state: time to be replaced.

        The rule: a worker over its limits is recycled only when that loses nothing. While any
        session keeps refs, streams or helper state here it goes on serving (logged once), until
        that state is released, closed or expires (``session_ttl``).
        """
        if self.retiring:
            return False
        over = self.max_calls is not None and self.calls >= self.max_calls
        if not over and self.max_rss is not None and self.calls % 32 == 0:
            over = _rss() >= self.max_rss
        if not over:
            return False
        if self.holds_state():
            if not self._over_limit_logged:
                log.warning("slot %d: over its recycling limits but holds session state; not recycled yet", self.slot)
                self._over_limit_logged = True
            return False
        self.retiring = True
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "generation": self.generation,
            "pid": os.getpid(),
            "sessions": len(self._sessions),
            "refs": sum(len(s.refs) for s in self._sessions.values()),
            "streams": sum(len(s.streams) for s in self._sessions.values()),
            "calls": self.calls,
            "rss": _rss(),
        }


_MISSING = object()


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil is a dependency, but stats must never fail
        return 0
