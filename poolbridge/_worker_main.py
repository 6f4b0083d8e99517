"""Child side, the process: how a worker process starts, lives and ends.

``python -c "from poolbridge._worker_main import main; main()" <options>`` — started by the
router (_pipes.py) with exactly its two pipe ends (and the cancel board) inherited. It

1. opens the cancel board first (which removes the board's name: nothing is left behind),
2. asks Linux to SIGKILL it when its parent dies, and exits at once if the parent is already gone,
3. runs :class:`~poolbridge._worker.WorkerCore` over the request pipe until EOF — the router closed
   it or died — answering frames in order, replies of one read written together.
"""

from __future__ import annotations

import base64
import logging
import os
import select
import sys
import time
from collections.abc import Callable
from typing import Any

from ._frames import write_frame
from ._protocol import (
    FrameReader,
    OversizedFrame,
    default_lifter,
    encode_frame,
    unpack_plain,
    write_all,
)
from ._wire import RETIRING_NOTICE, encode_error
from ._worker import WorkerCore

log = logging.getLogger("poolbridge.worker")

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when our parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except Exception:  # pragma: no cover - best effort; pipe EOF still ends the worker
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable", exc_info=True)
    if os.getppid() != parent_pid:
        os._exit(0)


# Replies produced from one read are written together, but never held back longer than this, so a
# quick call queued behind a slow one is not delayed by more than the slow call itself.
_FLUSH_AFTER = 0.0005


def _answer(handle: Callable[[bytes], bytes], frame: bytes | bytearray | OversizedFrame, limit: int | None) -> bytes:
    """The reply to one request frame. The router never sends a frame over the limit (it fails
    such a call in the caller), but if one came, its reply still carries its id: no request is
    ever left without an answer."""
    if not isinstance(frame, OversizedFrame):
        return handle(frame)  # type: ignore[arg-type]
    return encode_error(frame.leading_id(), frame.error(limit or 0))


def main() -> None:
    """Entry point of a worker process: ``python -c ... <base64 msgpack options>``."""
    options = unpack_plain(base64.b64decode(sys.argv[1]))
    read_fd, write_fd = options["fds"]
    worker_main(read_fd, write_fd, options)


#: This worker's options (its pipes, slot, ...), for tests that need to reach the plumbing.
options_in_use: dict[str, Any] = {}


def worker_main(read_fd: int, write_fd: int, options: dict[str, Any]) -> None:
    """Run a worker until its request pipe reaches EOF (the router closed it or died)."""
    options_in_use.update(options, fds=[read_fd, write_fd])
    board = None
    if options.get("cancel_board"):
        from ._cancel import CancelBoard

        board = CancelBoard.attach(*options["cancel_board"])  # first: it unlinks the board's name
    _die_with_parent(options["parent_pid"])
    logging.basicConfig(level=options.get("log_level", logging.WARNING))
    shm = options.get("shm")
    if shm:
        from . import _shm
        from ._shm_send import Lifter

        _shm.use_tracker(shm["tracker_fd"])
        prefix = _shm.worker_prefix(shm["prefix"], options["slot"], options["generation"])
        default_lifter[0] = Lifter(
            prefix, shm["threshold"], options.get("max_value_bytes"), cache=_shm.CACHE_BYTES
        )
    core = WorkerCore(
        options["slot"],
        options["n_slots"],
        options["generation"],
        helpers=tuple(options.get("helpers", ())),
        wire=bool(options.get("wire", False)),
        max_refs_per_session=options.get("max_refs_per_session"),
        session_ttl=options.get("session_ttl"),
        max_calls=options.get("max_calls"),
        max_rss=options.get("max_rss"),
        initializer=options.get("initializer"),
        session_init=options.get("session_init"),
        max_value_bytes=options.get("max_value_bytes"),
        allow_modules=tuple(options.get("allow_modules") or ()),
    )
    seq = 0
    reader = FrameReader(core.max_value_bytes, extended=True)
    check_retire = options.get("max_calls") is not None or options.get("max_rss") is not None
    perf = time.perf_counter
    handle = core.handle
    sweeping = core.session_ttl is not None
    while True:
        if sweeping:
            wait = core.next_sweep_in()
            if wait == 0.0 or not select.select([read_fd], [], [], wait)[0]:
                core.sweep()
                continue
        frames = reader.read_from(read_fd)
        if frames is None:
            return
        if len(frames) == 1 and not check_retire:  # the common case: one request, one reply
            seq += 1
            if board is None or board.claim(seq):
                write_frame(write_fd, _answer(handle, frames[0], core.max_value_bytes))
            continue
        out: list[bytes] = []
        started = 0.0
        for frame in frames:
            if out and perf() - started > _FLUSH_AFTER:
                write_all(write_fd, b"".join(out))
                out.clear()
            if not out:
                started = perf()
            seq += 1
            if board is not None and not board.claim(seq):
                continue  # cancelled before it started: the router expects no reply
            out.append(encode_frame(_answer(handle, frame, core.max_value_bytes)))
        if check_retire and core.wants_retire():
            # Ask to be replaced; keep serving until the router closes our input (EOF below).
            out.append(encode_frame(RETIRING_NOTICE))
        if out:
            write_all(write_fd, b"".join(out))
