"""The Port server batches per turn of its loop (_server.py's diagram): the replies of one turn go out
in one write, an ok value without extension types is spliced in as the worker encoded it, and the
plain requests of one read go to each slot together (_portsend.py) — same bytes, same order."""

from __future__ import annotations

import os
import threading
from typing import Any

import msgpack
import pytest
from pb_portclient import frame, running, two_slot_sessions

from poolbridge._portsinks import _EXT_BYTE, Output
from poolbridge._portwire import ok_reply
from poolbridge._protocol import pack_plain


def _frames(data: bytes) -> list[Any]:
    out = []
    while data:
        n = int.from_bytes(data[:4], "big")
        out.append(msgpack.unpackb(data[4 : 4 + n], raw=False, strict_map_key=False))
        data = data[4 + n :]
    return out


@pytest.fixture()
def pipe() -> Any:
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)
    os.close(w)


def _drain(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


@pytest.mark.parametrize("value", [3, -1, "x" * 40, [1, 2, {"a": None}], 1.5, b"zz", {"k": [True, False]}, None, 2**63])
@pytest.mark.parametrize("req_id", [1, 300, 2**40, "abc"])
def test_a_spliced_ok_reply_is_the_packed_reply_byte_for_byte(pipe: Any, value: Any, req_id: Any) -> None:
    r, w = pipe
    out = Output(w)
    out.write_ok(req_id, pack_plain(value))  # the value as the worker encoded it, not decoded
    out.write(ok_reply(req_id, value))
    raw = _drain(r)
    n = int.from_bytes(raw[:4], "big")
    assert raw[: 4 + n] == raw[4 + n :]


def test_ext_bytes_are_found_wherever_an_extension_may_start() -> None:
    assert _EXT_BYTE.search(msgpack.packb(msgpack.ExtType(5, b"x")))
    assert _EXT_BYTE.search(msgpack.packb([1, msgpack.ExtType(5, b"x" * 300)]))
    assert not _EXT_BYTE.search(msgpack.packb([1, "abc", {"k": 2.5}]))


def test_the_loop_thread_batches_and_other_threads_write_at_once(pipe: Any) -> None:
    r, w = pipe
    out = Output(w)
    out.batch_on()
    out.write(ok_reply(1, "a"))
    out.write_ok(2, pack_plain("b"))
    assert _drain(r) == b""  # held for the end of the turn
    other = threading.Thread(target=out.write, args=(ok_reply(3, "c"),))
    other.start()
    other.join()
    assert [f["id"] for f in _frames(_drain(r))] == [3]  # another thread's reply is not held
    out.write(ok_reply(4, "d" * 20000))  # too big to copy into the batch: the batch goes first
    assert [f["id"] for f in _frames(_drain(r))] == [1, 2, 4]
    out.write(ok_reply(5, "e"))
    out.batch_off()  # flushes
    assert [f["id"] for f in _frames(_drain(r))] == [5]
    out.write(ok_reply(6, "f"))
    assert [f["id"] for f in _frames(_drain(r))] == [6]


def test_requests_read_together_keep_their_order_per_slot(tmp_path: Any) -> None:
    """Many requests in one write, for two slots: plain calls (batched) and, between them, calls on
    a ref (sent one by one, after the batch before them). Each session logs what ran, in order."""
    with running() as server:
        sessions = two_slot_sessions(server)
        paths = [str(tmp_path / f"log{k}") for k in range(2)]
        files = [server.ok("create", session=s, fn="builtins.open", args=[p, "a", 1])
                 for s, p in zip(sessions, paths, strict=True)]
        frames, ids, req_id = [], [], 10_000
        for i in range(200):
            for session, path, file in zip(sessions, paths, files, strict=True):
                req_id += 1
                if i % 7 == 3:
                    fields = {"op": "method", "target": file, "name": "write", "args": [f"{i}\n"]}
                else:
                    fields = {"op": "call", "session": session, "fn": "pb_portmods.log_to", "args": [path, str(i)]}
                frames.append(frame({"id": req_id, **fields}))
                ids.append(req_id)
        server.send_raw(b"".join(frames))
        replies = {rep["id"]: rep for rep in (server.recv() for _ in ids)}
        assert all(replies[i]["status"] == "ok" for i in ids), [r for r in replies.values() if r["status"] != "ok"][:1]
        for path in paths:
            with open(path) as f:
                assert f.read().split() == [str(i) for i in range(200)]
