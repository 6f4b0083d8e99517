"""Worker-side helpers of the reliability tests (imported by dotted path inside workers)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

from pb_faultmods import wait_fifo


def gen_after_fifo(path: str, n: int) -> Iterator[int]:
    """A generator whose first item waits until the test writes to the fifo ``path``."""
    wait_fifo(path)
    yield from range(n)


def blocked_then(path: str, value: Any) -> Any:
    """Wait on the fifo ``path``, then return ``value`` (e.g. an object to be kept as a ref)."""
    wait_fifo(path)
    return value


def write_garbage_reply() -> str:
    """Write a frame that is not a reply into this worker's reply pipe, then return normally."""
    from poolbridge._worker_main import options_in_use  # spawned or forked by the template alike

    reply_fd = options_in_use["fds"][1]
    os.write(reply_fd, struct.pack(">I", 1) + b"\xc1")  # 0xc1: the one byte msgpack never uses
    return "after the garbage"


