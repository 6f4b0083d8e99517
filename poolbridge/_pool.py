"""The public face: :class:`Pool` and the per-call views made by ``pool.options(...)``.

Every operation goes through :meth:`_Api._prepare`, the one place where a session id is resolved
(``resolve_session``), turned into a slot, and written into the payload — the three values the
invariant says must agree are one variable there.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from . import _shm
from ._channel import Late
from ._errors import (
    CallTimeoutError,
    PoolClosedError,
    SessionLostError,
    SessionMismatchError,
    WorkerCrashedError,
    value_too_large,
)
from ._executor import ExecutorFace, cancel_not_started
from ._handles import Ref, Stream
from ._hashing import slot_for
from ._mapping import MappingMixin
from ._pipes import ProcessChannel
from ._protocol import (
    OK,
    OP_CALL,
    OP_CLOSE_SESSION,
    OP_GETATTR,
    OP_HELPER,
    OP_METHOD,
    OP_RELEASE,
    OP_SETATTR,
    OP_STATS,
    OP_STREAM_CLOSE,
    OP_STREAM_NEXT,
    OP_STREAM_OPEN,
    RET_AUTO,
    RET_REF,
    RET_VALUE,
    WireRef,
    make_unpacker,
    pack_plain,
    pack_request,
    pack_value,
    unpack_plain,
)
from ._replies import DISCARD, FAILED, Deadlines, PoolFuture, Waiter, rebuild_error
from ._resize import ResizeRecord
from ._session import resolve_session, session_scope, validate_session_id
from ._shm_send import Lifter
from ._supervisor import DEFAULT_MAX_IN_FLIGHT, Supervisor
from ._warmup import encode_initializer, encode_session_init

__all__ = ["Pool", "PoolStats", "SlotStats", "describe_pool"]

log = logging.getLogger("poolbridge")

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


# -- the API, shared by Pool and its option views ---------------------------------------------


class _Api(MappingMixin):
    __slots__ = ("_opts", "_pool")

    def __init__(self, pool: Pool, opts: _Options) -> None:
        self._pool = pool
        self._opts = opts

    # The one boundary: session resolved once; slot and payload both come from that one value.
    def _prepare(self, op: str, ref: WireRef | None, fields: list[Any]) -> tuple[int, int, bytes]:
        pool = self._pool
        router = pool._router
        if router.closing:  # closed, or a forked child's copy of its parent's pool
            raise router.closed_error()
        session_id = resolve_session(ref.session_id if ref is not None else None, self._opts.session)
        slot = slot_for(session_id, router.n_slots)
        if ref is not None:
            if isinstance(ref, Ref) and ref._api._pool is not pool:
                raise SessionMismatchError(f"{ref!r} belongs to another pool; a ref is only usable in its own pool")
            if router.route_epoch:
                pass  # resized: a moved ref is checked by the worker holding its session (_migrate.py)
            elif ref.slot != slot:  # only a forged ref can get here
                raise SessionMismatchError(f"{ref!r} claims slot {ref.slot}; its session maps to {slot}")
            elif ref.generation != pool._router.generation(slot):
                raise SessionLostError(
                    f"{ref!r} outlived its worker: slot {slot} is now generation "
                    f"{pool._router.generation(slot)}; the session's objects are gone"
                )
        return slot, *pool._encode_request(op, session_id, fields, pool, self._opts.zero_copy)

    def _run(self, op: str, ref: WireRef | None, fields: list[Any], decode: Callable[[int, Any], Any]) -> Any:
        """Send and block for the reply, reading it ourselves when nobody else is (no thread hop)."""
        pool = self._pool
        slot, req_id, data = self._prepare(op, ref, fields)
        if pool._discards:
            pool._flush_discards()
        waiter = Waiter()
        timeout = self._opts.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        router = pool._router
        try:
            channel = router.send(slot, req_id, data, waiter, lead=True, block=self._opts.block, deadline=deadline)
        except CallTimeoutError:
            # Waiting for the slot or the pipe used up the timeout. If the frame is half written
            # (finished off the caller's thread), the worker runs the call: its reply is late.
            ch = router.channels()[slot]
            if ch is not None:
                ch.pending.abandon(req_id, Late(self._late(op, decode)))
            raise CallTimeoutError(f"{op} did not finish within {timeout}s (slot {slot})") from None
        try:
            replied = channel.await_reply(
                req_id, waiter, None if deadline is None else max(0.0, deadline - time.monotonic())
            )
        except BaseException:  # an interrupt (Ctrl-C) or a crash report: whatever comes is late
            channel.pending.abandon(req_id, Late(self._late(op, decode)))
            raise
        if not replied:
            if channel.pending.abandon(req_id, Late(self._late(op, decode))) is not None:
                if self._opts.on_timeout == "restart":
                    log.warning("slot %d: call timed out after %ss; restarting the worker", slot, timeout)
                    router.kill_slot(slot)
                raise CallTimeoutError(f"{op} did not finish within {timeout}s (slot {slot})")
            waiter.wait(None)  # the reply raced the timeout and is being delivered
        status = waiter.status
        if status == FAILED or status is None:
            raise waiter.body
        return decode(status, waiter.body)

    def _submit(self, op: str, ref: WireRef | None, fields: list[Any], decode: Callable[[int, Any], Any]) -> Any:
        pool = self._pool
        slot, req_id, data = self._prepare(op, ref, fields)
        if pool._discards:
            pool._flush_discards()
        future = PoolFuture(decode)
        timeout = self._opts.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = pool._router.send(slot, req_id, data, future, block=self._opts.block, deadline=deadline)
        future._target = (channel, req_id)
        if deadline is not None:
            pool._deadlines.add(deadline, channel, req_id, future, slot, f"{op} did not finish within {timeout}s",
                                self._opts.on_timeout == "restart", Late(self._late(op, decode)))
        return future

    def _late(self, op: str, decode: Callable[[int, Any], Any]) -> Callable[[int, Any], Any]:
        """What the reply of a call given up on is turned into, to be dropped (see ``Late``): its
        decoded value, whose refs release themselves when dropped — except a stream's opening,
        whose decoder would start pulling the stream: that one just closes it."""
        return self._close_opened_stream if op == OP_STREAM_OPEN else decode

    def _close_opened_stream(self, status: int, body: Any) -> None:
        if status == OK:
            key, items, done = unpack_plain(body)
            self._pool._unpack(items)  # refs among the first items release themselves
            if not done:
                self._pool._discard(key, "stream_close")

    def _value(self, status: int, body: Any) -> Any:
        if status == OK:
            return self._decode_body(body)
        raise rebuild_error(body)

    def _decode_body(self, body: bytes) -> Any:
        """A value from a reply body (read-only views of big buffers with ``zero_copy``)."""
        if self._opts.zero_copy:
            with _shm.zero_copy_views():
                return self._pool._unpack(body)
        return self._pool._unpack(body)

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


def describe_pool(pool: Pool) -> str:
    """What ``repr`` shows of a pool: slots, their pids and generations, state, calls in flight."""
    channels = pool._router.channels()[: pool.workers]
    pids = [ch.pid if ch is not None else -1 for ch in channels]
    generations = [ch.generation if ch is not None else -1 for ch in channels]
    in_flight = sum(len(ch.pending) for ch in channels if ch is not None)
    state = "closed" if pool.closed else "running"
    backend = "" if pool.backend == "process" else f" backend={pool.backend}"
    return f"workers={pool.workers} pids={pids} generations={generations}{backend} {state} in_flight={in_flight}"


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
        "_deadlines", "_discards", "_finalizer", "_router", "_shm", "_unpack", "backend", "max_value_bytes", "workers",
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
        self._router = Supervisor(
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
        self._router.lifter = self._shm
        _live_pools.add(self)
        what = f"poolbridge.Pool(workers={self.workers}, backend={backend!r})"
        self._finalizer = weakref.finalize(self, _collect, self._router, self._deadlines, what)
        self._finalizer.atexit = False  # at exit, _close_live_pools closes it (without a warning)

    def _encode_request(
        self, op: str, session_id: str, fields: list[Any], owner: object = None, zero_copy: bool = False
    ) -> tuple[int, bytes]:
        """``(req_id, frame body)`` of a request, its big buffers in segments; raises
        :class:`ValueTooLargeError` past ``max_value_bytes`` before anything is sent."""
        shm = self._shm
        if shm is None:
            body = pack_value(fields, session_id, owner)
            names: list[str] = []
            size = 0
        else:
            if zero_copy:
                shm.zero_copy(True)
                try:
                    body = pack_value(fields, session_id, owner, shm)
                finally:
                    shm.zero_copy(False)
            else:
                body = pack_value(fields, session_id, owner, shm)
            names, size = shm.take()
        limit = self.max_value_bytes
        if limit is not None and len(body) + size > limit:
            for name in names:
                shm.recycle(name)  # type: ignore[union-attr]
            raise value_too_large("this request (its arguments)", len(body) + size, limit)
        req_id = self._router.next_id()
        return req_id, pack_request(req_id, op, session_id, body, names)

    @property  # a pool is its own _pool (see __init__)
    def _pool(self) -> Pool:  # type: ignore[override]
        return self

    def _discard(self, key: list[Any], op: str) -> None:
        # Called from __del__, possibly inside another send on this thread: only queue here.
        if not self._router.closing:
            self._discards.append((key, op))

    def _flush_discards(self) -> None:
        discards = self._discards
        while discards:
            try:
                key, op = discards.popleft()
            except IndexError:
                return
            session_id, _, slot, generation = key
            if not self._router.route_epoch and generation != self._router.generation(slot):
                continue  # that worker is gone, and the object with it (resized: the worker decides)
            req_id = self._router.next_id()
            body = pack_plain([req_id, op, session_id, pack_plain([key])])
            try:
                self._router.send(slot, req_id, body, DISCARD)
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
        router = self._router
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
                ch = router.send(slot, req_id, pack_plain([req_id, OP_STATS, None, b""]), waiter)
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
        wait for its move, then run on its new worker in order; other sessions never wait. What
        cannot move (an unpicklable object, a live stream) is lost and listed in the record, its refs
        raising :class:`SessionLostError` with the reason — or, with ``on_unmovable="refuse"``,
        nothing changes and the record says ``refused``. ``timeout``: bound on each worker's part
        (a worker that does not answer in time is restarted, losing its sessions as in a crash).
        """
        from ._resize import resize

        if self._discards:
            self._flush_discards()
        record = resize(self._router, workers, on_unmovable=on_unmovable, timeout=timeout)
        self.workers = self._router.n_slots
        return record

    @property
    def aio(self) -> Any:
        """The asyncio face of this pool (:class:`AsyncPool`), sharing its workers and sessions."""
        from ._aio import AsyncPool

        return AsyncPool(_api=self)

    def pids(self) -> list[int]:
        """The current worker pid of every slot, by slot (-1 for every slot once closed)."""
        router = self._router
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
        if not self._router.closing:
            self._router.close(cancel=cancel)
            self._deadlines.stop()
            if self._shm is not None:
                self._shm.close()
        _live_pools.discard(self)

    @property
    def closed(self) -> bool:
        return self._router.closing

    def __enter__(self) -> Pool:
        if self._router.closing:
            raise self._router.closed_error()
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
