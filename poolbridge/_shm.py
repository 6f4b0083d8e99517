"""Big buffers out of band: POSIX shared-memory segments between a router and its workers.

A ``bytes``, ``bytearray``, ``memoryview`` or ``str`` of at least ``threshold`` bytes in a value,
and every pickle-protocol-5 buffer of that size (a numpy array's data), does not travel inside the
frame: the sender writes it into a segment (one copy, by ``write`` into tmpfs: the sender never
maps it) and the frame carries ``EXT_SHM [name, size, kind]`` (or ``EXT_PICKLE5 [pickle, [refs]]``)
in its place. The receiver gets

    bytes, bytearray, memoryview -> bytes (one copy out, as msgpack carries them when small), or
                                    with ``options(zero_copy=True)`` a read-only memoryview of the
                                    segment (no copy)
    str                          -> str (decoded from a mapping)
    pickle-5 buffers (numpy)     -> rebuilt over a private copy-on-write mapping (no copy; the array
                                    stays writable and a write stays in the receiver)

Warm segments. Allocating tmpfs pages costs more than copying into them, so a segment whose
receiver is done with it is kept (up to ``CACHE_BYTES`` per process, least recently used out) and
written again for a later value of a size it fits. Arguments: the worker reports, with its reply,
the argument segments it still maps (``held``); the router reuses the others. Results: the router
hands a result segment back, on its next small request to that worker, once nothing in the router
reads it any more (its copy was made, or its view is gone).

Who owns a name (also stated in setup.cfg, next to install_requires):

* Arguments: the **router** creates the segment while encoding a request (the request frame lists
  the names) and, when the reply is read, the request was cancelled before it ran, or the worker
  is found dead, keeps it warm or unlinks it; a held one is unlinked (the worker's mapping lives on).
* Results: the **worker** creates the segment (its names start with its own prefix,
  ``pb<router pid>_<pool>_w<slot>g<generation>_``), keeps it warm when the router hands it back,
  and unlinks what it made for a reply it then could not send. When the worker exits, for any
  reason, the router unlinks everything under that prefix once it has read the worker's last
  replies (``sweep``); what the router still maps stays readable.
* A router that dies (even SIGKILL) cannot clean up, so every name is registered, before it is
  created, with the stdlib's ``multiprocessing.resource_tracker``: one tracker process, started by
  the router, whose pipe every worker inherits (``pass_fds``, or ``SCM_RIGHTS`` through the
  template that forks it — as the stdlib's own spawn passes that pipe to its children).
  The workers die with the router (PDEATHSIG), the tracker's pipe reaches EOF, and it unlinks
  whatever is still registered. Every unlink unregisters the name.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import sys
import threading
import weakref
from collections.abc import Callable
from multiprocessing import resource_tracker
from typing import Any

import msgpack

try:
    import _posixshmem
except ImportError:  # pragma: no cover - no POSIX shared memory on this platform
    _posixshmem = None

log = logging.getLogger("poolbridge")

__all__ = ["EXT_PICKLE5", "EXT_SHM", "ShmBody", "adopt", "load", "load_pickle", "sweep", "unlink"]

EXT_SHM = 4  # [name, size, kind]: one buffer in a segment
EXT_PICKLE5 = 5  # [pickle bytes or [name, size, kind], [[name, size, kind], ...]]: out-of-band buffers

BYTES, MEMORYVIEW, STR, BUFFER = range(4)

#: Values below this many bytes travel in the frame: a segment costs a few system calls and two
#: tracker messages each way, which a 64 KiB pipe write costs too; above it the pipe loses.
DEFAULT_THRESHOLD = 1 << 18
#: Idle warm segments a router (arguments) or a worker (results) keeps for its next big values:
#: bytes of tmpfs memory at most, least recently used first out.
CACHE_BYTES = 256 << 20
_DIR = "/dev/shm"
_RTYPE = "shared_memory"
_MAX_READ = 0x7FFFF000  # Linux moves at most this much in one read()


def available() -> bool:
    return _posixshmem is not None and sys.platform.startswith("linux") and os.path.isdir(_DIR)


def start_tracker() -> int:
    """Supervisor: the resource tracker's pipe (the tracker is started if it is not running)."""
    resource_tracker.ensure_running()
    fd: int = resource_tracker._resource_tracker._fd  # type: ignore[attr-defined]
    return fd


def use_tracker(fd: int) -> None:
    """Worker: register names with the router's tracker (the fd inherited from it)."""
    resource_tracker._resource_tracker._fd = fd  # type: ignore[attr-defined]


def router_prefix() -> str:
    return f"/pb{os.getpid()}_{os.urandom(3).hex()}_"  # as secrets.token_hex (whose hmac import the template would pay)


def worker_prefix(prefix: str, slot: int, generation: int) -> str:
    return f"{prefix}w{slot}g{generation}_"


# -- segments --------------------------------------------------------------------------------


def _tell_tracker(command: str, name: str) -> None:
    """``resource_tracker.register``/``unregister`` without the liveness probe each of them writes
    first (one pipe write instead of two); the stdlib call when the tracker's pipe is not open."""
    fd = resource_tracker._resource_tracker._fd  # type: ignore[attr-defined]
    if fd is not None:
        try:
            os.write(fd, f"{command}:{name}:{_RTYPE}\n".encode("ascii"))
            return
        except OSError:
            pass  # the tracker is gone: the stdlib call starts a new one
    if command == "REGISTER":
        resource_tracker.register(name, _RTYPE)
    else:
        resource_tracker.unregister(name, _RTYPE)


