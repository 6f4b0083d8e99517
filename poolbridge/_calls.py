"""Parent side: the call engine — prepare → send → await → decode, one deadline mechanism, the sinks.

::

    caller (Pool / AsyncPool / Port server)                          worker[slot] process
    ───────────────────────────────────────                          ────────────────────
    _api: request builder (op, ref, fields, decode)
      │
    prepare: resolve_session ─▶ slot_for ─▶ encode_request (pack_value; big buffers → _shm segments)
      │
    run / submit: supervisor.send(slot, id, frame, sink) ─▶ channel (_pipes.ProcessChannel, or
      │           pending[id] = sink (_channel.Pending)          backends/ray.RayChannel)
      │                                          │ request pipe ▶ _worker_main: read ▶ WorkerCore.handle
      │                                          │                  (_worker: op dispatch; _store: sessions)
      │           reply pipe ◀── {packet,4} reply frame ◀────────────────┘
      │  (fast lane: run without a timeout on an idle channel — supervisor.send_now writes the
      │   frame at once, channel.read_own_reply reads until its reply; the same sinks and table)
      ▼
    sink.deliver(status, body): Waiter (call: the caller reads its own reply, leader/follower),
      PoolFuture (submit: the channel's background reader), _aio._LoopSink (AsyncPool: the event
      loop reads), _portsinks (the Port server) ─▶ decode: value, or rebuild_error(body) raised

    deadline: one per call, fixed at send (it also bounds waiting for the slot and for room); run
      waits for its reply until then, submit hands it to Deadlines (one thread per pool), AsyncPool
      arms loop.call_later; at expiry all three call expire(), which abandons the request in its
      pending table (a late reply goes to a Late sink) and restarts the slot if asked.
    death: _monitor (pidfd) ─▶ _supervisor: drain the channel, fail its pending sinks with
      WorkerCrashedError, restart the slot (generation + 1).

    Port path (Elixir): __main__ serve ─▶ _server poll loop ─▶ _portwire (maps ⇄ fields) ─▶
      _portops (op translation) ─▶ prepare/encode_request as above ─▶ _portsinks (replies written
      back to the Port as {packet,4} frames).

A *sink* receives one reply, from whichever thread reads it (a caller leading the read, a
channel's background reader) or a failure (the worker died, the pool closed, the deadline passed):

* :class:`Waiter` — a caller blocked in ``pool.call``: a pre-acquired lock the reader releases;
* :class:`PoolFuture` — ``pool.submit``: a ``concurrent.futures.Future`` that is its own sink,
  stays pending until its reply, and whose ``cancel()`` reaches the worker;
* :class:`Discard` — fire-and-forget releases (dropped handles).

:class:`Deadlines` times out submitted calls (one thread per pool). Envelopes and errors are
encoded and decoded in _wire.py.
"""


from __future__ import annotations

import concurrent.futures
import heapq
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _shm
from ._channel import Late, Sink
from ._errors import (
    CallTimeoutError,
    SessionLostError,
    SessionMismatchError,
    value_too_large,
)
from ._handles import Ref
from ._hashing import slot_for
from ._protocol import OK, OP_STREAM_OPEN, WireRef, pack_value, unpack_plain
from ._session import resolve_session
from ._wire import encode_request as wire_request
from ._wire import rebuild_error

if TYPE_CHECKING:
    from ._api import _Api
    from ._pool import Pool

log = logging.getLogger("poolbridge")

_NO_SEGMENTS: list[str] = []  # never changed: a request without segments

FAILED = -1  # a Waiter's status when it holds an exception instead of a reply


