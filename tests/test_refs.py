"""Refs: self-routing handles to objects kept in one session's store in one worker.

* a ref carries its session: used from any other context it still runs in its own session/slot;
* a ref never crosses sessions: an override that disagrees with it, or passing it as an argument
  in another session, is a SessionMismatchError raised before anything is sent;
* a ref id is meaningless in another session, even on the same worker (no leakage by guessing);
* lifecycle: release, drop-to-release, unencodable results as refs, ``ret=``, per-session cap.
"""

from __future__ import annotations

import asyncio
import gc
import pickle
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import expect_routed, make_pool, run_in_thread
from pb_testmods import session_not_on_slot, sessions_on_slot

import poolbridge
from poolbridge import Pool, Ref, RefNotFoundError, SessionMismatchError

WAIT = 60.0

pytestmark = pytest.mark.backends  # every test with the module's ``pool``, on each backend


def token() -> str:
    return uuid.uuid4().hex


def total_calls(pool: Pool) -> list[int]:
    return [s.calls for s in pool.stats().slots]


@pytest.fixture
def a_ref(pool: Pool) -> Iterator[tuple[Ref, str, str]]:
    """A Recorder ref in a session of its own, and the recorder's token."""
    sid = f"owner-{token()[:8]}"
    tok = token()
    ref = pool.options(session=sid).create("pb_testmods.Recorder", tok)
    yield ref, sid, tok
    pool.close_session(sid)


# -- 4. a ref carries its session ---------------------------------------------------------------

FOREIGN_CONTEXTS = ["context_session", "other_thread_auto", "main_thread_auto", "override_equal"]


def _in_foreign(pool: Pool, where: str, owner: str, fn: Callable[[Any], Any]) -> Any:
    if where == "context_session":
        with pool.session(f"foreign-{token()[:6]}"):
            return fn(pool)
    if where == "other_thread_auto":
        return run_in_thread(lambda: fn(pool))
    if where == "main_thread_auto":
        return fn(pool)
    if where == "override_equal":  # an override that agrees with the ref is fine
        with pool.session(f"foreign-{token()[:6]}"):
            return fn(pool.options(session=owner))
    raise AssertionError(where)  # pragma: no cover


REF_OPS: dict[str, Callable[[Any, Ref], Any]] = {
    "ref.call": lambda api, r: r.call("who"),
    "ref.submit": lambda api, r: r.submit("who").result(WAIT),
    "pool.method": lambda api, r: api.method(r, "who"),
    "pool.call(ref)": lambda api, r: api.call(r),
    "pool.submit(ref)": lambda api, r: api.submit(r).result(WAIT),
    "pool.getattr": lambda api, r: api.getattr(r, "where"),
    "ref.getattr": lambda api, r: r.getattr("where"),
    "pool.setattr": lambda api, r: (api.setattr(r, "where", 1), r.getattr("set_in"))[1],
    "ref.setattr": lambda api, r: (r.setattr("where", 2), r.getattr("set_in"))[1],
    "ref.options.call": lambda api, r: r.options(timeout=30).call("who"),
    "ref.call(ref args)": lambda api, r: r.call("who", r, [r], k={"r": r}),
}


@pytest.mark.parametrize("where", FOREIGN_CONTEXTS)
@pytest.mark.parametrize("op", sorted(REF_OPS))
def test_ref_op_runs_in_the_refs_session(pool: Pool, a_ref: tuple[Ref, str, str], op: str, where: str) -> None:
    ref, owner, _ = a_ref
    seen = _in_foreign(pool, where, owner, lambda api: REF_OPS[op](api, ref))
    expect_routed(pool, seen, owner)


@pytest.mark.parametrize("where", FOREIGN_CONTEXTS)
def test_release_from_another_context_runs_in_the_refs_session(
    pool: Pool, a_ref: tuple[Ref, str, str], where: str
) -> None:
    ref, owner, tok = a_ref
    _in_foreign(pool, where, owner, lambda api: api.release(ref))
    ((kind, seen),) = pool.options(session=owner).call("pb_testmods.pop_events", tok)
    assert kind == "del"
    expect_routed(pool, seen, owner)
    with pytest.raises(RefNotFoundError):
        ref.call("who")


