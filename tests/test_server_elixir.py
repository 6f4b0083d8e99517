"""Runs the Elixir suite (tests/elixir/run.exs) — a real Elixir client through a real Port.

Skipped when ``elixir`` is not installed, unless the ``CI`` environment variable is set: in CI a
missing Elixir is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SUITE_TIMEOUT = 110  # under pytest's 120 s per test


def _elixir() -> str:
    exe = shutil.which("elixir")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("`elixir` is not on PATH and CI is set: the Elixir suite must run in CI")
        pytest.skip("`elixir` is not installed")
    return exe


def _tagged(tag: str) -> list[psutil.Process]:
    """Processes carrying our tag in their environment (the server and its workers inherit it)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("POOLBRIDGE_TEST_TAG") == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _run(script: Path, tag: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["POOLBRIDGE_PYTHON"] = sys.executable
    env["POOLBRIDGE_TEST_TAG"] = tag
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [_elixir(), str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=SUITE_TIMEOUT,
        check=False,
    )


def _assert_no_orphans(tag: str) -> None:
    deadline = time.monotonic() + 5.0
    left = _tagged(tag)
    while left and time.monotonic() < deadline:
        psutil.wait_procs(left, timeout=0.2)
        left = _tagged(tag)
    assert left == [], f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


@pytest.mark.elixir
def test_elixir_suite() -> None:
    tag = uuid.uuid4().hex
    result = _run(REPO / "tests" / "elixir" / "run.exs", tag)
    assert result.returncode == 0, f"elixir suite failed:\n{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
    assert "0 failures" in result.stdout
    _assert_no_orphans(tag)


@pytest.mark.elixir
def test_elixir_demo() -> None:
    tag = uuid.uuid4().hex
    result = _run(REPO / "examples" / "elixir" / "demo.exs", tag)
    assert result.returncode == 0, f"demo failed:\n{result.stdout}\n{result.stderr}"
    assert "math.sqrt(2) = 1.4142135623730951" in result.stdout
    assert "sum of squares 1..100 = 338350" in result.stdout
    _assert_no_orphans(tag)


@pytest.mark.elixir
def test_beam_killed_leaves_no_process() -> None:
    """SIGKILL the BEAM that owns the Port: the server sees EOF and takes its workers with it."""
    tag = uuid.uuid4().hex
    env = dict(os.environ)
    env.update(POOLBRIDGE_PYTHON=sys.executable, POOLBRIDGE_TEST_TAG=tag)
    proc = subprocess.Popen(
        [_elixir(), str(REPO / "tests" / "elixir" / "hold_port.exs")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = b""
        deadline = time.monotonic() + 60
        while not line.startswith(b"PIDS") and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
                assert line, "the Elixir script exited early"
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 3
        server = psutil.Process(pids[0])
        beam = next(p for p in server.parents() if p.name().startswith("beam"))
        started = time.monotonic()
        beam.kill()
        _gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=5)
        assert alive == [], f"left behind: {alive}"
        assert time.monotonic() - started < 3.0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    _assert_no_orphans(tag)
