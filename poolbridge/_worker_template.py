"""Child side: the template process, a pre-imported interpreter that forks the pool's workers.

A fresh interpreter costs tens of milliseconds before it runs a line of poolbridge; a fork of one
that has already imported the worker's modules costs about one. So a pool starts one *template*
(``_spawn.Template``) and asks it for each worker, at start and on every restart. The template is
started like a worker — a fresh interpreter with the router's environment, inheriting only its
socket — so a worker still inherits none of the router's threads, fds or ``__main__``; and it never
starts a thread itself, so forking it is safe.

One ``SOCK_SEQPACKET`` socket, one msgpack message per packet, fds passed with ``SCM_RIGHTS``::

    router -> template   {worker options}                 fds: [request read end, reply write end,
                                                                (cancel board), (resource tracker)]
    template -> router   ["forked", pid]                  fds: [pidfd of the new worker]
    template -> router   ["exited", pid, returncode]      (subprocess convention: -N for signal N)

The template reaps its children (``SIGCHLD``) and reports each exit. It ends on EOF from the router
(or, with ``PR_SET_PDEATHSIG``, when the router dies); its workers end with it — the same signal
ties each of them to the template.
"""

from __future__ import annotations

import base64
import os
import select
import signal
import socket
import sys
import traceback
from typing import Any

from . import _cancel, _worker_main  # noqa: F401 - what the template pre-imports: every module a worker needs
from ._protocol import pack_plain, unpack_plain

MAX_MESSAGE = 1 << 16
MAX_FDS = 4


def main() -> None:
    """Entry point: ``python -c ... <base64 msgpack options>`` (see ``_spawn.Template``)."""
    options = unpack_plain(base64.b64decode(sys.argv[1]))
    sock = socket.socket(fileno=options["sock"])
    _worker_main._die_with_parent(options["parent_pid"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the router decides; Ctrl-C reaches it too
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake the select below
    try:
        _serve(sock, wake_r, wake_w)
    finally:
        _reap(sock)


def _serve(sock: socket.socket, wake_r: int, wake_w: int) -> None:
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
            _reap(sock)
        if sock.fileno() in ready:
            message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
            if not message:
                return  # the router closed the socket (its pool closed) or died
            try:
                pid = _fork(unpack_plain(message), fds, (sock.fileno(), wake_r, wake_w))
            finally:
                for fd in fds:
                    os.close(fd)
            pidfd = os.pidfd_open(pid)  # before any reaping: it names exactly this process
            try:
                socket.send_fds(sock, [pack_plain(["forked", pid])], [pidfd])
            finally:
                os.close(pidfd)


def _fork(options: dict[str, Any], fds: list[int], plumbing: tuple[int, ...]) -> int:
    req_r, rep_w = fds[0], fds[1]
    options["fds"] = [req_r, rep_w]
    if options.get("cancel_board"):
        options["cancel_board"][0] = fds[2]
    if options.get("shm"):
        options["shm"]["tracker_fd"] = fds[-1]  # the router's resource tracker (see _shm.py)
    options["parent_pid"] = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    # The worker: none of the template's plumbing, the signal dispositions of a fresh interpreter.
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in plumbing:
            os.close(fd)
        _worker_main.worker_main(req_r, rep_w, options)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never the template's own cleanup


def _reap(sock: socket.socket) -> None:
    """Collect every exited child and report it (the router's handle waits for this)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        try:
            sock.send(pack_plain(["exited", pid, os.waitstatus_to_exitcode(status)]))
        except OSError:
            pass  # the router is gone; nobody is waiting for the status
