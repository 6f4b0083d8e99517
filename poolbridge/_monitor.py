"""Parent side: how a worker's death is noticed — one monitor thread per router.

The kernel says when a process is gone: the monitor waits on a pidfd per worker (the one the
template sent for a forked worker, else ``os.pidfd_open``; a 50 ms poll of ``Popen.poll()`` where
the kernel has none) and hands each exit to a reaper thread of its own, which drains the channel,
fails what it left and restarts the slot (``Supervisor._channel_exited``). No heartbeat, no timeout.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._spawn import ForkedProcess

if TYPE_CHECKING:
    from ._pipes import ProcessChannel

log = logging.getLogger("poolbridge.router")

__all__ = ["Monitor"]


class _PidExit:
    """A process watched for a callback (``Monitor.watch_pid``), not for a channel."""

    __slots__ = ("on_exit",)

    def __init__(self, on_exit: Callable[[], None]) -> None:
        self.on_exit = on_exit


def _polled_exit(watched: ProcessChannel | _PidExit | None) -> bool:
    # Polling (no pidfds) only ever watches channels: watch_pid needs pidfds.
    return watched is not None and not isinstance(watched, _PidExit) and watched.process.poll() is not None


class Monitor:
    """One thread per router that learns of worker exits from pidfds (polling where unavailable)."""

    def __init__(self, on_exit: Callable[[ProcessChannel], None]) -> None:
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._watched: dict[int, ProcessChannel | _PidExit] = {}  # pidfd (or pid) -> channel
        self._reapers: list[threading.Thread] = []
        self._wake_r, self._wake_w = os.pipe()
        self._stopped = False
        self._pidfd = hasattr(os, "pidfd_open")
        self._thread = threading.Thread(target=self._run, name="poolbridge-monitor", daemon=True)
        self._thread.start()

    def watch(self, ch: ProcessChannel) -> None:
        key = ch.pid
        if isinstance(ch.process, ForkedProcess):
            # Forked by the template, which reaps it: only the pidfd it sent names it for sure.
            pidfd = ch.process.dup_pidfd() if self._pidfd else ch.pid
            if pidfd is None:  # it has already exited
                self._exited(ch)
                return
            key = pidfd
        elif self._pidfd:
            try:
                key = os.pidfd_open(ch.pid)
            except OSError:  # already reaped or unsupported kernel: fall back to polling
                self._pidfd = False
        with self._lock:
            self._watched[key] = ch
        os.write(self._wake_w, b"w")

    def watch_pid(self, pid: int, on_exit: Callable[[], None]) -> bool:
        """Call ``on_exit()`` (on a reaper thread) once process ``pid`` exits: a process that is no
        channel's worker (a local Ray actor). False, and nothing watched, without pidfds."""
        if not self._pidfd:
            return False
        try:
            key = os.pidfd_open(pid)
        except OSError:  # already gone (or no such process here)
            self._exited(_PidExit(on_exit))
            return True
        with self._lock:
            if self._stopped:  # closed meanwhile (a Ray actor's first ping settles late)
                os.close(key)
                return False
            self._watched[key] = _PidExit(on_exit)
            os.write(self._wake_w, b"w")
        return True

    def _run(self) -> None:
        while not self._stopped:
            with self._lock:
                keys = list(self._watched)
            if self._pidfd:
                ready, _, _ = select.select([self._wake_r, *keys], [], [])
            else:
                ready, _, _ = select.select([self._wake_r], [], [], 0.05)
                ready = ready + [k for k in keys if _polled_exit(self._watched.get(k))]
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
                    self._exited(ch)

    def _exited(self, ch: ProcessChannel | _PidExit) -> None:
        # Handled on its own thread: draining and restarting must not delay noticing another
        # worker's death.
        if isinstance(ch, _PidExit):
            reaper = threading.Thread(target=ch.on_exit, name="poolbridge-reaper", daemon=True)
        else:
            reaper = threading.Thread(target=self._on_exit, args=(ch,), name="poolbridge-reaper", daemon=True)
        with self._lock:
            self._reapers = [t for t in self._reapers if t.is_alive()]
            self._reapers.append(reaper)
        reaper.start()

    def stop(self) -> None:
        """Stop watching; returns once the monitor and its reapers are gone and its fds closed."""
        self._stopped = True
        os.write(self._wake_w, b"s")
        me = threading.current_thread()
        if self._thread is not me:
            self._thread.join(5.0)
        with self._lock:
            reapers = list(self._reapers)
        for reaper in reapers:
            if reaper is not me:
                reaper.join(5.0)
        if self._thread.is_alive():  # pragma: no cover - it only ever waits in select
            log.warning("the exit monitor did not stop; leaving its pipe open")
            return
        with self._lock:
            leftover = list(self._watched) if self._pidfd else []
            self._watched.clear()
        # Each number is forgotten before it is closed: a fork in between leaves the child a copy
        # it never closes, rather than a number the child might later close under someone else.
        wake, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in (*wake, *leftover):
            os.close(fd)

    def forget_after_fork(self) -> None:
        """In a forked child (see ``Supervisor._forked``): close the child's copies of our fds."""
        self._stopped = True
        watched, self._watched = self._watched, {}
        fds = (self._wake_r, self._wake_w, *(watched if self._pidfd else ()))
        self._wake_r = self._wake_w = -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
