"""Parent side, one worker process: its pipes, who reads them, and how its death is noticed.

Writing the request pipe — coalescing: see _coalesce.py (the write half of the channel).

Reading the reply pipe — leader/follower. A caller blocked in ``pool.call`` does not wait for
another thread to read its reply and wake it (two thread wake-ups, tens of microseconds on a busy
machine); it takes the channel's ``read_lock`` and reads the pipe itself, delivering any other
replies it meets on the way. Only when nobody synchronous is waiting (futures from ``submit``, the
Port server) does the channel's background reader thread take the lock. Whoever releases the lock
with replies still pending wakes the background reader, so no reply is left unread:

    leader:  acquire(read_lock) → read/deliver until own reply → release → pending? → wake bg
    others:  read_lock busy → wait on own waiter (the holder delivers it, or the bg reader will)

Death. A worker's exit is seen by the router's :class:`~poolbridge._monitor.Monitor` through a pidfd (the kernel says
the process is gone; no timeout involved). The channel then drains replies the worker wrote before
it died, fails every other pending request with :class:`WorkerCrashedError`, and the router
restarts the slot. A reader that meets EOF kills the process, so the monitor sees it at once.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._cancel import CancelBoard
from ._channel import Pending
from ._coalesce import CoalescingWriter
from ._errors import WorkerCrashedError
from ._protocol import OK_SHM, RETIRING, FrameReader, OversizedFrame
from ._shm_channel import ChannelSegments
from ._spawn import ForkedProcess, forget_process, spawn_worker
from ._wire import decode_reply

if TYPE_CHECKING:
    from ._channel import Channel
    from ._supervisor import Supervisor

log = logging.getLogger("poolbridge.router")

__all__ = ["ProcessChannel"]

# A caller whose reply was lost with a dead worker is failed by the monitor within milliseconds;
# this only bounds the wait if the monitor itself were broken.
_ORPHAN_WAIT = 10.0


def _replied(waiter: Any) -> bool:
    return waiter.status is not None


class ProcessChannel(CoalescingWriter):
    """One generation of one slot, backed by a worker subprocess and two pipes."""

    def __init__(self, router: Supervisor, slot: int, generation: int) -> None:
        self.slot = slot
        self.generation = generation
        self.pending: Pending = Pending()
        self.dead = False
        self.retiring = False  # asked to be recycled: no new requests; finishing what it has
        self.eof = False
        self.exitcode: int | None = None
        #: Set once the router has drained this channel and failed what was left.
        self.finished = threading.Event()
        self.max_in_flight = router.max_in_flight
        self._supervisor = router
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._frames = FrameReader(router.max_frame, extended=True)
        self._segments = ChannelSegments(router, slot, generation)  # big values in flight (_shm.py)
        self._need_reader = threading.Event()
        self._probe: Any = None  # a poll object of the reply pipe alone (try_read)
        self._closers: list[Callable[[ProcessChannel], None]] | None = []  # None once the pipe is closed
        self._closers_lock = threading.Lock()
        self._bg_active = False
        self._space = threading.Condition()
        self._space_waiters = 0
        self._seq = 0  # request frames sent, numbered as the worker numbers them
        # Coalescing state, guarded by _write_lock (the counters are read without it).
        self._queue: list[bytes] = []  # whole frames not yet written, in order
        self._queued_bytes = 0
        # Unanswered frames = written - answered - cancelled; each counter has one writer at a time
        # (_written, _cancelled: under _write_lock; _answered: under _read_lock).
        self._written = 0
        self._answered = 0
        self._cancelled = 0  # cancelled before the worker started them: no reply will come
        self._close_when_flushed = False
        self._broken = False  # a write failed: the worker is gone
        self._board = CancelBoard.create()
        self._started_at_exit: int | None = None  # the board's last claimed frame, read at death
        options = dict(router.worker_options, n_slots=router.n_slots)
        self.process: subprocess.Popen[bytes] | ForkedProcess
        self._write_fd: int
        self._read_fd: int
        try:
            self.process, self._write_fd, self._read_fd = router.spawner.run(
                lambda: spawn_worker(router.spawner, slot, generation, options, self._board)
            )
        except BaseException:
            if self._board is not None:
                self._board.unlink()
                self._board.close()
            raise
        self.pid: int = self.process.pid
        os.set_blocking(self._write_fd, False)  # readers must never block on it; senders wait in _write
        self._bg = threading.Thread(
            target=self._background_reader, name=f"poolbridge-reader-{slot}.{generation}", daemon=True
        )
        self._bg.start()
        router.monitor.watch(self)

    # -- sending ---------------------------------------------------------------------------

    def wake_reader(self) -> None:
        """Someone must read replies that no blocked caller is going to read."""
        if not self._bg_active:
            self._need_reader.set()

    # -- reading ---------------------------------------------------------------------------

    def _deliver(self, frames: list[Any]) -> None:
        """Hand each reply frame to its sink. Never raises for one reply: a reader must not die of
        a bad frame, so whatever cannot be delivered fails its one request."""
        pending = self.pending
        self._answered += len(frames)
        segments = self._segments
        for frame in frames:
            try:
                req_id, status, body = decode_reply(frame)
                if segments.outbound or status == OK_SHM:
                    status, body = segments.reply(req_id, status, body)
            except Exception:
                self._undeliverable(frame)
                continue
            sink = pending.pop(req_id, None)
            if sink is None:
                if status == RETIRING:
                    self._answered -= 1  # a notice, not a reply
                    self.retire()
                    continue
                sink = pending.unmatched(req_id)  # given up meanwhile (a Late sink), or unknown
                if sink is None:
                    continue
            try:
                sink.deliver(status, body)
            except Exception as exc:  # a sink's own failure is its request's, not the reader's
                log.exception("slot %d: delivering the reply to request %s failed", self.slot, req_id)
                sink.fail(exc)
        if self._space_waiters:
            with self._space:
                self._space.notify_all()

    def _undeliverable(self, frame: bytes | OversizedFrame) -> None:
        """A reply that could not be read: fail its request if its id can be read, else the worker
        (a frame that is not a reply means its pipe carries something else: a crash, not a hang)."""
        if isinstance(frame, OversizedFrame):
            req_id = frame.leading_id()
            exc: Exception = frame.error(self._frames.max_frame or 0)
        else:
            req_id, exc = None, ValueError(f"undecodable reply frame of {len(frame)} bytes")
        sink = self.pending.pop(req_id, None) if req_id is not None else None
        if sink is None and req_id is not None:
            sink = self.pending.unmatched(req_id)
        if sink is not None:
            sink.fail(exc)
            return
        log.error("slot %d: %s from worker pid %d; killing it", self.slot, exc, self.pid)
        self.kill()

    def _read_once(self, deadline: float | None) -> bool:
        """Read and deliver one chunk. False on EOF or when ``deadline`` passes first."""
        fd = self._read_fd
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return False
        frames = self._frames.read_from(fd)
        if frames is None:
            self.eof = True
            self.kill()  # EOF with the process still running (it closed its pipe): make it final
            return False
        if frames:
            self._deliver(frames)
        if self._queue:
            self._flush_some()  # the worker is answering: give it what has queued meanwhile
        return True

    @property
    def read_fd(self) -> int:
        """The reply pipe, for an owner that polls it and calls :meth:`try_read` (the Port server)."""
        return self._read_fd

    def on_close(self, callback: Callable[[ProcessChannel], None]) -> None:
        """Call ``callback(self)`` once the reply pipe is closed (at once if it already is): an
        event loop watching :attr:`read_fd` through a ``dup`` stops watching then."""
        with self._closers_lock:
            if self._closers is not None:
                self._closers.append(callback)
                return
        callback(self)

    def try_read(self) -> bool:
        """Read and deliver what the reply pipe holds now, never blocking (for a poll loop).

        False: stop polling this channel — another reader holds the pipe (the background reader,
        or the monitor draining a dead worker: it reads everything pending), or the channel is
        finished (dead, EOF). An unexpected read error kills the worker: a crash, never a hang.
        """
        if not self._read_lock.acquire(False):
            return False
        try:
            if self.dead or self.eof:
                return False  # drain_and_close may have closed the fd already: do not touch it
            if self._probe is None:
                self._probe = select.poll()
                self._probe.register(self._read_fd, select.POLLIN)
            # The poll loop saw the pipe readable before we held the lock; another reader may
            # have emptied it since, and a read would then block.
            if not self._probe.poll(0):
                return True
            return self._read_once(None)
        except OSError as exc:
            log.warning("slot %d: reading replies failed (%s); killing its worker", self.slot, exc)
            self.kill()
            return False
        finally:
            self._read_lock.release()

    def _stop_leading(self) -> None:
        """A caller stops reading the pipe: it hands the read lock back, and wakes the background
        reader if replies are still owed (no reply is left unread)."""
        self._read_lock.release()
        if self.pending or self._segments.outbound:
            self._need_reader.set()

    def read_own_reply(self, waiter: Any) -> bool:
        """The fast lane's read (after ``write_now``): when nobody else reads this pipe, read and
        deliver until ``waiter`` has its reply. False: another reader holds the pipe, or the worker
        is gone — :meth:`await_reply` then waits as usual."""
        if not self._read_lock.acquire(False):
            return False
        try:
            while waiter.status is None and not self.dead and self._read_once(None):
                pass
        finally:
            self._stop_leading()
        return waiter.status is not None

    def await_reply(self, req_id: int, waiter: Any, timeout: float | None) -> bool:
        """Block until ``waiter`` has its reply; lead the reading when nobody else is. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not _replied(waiter):
            if self._read_lock.acquire(False):
                try:
                    while not _replied(waiter) and not self.dead and self._read_once(deadline):
                        pass
                finally:
                    self._stop_leading()
                if _replied(waiter):
                    break
                if self.dead or self.eof or deadline is None:
                    # EOF: the monitor is about to fail this request (or deliver a drained reply).
                    if not waiter.wait(_ORPHAN_WAIT):
                        raise WorkerCrashedError(f"worker slot {self.slot} went silent", slot=self.slot, pid=self.pid)
                    break
                if time.monotonic() >= deadline:
                    return False
            else:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                # Wake up now and then: the holder may leave before our reply arrives.
                if waiter.wait(0.05 if remaining is None else min(remaining, 0.05)):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    return _replied(waiter)
        return True

    def _background_reader(self) -> None:
        try:
            self._read_replies()
        except Exception:  # never silently: a dead reader would leave every later future hanging
            log.exception("slot %d: the reply reader failed; killing worker pid %d", self.slot, self.pid)
            self.kill()

    def _read_replies(self) -> None:
        while True:
            self._need_reader.wait()
            self._need_reader.clear()
            while not self.dead:
                # While active, senders skip waking us (an Event.set per submit is a Condition
                # round trip). The flag is cleared *before* pending is re-checked, so a request
                # added meanwhile is either seen here or wakes us.
                self._bg_active = True
                # Replies owed to requests given up (timed out) are read too: their segments go then.
                with self._read_lock:
                    try:
                        while (self.pending or self._segments.outbound) and not self.dead and self._read_once(None):
                            pass
                    except OSError:
                        return
                self._bg_active = False
                if not self.pending and not self._segments.outbound:
                    break
            if self.dead:
                return

    # -- death -----------------------------------------------------------------------------

    def drain_and_close(self) -> None:
        """After the process exited: deliver replies it wrote before dying, then close the pipes."""
        with self._write_lock:
            self.dead = True
            self._queue.clear()  # their sinks are pending: the router fails them with the crash
            self._queued_bytes = 0
            self._close_fd()
        self._need_reader.set()
        if self._read_lock.acquire(timeout=_ORPHAN_WAIT):
            try:
                if self._read_fd < 0:
                    return  # drained already
                os.set_blocking(self._read_fd, False)
                while True:
                    try:
                        frames = self._frames.read_from(self._read_fd)
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                            log.debug("slot %d: draining failed: %s", self.slot, exc)
                        break  # EAGAIN: a grandchild holds the write end; nothing more will come
                    if frames is None:
                        break
                    if frames:
                        self._deliver(frames)
                fd, self._read_fd = self._read_fd, -1  # forgotten first (see Monitor.stop)
                os.close(fd)
            finally:
                self._read_lock.release()
            with self._closers_lock:
                closers, self._closers = self._closers, None
            for callback in closers or ():
                callback(self)
        else:  # pragma: no cover - a reader stuck on a pipe some grandchild keeps open
            log.warning("slot %d: could not take the read lock to drain; leaving the pipe", self.slot)
        self.exitcode = self.process.wait()
        if self._board is not None:
            self._started_at_exit = self._board.started()
            self._board.unlink()  # normally already done by the worker; a no-op then
            self._board.close()
        with self._space:
            self._space.notify_all()

    @property
    def segments(self) -> ChannelSegments:
        """The shared-memory segments of this channel's requests and replies (see _shm.py)."""
        return self._segments

    def reached(self, seq: int) -> bool:
        """After the worker died: may it have started frame ``seq``? False means it surely did not
        (the cancel board's last claimed frame, else the frames written), so it is safe to re-send."""
        started = self._started_at_exit
        return seq <= (started if started is not None else self._written)

    def retire(self) -> None:
        """Stop sending here; the worker answers what it has, sees EOF and exits; the slot restarts."""
        log.info("slot %d: worker pid %d reached its recycling limits; replacing it", self.slot, self.pid)
        self.retiring = True
        # Called by a reader, which must not block: queued frames are written by later reads.
        self._close_when_flushed = True
        self._flush_some()

    def close_input(self) -> None:
        """Close the request pipe once the queue is written: the worker answers all it was sent,
        and exits on EOF."""
        with self._write_lock:
            self._close_when_flushed = True
            self._flush()
            self._close_fd()

    def _close_fd(self) -> None:
        if self._write_fd >= 0:
            fd, self._write_fd = self._write_fd, -1  # forgotten first (see Monitor.stop)
            os.close(fd)

    def join(self, timeout: float) -> None:
        """After :meth:`drain_and_close`: wait (bounded) for the background reader to end."""
        if self._bg is not threading.current_thread():
            self._bg.join(timeout)

    def forget_after_fork(self, exc: BaseException) -> None:
        """In a forked child (see ``Supervisor._forked``): drop the parent's worker without touching it.

        Closes the child's copies of the pipe ends (never reads or writes them), fails what a
        child could wait on, and stops the child from ever signalling or reaping the process.
        """
        self.dead = True
        self._broken = True
        for fd in (self._write_fd, self._read_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._write_fd = self._read_fd = -1
        forget_process(self.process)
        for sink in list(self.pending.values()):
            sink.orphaned(exc)

    def kill(self) -> None:
        if self.process.returncode is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


if TYPE_CHECKING:

    def _is_a_channel(ch: ProcessChannel) -> Channel:  # mypy: ProcessChannel implements the channel contract
        return ch
