"""The Port ops that reach a worker, translated from request maps to worker requests (no I/O).

Each op reads and validates its fields and returns a :class:`Translated`: the worker op, the
target ref (a ref routes itself), the worker's field list and how to decode the reply. Every ref
met in a value is collected in ``refs`` so the one handler (_server.py) can check them all — epoch,
session, slot, generation — before anything is sent. The allow-list is not checked here: the
worker enforces it while resolving (_allow.py), where the objects are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._errors import BadRequestError
from ._portwire import REF_TAG, STREAM_TAG, PortRef, PortStream, check_value, field
from ._protocol import (
    OP_CALL,
    OP_CLOSE_SESSION,
    OP_GETATTR,
    OP_HELPER,
    OP_METHOD,
    OP_RELEASE,
    OP_SETATTR,
    OP_STREAM_CLOSE,
    OP_STREAM_NEXT,
    OP_STREAM_OPEN,
    RET_AUTO,
    RET_REF,
    RET_VALUE,
)

__all__ = ["KIND_PLAIN", "KIND_STREAM_NEXT", "KIND_STREAM_OPEN", "KIND_VALUE", "WORKER_OPS", "Translated"]

DEFAULT_BATCH = 256
_RET = {"auto": RET_AUTO, "ref": RET_REF, "value": RET_VALUE}

# How a worker's OK reply body becomes the wire value.
KIND_VALUE, KIND_STREAM_OPEN, KIND_STREAM_NEXT, KIND_PLAIN = range(4)


#: (worker op, target ref or None, the worker's field list, reply kind) — a plain tuple: built per request.
Translated = tuple[str, "PortRef | None", list[Any], int]


def _args(req: dict[Any, Any], refs: list[PortRef]) -> list[Any]:
    args = req.get("args")
    if type(args) is not list:
        args = field(req, "args", list, [])
    check_value(args, refs)
    return args


def _kwargs(req: dict[Any, Any], refs: list[PortRef]) -> dict[str, Any]:
    kwargs = req.get("kwargs")
    if kwargs is None:
        return {}
    if type(kwargs) is not dict:
        kwargs = field(req, "kwargs", dict)
    for key in kwargs:
        if type(key) is not str:
            raise BadRequestError("kwargs keys must be strings")
    check_value(kwargs, refs)
    return kwargs


def _ret(req: dict[Any, Any]) -> int:
    ret = req.get("ret")
    if ret is None:
        return RET_AUTO
    if type(ret) is str and ret in _RET:
        return _RET[ret]
    raise BadRequestError(f"ret must be one of {sorted(_RET)}, got {ret!r:.40}")


def _batch(req: dict[Any, Any]) -> int:
    batch = field(req, "batch", int, DEFAULT_BATCH)
    if batch < 1:
        raise BadRequestError(f"batch must be at least 1, got {batch}")
    return batch  # type: ignore[no-any-return]


def _ref(req: dict[Any, Any], name: str) -> PortRef:
    value = req.get(name)
    if type(value) is not PortRef:
        raise BadRequestError(f"field {name!r} must be a ref ({{{REF_TAG!r}: [...]}})")
    return value


def _stream(req: dict[Any, Any]) -> PortStream:
    value = req.get("stream")
    if type(value) is not PortStream:
        raise BadRequestError(f"field 'stream' must be a stream ({{{STREAM_TAG!r}: [...]}})")
    return value


def _fn(req: dict[Any, Any]) -> tuple[Any, PortRef | None]:
    """The ``fn`` field: a dotted path, or a ref (which is then the request's target)."""
    fn = req.get("fn")
    if type(fn) is str and fn:
        return fn, None
    if type(fn) is PortRef:
        return fn, fn
    raise BadRequestError("field 'fn' must be a dotted path or a ref")


def _name(req: dict[Any, Any]) -> str:
    name = field(req, "name", str)
    if not name:
        raise BadRequestError("field 'name' must not be empty")
    return name  # type: ignore[no-any-return]


# -- the ops --------------------------------------------------------------------------------------


def _call(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    fn = req.get("fn")
    args = req.get("args")
    kwargs = req.get("kwargs")
    if (
        type(fn) is str
        and fn
        and type(args) is list
        and (kwargs is None or (type(kwargs) is dict and not kwargs))
        and "ret" not in req
    ):
        # The common call (a path, positional args, no kwargs, no ret), read in one go.
        check_value(args, refs)
        return (OP_CALL, None, [fn, args, {}, RET_AUTO], KIND_VALUE)
    fn, target = _fn(req)
    return (OP_CALL, target, [fn, _args(req, refs), _kwargs(req, refs), _ret(req)], KIND_VALUE)


def _create(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    fn, target = _fn(req)
    return (OP_CALL, target, [fn, _args(req, refs), _kwargs(req, refs), RET_REF], KIND_VALUE)


def _getattr(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    if req.get("target") is not None:
        target = _ref(req, "target")
        return (OP_GETATTR, target, [target, _name(req), _ret(req)], KIND_VALUE)
    path = field(req, "path", str)
    if not path:
        raise BadRequestError("field 'path' must not be empty")
    return (OP_GETATTR, None, [path, None, _ret(req)], KIND_VALUE)


def _setattr(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    target = _ref(req, "target")
    if "value" not in req:
        raise BadRequestError("'setattr' needs the field 'value'")
    value = req["value"]
    check_value(value, refs)
    return (OP_SETATTR, target, [target, _name(req), value], KIND_VALUE)


def _method(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    target = _ref(req, "target")
    fields = [target, _name(req), _args(req, refs), _kwargs(req, refs), _ret(req)]
    return (OP_METHOD, target, fields, KIND_VALUE)


def _helper(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    fields = [field(req, "name", str), _args(req, refs), _kwargs(req, refs), _ret(req)]
    return (OP_HELPER, None, fields, KIND_VALUE)


def _stream_open(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    fn, target = _fn(req)
    fields = [fn, _args(req, refs), _kwargs(req, refs), _batch(req)]
    return (OP_STREAM_OPEN, target, fields, KIND_STREAM_OPEN)


def _stream_next(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    stream = _stream(req)
    return (OP_STREAM_NEXT, stream, [stream.key(), _batch(req)], KIND_STREAM_NEXT)


def _stream_close(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    stream = _stream(req)
    return (OP_STREAM_CLOSE, stream, [stream.key()], KIND_PLAIN)


def _release(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    ref = _ref(req, "ref")
    return (OP_RELEASE, ref, [ref.key()], KIND_PLAIN)


def _close_session(req: dict[Any, Any], refs: list[PortRef]) -> Translated:
    return (OP_CLOSE_SESSION, None, [], KIND_PLAIN)


#: Port op -> its translation. Ops answered by the server itself (ping, stats, slot_for, cancel)
#: are in _server.py.
WORKER_OPS: dict[str, Callable[[dict[Any, Any], list[PortRef]], Translated]] = {
    "call": _call,
    "create": _create,
    "getattr": _getattr,
    "setattr": _setattr,
    "method": _method,
    "helper": _helper,
    "stream_open": _stream_open,
    "stream_next": _stream_next,
    "stream_close": _stream_close,
    "release": _release,
    "close_session": _close_session,
}
