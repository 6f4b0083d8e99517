"""The cancel board: how ``Future.cancel()`` can promise that a call already sent never runs.

A request is written to the worker's pipe as soon as it is submitted, so "not yet running" is
something only the worker knows. Supervisor and worker share, per channel, a small memory page and a
process-shared semaphore:

    [ started: int64 ][ cancelled[0] ... cancelled[SIZE-1]: int64 ]

Both sides number the request frames of a channel 1, 2, 3, ... in pipe order (the router under
its write lock, the worker as it reads). Before running frame ``n`` the worker, holding the
semaphore, records ``started = n`` (the last frame it reached) and skips the frame without
replying if ``cancelled[n % SIZE] == n``. ``cancel(n)`` in the router, holding the same semaphore,
succeeds only if ``started < n`` — so a successful cancel means the call never runs, and a call
that has started is never reported cancelled. An uncontended acquire/release pair is a futex in
user space (~0.4 µs), paid once per request by the worker.

A cancel slot still holding an unconsumed cancel (two cancels ``SIZE`` frames apart in flight at
once) refuses the second cancel rather than overwrite the first.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from typing import Any

from ._shm import unlink_orphans

log = logging.getLogger("poolbridge.router")

__all__ = ["CancelBoard"]

SIZE = 512
_I64 = struct.Struct("<q")
_BYTES = 8 * (SIZE + 1)

try:  # CPython's own primitive behind multiprocessing.Lock; absent on some platforms
    import _multiprocessing

    _SemLock: Any = _multiprocessing.SemLock
    _sem_unlink: Any = _multiprocessing.sem_unlink
except (ImportError, AttributeError):  # pragma: no cover
    _SemLock = None
    _sem_unlink = None

_SEMAPHORE = 1  # multiprocessing.synchronize.SEMAPHORE


_swept = False


def _sweep_stale_names() -> None:
    """Unlink semaphore names left by routers that no longer exist (once per process).

    A name normally lives only until its worker has opened it (the worker unlinks it then), but a
    router killed while its workers were still starting leaves names behind. The router's pid is
    part of the name, so a name whose router is gone can be recognised and removed.
    """
    global _swept
    if not _swept:
        _swept = True
        unlink_orphans(_board_router_pid, lambda entry: _sem_unlink("/" + entry[len("sem.") :]))


def _board_router_pid(entry: str) -> int | None:
    return int(entry.split("-")[1]) if entry.startswith("sem.poolbridge-") else None


class CancelBoard:
    __slots__ = ("_mem", "_sem", "fd", "name")

    def __init__(self, fd: int, name: str, sem: Any) -> None:
        self.fd = fd
        self.name = name
        self._sem = sem
        self._mem = mmap.mmap(fd, _BYTES)

    @classmethod
    def create(cls) -> CancelBoard | None:
        """Supervisor side: a new board, or None where the platform has no shared semaphores."""
        if _SemLock is None or not hasattr(os, "memfd_create"):
            return None
        _sweep_stale_names()
        try:
            fd = os.memfd_create("poolbridge-cancel", 0)
            os.ftruncate(fd, _BYTES)
            name = f"/poolbridge-{os.getpid()}-{os.urandom(6).hex()}"
            sem = _SemLock(_SEMAPHORE, 1, 1, name, False)
        except OSError as exc:  # e.g. no /dev/shm in a container
            log.info("cancellation of sent calls unavailable: %s", exc)
            return None
        return cls(fd, name, sem)

    @classmethod
    def attach(cls, fd: int, name: str) -> CancelBoard:
        """Worker side: open the router's board, then unlink its name (nothing left behind)."""
        sem = _SemLock._rebuild(0, _SEMAPHORE, 1, name)
        try:
            _sem_unlink(name)
        except OSError:
            pass
        return cls(fd, name, sem)

    def claim(self, seq: int) -> bool:
        """Worker: may frame ``seq`` run? Records it as started unless it was cancelled."""
        sem = self._sem
        mem = self._mem
        sem.acquire()
        try:
            # Reached, whether it runs or is skipped: a later cancel of it must fail, and its
            # cancel slot is free again for frame seq + SIZE.
            _I64.pack_into(mem, 0, seq)
            cancelled: bool = _I64.unpack_from(mem, 8 + 8 * (seq % SIZE))[0] == seq
            return not cancelled
        finally:
            sem.release()

    def started(self) -> int:
        """The last frame the worker reached (claimed), whether it ran or was skipped."""
        return int(_I64.unpack_from(self._mem, 0)[0])

    def cancel(self, seq: int) -> bool:
        """Supervisor: cancel frame ``seq`` if the worker has not started it. True means it never runs."""
        sem = self._sem
        mem = self._mem
        if not sem.acquire(True, 1.0):  # held only for microseconds by a live worker
            return False
        try:
            started = _I64.unpack_from(mem, 0)[0]
            if seq <= started:
                return False
            offset = 8 + 8 * (seq % SIZE)
            if _I64.unpack_from(mem, offset)[0] > started:
                return False  # that slot still holds a cancel the worker has not reached
            _I64.pack_into(mem, offset, seq)
            return True
        finally:
            sem.release()

    def close(self) -> None:
        self._mem.close()
        try:
            os.close(self.fd)
        except OSError:
            pass

    def unlink(self) -> None:
        """Supervisor: remove the semaphore's name if the worker never got to (it failed to start)."""
        try:
            _sem_unlink(self.name)
        except OSError:
            pass
