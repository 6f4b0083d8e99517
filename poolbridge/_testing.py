"""Test hooks: the one place tests look inside a pool (its supervisor, channels, generations).

Not public API. Tests import this module instead of reaching into private attributes, so a change
of the layout changes these few functions, not every test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._api import _Api
    from ._shm_send import Lifter
    from ._supervisor import Supervisor

__all__ = [
    "channel",
    "channels",
    "generation",
    "idle",
    "in_flight",
    "kill_worker",
    "pipe_fds",
    "replace_channel_factory",
    "shm",
    "shm_idle",
    "shm_prefix",
    "supervisor",
    "template_fd",
    "watches_by_pidfd",
]

#: ``channel_factory(supervisor, slot, generation) -> channel``, as ``Supervisor`` takes it.
Factory = Callable[[Any, int, int], Any]


def supervisor(pool: _Api) -> Supervisor:
    """The supervisor of a pool (or of the pool behind a view or an ``AsyncPool``)."""
    api: Any = getattr(pool, "_api", pool)
    return api._pool._supervisor  # type: ignore[no-any-return]


def replace_channel_factory(target: Any, wrap: Callable[[Factory], Factory]) -> None:
    """Make new channels (restarts) with ``wrap(current_factory)``: tests hold or fail restarts with
    it. ``target``: a pool (view, ``AsyncPool``) or a ``Supervisor`` (the Port server's)."""
    sup: Any = target if hasattr(target, "_factory") else supervisor(target)
    sup._factory = wrap(sup._factory)


def watches_by_pidfd(pool: _Api) -> bool:
    """The exit monitor waits on pidfds (not the polling fallback)."""
    return bool(supervisor(pool).monitor._pidfd)


def channels(pool: _Api) -> list[Any]:
    """The current channel of every slot, by slot (None while a slot is restarting)."""
    return supervisor(pool).channels()


def channel(pool: _Api, slot: int) -> Any:
    return channels(pool)[slot]


def generation(pool: _Api, slot: int) -> int:
    return supervisor(pool).generation(slot)


def in_flight(pool: _Api, slot: int) -> int:
    """Requests of ``slot`` sent and not yet answered (its channel's pending table)."""
    ch = channel(pool, slot)
    return 0 if ch is None else len(ch.pending)


def idle(pool: _Api) -> bool:
    """No slot has a request in flight."""
    return all(not ch.pending for ch in channels(pool) if ch is not None)


def kill_worker(pool: _Api, slot: int) -> None:
    """Kill ``slot``'s worker as a crash would (its calls fail, the slot restarts)."""
    supervisor(pool).kill_slot(slot)


def shm(pool: _Api) -> Lifter | None:
    """The pool's shared-memory sender (None: large values go inline, e.g. on Ray)."""
    api: Any = getattr(pool, "_api", pool)
    return api._pool._shm  # type: ignore[no-any-return]


def shm_idle(pool: _Api) -> set[str]:
    """Names of the segments idle in the sender's warm cache (reused, not leaked)."""
    lifter = shm(pool)
    return set() if lifter is None else set(lifter._idle)


def pipe_fds(pool: _Api, slot: int) -> tuple[int, int]:
    """A process channel's pipe ends in this process: (requests written, replies read)."""
    ch = channel(pool, slot)
    return ch._write_fd, ch._read_fd


def template_fd(pool: _Api) -> int | None:
    """This process's end of the worker template's socket (None: no template)."""
    template = supervisor(pool).spawner._template
    return None if template is None else template._sock.fileno()


def shm_prefix(pool: _Api) -> str | None:
    """The name prefix of every shared-memory segment of the pool (None without shared memory)."""
    lifter = shm(pool)
    return None if lifter is None else lifter.prefix