@pytest.mark.parametrize("where", FOREIGN_CONTEXTS)
def test_stream_of_a_ref_runs_in_the_refs_session(pool: Pool, a_ref: tuple[Ref, str, str], where: str) -> None:
    """``pool.stream(ref, ...)``: the ref's session outranks the context, as for every other op."""
    ref, owner, _ = a_ref
    gen = pool.options(session=owner, ret="ref").getattr(ref, "gen")  # a ref to a bound method
    assert isinstance(gen, Ref) and gen.session_id == owner
    items = _in_foreign(pool, where, owner, lambda api: list(api.stream(gen, 3)))
    assert len(items) == 3
    for seen in items:
        expect_routed(pool, seen, owner)


async def test_ref_used_from_tasks_runs_in_its_session(pool: Pool, a_ref: tuple[Ref, str, str]) -> None:
    ref, owner, _ = a_ref

    async def use() -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(ref.submit("who")), WAIT)

    for seen in await asyncio.gather(use(), use(), use()):
        expect_routed(pool, seen, owner)


def test_ref_made_in_a_context_session_keeps_it_after_the_block(pool: Pool) -> None:
    with pool.session("made-in-block"):
        ref = pool.create("pb_testmods.Recorder", token())
    assert ref.session_id == "made-in-block"
    assert ref.slot == pool.slot_for("made-in-block")
    expect_routed(pool, ref.call("who"), "made-in-block")
    ref.release()


def test_ref_made_in_auto_session_is_usable_from_another_thread(pool: Pool) -> None:
    ref = run_in_thread(lambda: pool.create("pb_testmods.Recorder", token()))
    seen = ref.call("who")
    expect_routed(pool, seen, ref.session_id)
    assert ref.session_id != poolbridge.resolve_session()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda r: r,
        lambda r: [r],
        lambda r: (r, 1),
        lambda r: {"k": r},
        lambda r: [[(r,)]],
        lambda r: types.SimpleNamespace(inner=r),  # travels as a pickle; the ref inside still resolves
    ],
    ids=["plain", "list", "tuple", "dict", "nested", "pickled-object"],
)
def test_ref_argument_in_its_own_session_arrives_as_the_object(pool: Pool, wrap: Callable[[Ref], Any]) -> None:
    api = pool.options(session="arg-owner")
    ref = api.create("pb_testmods.Counter", 41)
    out = api.call(lambda x: repr(x), wrap(ref))
    assert "pb_testmods.Counter object" in out
    assert "Ref" not in out
    ref.release()


def test_ref_argument_can_be_mutated_in_place(pool: Pool) -> None:
    api = pool.options(session="arg-mutate")
    ref = api.create("pb_testmods.Counter", 1)
    api.call(lambda c: c.incr(10), ref)
    assert ref.getattr("n") == 11
    assert ref.call("incr") == 12


# -- 6. cross-session refs are rejected before anything is sent ------------------------------


MISMATCH_OPS: dict[str, Callable[[Any, Ref], Any]] = {
    "method": lambda api, r: api.method(r, "who"),
    "call(ref)": lambda api, r: api.call(r),
    "submit(ref)": lambda api, r: api.submit(r),
    "getattr": lambda api, r: api.getattr(r, "where"),
    "setattr": lambda api, r: api.setattr(r, "where", 1),
    "release": lambda api, r: api.release(r),
    "stream(ref)": lambda api, r: api.stream(r),
    "submit_method": lambda api, r: api.submit_method(r, "who"),
}


