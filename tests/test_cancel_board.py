"""The cancel board's rules, in one process (router and worker sides are the same object API):
a cancelled frame is never claimed, a claimed frame is never cancelled, and semaphore names
left by dead routers are swept."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from poolbridge import _cancel
from poolbridge._cancel import SIZE, CancelBoard


def _supported() -> bool:
    board = CancelBoard.create()
    if board is None:
        return False
    board.unlink()
    board.close()
    return True


pytestmark = pytest.mark.skipif(not _supported(), reason="no shared semaphores here")


@pytest.fixture
def pair() -> Iterator[tuple[CancelBoard, CancelBoard]]:
    router = CancelBoard.create()
    assert router is not None
    # The worker's own fd, as a worker inherits one; attach unlinks the name, as a worker does.
    worker = CancelBoard.attach(os.dup(router.fd), router.name)
    yield router, worker
    worker.close()
    router.close()


def test_cancel_before_start_wins_and_the_frame_is_skipped(pair: tuple[CancelBoard, CancelBoard]) -> None:
    router, worker = pair
    assert worker.claim(1)
    assert router.cancel(2)  # not started yet
    assert not worker.claim(2)  # skipped: it never runs
    assert worker.claim(3)


def test_a_started_frame_cannot_be_cancelled(pair: tuple[CancelBoard, CancelBoard]) -> None:
    router, worker = pair
    assert worker.claim(1) and worker.claim(2)
    assert not router.cancel(2)
    assert not router.cancel(1)


def test_a_slot_holding_an_unconsumed_cancel_refuses_a_second_one(pair: tuple[CancelBoard, CancelBoard]) -> None:
    router, worker = pair
    assert router.cancel(5)
    assert not router.cancel(5 + SIZE)  # same slot, the first cancel not reached yet
    for seq in range(1, 5):
        assert worker.claim(seq)
    assert not worker.claim(5)
    assert router.cancel(5 + SIZE)  # the slot is free again once the worker passed it


def test_names_of_dead_routers_are_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    name = f"/poolbridge-{dead_pid}-stale0000"
    sem = _cancel._SemLock(1, 1, 1, name, False)
    try:
        assert os.path.exists("/dev/shm/sem." + name[1:])
        monkeypatch.setattr(_cancel, "_swept", False)
        board = CancelBoard.create()
        assert board is not None
        assert not os.path.exists("/dev/shm/sem." + name[1:])
        board.unlink()
        board.close()
    finally:
        del sem
