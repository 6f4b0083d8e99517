"""Session-aware ``map`` / ``imap`` / ``starmap`` (sync and ``async for``) and ``broadcast``.

Per-key order: items of one session run in order in that session's worker, sessions in
parallel. Bounded: the input is pulled lazily (counted on an infinite iterator). Errors are raised
at their item. No sleeps: ordering is checked from the workers' own records.
"""

from __future__ import annotations

import collections
import fractions
import itertools
import sys
import types
from collections.abc import Callable, Iterator

import pytest

import poolbridge
from poolbridge import AsyncPool, Pool, WorkerCrashedError
from poolbridge import _testing as testing

pytestmark = pytest.mark.backends  # every test with the module's ``pool``, on each backend

WAIT = 30.0
M = "pb_mapmods"



def _counting(n: int | None = None) -> tuple[Iterator[int], list[int]]:
    """An iterator of 0, 1, 2, ... (endless if ``n`` is None) that counts what was taken from it."""
    taken = [0]

    def gen() -> Iterator[int]:
        for i in itertools.count() if n is None else range(n):
            taken[0] = i + 1
            yield i

    return gen(), taken


# -- per-key order ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ordered", [True, False])
def test_per_session_order_over_10k_items_and_100_sessions(pool: Pool, ordered: bool) -> None:
    n_keys, n = 100, 10_000
    tag = f"ord{int(ordered)}"
    items = [(f"{tag}-{i % n_keys}", i // n_keys) for i in range(n)]  # seq counts up within a key
    results = list(pool.imap(f"{M}.record_order", items, ordered, session=lambda item: item[0], timeout=WAIT))
    assert len(results) == n
    if ordered:
        assert [(k, s) for k, s, _ in results] == items
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    pids: dict[str, set[int]] = collections.defaultdict(set)
    for key, seq, pid in results:
        by_key[key].append(seq)
        pids[key].add(pid)
    for key, seqs in by_key.items():
        assert seqs == list(range(n // n_keys)), key  # results of a key come back in its order
        assert len(pids[key]) == 1  # one worker per session
        assert pids[key] == {pool.pids()[pool.slot_for(key)]}
        # ...and the worker ran them in that order
        assert pool.options(session=key).call(f"{M}.pop_order", key) == list(range(n // n_keys))
    assert len(set().union(*pids.values())) == 2  # the sessions ran on both workers


def test_session_function_small_chunks_keep_order(pool: Pool) -> None:
    items = [(f"small-{i % 7}", i // 7) for i in range(700)]
    results = list(pool.map(f"{M}.record_order", items, session=lambda it: it[0], chunksize=3, buffersize=2))
    assert [(k, s) for k, s, _ in results] == items
    for key in {k for k, _ in items}:
        assert pool.options(session=key).call(f"{M}.pop_order", key) == list(range(100))


def test_int_session_keys_name_sessions_by_their_decimal_form(pool: Pool) -> None:
    rows = [{"user_id": i % 3, "n": i} for i in range(30)]
    results = list(pool.map(f"{M}.session_and_pid", rows, session=lambda row: row["user_id"], chunksize=4))
    assert [s for s, _ in results] == [str(i % 3) for i in range(30)]
    with pytest.raises(TypeError):
        list(pool.map(abs, [1, 2], session=lambda x: 1.5))


def test_fixed_session_runs_everything_in_that_session(pool: Pool) -> None:
    results = list(pool.map(f"{M}.session_and_pid", range(50), session="only-me", chunksize=4))
    assert set(results) == {("only-me", pool.pids()[pool.slot_for("only-me")])}


def test_context_and_view_sessions_are_used(pool: Pool) -> None:
    with pool.session("ctx-sess"):
        assert {s for s, _ in pool.map(f"{M}.session_and_pid", range(10))} == {"ctx-sess"}
    view = pool.options(session="view-sess")
    assert {s for s, _ in view.map(f"{M}.session_and_pid", range(10))} == {"view-sess"}


def test_without_a_session_items_spread_over_every_worker(pool: Pool) -> None:
    results = list(pool.map(f"{M}.session_and_pid", range(2000), chunksize=10))
    assert {pid for _, pid in results} == set(pool.pids())


def test_starmap_and_a_session_function_of_the_args(pool: Pool) -> None:
    args = [(f"k{i % 3}", i, 1) for i in range(30)]
    results = list(pool.starmap(f"{M}.keyed_add", args, session=lambda key, a, b: key))
    assert [(k, s) for k, s, _ in results] == [(k, a + b) for k, a, b in args]
    assert all(sess == k for k, _, sess in results)


# -- laziness and bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize("keyed", [False, True])
def test_infinite_iterator_is_consumed_lazily(pool: Pool, keyed: bool) -> None:
    source, taken = _counting()
    chunksize, buffersize = 10, 4
    session = (lambda i: f"lazy-{i % 5}") if keyed else None
    it = pool.imap(abs, source, chunksize=chunksize, buffersize=buffersize, session=session, timeout=WAIT)
    bound = chunksize * buffersize  # items held: pulled and not yet yielded
    seen = 0
    for value in it:
        assert value == seen
        seen += 1
        assert taken[0] - seen <= bound, (taken[0], seen)
        if seen == 3000:
            break
    it.close()
    after = taken[0]
    assert after - seen <= bound
    assert taken[0] == after  # closed: nothing more is pulled


def test_input_is_not_pulled_before_it_is_needed(pool: Pool) -> None:
    source, taken = _counting(10_000)
    it = pool.imap(abs, source, chunksize=5, buffersize=2)
    assert taken[0] <= 10  # the first window only, at the call
    assert next(it) == 0
    it.close()


def test_map_of_a_sized_input_uses_len_for_its_chunks(pool: Pool) -> None:
    assert list(pool.map(abs, range(-500, 500))) == [abs(i) for i in range(-500, 500)]
    assert list(pool.map(abs, list(range(-500, 500)), chunksize=1)) == [abs(i) for i in range(-500, 500)]


def test_lists_and_tuples_are_taken_by_slices_whole_and_in_order(pool: Pool) -> None:
    data = list(range(1000))
    assert list(pool.map(abs, data, chunksize=7)) == data
    assert list(pool.map(abs, tuple(data), chunksize=64)) == data
    assert list(pool.starmap(max, [(i, -i) for i in range(100)], chunksize=9)) == list(range(100))
    assert list(pool.map(abs, data, session=lambda x: f"s{x % 5}", chunksize=3)) == data
    assert list(pool.map(abs, [])) == []


def test_keyed_results_come_back_in_input_order_across_many_keys_and_chunk_sizes(pool: Pool) -> None:
    data = list(range(3000))
    for n_keys, chunksize in ((1000, None), (7, 5), (3000, 1)):
        it = pool.map(abs, data, session=lambda x, n=n_keys: f"mk{x * 7919 % n}", chunksize=chunksize)
        assert list(it) == data
        assert not it._run._results  # each key's queue of results goes once it is empty


def test_length_hint_is_the_inputs_length_less_what_was_yielded(pool: Pool) -> None:
    import operator

    it = pool.map(abs, list(range(100)), chunksize=10)
    assert operator.length_hint(it) == 100  # list() allocates the result once
    assert next(it) == 0
    assert 90 <= operator.length_hint(it) <= 100  # the current chunk counts whole
    assert list(it) == list(range(1, 100))
    assert operator.length_hint(pool.imap(abs, iter(range(5)))) == 0  # unknown: list() grows as usual
    closed = pool.map(abs, range(5))
    closed.close()
    assert operator.length_hint(closed) == 0


def test_the_function_is_pickled_once_per_map(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    from poolbridge import _mapengine, _protocol

    pickled: list[object] = []
    real = _protocol.dumps_any
    monkeypatch.setattr(_mapengine, "dumps_any", lambda obj: pickled.append(obj) or real(obj))
    offset = 3
    assert list(pool.map(lambda x: x + offset, range(100), chunksize=5)) == [x + 3 for x in range(100)]
    assert len(pickled) == 1  # not once per chunk (20 chunks)
    big = b"x" * (1 << 20)  # past the shared-memory threshold: sent per chunk, its buffer apart
    assert list(pool.map(lambda x: len(big) + x, range(4), chunksize=2)) == [(1 << 20) + x for x in range(4)]
    assert list(pool.map("builtins.abs", [-1, -2])) == [1, 2]  # a dotted path is sent as it is


def test_a_finished_map_is_freed_without_a_garbage_collection(pool: Pool) -> None:
    # Each chunk's future holds a done callback that holds the chunk: unless that cycle is cut, a
    # map leaves garbage for the collector, which then walks every young list of results.
    import gc

    from poolbridge._mapengine import Chunk

    list(pool.map(abs, range(100)))  # warm
    gc.collect()
    gc.disable()
    try:
        assert list(pool.map(abs, range(1000), chunksize=50)) == list(range(1000))
        assert not [o for o in gc.get_objects() if type(o) is Chunk]
    finally:
        gc.enable()


# -- errors and closing ----------------------------------------------------------------------------


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("chunksize", [1, 7, 100])
def test_error_is_raised_at_its_item(pool: Pool, chunksize: int, keyed: bool) -> None:
    session = (lambda x: f"err-{x % 3}") if keyed else None
    it = pool.map(f"{M}.fail_on", range(40), chunksize=chunksize, session=session)
    got = []
    with pytest.raises(KeyError, match="thirteen") as info:
        for value in it:
            got.append(value)
    assert got == [i * 10 for i in range(13)]
    assert "fail_on" in str(info.value.__cause__)  # the remote traceback
    assert list(it) == []


@pytest.mark.backends("process")  # a crash costs a new actor on Ray: covered there by test_faults_crash
def test_worker_crash_during_a_map(pool_maker: Callable[..., Pool]) -> None:
    p = pool_maker(workers=2)
    got = []
    with pytest.raises(WorkerCrashedError):
        for value in p.starmap(f"{M}.die_at", ((x, 500) for x in range(1000)), chunksize=10, timeout=WAIT):
            got.append(value)
    assert got == list(range(len(got))) and len(got) <= 500  # in order up to the lost chunk
    assert list(p.options(timeout=WAIT).map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]


def test_a_callable_ref_maps_in_its_own_session(pool: Pool) -> None:
    import functools

    ref = pool.options(session="ref-home").create(functools.partial, pow, 2)
    assert list(pool.map(ref, range(5))) == [1, 2, 4, 8, 16]
    with pytest.raises(poolbridge.SessionMismatchError):
        list(pool.map(ref, range(5), session="elsewhere"))


def test_view_options_do_not_change_what_a_chunk_returns(pool: Pool) -> None:
    assert list(pool.options(ret="ref").map(abs, range(-3, 3))) == [3, 2, 1, 0, 1, 2]


def test_unordered_error_ends_the_iteration(pool: Pool) -> None:
    with pytest.raises(KeyError):
        list(pool.imap(f"{M}.fail_on", range(40), ordered=False, chunksize=5))


def test_error_of_the_session_function_or_input(pool: Pool) -> None:
    def bad_items() -> Iterator[int]:
        yield 1
        raise OSError("input broke")

    with pytest.raises(OSError, match="input broke"):
        list(pool.imap(abs, bad_items(), chunksize=1))
    with pytest.raises(ZeroDivisionError):
        list(pool.imap(abs, range(5), session=lambda i: str(1 // (i - 3))))


def test_chunks_keep_the_value_codecs_types(pool: Pool) -> None:
    # A chunk of builtin values travels as one pickle, anything else through the value codec:
    # what the function and the caller see is the same either way, as for a call.
    plain = [1, 2.5, "s", b"b", None, True, (1, (2,)), {"k": [1], 2: "two"}, {1, 2}, frozenset({3}), 1 << 80, [()]]
    back = list(pool.map(f"{M}.echo", plain))
    assert back == plain and [type(v) for v in back] == [type(v) for v in plain]
    assert list(pool.map(f"{M}.type_name", plain)) == [type(v).__name__ for v in plain]
    assert [r[:2] for r in pool.starmap(f"{M}.keyed_add", [("k", 1, 2)] * 3)] == [("k", 3)] * 3
    # bytearray and memoryview arrive as bytes, both ways; other types by the codec's pickle
    others = [bytearray(b"ab"), memoryview(b"cd"), fractions.Fraction(1, 3)]
    assert list(pool.map(f"{M}.type_name", others)) == ["bytes", "bytes", "Fraction"]
    assert [type(v) for v in pool.map(f"{M}.echo", others)] == [bytes, bytes, fractions.Fraction]
    assert [type(v) for v in pool.map("builtins.bytearray", [b"ab", b""])] == [bytes, bytes]


def test_big_chunks_and_zero_copy(pool_maker: Callable[..., Pool]) -> None:
    small = pool_maker(shm_threshold=1024)
    items = [b"x" * 300] * 8 + [b"y" * 2000]  # a chunk over the threshold; one item over it too
    assert list(small.map(f"{M}.echo", items, chunksize=9)) == items
    assert list(small.map(f"{M}.type_name", items, chunksize=9)) == ["bytes"] * 9
    if small._shm is None:
        return  # (Ray: no segments, hence no views)
    # zero_copy: an item from the threshold on arrives as a view of its segment, as in a call
    seen = list(small.options(zero_copy=True).map(f"{M}.type_name", items, chunksize=9))
    assert seen == ["bytes"] * 8 + ["memoryview"]
    assert [type(v) for v in small.options(zero_copy=True).map(f"{M}.echo", [b"z" * 3000])] == [memoryview]


def test_imap_unordered_returns_everything(pool: Pool) -> None:
    got = pool.imap(abs, range(-100, 100), ordered=False, chunksize=7)
    assert sorted(got) == sorted(abs(i) for i in range(-100, 100))


def test_map_accepts_closures(pool: Pool) -> None:
    offset = 1000
    assert list(pool.map(lambda x: x + offset, range(5))) == [1000, 1001, 1002, 1003, 1004]


def test_closed_iterator_ends(pool: Pool) -> None:
    with pool.imap(abs, itertools.count(), chunksize=4) as it:
        assert next(it) == 0
    with pytest.raises(StopIteration):
        next(it)


def test_bad_arguments(pool: Pool) -> None:
    with pytest.raises(ValueError):
        pool.map(abs, [1], chunksize=0)
    with pytest.raises(ValueError):
        pool.map(abs, [1], buffersize=0)
    with pytest.raises(TypeError):
        pool.map(abs)
    with pytest.raises(TypeError):
        pool.map(42, [1])
    with pytest.raises(TypeError):
        pool.map(abs, [1], progress="yes")


# -- progress ---------------------------------------------------------------------------------------


def test_progress_callback(pool: Pool) -> None:
    calls: list[tuple[int, int | None]] = []
    def progress(done: int, total: int | None) -> None:
        calls.append((done, total))

    assert len(list(pool.map(abs, range(100), chunksize=10, progress=progress))) == 100
    assert calls[-1] == (100, 100)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    list(pool.imap(abs, iter(range(30)), chunksize=10, progress=progress))
    assert calls[-1] == (30, None)  # an unsized input has no total


class _FakeBar:
    made: list[_FakeBar] = []

    def __init__(self, total: int | None = None, unit: str = "") -> None:
        self.total = total
        self.n = 0
        self.closed = False
        _FakeBar.made.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def test_progress_true_uses_tqdm(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tqdm")
    fake.tqdm = _FakeBar  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tqdm", fake)
    _FakeBar.made.clear()
    assert list(pool.map(abs, range(50), chunksize=10, progress=True)) == list(range(50))
    (bar,) = _FakeBar.made
    assert (bar.total, bar.n, bar.closed) == (50, 50, True)


def test_progress_true_without_tqdm_says_how_to_get_it(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    with pytest.raises(ImportError, match=r"poolbridge\[progress\]"):
        pool.map(abs, range(5), progress=True)


# -- broadcast --------------------------------------------------------------------------------------


def test_broadcast_runs_once_in_every_worker(pool: Pool) -> None:
    assert pool.broadcast("os.getpid") == dict(enumerate(pool.pids()))


def test_broadcast_errors_are_per_slot(pool: Pool) -> None:
    out = pool.broadcast(f"{M}.raise_if_slot", 1)
    assert out[0] == pool.pids()[0]
    assert isinstance(out[1], LookupError)


@pytest.mark.backends("process")  # a crash costs a new actor on Ray: covered there by test_faults_crash
def test_broadcast_with_a_dead_slot(pool_maker: Callable[..., Pool]) -> None:
    p = pool_maker(workers=2)
    before = p.pids()
    out = p.options(timeout=WAIT).broadcast(f"{M}.kill_if_slot", 0)
    assert isinstance(out[0], WorkerCrashedError)
    assert out[0].slot == 0
    assert out[1] == before[1]
    # the slot came back: the next broadcast reaches its new worker
    again = p.options(timeout=WAIT).broadcast("os.getpid")
    assert again[1] == before[1] and again[0] not in (before[0], None)


# -- asyncio ---------------------------------------------------------------------------------------


async def test_async_map_imap_starmap(pool: Pool) -> None:
    apool = pool.aio
    assert [x async for x in apool.map(abs, range(-10, 10), chunksize=3)] == [abs(i) for i in range(-10, 10)]
    assert [x async for x in apool.map(pow, range(5), range(5))] == [1, 1, 4, 27, 256]
    got = [x async for x in apool.imap(abs, range(-10, 10), ordered=False, chunksize=4)]
    assert sorted(got) == sorted(abs(i) for i in range(-10, 10))
    assert [x async for x in apool.starmap("operator.add", [(1, 2), (3, 4)])] == [3, 7]


async def test_async_imap_per_session_order(pool: Pool) -> None:
    items = [(f"aio-{i % 10}", i // 10) for i in range(1000)]
    results = [r async for r in pool.aio.imap(f"{M}.record_order", items, session=lambda it: it[0], timeout=WAIT)]
    assert [(k, s) for k, s, _ in results] == items


async def test_async_map_sends_off_the_loop_while_a_slot_is_not_ready(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slot restarting (or at its in-flight bound) could make a send wait: the map then sends
    # from a thread, as AsyncPool does for single calls, and the loop keeps running.
    import threading

    pulled_on: set[int] = set()

    def items() -> Iterator[int]:
        for i in range(20):
            pulled_on.add(threading.get_ident())
            yield i

    monkeypatch.setattr(testing.supervisor(pool), "ready", lambda slot: False)
    assert [x async for x in pool.aio.imap(abs, items(), chunksize=5)] == list(range(20))
    assert threading.get_ident() not in pulled_on


async def test_async_map_error_and_close(pool: Pool) -> None:
    got = []
    with pytest.raises(KeyError):
        async for value in pool.aio.map(f"{M}.fail_on", range(40), chunksize=4):
            got.append(value)
    assert got == [i * 10 for i in range(13)]
    source, taken = _counting()
    async with pool.aio.imap(abs, source, chunksize=5, buffersize=2) as it:
        assert [await it.__anext__() for _ in range(20)] == list(range(20))
    assert taken[0] <= 20 + 10


async def test_async_broadcast_pids_closed_repr() -> None:
    async with AsyncPool(workers=2) as apool:
        pids = apool.pids()
        assert len(pids) == 2 and all(pid > 0 for pid in pids)
        assert await apool.broadcast("os.getpid") == dict(enumerate(pids))
        assert not apool.closed
        text = repr(apool)
        assert "workers=2" in text and str(pids) in text and "generations=[0, 0]" in text
    assert apool.closed


# -- reprs -----------------------------------------------------------------------------------------


def test_reprs_say_slots_pids_generations_sessions(pool: Pool) -> None:
    text = repr(pool)
    assert f"pids={pool.pids()}" in text and "generations=" in text and "workers=2" in text
    ref = pool.options(session="repr-s").create("collections.Counter")
    pid = pool.pids()[ref.slot]
    assert "session='repr-s'" in repr(ref) and f"pid={pid}" in repr(ref) and "generation=0" in repr(ref)
    with pool.options(session="repr-s", batch=1).stream("builtins.range", 5) as stream:
        assert next(stream) == 0
        text = repr(stream)
        assert "session='repr-s'" in text and f"pid={pid}" in text and "generation=0" in text
    assert "MapIterator" in repr(pool.map(abs, [1]))
    assert isinstance(poolbridge.Pool.aio, property)


def test_a_port_worker_never_unpickles_a_chunk_nor_pickles_its_results(monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process worker cores: apply_chunk as a Port worker (wire=True) and an embedded one run it.
    import pickle

    from poolbridge import _helpers, _mapwork, _worker

    monkeypatch.setattr(_worker, "_active", [None])
    monkeypatch.setattr(_helpers, "_current", [None])
    _worker.WorkerCore(0, 1, 0, wire=True)
    with pytest.raises(TypeError, match="list of items"):
        _mapwork.apply_chunk(f"{M}.echo", pickle.dumps([1, 2]), False)
    assert _mapwork.apply_chunk(f"{M}.echo", [1, 2], False)[0] == [1, 2]
    _worker.WorkerCore(0, 1, 0)
    out = _mapwork.apply_chunk(f"{M}.echo", pickle.dumps([1, 2]), False)[0]
    assert pickle.loads(out) == [1, 2]


def test_grouping_a_batch_by_key_into_chunks() -> None:
    # MapRun._group alone (white box): buffers topped up to the chunk size, full chunks sent in
    # each key's order, the rest buffered in the order of their first item; a chunk size that
    # shrank meanwhile sends the over-full buffer at once.
    from poolbridge._mapengine import MapRun

    run = MapRun.__new__(MapRun)
    sent: list[tuple[str, list[int], list[str]]] = []
    run._send = lambda key, idx, items: sent.append((key, list(idx), list(items)))  # type: ignore[method-assign]
    run._buffers = {"b": ([0], ["b0"])}
    run._chunk = 3
    keys = ["a", "b", "a", "c", "a", "a", "b"]
    run._group(keys, range(1, 8), [f"{k}{i}" for i, k in zip(range(1, 8), keys, strict=True)])
    assert sent == [("a", [1, 3, 5], ["a1", "a3", "a5"]), ("b", [0, 2, 7], ["b0", "b2", "b7"])]
    assert run._buffers == {"c": ([4], ["c4"]), "a": ([6], ["a6"])}
    assert list(run._buffers) == ["c", "a"]  # by first item
    sent.clear()
    run._chunk = 1
    run._buffers = {"a": ([0, 1], ["a0", "a1"])}
    run._group(["a", "a", "a"], range(2, 5), ["a2", "a3", "a4"])
    assert [idx for _, idx, _ in sent] == [[0, 1], [2], [3], [4]]
    assert run._buffers == {}
