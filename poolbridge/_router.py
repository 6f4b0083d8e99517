"""Parent side: worker slots, the pipes to them, and the replies coming back.

::

    caller thread                            worker[slot] process
    ─────────────                            ────────────────────
    resolve_session ─▶ slot_for ─▶ encode
      │ pending[id] = sink
      └─▶ _Channel.send ──── request pipe ───▶ worker_main: read ▶ WorkerCore.handle
                                                                     │
    sink.deliver ◀── reader thread ◀── reply pipe ◀── write replies ◀┘
      │  (one per channel: parses frames, pops pending[id])
      ▼
    caller wakes (call) / Future resolves (submit)

*Caller threads* write their own request frames under the channel's write lock: there is no hand-off
thread on the send path, so a call costs one pipe write, the worker's work, one pipe read.

*A channel* is one generation of one slot: a process, its two pipes, its pending table and its reader
thread. When the worker dies the reader sees EOF on the reply pipe — immediately, from the kernel,
not from a timeout — fails every pending call of that channel with :class:`WorkerCrashedError`, and
restarts the slot as a new channel with ``generation + 1``. Callers arriving meanwhile wait for the
new channel; other slots never notice.

*Lock order*: ``_Slot.cond`` then ``_Channel.write_lock``; the reader never holds a write lock while
delivering, so a caller blocked writing into a full pipe cannot deadlock with the reader draining
replies.
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ._errors import PoolClosedError, WorkerCrashedError
from ._hashing import slot_for
from ._protocol import FrameReader, encode_frame, pack_plain, unpack_plain
from ._worker import _write_all

log = logging.getLogger("poolbridge.router")

__all__ = ["Router", "Sink"]

# A restart normally takes milliseconds (forkserver) to a few hundred (spawn); a caller waiting
# for its slot gives up after this long rather than hang on a slot that cannot come back.
RESTART_WAIT = 30.0
# How long a dying worker may take to exit on its own (it has already closed its reply pipe)
# before it is SIGKILLed, and how long close() waits for a clean exit.
EXIT_GRACE = 1.0


class Sink:
    """Where one request's reply goes. Called from a reader thread, or on crash/close."""

    __slots__ = ()

    def deliver(self, status: int, body: Any) -> None:
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        raise NotImplementedError


_BOOTSTRAP = "from poolbridge._worker import main; main()"


