"""Parent side: the write half of a process channel — request frames into the worker's pipe.

Writing the request pipe — coalescing. While fewer than ``_WINDOW`` written requests await their
replies, a request is written at once (a lone call pays one ``write``). Beyond that it joins the
channel's queue, and the queue is written as one ``write`` by whoever reads the next replies (the
worker has just become free for more) or by the sender once it holds ``_FLUSH_BYTES``. A burst of
submits thus reaches the worker as a few large writes, which it answers the same way. Only senders
ever block on the pipe (a large frame, a full pipe); readers write only what fits at once and never
wait for the write lock, so a reader cannot deadlock with a worker blocked on its reply pipe:

    sender:  lock → queue frame → (few unanswered | big frame | queue full) → write all → unlock
             → re-check: queue left and few unanswered → write it   (a reader may have skipped)
    reader:  deliver replies → queue non-empty and lock free → write what fits, never blocking
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import TYPE_CHECKING

from ._channel import Pending, Retired, wait_for_room
from ._errors import CallTimeoutError, WorkerCrashedError

if TYPE_CHECKING:
    from ._cancel import CancelBoard
    from ._channel import Sink
    from ._shm_channel import ChannelSegments

__all__ = ["CoalescingWriter"]

# Coalescing (see the module docstring). While fewer than _WINDOW written requests are unanswered,
# a request is written at once; with two, the worker always has the next one queued when it
# finishes the current one, so sequential callers on several threads never wait on the queue.
_WINDOW = 2
_FLUSH_BYTES = 1 << 15  # a sender writes the queue itself once it holds this much (half a pipe)
_ATOMIC = select.PIPE_BUF  # a pipe write up to this size is all-or-nothing: readers write in these


class _WriteTimeout(Exception):
    """Internal: a sender's deadline passed while the pipe was full; ``view`` is still unwritten."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self.view = view


