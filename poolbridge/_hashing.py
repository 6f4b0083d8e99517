"""Session id -> worker slot. Pure functions, identical in every process and on every machine.

``slot = jump_hash(stable_hash64(session_id), n_slots)``

* ``stable_hash64``: the first 8 bytes of SHA-256 over the UTF-8 session id, read as an unsigned
  big-endian integer. SHA-256 rather than Python's ``hash()`` (salted per process) or a home-made
  hash: every language ships it (Erlang ``:crypto.hash(:sha256, id)``), so any client can route.
* ``jump_hash``: Lamping & Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm" (2014).
  Growing from n to n+1 slots moves only 1/(n+1) of the sessions. The float arithmetic is IEEE-754
  double, as in the paper's reference, so other languages reproduce it bit for bit.

docs/hashing.md holds the same functions and a table of test vectors (checked by the tests).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import sha256
else:
    try:  # CPython's own SHA-256, hashlib's fallback: the same digest, where hashlib would load
        # OpenSSL, ~3 ms of every worker template's start (_worker_template.py)
        from _sha256 import sha256
    except ImportError:  # pragma: no cover - 3.12 renamed it _sha2; builds without it
        try:
            from _sha2 import sha256
        except ImportError:
            from hashlib import sha256

__all__ = ["jump_hash", "slot_for", "stable_hash64"]

_MASK64 = (1 << 64) - 1
_LCG_MUL = 2862933555777941757


def stable_hash64(session_id: str) -> int:
    """Unsigned 64-bit hash of a session id: SHA-256 of its UTF-8 bytes, first 8 bytes big-endian."""
    return int.from_bytes(sha256(session_id.encode("utf-8")).digest()[:8], "big")


def jump_hash(key: int, n_slots: int) -> int:
    """Jump consistent hash of an unsigned 64-bit ``key`` into ``range(n_slots)``."""
    if n_slots <= 0:
        raise ValueError(f"n_slots must be positive, got {n_slots}")
    key &= _MASK64
    b, j = -1, 0
    while j < n_slots:
        b = j
        key = (key * _LCG_MUL + 1) & _MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


@lru_cache(maxsize=65536)
def slot_for(session_id: str, n_slots: int) -> int:
    """The slot a session maps to. Cached: it sits on every call's path and never changes."""
    return jump_hash(stable_hash64(session_id), n_slots)
