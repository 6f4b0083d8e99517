"""The Port server's ``resize`` op: :meth:`Pool.resize` off the loop, its record as the reply, and a
``resized`` notice (a frame without an id) to the client when the slot count changed.

The notice is written before the reply, so a client that has the reply has the new count already;
clients that do not know notices ignore it (every frame without an id that is not a reply is
ignored by a protocol-2 client). See docs/protocol.md, "resize", and docs/hashing.md.
"""

from __future__ import annotations

import logging
from typing import Any

from ._errors import BadRequestError, PoolbridgeError
from ._hashing import slot_for
from ._portwire import exc_reply, ok_reply

log = logging.getLogger("poolbridge.server")

__all__ = ["move_key", "run_resize"]


def run_resize(server: Any, req: dict[Any, Any], req_id: Any) -> None:
    try:
        workers = req.get("workers")
        if type(workers) is not int or workers < 1:
            raise BadRequestError(f"'resize' needs 'workers', a positive integer, got {workers!r:.40}")
        on_unmovable = req.get("on_unmovable", "lose")
        if on_unmovable not in ("lose", "refuse"):
            raise BadRequestError(f"'on_unmovable' must be \"lose\" or \"refuse\", got {on_unmovable!r:.40}")
        record = server.pool.resize(workers, on_unmovable=on_unmovable)
        if record.workers != record.old:
            server.out.write(resized_notice(record.old, record.workers, server.pool.pids()))
        server.out.write(ok_reply(req_id, {
            "workers": record.workers,
            "old": record.old,
            "moved": list(record.moved),
            "lost": dict(record.lost),
            "refused": record.refused,
            "failed_slots": [{"slot": slot, "error": error} for slot, error in sorted(record.failed_slots.items())],
            "seconds": record.seconds,
        }))
    except Exception as exc:
        if not isinstance(exc, PoolbridgeError | ValueError):
            log.exception("resize failed in the server")
        server.out.write(exc_reply(req_id, exc))


def resized_notice(old: int, slots: int, worker_pids: list[int]) -> dict[str, Any]:
    """``{"notice": "resized", "slots": n, "old_slots": m, "worker_pids": [...]}`` (no id)."""
    return {"notice": "resized", "slots": slots, "old_slots": old, "worker_pids": worker_pids}


def move_key(router: Any, held: dict[int, Any], slot: int, session: str) -> int | None:
    """Where the Port server holds a request while sessions move: ``-1 - new slot`` for a session
    being moved (its own queue, so other sessions of its old slot are not held behind it), or behind
    such a queue still draining for ``slot`` (so a later request never overtakes); else None."""
    mover = router.mover
    if mover is not None and mover.moving(session):
        return -1 - slot_for(session, mover.new)
    key = -1 - slot
    return key if key in held else None
