"""Session routing functions, checked against the spec in docs/hashing.md.

The vector tables are parsed *from the document*, so the spec and the code cannot drift apart: a row
edited in the doc, or a change to ``poolbridge._hashing``, fails here. The Python and Elixir reference
implementations printed in the document are extracted and run on the same vectors (Elixir only where
``elixir`` is on PATH; with ``CI`` set a missing ``elixir`` is a failure, not a skip).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolbridge._hashing import jump_hash, slot_for, stable_hash64

DOC = Path(__file__).resolve().parent.parent / "docs" / "hashing.md"
SLOT_COUNTS = (1, 2, 3, 4, 8, 16, 100, 1000)
PUBLISHED = {(1, 1): 0, (42, 57): 43, (0xDEAD10CC, 1): 0, (0xDEAD10CC, 666): 361, (256, 1024): 520}
U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
# No deadline: a timing threshold has no place in a unit test on a shared machine.
PROPS = settings(max_examples=200, deadline=None, database=None)
# When a property fails, Hypothesis imports libcst (if installed) to write an @example patch; on some
# installs that import emits a DeprecationWarning (mypy_extensions.TypedDict) which the project's
# "warnings are errors" turns into a pytest INTERNALERROR that hides the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")


# -- parsing the document ------------------------------------------------------------------------


def _tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of ``text`` as rows of cells (header first, separator row dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _table(header_test: Any) -> list[dict[str, str]]:
    found = [t for t in _tables(DOC.read_text(encoding="utf-8")) if header_test(t[0])]
    assert len(found) == 1, f"expected exactly one such table in {DOC.name}, found {len(found)}"
    header, *rows = found[0]
    assert rows, "table has no rows"
    for row in rows:
        assert len(row) == len(header), f"malformed row {row}"
    return [dict(zip(header, row, strict=True)) for row in rows]


def _session_id(cell: str) -> str:
    """The doc's id notation: a JSON string literal, optionally followed by ``* N``."""
    m = re.fullmatch(r'`("(?:[^"\\]|\\.)*")(?:\s*\*\s*(\d+))?`', cell)
    assert m, f"unparseable id cell {cell!r}"
    return str(json.loads(m.group(1))) * int(m.group(2) or 1)


def _code_block(lang: str) -> str:
    blocks = re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) == 1, f"expected one ```{lang} block in {DOC.name}, found {len(blocks)}"
    return str(blocks[0])


HASH_ROWS = _table(lambda h: h[0] == "id" and "stable_hash64 (hex)" in h)
SLOT_ROWS = _table(lambda h: h[0] == "id" and "n=1" in h)
KEY_ROWS = _table(lambda h: h == ["key", "buckets", "bucket"])

HASHES = {_session_id(r["id"]): r for r in HASH_ROWS}
SLOTS = {_session_id(r["id"]): {int(k[2:]): int(v) for k, v in r.items() if k.startswith("n=")} for r in SLOT_ROWS}
KEYS = {(int(r["key"], 0), int(r["buckets"])): int(r["bucket"]) for r in KEY_ROWS}


def _doc_python() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "hashing_doc_reference"}
    exec(compile(_code_block("python"), f"{DOC}:python", "exec"), namespace)
    return namespace


# -- the document covers what it promises ------------------------------------------------------------


def test_doc_tables_cover_the_required_vectors() -> None:
    ids = list(HASHES)
    assert len(ids) >= 12
    assert len(ids) == len(HASH_ROWS), "duplicate ids in the hash table"
    assert set(SLOTS) == set(HASHES), "the hash and slot tables must list the same ids"
    assert "" in ids and "user-42" in ids
    assert any(len(s.encode("utf-8")) == 256 for s in ids), "a 256-byte id"
    assert any(not s.isascii() and all(ord(c) <= 0xFFFF for c in s) for s in ids), "a non-ASCII BMP id"
    assert any(any(ord(c) > 0xFFFF for c in s) for s in ids), "an emoji (outside the BMP)"
    for session_id, slots in SLOTS.items():
        assert tuple(sorted(slots)) == SLOT_COUNTS, f"slot counts of {session_id!r}"
    assert KEYS == PUBLISHED


# -- every row of the document against poolbridge._hashing ---------------------------------------


@pytest.mark.parametrize("session_id", list(HASHES), ids=lambda s: ascii(s)[:40])
def test_hash_table_row(session_id: str) -> None:
    row = HASHES[session_id]
    h = stable_hash64(session_id)
    assert int(row["UTF-8 bytes"]) == len(session_id.encode("utf-8"))
    assert row["stable_hash64 (hex)"] == f"`{h:016x}`"
    assert int(row["stable_hash64 (decimal)"]) == h
    assert h == int(row["stable_hash64 (hex)"].strip("`"), 16)


@pytest.mark.parametrize("session_id", list(SLOTS), ids=lambda s: ascii(s)[:40])
def test_slot_table_row(session_id: str) -> None:
    for n, slot in SLOTS[session_id].items():
        assert slot_for(session_id, n) == slot, f"slot_for({session_id!r}, {n})"
        assert jump_hash(stable_hash64(session_id), n) == slot


@pytest.mark.parametrize(("key", "buckets"), list(PUBLISHED))
def test_published_jump_hash_vectors(key: int, buckets: int) -> None:
    assert jump_hash(key, buckets) == PUBLISHED[(key, buckets)]


def test_doc_python_reference_matches_the_tables() -> None:
    ref = _doc_python()
    for session_id, row in HASHES.items():
        assert ref["stable_hash64"](session_id) == int(row["stable_hash64 (decimal)"])
        for n, slot in SLOTS[session_id].items():
            assert ref["slot_for"](session_id, n) == slot
    for (key, buckets), bucket in PUBLISHED.items():
        assert ref["jump_hash"](key, buckets) == bucket


