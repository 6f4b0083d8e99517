"""Parent side, one worker process: its pipes, who reads them, and how its death is noticed.

Reading the reply pipe — leader/follower. A caller blocked in ``pool.call`` does not wait for
another thread to read its reply and wake it (two thread wake-ups, tens of microseconds on a busy
machine); it takes the channel's ``read_lock`` and reads the pipe itself, delivering any other
replies it meets on the way. Only when nobody synchronous is waiting (futures from ``submit``, the
Port server) does the channel's background reader thread take the lock. Whoever releases the lock
with replies still pending wakes the background reader, so no reply is left unread:

    leader:  acquire(read_lock) → read/deliver until own reply → release → pending? → wake bg
    others:  read_lock busy → wait on own waiter (the holder delivers it, or the bg reader will)

Death. A worker's exit is seen by the router's :class:`_Monitor` through a pidfd (the kernel says
the process is gone; no timeout involved). The channel then drains replies the worker wrote before
it died, fails every other pending request with :class:`WorkerCrashedError`, and the router
restarts the slot. A reader that meets EOF kills the process, so the monitor sees it at once.
"""

from __future__ import annotations

import base64
import concurrent.futures
import errno
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._cancel import CancelBoard
from ._errors import CallTimeoutError, PoolBusyError, WorkerCrashedError
from ._protocol import RETIRING, FrameReader, pack_plain, unpack_plain, write_all

if TYPE_CHECKING:
    from ._router import Router, Sink

log = logging.getLogger("poolbridge.router")

__all__ = ["ProcessChannel"]

_BOOTSTRAP = "from poolbridge._worker_main import main; main()"
_READ_SIZE = 1 << 16
# A caller whose reply was lost with a dead worker is failed by the monitor within milliseconds;
# this only bounds the wait if the monitor itself were broken.
_ORPHAN_WAIT = 10.0


class Retired(Exception):
    """Internal: the channel is being recycled; send to the slot's next channel instead."""


