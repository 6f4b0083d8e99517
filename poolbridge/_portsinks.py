"""Parent side, Port server: where a client request's reply goes — the protocol output and the sink
of one request on its way through a worker (:class:`PortReply`), with its cancel and crash rules.

A :class:`PortReply` is delivered (or failed) by whichever thread reads its worker's reply: the
server's loop, a channel's background reader, the monitor failing a dead worker's requests, the
deadline thread. It is answered once (``done``); a crash of a worker that had not started it puts it
back in the server's held queue instead (``held``), to be re-sent to the slot's next worker.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from threading import get_ident
from time import monotonic
from typing import TYPE_CHECKING, Any

from ._channel import Sink
from ._errors import FrameTooLargeError, WorkerCrashedError
from ._frames import HEADER, write_frame
from ._portops import KIND_STREAM_NEXT, KIND_STREAM_OPEN, KIND_VALUE
from ._portwire import error_reply, exc_reply, ok_reply, worker_error_reply
from ._protocol import OK, encode_frame, pack_plain, reset_plain_packer, unpack_plain, write_all
from ._shm_channel import release_unsent

if TYPE_CHECKING:
    from ._server import Server

log = logging.getLogger("poolbridge.server")

__all__ = ["Output", "PortReply"]


_PORT_FRAME_MAX = 0xFFFFFFFF - 1  # the largest length a 4-byte header gives (0xFFFFFFFF: see _frames.py)
_BATCH_FRAME = 1 << 14  # a reply this big or bigger is written at once, not copied into the batch
_BATCH_BYTES = 1 << 16  # the loop writes its batch once it holds this much
# An ok reply, {"id": id, "status": "ok", "value": value}, around its id and value (_portwire.ok_reply).
_OK_HEAD = b"\x83" + pack_plain("id")
_OK_MIDDLE = pack_plain("status") + pack_plain("ok") + pack_plain("value")
_OK_FIXED = len(_OK_HEAD) + len(_OK_MIDDLE)
# The first byte of every msgpack extension type (ext 8/16/32, fixext 1-16). A value without any
# of these bytes holds no extension; one with them may still hold none (the byte inside a number
# or a string): it then takes the decoding path.
_EXT_BYTE = re.compile(b"[\xc7-\xc9\xd4-\xd8]")


class Output:
    """The protocol output fd, written whole frames at a time under one lock.

    The server's loop thread *batches*: a reply it produces while handling one wake-up of its poll
    is appended to a buffer, and :meth:`flush` (called by the loop before it polls again) writes
    them all with one ``write`` — one system call and one wake-up of the client per loop turn, not
    per reply. Other threads (crash, timeout, stats, resize replies) write at once. A frame is
    whole either way, so frames of different threads never interleave.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.broken = False
        self._batcher: int | None = None  # the loop thread's id while it batches
        self._batch: list[bytes] = []
        self._batch_bytes = 0

    def batch_on(self) -> None:
        """From now on, replies written by *this* thread wait for :meth:`flush`."""
        self._batcher = get_ident()

    def batch_off(self) -> None:
        self.flush()
        self._batcher = None

    def write_ok(self, req_id: Any, value: bytes) -> None:
        """Write ``ok_reply(req_id, <value>)`` given the value's msgpack bytes (not decoded)."""
        id_bytes = pack_plain(req_id)
        size = _OK_FIXED + len(id_bytes) + len(value)
        if size < _BATCH_FRAME and self._batcher == get_ident():  # (the loop's usual reply, inline)
            self._add((HEADER.pack(size), _OK_HEAD, id_bytes, _OK_MIDDLE, value), size)
        elif size > _PORT_FRAME_MAX:  # too big: the error reply, through write
            self.write(ok_reply(req_id, unpack_plain(value)))
        else:
            self._send(b"".join((_OK_HEAD, id_bytes, _OK_MIDDLE, value)))

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
        self._send(data)

    def _send(self, data: bytes) -> None:
        """Write the frame of body ``data``: batched on the loop thread, at once elsewhere."""
        if self._batcher == get_ident() and len(data) < _BATCH_FRAME:
            self._add((HEADER.pack(len(data)), data), len(data))
            return
        with self.lock:
            if self._batch and self._batcher == get_ident():
                self._write(self._take())  # a big reply of the loop: after the ones before it
            self._write(data, write_frame)

    def _add(self, parts: tuple[bytes, ...], size: int) -> None:
        """(The loop thread) add one frame, in parts, to the batch; write it once it is full."""
        self._batch += parts
        self._batch_bytes += size
        if self._batch_bytes >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the loop's batched replies (one ``write`` for all of them)."""
        if self._batch:
            with self.lock:
                self._write(self._take())

    def _take(self) -> bytes:
        batch = self._batch
        data = b"".join(batch)  # (header and body of each frame)
        batch.clear()
        self._batch_bytes = 0
        return data

    def _write(self, data: bytes, write: Callable[[int, bytes], Any] = write_all) -> None:
        """Under the lock: write whole frames (``write_frame``: one frame of body ``data``, a big
        body not copied to prepend its header)."""
        if self.broken:
            return
        try:
            write(self.fd, data)
        except OSError:
            self.broken = True  # the client is gone; the read loop sees EOF and shuts down


class PortReply(Sink):
    """One client request on its way through a worker, and the one reply it gets.

    Called from whichever thread reads the reply (the loop, a channel's background reader, the
    monitor failing a dead worker's requests, the deadline thread). ``order`` is its arrival
    number: held requests are sent in that order.
    """

    __slots__ = ("channel", "data", "deadline", "done", "held", "kind", "order", "req_id", "restart", "rid", "seq",
                 "server", "slot")
    cancellable = True  # the channel numbers it (seq), so ``cancel`` and timeouts can reach the worker
    cancel_on_timeout = True  # a request timed out before it started never runs
    # A send that fails leaves the segments the frame names to us (Supervisor._send): the request
    # may be held and sent again with them; fail(sent=False) frees them once it is answered unsent.
    owns_segments = True

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

    def deliver(self, status: int, body: Any) -> None:
        server = self.server
        self.done = True  # (_finish, inline: once per reply)
        self.data = b""
        if server._inflight.get(self.req_id) is self:
            server._inflight.pop(self.req_id, None)
        server._last_reply[self.slot] = (monotonic(), self.channel)
        if status == OK and self.kind == KIND_VALUE and type(body) is bytes and not _EXT_BYTE.search(body):
            # No extension type in the value (no ref, no segment): its msgpack is the wire value
            # as is — decoding and packing it again would give the same bytes.
            server.out.write_ok(self.req_id, body)
            return
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
                server._hold(self.slot, self)  # no worker started it: the slot's next worker runs it
                return
            reply["error"]["ran"] = ran
        frame = self.data
        self._finish()
        if not sent:  # it reached no worker: nobody else frees the segments its frame names
            release_unsent(encode_frame(frame), server.router.lifter)
        server.out.write(reply)

    def _ran(self) -> bool:
        """May the dead worker have started this request? (True when it cannot be known.)"""
        if self.seq == 0 and self.server.pool.backend == "process":
            # A process channel numbers a request as it queues it: a crash that found it in the
            # pending table before that (its send was under way) found it unsent.
            return False
        ch = self.channel
        reached = getattr(ch, "reached", None)
        return self.seq == 0 or reached is None or bool(reached(self.seq))

    def _finish(self) -> None:
        self.done = True
        self.data = b""  # kept only for a re-send after a crash: a large request is not held on to
        inflight = self.server._inflight
        if inflight.get(self.req_id) is self:
            inflight.pop(self.req_id, None)
