"""``Pool.map`` against ``multiprocessing.Pool.map``, each pool in a process of its own, rounds
interleaved: a second opinion on bench_map.py, whose pools share one process and run their rounds
one case after the other (a drift of the machine's load then favours whichever case ran in the
quieter minute).

    python benchmarks/map_apart.py [rounds]        # default 100

Each round maps ``poolbridge._bench.tiny`` over 100k ints in one process, then in the other (the
order alternates), and prints best, 10th percentile and median for both, and their ratios
(>= 1: poolbridge as fast or faster).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

SERVER = """
import sys, time
{setup}
from poolbridge._bench import tiny
data = list(range(100_000))
with {pool} as pool:
    for _ in range(3):
        assert {run}[-1] == 100_000
    for _ in sys.stdin:
        started = time.perf_counter()
        {run}
        print(time.perf_counter() - started, flush=True)
"""

CASES = {
    "mp_pool_map": SERVER.format(
        setup="import multiprocessing", pool="multiprocessing.get_context('fork').Pool(2)", run="pool.map(tiny, data)"
    ),
    "pool_map": SERVER.format(
        setup="import poolbridge", pool="poolbridge.Pool(workers=2)", run="list(pool.map(tiny, data))"
    ),
}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    procs = {
        name: subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for name, code in CASES.items()
    }
    times: dict[str, list[float]] = {name: [] for name in procs}
    order = list(procs.items())
    try:
        for i in range(rounds):
            for name, proc in order if i % 2 else order[::-1]:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("\n")
                proc.stdin.flush()
                times[name].append(float(proc.stdout.readline()))
    finally:
        for proc in procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait()
    stats = {name: (min(t), sorted(t)[len(t) // 10], statistics.median(t)) for name, t in times.items()}
    for name, (best, p10, median) in stats.items():
        print(f"{name:12s} best {best * 1e3:6.2f} ms  p10 {p10 * 1e3:6.2f} ms  median {median * 1e3:6.2f} ms")
    mp, ours = stats["mp_pool_map"], stats["pool_map"]
    print(
        f"pool_map / mp_pool_map (items/s): best {mp[0] / ours[0]:.2f}  p10 {mp[1] / ours[1]:.2f}  "
        f"median {mp[2] / ours[2]:.2f}  (load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
