"""The public face: :class:`Pool` and the per-call views made by ``pool.options(...)``.

Every operation goes through :meth:`_Api._prepare`, the one place where a session id is resolved
(``resolve_session``), turned into a slot, and written into the payload — the three values the
invariant says must agree are one variable there.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import _calls, _resize, _shm
from ._aio import AsyncFace
from ._api import _Api, _Options
from ._calls import DISCARD, Deadlines, Waiter
from ._errors import (
    PoolClosedError,
    WorkerCrashedError,
)
from ._executor import ExecutorFace, cancel_not_started
from ._handles import Ref
from ._pipes import ProcessChannel
from ._protocol import (
    OK,
    OP_STATS,
    make_unpacker,
    unpack_plain,
)
from ._resize import ResizeRecord
from ._shm_send import Lifter
from ._supervisor import DEFAULT_MAX_IN_FLIGHT, Supervisor, describe_pool
from ._warmup import encode_initializer, encode_session_init
from ._wire import encode_control

__all__ = ["AsyncPool", "Pool", "PoolStats", "SlotStats", "describe_pool"]

log = logging.getLogger("poolbridge")

@dataclass(frozen=True)
class SlotStats:
    """One worker slot, as seen at the moment :meth:`Pool.stats` asked."""

    slot: int
    pid: int
    generation: int
    alive: bool  # the worker process is running
    responsive: bool  # it answered within the stats wait (else the worker-side counts are -1)
    restarts: int
    in_flight: int
    sessions: int
    refs: int
    streams: int
    calls: int
    rss: int


@dataclass(frozen=True)
class PoolStats:
    workers: int
    slots: tuple[SlotStats, ...]

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.slots)

    @property
    def sessions(self) -> int:
        return sum(s.sessions for s in self.slots)

    @property
    def refs(self) -> int:
        return sum(s.refs for s in self.slots)

    @property
    def streams(self) -> int:
        return sum(s.streams for s in self.slots)


# -- the pool ------------------------------------------------------------------------------------


def _ref_maker(pool: weakref.ref[Pool]) -> Callable[[list[Any]], Ref]:
    def make_ref(key: list[Any]) -> Ref:
        session_id, ref_id, slot, generation = key
        return Ref(pool(), session_id, ref_id, slot, generation)  # type: ignore[arg-type]

    return make_ref

_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    # A pool nobody closed: its workers would exit on pipe EOF anyway; this makes it orderly.
    for pool in list(_live_pools):
        pool.close(cancel=True)


def _collect(router: Supervisor, deadlines: Deadlines, what: str) -> None:
    """The finalizer of a pool dropped without ``close()`` (its last reference is gone): stop its
    workers, and say so with a ``ResourceWarning``, as an unclosed file does."""
    if router.closing:
        return  # closed meanwhile, or a forked child's copy: its workers are the parent's
    if threading.current_thread().name.startswith("poolbridge-"):
        # Dropped from one of the router's own threads (a reader delivering a reply): closing
        # waits for those threads, so it happens on a thread of its own.
        threading.Thread(target=_stop, args=(router, deadlines), name="poolbridge-collect", daemon=True).start()
    else:
        _stop(router, deadlines)
    warnings.warn(f"unclosed {what}: its workers were stopped when it was garbage-collected; "
                  "call close() or use `with Pool(...)`", ResourceWarning, stacklevel=2)


def _stop(router: Supervisor, deadlines: Deadlines) -> None:
    router.close()
    deadlines.stop()


class Pool(_Api, ExecutorFace):
    """A pool of worker processes with per-session affinity.

    ``workers``: number of slots (default ``os.cpu_count()``). ``helpers``: modules imported in every
    worker, whose ``@poolbridge.helper`` functions become callable by name. ``session_ttl``: seconds
    after which an idle session's state is dropped. ``max_refs_per_session``: cap on refs and streams
    a session may hold. ``max_in_flight``: bound on unanswered requests per slot; past it callers
    block, or get :class:`PoolBusyError` with ``options(block=False)``. ``max_calls_per_worker`` /
    ``max_rss_per_worker`` (bytes): recycle a worker past these limits — only while it holds no
    session state (see docs/faults.md). ``backend``: ``"process"`` (default) or ``"ray"`` (each slot a
    Ray actor; ``ray_init`` is passed to ``ray.init``). ``initializer(*initargs)``: run once in
    every worker process, and again in a restarted one (a dotted path or a callable); if it raises,
    that worker's calls fail with :class:`WorkerCrashedError`. ``session_init``: a dotted path or
    callable run as ``session_init(session_id)`` the first time a session touches its worker; its
    result is kept in the session's state, ``current_session().state["session_init"]``.
    ``max_value_bytes``: the largest argument or result (encoded, buffers included) a call may
    carry; past it :class:`ValueTooLargeError`, before anything is sent (default: no bound but
    memory). ``shm_threshold``: buffers (bytes, bytearray, memoryview, str, pickle-5 buffers such
    as numpy arrays) of at least this many bytes travel through shared memory instead of the pipe
    (``None``: never; see README, "Large values").

    A ``concurrent.futures.Executor``: ``submit``, ``map`` and ``shutdown`` behave as there (see
    also ``imap``, ``starmap`` and ``broadcast``).

    Close a pool with :meth:`close` or a ``with`` block. A pool dropped without it is closed when
    its last reference goes (refs, streams and pending futures keep it alive), with a
    ``ResourceWarning``; one still referenced at interpreter exit is closed then. A pool belongs to
    the process that made it: in a forked child every use raises :class:`PoolClosedError`.
    """

    # (__dict__ and __weakref__ come from concurrent.futures.Executor)
    __slots__ = (
        "_deadlines", "_discards", "_finalizer", "_shm", "_supervisor", "_unpack", "backend", "max_value_bytes",
        "workers",
    )

    def __init__(
        self,
        workers: int | None = None,
        *,
        helpers: list[str] | tuple[str, ...] = (),
        session_ttl: float | None = None,
        max_refs_per_session: int | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_calls_per_worker: int | None = None,
        max_rss_per_worker: int | None = None,
        backend: str = "process",
        ray_init: dict[str, Any] | None = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        session_init: Any = None,
        max_value_bytes: int | None = None,
        shm_threshold: int | None = _shm.DEFAULT_THRESHOLD,
        _wire: bool = False,
        _allow_modules: tuple[str, ...] = (),
    ) -> None:
        # Not _Api.__init__: a pool is its own _pool (the property below), and an attribute
        # pointing at itself would be a reference cycle that keeps an unclosed pool alive until
        # the cyclic GC runs, instead of ending it with its last reference.
        self._opts = _Options()
        self.workers = int(workers if workers is not None else (os.cpu_count() or 1))
        self.backend = backend
        factory: Callable[..., Any]
        if backend == "process":
            factory = ProcessChannel
        elif backend == "ray":
            from .backends.ray import ray_channel_factory  # the core never imports Ray otherwise

            factory = ray_channel_factory(ray_init or {})
        else:
            raise ValueError(f"backend must be 'process' or 'ray', got {backend!r}")
        if max_value_bytes is not None and max_value_bytes < 1:
            raise ValueError(f"max_value_bytes must be at least 1, got {max_value_bytes}")
        self.max_value_bytes = max_value_bytes
        self._shm: Lifter | None = None
        shm_options = None
        if backend == "process" and shm_threshold is not None and _shm.available():
            _shm.sweep_stale()
            self._shm = Lifter(_shm.router_prefix(), shm_threshold, max_value_bytes, cache=_shm.CACHE_BYTES)
            shm_options = {"prefix": self._shm.prefix, "threshold": shm_threshold, "tracker_fd": _shm.start_tracker()}
        self._unpack = make_unpacker(_ref_maker(weakref.ref(self)))  # weakly: no cycle either
        self._discards: collections.deque[tuple[list[Any], str]] = collections.deque()
        self._deadlines = Deadlines(self)
        self._supervisor = Supervisor(
            self.workers,
            worker_options={
                "helpers": list(helpers),
                "session_ttl": session_ttl,
                "max_refs_per_session": max_refs_per_session,
                "wire": _wire,
                "allow_modules": list(_allow_modules),  # the Port server's --allow-module
                "max_calls": max_calls_per_worker,
                "max_rss": max_rss_per_worker,
                "max_value_bytes": max_value_bytes,
                "shm": shm_options,
                "log_level": logging.getLogger("poolbridge").getEffectiveLevel(),
                "initializer": encode_initializer(initializer, initargs),
                "session_init": encode_session_init(session_init),
            },
            max_in_flight=max_in_flight,
            channel_factory=factory,
            max_frame=max_value_bytes,
        )
        self._supervisor.lifter = self._shm
        _live_pools.add(self)
        what = f"poolbridge.Pool(workers={self.workers}, backend={backend!r})"
        self._finalizer = weakref.finalize(self, _collect, self._supervisor, self._deadlines, what)
        self._finalizer.atexit = False  # at exit, _close_live_pools closes it (without a warning)

    _encode_request = _calls.encode_request

    @property  # a pool is its own _pool (see __init__)
    def _pool(self) -> Pool:  # type: ignore[override]
        return self

    def _discard(self, key: list[Any], op: str) -> None:
        # Called from __del__, possibly inside another send on this thread: only queue here.
        if not self._supervisor.closing:
            self._discards.append((key, op))

    def _flush_discards(self) -> None:
        discards = self._discards
        while discards:
            try:
                key, op = discards.popleft()
            except IndexError:
                return
            session_id, _, slot, generation = key
            if not self._supervisor.route_epoch and generation != self._supervisor.generation(slot):
                continue  # that worker is gone, and the object with it (resized: the worker decides)
            req_id = self._supervisor.next_id()
            body = encode_control(req_id, op, session_id, [key])
            try:
                self._supervisor.send(slot, req_id, body, DISCARD)
            except (WorkerCrashedError, PoolClosedError):
                pass

    def stats(self, *, _ask_busy: bool = True) -> PoolStats:
        """A frozen snapshot of every slot: pid, generation, sessions, refs, streams, in-flight.

        Worker-side counts come from the worker itself, queued behind the calls it already has; a
        worker busy for longer than the 2 s wait is reported ``alive`` (its process runs) but not
        ``responsive``, with those counts as -1. Handles dropped before are released first. After
        :meth:`close` every slot reports pid -1, not alive. ``_ask_busy=False`` (the Port server): a
        worker with calls in flight is not asked at all, so the snapshot never waits behind one.
        """
        router = self._supervisor
        if router.closing and os.getpid() != router.owner_pid:
            raise router.closed_error()
        if self._discards:
            self._flush_discards()
        asked: list[tuple[int, Any, int, Waiter, Any]] = []  # slot, asked channel, id, waiter, channel
        for slot in range(self.workers):
            waiter = Waiter()
            req_id = router.next_id()
            ch = router.channels()[slot]
            if not _ask_busy and (ch is None or ch.pending or ch.dead):
                asked.append((slot, None, req_id, waiter, ch))
                continue
            try:
                ch = router.send(slot, req_id, encode_control(req_id, OP_STATS, None), waiter)
            except (WorkerCrashedError, PoolClosedError):
                ch = None
            asked.append((slot, ch, req_id, waiter, ch))
        deadline = time.monotonic() + 2.0
        slots = []
        for slot, asked_ch, req_id, waiter, ch in asked:
            worker: dict[str, Any] = {}
            if asked_ch is not None:
                if waiter.wait(max(0.0, deadline - time.monotonic())):
                    if waiter.status == OK:
                        worker = unpack_plain(waiter.body)
                else:
                    ch.pending.pop(req_id, None)  # its late reply is dropped
            alive = ch is not None and not ch.dead
            slots.append(
                SlotStats(
                    slot=slot,
                    pid=ch.pid if ch is not None else -1,
                    generation=ch.generation if ch is not None else -1,
                    alive=alive,
                    responsive=bool(worker),
                    restarts=router.restarts(slot),
                    in_flight=len(ch.pending) if ch is not None else 0,
                    sessions=worker.get("sessions", -1),
                    refs=worker.get("refs", -1),
                    streams=worker.get("streams", -1),
                    calls=worker.get("calls", -1),
                    rss=worker.get("rss", -1),
                )
            )
        return PoolStats(workers=self.workers, slots=tuple(slots))

    def resize(self, workers: int, *, on_unmovable: str = "lose", timeout: float = 60.0) -> ResizeRecord:
        """Grow or shrink the pool to ``workers`` slots while it serves; returns a :class:`ResizeRecord`.

        Only the sessions whose slot changes move (jump hash: growing n -> n+1 moves about 1/(n+1)
        of them); their refs and helper state are pickled out of the old worker and loaded into the
        new one, keeping their ids, so the refs callers hold keep working. A moving session's calls
        wait for its move, then run on its new worker in order; other sessions are never held. What
        cannot move (an unpicklable object, a live stream) is lost and listed in the record, its refs
        raising :class:`SessionLostError` with the reason — or, with ``on_unmovable="refuse"``,
        nothing changes and the record says ``refused``. ``timeout``: bound on each worker's part
        (a worker that does not answer in time is restarted, losing its sessions as in a crash).
        """
        if self._discards:
            self._flush_discards()
        record = _resize.resize(self._supervisor, workers, on_unmovable=on_unmovable, timeout=timeout)
        self.workers = self._supervisor.n_slots
        return record

    @property
    def aio(self) -> AsyncPool:
        """The asyncio face of this pool (:class:`AsyncPool`), sharing its workers and sessions."""
        return AsyncPool(_api=self)

    def pids(self) -> list[int]:
        """The current worker pid of every slot, by slot (-1 for every slot once closed)."""
        router = self._supervisor
        if router.closing:
            if os.getpid() != router.owner_pid:
                raise router.closed_error()
            return [-1] * self.workers
        return [ch.pid if ch is not None else -1 for ch in router.channels()[: self.workers]]

    def close(self, cancel: bool = False) -> None:
        """Stop the workers. In-flight calls finish first unless ``cancel=True``. Idempotent.

        Returns once the workers have exited and the pool's threads and pipes are gone.
        """
        self._finalizer.detach()
        if not self._supervisor.closing:
            self._supervisor.close(cancel=cancel)
            self._deadlines.stop()
            if self._shm is not None:
                self._shm.close()
        _live_pools.discard(self)

    @property
    def closed(self) -> bool:
        return self._supervisor.closing

    def __enter__(self) -> Pool:
        if self._supervisor.closing:
            raise self._supervisor.closed_error()
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        # A plain exit waits for the calls in flight. An exception leaving the block (Ctrl-C
        # included) stops at once: nothing more of the block's work is wanted. What has not
        # started is cancelled — the one mechanism of shutdown(cancel_futures=True) — and what
        # runs is stopped (its worker killed, its call failed).
        if exc_type is not None:
            cancel_not_started(self)
        self.close(cancel=exc_type is not None)

    def __repr__(self) -> str:
        return f"<Pool {describe_pool(self)}>"

    def __iter__(self) -> Iterator[Any]:  # pragma: no cover - guard against `for x in pool`
        raise TypeError("Pool is not iterable; did you mean pool.stream(...)?")


class AsyncPool(AsyncFace):
    """Awaitable operations on a :class:`Pool`. ``AsyncPool(**pool_args)`` owns a new pool;
    ``pool.aio`` wraps an existing one. ``map`` / ``imap`` / ``starmap`` are ``async for``
    iterators; ``broadcast`` is awaited."""

    __slots__ = ()

    def __init__(self, workers: int | None = None, *, _api: _Api | None = None, **pool_args: Any) -> None:
        super().__init__(_api=_api if _api is not None else Pool(workers, **pool_args), _owned=_api is None)
