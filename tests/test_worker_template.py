"""Workers are forked by a pre-imported template process (``_worker_template.py``): what that must
not change — each worker a separate, fresh-looking process with its own random state, exit codes
reported exactly, nothing left behind — and what happens when the template itself dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import psutil
import pytest
from pb_faultmods import gone, sessions_for_slot, wait_until, worker_pids_of

import poolbridge
from poolbridge import WorkerCrashedError, _spawn

M = "pb_faultmods"
WAIT = 15.0


@pytest.fixture
def pool(pool_maker: Any) -> poolbridge.Pool:
    return pool_maker(workers=2, helpers=[M])  # type: ignore[no-any-return]


def _template_of(pool: poolbridge.Pool) -> psutil.Process:
    parents = {psutil.Process(pid).ppid() for pid in pool.pids()}
    assert len(parents) == 1, parents
    template = psutil.Process(parents.pop())
    assert template.ppid() == os.getpid()
    assert "poolbridge._worker_template" in " ".join(template.cmdline())
    return template


def test_workers_are_forked_by_one_template_that_ends_with_the_pool(pool: poolbridge.Pool) -> None:
    template = _template_of(pool)
    workers = pool.pids()
    assert sorted(workers) == sorted(c.pid for c in template.children())
    pool.close()
    wait_until(lambda: all(gone(pid) for pid in [*workers, template.pid]), WAIT, what="template and workers gone")


def test_forked_workers_do_not_share_random_state(pool: poolbridge.Pool) -> None:
    (a,) = sessions_for_slot(pool, 0, 1, "rnd-a")
    (b,) = sessions_for_slot(pool, 1, 1, "rnd-b")
    draws = {pool.options(session=s).call("random.getrandbits", 64) for s in (a, b)}
    assert len(draws) == 2


def test_exit_codes_and_signals_of_forked_workers_are_reported(pool: poolbridge.Pool, fifo: Any) -> None:
    (sid,) = sessions_for_slot(pool, 0, 1, "exit-code")
    view = pool.options(session=sid, timeout=WAIT)
    with pytest.raises(WorkerCrashedError) as info:
        view.call("os._exit", 7)
    assert info.value.exitcode == 7
    pid = view.call("os.getpid")
    fut = view.submit(f"{M}.wait_fifo", fifo.path, 30.0)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError) as info:
        fut.result(WAIT)
    assert info.value.exitcode == -signal.SIGKILL
    assert view.call("operator.add", 1, 2) == 3


def test_a_killed_template_costs_its_workers_and_a_new_one_takes_over(pool: poolbridge.Pool) -> None:
    template = _template_of(pool)
    old = pool.pids()
    (sid,) = sessions_for_slot(pool, 1, 1, "template-kill")
    view = pool.options(session=sid, timeout=WAIT)
    assert view.call("operator.add", 1, 1) == 2
    template.kill()  # its workers die with it (PR_SET_PDEATHSIG)
    wait_until(lambda: all(gone(pid) for pid in old), WAIT, what="the template's workers died with it")
    wait_until(lambda: not set(pool.pids()) & set(old) and -1 not in pool.pids(), WAIT, what="both slots restarted")
    assert view.call("operator.add", 2, 2) == 4
    new_template = _template_of(pool)
    assert new_template.pid != template.pid
    assert sorted(pool.pids()) == sorted(p for p in worker_pids_of(os.getpid()) if p in pool.pids())


def test_slots_started_together_each_hold_their_own_worker(pool_maker: Any) -> None:
    # A pool's slots ask the template for their workers at once (replies come in request order,
    # _spawn.Template): each channel must hold the process that owns its pipes.
    pool = pool_maker(workers=4)
    for slot in range(4):
        (sid,) = sessions_for_slot(pool, slot, 1, f"own-{slot}")
        assert pool.options(session=sid).call("os.getpid") == pool.pids()[slot]


def test_a_worker_forked_after_its_requester_gave_up_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_spawn, "_FORK_WAIT", 0.2)
    template = _spawn.Template()
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    try:
        os.kill(template.process.pid, signal.SIGSTOP)  # it cannot answer in time
        options = {"slot": 0, "n_slots": 1, "generation": 0, "parent_pid": os.getpid(), "fds": [req_r, rep_w]}
        fork = template.request(options, (req_r, rep_w))
        with pytest.raises(OSError, match="did not fork"):
            template.wait(fork)
        os.kill(template.process.pid, signal.SIGCONT)  # it forks now: nobody will use that worker
        child = wait_until(lambda: fork.child, WAIT, what="the late fork reply")
        assert child.wait(WAIT) == -signal.SIGKILL
    finally:
        os.kill(template.process.pid, signal.SIGCONT)
        template.close()
        for fd in (req_r, req_w, rep_r, rep_w):
            os.close(fd)


def test_the_template_imports_nothing_heavy() -> None:
    # Every module the template imports, each pool pays for before its first worker exists
    # (_worker_template.py): what only the router or rare paths need stays out.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

    def modules(code: str) -> set[str]:
        out = subprocess.run([sys.executable, "-c", f"{code}import sys; print(*sys.modules)"], env=env,
                             capture_output=True, text=True, check=True, timeout=60)
        return set(out.stdout.split())

    imported = modules("import poolbridge._worker_template; ") - modules("")
    heavy = {"concurrent.futures.process", "multiprocessing.connection", "_hashlib", "hmac", "asyncio", "cloudpickle"}
    assert not imported & heavy
