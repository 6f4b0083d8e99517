"""``pool.stats()`` (a frozen snapshot per slot), ``pool.pids()`` and ``repr(pool)``."""

from __future__ import annotations

import dataclasses
import gc
import os
import re

import psutil
import pytest
from conftest import make_pool
from pb_faultmods import worker_pids_of
from pb_testmods import sessions_on_slot

import poolbridge
from poolbridge import Pool


def test_fresh_pool_stats(fresh_pool: Pool) -> None:
    stats = fresh_pool.stats()
    assert isinstance(stats, poolbridge.PoolStats)
    assert stats.workers == 2
    assert len(stats.slots) == 2
    pids = fresh_pool.pids()
    for i, s in enumerate(stats.slots):
        assert isinstance(s, poolbridge.SlotStats)
        assert s.slot == i
        assert s.pid == pids[i]
        assert s.generation == 0
        assert s.alive is True
        assert s.restarts == 0
        assert s.in_flight == 0
        assert (s.sessions, s.refs, s.streams, s.calls) == (0, 0, 0, 0)
        assert s.rss > 1_000_000  # a live interpreter
    assert (stats.in_flight, stats.sessions, stats.refs, stats.streams) == (0, 0, 0, 0)


def test_stats_are_frozen(fresh_pool: Pool) -> None:
    stats = fresh_pool.stats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.workers = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.slots[0].calls = 99  # type: ignore[misc]
    assert isinstance(stats.slots, tuple)


def test_stats_is_a_snapshot(fresh_pool: Pool) -> None:
    before = fresh_pool.stats()
    fresh_pool.options(session="snap").call("operator.add", 1, 2)
    assert before.slots[fresh_pool.slot_for("snap")].calls == 0
    assert fresh_pool.stats().slots[fresh_pool.slot_for("snap")].calls == 1


def test_stats_count_sessions_refs_streams_and_calls(fresh_pool: Pool) -> None:
    pool = fresh_pool
    a, b = sessions_on_slot(pool, 0, 2, "st")
    c = sessions_on_slot(pool, 1, 1, "st")[0]
    refs = [pool.options(session=a).create("pb_testmods.Counter", i) for i in range(3)]
    refs.append(pool.options(session=b).create("pb_testmods.Counter", 9))
    stream = pool.options(session=c, batch=1).stream("pb_testmods.gen_range", 10)
    pool.options(session=c).call("operator.add", 1, 2)
    s0, s1 = pool.stats().slots
    assert (s0.sessions, s0.refs, s0.streams, s0.calls) == (2, 4, 0, 4)
    # slot 1: stream_open, the prefetched stream_next, the call (one pipe: served in order)
    assert (s1.sessions, s1.refs, s1.streams, s1.calls) == (1, 0, 1, 3)
    stats = pool.stats()
    assert (stats.sessions, stats.refs, stats.streams) == (3, 4, 1)
    stream.close()
    refs[0].release()
    assert pool.close_session(b) == 1
    s0, s1 = pool.stats().slots
    assert (s0.sessions, s0.refs) == (1, 2)
    assert s1.streams == 0
    del refs
    gc.collect()
    pool.options(session=a).call("operator.add", 0, 0)  # carries the queued releases
    assert pool.stats().slots[0].refs == 0


def test_stats_requests_are_not_counted_and_touch_no_session(fresh_pool: Pool) -> None:
    for _ in range(3):
        stats = fresh_pool.stats()
    assert stats.sessions == 0
    assert sum(s.calls for s in stats.slots) == 0


def test_pids_are_the_live_worker_children(fresh_pool: Pool) -> None:
    pids = fresh_pool.pids()
    assert len(pids) == 2 and len(set(pids)) == 2
    me = psutil.Process()
    children = {p.pid for p in me.children(recursive=True)}
    assert set(pids) <= children
    assert set(pids) <= set(worker_pids_of(me.pid))  # forked by a template process of ours
    for pid in pids:
        assert psutil.Process(pid).is_running()


@pytest.mark.backends
def test_pids_and_stats_name_each_slots_live_worker(pool: Pool) -> None:
    """On each backend (a Ray slot's pid is its actor's process): one live process per slot, not
    ours, the one ``stats()`` reports and the one a session of that slot runs in."""
    pids = pool.pids()
    assert len(pids) == 2 and len(set(pids)) == 2 and os.getpid() not in pids
    assert all(psutil.Process(pid).is_running() for pid in pids)
    stats = pool.stats()
    assert [s.pid for s in stats.slots] == pids and all(s.alive for s in stats.slots)
    for slot, pid in enumerate(pids):
        (sid,) = sessions_on_slot(pool, slot, 1, "pid-of")
        assert pool.options(session=sid).call("os.getpid") == pid


def test_repr(fresh_pool: Pool) -> None:
    text = repr(fresh_pool)
    assert re.fullmatch(r"<Pool .*>", text)
    assert "workers=2" in text
    assert "running" in text
    assert "in_flight=0" in text
    fresh_pool.close()
    assert "closed" in repr(fresh_pool)


def test_worker_count_defaults_to_cpu_count() -> None:
    import os

    with make_pool(workers=None) as p:
        assert p.workers == (os.cpu_count() or 1)
        assert len(p.pids()) == p.workers
        assert p.stats().workers == p.workers


@pytest.mark.parametrize("bad", [0, -2])
def test_invalid_worker_count(bad: int) -> None:
    with pytest.raises(ValueError):
        poolbridge.Pool(workers=bad)


def test_close_stops_every_worker() -> None:
    p = make_pool(workers=2)
    procs = [psutil.Process(pid) for pid in p.pids()]
    p.close()
    _, alive = psutil.wait_procs(procs, timeout=15)
    assert not alive
    assert p.closed


def test_context_manager_closes() -> None:
    with make_pool(workers=1) as p:
        procs = [psutil.Process(pid) for pid in p.pids()]
        assert not p.closed
    assert p.closed
    _, alive = psutil.wait_procs(procs, timeout=15)
    assert not alive


def test_stats_of_a_busy_slot_reports_it_alive(fresh_pool: Pool, tmp_path: object) -> None:
    """A worker busy with a long call is alive: ``alive`` is about the process, not whether it
    answered within the stats wait."""
    import os

    pool = fresh_pool
    gate = os.path.join(str(tmp_path), "gate")
    sid = sessions_on_slot(pool, 0, 1, "busy")[0]
    fut = pool.options(session=sid).submit("pb_testmods.wait_for_path", gate)
    try:
        stats = pool.stats()
        busy, idle = stats.slots
        assert idle.alive is True
        assert busy.pid == pool.pids()[0]
        assert busy.alive is True, "a live worker busy with a call was reported dead"
        assert busy.in_flight >= 1
    finally:
        with open(gate, "w"):
            pass
    assert fut.result(60) is True
    pool.options(session=sid).call("operator.add", 1, 1)  # replies arrive in order: all earlier ones are in
    assert pool.stats().in_flight == 0
