"""Parent side, Port server: sending the loop's requests to the workers — at once, in batches per
slot, or held while their slot restarts — in arrival order per slot.

:class:`PortSender` is the sending half of :class:`~poolbridge._server.Server` (which sets up the
state declared here and runs the loop that calls it):

* ``_send_outbox``: the plain requests of one read of the protocol input go to each slot with one
  ``Supervisor.send_many`` (one lock, one look at the slot, no write if the worker is busy:
  its replies bring the rest out), not a send each;
* ``_dispatch``: one request now (``lead=True``: the loop reads its reply), or held;
* ``_hold`` / ``_send_held``: requests for a slot that is restarting (or busy past its bound)
  queue in arrival order, and a restart-wait thread sends them (``lead=False``) once it is back.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import logging
import threading
import time
from typing import Any

from ._errors import CallTimeoutError
from ._portsinks import PortReply
from ._protocol import encode_frame

log = logging.getLogger("poolbridge.server")

__all__ = ["PortSender"]


class PortSender:
    """The sending half of the Port server (see the module docstring)."""

    pool: Any
    router: Any
    _held: dict[int, list[PortReply]]
    _held_lock: threading.Lock
    _restart_waits: concurrent.futures.ThreadPoolExecutor
    _watched: dict[int, Any]
    _outbox: list[PortReply] | None

    def _watch(self, ch: Any) -> None:
        raise NotImplementedError

    def _dispatch(self, slot: int, reply: PortReply) -> None:
        """Send one worker request from the loop; its reply is read by the loop.

        Requests reach a slot in the order they arrived: while any wait for the slot (it is
        restarting, or was busy), later ones queue behind them instead of overtaking.
        """
        router = self.router
        # A slot is added to _held by this thread, or by the monitor re-holding a dead worker's
        # unstarted requests — only while that channel is dead, when ready() is False anyway.
        if slot not in self._held and router.ready(slot):
            # block=False: the loop never waits on one busy slot (that would stall every other
            # slot's requests behind it); past max_in_flight the request gets `busy` instead.
            # deadline=now: if the worker died since ready(), do not wait for its restart here.
            lead = self.pool.backend == "process"  # lead=True: the loop reads the reply
            try:
                ch = router.send(slot, reply.rid, reply.data, reply, lead=lead, block=False, deadline=time.monotonic())
            except CallTimeoutError:
                pass  # nothing was sent: hold it below, like any request for a restarting slot
            except BaseException as exc:  # busy, closed, or the worker was found gone
                reply.fail(exc, sent=False)
                return
            else:
                self._sent(reply, ch)
                if lead:
                    self._watch_new(ch)
                return
        self._hold(slot, reply)

    def _send_outbox(self) -> None:
        """Send the requests the loop read in one go: per slot, one ``send_many`` (one lock, one
        look at the slot) instead of a send each; a slot that cannot take them so (restarting,
        busy, requests held for it, a resize) gets them one by one through :meth:`_dispatch`."""
        outbox = self._outbox
        if not outbox:
            return
        self._outbox = []
        by_slot: dict[int, list[PortReply]] = {}
        for reply in outbox:
            group = by_slot.get(reply.slot)
            if group is None:
                by_slot[reply.slot] = [reply]
            else:
                group.append(reply)
        router = self.router
        for slot, replies in by_slot.items():
            ch, sent = None, 0
            try:
                if slot not in self._held:
                    ch, sent = router.send_many(slot, [(r.rid, encode_frame(r.data), r) for r in replies])
                if sent and ch is not None:
                    for reply in replies[:sent]:
                        self._sent(reply, ch)
                    self._watch_new(ch)
            except Exception as exc:  # never leave a request unanswered
                log.exception("sending %d requests to slot %d failed in the server", len(replies) - sent, slot)
                for reply in replies[sent:]:
                    reply.fail(exc, sent=False)
                continue
            for reply in replies[sent:]:
                self._dispatch(slot, reply)

    def _watch_new(self, ch: Any) -> None:
        """The loop reads ``ch``'s replies: watch it unless it already does (a new channel after a
        restart, or one another reader had taken over, is watched again)."""
        if self._watched.get(ch.read_fd) is not ch:
            self._watch(ch)

    def _sent(self, reply: PortReply, ch: Any) -> None:
        reply.channel = ch
        if reply.deadline is not None:
            self.pool._deadlines.add(reply.deadline, ch, reply.rid, reply, reply.slot,
                                     f"request {reply.req_id!r} did not finish within its timeout", reply.restart)

    def _hold(self, slot: int, reply: PortReply) -> None:
        """Queue ``reply`` for ``slot`` (in arrival order); a restart-wait thread sends the queue."""
        with self._held_lock:
            reply.held = True
            held = self._held.get(slot)
            if held is not None:
                bisect.insort(held, reply, key=lambda r: r.order)
                return
            self._held[slot] = [reply]
        try:
            self._restart_waits.submit(self._send_held, slot)
        except RuntimeError:  # shutting down: close() answers what is held
            pass

    def _send_held(self, key: int) -> None:
        """Send a slot's held requests in arrival order, then let the loop send directly again.
        ``key``: the slot, or ``-1 - slot`` for requests of sessions moving to it (_portresize.py)."""
        router = self.router
        slot = key if key >= 0 else -1 - key
        while True:
            with self._held_lock:
                held = self._held.get(key)
                if not held:
                    self._held.pop(key, None)
                    return
                head = held[0]
            failed: BaseException | None = None
            try:
                # Wait (bounded) for the slot before taking the head: a dead worker's unstarted
                # requests are re-held (in order, ahead of later ones) before its restart ends.
                if key >= 0:  # (a moving session's request waits for its move in send)
                    router.channel(slot, head.deadline)
            except BaseException as exc:  # its timeout ran out, the pool closed, the slot did not come back
                failed = exc
            with self._held_lock:
                held = self._held.get(key)
                if not held or held[0] is not head:
                    continue  # cancelled meanwhile, or an older one was re-held ahead of it
                held.pop(0)
                head.held = False
            if failed is not None:
                head.fail(failed, sent=False, retry=False)
                continue
            try:
                # lead=False: this thread does not read; the channel's background reader does.
                self._sent(head, router.send(slot, head.rid, head.data, head, block=False, deadline=head.deadline))
            except BaseException as exc:
                head.fail(exc, sent=False)
