"""Map benchmarks: ``Pool.map`` of a tiny function over 100k items against the stdlib pools, in the
same run (issue 14's target: >= 1x the best of them).

    mkdir -p .benchmarks && python -m pytest benchmarks/bench_map.py -q \
        --benchmark-json=.benchmarks/map.json && python benchmarks/report.py .benchmarks/map.json

Each round maps ``poolbridge._bench.tiny`` (``x + 1``) over ``N_ITEMS`` ints and builds the result
list. "Chunksize chosen by each": ``multiprocessing.Pool.map`` picks ``len / (4 x workers)`` itself;
``ProcessPoolExecutor.map``'s own default is ``chunksize=1`` (one round only: it takes seconds), and
it is also run with the stdlib pool's choice; ``Pool.map`` picks its chunks from ``len()``. The
target ratio is against the best of the three baselines (report.py), the two chunked ones timed in
rounds interleaved with ``pool_map``'s (see ``test_pool_map``). The ``pool_map_sessions`` and
``pool_imap_unsized`` cases are information: a session function over 100 keys, and an input
without ``len()`` (adaptive chunks). The cases run in file order: ``pool_map`` right after
``mp_pool_map`` (the load of a shared machine drifts), ``ppe_map_default`` (seconds) last.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import WORKERS

from poolbridge._bench import tiny

N_ITEMS = 100_000
ROUNDS = 60  # many short rounds: the best of them comes near each case's floor on a noisy shared machine
DATA = list(range(N_ITEMS))
LAST = N_ITEMS  # tiny(N_ITEMS - 1)
CHUNK = math.ceil(N_ITEMS / (4 * WORKERS))  # multiprocessing.Pool.map's own choice


@pytest.fixture(scope="module")
def ppe() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    # forkserver: poolbridge's threads may already run in this process; its workers are clean.
    with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("forkserver")) as ex:
        assert list(ex.map(tiny, range(8))) == list(range(1, 9))
        yield ex


def _round(benchmark: Any, case: str, fn: Any, rounds: int = ROUNDS) -> None:
    benchmark.extra_info.update(case=case, n=N_ITEMS, unit="items")
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)
    assert len(result) == N_ITEMS and result[-1] == LAST


@pytest.mark.benchmark(group="map")
def test_mp_pool_map(benchmark: Any, mp_pool: Any) -> None:
    """multiprocessing.Pool(2).map(tiny, 100k items), its own chunksize."""
    _round(benchmark, "mp_pool_map", lambda: mp_pool.map(tiny, DATA))


@pytest.mark.benchmark(group="map")
def test_pool_map(benchmark: Any, pb_pool: Any, mp_pool: Any, ppe: Any) -> None:
    """poolbridge Pool(workers=2).map(tiny, 100k items): spread over the workers, chunks from len().

    Before each of its rounds, one round of each chunked stdlib baseline runs, timed here: the
    target ratio compares rounds taken under the same load (``extra_info["interleaved"]``, read
    by report.py), where rounds of one case after another let a drift of the machine's load
    favour whichever case ran in the quieter minute."""
    interleaved: dict[str, list[float]] = {"mp_pool_map": [], "ppe_map_chunked": []}
    baselines = {
        "mp_pool_map": lambda: mp_pool.map(tiny, DATA),
        "ppe_map_chunked": lambda: list(ppe.map(tiny, DATA, chunksize=CHUNK)),
    }

    order = list(baselines.items())

    def baseline_rounds() -> tuple[tuple[()], dict[str, Any]]:
        order.reverse()  # each baseline in turn runs right before pool_map's round
        for case, fn in order:
            started = time.perf_counter()
            result = fn()
            interleaved[case].append(time.perf_counter() - started)
            assert len(result) == N_ITEMS and result[-1] == LAST
        return (), {}

    benchmark.extra_info.update(case="pool_map", n=N_ITEMS, unit="items", interleaved=interleaved)
    result = benchmark.pedantic(
        lambda: list(pb_pool.map(tiny, DATA)), setup=baseline_rounds, rounds=ROUNDS, warmup_rounds=1
    )
    assert len(result) == N_ITEMS and result[-1] == LAST


@pytest.mark.benchmark(group="map")
def test_ppe_map_chunked(benchmark: Any, ppe: Any) -> None:
    """ProcessPoolExecutor(2).map(tiny, 100k items, chunksize=len / (4 x workers))."""
    _round(benchmark, "ppe_map_chunked", lambda: list(ppe.map(tiny, DATA, chunksize=CHUNK)))


@pytest.mark.benchmark(group="map")
def test_pool_imap_unsized(benchmark: Any, pb_pool: Any) -> None:
    """Pool.imap over an iterator without len(): adaptive chunks, bounded look-ahead."""
    _round(benchmark, "pool_imap_unsized", lambda: list(pb_pool.imap(tiny, iter(DATA))))


@pytest.mark.benchmark(group="map")
def test_pool_map_sessions(benchmark: Any, pb_pool: Any) -> None:
    """Pool.map with session=f(item) over 100 sessions: per-session order, sessions in parallel."""
    _round(benchmark, "pool_map_sessions", lambda: list(pb_pool.map(tiny, DATA, session=_session_of)))


@pytest.mark.benchmark(group="map")
def test_ppe_map_default(benchmark: Any, ppe: Any) -> None:
    """ProcessPoolExecutor(2).map(tiny, 100k items), its own default chunksize=1 (one round)."""
    _round(benchmark, "ppe_map_default", lambda: list(ppe.map(tiny, DATA)), rounds=1)


_SESSIONS = [f"map-{k}" for k in range(100)]


def _session_of(x: int) -> str:
    return _SESSIONS[x % 100]
