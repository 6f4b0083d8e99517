"""The Port server: ``python -m poolbridge serve`` — one process that is the router of a pool and
speaks the public, map-based Port protocol (docs/protocol.md) to an Elixir (or any) client.

::

    client ──{packet,4} msgpack map──▶ ┌ the loop thread: poll(port in, wake pipe, reply fds) ┐
                                       │  port in  → decode, validate, resolve session once  │
                                       │             router.send(slot, ..., lead=True) ──────┼─▶ worker[slot]
    client ◀── reply map ◀── _Output ◀─┤  reply fd → channel.try_read  → _Reply.deliver ◀───┼── worker[slot]
      (completion order)               └─────────────────────────────────────────────────────┘

One thread does the common-case I/O: it polls the protocol input and the reply pipes of the
channels it sent to, so a tiny call costs no thread hand-off on either side. Requests are sent with
``lead=True`` (the channel's background reader stays parked); a reply fd is read by taking the
channel's read lock *without blocking*: if someone else holds it (the background reader woken for
a request sent off this thread, the monitor draining a dead worker), that reader reads everything
pending, so the loop stops polling the fd until it next sends there. Requests for a slot that is
restarting wait off the loop, in arrival order (later ones for that slot queue behind them), and
are sent with ``lead=False``: the new channel's background reader reads their replies. Replies
are written under one output lock (stats and crash replies come from other threads). Nothing
the client sends is ever unpickled: client values are plain msgpack (any ext type is a
``bad_request``), and refs travel as tagged maps that become
:class:`~poolbridge._protocol.WireRef` keys here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import fnmatch
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from types import FrameType
from typing import Any

import msgpack

from ._errors import (
    BadRequestError,
    CallTimeoutError,
    FrameTooLargeError,
    NotAllowedError,
    PoolbridgeError,
    SessionLostError,
    SessionMismatchError,
)
from ._frames import write_frame
from ._hashing import slot_for
from ._pool import Pool
from ._portwire import (
    _RET,
    PLAIN_TYPES,
    REF_TAG,
    STREAM_TAG,
    Request,
    _check_value,
    _decode_request,
    _decode_value,
)
from ._protocol import (
    MAX_FRAME_DEFAULT,
    OK,
    OP_CALL,
    OP_CLOSE_SESSION,
    OP_GETATTR,
    OP_HELPER,
    OP_METHOD,
    OP_PING,
    OP_RELEASE,
    OP_SETATTR,
    OP_STREAM_CLOSE,
    OP_STREAM_NEXT,
    OP_STREAM_OPEN,
    RET_AUTO,
    RET_REF,
    FrameReader,
    OversizedFrame,
    WireRef,
    pack_plain,
    reset_plain_packer,
    unpack_plain,
)
from ._router import DEFAULT_MAX_IN_FLIGHT, Sink
from ._session import resolve_session, validate_session_id

log = logging.getLogger("poolbridge.server")

__all__ = ["PROTOCOL_VERSION", "REF_TAG", "STREAM_TAG", "Server", "serve"]

PROTOCOL_VERSION = 1

_POLLIN = select.POLLIN
_PORT_FRAME_MAX = 0xFFFFFFFF - 1  # the largest length a 4-byte header gives (0xFFFFFFFF: see _frames.py)
# A session id of at most this many characters is at most 256 UTF-8 bytes (4 bytes a character at
# most): the fast path skips encoding it to count; longer ones take the general path.
_FAST_SESSION_CHARS = 64


class _Stop(Exception):
    """Raised by the SIGTERM handler during start-up (before the loop runs) to leave it."""


class _Output:
    """The protocol output fd, written whole frames at a time under one lock."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.broken = False

    def write(self, reply: dict[str, Any]) -> None:
        try:
            data = pack_plain(reply)  # a reused per-thread Packer, not packb's new one
        except Exception as exc:  # a value msgpack cannot carry after all: report, never drop
            log.exception("could not encode a reply")
            reset_plain_packer()
            data = pack_plain(_error_reply(reply.get("id"), "remote_error", type(exc).__name__, str(exc), ""))
        if len(data) > _PORT_FRAME_MAX:  # {packet, 4} cannot say it: the reply is that error instead
            message = f"the reply is {len(data)} bytes; a {{packet, 4}} frame holds at most {_PORT_FRAME_MAX}"
            data = pack_plain(_error_reply(reply.get("id"), FrameTooLargeError.code, "FrameTooLargeError", message, ""))
        with self.lock:
            if self.broken:
                return
            try:
                write_frame(self.fd, data)
            except OSError:
                # The client is gone; the read loop sees EOF and shuts down.
                self.broken = True


