"""Child side of a resize: a worker hands its moving sessions out, or takes sessions in.

Run only in worker processes (and Ray actors), through two sessionless ops the router sends
(``_resize.py`` is the parent side):

``migrate_out [n_slots, refuse]``
    Every session this worker holds whose slot under ``n_slots`` is another one leaves: its refs and
    helper state are cloudpickled, one blob per session, and the session is dropped here. A session
    that cannot be pickled, or has a live stream (a suspended generator cannot be pickled), is
    *unmovable*: it is dropped too and reported with the reason — unless ``refuse`` is true and
    there is any, in which case nothing changes at all and the unmovable ones are reported.
    The worker's own slot count becomes ``n_slots``.
    Reply: ``[refused, [[session, new_slot, blob], ...], [[session, new_slot, reason], ...]]``.

``migrate_in [n_slots, [[session, blob, from_slot, from_generation], ...], [[session, reason], ...]]``
    Loads sessions (their refs keep their ids) and notes the sessions that lost their state, so
    their old refs fail saying why. Also sets the slot count (an empty call just does that).
    Reply: ``[[session, reason], ...]`` — sessions whose blob could not be loaded here.

How a moved ref stays valid: a ref carries the ``(slot, generation)`` of the worker that made it.
A session remembers every ``(slot, generation)`` its state lived in (its *homes*, moved with it),
and this worker accepts a ref of that session whose pair is one of them. A ref whose pair is not
the worker's own nor a home of its session is from a worker that is gone (``SessionLostError``).
"""

from __future__ import annotations

import itertools
import pickle
from typing import Any

from ._hashing import slot_for
from ._protocol import dumps_any, pack_plain, unpack_plain

OP_MIGRATE_OUT = "migrate_out"
OP_MIGRATE_IN = "migrate_in"
MIGRATE_OPS = frozenset({OP_MIGRATE_OUT, OP_MIGRATE_IN})

__all__ = ["MIGRATE_OPS", "OP_MIGRATE_IN", "OP_MIGRATE_OUT", "accepts", "forget", "lost_reason", "ops"]


def _homes(core: Any) -> dict[str, set[tuple[int, int]]]:
    homes: dict[str, set[tuple[int, int]]] | None = getattr(core, "_pb_homes", None)
    if homes is None:
        homes = core._pb_homes = {}
    return homes


def _lost(core: Any) -> dict[str, str]:
    lost: dict[str, str] | None = getattr(core, "_pb_lost", None)
    if lost is None:
        lost = core._pb_lost = {}
    return lost


def accepts(core: Any, session_id: str, slot: int, generation: int) -> bool:
    """Is a ref of ``session_id`` made by worker ``(slot, generation)`` valid in this worker?"""
    homes: dict[str, set[tuple[int, int]]] | None = getattr(core, "_pb_homes", None)
    return homes is not None and (slot, generation) in homes.get(session_id, ())


def lost_reason(core: Any, session_id: str) -> str | None:
    """Why a session's state was lost in a resize, if it was (for its old refs' error)."""
    lost: dict[str, str] | None = getattr(core, "_pb_lost", None)
    return lost.get(session_id) if lost else None


def forget(core: Any, session_id: str) -> None:
    """A session was closed here: its homes go with it (its old refs are then simply gone)."""
    homes = getattr(core, "_pb_homes", None)
    if homes:
        homes.pop(session_id, None)


def ops(core: Any) -> dict[str, Any]:
    """The two ops, bound to ``core``: ``handler(body) -> reply body``."""
    return {OP_MIGRATE_OUT: lambda body: _out(core, body), OP_MIGRATE_IN: lambda body: _in(core, body)}


def _unmovable(session: Any) -> str | None:
    if session.streams:
        return f"a live generator stream ({len(session.streams)} open) cannot move to another worker"
    return None


def _out(core: Any, body: bytes) -> bytes:
    n_slots, refuse = unpack_plain(body)
    homes = _homes(core)
    here = (core.slot, core.generation)
    moved: list[list[Any]] = []
    lost: list[list[Any]] = []
    for session_id, session in list(core._sessions.items()):
        target = slot_for(session_id, n_slots)
        if target == core.slot:
            continue
        reason = _unmovable(session)
        if reason is None:
            try:
                blob = dumps_any(
                    (session.refs, session.ctx.state, sorted(homes.get(session_id, set()) | {here}))
                )
            except Exception as exc:
                reason = f"its state could not be pickled to move it: {type(exc).__name__}: {exc}"[:500]
        if reason is None:
            moved.append([session_id, target, blob])
        else:
            lost.append([session_id, target, reason])
    if refuse and lost:
        return pack_plain([True, [], lost])
    for session_id, _target, _blob in moved:
        core._sessions.pop(session_id, None)  # its objects live on in the blob
        homes.pop(session_id, None)
    for session_id, _target, _reason in lost:
        core.drop_session(session_id)
        homes.pop(session_id, None)
    core.n_slots = n_slots
    return pack_plain([False, moved, lost])


def _in(core: Any, body: bytes) -> bytes:
    n_slots, moved, lost = unpack_plain(body)
    core.n_slots = n_slots
    homes = _homes(core)
    failed: list[list[Any]] = []
    top = 0
    for session_id, blob, _from_slot, _from_generation in moved:
        try:
            refs, state, old_homes = pickle.loads(blob)
        except Exception as exc:
            reason = f"its state could not be loaded in the new worker: {type(exc).__name__}: {exc}"[:500]
            failed.append([session_id, reason])
            _lost(core)[session_id] = reason
            continue
        core.adopt(session_id, refs, state)
        homes[session_id] = {tuple(h) for h in old_homes}
        _lost(core).pop(session_id, None)
        if refs:
            top = max(top, max(refs))
    for session_id, reason in lost:
        _lost(core)[session_id] = reason
    if top:
        # Ref ids are unique per worker; loaded ones keep theirs, so new ones start past them.
        following = next(core._ids)
        core._ids = itertools.count(max(following, top + 1))
    return pack_plain(failed)
