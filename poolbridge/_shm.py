"""Big buffers out of band: POSIX shared-memory segments between a router and its workers.

A ``bytes``, ``bytearray``, ``memoryview`` or ``str`` of at least ``threshold`` bytes in a value,
and every pickle-protocol-5 buffer of that size (a numpy array's data), does not travel inside the
frame: the sender writes it into a new segment (one copy, by ``write`` into tmpfs) and the frame
carries ``EXT_SHM [name, size, kind]`` (or ``EXT_PICKLE5 [pickle, [refs]]``) in its place:

    kind      the receiver gets                       copies out
    bytes     bytes                                   one (``pread``; bytes own their memory)
    bytearray bytearray                               one
    str       str                                     one (decoded from a mapping)
    memoryview a read-only memoryview of a mapping    none
    buffer    a pickle buffer: a copy-on-write        none (numpy arrays are rebuilt over it and
              private mapping                          stay writable; writes stay private)

The sender never maps a segment and the receiver maps it only for the zero-copy kinds, so neither
side's memory holds the value twice.

Who owns a name (see also setup.cfg, next to install_requires):

* The **router** unlinks every name. Arguments: it creates the segment while encoding the request
  (the request frame lists its names), and unlinks them when the reply is read, when the request
  is cancelled before it ran, or when the worker is found dead. Results: the worker creates the
  segment and lists its names in the reply; the router's reader opens each one, unlinks the name at
  once and keeps only the descriptor, tied to the reply body (:class:`ShmBody`), so a reply that
  nobody decodes frees its memory with it. The worker only unlinks what it made for a reply it then
  could not send (an encoding that failed half-way, an error).
* A worker that dies leaves at most the names of its unsent results, all under its own prefix
  (``pb<router pid>_<pool>_w<slot>g<generation>_``): the router sweeps that prefix after it has
  drained the dead worker's replies, and unlinks the arguments it had sent it.
* A router that dies (even SIGKILL) cannot clean up, so every name is registered, before it is
  created, with the stdlib's ``multiprocessing.resource_tracker``: one tracker process, started by
  the router, whose pipe the workers inherit (``pass_fds``; the stdlib's own spawn passes it the
  same way). The workers die with the router (PDEATHSIG), the tracker's pipe then reaches EOF, and
  it unlinks whatever is still registered. Every unlink unregisters the name.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import pickle
import secrets
import sys
import threading
import weakref
from multiprocessing import resource_tracker
from typing import Any

import cloudpickle
import msgpack

from ._errors import ValueTooLargeError

try:
    import _posixshmem
except ImportError:  # pragma: no cover - no POSIX shared memory on this platform
    _posixshmem = None

log = logging.getLogger("poolbridge")

__all__ = ["EXT_PICKLE5", "EXT_SHM", "Lifter", "ShmBody", "adopt", "load", "load_pickle", "sweep", "unlink"]

EXT_SHM = 4  # [name, size, kind]: one buffer in a segment
EXT_PICKLE5 = 5  # [pickle bytes or [name, size, kind], [[name, size, kind], ...]]: out-of-band buffers

BYTES, BYTEARRAY, MEMORYVIEW, STR, BUFFER = range(5)
_KINDS: dict[type, int] = {bytes: BYTES, bytearray: BYTEARRAY, memoryview: MEMORYVIEW, str: STR}
_SCALARS = frozenset((int, float, bool, type(None)))

#: Values below this many bytes travel in the frame: a segment costs a few system calls and two
#: tracker messages each way, which a 64 KiB pipe write costs too; above it the pipe loses.
DEFAULT_THRESHOLD = 1 << 18
#: Container elements a value's scan looks at before giving up (a buffer deeper in a huge list
#: travels in the frame): bounds what a call of small values pays for the scan.
_SCAN_BUDGET = 1024
_DIR = "/dev/shm"
_RTYPE = "shared_memory"
_MAX_READ = 0x7FFFF000  # Linux moves at most this much in one read()


def available() -> bool:
    return _posixshmem is not None and sys.platform.startswith("linux") and os.path.isdir(_DIR)


def start_tracker() -> int:
    """Router: the resource tracker's pipe (the tracker is started if it is not running)."""
    resource_tracker.ensure_running()
    fd: int = resource_tracker._resource_tracker._fd  # type: ignore[attr-defined]
    return fd


def use_tracker(fd: int) -> None:
    """Worker: register names with the router's tracker (the fd inherited from it)."""
    resource_tracker._resource_tracker._fd = fd  # type: ignore[attr-defined]


def router_prefix() -> str:
    return f"/pb{os.getpid()}_{secrets.token_hex(3)}_"


def worker_prefix(prefix: str, slot: int, generation: int) -> str:
    return f"{prefix}w{slot}g{generation}_"