class _Spawner:
    """Starts worker processes, always from this one long-lived thread.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the process; if
    restarts were forked from the reader thread of the dead channel (which then ends), every
    restarted worker would be SIGKILLed at once. So every fork happens here.
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
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def run(self, fn: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future.result()

    def stop(self) -> None:
        self._jobs.put(None)


def _spawn_worker(router: Router, slot: int, generation: int) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start one worker: a fresh interpreter that inherits exactly its two pipe ends."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    options = dict(router.worker_options, slot=slot, n_slots=router.n_slots, generation=generation,
                   parent_pid=os.getpid(), fds=[req_r, rep_w])
    env = dict(os.environ)
    # The worker imports what the parent can import (poolbridge itself, helper modules, the
    # modules of dotted paths), whatever the parent's working directory or sys.path edits.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, base64.b64encode(pack_plain(options)).decode()],
            pass_fds=(req_r, rep_w),
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        for fd in (req_w, rep_r):
            os.close(fd)
        raise
    finally:
        os.close(req_r)
        os.close(rep_w)
    return process, req_w, rep_r


class _Channel:
    """One generation of one slot: process, pipes, pending table, reader thread."""

    def __init__(self, router: Router, slot: int, generation: int) -> None:
        self.slot = slot
        self.generation = generation
        self.pending: dict[int, Sink] = {}
        self.write_lock = threading.Lock()
        self.dead = False
        self.exitcode: int | None = None
        self.process, self._write_fd, self._read_fd = router.spawner.run(
            lambda: _spawn_worker(router, slot, generation)
        )
        self.pid: int = self.process.pid
        self.reader = threading.Thread(
            target=router._read_loop, args=(self,), name=f"poolbridge-reader-{slot}.{generation}", daemon=True
        )
        self.reader.start()

    def send(self, req_id: int, data: bytes, sink: Sink) -> None:
        """Write one request frame. Raises :class:`WorkerCrashedError` if the worker is gone."""
        self.pending[req_id] = sink
        with self.write_lock:
            if not self.dead:
                try:
                    _write_all(self._write_fd, data)
                    return
                except OSError as exc:  # EPIPE/EBADF: the worker is gone; the reader will restart it
                    cause: BaseException | None = exc
            else:
                cause = None
        if self.pending.pop(req_id, None) is not None:
            raise WorkerCrashedError(
                f"worker slot {self.slot} (pid {self.pid}) is gone", slot=self.slot, pid=self.pid
            ) from cause
        # The reader already failed this sink; nothing more to do here.

    def close_input(self) -> None:
        """Close the request pipe: the worker finishes what it has read, replies, and exits."""
        with self.write_lock:
            if self._write_fd >= 0:
                os.close(self._write_fd)
                self._write_fd = -1

    def read_fd(self) -> int:
        return self._read_fd

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.process.returncode is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass


class _Slot:
    __slots__ = ("channel", "cond", "index", "restarts")

    def __init__(self, index: int) -> None:
        self.index = index
        self.cond = threading.Condition()
        self.channel: _Channel | None = None
        self.restarts = 0


class Router:
    """Owns the worker processes of one pool and moves frames to and from them."""

    def __init__(
        self,
        n_slots: int,
        *,
        worker_options: dict[str, Any],
        on_crash: Callable[[int, int, int | None], None] | None = None,
    ) -> None:
        if n_slots < 1:
            raise ValueError(f"workers must be at least 1, got {n_slots}")
        self.n_slots = n_slots
        self.worker_options = worker_options
        self.spawner = _Spawner()
        self.closing = False
        self._on_crash = on_crash
        self._ids = itertools.count(1)
        self._slots = [_Slot(i) for i in range(n_slots)]
        try:
            for slot in self._slots:
                slot.channel = _Channel(self, slot.index, 0)
        except BaseException:
            self.close(cancel=True)
            raise

    # -- sending ---------------------------------------------------------------------------

    def next_id(self) -> int:
        return next(self._ids)

    def slot_for(self, session_id: str) -> int:
        return slot_for(session_id, self.n_slots)

    def channel(self, slot: int) -> _Channel:
        """The live channel of ``slot``, waiting (bounded) while it restarts."""
        s = self._slots[slot]
        ch = s.channel
        if ch is not None and not ch.dead:
            return ch
        deadline = time.monotonic() + RESTART_WAIT
        with s.cond:
            while True:
                if self.closing:
                    raise PoolClosedError("the pool is closed")
                ch = s.channel
                if ch is not None and not ch.dead:
                    return ch
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerCrashedError(f"worker slot {slot} did not come back", slot=slot)
                s.cond.wait(remaining)

    def generation(self, slot: int) -> int:
        ch = self._slots[slot].channel
        return ch.generation if ch is not None else -1

    def send(self, slot: int, req_id: int, body: bytes, sink: Sink) -> _Channel:
        if self.closing:
            raise PoolClosedError("the pool is closed")
        ch = self.channel(slot)
        ch.send(req_id, encode_frame(body), sink)
        return ch

    # -- receiving -------------------------------------------------------------------------

    def _read_loop(self, ch: _Channel) -> None:
        reader = FrameReader()
        pending = ch.pending
        fd = ch.read_fd()
        try:
            while True:
                data = os.read(fd, 1 << 16)
                if not data:
                    break
                for frame in reader.feed(data):
                    assert isinstance(frame, bytes)
                    req_id, status, body = unpack_plain(frame)
                    sink = pending.pop(req_id, None)
                    if sink is not None:
                        sink.deliver(status, body)
        except Exception:
            log.exception("slot %d: reader failed; treating the worker as dead", ch.slot)
        finally:
            os.close(fd)
            self._channel_died(ch)

    def _channel_died(self, ch: _Channel) -> None:
        with ch.write_lock:
            ch.dead = True
        ch.close_input()
        ch.exitcode = ch.wait_exit(EXIT_GRACE)
        if ch.exitcode is None:
            ch.kill()
            ch.exitcode = ch.wait_exit(EXIT_GRACE)
        if self.closing:
            exc: BaseException = PoolClosedError(
                f"the pool closed before worker slot {ch.slot} replied (pid {ch.pid}, exit {ch.exitcode})"
            )
        else:
            exc = WorkerCrashedError(
                f"worker slot {ch.slot} (pid {ch.pid}, generation {ch.generation}) died: {_describe(ch.exitcode)}",
                slot=ch.slot,
                pid=ch.pid,
                exitcode=ch.exitcode,
            )
            log.warning("%s; %d calls in flight failed; restarting the slot", exc, len(ch.pending))
        while ch.pending:
            try:
                _, sink = ch.pending.popitem()
            except KeyError:  # raced with a sender removing its own entry
                break
            sink.fail(exc)
        if self.closing:
            return
        if self._on_crash is not None:
            self._on_crash(ch.slot, ch.pid, ch.exitcode)
        self._restart(ch)

    def _restart(self, old: _Channel) -> None:
        s = self._slots[old.slot]
        with s.cond:
            if self.closing or s.channel is not old:
                return
            try:
                s.channel = _Channel(self, old.slot, old.generation + 1)
                s.restarts += 1
            except Exception:
                log.exception("slot %d: restart failed", old.slot)
            s.cond.notify_all()

    # -- state -----------------------------------------------------------------------------

    def channels(self) -> list[_Channel | None]:
        return [s.channel for s in self._slots]

    def restarts(self, slot: int) -> int:
        return self._slots[slot].restarts

    def kill_slot(self, slot: int) -> None:
        """SIGKILL a slot's worker (used for timeouts with ``on_timeout='restart'``)."""
        ch = self._slots[slot].channel
        if ch is not None and not ch.dead:
            ch.kill()

    def close(self, cancel: bool = False, timeout: float = 10.0) -> None:
        """Stop every worker. ``cancel=False`` lets each finish the requests it already has."""
        self.closing = True
        channels = [ch for ch in self.channels() if ch is not None]
        for ch in channels:
            if cancel:
                ch.kill()
            ch.close_input()
        deadline = time.monotonic() + timeout
        for ch in channels:
            if ch.reader is not threading.current_thread():
                ch.reader.join(max(0.0, deadline - time.monotonic()))
        for ch in channels:
            if ch.wait_exit(0) is None:
                ch.kill()
            ch.wait_exit(EXIT_GRACE)
        for s in self._slots:
            with s.cond:
                s.cond.notify_all()
        self.spawner.stop()


def _describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"
