"""Large values: poolbridge against raw pipes and a raw socketpair, measured in the same run.

    python -m pytest benchmarks/bench_large.py -q --benchmark-json=.benchmarks/large.json \
        && python benchmarks/report.py .benchmarks/large.json

Cases (``extra_info["case"]``; see benchmarks/README.md, "Large values"):

* ``raw_pipe_len_200mb`` / ``pool_len_200mb[_zero_copy]``: ``len`` of a 200 MB bytes computed in
  the child: the raw child reads the bytes from a pipe into a new buffer; the pool's worker gets
  them through a shared-memory segment (bytes, or a read-only view with ``zero_copy``);
* ``raw_pipe_get_200mb`` / ``pool_get_200mb[_zero_copy]``: 200 MB the child already holds, received
  into a new object here;
* ``raw_socketpair_echo_1mib`` / ``pool_echo_1mib[_zero_copy]``: 1 MiB there and back, ``n`` per round.

``pool_len_200mb`` and ``pool_get_200mb`` also record the caller's peak RSS during the call, over
the value's size (``extra_info["rss_peak_over_value"]``: 1.0 = the value itself, nothing more).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from _baselines import RawBulk

import poolbridge

MB200 = 200_000_000
MIB = 1 << 20
ECHOES = 50  # 1 MiB echoes per round
ROUNDS = 5  # 200 MB transfers: few rounds, each long enough to time well


@pytest.fixture(scope="module")
def value_200mb() -> bytes:
    return b"\x5a" * MB200  # its pages are all touched, like any real value


@pytest.fixture(scope="module")
def raw_pipe() -> Iterator[RawBulk]:
    raw = RawBulk()
    raw.send_len(b"warm")
    yield raw
    raw.close()


@pytest.fixture(scope="module")
def raw_socket() -> Iterator[RawBulk]:
    raw = RawBulk(socket=True)
    raw.echo(b"warm")
    yield raw
    raw.close()


@pytest.fixture(scope="module")
def large_pool() -> Iterator[poolbridge.Pool]:
    pool = poolbridge.Pool(workers=1)
    pool.call("_bulk_helpers.blob", 16)
    yield pool
    pool.close()


def _timed(benchmark: Any, case: str, fn: Any, *args: Any, n: int = 1, rounds: int = ROUNDS) -> Any:
    benchmark.extra_info.update(case=case, n=n, unit="calls")
    return benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=1)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rss_peak_over_value(fn: Any, *args: Any, holds_value: bool) -> float:
    """Run ``fn(*args)`` once: the process's peak RSS during it, counted from its RSS without the
    200 MB value (``holds_value``: the caller already holds it), over the value's size. 1.0 is the
    value alone; the target is <= 1.3. Linux: writing 5 to /proc/self/clear_refs resets the peak."""
    base = _status_kib("VmRSS") - (MB200 if holds_value else 0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn(*args)
    return round((_status_kib("VmHWM") - base) / MB200, 3)


# -- 200 MB argument ------------------------------------------------------------------------------


@pytest.mark.benchmark(group="large-argument")
def test_raw_pipe_len_200mb(benchmark: Any, raw_pipe: RawBulk, value_200mb: bytes) -> None:
    assert _timed(benchmark, "raw_pipe_len_200mb", raw_pipe.send_len, value_200mb) == MB200


@pytest.mark.benchmark(group="large-argument")
def test_pool_len_200mb(benchmark: Any, large_pool: poolbridge.Pool, value_200mb: bytes) -> None:
    assert _timed(benchmark, "pool_len_200mb", large_pool.call, "builtins.len", value_200mb) == MB200
    if not benchmark.disabled:
        benchmark.extra_info["rss_peak_over_value"] = _rss_peak_over_value(
            large_pool.call, "builtins.len", value_200mb, holds_value=True
        )


@pytest.mark.benchmark(group="large-argument")
def test_pool_len_200mb_zero_copy(benchmark: Any, large_pool: poolbridge.Pool, value_200mb: bytes) -> None:
    zero_copy = large_pool.options(zero_copy=True)
    assert _timed(benchmark, "pool_len_200mb_zero_copy", zero_copy.call, "builtins.len", value_200mb) == MB200


# -- 200 MB result --------------------------------------------------------------------------------


@pytest.mark.benchmark(group="large-result")
def test_raw_pipe_get_200mb(benchmark: Any, raw_pipe: RawBulk) -> None:
    assert len(_timed(benchmark, "raw_pipe_get_200mb", raw_pipe.get, MB200)) == MB200


@pytest.mark.benchmark(group="large-result")
def test_pool_get_200mb(benchmark: Any, large_pool: poolbridge.Pool) -> None:
    assert len(_timed(benchmark, "pool_get_200mb", large_pool.call, "_bulk_helpers.blob", MB200)) == MB200
    if not benchmark.disabled:
        benchmark.extra_info["rss_peak_over_value"] = _rss_peak_over_value(
            large_pool.call, "_bulk_helpers.blob", MB200, holds_value=False
        )


@pytest.mark.benchmark(group="large-result")
def test_pool_get_200mb_zero_copy(benchmark: Any, large_pool: poolbridge.Pool) -> None:
    zero_copy = large_pool.options(zero_copy=True)
    assert len(_timed(benchmark, "pool_get_200mb_zero_copy", zero_copy.call, "_bulk_helpers.blob", MB200)) == MB200


# -- 1 MiB echo -----------------------------------------------------------------------------------


def _echoes(fn: Any, *args: Any) -> None:
    for _ in range(ECHOES):
        fn(*args)


@pytest.mark.benchmark(group="echo-1mib")
def test_raw_socketpair_echo_1mib(benchmark: Any, raw_socket: RawBulk) -> None:
    _timed(benchmark, "raw_socketpair_echo_1mib", _echoes, raw_socket.echo, os.urandom(MIB), n=ECHOES, rounds=10)


@pytest.mark.benchmark(group="echo-1mib")
def test_pool_echo_1mib(benchmark: Any, large_pool: poolbridge.Pool) -> None:
    data = os.urandom(MIB)
    assert large_pool.call("_bulk_helpers.echo", data) == data
    _timed(benchmark, "pool_echo_1mib", _echoes, large_pool.call, "_bulk_helpers.echo", data, n=ECHOES, rounds=10)


@pytest.mark.benchmark(group="echo-1mib")
def test_pool_echo_1mib_zero_copy(benchmark: Any, large_pool: poolbridge.Pool) -> None:
    call = large_pool.options(zero_copy=True).call
    _timed(benchmark, "pool_echo_1mib_zero_copy", _echoes, call, "_bulk_helpers.echo", os.urandom(MIB), n=ECHOES,
           rounds=10)
