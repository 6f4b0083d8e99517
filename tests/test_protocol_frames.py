"""The frame decoder and the value codec, without any subprocess: partial input, any chunking,
oversized frames, and the types the codec must carry faithfully."""

from __future__ import annotations

import collections
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolbridge._errors import SessionMismatchError
from poolbridge._protocol import (
    FrameReader,
    OversizedFrame,
    WireRef,
    encode_frame,
    make_unpacker,
    pack_value,
)


def frames_of(bodies: list[bytes]) -> bytes:
    return b"".join(encode_frame(b) for b in bodies)


def test_frame_layout_is_packet_4() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


def test_one_byte_at_a_time() -> None:
    bodies = [b"", b"x", msgpack.packb({"id": 1, "op": "ping"}), b"y" * 70_000]
    reader = FrameReader()
    out: list[bytes | OversizedFrame] = []
    for byte in frames_of(bodies):
        out += reader.feed(bytes([byte]))
    assert out == bodies
    assert reader.buffered == 0


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(1, 97), min_size=1))
def test_any_chunking_gives_the_same_frames(bodies: list[bytes], cuts: list[int]) -> None:
    stream = frames_of(bodies)
    reader = FrameReader()
    out: list[bytes | OversizedFrame] = []
    pos = i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += reader.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert out == bodies
    assert reader.buffered == 0


def test_an_oversized_frame_is_skipped_without_buffering_and_keeps_its_head() -> None:
    big = msgpack.packb({"id": 7, "op": "call", "args": ["z" * 5000]})
    stream = frames_of([b"before", big, b"after"])
    reader = FrameReader(max_frame=1000)
    out: list[bytes | OversizedFrame] = []
    for i in range(0, len(stream), 100):  # the big frame spans many chunks
        out += reader.feed(stream[i : i + 100])
        assert reader.buffered <= 1000 + 4
    assert out[0] == b"before" and out[2] == b"after"
    marker = out[1]
    assert isinstance(marker, OversizedFrame)
    assert marker.size == len(big)
    assert big.startswith(marker.head) and 0 < len(marker.head) <= OversizedFrame.HEAD
    assert "exceeds the limit of 1000 bytes" in str(marker.error(1000))


def test_a_header_alone_declaring_4gib_is_not_buffered() -> None:
    reader = FrameReader(max_frame=1 << 20)
    out = reader.feed(struct.pack(">I", 0xFFFFFFFF) + b"abc")
    assert len(out) == 1 and isinstance(out[0], OversizedFrame)
    assert reader.buffered == 0


class Point(collections.namedtuple("Point", "x y")):
    pass


@pytest.mark.parametrize(
    "value",
    [
        None, True, 0, -1, 2**63 - 1, 2**70, -(2**70), 1.5, "ü", b"\x00\xff", [], {}, (), (1, (2, (3,))),
        [(1, 2), {"k": (3,)}], {1: "int key"}, {"a": [1, {"b": (2, 3)}]}, collections.Counter("abca"),
        Point(1, 2), {1, 2}, frozenset({3}), 3 + 4j,
    ],
    ids=repr,
)
def test_values_round_trip_with_their_types(value: object) -> None:
    unpack = make_unpacker(lambda key: pytest.fail("no refs here"))
    back = unpack(pack_value(value))
    assert back == value
    assert type(back) is type(value)


def test_bytearray_and_memoryview_arrive_as_bytes() -> None:
    """msgpack packs them natively as bin (the default hook never sees them): documented."""
    unpack = make_unpacker(lambda key: None)
    assert unpack(pack_value([bytearray(b"ba"), memoryview(b"mv")])) == [b"ba", b"mv"]


def test_a_ref_argument_of_another_session_is_refused_while_encoding() -> None:
    ref = WireRef("session-a", 1, 0, 0)
    assert pack_value([ref], "session-a")  # its own session: fine
    with pytest.raises(SessionMismatchError, match="session-a"):
        pack_value([1, {"nested": [ref]}], "session-b")
    with pytest.raises(SessionMismatchError):
        pack_value((ref,), "session-b")  # inside a tuple (its own nested pack)


def test_refs_decode_through_the_hook() -> None:
    seen = []
    unpack = make_unpacker(lambda key: seen.append(key) or "obj")
    assert unpack(pack_value({"r": WireRef("s", 5, 1, 2)}, "s")) == {"r": "obj"}
    assert seen == [["s", 5, 1, 2]]


def test_the_private_channel_reads_an_extended_header() -> None:
    """Frames of 4 GiB and more (private channel only) give the length 0xFFFFFFFF, then 8 bytes."""
    from poolbridge._frames import frame_header

    assert frame_header(5) == struct.pack(">I", 5)
    assert frame_header(1 << 32) == struct.pack(">IQ", 0xFFFFFFFF, 1 << 32)
    stream = struct.pack(">IQ", 0xFFFFFFFF, 5) + b"hello" + encode_frame(b"next")
    for step in (1, 3, len(stream)):
        reader = FrameReader(extended=True)
        out: list[bytes | OversizedFrame] = []
        for i in range(0, len(stream), step):
            out += reader.feed(stream[i : i + step])
        assert out == [b"hello", b"next"] and reader.buffered == 0


def test_a_large_frame_is_read_from_a_pipe_in_place() -> None:
    """read_from: one read per call; a frame larger than the shared buffer fills its own."""
    import os
    import threading

    bodies = [b"a" * 10, os.urandom(300_000), b"b" * 70_000, b""]
    r, w = os.pipe()

    def write() -> None:
        for body in bodies:
            view = memoryview(encode_frame(body))
            while view:
                view = view[os.write(w, view) :]
        os.close(w)

    writer = threading.Thread(target=write)
    writer.start()
    reader = FrameReader()
    out: list[bytes | OversizedFrame] = []
    while (frames := reader.read_from(r)) is not None:
        out += frames
    writer.join(10)
    os.close(r)
    assert out == bodies
