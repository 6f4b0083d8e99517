"""Parent side of a resize: grow or shrink the slot count while the pool serves.

::

    resize(n) ── mover installed (old n, new n) ── sends of moving sessions wait in Supervisor.send
       │ grow: start workers for the new slots
       ├─▶ migrate_out [n, refuse] ──▶ every source worker: moving sessions pickled out, dropped
       │        (a refusal anywhere: the others' sessions are loaded back; nothing changed)
       ├─▶ migrate_in [n, sessions, lost] ──▶ every slot below n: sessions loaded, ids kept
       ├─ router.n_slots = n; shrink: the removed slots' workers stop (they hold nothing now)
       └─ mover removed: the waiting sends go to the session's new slot, in the order they came

*Which sessions move*: those whose ``jump_hash`` slot differs between the two counts. Growing, a
session either stays or goes to a new slot; shrinking, only the removed slots' sessions move.
Every other session is never touched nor held: a send is held only if its session moves (a worker
still runs one request at a time, so a call can queue behind its worker's migrate_out/in).

*Sends*: once any resize has happened, ``Supervisor.send`` reads each request's session from its
frame and routes it by the current count (:func:`reroute`), so a slot computed before a resize is
never used after it. Each send notes the resize epoch it routes under until its frame is queued
(``Supervisor.senders``); a resize waits for the sends of earlier epochs before it writes
``migrate_out`` (:func:`_quiesce`), so such a frame reaches the old worker first and its
session's state moves with its effect. A send held for its moving session is not waited for.

*Refs*: see _migrate.py — a session carries the ``(slot, generation)`` pairs its state lived in, and
the worker that holds it accepts its refs of those pairs. Sessions that lost their state (unpicklable,
a live stream, a worker that crashed mid-move) are listed in the :class:`ResizeRecord` with the
reason; their refs raise :class:`SessionLostError` saying it.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ._calls import Waiter
from ._errors import CallTimeoutError, PoolbridgeError
from ._hashing import slot_for
from ._migrate import OP_MIGRATE_IN, OP_MIGRATE_OUT
from ._protocol import OK, pack_plain, unpack_plain

__all__ = ["ResizeRecord", "reroute", "resize"]

#: How long a moving session's request waits for its move at most (its own timeout ends it sooner).
MOVE_WAIT = 120.0


@dataclass(frozen=True)
class ResizeRecord:
    """What a :meth:`Pool.resize` did.

    ``workers``: the slot count now (``new``, or ``old`` if refused). ``moved``: sessions whose state
    went to another worker. ``lost``: session -> why its state could not move (its refs raise
    :class:`SessionLostError` with that reason). ``refused``: ``on_unmovable="refuse"`` found
    unmovable sessions (listed in ``lost``, which then lost nothing) and nothing changed.
    ``failed_slots``: slot -> error, for a worker that crashed or hung during the move (its own
    sessions are lost as in any crash). ``seconds``: how long the resize took.
    """

    old: int
    new: int
    workers: int
    moved: tuple[str, ...] = ()
    lost: dict[str, str] = field(default_factory=dict)
    refused: bool = False
    failed_slots: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0


class Mover:
    """A resize in progress: which sessions move, and the event their senders wait on."""

    __slots__ = ("done", "new", "old")

    def __init__(self, old: int, new: int) -> None:
        self.old = old
        self.new = new
        self.done = threading.Event()

    def moving(self, session_id: str) -> bool:
        return slot_for(session_id, self.old) != slot_for(session_id, self.new)


def head_session(body: bytes) -> Any:
    """The session of a request frame body ``[id, op, session, ...]`` without decoding the rest."""
    unpacker = msgpack.Unpacker(io.BytesIO(body), raw=False, read_size=256)
    unpacker.read_array_header()
    unpacker.skip()
    unpacker.skip()
    return unpacker.unpack()


def reroute(router: Any, slot: int, body: bytes, deadline: float | None) -> int:
    """The slot a request goes to once any resize has happened (its session's, by the current
    count); waits while its session is moving. Sessionless requests keep ``slot``."""
    session = head_session(body)
    if not isinstance(session, str):
        return slot
    while True:
        mover = router.mover
        if mover is None or not mover.moving(session):
            return slot_for(session, router.n_slots)
        limit = MOVE_WAIT if deadline is None else max(0.0, deadline - time.monotonic())
        tid = threading.get_ident()
        router.senders.pop(tid, None)  # the resize must not wait for this send: it waits for the resize
        if not mover.done.wait(limit):
            raise CallTimeoutError(f"session {session!r} was still moving in a resize when the wait ran out")
        router.senders[tid] = router.route_epoch  # then look again: another resize may have begun


def _quiesce(router: Any, epoch: int, timeout: float) -> None:
    """Wait (bounded) until every send that began before resize ``epoch`` has queued its frame."""
    deadline = time.monotonic() + timeout
    while any(e < epoch for e in list(router.senders.values())) and time.monotonic() < deadline:
        time.sleep(0.0005)


def _ask(router: Any, requests: dict[int, list[Any]], op: str, timeout: float) -> dict[int, Any]:
    """Send ``op`` to each slot, wait (bounded) for every reply: slot -> decoded body or exception.
    A worker that does not answer in time is killed (its sessions fail as in any crash)."""
    asked: dict[int, tuple[Any, int, Waiter]] = {}
    out: dict[int, Any] = {}
    for slot, fields in requests.items():
        req_id = router.next_id()
        waiter = Waiter()
        try:
            ch = router.send(slot, req_id, pack_plain([req_id, op, None, pack_plain(fields)]), waiter)
        except PoolbridgeError as exc:
            out[slot] = exc
            continue
        asked[slot] = (ch, req_id, waiter)
    deadline = time.monotonic() + timeout
    for slot, (ch, req_id, waiter) in asked.items():
        if not waiter.wait(max(0.0, deadline - time.monotonic())):
            ch.pending.pop(req_id, None)
            router.kill_slot(slot)
            out[slot] = CallTimeoutError(f"slot {slot} did not answer {op} within {timeout}s; it was restarted")
        elif waiter.status == OK:
            out[slot] = unpack_plain(waiter.body)
        elif isinstance(waiter.body, BaseException):
            out[slot] = waiter.body
        else:
            out[slot] = PoolbridgeError(f"slot {slot}: {op} failed: {unpack_plain(waiter.body)[2]}")
    return out


def resize(router: Any, n: int, *, on_unmovable: str = "lose", timeout: float = 60.0) -> ResizeRecord:
    """Grow or shrink ``router`` to ``n`` slots (see the module docstring)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"workers must be a positive integer, got {n!r}")
    if on_unmovable not in ("lose", "refuse"):
        raise ValueError(f"on_unmovable must be 'lose' or 'refuse', got {on_unmovable!r}")
    with router.resize_lock:
        if router.closing:
            raise router.closed_error()
        old = router.n_slots
        if n == old:
            return ResizeRecord(old, n, n)
        started = time.monotonic()
        mover = Mover(old, n)
        router.mover = mover  # first: a send that sees the new epoch sees the mover
        router.route_epoch += 1
        try:
            return _move(router, old, n, on_unmovable == "refuse", timeout, started)
        finally:
            router.mover = None
            mover.done.set()