@pytest.mark.backends("process")  # the router's encoder refuses it: the same code on Ray, nothing sent
@pytest.mark.parametrize("same_slot", [True, False], ids=["B-same-slot", "B-other-slot"])
@pytest.mark.parametrize("op", sorted(MISMATCH_OPS))
def test_override_disagreeing_with_ref_raises_before_sending(
    pool: Pool, a_ref: tuple[Ref, str, str], op: str, same_slot: bool
) -> None:
    ref, owner, tok = a_ref
    other = (
        sessions_on_slot(pool, ref.slot, 1, f"B-{token()[:6]}")[0]
        if same_slot
        else session_not_on_slot(pool, ref.slot, f"B-{token()[:6]}")
    )
    gc.collect()
    pool.options(session=owner).call("pb_testmods.identity", 0)  # flush queued releases first
    before = total_calls(pool)
    with pytest.raises(SessionMismatchError):
        MISMATCH_OPS[op](pool.options(session=other), ref)
    with pytest.raises(SessionMismatchError):
        MISMATCH_OPS[op](ref.options(session=other)._api, ref)  # type: ignore[attr-defined]
    assert total_calls(pool) == before, "a request was sent"
    # the ref is untouched and still works in its own session
    assert pool.options(session=owner).call("pb_testmods.pop_events", tok) == []
    expect_routed(pool, ref.call("who"), owner)


def test_ref_view_with_disagreeing_session_raises(pool: Pool, a_ref: tuple[Ref, str, str]) -> None:
    ref, owner, _ = a_ref
    before = total_calls(pool)
    for act in (
        lambda v: v.call("who"),
        lambda v: v.getattr("where"),
        lambda v: v.setattr("where", 3),
    ):
        with pytest.raises(SessionMismatchError):
            act(ref.options(session=f"not-{owner}"))
    assert total_calls(pool) == before
    assert ref.getattr("set_in") is None


ARG_WRAPS: dict[str, Callable[[Ref], tuple[list[Any], dict[str, Any]]]] = {
    "positional": lambda r: ([r], {}),
    "keyword": lambda r: ([], {"x": r}),
    "in-list": lambda r: ([[1, r]], {}),
    "in-tuple": lambda r: ([(1, (r,))], {}),
    "in-dict": lambda r: ([{"k": [r]}], {}),
    "in-set": lambda r: ([{r}], {}),  # a set travels as a pickle
    "in-object": lambda r: ([types.SimpleNamespace(inner=r)], {}),  # a pickle too
}

SESSION_B_MODES = ["override", "context", "auto", "ref-target"]


@pytest.mark.backends("process")  # the router's encoder refuses it: the same code on Ray, nothing sent
@pytest.mark.parametrize("mode", SESSION_B_MODES)
@pytest.mark.parametrize("wrap", sorted(ARG_WRAPS))
def test_ref_of_session_a_as_argument_in_session_b_raises_before_sending(
    pool: Pool, a_ref: tuple[Ref, str, str], wrap: str, mode: str
) -> None:
    ref, owner, tok = a_ref
    args, kwargs = ARG_WRAPS[wrap](ref)
    b_session = sessions_on_slot(pool, ref.slot, 1, f"argB-{token()[:6]}")[0]  # same worker even
    b_target = pool.options(session=b_session).create("pb_testmods.Recorder", token())
    gc.collect()
    pool.options(session=b_session).call("pb_testmods.identity", 0)  # flush queued releases first
    before = total_calls(pool)

    def attempt() -> None:
        if mode == "override":
            pool.options(session=b_session).call("pb_testmods.record_call", tok, *args, **kwargs)
        elif mode == "context":
            with pool.session(b_session):
                pool.submit("pb_testmods.record_call", tok, *args, **kwargs)
        elif mode == "auto":
            run_in_thread(lambda: pool.call("pb_testmods.record_call", tok, *args, **kwargs))
        else:  # a method of a ref of session B, given a ref of session A
            b_target.call("who", *args, **kwargs)

    with pytest.raises(SessionMismatchError):
        attempt()
    assert total_calls(pool) == before, "a request was sent"
    assert pool.options(session=b_session).call("pb_testmods.pop_events", tok) == []
    assert pool.options(session=owner).call("pb_testmods.pop_events", tok) == []
    assert b_target.getattr("calls") == 0
    # the encoder is left clean: the next call of this thread works
    assert pool.options(session=b_session).call("pb_testmods.identity", (1, [2])) == (1, [2])
    pool.close_session(b_session)


