"""The Port server's poll loop: one thread reads the port and the workers' replies; requests for a
restarting slot are held off the loop in arrival order (_server.py's diagram)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pb_portclient import (
    InProcess,
    Server,
    frame,
    running,
    server_cpu,
    stops_within_a_second,
    two_slot_sessions,
)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running() as s:
        yield s


def test_replies_taken_over_by_a_background_reader_are_not_lost(server: Server) -> None:
    """`stats` is sent with lead=False (its channel's background reader reads the reply and, while
    it holds the read lock, every other pending reply): the loop must leave it the fd, then poll it
    again once it sends there again — no reply lost, none read twice, no spinning meanwhile."""
    a, b = two_slot_sessions(server)
    expected: dict[int, Any] = {}
    for round_ in range(15):
        for i in range(4):
            expected[server.send("call", session=a, fn="operator.add", args=[round_, i])] = round_ + i
            expected[server.send("call", session=b, fn="operator.mul", args=[round_, i])] = round_ * i
        expected[server.send("stats")] = None
    got: dict[int, Any] = {}
    while len(got) < len(expected):
        reply = server.recv()
        assert reply["id"] not in got, reply
        assert reply["status"] == "ok", reply
        got[reply["id"]] = reply["value"]
    assert {k: v for k, v in got.items() if expected[k] is not None} == {
        k: v for k, v in expected.items() if v is not None
    }
    # Idle but for a worker-side sleep: a loop spinning on a reply fd would burn the whole 0.5 s.
    before = server_cpu(server)
    assert server.ok("call", session=a, fn="time.sleep", args=[0.5]) is None
    assert server_cpu(server) - before < 0.25


def test_worker_killed_while_the_loop_reads_it() -> None:
    s = Server(workers=2)
    try:
        a, b = two_slot_sessions(s)
        pid = s.ok("call", session=a, fn="os.getpid")
        ids = [s.send("call", session=a, fn="pb_test_helpers.sleep_then", args=[0.02, i]) for i in range(30)]
        replies: dict[int, Any] = {}
        first = s.recv()  # the loop is reading that worker's replies as they come
        replies[first["id"]] = first
        os.kill(pid, signal.SIGKILL)
        while len(replies) < len(ids):
            reply = s.recv()
            replies[reply["id"]] = reply
        codes = [r["status"] if r["status"] == "ok" else r["error"]["code"] for r in replies.values()]
        assert set(codes) <= {"ok", "worker_crashed"} and codes.count("worker_crashed") <= 1, codes  # re-sent
        # The dead pipe (EOF, then closed by the monitor) must not keep the loop busy.
        before = server_cpu(s)
        assert s.ok("call", session=b, fn="time.sleep", args=[0.5]) is None
        assert server_cpu(s) - before < 0.25
        assert s.ok("call", session=a, fn="operator.add", args=[1, 2]) == 3  # the new channel is read
        assert s.ok("ping", session=a)["pid"] != pid
    finally:
        s.close()
    assert s.proc.returncode == 0


def test_request_to_a_restarting_slot_is_answered_by_the_new_worker() -> None:
    """Requests arriving while their slot restarts wait off the loop (the other slot keeps being
    served), then run on the new worker; the loop then reads the new channel's replies itself."""
    s = InProcess(workers=2)
    try:
        router = s.server.router
        a, b = s.session_on(0, "r"), s.session_on(1, "r")
        go_on = s.crash_and_hold_restart(a)  # slot 0 is restarting, held in the factory
        assert not router.ready(0)
        for i in range(5):
            s.send(10 + i, "call", session=a, fn="operator.add", args=[i, 100])
        s.send(20, "call", session=b, fn="operator.add", args=[1, 1])
        assert s.recv() == {"id": 20, "status": "ok", "value": 2}  # the loop was not held up
        go_on.set()
        got: dict[int, Any] = {}
        for _ in range(5):
            reply = s.recv()
            got[reply["id"]] = reply["value"]
        assert got == {10 + i: i + 100 for i in range(5)}
        # Sent by the loop to the new channel, read by the loop (or the reader that took it over).
        for i in range(30):
            s.send(100 + i, "call", session=a, fn="operator.mul", args=[i, 2])
        got = {}
        for _ in range(30):
            reply = s.recv()
            got[reply["id"]] = reply["value"]
        assert got == {100 + i: 2 * i for i in range(30)}
        s.send(200, "ping", session=a)
        assert s.recv()["value"]["generation"] == 1
    finally:
        s.close()


def test_requests_held_for_a_restarting_slot_keep_their_order() -> None:
    """A session's requests that arrive while its slot restarts run in arrival order, and so do
    the ones arriving while those are still being sent: none overtakes another."""
    s = InProcess(workers=2)
    try:
        a = s.session_on(0, "o")
        go_on = s.crash_and_hold_restart(a)
        token = f"order-{os.getpid()}-{time.monotonic_ns()}"
        for i in range(60):
            s.send(10 + i, "call", session=a, fn="pb_testmods.log_seq", args=[token, i])
        go_on.set()
        for i in range(60, 120):  # some arrive while the held ones are still being sent
            s.send(10 + i, "call", session=a, fn="pb_testmods.log_seq", args=[token, i])
        got = {}
        for _ in range(120):
            reply = s.recv()
            got[reply["id"]] = reply["value"]
        assert got == {10 + i: i for i in range(120)}
        s.send(500, "call", session=a, fn="pb_testmods.pop_events", args=[token])
        assert s.recv()["value"] == list(range(120))
    finally:
        s.close()


def test_a_worker_dying_between_the_readiness_check_and_the_send_does_not_stall_the_loop() -> None:
    """The loop checks that a slot is ready, then sends; a death in between must not make the loop
    wait for the restart (every other slot would wait with it): the request is held instead."""
    s = InProcess(workers=2)
    try:
        router = s.server.router
        a, b = s.session_on(0, "d"), s.session_on(1, "d")
        go_on = s.crash_and_hold_restart(a)
        router.ready = lambda slot: True  # the readiness check saw the slot before its death
        s.send(2, "call", session=a, fn="operator.add", args=[1, 1])
        s.send(3, "call", session=b, fn="operator.add", args=[2, 2])
        assert s.recv() == {"id": 3, "status": "ok", "value": 4}  # the loop went on serving
        go_on.set()
        assert s.recv() == {"id": 2, "status": "ok", "value": 2}  # held, then run on the new worker
    finally:
        s.close()


def test_sigterm_while_requests_stream_in() -> None:
    s = Server(workers=2)
    workers = s.worker_pids()
    a, b = two_slot_sessions(s)
    s.send_raw(b"".join(frame({"id": i, "op": "call", "session": (a, b)[i % 2], "fn": "operator.add",
                               "args": [i, 1]}) for i in range(2000)))
    s.recv()  # serving them now
    started = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    stops_within_a_second(s, workers, started)
