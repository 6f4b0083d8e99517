"""The Port server's lifecycle on the wire: frame limits, busy slots, worker crashes (``ran``, re-sent
requests), epochs, cancel and timeouts, ping/stats from router state, shutdown (docs/protocol.md)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from typing import Any

import msgpack
import psutil
import pytest
from pb_portclient import REF, WAIT, Server, env, frame, stops_within_a_second, two_slot_sessions, wait_gone


def _raw(pairs: list[tuple[str, Any]]) -> bytes:
    """A request map in exactly this key order (as a client's own encoder may write it)."""
    body = msgpack.packb(dict(pairs), use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def test_oversized_frame_then_keep_serving() -> None:
    s = Server("--max-frame", "1000", workers=1)
    try:
        big = "x" * 5000
        data = frame({"id": 1, "op": "call", "session": "big", "fn": "builtins.len", "args": [big]})
        s.send_raw(data)
        reply = s.recv()
        assert reply["id"] == 1  # read from the frame's first bytes
        assert reply["error"] == {"code": "frame_too_large", "type": "FrameTooLargeError", "traceback": "",
                                  "message": f"frame of {len(data) - 4} bytes exceeds the limit of 1000 bytes"}
        # not the first key, but within the first 64 bytes: found by scanning the keys
        s.send_raw(_raw([("op", "call"), ("session", "big"), ("id", 2), ("fn", "builtins.len"), ("args", [big])]))
        assert s.recv()["id"] == 2
        # sorted keys, as an Elixir map of <= 32 keys is encoded: the big "args" comes first
        s.send_raw(_raw([("args", [big]), ("fn", "builtins.len"), ("id", 3), ("op", "call"), ("session", "big")]))
        reply = s.recv()
        assert reply["error"]["code"] == "frame_too_large" and reply["id"] is None
        # --max-frame counts the body only: a body of exactly 1000 bytes passes
        body = msgpack.packb({"id": 4, "op": "call", "session": "big", "fn": "builtins.len", "args": [""]})
        pad = 1000 - len(body) - 3  # str8 header (2 bytes) grows the string by 1..2 bytes: adjust below
        req = {"id": 4, "op": "call", "session": "big", "fn": "builtins.len", "args": ["y" * pad]}
        while len(msgpack.packb(req)) < 1000:
            req["args"] = [req["args"][0] + "y"]
        assert len(msgpack.packb(req)) == 1000
        s.send_raw(frame(req))
        assert s.recv() == {"id": 4, "status": "ok", "value": len(req["args"][0])}
        req["args"] = [req["args"][0] + "y"]
        s.send_raw(frame(req))
        assert s.recv()["error"]["code"] == "frame_too_large"
        assert s.ok("call", session="big", fn="builtins.len", args=["x" * 500]) == 500
    finally:
        s.close()
    assert s.proc.returncode == 0


def test_busy_slot_gets_busy_not_a_stalled_server() -> None:
    s = Server("--max-in-flight", "2", workers=1)
    try:
        data = b"".join(
            frame({"id": i, "op": "call", "session": "busy", "fn": "time.sleep", "args": [0.3]}) for i in (1, 2, 3)
        )
        s.send_raw(data)
        first = s.recv()
        assert first["id"] == 3 and first["error"]["code"] == "busy"
        assert sorted(s.recv()["id"] for _ in range(2)) == [1, 2]
        assert s.ok("call", session="busy", fn="operator.add", args=[1, 1]) == 2
    finally:
        s.close()


def test_worker_crash_ran_and_unstarted_requests_are_re_sent(tmp_path: Any) -> None:
    """The request a worker was running gets worker_crashed with ran: true; the ones queued behind
    it (sent, never started) are re-sent to the new worker and answered from there, in order."""
    s = Server(workers=2)
    try:
        ref = s.ok("create", session="victim", fn="pb_test_helpers.Box", args=[1])
        old_pid = s.ok("call", session="victim", fn="os.getpid")
        log = str(tmp_path / "log")
        crash = s.send("call", session="victim", fn="pb_portmods.sleep_then", args=[0.3, None])
        crash_now = s.send("call", session="victim", fn="os._exit", args=[3])
        after = [s.send("call", session="victim", fn="pb_portmods.log_to", args=[log, str(i)]) for i in range(5)]
        pids = s.send("call", session="victim", fn="os.getpid")
        stale = s.send("method", target=ref, name="get")  # checked when sent (generation 0): lost in the worker
        replies = {r["id"]: r for r in (s.recv() for _ in range(9))}
        assert replies[crash]["status"] == "ok"
        assert replies[crash_now]["error"]["code"] == "worker_crashed"
        assert replies[crash_now]["error"]["ran"] is True
        assert [replies[i]["value"] for i in after] == [str(i) for i in range(5)]
        with open(log) as f:
            assert f.read().split() == [str(i) for i in range(5)]  # each ran once, in order
        assert replies[pids]["value"] != old_pid
        assert replies[stale]["error"]["code"] == "session_lost"
        assert s.error("method", target=ref, name="get")["code"] == "session_lost"
        assert s.ok("ping", session="victim")["generation"] == 1
    finally:
        s.close()


def test_a_ref_of_another_server_is_session_lost_never_another_object() -> None:
    """Ids and generations start again in a new server: the epoch tells its refs apart."""
    first = Server(workers=1)
    try:
        old = first.ok("create", session="alias", fn="pb_test_helpers.Box", args=["old"])
    finally:
        first.close()
    second = Server(workers=1)
    try:
        new = second.ok("create", session="alias", fn="pb_test_helpers.Box", args=["new"])
        assert new[REF][:4] == old[REF][:4] and new[REF][4] != old[REF][4]  # same ids, other epoch
        assert second.ok("method", target=new, name="get") == "new"
        for op, fields in [("method", {"target": old, "name": "get"}), ("getattr", {"target": old, "name": "value"}),
                           ("release", {"ref": old}), ("call", {"session": "alias", "fn": "builtins.id",
                                                                "args": [[{"k": old}]]})]:
            err = second.error(op, **fields)
            assert err["code"] == "session_lost" and "another server" in err["message"], (op, err)
        stream = second.ok("stream_open", session="alias", fn="builtins.range", args=[10], batch=1)["stream"]
        forged = {"__poolbridge_stream__": [*stream["__poolbridge_stream__"][:4], old[REF][4]]}
        assert second.error("stream_next", stream=forged)["code"] == "session_lost"
    finally:
        second.close()


@pytest.mark.parametrize("how", ["eof", "sigterm"])
def test_shutdown_answers_in_flight_requests_and_leaves_no_process(how: str) -> None:
    s = Server(workers=2)
    workers = s.worker_pids()
    assert len(workers) == 2
    busy = s.send("call", session="busy", fn="time.sleep", args=[30])  # in flight when the port goes
    queued = s.send("call", session="busy", fn="operator.add", args=[1, 2])  # queued behind it
    assert s.ok("ping", session="busy")["slot"] == s.ok("slot_for", session="busy")  # both were sent
    started = time.monotonic()
    if how == "eof":
        assert s.proc.stdin is not None
        s.proc.stdin.close()
    else:
        s.proc.send_signal(signal.SIGTERM)
    stops_within_a_second(s, workers, started)
    replies = {}
    while not s.replies.empty():
        reply = s.replies.get_nowait()
        if isinstance(reply, dict):
            replies[reply["id"]] = reply
    assert set(replies) == {busy, queued}
    for reply in replies.values():
        assert reply["error"]["code"] == "pool_closed" and reply["error"]["type"] == "PoolClosedError"


def test_workers_exit_when_server_is_killed() -> None:
    s = Server(workers=2)
    workers = s.worker_pids()
    s.proc.kill()
    s.proc.wait(WAIT)
    s.close()
    assert wait_gone(workers, 3.0) == []


def test_fds_mode() -> None:
    """``--fds IN,OUT``: the protocol on extra fds while stdio stays free (Elixir :nouse_stdio)."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    script = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4);"
        "os.execv(sys.executable, [sys.executable, '-m', 'poolbridge', 'serve', '--workers', '1', '--fds', '3,4'])"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(req_r), str(rep_w)], pass_fds=(req_r, rep_w),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    os.close(req_r)
    os.close(rep_w)
    buf = b""

    def recv() -> Any:
        nonlocal buf
        deadline = time.monotonic() + WAIT
        while True:
            if len(buf) >= 4:
                (n,) = struct.unpack(">I", buf[:4])
                if len(buf) >= 4 + n:
                    obj, buf = msgpack.unpackb(buf[4 : 4 + n], raw=False), buf[4 + n :]
                    return obj
            assert time.monotonic() < deadline
            import select

            if select.select([rep_r], [], [], 1.0)[0]:
                chunk = os.read(rep_r, 65536)
                assert chunk, "EOF"
                buf += chunk

    try:
        hello = recv()
        assert hello["slots"] == 1
        os.write(req_w, frame({"id": 1, "op": "call", "session": "f", "fn": "builtins.print", "args": ["to stdout"]}))
        assert recv() == {"id": 1, "status": "ok", "value": None}
        workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]  # and the template
        protocol = {f"pipe:[{os.fstat(fd).st_ino}]" for fd in (req_w, rep_r)}
        for pid in workers:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
                     if os.path.exists(f"/proc/{pid}/fd/{fd}")}
            assert not links & protocol, (pid, links)
        # the server itself moved them off 3/4 onto private fds
        server_links = {os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")
                        if os.path.exists(f"/proc/{proc.pid}/fd/{fd}")}
        assert server_links & protocol
    finally:
        os.close(req_w)
        proc.wait(WAIT)
        os.close(rep_r)
    assert proc.stdout is not None
    assert b"to stdout" in proc.stdout.read()  # stdout stays the user's in --fds mode
    proc.stdout.close()
    assert proc.returncode == 0
    assert wait_gone(workers) == []


# -- cancel, timeouts, ping and stats from router state -----------------------------------------------


def _replies(s: Server, n: int) -> dict[Any, Any]:
    return {r["id"]: r for r in (s.recv() for _ in range(n))}


def test_cancel(tmp_path: Any) -> None:
    import pb_portmods

    s = Server(workers=1)
    try:
        log, started, release = (str(tmp_path / name) for name in ("log", "started", "release"))
        slow = s.send("call", session="c", fn="pb_portmods.hold", args=[started, release, "slow"])
        queued = s.send("call", session="c", fn="pb_portmods.log_to", args=[log, "queued"])
        assert pb_portmods.wait_for(started)  # the worker runs `slow`; `queued` waits behind it
        cancel_queued = s.send("cancel", target=queued)
        replies = _replies(s, 2)
        assert list(replies) == [queued, cancel_queued]  # the cancelled request is answered first
        assert replies[queued]["error"] == {"code": "cancelled", "type": "RequestCancelledError",
                                            "message": f"request {queued} was cancelled", "traceback": ""}
        assert replies[cancel_queued] == {"id": cancel_queued, "status": "ok", "value": {"state": "cancelled"}}
        assert s.ok("cancel", target=slow) == {"state": "running"}  # started: it runs to its end
        open(release, "w").close()
        assert s.recv() == {"id": slow, "status": "ok", "value": "slow"}
        assert s.ok("cancel", target=slow) == {"state": "unknown"}  # answered already
        assert s.ok("cancel", target="never-sent") == {"state": "unknown"}
        assert s.ok("call", session="c", fn="pb_portmods.log_to", args=[log, "after"]) == "after"
        with open(log) as f:
            assert f.read().split() == ["after"]  # the cancelled request never ran
    finally:
        s.close()


def test_timeout_keep_and_a_queued_request_that_times_out_never_runs(tmp_path: Any) -> None:
    import pb_portmods

    s = Server(workers=1)
    try:
        log, started, release = (str(tmp_path / name) for name in ("log", "started", "release"))
        # Long enough to start (then it expires while running); the second one waits behind it.
        slow = s.send("call", session="t", fn="pb_portmods.hold", args=[started, release, "late"], timeout=3)
        assert pb_portmods.wait_for(started)
        queued = s.send("call", session="t", fn="pb_portmods.log_to", args=[log, "queued"], timeout=0.1)
        replies = _replies(s, 2)
        for rid in (slow, queued):
            err = replies[rid]["error"]
            assert err["code"] == "timeout" and err["type"] == "CallTimeoutError" and err["traceback"] == ""
        open(release, "w").close()
        # keep: the worker finishes the slow call (its late reply dropped); the queued one never ran
        assert s.ok("call", session="t", fn="pb_portmods.log_to", args=[log, "after"]) == "after"
        with open(log) as f:
            assert f.read().split() == ["after"]
        assert s.ok("ping", session="t")["generation"] == 0
        assert s.ok("call", session="t", fn="operator.add", args=[1, 2], timeout=30) == 3  # in time: a value
    finally:
        s.close()


def test_timeout_restart_kills_the_worker() -> None:
    s = Server(workers=1)
    try:
        ref = s.ok("create", session="r", fn="pb_test_helpers.Box", args=[1])
        pid = s.ok("call", session="r", fn="os.getpid")
        err = s.error("call", session="r", fn="time.sleep", args=[60], timeout=0.2, on_timeout="restart")
        assert err["code"] == "timeout"
        assert s.ok("call", session="r", fn="os.getpid") != pid  # a new worker, not one still sleeping
        assert s.ok("ping", session="r")["generation"] == 1
        assert s.error("method", target=ref, name="get")["code"] == "session_lost"
    finally:
        s.close()


def test_ping_and_stats_are_answered_while_a_worker_is_busy() -> None:
    s = Server(workers=2)
    try:
        busy, idle = two_slot_sessions(s)
        s.ok("create", session=idle, fn="pb_test_helpers.Box")
        assert s.ok("ping", session=busy)["last_reply_ms"] is None  # that worker has answered nothing yet
        assert s.ok("call", session=busy, fn="operator.add", args=[1, 1]) == 2
        assert s.ok("ping", session=busy)["last_reply_ms"] >= 0
        sleeper = s.send("call", session=busy, fn="time.sleep", args=[30])
        ping = s.send("ping", session=busy)
        stats = s.send("stats")
        replies = _replies(s, 2)  # answered before the 30 s call: never queued behind it
        pong = replies[ping]["value"]
        busy_slot = s.ok("slot_for", session=busy)
        assert set(pong) == {"slot", "generation", "pid", "last_reply_ms"}
        assert pong["slot"] == busy_slot and pong["pid"] == s.hello["worker_pids"][busy_slot]
        slots = replies[stats]["value"]["slots"]
        assert slots[busy_slot]["responsive"] is False and slots[busy_slot]["refs"] == -1
        assert slots[busy_slot]["in_flight"] == 1 and slots[busy_slot]["alive"] is True
        assert slots[1 - busy_slot]["responsive"] is True and slots[1 - busy_slot]["refs"] == 1
        assert all(isinstance(slot["last_reply_ms"], int) for slot in slots)
        assert sleeper not in replies
    finally:
        s.close()