def test_ref_of_session_a_as_stream_argument_in_session_b_raises(pool: Pool, a_ref: tuple[Ref, str, str]) -> None:
    ref, owner, _ = a_ref
    before = total_calls(pool)
    with pytest.raises(SessionMismatchError):
        pool.options(session=f"not-{owner}").stream("pb_testmods.gen_range", ref)
    assert total_calls(pool) == before


def test_ref_pickled_in_the_parent_cannot_be_rebuilt_outside_a_worker(pool: Pool, a_ref: tuple[Ref, str, str]) -> None:
    ref, _, _ = a_ref
    data = pickle.dumps(ref)
    with pytest.raises(RuntimeError, match="inside its worker"):
        pickle.loads(data)


# -- the worker checks again (defence in depth), on raw requests --------------------------------


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> Any:
    from poolbridge import _helpers, _worker

    monkeypatch.setattr(_worker, "_active", [None])
    monkeypatch.setattr(_helpers, "_current", [None])
    return _worker.WorkerCore(0, 2, 0)


def _raw(core: Any, op: str, session: str, fields: list[Any]) -> tuple[int, Any]:
    from poolbridge import _protocol

    req = _protocol.pack_plain([7, op, session, _protocol.pack_value(fields)])  # no client-side check
    req_id, status, body = _protocol.unpack_plain(core.handle(req))
    assert req_id == 7
    return status, (_protocol.unpack_plain(body) if status == _protocol.ERROR else body)


def test_worker_rejects_a_misrouted_payload(core: Any) -> None:
    from poolbridge import _hashing, _protocol

    sid = next(f"m-{i}" for i in range(1000) if _hashing.slot_for(f"m-{i}", 2) == 1)
    status, err = _raw(core, "call", sid, ["pb_testmods.whoami", [], {}, 0])
    assert status == _protocol.ERROR and err[0] == "misrouted"
    assert core.stats()["sessions"] == 0  # nothing was created for it


def test_worker_rejects_a_ref_of_another_session(core: Any) -> None:
    from poolbridge import _hashing, _protocol

    a, b = [f"w-{i}" for i in range(1000) if _hashing.slot_for(f"w-{i}", 2) == 0][:2]
    status, body = _raw(core, "call", a, ["pb_testmods.Counter", [5], {}, 1])
    assert status == _protocol.OK
    key = _protocol.unpack_plain(body)
    key = __import__("msgpack").unpackb(key.data)
    assert key[0] == a
    forged = _protocol.WireRef(*key)
    status, err = _raw(core, "call", b, ["pb_testmods.describe", [forged], {}, 0])
    assert status == _protocol.ERROR and err[0] == "session_mismatch"
    status, err = _raw(core, "method", b, [forged, "incr", [], {}, 0])
    assert status == _protocol.ERROR and err[0] == "session_mismatch"
    stale = _protocol.WireRef(a, key[1], 0, 5)
    status, err = _raw(core, "method", a, [stale, "incr", [], {}, 0])
    assert status == _protocol.ERROR and err[0] == "session_lost"


# -- 7. no leakage: a ref id means nothing in another session ----------------------------------


def test_guessed_ref_id_from_another_session_is_not_found(pool: Pool) -> None:
    slot = 0
    a, b = sessions_on_slot(pool, slot, 2, f"leak-{token()[:6]}")  # same worker process
    tok = token()
    a_ref = pool.options(session=a).create("pb_testmods.Recorder", tok)
    assert a_ref.slot == slot
    forged = Ref(pool, b, a_ref.ref_id, slot, a_ref.generation)
    for act in (
        lambda: forged.call("who"),
        lambda: forged.getattr("where"),
        lambda: forged.setattr("where", "hijacked"),
        lambda: pool.call(forged),
        lambda: pool.options(session=b).call("pb_testmods.describe", forged),
        lambda: forged.submit("who").result(WAIT),
        lambda: forged.release(),
    ):
        with pytest.raises(RefNotFoundError):
            act()
    # A's object was not touched
    assert a_ref.getattr("set_in") is None
    assert a_ref.getattr("calls") == 0
    assert pool.options(session=a).call("pb_testmods.pop_events", tok) == []
    expect_routed(pool, a_ref.call("who"), a)
    a_ref.release()


