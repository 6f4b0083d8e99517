"""Child side of the Ray backend: the body of one slot's actor, run in a Ray worker process."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray

from .._worker import WorkerCore

__all__ = ["RemoteSlotWorker"]


class _SlotWorker:
    """The body of one slot's actor: a :class:`WorkerCore` plus the idle-session sweeper."""

    def __init__(self, slot: int, n_slots: int, generation: int, options: dict[str, Any]) -> None:
        logging.basicConfig(level=options.get("log_level", logging.WARNING))
        self._core = WorkerCore(
            slot,
            n_slots,
            generation,
            helpers=tuple(options.get("helpers") or ()),
            wire=bool(options.get("wire", False)),
            max_refs_per_session=options.get("max_refs_per_session"),
            session_ttl=options.get("session_ttl"),
            initializer=options.get("initializer"),
            session_init=options.get("session_init"),
            allow_modules=tuple(options.get("allow_modules") or ()),
        )
        # Ray runs the methods on its own thread; the sweeper is ours. The lock keeps them apart.
        self._lock = threading.Lock()
        self._tick = threading.Event()  # never set: the sweeper's timer
        if options.get("session_ttl") is not None:
            threading.Thread(target=self._sweeper, name="poolbridge-sweeper", daemon=True).start()

    def ping(self) -> tuple[int, str]:
        """This actor's process id and Ray node id."""
        return os.getpid(), ray.get_runtime_context().get_node_id()

    def handle(self, body: bytes) -> bytes:
        with self._lock:
            return self._core.handle(body)

    def handle_many(self, bodies: list[bytes]) -> list[bytes]:
        """Requests that queued up while the actor was busy, run in order: one Ray task, not N."""
        with self._lock:
            handle = self._core.handle
            return [handle(body) for body in bodies]

    def _sweeper(self) -> None:
        core = self._core
        while True:
            wait = core.next_sweep_in()
            if wait is None:
                return
            if wait > 0:
                self._tick.wait(wait)  # a timer; the sweep re-checks under the lock
            with self._lock:
                if core.next_sweep_in() == 0.0:
                    core.sweep()


RemoteSlotWorker: Any = ray.remote(_SlotWorker)
