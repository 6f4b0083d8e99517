"""The one invariant, end to end: for every operation, the session the worker received (and keys
its store by) is the resolved session, and the worker that ran it is ``pids()[slot_for(session)]``.

``test_every_path_runs_in_the_resolved_session`` is the single table over all call paths; each path
returns the ``whoami()`` observations the worker made while serving it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import expect_routed, run_in_thread
from hypothesis import given, settings
from hypothesis import strategies as st

import poolbridge
from poolbridge import Pool, _hashing

WAIT = 60.0
Obs = list[dict[str, Any]]


def _token() -> str:
    return uuid.uuid4().hex


def _events(api: Any, token: str, kind: str) -> Obs:
    return [who for k, who in api.call("pb_testmods.pop_events", token) if k == kind]


class Resolved:
    """How a case resolves its session: ``api`` is the pool or an options view (already inside the
    context the mode set up); ``aio()`` the same as an AsyncPool; ``expected`` the session."""

    def __init__(self, pool: Pool, mode: str, api: Any, expected: str, override: str | None) -> None:
        self.pool, self.mode, self.api, self.expected, self.override = pool, mode, api, expected, override

    def aio(self) -> Any:
        apool = self.pool.aio
        return apool if self.override is None else apool.options(session=self.override)

    def run_async(self, coro_fn: Callable[[], Any]) -> Obs:
        """Run a coroutine as the main task of a new loop; in auto mode that task has its own
        auto-session, so the expected session is resolved inside it."""

        async def main() -> Obs:
            if self.mode == "auto":
                self.expected = poolbridge.resolve_session()
            # awaited directly, not via wait_for (which would run it in a child task with its own
            # auto-session); pytest-timeout bounds it
            return await coro_fn()  # type: ignore[no-any-return]

        return asyncio.run(main())


# Every path takes (pool, r: Resolved) and returns what the worker observed.


def path_call_by_path(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    return [api.call("pb_testmods.whoami")]


def path_call_callable(pool: Pool, r: Resolved) -> Obs:
    api = r.api

    def probe(x: int) -> Any:  # a closure: cloudpickled by value, not importable by name
        import pb_testmods

        info = pb_testmods.whoami()
        info["x"] = x
        return info

    seen = api.call(probe, 7)
    assert seen.pop("x") == 7
    return [seen]


def path_call_lambda(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    return [api.call(lambda: __import__("pb_testmods").whoami())]


def path_submit(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    return [api.submit("pb_testmods.whoami").result(WAIT)]


def path_submit_callable(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    return [api.submit(lambda: __import__("pb_testmods").whoami()).result(WAIT)]


def path_getattr_module(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    return [api.getattr("pb_attrmod.session_info")]


def path_create(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    ref = api.create("pb_testmods.Recorder", _token())
    assert isinstance(ref, poolbridge.Ref)
    return [ref.getattr("created_in"), _ref_as_obs(pool, ref)]


def path_create_from_ref(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    cls = api.options(ret="ref").getattr("pb_testmods.Recorder")  # the class itself, kept as a ref
    assert isinstance(cls, poolbridge.Ref)
    ref = api.create(cls, _token())
    return [ref.getattr("created_in"), _ref_as_obs(pool, ref), _ref_as_obs(pool, cls)]


def path_method(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    ref = api.create("pb_testmods.Recorder", _token())
    return [api.method(ref, "who"), ref.call("who")]


def path_ref_submit(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    ref = api.create("pb_testmods.Recorder", _token())
    return [ref.submit("who").result(WAIT)]


def path_call_ref(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    ref = api.create("pb_testmods.Recorder", _token())
    return [api.call(ref), api.submit(ref).result(WAIT)]


def path_getattr_property(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    ref = api.create("pb_testmods.Recorder", _token())
    return [api.getattr(ref, "where"), ref.getattr("where")]


def path_setattr_property(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    ref = api.create("pb_testmods.Recorder", _token())
    api.setattr(ref, "where", "first")
    first = ref.getattr("set_in")
    ref.setattr("where", "second")
    second = ref.getattr("set_in")
    assert ref.getattr("value") == "second"
    return [first, second]


def path_helper(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    return [api.helper("pbh_whoami")]


def path_helper_context(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    info = api.helper("pbh_ctx")
    assert info["is_current"] is True
    slot = pool.slot_for(info["session"])
    return [{"session": info["session"], "slot": info["slot"], "generation": 0, "pid": pool.pids()[slot]}]


def path_stream(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    stream = api.stream("pb_testmods.gen_whoami", 2)
    items = list(stream)
    assert len(items) == 2
    return [*items, _stream_as_obs(pool, stream)]


def path_stream_next(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    # batch=1: item 0 comes with the open, items 1.. each from a stream_next request
    stream = api.options(batch=1).stream("pb_testmods.gen_whoami", 4)
    items = list(stream)
    assert len(items) == 4
    return [*items, _stream_as_obs(pool, stream)]


def path_stream_close(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    token = _token()
    stream = api.options(batch=1).stream("pb_testmods.gen_with_finally", token, 10)
    assert next(stream) == 0
    stream.close()
    return _events(api, token, "finally")


def path_release(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    token = _token()
    ref = api.create("pb_testmods.Recorder", token)
    api.release(ref)
    dropped = _events(api, token, "del")
    assert len(dropped) == 1, "release did not drop the object in the worker"
    return dropped


def path_ref_release(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    token = _token()
    ref = api.create("pb_testmods.Recorder", token)
    ref.release()
    dropped = _events(api, token, "del")
    assert len(dropped) == 1
    return dropped


def path_close_session(pool: Pool, r: Resolved) -> Obs:
    api = r.api
    token = _token()
    refs = [api.create("pb_testmods.Recorder", token) for _ in range(2)]
    assert api.close_session() >= 2
    dropped = _events(api, token, "del")
    assert len(dropped) == 2, "close_session did not drop the session's objects in the worker"
    del refs
    return dropped


async def _aio_events(apool: Any, token: str, kind: str) -> Obs:
    return [who for k, who in await apool.call("pb_testmods.pop_events", token) if k == kind]


def path_aio_call(pool: Pool, r: Resolved) -> Obs:
    async def go() -> Obs:
        apool = r.aio()
        return [await apool.call("pb_testmods.whoami"), await apool.submit("pb_testmods.whoami")]

    return r.run_async(go)


def path_aio_create_method_getattr(pool: Pool, r: Resolved) -> Obs:
    async def go() -> Obs:
        apool = r.aio()
        ref = await apool.create("pb_testmods.Recorder", _token())
        return [
            await ref.agetattr("created_in"),
            await apool.method(ref, "who"),
            await ref.acall("who"),
            await apool.getattr(ref, "where"),
            _ref_as_obs(pool, ref),
        ]

    return r.run_async(go)


def path_aio_setattr(pool: Pool, r: Resolved) -> Obs:
    async def go() -> Obs:
        apool = r.aio()
        ref = await apool.create("pb_testmods.Recorder", _token())
        await apool.setattr(ref, "where", 1)
        first = await ref.agetattr("set_in")
        await ref.asetattr("where", 2)
        return [first, await ref.agetattr("set_in")]

    return r.run_async(go)


def path_aio_getattr_module(pool: Pool, r: Resolved) -> Obs:
    async def go() -> Obs:
        return [await r.aio().getattr("pb_attrmod.session_info")]

    return r.run_async(go)


def path_aio_helper(pool: Pool, r: Resolved) -> Obs:
    async def go() -> Obs:
        return [await r.aio().helper("pbh_whoami")]

    return r.run_async(go)


def path_aio_stream(pool: Pool, r: Resolved) -> Obs:
    async def go() -> Obs:
        stream = r.aio().options(batch=1).stream("pb_testmods.gen_whoami", 3)
        items = [item async for item in stream]
        assert len(items) == 3
        return items

    return r.run_async(go)


def path_aio_stream_close(pool: Pool, r: Resolved) -> Obs:
    async def go() -> Obs:
        apool = r.aio()
        token = _token()
        async with apool.options(batch=1).stream("pb_testmods.gen_with_finally", token, 10) as stream:
            assert await stream.__anext__() == 0
        return await _aio_events(apool, token, "finally")

    return r.run_async(go)


def path_aio_release(pool: Pool, r: Resolved) -> Obs:
    async def go() -> Obs:
        apool = r.aio()
        token = _token()
        await apool.release(await apool.create("pb_testmods.Recorder", token))
        ref = await apool.create("pb_testmods.Recorder", token)
        await ref.arelease()
        dropped = await _aio_events(apool, token, "del")
        assert len(dropped) == 2
        return dropped

    return r.run_async(go)


def path_aio_close_session(pool: Pool, r: Resolved) -> Obs:
    async def go() -> Obs:
        apool = r.aio()
        token = _token()
        refs = [await apool.create("pb_testmods.Recorder", token) for _ in range(2)]
        assert await apool.close_session() >= 2
        dropped = await _aio_events(apool, token, "del")
        assert len(dropped) == 2
        del refs
        return dropped

    return r.run_async(go)


def _ref_as_obs(pool: Pool, ref: poolbridge.Ref) -> dict[str, Any]:
    return {"session": ref.session_id, "slot": ref.slot, "generation": ref.generation, "pid": pool.pids()[ref.slot]}


def _stream_as_obs(pool: Pool, stream: poolbridge.Stream) -> dict[str, Any]:
    slot = pool.slot_for(stream.session_id)
    return {"session": stream.session_id, "slot": slot, "generation": 0, "pid": pool.pids()[slot]}


PATHS: dict[str, Callable[[Pool, Any], Obs]] = {
    name[len("path_") :]: fn for name, fn in list(globals().items()) if name.startswith("path_")
}
EXPECTED_PATHS = {
    "create_from_ref",
    "call_by_path",
    "call_callable",
    "call_lambda",
    "submit",
    "submit_callable",
    "getattr_module",
    "create",
    "method",
    "ref_submit",
    "call_ref",
    "getattr_property",
    "setattr_property",
    "helper",
    "helper_context",
    "stream",
    "stream_next",
    "stream_close",
    "release",
    "ref_release",
    "close_session",
    "aio_call",
    "aio_create_method_getattr",
    "aio_setattr",
    "aio_getattr_module",
    "aio_helper",
    "aio_stream",
    "aio_stream_close",
    "aio_release",
    "aio_close_session",
}

_counter = itertools.count()


@contextmanager
def resolution(pool: Pool, mode: str) -> Iterator[Resolved]:
    """The session set up the way ``mode`` says."""
    sid = f"paths-{mode}-{next(_counter)}"
    if mode == "override":
        yield Resolved(pool, mode, pool.options(session=sid), sid, sid)
    elif mode == "override_in_context":
        with pool.session(f"ignored-{sid}"):
            yield Resolved(pool, mode, pool.options(session=sid), sid, sid)
    elif mode == "context":
        with pool.session(sid):
            yield Resolved(pool, mode, pool, sid, None)
    elif mode == "auto":
        yield Resolved(pool, mode, pool, poolbridge.resolve_session(), None)
    else:  # pragma: no cover
        raise AssertionError(mode)


def test_path_table_is_complete() -> None:
    assert set(PATHS) == EXPECTED_PATHS


@pytest.mark.backends
@pytest.mark.parametrize("mode", ["override", "override_in_context", "context", "auto"])
@pytest.mark.parametrize("path", sorted(EXPECTED_PATHS))
def test_every_path_runs_in_the_resolved_session(pool: Pool, path: str, mode: str) -> None:
    def body() -> tuple[Obs, str]:  # a fresh thread: a fresh auto-session per case
        with resolution(pool, mode) as r:
            observations = PATHS[path](pool, r)
            return observations, r.expected

    observations, expected = run_in_thread(body)
    assert observations, "the path reported nothing"
    for seen in observations:
        expect_routed(pool, seen, expected)
        assert seen["generation"] == 0


@pytest.mark.backends
def test_module_attribute_is_read_per_session(pool: Pool) -> None:
    """``getattr`` of a module attribute is evaluated for the session asking, every time."""
    for sid in _same_slot(pool, 0, 3, "modattr"):  # one worker, several sessions
        expect_routed(pool, pool.options(session=sid).getattr("pb_attrmod.session_info"), sid)


@pytest.mark.backends
def test_module_attribute_reads_are_not_stale(pool: Pool) -> None:
    api = pool.options(session="modattr-counter")
    before = api.getattr("pb_attrmod.COUNTER")
    assert api.call("pb_attrmod.bump") == before + 1
    assert api.getattr("pb_attrmod.COUNTER") == before + 1


def _same_slot(pool: Pool, slot: int, n: int, prefix: str) -> list[str]:
    from pb_testmods import sessions_on_slot

    return sessions_on_slot(pool, slot, n, prefix)


# -- routing is deterministic -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool3() -> Iterator[Pool]:
    with Pool(workers=3) as p:
        yield p


def test_routing_is_deterministic_over_many_sessions(pool3: Pool) -> None:
    pids = pool3.pids()
    assert len(pids) == 3 and len(set(pids)) == 3
    sessions = [f"route-{i}" for i in range(300)]
    futures = [(s, pool3.options(session=s).submit("pb_testmods.whoami")) for s in sessions]
    used = set()
    for sid, fut in futures:
        seen = fut.result(WAIT)
        slot = pool3.slot_for(sid)
        assert slot == _hashing.slot_for(sid, 3) == poolbridge.jump_hash(poolbridge.stable_hash64(sid), 3)
        assert seen == {"session": sid, "slot": slot, "generation": 0, "pid": pids[slot]}
        used.add(slot)
    assert used == {0, 1, 2}
    # and again: the same session always lands in the same worker
    for sid in sessions[:50]:
        assert pool3.options(session=sid).call("pb_testmods.getpid") == pids[pool3.slot_for(sid)]
    assert pool3.pids() == pids


@given(sid=st.text(min_size=1, max_size=30).filter(lambda s: len(s.encode("utf-8")) <= 256))
@settings(max_examples=60, deadline=None)
def test_routing_property(pool3: Pool, sid: str) -> None:
    slot = pool3.slot_for(sid)
    assert slot == _hashing.slot_for(sid, 3)
    seen = pool3.options(session=sid).call("pb_testmods.whoami")
    assert seen == {"session": sid, "slot": slot, "generation": 0, "pid": pool3.pids()[slot]}


@pytest.mark.backends
def test_slot_for_depends_only_on_id_and_worker_count(pool: Pool, pool3: Pool) -> None:
    for i in range(200):
        sid = f"pure-{i}"
        assert pool.slot_for(sid) == _hashing.slot_for(sid, 2)
        assert pool3.slot_for(sid) == _hashing.slot_for(sid, 3)
        assert pool.options(session="unrelated").slot_for(sid) == pool.slot_for(sid)


def test_workers_are_children_of_this_process(pool: Pool) -> None:
    import psutil

    children = {p.pid for p in psutil.Process().children(recursive=True)}
    assert set(pool.pids()) <= children
    assert len(set(pool.pids())) == pool.workers == 2


# -- many callers at once: every reply reaches its own caller -------------------------------------


def test_concurrent_callers_get_their_own_replies(pool3: Pool) -> None:
    n_threads, per_thread = 8, 60
    barrier = threading.Barrier(n_threads, timeout=WAIT)
    errors: list[BaseException] = []

    def caller(t: int) -> None:
        try:
            barrier.wait()
            futures = []
            for i in range(per_thread):
                sid = f"conc-{(t * 7 + i) % 23}"
                api = pool3.options(session=sid)
                if i % 3 == 0:
                    seen = api.call("pb_testmods.whoami", t, i)
                    assert seen["session"] == sid and seen["pid"] == pool3.pids()[pool3.slot_for(sid)]
                    assert api.call("pb_testmods.identity", (t, i)) == (t, i)
                else:
                    futures.append(((t, i, sid), api.submit("pb_testmods.identity", (t, i, sid))))
            for expected, fut in futures:
                assert fut.result(WAIT) == expected
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]


@pytest.mark.parametrize("size", [1 << 16, 3 * (1 << 20) + 17])
def test_large_payloads_both_ways(pool3: Pool, size: int) -> None:
    blob = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    api = pool3.options(session=f"big-{size}")
    assert api.call("pb_testmods.identity", blob) == blob
    futures = [pool3.options(session=f"big-{size}-{i}").submit("pb_testmods.identity", blob) for i in range(6)]
    for fut in futures:
        assert fut.result(WAIT) == blob
    items = list(api.options(batch=4).stream(lambda b: (b for _ in range(10)), blob))
    assert len(items) == 10 and all(item == blob for item in items)
