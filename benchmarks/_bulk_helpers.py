"""Worker-side helpers of bench_large.py (imported by dotted path in the workers)."""

from __future__ import annotations

_blobs: dict[int, bytes] = {}


def blob(n: int) -> bytes:
    """``n`` bytes made once per worker: a result the worker already holds."""
    data = _blobs.get(n)
    if data is None:
        data = _blobs[n] = b"\x5a" * n
    return data


def echo(data: bytes) -> bytes:
    return data