def test_brute_forced_ref_and_stream_ids_are_not_found(pool: Pool) -> None:
    slot = 1
    a, b = sessions_on_slot(pool, slot, 2, f"brute-{token()[:6]}")
    api_a = pool.options(session=a)
    refs = [api_a.create("pb_testmods.Counter", i) for i in range(3)]
    stream = api_a.options(batch=1).stream("pb_testmods.gen_range", 100)
    assert next(stream) == 0
    top = api_a.create("pb_testmods.Counter", 99).ref_id  # ids are allocated in increasing order
    for ref_id in range(0, top + 20):
        forged = Ref(pool, b, ref_id, slot, refs[0].generation)
        with pytest.raises(RefNotFoundError):
            forged.getattr("n")
        key = poolbridge._protocol.WireRef(b, ref_id, slot, refs[0].generation)
        with pytest.raises(RefNotFoundError):
            list(poolbridge.Stream(pool, key, [], False, 10))
    # A's stream and refs are intact
    assert [next(stream) for _ in range(3)] == [1, 2, 3]
    assert [r.getattr("n") for r in refs] == [0, 1, 2]
    stream.close()
    pool.close_session(a)


def test_forged_ref_with_wrong_slot_or_generation_is_rejected_locally(pool: Pool) -> None:
    sid = "forge-slot"
    real = pool.options(session=sid).create("pb_testmods.Counter", 1)
    gc.collect()  # handles earlier tests left in garbage cycles: released now (stats flushes them), not mid-test
    before = total_calls(pool)
    wrong_slot = Ref(pool, sid, real.ref_id, 1 - real.slot, real.generation)
    with pytest.raises(SessionMismatchError):
        wrong_slot.getattr("n")
    stale = Ref(pool, sid, real.ref_id, real.slot, real.generation + 1)
    with pytest.raises(poolbridge.SessionLostError):
        stale.getattr("n")
    assert total_calls(pool) == before
    assert real.getattr("n") == 1
    real.release()


def test_ref_of_another_pool_is_rejected(pool: Pool) -> None:
    with make_pool(workers=1) as other:
        foreign = other.options(session="x").create("pb_testmods.Counter", 1)
        with pytest.raises(ValueError, match="another pool"):
            pool.getattr(foreign, "n")
        assert foreign.getattr("n") == 1


# -- lifecycle ------------------------------------------------------------------------------


def test_released_ref_raises_ref_not_found(pool: Pool) -> None:
    api = pool.options(session="released")
    ref = api.create("pb_testmods.Counter", 3)
    ref.release()
    assert "released" in repr(ref)
    for act in (
        lambda: ref.call("incr"),
        lambda: ref.getattr("n"),
        lambda: ref.setattr("n", 1),
        lambda: api.call(ref),
        lambda: api.call("pb_testmods.identity", ref),
        lambda: ref.release(),
        lambda: ref.submit("incr").result(WAIT),
    ):
        with pytest.raises(RefNotFoundError):
            act()


def test_pool_release_then_use_raises(pool: Pool) -> None:
    api = pool.options(session="released-2")
    ref = api.create("pb_testmods.Counter", 3)
    pool.release(ref)
    with pytest.raises(RefNotFoundError):
        ref.getattr("n")
    with pytest.raises(RefNotFoundError):
        pool.release(ref)


def test_dropping_the_last_handle_releases_the_object(pool: Pool) -> None:
    sid, tok = "dropped", token()
    api = pool.options(session=sid)
    ref = api.create("pb_testmods.Recorder", tok)
    gc.collect()  # handles earlier tests left in garbage cycles: released now, not below with this one
    refs_before = pool.stats().slots[pool.slot_for(sid)].refs
    del ref
    gc.collect()
    # the release is queued and goes out ahead of this session's next request, in the same worker
    events = api.call("pb_testmods.pop_events", tok)
    assert [k for k, _ in events] == ["del"]
    expect_routed(pool, events[0][1], sid)
    assert pool.stats().slots[pool.slot_for(sid)].refs == refs_before - 1


