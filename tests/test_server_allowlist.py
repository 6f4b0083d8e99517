"""``--allow-module`` as an attacker sees it: a table of escape attempts against a real server, each
refused with ``not_allowed`` naming the refused segment; every allowed path of docs/protocol.md still
working; and a property test of the worker's resolver (_allow.py) over random path segments."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pb_portclient import REF, Server

from poolbridge._allow import FRAME_NAMES, AllowList
from poolbridge._errors import BadRequestError, NotAllowedError

ALLOWED = ("math", "os.path", "operator", "collections", "pb_portmods", "pb_test_*")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    args = [a for module in ALLOWED for a in ("--allow-module", module)]
    s = Server(*args, workers=1)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def refs(server: Server) -> dict[str, Any]:
    """Refs an attacker can get legitimately: an allowed object, and things allowed calls return."""
    return {
        "box": server.ok("create", session="atk", fn="pb_test_helpers.Box", args=[1]),
        "holder": server.ok("create", session="atk", fn="pb_portmods.Holder"),
        "system": server.ok("call", session="atk", fn="pb_portmods.give_system"),  # os.system as a ref
        "os": server.ok("call", session="atk", fn="pb_portmods.give_module"),  # the module os as a ref
        "gen": server.ok("call", session="atk", fn="pb_portmods.gen", args=[3]),  # a generator object
    }


# (op, fields, the refused segment named in the message). "{box}" etc. are replaced by refs.
ATTACKS: list[tuple[str, dict[str, Any], str]] = [
    # dotted paths: attribute chains out of an allowed module
    ("call", {"fn": "os.path.os.system", "args": ["true"]}, "'os'"),
    ("call", {"fn": "os.system", "args": ["true"]}, "'os'"),
    ("getattr", {"path": "os.path.os"}, "'os'"),
    ("getattr", {"path": "os.path.sys"}, "'sys'"),
    ("call", {"fn": "pb_portmods.sub.getpid"}, "'sub'"),
    ("call", {"fn": "pb_portmods.os.system", "args": ["true"]}, "'os'"),
    ("call", {"fn": "pb_portmods.time.sleep", "args": [0]}, "'time'"),
    ("call", {"fn": "pb_portmods.getpid"}, "'getpid'"),  # posix.getpid re-exported
    ("call", {"fn": "pb_portmods.dumps", "args": [1]}, "'dumps'"),  # json's, re-exported
    # dunder walks in paths
    ("getattr", {"path": "os.path.__builtins__"}, "'__builtins__'"),
    ("getattr", {"path": "math.__spec__"}, "'__spec__'"),
    ("getattr", {"path": "math.__loader__"}, "'__loader__'"),
    ("getattr", {"path": "operator.__builtins__"}, "'__builtins__'"),
    ("call", {"fn": "os.path.join.__globals__"}, "'__globals__'"),
    ("call", {"fn": "math.sqrt.__self__"}, "'__self__'"),
    ("call", {"fn": "pb_portmods._private"}, "'_private'"),
    # no builtins fallback, builtins not allowed, unallowed modules never imported
    ("call", {"fn": "eval", "args": ["1"]}, "'eval'"),
    ("call", {"fn": "len", "args": [[]]}, "'len'"),
    ("call", {"fn": "builtins.eval", "args": ["1"]}, "'builtins'"),
    ("call", {"fn": "builtins.__import__", "args": ["os"]}, "'__import__'"),
    ("call", {"fn": "this.x"}, "'this'"),
    ("stream_open", {"fn": "os.popen", "args": ["true"]}, "'os'"),
    ("stream_open", {"fn": "pb_portmods.sub.walk", "args": ["/"]}, "'sub'"),
    # attribute ops on refs
    ("method", {"target": "{box}", "name": "__class__"}, "'__class__'"),
    ("getattr", {"target": "{box}", "name": "__dict__"}, "'__dict__'"),
    ("getattr", {"target": "{box}", "name": "__init__"}, "'__init__'"),
    ("method", {"target": "{box}", "name": "__reduce_ex__", "args": [2]}, "'__reduce_ex__'"),
    ("setattr", {"target": "{box}", "name": "__class__", "value": 1}, "'__class__'"),
    ("setattr", {"target": "{box}", "name": "_private", "value": 1}, "'_private'"),
    ("getattr", {"target": "{holder}", "name": "fn"}, "'fn'"),  # os.system kept on an allowed object
    ("method", {"target": "{holder}", "name": "fn", "args": ["true"]}, "'fn'"),
    ("getattr", {"target": "{holder}", "name": "mod"}, "'mod'"),
    ("getattr", {"target": "{gen}", "name": "gi_frame"}, "'gi_frame'"),
    ("getattr", {"target": "{gen}", "name": "gi_code"}, "'gi_code'"),
    ("getattr", {"target": "{box}", "name": "f_globals"}, "'f_globals'"),
    # refs of things returned by allowed calls
    ("call", {"fn": "{system}", "args": ["true"]}, "the called ref"),
    ("stream_open", {"fn": "{system}", "args": ["true"]}, "the called ref"),
    ("method", {"target": "{os}", "name": "system", "args": ["true"]}, "the target ref"),
    ("getattr", {"target": "{os}", "name": "environ"}, "the target ref"),
    ("setattr", {"target": "{os}", "name": "sep", "value": "x"}, "the target ref"),
    # helper names and keyword names
    ("helper", {"name": "_private"}, "'_private'"),
    ("helper", {"name": "__import__", "args": ["os"]}, "'__import__'"),
    ("call", {"fn": "pb_portmods.echo", "kwargs": {"__class__": 1}}, "'__class__'"),
    ("method", {"target": "{box}", "name": "add", "kwargs": {"_x": 1}}, "'_x'"),
    ("stream_open", {"fn": "pb_portmods.gen", "args": [1], "kwargs": {"__globals__": 1}}, "'__globals__'"),
]


def _fill(value: Any, refs: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return refs[value[1:-1]]
    if isinstance(value, dict):
        return {k: _fill(v, refs) for k, v in value.items()}
    return value


@pytest.mark.parametrize(("op", "fields", "segment"), ATTACKS, ids=[f"{a[0]}-{i}" for i, a in enumerate(ATTACKS)])
def test_escape_attempt_is_refused(server: Server, refs: dict[str, Any], op: str, fields: dict[str, Any],
                                   segment: str) -> None:
    fields = _fill(fields, refs)
    if "target" not in fields and not isinstance(fields.get("fn"), dict):
        fields["session"] = "atk"
    err = server.error(op, **fields)
    assert err["code"] == "not_allowed", err
    assert err["type"] == "NotAllowedError" and err["traceback"] == ""
    assert segment in err["message"], err


def test_there_are_at_least_30_attacks() -> None:
    assert len(ATTACKS) >= 30


def test_refused_modules_are_never_imported(server: Server) -> None:
    assert server.error("call", session="atk", fn="this.x")["code"] == "not_allowed"
    assert server.ok("call", session="atk", fn="pb_portmods.imported", args=["this"]) is False


def test_allowed_paths_still_work(server: Server, refs: dict[str, Any]) -> None:
    ok = server.ok
    assert ok("call", session="atk", fn="math.sqrt", args=[4]) == 2.0
    assert ok("getattr", session="atk", path="math.pi") == pytest.approx(3.14159265)
    assert ok("call", session="atk", fn="os.path.join", args=["a", "b"]) == "a/b"  # os.path is posixpath
    assert ok("call", session="atk", fn="operator.add", args=[2, 3]) == 5  # defined in _operator
    counter = ok("create", session="atk", fn="collections.Counter", args=["hello"])
    assert ok("method", target=counter, name="most_common", args=[1]) == [["l", 2]]
    assert ok("call", session="atk", fn="collections.OrderedDict", args=[[["a", 1]]]) == {"a": 1}
    assert ok("method", target=refs["box"], name="add", args=[2]) == 3
    assert ok("getattr", target=refs["box"], name="value") == 3
    assert ok("setattr", target=refs["box"], name="value", value=7) is None
    assert ok("getattr", target=refs["holder"], name="value") == 1
    assert ok("method", target=refs["holder"], name="get") == 1
    assert ok("helper", session="atk", name="remember", args=["k", 1]) == 1  # helpers: by name only
    assert ok("call", session="atk", fn="pb_portmods.echo", args=[1], kwargs={"k": 2}) == [[1], {"k": 2}]
    opened = ok("stream_open", session="atk", fn="pb_portmods.gen", args=[3])
    assert opened["items"] == [0, 1, 2]
    # a data object of an unallowed module is not a callable: reading it is allowed (documented)
    assert ok("call", session="atk", fn="os.path.basename", args=["/x/y"]) == "y"
    # a path of an allowed module that does not exist is an ordinary error, not a refusal
    assert server.error("call", session="atk", fn="math.nope")["code"] == "remote_error"
    assert server.error("call", session="atk", fn="math..sqrt")["code"] == "bad_request"
    assert REF in ok("getattr", session="atk", path="math", ret="ref")  # an allowed module as a ref


# -- the resolver itself, property-based -------------------------------------------------------------

SEGMENTS = st.sampled_from([
    "os", "path", "sys", "math", "sqrt", "join", "system", "getpid", "sub", "pb_portmods", "operator", "add",
    "collections", "abc", "Counter", "posixpath", "builtins", "eval", "this", "modules", "Holder", "give_system",
    "__builtins__", "__class__", "_private", "__globals__", "__spec__", "gi_frame", "f_globals", "__init__",
    "time", "sleep", "pi", "",
])


def _owner_ok(allow: AllowList, obj: Any) -> bool:
    if isinstance(obj, types.ModuleType):
        return allow.module_allowed(obj.__name__) or obj.__name__ in allow._module_names
    owner = getattr(obj, "__module__", None)
    return not callable(obj) or type(owner) is not str or allow._owner_allowed(owner)


@settings(max_examples=400, deadline=None)
@given(segments=st.lists(SEGMENTS, min_size=1, max_size=5))
def test_a_resolved_path_only_ever_yields_allowed_objects(segments: list[str]) -> None:
    allow = AllowList(["math", "os.path", "operator", "collections", "pb_portmods"])
    path = ".".join(segments)
    before = set(sys.modules)
    try:
        module, attrs = allow.split(path)
        obj = allow.walk(module, attrs)
    except (NotAllowedError, BadRequestError, AttributeError, ImportError):
        obj = None
        refused = True
    else:
        refused = False
    new = set(sys.modules) - before
    assert all(allow.module_allowed(name.split(".")[0]) or name.startswith(("os", "posix", "collections",
                                                                              "pb_portmods", "operator", "math"))
               for name in new), new  # nothing outside the allow-list was imported
    if any(s.startswith("_") or s in FRAME_NAMES or not s for s in segments):
        assert refused, path
    if not refused:
        assert _owner_ok(allow, obj), (path, obj)
        assert not isinstance(obj, (types.FrameType, types.CodeType, types.TracebackType))
