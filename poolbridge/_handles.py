"""Parent-side handles to things that live in a worker: :class:`Ref` (an object) and
:class:`Stream` (a generator). Both carry their session, slot and generation, so they route
themselves and fail with :class:`SessionLostError` once their worker is gone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._errors import RefNotFoundError, SessionLostError
from ._protocol import WireRef, check_ref_session

if TYPE_CHECKING:
    from ._api import _Api

__all__ = ["Ref", "Stream"]


def _restore_ref(key: list[Any]) -> Any:
    """Unpickling a ref inside a worker yields the object (checked like any ref argument)."""
    from ._worker import active_core

    core = active_core()
    if core is None:
        raise RuntimeError("a poolbridge Ref can only be unpickled inside its worker")
    return core._lookup_ref(key)


class Ref(WireRef):
    """A handle to an object kept alive in one worker, in one session's store.

    Methods run in that worker: ``ref.call(name, ...)``, ``ref.getattr(name)``,
    ``ref.setattr(name, value)``, ``ref.release()``. Passed as an argument to a call of the same
    session it arrives as the object itself. Dropping the last handle releases the object too
    (batched into the next request to that worker).
    """

    __slots__ = ("__weakref__", "_api", "_released")

    def __init__(self, api: _Api, session_id: str, ref_id: int, slot: int, generation: int) -> None:
        super().__init__(session_id, ref_id, slot, generation)
        self._api = api
        self._released = False

    @property
    def owner(self) -> object:
        """The pool this ref belongs to (ref ids mean nothing in another pool's workers)."""
        return self._api._pool

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call method ``name`` of the object."""
        return self._api.method(self, name, *args, **kwargs)

    def submit(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Like :meth:`call`, returning a ``concurrent.futures.Future``."""
        return self._api.submit_method(self, name, *args, **kwargs)

    def getattr(self, name: str) -> Any:
        return self._api.getattr(self, name)

    def setattr(self, name: str, value: Any) -> None:
        self._api.setattr(self, name, value)

    def release(self) -> None:
        """Drop the object in its worker. Using the ref afterwards raises :class:`RefNotFoundError`."""
        self._api.release(self)

    async def acall(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Awaitable :meth:`call` (for asyncio code)."""
        return await self._api._aio().method(self, name, *args, **kwargs)

    async def agetattr(self, name: str) -> Any:
        return await self._api._aio().getattr(self, name)

    async def asetattr(self, name: str, value: Any) -> None:
        await self._api._aio().setattr(self, name, value)

    async def arelease(self) -> None:
        await self._api._aio().release(self)

    def options(self, **options: Any) -> _RefView:
        """The same ref with per-call options (``timeout``, ``ret``; a ``session`` must match)."""
        return _RefView(self, self._api.options(**options))

    def __reduce__(self) -> Any:
        check_ref_session(self)
        return (_restore_ref, (self.key(),))

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return (
            f"<Ref {self.ref_id} session={self.session_id!r} slot={self.slot} "
            f"generation={self.generation} {_where(self._api, self.slot, self.generation)}{state}>"
        )

    def __del__(self) -> None:
        if not self._released:
            try:
                self._api._pool._discard(self.key(), "release")
            except Exception:  # noqa: S110 - interpreter shutdown; the worker is going away too
                pass


class _RefView:
    __slots__ = ("_api", "_ref")

    def __init__(self, ref: Ref, api: _Api) -> None:
        self._ref = ref
        self._api = api

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        return self._api.method(self._ref, name, *args, **kwargs)

    def getattr(self, name: str) -> Any:
        return self._api.getattr(self._ref, name)

    def setattr(self, name: str, value: Any) -> None:
        self._api.setattr(self._ref, name, value)


class Stream(Iterator[Any]):
    """Items of a generator that runs in its session's worker, pulled in batches.

    The client holds one batch and asks for the next one as soon as it starts consuming it, so
    a fast consumer pays one round trip per batch, and a slow one ties up no worker: the
    generator is suspended between batches. ``close()`` (or leaving the ``with`` block) closes the
    generator in the worker, running its ``finally``.
    """

    def __init__(self, api: _Api, key: WireRef, items: list[Any], done: bool, batch: int) -> None:
        self._api = api
        self._key = key
        self._items = items
        self._pos = 0
        self._done = done
        self._batch = batch
        self._next: Any = None  # the in-flight request for the next batch
        self._closed = done
        if not done:
            self._prefetch()

    @property
    def session_id(self) -> str:
        return self._key.session_id

    @property
    def closed(self) -> bool:
        return self._closed

    def _prefetch(self) -> None:
        self._next = self._api._stream_next(self._key, self._batch)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        while True:
            items = self._items
            pos = self._pos
            if pos < len(items):
                self._pos = pos + 1
                return items[pos]
            if self._done or self._next is None:
                self._closed = True
                raise StopIteration
            pending, self._next = self._next, None
            try:
                self._items, self._done = self._api._stream_result(pending)
            except BaseException:
                # Giving up on the stream here (a batch we could not decode, a lost worker): make
                # sure the generator does not stay suspended in the worker.
                self._done = self._closed = True
                self._api._pool._discard(self._key.key(), "stream_close")
                raise
            self._pos = 0
            if self._done:
                self._closed = True
            else:
                self._prefetch()

    def close(self) -> None:
        """Close the generator in the worker (runs its ``finally``). Idempotent."""
        if self._closed:
            return
        self._closed = self._done = True
        self._items, self._pos = [], 0  # a closed stream yields nothing more
        pending, self._next = self._next, None
        if pending is not None:
            try:
                self._api._stream_result(pending)
            except Exception:  # noqa: S110 - the close below reports what matters
                pass
        try:
            self._api._stream_close(self._key)
        except (RefNotFoundError, SessionLostError):
            pass  # already gone in the worker (session closed or expired, worker restarted)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed:
            try:
                self._api._pool._discard(self._key.key(), "stream_close")
            except Exception:  # noqa: S110 - interpreter shutdown
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        key = self._key
        return (
            f"<Stream session={self.session_id!r} slot={key.slot} generation={key.generation} "
            f"{_where(self._api, key.slot, key.generation)} {state}>"
        )


def _where(api: Any, slot: int, generation: int) -> str:
    """``pid=N`` of the worker holding a handle's object, or ``lost`` if that worker is gone."""
    try:
        channel = api._pool._supervisor.channels()[slot]
    except Exception:  # repr must not fail (a half-built or closed pool)
        return "pid=?"
    if channel is None or channel.generation != generation:
        return "lost"
    return f"pid={channel.pid}"