# -- properties ---------------------------------------------------------------------------------


@PROPS
@given(st.text(), st.integers(min_value=1, max_value=100_000))
def test_slot_is_in_range(session_id: str, n: int) -> None:
    assert 0 <= slot_for(session_id, n) < n


@PROPS
@given(U64, st.integers(min_value=1, max_value=1 << 32))
def test_jump_hash_is_in_range(key: int, n: int) -> None:
    assert 0 <= jump_hash(key, n) < n


@PROPS
@given(st.text())
def test_stable_hash64_is_the_specified_function(session_id: str) -> None:
    expected = int.from_bytes(hashlib.sha256(session_id.encode("utf-8")).digest()[:8], "big")
    assert stable_hash64(session_id) == expected
    assert 0 <= expected < 1 << 64
    assert stable_hash64(session_id) == stable_hash64(session_id)  # and stable within the process


@PROPS
@given(U64, st.integers(min_value=1, max_value=5000))
def test_growing_moves_a_key_only_to_the_new_slot(key: int, n: int) -> None:
    before, after = jump_hash(key, n), jump_hash(key, n + 1)
    assert after in (before, n)


@PROPS
@given(st.text(min_size=1))
def test_growing_one_slot_at_a_time_only_moves_sessions_to_the_new_slot(session_id: str) -> None:
    slot = slot_for(session_id, 1)
    assert slot == 0
    for n in range(1, 130):
        new = slot_for(session_id, n + 1)
        assert new in (slot, n), f"{session_id!r}: {n} -> {n + 1} slots moved it from {slot} to {new}"
        slot = new


@PROPS
@given(U64, st.integers(min_value=1, max_value=5000))
def test_doc_python_reference_agrees(key: int, n: int) -> None:
    assert _DOC_REF["jump_hash"](key, n) == jump_hash(key, n)


_DOC_REF = _doc_python()


def test_jump_hash_rejects_non_positive_slot_counts() -> None:
    for n in (0, -1):
        with pytest.raises(ValueError):
            jump_hash(1, n)


def test_spread_and_movement_are_as_consistent_hashing_promises() -> None:
    # Deterministic (SHA-256 of fixed ids); the bounds are ~5 standard deviations wide.
    ids = [f"session-{i}" for i in range(20_000)]
    counts = [0] * 8
    for s in ids:
        counts[slot_for(s, 8)] += 1
    assert all(2250 <= c <= 2750 for c in counts), counts
    moved = [s for s in ids if slot_for(s, 9) != slot_for(s, 8)]
    assert all(slot_for(s, 9) == 8 for s in moved)
    assert 2000 <= len(moved) <= 2450  # about 1/9 of 20_000


def test_slots_do_not_depend_on_the_process_or_its_hash_seed() -> None:
    ids = list(SLOTS)
    script = (
        "import json, sys\n"
        "from poolbridge._hashing import slot_for\n"
        "ids = json.loads(sys.stdin.read())\n"
        f"print(json.dumps([[slot_for(s, n) for n in {list(SLOT_COUNTS)}] for s in ids]))\n"
    )
    expected = [[SLOTS[s][n] for n in SLOT_COUNTS] for s in ids]
    for seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(ids),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        assert json.loads(out.stdout) == expected, f"PYTHONHASHSEED={seed}"


# -- the Elixir reference implementation from the document ------------------------------------------

_ELIXIR_DRIVER = r"""
IO.stream(:stdio, :line)
|> Enum.each(fn line ->
  case String.split(String.trim_trailing(line, "\n"), " ") do
    ["H", hex | ns] ->
      id = Base.decode16!(hex, case: :lower)
      slots = Enum.map(ns, fn n -> PoolbridgeHash.slot_for(id, String.to_integer(n)) end)
      IO.puts(Enum.join([PoolbridgeHash.stable_hash64(id) | slots], " "))

    ["J", key, n] ->
      IO.puts(PoolbridgeHash.jump_hash(String.to_integer(key), String.to_integer(n)))
  end
end)
"""


def _elixir() -> str:
    exe = shutil.which("elixir")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("`elixir` is not on PATH and CI is set: the Elixir reference must be checked in CI")
        pytest.skip("`elixir` is not installed")
    return exe


@pytest.mark.elixir
def test_doc_elixir_reference_matches() -> None:
    exe = _elixir()
    # The document's vectors, plus generated ids and keys covering far more slot counts.
    ids = [*HASHES, *(f"gen-{i}-\u00e9\U0001f642" * (i % 7 + 1) for i in range(200))]
    counts = [*SLOT_COUNTS, 5, 7, 31, 64, 257, 4096, 65_537, 1 << 31]
    keys = [*PUBLISHED, *((int.from_bytes(hashlib.sha256(b"k%d" % i).digest()[:8], "big"), i + 1) for i in range(300))]
    lines = [f"H {s.encode('utf-8').hex()} {' '.join(map(str, counts))}" for s in ids]
    lines += [f"J {key} {n}" for key, n in keys]
    result = subprocess.run(
        [exe, "-e", _code_block("elixir") + "\n" + _ELIXIR_DRIVER],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout.splitlines()
    assert len(out) == len(lines), result.stdout[-2000:] + result.stderr[-2000:]
    for s, got in zip(ids, out[: len(ids)], strict=True):
        expected = [stable_hash64(s), *(slot_for(s, n) for n in counts)]
        assert [int(x) for x in got.split()] == expected, f"Elixir disagrees on {s!r}"
    for (key, n), got in zip(keys, out[len(ids) :], strict=True):
        assert int(got) == jump_hash(key, n), f"Elixir disagrees on jump_hash({key}, {n})"
