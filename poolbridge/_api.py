"""The operations every face shares: :class:`_Api` (a pool, or a view made by ``pool.options(...)``)
turns each public operation into a request — ``(op, target ref, fields, decode)`` — and hands it to
the call engine (_calls.py), which the async face (_aio.py) and the Port server share.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from . import _calls
from ._aio import AsyncFace
from ._handles import Ref, Stream
from ._hashing import slot_for
from ._mapping import MappingMixin
from ._protocol import (
    OK,
    OP_CALL,
    OP_CLOSE_SESSION,
    OP_GETATTR,
    OP_HELPER,
    OP_METHOD,
    OP_RELEASE,
    OP_SETATTR,
    OP_STREAM_CLOSE,
    OP_STREAM_NEXT,
    OP_STREAM_OPEN,
    RET_AUTO,
    RET_REF,
    RET_VALUE,
    WireRef,
    unpack_plain,
)
from ._session import session_scope, validate_session_id
from ._wire import rebuild_error

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["DEFAULT_BATCH", "_Api", "_Options", "_Req"]

_RET = {"auto": RET_AUTO, "ref": RET_REF, "value": RET_VALUE}
DEFAULT_BATCH = 1024
_Req = tuple[str, "WireRef | None", list[Any], Callable[[int, Any], Any]]


class _Options:
    """Per-call options. Plain slots, not a dataclass: ``options()`` sits on hot paths."""

    __slots__ = ("batch", "block", "on_timeout", "ret", "session", "timeout", "zero_copy")

    def __init__(self) -> None:
        self.session: str | None = None
        self.timeout: float | None = None
        self.ret = RET_AUTO
        self.batch = DEFAULT_BATCH
        self.block = True
        self.on_timeout = "keep"
        self.zero_copy = False

    def copy(self) -> _Options:
        new = _Options()
        for name in self.__slots__:
            setattr(new, name, getattr(self, name))
        return new


# -- the API, shared by Pool and its option views ---------------------------------------------


class _Api(MappingMixin):
    __slots__ = ("_opts", "_pool")

    def __init__(self, pool: Pool, opts: _Options) -> None:
        self._pool = pool
        self._opts = opts

    # The call engine (_calls.py), one function per stage, bound here as methods.
    _prepare = _calls.prepare
    _run = _calls.run
    _submit = _calls.submit
    _late = _calls.late
    _close_opened_stream = _calls.close_opened_stream
    _value = _calls.value
    _decode_body = _calls.decode_body

    def _aio(self) -> AsyncFace:
        """The awaitable operations on this pool or view (``Ref.acall`` and friends)."""
        return AsyncFace(_api=self)

    @staticmethod
    def _fn(fn: Any) -> Any:
        if isinstance(fn, str) or isinstance(fn, WireRef):
            return fn
        if callable(fn):
            return fn  # pickled by value (cloudpickle) by the codec
        raise TypeError(f"expected a dotted path, a callable or a Ref, got {type(fn).__name__}")

    # -- public operations -------------------------------------------------------------

    def options(
        self,
        *,
        session: str | None = None,
        timeout: float | None = None,
        ret: str | None = None,
        batch: int | None = None,
        block: bool | None = None,
        on_timeout: str | None = None,
        zero_copy: bool | None = None,
    ) -> _Api:
        """A view of the pool whose calls use these options (unset ones are inherited).

        ``session``: the per-call session override. ``timeout``: seconds before
        :class:`CallTimeoutError`. ``on_timeout``: ``"keep"`` (default) lets the worker finish the
        call and drops its reply; ``"restart"`` kills the slot's worker, which fails that slot's other
        in-flight calls with :class:`WorkerCrashedError` and loses its sessions' state. ``ret``:
        ``"auto"`` (a value, or a Ref when the result cannot be encoded), ``"ref"``, ``"value"``.
        ``batch``: stream batch size. ``block=False``: raise :class:`PoolBusyError` instead of waiting
        when the slot is at its in-flight bound. ``zero_copy=True``: big bytes and bytearrays (at least
        the pool's ``shm_threshold``) arrive as read-only memoryviews of shared memory, in the worker
        (arguments) and here (results), instead of being copied out (README, "Large values").
        """
        opts = self._opts.copy()
        if session is not None:
            opts.session = validate_session_id(session)
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"timeout must be positive, got {timeout}")
            opts.timeout = float(timeout)
        if ret is not None:
            if ret not in _RET:
                raise ValueError(f"ret must be one of {sorted(_RET)}, got {ret!r}")
            opts.ret = _RET[ret]
        if batch is not None:
            if batch < 1:
                raise ValueError(f"batch must be at least 1, got {batch}")
            opts.batch = int(batch)
        if block is not None:
            opts.block = bool(block)
        if zero_copy is not None:
            opts.zero_copy = bool(zero_copy)
        if on_timeout is not None:
            if on_timeout not in ("keep", "restart"):
                raise ValueError(f"on_timeout must be 'keep' or 'restart', got {on_timeout!r}")
            opts.on_timeout = on_timeout
        return _Api(self._pool, opts)

    # -- request builders: (op, target ref, fields, decode), shared by the sync and async faces --

    def _req_call(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], ret: int | None = None) -> _Req:
        ref = fn if isinstance(fn, WireRef) else None
        return OP_CALL, ref, [self._fn(fn), list(args), kwargs, self._opts.ret if ret is None else ret], self._value

    def _req_getattr(self, target: Any, name: str | None) -> _Req:
        if isinstance(target, WireRef):
            if not isinstance(name, str):
                raise TypeError("getattr(ref, name) needs the attribute name")
            return OP_GETATTR, target, [target, name, self._opts.ret], self._value
        if not isinstance(target, str) or name is not None:
            raise TypeError("getattr takes a dotted path, or a Ref and an attribute name")
        return OP_GETATTR, None, [target, None, self._opts.ret], self._value

    def _req_setattr(self, ref: Ref, name: str, value: Any) -> _Req:
        return OP_SETATTR, ref, [ref, name, value], self._value

    def _req_method(self, ref: Ref, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Req:
        return OP_METHOD, ref, [ref, name, list(args), kwargs, self._opts.ret], self._value

    def _req_helper(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Req:
        return OP_HELPER, None, [name, list(args), kwargs, self._opts.ret], self._value

    def _req_release(self, ref: Ref) -> _Req:
        return OP_RELEASE, ref, [ref.key()], self._value

    def _req_close_session(self) -> _Req:
        return OP_CLOSE_SESSION, None, [], self._value

    def _req_stream_open(
        self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], make: Callable[..., Any]
    ) -> _Req:
        """The open request. The worker answers with the stream's whole key, so nothing about the
        session is decided here: ``_prepare`` resolves it once, as for every op."""
        batch = self._opts.batch
        ref = fn if isinstance(fn, WireRef) else None  # a ref (e.g. a generator object) routes itself

        def opened(status: int, body: Any) -> Any:
            if status != OK:
                raise rebuild_error(body)
            key_fields, items, done = unpack_plain(body)
            key = WireRef(*key_fields)
            try:
                decoded = self._decode_body(items)
            except BaseException:
                if not done:  # the first batch is lost: close the generator rather than leak it
                    self._pool._discard(key.key(), "stream_close")
                raise
            return make(self, key, decoded, done, batch)

        return OP_STREAM_OPEN, ref, [self._fn(fn), list(args), kwargs, batch], opened

    def _req_stream_next(self, key: WireRef, n: int) -> _Req:
        return OP_STREAM_NEXT, key, [key.key(), n], self._stream_items

    def _req_stream_close(self, key: WireRef) -> _Req:
        return OP_STREAM_CLOSE, key, [key.key()], self._value

    # -- public operations -------------------------------------------------------------

    def call(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the session's worker. ``fn``: dotted path, callable or Ref."""
        if type(fn) is str:  # the hot path: _req_call's request, built without the generic builder
            return self._run(OP_CALL, None, [fn, list(args), kwargs, self._opts.ret], self._value)
        return self._run(*self._req_call(fn, args, kwargs))

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Like :meth:`call`, returning a ``concurrent.futures.Future``."""
        if type(fn) is str:  # as in call()
            return self._submit(OP_CALL, None, [fn, list(args), kwargs, self._opts.ret], self._value)  # type: ignore[no-any-return]
        return self._submit(*self._req_call(fn, args, kwargs))  # type: ignore[no-any-return]

    def create(self, cls: Any, /, *args: Any, **kwargs: Any) -> Ref:
        """Call ``cls(*args, **kwargs)`` in the worker and keep the result there; returns a :class:`Ref`."""
        return self._run(*self._req_call(cls, args, kwargs, RET_REF))  # type: ignore[no-any-return]

    def getattr(self, target: str | Ref, name: str | None = None) -> Any:
        """``pool.getattr("math.pi")`` reads a module attribute; ``pool.getattr(ref, "x")`` a ref's."""
        return self._run(*self._req_getattr(target, name))

    def setattr(self, ref: Ref, name: str, value: Any) -> None:
        self._run(*self._req_setattr(ref, name, value))

    def method(self, ref: Ref, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call method ``name`` of the object behind ``ref``."""
        return self._run(*self._req_method(ref, name, args, kwargs))

    def submit_method(self, ref: Ref, name: str, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        return self._submit(*self._req_method(ref, name, args, kwargs))  # type: ignore[no-any-return]

    def helper(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call a function registered with ``@poolbridge.helper`` in a module listed in ``helpers=``."""
        return self._run(*self._req_helper(name, args, kwargs))

    def release(self, ref: Ref) -> None:
        """Drop the object behind ``ref`` in its worker (the handle is then marked released)."""
        self._run(*self._req_release(ref))
        ref._released = True

    def stream(self, fn: Any, /, *args: Any, **kwargs: Any) -> Stream:
        """Iterate ``fn(*args, **kwargs)`` in the session's worker; items arrive in batches."""
        return self._run(*self._req_stream_open(fn, args, kwargs, Stream))  # type: ignore[no-any-return]

    def _stream_next(self, key: WireRef, n: int) -> Any:
        return self._submit(*self._req_stream_next(key, n))

    def _stream_items(self, status: int, body: Any) -> tuple[list[Any], bool]:
        if status != OK:
            raise rebuild_error(body)
        items, done = unpack_plain(body)
        return self._decode_body(items), done

    @staticmethod
    def _stream_result(pending: concurrent.futures.Future[Any]) -> tuple[list[Any], bool]:
        return pending.result()  # type: ignore[no-any-return]

    def _stream_close(self, key: WireRef) -> None:
        self._run(*self._req_stream_close(key))

    def close_session(self, session_id: str | None = None) -> int:
        """Drop every ref, stream and helper state of a session (default: the current one).

        Returns how many refs and streams were dropped.
        """
        api = self if session_id is None else self.options(session=session_id)
        return api._run(*api._req_close_session())  # type: ignore[no-any-return]

    def session(self, session_id: str) -> AbstractContextManager[str]:
        """``with pool.session("user-42"): ...`` — the context session for the block."""
        return session_scope(session_id)

    def slot_for(self, session_id: str) -> int:
        """The worker slot ``session_id`` maps to (a pure function of the id and the worker count)."""
        return slot_for(validate_session_id(session_id), self._pool.workers)
