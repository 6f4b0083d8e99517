"""``python -m poolbridge serve``: the Port server's process setup — its fds, SIGTERM, start-up and
shutdown — around :class:`~poolbridge._server.Server` (the loop and the protocol)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

from ._server import Server

log = logging.getLogger("poolbridge.server")

__all__ = ["serve"]


class _Stop(Exception):
    """Raised by the SIGTERM handler during start-up (before the loop runs) to leave it."""


def _private_fds(fds: tuple[int, int] | None) -> tuple[int, int]:
    """Take the protocol fds private, then make 0/1 harmless — before any worker is started.

    stdio mode: fd 0/1 are duplicated to fresh non-inheritable fds; fd 0 becomes /dev/null and
    fd 1 a copy of fd 2, so a ``print`` or C-level write to fd 1 (here or in a worker, which
    inherits 0/1/2) lands on stderr, never inside a frame. ``--fds`` mode: the given fds are moved
    to fresh non-inheritable fds and the originals closed.
    """
    if fds is None:
        in_fd, out_fd = os.dup(0), os.dup(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)
        return in_fd, out_fd
    src_in, src_out = fds
    in_fd, out_fd = os.dup(src_in), os.dup(src_out)
    for fd in {src_in, src_out}:
        os.close(fd)
    # --fds 0,1 (or any of 0-2) left a hole there: refill it, or the next pipe opened (a worker's)
    # would become fd 0/1 and be inherited as a worker's stdio.
    for fd, path, flags in ((2, os.devnull, os.O_WRONLY), (0, os.devnull, os.O_RDONLY), (1, None, 0)):
        try:
            os.fstat(fd)
        except OSError:
            if path is None:
                os.dup2(2, 1)
            else:
                null = os.open(path, flags)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
    return in_fd, out_fd


def serve(*, fds: tuple[int, int] | None = None, **options: Any) -> int:
    """Run the Port server until EOF on its input or SIGTERM; returns the exit status.

    ``fds``: the protocol's (in, out) fds, default stdio; ``options``: :class:`Server`'s."""
    in_fd, out_fd = _private_fds(fds)

    server: Server | None = None

    def on_term(signum: int, frame: FrameType | None) -> None:
        # Once the loop runs, stop it through its wake pipe: an exception raised here could land
        # anywhere, e.g. between taking a channel lock and the `try` that releases it.
        if server is not None and server.serving:
            server.stop()
            return
        raise _Stop  # start-up: leave whatever is being set up

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server = Server(in_fd, out_fd, **options)
        server.run()
    except _Stop:
        log.info("SIGTERM during start-up")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt cleanup
        if server is not None:
            server.close()
        signal.signal(signal.SIGTERM, previous)
        for fd in (in_fd, out_fd):
            try:
                os.close(fd)
            except OSError:
                pass
    sys.stderr.flush()
    return 0
