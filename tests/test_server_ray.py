"""``python -m poolbridge serve --backend ray``: the same Port protocol with each slot a Ray actor,
on a local Ray the server starts itself (and stops on exit). Skipped without Ray, except under CI."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pb_portclient import REF, STREAM, Server, two_slot_sessions

try:
    import ray  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("Ray is not installed (pip install 'poolbridge[ray]')", allow_module_level=True)

ALLOW = ("operator", "builtins", "os", "time", "pb_portmods", "pb_test_*")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    args = ["--backend", "ray", *(a for m in ALLOW for a in ("--allow-module", m))]
    s = Server(*args, workers=2, start_wait=90)  # a local Ray starts in 10-25 s on a loaded 2-core VM
    try:
        yield s
    finally:
        s.close()
    assert s.proc.returncode == 0


def test_ops_refs_streams_and_epoch(server: Server) -> None:
    assert server.hello["protocol"] == 2 and server.hello["slots"] == 2
    assert server.ok("call", session="ray-a", fn="operator.add", args=[2, 3]) == 5
    ref = server.ok("create", session="ray-a", fn="pb_test_helpers.Box", args=[1])
    assert ref[REF][4] == server.hello["epoch"]
    assert server.ok("method", target=ref, name="add", args=[4]) == 5
    other = {REF: [*ref[REF][:4], "0" * 16]}
    assert server.error("method", target=other, name="get")["code"] == "session_lost"
    opened = server.ok("stream_open", session="ray-a", fn="pb_portmods.gen", args=[5], batch=2)
    assert opened["items"] == [0, 1] and set(opened["stream"]) == {STREAM}
    assert server.ok("stream_next", stream=opened["stream"], batch=10) == {"items": [2, 3, 4], "done": True}
    assert server.ok("call", session="ray-a", fn="builtins.pow", args=[2, 70]) == {"__poolbridge_int__": str(2**70)}
    slot = server.ok("slot_for", session="ray-a")
    assert server.ok("ping", session="ray-a")["pid"] == server.hello["worker_pids"][slot]


def test_the_allow_list_is_enforced_by_the_actors(server: Server) -> None:
    err = server.error("call", session="ray-a", fn="pb_portmods.dumps", args=[1])
    assert err["code"] == "not_allowed" and "'dumps'" in err["message"]
    box = server.ok("create", session="ray-a", fn="pb_test_helpers.Box")
    assert server.error("getattr", target=box, name="__class__")["code"] == "not_allowed"


def test_crash_timeout_restart_and_stats(server: Server) -> None:
    a, b = two_slot_sessions(server)
    ref = server.ok("create", session=a, fn="pb_test_helpers.Box", args=[1])
    err = server.error("call", session=a, fn="pb_portmods.die", args=[1])
    assert err["code"] == "worker_crashed" and err["ran"] is True
    assert server.ok("call", session=a, fn="operator.add", args=[1, 1]) == 2  # the slot is back
    assert server.error("method", target=ref, name="get")["code"] == "session_lost"
    err = server.error("call", session=b, fn="time.sleep", args=[60], timeout=0.5, on_timeout="restart")
    assert err["code"] == "timeout"
    assert server.ok("call", session=b, fn="operator.add", args=[2, 2]) == 4  # a new actor, not the sleeper
    stats = server.ok("stats")
    assert [s["slot"] for s in stats["slots"]] == [0, 1] and all(s["restarts"] >= 1 for s in stats["slots"])
