"""The sending side of shared memory: :class:`Lifter` moves a value's big buffers into segments
(the router's for arguments, a worker's for results) and keeps warm segments for reuse. The
segments, their owners and the receiving side are described in _shm.py."""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import threading
from typing import Any

import msgpack

from ._errors import value_too_large
from ._shm import (
    BUFFER,
    BYTES,
    EXT_PICKLE5,
    EXT_SHM,
    MEMORYVIEW,
    STR,
    _create,
    unlink,
)

log = logging.getLogger("poolbridge")

__all__ = ["Lifter"]

# bytearray and memoryview arrive as bytes, as msgpack carries them below the threshold: a value's
# type never depends on its size. ``zero_copy`` makes all three read-only views instead.
_KINDS: dict[type, int] = {bytes: BYTES, bytearray: BYTES, memoryview: BYTES, str: STR}
_SCALARS = frozenset((int, float, bool, type(None)))
#: Container elements a value's scan looks at before giving up (a buffer deeper in a huge list
#: travels in the frame): bounds what a call of small values pays for the scan.
_SCAN_BUDGET = 1024


class _Batch(threading.local):
    def __init__(self) -> None:
        self.names: list[str] = []
        self.size = 0
        self.views = False  # this message's big bytes-likes arrive as views (zero_copy)


