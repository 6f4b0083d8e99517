"""Parent side: ``map`` / ``imap`` / ``starmap`` (sync and async) and ``broadcast``.

::

    input iterable ──pull (lazily)──▶ buffer per key ──full──▶ chunk = one `call` of
      (items, one at a time)            key: a session,        poolbridge._mapwork.apply_chunk
                                        or None (spread)       in that session's worker
                                                                        │
    consumer ◀── next(): reorder (ordered) ◀── completed chunks ◀── PoolFuture callbacks
       │                                        (any thread → queue)
       └── each next() pulls more input while the window allows

*Keys.* With ``session=`` a string (or a view's ``options(session=...)``, or the context session),
every item has that key: one session, run in order in one worker. With ``session=`` a function,
the key of an item is ``session(item)``: items of one session run in order in that session's worker
(chunks of one session are sent in order on one channel, and a worker runs its requests in order),
different sessions in parallel. Without any session the key is ``None`` and each chunk goes to the
least-loaded slot, in the per-slot session of :func:`~poolbridge._session.slot_sessions`.

*Bounds.* At most ``buffersize`` chunks are in flight; at most ``buffersize x chunksize`` items are
taken from the input and not yet yielded (pulled, buffered, in flight, or waiting to be yielded in
order). Input is pulled only inside ``next()``, so an infinite iterator costs flat memory.

*Progress* is guaranteed by two rules applied before every wait: in order, the buffer holding the
next item to yield is sent at once; and nothing in flight means the oldest buffer is sent.

*Chunk size.* Given, or from the input's length (``len / (4 x workers)``, as ``multiprocessing``),
or adaptive for an unsized input: the worker reports how long each chunk took, and the next chunks
aim at ``_TARGET_SECONDS`` each (from 1 item up to ``_MAX_CHUNK``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import importlib
import itertools
import math
import queue
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._errors import PoolClosedError
from ._mapwork import CHUNK_FN
from ._protocol import WireRef, pack_plain
from ._replies import rebuild_error
from ._session import current_context_session, slot_sessions

if TYPE_CHECKING:
    from ._pool import Pool, _Api

__all__ = ["AsyncMapIterator", "MapIterator", "MappingMixin"]

_TARGET_SECONDS = 0.01  # long enough to amortise a round trip (~100 µs) 100x, short enough to balance
_MAX_CHUNK = 4096  # for unsized inputs: bounds the memory of one chunk and of the window
_MAX_VIEWS = 1024  # session views cached per map; past it the cache starts over


class _Progress:
    """``progress=True`` (tqdm), a callable ``progress(done, total)``, or nothing."""

    __slots__ = ("bar", "callback", "done", "total")

    def __init__(self, progress: Any, total: int | None) -> None:
        self.done = 0
        self.total = total
        self.bar: Any = None
        self.callback: Callable[[int, int | None], Any] | None = None
        if progress is True:
            try:
                tqdm = importlib.import_module("tqdm")
            except ImportError:
                raise ImportError(
                    "progress=True needs tqdm (pip install 'poolbridge[progress]'); "
                    "or pass a callable progress(done, total)"
                ) from None
            self.bar = tqdm.tqdm(total=total, unit="item")
        elif callable(progress):
            self.callback = progress
        elif progress not in (None, False):
            raise TypeError(f"progress must be True, False, None or a callable, not {type(progress).__name__}")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            bar, self.bar = self.bar, None
            bar.close()


class _Chunk:
    __slots__ = ("future", "indices", "slot")

    def __init__(self, indices: range | list[int], slot: int) -> None:
        self.indices = indices
        self.slot = slot
        self.future: concurrent.futures.Future[Any] | None = None


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


_runs: weakref.WeakKeyDictionary[Pool, weakref.WeakSet[_MapRun]] = weakref.WeakKeyDictionary()


def cancel_runs(pool: Pool) -> None:
    """Stop every map of ``pool``: nothing more is sent, and chunks not yet started never run."""
    for run in list(_runs.get(pool, ())):
        run.cancel()


class _MapRun:
    """The engine shared by the sync and async iterators. It never waits: completed chunks are
    handed to it (``collect``) by whoever waited for them."""

    def __init__(
        self,
        api: _Api,
        fn: Any,
        items: Iterator[Any],
        *,
        star: bool,
        session: Any,
        chunksize: int | None,
        ordered: bool,
        buffersize: int | None,
        progress: Any,
        total: int | None,
        on_done: Callable[[_Chunk], Any],
    ) -> None:
        pool = api._pool
        workers = pool.workers
        self._api = api
        self._fn = api._fn(fn)
        if isinstance(fn, WireRef) and session is None:
            session = fn.session_id  # a callable ref runs in its own session
        if session is None:
            session = api._opts.session or current_context_session()
        if session is not None and not callable(session):
            api = api.options(session=session)  # validated once; every item has this key
        self._key = session if callable(session) else None
        self._spread = session is None
        self._views: dict[Any, Any] = {}
        if self._spread:
            self._slot_views = [api.options(session=sid) for sid in slot_sessions(workers)]
            self._slot_load = [0] * workers
        else:
            self._fixed_view = api
        self._items = items
        self._star = star
        self._ordered = ordered
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be at least 1, got {chunksize}")
        if buffersize is not None and buffersize < 1:
            raise ValueError(f"buffersize must be at least 1, got {buffersize}")
        self._fixed_chunk = chunksize
        if chunksize is None and total is not None and self._spread:
            self._fixed_chunk = max(1, math.ceil(total / (4 * workers)))
        self._chunk = self._fixed_chunk or 1
        self._per_item: float | None = None  # worker seconds per item, smoothed
        self._window = buffersize or 4 * workers
        self._progress = _Progress(progress, total)
        self._on_done = on_done
        # state
        self._next_index = 0
        self._held = 0  # pulled and not yet yielded
        self._buffers: dict[Any, tuple[list[int], list[Any]]] = {}
        self._in_flight: dict[int, _Chunk] = {}  # id(chunk) -> chunk
        # Completed results not yet yielded: runs of consecutive items by their first index
        # (ordered, one key), single items by index (ordered, keyed), or in completion order.
        self._segments: dict[int, tuple[list[Any], BaseException | None]] = {}
        self._results: dict[int, tuple[Any, BaseException | None]] = {}
        self._ready: collections.deque[tuple[list[Any], BaseException | None]] = collections.deque()
        self._head = 0
        self._exhausted = False
        self.closed = False
        _runs.setdefault(pool, weakref.WeakSet()).add(self)

    # -- sending ---------------------------------------------------------------------------

    def pump(self) -> bool:
        """Pull input and send chunks as far as the bounds allow, then make sure of progress.

        Returns whether there is a chunk to wait for; if not, the input has just ended (or an
        outcome is ready) and the caller looks again without waiting.
        """
        if self.closed:
            return False
        if self._key is None:
            self._pump_runs()
        else:
            self._pump_keyed()
        if self._in_flight:
            return True
        if self.finished or self._results.get(self._head) is not None or self._segments or self._ready:
            return False
        raise AssertionError(f"map stalled: {self._held} items held, none in flight")  # pragma: no cover

    def _pump_runs(self) -> None:
        # One key for every item: a chunk is a run of consecutive items, pulled in one islice.
        while not self._exhausted and len(self._in_flight) < self._window:
            n = min(self._chunk, self._window * self._chunk - self._held)
            if n <= 0:
                break
            got = list(itertools.islice(self._items, n))
            if len(got) < n:
                self._exhausted = True
            if not got:
                break
            if self._star:
                got = [list(args) for args in got]
            start = self._next_index
            self._next_index += len(got)
            self._held += len(got)
            self._send(None, range(start, self._next_index), got)

    def _pump_keyed(self) -> None:
        buffers = self._buffers
        key_of = self._key
        assert key_of is not None
        star = self._star
        items = self._items
        while not self._exhausted:
            if len(self._in_flight) >= self._window:
                break
            if self._held >= self._window * self._chunk:
                for key in list(buffers):  # full: send what is held, in every session at once
                    self._send(key, *buffers.pop(key))
                break
            try:
                item = next(items)
            except StopIteration:
                self._exhausted = True
                break
            if star:
                item = list(item)
                key = key_of(*item)
            else:
                key = key_of(item)
            buf = buffers.get(key)
            if buf is None:
                buf = buffers[key] = ([], [])
            buf[0].append(self._next_index)
            buf[1].append(item)
            self._next_index += 1
            self._held += 1
            if len(buf[0]) >= self._chunk:
                self._send(key, *buffers.pop(key))
        if self._exhausted:
            for key in list(buffers):
                self._send(key, *buffers.pop(key))
        elif buffers:
            oldest = next(iter(buffers))
            if not self._in_flight or (self._ordered and buffers[oldest][0][0] == self._head):
                self._send(oldest, *buffers.pop(oldest))

    def _send(self, key: Any, indices: range | list[int], items: list[Any]) -> None:
        if self._spread:
            load = self._slot_load
            slot = load.index(min(load))
            view = self._slot_views[slot]
            load[slot] += 1
        else:
            slot = -1
            view = self._fixed_view if key is None else self._view(key)
        chunk = _Chunk(indices, slot)
        self._in_flight[id(chunk)] = chunk
        chunk.future = view.submit(CHUNK_FN, self._fn, items, self._star)
        chunk.future.add_done_callback(functools.partial(_done, self._on_done, chunk))

    def _view(self, key: Any) -> Any:
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            view = self._views[key] = self._api.options(session=key)
        return view

    # -- receiving ---------------------------------------------------------------------------

    def collect(self, chunk: _Chunk) -> None:
        """Take in a completed chunk (in the consumer's thread)."""
        if self._in_flight.pop(id(chunk), None) is None:
            return
        if chunk.slot >= 0:
            self._slot_load[chunk.slot] -= 1
        future = chunk.future
        assert future is not None
        error: BaseException | None = None
        try:
            values, fields, seconds = future.result(0)
        except BaseException as exc:  # the chunk as a whole: worker crash, timeout, cancelled
            values, error = [], exc
        else:
            if fields is not None:
                error = rebuild_error(pack_plain(fields))
            self._adapt(len(values) + (fields is not None), seconds)
            self._progress.update(len(values))
        if not self._ordered:
            self._ready.append((values, error))
        elif type(chunk.indices) is range:
            self._segments[chunk.indices.start] = (values, error)
        else:
            results = self._results
            for index, value in zip(chunk.indices, values, strict=False):
                results[index] = (value, None)
            if error is not None:
                results[chunk.indices[len(values)]] = (None, error)

    def _adapt(self, n: int, seconds: float) -> None:
        if self._fixed_chunk is not None or n == 0:
            return
        per_item = seconds / n
        self._per_item = per_item if self._per_item is None else 0.5 * (self._per_item + per_item)
        self._chunk = max(1, min(_MAX_CHUNK, int(_TARGET_SECONDS / max(self._per_item, 1e-9))))

    def take(self) -> tuple[list[Any], BaseException | None] | None:
        """The next results to yield, in order, and the error that follows them (or None)."""
        if not self._ordered:
            if not self._ready:
                return None
            segment = self._ready.popleft()
        elif self._segments:
            found = self._segments.pop(self._head, None)
            if found is None:
                return None
            segment = found
        else:
            results = self._results
            values: list[Any] = []
            error = None
            head = self._head
            while head in results:
                value, error = results.pop(head)
                if error is not None:
                    break
                values.append(value)
                head += 1
            if not values and error is None:
                return None
            segment = (values, error)
        self._head += len(segment[0]) + (segment[1] is not None)
        self._held -= len(segment[0]) + (segment[1] is not None)
        return segment

    @property
    def finished(self) -> bool:
        return self._exhausted and self._held <= 0

    # -- ending ------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Send nothing more; chunks the workers have not started never run."""
        if not self.closed:
            self.abandon()
            for chunk in list(self._in_flight.values()):
                if chunk.future is not None:
                    chunk.future.cancel()

    def abandon(self) -> None:
        """Send nothing more, without any I/O (safe from ``__del__``)."""
        self.closed = True
        self._buffers.clear()
        self._segments.clear()
        self._results.clear()
        self._ready.clear()
        self._progress.close()


def _done(hook: Callable[[_Chunk], Any], chunk: _Chunk, _future: Any) -> None:
    hook(chunk)


class MapIterator(Iterator[Any]):
    """The iterator of ``pool.map`` / ``imap`` / ``starmap``: results as they are consumed.

    An exception raised by ``fn`` is raised when its item is reached, and ends the iteration.
    ``close()`` (or leaving ``with``) cancels what has not started.
    """

    def __init__(self, api: _Api, fn: Any, items: Iterator[Any], timeout: float | None, **kwargs: Any) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._queue: queue.SimpleQueue[_Chunk] = queue.SimpleQueue()
        self._run = _MapRun(api, fn, items, on_done=self._queue.put, **kwargs)
        try:
            self._run.pump()  # work starts at the call, as with concurrent.futures
        except BaseException:
            self._run.cancel()
            raise
        self._gen = self._generate()

    def _generate(self) -> Generator[Any, None, None]:
        run = self._run
        try:
            while True:
                segment = run.take()
                if segment is not None:
                    values, error = segment
                    yield from values  # the per-item path runs in C: no Python frame per item
                    if error is not None:
                        raise error
                    continue
                if run.closed or run.finished:
                    run.abandon()
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
        # The generator itself: `for` and list() then run at C speed. It is this iterator's own
        # state, so mixing next(it) and `for x in it` reads one sequence.
        return self._gen

    def __next__(self) -> Any:
        return next(self._gen)

    def _wait(self) -> _Chunk:
        if self._deadline is None:
            return self._queue.get()
        try:
            return self._queue.get(timeout=max(0.0, self._deadline - time.monotonic()))
        except queue.Empty:
            raise concurrent.futures.TimeoutError(f"map results not ready within {self._timeout}s") from None

    def close(self) -> None:
        """Stop: nothing more is sent, and chunks the workers have not started never run."""
        self._run.cancel()
        self._gen.close()

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

    def __init__(self, api: _Api, fn: Any, items: Iterator[Any], timeout: float | None, **kwargs: Any) -> None:
        self._timeout = timeout
        self._deadline: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._completed: collections.deque[_Chunk] = collections.deque()
        self._event: asyncio.Event | None = None
        self._args = (api, fn, items, kwargs)
        self._run: _MapRun | None = None
        self._values: list[Any] = []
        self._pos = 0
        self._error: BaseException | None = None

    def _on_done(self, chunk: _Chunk) -> None:  # any thread
        self._completed.append(chunk)
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _start(self) -> _MapRun:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        api, fn, items, kwargs = self._args
        if self._timeout is not None:
            self._deadline = self._loop.time() + self._timeout
        self._run = _MapRun(api, fn, items, on_done=self._on_done, **kwargs)
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
                    raise StopAsyncIteration
                if not run.pump():
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
        function of the item (``session=lambda row: row["user"]``: items of one session in order in
        its worker, sessions in parallel); default: the view's or the context session if any, else
        the items are spread over all workers. ``chunksize``: items per request (default: from
        ``len()``, or adaptive). ``buffersize``: chunks in flight (default 4 per worker); the input is
        pulled lazily, at most ``buffersize x chunksize`` items ahead of the consumer. ``timeout``:
        seconds from this call after which ``next()`` raises ``TimeoutError``. ``progress``: ``True``
        for a tqdm bar (``pip install 'poolbridge[progress]'``) or a callable ``progress(done, total)``.
"""


class MappingMixin:
    """``map``, ``imap``, ``starmap`` and ``broadcast`` for :class:`Pool` and its option views."""

    __slots__ = ()

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
    ) -> MapIterator:
        """``fn(*args)`` for the items of ``zip(*iterables)``, in order — like ``Executor.map``."""
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        star = len(iterables) > 1
        items = iter(zip(*iterables, strict=False)) if star else iter(iterables[0])
        return MapIterator(self._map_api(), fn, items, timeout, star=star, session=session, chunksize=chunksize,
                           ordered=True, buffersize=buffersize, progress=progress, total=_length(iterables))

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
    ) -> MapIterator:
        """``fn(item)`` for each item; ``ordered=False`` yields results as they complete."""
        return MapIterator(self._map_api(), fn, iter(iterable), timeout, star=False, session=session,
                           chunksize=chunksize, ordered=ordered, buffersize=buffersize, progress=progress,
                           total=_length((iterable,)))

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
    ) -> MapIterator:
        """``fn(*args)`` for each ``args`` of ``iterable``, in order (a session function gets ``*args``)."""
        return MapIterator(self._map_api(), fn, iter(iterable), timeout, star=True, session=session,
                           chunksize=chunksize, ordered=True, buffersize=buffersize, progress=progress,
                           total=_length((iterable,)))

    map.__doc__ = (map.__doc__ or "") + _MAP_DOC
    imap.__doc__ = (imap.__doc__ or "") + _MAP_DOC
    starmap.__doc__ = (starmap.__doc__ or "") + _MAP_DOC

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
