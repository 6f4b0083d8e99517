"""The Port server with large frames: big binaries both ways (through shared memory between the
server and its workers), and a large request arriving slowly does not hold back other replies."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pb_faultmods import Fifo, wait_until
from pb_portclient import Server

TESTS = str(Path(__file__).resolve().parent)
MB = 1 << 20


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    s = Server("--max-frame", str(128 * MB))
    try:
        yield s
    finally:
        pid = s.proc.pid
        s.close()
        wait_until(lambda: not [e for e in os.listdir("/dev/shm") if e.startswith(f"pb{pid}_")], 30.0,
                   what="the server's segments gone after it exited")


def test_big_binaries_both_ways(server: Server) -> None:
    data = os.urandom(40 * MB)
    assert server.ok("call", session="s", fn="builtins.len", args=[data]) == len(data)
    assert server.ok("call", session="s", fn="pb_testmods.identity", args=[data]) == data
    out = server.ok("call", session="s", fn="builtins.bytes", args=[40 * MB])
    assert isinstance(out, bytes) and len(out) == 40 * MB
    text = "é" * (10 * MB)
    assert server.ok("call", session="s", fn="str.upper", args=[text]) == text.upper()


def test_a_frame_over_max_frame_is_refused_and_the_server_goes_on(server: Server) -> None:
    err = server.error("call", session="s", fn="builtins.len", args=[b"x" * (129 * MB)])
    assert err["code"] == "frame_too_large"
    assert server.ok("call", session="s", fn="operator.add", args=[1, 2]) == 3


def test_a_large_request_arriving_slowly_does_not_hold_back_other_replies(server: Server, tmp_path: Any) -> None:
    fifo = Fifo(str(tmp_path / "gate"))
    try:
        blocked = server.send("call", session="a", fn="pb_faultmods.wait_fifo", args=[fifo.path])
        body = msgpack.packb({"id": 999, "op": "call", "session": "b", "fn": "builtins.len",
                              "args": [b"y" * (64 * MB)]}, use_bin_type=True)
        data = struct.pack(">I", len(body)) + body
        half = len(data) // 2
        server.send_raw(data[:half])  # the server is now reading a large frame
        fifo.release()
        reply = server.recv()
        assert reply["id"] == blocked and reply["value"] == "released"
        server.send_raw(data[half:])
        reply = server.recv()
        assert reply == {"id": 999, "status": "ok", "value": 64 * MB}
    finally:
        fifo.release(8)
        fifo.close()


def test_big_requests_a_dead_worker_never_started_are_sent_again_whole(server: Server) -> None:
    """Requests queued behind one that kills its worker are re-sent to the next worker: their
    big arguments (in shared memory) go with them, intact — not freed or reused meanwhile."""
    import hashlib

    values = [os.urandom(2 * MB) for _ in range(3)]
    victim_slot = server.ok("slot_for", session="victim")
    # A session on the other slot, whose big requests of the same size go on meanwhile (they would
    # take the victim's segments if those were handed back while its requests wait to be re-sent).
    other = next(f"b{i}" for i in range(64) if server.ok("slot_for", session=f"b{i}") != victim_slot)
    crash = server.send("call", session="victim", fn="os._exit", args=[3])
    after = [server.send("call", session="victim", fn="pb_largemods.digest", args=[v]) for v in values]
    meanwhile = [server.send("call", session=other, fn="builtins.len", args=[b"o" * (2 * MB)]) for _ in range(20)]
    replies = {r["id"]: r for r in (server.recv() for _ in range(4 + len(meanwhile)))}
    assert replies[crash]["error"]["code"] == "worker_crashed"
    for req_id, value in zip(after, values, strict=True):
        assert replies[req_id]["value"] == ["bytes", len(value), hashlib.sha256(value).hexdigest()]
