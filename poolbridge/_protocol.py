"""The wire format shared by the router (parent) and the workers (children).

Frame: a 4-byte big-endian unsigned length, then that many bytes of one msgpack object — the layout
of Erlang's ``{packet, 4}``. Between router and worker (private, may change between versions):

    request  [id, op, session, body]      body = msgpack bytes of the op's field list
    reply    [id, status, body]           status OK: body = the value; ERROR: [code, type, message,
                                          traceback, pickled exception or nil]

The body is packed separately so a worker can read ``id`` and ``session`` even when the body fails to
decode (a bad pickle, a ref of another session): the failure becomes that request's error reply
instead of a lost reply and a hung caller. The Port protocol (docs/protocol.md) is a separate,
public, map-based format spoken by ``poolbridge serve``.

Values (embedded mode) are msgpack with three extension types:

    EXT_PICKLE  cloudpickle bytes of anything msgpack cannot carry natively (embedded only)
    EXT_TUPLE   a tuple, so tuples survive the trip as tuples
    EXT_REF     [session, ref_id, slot, generation] — a ref passed as an argument
    EXT_SHM     [name, size, kind] — a big buffer in a shared-memory segment (_shm.py)
    EXT_PICKLE5 [pickle, [segment refs]] — a pickle whose big buffers are in segments

A request whose value has segments lists their names as a fifth element,
``[id, op, session, body, names]``, so the router can unlink them whatever becomes of the request;
a reply that has them is ``[id, OK_SHM, [body, names]]`` (see _shm.py for who unlinks what).
Frames of 4 GiB and more use an extended header (_frames.py).
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from . import _shm
from ._errors import SessionMismatchError
from ._frames import FrameReader, OversizedFrame, frame_header
from ._shm import EXT_PICKLE5, EXT_SHM
from ._shm_send import Lifter

__all__ = [
    "EXT_PICKLE",
    "EXT_PICKLE5",
    "EXT_REF",
    "EXT_SHM",
    "EXT_TUPLE",
    "FrameReader",
    "OversizedFrame",
    "WireRef",
    "encode_frame",
]

# The Port server's default --max-frame (its input is untrusted); the private channel has no limit.
MAX_FRAME_DEFAULT = 256 * 1024 * 1024

EXT_PICKLE = 1
EXT_TUPLE = 2
EXT_REF = 3

OK = 0
ERROR = 1
RETIRING = 2  # worker -> router notice (id nil): "recycle me"; see WorkerCore.wants_retire
OK_SHM = 3  # OK, and the body is [body, names of the segments the value refers to]

# Ops (request field lists in brackets; see the worker's dispatch table).
OP_CALL = "call"  # [fn, args, kwargs, ret]                 fn: dotted path | callable | target ref
OP_GETATTR = "getattr"  # [path or target ref, name or nil, ret]
OP_SETATTR = "setattr"  # [target ref, name, value]
OP_METHOD = "method"  # [target ref, name, args, kwargs, ret]
OP_HELPER = "helper"  # [name, args, kwargs, ret]
OP_STREAM_OPEN = "stream_open"  # [fn, args, kwargs, batch]  -> [[session, id, slot, gen], items, done]
OP_STREAM_NEXT = "stream_next"  # [target, n]                 -> [items, done]
OP_STREAM_CLOSE = "stream_close"  # [target]
OP_RELEASE = "release"  # [target]
OP_CLOSE_SESSION = "close_session"  # []
OP_STATS = "stats"  # []                                     (session nil)
OP_PING = "ping"  # []                                       (session nil)

#: A Port value map ``{INT_TAG: "<decimal>"}`` is an integer beyond msgpack's 64 bits (docs/protocol.md).
INT_TAG = "__poolbridge_int__"

RET_AUTO = 0  # the value if it can be encoded, else a ref
RET_REF = 1  # always a ref
RET_VALUE = 2  # always the value; an encoding failure is an error


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking fd (one ``write`` for anything that fits the pipe)."""
    written = os.write(fd, data)
    if written < len(data):  # a large frame into a full pipe: finish it piece by piece
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]


def encode_frame(body: bytes) -> bytes:
    """Prefix ``body`` with its 4-byte big-endian length."""
    return frame_header(len(body)) + body


def pack_request(req_id: int, op: str, session: str | None, body: bytes, segments: list[str]) -> bytes:
    """A router-to-worker request; ``segments``: the names its value's buffers were put in."""
    if segments:
        return pack_plain([req_id, op, session, body, segments])
    return pack_plain([req_id, op, session, body])


