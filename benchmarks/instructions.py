"""Instructions per operation, counted by valgrind (callgrind): a measure that does not drift with
the machine's load, for A/B of the per-call cost on a shared VM where wall-clock ratios swing.

    python benchmarks/instructions.py                   # every case, this tree
    python benchmarks/instructions.py pool_call raw_pingpong
    PYTHONPATH=/tmp/old python benchmarks/instructions.py pool_call     # another tree

Each case runs twice in a child under ``valgrind --tool=callgrind`` (user-space instructions of the
calling process only: workers and the echo child are not counted), with N and N + 1000 operations;
the difference / 1000 is the cost of one operation, start-up and shut-down cancelled out. Kernel
time (the pipe syscalls, wake-ups) is not counted: it is the same for poolbridge and its baselines.
Threads (a pool's reply reader) are counted, so cases with threads vary by a few per cent.
``pool_map`` / ``mp_pool_map`` count the caller's instructions per ``map`` of ``tiny`` over 100k
ints (4 maps apart, not 1000); their workers, not counted, do the same work per item.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = 300

# Each case: setup, then one operation repeated ``n`` times (``n`` comes from argv).
CASES: dict[str, str] = {
    "pool_call": """
import poolbridge
pool = poolbridge.Pool(workers=1)
pool.call("operator.add", 1, 2)
for _ in range(n):
    pool.call("operator.add", 1, 2)
pool.close()
""",
    "raw_pingpong": """
from _baselines import RawEcho
raw = RawEcho()
raw.ping()
for _ in range(n):
    raw.ping()
""",
    "aio_call": """
import asyncio, poolbridge
async def main():
    async with poolbridge.AsyncPool(workers=1) as pool:
        await pool.call("operator.add", 1, 2)
        for _ in range(n):
            await pool.call("operator.add", 1, 2)
asyncio.run(main())
""",
    "aio_raw_pingpong": """
import asyncio
from _baselines import RawEcho
raw = RawEcho()
async def main():
    await raw.aio_ping()
    for _ in range(n):
        await raw.aio_ping()
asyncio.run(main())
""",
    "pool_submit": """
import poolbridge
with poolbridge.Pool(workers=2) as pool:
    views = [pool.options(session=f"bench-{i}") for i in range(64)]
    for v in views:
        v.call("operator.add", 1, 2)
    futures = [views[i % 64].submit("operator.add", 1, 2) for i in range(n)]
    for f in futures:
        f.result()
""",
    "pool_map": """
import poolbridge
from poolbridge._bench import tiny
data = list(range(100_000))
with poolbridge.Pool(workers=2) as pool:
    list(pool.map(tiny, data))
    for _ in range(n):
        result = list(pool.map(tiny, data))
        del result
""",
    "mp_pool_map": """
import multiprocessing
from poolbridge._bench import tiny
data = list(range(100_000))
with multiprocessing.get_context("fork").Pool(2) as pool:
    pool.map(tiny, data)
    for _ in range(n):
        result = pool.map(tiny, data)
        del result
""",
    "raw_pipelined": """
from _baselines import RawEcho
raw = RawEcho()
raw.ping()
raw.pipelined(n)
""",
    "future_lifecycle": """
import concurrent.futures
for _ in range(n):
    f = concurrent.futures.Future()
    f.set_result(1)
    f.result()
""",
}


# Cases whose one operation is large (a 100k-item map): fewer operations, (first, last) counts.
SPANS: dict[str, tuple[int, int]] = {"pool_map": (2, 6), "mp_pool_map": (2, 6)}


def count(case: str, n: int) -> int:
    code = f"import sys\nsys.path.insert(0, {str(HERE)!r})\nn = {n}\n" + CASES[case]
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c", code],
        capture_output=True, text=True, check=True, cwd="/tmp", env=dict(os.environ),
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"{case}: no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed (apt-get install valgrind)")
    cases = sys.argv[1:] or list(CASES)
    for case in cases:
        first, last = SPANS.get(case, (BASE, BASE + 1000))
        per_op = (count(case, last) - count(case, first)) / (last - first)
        print(f"{case:18s} {per_op:10,.0f} instructions per operation", flush=True)


if __name__ == "__main__":
    main()
