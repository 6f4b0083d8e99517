"""Baselines measured in the same run as poolbridge: raw pipe ping-pong and pipelined echo."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack

_HEADER = struct.Struct(">I")


class RawEcho:
    """A raw two-process channel: 4-byte length prefix + msgpack over os.pipe, nothing else."""

    def __init__(self) -> None:
        req_r, self._w = os.pipe()
        self._r, rep_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_raw_echo.py")), str(req_r), str(rep_w)],
            pass_fds=(req_r, rep_w),
        )
        os.close(req_r)
        os.close(rep_w)
        self._buf = bytearray()
        self._aio_loop: Any = None
        self._aio_future: Any = None

    def _send(self, obj: object) -> None:
        body = msgpack.packb(obj)
        os.write(self._w, _HEADER.pack(len(body)) + body)

    def _recv(self) -> object:
        buf = self._buf
        while True:
            if len(buf) >= 4:
                (n,) = _HEADER.unpack_from(buf)
                if len(buf) >= 4 + n:
                    obj = msgpack.unpackb(bytes(buf[4 : 4 + n]))
                    del buf[: 4 + n]
                    return obj
            buf += os.read(self._r, 1 << 16)

    def ping(self, a: int = 1, b: int = 2) -> object:
        self._send([0, a, b])
        return self._recv()

    def pipelined(self, n: int, window: int = 256) -> None:
        """Send ``n`` requests keeping up to ``window`` in flight; read all replies."""
        sent = received = 0
        while received < n:
            while sent < n and sent - received < window:
                self._send([sent, 1, 2])
                sent += 1
            self._recv()
            received += 1

    async def aio_ping(self, a: int = 1, b: int = 2) -> object:
        """One round trip driven by the running event loop: a reader on the reply pipe (registered
        once per loop) settles a future, as an asyncio program would do it by hand — the floor for
        ``await pool.call``."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._aio_loop is not loop:
            self._aio_loop = loop
            loop.add_reader(self._r, self._aio_readable)
        self._aio_future = loop.create_future()
        self._send([0, a, b])
        return await self._aio_future

    def _aio_readable(self) -> None:
        buf = self._buf
        buf += os.read(self._r, 1 << 16)
        if len(buf) >= 4:
            (n,) = _HEADER.unpack_from(buf)
            if len(buf) >= 4 + n:
                obj = msgpack.unpackb(bytes(buf[4 : 4 + n]))
                del buf[: 4 + n]
                self._aio_future.set_result(obj)

    def aio_stop(self) -> None:
        if self._aio_loop is not None:
            self._aio_loop.remove_reader(self._r)
            self._aio_loop = None

    def close(self) -> None:
        os.close(self._w)
        self._proc.wait(10)
        os.close(self._r)


_BULK_REQ = struct.Struct(">cQ")


class RawBulk:
    """Raw bytes to and from a child (``_raw_bulk.py``) over two pipes, or one socketpair.

    The child allocates a new buffer for what it receives, as any transport must hand user code a
    new object; the parent does the same for what it gets back.
    """

    def __init__(self, socket: bool = False) -> None:
        import socket as socketlib

        self._sock = None
        if socket:
            self._sock, child = socketlib.socketpair()
            child_r = child_w = child.fileno()
            keep: tuple[int, ...] = (child_r,)
            self._r = self._w = self._sock.fileno()
        else:
            child_r, self._w = os.pipe()
            self._r, child_w = os.pipe()
            keep = (child_r, child_w)
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_raw_bulk.py")), str(child_r), str(child_w)],
            pass_fds=keep,
        )
        if socket:
            child.close()
        else:
            os.close(child_r)
            os.close(child_w)

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._w, view) :]

    def _read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        while view:
            got = os.readv(self._r, [view])
            if not got:
                raise EOFError
            view = view[got:]
        return buf

    def send_len(self, data: bytes) -> int:
        """``len(data)`` computed in the child: the bytes cross once."""
        self._write(_BULK_REQ.pack(b"L", len(data)))
        self._write(data)
        (n,) = struct.unpack(">Q", self._read(8))
        return int(n)

    def get(self, n: int) -> bytearray:
        """``n`` bytes the child holds, received here."""
        self._write(_BULK_REQ.pack(b"G", n))
        return self._read(n)

    def echo(self, data: bytes) -> bytearray:
        self._write(_BULK_REQ.pack(b"E", len(data)))
        self._write(data)
        return self._read(len(data))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self._w)
            os.close(self._r)
        self._proc.wait(10)
