"""A/B: the same tiny-call latency and submit throughput, measured for two source trees in turns.

Absolute figures drift with the machine's load, so a change is judged by running the old and the
new tree alternately, several times, in one sitting::

    git worktree add /tmp/old <commit>
    python benchmarks/ab.py /tmp/old .            # old tree, then this one, 3 times each

Each turn runs this file as a child with ``PYTHONPATH`` set to one tree (workers inherit it), and
prints ``call`` latency (1000 sequential ``pool.call("operator.add", 1, 2)``) and ``submit``
throughput (1000 ``submit`` over 64 sessions, then ``result()`` all), best and median of 7 rounds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time


def measure() -> None:
    from poolbridge import Pool

    with Pool(workers=2) as pool:
        views = [pool.options(session=f"s{i}") for i in range(64)]
        for v in views:
            v.call("operator.add", 1, 2)
        latency: list[float] = []
        throughput: list[float] = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(1000):
                pool.call("operator.add", 1, 2)
            latency.append((time.perf_counter() - t0) / 1000 * 1e6)
            t0 = time.perf_counter()
            futures = [views[i % 64].submit("operator.add", 1, 2) for i in range(1000)]
            for f in futures:
                f.result()
            throughput.append(1000 / (time.perf_counter() - t0))
        sys.stdout.write(
            f"call best {min(latency):6.1f} us  median {statistics.median(latency):6.1f} us | "
            f"submit best {max(throughput):7.0f}/s  median {statistics.median(throughput):7.0f}/s\n"
        )


def main(trees: list[str], turns: int = 3) -> None:
    for _ in range(turns):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            sys.stdout.write(f"{tree:>24}  ")
            sys.stdout.flush()
            subprocess.run([sys.executable, __file__, "--measure"], env=env, check=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--measure"]:
        measure()
    else:
        main(sys.argv[1:] or ["."])