class CoalescingWriter:
    """The write side of :class:`~poolbridge._pipes.ProcessChannel` (which sets this state up and
    reads the replies that drive the queue)."""

    slot: int
    pid: int
    pending: Pending
    dead: bool
    retiring: bool
    max_in_flight: int
    _write_fd: int
    _write_lock: threading.Lock
    _segments: ChannelSegments
    _board: CancelBoard | None
    _seq: int
    _queue: list[bytes]
    _queued_bytes: int
    _written: int
    _answered: int
    _cancelled: int
    _close_when_flushed: bool
    _broken: bool
    _space: threading.Condition
    _space_waiters: int

    def _wait_for_space(self, block: bool, deadline: float | None = None) -> None:
        wait_for_room(self, self._space, block, deadline)

    def _close_fd(self) -> None:
        raise NotImplementedError

    def send(self, req_id: int, data: bytes, sink: Sink, block: bool = True, deadline: float | None = None) -> None:
        """Send one request frame (written now, or queued behind unanswered ones; see the docstring).

        Raises :class:`Retired` when the frame did not reach this worker (it is recycling, dead, or
        the write hit a closed pipe): no worker saw the request, so the router sends it to the
        slot's next generation instead of failing it.
        """
        pending = self.pending
        if len(pending) >= self.max_in_flight:
            self._wait_for_space(block, deadline)
        pending[req_id] = sink
        lock: threading.Lock | None = self._write_lock
        assert lock is not None
        if deadline is None:
            lock.acquire()
        elif not lock.acquire(True, max(0.0, deadline - time.monotonic())):
            pending.pop(req_id, None)  # another sender's large write held the pipe past our timeout
            raise CallTimeoutError(f"slot {self.slot}: the request could not be written within the call's timeout")
        try:
            if self._open():
                self._seq += 1
                if sink.cancellable:
                    sink.seq = self._seq  # type: ignore[attr-defined]
                data = self._segments.queued(req_id, data)
                self._queue.append(data)
                self._queued_bytes += len(data)
                if (
                    self._unanswered() < _WINDOW
                    or self._queued_bytes >= _FLUSH_BYTES
                    or len(data) > _ATOMIC
                ):
                    gone = not self._flush(deadline)
                else:
                    gone = False
                if not gone:
                    queued = True
                elif self._queue and self._queue[-1] is data:
                    # The write found the worker gone before our frame went out: it reached no one.
                    self._queue.pop()
                    self._seq -= 1
                    self._segments.unqueued(req_id, data)
                    queued = False
                else:
                    return  # written (or queued behind frames) into the pipe of a dying worker
            else:
                queued = False
        except _WriteTimeout as stop:
            lock = self._write_timed_out(stop.view, data, req_id)
            raise CallTimeoutError(
                f"slot {self.slot}: writing the request ({len(data)} bytes) did not finish within the call's timeout"
            ) from None
        finally:
            if lock is not None:
                lock.release()
        if (self._queue and self._unanswered() < _WINDOW) or self._close_when_flushed:
            self._after_unlock()
        if queued:
            return
        if self.pending.pop(req_id, None) is None:
            # The monitor already failed this sink with the crash: it must not be sent again.
            raise WorkerCrashedError(f"worker slot {self.slot} (pid {self.pid}) is gone", slot=self.slot, pid=self.pid)
        raise Retired

    def send_many(self, items: list[tuple[int, bytes, Sink]]) -> int:
        """Queue several small frames (each at most ``PIPE_BUF`` bytes, no segments) in one go —
        the Port server's loop, once per read of its input — then write what the pipe takes now,
        never blocking (like a reader). Returns how many of ``items`` (from the first) were queued:
        0 when the channel cannot take them all now (busy, recycling, dead, the lock held), fewer
        when one would grow past ``PIPE_BUF`` with returned segment names; the caller sends the
        rest one by one (a sender writes any size).
        """
        pending = self.pending
        if len(pending) + len(items) > self.max_in_flight or not self._write_lock.acquire(False):
            return 0
        queued = 0
        try:
            if not self._open():
                return 0
            queue, segments = self._queue, self._segments
            for req_id, data, sink in items:
                framed = segments.queued(req_id, data)
                if len(framed) > _ATOMIC:  # it took returned names: a sender must write it
                    segments.unqueued(req_id, framed)  # (the names go with the next frame)
                    break
                pending[req_id] = sink  # under the write lock: a death (drain) comes after, and fails it
                self._seq += 1
                if sink.cancellable:
                    sink.seq = self._seq  # type: ignore[attr-defined]
                queue.append(framed)
                self._queued_bytes += len(framed)
                queued += 1
        finally:
            self._write_lock.release()
        if queued and self._unanswered() < _WINDOW:
            self._flush_some()  # the rest goes as replies come (the reader writes it) or now
        return queued

    def write_now(self, req_id: int, data: bytes, sink: Sink) -> bool:
        """The fast lane of a blocking call: write ``data`` (one whole frame) at once when nothing
        stands in its way — the write lock free, nothing queued, fewer than ``_WINDOW`` unanswered,
        room below the in-flight bound, a frame small enough for one all-or-nothing write. False:
        nothing was sent and nothing changed (``send`` then takes the general path, which also
        decides what a full pipe or a gone worker means)."""
        if (
            len(data) > _ATOMIC
            or self._queue
            or self._written - self._answered - self._cancelled >= _WINDOW  # (_unanswered(), inline)
            or len(self.pending) >= self.max_in_flight
        ):
            return False
        lock = self._write_lock
        if not lock.acquire(False):
            return False
        try:
            # (_open(), inline: a method call here costs the fast lane ~3% of a call's instructions)
            if self.retiring or self.dead or self._broken or self._write_fd < 0 or self._queue:
                return False
            pending = self.pending
            frame = self._segments.queued(req_id, data)
            if len(frame) > _ATOMIC:  # segments handed back with it made it too big for one write
                self._segments.unqueued(req_id, frame)
                return False
            if sink.cancellable:
                sink.seq = self._seq + 1  # type: ignore[attr-defined]
            pending[req_id] = sink
            try:
                os.write(self._write_fd, frame)  # all or nothing (at most PIPE_BUF bytes)
            except OSError:  # a full pipe, or the worker gone: the general path sorts it out
                self._segments.unqueued(req_id, frame)
                if pending.pop(req_id, None) is None:  # the monitor failed it with the crash already
                    raise WorkerCrashedError(
                        f"worker slot {self.slot} (pid {self.pid}) is gone", slot=self.slot, pid=self.pid
                    ) from None
                return False
            self._seq += 1
            self._written += 1
            return True
        finally:
            lock.release()

    def _open(self) -> bool:
        """Under the write lock: this channel takes new frames (not recycling, not dead, its pipe
        neither broken nor closed)."""
        return not self.retiring and not self.dead and not self._broken and self._write_fd >= 0

    def _unanswered(self) -> int:
        return self._written - self._answered - self._cancelled

    def flush(self) -> None:
        """Write every queued frame, waiting for the pipe if it is full (senders only)."""
        with self._write_lock:
            self._flush()
        self._after_unlock()

    def _after_unlock(self) -> None:
        """Called by every non-reader holder of the write lock once it has released it.

        A reader that found the lock busy left its work to the holder: writing the queue when the
        window has room again, or closing the pipe of a retired channel once its queue is out.
        """
        while not self._broken and (
            (self._queue and self._unanswered() < _WINDOW) or (self._close_when_flushed and self._write_fd >= 0)
        ):
            with self._write_lock:
                self._flush()

    def _flush(self, deadline: float | None = None) -> bool:
        """Under the write lock: write the whole queue; may block on a full pipe. False: the worker
        is gone (a write failed, now or before). ``deadline``: a sender's timeout, which ends the
        wait for the pipe with :class:`_WriteTimeout` (nothing accounted: see _write_timed_out)."""
        queue = self._queue
        if not queue or self._broken:
            if self._close_when_flushed:
                self._close_fd()  # all written, or nothing more can be
            return not self._broken
        data = queue[0] if len(queue) == 1 else b"".join(queue)
        return self._write_queue(memoryview(data), len(data), deadline)

    def _write_queue(self, view: memoryview, total: int, deadline: float | None = None) -> bool:
        """Under the write lock: write ``view`` (the joined queue, ``total`` bytes, or what is left
        of it), then account every queued frame as written."""
        queue = self._queue
        try:
            while view:
                try:
                    view = view[os.write(self._write_fd, view) :]
                except BlockingIOError:
                    wait = 1.0
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                        if wait <= 0:
                            raise _WriteTimeout(view) from None
                    select.select([], [self._write_fd], [], wait)
        except OSError:  # EPIPE/EBADF: the worker is gone; the monitor fails what it was sent
            self._broken = True
            if view.nbytes < total:  # frames went out: they fail with the worker
                self._written += len(queue)
                queue.clear()
                self._queued_bytes = 0
            return False
        self._written += len(queue)
        queue.clear()
        self._queued_bytes = 0
        if self._close_when_flushed:
            self._close_fd()
        return True

    def _write_timed_out(self, view: memoryview, data: bytes, req_id: int) -> threading.Lock | None:
        """A sender's timeout ran out while the pipe was full. If none of the queue went out, its
        own frame is taken back (the call never reaches the worker) and the write lock returned
        for release. Otherwise a frame is half in the pipe and must be finished — a torn frame
        would desynchronise the worker — so a writer thread finishes it, taking over the lock
        (None returned); the call then runs, like one that timed out later (its reply is dropped).
        """
        queue = self._queue
        if view.nbytes == sum(map(len, queue)) and queue and queue[-1] is data:
            queue.pop()
            self._queued_bytes -= len(data)
            self._seq -= 1
            self.pending.pop(req_id, None)
            return self._write_lock
        total = sum(map(len, queue))

        def finish() -> None:
            try:
                self._write_queue(view, total)
            finally:
                self._write_lock.release()
            self._after_unlock()

        threading.Thread(target=finish, name=f"poolbridge-writer-{self.slot}", daemon=True).start()
        return None

    def _flush_some(self) -> None:
        """Reader side: write queued frames in all-or-nothing pieces while the pipe takes them.

        Never blocks: not on the lock (its holder re-checks after releasing it), not on the pipe (a
        full pipe means the worker has requests to answer, and its replies bring us back here).
        """
        if not self._write_lock.acquire(False):
            return
        try:
            queue = self._queue
            while queue and not self._broken:
                n = size = 0
                for frame in queue:
                    if size + len(frame) > _ATOMIC:
                        break
                    size += len(frame)
                    n += 1
                if n == 0:
                    break  # only senders write large frames (they never leave one queued)
                try:
                    os.write(self._write_fd, queue[0] if n == 1 else b"".join(queue[:n]))
                except BlockingIOError:
                    break
                except OSError:
                    self._broken = True
                    break
                self._written += n
                self._queued_bytes -= size
                del queue[:n]
            if not queue and self._close_when_flushed:
                self._close_fd()
        finally:
            self._write_lock.release()

    def try_cancel(self, req_id: int, seq: int) -> bool:
        """Cancel a sent request the worker has not started. True: it will never run."""
        if self._board is None or self.dead or not self._board.cancel(seq):
            return False
        self._segments.cancelled(req_id)
        with self._write_lock:
            self._cancelled += 1  # no reply will come for it
            # Replies drive the queue, and this one will not come: a pipe full of cancelled frames
            # would leave the queue waiting for a reply that never arrives. Write it now.
            self._flush()
        self._after_unlock()
        return self.pending.pop(req_id, None) is not None