class WireRef:
    """The identity of an object held in a worker: its session, id, slot and slot generation."""

    __slots__ = ("generation", "ref_id", "session_id", "slot")

    def __init__(self, session_id: str, ref_id: int, slot: int, generation: int) -> None:
        self.session_id = session_id
        self.ref_id = ref_id
        self.slot = slot
        self.generation = generation

    def key(self) -> list[Any]:
        return [self.session_id, self.ref_id, self.slot, self.generation]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WireRef) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash((self.session_id, self.ref_id, self.slot, self.generation))

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.ref_id} session={self.session_id!r} slot={self.slot} "
            f"generation={self.generation}>"
        )


# -- the embedded value codec -----------------------------------------------------------------

# Per-thread encoder state. ``msgpack.packb`` builds a new Packer (and its buffer) on every call,
# which costs more than the whole rest of a tiny call; a Packer is reusable but not thread-safe,
# so each thread keeps its own. ``session`` is the session a ref argument must belong to while
# this thread encodes; a ref pickled inside another object (Ref.__reduce__) is checked against it.
class _EncoderState(threading.local):
    def __init__(self) -> None:
        self.session: str | None = None
        self.owner: object = None  # the pool whose refs may be arguments (None: any)
        self.shm: Lifter | None = None  # where big pickle buffers go while encoding
        # Tried first: plain msgpack values need no session context. Anything needing an
        # extension type (tuple, ref, pickle) stops it at once and takes `value` with context.
        self.fast = _value_packer(_needs_context)
        self.value = _value_packer(_default)
        self.plain = msgpack.Packer(use_bin_type=True)


def encoding_session() -> str | None:
    return _encoding.session


def _value_packer(default: Callable[[Any], Any]) -> msgpack.Packer:
    """A Packer of user values: tuples stay distinct from lists (``strict_types``), so they reach
    ``default`` and travel as EXT_TUPLE."""
    return msgpack.Packer(default=default, strict_types=True, use_bin_type=True)


class _NeedsContext(Exception):
    pass


def _needs_context(obj: Any) -> Any:
    raise _NeedsContext


def _default(obj: Any) -> msgpack.ExtType:
    if type(obj) is tuple:
        # A nested pack cannot reuse this thread's Packer while it is mid-pack.
        return msgpack.ExtType(EXT_TUPLE, msgpack.packb(list(obj), default=_default, strict_types=True))
    if isinstance(obj, WireRef):
        check_ref_session(obj)
        return msgpack.ExtType(EXT_REF, msgpack.packb(obj.key()))
    shm = _encoding.shm
    if shm is not None:
        return shm.pickle_ext(obj, EXT_PICKLE)
    return msgpack.ExtType(EXT_PICKLE, dumps_any(obj))


def dumps_any(obj: Any) -> bytes:
    """cloudpickle bytes of ``obj`` (protocol 5). cloudpickle is imported on first use, so a worker
    that never pickles does not pay for it at every start."""
    import cloudpickle

    return cloudpickle.dumps(obj, protocol=5)  # type: ignore[no-any-return]


class _NotBuiltin(Exception):
    pass


class _BuiltinsPickler(pickle.Pickler):
    """Pickles builtin values only. ``reducer_override`` is not called for None, bool and exact
    int, float, bytes, str, list, tuple, dict, set, frozenset; anything else — a ref, a
    memoryview, an instance of a class — stops the pickle. Protocol 4: a bytearray is then
    pickled through its type, which stops it too (it arrives as bytes on this wire)."""

    def reducer_override(self, obj: Any) -> Any:
        raise _NotBuiltin


def dumps_builtins(obj: Any) -> bytes | None:
    """A pickle of ``obj`` if it holds only builtin values (see :class:`_BuiltinsPickler`), else
    None. A map's chunk of items or of results travels as one such pickle when it can: a list of
    plain values pickles and loads in C at about half the cost of msgpack with ext types, and the
    values come out as the value codec would give them."""
    out = io.BytesIO()
    try:
        _BuiltinsPickler(out, 4).dump(obj)
    except Exception:  # _NotBuiltin, or too deep: the codec says what is wrong, if anything
        return None
    return out.getvalue()


def check_ref_session(ref: WireRef) -> None:
    owner = _encoding.owner
    if owner is not None and getattr(ref, "owner", owner) is not owner:
        # Ref ids are per worker process: another pool's (session, id) could name an object here.
        raise SessionMismatchError(f"{ref!r} belongs to another pool; a ref is only usable in its own pool")
    session = encoding_session()
    if session is not None and ref.session_id != session:
        raise SessionMismatchError(
            f"a ref of session {ref.session_id!r} was passed in session {session!r}; "
            "refs are only usable in their own session"
        )


