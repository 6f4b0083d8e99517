"""Test hooks: the one place tests look inside a pool (its supervisor, channels, generations).

Not public API. Tests import this module instead of reaching into private attributes, so a change
of the layout changes these few functions, not every test.
"""

from __future__ import annotations

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
    "shm",
    "shm_prefix",
    "supervisor",
]


def supervisor(pool: _Api) -> Supervisor:
    """The supervisor of a pool (or of the pool behind a view or an ``AsyncPool``)."""
    api: Any = getattr(pool, "_api", pool)
    return api._pool._supervisor  # type: ignore[no-any-return]


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


def shm_prefix(pool: _Api) -> str | None:
    """The name prefix of every shared-memory segment of the pool (None without shared memory)."""
    lifter = shm(pool)
    return None if lifter is None else lifter.prefix