class Waiter(Sink):
    """A reply slot for a caller that blocks: a pre-acquired lock the reader releases."""

    __slots__ = ("_lock", "body", "released", "status")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.status: int | None = None
        self.body: Any = None
        self.released = False

    def deliver(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        self._lock.release()
        self.released = True  # (after the release: see reuse())

    def reuse(self) -> Waiter | None:
        """This waiter, ready for another call, once its reply is in and its lock released (the
        caller may see ``status`` a moment before ``deliver`` releases the lock); else None."""
        if not self.released:
            return None
        self._lock.acquire(False)  # acquired again, unless a wait() already took it
        self.status = self.body = None
        self.released = False
        return self

    def fail(self, exc: BaseException) -> None:
        self.deliver(FAILED, exc)

    def wait(self, timeout: float | None) -> bool:
        return self._lock.acquire(True, -1 if timeout is None else timeout)


_spare = threading.local()  # .waiter: this thread's Waiter of its last finished call, for the next


_PENDING = concurrent.futures._base.PENDING
_FINISHED = concurrent.futures._base.FINISHED
_DONE_STATES = (concurrent.futures._base.CANCELLED, concurrent.futures._base.CANCELLED_AND_NOTIFIED, _FINISHED)


class PoolFuture(concurrent.futures.Future[Any], Sink):
    """The Future of ``pool.submit``: also the sink its reply is delivered to.

    ``cancel()`` reaches the worker: it returns True only if the worker had not started the call —
    it then never runs (see _cancel.py). A call that has started cannot be cancelled (False), as
    with ``concurrent.futures``. ``done()`` and the ``result()`` of a finished future read the
    state without taking the Condition (the state is final once FINISHED).
    """

    cancellable = True
    _orphaned: BaseException | None = None  # set in a forked child: the reply goes to the parent

    def __init__(self, decode: Callable[[int, Any], Any]) -> None:
        super().__init__()
        self.decode = decode
        self.seq = 0
        self._target: Any = None  # (channel, req_id) once sent

    # -- as a sink ---------------------------------------------------------------------

    def deliver(self, status: int, body: Any) -> None:
        try:
            value = self.decode(status, body)
        except BaseException as exc:
            self._settle(None, exc)
        else:
            self._settle(value, None)

    def fail(self, exc: BaseException) -> None:
        self._settle(None, exc)

    def orphaned(self, exc: BaseException) -> None:
        # In a forked child, at fork: no lock may be taken (its holder may not exist here) and no
        # callback run; waiting on the future raises this instead (result, exception).
        self._orphaned = exc

    def _settle(self, value: Any, exc: BaseException | None) -> None:
        try:
            if exc is not None:
                self.set_exception(exc)
            else:
                self.set_result(value)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass

    # -- the Future face ---------------------------------------------------------------

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _FINISHED and self._exception is None:  # final once FINISHED
            return self._result
        if self._orphaned is not None and self._state == _PENDING:
            raise self._orphaned
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._orphaned is not None and self._state == _PENDING:
            raise self._orphaned
        return super().exception(timeout)

    def cancel(self) -> bool:
        if self._state != _PENDING:
            return self._state in _DONE_STATES[:2]
        target = self._target
        if target is None:
            return False
        channel, req_id = target
        if not channel.try_cancel(req_id, self.seq):
            return False
        return super().cancel()


class Discard(Sink):
    """For fire-and-forget releases: the reply is not wanted."""

    __slots__ = ()

    def deliver(self, status: int, body: Any) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass


DISCARD = Discard()


class Deadlines:
    """Timeouts of submitted calls: one thread per pool and a heap, not a timer per call.

    At a deadline the request is taken out of its channel's pending table (so a late reply is
    dropped) and its future fails with :class:`CallTimeoutError`; with ``on_timeout="restart"``
    the slot's worker is killed too.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = weakref.ref(pool)
        self._heap: list[tuple[float, int, Any]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def add(self, deadline: float, channel: Any, req_id: int, sink: Sink, slot: int, message: str,
            restart: bool, late: Late | None = None) -> None:
        """Fail ``sink`` at ``deadline`` unless answered; ``late`` takes its reply then (see Late;
        None: the reply is dropped)."""
        with self._cond:
            heapq.heappush(self._heap, (deadline, req_id, (channel, sink, slot, message, restart, late)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="poolbridge-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == req_id:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._stopped:
                    return
                _, req_id, (channel, sink, slot, message, restart, late) = heapq.heappop(self._heap)
            if getattr(sink, "cancel_on_timeout", False):
                # Not started yet: it never runs (the Port server's timeouts). Nothing to restart.
                try_cancel = getattr(channel, "try_cancel", None)
                if try_cancel is not None and try_cancel(req_id, sink.seq):
                    sink.fail(CallTimeoutError(message))
                    continue
            pool = self._pool() if restart else None
            if expire(channel, req_id, late, pool, slot, message):
                sink.fail(CallTimeoutError(message))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)


# -- the engine: methods of _Api and Pool (bound there), one per stage ---------------------------


def prepare(api: _Api, op: str, ref: WireRef | None, fields: list[Any]) -> tuple[int, int, bytes]:
    """``(slot, req_id, frame)``. The one boundary: the session is resolved once here; the slot and
    the payload both come from that one value."""
    pool = api._pool
    router = pool._supervisor
    if router.closing:  # closed, or a forked child's copy of its parent's pool
        raise router.closed_error()
    session_id = resolve_session(ref.session_id if ref is not None else None, api._opts.session)
    slot = slot_for(session_id, router.n_slots)
    if ref is not None:
        if isinstance(ref, Ref) and ref._api._pool is not pool:
            raise SessionMismatchError(f"{ref!r} belongs to another pool; a ref is only usable in its own pool")
        if router.route_epoch:
            pass  # resized: a moved ref is checked by the worker holding its session (_migrate.py)
        elif ref.slot != slot:  # only a forged ref can get here
            raise SessionMismatchError(f"{ref!r} claims slot {ref.slot}; its session maps to {slot}")
        elif ref.generation != pool._supervisor.generation(slot):
            raise SessionLostError(
                f"{ref!r} outlived its worker: slot {slot} is now generation "
                f"{pool._supervisor.generation(slot)}; the session's objects are gone"
            )
    req_id, data = encode_request(pool, op, session_id, fields, pool, api._opts.zero_copy)
    return slot, req_id, data


def run(api: _Api, op: str, ref: WireRef | None, fields: list[Any], decode: Callable[[int, Any], Any]) -> Any:
    """Send and block for the reply, reading it ourselves when nobody else is (no thread hop)."""
    pool = api._pool
    slot, req_id, data = api._prepare(op, ref, fields)
    if pool._discards:
        pool._flush_discards()
    waiter = getattr(_spare, "waiter", None) or Waiter()
    _spare.waiter = None
    timeout = api._opts.timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    router = pool._supervisor
    try:
        # The fast lane (no timeout, an idle channel): written at once, then read by this thread.
        fast = None if deadline is not None else router.send_now(slot, req_id, data, waiter)
        channel = fast or router.send(slot, req_id, data, waiter, lead=True, block=api._opts.block, deadline=deadline)
    except CallTimeoutError:
        # Waiting for the slot or the pipe used up the timeout. If the frame is half written
        # (finished off the caller's thread), the worker runs the call: its reply is late.
        ch = router.channels()[slot]
        if ch is not None:
            ch.pending.abandon(req_id, Late(api._late(op, decode)))
        raise CallTimeoutError(f"{op} did not finish within {timeout}s (slot {slot})") from None
    try:
        replied = (fast is not None and fast.read_own_reply(waiter)) or channel.await_reply(
            req_id, waiter, None if deadline is None else max(0.0, deadline - time.monotonic())
        )
    except BaseException:  # an interrupt (Ctrl-C) or a crash report: whatever comes is late
        channel.pending.abandon(req_id, Late(api._late(op, decode)))
        raise
    if not replied:
        if give_up(api, channel, req_id, slot, op, decode):
            raise CallTimeoutError(f"{op} did not finish within {timeout}s (slot {slot})")
        waiter.wait(None)  # the reply raced the timeout and is being delivered
    status = waiter.status
    body = waiter.body
    if status == FAILED or status is None:
        raise body
    # Delivered once, by whoever popped it from the pending table: nobody holds it now, so this
    # thread's next call may use it.
    _spare.waiter = waiter.reuse()
    return decode(status, body)


def expire(channel: Any, req_id: int, late: Late | None, restart: Pool | None, slot: int, why: str) -> bool:
    """The one way a request's deadline ends it (``run``, the asyncio face's timer, ``Deadlines``):
    take it out of its channel's pending table — a reply that comes later goes to ``late`` (or is
    dropped) — and kill the slot's worker when ``restart`` (``on_timeout="restart"``) names its
    pool. False: the reply (or a failure) won the race and is being delivered."""
    if (channel.pending.pop(req_id, None) if late is None else channel.pending.abandon(req_id, late)) is None:
        return False
    if restart is not None:
        log.warning("slot %d: %s; restarting the worker", slot, why)
        restart._supervisor.kill_slot(slot)
    return True


def give_up(api: _Api, channel: Any, req_id: int, slot: int, op: str, decode: Callable[[int, Any], Any]) -> bool:
    """A blocking or awaited call's deadline has passed: :func:`expire` with its options."""
    restart = api._pool if api._opts.on_timeout == "restart" else None
    why = f"{op} timed out after {api._opts.timeout}s"
    return expire(channel, req_id, Late(api._late(op, decode)), restart, slot, why)