class Lifter:
    """Moves the big buffers of the values one side sends into segments.

    The router has one per pool (arguments), a worker one per process (results). Names made while
    encoding one message collect in a per-thread batch: :meth:`take` hands them to the message,
    :meth:`discard` unlinks them when the message is not sent. ``limit`` bounds the bytes of one
    message's segments (``Pool(max_value_bytes=...)``): past it, nothing more is written.
    """

    def __init__(self, prefix: str, threshold: int, limit: int | None = None, cache: int = 0) -> None:
        if threshold < 1:
            raise ValueError(f"shm_threshold must be at least 1 byte, got {threshold}")
        self.prefix = prefix
        self.threshold = threshold
        self.limit = limit
        self._ids = itertools.count()
        self._batch = _Batch()
        self._broken = False  # creating segments failed (no room, no /dev/shm): use the frame
        # Warm segments (router only): a segment whose receiver is done with it is written again
        # instead of a new one, so its memory is not allocated (and faulted in) anew each time.
        self.cache = cache  # bytes of idle segments kept at most
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}  # capacity of each segment this lifter may reuse
        self._fds: dict[str, int] = {}  # ... and its descriptor, kept open (no open() per reuse)
        self._idle: dict[str, int] = {}  # name -> capacity, least recently used first
        self._idle_bytes = 0

    # -- the batch of the message being encoded on this thread --

    def mark(self) -> int:
        return len(self._batch.names)

    def take(self) -> tuple[list[str], int]:
        batch = self._batch
        names = batch.names
        if not names:
            return names, 0
        size = batch.size
        batch.names = []
        batch.size = 0
        return names, size

    def batch_bytes(self) -> int:
        """Bytes in the segments of the message being encoded on this thread."""
        return self._batch.size

    def discard(self, mark: int = 0, end: int | None = None) -> None:
        """Unlink the names made on this thread since ``mark`` (up to the mark ``end``, if given):
        their message is not sent."""
        batch = self._batch
        for name in batch.names[mark:end]:
            self.recycle(name)
        del batch.names[mark:end]
        if not batch.names:
            batch.size = 0

    def zero_copy(self, on: bool) -> None:
        """The message encoded next on this thread: its big bytes-likes arrive as views."""
        self._batch.views = on

    # -- encoding --

    def near_top(self, obj: Any) -> bool:
        """A cheap look for a big buffer in ``obj`` or in the containers right inside it (a call's
        arguments sit two levels down: ``[fn, [args], {kwargs}, ret]``). On every request's path:
        the tests are ordered for the usual small call."""
        threshold = self.threshold
        t = type(obj)
        if t is list or t is tuple:
            items = obj
        elif t is dict:
            items = obj.values()
        else:
            return t in _KINDS and (obj.nbytes if t is memoryview else len(obj)) >= threshold
        for item in items:
            t = type(item)
            if t is list or t is tuple:
                inner_items = item
            elif t is dict:
                inner_items = item.values()
            else:
                if t in _KINDS and (item.nbytes if t is memoryview else len(item)) >= threshold:
                    return True
                continue
            for inner in inner_items:
                t = type(inner)
                if t in _KINDS and (inner.nbytes if t is memoryview else len(inner)) >= threshold:
                    return True
        return False

    def lift(self, obj: Any) -> Any:
        """``obj`` with its big buffers replaced by segment references (``obj`` itself when none)."""
        return self._walk(obj, [_SCAN_BUDGET])

    def _walk(self, obj: Any, budget: list[int]) -> Any:
        t = type(obj)
        kind = _KINDS.get(t)
        if kind is not None:
            if (obj.nbytes if t is memoryview else len(obj)) < self.threshold:
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
        """Write one buffer into a segment (a warm one if it fits): its ``[name, size, kind]``, or
        None to send it in the frame (segments unavailable)."""
        if self._broken:
            return None
        batch = self._batch
        size = view.nbytes
        if self.limit is not None and batch.size + size > self.limit:
            raise value_too_large("the value (its big buffers)", batch.size + size, self.limit)
        if batch.views and kind == BYTES:
            kind = MEMORYVIEW
        name = self._warm(view) if self.cache else None
        if name is None:
            name = f"{self.prefix}{next(self._ids)}"
            try:
                fd = _create(name, view, keep_open=self.cache > 0)
            except OSError as exc:
                if not self._broken:
                    log.warning("shared memory unavailable (%s); big values travel through the pipe", exc)
                self._broken = True
                return None
            if fd >= 0:
                with self._lock:
                    self._sizes[name] = size
                    self._fds[name] = fd
        batch.names.append(name)
        batch.size += size
        return [name, size, kind]

    # -- warm segments --

    def _warm(self, view: memoryview) -> str | None:
        """Write ``view`` into an idle segment that fits (not more than twice its size)."""
        size = view.nbytes
        with self._lock:
            fits = [n for n, cap in self._idle.items() if size <= cap <= 2 * size]
            if not fits:
                return None
            name = min(fits, key=self._idle.__getitem__)
            self._idle_bytes -= self._idle.pop(name)
            fd = self._fds[name]
        try:
            done = 0
            while done < size:
                done += os.pwrite(fd, view[done:], done)
        except OSError:
            self.drop(name)
            return None
        return name

    def recycle(self, name: str) -> None:
        """The receiver is done with ``name``: keep it warm for a later value, or unlink it."""
        with self._lock:
            cap = self._sizes.get(name)
            if cap is None or cap > self.cache:
                cap = None
            else:
                self._idle[name] = cap
                self._idle_bytes += cap
                evict = []
                while self._idle_bytes > self.cache:
                    oldest = next(iter(self._idle))
                    self._idle_bytes -= self._idle.pop(oldest)
                    evict.append(oldest)
        if cap is None:
            self.drop(name)
            return
        for old in evict:
            self.drop(old)

    def drop(self, name: str) -> None:
        """Unlink ``name`` for good (some receiver may still map it)."""
        with self._lock:
            self._sizes.pop(name, None)
            fd = self._fds.pop(name, -1)
        if fd >= 0:
            os.close(fd)
        unlink(name)

    def close(self) -> None:
        """Unlink the idle segments (the pool is closing); any segment handed back later goes too."""
        with self._lock:
            self.cache = 0
            idle = list(self._idle)
            self._idle.clear()
            self._idle_bytes = 0
        for name in idle:
            self.drop(name)

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

        import cloudpickle  # on first use, as _protocol.dumps_any does

        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
        head: Any = data
        if len(data) >= self.threshold:
            head = self.put(memoryview(data), BUFFER) or data
        if not refs and head is data:
            return msgpack.ExtType(in_band_code, data)
        return msgpack.ExtType(EXT_PICKLE5, msgpack.packb([head, refs]))