def test_unencodable_result_comes_back_as_a_ref(pool: Pool) -> None:
    api = pool.options(session="lock-owner")
    lock = api.call("pb_testmods.make_lock")
    assert isinstance(lock, Ref)
    assert lock.session_id == "lock-owner" and lock.slot == pool.slot_for("lock-owner")
    assert lock.call("acquire") is True
    assert lock.call("locked") is True
    assert "lock" in api.call("pb_testmods.describe", lock)
    lock.call("release")
    assert lock.call("locked") is False
    whole = api.call("pb_testmods.make_unencodable_list")
    assert isinstance(whole, Ref)
    assert api.call(len, whole) == 2
    assert isinstance(api.getattr(whole, "__class__"), type)  # list is picklable by reference


def test_ret_ref_returns_a_ref_for_a_plain_value(pool: Pool) -> None:
    api = pool.options(session="ret-ref")
    ref = api.options(ret="ref").call("operator.add", 40, 2)
    assert isinstance(ref, Ref)
    assert ref.session_id == "ret-ref"
    assert api.call("operator.mul", ref, 2) == 84
    assert api.call("pb_testmods.identity", ref) == 42
    got = api.options(ret="ref").getattr("math.pi")
    assert isinstance(got, Ref)
    assert api.call("builtins.round", got, 2) == 3.14


def test_ret_value_refuses_unencodable(pool: Pool) -> None:
    api = pool.options(session="ret-value")
    assert api.options(ret="value").call("operator.add", 1, 2) == 3
    with pytest.raises(TypeError):
        api.options(ret="value").call("pb_testmods.make_lock")
    assert api.call("operator.add", 2, 2) == 4  # the worker and the session are fine


def test_create_always_returns_a_ref(pool: Pool) -> None:
    ref = pool.options(session="create").create("builtins.int", 5)
    assert isinstance(ref, Ref)
    assert pool.options(session="create").call("operator.add", ref, 1) == 6


@pytest.mark.parametrize("bad", ["refs", "", "VALUE"])
def test_invalid_ret_option(pool: Pool, bad: str) -> None:
    with pytest.raises(ValueError):
        pool.options(ret=bad)


def test_refs_count_in_stats_and_close_session_drops_them(pool: Pool) -> None:
    sid = f"count-{token()[:6]}"
    slot = pool.slot_for(sid)
    gc.collect()
    pool.options(session=sid).call("pb_testmods.identity", 0)
    base = pool.stats().slots[slot].refs
    refs = [pool.options(session=sid).create("pb_testmods.Counter", i) for i in range(4)]
    assert pool.stats().slots[slot].refs == base + 4
    assert pool.close_session(sid) == 4
    assert pool.stats().slots[slot].refs == base
    for r in refs:
        with pytest.raises(RefNotFoundError):
            r.getattr("n")


def test_per_session_ref_cap() -> None:
    with make_pool(workers=1, max_refs_per_session=3) as p:
        a = p.options(session="capped")
        refs = [a.create("pb_testmods.Counter", i) for i in range(3)]
        with pytest.raises(poolbridge.SessionLimitError):
            a.create("pb_testmods.Counter", 3)
        with pytest.raises(poolbridge.SessionLimitError):
            a.stream("pb_testmods.gen_range", 10)  # streams count toward the cap
        # other sessions are not affected
        assert p.options(session="other").create("pb_testmods.Counter", 9).getattr("n") == 9
        refs.pop().release()
        kept = a.create("pb_testmods.Counter", 4)  # kept alive: a dropped handle frees its slot
        assert kept.getattr("n") == 4
        # an auto-ref (unencodable result) is capped too
        with pytest.raises(poolbridge.SessionLimitError):
            a.call("pb_testmods.make_lock")


