"""Parent side: the faces of mapping — ``pool.map`` / ``imap`` / ``starmap`` as iterators (sync
and ``async for``), and ``broadcast``. The engine they drive is in _mapengine.py.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import queue
import time
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._errors import PoolClosedError
from ._mapengine import Chunk, MapRun, Take, length_of, taker
from ._session import slot_sessions

if TYPE_CHECKING:
    from ._api import _Api

__all__ = ["AsyncMapIterator", "AsyncMappingMixin", "MapIterator", "MappingMixin", "broadcast_futures"]


class MapIterator(Iterator[Any]):
    """The iterator of ``pool.map`` / ``imap`` / ``starmap``: results as they are consumed.

    An exception raised by ``fn`` is raised when its item is reached, and ends the iteration.
    ``close()`` (or leaving ``with``) cancels what has not started.
    """

    def __init__(self, api: _Api, fn: Any, take: Take, timeout: float | None, **kwargs: Any) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._queue: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
        self._run = MapRun(api, fn, take, on_done=self._queue.put, **kwargs)
        try:
            self._run.pump()  # work starts at the call, as with concurrent.futures
        except BaseException:
            self._run.cancel()
            raise
        self._before = 0  # items yielded before the current segment (for __length_hint__)
        self._segments = self._generate()
        # Items come out of chain() in C: resuming a generator per item (even `yield from`)
        # would cost more than the rest of a tiny function's map. The generator below runs once
        # per segment (a chunk's results, or a run of them), when chain() has used up the last.
        self._items: Iterator[Any] = itertools.chain.from_iterable(self._segments)

    def _generate(self) -> Generator[list[Any], None, None]:
        run = self._run
        try:
            while True:
                segment = run.take()
                if segment is not None:
                    values, error = segment
                    self._before = run._head - len(values) - (error is not None)
                    yield values
                    if error is not None:
                        raise error
                    continue
                if run.closed or run.finished:
                    run.abandon()
                    if run.interrupted is not None:
                        raise run.interrupted
                    return
                if not run.pump():
                    continue
                run.collect(self._wait())
                while True:  # whatever else has completed meanwhile
                    try:
                        run.collect(self._queue.get_nowait())
                    except queue.Empty:
                        break
        except GeneratorExit:
            # close() or garbage collection: no I/O here (a collection can run inside a send on
            # this thread); close() has cancelled what it could before.
            run.abandon()
            raise
        except BaseException:
            run.cancel()
            raise

    def __iter__(self) -> Iterator[Any]:
        # The chain itself: `for` and list() then run at C speed. It is this iterator's own
        # state, so mixing next(it) and `for x in it` reads one sequence.
        return self._items

    def __next__(self) -> Any:
        return next(self._items)

    def __length_hint__(self) -> int:
        # list() asks the iterable (this object), then iterates what __iter__ gave: with the
        # input's length it allocates the result once instead of growing it (and copying it)
        # some eighty times for 100k items. An upper bound: it counts the current segment whole.
        total = self._run.total
        if total is None or self._run.closed:
            return 0
        return max(0, total - self._before)

    def _wait(self) -> Chunk:
        if self._deadline is None:
            return self._queue.get()
        try:
            return self._queue.get(timeout=max(0.0, self._deadline - time.monotonic()))
        except queue.Empty:
            raise concurrent.futures.TimeoutError(f"map results not ready within {self._timeout}s") from None

    def close(self) -> None:
        """Stop: nothing more is sent, and chunks the workers have not started never run."""
        self._run.cancel()
        self._segments.close()
        self._items = iter(())  # drop what is left of the current segment too

    def __enter__(self) -> MapIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        run = self._run
        state = "closed" if run.closed else "done" if run.finished else "running"
        return f"<MapIterator {state} taken={run._next_index} in_flight={len(run._in_flight)}>"


class AsyncMapIterator(AsyncIterator[Any]):
    """``async for`` over ``AsyncPool.map`` / ``imap`` / ``starmap``: the same engine, awaited."""

    def __init__(self, api: _Api, fn: Any, take: Take, timeout: float | None, **kwargs: Any) -> None:
        self._timeout = timeout
        self._deadline: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._completed: collections.deque[Chunk] = collections.deque()
        self._event: asyncio.Event | None = None
        self._args = (api, fn, take, kwargs)
        self._run: MapRun | None = None
        self._values: list[Any] = []
        self._pos = 0
        self._error: BaseException | None = None

    def _on_done(self, chunk: Chunk) -> None:  # any thread
        self._completed.append(chunk)
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _start(self) -> MapRun:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        api, fn, take, kwargs = self._args
        if self._timeout is not None:
            self._deadline = self._loop.time() + self._timeout
        self._run = MapRun(api, fn, take, on_done=self._on_done, **kwargs)
        return self._run

    def __aiter__(self) -> AsyncMapIterator:
        return self

    async def __anext__(self) -> Any:
        if self._pos < len(self._values):
            value = self._values[self._pos]
            self._pos += 1
            return value
        run = self._run or self._start()
        try:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            while True:
                segment = run.take()
                if segment is not None:
                    self._values, self._error = segment
                    self._pos = 0
                    return await self.__anext__()
                if run.closed or run.finished:
                    if run.interrupted is not None:
                        interrupted, run.interrupted = run.interrupted, None
                        raise interrupted
                    raise StopAsyncIteration
                if not (run.pump() if self._router_ready() else await self._pump_off_loop(run)):
                    continue
                await self._wait()
                while self._completed:
                    run.collect(self._completed.popleft())
        except StopAsyncIteration:
            run.abandon()
            raise
        except BaseException:
            run.cancel()
            raise

    def _router_ready(self) -> bool:
        router = self._args[0]._pool._supervisor
        return all(router.ready(slot) for slot in range(router.n_slots))

    async def _pump_off_loop(self, run: MapRun) -> bool:
        # A slot is restarting or at its in-flight bound: sending may wait for it, which must not
        # block the loop (as AsyncPool does for single calls). The loop awaits it: no concurrent use.
        assert self._loop is not None
        return await self._loop.run_in_executor(None, run.pump)

    async def _wait(self) -> None:
        event = self._event
        assert event is not None and self._loop is not None
        while not self._completed:
            event.clear()
            if self._completed:
                return
            if self._deadline is None:
                await event.wait()
                continue
            try:
                await asyncio.wait_for(event.wait(), max(0.0, self._deadline - self._loop.time()))
            except asyncio.TimeoutError:
                raise concurrent.futures.TimeoutError(f"map results not ready within {self._timeout}s") from None

    async def aclose(self) -> None:
        """Stop: nothing more is sent, and chunks the workers have not started never run."""
        self._values, self._pos, self._error = [], 0, None
        if self._run is not None:
            self._run.cancel()

    async def __aenter__(self) -> AsyncMapIterator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# -- the methods on Pool, its option views and AsyncPool ------------------------------------------

_MAP_DOC = """
        ``session``: a session id (every item in that session, in order, in its one worker), or a
        function of the item returning a str or an int (``session=lambda row: row["user_id"]``):
        items of one session in order in its worker, sessions in parallel. Default: the view's or
        the context session if any, else the items are spread over all workers. ``chunksize``:
        items per request (default: from ``len()``, or adaptive). ``buffersize``: chunks in flight
        (default 4 per worker, 16 with a session function); the input is pulled lazily, at most
        ``buffersize x chunksize`` items ahead of the consumer. ``timeout``: seconds from this call
        after which ``next()`` raises ``TimeoutError``. ``progress``: ``True`` for a tqdm bar
        (``pip install 'poolbridge[progress]'``) or a callable ``progress(done, total)``.