def submit(api: _Api, op: str, ref: WireRef | None, fields: list[Any], decode: Callable[[int, Any], Any]) -> Any:
    pool = api._pool
    slot, req_id, data = api._prepare(op, ref, fields)
    if pool._discards:
        pool._flush_discards()
    future = PoolFuture(decode)
    timeout = api._opts.timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    channel = pool._supervisor.send(slot, req_id, data, future, block=api._opts.block, deadline=deadline)
    future._target = (channel, req_id)
    if deadline is not None:
        pool._deadlines.add(deadline, channel, req_id, future, slot, f"{op} did not finish within {timeout}s",
                            api._opts.on_timeout == "restart", Late(api._late(op, decode)))
    return future


def late(api: _Api, op: str, decode: Callable[[int, Any], Any]) -> Callable[[int, Any], Any]:
    """What the reply of a call given up on is turned into, to be dropped (see ``Late``): its
    decoded value, whose refs release themselves when dropped — except a stream's opening,
    whose decoder would start pulling the stream: that one just closes it."""
    return api._close_opened_stream if op == OP_STREAM_OPEN else decode


def close_opened_stream(api: _Api, status: int, body: Any) -> None:
    if status == OK:
        key, items, done = unpack_plain(body)
        api._pool._unpack(items)  # refs among the first items release themselves
        if not done:
            api._pool._discard(key, "stream_close")