def _error_reply(req_id: Any, code: str, type_name: str, message: str, tb: str) -> dict[str, Any]:
    return {
        "id": req_id,
        "status": "error",
        "error": {"code": code, "type": type_name, "message": message, "traceback": tb},
    }


def _exc_reply(req_id: Any, exc: BaseException) -> dict[str, Any]:
    code = exc.code if isinstance(exc, PoolbridgeError) else "remote_error"
    return _error_reply(req_id, code, type(exc).__name__, str(exc), "")


_VALUE, _STREAM_OPEN, _STREAM_NEXT, _PLAIN = range(4)


class _Reply(Sink):
    """Turns one worker reply into one client reply frame (called from router reader threads)."""

    __slots__ = ("kind", "out", "req_id")

    def __init__(self, out: _Output, req_id: Any, kind: int) -> None:
        self.out = out
        self.req_id = req_id
        self.kind = kind

    def deliver(self, status: int, body: Any) -> None:
        try:
            if status == OK:
                reply = {"id": self.req_id, "status": "ok", "value": self._value(body)}
            else:
                # [code, type, message, traceback, pickled]: the pickled exception is never loaded.
                code, type_name, message, tb, _pickled = unpack_plain(body)
                reply = _error_reply(self.req_id, code, type_name, message, tb)
        except Exception as exc:
            log.exception("undecodable worker reply")
            reply = _exc_reply(self.req_id, exc)
        self.out.write(reply)

    def _value(self, body: bytes) -> Any:
        kind = self.kind
        if kind == _VALUE:
            return _decode_value(body)
        if kind == _STREAM_OPEN:
            key, items, done = unpack_plain(body)  # [session, id, slot, generation], from the worker
            return {"stream": {STREAM_TAG: key}, "items": _decode_value(items), "done": done}
        if kind == _STREAM_NEXT:
            items, done = unpack_plain(body)
            return {"items": _decode_value(items), "done": done}
        return unpack_plain(body)

    def fail(self, exc: BaseException) -> None:
        self.out.write(_exc_reply(self.req_id, exc))


# -- the server -----------------------------------------------------------------------------------


def _make_allowed(patterns: Sequence[str]) -> Callable[[str], bool]:
    """``fn(path)``: is a dotted path allowed? True for everything when no pattern is given.

    A path is allowed when one of its dotted prefixes (``a``, ``a.b``, ``a.b.c`` for ``a.b.c``)
    matches a pattern (``fnmatch`` syntax): ``math`` allows ``math.sqrt``; ``os.path`` allows
    ``os.path.join`` but not ``os.system``. Builtins are reached as ``builtins.NAME``.
    """
    if not patterns:
        return lambda path: True
    pats = tuple(patterns)
    cache: dict[str, bool] = {}

    def allowed(path: str) -> bool:
        hit = cache.get(path)
        if hit is None:
            parts = path.split(".")
            prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            hit = any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in pats)
            if len(cache) < 4096:
                cache[path] = hit
        return hit

    return allowed


