"""The core's behaviours on both backends: ``Pool(backend="process")`` and ``Pool(backend="ray")``.

The ``bpool`` fixture is parametrized over the two backends, so every test here runs twice with the
same assertions. The Ray pool is started once per module with ``ray_init=...`` (poolbridge starts a
local Ray itself and shuts it down when the pool closes); Ray-only tests at the end cover what only
that backend has. Skipped cleanly without Ray — except under ``CI``, where Ray is installed
(``.[ray]``) and a missing one is an error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import make_pool
from pb_faultmods import is_resource_tracker, wait_until
from pb_testmods import sessions_on_slot

import poolbridge
from poolbridge import (
    CallTimeoutError,
    Pool,
    RefNotFoundError,
    SessionLostError,
    SessionMismatchError,
    WorkerCrashedError,
)
from poolbridge import _testing as testing
from poolbridge._errors import RemoteTraceback

try:
    import ray
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs poolbridge[ray]: a missing Ray is a broken job, not a skip
    pytest.skip("Ray is not installed (pip install 'poolbridge[ray]')", allow_module_level=True)

BACKENDS = ["process", "ray"]
# A local Ray for the tests: small, no dashboard, and quiet about the driver's log lines.
RAY_INIT: dict[str, Any] = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
CRASH_WAIT = 15.0  # upper bound for a crash to be reported and the slot to come back


def _ray_processes() -> list[str]:
    """Ray's own processes among our descendants (raylet, gcs_server, ray:: workers...)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "ray" in line.lower():
            out.append(f"{p.pid}: {line[:120]}")
    return out


def _new_pool(backend: str, **kwargs: Any) -> Pool:
    if backend == "ray":
        kwargs.setdefault("ray_init", RAY_INIT)
    return make_pool(backend=backend, **kwargs)


@pytest.fixture(scope="module", params=BACKENDS)
def bpool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    backend = request.param
    if backend == "ray":
        assert not ray.is_initialized(), "these tests start their own Ray"
    pool = _new_pool(backend)
    try:
        yield pool
    finally:
        pool.close()
    if backend == "ray":
        # poolbridge started Ray, so closing its last pool shut it down: nothing may be left.
        assert not ray.is_initialized()
        children = [p for p in psutil.Process().children(recursive=True) if not is_resource_tracker(p)]
        _, alive = psutil.wait_procs(children, timeout=15.0)
        left = [p for p in alive if p.is_running()]
        assert not left and not _ray_processes(), f"left after the Ray pool closed: {_ray_processes()}"


def sessions_on(pool: Pool, slot: int, n: int = 1) -> list[str]:
    """``n`` fresh session ids that map to ``slot``."""
    return sessions_on_slot(pool, slot, n, f"s-{uuid.uuid4().hex[:8]}")


def check_routed(pool: Pool, seen: dict[str, Any] | None, session: str) -> None:
    assert seen is not None, "the worker reported no current session"
    slot = pool.slot_for(session)
    assert (seen["session"], seen["slot"], seen["pid"]) == (session, slot, pool.pids()[slot])


# -- the core's behaviours, on both backends -------------------------------------------------------


def test_backend_and_pids(bpool: Pool) -> None:
    pids = bpool.pids()
    assert len(pids) == 2 and len(set(pids)) == 2
    assert os.getpid() not in pids
    assert all(psutil.pid_exists(pid) for pid in pids)
    stats = bpool.stats()
    assert [s.pid for s in stats.slots] == pids and all(s.alive for s in stats.slots)


def test_every_call_of_a_session_runs_in_its_slots_worker(bpool: Pool) -> None:
    sessions = [f"aff-{uuid.uuid4().hex[:6]}-{i}" for i in range(12)]
    assert {bpool.slot_for(s) for s in sessions} == {0, 1}
    futures = []
    for sid in sessions:
        view = bpool.options(session=sid)
        check_routed(bpool, view.call("ray_testmods.where"), sid)
        with bpool.session(sid):
            check_routed(bpool, bpool.call("ray_testmods.where"), sid)
        futures.append((sid, view.submit("ray_testmods.where")))
    for sid, future in futures:
        check_routed(bpool, future.result(timeout=10), sid)


def test_hashing_is_the_core_hashing(bpool: Pool) -> None:
    from poolbridge._hashing import slot_for

    for i in range(50):
        sid = f"hash-{i}"
        assert bpool.slot_for(sid) == slot_for(sid, 2)
        assert bpool.options(session=sid).call("ray_testmods.where")["slot"] == slot_for(sid, 2)


