"""Ray backend against the process backend, measured in the same run; figures are ratios.

Run (needs ``pip install 'poolbridge[ray]'``)::

    python benchmarks/bench_ray.py            # runs the cases below, then prints Ray/process ratios

or as part of a pytest-benchmark run (``python -m pytest benchmarks/bench_ray.py --benchmark-json=...``);
``ratios(path)`` reads such a JSON file. Cases (``extra_info["case"]``):

* ``cmp_process_call`` / ``cmp_ray_call``: one ``pool.call("operator.add", 1, 2)`` round trip.
* ``cmp_process_submit`` / ``cmp_ray_submit``: ``N`` submits round-robin over 64 session views,
  then ``result()`` on all of them; ``extra_info["n"]`` is N.

Both pools have 2 slots; Ray's start-up (``ray.init`` and the actors) happens in a session fixture and
is reported separately (``ray_startup_s``), not measured per call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import poolbridge

ray = pytest.importorskip("ray", reason="the Ray benchmarks need pip install 'poolbridge[ray]'")

WORKERS = 2
SESSIONS = 64
N_SUBMIT = 500  # calls per throughput round (the same N for both backends)
ROUNDS = 8
LATENCY = {"min_rounds": 100, "max_time": 1.0, "warmup": True, "warmup_iterations": 50}
RAY_INIT = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
_measured: dict[str, float] = {}


@pytest.fixture(scope="module")
def process_pool() -> Iterator[poolbridge.Pool]:
    pool = poolbridge.Pool(workers=WORKERS)
    for _ in range(100):
        pool.call("operator.add", 1, 2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def ray_pool() -> Iterator[poolbridge.Pool]:
    started = time.monotonic()
    pool = poolbridge.Pool(workers=WORKERS, backend="ray", ray_init=RAY_INIT)
    pool.pids()  # every actor up
    _measured["ray_startup_s"] = time.monotonic() - started
    for _ in range(100):
        pool.call("operator.add", 1, 2)
    yield pool
    pool.close()


def _views(pool: poolbridge.Pool) -> list[Any]:
    views = [pool.options(session=f"bench-{i}") for i in range(SESSIONS)]
    for view in views:
        view.call("operator.add", 1, 2)
    return views


def _round(views: list[Any], n: int) -> None:
    k = len(views)
    futures = [views[i % k].submit("operator.add", 1, 2) for i in range(n)]
    for f in futures:
        assert f.result(timeout=60) == 3


@pytest.mark.benchmark(group="ray-latency", **LATENCY)
def test_cmp_process_call(benchmark: Any, process_pool: poolbridge.Pool) -> None:
    benchmark.extra_info["case"] = "cmp_process_call"
    assert benchmark(process_pool.call, "operator.add", 1, 2) == 3


@pytest.mark.benchmark(group="ray-latency", **LATENCY)
def test_cmp_ray_call(benchmark: Any, ray_pool: poolbridge.Pool) -> None:
    benchmark.extra_info.update(case="cmp_ray_call", ray_startup_s=_measured["ray_startup_s"])
    assert benchmark(ray_pool.call, "operator.add", 1, 2) == 3


@pytest.mark.benchmark(group="ray-throughput")
def test_cmp_process_submit(benchmark: Any, process_pool: poolbridge.Pool) -> None:
    benchmark.extra_info.update(case="cmp_process_submit", n=N_SUBMIT)
    views = _views(process_pool)
    benchmark.pedantic(_round, args=(views, N_SUBMIT), rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="ray-throughput")
def test_cmp_ray_submit(benchmark: Any, ray_pool: poolbridge.Pool) -> None:
    benchmark.extra_info.update(case="cmp_ray_submit", n=N_SUBMIT)
    views = _views(ray_pool)
    benchmark.pedantic(_round, args=(views, N_SUBMIT), rounds=ROUNDS, iterations=1, warmup_rounds=1)


# -- ratios ----------------------------------------------------------------------------------------


def ratios(path: Path) -> list[str]:
    """Ray/process ratios from a pytest-benchmark JSON file (best round, then median)."""
    data = json.loads(path.read_text())
    cases = {b["extra_info"].get("case"): b for b in data["benchmarks"]}
    lines = []

    def per_call(case: str, stat: str) -> float:
        bench = cases[case]
        return float(bench["stats"][stat]) / float(bench["extra_info"].get("n", 1))

    for label, ray_case, process_case in (
        ("pool.call latency", "cmp_ray_call", "cmp_process_call"),
        ("submit throughput (time per call)", "cmp_ray_submit", "cmp_process_submit"),
    ):
        if ray_case not in cases or process_case not in cases:
            lines.append(f"{label}: missing")
            continue
        best = per_call(ray_case, "min") / per_call(process_case, "min")
        median = per_call(ray_case, "median") / per_call(process_case, "median")
        lines.append(
            f"{label}: Ray/process = {best:.1f}x (best rounds), {median:.1f}x (medians); "
            f"Ray {per_call(ray_case, 'min') * 1e6:.0f} us vs process {per_call(process_case, 'min') * 1e6:.0f} us"
        )
    if "cmp_ray_call" in cases:
        startup = cases["cmp_ray_call"]["extra_info"]["ray_startup_s"]
        lines.append(f"Ray start-up (ray.init + {WORKERS} actors): {startup:.1f} s")
    return lines


def main() -> int:
    here = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ray.json"
        code = subprocess.call(
            [sys.executable, "-m", "pytest", str(here), "-q", "-p", "no:randomly", f"--benchmark-json={out}"],
            cwd=here.parent.parent,
            env=dict(os.environ),
        )
        if code != 0 or not out.exists():
            return code or 1
        for line in ratios(out):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