def _move(router: Any, old: int, n: int, refuse: bool, timeout: float, started: float) -> ResizeRecord:
    sources = range(old) if n > old else range(n, old)
    _quiesce(router, router.route_epoch, timeout)
    if n > old:
        _add_slots(router, n)  # raises (after stopping what it started) if a worker cannot start
    outs = _ask(router, {slot: [n, refuse] for slot in sources}, OP_MIGRATE_OUT, timeout)
    failed = {slot: str(r) for slot, r in outs.items() if isinstance(r, BaseException)}
    replies = {slot: r for slot, r in outs.items() if not isinstance(r, BaseException)}
    generation = {slot: router.generation(slot) for slot in sources}
    if refuse and any(r[0] for r in replies.values()):
        unmovable = {sid: reason for r in replies.values() for sid, _t, reason in r[2]}
        back = {
            slot: [old, [[sid, blob, slot, generation[slot]] for sid, _t, blob in r[1]], []]
            for slot, r in replies.items()
            if not r[0] and r[1]
        }
        _ask(router, back, OP_MIGRATE_IN, timeout)  # the sessions that left go home again
        _ask(router, {slot: [old, [], []] for slot in sources if slot not in back}, OP_MIGRATE_IN, timeout)
        if n > old:
            _remove_slots(router, old, timeout)
        return ResizeRecord(old, n, old, lost=unmovable, refused=True, seconds=time.monotonic() - started)
    incoming: dict[int, list[Any]] = {slot: [n, [], []] for slot in range(n)}
    lost: dict[str, str] = {}
    for slot, (_refused, moved, unmovable) in replies.items():
        for sid, target, blob in moved:
            incoming[target][1].append([sid, blob, slot, generation[slot]])
        for sid, target, reason in unmovable:
            incoming[target][2].append([sid, reason])
            lost[sid] = reason
    ins = _ask(router, incoming, OP_MIGRATE_IN, timeout)
    started_as = {slot: router.generation(slot) for slot in range(n) if slot not in failed}
    moved_ids: list[str] = []
    for slot, result in ins.items():
        sessions = [entry[0] for entry in incoming[slot][1]]
        if isinstance(result, BaseException):
            failed[slot] = str(result)
            for sid in sessions:
                lost[sid] = f"the new worker (slot {slot}) failed while taking it in: {result}"
            continue
        not_loaded = dict(result)
        lost.update(not_loaded)
        moved_ids.extend(sid for sid in sessions if sid not in not_loaded)
    router.n_slots = n
    if n < old:
        _remove_slots(router, n, timeout)
    # A worker restarted during the move was started with the old count: tell it the new one.
    restarted = [slot for slot in range(n) if slot in failed or router.generation(slot) != started_as.get(slot)]
    if restarted:
        _ask(router, {slot: [n, [], []] for slot in restarted}, OP_MIGRATE_IN, timeout)
    return ResizeRecord(
        old, n, n, tuple(moved_ids), lost, False, failed, seconds=time.monotonic() - started
    )


