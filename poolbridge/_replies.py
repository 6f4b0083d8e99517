"""Parent side: where the reply to one request goes, and what it turns into.

A *sink* receives one reply, from whichever thread reads it (a caller leading the read, a
channel's background reader) or a failure (the worker died, the pool closed, the deadline passed):

* :class:`Waiter` — a caller blocked in ``pool.call``: a pre-acquired lock the reader releases;
* :class:`PoolFuture` — ``pool.submit``: a ``concurrent.futures.Future`` that is its own sink,
  stays pending until its reply, and whose ``cancel()`` reaches the worker;
* :class:`Discard` — fire-and-forget releases (dropped handles).

:func:`rebuild_error` turns an error reply back into the exception it stands for, and
:class:`Deadlines` times out submitted calls (one thread per pool).
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

import cloudpickle

from ._channel import Late, Sink
from ._errors import ERRORS_BY_CODE, CallTimeoutError, RemoteError, RemoteTraceback
from ._protocol import unpack_plain

if TYPE_CHECKING:
    from ._pool import Pool

log = logging.getLogger("poolbridge")

FAILED = -1  # a Waiter's status when it holds an exception instead of a reply


class Waiter(Sink):
    """A reply slot for a caller that blocks: a pre-acquired lock the reader releases."""

    __slots__ = ("_lock", "body", "status")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.status: int | None = None
        self.body: Any = None

    def deliver(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        self._lock.release()

    def fail(self, exc: BaseException) -> None:
        self.deliver(FAILED, exc)

    def wait(self, timeout: float | None) -> bool:
        return self._lock.acquire(True, -1 if timeout is None else timeout)


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


def rebuild_error(body: bytes) -> BaseException:
    """The exception an error reply stands for: the original type where it can be rebuilt."""
    code, type_name, message, tb, pickled = unpack_plain(body)
    exc: Any = None
    if pickled is not None:
        try:
            exc = cloudpickle.loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        cls = ERRORS_BY_CODE.get(code)
        exc = cls(message) if cls is not None else RemoteError(type_name, message, tb)
    exc.__cause__ = RemoteTraceback(tb)
    rebuilt: BaseException = exc
    return rebuilt


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
            if (channel.pending.pop(req_id, None) if late is None else channel.pending.abandon(req_id, late)) is None:
                continue  # answered (or failed) in time
            if restart:
                pool = self._pool()
                if pool is not None:
                    log.warning("slot %d: %s; restarting the worker", slot, message)
                    pool._router.kill_slot(slot)
            sink.fail(CallTimeoutError(message))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
