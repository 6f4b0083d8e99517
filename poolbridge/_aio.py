"""The asyncio face of a pool: the same operations, awaitable, on the same workers.

No thread per call and nothing blocks the loop: a request is written by the task itself (a pipe
write of a few dozen bytes), and its reply is read on the event loop (``add_reader`` on the worker's
reply pipe) and resolves an ``asyncio.Future`` there — no thread hop (see :class:`_LoopState`).
Session resolution runs inside the task, so each task gets its own auto-session, and
``with pool.session(...)`` / ``options(session=...)`` behave exactly as in threads.

    async with AsyncPool(workers=4) as pool:
        await pool.call("math.sqrt", 2.0)
        ref = await pool.create("collections.Counter", "abca")
        await ref.acall("most_common", 1)          # or: await pool.method(ref, "most_common", 1)
        async for item in pool.stream("builtins.range", 10):
            ...

``pool.aio`` gives the asyncio face of an existing (sync) :class:`Pool`; both share the workers.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from ._calls import give_up
from ._channel import Late, Sink
from ._errors import CallTimeoutError, RefNotFoundError, SessionLostError
from ._mapping import AsyncMappingMixin
from ._protocol import RET_REF, WireRef
from ._supervisor import describe_pool

if TYPE_CHECKING:
    from ._api import _Api, _Req
    from ._handles import Ref
    from ._pool import Pool, PoolStats

__all__ = ["AsyncFace", "AsyncStream"]


class _CallFuture(asyncio.Future[Any]):
    """The future of an awaited request. Cancelling it (a cancelled task, an expired ``wait_for``)
    also cancels the call in the worker when it has not started there; if it has, its reply is
    late. An override rather than a done callback: a callback per call costs a loop turn."""

    _target: tuple[AsyncFace, _LoopSink, Any, int, str] | None = None  # set once sent

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        target, self._target = self._target, None
        if target is not None:
            face, sink, channel, req_id, op = target
            face._cancelled(sink, channel, req_id, op)
        return True


class _LoopSink(Sink):
    """Resolves an asyncio future: directly when the reply is read on the loop's own thread, else
    through the loop's inbox."""

    __slots__ = ("decode", "future", "inbox", "seq")
    cancellable = True

    def __init__(self, inbox: _LoopState, loop: asyncio.AbstractEventLoop, decode: Callable[[int, Any], Any]) -> None:
        self.inbox = inbox
        self.future = _CallFuture(loop=loop)
        self.decode = decode
        self.seq = 0

    def deliver(self, status: int, body: Any) -> None:
        # Answered: nothing is left to cancel in the worker, and the future no longer holds this
        # sink (a cycle per call that only the garbage collector would free).
        self.future._target = None
        try:
            value = self.decode(status, body)
        except BaseException as exc:
            self.inbox.post(self.future, None, exc)
        else:
            self.inbox.post(self.future, value, None)

    def fail(self, exc: BaseException) -> None:
        self.future._target = None
        self.inbox.post(self.future, None, exc)


