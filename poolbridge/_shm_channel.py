"""Parent side, one worker channel: which shared-memory segments its requests and replies hold,
and who gets each back (the rules are in _shm.py).

A request frame whose value has segments lists their names as a fifth element (see
_protocol.pack_request); a sixth hands the worker back result segments this process has finished
reading. A reply that has segments is ``[id, OK_SHM, [body, result names, held argument names]]``.
:class:`ChannelSegments` is the channel's ledger of both: the channel calls it when it queues a
frame, reads a reply, cancels a request and finds its worker gone.
"""

from __future__ import annotations

import collections
from typing import Any

from . import _shm
from ._protocol import OK, OK_SHM, encode_frame, pack_plain, unpack_plain

__all__ = ["ChannelSegments", "release_unsent", "segment_names"]

_NONE_HELD: list[str] = []
_WITH_SEGMENTS = 0x95  # a request frame's first body byte when it is a 5-element array (pack_request)
_WITH_RETURNED = 0x96  # ... a 6-element one: segment names, then result segments handed back
_SMALL = 4096  # only frames this small carry returned names (re-encoding them is cheap)


def segment_names(frame: bytes) -> list[str]:
    """The segment names a request frame (header included) lists; empty when it lists none."""
    if frame[4] < _WITH_SEGMENTS:
        return _NONE_HELD
    names: list[str] = unpack_plain(memoryview(frame)[4:])[4]
    return names


def release_unsent(frame: bytes, lifter: Any) -> None:
    """A request frame that reached no worker: its segments go back (nobody else will free them)."""
    for name in segment_names(frame):
        if lifter is not None:
            lifter.recycle(name)
        else:
            _shm.unlink(name)


class ChannelSegments:
    """The segments in flight on one channel (see the module docstring)."""

    __slots__ = ("_prefix", "_returned", "_supervisor", "outbound")

    def __init__(self, router: Any, slot: int, generation: int) -> None:
        shm = router.worker_options.get("shm")
        self._prefix = _shm.worker_prefix(shm["prefix"], slot, generation) if shm else None
        self._supervisor = router  # its .lifter, the pool's, is set after the first channels are made
        # Argument segments of requests whose replies have not been read, by request id. While
        # any is here, replies are still owed that hold segments: the channel's readers read them
        # even for requests given up (they test this dict on every reply).
        self.outbound: dict[int, list[str]] = {}
        # Result segments this process has finished reading: the worker may write them again.
        self._returned: collections.deque[str] = collections.deque()  # appended by any thread

    def queued(self, req_id: int, frame: bytes) -> bytes:
        """A request frame is being queued: note its segments; hand returned ones back with it."""
        if self._returned and len(frame) < _SMALL:
            frame = _with_returned(frame, _take_all(self._returned))
        if frame[4] >= _WITH_SEGMENTS:
            self.outbound[req_id] = segment_names(frame)
        return frame

    def unqueued(self, req_id: int, frame: bytes) -> None:
        """That frame was taken back unsent (Supervisor.send frees its segments, or sends it elsewhere)."""
        self.outbound.pop(req_id, None)
        if frame[4] == _WITH_RETURNED:
            self._returned.extend(unpack_plain(memoryview(frame)[4:])[5])

    def reply(self, req_id: int, status: int, body: Any) -> tuple[int, Any]:
        """A reply was read: adopt its result segments, settle its argument segments. Returns the
        ``(status, body)`` its sink gets."""
        held: list[str] | None = _NONE_HELD
        if status == OK_SHM:
            body, names, held = body
            status, body = OK, _shm.adopt(body, names, self._returned.append)
        if self.outbound:
            # After an error reply any argument segment may still be mapped: none is reused.
            self._settle(req_id, held if status == OK else None)
        return status, body

    def cancelled(self, req_id: int) -> None:
        """The request will never run: the worker never opened its segments."""
        self._settle(req_id, _NONE_HELD)

    def kept(self, req_id: int) -> None:
        """A dead worker's request is sent again (to the slot's next worker, which the Port server
        does for requests that had not started): its segments go along with its frame."""
        self.outbound.pop(req_id, None)

    def worker_gone(self) -> None:
        """After the dead worker's last replies were read and its requests failed (or held to be
        sent again): nothing maps its arguments any more, and what it made for replies it never
        sent goes."""
        for req_id in list(self.outbound):
            self._settle(req_id, _NONE_HELD)
        if self._prefix is not None:
            _shm.sweep(self._prefix)

    def _settle(self, req_id: int, held: list[str] | None) -> None:
        """A request's argument segments: kept warm for reuse unless the worker may still map them
        (``held``; None: any of them)."""
        names = self.outbound.pop(req_id, None)
        if names is None:
            return
        lifter = self._supervisor.lifter
        for name in names:
            if lifter is None:
                _shm.unlink(name)
            elif held is None or name in held:
                lifter.drop(name)
            else:
                lifter.recycle(name)


def _take_all(names: collections.deque[str]) -> list[str]:
    """Everything in ``names``, each name taken exactly once even while others append."""
    out = []
    while True:
        try:
            out.append(names.popleft())
        except IndexError:
            return out


def _with_returned(frame: bytes, returned: list[str]) -> bytes:
    """``frame`` (a small request) re-encoded to also hand ``returned`` result segments back."""
    request = unpack_plain(memoryview(frame)[4:])
    if len(request) == 4:
        request.append([])
    request.append(returned)
    return encode_frame(pack_plain(request))
