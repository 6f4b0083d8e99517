"""Resize 2 -> 3 under load: how long it takes, and the longest pause any single call saw.

``resize_2_to_3``: a pool of 2 whose SESSIONS sessions each hold one small ref (a 3-item list); four
threads call through those refs (``ref.call("__len__")``) the whole time. Timed: ``pool.resize(3)``
(about a third of the sessions move, each pickled out of its old worker and loaded into the new
one). Recorded in ``extra_info``: ``moved``, and ``max_pause_ms`` — the longest single call among those
running while the resize ran — beside ``max_call_ms_baseline``, the longest call over an equally long
window of the same load without a resize, in the same run (the machine is shared: compare the two),
and ``max_pause_ms_staying``, the longest call of a session that did not move.
Between rounds the pool is shrunk back to 2 (not timed).

Directly: ``python benchmarks/bench_resize.py [sessions]`` prints the figures of one round.
CI's smoke run (``--benchmark-disable``) uses 300 sessions and one round.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest

import poolbridge

SESSIONS = 10_000
THREADS = 4


class _Load:
    """Threads calling through the refs; each call's (start, end) is kept."""

    def __init__(self, refs: list[Any]) -> None:
        self.refs = refs
        self.stop = threading.Event()
        self.calls: list[tuple[float, float, int]] = []  # start, end, index of the ref
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(THREADS)]

    def _run(self, offset: int) -> None:
        refs, calls, clock = self.refs, self.calls, time.perf_counter
        i = offset
        try:
            while not self.stop.is_set():
                started = clock()
                k = i % len(refs)
                assert refs[k].call("__len__") == 3
                calls.append((started, clock(), k))
                i += THREADS * 7 + 1
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60.0)

    def longest(self, start: float, end: float, among: set[int] | None = None) -> float:
        """The longest call that overlapped ``[start, end]`` (of the refs ``among``, if given)."""
        return max(
            (e - s for s, e, k in list(self.calls) if e >= start and s <= end and (among is None or k in among)),
            default=0.0,
        )


def measure(sessions: int = SESSIONS) -> dict[str, Any]:
    with poolbridge.Pool(workers=2) as pool:
        refs = [f.result(60) for f in [
            pool.options(session=f"bench-{i}", ret="ref").submit("builtins.list", [1, 2, 3]) for i in range(sessions)
        ]]
        with _Load(refs) as load:
            while len(load.calls) < 200 and not load.errors:  # warm: every thread is calling
                time.sleep(0.01)
            started = time.perf_counter()
            record = pool.resize(3)
            ended = time.perf_counter()
            # The same load for as long again, no resize: the baseline of the pause.
            time.sleep(ended - started)
            base_start = time.perf_counter()
            time.sleep(ended - started)
            base_end = time.perf_counter()
        assert not load.errors, load.errors[:3]
        moved = set(record.moved)
        staying = {i for i in range(sessions) if f"bench-{i}" not in moved}
        return {
            "sessions": sessions,
            "moved": len(record.moved),
            "lost": len(record.lost),
            "resize_s": ended - started,
            "max_pause_ms": load.longest(started, ended) * 1000,
            "max_pause_ms_staying": load.longest(started, ended, staying) * 1000,
            "max_call_ms_baseline": load.longest(base_start, base_end) * 1000,
            "calls": len(load.calls),
        }


@pytest.mark.benchmark(group="resize")
def test_resize_2_to_3(benchmark: Any) -> None:
    smoke = benchmark.disabled
    sessions = 300 if smoke else SESSIONS
    results: list[dict[str, Any]] = []
    benchmark.pedantic(lambda: results.append(measure(sessions)), rounds=1 if smoke else 3)
    best = min(results, key=lambda r: r["resize_s"])
    benchmark.extra_info.update(case="resize_2_to_3", n=1, unit="resizes",
                                **{k: round(v, 3) if isinstance(v, float) else v for k, v in best.items()},
                                max_pause_ms_all=[round(r["max_pause_ms"], 1) for r in results])


if __name__ == "__main__":
    print(measure(int(sys.argv[1]) if len(sys.argv) > 1 else SESSIONS))