def _create(name: str, data: memoryview, keep_open: bool = False) -> int:
    """Make segment ``name`` holding ``data``; its descriptor when ``keep_open`` (else -1)."""
    # Registered before it exists: a crash in between leaves a registration without a file (the
    # tracker's cleanup then fails quietly), never a file nobody will remove.
    _tell_tracker("REGISTER", name)
    try:
        fd: int = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    except BaseException:
        _tell_tracker("UNREGISTER", name)
        raise
    try:
        # write(), not a mapping: one copy, no page faults, and a full /dev/shm is ENOSPC here
        # rather than SIGBUS on a mapped page later.
        view = data
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    if keep_open:
        return fd
    os.close(fd)
    return -1


def unlink(name: str) -> None:
    """Remove a segment's name (its memory lives on in open descriptors and mappings)."""
    try:
        _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover
        log.warning("could not unlink shared memory %s: %s", name, exc)
        return
    _tell_tracker("UNREGISTER", name)


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

    __slots__ = ("__weakref__", "done", "fd", "mapped", "name")

    def __init__(self, name: str, done: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.fd = _posixshmem.shm_open(name, os.O_RDONLY, mode=0)
        self.done = done  # told the name once nothing here reads the segment any more
        self.mapped = False

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        if self.done is not None and not self.mapped:
            self.done(self.name)

    def read(self, kind: int, size: int) -> Any:
        if _receiving.views and kind == BYTES:
            kind = MEMORYVIEW  # options(zero_copy=True): a view of the segment, no copy
        if kind == BYTES and size <= _MAX_READ:
            data = os.pread(self.fd, size, 0)
            if len(data) == size:
                return data
        mapped = mmap.mmap(self.fd, size, access=mmap.ACCESS_COPY)
        if self.done is not None:
            self.mapped = True
            weakref.finalize(mapped, self.done, self.name)
        if kind == BYTES:
            return mapped[:]
        if kind == STR:
            return str(mapped, "utf-8")
        if self.done is None:  # a worker mapping an argument: the router must know if it stays mapped
            _mapped_arguments.append((self.name, weakref.ref(mapped)))
        view = memoryview(mapped)
        return view.toreadonly() if kind == MEMORYVIEW else view


class _Receiving(threading.local):
    def __init__(self) -> None:
        self.views = False  # decode big bytes as read-only views (zero_copy)


_receiving = _Receiving()


class zero_copy_views:
    """``with zero_copy_views(): decode(...)``: big bytes come out as read-only memoryviews of
    their segments (``options(zero_copy=True)``)."""

    def __enter__(self) -> None:
        _receiving.views = True

    def __exit__(self, *exc: object) -> None:
        _receiving.views = False


#: Worker: argument segments mapped (not copied) since the last :func:`held` (one request).
_mapped_arguments: list[tuple[str, weakref.ref[mmap.mmap]]] = []
_NONE: list[str] = []


def held() -> list[str]:
    """Worker, after a request: names of its argument segments some object still maps. The
    router unlinks those; it may write the others again (a warm segment needs no new memory)."""
    if not _mapped_arguments:
        return _NONE
    names = [name for name, ref in _mapped_arguments if ref() is not None]
    _mapped_arguments.clear()
    return names


#: Segments of replies adopted by this process's readers, by name, while their body is alive.
_adopted: weakref.WeakValueDictionary[str, _Segment] = weakref.WeakValueDictionary()


class ShmBody(bytes):
    """A reply body whose segments were opened (and their names unlinked) by the reader."""

    segments: list[_Segment]


def adopt(body: bytes, names: list[str], done: Callable[[str], None]) -> ShmBody:
    """Reader side of a reply that carries result segments: open them and tie them to the body.
    ``done(name)`` is called once nothing here reads a segment any more (a body nobody decodes
    takes its segments along when it goes): the worker may then write it again."""
    segments = []
    for name in names:
        try:
            segment = _Segment(name, done)
        except FileNotFoundError:
            continue  # decoding the value will say so
        _adopted[name] = segment
        segments.append(segment)
    out = ShmBody(body)
    out.segments = segments
    return out


def _read(ref: list[Any]) -> Any:
    name, size, kind = ref
    segment = _adopted.get(name)
    if segment is None:
        try:
            segment = _Segment(name)  # a worker reading an argument: the router holds the name
        except FileNotFoundError:
            raise ValueError(f"shared memory segment {name} is gone (its call was given up)") from None
    return segment.read(kind, size)


def load(data: bytes) -> Any:
    """Decode ``EXT_SHM``."""
    return _read(msgpack.unpackb(data))


def load_pickle(data: bytes) -> Any:
    """Decode ``EXT_PICKLE5``: a pickle whose big buffers are segments."""
    head, refs = msgpack.unpackb(data)
    if not isinstance(head, bytes):
        head = _read(head)
    return pickle.loads(head, buffers=[_read(ref) for ref in refs])


def unlink_orphans(owner: Callable[[str], int | None], remove: Callable[[str], None]) -> None:
    """Remove the /dev/shm entries whose owner process is gone. ``owner(entry)``: the pid in its
    name (None: not one of ours); ``remove(entry)`` unlinks it."""
    try:
        entries = os.listdir(_DIR)
    except OSError:
        return
    for entry in entries:
        try:
            pid = owner(entry)
        except ValueError:
            continue
        if pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                remove(entry)
            except OSError:
                pass
        except PermissionError:  # alive, another user's
            continue


def _router_pid(entry: str) -> int | None:
    return int(entry[2 : entry.index("_")]) if entry.startswith("pb") and "_" in entry else None


_swept = False


def sweep_stale() -> None:
    """Unlink segments of routers that no longer exist (once per process): a second line behind
    the resource tracker, for a router killed together with its tracker."""
    global _swept
    if not _swept:
        _swept = True
        unlink_orphans(_router_pid, lambda entry: _posixshmem.shm_unlink("/" + entry))
