"""poolbridge: a multiprocess worker pool with per-session affinity.

Every operation of a session runs in one fixed worker process, chosen by a consistent hash of the
session id. See README.md for the tour and docs/ for the protocol and the hashing functions.
"""

from ._aio import AsyncPool, AsyncStream
from ._errors import (
    BadRequestError,
    CallTimeoutError,
    FrameTooLargeError,
    HelperNotFoundError,
    MisroutedError,
    NotAllowedError,
    PoolbridgeError,
    PoolBusyError,
    PoolClosedError,
    RefNotFoundError,
    RemoteError,
    RemoteTraceback,
    SessionLimitError,
    SessionLostError,
    SessionMismatchError,
    ValueTooLargeError,
    WorkerCrashedError,
)
from ._handles import Ref, Stream
from ._hashing import jump_hash, stable_hash64
from ._helpers import SessionContext, current_session, helper
from ._pool import Pool, PoolStats, SlotStats
from ._session import resolve_session

__version__ = "0.1.0"

__all__ = [
    "AsyncPool",
    "AsyncStream",
    "BadRequestError",
    "CallTimeoutError",
    "FrameTooLargeError",
    "HelperNotFoundError",
    "MisroutedError",
    "NotAllowedError",
    "Pool",
    "PoolBusyError",
    "PoolClosedError",
    "PoolStats",
    "PoolbridgeError",
    "Ref",
    "RefNotFoundError",
    "RemoteError",
    "RemoteTraceback",
    "SessionContext",
    "SessionLimitError",
    "SessionLostError",
    "SessionMismatchError",
    "SlotStats",
    "Stream",
    "ValueTooLargeError",
    "WorkerCrashedError",
    "__version__",
    "current_session",
    "helper",
    "jump_hash",
    "resolve_session",
    "stable_hash64",
]
