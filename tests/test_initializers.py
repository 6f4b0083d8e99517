"""``Pool(initializer=, initargs=)`` once per worker process, again after a crash restart;
``Pool(session_init=)`` once per session per worker, its result in the session's state."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
from pb_faultmods import wait_until

from poolbridge import Pool, WorkerCrashedError

WAIT = 30.0
M = "pb_mapmods"


def _pids_in(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(line) for line in f.read().split()]
    except FileNotFoundError:
        return []


def test_initializer_runs_once_per_worker(pool_maker: Callable[..., Pool], tmp_path: Any) -> None:
    path = str(tmp_path / "inits")
    p = pool_maker(workers=2, initializer=f"{M}.init_worker", initargs=(path, "warm"))
    out = p.broadcast(f"{M}.initialized")
    assert out == {slot: ("warm", pid) for slot, pid in enumerate(p.pids())}
    for _ in range(3):  # more calls and maps do not run it again
        list(p.map(f"{M}.initialized", range(100), chunksize=10))
    assert sorted(_pids_in(path)) == sorted(p.pids())


def test_initializer_runs_again_after_a_crash_restart(pool_maker: Callable[..., Pool], tmp_path: Any) -> None:
    path = str(tmp_path / "inits")
    p = pool_maker(workers=2, initializer=f"{M}.init_worker", initargs=(path, "warm"))
    first = p.pids()
    assert p.broadcast(f"{M}.initialized")[0] == ("warm", first[0])
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: p.pids()[0] not in (first[0], -1), WAIT, what="slot 0 to restart")
    new_pid = p.pids()[0]
    assert p.options(timeout=WAIT).broadcast(f"{M}.initialized") == {0: ("warm", new_pid), 1: ("warm", first[1])}
    assert sorted(_pids_in(path)) == sorted([*first, new_pid])


def test_initializer_may_be_a_callable(pool_maker: Callable[..., Pool]) -> None:
    import pb_mapmods

    p = pool_maker(workers=1, initializer=lambda tag: pb_mapmods.INITIALIZED.update(tag=tag), initargs=("closure",))
    assert p.call(f"{M}.initialized")[0] == "closure"


def test_failing_initializer_breaks_that_worker_like_the_stdlib(pool_maker: Callable[..., Pool]) -> None:
    p = pool_maker(workers=1, initializer=f"{M}.failing_init")
    with pytest.raises(WorkerCrashedError, match="initializer") as info:
        p.call("math.sqrt", 4)
    import concurrent.futures.process

    assert isinstance(info.value, concurrent.futures.process.BrokenProcessPool)
    assert "initializer says no" in str(info.value.__cause__)
    with pytest.raises(WorkerCrashedError):
        list(p.map(abs, [1, 2]))


def test_bad_initializers_are_refused_before_any_worker_starts() -> None:
    with pytest.raises(ValueError):
        Pool(1, initargs=(1,))
    with pytest.raises(TypeError):
        Pool(1, initializer=42)
    with pytest.raises(TypeError):
        Pool(1, session_init=42)
    # A worker's start options reach the template process in one 64 KiB message: a big pickled
    # initializer is refused with advice, rather than breaking the worker start.
    with pytest.raises(ValueError, match="dotted path"):
        Pool(1, initializer=f"{M}.init_worker", initargs=(b"x" * 100_000, "big"))


# -- per-session initializer -------------------------------------------------------------------------


def test_session_init_runs_once_per_session_and_keeps_its_result(pool_maker: Callable[..., Pool]) -> None:
    p = pool_maker(workers=2, session_init=f"{M}.load_model")
    for _ in range(3):
        value, runs = p.options(session="alice").call(f"{M}.model")
        assert runs == 1
        assert value == {"model_for": "alice", "pid": p.pids()[p.slot_for("alice")]}
    results = list(p.map(f"{M}.model", range(200), session=lambda i: f"user-{i % 4}", chunksize=5))
    assert {(v["model_for"], runs) for v, runs in results} == {(f"user-{k}", 1) for k in range(4)}


def test_session_init_runs_again_after_close_session_and_restart(pool_maker: Callable[..., Pool]) -> None:
    p = pool_maker(workers=1, session_init=f"{M}.load_model")
    view = p.options(session="bob", timeout=WAIT)
    assert view.call(f"{M}.model")[1] == 1
    view.close_session()
    assert view.call(f"{M}.model")[1] == 2  # state dropped with the session, then warmed again
    old = p.pids()[0]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: p.pids()[0] not in (old, -1), WAIT, what="the slot to restart")
    value, runs = view.call(f"{M}.model")
    assert runs == 1 and value["pid"] == p.pids()[0]  # a new process: initialised afresh


def test_session_init_failure_fails_the_call_and_is_retried(pool_maker: Callable[..., Pool]) -> None:
    p = pool_maker(workers=1, session_init=f"{M}.load_model_or_fail")
    with pytest.raises(ValueError, match="no model for bad-1"):
        p.options(session="bad-1").call(f"{M}.model")
    value, runs = p.options(session="bad-1").call(f"{M}.model")
    assert value["model_for"] == "bad-1" and runs == 1
    assert p.options(session="good").call(f"{M}.model")[1] == 1


def test_session_init_may_be_a_callable(pool_maker: Callable[..., Pool]) -> None:
    p = pool_maker(workers=1, session_init=lambda sid: sid.upper())
    assert p.options(session="carol").call(f"{M}.model")[0] == "CAROL"
