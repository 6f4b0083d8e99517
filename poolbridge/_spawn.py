"""Parent side: how worker processes are started — forked by a template process, or spawned fresh.

A pool starts one *template* (``_worker_template.py``): a fresh interpreter, started with the
router's environment and inheriting only a socket, that imports the worker's modules once and
then forks a worker for each request — at start and at every restart. A fork of a warm template
costs about a millisecond where a fresh interpreter costs tens, so a pool is ready sooner and a
crashed slot is back sooner; and a worker is still a process that inherits none of the router's
threads, fds or ``__main__``. If the template cannot be used (it died, or the platform has no
pidfds), workers are spawned fresh, one interpreter each, as before.

Workers forked by the template are its children, not the router's: the template reaps them and
reports each exit status, which :class:`ForkedProcess` hands to whoever waits. The router kills
and watches them through pidfds the template sends with each fork, so a pid that the kernel
recycles can never be signalled by mistake.

Every process is started from one long-lived thread (:class:`Spawner`): ``PR_SET_PDEATHSIG`` fires
when the *thread* that forked the child exits, not the process; if a restart were forked from a
short-lived thread, the restarted process would be SIGKILLed as soon as that thread ended.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._protocol import pack_plain, unpack_plain

if TYPE_CHECKING:
    from ._cancel import CancelBoard

log = logging.getLogger("poolbridge.router")

__all__ = ["ForkedProcess", "Spawner", "Template", "forget_process", "spawn_worker"]

_WORKER = "from poolbridge._worker_main import main; main()"
_TEMPLATE = "from poolbridge._worker_template import main; main()"
# A fork request is answered in about a millisecond; this only bounds a template that hangs.
_FORK_WAIT = 10.0


def _popen(code: str, options: dict[str, Any], keep: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """A fresh interpreter running ``code``, inheriting exactly the fds in ``keep``."""
    env = dict(os.environ)
    # The child imports what the parent can import (poolbridge, helper modules, dotted paths),
    # whatever the parent's working directory or sys.path edits.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.Popen(
        [sys.executable, "-c", code, base64.b64encode(pack_plain(options)).decode()],
        pass_fds=keep,
        env=env,
        stdin=subprocess.DEVNULL,
    )


class ForkedProcess:
    """A worker forked by the template: the parts of ``subprocess.Popen`` a channel uses."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.returncode: int | None = None
        self._exited = threading.Event()
        self._lock = threading.Lock()  # kill() never signals through a closed (reused) fd number

    def _set_exit(self, returncode: int | None) -> None:
        with self._lock:
            if self._exited.is_set():
                return
            self.returncode = returncode
            os.close(self.pidfd)
            self.pidfd = -1
            self._exited.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status (None if the template died before reporting it)."""
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout or 0.0)
        return self.returncode

    def dup_pidfd(self) -> int | None:
        """A pidfd of this worker for a watcher to own and close; None once it has exited."""
        with self._lock:
            return os.dup(self.pidfd) if self.pidfd >= 0 else None

    def kill(self) -> None:
        with self._lock:
            if self.pidfd >= 0:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def forget_process(process: subprocess.Popen[bytes] | ForkedProcess) -> None:
    """In a forked child: ``process`` is the parent's; never signal, reap or warn about it here.
    Takes no lock (see ``Supervisor._forked``); the number is forgotten before it is closed."""
    if isinstance(process, ForkedProcess):
        fd, process.pidfd = process.pidfd, -1  # kill() does nothing now
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    else:
        # Not this process's child: Popen's finaliser must not warn about it or try to reap it.
        process._child_created = False  # type: ignore[attr-defined]
    if process.returncode is None:
        process.returncode = 0  # Popen.kill() and wait() do nothing now


class _Fork:
    """One fork request to the template, answered in request order by its reader thread."""

    __slots__ = ("abandoned", "child", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.child: ForkedProcess | None = None  # None once done: the template is gone
        self.abandoned = False  # its requester stopped waiting: a late child is killed


class Template:
    """The parent's end of one template process.

    Fork requests may come from several threads at once (a pool's slots start together): each is
    written under the lock and queued; the template answers them in order, and the reader thread
    hands each reply to the request at the head of the queue.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = _popen(_TEMPLATE, {"sock": theirs.fileno(), "parent_pid": os.getpid()}, (theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._lock = threading.Lock()  # a request is queued and written as one step: queue order = reply order
        self._requests: collections.deque[_Fork] = collections.deque()
        self._children: dict[int, ForkedProcess] = {}
        self.alive = True
        self._reader = threading.Thread(target=self._read, name="poolbridge-template", daemon=True)
        self._reader.start()

    def request(self, options: dict[str, Any], fds: tuple[int, ...]) -> _Fork:
        """Ask for a worker (the fds are passed with the request); :meth:`wait` for it."""
        fork = _Fork()
        with self._lock:
            if not self.alive:
                raise OSError("the template process is gone")
            self._requests.append(fork)
            try:
                socket.send_fds(self._sock, [pack_plain(options)], list(fds))
            except BaseException:
                self._requests.pop()
                raise
        return fork

    def wait(self, fork: _Fork) -> ForkedProcess:
        """The worker forked for ``fork`` (on the requester's own thread, not the spawner's)."""
        fork.done.wait(_FORK_WAIT)
        with self._lock:
            child = fork.child
            fork.abandoned = child is None
        if child is None:
            raise OSError("the template process did not fork a worker")
        return child

    def _read(self) -> None:
        """Fork replies and exit reports, until the template closes its end."""
        try:
            while True:
                message, fds, _, _ = socket.recv_fds(self._sock, 1 << 12, 1)
                if not message:
                    break
                kind, pid, *rest = unpack_plain(message)
                if kind == "forked":
                    child = ForkedProcess(pid, fds[0])
                    self._children[pid] = child
                    with self._lock:
                        fork = self._requests.popleft()
                        fork.child = child
                        late = fork.abandoned
                    fork.done.set()
                    if late:  # nobody will use it (its requester timed out): it must not live on
                        child.kill()
                elif kind == "exited" and pid in self._children:
                    self._children.pop(pid)._set_exit(rest[0])
        except OSError as exc:
            log.debug("template socket: %s", exc)
        finally:
            with self._lock:
                self.alive = False
                waiting = list(self._requests)
                self._requests.clear()
            for fork in waiting:
                fork.done.set()  # a fork waiting for its reply fails now, not after _FORK_WAIT
            for child in list(self._children.values()):
                child._set_exit(None)  # dies by PDEATHSIG with the template; no status comes
            self._children.clear()

    def close(self) -> None:
        """Let the template exit (its socket reaches EOF) and wait for it."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes our reader thread too
        except OSError:
            pass
        self._reader.join(5.0)
        self._sock.close()
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Spawner:
    """Starts processes, always from this one long-lived thread (see the module docstring), and
    owns the pool's template, started at once (``start_template``) or on first use, and started
    again if it dies."""

    def __init__(self, start_template: bool = False) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._template: Template | None = None
        self._use_template = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")
        if start_template:  # first job: the template boots while the caller goes on
            self._jobs.put((self.template, concurrent.futures.Future()))
        self._thread = threading.Thread(target=self._run, name="poolbridge-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        if self._template is not None:
            self._template.close()

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the spawner thread; a worker it starts (``spawn_worker``) is finished here."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        result = future.result()
        return result.finish(self) if isinstance(result, _Start) else result

    def template(self) -> Template | None:
        """The live template (on the spawner thread only); None: spawn fresh interpreters."""
        if not self._use_template:
            return None
        if self._template is not None and not self._template.alive:
            self._template.close()
            self._template = None
        if self._template is None:
            try:
                self._template = Template()
            except OSError:
                log.warning("cannot start the template process; spawning workers one by one", exc_info=True)
                self._use_template = False
        return self._template

    def forget_after_fork(self) -> None:
        """In a forked child: close the child's copy of the template's socket (the template must
        see EOF when the parent closes it) and forget the parent's processes."""
        template, self._template = self._template, None
        self._use_template = False
        if template is not None:
            try:
                template._sock.close()  # the child's fd only: no shutdown, the parent's end lives
            except OSError:
                pass
            forget_process(template.process)
            for child in list(template._children.values()):
                forget_process(child)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and the template (whose workers have exited by now); wait for both, so
        the pool's close leaves no process behind, not even for a moment."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class _Start:
    """A worker being started: its pipes, and its process once it has its ends of them."""

    def __init__(self, slot: int, generation: int, options: dict[str, Any], board: CancelBoard | None) -> None:
        self.slot = slot
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.child_ends = (req_r, rep_w)
        self.opts = dict(options, slot=slot, generation=generation, parent_pid=os.getpid(), fds=[req_r, rep_w])
        self.keep: tuple[int, ...] = (req_r, rep_w)
        if board is not None:
            self.opts["cancel_board"] = [board.fd, board.name]
            self.keep = (*self.keep, board.fd)
        if options.get("shm"):
            self.keep = (*self.keep, options["shm"]["tracker_fd"])  # the resource tracker: always last (_shm.py)
        self.process: Any = None
        self.fork: tuple[Template, _Fork] | None = None

    def popen(self) -> subprocess.Popen[bytes]:
        """A fresh interpreter for the worker (on the spawner thread)."""
        return _popen(_WORKER, self.opts, self.keep)

    def finish(self, spawner: Spawner) -> tuple[Any, int, int]:
        """On the caller's thread: the worker the template forks (or, if it cannot, a fresh
        interpreter started on the spawner thread); then the worker's pipe ends leave this process.
        Returns (process, request write fd, reply read fd)."""
        try:
            if self.process is None and self.fork is not None:
                template, fork = self.fork
                try:
                    self.process = template.wait(fork)
                except OSError as exc:
                    log.warning("slot %d: the template could not fork a worker (%s); spawning one", self.slot, exc)
                    self.process = spawner.run(self.popen)
        except BaseException:
            _close(self.req_w, self.rep_r)
            raise
        finally:
            _close(*self.child_ends)
        return self.process, self.req_w, self.rep_r


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def spawn_worker(
    spawner: Spawner, slot: int, generation: int, options: dict[str, Any], board: CancelBoard | None
) -> _Start:
    """Start one worker with exactly its pipe ends and cancel board (on the spawner thread).

    ``Spawner.run`` finishes it on the caller's thread (:meth:`_Start.finish`): a fork asked of the
    template is awaited there, so the spawner thread passes the next slot's request on meanwhile
    and a pool's workers are forked together.
    """
    start = _Start(slot, generation, options, board)
    try:
        template = spawner.template()
        if template is not None:
            try:
                start.fork = template, template.request(start.opts, start.keep)
            except OSError as exc:
                log.warning("slot %d: the template could not fork a worker (%s); spawning one", slot, exc)
        if start.fork is None:
            start.process = start.popen()
    except BaseException:
        _close(*start.child_ends, start.req_w, start.rep_r)
        raise
    return start
