"""``@poolbridge.helper``: functions callable by name in every worker, optionally with session state.

A helper module is imported in each worker (``Pool(helpers=["myapp.pool_helpers"])``); importing it
runs the decorators, which fill this process's registry. The registry is per process, so a helper
registered in the router is not visible to workers unless its module is listed in ``helpers``.

A helper that needs per-session state asks for it with ``context=True`` and receives a
:class:`SessionContext` as its first argument::

    @poolbridge.helper(context=True)
    def remember(ctx, key, value):
        ctx.state[key] = value          # lives in this session's worker until close_session/TTL
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

__all__ = ["SessionContext", "current_session", "helper", "registry"]

F = TypeVar("F", bound=Callable[..., Any])


class SessionContext:
    """What a worker knows about the session of the operation it is running."""

    __slots__ = ("generation", "session_id", "slot", "state")

    def __init__(self, session_id: str, slot: int, generation: int) -> None:
        self.session_id = session_id
        self.slot = slot
        self.generation = generation
        #: Free-form per-session state; dropped with the session (close_session, idle TTL, restart).
        self.state: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<SessionContext {self.session_id!r} slot={self.slot} generation={self.generation}>"


class _Helper:
    __slots__ = ("context", "fn")

    def __init__(self, fn: Callable[..., Any], context: bool) -> None:
        self.fn = fn
        self.context = context


_registry: dict[str, _Helper] = {}
_current: list[SessionContext | None] = [None]  # set by the worker around each operation


def registry() -> dict[str, _Helper]:
    return _registry


def current_session() -> SessionContext | None:
    """Inside a worker, the :class:`SessionContext` of the running operation; ``None`` elsewhere."""
    return _current[0]


@overload
def helper(fn: F, /) -> F: ...
@overload
def helper(name: str | None = None, /, *, context: bool = False) -> Callable[[F], F]: ...


def helper(name: Any = None, /, *, context: bool = False) -> Any:
    """Register a function as a helper, under its ``__name__`` or the name given.

    ``@helper``, ``@helper("other_name")`` and ``@helper(context=True)`` are all accepted.
    """

    def register(fn: F, as_name: str | None) -> F:
        key = as_name or fn.__name__
        existing = _registry.get(key)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"helper name {key!r} is already registered by {existing.fn!r}")
        _registry[key] = _Helper(fn, context)
        return fn

    if callable(name):
        return register(name, None)
    return lambda fn: register(fn, name)
