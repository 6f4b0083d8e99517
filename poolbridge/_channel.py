"""Parent side: the channel contract — where the reply to one request goes (:class:`Sink`) and a
channel's table of unanswered requests (:class:`Pending`), the wait for room under the in-flight
bound (:func:`wait_for_room`) and :class:`Retired`. Shared by every channel (the process channel in
_pipes.py, the Ray channel in backends/ray.py) and by the faces that make sinks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ._errors import CallTimeoutError, PoolBusyError

__all__ = ["Channel", "Late", "Pending", "Retired", "Sink", "wait_for_room"]


class Sink:
    """Where one request's reply goes. Called by whichever thread reads it, or on crash/close."""

    __slots__ = ()
    #: Sinks that can be cancelled get ``seq`` (the request's frame number on its channel) set.
    cancellable = False

    def deliver(self, status: int, body: Any) -> None:
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        raise NotImplementedError

    def orphaned(self, exc: BaseException) -> None:
        """In a forked child: this request's reply goes to the parent. A sink that someone in the
        child could still wait on (a future) fails with ``exc``; must not block (see _forked)."""


class Late(Sink):
    """The sink of a request its caller gave up on (timeout, cancelled await, interrupt).

    Its reply still comes; ``release(status, body)`` turns it into whatever it created (a ref, a
    stream) and drops that, so each handle releases itself in the worker as a dropped one does.
    """

    __slots__ = ("release",)

    def __init__(self, release: Callable[[int, Any], Any]) -> None:
        self.release = release

    def deliver(self, status: int, body: Any) -> None:
        try:
            self.release(status, body)
        except Exception:  # noqa: S110 - an error reply, or nothing to release: nobody is waiting
            pass

    def fail(self, exc: BaseException) -> None:
        pass


class Pending(dict[int, Sink]):
    """A channel's unanswered requests: req id -> sink.

    Whoever ``pop``s a request's entry first owns it: the reader delivering its reply, a crash
    failing it, a caller timing out. A caller that gives up on a request the worker may still run
    calls :meth:`abandon` instead, which swaps its sink for a :class:`Late` one. The swap and a
    reader's second look for a reply it found no sink for (:meth:`unmatched`) hold one lock, so a
    reply that arrives mid-swap reaches the late sink instead of being dropped. Hits never lock.
    """

    __slots__ = ("_swap",)

    def __init__(self) -> None:
        super().__init__()
        self._swap = threading.Lock()

    def abandon(self, req_id: int, late: Late) -> Sink | None:
        """Give up on ``req_id``: its sink if it was still unanswered (None: the reply or a failure
        got there first)."""
        with self._swap:
            sink = self.pop(req_id, None)
            if sink is not None:
                self[req_id] = late
            return sink

    def unmatched(self, req_id: Any) -> Sink | None:
        """A reader found no sink for ``req_id``: look again, after any swap in progress."""
        with self._swap:
            return self.pop(req_id, None)


class Retired(Exception):
    """Raised by a channel's ``send`` when the frame reached no worker (recycling, dead, or a closed
    pipe): the supervisor sends it to the slot's next channel instead of failing it."""


def wait_for_room(ch: Any, cond: threading.Condition, block: bool, deadline: float | None) -> None:
    """Backpressure, for every channel: wait until ``ch.pending`` is below ``ch.max_in_flight`` (or
    the channel is dead). ``cond`` is notified whenever replies settle; ``block=False`` raises
    :class:`PoolBusyError` at once, and ``deadline`` (monotonic) ends the wait with
    :class:`CallTimeoutError`.

    Approximate by design: several threads may pass the check at once, so the bound can be exceeded
    by the number of concurrently sending threads, never by more.
    """
    if not block:
        raise PoolBusyError(f"slot {ch.slot} has {len(ch.pending)} calls in flight (max {ch.max_in_flight})")
    with cond:
        ch._space_waiters += 1
        try:
            while len(ch.pending) >= ch.max_in_flight and not ch.dead:
                wait = 1.0
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise CallTimeoutError(
                            f"slot {ch.slot} stayed at its in-flight bound until the call's timeout ran out"
                        )
                cond.wait(wait)
        finally:
            ch._space_waiters -= 1


class Channel(Protocol):
    """What the supervisor and the call engine need of one generation of one slot. Implemented by
    the process channel (_pipes.py) and the Ray channel (backends/ray.py); mypy checks both.

    ``send`` registers the sink in ``pending`` and sends the frame, or raises :class:`Retired`
    when the frame reached no worker (the supervisor then sends it to the next generation),
    :class:`PoolBusyError` / :class:`CallTimeoutError` from :func:`wait_for_room`. Replies and
    failures reach sinks through ``pending`` only (see :class:`Pending`). After the worker is gone
    the supervisor calls ``drain_and_close``, fails what is left in ``pending`` and sets ``finished``.
    """

    slot: int
    generation: int
    pending: Pending
    dead: bool
    retiring: bool
    exitcode: int | None
    max_in_flight: int
    finished: threading.Event

    @property
    def pid(self) -> int: ...

    def send(self, req_id: int, data: bytes, sink: Sink, block: bool = True, deadline: float | None = None) -> None:
        """Send one framed request; its reply goes to ``sink``."""

    def await_reply(self, req_id: int, waiter: Any, timeout: float | None) -> bool:
        """Block until ``waiter`` has its reply (reading it, where the channel lets callers read).
        False when ``timeout`` passed first."""

    def wake_reader(self) -> None:
        """A reply nobody blocks for is owed: make sure something reads it."""

    def try_cancel(self, req_id: int, seq: int) -> bool:
        """Cancel a sent request the worker has not started (``seq``: its frame number on this
        channel, where the channel numbers them). True: it will never run, and its entry left
        ``pending``; False: it may have started, its reply (or failure) still comes."""

    def drain_and_close(self) -> None:
        """The worker is gone: deliver what it answered, then release the transport."""

    def close_input(self) -> None:
        """No more requests: the worker finishes what it has, then exits."""

    def kill(self) -> None: ...

    def wait_exit(self, timeout: float) -> int | None: ...
