"""Where a sequential call's time goes: caller side or worker side.

    python benchmarks/split.py

Three loops in turns, one process, best and median of 5 rounds of 3000 calls each:

* ``raw``: the raw ping-pong baseline (``_baselines.RawEcho``);
* ``raw caller + pool worker``: a bare loop that writes a ready request frame straight into a pool
  worker's request pipe and reads its reply pipe — poolbridge's worker, no poolbridge caller;
* ``minimal caller``: the same pipes, with only what every call must do in the caller — resolve
  the session, hash it to a slot, encode the request, register the reply, write, read, decode —
  and none of the rest (timeouts, restarts, concurrency, leader/follower reading);
* ``pool.call``: the whole thing.

The ratios to ``raw`` split the overhead: the worker's share, the unavoidable per-call Python in
the caller, and the rest. (It uses a channel's private pipe ends: a measuring tool, not an example.)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _baselines import RawEcho

from poolbridge import Pool
from poolbridge._calls import Waiter
from poolbridge._hashing import slot_for
from poolbridge._protocol import OP_CALL, encode_frame, pack_plain, pack_value, unpack_plain
from poolbridge._session import resolve_session


def _rounds(fn: Callable[[], Any], n: int = 3000) -> tuple[float, float]:
    per_call = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        per_call.append((time.perf_counter() - t0) / n * 1e6)
    return min(per_call), statistics.median(per_call)


def main() -> None:
    raw = RawEcho()
    with Pool(workers=1) as pool:
        pool.call("operator.add", 1, 2)
        channel = pool._router.channels()[0]
        wfd, rfd = channel._write_fd, channel._read_fd
        os.set_blocking(wfd, True)
        body = pack_value(["operator.add", [1, 2], {}, 0])
        frame = encode_frame(pack_plain([1, OP_CALL, "split", body]))

        def bare() -> Any:
            os.write(wfd, frame)
            return unpack_plain(os.read(rfd, 1 << 16)[4:])

        router = pool._router
        ids = router._ids

        def minimal() -> Any:
            session_id = resolve_session(None, None)
            slot = slot_for(session_id, router.n_slots)
            body = pack_value(["operator.add", [1, 2], {}, 0], session_id, pool)
            req_id = next(ids)
            data = encode_frame(pack_plain([req_id, OP_CALL, session_id, body]))
            ch = router.channels()[slot]
            ch.pending[req_id] = Waiter()
            os.write(wfd, data)
            got_id, _status, value = unpack_plain(os.read(rfd, 1 << 16)[4:])
            ch.pending.pop(got_id)
            return pool._unpack(value)

        for _ in range(3):
            a, b, m, c = (
                _rounds(raw.ping),
                _rounds(bare),
                _rounds(minimal),
                _rounds(lambda: pool.call("operator.add", 1, 2)),
            )
            sys.stdout.write(
                f"raw {a[0]:5.1f} µs (median {a[1]:5.1f}) | raw caller + pool worker {b[0]:5.1f} µs "
                f"({b[0] / a[0]:.2f}x) | minimal caller {m[0]:5.1f} µs ({m[0] / a[0]:.2f}x) | "
                f"pool.call {c[0]:5.1f} µs ({c[0] / a[0]:.2f}x)\n"
            )
        os.set_blocking(wfd, False)
    raw.close()


if __name__ == "__main__":
    main()
