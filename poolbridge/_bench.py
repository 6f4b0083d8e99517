"""``python -m poolbridge bench``: a quick map benchmark against the stdlib pools, in one run.

``pool.map`` of a tiny function over N items, against ``multiprocessing.Pool.map`` and
``ProcessPoolExecutor.map`` (each with ``len / (4 x workers)`` items per chunk, the stdlib pool's own
choice), all measured in the same process, best of R rounds. The figure that matters is the
ratio; absolute times drift with the machine's load. The pytest-benchmark suite
(benchmarks/bench_map.py) measures the same cases, plus ``ProcessPoolExecutor``'s default
``chunksize=1``.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Row", "format_table", "run", "tiny"]


def tiny(x: int) -> int:
    """The mapped function: as small as a function gets, so the pools' overhead is what is measured."""
    return x + 1


@dataclass(frozen=True)
class Row:
    case: str
    seconds: float  # best round
    items: int

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else math.inf


def run(items: int = 100_000, rounds: int = 30, workers: int = 2) -> list[Row]:
    """Measure the three cases, interleaved round by round (so a burst of load on a shared machine
    hits every case alike); every pool is started and warmed up before it is timed."""
    import poolbridge

    data = list(range(items))
    expected = items  # tiny(items - 1)
    chunk = max(1, math.ceil(items / (4 * workers)))
    # The stdlib pools first: forking after poolbridge has started its threads is unsafe.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as mp_pool, concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as ppe:
        mp_pool.map(tiny, range(workers * 4))
        list(ppe.map(tiny, range(workers * 4)))
        with poolbridge.Pool(workers) as pool:
            list(pool.map(tiny, range(workers * 4)))
            cases: list[tuple[str, Callable[[], Any]]] = [
                ("multiprocessing.Pool.map", lambda: mp_pool.map(tiny, data)),
                (f"ProcessPoolExecutor.map(chunksize={chunk})", lambda: list(ppe.map(tiny, data, chunksize=chunk))),
                ("poolbridge Pool.map", lambda: list(pool.map(tiny, data))),
            ]
            best = [math.inf] * len(cases)
            order = list(enumerate(cases))
            for _ in range(rounds):
                order.reverse()  # no case always runs right after the same other one
                for i, (_, fn) in order:
                    started = time.perf_counter()
                    _check(fn(), expected)
                    best[i] = min(best[i], time.perf_counter() - started)
    return [Row(name, seconds, items) for (name, _), seconds in zip(cases, best, strict=True)]


def _check(results: list[int], expected_last: int) -> None:
    if results and results[-1] != expected_last:
        raise AssertionError(f"wrong result: {results[-1]} != {expected_last}")


def format_table(rows: list[Row], workers: int) -> str:
    """The rows, and poolbridge's ratio to the best of the stdlib pools (>= 1 means as fast or faster)."""
    ours = rows[-1]
    best = max(rows[:-1], key=lambda r: r.per_second)
    lines = [
        f"map of a tiny function over {ours.items:,} items, {workers} workers, best round "
        f"(load average {os.getloadavg()[0]:.1f})",
        "",
        f"{'case':<44} {'best round':>12} {'items/s':>14}",
    ]
    for row in rows:
        lines.append(f"{row.case:<44} {row.seconds * 1e3:>9.1f} ms {row.per_second:>14,.0f}")
    ratio = ours.per_second / best.per_second
    verdict = "met" if ratio >= 1.0 else "MISSED"
    lines += ["", f"Pool.map / best stdlib ({best.case}): {ratio:.2f}x  (target >= 1.00x: {verdict})"]
    return "\n".join(lines)
