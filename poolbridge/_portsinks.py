"""Parent side, Port server: where a client request's reply goes — the protocol output and the sink
of one request on its way through a worker (:class:`PortReply`), with its cancel and crash rules.

A :class:`PortReply` is delivered (or failed) by whichever thread reads its worker's reply: the
server's loop, a channel's background reader, the monitor failing a dead worker's requests, the
deadline thread. It is answered once (``done``); a crash of a worker that had not started it puts it
back in the server's held queue instead (``held``), to be re-sent to the slot's next worker.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ._channel import Sink
from ._errors import FrameTooLargeError, WorkerCrashedError
from ._frames import write_frame
from ._portops import KIND_STREAM_NEXT, KIND_STREAM_OPEN, KIND_VALUE
from ._portwire import error_reply, exc_reply, ok_reply, worker_error_reply
from ._protocol import OK, pack_plain, reset_plain_packer, unpack_plain

if TYPE_CHECKING:
    from ._server import Server

log = logging.getLogger("poolbridge.server")

__all__ = ["Output", "PortReply"]


_PORT_FRAME_MAX = 0xFFFFFFFF - 1  # the largest length a 4-byte header gives (0xFFFFFFFF: see _frames.py)


class Output:
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
            data = pack_plain(error_reply(reply.get("id"), "internal", type(exc).__name__, str(exc), ""))
        if len(data) > _PORT_FRAME_MAX:  # {packet, 4} cannot say it: the reply is that error instead
            message = f"the reply is {len(data)} bytes; a {{packet, 4}} frame holds at most {_PORT_FRAME_MAX}"
            data = pack_plain(error_reply(reply.get("id"), FrameTooLargeError.code, "FrameTooLargeError", message, ""))
        with self.lock:
            if self.broken:
                return
            try:
                write_frame(self.fd, data)  # a big body is not copied to prepend its header
            except OSError:
                # The client is gone; the read loop sees EOF and shuts down.
                self.broken = True


class PortReply(Sink):
    """One client request on its way through a worker, and the one reply it gets.

    Called from whichever thread reads the reply (the loop, a channel's background reader, the
    monitor failing a dead worker's requests, the deadline thread). ``order`` is its arrival
    number: held requests are sent in that order.
    """

    __slots__ = ("channel", "data", "deadline", "done", "held", "kind", "order", "req_id", "restart", "retried",
                 "rid", "seq", "server", "slot")
    cancellable = True  # the channel numbers it (seq), so ``cancel`` and timeouts can reach the worker
    cancel_on_timeout = True  # a request timed out before it started never runs

    def __init__(self, server: Server, req_id: Any, kind: int, slot: int, rid: int, data: bytes) -> None:
        self.server = server
        self.req_id = req_id
        self.kind = kind
        self.slot = slot
        self.rid = rid
        self.data = data
        self.order = next(server._arrivals)
        self.seq = 0
        self.channel: Any = None
        self.deadline: float | None = None
        self.restart = False
        self.done = False  # answered (or answering): nothing more is written for it
        self.held = False  # in the server's held queue of its slot
        self.retried = False  # a dead worker never started it: sent again, with the segments its frame names

    def deliver(self, status: int, body: Any) -> None:
        server = self.server
        self._finish()
        server._last_reply[self.slot] = (time.monotonic(), self.channel)
        try:
            reply = ok_reply(self.req_id, self._value(body)) if status == OK else worker_error_reply(self.req_id, body)
        except Exception as exc:
            log.exception("undecodable worker reply")
            reply = exc_reply(self.req_id, exc)
        server.out.write(reply)

    def _value(self, body: bytes) -> Any:
        kind = self.kind
        decode = self.server.values.decode
        if kind == KIND_VALUE:
            return decode(body)
        if kind == KIND_STREAM_OPEN:
            key, items, done = unpack_plain(body)  # [session, id, slot, generation], from the worker
            return {"stream": self.server.values.stream(key), "items": decode(items), "done": done}
        if kind == KIND_STREAM_NEXT:
            items, done = unpack_plain(body)
            return {"items": decode(items), "done": done}
        return unpack_plain(body)

    def fail(self, exc: BaseException, *, sent: bool = True, retry: bool = True) -> None:
        """The request failed. ``sent=False``: it never reached a worker (the send raised).
        ``retry=False``: a worker crash is not retried (its slot did not come back)."""
        if self.done or self.held:  # already answered, or already re-held by the monitor
            return
        server = self.server
        reply = exc_reply(self.req_id, exc)
        if isinstance(exc, WorkerCrashedError):
            ran = sent and self._ran()
            if not ran and retry and not server.pool.closed:
                self.retried = True
                server._hold(self.slot, self)  # no worker started it: the slot's next worker runs it
                return
            reply["error"]["ran"] = ran
        self._finish()
        server.out.write(reply)

    def _ran(self) -> bool:
        """May the dead worker have started this request? (True when it cannot be known.)"""
        ch = self.channel
        reached = getattr(ch, "reached", None)
        return self.seq == 0 or reached is None or bool(reached(self.seq))

    def _finish(self) -> None:
        self.done = True
        self.data = b""  # kept only for a re-send after a crash: a large request is not held on to
        inflight = self.server._inflight
        if inflight.get(self.req_id) is self:
            inflight.pop(self.req_id, None)
