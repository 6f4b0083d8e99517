"""Child side: what a worker runs before serving — the pool's ``initializer`` once per process, and
the ``session_init`` of each session the first time that session touches this worker.

Both travel in the worker's start options as a *spec*: a dotted path (``"myapp.load_model"``) or
cloudpickle bytes of a callable (embedded mode). The initializer's spec is cloudpickle bytes of
``(fn_or_path, initargs)``. See :func:`encode_initializer` for the router side.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

from . import _errors
from ._paths import resolve_path
from ._protocol import dumps_any

__all__ = ["MAX_SPEC_BYTES", "SESSION_INIT_KEY", "Warmup", "encode_initializer", "encode_session_init"]

log = logging.getLogger("poolbridge.worker")

#: The key of ``SessionContext.state`` under which a session's ``session_init`` result is kept.
SESSION_INIT_KEY = "session_init"
#: Bound on a pickled initializer (with its arguments): the specs travel in a worker's start
#: options, which reach the template process in one 64 KiB message (_worker_template.py). Bigger
#: state belongs in a module the initializer imports, named by dotted path.
MAX_SPEC_BYTES = 32 * 1024


# -- router side: building the specs ----------------------------------------------------------


def encode_initializer(fn: Any, initargs: tuple[Any, ...] | list[Any]) -> bytes | None:
    if fn is None:
        if initargs:
            raise ValueError("initargs given without an initializer")
        return None
    if not (isinstance(fn, str) or callable(fn)):
        raise TypeError(f"initializer must be a callable or a dotted path, not {type(fn).__name__}")
    return _bounded(dumps_any((fn, tuple(initargs))), "initializer (with its initargs)")


def encode_session_init(fn: Any) -> str | bytes | None:
    if fn is None or isinstance(fn, str):
        return fn
    if not callable(fn):
        raise TypeError(f"session_init must be a callable or a dotted path, not {type(fn).__name__}")
    return _bounded(dumps_any(fn), "session_init")


def _bounded(spec: bytes, what: str) -> bytes:
    if len(spec) > MAX_SPEC_BYTES:
        raise ValueError(
            f"the pickled {what} is {len(spec):,} bytes, over {MAX_SPEC_BYTES:,}: pass a dotted path "
            "to a module-level function, and load big data inside it"
        )
    return spec


# -- child side ---------------------------------------------------------------------------------


def _resolve(fn: Any) -> Any:
    if isinstance(fn, str):
        return resolve_path(fn)
    return fn


class Warmup:
    """The per-process and per-session initialisation of one worker."""

    __slots__ = ("error", "session_init")

    def __init__(self, slot: int, initializer: bytes | None, session_init: str | bytes | None) -> None:
        #: Set when the initializer failed: every request of this worker then fails with it, as
        #: ``concurrent.futures`` fails the jobs of a pool whose initializer raised.
        self.error: BaseException | None = None
        self.session_init: Any = None
        try:
            if session_init is not None:
                # cloudpickle's output is plain pickle (it imports what it needs): no cloudpickle here
                spec = pickle.loads(session_init) if isinstance(session_init, bytes) else session_init
                self.session_init = _resolve(spec)
            if initializer is not None:
                fn, initargs = pickle.loads(initializer)
                _resolve(fn)(*initargs)
        except Exception as exc:
            log.exception("slot %d: the worker initializer failed", slot)
            error = _errors.WorkerCrashedError(f"the initializer of worker slot {slot} failed: {exc!r}", slot=slot)
            error.__cause__ = exc
            self.error = error

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def init_session(self, session_id: str, state: dict[str, Any]) -> None:
        """Run ``session_init(session_id)`` and keep its result in the session's state."""
        if self.session_init is not None:
            state[SESSION_INIT_KEY] = self.session_init(session_id)