class _LoopState:
    """What one event loop keeps: its reply readers and its inbox.

    *Readers.* A request sent from the loop is answered on the loop: the channel's reply pipe is
    watched with ``loop.add_reader`` (on a private ``dup`` of the fd, so the channel can close its
    own fd from any thread without leaving a stale registration in the loop's selector) and read
    with the channel's non-blocking ``try_read``. A reply thus settles its future on the loop thread
    with no thread hop and no self-pipe write. If another reader holds the pipe (a thread leading a
    sync call, the channel's background reader), the loop steps aside for that channel and wakes
    the background reader, which delivers the rest through the inbox; the next send watches again.

    *Inbox.* Replies read on another thread queue here and one scheduled ``drain`` settles all that
    have arrived (``call_soon_threadsafe`` writes the loop's self-pipe: once per batch, not per
    reply). ``scheduled`` is cleared before draining, so an item appended during a drain is either
    drained now or schedules the next one.
    """

    __slots__ = ("__weakref__", "_loop", "items", "readers", "scheduled", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the state is the value of a WeakKeyDictionary keyed by the loop.
        self._loop = weakref.ref(loop)
        self.thread = threading.get_ident()  # made from inside the running loop
        self.items: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = collections.deque()
        self.scheduled = False
        self.readers: dict[Any, int] = {}  # channel -> the loop's dup of its reply fd
        weakref.finalize(self, _close_fds, self.readers)

    # -- readers (loop thread only) ------------------------------------------------------

    def watch(self, loop: asyncio.AbstractEventLoop, ch: Any) -> None:
        """Read ``ch``'s replies on ``loop`` (a request was just sent there with ``lead=True``)."""
        if ch in self.readers:
            return
        read_fd = getattr(ch, "read_fd", None)
        if read_fd is None:  # a channel without a pipe (Ray): its own reader delivers
            ch.wake_reader()
            return
        try:
            fd = os.dup(read_fd)
        except OSError:  # closed meanwhile: the worker died, and the monitor fails what was pending
            return
        self.readers[ch] = fd
        loop.add_reader(fd, self._readable, ch)
        ch.on_close(self._closed_elsewhere)

    def _readable(self, ch: Any) -> None:
        if not ch.try_read():
            self.forget(ch)
            ch.wake_reader()  # someone else reads, or the channel is finished: not the loop

    def forget(self, ch: Any) -> None:
        fd = self.readers.pop(ch, None)
        if fd is not None:
            loop = self._loop()
            if loop is not None:
                loop.remove_reader(fd)
            os.close(fd)

    def _closed_elsewhere(self, ch: Any) -> None:
        """From the thread that closed ``ch``: stop watching it, on the loop's thread."""
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the loop is gone")
            loop.call_soon_threadsafe(self.forget, ch)
        except RuntimeError:  # the loop is closed: its selector is gone, only the fd is left
            fd = self.readers.pop(ch, None)
            if fd is not None:
                os.close(fd)

    # -- inbox ---------------------------------------------------------------------------

    def post(self, future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
        if threading.get_ident() == self.thread:
            try:
                _settle(future, value, exc)
            except RuntimeError:  # the loop is closed; nobody is waiting any more
                pass
            return
        self.items.append((future, value, exc))
        if not self.scheduled:
            self.scheduled = True
            loop = self._loop()
            try:
                if loop is None:
                    raise RuntimeError("the loop is gone")
                loop.call_soon_threadsafe(self.drain)
            except RuntimeError:  # the loop is closed; nobody is waiting any more
                self.items.clear()

    def drain(self) -> None:
        self.scheduled = False
        items = self.items
        while items:
            _settle(*items.popleft())


def _close_fds(readers: dict[Any, int]) -> None:
    for fd in readers.values():
        try:
            os.close(fd)
        except OSError:
            pass
    readers.clear()


_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()


def _loop_state(loop: asyncio.AbstractEventLoop) -> _LoopState:
    """This loop's state (called on the loop's thread, so no lock is needed to create it)."""
    state = _states.get(loop)
    if state is None:
        state = _states[loop] = _LoopState(loop)
    return state


def _settle(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


class AsyncFace(AsyncMappingMixin):
    """Awaitable operations on a pool or a view of one (``_api``). The public class,
    :class:`~poolbridge.AsyncPool` (_pool.py), adds the constructor that makes a new pool."""

    __slots__ = ("_api", "_owned")

    def __init__(self, *, _api: _Api, _owned: bool = False) -> None:
        self._owned = _owned
        self._api: _Api = _api

    @property
    def pool(self) -> Pool:
        """The synchronous pool behind this face (same workers, same sessions)."""
        return self._api._pool

    def _arun(self, req: _Req) -> asyncio.Future[Any]:
        op, ref, fields, decode = req
        api = self._api
        pool = api._pool
        router = pool._supervisor
        slot, req_id, data = api._prepare(op, ref, fields)
        pool._flush_discards()
        loop = asyncio.get_running_loop()
        state = _loop_state(loop)
        sink = _LoopSink(state, loop, decode)
        if router.ready(slot) and router.mover is None:
            channel = router.send_now(slot, req_id, data, sink) or router.send(
                slot, req_id, data, sink, lead=True, block=api._opts.block
            )
            state.watch(loop, channel)  # before the loop runs again: the reply cannot be missed
            self._sent(sink, channel, req_id, slot, op)
        else:
            # The slot is restarting or at its in-flight bound, or a resize is moving sessions:
            # waiting for it must not block the loop, so that (rare) wait happens on a thread.
            def sent(done: asyncio.Future[Any]) -> None:
                if done.cancelled() or done.exception() is not None:
                    _settle(sink.future, None, done.exception() or asyncio.CancelledError())
                else:
                    self._sent(sink, done.result(), req_id, slot, op)

            sending = loop.run_in_executor(
                None, lambda: router.send(slot, req_id, data, sink, block=api._opts.block)
            )
            sending.add_done_callback(sent)
        return sink.future

    def _sent(self, sink: _LoopSink, channel: Any, req_id: int, slot: int, op: str) -> None:
        future = sink.future
        if future.cancelled():  # cancelled while a thread was sending it
            self._cancelled(sink, channel, req_id, op)
            return
        future._target = (self, sink, channel, req_id, op)
        timeout = self._api._opts.timeout
        if timeout is not None and not sink.future.done():
            handle = sink.future.get_loop().call_later(timeout, self._expire, sink, channel, req_id, slot, op)
            sink.future.add_done_callback(lambda _: handle.cancel())

    def _cancelled(self, sink: _LoopSink, channel: Any, req_id: int, op: str) -> None:
        """A sent request's await was cancelled: the worker never runs it if it has not started
        it; if it has, its reply is late (dropped)."""
        if not channel.try_cancel(req_id, sink.seq):
            channel.pending.abandon(req_id, Late(self._api._late(op, sink.decode)))

    def _expire(self, sink: _LoopSink, channel: Any, req_id: int, slot: int, op: str) -> None:
        if not give_up(self._api, channel, req_id, slot, op, sink.decode):
            return  # the reply is already on its way to the loop
        _settle(sink.future, None, CallTimeoutError(f"{op} did not finish within {self._api._opts.timeout}s"))

    # -- operations --------------------------------------------------------------------

    def options(self, **options: Any) -> AsyncFace:
        """An async view whose calls use these options (see :meth:`Pool.options`)."""
        return type(self)(_api=self._api.options(**options))

    def session(self, session_id: str) -> AbstractContextManager[str]:
        return self._api.session(session_id)

    def slot_for(self, session_id: str) -> int:
        return self._api.slot_for(session_id)

    async def call(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await self._arun(self._api._req_call(fn, args, kwargs))

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Send now, await later: returns an ``asyncio.Future`` (must be called inside the loop)."""
        return self._arun(self._api._req_call(fn, args, kwargs))

    async def create(self, cls: Any, /, *args: Any, **kwargs: Any) -> Ref:
        return await self._arun(self._api._req_call(cls, args, kwargs, RET_REF))  # type: ignore[no-any-return]

    async def getattr(self, target: str | Ref, name: str | None = None) -> Any:
        return await self._arun(self._api._req_getattr(target, name))

    async def setattr(self, ref: Ref, name: str, value: Any) -> None:
        await self._arun(self._api._req_setattr(ref, name, value))

    async def method(self, ref: Ref, name: str, /, *args: Any, **kwargs: Any) -> Any:
        return await self._arun(self._api._req_method(ref, name, args, kwargs))

    async def helper(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        return await self._arun(self._api._req_helper(name, args, kwargs))

    async def release(self, ref: Ref) -> None:
        await self._arun(self._api._req_release(ref))
        ref._released = True

    async def close_session(self, session_id: str | None = None) -> int:
        api = self._api if session_id is None else self._api.options(session=session_id)
        return await type(self)(_api=api)._arun(api._req_close_session())  # type: ignore[no-any-return]

    def stream(self, fn: Any, /, *args: Any, **kwargs: Any) -> AsyncStream:
        """``async for item in pool.stream(fn, ...)`` — the generator runs in the session's worker."""
        return AsyncStream(self, fn, args, kwargs)

    async def stats(self) -> PoolStats:
        return await asyncio.get_running_loop().run_in_executor(None, self.pool.stats)

    async def resize(self, workers: int, *, on_unmovable: str = "lose", timeout: float = 60.0) -> Any:
        """:meth:`Pool.resize`, run off the event loop; returns its :class:`ResizeRecord`."""
        pool = self.pool
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: pool.resize(workers, on_unmovable=on_unmovable, timeout=timeout)
        )

    async def aclose(self, cancel: bool = False) -> None:
        """Close the pool if this face owns it (without blocking the loop)."""
        if self._owned:
            await asyncio.get_running_loop().run_in_executor(None, lambda: self.pool.close(cancel=cancel))

    async def __aenter__(self) -> AsyncFace:
        router = self.pool._supervisor
        if router.closing:
            raise router.closed_error()
        return self

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        await self.aclose(cancel=exc_type is not None)  # as Pool.__exit__

    def pids(self) -> list[int]:
        """The current worker pid of every slot, by slot."""
        return self.pool.pids()

    @property
    def closed(self) -> bool:
        return self.pool.closed

    def __repr__(self) -> str:
        owner = "" if self._owned else " (view)"
        return f"<AsyncPool{owner} {describe_pool(self.pool)}>"


class AsyncStream(AsyncIterator[Any]):
    """``async for`` over a worker-side generator, one round trip per batch, next batch prefetched."""

    def __init__(self, apool: AsyncFace, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._apool = apool
        self._open = (fn, args, kwargs)
        self._key: WireRef | None = None
        self._items: list[Any] = []
        self._pos = 0
        self._done = False
        self._closed = False
        self._next: asyncio.Future[Any] | None = None
        self._batch = apool._api._opts.batch

    @property
    def session_id(self) -> str | None:
        return self._key.session_id if self._key is not None else None

    async def _start(self) -> None:
        fn, args, kwargs = self._open
        api = self._apool._api

        def make(_api: _Api, key: WireRef, items: list[Any], done: bool, batch: int) -> tuple[WireRef, list[Any], bool]:
            return key, items, done

        self._key, self._items, self._done = await self._apool._arun(api._req_stream_open(fn, args, kwargs, make))
        self._prefetch()

    def _prefetch(self) -> None:
        if not self._done and self._key is not None:
            self._next = self._apool._arun(self._apool._api._req_stream_next(self._key, self._batch))

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        if self._key is None:
            await self._start()
        while True:
            if self._pos < len(self._items):
                item = self._items[self._pos]
                self._pos += 1
                return item
            if self._done or self._next is None:
                self._closed = True
                raise StopAsyncIteration
            pending, self._next = self._next, None
            try:
                self._items, self._done = await pending
            except BaseException:
                self._done = self._closed = True
                if self._key is not None:  # do not leave the generator suspended in the worker
                    self._apool._api._pool._discard(self._key.key(), "stream_close")
                raise
            self._pos = 0
            self._prefetch()

    async def aclose(self) -> None:
        """Close the generator in the worker (its ``finally`` runs). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._items, self._pos = [], 0  # a closed stream yields nothing more
        if self._key is None or self._done:
            return
        self._done = True
        if self._next is not None:
            pending, self._next = self._next, None
            try:
                await pending
            except Exception:  # noqa: S110 - the close below reports what matters
                pass
        try:
            await self._apool._arun(self._apool._api._req_stream_close(self._key))
        except (RefNotFoundError, SessionLostError):
            pass  # already gone in the worker (session closed or expired, worker restarted)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Abandoned (``async for ... : break``, an exception): close the generator in the worker,
        # as a dropped sync Stream does. Only queued here; sent with the pool's next request.
        if not self._closed and not self._done and self._key is not None:
            try:
                self._apool._api._pool._discard(self._key.key(), "stream_close")
            except Exception:  # noqa: S110 - interpreter shutdown
                pass
