"""asyncio benchmarks: AsyncPool against the same raw-pipe baselines, in the same run.

Latency: 100 sequential ``await pool.call("operator.add", 1, 2)`` per round (one event-loop entry
per round, so the loop's own start-up is not what is measured); compare per call with
``aio_raw_pingpong`` (the same raw pipe driven by the loop) and ``raw_pingpong``.
Throughput: ``asyncio.gather`` of N calls over 64 sessions per round; compare
with ``raw_pipelined`` and with the thread-based ``pool_submit_many_sessions``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

import poolbridge

SEQ = 100
N_CALLS = 1000
ROUNDS = 20


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def apool(pb_pool: poolbridge.Pool) -> poolbridge.AsyncPool:
    return pb_pool.aio  # the same workers as the sync benchmarks


async def _sequential(apool: poolbridge.AsyncPool) -> None:
    for _ in range(SEQ):
        assert await apool.call("operator.add", 1, 2) == 3


async def _gather(views: list[poolbridge.AsyncPool]) -> None:
    k = len(views)
    results = await asyncio.gather(*(views[i % k].call("operator.add", 1, 2) for i in range(N_CALLS)))
    assert results == [3] * N_CALLS


async def _raw_sequential(raw_echo: Any) -> None:
    for _ in range(SEQ):
        assert await raw_echo.aio_ping() == [0, 3]


@pytest.mark.benchmark(group="latency")
def test_aio_raw_pingpong(benchmark: Any, loop: asyncio.AbstractEventLoop, raw_echo: Any) -> None:
    """Baseline: 100 sequential raw round trips per round, driven by the event loop (add_reader)."""
    loop.run_until_complete(_raw_sequential(raw_echo))
    benchmark.extra_info.update(case="aio_raw_pingpong", n=SEQ, unit="calls")
    try:
        benchmark.pedantic(loop.run_until_complete, setup=lambda: ((_raw_sequential(raw_echo),), {}), rounds=ROUNDS)
    finally:
        raw_echo.aio_stop()  # the sync baselines read the same pipe


@pytest.mark.benchmark(group="latency")
def test_aio_call_sequential(benchmark: Any, loop: asyncio.AbstractEventLoop, apool: Any) -> None:
    """100 sequential awaits of AsyncPool.call per round (per-call latency = round / 100)."""
    loop.run_until_complete(_sequential(apool))  # warm up
    benchmark.extra_info.update(case="aio_call_seq", n=SEQ, unit="calls")
    benchmark.pedantic(loop.run_until_complete, setup=lambda: ((_sequential(apool),), {}), rounds=ROUNDS)


@pytest.mark.benchmark(group="throughput")
def test_aio_gather_many_sessions(benchmark: Any, loop: asyncio.AbstractEventLoop, pb_pool: Any) -> None:
    """asyncio.gather of N AsyncPool.call over 64 session views per round."""
    views = [pb_pool.aio.options(session=f"bench-{i}") for i in range(64)]
    loop.run_until_complete(_gather(views))
    benchmark.extra_info.update(case="aio_gather_many_sessions", n=N_CALLS, unit="calls")
    benchmark.pedantic(loop.run_until_complete, setup=lambda: ((_gather(views),), {}), rounds=ROUNDS)
