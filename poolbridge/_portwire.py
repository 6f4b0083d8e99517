"""The Port protocol's requests and values (docs/protocol.md), parent side only.

Decoding a client frame into a validated request (:class:`Request`), checking values the client
sent (plain msgpack, refs as tagged maps, no extension types), and decoding worker replies into
what goes back on the wire. Nothing here is ever unpickled. The server loop is in _server.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from . import _shm
from ._errors import BadRequestError, NotAllowedError
from ._protocol import EXT_REF, EXT_SHM, RET_AUTO, RET_REF, RET_VALUE, WireRef

#: A ref on the wire: ``{"__poolbridge_ref__": [session, id, slot, generation]}``.
REF_TAG = "__poolbridge_ref__"
#: A stream on the wire: ``{"__poolbridge_stream__": [session, id, slot, generation]}``.
STREAM_TAG = "__poolbridge_stream__"
DEFAULT_BATCH = 256

_RET = {"auto": RET_AUTO, "ref": RET_REF, "value": RET_VALUE}
_MISSING: Any = object()



class _StreamRef(WireRef):
    """A stream key decoded from a stream tag (kept apart from refs so the two cannot be confused)."""

    __slots__ = ()


# -- values ----------------------------------------------------------------------------------


def _key_of(tag: str, value: Any) -> list[Any]:
    if (
        isinstance(value, list)
        and len(value) == 4
        and isinstance(value[0], str)
        and all(type(v) is int for v in value[1:])
    ):
        return value
    raise BadRequestError(f"malformed {tag}: expected [session, id, slot, generation], got {value!r:.80}")


def _object_hook(obj: dict[Any, Any]) -> Any:
    if len(obj) == 1:
        if REF_TAG in obj:
            return WireRef(*_key_of(REF_TAG, obj[REF_TAG]))
        if STREAM_TAG in obj:
            return _StreamRef(*_key_of(STREAM_TAG, obj[STREAM_TAG]))
    return obj


def _reject_ext(code: int, data: bytes) -> Any:
    raise BadRequestError(f"msgpack extension type {code} is not accepted; refs travel as {{{REF_TAG!r}: [...]}}")


def _decode_request(frame: bytes | bytearray) -> Any:
    return msgpack.unpackb(
        frame, raw=False, strict_map_key=False, object_hook=_object_hook, ext_hook=_reject_ext, use_list=True
    )


#: The exact types of a msgpack scalar as decoded here (no container, no ref, no extension).
PLAIN_TYPES = frozenset((str, int, float, bool, bytes, type(None)))


#: Deepest nesting accepted in a value (the worker's msgpack packer refuses deeper than 511).
MAX_DEPTH = 256


def _check_value(value: Any, refs: list[WireRef]) -> None:
    """Reject what plain msgpack decoding may still produce but a value must not hold (timestamps,
    a stream tag used as a value, absurd nesting); collect the refs so their sessions can be checked."""
    t = type(value)
    if t in PLAIN_TYPES:
        return
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        value, depth = stack.pop()
        t = type(value)
        if t in PLAIN_TYPES:
            continue
        if t is list or t is dict:
            if depth >= MAX_DEPTH:
                raise BadRequestError(f"a value is nested deeper than {MAX_DEPTH} levels")
            depth += 1
            # Scalars need no visit; everything else is visited in the same order as ever.
            for item in value if t is list else [x for kv in value.items() for x in kv]:
                if type(item) not in PLAIN_TYPES:
                    stack.append((item, depth))
        elif t is WireRef:
            refs.append(value)
        elif t is _StreamRef:
            raise BadRequestError("a stream cannot be passed as a value; use stream_next/stream_close")
        else:
            raise BadRequestError(f"unsupported value of type {t.__name__} (msgpack timestamps are not accepted)")


def _reply_ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_REF:
        return {REF_TAG: msgpack.unpackb(data, raw=False)}
    if code == EXT_SHM:  # a big bytes or str result, in a segment the reader opened
        return _shm.load(data)
    # Wire-mode workers never pickle; anything else is a bug, never something to unpickle.
    raise ValueError(f"unexpected extension type {code} in a worker reply")


def _decode_value(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=_reply_ext_hook)


# -- requests ---------------------------------------------------------------------------------


def _field(req: dict[Any, Any], name: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = req.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise BadRequestError(f"{req.get('op')!r} needs the field {name!r}")
        return default
    if type(value) is types:  # the usual case: exactly the type asked for (bool only if asked)
        return value
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise BadRequestError(f"field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


class Request:
    """One decoded request, before it is sent to its worker."""

    __slots__ = ("op", "refs", "req", "target")

    def __init__(self, req: dict[Any, Any]) -> None:
        self.req = req
        self.op: str = req["op"]
        self.refs: list[WireRef] = []
        self.target: WireRef | None = None

    def field(self, name: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        return _field(self.req, name, types, default)

    def value(self, name: str, default: Any = _MISSING) -> Any:
        value = self.req.get(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise BadRequestError(f"{self.op!r} needs the field {name!r}")
            return default
        _check_value(value, self.refs)
        return value

    def args(self) -> list[Any]:
        args = self.field("args", list, [])
        _check_value(args, self.refs)
        return args  # type: ignore[no-any-return]

    def kwargs(self) -> dict[str, Any]:
        kwargs = self.field("kwargs", dict, {})
        if not all(isinstance(k, str) for k in kwargs):
            raise BadRequestError("kwargs keys must be strings")
        _check_value(kwargs, self.refs)
        return kwargs  # type: ignore[no-any-return]

    def ret(self, default: str = "auto") -> int:
        ret = self.field("ret", str, default)
        if ret not in _RET:
            raise BadRequestError(f"ret must be one of {sorted(_RET)}, got {ret!r}")
        return _RET[ret]

    def batch(self) -> int:
        batch = self.field("batch", int, DEFAULT_BATCH)
        if batch < 1:
            raise BadRequestError(f"batch must be at least 1, got {batch}")
        return batch  # type: ignore[no-any-return]

    def ref(self, name: str) -> WireRef:
        value = self.req.get(name, _MISSING)
        if type(value) is not WireRef:
            raise BadRequestError(f"field {name!r} must be a ref ({{{REF_TAG!r}: [...]}})")
        self.target = value
        return value

    def stream(self) -> WireRef:
        value = self.req.get("stream", _MISSING)
        if type(value) is not _StreamRef:
            raise BadRequestError(f"field 'stream' must be a stream ({{{STREAM_TAG!r}: [...]}})")
        self.target = value
        return value

    def fn(self, allowed: Callable[[str], bool]) -> Any:
        """The ``fn`` field: a dotted path (checked against the allow-list) or a ref."""
        value = self.req.get("fn", _MISSING)
        if type(value) is WireRef:
            self.target = value
            return value
        if not isinstance(value, str) or not value:
            raise BadRequestError("field 'fn' must be a dotted path or a ref")
        if not allowed(value):
            raise NotAllowedError(f"{value!r} is not allowed by this server's --allow-module list")
        return value

    def name(self, private_ok: bool) -> str:
        name = self.field("name", str)
        if not name:
            raise BadRequestError("field 'name' must not be empty")
        if not private_ok and name.startswith("_"):
            raise NotAllowedError(f"attribute {name!r}: private names are refused under --allow-module")
        return name  # type: ignore[no-any-return]


# -- replies ------------------------------------------------------------------------------------
