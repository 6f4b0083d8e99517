"""Fixtures for the benchmark suites, and collection of ``bench_*.py`` files.

The project's ``python_files`` is pytest's default (``test_*.py``), and ``testpaths = ["tests"]`` keeps
this directory out of the normal test run. When ``benchmarks`` is passed explicitly
(``python -m pytest benchmarks``), the hook below collects ``bench_*.py`` here as test modules.

Every fixture is session-scoped: processes are started once, warmed up, and closed at the end, so a
benchmark measures steady-state round trips, never process start-up.
"""

from __future__ import annotations

import multiprocessing
import operator
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _baselines import RawEcho

import poolbridge

WORKERS = 2
SESSIONS = 64


_load_at_start: tuple[float, float, float] | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _load_at_start
    _load_at_start = os.getloadavg()


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, object]) -> None:
    """Record the machine's load average (1/5/15 min) at start and end: on a shared VM it explains noise."""
    machine_info["loadavg_start"] = list(_load_at_start or ())
    machine_info["loadavg_end"] = list(os.getloadavg())


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        # A file named on the command line is already collected by pytest's python plugin.
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)  # type: ignore[no-any-return]
    return None


@pytest.fixture(scope="session")
def raw_echo() -> Iterator[RawEcho]:
    echo = RawEcho()
    for _ in range(100):
        echo.ping()
    yield echo
    echo.close()


@pytest.fixture(scope="session", autouse=True)
def mp_pool() -> Iterator[multiprocessing.pool.Pool]:
    # The stdlib default on Linux (fork), as users meet it. Autouse, so it is created first, before
    # poolbridge starts its router threads (forking a threaded process is deprecated from 3.12).
    pool = multiprocessing.get_context("fork").Pool(WORKERS)
    for _ in range(100):
        pool.apply(operator.add, (1, 2))
    yield pool
    pool.close()
    pool.join()


@pytest.fixture(scope="session")
def pb_pool() -> Iterator[poolbridge.Pool]:
    pool = poolbridge.Pool(workers=WORKERS)
    for _ in range(100):
        pool.call("operator.add", 1, 2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pb_session_views(pb_pool: poolbridge.Pool) -> list[object]:
    """``SESSIONS`` option views, created once (creating a view is not what is measured)."""
    views = [pb_pool.options(session=f"bench-{i}") for i in range(SESSIONS)]
    for view in views:
        view.call("operator.add", 1, 2)  # warm the slot cache for every session
    slots = {pb_pool.slot_for(f"bench-{i}") for i in range(SESSIONS)}
    assert slots == set(range(WORKERS)), f"{SESSIONS} sessions must cover every slot, got {slots}"
    return views
