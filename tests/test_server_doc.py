"""docs/protocol.md checked against the server: the frame dumps byte for byte (the server's own
reply included), every single-line request/reply example that does not depend on pids, refs or
state replayed exactly, and the doc's tables (ops, error codes, hello, ping, stats keys) equal to
what the code has."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from pb_portclient import REPO, Server, frame

from poolbridge._errors import ERRORS_BY_CODE
from poolbridge._portops import WORKER_OPS
from poolbridge._portwire import RequestCancelledError

DOC = (REPO / "docs" / "protocol.md").read_text()
_HEX = re.compile(r"[0-9a-f]{2}")


def _section(title: str) -> str:
    start = DOC.index(title)
    end = DOC.find("\n## ", start + len(title))
    return DOC[start : end if end >= 0 else len(DOC)]


def _dump(after: str) -> bytes:
    """The hex bytes of the first code block after ``after``: each line's leading 2-digit tokens."""
    block = DOC[DOC.index("```", DOC.index(after)) + 3 :]
    block = block[: block.index("```")]
    out = []
    for line in block.strip().splitlines():
        for token in line.split():
            if not _HEX.fullmatch(token):
                break
            out.append(token)
    return bytes.fromhex("".join(out))


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server(workers=2)  # the doc's examples are of a 2-worker server with pb_test_helpers
    try:
        yield s
    finally:
        s.close()


def test_the_frame_dumps_byte_for_byte(server: Server) -> None:
    request = _dump("A complete request frame")
    assert request == frame({"id": 1, "op": "call", "session": "user-42", "fn": "math.sqrt", "args": [2]})
    assert request[:4] == (len(request) - 4).to_bytes(4, "big")
    server.raw.queue.clear()
    server.send_raw(request)
    assert server.recv() == {"id": 1, "status": "ok", "value": 1.4142135623730951}
    assert server.raw.get_nowait() == _dump("and its reply")


def _examples() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request, reply) pairs of the JSON examples in the Operations section (multi-line ones joined)."""
    maps: list[dict[str, Any]] = []
    buf = ""
    for line in _section("## Operations").splitlines():
        if line.startswith('{"id": '):
            buf = line
        elif buf and line.startswith(" "):
            buf += "\n" + line
        else:
            buf = ""
            continue
        try:
            maps.append(json.loads(buf))
        except json.JSONDecodeError:
            continue  # not complete yet, or elided (...)
        buf = ""
    return [(req, reply) for req, reply in itertools.pairwise(maps)
            if "op" in req and "status" in reply and req["id"] == reply["id"]]


#: Examples whose reply depends on what ran before, on pids or on refs (their shape is tested elsewhere).
# (a resize changes the server for the examples after it, and its notice comes before its reply)
_STATEFUL = ("__poolbridge_", '"pid"', "close_session", "os._exit", "time.sleep", "last_reply_ms", '"resize"')


def test_every_self_contained_example_replays_exactly(server: Server) -> None:
    replayed = 0
    for req, reply in _examples():
        if any(marker in json.dumps(req) + json.dumps(reply) for marker in _STATEFUL):
            continue
        server.send_raw(frame(req))
        assert server.recv() == reply, req
        replayed += 1
    assert replayed >= 7


def test_the_error_code_table_is_every_code_the_server_sends() -> None:
    table = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \|", _section("### Error codes"), re.M)}
    codes = set(ERRORS_BY_CODE) | {"remote_error", "worker_crashed", "internal", RequestCancelledError.code}
    assert table == codes


def test_the_op_headings_are_the_server_s_ops() -> None:
    headings = set(re.findall(r"^### `(\w+)`", _section("## Operations"), re.M))
    assert headings == set(WORKER_OPS) | {"ping", "stats", "slot_for", "cancel", "resize"}


def _json_after(marker: str) -> Any:
    text = DOC[DOC.index(marker) :]
    text = text[text.index("```json") + len("```json") : text.index("```", text.index("```json") + 7)]
    return text


def test_hello_ping_and_stats_keys_are_as_documented(server: Server) -> None:
    hello = json.loads(_json_after("## The hello frame"))
    assert set(hello) == set(server.hello)
    assert hello["protocol"] == server.hello["protocol"] == 2
    pong_doc = json.loads(_json_after("### `ping`").strip().splitlines()[-1])["value"]
    assert set(pong_doc) == set(server.ok("ping", session="user-42"))
    stats_doc = json.loads("\n".join(_json_after("### `stats`").strip().splitlines()[1:]))["value"]
    stats = server.ok("stats")
    assert set(stats_doc) == set(stats)
    assert [set(s) for s in stats_doc["slots"]] == [set(s) for s in stats["slots"]]


def test_the_documented_ref_shape(server: Server) -> None:
    ref = server.ok("create", session="user-42", fn="collections.Counter", args=["hello"])
    doc_ref = json.loads(_json_after("### Refs"))
    assert list(ref) == list(doc_ref)
    assert [type(x) for x in ref["__poolbridge_ref__"]] == [type(x) for x in doc_ref["__poolbridge_ref__"]]
    assert re.fullmatch(r"[0-9a-f]{16}", doc_ref["__poolbridge_ref__"][4])
    assert msgpack.packb(ref)  # plain msgpack
