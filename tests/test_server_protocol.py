"""The Port protocol spoken over a real ``python -m poolbridge serve`` subprocess's pipes."""

from __future__ import annotations

import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
from pb_faultmods import worker_pids_of

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HELPERS_DIR = HERE / "elixir"
REF = "__poolbridge_ref__"
STREAM = "__poolbridge_stream__"
WAIT = 20.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HELPERS_DIR), env.get("PYTHONPATH", "")])
    return env


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class Server:
    """A server subprocess and a reader thread turning its stdout into reply maps."""

    def __init__(self, *extra: str, workers: int = 2) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poolbridge", "serve", "--workers", str(workers), "--helpers", "pb_test_helpers",
             *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        self.replies: queue.Queue[Any] = queue.Queue()
        self.stderr = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._err.start()
        self.next_id = 0
        self.hello = self.recv()
        assert self.hello["hello"] == "poolbridge"

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            head = out.read(4)
            if len(head) < 4:
                self.replies.put(EOFError(head))
                return
            (n,) = struct.unpack(">I", head)
            body = out.read(n)
            try:
                self.replies.put(msgpack.unpackb(body, raw=False, strict_map_key=False))
            except Exception as exc:  # a corrupted frame must fail the test that reads it
                self.replies.put(exc)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, op: str, **fields: Any) -> int:
        self.next_id += 1
        self.send_raw(frame({"id": self.next_id, "op": op, **fields}))
        return self.next_id

    def recv(self, timeout: float = WAIT) -> Any:
        reply = self.replies.get(timeout=timeout)
        if isinstance(reply, BaseException):
            raise AssertionError(f"no reply frame: {reply!r}; stderr: {self.stderr[-2000:]!r}")
        return reply

    def request(self, op: str, **fields: Any) -> Any:
        req_id = self.send(op, **fields)
        reply = self.recv()
        assert reply["id"] == req_id, reply
        return reply

    def ok(self, op: str, **fields: Any) -> Any:
        reply = self.request(op, **fields)
        assert reply["status"] == "ok", reply
        return reply["value"]

    def error(self, op: str, **fields: Any) -> dict[str, Any]:
        reply = self.request(op, **fields)
        assert reply["status"] == "error", reply
        return reply["error"]  # type: ignore[no-any-return]

    def worker_pids(self) -> list[int]:
        return worker_pids_of(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self._reader.join(WAIT)
        self._err.join(WAIT)
        for f in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if f is not None and not f.closed:
                f.close()


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if alive:
            psutil.wait_procs([psutil.Process(p) for p in alive if psutil.pid_exists(p)], timeout=0.05)
    return alive


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    pids = s.worker_pids()
    try:
        yield s
    finally:
        s.close()
    assert _wait_gone([s.proc.pid, *pids]) == []


# -- hello and plain ops --------------------------------------------------------------------------


def test_hello(server: Server) -> None:
    h = server.hello
    assert h["protocol"] == 1
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
    session, _ref_id, slot, generation = ref[REF]
    assert session == "refs" and slot == server.ok("slot_for", session="refs") and generation == 0
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
    forged = {REF: ["mine", ref[REF][1], 1 - ref[REF][2], 0]}
    assert server.error("method", target=forged, name="get")["code"] == "session_mismatch"
    missing = {REF: ["mine", 999_999, ref[REF][2], 0]}
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
    assert "Traceback" in err["traceback"]
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
        ({"op": "getattr", "session": "b"}, "path"),
        ({"op": "setattr", "session": "b", "target": {REF: ["b", 1, 0, 0]}, "name": "x"}, "value"),
        ({"op": "stream_next", "session": "b", "stream": {STREAM: ["b", 1, 0, 0]}, "batch": 0}, "batch"),
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
    wire_ref = msgpack.ExtType(3, msgpack.packb(["x", 1, 0, 0]))
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
    for bad_id in (None, 1.5, True, [1], {REF: ["x", 1, 0, 0]}):
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


# -- separate servers: limits, allow-list, crashes, shutdown ------------------------------------


def test_oversized_frame_then_keep_serving() -> None:
    s = Server("--max-frame", "1000", workers=1)
    try:
        s.send_raw(frame({"id": 1, "op": "call", "session": "big", "fn": "builtins.len", "args": ["x" * 5000]}))
        reply = s.recv()
        assert reply["status"] == "error" and reply["error"]["code"] == "frame_too_large"
        assert reply["id"] == 1  # read from the frame's first bytes: "id" is its first key
        s.send_raw(frame({"op": "call", "id": 2, "session": "big", "fn": "builtins.len", "args": ["x" * 5000]}))
        reply = s.recv()
        assert reply["error"]["code"] == "frame_too_large" and reply["id"] is None  # "id" not first
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


def test_allow_module() -> None:
    s = Server("--allow-module", "math", "--allow-module", "pb_test_*", "--allow-module", "builtins", workers=1)
    try:
        assert s.ok("call", session="a", fn="math.sqrt", args=[4]) == 2.0
        assert s.ok("call", session="a", fn="builtins.len", args=[[1, 2]]) == 2
        ref = s.ok("create", session="a", fn="pb_test_helpers.Box", args=[1])
        assert s.ok("method", target=ref, name="get") == 1
        for op, fields in [
            ("call", {"fn": "os.system", "args": ["true"]}),
            ("call", {"fn": "subprocess.run", "args": [["true"]]}),
            ("create", {"fn": "collections.Counter"}),
            ("getattr", {"path": "os.environ"}),
            ("stream_open", {"fn": "itertools.count"}),
            ("call", {"fn": "mathx.f"}),
            ("call", {"fn": "len"}),
            ("method", {"target": ref, "name": "__class__"}),
            ("getattr", {"target": ref, "name": "__dict__"}),
        ]:
            err = s.error(op, session="a", **fields)
            assert err["code"] == "not_allowed", (op, fields, err)
    finally:
        s.close()


def test_worker_crash_and_session_lost() -> None:
    s = Server(workers=2)
    try:
        ref = s.ok("create", session="victim", fn="pb_test_helpers.Box", args=[1])
        old_pid = s.ok("call", session="victim", fn="os.getpid")
        err = s.error("call", session="victim", fn="os._exit", args=[3])
        assert err["code"] == "worker_crashed"
        new_pid = s.ok("call", session="victim", fn="os.getpid")  # the slot came back
        assert new_pid != old_pid
        assert s.error("method", target=ref, name="get")["code"] == "session_lost"
    finally:
        s.close()


def _stops_within_a_second(s: Server, workers: list[int], started: float) -> None:
    """The server asked to stop at ``started`` exits cleanly within a second, its workers gone."""
    s.proc.wait(WAIT)
    elapsed = time.monotonic() - started
    s.close()
    assert elapsed < 1.0, elapsed
    assert s.proc.returncode == 0
    assert _wait_gone(workers, 2.0) == []


@pytest.mark.parametrize("how", ["eof", "sigterm"])
def test_shutdown_leaves_no_process(how: str) -> None:
    s = Server(workers=2)
    workers = s.worker_pids()
    assert len(workers) == 2
    s.send("call", session="busy", fn="time.sleep", args=[30])  # in flight when the port goes
    started = time.monotonic()
    if how == "eof":
        assert s.proc.stdin is not None
        s.proc.stdin.close()
    else:
        s.proc.send_signal(signal.SIGTERM)
    _stops_within_a_second(s, workers, started)


def test_workers_exit_when_server_is_killed() -> None:
    s = Server(workers=2)
    workers = s.worker_pids()
    s.proc.kill()
    s.proc.wait(WAIT)
    s.close()
    assert _wait_gone(workers, 3.0) == []


def test_fds_mode() -> None:
    """``--fds IN,OUT``: the protocol on extra fds while stdio stays free (Elixir :nouse_stdio)."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    script = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4);"
        "os.execv(sys.executable, [sys.executable, '-m', 'poolbridge', 'serve', '--workers', '1', '--fds', '3,4'])"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(req_r), str(rep_w)], pass_fds=(req_r, rep_w),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
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
    assert _wait_gone(workers) == []


# -- the server's poll loop -------------------------------------------------------------------------


def _two_slot_sessions(server: Server) -> tuple[str, str]:
    """Two sessions on different slots of a 2-worker server."""
    by_slot: dict[int, str] = {}
    for i in range(100):
        by_slot.setdefault(server.ok("slot_for", session=f"loop-{i}"), f"loop-{i}")
        if len(by_slot) == 2:
            return by_slot[0], by_slot[1]
    raise AssertionError("no session found for one of the slots")


def _server_cpu(server: Server) -> float:
    times = psutil.Process(server.proc.pid).cpu_times()
    return float(times.user + times.system)


def test_replies_taken_over_by_a_background_reader_are_not_lost(server: Server) -> None:
    """`stats` is sent with lead=False (its channel's background reader reads the reply and, while
    it holds the read lock, every other pending reply): the loop must leave it the fd, then poll it
    again once it sends there again — no reply lost, none read twice, no spinning meanwhile."""
    a, b = _two_slot_sessions(server)
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
    before = _server_cpu(server)
    assert server.ok("call", session=a, fn="time.sleep", args=[0.5]) is None
    assert _server_cpu(server) - before < 0.25


def test_worker_killed_while_the_loop_reads_it() -> None:
    s = Server(workers=2)
    try:
        a, b = _two_slot_sessions(s)
        pid = s.ok("call", session=a, fn="os.getpid")
        ids = [s.send("call", session=a, fn="pb_test_helpers.sleep_then", args=[0.02, i]) for i in range(30)]
        replies: dict[int, Any] = {}
        first = s.recv()  # the loop is reading that worker's replies as they come
        replies[first["id"]] = first
        os.kill(pid, signal.SIGKILL)
        while len(replies) < len(ids):
            reply = s.recv()
            replies[reply["id"]] = reply
        codes = {r["status"] if r["status"] == "ok" else r["error"]["code"] for r in replies.values()}
        assert codes <= {"ok", "worker_crashed"} and "worker_crashed" in codes, codes
        # The dead pipe (EOF, then closed by the monitor) must not keep the loop busy.
        before = _server_cpu(s)
        assert s.ok("call", session=b, fn="time.sleep", args=[0.5]) is None
        assert _server_cpu(s) - before < 0.25
        assert s.ok("call", session=a, fn="operator.add", args=[1, 2]) == 3  # the new channel is read
        assert s.ok("ping", session=a)["pid"] != pid
    finally:
        s.close()
    assert s.proc.returncode == 0


class _InProcess:
    """A :class:`poolbridge._server.Server` in this process, its loop on a thread, on two pipes."""

    def __init__(self, workers: int = 2) -> None:
        from poolbridge._protocol import FrameReader
        from poolbridge._server import Server as PortServer

        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.fds = [req_r, rep_w]
        self.server = PortServer(req_r, rep_w, workers=workers)
        self.frames = FrameReader()
        self.ready: list[Any] = []
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.hello = self.recv()

    def send(self, req_id: int, op: str, **fields: Any) -> None:
        os.write(self.req_w, frame({"id": req_id, "op": op, **fields}))

    def recv(self) -> Any:
        import select

        deadline = time.monotonic() + WAIT
        while not self.ready:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and select.select([self.rep_r], [], [], remaining)[0], "no reply"
            data = os.read(self.rep_r, 1 << 16)
            assert data, "EOF"
            self.ready.extend(msgpack.unpackb(f, raw=False) for f in self.frames.feed(data))
        return self.ready.pop(0)

    def session_on(self, slot: int, prefix: str) -> str:
        router = self.server.router
        return next(f"{prefix}-{i}" for i in range(100) if router.slot_for(f"{prefix}-{i}") == slot)

    def crash_and_hold_restart(self, session: str) -> threading.Event:
        """Kill ``session``'s worker and hold its slot's restart (inside the channel factory) until
        the returned event is set; returns once the restart is being held."""
        router = self.server.router
        factory = router._factory
        restarting, go_on = threading.Event(), threading.Event()

        def gated_factory(r: Any, slot: int, generation: int) -> Any:
            if generation > 0:
                restarting.set()
                assert go_on.wait(WAIT)
            return factory(r, slot, generation)

        router._factory = gated_factory
        self.send(1, "call", session=session, fn="os._exit", args=[3])
        assert self.recv()["error"]["code"] == "worker_crashed"
        assert restarting.wait(WAIT)
        return go_on

    def close(self) -> None:
        os.close(self.req_w)  # EOF: the loop returns
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        self.server.close()
        for fd in (*self.fds, self.rep_r):
            os.close(fd)


def test_request_to_a_restarting_slot_is_answered_by_the_new_worker() -> None:
    """Requests arriving while their slot restarts wait off the loop (the other slot keeps being
    served), then run on the new worker; the loop then reads the new channel's replies itself."""
    s = _InProcess(workers=2)
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
    s = _InProcess(workers=2)
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
    s = _InProcess(workers=2)
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
    a, b = _two_slot_sessions(s)
    s.send_raw(b"".join(frame({"id": i, "op": "call", "session": (a, b)[i % 2], "fn": "operator.add",
                               "args": [i, 1]}) for i in range(2000)))
    s.recv()  # serving them now
    started = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    _stops_within_a_second(s, workers, started)
