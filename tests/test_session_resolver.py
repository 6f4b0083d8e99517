"""Where a session id comes from: ``resolve_session`` priority, auto-sessions per thread and per
asyncio task, context sessions (nesting, restoring), per-call overrides — first as a pure function,
then proven end to end with what the worker process actually received.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest
from conftest import expect_routed, run_in_thread
from hypothesis import given, settings
from hypothesis import strategies as st

import poolbridge
from poolbridge import Pool, SessionMismatchError, resolve_session

pytestmark = pytest.mark.backends  # every test with the module's ``pool``, on each backend

JOIN = 60.0  # bound for every thread join / barrier

valid_ids = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode("utf-8")) <= 256)


# -- the pure function ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "override", "context", "expected"),
    [
        ("ref", None, None, "ref"),
        ("ref", "ref", None, "ref"),
        ("ref", None, "ctx", "ref"),
        ("ref", "ref", "ctx", "ref"),
        (None, "ovr", None, "ovr"),
        (None, "ovr", "ctx", "ovr"),
        (None, None, "ctx", "ctx"),
    ],
)
def test_priority(pool: Pool, ref: str | None, override: str | None, context: str | None, expected: str) -> None:
    def resolve() -> str:
        return resolve_session(ref, override)

    if context is None:
        assert run_in_thread(resolve) == expected
    else:

        def with_context() -> str:
            with pool.session(context):
                return resolve()

        assert run_in_thread(with_context) == expected


def test_auto_session_is_last_resort_and_stable_within_a_thread() -> None:
    def twice() -> tuple[str, str]:
        return resolve_session(), resolve_session()

    a1, a2 = run_in_thread(twice)
    assert a1 == a2
    assert a1.startswith("auto-")


def test_override_disagreeing_with_ref_session_raises() -> None:
    with pytest.raises(SessionMismatchError, match="disagrees"):
        resolve_session("A", "B")


@given(ref=valid_ids, override=valid_ids)
@settings(max_examples=200, deadline=None)
def test_priority_property(ref: str, override: str) -> None:
    assert resolve_session(ref, None) == ref
    assert resolve_session(None, override) == override
    assert resolve_session(ref, ref) == ref
    if ref != override:
        with pytest.raises(SessionMismatchError):
            resolve_session(ref, override)


def test_context_session_nests_and_restores(pool: Pool) -> None:
    def body() -> list[str]:
        seen = [resolve_session()]
        with pool.session("outer"):
            seen.append(resolve_session())
            with pool.session("inner"):
                seen.append(resolve_session())
                seen.append(resolve_session(None, "override"))
            seen.append(resolve_session())
        seen.append(resolve_session())
        return seen

    auto, outer, inner, override, outer_again, auto_again = run_in_thread(body)
    assert (outer, inner, override, outer_again) == ("outer", "inner", "override", "outer")
    assert auto == auto_again and auto.startswith("auto-")


def test_context_session_restored_after_exception(pool: Pool) -> None:
    def body() -> tuple[str, str]:
        before = resolve_session()
        with pytest.raises(KeyError), pool.session("doomed"):
            raise KeyError("x")
        return before, resolve_session()

    before, after = run_in_thread(body)
    assert before == after


@pytest.mark.parametrize(
    ("bad", "exc"),
    [("", ValueError), ("x" * 257, ValueError), ("é" * 129, ValueError), (42, TypeError), (b"bytes", TypeError)],
)
def test_invalid_session_ids_rejected_everywhere(pool: Pool, bad: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        pool.options(session=bad)
    with pytest.raises(exc), pool.session(bad):
        pass  # pragma: no cover
    with pytest.raises(exc):
        pool.slot_for(bad)


@pytest.mark.parametrize("good", ["x", "x" * 256, "é" * 128, "ünïcødé-🙂", "with space/and:colons"])
def test_valid_session_ids_accepted(pool: Pool, good: str) -> None:
    expect_routed(pool, pool.options(session=good).call("pb_testmods.whoami"), good)
    with pool.session(good):
        expect_routed(pool, pool.call("pb_testmods.whoami"), good)


# -- auto-sessions, end to end -----------------------------------------------------------------


def test_each_thread_gets_its_own_auto_session(pool: Pool) -> None:
    n = 6
    barrier = threading.Barrier(n, timeout=JOIN)  # all alive at once: no thread id reuse
    results: dict[int, list[dict[str, Any]]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            first = pool.call("pb_testmods.whoami")
            second = pool.submit("pb_testmods.whoami").result(JOIN)
            results[i] = [first, second, {"resolved": resolve_session()}]
            barrier.wait()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    sessions = []
    for first, second, resolved in results.values():
        assert first["session"] == second["session"] == resolved["resolved"]
        expect_routed(pool, first, first["session"])
        expect_routed(pool, second, first["session"])
        sessions.append(first["session"])
    assert len(set(sessions)) == n, "threads shared an auto-session"
    main = pool.call("pb_testmods.whoami")["session"]
    assert main not in sessions


def test_thread_does_not_inherit_auto_session_even_with_copied_context(pool: Pool) -> None:
    mine = pool.call("pb_testmods.whoami")["session"]
    ctx = contextvars.copy_context()  # carries this thread's auto-session
    theirs = run_in_thread(ctx.run, pool.call, "pb_testmods.whoami")
    assert theirs["session"] != mine
    assert pool.call("pb_testmods.whoami")["session"] == mine


def test_thread_inherits_context_session_only_when_context_is_copied(pool: Pool) -> None:
    with pool.session("copied-ctx"):
        ctx = contextvars.copy_context()
        fresh = run_in_thread(pool.call, "pb_testmods.whoami")
    copied = run_in_thread(ctx.run, pool.call, "pb_testmods.whoami")
    expect_routed(pool, copied, "copied-ctx")
    assert fresh["session"] != "copied-ctx"


async def _whoami_async(pool: Pool) -> dict[str, Any]:
    return await asyncio.wait_for(asyncio.wrap_future(pool.submit("pb_testmods.whoami")), JOIN)


async def test_each_task_gets_its_own_auto_session(pool: Pool) -> None:
    async def task_body() -> tuple[dict[str, Any], dict[str, Any], str]:
        first = await _whoami_async(pool)
        await asyncio.sleep(0)  # let the other tasks interleave
        second = await _whoami_async(pool)
        return first, second, resolve_session()

    results = await asyncio.gather(*(task_body() for _ in range(5)))
    sessions = set()
    for first, second, resolved in results:
        assert first["session"] == second["session"] == resolved
        expect_routed(pool, first, resolved)
        sessions.add(resolved)
    assert len(sessions) == 5
    assert (await _whoami_async(pool))["session"] not in sessions


async def test_child_task_does_not_inherit_parent_auto_session(pool: Pool) -> None:
    parent = await _whoami_async(pool)

    async def child() -> dict[str, Any]:
        return await _whoami_async(pool)

    kid = await asyncio.create_task(child())
    grandchild_holder: list[dict[str, Any]] = []

    async def child_with_child() -> dict[str, Any]:
        me = await _whoami_async(pool)
        grandchild_holder.append(await asyncio.create_task(child()))
        return me

    kid2 = await asyncio.create_task(child_with_child())
    ids = [parent["session"], kid["session"], kid2["session"], grandchild_holder[0]["session"]]
    assert len(set(ids)) == 4, ids
    for seen in (parent, kid, kid2, grandchild_holder[0]):
        expect_routed(pool, seen, seen["session"])
    # the parent keeps its own session after its children ran
    assert (await _whoami_async(pool))["session"] == parent["session"]


async def test_child_task_inherits_context_session(pool: Pool) -> None:
    with pool.session("task-ctx"):

        async def child() -> dict[str, Any]:
            return await _whoami_async(pool)

        kid = await asyncio.create_task(child())
    expect_routed(pool, kid, "task-ctx")


async def test_blocking_call_inside_task_uses_task_auto_session(pool: Pool) -> None:
    async def body() -> tuple[str, str]:
        blocking = pool.call("pb_testmods.whoami")["session"]
        submitted = (await _whoami_async(pool))["session"]
        return blocking, submitted

    (b1, s1), (b2, s2) = await asyncio.gather(body(), body())
    assert b1 == s1 and b2 == s2 and b1 != b2


# -- context session and override, end to end ----------------------------------------------------


def test_context_session_overrides_auto_session(pool: Pool) -> None:
    def body() -> list[dict[str, Any]]:
        seen = [pool.call("pb_testmods.whoami")]
        with pool.session("ctx-A"):
            seen.append(pool.call("pb_testmods.whoami"))
            with pool.session("ctx-B"):
                seen.append(pool.call("pb_testmods.whoami"))
                seen.append(pool.submit("pb_testmods.whoami").result(JOIN))
            seen.append(pool.call("pb_testmods.whoami"))
        seen.append(pool.call("pb_testmods.whoami"))
        return seen

    auto, a, b, b_submit, a_again, auto_again = run_in_thread(body)
    expect_routed(pool, a, "ctx-A")
    expect_routed(pool, b, "ctx-B")
    expect_routed(pool, b_submit, "ctx-B")
    expect_routed(pool, a_again, "ctx-A")
    assert auto["session"] == auto_again["session"]
    assert auto["session"] not in ("ctx-A", "ctx-B")
    expect_routed(pool, auto, auto["session"])


@pytest.mark.parametrize("context", [None, "ctx-X"])
def test_override_reaches_the_payload(pool: Pool, context: str | None) -> None:
    sids = [f"ovr-{i}" for i in range(12)]

    def body() -> list[dict[str, Any]]:
        out = []
        for sid in sids:
            api = pool.options(session=sid)
            out.append(api.call("pb_testmods.whoami"))
            out.append(api.submit("pb_testmods.whoami").result(JOIN))
            out.append(api.options(timeout=30).call("pb_testmods.whoami"))  # inherited by derived views
        return out

    if context is None:
        seen = run_in_thread(body)
    else:
        with pool.session(context):
            seen = body()
    for i, sid in enumerate(sids):
        for s in seen[3 * i : 3 * i + 3]:
            expect_routed(pool, s, sid)


def test_override_view_does_not_change_the_pool(pool: Pool) -> None:
    view = pool.options(session="only-the-view")
    assert view.call("pb_testmods.whoami")["session"] == "only-the-view"
    assert pool.call("pb_testmods.whoami")["session"] != "only-the-view"


def test_public_resolve_session_matches_what_the_worker_sees(pool: Pool) -> None:
    def body() -> tuple[str, dict[str, Any]]:
        return poolbridge.resolve_session(), pool.call("pb_testmods.whoami")

    resolved, seen = run_in_thread(body)
    expect_routed(pool, seen, resolved)


# -- the asyncio face ------------------------------------------------------------------------------


async def test_async_pool_tasks_get_their_own_auto_sessions(pool: Pool) -> None:
    apool = pool.aio

    async def body() -> tuple[dict[str, Any], dict[str, Any], str]:
        first = await apool.call("pb_testmods.whoami")
        await asyncio.sleep(0)
        return first, await apool.call("pb_testmods.whoami"), resolve_session()

    results = await asyncio.gather(*(body() for _ in range(4)))
    for first, second, resolved in results:
        assert first["session"] == second["session"] == resolved
        expect_routed(pool, first, resolved)
    assert len({r for _, _, r in results}) == 4


async def test_async_pool_child_task_does_not_inherit_auto_session(pool: Pool) -> None:
    apool = pool.aio
    parent = await apool.call("pb_testmods.whoami")
    child = await asyncio.create_task(apool.call("pb_testmods.whoami"))
    assert child["session"] != parent["session"]
    assert (await apool.call("pb_testmods.whoami"))["session"] == parent["session"]


async def test_async_pool_context_and_override(pool: Pool) -> None:
    apool = pool.aio
    with apool.session("aio-ctx"):
        expect_routed(pool, await apool.call("pb_testmods.whoami"), "aio-ctx")
        expect_routed(pool, await apool.options(session="aio-ovr").call("pb_testmods.whoami"), "aio-ovr")
        kid = await asyncio.create_task(apool.call("pb_testmods.whoami"))
        expect_routed(pool, kid, "aio-ctx")  # a context session is inherited like any contextvar
    assert (await apool.call("pb_testmods.whoami"))["session"] not in ("aio-ctx", "aio-ovr")


async def test_sync_and_async_faces_share_the_task_session(pool: Pool) -> None:
    sync_seen = pool.call("pb_testmods.whoami")
    async_seen = await pool.aio.call("pb_testmods.whoami")
    assert sync_seen["session"] == async_seen["session"] == resolve_session()
