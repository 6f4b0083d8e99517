"""Parent side: worker slots, their restarts, and where replies go.

::

    caller thread                               worker[slot] process
    ─────────────                               ────────────────────
    resolve_session ─▶ slot_for ─▶ encode
      │ pending[id] = sink
      └─▶ channel.send ──────── request pipe ──▶ worker_main: read ▶ WorkerCore.handle
                                                                        │
    caller reads its own reply ◀── reply pipe ◀──── write replies ◀─────┘
      (leader/follower; futures are read by the channel's background reader)

    monitor thread ── pidfd readable ──▶ drain replies, fail the rest, restart the slot

*Caller threads* write their own request frames under the channel's write lock: there is no hand-off
thread on the send path. A caller that blocks for its reply reads the reply pipe itself when no one
else is (see _pipes.py), so a call costs one pipe write, the worker's work and one pipe read.

*A slot* has a number for life and a *channel* per generation: the process, its pipes, its pending
table. When the worker dies, the monitor drains what it wrote, fails every other pending request of
that channel with :class:`WorkerCrashedError` (exit code or signal attached), and starts generation
+ 1 in the same slot. Callers arriving meanwhile wait for it; refs of the old generation fail with
:class:`SessionLostError`; other slots never notice.

*Channels are pluggable*: ``channel_factory(router, slot, generation)`` builds one; the process
channel is the default, ``backends/ray.py`` provides an actor channel.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from threading import get_ident
from typing import Any

from ._channel import Retired, Sink
from ._errors import CallTimeoutError, PoolClosedError, WorkerCrashedError, value_too_large
from ._frames import HEADER
from ._hashing import slot_for
from ._monitor import Monitor
from ._pipes import ProcessChannel
from ._protocol import encode_frame
from ._resize import reroute
from ._shm_channel import release_unsent
from ._spawn import Spawner

log = logging.getLogger("poolbridge.router")

__all__ = ["Supervisor", "describe_pool"]

# A restart normally takes a few hundred milliseconds (a fresh interpreter); a caller waiting for
# its slot gives up after this long rather than hang on a slot that cannot come back.
RESTART_WAIT = 30.0
DEFAULT_MAX_IN_FLIGHT = 4096


class _Slot:
    __slots__ = ("channel", "cond", "index", "restarts")

    def __init__(self, index: int) -> None:
        self.index = index
        self.cond = threading.Condition()
        self.channel: Any = None
        self.restarts = 0


class Supervisor:
    """Owns the worker channels of one pool and moves frames to and from them."""

    def __init__(
        self,
        n_slots: int,
        *,
        worker_options: dict[str, Any],
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        channel_factory: Callable[[Supervisor, int, int], Any] = ProcessChannel,
        on_crash: Callable[[int, int, int | None], None] | None = None,
        max_frame: int | None = None,
    ) -> None:
        if n_slots < 1:
            raise ValueError(f"workers must be at least 1, got {n_slots}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.n_slots = n_slots
        self.worker_options = worker_options
        self.max_in_flight = max_in_flight
        #: The largest message either way (``Pool(max_value_bytes=...)``; None: no bound): checked
        #: before a request is written; the workers check their replies against the same bound.
        self.max_frame = max_frame
        #: A pool belongs to the process that made it (see _forked).
        self.owner_pid = os.getpid()
        self.closing = False
        self._closed = threading.Event()  # set by close(): interrupts restart back-off pauses
        self._factory = channel_factory
        self.lifter: Any = None  # the pool's _shm.Lifter: where segments of finished requests go
        self._on_crash = on_crash
        self._ids = itertools.count(1)
        self._slots = [_Slot(i) for i in range(n_slots)]  # past n_slots: slots a resize removed
        # Resize (_resize.py): the move in progress, how many resizes began, one at a time.
        self.mover: Any = None
        self.route_epoch = 0
        self.resize_lock = threading.Lock()
        self.retired_generations: dict[int, int] = {}
        self.senders: dict[int, int] = {}  # thread id -> route_epoch, while it sends
        # Process workers are forked by a template (_spawn.py): it starts booting now, while the
        # rest of the pool is set up.
        self.spawner = Spawner(start_template=channel_factory is ProcessChannel)
        self.monitor = Monitor(self._channel_exited)
        _routers.add(self)
        try:
            self._start_slots(channel_factory)
        except BaseException:
            self.close(cancel=True)
            raise

    def _start_slots(self, factory: Callable[[Supervisor, int, int], Any]) -> None:
        """Generation 0 of every slot. Process channels start together (slot 0 on this thread, the
        others on short-lived threads): their fork requests reach the template at once instead of
        each waiting for the worker before it."""
        slots = self._slots
        if factory is not ProcessChannel or len(slots) == 1:
            for slot in slots:
                slot.channel = factory(self, slot.index, 0)
            return
        failed: list[BaseException] = []

        def start(slot: _Slot) -> None:
            try:
                slot.channel = factory(self, slot.index, 0)
            except BaseException as exc:
                failed.append(exc)

        others = [threading.Thread(target=start, args=(s,), name=f"poolbridge-start-{s.index}") for s in slots[1:]]
        for thread in others:
            thread.start()
        start(slots[0])
        for thread in others:
            thread.join()  # bounded: a start is (a fork reply waits at most _spawn._FORK_WAIT)
        if failed:
            raise failed[0]

    # -- sending ---------------------------------------------------------------------------

    def next_id(self) -> int:
        return next(self._ids)

    def slot_for(self, session_id: str) -> int:
        return slot_for(session_id, self.n_slots)

    def channel(self, slot: int, deadline: float | None = None) -> Any:
        """The live channel of ``slot``, waiting (bounded) while it restarts.

        ``deadline`` (monotonic): the caller's own timeout, which ends the wait first if sooner.
        """
        s = self._slots[slot]
        ch = s.channel
        if _serving(ch):
            return ch
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            # Before taking s.cond: a restart holds it while it starts the new process.
            raise CallTimeoutError(f"worker slot {slot} was still restarting when the call's timeout ran out")
        give_up = now + RESTART_WAIT
        with s.cond:
            while True:
                if self.closing:
                    raise self.closed_error()
                ch = s.channel
                if _serving(ch):
                    return ch
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise CallTimeoutError(f"worker slot {slot} was still restarting when the call's timeout ran out")
                if now >= give_up:
                    raise WorkerCrashedError(f"worker slot {slot} did not come back", slot=slot)
                s.cond.wait(min(give_up, deadline if deadline is not None else give_up) - now)

    def ready(self, slot: int) -> bool:
        """Would a send to ``slot`` go through without waiting (live, not recycling, below the bound)?"""
        ch = self._slots[slot].channel
        return _serving(ch) and len(ch.pending) < ch.max_in_flight and not self.closing

    def generation(self, slot: int) -> int:
        ch = self._slots[slot].channel
        return ch.generation if ch is not None else -1

    def send(
        self,
        slot: int,
        req_id: int,
        body: bytes,
        sink: Sink,
        *,
        lead: bool = False,
        block: bool = True,
        deadline: float | None = None,
    ) -> Any:
        """Send one request. ``lead=True``: the caller will read its own reply (``await_reply``).
        ``deadline`` (monotonic) bounds any wait for the slot (restart, in-flight bound)."""
        # Which resize this send routes under, until its frame is queued: a resize lets every send
        # that began before it finish first (_resize.py, "Sends").
        tid = get_ident()
        self.senders[tid] = self.route_epoch
        try:
            return self._send(slot, req_id, body, sink, lead, block, deadline)
        finally:
            self.senders.pop(tid, None)

    def send_many(self, slot: int, items: list[tuple[int, bytes, Sink]]) -> tuple[Any, int]:
        """Queue several small request frames (framed, at most ``PIPE_BUF`` bytes each, no
        segments) for ``slot`` at once; their replies are read by the caller (``lead``). Returns
        the channel and how many (from the first) were queued — ``(None, 0)`` when anything is not
        plain (a resize has happened, a bound, the slot is not serving or cannot take them all
        now): the caller sends the rest one by one."""
        tid = get_ident()
        self.senders[tid] = self.route_epoch
        try:
            if self.closing or self.route_epoch or self.max_frame is not None:
                return None, 0
            ch = self._slots[slot].channel
            if not _serving(ch):
                return None, 0
            return ch, ch.send_many(items)
        finally:
            self.senders.pop(tid, None)

    def send_now(self, slot: int, req_id: int, body: bytes, sink: Sink) -> Any:
        """The fast lane of a blocking call without a timeout: the channel it was written to, or
        None when it could not be written at once (nothing sent: use :meth:`send`). Only the
        common case qualifies — a live, idle channel of a pool neither closing nor resized."""
        if self.closing or self.route_epoch or (self.max_frame is not None and len(body) > self.max_frame):
            return None
        ch = self._slots[slot].channel
        write_now = getattr(ch, "write_now", None)  # process channels (Ray's have no pipe to write)
        if write_now is None:
            return None
        data = HEADER.pack(len(body)) + body  # (a frame write_now takes is far below 4 GiB)
        tid = get_ident()
        self.senders[tid] = 0  # as in send(): a resize beginning now waits for this frame
        try:
            if self.route_epoch or not write_now(req_id, data, sink):
                return None
        except BaseException:
            release_unsent(data, self.lifter)  # the worker died first: nobody else frees its segments
            raise
        finally:
            self.senders.pop(tid, None)
        return ch

    def _send(
        self, slot: int, req_id: int, body: bytes, sink: Sink, lead: bool, block: bool, deadline: float | None
    ) -> Any:
        if self.closing:
            raise self.closed_error()
        if self.max_frame is not None and len(body) > self.max_frame:  # before writing (the worker would skip it)
            raise value_too_large("this request (its arguments)", len(body), self.max_frame)
        data = encode_frame(body)
        try:
            if self.route_epoch:  # resized: the session's slot by the current count, after its move
                slot = reroute(self, slot, body, deadline)
            while True:
                ch = self.channel(slot, deadline)
                try:
                    if deadline is None:
                        ch.send(req_id, data, sink, block)
                    else:
                        ch.send(req_id, data, sink, block, deadline)
                    break
                except Retired:
                    continue  # the slot is being recycled: channel() waits for its next generation
        except BaseException:
            # Never sent: nobody else will free its segments — unless the sink owns them (the Port
            # server's requests: one may be held and sent again with its frame, e.g. when the
            # slot was restarting or the monitor re-held it meanwhile; it frees them if answered).
            if not getattr(sink, "owns_segments", False):
                release_unsent(data, self.lifter)
            raise
        if not lead:
            ch.wake_reader()
        return ch

    # -- deaths and restarts ---------------------------------------------------------------

    def _channel_exited(self, ch: Any) -> None:
        ch.drain_and_close()
        if self.closing:
            exc: BaseException = PoolClosedError(
                f"the pool closed before worker slot {ch.slot} replied (pid {ch.pid}, {_describe(ch.exitcode)})"
            )
        else:
            exc = WorkerCrashedError(
                f"worker slot {ch.slot} (pid {ch.pid}, generation {ch.generation}) died: {_describe(ch.exitcode)}",
                slot=ch.slot,
                pid=ch.pid,
                exitcode=ch.exitcode,
            )
        failed = 0
        segments = getattr(ch, "segments", None)  # big values in flight (process channels, _shm.py)
        while ch.pending:
            try:
                req_id, sink = ch.pending.popitem()
            except KeyError:  # raced with a sender taking its own entry back
                break
            if getattr(sink, "channel", True) is None:
                sink.channel = ch  # a Port request whose send is still under way: it was this one's
            sink.fail(exc)
            if segments is not None and getattr(sink, "held", False):
                segments.kept(req_id)  # to be sent again: its segments go with it
            failed += 1
        if segments is not None:
            segments.worker_gone()
        ch.finished.set()
        if self.closing:
            return
        if getattr(ch, "retiring", False) and failed == 0 and ch.exitcode == 0:
            log.info("slot %d: recycled worker pid %d exited cleanly", ch.slot, ch.pid)
            self._restart(ch)
            return
        log.warning("%s; %d calls in flight failed; restarting the slot", exc, failed)
        if self._on_crash is not None:
            self._on_crash(ch.slot, ch.pid, ch.exitcode)
        self._restart(ch)

    def _restart(self, old: Any) -> None:
        """Start ``old``'s slot again as generation + 1; a start that fails is retried, with a
        growing pause (capped), until it works or the pool closes."""
        s = self._slots[old.slot]  # (never removed: a resize only empties a slot, see _resize.py)
        pause = 0.1
        while True:
            with s.cond:
                if self.closing or s.channel is not old:
                    return
                try:
                    new = self._factory(self, old.slot, old.generation + 1)
                except Exception:
                    log.exception("slot %d: restart failed; retrying in %.1fs", old.slot, pause)
                else:
                    s.channel = new
                    s.restarts += 1
                    s.cond.notify_all()
                    if self._closed.is_set():  # close() began while we spawned and may not see `new`
                        new.kill()
                        new.close_input()
                    return
            if self._closed.wait(pause):
                return
            pause = min(pause * 2, 5.0)

    # -- state -----------------------------------------------------------------------------

    def channels(self) -> list[Any]:
        return [s.channel for s in self._slots]

    def restarts(self, slot: int) -> int:
        return self._slots[slot].restarts

    def kill_slot(self, slot: int) -> None:
        """SIGKILL a slot's worker; the monitor restarts it (used by ``on_timeout='restart'``)."""
        ch = self._slots[slot].channel
        if ch is not None and not ch.dead:
            # Mark it leaving first: a call made after this must wait for generation + 1, not be
            # written into the process being killed before the monitor has seen it die.
            ch.retiring = True
            ch.kill()

    def closed_error(self) -> PoolClosedError:
        """Why this router takes no more work: closed, or inherited by a forked child."""
        if os.getpid() != self.owner_pid:
            return PoolClosedError(
                f"this pool belongs to process {self.owner_pid}, not to this forked child "
                f"(pid {os.getpid()}); make a new Pool in the child"
            )
        return PoolClosedError("the pool is closed")

    def _forked(self) -> None:
        """In a forked child, right after ``fork()``: the workers and pipes are the parent's.

        The child must never write a request into them, read a reply meant for the parent, or
        stop the parent's workers (close, atexit, finalizers): the router is marked closing, which
        every path checks, and the child's copies of the pipe ends are closed — a child that lives
        on must not hold a worker's request pipe open, or the parent's ``close()`` would wait for
        an EOF that never comes. Only the forking thread exists here and any lock may have been
        held by a thread that does not: nothing below takes a lock.
        """
        self.closing = True
        exc = self.closed_error()
        for ch in self.channels():
            forget = getattr(ch, "forget_after_fork", None)
            if forget is not None:
                forget(exc)
        self.monitor.forget_after_fork()
        self.spawner.forget_after_fork()

    def close(self, cancel: bool = False, timeout: float = 10.0) -> None:
        """Stop every worker. ``cancel=False`` lets each finish the requests it already has.

        Returns once the workers have exited and the router's threads and pipes are gone.
        """
        if os.getpid() != self.owner_pid:
            return  # a forked child's copy: the workers are the parent's (see _forked)
        self.closing = True
        self._closed.set()
        channels = [ch for ch in self.channels() if ch is not None]
        for ch in channels:
            if cancel:
                ch.kill()
            ch.close_input()
            if ch.pending:
                ch.wake_reader()  # replies to futures still have to be read
        deadline = time.monotonic() + timeout
        for ch in channels:
            if ch.wait_exit(max(0.0, deadline - time.monotonic())) is None:
                log.warning("slot %d: worker pid %d did not exit in time; killing it", ch.slot, ch.pid)
                ch.kill()
                ch.wait_exit(1.0)
        # The monitor drains and fails leftovers on its reaper threads; wait for that to finish.
        for ch in channels:
            if not ch.finished.wait(5.0):
                log.warning("slot %d: replies were not drained in time", ch.slot)
        for s in self._slots:
            with s.cond:
                s.cond.notify_all()
        self.monitor.stop()  # joins its reapers: a restart racing close() has installed its channel
        for ch in self.channels():
            if ch is not None and ch not in channels and not ch.finished.is_set():
                # Started by a restart that raced close() (which killed it already): the monitor
                # is gone, so do a reaper's work here — or its reader thread and pipes would stay.
                ch.kill()
                ch.wait_exit(5.0)
                ch.drain_and_close()
                ch.finished.set()
                channels.append(ch)
        self.spawner.stop()
        for ch in channels:
            join = getattr(ch, "join", None)
            if join is not None:
                join(1.0)


_routers: weakref.WeakSet[Supervisor] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for router in list(_routers):
        router._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _serving(ch: Any) -> bool:
    """A channel that takes new requests: there, not dead, not being recycled."""
    return ch is not None and not ch.dead and not getattr(ch, "retiring", False)


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


def describe_pool(pool: Any) -> str:
    """What ``repr`` shows of a pool: slots, their pids and generations, state, calls in flight."""
    channels = pool._supervisor.channels()[: pool.workers]
    pids = [ch.pid if ch is not None else -1 for ch in channels]
    generations = [ch.generation if ch is not None else -1 for ch in channels]
    in_flight = sum(len(ch.pending) for ch in channels if ch is not None)
    state = "closed" if pool.closed else "running"
    backend = "" if pool.backend == "process" else f" backend={pool.backend}"
    return f"workers={pool.workers} pids={pids} generations={generations}{backend} {state} in_flight={in_flight}"
