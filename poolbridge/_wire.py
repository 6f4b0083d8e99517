"""Both sides: the private wire between a pool and its workers — the op table and every envelope.

One table (:data:`OPS`) says, for each op, the fields of its request body in order, whether it runs
in a session (and whether it may create one), and which Port ops (docs/protocol.md) are translated
to it; the worker's dispatch, the Port's op list and a test of the doc all read it. Every envelope
is built and read here:

    request   [id, op, session, body(, segments(, recycled))]   encode_request / decode_request
    reply     [id, status, body]                                 encode_reply / decode_reply
    error     body = [code, type, message, traceback, pickled]   encode_error / rebuild_error
    notice    [nil, RETIRING, b""]                               RETIRING_NOTICE

``body`` is the op's fields, packed by :func:`~poolbridge._protocol.pack_value` (the value codec:
ext types, refs, big buffers). Runs in workers too: nothing here imports the parent side, and
pickles are read with :mod:`pickle` (cloudpickle's output needs no cloudpickle to load).
"""

from __future__ import annotations

import os
import pickle
import traceback
from typing import Any, NamedTuple

from ._errors import ERRORS_BY_CODE, PoolbridgeError, RemoteError, RemoteTraceback
from ._protocol import (
    ERROR,
    OP_CALL,
    OP_CLOSE_SESSION,
    OP_GETATTR,
    OP_HELPER,
    OP_METHOD,
    OP_PING,
    OP_RELEASE,
    OP_SETATTR,
    OP_STATS,
    OP_STREAM_CLOSE,
    OP_STREAM_NEXT,
    OP_STREAM_OPEN,
    RETIRING,
    dumps_any,
    pack_plain,
    pack_request,
    unpack_plain,
)

__all__ = [
    "EXISTING_SESSION_OPS",
    "OPS",
    "PORT_OPS",
    "PORT_SERVER_OPS",
    "RETIRING_NOTICE",
    "SESSIONLESS_OPS",
    "Op",
    "decode_reply",
    "decode_request",
    "encode_control",
    "encode_error",
    "encode_reply",
    "encode_request",
    "error_fields",
    "rebuild_error",
]


class Op(NamedTuple):
    fields: tuple[str, ...]  # the request body, in order
    #: "new": runs in its session, created if this worker does not hold it; "existing": only acts
    #: on what a session already holds (never creates it: a release queued by a dropped handle
    #: must not bring back a session closed meanwhile); "none": no session (the id is nil).
    session: str
    port: tuple[str, ...]  # the Port ops translated to it (_portops.py)


OPS: dict[str, Op] = {
    OP_CALL: Op(("fn", "args", "kwargs", "ret"), "new", ("call", "create")),
    OP_GETATTR: Op(("target", "name", "ret"), "new", ("getattr",)),
    OP_SETATTR: Op(("ref", "name", "value"), "existing", ("setattr",)),
    OP_METHOD: Op(("ref", "name", "args", "kwargs", "ret"), "existing", ("method",)),
    OP_HELPER: Op(("name", "args", "kwargs", "ret"), "new", ("helper",)),
    OP_STREAM_OPEN: Op(("fn", "args", "kwargs", "batch"), "new", ("stream_open",)),
    OP_STREAM_NEXT: Op(("key", "n"), "existing", ("stream_next",)),
    OP_STREAM_CLOSE: Op(("key",), "existing", ("stream_close",)),
    OP_RELEASE: Op(("key",), "existing", ("release",)),
    OP_CLOSE_SESSION: Op((), "existing", ("close_session",)),
    OP_STATS: Op((), "none", ()),  # the Port's stats is the server's: it asks every worker
    OP_PING: Op((), "none", ()),
}
SESSIONLESS_OPS = frozenset(name for name, op in OPS.items() if op.session == "none")
EXISTING_SESSION_OPS = frozenset(name for name, op in OPS.items() if op.session == "existing")
#: Port ops the server answers itself (_server.py), not translated to a worker op.
PORT_SERVER_OPS = frozenset({"ping", "stats", "slot_for", "cancel", "resize"})
#: Every op of the Port protocol (docs/protocol.md, "Operations").
PORT_OPS = frozenset(port for op in OPS.values() for port in op.port) | PORT_SERVER_OPS

# -- requests ----------------------------------------------------------------------------------

#: ``encode_request(id, op, session, body, segments)``: a request whose body the value codec packed.
encode_request = pack_request


def encode_control(req_id: int, op: str, session: str | None, fields: list[Any] | None = None) -> bytes:
    """A request of plain fields (no values to encode): stats, and releases of dropped handles."""
    return pack_plain([req_id, op, session, b"" if fields is None else pack_plain(fields)])


#: ``[id, op, session, body, *more]`` of a request frame body (``more``: segment lists).
decode_request = unpack_plain

# -- replies -----------------------------------------------------------------------------------


def encode_reply(req_id: Any, status: int, body: Any) -> bytes:
    return pack_plain([req_id, status, body])


#: ``[id, status, body]`` of a reply frame body.
decode_reply = unpack_plain

#: A worker's notice that it wants to be recycled (no request answered by it).
RETIRING_NOTICE = pack_plain([None, RETIRING, b""])

# -- errors ------------------------------------------------------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def encode_error(req_id: Any, exc: BaseException, port: bool = False) -> bytes:
    """The error reply to request ``req_id``."""
    return pack_plain([req_id, ERROR, pack_plain(error_fields(exc, port))])


def error_fields(exc: BaseException, port: bool = False) -> list[Any]:
    """``[code, type, message, traceback, pickled exception or nil]`` for an error reply.

    ``port``: for a Port client, poolbridge's own errors are named as the server names them (the
    class name) with an empty traceback, and a user error's traceback starts at the user's code:
    no frame of poolbridge's internals is shown either way.
    """
    code = exc.code if isinstance(exc, PoolbridgeError) else "remote_error"
    cls = type(exc)
    type_name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    if port and isinstance(exc, PoolbridgeError):
        type_name, tb = cls.__name__, ""
    elif port:
        frames = exc.__traceback__
        while frames is not None and frames.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            frames = frames.tb_next
        tb = "".join(traceback.format_exception(cls, exc, frames))
    else:
        tb = "".join(traceback.format_exception(exc))
    try:
        pickled: bytes | None = dumps_any(exc)
    except Exception:
        pickled = None
    return [code, type_name, str(exc), tb, pickled]


def rebuild_error(body: bytes) -> BaseException:
    """The exception an error reply stands for: the original type where it can be rebuilt."""
    code, type_name, message, tb, pickled = unpack_plain(body)
    exc: Any = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        cls = ERRORS_BY_CODE.get(code)
        exc = cls(message) if cls is not None else RemoteError(type_name, message, tb)
    exc.__cause__ = RemoteTraceback(tb)
    rebuilt: BaseException = exc
    return rebuilt
