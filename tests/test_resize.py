"""Pool.resize: sessions move with their state; only the sessions jump hash moves; what cannot move
is reported; refuse changes nothing; a worker killed mid-move costs only its own sessions."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import poolbridge
from poolbridge import SessionLostError

pytestmark = pytest.mark.timeout(180)

WAIT = 120.0  # every join is bounded


def _sessions_moving(sessions: list[str], old: int, new: int, slot_for: Any) -> set[str]:
    return {s for s in sessions if slot_for(s, old) != slot_for(s, new)}


def _log_refs(pool: poolbridge.Pool, sessions: list[str]) -> dict[str, Any]:
    return {s: pool.options(session=s, ret="ref").call("pb_resizemods.Log", s) for s in sessions}


def test_grow_and_shrink_under_load(pool_maker: Any) -> None:
    pool = pool_maker(workers=2, helpers=["pb_resizemods"])
    sessions = [f"load-{i}" for i in range(1000)]
    refs = _log_refs(pool, sessions)
    sent = dict.fromkeys(sessions, 0)
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller(mine: list[str]) -> None:
        try:
            while not stop.is_set():
                for s in mine:
                    n = sent[s] + 1
                    session, count, _pid = refs[s].call("add", n)
                    assert (session, count) == (s, n), (s, n, session, count)
                    sent[s] = n
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(sessions[i::4],), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    records = []
    try:
        for n in (3, 5, 4, 2, 3):
            records.append(pool.resize(n))
            assert pool.workers == n
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert not errors, (errors[:3], [(r.old, r.new, r.failed_slots, list(r.lost.items())[:2]) for r in records])
    from poolbridge._hashing import slot_for

    for record in records:
        assert not record.lost and not record.failed_slots and not record.refused
        assert set(record.moved) == _sessions_moving(sessions, record.old, record.new, slot_for)
    # Growing 2 -> 3 moves about a third (jump hash: 1/3); nothing else is touched.
    assert 0.25 < len(records[0].moved) / len(sessions) < 0.42
    # Every ref still works, in its session's current worker, with every entry in order.
    for s in sessions:
        assert refs[s].getattr("entries") == list(range(1, sent[s] + 1))
    stats = pool.stats()
    assert stats.workers == 3 and len(stats.slots) == 3 and stats.refs == len(sessions)


def test_helper_state_moves(pool_maker: Any) -> None:
    pool = pool_maker(workers=1, helpers=["pb_resizemods"])
    sessions = [f"state-{i}" for i in range(40)]
    for s in sessions:
        pool.options(session=s).helper("remember", s.upper())
    record = pool.resize(4)
    assert record.moved and not record.lost
    for s in sessions:
        value, slot = pool.options(session=s).helper("recall")
        assert value == s.upper() and slot == pool.slot_for(s)


def _first_moving(prefix: str, old: int, new: int, source: int | None = None) -> str:
    from poolbridge._hashing import slot_for

    for i in range(10_000):
        s = f"{prefix}-{i}"
        if slot_for(s, old) != slot_for(s, new) and (source is None or slot_for(s, old) == source):
            return s
    raise AssertionError("no moving session found")


def test_unpicklable_state_is_lost_and_reported(pool_maker: Any) -> None:
    pool = pool_maker(workers=2, helpers=["pb_resizemods"])
    bad = _first_moving("lock", 2, 3)
    good = _first_moving("fine", 2, 3)
    lock = pool.options(session=bad, ret="ref").call("pb_resizemods.unpicklable")
    kept = pool.options(session=good, ret="ref").call("builtins.list", [1, 2])
    record = pool.resize(3)
    assert good in record.moved and bad not in record.moved
    assert "pickle" in record.lost[bad]
    with pytest.raises(SessionLostError, match=r"resize.*pickle"):
        lock.call("locked")
    assert kept.call("__len__") == 2
    # The session itself lives on (empty) in its new worker.
    assert pool.options(session=bad).call("builtins.len", [1]) == 1


def test_live_stream_is_lost_and_reported(pool_maker: Any) -> None:
    pool = pool_maker(workers=2, helpers=["pb_resizemods"])
    s = _first_moving("stream", 2, 3)
    stream = pool.options(session=s, batch=2).stream("pb_resizemods.counter", 10)
    assert next(stream) == 0
    record = pool.resize(3)
    assert "stream" in record.lost[s]
    with pytest.raises(SessionLostError, match="stream"):
        list(stream)


def test_refuse_changes_nothing(pool_maker: Any) -> None:
    pool = pool_maker(workers=2, helpers=["pb_resizemods"])
    bad = _first_moving("lock", 2, 3, source=0)
    good = _first_moving("fine", 2, 3, source=1)
    also = _first_moving("also", 2, 3, source=0)
    lock = pool.options(session=bad, ret="ref").call("pb_resizemods.unpicklable")
    kept = pool.options(session=good, ret="ref").call("builtins.list", [1, 2])
    other = pool.options(session=also, ret="ref").call("builtins.list", [3])
    pids = pool.pids()
    record = pool.resize(3, on_unmovable="refuse")
    assert record.refused and record.workers == 2 and bad in record.lost and not record.moved
    assert pool.workers == 2 and pool.pids() == pids
    assert lock.call("locked") is False
    assert kept.call("__len__") == 2 and other.call("__len__") == 1
    assert pool.stats().refs == 3
    with pytest.raises(ValueError):
        pool.resize(3, on_unmovable="maybe")


def test_shrink_and_grow_back(pool_maker: Any) -> None:
    pool = pool_maker(workers=3, helpers=["pb_resizemods"])
    sessions = [f"back-{i}" for i in range(60)]
    refs = {s: pool.options(session=s, ret="ref").call("builtins.list", [s]) for s in sessions}
    assert pool.resize(1).workers == 1
    assert len(pool.pids()) == 1
    assert pool.resize(3).workers == 3
    for s in sessions:
        assert refs[s].call("__getitem__", 0) == s
    # A ref made in a slot's earlier life never names an object of its later worker.
    assert len(set(pool.stats().slots[i].generation for i in (1, 2))) >= 1
    assert all(g >= 1 for g in (pool.stats().slots[1].generation, pool.stats().slots[2].generation))


def test_old_worker_killed_mid_move(pool_maker: Any) -> None:
    pool = pool_maker(workers=2, helpers=["pb_resizemods"])
    doomed = _first_moving("doomed", 2, 3, source=0)
    stays = next(f"stays-{i}" for i in range(1000) if pool.slot_for(f"stays-{i}") == 0
                 and _slot(f"stays-{i}", 3) == 0)
    movers = [s for s in (f"m-{i}" for i in range(200)) if _slot(s, 2) == 1 and _slot(s, 3) == 2][:5]
    bomb = pool.options(session=doomed, ret="ref").call("pb_resizemods.DiesWhenPickled")
    gone = pool.options(session=stays, ret="ref").call("builtins.list", [0])
    moved = {s: pool.options(session=s, ret="ref").call("builtins.list", [s]) for s in movers}
    record = pool.resize(3)
    assert record.workers == 3 and pool.workers == 3
    assert 0 in record.failed_slots and set(movers) <= set(record.moved)
    for s, ref in moved.items():
        assert ref.call("__getitem__", 0) == s
    with pytest.raises(SessionLostError):
        gone.call("__len__")
    with pytest.raises(SessionLostError):
        bomb.getattr("x")
    assert pool.options(session=stays).call("builtins.len", [1, 2]) == 2


def test_new_worker_killed_mid_move(pool_maker: Any) -> None:
    pool = pool_maker(workers=3, helpers=["pb_resizemods"])
    doomed = _first_moving("doomed", 3, 2)  # from slot 2 into a worker that dies loading it
    target = _slot(doomed, 2)
    other = next(s for s in (f"o-{i}" for i in range(1000)) if _slot(s, 3) == 2 and _slot(s, 2) != target)
    bomb = pool.options(session=doomed, ret="ref").call("pb_resizemods.DiesWhenLoaded")
    survivor = pool.options(session=other, ret="ref").call("builtins.list", [7])
    record = pool.resize(2)
    assert record.workers == 2 and pool.workers == 2
    assert target in record.failed_slots and doomed in record.lost
    assert other in record.moved and survivor.call("__getitem__", 0) == 7
    with pytest.raises(SessionLostError):
        bomb.getattr("x")
    assert pool.options(session=doomed).call("builtins.len", [1]) == 1  # the slot serves again


def test_async_resize(pool_maker: Any) -> None:
    pool = pool_maker(workers=1, helpers=["pb_resizemods"])

    async def main() -> Any:
        apool = pool.aio
        record = await apool.resize(2)
        return record, await apool.options(session="a").call("builtins.len", [1, 2, 3])

    record, value = asyncio.run(asyncio.wait_for(main(), WAIT))
    assert record.workers == 2 and value == 3 and pool.workers == 2


def test_resize_validates(pool_maker: Any) -> None:
    pool = pool_maker(workers=1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            pool.resize(bad)
    assert pool.resize(1).moved == ()


def _slot(session: str, n: int) -> int:
    from poolbridge._hashing import slot_for

    return slot_for(session, n)



def test_async_calls_during_a_resize(pool_maker: Any) -> None:
    pool = pool_maker(workers=2, helpers=["pb_resizemods"])
    sessions = [f"aio-{i}" for i in range(200)]
    refs = _log_refs(pool, sessions)

    async def session_calls(s: str) -> list[int]:
        return [(await refs[s].acall("add", n))[1] for n in range(1, 6)]

    async def main() -> Any:
        resizing = asyncio.get_running_loop().run_in_executor(None, pool.resize, 3)
        counts = await asyncio.gather(*(session_calls(s) for s in sessions))
        return await resizing, counts

    record, counts = asyncio.run(asyncio.wait_for(main(), WAIT))
    assert record.workers == 3 and not record.lost
    assert all(c == [1, 2, 3, 4, 5] for c in counts)


@pytest.mark.backends
def test_resize_moves_sessions_with_their_refs_and_back(pool: poolbridge.Pool) -> None:
    """On each backend (on Ray the new slot is a new actor): the module's pool grows to 3 and shrinks
    back to 2; every session's ref keeps working through both moves."""
    sessions = [f"rz-{i}" for i in range(40)]
    refs = {s: pool.options(session=s, ret="ref").call("builtins.list", [s]) for s in sessions}
    try:
        grown = pool.resize(3)
        assert grown.workers == 3 and grown.moved and not grown.lost and not grown.failed_slots
        assert len(pool.pids()) == 3 and all(pid > 0 for pid in pool.pids())
        for s, ref in refs.items():
            assert ref.call("__getitem__", 0) == s
    finally:
        shrunk = pool.resize(2)
    assert shrunk.workers == 2 and not shrunk.lost and not shrunk.failed_slots
    for s, ref in refs.items():
        assert ref.call("__getitem__", 0) == s
    assert pool.stats().workers == 2
    for s in sessions:  # the pool is shared (the module's; on Ray the session's)
        pool.close_session(s)
