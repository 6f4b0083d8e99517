"""Fault injection at every stage of a request, in the style of CPython's
test_concurrent_futures/test_deadlock.py: for each place a request can fail —

    encode in the caller → decode in the worker → user code → encode of the reply → decode in the router

— and for plain calls (``call``, ``submit``) and streams, the failure surfaces as a typed error on
that one call, in bounded time, and the pool keeps serving every slot afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pb_faultmods import (
    Boom,
    ExplodesOnUnpickle,
    PicklingBoom,
    ProcessHygiene,
    UnpicklingBoom,
    sessions_for_slot,
    wait_until,
)

import poolbridge
from poolbridge import Ref, WorkerCrashedError
from poolbridge import _testing as testing

M = "pb_faultmods"
RESULT_WAIT = 10.0


@pytest.fixture(scope="module")
def process_pool() -> Iterator[poolbridge.Pool]:
    """This module's process pool (conftest's ``pool`` on the process backend)."""
    p = poolbridge.Pool(2)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(autouse=True)
def _hygiene(pool: poolbridge.Pool) -> Iterator[None]:
    with ProcessHygiene(lambda: set() if pool.closed else set(pool.pids())):
        yield


def serves_every_slot(pool: poolbridge.Pool) -> None:
    for slot in range(pool.workers):
        (sid,) = sessions_for_slot(pool, slot, 1, f"probe-{slot}-{time.monotonic_ns()}")
        seen = pool.options(session=sid).call(f"{M}.whoami")
        assert seen["slot"] == slot and seen["session"] == sid
        assert seen["pid"] == pool.pids()[slot]
        assert seen["generation"] == testing.generation(pool, slot)


def nothing_pending(pool: poolbridge.Pool) -> bool:
    return all(not ch.pending for ch in testing.channels(pool))


_counter = iter(range(10**9))


def fresh_session(pool: poolbridge.Pool, slot: int, tag: str) -> str:
    (sid,) = sessions_for_slot(pool, slot, 1, f"{tag}-{next(_counter)}")
    return sid


def run(api: Any, mode: str, fn: Any, *args: Any) -> Any:
    if mode == "call":
        return api.call(fn, *args)
    return api.submit(fn, *args).result(timeout=RESULT_WAIT)


_LOCK = threading.Lock()


# -- the matrix for plain calls ------------------------------------------------------------------
#
# Each case: (fn, args) and a check of the outcome ("raises X", a value, or a worker crash).

CrashInfo = tuple[int | None, int | None]  # (exitcode, signal)


class Case:
    def __init__(
        self,
        name: str,
        make: Callable[[], tuple[Any, tuple[Any, ...]]],
        raises: type[BaseException] | None = None,
        crash: CrashInfo | None = None,
        check: Callable[[Any], None] | None = None,
        options: dict[str, Any] | None = None,
        sent: bool = True,
        remote: bool | None = None,
    ) -> None:
        self.name = name
        self.make = make
        self.raises = raises
        self.crash = crash
        self.check = check
        self.options = options or {}
        self.sent = sent  # does the request reach the worker at all?
        self.remote = sent if remote is None else remote  # is the error raised in the worker?


def _check_auto_ref(value: Any) -> None:
    assert isinstance(value, Ref), value
    assert value.call("get") == 7
    assert value.getattr("value") == 7


CASES = [
    # 1. encode in the caller: cloudpickle cannot pickle a lock — error before anything is sent
    Case("encode-caller-callable", lambda: ((lambda: _LOCK.locked()), ()), raises=TypeError, sent=False),
    Case("encode-caller-argument", lambda: (f"{M}.accept", (_LOCK,)), raises=TypeError, sent=False),
    Case("encode-caller-nested", lambda: (f"{M}.accept", ({"a": [1, (2, _LOCK)]},)), raises=TypeError, sent=False),
    # 2. decode in the worker: the argument refuses to be unpickled there
    Case("decode-worker", lambda: (f"{M}.accept", (ExplodesOnUnpickle(),)), raises=UnpicklingBoom),
    # 3. user code
    Case("user-raise", lambda: (f"{M}.die", ("raise", 1)), raises=Boom),
    Case("user-sys.exit", lambda: (f"{M}.die", ("sys.exit", 4)), raises=SystemExit),
    Case("user-os._exit", lambda: (f"{M}.die", ("os._exit", 9)), crash=(9, None)),
    Case("user-sigkill", lambda: (f"{M}.die", ("sigkill",)), crash=(-9, 9)),
    Case("user-segfault", lambda: (f"{M}.die", ("segfault",)), crash=(-11, 11)),
    # 4. encode of the reply: ret="auto" keeps the object as a Ref; ret="value" is an error
    Case("encode-reply-auto", lambda: (f"{M}.make_refuses_pickling", (7,)), check=_check_auto_ref),
    Case(
        "encode-reply-value",
        lambda: (f"{M}.make_refuses_pickling", (7,)),
        raises=PicklingBoom,
        options={"ret": "value"},
    ),
    # 5. decode in the router: the result cannot be unpickled outside a worker
    Case("decode-router", lambda: (f"{M}.make_parent_cannot_unpickle", (7,)), raises=UnpicklingBoom, remote=False),
]


FAULTS = [c for c in CASES if c.crash is None]
# A crash costs a new actor on Ray, and its exit code is Ray's to know (docs/ray.md): the crash cases
# run on the process backend; a crash on both is test_faults_crash's killed-worker test.
CRASHES = [c for c in CASES if c.crash is not None]


@pytest.mark.backends
@pytest.mark.parametrize("mode", ["call", "submit"])
@pytest.mark.parametrize("case", FAULTS, ids=[c.name for c in FAULTS])
def test_plain_call_fault(pool: poolbridge.Pool, case: Case, mode: str) -> None:
    _plain_call_case(pool, case, mode)


@pytest.mark.parametrize("mode", ["call", "submit"])
@pytest.mark.parametrize("case", CRASHES, ids=[c.name for c in CRASHES])
def test_plain_call_crash(pool: poolbridge.Pool, case: Case, mode: str) -> None:
    _plain_call_case(pool, case, mode)


def _plain_call_case(pool: poolbridge.Pool, case: Case, mode: str) -> None:
    slot = 0
    sid = fresh_session(pool, slot, case.name)
    api = pool.options(session=sid, **case.options)
    ref = api.create(f"{M}.Box", 100)  # session state that must survive every non-crash fault
    pids = pool.pids()
    calls_before = pool.stats().slots[slot].calls
    fn, args = case.make()

    started = time.monotonic()
    if case.crash is not None:
        with pytest.raises(WorkerCrashedError) as crashed:
            run(api, mode, fn, *args)
        exitcode, sig = case.crash
        assert crashed.value.exitcode == exitcode
        assert crashed.value.signal == sig
        assert crashed.value.pid == pids[slot]
        with pytest.raises(poolbridge.SessionLostError):
            ref.call("get")
    elif case.raises is not None:
        with pytest.raises(case.raises) as raised:
            run(api, mode, fn, *args)
        if case.remote:
            # raised in the worker: the remote traceback rides along as the cause
            assert isinstance(raised.value.__cause__, BaseException)
    else:
        value = run(api, mode, fn, *args)
        assert case.check is not None
        case.check(value)
    assert time.monotonic() - started < 5.0

    if case.crash is None:
        assert pool.pids() == pids, "a non-fatal fault must not cost the worker"
        assert ref.call("incr") == 101, "the session's state survives"
        calls_after = pool.stats().slots[slot].calls
        if not case.sent:
            # nothing reached the worker: only the ref.call above counted
            assert calls_after == calls_before + 1
    assert nothing_pending(pool)
    # the same session keeps working, and so does every slot
    assert api.call(f"{M}.add", 1, 2) == 3
    serves_every_slot(pool)


# -- the matrix for streams -------------------------------------------------------------------------


def _slot_streams(pool: poolbridge.Pool, slot: int) -> int:
    return pool.stats().slots[slot].streams


STREAM_CASES = [
    # (name, fn, args, expected items before the error, error type or None, crash?)
    ("encode-caller", f"{M}.crash_after", (_LOCK,), [], TypeError, False),
    ("decode-worker", f"{M}.crash_after", (ExplodesOnUnpickle(),), [], UnpicklingBoom, False),
    ("user-raise-at-open", f"{M}.gen_raise_after", (0,), [], Boom, False),
    ("user-raise-mid", f"{M}.gen_raise_after", (5,), [0, 1, 2, 3, 4], Boom, False),
    ("user-sys.exit-mid", f"{M}.crash_after", (5, "sys.exit"), [0, 1, 2, 3, 4], SystemExit, False),
    ("user-os._exit-mid", f"{M}.crash_after", (5, "os._exit"), None, WorkerCrashedError, True),
    ("user-sigkill-mid", f"{M}.crash_after", (5, "sigkill"), None, WorkerCrashedError, True),
    ("user-segfault-mid", f"{M}.crash_after", (5, "segfault"), None, WorkerCrashedError, True),
    ("user-sigkill-at-open", f"{M}.crash_after", (0, "sigkill"), [], WorkerCrashedError, True),
]


STREAM_FAULTS = [c for c in STREAM_CASES if not c[5]]
STREAM_CRASHES = [c for c in STREAM_CASES if c[5]]


@pytest.mark.backends
@pytest.mark.parametrize(
    ("name", "fn", "args", "before", "error", "crash"), STREAM_FAULTS, ids=[c[0] for c in STREAM_FAULTS]
)
def test_stream_fault(pool, name, fn, args, before, error, crash):
    _stream_case(pool, name, fn, args, before, error, crash)


@pytest.mark.parametrize(
    ("name", "fn", "args", "before", "error", "crash"), STREAM_CRASHES, ids=[c[0] for c in STREAM_CRASHES]
)
def test_stream_crash(pool, name, fn, args, before, error, crash):
    _stream_case(pool, name, fn, args, before, error, crash)


def _stream_case(pool, name, fn, args, before, error, crash):
    slot = 1
    sid = fresh_session(pool, slot, f"stream-{name}")
    api = pool.options(session=sid, batch=2)
    pids = pool.pids()
    got: list[Any] = []
    started = time.monotonic()
    with pytest.raises(error):
        for item in api.stream(fn, *args):
            got.append(item)
    assert time.monotonic() - started < 5.0
    if before is not None:
        assert got == before
    else:  # a crash mid-stream: a prefix of the items, in order, nothing else
        assert got == list(range(len(got)))
    if crash:
        assert pool.pids()[slot] != pids[slot] or testing.channels(pool)[slot].dead
    else:
        assert pool.pids() == pids
        # the failed stream is gone from the worker: nothing leaked
        assert _slot_streams(pool, slot) == 0
    # the next stream in the same session opens (on the new generation after a crash) and works
    assert list(api.stream("builtins.range", 5)) == [0, 1, 2, 3, 4]
    # A prefetch of the failed stream may still be answered through the background reader.
    wait_until(lambda: nothing_pending(pool), 5.0, what="no request left pending")
    serves_every_slot(pool)


@pytest.mark.backends
@pytest.mark.parametrize("bad_at", [0, 3], ids=["in-open-batch", "in-later-batch"])
def test_stream_item_that_cannot_be_pickled(pool, bad_at):
    """An item the worker cannot pickle: it comes back as a Ref (like ret='auto'), or the stream
    raises the pickling error — either way the worker is fine and no stream is leaked."""
    slot = 1
    sid = fresh_session(pool, slot, "stream-unpicklable")
    api = pool.options(session=sid, batch=2)
    try:
        items = list(api.stream(f"{M}.yield_made", "make_refuses_pickling", 6, bad_at))
    except PicklingBoom:
        pass
    else:
        assert [i for n, i in enumerate(items) if n != bad_at] == [i for i in range(6) if i != bad_at]
        assert isinstance(items[bad_at], Ref)
        assert items[bad_at].call("get") == bad_at
    assert _slot_streams(pool, slot) == 0
    serves_every_slot(pool)


@pytest.mark.backends
@pytest.mark.parametrize("bad_at", [0, 3], ids=["in-open-batch", "in-later-batch"])
def test_stream_item_that_the_router_cannot_decode(pool, bad_at):
    """An item that unpickles only inside a worker: the iteration raises, the pool is fine, and
    the generator is closed in the worker (its ``finally`` runs; no stream left behind).

    Regression (b358b83): when the router could not decode a stream batch, the client handle was
    marked closed (or, for the opening batch, never created) and no ``stream_close`` was sent, so
    the generator stayed suspended in the worker — counted in ``stats().streams`` — until
    ``close_session`` or the TTL.
    """
    slot = 1
    sid = fresh_session(pool, slot, "stream-undecodable")
    api = pool.options(session=sid, batch=2)
    before = _slot_streams(pool, slot)
    got = []
    try:
        with pytest.raises(UnpicklingBoom):
            for item in api.stream(f"{M}.yield_made", "make_parent_cannot_unpickle", 6, bad_at):
                got.append(item)
        # batches of 2: the batch holding the bad item is lost as a whole, the ones before arrive
        assert got == list(range(bad_at - bad_at % 2))
        serves_every_slot(pool)
        leaked = _slot_streams(pool, slot) - before
        assert leaked == 0, "the worker still holds the abandoned generator"
    finally:
        api.close_session()  # do not let a leak here spill into the next test


def test_every_stage_fails_in_a_row_then_the_pool_is_whole(pool):
    """All stages, one after the other on one session, interleaved with good calls."""
    sid = fresh_session(pool, 0, "sequence")
    api = pool.options(session=sid)
    for case in CASES:
        fn, args = case.make()
        view = api.options(**case.options) if case.options else api
        try:
            view.call(fn, *args)
        except BaseException as exc:
            expected = case.raises or WorkerCrashedError
            assert isinstance(exc, expected), (case.name, exc)
        assert api.call(f"{M}.echo", case.name)[0] == [case.name]
    serves_every_slot(pool)


def test_concurrent_faults_do_not_disturb_good_calls(pool):
    """Good calls from threads keep getting their own answers while faults fire beside them."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def good(tag: int) -> None:
        sid = f"good-{tag}"
        api = pool.options(session=sid)
        i = 0
        while not stop.is_set() and i < 300:
            try:
                value, seen = api.call(f"{M}.echo", tag, i)
            except WorkerCrashedError:
                i += 1
                continue  # its worker was killed by a fault case: typed, allowed
            except BaseException as exc:
                errors.append(exc)
                return
            if value != [tag, i] or seen != sid:
                errors.append(AssertionError(f"{tag}: got {value} in {seen}"))
                return
            i += 1

    threads = [threading.Thread(target=good, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    try:
        for case in CASES:
            if case.crash is not None and case.crash[1] == 11:
                continue  # one crash kind is enough here
            sid = fresh_session(pool, next(_counter) % 2, f"conc-{case.name}")
            fn, args = case.make()
            try:
                pool.options(session=sid, **case.options).call(fn, *args)
            except BaseException as exc:
                assert isinstance(exc, case.raises or WorkerCrashedError), (case.name, exc)
    finally:
        stop.set()
        for t in threads:
            t.join(30.0)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    serves_every_slot(pool)


# -- the reply-side faults through every op that returns a value ---------------------------------

OPS = {
    "method": lambda api, f, kind, attr, ret: api.method(f, "make", kind),
    "ref.call": lambda api, f, kind, attr, ret: f.options(ret=ret).call("make", kind),
    "submit_method": lambda api, f, kind, attr, ret: api.submit_method(f, "make", kind).result(timeout=RESULT_WAIT),
    "getattr": lambda api, f, kind, attr, ret: api.getattr(f, attr),
    "helper": lambda api, f, kind, attr, ret: api.helper("pbf_make", kind),
}


@pytest.fixture(scope="module")
def helper_pool() -> Iterator[poolbridge.Pool]:
    p = poolbridge.Pool(1, helpers=["pb_faultmods"])
    try:
        yield p
    finally:
        p.close()


@pytest.mark.parametrize("ret", ["auto", "value", "ref"])
@pytest.mark.parametrize("kind", ["unpicklable", "parent"])
@pytest.mark.parametrize("op", list(OPS))
def test_reply_faults_through_every_op(helper_pool, op, kind, ret):
    """Encode-of-reply and decode-in-router faults behave the same whatever op produced the value:
    unpicklable → a Ref with ret auto/ref, PicklingBoom with ret=value; undecodable in the router
    → UnpicklingBoom unless ret=ref (the object then stays in the worker)."""
    pool = helper_pool
    api = pool.options(session=f"ops-{op}-{kind}-{ret}", ret=ret)
    factory = api.create(f"{M}.Factory")
    attr = "unpicklable" if kind == "unpicklable" else "parent_cannot"
    pid = pool.pids()[0]
    expected: type[BaseException] | None
    if ret == "ref":
        expected = None
    elif kind == "unpicklable":
        expected = PicklingBoom if ret == "value" else None
    else:
        expected = UnpicklingBoom
    if expected is None:
        got = OPS[op](api, factory, kind, attr, ret)
        assert isinstance(got, Ref), got
        assert got.getattr("value") == 7
    else:
        with pytest.raises(expected):
            OPS[op](api, factory, kind, attr, ret)
    assert pool.pids() == [pid]
    assert api.options(ret="auto").call(f"{M}.add", 1, 1) == 2
    assert nothing_pending(pool)