class Spawner:
    """Starts worker processes, always from this one long-lived thread.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the process; if
    a restart were forked from a short-lived thread, the restarted worker would be SIGKILLed as
    soon as that thread ended. So every fork happens here.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="poolbridge-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def run(self, fn: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future.result()

    def stop(self) -> None:
        self._jobs.put(None)


class _Monitor:
    """One thread per router that learns of worker exits from pidfds (polling where unavailable)."""

    def __init__(self, on_exit: Callable[[ProcessChannel], None]) -> None:
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._watched: dict[int, ProcessChannel] = {}  # pidfd (or pid) -> channel
        self._wake_r, self._wake_w = os.pipe()
        self._stopped = False
        self._pidfd = hasattr(os, "pidfd_open")
        self._thread = threading.Thread(target=self._run, name="poolbridge-monitor", daemon=True)
        self._thread.start()

    def watch(self, ch: ProcessChannel) -> None:
        key = ch.pid
        if self._pidfd:
            try:
                key = os.pidfd_open(ch.pid)
            except OSError:  # already reaped or unsupported kernel: fall back to polling
                self._pidfd = False
        with self._lock:
            self._watched[key] = ch
        os.write(self._wake_w, b"w")

    def _run(self) -> None:
        while not self._stopped:
            with self._lock:
                keys = list(self._watched)
            if self._pidfd:
                ready, _, _ = select.select([self._wake_r, *keys], [], [])
            else:
                ready, _, _ = select.select([self._wake_r], [], [], 0.05)
                ready = ready + [k for k in keys if self._watched[k].process.poll() is not None]
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for key in ready:
                if key == self._wake_r:
                    continue
                with self._lock:
                    ch = self._watched.pop(key, None)
                if self._pidfd:
                    os.close(key)
                if ch is not None:
                    # Handled on its own thread: draining and restarting must not delay noticing
                    # another worker's death.
                    threading.Thread(target=self._on_exit, args=(ch,), name="poolbridge-reaper", daemon=True).start()

    def stop(self) -> None:
        self._stopped = True
        os.write(self._wake_w, b"s")


def _spawn(
    slot: int, generation: int, options: dict[str, Any], board: CancelBoard | None
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start one worker: a fresh interpreter that inherits exactly its pipe ends and cancel board."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    opts = dict(options, slot=slot, generation=generation, parent_pid=os.getpid(), fds=[req_r, rep_w])
    keep: tuple[int, ...] = (req_r, rep_w)
    if board is not None:
        opts["cancel_board"] = [board.fd, board.name]
        keep = (*keep, board.fd)
    env = dict(os.environ)
    # The worker imports what the parent can import (poolbridge, helper modules, dotted paths),
    # whatever the parent's working directory or sys.path edits.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, base64.b64encode(pack_plain(opts)).decode()],
            pass_fds=keep,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        os.close(req_w)
        os.close(rep_r)
        raise
    finally:
        os.close(req_r)
        os.close(rep_w)
    return process, req_w, rep_r


def _replied(waiter: Any) -> bool:
    return waiter.status is not None


class ProcessChannel:
    """One generation of one slot, backed by a worker subprocess and two pipes."""

    def __init__(self, router: Router, slot: int, generation: int) -> None:
        self.slot = slot
        self.generation = generation
        self.pending: dict[int, Sink] = {}
        self.dead = False
        self.retiring = False  # asked to be recycled: no new requests; finishing what it has
        self.eof = False
        self.exitcode: int | None = None
        #: Set once the router has drained this channel and failed what was left.
        self.finished = threading.Event()
        self.max_in_flight = router.max_in_flight
        self._router = router
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._frames = FrameReader()
        self._need_reader = threading.Event()
        self._bg_active = False
        self._space = threading.Condition()
        self._space_waiters = 0
        self._seq = 0  # request frames written, numbered as the worker numbers them
        self._board = CancelBoard.create()
        options = dict(router.worker_options, n_slots=router.n_slots)
        self.process: subprocess.Popen[bytes]
        try:
            self.process, self._write_fd, self._read_fd = router.spawner.run(
                lambda: _spawn(slot, generation, options, self._board)
            )
        except BaseException:
            if self._board is not None:
                self._board.unlink()
                self._board.close()
            raise
        self.pid: int = self.process.pid
        self._bg = threading.Thread(
            target=self._background_reader, name=f"poolbridge-reader-{slot}.{generation}", daemon=True
        )
        self._bg.start()
        router.monitor.watch(self)

    # -- sending ---------------------------------------------------------------------------

    def send(self, req_id: int, data: bytes, sink: Sink, block: bool = True, deadline: float | None = None) -> None:
        """Write one request frame.

        Raises :class:`Retired` when the frame did not reach this worker (it is recycling, dead, or
        the write hit a closed pipe): no worker saw the request, so the router sends it to the
        slot's next generation instead of failing it.
        """
        if len(self.pending) >= self.max_in_flight:
            self._wait_for_space(block, deadline)
        self.pending[req_id] = sink
        with self._write_lock:
            if not self.retiring and not self.dead:
                try:
                    self._seq += 1
                    if sink.cancellable:
                        sink.seq = self._seq  # type: ignore[attr-defined]
                    write_all(self._write_fd, data)
                    return
                except OSError:  # EPIPE/EBADF: the worker is gone; the monitor restarts it
                    # A pipe write that fails has written nothing; an earlier partial write left an
                    # incomplete frame the dead worker never ran. Either way: not delivered.
                    pass
        if self.pending.pop(req_id, None) is None:
            # The monitor already failed this sink with the crash: it must not be sent again.
            raise WorkerCrashedError(f"worker slot {self.slot} (pid {self.pid}) is gone", slot=self.slot, pid=self.pid)
        raise Retired

    def _wait_for_space(self, block: bool, deadline: float | None = None) -> None:
        # Approximate by design: several threads may pass the check at once, so the bound can be
        # exceeded by the number of concurrently sending threads, never by more.
        if not block:
            raise PoolBusyError(f"slot {self.slot} has {len(self.pending)} calls in flight (max {self.max_in_flight})")
        with self._space:
            self._space_waiters += 1
            try:
                while len(self.pending) >= self.max_in_flight and not self.dead:
                    wait = 1.0
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                        if wait <= 0:
                            raise CallTimeoutError(
                                f"slot {self.slot} stayed at its in-flight bound until the call's timeout ran out"
                            )
                    self._space.wait(wait)
            finally:
                self._space_waiters -= 1

    def try_cancel(self, req_id: int, seq: int) -> bool:
        """Cancel a sent request the worker has not started. True: it will never run."""
        if self._board is None or self.dead or not self._board.cancel(seq):
            return False
        return self.pending.pop(req_id, None) is not None

    def wake_reader(self) -> None:
        """Someone must read replies that no blocked caller is going to read."""
        if not self._bg_active:
            self._need_reader.set()

    # -- reading ---------------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        pending = self.pending
        for frame in self._frames.feed(data):
            req_id, status, body = unpack_plain(frame)  # type: ignore[arg-type]
            sink = pending.pop(req_id, None)
            if sink is not None:
                sink.deliver(status, body)
            elif status == RETIRING:
                self.retire()
        if self._space_waiters:
            with self._space:
                self._space.notify_all()

    def _read_once(self, deadline: float | None) -> bool:
        """Read and deliver one chunk. False on EOF or when ``deadline`` passes first."""
        fd = self._read_fd
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return False
        data = os.read(fd, _READ_SIZE)
        if not data:
            self.eof = True
            self.kill()  # EOF with the process still running (it closed its pipe): make it final
            return False
        self._deliver(data)
        return True

    def await_reply(self, req_id: int, waiter: Any, timeout: float | None) -> bool:
        """Block until ``waiter`` has its reply; lead the reading when nobody else is. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not _replied(waiter):
            if self._read_lock.acquire(False):
                try:
                    while not _replied(waiter) and not self.dead and self._read_once(deadline):
                        pass
                finally:
                    self._read_lock.release()
                    if self.pending:
                        self._need_reader.set()
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
        while True:
            self._need_reader.wait()
            self._need_reader.clear()
            while not self.dead:
                # While active, senders skip waking us (an Event.set per submit is a Condition
                # round trip). The flag is cleared *before* pending is re-checked, so a request
                # added meanwhile is either seen here or wakes us.
                self._bg_active = True
                with self._read_lock:
                    try:
                        while self.pending and not self.dead and self._read_once(None):
                            pass
                    except OSError:
                        return
                self._bg_active = False
                if not self.pending:
                    break
            if self.dead:
                return

    # -- death -----------------------------------------------------------------------------

    def drain_and_close(self) -> None:
        """After the process exited: deliver replies it wrote before dying, then close the pipes."""
        with self._write_lock:
            self.dead = True
            if self._write_fd >= 0:
                os.close(self._write_fd)
                self._write_fd = -1
        self._need_reader.set()
        if self._read_lock.acquire(timeout=_ORPHAN_WAIT):
            try:
                os.set_blocking(self._read_fd, False)
                while True:
                    try:
                        data = os.read(self._read_fd, _READ_SIZE)
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                            log.debug("slot %d: draining failed: %s", self.slot, exc)
                        break  # EAGAIN: a grandchild holds the write end; nothing more will come
                    if not data:
                        break
                    self._deliver(data)
                os.close(self._read_fd)
            finally:
                self._read_lock.release()
        else:  # pragma: no cover - a reader stuck on a pipe some grandchild keeps open
            log.warning("slot %d: could not take the read lock to drain; leaving the pipe", self.slot)
        self.exitcode = self.process.wait()
        if self._board is not None:
            self._board.unlink()  # normally already done by the worker; a no-op then
            self._board.close()
        with self._space:
            self._space.notify_all()

    def retire(self) -> None:
        """Stop sending here; the worker answers what it has, sees EOF and exits; the slot restarts."""
        log.info("slot %d: worker pid %d reached its recycling limits; replacing it", self.slot, self.pid)
        self.retiring = True
        self.close_input()

    def close_input(self) -> None:
        """Close the request pipe: the worker finishes what it has read, replies, and exits."""
        with self._write_lock:
            if self._write_fd >= 0:
                os.close(self._write_fd)
                self._write_fd = -1

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
