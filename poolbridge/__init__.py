"""poolbridge: a multiprocess worker pool with per-session affinity.

Every operation of a session runs in one fixed worker process, chosen by a consistent hash of the
session id. See README.md for the tour and docs/ for the protocol and the hashing functions.

The public names are imported on first use (PEP 562): a worker process imports this package too,
and must not pay for the parent side (asyncio, the router, the Port server) at every start.
"""

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

# The private modules that define the public names, cheapest first.
_MODULES = ("_errors", "_hashing", "_helpers", "_session", "_handles", "_pool", "_aio", "_mapping")

__all__ = [
    "AsyncMapIterator",
    "AsyncPool",
    "AsyncStream",
    "BadRequestError",
    "CallTimeoutError",
    "FrameTooLargeError",
    "HelperNotFoundError",
    "MapIterator",
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
    "ResizeRecord",
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


def __getattr__(name: str) -> _typing.Any:
    if name in __all__:
        for module in _MODULES:
            found = getattr(_importlib.import_module(f".{module}", __name__), name, _MISSING)
            if found is not _MISSING:
                globals()[name] = found  # later lookups skip this function
                return found
    raise AttributeError(f"module 'poolbridge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


_MISSING = object()

if _typing.TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from ._aio import AsyncStream
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
    from ._mapping import AsyncMapIterator, MapIterator
    from ._pool import AsyncPool, Pool, PoolStats, SlotStats
    from ._resize import ResizeRecord
    from ._session import resolve_session
