"""The Port server: ``python -m poolbridge serve`` — one process that is the router of a pool and
speaks the public, map-based Port protocol (docs/protocol.md) to an Elixir (or any) client.

::

    client ──{packet,4} msgpack map──▶ ┌ the loop thread: poll(port in, wake pipe, reply fds) ┐
                                       │  port in  → handle_frame: decode, validate, resolve  │
                                       │    the session once, check every ref, translate      │
                                       │    (_portops) → outbox → per slot, one send_many ────┼─▶ worker[slot]
    client ◀── reply maps ◀─ Output ◀──┤  reply fd → channel.try_read → PortReply.deliver ◀───┼── worker[slot]
      (completion order,               │    (an ok value is spliced in as the worker sent it) │
       one write per loop turn)        └──────────────────────────────────────────────────────┘

One thread does the common-case I/O: it polls the protocol input and the reply pipes of the
channels it sent to, so a tiny call costs no thread hand-off on either side. Work is batched per
wake-up of the loop, never held past it: the plain requests of one read go to each slot together
(_portsend.py), and the replies the loop produces in one turn go out in one write before it polls
again. Requests are sent with ``lead=True`` (the channel's background reader stays parked); a
reply fd is read by taking the channel's read lock *without blocking*: if someone else holds it
(the background reader woken for a request sent off this thread, the monitor draining a dead
worker), that reader reads everything pending, so the loop stops polling the fd until it next
sends there. Requests for a slot that is restarting are *held* and sent off the loop, in arrival
order (later ones for that slot queue behind them), with ``lead=False``: the new channel's
background reader reads their replies. A request a dead worker never started is held again and
re-sent to the new generation. On the Ray backend channels have no reply fd: their delivery
threads deliver every reply.

``ping``, ``stats``, ``slot_for`` and ``cancel`` are answered from the router's own state; every
other op is translated by _portops.py and run by the session's worker, which enforces the
allow-list (_allow.py). Replies are written whole under one output lock (crash, timeout and stats
replies come from other threads, at once). Nothing the client sends is ever unpickled.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from ._errors import (
    BadRequestError,
    PoolbridgeError,
    PoolClosedError,
    SessionLostError,
    SessionMismatchError,
)
from ._pool import Pool
from ._portops import WORKER_OPS
from ._portresize import move_key, run_resize
from ._portsend import PortSender
from ._portsinks import Output, PortReply
from ._portwire import (
    REF_TAG,
    STREAM_TAG,
    TAG_MARK,
    PortRef,
    RequestCancelledError,
    ValueDecoder,
    decode_request,
    exc_reply,
    id_from_head,
    ok_reply,
    salvage_id,
    timeout_of,
    valid_id,
)
from ._protocol import (
    MAX_FRAME_DEFAULT,
    FrameReader,
    OversizedFrame,
    pack_request,
    pack_value,
)
from ._session import resolve_session, validate_session_id
from ._supervisor import DEFAULT_MAX_IN_FLIGHT
from ._wire import PORT_SERVER_OPS

log = logging.getLogger("poolbridge.server")

__all__ = ["PROTOCOL_VERSION", "REF_TAG", "STREAM_TAG", "Server"]

PROTOCOL_VERSION = 2

_POLLIN = select.POLLIN
#: Request bodies up to this size are sent in batches (a reader may write them: see _coalesce.py).
_BATCHABLE = select.PIPE_BUF - 16


class Server(PortSender):
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
        backend: str = "process",
        ray_address: str | None = None,
    ) -> None:
        self.in_fd = in_fd
        self.out = Output(out_fd)
        self.max_frame = max_frame
        self.epoch = os.urandom(8).hex()
        self.values = ValueDecoder(self.epoch)
        self.pool = Pool(
            workers=workers,
            helpers=tuple(helpers),
            session_ttl=session_ttl,
            max_refs_per_session=max_refs_per_session,
            max_in_flight=DEFAULT_MAX_IN_FLIGHT if max_in_flight is None else max_in_flight,
            # No max_value_bytes: a request --max-frame lets in always fits between router and
            # worker, and --max-frame (for untrusted input) does not bound the results.
            backend=backend,
            ray_init=None if ray_address is None else {"address": ray_address},
            _wire=True,
            _allow_modules=tuple(allow_modules),
        )
        self.router = self.pool._supervisor
        # A request frame shorter than the shared-memory threshold holds no value to lift (_shm.py).
        shm = self.pool._shm
        self._lift_at = shm.threshold if shm is not None else float("inf")
        self._side_threads: list[threading.Thread] = []
        self._arrivals = itertools.count()
        # client id -> its request while in flight (for ``cancel``; ids are the client's to keep unique)
        self._inflight: dict[Any, PortReply] = {}
        # (monotonic time, channel) of each slot's last reply, for ping/stats' last_reply_ms
        self._last_reply: dict[int, tuple[float, Any]] = {}
        # Requests waiting for their slot, per slot, in arrival order (see _dispatch, _hold).
        self._held: dict[int, list[PortReply]] = {}
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
        self._outbox: list[PortReply] | None = None  # the loop's requests not sent yet (while it runs)
        self.serving = False  # the loop runs: SIGTERM now means stop(), not an exception
        # The Port ops the server answers itself (the wire's table, _wire.PORT_SERVER_OPS): _op_<name>.
        self._local_ops: dict[str, Callable[[dict[Any, Any], Any], None]] = {
            op: getattr(self, f"_op_{op}") for op in PORT_SERVER_OPS
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
            "epoch": self.epoch,
        }

    def run(self) -> None:
        """Send the hello frame, then serve until EOF on the input fd or :meth:`stop`."""
        try:
            self.out.write(self.hello())
            in_fd, wake_r = self.in_fd, self._wake_r
            poller = self._poller
            poller.register(in_fd, _POLLIN)
            poller.register(wake_r, _POLLIN)
            reader = FrameReader(self.max_frame)
            handle = self.handle_frame
            read_channel = self._read_channel
            out = self.out
            out.batch_on()  # replies made on this thread go out once per turn (out.flush below)
            if self.pool.backend == "process":
                self._outbox = []  # requests read together are sent together (_send_outbox)
            self.serving = True
            while not self._stopping:
                for fd, _events in poller.poll():
                    if fd == in_fd:
                        # One read: a large frame arrives over many turns of this loop, into one
                        # buffer of its size, and other requests' replies go out in between.
                        frames = reader.read_from(in_fd)
                        if frames is None:
                            log.info("EOF on the protocol input: shutting down")
                            return
                        for frame in frames:
                            handle(frame)
                        self._send_outbox()
                        if out.broken:
                            return
                    elif fd == wake_r:
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                    else:
                        read_channel(fd)
                out.flush()
            log.info("SIGTERM: shutting down")
        finally:
            self.serving = False
            self._send_outbox()
            self._outbox = None
            self.out.batch_off()

    def stop(self) -> None:
        """Make :meth:`run` return soon. Safe from a signal handler (and from any thread)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"s")
        except OSError:  # full (a wake-up is pending anyway) or already closed
            pass

    def close(self) -> None:
        """Stop the workers; every request still in flight or held is answered ``pool_closed``
        (while the client still reads)."""
        self.pool.close(cancel=True)  # the monitor fails what the workers had with PoolClosedError
        self._restart_waits.shutdown(wait=False, cancel_futures=True)
        closed = PoolClosedError("the server is shutting down")
        with self._held_lock:
            held = [r for queue in self._held.values() for r in queue]
            self._held.clear()
        for reply in held:
            reply.held = False
            reply.fail(closed)
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

    # -- the one handler ---------------------------------------------------------------------

    def handle_frame(self, frame: bytes | bytearray | OversizedFrame) -> None:
        """Decode, validate, resolve the session once, check every ref, send (or answer here)."""
        if isinstance(frame, OversizedFrame):
            self.out.write(exc_reply(id_from_head(frame.head), frame.error(self.max_frame)))
            return
        req_id: Any = None
        try:
            try:
                req = decode_request(frame)
            except BadRequestError:
                req_id = salvage_id(frame)
                raise
            if type(req) is not dict:
                raise BadRequestError(f"a request must be a map, got {type(req).__name__}")
            req_id = req.get("id")
            if type(req_id) is not int and type(req_id) is not str:  # valid_id, inline (per request)
                req_id = None
                raise BadRequestError("a request needs an 'id' (integer or string)")
            op = req.get("op")
            translate = WORKER_OPS.get(op) if type(op) is str else None
            if translate is None:
                local = self._local_ops.get(op) if type(op) is str else None
                if local is None:
                    raise BadRequestError(f"unknown op {op!r:.40}")
                self._send_outbox()  # (a cancel finds the requests before it sent)
                local(req, req_id)
                return
            refs: list[PortRef] = []
            wop, target, fields, kind = translate(req, refs)
            session = req.get("session")
            if target is not None or type(session) is not str or not 0 < len(session) <= 64:
                session = self._session(req, target, op)  # (the common case inline: a valid id, no ref)
            slot = self.router.slot_for(session)
            if target is not None:
                self._check_ref(target, session, slot)
            for ref in refs:
                self._check_ref(ref, session, slot)
            if "timeout" in req or "on_timeout" in req:
                timeout, restart = timeout_of(req)
            else:
                timeout = None
            plain = len(frame) < self._lift_at and TAG_MARK not in frame
            if plain:
                # No ref to pack as an extension, no value big enough for shared memory: the
                # request body is the fields as plain msgpack (what _encode_request would make).
                rid = self.router.next_id()
                data = pack_request(rid, wop, session, pack_value(fields), [])
            else:
                # Big binaries and strings go to the worker through shared memory (_shm.py).
                rid, data = self.pool._encode_request(wop, session, fields)
            reply = PortReply(self, req_id, kind, slot, rid, data)
            if timeout is not None:
                reply.deadline = time.monotonic() + timeout
                reply.restart = restart
            self._inflight[req_id] = reply
            if plain and self._outbox is not None and not self.router.route_epoch and len(data) <= _BATCHABLE:
                self._outbox.append(reply)  # sent with the others of this read (_send_outbox)
                return
            self._send_outbox()  # the requests before it first: a slot gets them in arrival order
            if self.router.route_epoch:
                if (key := move_key(self.router, self._held, slot, session)) is not None:
                    self._hold(key, reply)  # its session is moving in a resize (_portresize.py)
                    return
            self._dispatch(slot, reply)
        except Exception as exc:
            if not isinstance(exc, PoolbridgeError):
                log.exception("request %r failed in the server", req_id)
            self.out.write(exc_reply(req_id, exc))

    @staticmethod
    def _session(req: dict[Any, Any], target: Any, op: Any) -> str:
        """The one session of a request: the ``session`` field, or the target ref's own session.
        Both given and different is a ``session_mismatch``; neither is a ``bad_request``."""
        session = req.get("session")
        if session is not None:
            # At most 64 characters is at most 256 UTF-8 bytes: no need to encode it to count.
            if type(session) is not str or not 0 < len(session) <= 64:
                try:
                    validate_session_id(session)
                except (TypeError, ValueError) as exc:
                    raise BadRequestError(str(exc)) from None
            if target is None:
                return session  # type: ignore[no-any-return]
        elif target is None:
            raise BadRequestError(f"{op!r} needs a 'session' (there is no default session on the wire)")
        return resolve_session(target.session_id if target is not None else None, session)

    def _check_ref(self, ref: PortRef, session: str, slot: int) -> None:
        """Epoch, then session, slot and generation: a ref names an object of this server only."""
        if ref.epoch != self.epoch:
            raise SessionLostError(
                f"ref {ref.ref_id} of session {ref.session_id!r} is of another server (epoch {ref.epoch!r:.20}, "
                f"this server's is {self.epoch!r}): its objects are gone"
            )
        if ref.session_id != session:
            raise SessionMismatchError(
                f"a ref of session {ref.session_id!r} was passed in session {session!r}; "
                "refs are only usable in their own session"
            )
        if self.router.route_epoch:
            return  # resized: a moved ref is checked by the worker holding its session (_migrate.py)
        if ref.slot != slot:
            raise SessionMismatchError(f"ref of session {ref.session_id!r} claims slot {ref.slot}; it maps to {slot}")
        generation = self.router.generation(slot)
        if ref.generation != generation:
            raise SessionLostError(
                f"ref {ref.ref_id} of session {ref.session_id!r} outlived its worker: slot {slot} is now "
                f"generation {generation}; the session's objects are gone"
            )

    # -- ops the server answers itself ---------------------------------------------------------

    def _op_cancel(self, req: dict[Any, Any], req_id: Any) -> None:
        """Cancel an earlier request: ``cancelled`` (it never runs), ``running`` or ``unknown``."""
        target = req.get("target")
        if valid_id(target) is None:
            raise BadRequestError("'cancel' needs a 'target': the id of a request in flight")
        reply = self._inflight.get(target)
        state = "unknown"
        if reply is not None and not reply.done:
            state = "running"
            with self._held_lock:
                held = self._held.get(reply.slot)
                if held is not None and reply in held:
                    held.remove(reply)  # its restart-wait thread skips it
                    reply.held = False
                    state = "cancelled"
            if state == "running" and reply.seq:
                try_cancel = getattr(reply.channel, "try_cancel", None)
                if try_cancel is not None and try_cancel(reply.rid, reply.seq):
                    state = "cancelled"  # the worker will skip it: no reply comes from it
            if state == "cancelled":
                reply._finish()
                self.out.write(exc_reply(target, RequestCancelledError(f"request {target!r} was cancelled")))
            elif _answered(reply):  # its reply came meanwhile
                state = "unknown"
        self.out.write(ok_reply(req_id, {"state": state}))

    def _last_reply_ms(self, slot: int, ch: Any) -> int | None:
        last = self._last_reply.get(slot)
        if last is None or (last[1] is not None and last[1] is not ch):
            return None  # the current worker of the slot has not answered yet
        return int((time.monotonic() - last[0]) * 1000)

    def _op_ping(self, req: dict[Any, Any], req_id: Any) -> None:
        """Without a session: the server's pid. With one: that session's slot, from router state."""
        if req.get("session") is None:
            self.out.write(ok_reply(req_id, {"pid": os.getpid()}))
            return
        slot = self.router.slot_for(self._session(req, None, "ping"))
        ch = self.router.channels()[slot]
        value = {"slot": slot, "generation": self.router.generation(slot), "pid": ch.pid if ch is not None else -1,
                 "last_reply_ms": self._last_reply_ms(slot, ch)}
        self.out.write(ok_reply(req_id, value))

    def _op_slot_for(self, req: dict[Any, Any], req_id: Any) -> None:
        self.out.write(ok_reply(req_id, self.router.slot_for(self._session(req, None, "slot_for"))))

    def _op_resize(self, req: dict[Any, Any], req_id: Any) -> None:
        """Grow or shrink the pool (off the loop: other requests go on meanwhile); see _portresize."""
        self._side_threads = [t for t in self._side_threads if t.is_alive()]
        t = threading.Thread(target=run_resize, args=(self, req, req_id), name="poolbridge-resize", daemon=True)
        self._side_threads.append(t)
        t.start()

    def _op_stats(self, req: dict[Any, Any], req_id: Any) -> None:
        # Workers with requests in flight are not asked (their counts are -1); idle ones answer at
        # once. Still off the loop: an idle worker may become busy just after the check.
        def run() -> None:
            try:
                stats = self.pool.stats(_ask_busy=False)
                channels = self.router.channels()
                slots = [dict(asdict(s), last_reply_ms=self._last_reply_ms(s.slot, channels[s.slot]))
                         for s in stats.slots]
                self.out.write(ok_reply(req_id, {"workers": stats.workers, "slots": slots}))
            except Exception as exc:
                self.out.write(exc_reply(req_id, exc))

        self._side_threads = [t for t in self._side_threads if t.is_alive()]
        t = threading.Thread(target=run, name="poolbridge-stats", daemon=True)
        self._side_threads.append(t)
        t.start()


def _answered(reply: PortReply) -> bool:
    return reply.done
