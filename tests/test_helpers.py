"""``@poolbridge.helper``: functions callable by name in every worker (modules listed in
``helpers=``), optionally receiving the session's SessionContext with per-session state."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from conftest import expect_routed, make_pool
from pb_testmods import sessions_on_slot

import poolbridge
from poolbridge import Pool

pytestmark = pytest.mark.backends  # every test with the module's ``pool``, on each backend


def sid() -> str:
    return f"h-{uuid.uuid4().hex[:8]}"


def test_helper_by_function_name(pool: Pool) -> None:
    assert pool.helper("pbh_add", 2, 3) == 5
    assert pool.options(session=sid()).helper("pbh_add", a=1, b=2) == 3


def test_helper_by_custom_name(pool: Pool) -> None:
    assert pool.helper("pbh_custom_name", 7) == ["custom", 7]
    with pytest.raises(LookupError):
        pool.helper("_pbh_registered_under_another_name", 7)  # only the given name is registered


def test_helper_with_empty_parentheses(pool: Pool) -> None:
    assert pool.helper("pbh_empty_parens", 21) == 42


def test_helper_runs_in_the_resolved_session(pool: Pool) -> None:
    s = sid()
    expect_routed(pool, pool.options(session=s).helper("pbh_whoami"), s)
    with pool.session(s):
        expect_routed(pool, pool.helper("pbh_whoami"), s)


def test_context_helper_receives_the_session_context(pool: Pool) -> None:
    s = sid()
    info = pool.options(session=s).helper("pbh_ctx")
    assert info == {
        "type": "SessionContext",
        "session": s,
        "slot": pool.slot_for(s),
        "generation": 0,
        "is_current": True,
    }


def test_context_helper_keeps_per_session_state(pool: Pool) -> None:
    a, b = sessions_on_slot(pool, 0, 2, f"state-{uuid.uuid4().hex[:6]}")  # one worker, two sessions
    pa, pb = pool.options(session=a), pool.options(session=b)
    assert pa.helper("pbh_remember", "k", "value-a") == 1
    assert pa.helper("pbh_remember", "k2", [1, 2]) == 2
    assert pb.helper("pbh_remember", "k", "value-b") == 1
    assert pa.helper("pbh_recall", "k") == "value-a"
    assert pa.helper("pbh_recall", "k2") == [1, 2]
    assert pb.helper("pbh_recall", "k") == "value-b"
    assert pb.helper("pbh_recall", "k2") == "<missing>"
    assert pa.helper("pbh_named_ctx", "x") == [a, ["k", "k2"]]
    # the context session reaches the same state
    with pool.session(a):
        assert pool.helper("pbh_recall", "k") == "value-a"


def test_close_session_drops_helper_state(pool: Pool) -> None:
    a, b = sessions_on_slot(pool, 1, 2, f"drop-{uuid.uuid4().hex[:6]}")
    pool.options(session=a).helper("pbh_remember", "k", "A")
    pool.options(session=b).helper("pbh_remember", "k", "B")
    pool.close_session(a)
    assert pool.options(session=a).helper("pbh_recall", "k") == "<missing>"
    assert pool.options(session=b).helper("pbh_recall", "k") == "B"  # another session untouched


def test_close_current_session_drops_helper_state(pool: Pool) -> None:
    s = sid()
    with pool.session(s):
        pool.helper("pbh_remember", "k", 1)
        assert pool.close_session() == 0  # no refs or streams, only state
        assert pool.helper("pbh_recall", "k") == "<missing>"


def test_helper_state_is_separate_per_auto_session(pool: Pool) -> None:
    import threading

    results: list[tuple[Any, Any]] = []

    def body() -> None:
        mine = uuid.uuid4().hex
        first = pool.helper("pbh_remember", "only-mine", mine)
        results.append((first, pool.helper("pbh_recall", "only-mine") == mine))

    threads = [threading.Thread(target=body) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert [first for first, _ in results] == [1, 1, 1]  # every thread started from empty state
    assert [ok for _, ok in results] == [True, True, True]


def test_helpers_need_their_module_listed() -> None:
    with make_pool(workers=1, helpers=[]) as p:
        with pytest.raises(LookupError, match="pbh_add"):
            p.helper("pbh_add", 1, 2)


def test_helper_module_that_fails_to_import_is_reported() -> None:
    with pytest.raises(Exception):  # noqa: B017 - either at start or on first use; never a hang
        with make_pool(workers=1, helpers=["no_such_helper_module_zz"]) as p:
            p.helper("pbh_add", 1, 2)


def test_helper_registration_in_process() -> None:
    from poolbridge import _helpers

    @poolbridge.helper("pb_test_inproc_name")
    def one() -> int:
        return 1

    assert _helpers.registry()["pb_test_inproc_name"].fn is one
    poolbridge.helper("pb_test_inproc_name")(one)  # the same function again is fine
    with pytest.raises(ValueError, match="already registered"):

        @poolbridge.helper("pb_test_inproc_name")
        def two() -> int:
            return 2

    del _helpers.registry()["pb_test_inproc_name"]


def test_idle_session_state_expires_with_ttl() -> None:
    with make_pool(workers=1, session_ttl=0.3) as p:
        api = p.options(session="short-lived")
        api.helper("pbh_remember", "k", "v")
        kept = p.options(session="also-idle")
        kept.helper("pbh_remember", "k", "still here")
        assert p.stats().sessions == 2
        deadline = time.monotonic() + 30
        while p.stats().slots[0].sessions == 2:  # bounded wait for the sweep (stats do not touch sessions)
            assert time.monotonic() < deadline, "idle session never expired"
            time.sleep(0.05)
        assert api.helper("pbh_recall", "k") == "<missing>"


def test_session_state_is_shared_by_helpers_and_plain_functions(pool: Pool) -> None:
    s = sid()
    api = pool.options(session=s)
    api.helper("pbh_remember", "from-helper", 1)

    def read_state() -> Any:
        import poolbridge as pb

        ctx = pb.current_session()
        assert ctx is not None
        ctx.state["from-function"] = 2
        return sorted(ctx.state)

    assert api.call(read_state) == ["from-function", "from-helper"]
    assert api.helper("pbh_recall", "from-function") == 2


def test_helper_options_apply(pool: Pool) -> None:
    ref = pool.options(session="h-ret", ret="ref").helper("pbh_add", 1, 2)
    assert isinstance(ref, poolbridge.Ref)
    assert pool.options(session="h-ret").call("operator.add", ref, 1) == 4


async def test_async_helpers(pool: Pool) -> None:
    s = sid()
    apool = pool.aio.options(session=s)
    assert await apool.helper("pbh_add", 2, 2) == 4
    assert await apool.helper("pbh_remember", "k", "v") == 1
    assert pool.options(session=s).helper("pbh_recall", "k") == "v"  # same session, same state
    assert await apool.close_session() == 0
    assert await apool.helper("pbh_recall", "k") == "<missing>"


def test_idle_session_refs_expire_with_ttl() -> None:
    with make_pool(workers=1, session_ttl=0.3) as p:
        ref = p.options(session="ttl-refs").create("pb_testmods.Counter", 1)
        deadline = time.monotonic() + 30
        while p.stats().refs:  # bounded wait for the sweep
            assert time.monotonic() < deadline, "idle session's refs never expired"
            time.sleep(0.05)
        with pytest.raises(poolbridge.RefNotFoundError):
            ref.getattr("n")


def test_concurrent_sessions_keep_separate_helper_state(pool: Pool) -> None:
    import threading

    n, rounds = 6, 30
    barrier = threading.Barrier(n, timeout=60)
    finals: dict[str, Any] = {}
    errors: list[BaseException] = []

    def body(i: int) -> None:
        s = f"conc-state-{i}-{uuid.uuid4().hex[:6]}"
        try:
            barrier.wait()
            with pool.session(s):
                for r in range(rounds):
                    pool.helper("pbh_remember", f"k{r}", i)
                finals[s] = pool.helper("pbh_named_ctx", "x")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    for s, (seen_session, keys) in finals.items():
        assert seen_session == s
        assert keys == sorted(f"k{r}" for r in range(rounds))
