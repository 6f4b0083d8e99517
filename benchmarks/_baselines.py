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
