"""A Port client for the server tests: a real ``python -m poolbridge serve`` subprocess on pipes
(:class:`Server`), or a :class:`~poolbridge._server.Server` in this process (:class:`InProcess`)."""

from __future__ import annotations

import contextlib
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
from pb_faultmods import worker_pids_of

from poolbridge import _testing as testing

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HELPERS_DIR = HERE / "elixir"  # pb_test_helpers, the --helpers module of these tests
REF = "__poolbridge_ref__"
STREAM = "__poolbridge_stream__"
WAIT = 20.0


def env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HELPERS_DIR), str(HERE), env.get("PYTHONPATH", "")])
    return env


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class Server:
    """A server subprocess and a reader thread turning its stdout into reply maps."""

    def __init__(self, *extra: str, workers: int = 2, start_wait: float = WAIT) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poolbridge", "serve", "--workers", str(workers), "--helpers", "pb_test_helpers",
             *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env(),
        )
        self.replies: queue.Queue[Any] = queue.Queue()
        self.raw: queue.Queue[bytes] = queue.Queue()  # every reply frame as it came, header included
        self.stderr = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._err.start()
        self.next_id = 0
        try:
            self.hello = self.recv(start_wait)
        except BaseException:
            self.close()  # never leave the server (and what it started) behind
            raise
        assert self.hello["hello"] == "poolbridge"

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            head = out.read(4)
            if len(head) < 4:
                self.replies.put(EOFError(head))
                return
            (n,) = struct.unpack(">I", head)
            body = out.read(n)
            self.raw.put(head + body)
            try:
                self.replies.put(msgpack.unpackb(body, raw=False, strict_map_key=False))
            except Exception as exc:  # a corrupted frame must fail the test that reads it
                self.replies.put(exc)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, op: str, **fields: Any) -> int:
        self.next_id += 1
        self.send_raw(frame({"id": self.next_id, "op": op, **fields}))
        return self.next_id

    def recv(self, timeout: float = WAIT) -> Any:
        reply = self.replies.get(timeout=timeout)
        if isinstance(reply, BaseException):
            raise AssertionError(f"no reply frame: {reply!r}; stderr: {self.stderr[-2000:]!r}")
        return reply

    def request(self, op: str, **fields: Any) -> Any:
        req_id = self.send(op, **fields)
        reply = self.recv()
        assert reply["id"] == req_id, reply
        return reply

    def ok(self, op: str, **fields: Any) -> Any:
        reply = self.request(op, **fields)
        assert reply["status"] == "ok", reply
        return reply["value"]

    def error(self, op: str, **fields: Any) -> dict[str, Any]:
        reply = self.request(op, **fields)
        assert reply["status"] == "error", reply
        return reply["error"]  # type: ignore[no-any-return]

    def worker_pids(self) -> list[int]:
        return worker_pids_of(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.terminate()  # e.g. still starting (Ray): SIGTERM cleans up what it started
                try:
                    self.proc.wait(WAIT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(WAIT)
        self._reader.join(WAIT)
        self._err.join(WAIT)
        for f in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if f is not None and not f.closed:
                f.close()


@contextlib.contextmanager
def running(*extra: str, workers: int = 2) -> Iterator[Server]:
    """A server for a test module: closed after it, with its workers gone."""
    s = Server(*extra, workers=workers)
    pids = s.worker_pids()
    try:
        yield s
    finally:
        s.close()
    assert wait_gone([s.proc.pid, *pids]) == []


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if alive:
            psutil.wait_procs([psutil.Process(p) for p in alive if psutil.pid_exists(p)], timeout=0.05)
    return alive


def stops_within_a_second(s: Server, workers: list[int], started: float) -> None:
    """The server asked to stop at ``started`` exits cleanly within a second, its workers gone."""
    s.proc.wait(WAIT)
    elapsed = time.monotonic() - started
    s.close()
    assert elapsed < 1.0, elapsed
    assert s.proc.returncode == 0
    assert wait_gone(workers, 2.0) == []


def two_slot_sessions(server: Server) -> tuple[str, str]:
    """Two sessions on different slots of a 2-worker server."""
    by_slot: dict[int, str] = {}
    for i in range(100):
        by_slot.setdefault(server.ok("slot_for", session=f"loop-{i}"), f"loop-{i}")
        if len(by_slot) == 2:
            return by_slot[0], by_slot[1]
    raise AssertionError("no session found for one of the slots")


def server_cpu(server: Server) -> float:
    times = psutil.Process(server.proc.pid).cpu_times()
    return float(times.user + times.system)


class InProcess:
    """A :class:`poolbridge._server.Server` in this process, its loop on a thread, on two pipes."""

    def __init__(self, workers: int = 2, **options: Any) -> None:
        from poolbridge._protocol import FrameReader
        from poolbridge._server import Server as PortServer

        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.fds = [req_r, rep_w]
        self.server = PortServer(req_r, rep_w, workers=workers, **options)
        self.frames = FrameReader()
        self.ready: list[Any] = []
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.hello = self.recv()

    def send(self, req_id: int, op: str, **fields: Any) -> None:
        os.write(self.req_w, frame({"id": req_id, "op": op, **fields}))

    def recv(self) -> Any:
        import select

        deadline = time.monotonic() + WAIT
        while not self.ready:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and select.select([self.rep_r], [], [], remaining)[0], "no reply"
            data = os.read(self.rep_r, 1 << 16)
            assert data, "EOF"
            self.ready.extend(msgpack.unpackb(f, raw=False) for f in self.frames.feed(data))
        return self.ready.pop(0)

    def session_on(self, slot: int, prefix: str) -> str:
        router = self.server.router
        return next(f"{prefix}-{i}" for i in range(100) if router.slot_for(f"{prefix}-{i}") == slot)

    def crash_and_hold_restart(self, session: str) -> threading.Event:
        """Kill ``session``'s worker and hold its slot's restart (inside the channel factory) until
        the returned event is set; returns once the restart is being held."""
        restarting, go_on = threading.Event(), threading.Event()

        def gated(factory: testing.Factory) -> testing.Factory:
            def gated_factory(r: Any, slot: int, generation: int) -> Any:
                if generation > 0:
                    restarting.set()
                    assert go_on.wait(WAIT)
                return factory(r, slot, generation)

            return gated_factory

        testing.replace_channel_factory(self.server.router, gated)
        self.send(1, "call", session=session, fn="os._exit", args=[3])
        assert self.recv()["error"]["code"] == "worker_crashed"
        assert restarting.wait(WAIT)
        return go_on

    def close(self) -> None:
        os.close(self.req_w)  # EOF: the loop returns
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        self.server.close()
        for fd in (*self.fds, self.rep_r):
            os.close(fd)
