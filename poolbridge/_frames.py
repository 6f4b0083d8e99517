"""Reading and writing ``{packet, 4}`` frames without copying a large frame more than once.

A frame is a 4-byte big-endian length and that many bytes. The private router-worker channel also
allows frames of 4 GiB and more: the length ``0xFFFFFFFF`` is then followed by an 8-byte length.
Only a reader made with ``extended=True`` (the private channel's) reads those; the Port server's
reads plain ``{packet, 4}``.

:class:`FrameReader` reads straight from a file descriptor into its own buffers (``os.readv``):

* small frames accumulate in one reusable buffer of ``chunk`` bytes and are cut out of it as
  ``bytes``; the buffer is compacted (a move of less than ``chunk`` bytes) instead of being grown;
* a frame larger than that buffer gets a buffer of exactly its size, allocated once when its header
  arrives and filled in place by the following reads, then handed out as it is (a ``bytearray``).
  Each byte of a large frame is copied once, by the kernel; the old reader appended every 64 KiB
  chunk to a growing ``bytearray`` and sliced the frame out at the end;
* a frame over ``max_frame`` is skipped as it arrives, an :class:`OversizedFrame` in its place.

One :meth:`FrameReader.read_from` is one ``read``: a large frame is read across many calls, so the
loop that owns the reader (a slot's reply reader, the Port server's poll loop) is free between them.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Union  # the alias below is evaluated at run time, on Python 3.10 too

import msgpack

from ._errors import FrameTooLargeError

__all__ = ["FrameReader", "OversizedFrame", "frame_header", "write_frame"]

HEADER = struct.Struct(">I")
_LONG = struct.Struct(">Q")
_EXTENDED = 0xFFFFFFFF  # length escape: an 8-byte length follows (private channel only)
CHUNK = 1 << 16  # the reusable buffer: one pipe's worth (Linux's default pipe capacity)


class OversizedFrame:
    """Stands in the output of :class:`FrameReader` for a frame over the limit (its bytes skipped).

    ``head`` holds the first bytes of its body that had arrived (at most 64), enough to read a
    request ``id`` that the client put first, so the error reply can carry it.
    """

    __slots__ = ("head", "size")

    HEAD = 64

    def __init__(self, size: int, head: bytes = b"") -> None:
        self.size = size
        self.head = head

    def error(self, limit: int) -> FrameTooLargeError:
        return FrameTooLargeError(f"frame of {self.size} bytes exceeds the limit of {limit} bytes")

    def leading_id(self) -> Any:
        """The id of a private-channel frame (``[id, ...]``, a request or a reply), read from its
        first bytes; None when they do not hold one."""
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(self.head)
        try:
            if unpacker.read_array_header() < 1:
                return None
            req_id = unpacker.unpack()
        except Exception:
            return None
        return req_id if type(req_id) is int else None


Frame = Union[bytes, bytearray, OversizedFrame]  # noqa: UP007


def frame_header(size: int) -> bytes:
    """The header of a frame of ``size`` bytes (extended past 4 GiB - 2)."""
    if size < _EXTENDED:
        return HEADER.pack(size)
    return HEADER.pack(_EXTENDED) + _LONG.pack(size)


def write_frame(fd: int, body: bytes | bytearray | memoryview) -> None:
    """Write one frame to a blocking fd; a large body is not copied to prepend its header."""
    header = frame_header(len(body))
    if len(body) < CHUNK:
        data: bytes | memoryview = header + body
        written = os.write(fd, data)
        if written == len(data):
            return
        view = memoryview(data)[written:]
    else:
        written = os.writev(fd, [header, body])
        if written < len(header):  # pragma: no cover - a pipe takes at least PIPE_BUF bytes
            view = memoryview(header + body)[written:]
        else:
            view = memoryview(body).cast("B")[written - len(header) :]
    while view:
        view = view[os.write(fd, view) :]


class FrameReader:
    """Incremental ``{packet, 4}`` decoder; see the module docstring.

    ``read_from(fd)`` reads once from ``fd``; ``feed(data)`` takes bytes read elsewhere. Either
    returns the frames completed so far, in order.
    """

    __slots__ = ("_big", "_big_fill", "_buf", "_end", "_extended", "_skip", "_start", "_view", "max_frame")

    def __init__(self, max_frame: int | None = None, chunk: int = CHUNK, extended: bool = False) -> None:
        self._buf = bytearray(chunk)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._big: bytearray | None = None  # the frame being filled in place
        self._big_fill = 0
        self._skip = 0  # bytes of an oversized frame still to throw away
        self.max_frame = max_frame
        self._extended = extended  # the private channel's 8-byte lengths (the Port has none)

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return self._end - self._start + self._big_fill

    def read_from(self, fd: int) -> list[Frame] | None:
        """One ``read`` from ``fd``; the frames it completed. None at EOF. May raise
        ``BlockingIOError`` on a non-blocking fd with nothing to read."""
        big = self._big
        if big is not None:
            n = os.readv(fd, [memoryview(big)[self._big_fill :]])
            if not n:
                return None
            return self._filled_big(n)
        if self._skip:
            n = os.readv(fd, [self._view[: min(self._skip, len(self._buf))]])
            if not n:
                return None
            self._skip -= n
            return []
        if self._start == self._end:  # nothing buffered: the usual case of a request or a reply
            data = os.read(fd, len(self._buf))
            n = len(data)
            if n >= 4:
                (size,) = HEADER.unpack_from(data)
                if size == n - 4 and (self.max_frame is None or size <= self.max_frame):
                    return [data[4:]]  # exactly one whole frame: no trip through the buffer
            elif not n:
                return None
            self._buf[:n] = data
            self._start, self._end = 0, n
            return self._parse()
        self._make_room()
        n = os.readv(fd, [self._view[self._end :]])
        if not n:
            return None
        self._end += n
        return self._parse()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        out: list[Frame] = []
        view = memoryview(data).cast("B")
        while view:
            big = self._big
            if big is not None:
                n = min(len(view), len(big) - self._big_fill)
                big[self._big_fill : self._big_fill + n] = view[:n]
                out += self._filled_big(n)
            elif self._skip:
                n = min(len(view), self._skip)
                self._skip -= n
            else:
                self._make_room()
                n = min(len(view), len(self._buf) - self._end)
                self._view[self._end : self._end + n] = view[:n]
                self._end += n
                out += self._parse()
            view = view[n:]
        return out

    def _filled_big(self, n: int) -> list[Frame]:
        self._big_fill += n
        big = self._big
        assert big is not None
        if self._big_fill < len(big):
            return []
        self._big = None
        self._big_fill = 0
        return [big]

    def _make_room(self) -> None:
        start = self._start
        # Move the partial frame to the front when it is small, or when the buffer's end is reached.
        if start and (self._end - start < len(self._buf) // 2 or self._end == len(self._buf)):
            n = self._end - start
            self._buf[:n] = self._view[start : self._end]
            self._start = 0
            self._end = n

    def _parse(self) -> list[Frame]:
        out: list[Frame] = []
        view = self._view
        pos, end = self._start, self._end
        limit = self.max_frame
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(view, pos)
            head = 4
            if size == _EXTENDED and self._extended:
                if end - pos < 12:
                    break
                (size,) = _LONG.unpack_from(view, pos + 4)
                head = 12
            available = end - pos - head
            if limit is not None and size > limit:
                first = pos + head
                out.append(OversizedFrame(size, bytes(view[first : first + min(OversizedFrame.HEAD, available)])))
                if available >= size:
                    pos += head + size
                    continue
                self._skip = size - available
                pos = end
                break
            if available >= size:
                out.append(bytes(view[pos + head : pos + head + size]))
                pos += head + size
                continue
            if head + size > len(self._buf):
                # Too big for the shared buffer: a buffer of its own, filled in place from now on.
                big = bytearray(size)
                big[:available] = view[pos + head : end]
                self._big = big
                self._big_fill = available
                pos = end
            break
        if pos == end:
            pos = end = 0
        self._start, self._end = pos, end
        return out