def test_refs_create_method_getattr_setattr_release(bpool: Pool) -> None:
    sid = f"refs-{uuid.uuid4().hex[:8]}"
    view = bpool.options(session=sid)
    box = view.create("ray_testmods.Box", 10)
    assert isinstance(box, poolbridge.Ref) and box.session_id == sid
    check_routed(bpool, box.getattr("where"), sid)
    assert box.call("add", 5) == 15
    assert view.method(box, "add", 1) == 16
    bpool.setattr(box, "value", 100)
    assert bpool.getattr(box, "value") == 100
    check_routed(bpool, box.call("whereami"), sid)
    box.release()
    with pytest.raises(RefNotFoundError):
        bpool.getattr(box, "value")


def test_unencodable_results_come_back_as_refs(bpool: Pool) -> None:
    sid = f"auto-{uuid.uuid4().hex[:8]}"
    lock = bpool.options(session=sid).call("threading.Lock")
    assert isinstance(lock, poolbridge.Ref) and lock.session_id == sid
    assert lock.call("acquire") is True
    assert lock.call("locked") is True


def test_streams_pull_batches_and_close_runs_finally(bpool: Pool) -> None:
    sid = f"stream-{uuid.uuid4().hex[:8]}"
    view = bpool.options(session=sid)
    token = uuid.uuid4().hex
    items = list(view.options(batch=3).stream("ray_testmods.gen_with_finally", token, 10))
    assert len(items) == 10
    for seen in items:
        check_routed(bpool, seen, sid)
    assert view.call("ray_testmods.pop_events", token) == ["exhausted", "finally"]

    token = uuid.uuid4().hex
    stream = view.options(batch=4).stream("ray_testmods.gen_with_finally", token, 1000)
    for _ in range(6):
        check_routed(bpool, next(stream), sid)
    stream.close()
    assert view.call("ray_testmods.pop_events", token) == ["finally"]  # closed early: not exhausted


def test_helpers_with_context_keep_per_session_state(bpool: Pool) -> None:
    a, b = f"hca-{uuid.uuid4().hex[:6]}", f"hcb-{uuid.uuid4().hex[:6]}"
    ctx = bpool.options(session=a).helper("pbh_ctx")
    slot = bpool.slot_for(a)
    assert ctx == {
        "type": "SessionContext",
        "session": a,
        "slot": slot,
        "generation": testing.generation(bpool, slot),
        "is_current": True,
    }
    assert bpool.options(session=a).helper("pbh_remember", "k", "va") == 1
    assert bpool.options(session=b).helper("pbh_remember", "k", "vb") == 1
    assert bpool.options(session=a).helper("pbh_recall", "k") == "va"
    assert bpool.options(session=b).helper("pbh_recall", "k") == "vb"
    assert bpool.helper("pbh_add", 2, 3) == 5
    assert bpool.close_session(a) >= 0
    assert bpool.options(session=a).helper("pbh_recall", "k") == "<missing>"


def test_user_exceptions_keep_their_type(bpool: Pool) -> None:
    import ray_testmods

    with pytest.raises(ray_testmods.Custom, match="boom") as info:
        bpool.call("ray_testmods.raise_custom", "boom")
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_custom" in str(info.value.__cause__)
    with pytest.raises(KeyError, match="missing-key"):
        bpool.helper("pbh_raises", "missing-key")
    with pytest.raises(ValueError):
        bpool.submit("builtins.int", "not a number").result(timeout=10)
    assert bpool.call("operator.add", 1, 2) == 3  # the worker is fine


def test_cross_session_ref_argument_is_rejected_before_sending(bpool: Pool) -> None:
    a, b = f"xa-{uuid.uuid4().hex[:6]}", f"xb-{uuid.uuid4().hex[:6]}"
    box = bpool.options(session=a).create("ray_testmods.Box", 1)
    with pytest.raises(SessionMismatchError):
        bpool.options(session=b).call("builtins.id", box)
    with pytest.raises(SessionMismatchError):
        box.options(session=b).call("add", 1)
    assert bpool.options(session=a).call("operator.add", 1, 2) == 3
    assert box.call("add", 1) == 2


