"""Values on the Port, both ways (docs/protocol.md, "Values and types"): bin vs str, floats with
NaN/±Inf, integers beyond 64 bits, tuples, maps with non-string keys, sets, nil — and what a frame
with bytes after its object gets."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from pb_portclient import REF, Server

INT = "__poolbridge_int__"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server(workers=1)
    try:
        yield s
    finally:
        s.close()


def test_bin_stays_bytes_and_str_stays_str(server: Server) -> None:
    assert server.ok("call", session="ty", fn="pb_portmods.types_of", args=[b"hello", "hello", b"\xff"]) == [
        "bytes", "str", "bytes"]
    assert server.ok("call", session="ty", fn="pb_portmods.echo", args=[b"hello"]) == [[b"hello"], {}]
    server.raw.queue.clear()
    assert server.ok("call", session="ty", fn="builtins.bytes", args=[b"abc"]) == b"abc"
    assert server.raw.get_nowait().endswith(b"\xc4\x03abc")  # msgpack bin 8, not str
    assert server.ok("call", session="ty", fn="builtins.bytearray", args=[b"xy"]) == b"xy"  # bytes-like -> bin
    assert server.ok("call", session="ty", fn="builtins.str", args=["é"]) == "é"


def test_floats_including_nan_and_infinities(server: Server) -> None:
    assert math.isnan(server.ok("call", session="ty", fn="builtins.float", args=["nan"]))
    assert server.ok("call", session="ty", fn="builtins.float", args=["inf"]) == math.inf
    assert server.ok("call", session="ty", fn="builtins.float", args=["-inf"]) == -math.inf
    assert server.ok("call", session="ty", fn="math.isnan", args=[math.nan]) is True
    assert server.ok("call", session="ty", fn="math.isinf", args=[-math.inf]) is True
    assert server.ok("call", session="ty", fn="pb_portmods.types_of", args=[1.0, 1]) == ["float", "int"]
    server.raw.queue.clear()
    assert server.ok("call", session="ty", fn="operator.truediv", args=[1, 4]) == 0.25
    assert server.raw.get_nowait().endswith(b"\xcb" + struct.pack(">d", 0.25))  # always float 64


@pytest.mark.parametrize(("value", "wire"), [
    (2**64 - 1, 2**64 - 1),
    (2**64, {INT: str(2**64)}),
    (-(2**63), -(2**63)),
    (-(2**63) - 1, {INT: str(-(2**63) - 1)}),
    (10**40, {INT: str(10**40)}),
])
def test_integers_beyond_64_bits_are_tagged_both_ways(server: Server, value: int, wire: Any) -> None:
    assert server.ok("call", session="ty", fn="operator.pos", args=[wire]) == wire
    assert server.ok("call", session="ty", fn="builtins.str", args=[wire]) == str(value)  # an int in Python
    assert server.ok("call", session="ty", fn="pb_portmods.echo", args=[[wire]]) == [[[wire]], {}]  # nested


def test_big_integer_results_and_malformed_tags(server: Server) -> None:
    assert server.ok("call", session="ty", fn="builtins.pow", args=[2, 100]) == {INT: str(2**100)}
    assert server.ok("call", session="ty", fn="builtins.int", args=["-" + "9" * 30]) == {INT: "-" + "9" * 30}
    for bad in ("1.5", "", "0x10", " 1", "١٢", 12, None, "9" * 5000):
        err = server.error("call", session="ty", fn="builtins.id", args=[{INT: bad}])
        assert err["code"] == "bad_request" and "__poolbridge_int__" in err["message"], bad
    # a two-key map is an ordinary map, not a tag
    assert server.ok("call", session="ty", fn="builtins.len", args=[{INT: "1", "x": 2}]) == 2


def test_tuples_maps_sets_and_nil(server: Server) -> None:
    assert server.ok("call", session="ty", fn="builtins.divmod", args=[7, 2]) == [3, 1]  # a tuple arrives as a list
    assert server.ok("call", session="ty", fn="builtins.tuple", args=[[1, [2, 3]]]) == [1, [2, 3]]
    keys = {1: "int", "s": "str", b"b": "bin", None: "nil", 1.5: "float", False: "bool"}
    assert server.ok("call", session="ty", fn="pb_portmods.key_types", args=[keys]) == sorted(
        [type(k).__name__, repr(k)] for k in keys)
    assert server.ok("call", session="ty", fn="builtins.dict", args=[[[1, "a"], [b"k", None]]]) == {1: "a", b"k": None}
    as_set = server.ok("call", session="ty", fn="builtins.set", args=[[1, 2]])
    assert set(as_set) == {REF}  # not encodable as a value: a ref
    assert server.ok("method", target=as_set, name="issuperset", args=[[1]]) is True
    assert server.ok("call", session="ty", fn="builtins.frozenset", args=[[1]])[REF][0] == "ty"
    assert server.ok("call", session="ty", fn="pb_portmods.types_of", args=[None]) == ["NoneType"]
    assert server.ok("call", session="ty", fn="builtins.print", args=[]) is None


def test_trailing_bytes_after_the_request_are_a_bad_request(server: Server, tmp_path: Any) -> None:
    log = str(tmp_path / "log")
    body = msgpack.packb({"id": 31, "op": "call", "session": "ty", "fn": "pb_portmods.log_to", "args": [log, "x"]})
    for extra in (b"\x01", b"\x81\xa2id\x05", b"\x00" * 10):
        server.send_raw(struct.pack(">I", len(body + extra)) + body + extra)
        reply = server.recv()
        assert reply["id"] == 31 and reply["error"]["code"] == "bad_request"
        assert f"{len(extra)} trailing bytes" in reply["error"]["message"]
    assert not (tmp_path / "log").exists()  # nothing of such a frame ran
