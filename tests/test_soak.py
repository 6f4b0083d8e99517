"""Soak: many calls from several threads over 10 000 sessions while workers are SIGKILLed at
random; afterwards every call is accounted for — its own value, delivered to its own caller, in
its own session — or a typed WorkerCrashedError. None lost, none crossed.

Sized by ``POOLBRIDGE_SOAK_CALLS`` (default, 250 000, takes ~45 s on a 2-core VM; CI may raise it).
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from pb_faultmods import ProcessHygiene, sessions_for_slot, wait_until

import poolbridge
from poolbridge import WorkerCrashedError
from poolbridge import _testing as testing

M = "pb_faultmods"
TOTAL = int(os.environ.get("POOLBRIDGE_SOAK_CALLS", "250000"))
SUBMITTERS = 4  # threads submitting in windows of futures
SESSIONS = 10_000
WINDOW = 512
KILLS = int(os.environ.get("POOLBRIDGE_SOAK_KILLS", "6"))
RESULT_WAIT = 30.0  # per future; a restart takes well under a second


@pytest.fixture(autouse=True)
def _hygiene() -> Iterator[None]:
    with ProcessHygiene():
        yield


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.done = 0
        self.problems: list[str] = []
        self.samples: dict[str, str] = {}

    def add(self, kind: str, n: int = 1, sample: str | None = None) -> None:
        with self.lock:
            if sample is not None:
                self.samples.setdefault(kind, sample)
            self.counts[kind] += n
            self.done += n

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 20:
                self.problems.append(text)
            self.counts["problem"] += 1


def _check(tally: Tally, t: int, i: int, sid: str, outcome: Any, exc: BaseException | None) -> None:
    if exc is None:
        if outcome != [[t, i], sid]:
            tally.problem(f"thread {t} call {i} in {sid}: got {outcome!r}")
        else:
            tally.add("ok")
    elif isinstance(exc, WorkerCrashedError):
        if exc.pid is None or exc.signal != signal.SIGKILL:
            # the "is gone" flavour (broken pipe before the monitor noticed) carries no exit status
            tally.add("crashed-unsent" if exc.exitcode is None else "crashed-other", sample=str(exc))
        else:
            tally.add("crashed")
    else:
        tally.problem(f"thread {t} call {i} in {sid}: {type(exc).__name__}: {exc}")


def _submitter(pool: poolbridge.Pool, t: int, n: int, tally: Tally) -> None:
    """Submits in windows of WINDOW futures, then settles the window; every future must finish."""
    i = 0
    while i < n:
        window: list[tuple[int, str, Any]] = []
        for _ in range(min(WINDOW, n - i)):
            sid = f"soak-{(t * 7919 + i) % SESSIONS}"
            try:
                f = pool.options(session=sid).submit(f"{M}.echo", t, i)
            except WorkerCrashedError as exc:  # written into a dead worker's pipe: nothing sent
                _check(tally, t, i, sid, None, exc)
            else:
                window.append((i, sid, f))
            i += 1
        for j, sid, f in window:
            try:
                exc = f.exception(timeout=RESULT_WAIT)
            except TimeoutError:
                tally.problem(f"thread {t} call {j} in {sid}: future not done after {RESULT_WAIT}s (lost)")
                continue
            _check(tally, t, j, sid, f.result() if exc is None else None, exc)


def _caller(pool: poolbridge.Pool, t: int, n: int, tally: Tally) -> None:
    """Blocking calls (the leader/follower read path) interleaved with the submitters."""
    for i in range(n):
        sid = f"soak-{(t * 7919 + i) % SESSIONS}"
        try:
            outcome = pool.options(session=sid).call(f"{M}.echo", t, i)
        except BaseException as exc:
            _check(tally, t, i, sid, None, exc)
        else:
            _check(tally, t, i, sid, outcome, None)


@pytest.mark.slow
def test_soak_every_reply_reaches_its_caller_across_random_kills() -> None:
    rng = random.Random(int(os.environ.get("POOLBRIDGE_SOAK_SEED", "1234")))
    pool = poolbridge.Pool(2)
    try:
        sync_share = max(1, TOTAL // 40)  # plus one thread of blocking calls (slower: a small share)
        shares = [(TOTAL - sync_share) // SUBMITTERS] * SUBMITTERS + [sync_share]
        total = sum(shares)
        tally = Tally()
        kills: list[tuple[int, int]] = []
        stop = threading.Event()

        def killer() -> None:
            # kill at random points of the run's progress, waiting for each restart
            marks = sorted(rng.uniform(0.05, 0.9) * total for _ in range(KILLS))
            for mark in marks:
                while tally.done < mark and not stop.is_set():
                    time.sleep(0.005)
                if stop.is_set():
                    return
                slot = rng.randrange(pool.workers)
                pid = pool.pids()[slot]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                kills.append((slot, pid))
                deadline = time.monotonic() + 10.0
                while pool.pids()[slot] == pid and time.monotonic() < deadline and not stop.is_set():
                    time.sleep(0.005)

        threads = [
            threading.Thread(target=_submitter, args=(pool, t, shares[t], tally), name=f"soak-submit-{t}")
            for t in range(SUBMITTERS)
        ]
        threads.append(threading.Thread(target=_caller, args=(pool, SUBMITTERS, shares[-1], tally), name="soak-call"))
        k = threading.Thread(target=killer, name="soak-killer")
        started = time.monotonic()
        for th in [*threads, k]:
            th.start()
        for th in threads:
            th.join(300.0)
        stop.set()
        k.join(15.0)
        elapsed = time.monotonic() - started
        if any(th.is_alive() for th in [*threads, k]):
            faulthandler.dump_traceback(all_threads=True)
            pytest.fail("a soak thread hung (stacks dumped to stderr)")

        counts = tally.counts
        print(
            f"\nsoak: {total} calls in {elapsed:.1f}s ({total / elapsed:.0f}/s), kills={len(kills)}, "
            f"{dict(counts)} {tally.samples}"
        )
        assert not tally.problems, tally.problems
        # every call accounted for exactly once
        assert tally.done == total, (tally.done, total)
        assert counts["ok"] + counts["crashed"] + counts["crashed-unsent"] + counts["crashed-other"] == total
        assert counts["crashed-other"] == 0
        if kills:
            assert counts["crashed"] + counts["crashed-unsent"] >= 1
        # a crash costs only the calls in flight on that worker: bounded by the windows in flight
        assert counts["crashed"] + counts["crashed-unsent"] <= len(kills) * ((SUBMITTERS + 1) * WINDOW + 64)
        assert counts["ok"] >= total - len(kills) * ((SUBMITTERS + 1) * WINDOW + 64)

        # each kill restarted exactly its slot once; every slot still serves
        stats = pool.stats()
        assert sum(s.restarts for s in stats.slots) == len(kills)
        for slot in range(pool.workers):
            assert stats.slots[slot].generation == sum(1 for s, _ in kills if s == slot)
            (sid,) = sessions_for_slot(pool, slot, 1, "after-soak")
            assert pool.options(session=sid).call(f"{M}.echo", "x") == [["x"], sid]
        assert all(not ch.pending for ch in testing.channels(pool))
    finally:
        stop_wait = time.monotonic()
        pool.close()
        wait_until(lambda: True, 1.0)
        assert time.monotonic() - stop_wait < 30.0