"""


ItT = TypeVar("ItT", MapIterator, AsyncMapIterator)


class _MapFaces(Generic[ItT]):
    """``map``, ``imap`` and ``starmap``, shared by the sync and async faces (which iterator they
    return is the only difference: ``_iterate``)."""

    __slots__ = ()

    def _iterate(self, fn: Any, take: Take, timeout: float | None, **kwargs: Any) -> ItT:
        raise NotImplementedError

    def map(
        self,
        fn: Any,
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        session: Any = None,
        buffersize: int | None = None,
        progress: Any = None,
    ) -> ItT:
        """``fn(*args)`` for the items of ``zip(*iterables)``, in order — like ``Executor.map``."""
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        star = len(iterables) > 1
        take = taker(zip(*iterables, strict=False) if star else iterables[0])
        return self._iterate(fn, take, timeout, star=star, session=session, chunksize=chunksize,
                             ordered=True, buffersize=buffersize, progress=progress, total=length_of(iterables))

    def imap(
        self,
        fn: Any,
        iterable: Iterable[Any],
        /,
        ordered: bool = True,
        *,
        timeout: float | None = None,
        chunksize: int | None = None,
        session: Any = None,
        buffersize: int | None = None,
        progress: Any = None,
    ) -> ItT:
        """``fn(item)`` for each item; ``ordered=False`` yields results as they complete."""
        return self._iterate(fn, taker(iterable), timeout, star=False, session=session, chunksize=chunksize,
                             ordered=ordered, buffersize=buffersize, progress=progress,
                             total=length_of((iterable,)))

    def starmap(
        self,
        fn: Any,
        iterable: Iterable[Iterable[Any]],
        /,
        *,
        timeout: float | None = None,
        chunksize: int | None = None,
        session: Any = None,
        buffersize: int | None = None,
        progress: Any = None,
    ) -> ItT:
        """``fn(*args)`` for each ``args`` of ``iterable``, in order (a session function gets ``*args``)."""
        return self._iterate(fn, taker(iterable), timeout, star=True, session=session, chunksize=chunksize,
                             ordered=True, buffersize=buffersize, progress=progress,
                             total=length_of((iterable,)))

    map.__doc__ = (map.__doc__ or "") + _MAP_DOC
    imap.__doc__ = (imap.__doc__ or "") + _MAP_DOC
    starmap.__doc__ = (starmap.__doc__ or "") + _MAP_DOC


class MappingMixin(_MapFaces[MapIterator]):
    """``map``, ``imap``, ``starmap`` and ``broadcast`` for :class:`Pool` and its option views."""

    __slots__ = ()

    def _iterate(self, fn: Any, take: Take, timeout: float | None, **kwargs: Any) -> MapIterator:
        return MapIterator(self._map_api(), fn, take, timeout, **kwargs)

    def broadcast(self, fn: Any, /, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """Run ``fn(*args, **kwargs)`` once in every worker: ``{slot: result}``.

        A slot whose call failed (the function raised, the worker died, the view's ``timeout``
        passed) has the exception as its value instead of a result; one slot's failure never
        stops the others'. Each slot's call runs in that slot's own broadcast session.
        """
        futures = broadcast_futures(self._map_api(), fn, args, kwargs)
        out: dict[int, Any] = {}
        for slot, future in futures.items():
            if isinstance(future, BaseException):
                out[slot] = future
                continue
            try:
                out[slot] = future.result()
            except Exception as exc:
                out[slot] = exc
        return out

    def _map_api(self) -> _Api:
        return self  # type: ignore[return-value]


class AsyncMappingMixin(_MapFaces[AsyncMapIterator]):
    """``map``, ``imap``, ``starmap`` (``async for``) and ``broadcast`` for :class:`AsyncPool`."""

    __slots__ = ()
    _api: _Api

    def _iterate(self, fn: Any, take: Take, timeout: float | None, **kwargs: Any) -> AsyncMapIterator:
        return AsyncMapIterator(self._api, fn, take, timeout, **kwargs)

    async def broadcast(self, fn: Any, /, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """As :meth:`Pool.broadcast`, awaited: ``{slot: result or exception}``."""
        futures = broadcast_futures(self._api, fn, args, kwargs)
        slots = list(futures)
        outcomes = await asyncio.gather(*(_aresult(futures[slot]) for slot in slots), return_exceptions=True)
        return dict(zip(slots, outcomes, strict=True))


async def _aresult(future: Any) -> Any:
    if isinstance(future, BaseException):
        raise future
    return await asyncio.wrap_future(future)


def broadcast_futures(api: _Api, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int, Any]:
    """One submitted call per slot: ``{slot: future, or the exception that prevented sending}``."""
    if api._pool.closed:
        raise PoolClosedError("the pool is closed")
    out: dict[int, Any] = {}
    for slot, sid in enumerate(slot_sessions(api._pool.workers)):
        try:
            out[slot] = api.options(session=sid).submit(fn, *args, **kwargs)
        except Exception as exc:
            out[slot] = exc
    return out
