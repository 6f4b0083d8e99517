"""The Port protocol spoken over a real ``python -m poolbridge serve`` subprocess's pipes: hello,
every op, sessions, refs, streams, error shapes and malformed requests (docs/protocol.md)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from pb_portclient import REF, STREAM, Server, frame, running


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running() as s:
        yield s


# -- hello and plain ops --------------------------------------------------------------------------


def test_hello(server: Server) -> None:
    h = server.hello
    assert h["protocol"] == 2
    assert len(h["epoch"]) == 16 and int(h["epoch"], 16) >= 0 and h["epoch"] == h["epoch"].lower()
    assert h["slots"] == 2
    assert h["pid"] == server.proc.pid
    assert sorted(h["worker_pids"]) == sorted(server.worker_pids())


def test_call_by_dotted_path(server: Server) -> None:
    assert server.ok("call", session="s1", fn="operator.add", args=[2, 3]) == 5
    rev = server.ok("call", session="s1", fn="builtins.sorted", args=[[3, 1, 2]], kwargs={"reverse": True})
    assert rev == [3, 2, 1]
    assert server.ok("call", session="s1", fn="builtins.divmod", args=[7, 2]) == [3, 1]  # tuples arrive as arrays
    assert server.ok("call", session="s1", fn="builtins.bytes", args=[[104, 105]]) == b"hi"


def test_getattr_path_and_ping_slot_for(server: Server) -> None:
    assert server.ok("getattr", session="s1", path="math.pi") == pytest.approx(3.14159265)
    assert server.ok("ping") == {"pid": server.proc.pid}
    slot = server.ok("slot_for", session="user-42")
    from poolbridge import jump_hash, stable_hash64

    assert slot == jump_hash(stable_hash64("user-42"), 2)
    pong = server.ok("ping", session="user-42")
    assert pong["slot"] == slot
    assert pong["pid"] == server.hello["worker_pids"][slot]


def test_stats(server: Server) -> None:
    stats = server.ok("stats")
    assert stats["workers"] == 2
    assert [s["slot"] for s in stats["slots"]] == [0, 1]
    assert all(s["alive"] for s in stats["slots"])


# -- sessions and refs -------------------------------------------------------------------------------


def test_session_is_pinned_to_one_worker(server: Server) -> None:
    for session in ("alpha", "beta", "gamma", "delta"):
        pids = {server.ok("call", session=session, fn="os.getpid") for _ in range(5)}
        assert len(pids) == 1
        assert pids == {server.hello["worker_pids"][server.ok("slot_for", session=session)]}


def test_refs_create_method_getattr_setattr_release(server: Server) -> None:
    ref = server.ok("create", session="refs", fn="pb_test_helpers.Box", args=[10])
    assert set(ref) == {REF}
    session, _ref_id, slot, generation, epoch = ref[REF]
    assert session == "refs" and slot == server.ok("slot_for", session="refs") and generation == 0
    assert epoch == server.hello["epoch"]
    assert server.ok("method", target=ref, name="add", args=[5]) == 15
    assert server.ok("getattr", target=ref, name="value") == 15
    assert server.ok("setattr", target=ref, name="value", value=[1, 2]) is None
    assert server.ok("method", session="refs", target=ref, name="get") == [1, 2]
    # a ref passed back as an argument
    assert server.ok("call", session="refs", fn="operator.is_", args=[ref, {REF: ref[REF]}]) is True
    assert server.ok("call", session="refs", fn="builtins.getattr", args=[ref, "value"]) == [1, 2]
    # call a ref (a callable held in the worker)
    fn = server.ok("getattr", session="refs", path="pb_test_helpers.Box", ret="ref")
    box2 = server.ok("call", fn=fn, args=[3], ret="ref")
    assert server.ok("method", target=box2, name="get") == 3
    assert server.ok("release", ref=ref) is None
    assert server.error("method", target=ref, name="get")["code"] == "ref_not_found"
    assert server.error("release", ref=ref)["code"] == "ref_not_found"


def test_unencodable_result_comes_back_as_ref(server: Server) -> None:
    value = server.ok("call", session="auto-ref", fn="builtins.object")
    assert set(value) == {REF}
    nested = server.ok("call", session="auto-ref", fn="builtins.list", args=[[1]], ret="value")
    assert nested == [1]
    as_ref = server.ok("call", session="auto-ref", fn="builtins.list", args=[[1]], ret="ref")
    assert set(as_ref) == {REF}
    assert server.ok("method", target=as_ref, name="__len__") == 1
    # nested: the encodable parts stay values, the rest become refs in the session
    mixed = server.ok("call", session="auto-ref", fn="builtins.list", args=[[1, ref := value]])
    assert mixed[0] == 1 and set(mixed[1]) == {REF} and mixed[1][REF][0] == "auto-ref"
    assert ref[REF][0] == "auto-ref"


def test_session_mismatch(server: Server) -> None:
    ref = server.ok("create", session="mine", fn="pb_test_helpers.Box", args=[1])
    err = server.error("method", session="theirs", target=ref, name="get")
    assert err["code"] == "session_mismatch"
    err = server.error("call", session="theirs", fn="builtins.id", args=[ref])
    assert err["code"] == "session_mismatch"
    epoch = server.hello["epoch"]
    forged = {REF: ["mine", ref[REF][1], 1 - ref[REF][2], 0, epoch]}
    assert server.error("method", target=forged, name="get")["code"] == "session_mismatch"
    missing = {REF: ["mine", 999_999, ref[REF][2], 0, epoch]}
    assert server.error("method", target=missing, name="get")["code"] == "ref_not_found"


def test_no_session_is_rejected(server: Server) -> None:
    for op, fields in [
        ("call", {"fn": "os.getpid"}),
        ("create", {"fn": "pb_test_helpers.Box"}),
        ("getattr", {"path": "math.pi"}),
        ("helper", {"name": "whoami"}),
        ("stream_open", {"fn": "builtins.range", "args": [3]}),
        ("close_session", {}),
        ("slot_for", {}),
    ]:
        err = server.error(op, **fields)
        assert err["code"] == "bad_request" and "session" in err["message"], (op, err)
    assert server.error("call", session="", fn="os.getpid")["code"] == "bad_request"
    assert server.error("call", session=5, fn="os.getpid")["code"] == "bad_request"


def test_helpers_and_close_session(server: Server) -> None:
    assert server.ok("helper", session="h1", name="remember", args=["k", "v"]) == 1
    assert server.ok("helper", session="h1", name="recall", args=["k"]) == "v"
    assert server.ok("helper", session="h2", name="recall", args=["k"]) is None
    who = server.ok("helper", session="h1", name="whoami")
    assert who["session"] == "h1" and who["slot"] == server.ok("slot_for", session="h1")
    server.ok("create", session="h1", fn="pb_test_helpers.Box")
    assert server.ok("close_session", session="h1") == 1  # refs + streams dropped
    assert server.ok("helper", session="h1", name="recall", args=["k"]) is None
    assert server.error("helper", session="h1", name="nope")["code"] == "helper_not_found"


# -- streams ------------------------------------------------------------------------------------------


def test_streams(server: Server) -> None:
    opened = server.ok("stream_open", session="st", fn="pb_test_helpers.countdown", args=[5], batch=2)
    assert opened["items"] == [5, 4] and opened["done"] is False
    stream = opened["stream"]
    assert set(stream) == {STREAM} and stream[STREAM][0] == "st"
    assert server.ok("stream_next", stream=stream, batch=2) == {"items": [3, 2], "done": False}
    assert server.ok("stream_next", stream=stream, batch=10) == {"items": [1], "done": True}
    assert server.error("stream_next", stream=stream)["code"] == "ref_not_found"

    opened = server.ok("stream_open", session="st", fn="builtins.range", args=[100], batch=1)
    assert server.ok("stream_close", stream=opened["stream"]) is None
    assert server.error("stream_next", stream=opened["stream"])["code"] == "ref_not_found"

    opened = server.ok("stream_open", session="st", fn="pb_test_helpers.failing_stream", args=[2], batch=5)
    assert opened["items"] == [0, 1] and opened["done"] is False
    err = server.error("stream_next", stream=opened["stream"])
    assert err["code"] == "remote_error" and err["type"] == "RuntimeError" and "stream broke" in err["message"]
    # a stream is not a ref and a ref is not a stream
    ref = server.ok("create", session="st", fn="pb_test_helpers.Box")
    assert server.error("stream_next", stream=ref)["code"] == "bad_request"
    assert server.error("release", ref=opened["stream"])["code"] == "bad_request"


# -- errors -------------------------------------------------------------------------------------------


def test_remote_error_shape(server: Server) -> None:
    err = server.error("call", session="e", fn="math.sqrt", args=[-1])
    assert err["code"] == "remote_error"
    assert err["type"] == "ValueError"
    assert err["message"] == "math domain error"
    assert err["traceback"] == "ValueError: math domain error\n"  # raised by a builtin: no user frame
    err = server.error("call", session="e", fn="pb_portmods.boom", args=["deep"])
    assert err["type"] == "pb_portmods.Boom" and err["traceback"].startswith("Traceback (most recent call last)")
    assert "pb_portmods.py" in err["traceback"] and "poolbridge/" not in err["traceback"]
    err = server.error("call", session="e", fn="no_such_module_xyz.f")
    assert err["code"] == "remote_error" and err["type"] == "ModuleNotFoundError"
    assert "no module named 'no_such_module_xyz' could be imported" in err["message"]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"op": "frobnicate", "session": "b"}, "unknown op"),
        ({"op": 5, "session": "b"}, "unknown op"),
        ({"op": "call", "session": "b"}, "fn"),
        ({"op": "call", "session": "b", "fn": 7}, "fn"),
        ({"op": "call", "session": "b", "fn": "os.getpid", "args": "x"}, "args"),
        ({"op": "call", "session": "b", "fn": "os.getpid", "kwargs": [1]}, "kwargs"),
        ({"op": "call", "session": "b", "fn": "os.getpid", "kwargs": {1: 2}}, "kwargs"),
        ({"op": "call", "session": "b", "fn": "os.getpid", "ret": "maybe"}, "ret"),
        ({"op": "method", "session": "b", "target": "nope", "name": "x"}, "target"),
        ({"op": "method", "session": "b", "target": {REF: ["b", 1, 0]}, "name": "x"}, "malformed"),
        ({"op": "method", "session": "b", "target": {REF: ["b", 1, 0, 0]}, "name": "x"}, "malformed"),  # v1
        ({"op": "stream_next", "stream": {STREAM: ["b", 1, 0, 0]}}, "malformed"),
        ({"op": "call", "session": "b", "fn": "os.getpid", "timeout": 0}, "timeout"),
        ({"op": "call", "session": "b", "fn": "os.getpid", "timeout": True}, "timeout"),
        ({"op": "call", "session": "b", "fn": "os.getpid", "timeout": 1, "on_timeout": "later"}, "on_timeout"),
        ({"op": "cancel"}, "target"),
        ({"op": "call", "session": "b", "fn": "builtins.id", "args": [{"__poolbridge_int__": "12x"}]}, "malformed"),
        ({"op": "call", "session": "b", "fn": "builtins.id", "args": [{"__poolbridge_int__": 12}]}, "malformed"),
        ({"op": "getattr", "session": "b"}, "path"),
        ({"op": "setattr", "session": "b", "target": {REF: ["b", 1, 0, 0, "e"]}, "name": "x"}, "value"),
        ({"op": "stream_next", "session": "b", "stream": {STREAM: ["b", 1, 0, 0, "e"]}, "batch": 0}, "batch"),
        ({"op": "stream_open", "session": "b", "fn": "builtins.range", "batch": True}, "batch"),
        ({"op": "release", "session": "b"}, "ref"),
    ],
)
def test_bad_requests_get_an_error_with_their_id(server: Server, fields: dict[str, Any], needle: str) -> None:
    server.next_id += 1
    server.send_raw(frame({"id": server.next_id, **fields}))
    reply = server.recv()
    assert reply["id"] == server.next_id
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "bad_request", reply
    assert needle in reply["error"]["message"]


def test_ext_types_are_rejected(server: Server) -> None:
    pickled = msgpack.ExtType(1, b"\x80\x05N.")  # a pickle of None: never unpickled
    server.send_raw(frame({"id": 901, "op": "call", "session": "x", "fn": "builtins.id", "args": [pickled]}))
    reply = server.recv()
    assert reply["id"] == 901 and reply["error"]["code"] == "bad_request"
    wire_ref = msgpack.ExtType(3, msgpack.packb(["x", 1, 0, 0]))  # the private channel's ref
    server.send_raw(frame({"id": 902, "op": "call", "session": "x", "fn": "builtins.id", "args": [wire_ref]}))
    reply = server.recv()
    assert reply["id"] == 902 and reply["error"]["code"] == "bad_request"
    server.send_raw(frame({"id": 903, "op": "call", "session": "x", "fn": "builtins.id",
                           "args": [msgpack.Timestamp(1, 0)]}))
    reply = server.recv()
    assert reply["id"] == 903 and reply["error"]["code"] == "bad_request"


def test_malformed_frames_keep_the_server_serving(server: Server) -> None:
    for raw in (b"\xc1", b"\x92\x01", b"not msgpack at all \xff\xfe", b"", b"\x93\x01\x02"):
        server.send_raw(struct.pack(">I", len(raw)) + raw)
        reply = server.recv()
        assert reply["status"] == "error" and reply["error"]["code"] == "bad_request", (raw, reply)
        assert reply["id"] is None
    # a map whose id can be read but whose op cannot
    server.send_raw(frame({"id": 77}))
    reply = server.recv()
    assert reply["id"] == 77 and reply["error"]["code"] == "bad_request"
    # a frame with invalid UTF-8 in a str, id still salvaged
    body = b"\x83\xa2id\x4e\xa2op\xa4call\xa7session\xa2\xff\xfe"
    server.send_raw(struct.pack(">I", len(body)) + body)
    reply = server.recv()
    assert reply["id"] == 78 and reply["error"]["code"] == "bad_request"
    for bad_id in (None, 1.5, True, [1], {REF: ["x", 1, 0, 0, "e"]}):
        server.send_raw(frame({"id": bad_id, "op": "ping"}))
        reply = server.recv()
        assert reply["error"]["code"] == "bad_request" and reply["id"] is None
    assert server.ok("call", session="still", fn="operator.mul", args=[6, 7]) == 42


def test_deep_nesting_is_a_bad_request(server: Server) -> None:
    body = b"\x85\xa2id\xcd\x03\xe8\xa2op\xa4call\xa7session\xa1d\xa2fn\xabbuiltins.id\xa4args\x91"
    inner = b"\x91" * 2000 + b"\x01"
    server.send_raw(struct.pack(">I", len(body + inner)) + body + inner)
    reply = server.recv()
    assert reply["id"] in (1000, None) and reply["error"]["code"] == "bad_request"
    nested: Any = 1
    for _ in range(300):
        nested = [nested]
    err = server.error("call", session="d", fn="builtins.id", args=[nested])
    assert err["code"] == "bad_request" and "nested" in err["message"]
    assert server.ok("call", session="d", fn="builtins.len", args=[[[[1]]]]) == 1


def test_string_ids_are_echoed(server: Server) -> None:
    server.send_raw(frame({"id": "req-a", "op": "ping"}))
    assert server.recv()["id"] == "req-a"


def test_concurrent_requests_complete_out_of_order(server: Server) -> None:
    # session "slow" and "fast" on different slots: the fast reply overtakes the slow one
    sessions = {}
    for i in range(50):
        s = f"k{i}"
        sessions.setdefault(server.ok("slot_for", session=s), s)
        if len(sessions) == 2:
            break
    slow_s, fast_s = sessions[0], sessions[1]
    slow = server.send("call", session=slow_s, fn="time.sleep", args=[0.5])
    fast = [server.send("call", session=fast_s, fn="operator.add", args=[i, 1]) for i in range(100)]
    replies = [server.recv() for _ in range(101)]
    ids = [r["id"] for r in replies]
    assert sorted(ids) == sorted([slow, *fast])
    assert ids[-1] == slow
    assert {r["id"]: r["value"] for r in replies if r["id"] != slow} == {rid: i + 1 for i, rid in enumerate(fast)}


def test_prints_never_corrupt_frames(server: Server) -> None:
    for _ in range(3):
        assert server.ok("helper", session="noise", name="noisy", args=["garbage-on-fd-1"]) == "garbage-on-fd-1"
        assert server.ok("call", session="noise", fn="builtins.print", args=["x" * 100]) is None
        assert server.ok("call", session="noise", fn="os.write", args=[1, b"\x00\x00\x00\x05hello"]) == 9
    assert server.ok("ping") == {"pid": server.proc.pid}


def test_workers_do_not_hold_the_protocol_pipes(server: Server) -> None:
    assert server.proc.stdin is not None and server.proc.stdout is not None
    protocol = {f"pipe:[{os.fstat(f.fileno()).st_ino}]" for f in (server.proc.stdin, server.proc.stdout)}
    for pid in server.worker_pids():
        links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
                 if os.path.exists(f"/proc/{pid}/fd/{fd}")}
        assert not links & protocol, (pid, links)
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2")
