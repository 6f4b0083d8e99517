"""Worker-side functions of the large-value tests (imported by dotted path in the workers)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

from pb_faultmods import wait_fifo


def digest(value: Any) -> list[Any]:
    """``[type name, size in bytes, sha256]`` of a buffer or str, as the worker sees it."""
    if isinstance(value, str):
        data: Any = value.encode()
    else:
        data = memoryview(value).cast("B")
    return [type(value).__name__, data.nbytes if isinstance(data, memoryview) else len(data),
            hashlib.sha256(data).hexdigest()]


def describe(value: Any) -> dict[str, Any]:
    view = memoryview(value) if not isinstance(value, str) else None
    out: dict[str, Any] = {"type": type(value).__name__}
    if view is not None:
        out["nbytes"] = view.nbytes
        out["readonly"] = view.readonly
    flags = getattr(value, "flags", None)
    if flags is not None:
        out["writeable"] = bool(flags.writeable)
    return out


def sha256_of(value: Any) -> str:
    return hashlib.sha256(memoryview(value).cast("B")).hexdigest()


def mark_wait_digest(marker: str, fifo: str, value: Any) -> list[Any]:
    """Mark that the call runs (the argument has arrived), block on ``fifo``, then digest."""
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    wait_fifo(fifo)
    return digest(value)


def mark_then_exit(marker: str, value: Any) -> None:
    """Hold the (mapped) argument and die."""
    assert len(value) > 0
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    os._exit(3)


class DiesWhenPickled:
    """A result that kills its worker while the reply is being encoded."""

    def __reduce__(self) -> Any:
        os._exit(4)


def big_then_die(n: int) -> list[Any]:
    """A result whose first element goes to a segment before the second one kills the worker."""
    return [bytes(n), DiesWhenPickled()]


def big_then_unencodable(n: int) -> list[Any]:
    """A big buffer, then something that cannot be pickled: the reply fails after a segment was made."""
    import threading

    return [bytes(n), threading.Lock()]


def make_array(n: int, fill: float = 1.0) -> Any:
    import numpy as np

    return np.full(n, fill)


def bump(arr: Any) -> Any:
    arr += 1  # needs a writable array
    return arr


def gen_blobs(count: int, size: int) -> Iterator[bytes]:
    for i in range(count):
        yield bytes([i % 256]) * size


class Store:
    """A ref target that keeps big values."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def put(self, value: Any) -> int:
        self.items.append(value)
        return len(self.items)

    def get(self, i: int) -> Any:
        return self.items[i]