def test_ref_after_pool_close_raises_pool_closed() -> None:
    p = make_pool(workers=1)
    ref = p.options(session="closing").create("pb_testmods.Counter", 1)
    p.close()
    with pytest.raises(poolbridge.PoolClosedError):
        ref.getattr("n")
    del ref
    gc.collect()  # dropping a handle of a closed pool is silent


async def test_async_ref_ops_from_a_foreign_task_run_in_the_refs_session(
    pool: Pool, a_ref: tuple[Ref, str, str]
) -> None:
    ref, owner, tok = a_ref
    apool = pool.aio
    with pool.session("foreign-async"):
        seen = [
            await ref.acall("who"),
            await apool.method(ref, "who"),
            await apool.call(ref),
            await apool.getattr(ref, "where"),
            await ref.agetattr("where"),
        ]
        gen = await apool.options(session=owner, ret="ref").getattr(ref, "gen")
        seen += [item async for item in apool.stream(gen, 2)]
    for s in seen:
        expect_routed(pool, s, owner)
    with pytest.raises(SessionMismatchError):
        await apool.options(session="foreign-async").method(ref, "who")
    with pytest.raises(SessionMismatchError):
        await apool.options(session="foreign-async").call("pb_testmods.record_call", tok, ref)
    assert pool.options(session=owner).call("pb_testmods.pop_events", tok) == [("call", seen[2])]


def test_ref_of_another_pool_as_argument_is_rejected() -> None:
    """Ref ids are per worker process: a ref of pool B given to pool A must not silently name
    whatever object A happens to hold under the same (session, id)."""
    with make_pool(workers=1) as pa, make_pool(workers=1) as pb:
        mine = pa.options(session="s").create("pb_testmods.Counter", 1)
        theirs = pb.options(session="s").create("pb_testmods.Counter", 100)
        assert (mine.session_id, mine.ref_id, mine.slot) == (theirs.session_id, theirs.ref_id, theirs.slot)
        cases = [
            (lambda r: r, lambda x: x.n),
            (lambda r: [r], lambda x: x[0].n),
            (lambda r: types.SimpleNamespace(inner=r), lambda x: x.inner.n),  # travels as a pickle
        ]
        for wrap, read in cases:
            try:
                got = pa.options(session="s").call(read, wrap(theirs))
            except ValueError:  # e.g. "belongs to another pool" (SessionMismatchError is one too)
                continue
            pytest.fail(f"pool A resolved pool B's ref to its own object (n={got}, expected an error)")
        assert theirs.getattr("n") == 100 and mine.getattr("n") == 1


def test_same_session_ref_argument_with_a_ref_target_from_a_foreign_context(
    pool: Pool, a_ref: tuple[Ref, str, str]
) -> None:
    ref, owner, _ = a_ref
    other = pool.options(session=owner).create("pb_testmods.Counter", 5)
    with pool.session("foreign-args"):
        seen = ref.call("who", other, [other], k=other)  # the target ref decides: all in ``owner``
        with pytest.raises(SessionMismatchError):  # no ref target: the context session decides
            pool.call("pb_testmods.describe", other)
    expect_routed(pool, seen, owner)
    assert pool.options(session=owner).call(lambda c, r: (c.n, type(r).__name__), other, ref) == (5, "Recorder")


def test_ref_handles_compare_by_identity_of_the_remote_object(pool: Pool) -> None:
    api = pool.options(session="eq")
    a = api.create("pb_testmods.Counter", 1)
    same = Ref(pool, a.session_id, a.ref_id, a.slot, a.generation)
    b = api.create("pb_testmods.Counter", 1)
    assert a == same and hash(a) == hash(same)
    assert a != b
    same._released = True  # a second handle: do not let it release the object when dropped
    assert a.getattr("n") == 1


@pytest.mark.parametrize(
    "act",
    [
        lambda p, r: p.getattr(r),
        lambda p, r: p.getattr("math.pi", "x"),
        lambda p, r: p.getattr(42),
        lambda p, r: p.getattr(r, 5),
    ],
    ids=["ref-without-name", "path-with-name", "not-a-target", "name-not-str"],
)
def test_getattr_misuse(pool: Pool, act: Callable[[Pool, Ref], Any]) -> None:
    ref = pool.options(session="misuse").create("pb_testmods.Counter", 1)
    with pytest.raises(TypeError):
        act(pool, ref)


