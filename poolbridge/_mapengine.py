"""Parent side: the engine behind ``map`` / ``imap`` / ``starmap`` (its sync and async faces are
in _mapping.py): what is pulled from the input, how it is chunked, where each chunk goes, and how
results come back in order.

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

*Bounds.* At most ``buffersize`` chunks are in flight (default 4 per worker, 16 with a session
function); at most ``buffersize x chunksize`` items are
taken from the input and not yet yielded (pulled, buffered, in flight, or waiting to be yielded in
order). Input is pulled only inside ``next()``, so an infinite iterator costs flat memory.

*Liveness* is guaranteed by two rules applied before every wait: in order, the buffer holding the
next item to yield is sent at once; and nothing in flight means the oldest buffer is sent.

*Transport.* A chunk's items, and its results, travel as one pickle when they are builtin values
(:func:`~poolbridge._protocol.dumps_builtins`): pickling a list of plain values costs about half
of msgpack's per item, both ways. Anything else goes item by item through the value codec (refs,
big buffers, bytearray), so what the function and the consumer see is the same either way.

*Chunk size.* Given, or from the input's length (``len / (4 x workers)``, as ``multiprocessing``),
or adaptive for an unsized input: the worker reports how long each chunk took, and the next chunks
aim at ``_TARGET_SECONDS`` each (from 1 item up to ``_MAX_CHUNK``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import importlib
import itertools
import math
import pickle
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgpack

from ._protocol import EXT_PICKLE, OP_CALL, RET_VALUE, WireRef, dumps_any, dumps_builtins, pack_plain
from ._session import current_context_session, slot_sessions
from ._wire import rebuild_error

if TYPE_CHECKING:
    from ._api import _Api
    from ._pool import Pool

__all__ = ["Chunk", "MapRun", "Take", "cancel_runs", "length_of", "taker"]

#: What a chunk calls in its worker (child side, _mapwork.py): by dotted path, so the parent never
#: imports worker code.
CHUNK_FN = "poolbridge._mapwork.apply_chunk"
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


class Chunk:
    __slots__ = ("future", "indices", "key", "slot")

    def __init__(self, indices: range | list[int], slot: int, key: Any) -> None:
        self.indices = indices
        self.slot = slot
        self.key = key
        self.future: concurrent.futures.Future[Any] | None = None


#: ``take(n)``: the next ``n`` items of a map's input (fewer at its end), as a list.
Take = Callable[[int], list[Any]]


def taker(iterable: Iterable[Any]) -> Take:
    """What a map pulls its items with, made at the call (a non-iterable fails there):
    ``take(n)``, the next ``n`` items (fewer at the end) as a list. A list or tuple is sliced (one
    copy of its pointers); anything else goes through ``islice`` of its iterator, whose list grows
    by reallocation — about a third of a map's own cost of pulling 100k items."""
    if type(iterable) is list or type(iterable) is tuple:
        seq: Any = iterable
        taken = 0

        def take_slice(n: int) -> list[Any]:
            nonlocal taken
            got = seq[taken : taken + n]
            taken += len(got)
            return got if type(got) is list else list(got)

        return take_slice
    it = iter(iterable)
    return lambda n: list(itertools.islice(it, n))


def _no_more(n: int) -> list[Any]:
    return []


def pickled_once(fn: Any, threshold: int | None) -> Any:
    """The function as every chunk of a map sends it. A callable is pickled (cloudpickle) once
    here, not once per chunk — about a fifth of a chunk's cost in the caller — when its pickle
    fits in a frame (below the shared-memory threshold: no buffer of it travels apart); the
    codec writes the extension type as it is and the worker loads it per chunk as before. A
    dotted path, a callable ref, or a callable with a big pickle is sent as it is."""
    if isinstance(fn, str) or isinstance(fn, WireRef):
        return fn
    data = dumps_any(fn)
    if threshold is not None and len(data) >= threshold:
        return fn
    return msgpack.ExtType(EXT_PICKLE, data)


def length_of(iterables: tuple[Iterable[Any], ...]) -> int | None:
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


_drain: Callable[[Iterable[Any]], None] = collections.deque(maxlen=0).extend  # runs an iterator to its end, in C

_runs: weakref.WeakKeyDictionary[Pool, weakref.WeakSet[MapRun]] = weakref.WeakKeyDictionary()


def cancel_runs(pool: Pool) -> None:
    """Stop every map of ``pool``: nothing more is sent, and chunks not yet started never run."""
    for run in list(_runs.get(pool, ())):
        if not run.closed:
            run.interrupted = concurrent.futures.CancelledError("the pool was shut down with cancel_futures=True")
            run.cancel()


