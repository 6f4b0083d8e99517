"""Parent side of the Ray backend: Ray itself, started on demand and shut down with the last pool
that needed it (or left alone when the application initialised it)."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import ray

from .._errors import PoolClosedError

if TYPE_CHECKING:
    from .._supervisor import Supervisor

__all__ = ["runtime"]

log = logging.getLogger("poolbridge.ray")


class _Runtime:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owned = False
        self._routers: dict[int, weakref.ref[Supervisor]] = {}
        self._exit_hook = False
        self.exiting = False
        self.node_id: str | None = None

    def acquire(self, router: Supervisor, ray_init: dict[str, Any]) -> None:
        with self._lock:
            if id(router) in self._routers:
                if not ray.is_initialized():  # shut down under us (ray.shutdown(), interpreter exit)
                    raise PoolClosedError("Ray was shut down; this pool's slots cannot be restarted")
                return
            if not self._exit_hook:
                # Registered after Ray's own atexit hook, so it runs first: pools close in order
                # while Ray is still up, instead of seeing every actor die and restarting them.
                atexit.register(self._close_all)
                self._exit_hook = True
            if not ray.is_initialized():
                kwargs = _init_kwargs(ray_init, router.n_slots)
                started = time.monotonic()
                ray.init(**kwargs)
                self._owned = True
                log.info("started Ray (%s) in %.1fs", kwargs.get("address", "local"), time.monotonic() - started)
            elif ray_init:
                log.info("Ray is already initialised; ray_init=%r is not used", sorted(ray_init))
            self.node_id = ray.get_runtime_context().get_node_id()
            self._routers[id(router)] = weakref.ref(router)

    def _close_all(self) -> None:
        self.exiting = True
        with self._lock:
            routers = [r() for r in self._routers.values()]
        for router in routers:
            if router is not None and not router.closing:
                try:
                    router.close(cancel=True)
                except Exception:
                    log.exception("closing a Ray pool at exit failed")

    def release(self, router: Supervisor) -> None:
        with self._lock:
            if id(router) not in self._routers:
                return
            del self._routers[id(router)]
            if self._owned and not self._routers:
                self._owned = False
                if ray.is_initialized():
                    log.info("shutting down the Ray instance poolbridge started")
                    # Garbage that still holds Ray objects (actor handles, object refs, in
                    # reference cycles) must be freed while Ray is up: freed after the shutdown,
                    # they reach into a torn-down core worker.
                    gc.collect()
                    ray.shutdown()

    @property
    def owned(self) -> bool:
        return self._owned


runtime = _Runtime()


def _init_kwargs(ray_init: dict[str, Any], n_slots: int) -> dict[str, Any]:
    """``ray.init`` arguments: the user's, plus sane defaults when starting a local instance."""
    kwargs = dict(ray_init)
    if kwargs.get("address") is not None or os.environ.get("RAY_ADDRESS"):
        return kwargs  # joining a cluster: its resources and code shipping are the user's choice
    kwargs.setdefault("num_cpus", max(2, n_slots))
    kwargs.setdefault("include_dashboard", False)
    # Actors must import poolbridge, helper modules and dotted paths exactly as this process does.
    runtime_env = dict(kwargs.get("runtime_env") or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    runtime_env["env_vars"] = env_vars
    kwargs["runtime_env"] = runtime_env
    return kwargs
