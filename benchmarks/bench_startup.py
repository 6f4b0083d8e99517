"""Start-up and restart, against the stdlib in the same run.

``pool_ready``: ``Pool(workers=2)`` until each slot has answered one call, then closed (the close is
not timed). Baselines: ``multiprocessing`` pools of 2 with the forkserver and fork start methods,
until each worker has run one task (by pid: ``map`` alone may hand both tasks to the worker that
started first); the forkserver is stopped after each round, so each round starts one (as a pool
starts its template). ``slot_restart``: from SIGKILL of a worker to the first answer
of its successor. Targets (#10): pool_ready <= 1.5x mp forkserver; slot_restart <= 100 ms.

poolbridge is measured from bytecode, as it runs installed (pip compiles at install time) and as the
baseline loads multiprocessing: under ``PYTHONDONTWRITEBYTECODE`` (set on the project's VM) a source
checkout would otherwise be compiled again by every pool's template, about 135M instructions of its
~370M (valgrind), a cost no installed poolbridge pays. The module compiles the package first.
"""

from __future__ import annotations

import compileall
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import poolbridge

ROUNDS = 5
compileall.compile_dir(Path(poolbridge.__file__).parent, quiet=1)  # see the module docstring


def _pool_ready() -> poolbridge.Pool:
    pool = poolbridge.Pool(workers=2)
    seen: set[int] = set()
    i = 0
    while len(seen) < 2:  # sessions until both slots have answered
        seen.add(pool.options(session=f"s{i}").call("os.getpid"))
        i += 1
    return pool


@pytest.mark.benchmark(group="startup")
def test_pool_ready(benchmark: Any) -> None:
    benchmark.extra_info.update(case="pool_ready", n=1, unit="pools")
    pools: list[poolbridge.Pool] = []
    try:
        benchmark.pedantic(lambda: pools.append(_pool_ready()), rounds=ROUNDS, teardown=lambda: pools.pop().close())
    finally:
        for p in pools:
            p.close()


@pytest.mark.benchmark(group="startup")
@pytest.mark.parametrize("method", ["forkserver", "fork"])
def test_mp_pool_ready(benchmark: Any, method: str) -> None:
    benchmark.extra_info.update(case=f"mp_pool_ready_{method}", n=1, unit="pools")
    ctx = multiprocessing.get_context(method)
    pools: list[Any] = []
    servers: set[int] = set()

    def ready() -> None:
        p = ctx.Pool(2)
        pools.append(p)
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while len(seen) < 2:  # until both workers have answered, as _pool_ready waits for both slots
            assert time.monotonic() < deadline, "a multiprocessing worker did not answer"
            tasks = [p.apply_async(os.getpid) for _ in range(2)]  # a stdlib callable: nothing to import
            seen.update(t.get(30) for t in tasks)
        if method == "forkserver":  # the round did start a forkserver of its own (see close)
            server = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
            assert server not in servers, "the forkserver of an earlier round served this one"
            servers.add(server)

    def close() -> None:
        p = pools.pop()
        p.terminate()
        p.join()
        if method == "forkserver":
            # The forkserver is a per-process singleton that outlives a pool: stop it, so every round
            # pays for its start as a new program's first pool does (a poolbridge pool always starts
            # its own template).
            multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]

    try:
        benchmark.pedantic(ready, rounds=ROUNDS, teardown=close)
    finally:  # --benchmark-disable runs the target once and no teardown
        while pools:
            close()


@pytest.mark.benchmark(group="startup")
def test_slot_restart(benchmark: Any) -> None:
    benchmark.extra_info.update(case="slot_restart", n=1, unit="restarts")
    with poolbridge.Pool(workers=2) as pool:
        view = pool.options(session="restart")

        def kill() -> tuple[tuple[int], dict[str, Any]]:
            return (view.call("os.getpid"),), {}

        def restart(pid: int) -> None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if view.call("os.getpid") != pid:
                        return
                except poolbridge.WorkerCrashedError:
                    continue  # sent to the dying worker before its death was seen
            raise AssertionError("the slot did not come back")

        benchmark.pedantic(restart, setup=kill, rounds=ROUNDS)