class MapRun:
    """The engine shared by the sync and async iterators. It never waits: completed chunks are
    handed to it (``collect``) by whoever waited for them."""

    def __init__(
        self,
        api: _Api,
        fn: Any,
        take: Take,
        *,
        star: bool,
        session: Any,
        chunksize: int | None,
        ordered: bool,
        buffersize: int | None,
        progress: Any,
        total: int | None,
        on_done: Callable[[Chunk], Any],
    ) -> None:
        pool = api._pool
        workers = pool.workers
        self._api = api
        threshold = pool._shm.threshold if pool._shm is not None else None
        self._fn = pickled_once(api._fn(fn), threshold)
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
        self._take = take
        self._star = star
        # Chunks as one pickle of builtins while they are (see _payload); a big one only when
        # no zero-copy views are asked for (the pickle would hide the buffers to view).
        self._pickling = True
        self._big = not api._opts.zero_copy
        self._threshold = threshold
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
        # Keyed maps hold a buffer per session: a wider default window lets each fill further
        # before the bound flushes them all (fewer, larger chunks; still a fixed bound).
        self._window = buffersize or (4 if self._key is None else 16) * workers
        self._progress = _Progress(progress, total)
        self.total = total
        self._on_done = on_done
        # state
        self._next_index = 0
        self._held = 0  # pulled and not yet yielded
        self._buffers: dict[Any, tuple[list[int], list[Any]]] = {}
        self._in_flight: dict[int, Chunk] = {}  # id(chunk) -> chunk
        # Completed results not yet yielded: runs of consecutive items by their first index
        # (ordered, one key), or in completion order (unordered). Ordered and keyed, ``_order``
        # holds the key of every item from the head to the last pulled, and ``_results`` each
        # key's results in its order (a key's chunks complete in the order they were sent: one
        # channel, one worker); the items before the oldest one not done are ready (see
        # _keyed_end), and the n of them are the next result of each of their n keys, in turn.
        self._segments: dict[int, tuple[list[Any], BaseException | None]] = {}
        self._order: list[Any] = []
        self._results: collections.defaultdict[Any, collections.deque[Any]] = collections.defaultdict(
            collections.deque
        )
        self._failed: dict[int, BaseException] = {}  # (keyed) the item whose function raised
        self._ready: collections.deque[tuple[list[Any], BaseException | None]] = collections.deque()
        self._head = 0
        self._exhausted = False
        self.closed = False
        #: Why the map stopped before its consumer did (raised at the consumer's next read).
        self.interrupted: BaseException | None = None
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
        if self.finished or self._segments or self._ready or self._head in self._failed or (
            self._order and self._keyed_end() > self._head
        ):
            return False
        raise AssertionError(f"map stalled: {self._held} items held, none in flight")  # pragma: no cover

    def _pump_runs(self) -> None:
        # One key for every item: a chunk is a run of consecutive items, pulled in one take.
        while not self._exhausted and len(self._in_flight) < self._window:
            n = min(self._chunk, self._window * self._chunk - self._held)
            if n <= 0:
                break
            got = self._take(n)
            if len(got) < n:
                self._end_input()
            if not got:
                break
            start = self._next_index
            self._next_index += len(got)
            self._held += len(got)
            self._send(None, range(start, self._next_index), got)

    def _pump_keyed(self) -> None:
        buffers = self._buffers
        key_of = self._key
        assert key_of is not None
        send = self._send
        while not self._exhausted and len(self._in_flight) < self._window:
            room = self._window * self._chunk - self._held
            if room <= 0:
                for key in list(buffers):  # full: send what is held, in every session at once
                    send(key, *buffers.pop(key))
                break
            # Pulled in batches (take, map: loops in C); a batch never passes the bound.
            batch = self._take(min(room, max(self._chunk, 64)))
            if not batch:
                self._end_input()
                break
            if self._star:
                keys = list(itertools.starmap(key_of, batch))
            else:
                keys = list(map(key_of, batch))
            start = self._next_index
            self._next_index += len(batch)
            self._held += len(batch)
            if self._ordered:
                self._order.extend(keys)
            self._group(keys, range(start, self._next_index), batch)
        if self._exhausted:
            for key in list(buffers):
                send(key, *buffers.pop(key))
        elif buffers:
            oldest = next(iter(buffers))
            if not self._in_flight or (self._ordered and buffers[oldest][0][0] == self._head):
                send(oldest, *buffers.pop(oldest))

    def _group(self, keys: list[Any], indices: range, batch: list[Any]) -> None:
        """Add a batch to the per-key buffers, sending each chunk that fills up. The batch is
        grouped by key in C (no Python per item); then, per key, its buffer is topped up to the
        chunk size and sent, full chunks go as they are, and the rest is the key's new buffer.
        Buffers stay in the order of their first item (the liveness rules read the oldest)."""
        by_key: collections.defaultdict[Any, list[int]] = collections.defaultdict(list)
        items_by_key: collections.defaultdict[Any, list[Any]] = collections.defaultdict(list)
        _drain(map(list.append, map(by_key.__getitem__, keys), indices))
        _drain(map(list.append, map(items_by_key.__getitem__, keys), batch))
        buffers = self._buffers
        chunk = self._chunk
        send = self._send
        fresh: list[Any] = []  # keys whose buffer starts in this batch
        for key, idx in by_key.items():
            items = items_by_key[key]
            buf = buffers.get(key)
            if buf is not None:
                need = max(0, chunk - len(buf[0]))  # (0: the chunk size has shrunk since)
                if len(idx) < need:
                    buf[0].extend(idx)
                    buf[1].extend(items)
                    continue
                del buffers[key]
                buf[0].extend(idx[:need])
                buf[1].extend(items[:need])
                send(key, *buf)
                idx, items = idx[need:], items[need:]
            full = len(idx) - len(idx) % chunk
            for i in range(0, full, chunk):
                send(key, idx[i : i + chunk], items[i : i + chunk])
            if full < len(idx):
                buffers[key] = (idx[full:], items[full:])
                fresh.append(key)
        if len(fresh) > 1:  # created in key order: put them in the order of their first item
            fresh.sort(key=lambda k: buffers[k][0][0])
            for key in fresh:
                buffers[key] = buffers.pop(key)

    def _send(self, key: Any, indices: range | list[int], items: list[Any]) -> None:
        if self._spread:
            load = self._slot_load
            slot = load.index(min(load))
            view = self._slot_views[slot]
            load[slot] += 1
        else:
            slot = -1
            view = self._fixed_view if key is None else self._view(key)
        chunk = Chunk(indices, slot, key)
        self._in_flight[id(chunk)] = chunk
        # Always a value (whatever the view's ret=): the chunk's results come back as a list.
        fields = [CHUNK_FN, [self._fn, self._payload(items), self._star, self._big], {}, RET_VALUE]
        chunk.future = view._submit(OP_CALL, None, fields, functools.partial(_chunk_value, view._value))
        chunk.future.add_done_callback(functools.partial(_done, self._on_done, chunk))

    def _payload(self, items: list[Any]) -> Any:
        """A chunk's items as sent: one pickle when they are builtin values (and the pickle is
        below the shared-memory threshold, or no zero-copy views are asked for), else the list,
        for the value codec (argument tuples of ``starmap`` as lists: no ext type per item)."""
        if self._pickling:
            packed = dumps_builtins(items)
            if packed is not None and (self._big or self._threshold is None or len(packed) < self._threshold):
                return packed
            self._pickling = False  # the next chunks are most likely of the same kinds
        return [list(args) for args in items] if self._star else items

    def _view(self, key: Any) -> Any:
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            # Session ids are strings; an int key (a user id) names the session of its decimal form.
            session = str(key) if type(key) is int else key
            view = self._views[key] = self._api.options(session=session)
        return view

    # -- receiving ---------------------------------------------------------------------------

    def collect(self, chunk: Chunk) -> None:
        """Take in a completed chunk (in the consumer's thread)."""
        # The future's done callback holds the chunk: dropping the future ends that cycle, so the
        # chunk, its future and the future's lock are freed now, not by a garbage collection
        # (which would walk every young list of results, 100k items for a map of 100k).
        future, chunk.future = chunk.future, None
        if self._in_flight.pop(id(chunk), None) is None or self.closed:
            return  # (closed: nobody will read it)
        if chunk.slot >= 0:
            self._slot_load[chunk.slot] -= 1
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
            self._results[chunk.key].extend(values)
            if error is not None:
                self._failed[chunk.indices[len(values)]] = error

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
            # The results from the head to the oldest item not done, and that item's error if
            # it is one that raised.
            end = self._keyed_end()
            error = self._failed.pop(end, None)
            n = end - self._head
            if n == 0 and error is None:
                return None
            keys = self._order[:n]
            del self._order[: n + (error is not None)]
            # Each item's value is the next of its key's results (in C: no Python per item).
            values = list(map(collections.deque.popleft, map(self._results.__getitem__, keys)))
            results = self._results
            for key in set(keys):  # a key with nothing left goes (keys may never end: user ids)
                if not results[key]:
                    del results[key]
            segment = (values, error)
        self._head += len(segment[0]) + (segment[1] is not None)
        self._held -= len(segment[0]) + (segment[1] is not None)
        return segment

    def _keyed_end(self) -> int:
        """(Ordered, keyed) the oldest item not done: the first of a buffer or of a chunk in
        flight, an item that raised, or the next to pull."""
        end = self._next_index
        if self._buffers:
            end = min(end, min(buf[0][0] for buf in self._buffers.values()))
        if self._in_flight:
            end = min(end, min(chunk.indices[0] for chunk in self._in_flight.values()))
        if self._failed:
            end = min(end, min(self._failed))
        return end

    def _end_input(self) -> None:
        self._exhausted = True
        self._take = _no_more  # the input (a list, an iterator) is not kept alive by a finished map

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
        self._take = _no_more
        self._buffers.clear()
        self._segments.clear()
        self._order.clear()
        self._results.clear()
        self._failed.clear()
        self._ready.clear()
        self._progress.close()


def _done(hook: Callable[[Chunk], Any], chunk: Chunk, _future: Any) -> None:
    hook(chunk)


def _chunk_value(value: Callable[[int, Any], Any], status: int, body: Any) -> Any:
    """A chunk's reply, its results unpickled when they came as one pickle (in the thread that
    read the reply, not the consumer's)."""
    out = value(status, body)
    if type(out[0]) is not list:
        out[0] = pickle.loads(out[0])
    return out