@pytest.mark.parametrize("bad", ["", 5, None, ["x"], {"a": 1}], ids=["empty", "int", "nil", "list", "map"])
def test_worker_rejects_a_malformed_session_as_bad_request(core: Any, bad: Any) -> None:
    from poolbridge import _protocol

    status, err = _raw(core, "call", bad, ["pb_testmods.whoami", [], {}, 0])
    assert status == _protocol.ERROR
    assert err[0] == "bad_request", err[:3]


def test_a_ref_shared_by_many_threads_is_used_in_one_worker(pool: Pool) -> None:
    ref = pool.options(session="shared-counter").create("pb_testmods.Counter", 0)
    n_threads, per_thread = 8, 40
    barrier = threading.Barrier(n_threads, timeout=WAIT)
    errors: list[BaseException] = []

    def body(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                if i % 2:
                    ref.call("incr")
                else:
                    ref.submit("incr").result(WAIT)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert ref.getattr("n") == n_threads * per_thread  # one object, one process: no lost update
    ref.release()


def test_a_sessions_operations_run_in_order_under_concurrent_senders(pool: Pool) -> None:
    """Each of 8 threads submits 60 operations on its own session's ref: every session sees them in
    its submission order, whatever the other senders do (on Ray, requests queued behind a busy actor
    go as one batch call: in order too)."""
    results: dict[str, list[Any]] = {}
    errors: list[BaseException] = []

    def run(sid: str) -> None:
        try:
            counter = pool.options(session=sid).create("pb_testmods.Counter", 0)
            futures = [counter.submit("incr") for _ in range(60)]
            results[sid] = [f.result(timeout=WAIT) for f in futures] + [counter.call("incr", 0)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"ord-{token()[:6]}-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert not errors and len(results) == 8, errors[:3]
    for values in results.values():
        assert values == [*range(1, 61), 60]


async def test_a_refused_async_release_leaves_the_ref_live(pool: Pool) -> None:
    """A release refused before sending (session mismatch) must not mark the handle released:
    the object is still there, and dropping the handle must still release it."""
    sid, tok = f"arel-{token()[:6]}", token()
    ref = pool.options(session=sid).create("pb_testmods.Recorder", tok)
    with pytest.raises(SessionMismatchError):
        await pool.aio.options(session=f"not-{sid}").release(ref)
    assert "released" not in repr(ref)
    expect_routed(pool, ref.call("who"), sid)
    del ref
    gc.collect()
    assert [k for k, _ in pool.options(session=sid).call("pb_testmods.pop_events", tok)] == ["del"]


@pytest.mark.parametrize("where", FOREIGN_CONTEXTS)
def test_create_from_a_class_ref_runs_in_the_refs_session(pool: Pool, a_ref: tuple[Ref, str, str], where: str) -> None:
    _, owner, _ = a_ref
    cls = pool.options(session=owner, ret="ref").getattr("pb_testmods.Recorder")
    made = _in_foreign(pool, where, owner, lambda api: api.create(cls, token()))
    assert made.session_id == owner
    expect_routed(pool, made.getattr("created_in"), owner)


def test_refs_made_from_stream_items_count_against_the_cap() -> None:
    """Every ref and stream a worker makes goes through one store, under the per-session cap —
    including unencodable stream items handed over as refs."""
    with make_pool(workers=1, max_refs_per_session=3) as p:
        api = p.options(session="capped", batch=10)
        with pytest.raises(poolbridge.SessionLimitError):
            list(api.stream("pb_testmods.gen_locks", 5))  # the stream itself + 2 item refs fill it
        stats = p.stats().slots[0]
        assert (stats.refs, stats.streams) == (0, 0)  # the lost batch left no refs and no open stream
        items = list(api.stream("pb_testmods.gen_locks", 2))  # stream + 2 refs: within the cap
        assert all(isinstance(i, poolbridge.Ref) for i in items)
