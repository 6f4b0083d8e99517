"""Large values: sizes across the shared-memory threshold and past the old 256 MiB frame limit,
every kind of buffer both ways, and no segment left in /dev/shm after a crash, a timeout, a cancel
or a router killed with SIGKILL (see poolbridge/_shm.py for who unlinks what)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from pb_faultmods import Fifo, wait_until
from pb_largemods import digest

import poolbridge
from poolbridge import _shm
from poolbridge import _testing as testing

T = 1 << 16  # the threshold of the small-threshold pools below: large values stay cheap
SHM = "/dev/shm"
LIMIT = 30.0  # bound of every wait for segments to go away


def segments(prefix: str) -> list[str]:
    base = prefix.lstrip("/")
    return [e for e in os.listdir(SHM) if e.startswith(base)]


def leaked(pool: poolbridge.Pool) -> list[str]:
    """Segments of ``pool`` that nobody will reuse or unlink: not idle in the router's warm cache,
    not of a live worker (a worker's own cache, or results the router still reads)."""
    base = testing.shm_prefix(pool)
    assert base is not None
    prefix = base.lstrip("/")
    idle = {name.lstrip("/") for name in testing.shm_idle(pool)}
    live = tuple(
        _shm.worker_prefix(base, slot, testing.generation(pool, slot)).lstrip("/") for slot in range(pool.workers)
    )
    return [e for e in segments(prefix) if e not in idle and not e.startswith(live)]


def no_segments_left(pool: poolbridge.Pool) -> None:
    """Nothing leaked now (bounded wait: a restart or a reply may be on its way) and nothing at
    all once the pool is closed (checked by the fixtures)."""
    wait_until(lambda: not leaked(pool), LIMIT, what=f"no leaked segment of {testing.shm_prefix(pool)}")


@pytest.fixture(scope="module")
def small() -> Iterator[poolbridge.Pool]:
    """Two workers, segments from 64 KiB."""
    p = poolbridge.Pool(workers=2, shm_threshold=T)
    try:
        yield p
    finally:
        p.close()
    assert not segments(testing.shm_prefix(p))  # type: ignore[arg-type]


def sha(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


# -- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [T - 1, T, T + 1, 3 * T])
def test_sizes_across_the_threshold_round_trip(small: poolbridge.Pool, size: int) -> None:
    data = os.urandom(size)
    assert small.call("pb_largemods.digest", data) == ["bytes", size, sha(data)]
    back = small.call("pb_testmods.identity", data)
    assert type(back) is bytes and back == data
    # A value's type never depends on its size: a memoryview arrives as bytes, as msgpack carries it.
    assert small.call("pb_largemods.describe", memoryview(data))["type"] == "bytes"
    # zero_copy: from the threshold on, a read-only view of the segment (below it, the frame's bytes).
    seen = small.options(zero_copy=True).call("pb_largemods.describe", data)
    assert seen["type"] == ("bytes" if size < T else "memoryview") and seen["readonly"] is True
    no_segments_left(small)


@pytest.mark.parametrize("shm_threshold", [None, _shm.DEFAULT_THRESHOLD])
def test_past_the_old_256_mib_frame_limit(pool_maker: Callable[..., poolbridge.Pool], shm_threshold: Any) -> None:
    """256 MiB was the frame limit: one byte past it, either way, through the pipe or a segment."""
    p = pool_maker(shm_threshold=shm_threshold)
    n = (256 << 20) + 1
    assert p.call("builtins.len", bytes(n)) == n
    out = p.call("builtins.bytes", n)
    assert len(out) == n and out[-1] == 0
    assert p.call("operator.add", 1, 2) == 3


@pytest.mark.slow
def test_a_1_gib_argument_and_result(pool_maker: Callable[..., poolbridge.Pool]) -> None:
    p = pool_maker()
    n = 1 << 30
    assert p.call("builtins.len", bytes(n)) == n
    out = p.call("builtins.bytes", n)
    assert len(out) == n
    del out
    no_segments_left(p)


# -- kinds ----------------------------------------------------------------------------------------


def test_every_kind_of_buffer_as_argument(small: poolbridge.Pool) -> None:
    raw = os.urandom(3 * T)
    for value in (raw, bytearray(raw), memoryview(raw), memoryview(bytearray(raw))):
        assert small.call("pb_largemods.digest", value) == ["bytes", len(raw), sha(raw)]
    zero_copy = small.options(zero_copy=True)
    assert zero_copy.call("pb_largemods.digest", bytearray(raw)) == ["memoryview", len(raw), sha(raw)]
    assert zero_copy.call("pb_largemods.describe", raw)["readonly"] is True
    strided = memoryview(raw)[::2]  # not contiguous: copied once to be sent
    assert small.call("pb_largemods.digest", strided)[2] == sha(strided.tobytes())
    text = "é" * (2 * T)
    assert small.call("builtins.len", text) == len(text)
    arr = np.arange(T, dtype="f8")
    assert small.call("pb_largemods.sha256_of", arr) == sha(arr)
    assert small.call("pb_largemods.describe", arr)["writeable"] is True  # a private copy-on-write view
    # Nested, in a tuple, as a keyword argument.
    assert small.call("pb_testmods.identity", {"a": [1, (raw, 2)], "b": raw}) == {"a": [1, (raw, 2)], "b": raw}
    assert small.call("pb_largemods.digest", value=raw)[2] == sha(raw)
    deep = {"a": {"b": [{"c": raw}]}}  # below the quick look at the top: found after packing
    assert small.call("pb_testmods.identity", deep) == deep
    numbers = list(range(T))  # big, but no buffer in it: travels in the frame
    assert small.call("builtins.sum", numbers) == sum(numbers)
    no_segments_left(small)


def test_every_kind_of_buffer_as_result(small: poolbridge.Pool) -> None:
    raw = os.urandom(3 * T)
    assert small.call("pb_testmods.identity", bytearray(raw)) == raw
    back = small.call("builtins.bytearray", raw)
    assert type(back) is bytes and back == raw  # as below the threshold
    view = small.options(zero_copy=True).call("builtins.bytearray", raw)
    assert type(view) is memoryview and view.readonly and view == raw
    del view
    assert small.call("str.upper", "a" * (2 * T)) == "A" * (2 * T)
    arr = small.call("pb_largemods.make_array", T, 2.0)
    assert arr.shape == (T,) and float(arr.sum()) == 2.0 * T
    arr += 1  # writable: a private copy-on-write mapping
    again = small.call("pb_largemods.bump", arr)
    assert float(again[0]) == 4.0 and float(arr[0]) == 3.0
    no_segments_left(small)


def test_ref_methods_and_stream_items(small: poolbridge.Pool) -> None:
    raw = os.urandom(2 * T)
    with small.session("large-refs"):
        store = small.create("pb_largemods.Store")
        assert small.method(store, "put", raw) == 1
        assert small.method(store, "put", np.ones(T)) == 2
        assert small.method(store, "get", 0) == raw
        assert float(small.method(store, "get", 1).sum()) == T
        items = list(small.options(batch=2).stream("pb_largemods.gen_blobs", 5, 2 * T))
        assert [len(i) for i in items] == [2 * T] * 5 and items[3][0] == 3
        small.release(store)
    no_segments_left(small)


def test_segments_are_reused_not_accumulated(pool_maker: Callable[..., poolbridge.Pool]) -> None:
    p = pool_maker(shm_threshold=T)
    data = os.urandom(2 * T)
    for _ in range(40):
        assert p.call("pb_testmods.identity", data) == data
    # One argument segment and one result segment, written again and again (a second of each
    # may be in flight back to its owner).
    assert len(segments(testing.shm_prefix(p))) <= 4  # type: ignore[arg-type]
    no_segments_left(p)


def test_a_segment_still_viewed_is_never_written_again(small: poolbridge.Pool) -> None:
    """Warm reuse must skip segments someone still maps: the worker (a view kept in a ref) and
    the caller (a zero-copy result it holds)."""
    first, second = b"a" * (2 * T), b"b" * (2 * T)
    zero_copy = small.options(zero_copy=True, session="viewed")
    store = zero_copy.create("pb_largemods.Store")
    zero_copy.method(store, "put", first)  # the worker keeps a read-only view of the segment
    zero_copy.method(store, "put", np.full(T // 8, 1.0))  # and an array over another one
    for _ in range(3):
        zero_copy.call("builtins.len", second)
        zero_copy.call("pb_largemods.digest", np.full(T // 8, 2.0))
    assert zero_copy.method(store, "get", 0) == first
    assert float(zero_copy.method(store, "get", 1).sum()) == T // 8
    held = zero_copy.call("pb_testmods.identity", first)
    for _ in range(3):
        assert zero_copy.call("pb_testmods.identity", second) == second
    assert held == first
    del held
    store.release()
    no_segments_left(small)


def test_mutation_after_send_is_not_seen(small: poolbridge.Pool, fifo: Fifo, tmp_path: Any) -> None:
    """The argument is copied into its segment when the call is sent: later writes stay ours."""
    marker = str(tmp_path / "running")
    data = bytearray(b"a" * (4 * T))
    arr = np.zeros(T)
    f1 = small.submit("pb_largemods.mark_wait_digest", marker, fifo.path, data)
    wait_until(lambda: os.path.exists(marker), LIMIT, what="the call started")
    data[:] = b"b" * len(data)
    f2 = small.submit("pb_largemods.digest", arr)
    arr[:] = 7
    fifo.release()
    assert f1.result(LIMIT) == ["bytes", 4 * T, sha(b"a" * (4 * T))]
    assert f2.result(LIMIT)[2] == sha(np.zeros(T))


def test_a_buffer_nested_deep_keeps_its_segment_until_read(pool_maker: Callable[..., poolbridge.Pool], fifo: Fifo,
                                                           tmp_path: Any) -> None:
    """A big buffer three levels down (found after packing, not by the quick look) travels in a
    segment its request names: a value sent meanwhile never gets that segment and overwrites it."""
    p = pool_maker(shm_threshold=T)
    marker = str(tmp_path / "running")
    blocker = p.submit("pb_largemods.mark_wait_digest", marker, fifo.path, b"b")
    wait_until(lambda: os.path.exists(marker), LIMIT, what="the blocking call started")
    first, second = [[b"1" * (3 * T)]], [[b"2" * (3 * T)]]
    queued = p.submit("pb_testmods.identity", first)  # waits in the pipe, not yet read by the worker
    later = p.submit("pb_testmods.identity", second)  # the same size: a warm segment would fit it
    fifo.release()
    blocker.result(LIMIT)
    assert queued.result(LIMIT) == first
    assert later.result(LIMIT) == second
    no_segments_left(p)


# -- the bound ------------------------------------------------------------------------------------


def test_max_value_bytes_refuses_before_sending(pool_maker: Callable[..., poolbridge.Pool]) -> None:
    p = pool_maker(max_value_bytes=4 * T, shm_threshold=T)
    assert p.call("builtins.len", b"x" * (2 * T)) == 2 * T
    calls = p.stats().slots[0].calls
    with pytest.raises(poolbridge.ValueTooLargeError, match="max_value_bytes"):
        p.call("builtins.len", b"x" * (5 * T))
    with pytest.raises(poolbridge.ValueTooLargeError):
        p.call("builtins.len", [b"x" * (3 * T), b"y" * (3 * T)])  # two segments together
    with pytest.raises(poolbridge.ValueTooLargeError):
        p.call("builtins.len", list(range(4 * T)))  # in the frame, no segment
    assert p.stats().slots[0].calls == calls  # nothing reached the worker
    with pytest.raises(poolbridge.ValueTooLargeError, match="max_value_bytes"):
        p.options(ret="value").call("builtins.bytes", 5 * T)
    assert isinstance(p.call("builtins.bytes", 5 * T), poolbridge.Ref)  # ret="auto": kept as a ref
    assert p.call("operator.add", 1, 2) == 3
    no_segments_left(p)


def test_no_shared_memory_when_disabled(pool_maker: Callable[..., poolbridge.Pool]) -> None:
    p = pool_maker(shm_threshold=None)
    assert testing.shm(p) is None
    raw = os.urandom(1 << 20)
    assert p.call("pb_testmods.identity", raw) == raw
    assert type(p.options(zero_copy=True).call("builtins.memoryview", raw)) is bytes


# -- faults: no segment left, no stuck slot --------------------------------------------------------


def test_worker_dies_holding_an_argument(pool_maker: Callable[..., poolbridge.Pool], tmp_path: Any) -> None:
    p = pool_maker(shm_threshold=T)
    marker = str(tmp_path / "held")
    with pytest.raises(poolbridge.WorkerCrashedError):
        p.call("pb_largemods.mark_then_exit", marker, b"z" * (4 * T))
    no_segments_left(p)
    assert p.call("builtins.len", b"z" * (4 * T)) == 4 * T


def test_worker_dies_while_encoding_a_big_result(pool_maker: Callable[..., poolbridge.Pool]) -> None:
    p = pool_maker(shm_threshold=T)
    with pytest.raises(poolbridge.WorkerCrashedError):
        p.call("pb_largemods.big_then_die", 4 * T)
    no_segments_left(p)
    assert len(p.call("builtins.bytes", 4 * T)) == 4 * T


def test_a_result_that_fails_to_encode_after_a_segment(pool_maker: Callable[..., poolbridge.Pool]) -> None:
    p = pool_maker(shm_threshold=T)
    ref = p.call("pb_largemods.big_then_unencodable", 4 * T)  # ret="auto": the list stays as a ref
    assert isinstance(ref, poolbridge.Ref)
    with pytest.raises(TypeError):
        p.options(ret="value").call("pb_largemods.big_then_unencodable", 4 * T)
    no_segments_left(p)


@pytest.mark.parametrize("on_timeout", ["keep", "restart"])
def test_timeout_during_a_large_call(
    pool_maker: Callable[..., poolbridge.Pool], fifo: Fifo, tmp_path: Any, on_timeout: str
) -> None:
    """A big argument queued behind a blocked call times out: its segment goes, now or when the
    worker gets to it, and the slot serves again."""
    p = pool_maker(shm_threshold=T)
    marker = str(tmp_path / "running")
    blocker = p.submit("pb_largemods.mark_wait_digest", marker, fifo.path, b"b" * (2 * T))
    wait_until(lambda: os.path.exists(marker), LIMIT, what="the blocking call started")
    with pytest.raises(poolbridge.CallTimeoutError):
        p.options(timeout=0.2, on_timeout=on_timeout).call("builtins.len", b"q" * (8 * T))
    fifo.release()
    if on_timeout == "keep":
        assert blocker.result(LIMIT)[1] == 2 * T
    else:
        with pytest.raises(poolbridge.WorkerCrashedError):
            blocker.result(LIMIT)
    no_segments_left(p)
    assert p.call("builtins.len", b"q" * (8 * T)) == 8 * T
    no_segments_left(p)


def test_a_cancelled_call_leaves_no_segment(pool_maker: Callable[..., poolbridge.Pool], fifo: Fifo,
                                            tmp_path: Any) -> None:
    p = pool_maker(shm_threshold=T)
    marker = str(tmp_path / "running")
    blocker = p.submit("pb_largemods.mark_wait_digest", marker, fifo.path, b"b")
    wait_until(lambda: os.path.exists(marker), LIMIT, what="the blocking call started")
    queued = p.submit("builtins.len", b"c" * (4 * T))
    assert queued.cancel()
    assert not leaked(p)  # its segment is idle again, warm for the next value
    fifo.release()
    blocker.result(LIMIT)
    no_segments_left(p)


_ROUTER = textwrap.dedent(
    """
    import os, sys
    import poolbridge
    from poolbridge import _testing as testing
    pool = poolbridge.Pool(workers=1, shm_threshold=1 << 16)
    print(testing.shm_prefix(pool), flush=True)
    fut = pool.submit("pb_largemods.mark_wait_digest", sys.argv[1], sys.argv[2], b"r" * (1 << 20))
    fut.result()
    """
)


def test_router_sigkill_leaves_no_segment(tmp_path: Any, fifo: Fifo) -> None:
    """The router dies with SIGKILL while its worker holds a big argument: its workers die with it
    and the resource tracker unlinks what is left."""
    marker = str(tmp_path / "running")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    router = subprocess.Popen(
        [sys.executable, "-c", _ROUTER, marker, fifo.path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert router.stdout is not None
        prefix = router.stdout.readline().decode().strip()
        assert prefix.startswith("/pb")
        wait_until(lambda: os.path.exists(marker), LIMIT, what="the call started")
        assert segments(prefix), "the argument's segment exists while the call runs"
        router.send_signal(signal.SIGKILL)
        router.wait(LIMIT)
        wait_until(lambda: not segments(prefix), LIMIT, what="the tracker's cleanup")
    finally:
        if router.poll() is None:
            router.kill()
            router.wait(LIMIT)
        for stream in (router.stdout, router.stderr):
            if stream is not None:
                stream.close()


def test_digest_helper_matches_hashlib() -> None:
    raw = b"abc"
    assert digest(raw) == ["bytes", 3, hashlib.sha256(raw).hexdigest()]