def value(api: _Api, status: int, body: Any) -> Any:
    if status == OK:
        return api._decode_body(body)
    raise rebuild_error(body)


def decode_body(api: _Api, body: bytes) -> Any:
    """A value from a reply body (read-only views of big buffers with ``zero_copy``)."""
    if api._opts.zero_copy:
        with _shm.zero_copy_views():
            return api._pool._unpack(body)
    return api._pool._unpack(body)


def encode_request(
    pool: Pool, op: str, session_id: str, fields: list[Any], owner: object = None, zero_copy: bool = False
) -> tuple[int, bytes]:
    """``(req_id, frame body)`` of a request, its big buffers in segments; raises
    :class:`ValueTooLargeError` past ``max_value_bytes`` before anything is sent."""
    shm = pool._shm
    if shm is None:
        body = pack_value(fields, session_id, owner)
        names: list[str] = _NO_SEGMENTS
        size = 0
    else:
        if zero_copy:
            shm.zero_copy(True)
            try:
                body = pack_value(fields, session_id, owner, shm)
            finally:
                shm.zero_copy(False)
        else:
            body = pack_value(fields, session_id, owner, shm)
        names, size = shm.take()
    limit = pool.max_value_bytes
    if limit is not None and len(body) + size > limit:
        for name in names:
            shm.recycle(name)  # type: ignore[union-attr]
        raise value_too_large("this request (its arguments)", len(body) + size, limit)
    req_id = pool._supervisor.next_id()
    return req_id, wire_request(req_id, op, session_id, body, names)
