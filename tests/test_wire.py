"""The private wire's op table (_wire.OPS) against everything that must agree with it: the worker's
dispatch, the request builders, the Port's op translation and docs/protocol.md's op list."""

from __future__ import annotations

import pathlib
import re

import pytest

from poolbridge import _wire
from poolbridge._api import _Api, _Options
from poolbridge._errors import RefNotFoundError
from poolbridge._portops import WORKER_OPS
from poolbridge._protocol import ERROR, OK, WireRef, unpack_plain
from poolbridge._worker import WorkerCore

DOC = (pathlib.Path(__file__).parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")


def _doc_ops() -> set[str]:
    section = DOC[DOC.index("\n## Operations") :]
    section = section[: section.index("\n## ", 1)]
    return set(re.findall(r"^### `(\w+)`", section, re.M))


def test_the_doc_lists_the_table_s_port_ops() -> None:
    assert _doc_ops() == _wire.PORT_OPS


def test_the_port_translates_every_port_op_of_the_table() -> None:
    assert set(WORKER_OPS) == _wire.PORT_OPS - _wire.PORT_SERVER_OPS


def test_the_worker_has_a_handler_for_every_op() -> None:
    for op in _wire.OPS:
        assert callable(getattr(WorkerCore, f"_op_{op}")), op


def test_the_session_rules_come_from_the_table() -> None:
    assert _wire.SESSIONLESS_OPS == {"stats", "ping"}
    assert "release" in _wire.EXISTING_SESSION_OPS and "call" not in _wire.EXISTING_SESSION_OPS


REF = WireRef("s", 1, 0, 0)


@pytest.mark.parametrize(
    ("build", "op"),
    [
        (lambda api: api._req_call("m.f", (1,), {}), "call"),
        (lambda api: api._req_getattr("m.x", None), "getattr"),
        (lambda api: api._req_setattr(REF, "x", 1), "setattr"),
        (lambda api: api._req_method(REF, "f", (), {}), "method"),
        (lambda api: api._req_helper("h", (), {}), "helper"),
        (lambda api: api._req_stream_open("m.g", (), {}, lambda *a: a), "stream_open"),
        (lambda api: api._req_stream_next(REF, 3), "stream_next"),
        (lambda api: api._req_stream_close(REF), "stream_close"),
        (lambda api: api._req_close_session(), "close_session"),
    ],
)
def test_each_request_builder_sends_the_table_s_fields(build, op) -> None:
    api = _Api(None, _Options())  # type: ignore[arg-type]  # the builders never touch the pool
    built_op, _ref, fields, _decode = build(api)
    assert built_op == op
    assert len(fields) == len(_wire.OPS[op].fields)


def test_envelopes_round_trip() -> None:
    frame = _wire.encode_control(7, "release", "s", [REF.key()])
    req_id, op, session, body = _wire.decode_request(frame)
    assert (req_id, op, session, unpack_plain(body)) == (7, "release", "s", [REF.key()])
    assert _wire.decode_reply(_wire.encode_reply(7, OK, b"x")) == [7, OK, b"x"]
    rid, status, body = _wire.decode_reply(_wire.encode_error(7, RefNotFoundError("gone")))
    assert (rid, status) == (7, ERROR)
    exc = _wire.rebuild_error(body)
    assert isinstance(exc, RefNotFoundError) and str(exc) == "gone"
    assert exc.__cause__ is not None  # the remote traceback