_encoding = _EncoderState()

#: A worker process's lifter (its results' big buffers); None in a router.
default_lifter: list[Lifter | None] = [None]


def pack_value(obj: Any, session: str | None = None, owner: object = None, shm: Lifter | None = None) -> bytes:
    """Encode ``obj`` for the embedded channel; ref arguments must belong to ``session`` (and to
    the pool ``owner``, when given). Big buffers go to segments of ``shm`` (default: this worker's
    lifter); their names collect in its batch (``shm.take()``)."""
    if shm is None:
        shm = default_lifter[0]
        if shm is None:
            return _pack_value(obj, session, owner, None)
    big_near_top = shm.near_top(obj)
    packed = None
    if not big_near_top:
        packed = pack_simple(obj)  # plain data makes no segment: the usual small value ends here
        if packed is not None and len(packed) < shm.threshold:
            return packed
    mark = shm.mark()
    try:
        if big_near_top:  # the usual way to pass or return a big buffer: lift it at once
            return _pack_value(shm.lift(obj), session, owner, shm)
        if packed is None:  # (not plain: pack_simple was tried above)
            packed = _pack_context(obj, session, owner, shm)  # pickle-5 buffers are lifted meanwhile
        if len(packed) < shm.threshold:
            return packed  # no buffer of the threshold's size can hide in fewer bytes
        lifted_from = shm.mark()
        lifted = shm.lift(obj)  # a big value: is there a big buffer deeper inside?
        if lifted is obj:
            return packed
        # Packed again below: the first packing's pickle buffers go (they are made again), the
        # segments the lift just made stay — the new packing names them.
        shm.discard(mark, lifted_from)
        return _pack_value(lifted, session, owner, shm)
    except BaseException:
        shm.discard(mark)  # this value is not sent: neither are its segments
        raise


def pack_simple(obj: Any) -> bytes | None:
    """``obj`` packed if it is plain msgpack data (no tuple, ref, pickle: nothing that needs the
    session, the pool or a segment); None otherwise. Tried first: it needs no context."""
    state = _encoding
    try:
        return state.fast.pack(obj)  # type: ignore[no-any-return]
    except _NeedsContext:
        state.fast.reset()  # the buffer holds the part packed before the stop
        return None
    except BaseException:
        state.fast = _value_packer(_needs_context)
        raise


def _pack_value(obj: Any, session: str | None, owner: object, shm: Lifter | None) -> bytes:
    packed = pack_simple(obj)
    return packed if packed is not None else _pack_context(obj, session, owner, shm)


def _pack_context(obj: Any, session: str | None, owner: object, shm: Lifter | None) -> bytes:
    """``obj`` packed with its extension types: tuples, refs (checked against ``session`` and
    ``owner``), pickles (their big buffers in ``shm``)."""
    state = _encoding
    state.session = session
    state.owner = owner
    state.shm = shm
    try:
        return state.value.pack(obj)  # type: ignore[no-any-return]
    except BaseException:
        # A failed pack leaves the Packer's buffer half-written: start the next one clean.
        state.value = _value_packer(_default)
        raise
    finally:
        state.session = None
        state.owner = None
        state.shm = None


def make_unpacker(on_ref: Callable[[list[Any]], Any]) -> Callable[[bytes], Any]:
    """A value decoder whose refs are turned into objects by ``on_ref([session, id, slot, gen])``."""

    def ext_hook(code: int, data: bytes) -> Any:
        if code == EXT_TUPLE:
            return tuple(unpack(data))
        if code == EXT_PICKLE:
            return pickle.loads(data)  # cloudpickle's output is plain pickle; it imports what it needs
        if code == EXT_REF:
            return on_ref(msgpack.unpackb(data))
        if code == EXT_SHM:
            return _shm.load(data)
        if code == EXT_PICKLE5:
            return _shm.load_pickle(data)
        return msgpack.ExtType(code, data)

    def unpack(data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)

    return unpack


def pack_plain(obj: Any) -> bytes:
    """Encode a protocol-level structure that holds no user values."""
    return _encoding.plain.pack(obj)  # type: ignore[no-any-return]


def reset_plain_packer() -> None:
    """After a failed :func:`pack_plain`: the Packer's buffer may be half-written."""
    _encoding.plain = msgpack.Packer(use_bin_type=True)


def unpack_plain(data: bytes | bytearray | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
