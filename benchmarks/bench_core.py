"""Core benchmarks: poolbridge against baselines measured in the same run.

Run (see benchmarks/README.md)::

    mkdir -p .benchmarks && python -m pytest benchmarks -q --benchmark-json=.benchmarks/core.json \
        && python benchmarks/report.py .benchmarks/core.json

Latency cases time one sequential call per iteration (fixed rounds x iterations).
Throughput cases time one round of ``N`` calls; ``extra_info["n"]`` records the calls (or items) per
round, so calls/s = n / round time. ``extra_info["case"]`` is the stable name report.py keys on.
"""

from __future__ import annotations

import operator
from typing import Any

import pytest

N_CALLS = 1000  # calls per throughput round
N_ITEMS = 200_000  # items per stream round
LATENCY_ROUNDS, LATENCY_ITERATIONS = 200, 5  # 1000 timed calls per latency case
THROUGHPUT_ROUNDS = 20  # many short rounds: more chances of a quiet moment on a shared machine


def _latency(benchmark: Any, case: str, fn: Any, *args: Any) -> Any:
    # Fixed rounds, not pytest-benchmark's calibration: on a loaded 2-core VM calibration misjudges
    # the stdlib pool (spikes of 10+ ms) and the run length becomes unbounded.
    benchmark.extra_info.update(case=case, n=1, unit="calls")
    return benchmark.pedantic(
        fn, args=args, rounds=LATENCY_ROUNDS, iterations=LATENCY_ITERATIONS, warmup_rounds=LATENCY_ROUNDS // 10
    )


def _throughput(benchmark: Any, case: str, n: int, fn: Any, *args: Any) -> None:
    benchmark.extra_info.update(case=case, n=n, unit="calls" if "stream" not in case else "items")
    benchmark.pedantic(fn, args=args, rounds=THROUGHPUT_ROUNDS, iterations=1, warmup_rounds=1)


# -- latency: one sequential round trip ---------------------------------------------------------


@pytest.mark.benchmark(group="latency")
def test_raw_pingpong(benchmark: Any, raw_echo: Any) -> None:
    """Physical limit: one length-prefixed msgpack frame there and back over two pipes."""
    assert _latency(benchmark, "raw_pingpong", raw_echo.ping) == [0, 3]


@pytest.mark.benchmark(group="latency")
def test_mp_pool_apply(benchmark: Any, mp_pool: Any) -> None:
    """multiprocessing.Pool(2).apply(operator.add, (1, 2))."""
    assert _latency(benchmark, "mp_pool_apply", mp_pool.apply, operator.add, (1, 2)) == 3


@pytest.mark.benchmark(group="latency")
def test_pool_call(benchmark: Any, pb_pool: Any) -> None:
    """poolbridge Pool(workers=2).call("operator.add", 1, 2), auto-session of this thread."""
    assert _latency(benchmark, "pool_call", pb_pool.call, "operator.add", 1, 2) == 3


# -- throughput: N calls in flight ----------------------------------------------------------------


def _raw_round(raw_echo: Any, n: int) -> None:
    raw_echo.pipelined(n)


def _mp_round(mp_pool: Any, n: int) -> None:
    results = [mp_pool.apply_async(operator.add, (1, 2)) for _ in range(n)]
    for r in results:
        assert r.get() == 3


def _pb_round(views: list[Any], n: int) -> None:
    k = len(views)
    futures = [views[i % k].submit("operator.add", 1, 2) for i in range(n)]
    for f in futures:
        assert f.result() == 3


@pytest.mark.benchmark(group="throughput")
def test_raw_pipelined(benchmark: Any, raw_echo: Any) -> None:
    """Physical limit: N frames through the raw echo, up to 256 in flight."""
    _throughput(benchmark, "raw_pipelined", N_CALLS, _raw_round, raw_echo, N_CALLS)


@pytest.mark.benchmark(group="throughput")
def test_mp_pool_apply_async(benchmark: Any, mp_pool: Any) -> None:
    """N multiprocessing apply_async, then get() all."""
    _throughput(benchmark, "mp_pool_apply_async", N_CALLS, _mp_round, mp_pool, N_CALLS)


@pytest.mark.benchmark(group="throughput")
def test_pool_submit_many_sessions(benchmark: Any, pb_session_views: Any) -> None:
    """N poolbridge submits round-robin over 64 session views, then result() all."""
    _throughput(benchmark, "pool_submit_many_sessions", N_CALLS, _pb_round, pb_session_views, N_CALLS)


# -- streams ----------------------------------------------------------------------------------------


def _stream_round(view: Any, n: int) -> None:
    count = 0
    for _ in view.stream("builtins.range", n):
        count += 1
    assert count == n


@pytest.mark.parametrize("batch", [1024, 4096])
@pytest.mark.benchmark(group="stream")
def test_pool_stream_ints(benchmark: Any, pb_pool: Any, batch: int) -> None:
    """pool.stream("builtins.range", 200_000) consumed fully, batch = items per round trip."""
    benchmark.extra_info["batch"] = batch
    _throughput(benchmark, f"pool_stream_ints[{batch}]", N_ITEMS, _stream_round, pb_pool.options(batch=batch), N_ITEMS)