# -- segments --------------------------------------------------------------------------------


def _create(name: str, data: memoryview) -> None:
    # Registered before it exists: a crash in between leaves a registration without a file (the
    # tracker's cleanup then fails quietly), never a file nobody will remove.
    resource_tracker.register(name, _RTYPE)
    try:
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    except BaseException:
        resource_tracker.unregister(name, _RTYPE)
        raise
    try:
        # write(), not a mapping: one copy, no page faults, and a full /dev/shm is ENOSPC here
        # rather than SIGBUS on a mapped page later.
        view = data
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    """Remove a segment's name (its memory lives on in open descriptors and mappings)."""
    try:
        _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover
        log.warning("could not unlink shared memory %s: %s", name, exc)
        return
    resource_tracker.unregister(name, _RTYPE)


def sweep(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (a dead worker's); returns how many."""
    base = prefix.lstrip("/")
    try:
        entries = [e for e in os.listdir(_DIR) if e.startswith(base)]
    except OSError:
        return 0
    for entry in entries:
        unlink("/" + entry)
    return len(entries)


class _Segment:
    """An open segment whose name may already be gone: a descriptor, closed with the object."""

    __slots__ = ("__weakref__", "fd", "size")

    def __init__(self, name: str) -> None:
        self.fd = _posixshmem.shm_open(name, os.O_RDONLY, mode=0)
        self.size = os.fstat(self.fd).st_size

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass

    def read(self, kind: int) -> Any:
        size = self.size
        if kind == BYTES and size <= _MAX_READ:
            data = os.pread(self.fd, size, 0)
            if len(data) == size:
                return data
        if kind == BYTEARRAY:
            out = bytearray(size)
            view = memoryview(out)
            done = 0
            while done < size:
                n = os.preadv(self.fd, [view[done : done + _MAX_READ]], done)
                if not n:
                    raise EOFError(f"shared memory segment shorter than {size} bytes")
                done += n
            return out
        mapped = mmap.mmap(self.fd, size, access=mmap.ACCESS_COPY)
        if kind == BYTES:
            return mapped[:]
        if kind == STR:
            return str(mapped, "utf-8")
        view = memoryview(mapped)
        return view.toreadonly() if kind == MEMORYVIEW else view


#: Segments of replies adopted by this process's readers, by name, while their body is alive.
_adopted: weakref.WeakValueDictionary[str, _Segment] = weakref.WeakValueDictionary()


class ShmBody(bytes):
    """A reply body whose segments were opened (and their names unlinked) by the reader."""

    segments: list[_Segment]


def adopt(payload: Any) -> ShmBody:
    """Reader side of a reply that carries segments: ``[body, names]`` -> the body, holding them."""
    body, names = payload
    segments = []
    for name in names:
        try:
            segment = _Segment(name)
        except FileNotFoundError:
            continue  # decoding the value will say so
        unlink(name)
        _adopted[name] = segment
        segments.append(segment)
    out = ShmBody(body)
    out.segments = segments
    return out


def _ref_segment(name: str) -> _Segment:
    segment = _adopted.get(name)
    if segment is None:
        try:
            segment = _Segment(name)  # a worker reading an argument: the router still holds the name
        except FileNotFoundError:
            raise ValueError(f"shared memory segment {name} is gone (its call was given up)") from None
    return segment


def load(data: bytes) -> Any:
    """Decode ``EXT_SHM``."""
    name, _size, kind = msgpack.unpackb(data)
    return _ref_segment(name).read(kind)


def load_pickle(data: bytes) -> Any:
    """Decode ``EXT_PICKLE5``: a pickle whose big buffers are segments."""
    head, refs = msgpack.unpackb(data)
    if not isinstance(head, bytes):
        head = _ref_segment(head[0]).read(BUFFER)
    buffers = [_ref_segment(ref[0]).read(BUFFER) for ref in refs]
    return pickle.loads(head, buffers=buffers)


# -- the sender ------------------------------------------------------------------------------


class _Batch(threading.local):
    def __init__(self) -> None:
        self.names: list[str] = []
        self.size = 0


class Lifter:
    """Moves the big buffers of the values one side sends into segments.

    The router has one per pool (arguments), a worker one per process (results). Names made while
    encoding one message collect in a per-thread batch: :meth:`take` hands them to the message,
    :meth:`discard` unlinks them when the message is not sent. ``limit`` bounds the bytes of one
    message's segments (``Pool(max_value_bytes=...)``): past it, nothing more is written.
    """

    def __init__(self, prefix: str, threshold: int, limit: int | None = None) -> None:
        if threshold < 1:
            raise ValueError(f"shm_threshold must be at least 1 byte, got {threshold}")
        self.prefix = prefix
        self.threshold = threshold
        self.limit = limit
        self._ids = itertools.count()
        self._batch = _Batch()
        self._broken = False  # creating segments failed (no room, no /dev/shm): use the frame

    # -- the batch of the message being encoded on this thread --

    def mark(self) -> int:
        return len(self._batch.names)

    def take(self) -> tuple[list[str], int]:
        batch = self._batch
        names, size = batch.names, batch.size
        if names:
            batch.names = []
            batch.size = 0
        return names, size

    def discard(self, mark: int = 0) -> None:
        """Unlink the names made on this thread since ``mark`` (their message is not sent)."""
        batch = self._batch
        for name in batch.names[mark:]:
            unlink(name)
        del batch.names[mark:]
        if not batch.names:
            batch.size = 0

    # -- encoding --

    def lift(self, obj: Any) -> Any:
        """``obj`` with its big buffers replaced by segment references (``obj`` itself when none)."""
        return self._walk(obj, [_SCAN_BUDGET])

    def _walk(self, obj: Any, budget: list[int]) -> Any:
        t = type(obj)
        kind = _KINDS.get(t)
        if kind is not None:
            if (obj.nbytes if kind == MEMORYVIEW else len(obj)) < self.threshold:
                return obj
            return self._lift(obj, kind)
        if t is list or t is tuple:
            items = obj
        elif t is dict:
            items = obj.values()
        else:
            return obj
        new: dict[int, Any] | None = None
        for i, item in enumerate(items):
            if budget[0] <= 0:
                break
            budget[0] -= 1
            if type(item) in _SCALARS:
                continue
            lifted = self._walk(item, budget)
            if lifted is not item:
                if new is None:
                    new = {}
                new[i] = lifted
        if new is None:
            return obj
        if t is dict:
            keys = list(obj)
            out = dict(obj)
            for i, value in new.items():
                out[keys[i]] = value
            return out
        copy = list(obj)
        for i, value in new.items():
            copy[i] = value
        return copy if t is list else tuple(copy)

    def _lift(self, obj: Any, kind: int) -> Any:
        if kind == STR:
            try:
                view = memoryview(obj.encode("utf-8"))
            except UnicodeEncodeError:
                return obj  # lone surrogates: the frame's codec decides what to do with it
        else:
            view = memoryview(obj)
            if not view.c_contiguous:
                view = memoryview(view.tobytes())
            view = view.cast("B")
        ref = self.put(view, kind)
        return obj if ref is None else msgpack.ExtType(EXT_SHM, msgpack.packb(ref))

    def put(self, view: memoryview, kind: int) -> list[Any] | None:
        """Write one buffer into a new segment: its ``[name, size, kind]``, or None to send it in
        the frame (segments unavailable)."""
        if self._broken:
            return None
        batch = self._batch
        size = view.nbytes
        if self.limit is not None and batch.size + size > self.limit:
            raise ValueTooLargeError(
                f"the value holds more than {self.limit} bytes of buffers (max_value_bytes); "
                "raise Pool(max_value_bytes=...) to send it"
            )
        name = f"{self.prefix}{next(self._ids)}"
        try:
            _create(name, view)
        except OSError as exc:
            if not self._broken:
                log.warning("shared memory unavailable (%s); big values travel through the pipe", exc)
            self._broken = True
            return None
        batch.names.append(name)
        batch.size += size
        return [name, size, kind]

    def pickle_ext(self, obj: Any, in_band_code: int) -> msgpack.ExtType:
        """Pickle ``obj`` with its big buffers out of band (``in_band_code``: nothing went out)."""
        refs: list[list[Any]] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            try:
                raw = buffer.raw()
            except BufferError:  # not contiguous: in band
                return True
            if raw.nbytes < self.threshold:
                return True
            ref = self.put(raw, BUFFER)
            if ref is None:
                return True
            refs.append(ref)
            return False

        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
        head: Any = data
        if len(data) >= self.threshold:
            head = self.put(memoryview(data), BUFFER) or data
        if not refs and head is data:
            return msgpack.ExtType(in_band_code, data)
        return msgpack.ExtType(EXT_PICKLE5, msgpack.packb([head, refs]))


_swept = False


def sweep_stale() -> None:
    """Unlink segments of routers that no longer exist (once per process): a second line behind
    the resource tracker, for a router killed together with its tracker."""
    global _swept
    if _swept:
        return
    _swept = True
    try:
        entries = [e for e in os.listdir(_DIR) if e.startswith("pb") and "_" in e]
    except OSError:
        return
    for entry in entries:
        try:
            pid = int(entry[2 : entry.index("_")])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                _posixshmem.shm_unlink("/" + entry)
            except OSError:
                pass
        except PermissionError:  # alive, another user's
            continue