def _add_slots(router: Any, n: int) -> None:
    """Start workers for slots ``router.n_slots .. n-1`` (not routed to until the count changes).
    A slot number used before starts at the generation after its last one, so no ref of an
    earlier worker in that slot can name an object of the new one."""
    slots = router._slots
    make = type(slots[0])
    retired = router.retired_generations
    try:
        for index in range(router.n_slots, n):
            if index == len(slots):
                slots.append(make(index))
            channel = router._factory(router, index, retired.get(index, -1) + 1)
            with slots[index].cond:
                slots[index].channel = channel
                slots[index].cond.notify_all()
    except BaseException:
        _remove_slots(router, router.n_slots, 5.0)
        raise


def _remove_slots(router: Any, n: int, timeout: float) -> None:
    """Stop the workers of slots ``n`` and above (they hold no session now): each leaves like a
    recycled worker — input closed, exit awaited (bounded), never restarted."""
    stopping = []
    for s in router._slots[n:]:
        with s.cond:
            ch, s.channel = s.channel, None  # from now on a restart of it does nothing
            s.cond.notify_all()
        if ch is not None:
            router.retired_generations[s.index] = ch.generation
            ch.retiring = True
            ch.close_input()
            stopping.append(ch)
    deadline = time.monotonic() + timeout
    for ch in stopping:
        if ch.wait_exit(max(0.0, deadline - time.monotonic())) is None:
            ch.kill()
            ch.wait_exit(1.0)
