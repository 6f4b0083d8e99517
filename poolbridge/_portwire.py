"""The Port protocol's frames and values (docs/protocol.md), parent side only.

Decoding a client frame (refs, streams and big integers as tagged maps, no extension types, no
trailing bytes), checking the values it holds, reading an ``id`` out of a frame that failed, and
building reply maps — including decoding worker replies into wire values stamped with this
server's epoch. Nothing here is ever unpickled. The ops are translated in _portops.py; the loop is
in _server.py.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack

from . import _shm
from ._errors import BadRequestError, PoolbridgeError
from ._protocol import EXT_REF, EXT_SHM, INT_TAG, WireRef, unpack_plain

__all__ = ["INT_TAG", "REF_TAG", "STREAM_TAG", "TAG_MARK", "PortRef", "PortStream", "RequestCancelledError"]

#: A ref on the wire: ``{"__poolbridge_ref__": [session, id, slot, generation, epoch]}``.
REF_TAG = "__poolbridge_ref__"
#: A stream on the wire: ``{"__poolbridge_stream__": [session, id, slot, generation, epoch]}``.
STREAM_TAG = "__poolbridge_stream__"

#: The exact types of a msgpack scalar as decoded here (no container, no ref, no extension).
PLAIN_TYPES = frozenset((str, int, float, bool, bytes, type(None)))
#: Deepest nesting accepted in a value (the worker's msgpack packer refuses deeper than 511).
MAX_DEPTH = 256
_DECIMAL = re.compile(r"-?[0-9]+")


class RequestCancelledError(PoolbridgeError):
    """The request was cancelled by a ``cancel`` op before it started; it never ran."""

    code = "cancelled"


class PortRef(WireRef):
    """A ref decoded from a request: a :class:`WireRef` (what the worker sees) plus the epoch of the
    server that made it, checked before anything is sent."""

    __slots__ = ("epoch",)

    def __init__(self, session_id: str, ref_id: int, slot: int, generation: int, epoch: str) -> None:
        super().__init__(session_id, ref_id, slot, generation)
        self.epoch = epoch


class PortStream(PortRef):
    """A stream key decoded from a stream tag (kept apart from refs so the two cannot be confused)."""

    __slots__ = ()


# -- decoding requests ----------------------------------------------------------------------------


def _key_of(tag: str, value: Any) -> list[Any]:
    if (
        type(value) is list
        and len(value) == 5
        and type(value[0]) is str
        and all(type(v) is int for v in value[1:4])
        and type(value[4]) is str
    ):
        return value
    raise BadRequestError(f"malformed {tag}: expected [session, id, slot, generation, epoch], got {value!r:.80}")


def _object_hook(obj: dict[Any, Any]) -> Any:
    if len(obj) == 1:
        if REF_TAG in obj:
            return PortRef(*_key_of(REF_TAG, obj[REF_TAG]))
        if STREAM_TAG in obj:
            return PortStream(*_key_of(STREAM_TAG, obj[STREAM_TAG]))
        if INT_TAG in obj:
            digits = obj[INT_TAG]
            try:
                if type(digits) is not str or not _DECIMAL.fullmatch(digits):
                    raise ValueError
                return int(digits)
            except ValueError:  # not decimal, or beyond the interpreter's digit limit
                raise BadRequestError(f"malformed {INT_TAG}: expected a decimal string, got {digits!r:.80}") from None
    return obj


def _reject_ext(code: int, data: bytes) -> Any:
    raise BadRequestError(f"msgpack extension type {code} is not accepted; refs travel as {{{REF_TAG!r}: [...]}}")


#: Every tag key starts with these bytes: a frame without them holds no ref, stream or big integer.
TAG_MARK = b"__poolbridge_"


def decode_request(frame: bytes | bytearray) -> Any:
    """The one msgpack object of a request frame. Bytes after it are a ``bad_request``."""
    try:
        if TAG_MARK in frame:
            return msgpack.unpackb(
                frame, raw=False, strict_map_key=False, object_hook=_object_hook, ext_hook=_reject_ext, use_list=True
            )
        # No tag can be in it (a str is its UTF-8 bytes): no hook to call for each map.
        return msgpack.unpackb(frame, raw=False, strict_map_key=False, ext_hook=_reject_ext, use_list=True)
    except BadRequestError:
        raise
    except msgpack.ExtraData as exc:
        raise BadRequestError(f"{len(exc.extra)} trailing bytes after the request's msgpack object") from None
    except Exception as exc:
        raise BadRequestError(f"undecodable frame: {exc}") from None


def valid_id(req_id: Any) -> Any:
    """``req_id`` if it is an id the server echoes (an integer or a string), else None."""
    return req_id if type(req_id) is int or type(req_id) is str else None


def salvage_id(frame: bytes | bytearray) -> Any:
    """The ``id`` of a frame that failed to decode as a request, if a lenient read of its first
    object can find one (trailing bytes, a bad ref or a bad string elsewhere do not hide it)."""
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False, ext_hook=lambda c, d: None)
    unpacker.feed(frame)
    try:
        obj = unpacker.unpack()
    except Exception:
        return None
    if isinstance(obj, dict):
        return _plain_id(obj.get(b"id"))
    return None


def _plain_id(req_id: Any) -> Any:
    if isinstance(req_id, bytes):
        try:
            return req_id.decode()
        except UnicodeDecodeError:
            return None
    return valid_id(req_id)


def id_from_head(head: bytes) -> Any:
    """The ``id`` of an oversized request, read from its first bytes: the top-level keys are scanned
    in order (values skipped) until ``"id"`` or the end of the head — not only the first key."""
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False, ext_hook=lambda c, d: None)
    unpacker.feed(head)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == b"id":
                return _plain_id(unpacker.unpack())
            unpacker.skip()
    except Exception:  # OutOfData: the id was not within the head
        return None
    return None


def check_value(value: Any, refs: list[PortRef]) -> None:
    """Reject what plain msgpack decoding may still produce but a value must not hold (timestamps,
    a stream tag used as a value, absurd nesting); collect the refs so they can be checked."""
    t = type(value)
    if t in PLAIN_TYPES:
        return
    if t is list:  # the common case, args of scalars: no walk
        for item in value:
            if type(item) not in PLAIN_TYPES:
                break
        else:
            return
    elif t is dict and not value:
        return
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        value, depth = stack.pop()
        t = type(value)
        if t is list or t is dict:
            if depth >= MAX_DEPTH:
                raise BadRequestError(f"a value is nested deeper than {MAX_DEPTH} levels")
            depth += 1
            for item in value if t is list else [x for kv in value.items() for x in kv]:
                if type(item) not in PLAIN_TYPES:
                    stack.append((item, depth))
        elif t is PortRef:
            refs.append(value)
        elif t is PortStream:
            raise BadRequestError("a stream cannot be passed as a value; use stream_next/stream_close")
        elif t not in PLAIN_TYPES:
            raise BadRequestError(f"unsupported value of type {t.__name__} (msgpack timestamps are not accepted)")


# -- reading request fields -----------------------------------------------------------------------

_MISSING: Any = object()


def field(req: dict[Any, Any], name: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """``req[name]``, of one of ``types`` (a bool is never an int here); nil counts as absent."""
    value = req.get(name)
    if value is None:
        if default is _MISSING:
            raise BadRequestError(f"{req.get('op')!r} needs the field {name!r}")
        return default
    if type(value) is types or (type(types) is tuple and type(value) in types):
        return value
    names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
    raise BadRequestError(f"field {name!r} must be {names}, got {type(value).__name__}")


def timeout_of(req: dict[Any, Any]) -> tuple[float | None, bool]:
    """The optional ``timeout`` (seconds) and whether ``on_timeout`` is ``"restart"``."""
    if "timeout" not in req and "on_timeout" not in req:
        return None, False
    timeout = field(req, "timeout", (int, float), None)
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise BadRequestError(f"timeout must be a positive number of seconds, got {timeout!r}")
    on_timeout = field(req, "on_timeout", str, "keep")
    if on_timeout not in ("keep", "restart"):
        raise BadRequestError(f"on_timeout must be 'keep' or 'restart', got {on_timeout!r}")
    return (None if timeout is None else float(timeout)), on_timeout == "restart"


# -- replies --------------------------------------------------------------------------------------


def ok_reply(req_id: Any, value: Any) -> dict[str, Any]:
    return {"id": req_id, "status": "ok", "value": value}


def error_reply(req_id: Any, code: str, type_name: str, message: str, tb: str) -> dict[str, Any]:
    return {
        "id": req_id,
        "status": "error",
        "error": {"code": code, "type": type_name, "message": message, "traceback": tb},
    }


def exc_reply(req_id: Any, exc: BaseException) -> dict[str, Any]:
    """An error raised in the server itself: its class name, no traceback (no internal frames)."""
    code = exc.code if isinstance(exc, PoolbridgeError) else "internal"
    return error_reply(req_id, code, type(exc).__name__, str(exc), "")


def worker_error_reply(req_id: Any, body: bytes) -> dict[str, Any]:
    """An error reply of a worker: ``[code, type, message, traceback, pickled]`` — the pickled
    exception is never loaded."""
    code, type_name, message, tb, _pickled = unpack_plain(body)
    return error_reply(req_id, code, type_name, message, tb)


class ValueDecoder:
    """Decodes worker reply bodies into wire values; refs get this server's ``epoch``."""

    __slots__ = ("decode", "epoch")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch

        def ext_hook(code: int, data: bytes) -> Any:
            if code == EXT_REF:
                key = unpack_plain(data)
                key.append(epoch)
                return {REF_TAG: key}
            if code == EXT_SHM:  # a big bytes or str result, in a segment the reader opened
                return _shm.load(data)
            # Wire-mode workers never pickle; anything else is a bug, never something to unpickle.
            raise ValueError(f"unexpected extension type {code} in a worker reply")

        def decode(body: bytes) -> Any:
            return msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=ext_hook)

        self.decode = decode

    def stream(self, key: list[Any]) -> dict[str, Any]:
        return {STREAM_TAG: [*key, self.epoch]}