def test_a_sessions_operations_run_in_order_under_concurrent_senders(bpool: Pool) -> None:
    import threading

    results: dict[str, list[Any]] = {}
    errors: list[BaseException] = []

    def run(sid: str) -> None:
        try:
            box = bpool.options(session=sid).create("ray_testmods.Box", 0)
            futures = [box.submit("add", 1) for _ in range(60)]
            results[sid] = [f.result(timeout=30) for f in futures] + [box.call("add", 0)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"ord-{uuid.uuid4().hex[:6]}-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8
    for values in results.values():
        assert values == [*range(1, 61), 60]


def test_map_per_session_order_and_broadcast(bpool: Pool) -> None:
    items = [(f"rk-{i % 5}-{bpool.backend}", i // 5) for i in range(200)]
    results = list(bpool.map("pb_mapmods.record_order", items, session=lambda item: item[0], chunksize=7))
    assert [(k, s) for k, s, _ in results] == items
    assert list(bpool.map(abs, range(-50, 50))) == [abs(i) for i in range(-50, 50)]
    assert bpool.broadcast("os.getpid") == dict(enumerate(bpool.pids()))


async def test_the_asyncio_face(bpool: Pool) -> None:
    import asyncio

    sid = f"aio-{uuid.uuid4().hex[:8]}"
    apool = bpool.aio
    assert await apool.call("operator.add", 1, 2) == 3
    seen = await asyncio.gather(*(apool.options(session=sid).call("ray_testmods.where") for _ in range(20)))
    for item in seen:
        check_routed(bpool, item, sid)


def test_a_call_waiting_at_the_in_flight_bound_gives_up_at_its_deadline(bpool: Pool, tmp_path: Path) -> None:
    """The channel contract on both backends: waiting for room honours the call's timeout (the Ray
    channel used to wait for room without looking at the deadline)."""
    gate = tmp_path / f"gate-{bpool.backend}"
    with _new_pool(bpool.backend, workers=1, max_in_flight=1) as pool:
        blocked = pool.options(session="bound").submit("pb_testmods.wait_for_path", str(gate), 30.0)
        wait_until(lambda: testing.in_flight(pool, 0) >= 1, CRASH_WAIT, what="the first call sent")
        with pytest.raises(CallTimeoutError):
            pool.options(session="bound", timeout=0.3).call("operator.add", 1, 2)
        gate.touch()
        assert blocked.result(timeout=CRASH_WAIT) is True
        assert pool.options(session="bound").call("operator.add", 1, 2) == 3


def test_a_killed_worker_costs_its_in_flight_calls_and_refs_and_comes_back(bpool: Pool) -> None:
    pool = _new_pool(bpool.backend)
    try:
        victim_slot = 0
        sid, sid2 = sessions_on(pool, victim_slot, 2)
        (other,) = sessions_on(pool, 1)
        victim = pool.options(session=sid)
        box = victim.create("ray_testmods.Box", 1)
        stream = victim.options(batch=2).stream("ray_testmods.gen_with_finally", "t", 100)
        old_pids = pool.pids()
        other_pid = old_pids[1]
        with tempfile.TemporaryDirectory() as tmp:
            gate = str(Path(tmp) / "gate")
            in_flight = [victim.submit("ray_testmods.wait_for_path", gate) for _ in range(3)]
            # (stats() would queue behind them; the stream's prefetch may be in flight too)
            assert len(testing.channels(pool)[victim_slot].pending) >= 3
            os.kill(old_pids[victim_slot], signal.SIGKILL)
            started = time.monotonic()
            for future in in_flight:
                with pytest.raises(WorkerCrashedError) as info:
                    future.result(timeout=CRASH_WAIT)
                assert info.value.slot == victim_slot
            assert time.monotonic() - started < 5.0  # noticed promptly, not by a timeout
        with pytest.raises(SessionLostError):
            box.call("add", 1)
        # The stream's next batch was in flight (prefetched) at the kill: that pull crashed.
        with pytest.raises((WorkerCrashedError, SessionLostError)):
            list(stream)
        # The slot is back, in the same place, one generation later; the other slot never noticed.
        assert pool.options(session=sid2).call("ray_testmods.where")["generation"] == 1
        check_routed(pool, victim.call("ray_testmods.where"), sid)
        new_pids = pool.pids()
        assert new_pids[victim_slot] != old_pids[victim_slot] and new_pids[1] == other_pid
        assert pool.options(session=other).call("ray_testmods.where")["generation"] == 0
        assert pool.stats().slots[victim_slot].restarts == 1
        fresh = victim.create("ray_testmods.Box", 5)
        assert fresh.call("add", 1) == 6

        # An idle worker killed (nothing in flight to fail) is noticed and restarted without a call.
        router = testing.supervisor(pool)
        idle = router.channels()[1]
        os.kill(idle.pid, signal.SIGKILL)
        assert idle.finished.wait(CRASH_WAIT), "the death of an idle worker was not noticed"
        back = router.channel(1)  # bounded wait for the restart
        assert back is not idle and back.generation == 1
        assert pool.options(session=other).call("ray_testmods.where")["generation"] == 1
    finally:
        pool.close()


# -- Ray only --------------------------------------------------------------------------------------


# The Ray-only tests take ``bpool`` with its "ray" parameter only: same module-scoped pool, no skips.
ray_only = pytest.mark.parametrize("bpool", ["ray"], indirect=True)


@ray_only
def test_ray_slots_are_actors_in_other_processes(bpool: Pool) -> None:
    from poolbridge.backends.ray import RayChannel

    assert ray.is_initialized()
    channels = testing.channels(bpool)
    assert all(isinstance(ch, RayChannel) for ch in channels)
    for pid in bpool.pids():
        assert "ray" in " ".join(psutil.Process(pid).cmdline()).lower()


@ray_only
def test_ray_timeout_with_restart_kills_the_actor(bpool: Pool) -> None:
    (sid,) = sessions_on(bpool, 1)
    view = bpool.options(session=sid)
    generation = testing.generation(bpool, 1)
    box = view.create("ray_testmods.Box", 1)
    with tempfile.TemporaryDirectory() as tmp:
        gate = str(Path(tmp) / "gate")
        with pytest.raises(CallTimeoutError):
            view.options(timeout=0.5, on_timeout="restart").call("ray_testmods.wait_for_path", gate, 30.0)
    assert view.call("ray_testmods.where")["generation"] == generation + 1
    with pytest.raises(SessionLostError):
        box.call("add", 1)


@ray_only
def test_ray_close_lets_in_flight_calls_finish_and_ray_stays_for_other_pools(bpool: Pool) -> None:
    pool = _new_pool("ray")
    futures = [pool.options(session=f"c-{i}").submit("operator.add", i, 1) for i in range(50)]
    pool.close()
    assert [f.result(timeout=10) for f in futures] == [i + 1 for i in range(50)]
    with pytest.raises(poolbridge.PoolClosedError):
        pool.call("operator.add", 1, 2)
    assert ray.is_initialized()  # started for bpool, which is still open
    assert bpool.call("operator.add", 2, 2) == 4


def test_ray_init_arguments_for_a_local_start() -> None:
    from poolbridge.backends._ray_runtime import _init_kwargs

    kwargs = _init_kwargs({"runtime_env": {"env_vars": {"X": "1"}}}, 8)
    assert kwargs["num_cpus"] == 8 and kwargs["include_dashboard"] is False
    assert kwargs["runtime_env"]["env_vars"]["X"] == "1"
    assert kwargs["runtime_env"]["env_vars"]["PYTHONPATH"].split(os.pathsep)[0] in sys.path
    # Joining a cluster: nothing is added (num_cpus would be an error there).
    assert _init_kwargs({"address": "ray://head:10001"}, 8) == {"address": "ray://head:10001"}


_CYCLE_AT_SHUTDOWN = """
import gc, sys
import ray
from poolbridge import Pool

seen = []


class Holder:
    def __del__(self):
        seen.append(ray.is_initialized())


pool = Pool(workers=1, backend="ray", ray_init=RAY_INIT)
assert pool.call("operator.add", 1, 2) == 3
holder = Holder()
holder.me = holder  # a reference cycle: only the cycle collector frees it
holder.ref = ray.put(b"x")
del holder
gc.disable()  # no automatic collection: only poolbridge's own may free it in time
pool.close()
sys.stdout.write(f"{seen} {ray.is_initialized()}\\n")
"""


def test_garbage_holding_ray_objects_is_freed_before_poolbridge_shuts_ray_down() -> None:
    """Cyclic garbage holding a Ray object ref is collected while Ray is still up when the last
    poolbridge Ray pool closes: freed after ``ray.shutdown()``, an object ref reaches into a
    torn-down core worker (seen as rare interpreter crashes in a later garbage collection)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    script = f"RAY_INIT = {RAY_INIT!r}\n" + _CYCLE_AT_SHUTDOWN
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[True] False"


def test_resize_moves_sessions_with_their_refs_and_back(bpool: Pool) -> None:
    sessions = [f"rz-{uuid.uuid4().hex[:6]}-{i}" for i in range(40)]
    refs = {s: bpool.options(session=s, ret="ref").call("builtins.list", [s]) for s in sessions}
    try:
        grown = bpool.resize(3)
        assert grown.workers == 3 and grown.moved and not grown.lost and not grown.failed_slots
        assert len(bpool.pids()) == 3 and all(pid > 0 for pid in bpool.pids())
        for s, ref in refs.items():
            assert ref.call("__getitem__", 0) == s
    finally:
        shrunk = bpool.resize(2)
    assert shrunk.workers == 2 and not shrunk.lost and not shrunk.failed_slots
    for s, ref in refs.items():
        assert ref.call("__getitem__", 0) == s
    assert bpool.stats().workers == 2