class Server:
    """Serve one Port client on ``(in_fd, out_fd)`` with a pool of ``workers`` processes."""

    def __init__(
        self,
        in_fd: int,
        out_fd: int,
        *,
        workers: int,
        allow_modules: Sequence[str] = (),
        max_frame: int = MAX_FRAME_DEFAULT,
        helpers: Sequence[str] = (),
        session_ttl: float | None = None,
        max_refs_per_session: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.in_fd = in_fd
        self.out = _Output(out_fd)
        self.max_frame = max_frame
        self.restricted = bool(allow_modules)
        self.allowed = _make_allowed(allow_modules)
        self.pool = Pool(
            workers=workers,
            helpers=tuple(helpers),
            session_ttl=session_ttl,
            max_refs_per_session=max_refs_per_session,
            _wire=True,
            max_in_flight=DEFAULT_MAX_IN_FLIGHT if max_in_flight is None else max_in_flight,
            # No max_value_bytes: a request --max-frame lets in always fits between router and
            # worker, and --max-frame (for untrusted input) does not bound the results.
        )
        self.router = self.pool._router
        self._n_slots = self.router.n_slots
        self._side_threads: list[threading.Thread] = []
        # Requests waiting for their slot, per slot, in arrival order (see _dispatch).
        self._held: dict[int, collections.deque[tuple[int, bytes, Sink]]] = {}
        self._held_lock = threading.Lock()
        self._restart_waits = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="poolbridge-restart-wait"
        )
        # The loop's state (touched by the loop thread only, except _stopping and the wake pipe).
        self._poller = select.poll()
        self._watched: dict[int, Any] = {}  # reply fd -> the channel the loop reads it for
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)  # written from a signal handler: must never block
        self._stopping = False
        self.serving = False  # the loop runs: SIGTERM now means stop(), not an exception
        self._handlers: dict[str, Callable[[Request, Any], None]] = {
            OP_CALL: self._op_call,
            "create": self._op_create,
            OP_GETATTR: self._op_getattr,
            OP_SETATTR: self._op_setattr,
            OP_METHOD: self._op_method,
            OP_HELPER: self._op_helper,
            OP_STREAM_OPEN: self._op_stream_open,
            OP_STREAM_NEXT: self._op_stream_next,
            OP_STREAM_CLOSE: self._op_stream_close,
            OP_RELEASE: self._op_release,
            OP_CLOSE_SESSION: self._op_close_session,
            OP_PING: self._op_ping,
            "stats": self._op_stats,
            "slot_for": self._op_slot_for,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        from . import __version__

        return {
            "hello": "poolbridge",
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "slots": self.pool.workers,
            "pid": os.getpid(),
            "worker_pids": self.pool.pids(),
            "max_frame": self.max_frame,
        }

    def run(self) -> None:
        """Send the hello frame, then serve until EOF on the input fd, :meth:`stop` or :class:`_Stop`."""
        try:
            self.out.write(self.hello())
            in_fd, wake_r = self.in_fd, self._wake_r
            poller = self._poller
            poller.register(in_fd, _POLLIN)
            poller.register(wake_r, _POLLIN)
            reader = FrameReader(self.max_frame)
            handle = self.handle_frame
            read_channel = self._read_channel
            self.serving = True
            while not self._stopping:
                for fd, _events in poller.poll():
                    if fd == in_fd:
                        # One read: a large frame arrives over many turns of this loop, and the
                        # replies of other requests are read and written in between.
                        frames = reader.read_from(in_fd)
                        if frames is None:
                            log.info("EOF on the protocol input: shutting down")
                            return
                        for frame in frames:
                            handle(frame)
                        if self.out.broken:
                            return
                    elif fd == wake_r:
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                    else:
                        read_channel(fd)
            log.info("SIGTERM: shutting down")
        except _Stop:
            log.info("SIGTERM: shutting down")
        finally:
            self.serving = False

    def stop(self) -> None:
        """Make :meth:`run` return soon. Safe from a signal handler (and from any thread)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"s")
        except OSError:  # full (a wake-up is pending anyway) or already closed
            pass

    def close(self) -> None:
        # The client is gone (or asked us to go): in-flight work has nobody to reply to.
        self.pool.close(cancel=True)
        self._restart_waits.shutdown(wait=False, cancel_futures=True)
        for t in self._side_threads:
            t.join(1.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- reading replies on the loop ---------------------------------------------------------

    def _watch(self, ch: Any) -> None:
        """Poll ``ch``'s reply fd from now on (it was sent a request whose reply the loop reads)."""
        fd = ch.read_fd
        self._poller.register(fd, _POLLIN)  # re-registering a number a dead channel had is fine
        self._watched[fd] = ch

    def _read_channel(self, fd: int) -> None:
        """``fd`` (a reply pipe) is readable: read and deliver what it holds, never blocking."""
        ch = self._watched.get(fd)
        if ch is None:  # unwatched earlier in this same batch of events
            return
        if not ch.try_read():
            # Another reader took the pipe over (it reads everything pending; the loop polls it
            # again once it sends there again, see _dispatch), or the channel is finished.
            del self._watched[fd]
            self._poller.unregister(fd)

    # -- dispatch --------------------------------------------------------------------------

    def handle_frame(self, frame: bytes | bytearray | OversizedFrame) -> None:
        req_id: Any = None
        if isinstance(frame, OversizedFrame):
            exc: BaseException = frame.error(self.max_frame)
            req_id = _id_from_head(frame.head)
            self.out.write(_error_reply(req_id, FrameTooLargeError.code, "FrameTooLargeError", str(exc), ""))
            return
        try:
            try:
                req = _decode_request(frame)
            except BadRequestError:
                req_id = _salvage_id(frame)
                raise
            except Exception as exc:
                req_id = _salvage_id(frame)
                raise BadRequestError(f"undecodable frame: {exc}") from None
            if type(req) is dict:
                # The common case first: a well-formed call/create by dotted path with plain
                # arguments. Anything unusual (or wrong) falls through to the general path, which
                # validates everything again and replies with the usual typed errors.
                req_id = req.get("id")
                op = req.get("op")
                if (op == "call" or op == "create") and (type(req_id) is int or type(req_id) is str):
                    if self._fast_call(req, req_id, op):
                        return
                req_id = None
            if not isinstance(req, dict):
                raise BadRequestError(f"a request must be a map, got {type(req).__name__}")
            req_id = req.get("id")
            if not isinstance(req_id, (int, str)) or isinstance(req_id, bool):
                req_id = None  # not an id we can echo
                raise BadRequestError("a request needs an 'id' (integer or string)")
            op = req.get("op")
            handler = self._handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise BadRequestError(f"unknown op {op!r}")
            handler(Request(req), req_id)
        except Exception as exc:
            if not isinstance(exc, PoolbridgeError):
                log.exception("request %r failed in the server", req_id)
            self.out.write(_exc_reply(req_id, exc))

    def _fast_call(self, req: dict[Any, Any], req_id: Any, op: str) -> bool:
        """Serve a plain ``call``/``create``: True when done, False to take the general path.

        Never raises a request error of its own: it only declines what it does not fully check,
        so every bad request still gets the general path's reply (same code, same message).
        """
        fn = req.get("fn")
        session = req.get("session")
        if (
            type(fn) is not str
            or not fn
            or type(session) is not str
            or not 0 < len(session) <= _FAST_SESSION_CHARS
        ):
            return False
        args = req.get("args")
        nested = False
        if args is None:
            args = []
        elif type(args) is not list:
            return False
        else:
            for a in args:
                if type(a) not in PLAIN_TYPES:
                    nested = True
                    break
        kwargs = req.get("kwargs")
        if kwargs is None:
            kwargs = {}
        elif type(kwargs) is not dict:
            return False
        elif kwargs:
            for k, v in kwargs.items():
                if type(k) is not str:
                    return False
                if type(v) not in PLAIN_TYPES:
                    nested = True
        if op == "create":
            ret = RET_REF
        else:
            ret_name = req.get("ret")
            if ret_name is None:
                ret = RET_AUTO
            elif type(ret_name) is str and ret_name in _RET:
                ret = _RET[ret_name]
            else:
                return False
        if nested:
            refs: list[WireRef] = []
            try:
                _check_value(args, refs)
                _check_value(kwargs, refs)
            except BadRequestError:
                return False
            if refs:  # refs need their session and generation checked: the general path does it
                return False
        if not self.allowed(fn):
            return False
        slot = slot_for(session, self._n_slots)
        # The general path's encoding (_send); checked plain values take pack_value's fast path.
        rid, data = self.pool._encode_request(OP_CALL, session, [fn, args, kwargs, ret])
        self._dispatch(slot, rid, data, _Reply(self.out, req_id, _VALUE))
        return True

    def _session(self, r: Request) -> str:
        """The one session of a request: the ``session`` field, or the target ref's own session.

        Both given and different is a ``session_mismatch``; neither is a ``bad_request`` (there is
        no auto-session on the wire).
        """
        session = r.req.get("session")
        if session is not None:
            try:
                validate_session_id(session)
            except (TypeError, ValueError) as exc:
                raise BadRequestError(str(exc)) from None
        target = r.target
        if target is None and session is None:
            raise BadRequestError(f"{r.op!r} needs a 'session' (there is no default session on the wire)")
        return resolve_session(target.session_id if target is not None else None, session)

    def _send(
        self, r: Request, req_id: Any, op: str, fields: list[Any], kind: int = _VALUE, *, session: str | None = None
    ) -> None:
        router = self.router
        session_id = self._session(r) if session is None else session
        slot = router.slot_for(session_id)
        target = r.target
        if target is not None:
            self._check_ref(target, slot)
        for ref in r.refs:
            if ref.session_id != session_id:
                raise SessionMismatchError(
                    f"a ref of session {ref.session_id!r} was passed in session {session_id!r}; "
                    "refs are only usable in their own session"
                )
            self._check_ref(ref, slot)
        rid, data = self.pool._encode_request(op, session_id, fields)
        self._dispatch(slot, rid, data, _Reply(self.out, req_id, kind))

    def _dispatch(self, slot: int, rid: int, data: bytes, reply: Sink) -> None:
        """Send one worker request from the loop; its reply is read by the loop.

        Requests reach a slot in the order they arrived: while any wait for the slot (it is
        restarting, or was busy), later ones queue behind them instead of overtaking.
        """
        router = self.router
        # Only this thread adds a slot to _held, so "absent" cannot change under us.
        if slot not in self._held and router.ready(slot):
            # block=False: the loop never waits on one busy slot (that would stall every other
            # slot's requests behind it); past max_in_flight the request gets `busy` instead.
            # lead=True: the loop reads the reply (the channel's background reader stays parked).
            # deadline=now: if the worker died since ready(), do not wait for its restart here.
            try:
                ch = router.send(slot, rid, data, reply, lead=True, block=False, deadline=time.monotonic())
            except CallTimeoutError:
                pass  # nothing was sent: hold it below, like any request for a restarting slot
            else:
                if self._watched.get(ch.read_fd) is not ch:
                    self._watch(ch)  # a new channel (restart), or one another reader had taken over
                return
        # The slot is restarting after a crash (or busy): its requests wait off the loop, in
        # order, so the other slots keep being served meanwhile.
        with self._held_lock:
            held = self._held.get(slot)
            if held is not None:
                held.append((rid, data, reply))
                return
            self._held[slot] = collections.deque([(rid, data, reply)])
        self._restart_waits.submit(self._send_held, slot)

    def _send_held(self, slot: int) -> None:
        """Send a slot's held requests in arrival order, then let the loop send directly again."""
        while True:
            with self._held_lock:
                held = self._held[slot]
                if not held:
                    del self._held[slot]
                    return
                rid, data, reply = held.popleft()
            try:
                # Waits (bounded) for a restarting slot. lead=False: this thread does not read,
                # and the loop is not woken for this channel: its background reader reads the reply.
                self.router.send(slot, rid, data, reply, block=False)
            except BaseException as exc:
                reply.fail(exc)

    def _check_ref(self, ref: WireRef, slot: int) -> None:
        if ref.slot != slot:
            raise SessionMismatchError(f"ref of session {ref.session_id!r} claims slot {ref.slot}; it maps to {slot}")
        generation = self.router.generation(slot)
        if ref.generation != generation:
            raise SessionLostError(
                f"ref {ref.ref_id} of session {ref.session_id!r} outlived its worker: slot {slot} is now "
                f"generation {generation}; the session's objects are gone"
            )

    # -- ops -------------------------------------------------------------------------------

    def _op_call(self, r: Request, req_id: Any) -> None:
        fn = r.fn(self.allowed)
        self._send(r, req_id, OP_CALL, [fn, r.args(), r.kwargs(), r.ret()])

    def _op_create(self, r: Request, req_id: Any) -> None:
        fn = r.fn(self.allowed)
        self._send(r, req_id, OP_CALL, [fn, r.args(), r.kwargs(), RET_REF])

    def _op_getattr(self, r: Request, req_id: Any) -> None:
        if "target" in r.req:
            target = r.ref("target")
            self._send(r, req_id, OP_GETATTR, [target, r.name(not self.restricted), r.ret()])
            return
        path = r.field("path", str)
        if not self.allowed(path):
            raise NotAllowedError(f"{path!r} is not allowed by this server's --allow-module list")
        self._send(r, req_id, OP_GETATTR, [path, None, r.ret()])

    def _op_setattr(self, r: Request, req_id: Any) -> None:
        target = r.ref("target")
        name = r.name(not self.restricted)
        self._send(r, req_id, OP_SETATTR, [target, name, r.value("value")])

    def _op_method(self, r: Request, req_id: Any) -> None:
        target = r.ref("target")
        name = r.name(not self.restricted)
        self._send(r, req_id, OP_METHOD, [target, name, r.args(), r.kwargs(), r.ret()])

    def _op_helper(self, r: Request, req_id: Any) -> None:
        name = r.field("name", str)
        self._send(r, req_id, OP_HELPER, [name, r.args(), r.kwargs(), r.ret()])

    def _op_stream_open(self, r: Request, req_id: Any) -> None:
        fn = r.fn(self.allowed)
        self._send(r, req_id, OP_STREAM_OPEN, [fn, r.args(), r.kwargs(), r.batch()], _STREAM_OPEN)

    def _op_stream_next(self, r: Request, req_id: Any) -> None:
        key = r.stream()
        self._send(r, req_id, OP_STREAM_NEXT, [key.key(), r.batch()], _STREAM_NEXT)

    def _op_stream_close(self, r: Request, req_id: Any) -> None:
        key = r.stream()
        self._send(r, req_id, OP_STREAM_CLOSE, [key.key()], _PLAIN)

    def _op_release(self, r: Request, req_id: Any) -> None:
        ref = r.ref("ref")
        self._send(r, req_id, OP_RELEASE, [ref.key()], _PLAIN)

    def _op_close_session(self, r: Request, req_id: Any) -> None:
        self._send(r, req_id, OP_CLOSE_SESSION, [], _PLAIN)

    def _op_ping(self, r: Request, req_id: Any) -> None:
        """Without a session: the server answers. With one: that session's worker does."""
        if r.req.get("session") is None:
            self.out.write({"id": req_id, "status": "ok", "value": {"pid": os.getpid()}})
            return
        session_id = self._session(r)
        slot = self.router.slot_for(session_id)
        rid = self.router.next_id()
        self._dispatch(slot, rid, pack_plain([rid, OP_PING, None, b""]), _PingReply(self.out, req_id))

    def _op_slot_for(self, r: Request, req_id: Any) -> None:
        session_id = self._session(r)
        self.out.write({"id": req_id, "status": "ok", "value": self.router.slot_for(session_id)})

    def _op_stats(self, r: Request, req_id: Any) -> None:
        # pool.stats() waits on every worker: run it off the reading thread.
        def run() -> None:
            try:
                stats = self.pool.stats()
                value = {"workers": stats.workers, "slots": [asdict(s) for s in stats.slots]}
                self.out.write({"id": req_id, "status": "ok", "value": value})
            except Exception as exc:
                self.out.write(_exc_reply(req_id, exc))

        self._side_threads = [t for t in self._side_threads if t.is_alive()]
        t = threading.Thread(target=run, name="poolbridge-stats", daemon=True)
        self._side_threads.append(t)
        t.start()


class _PingReply(Sink):
    __slots__ = ("out", "req_id")

    def __init__(self, out: _Output, req_id: Any) -> None:
        self.out = out
        self.req_id = req_id

    def deliver(self, status: int, body: Any) -> None:
        if status == OK:
            slot, generation, pid = unpack_plain(body)
            self.out.write({"id": self.req_id, "status": "ok",
                            "value": {"slot": slot, "generation": generation, "pid": pid}})
        else:
            code, type_name, message, tb, _ = unpack_plain(body)
            self.out.write(_error_reply(self.req_id, code, type_name, message, tb))

    def fail(self, exc: BaseException) -> None:
        self.out.write(_exc_reply(self.req_id, exc))


def _salvage_id(frame: bytes | bytearray) -> Any:
    """The ``id`` of a frame that failed to decode as a request, if a lenient decode can read it."""
    try:
        obj = msgpack.unpackb(frame, raw=True, strict_map_key=False, ext_hook=lambda c, d: None)
    except Exception:
        return None
    if isinstance(obj, dict):
        req_id = obj.get(b"id")
        if isinstance(req_id, int) and not isinstance(req_id, bool):
            return req_id
        if isinstance(req_id, bytes):
            try:
                return req_id.decode()
            except UnicodeDecodeError:
                return None
    return None


def _id_from_head(head: bytes) -> Any:
    """The ``id`` of a request map whose first key is ``"id"``, read from the frame's first bytes."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(head)
    try:
        if unpacker.read_map_header() < 1 or unpacker.unpack() != "id":
            return None
        req_id = unpacker.unpack()
    except Exception:
        return None
    if isinstance(req_id, (int, str)) and not isinstance(req_id, bool):
        return req_id
    return None


# -- process setup ----------------------------------------------------------------------------------


def _private_fds(fds: tuple[int, int] | None) -> tuple[int, int]:
    """Take the protocol fds private, then make 0/1 harmless — before any worker is started.

    stdio mode: fd 0/1 are duplicated to fresh non-inheritable fds; fd 0 becomes /dev/null and
    fd 1 a copy of fd 2, so a ``print`` or C-level write to fd 1 (here or in a worker, which
    inherits 0/1/2) lands on stderr, never inside a frame. ``--fds`` mode: the given fds are moved
    to fresh non-inheritable fds and the originals closed.
    """
    if fds is None:
        in_fd, out_fd = os.dup(0), os.dup(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)
        return in_fd, out_fd
    src_in, src_out = fds
    in_fd, out_fd = os.dup(src_in), os.dup(src_out)
    for fd in {src_in, src_out}:
        os.close(fd)
    # --fds 0,1 (or any of 0-2) left a hole there: refill it, or the next pipe opened (a worker's)
    # would become fd 0/1 and be inherited as a worker's stdio.
    for fd, path, flags in ((2, os.devnull, os.O_WRONLY), (0, os.devnull, os.O_RDONLY), (1, None, 0)):
        try:
            os.fstat(fd)
        except OSError:
            if path is None:
                os.dup2(2, 1)
            else:
                null = os.open(path, flags)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
    return in_fd, out_fd


def serve(
    *,
    workers: int,
    fds: tuple[int, int] | None = None,
    allow_modules: Sequence[str] = (),
    max_frame: int = MAX_FRAME_DEFAULT,
    helpers: Sequence[str] = (),
    session_ttl: float | None = None,
    max_refs_per_session: int | None = None,
    max_in_flight: int | None = None,
) -> int:
    """Run the Port server until EOF on its input or SIGTERM; returns the exit status."""
    in_fd, out_fd = _private_fds(fds)

    server: Server | None = None

    def on_term(signum: int, frame: FrameType | None) -> None:
        # Once the loop runs, stop it through its wake pipe: an exception raised here could land
        # anywhere, e.g. between taking a channel lock and the `try` that releases it.
        if server is not None and server.serving:
            server.stop()
            return
        raise _Stop  # start-up: leave whatever is being set up

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server = Server(
            in_fd,
            out_fd,
            workers=workers,
            allow_modules=allow_modules,
            max_frame=max_frame,
            helpers=helpers,
            session_ttl=session_ttl,
            max_refs_per_session=max_refs_per_session,
            max_in_flight=max_in_flight,
        )
        server.run()
    except _Stop:
        log.info("SIGTERM during start-up")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt cleanup
        if server is not None:
            server.close()
        signal.signal(signal.SIGTERM, previous)
        for fd in (in_fd, out_fd):
            try:
                os.close(fd)
            except OSError:
                pass
    sys.stderr.flush()
    return 0
