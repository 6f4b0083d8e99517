"""Exceptions, grouped by who caused them.

Every error has a stable ``code`` — the string a Port client sees in an error reply — so the
Python type and the wire code can never drift apart. Misuse by the caller subclasses the stdlib
exception a Python user would already catch (``ValueError``, ``LookupError``, ``TimeoutError``);
faults outside the caller's control derive from :class:`WorkerCrashedError` / :class:`SessionLostError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "BadRequestError",
    "CallTimeoutError",
    "FrameTooLargeError",
    "HelperNotFoundError",
    "MisroutedError",
    "NotAllowedError",
    "PoolBusyError",
    "PoolClosedError",
    "PoolbridgeError",
    "RefNotFoundError",
    "RemoteError",
    "SessionLimitError",
    "SessionLostError",
    "SessionMismatchError",
    "WorkerCrashedError",
]


class PoolbridgeError(Exception):
    """Base class of every error poolbridge raises itself."""

    code = "internal"


# -- the caller did it -------------------------------------------------------------------------


class SessionMismatchError(PoolbridgeError, ValueError):
    """Two sources of a session id disagree (override vs ref, or a ref argument of another session).

    Raised before anything is sent; the worker raises it too if a payload gets that far.
    """

    code = "session_mismatch"


class RefNotFoundError(PoolbridgeError, LookupError):
    """The ref (or stream) id is not in its session's store: released, expired, or never there."""

    code = "ref_not_found"


class HelperNotFoundError(PoolbridgeError, LookupError):
    """No helper of that name is registered in the worker (is its module in ``helpers=``?)."""

    code = "helper_not_found"


class SessionLimitError(PoolbridgeError):
    """A session would exceed its per-session ref cap."""

    code = "session_limit"


class BadRequestError(PoolbridgeError, ValueError):
    """A request is malformed: unknown op, missing field, wrong type, undecodable payload."""

    code = "bad_request"


class FrameTooLargeError(BadRequestError):
    """A frame is larger than the configured maximum."""

    code = "frame_too_large"


class ValueTooLargeError(FrameTooLargeError):
    """A value (argument or result) is larger than the pool's ``max_value_bytes``; raised before
    any of it is sent. A :class:`FrameTooLargeError` (and so a ``ValueError``)."""

    code = "value_too_large"


def value_too_large(what: str, size: int, limit: int) -> ValueTooLargeError:
    """The error of a value the pool will not carry: ``what`` takes ``size`` bytes, over ``limit``.

    The one place that words it (the caller's check, the worker's check of a result, the shared
    memory writer), so changing how the bound is configured changes one message.
    """
    return ValueTooLargeError(
        f"{what} encodes to {size} bytes, over the pool's max_value_bytes of {limit} bytes "
        f"({limit / (1 << 20):g} MiB); nothing was sent for it. Raise Pool(max_value_bytes=...), "
        "or split the value"
    )


class NotAllowedError(PoolbridgeError, PermissionError):
    """The Port server's allow-list refuses this module or attribute."""

    code = "not_allowed"


class PoolClosedError(PoolbridgeError, RuntimeError):
    """The pool was closed; no new work is accepted."""

    code = "pool_closed"


class PoolBusyError(PoolbridgeError):
    """The slot is at its in-flight bound and the caller asked not to wait."""

    code = "busy"


# -- something outside the caller did it --------------------------------------------------------


class _WorkerCrashed(PoolbridgeError):
    """The worker running this call died (signal, ``os._exit``, OOM kill) before replying.

    Subclasses the stdlib's ``BrokenProcessPool`` so code written for ``concurrent.futures``
    catches it; unlike there, only this one slot is affected and it is restarted.
    """

    code = "worker_crashed"

    def __init__(
        self,
        message: str,
        *,
        slot: int | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
    ) -> None:
        super().__init__(message)
        self.slot = slot
        self.pid = pid
        self.exitcode = exitcode

    @property
    def signal(self) -> int | None:
        """The signal number that killed the worker, if it was a signal."""
        return -self.exitcode if self.exitcode is not None and self.exitcode < 0 else None

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_crash, (str(self), self.slot, self.pid, self.exitcode))


# WorkerCrashedError = _WorkerCrashed + the stdlib's BrokenProcessPool, made on first use: the
# module that defines BrokenProcessPool (with multiprocessing.connection, queues...) would cost
# every worker template ~7 ms of its start for a class only the router raises (and a failed
# initializer). Workers use it as ``_errors.WorkerCrashedError``, never at import time.
if TYPE_CHECKING:
    from concurrent.futures.process import BrokenProcessPool

    class WorkerCrashedError(_WorkerCrashed, BrokenProcessPool):
        __doc__ = _WorkerCrashed.__doc__

else:

    def __getattr__(name: str) -> Any:
        if name == "WorkerCrashedError":
            return _worker_crashed_error()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _worker_crashed_error() -> type[WorkerCrashedError]:
    made: type[WorkerCrashedError] | None = globals().get("WorkerCrashedError")
    if made is None:
        from concurrent.futures.process import BrokenProcessPool

        class WorkerCrashedError(_WorkerCrashed, BrokenProcessPool):
            __doc__ = _WorkerCrashed.__doc__

        WorkerCrashedError.__qualname__ = "WorkerCrashedError"
        made = globals().setdefault("WorkerCrashedError", WorkerCrashedError)  # one class, if threads race
    return made


def _rebuild_crash(message: str, slot: int | None, pid: int | None, exitcode: int | None) -> WorkerCrashedError:
    return _worker_crashed_error()(message, slot=slot, pid=pid, exitcode=exitcode)


class SessionLostError(PoolbridgeError):
    """The worker that held this session's state was restarted; its refs and streams are gone."""

    code = "session_lost"


class MisroutedError(PoolbridgeError):
    """A worker received a payload whose session does not hash to its slot (defence in depth)."""

    code = "misrouted"


class CallTimeoutError(PoolbridgeError, TimeoutError):
    """The call did not finish within its ``timeout``."""

    code = "timeout"


class RemoteError(PoolbridgeError):
    """User code raised an exception that could not be rebuilt locally (or crossed the Port).

    ``type_name`` is the remote exception's qualified type, ``remote_traceback`` its formatted stack.
    """

    code = "remote_error"

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (RemoteError, (self.type_name, self.message, self.remote_traceback))


class RemoteTraceback(Exception):
    """Carries the worker's formatted traceback; set as ``__cause__`` of a re-raised remote error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


#: code -> class, for rebuilding poolbridge's own errors from a reply that carries only the code.
ERRORS_BY_CODE: dict[str, type[PoolbridgeError]] = {
    cls.code: cls
    for cls in (
        SessionMismatchError,
        RefNotFoundError,
        HelperNotFoundError,
        SessionLimitError,
        BadRequestError,
        FrameTooLargeError,
        ValueTooLargeError,
        NotAllowedError,
        PoolClosedError,
        PoolBusyError,
        SessionLostError,
        MisroutedError,
        CallTimeoutError,
    )
}
