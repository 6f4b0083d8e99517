"""``python -m poolbridge``: --version, plain help with defaults, demo on stdout, bench (fast mode)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import poolbridge

WAIT = 120.0


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run(
        [sys.executable, "-m", "poolbridge", *args], capture_output=True, text=True, timeout=WAIT, env=env
    )


def test_version() -> None:
    out = _run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"poolbridge {poolbridge.__version__}"


@pytest.mark.parametrize("command", [[], ["serve"], ["demo"], ["bench"]])
def test_help_is_plain_text_with_defaults(command: list[str]) -> None:
    out = _run(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "``" not in out.stdout and "`" not in out.stdout and ":class:" not in out.stdout
    if command == ["serve"]:
        assert "(default: WARNING)" in out.stdout
        assert f"(default: {os.cpu_count() or 1})" in out.stdout
    if command == ["bench"]:
        assert "(default: 100000)" in out.stdout
    if not command:
        for name in ("serve", "demo", "bench", "--version"):
            assert name in out.stdout


def test_demo_prints_to_stdout() -> None:
    out = _run("demo")
    assert out.returncode == 0, out.stderr
    assert "math.sqrt(2) = 1.414" in out.stdout
    assert "map: [3, 2, 1, 0, 1, 2]" in out.stdout
    assert "WARNING" not in out.stdout + out.stderr


def test_bench_fast_mode_prints_the_ratio_table() -> None:
    out = _run("bench", "--items", "2000", "--rounds", "1")
    assert out.returncode == 0, out.stderr
    for case in ("multiprocessing.Pool.map", "ProcessPoolExecutor.map", "poolbridge Pool.map"):
        assert case in out.stdout
    assert "Pool.map / best stdlib" in out.stdout


def test_bench_refuses_nonsense() -> None:
    out = _run("bench", "--items", "0")
    assert out.returncode != 0


def test_library_code_never_prints() -> None:
    # print() belongs to the CLI tools (demo, bench); the library logs.
    import pathlib

    root = pathlib.Path(poolbridge.__file__).parent
    for path in root.rglob("*.py"):
        if path.name in ("_cli_tools.py",):
            continue
        assert "print(" not in path.read_text(), path
